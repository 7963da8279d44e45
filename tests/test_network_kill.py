"""``kill -9`` of the daemon at each step of a completion, then a restart: the object and
the client's next answers agree, and nothing is left behind.

The fault proxy holds one S3 request of the completion, or the store's answer to it,
until the daemon is dead: so the daemon dies exactly between two steps (after the store
acted, or before it saw the request; a held request may also be let through after the
kill, as a packet in flight would be).  Then the same daemon is started again and the
client does what a client does after a broken connection: a tus client HEADs and
resumes from the offset it is told (an empty PATCH when every byte is in, which
finishes a decided completion); a plain client sends the same PUT again.  The checks:

* the client's answers are true: a tus ``Upload-SHA256`` (HEAD or PATCH) and a 201 are
  the digest of exactly the client's bytes, stored at the key with that sha256; a 409
  on the retry of a PUT means the key holds exactly the client's bytes (its earlier
  attempt), with their sha256;
* no tus state is left, and no multipart upload once the sweep window has passed.

Where today's daemon cannot make them agree the cell is a strict xfail with the reason.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import EmbeddedSeaweed
from tests.daemon import Daemon
from tests.fault_helpers import (
    LOCKED_BACKOFF_S,
    LOCKED_WAIT_S,
    PART,
    MiB,
    assert_stored,
    assert_swept,
    daemon_behind,
    payload,
    read_object,
    send,
    sha256_hex,
    tus_object_key,
    tus_state_left,
    unique_prefix,
)
from tests.faultproxy import Fault, FaultProxy, hold
from tests.tus_helpers import TUS, b64

# A daemon restart per cell, or seconds of lease per cell: not in test-fast.
pytestmark = pytest.mark.slow

LEASE_S = 3  # tus.lock_lease_s: the dead daemon's lease runs out soon
INFO = r"/info$"
SEGMENT = r"/pending-"
MARKER = r"/owners/"
COMPLETING = rb'"completing":true'
TOMBSTONE = (
    "a completed upload's state is deleted at once: a client whose final PATCH answer "
    "was lost (here the daemon died; a broken connection does the same) gets 404 on HEAD "
    "and cannot learn that its upload is stored; tusd keeps the info of a finished "
    "upload for that (proxy/tus_state.py, proxy/tus_upload.py)"
)
UNLABELLED = (
    "the daemon died between CompleteMultipartUpload and the metadata copy: the object "
    "stays without its sha256, and the client's retry gets 409 for it; nothing records "
    "that it still has to be labelled (proxy/streaming.py)"
)


@dataclass(frozen=True)
class Step:
    op: str
    fault: Fault
    what: str
    key: str | None = None
    body: bytes | None = None
    query: str | None = None
    forward: bool = False  # a held request: let it reach the store after the kill
    xfail: str = ""

    def param(self) -> Any:
        marks = [pytest.mark.xfail(strict=True, reason=self.xfail)] if self.xfail else []
        return pytest.param(self, id=self.what, marks=marks)


@dataclass
class Killable:
    """The daemon of this module behind its fault proxy; restarted by every test."""

    fp: FaultProxy
    daemon: Daemon
    tmp_path: Path


@pytest.fixture(scope="module")
def kill_prefix() -> str:
    return unique_prefix("k")


@pytest.fixture(scope="module")
async def killable(
    seaweed: EmbeddedSeaweed, tmp_path_factory: pytest.TempPathFactory, kill_prefix: str
) -> AsyncIterator[Killable]:
    tmp_path = tmp_path_factory.mktemp("kill")
    tus = {"lock_lease_s": LEASE_S}
    async with daemon_behind(seaweed, tmp_path, kill_prefix, tus=tus) as (fp, daemon):
        k = Killable(fp, daemon, tmp_path)
        try:
            yield k
        finally:
            await k.daemon.stop()  # the last restart's


async def kill_at(
    k: Killable, seaweed: EmbeddedSeaweed, step: Step, request: asyncio.Task[Any]
) -> None:
    """Once the step's request (or answer) is held: kill -9, let the held request go on or
    not, start the daemon again; the client's request ends with a broken connection."""
    rule = k.fp.add(step.op, step.fault, key=step.key, body=step.body, query=step.query)
    async with asyncio.timeout(60):
        await rule.held.wait()
    k.daemon.signal(signal.SIGKILL)
    await k.daemon.wait()
    rule.release(forward=step.forward)
    await k.fp.quiet()
    k.fp.clear()
    with pytest.raises(aiohttp.ClientError):
        await request
    k.daemon = await k.daemon.restart()


# -- tus: POST, PATCH 1 MiB (a pending segment), PATCH the rest: completion ---------------

