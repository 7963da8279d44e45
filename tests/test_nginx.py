"""The shipped nginx site in front of the real daemon, over HTTPS (a self-signed
certificate made with openssl): bodies stream (nothing in client_body_temp), downloads
too (nothing in proxy_temp), memory stays bounded, aborts leave nothing, JSON errors
pass; port 80 only redirects, the access log holds no signature or tus id, and
per-address limits hold."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from proxy.auth import hash_token, sign_url
from proxy.storage.seaweed import free_port
from proxy.tus.state import storage_id
from tests.conftest import MiB, assert_nothing_left, get_object
from tests.daemon import Daemon, start_daemon
from tests.tus_helpers import create, patch

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "contrib" / "nginx" / "upload-proxy.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
TOKEN = "nginx-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
READER = "nginx-test-reader-0123456789"
READ_AUTH = {"Authorization": f"Bearer {READER}"}
SIGNING_SECRET = b"nginx-test-signing-secret-0123456789abcdef"
OPENSSL = shutil.which("openssl")
# The shipped per-address connection limit, read from the site so the test follows it.
CONN_LIMIT = int(re.search(r"limit_conn upload_proxy_conn (\d+);", SITE.read_text())[1])  # type: ignore[index]

pytestmark = [
    pytest.mark.skipif(NGINX is None, reason="nginx missing (make test-deps installs it)"),
    pytest.mark.skipif(OPENSSL is None, reason="openssl missing (make test-deps installs it)"),
]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1, as docs/deploy-pi.md makes one."""
    d = tmp_path_factory.mktemp("tls")
    crt, key = d / "upload-proxy.crt", d / "upload-proxy.key"
    assert OPENSSL is not None
    subprocess.run(
        [
            *(OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
            *("-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", str(key)),
            *("-out", str(crt), "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return crt, key


@dataclass
class Stack:
    daemon: Daemon
    url: str
    port: int
    http_port: int
    tls: ssl.SSLContext
    body_temp: Path
    nginx_pid: int
    error_log: Path
    access_log: Path
    proxy_temp: Path

    def session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.tls))

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=self.tls, server_hostname="localhost"
        )

    def temp_usage(self, temp: Path | None = None) -> tuple[int, int]:
        """Files and bytes nginx holds in client_body_temp (or ``temp``: proxy_temp for
        responses).  nginx unlinks a temp file right after creating it, so the directory
        alone always looks empty: count the files it still has open there too."""
        temp = temp or self.body_temp
        files = {p: p.stat().st_size for p in temp.rglob("*") if p.is_file()}
        fds = Path(f"/proc/{self.nginx_pid}/fd")
        for fd in fds.iterdir() if fds.exists() else ():
            try:
                if os.readlink(fd).startswith(str(temp)):
                    files[fd] = fd.stat().st_size
            except OSError:
                continue  # closed meanwhile
        return len(files), sum(files.values())

    def spooled(self) -> bool:
        return "buffered to a temporary file" in self.error_log.read_text()


def nginx_conf(
    tmp: Path, http_port: int, https_port: int, upstream_port: int, cert: tuple[Path, Path]
) -> Path:
    """The shipped site with only addresses and paths changed (each must be there)."""
    site = SITE.read_text()
    for old, new in (
        ("server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream_port};"),
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen [::]:80;\n", ""),
        ("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
        ("listen [::]:443 ssl;\n", ""),
        ("/etc/ssl/certs/upload-proxy.crt", str(cert[0])),
        ("/etc/ssl/private/upload-proxy.key", str(cert[1])),
        ("/var/log/nginx/upload-proxy.access.log", str(tmp / "site-access.log")),
        ("root /var/www/html;", f"root {tmp};"),
    ):
        assert old in site, old
        site = site.replace(old, new)
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
async def stack(
    seaweed: Any, prefix: str, tmp_path: Path, certificate: tuple[Path, Path]
) -> AsyncIterator[Stack]:
    secret = tmp_path / "signing.secret"
    secret.write_bytes(SIGNING_SECRET)
    daemon = await start_daemon(
        tmp_path,
        seaweed,
        prefix,
        server={"trusted_proxies": ["127.0.0.1", "::1"]},
        # Room for more uploads at once than nginx lets one address open (the limit
        # test): the proxy's own per-client limit and buffers must not answer first.
        upload={"max_upload_size": "300MiB", "memory_budget": "128MiB"},
        limits={"max_uploads_per_client": 32},
        auth={
            "mode": "required",
            "tokens": [hash_token(TOKEN)],
            "signing_secret_file": str(secret),
            "scoped_tokens": [{"tokens": [hash_token(READER)], "scopes": ["download"]}],
        },
        downloads={"enabled": True},
        logging={"format": "json"},
    )
    ngx = tmp_path / "nginx"
    ngx.mkdir()
    port, http_port = free_port(), free_port()
    tls = ssl.create_default_context(cafile=str(certificate[0]))
    assert NGINX is not None
    proc = await asyncio.create_subprocess_exec(
        NGINX,
        "-p",
        str(ngx),
        "-c",
        str(nginx_conf(ngx, http_port, port, daemon.port, certificate)),
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
            f"https://127.0.0.1:{port}",
            port,
            http_port,
            tls,
            ngx / "client_body",
            proc.pid,
            ngx / "error.log",
            ngx / "site-access.log",
            ngx / "proxy",
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
        stack.session() as s,
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


async def test_download_streams_through_nginx(stack: Stack, s3: Any, prefix: str) -> None:
    """A large GET through nginx to a client that reads slowly: nginx spools nothing to
    proxy_temp (its response buffering is off), the daemon's memory stays bounded, and
    ranges, conditionals and share links pass through unchanged."""
    size = 64 * MiB
    data = os.urandom(size)
    async with aiohttp.ClientSession() as s:  # straight to the daemon: only the GET matters
        async with s.put(f"{stack.daemon.url}/uploads/dl.bin", data=data, headers=AUTH) as r:
            assert r.status == 201, await r.text()
    rss = psutil.Process(stack.daemon.proc.pid)
    peak = {"rss": rss.memory_info().rss, "temp_files": 0, "temp_bytes": 0}
    digest = hashlib.sha256()
    async with stack.session() as s:
        async with s.get(f"{stack.url}/uploads/dl.bin", headers=READ_AUTH) as r:
            assert r.status == 200, await r.text()
            etag = r.headers["ETag"]
            async for chunk in r.content.iter_chunked(8 * MiB):
                digest.update(chunk)
                files, nbytes = stack.temp_usage(stack.proxy_temp)
                peak["temp_files"] = max(peak["temp_files"], files)
                peak["temp_bytes"] = max(peak["temp_bytes"], nbytes)
                peak["rss"] = max(peak["rss"], rss.memory_info().rss)
                # A slow client: what nginx would spool to disk if it buffered responses.
                await asyncio.sleep(0.2)
        assert digest.digest() == hashlib.sha256(data).digest()
        async with s.get(
            f"{stack.url}/uploads/dl.bin", headers={**READ_AUTH, "Range": f"bytes={size - 10}-"}
        ) as r:
            assert (r.status, r.headers["Content-Range"]) == (
                206,
                f"bytes {size - 10}-{size - 1}/{size}",
            )
            assert await r.read() == data[-10:]
        async with s.get(
            f"{stack.url}/uploads/dl.bin", headers={**READ_AUTH, "If-None-Match": etag}
        ) as r:
            assert r.status == 304
        query = sign_url(SIGNING_SECRET, "GET", key="dl.bin", expires_in_s=600)
        async with s.get(
            f"{stack.url}/uploads/dl.bin?{query}", headers={"Range": "bytes=0-3"}
        ) as r:
            assert (r.status, await r.read()) == (206, data[:4])
    assert (peak["temp_files"], peak["temp_bytes"]) == (0, 0)
    assert "temporary file" not in stack.error_log.read_text()
    assert peak["rss"] < 160 * MiB, peak
    print(
        f"\nnginx proxy_temp bytes: {peak['temp_bytes']}, "
        f"daemon peak RSS: {peak['rss'] / MiB:.0f} MiB"
    )
    signature = dict(p.split("=", 1) for p in query.split("&"))["sig"]
    async with asyncio.timeout(10):
        while stack.access_log.read_text().count("GET /uploads/dl.bin") < 4:
            await asyncio.sleep(0.05)
    assert signature not in stack.access_log.read_text()
    await s3.delete_object(f"{prefix}dl.bin")


async def test_client_abort_through_nginx_leaves_nothing(
    stack: Stack, s3: Any, prefix: str
) -> None:
    _reader, writer = await stack.connect()
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
    writer.transport.abort()  # the socket dropped, like a browser tab closed mid-upload
    async with asyncio.timeout(20):
        while await s3.list_multipart(prefix):
            await asyncio.sleep(0.1)
    await assert_nothing_left(s3, prefix)
    assert stack.temp_usage() == (0, 0) and not stack.spooled()


async def raw(stack: Stack, head: str, body: bytes = b"") -> tuple[int, dict[str, Any]]:
    reader, writer = await stack.connect()
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
        stack, "PUT /uploads/x.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n", b"hello"
    )
    assert (status, body["code"]) == (401, "ERR_UNAUTHORIZED")
    # Declared over upload.max_upload_size (300MiB): refused before the body.
    status, body = await raw(
        stack,
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
    async with stack.session() as s:
        url = await create(s, stack.url, len(data), **auth)
        assert url.startswith(f"{stack.url}/files/")
        assert (await patch(s, url, 0, data[: 3 * MiB], **auth)).status == 204
        offset = 3 * MiB
        async with s.head(url, headers={"Tus-Resumable": "1.0.0", **auth}) as r:
            assert r.status == 200 and int(r.headers["Upload-Offset"]) == offset
        assert (await patch(s, url, offset, data[offset:], **auth)).status == 204
    upload_id = storage_id(url.rsplit("/", 1)[1])
    keys = [o.key for o in await s3.list_objects(prefix) if upload_id in o.key]
    assert len(keys) == 1
    stored, meta = await get_object(s3, keys[0])
    assert stored == data and meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert stack.temp_usage() == (0, 0) and not stack.spooled()


async def test_port_80_only_redirects_to_https(stack: Stack, s3: Any, prefix: str) -> None:
    """308 keeps the method: a PUT sent to http:// is to be repeated as a PUT to https://,
    and nothing reaches the proxy over plain HTTP."""
    for method in ("GET", "PUT", "PATCH"):
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.http_port)
        writer.write(
            f"{method} /uploads/plain.bin?expires=1&sig=abc HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {TOKEN}\r\n"
            "Content-Length: 5\r\nConnection: close\r\n\r\nhello".encode()
        )
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        status, *headers = answer.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
        assert status.startswith("HTTP/1.1 308"), answer
        location = "https://127.0.0.1/uploads/plain.bin?expires=1&sig=abc"
        assert f"Location: {location}" in headers, headers
    await assert_nothing_left(s3, prefix)


async def test_access_log_has_no_signature_and_no_tus_id(
    stack: Stack, s3: Any, prefix: str
) -> None:
    query = sign_url(SIGNING_SECRET, "PUT", key="signed.bin", expires_in_s=600)
    signature = dict(p.split("=", 1) for p in query.split("&"))["sig"]
    async with stack.session() as s:
        async with s.put(f"{stack.url}/uploads/signed.bin?{query}", data=b"signed body") as r:
            assert r.status == 201, await r.text()
        url = await create(s, stack.url, 3, **AUTH)
        assert (await patch(s, url, 0, b"abc", **AUTH)).status == 204
    upload_id = url.rsplit("/", 1)[1]
    # nginx writes a request's line when it ends; the PATCH's may trail its answer.
    async with asyncio.timeout(10):
        while stack.access_log.read_text().count("/files/") < 2:
            await asyncio.sleep(0.05)
    log = stack.access_log.read_text()
    assert '"PUT /uploads/signed.bin HTTP/1.1" 201' in log, log
    assert '"PATCH /files/<id> HTTP/1.1" 204' in log, log
    assert signature not in log and "sig=" not in log and "?" not in log, log
    assert upload_id not in log, log
    await s3.delete_object(f"{prefix}signed.bin")


async def test_limit_conn_refuses_one_connection_too_many(
    stack: Stack, s3: Any, prefix: str
) -> None:
    """CONN_LIMIT slow uploads from one address run; the next request gets nginx's 429 in
    the proxy's JSON shape, without reaching the proxy; once they end, requests pass."""
    held = []
    try:
        for i in range(CONN_LIMIT):
            _, writer = await stack.connect()
            writer.write(
                f"PUT /uploads/slow-{i}.bin HTTP/1.1\r\nHost: x\r\nContent-Length: {MiB}\r\n"
                f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
                + b"s" * 1024
            )
            await writer.drain()
            held.append(writer)
        # Every one of them reached the proxy: its uploads are running.
        async with asyncio.timeout(30), aiohttp.ClientSession() as direct:
            while True:
                async with direct.get(f"{stack.daemon.url}/status") as r:
                    if (await r.json())["in_flight"]["uploads"] == CONN_LIMIT:
                        break
                await asyncio.sleep(0.05)
        status, body = await raw(
            stack,
            f"PUT /uploads/one-more.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            f"Authorization: Bearer {TOKEN}\r\n\r\n",
            b"hello",
        )
        assert (status, body["code"]) == (429, "ERR_CLIENT_LIMIT"), body
        assert "from your address" in body["message"]  # nginx's answer, not the proxy's
    finally:
        for writer in held:
            writer.transport.abort()
    async with asyncio.timeout(30):
        while await s3.list_multipart(prefix):
            await asyncio.sleep(0.1)
    # The slots are free again.
    async with (
        stack.session() as s,
        s.put(f"{stack.url}/uploads/after.bin", data=b"after", headers=AUTH) as r,
    ):
        assert r.status == 201, await r.text()
    await s3.delete_object(f"{prefix}after.bin")
    await assert_nothing_left(s3, prefix)
