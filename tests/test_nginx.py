"""The shipped nginx site in front of the real daemon: bodies stream (nothing in
client_body_temp), memory stays bounded, aborts leave nothing, JSON errors pass."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from proxy.auth import hash_token
from proxy.storage.seaweed import free_port
from tests.conftest import MiB, assert_nothing_left, get_object
from tests.daemon import Daemon, start_daemon
from tests.tus_helpers import create, patch

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "contrib" / "nginx" / "upload-proxy.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
TOKEN = "nginx-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx missing (make test-deps installs it)")


@dataclass
class Stack:
    daemon: Daemon
    url: str
    port: int
    body_temp: Path
    nginx_pid: int
    error_log: Path

    def temp_usage(self) -> tuple[int, int]:
        """Files and bytes nginx holds in client_body_temp.  nginx unlinks a body temp
        file right after creating it, so the directory alone always looks empty: count
        the files it still has open there too."""
        files = {p: p.stat().st_size for p in self.body_temp.rglob("*") if p.is_file()}
        fds = Path(f"/proc/{self.nginx_pid}/fd")
        for fd in fds.iterdir() if fds.exists() else ():
            try:
                if os.readlink(fd).startswith(str(self.body_temp)):
                    files[fd] = fd.stat().st_size
            except OSError:
                continue  # closed meanwhile
        return len(files), sum(files.values())

    def spooled(self) -> bool:
        return "buffered to a temporary file" in self.error_log.read_text()


def nginx_conf(tmp: Path, listen_port: int, upstream_port: int) -> Path:
    site = SITE.read_text()
    site = site.replace("server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream_port};")
    site = site.replace("listen 80;", f"listen 127.0.0.1:{listen_port};")
    site = site.replace("listen [::]:80;\n", "")
    (tmp / "site.conf").write_text(site)
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / d).mkdir()
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
daemon off;
# One process as the test's own user: no privilege drop, its files stay in tmp.
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/site.conf;
}}
""")
    return conf


