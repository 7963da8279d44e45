"""The daemon behind a fault proxy (tests/faultproxy.py), and the checks every network
fault test makes: is the client's answer true, is nothing left once the sweep window
has passed, did the request end within its bound."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import StorageConfig
from proxy.storage.base import OpenMultipart
from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import EmbeddedSeaweed
from proxy.storage.sweeper import StaleSweeper
from proxy.tus.state import TusStore
from tests.daemon import Daemon, start_daemon
from tests.faultproxy import Fault, FaultProxy, Rule, blackhole
from tests.tus_helpers import TUS, b64, sid

MiB = 1024 * 1024
PART = 5 * MiB  # tests/daemon.py's part_size
# Short timeouts so that a fault costs seconds, not minutes.  2 s of read timeout is far
# above what the store takes for these small requests, even on a busy 2-core machine.
NET: dict[str, Any] = {
    "connect_timeout_s": 1,
    "read_timeout_s": 2,
    "retry_attempts": 2,
    "retry_base_delay_s": 0.05,
}
# The daemon's stale-multipart sweeper window (its minimum).
STALE_AFTER_S = 60.0
# Cleanups after a failure (aborts, a tus PATCH's commit of what it kept) run shielded
# with this bound (proxy.engine.upload.CLEANUP_TIMEOUT_S).
ABORT_BOUND_S = 30.0


# -- a cell of the matrix: one S3 operation, one fault ------------------------------------

# "S3 is gone" for one whole operation: every attempt of it meets the fault.
EVERY = int(NET["retry_attempts"])
# Longer than the read timeout: the daemon gives up on the attempt first.
LATE_S = 3.0


@dataclasses.dataclass(frozen=True)
class Cell:
    op: str
    fault: Fault
    errors: tuple[int, ...] = ()  # statuses of the client's failed requests, in order
    times: int | None = 1
    nth: int = 1
    key: str | None = None  # regex on the S3 key the fault is for
    query: str | None = None  # regex on the S3 request's query string
    body: bytes | None = None  # regex on the S3 request body
    # More faults at the same time: (op, fault, times)
    also: tuple[tuple[str, Fault, int | None], ...] = ()
    # From the first request the fault catches on, the store answers nothing at all
    # (every operation is blackholed) until the client has had its answer.
    gone: bool = False
    orphans: bool = False  # the fault leaves a multipart upload only the sweeper removes
    # tus: a PATCH that met the fault could not release its lease (the store was gone):
    # the next ones get 423 until it runs out (tus.lock_lease_s).
    locked: bool = False
    what: str = ""  # which request of the operation, for the test id
    marks: tuple[Any, ...] = ()

    @property
    def id(self) -> str:
        times = {EVERY: "-every", None: "-always", 1: ""}
        every = times.get(self.times, f"-x{self.times}")
        what = f"[{self.what}]" if self.what else ""
        extra = "".join(f"+{op}-{f}" for op, f, _ in self.also)
        return f"{self.op}{what}-{self.fault}{every}{extra}{'-then-gone' if self.gone else ''}"


def cells(*cs: Cell) -> list[Any]:
    """The cells as test parameters; those where the store is gone take a few storage
    bounds each, so they are ``slow`` (``make test`` and CI run them, ``test-fast`` not)."""
    return [
        pytest.param(c, id=c.id, marks=(*c.marks, *([pytest.mark.slow] if c.gone else [])))
        for c in cs
    ]


def install(fp: FaultProxy, cell: Cell) -> Rule:
    """The cell's faults in place; returns the rule of its main fault."""
    first = fp.add(
        cell.op,
        cell.fault,
        key=cell.key,
        nth=cell.nth,
        times=cell.times,
        query=cell.query,
        body=cell.body,
    )
    for op, fault, times in cell.also:
        fp.add(op, fault, times=times)
    if cell.gone:
        fp.add("*", blackhole(GONE_S), times=None, after=first)
    return first


def assert_applied(rule: Rule, fp: FaultProxy) -> None:
    """The cell cannot pass without its fault."""
    assert rule.applied >= 1, f"the fault never applied: {fp.records}"


def fault_seconds(cell: Cell) -> float:
    """What the fault itself adds to a request that outlives it."""
    return cell.fault.seconds * (cell.times or 1)


# Longer than any request's bound: a store that is gone stays gone until the test says.
GONE_S = 600.0


def storage_bound_s(**storage: Any) -> float:
    """The longest one S3 operation may take, retries included, for the [storage]
    settings ``storage`` (NET by default): what README "When S3 is slow or gone" states."""
    values = {**NET, **storage}
    return StorageConfig(
        connect_timeout_s=float(values["connect_timeout_s"]),
        read_timeout_s=float(values["read_timeout_s"]),
        retry_attempts=int(values["retry_attempts"]),
        retry_base_delay_s=float(values["retry_base_delay_s"]),
    ).operation_bound_s


