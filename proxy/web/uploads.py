"""Plain uploads: ``PUT /uploads/{key}`` (raw body) and ``POST /uploads`` (form or raw).

Everything that can be decided from the headers is decided before the first
body byte is read, and, when the client sent ``Expect: 100-continue``, before we
tell it to send the body at all: memory pressure, bad key, declared size over the
limit, existing key.  The body itself is handed to :class:`~proxy.engine.upload.ObjectUpload`.

Those checks live in one preflight function per route, run by the Expect handler
(aiohttp calls it *before* any middleware) and again, from its cached result, by the
handler for requests without ``Expect``: authentication first (a stranger learns
nothing about keys), then key, scope, size, content policy, concurrency, existence.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.auth import Grant
from proxy.engine.dedup import OWNER_METADATA
from proxy.engine.events import Outcome
from proxy.engine.limits import ClientInfo
from proxy.engine.pipeline import Body
from proxy.engine.upload import ObjectUpload, StreamResult, UploadSpec, delete_if_ours
from proxy.errors import (
    BadForm,
    Cancelled,
    InvalidKey,
    KeyExists,
    NoFiles,
    ProxyError,
    TooLarge,
)
from proxy.hooks.payload import HookUpload
from proxy.keys import full_key, generated_key
from proxy.naming import KeyTemplate, new_random_id
from proxy.storage.base import ObjectInfo
from proxy.web.hookreq import hook_metadata, hook_request
from proxy.web.preflight import (
    UPLOADS,
    Uploads,
    authorize,
    expect_with,
    expected_digests,
    from_client,
    reported,
    request_client,
    streaming,
)

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 1024 * 1024
MAX_FORM_FIELD_BYTES = 64 * 1024
# A form's fields that are not files are read and dropped; a form of thousands of tiny
# ones costs ~0.2 ms of CPU each.  These bound that work per request (web forms send a
# handful), and the form loop yields to the event loop after every field so that one
# request's parsing never stalls everyone else's (a body already in the socket buffer
# is parsed without a single wait otherwise).
MAX_FORM_FIELDS = 10_000
MAX_FORM_FIELDS_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Preflight:
    """What the header checks decided; ``key`` is None where the server generates keys."""

    key: str | None
    size: int | None
    limit_bytes: int
    grant: Grant
    client: ClientInfo
    create_only: bool = True
    # Indexed content this principal stored with the declared SHA-256 (instant upload).
    source: ObjectInfo | None = None


_PREFLIGHT = web.RequestKey("preflight", Preflight)


def _declared_size(request: web.Request, limit: int) -> int | None:
    size = request.content_length
    if size is not None and size > limit:
        raise TooLarge(f"declared body of {size} bytes exceeds the limit of {limit} bytes")
    return size


def _content_type(request: web.Request) -> str:
    ct = request.headers.get("Content-Type", "")
    return ct if ct and len(ct) <= 255 else "application/octet-stream"


def _preflight(
    checks: Callable[[web.Request, Uploads, Grant], Awaitable[Preflight]],
) -> Callable[[web.Request], Awaitable[Preflight]]:
    """The checks that need no body, after authentication and admission (every upload's
    first two), run once per request: the Expect handler and the handler share them."""

    async def preflight(request: web.Request) -> Preflight:
        if _PREFLIGHT not in request:
            ctx = request.app[UPLOADS]
            grant = authorize(request)
            ctx.admit()
            request[_PREFLIGHT] = await checks(request, ctx, grant)
        return request[_PREFLIGHT]

    return preflight


@_preflight
async def preflight_put(request: web.Request, ctx: Uploads, grant: Grant) -> Preflight:
    """``PUT /uploads/{key}``'s checks before its body (raises the refusal), once per
    request; also what a resumable PUT (proxy.web.resumable) must pass first."""
    client_key = request.match_info["key"]
    key = unreserved(ctx, full_key(ctx.config.key_prefix, client_key))
    grant.check_key(client_key)
    limit = grant.limit(ctx.config.max_upload_size_bytes)
    size = _declared_size(request, limit)
    ctx.policy.check(request.headers.get("Content-Type"), client_key)
    sha256 = expected_digests(request.headers).sha256
    client = request_client(request)
    ctx.slots.check(client.ip)
    # If-None-Match: * asks for create-only even where the server allows overwriting.
    create_only = not ctx.config.overwrite or request.headers.get("If-None-Match") == "*"
    owner = str(grant.principal)
    if create_only and (obj := await ctx.engine.storage.head(key)) is not None:
        # "Identical" only to the principal that stored it: anyone else learns no more
        # than the key's existence, which create-only answers tell everyone anyway.
        identical = (
            sha256 is not None
            and obj.metadata.get("sha256") == sha256.hex()
            and obj.metadata.get(OWNER_METADATA) == owner
        )
        raise KeyExists(f"an object with key {key!r} already exists", identical=identical)
    source = None
    if ctx.dedup is not None and sha256 is not None and size:
        source = await ctx.dedup.find(owner, sha256.hex(), size)
    return Preflight(key, size, limit, grant, client, create_only, source)


async def _instant(request: web.Request, pre: Preflight) -> web.Response | None:
    """Store the PUT's object by copying indexed content; None when that is not possible
    (nothing indexed, or the copy failed: the body then streams as usual)."""
    ctx = request.app[UPLOADS]
    if pre.source is None or ctx.dedup is None or pre.key is None:
        return None
    sha256 = expected_digests(request.headers).sha256
    assert sha256 is not None
    upload_id = uuid.uuid4().hex[:16]
    started = time.monotonic()
    try:
        copied = await ctx.dedup.copy(
            pre.source,
            pre.key,
            owner=str(pre.grant.principal),
            sha256=sha256.hex(),
            metadata={},
            content_type=_content_type(request),
            create_only=pre.create_only,
            protocol="http",
        )
    except KeyExists as e:
        _report(request, pre, upload_id, started, None, e)
        raise
    except ProxyError as e:
        log.warning("instant upload of %r failed (%s); taking the body instead", pre.key, e)
        request[_PREFLIGHT] = dataclasses.replace(pre, source=None)
        return None
    result = StreamResult(copied.key, copied.size, copied.sha256, copied.etag, 0)
    _report(request, pre, upload_id, started, result, None)
    return web.json_response(_result_json(ctx, result, deduplicated=True), status=201)


def _report(
    request: web.Request,
    pre: Preflight,
    upload_id: str,
    started: float,
    result: StreamResult | None,
    error: ProxyError | None,
) -> None:
    streaming(request)
    events = request.app[UPLOADS].events
    events.started(upload_id, pre.key or "-")
    events.finished(
        Outcome(
            protocol="http",
            upload_id=upload_id,
            key=pre.key or "-",
            size_bytes=result.size if result is not None else 0,
            sha256=result.sha256 if result is not None else None,
            seconds=time.monotonic() - started,
            error=error,
            client=pre.client.ip,
            auth=pre.grant.via,
        )
    )


def _owned(grant: Grant) -> dict[str, str]:
    """Object metadata naming who stored it (a one-way hash, see proxy.auth.Principal):
    instant uploads and "identical" answers trust an object only for its owner."""
    return {OWNER_METADATA: str(grant.principal)}


@_preflight
async def preflight_post(request: web.Request, ctx: Uploads, grant: Grant) -> Preflight:
    """``POST /uploads``'s checks before its body (raises the refusal), once per request;
    also what a resumable POST (proxy.web.resumable) must pass first."""
    grant.check_generated()
    limit = grant.limit(ctx.config.max_upload_size_bytes)
    size = _declared_size(request, limit)
    if request.content_type != "multipart/form-data":
        # Form parts carry their own type and name; they are checked as they arrive.
        ctx.policy.check(request.headers.get("Content-Type"), _disposition_filename(request))
    client = request_client(request)
    ctx.slots.check(client.ip)
    return Preflight(None, size, limit, grant, client)


async def expect_put(request: web.Request) -> web.StreamResponse | None:
    """Answer ``Expect: 100-continue`` only when the upload can be accepted; an instant
    upload is answered here, before the client is told to send its body."""

    async def check(request: web.Request) -> web.Response | None:
        return await _instant(request, await preflight_put(request))

    return await expect_with(request, check)


async def expect_post(request: web.Request) -> web.StreamResponse | None:
    return await expect_with(request, preflight_post)


async def _stream_one(
    request: web.Request,
    spec: UploadSpec,
    chunks: Body,
    *,
    record_finish: bool = True,
) -> tuple[StreamResult, HookUpload]:
    """Stream one object; its outcome goes to the one outcome reporter.  The pre-create
    hook may refuse it or change its key and metadata first; its post-finish is recorded
    before the caller answers (a form records all of them once every file is in)."""
    ctx = request.app[UPLOADS]
    engine = ctx.engine
    upload_id = uuid.uuid4().hex[:16]
    grant = authorize(request)
    spec = await _pre_create(request, upload_id, spec, grant)
    hooked = HookUpload(
        "http", upload_id, spec.key, spec.declared_size, 0, spec.metadata,
        principal=str(grant.principal),
    )  # fmt: skip
    if engine.hooks.wants("pre-finish"):

        async def pre_finish(size: int, sha256: str) -> None:
            done = replace(hooked, size=size, offset=size, sha256=sha256)
            await engine.hooks.blocking("pre-finish", done, hook_request(request))

        spec = replace(spec, before_finish=pre_finish)
    streaming(request)
    engine.hooks.notify("post-create", hooked, hook_request(request))
    observer = engine.hooks.progress(hooked, ctx.events.started(upload_id, spec.key))
    client = request_client(request).ip
    upload = ObjectUpload(
        engine.storage, engine.buffers_for(client), engine.settings, spec, observer
    )
    started = time.monotonic()
    result: StreamResult | None = None
    error: ProxyError | None = None
    ctx.active_keys[spec.key] += 1
    try:
        result = await upload.run(chunks)
        if ctx.dedup is not None:
            owner = spec.metadata.get(OWNER_METADATA)
            if owner is not None:
                await ctx.dedup.record(owner, result.key, result.size, result.sha256)
        hooked = replace(
            hooked, size=result.size, offset=result.size, sha256=result.sha256, etag=result.etag
        )
        if record_finish:
            await finish_hooks(request, [(result, hooked)])
        return result, hooked
    except ProxyError as e:
        error = e
        raise
    except asyncio.CancelledError:
        error = Cancelled("upload cancelled")
        raise
    except Exception as e:
        # A bug, not a client's or the store's doing: the traceback goes to the log.
        log.exception("upload id=%s: unexpected error", upload_id)
        error = ProxyError("internal error")
        raise error from e
    finally:
        ctx.active_keys[spec.key] -= 1
        if ctx.active_keys[spec.key] <= 0:
            del ctx.active_keys[spec.key]
        ctx.events.finished(
            Outcome(
                protocol="http",
                upload_id=upload_id,
                key=spec.key,
                size_bytes=result.size if result is not None else upload.received_bytes,
                sha256=result.sha256 if result is not None else None,
                seconds=time.monotonic() - started,
                error=error,
                client=client,
                auth=grant.via,
                metadata=spec.metadata,
                principal=str(grant.principal),
            )
        )


async def _pre_create(
    request: web.Request, upload_id: str, spec: UploadSpec, grant: Grant
) -> UploadSpec:
    """The pre-create hook's verdict: refused (raises), or the spec with the key (relative
    to key_prefix, held to the caller's signed key or prefix) and metadata it chose."""
    ctx = request.app[UPLOADS]
    hooks = ctx.engine.hooks
    if not hooks.wants("pre-create"):
        return spec
    reply = await hooks.blocking(
        "pre-create",
        HookUpload(
            "http",
            upload_id,
            spec.key,
            spec.declared_size,
            0,
            spec.metadata,
            principal=str(grant.principal),
        ),
        hook_request(request),
    )
    if reply.new_key is not None:
        grant.check_key(reply.new_key)
        spec = replace(spec, key=unreserved(ctx, full_key(ctx.config.key_prefix, reply.new_key)))
    if reply.new_metadata is not None:
        chosen = {_ascii(k).lower(): _ascii(v) for k, v in reply.new_metadata.items()}
        spec = replace(spec, metadata=hook_metadata(spec.metadata, chosen))
    return spec


