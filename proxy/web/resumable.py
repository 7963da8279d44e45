"""IETF "Resumable Uploads for HTTP" (draft-ietf-httpbis-resumable-upload) over the tus
layer: an upload created here is a tus upload (same state in S3, same object key, same
owner, quota, hooks, metrics and outcome path), reachable at the same URL by either
protocol and from any instance.

Served on the tus endpoint (``tus.base_path``), told apart from tus the way tusd does it:
a request carrying ``Upload-Draft-Interop-Version`` speaks the draft.  The interop
versions real clients send:

* 3 (draft -01): Apple's URLSession (iOS 17, macOS 14); ``Upload-Incomplete`` (inverted);
* 5 (draft -03): tus-js-client ``protocol: 'ietf-draft-03'``; ``Upload-Complete``;
* 6 (drafts -04/-05): tus-js-client ``'ietf-draft-05'``; appends need
  ``Content-Type: application/partial-upload``; ``Upload-Limit`` (with ``expires``);
* 8 (drafts -09 to -11): ``Upload-Limit`` with ``max-age``, ``Accept-Patch`` on OPTIONS,
  problem types for a wrong offset (409), a completed upload, inconsistent lengths.

Where tus completes an upload when its offset reaches ``Upload-Length``, the draft
completes it on ``Upload-Complete: ?1``: that request's ``Content-Length`` (or, with a
chunked body, its end) fixes the length.  ``Repr-Digest: sha-256=:…:`` on the creation
or on any append is checked when the upload completes (a mismatch discards it:
``400 ERR_REPR_DIGEST_MISMATCH``, nothing stored); every answer about a completed upload
carries ``Repr-Digest`` (RFC 9530) of what was stored.

A plain upload carrying the draft's headers is the same, with its object where the plain
upload puts it (:func:`plain_create`): ``PUT /uploads/{key}`` at its key, ``POST
/uploads`` (not a form) at the key it generates.  ``104 Upload Resumption Supported`` is
sent only with ``tus.send_104`` (see config.toml: nginx mishandles it); the upload URL is
always in the creation's final answer.  Without a 104, a creation whose body is cut is
discarded: its client never learnt the URL.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from urllib.parse import unquote

from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy.auth import Grant
from proxy.errors import (
    BadDigest,
    BadHeader,
    CompletedUpload,
    InconsistentLength,
    InteropVersion,
    MismatchingOffset,
    NotFound,
    ProxyError,
    TooLarge,
    WrongContentType,
)
from proxy.headers import ascii_uint
from proxy.keys import full_key
from proxy.tus.completion import hook_upload
from proxy.tus.service import TusService, no_bytes, quota_of
from proxy.tus.state import UploadInfo, release_quietly
from proxy.web import page, tus_common
from proxy.web.preflight import (
    UPLOADS,
    Handler,
    expected_digests,
    reported,
    request_client,
)
from proxy.web.uploads import new_key, preflight_post, preflight_put, unreserved

log = logging.getLogger(__name__)

INTEROP_HEADER = "Upload-Draft-Interop-Version"
PARTIAL_UPLOAD = "application/partial-upload"
FORM = "multipart/form-data"
INTEROP_VERSIONS = (3, 5, 6, 8)
_SF_INTEGER_DIGITS = 15  # RFC 8941 Integer


@dataclass(frozen=True)
class Dialect:
    """What one interop version calls things and answers."""

    version: int

    def complete(self, request: web.Request) -> bool | None:
        """The request's completeness (None: not said).  Interop 3 says it inverted."""
        if self.version == 3:
            incomplete = _sf_boolean(request.headers.get("Upload-Incomplete"))
            return None if incomplete is None else not incomplete
        return _sf_boolean(request.headers.get("Upload-Complete"))

    def completeness(self, complete: bool) -> dict[str, str]:
        if self.version == 3:
            return {"Upload-Incomplete": "?0" if complete else "?1"}
        return {"Upload-Complete": "?1" if complete else "?0"}

    def limits(self, max_size: int, left_s: float | None) -> dict[str, str]:
        """``Upload-Limit`` (interop 6 on); the lifetime key was ``expires`` until -06."""
        if self.version < 6:
            return {}
        value = f"max-size={max_size}"
        if left_s is not None:
            value += f", {'expires' if self.version == 6 else 'max-age'}={max(0, int(left_s))}"
        return {"Upload-Limit": value}

    def append_status(self, complete: bool) -> int:
        """Interop 3 to 6 (drafts -01 to -05) answer every successful append 201;
        interop 8 answers 204, or 200 when the append completes the upload."""
        if self.version < 8:
            return 201
        return 200 if complete else 204


