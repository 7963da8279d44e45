"""One PATCH body -> parts of the upload's S3 multipart upload; the tail kept in S3.

Like :class:`proxy.engine.upload.PartStreamer`, body chunks are copied into parts
(:class:`~proxy.engine.buffers.PartBuffer`) whose memory is leased from the shared
:class:`~proxy.engine.buffers.BufferPool` (the daemon's memory bound) as bytes arrive, a full
part is sent while the next fills (at most ``parts_in_flight`` per upload), and each
part is hashed exactly once, in order, in a worker thread when ``hash_in_thread``: the
whole-upload SHA-256, the per-part checksum S3 verifies, and the PATCH's own
``Upload-Checksum``.  What differs for tus:

* bytes received by earlier PATCHes after their last full part ("pending segments",
  small S3 objects) go in front of this PATCH's bytes.  Their room is kept at the start
  of the first part and they are fetched only when that part is sent, so a PATCH that
  does not fill a part costs a write of its own bytes, not a re-read;
* the tail of a non-final PATCH is stored as a new pending segment instead of a part;
* a failure does not abort the multipart upload: the parts that made it, in order, plus
  (when the body merely broke off) the tail, are what the caller commits, so a resumed
  upload continues from there.  The SHA-256 state after each part is snapshotted so the
  committed state covers exactly the committed parts;
* the multipart upload is created lazily, when the first full part is dispatched, not
  when the upload is created: a tus creation costs S3 no multipart upload (a flood of
  creations leaves none open), and an upload that ends below one part size is stored
  with a single PutObject carrying its sha256 (:meth:`PatchWriter._put_whole`), with no
  multipart upload at all.  The new multipart id is in every :class:`PatchResult` and
  in :attr:`PatchWriter.multipart_id` for the lease keeper's checkpoints; a crash
  before it is saved leaves an orphan that the stale-multipart sweeper removes
  (``TusStore.owns_multipart`` does not claim it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.engine.buffers import Buffers, PartBuffer
from proxy.engine.upload import (
    NullObserver,
    StreamObserver,
    StreamSettings,
    lease,
    part_checksum,
)
from proxy.errors import (
    LeaseLost,
    ObjectExists,
    PartSizeChanged,
    ProxyError,
    StorageError,
    TooLarge,
)
from proxy.storage.base import PartChecksum, Pieces, Storage
from proxy.tus.hash import Sha256
from proxy.tus.state import Part, Segment

log = logging.getLogger(__name__)

# Past this many pending segments a non-final PATCH merges them into one (one read and
# write of < one part), so clients sending tiny chunks cannot make the next part need
# thousands of GETs.  16 keeps the merge cost at 1/16 of re-writing on every PATCH.
MAX_PENDING_SEGMENTS = 16
SETTLE_TIMEOUT_S = 60.0
READ_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class PatchTarget:
    """Where this PATCH's bytes go and what came before them."""

    key: str
    multipart_id: str  # "" until the upload's first full part: created then, lazily
    parts_before: int  # parts already committed; ours are numbered from parts_before + 1
    pending: tuple[Segment, ...]  # committed bytes after the last part
    offset: int  # upload offset of this PATCH's first byte
    limit_bytes: int  # most bytes this PATCH may carry
    segment_key: Callable[[int], str]  # upload offset -> a fresh pending-segment key
    content_type: str = "application/octet-stream"  # of the object
    metadata: dict[str, str] = field(default_factory=dict)  # the object's, without sha256


@dataclass(frozen=True)
class PatchResult:
    new_parts: tuple[Part, ...]  # durable, in order, after the committed ones
    sha256: Sha256  # state after all committed and new parts
    pending: tuple[Segment, ...]  # the pending segments after this PATCH
    obsolete: tuple[str, ...]  # segment keys no longer referenced once this is committed
    # The multipart upload the parts are in: "" when there is none (nothing reached a
    # full part, or the upload was stored whole by one PutObject).
    multipart_id: str = ""

    @property
    def new_bytes(self) -> int:
        return sum(p.size for p in self.new_parts) + sum(s.size for s in self.pending)


