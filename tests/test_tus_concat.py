"""tus concatenation (proxy/tus/concat.py) against the real SeaweedFS: tus-js-client's
parallelUploads, aligned (one CompleteMultipartUpload, no copy) and unaligned (the
UploadPartCopy fallback); ownership, unfinished partials, DELETE, HEAD and PATCH of a final.
Which path was taken is read from the daemon's own S3 request metrics."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tus_helpers import (
    OCTET,
    TUS,
    create,
    only_objects,
    patch,
    service_for,
    sid,
    store_for,
    tus_sections,
)

from proxy.auth import hash_token
from proxy.storage.base import CompletedPart
from proxy.tus.concat import final_url_id
from proxy.tus.maintenance import sweep_once
from proxy.tus.state import TusStore
from proxy.web.tus_common import TUS as TUS_ROUTES

from conftest import MiB, StartProxy, assert_nothing_left, data_path, get_object
from obs_helpers import scrape, value

JS = Path(__file__).parent / "js"
PART = 5 * MiB
TOKEN_A = "alice-token-0123456789abcdef"
TOKEN_B = "bob-token-0123456789abcdef00"
A = {"Authorization": f"Bearer {TOKEN_A}"}
B = {"Authorization": f"Bearer {TOKEN_B}"}
PARTIAL = {"Upload-Concat": "partial"}


@pytest.fixture(scope="module")
def node_parallel() -> Path:
    if not (JS / "node_modules" / "tus-js-client").exists():
        import subprocess

        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS, check=True, timeout=300)
    return JS / "parallel.mjs"


async def s3_ops(url: str) -> dict[str, float]:
    """How many S3 requests of each kind the daemon made so far."""
    samples = await scrape(url)
    out = {}
    for op in ("upload_part", "upload_part_copy", "complete_multipart_upload", "get_object"):
        n = value(samples, "proxy_storage_request_duration_seconds_count", operation=op)
        out[op] = n or 0.0
    return out


async def run_node(script: Path, *args: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        "node", str(script), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


def final_key(prefix: str, url: str, name: str | None = None) -> str:
    return f"{prefix}tus/{sid(url)}/{name}" if name else f"{prefix}tus/{sid(url)}"


async def test_parallel_uploads_aligned_make_one_object_without_a_copy(
    start_proxy: StartProxy, s3: Any, prefix: str, tmp_path: Path, node_parallel: Path
) -> None:
    proxy = await start_proxy(**tus_sections(prefix))
    size = 256 * MiB + 12_345  # the last slice is not a part-size multiple: it is last
    path = data_path(tmp_path, size, seed=7)
    before = await s3_ops(proxy.url)
    endpoint = f"{proxy.url}/files/"
    result = await run_node(node_parallel, endpoint, str(path), "4", str(PART), "f.bin")
    after = await s3_ops(proxy.url)
    data = path.read_bytes()
    key = final_key(prefix, result["url"])
    body, meta = await get_object(s3, key)
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert await only_objects(s3, prefix) == [key]  # one object, no open multipart upload
    assert after["upload_part_copy"] == before["upload_part_copy"]  # no copy at all
    assert after["complete_multipart_upload"] - before["complete_multipart_upload"] == 1
    parts = after["upload_part"] - before["upload_part"]
    assert parts == -(-size // PART)  # every byte sent to S3 exactly once
    # The read-back that continues the first partial's SHA-256 reads the other 3/4.
    assert after["get_object"] > before["get_object"]
    async with aiohttp.ClientSession() as http:
        async with http.head(result["url"], headers=TUS) as r:
            assert r.status == 200
            assert r.headers["Upload-Offset"] == str(size)
            assert r.headers["Upload-Concat"] == "final"
            assert r.headers["Upload-SHA256"] == meta["sha256"]
        async with http.patch(result["url"], headers={**OCTET, "Upload-Offset": "0"}) as r:
            assert r.status == 403
            assert (await r.json())["code"] == "ERR_FINAL_UPLOAD"
        async with http.options(f"{proxy.url}/files/") as r:
            assert "concatenation" in r.headers["Tus-Extension"].split(",")
    await assert_nothing_left(s3, prefix + ".tus/")


async def test_unaligned_split_uses_the_copy_fallback(
    start_proxy: StartProxy, s3: Any, prefix: str, tmp_path: Path, node_parallel: Path
) -> None:
    proxy = await start_proxy(**tus_sections(prefix))
    size = 3 * 7 * MiB + 1001  # tus-js-client's even split: slices of 7 MiB + 333 bytes
    path = data_path(tmp_path, size, seed=8)
    before = await s3_ops(proxy.url)
    result = await run_node(node_parallel, f"{proxy.url}/files/", str(path), "3", "split", "u.bin")
    after = await s3_ops(proxy.url)
    data = path.read_bytes()
    key = final_key(prefix, result["url"], "u.bin")
    body, meta = await get_object(s3, key)
    assert body == data
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert await only_objects(s3, prefix) == [key]
    assert after["upload_part_copy"] > before["upload_part_copy"]
    await assert_nothing_left(s3, prefix + ".tus/")


async def partial(http: aiohttp.ClientSession, base: str, data: bytes, **h: str) -> str:
    url = await create(http, base, len(data), **PARTIAL, **h)
    if data:
        r = await patch(http, url, 0, data, **h)
        assert r.status == 204, r.status
    return url


async def final(
    http: aiohttp.ClientSession, base: str, urls: list[str], **h: str
) -> aiohttp.ClientResponse:
    headers = {**TUS, "Upload-Concat": "final;" + " ".join(urls), **h}
    async with http.post(f"{base}/files/", headers=headers) as r:
        await r.read()
        return r


async def test_raw_partials_head_order_and_unfinished(
    start_proxy: StartProxy, s3: Any, prefix: str, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(**tus_sections(prefix))
    one, two = os.urandom(PART), os.urandom(PART + 7)
    u1 = await partial(http, proxy.url, one)
    u2 = await create(http, proxy.url, len(two), **PARTIAL)
    async with http.head(u2, headers=TUS) as r:
        assert r.headers["Upload-Concat"] == "partial"
        assert r.headers["Upload-Offset"] == "0"
    r = await final(http, proxy.url, [u1, u2])
    assert r.status == 400
    # (the answer's code is checked by the raw request below)
    async with http.post(
        f"{proxy.url}/files/", headers={**TUS, "Upload-Concat": f"final;{u1} {u2}"}
    ) as resp:
        assert (await resp.json())["code"] == "ERR_PARTIAL_UNFINISHED"
    assert (await patch(http, u2, 0, two)).status == 204
    async with http.head(u1, headers=TUS) as r:  # a finished partial is no object
        assert r.headers["Upload-Offset"] == str(PART)
    assert [o.key for o in await s3.list_objects(prefix) if "/.tus/" not in o.key] == []
    # In the order they were created: aligned, and the final's URL is derived.
    r = await final(http, proxy.url, [u1, u2], **{"Upload-Metadata": "filename bi5iaW4="})
    assert r.status == 201
    loc = r.headers["Location"]
    assert loc.endswith(final_url_id(u1.rsplit("/", 1)[1]))
    body, meta = await get_object(s3, final_key(prefix, proxy.url + loc))
    assert body == one + two
    assert meta["sha256"] == hashlib.sha256(one + two).hexdigest()
    assert meta["filename"] == "n.bin"
    async with http.head(u1, headers=TUS) as r:
        assert r.status == 404  # consumed
    await assert_nothing_left(s3, prefix + ".tus/")


async def test_another_order_is_copied(
    start_proxy: StartProxy, s3: Any, prefix: str, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(**tus_sections(prefix))
    one, two, three = os.urandom(PART), os.urandom(2 * PART), os.urandom(99)
    urls = [await partial(http, proxy.url, d) for d in (one, two, three)]
    before = await s3_ops(proxy.url)
    r = await final(http, proxy.url, [urls[1], urls[0], urls[2]])
    assert r.status == 201
    after = await s3_ops(proxy.url)
    assert after["upload_part_copy"] > before["upload_part_copy"]
    body, meta = await get_object(s3, final_key(prefix, proxy.url + r.headers["Location"]))
    assert body == two + one + three
    assert meta["sha256"] == hashlib.sha256(two + one + three).hexdigest()
    await assert_nothing_left(s3, prefix + ".tus/")
    assert await s3.list_multipart(prefix) == []


async def test_final_names_only_its_principals_partials(
    start_proxy: StartProxy, s3: Any, prefix: str, http: aiohttp.ClientSession
) -> None:
    auth = {"mode": "required", "tokens": [hash_token(TOKEN_A), hash_token(TOKEN_B)]}
    proxy = await start_proxy(auth=auth, **tus_sections(prefix))
    data = os.urandom(PART)
    mine = await partial(http, proxy.url, data, **B)
    theirs = await partial(http, proxy.url, data, **A)
    unknown = theirs.rsplit("/", 1)[0] + "/" + "0" * 32
    answers = []
    for other in (theirs, unknown):
        async with http.post(
            f"{proxy.url}/files/",
            headers={**TUS, **B, "Upload-Concat": f"final;{mine} {other}"},
        ) as r:
            answers.append((r.status, await r.json()))
    assert answers[0] == answers[1]
    assert answers[0][0] == 404
    # Neither partial was touched: A's still finishes into A's own final.
    r = await final(http, proxy.url, [theirs], **A)
    assert r.status == 201


async def test_delete_partials_leaves_nothing(
    start_proxy: StartProxy, s3: Any, prefix: str, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(**tus_sections(prefix))
    urls = [await partial(http, proxy.url, os.urandom(PART)) for _ in range(2)]
    urls.append(await create(http, proxy.url, PART, **PARTIAL))  # none of its bytes yet
    assert len(await s3.list_multipart(prefix)) == 1  # one shared multipart upload
    for url in urls:
        async with http.delete(url, headers=TUS) as r:
            assert r.status == 204
        async with http.head(url, headers=TUS) as r:
            assert r.status == 404
    assert await s3.list_multipart(prefix) == []
    await assert_nothing_left(s3, prefix)


async def test_partials_expire_and_a_live_group_is_not_swept(
    start_proxy: StartProxy, s3: Any, prefix: str, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(**tus_sections(prefix))
    urls = [await partial(http, proxy.url, os.urandom(PART)) for _ in range(2)]
    urls.append(await create(http, proxy.url, PART, **PARTIAL))
    [mpu] = await s3.list_multipart(prefix)
    # Its key names the group, no upload: only the group's state claims it for the
    # stale-multipart sweeper (as the daemon's `live` check asks both).
    svc = proxy.app[TUS_ROUTES].service
    assert not await svc.store.owns_multipart(mpu.key, mpu.upload_id)
    assert await svc.concat.owns_multipart(mpu.key, mpu.upload_id)
    # Every partial expires (the tus sweeper of an instance whose clock is past them).
    infos = [(await store_for(s3, prefix).load(sid(u))) for u in urls]
    later = max(i[0].expires_s for i in infos if i is not None) + 1
    store = TusStore(s3, f"{prefix}.tus/", 30, clock=lambda: later)
    assert await sweep_once(service_for(proxy, store)) == 3
    assert await s3.list_multipart(prefix) == []
    await assert_nothing_left(s3, prefix)
    # Partials are no uploads of their own: nothing was reported for them.
    m = await scrape(proxy.url)
    assert value(m, "proxy_uploads_started_total") in (None, 0.0)


async def test_upload_links_take_no_partials(
    start_proxy: StartProxy, prefix: str, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(**tus_sections(prefix))
    async with http.options(f"{proxy.url}/files/") as r:
        assert "concatenation" in r.headers["Tus-Extension"]
    async with http.post(
        f"{proxy.url}/files/", headers={**TUS, "Upload-Concat": "final;/elsewhere/x"}
    ) as r:
        assert r.status == 400
        assert (await r.json())["code"] == "ERR_BAD_CONCAT"


async def test_two_files_in_one_group_wait_for_each_other_then_copy(
    start_proxy: StartProxy, s3: Any, prefix: str, http: aiohttp.ClientSession
) -> None:
    """Partials of two files created at the same moment share a group; the first final
    cannot complete the shared multipart upload while the other file's partial still
    needs it (423), then both finals are copied from the group completed whole."""
    proxy = await start_proxy(**tus_sections(prefix))
    a1, a2, b1 = os.urandom(PART), os.urandom(PART + 5), os.urandom(2 * PART)
    ua1 = await partial(http, proxy.url, a1)
    ub1 = await create(http, proxy.url, len(b1), **PARTIAL)  # file B's, in between
    ua2 = await partial(http, proxy.url, a2)
    assert len(await s3.list_multipart(prefix)) == 1  # one group for all three
    async with http.post(
        f"{proxy.url}/files/", headers={**TUS, "Upload-Concat": f"final;{ua1} {ua2}"}
    ) as r:
        assert r.status == 423
        assert (await r.json())["code"] == "ERR_LOCKED"
    assert (await patch(http, ub1, 0, b1)).status == 204
    ra = await final(http, proxy.url, [ua1, ua2])
    assert ra.status == 201
    rb = await final(http, proxy.url, [ub1])
    assert rb.status == 201
    for r, want in ((ra, a1 + a2), (rb, b1)):
        body, meta = await get_object(s3, final_key(prefix, proxy.url + r.headers["Location"]))
        assert body == want
        assert meta["sha256"] == hashlib.sha256(want).hexdigest()
    # The group's whole object (the copies' source) went with its last member.
    await assert_nothing_left(s3, prefix + ".tus/")
    assert await s3.list_multipart(prefix) == []
    assert len(await s3.list_objects(prefix)) == 2


async def test_a_final_completed_before_a_crash_is_finished_by_its_retry(
    start_proxy: StartProxy, s3: Any, prefix: str, http: aiohttp.ClientSession
) -> None:
    """The daemon died right after the aligned final's CompleteMultipartUpload (the
    partials' state is still there): the client's retry of the final recognises the
    object as the one those parts make and finishes it (sha256, state gone)."""
    proxy = await start_proxy(**tus_sections(prefix))
    one, two = os.urandom(PART), os.urandom(100)
    urls = [await partial(http, proxy.url, d) for d in (one, two)]
    store = store_for(s3, prefix)
    infos = [got[0] for u in urls if (got := await store.load(sid(u))) is not None]
    parts = [
        CompletedPart(i.part_base + n, p.etag) for i in infos for n, p in enumerate(i.parts, 1)
    ]
    await s3.complete_multipart(infos[0].key, infos[0].multipart_id, parts, if_none_match=True)
    r = await final(http, proxy.url, urls)
    assert r.status == 201
    body, meta = await get_object(s3, final_key(prefix, proxy.url + r.headers["Location"]))
    assert body == one + two
    assert meta["sha256"] == hashlib.sha256(one + two).hexdigest()
    await assert_nothing_left(s3, prefix + ".tus/")
