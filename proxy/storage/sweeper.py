"""Aborts multipart uploads that a crash or a power cut left open.

A plain upload aborts its multipart upload on every failure it lives to see; a
``kill -9``, an OOM kill or a pulled plug leaves it open, and its parts cost
storage for ever.  At start-up and every ``sweep_interval_s`` this lists the open
multipart uploads under the proxy's key prefix and aborts those older than
``stale_upload_after_s`` unless they are live: the ``is_live`` predicate claims them
(uploads running in this process, uploads a tus client may still resume), or a part
reached the store within ``stale_upload_after_s`` (an upload that another instance
sharing the store is still writing: a plain PUT that has run longer than the window
keeps adding parts).  Ages are measured on the store's clock (the Date of its listing
answer, against its Initiated and LastModified), so a host whose clock is off does not
abort another instance's uploads early.  An S3 lifecycle rule
(AbortIncompleteMultipartUpload) is the second line of defence for the time this daemon
does not run at all (see the deployment docs).
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

    def _older_than_window(self, then: datetime, now: datetime) -> bool:
        if then.tzinfo is None:  # S3 speaks UTC; some stores omit the zone
            then = then.replace(tzinfo=UTC)
        return (now - then).total_seconds() > self._older_than_s

    async def _written_lately(self, upload: OpenMultipart, now: datetime) -> bool:
        """A part of ``upload`` reached the store within the window (on its clock), or
        its parts cannot be listed (then it is left for the next sweep)."""
        try:
            parts = await self._storage.list_parts(upload.key, upload.upload_id)
        except ProxyError as e:
            # Completed or aborted since the listing (by its writer or another
            # instance's sweep), or unreadable now: nothing to abort, or nothing to
            # abort safely.  Either way, not this round, and the rest of the sweep goes on.
            log.info("stale sweep: skipped an upload it could not list: %s", e.message)
            return True
        return any(
            p.last_modified is not None and not self._older_than_window(p.last_modified, now)
            for p in parts
        )

    async def sweep_once(self, now: datetime | None = None) -> list[OpenMultipart]:
        """Abort the stale, unowned uploads under the prefix; return what was aborted.

        ``now`` (tests) replaces the store's clock; without it each upload's age is
        taken on the store's clock when it was listed (this host's clock if the store
        did not say)."""
        aborted: list[OpenMultipart] = []
        for upload in await self._storage.list_multipart(self._prefix):
            at = now or upload.listed_at or self._clock()
            # The store filters by prefix, but a store that ignores it must not cost us
            # someone else's uploads.
            if not upload.key.startswith(self._prefix):
                continue
            if not self._older_than_window(upload.initiated, at):
                continue
            if await resolve(self._is_live(upload)) or await self._written_lately(upload, at):
                continue
            await self._storage.abort_multipart(upload.key, upload.upload_id)
            aborted.append(upload)
            log.info(
                "aborted stale multipart upload key=%r initiated=%s",
                upload.key,
                upload.initiated.isoformat(),
            )
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
