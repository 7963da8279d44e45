"""Abuse limits: who the client is, how many uploads it runs, what and how fast it sends.

* :func:`client_info` believes ``X-Forwarded-For`` / ``X-Forwarded-Proto`` only when
  the TCP peer is a configured trusted proxy; otherwise anyone could pick the address
  the per-client limit counts against.
* :func:`client_group` is what every per-client limit counts under (an IPv4 address, an
  IPv6 /64).
* :class:`UploadSlots` caps uploads in total (503, the server is full) and per client
  (429, this client is asking for too much), shares them fairly once they are all
  taken, and drains them on shutdown.
* :class:`ContentPolicy` is the content-type and extension allowlist (415).
* :class:`BodyPace` is the minimum body rate (408 ``ERR_TOO_SLOW``).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from proxy.errors import (
    ClientLimit,
    Evicted,
    ExtensionNotAllowed,
    NotAllowed,
    ShuttingDown,
    TooManyUploads,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Beyond this many X-Forwarded-For hops we stop walking: a long header is an attack, not a path.
MAX_FORWARDED_HOPS = 16


@dataclass(frozen=True)
class ClientInfo:
    ip: str
    scheme: str


def _address(value: str) -> Address | None:
    value = value.strip()
    if value.startswith("[") and "]" in value:  # "[::1]:1234" as some proxies write it
        value = value[1 : value.index("]")]
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def _unmapped(addr: Address) -> Address:
    """``::ffff:192.0.2.1`` (an IPv4 peer on a dual-stack socket) is ``192.0.2.1``."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _trusted(addr: Address | None, trusted: tuple[Network, ...]) -> bool:
    if addr is None:
        return False
    addr = _unmapped(addr)
    return any(addr.version == net.version and addr in net for net in trusted)


# An ISP hands each IPv6 subscriber at least a /64 (RFC 6177), so one client can pick any
# of 2^64 source addresses: counted one by one, a per-client limit would not limit it.
IPV6_CLIENT_PREFIX = 64


def client_group(ip: str) -> str:
    """The key every per-client limit counts under: the IPv4 address (also when it comes
    IPv4-mapped, ``::ffff:a.b.c.d``), or the /64 network of an IPv6 address.  Anything
    that is not an address (``"unknown"``) is its own group."""
    addr = _address(ip)
    if addr is None:
        return ip
    addr = _unmapped(addr)
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, IPV6_CLIENT_PREFIX), strict=False))
    return str(addr)


def is_trusted(ip: str, trusted: tuple[Network, ...]) -> bool:
    """Is ``ip`` (a peer address) one of the configured trusted proxies?"""
    return _trusted(_address(ip), trusted)


def client_info(
    remote: str | None,
    forwarded_for: str | None,
    forwarded_proto: str | None,
    scheme: str,
    trusted: tuple[Network, ...],
) -> ClientInfo:
    """The real client address and scheme, honouring forwarded headers from trusted peers.

    X-Forwarded-For is read right to left: each trusted hop vouches for the address to
    its left; the first untrusted address is the client.  Entries further left were
    written by the client itself and mean nothing.
    """
    peer = remote or "unknown"
    if not _trusted(_address(peer), trusted):
        return ClientInfo(peer, scheme)
    client = peer
    if forwarded_for:
        for hop in reversed(forwarded_for.split(",")[-MAX_FORWARDED_HOPS:]):
            addr = _address(hop)
            if addr is None:
                break  # garbage: keep the last address a trusted hop vouched for
            client = str(addr)
            if not _trusted(addr, trusted):
                break
    proto = (forwarded_proto or "").split(",")[0].strip().lower()
    return ClientInfo(client, proto if proto in ("http", "https") else scheme)


