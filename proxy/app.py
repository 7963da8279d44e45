"""Builds the aiohttp Application: routes, the error middleware, resources via cleanup_ctx."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy import __version__
from proxy.auth import Authenticator, TokenSet
from proxy.config import Config, default_client_buffer_bytes
from proxy.engine.buffers import BufferPool, head_bytes_for
from proxy.engine.limits import ContentPolicy, UploadSlots
from proxy.errors import REASONS, StorageError, StorageUnavailable
from proxy.obs.memory import HeapTrimmer, MemoryMonitor, MemoryReader, read_memory
from proxy.obs.metrics import Metrics
from proxy.storage.base import OpenMultipart, Storage
from proxy.storage.connect import s3_storage
from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import EmbeddedSeaweed, load_or_create_credentials
from proxy.storage.sweeper import LiveUploadPredicate, StaleSweeper, resolve
from proxy.web import ops as http_ops
from proxy.web import page, tus
from proxy.web.errors import error_middleware, hide_server_banner
from proxy.web.ops import MetricsHooks, Ops, Readiness, samplers_ctx
from proxy.web.uploads import UPLOADS, UploadContext, UploadHooks, add_routes

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What the running app holds; tests may hand in their own storage, registry and
    memory reader."""

    config: Config
    storage: Storage | None = None
    embedded: EmbeddedSeaweed | None = None
    # None: the upload handlers report into the metrics.
    hooks: UploadHooks | None = None
    pool: BufferPool | None = None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    memory_reader: MemoryReader = read_memory
    ops: Ops = field(init=False)

    # "Is this open multipart upload owned by a live tus upload?"  The stale sweeper
    # never aborts one it claims.  None: no such uploads (tus is not mounted).
    upload_is_live: LiveUploadPredicate | None = None
    sweeper: StaleSweeper | None = None
    # Set by build_app: what the upload handlers share (slots, stats), for status reports.
    uploads: UploadContext | None = None

    def __post_init__(self) -> None:
        uc = self.config.upload
        metrics = Metrics(
            self.registry,
            reasons=REASONS,
            # Uploads that can hold a full part at once: beyond that, live series would
            # only grow with clients queueing for a buffer.
            live_uploads_max=uc.memory_budget_bytes // uc.part_size_bytes,
            version=__version__,
        )
        memory = MemoryMonitor(self.config.memory, self.memory_reader)
        self.ops = Ops(
            metrics,
            memory,
            Readiness(lambda: self.storage, memory),
            pool=lambda: self.pool,
            operators=TokenSet(self.config.auth.operator_token_sha256),
        )


RUNTIME = web.AppKey("runtime", Runtime)


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
            memory_limit_bytes=sc.embedded.memory_limit_bytes,
        )
        await embedded.start(sc.embedded.start_timeout_s)
        endpoint, access, secret = embedded.endpoint_url, creds.access_key, creds.secret_key
    else:
        endpoint, access, secret = sc.endpoint_url, None, None
    storage = s3_storage(sc, endpoint_url=endpoint, access_key=access, secret_key=secret)
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
    if isinstance(rt.storage, S3Storage):
        rt.storage.set_observer(rt.ops.metrics.storage_op)
    try:
        yield
    finally:
        # The first context in, so the last out: the drain and its aborts, the sweepers
        # and the other contexts are done before the store goes (systemd's KillMode=mixed
        # leaves stopping it to us).
        if owned is not None:
            await owned.close()
            rt.storage = None
        if rt.embedded is not None:
            await rt.embedded.stop()


async def _uploads_ctx(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    uc, lc = rt.config.upload, rt.config.limits
    if rt.pool is None:
        client_cap = lc.max_buffer_bytes_per_client or default_client_buffer_bytes(uc)
        rt.pool = BufferPool(
            uc.memory_budget_bytes,
            uc.part_size_bytes,
            keep_idle=uc.parts_in_flight + 1,
            on_idle=HeapTrimmer(),
            head_bytes=head_bytes_for(
                uc.memory_budget_bytes,
                uc.part_size_bytes,
                lc.max_concurrent_uploads,
                client_cap,
                lc.max_uploads_per_client,
            ),
            client_cap_bytes=client_cap,
        )
    assert rt.storage is not None
    app[UPLOADS].bind(rt.storage, rt.pool)
    if rt.config.tus.enabled:
        tus.bind(app, rt.storage)
    yield


async def _sweeper_ctx(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    uc = rt.config.upload
    if uc.stale_upload_after_s <= 0:
        yield
        return
    assert rt.storage is not None
    ctx = app[UPLOADS]

    async def live(upload: OpenMultipart) -> bool:
        # Read upload_is_live at call time so a tus layer may plug in after start-up.
        if upload.key in ctx.active_keys:
            return True
        return rt.upload_is_live is not None and await resolve(rt.upload_is_live(upload))

    rt.sweeper = StaleSweeper(
        rt.storage, uc.key_prefix, older_than_s=uc.stale_upload_after_s, is_live=live
    )
    task = asyncio.create_task(rt.sweeper.run(uc.sweep_interval_s), name="stale-sweeper")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def build_app(runtime: Runtime) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app.on_response_prepare.append(hide_server_banner)
    app[RUNTIME] = runtime
    cfg = runtime.config
    links = page.verifier_for(cfg)
    app[UPLOADS] = runtime.uploads = UploadContext(
        config=cfg.upload,
        bucket=cfg.storage.bucket,
        hooks=runtime.hooks or MetricsHooks(runtime.ops.metrics),
        admit=runtime.ops.memory.check_admission,
        limits=cfg.limits,
        auth=Authenticator(
            enabled=cfg.auth.enabled,
            token_sha256=cfg.auth.token_sha256,
            signing_secret=cfg.auth.signing_secret,
            max_url_lifetime_s=cfg.auth.signed_url_max_lifetime_s,
            links=links,
        ),
        slots=UploadSlots(cfg.limits.max_concurrent_uploads, cfg.limits.max_uploads_per_client),
        policy=ContentPolicy(cfg.limits.allowed_content_types, cfg.limits.allowed_extensions),
        trusted_proxies=cfg.server.trusted_proxies,
        # The S3 client's retries end within this; the bound also covers what its socket
        # timeouts do not (a body send that stalls).
        part_timeout_s=cfg.storage.operation_bound_s,
    )
    app.cleanup_ctx.append(_storage_ctx)
    app.cleanup_ctx.append(_uploads_ctx)
    app.cleanup_ctx.append(_sweeper_ctx)
    app.cleanup_ctx.append(samplers_ctx)
    add_routes(app)
    http_ops.add_routes(app, runtime.ops)
    if runtime.config.tus.enabled:
        tus.add_routes(app, runtime.config.tus)
        app.cleanup_ctx.append(tus.sweeper_ctx)
        # Plain uploads may write neither the tus state nor where tus objects go (a key
        # squatted there before a tus upload completes would pass for its object).
        app[UPLOADS].reserved_prefixes = (
            cfg.tus.state_prefix,
            cfg.upload.key_prefix + cfg.tus.object_prefix,
        )
        if runtime.upload_is_live is None:
            # The stale-multipart sweeper must never abort a live tus upload's parts:
            # ask the upload's state in S3 (exact, and right across instances).
            tus_ctx = app[tus.TUS]
            runtime.upload_is_live = lambda u: tus_ctx.owns_multipart(u.key, u.upload_id)
    if cfg.page.enabled:
        page.add_routes(app, cfg, links, lambda: app[tus.TUS].svc)
    return app