def dialect_of(request: web.Request) -> Dialect:
    raw = request.headers.get(INTEROP_HEADER, "")
    version = ascii_uint(raw.strip(), max_digits=3)
    if version not in INTEROP_VERSIONS:
        raise InteropVersion(
            f"{INTEROP_HEADER} {raw!r} is not one we speak: "
            + ", ".join(str(v) for v in INTEROP_VERSIONS),
            headers={INTEROP_HEADER: str(INTEROP_VERSIONS[-1])},
        )
    return Dialect(version)


def _sf_boolean(value: str | None) -> bool | None:
    """An RFC 8941 Boolean; anything else is ignored, as the draft says."""
    if value is None:
        return None
    return {"?1": True, "?0": False}.get(value.strip())


def _sf_integer(request: web.Request, name: str) -> int | None:
    value = request.headers.get(name)
    if value is None:
        return None
    number = ascii_uint(value.strip(), max_digits=_SF_INTEGER_DIGITS)
    if number is None:
        raise BadHeader(f"{name} must be a non-negative integer")
    return number


def _repr_sha256(request: web.Request) -> str | None:
    digest = expected_digests({"Repr-Digest": request.headers.get("Repr-Digest")}).sha256
    return None if digest is None else digest.hex()


def _digest_headers(sha256_hex: str | None) -> dict[str, str]:
    """A stored object's SHA-256, where known: ``Repr-Digest`` (RFC 9530) and ours."""
    if not sha256_hex:
        return {}
    encoded = base64.b64encode(bytes.fromhex(sha256_hex)).decode()
    return {"Repr-Digest": f"sha-256=:{encoded}:", tus_common.SHA256_HEADER: sha256_hex}


def _length(request: web.Request, complete: bool, offset: int, known: int | None) -> int | None:
    """The upload's length from ``Upload-Length`` and, with ``Upload-Complete: ?1``, the
    request's ``Content-Length``; they and ``known`` (recorded before) must agree."""
    said = [v for v in (_sf_integer(request, "Upload-Length"), known) if v is not None]
    if complete and request.content_length is not None:
        said.append(offset + request.content_length)
    if len(set(said)) > 1:
        raise InconsistentLength(f"the upload's length is given as {sorted(set(said))}")
    return said[0] if said else None


def _metadata_header(request: web.Request) -> str:
    """tus ``Upload-Metadata`` for the upload: the client's (tus-js-client sends it), else
    the file name (``Content-Disposition``) and type the draft's clients send."""
    if (header := request.headers.get("Upload-Metadata")) is not None:
        return header
    pairs = []
    if name := _disposition_filename(request.headers.get("Content-Disposition", "")):
        pairs.append(("filename", name))
    ctype = request.headers.get("Content-Type", "").strip()
    if ctype and ctype.split(";")[0].strip() != PARTIAL_UPLOAD:
        pairs.append(("filetype", ctype))
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in pairs)


def _disposition_filename(value: str) -> str | None:
    if m := re.search(r"filename\*\s*=\s*UTF-8''([^;\s]+)", value, re.I):
        return unquote(m.group(1))
    if m := re.search(r'filename\s*=\s*"([^"]*)"', value) or re.search(
        r"filename\s*=\s*([^;\s]+)", value
    ):
        return m.group(1)
    return None


