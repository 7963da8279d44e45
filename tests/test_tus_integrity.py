"""tus completion only ever answers 204 for exactly the client's bytes, under its own key.

* Plain uploads cannot write where tus objects go (``[tus] object_prefix``), and a
  completion accepts an object at its key only if it proves to be its own (tus id in its
  metadata, size, multipart ETag); otherwise the upload fails honestly: 410, its parts
  aborted, its state deleted, the other object left alone.
* A PATCH whose lease runs out starts no new part; the parts are checked with ListParts
  before CompleteMultipartUpload; a completion the store keeps refusing ends.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from tus_helpers import (
    TUS,
    create,
    head_offset,
    metadata,
    patch,
    service_for,
    sha256_hex,
    sid,
    store_for,
    tus_sections,
)
from wrapped import Wrapped

from proxy.auth import ANONYMOUS
from proxy.errors import LeaseLost, StorageError, StorageUnavailable
from proxy.storage.base import Body, CompletedPart, PartChecksum, multipart_etag
from proxy.tus.completion import MAX_COMPLETION_FAILURES
from proxy.tus.maintenance import sweep_once
from proxy.tus.service import quota_of
from proxy.tus.state import Part, TusStore, UploadInfo
from proxy.web.tus_common import new_upload

from conftest import MiB, StartProxy, assert_nothing_left, get_object, s3_for

SIZE = 6 * MiB + 7  # one 5 MiB part and a 1 MiB + 7 byte last part


@pytest.fixture
async def http():  # type: ignore[no-untyped-def]
    async with aiohttp.ClientSession() as session:
        yield session


def upload_id(url: str) -> str:
    return sid(url)


async def info_of(s3: Any, prefix: str, url_or_id: str) -> UploadInfo:
    """The state of the upload at a URL, or under a storage id."""
    loaded = await store_for(s3, prefix).load(
        upload_id(url_or_id) if "/" in url_or_id else url_or_id
    )
    assert loaded is not None
    return loaded[0]


async def with_a_part(http: aiohttp.ClientSession, base: str, data: bytes, **headers: str) -> str:
    """A tus upload of ``data`` whose first PATCH stored one part and left the rest to send."""
    url = await create(http, base, len(data), **headers)
    r = await patch(http, url, 0, data[: 5 * MiB + 1])
    assert r.status == 204
    return url


async def assert_failed_upload(s3: Any, prefix: str, keep: dict[str, bytes]) -> None:
    """Nothing of the failed upload left (no state, no open multipart upload); the objects
    in ``keep`` (someone else's) untouched."""
    assert await s3.list_multipart(prefix) == []
    assert sorted(o.key for o in await s3.list_objects(prefix)) == sorted(keep)
    for key, data in keep.items():
        body, meta = await get_object(s3, key)
        assert body == data and "sha256" not in meta and "tus-id" not in meta


# -- key squatting ----------------------------------------------------------------------


async def test_a_plain_upload_cannot_take_a_tus_uploads_key(
    start_proxy: StartProxy, http: aiohttp.ClientSession, s3: Any, prefix: str
) -> None:
    """The issue: a PUT to the tus upload's final key before it completes made the tus
    completion take the squatter's object (same size) for its own: 204 with the victim's
    digest, the attacker's bytes stored under it."""
    proxy = await start_proxy(**tus_sections(prefix))
    victim, attacker = os.urandom(SIZE), os.urandom(SIZE)
    url = await with_a_part(http, proxy.url, victim, **{"Upload-Metadata": metadata(filename="a")})
    key = (await info_of(s3, prefix, url)).key
    assert key == f"{prefix}tus/{upload_id(url)}/a"
    async with http.put(f"{proxy.url}/uploads/{key[len(prefix) :]}", data=attacker) as r:
        assert r.status == 400 and (await r.json())["code"] == "ERR_INVALID_KEY"
    async with http.put(f"{proxy.url}/uploads/tus", data=b"x") as r:  # nor the folder's name
        assert r.status == 400 and (await r.json())["code"] == "ERR_INVALID_KEY"
    r = await patch(http, url, 5 * MiB + 1, victim[5 * MiB + 1 :])
    assert r.status == 204 and r.headers["Upload-SHA256"] == sha256_hex(victim)
    body, meta = await get_object(s3, key)
    assert body == victim and meta["sha256"] == sha256_hex(victim)


@pytest.mark.parametrize("squat", ["same size", "folder"])
async def test_completion_refuses_an_object_that_is_not_its_own(
    start_proxy: StartProxy, http: aiohttp.ClientSession, s3: Any, prefix: str, squat: str
) -> None:
    """An object put at the key behind the proxy's back (same size, or objects under
    ``key/``) is not taken for the upload's: 410, parts aborted, state gone, theirs kept."""
    proxy = await start_proxy(**tus_sections(prefix))
    victim, attacker = os.urandom(SIZE), os.urandom(SIZE)
    url = await with_a_part(http, proxy.url, victim)
    key = (await info_of(s3, prefix, url)).key
    other = key if squat == "same size" else f"{key}/x"
    await s3.put_object(
        other, attacker, metadata={}, content_type="x/y", checksum=None, if_none_match=True
    )
    assert len(await s3.list_multipart(prefix)) == 1  # what the failure must abort
    r = await patch(http, url, 5 * MiB + 1, victim[5 * MiB + 1 :])
    assert r.status == 410 and "Upload-SHA256" not in r.headers
    await assert_failed_upload(s3, prefix, {other: attacker})
    async with http.head(url, headers=TUS) as h:
        assert h.status == 404


async def test_an_empty_completion_refuses_an_object_that_is_not_its_own(
    start_proxy: StartProxy, http: aiohttp.ClientSession, s3: Any, prefix: str
) -> None:
    """A deferred length that ends at 0 completes with an empty PutObject; its "key taken"
    used to be swallowed as "an earlier attempt of ours"."""
    proxy = await start_proxy(**tus_sections(prefix))
    url = await create(http, proxy.url, None)
    key = (await info_of(s3, prefix, url)).key
    await s3.put_object(
        key, b"", metadata={}, content_type="x/y", checksum=None, if_none_match=True
    )
    r = await patch(http, url, 0, b"", **{"Upload-Length": "0"})
    assert r.status == 410
    await assert_failed_upload(s3, prefix, {key: b""})


class LoseAnswer(Wrapped):
    """The first call of ``op`` is carried out and then reported failed, as if every retry
    of a request whose answer was lost had failed too."""

    def __init__(self, inner: Any, op: str) -> None:
        super().__init__(inner)
        self.op = op

    async def _lose(self, name: str, result: Any) -> Any:
        self.calls[name] += 1
        if self.calls[name] == 1:
            raise StorageUnavailable("injected: the answer was lost")
        return result

    async def complete_multipart(self, *a: Any, **kw: Any) -> str:
        done = await self.inner.complete_multipart(*a, **kw)
        return await self._lose("complete_multipart", done) if self.op == "complete" else done

    async def put_object(self, *a: Any, **kw: Any) -> str:
        done = await self.inner.put_object(*a, **kw)
        return await self._lose("put_object", done) if self.op == "put" else done


@pytest.mark.parametrize("size", [SIZE, 0])
async def test_a_completion_whose_answer_was_lost_recognises_its_own_object(
    start_proxy: StartProxy,
    seaweed: Any,
    http: aiohttp.ClientSession,
    s3: Any,
    prefix: str,
    size: int,
) -> None:
    """The other side of the ownership check: our own object (tus id, size, ETag) is ours."""
    async with s3_for(seaweed) as real:
        lossy = LoseAnswer(real, "complete" if size else "put")
        proxy = await start_proxy(storage=lossy, **tus_sections(prefix))
        data = os.urandom(size)
        url = await create(http, proxy.url, None)
        r = await patch(http, url, 0, data, **{"Upload-Length": str(size)})
        assert r.status == 503  # the answer was lost: the upload stays completing
        assert await head_offset(http, url) == size
        r = await patch(http, url, size, b"")
        assert r.status == 204 and r.headers["Upload-SHA256"] == sha256_hex(data)
        assert sum(lossy.calls.values()) >= 1  # the first answer was lost
    key = f"{prefix}tus/{upload_id(url)}"
    body, meta = await get_object(s3, key)
    assert body == data and meta["sha256"] == sha256_hex(data)
    assert [o.key for o in await s3.list_objects(prefix)] == [key]


async def test_seaweedfs_multipart_etags_follow_s3s_formula(s3: Any, prefix: str) -> None:
    """The ownership check computes the ETag the completed object must have; SeaweedFS
    must give it S3's (MD5 of the part MD5s, "-", the count), with per-part checksums too."""
    key = f"{prefix}etag"
    mpu = await s3.create_multipart(key, metadata={}, content_type="x/y")
    a, b = os.urandom(5 * MiB), os.urandom(1000)
    md5 = PartChecksum("md5", base64.b64encode(hashlib.md5(b).digest()).decode())
    parts = [
        CompletedPart(1, await s3.upload_part(key, mpu, 1, a, None)),
        CompletedPart(2, await s3.upload_part(key, mpu, 2, b, md5)),
    ]
    assert parts[0].etag.strip('"') == hashlib.md5(a).hexdigest()
    etag = await s3.complete_multipart(key, mpu, parts, if_none_match=True)
    assert etag.strip('"') == multipart_etag(parts)
    obj = await s3.head(key)
    assert obj is not None and obj.etag.strip('"') == multipart_etag(parts)


# -- lease loss, part checks, completion budget ----------------------------------------


class CountParts(Wrapped):
    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.numbers: list[int] = []
        self.stored = asyncio.Event()

    async def upload_part(
        self, key: str, upload_id: str, number: int, body: Body, checksum: PartChecksum | None
    ) -> str:
        self.numbers.append(number)
        etag = await self.inner.upload_part(key, upload_id, number, body, checksum)
        self.stored.set()
        return str(etag)


async def test_a_writer_starts_no_part_once_its_lease_runs_out(
    start_proxy: StartProxy, seaweed: Any, s3: Any, prefix: str
) -> None:
    """Renewals failing (or a stalled daemon) let the lease run out while the PATCH goes
    on; another request may then take the upload over, and a part we start could land
    over its part of the same number.  So no part starts in the last third of the lease:
    the PATCH ends (423) and keeps the parts stored before."""
    async with s3_for(seaweed) as real:
        counting = CountParts(real)
        proxy = await start_proxy(storage=counting, **tus_sections(prefix))
        now = [time.time()]
        lease_s = 300.0  # the keeper (every lease_s / 3 of real time) stays out of the way
        store = TusStore(counting, f"{prefix}.tus/", lease_s, clock=lambda: now[0])
        svc = service_for(proxy, store)
        _, lease = await svc.create(
            new_upload(svc, "", 12 * MiB, ANONYMOUS, quota_of(ANONYMOUS, "127.0.0.1")),
            leased=True,
        )
        assert lease is not None
        data = os.urandom(12 * MiB)

        async def body() -> AsyncIterator[bytes]:
            yield data[: 5 * MiB]
            yield data[5 * MiB : 6 * MiB]  # part 1 goes out
            await asyncio.wait_for(counting.stored.wait(), 30)
            now[0] += lease_s * 2 / 3 + 1  # less than a third of the lease is left
            yield data[6 * MiB :]  # fills part 2, which must not be sent

        with pytest.raises(LeaseLost):
            await svc.write(lease, body(), declared_bytes=len(data), checksum=None, client_ip=None)
    assert counting.numbers == [1]
    info = await info_of(s3, prefix, lease.info.id)
    assert [p.size for p in info.parts] == [5 * MiB] and info.lease_owner is None


async def test_parts_not_as_recorded_fail_the_upload_before_completing(
    start_proxy: StartProxy, http: aiohttp.ClientSession, s3: Any, prefix: str
) -> None:
    """A part in flight when its lease ran out can land after another request took the
    upload over, over the part it recorded under that number (S3 keeps the last upload).
    ListParts finds it before anything is completed: 410, aborted, state gone, instead of
    a completion the store refuses for ever (or, where it would not check, wrong bytes)."""
    proxy = await start_proxy(**tus_sections(prefix))
    data = os.urandom(SIZE)
    url = await with_a_part(http, proxy.url, data)
    store = store_for(s3, prefix)
    loaded = await store.load(upload_id(url))
    assert loaded is not None
    info, etag = loaded
    # What the store holds as part 1 is not what the info recorded.
    overwritten = Part(f'"{hashlib.md5(b"the late part").hexdigest()}"', info.parts[0].size)
    tampered = replace(info, parts=(overwritten,), rev=info.rev + 1)
    await s3.put_conditional(store.info_key(info.id), tampered.to_json(), if_match=etag)
    assert len(await s3.list_multipart(prefix)) == 1
    r = await patch(http, url, 5 * MiB + 1, data[5 * MiB + 1 :])
    assert r.status == 410
    await assert_nothing_left(s3, prefix)


class RefuseCompletion(Wrapped):
    def __init__(self, inner: Any, error: type[StorageError]) -> None:
        super().__init__(inner)
        self.error = error

    async def complete_multipart(self, *a: Any, **kw: Any) -> str:
        self.calls["complete_multipart"] += 1
        raise self.error("injected: the store refuses to complete")


async def last_patch(
    start_proxy: StartProxy, storage: Any, http: aiohttp.ClientSession, prefix: str
) -> tuple[Any, str, aiohttp.ClientResponse]:
    """A proxy on ``storage``, and the answer to the last PATCH of an upload."""
    proxy = await start_proxy(storage=storage, **tus_sections(prefix))
    data = os.urandom(SIZE)
    url = await with_a_part(http, proxy.url, data)
    return proxy, url, await patch(http, url, 5 * MiB + 1, data[5 * MiB + 1 :])


async def test_a_completion_the_store_keeps_refusing_ends(
    start_proxy: StartProxy, seaweed: Any, http: aiohttp.ClientSession, s3: Any, prefix: str
) -> None:
    """``completing`` used to be retried for ever (every PATCH 502, every sweep): after
    MAX_COMPLETION_FAILURES refusals the upload is failed and cleaned up."""
    async with s3_for(seaweed) as real:
        refusing = RefuseCompletion(real, StorageError)
        _, url, r = await last_patch(start_proxy, refusing, http, prefix)
        for attempt in range(1, MAX_COMPLETION_FAILURES):
            assert r.status == 502
            info = await info_of(s3, prefix, url)
            assert info.completing and info.completion_failures == attempt
            assert len(await s3.list_multipart(prefix)) == 1
            r = await patch(http, url, SIZE, b"")
        assert r.status == 410
        assert refusing.calls["complete_multipart"] == MAX_COMPLETION_FAILURES
    await assert_nothing_left(s3, prefix)


async def test_a_completion_that_keeps_timing_out_ends_at_the_expiry(
    start_proxy: StartProxy, seaweed: Any, http: aiohttp.ClientSession, s3: Any, prefix: str
) -> None:
    """Outages are not counted (a client retrying through a blip must not lose its upload),
    but a completion that has failed for expire_after_s is given up, by the sweeper too."""
    async with s3_for(seaweed) as real:
        down = RefuseCompletion(real, StorageUnavailable)
        proxy, url, r = await last_patch(start_proxy, down, http, prefix)
        assert r.status == 503
        for _ in range(MAX_COMPLETION_FAILURES):
            assert (await patch(http, url, SIZE, b"")).status == 503
        info = await info_of(s3, prefix, url)
        assert info.completing and info.completion_failures == 0
        later = info.expires_s + 1
        store = TusStore(down, f"{prefix}.tus/", 30, clock=lambda: later)
        assert await sweep_once(service_for(proxy, store)) == 1
    await assert_nothing_left(s3, prefix)
