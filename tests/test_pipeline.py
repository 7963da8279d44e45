"""The streaming engine on its own, against the gated in-memory storage: parts in flight,
memory, ordered hashing with per-part state, front bytes, fencing, failures, one PutObject.

Plain uploads (tests/test_streaming.py) and tus PATCHes (tests/test_tus_*.py) run on it
end to end against real S3; this pins the engine's own contract once."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from proxy.engine.buffers import BufferPool, PartBuffer
from proxy.engine.pipeline import PartPipeline, PartTarget, StreamSettings
from proxy.errors import LeaseLost, StorageError, TooLarge

from fakes import GatedStorage, sha256_of

KiB = 1024
PART = 256 * KiB


class Recorder:
    """A BodyDigest that records the order parts are hashed in; its state is the SHA-256
    of everything so far, and it keeps the bytes that were the body's own."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.own = bytearray()

    def update(self, views: Sequence[memoryview], own: Sequence[memoryview]) -> str:
        for v in views:
            self.sha.update(v)
        for v in own:
            self.own += v
        return self.sha.hexdigest()


def settings(**kw: Any) -> StreamSettings:
    return StreamSettings(
        **{"part_size_bytes": PART, "parts_in_flight": 2, "admission_timeout_s": 5.0, **kw}
    )


def pipeline(storage: Any, pool: BufferPool, digest: Recorder, **kw: Any) -> PartPipeline[str]:
    target = kw.pop("target", PartTarget("k", "application/octet-stream", {}))
    return PartPipeline(
        storage, pool, kw.pop("settings", settings()), target, digest,
        limit_bytes=kw.pop("limit_bytes", 1 << 40), too_large="too large", **kw,
    )  # fmt: skip


async def chunks_of(data: bytes, size: int = 100 * KiB) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.parametrize("checksum", ["none", "crc32"])
@pytest.mark.parametrize("in_thread", [True, False])
async def test_parts_in_order_bounded_in_flight_and_in_memory(
    checksum: str, in_thread: bool
) -> None:
    storage = GatedStorage()
    pool = BufferPool(8 * PART, PART)
    digest = Recorder()
    data = hashlib.shake_256(b"p").digest(5 * PART + 77)
    pipe = pipeline(
        storage, pool, digest, settings=settings(part_checksum=checksum, hash_in_thread=in_thread)
    )
    assert pipe.multipart_id == ""  # nothing is created before the first part is sent
    await pipe.receive(chunks_of(data))
    assert pipe.multipart_id == "u1"
    assert pipe.tail is not None and pipe.tail.filled == 77  # the tail is the caller's
    await pipe.dispatch()
    await pipe.settle()
    pipe.check()
    pipe.close()
    sent = pipe.sent()
    assert [p.number for p in sent] == [1, 2, 3, 4, 5, 6] and pipe.dispatched == 6
    assert storage.max_sending <= 2
    # Hashed in order: each part's state is the SHA-256 of the body up to its end.
    ends = [PART * n for n in range(1, 6)] + [len(data)]
    assert [p.state for p in sent] == [hashlib.sha256(data[:e]).hexdigest() for e in ends]
    stored = storage.parts["u1"]
    assert [stored[n][1] for n in range(1, 7)] == [
        hashlib.sha256(data[s:e]).digest() for s, e in zip([0, *ends], ends, strict=False)
    ]
    assert pool.peak_in_use_bytes <= 3 * PART and pool.in_use_bytes == 0


