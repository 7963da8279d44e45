"""Abuse limits that need no body: who the client is, how many uploads it runs, what it sends.

* :func:`client_info` believes ``X-Forwarded-For`` / ``X-Forwarded-Proto`` only when
  the TCP peer is a configured trusted proxy; otherwise anyone could pick the address
  the per-client limit counts against.
* :class:`UploadSlots` caps uploads in total (503, the server is full) and per client
  (429, this client is asking for too much).
* :class:`ContentPolicy` is the content-type and extension allowlist (415).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from proxy.errors import ProxyError

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


def _trusted(addr: Address | None, trusted: tuple[Network, ...]) -> bool:
    if addr is None:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in trusted)


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


class TooManyUploads(ProxyError):
    code = "ERR_TOO_MANY_UPLOADS"
    status = 503
    reason = "busy"


class ClientLimit(ProxyError):
    code = "ERR_CLIENT_LIMIT"
    status = 429
    reason = "client_limit"


class UploadSlots:
    """Counts running uploads, in total and per client address.

    ``check`` is for the Expect handler (nothing is held yet); ``hold`` re-checks and
    takes the slot in one synchronous step, so the two can race only in the harmless
    direction (a 100 Continue followed by a 429).
    """

    def __init__(self, total: int, per_client: int, retry_after_s: int = 5) -> None:
        if total < 1 or per_client < 1:
            raise ValueError("limits must be >= 1")
        self.total = total
        self.per_client = per_client
        self._retry_after = str(retry_after_s)
        self._by_client: dict[str, int] = {}
        self.in_use = 0

    def check(self, client: str) -> None:
        if self.in_use >= self.total:
            raise TooManyUploads(
                f"the server runs {self.total} uploads already; retry later",
                headers={"Retry-After": self._retry_after},
            )
        if self._by_client.get(client, 0) >= self.per_client:
            raise ClientLimit(
                f"at most {self.per_client} concurrent uploads per client",
                headers={"Retry-After": self._retry_after},
            )

    @contextmanager
    def hold(self, client: str) -> Iterator[None]:
        self.check(client)
        self.in_use += 1
        self._by_client[client] = self._by_client.get(client, 0) + 1
        try:
            yield
        finally:
            self.in_use -= 1
            left = self._by_client[client] - 1
            if left:
                self._by_client[client] = left
            else:
                del self._by_client[client]  # the map never outgrows the running uploads


class NotAllowed(ProxyError):
    code = "ERR_UNSUPPORTED_MEDIA_TYPE"
    status = 415
    reason = "not_allowed"


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
                raise NotAllowed(
                    "this file extension is not accepted here", code="ERR_EXTENSION_NOT_ALLOWED"
                )


@dataclass
class UploadStats:
    """Plain counters the status line (sd_notify) and /status can read."""

    received_bytes: int = 0
    completed: int = 0
    failed: int = 0
