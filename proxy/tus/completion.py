"""Completing a tus upload: the object made to appear with its sha256, in idempotent steps
under the upload's lease, and the upload failed for good when it never can.

Every path that completes (the last PATCH, a PATCH that resumes an interrupted
completion, the sweeper) goes through :meth:`Completer.complete_leased`.  An upload's
outcome is reported here (:mod:`proxy.engine.events`), once: its object, or the failure
that discarded it; what a completed upload leaves behind (its post-finish event, its
content in the index of instant uploads, the record a resumable PUT's URL answers from)
is written here too (:meth:`Completer.record_finish`), so no caller can forget it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from dataclasses import dataclass, field, replace

from proxy.config import TusConfig
from proxy.engine.dedup import ContentIndex
from proxy.engine.events import Outcome, UploadEvents, auth_of
from proxy.engine.hashing import off_loop
from proxy.engine.upload import delete_if_ours, label, verify_stored
from proxy.errors import (
    KeyConflict,
    ObjectExists,
    ProxyError,
    StorageError,
    StorageUnavailable,
    UploadFailed,
)
from proxy.hooks.dispatch import Hooks
from proxy.hooks.payload import HookUpload
from proxy.storage.base import CompletedPart, ObjectInfo, multipart_etag
from proxy.tus.hash import Sha256, check_declared
from proxy.tus.patch import PatchResult
from proxy.tus.state import Lease, TusStorage, TusStore, UploadInfo

log = logging.getLogger(__name__)

REHASH_CHUNK_BYTES = 1024 * 1024
# Completion attempts the store may refuse (an answer, not an outage) before the upload is
# failed.  A refusal that repeats is not going to heal (a part the store no longer has as
# recorded, an upload aborted under us); three lets a passing glitch and a retry through.
MAX_COMPLETION_FAILURES = 3
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def completing(info: UploadInfo, sha256: Sha256) -> UploadInfo:
    """``info`` (every byte in its parts) as decided complete, with its final digest."""
    digest = sha256.digest()
    return replace(
        info,
        completing=True,
        sha256_state=None,
        sha256_hex=digest.hex() if digest is not None else None,
    )


@dataclass(eq=False)
class Completer:
    """Completes (or fails) tus uploads; reports each one's outcome."""

    config: TusConfig
    storage: TusStorage
    store: TusStore
    events: UploadEvents
    hooks: Hooks = field(default_factory=Hooks.disabled)
    index: ContentIndex | None = None  # instant uploads (None: dedup off)

    async def record_finish(self, info: UploadInfo) -> None:
        """What a completed upload (``sha256_hex`` set) leaves behind, before its state
        goes (so a completion that is redone records it again) and before the client's
        answer, whoever completes it (a request, the sweeper): its post-finish (durable:
        a failure fails this attempt, to be redone), its content in the index and, for
        an upload at the client's key, what its URL answers from (both best effort: a
        failure is logged and costs only that shortcut, never the stored upload)."""
        await self.hooks.record_finish(hook_upload(info))
        if self.index is not None and info.sha256_hex:
            await self.index.record(info.principal, info.key, info.offset, info.sha256_hex)
        if info.claims_key:
            # For as long as an unfinished upload stays resumable after its last PATCH.
            until_s = self.store.clock() + self.config.expire_after_s
            try:
                await self.store.record_finished(info, until_s)
            except ProxyError as e:
                log.warning("tus upload %s: could not record its completion: %s", info.id, e)

    def report(
        self,
        info: UploadInfo,
        *,
        sha256: str | None = None,
        error: ProxyError | None = None,
        client: str = "-",
    ) -> None:
        """The upload's outcome: its object (``sha256``) or ``error``; its duration runs
        from its creation."""
        self.events.finished(
            Outcome(
                protocol="tus",
                upload_id=info.id,
                key=info.key,
                size_bytes=info.offset,
                sha256=sha256,
                seconds=max(0.0, self.store.clock() - info.created_s),
                error=error,
                client=client,
                auth=auth_of(info.principal),
                metadata=_public(info.object_metadata),
                principal=info.principal,
            )
        )

    async def finish(
        self, lease: Lease, info: UploadInfo, result: PatchResult, client: str
    ) -> UploadInfo:
        # From this save on, HEAD reports the full length and a retry only completes.
        info = await lease.save(completing(info, result.sha256))
        return await self.complete_leased(lease, info, client)

    async def complete_leased(
        self, lease: Lease, info: UploadInfo, client: str = "-"
    ) -> UploadInfo:
        """Complete under the lease; every path that completes goes through here.

        An attempt that fails leaves the upload ``completing`` for a retry (the client's
        PATCH, or the sweeper), with the refusal counted.  An upload that can never
        complete as received is failed instead: its multipart upload aborted, its state
        deleted, the client told (410 ERR_UPLOAD_FAILED, so it starts again).  That is one
        whose key holds an object that is not its own, whose parts are not the ones
        recorded, that the store refused MAX_COMPLETION_FAILURES times, or that has kept
        failing for expire_after_s (a store that only ever times out on it)."""
        try:
            if info.completion_failures >= MAX_COMPLETION_FAILURES:
                raise UploadFailed(
                    f"the upload could not be completed after {info.completion_failures} "
                    "attempts and was discarded; upload the file again"
                )
            done = await self.complete(info, client)
        except asyncio.CancelledError:
            raise
        except ProxyError as e:
            failed = e if isinstance(e, UploadFailed) else self._give_up(info, e)
            if failed is None:
                await self._count_failure(lease, info, e)
                raise
            await self._fail(info, failed, client)
            await lease.drop()
            if failed is e:
                raise
            raise failed from e
        await lease.drop()
        return done

    def _give_up(self, info: UploadInfo, error: ProxyError) -> UploadFailed | None:
        """After a failed completion attempt: the failure that ends the upload, or None to
        let it be retried."""
        refused = not isinstance(error, StorageUnavailable)
        if refused and info.completion_failures + 1 >= MAX_COMPLETION_FAILURES:
            return UploadFailed(
                f"the store refused to complete the upload {MAX_COMPLETION_FAILURES} times "
                f"({error.message}); it was discarded: upload the file again"
            )
        if self.store.clock() >= info.expires_s:
            return UploadFailed(
                f"the upload could not be completed for {self.config.expire_after_s:.0f}s "
                f"({error.message}); it was discarded: upload the file again"
            )
        return None

    async def _count_failure(self, lease: Lease, info: UploadInfo, error: ProxyError) -> None:
        if isinstance(error, StorageUnavailable):
            return  # an outage, not a refusal: the expiry bounds those
        try:
            await lease.release(replace(info, completion_failures=info.completion_failures + 1))
        except ProxyError as e:
            log.warning("tus upload %s: could not record a failed completion: %s", info.id, e)

    async def key_taken(
        self, lease: Lease, info: UploadInfo, cause: ProxyError, client: str
    ) -> UploadFailed:
        """The last PATCH of an upload below one part (one PutObject, create-only) found
        its key taken: fail the upload for good, as a completion would above one part
        (a 409 would tell a tus client to HEAD and retry, for ever).  The error to raise."""
        return await self.discard(lease, info, _key_taken(info.key, cause), client)

    async def discard(
        self, lease: Lease, info: UploadInfo, failed: UploadFailed, client: str
    ) -> UploadFailed:
        """Fail the upload for good (see _fail) and drop its lease; the error to raise."""
        await self._fail(info, failed, client)
        await lease.drop()
        return failed

    async def _fail(self, info: UploadInfo, error: UploadFailed, client: str) -> None:
        """Discard an upload that cannot complete: abort its parts, delete its object if
        an attempt got that far (one without its sha256 breaks our promise), delete its
        state.  An object at the key that is not ours stays."""
        log.error("tus upload id=%s could not be completed: %s", info.id, error.message)
        storage = self.storage
        if info.multipart_id:
            await storage.abort_multipart(info.key, info.multipart_id)
        obj = await storage.head(info.key)
        # Only an object this upload stored: its tus id alone proves nothing (anyone who
        # lists the bucket or reads the logs knows the storage id and can put it there).
        if obj is not None and _ours(info, obj, _completed_parts(info)):
            await delete_if_ours(storage, info.key, obj.etag)
        await self.store.delete_all(info)
        self.report(info, error=error, client=client)

    async def resume(self, lease: Lease, client: str) -> UploadInfo:
        """A PATCH on an upload whose completion was interrupted: finish it now."""
        return await self.complete_leased(lease, lease.info, client)

    async def complete(self, info: UploadInfo, client: str = "-") -> UploadInfo:
        """Make the object appear with its sha256 and drop the state.  Idempotent: each step
        can be redone after an interruption (the caller holds the lease)."""
        storage = self.storage
        length = info.offset
        check_declared(info.repr_sha256, info.sha256_hex)
        if not info.parts:
            if info.multipart_id:
                await storage.abort_multipart(info.key, info.multipart_id)
            await self.put_empty(info.key, info.content_type, info.object_metadata)
            sha256 = EMPTY_SHA256
        elif not info.multipart_id:
            # Below one part size: stored whole, sha256 included, by one PutObject
            # (PatchWriter._put_whole); there is no multipart upload to complete.
            sha256 = info.sha256_hex or await self._rehash(info.key)
            check_declared(info.repr_sha256, sha256)
        else:
            etag = await self._complete_multipart(info)
            sha256 = info.sha256_hex or await self._rehash(info.key)
            check_declared(info.repr_sha256, sha256)
            await label(
                storage,
                info.key,
                etag=etag,
                size=length,
                metadata={**info.object_metadata, "sha256": sha256},
                content_type=info.content_type,
            )
        await self.record_finish(replace(info, sha256_hex=sha256))
        await self.store.delete_all(info)
        self.report(info, sha256=sha256, client=client)
        return replace(info, sha256_hex=sha256)

    async def put_empty(self, key: str, content_type: str, metadata: dict[str, str]) -> None:
        storage = self.storage
        try:
            etag = await storage.put_object(
                key,
                b"",
                metadata={**metadata, "sha256": EMPTY_SHA256},
                content_type=content_type,
                checksum=None,
                if_none_match=True,
            )
        except (ObjectExists, KeyConflict) as e:
            # An earlier attempt of ours whose answer was lost, or someone else's object:
            # only ours carries our tus id (plain uploads cannot set it) and no bytes.
            obj = await storage.head(key)
            ours = (
                obj is not None
                and obj.size == 0
                and _tagged(obj, metadata["tus-id"])
                and obj.metadata.get("sha256") == EMPTY_SHA256
            )
            if not ours:
                raise _key_taken(key, e) from e
            return
        await verify_stored(storage, key, etag=etag, size=0, sha256=EMPTY_SHA256)

    async def _complete_multipart(self, info: UploadInfo) -> str:
        """CompleteMultipartUpload (create-only), after checking the parts; the object's etag.

        The store keeps what was uploaded last under each part number: a PATCH whose lease
        ran out may still have had a part in flight that landed over the part a later
        PATCH recorded.  ListParts shows it before anything is completed.  After a failed
        attempt, the object at the key is taken for ours only if it proves to be: our tus
        id in its metadata (set at CreateMultipartUpload; plain uploads cannot set it),
        our size, and the ETag our recorded parts make (or, once labelled, our sha256:
        on stores where the self-copy changes the ETag)."""
        storage = self.storage
        parts = _completed_parts(info)
        try:
            await self._check_parts(info)
            return await storage.complete_multipart(
                info.key, info.multipart_id, parts, if_none_match=True
            )
        except StorageUnavailable:
            raise
        except (StorageError, KeyConflict) as e:
            # Already completed by an earlier, interrupted attempt?
            obj = await storage.head(info.key)
            if obj is not None and _ours(info, obj, parts):
                return obj.etag
            if obj is not None or isinstance(e, ObjectExists | KeyConflict):
                raise _key_taken(info.key, e) from e
            raise

    async def _check_parts(self, info: UploadInfo) -> None:
        stored = {
            (p.number, p.etag.strip('"'), p.size)
            for p in await self.storage.list_parts(info.key, info.multipart_id)
        }
        for number, part in enumerate(info.parts, start=1):
            if (number, part.etag.strip('"'), part.size) not in stored:
                # Most likely a part of a PATCH whose lease had run out landed over it.
                raise UploadFailed(
                    f"the store no longer holds part {number} of the upload as it was "
                    "received; the upload was discarded: upload the file again"
                )

    async def _rehash(self, key: str) -> str:
        """The SHA-256 of a stored object, read back in bounded chunks.  Only for uploads
        whose hash state could not be carried over (see :mod:`proxy.tus.hash`)."""
        started = time.monotonic()
        h = hashlib.sha256()
        async for chunk in self.storage.iter_object(key, chunk_bytes=REHASH_CHUNK_BYTES):
            await off_loop(functools.partial(h.update, chunk), len(chunk), in_thread=True)
        log.info("tus: re-read %r to hash it in %.2fs", key, time.monotonic() - started)
        return h.hexdigest()


