"""No answer names the software and versions behind it: not the main listener's (successes,
errors, aiohttp's own 404/405 and parser errors) nor the metrics listener's."""

from __future__ import annotations

import asyncio

import aiohttp

from proxy.storage.seaweed import EmbeddedSeaweed
from proxy.web.errors import SERVER_HEADER

from conftest import serving


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