def _answer(
    request: web.Request,
    dialect: Dialect,
    info: UploadInfo,
    status: int,
    location: str | None = None,
) -> web.Response:
    """The answer to a creation or append: the upload's state, or its stored object."""
    svc = tus_common.service(request)
    complete = info.completing
    headers = {
        INTEROP_HEADER: str(dialect.version),
        "Upload-Offset": str(info.offset),
        **dialect.completeness(complete),
    }
    if location is not None:
        headers["Location"] = location
    if info.length is not None:
        headers["Upload-Length"] = str(info.length)
    if not complete:
        headers.update(dialect.limits(svc.max_size_bytes, info.expires_s - svc.store.clock()))
        return web.Response(status=status, headers=headers)
    body: dict[str, object] = {
        "bucket": request.app[UPLOADS].bucket,
        "key": info.key,
        "size": info.offset,
    }
    headers.update(_digest_headers(info.sha256_hex))
    if info.sha256_hex:
        body["sha256"] = info.sha256_hex
    return web.json_response(body, status=status, headers=headers)


# -- handlers ---------------------------------------------------------------------------


async def options(request: web.Request) -> web.Response:
    dialect = dialect_of(request)
    headers = {
        INTEROP_HEADER: str(dialect.version),
        "Accept-Patch": PARTIAL_UPLOAD,
        **dialect.limits(tus_common.service(request).max_size_bytes, None),
    }
    return web.Response(status=204, headers=headers)


async def create(request: web.Request) -> web.StreamResponse:
    """Upload creation on the endpoint: any request with ``Upload-Complete`` (interop 3:
    ``Upload-Incomplete``); the object goes where a tus upload's goes."""
    return await _create(request, None)


async def plain_create(request: web.Request, plain: Handler) -> web.StreamResponse:
    """``PUT /uploads/{key}`` or ``POST /uploads`` (not a form) that carries
    ``Upload-Complete`` (or ``Upload-Incomplete``): the plain upload, made resumable.
    The object goes to the PUT's key (a POST's generated one), after every check the plain
    upload makes (its preflight: auth, key, size, content policy, create-only); it is a tus
    upload whose URL is ``/files/<id>``.  ``plain`` (the upload as usual, not resumable)
    where a resumable upload cannot honour the request: a signed URL (bound to this one
    request), an overwrite (tus completes create-only), an instant upload (no body
    needed), a form (several files), or an interop version we do not speak."""
    if INTEROP_HEADER not in request.headers or tus_common.TUS not in request.app:
        return await plain(request)
    try:
        dialect = dialect_of(request)
    except InteropVersion:
        return await plain(request)
    post = request.method == "POST"
    if dialect.complete(request) is None or (post and request.content_type == FORM):
        return await plain(request)
    try:
        pre = await (preflight_post if post else preflight_put)(request)
    except ProxyError:
        return await plain(request)  # which refuses it the same way
    if pre.grant.via == "signed" or not pre.create_only or pre.source is not None:
        return await plain(request)
    filename = _disposition_filename(request.headers.get("Content-Disposition", ""))
    key = new_key(request.app[UPLOADS], pre.grant, filename) if post else pre.key
    assert key is not None
    return await reported(lambda r: _create(r, key))(request)


async def _create(request: web.Request, key: str | None) -> web.StreamResponse:
    dialect = dialect_of(request)
    complete = dialect.complete(request)
    if complete is None:
        raise BadHeader(f"an upload creation needs {dialect.completeness(False).popitem()[0]}")
    grant = tus_common.guard_body(request)
    svc = tus_common.service(request)
    client_ip = request_client(request).ip
    length = _length(request, complete, 0, None)
    if length is not None and length > svc.max_size_bytes:
        raise TooLarge(f"the upload's length exceeds the limit of {svc.max_size_bytes} bytes")
    body = request.content_length != 0 and request.can_read_body
    if body and length != 0:
        # A refusal for a slot comes before anything exists (and before a 104).
        request.app[UPLOADS].slots.check(client_ip)
    quota = quota_of(grant.principal, client_ip)
    await svc.check_quota(quota)
    new = tus_common.new_upload(
        svc, _metadata_header(request), length, grant.principal, quota, grant.prefix or ""
    )
    new = replace(new, sha256=None, repr_sha256=_repr_sha256(request))
    if key is None:
        new = await tus_common.pre_create(request, svc, new)
    else:
        new = replace(new, key=key, claims_key=True)
        new = await tus_common.pre_create(request, svc, new, _put_key_place(request, grant))
    async with page.file_place(request, grant, new):
        info, lease = await svc.create(new, leased=body and new.length != 0, client=client_ip)
    svc.engine.hooks.notify(
        "post-create", hook_upload(info), tus_common.tus_hook_request(request, info.id)
    )
    location = request.app[tus_common.TUS].config.base_path + new.url_id
    announced = await _send_104(request, dialect, location)
    if lease is not None:
        info = await tus_common.write_body(
            request, lease, client_ip, complete_at_end=complete, discard_on_failure=not announced
        )
    elif complete and not info.completing:
        info = await _complete_empty(request, svc, info.id, grant)
    log.info("ietf create id=%s key=%r interop=%d", info.id, info.key, dialect.version)
    return _answer(request, dialect, info, 201, location)


