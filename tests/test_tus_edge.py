"""tus edge cases a review reproduced against the real SeaweedFS.

* A PATCH that breaks after its last byte (a chunked body without its last-chunk marker,
  a stall past idle_timeout_s, a daemon draining) must complete the upload; it must never
  leave Upload-Offset == Upload-Length with no object, which clients take for "done".
  Neither may a crash while the last part is stored, nor a completion that fails.
* A PATCH that streams for longer than expire_after_s is live: neither sweeper, on any
  instance, may expire the upload or abort its multipart upload under it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from test_tus_resume import check_stored, cut_patch, slow_body, wait_offset
from tus_helpers import (
    OCTET,
    TUS,
    create,
    head_offset,
    patch,
    service_for,
    sha256_hex,
    sid,
    state_keys,
    store_for,
    tus_key,
    tus_sections,
)

from proxy.app import RUNTIME
from proxy.errors import StorageUnavailable
from proxy.tus.completion import Completer
from proxy.tus.maintenance import sweep_once
from proxy.tus.patch import PatchWriter
from proxy.tus.state import TusStore, UploadInfo

from conftest import MiB, data_path, until


def upload_id(url: str) -> str:
    return sid(url)


async def open_chunked_patch(
    url: str, offset: int, body: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A PATCH with a chunked body carrying ``body`` but not the last-chunk marker."""
    parsed = aiohttp.client.URL(url)
    reader, writer = await asyncio.open_connection(parsed.host, parsed.port)
    head = (
        f"PATCH {parsed.path} HTTP/1.1\r\nHost: {parsed.host}\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    writer.write(head.encode() + f"{len(body):x}\r\n".encode() + body + b"\r\n")
    await writer.drain()
    return reader, writer


def all_received(app: Any, nbytes: int) -> Callable[[], Awaitable[bool]]:
    """True once the daemon has read ``nbytes`` body bytes in all (its status counter)."""

    async def check() -> bool:
        return bool(app[RUNTIME].events.stats.received_bytes >= nbytes)

    return check


async def hang_up(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


async def wait_stored(s3: Any, prefix: str, url: str) -> None:
    """Until the upload is complete: the object is there and its state is gone (the server
    sees the hang-up asynchronously, and drops the state just after the object appears)."""
    for _ in range(200):
        if await s3.head(tus_key(prefix, url)) is not None:
            if not await state_keys(s3, prefix):
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the upload never completed")


async def wait_state(s3: Any, prefix: str, url: str, want: Any) -> UploadInfo:
    """Until the upload's info object satisfies ``want``; return it."""
    info = None
    for _ in range(200):
        loaded = await store_for(s3, prefix).load(upload_id(url))
        info = loaded[0] if loaded else None
        if info is not None and want(info):
            return info
        await asyncio.sleep(0.05)
    raise AssertionError(f"the state never got there; last {info}")


# -- a PATCH that breaks after its last byte ----------------------------------------------


@pytest.mark.parametrize(
    ("size", "before"),
    [
        (1000, 0),  # only a tail
        (7 * MiB + 5, 0),  # a part and a tail
        (10 * MiB, 0),  # two whole parts: the buffer is full when the body breaks
        (7 * MiB + 5, 2 * MiB),  # an earlier PATCH left a pending segment
    ],
)
async def test_a_chunked_patch_cut_before_its_last_chunk_completes_the_upload(
    start_proxy, http, s3, prefix, tmp_path, size, before
) -> None:
    """All the bytes arrived, only the terminating 0-chunk did not: the upload is complete
    (the object with its sha256, no state left), not stuck at offset == length."""
    proxy = await start_proxy(**tus_sections(prefix))
    data = data_path(tmp_path, size, seed=11).read_bytes()
    url = await create(http, proxy.url, size)
    if before:
        await cut_patch(url, 0, size, data[:before])
        await wait_offset(http, url, before)
    _, writer = await open_chunked_patch(url, before, data[before:])
    await until(all_received(proxy.app, size), "every byte in before the hang-up")
    await hang_up(writer)
    await wait_stored(s3, prefix, url)
    await check_stored(s3, prefix, url, data)
    async with http.head(url, headers=TUS) as r:
        # Its state is gone; its object tells the client that broke off that it is done.
        assert (r.status, r.headers["Upload-Offset"]) == (200, str(size))
        assert r.headers["Upload-SHA256"] == sha256_hex(data)


async def test_a_patch_stalled_after_its_last_byte_completes_and_says_so(
    start_proxy, http, s3, prefix, tmp_path
) -> None:
    """The client is still there when idle_timeout_s ends the body: it is told the upload
    is complete (204, Upload-Offset == Upload-Length), not sent an error to retry on."""
    proxy = await start_proxy(upload={"idle_timeout_s": 1}, **tus_sections(prefix))
    size = 6 * MiB + 7
    data = data_path(tmp_path, size, seed=12).read_bytes()
    url = await create(http, proxy.url, size)
    reader, writer = await open_chunked_patch(url, 0, data)
    try:
        status = await asyncio.wait_for(reader.readline(), 30)
        headers = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode().lower()
    finally:
        await hang_up(writer)
    assert status.startswith(b"HTTP/1.1 204"), status
    assert f"upload-offset: {size}\r\n" in headers
    assert f"upload-sha256: {sha256_hex(data)}\r\n" in headers
    await check_stored(s3, prefix, url, data)


async def test_a_drain_after_the_last_byte_completes_the_upload(
    start_proxy, http, s3, prefix, tmp_path
) -> None:
    """A shutdown whose drain timeout cancels a PATCH that has all its bytes."""
    size = 5 * MiB + 99
    data = data_path(tmp_path, size, seed=13).read_bytes()
    proxy = await start_proxy(**tus_sections(prefix))
    url = await create(http, proxy.url, size)
    _, writer = await open_chunked_patch(url, 0, data)
    await until(all_received(proxy.app, size), "every byte in before the drain")
    await proxy.stop()  # drain (5 s), then the PATCH is cancelled
    await hang_up(writer)
    await check_stored(s3, prefix, url, data)


@pytest.mark.parametrize("finisher", ["empty PATCH", "sweeper"])
async def test_a_failed_completion_after_the_last_byte_can_be_finished(
    start_proxy, http, s3, prefix, tmp_path, monkeypatch, finisher
) -> None:
    """If completing fails right after the body broke, the state says "completing" (HEAD:
    offset == length, with the digest), and an empty PATCH at that offset, or the sweeper,
    finishes it."""
    proxy = await start_proxy(**tus_sections(prefix))
    size = 6 * MiB + 1
    data = data_path(tmp_path, size, seed=14).read_bytes()
    complete = Completer.complete
    failures = []

    async def fail_once(self: Completer, info: UploadInfo, client: str = "-") -> UploadInfo:
        if not failures:
            failures.append(info.id)
            raise StorageUnavailable("injected: storage went away")
        return await complete(self, info, client)

    monkeypatch.setattr(Completer, "complete", fail_once)
    url = await create(http, proxy.url, size)
    _, writer = await open_chunked_patch(url, 0, data)
    await until(all_received(proxy.app, size), "every byte in before the hang-up")
    await hang_up(writer)
    info = await wait_state(s3, prefix, url, lambda i: i.lease_owner is None and i.rev > 1)
    assert failures == [info.id]
    assert info.completing and info.offset == size and info.sha256_hex == sha256_hex(data)
    async with http.head(url, headers=TUS) as r:
        assert r.status == 200 and r.headers["Upload-Offset"] == str(size)
        assert r.headers["Upload-SHA256"] == sha256_hex(data)
    if finisher == "sweeper":
        assert await sweep_once(service_for(proxy)) == 1
    else:
        r = await patch(http, url, size, b"")
        assert r.status == 204 and r.headers["Upload-SHA256"] == sha256_hex(data)
    await check_stored(s3, prefix, url, data)


async def test_a_crash_while_the_last_part_is_stored_leaves_a_completable_upload(
    start_proxy, http, s3, prefix, tmp_path, monkeypatch
) -> None:
    """The lease keeper checkpoints while ``commit(final=True)`` stores the last part.  It
    must not save "every part, not completing": a daemon dying right then would leave
    offset == length, no object, and nothing that ever completes it."""
    proxy = await start_proxy(**tus_sections(prefix, lock_lease_s=3))
    size = 6 * MiB + 3
    data = data_path(tmp_path, size, seed=15).read_bytes()
    commit = PatchWriter.commit
    crash = asyncio.Event()

    async def commit_then_die(self: PatchWriter, *, final: bool) -> Any:
        await commit(self, final=final)
        await crash.wait()  # the keeper runs every second meanwhile
        raise RuntimeError("injected: the daemon dies here")

    monkeypatch.setattr(PatchWriter, "commit", commit_then_die)
    url = await create(http, proxy.url, size)
    sent = asyncio.ensure_future(patch(http, url, 0, data))
    info = await wait_state(s3, prefix, url, lambda i: i.parts_bytes == size)
    assert info.completing and info.sha256_hex == sha256_hex(data) and info.lease_owner
    # The daemon "dies": what is in the bucket is exactly ``info``, its lease held by a
    # process that is gone.  (Our fake death writes a release; put the crash image back.)
    crash.set()
    assert (await sent).status == 500
    monkeypatch.undo()
    key = store_for(s3, prefix).info_key(info.id)
    await s3.delete_object(key)
    await s3.put_conditional(key, info.to_json(), if_none_match=True)
    assert await head_offset(http, url) == size
    # Another instance, its clock just past the dead lease (no waiting for it).
    shift_s = info.lease_until_s - time.time() + 0.1
    cfg = proxy.config.tus
    later = TusStore(s3, cfg.state_prefix, cfg.lock_lease_s, clock=lambda: time.time() + shift_s)
    assert await sweep_once(service_for(proxy, later)) == 1
    await check_stored(s3, prefix, url, data)


@pytest.mark.parametrize("finisher", ["empty PATCH", "sweeper"])
async def test_an_upload_left_at_its_length_without_completing_is_finished(
    start_proxy, http, s3, prefix, tmp_path, finisher
) -> None:
    """State as the bugs above left it before the fix (and as a final PATCH that set a
    deferred length and then failed still can): every byte durable, the last ones in a
    pending segment, not completing.  The sweeper must complete it, not let it expire."""
    proxy = await start_proxy(**tus_sections(prefix))
    size = 5 * MiB + 1000
    data = data_path(tmp_path, size, seed=16).read_bytes()
    url = await create(http, proxy.url, None)
    assert (await patch(http, url, 0, data)).status == 204  # length still deferred
    store = store_for(s3, prefix)
    loaded = await store.load(upload_id(url))
    assert loaded is not None
    assert loaded[0].parts and loaded[0].pending and loaded[0].offset == size
    stuck = replace(loaded[0], length=size, rev=loaded[0].rev + 1)
    await s3.put_conditional(store.info_key(stuck.id), stuck.to_json(), if_match=loaded[1])
    async with http.head(url, headers=TUS) as r:
        assert r.status == 200 and r.headers["Upload-Offset"] == r.headers["Upload-Length"]
    if finisher == "sweeper":
        assert await sweep_once(service_for(proxy)) == 1
    else:
        r = await patch(http, url, size, b"")
        assert r.status == 204 and r.headers["Upload-SHA256"] == sha256_hex(data)
    await check_stored(s3, prefix, url, data)


# -- a PATCH running past the upload's expiry ---------------------------------------------


async def test_a_patch_running_past_the_expiry_is_live_for_both_sweepers(
    start_proxy, http, s3, prefix
) -> None:
    """tus-js-client sends a file in one PATCH: it may run longer than expire_after_s.  A
    held lease makes the upload live (HEAD, the stale-multipart sweeper, the tus sweeper
    of any instance), and every renewal pushes the expiry forward."""
    proxy = await start_proxy(**tus_sections(prefix, lock_lease_s=3, expire_after_s=2))
    data = bytes(range(256)) * 4096 * 6  # 6 MiB: one part stored, then the PATCH stalls
    url = await create(http, proxy.url, len(data))
    created = await wait_state(s3, prefix, url, lambda i: True)
    release = asyncio.Event()
    headers = {**OCTET, "Upload-Offset": "0", "Content-Length": str(len(data))}
    sent = asyncio.ensure_future(
        http.patch(
            url, data=slow_body(data[: 5 * MiB + 1], release, data[5 * MiB + 1 :]), headers=headers
        )
    )
    try:
        await wait_offset(http, url, 5 * MiB)  # the keeper checkpointed the part
        await asyncio.sleep(max(0.0, created.expires_s - time.time()) + 0.5)
        # Past the expiry set at creation, the PATCH still streaming:
        async with http.head(url, headers=TUS) as r:
            assert r.status == 200
        running = await wait_state(s3, prefix, url, lambda i: True)
        assert running.expires_s > time.time() and running.expires_s > created.expires_s
        later = datetime.now(UTC) + timedelta(days=2)  # the multipart upload looks stale
        assert await proxy.sweeper.sweep_once(now=later) == []
        other = service_for(proxy)  # the tus sweeper of another instance
        assert await sweep_once(other) == 0
        (mpu,) = await s3.list_multipart(prefix)
        assert await other.store.owns_multipart(mpu.key, mpu.upload_id)
    finally:
        release.set()
        r = await sent
    assert r.status == 204 and r.headers["Upload-Offset"] == str(len(data))
    r.release()
    await check_stored(s3, prefix, url, data)
