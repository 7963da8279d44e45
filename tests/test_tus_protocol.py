"""tus 1.0.0 core and extensions: headers and status codes, against the real SeaweedFS."""

from __future__ import annotations

import base64
import hashlib
import itertools
import logging
import os
import time
from dataclasses import replace

import pytest
from tus_helpers import (
    OCTET,
    TUS,
    create,
    head_offset,
    metadata,
    only_objects,
    patch,
    service_for,
    sha256_hex,
    sid,
    state_keys,
    tus_key,
    tus_sections,
)

from proxy.tus.maintenance import sweep_once
from proxy.web.tus_common import TUS as TUS_ROUTES

from conftest import MiB, assert_nothing_left, get_object


@pytest.fixture
async def proxy(start_proxy, prefix):  # type: ignore[no-untyped-def]
    return await start_proxy(**tus_sections(prefix))


async def test_options_advertises_what_works(proxy, http) -> None:
    async with http.options(f"{proxy.url}/files/") as r:
        assert r.status == 204
        assert r.headers["Tus-Version"] == "1.0.0"
        assert r.headers["Tus-Resumable"] == "1.0.0"
        assert set(r.headers["Tus-Extension"].split(",")) == {
            "creation",
            "creation-with-upload",
            "creation-defer-length",
            "termination",
            "expiration",
            "checksum",
            "concatenation",  # the store copies parts (tests/test_tus_concat.py)
        }
        assert int(r.headers["Tus-Max-Size"]) == proxy.config.upload.max_upload_size_bytes
        assert set(r.headers["Tus-Checksum-Algorithm"].split(",")) == {"sha1", "md5", "sha256"}
        assert "Access-Control-Allow-Origin" not in r.headers  # CORS is off by default


@pytest.mark.parametrize("version", [None, "0.2.2", "2.0.0"])
async def test_unsupported_version_is_412(proxy, http, version) -> None:
    headers = {"Upload-Length": "10"}
    if version:
        headers["Tus-Resumable"] = version
    async with http.post(f"{proxy.url}/files/", headers=headers) as r:
        assert r.status == 412
        assert r.headers["Tus-Version"] == "1.0.0"
        assert (await r.json())["code"] == "ERR_TUS_VERSION"


async def test_create_head_patch_complete(proxy, http, s3, prefix) -> None:
    data = os.urandom(11 * MiB + 333)  # two full 5 MiB parts and a tail
    meta = metadata(filename="../Holiday: photo.jpg", filetype="image/jpeg", note="ünï")
    url = await create(http, proxy.url, len(data), **{"Upload-Metadata": meta})
    assert url.startswith(f"{proxy.url}/files/")
    async with http.head(url, headers=TUS) as r:
        assert r.status == 200
        assert r.headers["Upload-Offset"] == "0"
        assert r.headers["Upload-Length"] == str(len(data))
        assert r.headers["Upload-Metadata"] == meta
        assert r.headers["Cache-Control"] == "no-store"
        assert r.headers["Tus-Resumable"] == "1.0.0"
        assert "Upload-Expires" in r.headers
    cuts = [0, 3 * MiB, 7 * MiB + 5, len(data)]
    for a, b in itertools.pairwise(cuts):
        r = await patch(http, url, a, data[a:b])
        assert r.status == 204
        assert r.headers["Upload-Offset"] == str(b)
        assert r.headers["Tus-Resumable"] == "1.0.0"
        if b < len(data):
            assert await head_offset(http, url) == b
            assert "Upload-Expires" in r.headers
            assert "Upload-SHA256" not in r.headers
        else:  # the completing PATCH tells the client what was stored
            assert r.headers["Upload-SHA256"] == sha256_hex(data)
    upload_id = sid(url)
    key = f"{prefix}tus/{upload_id}/Holiday_ photo.jpg"
    body, meta_out = await get_object(s3, key)
    assert body == data
    assert meta_out["sha256"] == sha256_hex(data)
    assert meta_out["filename"] == "../Holiday: photo.jpg"
    assert meta_out["note"] == "%C3%BCn%C3%AF"
    assert (await s3.head(key)).content_type == "image/jpeg"
    assert await only_objects(s3, prefix) == [key]  # no state, no multipart left
    # The state is gone, the object answers: complete, with what was stored.
    async with http.head(url, headers=TUS) as r:
        assert r.status == 200
        assert r.headers["Upload-Offset"] == r.headers["Upload-Length"] == str(len(data))
        assert r.headers["Upload-SHA256"] == sha256_hex(data)


