"""The notify protocol against a fake NOTIFY_SOCKET: unit level and the real daemon."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from pathlib import Path
from typing import Any

from proxy.obs.sdnotify import Notifier
from tests.daemon import start_daemon


def bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + address[1:] if address.startswith("@") else address)
    sock.setblocking(False)
    return sock


def test_notifier_path_socket_and_no_op(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with bind(path) as sock:
        n = Notifier(path, watchdog_usec=1_000_000)
        assert n.ready("up\nWATCHDOG=1") and n.watchdog()
        assert sock.recv(4096) == b"READY=1\nSTATUS=up WATCHDOG=1"  # no forged line
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert n.watchdog_interval_s == 0.5
        n.close()
    off = Notifier(None, watchdog_usec=1_000_000)
    assert not off.enabled and not off.ready("x") and off.watchdog_interval_s is None
    # Gone socket: a failed send is reported, never raised.
    assert not Notifier(str(tmp_path / "missing.sock")).status("x")


def test_from_environ_respects_watchdog_pid_and_unsets() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}
    assert Notifier.from_environ(env).watchdog_interval_s is None  # another process's
    env["WATCHDOG_PID"] = str(os.getpid())
    assert Notifier.from_environ(env).watchdog_interval_s == 2.0
    os.environ["NOTIFY_SOCKET"] = "@unset-me"
    assert Notifier.from_environ().enabled
    assert "NOTIFY_SOCKET" not in os.environ


async def recv_until(sock: socket.socket, got: list[str], want: str, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        while not any(want in m for m in got):
            got.append((await loop.sock_recv(sock, 4096)).decode())


async def test_daemon_sends_ready_status_watchdog_stopping(
    seaweed: Any, prefix: str, tmp_path: Path
) -> None:
    address = f"@upload-proxy-test-{uuid.uuid4().hex}"  # abstract namespace
    with bind(address) as sock:
        daemon = await start_daemon(
            tmp_path,
            seaweed,
            prefix,
            server={"status_interval_s": 0.2},
            env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "300000"},
        )
        try:
            got: list[str] = []
            await recv_until(sock, got, "READY=1", 20)
            await recv_until(sock, got, "uploads in flight", 5)
            await recv_until(sock, got, "WATCHDOG=1", 5)
            daemon.signal()
            await recv_until(sock, got, "STOPPING=1", 10)
            assert await daemon.wait() == 0
        finally:
            await daemon.stop()
    first = got[0].splitlines()
    assert first[0] == "READY=1" and "storage ok" in first[1], got
    status_at = next(i for i, m in enumerate(got) if m.startswith("STATUS=0 uploads in flight"))
    watchdog_at = got.index("WATCHDOG=1")
    stopping_at = next(i for i, m in enumerate(got) if m.startswith("STOPPING=1"))
    assert 0 < status_at < stopping_at and 0 < watchdog_at < stopping_at
    assert "0.0 MiB/s" in got[status_at]
