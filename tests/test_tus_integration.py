"""tus inside the whole daemon: auth and admission before the body, reserved state keys,
and the stale-multipart sweeper sparing live tus uploads."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_auth import SECRET, TOKEN, auth_section
from tus_helpers import TUS, create, head_offset, patch, sid, tus_sections

from proxy.auth import sign_url
from proxy.errors import StartupError

from conftest import MiB, StartProxy, get_object
from fakes import NO_TUS, GatedStorage

BEARER = {"Authorization": f"Bearer {TOKEN}"}


async def test_tus_requires_credentials(
    start_proxy: StartProxy, tmp_path: Path, s3: Any, prefix: str
) -> None:
    p = await start_proxy(auth=auth_section(tmp_path), **tus_sections(prefix))
    async with aiohttp.ClientSession() as s:
        h = {**TUS, "Upload-Length": "10"}
        async with s.post(f"{p.url}/files/", headers=h) as r:
            assert r.status == 401 and (await r.json())["code"] == "ERR_UNAUTHORIZED"
        query = sign_url(SECRET.encode(), "POST", prefix="x/", expires_in_s=60)
        async with s.post(f"{p.url}/files/?{query}", headers=h) as r:
            assert r.status == 403
            assert (await r.json())["code"] == "ERR_SIGNED_URL_NOT_FOR_TUS"
        url = await create(s, p.url, 10, **BEARER)
        r2 = await patch(s, url, 0, b"0123456789")
        assert r2.status == 401
        async with s.head(url, headers=TUS) as r:
            assert r.status == 401
        async with s.head(url, headers={**TUS, **BEARER}) as r:
            assert r.status == 200 and r.headers["Upload-Offset"] == "0"
        r2 = await patch(s, url, 0, b"0123456789", **BEARER)
        assert r2.status == 204
    upload_id = sid(url)
    assert any(upload_id in o.key and ".tus/" not in o.key for o in await s3.list_objects(prefix))


@pytest.mark.parametrize(
    "request_line",
    ["PATCH {path} HTTP/1.1", "POST {path} HTTP/1.1\r\nX-HTTP-Method-Override: PATCH"],
)
async def test_tus_patch_with_expect_refused_before_body(
    start_proxy: StartProxy, tmp_path: Path, prefix: str, request_line: str
) -> None:
    """No credentials: 401 instead of 100 Continue, also via the method-override route."""
    p = await start_proxy(auth=auth_section(tmp_path), **tus_sections(prefix))
    async with aiohttp.ClientSession() as s:
        url = await create(s, p.url, 5, **BEARER)
    path = url[len(p.url) :]
    reader, writer = await asyncio.open_connection(p.host, p.port)
    writer.write(
        request_line.format(path=path).encode() + b"\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
        b"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
        b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status.startswith(b"HTTP/1.1 401"), status


async def test_plain_uploads_cannot_write_tus_state(start_proxy: StartProxy, prefix: str) -> None:
    p = await start_proxy(**tus_sections(prefix))
    async with aiohttp.ClientSession() as s:
        async with s.put(f"{p.url}/uploads/.tus/forged/info", data=b"{}") as r:
            assert r.status == 400 and (await r.json())["code"] == "ERR_INVALID_KEY"


async def test_stale_sweeper_spares_a_live_tus_upload(
    start_proxy: StartProxy, s3: Any, prefix: str
) -> None:
    p = await start_proxy(
        upload={"stale_upload_after_s": 600, "sweep_interval_s": 3600}, **tus_sections(prefix)
    )
    data = hashlib.shake_256(b"tus-sweep").digest(6 * MiB + 3)
    stale = await s3.create_multipart(f"{prefix}crashed-plain", metadata={}, content_type="x/y")
    async with aiohttp.ClientSession() as s:
        url = await create(s, p.url, len(data))
        r = await patch(s, url, 0, data[: 5 * MiB + 1])  # one part stored: a multipart is open
        assert r.status == 204
        open_before = {u.upload_id for u in await s3.list_multipart(prefix)}
        assert stale in open_before and len(open_before) == 2
        later = datetime.now(UTC) + timedelta(hours=2)
        aborted = await p.sweeper.sweep_once(now=later)
        assert [u.upload_id for u in aborted] == [stale]
        offset = await head_offset(s, url)
        r = await patch(s, url, offset, data[offset:])
        assert r.status == 204
    stored = [o.key for o in await s3.list_objects(prefix) if ".tus/" not in o.key]
    assert len(stored) == 1
    body, meta = await get_object(s3, stored[0])
    assert body == data and meta["sha256"] == hashlib.sha256(data).hexdigest()


async def test_tus_needs_a_store_that_keeps_its_state(start_proxy: StartProxy) -> None:
    """tus keeps its state in the bucket (the store's state capability): on a store that
    has only the core operations, the app refuses to start with tus on and says what to
    do; with tus off, plain uploads work there."""
    with pytest.raises(StartupError, match=r"tus\.enabled = false"):
        await start_proxy(storage=GatedStorage())
    p = await start_proxy(storage=GatedStorage(), **NO_TUS)
    async with aiohttp.ClientSession() as s, s.put(f"{p.url}/uploads/a.bin", data=b"abc") as r:
        assert r.status == 201, await r.text()
