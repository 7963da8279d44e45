"""The shared part-buffer pool: budget, FIFO waiting, timeouts, reuse, per-client caps, parts
leased in two steps."""

from __future__ import annotations

import asyncio

import pytest

from proxy.engine.buffers import BufferPool, Buffers, PartBuffer, PoolTimeout, head_bytes_for


async def test_budget_is_never_exceeded_and_waiters_are_fifo() -> None:
    pool = BufferPool(budget_bytes=3 * 100, part_size_bytes=100)
    held = [await pool.acquire() for _ in range(3)]
    assert pool.in_use_bytes == 300
    order: list[int] = []

    async def waiter(i: int) -> None:
        buf = await pool.acquire()
        order.append(i)
        assert pool.in_use_bytes <= pool.budget_bytes
        pool.release(buf)

    tasks = [asyncio.create_task(waiter(i)) for i in range(5)]
    await asyncio.sleep(0.01)
    assert pool.waiting == 5 and order == []
    for b in held:
        pool.release(b)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert pool.in_use_bytes == 0 and pool.peak_in_use_bytes == 300


def room_for_one(capped_client: bool) -> tuple[BufferPool, Buffers]:
    """Room for one 100-byte buffer: in the pool, or in a client's cap (the pool has more)."""
    if capped_client:
        pool = BufferPool(budget_bytes=400, part_size_bytes=100, client_cap_bytes=100)
        return pool, pool.client("a")
    pool = BufferPool(budget_bytes=100, part_size_bytes=100)
    return pool, pool


@pytest.mark.parametrize("capped_client", [False, True])
async def test_timeout_raises_and_leaves_no_reservation(capped_client: bool) -> None:
    pool, source = room_for_one(capped_client)
    buf = await source.acquire()
    with pytest.raises(PoolTimeout):
        await source.acquire(timeout_s=0.05)
    assert pool.waiting == 0
    source.release(buf)
    assert pool.in_use_bytes == 0 and not pool._clients  # idle clients are forgotten
    assert len(await source.acquire(timeout_s=0.05)) == 100


@pytest.mark.parametrize("capped_client", [False, True])
async def test_cancelled_waiter_does_not_leak(capped_client: bool) -> None:
    pool, source = room_for_one(capped_client)
    buf = await source.acquire()
    t = asyncio.create_task(source.acquire())
    await asyncio.sleep(0.01)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    source.release(buf)
    assert pool.in_use_bytes == 0 and pool.waiting == 0 and not pool._clients


async def test_small_buffers_share_the_budget() -> None:
    pool = BufferPool(budget_bytes=100, part_size_bytes=100)
    a = await pool.acquire(40)
    b = await pool.acquire(60)
    with pytest.raises(PoolTimeout):  # timeout 0: granted only if it needs no wait
        await pool.acquire(1, timeout_s=0)
    assert pool.waiting == 0
    pool.release(a)
    c = await pool.acquire(40, timeout_s=0)
    assert pool.in_use_bytes == 100
    pool.release(b)
    pool.release(c)


async def test_full_buffers_are_reused_within_budget() -> None:
    pool = BufferPool(budget_bytes=200, part_size_bytes=100, keep_idle=1)
    a = await pool.acquire()
    pool.release(a)
    assert pool.idle_bytes == 100
    assert await pool.acquire() is a
    with pytest.raises(ValueError):
        await pool.acquire(101)


MiB = 1024 * 1024


async def test_a_client_at_its_cap_waits_alone() -> None:
    """A client at its cap queues behind its own requests; others are served at once."""
    pool = BufferPool(budget_bytes=400, part_size_bytes=100, client_cap_bytes=200)
    a = pool.client("a")
    held = [await a.acquire(), await a.acquire()]
    blocked = asyncio.create_task(a.acquire())
    await asyncio.sleep(0.01)
    assert not blocked.done() and pool.waiting == 1 and pool.client_bytes("a") == 200
    # Not behind a's waiter: b gets the pool's two free buffers at once.
    b = pool.client("b")
    got = [await asyncio.wait_for(b.acquire(), 1) for _ in range(2)]
    assert pool.in_use_bytes == 400 and not blocked.done()
    a.release(held.pop())  # room in a's cap, and in the pool
    a_buf = await asyncio.wait_for(blocked, 1)
    for buf in (a_buf, *held):
        a.release(buf)
    for buf in got:
        b.release(buf)
    assert pool.in_use_bytes == 0 and pool.client_bytes("a") == 0
    assert not pool._clients, "idle clients are forgotten"