def _public(metadata: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in metadata.items() if k != "tus-id"}


def hook_upload(info: UploadInfo) -> HookUpload:
    """What a hook event says about a tus upload: its storage id (the URL id is kept
    nowhere), its object metadata (Upload-Metadata, lower-cased keys) and principal."""
    return HookUpload(
        protocol="tus",
        id=info.id,
        key=info.key,
        size=info.length,
        offset=info.offset,
        metadata=_public(info.object_metadata),
        sha256=info.sha256_hex,
        principal=info.principal,
    )


def _tagged(obj: ObjectInfo, upload_id: str) -> bool:
    return obj.metadata.get("tus-id") == upload_id


def _completed_parts(info: UploadInfo) -> list[CompletedPart]:
    return [CompletedPart(n, p.etag) for n, p in enumerate(info.parts, start=1)]


def _ours(info: UploadInfo, obj: ObjectInfo, parts: list[CompletedPart]) -> bool:
    """Is ``obj`` the object this upload stored: what its multipart upload completed to,
    or (below one part, no multipart upload) its one PutObject?"""
    if not _tagged(obj, info.id) or obj.size != info.offset:
        return False
    etag = obj.etag.strip('"')
    if info.multipart_id and etag == multipart_etag(parts):
        return True
    if not info.multipart_id and len(parts) == 1 and etag == parts[0].etag.strip('"'):
        return True
    return info.sha256_hex is not None and obj.metadata.get("sha256") == info.sha256_hex


def _key_taken(key: str, cause: ProxyError) -> UploadFailed:
    what = "is a folder" if isinstance(cause, KeyConflict) else "holds another object"
    return UploadFailed(
        f"the upload's key {key!r} {what}; the upload was discarded: upload the file again"
    )
