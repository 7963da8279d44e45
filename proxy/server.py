"""Owns the lifecycle: bind, serve, graceful drain with a timeout, a second signal exits at once."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server as _AioServer

from proxy.app import HTTP_CODES, Runtime, build_app
from proxy.config import Config, ServerConfig
from proxy.errors import ProxyError
from proxy.http_ops import build_metrics_app
from proxy.responses import error_response

log = logging.getLogger(__name__)

# Headers larger than this are refused with 431 by aiohttp's parser (slow-loris with headers).
MAX_FIELD_BYTES = 16 * 1024
# How much of a body aiohttp buffers per connection before it stops reading the socket.
# Bigger than the default 64 KiB so one read hands us a useful chunk; small enough that
# N connections x this stays negligible next to the part-buffer budget.
READ_BUFSIZE = 256 * 1024


class _JsonErrorRequestHandler(RequestHandler):
    """Errors aiohttp raises before our app sees the request (malformed request line,
    oversized headers, bad chunk framing) get the same JSON body as every other error."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:
            log.info("rejected malformed request from %s: %d %s", request.remote, status,
                     getattr(exc, "message", exc))
        code = HTTP_CODES.get(status, f"ERR_HTTP_{status}")
        text = "internal error" if status >= 500 else f"malformed request: {getattr(exc, 'message', '') or message or status}"
        return error_response(ProxyError(text, code=code, status=status), close=True)


class _JsonErrorServer(_AioServer):
    def __call__(self) -> RequestHandler:
        return _JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class ProxyRunner(web.AppRunner):
    """An AppRunner whose low-level protocol errors are rendered as our JSON errors."""

    async def _make_server(self) -> _AioServer:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer
        return server


def make_runner(app: web.Application, sc: ServerConfig, **kwargs: Any) -> ProxyRunner:
    return ProxyRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=sc.drain_timeout_s,
        lingering_time=sc.lingering_time_s,
        max_field_size=MAX_FIELD_BYTES,
        read_bufsize=READ_BUFSIZE,
        **kwargs,
    )


class Server:
    def __init__(self, config: Config, runtime: Runtime | None = None) -> None:
        self.config = config
        self.runtime = runtime or Runtime(config)
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

    async def serve(self, install_signals: bool = True) -> None:
        loop = asyncio.get_running_loop()
        if install_signals:
            for s in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(s, self._on_signal, s)
        sc = self.config.server
        runner = make_runner(build_app(self.runtime), sc)
        await runner.setup()
        metrics_runner: web.AppRunner | None = None
        try:
            self.port = await _start_site(runner, sc.listen_host, sc.listen_port)
            log.info("listening on http://%s:%s", sc.listen_host, self.port)
            if sc.metrics_listen is not None:
                metrics_runner = web.AppRunner(
                    build_metrics_app(self.runtime.ops), handle_signals=False, access_log=None
                )
                await metrics_runner.setup()
                host, port = sc.metrics_listen
                self.metrics_port = await _start_site(metrics_runner, host, port)
                log.info("metrics on http://%s:%s/metrics", host, self.metrics_port)
            self.listening.set()
            await self._stop.wait()
            log.info("stopping: waiting up to %.0fs for running uploads", sc.drain_timeout_s)
        finally:
            await runner.cleanup()
            # Last, so a scraper still sees the drain.
            if metrics_runner is not None:
                await metrics_runner.cleanup()
            log.info("stopped")


async def _start_site(runner: web.AppRunner, host: str, port: int) -> int:
    """Bind and serve; return the port actually bound (``port`` may be 0)."""
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        return int(server.sockets[0].getsockname()[1])
    return port
