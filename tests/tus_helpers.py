"""Small helpers shared by the tus tests: a raw tus client on aiohttp and state checks."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import aiohttp

from proxy.storage.s3 import S3Storage
from proxy.tus.service import TusService
from proxy.tus.state import OWNERS, TusStore, storage_id

TUS = {"Tus-Resumable": "1.0.0"}
OCTET = {**TUS, "Content-Type": "application/offset+octet-stream"}


def tus_sections(prefix: str, **tus: Any) -> dict[str, Any]:
    """start_proxy() sections putting the tus state under the test's prefix (so
    assert_nothing_left sees it) with the sweeper off unless asked."""
    return {"tus": {"state_prefix": f"{prefix}.tus/", "sweep_interval_s": 0, **tus}}


def b64(value: str | bytes) -> str:
    raw = value.encode() if isinstance(value, str) else value
    return base64.b64encode(raw).decode()


def metadata(**values: str) -> str:
    return ",".join(f"{k} {b64(v)}" for k, v in values.items())


async def create(
    session: aiohttp.ClientSession, base_url: str, length: int | None, **headers: str
) -> str:
    h = {**TUS, **headers}
    if length is None:
        h["Upload-Defer-Length"] = "1"
    else:
        h["Upload-Length"] = str(length)
    async with session.post(f"{base_url}/files/", headers=h) as r:
        assert r.status == 201, await r.text()
        return base_url + r.headers["Location"]


async def patch(
    session: aiohttp.ClientSession, url: str, offset: int, body: bytes, **headers: str
) -> aiohttp.ClientResponse:
    h = {**OCTET, "Upload-Offset": str(offset), **headers}
    async with session.patch(url, data=body, headers=h) as r:
        await r.read()
        return r


async def head_offset(session: aiohttp.ClientSession, url: str) -> int:
    async with session.head(url, headers=TUS) as r:
        assert r.status == 200, r.status
        return int(r.headers["Upload-Offset"])


async def state_keys(s3: S3Storage, prefix: str) -> list[str]:
    """The uploads' state objects (info, pending segments), not the per-principal markers."""
    owners = f"{prefix}.tus/{OWNERS}"
    return [o.key for o in await s3.list_objects(f"{prefix}.tus/") if not o.key.startswith(owners)]


async def marker_keys(s3: S3Storage, prefix: str) -> list[str]:
    """The markers counting unfinished uploads against their principals' cap."""
    return [o.key for o in await s3.list_objects(f"{prefix}.tus/{OWNERS}")]


async def only_objects(s3: S3Storage, prefix: str) -> list[str]:
    """Keys under prefix; asserts there is no open multipart upload there."""
    assert await s3.list_multipart(prefix) == []
    return [o.key for o in await s3.list_objects(prefix)]


def sid(url: str) -> str:
    """The id the upload at ``url`` is stored under (never the id in its URL)."""
    return storage_id(url.rsplit("/", 1)[1])


def tus_key(prefix: str, url: str, name: str | None = None) -> str:
    """The object key of the tus upload at ``url`` (object_prefix at its default, "tus/")."""
    upload_id = sid(url)
    return f"{prefix}tus/{upload_id}/{name}" if name else f"{prefix}tus/{upload_id}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def service_for(proxy: Any, store: TusStore | None = None) -> TusService:
    """A TusService of our own on the proxy's engine and config (as another instance
    sharing the bucket would run it), on ``store`` if given (its own storage or clock)."""
    cfg = proxy.config
    engine = proxy.uploads.engine
    if store is None:
        store = TusStore(engine.storage, cfg.tus.state_prefix, cfg.tus.lock_lease_s)
    return TusService(cfg.tus, engine, store)


def store_for(s3: S3Storage, prefix: str) -> TusStore:
    """The state store of a proxy started with tus_sections(prefix), to inspect its state."""
    return TusStore(s3, f"{prefix}.tus/", 30)
