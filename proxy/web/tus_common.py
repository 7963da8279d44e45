"""What the protocols on the tus endpoint share on the HTTP side.

tus 1.0 (:mod:`proxy.web.tus`, with its concatenation extension
:mod:`proxy.web.tus_concat`) and the IETF draft (:mod:`proxy.web.resumable`) each create
and write a :class:`~proxy.tus.service.TusService` upload that either can reach later, so
they share the route state (:data:`TUS`), the guards (who may touch an upload), the URL
id, the new upload made from ``Upload-Metadata``, the pre-create hook, writing a body, a
completed upload's object, and DELETE (:func:`terminate`, the one handler here).
:func:`upload_headers` is tus's own, used by its core and concatenation.  What a
completion records (its post-finish, its content in the index of instant uploads, the
record a resumable PUT's URL answers from) is the tus layer's, where every completion passes
(:meth:`~proxy.tus.completion.Completer.record_finish`), not the handlers'.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from urllib.parse import quote

from aiohttp import web

from proxy.auth import Grant, Principal
from proxy.config import TusConfig
from proxy.engine.dedup import OWNER_METADATA as CONTENT_OWNER_METADATA
from proxy.errors import BadMetadata, Cancelled, NotFound, ProxyError, SignedUrlNotForTus
from proxy.hooks.payload import HookRequest, HookUpload
from proxy.storage.base import ObjectInfo
from proxy.tus import finished
from proxy.tus.finished import OWNER_METADATA
from proxy.tus.service import Checksum, NewUpload, TusService
from proxy.tus.state import Lease, UploadInfo, new_id, release_quietly, storage_id, valid_id
from proxy.web.errors import LOG_PATH
from proxy.web.hookreq import hook_metadata, hook_request
from proxy.web.preflight import UPLOADS, authorize, request_client, streaming

log = logging.getLogger(__name__)

# Hex SHA-256 of the whole object, on answers about a complete(-ing) upload.
SHA256_HEADER = "Upload-SHA256"
MAX_METADATA_HEADER_BYTES = 8 * 1024
# S3 allows 2 KiB of user metadata; keep room for our sha256 entry.
MAX_OBJECT_METADATA_BYTES = 1800
_METADATA_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MIME_RE = re.compile(r"[A-Za-z0-9][\w.+-]*/[\w.+-]+(\s*;\s*[\w.+-]+=[\w.+\"-]+)*")


@dataclass(frozen=True)
class TusRoutes:
    """What the tus handlers use (the app sets it once the store is open)."""

    config: TusConfig
    service: TusService


TUS = web.AppKey("tus", TusRoutes)


def service(request: web.Request) -> TusService:
    """The upload service behind the endpoint."""
    return request.app[TUS].service


def upload_id_of(request: web.Request) -> str:
    """The storage id of the upload the URL names (see :func:`storage_id`); an id that
    cannot be one is the 404 of an unknown upload."""
    url_id = request.match_info["id"]
    if not valid_id(url_id):
        raise NotFound("no such upload")
    return storage_id(url_id)


def log_by_storage_id(request: web.Request, base_path: str) -> None:
    """Error lines name the upload by its storage id, never by the URL id (a secret)."""
    url_id = request.match_info["id"]
    shown = storage_id(url_id) if valid_id(url_id) else "<not an upload id>"
    request[LOG_PATH] = base_path + shown


# -- who may touch an upload ------------------------------------------------------------


def guard(request: web.Request) -> Grant:
    """Who may touch tus uploads: the same credentials as plain uploads, checked before
    any body byte.  Signed URLs are bound to one method and one key, which tus (POST,
    then PATCHes to a URL we choose) cannot honour: tus takes bearer tokens.

    Whose upload: the grant's principal is recorded at creation, and every later request
    (HEAD, PATCH, DELETE, the method-override POST) passes it to the state store, which
    answers someone else's upload with the 404 of an unknown id (``TusStore._load_for``).
    With auth off every request is "anonymous": whoever holds the id may touch it."""
    grant = authorize(request)
    if grant.via == "signed":
        raise SignedUrlNotForTus("signed URLs are for /uploads; tus uploads take a bearer token")
    return grant


def guard_body(request: web.Request) -> Grant:
    """As :func:`guard`, for requests that carry a body: also memory admission."""
    grant = guard(request)
    request.app[UPLOADS].admit()
    return grant


# -- a new upload -----------------------------------------------------------------------


def parse_metadata(header: str) -> dict[str, bytes]:
    """``Upload-Metadata``: comma-separated ``key base64value`` (value optional), keys unique."""
    if len(header) > MAX_METADATA_HEADER_BYTES:
        raise BadMetadata("Upload-Metadata is too long")
    out: dict[str, bytes] = {}
    if not header.strip():
        return out
    for pair in header.split(","):
        fields = pair.strip().split(" ")
        key = fields[0]
        if not key or len(fields) > 2 or not key.isascii() or not key.isprintable():
            raise BadMetadata(f"malformed Upload-Metadata pair {pair.strip()!r}")
        if key in out:
            raise BadMetadata(f"Upload-Metadata key {key!r} repeated")
        try:
            out[key] = base64.b64decode(fields[1], validate=True) if len(fields) == 2 else b""
        except (binascii.Error, ValueError):
            raise BadMetadata(f"Upload-Metadata value of {key!r} is not base64") from None
    return out


def _header_safe(value: str) -> str:
    """S3 metadata travels in HTTP headers: printable ASCII as is, the rest percent-encoded."""
    if value.isascii() and value.isprintable() and "%" not in value:
        return value
    return quote(value, safe=" !\"#$&'()*+,-./:;<=>?@[]^_`{|}~")


def new_upload(
    ctx: TusService,
    header: str,
    length: int | None,
    principal: Principal,
    quota: str,
    under: str = "",
) -> NewUpload:
    """Key (in the folder ``under``, an upload link's prefix), content type and object
    metadata from ``Upload-Metadata``."""
    meta = parse_metadata(header)
    text = {k: v.decode("utf-8", errors="replace") for k, v in meta.items()}
    filename = text.get("filename") or text.get("name")
    ctype = text.get("filetype") or text.get("type") or ""
    if not (_MIME_RE.fullmatch(ctype) and len(ctype) <= 255):
        ctype = "application/octet-stream"
    url_id = new_id()
    upload_id = storage_id(url_id)
    obj_meta = {
        k.lower(): _header_safe(v) for k, v in text.items() if _METADATA_KEY_RE.fullmatch(k)
    }
    obj_meta["tus-id"] = upload_id
    # Who stored it: instant uploads trust an object only for its owner (engine/dedup.py).
    obj_meta[CONTENT_OWNER_METADATA] = str(principal)
    sha256 = _declared_sha256(text.get("sha256"))
    # Who may HEAD and download it once complete: the state, which says so until then,
    # is gone by then.  A hash of the credential, never the credential.
    obj_meta[OWNER_METADATA] = str(principal)
    if sum(len(k) + len(v) for k, v in obj_meta.items()) > MAX_OBJECT_METADATA_BYTES:
        raise BadMetadata(
            f"Upload-Metadata exceeds the {MAX_OBJECT_METADATA_BYTES} bytes kept with the object"
        )
    return NewUpload(
        id=upload_id,
        url_id=url_id,
        key=ctx.object_key(upload_id, filename, under=under),
        content_type=ctype,
        metadata_header=header.strip(),
        object_metadata=obj_meta,
        length=length,
        filename=filename,
        principal=principal,
        quota=quota,
        sha256=sha256,
    )


def _declared_sha256(value: str | None) -> str | None:
    """``sha256`` in Upload-Metadata: the whole upload's SHA-256 as 64 hex digits."""
    if value is None:
        return None
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise BadMetadata("Upload-Metadata sha256 must be the upload's SHA-256 in 64 hex digits")
    return value.lower()


def tus_hook_request(request: web.Request, upload_id: str) -> HookRequest:
    """The request as a hook sees it: the URL id (the upload's secret) never leaves us;
    the path names the upload by its storage id, as Upload.ID does."""
    base = request.app[TUS].config.base_path
    return hook_request(request, path=base + upload_id)


async def pre_create(
    request: web.Request,
    svc: TusService,
    new: NewUpload,
    place: Callable[[str], str] | None = None,
) -> NewUpload:
    """The pre-create hook's verdict: refused (raises), or the new upload with the object
    name (inside the upload's folder, see TusService.object_key; ``place`` maps the hook's
    key to the object's otherwise) and metadata it chose."""
    hooks = svc.engine.hooks
    if not hooks.wants("pre-create"):
        return new
    meta = {k: v for k, v in new.object_metadata.items() if k != "tus-id"}
    reply = await hooks.blocking(
        "pre-create",
        HookUpload("tus", new.id, new.key, new.length, 0, meta, principal=str(new.principal)),
        tus_hook_request(request, new.id),
    )
    if reply.new_key is not None:
        if place is None:
            key = svc.object_key(new.id, new.filename, reply.new_key)
        else:
            key = place(reply.new_key)
        new = replace(new, key=key)
    if reply.new_metadata is not None:
        chosen = {
            k.lower(): _header_safe(v)
            for k, v in reply.new_metadata.items()
            if _METADATA_KEY_RE.fullmatch(k)
        }
        new = replace(new, object_metadata=hook_metadata(new.object_metadata, chosen))
    return new


async def _terminate_quietly(
    svc: TusService, lease: Lease, why: ProxyError, client_ip: str
) -> None:
    """Remove a new upload whose creation failed (``why``), whatever its lease or expiry
    says; a failure to do so is logged, not raised (the sweeper gets it later).  While the
    request still holds its lease (it failed before writing: no slot), that lease is the
    one to remove it with: asking for another would be refused by this one."""

    async def go() -> None:
        held = lease
        if lease.released or lease.lost:
            held = await svc.store.acquire(lease.info.id, by=None, allow_expired=True)
        await svc.terminate(held, why=why, client=client_ip)

    try:
        await asyncio.shield(asyncio.wait_for(go(), 30))
    except asyncio.CancelledError:
        raise
    except Exception as e:
        log.warning("tus: could not remove the failed new upload %s: %s", lease.info.id, e)


# -- writing ----------------------------------------------------------------------------


async def write_body(
    request: web.Request,
    lease: Lease,
    client_ip: str,
    *,
    checksum: Checksum | None = None,
    complete_at_end: bool = False,
    discard_on_failure: bool = False,
) -> UploadInfo:
    """The request's body onto the upload whose lease it holds (a tus PATCH, an IETF
    append, a creation's body), in one of the client's upload slots.  The caller checked
    that one is free; taking it re-checks, which a creation, with awaits in between, can
    fail (another upload of the client took it): then the lease is released (or the
    upload discarded, below).  On a refusal before this, the caller released the lease;
    from here the request's outcome is reported as an upload's.

    ``discard_on_failure``: the body of a creation whose client has not learnt the
    upload's URL (no answer yet, no IETF ``104``): should the write fail, nothing could
    resume the upload, so it goes."""
    svc = service(request)
    streaming(request)
    try:
        with request.app[UPLOADS].slots.hold(client_ip):
            return await svc.write(
                lease,
                request.app[UPLOADS].body(request),
                declared_bytes=request.content_length,
                checksum=checksum,
                client_ip=client_ip,
                complete_at_end=complete_at_end,
            )
    except BaseException as e:
        if discard_on_failure:
            why = e if isinstance(e, ProxyError) else Cancelled("the creation was cancelled")
            await _terminate_quietly(svc, lease, why, client_ip)
        else:
            await release_quietly(lease)  # refused before the write (no slot): still held
        raise


def upload_headers(info: UploadInfo) -> dict[str, str]:
    """tus's headers about an upload (creation, HEAD, PATCH): its offset, and its expiry
    while it is open or the stored object's SHA-256 once it completes."""
    headers = {"Upload-Offset": str(info.offset)}
    if not info.completing:
        headers["Upload-Expires"] = email.utils.formatdate(info.expires_s, usegmt=True)
    elif info.sha256_hex:
        # Proxy-specific: the completing PATCH has no body to answer with, and the state
        # is gone right after it, so this header is how a client verifies end to end.
        headers[SHA256_HEADER] = info.sha256_hex
    return headers


# -- a completed upload -----------------------------------------------------------------


async def finished_upload(svc: TusService, upload_id: str, grant: Grant) -> ObjectInfo:
    """The object a completed upload stored (its state is gone), found by its id in the
    caller's folder or, for a resumable PUT, at its key; the 404 of an unknown upload
    unless it is the caller's."""
    folder = svc.object_key(upload_id, None, "", under=grant.prefix or "")
    obj = await finished.find_owned(svc.store, folder, upload_id, grant.principal)
    if obj is None:
        raise NotFound("no such upload")
    return obj


# -- DELETE -----------------------------------------------------------------------------


async def terminate(request: web.Request) -> web.Response:
    """DELETE of an upload, after the protocol's own checks (tus and the IETF draft)."""
    grant = guard(request)
    svc = service(request)
    lease = await svc.store.acquire(upload_id_of(request), by=grant.principal, allow_expired=True)
    try:
        await svc.terminate(lease, client=request_client(request).ip)
    except BaseException:
        await release_quietly(lease)
        raise
    return web.Response(status=204)
