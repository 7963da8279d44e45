"""The daemon's RSS does not grow with file size (a real subprocess, real SeaweedFS)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from proxy.storage.seaweed import EmbeddedSeaweed
from tests.daemon import running_daemon

from conftest import MiB, until

pytestmark = pytest.mark.slow


@pytest.fixture
async def daemon(
    seaweed: EmbeddedSeaweed, tmp_path: Path, prefix: str
) -> AsyncIterator[tuple[str, psutil.Process]]:
    async with running_daemon(
        tmp_path,
        seaweed,
        prefix,
        # The daemon's own part size (8 MiB), not the tests' 5 MiB: RSS as deployed.
        upload={"overwrite": True, "memory_budget": "64MiB", "part_size": "8MiB"},
        # The burst below comes from one address; let it fill the pool, not just one
        # client's share.
        limits={"max_buffer_bytes_per_client": "64MiB"},
    ) as d:
        yield d.url, psutil.Process(d.proc.pid)


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
    await upload_measuring(url, "warm", 32 * MiB, proc)
    base = proc.memory_info().rss
    peaks = await asyncio.gather(
        *(upload_measuring(url, f"burst{i}", 48 * MiB, proc) for i in range(8))
    )

    async def trimmed() -> bool:
        return bool(proc.memory_info().rss - base < 10 * MiB)

    # Polled: the heap is trimmed once the pool is idle, within a few seconds at most.
    with contextlib.suppress(AssertionError):
        await until(trimmed, "the burst's memory given back", timeout_s=5)
    after = proc.memory_info().rss
    print(
        f"rss base={base / MiB:.0f}MiB burst peak={max(peaks) / MiB:.0f}MiB "
        f"after={after / MiB:.0f}MiB"
    )
    assert max(peaks) - base > 32 * MiB, "the burst did not fill the pool: test too weak"
    assert after - base < 10 * MiB, "memory of the burst was kept after it ended"
