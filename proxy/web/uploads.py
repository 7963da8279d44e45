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
import base64
import binascii
import functools
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.auth import Authenticator, Grant
from proxy.config import LimitsConfig, UploadConfig
from proxy.engine.buffers import BufferPool, ClientBuffers
from proxy.engine.limits import (
    BodyPace,
    ClientInfo,
    ContentPolicy,
    Network,
    UploadSlots,
    UploadStats,
    client_group,
    client_info,
)
from proxy.engine.pipeline import StreamObserver, StreamSettings
from proxy.engine.upload import ExpectedDigests, ObjectUpload, StreamResult, UploadSpec
from proxy.errors import (
    BadDigest,
    BadForm,
    Cancelled,
    ClientTimeout,
    ExpectationFailed,
    IncompleteBody,
    InvalidKey,
    KeyExists,
    NoFiles,
    ProxyError,
    TooLarge,
    TooSlow,
)
from proxy.keys import full_key, generated_key
from proxy.storage.base import Storage
from proxy.web.errors import error_response

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")
READ_CHUNK_BYTES = 1024 * 1024
MAX_FORM_FIELD_BYTES = 64 * 1024
_REPR_DIGEST_RE = re.compile(r"(?:^|,)\s*sha-256\s*=\s*:([A-Za-z0-9+/=]*):\s*(?:;[^,]*)?(?=,|$)")


class UploadHooks:
    """What the upload handlers report; metrics plug in here.  The default does nothing.

    Every upload request ends in exactly one report: ``rejected`` when it was refused
    before its body streaming began, else ``started`` followed by ``finished`` for each
    object (a form may carry several).
    """

    def rejected(self, error: ProxyError) -> None:
        pass

    def started(self, upload_id: str, key: str) -> StreamObserver | None:
        return None

    def created(self, upload_id: str, key: str) -> None:
        """A multi-request upload (tus) was created; ``finished`` reports its completion."""

    def transfer_started(self, upload_id: str, key: str) -> StreamObserver | None:
        """One body of a multi-request upload (a tus PATCH) begins streaming."""
        return None

    def transfer_finished(self, upload_id: str) -> None:
        pass

    def finished(
        self,
        upload_id: str,
        result: StreamResult | None,
        error: ProxyError | None,
        seconds: float,
        received_bytes: int,
    ) -> None:
        pass


def admit_all() -> None:
    """The admission check when nothing limits new uploads."""


class _Counting:
    """Adds received bytes to the shared stats, then passes every event on."""

    def __init__(self, stats: UploadStats, inner: StreamObserver | None) -> None:
        self._stats = stats
        self._inner = inner

    def received(self, nbytes: int) -> None:
        self._stats.received_bytes += nbytes
        if self._inner is not None:
            self._inner.received(nbytes)

    def hashed(self, nbytes: int, seconds: float) -> None:
        if self._inner is not None:
            self._inner.hashed(nbytes, seconds)

    def stored(self, nbytes: int) -> None:
        if self._inner is not None:
            self._inner.stored(nbytes)


@contextmanager
def transfer(ctx: UploadContext, upload_id: str, key: str) -> Iterator[StreamObserver]:
    """Observer for one body of a multi-request upload: live progress, byte counters and
    the status line's byte count, without counting it as an upload."""
    try:
        yield _Counting(ctx.stats, ctx.hooks.transfer_started(upload_id, key))
    finally:
        ctx.hooks.transfer_finished(upload_id)


