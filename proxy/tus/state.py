"""tus upload state kept in the bucket, so any instance sharing it can continue an upload.

Layout under ``state_prefix`` (``.tus/`` by default), one folder per upload id::

    <id>/info               JSON: length, parts, pending segments, hash state, expiry, lease
    <id>/pending-<o>-<rnd>  bytes received after the last full part, from offset <o>
    owners/<quota>/<created>-<id>
                            empty: one per unfinished upload of a principal (a client
                            address with auth off), listed to cap how many it may have
    keys/<sha256 of a key>/<id>
                            empty: an unfinished upload whose object key is the client's
    finished/<id>-<until>   JSON: the object key and owner of a completed upload whose
                            object is at the client's key, which its URL answers from
                            until <until> (unix seconds); then the sweep removes it

Every write of ``info`` is conditional (If-None-Match on creation, If-Match on the etag
read before), and every write bumps ``rev`` so two writes never share an etag.  That makes
the lease in ``info`` a lock across instances: a PATCH, DELETE or the sweeper takes it by
writing its own lease over an absent or expired one; whoever loses the write gets 423.
A lease holder writes only through its :class:`Lease`, which fails once someone else wrote.

The offset is derived (parts + pending), never stored on its own: it is exactly what the
info object says is durable, which is what HEAD must report.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from proxy.auth import ANONYMOUS, Principal
from proxy.errors import ConditionFailed, Gone, LeaseLost, Locked, NotFound, StorageError
from proxy.headers import ascii_uint
from proxy.storage import markers
from proxy.storage.base import StateStore, Storage
from proxy.tus.hash import Sha256

log = logging.getLogger(__name__)


class TusStorage(Storage, StateStore, Protocol):
    """What tus needs of a store: the core operations and the state-store capability
    (small objects, conditional writes, listing): tus state lives in the bucket."""


MAX_INFO_BYTES = 4 * 1024 * 1024  # 10000 parts of ~60 bytes of JSON, with room to spare
OWNERS = "owners/"
# keys/<sha256 of an object key>/<id>: empty, one per upload whose object key is the
# client's (outside tus.object_prefix), so owns_multipart can find its upload.
KEYS = "keys/"
# finished/<id>-<until>: what the URL of such an upload answers from once it completed.
FINISHED = "finished/"
MAX_FINISHED_BYTES = 4096  # a key (at most 1024 bytes) and a principal, as JSON
# A creation writes its marker, then its info object, within seconds; a marker this old
# without an info object is left over.
MARKER_GRACE_S = 600.0
FORMAT_VERSION = 1
ID_HEX_CHARS = 32


@dataclass(frozen=True)
class Part:
    etag: str
    size: int


@dataclass(frozen=True)
class Segment:
    key: str
    size: int


@dataclass(frozen=True)
class UploadInfo:
    id: str
    key: str
    content_type: str
    metadata_header: str  # Upload-Metadata as the client sent it, echoed by HEAD
    object_metadata: dict[str, str]
    length: int | None  # None: deferred (creation-defer-length)
    # "" until the first full part creates the multipart upload.  Parts but no multipart
    # id: the upload was stored whole by one PutObject (it ended below one part size).
    multipart_id: str
    expires_s: float
    parts: tuple[Part, ...] = ()
    pending: tuple[Segment, ...] = ()
    sha256_state: str | None = None  # proxy.tus.hash export after the parts' bytes
    sha256_hex: str | None = None  # set once the last part is in: the upload is completing
    completing: bool = False
    # Completion attempts the store refused (see TusService._complete_leased): past a few,
    # the upload is failed instead of being retried for ever.
    completion_failures: int = 0
    rev: int = 0
    lease_owner: str | None = None
    lease_until_s: float = 0.0
    created_s: float = field(default_factory=time.time)
    # Who created the upload (str of a proxy.auth.Principal); only they may touch it.
    # Info objects written before this field existed load as "anonymous": reachable
    # with auth.mode = "none" only, as when they were made (with auth on they simply
    # expire).
    principal: str = str(ANONYMOUS)
    # Whose quota the upload counts against (its marker's folder); "" for none.
    quota: str = ""
    # tus concatenation (proxy/tus/concat.py): "partial" for a partial upload, which never
    # becomes an object of its own.  ``group``: the concat group whose shared multipart
    # upload (``multipart_id``, at ``key``) holds its parts, numbered from part_base + 1;
    # "" when the partial has a multipart upload (or object) of its own.
    concat: str = ""
    group: str = ""
    part_base: int = 0
    # The whole upload's SHA-256 (hex) as its client declared it (IETF Repr-Digest):
    # completion discards an upload whose bytes have another one.
    repr_sha256: str | None = None
    # The object key is the client's (an IETF upload begun as PUT /uploads/{key}), not
    # under tus.object_prefix, so it holds no id: a claim object names the upload.
    claims_key: bool = False

    @property
    def parts_bytes(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def offset(self) -> int:
        return self.parts_bytes + sum(s.size for s in self.pending)

    @property
    def reached_length(self) -> bool:
        """Every byte is durable: the upload only has to be completed (or is completing)."""
        return self.length is not None and self.offset == self.length

    def expired(self, now_s: float) -> bool:
        # A held lease means a request is writing the upload right now (a single PATCH
        # may stream for longer than expire_after_s): that upload is live, whatever
        # expires_s says, for HEAD, for both sweepers and on every instance.
        return not self.completing and not self.leased(now_s) and now_s >= self.expires_s

    def leased(self, now_s: float) -> bool:
        return self.lease_owner is not None and now_s < self.lease_until_s

    def to_json(self) -> bytes:
        d = asdict(self)
        d["v"] = FORMAT_VERSION
        d["parts"] = [[p.etag, p.size] for p in self.parts]
        d["pending"] = [[s.key, s.size] for s in self.pending]
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> UploadInfo:
        d: dict[str, Any] = json.loads(raw)
        if d.pop("v", None) != FORMAT_VERSION:
            raise ValueError("unknown tus info format")
        d["parts"] = tuple(Part(str(e), int(n)) for e, n in d["parts"])
        d["pending"] = tuple(Segment(str(k), int(n)) for k, n in d["pending"])
        d["object_metadata"] = {str(k): str(v) for k, v in d["object_metadata"].items()}
        return cls(**d)


def valid_id(upload_id: str) -> bool:
    return len(upload_id) == ID_HEX_CHARS and all(c in "0123456789abcdef" for c in upload_id)


def new_id() -> str:
    return secrets.token_hex(ID_HEX_CHARS // 2)


_STORAGE_ID_DOMAIN = b"upload-proxy tus storage id v1\0"


def storage_id(url_id: str) -> str:
    """The id an upload is stored and logged under, from the id in its URL.

    The URL id is the upload's only secret when auth is off (and half of it when on):
    whoever holds it may continue or terminate the upload.  So it is kept nowhere: the
    state folder, the object key (``.../tus/<storage id>/<name>``), the ``tus-id``
    metadata, the quota markers and every log line carry this one-way function of it
    instead.  Anyone who can list the bucket or read the logs learns nothing they could
    put in a URL; an operator holding a client's URL finds its upload by hashing it
    (``upload-proxy tus-id URL``).  Same shape as a URL id (32 hex digits)."""
    return hashlib.sha256(_STORAGE_ID_DOMAIN + url_id.encode()).hexdigest()[:ID_HEX_CHARS]


@dataclass(eq=False)
class TusStore:
    """Reads and conditionally writes upload state; hands out leases."""

    storage: TusStorage
    prefix: str  # tus.state_prefix
    lease_s: float
    clock: Callable[[], float] = time.time

    def folder(self, upload_id: str) -> str:
        return f"{self.prefix}{upload_id}/"

    def info_key(self, upload_id: str) -> str:
        return f"{self.folder(upload_id)}info"

    def segment_key(self, upload_id: str, start: int) -> str:
        # Unique per write: a PATCH that is discarded never clobbers the segments in use.
        return f"{self.folder(upload_id)}pending-{start}-{secrets.token_hex(4)}"

    async def load(self, upload_id: str) -> tuple[UploadInfo, str] | None:
        if not valid_id(upload_id):
            return None
        got = await self.storage.get_small(self.info_key(upload_id), MAX_INFO_BYTES)
        if got is None:
            return None
        raw, etag = got
        try:
            return UploadInfo.from_json(raw), etag
        except (ValueError, KeyError, TypeError) as e:
            raise StorageError(f"tus state of {upload_id} is unreadable: {e}") from None

    async def _load_for(self, upload_id: str, by: Principal | None) -> tuple[UploadInfo, str]:
        """The upload if ``by`` may touch it (None: the proxy itself, e.g. the sweeper).

        Someone else's upload is exactly as unknown as an id that does not exist: the
        same 404 after the same S3 read, checked before expiry (410) and lease (423),
        which would confirm that the id exists."""
        loaded = await self.load(upload_id)
        if loaded is None or (by is not None and not by.owns(loaded[0].principal)):
            raise NotFound("no such upload")
        return loaded

    async def get(self, upload_id: str, *, by: Principal) -> UploadInfo:
        """The upload as HEAD sees it: 404 if unknown or not ``by``'s, 410 if expired."""
        info, _ = await self._load_for(upload_id, by)
        if info.expired(self.clock()):
            raise Gone("the upload has expired")
        return info

    async def create(self, info: UploadInfo, owner: str) -> Lease:
        leased = replace(info, lease_owner=owner, lease_until_s=self.clock() + self.lease_s)
        etag = await self.storage.put_conditional(
            self.info_key(info.id), leased.to_json(), if_none_match=True
        )
        return Lease(self, leased, etag, owner)

    async def create_unleased(self, info: UploadInfo) -> None:
        await self.storage.put_conditional(
            self.info_key(info.id), info.to_json(), if_none_match=True
        )

    async def acquire(
        self, upload_id: str, *, by: Principal | None, allow_expired: bool = False
    ) -> Lease:
        """Take the upload's lease: 404 unknown or not ``by``'s (None: the proxy itself),
        410 expired, 423 held by someone else."""
        info, etag = await self._load_for(upload_id, by)
        now = self.clock()
        if info.expired(now) and not allow_expired:
            raise Gone("the upload has expired")
        if info.leased(now):
            raise Locked("the upload is in use by another request; retry later")
        owner = secrets.token_hex(8)
        taken = replace(info, rev=info.rev + 1, lease_owner=owner, lease_until_s=now + self.lease_s)
        try:
            etag = await self.storage.put_conditional(
                self.info_key(upload_id), taken.to_json(), if_match=etag
            )
        except ConditionFailed:
            raise Locked("the upload is in use by another request; retry later") from None
        return Lease(self, taken, etag, owner)

    async def delete_all(self, info: UploadInfo) -> None:
        """Every state object of the upload; info last, so a crash half-way leaves it findable
        (a marker left behind by one is pruned by :meth:`stale_markers`)."""
        folder = self.folder(info.id)
        info_key = self.info_key(info.id)
        for obj in await self.storage.list_objects(folder):
            if obj.key != info_key:
                await self.storage.delete_object(obj.key)
        if (marker := self.marker_key(info)) is not None:
            await self.storage.delete_object(marker)
        if info.claims_key:
            await self.storage.delete_object(self.claim_key(info))
        await self.storage.delete_object(info_key)

    def claim_folder(self, key: str) -> str:
        return f"{self.prefix}{KEYS}{hashlib.sha256(key.encode()).hexdigest()}/"

    def claim_key(self, info: UploadInfo) -> str:
        return self.claim_folder(info.key) + info.id

    async def claim(self, info: UploadInfo) -> None:
        """Name the upload at its object key (see KEYS); before its info object, so a
        multipart upload of it is never unclaimed.  One left by a crash claims nothing
        (its upload has no state)."""
        await self.storage.put_conditional(self.claim_key(info), b"", if_none_match=True)

    # -- a completed upload at the client's key (see FINISHED) ---------------------------

    async def record_finished(self, info: UploadInfo, until_s: float) -> None:
        """The completed upload ``info`` (``claims_key``) is answerable by its id until
        ``until_s``: its object holds no id in its key, so nothing else leads there."""
        body = json.dumps({"key": info.key, "principal": info.principal}).encode()
        await self.storage.put_conditional(f"{self.prefix}{FINISHED}{info.id}-{int(until_s)}", body)

    async def finished_key(self, upload_id: str, by: Principal) -> str | None:
        """The object key of ``by``'s completed upload ``upload_id`` while its record
        lasts; None for an unknown id, someone else's upload or a record past its time."""
        if not valid_id(upload_id):
            return None
        now = self.clock()
        for obj in await self.storage.list_objects(f"{self.prefix}{FINISHED}{upload_id}-"):
            until_s = ascii_uint(obj.key.rpartition("-")[2])
            if until_s is None or now >= until_s:
                continue
            got = await self.storage.get_small(obj.key, MAX_FINISHED_BYTES)
            if got is None:
                continue  # swept meanwhile
            try:
                doc = json.loads(got[0])
                key, principal = str(doc["key"]), str(doc["principal"])
            except (ValueError, KeyError, TypeError):
                continue  # not one of ours
            if by.owns(principal):
                return key
        return None

    async def expired_finished(self) -> list[str]:
        """Records of completed uploads past their time (see FINISHED), for the sweep."""
        now = self.clock()
        expired = []
        for obj in await self.storage.list_objects(f"{self.prefix}{FINISHED}"):
            until_s = ascii_uint(obj.key.rpartition("-")[2])
            if until_s is not None and now >= until_s:
                expired.append(obj.key)
        return expired

    # -- quota: unfinished uploads per principal ---------------------------------------------

    def quota_folder(self, quota: str) -> str:
        return f"{self.prefix}{OWNERS}{quota}/"

    def marker_key(self, info: UploadInfo) -> str | None:
        if not info.quota:
            return None
        return f"{self.quota_folder(info.quota)}{int(info.created_s)}-{info.id}"

    async def reserve(self, info: UploadInfo, limit: int) -> bool:
        """Count ``info`` against its quota; False, and nothing kept, if that makes more
        than ``limit`` unfinished uploads (:func:`proxy.storage.markers.reserve`: the cap
        holds across instances, however many race)."""
        marker = self.marker_key(info)
        assert marker is not None
        return await markers.reserve(self.storage, self.quota_folder(info.quota), marker, limit)

    async def quota_used(self, quota: str) -> int:
        """How many uploads count against ``quota`` now (unfinished ones)."""
        return len(await self.storage.list_objects(self.quota_folder(quota)))

    async def stale_markers(self, live_ids: set[str]) -> list[str]:
        """Markers whose upload has no state (a crash between the marker and the info, or
        in the middle of :meth:`delete_all`), older than :data:`MARKER_GRACE_S` so that a
        creation in progress (marker written, info not yet) is never among them."""
        stale = []
        now = self.clock()
        for obj in await self.storage.list_objects(f"{self.prefix}{OWNERS}"):
            created, _, upload_id = obj.key.rpartition("/")[2].partition("-")
            created_s = ascii_uint(created)
            if upload_id in live_ids or created_s is None:
                continue
            if now - created_s > MARKER_GRACE_S:
                stale.append(obj.key)
        return stale

    async def list_ids(self) -> list[str]:
        ids = []
        for obj in await self.storage.list_objects(self.prefix):
            rest = obj.key[len(self.prefix) :]
            upload_id, _, name = rest.partition("/")
            if name == "info" and valid_id(upload_id):
                ids.append(upload_id)
        return ids

    async def owns_multipart(self, key: str, multipart_id: str) -> bool:
        """Is S3 multipart upload ``multipart_id`` at ``key`` owned by a live tus upload?

        For a stale-multipart sweeper: False means no live tus upload will ever complete
        it.  An upload being written (lease held) is live even past its expiry (see
        :meth:`UploadInfo.expired`).  tus object keys always hold the tus id as a whole
        path segment (``<key_prefix><id>[/<filename>]``), so this reads at most a few
        info objects.  Storage errors propagate: "cannot tell" must not be taken for "no".
        Multipart uploads are created lazily by a PATCH and their id saved after: one a
        crashed PATCH created but never saved is not claimed, and so is swept."""
        now = self.clock()
        candidates = [segment for segment in key.split("/") if valid_id(segment)]
        if not candidates:  # a client's key: the uploads that claimed it, if any
            claims = await self.storage.list_objects(self.claim_folder(key))
            candidates = [c.key.rpartition("/")[2] for c in claims]
        for segment in candidates:
            loaded = await self.load(segment)
            if loaded is None:
                continue
            info = loaded[0]
            if info.multipart_id == multipart_id:
                return not info.expired(now)
            if not info.multipart_id and info.leased(now):
                # A PATCH is running and may have just created this multipart upload (its
                # id is saved at the next lease renewal): cannot tell yet, so claim it.
                return True
        return False


