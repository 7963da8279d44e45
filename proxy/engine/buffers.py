"""One pool for every part buffer of every upload, capped at ``memory_budget``.

This is what bounds the daemon's memory: a part's bytes live only in buffers
leased from here, so bytes buffered <= budget whatever the file sizes or the
number of uploads.  When the pool is empty, ``acquire`` waits; an upload that
waits stops reading its socket, and TCP flow control slows the client.  Waiters
are served first come, first served, so a large request is not starved by small ones.

Memory follows what a client has sent, not what it has announced: a part
(:class:`PartBuffer`) is leased in two steps, a small *head* (<= 1 MiB) when its
first byte arrives and the *rest* of the part once the head is full.  A client that
opens uploads and trickles bytes holds a head per upload, not a whole part.

The rest of a part may never take the pool's last ``head_reserve_bytes`` (a head per
upload slot, at most a quarter of the pool: :func:`proxy.app.new_pool`): rests wait for
rests, heads do not.  A
client that sends a head and one byte more, then trickles, holds a whole part for as
long as it keeps the minimum rate; without the reserve, 32 such uploads from 4 addresses
(each within its per-client cap) held the whole pool and every new upload got 503
``ERR_BUSY``.  With it, admission (a head) always finds room while slots are free;
what slow clients can still do is make fast uploads wait for a rest (back-pressure).

Each client (address group, see :func:`proxy.engine.limits.client_group`) may hold at most
``client_cap_bytes`` of the pool.  A client at its cap waits in a queue of its own
(:class:`ClientBuffers`), so its back-pressure never holds up anyone else's request.

Why two steps and not a part built from many small slabs: an upload that holds part
of a part while it waits for more of it can deadlock the pool (every upload holding
a partial part, none able to finish one).  With two steps an upload waits while
holding at most one head, and :func:`head_bytes_for` sizes the head so that even
when every upload that may run holds one, the rest of a part still fits once the
parts in flight are stored.  Finer slabs would need a banker's algorithm for the
same guarantee, to save at most one part per slow upload.

Buffers are anonymous memory maps, not ``bytearray``: malloc serves a block from its
heap once its mmap threshold has risen past that size (glibc raises it each time it
unmaps a big block), and a 1 MiB head freed in the middle of the heap stays resident
until the next trim; after a burst RSS stayed up by ~10 MiB.  A map goes back to the OS
when it is dropped, whatever malloc does; its pages are zeroed by the kernel when first
written (bytearray zero-filled all of them first).  Buffers of the sizes used over and
over are kept for reuse (up to ``keep_idle`` of each) instead of mapped afresh.
"""

from __future__ import annotations

import asyncio
import mmap
from collections import deque
from collections.abc import Callable
from typing import Protocol, TypeAlias

# What the pool leases: a writable, fixed-size buffer (see the module docstring).
Buffer: TypeAlias = mmap.mmap

HEAD_BYTES_MAX = 1024 * 1024
# Below this a head saves too little to be worth a second lease per part.
HEAD_BYTES_MIN = 64 * 1024
_PAGE_BYTES = 4096


class PoolTimeout(Exception):
    """No buffer became free within the timeout."""