@dataclass
class UploadContext:
    """What the upload handlers use.  Storage and pool are filled in at start-up.

    ``admit`` raises a :class:`ProxyError` when no new upload may start now (memory
    pressure); it runs right after authentication, the Expect handler included.
    """

    config: UploadConfig
    bucket: str
    hooks: UploadHooks
    auth: Authenticator
    slots: UploadSlots
    admit: Callable[[], None] = admit_all
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    policy: ContentPolicy = field(default_factory=ContentPolicy)
    trusted_proxies: tuple[Network, ...] = ()
    stats: UploadStats = field(default_factory=UploadStats)
    # Hard bound on one part upload (the tus writer's; see StreamSettings.part_timeout_s).
    part_timeout_s: float | None = None
    # Keys with a plain upload running in this process: the stale sweeper spares them.
    active_keys: Counter[str] = field(default_factory=Counter)
    # Key prefixes plain uploads may not write to (tus state and tus objects live there).
    reserved_prefixes: tuple[str, ...] = ()
    _storage: Storage | None = None
    _pool: BufferPool | None = None

    def bind(self, storage: Storage, pool: BufferPool) -> None:
        self._storage, self._pool = storage, pool

    @property
    def storage(self) -> Storage:
        assert self._storage is not None, "storage is not open yet"
        return self._storage

    @property
    def pool(self) -> BufferPool:
        assert self._pool is not None, "buffer pool is not set up yet"
        return self._pool

    def buffers_for(self, client_ip: str) -> ClientBuffers:
        """The buffer pool as seen by this client's address group (its own cap)."""
        return self.pool.client(client_group(client_ip))

    def chunks(
        self,
        stream: Any,
        pace: BodyPace | None = None,
        read: Callable[[], Awaitable[bytes]] | None = None,
    ) -> AsyncIterator[bytes]:
        """A request body (or one form part of it) as chunks, under the idle timeout and
        the minimum rate.  Pass one ``pace`` for every part of one request."""
        if pace is None:
            pace = self.new_pace()
        return body_chunks(stream, self.config.idle_timeout_s, read, pace)

    def new_pace(self) -> BodyPace:
        lc = self.limits
        return BodyPace(lc.min_body_rate_bytes_per_s, lc.body_rate_grace_s)

    @property
    def settings(self) -> StreamSettings:
        c = self.config
        return StreamSettings(
            part_size_bytes=c.part_size_bytes,
            parts_in_flight=c.parts_in_flight,
            admission_timeout_s=c.admission_timeout_s,
            part_checksum=c.part_checksum,
            hash_in_thread=c.hash_in_thread,
            part_timeout_s=self.part_timeout_s,
        )


UPLOADS = web.AppKey("uploads", UploadContext)
_CLIENT = web.RequestKey("client", ClientInfo)
_GRANT = web.RequestKey("grant", Grant)
_STREAMED = web.RequestKey("streamed", bool)


def request_client(request: web.Request) -> ClientInfo:
    """The real client behind trusted proxies (cached per request)."""
    info = request.get(_CLIENT)
    if info is None:
        info = client_info(
            request.remote,
            request.headers.get("X-Forwarded-For"),
            request.headers.get("X-Forwarded-Proto"),
            request.scheme,
            request.app[UPLOADS].trusted_proxies,
        )
        request[_CLIENT] = info
    assert isinstance(info, ClientInfo)
    return info


def authorize(request: web.Request) -> Grant:
    """Authenticate once per request; raises 401/403 as a ProxyError."""
    grant = request.get(_GRANT)
    if grant is None:
        grant = request.app[UPLOADS].auth.authenticate(
            request.method, request.headers, request.query
        )
        request[_GRANT] = grant
    assert isinstance(grant, Grant)
    return grant


@dataclass(frozen=True)
class Preflight:
    """What the header checks decided; ``key`` is None where the server generates keys."""

    key: str | None
    size: int | None
    limit_bytes: int
    grant: Grant
    client: ClientInfo


_PREFLIGHT = web.RequestKey("preflight", Preflight)


