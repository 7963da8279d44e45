"""Stale multipart uploads are swept; live ones (tus predicate, running uploads) are not."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from proxy.storage.base import OpenMultipart
from proxy.storage.sweeper import StaleSweeper
from tests.conftest import MiB, StartProxy, assert_nothing_left
from tests.wrapped import Wrapped

LATER = timedelta(hours=2)


async def open_uploads(s3: Any, prefix: str) -> dict[str, str]:
    return {u.upload_id: u.key for u in await s3.list_multipart(prefix)}


async def test_sweeps_stale_and_spares_live_tus_upload(s3: Any, prefix: str) -> None:
    crashed = await s3.create_multipart(f"{prefix}crashed.bin", metadata={}, content_type="x/y")
    tus_owned = await s3.create_multipart(f"{prefix}tus/abc", metadata={}, content_type="x/y")
    outside = await s3.create_multipart(f"other-{prefix}x", metadata={}, content_type="x/y")
    claimed: list[OpenMultipart] = []

    def tus_live(upload: OpenMultipart) -> bool:
        claimed.append(upload)
        return upload.upload_id == tus_owned

    try:
        sweeper = StaleSweeper(s3, prefix, older_than_s=3600, is_live=tus_live)
        # Young uploads are never touched, whatever the predicate says.
        assert await sweeper.sweep_once() == []
        assert set(await open_uploads(s3, prefix)) == {crashed, tus_owned}
        aborted = await sweeper.sweep_once(now=datetime.now(UTC) + LATER)
        assert [u.upload_id for u in aborted] == [crashed]
        assert set(await open_uploads(s3, prefix)) == {tus_owned}
        assert {u.upload_id for u in claimed} == {crashed, tus_owned}
        assert outside in await open_uploads(s3, f"other-{prefix}")  # not our prefix
    finally:
        await s3.abort_multipart(f"{prefix}tus/abc", tus_owned)
        await s3.abort_multipart(f"other-{prefix}x", outside)
    await assert_nothing_left(s3, prefix)


async def test_app_sweeper_spares_a_running_upload(
    start_proxy: StartProxy, s3: Any, prefix: str
) -> None:
    """A plain upload streaming now is live; a live tus upload's parts are spared too
    (tests/test_tus_integration.py::test_stale_sweeper_spares_a_live_tus_upload)."""
    p = await start_proxy(upload={"stale_upload_after_s": 600, "sweep_interval_s": 3600})
    stale = await s3.create_multipart(f"{prefix}stale", metadata={}, content_type="x/y")

    go = asyncio.Event()

    async def body() -> Any:
        yield b"a" * (6 * MiB)  # more than one 5 MiB part: the multipart upload exists
        await go.wait()
        yield b"b"

    async def put() -> int:
        async with (
            aiohttp.ClientSession() as s,
            s.put(f"{p.url}/uploads/running", data=body()) as r,
        ):
            return r.status

    task = asyncio.create_task(put())
    async with asyncio.timeout(10):
        while not any(k.endswith("running") for k in (await open_uploads(s3, prefix)).values()):
            await asyncio.sleep(0.05)
    aborted = await p.sweeper.sweep_once(now=datetime.now(UTC) + LATER)
    assert [u.upload_id for u in aborted] == [stale]
    go.set()
    assert await task == 201
    assert await s3.list_multipart(prefix) == []


async def test_a_part_written_within_the_window_keeps_an_upload_alive(s3: Any, prefix: str) -> None:
    """Another instance's long PUT: older than the window, but still adding parts.  Only
    the store knows that (ListParts' LastModified); the sweeper must ask before aborting."""
    window_s = 3.0
    writing = f"{prefix}writing.bin"
    crashed = f"{prefix}crashed.bin"
    writing_id = await s3.create_multipart(writing, metadata={}, content_type="x/y")
    crashed_id = await s3.create_multipart(crashed, metadata={}, content_type="x/y")
    await s3.upload_part(crashed, crashed_id, 1, memoryview(b"c" * MiB), None)
    sweeper = StaleSweeper(s3, prefix, older_than_s=window_s)
    part = 1
    last_write = asyncio.get_running_loop().time()
    await s3.upload_part(writing, writing_id, part, memoryview(b"w" * MiB), None)
    aborted: list[OpenMultipart] = []
    async with asyncio.timeout(30):
        while not aborted:
            if asyncio.get_running_loop().time() - last_write > window_s / 3:
                part += 1
                await s3.upload_part(writing, writing_id, part, memoryview(b"w" * MiB), None)
                last_write = asyncio.get_running_loop().time()
            aborted = await sweeper.sweep_once()
            await asyncio.sleep(0.2)
    assert [u.upload_id for u in aborted] == [crashed_id]
    assert set(await open_uploads(s3, prefix)) == {writing_id}
    # The writer stops: once its last part is older than the window, it goes too.
    async with asyncio.timeout(30):
        while not (aborted := await sweeper.sweep_once()):
            await asyncio.sleep(0.2)
    assert [u.upload_id for u in aborted] == [writing_id]
    await assert_nothing_left(s3, prefix)


async def test_ages_are_taken_on_the_stores_clock(s3: Any, prefix: str) -> None:
    """A host whose clock runs hours ahead must not see young uploads as stale."""
    upload_id = await s3.create_multipart(f"{prefix}young", metadata={}, content_type="x/y")
    try:
        [listed] = await s3.list_multipart(prefix)
        assert listed.listed_at is not None  # the store's Date header was read
        assert abs((listed.listed_at - datetime.now(UTC)).total_seconds()) < 300
        ahead = StaleSweeper(s3, prefix, older_than_s=60, clock=lambda: datetime.now(UTC) + LATER)
        assert await ahead.sweep_once() == []
        assert set(await open_uploads(s3, prefix)) == {upload_id}
    finally:
        await s3.abort_multipart(f"{prefix}young", upload_id)


async def test_an_upload_gone_between_listing_and_check_does_not_fail_the_sweep(
    s3: Any, prefix: str
) -> None:
    """Another instance completes or aborts an upload after this sweep listed it: the
    sweep skips it and still aborts the rest (a failed sweep would abort nothing)."""
    gone = f"{prefix}gone.bin"
    stale = f"{prefix}stale.bin"
    gone_id = await s3.create_multipart(gone, metadata={}, content_type="x/y")
    stale_id = await s3.create_multipart(stale, metadata={}, content_type="x/y")

    class AbortedMeanwhile(Wrapped):
        async def list_parts(self, key: str, upload_id: str) -> Any:
            if upload_id == gone_id:
                await self.inner.abort_multipart(key, upload_id)
            return await self.inner.list_parts(key, upload_id)

    sweeper = StaleSweeper(AbortedMeanwhile(s3), prefix, older_than_s=60)  # type: ignore[arg-type]
    aborted = await sweeper.sweep_once(now=datetime.now(UTC) + LATER)
    assert [u.upload_id for u in aborted] == [stale_id]
    await assert_nothing_left(s3, prefix)
