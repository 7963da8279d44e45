"""Round trips and failure paths of PUT/POST uploads against the real SeaweedFS."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from proxy.storage.s3 import S3Storage
from proxy.web.uploads import MAX_FORM_FIELD_BYTES, MAX_FORM_FIELDS_BYTES
from tests.wrapped import Multiparts

from conftest import MiB, Proxy, StartProxy, assert_nothing_left, get_object, until

PART = 5 * MiB
SIZES = [0, 1, 100, 8192, 8193, MiB, PART - 1, PART, PART + 1, 3 * PART + 17]


def payload(size: int, seed: int = 1) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "big")).digest(size) if size else b""


async def chunked(data: bytes, step: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), step):
        yield data[i : i + step]


async def put(proxy: Proxy, key: str, body: Any, **kw: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.put(f"{proxy.url}/uploads/{key}", data=body, **kw) as r:
            return r.status, await r.json()


async def check_stored(s3: S3Storage, key: str, data: bytes, reply: dict[str, Any]) -> None:
    stored, meta = await get_object(s3, key)
    sha = hashlib.sha256(data).hexdigest()
    assert stored == data
    assert meta["sha256"] == sha
    assert reply["sha256"] == sha
    assert reply["size"] == len(data)
    assert (await s3.list_multipart(key)) == []


@pytest.mark.parametrize("size", SIZES)
async def test_round_trip_content_length(start_proxy: StartProxy, s3: S3Storage, size: int) -> None:
    proxy = await start_proxy()
    data = payload(size)
    status, reply = await put(proxy, f"obj-{size}", data)
    assert status == 201, reply
    assert reply["key"] == f"{proxy.prefix}obj-{size}"
    assert reply["bucket"] == s3.bucket
    await check_stored(s3, reply["key"], data, reply)


@pytest.mark.parametrize("size", SIZES)
async def test_round_trip_chunked(start_proxy: StartProxy, s3: S3Storage, size: int) -> None:
    proxy = await start_proxy()
    data = payload(size, seed=2)
    status, reply = await put(proxy, f"c/{size}.bin", chunked(data, 70_001))
    assert status == 201, reply
    await check_stored(s3, reply["key"], data, reply)


@pytest.mark.slow
async def test_round_trip_100mib(start_proxy: StartProxy, s3: S3Storage) -> None:
    proxy = await start_proxy(upload={"part_size": "8MiB"})
    data = os.urandom(100 * MiB)
    status, reply = await put(proxy, "big", chunked(data, MiB))
    assert status == 201, reply
    await check_stored(s3, reply["key"], data, reply)
    head = await s3.head(reply["key"])
    assert head is not None and head.etag.endswith('-13"')  # 100 MiB / 8 MiB parts


async def test_form_with_two_files(start_proxy: StartProxy, s3: S3Storage) -> None:
    proxy = await start_proxy()
    a, b = payload(PART + 3, seed=3), payload(1234, seed=4)
    form = aiohttp.FormData()
    form.add_field("note", "hello")
    form.add_field("first", a, filename="../../Holiday Photo.JPG", content_type="image/jpeg")
    form.add_field("second", b, filename="report.tar.gz", content_type="application/gzip")
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{proxy.url}/uploads", data=form) as r:
            assert r.status == 201
            reply = await r.json()
    assert [x["field"] for x in reply] == ["first", "second"]
    assert reply[0]["key"].startswith(proxy.prefix) and reply[0]["key"].endswith(".jpg")
    assert reply[1]["key"].endswith(".gz") and "/" not in reply[1]["key"][len(proxy.prefix) :]
    await check_stored(s3, reply[0]["key"], a, reply[0])
    await check_stored(s3, reply[1]["key"], b, reply[1])
    head = await s3.head(reply[0]["key"])
    assert head is not None and head.content_type == "image/jpeg"


async def test_a_form_whose_other_fields_exceed_their_bound_is_a_400(
    start_proxy: StartProxy, s3: S3Storage
) -> None:
    """Fields that are not files are read and dropped, within MAX_FORM_FIELDS_BYTES in
    all (each is within MAX_FORM_FIELD_BYTES here); nothing is stored."""
    proxy = await start_proxy()
    form = aiohttp.FormData()
    for i in range(MAX_FORM_FIELDS_BYTES // MAX_FORM_FIELD_BYTES + 1):
        form.add_field(f"f{i}", "v" * MAX_FORM_FIELD_BYTES)
    form.add_field("file", b"x", filename="f.txt")
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{proxy.url}/uploads", data=form) as r:
            assert (r.status, (await r.json())["code"]) == (400, "ERR_BAD_FORM")
    await assert_nothing_left(s3, proxy.prefix)


async def test_raw_post_gets_generated_key(start_proxy: StartProxy, s3: S3Storage) -> None:
    proxy = await start_proxy()
    data = payload(3000)
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{proxy.url}/uploads",
            data=data,
            headers={"Content-Disposition": 'attachment; filename="x.PDF"'},
        ) as r:
            assert r.status == 201
            reply = await r.json()
    assert reply["key"].startswith(proxy.prefix) and reply["key"].endswith(".pdf")
    await check_stored(s3, reply["key"], data, reply)


@pytest.mark.parametrize(
    "key",
    [
        "a/../b",
        "..",
        "./x",
        "a//b",
        "dir/",  # SeaweedFS would keep an empty folder entry and drop the body
        "%2Fabs",
        "bad%0Akey",
        "del%7Fx",
        "k" * 1025,
        "%C3%A9" * 513,
        "a%5C..%5C..%5Cescape",
        "nel%C2%85forged",  # C1 control (NEL)
        "invoice%E2%80%AEgpj.exe",  # right-to-left override
        "ls%E2%80%A8x",  # line separator
        "iso%E2%81%A6x",  # left-to-right isolate
        "zw%E2%80%8Bx",  # zero width space
    ],
)
async def test_bad_keys_rejected_before_body(
    start_proxy: StartProxy, s3: S3Storage, key: str
) -> None:
    proxy = await start_proxy()
    status, reply = await raw_request(
        proxy,
        f"PUT /uploads/{key} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
        "Expect: 100-continue\r\n\r\n",
    )
    assert status == 400 and reply["code"] == "ERR_INVALID_KEY", reply
    await assert_nothing_left(s3, proxy.prefix)


async def test_raw_control_char_in_url_gets_json_400(start_proxy: StartProxy) -> None:
    proxy = await start_proxy()
    status, reply = await raw_request(
        proxy, "PUT /uploads/ok\x01 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n", b"x"
    )
    assert status == 400 and reply["code"] == "ERR_BAD_REQUEST"


@pytest.mark.parametrize("expect", [False, True])
@pytest.mark.parametrize("path", ["/uploads/te/gz", "/files/"])
async def test_transfer_codings_other_than_chunked_are_refused(
    start_proxy: StartProxy, s3: S3Storage, expect: bool, path: str
) -> None:
    """aiohttp's parser takes ``gzip, chunked`` and hands the body over still gzipped:
    stored, it would not be the client's file (a 201 with the SHA-256 of other bytes).
    501 as RFC 9112 asks; with Expect, before the body is asked for."""
    proxy = await start_proxy()
    method = "PUT" if path.startswith("/uploads/") else "POST"
    tus = "Tus-Resumable: 1.0.0\r\nUpload-Length: 5\r\n" if method == "POST" else ""
    status, reply = await raw_request(
        proxy,
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n{tus}"
        + ("Expect: 100-continue\r\n" if expect else "")
        + "\r\n",
        b"" if expect else b"5\r\nhello\r\n0\r\n\r\n",
    )
    assert status == 501 and reply["code"] == "ERR_TRANSFER_CODING", reply
    await assert_nothing_left(s3, proxy.prefix)


async def test_keys_are_logged_quoted(
    start_proxy: StartProxy, s3: S3Storage, caplog: pytest.LogCaptureFixture
) -> None:
    """A key is quoted in the outcome line, so it cannot pose as the line's other fields."""
    caplog.set_level(logging.INFO, logger="proxy.engine.events")
    proxy = await start_proxy()
    key = "a.bin bytes=0 sha256=0 result=ok 'x"
    status, reply = await put(proxy, quote(key), b"data")
    assert status == 201, reply
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("upload ")]
    assert f"key={proxy.prefix + key!r} bytes=4 " in line, line
    await s3.delete_object(reply["key"])


