"""One object from a body: a single PutObject, or a multipart upload completed and given
its metadata, or nothing at all.  No HTTP, no boto.

:class:`ObjectUpload` runs a plain upload (PUT, POST, one file of a form) on the engine's
:class:`~proxy.engine.pipeline.PartPipeline`: a body that fits in one part is stored by
one PutObject carrying its sha256; a larger one is completed (create-only unless
overwriting) and then labelled with its sha256 by a self-copy.  The whole-body digests a
client declared are checked before anything is stored or completed.  The outcome is
atomic: on any failure or cancellation the parts in flight are cancelled and the
multipart upload is aborted (shielded, with its own timeout), so no object appears.

The helpers below it (:func:`label`, :func:`verify_stored`, :func:`delete_if_ours`) are
what every protocol's completion uses to make and check the final object.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from proxy.engine.buffers import Buffers
from proxy.engine.pipeline import Body, PartPipeline, PartTarget, StreamSettings
from proxy.errors import (
    ChecksumMismatch,
    ConditionFailed,
    ObjectExists,
    ProxyError,
    StorageError,
)
from proxy.obs.observer import StreamObserver
from proxy.storage.base import CompletedPart, ObjectInfo, Storage

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a cleanup step (an abort, a delete) may take once the upload is failing.
CLEANUP_TIMEOUT_S = 30.0


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
    # Called with (size, sha256) once the body is verified, before the object is made
    # (a pre-finish hook): raising refuses the upload, and nothing is stored.
    before_finish: Callable[[int, str], Awaitable[None]] | None = None


@dataclass(frozen=True)
class StreamResult:
    key: str
    size: int
    sha256: str
    etag: str
    parts: int


class _Digests:
    """Whole-body SHA-256, and the MD5 a client asked us to verify (a BodyDigest)."""

    def __init__(self, want_md5: bool) -> None:
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5() if want_md5 else None

    def update(self, views: Sequence[memoryview], own: Sequence[memoryview]) -> None:
        for view in views:
            self.sha256.update(view)
            if self.md5 is not None:
                self.md5.update(view)


class ObjectUpload:
    """Carries one object from chunks to storage.  Use once."""

    def __init__(
        self,
        storage: Storage,
        buffers: Buffers,
        settings: StreamSettings,
        spec: UploadSpec,
        observer: StreamObserver | None = None,
    ) -> None:
        self._storage = storage
        self._spec = spec
        self._digests = _Digests(spec.expected.md5 is not None)
        self._pipe: PartPipeline[None] = PartPipeline(
            storage,
            buffers,
            settings,
            PartTarget(spec.key, spec.content_type, spec.metadata),
            self._digests,
            limit_bytes=spec.max_size_bytes,
            too_large=f"body exceeds the limit of {spec.max_size_bytes} bytes",
            declared_bytes=spec.declared_size,
            observer=observer,
        )

    @property
    def received_bytes(self) -> int:
        return self._pipe.received_bytes

    async def run(self, chunks: Body) -> StreamResult:
        pipe = self._pipe
        try:
            await pipe.receive(chunks)
            if not pipe.multipart_id:
                return await self._single_put()
            await pipe.dispatch()  # the last part
            await pipe.settle()
            pipe.check()
            return await self._complete()
        except BaseException:
            await self._abort()
            raise
        finally:
            pipe.close()

    def _verify(self) -> str:
        sha256 = self._digests.sha256.digest()
        exp = self._spec.expected
        if exp.sha256 is not None and exp.sha256 != sha256:
            raise ChecksumMismatch("body SHA-256 does not match the declared digest")
        md5 = self._digests.md5
        if exp.md5 is not None and md5 is not None and exp.md5 != md5.digest():
            raise ChecksumMismatch("body MD5 does not match Content-MD5")
        return sha256.hex()

    async def _before_finish(self) -> None:
        if self._spec.before_finish is not None:
            await self._spec.before_finish(self._pipe.received_bytes, self._verify())

    def _final_metadata(self, sha256: str) -> dict[str, str]:
        return {**self._spec.metadata, "sha256": sha256}

    async def _single_put(self) -> StreamResult:
        spec = self._spec
        sent = await self._pipe.put_whole(
            lambda _: self._final_metadata(self._verify()),
            if_none_match=spec.create_only,
            before_put=self._before_finish,
        )
        sha256 = self._digests.sha256.hexdigest()
        await verify_stored(self._storage, spec.key, etag=sent.etag, size=sent.size, sha256=sha256)
        return StreamResult(spec.key, sent.size, sha256, sent.etag, 1)

    async def _complete(self) -> StreamResult:
        spec, pipe = self._spec, self._pipe
        sent = pipe.sent()
        assert len(sent) == pipe.dispatched, "completing with a part that was never stored"
        sha256 = self._verify()
        size = pipe.received_bytes
        await self._before_finish()
        etag = await self._storage.complete_multipart(
            spec.key,
            pipe.multipart_id,
            [CompletedPart(p.number, p.etag) for p in sent],
            if_none_match=spec.create_only,
            size_bytes=size,
        )
        pipe.multipart_id = ""  # completed: nothing left to abort
        try:
            await label(
                self._storage,
                spec.key,
                etag=etag,
                size=size,
                metadata=self._final_metadata(sha256),
                content_type=spec.content_type,
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
            log.error("could not set metadata on %r; deleting it", spec.key)
            await delete_if_ours(self._storage, spec.key, etag)
            raise
        return StreamResult(spec.key, size, sha256, etag, len(sent))

    async def _abort(self) -> None:
        pipe = self._pipe
        await pipe.cancel()
        upload_id, pipe.multipart_id = pipe.multipart_id, ""
        if upload_id:
            abort = self._storage.abort_multipart(self._spec.key, upload_id)
            await shielded(abort, f"abort of the multipart upload of {self._spec.key!r}")


async def shielded(aw: Awaitable[T], what: str) -> T | None:
    """Run a cleanup step to its end even if our caller is cancelled, with its own timeout
    (:data:`CLEANUP_TIMEOUT_S`); its result, or None (logged) if it failed."""
    fut = asyncio.ensure_future(asyncio.wait_for(aw, CLEANUP_TIMEOUT_S))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        raise  # the shielded step carries on regardless
    except Exception as e:
        log.error("%s failed: %s", what, e)
        return None


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

    async def delete() -> None:
        try:
            await storage.delete_object(key, if_match=etag)
        except ConditionFailed:
            log.warning("%s was replaced by another upload meanwhile; that object stays", key)

    await shielded(delete(), f"delete of {key!r}")
