"""IETF resumable uploads: a request that says it completes the upload (``Upload-Complete:
?1``, interop 3's ``Upload-Incomplete: ?0``) with a chunked body ends the upload where the
body ends, so a body that ends short of (or runs past) a length known before is an
inconsistent length: 400 ``ERR_INCONSISTENT_LENGTH``, never a 2xx, nothing stored as
complete.  (With ``Content-Length`` the same mismatch is refused before the body.)  The
bytes of a short body are kept as those of a body that breaks are: resumable where the
client knows the URL; a creation whose client does not is discarded."""

from __future__ import annotations

import os
from typing import Any

import pytest
from sec_http import Answer, answers_to, build, exchange
from tus_helpers import tus_sections

from conftest import StartProxy, assert_nothing_left, get_object

VERSIONS = [3, 5, 6, 8]
LENGTH = 3000


def said(version: int, complete: bool) -> dict[str, str]:
    """The headers of a request of ``version`` that says it completes the upload, or not."""
    headers = {"Upload-Draft-Interop-Version": str(version)}
    if version == 3:
        headers["Upload-Incomplete"] = "?0" if complete else "?1"
    else:
        headers["Upload-Complete"] = "?1" if complete else "?0"
    return headers


def append_headers(version: int, offset: int, complete: bool) -> dict[str, str]:
    headers = {**said(version, complete), "Upload-Offset": str(offset)}
    if version >= 6:
        headers["Content-Type"] = "application/partial-upload"
    return headers


async def chunked(
    port: int, method: str, path: str, headers: dict[str, str], data: bytes
) -> list[Answer]:
    """One request with a chunked body (no Content-Length): every answer, 1xx included."""
    framed = (f"{len(data):x}\r\n".encode() + data + b"\r\n" if data else b"") + b"0\r\n\r\n"
    head = {**headers, "Transfer-Encoding": "chunked", "Connection": "close"}
    return await answers_to(port, build(method, path, head) + framed, method=method)


def refused(got: list[Answer]) -> None:
    final = got[-1]
    assert (final.status, final.code) == (400, "ERR_INCONSISTENT_LENGTH"), (final.head, final.body)
    assert final.json()["type"].endswith("#inconsistent-upload-length")


@pytest.mark.parametrize("sent", [1000, 4000], ids=["short", "long"])
@pytest.mark.parametrize("target", ["POST /files/", "PUT /uploads/short.bin"])
@pytest.mark.parametrize("version", VERSIONS)
async def test_a_complete_creation_whose_chunked_body_misses_its_length_is_refused(
    start_proxy: StartProxy, s3: Any, prefix: str, version: int, target: str, sent: int
) -> None:
    """It used to be a 201 (Upload-Complete: ?0, Upload-Offset: 1000) with nothing stored;
    its client never learnt the URL (no 104), so nothing is kept."""
    proxy = await start_proxy(**tus_sections(prefix))
    method, path = target.split()
    headers = {**said(version, True), "Upload-Length": str(LENGTH)}
    got = await chunked(proxy.port, method, path, headers, os.urandom(sent))
    refused(got)
    await assert_nothing_left(s3, prefix)


async def test_an_announced_creation_keeps_what_a_short_body_brought(
    start_proxy: StartProxy, s3: Any, prefix: str
) -> None:
    """With the 104 the client knows the URL: the bytes stay, resumable, not complete."""
    proxy = await start_proxy(**tus_sections(prefix, send_104=True))
    data = os.urandom(LENGTH)
    headers = {**said(8, True), "Upload-Length": str(LENGTH)}
    got = await chunked(proxy.port, "POST", "/files/", headers, data[:1000])
    assert [a.status for a in got[:-1]] == [104]
    refused(got)
    url = got[0].headers["location"]
    h = await exchange(proxy.port, "HEAD", url, said(8, False))
    assert (h.status, h.headers["upload-offset"], h.headers["upload-complete"]) == (
        204,
        "1000",
        "?0",
    )
    done = await exchange(proxy.port, "PATCH", url, append_headers(8, 1000, True), data[1000:])
    assert (done.status, done.headers["upload-complete"]) == (200, "?1")
    assert (await get_object(s3, done.json()["key"]))[0] == data


@pytest.mark.parametrize("sent", [1000, 4000], ids=["short", "long"])
@pytest.mark.parametrize("version", VERSIONS)
async def test_a_complete_append_whose_chunked_body_misses_the_length_is_refused(
    start_proxy: StartProxy, s3: Any, prefix: str, version: int, sent: int
) -> None:
    """It used to be answered 201 (interop 3 to 6) or 204 (interop 8), the upload left
    incomplete.  A short body's bytes are kept (as a broken body's); a long one's are
    not (no byte past the length is stored); either way the upload stays resumable."""
    proxy = await start_proxy(**tus_sections(prefix))
    data = os.urandom(LENGTH)
    created = await exchange(
        proxy.port, "POST", "/files/", {**said(version, False), "Upload-Length": str(LENGTH)},
        data[:500],
    )  # fmt: skip
    assert created.status == 201, created.body
    url = created.headers["location"]
    body = data[500:1500] if sent == 1000 else data[500:] + os.urandom(sent - LENGTH + 500)
    refused(await chunked(proxy.port, "PATCH", url, append_headers(version, 500, True), body))
    h = await exchange(proxy.port, "HEAD", url, said(version, False))
    offset = 1500 if sent == 1000 else 500
    assert h.status == 204 and h.headers["upload-offset"] == str(offset)
    assert h.headers.get("upload-complete", "?0") == "?0"
    assert h.headers.get("upload-incomplete", "?1") == "?1"
    done = await exchange(proxy.port, "PATCH", url, append_headers(version, offset, True),
                          data[offset:])  # fmt: skip
    assert done.status == (200 if version == 8 else 201), done.body
    assert (await get_object(s3, done.json()["key"]))[0] == data
