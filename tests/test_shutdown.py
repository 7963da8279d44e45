"""SIGTERM during uploads, on the real daemon: short ones finish, long ones are aborted
after the drain timeout, nothing is left open; a second signal exits at once; with the
embedded store, the store stops only after the drain's aborts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from proxy.storage.seaweed import (
    EmbeddedSeaweed,
    StoreStartError,
    free_port,
    load_or_create_credentials,
)
from tests.conftest import BUCKET, MiB, create_bucket, get_object, s3_for, until
from tests.daemon import Daemon, launch, start_daemon, write_config

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


async def uploads_running(url: str, n: int) -> bool:
    """``n`` uploads are running (/status, as an operator would look)."""
    async with aiohttp.ClientSession() as s, s.get(f"{url}/status") as r:
        return bool((await r.json())["in_flight"]["uploads"] == n)


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    return False


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
        await until(lambda: uploads_running(daemon.url, 2), "the short upload to start")
        daemon.signal()
        signalled = time.monotonic()
        # New connections are refused during the drain (the listener closes just after
        # the drain is logged; polled with bare connections, which store nothing).
        await daemon.wait_log("stopping: waiting")
        await until(lambda: refused(daemon.port), "the listener to close")
        # ... by the drain, not at its end: the long upload is still waiting for its abort.
        assert not long.done(), "the listener closed only when the drain was over"
        assert await put(f"{daemon.url}/uploads/late.bin", b"x") == "ClientConnectorError"
        assert await short == 201, daemon.log
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
        await daemon.wait_log("draining")  # the first one was handled
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


async def test_sigterm_to_the_daemon_alone_drains_before_the_store_stops(
    prefix: str, tmp_path: Path
) -> None:
    """What systemd's KillMode=mixed does on stop: SIGTERM to the daemon's process only,
    with backend = "embedded".  The drain aborts the running upload while the store still
    serves; then the daemon stops the store; nothing is left open in it."""
    data_dir = tmp_path / "store"
    port, s3_port = free_port(), free_port()
    cfg = write_config(
        tmp_path / "embedded.toml",
        {
            "server": {"listen": f"127.0.0.1:{port}", "drain_timeout_s": DRAIN_S},
            "upload": {
                "key_prefix": prefix,
                "part_size": "5MiB",
                "memory_budget": "64MiB",
                "max_upload_size": "1GiB",
            },
            "auth": {"mode": "none"},
            "tus": {"enabled": False},
            "storage": {"backend": "embedded", "bucket": BUCKET},
            "storage.embedded": {"data_dir": str(data_dir), "s3_port": s3_port},
        },
    )
    daemon = await launch(cfg, port, timeout_s=90)
    try:
        (weed,) = psutil.Process(daemon.proc.pid).children()
        assert weed.name() == "weed"
        # storage.embedded.memory_limit's default reaches Go's garbage collector.
        assert weed.environ().get("GOMEMLIMIT") == str(256 * MiB)
        store = EmbeddedSeaweed(
            data_dir, bucket=BUCKET, credentials=load_or_create_credentials(data_dir)
        )
        store.s3_port = s3_port  # the daemon's store, seen with the daemon's own keys
        async with s3_for(store) as s3:
            long = asyncio.create_task(put(f"{daemon.url}/uploads/long.bin", endless_body()))
            await wait_open_multipart(s3, prefix, "long.bin")
            daemon.signal()  # the main process only, as KillMode=mixed does
            assert await daemon.wait(timeout_s=60) == 0, daemon.log
        assert await long != 201
        assert not weed.is_running(), "the daemon exited and left its store running"
    finally:
        await daemon.stop()
    log = daemon.log
    aborted = [i for i, line in enumerate(log) if "long.bin" in line and "ERR_CANCELLED" in line]
    stopping = [i for i, line in enumerate(log) if "stopping SeaweedFS" in line]
    assert aborted and stopping and aborted[0] < stopping[0], "\n".join(log)
    assert not any("abort" in line and "failed" in line for line in log), "\n".join(log)
    # The proof is in the store: start it again on the same data and look.  Its internal
    # ports are chosen free at start; another process on this machine (a test worker,
    # another suite) may take one before weed binds it: that start is tried again.
    for attempt in range(3):
        try:
            await store.start(timeout_s=60)
            break
        except StoreStartError as e:
            if "is not available" not in str(e) or attempt == 2:
                raise
    try:
        async with s3_for(store) as s3:
            await create_bucket(s3)
            assert await s3.list_multipart(prefix) == []
            assert await s3.head(f"{prefix}long.bin") is None
    finally:
        await store.stop()
