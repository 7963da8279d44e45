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
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from proxy.auth import ANONYMOUS, Principal
from proxy.config import TusConfig
from proxy.engine.buffers import Buffers
from proxy.engine.context import Engine
from proxy.engine.pipeline import Body
from proxy.engine.upload import shielded
from proxy.errors import (
    DigestMismatch,
    HookRejected,
    InconsistentLength,
    KeyConflict,
    ObjectExists,
    ProxyError,
    Terminated,
    TooLarge,
    TooManyUnfinished,
    UploadChecksumMismatch,
)
from proxy.keys import full_key, safe_filename
from proxy.naming import KeyTemplate
from proxy.obs.observer import StreamObserver
from proxy.tus.completion import EMPTY_SHA256, Completer, completing, hook_upload
from proxy.tus.concat import ConcatService
from proxy.tus.hash import resume_sha256
from proxy.tus.patch import PatchResult, PatchTarget, PatchWriter
from proxy.tus.state import (
    Lease,
    LeaseKeeper,
    Part,
    TusStorage,
    TusStore,
    UploadInfo,
    release_quietly,
)

log = logging.getLogger(__name__)

# Retry-After of a 429 ERR_TOO_MANY_UNFINISHED_UPLOADS: places free up as uploads finish.
QUOTA_RETRY_AFTER_S = 60


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
    sha256: str | None = None  # hex, declared in Upload-Metadata: an instant upload may do
    # tus concatenation: "partial", and where its bytes go (proxy.tus.concat.Placement).
    concat: str = ""
    multipart_id: str = ""
    group: str = ""
    part_base: int = 0
    repr_sha256: str | None = None  # hex, the client's Repr-Digest: completion checks it
    claims_key: bool = False  # ``key`` is the client's, outside object_prefix (a PUT)


def quota_of(principal: Principal, client_ip: str) -> str:
    """Whose cap on unfinished uploads a creation counts against: the principal's, or with
    auth off (everyone is "anonymous") the client address's.  A path segment of the
    marker keys; the address is hashed so the key holds only [a-z0-9-]."""
    if principal == ANONYMOUS:
        return "addr-" + hashlib.sha256(client_ip.encode()).hexdigest()[:16]
    return f"{principal.kind}-{principal.ref}"


