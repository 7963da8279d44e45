"""KeyLocks (proxy/storage/keylocks.py): one holder per key, others wait in order, other
keys never wait, and an entry lives only while someone holds or waits on it."""

from __future__ import annotations

import asyncio

import pytest

from proxy.storage.keylocks import KeyLocks

from conftest import until


async def waiting(locks: KeyLocks, key: str, users: int) -> None:
    async def check() -> bool:
        return locks.users(key) == users

    await until(check, f"{users} holding or waiting for {key!r}")


async def test_one_holder_per_key_in_arrival_order() -> None:
    locks, order = KeyLocks(), []
    first_in, go = asyncio.Event(), asyncio.Event()

    async def first() -> None:
        async with locks.hold("k"):
            first_in.set()
            await go.wait()
            order.append("first")

    async def later(name: str) -> None:
        async with locks.hold("k"):
            order.append(name)

    a = asyncio.create_task(first())
    await first_in.wait()
    b, c = asyncio.create_task(later("b")), asyncio.create_task(later("c"))
    await waiting(locks, "k", 3)
    assert order == []
    async with locks.hold("other"):  # another key is not held up
        assert locks.users("other") == 1 and len(locks) == 2
    go.set()
    await asyncio.gather(a, b, c)
    assert order == ["first", "b", "c"]
    assert locks.users("k") == 0 and len(locks) == 0


async def test_a_waiter_cancelled_or_a_holder_failing_leaves_no_entry() -> None:
    locks = KeyLocks()
    held = asyncio.Event()

    async def holder() -> None:
        async with locks.hold("k"):
            held.set()
            await asyncio.Event().wait()

    async def waiter() -> None:
        async with locks.hold("k"):
            pass

    h = asyncio.create_task(holder())
    await held.wait()
    w = asyncio.create_task(waiter())
    await waiting(locks, "k", 2)
    w.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w
    assert locks.users("k") == 1
    h.cancel()
    with pytest.raises(asyncio.CancelledError):
        await h
    assert len(locks) == 0
    with pytest.raises(ValueError):
        async with locks.hold("k"):
            raise ValueError("the store call failed")
    assert len(locks) == 0
