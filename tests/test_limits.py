"""Concurrency limits, trusted proxies, allowlists, slow clients and header size: real proxy."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from proxy.engine.limits import (
    BodyPace,
    ClientInfo,
    ContentPolicy,
    UploadSlots,
    client_group,
    client_info,
)
from proxy.errors import ClientLimit, Evicted, NotAllowed, TooManyUploads
from tests.conftest import MiB, StartProxy, assert_nothing_left
from tests.wrapped import Multiparts

LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))


@pytest.mark.parametrize(
    ("remote", "xff", "proto", "want"),
    [
        ("203.0.113.9", "1.2.3.4", "https", ClientInfo("203.0.113.9", "http")),  # untrusted peer
        ("127.0.0.1", "1.2.3.4", "https", ClientInfo("1.2.3.4", "https")),
        ("127.0.0.1", "6.6.6.6, 1.2.3.4, 10.1.1.1", None, ClientInfo("1.2.3.4", "http")),
        ("127.0.0.1", "garbage, 10.1.1.1", "gopher", ClientInfo("10.1.1.1", "http")),
        ("127.0.0.1", None, None, ClientInfo("127.0.0.1", "http")),
        ("127.0.0.1", "[2001:db8::1]:443", None, ClientInfo("2001:db8::1", "http")),
    ],
)
def test_client_info(remote: str, xff: str | None, proto: str | None, want: ClientInfo) -> None:
    assert client_info(remote, xff, proto, "http", LOOPBACK) == want


async def test_slots_release_and_forget_clients() -> None:
    slots = UploadSlots(total=2, per_client=1)
    with slots.hold("a"):
        with pytest.raises(Exception, match="per client"):
            slots.check("a")
        with slots.hold("b"), pytest.raises(Exception, match="retry later"):
            slots.check("c")
    assert slots.in_use == 0 and not slots._by_client
    assert await slots.drain(timeout_s=0.1, cancel_grace_s=1) == 0  # idle: nothing to cancel
    with pytest.raises(Exception, match="shutting down"):
        slots.check("a")


async def test_once_every_slot_is_taken_the_biggest_holder_gives_its_newest() -> None:
    slots = UploadSlots(total=4, per_client=4)
    release = asyncio.Event()
    started: list[str] = []

    async def upload(client: str) -> str:
        with slots.hold(client):
            started.append(client)
            await release.wait()
        return client

    a = [asyncio.create_task(upload("192.0.2.1")) for _ in range(3)]
    b = asyncio.create_task(upload("192.0.2.2"))
    await asyncio.sleep(0.01)
    assert slots.in_use == 4
    c = asyncio.create_task(upload("192.0.2.3"))  # holds none, a holds 3: a's newest goes
    with pytest.raises(Evicted):
        await a[2]
    assert slots.in_use == 4 and "192.0.2.3" in started
    d = asyncio.create_task(upload("192.0.2.4"))  # a holds 2, d none: a's newest again
    with pytest.raises(Evicted):
        await a[1]
    await asyncio.sleep(0.01)
    # Everyone holds one: nobody holds two more than a newcomer, so it is a 503.
    with pytest.raises(TooManyUploads):
        slots.check("192.0.2.5")
    release.set()
    assert await asyncio.gather(a[0], b, c, d) == [f"192.0.2.{i}" for i in (1, 2, 3, 4)]
    assert slots.in_use == 0


async def test_drain_cancels_what_outlives_the_timeout() -> None:
    slots = UploadSlots(total=4, per_client=4)
    unwound = asyncio.Event()

    async def quick() -> None:
        with slots.hold("a"):
            await asyncio.sleep(0.05)

    async def stuck() -> None:
        with slots.hold("b"):
            try:
                await asyncio.sleep(60)
            finally:
                unwound.set()

    tasks = [asyncio.create_task(quick()), asyncio.create_task(stuck())]
    await asyncio.sleep(0.01)
    assert await slots.drain(timeout_s=0.3, cancel_grace_s=1) == 1
    assert unwound.is_set() and tasks[0].done() and not tasks[0].cancelled()
    assert tasks[1].cancelled() and slots.in_use == 0


def test_content_policy() -> None:
    policy = ContentPolicy(("image/*", "application/pdf"), (".jpg", ".pdf"))
    policy.check("image/jpeg; q=1", "dir/Photo.JPG")
    policy.check("application/pdf", "x.pdf")
    for ct, name in (("text/plain", "a.jpg"), ("image/png", "a.png"), (None, "a.jpg")):
        with pytest.raises(NotAllowed):
            policy.check(ct, name)


class Trickle:
    """A request body that sends ``first`` bytes, then waits for ``go`` before the rest."""

    def __init__(self, first: int, rest: int = 0) -> None:
        self.first, self.rest = first, rest
        self.go = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"a" * self.first
        await self.go.wait()
        if self.rest:
            yield b"b" * self.rest


async def running(p: Any, n: int) -> None:
    """Wait until the proxy counts ``n`` running uploads."""
    async with asyncio.timeout(5):
        while p.uploads.slots.in_use < n:
            await asyncio.sleep(0.01)


async def upload(
    url: str, data: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.put(url, data=data, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def test_per_client_and_total_limits(start_proxy: StartProxy, s3: Any, prefix: str) -> None:
    p = await start_proxy(
        limits={"max_concurrent_uploads": 2, "max_uploads_per_client": 1},
        server={"trusted_proxies": ["127.0.0.1"]},
    )
    body = Trickle(1024, 1024)
    first = asyncio.create_task(
        upload(f"{p.url}/uploads/one", body, {"X-Forwarded-For": "198.51.100.1"})
    )
    await running(p, 1)
    status, err = await upload(f"{p.url}/uploads/two", b"x", {"X-Forwarded-For": "198.51.100.1"})
    assert (status, err["code"]) == (429, "ERR_CLIENT_LIMIT")
    body2 = Trickle(1024, 1024)
    second = asyncio.create_task(
        upload(f"{p.url}/uploads/three", body2, {"X-Forwarded-For": "198.51.100.2"})
    )
    await running(p, 2)
    status, err = await upload(f"{p.url}/uploads/four", b"x", {"X-Forwarded-For": "198.51.100.3"})
    assert (status, err["code"]) == (503, "ERR_TOO_MANY_UPLOADS")
    body.go.set()
    body2.go.set()
    assert (await first)[0] == 201 and (await second)[0] == 201
    status, _ = await upload(f"{p.url}/uploads/four", b"x", {"X-Forwarded-For": "198.51.100.3"})
    assert status == 201


async def test_untrusted_forwarded_for_is_ignored(start_proxy: StartProxy) -> None:
    p = await start_proxy(limits={"max_uploads_per_client": 1})  # trusts nobody
    body = Trickle(1024, 1024)
    first = asyncio.create_task(
        upload(f"{p.url}/uploads/one", body, {"X-Forwarded-For": "198.51.100.1"})
    )
    await running(p, 1)
    # A different claimed address does not escape the limit: the peer is what counts.
    status, err = await upload(f"{p.url}/uploads/two", b"x", {"X-Forwarded-For": "198.51.100.9"})
    assert (status, err["code"]) == (429, "ERR_CLIENT_LIMIT")
    body.go.set()
    assert (await first)[0] == 201


async def test_allowlists(start_proxy: StartProxy, s3: Any, prefix: str) -> None:
    p = await start_proxy(
        limits={"allowed_content_types": ["image/*"], "allowed_extensions": ["jpg"]}
    )
    cases = [
        ("a.jpg", "text/plain", "ERR_UNSUPPORTED_MEDIA_TYPE"),
        ("a.exe", "image/jpeg", "ERR_EXTENSION_NOT_ALLOWED"),
    ]
    for key, ct, code in cases:
        status, err = await upload(f"{p.url}/uploads/{key}", b"x", {"Content-Type": ct})
        assert (status, err["code"]) == (415, code)
    form = aiohttp.FormData()
    form.add_field("ok", b"jpeg", filename="ok.jpg", content_type="image/jpeg")
    form.add_field("bad", b"text", filename="bad.txt", content_type="text/plain")
    async with aiohttp.ClientSession() as s, s.post(f"{p.url}/uploads", data=form) as r:
        assert (r.status, (await r.json())["code"]) == (415, "ERR_UNSUPPORTED_MEDIA_TYPE")
    await assert_nothing_left(s3, prefix)  # the form's first file was taken back too
    status, _ = await upload(f"{p.url}/uploads/b.jpg", b"x", {"Content-Type": "image/jpeg"})
    assert status == 201


async def test_slowloris_body_gets_408_and_nothing_is_left(
    start_proxy: StartProxy, s3: Any, prefix: str
) -> None:
    store = Multiparts(s3)
    p = await start_proxy(storage=store, upload={"idle_timeout_s": 0.5})
    # 6 MiB first: a multipart upload is open when the client stalls.
    reader, writer = await asyncio.open_connection(p.host, p.port)
    writer.write(
        f"PUT /uploads/slow.bin HTTP/1.1\r\nHost: x\r\nContent-Length: {8 * MiB}\r\n\r\n".encode()
        + b"z" * (6 * MiB)
    )
    await writer.drain()
    async with asyncio.timeout(10):
        answer = await reader.read(4096)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"ERR_CLIENT_TIMEOUT" in answer
    store.assert_all_aborted()
    await assert_nothing_left(s3, prefix)


async def test_oversized_header_gets_431(start_proxy: StartProxy) -> None:
    p = await start_proxy(server={"max_header_bytes": "2KiB"})
    # aiohttp's parser answers this one itself (plain text): it never reaches the app.
    async with (
        aiohttp.ClientSession() as s,
        s.put(f"{p.url}/uploads/h", data=b"x", headers={"X-Big": "v" * 4096}) as r,
    ):
        assert r.status in (400, 431)  # 400 from aiohttp >= 3.10, 431 before
        assert "2048" in await r.text()
    status, _ = await upload(f"{p.url}/uploads/h", b"x", {"X-Big": "v" * 1024})
    assert status == 201


@pytest.mark.parametrize(
    ("ip", "group"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("::ffff:198.51.100.7", "198.51.100.7"),  # IPv4-mapped: the IPv4 client
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("unknown", "unknown"),
    ],
)
def test_client_group(ip: str, group: str) -> None:
    assert client_group(ip) == group


async def test_slots_count_an_ipv6_64_as_one_client() -> None:
    """One subscriber owns a whole /64: a new source address is not a new client."""
    slots = UploadSlots(total=10, per_client=1)
    with slots.hold("2001:db8:1:2::1"):
        with pytest.raises(ClientLimit):
            slots.check("2001:db8:1:2::2")
        slots.check("2001:db8:1:3::1")  # another /64 is another client
    with slots.hold("198.51.100.7"), pytest.raises(ClientLimit):
        slots.check("::ffff:198.51.100.7")


def test_pace_allows_the_grace_then_needs_the_rate() -> None:
    pace = BodyPace(min_bytes_per_s=100, grace_s=10)
    assert pace.allowance_s() == 10  # nothing is asked during the grace
    pace.record(4, 0)
    assert pace.allowance_s() == 6
    pace.record(6, 0)  # a whole grace without a byte
    assert pace.allowance_s() == 0


def test_pace_is_a_sliding_window() -> None:
    pace = BodyPace(min_bytes_per_s=100, grace_s=10)
    pace.record(2, 600)  # at 2 s
    pace.record(3, 600)  # at 5 s: 1200 bytes, 1000 needed per 10 s
    # The first 600 leave the window at 12 s (12.5: dated at the end of their half-second
    # bucket); the 600 left are too few from then on.
    assert pace.allowance_s() == pytest.approx(7.5)
    pace.record(7.5, 0)
    assert pace.allowance_s() == 0


def test_pace_a_trickle_does_not_keep_a_burst_in_the_window() -> None:
    pace = BodyPace(min_bytes_per_s=100, grace_s=10)
    pace.record(0.1, 10_000)  # a burst, then a byte every 0.2 s
    for _ in range(100):
        if pace.allowance_s() <= 0:
            break
        pace.record(0.2, 1)
    assert pace.allowance_s() == 0 and pace.waited_s < 11
    fast = BodyPace(min_bytes_per_s=100, grace_s=10)
    for _ in range(30):  # 1 s, 150 bytes, for 30 s: always above the minimum
        fast.record(1, 150)
        assert fast.allowance_s() > 0
    assert len(fast._recent) <= 11  # old arrivals are forgotten


def test_pace_off() -> None:
    pace = BodyPace(min_bytes_per_s=0, grace_s=10)
    pace.record(1000, 0)
    assert pace.allowance_s() == float("inf")
