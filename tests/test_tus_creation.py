"""What a tus creation costs and who may make how many: no S3 multipart upload until the
first full part, small uploads stored by one PutObject, orphaned multipart uploads
swept, and a cap on unfinished uploads per principal."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sec_http import Answer, answers_to, build, connect
from tus_helpers import (
    TUS,
    create,
    marker_keys,
    metadata,
    only_objects,
    patch,
    service_for,
    sha256_hex,
    sid,
    state_keys,
    store_for,
    tus_sections,
)
from wrapped import Wrapped

from proxy.auth import hash_token
from proxy.config import ConfigError, from_dict
from proxy.tus.maintenance import sweep_once

from conftest import MiB, StartProxy, assert_nothing_left, get_object, until
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
    assert len(await marker_keys(s3, prefix)) == 5  # and their places under the cap
    assert await s3_calls(proxy.url, "create_multipart_upload") == 0
    r = await patch(http, urls[0], 0, os.urandom(MiB))  # a pending tail: still no part
    assert r.status == 204
    assert await s3.list_multipart(prefix) == []
    r = await patch(http, urls[0], MiB, os.urandom(5 * MiB))  # the first full part
    assert r.status == 204
    (mpu,) = await s3.list_multipart(prefix)
    loaded = await store_for(s3, prefix).load(sid(urls[0]))
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
    key = f"{prefix}tus/{sid(url)}/small.txt"
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
    id) and completes; an object that is not this upload's fails it (410, gone)."""
    proxy = await start_proxy(**tus_sections(prefix))
    data = os.urandom(1000)
    url = await create(http, proxy.url, len(data))
    upload_id = sid(url)
    key = f"{prefix}tus/{upload_id}"
    mine = {"tus-id": upload_id, "sha256": sha256_hex(data)}
    await s3.put_object(
        key, data, metadata=mine, content_type="x/y", checksum=None, if_none_match=True
    )
    r = await patch(http, url, 0, data)
    assert (r.status, r.headers["Upload-SHA256"]) == (204, sha256_hex(data))
    assert await only_objects(s3, prefix) == [key]
    await s3.delete_object(key)

    url = await create(http, proxy.url, len(data))
    other = f"{prefix}tus/{sid(url)}"
    await s3.put_object(
        other, b"x" * 1000, metadata={}, content_type="x/y", checksum=None, if_none_match=True
    )
    r = await patch(http, url, 0, data)
    assert r.status == 410  # failed for good, as above one part: a 409 means "HEAD, retry"
    async with http.delete(url, headers=TUS) as r:
        assert r.status == 404  # and gone
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
    upload_id = sid(url)
    key = f"{prefix}tus/{upload_id}"
    orphan = await s3.create_multipart(key, metadata={}, content_type="x/y")
    svc = service_for(proxy)
    lease = await svc.store.acquire(upload_id, by=None)  # as a running PATCH holds it
    assert await svc.store.owns_multipart(key, orphan)
    await lease.release()
    assert not await svc.store.owns_multipart(key, orphan)
    # The app's own stale-multipart sweeper (older_than: a day by default).
    later = datetime.now(UTC) + timedelta(days=2)
    assert [u.upload_id for u in await proxy.sweeper.sweep_once(now=later)] == [orphan]
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
    upload_id = sid(url)
    digest = base64.b64encode(hashlib.sha1(data).digest()).decode()
    req = await RawRequest.open(
        proxy.host,
        proxy.port,
        f"PATCH /files/{url.rsplit('/', 1)[1]} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
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
    key = f"{prefix}tus/{upload_id}"
    assert (await get_object(s3, key))[0] == data
    await s3.delete_object(key)
    await assert_nothing_left(s3, prefix)


# -- the cap on unfinished uploads --------------------------------------------------------

TOKEN_A = "alice-token-0123456789abcdef"
TOKEN_B = "bob-token-0123456789abcdef00"
A = {"Authorization": f"Bearer {TOKEN_A}"}
B = {"Authorization": f"Bearer {TOKEN_B}"}


def capped(prefix: str, cap: int, **auth: Any) -> dict[str, Any]:
    tokens = [hash_token(TOKEN_A), hash_token(TOKEN_B)]
    return {
        "auth": {"mode": "required", "tokens": tokens, **auth},
        **tus_sections(prefix, max_unfinished_per_principal=cap),
    }


async def post(http: Any, base: str, headers: dict[str, str]) -> tuple[int, Any, Any]:
    h = {**TUS, "Upload-Length": "100", **headers}
    async with http.post(f"{base}/files/", headers=h) as r:
        body = await r.json() if r.status >= 400 else None
        return r.status, r.headers, body if body is not None else r.headers.get("Location")


async def test_unfinished_uploads_are_capped_per_token_across_instances(
    start_proxy: StartProxy, http: Any, s3: Any, prefix: str
) -> None:
    one = await start_proxy(**capped(prefix, 3))
    two = await start_proxy(**capped(prefix, 3))  # another instance on the same bucket
    urls = [
        f"{one.url}{(await post(http, one.url, A))[2]}",
        f"{two.url}{(await post(http, two.url, A))[2]}",
        f"{one.url}{(await post(http, one.url, A))[2]}",
    ]
    for base in (one.url, two.url):
        status, headers, body = await post(http, base, A)
        assert (status, body["code"]) == (429, "ERR_TOO_MANY_UNFINISHED_UPLOADS")
        assert int(headers["Retry-After"]) > 0
    assert (await post(http, one.url, B))[0] == 201  # B has a cap of its own
    # A zero-length upload is complete on arrival: it takes no place.
    assert (await post(http, one.url, {**A, "Upload-Length": "0"}))[0] == 201
    # Terminating or completing an upload frees its place.
    async with http.delete(urls[0], headers={**TUS, **A}) as r:
        assert r.status == 204
    urls[0] = f"{two.url}{(await post(http, two.url, A))[2]}"
    assert (await post(http, one.url, A))[0] == 429
    r = await patch(http, urls[1], 0, b"x" * 100, **A)
    assert r.status == 204
    assert (await post(http, one.url, A))[0] == 201
    for key in [o.key for o in await s3.list_objects(prefix) if "/.tus/" not in o.key]:
        await s3.delete_object(key)  # the completed uploads
    for upload_id in await store_for(s3, prefix).list_ids():
        await service_for(one).terminate(await service_for(one).store.acquire(upload_id, by=None))
    await assert_nothing_left(s3, prefix)  # every marker went with its upload


async def test_a_burst_of_creations_never_passes_the_cap(
    start_proxy: StartProxy, http: Any, s3: Any, prefix: str
) -> None:
    """The issue's flood (it left an open multipart upload per POST), with the shipped
    cap of 20 and auth off: concurrent creations racing for the last places, never more
    than the cap admitted, no multipart upload opened."""
    proxy = await start_proxy(**tus_sections(prefix))
    results = await asyncio.gather(*(post(http, proxy.url, {}) for _ in range(30)))
    statuses = sorted(r[0] for r in results)
    admitted = statuses.count(201)
    assert 1 <= admitted <= 20 and statuses.count(429) == 30 - admitted, statuses
    assert len(await store_for(s3, prefix).list_ids()) == admitted
    assert await s3.list_multipart(prefix) == []


async def test_with_auth_off_the_cap_is_per_client_address(
    start_proxy: StartProxy, http: Any, prefix: str
) -> None:
    proxy = await start_proxy(
        server={"trusted_proxies": ["127.0.0.1/32"]},
        **tus_sections(prefix, max_unfinished_per_principal=1),
    )
    first = {"X-Forwarded-For": "192.0.2.1"}
    second = {"X-Forwarded-For": "192.0.2.2"}
    assert (await post(http, proxy.url, first))[0] == 201
    assert (await post(http, proxy.url, first))[0] == 429
    assert (await post(http, proxy.url, second))[0] == 201


async def test_the_sweeper_prunes_markers_left_without_an_upload(
    start_proxy: StartProxy, http: Any, s3: Any, prefix: str
) -> None:
    proxy = await start_proxy(**capped(prefix, 3))
    url = f"{proxy.url}{(await post(http, proxy.url, A))[2]}"
    store = store_for(s3, prefix)
    (live_marker,) = await marker_keys(s3, prefix)
    folder = live_marker.rsplit("/", 1)[0]
    old = f"{folder}/{int(time.time() - 3600)}-{'a' * 32}"  # a crash before the info write
    young = f"{folder}/{int(time.time())}-{'b' * 32}"  # a creation in progress
    for key in (old, young):
        await s3.put_conditional(key, b"", if_none_match=True)
    await sweep_once(service_for(proxy))
    left = set(await marker_keys(s3, prefix))
    assert left == {live_marker, young}
    await s3.delete_object(young)
    async with http.delete(url, headers={**TUS, **A}) as r:
        assert r.status == 204
    assert await store.list_ids() == []
    await assert_nothing_left(s3, prefix)


# -- a creation refused for a client slot ------------------------------------------------

OCTET_BODY = {"Content-Type": "application/offset+octet-stream"}
V8 = {"Upload-Draft-Interop-Version": "8"}
SLOT_REFUSED = {
    "tus": {**TUS, **OCTET_BODY, "Upload-Length": "10000"},
    "tus-partial": {**TUS, **OCTET_BODY, "Upload-Length": "10000", "Upload-Concat": "partial"},
    "ietf": {**V8, "Upload-Complete": "?0", "Upload-Length": "10000"},
}


async def answers(
    port: int, method: str, path: str, headers: dict[str, str], body: bytes
) -> list[Answer]:
    return await answers_to(port, build(method, path, {**headers, "Connection": "close"}, body))


async def take_the_slot(proxy: Any) -> asyncio.StreamWriter:
    """A PUT that holds the client's one upload slot until its connection is closed."""
    _, writer = await connect(proxy.port)
    writer.write(build("PUT", "/uploads/filler", {"Content-Length": str(MiB)}) + b"x" * 1000)
    await writer.drain()

    async def held() -> bool:
        return bool(proxy.uploads.slots.in_use == 1)

    await until(held, "the filler PUT holds its slot")
    return writer


async def give_back(proxy: Any, writer: asyncio.StreamWriter) -> None:
    writer.close()

    async def free() -> bool:
        return bool(proxy.uploads.slots.in_use == 0)

    await until(free, "the filler PUT let its slot go")


@pytest.mark.parametrize("kind", SLOT_REFUSED)
async def test_a_creation_refused_for_a_slot_leaves_nothing(
    start_proxy: StartProxy, s3: Any, prefix: str, kind: str
) -> None:
    """With the client's upload slots full, a creation with a body is refused before
    anything exists: no info, no place under the cap (20 such refusals used to lock the
    principal out of tus for a day), no group, no 104 announcing an upload that is not
    there; the refused one's lease used to stay held too."""
    proxy = await start_proxy(
        limits={"max_uploads_per_client": 1}, **tus_sections(prefix, send_104=True)
    )
    filler = await take_the_slot(proxy)
    try:
        got = await answers(proxy.port, "POST", "/files/", SLOT_REFUSED[kind], b"y" * 5000)
        assert [a.status for a in got] == [429], [a.head for a in got]
        assert got[-1].code == "ERR_CLIENT_LIMIT" and "location" not in got[-1].headers
        assert await state_keys(s3, prefix) == []
        assert await marker_keys(s3, prefix) == []
        assert await s3.list_multipart(prefix) == []
    finally:
        await give_back(proxy, filler)
    await assert_nothing_left(s3, prefix)


class GatedCreation(Wrapped):
    """Holds the write that creates an upload's info object until ``go`` is set."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.reached = asyncio.Event()
        self.go = asyncio.Event()

    async def put_conditional(self, key: str, body: Any, **kw: Any) -> str:
        if key.endswith("/info") and kw.get("if_none_match"):
            self.reached.set()
            await self.go.wait()
        etag: str = await self.inner.put_conditional(key, body, **kw)
        return etag


@pytest.mark.parametrize("kind", ["tus", "tus-partial", "ietf"])
async def test_a_creation_that_loses_its_slot_while_being_created_leaves_nothing(
    start_proxy: StartProxy, s3: Any, prefix: str, kind: str
) -> None:
    """The slot checked free before the creation, taken by another upload of the same
    client while the state was written: the creation's body is refused (429), and its
    clean-up removes the upload with the request's own lease (it used to ask for the
    lease again, be refused by its own, and leave the upload and its place behind)."""
    store = GatedCreation(s3)
    proxy = await start_proxy(
        storage=store, limits={"max_uploads_per_client": 1}, **tus_sections(prefix)
    )
    creation = asyncio.create_task(
        answers(proxy.port, "POST", "/files/", SLOT_REFUSED[kind], b"y" * 5000)
    )
    await store.reached.wait()
    filler = await take_the_slot(proxy)
    try:
        store.go.set()
        got = await creation
        assert [a.status for a in got] == [429], [a.head for a in got]
        assert got[-1].code == "ERR_CLIENT_LIMIT"
        assert await state_keys(s3, prefix) == []
        assert await marker_keys(s3, prefix) == []
        assert await s3.list_multipart(prefix) == []
    finally:
        store.go.set()
        await give_back(proxy, filler)
    await assert_nothing_left(s3, prefix)


def test_cap_config() -> None:
    assert from_dict({"auth": {"mode": "none"}}).tus.max_unfinished_per_principal == 20
    assert from_dict({"tus": {"max_unfinished_per_principal": 0}, "auth": {"mode": "none"}})
    with pytest.raises(ConfigError, match="max_unfinished_per_principal"):
        from_dict({"tus": {"max_unfinished_per_principal": -1}, "auth": {"mode": "none"}})
