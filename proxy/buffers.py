"""One pool for every part buffer of every upload, capped at ``memory_budget``.

This is what bounds the daemon's memory: a part's bytes live only in a buffer
leased from here, so bytes buffered <= budget whatever the file sizes or the
number of uploads.  When the pool is empty, ``acquire`` waits; an upload that
waits stops reading its socket, and TCP flow control slows the client.  Waiters
are served first come, first served, so a large request is not starved by small ones.

Full-size buffers are kept for reuse (up to ``keep_idle`` of them) instead of
being freed and allocated again: an 8 MiB allocation per part would make the
allocator's heap, and with it RSS, drift upwards under churn.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class PoolTimeout(Exception):
    """No buffer became free within the timeout."""


class BufferPool:
    def __init__(
        self,
        budget_bytes: int,
        part_size_bytes: int,
        keep_idle: int = 4,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        if part_size_bytes <= 0:
            raise ValueError("part_size_bytes must be > 0")
        if budget_bytes < part_size_bytes:
            raise ValueError("budget_bytes must hold at least one part")
        self.budget_bytes = budget_bytes
        self.part_size_bytes = part_size_bytes
        self._keep_idle = keep_idle
        # Called when the last leased buffer comes back (e.g. to trim the heap).
        self._on_idle = on_idle
        self._in_use = 0
        self._idle: list[bytearray] = []
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self.peak_in_use_bytes = 0

    @property
    def in_use_bytes(self) -> int:
        return self._in_use

    @property
    def idle_bytes(self) -> int:
        return len(self._idle) * self.part_size_bytes

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _fits(self, size: int) -> bool:
        return self._in_use + size <= self.budget_bytes

    def try_acquire(self, size: int | None = None) -> bytearray | None:
        """A buffer now, or None; never jumps the queue of waiters."""
        size = self.part_size_bytes if size is None else size
        if self._waiters or not self._fits(size):
            return None
        return self._take(size)

    async def acquire(self, size: int | None = None, timeout_s: float | None = None) -> bytearray:
        """A buffer of ``size`` bytes (default: one part).  Waits while the budget is spent."""
        size = self.part_size_bytes if size is None else size
        if size > self.part_size_bytes:
            raise ValueError(f"buffer of {size} bytes is larger than a part")
        buf = self.try_acquire(size)
        if buf is not None:
            return buf
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, fut)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout_s):
                await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                # Granted just as we timed out or were cancelled: hand the grant on.
                self._in_use -= size
                self._wake()
            else:
                try:
                    self._waiters.remove(entry)
                except ValueError:
                    pass
                self._wake()
            if isinstance(exc, TimeoutError):
                raise PoolTimeout(f"no {size}-byte buffer free within {timeout_s}s") from None
            raise
        return self._materialise(size)

    def _take(self, size: int) -> bytearray:
        self._in_use += size
        return self._materialise(size)

    def _materialise(self, size: int) -> bytearray:
        self.peak_in_use_bytes = max(self.peak_in_use_bytes, self._in_use)
        if size == self.part_size_bytes and self._idle:
            return self._idle.pop()
        # Idle buffers count against the budget too: drop them before going over it.
        while self._idle and self._in_use + self.idle_bytes > self.budget_bytes:
            self._idle.pop()
        return bytearray(size)

    def release(self, buf: bytearray) -> None:
        size = len(buf)
        self._in_use -= size
        assert self._in_use >= 0, "buffer released twice"
        if size == self.part_size_bytes and len(self._idle) < self._keep_idle:
            self._idle.append(buf)
        self._wake()
        if not self._in_use and self._on_idle is not None:
            self._on_idle()

    def _wake(self) -> None:
        # Grant in order; reserve the bytes now so a later try_acquire cannot take them.
        while self._waiters:
            size, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if not self._fits(size):
                return
            self._waiters.popleft()
            self._in_use += size
            fut.set_result(None)
