"""Slow or greedy clients cannot stop everyone else: buffers follow what a client has sent,
and one client's share of the pool is capped."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import aiohttp

from proxy.storage.base import Body

from conftest import MiB, Proxy, StartProxy
from fakes import GatedStorage

TRUST_LOCAL = {"trusted_proxies": ["127.0.0.1"]}


async def open_put(
    proxy: Proxy, key: str, client: str, length: int, first: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw PUT from ``client`` (via X-Forwarded-For) that has sent only ``first``."""
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        f"PUT /uploads/{key} HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {client}\r\n"
        f"Content-Length: {length}\r\n\r\n".encode()
        + first
    )
    await writer.drain()
    return reader, writer


async def until(check: Any, timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.02)


async def put(
    url: str, data: Any, client: str, timeout_s: float = 60
) -> tuple[int, dict[str, Any], float]:
    t0 = time.monotonic()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s,
        s.put(url, data=data, headers={"X-Forwarded-For": client}) as r,
    ):
        return r.status, await r.json(content_type=None), time.monotonic() - t0


async def test_slow_bodies_do_not_starve_a_normal_upload(start_proxy: StartProxy) -> None:
    """The issue's scenario with its defaults (8 MiB parts, a 256 MiB pool): 32 uploads,
    8 from each of 4 addresses, that have sent one byte each.  Before, each had leased a
    whole part before its first byte (32 x 8 MiB: the whole pool), and a normal upload
    from a fifth address got 503 ERR_BUSY once the admission timeout ran out."""
    p = await start_proxy(
        upload={"part_size": "8MiB", "memory_budget": "256MiB", "admission_timeout_s": 2},
        server=TRUST_LOCAL,
    )
    pool = p.runtime.pool
    assert pool is not None
    slow = [await open_put(p, f"slow{i}", f"198.51.100.{i % 4}", 64 * MiB, b"x") for i in range(32)]
    ctx = p.runtime.uploads
    assert ctx is not None
    try:
        await until(lambda: ctx.slots.in_use == 32 and ctx.stats.received_bytes == 32)
        url = f"{p.url}/uploads/normal"
        status, reply, seconds = await put(url, os.urandom(MiB), "203.0.113.9")
        assert status == 201, reply
        print(f"normal 1 MiB upload beside 32 slow ones: 201 in {seconds:.2f}s")
        # Each slow upload holds what its byte needed: a head, not a part.
        assert pool.in_use_bytes == 32 * pool.head_bytes and pool.head_bytes <= MiB
    finally:
        for _, w in slow:
            w.close()
    await until(lambda: pool.in_use_bytes == 0)


class PartsStuck(GatedStorage):
    """Multipart parts wait for ``gate``; single PUTs (small objects) go straight through."""

    async def put_object(self, key: str, body: Body, **kw: Any) -> str:
        self.gate.set()
        try:
            return await super().put_object(key, body, **kw)
        finally:
            self.gate.clear()


async def test_a_client_at_its_buffer_cap_slows_only_itself(start_proxy: StartProxy) -> None:
    """One client's uploads that S3 holds up fill its share (a quarter of the 64 MiB pool
    here), not the pool: another client's upload goes through at once.  Before, the
    greedy client's five uploads held 75 MiB worth of parts and the other got 503."""
    storage = PartsStuck()
    storage.gate.clear()
    p = await start_proxy(storage=storage, upload={"admission_timeout_s": 1}, server=TRUST_LOCAL)
    pool = p.runtime.pool
    assert pool is not None
    size = 20 * MiB
    greedy = [
        asyncio.create_task(put(f"{p.url}/uploads/g{i}", os.urandom(size), "198.51.100.1"))
        for i in range(5)
    ]
    await until(lambda: pool.waiting >= 1)
    status, reply, _ = await put(f"{p.url}/uploads/other", b"small", "203.0.113.9")
    assert status == 201, reply
    assert pool.client_cap_bytes == 16 * MiB
    await until(lambda: pool.client_bytes("198.51.100.1") > 12 * MiB)
    assert pool.client_bytes("198.51.100.1") <= 16 * MiB
    # The greedy client was only slowed down: every upload of it completes.
    storage.gate.set()
    results = await asyncio.gather(*greedy)
    assert [r[0] for r in results] == [201] * 5, results
    assert pool.in_use_bytes == 0
