"""One PATCH body -> parts of the upload's S3 multipart upload; the tail kept in S3.

A thin layer over the engine's :class:`~proxy.engine.pipeline.PartPipeline` (the same
copy loop, ordered hashing and parts in flight as a plain upload).  What tus adds:

* bytes received by earlier PATCHes after their last full part ("pending segments",
  small S3 objects) go in front of this PATCH's bytes: the pipeline keeps their room at
  the start of the first part (``front_bytes``) and :meth:`PatchWriter._load_pending`
  fetches them only when that part is sent, so a PATCH that does not fill a part costs
  a write of its own bytes, not a re-read;
* the tail of a non-final PATCH is stored as a new pending segment instead of a part;
* a failure does not abort the multipart upload: the parts that made it, in order, plus
  (when the body merely broke off) the tail, are what the caller commits, so a resumed
  upload continues from there.  The resumable SHA-256 is snapshotted after each part
  (the pipeline keeps each part's digest state), so the committed state covers exactly
  the committed parts; ``Upload-Checksum`` is computed over this PATCH's bytes only;
* before each part starts the upload's lease is checked (``fence``): a part started
  after the lease ran out could land over a new holder's part;
* the multipart upload is created lazily, by the first part sent: a tus creation costs S3
  no multipart upload, and an upload that ends below one part size is stored with a
  single PutObject carrying its sha256 (:meth:`PatchWriter._put_whole`).  The new
  multipart id is in every :class:`PatchResult` and in :attr:`PatchWriter.multipart_id`
  for the lease keeper's checkpoints; a crash before it is saved leaves an orphan that
  the stale-multipart sweeper removes (``TusStore.owns_multipart`` does not claim it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.engine.buffers import Buffers, PartBuffer
from proxy.engine.hashing import off_loop
from proxy.engine.pipeline import Body, PartPipeline, PartTarget, StreamSettings
from proxy.errors import LeaseLost, ObjectExists, PartSizeChanged, StorageError
from proxy.obs.observer import StreamObserver
from proxy.storage.base import Pieces
from proxy.tus.hash import Sha256, check_declared
from proxy.tus.state import Part, Segment, TusStorage

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
    # Part numbers start after this (a concat partial's range in a shared multipart upload).
    part_base: int = 0
    declared_sha256: str | None = None  # hex (IETF Repr-Digest): other bytes are not stored


@dataclass(frozen=True)
class PatchResult:
    new_parts: tuple[Part, ...]  # durable, in order, after the committed ones
    sha256: Sha256  # state after all committed and new parts
    pending: tuple[Segment, ...]  # the pending segments after this PATCH
    obsolete: tuple[str, ...]  # segment keys no longer referenced once this is committed
    # The multipart upload the parts are in: "" when there is none (nothing reached a
    # full part, or the upload was stored whole by one PutObject).
    multipart_id: str = ""


class _PatchDigest:
    """The upload's resumable SHA-256 and this PATCH's Upload-Checksum (a BodyDigest whose
    per-part state is the SHA-256 after the part)."""

    def __init__(self, sha256: Sha256, checksum: Any | None) -> None:
        self.sha256 = sha256
        self.checksum = checksum  # a hashlib object for Upload-Checksum, or None

    def update(self, views: Sequence[memoryview], own: Sequence[memoryview]) -> Sha256:
        for view in views:
            self.sha256.update(view)
        if self.checksum is not None:
            for view in own:
                self.checksum.update(view)
        return self.sha256.copy()


class PatchWriter:
    """Carries one PATCH body into storage.  ``run``, then ``drain``, then ``commit``
    (or ``salvage`` after a failure); ``close`` always."""

    def __init__(
        self,
        storage: TusStorage,
        pool: Buffers,
        settings: StreamSettings,
        target: PatchTarget,
        sha256: Sha256,
        checksum: Any | None = None,
        observer: StreamObserver | None = None,
        fenced: Callable[[], bool] = lambda: False,
        declared_bytes: int | None = None,
    ) -> None:
        self._storage = storage
        self._fenced = fenced  # True: start no new part (see Lease.fenced)
        self._settings = settings
        self._t = target
        self._sha_start = sha256.copy()  # the state to commit if no new part makes it
        self._digest = _PatchDigest(sha256, checksum)
        self._pending_bytes = sum(s.size for s in target.pending)
        self._pipe: PartPipeline[Sha256] = PartPipeline(
            storage,
            pool,
            settings,
            PartTarget(
                target.key,
                target.content_type,
                target.metadata,
                multipart_id=target.multipart_id,
                first_number=target.part_base + target.parts_before + 1,
                front_bytes=self._pending_bytes,
            ),
            self._digest,
            limit_bytes=target.limit_bytes,
            too_large=f"the PATCH carries more than the {target.limit_bytes} bytes left",
            declared_bytes=declared_bytes,
            observer=observer,
            fence=self._fence,
            fill_front=self._load_pending,
        )

    @property
    def multipart_id(self) -> str:
        """The upload's multipart upload: the target's, or the one this PATCH created."""
        return self._pipe.multipart_id

    @property
    def received_bytes(self) -> int:
        return self._pipe.received_bytes

    def _fence(self) -> None:
        if self._fenced():
            # Someone took the upload over, or may soon: a part sent now could land over
            # theirs.  The parts stored so far are committed by the caller.
            raise LeaseLost("the upload's lease was lost or is running out; resume it")

    async def run(self, chunks: Body) -> None:
        if self._pending_bytes >= self._settings.part_size_bytes:
            raise PartSizeChanged(
                f"pending bytes ({self._pending_bytes}) exceed part_size; part_size was lowered "
                "while this upload ran: raise it back to finish the upload"
            )
        # Memory is leased when bytes are in hand (the first byte also leases the room
        # kept for the pending bytes), never ahead of them.
        await self._pipe.receive(chunks)

    @property
    def _filled(self) -> int:
        tail = self._pipe.tail
        return 0 if tail is None else tail.filled

    async def _load_pending(self, buf: PartBuffer) -> None:
        """Fetch the pending segments into the room kept for them at the part's start."""
        pos = 0
        for seg in self._t.pending:
            end = pos + seg.size
            async for chunk in self._storage.iter_object(seg.key, chunk_bytes=READ_CHUNK_BYTES):
                if pos + len(chunk) > end:
                    raise StorageError(f"pending segment {seg.key} is larger than recorded")
                buf.write_at(pos, chunk)
                pos += len(chunk)
            if pos != end:
                raise StorageError(f"pending segment {seg.key} is shorter than recorded")

    def durable(self) -> tuple[tuple[Part, ...], Sha256 | None]:
        sent = self._pipe.sent()
        parts = tuple(Part(p.etag, p.size) for p in sent)
        return parts, (sent[-1].state if sent else None)

    # -- ending ----------------------------------------------------------------------

    async def drain(self) -> None:
        """The body is in: settle the parts and finish the ``Upload-Checksum`` digest."""
        pipe = self._pipe
        await pipe.settle(SETTLE_TIMEOUT_S)
        if pipe.failed or len(pipe.sent()) != pipe.dispatched:
            pipe.check()
            raise StorageError("a part could not be stored")
        checksum = self._digest.checksum
        tail = pipe.tail
        if checksum is not None and tail is not None and tail.filled > pipe.front:
            own = tail.views(pipe.front)

            def work() -> None:
                for view in own:
                    checksum.update(view)

            await off_loop(work, tail.filled - pipe.front, self._settings.hash_in_thread)

    def checksum_digest(self) -> bytes | None:
        checksum = self._digest.checksum
        return None if checksum is None else bytes(checksum.digest())

    async def commit(self, *, final: bool) -> PatchResult:
        """After ``drain`` (and a checksum check): store the tail as the last part (``final``)
        or as a pending segment, and say what the info object must now hold."""
        part = self._settings.part_size_bytes
        if self._pipe.tail is not None and (final or self._filled == part) and self._filled:
            await self._store_last(final)
            self._pipe.check()
        return await self._result(keep_tail=True)

    async def _store_last(self, final: bool) -> None:
        """Store the tail, the last bytes received: the upload's whole object when it is
        final and never needed a multipart upload, else its next part."""
        if final and not self._pipe.multipart_id:
            await self._put_whole()
        else:
            await self._pipe.dispatch()
            await self._pipe.settle(SETTLE_TIMEOUT_S)

    async def _put_whole(self) -> None:
        """The whole upload, below one part size, in one PutObject with its sha256.

        No part was ever dispatched (that would have created the multipart upload), so
        the tail holds every byte: the pending segments, then this PATCH's.  Like every
        tus write it is create-only; an object already there is ours only if it is what
        an earlier, interrupted attempt of this upload stored (size, sha256 and tus id)."""

        def metadata(state: Sha256) -> dict[str, str]:
            digest = state.digest()
            # A fresh hash (no part before), so never the unsaveable kind; checked anyway.
            if digest is None:
                raise StorageError("the upload's SHA-256 is unknown")
            check_declared(self._t.declared_sha256, digest.hex())
            return {**self._t.metadata, "sha256": digest.hex()}

        # A failure here is raised to commit / salvage directly: no part state to mark.
        await self._pipe.put_whole(metadata, if_none_match=True, on_exists=self._stored_before)

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
        pipe = self._pipe
        await pipe.settle(SETTLE_TIMEOUT_S)
        keep_tail = keep_tail and not pipe.failed
        full = self._filled == self._settings.part_size_bytes
        if keep_tail and pipe.tail is not None and self._filled and (full or final):
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
                keep_tail = not pipe.failed
        return await self._result(keep_tail=keep_tail)

    async def _result(self, *, keep_tail: bool) -> PatchResult:
        parts, snap = self.durable()
        consumed = bool(parts)  # the first new part carries the old pending bytes
        pending = () if consumed else self._t.pending
        obsolete: tuple[str, ...] = tuple(s.key for s in self._t.pending) if consumed else ()
        pipe = self._pipe
        buf = pipe.tail
        if keep_tail and buf is not None and self._filled > pipe.front:
            start = pipe.front
            if not consumed and len(pending) + 1 > MAX_PENDING_SEGMENTS:
                await pipe.fill_front()
                obsolete, pending, start = tuple(s.key for s in pending), (), 0
            # Upload offset of buf[start]: what precedes the buffer, then ``start``.
            offset = self._t.offset - self._pending_bytes + sum(p.size for p in parts) + start
            key = self._t.segment_key(offset)
            await self._storage.put_conditional(
                key, Pieces.of(buf.views(start)), if_none_match=True
            )
            pending = (*pending, Segment(key, self._filled - start))
        return PatchResult(parts, snap or self._sha_start, pending, obsolete, self.multipart_id)

    def close(self) -> None:
        self._pipe.close()
