"""S3 failures: transient ones are retried, others fail cleanly; a dead S3 fails in bounded time."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from sec_http import exchange
from tus_helpers import only_objects, sid, tus_sections
from wrapped import Wrapped

from proxy.engine.buffers import BufferPool
from proxy.engine.pipeline import StreamSettings
from proxy.engine.upload import ObjectUpload, UploadSpec
from proxy.errors import ObjectExists, ProxyError, StorageUnavailable
from proxy.storage.base import Body
from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import EmbeddedSeaweed
from tests.fault_helpers import faulty_s3
from tests.faultproxy import error, hold, part_number, reset_before

from conftest import MiB, StartProxy, assert_nothing_left, get_object, s3_for, until

PART = 5 * MiB


async def put(url: str, data: Any) -> tuple[int, dict[str, Any], float]:
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:
        async with s.put(url, data=data) as r:
            return r.status, await r.json(), time.monotonic() - t0


async def test_transient_part_errors_are_retried(
    start_proxy: StartProxy, seaweed: EmbeddedSeaweed, s3: S3Storage
) -> None:
    async with faulty_s3(seaweed, retry_attempts=3, retry_base_delay_s=0.01) as (storage, faults):
        faults.add("UploadPart", error(500, "InternalError"), query=part_number(2))
        faults.add("UploadPart", error(503, "SlowDown"), query=part_number(2))  # the next one
        proxy = await start_proxy(storage=storage)
        data = hashlib.shake_256(b"t").digest(3 * PART + 5)
        status, reply, _ = await put(f"{proxy.url}/uploads/retry", data)
        assert status == 201, reply
        # two failures, then success from the same buffer
        assert len(faults.seen("UploadPart", query=part_number(2))) == 3
        stored, meta = await get_object(s3, reply["key"])
        assert stored == data and meta["sha256"] == hashlib.sha256(data).hexdigest()


async def test_permanent_part_error_aborts(
    start_proxy: StartProxy, seaweed: EmbeddedSeaweed, s3: S3Storage
) -> None:
    async with faulty_s3(seaweed, retry_attempts=3, retry_base_delay_s=0.01) as (storage, faults):
        faults.add("UploadPart", error(403, "AccessDenied"), query=part_number(2))
        proxy = await start_proxy(storage=storage)
        data = hashlib.shake_256(b"p").digest(3 * PART + 5)
        status, reply, _ = await put(f"{proxy.url}/uploads/denied", data)
        assert status == 502 and reply["code"] == "ERR_STORAGE", reply
        assert "injected" not in reply["message"]
        assert len(faults.seen("UploadPart", query=part_number(2))) == 1
        # A multipart upload existed, and is gone: the abort runs before the answer is sent.
        assert len(faults.seen("CreateMultipartUpload")) == 1
        await assert_nothing_left(s3, proxy.prefix)


async def test_persistent_outage_mid_upload_gives_503_and_aborts(
    start_proxy: StartProxy, seaweed: EmbeddedSeaweed, s3: S3Storage
) -> None:
    async with faulty_s3(seaweed, retry_attempts=3, retry_base_delay_s=0.01) as (storage, faults):
        faults.add("UploadPart", reset_before(), query=part_number(3), times=None)  # every retry
        proxy = await start_proxy(storage=storage)

        async def body() -> AsyncIterator[bytes]:
            for _ in range(6):
                yield b"z" * PART

        status, reply, _ = await put(f"{proxy.url}/uploads/outage", body())
        assert status == 503 and reply["code"] == "ERR_STORAGE_UNAVAILABLE", reply
        assert len(faults.seen("CreateMultipartUpload")) == 1
        assert len(faults.seen("UploadPart", query=part_number(3))) >= 3
        await assert_nothing_left(s3, proxy.prefix)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_s3_gives_503_in_bounded_time(start_proxy: StartProxy) -> None:
    storage = await S3Storage(
        bucket="test-uploads",
        endpoint_url=f"http://127.0.0.1:{closed_port()}",
        access_key="k",
        secret_key="s",
        retry_attempts=3,
        retry_base_delay_s=0.05,
        connect_timeout_s=1,
    ).open()
    try:
        proxy = await start_proxy(storage=storage)
        status, reply, seconds = await put(f"{proxy.url}/uploads/x", b"a" * 1000)
        assert status == 503 and reply["code"] == "ERR_STORAGE_UNAVAILABLE"
        assert seconds < 20  # a bound, not a speed: 3 attempts x 1 s connect timeout + backoff
    finally:
        await storage.close()


async def test_silent_s3_gives_503_in_bounded_time(start_proxy: StartProxy) -> None:
    """S3 accepts connections but never answers (a hung server): read timeouts bound the wait."""
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(w)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    storage = await S3Storage(
        bucket="test-uploads",
        endpoint_url=f"http://127.0.0.1:{port}",
        access_key="k",
        secret_key="s",
        retry_attempts=2,
        retry_base_delay_s=0.05,
        read_timeout_s=1,
    ).open()
    try:
        proxy = await start_proxy(storage=storage)
        status, reply, seconds = await put(f"{proxy.url}/uploads/x", b"a" * 1000)
        assert status == 503 and reply["code"] == "ERR_STORAGE_UNAVAILABLE"
        assert seconds < 20
        assert accepted
    finally:
        await storage.close()
        server.close()
        for w in accepted:
            w.close()


SETTINGS = StreamSettings(part_size_bytes=PART, parts_in_flight=2, admission_timeout_s=1.0)


async def chunks_of(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), MiB):
        yield data[i : i + MiB]


class GatedMetadata(Wrapped):
    """Real storage whose first replace_metadata waits for ``go`` (a completed, not yet
    labelled object)."""

    def __init__(self, inner: S3Storage) -> None:
        super().__init__(inner)
        self.go = asyncio.Event()
        self.first_completed = asyncio.Event()

    async def replace_metadata(self, key: str, **kw: Any) -> None:
        self.calls["replace_metadata"] += 1
        if self.calls["replace_metadata"] == 1:
            self.first_completed.set()
            await self.go.wait()
        await self.inner.replace_metadata(key, **kw)


async def test_overwrite_race_keeps_the_winner(s3: S3Storage, prefix: str) -> None:
    """overwrite = true, two multipart uploads to one key: B completes and labels its object
    while A is between completing and labelling.  A fails; B's object stays, with B's sha256."""
    key = f"{prefix}same"
    gate = GatedMetadata(s3)
    pool = BufferPool(64 * MiB, PART)
    a_data, b_data = os.urandom(6 * MiB), os.urandom(7 * MiB)
    spec = UploadSpec(key=key, max_size_bytes=1 << 40, create_only=False)
    a = asyncio.create_task(ObjectUpload(gate, pool, SETTINGS, spec).run(chunks_of(a_data)))  # type: ignore[arg-type]
    await asyncio.wait_for(gate.first_completed.wait(), 10)
    b = await ObjectUpload(gate, pool, SETTINGS, spec).run(chunks_of(b_data))  # type: ignore[arg-type]
    gate.go.set()
    with pytest.raises(ObjectExists):
        await a
    stored, meta = await get_object(s3, key)
    assert stored == b_data and meta["sha256"] == b.sha256 == hashlib.sha256(b_data).hexdigest()
    assert await s3.list_multipart(prefix) == []


async def test_create_only_finishes_of_one_key_queue(
    seaweed: EmbeddedSeaweed, s3: S3Storage, prefix: str
) -> None:
    """overwrite = false, two multipart uploads to one key.  SeaweedFS checks If-None-Match
    before it writes, not with the write, so two overlapping completions can both win
    (both answered 201, one object).  A's CompleteMultipartUpload is held on its way to
    the store (the fault proxy); B's waits inside S3Storage until A's is answered, then
    meets A's object: one success, one ObjectExists, the object A's."""
    key = f"{prefix}create-only"
    async with faulty_s3(seaweed) as (storage, faults):
        held = faults.add("CompleteMultipartUpload", hold(), key=re.escape(key))
        pool = BufferPool(64 * MiB, PART)
        a_data, b_data = os.urandom(6 * MiB), os.urandom(7 * MiB)
        spec = UploadSpec(key=key, max_size_bytes=1 << 40, create_only=True)

        def upload(data: bytes) -> asyncio.Task[Any]:
            up = ObjectUpload(storage, pool, SETTINGS, spec)
            return asyncio.create_task(up.run(chunks_of(data)))

        a = upload(a_data)
        await asyncio.wait_for(held.held.wait(), 30)
        b = upload(b_data)

        async def b_waits() -> bool:
            return storage.creates.users(key) == 2

        await until(b_waits, "B's completion waiting for A's")
        assert len(faults.seen("CompleteMultipartUpload")) == 1  # B's was not sent
        held.release(forward=True)
        assert (await a).sha256 == hashlib.sha256(a_data).hexdigest()
        with pytest.raises(ObjectExists):
            await b
        assert [r.status for r in faults.seen("CompleteMultipartUpload")] == [200, 412]
        assert len(storage.creates) == 0  # no entry outlives its writes
    stored, meta = await get_object(s3, key)
    assert stored == a_data and meta["sha256"] == hashlib.sha256(a_data).hexdigest()
    assert await s3.list_multipart(prefix) == []


# Draft interop 8: a PUT carrying Upload-Complete is a resumable (tus) upload at its key.
RESUMABLE = {"Upload-Draft-Interop-Version": "8", "Upload-Complete": "?1"}


@pytest.mark.parametrize("second", ["resumable", "plain"])
async def test_a_resumable_upload_and_another_racing_for_one_key(
    start_proxy: StartProxy, seaweed: EmbeddedSeaweed, s3: S3Storage, prefix: str, second: str
) -> None:
    """overwrite = false.  A resumable PUT (a tus upload, finished by the tus completion)
    and a second upload to the same key, a resumable or a plain PUT, both finish while the
    first one's CompleteMultipartUpload is held on its way to the store.  One 201, one
    refusal; the object is the winner's bytes with the winner's SHA-256."""
    name = "same.bin"
    key = prefix + name
    async with faulty_s3(seaweed, state_prefix=f"{prefix}.tus/") as (storage, faults):
        held = faults.add("CompleteMultipartUpload", hold(), key=re.escape(key))
        proxy = await start_proxy(storage=storage, **tus_sections(prefix))
        a_data, b_data = os.urandom(6 * MiB + 1), os.urandom(7 * MiB + 3)
        a = asyncio.create_task(exchange(proxy.port, "PUT", f"/uploads/{name}", RESUMABLE, a_data))
        await asyncio.wait_for(held.held.wait(), 30)
        headers = RESUMABLE if second == "resumable" else {}
        b = asyncio.create_task(exchange(proxy.port, "PUT", f"/uploads/{name}", headers, b_data))

        async def b_waits() -> bool:
            return storage.creates.users(key) == 2

        await until(b_waits, "the second completion waiting for the first")
        held.release(forward=True)
        first, later = await a, await b
        assert first.status == 201, first.body
        assert first.json()["sha256"] == hashlib.sha256(a_data).hexdigest()
        refused = (409, "ERR_KEY_EXISTS") if second == "plain" else (410, "ERR_UPLOAD_FAILED")
        assert (later.status, later.code) == refused, later.body
        assert [r.status for r in faults.seen("CompleteMultipartUpload")] == [200, 412]
    stored, meta = await get_object(s3, key)
    assert stored == a_data and meta["sha256"] == hashlib.sha256(a_data).hexdigest()
    # The loser left nothing behind; the winner, the record its upload URL answers from.
    [record, stored_key] = await only_objects(s3, prefix)
    assert stored_key == key
    assert record.startswith(f"{prefix}.tus/finished/{sid(first.headers['location'])}-")


@pytest.mark.parametrize(
    ("op", "size"), [("CompleteMultipartUpload", 6 * MiB), ("PutObject", 1000)]
)
async def test_lost_answer_is_recognised_not_left_behind(
    seaweed: EmbeddedSeaweed, s3: S3Storage, prefix: str, op: str, size: int
) -> None:
    """The store did the work but the answer was lost: the retry fails (no such upload /
    precondition failed), yet the upload succeeds because we recognise our own object."""
    async with faulty_s3(seaweed, retry_attempts=3, retry_base_delay_s=0.01, read_timeout_s=1) as (
        storage,
        faults,
    ):
        faults.add(op, hold(answer=True))  # done by the store, never answered
        data = os.urandom(size)
        spec = UploadSpec(key=f"{prefix}lost", max_size_bytes=1 << 40, create_only=True)
        result = await ObjectUpload(storage, BufferPool(64 * MiB, PART), SETTINGS, spec).run(
            chunks_of(data)
        )
        assert len(faults.seen(op)) == 2
        stored, meta = await get_object(s3, f"{prefix}lost")
        assert stored == data and meta["sha256"] == result.sha256
        assert await s3.list_multipart(prefix) == []


# -- a store that does not keep what it acknowledged -------------------------------------


class KeepsSomethingElse(Wrapped):
    """A store that acknowledges a PutObject but keeps an empty object under the key, with
    the ETag it answered (as SeaweedFS does for a key ending in "/")."""

    async def put_object(self, key: str, body: Body, **kw: Any) -> str:
        self.calls["put_object"] += 1
        return str(await self.inner.put_object(key, b"", **{**kw, "checksum": None}))


async def test_a_put_the_store_did_not_keep_is_not_a_201(
    start_proxy: StartProxy, seaweed: EmbeddedSeaweed, s3: S3Storage
) -> None:
    storage = await s3_for(seaweed).open()
    try:
        lying = KeepsSomethingElse(storage)
        proxy = await start_proxy(storage=lying)
        status, reply, _ = await put(f"{proxy.url}/uploads/small", b"x" * 1000)
        assert lying.calls["put_object"] == 1
        assert status == 502 and reply["code"] == "ERR_STORAGE", reply
        await assert_nothing_left(s3, proxy.prefix)
    finally:
        await storage.close()


# -- the self-copy that adds the sha256 ---------------------------------------------------


class CopyThen(Wrapped):
    """replace_metadata runs ``before`` (if any), then the real copy (if ``copy``), then
    raises ``error``: a copy whose answer was lost, or that failed."""

    def __init__(
        self, inner: S3Storage, error: ProxyError, *, copy: bool = True, before: Any = None
    ) -> None:
        super().__init__(inner)
        self.error, self.copy, self.before = error, copy, before

    async def replace_metadata(self, key: str, **kw: Any) -> None:
        self.calls["replace_metadata"] += 1
        if self.before is not None:
            await self.before(key)
        if self.copy:
            await self.inner.replace_metadata(key, **kw)
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        StorageUnavailable("injected: every attempt timed out"),
        # On a store whose copy gives the object a new ETag (AWS), the retry of a copy
        # whose answer was lost fails its CopySourceIfMatch: "precondition failed".
        ObjectExists("injected: precondition failed"),
    ],
)
async def test_a_lost_copy_answer_is_recovered_by_head(
    s3: S3Storage, prefix: str, error: ProxyError
) -> None:
    """The copy was carried out; only its answer was lost.  The object has our size and
    sha256, so the upload succeeded: it used to be deleted (503) or reported as replaced
    by a concurrent upload (409)."""
    key = f"{prefix}lost-copy"
    data = os.urandom(6 * MiB)
    spec = UploadSpec(key=key, max_size_bytes=1 << 40, create_only=True)
    lossy = CopyThen(s3, error)
    pool = BufferPool(64 * MiB, PART)
    result = await ObjectUpload(lossy, pool, SETTINGS, spec).run(chunks_of(data))  # type: ignore[arg-type]
    assert lossy.calls["replace_metadata"] == 1
    stored, meta = await get_object(s3, key)
    assert stored == data and meta["sha256"] == result.sha256 == hashlib.sha256(data).hexdigest()
    assert await s3.list_multipart(prefix) == []


async def test_a_failed_copy_never_deletes_a_concurrent_uploads_object(
    s3: S3Storage, prefix: str
) -> None:
    """overwrite = true: between our completion and our failed copy another upload put its
    object at the key.  Taking ours back must not delete theirs (If-Match on our ETag)."""
    key = f"{prefix}contended"
    theirs = os.urandom(1000)

    async def concurrent_upload(k: str) -> None:
        meta = {"sha256": hashlib.sha256(theirs).hexdigest()}
        await s3.put_object(
            k, theirs, metadata=meta, content_type="x/y", checksum=None, if_none_match=False
        )

    failing = CopyThen(
        s3, StorageUnavailable("injected: copy failed"), copy=False, before=concurrent_upload
    )
    spec = UploadSpec(key=key, max_size_bytes=1 << 40, create_only=False)
    pool = BufferPool(64 * MiB, PART)
    with pytest.raises(StorageUnavailable):
        await ObjectUpload(failing, pool, SETTINGS, spec).run(chunks_of(os.urandom(6 * MiB)))  # type: ignore[arg-type]
    stored, meta = await get_object(s3, key)
    assert stored == theirs and meta["sha256"] == hashlib.sha256(theirs).hexdigest()
    assert await s3.list_multipart(prefix) == []


async def test_a_failed_copy_takes_our_own_object_back(s3: S3Storage, prefix: str) -> None:
    """Without a concurrent upload, the object we completed (no sha256 yet) is deleted."""
    key = f"{prefix}unlabelled"
    failing = CopyThen(s3, StorageUnavailable("injected: copy failed"), copy=False)
    spec = UploadSpec(key=key, max_size_bytes=1 << 40, create_only=True)
    pool = BufferPool(64 * MiB, PART)
    with pytest.raises(StorageUnavailable):
        await ObjectUpload(failing, pool, SETTINGS, spec).run(chunks_of(os.urandom(6 * MiB)))  # type: ignore[arg-type]
    assert failing.calls["replace_metadata"] == 1
    await assert_nothing_left(s3, prefix)