class Lease:
    """The right to change one upload, until ``lease_s`` after the last write."""

    def __init__(self, store: TusStore, info: UploadInfo, etag: str, owner: str) -> None:
        self.store = store
        self.info = info
        self._etag = etag
        self.owner = owner
        self._lock = asyncio.Lock()  # renewal and the final write must not interleave
        self.lost = False
        self.released = False

    def fenced(self) -> bool:
        """Must this holder stop starting writes to the upload's parts?  Yes once the lease
        was taken over, and also once less than a third of it is left: renewals are then
        failing (the keeper renews every third), at its end another request may take the
        upload over, and a part started now could land after that, over the new holder's
        part of the same number.  Judged on our clock against the deadline we wrote."""
        if self.lost or self.released:
            return True
        return self.store.clock() >= self.info.lease_until_s - self.store.lease_s / 3

    async def save(self, info: UploadInfo, *, keep: bool = True) -> UploadInfo:
        """Write ``info``, our lease renewed (dropped unless ``keep``); return what was written."""
        async with self._lock:
            if self.lost:
                raise LeaseLost("the upload was taken over by another request")
            if self.released:
                raise RuntimeError("lease already released")
            now = self.store.clock()
            new = replace(
                info,
                rev=self.info.rev + 1,
                lease_owner=self.owner if keep else None,
                lease_until_s=now + self.store.lease_s if keep else 0.0,
            )
            try:
                self._etag = await self.store.storage.put_conditional(
                    self.store.info_key(info.id), new.to_json(), if_match=self._etag
                )
            except ConditionFailed:
                self.lost = True
                raise LeaseLost("the upload was taken over by another request") from None
            self.info = new
            self.released = not keep
            return new

    async def release(self, info: UploadInfo | None = None) -> UploadInfo:
        return await self.save(info or self.info, keep=False)

    async def drop(self) -> None:
        """The upload is gone (completed or terminated): nothing more to write."""
        async with self._lock:
            self.released = True


async def release_quietly(lease: Lease) -> None:
    """Give the lease back on a failure path; if that fails it simply expires."""
    if lease.released or lease.lost:
        return
    try:
        await asyncio.shield(lease.release())
    except asyncio.CancelledError:
        raise
    except Exception as e:
        log.warning("could not release the lease on tus upload %s: %s", lease.info.id, e)


class DurableParts(Protocol):
    """What the lease keeper checkpoints: a running PATCH writer's stored parts."""

    @property
    def multipart_id(self) -> str: ...

    def durable(self) -> tuple[tuple[Part, ...], Sha256 | None]: ...


class LeaseKeeper:
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
        writer: DurableParts,
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
            pushed = self._expiry(info.created_s, self._lease.store.clock())
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
