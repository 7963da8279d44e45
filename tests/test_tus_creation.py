"""What a tus creation costs and who may make how many: no S3 multipart upload until the
first full part, small uploads stored by one PutObject, orphaned multipart uploads
swept, and a cap on unfinished uploads per principal."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tus_helpers import (
    TUS,
    create,
    metadata,
    only_objects,
    patch,
    service_for,
    sha256_hex,
    state_keys,
    store_for,
    tus_sections,
)

from proxy.sweeper import StaleSweeper

from conftest import MiB, StartProxy, assert_nothing_left, get_object
from obs_helpers import RawRequest, scrape, value


async def s3_calls(url: str, operation: str) -> float:
    samples = await scrape(url)
    name = "proxy_storage_request_duration_seconds_count"
    return value(samples, name, operation=operation) or 0


# -- lazy multipart creation -------------------------------------------------------------


async def test_creation_opens_no_multipart_upload(
    start_proxy: StartProxy, http: Any, s3: Any, prefix: str
) -> None:
    """A creation is one small state object: a flood of them leaves no multipart upload
    open in S3 (they used to stay for a day each)."""
    proxy = await start_proxy(**tus_sections(prefix))
    urls = [await create(http, proxy.url, 100 * MiB) for _ in range(5)]
    assert await s3.list_multipart(prefix) == []
    assert len(await state_keys(s3, prefix)) == 5  # the info objects, nothing else
    assert await s3_calls(proxy.url, "create_multipart_upload") == 0
    r = await patch(http, urls[0], 0, os.urandom(MiB))  # a pending tail: still no part
    assert r.status == 204
    assert await s3.list_multipart(prefix) == []
    r = await patch(http, urls[0], MiB, os.urandom(5 * MiB))  # the first full part
    assert r.status == 204
    (mpu,) = await s3.list_multipart(prefix)
    loaded = await store_for(s3, prefix).load(urls[0].rsplit("/", 1)[1])
    assert loaded is not None and loaded[0].multipart_id == mpu.upload_id
    for url in urls:
        async with http.delete(url, headers=TUS) as r:
            assert r.status == 204
    await assert_nothing_left(s3, prefix)


@pytest.mark.parametrize("cuts", [[1000], [400, 1000], [0, 5 * MiB - 1]])
async def test_an_upload_below_one_part_is_one_put_object(
    start_proxy: StartProxy, http: Any, s3: Any, prefix: str, cuts: list[int]
) -> None:
    """No multipart upload at all: the last PATCH stores the whole object, sha256 included."""
    proxy = await start_proxy(**tus_sections(prefix))
    size = cuts[-1]
    data = os.urandom(size)
    meta = metadata(filename="small.txt", filetype="text/plain")
    url = await create(http, proxy.url, size, **{"Upload-Metadata": meta})
    start = 0
    for end in cuts:
        r = await patch(http, url, start, data[start:end])
        assert r.status == 204, r.status
        start = end
    assert r.headers["Upload-SHA256"] == sha256_hex(data)
    key = f"{prefix}{url.rsplit('/', 1)[1]}/small.txt"
    body, meta_out = await get_object(s3, key)
    assert body == data and meta_out["sha256"] == sha256_hex(data)
    assert meta_out["filename"] == "small.txt"
    assert (await s3.head(key)).content_type == "text/plain"
    assert await s3_calls(proxy.url, "create_multipart_upload") == 0
    assert await s3_calls(proxy.url, "complete_multipart_upload") == 0
    assert await only_objects(s3, prefix) == [key]  # no state, no multipart upload


async def test_a_put_interrupted_before_its_state_save_is_recognised(
    start_proxy: StartProxy, http: Any, s3: Any, prefix: str
) -> None:
    """The whole object was stored but the daemon died before saving "completing": the
    client's retry finds the object, recognises it as this upload's (size, sha256 and tus
    id) and completes; an object that is not this upload's is a 409."""
    proxy = await start_proxy(**tus_sections(prefix))
    data = os.urandom(1000)
    url = await create(http, proxy.url, len(data))
    upload_id = url.rsplit("/", 1)[1]
    key = f"{prefix}{upload_id}"
    mine = {"tus-id": upload_id, "sha256": sha256_hex(data)}
    await s3.put_object(
        key, data, metadata=mine, content_type="x/y", checksum=None, if_none_match=True
    )
    r = await patch(http, url, 0, data)
    assert (r.status, r.headers["Upload-SHA256"]) == (204, sha256_hex(data))
    assert await only_objects(s3, prefix) == [key]
    await s3.delete_object(key)

    url = await create(http, proxy.url, len(data))
    other = f"{prefix}{url.rsplit('/', 1)[1]}"
    await s3.put_object(
        other, b"x" * 1000, metadata={}, content_type="x/y", checksum=None, if_none_match=True
    )
    r = await patch(http, url, 0, data)
    assert r.status == 409
    async with http.delete(url, headers=TUS) as r:
        assert r.status == 204
    assert (await get_object(s3, other))[0] == b"x" * 1000  # someone else's: left alone
    await s3.delete_object(other)
    await assert_nothing_left(s3, prefix)