async def test_creation_errors(proxy, http) -> None:
    base = f"{proxy.url}/files/"
    cases = [
        ({}, 400),
        ({"Upload-Defer-Length": "2"}, 400),
        ({"Upload-Length": "5", "Upload-Defer-Length": "1"}, 400),
        ({"Upload-Length": "-1"}, 400),
        ({"Upload-Length": str(proxy.config.upload.max_upload_size_bytes + 1)}, 413),
        ({"Upload-Length": "5", "Upload-Metadata": "filename not-base64!"}, 400),
        ({"Upload-Length": "5", "Upload-Metadata": "a YQ==,a YQ=="}, 400),
        ({"Upload-Length": "5", "Upload-Metadata": "a b c"}, 400),
        (
            {
                "Upload-Length": "5",
                "Upload-Metadata": "big " + base64.b64encode(b"x" * 3000).decode(),
            },
            400,
        ),
    ]
    for headers, status in cases:
        async with http.post(base, headers={**TUS, **headers}) as r:
            assert r.status == status, (headers, r.status)
            body = await r.json()
            assert set(body) == {"code", "message"}
            assert r.headers["Tus-Resumable"] == "1.0.0"


@pytest.mark.parametrize("value", ["\u00b2", "\u0661\u0662", "1_0", "+5", "-0", "0x5", "1" * 20])
async def test_integer_headers_are_ascii_digits_only(
    proxy, http, s3, prefix, value, caplog
) -> None:
    """Upload-Length / Upload-Offset are 1*DIGIT (ASCII).  "\u00b2" passed str.isdigit but
    broke int(): a 500 with a traceback; Arabic-Indic "\u0661\u0662" was taken as 12."""
    caplog.set_level(logging.DEBUG)
    async with http.post(f"{proxy.url}/files/", headers={**TUS, "Upload-Length": value}) as r:
        assert r.status == 400, (value, r.status)
        assert (await r.json())["code"] == "ERR_BAD_HEADER"
    url = await create(http, proxy.url, 12)
    r = await patch(http, url, 0, b"x", **{"Upload-Offset": value})
    assert r.status == 400, (value, r.status)
    r = await patch(http, url, 0, b"x", **{"Upload-Length": value})
    assert r.status == 400, (value, r.status)
    assert await head_offset(http, url) == 0
    assert "Traceback" not in caplog.text and "unhandled error" not in caplog.text
    async with http.delete(url, headers=TUS) as r:
        assert r.status == 204
    await assert_nothing_left(s3, prefix)


async def test_patch_errors(proxy, http, s3, prefix) -> None:
    url = await create(http, proxy.url, 10)
    r = await patch(http, url, 0, b"abc", **{"Content-Type": "application/octet-stream"})
    assert r.status == 415
    r = await patch(http, url, 5, b"abc")
    assert r.status == 409
    r = await patch(http, url, 0, b"x" * 11)
    assert r.status == 413
    async with http.patch(url, data=b"a", headers={**OCTET}) as r:
        assert r.status == 400  # no Upload-Offset
    assert await head_offset(http, url) == 0
    r = await patch(http, url, 0, b"abc")
    assert r.status == 204 and r.headers["Upload-Offset"] == "3"
    r = await patch(http, url, 0, b"abc")
    assert r.status == 409
    missing = f"{proxy.url}/files/{'0' * 32}"
    assert (await patch(http, missing, 0, b"a")).status == 404
    assert (await patch(http, f"{proxy.url}/files/nonsense", 0, b"a")).status == 404
    async with http.head(missing, headers=TUS) as r:
        assert r.status == 404
        assert await r.read() == b""  # HEAD answers carry no body
    async with http.delete(missing, headers=TUS) as r:
        assert r.status == 404
    async with http.delete(url, headers=TUS) as r:
        assert r.status == 204
    await assert_nothing_left(s3, prefix)


