"""Operator endpoints: ``/healthz``, ``/readyz``, ``/status`` and ``/metrics``.

Also where the background samplers (memory, readiness) run.  The same handlers serve
the main app and, when ``metrics_listen`` is set, a small app on its own address
that carries no upload routes and no object keys, so it can face a scraper
without exposing anything else.

Upload ids are credentials (with auth off the id alone lets anyone continue or delete
a tus upload) and keys name other people's files, so neither appears in ``/metrics``
and ``/status`` shows them only to a caller with an operator token
(``auth.operator_tokens``); everyone else gets aggregate figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy import __version__
from proxy.auth import TokenSet, bearer_token
from proxy.engine.buffers import BufferPool
from proxy.errors import ProxyError, Unauthorized
from proxy.obs.memory import FIGURES, Level, MemoryMonitor
from proxy.obs.metrics import Metrics
from proxy.storage.base import Storage
from proxy.web.errors import error_middleware, hide_server_banner

log = logging.getLogger(__name__)

# A readiness probe must answer quickly even when S3 hangs: below the usual 5-10 s
# probe timeouts of systemd, Kubernetes and blackbox_exporter.
READY_TIMEOUT_S = 3.0
# How often the background probe refreshes proxy_ready for Prometheus.
READY_PROBE_INTERVAL_S = 15.0


@dataclass
class Readiness:
    """Whether this instance should get traffic: S3 answers, the bucket exists, memory is ok."""

    storage: Callable[[], Storage | None]
    memory: MemoryMonitor
    last: bool | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def check(self) -> dict[str, Any]:
        # One probe at a time: a burst of /readyz calls must not become a burst of HEADs.
        async with self._lock:
            checks = {"storage": await self._storage(), "memory": self._memory()}
        failing = [name for name, c in checks.items() if not c["ok"]]
        self.last = not failing
        return {"ready": self.last, "failing": failing, "checks": checks}

    async def _storage(self) -> dict[str, Any]:
        storage = self.storage()
        if storage is None:
            return {"ok": False, "error": "storage is not open yet"}
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await storage.check()
        except ProxyError as e:
            return {"ok": False, "error": e.message, "code": e.code}
        except TimeoutError:
            return {"ok": False, "error": f"no answer within {READY_TIMEOUT_S}s"}
        return {"ok": True, "bucket": storage.bucket}

    def _memory(self) -> dict[str, Any]:
        state = self.memory.state
        return {
            "ok": state.level is not Level.CRITICAL,
            "level": state.level.label,
            "used_ratio": round(state.used_ratio, 4),
            "bound_by": state.bound_by,
        }

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:
                log.exception("readiness probe failed")
            await asyncio.sleep(READY_PROBE_INTERVAL_S)


@dataclass
class Ops:
    """What the operator endpoints read; one instance shared by the main and metrics apps."""

    metrics: Metrics
    memory: MemoryMonitor
    readiness: Readiness
    pool: Callable[[], BufferPool | None]
    # Who may see /status in full (ids and keys of running uploads).
    operators: TokenSet = field(default_factory=TokenSet)
    started_unix: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)


OPS = web.AppKey("ops", Ops)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def readyz(request: web.Request) -> web.Response:
    report = await request.app[OPS].readiness.check()
    return web.json_response(report, status=200 if report["ready"] else 503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[OPS].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _operator(request: web.Request) -> bool:
    """True for a valid operator token; no Authorization header is an anonymous caller
    (aggregate view); any other credential is refused, so a mistyped token is noticed."""
    header = request.headers.get("Authorization")
    if header is None:
        return False
    token = bearer_token(header)
    if token is None or request.app[OPS].operators.match(token) is None:
        raise Unauthorized("not an operator token", error="invalid_token")
    return True


def _running(ops: Ops) -> list[dict[str, Any]]:
    """Each running upload, with its id and key: for operators only."""
    uploads = []
    for u in ops.metrics.active():
        age = u.age_s()
        uploads.append(
            {
                "id": u.upload_id,
                "key": u.key,
                "slot": u.slot,
                "received_bytes": u.received_bytes,
                "stored_bytes": u.stored_bytes,
                "age_s": round(age, 3),
                "rate_bytes_per_s": round(u.received_bytes / age) if age > 0 else 0,
            }
        )
    return uploads


async def status(request: web.Request) -> web.Response:
    ops = request.app[OPS]
    operator = _operator(request)
    state = ops.memory.state
    memory = asdict(state) | {
        "level": state.level.label,
        "used_ratio": round(state.used_ratio, 4),
        "figures": FIGURES,
    }
    active = ops.metrics.active()
    in_flight = {
        "uploads": len(active),
        "received_bytes": sum(u.received_bytes for u in active),
        "stored_bytes": sum(u.stored_bytes for u in active),
    }
    pool = ops.pool()
    buffers = None
    if pool is not None:
        buffers = {
            "in_use_bytes": pool.in_use_bytes,
            "budget_bytes": pool.budget_bytes,
            "idle_bytes": pool.idle_bytes,
            "peak_in_use_bytes": pool.peak_in_use_bytes,
            "waiting": pool.waiting,
        }
    report: dict[str, Any] = {
        "version": __version__,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ops.started_unix)),
        "uptime_s": round(time.monotonic() - ops.started, 3),
        "ready": ops.readiness.last,
        "in_flight": in_flight,
        "memory": memory,
        "buffers": buffers,
    }
    if operator:
        report["uploads"] = _running(ops)
    # Cache-Control: an operator's answer must not be kept by a proxy for the next caller.
    return web.json_response(report, headers={"Cache-Control": "no-store"})


async def samplers_ctx(app: web.Application) -> AsyncIterator[None]:
    """Bind the scrape-time sources and run the memory and readiness samplers."""
    ops = app[OPS]
    ops.memory.sample()
    pool = ops.pool()
    if pool is not None:
        ops.metrics.bind_pool(pool)
    ops.metrics.bind_memory(lambda: ops.memory.state)
    ops.metrics.bind_ready(lambda: ops.readiness.last)
    tasks = [asyncio.create_task(ops.memory.run()), asyncio.create_task(ops.readiness.run())]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


def add_routes(app: web.Application, ops: Ops, *, with_status: bool = True) -> None:
    """``with_status=False`` leaves out /status, which names the objects being uploaded."""
    app[OPS] = ops
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if with_status:
        app.router.add_get("/status", status)


def build_metrics_app(ops: Ops) -> web.Application:
    """The app for ``metrics_listen``: /metrics, /healthz and /readyz only."""
    # The same error middleware as the main app: a 404 or 405 here is JSON too.
    app = web.Application(middlewares=[error_middleware])
    app.on_response_prepare.append(hide_server_banner)
    add_routes(app, ops, with_status=False)
    return app
