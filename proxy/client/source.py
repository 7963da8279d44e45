"""A file on disk as a stream of fixed-size chunks, hashed as they are read.

Memory per upload is one read buffer (``READ_CHUNK_BYTES``) plus what aiohttp queues on
the socket, which it drains before taking the next chunk: the file size never matters.
Reading and hashing run together in a worker thread (``hashlib`` releases the GIL on
buffers this size), so a slow disk or a hash never stalls the event loop that drives
the other uploads and the progress display.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import IO, Any

READ_CHUNK_BYTES = 1024 * 1024

Hash = Any  # a hashlib object; hashlib exports no public type for it


class FileChanged(Exception):
    """The file is not what it was when the upload started (size or mtime moved)."""


@dataclass(frozen=True)
class FileIdentity:
    path: str  # absolute
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str) -> FileIdentity:
        st = os.stat(path)
        return cls(os.path.abspath(path), st.st_size, st.st_mtime_ns)


class RateLimit:
    """A token bucket shared by all uploads of a run (``--limit-rate``)."""

    def __init__(self, bytes_per_s: float) -> None:
        if bytes_per_s <= 0:
            raise ValueError("the rate must be > 0")
        self.bytes_per_s = bytes_per_s
        self._allowance = 0.0
        self._at = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, nbytes: int) -> None:
        async with self._lock:  # one waiter at a time keeps the sum of rates at the limit
            now = time.monotonic()
            # At most one second of burst: an idle spell must not let a link be flooded.
            self._allowance = min(
                self.bytes_per_s, self._allowance + (now - self._at) * self.bytes_per_s
            )
            self._at = now
            self._allowance -= nbytes
            if self._allowance < 0:
                await asyncio.sleep(-self._allowance / self.bytes_per_s)


class FileSource:
    """Reads byte ranges of one file; every read goes through the worker thread."""

    def __init__(self, identity: FileIdentity, rate: RateLimit | None = None) -> None:
        self.identity = identity
        self._rate = rate
        self._file: IO[bytes] = open(identity.path, "rb")  # closed in close()

    def close(self) -> None:
        self._file.close()

    def check_unchanged(self) -> None:
        now = FileIdentity.of(self.identity.path)
        if (now.size, now.mtime_ns) != (self.identity.size, self.identity.mtime_ns):
            raise FileChanged(f"{self.identity.path} changed while it was being uploaded")

    def _read(self, offset: int, nbytes: int, hashes: tuple[Hash, ...]) -> bytes:
        self._file.seek(offset)
        data = self._file.read(nbytes)
        if len(data) != nbytes:
            raise FileChanged(f"{self.identity.path} is shorter than when the upload started")
        for h in hashes:
            h.update(data)
        return data

    async def chunks(
        self,
        start: int,
        end: int,
        hashes: tuple[Hash, ...] = (),
        on_chunk: Callable[[int], None] | None = None,
    ) -> AsyncIterator[bytes]:
        """Bytes ``[start, end)`` in ``READ_CHUNK_BYTES`` pieces, each fed to ``hashes``
        before it is yielded.  ``on_chunk(n)`` runs as a piece is handed to the network."""
        loop = asyncio.get_running_loop()
        pos = start
        while pos < end:
            n = min(READ_CHUNK_BYTES, end - pos)
            if self._rate is not None:
                await self._rate.take(n)
            data = await loop.run_in_executor(None, self._read, pos, n, hashes)
            pos += n
            if on_chunk is not None:
                on_chunk(n)
            yield data

    async def hash_range(
        self, h: Hash, start: int, end: int, on_chunk: Callable[[int], None] | None = None
    ) -> None:
        """Feed ``[start, end)`` to ``h`` without sending it (resuming: the server has it;
        an instant upload: the digest goes first).  Not rate-limited: nothing is sent."""
        loop = asyncio.get_running_loop()
        pos = start
        while pos < end:
            n = min(READ_CHUNK_BYTES, end - pos)
            await loop.run_in_executor(None, self._read, pos, n, (h,))
            pos += n
            if on_chunk is not None:
                on_chunk(n)


def new_sha256() -> Hash:
    return hashlib.sha256()
