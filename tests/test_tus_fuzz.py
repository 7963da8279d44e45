"""Property test: no tus header, however malformed, gets a 5xx or a traceback.

The proxy is the real one (``start_proxy``: real app, real S3) on the test's event loop;
hypothesis drives it from a worker thread with a blocking client, so every example is a
real HTTP request through aiohttp's parser, our middleware and the tus handlers."""

from __future__ import annotations

import asyncio
import http.client
import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tus_helpers import create, tus_sections

from conftest import StartProxy

TUS_HEADERS = [
    "Tus-Resumable",
    "Upload-Length",
    "Upload-Offset",
    "Upload-Defer-Length",
    "Upload-Metadata",
    "Upload-Checksum",
    "Upload-Concat",
    "X-HTTP-Method-Override",
    "Content-Type",
    "Expect",
    "Origin",
    "Access-Control-Request-Method",
    "Access-Control-Request-Headers",
    "Authorization",
    "X-Forwarded-For",
]
# Values that sit on the edges of what each header's parser accepts.
EDGES = [
    "",
    "0",
    "1",
    "5",
    "-1",
    "+1",
    "1_0",
    "1e3",
    "0x10",
    "\u00b2",  # superscript two: str.isdigit() is true, int() fails
    "\u0661\u0662",  # Arabic-Indic 12: int() accepts it
    "\uff11",  # fullwidth 1
    "99999999999999999999",
    str(2**63),
    "1.0.0",
    "0.2.2",
    "sha1",
    "sha1 ",
    "sha256 AAAA",
    "md5 1B2M2Y8AsgTpgAmY7PhCfg==",
    "crc32 AAAAAA==",
    "filename",
    "filename ",
    "filename dGVzdA==",
    "filename dGVzdA==,filename dGVzdA==",
    "filetype aW1hZ2UvcG5n, filename Li4vLi4vZXRjL3Bhc3N3ZA==",
    "a b c",
    ",,,",
    "final;/files/a",
    "PATCH",
    "DELETE",
    "HEAD",
    "GET",
    "patch",
    "application/offset+octet-stream",
    "application/offset+octet-stream; charset=\u00e9",
    "100-continue",
    "https://app.example.com",
    "Bearer x",
    "\u202egpj.exe",
    "\x00",
    "\x7f\x85",
]
SANE = {
    "POST": {"Tus-Resumable": "1.0.0", "Upload-Length": "10"},
    "PATCH": {
        "Tus-Resumable": "1.0.0",
        "Upload-Offset": "0",
        "Content-Type": "application/offset+octet-stream",
    },
    "HEAD": {"Tus-Resumable": "1.0.0"},
    "DELETE": {"Tus-Resumable": "1.0.0"},
    "OPTIONS": {"Origin": "https://app.example.com", "Access-Control-Request-Method": "PATCH"},
}
INTEGER_HEADERS = {"Upload-Length", "Upload-Offset", "Upload-Defer-Length"}


def sendable(value: str) -> bool:
    return "\r" not in value and "\n" not in value  # http.client refuses to send those


texts = st.one_of(st.sampled_from(EDGES), st.text(max_size=40))
# Integer headers also get strings of every kind of Unicode digit (decimal, superscript,
# circled, other scripts'), alone and mixed with ASCII ones: str.isdigit and int disagree
# on some, and int takes others that HTTP does not.
numbers = st.one_of(
    texts,
    st.text(st.characters(categories=("Nd", "No")), min_size=1, max_size=4),
    st.text(st.sampled_from("0123456789\u00b2\u0661\uff11"), min_size=1, max_size=22),
)


def values_for(name: str) -> st.SearchStrategy[tuple[str, str]]:
    return st.tuples(
        st.just(name), (numbers if name in INTEGER_HEADERS else texts).filter(sendable)
    )


async def test_tus_headers_never_get_a_5xx(
    start_proxy: StartProxy, http: Any, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    proxy = await start_proxy(
        server={"trusted_proxies": ["127.0.0.1/32"]},
        # No cap: creations must keep reaching the code behind it.
        **tus_sections(
            prefix, cors_allow_origins=["https://app.example.com"], max_unfinished_per_principal=0
        ),
    )
    live = [(await create(http, proxy.url, 1000)).rsplit("/", 1)[1] for _ in range(3)]
    targets = ["/files/", "/files", "/files/garbage", f"/files/{'0' * 32}"]
    targets += [f"/files/{i}" for i in live]
    seen: list[int] = []

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        method=st.sampled_from(["POST", "HEAD", "PATCH", "DELETE", "OPTIONS", "GET"]),
        target=st.sampled_from(targets),
        sane=st.booleans(),
        headers=st.lists(st.sampled_from(TUS_HEADERS).flatmap(values_for), max_size=4),
        body=st.binary(max_size=64),
    )
    # Upload-Length: ² answered 500 with a traceback; Upload-Offset: ١٢ was taken as 12.
    @example("POST", "/files/", True, [("Upload-Length", "\u00b2")], b"")
    @example("PATCH", targets[-1], True, [("Upload-Offset", "\u0661\u0662")], b"x")
    # Valid ones: the harness itself can create and write (explicit examples run first).
    @example("POST", "/files/", True, [], b"")
    @example("PATCH", targets[-2], True, [], b"x")
    def one(
        method: str, target: str, sane: bool, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        # Half the examples start from a valid request, so the fuzzed headers also reach
        # the code behind the version, length and content-type checks.
        sent: dict[str, Any] = dict(SANE.get(method, {})) if sane else {}
        sent.update({k: v.encode("utf-8") for k, v in headers})
        conn = http_client(proxy.port)
        try:
            conn.request(method, target, body=body if method != "HEAD" else None, headers=sent)
            r = conn.getresponse()
            data = r.read()
        finally:
            conn.close()
        seen.append(r.status)
        assert r.status < 500, (method, target, headers, r.status, data)

    await asyncio.to_thread(one)
    assert 201 in seen and 204 in seen and 400 in seen  # the harness does reach real work
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]
    assert "Traceback" not in caplog.text


def http_client(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=30)
