"""tus.max_lifetime_s: an unfinished upload ends that long after its creation, however
active it is, so an S3 lifecycle rule counting from then can be sized (docs/deploy-pi.md)."""

from __future__ import annotations

import asyncio
import time
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import pytest

from proxy.config import ConfigError, from_dict
from tests.conftest import StartProxy, assert_nothing_left
from tests.tus_helpers import TUS, patch, tus_sections


def expires(response: aiohttp.ClientResponse) -> float:
    return parsedate_to_datetime(response.headers["Upload-Expires"]).timestamp()


async def test_activity_never_extends_an_upload_past_its_lifetime(
    start_proxy: StartProxy, s3: Any, prefix: str
) -> None:
    lifetime_s = 4
    proxy = await start_proxy(
        **tus_sections(prefix, expire_after_s=3600, max_lifetime_s=lifetime_s, sweep_interval_s=1)
    )
    async with aiohttp.ClientSession() as s:
        created = time.time()
        async with s.post(f"{proxy.url}/files/", headers={**TUS, "Upload-Length": "10"}) as r:
            assert r.status == 201, await r.text()
            url = proxy.url + r.headers["Location"]
            # Upload-Expires has whole seconds: +1.
            assert expires(r) <= created + lifetime_s + 1, "capped by the lifetime, not 1 h"
        r = await patch(s, url, 0, b"abcde")
        assert r.status == 204
        assert int(r.headers["Upload-Offset"]) == 5
        assert expires(r) <= created + lifetime_s + 1, "a PATCH pushed it past the lifetime"
        # Active a moment ago, and still: it is gone once its lifetime is over.
        async with asyncio.timeout(30):
            while True:
                async with s.head(url, headers=TUS) as r:
                    # 410 once expired; 404 once the sweeper has removed it.
                    if r.status in (404, 410):
                        break
                    assert r.status == 200
                await asyncio.sleep(0.2)
        assert time.time() >= created + lifetime_s - 1
        # Refused: gone, or locked while the sweeper (every second here) removes it.
        assert (await patch(s, url, 5, b"fghij")).status in (404, 410, 423)
    # The sweeper aborts its multipart upload and drops its state.
    async with asyncio.timeout(30):
        while await s3.list_multipart(prefix) or await s3.list_objects(prefix):
            await asyncio.sleep(0.2)
    await assert_nothing_left(s3, prefix)


def test_max_lifetime_defaults_to_a_week_and_must_be_positive() -> None:
    assert from_dict({"auth": {"mode": "none"}}).tus.max_lifetime_s == 7 * 86400
    with pytest.raises(ConfigError, match=r"tus\.max_lifetime_s"):
        from_dict({"auth": {"mode": "none"}, "tus": {"max_lifetime_s": 0}})
