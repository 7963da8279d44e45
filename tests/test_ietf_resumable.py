"""IETF "Resumable Uploads for HTTP" on the tus endpoint, against the real SeaweedFS:
interop 8 (draft -11) and 3 (Apple URLSession) over raw sockets, tus-js-client's
``ietf-draft-05`` / ``ietf-draft-03`` modes cut mid-upload by a relay, Repr-Digest
checked at completion, ownership, and any break points giving the same object."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hook_receiver import Receiver
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sec_http import Answer, build, connect, exchange, read_answer
from tus_helpers import only_objects, sid, store_for, tus_key, tus_sections
from wrapped import Wrapped

from proxy.auth import hash_token
from proxy.tus.maintenance import sweep_once
from proxy.web.tus_common import TUS as TUS_ROUTES

from conftest import MiB, assert_nothing_left, data_path, get_object, s3_for, until

JS_DIR = Path(__file__).parent / "js"
V8 = {"Upload-Draft-Interop-Version": "8"}
PARTIAL = {**V8, "Content-Type": "application/partial-upload"}
TOKEN_A = "alice-token-0123456789abcdef"
TOKEN_B = "bob-token-0123456789abcdef00"
A = {"Authorization": f"Bearer {TOKEN_A}"}
B = {"Authorization": f"Bearer {TOKEN_B}"}
SECRET = b"hook-secret-0123456789abcdef0123456789"


def repr_digest(data: bytes) -> str:
    return "sha-256=:" + base64.b64encode(hashlib.sha256(data).digest()).decode() + ":"


async def create(port: int, headers: dict[str, str], body: bytes = b"") -> Answer:
    r = await exchange(port, "POST", "/files/", headers, body)
    assert r.status == 201, (r.status, r.body)
    assert r.headers["location"].startswith("/files/")
    return r


async def append(
    port: int, path: str, offset: int, data: bytes, complete: bool, **extra: str
) -> Answer:
    headers = {**PARTIAL, "Upload-Offset": str(offset), **extra}
    headers["Upload-Complete"] = "?1" if complete else "?0"
    return await exchange(port, "PATCH", path, headers, data)


async def cut(proxy: Any, request: bytes, sent: bytes, interim: bool = False) -> str | None:
    """Send ``request`` (headers promising more) and ``sent`` of its body, wait until the
    daemon has taken those bytes in (its received-bytes counter), then close the
    connection; with ``interim``, first read the 104 and return its Location.  (Bytes
    still in the daemon's socket buffer when a connection drops are lost with it:
    aiohttp raises the disconnect before handing them over.)"""
    stats = proxy.uploads.events.stats
    before = stats.received_bytes
    reader, writer = await connect(proxy.port)
    try:
        writer.write(request)
        await writer.drain()
        location = None
        if interim:
            answer = await read_answer(reader)
            assert answer.status == 104, answer.head
            location = answer.headers["location"]
        writer.write(sent)
        await writer.drain()

        async def taken() -> bool:
            return bool(stats.received_bytes >= before + len(sent))

        await until(taken, f"the daemon received {len(sent)} body bytes")
    finally:
        writer.close()
        await writer.wait_closed()
    return location


async def offset_becomes(port: int, path: str, expected: int, headers: dict[str, str]) -> Answer:
    """HEAD until the cut request's bytes are committed (it releases the upload)."""
    last: list[Answer] = []

    async def check() -> bool:
        last[:] = [await exchange(port, "HEAD", path, headers)]
        return last[0].status == 204 and last[0].headers["upload-offset"] == str(expected)

    await until(check, f"HEAD {path} says Upload-Offset {expected}")
    return last[0]


