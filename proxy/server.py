"""Owns the lifecycle: bind, serve, graceful drain with a timeout, a second signal exits at once.

It also speaks to systemd (``proxy.obs.sdnotify``): ``READY=1`` once the socket listens
and storage was checked, a ``STATUS=`` line every ``status_interval_s``,
``WATCHDOG=1`` from the event loop, ``STOPPING=1`` when the drain begins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import Any

from aiohttp import web

from proxy.app import STORAGE, Runtime, build_app
from proxy.config import Config, advisories
from proxy.errors import ProxyError
from proxy.obs.sdnotify import Notifier
from proxy.storage.base import Storage
from proxy.web.conn import ConnectionGuard, GuardedSite
from proxy.web.ops import OPS, build_metrics_app
from proxy.web.preflight import UPLOADS, Uploads

log = logging.getLogger(__name__)

# Header count limit of aiohttp's parser; the byte limit is server.max_header_bytes.
MAX_HEADERS = 128
# How much of a body aiohttp buffers per connection before it stops reading the socket.
# Bigger than the default 64 KiB so one read hands us a useful chunk; small enough that
# N connections x this stays negligible next to the part-buffer budget.
READ_BUFSIZE = 256 * 1024
STORAGE_CHECK_TIMEOUT_S = 10.0
# After the drain, uploads still running are cancelled; this is how long their
# multipart aborts may take (engine.upload.CLEANUP_TIMEOUT_S bounds each one).
ABORT_GRACE_S = 35.0
# What aiohttp's own shutdown still waits for: only non-upload requests are left then.
RUNNER_SHUTDOWN_TIMEOUT_S = 5.0


def runner_kwargs(config: Config) -> dict[str, Any]:
    """AppRunner settings; tests start their runners with these too."""
    return {"shutdown_timeout": RUNNER_SHUTDOWN_TIMEOUT_S, **handler_kwargs(config)}


def handler_kwargs(config: Config) -> dict[str, Any]:
    """Settings of aiohttp's per-connection protocol (``web.RequestHandler``)."""
    sc = config.server
    return {
        "access_log": None,
        "lingering_time": sc.lingering_time_s,
        # Larger headers are refused (400/431) by aiohttp's parser (slow-loris with headers).  The
        # request line carries signed-URL fields and up to 1 KiB of key, hence both.
        "max_line_size": sc.max_header_bytes,
        "max_field_size": sc.max_header_bytes,
        "max_headers": MAX_HEADERS,
        "read_bufsize": READ_BUFSIZE,
        # Closes a kept-alive connection that waits longer than this for its next request,
        # headers included (aiohttp's default is an hour).  The first request's headers are
        # timed by proxy.web.conn.
        "keepalive_timeout": sc.keepalive_timeout_s,
        # Store bodies exactly as sent, like S3 does: a Content-Encoding: gzip body stays
        # gzip.  Decompressing would also break every size decision made from
        # Content-Length (part sizes, limits, tus offsets).
        "auto_decompress": False,
    }


def status_line(ctx: Uploads, rate_mib_s: float) -> str:
    stats = ctx.events.stats
    return (
        f"{ctx.slots.in_use} uploads in flight, {rate_mib_s:.1f} MiB/s, "
        f"{stats.completed} done, {stats.failed} failed"
    )


def make_runner(app: web.Application, config: Config) -> web.AppRunner:
    return web.AppRunner(app, handle_signals=False, **runner_kwargs(config))