@pytest.fixture
async def stack(seaweed: Any, prefix: str, tmp_path: Path) -> AsyncIterator[Stack]:
    daemon = await start_daemon(
        tmp_path,
        seaweed,
        prefix,
        server={"trusted_proxies": ["127.0.0.1", "::1"]},
        upload={"max_upload_size": "300MiB"},
        auth={"mode": "required", "tokens": [hash_token(TOKEN)]},
        logging={"format": "json"},
    )
    ngx = tmp_path / "nginx"
    ngx.mkdir()
    port = free_port()
    assert NGINX is not None
    proc = await asyncio.create_subprocess_exec(
        NGINX,
        "-p",
        str(ngx),
        "-c",
        str(nginx_conf(ngx, port, daemon.port)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(15):
            while True:
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", port)
                    w.close()
                    break
                except OSError:
                    if proc.returncode is not None:
                        raise RuntimeError((ngx / "error.log").read_text()) from None
                    await asyncio.sleep(0.05)
        yield Stack(
            daemon,
            f"http://127.0.0.1:{port}",
            port,
            ngx / "client_body",
            proc.pid,
            ngx / "error.log",
        )
    finally:
        proc.terminate()
        await proc.wait()
        await daemon.stop()


async def test_large_upload_streams_through_nginx(stack: Stack, s3: Any, prefix: str) -> None:
    size = 192 * MiB
    rss = psutil.Process(stack.daemon.proc.pid)
    peak = {"rss": rss.memory_info().rss, "temp_files": 0, "temp_bytes": 0}
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            peak["rss"] = max(peak["rss"], rss.memory_info().rss)
            files, nbytes = stack.temp_usage()
            peak["temp_files"] = max(peak["temp_files"], files)
            peak["temp_bytes"] = max(peak["temp_bytes"], nbytes)
            await asyncio.sleep(0.05)

    async def body() -> AsyncIterator[bytes]:
        chunk = os.urandom(MiB)
        for _ in range(size // MiB):
            yield chunk

    watcher = asyncio.create_task(watch())
    headers = {**AUTH, "Content-Length": str(size), "X-Forwarded-For": "6.6.6.6"}
    async with (
        aiohttp.ClientSession() as s,
        s.put(f"{stack.url}/uploads/big.bin", data=body(), headers=headers) as r,
    ):
        result = await r.json()
        assert r.status == 201, result
    done.set()
    await watcher
    assert result["size"] == size
    info = await s3.head(f"{prefix}big.bin")
    assert info is not None and info.size == size
    # nginx streamed the body: nothing was ever spooled to its temp dir.
    assert (peak["temp_files"], peak["temp_bytes"]) == (0, 0)
    assert not stack.spooled()
    # The daemon: 64MiB part budget + the interpreter; far below the 192 MiB body.
    assert peak["rss"] < 160 * MiB, peak
    print(
        f"\nnginx temp bytes: {peak['temp_bytes']}, daemon peak RSS: "
        f"{peak['rss'] / MiB:.0f} MiB for a {size // MiB} MiB upload"
    )
    # The daemon logged the client nginx saw (127.0.0.1), not the spoofed header.
    line = next(
        json.loads(x)
        for x in stack.daemon.log
        if x.startswith("{") and "big.bin" in x and '"result"' in x
    )
    assert line["remote"] == "127.0.0.1"
    await s3.delete_object(f"{prefix}big.bin")


async def test_client_abort_through_nginx_leaves_nothing(
    stack: Stack, s3: Any, prefix: str
) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    writer.write(
        f"PUT /uploads/aborted.bin HTTP/1.1\r\nHost: x\r\nContent-Length: {64 * MiB}\r\n"
        f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
    )
    for _ in range(12):  # 12 MiB: two parts sent, a multipart upload is open
        writer.write(b"a" * MiB)
        await writer.drain()
    async with asyncio.timeout(10):
        while not await s3.list_multipart(prefix):
            await asyncio.sleep(0.05)
    writer.transport.abort()  # RST, like a browser tab closed mid-upload
    async with asyncio.timeout(20):
        while await s3.list_multipart(prefix):
            await asyncio.sleep(0.1)
    await assert_nothing_left(s3, prefix)
    assert stack.temp_usage() == (0, 0) and not stack.spooled()


async def raw(port: int, head: str, body: bytes = b"") -> tuple[int, dict[str, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode() + body)
    await writer.drain()
    async with asyncio.timeout(10):
        data = await reader.read(65536)
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            more = await reader.read(65536)
            if not more:
                break
            data += more
    writer.close()
    status = int(data.split(b" ", 2)[1])
    m = re.search(rb"\{.*\}", data, re.S)
    return status, json.loads(m.group(0)) if m else {}


async def test_401_and_413_reach_the_client_intact(stack: Stack, s3: Any, prefix: str) -> None:
    status, body = await raw(
        stack.port, "PUT /uploads/x.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n", b"hello"
    )
    assert (status, body["code"]) == (401, "ERR_UNAUTHORIZED")
    # Declared over upload.max_upload_size (300MiB): refused before the body.
    status, body = await raw(
        stack.port,
        "PUT /uploads/x.bin HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {400 * MiB}\r\nAuthorization: Bearer {TOKEN}"
        "\r\n\r\n",
        b"x" * 65536,
    )
    assert (status, body["code"]) == (413, "ERR_TOO_LARGE")
    assert "300" in body["message"] or str(300 * MiB) in body["message"]
    await assert_nothing_left(s3, prefix)
    assert stack.temp_usage() == (0, 0) and not stack.spooled()


async def test_tus_resumes_through_nginx(stack: Stack, s3: Any, prefix: str) -> None:
    """tus through the shipped site: Location is usable as is, a resumed PATCH completes."""
    data = hashlib.shake_256(b"tus-nginx").digest(6 * MiB + 11)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as s:
        url = await create(s, stack.url, len(data), **auth)
        assert url.startswith(f"{stack.url}/files/")
        assert (await patch(s, url, 0, data[: 3 * MiB], **auth)).status == 204
        offset = 3 * MiB
        async with s.head(url, headers={"Tus-Resumable": "1.0.0", **auth}) as r:
            assert r.status == 200 and int(r.headers["Upload-Offset"]) == offset
        assert (await patch(s, url, offset, data[offset:], **auth)).status == 204
    upload_id = url.rsplit("/", 1)[1]
    keys = [o.key for o in await s3.list_objects(prefix) if upload_id in o.key]
    assert len(keys) == 1
    stored, meta = await get_object(s3, keys[0])
    assert stored == data and meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert stack.temp_usage() == (0, 0) and not stack.spooled()
