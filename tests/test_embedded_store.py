"""The embedded SeaweedFS never talks to a stranger on its ports."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from proxy.storage import seaweed as seaweed_mod
from proxy.storage.seaweed import (
    GRPC_PORT_OFFSET,
    Credentials,
    EmbeddedSeaweed,
    StoreStartError,
    free_port,
)

from conftest import BUCKET
from daemon import spawn, write_config


@contextlib.contextmanager
def occupied(port: int) -> Iterator[socket.socket]:
    """A plain listener on 127.0.0.1:port, like any other program holding it."""
    with socket.socket() as s:
        # As Go's listeners do; without it a TIME_WAIT leftover on the port could refuse us.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        yield s


@pytest.mark.parametrize("which", ["s3", "s3 grpc"])
async def test_daemon_exits_at_once_naming_a_taken_port(tmp_path: Path, which: str) -> None:
    s3_port = free_port()
    taken = s3_port + (GRPC_PORT_OFFSET if which == "s3 grpc" else 0)
    cfg = write_config(
        tmp_path / "config.toml",
        {
            "server": {"listen": f"127.0.0.1:{free_port()}"},
            "auth": {"mode": "none"},
            "storage": {"backend": "embedded", "bucket": BUCKET},
            "storage.embedded": {
                "data_dir": str(tmp_path / "store"),
                "s3_port": s3_port,
                "start_timeout_s": 60,
            },
        },
    )
    with occupied(taken):
        started = time.monotonic()
        proc = await spawn(cfg)
        try:
            # Far below start_timeout_s (60): the check needs no store at all.  Generous
            # for a loaded 2-core machine: the interpreter's start alone can take seconds.
            async with asyncio.timeout(30):
                _, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    took = time.monotonic() - started
    message = err.decode()
    assert proc.returncode == 1, message
    assert f"port {taken} " in message and "storage.embedded.s3_port" in message, message
    assert "Traceback" not in message, message
    print(f"\nexited in {took:.1f}s: {message.strip().splitlines()[-1]}")


async def foreign_s3(port: int) -> web.AppRunner:
    """An S3 that is not ours: it refuses our keys, as another SeaweedFS would."""

    async def refuse(_: web.Request) -> web.Response:
        return web.Response(status=403, text="<Error><Code>InvalidAccessKeyId</Code></Error>")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@pytest.mark.parametrize("which", ["s3 answered by a stranger", "s3 grpc taken"])
async def test_a_port_taken_after_the_check_is_detected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    """The race: free when checked, taken when weed binds (weed then exits, or moves the
    port elsewhere).  Either way start() fails fast and says which port."""
    s3_port = free_port()
    # The check saw every port free; someone takes one right after.
    monkeypatch.setattr(seaweed_mod, "port_is_free", lambda port, host="": True)
    async with contextlib.AsyncExitStack() as stack:
        if which == "s3 grpc taken":
            stack.enter_context(occupied(s3_port + GRPC_PORT_OFFSET))
        else:
            stranger = await foreign_s3(s3_port)
            stack.push_async_callback(stranger.cleanup)
        sw = EmbeddedSeaweed(
            tmp_path / "store",
            bucket=BUCKET,
            credentials=Credentials("k" * 12, "s" * 24),
            s3_port=s3_port,
        )
        started = time.monotonic()
        with pytest.raises(StoreStartError) as e:
            await sw.start(timeout_s=60)
        took = time.monotonic() - started
    assert not sw.running
    assert str(s3_port + (GRPC_PORT_OFFSET if which == "s3 grpc taken" else 0)) in str(e.value)
    # weed notices a taken port within a second or two; 60 s would be the old stall.
    assert took < 30, took
    print(f"\n{which}: failed in {took:.1f}s: {e.value}")
