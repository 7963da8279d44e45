"""Many files, ``jobs`` at a time, over one HTTP session, with one reporter ticking."""

from __future__ import annotations

import asyncio
import os
import time
from typing import IO

import aiohttp

from proxy import __version__
from proxy.client.progress import (
    FileProgress,
    FileResult,
    JsonReporter,
    LineReporter,
    Reporter,
    Summary,
    TtyReporter,
)
from proxy.client.resume import ResumeStore
from proxy.client.source import RateLimit
from proxy.client.transfer import Options, Uploader

CONNECT_TIMEOUT_S = 30.0


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0  # reported as this file's failure when its turn comes


def make_reporter(
    mode: str, files: list[FileProgress], out: IO[str], progress_interval_s: float
) -> Reporter:
    if mode == "json":
        return JsonReporter(files, out)
    if mode == "lines":
        return LineReporter(files, out, progress_interval_s)
    if mode == "tty":
        return TtyReporter(files)
    return Reporter(files)


async def upload_all(
    paths: list[str],
    options: Options,
    *,
    mode: str,
    out: IO[str],
    jobs: int,
    limit_rate: int | None = None,
    progress_interval_s: float = 5.0,
    store: ResumeStore | None = None,
) -> list[FileResult]:
    # Sizes up front: the overall bar and the total lines need every file's from the start.
    files = [FileProgress(path, _size(path)) for path in paths]
    reporter = make_reporter(mode, files, out, progress_interval_s)
    rate = RateLimit(limit_rate) if limit_rate else None
    # No total or read timeout: a big PATCH on a slow link legitimately takes hours.  The
    # stall watchdog in transfer.py is what ends a dead connection.
    timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S, sock_read=None)
    started = time.monotonic()
    slots = asyncio.Semaphore(jobs)

    async def one(uploader: Uploader, path: str, progress: FileProgress) -> FileResult:
        async with slots:
            result = await uploader.upload(path, progress)
        reporter.finished(result)
        return result

    async def ticker() -> None:
        while True:
            await asyncio.sleep(reporter.tick_interval_s)
            reporter.tick(time.monotonic())

    async with aiohttp.ClientSession(
        timeout=timeout,
        connector=aiohttp.TCPConnector(limit=2 * jobs),
        headers={"User-Agent": f"upload-proxy/{__version__}"},
    ) as session:
        uploader = Uploader(session, options, store or ResumeStore(), reporter.retry, rate)
        tick = asyncio.create_task(ticker())
        try:
            results = await asyncio.gather(
                *(one(uploader, p, f) for p, f in zip(paths, files, strict=True))
            )
        finally:
            tick.cancel()
            await asyncio.gather(tick, return_exceptions=True)
            reporter.stop()  # also on Ctrl-C: give the terminal back in a sane state
    summary = Summary(
        files=len(results),
        ok=sum(r.ok for r in results),
        failed=sum(not r.ok for r in results),
        bytes=sum(r.size for r in results if r.ok),
        seconds=time.monotonic() - started,
    )
    reporter.close(summary)
    return list(results)
