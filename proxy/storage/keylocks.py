"""One asyncio lock per key, kept only while someone holds or waits on it.

The S3 backend queues its create-only writes of one key with it (see
:meth:`proxy.storage.s3.S3Storage._create_only`).  An entry is made on first use and dropped
when its last user leaves, so memory is bounded by the keys being written at the moment,
not by every key ever written.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0  # holding or waiting


class KeyLocks:
    """``async with locks.hold(key)``: one holder per key at a time; the others wait in
    arrival order (asyncio.Lock is fair)."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:  # released, or cancelled while waiting
            entry.users -= 1
            if not entry.users:
                del self._entries[key]

    def users(self, key: str) -> int:
        """How many hold or wait for ``key``'s lock (for tests and status)."""
        entry = self._entries.get(key)
        return 0 if entry is None else entry.users

    def __len__(self) -> int:
        """Keys with an entry: those held or waited on right now."""
        return len(self._entries)