@pytest.mark.parametrize("algorithm", ["sha1", "md5", "sha256"])
async def test_checksum(proxy, http, s3, prefix, algorithm) -> None:
    data = os.urandom(6 * MiB)
    url = await create(http, proxy.url, len(data) + 10)

    def header(chunk: bytes) -> str:
        return f"{algorithm} {base64.b64encode(hashlib.new(algorithm, chunk).digest()).decode()}"

    wrong = header(data[:-1])
    r = await patch(http, url, 0, data, **{"Upload-Checksum": wrong})
    assert r.status == 460
    assert await head_offset(http, url) == 0  # the chunk was discarded
    r = await patch(http, url, 0, data, **{"Upload-Checksum": header(data)})
    assert r.status == 204 and r.headers["Upload-Offset"] == str(len(data))
    tail = b"0123456789"
    r = await patch(http, url, len(data), tail, **{"Upload-Checksum": wrong})
    assert r.status == 460
    r = await patch(http, url, len(data), tail, **{"Upload-Checksum": header(tail)})
    assert r.status == 204
    key = tus_key(prefix, url)
    body, meta = await get_object(s3, key)
    assert body == data + tail and meta["sha256"] == sha256_hex(data + tail)
    assert await only_objects(s3, prefix) == [key]


async def test_checksum_rejects_unknown_algorithm_and_bad_digest(proxy, http) -> None:
    url = await create(http, proxy.url, 3)
    r = await patch(http, url, 0, b"abc", **{"Upload-Checksum": "crc32 AAAAAA=="})
    assert r.status == 400
    r = await patch(http, url, 0, b"abc", **{"Upload-Checksum": "sha1 AAAA"})
    assert r.status == 400
    assert await head_offset(http, url) == 0


async def test_defer_length(proxy, http, s3, prefix) -> None:
    url = await create(http, proxy.url, None)
    async with http.head(url, headers=TUS) as r:
        assert r.headers["Upload-Defer-Length"] == "1"
        assert "Upload-Length" not in r.headers
    r = await patch(http, url, 0, b"hello ")
    assert r.status == 204
    r = await patch(http, url, 6, b"world", **{"Upload-Length": "4"})
    assert r.status == 400  # below the offset
    r = await patch(http, url, 6, b"world", **{"Upload-Length": "11"})
    assert r.status == 204 and r.headers["Upload-Offset"] == "11"
    key = tus_key(prefix, url)
    body, meta = await get_object(s3, key)
    assert body == b"hello world" and meta["sha256"] == sha256_hex(b"hello world")
    assert await only_objects(s3, prefix) == [key]


async def test_defer_length_ending_empty(proxy, http, s3, prefix) -> None:
    url = await create(http, proxy.url, None)
    r = await patch(http, url, 0, b"", **{"Upload-Length": "0"})
    assert r.status == 204 and r.headers["Upload-Offset"] == "0"
    key = tus_key(prefix, url)
    body, meta = await get_object(s3, key)
    assert body == b"" and meta["sha256"] == sha256_hex(b"")
    assert await only_objects(s3, prefix) == [key]


async def test_creation_with_upload(proxy, http, s3, prefix) -> None:
    data = os.urandom(1000)
    headers = {**OCTET, "Upload-Length": "1500", "Upload-Metadata": metadata(filename="a.bin")}
    async with http.post(f"{proxy.url}/files/", data=data, headers=headers) as r:
        assert r.status == 201
        assert r.headers["Upload-Offset"] == "1000"
        url = proxy.url + r.headers["Location"]
    r = await patch(http, url, 1000, data[:500])
    assert r.status == 204
    key = tus_key(prefix, url, "a.bin")
    body, _ = await get_object(s3, key)
    assert body == data + data[:500]
    # A body without the tus content type is refused before anything is created.
    async with http.post(
        f"{proxy.url}/files/", data=b"xyz", headers={**TUS, "Upload-Length": "3"}
    ) as r:
        assert r.status == 415
    assert await only_objects(s3, prefix) == [key]


