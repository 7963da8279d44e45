"""GET/HEAD /uploads/{key} and GET /files/{id} against the real proxy and SeaweedFS: ranges
at every boundary, conditional requests, headers, what is (not) downloadable."""

from __future__ import annotations

import base64
import email.utils
import hashlib
import os
from datetime import timedelta
from typing import Any

import aiohttp
import pytest

from proxy.storage.s3 import S3Storage
from tests.conftest import MiB, StartProxy
from tests.obs_helpers import scrape, value
from tests.tus_helpers import OCTET, create, metadata, tus_sections
from tests.wrapped import Wrapped

SIZE = 5 * MiB + 12_345  # more than one 5 MiB part: a multipart object
DOWNLOADS = {"downloads": {"enabled": True}}


class Reads(Wrapped):
    """Records every ranged read the proxy asks of the store."""

    def __init__(self, inner: S3Storage) -> None:
        super().__init__(inner)
        self.ranges: list[tuple[int, int]] = []

    def read_range(self, key: str, **kw: Any) -> Any:
        self.ranges.append((kw["first_byte"], kw["last_byte"]))
        return self.inner.read_range(key, **kw)


@pytest.fixture
async def reads(s3: S3Storage) -> Reads:
    return Reads(s3)


async def _put(url: str, key: str, data: bytes, **headers: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.put(f"{url}/uploads/{key}", data=data, headers=headers) as r,
    ):
        assert r.status == 201, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def _get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


async def test_ranges_at_every_boundary_are_the_source_bytes(
    start_proxy: StartProxy, reads: Reads
) -> None:
    p = await start_proxy(storage=reads, **DOWNLOADS)
    data = os.urandom(SIZE)
    stored = await _put(p.url, "r/big.bin", data, **{"Content-Type": "application/x-test"})
    url = f"{p.url}/uploads/r/big.bin"
    n, part = SIZE, 5 * MiB

    status, h, body = await _get(url)
    assert (status, body) == (200, data)
    assert h["content-length"] == str(n)
    assert h["content-type"] == "application/x-test"
    assert h["accept-ranges"] == "bytes"
    assert h["etag"].strip('"') == stored["etag"].strip('"')
    assert email.utils.parsedate_to_datetime(h["last-modified"]).tzinfo is not None
    digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert h["repr-digest"] == f"sha-256=:{digest}:"
    assert h["x-content-type-options"] == "nosniff"

    cases = {
        "bytes=0-0": (0, 0),
        "bytes=0-": (0, n - 1),
        f"bytes=0-{n - 1}": (0, n - 1),
        f"bytes=0-{n + 100}": (0, n - 1),  # past the end: up to the end
        f"bytes={n - 1}-{n - 1}": (n - 1, n - 1),
        f"bytes={n - 1}-": (n - 1, n - 1),
        f"bytes={part - 1}-{part}": (part - 1, part),  # across the part boundary
        f"bytes={part}-": (part, n - 1),
        "bytes=-1": (n - 1, n - 1),
        f"bytes=-{n}": (0, n - 1),
        f"bytes=-{n + 7}": (0, n - 1),
        "BYTES = 10 - 19": (10, 19),
    }
    for header, (first, last) in cases.items():
        reads.ranges.clear()
        status, h, body = await _get(url, Range=header)
        assert status == 206, header
        assert body == data[first : last + 1], header
        assert h["content-range"] == f"bytes {first}-{last}/{n}", header
        assert h["content-length"] == str(last - first + 1)
        assert h["repr-digest"] == f"sha-256=:{digest}:"  # of the whole, on a 206 too
        assert reads.ranges == [(first, last)], "read more of the store than was sent"

    for header in (f"bytes={n}-", f"bytes={n + 10}-{n + 20}", "bytes=-0"):
        reads.ranges.clear()
        status, h, body = await _get(url, Range=header)
        assert status == 416, header
        assert h["content-range"] == f"bytes */{n}"
        assert reads.ranges == []
    # Ignored (RFC 9110): several ranges, another unit, malformed, last < first.
    for header in ("bytes=0-1,5-6", "items=0-1", "bytes=abc", "bytes=9-3", "bytes=\u0661-\u0662"):
        status, _, body = await _get(url, Range=header)
        assert (status, body == data) == (200, True), header


