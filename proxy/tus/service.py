"""tus upload lifecycle on the storage interface: create, write a PATCH, finish, terminate, sweep.

No HTTP here (that is :mod:`proxy.web.tus`); every step keeps the state in the bucket
(:mod:`proxy.tus.state`) so a restart or another instance can carry on:

* create: the info object is written; nothing else (the multipart upload is created by
  the first PATCH that fills a part, see :mod:`proxy.tus.patch`);
* write: under the upload's lease, the body goes through :class:`~proxy.tus.patch.PatchWriter`;
  a lease keeper renews the lease and, when the PATCH has no ``Upload-Checksum`` to honour,
  checkpoints the parts stored so far, so a daemon that dies mid-PATCH loses at most a
  few parts.  Whatever ends the PATCH, what is durable is committed and the lease released;
* finish: first the decision is made durable (``completing`` with the final digest in the
  info object, so HEAD reports the full offset), then completion runs in idempotent steps
  that the sweeper, or a retried PATCH, redoes if they were interrupted;
* terminate and expiry: abort the multipart upload, then delete the state.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from proxy.auth import ANONYMOUS, Principal
from proxy.config import TusConfig
from proxy.engine.buffers import Buffers
from proxy.engine.hashing import off_loop
from proxy.engine.pipeline import StreamObserver
from proxy.engine.upload import StreamResult, delete_if_ours, label, shielded, verify_stored
from proxy.errors import (
    ConditionFailed,
    KeyConflict,
    LeaseLost,
    ObjectExists,
    ProxyError,
    StorageError,
    StorageUnavailable,
    TooLarge,
    TooManyUnfinished,
    UploadChecksumMismatch,
    UploadFailed,
)
from proxy.keys import safe_filename
from proxy.storage.base import CompletedPart, ObjectInfo, OpenMultipart, multipart_etag
from proxy.tus.hash import Sha256, resume_sha256
from proxy.tus.patch import PatchResult, PatchTarget, PatchWriter
from proxy.tus.state import (
    Lease,
    TusStore,
    UploadInfo,
    release_quietly,
    valid_id,
)
from proxy.web.uploads import UploadContext, transfer

log = logging.getLogger(__name__)

REHASH_CHUNK_BYTES = 1024 * 1024
# Retry-After of a 429 ERR_TOO_MANY_UNFINISHED_UPLOADS: places free up as uploads finish.
QUOTA_RETRY_AFTER_S = 60
# Completion attempts the store may refuse (an answer, not an outage) before the upload is
# failed.  A refusal that repeats is not going to heal (a part the store no longer has as
# recorded, an upload aborted under us); three lets a passing glitch and a retry through.
MAX_COMPLETION_FAILURES = 3
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class Checksum:
    """An ``Upload-Checksum``: the digest the PATCH body must have."""

    algorithm: str
    digest: bytes


@dataclass(frozen=True)
class NewUpload:
    id: str  # the storage id (tus_state.storage_id): what is kept and logged
    url_id: str  # the id in the upload's URL: answered once, at creation, kept nowhere
    key: str
    content_type: str
    metadata_header: str
    object_metadata: dict[str, str]
    length: int | None
    filename: str | None
    principal: Principal  # the creator: the only one who may touch the upload again
    quota: str  # whose cap on unfinished uploads it counts against (quota_of)


def quota_of(principal: Principal, client_ip: str) -> str:
    """Whose cap on unfinished uploads a creation counts against: the principal's, or with
    auth off (everyone is "anonymous") the client address's.  A path segment of the
    marker keys; the address is hashed so the key holds only [a-z0-9-]."""
    if principal == ANONYMOUS:
        return "addr-" + hashlib.sha256(client_ip.encode()).hexdigest()[:16]
    return f"{principal.kind}-{principal.ref}"


class TusService:
    """The tus operations of one daemon instance."""

    def __init__(self, config: TusConfig, uploads: UploadContext, store: TusStore) -> None:
        self.config = config
        self.uploads = uploads
        self.store = store
        # (taken at, multipart ids of live uploads) from the last complete sweep.
        self._live: tuple[float, frozenset[str]] | None = None

    @property
    def max_size_bytes(self) -> int:
        return self.uploads.config.max_upload_size_bytes

    def object_key(self, upload_id: str, filename: str | None, under: str = "") -> str:
        # The tus id is always a whole key segment: TusStore.owns_multipart relies on it.
        # Under object_prefix, where plain uploads are refused: nobody else can put an
        # object at the key before the upload completes.  ``under``: an upload link's
        # prefix (validated, ends with "/"), a folder inside object_prefix.
        name = safe_filename(filename)
        prefix = self.uploads.config.key_prefix + self.config.object_prefix + under
        return f"{prefix}{upload_id}/{name}" if name else f"{prefix}{upload_id}"

    # -- create ------------------------------------------------------------------------

    async def create(self, new: NewUpload, *, leased: bool) -> tuple[UploadInfo, Lease | None]:
        self.uploads.hooks.created(new.id, new.key)
        now = time.time()
        if new.length == 0:
            # Complete on arrival: the object, and no state at all.
            await self._put_empty(new.key, new.content_type, new.object_metadata)
            log.info(
                "tus upload id=%s key=%r bytes=0 sha256=%s result=ok", new.id, new.key, EMPTY_SHA256
            )
            info = self._info(new, "", now)
            return replace(info, completing=True, sha256_hex=EMPTY_SHA256), None
        # No multipart upload yet: a creation costs S3 one small state object (and one
        # marker, listed, when unfinished uploads are capped).
        info = self._info(new, "", now)
        limit = self.config.max_unfinished_per_principal
        if limit:
            if not await self.store.reserve(info, limit):
                raise TooManyUnfinished(
                    f"{limit} uploads of yours are unfinished already: complete or delete "
                    "one, or wait for it to expire",
                    headers={"Retry-After": str(QUOTA_RETRY_AFTER_S)},
                )
        else:
            info = replace(info, quota="")
        try:
            if leased:
                lease = await self.store.create(info, owner=secrets.token_hex(8))
                return lease.info, lease
            await self.store.create_unleased(info)
            return info, None
        except BaseException:
            if (marker := self.store.marker_key(info)) is not None:
                await shielded(self.uploads.storage.delete_object(marker), "tus unreserve")
            raise

    def _info(self, new: NewUpload, mpu: str, now: float) -> UploadInfo:
        return UploadInfo(
            id=new.id,
            key=new.key,
            content_type=new.content_type,
            metadata_header=new.metadata_header,
            object_metadata=new.object_metadata,
            length=new.length,
            multipart_id=mpu,
            expires_s=self.config.expiry_s(now, now),
            created_s=now,
            principal=str(new.principal),
            quota=new.quota,
        )

    # -- write -------------------------------------------------------------------------

    async def write(
        self,
        lease: Lease,
        chunks: AsyncIterator[bytes],
        *,
        declared_bytes: int | None,
        checksum: Checksum | None,
        client_ip: str | None,
    ) -> UploadInfo:
        """Stream one PATCH body at the upload's offset; commit; finish when it is the last.
        Its buffers count against ``client_ip``'s share of the pool (None: the daemon's
        own work, e.g. the sweeper finishing an upload)."""
        info = lease.info
        room = self.max_size_bytes if info.length is None else info.length
        target = PatchTarget(
            key=info.key,
            multipart_id=info.multipart_id,
            parts_before=len(info.parts),
            pending=info.pending,
            offset=info.offset,
            limit_bytes=room - info.offset,
            segment_key=lambda offset: self.store.segment_key(info.id, offset),
            content_type=info.content_type,
            metadata=info.object_metadata,
        )
        buffers: Buffers = self.uploads.pool
        if client_ip is not None:
            buffers = self.uploads.buffers_for(client_ip)
        with transfer(self.uploads, info.id, info.key) as observer:
            return await self._write(
                lease, info, target, chunks, declared_bytes, checksum, observer, buffers
            )

    async def _write(
        self,
        lease: Lease,
        info: UploadInfo,
        target: PatchTarget,
        chunks: AsyncIterator[bytes],
        declared_bytes: int | None,
        checksum: Checksum | None,
        observer: StreamObserver,
        buffers: Buffers,
    ) -> UploadInfo:
        writer = PatchWriter(
            self.uploads.storage,
            buffers,
            self.uploads.settings,
            target,
            resume_sha256(info.sha256_state, info.parts_bytes),
            hashlib.new(checksum.algorithm) if checksum else None,
            fenced=lease.fenced,
            observer=observer,
            declared_bytes=declared_bytes,
        )
        keeper = _LeaseKeeper(
            lease,
            writer,
            info,
            checkpoint=checksum is None,
            expiry=self.config.expiry_s,
            completing=self._completing,
        )
        started = time.monotonic()
        try:
            try:
                await writer.run(chunks)
                await writer.drain()
            except BaseException as e:
                await keeper.stop()
                # Whatever ended the body (a reset, a stall, a shutdown), the bytes before
                # it are the client's and are kept; after too many bytes only whole parts
                # are (the tail could reach the length without the upload completing).
                # With Upload-Checksum nothing is: an incomplete chunk cannot be verified.
                keep_tail = not isinstance(e, TooLarge)
                kept = await shielded(
                    self._salvage(lease, writer, info, keep_tail, commit=checksum is None),
                    "tus commit",
                )
                if kept is None or not kept.completing or lease.released:
                    raise
                # The body broke (or stalled, or the daemon is draining) after its last
                # byte: every byte of the upload is durable, so it is complete, and a
                # client that sees Upload-Offset == Upload-Length stops.  Finish it now;
                # if that fails, the state says ``completing`` and the sweeper or the
                # client's next PATCH finishes it.
                done = await shielded(self._complete_leased(lease, kept), "tus completion")
                if done is None or isinstance(e, asyncio.CancelledError):
                    raise
                return done
            if checksum is not None and writer.checksum_digest() != checksum.digest:
                await keeper.stop()
                # The chunk is dropped, but a multipart upload it created is kept for the
                # next PATCH (not orphaned until the stale sweeper finds it).
                lease.info = replace(lease.info, multipart_id=writer.multipart_id)
                await release_quietly(lease)
                raise UploadChecksumMismatch(
                    f"the PATCH body does not match its {checksum.algorithm} Upload-Checksum; "
                    "it was discarded"
                )
            final = info.length is not None and info.offset + writer.received_bytes == info.length
            try:
                result = await writer.commit(final=final)
            finally:
                await keeper.stop()
            new_info = self._apply(info, result)
            if final:
                return await self._finish(lease, new_info, result)
            committed = await lease.release(new_info)
            await self._delete_quietly(result.obsolete)
            log.info(
                "tus patch id=%s offset=%d bytes=%d duration_s=%.3f result=ok",
                info.id,
                committed.offset,
                writer.received_bytes,
                time.monotonic() - started,
            )
            return committed
        except BaseException:
            await release_quietly(lease)
            raise
        finally:
            await keeper.stop()  # already stopped on every path; this makes sure of it
            writer.close()

    async def _salvage(
        self, lease: Lease, writer: PatchWriter, info: UploadInfo, keep_tail: bool, *, commit: bool
    ) -> UploadInfo:
        """Commit what a failed PATCH left durable and release the lease, unless that
        brought the upload to its length: then it is saved ``completing`` (lease kept)."""
        if not commit or lease.lost:
            # Nothing kept, but a multipart upload this PATCH created is, for the next one.
            return await lease.release(replace(lease.info, multipart_id=writer.multipart_id))
        final = info.length is not None and info.offset + writer.received_bytes == info.length
        result = await writer.salvage(keep_tail=keep_tail, final=final)
        kept = self._apply(info, result)
        if kept.reached_length and not kept.pending:
            log.info("tus patch id=%s: the PATCH failed after its last byte", info.id)
            return await lease.save(self._completing(kept, result.sha256))
        committed = await lease.release(kept)
        await self._delete_quietly(result.obsolete)
        log.info("tus patch id=%s offset=%d kept after a failed PATCH", info.id, committed.offset)
        return committed

    def _apply(self, info: UploadInfo, result: PatchResult) -> UploadInfo:
        """``info`` with the result's parts, pending segments and hash state; expiry pushed back."""
        return replace(
            info,
            multipart_id=result.multipart_id,
            parts=info.parts + result.new_parts,
            pending=result.pending,
            sha256_state=result.sha256.export(),
            expires_s=self.config.expiry_s(info.created_s, time.time()),
        )

    # -- finish ------------------------------------------------------------------------

    @staticmethod
    def _completing(info: UploadInfo, sha256: Sha256) -> UploadInfo:
        """``info`` (every byte in its parts) as decided complete, with its final digest."""
        digest = sha256.digest()
        return replace(
            info,
            completing=True,
            sha256_state=None,
            sha256_hex=digest.hex() if digest is not None else None,
        )

    async def _finish(self, lease: Lease, info: UploadInfo, result: PatchResult) -> UploadInfo:
        # From this save on, HEAD reports the full length and a retry only completes.
        info = await lease.save(self._completing(info, result.sha256))
        return await self._complete_leased(lease, info)

    async def _complete_leased(self, lease: Lease, info: UploadInfo) -> UploadInfo:
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
            done = await self.complete(info)
        except asyncio.CancelledError:
            raise
        except ProxyError as e:
            failed = e if isinstance(e, UploadFailed) else self._give_up(info, e)
            if failed is None:
                await self._count_failure(lease, info, e)
                raise
            await self._fail(info, failed)
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

    async def _fail(self, info: UploadInfo, error: UploadFailed) -> None:
        """Discard an upload that cannot complete: abort its parts, delete its object if
        an attempt got that far (one without its sha256 breaks our promise), delete its
        state.  An object at the key that is not ours stays."""
        log.error(
            "tus upload id=%s key=%r bytes=%d result=%s: %s",
            info.id,
            info.key,
            info.offset,
            error.code,
            error.message,
        )
        storage = self.uploads.storage
        if info.multipart_id:
            await storage.abort_multipart(info.key, info.multipart_id)
        obj = await storage.head(info.key)
        if obj is not None and _tagged(obj, info.id):
            await delete_if_ours(storage, info.key, obj.etag)
        await self.store.delete_all(info)
        self.uploads.hooks.finished(info.id, None, error, time.time() - info.created_s, info.offset)

    async def resume_completion(self, lease: Lease) -> UploadInfo:
        """A PATCH on an upload whose completion was interrupted: finish it now."""
        return await self._complete_leased(lease, lease.info)

    async def complete(self, info: UploadInfo) -> UploadInfo:
        """Make the object appear with its sha256 and drop the state.  Idempotent: each step
        can be redone after an interruption (the caller holds the lease)."""
        storage = self.uploads.storage
        length = info.offset
        if not info.parts:
            if info.multipart_id:
                await storage.abort_multipart(info.key, info.multipart_id)
            await self._put_empty(info.key, info.content_type, info.object_metadata)
            sha256 = EMPTY_SHA256
        elif not info.multipart_id:
            # Below one part size: stored whole, sha256 included, by one PutObject
            # (PatchWriter._put_whole); there is no multipart upload to complete.
            sha256 = info.sha256_hex or await self._rehash(info.key)
        else:
            etag = await self._complete_multipart(info)
            sha256 = info.sha256_hex or await self._rehash(info.key)
            await label(
                storage,
                info.key,
                etag=etag,
                size=length,
                metadata={**info.object_metadata, "sha256": sha256},
                content_type=info.content_type,
            )
        await self.store.delete_all(info)
        self.uploads.hooks.finished(
            info.id,
            StreamResult(info.key, length, sha256, "", len(info.parts)),
            None,
            time.time() - info.created_s,
            length,
        )
        log.info(
            "tus upload id=%s key=%r bytes=%d sha256=%s parts=%d result=ok",
            info.id,
            info.key,
            length,
            sha256,
            len(info.parts),
            extra={
                "upload": {
                    "id": info.id,
                    "key": info.key,
                    "bytes": length,
                    "sha256": sha256,
                    "result": "ok",
                    "protocol": "tus",
                }
            },
        )
        return replace(info, sha256_hex=sha256)

    async def _put_empty(self, key: str, content_type: str, metadata: dict[str, str]) -> None:
        storage = self.uploads.storage
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
        storage = self.uploads.storage
        parts = [CompletedPart(n, p.etag) for n, p in enumerate(info.parts, start=1)]
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
            for p in await self.uploads.storage.list_parts(info.key, info.multipart_id)
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
        async for chunk in self.uploads.storage.iter_object(key, chunk_bytes=REHASH_CHUNK_BYTES):
            await off_loop(functools.partial(h.update, chunk), len(chunk), in_thread=True)
        log.info("tus: re-read %r to hash it in %.2fs", key, time.monotonic() - started)
        return h.hexdigest()

    # -- terminate and sweep ---------------------------------------------------------------

    async def terminate(self, lease: Lease) -> None:
        info = lease.info
        if info.multipart_id:
            await self.uploads.storage.abort_multipart(info.key, info.multipart_id)
        await self.store.delete_all(info)
        await lease.drop()
        log.info("tus upload id=%s key=%r terminated at offset %d", info.id, info.key, info.offset)

    async def sweep_once(self) -> int:
        """Expire old uploads and finish interrupted completions; return how many were handled.

        An upload whose lease is held is being written: it is live and left alone
        (:meth:`UploadInfo.expired`), here and in :meth:`TusStore.owns_multipart`."""
        handled = 0
        started = time.time()
        live: set[str] = set()
        complete_view = True
        ids = await self.store.list_ids()
        for upload_id in ids:
            try:
                loaded = await self.store.load(upload_id)
                if loaded is None:
                    continue
                info = loaded[0]
                now = time.time()
                if not info.expired(now) and info.multipart_id:
                    live.add(info.multipart_id)
                finish = info.completing or info.reached_length
                if info.leased(now) or not (finish or info.expired(now)):
                    continue
                lease = await self.store.acquire(upload_id, by=None, allow_expired=True)
                try:
                    if lease.info.completing:
                        await self._complete_leased(lease, lease.info)
                    elif lease.info.reached_length:
                        # Every byte is durable but completion was never decided (a final
                        # PATCH that failed after setting a deferred length, or state from
                        # an older version): clients see offset == length and stop, so
                        # finish it as the empty PATCH the spec allows at that offset would.
                        await self.write(
                            lease, _no_bytes(), declared_bytes=0, checksum=None, client_ip=None
                        )
                    else:
                        await self.terminate(lease)
                        log.info("tus upload id=%s expired", upload_id)
                finally:
                    await release_quietly(lease)
                handled += 1
            except asyncio.CancelledError:
                raise
            except UploadFailed:
                handled += 1  # it could not complete: failed for good, cleaned up, logged
            except (ProxyError, LeaseLost, ConditionFailed) as e:
                complete_view = False
                log.warning("tus sweeper: upload %s: %s", upload_id, e)
        if complete_view:
            self._live = (started, frozenset(live))
        await self._delete_quietly(tuple(await self.store.stale_markers(set(ids))))
        return handled

    def claims_multipart(self, upload: OpenMultipart) -> bool:
        """Synchronous "is this multipart upload a live tus upload's?" for a stale-multipart
        sweeper that cannot wait on S3.  Answers from the last complete sweep of this
        instance and errs on the side of "yes": a tus-shaped key (a tus id as a whole
        segment) is claimed when no sweep has run, the last one is older than three
        intervals, or the upload started after it.  :meth:`TusStore.owns_multipart` is the
        exact (async) answer."""
        if not any(valid_id(segment) for segment in upload.key.split("/")):
            return False
        if self._live is None:
            return True
        taken_at, live = self._live
        if time.time() - taken_at > 3 * max(self.config.sweep_interval_s, 1.0):
            return True
        if upload.initiated.timestamp() >= taken_at:
            return True
        return upload.upload_id in live

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("tus sweeper run failed; trying again next interval")

    # -- helpers ---------------------------------------------------------------------------

    async def _delete_quietly(self, keys: tuple[str, ...]) -> None:
        # Segments no longer referenced; one left behind is removed with its upload's folder.
        for key in keys:
            try:
                await self.uploads.storage.delete_object(key)
            except ProxyError as e:
                log.warning("tus: could not delete %r: %s", key, e)


