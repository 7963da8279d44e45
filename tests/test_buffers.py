"""The shared part-buffer pool: budget, FIFO waiting, timeouts, reuse."""

from __future__ import annotations

import asyncio

import pytest

from proxy.buffers import BufferPool, PoolTimeout


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


async def test_timeout_raises_and_leaves_no_reservation() -> None:
    pool = BufferPool(budget_bytes=100, part_size_bytes=100)
    buf = await pool.acquire()
    with pytest.raises(PoolTimeout):
        await pool.acquire(timeout_s=0.05)
    assert pool.waiting == 0
    pool.release(buf)
    assert pool.in_use_bytes == 0
    assert len(await pool.acquire(timeout_s=0.05)) == 100


async def test_cancelled_waiter_does_not_leak() -> None:
    pool = BufferPool(budget_bytes=100, part_size_bytes=100)
    buf = await pool.acquire()
    t = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.01)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    pool.release(buf)
    assert pool.in_use_bytes == 0 and pool.waiting == 0


async def test_small_buffers_share_the_budget() -> None:
    pool = BufferPool(budget_bytes=100, part_size_bytes=100)
    a = await pool.acquire(40)
    b = await pool.acquire(60)
    assert pool.try_acquire(1) is None
    pool.release(a)
    assert pool.try_acquire(40) is not None
    pool.release(b)


async def test_full_buffers_are_reused_within_budget() -> None:
    pool = BufferPool(budget_bytes=200, part_size_bytes=100, keep_idle=1)
    a = await pool.acquire()
    pool.release(a)
    assert pool.idle_bytes == 100
    assert await pool.acquire() is a
    with pytest.raises(ValueError):
        await pool.acquire(101)