class PatchWriter:
    """Carries one PATCH body into storage.  ``run``, then ``drain``, then ``commit``
    (or ``salvage`` after a failure); ``close`` always."""

    def __init__(
        self,
        storage: Storage,
        pool: Buffers,
        settings: StreamSettings,
        target: PatchTarget,
        sha256: Sha256,
        checksum: Any | None = None,
        observer: StreamObserver | None = None,
        fenced: Callable[[], bool] = lambda: False,
    ) -> None:
        self._storage = storage
        self._mpu = target.multipart_id
        self._fenced = fenced  # True: start no new part (see Lease.fenced)
        self._pool = pool
        self._settings = settings
        self._t = target
        self._sha = sha256
        self._sha_start = sha256.copy()  # the state to commit if no new part makes it
        self._checksum = checksum  # a hashlib object for Upload-Checksum, or None
        self._obs: StreamObserver = observer or NullObserver()
        self._pending_bytes = sum(s.size for s in target.pending)
        self._buf: PartBuffer | None = None
        self._unloaded = 0  # bytes at the front of _buf still to be fetched from segments
        self._skip = 0  # bytes at the front of _buf that are not this PATCH's (checksum)
        self._next_number = target.parts_before + 1
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._done: dict[int, tuple[Part, Sha256]] = {}
        self._part_failed = False
        self._part_error: BaseException | None = None
        self._last_hash: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self.received_bytes = 0

    @property
    def multipart_id(self) -> str:
        """The upload's multipart upload: the target's, or the one this PATCH created."""
        return self._mpu

    # -- receiving ---------------------------------------------------------------------

    def _new_part(self, declared_bytes: int | None, start: int = 0) -> PartBuffer:
        """The next part (no memory yet), sized to what is left of a declared body."""
        size = self._settings.part_size_bytes
        if declared_bytes is not None:
            parted = (self._next_number - self._t.parts_before - 1) * size
            size = min(size, max(1, self._pending_bytes + declared_bytes - parted))
        return PartBuffer(self._pool, size, start)

    async def run(self, chunks: AsyncIterator[bytes], declared_bytes: int | None) -> None:
        part = self._settings.part_size_bytes
        if self._pending_bytes >= part:
            raise PartSizeChanged(
                f"pending bytes ({self._pending_bytes}) exceed part_size; part_size was lowered "
                "while this upload ran: raise it back to finish the upload"
            )
        # Memory is leased when bytes are in hand (the first byte also leases the room
        # kept for the pending bytes), never ahead of them.
        self._buf = self._new_part(declared_bytes, start=self._pending_bytes)
        self._unloaded = self._skip = self._pending_bytes
        admitted = False
        async for chunk in chunks:
            n = len(chunk)
            if not n:
                continue
            self.received_bytes += n
            self._obs.received(n)
            if self.received_bytes > self._t.limit_bytes:
                raise TooLarge(f"the PATCH carries more than the {self._t.limit_bytes} bytes left")
            view = memoryview(chunk)
            off = 0
            while off < n:
                if self._buf.full:
                    # More bytes are coming, so this full part is not the last one.
                    await self._dispatch()
                    self._buf = self._new_part(declared_bytes)
                if not self._buf.room:
                    await lease(self._buf, self._settings, admission=not admitted)
                    admitted = True
                off += self._buf.write(view[off:])

    @property
    def _filled(self) -> int:
        return 0 if self._buf is None else self._buf.filled

    async def _load_pending(self) -> None:
        """Fetch the pending segments into the room kept for them at the part's start."""
        assert self._buf is not None
        await self._buf.cover()
        pos = 0
        for seg in self._t.pending:
            end = pos + seg.size
            async for chunk in self._storage.iter_object(seg.key, chunk_bytes=READ_CHUNK_BYTES):
                if pos + len(chunk) > end:
                    raise StorageError(f"pending segment {seg.key} is larger than recorded")
                self._buf.write_at(pos, chunk)
                pos += len(chunk)
            if pos != end:
                raise StorageError(f"pending segment {seg.key} is shorter than recorded")
        self._unloaded = 0

    # -- parts ---------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        """Turn the current buffer into the next part, once a sending slot is free."""
        assert self._buf is not None
        if self._fenced():
            # Someone took the upload over, or may soon: a part sent now could land over
            # theirs.  The parts stored so far are committed by the caller.
            raise LeaseLost("the upload's lease was lost or is running out; resume it")
        if not self._mpu:
            self._mpu = await self._storage.create_multipart(
                self._t.key, metadata=self._t.metadata, content_type=self._t.content_type
            )
        if self._unloaded:
            await self._load_pending()
        while len(self._tasks) >= self._settings.parts_in_flight:
            await asyncio.wait(self._tasks.values(), return_when=asyncio.FIRST_COMPLETED)
        if self._part_failed:
            self._raise_part_failure()
        buf, skip = self._buf, self._skip
        self._buf, self._skip = None, 0
        number = self._next_number
        self._next_number += 1
        # Chain the hashes here, in dispatch order: each waits for the previous one.
        prev, self._last_hash = self._last_hash, self._loop.create_future()
        task = asyncio.create_task(self._send(number, buf, skip, prev, self._last_hash))
        self._tasks[number] = task
        task.add_done_callback(self._part_done)

    def _part_done(self, task: asyncio.Task[None]) -> None:
        for number, t in list(self._tasks.items()):
            if t is task:
                del self._tasks[number]
        if not task.cancelled() and task.exception() is not None and self._part_error is None:
            self._part_error = task.exception()

    def _raise_part_failure(self) -> None:
        if isinstance(self._part_error, ProxyError):
            raise self._part_error
        raise StorageError("a part could not be stored") from self._part_error

    async def _send(
        self,
        number: int,
        buf: PartBuffer,
        skip: int,
        prev: asyncio.Future[None] | None,
        mine: asyncio.Future[None],
    ) -> None:
        views = buf.views()
        try:
            try:
                if prev is not None:
                    await asyncio.shield(prev)
                checksum, snapshot = await self._hash(views, buf.views(skip))
            finally:
                if not mine.done():
                    mine.set_result(None)
            # A hard bound: a part still in flight long after its lease ended could land
            # over a new holder's part (the completion's ListParts check catches that).
            async with asyncio.timeout(self._settings.part_timeout_s):
                etag = await self._storage.upload_part(
                    self._t.key, self._mpu, number, Pieces.of(views), checksum
                )
            self._done[number] = (Part(etag, buf.filled), snapshot)
            self._obs.stored(buf.filled)
        except BaseException:
            self._part_failed = True
            raise
        finally:
            buf.release()

    async def _hash(
        self, views: list[memoryview], own: list[memoryview]
    ) -> tuple[PartChecksum | None, Sha256]:
        """Hash a part (``views``); ``own`` is its bytes that came with this PATCH."""

        def work() -> tuple[PartChecksum | None, Sha256, float]:
            t0 = time.perf_counter()
            for view in views:
                self._sha.update(view)
            if self._checksum is not None:
                for view in own:
                    self._checksum.update(view)
            cs = part_checksum(self._settings.part_checksum, views)
            return cs, self._sha.copy(), time.perf_counter() - t0

        nbytes = sum(len(v) for v in views)
        if self._settings.hash_in_thread and nbytes >= 65536:
            cs, snap, seconds = await self._loop.run_in_executor(None, work)
        else:
            cs, snap, seconds = work()
        self._obs.hashed(nbytes, seconds)
        return cs, snap

    async def _settle(self) -> None:
        """Wait for the parts in flight; they are not cancelled, so what they stored counts."""
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=SETTLE_TIMEOUT_S)
        for t in list(self._tasks.values()):
            if not t.done():
                t.cancel()  # still running after the timeout: give up on it
                self._part_failed = True

    def durable(self) -> tuple[tuple[Part, ...], Sha256 | None]:
        parts: list[Part] = []
        snap: Sha256 | None = None
        n = self._t.parts_before + 1
        while n in self._done:
            part, snap = self._done[n]
            parts.append(part)
            n += 1
        return tuple(parts), snap

    # -- ending ----------------------------------------------------------------------

    async def drain(self) -> None:
        """The body is in: settle the parts and finish the ``Upload-Checksum`` digest."""
        await self._settle()
        if self._part_failed or len(self._done) != self._next_number - self._t.parts_before - 1:
            self._raise_part_failure()
        if self._checksum is not None and self._buf is not None and self._filled > self._skip:
            tail = self._buf.views(self._skip)
            checksum = self._checksum

            def work() -> None:
                for view in tail:
                    checksum.update(view)

            if self._settings.hash_in_thread and self._filled - self._skip >= 65536:
                await self._loop.run_in_executor(None, work)
            else:
                work()

    def checksum_digest(self) -> bytes | None:
        return None if self._checksum is None else bytes(self._checksum.digest())

    async def commit(self, *, final: bool) -> PatchResult:
        """After ``drain`` (and a checksum check): store the tail as the last part (``final``)
        or as a pending segment, and say what the info object must now hold."""
        part = self._settings.part_size_bytes
        if self._buf is not None and (final or self._filled == part) and self._filled:
            await self._store_last(final)
            if self._part_failed:
                self._raise_part_failure()
        return await self._result(keep_tail=True)

    async def _store_last(self, final: bool) -> None:
        """Store the buffer, the last bytes received: the upload's whole object when it is
        final and never needed a multipart upload, else its next part."""
        if final and not self._mpu:
            await self._put_whole()
        else:
            await self._dispatch()
            await self._settle()

    async def _put_whole(self) -> None:
        """The whole upload, below one part size, in one PutObject with its sha256.

        No part was ever dispatched (that would have created the multipart upload), so
        the buffer holds every byte: the pending segments, then this PATCH's.  Like every
        tus write it is create-only; an object already there is ours only if it is what
        an earlier, interrupted attempt of this upload stored (size, sha256 and tus id)."""
        assert self._buf is not None
        if self._fenced():
            raise LeaseLost("the upload's lease was lost or is running out; resume it")
        if self._unloaded:
            await self._load_pending()
        buf, skip = self._buf, self._skip
        self._buf, self._skip = None, 0
        filled = buf.filled
        number = self._next_number
        self._next_number += 1
        # A failure here is raised to commit / salvage directly: no part state to mark.
        views = buf.views()
        try:
            checksum, snapshot = await self._hash(views, buf.views(skip))
            digest = snapshot.digest()
            # A fresh hash (no part before), so never the unsaveable kind; checked anyway.
            if digest is None:
                raise StorageError("the upload's SHA-256 is unknown")
            metadata = {**self._t.metadata, "sha256": digest.hex()}
            try:
                async with asyncio.timeout(self._settings.part_timeout_s):
                    etag = await self._storage.put_object(
                        self._t.key,
                        Pieces.of(views),
                        metadata=metadata,
                        content_type=self._t.content_type,
                        checksum=checksum,
                        if_none_match=True,
                    )
            except ObjectExists:
                etag = await self._stored_before(filled, metadata)
        finally:
            buf.release()
        self._done[number] = (Part(etag, filled), snapshot)
        self._obs.stored(filled)

    async def _stored_before(self, size: int, metadata: dict[str, str]) -> str:
        obj = await self._storage.head(self._t.key)
        mine = ("sha256", "tus-id")
        if (
            obj is None
            or obj.size != size
            or any(obj.metadata.get(k) != metadata.get(k) for k in mine)
        ):
            raise ObjectExists(f"an object with key {self._t.key!r} already exists")
        return obj.etag

    async def salvage(self, *, keep_tail: bool, final: bool = False) -> PatchResult:
        """After a failure: the parts that made it to storage, in order, and (if asked)
        the tail, when every part before it made it.  ``final``: the bytes received
        reach the upload's length, so a kept tail is its last part, as in ``commit``."""
        await self._settle()
        keep_tail = keep_tail and not self._part_failed
        full = self._filled == self._settings.part_size_bytes
        if keep_tail and self._buf is not None and self._filled and (full or final):
            # The body broke right when the buffer filled (clients sending aligned chunks
            # stop there often).  As a pending segment it would be part-sized, which every
            # later PATCH refuses; it is a whole part, so store it as one.  Or it broke
            # after its last byte (a chunked body without its last-chunk marker, a stall,
            # a drain): as a pending segment the tail would bring the offset to the length
            # with nothing left to send that completes the upload; as the last part (or
            # the whole object), the caller completes it.  Not under a fenced lease: the
            # client resends it.
            if self._fenced():
                keep_tail = False
            else:
                await self._store_last(final)
                keep_tail = not self._part_failed
        return await self._result(keep_tail=keep_tail)

    async def _result(self, *, keep_tail: bool) -> PatchResult:
        parts, snap = self.durable()
        consumed = bool(parts)  # the first new part carries the old pending bytes
        pending = () if consumed else self._t.pending
        obsolete: tuple[str, ...] = tuple(s.key for s in self._t.pending) if consumed else ()
        buf = self._buf
        if keep_tail and buf is not None and self._filled > self._skip:
            start = self._skip
            if not consumed and len(pending) + 1 > MAX_PENDING_SEGMENTS:
                await self._load_pending()
                obsolete, pending, start = tuple(s.key for s in pending), (), 0
            # Upload offset of buf[start]: what precedes the buffer, then ``start``.
            offset = self._t.offset - self._pending_bytes + sum(p.size for p in parts) + start
            key = self._t.segment_key(offset)
            await self._storage.put_conditional(
                key, Pieces.of(buf.views(start)), if_none_match=True
            )
            pending = (*pending, Segment(key, self._filled - start))
        return PatchResult(parts, snap or self._sha_start, pending, obsolete, self._mpu)

    def close(self) -> None:
        buf, self._buf = self._buf, None
        if buf is not None:
            buf.release()