def test_head_size_keeps_two_step_leases_deadlock_free() -> None:
    # Shipped defaults: 256 MiB, 8 MiB parts, 64 uploads, 64 MiB and 8 uploads per client.
    assert head_bytes_for(256 * MiB, 8 * MiB, 64, 64 * MiB, 8) == MiB
    for budget, part, uploads, cap, per in [
        (64 * MiB, 5 * MiB, 64, 16 * MiB, 8),  # the test config: heads under 1 MiB
        (20 * MiB, 5 * MiB, 64, 15 * MiB, 8),
        (256 * MiB, 8 * MiB, 64, 9 * MiB, 8),  # a tight per-client cap
    ]:
        head = head_bytes_for(budget, part, uploads, cap, per)
        assert 64 * 1024 <= head < MiB and head % 4096 == 0
        assert uploads * head + part - head <= budget
        assert per * head + part - head <= cap
    # No room for heads at all: parts are leased whole, as before.
    assert head_bytes_for(8 * MiB, 8 * MiB, 64) == 8 * MiB


async def test_part_leases_a_head_then_the_rest() -> None:
    pool = BufferPool(budget_bytes=300, part_size_bytes=100, head_bytes=30)
    part = PartBuffer(pool, 100)
    assert part.room == 0 and pool.in_use_bytes == 0  # nothing before a byte is in hand
    await part.lease()
    assert part.room == 30 and pool.in_use_bytes == 30
    assert part.write(memoryview(b"a" * 50)) == 30
    await part.lease()
    assert pool.in_use_bytes == 100
    assert part.write(memoryview(b"b" * 80)) == 70 and part.full
    assert b"".join(part.views()) == b"a" * 30 + b"b" * 70
    assert b"".join(part.views(25)) == b"a" * 5 + b"b" * 70
    part.release()
    part.release()  # idempotent
    assert pool.in_use_bytes == 0
    small = PartBuffer(pool, 10)  # a part smaller than a head takes only what it needs
    await small.lease()
    assert pool.in_use_bytes == 10
    small.release()


async def test_room_kept_in_front_is_leased_with_the_first_byte() -> None:
    """tus: pending bytes go in front; their memory comes with the first new byte."""
    pool = BufferPool(budget_bytes=300, part_size_bytes=100, head_bytes=30)
    part = PartBuffer(pool, 100, start=40)
    assert pool.in_use_bytes == 0
    await part.lease()
    assert pool.in_use_bytes == 100  # the head and the rest: byte 40 lies in the rest
    part.write(memoryview(b"n" * 60))
    part.write_at(0, b"p" * 40)  # across the head and the rest
    assert b"".join(part.views()) == b"p" * 40 + b"n" * 60
    part.release()
    empty = PartBuffer(pool, 40, start=40)
    await empty.cover()
    assert pool.in_use_bytes == 40
    empty.release()


async def test_every_upload_holding_a_head_still_completes() -> None:
    """The worst case head_bytes_for is sized for: every upload holds a head and waits
    for the rest of its part; one of them must get it, then the next..."""
    part, uploads = 5 * MiB, 8
    budget = 10 * MiB
    pool = BufferPool(budget, part, head_bytes=head_bytes_for(budget, part, uploads))
    all_heads = asyncio.Barrier(uploads)

    async def upload() -> None:
        p = PartBuffer(pool, part)
        await p.lease()
        p.write(memoryview(bytes(p.room)))
        await all_heads.wait()
        await p.lease()
        p.write(memoryview(bytes(p.room)))
        assert p.full
        p.release()

    await asyncio.wait_for(asyncio.gather(*(upload() for _ in range(uploads))), 10)
    assert pool.in_use_bytes == 0


async def test_rests_never_take_the_heads_reserve() -> None:
    """Parts of 4 units leased as a 1-unit head and a 3-unit rest, a budget of 12, a
    reserve of 4 heads: slow uploads that hold a head and a rest each stop at two rests
    (6 units; 8 would take the reserve), and a new upload's head is granted at once."""
    unit = 4096
    pool = BufferPool(12 * unit, 4 * unit, head_bytes=unit, head_reserve_bytes=4 * unit)
    held = []
    for _ in range(2):
        part = PartBuffer(pool, 4 * unit)
        await part.lease()
        part.filled = unit  # the head is full: the next lease is the rest
        await part.lease()
        held.append(part)
    third = PartBuffer(pool, 4 * unit)
    await third.lease()
    third.filled = unit
    with pytest.raises(PoolTimeout):
        await third.lease(timeout_s=0.05)  # a third rest would eat into the reserve
    head = await pool.acquire(unit, timeout_s=0.05)  # admission still finds room
    assert pool.in_use_bytes == 2 * 4 * unit + 2 * unit
    pool.release(head)
    held[0].release()
    await third.lease(timeout_s=1)  # a rest came back: the waiting rest gets it
    for part in (held[1], third):
        part.release()
    assert pool.in_use_bytes == 0
