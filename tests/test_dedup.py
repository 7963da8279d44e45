"""Instant uploads by SHA-256 (proxy/engine/dedup.py), driven over raw sockets so that
every byte the client sends is under the test's control: a deduplicated PUT must be
answered before its body is asked for, and the proxy's received-bytes counter proves it
read nothing."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.auth import hash_token
from proxy.config import ConfigError, from_dict
from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import EmbeddedSeaweed
from proxy.tus.maintenance import sweep_once
from proxy.tus.state import storage_id
from proxy.web.tus_common import TUS as TUS_ROUTES
from tests.daemon import start_daemon
from tests.obs_helpers import scrape, value
from tests.sec_http import build, connect, exchange, read_answer
from tests.tus_helpers import sid, store_for, tus_key, tus_sections

from conftest import MiB, StartProxy, data_path

TOKEN_A = "alice-token-0123456789"
TOKEN_B = "bob-token-0123456789"


def digest_headers(data_sha256: bytes, token: str | None = None) -> dict[str, str]:
    headers = {"Repr-Digest": f"sha-256=:{base64.b64encode(data_sha256).decode()}:"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


async def put_with_expect(
    port: int, path: str, size: int, headers: dict[str, str], body: bytes | None
) -> tuple[bool, int, dict[str, object]]:
    """PUT with ``Expect: 100-continue``: (was 100 Continue sent?, final status, JSON).
    After a 100 the ``body`` goes out (None: the test expected no 100)."""
    reader, writer = await connect(port)
    try:
        head = {**headers, "Expect": "100-continue", "Content-Length": str(size)}
        writer.write(build("PUT", path, head, length=False))
        await writer.drain()
        answer = await read_answer(reader)
        continued = answer.status == 100
        if continued:
            assert body is not None, "the proxy asked for a body the test did not expect to send"
            writer.write(body)
            await writer.drain()
            answer = await read_answer(reader)
        return continued, answer.status, answer.json()
    finally:
        writer.close()


async def object_sha256(s3: S3Storage, key: str) -> tuple[str, dict[str, str]]:
    h = hashlib.sha256()
    async for chunk in s3.iter_object(key, chunk_bytes=MiB):
        h.update(chunk)
    head = await s3.head(key)
    assert head is not None
    return h.hexdigest(), head.metadata


async def test_second_put_of_64_mib_is_a_server_side_copy_and_reads_no_body(
    tmp_path: Path, seaweed: EmbeddedSeaweed, s3: S3Storage, prefix: str
) -> None:
    size = 64 * MiB
    path = data_path(tmp_path, size, seed=16)
    data = path.read_bytes()
    sha = hashlib.sha256(data).digest()
    d = await start_daemon(tmp_path, seaweed, prefix)
    try:
        continued, status, doc = await put_with_expect(
            d.port, "/uploads/first.bin", size, digest_headers(sha), data
        )
        assert (continued, status) == (True, 201) and "deduplicated" not in doc
        before = await scrape(d.url)
        assert value(before, "proxy_received_bytes_total") == size

        continued, status, doc = await put_with_expect(
            d.port, "/uploads/second.bin", size, digest_headers(sha), None
        )
        assert (continued, status) == (False, 201)
        assert doc["deduplicated"] is True
        assert (doc["size"], doc["sha256"]) == (size, sha.hex())

        after = await scrape(d.url)
        assert value(after, "proxy_received_bytes_total") == size  # not one byte more
        assert value(after, "proxy_dedup_uploads_total", protocol="http") == 1
        assert value(after, "proxy_dedup_saved_bytes_total", protocol="http") == size
        assert value(after, "proxy_uploads_completed_total") == 2
        stored, meta = await object_sha256(s3, f"{prefix}second.bin")
        assert stored == sha.hex() and meta["sha256"] == sha.hex()
        # Create-only holds for the copy too: the key is now taken.
        continued, status, doc = await put_with_expect(
            d.port, "/uploads/second.bin", size, digest_headers(sha), None
        )
        assert (continued, status, doc["code"]) == (False, 409, "ERR_KEY_EXISTS")
        assert doc["identical"] is True  # auth off: every client is the one principal
    finally:
        await d.stop()


async def test_without_expect_the_answer_comes_at_once_and_the_body_is_dropped(
    start_proxy: StartProxy, s3: S3Storage, prefix: str
) -> None:
    proxy = await start_proxy()
    body = b"x" * (3 * MiB)
    sha = hashlib.sha256(body).digest()
    first = await exchange(proxy.port, "PUT", "/uploads/a", digest_headers(sha), body)
    assert first.status == 201
    received = proxy.runtime.events.stats.received_bytes
    again = await exchange(proxy.port, "PUT", "/uploads/b", digest_headers(sha), body)
    assert again.status == 201 and again.json()["deduplicated"] is True
    assert proxy.runtime.events.stats.received_bytes == received
    assert (await object_sha256(s3, f"{prefix}b"))[0] == sha.hex()


async def test_an_entry_whose_object_was_deleted_or_changed_behind_our_back_is_not_trusted(
    start_proxy: StartProxy, s3: S3Storage, prefix: str
) -> None:
    proxy = await start_proxy()
    body = b"stale entries " * 100_000
    sha = hashlib.sha256(body).digest()
    assert (
        await exchange(proxy.port, "PUT", "/uploads/a", digest_headers(sha), body)
    ).status == 201
    await s3.delete_object(f"{prefix}a")  # behind the proxy's back

    continued, status, doc = await put_with_expect(
        proxy.port, "/uploads/b", len(body), digest_headers(sha), body
    )
    assert (continued, status) == (True, 201) and "deduplicated" not in doc

    # Same size, other bytes, no metadata of ours: written straight to the store.
    await s3.put_object(
        f"{prefix}b",
        memoryview(b"X" * len(body)),
        metadata={},
        content_type="application/octet-stream",
        checksum=None,
        if_none_match=False,
    )
    continued, status, doc = await put_with_expect(
        proxy.port, "/uploads/c", len(body), digest_headers(sha), body
    )
    assert (continued, status) == (True, 201) and "deduplicated" not in doc
    assert (await object_sha256(s3, f"{prefix}c"))[0] == sha.hex()

    m = await scrape(proxy.url)
    assert value(m, "proxy_dedup_lookups_total", result="stale") == 2
    assert value(m, "proxy_dedup_uploads_total", protocol="http") == 0
    # Entries are re-pointed by the uploads that streamed: the next one is instant.
    continued, status, doc = await put_with_expect(
        proxy.port, "/uploads/d", len(body), digest_headers(sha), None
    )
    assert (continued, status, doc["deduplicated"]) == (False, 201, True)


@pytest.mark.parametrize("expect", [True, False])
async def test_a_caller_without_access_learns_nothing(
    start_proxy: StartProxy, s3: S3Storage, prefix: str, expect: bool
) -> None:
    tokens = [hash_token(TOKEN_A), hash_token(TOKEN_B)]
    proxy = await start_proxy(auth={"mode": "required", "tokens": tokens})
    body = b"alice's secret " * 50_000
    sha = hashlib.sha256(body).digest()
    stranger = hashlib.sha256(b"nobody uploaded this").digest()
    put = await exchange(proxy.port, "PUT", "/uploads/alice", digest_headers(sha, TOKEN_A), body)
    assert put.status == 201

    # Bob declares Alice's content: he is asked for the body (exactly as for content that
    # exists nowhere) and his object is stored from it, not copied.
    for key, digest in (("bob1", sha), ("bob2", stranger)):
        if expect:
            continued, status, _ = await put_with_expect(
                proxy.port, f"/uploads/{key}", len(body), digest_headers(digest, TOKEN_B), body
            )
            assert continued
        else:
            answer = await exchange(
                proxy.port, "PUT", f"/uploads/{key}", digest_headers(digest, TOKEN_B), body
            )
            status = answer.status
        assert status == (201 if digest == sha else 400)  # bob2's body does not match
    m = await scrape(proxy.url)
    assert value(m, "proxy_dedup_uploads_total", protocol="http") == 0
    # Alice's first PUT and both of Bob's: one index GET each, the same for both of his.
    assert value(m, "proxy_dedup_lookups_total", result="miss") == 3

    # Alice's key: Bob learns it is taken (create-only tells everyone that), not what it holds.
    bob = await exchange(proxy.port, "PUT", "/uploads/alice", digest_headers(sha, TOKEN_B), body)
    assert (bob.status, bob.code) == (409, "ERR_KEY_EXISTS") and "identical" not in bob.json()
    alice = await exchange(proxy.port, "PUT", "/uploads/alice", digest_headers(sha, TOKEN_A), body)
    assert (alice.status, alice.json().get("identical")) == (409, True)


async def test_the_index_prefix_is_reserved(start_proxy: StartProxy, prefix: str) -> None:
    # key_prefix "" (the shipped default): client keys and the index share the namespace.
    proxy = await start_proxy(upload={"key_prefix": ""})
    for key in (f".dedup/{prefix}anonymous/-/{'0' * 64}", f".dedup/{prefix}".rstrip("/")):
        answer = await exchange(proxy.port, "PUT", f"/uploads/{key}", {}, b"1")
        assert (answer.status, answer.code) == (400, "ERR_INVALID_KEY")


@pytest.mark.parametrize(
    ("sections", "problem"),
    [
        ({"upload": {"key_prefix": ".dedup/x/"}}, "upload.key_prefix"),
        ({"dedup": {"index_prefix": ".tus/"}}, "dedup.index_prefix"),
        ({"dedup": {"index_prefix": "tus/"}}, "dedup.index_prefix"),
        ({"dedup": {"index_prefix": "/abs/"}}, "dedup.index_prefix"),
        ({"dedup": {"index_prefix": "no-slash"}}, "dedup.index_prefix"),
    ],
)
def test_the_index_prefix_may_not_overlap_other_prefixes(
    sections: dict[str, dict[str, str]], problem: str
) -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(sections)
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def tus_metadata(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


async def test_tus_creation_with_the_hash_completes_at_once_and_tus_uploads_are_indexed(
    start_proxy: StartProxy, s3: S3Storage, prefix: str
) -> None:
    proxy = await start_proxy()
    body = b"tus and put share one index " * 200_000
    sha = hashlib.sha256(body).hexdigest()
    tus = {"Tus-Resumable": "1.0.0", "Upload-Length": str(len(body))}

    # A tus upload that streams: its completion indexes the content.
    meta = tus_metadata(filename="first.bin", sha256=sha)
    created = await exchange(proxy.port, "POST", "/files/", {**tus, "Upload-Metadata": meta})
    assert created.status == 201 and "upload-offset" not in created.headers
    patch = await exchange(
        proxy.port,
        "PATCH",
        created.headers["location"],
        {
            "Tus-Resumable": "1.0.0",
            "Upload-Offset": "0",
            "Content-Type": "application/offset+octet-stream",
        },
        body,
    )
    assert (patch.status, patch.headers["upload-sha256"]) == (204, sha)
    received = proxy.runtime.events.stats.received_bytes

    # The same content again: complete in the creation answer, no PATCH, no byte read.
    meta = tus_metadata(filename="second.bin", sha256=sha)
    instant = await exchange(proxy.port, "POST", "/files/", {**tus, "Upload-Metadata": meta})
    assert instant.status == 201
    assert instant.headers["upload-offset"] == str(len(body))
    assert instant.headers["upload-sha256"] == sha
    url_id = instant.headers["location"].rsplit("/", 1)[1]
    key = f"{prefix}tus/{storage_id(url_id)}/second.bin"
    stored, meta_stored = await object_sha256(s3, key)
    assert stored == sha and meta_stored["filename"] == "second.bin"
    assert proxy.runtime.events.stats.received_bytes == received
    m = await scrape(proxy.url)
    assert value(m, "proxy_dedup_uploads_total", protocol="tus") == 1
    assert value(m, "proxy_dedup_saved_bytes_total", protocol="tus") == len(body)
    # Nothing is left to resume: a HEAD says it is complete (from the object, to its owner).
    head = await exchange(
        proxy.port, "HEAD", instant.headers["location"], {"Tus-Resumable": "1.0.0"}
    )
    assert head.status == 200
    assert head.headers["upload-offset"] == head.headers["upload-length"] == str(len(body))

    # A PUT finds what tus stored; a malformed declared hash is a 400.
    continued, status, doc = await put_with_expect(
        proxy.port, "/uploads/third.bin", len(body), digest_headers(bytes.fromhex(sha)), None
    )
    assert (continued, status, doc["deduplicated"]) == (False, 201, True)
    bad = await exchange(
        proxy.port, "POST", "/files/", {**tus, "Upload-Metadata": tus_metadata(sha256="abc")}
    )
    assert (bad.status, bad.code) == (400, "ERR_BAD_METADATA")


async def test_a_tus_upload_the_sweeper_finishes_is_indexed(
    start_proxy: StartProxy, s3: S3Storage, prefix: str, tmp_path: Path
) -> None:
    """The content index is written where every tus completion passes: an upload whose
    every byte is durable, completed by the tus sweeper (no request at all), is indexed
    like one its last PATCH completed, so the same content again is instant."""
    proxy = await start_proxy(**tus_sections(prefix))
    size = 5 * MiB + 1000  # one part and a pending tail
    data = data_path(tmp_path, size, seed=31).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    tus = {"Tus-Resumable": "1.0.0"}
    created = await exchange(
        proxy.port,
        "POST",
        "/files/",
        {**tus, "Upload-Defer-Length": "1", "Upload-Metadata": tus_metadata(filename="a.bin")},
    )
    assert created.status == 201
    url = created.headers["location"]
    octet = {**tus, "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}
    assert (await exchange(proxy.port, "PATCH", url, octet, data)).status == 204
    # Every byte durable, the length set, completion never decided: what a final PATCH
    # that failed after setting a deferred length leaves.  Only the sweeper finishes it.
    store = store_for(s3, prefix)
    loaded = await store.load(sid(url))
    assert loaded is not None and loaded[0].offset == size and not loaded[0].completing
    stuck = replace(loaded[0], length=size, rev=loaded[0].rev + 1)
    await s3.put_conditional(store.info_key(stuck.id), stuck.to_json(), if_match=loaded[1])
    assert await sweep_once(proxy.app[TUS_ROUTES].service) == 1
    assert (await object_sha256(s3, tus_key(prefix, url, "a.bin")))[0] == sha
    received = proxy.runtime.events.stats.received_bytes
    before = await scrape(proxy.url)

    again = await exchange(
        proxy.port,
        "POST",
        "/files/",
        {
            **tus,
            "Upload-Length": str(size),
            "Upload-Metadata": tus_metadata(filename="b.bin", sha256=sha),
        },
    )
    assert again.status == 201
    assert (again.headers["upload-offset"], again.headers["upload-sha256"]) == (str(size), sha)
    after = await scrape(proxy.url)
    hits = value(after, "proxy_dedup_lookups_total", result="hit") or 0
    assert hits - (value(before, "proxy_dedup_lookups_total", result="hit") or 0) == 1
    assert value(after, "proxy_dedup_uploads_total", protocol="tus") == 1
    assert proxy.runtime.events.stats.received_bytes == received  # not one body byte
