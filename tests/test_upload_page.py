"""The upload page's server side against the real proxy and SeaweedFS: the page and its
headers, ``api/link``, and tus uploads with a link (its prefix, caps, owner, revocation).
The page in a real browser: tests/test_webui_page.py."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tus_helpers import TUS, metadata, patch, sha256_hex, sid, tus_sections

from proxy.auth import hash_token
from proxy.config import ConfigError, PageConfig, from_dict, load
from proxy.links import Link, LinkStore, mint, new_link_id, unverified_link

from conftest import MiB, StartProxy, assert_nothing_left, get_object

SECRET = b"0123456789abcdef0123456789abcdef-page"
TOKEN = "operator-0123456789abcdef0123"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; form-action 'none'; frame-ancestors 'none'; "
    "base-uri 'none'"
)


def grant(prefix: str = "family/", expires_in_s: float = 3600, **terms: Any) -> str:
    return mint(
        SECRET,
        Link(id=new_link_id(), prefix=prefix, expires_s=int(time.time() + expires_in_s), **terms),
    )


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def page_sections(tmp_path: Path, prefix: str, **page: Any) -> dict[str, Any]:
    secret = tmp_path / "signing-secret"
    secret.write_bytes(SECRET)
    return {
        "auth": {
            "mode": "required",
            "tokens": [hash_token(TOKEN)],
            "signing_secret_file": str(secret),
        },
        "page": {"enabled": True, "revocation_check_s": 1, **page},
        **tus_sections(prefix),
    }


@pytest.fixture
async def proxy(start_proxy: StartProxy, prefix: str, tmp_path: Path) -> Any:
    return await start_proxy(**page_sections(tmp_path, prefix))


async def link_info(http: aiohttp.ClientSession, proxy: Any, credential: str) -> Any:
    async with http.get(f"{proxy.url}/upload/api/link", headers=bearer(credential)) as r:
        return r.status, await r.json()


async def create(
    http: aiohttp.ClientSession, proxy: Any, credential: str, length: int | None, **meta: str
) -> aiohttp.ClientResponse:
    headers = {**TUS, **bearer(credential), "Upload-Metadata": metadata(**meta)}
    if length is None:
        headers["Upload-Defer-Length"] = "1"
    else:
        headers["Upload-Length"] = str(length)
    async with http.post(f"{proxy.url}/files/", headers=headers) as r:
        await r.read()
        return r


async def created(http: aiohttp.ClientSession, proxy: Any, credential: str, size: int) -> str:
    r = await create(http, proxy, credential, size, filename="a.bin")
    assert r.status == 201, r.status
    return str(proxy.url + r.headers["Location"])


async def clear(s3: Any, prefix: str) -> None:
    for obj in await s3.list_objects(prefix):
        await s3.delete_object(obj.key)


async def test_the_page_and_its_assets_carry_the_strict_headers(
    proxy: Any, http: aiohttp.ClientSession
) -> None:
    for path, kind in [
        ("/upload/", "text/html"),
        ("/upload/app.js", "javascript"),
        ("/upload/app.css", "text/css"),
        ("/upload/LICENSES.txt", "text/plain"),
        ("/upload/api/link", "application/json"),  # an error (401): the same headers
    ]:
        async with http.get(proxy.url + path) as r:
            assert kind in r.headers["Content-Type"], path
            assert r.headers["Content-Security-Policy"] == CSP, path
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert r.headers["Referrer-Policy"] == "no-referrer"
            assert r.headers["Cache-Control"] == ("no-cache" if "api" not in path else "no-store")
    async with http.get(proxy.url + "/upload/api/link") as r:
        assert (r.status, (await r.json())["code"]) == (401, "ERR_UNAUTHORIZED")
    async with http.get(proxy.url + "/upload/index.htm") as r:
        assert r.status == 404
    async with http.get(proxy.url + "/upload/../config.toml") as r:
        assert r.status == 404
    async with http.get(proxy.url + "/upload", allow_redirects=False) as r:
        assert (r.status, r.headers["Location"]) == (301, "/upload/")


async def test_the_page_is_off_unless_enabled(
    start_proxy: StartProxy, http: aiohttp.ClientSession, prefix: str, tmp_path: Path
) -> None:
    sections = page_sections(tmp_path, prefix)
    sections["page"] = {}
    p = await start_proxy(**sections)
    for path in ("/upload/", "/upload/app.js", "/upload/api/link"):
        async with http.get(p.url + path, headers=bearer(grant())) as r:
            assert r.status == 404, path
    # Without the page, a link is no credential at all.
    r = await create(http, p, grant(), 10, filename="a.txt")
    assert r.status == 401


async def test_api_link_says_what_the_link_allows(proxy: Any, http: aiohttp.ClientSession) -> None:
    note = "Photos from Sunday, please <b>not</b> the blurry ones"
    status, info = await link_info(
        http, proxy, grant(max_size_bytes=20 * MiB, max_files=3, note=note)
    )
    assert status == 200
    expires_at = info.pop("expires_at")
    assert expires_at.endswith("Z") and expires_at > time.strftime("%Y-%m-%dT%H", time.gmtime())
    assert info == {
        "prefix": "family/",
        "max_size_bytes": 20 * MiB,
        "max_files": 3,
        "files_used": 0,
        "note": note,
        "tus_endpoint": "/files/",
        "chunk_size_bytes": 64 * MiB,
        "allowed_types": [],
        "allowed_extensions": [],
    }
    # An operator's token (#token= on the page): no link terms, the server's limits.
    status, info = await link_info(http, proxy, TOKEN)
    assert status == 200
    assert (info["prefix"], info["expires_at"], info["max_files"]) == ("", None, None)
    assert info["max_size_bytes"] == proxy.config.upload.max_upload_size_bytes


@pytest.mark.parametrize(
    ("credential", "status", "code"),
    [
        (grant(expires_in_s=-1), 403, "ERR_LINK_EXPIRED"),
        (grant()[:-2] + "00", 403, "ERR_BAD_SIGNATURE"),
        (
            mint(b"another secret, as long as the real one", Link(new_link_id(), "a/", 2**40)),
            403,
            "ERR_BAD_SIGNATURE",
        ),
        ("not-a-link-nor-a-token", 401, "ERR_UNAUTHORIZED"),
    ],
    ids=["expired", "signature", "other-secret", "nonsense"],
)
async def test_links_that_cannot_be_used(
    proxy: Any,
    http: aiohttp.ClientSession,
    s3: Any,
    prefix: str,
    credential: str,
    status: int,
    code: str,
) -> None:
    assert (await link_info(http, proxy, credential))[0] == status
    r = await create(http, proxy, credential, 10, filename="a.txt")
    assert r.status == status
    assert (await link_info(http, proxy, credential))[1]["code"] == code
    await assert_nothing_left(s3, prefix)


async def test_a_link_upload_lands_in_its_prefix_and_belongs_to_the_link(
    proxy: Any, http: aiohttp.ClientSession, s3: Any, prefix: str
) -> None:
    mine, other_link = grant(), grant()
    data = os.urandom(6 * MiB + 7)
    # The file name cannot leave the prefix: it is one key segment, cleaned.
    r = await create(http, proxy, mine, len(data), filename="../../etc/passwd", filetype="x/y")
    assert r.status == 201
    url = proxy.url + r.headers["Location"]
    assert (await patch(http, url, 0, data[: 5 * MiB], **bearer(mine))).status == 204

    # Nobody else reaches it: another link, an operator token, no credential.
    for other in (bearer(other_link), bearer(TOKEN)):
        async with http.head(url, headers={**TUS, **other}) as h:
            assert h.status == 404
        assert (await patch(http, url, 5 * MiB, b"evil", **other)).status == 404
        async with http.delete(url, headers={**TUS, **other}) as d:
            assert d.status == 404
    async with http.head(url, headers=TUS) as h:
        assert h.status == 401

    r2 = await patch(http, url, 5 * MiB, data[5 * MiB :], **bearer(mine))
    assert (r2.status, r2.headers["Upload-SHA256"]) == (204, sha256_hex(data))
    key = f"{prefix}tus/family/{sid(url)}/passwd"
    body, meta = await get_object(s3, key)
    assert body == data and meta["sha256"] == sha256_hex(data)
    assert meta["tus-owner"].startswith("link:")

    # Done, its state gone: a HEAD (a page that lost the last answer) still learns so,
    # with the digest; nobody else does.
    async with http.head(url, headers={**TUS, **bearer(mine)}) as h:
        assert (h.status, h.headers["Upload-Offset"]) == (200, str(len(data)))
        assert h.headers["Upload-SHA256"] == sha256_hex(data)
    for other in (bearer(other_link), bearer(TOKEN)):
        async with http.head(url, headers={**TUS, **other}) as h:
            assert h.status == 404
    _, info = await link_info(http, proxy, mine)
    assert info["files_used"] == 1
    await clear(s3, prefix)


async def test_plain_uploads_refuse_a_link_before_the_body(
    proxy: Any, http: aiohttp.ClientSession, s3: Any, prefix: str
) -> None:
    """The file cap is counted at tus creation: a link must not go around it by PUT/POST."""
    link = bearer(grant())
    for method, path in (("PUT", "/uploads/family/a.txt"), ("POST", "/uploads")):
        headers = {**link, "Expect": "100-continue", "Content-Type": "text/plain"}
        async with http.request(method, proxy.url + path, data=b"hello", headers=headers) as r:
            assert (r.status, (await r.json())["code"]) == (403, "ERR_LINK_NOT_FOR_UPLOADS")
    await assert_nothing_left(s3, prefix)


async def test_size_cap_type_policy_and_deferred_length(
    start_proxy: StartProxy, http: aiohttp.ClientSession, s3: Any, prefix: str, tmp_path: Path
) -> None:
    sections = page_sections(tmp_path, prefix)
    p = await start_proxy(limits={"allowed_extensions": [".jpg", ".txt"]}, **sections)
    capped = grant(max_size_bytes=1000)
    r = await create(http, p, capped, 1001, filename="a.jpg")
    assert (r.status, r.headers["Content-Type"].split(";")[0]) == (413, "application/json")
    # A deferred length could grow past the cap PATCH by PATCH: not with a capped link.
    assert (await create(http, p, capped, None, filename="a.jpg")).status == 400
    assert (await create(http, p, capped, 10, filename="tool.exe")).status == 415
    _, info = await link_info(http, p, capped)
    assert (info["max_size_bytes"], info["allowed_extensions"]) == (1000, [".jpg", ".txt"])
    assert info["files_used"] == 0  # refusals take no place
    # Within the terms it goes through; an uncapped link may defer the length.
    assert (await create(http, p, capped, 1000, filename="a.jpg")).status == 201
    assert (await create(http, p, grant(), None, filename="b.txt")).status == 201
    await clear(s3, prefix)


async def test_the_file_cap_counts_across_creations(
    proxy: Any, http: aiohttp.ClientSession, s3: Any, prefix: str
) -> None:
    link = grant(max_files=2)
    # An empty file is complete on creation; it is a file all the same.
    assert (await create(http, proxy, link, 0, filename="empty.txt")).status == 201
    url = await created(http, proxy, link, 100)
    r = await create(http, proxy, link, 5, filename="third.txt")
    assert (r.status, r.headers["Content-Type"].split(";")[0]) == (403, "application/json")
    async with http.post(
        f"{proxy.url}/files/", headers={**TUS, **bearer(link), "Upload-Length": "5"}
    ) as r:
        assert (await r.json())["code"] == "ERR_TOO_MANY_FILES"
    assert (await link_info(http, proxy, link))[1]["files_used"] == 2
    # Another link has its own count.
    assert (await create(http, proxy, grant(max_files=1), 5, filename="a.txt")).status == 201
    async with http.delete(url, headers={**TUS, **bearer(link)}) as d:
        assert d.status == 204
    await clear(s3, prefix)


async def test_a_revoked_link_stops_within_the_check_interval(
    proxy: Any, http: aiohttp.ClientSession, s3: Any, prefix: str
) -> None:
    link = grant()
    data = os.urandom(1000)
    url = await created(http, proxy, link, len(data))
    assert (await patch(http, url, 0, data[:10], **bearer(link))).status == 204
    terms = unverified_link(link)
    assert terms is not None
    await LinkStore(s3, f"{prefix}.tus/").revoke(terms.id, terms.expires_s)
    # revocation_check_s = 1: a generous bound for a loaded machine.
    async with asyncio.timeout(30):
        while (await link_info(http, proxy, link))[0] == 200:
            await asyncio.sleep(0.2)
    status, body = await link_info(http, proxy, link)
    assert (status, body["code"]) == (403, "ERR_LINK_REVOKED")
    r = await patch(http, url, 10, data[10:], **bearer(link))
    assert r.status == 403
    assert (await create(http, proxy, link, 5, filename="b.txt")).status == 403
    assert (await link_info(http, proxy, grant()))[0] == 200  # other links work on
    # The unfinished upload stays until it expires (or the operator deletes it).
    async with http.head(url, headers={**TUS, **bearer(TOKEN)}) as h:
        assert h.status == 404
    await clear(s3, prefix)


async def test_links_work_with_auth_off_and_keep_their_terms(
    start_proxy: StartProxy, http: aiohttp.ClientSession, s3: Any, prefix: str, tmp_path: Path
) -> None:
    sections = page_sections(tmp_path, prefix)
    sections["auth"] = {
        "mode": "none",
        "signing_secret_file": sections["auth"]["signing_secret_file"],
    }
    p = await start_proxy(**sections)
    link = grant(prefix="open/", max_files=1)
    url = await created(http, p, link, 3)
    assert (await patch(http, url, 0, b"abc", **bearer(link))).status == 204
    assert await s3.head(f"{prefix}tus/open/{sid(url)}/a.bin") is not None
    assert (await create(http, p, link, 3, filename="b.bin")).status == 403
    assert (await create(http, p, grant(expires_in_s=-5), 3, filename="c.bin")).status == 403
    await clear(s3, prefix)


@pytest.mark.parametrize(
    ("page", "tus", "problem"),
    [
        ({"path": "/files/"}, {}, "page.path"),
        ({"path": "/"}, {}, "page.path"),
        ({"path": "/uploads/x/"}, {}, "page.path"),
        ({"path": "upload"}, {}, "page.path"),
        ({}, {"enabled": False}, "page.enabled"),
        ({"public_url": "uploads.example.org"}, {}, "page.public_url"),
        ({"chunk_size": "100KiB"}, {}, "page.chunk_size"),
        ({"revocation_check_s": 0.5}, {}, "page.revocation_check_s"),
    ],
)
def test_page_config_problems(page: dict[str, Any], tus: dict[str, Any], problem: str) -> None:
    data = {"auth": {"mode": "none"}, "page": {"enabled": True, **page}, "tus": tus}
    with pytest.raises(ConfigError, match=problem.replace(".", r"\.")):
        from_dict(data)


def test_the_shipped_config_documents_the_page_at_its_defaults() -> None:
    root = Path(__file__).resolve().parent.parent
    shipped = load(root / "config.toml")
    assert shipped.page == PageConfig() == from_dict({"auth": {"mode": "none"}}).page
    text = (root / "config.toml").read_text()
    for key in ("enabled", "path", "public_url", "chunk_size", "revocation_check_s"):
        assert f"\n{key} = " in text.partition("\n[page]\n")[2], key