# How many storage bounds (and cleanup bounds) a client's request may take once S3 stops
# answering, by request (README "When S3 is slow or gone" has the reasons):
# (operations, cleanup steps of ABORT_BOUND_S).
REQUEST_BOUNDS = {
    "PUT": (2, 1),  # the write, the check whether it landed anyway; the abort
    "POST": (2, 1),  # tus creation: the info write and its check; the quota marker's removal
    "HEAD": (1, 0),  # the state read
    "PATCH": (4, 1),  # a part; a lease renewal in flight; the commit; releasing the lease
    "DELETE": (3, 0),  # the abort (or a state delete); releasing the lease
}


def request_bound_s(method: str = "PUT", **storage: Any) -> float:
    """Longest a client may wait for an answer to ``method`` while S3 is slow or gone."""
    operations, cleanups = REQUEST_BOUNDS[method]
    return operations * storage_bound_s(**storage) + cleanups * ABORT_BOUND_S


def unique_prefix(tag: str) -> str:
    """A key prefix of its own for a module's daemon (tests share the bucket)."""
    return f"{tag}-{uuid.uuid4().hex[:12]}/"


@contextlib.asynccontextmanager
async def faulty_s3(
    seaweed: EmbeddedSeaweed, *, state_prefix: str = "", **settings: Any
) -> AsyncIterator[tuple[S3Storage, FaultProxy]]:
    """An S3Storage (``settings``: its timeouts and retries) that reaches ``seaweed``
    through a fault proxy, for tests that run the proxy's app in-process (``start_proxy(
    storage=...)``) or drive the engine directly: faults below S3Storage, whose retries
    and classification of errors are what those tests prove."""
    async with FaultProxy(seaweed.endpoint_url, state_prefix=state_prefix) as fp:
        storage = S3Storage(
            bucket=seaweed.bucket,
            endpoint_url=fp.url,
            access_key=seaweed.credentials.access_key,
            secret_key=seaweed.credentials.secret_key,
            **settings,
        )
        async with storage:
            yield storage, fp


@contextlib.asynccontextmanager
async def daemon_behind(
    seaweed: EmbeddedSeaweed, tmp_path: Path, prefix: str, **sections: dict[str, Any]
) -> AsyncIterator[tuple[FaultProxy, Daemon]]:
    """A fault proxy in front of the store (its tus state under ``prefix``) and the daemon
    behind it (start_behind); both stopped on the way out."""
    async with FaultProxy(seaweed.endpoint_url, state_prefix=f"{prefix}.tus/") as fp:
        daemon = await start_behind(tmp_path, seaweed, prefix, fp, **sections)
        try:
            yield fp, daemon
        finally:
            await daemon.stop()


async def start_behind(
    tmp_path: Path,
    seaweed: EmbeddedSeaweed,
    prefix: str,
    fp: FaultProxy,
    *,
    storage: dict[str, Any] | None = None,
    tus: dict[str, Any] | None = None,
    **sections: dict[str, Any],
) -> Daemon:
    """The daemon, its S3 endpoint the fault proxy; its tus sweeper off (tests sweep)."""
    return await start_daemon(
        tmp_path,
        seaweed,
        prefix,
        storage={"endpoint_url": fp.url, **NET, **(storage or {})},
        tus={"sweep_interval_s": 0, **(tus or {})},
        **sections,
    )


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(size: int, seed: str) -> bytes:
    return hashlib.shake_256(seed.encode()).digest(size)


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any
    seconds: float


async def send(
    method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> Answer:
    t0 = time.monotonic()
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, url, data=data, headers=headers) as r,
    ):
        raw = await r.read()
        body: Any = raw
        if r.content_type == "application/json":
            body = await r.json()
        return Answer(r.status, dict(r.headers), body, time.monotonic() - t0)


async def read_object(s3: S3Storage, key: str) -> tuple[bytes, dict[str, str]] | None:
    """The object at ``key`` (bytes, metadata), or None.  Read straight from the store."""
    info = await s3.head(key)
    if info is None:
        return None
    data = b"".join([c async for c in s3.iter_object(key, chunk_bytes=MiB)])
    return data, info.metadata


async def assert_stored(s3: S3Storage, key: str, data: bytes) -> None:
    """Exactly ``data`` at ``key``, with its true sha256 in the metadata."""
    got = await read_object(s3, key)
    assert got is not None, f"no object at {key}"
    stored, meta = got
    assert len(stored) == len(data) and stored == data, f"{key}: other bytes stored"
    assert meta.get("sha256") == sha256_hex(data), f"{key}: sha256 metadata {meta}"


async def sweep_after_window(s3: S3Storage, prefix: str) -> list[OpenMultipart]:
    """What the daemon's stale-multipart sweeper does once ``STALE_AFTER_S`` has passed
    (the test cannot wait that long: its clock is moved instead): abort every open
    multipart upload under ``prefix`` that no live tus upload owns.  Returns them."""
    store = TusStore(s3, f"{prefix}.tus/", 30)

    async def live(upload: OpenMultipart) -> bool:
        return await store.owns_multipart(upload.key, upload.upload_id)

    sweeper = StaleSweeper(s3, prefix, older_than_s=STALE_AFTER_S, is_live=live)
    later = datetime.now(UTC) + timedelta(seconds=STALE_AFTER_S + 5)
    return await sweeper.sweep_once(now=later)


