"""Builds the aiohttp Application: routes, the error middleware, resources via cleanup_ctx."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy import __version__, tus
from proxy.buffers import BufferPool
from proxy.config import Config
from proxy.errors import ProxyError, StorageError, StorageUnavailable
from proxy.http_upload import UPLOADS, UploadContext, UploadHooks, add_routes
from proxy.responses import error_response
from proxy.storage.base import Storage
from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import EmbeddedSeaweed, load_or_create_credentials

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "ERR_BAD_REQUEST",
    404: "ERR_NOT_FOUND",
    405: "ERR_METHOD_NOT_ALLOWED",
    408: "ERR_CLIENT_TIMEOUT",
    411: "ERR_LENGTH_REQUIRED",
    413: "ERR_TOO_LARGE",
    417: "ERR_EXPECTATION",
    431: "ERR_HEADERS_TOO_LARGE",
}


@dataclass
class Runtime:
    """What the running app holds; tests may hand in their own storage."""

    config: Config
    storage: Storage | None = None
    embedded: EmbeddedSeaweed | None = None
    hooks: UploadHooks = field(default_factory=UploadHooks)
    pool: BufferPool | None = None


RUNTIME = web.AppKey("runtime", Runtime)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except asyncio.CancelledError:
        raise
    except ProxyError as e:
        body_left = not request.content.is_eof()
        if e.status >= 500:
            log.warning("%s %s -> %d %s: %s", request.method, request.path, e.status, e.code,
                        e.message)
        return error_response(e, close=body_left)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, f"ERR_HTTP_{e.status}")
        err = ProxyError(e.reason, code=code, status=e.status)
        err.headers.update({k: v for k, v in e.headers.items() if k.lower() == "allow"})
        return error_response(err, close=not request.content.is_eof())
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(ProxyError("internal error"), close=True)


async def open_storage(config: Config) -> tuple[S3Storage, EmbeddedSeaweed | None]:
    """The configured store, started (embedded) and opened; the bucket checked."""
    sc = config.storage
    embedded = None
    if sc.backend == "embedded":
        creds = load_or_create_credentials(sc.embedded.data_dir)
        embedded = EmbeddedSeaweed(
            sc.embedded.data_dir,
            bucket=sc.bucket,
            credentials=creds,
            s3_port=sc.embedded.s3_port,
            weed_binary=sc.embedded.weed_binary,
        )
        await embedded.start(sc.embedded.start_timeout_s)
        endpoint, access, secret = embedded.endpoint_url, creds.access_key, creds.secret_key
    else:
        endpoint, access, secret = sc.endpoint_url, None, None
    verify: bool | str = sc.ca_bundle or sc.verify_tls
    storage = S3Storage(
        bucket=sc.bucket,
        endpoint_url=endpoint or None,
        region=sc.region,
        addressing_style=sc.addressing_style,
        verify=verify,
        access_key=access,
        secret_key=secret,
        credentials_file=sc.credentials_file or None,
        profile=sc.profile or None,
        connect_timeout_s=sc.connect_timeout_s,
        read_timeout_s=sc.read_timeout_s,
        retry_attempts=sc.retry_attempts,
        retry_base_delay_s=sc.retry_base_delay_s,
        max_pool_connections=sc.max_pool_connections,
    )
    await storage.open()
    try:
        if embedded is not None:
            await _wait_bucket(storage, sc.embedded.start_timeout_s)
        else:
            await storage.check()
    except (StorageError, StorageUnavailable, TimeoutError) as e:
        # An S3 that is down at boot is not a reason to crash-loop: /readyz reports it.
        log.warning("storage check failed at start-up: %s", e)
    return storage, embedded


async def _wait_bucket(storage: S3Storage, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                await storage.create_bucket()
                return
            except (StorageError, StorageUnavailable):
                await asyncio.sleep(0.5)


async def _storage_ctx(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    owned: S3Storage | None = None
    if rt.storage is None:
        owned, rt.embedded = await open_storage(rt.config)
        rt.storage = owned
    try:
        yield
    finally:
        if owned is not None:
            await owned.close()
            rt.storage = None
        if rt.embedded is not None:
            await rt.embedded.stop()


async def _uploads_ctx(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    uc = rt.config.upload
    if rt.pool is None:
        rt.pool = BufferPool(uc.memory_budget_bytes, uc.part_size_bytes,
                             keep_idle=uc.parts_in_flight + 1)
    assert rt.storage is not None
    app[UPLOADS].bind(rt.storage, rt.pool)
    if rt.config.tus.enabled:
        tus.bind(app, rt.storage)
    yield


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


def build_app(runtime: Runtime) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app[RUNTIME] = runtime
    app[UPLOADS] = UploadContext(
        config=runtime.config.upload, bucket=runtime.config.storage.bucket, hooks=runtime.hooks
    )
    app.cleanup_ctx.append(_storage_ctx)
    app.cleanup_ctx.append(_uploads_ctx)
    add_routes(app)
    if runtime.config.tus.enabled:
        tus.add_routes(app, runtime.config.tus)
        app.cleanup_ctx.append(tus.sweeper_ctx)
    app.router.add_get("/healthz", healthz)
    return app