async def test_interop8_create_cut_head_append_complete(start_proxy, s3, prefix) -> None:
    proxy = await start_proxy(**tus_sections(prefix))
    data = os.urandom(7 * MiB + 321)  # a whole part and a tail when cut
    name = "report 2026.pdf"
    r = await create(
        proxy.port,
        {
            **V8,
            "Upload-Complete": "?0",
            "Upload-Length": str(len(data)),
            "Content-Disposition": f'inline; filename="{name}"',
        },
    )
    path = r.headers["location"]
    assert r.headers["upload-complete"] == "?0" and r.headers["upload-offset"] == "0"
    assert r.headers["upload-limit"].startswith("max-size=")
    assert "max-age=" in r.headers["upload-limit"]
    # An append of everything, cut after 6 MiB + 5 bytes: they are kept.
    kept = 6 * MiB + 5
    head = build("PATCH", path, {**PARTIAL, "Upload-Offset": "0", "Upload-Complete": "?1",
                                 "Content-Length": str(len(data))})  # fmt: skip
    await cut(proxy, head, data[:kept])
    h = await offset_becomes(proxy.port, path, kept, V8)
    assert h.headers["upload-complete"] == "?0"
    assert h.headers["upload-length"] == str(len(data))
    assert h.headers["cache-control"] == "no-store"
    # A wrong offset: 409 with the right one and the draft's problem type.
    wrong = await append(proxy.port, path, 0, data[:10], complete=False)
    assert wrong.status == 409 and wrong.headers["upload-offset"] == str(kept)
    problem = wrong.json()
    assert problem["code"] == "ERR_OFFSET_MISMATCH"
    assert problem["type"].endswith("#mismatching-upload-offset")
    assert (problem["expected-offset"], problem["provided-offset"]) == (kept, 0)
    # The rest, completing, with the whole upload's Repr-Digest.
    done = await append(
        proxy.port, path, kept, data[kept:], complete=True, **{"Repr-Digest": repr_digest(data)}
    )
    assert done.status == 200, done.body
    assert done.headers["upload-complete"] == "?1"
    assert done.headers["repr-digest"] == repr_digest(data)
    assert done.json()["sha256"] == hashlib.sha256(data).hexdigest()
    body, meta = await get_object(s3, tus_key(prefix, path, name))
    assert body == data and meta["sha256"] == hashlib.sha256(data).hexdigest()
    # Its URL still answers: complete, with the digest.
    h = await exchange(proxy.port, "HEAD", path, V8)
    assert (h.status, h.headers["upload-complete"]) == (204, "?1")
    assert h.headers["upload-offset"] == str(len(data))
    assert h.headers["repr-digest"] == repr_digest(data)
    # An empty completing append after that (a client that lost the answer) is answered
    # as the completion was; one with bytes is refused with the draft's problem type.
    again = await append(proxy.port, path, len(data), b"", complete=True)
    assert again.status == 200 and again.headers["repr-digest"] == repr_digest(data)
    more = await append(proxy.port, path, len(data), b"x", complete=True)
    assert more.status == 400 and more.json()["type"].endswith("#completed-upload")


