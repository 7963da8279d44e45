"""SIGTERM during uploads, on the real daemon: short ones finish, long ones are aborted
after the drain timeout, nothing is left open; a second signal exits at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import MiB, get_object
from tests.daemon import Daemon, start_daemon

DRAIN_S = 2.0


async def put(url: str, body: Any) -> int | str:
    try:
        async with aiohttp.ClientSession() as s, s.put(url, data=body) as r:
            return r.status
    except aiohttp.ClientError as e:
        return type(e).__name__


async def short_body() -> Any:
    for _ in range(4):  # ~1.2 s: finishes inside the 2 s drain
        yield b"s" * MiB
        await asyncio.sleep(0.3)


async def endless_body() -> Any:
    yield b"l" * (6 * MiB)  # past one 5 MiB part: a multipart upload is open
    while True:
        await asyncio.sleep(0.2)
        yield b"l" * 65536


async def wait_open_multipart(s3: Any, prefix: str, key: str) -> None:
    async with asyncio.timeout(15):
        while not any(u.key == prefix + key for u in await s3.list_multipart(prefix)):
            await asyncio.sleep(0.05)


async def test_sigterm_drains_then_aborts(
    seaweed: Any, s3: Any, prefix: str, tmp_path: Path
) -> None:
    daemon = await start_daemon(tmp_path, seaweed, prefix, server={"drain_timeout_s": DRAIN_S})
    try:
        long = asyncio.create_task(put(f"{daemon.url}/uploads/long.bin", endless_body()))
        await wait_open_multipart(s3, prefix, "long.bin")
        short = asyncio.create_task(put(f"{daemon.url}/uploads/short.bin", short_body()))
        await asyncio.sleep(0.2)
        daemon.signal()
        signalled = time.monotonic()
        assert await short == 201, daemon.log
        # New connections are refused during the drain.
        await asyncio.sleep(0.1)
        assert await put(f"{daemon.url}/uploads/late.bin", b"x") == "ClientConnectorError"
        assert await daemon.wait() == 0
        took = time.monotonic() - signalled
        assert DRAIN_S <= took < DRAIN_S + 8, took
        assert await long != 201
    finally:
        await daemon.stop()
    assert await s3.list_multipart(prefix) == []
    data, _ = await get_object(s3, f"{prefix}short.bin")
    assert data == b"s" * (4 * MiB)
    assert await s3.head(f"{prefix}long.bin") is None
    assert any("aborted" in line or "ERR_CANCELLED" in line for line in daemon.log), daemon.log


async def test_second_signal_exits_at_once(
    seaweed: Any, s3: Any, prefix: str, tmp_path: Path
) -> None:
    daemon: Daemon = await start_daemon(tmp_path, seaweed, prefix, server={"drain_timeout_s": 30})
    try:
        long = asyncio.create_task(put(f"{daemon.url}/uploads/long.bin", endless_body()))
        await wait_open_multipart(s3, prefix, "long.bin")
        daemon.signal()
        await asyncio.sleep(0.3)
        daemon.signal()
        started = time.monotonic()
        assert await daemon.wait(timeout_s=5) == 1
        assert time.monotonic() - started < 5
        await long
    finally:
        await daemon.stop()
    # Skipping the drain leaves the upload open: exactly what the stale sweeper is for.
    left = await s3.list_multipart(prefix)
    assert [u.key for u in left] == [f"{prefix}long.bin"]
    for u in left:
        await s3.abort_multipart(u.key, u.upload_id)
