"""The direct read path (proxy.web.conn.BodyTap): a declared body of 1 MiB or more is read
by the kernel straight into the part buffers, bypassing aiohttp's parser.  Every size
boundary (0, 1, the tap threshold, part_size +/- 1, several parts), a body broken at a
buffer edge (the head buffer, a part), bytes past the declared length, and the same
through the real daemon on uvloop.  Chunked bodies keep the chunk path (test_streaming's
property test sends chunked bodies of the same sizes)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp
import pytest

from proxy.app import POOL
from proxy.engine.buffers import HEAD_BYTES_MAX
from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import EmbeddedSeaweed
from proxy.web.preflight import TAP_MIN_BYTES
from tests.conftest import MiB, Proxy, StartProxy, assert_nothing_left, get_object, until
from tests.daemon import start_daemon
from tests.tus_helpers import OCTET, create, patch, tus_key, tus_sections

PART = 5 * MiB  # the tests' part_size
# Odd-sized client writes, so reads never line up with parts or buffers by accident.
WRITE_BYTES = 65537


def body_of(size: int, seed: bytes = b"tap") -> bytes:
    return hashlib.shake_256(seed).digest(size) if size else b""


async def send_put(
    writer: asyncio.StreamWriter, path: str, declared: int, body: bytes, *, close: bool = False
) -> None:
    writer.write(f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n\r\n".encode())
    for off in range(0, len(body), WRITE_BYTES):
        writer.write(body[off : off + WRITE_BYTES])
        await writer.drain()
    if close:
        writer.close()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status = int((await reader.readline()).split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def put_raw(proxy_host: str, port: int, path: str, data: bytes) -> tuple[int, dict[str, str]]:
    reader, writer = await asyncio.open_connection(proxy_host, port)
    try:
        await send_put(writer, path, len(data), data)
        status, headers, _ = await asyncio.wait_for(read_answer(reader), 60)
        if headers.get("connection", "").lower() == "close":
            # The daemon closes the connection after a tapped body: nothing more comes.
            assert await asyncio.wait_for(reader.read(), 10) == b""
        else:
            # Kept alive: the connection still serves a request.
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            again, _, _ = await asyncio.wait_for(read_answer(reader), 10)
            assert again == 200, again
        return status, headers
    finally:
        writer.close()


async def assert_stored(s3: S3Storage, key: str, data: bytes) -> None:
    stored, meta = await get_object(s3, key)
    assert len(stored) == len(data) and stored == data
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    "size",
    [
        0,
        1,
        TAP_MIN_BYTES - 1,
        TAP_MIN_BYTES,
        TAP_MIN_BYTES + 1,
        PART - 1,
        PART,
        PART + 1,
        2 * PART + 333,
    ],
)
async def test_a_declared_body_of_any_size_is_stored_exactly(
    start_proxy: StartProxy, s3: S3Storage, size: int
) -> None:
    proxy = await start_proxy()
    data = body_of(size)
    status, headers = await put_raw(proxy.host, proxy.port, f"/uploads/s{size}", data)
    assert status == 201
    await assert_stored(s3, f"{proxy.prefix}s{size}", data)
    closed = headers.get("connection", "").lower() == "close"
    if size <= 1:
        assert not closed  # aiohttp read it: the connection is reused
    if size >= PART:
        assert closed  # tapped: aiohttp's parser never saw the rest, so no reuse
    assert proxy.app[POOL].in_use_bytes == 0


async def broken_put(proxy: Proxy, name: str, declared: int, sent: bytes) -> None:
    """A PUT that declares ``declared`` bytes and sends ``sent``, then closes."""
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    await send_put(writer, f"/uploads/{name}", declared, sent, close=True)
    # Nothing or an error answer; never a 201.
    got = await asyncio.wait_for(reader.read(), 60)
    assert not got.startswith(b"HTTP/1.1 201"), got[:200]


@pytest.mark.parametrize("cut", [HEAD_BYTES_MAX - 1, HEAD_BYTES_MAX, PART - 1, PART, PART + 1])
async def test_a_body_broken_at_a_buffer_edge_stores_nothing(
    start_proxy: StartProxy, s3: S3Storage, cut: int
) -> None:
    proxy = await start_proxy()
    await broken_put(proxy, "broken", 3 * PART, body_of(cut))
    pool = proxy.app[POOL]

    async def settled() -> bool:
        return pool.in_use_bytes == 0 and not await s3.list_multipart(proxy.prefix)

    await until(settled, "the broken upload aborted and its buffers freed")
    await assert_nothing_left(s3, proxy.prefix)


async def test_bytes_past_the_declared_length_are_not_stored(
    start_proxy: StartProxy, s3: S3Storage
) -> None:
    """A client that sends more than it declared (or pipelines a request after a tapped
    body): the object is exactly the declared bytes and the connection closes."""
    proxy = await start_proxy()
    size = PART + 7
    data = body_of(size + 4096)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    try:
        await send_put(writer, "/uploads/extra", size, data)
        status, headers, _ = await asyncio.wait_for(read_answer(reader), 60)
        assert status == 201 and headers["connection"].lower() == "close"
        # Closed with the extra bytes unread: the kernel may answer them with a reset.
        try:
            assert await asyncio.wait_for(reader.read(), 10) == b""
        except ConnectionResetError:
            pass
    finally:
        writer.close()
    await assert_stored(s3, f"{proxy.prefix}extra", data[:size])


@pytest.mark.parametrize("cut", [HEAD_BYTES_MAX, PART - 1, PART, PART + 1])
async def test_a_tus_patch_broken_at_a_buffer_edge_keeps_exactly_what_came(
    start_proxy: StartProxy, s3: S3Storage, prefix: str, cut: int
) -> None:
    """tus keeps the bytes of a broken PATCH: the offset is exactly the bytes sent before
    the break, and the upload resumes from there to the right object."""
    proxy = await start_proxy(**tus_sections(prefix))
    size = 3 * PART
    data = body_of(size, b"tus")
    async with aiohttp.ClientSession() as http:
        url = await create(http, proxy.url, size)
        path = url.removeprefix(proxy.url)
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in OCTET.items())
        writer.write(
            f"PATCH {path} HTTP/1.1\r\nHost: x\r\n{head}Upload-Offset: 0\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
        )
        for off in range(0, cut, WRITE_BYTES):
            writer.write(data[off : min(cut, off + WRITE_BYTES)])
            await writer.drain()
        writer.close()
        await asyncio.wait_for(reader.read(), 60)

        async def offset_is_cut() -> bool:
            async with http.head(url, headers={"Tus-Resumable": "1.0.0"}) as r:
                return r.status == 200 and int(r.headers["Upload-Offset"]) == cut

        await until(offset_is_cut, f"the broken PATCH's {cut} bytes kept")
        r = await patch(http, url, cut, data[cut:])
        assert r.status == 204
    stored, meta = await get_object(s3, tus_key(prefix, url))
    assert stored == data
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()


async def test_the_daemon_on_uvloop_stores_every_boundary_exactly(
    tmp_path: Path, seaweed: EmbeddedSeaweed, s3: S3Storage, prefix: str
) -> None:
    """The daemon runs on uvloop, whose buffered reads differ from asyncio's."""
    daemon = await start_daemon(tmp_path, seaweed, prefix)
    try:
        for size in (1, TAP_MIN_BYTES + 1, PART - 1, PART, PART + 1, 2 * PART + 333):
            data = body_of(size, b"uvloop")
            status, _ = await put_raw("127.0.0.1", daemon.port, f"/uploads/u{size}", data)
            assert status == 201
            await assert_stored(s3, f"{prefix}u{size}", data)
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        await send_put(writer, "/uploads/ubroken", 3 * PART, body_of(PART), close=True)
        await asyncio.wait_for(reader.read(), 60)

        async def aborted() -> bool:
            return not await s3.list_multipart(f"{prefix}ubroken")

        await until(aborted, "the broken upload aborted")
        assert await s3.head(f"{prefix}ubroken") is None
    finally:
        await daemon.stop()
