"""Aborts multipart uploads that a crash or a power cut left open.

A plain upload aborts its multipart upload on every failure it lives to see; a
``kill -9``, an OOM kill or a pulled plug leaves it open, and its parts cost
storage for ever.  At start-up and every ``sweep_interval_s`` this lists the open
multipart uploads under the proxy's key prefix and aborts those older than
``stale_upload_after_s`` unless the ``is_live`` predicate claims them: uploads
running in this process, and (once tus exists) uploads a tus client may still
resume.  An S3 lifecycle rule (AbortIncompleteMultipartUpload) is the second line
of defence for the time this daemon does not run at all (see the deployment docs).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Protocol

from proxy.errors import ProxyError
from proxy.storage.base import OpenMultipart, Storage

log = logging.getLogger(__name__)


class LiveUploadPredicate(Protocol):
    """True if this open multipart upload belongs to an upload that is still wanted.
    May answer asynchronously (tus asks S3 for the upload's state)."""

    def __call__(self, upload: OpenMultipart) -> bool | Awaitable[bool]: ...


def never_live(upload: OpenMultipart) -> bool:
    return False


def any_live(*predicates: LiveUploadPredicate) -> LiveUploadPredicate:
    """One predicate that is true when any of ``predicates`` is."""

    async def live(upload: OpenMultipart) -> bool:
        for p in predicates:
            if await resolve(p(upload)):
                return True
        return False

    return live


async def resolve(answer: bool | Awaitable[bool]) -> bool:
    return await answer if inspect.isawaitable(answer) else answer


class StaleSweeper:
    def __init__(
        self,
        storage: Storage,
        prefix: str,
        *,
        older_than_s: float,
        is_live: LiveUploadPredicate = never_live,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if older_than_s <= 0:
            raise ValueError("older_than_s must be > 0")
        self._storage = storage
        self._prefix = prefix
        self._older_than_s = older_than_s
        self._is_live = is_live
        self._clock = clock
        self.aborted_total = 0

    def _is_stale(self, upload: OpenMultipart, now: datetime) -> bool:
        initiated = upload.initiated
        if initiated.tzinfo is None:  # S3 speaks UTC; some stores omit the zone
            initiated = initiated.replace(tzinfo=UTC)
        return (now - initiated).total_seconds() > self._older_than_s

    async def sweep_once(self, now: datetime | None = None) -> list[OpenMultipart]:
        """Abort the stale, unowned uploads under the prefix; return what was aborted."""
        now = now or self._clock()
        aborted: list[OpenMultipart] = []
        for upload in await self._storage.list_multipart(self._prefix):
            # The store filters by prefix, but a store that ignores it must not cost us
            # someone else's uploads.
            if not upload.key.startswith(self._prefix) or not self._is_stale(upload, now):
                continue
            if await resolve(self._is_live(upload)):
                continue
            await self._storage.abort_multipart(upload.key, upload.upload_id)
            aborted.append(upload)
            log.info(
                "aborted stale multipart upload key=%r initiated=%s",
                upload.key,
                upload.initiated.isoformat(),
            )
        self.aborted_total += len(aborted)
        return aborted

    async def run(self, interval_s: float) -> None:
        """Sweep now and then every ``interval_s`` until cancelled; failures only log."""
        while True:
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except ProxyError as e:
                log.warning("stale upload sweep failed: %s", e.message)
            except Exception:
                log.exception("stale upload sweep failed")
            await asyncio.sleep(interval_s)