def _put_key_place(request: web.Request, grant: Grant) -> Callable[[str], str]:
    """Where a pre-create hook's key puts a resumable PUT's object: relative to
    ``key_prefix`` and held to the caller's prefix, as for any PUT."""
    ctx = request.app[UPLOADS]

    def place(key: str) -> str:
        grant.check_key(key)
        return unreserved(ctx, full_key(ctx.config.key_prefix, key))

    return place


async def _send_104(request: web.Request, dialect: Dialect, location: str) -> bool:
    """The interim ``104 Upload Resumption Supported`` with the upload's URL, when the
    config allows it (``tus.send_104``) and the client speaks HTTP/1.1."""
    if not request.app[tus_common.TUS].config.send_104 or request.version < (1, 1):
        return False
    svc = tus_common.service(request)
    headers = {
        INTEROP_HEADER: str(dialect.version),
        "Location": location,
        **dialect.limits(svc.max_size_bytes, svc.config.expire_after_s),
    }
    head = "HTTP/1.1 104 Upload Resumption Supported\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    await request.writer.write(head.encode("latin-1"))
    request.writer.output_size = 0  # no final answer has started
    return True


async def _complete_empty(
    request: web.Request, svc: TusService, upload_id: str, grant: Grant
) -> UploadInfo:
    """``Upload-Complete: ?1`` with no bytes: the upload ends at its offset."""
    lease = await svc.store.acquire(upload_id, by=grant.principal)
    try:
        info = lease.info
        if info.length is not None and info.length != info.offset:
            raise InconsistentLength(
                f"the upload is complete at {info.offset} bytes, not its length {info.length}"
            )
    except BaseException:
        await release_quietly(lease)
        raise
    return await svc.write(
        lease,
        no_bytes(),
        declared_bytes=0,
        checksum=None,
        client_ip=request_client(request).ip,
        complete_at_end=True,
    )


async def head(request: web.Request) -> web.Response:
    dialect = dialect_of(request)
    grant = tus_common.guard(request)
    svc, upload_id = tus_common.service(request), tus_common.upload_id_of(request)
    headers = {INTEROP_HEADER: str(dialect.version), "Cache-Control": "no-store"}
    try:
        info = await svc.store.get(upload_id, by=grant.principal)
    except NotFound:
        done = await tus_common.finished_upload(svc, upload_id, grant)
        headers.update(dialect.completeness(True))
        headers["Upload-Offset"] = headers["Upload-Length"] = str(done.size)
        headers.update(_digest_headers(done.metadata.get("sha256")))
        return web.Response(status=204, headers=headers)
    headers["Upload-Offset"] = str(info.offset)
    headers.update(dialect.completeness(info.completing))
    if info.length is not None:
        headers["Upload-Length"] = str(info.length)
    headers.update(dialect.limits(svc.max_size_bytes, info.expires_s - svc.store.clock()))
    return web.Response(status=204, headers=headers)