class Server:
    def __init__(
        self, config: Config, runtime: Runtime | None = None, notifier: Notifier | None = None
    ) -> None:
        self.config = config
        self.runtime = runtime or Runtime(config)
        self.notifier = notifier or Notifier(None)
        self._stop = asyncio.Event()
        self._signals = 0
        self.port: int | None = None
        self.metrics_port: int | None = None
        # Set once every listener is bound: ports are known from then on.
        self.listening = asyncio.Event()

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            # An operator who asks twice means it; skip the drain.
            log.warning("second signal (%s): exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("received %s: draining", signal.Signals(signum).name)
        self._stop.set()

    def request_stop(self) -> None:
        self._stop.set()

    async def _storage_state(self, storage: Storage) -> str:
        try:
            async with asyncio.timeout(STORAGE_CHECK_TIMEOUT_S):
                await storage.check()
        except (ProxyError, TimeoutError) as e:
            # Ready anyway: a store that is down at boot is not a reason to crash-loop.
            return f"storage unreachable ({getattr(e, 'code', 'timeout')})"
        return "storage ok"

    async def _report_status(self, ctx: Uploads) -> None:
        interval = self.config.server.status_interval_s
        stats = ctx.events.stats
        last_bytes, last_t = stats.received_bytes, time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now, nbytes = time.monotonic(), stats.received_bytes
            rate = (nbytes - last_bytes) / max(now - last_t, 1e-9) / 2**20
            last_bytes, last_t = nbytes, now
            self.notifier.status(status_line(ctx, rate))

    async def _drain(self, ctx: Uploads, site: GuardedSite) -> None:
        """Stop listening, let running uploads finish, cancel (abort) the rest."""
        sc = self.config.server
        # Only the listening socket closes; open connections keep reading bodies.
        await site.stop()
        cancelled = await ctx.slots.drain(sc.drain_timeout_s, ABORT_GRACE_S)
        if cancelled:
            log.warning(
                "drain timeout (%.0fs) reached: aborted %d running uploads",
                sc.drain_timeout_s,
                cancelled,
            )

    async def serve(self, install_signals: bool = True) -> None:
        loop = asyncio.get_running_loop()
        if install_signals:
            for s in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(s, self._on_signal, s)
        sc = self.config.server
        if not self.config.auth.enabled:
            log.warning(
                'auth.mode = "none": anyone who can reach %s:%s may upload',
                sc.listen_host,
                sc.listen_port,
            )
        for advice in advisories(self.config):
            log.warning("config: %s", advice)
        app = build_app(self.runtime)
        runner = make_runner(app, self.config)
        await runner.setup()
        metrics_runner: web.AppRunner | None = None
        tasks: list[asyncio.Task[None]] = []
        try:
            site = await start_site(runner, sc.listen_host, sc.listen_port, self.config)
            self.runtime.metrics.bind_listener("main", site.guard)
            self.port = bound_port(runner)
            log.info("listening on http://%s:%s", sc.listen_host, self.port)
            if sc.metrics_listen is not None:
                metrics_runner = make_runner(build_metrics_app(app[OPS]), self.config)
                await metrics_runner.setup()
                host, port = sc.metrics_listen
                metrics_site = await start_site(metrics_runner, host, port, self.config)
                self.runtime.metrics.bind_listener("metrics", metrics_site.guard)
                self.metrics_port = bound_port(metrics_runner)
                log.info("metrics on http://%s:%s/metrics", host, self.metrics_port)
            self.listening.set()
            state = await self._storage_state(app[STORAGE])
            self.notifier.ready(f"listening on {sc.listen_host}:{self.port}, {state}")
            tasks.append(asyncio.create_task(self.notifier.run_watchdog(), name="watchdog"))
            tasks.append(asyncio.create_task(self._report_status(app[UPLOADS]), name="status"))
            await self._stop.wait()
            in_flight = app[UPLOADS].slots.in_use
            self.notifier.stopping(
                f"draining {in_flight} uploads for up to {sc.drain_timeout_s:.0f}s"
            )
            log.info(
                "stopping: waiting up to %.0fs for %d running uploads",
                sc.drain_timeout_s,
                in_flight,
            )
            await self._drain(app[UPLOADS], site)
        finally:
            # The watchdog keeps pinging through the drain: TimeoutStopSec bounds it instead.
            await runner.cleanup()
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            # Last, so a scraper still sees the drain.
            if metrics_runner is not None:
                await metrics_runner.cleanup()
            self.notifier.close()
            log.info("stopped")


async def start_site(runner: web.AppRunner, host: str, port: int, config: Config) -> GuardedSite:
    """Bind and serve behind a connection guard (header deadline, connection cap), with
    parser errors rendered as JSON; :func:`bound_port` tells the port (``port`` may be 0).
    Tests use it too."""
    sc = config.server
    guard = ConnectionGuard(
        sc.header_timeout_s,
        sc.max_connections,
        sc.send_timeout_s,
        max_per_client=sc.max_connections_per_client,
        trusted=sc.trusted_proxies,
    )
    site = GuardedSite(runner, host, port, guard, handler_kwargs(config))
    await site.start()
    return site


def bound_port(runner: web.BaseRunner) -> int:
    """The port ``runner``'s (one) site listens on."""
    return int(runner.addresses[0][1])