async def test_head_and_empty_object(start_proxy: StartProxy, reads: Reads) -> None:
    p = await start_proxy(storage=reads, **DOWNLOADS)
    await _put(p.url, "h/empty", b"")
    await _put(p.url, "h/a.txt", b"hello")
    async with aiohttp.ClientSession() as s:
        async with s.head(f"{p.url}/uploads/h/a.txt", headers={"Range": "bytes=0-1"}) as r:
            # Range is for GET only: a HEAD describes the whole object.
            assert r.status == 200
            assert r.headers["Content-Length"] == "5"
            assert "Repr-Digest" in r.headers and "ETag" in r.headers
            assert await r.read() == b""
        async with s.get(f"{p.url}/uploads/h/empty") as r:
            assert (r.status, await r.read(), r.headers["Content-Length"]) == (200, b"", "0")
        async with s.get(f"{p.url}/uploads/h/empty", headers={"Range": "bytes=0-"}) as r:
            assert (r.status, r.headers["Content-Range"]) == (416, "bytes */0")
        async with s.get(f"{p.url}/uploads/h/empty", headers={"Range": "bytes=-5"}) as r:
            assert r.status == 416
    assert reads.ranges == [], "a HEAD or an empty object reads no bytes"


async def test_conditional_requests(start_proxy: StartProxy) -> None:
    p = await start_proxy(**DOWNLOADS)
    data = os.urandom(1000)
    await _put(p.url, "c/x.bin", data)
    url = f"{p.url}/uploads/c/x.bin"
    _, h, _ = await _get(url)
    etag, lm = h["etag"], h["last-modified"]
    when = email.utils.parsedate_to_datetime(lm)
    before = email.utils.format_datetime(when - timedelta(hours=1), usegmt=True)
    after = email.utils.format_datetime(when + timedelta(hours=1), usegmt=True)

    async def status(**headers: str) -> int:
        return (await _get(url, **headers))[0]

    assert await status(**{"If-None-Match": etag}) == 304
    assert await status(**{"If-None-Match": f'"other", W/{etag}'}) == 304  # weak comparison
    assert await status(**{"If-None-Match": "*"}) == 304
    assert await status(**{"If-None-Match": '"other"'}) == 200
    assert await status(**{"If-Match": etag}) == 200
    assert await status(**{"If-Match": '"other"'}) == 412
    assert await status(**{"If-Match": f"W/{etag}"}) == 412  # strong comparison
    assert await status(**{"If-Modified-Since": lm}) == 304
    assert await status(**{"If-Modified-Since": after}) == 304
    assert await status(**{"If-Modified-Since": before}) == 200
    # If-None-Match wins over If-Modified-Since.
    assert await status(**{"If-None-Match": '"other"', "If-Modified-Since": after}) == 200
    assert await status(**{"If-Unmodified-Since": before}) == 412
    assert await status(**{"If-Unmodified-Since": after}) == 200
    s304, h304, b304 = await _get(url, **{"If-None-Match": etag})
    assert (s304, b304, h304["etag"]) == (304, b"", etag)
    s412, _, b412 = await _get(url, **{"If-Match": '"nope"'})
    assert s412 == 412
    assert b'"ERR_PRECONDITION_FAILED"' in b412

    rng = {"Range": "bytes=10-19"}
    s, _, body = await _get(url, **rng, **{"If-Range": etag})
    assert (s, body) == (206, data[10:20])
    s, _, body = await _get(url, **rng, **{"If-Range": '"stale"'})
    assert (s, body) == (200, data)  # stale copy: the whole new one
    s, _, body = await _get(url, **rng, **{"If-Range": lm})
    assert (s, body) == (206, data[10:20])
    s, _, body = await _get(url, **rng, **{"If-Range": before})
    assert (s, body) == (200, data)


async def test_content_disposition_from_the_original_filename(start_proxy: StartProxy) -> None:
    p = await start_proxy(**DOWNLOADS)
    form = aiohttp.FormData()
    form.add_field("file", b"abc", filename="naïve résumé.txt", content_type="text/plain")
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{p.url}/uploads", data=form) as r:
            assert r.status == 201, await r.text()
            key = (await r.json())[0]["key"]
        client_key = key[len(p.prefix) :]
        async with s.get(f"{p.url}/uploads/{client_key}") as r:
            disposition = r.headers["Content-Disposition"]
            assert await r.read() == b"abc"
    # What the form upload kept of the name (S3 metadata is ASCII), exactly, in filename*.
    assert disposition.startswith("attachment; filename=")
    assert "filename*=UTF-8''" in disposition
    _, h, _ = await _get(f"{p.url}/uploads/{client_key}")
    assert h["content-security-policy"] == "sandbox"


