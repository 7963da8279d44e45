"""A 1 GiB download keeps the daemon's RSS flat (a real subprocess, real SeaweedFS), and a
client that stops reading stops the S3 read and is cut off after send_timeout_s."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from proxy.storage.seaweed import EmbeddedSeaweed
from proxy.web.downloads import DOWNLOADS
from tests.conftest import MiB, StartProxy, wait_up
from tests.daemon import running_daemon
from tests.test_memory_bound import upload_measuring

GiB = 1024 * MiB


@pytest.fixture
async def daemon(
    seaweed: EmbeddedSeaweed, tmp_path: Path, prefix: str
) -> AsyncIterator[tuple[str, psutil.Process]]:
    async with running_daemon(
        tmp_path,
        seaweed,
        prefix,
        upload={"overwrite": True, "max_upload_size": "2GiB"},
        downloads={"enabled": True},
    ) as d:
        yield d.url, psutil.Process(d.proc.pid)


async def download_measuring(url: str, proc: psutil.Process) -> tuple[int, int, str]:
    """GET ``url`` (discarding the bytes as they come); peak RSS, size, SHA-256."""
    peak = proc.memory_info().rss
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    digest, size = hashlib.sha256(), 0
    try:
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            assert r.status == 200
            async for chunk in r.content.iter_chunked(MiB):
                digest.update(chunk)
                size += len(chunk)
    finally:
        done.set()
        await sampler
    return peak, size, digest.hexdigest()


@pytest.mark.slow
async def test_1gib_download_keeps_rss_flat(daemon: tuple[str, psutil.Process]) -> None:
    url, proc = daemon
    await wait_up(url)
    await upload_measuring(url, "warm", 8 * MiB, proc)
    await download_measuring(f"{url}/uploads/warm", proc)  # load the download code paths
    await upload_measuring(url, "big", GiB, proc)
    base = proc.memory_info().rss
    peak, size, sha = await download_measuring(f"{url}/uploads/big", proc)
    async with aiohttp.ClientSession() as s, s.head(f"{url}/uploads/big") as r:
        repr_digest = r.headers["Repr-Digest"]
    growth = peak - base
    print(f"rss base={base / MiB:.0f}MiB peak={peak / MiB:.0f}MiB growth={growth / MiB:.1f}MiB")
    assert size == GiB
    assert repr_digest == f"sha-256=:{base64.b64encode(bytes.fromhex(sha)).decode()}:"
    # A chunk of 256 KiB and socket buffers per download; 16 MiB is generous for a loaded
    # machine's allocator noise, and 1/64 of the object.
    assert growth < 16 * MiB, "a download's memory grows with the object"


async def test_a_reader_that_stops_is_cut_off_and_stops_the_read(start_proxy: StartProxy) -> None:
    p = await start_proxy(downloads={"enabled": True, "send_timeout_s": 1.0, "max_concurrent": 1})
    size = 64 * MiB

    async def body() -> AsyncIterator[bytes]:
        block = os.urandom(MiB)
        for _ in range(size // MiB):
            yield block

    async with aiohttp.ClientSession() as s:
        async with s.put(f"{p.url}/uploads/stall.bin", data=body()) as r:
            assert r.status == 201
    registry = p.runtime.registry

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, {"route": "uploads", **labels}) or 0.0

    reader, writer = await asyncio.open_connection(p.host, p.port)
    writer.write(f"GET /uploads/stall.bin HTTP/1.1\r\nHost: {p.host}\r\n\r\n".encode())
    await writer.drain()
    got = len(await reader.readexactly(MiB))  # then read nothing more
    async with aiohttp.ClientSession() as s:
        # The one download slot is held by the stalled reader (until it is cut off).
        async with s.get(f"{p.url}/uploads/stall.bin", headers={"Range": "bytes=0-9"}) as r:
            assert (r.status, (await r.json())["code"]) == (503, "ERR_TOO_MANY_DOWNLOADS")
            assert r.headers["Retry-After"]
    async with asyncio.timeout(30):
        while (
            sample("proxy_downloads_total", outcome="broken") < 1
        ):  # the send timeout cut the download
            await asyncio.sleep(0.05)
    written = sample("proxy_download_bytes_total")
    print(f"sent {written / MiB:.1f} MiB of {size / MiB:.0f} to a reader that took {got / MiB:.0f}")
    # What the kernel's socket buffers hold on loopback (a few MiB each way), far from all.
    assert written < 24 * MiB, "the proxy kept reading the store for a client that did not read"
    rest = await reader.read()  # the server closed the connection: short of Content-Length
    assert got + len(rest) < size
    writer.close()
    assert p.app[DOWNLOADS].active == 0, "the cut download still holds its slot"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{p.url}/uploads/stall.bin", headers={"Range": "bytes=0-9"}) as r:
            assert (r.status, len(await r.read())) == (206, 10)
