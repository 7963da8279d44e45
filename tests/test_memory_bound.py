"""The daemon's RSS does not grow with file size (a real subprocess, real SeaweedFS)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from proxy.storage.seaweed import EmbeddedSeaweed, free_port

from conftest import BUCKET, MiB, wait_up

pytestmark = pytest.mark.slow


@pytest.fixture
def daemon(seaweed: EmbeddedSeaweed, tmp_path: Path) -> Iterator[tuple[str, psutil.Process]]:
    port = free_port()
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"""
[server]
listen = "127.0.0.1:{port}"
[upload]
key_prefix = "rss/"
overwrite = true
memory_budget = "64MiB"
[limits]
# The burst below comes from one address; let it fill the pool, not just one client's share.
max_buffer_bytes_per_client = "64MiB"
[auth]
mode = "none"
[storage]
backend = "s3"
bucket = "{BUCKET}"
endpoint_url = "{seaweed.endpoint_url}"
""")
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID=seaweed.credentials.access_key,
        AWS_SECRET_ACCESS_KEY=seaweed.credentials.secret_key,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "-c", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield f"http://127.0.0.1:{port}", psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)


async def upload_measuring(url: str, key: str, size: int, proc: psutil.Process) -> int:
    """Stream ``size`` bytes; return the daemon's peak RSS seen meanwhile."""
    peak = proc.memory_info().rss
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            await asyncio.sleep(0.02)

    async def body() -> AsyncIterator[bytes]:
        block = os.urandom(MiB)
        for _ in range(size // MiB):
            yield block

    sampler = asyncio.create_task(sample())
    try:
        async with aiohttp.ClientSession() as s:
            async with s.put(f"{url}/uploads/{key}", data=body()) as r:
                assert r.status == 201, await r.text()
                assert (await r.json())["size"] == size
    finally:
        done.set()
        await sampler
    return peak


async def test_rss_growth_is_flat_in_file_size(daemon: tuple[str, psutil.Process]) -> None:
    url, proc = daemon
    await wait_up(url)
    await upload_measuring(url, "warm", 32 * MiB, proc)  # load code paths, fill the pool once
    base = proc.memory_info().rss
    peak_small = await upload_measuring(url, "small", 64 * MiB, proc)
    peak_large = await upload_measuring(url, "large", 512 * MiB, proc)
    growth_small, growth_large = peak_small - base, peak_large - base
    print(
        f"rss base={base / MiB:.0f}MiB growth 64MiB-upload={growth_small / MiB:.1f}MiB "
        f"512MiB-upload={growth_large / MiB:.1f}MiB"
    )
    assert growth_large < 64 * MiB, "streaming 512 MiB grew RSS by more than the budget"
    assert growth_large < growth_small + 16 * MiB, "RSS grows with file size"


async def test_rss_falls_back_after_a_burst(daemon: tuple[str, psutil.Process]) -> None:
    """A burst of concurrent uploads fills the 64 MiB pool; once it is idle the heap is
    trimmed, so the daemon does not keep the burst's memory for good."""
    url, proc = daemon
    await wait_up(url)
    await upload_measuring(url, "warm", 32 * MiB, proc)
    base = proc.memory_info().rss
    peaks = await asyncio.gather(
        *(upload_measuring(url, f"burst{i}", 48 * MiB, proc) for i in range(8))
    )
    await asyncio.sleep(0.5)
    after = proc.memory_info().rss
    print(
        f"rss base={base / MiB:.0f}MiB burst peak={max(peaks) / MiB:.0f}MiB "
        f"after={after / MiB:.0f}MiB"
    )
    assert max(peaks) - base > 32 * MiB, "the burst did not fill the pool: test too weak"
    assert after - base < 10 * MiB, "memory of the burst was kept after it ended"
