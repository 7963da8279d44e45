"""A hook receiver in the test process: an aiohttp server that checks each request's
signature, records the events and answers as the test tells it to."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy.storage.seaweed import free_port

Reply = Callable[[dict[str, Any]], tuple[int, dict[str, Any] | None]]


def go_on(_: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
    return 200, None


@dataclass
class Receiver:
    secret: bytes
    reply: Reply = go_on
    events: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        want = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get("Hook-Signature", ""), want):
            self.bad_signatures += 1
            return web.Response(status=401)
        event = json.loads(body)
        assert request.headers["Hook-Event-Id"] == event["EventID"]
        assert request.headers["Hook-Event-Type"] == event["Type"]
        status, answer = self.reply(event)
        if 200 <= status < 300:
            self.events.append(event)  # only what we acknowledge counts as delivered
        self.arrived.set()
        return web.json_response(answer, status=status) if answer else web.Response(status=status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        self.port = self.port or free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["Type"] == event_type]

    async def wait_for(
        self, check: Callable[[], bool], timeout_s: float = 60
    ) -> None:  # generous: a loaded 2-core machine
        async with asyncio.timeout(timeout_s):
            while not check():
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), 1)
                except TimeoutError:
                    pass
