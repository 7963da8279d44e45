"""tus completion only ever answers 204 for exactly the client's bytes, under its own key.

* Plain uploads cannot write where tus objects go (``[tus] object_prefix``), and a
  completion accepts an object at its key only if it proves to be its own (tus id in its
  metadata, size, multipart ETag); otherwise the upload fails honestly: 410, its parts
  aborted, its state deleted, the other object left alone.
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

import aiohttp
import pytest
from tus_helpers import (
    TUS,
    create,
    head_offset,
    metadata,
    patch,
    sha256_hex,
    store_for,
    tus_sections,
)
from wrapped import Wrapped

from proxy.errors import StorageUnavailable
from proxy.storage.base import CompletedPart, PartChecksum, multipart_etag
from proxy.tus_state import UploadInfo

from conftest import MiB, StartProxy, get_object, s3_for

SIZE = 6 * MiB + 7  # one 5 MiB part and a 1 MiB + 7 byte last part


@pytest.fixture
async def http():  # type: ignore[no-untyped-def]
    async with aiohttp.ClientSession() as session:
        yield session


def upload_id(url: str) -> str:
    return url.rsplit("/", 1)[-1]


async def info_of(s3: Any, prefix: str, url_or_id: str) -> UploadInfo:
    loaded = await store_for(s3, prefix).load(upload_id(url_or_id))
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
