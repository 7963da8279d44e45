"""Property tests: keys, headers and signed-URL fields never cause a 500 and never put an
object outside the allowed prefix.  The proxy is real (own loop in a thread, real S3),
driven by a synchronous client so hypothesis can run the examples."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.app import Runtime, build_app
from proxy.auth import SIGNED_FIELDS, Authenticator, Grant, sign_url
from proxy.errors import ProxyError
from proxy.keys import full_key
from proxy.server import make_runner
from tests.conftest import make_config, s3_for

T = TypeVar("T")
SECRET = b"f" * 32
ALLOWED = "user/"

segments = st.sampled_from(
    [
        "..",
        ".",
        "",
        "user",
        "user/",
        "/",
        "\\",
        "%2e%2e",
        "%2F",
        "a",
        "~",
        "\x00",
        "\x7f",
        "é",
        " ",
        "?",
        "#",
        "*",
    ]
)
keys = st.one_of(st.text(max_size=40), st.lists(segments, max_size=8).map("".join))
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)


@given(
    method=st.sampled_from(["PUT", "POST", "GET"]),
    query=st.dictionaries(st.sampled_from(SIGNED_FIELDS), st.text(max_size=80)),
    auth=st.none() | st.text(max_size=80),
)
def test_authenticate_only_grants_or_refuses(
    method: str, query: dict[str, str], auth: str | None
) -> None:
    a = Authenticator(enabled=True, token_sha256=(b"\0" * 32,), signing_secret=SECRET)
    headers = {} if auth is None else {"Authorization": auth}
    try:
        grant = a.authenticate(method, headers, query)
    except ProxyError as e:
        assert e.status in (401, 403)
        assert SECRET.decode() not in e.message and (
            auth is None or auth not in e.message or len(auth) < 4
        )
        return
    pytest.fail(f"forged credentials accepted: {grant}")  # nothing above is validly signed


@given(
    key=st.text(min_size=1, max_size=30).filter(lambda k: "\n" not in k),
    use_prefix=st.booleans(),
    max_size=st.none() | st.integers(0, 2**40),
    field=st.sampled_from(["expires", "key", "prefix", "max_size", "sig"]),
    junk=st.text(min_size=1, max_size=5),
)
def test_signed_url_roundtrip_and_any_change_is_refused(
    key: str, use_prefix: bool, max_size: int | None, field: str, junk: str
) -> None:
    scope = {"prefix": key + "/"} if use_prefix else {"key": key}
    query = dict(parse_qsl(sign_url(SECRET, "PUT", max_size_bytes=max_size, **scope)))
    a = Authenticator(enabled=True, signing_secret=SECRET)
    grant = a.authenticate("PUT", {}, query)
    assert grant == Grant(
        "signed",
        key=scope.get("key"),
        prefix=scope.get("prefix"),
        max_size_bytes=max_size,
        principal=grant.principal,
        scopes=frozenset({"upload"}),  # a PUT link writes, and does nothing else
    )
    assert grant.principal.kind == "signed" and grant.principal.ref not in query["sig"]
    changed = dict(query)
    changed[field] = changed.get(field, "") + junk
    with pytest.raises(ProxyError) as e:
        a.authenticate("PUT", {}, changed)
    assert e.value.status == 403


@given(key=keys, prefix=st.sampled_from(["", "in/", "a/b/"]))
def test_full_key_never_escapes_the_prefix(key: str, prefix: str) -> None:
    try:
        stored = full_key(prefix, key)
    except ProxyError as e:
        assert e.status == 400
        return
    assert stored.startswith(prefix) and "/../" not in f"/{stored}/"


class ProxyThread:
    """The real app and S3 client on their own event loop, for synchronous examples."""

    def __init__(self, sw: Any, prefix: str, tmp: Path) -> None:
        secret = tmp / "secret"
        secret.write_bytes(SECRET)
        self.config = make_config(
            sw, prefix, auth={"mode": "required", "signing_secret_file": str(secret)}
        )
        self.sw = sw
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self.call(self._start())

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    async def _start(self) -> int:
        self.s3 = await s3_for(self.sw).open()
        self.runner = make_runner(build_app(Runtime(self.config, storage=self.s3)), self.config)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return int(self.runner.addresses[0][1])

    async def _stop(self) -> None:
        await self.runner.cleanup()
        await self.s3.close()

    async def all_keys(self) -> set[str]:
        return {o.key for o in await self.s3.list_objects("")}

    def close(self) -> None:
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def proxy_thread(seaweed: Any, prefix: str, tmp_path: Path) -> Any:
    pt = ProxyThread(seaweed, prefix, tmp_path)
    yield pt
    pt.close()


def test_http_fuzz_never_500_never_outside_prefix(proxy_thread: ProxyThread, prefix: str) -> None:
    before = proxy_thread.call(proxy_thread.all_keys())
    signed = sign_url(SECRET, "PUT", prefix=ALLOWED, max_size_bytes=64)
    created: list[str] = []
    # The harness can succeed at all: a plain signed upload under the prefix is stored.
    conn = http.client.HTTPConnection("127.0.0.1", proxy_thread.port, timeout=30)
    conn.request("PUT", f"/uploads/{ALLOWED}sane.bin?{signed}", body=b"ok")
    assert conn.getresponse().status == 201
    conn.close()

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        key=st.one_of(keys, keys.map(lambda k: ALLOWED + k)),
        raw=st.booleans(),
        signed_ok=st.booleans(),
        headers=st.dictionaries(
            st.sampled_from(
                [
                    "Content-Type",
                    "X-Forwarded-For",
                    "Content-MD5",
                    "Repr-Digest",
                    "X-Content-SHA256",
                    "Authorization",
                    "Content-Disposition",
                ]
            ),
            header_text,
        ),
        body=st.binary(max_size=100),
    )
    def one(key: str, raw: bool, signed_ok: bool, headers: dict[str, str], body: bytes) -> None:
        path = "/uploads/" + (quote(key, safe="/%") if raw else quote(key, safe="/"))
        query = signed if signed_ok else sign_url(b"x" * 32, "PUT", prefix=ALLOWED)
        conn = http.client.HTTPConnection("127.0.0.1", proxy_thread.port, timeout=30)
        try:
            conn.request("PUT", f"{path}?{query}", body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
        finally:
            conn.close()
        assert r.status < 500, (r.status, data)
        if r.status == 201:
            stored = json.loads(data)["key"]
            assert signed_ok and len(body) <= 64
            assert stored.startswith(prefix + ALLOWED), stored
            created.append(stored)

    one()
    # Other tests' uploads may still be finishing in the shared bucket: theirs are under
    # their own t-<id>/ prefixes.  Anything else new is ours and must be under ALLOWED.
    new = {
        k
        for k in proxy_thread.call(proxy_thread.all_keys()) - before
        if k.startswith(prefix) or not re.match(r"t-[0-9a-f]{12}/", k)
    }
    assert all(k.startswith(prefix + ALLOWED) for k in new), new
    assert set(created) <= new
    print(f"fuzz: {len(created)} objects created")
