"""Slow or greedy clients cannot stop everyone else: buffers follow what a client has sent,
one client's share of the pool is capped, and a body must keep a minimum rate."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from proxy.storage.base import Body

from conftest import MiB, Proxy, StartProxy, assert_nothing_left
from fakes import NO_TUS, GatedStorage

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


async def answer(reader: asyncio.StreamReader, timeout_s: float) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of a raw HTTP/1.1 answer."""
    async with asyncio.timeout(timeout_s):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await reader.readexactly(length)
    return int(head.split()[1]), json.loads(body)


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
    pool = p.pool
    assert pool is not None
    slow = [await open_put(p, f"slow{i}", f"198.51.100.{i % 4}", 64 * MiB, b"x") for i in range(32)]
    ctx = p.uploads
    assert ctx is not None
    try:
        await until(lambda: ctx.slots.in_use == 32 and ctx.events.stats.received_bytes == 32)
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
    p = await start_proxy(
        storage=storage, upload={"admission_timeout_s": 1}, server=TRUST_LOCAL, **NO_TUS
    )
    pool = p.pool
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


async def trickle(writer: asyncio.StreamWriter, every_s: float) -> None:
    """One byte every ``every_s`` until the connection goes."""
    while not writer.is_closing():
        writer.write(b"t")
        await writer.drain()
        await asyncio.sleep(every_s)


async def test_a_body_below_the_minimum_rate_gets_408_and_is_aborted(
    start_proxy: StartProxy, s3: Any, prefix: str
) -> None:
    p = await start_proxy(limits={"min_body_rate_bytes_per_s": "64KiB", "body_rate_grace_s": 1})
    # 6 MiB at full speed first: a multipart upload is open when the client slows down.
    reader, writer = await open_put(p, "slow.bin", "-", 16 * MiB, os.urandom(6 * MiB))
    dripping = asyncio.create_task(trickle(writer, 0.2))
    try:
        async with asyncio.timeout(10):
            while not await s3.list_multipart(prefix):
                await asyncio.sleep(0.05)
        status, reply = await answer(reader, 15)
    finally:
        dripping.cancel()
        writer.close()
    assert (status, reply["code"]) == (408, "ERR_TOO_SLOW"), reply
    await assert_nothing_left(s3, prefix)


async def test_back_pressure_does_not_count_as_a_slow_client(start_proxy: StartProxy) -> None:
    """S3 holds every part for longer than the grace: the client, blocked by TCP
    back-pressure, is not slow; the upload completes once S3 moves."""
    storage = GatedStorage()
    storage.gate.clear()
    p = await start_proxy(
        storage=storage,
        limits={"min_body_rate_bytes_per_s": "1MiB", "body_rate_grace_s": 0.5},
        **NO_TUS,
    )
    upload = asyncio.create_task(put(f"{p.url}/uploads/bp", os.urandom(40 * MiB), "-"))
    pool = p.pool
    assert pool is not None
    await until(lambda: storage.sending == 2 and pool.in_use_bytes >= 15 * MiB)
    await asyncio.sleep(2)  # four graces with no byte read
    assert not upload.done()
    storage.gate.set()
    status, reply, _ = await upload
    assert status == 201, reply


async def test_a_slow_tus_patch_gets_408_and_keeps_its_bytes(
    start_proxy: StartProxy, prefix: str
) -> None:
    from tus_helpers import OCTET, create, head_offset, tus_sections

    p = await start_proxy(
        limits={"min_body_rate_bytes_per_s": "64KiB", "body_rate_grace_s": 1},
        **tus_sections(prefix),
    )
    async with aiohttp.ClientSession() as s:
        url = await create(s, p.url, 10 * MiB)
        path = url[len(p.url) :]
        reader, writer = await asyncio.open_connection(p.host, p.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in OCTET.items())
        first = os.urandom(300 * 1024)
        writer.write(
            f"PATCH {path} HTTP/1.1\r\nHost: x\r\n{head}Upload-Offset: 0\r\n"
            f"Content-Length: {10 * MiB}\r\n\r\n".encode()
            + first
        )
        await writer.drain()
        dripping = asyncio.create_task(trickle(writer, 0.2))
        try:
            status, reply = await answer(reader, 15)
        finally:
            dripping.cancel()
            writer.close()
        assert (status, reply["code"]) == (408, "ERR_TOO_SLOW"), reply
        # What arrived is durable: the client resumes from there, not from 0.
        assert await head_offset(s, url) >= len(first)


async def test_form_files_share_one_pace(start_proxy: StartProxy) -> None:
    """The minimum rate is per request: a form cannot restart the grace with each file."""
    p = await start_proxy(limits={"min_body_rate_bytes_per_s": "64KiB", "body_rate_grace_s": 1})

    async def form() -> AsyncIterator[bytes]:
        for i in range(40):
            yield (
                f'--b\r\nContent-Disposition: form-data; name="f{i}"; filename="f{i}.txt"\r\n'
                "Content-Type: text/plain\r\n\r\nx\r\n"
            ).encode()
            await asyncio.sleep(0.1)
        yield b"--b--\r\n"

    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{p.url}/uploads", data=form(), headers=headers) as r,
    ):
        assert (r.status, (await r.json())["code"]) == (408, "ERR_TOO_SLOW")
