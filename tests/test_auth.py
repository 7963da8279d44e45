"""Bearer tokens and signed URLs against the real proxy and S3: status, code, nothing stored."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import pytest

from proxy.auth import Authenticator, canonical, hash_token, sign_url
from proxy.config import ConfigError, from_dict
from proxy.errors import Forbidden, Unauthorized
from tests.conftest import MiB, StartProxy, assert_nothing_left, get_object

TOKEN = "tok-0123456789abcdef-secret"
SECRET = "s" * 40


def auth_section(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    secret_file = tmp_path / "signing.secret"
    secret_file.write_text(SECRET + "\n")
    return {
        "mode": "required",
        "tokens": [hash_token(TOKEN)],
        "signing_secret_file": str(secret_file),
        **extra,
    }


async def put(url: str, data: bytes = b"x", **kw: Any) -> tuple[int, dict[str, Any], Any]:
    async with aiohttp.ClientSession() as s, s.put(url, data=data, **kw) as r:
        return r.status, dict(r.headers), await r.json(content_type=None)


async def test_no_credentials_401_with_challenge(
    start_proxy: StartProxy, s3: Any, prefix: str, tmp_path: Path
) -> None:
    p = await start_proxy(auth=auth_section(tmp_path))
    status, headers, body = await put(f"{p.url}/uploads/a.bin")
    assert (status, body["code"]) == (401, "ERR_UNAUTHORIZED")
    assert headers["WWW-Authenticate"].startswith("Bearer")
    await assert_nothing_left(s3, prefix)


async def test_bearer_token(
    start_proxy: StartProxy, s3: Any, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    p = await start_proxy(auth=auth_section(tmp_path))
    status, _, body = await put(
        f"{p.url}/uploads/a.bin", headers={"Authorization": "Bearer wrong-token-xxxxxxxx"}
    )
    assert (status, body["code"]) == (401, "ERR_UNAUTHORIZED")
    status, _, body = await put(
        f"{p.url}/uploads/a.bin", data=b"hello", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 201, body
    assert (await get_object(s3, f"{prefix}a.bin"))[0] == b"hello"
    assert TOKEN not in caplog.text and SECRET not in caplog.text
    assert TOKEN not in repr(p.config) and SECRET not in repr(p.config)


def test_token_file_plain_and_hashed_entries(tmp_path: Path) -> None:
    other = "another-token-0123456789"
    f = tmp_path / "tokens"
    f.write_text(f"# ops\n{TOKEN}\n{hash_token(other)}\n")
    cfg = from_dict({"auth": {"token_file": str(f)}})
    a = Authenticator(enabled=True, token_sha256=cfg.auth.token_sha256)
    for t in (TOKEN, other):
        assert a.authenticate("PUT", {"Authorization": f"Bearer {t}"}, {}).via == "token"
    with pytest.raises(Unauthorized):
        a.authenticate("PUT", {"Authorization": "Bearer " + TOKEN[:-1]}, {})


def test_auth_config_errors_are_collected_and_echo_no_secret(tmp_path: Path) -> None:
    short = tmp_path / "short.secret"
    short.write_text("tooshort")
    with pytest.raises(ConfigError) as e:
        from_dict({"auth": {"tokens": [TOKEN], "signing_secret_file": str(short)}})
    text = str(e.value)
    assert "auth.tokens" in text and "auth.signing_secret_file" in text
    assert TOKEN not in text and "tooshort" not in text
    with pytest.raises(ConfigError, match=r"auth\.mode"):
        from_dict({"auth": {}})  # no [auth] settings means required, and nothing to check with


async def raw_request(port: int, head: str, timeout_s: float = 5.0) -> bytes:
    """Send only the request head; return everything the server sends before it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode())
    await writer.drain()
    try:
        async with asyncio.timeout(timeout_s):
            return await reader.read(65536)
    finally:
        writer.close()


async def test_expect_100_continue_refused_before_body(
    start_proxy: StartProxy, s3: Any, prefix: str, tmp_path: Path
) -> None:
    p = await start_proxy(auth=auth_section(tmp_path))
    got = await raw_request(
        p.port,
        (
            "PUT /uploads/big.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n"
            "Expect: 100-continue\r\n\r\n"
        ),
    )
    assert got.startswith(b"HTTP/1.1 401"), got[:200]
    assert b"100 Continue" not in got and b"ERR_UNAUTHORIZED" in got
    got = await raw_request(
        p.port,
        (
            "POST /uploads HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
            "Authorization: Bearer nope-nope-nope-nope\r\nExpect: 100-continue\r\n\r\n"
        ),
    )
    assert got.startswith(b"HTTP/1.1 401") and b"100 Continue" not in got
    # A valid token gets its 100 Continue.
    got = await raw_request(
        p.port,
        (
            "PUT /uploads/ok.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            f"Authorization: Bearer {TOKEN}\r\nExpect: 100-continue\r\n\r\n"
        ),
        timeout_s=2,
    )
    assert got.startswith(b"HTTP/1.1 100 Continue")
    await assert_nothing_left(s3, prefix)