async def test_what_is_not_downloadable(start_proxy: StartProxy, reads: Reads) -> None:
    p = await start_proxy(storage=reads, **DOWNLOADS, **tus_sections("x"))
    async with aiohttp.ClientSession() as s:
        # A tus upload in progress and a completed one: their state and object exist.
        url = await create(s, p.url, 10, **{"Upload-Metadata": metadata(filename="t.bin")})
        async with s.patch(url, data=b"0123456789", headers={**OCTET, "Upload-Offset": "0"}) as r:
            assert r.status == 204
        listed = [o.key for o in await reads.inner.list_objects(p.prefix)]
        assert any("/tus/" in k or k.startswith(p.prefix + "tus/") for k in listed), listed
        for k in listed:
            async with s.get(f"{p.url}/uploads/{k[len(p.prefix) :]}") as r:
                assert r.status == 404, k
        for client_key in ("missing.bin", "tus/x", "tus", ".tus/x"):
            async with s.get(f"{p.url}/uploads/{client_key}") as r:
                assert (r.status, (await r.json())["code"]) == (404, "ERR_NOT_FOUND"), client_key
        async with s.get(f"{p.url}/uploads/a/../b") as r:
            assert r.status in (400, 404)
        # A folder (SeaweedFS keeps "dir/" as a directory entry) is no object.
        async with s.put(f"{p.url}/uploads/dir/x.bin", data=b"abc") as r:
            assert r.status == 201
        for method in ("GET", "HEAD"):
            async with s.request(method, f"{p.url}/uploads/dir") as r:
                assert r.status == 404, method


async def test_downloads_are_off_unless_configured(start_proxy: StartProxy) -> None:
    p = await start_proxy()
    await _put(p.url, "off.bin", b"x")
    status, _, _ = await _get(f"{p.url}/uploads/off.bin")
    assert status == 405


async def test_tus_upload_is_served_to_its_creator_only(
    start_proxy: StartProxy, tmp_path: Any
) -> None:
    from proxy.auth import hash_token

    a, b = "token-a-0123456789abcdef", "token-b-0123456789abcdef"
    auth = {
        "mode": "required",
        "scoped_tokens": [
            {"tokens": [hash_token(a)], "scopes": ["upload", "download"]},
            {"tokens": [hash_token(b)], "scopes": ["admin"]},
        ],
    }
    p = await start_proxy(auth=auth, **DOWNLOADS, **tus_sections("x"))
    data = os.urandom(6 * MiB + 3)
    ha = {"Authorization": f"Bearer {a}"}
    hb = {"Authorization": f"Bearer {b}"}
    async with aiohttp.ClientSession() as s:
        url = await create(
            s,
            p.url,
            len(data),
            **ha,
            **{"Upload-Metadata": metadata(filename="ü.bin", filetype="video/mp4")},
        )
        async with s.get(url, headers=ha) as r:
            assert r.status == 404  # not complete yet
        async with s.patch(url, data=data, headers={**OCTET, **ha, "Upload-Offset": "0"}) as r:
            assert r.status == 204, await r.text()
        async with s.get(url, headers=ha) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "video/mp4"
            assert "filename*=UTF-8''%C3%BC.bin" in r.headers["Content-Disposition"]
            assert await r.read() == data
        async with s.get(url, headers={**ha, "Range": "bytes=-3"}) as r:
            assert (r.status, await r.read()) == (206, data[-3:])
        async with s.get(url, headers=hb) as r:
            assert (r.status, (await r.json())["code"]) == (404, "ERR_NOT_FOUND")
        async with s.get(url) as r:
            assert r.status == 401
        async with s.get(url[:-1] + ("0" if url[-1] != "0" else "1"), headers=ha) as r:
            assert r.status == 404


async def test_download_metrics(start_proxy: StartProxy) -> None:
    p = await start_proxy(**DOWNLOADS)
    await _put(p.url, "m/x.bin", b"y" * 5000)
    await _get(f"{p.url}/uploads/m/x.bin")
    await _get(f"{p.url}/uploads/m/x.bin", Range="bytes=0-99")
    await _get(f"{p.url}/uploads/m/missing")
    samples = await scrape(p.url)
    assert value(samples, "proxy_download_bytes_total", route="uploads") == 5100
    assert value(samples, "proxy_downloads_total", route="uploads", outcome="full") == 1
    assert value(samples, "proxy_downloads_total", route="uploads", outcome="partial") == 1
    assert value(samples, "proxy_downloads_total", route="uploads", outcome="refused") == 1
    text = str(samples)
    assert "m/x.bin" not in text