async def raw_request(proxy: Proxy, head: str, body: bytes = b"") -> tuple[int, dict[str, Any]]:
    """Send bytes as given (no client-side URL normalisation); return status and JSON."""
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    try:
        writer.write(head.encode("utf-8") + body)
        await writer.drain()
        status_line = await reader.readline()
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0"))
        raw = await reader.readexactly(n)
        import json

        return int(status_line.split()[1]), json.loads(raw) if raw else {}
    finally:
        writer.close()


async def test_existing_key_conflict_and_overwrite(start_proxy: StartProxy, s3: S3Storage) -> None:
    proxy = await start_proxy()
    status, _ = await put(proxy, "same", b"first")
    assert status == 201
    status, reply = await put(proxy, "same", b"second")
    assert status == 409 and reply["code"] == "ERR_KEY_EXISTS"
    data, _ = await get_object(s3, f"{proxy.prefix}same")
    assert data == b"first"
    proxy2 = await start_proxy(upload={"overwrite": True})
    status, _ = await put(proxy2, "same", b"second")
    assert status == 201
    assert (await get_object(s3, f"{proxy.prefix}same"))[0] == b"second"


async def test_conflict_detected_at_completion(start_proxy: StartProxy, s3: S3Storage) -> None:
    """Two uploads to one key race past the pre-body check; the second must not overwrite."""
    proxy = await start_proxy()
    first = payload(PART * 2 + 5, seed=7)
    gate = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield first[: PART + 1]
        await gate.wait()
        yield first[PART + 1 :]

    task = asyncio.create_task(put(proxy, "race", slow()))
    # Its first part is on its way: the first upload is past its pre-body check.
    await until(lambda: s3.list_multipart(proxy.prefix), "the first upload's multipart upload")
    status, _ = await put(proxy, "race", b"winner")
    assert status == 201
    gate.set()
    status, reply = await task
    assert status == 409 and reply["code"] == "ERR_KEY_EXISTS"
    assert (await get_object(s3, f"{proxy.prefix}race"))[0] == b"winner"
    assert await s3.list_multipart(proxy.prefix) == []