async def finish_hooks(request: web.Request, done: list[tuple[StreamResult, HookUpload]]) -> None:
    """Record each object's post-finish before the success answer.  If the store will not
    keep them, the objects are deleted (while still ours) and the request fails: a 201
    whose notification could be lost would break the hooks' promise."""
    ctx = request.app[UPLOADS]
    hooks = ctx.engine.hooks
    req = hook_request(request)
    try:
        for _, hooked in done:
            await hooks.record_finish(hooked, req)
    except ProxyError:
        for result, _ in done:
            await delete_if_ours(ctx.engine.storage, result.key, result.etag)
        raise


def _result_json(ctx: Uploads, r: StreamResult, **extra: Any) -> dict[str, Any]:
    return {
        "bucket": ctx.bucket,
        "key": r.key,
        "size": r.size,
        "sha256": r.sha256,
        "etag": r.etag,
        **extra,
    }


async def put_upload(request: web.Request) -> web.StreamResponse:
    ctx = request.app[UPLOADS]
    pre = await preflight_put(request)
    assert pre.key is not None
    if (instant := await _instant(request, pre)) is not None:
        # The body is not read: aiohttp drops what arrives of it for lingering_time_s,
        # then closes the connection if it has not ended.
        return instant
    spec = UploadSpec(
        key=pre.key,
        max_size_bytes=pre.limit_bytes,
        declared_size=pre.size,
        content_type=_content_type(request),
        metadata=_owned(pre.grant),
        create_only=pre.create_only,
        expected=expected_digests(request.headers),
    )
    with ctx.slots.hold(pre.client.ip):
        result, _ = await _stream_one(request, spec, ctx.body(request))
    return web.json_response(_result_json(ctx, result), status=201)


