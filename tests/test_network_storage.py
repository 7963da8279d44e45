"""Network faults on the S3 calls the daemon makes outside a client's request, or only for
objects too big to test through it: the stale-multipart sweep (ListMultipartUploads,
AbortMultipartUpload, the tus state read that claims an upload) and the metadata copy of
an object above 5 GiB (UploadPartCopy).

The daemon's own classes (:class:`~proxy.storage.sweeper.StaleSweeper`,
:func:`proxy.engine.upload.label` over :class:`~proxy.storage.s3.S3Storage`) run in the
test process, their S3 endpoint the
fault proxy of tests/faultproxy.py, with the timeouts of the daemon tests (NET).  The
checks are read straight from the store.  Invariants:

* the sweep never aborts a multipart upload a live tus upload owns; a sweep the fault
  breaks fails (it is logged, the next one runs on schedule) and the next sweep without
  the fault aborts every stale orphan;
* the copy reports success if and only if the object holds its bytes and the new
  metadata; it leaves no multipart upload open once the sweep window has passed;
* every call ends within the storage bound (README "When S3 is slow or gone").
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from proxy.engine.upload import label
from proxy.errors import ProxyError, StorageUnavailable
from proxy.storage.base import OpenMultipart
from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import EmbeddedSeaweed
from proxy.storage.sweeper import StaleSweeper
from proxy.tus.state import TusStore, UploadInfo, new_id
from tests.conftest import BUCKET
from tests.fault_helpers import (
    EVERY,
    LATE_S,
    NET,
    STALE_AFTER_S,
    Cell,
    MiB,
    assert_applied,
    assert_swept,
    cells,
    fault_seconds,
    install,
    payload,
    read_object,
    sha256_hex,
    storage_bound_s,
)
from tests.faultproxy import FaultProxy, blackhole, delay, lost_answer, reset_before, trickle

COPY_PART = 5 * MiB  # S3 (and SeaweedFS) refuse smaller parts but the last
COPY_SIZE = 2 * COPY_PART + 1000  # three UploadPartCopy
STATE = ".state/"
# Every UploadPartCopy fails, so the copy's multipart upload is aborted.
_COPY_FAILS = (("UploadPartCopy", blackhole(LATE_S), None),)


@pytest.fixture
async def fp(seaweed: EmbeddedSeaweed, prefix: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(seaweed.endpoint_url, state_prefix=f"{prefix}{STATE}") as proxy:
        yield proxy


@pytest.fixture
async def behind(seaweed: EmbeddedSeaweed, fp: FaultProxy) -> AsyncIterator[S3Storage]:
    """The daemon's S3 backend, as the daemon tests configure it, through the fault proxy;
    objects above COPY_PART get their metadata by UploadPartCopy."""
    storage = S3Storage(
        bucket=BUCKET,
        endpoint_url=fp.url,
        access_key=seaweed.credentials.access_key,
        secret_key=seaweed.credentials.secret_key,
        max_copy_bytes=COPY_PART,
        copy_part_bytes=COPY_PART,
        **NET,
    )
    async with storage:
        yield storage


# -- the stale-multipart sweep ----------------------------------------------------------

SWEEP_CELLS = cells(
    Cell("ListMultipartUploads", lost_answer()),
    Cell("ListMultipartUploads", trickle(500)),
    Cell("ListMultipartUploads", blackhole(LATE_S), times=EVERY, errors=(503,)),
    Cell("AbortMultipartUpload", lost_answer()),
    Cell("AbortMultipartUpload", reset_before(), times=None, errors=(503,)),
    Cell("AbortMultipartUpload", blackhole(LATE_S), times=EVERY, errors=(503,)),
    # "Is it a live tus upload's?": a read of its state that fails is not a "no".
    Cell("StateRead", lost_answer()),
    Cell("StateRead", blackhole(LATE_S), times=EVERY, errors=(503,)),
)


@pytest.mark.parametrize("cell", SWEEP_CELLS)
async def test_stale_sweep(
    cell: Cell, fp: FaultProxy, behind: S3Storage, s3: S3Storage, prefix: str
) -> None:
    # An orphan (a crashed plain upload's) and a live tus upload's multipart upload.
    orphan = f"{prefix}orphan"
    orphan_id = await s3.create_multipart(orphan, metadata={}, content_type="a/b")
    store = TusStore(s3, f"{prefix}{STATE}", lease_s=30)
    tus_id = new_id()
    live = f"{prefix}tus/{tus_id}/f.bin"
    live_id = await s3.create_multipart(live, metadata={}, content_type="a/b")
    now = time.time()
    await store.create_unleased(
        UploadInfo(
            id=tus_id,
            key=live,
            content_type="a/b",
            metadata_header="",
            object_metadata={},
            length=10 * MiB,
            multipart_id=live_id,
            expires_s=now + 3600,
        )
    )
    claims = TusStore(behind, f"{prefix}{STATE}", lease_s=30)

    async def is_live(upload: OpenMultipart) -> bool:
        return await claims.owns_multipart(upload.key, upload.upload_id)

    sweeper = StaleSweeper(behind, prefix, older_than_s=STALE_AFTER_S, is_live=is_live)
    later = datetime.now(UTC) + timedelta(seconds=STALE_AFTER_S + 5)
    rule = install(fp, cell)
    t0 = time.monotonic()
    try:
        await sweeper.sweep_once(now=later)
        errors: tuple[int, ...] = ()
    except ProxyError as e:
        errors = (e.status,)
    # The listing's bound, or a claim's and an abort's.
    assert time.monotonic() - t0 < 2 * storage_bound_s() + fault_seconds(cell)
    assert_applied(rule, fp)
    assert errors == cell.errors
    assert live_id in {u.upload_id for u in await s3.list_multipart(prefix)}
    fp.clear()
    # The next sweep, without the fault, aborts the orphan if this one did not.
    await sweeper.sweep_once(now=later)
    assert [u.upload_id for u in await s3.list_multipart(prefix)] == [live_id]
    await s3.abort_multipart(live, live_id)
    assert orphan_id != live_id


# -- the metadata copy of an object above the CopyObject limit (UploadPartCopy) ----------

COPY_CELLS = cells(
    Cell("CreateMultipartUpload", lost_answer(), orphans=True),
    Cell("CreateMultipartUpload", blackhole(LATE_S), times=EVERY, errors=(503,)),
    Cell("UploadPartCopy", lost_answer()),
    Cell("UploadPartCopy", lost_answer(), nth=2, what="part 2"),
    Cell("UploadPartCopy", reset_before()),
    Cell("UploadPartCopy", delay(LATE_S)),
    Cell("UploadPartCopy", delay(LATE_S, answer=True)),
    Cell("UploadPartCopy", trickle(200)),
    Cell("UploadPartCopy", blackhole(LATE_S), times=EVERY, errors=(503,)),
    # Its abort meets the outage too: the sweep removes the copy's multipart upload.
    Cell("UploadPartCopy", blackhole(LATE_S), errors=(503,), gone=True, orphans=True),
    Cell("CompleteMultipartUpload", lost_answer()),
    Cell("CompleteMultipartUpload", delay(LATE_S, answer=True)),
    Cell("CompleteMultipartUpload", blackhole(LATE_S), times=EVERY, errors=(503,)),
    Cell("AbortMultipartUpload", lost_answer(), errors=(503,), also=_COPY_FAILS),
    Cell(
        "AbortMultipartUpload",
        blackhole(LATE_S),
        times=EVERY,
        errors=(503,),
        also=_COPY_FAILS,
        orphans=True,
    ),
)


@pytest.mark.parametrize("cell", COPY_CELLS)
async def test_metadata_copy(
    cell: Cell, fp: FaultProxy, behind: S3Storage, s3: S3Storage, prefix: str
) -> None:
    """The self-copy that gives a completed object its sha256 (proxy.engine.upload.label),
    for an object above the CopyObject limit: a multipart copy of itself."""
    key = f"{prefix}big"
    data = payload(COPY_SIZE, cell.id)
    etag = await s3.put_object(
        key, data, metadata={"a": "1"}, content_type="a/b", checksum=None, if_none_match=True
    )
    metadata = {"a": "1", "sha256": sha256_hex(data)}
    rule = install(fp, cell)
    t0 = time.monotonic()
    try:
        await label(behind, key, etag=etag, size=len(data), metadata=metadata, content_type="a/b")
        errors: tuple[int, ...] = ()
    except ProxyError as e:
        errors = (e.status,)
        assert isinstance(e, StorageUnavailable), e
    seconds = time.monotonic() - t0
    # The copy and its abort, then label's check whether it landed anyway.
    assert seconds < 3 * storage_bound_s() + fault_seconds(cell), seconds
    assert_applied(rule, fp)
    fp.clear()
    assert errors == cell.errors
    got = await read_object(s3, key)
    assert got is not None and got[0] == data, "the object lost its bytes"
    if not errors:
        assert got[1] == metadata, got[1]
    await assert_swept(fp, s3, prefix, key, orphans=cell.orphans)