class RecordWrites(Wrapped):
    """Which keys got an object written (PutObject, CompleteMultipartUpload)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.written: list[str] = []

    async def put_object(self, key: str, *args: Any, **kwargs: Any) -> Any:
        self.written.append(key)
        return await self.inner.put_object(key, *args, **kwargs)

    async def complete_multipart(self, key: str, *args: Any, **kwargs: Any) -> Any:
        self.written.append(key)
        return await self.inner.complete_multipart(key, *args, **kwargs)


@pytest.mark.parametrize("size", [1000, 6 * MiB + 7])  # one PutObject / a multipart upload
@pytest.mark.parametrize("where", ["creation", "append"])
async def test_wrong_repr_digest_fails_and_stores_nothing(
    start_proxy, seaweed, s3, prefix, size, where
) -> None:
    async with s3_for(seaweed) as real:
        recording = RecordWrites(real)
        proxy = await start_proxy(storage=recording, **tus_sections(prefix))
        await wrong_digest_upload(proxy, s3, prefix, size, where)
        # Not even for a moment: no write ever went to the object's key.
        assert [k for k in recording.written if k.startswith(f"{prefix}tus/")] == []
        # The recorder sees the write of an upload whose digest is right (not vacuous).
        data = os.urandom(size)
        r = await create(proxy.port, {**V8, "Upload-Complete": "?1"}, data)
        assert tus_key(prefix, r.headers["location"]) in recording.written


async def wrong_digest_upload(proxy: Any, s3: Any, prefix: str, size: int, where: str) -> None:
    data = os.urandom(size)
    wrong = repr_digest(data + b"!")
    create_headers = {**V8, "Upload-Complete": "?0", "Upload-Length": str(size)}
    if where == "creation":
        create_headers["Repr-Digest"] = wrong
    r = await create(proxy.port, create_headers)
    path = r.headers["location"]
    extra = {"Repr-Digest": wrong} if where == "append" else {}
    half = size // 2
    assert (await append(proxy.port, path, 0, data[:half], complete=False)).status == 204
    # Precondition of the absence below: the upload's state exists until completion.
    assert await s3.list_objects(prefix) != []
    done = await append(proxy.port, path, half, data[half:], complete=True, **extra)
    assert done.status == 400, done.body
    assert done.json()["code"] == "ERR_REPR_DIGEST_MISMATCH"
    await assert_nothing_left(s3, prefix)
    assert (await exchange(proxy.port, "HEAD", path, V8)).status == 404


async def test_creation_with_whole_body_and_digest(start_proxy, s3, prefix) -> None:
    """A plain POST that carries Upload-Complete: ?1 and its whole body is one request."""
    proxy = await start_proxy(**tus_sections(prefix))
    data = os.urandom(300_000)
    headers = {
        **V8,
        "Upload-Complete": "?1",
        "Repr-Digest": repr_digest(data),
        "Content-Type": "image/jpeg",
        "Content-Disposition": "inline; filename=a.jpg",
    }
    r = await create(proxy.port, headers, data)
    assert r.headers["upload-complete"] == "?1"
    assert r.headers["repr-digest"] == repr_digest(data)
    assert r.headers["upload-offset"] == str(len(data))
    body, _ = await get_object(s3, tus_key(prefix, r.headers["location"], "a.jpg"))
    assert body == data
    assert (await s3.head(tus_key(prefix, r.headers["location"], "a.jpg"))).content_type == (
        "image/jpeg"
    )


async def test_104_announces_the_upload_so_a_cut_creation_resumes(start_proxy, s3, prefix) -> None:
    proxy = await start_proxy(**tus_sections(prefix, send_104=True))
    data = os.urandom(2 * MiB + 77)
    head = build("POST", "/files/", {**V8, "Upload-Complete": "?1",
                                     "Content-Length": str(len(data))})  # fmt: skip
    path = await cut(proxy, head, data[:MiB], interim=True)
    assert path is not None and path.startswith("/files/")
    h = await offset_becomes(proxy.port, path, MiB, V8)
    assert h.headers["upload-length"] == str(len(data))  # Content-Length with ?1 fixed it
    done = await append(proxy.port, path, MiB, data[MiB:], complete=True)
    assert done.status == 200 and done.headers["repr-digest"] == repr_digest(data)
    assert (await get_object(s3, tus_key(prefix, path)))[0] == data


async def test_no_104_by_default(start_proxy, prefix) -> None:
    proxy = await start_proxy(**tus_sections(prefix))
    reader, writer = await connect(proxy.port)
    try:
        writer.write(build("POST", "/files/", {**V8, "Upload-Complete": "?1"}, b"abc"))
        await writer.drain()
        first = await read_answer(reader)
    finally:
        writer.close()
    assert first.status == 201 and first.headers["upload-complete"] == "?1"


async def test_interop3_apple_urlsession(start_proxy, s3, prefix) -> None:
    """Interop 3 (draft -01, iOS 17 / macOS 14): Upload-Incomplete, 201 for appends."""
    proxy = await start_proxy(**tus_sections(prefix))
    v3 = {"Upload-Draft-Interop-Version": "3"}
    data = os.urandom(1_500_000)
    r = await create(proxy.port, {**v3, "Upload-Incomplete": "?1"}, data[:500_000])
    path = r.headers["location"]
    assert r.headers["upload-incomplete"] == "?1"
    assert r.headers["upload-offset"] == "500000"
    h = await exchange(proxy.port, "HEAD", path, v3)
    assert (h.status, h.headers["upload-offset"], h.headers["upload-incomplete"]) == (
        204,
        "500000",
        "?1",
    )
    assert "upload-limit" not in h.headers  # interop 3 had no limits
    mid = await exchange(proxy.port, "PATCH", path,
                         {**v3, "Upload-Offset": "500000", "Upload-Incomplete": "?1"},
                         data[500_000:900_000])  # fmt: skip
    assert (mid.status, mid.headers["upload-offset"]) == (201, "900000")
    # No Upload-Incomplete: the last append (and no Content-Type needed in interop 3).
    end = await exchange(proxy.port, "PATCH", path, {**v3, "Upload-Offset": "900000"},
                         data[900_000:])  # fmt: skip
    assert end.status == 201 and end.headers["upload-incomplete"] == "?0"
    assert (await get_object(s3, tus_key(prefix, path)))[0] == data


async def test_options_and_unknown_version(start_proxy, prefix) -> None:
    proxy = await start_proxy(**tus_sections(prefix))
    o = await exchange(proxy.port, "OPTIONS", "/files/", V8)
    assert o.status == 204 and o.headers["accept-patch"] == "application/partial-upload"
    assert o.headers["upload-limit"] == f"max-size={proxy.config.upload.max_upload_size_bytes}"
    v4 = {"Upload-Draft-Interop-Version": "4", "Upload-Complete": "?0"}
    bad = await exchange(proxy.port, "POST", "/files/", v4)
    assert (bad.status, bad.code) == (400, "ERR_INTEROP_VERSION")
    # tus on the same path is untouched.
    t = await exchange(proxy.port, "OPTIONS", "/files/", {})
    assert t.headers["tus-version"] == "1.0.0"


async def test_another_token_gets_404_and_delete_cancels(start_proxy, s3, prefix) -> None:
    auth = {"mode": "required", "tokens": [hash_token(TOKEN_A), hash_token(TOKEN_B)]}
    proxy = await start_proxy(auth=auth, **tus_sections(prefix))
    r = await create(proxy.port, {**V8, **A, "Upload-Complete": "?0"}, b"")
    path = r.headers["location"]
    assert (await append(proxy.port, path, 0, b"x" * 1000, False, **A)).status == 204
    unknown = "/files/" + "0" * 32
    for target in (path, unknown):
        answers = [
            await exchange(proxy.port, "HEAD", target, {**V8, **B}),
            await append(proxy.port, target, 1000, b"evil", False, **B),
            await exchange(proxy.port, "DELETE", target, {**V8, **B}),
        ]
        assert [a.status for a in answers] == [404, 404, 404]
        assert all("upload-offset" not in a.headers for a in answers)
    h = await exchange(proxy.port, "HEAD", path, {**V8, **A})
    assert h.headers["upload-offset"] == "1000"
    assert (await exchange(proxy.port, "DELETE", path, {**V8, **A})).status == 204
    await assert_nothing_left(s3, prefix)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.integers(min_value=1, max_value=6 * MiB), min_size=0, max_size=3, unique=True))
async def test_any_break_points_give_the_same_object(start_proxy, s3, prefix, cuts) -> None:
    """Appends ending at any points (some cut mid-body) store the same object."""
    proxy = await start_proxy(**tus_sections(prefix))
    data = os.urandom(6 * MiB + 1)
    r = await create(proxy.port, {**V8, "Upload-Complete": "?0"})
    path = r.headers["location"]
    offset = 0
    for point in sorted(cuts):
        head = build("PATCH", path, {**PARTIAL, "Upload-Offset": str(offset),
                                     "Upload-Complete": "?1",
                                     "Content-Length": str(len(data) - offset)})  # fmt: skip
        await cut(proxy, head, data[offset:point])
        await offset_becomes(proxy.port, path, point, V8)
        offset = point
    done = await append(proxy.port, path, offset, data[offset:], complete=True)
    assert done.status == 200 and done.headers["repr-digest"] == repr_digest(data)
    key = tus_key(prefix, path)
    assert (await get_object(s3, key))[0] == data
    assert await only_objects(s3, prefix) == [key]
    await s3.delete_object(key)


# -- tus-js-client in its IETF modes, cut by a relay ----------------------------------


@pytest.fixture(scope="module")
def node_client() -> Path:
    """tus-js-client from tests/js, installed from its lock file if it is not yet."""
    assert shutil.which("node"), "Node.js is required for the tus-js-client tests"
    if not (JS_DIR / "node_modules" / "tus-js-client").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True)
    return JS_DIR / "upload_ietf.mjs"


class CuttingRelay:
    """A TCP relay to the daemon that resets the connection on which the request bytes,
    counted over every connection, pass ``cut_after`` (once): a network that fails
    mid-upload.  (Over every connection: the daemon closes a connection after a large
    request body, so a client sending chunks may use one connection per chunk.)"""

    def __init__(self, port: int, cut_after: int) -> None:
        self.port, self.cut_after, self.cuts = port, cut_after, 0
        self.sent = 0  # request bytes relayed, over every connection
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> CuttingRelay:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/files/"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            try:
                while chunk := await src.read(65536):
                    if up and not self.cuts and self.sent + len(chunk) > self.cut_after:
                        self.cuts += 1
                        dst.write(chunk[: self.cut_after - self.sent])
                        await dst.drain()
                        raise ConnectionResetError("cut")
                    if up:
                        self.sent += len(chunk)
                    dst.write(chunk)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                for w in (writer, up_w):
                    w.close()

        await asyncio.gather(pipe(reader, up_w, True), pipe(up_r, writer, False))


@pytest.mark.parametrize("protocol", ["ietf-draft-05", "ietf-draft-03"])
@pytest.mark.parametrize("chunk", ["inf", str(2 * MiB + 3)])
async def test_tus_js_client_ietf_cut_and_resumed(
    start_proxy, s3, prefix, tmp_path, protocol, chunk, node_client
) -> None:
    proxy = await start_proxy(**tus_sections(prefix))
    size = 11 * MiB + 12_345
    path = data_path(tmp_path, size, seed=size)
    name = f"js {protocol}.bin"
    async with CuttingRelay(proxy.port, cut_after=7 * MiB) as relay:
        proc = await asyncio.create_subprocess_exec(
            "node", str(node_client), relay.url, str(path), chunk, name, protocol,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        assert relay.cuts == 1  # the upload really was cut
    result = json.loads(out)
    assert result["retries"] >= 1
    key = tus_key(prefix, result["url"], name)
    body, meta = await get_object(s3, key)
    data = path.read_bytes()
    assert body == data and meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert await only_objects(s3, prefix) == [key]
    assert sid(result["url"])  # the URL is an upload URL of ours


# -- a plain PUT that carries Upload-Complete becomes resumable ------------------------


async def test_put_with_upload_complete_is_resumable_at_its_key(start_proxy, s3, prefix) -> None:
    proxy = await start_proxy(**tus_sections(prefix, send_104=True))
    data = os.urandom(7 * MiB + 99)
    key = "phone/IMG_0001.HEIC"
    head = build("PUT", f"/uploads/{key}", {**V8, "Upload-Complete": "?1",
                                            "Content-Length": str(len(data))})  # fmt: skip
    path = await cut(proxy, head, data[: 6 * MiB], interim=True)
    assert path is not None and path.startswith("/files/")
    await offset_becomes(proxy.port, path, 6 * MiB, V8)
    # Its multipart upload (at the client's key, which holds no upload id) is claimed,
    # so the stale-multipart sweeper leaves it alone.
    [mpu] = await s3.list_multipart(prefix)
    assert mpu.key == prefix + key
    assert await store_for(s3, prefix).owns_multipart(mpu.key, mpu.upload_id)
    done = await append(proxy.port, path, 6 * MiB, data[6 * MiB :], complete=True)
    assert done.status == 200 and done.headers["repr-digest"] == repr_digest(data)
    assert done.json()["key"] == prefix + key
    body, meta = await get_object(s3, prefix + key)
    assert body == data and meta["sha256"] == hashlib.sha256(data).hexdigest()
    # No state, no claim: the object, and the record its URL answers from until it expires.
    record = f"{prefix}.tus/finished/{sid(path)}-"
    [left_record, left_object] = await only_objects(s3, prefix)
    assert left_record.startswith(record) and left_object == prefix + key


@pytest.mark.parametrize("size", [0, 6 * MiB + 7])  # complete on arrival / a multipart upload
async def test_a_completed_resumable_put_answers_its_owner_until_it_expires(
    start_proxy, s3, prefix, size
) -> None:
    """A resumable PUT's object is at the client's key, not in a tus folder, yet its URL
    tells its owner (who may have lost the final answer) that it is complete, as a
    completed upload's URL does, until the upload's time runs out (expire_after_s after
    its completion); anyone else gets the 404 of an unknown id.  The sweep then removes
    what the URL answered from."""
    auth = {"mode": "required", "tokens": [hash_token(TOKEN_A), hash_token(TOKEN_B)]}
    proxy = await start_proxy(auth=auth, **tus_sections(prefix, expire_after_s=60))
    svc = proxy.app[TUS_ROUTES].service
    now_s = [time.time()]
    svc.store.clock = lambda: now_s[0]
    data = os.urandom(size)
    key = "phone/IMG_0002.HEIC"
    r = await exchange(
        proxy.port, "PUT", f"/uploads/{key}", {**V8, **A, "Upload-Complete": "?1"}, data
    )
    assert r.status == 201 and r.json()["key"] == prefix + key
    path = r.headers["location"]

    # The client lost that answer and asks: complete, with the whole offset and digest.
    h = await exchange(proxy.port, "HEAD", path, {**V8, **A})
    assert (h.status, h.headers["upload-complete"]) == (204, "?1")
    assert h.headers["upload-offset"] == h.headers["upload-length"] == str(size)
    assert h.headers["repr-digest"] == repr_digest(data)
    t = await exchange(proxy.port, "HEAD", path, {"Tus-Resumable": "1.0.0", **A})
    assert (t.status, t.headers["upload-offset"]) == (200, str(size))
    assert t.headers["upload-sha256"] == hashlib.sha256(data).hexdigest()
    # Its completing append again is answered as the completion was; bytes are refused.
    again = await append(proxy.port, path, size, b"", complete=True, **A)
    assert again.status == 200 and again.headers["repr-digest"] == repr_digest(data)
    more = await append(proxy.port, path, size, b"x", complete=True, **A)
    assert more.status == 400 and more.json()["type"].endswith("#completed-upload")

    # Anyone else: exactly the 404 of an id that does not exist.
    for method, extra, body in (("HEAD", {}, b""), ("PATCH", PARTIAL, b"")):
        headers = {**V8, **B, **extra, "Upload-Offset": str(size), "Upload-Complete": "?1"}
        foreign = await exchange(proxy.port, method, path, headers, body)
        unknown = await exchange(proxy.port, method, "/files/" + "0" * 32, headers, body)
        assert foreign.status == 404, (method, foreign)
        assert foreign.comparable() == unknown.comparable(), method

    # Past its time: unknown, before the sweep and after it, and nothing left but the object.
    now_s[0] += 61
    assert (await exchange(proxy.port, "HEAD", path, {**V8, **A})).status == 404
    await sweep_once(svc)
    assert (await exchange(proxy.port, "HEAD", path, {**V8, **A})).status == 404
    assert await only_objects(s3, prefix) == [prefix + key]


async def test_put_with_apple_headers_in_one_go(start_proxy, s3, prefix) -> None:
    """Interop 3's headers on a PUT that completes: 201, the object at the key."""
    proxy = await start_proxy(**tus_sections(prefix))
    data = os.urandom(100_000)
    v3 = {"Upload-Draft-Interop-Version": "3", "Upload-Incomplete": "?0"}
    r = await exchange(proxy.port, "PUT", "/uploads/a/b.bin", v3, data)
    assert r.status == 201 and r.headers["upload-incomplete"] == "?0"
    assert r.headers["location"].startswith("/files/")
    assert r.json()["sha256"] == hashlib.sha256(data).hexdigest()
    assert (await get_object(s3, prefix + "a/b.bin"))[0] == data
    # Create-only, as any PUT: the key is taken now.
    again = await exchange(proxy.port, "PUT", "/uploads/a/b.bin", v3, data)
    assert (again.status, again.code) == (409, "ERR_KEY_EXISTS")
    # A PUT without the draft's headers is the plain PUT it always was.
    plain = await exchange(proxy.port, "PUT", "/uploads/a/c.bin", {}, data)
    assert plain.status == 201 and "location" not in plain.headers
    cancelled = await exchange(proxy.port, "DELETE", r.headers["location"], V8)
    assert cancelled.status == 404  # complete: nothing to cancel