async def test_creation_with_upload_checksum_mismatch_leaves_nothing(
    proxy, http, s3, prefix
) -> None:
    headers = {
        **OCTET,
        "Upload-Length": "10",
        "Upload-Checksum": "sha1 " + base64.b64encode(b"\0" * 20).decode(),
    }
    async with http.post(f"{proxy.url}/files/", data=b"0123456789", headers=headers) as r:
        assert r.status == 460
    await assert_nothing_left(s3, prefix)


async def test_zero_length_upload_completes_on_creation(proxy, http, s3, prefix) -> None:
    headers = {**TUS, "Upload-Length": "0", "Upload-Metadata": metadata(filename="empty.txt")}
    async with http.post(f"{proxy.url}/files/", headers=headers) as r:
        assert r.status == 201
        assert r.headers["Upload-SHA256"] == sha256_hex(b"")
        url = proxy.url + r.headers["Location"]
    key = tus_key(prefix, url, "empty.txt")
    body, meta = await get_object(s3, key)
    assert body == b"" and meta["sha256"] == sha256_hex(b"")
    assert await only_objects(s3, prefix) == [key]


async def test_termination_leaves_nothing(proxy, http, s3, prefix) -> None:
    url = await create(http, proxy.url, 20 * MiB)
    r = await patch(http, url, 0, os.urandom(6 * MiB))  # one part plus a pending tail
    assert r.status == 204
    assert len(await s3.list_multipart(prefix)) == 1
    assert len(await state_keys(s3, prefix)) == 2  # info + pending segment
    async with http.delete(url, headers=TUS) as r:
        assert r.status == 204
    await assert_nothing_left(s3, prefix)
    async with http.head(url, headers=TUS) as r:
        assert r.status == 404
    async with http.delete(url, headers=TUS) as r:
        assert r.status == 404


async def test_expiry_and_sweeper(start_proxy, http, s3, prefix) -> None:
    """Expiry on the service's clock, moved by the test (no waiting for it), and one sweep
    run by the test: the background sweeper (every hour here) cannot race the checks by
    holding the upload's lease while it terminates it (HEAD / PATCH would then answer
    200 / 423, rightly)."""
    proxy = await start_proxy(**tus_sections(prefix, expire_after_s=2, sweep_interval_s=3600))
    service = proxy.app[TUS_ROUTES].service
    now_s = [time.time()]
    service.store.clock = lambda: now_s[0]
    url = await create(http, proxy.url, 100)
    r = await patch(http, url, 0, b"x" * 10)
    assert r.status == 204
    assert "GMT" in r.headers["Upload-Expires"]
    now_s[0] += 2.1
    async with http.head(url, headers=TUS) as r:
        assert r.status == 410
    assert (await patch(http, url, 10, b"y")).status == 410
    assert await state_keys(s3, prefix)  # the precondition: the upload's state is there
    assert await sweep_once(service) == 1
    await assert_nothing_left(s3, prefix)
    async with http.head(url, headers=TUS) as r:
        assert r.status == 404


async def test_expired_upload_is_410_before_the_sweep(proxy, http, s3, prefix) -> None:
    url = await create(http, proxy.url, 100)
    svc = service_for(proxy)
    loaded = await svc.store.load(sid(url))
    assert loaded is not None
    info, etag = loaded
    expired = replace(info, expires_s=0.0, rev=info.rev + 1)
    await s3.put_conditional(svc.store.info_key(info.id), expired.to_json(), if_match=etag)
    async with http.head(url, headers=TUS) as r:
        assert r.status == 410
    assert (await patch(http, url, 0, b"y")).status == 410
    assert await sweep_once(svc) == 1
    await assert_nothing_left(s3, prefix)


