"""tus 1.0.0 over HTTP: core (HEAD, PATCH, OPTIONS) and the extensions creation,
creation-with-upload, creation-defer-length, termination, expiration and checksum.
Concatenation (where the store can copy parts) is :mod:`proxy.web.tus_concat`; what tus
shares with the IETF draft on this endpoint (guards, new uploads, DELETE) is
:mod:`proxy.web.tus_common`.  tus takes bearer tokens, never signed URLs.

Only headers and statuses live here; the upload lifecycle is :mod:`proxy.tus.service`,
the state :mod:`proxy.tus.state`.  Errors are :class:`~proxy.errors.ProxyError`, rendered
as JSON ``{"code", "message"}`` by the app's one error middleware (HEAD answers carry no
body, as HTTP wants).  One ``on_response_prepare`` hook adds ``Tus-Resumable`` and the
CORS headers to every answer under the base path, errors and 404/405 included.
One header is our own:
answers about a completed upload carry ``Upload-SHA256`` (hex), the stored object's digest.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from aiohttp import web

from proxy.auth import Grant
from proxy.config import TusConfig
from proxy.errors import (
    BadHeader,
    ChecksumAlgorithm,
    LengthRequired,
    NotFound,
    OffsetMismatch,
    TooLarge,
    TusVersion,
    WrongContentType,
)
from proxy.headers import ascii_uint
from proxy.tus.completion import hook_upload
from proxy.tus.concat import FINAL
from proxy.tus.service import Checksum, TusService, quota_of
from proxy.tus.state import release_quietly
from proxy.web import page, tus_concat
from proxy.web.preflight import (
    UPLOADS,
    Handler,
    b64_digest,
    expect_with,
    reported,
    request_client,
)
from proxy.web.tus_common import (
    SHA256_HEADER,
    TUS,
    finished_upload,
    guard,
    guard_body,
    log_by_storage_id,
    new_upload,
    pre_create,
    service,
    terminate,
    tus_hook_request,
    upload_headers,
    upload_id_of,
    write_body,
)

log = logging.getLogger(__name__)

TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,creation-with-upload,creation-defer-length,termination,expiration,checksum"
CHECKSUM_ALGORITHMS = {"sha1": 20, "md5": 16, "sha256": 32}
OFFSET_CONTENT_TYPE = "application/offset+octet-stream"
_ALLOW_HEADERS = (
    "Authorization, Origin, X-Requested-With, X-Request-ID, X-HTTP-Method-Override, "
    "Content-Type, Upload-Length, Upload-Offset, Tus-Resumable, Upload-Metadata, "
    "Upload-Defer-Length, Upload-Checksum, Upload-Concat, "
    # IETF resumable uploads (proxy/web/resumable.py) on the same endpoint.
    "Upload-Draft-Interop-Version, Upload-Complete, Upload-Incomplete, Repr-Digest"
)
_EXPOSE_HEADERS = (
    "Upload-Offset, Location, Upload-Length, Tus-Version, Tus-Resumable, Tus-Max-Size, "
    "Tus-Extension, Tus-Checksum-Algorithm, Upload-Metadata, Upload-Defer-Length, "
    "Upload-Expires, Upload-SHA256, Upload-Concat, "
    "Upload-Draft-Interop-Version, Upload-Complete, Upload-Incomplete, Upload-Limit, Repr-Digest"
)
_ALLOW_METHODS = "POST, HEAD, PATCH, DELETE, OPTIONS"


# -- header parsing ---------------------------------------------------------------------


def _check_version(request: web.Request) -> None:
    if request.headers.get("Tus-Resumable") != TUS_VERSION:
        raise TusVersion(
            f"Tus-Resumable must be {TUS_VERSION}", headers={"Tus-Version": TUS_VERSION}
        )


def _non_negative(request: web.Request, name: str) -> int | None:
    value = request.headers.get(name)
    if value is None:
        return None
    number = ascii_uint(value)
    if number is None:
        raise BadHeader(f"{name} must be a non-negative integer of ASCII digits")
    return number


def _checksum(request: web.Request) -> Checksum | None:
    value = request.headers.get("Upload-Checksum")
    if value is None:
        return None
    algorithm, _, encoded = value.strip().partition(" ")
    size = CHECKSUM_ALGORITHMS.get(algorithm)
    if size is None:
        raise ChecksumAlgorithm(f"unsupported Upload-Checksum algorithm {algorithm!r}")
    digest = b64_digest(encoded, size, f"Upload-Checksum {algorithm}")
    return Checksum(algorithm, digest)


# -- handlers ---------------------------------------------------------------------------


async def _guard_create(request: web.Request) -> Grant:
    """As :func:`~proxy.web.tus_common.guard_body`, for a creation: also the cap on
    unfinished uploads, which the headers decide (so a 429 comes before ``100 Continue``,
    not after the body)."""
    grant = guard_body(request)
    await service(request).check_quota(quota_of(grant.principal, request_client(request).ip))
    return grant


async def _expect(request: web.Request) -> web.StreamResponse | None:
    return await expect_with(request, guard_body)


async def _expect_create(request: web.Request) -> web.StreamResponse | None:
    return await expect_with(request, _guard_create)


def _extensions(request: web.Request) -> str:
    """Concatenation only where the store can do what it needs (copy parts, ranged reads)."""
    return EXTENSIONS + ("," + tus_concat.EXTENSION if service(request).concat.supported else "")


async def options(request: web.Request) -> web.Response:
    # Tus-Resumable is not required on OPTIONS (spec: for discovery and CORS preflights).
    cfg = request.app[TUS].config
    headers = {
        "Tus-Version": TUS_VERSION,
        "Tus-Extension": _extensions(request),
        "Tus-Max-Size": str(request.app[UPLOADS].config.max_upload_size_bytes),
        "Tus-Checksum-Algorithm": ",".join(CHECKSUM_ALGORITHMS),
    }
    if _allowed_origin(cfg, request) and "Access-Control-Request-Method" in request.headers:
        headers["Access-Control-Allow-Methods"] = _ALLOW_METHODS
        headers["Access-Control-Allow-Headers"] = _ALLOW_HEADERS
        headers["Access-Control-Max-Age"] = str(cfg.cors_max_age_s)
    return web.Response(status=204, headers=headers)


async def create(request: web.Request) -> web.StreamResponse:
    _check_version(request)
    grant = guard_body(request)
    svc = service(request)
    client_ip = request_client(request).ip
    length = _non_negative(request, "Upload-Length")
    defer = request.headers.get("Upload-Defer-Length")
    if defer is not None and (defer != "1" or length is not None):
        raise BadHeader("Upload-Defer-Length must be 1, and only without Upload-Length")
    cat = tus_concat.requested(request, grant, length)
    if cat is not None and cat.kind == FINAL:
        return await tus_concat.create_final(request, grant, cat)
    if length is None and defer is None:
        raise LengthRequired("Upload-Length or Upload-Defer-Length: 1 is required")
    if length is not None and length > svc.max_size_bytes:
        raise TooLarge(f"Upload-Length exceeds Tus-Max-Size ({svc.max_size_bytes})")
    declared = request.content_length
    with_body = request.headers.get("Content-Type", "").split(";")[0].strip() == OFFSET_CONTENT_TYPE
    if not with_body and declared:
        raise WrongContentType(f"an upload body needs Content-Type: {OFFSET_CONTENT_TYPE}")
    checksum = _checksum(request) if with_body else None
    if with_body and length != 0:
        # Its body will need one of the client's upload slots: a refusal comes before
        # anything exists (write_body re-checks when it takes the slot).
        request.app[UPLOADS].slots.check(client_ip)
    quota = quota_of(grant.principal, client_ip)
    header = request.headers.get("Upload-Metadata", "")
    new = new_upload(svc, header, length, grant.principal, quota, grant.prefix or "")
    if cat is not None:  # no await before this: see tus_concat.create_partial
        return await tus_concat.create_partial(request, grant, new, with_body, checksum)
    new = await pre_create(request, svc, new)
    async with page.file_place(request, grant, new):
        instant = await svc.create_copied(new, client_ip)
        if instant is not None:
            # Complete on arrival: a body sent along is not read (aiohttp drops it).
            info, lease = instant, None
        else:
            info, lease = await svc.create(
                new, leased=with_body and new.length != 0, client=client_ip
            )
    svc.engine.hooks.notify("post-create", hook_upload(info), tus_hook_request(request, info.id))
    if lease is not None:
        info = await write_body(
            request, lease, client_ip, checksum=checksum, discard_on_failure=True
        )
    location = request.app[TUS].config.base_path + new.url_id
    headers = {"Location": location, **upload_headers(info)}
    if not with_body and instant is None:
        headers.pop("Upload-Offset")
    log.info(
        "tus create id=%s key=%r length=%s",
        info.id,
        info.key,
        "deferred" if info.length is None else info.length,
    )
    return web.Response(status=201, headers=headers)


async def head(request: web.Request) -> web.Response:
    _check_version(request)
    grant = guard(request)
    svc, upload_id = service(request), upload_id_of(request)
    try:
        info = await svc.store.get(upload_id, by=grant.principal)
    except NotFound:
        return await _head_finished(svc, upload_id, grant)
    headers = {**upload_headers(info), "Cache-Control": "no-store"}
    if info.length is None:
        headers["Upload-Defer-Length"] = "1"
    else:
        headers["Upload-Length"] = str(info.length)
    if info.metadata_header:
        headers["Upload-Metadata"] = info.metadata_header
    headers.update(tus_concat.state_headers(info))
    return web.Response(status=200, headers=headers)


async def _head_finished(svc: TusService, upload_id: str, grant: Grant) -> web.Response:
    """HEAD of a completed upload (its state is gone): its object answers, to its owner."""
    obj = await finished_upload(svc, upload_id, grant)
    headers = {
        "Upload-Offset": str(obj.size),
        "Upload-Length": str(obj.size),
        "Cache-Control": "no-store",
    }
    if sha256 := obj.metadata.get("sha256"):
        headers[SHA256_HEADER] = sha256
    headers.update(tus_concat.object_headers(obj))
    return web.Response(status=200, headers=headers)


async def patch(request: web.Request) -> web.Response:
    _check_version(request)
    grant = guard_body(request)
    svc = service(request)
    upload_id = upload_id_of(request)
    ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
    if ctype != OFFSET_CONTENT_TYPE:
        raise WrongContentType(f"PATCH needs Content-Type: {OFFSET_CONTENT_TYPE}")
    offset = _non_negative(request, "Upload-Offset")
    if offset is None:
        raise BadHeader("Upload-Offset is required")
    length = _non_negative(request, "Upload-Length")
    checksum = _checksum(request)
    try:
        lease = await svc.store.acquire(upload_id, by=grant.principal)
    except NotFound:
        await tus_concat.refuse_final(svc, upload_id, grant)
        raise
    try:
        info = lease.info
        if info.completing and offset == info.offset:
            info = await svc.resume_completion(lease, request_client(request).ip)
            return web.Response(status=204, headers=upload_headers(info))
        if offset != info.offset:
            raise OffsetMismatch(
                f"Upload-Offset {offset} does not match the upload's offset {info.offset}"
            )
        if length is not None:
            if info.length is not None and length != info.length:
                raise BadHeader("Upload-Length cannot change once set")
            if length < info.offset:
                raise BadHeader("Upload-Length is below the upload's offset")
            if length > svc.max_size_bytes:
                raise TooLarge(f"Upload-Length exceeds Tus-Max-Size ({svc.max_size_bytes})")
            if info.length is None:
                lease.info = info = replace(info, length=length)
        room = (info.length if info.length is not None else svc.max_size_bytes) - info.offset
        declared = request.content_length
        if declared is not None and declared > room:
            raise TooLarge(f"the PATCH body ({declared} bytes) exceeds the {room} bytes left")
        client_ip = request_client(request).ip
        request.app[UPLOADS].slots.check(client_ip)
    except BaseException:
        await release_quietly(lease)
        raise
    info = await write_body(request, lease, client_ip, checksum=checksum)
    return web.Response(status=204, headers=upload_headers(info))


async def delete(request: web.Request) -> web.Response:
    _check_version(request)
    return await terminate(request)


async def method_override(request: web.Request) -> web.StreamResponse:
    """POST with X-HTTP-Method-Override, for clients behind proxies that drop PATCH/DELETE."""
    method = request.headers.get("X-HTTP-Method-Override", "").upper()
    handler = {"PATCH": patch, "DELETE": delete, "HEAD": head}.get(method)
    if handler is None:
        raise web.HTTPMethodNotAllowed("POST", ["HEAD", "PATCH", "DELETE", "OPTIONS"])
    return await handler(request)


# -- CORS and the tus headers on every answer ------------------------------------------


def _allowed_origin(cfg: TusConfig, request: web.Request) -> str | None:
    origin = request.headers.get("Origin")
    if not origin or not cfg.cors_allow_origins:
        return None
    if "*" in cfg.cors_allow_origins:
        return "*"
    return origin if origin in cfg.cors_allow_origins else None


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    cfg = request.app[TUS].config
    if not (request.path + "/").startswith(cfg.base_path):
        return
    response.headers["Tus-Resumable"] = TUS_VERSION
    origin = _allowed_origin(cfg, request)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = _EXPOSE_HEADERS
        if origin != "*":
            response.headers["Vary"] = "Origin"


# -- wiring -----------------------------------------------------------------------------


def _redacted(handler: Handler, base_path: str) -> Handler:
    """``handler``, its error lines naming the upload by its storage id."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        log_by_storage_id(request, base_path)
        return await handler(request)

    return wrapped


def add_routes(app: web.Application, config: TusConfig) -> None:
    """The tus routes under ``config.base_path``; ``app[TUS]`` is set once the store is
    open.  Every route's refusal is reported as a rejected upload request."""
    base = config.base_path
    item = base + "{id}"
    for path in {base, base.rstrip("/") or "/"}:
        app.router.add_route("POST", path, reported(create), expect_handler=_expect_create)
        app.router.add_route("OPTIONS", path, options)
    for method, handler in (
        ("HEAD", head),
        ("PATCH", patch),
        ("DELETE", delete),
        ("POST", method_override),
    ):
        expect = _expect if method in ("PATCH", "POST") else None
        app.router.add_route(
            method, item, _redacted(reported(handler), base), expect_handler=expect
        )
    app.router.add_route("OPTIONS", item, options)
    app.on_response_prepare.append(_on_prepare)