async def test_front_bytes_lead_the_first_part_and_are_not_the_bodys_own() -> None:
    """tus: bytes of earlier PATCHes fill the room kept at the front of the first part,
    fetched only when it is sent; the digest's ``own`` excludes them."""
    storage = GatedStorage()
    pool = BufferPool(8 * PART, PART)
    digest = Recorder()
    front = b"F" * 1000
    filled: list[int] = []

    async def fill(buf: PartBuffer) -> None:
        filled.append(buf.filled)
        buf.write_at(0, front)

    body = hashlib.shake_256(b"f").digest(PART + 10)
    target = PartTarget("k", "x/y", {}, first_number=4, front_bytes=len(front))
    pipe = pipeline(storage, pool, digest, target=target, fill_front=fill)
    await pipe.receive(chunks_of(body))
    assert filled == [PART]  # fetched once, when the first part was sent
    await pipe.settle()
    sent = pipe.sent()
    assert [p.number for p in sent] == [4] and sent[0].size == PART
    assert storage.parts["u1"][4][1] == hashlib.sha256((front + body)[:PART]).digest()
    assert bytes(digest.own) == body[: PART - len(front)]
    assert pipe.tail is not None and pipe.front == 0  # the tail is all this body's
    pipe.close()
    assert pool.in_use_bytes == 0


async def test_a_failed_part_keeps_the_parts_before_it() -> None:
    class FailThird(GatedStorage):
        async def upload_part(self, key: str, upload_id: str, number: int, *a: Any) -> str:
            if number == 3:
                raise StorageError("injected")
            return await super().upload_part(key, upload_id, number, *a)

    storage = FailThird()
    pool = BufferPool(8 * PART, PART)
    pipe = pipeline(storage, pool, Recorder())
    with pytest.raises(StorageError):
        await pipe.receive(chunks_of(b"z" * (6 * PART)))
        await pipe.dispatch()
        await pipe.settle()
        pipe.check()
    await pipe.settle()
    assert pipe.failed
    assert [p.number for p in pipe.sent()] == [1, 2]
    pipe.close()
    assert pool.in_use_bytes == 0


async def test_a_fence_stops_new_parts() -> None:
    storage = GatedStorage()
    pool = BufferPool(8 * PART, PART)
    fenced = asyncio.Event()

    def fence() -> None:
        if fenced.is_set():
            raise LeaseLost("fenced")

    async def body() -> AsyncIterator[bytes]:
        for i in range(4):
            if i == 2:
                fenced.set()
            yield b"q" * PART

    pipe = pipeline(storage, pool, Recorder(), fence=fence)
    with pytest.raises(LeaseLost):
        await pipe.receive(body())
    await pipe.settle()
    assert [p.number for p in pipe.sent()] == [1]  # part 2 was never started
    pipe.close()
    assert pool.in_use_bytes == 0


async def test_a_small_body_is_one_put_object_and_a_large_one_too_large() -> None:
    storage = GatedStorage()
    pool = BufferPool(8 * PART, PART)
    pipe = pipeline(storage, pool, Recorder())
    await pipe.receive(chunks_of(b"small"))
    sent = await pipe.put_whole(lambda state: {"sha256": state}, if_none_match=True)
    assert pipe.multipart_id == "" and storage.parts == {}
    assert storage.objects["k"].size == 5
    assert storage.objects["k"].metadata["sha256"] == hashlib.sha256(b"small").hexdigest()
    assert sent.size == 5 and sha256_of(b"small").hex() == sent.state
    pipe.close()

    pipe = pipeline(storage, pool, Recorder(), limit_bytes=PART)
    with pytest.raises(TooLarge):
        await pipe.receive(chunks_of(b"x" * (PART + 1)))
    await pipe.cancel()
    pipe.close()
    assert pool.in_use_bytes == 0


async def test_cancel_frees_buffers_of_parts_that_never_ran() -> None:
    storage = GatedStorage()
    storage.gate.clear()
    pool = BufferPool(8 * PART, PART)
    pipe = pipeline(storage, pool, Recorder(), settings=settings(parts_in_flight=4))
    await pipe.receive(chunks_of(b"c" * (4 * PART)))
    await pipe.dispatch()
    await pipe.cancel()  # some tasks are cancelled before their first step
    pipe.close()
    assert pool.in_use_bytes == 0
