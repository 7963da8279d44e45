"""Body chunks -> S3 parts: hashing, size limits, bounded buffers.  No HTTP, no boto.

One :class:`PartStreamer` carries one object from an async iterator of byte
chunks to a :class:`~proxy.storage.base.Storage`:

* chunks are copied into parts (:class:`~proxy.engine.buffers.PartBuffer`) whose memory is
  leased from the shared :class:`BufferPool` only as bytes arrive; a full part is
  sent while the next one fills, with at most ``parts_in_flight`` parts uploading
  per object; the wait for a free slot or buffer is what pushes back on the client;
* each full part is hashed exactly once, in order: whole-body SHA-256, plus the
  optional whole-body MD5 a client asked us to verify and the optional per-part
  checksum S3 verifies.  Hashing 8 MiB at a time (not per socket read) keeps the
  Python overhead per byte negligible; with ``hash_in_thread`` it runs in a worker
  thread (hashlib releases the GIL) so it overlaps with receiving the next part;
* a body that fits in one buffer is sent with a single PutObject;
* the outcome is atomic: on any failure or cancellation the multipart upload is
  aborted (shielded, with its own timeout) and no object appears.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.engine.buffers import Buffers, PartBuffer, PoolTimeout
from proxy.errors import (
    Busy,
    ChecksumMismatch,
    ConditionFailed,
    ObjectExists,
    ProxyError,
    StorageError,
    TooLarge,
)
from proxy.storage.base import CompletedPart, ObjectInfo, PartChecksum, Pieces, Storage

log = logging.getLogger(__name__)

ABORT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class StreamSettings:
    part_size_bytes: int
    parts_in_flight: int
    admission_timeout_s: float
    part_checksum: str = "none"
    hash_in_thread: bool = True
    # Longest one part upload may take, retries included (tus writer); None: unbounded.
    part_timeout_s: float | None = None


@dataclass(frozen=True)
class ExpectedDigests:
    """Whole-body digests the client declared; checked before the object is completed."""

    md5: bytes | None = None
    sha256: bytes | None = None


@dataclass(frozen=True)
class UploadSpec:
    key: str
    max_size_bytes: int
    declared_size: int | None = None
    content_type: str = "application/octet-stream"
    metadata: dict[str, str] = field(default_factory=dict)
    create_only: bool = True
    expected: ExpectedDigests = field(default_factory=ExpectedDigests)


@dataclass(frozen=True)
class StreamResult:
    key: str
    size: int
    sha256: str
    etag: str
    parts: int


class StreamObserver(Protocol):
    """Hooks for metrics and progress; every method must be cheap and must not raise."""

    def received(self, nbytes: int) -> None: ...
    def hashed(self, nbytes: int, seconds: float) -> None: ...
    def stored(self, nbytes: int) -> None: ...


class NullObserver:
    def received(self, nbytes: int) -> None:
        pass

    def hashed(self, nbytes: int, seconds: float) -> None:
        pass

    def stored(self, nbytes: int) -> None:
        pass


def _part_checksum(algorithm: str, views: list[memoryview]) -> PartChecksum | None:
    """The checksum of one part's bytes (its pieces, in order)."""
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


async def lease(part: PartBuffer, settings: StreamSettings, *, admission: bool) -> None:
    """Memory for the part's next bytes.  An upload's first lease is its admission:
    503 ERR_BUSY if none frees up within the admission timeout.  Later leases are
    waited for: that wait is the back-pressure."""
    if not admission:
        await part.lease()
        return
    try:
        await part.lease(timeout_s=settings.admission_timeout_s)
    except PoolTimeout:
        raise Busy(
            "all upload buffers are in use; retry later",
            headers={"Retry-After": str(max(1, round(settings.admission_timeout_s)))},
        ) from None


class _Digests:
    """Whole-body hashes; ``update`` is called once per part, strictly in order."""

    def __init__(self, want_md5: bool) -> None:
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5() if want_md5 else None

    def update(self, views: list[memoryview]) -> None:
        for view in views:
            self.sha256.update(view)
            if self.md5 is not None:
                self.md5.update(view)


