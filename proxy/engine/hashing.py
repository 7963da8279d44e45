"""Hashing, defined once for every protocol: per-part checksums, and when a hash runs in
a worker thread.

Each part is hashed exactly once, 8 MiB at a time (not per socket read), which keeps the
Python overhead per byte negligible.  hashlib (and the resumable SHA-256 of
:mod:`proxy.tus.hash`) releases the GIL, so above :data:`HASH_IN_THREAD_MIN_BYTES` the
work runs in a worker thread and overlaps with receiving the next part; below it the
hand-off would cost more than the hash.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import zlib
from collections.abc import Callable, Sequence
from typing import TypeVar

from proxy.storage.base import PartChecksum

T = TypeVar("T")

HASH_IN_THREAD_MIN_BYTES = 64 * 1024


def part_checksum(algorithm: str, views: Sequence[memoryview]) -> PartChecksum | None:
    """The checksum S3 verifies for one part's bytes (its pieces, in order)."""
    if algorithm == "none":
        return None
    if algorithm == "crc32":
        crc = 0
        for view in views:
            crc = zlib.crc32(view, crc)
        raw = crc.to_bytes(4, "big")
    else:
        h = hashlib.md5() if algorithm == "md5" else hashlib.sha256()
        for view in views:
            h.update(view)
        raw = h.digest()
    return PartChecksum(algorithm, base64.b64encode(raw).decode())


async def off_loop(work: Callable[[], T], nbytes: int, in_thread: bool) -> T:
    """``work()``, which hashes ``nbytes``: in a worker thread when ``in_thread`` and the
    bytes are worth the hand-off, else right here."""
    if in_thread and nbytes >= HASH_IN_THREAD_MIN_BYTES:
        return await asyncio.get_running_loop().run_in_executor(None, work)
    return work()