def _b64(value: str, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != size:
        raise BadDigest(f"{what} is not a base64 {size}-byte digest")
    return raw


def expected_digests(headers: Any) -> ExpectedDigests:
    """Whole-body digests from ``Content-MD5``, ``Repr-Digest`` or ``X-Content-SHA256``."""
    md5 = sha256 = None
    if (v := headers.get("Content-MD5")) is not None:
        md5 = _b64(v, 16, "Content-MD5")
    if (v := headers.get("Repr-Digest")) is not None:
        m = _REPR_DIGEST_RE.search(v)
        if m:
            sha256 = _b64(m.group(1), 32, "Repr-Digest sha-256")
        elif "sha-256" in v:
            raise BadDigest("Repr-Digest sha-256 is malformed")
    if (v := headers.get("X-Content-SHA256")) is not None:
        v = v.strip()
        try:
            own = bytes.fromhex(v) if len(v) == 64 else _b64(v, 32, "X-Content-SHA256")
        except ValueError:
            raise BadDigest("X-Content-SHA256 is not hex or base64 SHA-256") from None
        if sha256 is not None and own != sha256:
            raise BadDigest("Repr-Digest and X-Content-SHA256 disagree")
        sha256 = own
    return ExpectedDigests(md5=md5, sha256=sha256)


def _declared_size(request: web.Request, limit: int) -> int | None:
    size = request.content_length
    if size is not None and size > limit:
        raise TooLarge(f"declared body of {size} bytes exceeds the limit of {limit} bytes")
    return size


async def from_client(
    read: Callable[[], Awaitable[T]], idle_timeout_s: float, pace: BodyPace | None
) -> T:
    """``read()`` (a read of the request body) under the idle timeout and ``pace``'s
    minimum rate; the time it takes goes on the pace's clock.  Only time spent in here,
    waiting for the client, counts: not the time the caller holds back (back-pressure)."""
    allowance_s = float("inf") if pace is None else pace.allowance_s()
    if pace is not None and allowance_s <= 0:
        raise _too_slow(pace)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(min(idle_timeout_s, allowance_s)):
            return await read()
    except TimeoutError:
        if pace is not None and allowance_s < idle_timeout_s:
            raise _too_slow(pace) from None
        raise ClientTimeout(f"no body bytes for {idle_timeout_s}s") from None
    finally:
        if pace is not None:
            pace.record(loop.time() - started, 0)


async def body_chunks(
    stream: Any,
    idle_timeout_s: float,
    read: Callable[[], Awaitable[bytes]] | None = None,
    pace: BodyPace | None = None,
) -> AsyncIterator[bytes]:
    """The body as chunks; a stall longer than ``idle_timeout_s``, a rate below ``pace``'s
    minimum or a broken body raises (see :func:`from_client`)."""
    reader = read or stream.readany
    while True:
        try:
            chunk = await from_client(reader, idle_timeout_s, pace)
        except (HttpProcessingError, ConnectionError, EOFError) as e:
            raise IncompleteBody(f"the request body ended early ({type(e).__name__})") from None
        except Exception as e:
            if type(e).__name__ in ("ClientPayloadError", "PayloadEncodingError"):
                raise IncompleteBody("the request body is malformed or ended early") from None
            raise
        if pace is not None:
            pace.record(0, len(chunk))
        if not chunk:
            return
        yield chunk


def _too_slow(pace: BodyPace) -> TooSlow:
    return TooSlow(
        f"the body arrives at less than {pace.min_bytes_per_s:g} bytes/s "
        f"(averaged over {pace.window_s:g}s)"
    )


def _content_type(request: web.Request) -> str:
    ct = request.headers.get("Content-Type", "")
    return ct if ct and len(ct) <= 255 else "application/octet-stream"


async def _preflight_put(request: web.Request) -> Preflight:
    """Checks that need no body; cached so the Expect handler and the handler share them."""
    if _PREFLIGHT in request:
        return request[_PREFLIGHT]
    ctx = request.app[UPLOADS]
    grant = authorize(request)
    ctx.admit()
    client_key = request.match_info["key"]
    key = _unreserved(ctx, full_key(ctx.config.key_prefix, client_key))
    grant.check_key(client_key)
    limit = grant.limit(ctx.config.max_upload_size_bytes)
    size = _declared_size(request, limit)
    ctx.policy.check(request.headers.get("Content-Type"), client_key)
    expected_digests(request.headers)
    client = request_client(request)
    ctx.slots.check(client.ip)
    if not ctx.config.overwrite and await ctx.storage.head(key) is not None:
        raise KeyExists(f"an object with key {key!r} already exists")
    request[_PREFLIGHT] = pre = Preflight(key, size, limit, grant, client)
    return pre


async def _preflight_post(request: web.Request) -> Preflight:
    if _PREFLIGHT in request:
        return request[_PREFLIGHT]
    ctx = request.app[UPLOADS]
    grant = authorize(request)
    ctx.admit()
    grant.check_generated()
    limit = grant.limit(ctx.config.max_upload_size_bytes)
    size = _declared_size(request, limit)
    if request.content_type != "multipart/form-data":
        # Form parts carry their own type and name; they are checked as they arrive.
        ctx.policy.check(request.headers.get("Content-Type"), _disposition_filename(request))
    client = request_client(request)
    ctx.slots.check(client.ip)
    request[_PREFLIGHT] = pre = Preflight(None, size, limit, grant, client)
    return pre


async def expect_put(request: web.Request) -> web.StreamResponse | None:
    """Answer ``Expect: 100-continue`` only when the upload can be accepted."""
    return await expect_with(request, _preflight_put)


async def expect_post(request: web.Request) -> web.StreamResponse | None:
    return await expect_with(request, _preflight_post)


async def expect_with(
    request: web.Request, check: Callable[[web.Request], Any]
) -> web.StreamResponse | None:
    """Run the pre-body ``check``; answer 100 Continue only if it passes."""
    if request.headers.get("Expect", "").lower() != "100-continue":
        return error_response(ExpectationFailed("unsupported Expect header"))
    try:
        result = check(request)
        if asyncio.iscoroutine(result):
            await result
    except ProxyError as e:
        request.app[UPLOADS].hooks.rejected(e)
        return error_response(e, close=True)
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
    return None


async def _stream_one(
    request: web.Request,
    spec: UploadSpec,
    chunks: AsyncIterator[bytes],
) -> StreamResult:
    """Stream one object, with one log line and one hooks report for its outcome."""
    ctx = request.app[UPLOADS]
    upload_id = uuid.uuid4().hex[:16]
    request[_STREAMED] = True
    observer = _Counting(ctx.stats, ctx.hooks.started(upload_id, spec.key))
    buffers = ctx.buffers_for(request_client(request).ip)
    streamer = ObjectUpload(ctx.storage, buffers, ctx.settings, spec, observer)
    started = time.monotonic()
    result: StreamResult | None = None
    error: ProxyError | None = None
    ctx.active_keys[spec.key] += 1
    try:
        result = await streamer.run(chunks)
        return result
    except ProxyError as e:
        error = e
        raise
    except asyncio.CancelledError:
        error = Cancelled("upload cancelled")
        raise
    except Exception as e:
        error = ProxyError("internal error")
        raise error from e
    finally:
        ctx.active_keys[spec.key] -= 1
        if ctx.active_keys[spec.key] <= 0:
            del ctx.active_keys[spec.key]
        if error is None:
            ctx.stats.completed += 1
        else:
            ctx.stats.failed += 1
        seconds = time.monotonic() - started
        nbytes = streamer.received_bytes
        rate = nbytes / seconds / 2**20 if seconds > 0 else 0.0
        log.info(
            "upload id=%s key=%r bytes=%d sha256=%s duration_s=%.3f rate_mib_s=%.1f result=%s",
            upload_id,
            spec.key,
            nbytes,
            result.sha256 if result else "-",
            seconds,
            rate,
            "ok" if error is None else error.code,
            extra={
                "upload": {
                    "id": upload_id,
                    "key": spec.key,
                    "bytes": nbytes,
                    "sha256": result.sha256 if result else None,
                    "duration_s": round(seconds, 3),
                    "rate_mib_s": round(rate, 2),
                    "result": "ok" if error is None else error.code,
                    "remote": request_client(request).ip,
                    "auth": authorize(request).via,
                }
            },
        )
        ctx.hooks.finished(upload_id, result, error, seconds, nbytes)


def _result_json(ctx: UploadContext, r: StreamResult, **extra: Any) -> dict[str, Any]:
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
    pre = await _preflight_put(request)
    assert pre.key is not None
    spec = UploadSpec(
        key=pre.key,
        max_size_bytes=pre.limit_bytes,
        declared_size=pre.size,
        content_type=_content_type(request),
        create_only=not ctx.config.overwrite,
        expected=expected_digests(request.headers),
    )
    with ctx.slots.hold(pre.client.ip):
        result = await _stream_one(request, spec, ctx.chunks(request.content))
    return web.json_response(_result_json(ctx, result), status=201)


def _new_key(ctx: UploadContext, grant: Grant, filename: str | None) -> str:
    """A generated key, under the signed prefix when there is one (validated like any key)."""
    return _unreserved(
        ctx, full_key(ctx.config.key_prefix, (grant.prefix or "") + generated_key("", filename))
    )


def _unreserved(ctx: UploadContext, key: str) -> str:
    # The folder name itself too: on some stores an object "x" and a folder "x/" exclude
    # each other, so an object there could block the proxy's own writes.
    if key.startswith(ctx.reserved_prefixes) or any(
        key == p.rstrip("/") for p in ctx.reserved_prefixes
    ):
        raise InvalidKey("this key prefix is reserved for the proxy's own objects")
    return key


async def post_upload(request: web.Request) -> web.StreamResponse:
    ctx = request.app[UPLOADS]
    pre = await _preflight_post(request)
    with ctx.slots.hold(pre.client.ip):
        if request.content_type == "multipart/form-data":
            return await _post_form(request, ctx, pre)
        filename = _disposition_filename(request)
        spec = UploadSpec(
            key=_new_key(ctx, pre.grant, filename),
            max_size_bytes=pre.limit_bytes,
            declared_size=pre.size,
            content_type=_content_type(request),
            create_only=True,
            expected=expected_digests(request.headers),
        )
        result = await _stream_one(request, spec, ctx.chunks(request.content))
    return web.json_response(_result_json(ctx, result), status=201)


def _disposition_filename(request: web.Request) -> str | None:
    disp = request.headers.get("Content-Disposition")
    if not disp:
        return None
    m = re.search(r'filename="?([^";]+)"?', disp)
    return m.group(1) if m else None


async def _post_form(
    request: web.Request, ctx: UploadContext, pre: Preflight
) -> web.StreamResponse:
    """Each file field of the form becomes its own object; all or none are kept."""
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, KeyError) as e:
        raise BadForm(f"malformed multipart/form-data: {e}") from None
    limit = pre.limit_bytes
    pace = ctx.new_pace()
    stored: list[dict[str, Any]] = []
    try:
        while True:
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
                small = functools.partial(part.read_chunk, 8192)
                await _skip_field(part, ctx.chunks(part, pace, small))
                continue
            ctx.policy.check(part.headers.get("Content-Type"), part.filename)
            used = sum(int(s["size"]) for s in stored)
            spec = UploadSpec(
                key=_new_key(ctx, pre.grant, part.filename),
                max_size_bytes=limit - used,
                content_type=part.headers.get("Content-Type", "application/octet-stream"),
                metadata={"filename": _ascii(part.filename)},
                create_only=True,
            )
            chunks = ctx.chunks(part, pace, functools.partial(part.read_chunk, READ_CHUNK_BYTES))
            result = await _stream_one(request, spec, chunks)
            stored.append(_result_json(ctx, result, field=part.name, filename=part.filename))
    except BaseException:
        for s in stored:
            await asyncio.shield(ctx.storage.delete_object(str(s["key"])))
        raise
    if not stored:
        raise NoFiles("the form holds no file field")
    return web.json_response(stored, status=201)


async def _skip_field(part: BodyPartReader, chunks: AsyncIterator[bytes]) -> None:
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > MAX_FORM_FIELD_BYTES:
            raise BadForm(f"form field {part.name!r} exceeds {MAX_FORM_FIELD_BYTES} bytes")


def _ascii(value: str) -> str:
    """S3 user metadata travels in HTTP headers: keep it printable ASCII."""
    return "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in value)[:255]


def _reported(handler: Handler) -> Handler:
    """Report a request that failed before any body streaming began as rejected."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ProxyError as e:
            if not request.get(_STREAMED):
                request.app[UPLOADS].hooks.rejected(e)
            raise

    return wrapped


def add_routes(app: web.Application) -> None:
    app.router.add_route(
        "PUT", "/uploads/{key:[\\s\\S]+}", _reported(put_upload), expect_handler=expect_put
    )
    app.router.add_route("POST", "/uploads", _reported(post_upload), expect_handler=expect_post)