async def test_one_upload_two_protocols_and_one_quota(start_proxy, s3, prefix) -> None:
    """An upload created by the draft is a tus upload: tus continues it (and the other way
    round), and both count against the same cap on unfinished uploads."""
    proxy = await start_proxy(**tus_sections(prefix, max_unfinished_per_principal=2))
    tus = {"Tus-Resumable": "1.0.0"}
    data = os.urandom(200_000)
    ietf_made = await create(proxy.port, {**V8, "Upload-Complete": "?0",
                                          "Upload-Length": str(len(data))})  # fmt: skip
    tus_made = await exchange(proxy.port, "POST", "/files/",
                              {**tus, "Upload-Length": str(len(data))})  # fmt: skip
    assert tus_made.status == 201
    # The cap (2) is reached by one of each: a third creation, by either, is refused.
    third = await exchange(proxy.port, "POST", "/files/", {**V8, "Upload-Complete": "?0"})
    assert (third.status, third.code) == (429, "ERR_TOO_MANY_UNFINISHED_UPLOADS")
    octet = {**tus, "Content-Type": "application/offset+octet-stream"}
    for path, first, second in (
        (ietf_made.headers["location"], "ietf", "tus"),
        (tus_made.headers["location"], "tus", "ietf"),
    ):
        for protocol, start, end in ((first, 0, 50_000), (second, 50_000, len(data))):
            if protocol == "tus":
                headers = {**octet, "Upload-Offset": str(start)}
                r = await exchange(proxy.port, "PATCH", path, headers, data[start:end])
                assert r.status == 204
            else:
                r = await append(proxy.port, path, start, data[start:end], end == len(data))
                assert r.status in (200, 204)
        assert (await get_object(s3, tus_key(prefix, path)))[0] == data