async def assert_nothing_open(s3: S3Storage, prefix: str) -> None:
    assert await s3.list_multipart(prefix) == [], "an open multipart upload outlived the sweep"


async def assert_swept(
    fp: FaultProxy, s3: S3Storage, prefix: str, key: str, *, orphans: bool | None
) -> None:
    """Once every request the fault delayed has reached the store, and the sweep window
    has passed: nothing open at ``key``.  ``orphans``: whether the sweep had a multipart
    upload at ``key`` to remove (None: either)."""
    await fp.quiet()
    aborted = [u for u in await sweep_after_window(s3, prefix) if u.key == key]
    assert orphans is None or bool(aborted) == orphans, aborted
    await assert_nothing_open(s3, key)


def assert_clean_log(daemon: Daemon, since: int = 0) -> None:
    """No traceback (in the lines logged from ``since`` on): every failure was one the
    daemon expected and answered."""
    lines = daemon.log[since:]
    assert not any("Traceback" in line for line in lines), "\n".join(lines)


# -- a tus client that does what tus clients do after a failure: HEAD, then resume --------


# How long the client keeps retrying a PATCH answered 423 (a lease left by a failed
# PATCH lasts tus.lock_lease_s), and how often.
LOCKED_WAIT_S = 60.0
LOCKED_BACKOFF_S = 0.5


@dataclasses.dataclass
class TusRun:
    url: str | None = None
    answers: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    sha256: str | None = None  # Upload-SHA256 of the PATCH that completed the upload
    seconds: list[float] = dataclasses.field(default_factory=list)  # of each answer

    def assert_bounded(self, extra_s: float = 0.0) -> None:
        """Every request ended within its bound (request_bound_s), plus ``extra_s``."""
        for (method, status), seconds in zip(self.answers, self.seconds, strict=True):
            assert seconds < request_bound_s(method) + extra_s, (method, status, seconds)

    @property
    def errors(self) -> list[tuple[str, int]]:
        return [(m, s) for m, s in self.answers if s >= 300 and m != "HEAD"]


async def tus_upload(
    base_url: str,
    data: bytes,
    *,
    chunks: tuple[int, ...],
    filename: str = "f.bin",
    on_error: Callable[[], None] = lambda: None,
) -> TusRun:
    """Create, then PATCH ``data`` in pieces ending at the ``chunks`` offsets; after an
    error, ``on_error()``, HEAD and carry on from the server's offset (at most a few
    times)."""
    run = TusRun()
    meta = {"Upload-Metadata": f"filename {b64(filename)}"}
    for _ in range(3):
        a = await send(
            "POST", f"{base_url}/files/", headers={**TUS, **meta, "Upload-Length": str(len(data))}
        )
        run.answers.append(("POST", a.status))
        run.seconds.append(a.seconds)
        if a.status == 201:
            run.url = base_url + a.headers["Location"]
            break
        on_error()
    assert run.url is not None, run.answers
    offset, ends = 0, [*chunks, len(data)]
    failures, locked_until = 0, time.monotonic() + LOCKED_WAIT_S
    while failures < 8:
        end = next(e for e in ends if e > offset) if offset < len(data) else offset
        a = await send(
            "PATCH",
            run.url,
            data[offset:end],
            {
                **TUS,
                "Content-Type": "application/offset+octet-stream",
                "Upload-Offset": str(offset),
            },
        )
        run.answers.append(("PATCH", a.status))
        run.seconds.append(a.seconds)
        if a.status == 204:
            offset = int(a.headers["Upload-Offset"])
            if offset == len(data):
                run.sha256 = a.headers.get("Upload-SHA256")
                return run
            continue
        if a.status in (404, 410):
            return run  # gone: the caller checks that nothing was kept
        on_error()
        if a.status == 423 and time.monotonic() < locked_until:
            # A lease still held by a PATCH that failed: retry later, as tus clients do.
            await asyncio.sleep(LOCKED_BACKOFF_S)
        else:
            failures += 1
        h = await send("HEAD", run.url, headers=TUS)
        run.answers.append(("HEAD", h.status))
        run.seconds.append(h.seconds)
        if h.status != 200:
            return run
        offset = int(h.headers["Upload-Offset"])
    return run


def tus_object_key(prefix: str, url: str, filename: str = "f.bin") -> str:
    return f"{prefix}tus/{sid(url)}/{filename}"


async def tus_state_left(s3: S3Storage, prefix: str, url: str) -> list[str]:
    """State objects of the upload at ``url`` (its folder and its quota marker)."""
    upload_id = sid(url)
    keys = [o.key for o in await s3.list_objects(f"{prefix}.tus/")]
    return [k for k in keys if re.search(rf"(^|/|-){upload_id}(/|$)", k)]