async def test_cors(start_proxy, http, prefix) -> None:
    proxy = await start_proxy(
        **tus_sections(prefix, cors_allow_origins=["https://app.example.com"], cors_max_age_s=60)
    )
    preflight = {
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "tus-resumable,upload-offset,content-type",
    }
    async with http.options(f"{proxy.url}/files/{'a' * 32}", headers=preflight) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
        assert "PATCH" in r.headers["Access-Control-Allow-Methods"]
        allowed = r.headers["Access-Control-Allow-Headers"].lower()
        for h in (
            "tus-resumable",
            "upload-offset",
            "upload-length",
            "upload-metadata",
            "upload-checksum",
            "upload-defer-length",
            "content-type",
        ):
            assert h in allowed
        assert r.headers["Access-Control-Max-Age"] == "60"
    headers = {**TUS, "Origin": "https://app.example.com", "Upload-Length": "3"}
    async with http.post(f"{proxy.url}/files/", headers=headers) as r:
        assert r.status == 201
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
        exposed = {h.strip().lower() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
        assert {
            "location",
            "upload-offset",
            "upload-length",
            "tus-resumable",
            "upload-expires",
            "upload-metadata",
        } <= exposed
    # Errors carry them too, or the browser hides the status from the client.
    headers = {**OCTET, "Origin": "https://app.example.com", "Upload-Offset": "0"}
    async with http.patch(f"{proxy.url}/files/{'0' * 32}", headers=headers, data=b"x") as r:
        assert r.status == 404
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    other = {**preflight, "Origin": "https://evil.example.com"}
    async with http.options(f"{proxy.url}/files/", headers=other) as r:
        assert "Access-Control-Allow-Origin" not in r.headers
        assert "Access-Control-Allow-Methods" not in r.headers


async def test_multipart_ownership_predicates(proxy, http, s3, prefix) -> None:
    """What a stale-multipart sweeper asks before aborting an open multipart upload."""
    svc = service_for(proxy)
    url = await create(http, proxy.url, 20 * MiB)
    r = await patch(http, url, 0, os.urandom(6 * MiB))  # the first part creates the multipart
    assert r.status == 204
    open_uploads = await s3.list_multipart(prefix)
    assert len(open_uploads) == 1
    mpu = open_uploads[0]
    assert await svc.store.owns_multipart(mpu.key, mpu.upload_id)
    assert not await svc.store.owns_multipart(mpu.key, "someone-elses-id")
    assert not await svc.store.owns_multipart(f"{prefix}plain-upload.bin", mpu.upload_id)
    await sweep_once(svc)  # a sweep leaves a live upload live
    assert await svc.store.owns_multipart(mpu.key, mpu.upload_id)
    async with http.delete(url, headers=TUS) as r:
        assert r.status == 204
    assert not await svc.store.owns_multipart(mpu.key, mpu.upload_id)


async def test_method_override(proxy, http) -> None:
    url = await create(http, proxy.url, 5)
    headers = {**OCTET, "Upload-Offset": "0", "X-HTTP-Method-Override": "PATCH"}
    async with http.post(url, data=b"ab", headers=headers) as r:
        assert r.status == 204 and r.headers["Upload-Offset"] == "2"
    async with http.post(url, headers={**TUS, "X-HTTP-Method-Override": "DELETE"}) as r:
        assert r.status == 204
    async with http.head(url, headers=TUS) as r:
        assert r.status == 404


async def test_tiny_patches_keep_few_pending_segments(proxy, http, s3, prefix) -> None:
    from proxy.tus.patch import MAX_PENDING_SEGMENTS

    data = os.urandom(40 * 1000)
    url = await create(http, proxy.url, len(data))
    most = 0
    for off in range(0, len(data), 1000):
        r = await patch(http, url, off, data[off : off + 1000])
        assert r.status == 204
        most = max(most, len(await state_keys(s3, prefix)) - 1)  # minus the info object
    assert 1 < most <= MAX_PENDING_SEGMENTS  # merged, never more
    key = tus_key(prefix, url)
    body, meta = await get_object(s3, key)
    assert body == data and meta["sha256"] == sha256_hex(data)