async def test_cors_lets_a_browser_speak_the_draft(start_proxy, prefix) -> None:
    """tus-js-client's IETF modes in a browser: the preflight allows the draft's request
    headers, and its answers expose the draft's response headers."""
    origin = "https://app.example.com"
    proxy = await start_proxy(**tus_sections(prefix, cors_allow_origins=[origin]))
    asked = "upload-draft-interop-version,upload-complete,upload-offset,repr-digest"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "PATCH",
                 "Access-Control-Request-Headers": asked}  # fmt: skip
    p = await exchange(proxy.port, "OPTIONS", f"/files/{'a' * 32}", preflight)
    allowed = p.headers["access-control-allow-headers"].lower()
    assert all(h in allowed for h in asked.split(","))
    r = await create(proxy.port, {**V8, "Origin": origin, "Upload-Complete": "?0"})
    exposed = r.headers["access-control-expose-headers"].lower()
    for h in ("location", "upload-offset", "upload-complete", "upload-limit", "repr-digest"):
        assert h in exposed


async def test_hooks_see_ietf_uploads_and_place_a_resumable_puts_key(
    start_proxy, s3, prefix, tmp_path
) -> None:
    """The same hooks as tus: pre-create may rename a resumable PUT's key (relative to
    key_prefix, as for any PUT), post-finish reports the object."""

    def reply(event: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        if event["Type"] == "pre-create":
            return 200, {"ChangeFileInfo": {"Storage": {"Key": "renamed/by-hook.bin"}}}
        return 200, None

    receiver = Receiver(SECRET, reply=reply)
    await receiver.start()
    try:
        (tmp_path / "secret").write_bytes(SECRET)
        hooks = {"http_url": receiver.url, "http_secret_file": str(tmp_path / "secret"),
                 "events": ["pre-create", "post-finish"]}  # fmt: skip
        proxy = await start_proxy(hooks=hooks, **tus_sections(prefix))
        data = os.urandom(10_000)
        r = await exchange(proxy.port, "PUT", "/uploads/rename-me.bin",
                           {**V8, "Upload-Complete": "?1"}, data)  # fmt: skip
        assert r.status == 201, r.body
        assert r.json()["key"] == prefix + "renamed/by-hook.bin"
        assert (await get_object(s3, prefix + "renamed/by-hook.bin"))[0] == data
        assert await s3.head(prefix + "rename-me.bin") is None
        await receiver.wait_for(lambda: bool(receiver.of_type("post-finish")))
        [finish] = receiver.of_type("post-finish")
        assert finish["Event"]["Upload"]["Storage"]["Key"] == prefix + "renamed/by-hook.bin"
        assert finish["Event"]["Proxy"]["SHA256"] == hashlib.sha256(data).hexdigest()
    finally:
        await receiver.stop()


async def test_post_uploads_with_upload_complete_is_resumable(start_proxy, s3, prefix) -> None:
    """POST /uploads (not a form) with the draft's headers: resumable, at the key a POST
    generates (random id + the file's extension)."""
    proxy = await start_proxy(**tus_sections(prefix, send_104=True))
    data = os.urandom(3 * MiB + 5)
    head = build("POST", "/uploads", {**V8, "Upload-Complete": "?1",
                                      "Content-Disposition": 'attachment; filename="v.mp4"',
                                      "Content-Length": str(len(data))})  # fmt: skip
    path = await cut(proxy, head, data[:MiB], interim=True)
    assert path is not None and path.startswith("/files/")
    await offset_becomes(proxy.port, path, MiB, V8)
    done = await append(proxy.port, path, MiB, data[MiB:], complete=True)
    assert done.status == 200
    key = done.json()["key"]
    assert key.startswith(prefix) and key.endswith(".mp4") and "/tus/" not in key
    assert (await get_object(s3, key))[0] == data
    # A form stays a plain form upload.
    form = aiohttp.FormData()
    form.add_field("file", b"abc", filename="a.txt")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{proxy.url}/uploads", data=form, headers=V8) as r:
            assert r.status == 201 and "Location" not in r.headers
