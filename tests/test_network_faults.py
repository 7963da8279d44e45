"""Network faults between the daemon and S3: every answer the client gets is true.

The real daemon (a subprocess) talks to the real SeaweedFS through the fault proxy of
tests/faultproxy.py, which breaks one S3 operation of the client's request in one way
(a cell: operation x fault; "gone": from that request on, the store answers nothing).
Whatever the fault, each cell checks the invariant:

* the client's answer is true: a success if and only if exactly its bytes are stored,
  with their sha256 in the metadata; after an error, nothing is stored, which the
  client's retry (after the fault is gone) confirms by succeeding; a tus client resumes
  from the offset HEAD gives and ends with exactly its bytes stored, and 423 (a lease a
  failed PATCH could not release) is allowed only where the cell says so;
* never a 500, and the request ends within the bound README "When S3 is slow or gone"
  states (fault_helpers.request_bound_s, plus the fault's own seconds);
* once the sweep window has passed no multipart upload is left open (the sweep is run
  with its clock moved past the window: fault_helpers.sweep_after_window);
* the fault was applied (the cell cannot pass without it).

Each cell also states the client's first answer (``errors``: the statuses of the
requests that failed, in order); that column is the table in the closing note of the
issue.  Cells where today's daemon answers wrongly and the fix lies outside
proxy/storage/s3/ are strict xfails, with the reason.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.config import load
from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import EmbeddedSeaweed
from tests.daemon import Daemon
from tests.fault_helpers import (
    ABORT_BOUND_S,
    EVERY,
    LATE_S,
    LOCKED_BACKOFF_S,
    LOCKED_WAIT_S,
    PART,
    REQUEST_BOUNDS,
    Cell,
    MiB,
    assert_applied,
    assert_clean_log,
    assert_nothing_open,
    assert_stored,
    assert_swept,
    cells,
    daemon_behind,
    fault_seconds,
    install,
    payload,
    read_object,
    request_bound_s,
    send,
    sha256_hex,
    start_behind,
    sweep_after_window,
    tus_object_key,
    tus_state_left,
    tus_upload,
    unique_prefix,
)
from tests.faultproxy import (
    FaultProxy,
    blackhole,
    delay,
    lost_answer,
    part_number,
    reset_before,
    stall,
    trickle,
)
from tests.tus_helpers import TUS, b64

FIRST_PART = part_number(1)
# The tus lease: short, so that one a failed PATCH could not release runs out soon.
LEASE_S = 6


ROOT = Path(__file__).resolve().parent.parent


def test_readme_states_the_bounds() -> None:
    """README "When S3 is slow or gone" states the bounds these tests hold the daemon to
    (fault_helpers.REQUEST_BOUNDS), with the figures of the shipped config.toml."""
    bound_s = load(ROOT / "config.toml").storage.operation_bound_s
    text = (ROOT / "README.md").read_text()
    section = text.split("## When S3 is slow or gone", 1)[1].split("\n## ", 1)[0]
    assert f"≈ {bound_s:.0f} s with the shipped values" in " ".join(section.split())
    rows = {
        "`PUT`, `POST /uploads`": "PUT",
        "tus `POST`": "POST",
        "tus `HEAD`": "HEAD",
        "tus `PATCH`": "PATCH",
        "tus `DELETE`": "DELETE",
    }
    for label, method in rows.items():
        operations, cleanups = REQUEST_BOUNDS[method]
        formula = "B" if operations == 1 else f"{operations} B"
        if cleanups:
            formula += f" + {ABORT_BOUND_S:.0f} s"
        minutes = (operations * bound_s + cleanups * ABORT_BOUND_S) / 60
        row = next(line for line in section.splitlines() if line.startswith(f"| {label} |"))
        assert f"| {formula}:" in row and row.endswith(f"| {minutes:.1f} min |"), row


@pytest.fixture(scope="module")
def net_prefix() -> str:
    return unique_prefix("t")


@pytest.fixture(scope="module")
async def behind(
    seaweed: EmbeddedSeaweed, tmp_path_factory: pytest.TempPathFactory, net_prefix: str
) -> AsyncIterator[tuple[FaultProxy, Daemon]]:
    """One daemon behind one fault proxy for the module's cells (a daemon per cell would
    cost a second each); each cell has its own keys and its own rules."""
    tus = {"lock_lease_s": LEASE_S}
    async with daemon_behind(seaweed, tmp_path_factory.mktemp("net"), net_prefix, tus=tus) as b:
        yield b


@pytest.fixture
def fp(behind: tuple[FaultProxy, Daemon]) -> FaultProxy:
    proxy, _ = behind
    proxy.clear()
    proxy.records.clear()
    return proxy


@pytest.fixture
def daemon(behind: tuple[FaultProxy, Daemon]) -> Daemon:
    d = behind[1]
    assert d.proc.returncode is None, "\n".join(d.log)
    return d


# -- plain uploads: PUT /uploads/{key} ---------------------------------------------------

SMALL = 1 * MiB  # one PutObject
MULTI = PART + 1 * MiB  # CreateMultipartUpload, 2 x UploadPart, Complete, CopyObject
# A link to the store too slow for the read timeout (NET: 2 s): 256 KiB take 4 s, and
# whatever the socket buffers hold when the body is handed over takes longer still.  And
# one on which 5 MiB take a third of a second.
SLOW_LINK = 64 * 1024
FAST_LINK = 16 * MiB
# An answer trickled at this rate takes longer than the read timeout, each byte not.
TRICKLE = trickle(200)
# Far above the read timeout, so that waiting it out breaks the request's bound.
STALL_S = 20.0
NO_SHA256 = (
    "S3 gone between CompleteMultipartUpload and the metadata copy: the object stays "
    "without its sha256 (the take-back DeleteObject fails too), and the client's retry "
    "gets 409 for it; needs a record of objects still to be labelled (proxy/streaming.py)"
)

PUT_SMALL = cells(
    # The check for an existing key, before the body.
    Cell("HeadObject", lost_answer(), what="exists"),
    Cell("HeadObject", reset_before(), what="exists"),
    Cell("HeadObject", TRICKLE, what="exists"),
    Cell("HeadObject", blackhole(LATE_S), errors=(503,), times=EVERY, what="exists"),
    Cell("HeadObject", blackhole(LATE_S), errors=(503,), what="exists", gone=True),
    # The case: stored, answer lost, aiohttp re-sends, S3 says 412.
    Cell("PutObject", lost_answer()),
    Cell("PutObject", lost_answer(), times=EVERY),
    Cell("PutObject", reset_before()),
    Cell("PutObject", delay(LATE_S)),
    Cell("PutObject", delay(LATE_S, answer=True)),
    Cell("PutObject", blackhole(LATE_S), errors=(503,), times=EVERY),
    Cell("PutObject", blackhole(LATE_S), errors=(503,), gone=True),
    Cell("PutObject", TRICKLE),
    Cell("PutObject", trickle(FAST_LINK, request=True)),
    Cell("PutObject", trickle(SLOW_LINK, request=True), errors=(503,), times=None),
    # The HEAD that checks what PutObject stored.
    Cell("HeadObject", lost_answer(), nth=2, what="verify"),
    Cell("HeadObject", blackhole(LATE_S), nth=2, times=EVERY, what="verify"),
)

PUT_MULTI = cells(
    # POST: not re-sent by aiohttp.  Our retry creates a second upload; the first, which
    # S3 created, is known to nobody: the stale sweeper removes it after its window.
    Cell("CreateMultipartUpload", lost_answer(), orphans=True),
    Cell("CreateMultipartUpload", reset_before()),
    Cell("CreateMultipartUpload", delay(LATE_S), orphans=True),
    Cell("CreateMultipartUpload", TRICKLE),
    Cell("CreateMultipartUpload", blackhole(LATE_S), errors=(503,), times=EVERY),
    Cell("UploadPart", lost_answer()),
    Cell("UploadPart", reset_before(), times=2),
    Cell("UploadPart", delay(LATE_S)),
    Cell("UploadPart", blackhole(LATE_S), errors=(503,), times=EVERY, query=FIRST_PART),
    Cell("UploadPart", TRICKLE),
    Cell("UploadPart", trickle(FAST_LINK, request=True), times=None),
    # The abort is blackholed too: the multipart upload stays until the sweep.
    Cell("UploadPart", blackhole(LATE_S), errors=(503,), gone=True, orphans=True),
    Cell("CompleteMultipartUpload", lost_answer()),
    Cell("CompleteMultipartUpload", reset_before()),
    Cell("CompleteMultipartUpload", delay(LATE_S, answer=True)),
    Cell("CompleteMultipartUpload", TRICKLE),
    Cell("CompleteMultipartUpload", blackhole(LATE_S), errors=(503,), times=EVERY),
    Cell("CompleteMultipartUpload", blackhole(LATE_S), errors=(503,), gone=True, orphans=True),
    Cell("CopyObject", lost_answer()),
    Cell("CopyObject", reset_before()),
    Cell("CopyObject", delay(LATE_S)),
    Cell("CopyObject", delay(LATE_S, answer=True)),
    Cell("CopyObject", TRICKLE),
    Cell("CopyObject", blackhole(LATE_S), errors=(503,), times=EVERY),
    Cell(
        "CopyObject",
        blackhole(LATE_S),
        errors=(503,),
        gone=True,
        marks=(pytest.mark.xfail(strict=True, reason=NO_SHA256),),
    ),
    # The abort after a failure is refused: the part upload stays open until the sweep.
    Cell(
        "AbortMultipartUpload",
        reset_before(),
        errors=(503,),
        times=None,
        also=(("UploadPart", blackhole(LATE_S), None),),
        orphans=True,
    ),
    Cell(
        "AbortMultipartUpload",
        lost_answer(),
        errors=(503,),
        also=(("UploadPart", blackhole(LATE_S), None),),
    ),
    # The copy fails: the completed object is taken back (DeleteObject with If-Match).
    Cell(
        "DeleteObject",
        lost_answer(),
        errors=(503,),
        also=(("CopyObject", blackhole(LATE_S), EVERY),),
    ),
)


@pytest.mark.parametrize("cell", PUT_SMALL + PUT_MULTI)
async def test_put(
    cell: Cell, fp: FaultProxy, daemon: Daemon, s3: S3Storage, net_prefix: str
) -> None:
    size = MULTI if cell.op in _MULTI_OPS else SMALL
    data = payload(size, cell.id)
    name = hashlib.sha256(cell.id.encode()).hexdigest()[:16]
    key, url = f"{net_prefix}{name}", f"{daemon.url}/uploads/{name}"
    logged = len(daemon.log)
    rule = install(fp, cell)
    first = await send("PUT", url, data)
    assert first.status != 500, (first.body, "\n".join(daemon.log[logged:]))
    assert first.seconds < request_bound_s() + fault_seconds(cell), first.seconds
    assert_applied(rule, fp)
    fp.clear()  # the store is back
    statuses: list[int] = []
    if first.status == 201:
        assert first.body["size"] == len(data) and first.body["sha256"] == sha256_hex(data)
        await assert_stored(s3, key, data)
    else:
        statuses.append(first.status)
        # An error: nothing is stored, so the same upload without the fault succeeds.
        assert await read_object(s3, key) is None, f"{first.status} but an object is stored"
        retry = await send("PUT", url, data)
        assert retry.status == 201, retry.body
        await assert_stored(s3, key, data)
    assert tuple(statuses) == cell.errors, first.body
    await assert_swept(fp, s3, net_prefix, key, orphans=cell.orphans)
    assert_clean_log(daemon, since=logged)


_MULTI_OPS = {
    "CreateMultipartUpload",
    "UploadPart",
    "CompleteMultipartUpload",
    "CopyObject",
    "AbortMultipartUpload",
    "DeleteObject",
}


# -- tus: POST /files/, then two PATCHes (the first leaves a pending segment) ------------

TUS_SIZE = PART + 1 * MiB
TUS_CHUNKS = (1 * MiB,)
INFO = r"/info$"
SEGMENT = r"/pending-"
MARKER = r"/owners/"
COMPLETING = rb'"completing":true'
NAMED = f"filename {b64('f.bin')}"

TUS_CELLS = cells(
    # Creation: the quota marker, the listing that counts it, the info object.
    Cell("StateWrite", lost_answer(), key=MARKER, what="marker"),
    Cell("StateWrite", blackhole(LATE_S), key=MARKER, what="marker", errors=(503,), times=EVERY),
    Cell("StateList", lost_answer(), key=MARKER, what="marker"),
    Cell("StateWrite", lost_answer(), key=INFO, what="info"),
    Cell("StateWrite", blackhole(LATE_S), key=INFO, what="info", errors=(503,), times=EVERY),
    Cell("StateWrite", blackhole(LATE_S), key=INFO, what="info", errors=(503,), gone=True),
    # A PATCH: its read of the info, its lease (a conditional write), the segment.
    Cell("StateRead", lost_answer(), key=INFO, what="info"),
    Cell("StateRead", trickle(1000), key=INFO, what="info"),
    Cell("StateRead", blackhole(LATE_S), key=INFO, what="info", errors=(503,), times=EVERY),
    Cell("StateWrite", lost_answer(), key=INFO, what="lease", nth=2),  # the first PATCH's lease
    Cell("StateWrite", delay(LATE_S), key=INFO, what="lease", nth=2),
    Cell("StateWrite", delay(LATE_S, answer=True), key=INFO, what="lease", nth=2),
    Cell("StateWrite", lost_answer(), key=SEGMENT, what="segment"),
    Cell("StateWrite", delay(LATE_S), key=SEGMENT, what="segment"),
    Cell("StateWrite", blackhole(LATE_S), key=SEGMENT, what="segment", errors=(503,), times=EVERY),
    # The second PATCH reads the segment back into its first part.
    Cell("StateRead", lost_answer(), key=SEGMENT, what="segment"),
    Cell("StateRead", trickle(256 * 1024), key=SEGMENT, what="segment"),
    Cell("StateRead", blackhole(LATE_S), key=SEGMENT, what="segment", errors=(503,), times=EVERY),
    Cell("CreateMultipartUpload", lost_answer(), orphans=True),
    Cell("CreateMultipartUpload", blackhole(LATE_S), errors=(503,), times=EVERY),
    Cell("UploadPart", lost_answer()),
    Cell("UploadPart", delay(LATE_S)),
    Cell("UploadPart", trickle(SLOW_LINK, request=True), errors=(503,), times=None),
    Cell("UploadPart", blackhole(LATE_S), errors=(503,), times=EVERY, query=FIRST_PART),
    # The PATCH keeps nothing it could not store; the client resumes from the last
    # recorded offset once the store is back.
    Cell("UploadPart", blackhole(LATE_S), errors=(503,), gone=True, locked=True, orphans=True),
    # Completion: decided (the info says "completing"), parts checked, completed, labelled,
    # state deleted.
    Cell("StateWrite", lost_answer(), key=INFO, what="completing", body=COMPLETING),
    Cell("StateWrite", delay(LATE_S), key=INFO, what="completing", body=COMPLETING),
    Cell(
        "StateWrite",
        blackhole(LATE_S),
        key=INFO,
        what="completing",
        body=COMPLETING,
        errors=(503,),
        times=EVERY,
        # The parts of the PATCH are in a multipart upload the state never recorded
        # (the write that would have was lost): the client resumes from the recorded
        # offset into a new one, and the sweeper removes the old one.
        orphans=True,
    ),
    Cell("ListParts", lost_answer()),
    Cell("ListParts", TRICKLE),
    Cell("ListParts", blackhole(LATE_S), errors=(503,), times=EVERY),
    Cell("CompleteMultipartUpload", lost_answer()),
    Cell("CompleteMultipartUpload", delay(LATE_S, answer=True)),
    Cell("CompleteMultipartUpload", blackhole(LATE_S), errors=(503,), times=EVERY),
    # Completion stays decided: the client's next PATCH finishes it once the store is back.
    Cell("CompleteMultipartUpload", blackhole(LATE_S), errors=(503,), gone=True, locked=True),
    Cell("CopyObject", lost_answer()),
    Cell("CopyObject", blackhole(LATE_S), errors=(503,), times=EVERY),
    Cell("CopyObject", blackhole(LATE_S), errors=(503,), gone=True, locked=True),
    Cell("StateList", lost_answer(), key=r"\.tus/[0-9a-f]{32}/$", what="folder"),
    Cell("StateDelete", lost_answer(), key=SEGMENT, what="segment"),
    Cell("StateDelete", lost_answer(), key=MARKER, what="marker"),
    Cell("StateDelete", lost_answer(), key=INFO, what="info"),
    Cell("StateDelete", blackhole(LATE_S), key=INFO, what="info", errors=(503,), times=EVERY),
)


@pytest.mark.parametrize("cell", TUS_CELLS)
async def test_tus(
    cell: Cell, fp: FaultProxy, daemon: Daemon, s3: S3Storage, net_prefix: str
) -> None:
    data = payload(TUS_SIZE, cell.id)
    logged = len(daemon.log)
    rule = install(fp, cell)
    run = await tus_upload(daemon.url, data, chunks=TUS_CHUNKS, on_error=fp.clear)
    assert all(s != 500 for _, s in run.answers), run.answers
    run.assert_bounded(fault_seconds(cell))
    assert_applied(rule, fp)
    assert run.url is not None
    key = tus_object_key(net_prefix, run.url)
    # Resumed to the end: the object is exactly the bytes, the client holds its digest.
    assert run.sha256 == sha256_hex(data), run.answers
    await assert_stored(s3, key, data)
    assert await tus_state_left(s3, net_prefix, run.url) == []
    assert tuple(s for _, s in run.errors if s != 423) == cell.errors, run.answers
    assert cell.locked or all(s != 423 for _, s in run.answers), run.answers
    await assert_swept(fp, s3, net_prefix, key, orphans=cell.orphans)
    assert_clean_log(daemon, since=logged)


async def test_tus_small_upload_put_whole_answer_lost(
    fp: FaultProxy, daemon: Daemon, s3: S3Storage, net_prefix: str
) -> None:
    """Below one part a tus upload is one PutObject of the whole object; its answer lost."""
    data = payload(SMALL, "tus-small")
    rule = fp.add("PutObject", lost_answer())
    run = await tus_upload(daemon.url, data, chunks=())
    assert rule.applied == 1
    assert run.errors == [] and run.url is not None and run.sha256 == sha256_hex(data)
    await assert_stored(s3, tus_object_key(net_prefix, run.url), data)
    assert await tus_state_left(s3, net_prefix, run.url) == []


# The most a socket's send buffer grows to (Linux's autotuning limit).
WMEM_MAX = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])


async def test_put_store_stops_reading(
    seaweed: EmbeddedSeaweed, tmp_path: Path, s3: S3Storage, prefix: str
) -> None:
    """The store stops taking a part's bytes (its TCP window closes).  aiohttp starts the
    read timeout only once a body is sent, so without a bound of its own the write waits
    until TCP gives up, or for ever (proxy.storage.s3.body.PartPayload bounds it).  The part
    is far larger than what the kernel buffers on the way can hold, so the write stalls."""
    part_mib = max(8, -(-3 * WMEM_MAX // MiB))
    data = payload((part_mib + 1) * MiB, "stall")
    async with FaultProxy(seaweed.endpoint_url) as fp:
        daemon = await start_behind(
            tmp_path, seaweed, prefix, fp, upload={"part_size": f"{part_mib}MiB"}
        )
        try:
            rule = fp.add("UploadPart", stall(STALL_S), times=None)
            first = await send("PUT", f"{daemon.url}/uploads/a", data)
            assert first.status == 503, first.body
            assert first.seconds < request_bound_s(), first.seconds
            assert_applied(rule, fp)
            assert await read_object(s3, f"{prefix}a") is None
            fp.clear()
            retry = await send("PUT", f"{daemon.url}/uploads/a", data)
            assert retry.status == 201, retry.body
            await assert_stored(s3, f"{prefix}a", data)
            assert await sweep_after_window(s3, prefix) == []
            await assert_nothing_open(s3, prefix)
            assert_clean_log(daemon)
        finally:
            await daemon.stop()


# -- tus: DELETE /files/{id} of an unfinished upload (a part stored, a pending segment) --

TERMINATE_CELLS = cells(
    Cell("StateRead", blackhole(LATE_S), key=INFO, what="info", errors=(503,), times=EVERY),
    Cell("StateWrite", lost_answer(), key=INFO, what="lease"),
    Cell("StateWrite", blackhole(LATE_S), key=INFO, what="lease", errors=(503,), times=EVERY),
    Cell("AbortMultipartUpload", lost_answer()),
    Cell("AbortMultipartUpload", blackhole(LATE_S), errors=(503,), times=EVERY),
    Cell("AbortMultipartUpload", blackhole(LATE_S), errors=(503,), gone=True, locked=True),
    Cell("StateList", lost_answer(), key=r"\.tus/[0-9a-f]{32}/$", what="folder"),
    Cell("StateDelete", lost_answer(), key=SEGMENT, what="segment"),
    Cell("StateDelete", blackhole(LATE_S), key=SEGMENT, what="segment", errors=(503,), times=EVERY),
    Cell("StateDelete", lost_answer(), key=INFO, what="info"),
    Cell("StateDelete", blackhole(LATE_S), key=INFO, what="info", errors=(503,), times=EVERY),
)


@pytest.mark.parametrize("cell", TERMINATE_CELLS)
async def test_tus_terminate(
    cell: Cell, fp: FaultProxy, daemon: Daemon, s3: S3Storage, net_prefix: str
) -> None:
    data = payload(TUS_SIZE, cell.id)
    a = await send(
        "POST",
        f"{daemon.url}/files/",
        headers={**TUS, "Upload-Length": str(2 * len(data)), "Upload-Metadata": NAMED},
    )
    assert a.status == 201, a.body
    url = daemon.url + a.headers["Location"]
    h = {**TUS, "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}
    assert (await send("PATCH", url, data, h)).status == 204
    key = tus_object_key(net_prefix, url)
    assert [u.key for u in await s3.list_multipart(key)] == [key]  # a part is stored
    assert len(await tus_state_left(s3, net_prefix, url)) == 3  # info, segment, marker
    logged = len(daemon.log)
    rule = install(fp, cell)
    first = await send("DELETE", url, headers=TUS)
    assert first.status != 500, (first.body, "\n".join(daemon.log[logged:]))
    assert first.seconds < request_bound_s("DELETE") + fault_seconds(cell), first.seconds
    assert_applied(rule, fp)
    fp.clear()
    statuses, last = [], first
    async with asyncio.timeout(LOCKED_WAIT_S):
        while last.status != 204:
            statuses.append(last.status)
            if last.status == 423:
                await asyncio.sleep(LOCKED_BACKOFF_S)
            last = await send("DELETE", url, headers=TUS)
    assert tuple(s for s in statuses if s != 423) == cell.errors, statuses
    assert cell.locked or 423 not in statuses, statuses
    assert (await send("HEAD", url, headers=TUS)).status == 404
    assert await tus_state_left(s3, net_prefix, url) == []
    assert await read_object(s3, key) is None
    await assert_swept(fp, s3, net_prefix, key, orphans=cell.orphans)
    assert_clean_log(daemon, since=logged)