def head_bytes_for(
    budget_bytes: int,
    part_size_bytes: int,
    uploads: int,
    client_cap_bytes: int | None = None,
    uploads_per_client: int = 1,
) -> int:
    """The largest head (<= 1 MiB, whole pages) with which two-step leases cannot deadlock.

    An upload waits for the rest of its part while holding one head.  Parts being
    filled or stored finish without the pool (the client sends or times out; S3
    answers or fails), so the worst case is every upload holding a head and waiting:
    ``uploads * head + (part - head) <= budget`` lets the first of them through, and
    the same within one client's cap.  When not even a 64 KiB head fits, parts are
    leased whole (no second step, no hold-and-wait), as before heads existed.
    """
    head = min(HEAD_BYTES_MAX, part_size_bytes)
    for cap, holders in ((budget_bytes, uploads), (client_cap_bytes, uploads_per_client)):
        if cap is not None and holders > 1:
            head = min(head, (cap - part_size_bytes) // (holders - 1))
    head -= head % _PAGE_BYTES
    return head if head >= HEAD_BYTES_MIN else part_size_bytes


class _Gate:
    """A byte budget, granted first come, first served."""

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = cap_bytes
        self.used = 0
        self.waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def idle(self) -> bool:
        return not self.used and not self.waiters

    def try_take(self, size: int) -> bool:
        """Take ``size`` now if that jumps no queue."""
        if self.waiters or self.used + size > self.cap_bytes:
            return False
        self.used += size
        return True

    async def take(self, size: int) -> None:
        if self.try_take(size):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, fut)
        self.waiters.append(entry)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                # Granted just as we timed out or were cancelled: hand the grant on.
                self.give(size)
            else:
                try:
                    self.waiters.remove(entry)
                except ValueError:
                    pass
                self._wake()
            raise

    def give(self, size: int) -> None:
        self.used -= size
        assert self.used >= 0, "buffer released twice"
        self._wake()

    def _wake(self) -> None:
        # Grant in order; reserve the bytes now so a later try_take cannot take them.
        while self.waiters:
            size, fut = self.waiters[0]
            if fut.done():
                self.waiters.popleft()
                continue
            if self.used + size > self.cap_bytes:
                return
            self.waiters.popleft()
            self.used += size
            fut.set_result(None)


class Buffers(Protocol):
    """Where a part leases its memory: the pool, or the pool as one client sees it."""

    @property
    def head_bytes(self) -> int: ...

    async def acquire(
        self, size: int | None = None, timeout_s: float | None = None, *, rest: bool = False
    ) -> Buffer:
        """A buffer of ``size`` bytes (default: one part).  Waits while the budget is spent.
        ``rest``: the second lease of a part (it may not take the heads' reserve)."""

    def release(self, buf: Buffer) -> None: ...