class PartStreamer:
    """Carries one object from chunks to storage.  Use once."""

    def __init__(
        self,
        storage: Storage,
        pool: Buffers,
        settings: StreamSettings,
        spec: UploadSpec,
        observer: StreamObserver | None = None,
    ) -> None:
        self._storage = storage
        self._pool = pool
        self._settings = settings
        self._spec = spec
        self._obs: StreamObserver = observer or NullObserver()
        self._digests = _Digests(spec.expected.md5 is not None)
        self._upload_id: str | None = None
        self._parts: list[CompletedPart] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_hash: asyncio.Future[Any] | None = None
        self._failure: BaseException | None = None
        self._loop = asyncio.get_running_loop()
        self._admitted = False
        self._parted_bytes = 0  # bytes in the parts handed to _dispatch so far
        self.received_bytes = 0

    @property
    def upload_id(self) -> str | None:
        return self._upload_id

    async def run(self, chunks: AsyncIterator[bytes]) -> StreamResult:
        try:
            return await self._run(chunks)
        except BaseException:
            await self._cleanup()
            raise

    def _new_part(self) -> PartBuffer:
        """The next part, sized to what is left of a declared body (no memory yet)."""
        size = self._settings.part_size_bytes
        declared = self._spec.declared_size
        if declared is not None and declared > self._parted_bytes:
            size = min(size, declared - self._parted_bytes)
        return PartBuffer(self._pool, size)

    async def _run(self, chunks: AsyncIterator[bytes]) -> StreamResult:
        # Memory is leased when bytes are in hand, never ahead of them: a client that
        # opens an upload and sends nothing holds nothing.
        part = self._new_part()
        try:
            async for chunk in chunks:
                n = len(chunk)
                if not n:
                    continue
                self.received_bytes += n
                self._obs.received(n)
                if self.received_bytes > self._spec.max_size_bytes:
                    raise TooLarge(f"body exceeds the limit of {self._spec.max_size_bytes} bytes")
                view = memoryview(chunk)
                off = 0
                while off < n:
                    if part.full:
                        # More bytes are coming, so this full part is not the last one.
                        self._parted_bytes += part.filled
                        full, part = part, self._new_part()
                        await self._dispatch(full)
                    if not part.room:
                        await lease(part, self._settings, admission=not self._admitted)
                        self._admitted = True
                    off += part.write(view[off:])
        except BaseException:
            part.release()
            raise
        if self._upload_id is None:
            return await self._single_put(part)
        await self._dispatch(part)
        return await self._complete()

    async def _digest(self, views: list[memoryview]) -> PartChecksum | None:
        """Hash one part after the previous part's hash finished; return its S3 checksum."""
        prev, done = self._last_hash, self._loop.create_future()
        self._last_hash = done
        nbytes = sum(len(v) for v in views)
        try:
            if prev is not None:
                await asyncio.shield(prev)
            if self._settings.hash_in_thread and nbytes >= 65536:
                checksum, seconds = await self._loop.run_in_executor(None, self._hash_part, views)
            else:
                checksum, seconds = self._hash_part(views)
            self._obs.hashed(nbytes, seconds)
            return checksum
        finally:
            if not done.done():
                done.set_result(None)

    def _hash_part(self, views: list[memoryview]) -> tuple[PartChecksum | None, float]:
        t0 = time.perf_counter()
        self._digests.update(views)
        checksum = _part_checksum(self._settings.part_checksum, views)
        return checksum, time.perf_counter() - t0

    async def _dispatch(self, part: PartBuffer) -> None:
        """Hand a full part to a part task once fewer than ``parts_in_flight`` are sending."""
        try:
            if self._upload_id is None:
                self._upload_id = await self._storage.create_multipart(
                    self._spec.key,
                    metadata=self._spec.metadata,
                    content_type=self._spec.content_type,
                )
            while len(self._tasks) >= self._settings.parts_in_flight:
                self._raise_failure()
                await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
            self._raise_failure()
            number = len(self._parts) + 1
            self._parts.append(CompletedPart(number, ""))
            task = asyncio.create_task(self._send_part(number, part))
        except BaseException:
            part.release()
            raise
        self._tasks.add(task)
        task.add_done_callback(self._part_done)

    def _part_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = task.exception()

    def _raise_failure(self) -> None:
        """Re-raise a part's failure in the reading task, where it ends the upload."""
        if self._failure is not None:
            raise self._failure

    async def _send_part(self, number: int, part: PartBuffer) -> None:
        assert self._upload_id is not None
        views = part.views()
        body = Pieces.of(views)
        try:
            if self._settings.part_checksum == "none":
                # Nothing S3 needs depends on the hash: send and hash concurrently.
                hashing = asyncio.ensure_future(self._digest(views))
                try:
                    etag = await self._storage.upload_part(
                        self._spec.key, self._upload_id, number, body, None
                    )
                finally:
                    await hashing
            else:
                checksum = await self._digest(views)
                etag = await self._storage.upload_part(
                    self._spec.key, self._upload_id, number, body, checksum
                )
            self._parts[number - 1] = CompletedPart(number, etag)
            self._obs.stored(part.filled)
        finally:
            part.release()

    def _verify(self) -> str:
        sha256 = self._digests.sha256.digest()
        exp = self._spec.expected
        if exp.sha256 is not None and exp.sha256 != sha256:
            raise ChecksumMismatch("body SHA-256 does not match the declared digest")
        md5 = self._digests.md5
        if exp.md5 is not None and md5 is not None and exp.md5 != md5.digest():
            raise ChecksumMismatch("body MD5 does not match Content-MD5")
        return sha256.hex()

    def _final_metadata(self, sha256: str) -> dict[str, str]:
        return {**self._spec.metadata, "sha256": sha256}

    async def _single_put(self, part: PartBuffer) -> StreamResult:
        views, filled = part.views(), part.filled
        try:
            checksum = await self._digest(views)
            sha256 = self._verify()
            etag = await self._storage.put_object(
                self._spec.key,
                Pieces.of(views),
                metadata=self._final_metadata(sha256),
                content_type=self._spec.content_type,
                checksum=checksum,
                if_none_match=self._spec.create_only,
            )
            self._obs.stored(filled)
        finally:
            part.release()
        await verify_stored(self._storage, self._spec.key, etag=etag, size=filled, sha256=sha256)
        return StreamResult(self._spec.key, filled, sha256, etag, 1)

    async def _complete(self) -> StreamResult:
        if self._tasks:
            await asyncio.wait(self._tasks)
        self._raise_failure()
        if self._last_hash is not None:
            await self._last_hash
        assert all(p.etag for p in self._parts), "completing with a part that was never stored"
        sha256 = self._verify()
        assert self._upload_id is not None
        etag = await self._storage.complete_multipart(
            self._spec.key,
            self._upload_id,
            self._parts,
            if_none_match=self._spec.create_only,
            size_bytes=self.received_bytes,
        )
        self._upload_id = None  # completed: nothing left to abort
        try:
            await label(
                self._storage,
                self._spec.key,
                etag=etag,
                size=self.received_bytes,
                metadata=self._final_metadata(sha256),
                content_type=self._spec.content_type,
            )
        except ObjectExists:
            # The copy's If-Match failed and the key holds another object: a concurrent
            # upload (overwrite = true) replaced ours after it completed.  Keep theirs.
            raise ObjectExists(
                "the object was replaced by a concurrent upload to the same key"
            ) from None
        except BaseException:
            # Without its sha256 the object would break our promise; take it back, but
            # only if it is still ours (a concurrent upload may have replaced it).
            log.error("could not set metadata on %r; deleting it", self._spec.key)
            await delete_if_ours(self._storage, self._spec.key, etag)
            raise
        return StreamResult(self._spec.key, self.received_bytes, sha256, etag, len(self._parts))

    async def _cleanup(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None:
            return
        abort = asyncio.ensure_future(self._storage.abort_multipart(self._spec.key, upload_id))
        try:
            await asyncio.shield(asyncio.wait_for(abort, ABORT_TIMEOUT_S))
        except asyncio.CancelledError:
            # Our caller is being cancelled; the shielded abort carries on regardless.
            raise
        except Exception as e:
            log.error("abort of multipart upload for %r failed: %s", self._spec.key, e)


def _holds(obj: ObjectInfo | None, size: int, metadata: dict[str, str]) -> bool:
    """Does ``obj`` have ``size`` bytes and every entry of ``metadata`` (which carries the
    body's sha256)?  Then it holds exactly the bytes we sent, whoever wrote it last."""
    return (
        obj is not None
        and obj.size == size
        and bool(metadata)
        and all(obj.metadata.get(k) == v for k, v in metadata.items())
    )


async def label(
    storage: Storage,
    key: str,
    *,
    etag: str,
    size: int,
    metadata: dict[str, str],
    content_type: str,
) -> None:
    """Give the completed object ``etag`` at ``key`` its final metadata (the self-copy).

    A copy whose answer was lost may still have been carried out; its retry then fails
    (on stores where the copy changes the ETag, the If-Match no longer holds), or every
    attempt timed out.  Either way a HEAD tells: the object has our size and our
    metadata (with the sha256), so it is labelled, and reporting a failure would be a lie.
    """
    try:
        await storage.replace_metadata(
            key, etag=etag, size=size, metadata=metadata, content_type=content_type
        )
    except ProxyError:
        try:
            obj = await storage.head(key)
        except ProxyError:
            obj = None
        if _holds(obj, size, metadata):
            log.warning("the metadata copy of %s had been carried out; its answer was lost", key)
            return
        raise


async def verify_stored(storage: Storage, key: str, *, etag: str, size: int, sha256: str) -> None:
    """After a single PutObject: is the object at ``key`` the one we sent?

    A store can acknowledge a write and keep something else (SeaweedFS turns a key
    ending in "/" into an empty folder and answers with the body's ETag).  One HEAD turns
    such a silent loss into an error instead of a 201 that lies.  Another upload's object
    (overwrite = true, written right after ours) is theirs: 409, and it stays.  A HEAD
    that fails leaves the store's acknowledgement standing: the object is most likely
    there, and a failure answer would send the client into a retry that finds its key
    taken."""
    try:
        obj = await storage.head(key)
    except ProxyError as e:
        log.warning("%s: could not check the stored object (%s); taking the store's word", key, e)
        return
    if obj is not None and obj.size == size and obj.metadata.get("sha256") == sha256:
        return  # our bytes (by size and SHA-256), whoever's request put them there last
    if obj is not None and obj.etag != etag:
        raise ObjectExists("the object was replaced by a concurrent upload to the same key")
    log.error("%s: the store acknowledged the object but does not hold it as sent", key)
    if obj is not None:
        await delete_if_ours(storage, key, etag)
    raise StorageError(f"the store did not keep {key!r} as sent")


async def delete_if_ours(storage: Storage, key: str, etag: str) -> None:
    """Delete the object at ``key`` only while its ETag is still ``etag`` (If-Match): an
    object a concurrent upload put there since is theirs and stays.  Shielded and bounded;
    a failure is logged, never raised (the caller is already failing)."""
    delete = asyncio.ensure_future(storage.delete_object(key, if_match=etag))
    try:
        await asyncio.shield(asyncio.wait_for(delete, ABORT_TIMEOUT_S))
    except asyncio.CancelledError:
        raise  # the shielded delete carries on regardless
    except ConditionFailed:
        log.warning("%s was replaced by another upload meanwhile; that object stays", key)
    except Exception as e:
        log.error("could not delete %s: %s", key, e)


# Shared with the tus PATCH writer (proxy.tus.patch), which lays parts out differently
# (pending bytes first, a tail kept in S3) but must checksum them the same way.
part_checksum = _part_checksum