class UploadSlots:
    """Counts running uploads, in total and per client address, and drains them.

    ``check`` is for the Expect handler (nothing is held yet); ``hold`` re-checks and
    takes the slot in one synchronous step, so the two can race only in the harmless
    direction (a 100 Continue followed by a 429).

    Fair share once every slot is taken: a client (address group) that holds at least two
    uploads fewer than the client holding the most does not get 503: the newest upload
    of the client holding the most is cancelled (503 ``ERR_EVICTED``, its multipart upload
    aborted; a tus PATCH keeps what it stored) and its slot is the newcomer's.  So a few
    addresses that take every slot and keep them at the minimum rate cannot lock anyone
    else out; each of them keeps as many as anyone else.  The newest goes because it has
    the least to lose.  Between the cancel and the victim's unwinding the count runs one
    over ``total`` per eviction under way.

    Why the drain is ours and not aiohttp's: once its shutdown starts, aiohttp drops
    every byte that arrives on open connections (``RequestHandler.data_received``
    returns early when closing), so an upload in flight can never finish inside
    ``AppRunner(shutdown_timeout=...)``.  :meth:`drain` runs *before* the runner's
    cleanup, while connections still read: it refuses new uploads, waits for the
    running ones, and cancels (so aborts) the rest when the drain timeout is up.
    """

    def __init__(self, total: int, per_client: int, retry_after_s: int = 5) -> None:
        if total < 1 or per_client < 1:
            raise ValueError("limits must be >= 1")
        self.total = total
        self.per_client = per_client
        self._retry_after = str(retry_after_s)
        self._by_client: dict[str, int] = {}
        self._tasks: set[asyncio.Task[object]] = set()
        # The running uploads' tasks by client group, oldest first; and those evicted.
        self._held: dict[str, list[asyncio.Task[object]]] = {}
        self._evicted: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.in_use = 0
        self.closed = False

    def check(self, client: str) -> None:
        """``client`` is an address; it counts under its :func:`client_group`."""
        client = client_group(client)
        if self.closed:
            raise ShuttingDown(
                "the server is shutting down; retry shortly",
                headers={"Retry-After": self._retry_after},
            )
        if self.in_use - len(self._evicted) >= self.total and self._victim(client) is None:
            raise TooManyUploads(
                f"the server runs {self.total} uploads already; retry later",
                headers={"Retry-After": self._retry_after},
            )
        if self._by_client.get(client, 0) >= self.per_client:
            raise ClientLimit(
                f"at most {self.per_client} concurrent uploads per client",
                headers={"Retry-After": self._retry_after},
            )

    def _victim(self, group: str) -> asyncio.Task[object] | None:
        """The upload to evict for ``group``'s new one, if it is owed a fair share."""
        if not self._held:
            return None
        mine = self._by_client.get(group, 0)
        biggest = max(self._held, key=lambda g: len(self._held[g]))
        candidates = [t for t in self._held[biggest] if t not in self._evicted]
        if len(candidates) < mine + 2:
            return None
        return candidates[-1]

    @contextmanager
    def hold(self, client: str) -> Iterator[None]:
        self.check(client)
        client = client_group(client)
        if self.in_use - len(self._evicted) >= self.total:
            victim = self._victim(client)
            assert victim is not None  # check() let us in
            self._evicted.add(victim)
            victim.cancel()
        task = asyncio.current_task()
        self.in_use += 1
        self._by_client[client] = self._by_client.get(client, 0) + 1
        self._idle.clear()
        if task is not None:
            self._tasks.add(task)
            self._held.setdefault(client, []).append(task)
        try:
            yield
        except asyncio.CancelledError:
            if task is None or task not in self._evicted or task.uncancel():
                raise
            raise Evicted(
                "every upload slot is taken and this client holds the most; "
                "its newest upload gave its slot to another client",
                headers={"Retry-After": self._retry_after},
            ) from None
        finally:
            if task is not None:
                self._tasks.discard(task)
                self._evicted.discard(task)
                held = self._held[client]
                held.remove(task)
                if not held:
                    del self._held[client]
            self.in_use -= 1
            if not self.in_use:
                self._idle.set()
            left = self._by_client[client] - 1
            if left:
                self._by_client[client] = left
            else:
                del self._by_client[client]  # the map never outgrows the running uploads

    async def drain(self, timeout_s: float, cancel_grace_s: float) -> int:
        """Refuse new uploads, wait up to ``timeout_s`` for the running ones, then cancel
        the rest and give their aborts ``cancel_grace_s``.  Returns how many were cancelled."""
        self.closed = True
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
            return 0
        except TimeoutError:
            pass
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            # The tasks abort their multipart uploads (shielded) while unwinding.
            await asyncio.wait(tasks, timeout=cancel_grace_s)
        return len(tasks)


