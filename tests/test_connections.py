"""Connections cannot be held open for free: a header deadline, a keep-alive bound and a
cap on open connections, on the main listener and on metrics_listen (real server, raw
sockets).  Bounds asserted are generous (several times the configured timeout) so a
loaded 2-core machine does not make them flaky; what they catch is "stays open"."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from proxy.storage.seaweed import EmbeddedSeaweed
from proxy.web.conn import ConnectionGuard
from tests.daemon import start_daemon

from conftest import MiB, StartProxy, serving, wait_up

# Timeouts in these tests are 1 s; a connection must be gone well within this.
BOUND_S = 8.0


async def closed_after(reader: asyncio.StreamReader) -> tuple[float, bytes]:
    """Read until the server closes; return how long that took and what it said."""
    t0 = time.monotonic()
    data = b""
    async with asyncio.timeout(BOUND_S):
        while chunk := await reader.read(65536):
            data += chunk
    return time.monotonic() - t0, data


async def trickle_headers(writer: asyncio.StreamWriter) -> None:
    """A header line every 0.2 s, for ever (a slowloris)."""
    for i in range(10_000):
        writer.write(f"X-Line-{i}: y\r\n".encode())
        await writer.drain()
        await asyncio.sleep(0.2)


def status_and_code(raw: bytes) -> tuple[int, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["code"]


async def test_an_idle_connection_is_closed(start_proxy: StartProxy) -> None:
    p = await start_proxy(server={"header_timeout_s": 1, "keepalive_timeout_s": 60})
    reader, writer = await asyncio.open_connection(p.host, p.port)
    seconds, said = await closed_after(reader)
    writer.close()
    assert said == b""  # it sent nothing: no answer, just the close
    assert seconds >= 0.9


async def test_trickled_headers_get_408_and_a_close(start_proxy: StartProxy) -> None:
    p = await start_proxy(server={"header_timeout_s": 1, "keepalive_timeout_s": 60})
    reader, writer = await asyncio.open_connection(p.host, p.port)
    writer.write(b"PUT /uploads/slowloris HTTP/1.1\r\nHost: x\r\n")
    dripping = asyncio.create_task(trickle_headers(writer))
    try:
        _, said = await closed_after(reader)
    finally:
        dripping.cancel()
        writer.close()
    assert status_and_code(said) == (408, "ERR_HEADER_TIMEOUT")


async def test_headers_of_a_later_request_are_bounded_by_keepalive(
    start_proxy: StartProxy,
) -> None:
    """After a response, aiohttp's keep-alive timer runs until the next request's headers
    are parsed: idle or trickling, the connection goes after keepalive_timeout_s.  This
    pins that aiohttp behaviour, which the header deadline relies on for later requests."""
    p = await start_proxy(server={"header_timeout_s": 60, "keepalive_timeout_s": 1})
    for trickled in (False, True):
        reader, writer = await asyncio.open_connection(p.host, p.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND_S)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        dripping = None
        if trickled:
            writer.write(b"GET /healthz HTTP/1.1\r\n")
            dripping = asyncio.create_task(trickle_headers(writer))
        try:
            seconds, _ = await closed_after(reader)
        finally:
            if dripping is not None:
                dripping.cancel()
            writer.close()
        assert seconds >= 0.9


async def test_a_slow_body_is_not_a_slow_header(start_proxy: StartProxy) -> None:
    """The header deadline ends with the headers: a body may take longer (its own limits
    are idle_timeout_s and the minimum rate)."""
    p = await start_proxy(server={"header_timeout_s": 0.5, "keepalive_timeout_s": 0.5})

    async def body() -> Any:
        for _ in range(4):
            yield b"x" * 100_000
            await asyncio.sleep(0.5)

    async with aiohttp.ClientSession() as s:
        for key in ("a", "b"):  # the second on the kept-alive connection
            async with s.put(f"{p.url}/uploads/{key}", data=body()) as r:
                assert r.status == 201, await r.text()


async def test_connections_above_the_cap_get_503(start_proxy: StartProxy) -> None:
    p = await start_proxy(server={"max_connections": 3, "header_timeout_s": 30})
    held = [await asyncio.open_connection(p.host, p.port) for _ in range(3)]
    reader, writer = await asyncio.open_connection(p.host, p.port)
    _, said = await closed_after(reader)
    writer.close()
    assert status_and_code(said) == (503, "ERR_TOO_MANY_CONNECTIONS")
    assert b"Retry-After: 1" in said
    held.pop()[1].close()
    await wait_up(p.url, BOUND_S)  # once the server has seen that close, one fits again
    for _, w in held:
        w.close()


async def test_the_metrics_listener_has_the_same_limits(
    seaweed: EmbeddedSeaweed, prefix: str
) -> None:
    limits = {"metrics_listen": "127.0.0.1:0", "header_timeout_s": 1, "max_connections": 2}
    async with serving(seaweed, prefix, server=limits) as server:
        idle = [await asyncio.open_connection("127.0.0.1", server.metrics_port) for _ in "ab"]
        reader, writer = await asyncio.open_connection("127.0.0.1", server.metrics_port)
        _, said = await closed_after(reader)
        writer.close()
        assert status_and_code(said) == (503, "ERR_TOO_MANY_CONNECTIONS")
        for r, w in idle:
            _, said = await closed_after(r)
            w.close()
            assert said == b""
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{server.port}/metrics") as r,
        ):
            text = await r.text()
        assert 'proxy_connections_refused_total{listener="metrics"} 1.0' in text
        assert 'proxy_connections_header_timeouts_total{listener="metrics"} 2.0' in text
        assert 'proxy_connections_open{listener="main"} 1.0' in text  # this scrape


async def test_the_guard_passes_uploads_through_unchanged(start_proxy: StartProxy) -> None:
    """Every call of aiohttp's protocol still arrives: a large upload, back-pressure and
    all, on the default limits."""
    p = await start_proxy()
    data = bytes(range(256)) * (24 * MiB // 256)
    async with aiohttp.ClientSession() as s, s.put(f"{p.url}/uploads/big", data=data) as r:
        assert r.status == 201 and (await r.json())["size"] == len(data)


async def test_the_daemon_answers_on_uvloop(
    seaweed: EmbeddedSeaweed, tmp_path: Path, prefix: str
) -> None:
    """The daemon runs on uvloop, whose transports are not asyncio's classes: the 408 and
    503 written before aiohttp has a request must work there too (they did not at first)."""
    d = await start_daemon(
        tmp_path, seaweed, prefix, server={"header_timeout_s": 1, "max_connections": 2}
    )
    try:
        slow_r, slow_w = await asyncio.open_connection("127.0.0.1", d.port)
        slow_w.write(b"PUT /uploads/x HTTP/1.1\r\n")
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", d.port)
        extra_r, extra_w = await asyncio.open_connection("127.0.0.1", d.port)
        for reader, writer, want in (
            (extra_r, extra_w, (503, "ERR_TOO_MANY_CONNECTIONS")),
            (slow_r, slow_w, (408, "ERR_HEADER_TIMEOUT")),
        ):
            _, said = await closed_after(reader)
            writer.close()
            assert status_and_code(said) == want
        assert (await closed_after(idle_r))[1] == b""
        idle_w.close()
    finally:
        await d.stop()


def test_the_per_client_cap_counts_an_ipv6_64_as_one_and_spares_trusted_proxies() -> None:
    guard = ConnectionGuard(
        1, 10, max_per_client=2, trusted=(ipaddress.ip_network("127.0.0.1/32"),)
    )
    assert guard.admit("2001:db8::1") is None
    assert guard.admit("2001:db8::2") is None
    assert guard.admit("2001:db8::3") is not None  # the same /64: one client
    assert guard.admit("2001:db8:0:1::1") is None  # another /64
    for _ in range(5):
        assert guard.admit("127.0.0.1") is None  # nginx carries everyone's requests
    guard.leave("2001:db8::1")
    assert guard.admit("2001:db8::9") is None
    assert guard.open == 8
    assert guard.admit("192.0.2.1") is None
    assert guard.admit("192.0.2.2") is None
    assert guard.admit("192.0.2.3") is not None  # max_connections, for everyone