def new_key(ctx: Uploads, grant: Grant, filename: str | None) -> str:
    """A generated key (upload.key_template, or a random id and the extension), under the
    signed prefix when there is one (validated like any key)."""
    prefix = grant.prefix or ""
    if ctx.config.key_template:
        relative = KeyTemplate(ctx.config.key_template).render(
            new_random_id(), filename, prefix=prefix
        )
    else:
        relative = prefix + generated_key("", filename)
    return unreserved(ctx, full_key(ctx.config.key_prefix, relative))


def unreserved(ctx: Uploads, key: str) -> str:
    """``key`` (a full object key) unless it lies under a prefix the proxy keeps for its
    own objects (``InvalidKey``): every key a client or a hook names passes here."""
    # The folder name itself too: on some stores an object "x" and a folder "x/" exclude
    # each other, so an object there could block the proxy's own writes.
    if key.startswith(ctx.reserved_prefixes) or any(
        key == p.rstrip("/") for p in ctx.reserved_prefixes
    ):
        raise InvalidKey("this key prefix is reserved for the proxy's own objects")
    return key


async def post_upload(request: web.Request) -> web.StreamResponse:
    ctx = request.app[UPLOADS]
    pre = await preflight_post(request)
    with ctx.slots.hold(pre.client.ip):
        if request.content_type == "multipart/form-data":
            return await _post_form(request, ctx, pre)
        filename = _disposition_filename(request)
        spec = UploadSpec(
            key=new_key(ctx, pre.grant, filename),
            max_size_bytes=pre.limit_bytes,
            declared_size=pre.size,
            content_type=_content_type(request),
            metadata=_owned(pre.grant),
            create_only=True,
            expected=expected_digests(request.headers),
        )
        result, _ = await _stream_one(request, spec, ctx.body(request))
    return web.json_response(_result_json(ctx, result), status=201)


