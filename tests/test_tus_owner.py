"""tus uploads belong to who created them: with another token, HEAD, PATCH, DELETE and
the method-override POST get exactly the 404 of an id that does not exist (never 403,
410 or 423, which would confirm that the id exists), after the same S3 read."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from tus_helpers import OCTET, TUS, create, patch, sha256_hex, sid, store_for, tus_sections

from proxy.auth import hash_token
from proxy.tus.state import UploadInfo

from conftest import MiB, StartProxy, assert_nothing_left, get_object
from obs_helpers import RawRequest, scrape, value

TOKEN_A = "alice-token-0123456789abcdef"
TOKEN_B = "bob-token-0123456789abcdef00"
A = {"Authorization": f"Bearer {TOKEN_A}"}
B = {"Authorization": f"Bearer {TOKEN_B}"}
UNKNOWN_ID = "0" * 32


@pytest.fixture
async def proxy(start_proxy: StartProxy, prefix: str) -> Any:
    auth = {"mode": "required", "tokens": [hash_token(TOKEN_A), hash_token(TOKEN_B)]}
    return await start_proxy(auth=auth, **tus_sections(prefix))


async def answers(http: aiohttp.ClientSession, url: str, offset: int) -> list[tuple[Any, ...]]:
    """Status, tus-relevant headers and body of every way to touch an upload, as B."""
    out = []
    requests = [
        ("HEAD", {**TUS}, b""),
        ("PATCH", {**OCTET, "Upload-Offset": str(offset)}, b"evil"),
        ("POST", {**OCTET, "Upload-Offset": str(offset), "X-HTTP-Method-Override": "PATCH"}, b"x"),
        ("POST", {**TUS, "X-HTTP-Method-Override": "HEAD"}, b""),
        ("POST", {**TUS, "X-HTTP-Method-Override": "DELETE"}, b""),
        ("DELETE", {**TUS}, b""),
    ]
    for method, headers, body in requests:
        async with http.request(method, url, headers={**headers, **B}, data=body) as r:
            shown = {h: r.headers.get(h) for h in ("Upload-Offset", "Upload-Length", "Location")}
            out.append((method, r.status, shown, await r.read()))
    return out


async def test_another_token_sees_only_404(proxy: Any, http: Any, s3: Any, prefix: str) -> None:
    data = os.urandom(6 * MiB + 100)  # one part and a pending tail once sent
    url = await create(http, proxy.url, len(data) + 10, **A)
    r = await patch(http, url, 0, data, **A)
    assert r.status == 204
    unknown = f"{proxy.url}/files/{UNKNOWN_ID}"

    foreign, missing = await answers(http, url, len(data)), await answers(http, unknown, len(data))
    assert [a[1] for a in foreign] == [404] * 6, foreign
    assert foreign == missing  # same status, same headers, same body: nothing to tell apart

    # Nothing of B's reached the upload; A carries on and completes it.
    async with http.head(url, headers={**TUS, **A}) as r:
        assert (r.status, r.headers["Upload-Offset"]) == (200, str(len(data)))
    tail = b"0123456789"
    r = await patch(http, url, len(data), tail, **A)
    assert r.status == 204 and r.headers["Upload-SHA256"] == sha256_hex(data + tail)
    key = f"{prefix}tus/{sid(url)}"
    assert (await get_object(s3, key))[0] == data + tail
    await s3.delete_object(key)
    await assert_nothing_left(s3, prefix)


async def test_a_foreign_id_costs_the_same_s3_read_as_an_unknown_one(proxy: Any, http: Any) -> None:
    """No timing shortcut: the ownership check comes after the state read, as a miss does."""
    url = await create(http, proxy.url, 100, **A)

    async def reads_for(target: str) -> float:
        before = (
            value(
                await scrape(proxy.url),
                "proxy_storage_request_duration_seconds_count",
                operation="get_object",
            )
            or 0
        )
        async with http.head(target, headers={**TUS, **B}) as r:
            assert r.status == 404
        after = (
            value(
                await scrape(proxy.url),
                "proxy_storage_request_duration_seconds_count",
                operation="get_object",
            )
            or 0
        )
        return after - before

    assert await reads_for(url) == await reads_for(f"{proxy.url}/files/{UNKNOWN_ID}") == 1


async def test_foreign_expired_and_locked_uploads_are_404_too(
    proxy: Any, http: Any, s3: Any, prefix: str
) -> None:
    """410 (expired) and 423 (a PATCH is running) are for the owner only."""
    url = await create(http, proxy.url, 2 * MiB, **A)
    upload_id = sid(url)
    running = await RawRequest.open(
        proxy.host,
        proxy.port,
        f"PATCH /files/{url.rsplit('/', 1)[1]} HTTP/1.1\r\nHost: {proxy.host}\r\n"
        f"Authorization: Bearer {TOKEN_A}\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
        f"Content-Length: {2 * MiB}\r\n\r\n",
    )
    try:
        await running.send(os.urandom(MiB))
        store = store_for(s3, prefix)
        for _ in range(100):  # the lease is written before the body is read
            loaded = await store.load(upload_id)
            assert loaded is not None
            if loaded[0].lease_owner is not None:
                break
            await asyncio.sleep(0.05)
        assert (await patch(http, url, 0, b"x", **A)).status == 423
        assert (await patch(http, url, 0, b"x", **B)).status == 404
        async with http.delete(url, headers={**TUS, **B}) as r:
            assert r.status == 404
        await running.send(os.urandom(MiB))
        status, _, _ = await running.response()
        assert status == 204
    finally:
        running.close()

    url = await create(http, proxy.url, 100, **A)
    upload_id = sid(url)
    loaded = await store.load(upload_id)
    assert loaded is not None
    info, etag = loaded
    expired = replace(info, expires_s=0.0, rev=info.rev + 1)
    await s3.put_conditional(store.info_key(upload_id), expired.to_json(), if_match=etag)
    async with http.head(url, headers={**TUS, **A}) as r:
        assert r.status == 410
    async with http.head(url, headers={**TUS, **B}) as r:
        assert r.status == 404
    assert (await patch(http, url, 0, b"y", **B)).status == 404
    async with http.delete(url, headers={**TUS, **A}) as r:
        assert r.status == 204
    for key in [o.key for o in await s3.list_objects(prefix)]:
        await s3.delete_object(key)  # the completed first upload
    await assert_nothing_left(s3, prefix)


async def test_state_from_before_owners_is_anonymous(
    proxy: Any, http: Any, s3: Any, prefix: str, start_proxy: StartProxy
) -> None:
    """Info objects written before uploads had an owner load as "anonymous": with auth on,
    no token reaches them (they expire); with auth.mode = "none" they work as before."""
    url = await create(http, proxy.url, 100, **A)
    upload_id = sid(url)
    store = store_for(s3, prefix)
    loaded = await store.load(upload_id)
    assert loaded is not None and loaded[0].principal.startswith("token:")
    old = json.loads(loaded[0].to_json())
    del old["principal"]
    await s3.put_conditional(
        store.info_key(upload_id), json.dumps(old).encode(), if_match=loaded[1]
    )
    assert UploadInfo.from_json(json.dumps(old).encode()).principal == "anonymous"
    for token in (A, B):
        async with http.head(url, headers={**TUS, **token}) as r:
            assert r.status == 404
    open_proxy = await start_proxy(auth={"mode": "none"}, **tus_sections(prefix))
    async with http.delete(f"{open_proxy.url}/files/{url.rsplit('/', 1)[1]}", headers=TUS) as r:
        assert r.status == 204
    await assert_nothing_left(s3, prefix)


async def test_the_url_id_is_kept_nowhere(
    proxy: Any, http: Any, s3: Any, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The id in an upload's URL is its secret: no state object, object key, metadata,
    quota marker or log line holds it (they carry a one-way function of it), from the
    creation through a resumed PATCH to the completion."""
    caplog.set_level(logging.DEBUG)
    data = os.urandom(6 * MiB + 100)
    url = await create(http, proxy.url, len(data), **A, **{"Upload-Metadata": ""})
    url_id = url.rsplit("/", 1)[1]
    assert (await patch(http, url, 0, data[: 5 * MiB + 7], **A)).status == 204
    seen = [o.key for o in await s3.list_objects(prefix)]
    seen += [u.key for u in await s3.list_multipart(prefix)]
    assert any(sid(url) in key for key in seen)  # the state is there, under the other id
    for key in [o.key for o in await s3.list_objects(f"{prefix}.tus/")]:
        body, _ = await get_object(s3, key)
        assert url_id.encode() not in body, key
    r = await patch(http, url, 5 * MiB + 7, data[5 * MiB + 7 :], **A)
    assert r.status == 204
    (key,) = [o.key for o in await s3.list_objects(prefix)]
    stored, meta = await get_object(s3, key)
    assert stored == data and meta["tus-id"] == sid(url)
    assert all(url_id not in k for k in [*seen, key]) and url_id not in json.dumps(meta)
    assert url_id not in caplog.text and sid(url) in caplog.text


def test_operators_find_an_upload_from_its_url() -> None:
    """`upload-proxy tus-id URL` prints the id logs and keys carry for that upload."""
    url = "https://uploads.example.org/files/7500d53c9a1c36979a73a5e45bfcfb0b"
    run = subprocess.run(
        [sys.executable, "-m", "proxy", "tus-id", url], capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == sid(url) != url.rsplit("/", 1)[1]
    bad = subprocess.run([sys.executable, "-m", "proxy", "tus-id", "x"], capture_output=True)
    assert bad.returncode == 2