class BufferPool:
    def __init__(
        self,
        budget_bytes: int,
        part_size_bytes: int,
        keep_idle: int = 4,
        on_idle: Callable[[], None] | None = None,
        *,
        head_bytes: int | None = None,
        client_cap_bytes: int | None = None,
        head_reserve_bytes: int = 0,
    ) -> None:
        """``head_bytes`` None leases parts whole; ``client_cap_bytes`` None caps no client;
        rests never take the last ``head_reserve_bytes`` of the budget."""
        if part_size_bytes <= 0:
            raise ValueError("part_size_bytes must be > 0")
        if budget_bytes < part_size_bytes:
            raise ValueError("budget_bytes must hold at least one part")
        if client_cap_bytes is not None and not part_size_bytes <= client_cap_bytes:
            raise ValueError("client_cap_bytes must hold at least one part")
        head = part_size_bytes if head_bytes is None else head_bytes
        if not 0 < head <= part_size_bytes:
            raise ValueError("head_bytes must be in (0, part_size_bytes]")
        self.budget_bytes = budget_bytes
        self.part_size_bytes = part_size_bytes
        self.head_bytes = head
        self.client_cap_bytes = client_cap_bytes
        self._keep_idle = keep_idle
        # Called when the last leased buffer comes back (e.g. to trim the heap).
        self._on_idle = on_idle
        self._gate = _Gate(budget_bytes)
        if not 0 <= head_reserve_bytes <= budget_bytes - (part_size_bytes - head):
            raise ValueError("head_reserve_bytes must leave room for the rest of one part")
        self._rests = _Gate(budget_bytes - head_reserve_bytes)
        self._rest_ids: set[int] = set()  # id() of the buffers leased as rests
        self._clients: dict[str, _Gate] = {}
        # The sizes leased over and over: whole parts, or heads and rests.
        sizes = {part_size_bytes} if head == part_size_bytes else {head, part_size_bytes - head}
        self._idle: dict[int, list[Buffer]] = {size: [] for size in sizes}
        self.peak_in_use_bytes = 0

    @property
    def in_use_bytes(self) -> int:
        return self._gate.used

    @property
    def idle_bytes(self) -> int:
        return sum(size * len(bufs) for size, bufs in self._idle.items())

    @property
    def waiting(self) -> int:
        """Requests waiting for a buffer, in the pool's queue or in a client's."""
        return len(self._gate.waiters) + sum(len(g.waiters) for g in self._clients.values())

    def client_bytes(self, client: str) -> int:
        """What ``client`` holds now (0 without a per-client cap)."""
        gate = self._clients.get(client)
        return 0 if gate is None else gate.used

    def client(self, client: str) -> ClientBuffers:
        """The pool as ``client`` (an address group) sees it: its leases count against
        its cap, and it waits in its own queue while it is at the cap."""
        return ClientBuffers(self, client)

    async def acquire(
        self,
        size: int | None = None,
        timeout_s: float | None = None,
        client: str | None = None,
        *,
        rest: bool = False,
    ) -> Buffer:
        """A buffer of ``size`` bytes (default: one part).  Waits while the budget, or
        ``client``'s cap, or (``rest``) what rests may hold, is spent; raises
        :class:`PoolTimeout` after ``timeout_s``."""
        size = self.part_size_bytes if size is None else size
        if size > self.part_size_bytes:
            raise ValueError(f"buffer of {size} bytes is larger than a part")
        gate = self._client_gate(client)
        try:
            async with asyncio.timeout(timeout_s):
                # The client's own queue first: a client at its cap waits there, behind
                # its own requests only, and joins the pool's queue once it may lease.
                if gate is not None:
                    await gate.take(size)
                try:
                    if rest:
                        await self._rests.take(size)
                    try:
                        await self._gate.take(size)
                    except BaseException:
                        if rest:
                            self._rests.give(size)
                        raise
                except BaseException:
                    if gate is not None:
                        gate.give(size)
                    raise
        except TimeoutError:
            raise PoolTimeout(f"no {size}-byte buffer free within {timeout_s}s") from None
        finally:
            self._forget(client)
        buf = self._materialise(size)
        if rest:
            self._rest_ids.add(id(buf))
        return buf

    def _client_gate(self, client: str | None) -> _Gate | None:
        if client is None or self.client_cap_bytes is None:
            return None
        gate = self._clients.get(client)
        if gate is None:
            gate = self._clients[client] = _Gate(self.client_cap_bytes)
        return gate

    def _forget(self, client: str | None) -> None:
        # The map never outgrows the clients that hold or wait for a buffer.
        gate = self._clients.get(client) if client is not None else None
        if gate is not None and gate.idle:
            del self._clients[client]  # type: ignore[arg-type]

    def _materialise(self, size: int) -> Buffer:
        self.peak_in_use_bytes = max(self.peak_in_use_bytes, self._gate.used)
        idle = self._idle.get(size)
        if idle:
            return idle.pop()
        # Idle buffers count against the budget too: drop them before going over it.
        for bufs in self._idle.values():
            while bufs and self._gate.used + self.idle_bytes > self.budget_bytes:
                bufs.pop()
        return mmap.mmap(-1, size)

    def release(self, buf: Buffer, client: str | None = None) -> None:
        size = len(buf)
        if id(buf) in self._rest_ids:
            self._rest_ids.discard(id(buf))
            self._rests.give(size)
        idle = self._idle.get(size)
        if idle is not None and len(idle) < self._keep_idle:
            idle.append(buf)
        self._gate.give(size)
        gate = self._clients.get(client) if client is not None else None
        if gate is not None:
            gate.give(size)
            self._forget(client)
        if not self._gate.used and self._on_idle is not None:
            self._on_idle()


class ClientBuffers:
    """:class:`BufferPool` as one client sees it (see :meth:`BufferPool.client`)."""

    __slots__ = ("_pool", "client")

    def __init__(self, pool: BufferPool, client: str) -> None:
        self._pool = pool
        self.client = client

    @property
    def head_bytes(self) -> int:
        return self._pool.head_bytes

    async def acquire(
        self, size: int | None = None, timeout_s: float | None = None, *, rest: bool = False
    ) -> Buffer:
        return await self._pool.acquire(size, timeout_s, client=self.client, rest=rest)

    def release(self, buf: Buffer) -> None:
        self._pool.release(buf, client=self.client)