@pytest.mark.parametrize(
    ("size", "overwrite", "stored"),
    [
        (1000, False, False),  # one PutObject, If-None-Match
        (2 * PART + 1, False, False),  # multipart, If-None-Match
        (2 * PART + 1, True, False),
        (1000, True, True),  # a plain PutObject over a folder: SeaweedFS keeps both
    ],
)
async def test_a_key_that_is_a_folder_is_a_conflict(
    start_proxy: StartProxy, s3: S3Storage, size: int, overwrite: bool, stored: bool
) -> None:
    """SeaweedFS cannot always store "a" while "a/..." exists: it refused with
    "precondition failed" (we said ERR_KEY_EXISTS although no object "a" exists) or, for a
    multipart completion with overwrite, a 500 that never heals (we said 503, try again).
    The honest answer is a stable 409 ERR_KEY_CONFLICT, with nothing left behind; where
    the store does keep both, the 201 is true."""
    proxy = await start_proxy(upload={"overwrite": overwrite})
    status, _ = await put(proxy, "a/inner", b"inside")
    assert status == 201
    data = payload(size)
    status, reply = await put(proxy, "a", data)
    assert await s3.list_multipart(proxy.prefix) == []
    assert (await get_object(s3, f"{proxy.prefix}a/inner"))[0] == b"inside"
    if stored:
        assert status == 201
        await check_stored(s3, f"{proxy.prefix}a", data, reply)
        return
    assert status == 409 and reply["code"] == "ERR_KEY_CONFLICT", reply
    assert [o.key for o in await s3.list_objects(proxy.prefix)] == [f"{proxy.prefix}a/inner"]