async def patch(request: web.Request) -> web.StreamResponse:
    """Upload append.  A body that breaks keeps what arrived (the tus layer's salvage)."""
    dialect = dialect_of(request)
    grant = tus_common.guard_body(request)
    svc, upload_id = tus_common.service(request), tus_common.upload_id_of(request)
    ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
    if dialect.version >= 6 and ctype != PARTIAL_UPLOAD:
        raise WrongContentType(f"an append needs Content-Type: {PARTIAL_UPLOAD}")
    offset = _sf_integer(request, "Upload-Offset")
    if offset is None:
        raise BadHeader("Upload-Offset is required")
    complete = dialect.complete(request)
    if complete is None:
        if dialect.version != 3:  # interop 3: no Upload-Incomplete means the last append
            raise BadHeader("Upload-Complete is required")
        complete = True
    repr_sha256 = _repr_sha256(request)
    try:
        lease = await svc.store.acquire(upload_id, by=grant.principal)
    except NotFound:
        return await _append_to_finished(request, dialect, svc, upload_id, grant, offset)
    client_ip = request_client(request).ip
    try:
        info = lease.info
        if info.completing and offset == info.offset:
            info = await svc.resume_completion(lease, client_ip)
            return _answer(request, dialect, info, dialect.append_status(True))
        if offset != info.offset:
            raise MismatchingOffset(info.offset, offset)
        length = _length(request, complete, offset, info.length)
        if length is not None and (length < info.offset or length > svc.max_size_bytes):
            raise InconsistentLength(f"a length of {length} bytes is not possible here")
        if repr_sha256 and info.repr_sha256 and repr_sha256 != info.repr_sha256:
            raise BadDigest("Repr-Digest differs from the one the upload declared before")
        lease.info = info = replace(
            info, length=length, repr_sha256=repr_sha256 or info.repr_sha256
        )
        room = (length if length is not None else svc.max_size_bytes) - info.offset
        if request.content_length is not None and request.content_length > room:
            raise TooLarge(f"the append ({request.content_length} bytes) exceeds the {room} left")
        request.app[UPLOADS].slots.check(client_ip)
    except BaseException:
        await release_quietly(lease)
        raise
    info = await tus_common.write_body(request, lease, client_ip, complete_at_end=complete)
    return _answer(request, dialect, info, dialect.append_status(info.completing))


async def _append_to_finished(
    request: web.Request,
    dialect: Dialect,
    svc: TusService,
    upload_id: str,
    grant: Grant,
    offset: int,
) -> web.Response:
    """An append to an upload whose state is gone: if it completed (and is the caller's),
    an empty append at its end is answered as its completion was (the client lost that
    answer); anything else is refused with the draft's problem type."""
    done = await tus_common.finished_upload(svc, upload_id, grant)  # 404 unless the caller's
    size = done.size
    if offset != size or request.content_length != 0:
        raise CompletedUpload("the upload is complete: nothing can be appended to it")
    headers = {
        INTEROP_HEADER: str(dialect.version),
        "Upload-Offset": str(size),
        "Upload-Length": str(size),
        **dialect.completeness(True),
    }
    headers.update(_digest_headers(done.metadata.get("sha256")))
    return web.Response(status=dialect.append_status(True), headers=headers)


async def delete(request: web.Request) -> web.Response:
    dialect_of(request)
    return await tus_common.terminate(request)


# -- wiring: the draft's requests on the tus routes ------------------------------------

_ON_BASE: Mapping[str, Handler] = {"POST": create, "OPTIONS": options}
_ON_ITEM: Mapping[str, Handler] = {"HEAD": head, "PATCH": patch, "DELETE": delete}


def middleware_for(base_path: str) -> Middleware:
    """An app middleware: a request on the tus endpoint that names an interop version goes
    to the handlers above instead of tus's.  (The route's Expect handler has run by then:
    tus's checks before ``100 Continue`` are the same for both protocols.)  Other methods
    (GET, a download) go where they would have gone."""
    bases = {base_path, base_path.rstrip("/") or "/"}

    @web.middleware
    async def ietf(request: web.Request, handler: Handler) -> web.StreamResponse:
        chosen = None
        if INTEROP_HEADER not in request.headers:
            pass
        elif request.path in bases:
            chosen = _ON_BASE.get(request.method)
        elif request.method == "PUT" and "key" in request.match_info:
            return await plain_create(request, handler)
        elif request.method == "POST" and request.path == "/uploads":
            return await plain_create(request, handler)
        elif request.path.startswith(base_path) and "id" in request.match_info:
            chosen = _ON_ITEM.get(request.method)
            tus_common.log_by_storage_id(request, base_path)
        return await (handler if chosen is None else reported(chosen))(request)

    return ietf