def _disposition_filename(request: web.Request) -> str | None:
    disp = request.headers.get("Content-Disposition")
    if not disp:
        return None
    m = re.search(r'filename="?([^";]+)"?', disp)
    return m.group(1) if m else None


async def _post_form(request: web.Request, ctx: Uploads, pre: Preflight) -> web.StreamResponse:
    """Each file field of the form becomes its own object; all or none are kept."""
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, KeyError) as e:
        raise BadForm(f"malformed multipart/form-data: {e}") from None
    limit = pre.limit_bytes
    pace = ctx.new_pace()
    stored: list[dict[str, Any]] = []
    done: list[tuple[StreamResult, HookUpload]] = []
    fields = field_bytes = 0
    try:
        while True:
            await asyncio.sleep(0)  # see MAX_FORM_FIELDS
            try:
                # The boundaries and part headers between files are the client's to send
                # too: the same idle timeout and minimum rate hold for them.
                part = await from_client(reader.next, ctx.config.idle_timeout_s, pace)
            except (ValueError, AssertionError, HttpProcessingError, ConnectionError) as e:
                raise BadForm(f"malformed multipart/form-data: {e}") from None
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise BadForm("nested multipart bodies are not supported")
            if part.filename is None:
                fields += 1
                if fields > MAX_FORM_FIELDS:
                    raise BadForm(f"the form has more than {MAX_FORM_FIELDS} fields")
                small = functools.partial(part.read_chunk, 8192)
                field_bytes += await _skip_field(part, ctx.chunks(part, pace, small))
                if field_bytes > MAX_FORM_FIELDS_BYTES:
                    raise BadForm(
                        f"the form's fields other than files exceed {MAX_FORM_FIELDS_BYTES} bytes"
                    )
                continue
            ctx.policy.check(part.headers.get("Content-Type"), part.filename)
            used = sum(int(s["size"]) for s in stored)
            spec = UploadSpec(
                key=new_key(ctx, pre.grant, part.filename),
                max_size_bytes=limit - used,
                content_type=part.headers.get("Content-Type", "application/octet-stream"),
                metadata={"filename": _ascii(part.filename), **_owned(pre.grant)},
                create_only=True,
            )
            chunks = ctx.chunks(part, pace, functools.partial(part.read_chunk, READ_CHUNK_BYTES))
            result, hooked = await _stream_one(request, spec, chunks, record_finish=False)
            done.append((result, hooked))
            stored.append(_result_json(ctx, result, field=part.name, filename=part.filename))
        if not stored:
            raise NoFiles("the form holds no file field")
        # All or nothing: the post-finish events only once every file is in.
        await finish_hooks(request, done)
    except BaseException:
        for s in stored:
            await asyncio.shield(ctx.engine.storage.delete_object(str(s["key"])))
        raise
    return web.json_response(stored, status=201)


async def _skip_field(part: BodyPartReader, chunks: AsyncIterator[bytes]) -> int:
    """Read and drop a field that is not a file; how many bytes it had."""
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > MAX_FORM_FIELD_BYTES:
            raise BadForm(f"form field {part.name!r} exceeds {MAX_FORM_FIELD_BYTES} bytes")
    return seen


def _ascii(value: str) -> str:
    """S3 user metadata travels in HTTP headers: keep it printable ASCII."""
    return "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in value)[:255]


def add_routes(app: web.Application) -> None:
    app.router.add_route(
        "PUT", "/uploads/{key:[\\s\\S]+}", reported(put_upload), expect_handler=expect_put
    )
    app.router.add_route("POST", "/uploads", reported(post_upload), expect_handler=expect_post)