async def test_an_object_then_a_key_under_it_both_stay(
    start_proxy: StartProxy, s3: S3Storage
) -> None:
    """The other order works on SeaweedFS: "b" stays itself and "b/c" is stored too (each
    201 is true; a store that refused would give an error, not a 201)."""
    proxy = await start_proxy()
    for key, data in (("b", b"file"), ("b/c", payload(2 * PART + 1))):
        status, reply = await put(proxy, key, data)
        assert status == 201
        await check_stored(s3, f"{proxy.prefix}{key}", data, reply)
    assert (await get_object(s3, f"{proxy.prefix}b"))[0] == b"file"


async def test_declared_too_large_with_expect_never_sends_body(
    start_proxy: StartProxy, s3: S3Storage
) -> None:
    proxy = await start_proxy(upload={"max_upload_size": "1MiB"})
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        b"PUT /uploads/huge HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    assert status_line.startswith(b"HTTP/1.1 413"), status_line  # not 100 Continue
    writer.close()
    await assert_nothing_left(s3, proxy.prefix)


async def test_declared_too_large_without_expect(start_proxy: StartProxy, s3: S3Storage) -> None:
    proxy = await start_proxy(upload={"max_upload_size": "1MiB"})
    status, reply = await put(proxy, "huge", payload(MiB + 1))
    assert status == 413 and reply["code"] == "ERR_TOO_LARGE"
    await assert_nothing_left(s3, proxy.prefix)


async def test_chunked_body_growing_past_limit_is_cut_off(
    start_proxy: StartProxy, s3: S3Storage
) -> None:
    store = Multiparts(s3)
    proxy = await start_proxy(storage=store, upload={"max_upload_size": "12MiB"})
    status, reply = await put(proxy, "grows", chunked(payload(13 * MiB), MiB))
    assert status == 413 and reply["code"] == "ERR_TOO_LARGE"
    store.assert_all_aborted()  # it streamed parts before it was cut off
    await assert_nothing_left(s3, proxy.prefix)


@pytest.mark.parametrize("header", ["Content-MD5", "Repr-Digest", "X-Content-SHA256"])
@pytest.mark.parametrize("size", [10, 2 * PART + 1])
async def test_client_digest_verified(
    start_proxy: StartProxy, s3: S3Storage, header: str, size: int
) -> None:
    store = Multiparts(s3)
    proxy = await start_proxy(storage=store)
    data = payload(size, seed=5)

    def value(d: bytes) -> str:
        if header == "Content-MD5":
            return base64.b64encode(hashlib.md5(d).digest()).decode()
        if header == "Repr-Digest":
            return f"sha-256=:{base64.b64encode(hashlib.sha256(d).digest()).decode()}:"
        return hashlib.sha256(d).hexdigest()

    status, reply = await put(proxy, "bad", data, headers={header: value(data + b"x")})
    assert status == 400 and reply["code"] == "ERR_CHECKSUM_MISMATCH"
    if size > PART:  # the parts were stored before the digest could be checked
        store.assert_all_aborted()
    else:
        assert store.created == []  # one PutObject, never sent
    await assert_nothing_left(s3, proxy.prefix)
    status, reply = await put(proxy, "good", data, headers={header: value(data)})
    assert status == 201, reply
    await check_stored(s3, reply["key"], data, reply)