def release_view(view: memoryview) -> None:
    try:
        view.release()
    except BufferError:
        # A cancelled hash still reads it in a worker thread; the view dies with that call.
        pass


class PartBuffer:
    """One part's bytes, ``size_bytes`` at most, in at most two pooled buffers: a head
    leased when the first byte arrives and the rest of the part once the head is full.

    ``start`` bytes at the front are spoken for but not written by :meth:`write` (the tus
    writer stitches pending bytes from S3 in there with :meth:`write_at`); memory for
    them is leased with the first byte written after them, or by :meth:`cover`.
    """

    def __init__(self, buffers: Buffers, size_bytes: int, start: int = 0) -> None:
        if not 0 <= start <= size_bytes:
            raise ValueError("start must lie within the part")
        self._buffers = buffers
        self.size_bytes = size_bytes
        self.filled = start
        self._pieces: list[Buffer] = []
        self._leased = 0
        self._views: list[memoryview] = []

    @property
    def full(self) -> bool:
        return self.filled >= self.size_bytes

    @property
    def room(self) -> int:
        """Bytes :meth:`write` can take without leasing more."""
        return max(0, self._leased - self.filled)

    async def lease(self, timeout_s: float | None = None) -> None:
        """Lease memory for at least the next byte (the head, or the rest of the part)."""
        await self._lease_to(min(self.filled + 1, self.size_bytes), timeout_s)

    async def cover(self) -> None:
        """Lease memory for every byte up to ``filled`` (the part is about to be sent)."""
        await self._lease_to(self.filled, None)

    async def _lease_to(self, nbytes: int, timeout_s: float | None) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                while self._leased < nbytes:
                    rest = bool(self._pieces)
                    if rest:
                        size = self.size_bytes - self._leased
                    else:
                        size = min(self._buffers.head_bytes, self.size_bytes)
                    self._pieces.append(await self._buffers.acquire(size, rest=rest))
                    self._leased += size
        except TimeoutError:
            raise PoolTimeout(f"no part buffer free within {timeout_s}s") from None

    def write(self, data: memoryview) -> int:
        """Copy as much of ``data`` as the leased memory takes; return how much."""
        n = min(len(data), self.room)
        if n:
            self.write_at(self.filled, data[:n])
            self.filled += n
        return n

    def room_view(self) -> memoryview:
        """The leased memory after ``filled`` up to the end of its piece, to read into
        (then :meth:`advance`); release it after use."""
        base = 0
        for piece in self._pieces:
            end = min(base + len(piece), self.size_bytes)
            if self.filled < end:
                return memoryview(piece)[self.filled - base : end - base]
            base += len(piece)
        raise ValueError("no room leased")

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more were read into :meth:`room_view`."""
        if self.filled + nbytes > min(self._leased, self.size_bytes):
            raise ValueError("advancing past the leased memory")
        self.filled += nbytes

    def write_at(self, pos: int, data: bytes | memoryview) -> None:
        """Copy ``data`` to ``pos`` (which must be leased), across pieces if need be."""
        if pos + len(data) > self._leased:
            raise ValueError("writing past the leased memory")
        src = memoryview(data)
        base = 0
        for piece in self._pieces:
            end = base + len(piece)
            if src and pos < end:
                take = min(len(src), end - pos)
                piece[pos - base : pos - base + take] = src[:take]
                src = src[take:]
                pos += take
            base = end

    def views(self, start: int = 0) -> list[memoryview]:
        """Bytes ``start`` to ``filled`` as views of the pieces, in order (no copy)."""
        out: list[memoryview] = []
        base = 0
        for piece in self._pieces:
            end = min(base + len(piece), self.filled)
            if start < end:
                out.append(memoryview(piece)[max(start, base) - base : end - base])
            base += len(piece)
        self._views.extend(out)
        return out

    def release(self) -> None:
        """Give the memory back.  Idempotent; views handed out become invalid."""
        for view in self._views:
            release_view(view)
        self._views.clear()
        pieces, self._pieces = self._pieces, []
        self._leased = 0
        for piece in pieces:
            self._buffers.release(piece)
