"""tus ``concatenation``: parallel partial uploads made into one object without a copy.

A client (tus-js-client's ``parallelUploads``) splits a file into slices, uploads each
as a *partial* upload (``Upload-Concat: partial``) on its own connection, then creates
the *final* upload naming the partials in file order (``Upload-Concat: final;<url>
<url>...``).  Peers (tusd's s3store, @tus/s3-store) store each partial as an object of
its own and build the final by ``UploadPartCopy`` (or by downloading and re-uploading
small ones): a copy of every byte, done while the client waits for the final's answer.

Here the partials of one file share ONE S3 multipart upload, each on its own range of
part numbers, so the final is a single ``CompleteMultipartUpload``:

* **Groups.**  The position of a partial in the final is unknown when it is created;
  only the order of arrival is known.  tus-js-client starts every partial's creation at
  the same moment, in file order.  So partial creations of one principal with the same
  partial ``Upload-Metadata`` (tus-js-client's ``metadataForPartialUploads``) that
  arrive within :data:`GROUP_WINDOW_S` of the first join that principal's open *group*,
  in the order they reach this instance (a FIFO lock taken before the handler's first
  await): each gets the next ``ceil(length / part_size)`` part numbers of the group's
  multipart upload (created with the group, at the key the final object will have).
  Part numbers only have to ascend in the Complete list and may have gaps, so each
  partial writes its parts as they come, in parallel, with no coordination after that.
* **Aligned final.**  When the final names exactly the members of one group, in the
  order of their ranges, and every partial but the last is a multiple of the part size
  (tus-js-client's ``parallelUploadBoundaries`` on part-size multiples), the final is
  one CompleteMultipartUpload of the recorded parts: no byte is copied or re-read for
  it.  A partial whose length is not a multiple of the part size closes its group (it
  can only be last); a group's ranges never pass part 10000.
* **Fallback (server-side copy).**  Otherwise (unaligned boundaries, another order,
  partials of several groups or instances, a group shared by two files) each partial
  becomes a source object without a byte through the proxy: a partial of its own is
  completed at a hidden key under ``tus.state_prefix``; a group is completed whole
  (one Complete, ascending part numbers) at its key once all its members have every
  byte (before that: 423, retry).  The final is then a new multipart upload made of
  ``UploadPartCopy`` ranges of those sources (the store copies).  S3 wants every part
  but the last to be >= 5 MiB, so every partial but the last must be (400 otherwise).
* **SHA-256.**  Parts arrive out of order, but the first partial (file offset 0) keeps
  the resumable SHA-256 state of its bytes (:mod:`proxy.tus.hash`), like any tus upload.
  After completion that state is continued over a ranged read of the rest of the final
  object (1 MiB at a time: bounded memory), so the object's ``sha256`` is exact.  That
  read is the one pass over the data the final costs (measured in the README).
* **The final's URL.**  HEAD of a completed final finds its object by the folder its
  storage id names, so the final's URL id must hash to the group's id, which is chosen
  when the group is made.  The final's URL id is therefore derived from the first
  partial's URL id (:func:`final_url_id`; the group id is its storage id): whoever holds
  the first partial's URL can compute the final's, both secrets of the same principal.
  A fallback final gets a fresh random id.
* **Ownership, limits, expiry.**  Partials are tus uploads like any other (the principal's
  cap on unfinished uploads, expiry, DELETE); a final may only name its principal's
  partials (anyone else's id is the 404 of an unknown one).  Partials are never reported
  as uploads nor become objects of their own; the final is reported once, as an upload
  created and finished (:mod:`proxy.engine.events`).  A partial deleted or expired
  leaves its group; the last one out aborts the group's multipart upload.

Limits: groups live in one instance's memory (partials of one file spread over several
instances without sticky sessions take the copy path); the ranking is the order in which
creations reach the handler, so creations that overtake each other on the way (they are
sent at the same instant on separate connections) also take the copy path; two files
uploaded in parallel by one principal at the same moment with the same partial metadata
share a group and both take the copy path (the second final possibly after a 423).  The
final's assembly holds the partials' leases and does not renew them, so a final whose
read-back outlasts ``tus.lock_lease_s`` may race a concurrent retry of the same final
(both build the same object; create-only completion lets one win).  An aligned final's
key is fixed when its group is made (a pre-create hook's or key template's name applies
to a copied final only); no pre-finish hook runs for a final; upload links refuse
concatenation (their per-file caps would be checked before the size is known).  A crash
between an aligned final's completion and its labelling leaves the object without its
``sha256`` until the client retries the final (the partials' state is still there).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from proxy.config import TusConfig
from proxy.engine.context import Engine
from proxy.engine.hashing import off_loop
from proxy.engine.upload import label
from proxy.errors import (
    BadConcat,
    ConditionFailed,
    Locked,
    NotFound,
    PartialUnfinished,
    ProxyError,
    StorageError,
    TooLarge,
)
from proxy.storage.base import CompletedPart, ObjectReader, PartCopier, multipart_etag
from proxy.tus.completion import EMPTY_SHA256, Completer
from proxy.tus.hash import new_sha256, resume_sha256
from proxy.tus.state import Lease, Part, TusStore, UploadInfo, release_quietly, storage_id

log = logging.getLogger(__name__)

HEADER = "Upload-Concat"
PARTIAL = "partial"
FINAL = "final"
# Partial creations of one principal this close to their group's first join it.
GROUP_WINDOW_S = 10.0
MAX_PART_NUMBER = 10_000
S3_MIN_PART_BYTES = 5 * 1024 * 1024
COPY_PART_BYTES = 1024**3  # one UploadPartCopy per GiB of a source (S3 allows 5 GiB)
READ_CHUNK_BYTES = 1024 * 1024
MAX_GROUP_BYTES = 1024 * 1024
CONCAT_METADATA = "tus-concat"  # "final" on a final upload's object
_FINAL_DOMAIN = b"upload-proxy tus concat final v1\0"


@dataclass(frozen=True)
class ConcatHeader:
    kind: str  # PARTIAL or FINAL
    url_ids: tuple[str, ...] = ()  # FINAL: the partials' URL ids, in file order


def parse_header(value: str | None, base_path: str) -> ConcatHeader | None:
    """``Upload-Concat``: ``partial``, or ``final;`` and the partials' URLs (absolute or
    paths, space separated) under ``base_path``."""
    if value is None:
        return None
    value = value.strip()
    if value == PARTIAL:
        return ConcatHeader(PARTIAL)
    kind, sep, rest = value.partition(";")
    if kind.strip() != FINAL or not sep:
        raise BadConcat("Upload-Concat must be 'partial' or 'final;<url> <url>...'")
    ids = []
    for url in rest.split():
        path = urlsplit(url).path
        if not path.startswith(base_path) or "/" in path[len(base_path) :]:
            raise BadConcat(f"Upload-Concat names {url!r}, which is not an upload of {base_path}")
        ids.append(path[len(base_path) :])
    if not ids:
        raise BadConcat("Upload-Concat: final names no partial upload")
    if len(set(ids)) != len(ids):
        raise BadConcat("Upload-Concat: final names a partial upload twice")
    return ConcatHeader(FINAL, tuple(ids))


def final_url_id(first_partial_url_id: str) -> str:
    """The URL id of the aligned final whose first partial has this URL id."""
    return hashlib.sha256(_FINAL_DOMAIN + first_partial_url_id.encode()).hexdigest()[:32]


def group_id(first_partial_url_id: str) -> str:
    """The group id (= the aligned final's storage id) a first partial founds."""
    return storage_id(final_url_id(first_partial_url_id))


@dataclass
class Group:
    """A shared multipart upload and the partials on it; ``{state_prefix}{id}/group``."""

    id: str
    key: str
    multipart_id: str
    created_s: float
    next_part: int = 1  # the first free part number
    closed: bool = False  # a member of unaligned length joined: it must be last
    # member storage id -> [first part number, part count, length]
    members: dict[str, list[int]] = field(default_factory=dict)
    # Once completed whole for the copy fallback: the object's etag, and each member's
    # byte offset in it.
    assembled_etag: str = ""
    offsets: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Group:
        d: dict[str, Any] = json.loads(raw)
        return cls(**d)


@dataclass(frozen=True)
class Placement:
    """Where a new partial's bytes go."""

    key: str
    multipart_id: str = ""
    group: str = ""
    part_base: int = 0


@dataclass
class _Open:
    group: str
    opened: float  # monotonic


@dataclass(eq=False)
class ConcatService:
    """Partial placement, the final's assembly, and partials leaving their group."""

    config: TusConfig
    engine: Engine
    store: TusStore
    completer: Completer
    object_key: Callable[..., str]
    _open: dict[tuple[str, str, str], _Open] = field(init=False, default_factory=dict)
    _locks: dict[tuple[str, str, str], asyncio.Lock] = field(init=False, default_factory=dict)

    @property
    def supported(self) -> bool:
        """Advertised only where the store can do the fallback (and the read-back)."""
        storage = self.engine.storage
        return isinstance(storage, PartCopier) and isinstance(storage, ObjectReader)

    @property
    def part_size(self) -> int:
        return self.engine.settings.part_size_bytes

    def group_key(self, group: str) -> str:
        return f"{self.store.folder(group)}group"

    def data_key(self, upload_id: str) -> str:
        """A partial of its own keeps its bytes here: hidden, removed with its state."""
        return f"{self.store.folder(upload_id)}data"

    # -- partials ---------------------------------------------------------------------

    @asynccontextmanager
    async def arrival(self, quota: str, metadata: str, under: str) -> AsyncIterator[None]:
        """Rank partial creations in arrival order: enter before the handler's first await
        (asyncio.Lock is FIFO and taken at once when free)."""
        k = (quota, metadata, under)
        if len(self._locks) > 1000:  # bounded: drop the idle ones
            self._locks = {key: lk for key, lk in self._locks.items() if lk.locked()}
        lock = self._locks.setdefault(k, asyncio.Lock())
        async with lock:
            yield

    async def place(
        self, url_id: str, upload_id: str, length: int, quota: str, metadata: str, under: str,
        owner_metadata: dict[str, str],
    ) -> Placement:  # fmt: skip
        """Under :meth:`arrival`: the group range (or own key) of a new partial."""
        own = Placement(self.data_key(upload_id))
        nparts = math.ceil(length / self.part_size)
        if not nparts or nparts > MAX_PART_NUMBER:
            return own
        k = (quota, metadata, under)
        now = time.monotonic()
        self._open = {x: o for x, o in self._open.items() if now - o.opened <= GROUP_WINDOW_S}
        cur = self._open.get(k)
        if cur is not None and now - cur.opened <= GROUP_WINDOW_S:
            joined = await self._join(cur.group, upload_id, nparts, length)
            if joined is not None:
                return joined
        # Found a new group: its id is the storage id of the final whose first partial
        # this one is (see final_url_id).
        gid = group_id(url_id)
        key = self.object_key(gid, None, "", under=under)
        mpu = await self.engine.storage.create_multipart(
            key, metadata=owner_metadata, content_type="application/octet-stream"
        )
        group = Group(gid, key, mpu, self.store.clock())
        self._add(group, upload_id, nparts, length)
        try:
            await self.store.storage.put_conditional(
                self.group_key(gid), group.to_json(), if_none_match=True
            )
        except BaseException:
            await asyncio.shield(self.engine.storage.abort_multipart(key, mpu))
            raise
        self._open[k] = _Open(gid, now)
        return Placement(key, mpu, gid, 0)

    def _add(self, group: Group, upload_id: str, nparts: int, length: int) -> int:
        first = group.next_part
        group.members[upload_id] = [first, nparts, length]
        group.next_part = first + nparts
        if length % self.part_size:
            group.closed = True
        return first

    async def _join(self, gid: str, upload_id: str, nparts: int, length: int) -> Placement | None:
        for _ in range(3):
            loaded = await self._load_group(gid)
            if loaded is None:
                return None
            group, etag = loaded
            if group.closed or group.assembled_etag:
                return None
            if group.next_part + nparts - 1 > MAX_PART_NUMBER:
                return None
            first = self._add(group, upload_id, nparts, length)
            try:
                await self.store.storage.put_conditional(
                    self.group_key(gid), group.to_json(), if_match=etag
                )
            except ConditionFailed:
                continue  # a member left meanwhile: read again
            return Placement(group.key, group.multipart_id, gid, first - 1)
        return None

    async def _load_group(self, gid: str) -> tuple[Group, str] | None:
        got = await self.store.storage.get_small(self.group_key(gid), MAX_GROUP_BYTES)
        if got is None:
            return None
        try:
            return Group.from_json(got[0]), got[1]
        except (ValueError, TypeError) as e:
            raise StorageError(f"concat group {gid} is unreadable: {e}") from None

    async def leave(self, info: UploadInfo) -> None:
        """A grouped partial goes (deleted, expired, or consumed by a final): off the
        member list; the last one out removes the group's multipart upload (or the object
        it was completed to) and the group's state."""
        await self._leave(info.group, (info.id,))

    async def abandon(self, gid: str, upload_id: str) -> None:
        """A partial placed in a group whose creation then failed."""
        await self._leave(gid, (upload_id,))

    async def _leave(self, gid: str, ids: tuple[str, ...]) -> None:
        storage = self.store.storage
        for _ in range(5):
            loaded = await self._load_group(gid)
            if loaded is None:
                return
            group, etag = loaded
            for upload_id in ids:
                group.members.pop(upload_id, None)
            try:
                if group.members:
                    await storage.put_conditional(
                        self.group_key(gid), group.to_json(), if_match=etag
                    )
                    return
                if group.assembled_etag:
                    try:
                        await storage.delete_object(group.key, if_match=group.assembled_etag)
                    except ConditionFailed:
                        pass  # the aligned final's object is there now: it stays
                else:
                    await storage.abort_multipart(group.key, group.multipart_id)
                await storage.delete_object(self.group_key(gid))
                self._forget(gid)
                return
            except ConditionFailed:
                continue
        log.warning("tus concat group %s: could not record that members left", gid)

    def _forget(self, gid: str) -> None:
        self._open = {k: v for k, v in self._open.items() if v.group != gid}

    async def owns_multipart(self, key: str, multipart_id: str) -> bool:
        """For the stale-multipart sweeper: is this a group's upload with a live member?"""
        for segment in key.split("/"):
            loaded = await self._load_group(segment) if len(segment) == 32 else None
            if loaded is None or loaded[0].multipart_id != multipart_id:
                continue
            now = self.store.clock()
            for member in loaded[0].members:
                got = await self.store.load(member)
                if got is not None and not got[0].expired(now):
                    return True
        return False

    # -- the final --------------------------------------------------------------------

    async def finalize(
        self,
        header: ConcatHeader,
        final: UploadInfo,
        url_id: str,
        *,
        by: Any,
        client: str,
    ) -> tuple[str, UploadInfo]:
        """Make the final upload from the partials ``header`` names; its URL id and its
        info (``completing``, with ``sha256_hex``).  ``final`` carries the key, metadata
        and principal a creation would have given it, ``url_id`` its fresh URL id (the
        copy fallback keeps both; an aligned final is the group's, see module doc)."""
        leases: list[Lease] = []
        try:
            for partial in header.url_ids:
                # Someone else's partial, or not a partial: the 404 of an unknown id.
                lease = await self.store.acquire(storage_id(partial), by=by)
                leases.append(lease)
                if lease.info.concat != PARTIAL:
                    raise NotFound("no such partial upload")
                if not lease.info.reached_length or lease.info.pending:
                    raise PartialUnfinished(
                        "a partial upload named by Upload-Concat has not received all its "
                        "bytes; finish it first"
                    )
            infos = [lease.info for lease in leases]
            total = sum(i.offset for i in infos)
            if total > self.engine.max_upload_size_bytes:
                raise TooLarge(
                    f"the partial uploads add up to more than {self.engine.max_upload_size_bytes}"
                    " bytes"
                )
            if any(i.offset < S3_MIN_PART_BYTES for i in infos[:-1]):
                raise BadConcat(
                    f"every partial upload but the last must have at least {S3_MIN_PART_BYTES} "
                    "bytes (the store's smallest part)"
                )
            started = time.monotonic()
            aligned = await self._aligned(header, infos)
            if aligned is not None:
                url_id = final_url_id(header.url_ids[0])
                final = replace(final, id=aligned.id, key=aligned.key)
                etag = await self._complete_aligned(aligned, infos, total)
            else:
                etag = await self._copy(infos, final, total)
            final = replace(
                final,
                object_metadata={
                    **final.object_metadata,
                    "tus-id": final.id,
                    CONCAT_METADATA: FINAL,
                },
                length=total,
                parts=(Part(etag, total),),
                created_s=min(i.created_s for i in infos),
            )
            sha256 = await continue_sha256(self.engine.storage, infos[0], final.key, etag, total)
            if total:
                await label(
                    self.engine.storage,
                    final.key,
                    etag=etag,
                    size=total,
                    metadata={**final.object_metadata, "sha256": sha256},
                    content_type=final.content_type,
                )
            done = replace(final, completing=True, sha256_hex=sha256)
            await self.completer.record_finish(done)
            await self._consume(leases, infos, aligned)
            log.info(
                "tus concat final id=%s partials=%d bytes=%d path=%s duration_s=%.3f",
                final.id, len(infos), total, "aligned" if aligned else "copy",
                time.monotonic() - started,
            )  # fmt: skip
            self.engine.events.created()
            self.completer.report(done, sha256=sha256, client=client)
            return url_id, done
        finally:
            for lease in leases:
                await release_quietly(lease)

    async def _aligned(self, header: ConcatHeader, infos: list[UploadInfo]) -> Group | None:
        """The group the final can be completed from as it is, or None (copy fallback)."""
        gid = infos[0].group
        if not gid or any(i.group != gid for i in infos):
            return None
        if gid != group_id(header.url_ids[0]):
            return None  # the first named partial did not found the group: not its start
        loaded = await self._load_group(gid)
        if loaded is None or loaded[0].assembled_etag:
            return None
        group = loaded[0]
        if set(group.members) != {i.id for i in infos}:
            return None  # other partials share it: completing would drop their parts
        bases = [i.part_base for i in infos]
        if bases != sorted(bases):
            return None
        if any(i.offset % self.part_size for i in infos[:-1]):
            return None
        return group

    async def _check_parts(self, key: str, mpu: str, parts: list[tuple[int, Part]]) -> None:
        stored = {
            (p.number, p.etag.strip('"'), p.size)
            for p in await self.engine.storage.list_parts(key, mpu)
        }
        for number, part in parts:
            if (number, part.etag.strip('"'), part.size) not in stored:
                raise StorageError(f"the store no longer holds part {number} as it was received")

    async def _complete_group(
        self, key: str, mpu: str, parts: list[tuple[int, Part]], total: int, final_id: str = ""
    ) -> str:
        """One CompleteMultipartUpload of ``parts`` (numbers ascending); after an attempt
        whose answer was lost (or a crash after it), the object there is ours if it has
        our size and the ETag our parts make, or (``final_id``) it was labelled as that
        final already (only this code writes a tus id under the tus prefix)."""
        storage = self.engine.storage
        completed = [CompletedPart(n, p.etag) for n, p in parts]
        try:
            await self._check_parts(key, mpu, parts)
            return await storage.complete_multipart(
                key, mpu, completed, if_none_match=True, size_bytes=total
            )
        except ProxyError:
            obj = await storage.head(key)
            if obj is not None and obj.size == total:
                if obj.etag.strip('"') == multipart_etag(completed):
                    return obj.etag
                if final_id and obj.metadata.get("tus-id") == final_id:
                    return obj.etag
            raise

    async def _complete_aligned(self, group: Group, infos: list[UploadInfo], total: int) -> str:
        parts = [
            (info.part_base + n, part)
            for info in infos
            for n, part in enumerate(info.parts, start=1)
        ]
        return await self._complete_group(group.key, group.multipart_id, parts, total, group.id)

    async def _sources(self, infos: list[UploadInfo]) -> list[tuple[str, str, int, int]]:
        """Each partial as (object key, etag, first byte, length) of a stored object."""
        storage = self.engine.storage
        out = []
        for info in infos:
            if not info.offset:
                continue
            if info.group:
                group = await self._assemble(info.group)
                out.append((group.key, group.assembled_etag, group.offsets[info.id], info.offset))
            elif info.multipart_id:
                parts = list(enumerate(info.parts, start=1))
                etag = await self._complete_group(info.key, info.multipart_id, parts, info.offset)
                out.append((info.key, etag, 0, info.offset))
            else:
                obj = await storage.head(info.key)
                if obj is None or obj.size != info.offset:
                    raise StorageError("a partial upload's bytes are not as recorded")
                out.append((info.key, obj.etag, 0, info.offset))
        return out

    async def _assemble(self, gid: str) -> Group:
        """The group completed whole (ascending part numbers) for the copy fallback;
        only once every member has all its bytes (it would drop the others' parts)."""
        loaded = await self._load_group(gid)
        if loaded is None:
            raise StorageError("a partial upload's group is gone")
        group, etag = loaded
        if group.assembled_etag:
            return group
        members = sorted(group.members.items(), key=lambda m: m[1][0])
        parts: list[tuple[int, Part]] = []
        offsets: dict[str, int] = {}
        pos = 0
        for member, _ in members:
            got = await self.store.load(member)
            if got is None:
                raise StorageError("a member of a partial upload's group is gone")
            info = got[0]
            if not info.reached_length or info.pending:
                raise Locked(
                    "other partial uploads share storage with these and are unfinished; "
                    "retry once they are done",
                    headers={"Retry-After": "5"},
                )
            offsets[member] = pos
            pos += info.offset
            parts += [(info.part_base + n, p) for n, p in enumerate(info.parts, start=1)]
        group.assembled_etag = await self._complete_group(group.key, group.multipart_id, parts, pos)
        group.offsets = offsets
        await self.store.storage.put_conditional(
            self.group_key(gid), group.to_json(), if_match=etag
        )
        return group

    async def _copy(self, infos: list[UploadInfo], final: UploadInfo, total: int) -> str:
        """The fallback: the final as a new multipart upload of server-side copies."""
        storage = self.engine.storage
        if not total:
            await self.completer.put_empty(final.key, final.content_type, final.object_metadata)
            head = await storage.head(final.key)
            return head.etag if head is not None else ""
        if not isinstance(storage, PartCopier):
            raise StorageError("this store cannot copy parts")
        sources = await self._sources(infos)
        mpu = await storage.create_multipart(
            final.key, metadata=final.object_metadata, content_type=final.content_type
        )
        try:
            completed: list[CompletedPart] = []
            for key, etag, first, length in sources:
                pieces = max(1, math.ceil(length / COPY_PART_BYTES))
                step = math.ceil(length / pieces)
                for start in range(0, length, step):
                    end = min(start + step, length) - 1
                    number = len(completed) + 1
                    part_etag = await storage.copy_part(
                        final.key, mpu, number, source=key, source_etag=etag,
                        first_byte=first + start, last_byte=first + end,
                    )  # fmt: skip
                    completed.append(CompletedPart(number, part_etag))
            return await storage.complete_multipart(
                final.key, mpu, completed, if_none_match=True, size_bytes=total
            )
        except BaseException:
            await asyncio.shield(storage.abort_multipart(final.key, mpu))
            raise

    async def _consume(
        self, leases: list[Lease], infos: list[UploadInfo], aligned: Group | None
    ) -> None:
        """The partials are in the final: their state goes (and their hidden objects, and
        their quota markers); groups lose them as members."""
        groups: dict[str, list[str]] = {}
        for lease, info in zip(leases, infos, strict=True):
            if info.group:
                groups.setdefault(info.group, []).append(info.id)
            await self.store.delete_all(info)
            await lease.drop()
        if aligned is not None:
            # Its multipart upload is the final's object now: only the state goes.
            await self.store.storage.delete_object(self.group_key(aligned.id))
            self._forget(aligned.id)
            return
        for gid, ids in groups.items():
            await self._leave(gid, tuple(ids))


async def continue_sha256(
    storage: object, first: UploadInfo, key: str, etag: str, total: int
) -> str:
    """The SHA-256 of the final object ``key`` (``etag``, ``total`` bytes): the first
    partial's saved state, continued over a ranged read of the rest (1 MiB chunks,
    hashed in a worker thread: bounded memory); the whole object if that state is lost."""
    if not total:
        return EMPTY_SHA256
    h = resume_sha256(first.sha256_state, first.offset)
    start = first.offset
    if h.digest() is None:
        h, start = new_sha256(), 0
    if start < total:
        assert isinstance(storage, ObjectReader)
        async for chunk in storage.read_range(
            key, first_byte=start, last_byte=total - 1, etag=etag, chunk_bytes=READ_CHUNK_BYTES
        ):
            await off_loop(functools.partial(h.update, chunk), len(chunk), in_thread=True)
    digest = h.digest()
    assert digest is not None
    return digest.hex()
