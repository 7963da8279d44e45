"""S3 requests of a tus PATCH slower than the tus lease (but within the read timeout).

A PATCH holds its upload's lease (an S3 state write, renewed every third of
``tus.lock_lease_s`` by a keeper) and stops starting part writes once less than a third
of it is left (``Lease.fenced``): a part that lands after the lease ran out could
overwrite the part of a request that took the upload over.  Here the daemon's read
timeout (8 s) is longer than its lease (3 s), and one S3 request is 4.5 s late, so the
lease runs out while the daemon still waits.  Invariant, as in test_network_faults:
the client's answers are true (a 423 is "retry later": the client HEADs and resumes),
the upload ends stored exactly, with its sha256, and nothing is left behind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import EmbeddedSeaweed
from tests.daemon import Daemon
from tests.fault_helpers import (
    PART,
    MiB,
    assert_clean_log,
    assert_stored,
    assert_swept,
    daemon_behind,
    payload,
    sha256_hex,
    tus_object_key,
    tus_state_left,
    tus_upload,
    unique_prefix,
)
from tests.faultproxy import Fault, FaultProxy, delay

# A daemon restart per cell, or seconds of lease per cell: not in test-fast.
pytestmark = pytest.mark.slow

LEASE_S = 3
# The lease runs out while the daemon waits for this request; its read timeout does not.
LATE_S = LEASE_S * 1.5
STORAGE = {"read_timeout_s": 8, "retry_attempts": 2}
INFO = r"/info$"
LEASED = rb'"lease_owner":"[0-9a-f]'
COMPLETING = rb'"completing":true'


@dataclass(frozen=True)
class Slow:
    op: str
    fault: Fault
    what: str
    errors: tuple[int, ...] = ()
    key: str | None = None
    body: bytes | None = None
    nth: int = 1
    also: tuple[tuple[str, Fault], ...] = ()

    def param(self) -> Any:
        return pytest.param(self, id=self.what)


CASES = [
    c.param()
    for c in (
        # The keeper renews the lease while a part upload takes longer than the lease.
        Slow("UploadPart", delay(LATE_S, answer=True), "part-answer"),
        Slow("UploadPart", delay(LATE_S), "part-request"),
        # The lease the PATCH takes reaches the store when it has run out already: the
        # PATCH is fenced at once, stores nothing, and answers 423; the client resumes.
        Slow("StateWrite", delay(LATE_S), "lease-taken", errors=(423,), key=INFO, body=LEASED),
        # The keeper's renewal is late while the parts are slow too: fenced before the
        # last part; the parts stored are kept and the client resumes after them.
        Slow(
            "StateWrite",
            delay(LATE_S),
            "lease-renewed",
            errors=(423,),
            key=INFO,
            body=LEASED,
            nth=2,
            also=(("UploadPart", delay(LEASE_S * 0.8, answer=True)),),
        ),
        # The decision to complete lands after the lease ran out: nobody took over, so
        # the completion goes on.
        Slow("StateWrite", delay(LATE_S), "decision", key=INFO, body=COMPLETING),
        Slow("CompleteMultipartUpload", delay(LATE_S), "complete"),
        Slow("CopyObject", delay(LATE_S, answer=True), "copy"),
    )
]


@pytest.fixture(scope="module")
def lease_prefix() -> str:
    return unique_prefix("l")


@pytest.fixture(scope="module")
async def slow_behind(
    seaweed: EmbeddedSeaweed, tmp_path_factory: pytest.TempPathFactory, lease_prefix: str
) -> AsyncIterator[tuple[FaultProxy, Daemon]]:
    tmp_path = tmp_path_factory.mktemp("lease")
    tus = {"lock_lease_s": LEASE_S}
    async with daemon_behind(seaweed, tmp_path, lease_prefix, storage=STORAGE, tus=tus) as b:
        yield b


@pytest.mark.parametrize("case", CASES)
async def test_slower_than_lease(
    case: Slow,
    slow_behind: tuple[FaultProxy, Daemon],
    s3: S3Storage,
    lease_prefix: str,
) -> None:
    fp, daemon = slow_behind
    fp.clear()
    fp.records.clear()
    data = payload(PART + 1 * MiB, case.what)
    logged = len(daemon.log)
    rule = fp.add(case.op, case.fault, key=case.key, body=case.body, nth=case.nth)
    for op, fault in case.also:
        fp.add(op, fault, times=None)
    run = await tus_upload(daemon.url, data, chunks=(), on_error=fp.clear)
    assert rule.applied == 1, fp.records
    assert run.url is not None and run.sha256 == sha256_hex(data), run.answers
    assert tuple(s for _, s in run.errors) == case.errors, run.answers
    key = tus_object_key(lease_prefix, run.url)
    await assert_stored(s3, key, data)
    assert await tus_state_left(s3, lease_prefix, run.url) == []
    await assert_swept(fp, s3, lease_prefix, key, orphans=None)
    assert_clean_log(daemon, since=logged)