class ContentPolicy:
    """Allowlists of media types (``image/*`` wildcards) and file extensions; empty allows all."""

    def __init__(
        self, content_types: tuple[str, ...] = (), extensions: tuple[str, ...] = ()
    ) -> None:
        self._types = frozenset(t.lower() for t in content_types)
        self._exts = tuple(e.lower() for e in extensions)

    def check(self, content_type: str | None, name: str | None) -> None:
        """``content_type`` as sent (parameters ignored); ``name`` a key or a file name."""
        if self._types:
            media = (content_type or "").split(";")[0].strip().lower()
            wildcard = media.split("/")[0] + "/*"
            if media not in self._types and wildcard not in self._types:
                raise NotAllowed("this content type is not accepted here")
        if self._exts:
            base = (name or "").replace("\\", "/").rsplit("/", 1)[-1].lower()
            if not base.endswith(self._exts):
                raise ExtensionNotAllowed("this file extension is not accepted here")


class BodyPace:
    """The minimum body rate, on a clock that runs only while we wait for the client.

    While we hold back (S3 is slow, the buffer pool is spent, a part waits for a sending
    slot) the client's bytes pile up in socket buffers: it is not the one being slow, so
    that time does not count.  For the first ``grace_s`` of that clock nothing is
    enforced (TCP slow start, a client hashing its file first); after it, the bytes that
    arrived in the last ``grace_s`` of it must average ``min_bytes_per_s``.  One pace per
    request: the files of a form share it, so a new file does not start a new grace.
    """

    # Arrivals are counted in buckets of this much of the clock, so the window holds at
    # most grace_s / BUCKET_S + 1 of them however many chunks arrive.  A bucket's bytes
    # are dated at its end: a client is never cut off early, at most BUCKET_S late.
    BUCKET_S = 0.5

    def __init__(self, min_bytes_per_s: float, grace_s: float) -> None:
        if min_bytes_per_s < 0 or grace_s <= 0:
            raise ValueError("min_bytes_per_s must be >= 0 and grace_s > 0")
        self.min_bytes_per_s = min_bytes_per_s
        self.window_s = grace_s
        self.waited_s = 0.0
        self._recent: deque[list[float]] = deque()  # [end of the bucket, bytes]
        self._recent_bytes = 0.0

    def record(self, waited_s: float, nbytes: int) -> None:
        """``waited_s`` more of waiting for the client, which then gave ``nbytes``."""
        self.waited_s += waited_s
        if nbytes:
            end = (self.waited_s // self.BUCKET_S + 1) * self.BUCKET_S
            if self._recent and self._recent[-1][0] == end:
                self._recent[-1][1] += nbytes
            else:
                self._recent.append([end, nbytes])
            self._recent_bytes += nbytes
        start = self.waited_s - self.window_s
        while self._recent and self._recent[0][0] < start:
            self._recent_bytes -= self._recent.popleft()[1]

    def allowance_s(self) -> float:
        """How much longer we may wait for the client's next bytes before its rate falls
        below the minimum; 0 when it already has, infinite when there is no minimum."""
        if self.min_bytes_per_s <= 0:
            return float("inf")
        need = self.min_bytes_per_s * self.window_s
        now = self.waited_s
        at = max(now, self.window_s)  # nothing is enforced before the grace is over
        left = self._recent_bytes
        # Without new bytes, the buckets leave the window one by one (at their time +
        # window); the client is too slow at the first moment what is left is too little.
        for when, nbytes in self._recent:
            if when + self.window_s >= at:
                if left < need:
                    return at - now
                at = when + self.window_s
            left -= nbytes
        return at - now
