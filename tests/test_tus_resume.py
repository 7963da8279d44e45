"""Resuming tus uploads after the connection is cut mid-PATCH: on the same daemon, on a
restarted daemon, on a second instance sharing the bucket.  Plus the lease (two PATCHes
racing) and checkpoints of a running PATCH."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp
from tus_helpers import (
    OCTET,
    TUS,
    create,
    head_offset,
    only_objects,
    service_for,
    sid,
    store_for,
    tus_key,
    tus_sections,
)
from tusclient.client import TusClient

from proxy.tus import hash as tus_hash

from conftest import MiB, data_path, get_object, until

SIZE = 13 * MiB + 4321  # two 5 MiB parts and a tail
CUT_AT = 7 * MiB + 99  # one part stored, 2 MiB + 99 bytes of tail when the cut comes


async def cut_patch(url: str, offset: int, declared: int, body: bytes) -> None:
    """Send a PATCH declaring ``declared`` bytes, send only ``body``, and hang up."""
    parsed = aiohttp.client.URL(url)
    _, writer = await asyncio.open_connection(parsed.host, parsed.port)
    head = (
        f"PATCH {parsed.path} HTTP/1.1\r\nHost: {parsed.host}\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def wait_offset(http: aiohttp.ClientSession, url: str, want: int) -> None:
    """HEAD until the broken PATCH is committed (the server sees the EOF asynchronously)."""
    for _ in range(100):
        if await head_offset(http, url) == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"offset never became {want}; last {await head_offset(http, url)}")


def tuspy_resume(url: str, path: Path, chunk_size: int) -> None:
    """A real client finishing the upload from the offset the server reports."""
    uploader = TusClient(url.rsplit("/", 1)[0] + "/").uploader(
        file_path=str(path), url=url, chunk_size=chunk_size
    )
    uploader.upload()


async def check_stored(s3, prefix: str, url: str, data: bytes) -> None:  # type: ignore[no-untyped-def]
    key = tus_key(prefix, url)
    body, meta = await get_object(s3, key)
    assert body == data
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert await only_objects(s3, prefix) == [key]  # no state, no open multipart upload


async def test_resume_on_the_same_daemon(start_proxy, http, s3, prefix, tmp_path) -> None:
    proxy = await start_proxy(**tus_sections(prefix))
    path = data_path(tmp_path, SIZE, seed=1)
    data = path.read_bytes()
    url = await create(http, proxy.url, SIZE)
    await cut_patch(url, 0, SIZE, data[:CUT_AT])
    await wait_offset(http, url, CUT_AT)  # every byte that arrived is kept, tail included
    await asyncio.to_thread(tuspy_resume, url, path, 4 * MiB)
    await check_stored(s3, prefix, url, data)


async def test_a_cut_right_at_a_part_boundary_still_resumes(
    start_proxy, http, s3, prefix, tmp_path
) -> None:
    """A body that ends exactly when the part buffer is full (clients sending MiB-aligned
    chunks stop there often) must not leave a part-sized pending segment, which every
    following PATCH would refuse."""
    proxy = await start_proxy(**tus_sections(prefix))
    path = data_path(tmp_path, SIZE, seed=4)
    data = path.read_bytes()
    url = await create(http, proxy.url, SIZE)
    await cut_patch(url, 0, SIZE, data[: 2 * MiB])  # a pending segment of 2 MiB
    await wait_offset(http, url, 2 * MiB)
    await cut_patch(url, 2 * MiB, SIZE - 2 * MiB, data[2 * MiB : 5 * MiB])  # buffer full
    await wait_offset(http, url, 5 * MiB)
    await asyncio.to_thread(tuspy_resume, url, path, 4 * MiB)
    await check_stored(s3, prefix, url, data)


async def test_resume_after_a_restart(start_proxy, http, s3, prefix, tmp_path) -> None:
    path = data_path(tmp_path, SIZE, seed=2)
    data = path.read_bytes()
    first = await start_proxy(**tus_sections(prefix))
    url = await create(http, first.url, SIZE)
    await cut_patch(url, 0, SIZE, data[:CUT_AT])
    await wait_offset(http, url, CUT_AT)
    await first.stop()
    # A new process would have nothing of the old one's memory; neither does this app.
    again = await start_proxy(port=first.port, **tus_sections(prefix))
    assert again.url == first.url
    await asyncio.to_thread(tuspy_resume, url, path, 3 * MiB)
    await check_stored(s3, prefix, url, data)


async def test_resume_on_a_second_instance(start_proxy, http, s3, prefix, tmp_path) -> None:
    path = data_path(tmp_path, SIZE, seed=3)
    data = path.read_bytes()
    base_a = (await start_proxy(**tus_sections(prefix))).url
    base_b = (await start_proxy(**tus_sections(prefix))).url
    url_a = await create(http, base_a, SIZE)
    upload_path = url_a[len(base_a) :]
    await cut_patch(url_a, 0, SIZE, data[: 2 * MiB])  # a tail only
    await wait_offset(http, url_a, 2 * MiB)
    url_b = base_b + upload_path
    assert await head_offset(http, url_b) == 2 * MiB
    await cut_patch(url_b, 2 * MiB, SIZE - 2 * MiB, data[2 * MiB : CUT_AT])
    await wait_offset(http, url_a, CUT_AT)
    await asyncio.to_thread(tuspy_resume, url_a, path, SIZE)  # back on A, one PATCH
    await check_stored(s3, prefix, url_a, data)


async def test_sha256_without_a_resumable_hash_rereads_the_object(
    start_proxy, http, s3, prefix, tmp_path, monkeypatch
) -> None:
    """An instance without OpenSSL's SHA256_* cannot save the hash state; the instance
    finishing the upload then hashes the stored object, and the result is still right."""
    proxy = await start_proxy(**tus_sections(prefix))
    path = data_path(tmp_path, SIZE, seed=4)
    data = path.read_bytes()
    url = await create(http, proxy.url, SIZE)
    with monkeypatch.context() as m:
        m.setattr(tus_hash, "_LIB", None)
        await cut_patch(url, 0, SIZE, data[:CUT_AT])
        await wait_offset(http, url, CUT_AT)
    loaded = await service_for(proxy).store.load(sid(url))
    assert loaded is not None and loaded[0].parts and loaded[0].sha256_state is None
    await asyncio.to_thread(tuspy_resume, url, path, SIZE)
    await check_stored(s3, prefix, url, data)


async def slow_body(first: bytes, release: asyncio.Event, rest: bytes):  # type: ignore[no-untyped-def]
    yield first
    await release.wait()
    yield rest


async def test_racing_patches_one_wins_the_other_gets_423(start_proxy, http, s3, prefix) -> None:
    base_a = (await start_proxy(**tus_sections(prefix))).url
    base_b = (await start_proxy(**tus_sections(prefix))).url
    data = bytes(range(256)) * 4096 * 7  # 7 MiB
    url = await create(http, base_a, len(data))
    release = asyncio.Event()
    headers = {**OCTET, "Upload-Offset": "0", "Content-Length": str(len(data))}
    first = asyncio.ensure_future(
        http.patch(url, data=slow_body(data[:MiB], release, data[MiB:]), headers=headers)
    )
    try:

        async def leased() -> bool:
            loaded = await store_for(s3, prefix).load(sid(url))
            return bool(loaded and loaded[0].lease_owner)

        await until(leased, "the first PATCH to hold the lease")
        for base in (base_a, base_b):  # same instance and another one
            u = base + url[len(base_a) :]
            async with http.patch(u, data=data, headers=headers) as r:
                assert r.status == 423
            async with http.delete(u, headers=TUS) as r:
                assert r.status == 423
    finally:
        release.set()
    r = await first
    assert r.status == 204 and r.headers["Upload-Offset"] == str(len(data))
    r.release()
    await check_stored(s3, prefix, url, data)


async def test_a_long_patch_checkpoints_its_parts(start_proxy, http, s3, prefix) -> None:
    """With a 3 s lease the keeper writes every second: parts stored by a running PATCH
    become durable (and visible to HEAD) before the PATCH ends."""
    proxy = await start_proxy(**tus_sections(prefix, lock_lease_s=3))
    data = bytes(range(256)) * 4096 * 6  # 6 MiB: one 5 MiB part, then the PATCH stalls
    url = await create(http, proxy.url, len(data) + 10)
    release = asyncio.Event()
    headers = {**OCTET, "Upload-Offset": "0", "Content-Length": str(len(data))}
    first = asyncio.ensure_future(
        http.patch(
            url, data=slow_body(data[: 5 * MiB + 1], release, data[5 * MiB + 1 :]), headers=headers
        )
    )
    await wait_offset(http, url, 5 * MiB)
    release.set()
    r = await first
    assert r.status == 204 and r.headers["Upload-Offset"] == str(len(data))
    r.release()
    r2 = await http.patch(
        url, data=b"0123456789", headers={**OCTET, "Upload-Offset": str(len(data))}
    )
    assert r2.status == 204
    r2.release()
    await check_stored(s3, prefix, url, data + b"0123456789")
