"""No answer names the software and versions behind it: not the main listener's (successes,
errors, aiohttp's own 404/405 and parser errors) nor the metrics listener's."""

from __future__ import annotations

import asyncio
import inspect
import json

import aiohttp
from aiohttp import web

from proxy.storage.seaweed import EmbeddedSeaweed
from proxy.web.errors import SERVER_HEADER, JsonErrorRequestHandler

from conftest import StartProxy, serving


async def raw_head(port: int, request: bytes) -> bytes:
    """The status line and headers the server sends back for raw ``request`` bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()


async def check_listener(base: str, port: int, requests: list[tuple[str, str]]) -> None:
    async with aiohttp.ClientSession() as s:
        for method, path in requests:
            async with s.request(method, base + path) as r:
                await r.read()
                assert r.headers.get("Server") == SERVER_HEADER, (method, path, r.headers)
    for raw in (b"BAD REQUEST LINE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad\x01: y\r\n\r\n"):
        head = (await raw_head(port, raw)).decode("latin-1")
        assert head.split(" ", 2)[1] == "400", head
        assert f"\r\nServer: {SERVER_HEADER}\r\n" in head, head
        assert "python" not in head.lower() and "aiohttp" not in head.lower(), head


async def test_no_server_banner_on_any_listener(seaweed: EmbeddedSeaweed, prefix: str) -> None:
    async with serving(seaweed, prefix, server={"metrics_listen": "127.0.0.1:0"}) as server:
        assert server.port is not None and server.metrics_port is not None
        main = f"http://127.0.0.1:{server.port}"
        await check_listener(
            main,
            server.port,
            [
                ("GET", "/healthz"),
                ("GET", "/metrics"),
                ("GET", "/nowhere"),  # aiohttp's 404
                ("DELETE", "/uploads"),  # aiohttp's 405
                ("PUT", "/uploads/a/../b"),  # our JSON 400
                ("OPTIONS", "/files/"),
                ("HEAD", f"/files/{'0' * 32}"),
            ],
        )
        side = f"http://127.0.0.1:{server.metrics_port}"
        await check_listener(side, server.metrics_port, [("GET", "/metrics"), ("GET", "/nowhere")])


async def test_parser_errors_are_json(start_proxy: StartProxy) -> None:
    """A request aiohttp's parser refuses never reaches the app; our RequestHandler
    subclass still answers it with the JSON every other error has."""
    p = await start_proxy()
    reader, writer = await asyncio.open_connection(p.host, p.port)
    try:
        writer.write(b"BAD REQUEST LINE\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"400", answer
    assert b"application/json" in head, answer
    assert json.loads(body)["code"] == "ERR_BAD_REQUEST"


def test_aiohttp_handle_error_is_what_we_override() -> None:
    """JsonErrorRequestHandler overrides web.RequestHandler.handle_error: an aiohttp that
    renames it or changes its parameters would silently bring back plain-text errors."""
    ours = inspect.signature(JsonErrorRequestHandler.handle_error)
    theirs = inspect.signature(web.RequestHandler.handle_error)
    assert (
        list(theirs.parameters)
        == list(ours.parameters)
        == [
            "self",
            "request",
            "status",
            "exc",
            "message",
        ]
    )
    assert JsonErrorRequestHandler.handle_error is not web.RequestHandler.handle_error
