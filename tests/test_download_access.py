"""Who may download what: token scopes and prefixes, share links (signed GET URLs) and
their expiry, refusals before any S3 read.  Real proxy, real SeaweedFS."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.auth import hash_token, sign_url
from proxy.config import ConfigError, from_dict
from proxy.storage.s3 import S3Storage
from tests.conftest import StartProxy
from tests.wrapped import Wrapped

SECRET = "k" * 40
UPLOADER = "uploader-0123456789abcdef"  # auth.tokens: upload only, as before scopes
ALICE = "alice-reader-0123456789abcdef"  # download, under alice/
ADMIN = "admin-0123456789abcdef-xyz"  # everything


class Counting(Wrapped):
    """Counts the store requests a download could make before it answers."""

    async def head(self, key: str) -> Any:
        self.calls["head"] += 1
        return await self.inner.head(key)

    def read_range(self, key: str, **kw: Any) -> Any:
        self.calls["read_range"] += 1
        return self.inner.read_range(key, **kw)

    async def list_objects(self, prefix: str) -> Any:
        self.calls["list_objects"] += 1
        return await self.inner.list_objects(prefix)


def auth(tmp_path: Path) -> dict[str, Any]:
    secret = tmp_path / "signing.secret"
    secret.write_text(SECRET)
    return {
        "mode": "required",
        "tokens": [hash_token(UPLOADER)],
        "signing_secret_file": str(secret),
        "scoped_tokens": [
            {"tokens": [hash_token(ALICE)], "scopes": ["download"], "prefix": "alice/"},
            {"tokens": [hash_token(ADMIN)], "scopes": ["admin"]},
        ],
    }


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(method: str, url: str, data: bytes | None = None, **headers: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, url, data=data, headers=headers) as r,
    ):
        body = await r.read()
        code = ""
        if r.status >= 400 and body:
            code = (await r.json())["code"]
        return r.status, code or body.decode("latin-1")


async def test_scopes_and_prefixes(start_proxy: StartProxy, s3: S3Storage, tmp_path: Path) -> None:
    store = Counting(s3)
    p = await start_proxy(storage=store, auth=auth(tmp_path), downloads={"enabled": True})
    u = f"{p.url}/uploads"
    assert (await call("PUT", f"{u}/alice/a.txt", b"A", **bearer(UPLOADER)))[0] == 201
    assert (await call("PUT", f"{u}/bob/b.txt", b"B", **bearer(ADMIN)))[0] == 201  # admin uploads

    store.calls.clear()
    assert await call("GET", f"{u}/alice/a.txt") == (401, "ERR_UNAUTHORIZED")
    assert await call("GET", f"{u}/alice/a.txt", **bearer("wrong-0123456789abcdef")) == (
        401,
        "ERR_UNAUTHORIZED",
    )
    # Today's tokens mean upload: they do not read.
    assert await call("GET", f"{u}/alice/a.txt", **bearer(UPLOADER)) == (
        403,
        "ERR_SCOPE_NOT_ALLOWED",
    )
    # Outside the token's prefix: the 404 of a missing key, not a 403 that confirms it.
    assert await call("GET", f"{u}/bob/b.txt", **bearer(ALICE)) == (404, "ERR_NOT_FOUND")
    assert await call("HEAD", f"{u}/bob/b.txt", **bearer(ALICE)) == (404, "")
    assert store.calls == {}, "refused before any S3 request"

    assert await call("GET", f"{u}/alice/a.txt", **bearer(ALICE)) == (200, "A")
    assert await call("GET", f"{u}/alice/missing", **bearer(ALICE)) == (404, "ERR_NOT_FOUND")
    assert await call("GET", f"{u}/bob/b.txt", **bearer(ADMIN)) == (200, "B")
    # A download token does not upload, not even under its prefix.
    assert await call("PUT", f"{u}/alice/new.txt", b"x", **bearer(ALICE)) == (
        403,
        "ERR_SCOPE_NOT_ALLOWED",
    )
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{p.url}/files/",
            headers={"Tus-Resumable": "1.0.0", "Upload-Length": "1", **bearer(ALICE)},
        ) as r:
            assert r.status == 403


async def test_share_link_reads_its_key_until_it_expires(
    start_proxy: StartProxy, s3: S3Storage, tmp_path: Path
) -> None:
    store = Counting(s3)
    p = await start_proxy(storage=store, auth=auth(tmp_path), downloads={"enabled": True})
    u = f"{p.url}/uploads"
    assert (await call("PUT", f"{u}/share/a.txt", b"shared", **bearer(UPLOADER)))[0] == 201
    assert (await call("PUT", f"{u}/share/b.txt", b"other", **bearer(UPLOADER)))[0] == 201
    q = sign_url(SECRET.encode(), "GET", key="share/a.txt", expires_in_s=60)
    assert await call("GET", f"{u}/share/a.txt?{q}") == (200, "shared")
    assert (await call("HEAD", f"{u}/share/a.txt?{q}"))[0] == 200
    store.calls.clear()
    # Bound to its key and to reading.
    assert await call("GET", f"{u}/share/b.txt?{q}") == (404, "ERR_NOT_FOUND")
    assert (await call("PUT", f"{u}/share/a.txt?{q}", b"x"))[1] == "ERR_BAD_SIGNATURE"
    # An upload link does not read.
    put_q = sign_url(SECRET.encode(), "PUT", key="share/a.txt", expires_in_s=60)
    assert (await call("GET", f"{u}/share/a.txt?{put_q}"))[1] == "ERR_BAD_SIGNATURE"
    # Expired: one that ran out a second ago.
    old = sign_url(SECRET.encode(), "GET", key="share/a.txt", expires_in_s=1, now=time.time() - 2)
    assert await call("GET", f"{u}/share/a.txt?{old}") == (403, "ERR_URL_EXPIRED")
    # Longer than auth.signed_url_max_lifetime_s (a week).
    far = sign_url(SECRET.encode(), "GET", key="share/a.txt", expires_in_s=8 * 86400)
    assert await call("GET", f"{u}/share/a.txt?{far}") == (403, "ERR_URL_LIFETIME")
    assert store.calls == {}, "refused before any S3 request"
    # The link is not for tus URLs.
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{p.url}/files/{'0' * 32}?{q}") as r:
            assert r.status == 403


async def test_sign_command_mints_a_share_link(
    start_proxy: StartProxy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.__main__ import main
    from tests.daemon import write_config

    sections = auth(tmp_path)
    p = await start_proxy(auth=sections, downloads={"enabled": True})
    assert (await call("PUT", f"{p.url}/uploads/cli/ü a.txt", b"cli", **bearer(UPLOADER)))[0] == 201
    cfg = write_config(
        tmp_path / "c.toml", {"auth": {"signing_secret_file": sections["signing_secret_file"]}}
    )
    argv = ["-c", str(cfg), "sign", "--method", "GET", "--key", "cli/ü a.txt", "--expires", "7d"]
    assert main([*argv, "--base-url", p.url]) == 0
    method, url = capsys.readouterr().out.split()
    assert method == "GET"
    assert await call("GET", url) == (200, "cli")
    assert main(["-c", str(cfg), "sign", "--method", "GET", "--prefix", "cli/"]) == 2
    assert main(["-c", str(cfg), "sign", "--key", "k", "--expires", "8d"]) == 2
    with pytest.raises(SystemExit):
        main(["-c", str(cfg), "sign", "--key", "k", "--expires", "soon"])


def test_scoped_tokens_config(tmp_path: Path) -> None:
    good = from_dict(
        {
            "auth": {
                "scoped_tokens": [
                    {"tokens": [hash_token(ALICE)], "scopes": ["download"], "prefix": "alice/"}
                ]
            }
        }
    )
    (t,) = good.auth.scoped_tokens
    assert (t.scopes, t.prefix) == (frozenset({"download"}), "alice/")
    assert ALICE not in repr(good) and hash_token(ALICE)[7:] not in repr(good)
    bad = [
        {"tokens": [hash_token(ALICE)], "scopes": ["read"]},
        {"tokens": [hash_token(ALICE)], "scopes": []},
        {"tokens": [hash_token(ADMIN)], "scopes": ["download"], "prefix": "alice"},
        {"tokens": [hash_token(UPLOADER)], "scopes": ["download"]},  # also in tokens
        {"scopes": ["download"]},
        {"tokens": [hash_token("x" * 20)], "scopes": ["download"], "colour": "red"},
    ]
    with pytest.raises(ConfigError) as e:
        from_dict({"auth": {"tokens": [hash_token(UPLOADER)], "scoped_tokens": bad}})
    text = str(e.value)
    for i, why in enumerate(("scopes", "scopes", "prefix", "listed twice", "tokens", "colour")):
        assert why in text, (i, text)
    with pytest.raises(ConfigError):
        from_dict({"downloads": {"enabled": "yes"}})
    assert from_dict({"auth": {"mode": "none"}}).downloads.enabled is False
