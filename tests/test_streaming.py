"""Back-pressure, cancellation and chunking invariance of the streaming layer."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.engine.buffers import BufferPool
from proxy.engine.pipeline import StreamSettings
from proxy.engine.upload import ObjectUpload, UploadSpec
from proxy.storage.s3 import S3Storage

from conftest import MiB, StartProxy, get_object, until
from fakes import NO_TUS, GatedStorage

PART = 5 * MiB


def settings_(**kw: object) -> StreamSettings:
    base: dict[str, object] = {
        "part_size_bytes": PART,
        "parts_in_flight": 2,
        "admission_timeout_s": 1.0,
    }
    base.update(kw)
    return StreamSettings(**base)  # type: ignore[arg-type]


async def test_http_backpressure_bounds_buffered_bytes_and_stalls_client(
    start_proxy: StartProxy,
) -> None:
    """With S3 stuck, the proxy buffers at most the budget and the client's writes stall."""
    storage = GatedStorage()
    storage.gate.clear()
    budget = 4 * PART
    pool = BufferPool(budget, PART)
    proxy = await start_proxy(
        storage=storage, pool=pool, upload={"memory_budget": "20MiB"}, **NO_TUS
    )
    total = 200 * MiB
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(f"PUT /uploads/bp HTTP/1.1\r\nHost: x\r\nContent-Length: {total}\r\n\r\n".encode())
    block = b"\xab" * (256 * 1024)
    written = 0
    stalled = False
    while written < total:
        writer.write(block)
        written += len(block)
        try:
            await asyncio.wait_for(writer.drain(), 1.0)
        except TimeoutError:
            stalled = True
            break
    assert stalled, "client was never slowed down"
    # Whatever the client got out of its hands sits in kernel socket buffers, aiohttp's
    # bounded read buffer, or our pool: far less than the body.
    assert written < budget + 32 * MiB
    assert pool.peak_in_use_bytes <= budget
    assert storage.max_sending <= 2
    storage.gate.set()
    while written < total:
        writer.write(block)
        written += len(block)
        await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 30)
    assert status.startswith(b"HTTP/1.1 201")
    writer.close()
    assert pool.peak_in_use_bytes <= budget and pool.in_use_bytes == 0
    info = storage.objects[f"{proxy.prefix}bp"]
    assert info.size == total
    assert info.metadata["sha256"] == hashlib.sha256(block * (total // len(block))).hexdigest()


async def test_many_uploads_share_one_budget() -> None:
    storage = GatedStorage()
    storage.gate.clear()
    pool = BufferPool(3 * PART, PART)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * PART

    streamers = [
        ObjectUpload(
            storage,
            pool,
            settings_(admission_timeout_s=30),
            UploadSpec(key=f"k{i}", max_size_bytes=1 << 40),
        )
        for i in range(5)
    ]
    tasks = [asyncio.create_task(s.run(body())) for s in streamers]

    async def queued() -> bool:  # the pool is full and an upload waits for a buffer
        return pool.waiting >= 1

    await until(queued, "an upload to wait for the pool")
    assert pool.in_use_bytes <= 3 * PART
    storage.gate.set()
    results = await asyncio.gather(*tasks)
    assert all(r.size == 4 * PART for r in results)
    assert pool.peak_in_use_bytes <= 3 * PART and pool.in_use_bytes == 0


async def test_admission_timeout_gives_busy() -> None:
    from proxy.errors import Busy

    storage = GatedStorage()
    pool = BufferPool(PART, PART)
    held = await pool.acquire()

    async def body() -> AsyncIterator[bytes]:
        yield b"data"

    s = ObjectUpload(
        storage, pool, settings_(admission_timeout_s=0.1), UploadSpec(key="k", max_size_bytes=100)
    )
    with pytest.raises(Busy) as e:
        await s.run(body())
    assert e.value.status == 503 and "Retry-After" in e.value.headers
    pool.release(held)


@pytest.mark.parametrize("hash_in_thread", [True, False])
@pytest.mark.parametrize("checksum", ["none", "crc32"])
async def test_cancellation_aborts_and_frees_buffers(hash_in_thread: bool, checksum: str) -> None:
    storage = GatedStorage()
    storage.gate.clear()
    pool = BufferPool(8 * PART, PART)
    got_far = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        for i in range(10):
            if i == 3:
                got_far.set()
            yield b"y" * PART

    s = ObjectUpload(
        storage,
        pool,
        settings_(hash_in_thread=hash_in_thread, part_checksum=checksum),
        UploadSpec(key="k", max_size_bytes=1 << 40),
    )
    task = asyncio.create_task(s.run(body()))
    await asyncio.wait_for(got_far.wait(), 5)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert storage.aborted == ["u1"] and storage.parts == {}
    assert pool.in_use_bytes == 0
    assert "k" not in storage.objects


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    size=st.sampled_from([0, 1, 4097, PART - 1, PART, PART + 1, 2 * PART + 333]),
    cuts=st.lists(st.integers(min_value=1, max_value=3 * MiB), min_size=1, max_size=12),
)
async def test_any_chunking_gives_the_same_object(
    start_proxy: StartProxy, s3: S3Storage, size: int, cuts: list[int]
) -> None:
    """Real S3: however the body is cut into chunks, the stored object and sha256 are the same."""
    proxy = await start_proxy(upload={"overwrite": True})
    data = hashlib.shake_256(b"prop").digest(size) if size else b""

    async def chunks() -> AsyncIterator[bytes]:
        off, i = 0, 0
        while off < len(data):
            n = cuts[i % len(cuts)]
            yield data[off : off + n]
            off += n
            i += 1

    async with aiohttp.ClientSession() as s:
        async with s.put(f"{proxy.url}/uploads/prop", data=chunks()) as r:
            assert r.status == 201
            reply = await r.json()
    stored, meta = await get_object(s3, reply["key"])
    assert stored == data
    assert meta["sha256"] == reply["sha256"] == hashlib.sha256(data).hexdigest()