async def test_malformed_digest_header(start_proxy: StartProxy, s3: S3Storage) -> None:
    proxy = await start_proxy()
    status, reply = await put(proxy, "x", b"abc", headers={"Content-MD5": "nope"})
    assert status == 400 and reply["code"] == "ERR_BAD_DIGEST"
    await assert_nothing_left(s3, proxy.prefix)


@pytest.mark.parametrize("sent", [100, PART + 100, 2 * PART + 100])
async def test_truncated_body_leaves_nothing(
    start_proxy: StartProxy, s3: S3Storage, sent: int
) -> None:
    """Content-Length promises more than arrives, then the client goes away."""
    proxy = await start_proxy()
    _, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        f"PUT /uploads/trunc HTTP/1.1\r\nHost: x\r\nContent-Length: {3 * PART}\r\n\r\n".encode()
    )
    writer.write(payload(sent))
    await writer.drain()
    # The precondition: the upload runs (and, past a part, has a multipart upload).
    await until(running(proxy), "the upload to start")
    if sent > PART:
        await until(lambda: s3.list_multipart(proxy.prefix), "a multipart upload")
    writer.close()
    await wait_idle(proxy)
    await assert_nothing_left(s3, proxy.prefix)


async def test_chunked_client_disconnect_leaves_nothing(
    start_proxy: StartProxy, s3: S3Storage
) -> None:
    proxy = await start_proxy()
    _, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"PUT /uploads/gone HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    block = payload(MiB)
    for _ in range(12):
        writer.write(b"%x\r\n" % len(block) + block + b"\r\n")
    await writer.drain()
    await until(lambda: s3.list_multipart(proxy.prefix), "a multipart upload")  # precondition
    writer.transport.abort()  # reset, not a clean end
    await wait_idle(proxy)
    await assert_nothing_left(s3, proxy.prefix)


async def test_malformed_chunked_body(start_proxy: StartProxy, s3: S3Storage) -> None:
    proxy = await start_proxy()
    status, reply = await raw_request(
        proxy,
        "PUT /uploads/m HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"5\r\nhello\r\nZZ\r\n",
    )
    assert status == 400
    assert reply.get("code") in ("ERR_INCOMPLETE_BODY", "ERR_BAD_REQUEST")
    await wait_idle(proxy)
    await assert_nothing_left(s3, proxy.prefix)


async def test_idle_client_times_out(start_proxy: StartProxy, s3: S3Storage) -> None:
    store = Multiparts(s3)
    proxy = await start_proxy(storage=store, upload={"idle_timeout_s": 0.5})
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        f"PUT /uploads/slow HTTP/1.1\r\nHost: x\r\nContent-Length: {2 * PART}\r\n\r\n".encode()
        + payload(PART + 10)
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    assert b" 408 " in status_line
    writer.close()
    await wait_idle(proxy)
    store.assert_all_aborted()  # a part was stored before the client went quiet
    await assert_nothing_left(s3, proxy.prefix)


def running(proxy: Proxy) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return proxy.uploads.slots.in_use > 0

    return check


async def wait_idle(proxy: Proxy, timeout_s: float = 30) -> None:
    """Until no upload holds a slot or a part buffer: every upload has finished its
    clean-up (a failed upload gives its slot back only after its abort)."""

    async def idle() -> bool:
        return proxy.uploads.slots.in_use == 0 and proxy.pool.in_use_bytes == 0

    await until(idle, "every upload to finish its clean-up", timeout_s)


async def test_compressed_body_is_stored_as_sent(start_proxy: StartProxy, s3: S3Storage) -> None:
    """Content-Encoding: gzip is stored byte for byte, as S3 would (no size surprises)."""
    import gzip

    proxy = await start_proxy()
    raw = payload(3 * PART, seed=9)
    body = gzip.compress(raw, compresslevel=1)
    status, reply = await put(proxy, "z.gz", body, headers={"Content-Encoding": "gzip"})
    assert status == 201, reply
    await check_stored(s3, reply["key"], body, reply)
