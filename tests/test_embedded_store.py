"""The embedded SeaweedFS: it never talks to a stranger on its ports, and only the
daemon can reach its data (JWT on the internal HTTP ports, mutual TLS on gRPC, loopback
only, files and sockets private)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import psutil
import pytest
from aiohttp import web

from proxy.storage import seaweed as seaweed_mod
from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import (
    GRPC_PORT_OFFSET,
    Credentials,
    EmbeddedSeaweed,
    StoreStartError,
    free_port,
    load_or_create_credentials,
)
from proxy.storage.seaweed_security import CA_CERT, NODE_CERT, NODE_KEY, SECURITY_DIR

from conftest import BUCKET, StartProxy, create_bucket, get_object, s3_for
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
    assert sw.pid is None  # start() stopped (and waited for) the weed it had started
    assert str(s3_port + (GRPC_PORT_OFFSET if which == "s3 grpc taken" else 0)) in str(e.value)
    # weed notices a taken port within a second or two; 60 s would be the old stall.
    assert took < 30, took
    print(f"\n{which}: failed in {took:.1f}s: {e.value}")


async def test_internal_http_ports_refuse_requests_without_a_token(
    seaweed: EmbeddedSeaweed, s3: S3Storage, start_proxy: StartProxy, prefix: str
) -> None:
    secret = b"only through S3 with the daemon's keys " * 100
    proxy = await start_proxy()
    async with aiohttp.ClientSession() as s:
        async with s.put(f"{proxy.url}/uploads/secret.txt", data=secret) as r:
            assert r.status == 201, await r.text()
        # Through S3 it works (the store's components authenticate one another).
        assert (await get_object(s3, f"{prefix}secret.txt"))[0] == secret

        filer = f"http://127.0.0.1:{seaweed.ports['filer.port']}/buckets/{BUCKET}/{prefix}"
        async with s.get(filer + "secret.txt") as r:
            assert r.status >= 400 and secret[:20] not in await r.read()
        async with s.get(filer) as r:  # a directory listing
            assert r.status >= 400 and b"secret.txt" not in await r.read()
        async with s.put(filer + "planted.txt", data=b"not through S3") as r:
            assert r.status >= 400
        async with s.delete(filer + "secret.txt") as r:
            assert r.status >= 400
        assert await s3.head(f"{prefix}planted.txt") is None
        assert (await get_object(s3, f"{prefix}secret.txt"))[0] == secret

        master = f"http://127.0.0.1:{seaweed.ports['master.port']}"
        async with s.get(f"{master}/dir/assign") as r:  # would hand out a write token
            assert r.status >= 400

        volume = f"http://127.0.0.1:{seaweed.ports['volume.port']}"
        form = aiohttp.FormData()
        form.add_field("file", b"planted needle", filename="x")
        async with s.post(f"{volume}/1,01637037d6", data=form) as r:
            assert r.status == 401, await r.text()
        async with s.get(f"{volume}/1,01637037d6") as r:
            assert r.status == 401


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


async def speaks_grpc(port: int, tls: ssl.SSLContext | None) -> bool:
    """Whether the port answers an HTTP/2 connection preface with a SETTINGS frame."""
    writer = None
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None
            )
            writer.write(H2_PREFACE)
            await writer.drain()
            frame = await reader.readexactly(9)
            return frame[3] == 0x04
    except (OSError, asyncio.IncompleteReadError, TimeoutError):  # ssl.SSLError is an OSError
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def tls_context(security: Path, *, client_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(security / CA_CERT))
    ctx.set_alpn_protocols(["h2"])
    if client_cert:
        ctx.load_cert_chain(security / NODE_CERT, security / NODE_KEY)
    return ctx


async def test_grpc_ports_require_the_stores_certificate(seaweed: EmbeddedSeaweed) -> None:
    security = seaweed.data_dir / SECURITY_DIR
    grpc_ports = {flag: port for flag, port in seaweed.ports.items() if flag.endswith(".grpc")}
    components = ("s3", "master", "volume", "filer", "admin")
    assert set(grpc_ports) == {f"{c}.port.grpc" for c in components}
    for flag, port in grpc_ports.items():
        # With the store's own certificate the port answers: it is alive and speaks gRPC...
        assert await speaks_grpc(port, tls_context(security, client_cert=True)), flag
        # ...but not in plain text (what `weed shell` from another directory would try),
        assert not await speaks_grpc(port, None), flag
        # nor over TLS without a client certificate.
        assert not await speaks_grpc(port, tls_context(security, client_cert=False)), flag


@pytest.fixture
async def own_store(tmp_path: Path) -> AsyncIterator[EmbeddedSeaweed]:
    """A store whose data dir does not exist yet (the session one's is made by pytest)."""
    data_dir = tmp_path / "state" / "seaweedfs"
    sw = EmbeddedSeaweed(data_dir, bucket=BUCKET, credentials=load_or_create_credentials(data_dir))
    await sw.start(timeout_s=60)
    try:
        yield sw
    finally:
        await sw.stop()


async def test_store_is_private_to_the_daemon(own_store: EmbeddedSeaweed) -> None:
    sw = own_store
    async with s3_for(sw) as s3:
        await create_bucket(s3)
        kw = {"content_type": "text/plain", "checksum": None, "if_none_match": False}
        await s3.put_object("a.txt", b"data", metadata={}, **kw)
    assert sw.pid is not None
    weed = psutil.Process(sw.pid)
    listening = [c.laddr for c in weed.net_connections(kind="inet") if c.status == "LISTEN"]
    assert {a.port for a in listening} == set(sw.ports.values())
    assert {a.ip for a in listening} == {"127.0.0.1"}, listening

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(sw.data_dir) == 0o700
    assert mode(sw.data_dir / "credentials.json") == 0o600
    assert mode(sw.data_dir / SECURITY_DIR / "security.toml") == 0o600
    # weed gives its *.vif files (a volume's format version and replication settings,
    # no object data) 0644 whatever the umask; the 0700 data dir keeps them in anyway.
    shared = [
        (str(p.relative_to(sw.data_dir)), oct(mode(p)))
        for p in sw.data_dir.rglob("*")
        if not p.is_symlink() and mode(p) & 0o077 and p.suffix != ".vif"
    ]
    files = [p for p in sw.data_dir.rglob("*") if p.is_file()]
    assert len(files) > 5, files  # weed did write its volumes, indexes, filer store
    assert shared == [], shared
    # Its unix sockets (some in /tmp) accept connections from its own user only.
    sockets = {c.laddr for c in weed.net_connections(kind="unix") if c.laddr}
    assert sockets, "weed opened no unix socket"
    for path in map(Path, sockets):
        if path.exists():
            assert mode(path) & 0o077 == 0, (path, oct(mode(path)))