class TusService:
    """The tus operations of one daemon instance.  Wall-clock time is the store's clock
    (``store.clock``), so tests move expiry and leases without sleeping."""

    def __init__(self, config: TusConfig, engine: Engine, store: TusStore) -> None:
        self.config = config
        self.engine = engine
        self.store = store
        self.completer = Completer(
            config, store.storage, store, engine.events, engine.hooks, engine.dedup
        )
        self.concat = ConcatService(config, engine, store, self.completer, self.object_key)

    @property
    def storage(self) -> TusStorage:
        return self.store.storage

    @property
    def max_size_bytes(self) -> int:
        return self.engine.max_upload_size_bytes

    def object_key(
        self, upload_id: str, filename: str | None, name: str | None = None, *, under: str = ""
    ) -> str:
        """``{key_prefix}{object_prefix}{under}{id}/{name}``: ``name`` is a pre-create hook's
        key, else upload.key_template's, else the sanitised file name; ``under`` an upload
        link's prefix (validated, ends with "/"), a folder inside object_prefix.

        The tus id is always a whole key segment: TusStore.owns_multipart relies on it.
        Under object_prefix, where plain uploads are refused: nobody else can put an
        object at the key before the upload completes.  So a template or a hook chooses
        the name inside the upload's folder, never the folder."""
        if name is None and self.engine.key_template:
            name = KeyTemplate(self.engine.key_template).render(upload_id, filename)
        elif name is None:
            name = safe_filename(filename)
        prefix = self.engine.key_prefix + self.config.object_prefix + under
        return full_key("", f"{prefix}{upload_id}/{name}" if name else f"{prefix}{upload_id}")

    # -- create ------------------------------------------------------------------------

    async def check_quota(self, quota: str) -> None:
        """Refuse a creation from its headers alone when its principal is at the cap
        (before ``100 Continue``); :meth:`create` decides for good, atomically."""
        limit = self.config.max_unfinished_per_principal
        if limit and await self.store.quota_used(quota) >= limit:
            raise self._too_many(limit)

    @staticmethod
    def _too_many(limit: int) -> TooManyUnfinished:
        return TooManyUnfinished(
            f"{limit} uploads of yours are unfinished already: complete or delete "
            "one, or wait for it to expire",
            headers={"Retry-After": str(QUOTA_RETRY_AFTER_S)},
        )

    async def create(
        self, new: NewUpload, *, leased: bool, client: str = "-"
    ) -> tuple[UploadInfo, Lease | None]:
        now = self.store.clock()
        info = self._info(new, new.multipart_id, now)
        if new.length == 0 and not new.concat:
            # Complete on arrival: the object, and no state at all.
            await self.completer.put_empty(new.key, new.content_type, new.object_metadata)
            await self.completer.record_finish(replace(info, sha256_hex=EMPTY_SHA256))
            self.engine.events.created()
            self.completer.report(info, sha256=EMPTY_SHA256, client=client)
            return replace(info, completing=True, sha256_hex=EMPTY_SHA256), None
        # No multipart upload yet: a creation costs S3 one small state object (and one
        # marker, listed, when unfinished uploads are capped).
        limit = self.config.max_unfinished_per_principal
        if limit:
            if not await self.store.reserve(info, limit):
                raise self._too_many(limit)
        else:
            info = replace(info, quota="")
        try:
            if info.claims_key:
                await self.store.claim(info)
            if leased:
                lease = await self.store.create(info, owner=secrets.token_hex(8))
                info = lease.info
            else:
                await self.store.create_unleased(info)
                lease = None
        except BaseException:
            if (marker := self.store.marker_key(info)) is not None:
                await shielded(self.storage.delete_object(marker), "tus unreserve")
            if info.claims_key:
                await shielded(self.storage.delete_object(self.store.claim_key(info)), "unclaim")
            raise
        if not new.concat:  # a partial is no upload of its own: the final is reported
            self.engine.events.created()
        return info, lease

    async def create_copied(self, new: NewUpload, client: str = "-") -> UploadInfo | None:
        """A creation whose declared content (``new.sha256``) its principal stored before:
        the object is made by a server-side copy and the upload is complete on arrival,
        with no state at all (as for length 0).  None: nothing to copy (or the copy
        failed, or dedup is off), create as usual."""
        index = self.engine.dedup
        if index is None or new.sha256 is None or not new.length:
            return None
        owner = str(new.principal)
        source = await index.find(owner, new.sha256, new.length)
        if source is None:
            return None
        try:
            copied = await index.copy(
                source,
                new.key,
                owner=owner,
                sha256=new.sha256,
                metadata=new.object_metadata,
                content_type=new.content_type,
                create_only=True,
                protocol="tus",
            )
        except ProxyError as e:
            log.warning("tus instant upload of %r failed (%s); creating it as usual", new.key, e)
            return None
        # Parts but no multipart id: "stored whole", offset = length, as after a PutObject.
        info = replace(
            self._info(new, "", self.store.clock()), parts=(Part(copied.etag, copied.size),)
        )
        self.engine.events.created()
        self.completer.report(info, sha256=copied.sha256, client=client)
        return replace(info, completing=True, sha256_hex=copied.sha256)

    def info_of(self, new: NewUpload) -> UploadInfo:
        """What ``new`` would be as an upload created now (a concat final's starting point)."""
        return self._info(new, new.multipart_id, self.store.clock())

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
            concat=new.concat,
            group=new.group,
            part_base=new.part_base,
            repr_sha256=new.repr_sha256,
            claims_key=new.claims_key,
        )

    # -- write -------------------------------------------------------------------------

    async def write(
        self,
        lease: Lease,
        chunks: Body,
        *,
        declared_bytes: int | None,
        checksum: Checksum | None,
        client_ip: str | None,
        complete_at_end: bool = False,
    ) -> UploadInfo:
        """Stream one PATCH body at the upload's offset; commit; finish when it is the last.
        Its buffers count against ``client_ip``'s share of the pool (None: the daemon's
        own work, e.g. the sweeper finishing an upload).  ``complete_at_end``: the body
        ends the upload whatever its length (IETF ``Upload-Complete: ?1`` with no length
        known); a body that breaks does not."""
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
            part_base=info.part_base,
            declared_sha256=info.repr_sha256,
        )
        buffers = self.engine.buffers_for(client_ip)
        with self.engine.events.transfer(info.id, info.key) as live:
            observer = self.engine.hooks.progress(hook_upload(info), live)
            return await self._write(
                lease, info, target, chunks, declared_bytes, checksum, observer, buffers,
                client_ip or "-", complete_at_end,
            )  # fmt: skip

    async def _write(
        self,
        lease: Lease,
        info: UploadInfo,
        target: PatchTarget,
        chunks: Body,
        declared_bytes: int | None,
        checksum: Checksum | None,
        observer: StreamObserver,
        buffers: Buffers,
        client: str,
        complete_at_end: bool = False,
    ) -> UploadInfo:
        writer = PatchWriter(
            self.storage,
            buffers,
            self.engine.settings,
            target,
            resume_sha256(info.sha256_state, info.parts_bytes),
            hashlib.new(checksum.algorithm) if checksum else None,
            fenced=lease.fenced,
            observer=observer,
            declared_bytes=declared_bytes,
        )
        keeper = LeaseKeeper(
            lease,
            writer,
            info,
            checkpoint=checksum is None,
            expiry=self.config.expiry_s,
            completing=completing,
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
                # A body that says it ends the upload and runs past its length is no
                # completion, whatever whole parts reached the length.
                overlong = complete_at_end and info.length is not None and not keep_tail
                kept = await shielded(
                    self._salvage(
                        lease,
                        writer,
                        info,
                        keep_tail,
                        commit=checksum is None,
                        may_complete=not overlong,
                    ),
                    "tus commit",
                )
                if overlong:
                    raise _ends_elsewhere(info, info.offset + writer.received_bytes) from None
                if kept is None or not kept.completing or lease.released:
                    raise
                # The body broke (or stalled, or the daemon is draining) after its last
                # byte: every byte of the upload is durable, so it is complete, and a
                # client that sees Upload-Offset == Upload-Length stops.  Finish it now;
                # if that fails, the state says ``completing`` and the sweeper or the
                # client's next PATCH finishes it.
                done = await shielded(
                    self.completer.complete_leased(lease, kept, client), "tus completion"
                )
                if done is None or isinstance(e, asyncio.CancelledError):
                    raise
                return done
            if checksum is not None and writer.checksum_digest() != checksum.digest:
                await keeper.stop()
                # The chunk is dropped, but a multipart upload it created is kept for the
                # next PATCH (not orphaned until the stale sweeper finds it).
                lease.info = replace(lease.info, multipart_id=writer.multipart_id)
                await release_quietly(lease)
                mismatch = UploadChecksumMismatch(
                    f"the PATCH body does not match its {checksum.algorithm} Upload-Checksum; "
                    "it was discarded"
                )
                # The PATCH is refused (the upload lives on): a rejection, reported here
                # because its body has been read.
                self.engine.events.rejected(mismatch)
                raise mismatch
            short = None
            if complete_at_end and info.length is None:
                info = replace(info, length=info.offset + writer.received_bytes)
                lease.info = replace(lease.info, length=info.length)
            elif complete_at_end and info.offset + writer.received_bytes != info.length:
                # It ends the upload short of its length: refused once its bytes are kept,
                # as a body that breaks keeps them (the upload stays resumable).
                short = _ends_elsewhere(info, info.offset + writer.received_bytes)
            final = info.length is not None and info.offset + writer.received_bytes == info.length
            if final and not info.concat:
                await self._pre_finish(lease, info, writer, keeper, client)
            try:
                result = await writer.commit(final=final)
            except (ObjectExists, KeyConflict) as e:
                await keeper.stop()
                if not final:
                    raise
                raise await self.completer.key_taken(lease, info, e, client) from e
            except DigestMismatch as e:
                # Below one part, checked before its PutObject: nothing was stored.
                await keeper.stop()
                raise await self.completer.discard(lease, info, e, client) from None
            finally:
                await keeper.stop()
            new_info = self._apply(info, result)
            if final and not info.concat:
                # A partial that has every byte stays as it is, for a final to take.
                return await self.completer.finish(lease, new_info, result, client)
            committed = await lease.release(new_info)
            await self.delete_quietly(result.obsolete)
            log.info(
                "tus patch id=%s offset=%d bytes=%d duration_s=%.3f result=ok",
                info.id,
                committed.offset,
                writer.received_bytes,
                time.monotonic() - started,
            )
            if short is not None:
                raise short
            return committed
        except BaseException:
            await release_quietly(lease)
            raise
        finally:
            await keeper.stop()  # already stopped on every path; this makes sure of it
            writer.close()

    async def _pre_finish(
        self, lease: Lease, info: UploadInfo, writer: PatchWriter, keeper: LeaseKeeper, client: str
    ) -> None:
        """The pre-finish hook, with every byte received and nothing completed.  A refusal
        ends the upload (parts aborted, state deleted: its bytes were refused, so resuming
        it makes no sense); a hook that does not answer fails only this PATCH (503), whose
        bytes the client sends again."""
        hooks = self.engine.hooks
        if not hooks.wants("pre-finish"):
            return
        upload = replace(hook_upload(info), offset=info.offset + writer.received_bytes)
        try:
            await hooks.blocking("pre-finish", upload)
        except HookRejected as e:
            await keeper.stop()
            lease.info = replace(lease.info, multipart_id=writer.multipart_id)
            await shielded(self.terminate(lease, why=e, client=client), "tus refused upload")
            raise

    async def _salvage(
        self,
        lease: Lease,
        writer: PatchWriter,
        info: UploadInfo,
        keep_tail: bool,
        *,
        commit: bool,
        may_complete: bool = True,
    ) -> UploadInfo:
        """Commit what a failed PATCH left durable and release the lease, unless that
        brought the upload to its length (and ``may_complete``): then it is saved
        ``completing`` (lease kept)."""
        if not commit or lease.lost:
            # Nothing kept, but a multipart upload this PATCH created is, for the next one.
            return await lease.release(replace(lease.info, multipart_id=writer.multipart_id))
        final = info.length is not None and info.offset + writer.received_bytes == info.length
        result = await writer.salvage(keep_tail=keep_tail, final=final)
        kept = self._apply(info, result)
        if may_complete and kept.reached_length and not kept.pending and not info.concat:
            log.info("tus patch id=%s: the PATCH failed after its last byte", info.id)
            return await lease.save(completing(kept, result.sha256))
        committed = await lease.release(kept)
        await self.delete_quietly(result.obsolete)
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
            expires_s=self.config.expiry_s(info.created_s, self.store.clock()),
        )

    # -- finish and terminate -------------------------------------------------------------

    async def resume_completion(self, lease: Lease, client: str = "-") -> UploadInfo:
        """A PATCH on an upload whose completion was interrupted: finish it now."""
        return await self.completer.resume(lease, client)

    async def terminate(
        self, lease: Lease, *, why: ProxyError | None = None, client: str = "-"
    ) -> None:
        """Abort the upload's parts and delete its state: the upload ends with ``why``
        (by default: its client terminated it)."""
        info = lease.info
        if info.group:
            await self.concat.leave(info)  # the multipart upload is shared
        elif info.multipart_id:
            await self.engine.storage.abort_multipart(info.key, info.multipart_id)
        await self.store.delete_all(info)
        await lease.drop()
        error = why or Terminated("the upload was terminated by its client")
        if not info.concat:  # partials are not reported as uploads (see proxy.tus.concat)
            self.completer.report(info, error=error, client=client)

    # -- helpers ---------------------------------------------------------------------------

    async def delete_quietly(self, keys: tuple[str, ...]) -> None:
        # Segments no longer referenced; one left behind is removed with its upload's folder.
        for key in keys:
            try:
                await self.engine.storage.delete_object(key)
            except ProxyError as e:
                log.warning("tus: could not delete %r: %s", key, e)


def _ends_elsewhere(info: UploadInfo, end: int) -> InconsistentLength:
    """A body that says it ends the upload (IETF ``Upload-Complete: ?1``) but does not
    end at the length known before."""
    more = "more than" if end > (info.length or 0) else "only"
    return InconsistentLength(
        f"the request completes the upload at {more} {end} bytes, not its length {info.length}"
    )


async def no_bytes() -> AsyncIterator[bytes]:
    """An empty body (the sweeper finishing an upload whose every byte is durable)."""
    empty: tuple[bytes, ...] = ()
    for chunk in empty:
        yield chunk