async def test_an_unsaved_multipart_upload_is_swept(
    start_proxy: StartProxy, http: Any, s3: Any, prefix: str
) -> None:
    """A PATCH that created the multipart upload and died before its id reached the state
    leaves an orphan: claimed while a PATCH may still save it (lease held), swept after."""
    proxy = await start_proxy(**tus_sections(prefix))
    url = await create(http, proxy.url, 20 * MiB)
    upload_id = url.rsplit("/", 1)[1]
    key = f"{prefix}{upload_id}"
    orphan = await s3.create_multipart(key, metadata={}, content_type="x/y")
    svc = service_for(proxy)
    lease = await svc.store.acquire(upload_id, by=None)  # as a running PATCH holds it
    assert await svc.store.owns_multipart(key, orphan)
    await lease.release()
    assert not await svc.store.owns_multipart(key, orphan)
    sweeper = StaleSweeper(s3, prefix, older_than_s=3600, is_live=proxy.runtime.upload_is_live)
    later = datetime.now(UTC) + timedelta(hours=2)
    assert [u.upload_id for u in await sweeper.sweep_once(now=later)] == [orphan]
    # The upload itself is fine: its next full part creates a multipart upload of its own.
    r = await patch(http, url, 0, os.urandom(6 * MiB))
    assert r.status == 204
    (mpu,) = await s3.list_multipart(prefix)
    assert mpu.upload_id != orphan and await svc.store.owns_multipart(key, mpu.upload_id)
    async with http.delete(url, headers=TUS) as r:
        assert r.status == 204
    await assert_nothing_left(s3, prefix)


async def test_a_running_patch_saves_the_multipart_id_it_created(
    start_proxy: StartProxy, http: Any, s3: Any, prefix: str
) -> None:
    """Even a PATCH whose parts cannot be checkpointed (it carries Upload-Checksum) saves
    the multipart id at its next lease renewal, so the id is not left to a final save."""
    proxy = await start_proxy(**tus_sections(prefix, lock_lease_s=3))  # renewal every 1 s
    size = 8 * MiB
    data = os.urandom(size)
    url = await create(http, proxy.url, size)
    upload_id = url.rsplit("/", 1)[1]
    digest = base64.b64encode(hashlib.sha1(data).digest()).decode()
    req = await RawRequest.open(
        proxy.host,
        proxy.port,
        f"PATCH /files/{upload_id} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
        "Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
        f"Upload-Checksum: sha1 {digest}\r\nContent-Length: {size}\r\n\r\n",
    )
    try:
        await req.send(data[: 6 * MiB])
        store = store_for(s3, prefix)
        for _ in range(200):
            (mpu,) = await s3.list_multipart(prefix) or (None,)
            loaded = await store.load(upload_id)
            assert loaded is not None
            if mpu is not None and loaded[0].multipart_id == mpu.upload_id:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the multipart id never reached the state mid-PATCH")
        assert loaded[0].parts == ()  # checksummed: nothing committed before the end
        await req.send(data[6 * MiB :])
        status, headers, _ = await req.response()
        assert status == 204 and headers["upload-sha256"] == sha256_hex(data)
    finally:
        req.close()
    key = f"{prefix}{upload_id}"
    assert (await get_object(s3, key))[0] == data
    await s3.delete_object(key)
    await assert_nothing_left(s3, prefix)