async def test_signed_url_scope_size_expiry(
    start_proxy: StartProxy,
    s3: Any,
    prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    p = await start_proxy(auth=auth_section(tmp_path))
    secret = SECRET.encode()
    q = sign_url(secret, "PUT", key="photos/a.jpg", max_size_bytes=6 * MiB)
    status, _, body = await put(f"{p.url}/uploads/photos/a.jpg?{q}", data=b"jpeg")
    assert status == 201, body
    assert body["key"] == f"{prefix}photos/a.jpg"

    cases = [
        (f"/uploads/photos/b.jpg?{q}", 403, "ERR_KEY_NOT_ALLOWED"),
        (f"/uploads/photos/a.jpg?{q.replace('a.jpg', 'b.jpg')}", 403, "ERR_BAD_SIGNATURE"),
        (
            f"/uploads/x?{sign_url(secret, 'PUT', key='x', now=time.time() - 7200)}",
            403,
            "ERR_URL_EXPIRED",
        ),
        (f"/uploads/x?{sign_url(b'z' * 40, 'PUT', key='x')}", 403, "ERR_BAD_SIGNATURE"),
        (f"/uploads/x?{sign_url(secret, 'POST', key='x')}", 403, "ERR_BAD_SIGNATURE"),
    ]
    for path, want_status, want_code in cases:
        status, _, body = await put(p.url + path)
        assert (status, body["code"]) == (want_status, want_code), path
    # Declared too large: refused up front.  Chunked too large: cut off, nothing kept.
    q2 = sign_url(secret, "PUT", key="big.bin", max_size_bytes=MiB)
    status, _, body = await put(f"{p.url}/uploads/big.bin?{q2}", data=b"x" * (MiB + 1))
    assert (status, body["code"]) == (413, "ERR_TOO_LARGE")

    async def chunked() -> Any:
        for _ in range(7):
            yield b"y" * MiB

    status, _, body = await put(f"{p.url}/uploads/big.bin?{q2}", data=chunked())
    assert (status, body["code"]) == (413, "ERR_TOO_LARGE")
    assert await s3.list_multipart(prefix) == []
    assert await s3.head(f"{prefix}big.bin") is None
    sigs = [v for k, v in parse_qsl(q + "&" + q2) if k == "sig"]
    assert sigs and not any(sig in caplog.text for sig in sigs)


async def test_signed_prefix_post_puts_keys_under_prefix(
    start_proxy: StartProxy, s3: Any, prefix: str, tmp_path: Path
) -> None:
    p = await start_proxy(auth=auth_section(tmp_path))
    q = sign_url(SECRET.encode(), "POST", prefix="user42/")
    form = aiohttp.FormData()
    form.add_field("file", b"form body", filename="note.txt", content_type="text/plain")
    async with aiohttp.ClientSession() as s, s.post(f"{p.url}/uploads?{q}", data=form) as r:
        assert r.status == 201, await r.text()
        [item] = await r.json()
    assert item["key"].startswith(f"{prefix}user42/") and item["key"].endswith(".txt")
    # A key-scoped URL does not allow POST.
    q_key = sign_url(SECRET.encode(), "POST", key="k")
    async with aiohttp.ClientSession() as s, s.post(f"{p.url}/uploads?{q_key}", data=b"x") as r:
        assert (r.status, (await r.json())["code"]) == (403, "ERR_KEY_NOT_ALLOWED")


def test_sign_url_refuses_ambiguous_scopes() -> None:
    for kw in ({}, {"key": "a", "prefix": "b/"}, {"prefix": "nofinalslash"}, {"key": "a\nb"}):
        with pytest.raises(ValueError):
            sign_url(b"k" * 32, "PUT", **kw)
    with pytest.raises(Forbidden):
        Authenticator(enabled=True).authenticate("PUT", {}, {"sig": "0" * 64, "key": "a"})


def forged_query(method: str, *, expires: int, prefix: str) -> dict[str, str]:
    """A validly signed query that sign_url refuses to mint (a web app may sign its own)."""
    sig = hmac.new(
        SECRET.encode(), canonical(method, str(expires), None, prefix, ""), hashlib.sha256
    ).hexdigest()
    return {"expires": str(expires), "prefix": prefix, "sig": sig}


@pytest.mark.parametrize("prefix", ["user1", ""])
def test_signed_prefix_must_end_with_a_slash(prefix: str) -> None:
    """A prefix "user1" would allow "user10/..."; "" would allow every key."""
    a = Authenticator(enabled=True, signing_secret=SECRET.encode())
    query = forged_query("PUT", expires=int(time.time()) + 60, prefix=prefix)
    with pytest.raises(Forbidden) as e:
        a.authenticate("PUT", {}, query).check_key("user10/x.bin")
    assert e.value.code == "ERR_BAD_SIGNATURE"


def test_signed_url_lifetime_is_capped() -> None:
    now = 1_800_000_000.0
    a = Authenticator(enabled=True, signing_secret=SECRET.encode(), max_url_lifetime_s=3600)
    ok = dict(parse_qsl(sign_url(SECRET.encode(), "PUT", key="k", expires_in_s=3600, now=now)))
    assert a.authenticate("PUT", {}, ok, now=now).key == "k"
    long = dict(parse_qsl(sign_url(SECRET.encode(), "PUT", key="k", expires_in_s=3601, now=now)))
    with pytest.raises(Forbidden) as e:
        a.authenticate("PUT", {}, long, now=now)
    assert e.value.code == "ERR_URL_LIFETIME"
    # The same URL is good once it is within the limit of its expiry.
    assert a.authenticate("PUT", {}, long, now=now + 1).key == "k"
    # The default is a week.
    week = Authenticator(enabled=True, signing_secret=SECRET.encode())
    year = dict(parse_qsl(sign_url(SECRET.encode(), "PUT", key="k", expires_in_s=365 * 86400)))
    with pytest.raises(Forbidden):
        week.authenticate("PUT", {}, year)
    assert from_dict({"auth": {"mode": "none"}}).auth.signed_url_max_lifetime_s == 7 * 86400


async def test_signed_url_limits_over_http(
    start_proxy: StartProxy, s3: Any, prefix: str, tmp_path: Path
) -> None:
    p = await start_proxy(auth=auth_section(tmp_path, signed_url_max_lifetime_s=3600))
    bare = forged_query("PUT", expires=int(time.time()) + 60, prefix="user1")
    status, _, body = await put(f"{p.url}/uploads/user10/x.bin", params=bare)
    assert (status, body["code"]) == (403, "ERR_BAD_SIGNATURE")
    q = sign_url(SECRET.encode(), "PUT", key="a.bin", expires_in_s=86400)
    status, _, body = await put(f"{p.url}/uploads/a.bin?{q}")
    assert (status, body["code"]) == (403, "ERR_URL_LIFETIME")
    await assert_nothing_left(s3, prefix)


def test_sign_command_holds_to_the_lifetime_cap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.__main__ import main
    from tests.daemon import write_config

    secret_file = tmp_path / "signing.secret"
    secret_file.write_text(SECRET)
    cfg = write_config(
        tmp_path / "c.toml",
        {"auth": {"signing_secret_file": str(secret_file), "signed_url_max_lifetime_s": 600}},
    )
    assert main(["-c", str(cfg), "sign", "--key", "a.jpg", "--expires-in", "600"]) == 0
    assert "sig=" in capsys.readouterr().out
    assert main(["-c", str(cfg), "sign", "--key", "a.jpg", "--expires-in", "601"]) == 2
    assert "signed_url_max_lifetime_s" in capsys.readouterr().err


def test_operator_tokens_config(tmp_path: Path) -> None:
    op_file = tmp_path / "operators"
    op_file.write_text(f"# ops\nplain-operator-token-0123\n{hash_token('other-operator-token')}\n")
    cfg = from_dict(
        {
            "auth": {
                "mode": "none",
                "operator_tokens": [hash_token("operator-token-0123456789")],
                "operator_token_file": str(op_file),
            }
        }
    )
    assert len(cfg.auth.operator_token_sha256) == 3
    assert cfg.auth.operator_token_sha256[0].hex() not in repr(cfg.auth)
    with pytest.raises(ConfigError, match=r"auth\.operator_tokens: .*both"):
        from_dict({"auth": {"tokens": [hash_token(TOKEN)], "operator_tokens": [hash_token(TOKEN)]}})
    with pytest.raises(ConfigError) as e:
        from_dict({"auth": {"mode": "none", "operator_tokens": ["plain-operator-token-0123"]}})
    assert "plain-operator-token" not in str(e.value)  # a pasted token is never echoed


async def test_operator_token_is_not_an_upload_token(
    start_proxy: StartProxy, s3: Any, prefix: str, tmp_path: Path
) -> None:
    op = "operator-token-0123456789"
    p = await start_proxy(auth=auth_section(tmp_path, operator_tokens=[hash_token(op)]))
    status, _, body = await put(f"{p.url}/uploads/a.bin", headers={"Authorization": f"Bearer {op}"})
    assert (status, body["code"]) == (401, "ERR_UNAUTHORIZED")
    for token, want in ((op, 200), (TOKEN, 401)):
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as s, s.get(f"{p.url}/status", headers=headers) as r:
            assert r.status == want
            assert ("uploads" in await r.json()) == (want == 200)
    await assert_nothing_left(s3, prefix)
