"""/metrics after known uploads, against the real S3 server: exact counter and histogram values."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from tus_helpers import create, metadata, sid, store_for

from proxy.auth import hash_token
from proxy.errors import REASONS
from proxy.obs.metrics import Metrics
from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import EmbeddedSeaweed
from proxy.tus.maintenance import sweep_once
from proxy.tus.state import TusStore

from conftest import StartProxy, assert_nothing_left, serving
from obs_helpers import (
    MiB,
    RawRequest,
    Samples,
    bucket,
    eventually,
    parse,
    put_head,
    run_promtool,
    scrape,
    scrape_text,
    series,
    value,
)

OPERATOR = "operator-token-0123456789"

UPLOAD_OPS = (
    "head_object",
    "create_multipart_upload",
    "upload_part",
    "complete_multipart_upload",
    "abort_multipart_upload",
    "copy_object",
    "put_object",
)


async def get_status(url: str, token: str | None = None) -> dict[str, Any]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as s, s.get(f"{url}/status", headers=headers) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


def storage_calls(samples: Samples) -> dict[str, float]:
    """Attempts per upload operation (the readiness probe's head_bucket left out)."""
    out = {}
    for op in UPLOAD_OPS:
        n = value(samples, "proxy_storage_request_duration_seconds_count", operation=op)
        if n:
            out[op] = n
    return out


def failures(samples: Samples, name: str = "proxy_uploads_failed_total") -> dict[str, float]:
    """The non-zero reasons of a by-reason counter; every reason must be exported."""
    by_reason = {dict(labels)["reason"]: v for labels, v in series(samples, name).items()}
    assert set(REASONS) <= set(by_reason), "every reason is exported from the start"
    return {r: v for r, v in by_reason.items() if v}


def totals(samples: Samples) -> dict[str, float]:
    """The non-zero upload totals (each must be exported, zero or not)."""
    names = (
        "proxy_uploads_started_total",
        "proxy_uploads_completed_total",
        "proxy_received_bytes_total",
        "proxy_stored_bytes_total",
        "proxy_hashed_bytes_total",
        "proxy_hash_duration_seconds_count",
        "proxy_upload_size_bytes_count",
        "proxy_upload_size_bytes_sum",
        "proxy_uploads_in_flight",
    )
    found = {n.removeprefix("proxy_"): value(samples, n) for n in names}
    assert None not in found.values(), found
    return {n: v for n, v in found.items() if v}


async def test_successful_upload_counts_every_byte_and_call(start_proxy: StartProxy) -> None:
    proxy = await start_proxy()
    body = os.urandom(12 * MiB)
    async with aiohttp.ClientSession() as s:
        async with s.put(f"{proxy.url}/uploads/ok.bin", data=body) as r:
            assert r.status == 201, await r.text()
    m = await scrape(proxy.url)
    assert totals(m) == {
        "uploads_started_total": 1,
        "uploads_completed_total": 1,
        "received_bytes_total": 12 * MiB,
        "stored_bytes_total": 12 * MiB,
        "hashed_bytes_total": 12 * MiB,
        "hash_duration_seconds_count": 3,  # 5 + 5 + 2 MiB parts
        "upload_size_bytes_count": 1,
        "upload_size_bytes_sum": 12 * MiB,
    }
    assert failures(m) == {} and failures(m, "proxy_uploads_rejected_total") == {}
    assert bucket(m, "proxy_upload_size_bytes", 4 * MiB) == 0
    assert bucket(m, "proxy_upload_size_bytes", 16 * MiB) == 1
    assert value(m, "proxy_upload_duration_seconds_count", outcome="completed") == 1
    assert value(m, "proxy_upload_duration_seconds_count", outcome="failed") == 0
    assert storage_calls(m) == {
        "head_object": 1,
        "create_multipart_upload": 1,
        "upload_part": 3,
        "complete_multipart_upload": 1,
        "copy_object": 1,
        "put_object": 1,  # its content index entry (instant uploads)
    }
    assert series(m, "proxy_storage_errors_total") == {}
    assert series(m, "proxy_active_upload_received_bytes_total") == {}


async def test_bad_checksum_counts_stored_parts_and_the_abort(
    start_proxy: StartProxy, s3: S3Storage
) -> None:
    proxy = await start_proxy()
    body = os.urandom(6 * MiB)
    wrong = base64.b64encode(hashlib.sha256(b"something else").digest()).decode()
    async with aiohttp.ClientSession() as s:
        headers = {"X-Content-SHA256": wrong}
        async with s.put(f"{proxy.url}/uploads/bad.bin", data=body, headers=headers) as r:
            assert r.status == 400
            assert (await r.json())["code"] == "ERR_CHECKSUM_MISMATCH"
    m = await scrape(proxy.url)
    assert totals(m) == {
        "uploads_started_total": 1,
        "received_bytes_total": 6 * MiB,
        "stored_bytes_total": 6 * MiB,  # both parts reached S3 before the digest was known
        "hashed_bytes_total": 6 * MiB,
        "hash_duration_seconds_count": 2,
    }
    assert failures(m) == {"checksum_mismatch": 1}
    assert value(m, "proxy_upload_duration_seconds_count", outcome="failed") == 1
    assert storage_calls(m) == {
        "head_object": 1,
        "create_multipart_upload": 1,
        "upload_part": 2,
        "abort_multipart_upload": 1,
    }
    await assert_nothing_left(s3, proxy.prefix)


async def test_client_disconnect_counts_the_bytes_that_arrived(
    start_proxy: StartProxy, s3: S3Storage
) -> None:
    proxy = await start_proxy()
    req = await RawRequest.open(proxy.host, proxy.port, put_head(proxy.host, "gone.bin", 3 * MiB))
    await req.send(os.urandom(MiB))
    req.close()
    m = await eventually(proxy.url, lambda m: bool(failures(m)))
    assert failures(m) == {"client_disconnect": 1}
    assert totals(m) == {"uploads_started_total": 1, "received_bytes_total": MiB}
    assert storage_calls(m) == {"head_object": 1}
    await assert_nothing_left(s3, proxy.prefix)


async def test_too_large_declared_is_rejected_and_streamed_is_failed(
    start_proxy: StartProxy, s3: S3Storage
) -> None:
    proxy = await start_proxy(upload={"max_upload_size": "1MiB"})

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield os.urandom(256 * 1024)

    async with aiohttp.ClientSession() as s:
        async with s.put(f"{proxy.url}/uploads/big.bin", data=os.urandom(2 * MiB)) as r:
            assert r.status == 413
        try:
            async with s.put(f"{proxy.url}/uploads/big2.bin", data=chunked()) as r:
                assert r.status == 413
        except aiohttp.ClientError:
            pass  # the server may close while we are still sending: the metrics tell
    m = await eventually(proxy.url, lambda m: bool(failures(m)))
    assert failures(m, "proxy_uploads_rejected_total") == {"too_large": 1}
    assert failures(m) == {"too_large": 1}
    t = totals(m)
    assert MiB < t.pop("received_bytes_total") <= 2 * MiB
    assert t == {"uploads_started_total": 1}  # the declared one never started
    # The declared size is refused before the existence check: only the chunked one asks S3.
    assert storage_calls(m) == {"head_object": 1}
    await assert_nothing_left(s3, proxy.prefix)


async def test_live_progress_series_exist_only_while_the_upload_runs(
    start_proxy: StartProxy,
) -> None:
    proxy = await start_proxy(auth={"mode": "none", "operator_tokens": [hash_token(OPERATOR)]})
    size = 8 * MiB
    req = await RawRequest.open(proxy.host, proxy.port, put_head(proxy.host, "live.bin", size))
    try:
        await req.send(os.urandom(6 * MiB))

        def progressed(m: Samples) -> bool:
            # A body read straight into the part buffers is counted per read (at least
            # every 0.25 s), not per chunk: wait for both counters.
            stored = series(m, "proxy_active_upload_stored_bytes_total")
            received = series(m, "proxy_active_upload_received_bytes_total")
            return list(stored.values()) == [5 * MiB] and list(received.values()) == [6 * MiB]

        m = await eventually(proxy.url, progressed)
        ((labels, received),) = series(m, "proxy_active_upload_received_bytes_total").items()
        assert dict(labels) == {"slot": "0"}
        assert received == 6 * MiB
        assert value(m, "proxy_active_upload_start_time_seconds", slot="0")
        assert value(m, "proxy_uploads_in_flight") == 1

        status = await get_status(proxy.url, OPERATOR)
        assert status["in_flight"] == {
            "uploads": 1,
            "received_bytes": 6 * MiB,
            "stored_bytes": 5 * MiB,
        }
        (active,) = status["uploads"]
        assert active["slot"] == 0 and len(active["id"]) == 16
        assert active["key"] == f"{proxy.prefix}live.bin"
        assert active["received_bytes"] == 6 * MiB and active["stored_bytes"] == 5 * MiB
        assert active["age_s"] > 0 and active["rate_bytes_per_s"] > 0

        await req.send(os.urandom(size - 6 * MiB))
        code, _, _ = await req.response()
        assert code == 201
    finally:
        req.close()
    m = await scrape(proxy.url)
    for name in (
        "proxy_active_upload_received_bytes_total",
        "proxy_active_upload_stored_bytes_total",
        "proxy_active_upload_start_time_seconds",
    ):
        assert series(m, name) == {}, name
    assert value(m, "proxy_uploads_in_flight") == 0


async def test_exposition_passes_promtool_check_metrics(start_proxy: StartProxy) -> None:
    proxy = await start_proxy()
    async with aiohttp.ClientSession() as s:
        async with s.put(f"{proxy.url}/uploads/a.bin", data=os.urandom(6 * MiB)) as r:
            assert r.status == 201
        async with s.put(f"{proxy.url}/uploads/a.bin", data=b"again") as r:
            assert r.status == 409
    text = await scrape_text(proxy.url)
    assert "proxy_buffer_pool_budget_bytes" in text and "process_resident_memory_bytes" in text
    code, out = await run_promtool("check", "metrics", stdin=text)
    assert code == 0, out


async def test_metrics_listen_serves_metrics_without_upload_routes(
    seaweed: EmbeddedSeaweed, prefix: str
) -> None:
    async with serving(seaweed, prefix, server={"metrics_listen": "127.0.0.1:0"}) as server:
        main = f"http://127.0.0.1:{server.port}"
        side = f"http://127.0.0.1:{server.metrics_port}"
        assert server.metrics_port != server.port
        async with aiohttp.ClientSession() as s:
            async with s.put(f"{main}/uploads/m.bin", data=b"x" * 1000) as r:
                assert r.status == 201
            for path, want in (
                ("/metrics", 200),
                ("/readyz", 200),
                ("/healthz", 200),
                ("/status", 404),
                ("/uploads/m.bin", 404),
            ):
                async with s.get(f"{side}{path}") as r:
                    assert r.status == want, path
            async with s.put(f"{side}/uploads/x.bin", data=b"x") as r:
                assert r.status in (404, 405)
        # Both listeners read the same registry.
        for url in (main, side):
            assert value(await scrape(url), "proxy_uploads_completed_total") == 1


async def test_tus_upload_counts_once_and_its_bytes(start_proxy: StartProxy, prefix: str) -> None:
    """A tus upload over two PATCHes: started and completed once, every byte counted once,
    and live progress only while a PATCH streams."""
    from tus_helpers import create, patch, tus_sections

    proxy = await start_proxy(**tus_sections(prefix))
    body = os.urandom(7 * MiB)
    async with aiohttp.ClientSession() as s:
        url = await create(s, proxy.url, len(body))
        assert (await patch(s, url, 0, body[: 3 * MiB])).status == 204
        m = await scrape(proxy.url)
        t = totals(m)
        assert t["uploads_started_total"] == 1 and "uploads_completed_total" not in t
        assert t["received_bytes_total"] == 3 * MiB
        assert series(m, "proxy_active_upload_received_bytes_total") == {}
        assert (await patch(s, url, 3 * MiB, body[3 * MiB :])).status == 204
    m = await scrape(proxy.url)
    t = totals(m)
    assert t["uploads_started_total"] == 1 and t["uploads_completed_total"] == 1
    assert t["received_bytes_total"] == 7 * MiB
    assert t["upload_size_bytes_sum"] == 7 * MiB
    assert series(m, "proxy_active_upload_received_bytes_total") == {}


async def test_tus_failures_and_rejections_count_like_a_puts(
    start_proxy: StartProxy, s3: S3Storage, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """tus outcomes reach the same counters as plain uploads (so the failure-ratio alert
    sees them): a PATCH failing its Upload-Checksum and a request for an unknown upload
    are rejected; an upload its client terminates, or that expires unfinished, has failed.
    Each ending writes the one outcome line, with the fields a PUT's line has."""
    from tus_helpers import create, patch, service_for, tus_sections

    caplog.set_level(logging.INFO, logger="proxy.engine.events")
    proxy = await start_proxy(**tus_sections(prefix))
    body = os.urandom(1000)
    wrong = "sha1 " + base64.b64encode(hashlib.sha1(b"other").digest()).decode()
    async with aiohttp.ClientSession() as s:
        terminated = await create(s, proxy.url, len(body))
        r = await patch(s, terminated, 0, body, **{"Upload-Checksum": wrong})
        assert r.status == 460
        async with s.head(terminated, headers={"Tus-Resumable": "1.0.0"}) as r:
            assert r.status == 200 and r.headers["Upload-Offset"] == "0"  # the upload lives
        async with s.delete(terminated, headers={"Tus-Resumable": "1.0.0"}) as r:
            assert r.status == 204
        async with s.head(terminated, headers={"Tus-Resumable": "1.0.0"}) as r:
            assert r.status == 404
        expired = await create(s, proxy.url, len(body))
        assert (await patch(s, expired, 0, body[:10])).status == 204
    m = await scrape(proxy.url)
    assert failures(m, "proxy_uploads_rejected_total") == {"checksum_mismatch": 1, "not_found": 1}
    assert failures(m) == {"terminated": 1}
    # The tus sweeper of any instance, at a time past the upload's expiry.
    info = await store_for(s3, prefix).load(sid(expired))
    assert info is not None and info[0].offset == 10
    later = info[0].expires_s + 1
    store = TusStore(s3, f"{prefix}.tus/", 30, clock=lambda: later)
    assert await sweep_once(service_for(proxy, store)) == 1
    m = await scrape(proxy.url)
    assert failures(m) == {"terminated": 1, "expired": 1}
    assert value(m, "proxy_uploads_started_total") == 2
    assert value(m, "proxy_upload_duration_seconds_count", outcome="failed") == 2
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("upload ")]
    assert len(lines) == 2, lines
    for line, (url, sent, result) in zip(
        lines, [(terminated, 0, "ERR_TERMINATED"), (expired, 10, "ERR_EXPIRED")], strict=True
    ):
        assert f"id={sid(url)} key=" in line and f" bytes={sent} sha256=- duration_s=" in line
        assert f"result={result} remote=" in line and line.endswith("auth=none protocol=tus")
    assert "remote=127.0.0.1 " in lines[0] and "remote=- " in lines[1]  # the sweeper ended it
    await assert_nothing_left(s3, prefix)


async def test_upload_ids_and_keys_reach_operators_only(
    seaweed: EmbeddedSeaweed, prefix: str
) -> None:
    """A tus id is a credential (with auth off it is the only one) and a key names someone's
    file: neither is in /metrics (main or metrics_listen) nor in /status without an
    operator token, while a PATCH streams."""
    sections: dict[str, Any] = {
        "server": {"metrics_listen": "127.0.0.1:0"},
        "auth": {"mode": "none", "operator_tokens": [hash_token(OPERATOR)]},
        "tus": {"sweep_interval_s": 0},
    }
    async with serving(seaweed, prefix, **sections) as server:
        main = f"http://127.0.0.1:{server.port}"
        side = f"http://127.0.0.1:{server.metrics_port}"
        size = 8 * MiB
        async with aiohttp.ClientSession() as s:
            name = metadata(filename="private-name.bin")
            url = await create(s, main, size, **{"Upload-Metadata": name})
        url_id, upload_id = url.rsplit("/", 1)[1], sid(url)
        req = await RawRequest.open(
            "127.0.0.1",
            server.port,
            f"PATCH /files/{url_id} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
            "Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
            f"Content-Length: {size}\r\n\r\n",
        )
        try:
            await req.send(os.urandom(6 * MiB))
            await eventually(
                main,
                lambda m: value(m, "proxy_active_upload_stored_bytes_total", slot="0") == 5 * MiB,
            )
            for where in (main, side):
                text = await scrape_text(where)
                assert upload_id not in text and "private-name" not in text, where
                assert url_id not in text, where
                assert prefix not in text, where
            async with aiohttp.ClientSession() as s, s.get(f"{main}/status") as r:
                public = await r.text()
            assert upload_id not in public and "private-name" not in public, public
            assert url_id not in public, public
            assert json.loads(public)["in_flight"]["uploads"] == 1
            (active,) = (await get_status(main, OPERATOR))["uploads"]
            # Operators see the storage id (what logs and keys carry), never the URL's.
            assert active["id"] == upload_id and active["slot"] == 0
            assert url_id not in json.dumps(active)
            assert active["key"] == f"{prefix}tus/{upload_id}/private-name.bin"
            bad = {"Authorization": "Bearer not-an-operator-token"}
            async with aiohttp.ClientSession() as s, s.get(f"{main}/status", headers=bad) as r:
                assert (r.status, (await r.json())["code"]) == (401, "ERR_UNAUTHORIZED")
            await req.send(os.urandom(size - 6 * MiB))
            status, _, _ = await req.response()
            assert status == 204
        finally:
            req.close()


def test_live_series_use_bounded_slots() -> None:
    """Slots are reused: however many uploads come and go, labels stay below the bound."""
    metrics = Metrics(CollectorRegistry(), reasons=REASONS, live_uploads_max=2, version="x")

    def slots() -> set[str]:
        m = parse(generate_latest(metrics.registry).decode())
        return {dict(k)["slot"] for k in series(m, "proxy_active_upload_received_bytes_total")}

    for n in range(3):
        metrics.upload_started(f"id{n}", f"key{n}").received(n + 1)
    assert slots() == {"0", "1"}  # the third upload has no live series
    metrics.upload_finished("id0", reason=None, seconds=1, size_bytes=1)
    metrics.transfer_started("id3", "key3")
    assert slots() == {"0", "1"}
    assert [(p.upload_id, p.slot) for p in metrics.active()] == [
        ("id1", 1),
        ("id2", None),
        ("id3", 0),
    ]
    metrics.transfer_finished("id3")
    metrics.upload_finished("id1", reason="too_large", seconds=1, size_bytes=1)
    assert slots() == set()


def test_a_bound_source_lacking_an_attribute_fails_at_once() -> None:
    """The gauge tables name the attributes they read; binding an object without one fails
    at start-up, not at the first scrape."""
    from types import SimpleNamespace

    from proxy.engine.buffers import BufferPool

    metrics = Metrics(CollectorRegistry(), reasons=REASONS, live_uploads_max=1, version="t")
    metrics.bind_pool(BufferPool(16 << 20, 8 << 20))
    with pytest.raises(TypeError, match="lacks header_timeouts_total"):
        metrics.bind_listener("main", SimpleNamespace(open=0, refused_total=0))
    with pytest.raises(TypeError, match="lacks waiting"):
        metrics.bind_pool(
            SimpleNamespace(in_use_bytes=0, budget_bytes=0, idle_bytes=0, peak_in_use_bytes=0)
        )
