"""/healthz, /readyz, /status and memory-pressure admission, against the real S3 server."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy import __version__
from proxy.obs.memory import MemoryReading
from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import Credentials, EmbeddedSeaweed

from conftest import BUCKET, StartProxy, assert_nothing_left, s3_for
from obs_helpers import MiB, RawRequest, eventually, put_head, scrape, series, value


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json()


async def test_healthz_and_status_basics(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(upload={"memory_budget": "40MiB"})
    assert await get_json(f"{proxy.url}/healthz") == (200, {"status": "ok", "version": __version__})
    code, status = await get_json(f"{proxy.url}/status")
    assert code == 200
    assert status["version"] == __version__ and status["uptime_s"] >= 0
    assert status["in_flight"] == {"uploads": 0, "received_bytes": 0, "stored_bytes": 0}
    assert "uploads" not in status  # per-upload details are for operator tokens
    assert status["buffers"]["budget_bytes"] == 40 * MiB
    assert status["buffers"]["in_use_bytes"] == 0
    memory = status["memory"]
    assert memory["level"] == "normal"
    assert 0 < memory["rss_bytes"] <= memory["peak_rss_bytes"]
    assert memory["limit_bytes"] <= memory["system_total_bytes"]
    # Each figure says what it counts: RSS is the daemon's alone, the cgroup holds the
    # embedded store too (which MemoryMax= must cover).
    figures = memory["figures"]
    number_keys = {k for k, v in memory.items() if k.endswith("_bytes")}
    assert number_keys <= set(figures), number_keys - set(figures)
    assert "daemon process only" in figures["rss_bytes"]
    assert "embedded SeaweedFS together" in figures["cgroup_usage_bytes"]


async def test_readyz_reports_a_missing_bucket(
    start_proxy: StartProxy, seaweed: EmbeddedSeaweed
) -> None:
    async with s3_for(seaweed) as ok:
        proxy = await start_proxy(storage=ok)
        assert (await get_json(f"{proxy.url}/readyz"))[0] == 200
    missing = S3Storage(
        bucket="no-such-bucket-here",
        endpoint_url=seaweed.endpoint_url,
        access_key=seaweed.credentials.access_key,
        secret_key=seaweed.credentials.secret_key,
        retry_attempts=1,
    )
    async with missing:
        proxy = await start_proxy(storage=missing)
        code, body = await get_json(f"{proxy.url}/readyz")
    assert code == 503
    assert body["failing"] == ["storage"]
    assert body["checks"]["memory"]["ok"] is True


async def test_readyz_follows_the_s3_server_down_and_back(
    start_proxy: StartProxy, tmp_path: Path
) -> None:
    creds = Credentials("readykey", "readysecret")
    sw = EmbeddedSeaweed(tmp_path, bucket=BUCKET, credentials=creds)
    await sw.start(timeout_s=60)
    storage = S3Storage(
        bucket=BUCKET,
        endpoint_url=sw.endpoint_url,
        access_key=creds.access_key,
        secret_key=creds.secret_key,
        retry_attempts=2,
        retry_base_delay_s=0.05,
        connect_timeout_s=1,
        read_timeout_s=2,
    )
    again: EmbeddedSeaweed | None = None
    try:
        await storage.open()
        proxy = await start_proxy(storage=storage)

        async def until(want: int, timeout_s: float) -> dict[str, Any]:
            deadline = time.monotonic() + timeout_s
            while True:
                code, body = await get_json(f"{proxy.url}/readyz")
                if code == want:
                    return dict(body)
                assert time.monotonic() < deadline, f"/readyz stayed {code}: {body}"
                await asyncio.sleep(0.2)

        await until(200, 30)  # a fresh store takes a moment to serve its bucket
        sw.kill()  # SIGTERM takes ~14 s to stop SeaweedFS; an outage needs no grace
        body = await until(503, 10)
        assert body["failing"] == ["storage"] and body["ready"] is False
        assert "error" in body["checks"]["storage"]
        assert value(await scrape(proxy.url), "proxy_ready") == 0
        again = EmbeddedSeaweed(tmp_path, bucket=BUCKET, credentials=creds, s3_port=sw.s3_port)
        await again.start(timeout_s=60)
        body = await until(200, 30)
        assert body == {
            "ready": True,
            "failing": [],
            "checks": {
                "storage": {"ok": True, "bucket": BUCKET},
                "memory": body["checks"]["memory"],
            },
        }
        assert value(await scrape(proxy.url), "proxy_ready") == 1
    finally:
        await storage.close()
        for server in (sw, again):
            if server is not None:
                server.kill()
                await server.stop()


class FakeMemory:
    """Readings a test sets; the machine has 1000 MiB and we use 100 MiB of it."""

    def __init__(self) -> None:
        self.used_mib = 100

    def __call__(self) -> MemoryReading:
        return MemoryReading(
            100 * MiB, 120 * MiB, 1000 * MiB, (1000 - self.used_mib) * MiB, None, None
        )


async def put(url: str, key: str, body: bytes, **headers: str) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as s:
        async with s.put(f"{url}/uploads/{key}", data=body, headers=headers) as r:
            return r.status, dict(r.headers), await r.json()


async def test_memory_pressure_refuses_new_uploads_before_their_body_and_recovers(
    start_proxy: StartProxy, s3: S3Storage
) -> None:
    fake = FakeMemory()
    proxy = await start_proxy(memory_reader=fake, memory={"sample_interval_s": 2})
    monitor = proxy.runtime.memory
    assert (await put(proxy.url, "before.bin", b"a" * 1000))[0] == 201

    # An upload already running when memory turns critical.
    running = await RawRequest.open(
        proxy.host, proxy.port, put_head(proxy.host, "running.bin", 2 * MiB)
    )
    try:
        await running.send(os.urandom(MiB))
        await eventually(proxy.url, lambda m: value(m, "proxy_received_bytes_total") == 1000 + MiB)
        fake.used_mib = 960
        assert monitor.sample().level.label == "critical"
        m = await scrape(proxy.url)
        assert value(m, "proxy_memory_pressure_level") == 2
        assert value(m, "proxy_memory_used_ratio") == pytest.approx(0.96)

        code, headers, body = await put(proxy.url, "refused.bin", b"b" * 1000)
        assert (code, body["code"], headers["Retry-After"]) == (503, "ERR_MEMORY_PRESSURE", "2")

        # Expect: 100-continue gets the refusal instead of "100 Continue": no body is sent.
        expect = await RawRequest.open(
            proxy.host, proxy.port, put_head(proxy.host, "expect.bin", MiB, "Expect: 100-continue")
        )
        code, headers, _ = await expect.response()
        expect.close()
        assert (code, headers["retry-after"]) == (503, "2")

        # Without Expect: headers alone are enough for the answer; no body byte is awaited.
        bare = await RawRequest.open(proxy.host, proxy.port, put_head(proxy.host, "bare.bin", MiB))
        code, _, _ = await bare.response()
        bare.close()
        assert code == 503

        code, ready = await get_json(f"{proxy.url}/readyz")
        assert (code, ready["failing"]) == (503, ["memory"])

        await running.send(os.urandom(MiB))
        code, _, _ = await running.response()
        assert code == 201, "a running upload carries on at critical"
    finally:
        running.close()

    fake.used_mib = 500
    assert monitor.sample().level.label == "normal"
    assert (await put(proxy.url, "after.bin", b"c" * 1000))[0] == 201
    assert (await get_json(f"{proxy.url}/readyz"))[0] == 200

    m = await scrape(proxy.url)
    rejected = {dict(k)["reason"]: v for k, v in series(m, "proxy_uploads_rejected_total").items()}
    assert rejected["memory_pressure"] == 3
    assert value(m, "proxy_uploads_completed_total") == 3
    assert value(m, "proxy_received_bytes_total") == 2 * MiB + 2000, "refused bodies unread"
    await s3.delete_object(f"{proxy.prefix}before.bin")
    await s3.delete_object(f"{proxy.prefix}running.bin")
    await s3.delete_object(f"{proxy.prefix}after.bin")
    await assert_nothing_left(s3, proxy.prefix)


async def test_post_is_refused_under_pressure_too(start_proxy: StartProxy) -> None:
    fake = FakeMemory()
    proxy = await start_proxy(memory_reader=fake)
    fake.used_mib = 999
    proxy.runtime.memory.sample()
    form = aiohttp.FormData()
    form.add_field("file", b"x" * 100, filename="a.txt")
    async with aiohttp.ClientSession() as s, s.post(f"{proxy.url}/uploads", data=form) as r:
        assert r.status == 503
        assert (await r.json())["code"] == "ERR_MEMORY_PRESSURE"
    m = await scrape(proxy.url)
    assert value(m, "proxy_uploads_rejected_total", reason="memory_pressure") == 1
    assert value(m, "proxy_uploads_started_total") == 0


async def test_a_large_declared_size_is_no_reason_to_refuse_on_memory(
    start_proxy: StartProxy,
) -> None:
    fake = FakeMemory()
    fake.used_mib = 900  # warning, not critical
    proxy = await start_proxy(memory_reader=fake)
    assert proxy.runtime.memory.sample().level.label == "warning"
    expect = await RawRequest.open(
        proxy.host,
        proxy.port,
        put_head(proxy.host, "huge.bin", 30 * 1024**3, "Expect: 100-continue"),
    )
    try:
        assert await expect.status_line() == "HTTP/1.1 100 Continue"
    finally:
        expect.close()
