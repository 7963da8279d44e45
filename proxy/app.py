"""Builds the aiohttp Application: routes, the error middleware, and what the handlers use,
made in ``cleanup_ctx`` once the store is open and set there as AppKeys.

The composition root: the one module (with :mod:`proxy.server`) that wires the layers
together.  Before the app starts there is a :class:`Runtime` (config, metrics, memory
monitor, and what tests hand in); once it runs, the app holds ``STORAGE``,
:data:`~proxy.web.preflight.UPLOADS`, :data:`~proxy.web.tus_common.TUS` and ``SWEEPER``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy import __version__
from proxy.auth import Authenticator, TokenSet
from proxy.config import Config, default_client_buffer_bytes
from proxy.engine.buffers import BufferPool, head_bytes_for
from proxy.engine.context import Engine
from proxy.engine.dedup import ContentIndex
from proxy.engine.events import UploadEvents
from proxy.engine.limits import ContentPolicy, UploadSlots
from proxy.engine.pipeline import StreamSettings
from proxy.errors import REASONS, StartupError
from proxy.hooks.dispatch import Hooks
from proxy.hooks.outbox import Outbox
from proxy.obs.memory import HeapTrimmer, MemoryMonitor, MemoryReader, read_memory
from proxy.obs.metrics import Metrics
from proxy.storage.base import (
    Copier,
    ObjectReader,
    Observable,
    OpenMultipart,
    StateStore,
    Storage,
)
from proxy.storage.factory import open_storage
from proxy.storage.sweeper import StaleSweeper
from proxy.tus.maintenance import sweep_forever
from proxy.tus.service import TusService
from proxy.tus.state import TusStore
from proxy.web import downloads as http_downloads
from proxy.web import ops as http_ops
from proxy.web import page, resumable, tus
from proxy.web import uploads as http_uploads
from proxy.web.errors import error_middleware, hide_server_banner
from proxy.web.ops import OPS, Ops, Readiness, samplers_ctx
from proxy.web.preflight import UPLOADS, Uploads, close_if_tapped, transfer_coding_middleware
from proxy.web.tus_common import TUS, TusRoutes


@dataclass
class Runtime:
    """What exists before the app starts.  Tests may hand in their own storage, pool,
    registry and memory reader; a storage handed in is used as it is (not closed)."""

    config: Config
    storage: Storage | None = None
    pool: BufferPool | None = None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    memory_reader: MemoryReader = read_memory
    metrics: Metrics = field(init=False)
    memory: MemoryMonitor = field(init=False)
    events: UploadEvents = field(init=False)

    def __post_init__(self) -> None:
        uc = self.config.upload
        self.metrics = Metrics(
            self.registry,
            reasons=REASONS,
            # Uploads that can hold a full part at once: beyond that, live series would
            # only grow with clients queueing for a buffer.
            live_uploads_max=uc.memory_budget_bytes // uc.part_size_bytes,
            version=__version__,
        )
        self.memory = MemoryMonitor(self.config.memory, self.memory_reader)
        self.events = UploadEvents(self.metrics)


RUNTIME = web.AppKey("runtime", Runtime)
STORAGE = web.AppKey("storage", Storage)
POOL = web.AppKey("pool", BufferPool)
SWEEPER = web.AppKey("sweeper", StaleSweeper)
HOOKS = web.AppKey("hooks", Hooks)


def new_pool(config: Config) -> BufferPool:
    uc, lc = config.upload, config.limits
    client_cap = lc.max_buffer_bytes_per_client or default_client_buffer_bytes(uc)
    head = head_bytes_for(
        uc.memory_budget_bytes,
        uc.part_size_bytes,
        lc.max_concurrent_uploads,
        client_cap,
        lc.max_uploads_per_client,
    )
    # A head for every upload slot, at most a quarter of the budget, which rests may not
    # take: that many new uploads are admitted however many parts slow uploads hold.
    # (Shipped: 64 heads of 1 MiB of a 256 MiB pool; a whole-slot reserve in a small
    # pool would leave room for one rest at a time, one part stored at a time.)
    reserve = min(lc.max_concurrent_uploads * head, uc.memory_budget_bytes // 4)
    reserve = min(reserve, uc.memory_budget_bytes - (uc.part_size_bytes - head))
    return BufferPool(
        uc.memory_budget_bytes,
        uc.part_size_bytes,
        keep_idle=uc.parts_in_flight + 1,
        on_idle=HeapTrimmer(),
        head_bytes=head,
        client_cap_bytes=client_cap,
        head_reserve_bytes=reserve if head < uc.part_size_bytes else 0,
    )


def stream_settings(config: Config) -> StreamSettings:
    c = config.upload
    return StreamSettings(
        part_size_bytes=c.part_size_bytes,
        parts_in_flight=c.parts_in_flight,
        admission_timeout_s=c.admission_timeout_s,
        part_checksum=c.part_checksum,
        hash_in_thread=c.hash_in_thread,
        # The S3 client's retries end within this; the bound also covers what its socket
        # timeouts do not (a body send that stalls).
        part_timeout_s=config.storage.operation_bound_s,
    )


async def _storage_ctx(app: web.Application) -> AsyncIterator[None]:
    """The first context in, so the last out: the drain and its aborts, the sweepers and
    the other contexts are done before the store goes."""
    rt = app[RUNTIME]
    observer = rt.metrics.storage_op
    async with contextlib.AsyncExitStack() as stack:
        storage = rt.storage
        if storage is None:
            storage = await stack.enter_async_context(
                open_storage(rt.config.storage, observer=observer)
            )
        elif isinstance(storage, Observable):
            storage.set_observer(observer)
        app[STORAGE] = storage
        app[POOL] = rt.pool or new_pool(rt.config)
        yield


async def _uploads_ctx(app: web.Application) -> AsyncIterator[None]:
    """What the upload handlers (plain and tus) use, now that the store is open."""
    rt, cfg = app[RUNTIME], app[RUNTIME].config
    storage = app[STORAGE]
    hooks = _hooks(cfg, storage, rt)
    rt.events.hooks = hooks
    dedup = None
    # Mounted only where the store can hold it (tusd's idea: optional features follow
    # the backend's capabilities); every S3 store can.
    if cfg.dedup.enabled and isinstance(storage, StateStore) and isinstance(storage, Copier):
        dedup = ContentIndex(storage, cfg.dedup.index_prefix, rt.metrics)
    engine = Engine(
        storage=storage,
        pool=app[POOL],
        settings=stream_settings(cfg),
        events=rt.events,
        max_upload_size_bytes=cfg.upload.max_upload_size_bytes,
        key_prefix=cfg.upload.key_prefix,
        key_template=cfg.upload.key_template,
        hooks=hooks,
        dedup=dedup,
    )
    reserved: tuple[str, ...] = ()
    if hooks.outbox is not None:
        reserved = (cfg.tus.state_prefix,)  # the outbox lives there
    if cfg.tus.enabled:
        if not isinstance(storage, StateStore):
            raise StartupError("the storage backend cannot keep tus state: set tus.enabled = false")
        store = TusStore(storage, cfg.tus.state_prefix, cfg.tus.lock_lease_s)
        app[TUS] = TusRoutes(cfg.tus, TusService(cfg.tus, engine, store))
        # Plain uploads may write neither the tus state nor where tus objects go (a key
        # squatted there before a tus upload completes would pass for its object).
        reserved = (cfg.tus.state_prefix, cfg.upload.key_prefix + cfg.tus.object_prefix)
    if cfg.dedup.enabled:
        # Nobody uploads into the index (clients never read anything, so that is all).
        reserved += (cfg.dedup.index_prefix,)
    app[HOOKS] = hooks
    app[UPLOADS] = Uploads(
        config=cfg.upload,
        bucket=cfg.storage.bucket,
        engine=engine,
        auth=Authenticator(
            enabled=cfg.auth.enabled,
            token_sha256=cfg.auth.token_sha256,
            signing_secret=cfg.auth.signing_secret,
            max_url_lifetime_s=cfg.auth.signed_url_max_lifetime_s,
            links=page.verifier_of(app),
            scoped_tokens=cfg.auth.scoped_tokens,
        ),
        slots=UploadSlots(cfg.limits.max_concurrent_uploads, cfg.limits.max_uploads_per_client),
        admit=rt.memory.check_admission,
        limits=cfg.limits,
        policy=ContentPolicy(cfg.limits.allowed_content_types, cfg.limits.allowed_extensions),
        trusted_proxies=cfg.server.trusted_proxies,
        active_keys=Counter(),
        reserved_prefixes=reserved,
    )
    if cfg.downloads.enabled:
        if not isinstance(storage, ObjectReader):
            raise StartupError("the storage backend cannot serve downloads: downloads.enabled")
        app[http_downloads.DOWNLOADS] = http_downloads.Downloads(
            config=cfg.downloads,
            storage=storage,
            reader=storage,
            metrics=rt.metrics,
            key_prefix=cfg.upload.key_prefix,
            reserved_prefixes=reserved,
            tus_object_prefix=(cfg.upload.key_prefix + cfg.tus.object_prefix)
            if cfg.tus.enabled
            else None,
            lister=storage if isinstance(storage, StateStore) else None,
        )
    try:
        yield
    finally:
        await hooks.close()


def _hooks(cfg: Config, storage: Storage, rt: Runtime) -> Hooks:
    """The hooks, with their outbox beside the tus state (post-finish needs small
    conditional objects: a store without them cannot promise delivery)."""
    hc = cfg.hooks
    if not hc.enabled:
        return Hooks.disabled()
    outbox = None
    if "post-finish" in hc.events:
        if not isinstance(storage, StateStore):
            raise StartupError("the storage backend cannot keep the post-finish hook outbox")
        outbox = Outbox(
            storage,
            cfg.tus.state_prefix,
            # A delivery takes at most timeout_s; the claim outlives it, and one left by a
            # dead instance lapses soon after.
            claim_s=2 * hc.timeout_s + 10,
            retry_max_delay_s=hc.retry_max_delay_s,
        )
    return Hooks.build(hc, bucket=cfg.storage.bucket, outbox=outbox, registry=rt.registry)


async def _sweepers_ctx(app: web.Application) -> AsyncIterator[None]:
    """The stale-multipart sweeper and the tus sweeper, in the background."""
    cfg = app[RUNTIME].config
    uc = cfg.upload
    uploads = app[UPLOADS]
    tus_routes = app.get(TUS)
    tasks: list[asyncio.Task[None]] = []
    if uc.stale_upload_after_s > 0:

        async def live(upload: OpenMultipart) -> bool:
            # Never abort a running plain upload's parts, nor a live tus upload's: its
            # state in S3 says (exact, and right across instances).
            if upload.key in uploads.active_keys:
                return True
            if tus_routes is None:
                return False
            svc = tus_routes.service
            return await svc.store.owns_multipart(
                upload.key, upload.upload_id
            ) or await svc.concat.owns_multipart(upload.key, upload.upload_id)

        app[SWEEPER] = sweeper = StaleSweeper(
            app[STORAGE], uc.key_prefix, older_than_s=uc.stale_upload_after_s, is_live=live
        )
        tasks.append(asyncio.create_task(sweeper.run(uc.sweep_interval_s), name="stale-sweeper"))
    if tus_routes is not None and cfg.tus.sweep_interval_s > 0:
        tasks.append(asyncio.create_task(sweep_forever(tus_routes.service), name="tus-sweeper"))
    tasks.append(asyncio.create_task(app[HOOKS].run_outbox(), name="hook-outbox"))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def build_app(runtime: Runtime) -> web.Application:
    app = web.Application(middlewares=[error_middleware, transfer_coding_middleware])
    app.on_response_prepare.append(hide_server_banner)
    app.on_response_prepare.append(close_if_tapped)
    app[RUNTIME] = runtime
    cfg = runtime.config
    ops = Ops(
        runtime.metrics,
        runtime.memory,
        Readiness(lambda: app.get(STORAGE), runtime.memory),
        pool=lambda: app.get(POOL),
        operators=TokenSet(cfg.auth.operator_token_sha256),
    )
    app.cleanup_ctx.append(_storage_ctx)
    app.cleanup_ctx.append(_uploads_ctx)
    app.cleanup_ctx.append(_sweepers_ctx)
    app.cleanup_ctx.append(samplers_ctx)
    http_uploads.add_routes(app)
    http_ops.add_routes(app, ops)
    if cfg.tus.enabled:
        tus.add_routes(app, cfg.tus)
        # IETF resumable uploads on the same endpoint (proxy/web/resumable.py).
        app.middlewares.append(resumable.middleware_for(cfg.tus.base_path))
    if cfg.page.enabled:
        page.add_routes(app, cfg, page.verifier_for(cfg), lambda: app[TUS].service)
    if cfg.downloads.enabled:
        item = cfg.tus.base_path + "{id}" if cfg.tus.enabled else None
        http_downloads.add_routes(app, item)
    return app


__all__ = ["HOOKS", "OPS", "POOL", "RUNTIME", "STORAGE", "SWEEPER", "Runtime", "build_app"]