def _tagged(obj: ObjectInfo, upload_id: str) -> bool:
    return obj.metadata.get("tus-id") == upload_id


def _ours(info: UploadInfo, obj: ObjectInfo, parts: list[CompletedPart]) -> bool:
    """Is ``obj`` the object this upload's multipart upload completed to?"""
    if not _tagged(obj, info.id) or obj.size != info.offset:
        return False
    if obj.etag.strip('"') == multipart_etag(parts):
        return True
    return info.sha256_hex is not None and obj.metadata.get("sha256") == info.sha256_hex


def _key_taken(key: str, cause: ProxyError) -> UploadFailed:
    what = "is a folder" if isinstance(cause, KeyConflict) else "holds another object"
    return UploadFailed(
        f"the upload's key {key!r} {what}; the upload was discarded: upload the file again"
    )


async def _no_bytes() -> AsyncIterator[bytes]:
    empty: tuple[bytes, ...] = ()
    for chunk in empty:
        yield chunk


class _LeaseKeeper:
    """Renews a PATCH's lease every third of its length and, when allowed, checkpoints the
    parts stored so far (so they survive a crash of this daemon).

    Every renewal also pushes ``expires_s`` to ``expire_after_s`` from now (never past
    ``max_lifetime_s`` from the creation: ``TusConfig.expiry_s``).  A held lease
    alone already keeps the upload live (:meth:`UploadInfo.expired`); the push is for the
    time after the lease lapses (renewals failing for a while, this daemon killed): the
    upload then expires ``expire_after_s`` after its last sign of life, as it would after
    a PATCH that ended, not at a deadline set before a PATCH that ran for a day."""

    def __init__(
        self,
        lease: Lease,
        writer: PatchWriter,
        info: UploadInfo,
        *,
        checkpoint: bool,
        expiry: Callable[[float, float], float],
        completing: Callable[[UploadInfo, Sha256], UploadInfo],
    ) -> None:
        self._lease = lease
        self._writer = writer
        self._info = info
        self._checkpoint = checkpoint
        self._expiry = expiry
        self._completing = completing
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        interval = self._lease.store.lease_s / 3
        while True:
            try:
                await asyncio.wait_for(self._stop.wait(), interval)
                return
            except TimeoutError:
                pass
            # Always the writer's multipart id: one it created is then saved within a
            # renewal, even by a PATCH whose parts cannot be checkpointed (Upload-Checksum).
            info = replace(self._lease.info, multipart_id=self._writer.multipart_id)
            if self._checkpoint:
                parts, sha = self._writer.durable()
                if parts and sha is not None:
                    info = replace(
                        self._info,
                        multipart_id=self._writer.multipart_id,
                        parts=self._info.parts + parts,
                        pending=(),
                        sha256_state=sha.export(),
                    )
                    if info.reached_length:
                        # The last part is in (``commit(final=True)`` is running): never
                        # save "every byte, not completing", which a crash would leave
                        # as offset == length with no object and nothing to finish it.
                        info = self._completing(info, sha)
            pushed = self._expiry(info.created_s, time.time())
            info = replace(info, expires_s=max(info.expires_s, pushed))
            try:
                await self._lease.save(info)
            except LeaseLost:
                log.error("tus upload %s: lease lost mid-PATCH", self._info.id)
                return
            except Exception as e:  # try again next round; the lease lasts 3 rounds
                log.warning("tus upload %s: lease renewal failed: %s", self._info.id, e)

    async def stop(self) -> None:
        # Never cancel a save half-way (its etag would be unknown): ask, and wait for it.
        self._stop.set()
        await asyncio.shield(self._task)