TUS_SIZE = PART + 1 * MiB
TUS_STEPS = [
    s.param()
    for s in (
        Step("UploadPart", hold(), "last-part-in-flight", query=r"partNumber=2", forward=True),
        Step("UploadPart", hold(), "last-part-lost", query=r"partNumber=2"),
        Step("StateWrite", hold(), "before-decision", key=INFO, body=COMPLETING),
        Step("StateWrite", hold(answer=True), "decided", key=INFO, body=COMPLETING),
        Step("ListParts", hold(), "before-complete"),
        Step("CompleteMultipartUpload", hold(), "complete-in-flight", forward=True),
        Step("CompleteMultipartUpload", hold(answer=True), "completed-before-copy"),
        Step("CopyObject", hold(answer=True), "copied-before-state-delete"),
        Step("StateDelete", hold(answer=True), "segment-deleted", key=SEGMENT),
        Step("StateDelete", hold(answer=True), "marker-deleted", key=MARKER),
        Step("StateDelete", hold(answer=True), "all-deleted", key=INFO, xfail=TOMBSTONE),
    )
]


async def patch(url: str, data: bytes, offset: int) -> aiohttp.ClientResponse:
    headers = {
        **TUS,
        "Content-Type": "application/offset+octet-stream",
        "Upload-Offset": str(offset),
    }
    async with aiohttp.ClientSession() as s, s.patch(url, data=data, headers=headers) as r:
        await r.read()
        return r


@pytest.mark.parametrize("step", TUS_STEPS)
async def test_tus_kill(
    step: Step, killable: Killable, seaweed: EmbeddedSeaweed, s3: S3Storage, kill_prefix: str
) -> None:
    data = payload(TUS_SIZE, step.what)
    digest = sha256_hex(data)
    k = killable
    a = await send(
        "POST",
        f"{k.daemon.url}/files/",
        headers={
            **TUS,
            "Upload-Length": str(len(data)),
            "Upload-Metadata": f"filename {b64('f.bin')}",
        },
    )
    assert a.status == 201, a.body
    path = a.headers["Location"]
    first = await patch(k.daemon.url + path, data[: 1 * MiB], 0)
    assert first.status == 204
    last = asyncio.ensure_future(patch(k.daemon.url + path, data[1 * MiB :], 1 * MiB))
    await kill_at(k, seaweed, step, last)

    url = k.daemon.url + path
    key = tus_object_key(kill_prefix, url)
    h = await send("HEAD", url, headers=TUS)
    if h.status == 404:
        # The upload is gone: then nothing may be stored for it either.
        assert await read_object(s3, key) is None, "HEAD says 404 but the upload is stored"
    else:
        assert h.status == 200, h.status
        offset = int(h.headers["Upload-Offset"])
        if "Upload-SHA256" in h.headers:  # decided: every byte is in
            assert offset == len(data) and h.headers["Upload-SHA256"] == digest
        # Resume from there (an empty PATCH finishes a decided completion); 423 while
        # the dead daemon's lease lasts.
        async with asyncio.timeout(LOCKED_WAIT_S):
            while (r := await patch(url, data[offset:], offset)).status == 423:
                await asyncio.sleep(LOCKED_BACKOFF_S)
        assert r.status == 204, r.status
        assert r.headers.get("Upload-SHA256") == digest
        await assert_stored(s3, key, data)
    assert await tus_state_left(s3, kill_prefix, url) == []
    # (A multipart upload the dead daemon created and never recorded is the sweep's.)
    await assert_swept(k.fp, s3, kill_prefix, key, orphans=None)


# -- plain PUT: PutObject (1 MiB), or a multipart upload (6 MiB) --------------------------

PUT_STEPS = [
    s.param()
    for s in (
        Step("UploadPart", hold(), "part-in-flight", query=r"partNumber=1(&|$)", forward=True),
        Step("CompleteMultipartUpload", hold(answer=True), "completed", xfail=UNLABELLED),
        Step("CopyObject", hold(), "copy-lost", xfail=UNLABELLED),
        Step("CopyObject", hold(answer=True), "copied"),
        Step("PutObject", hold(answer=True), "put"),
    )
]


@pytest.mark.parametrize("step", PUT_STEPS)
async def test_put_kill(
    step: Step, killable: Killable, seaweed: EmbeddedSeaweed, s3: S3Storage, kill_prefix: str
) -> None:
    data = payload(1 * MiB if step.op == "PutObject" else PART + 1 * MiB, step.what)
    name = f"put-{step.what}"
    k = killable
    first = asyncio.ensure_future(send("PUT", f"{k.daemon.url}/uploads/{name}", data))
    await kill_at(k, seaweed, step, first)

    retry = await send("PUT", f"{k.daemon.url}/uploads/{name}", data)
    if retry.status == 201:
        assert retry.body["sha256"] == sha256_hex(data)
    else:
        # The key is taken: by exactly these bytes, the earlier attempt's.
        assert retry.status == 409 and retry.body["code"] == "ERR_KEY_EXISTS", retry.body
    await assert_stored(s3, f"{kill_prefix}{name}", data)
    await assert_swept(k.fp, s3, kill_prefix, f"{kill_prefix}{name}", orphans=None)
