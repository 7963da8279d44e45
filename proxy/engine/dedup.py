"""Instant uploads: a content index in the bucket, and new objects made by server-side copy.

Every upload that completes through the proxy records *sha256 -> key* in a small index
object; an upload that declares its SHA-256 before its body (a PUT with ``Repr-Digest`` or
``X-Content-SHA256``, a tus creation with ``sha256`` in ``Upload-Metadata``) and whose
content is indexed gets its object by a server-side copy of the indexed one, and its body
is never read.

**Privacy.**  The index is kept *per principal*: ``<index_prefix><kind>/<ref>/<sha256>``
(``token/<ref>``, ``signed/<ref>``, ``anonymous/-``; ``ref`` is the one-way hash of
:class:`~proxy.auth.Principal`).  A lookup reads only the caller's own entries, so whether
an upload is instant depends only on what the same principal uploaded before: it says
nothing about anyone else's content, and its timing (a hit costs a HEAD and a copy, a miss
one GET) says nothing either.  With auth off every client is the one ``anonymous``
principal, and shares one index, as it shares one namespace of keys.

**Stale entries.**  An entry is a hint, never trusted as it is: before a copy, the
object it names is HEADed and must still have the entry's size, our ``sha256`` metadata
and the caller's ``owner`` metadata (so an object replaced by someone else's, even with
the same bytes, is not used).  The copy itself is conditional on the ETag that HEAD saw
(``CopySourceIfMatch``), so an object replaced between the HEAD and the copy fails the
copy instead of being copied.  An object deleted or changed behind our back (or
overwritten through us with ``overwrite = true``) therefore only costs a miss: the entry
is deleted (``If-Match`` on the entry's ETag, so a newer entry stays) and the upload takes
the normal way.  The entry of the latest upload of some content wins.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass

from proxy.engine.upload import verify_stored
from proxy.errors import ConditionFailed, ProxyError
from proxy.obs.metrics import Metrics
from proxy.storage.base import Copier, ObjectInfo, StateStore, Storage

log = logging.getLogger(__name__)

# An index entry is a few dozen bytes; anything larger is not one of ours.
MAX_ENTRY_BYTES = 4096
# Writing the entry is bookkeeping after the object is stored: it may not hold up the
# answer for long, and failing to write it only costs a later upload its shortcut.
RECORD_TIMEOUT_S = 10.0
OWNER_METADATA = "owner"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Copied:
    """An object made by copying indexed content."""

    key: str
    size: int
    sha256: str
    etag: str
    source: str


class ContentIndex:
    """The content index of one bucket under ``prefix``."""

    def __init__(self, storage: Storage, prefix: str, metrics: Metrics | None = None) -> None:
        if not (isinstance(storage, StateStore) and isinstance(storage, Copier)):
            raise TypeError("instant uploads need a store with small objects and copies")
        self._storage = storage
        self._state: StateStore = storage
        self._copier: Copier = storage
        self.prefix = prefix
        self._metrics = metrics

    def entry_key(self, principal: str, sha256: str) -> str:
        kind, _, ref = principal.partition(":")
        return f"{self.prefix}{kind}/{ref or '-'}/{sha256}"

    async def record(self, principal: str, key: str, size: int, sha256: str) -> None:
        """``key`` now holds ``size`` bytes with ``sha256``, written by ``principal``.
        Best effort: a failure is logged, never raised."""
        if size <= 0 or not _SHA256_HEX.fullmatch(sha256):
            return
        body = json.dumps({"key": key, "size": size}).encode()
        try:
            await asyncio.wait_for(
                self._state.put_conditional(self.entry_key(principal, sha256), body),
                RECORD_TIMEOUT_S,
            )
        except (ProxyError, TimeoutError) as e:
            log.warning("could not index the content of %r: %s", key, e)

    async def find(self, principal: str, sha256: str, size: int | None) -> ObjectInfo | None:
        """The object ``principal`` stored with ``sha256`` (and ``size`` bytes, when
        given), checked against the store; None if there is none or the entry is stale."""
        entry_key = self.entry_key(principal, sha256)
        got = await self._state.get_small(entry_key, MAX_ENTRY_BYTES)
        if got is None:
            self._lookup("miss")
            return None
        raw, entry_etag = got
        try:
            doc = json.loads(raw)
            key, entry_size = str(doc["key"]), int(doc["size"])
        except (ValueError, KeyError, TypeError):
            key, entry_size = "", -1
        obj = await self._storage.head(key) if key else None
        if not (
            obj is not None
            and obj.size == entry_size
            and obj.metadata.get("sha256") == sha256
            and obj.metadata.get(OWNER_METADATA) == principal
        ):
            log.info("content index entry for %r is stale; dropping it", key)
            self._lookup("stale")
            await self._drop(entry_key, entry_etag)
            return None
        if size is not None and size != obj.size:
            # The client declared another length for this digest: its body cannot match.
            self._lookup("miss")
            return None
        self._lookup("hit")
        return obj

    async def copy(
        self,
        source: ObjectInfo,
        key: str,
        *,
        owner: str,
        sha256: str,
        metadata: dict[str, str],
        content_type: str,
        create_only: bool,
        protocol: str,
    ) -> Copied:
        """A new object ``key`` with the bytes of ``source`` (found by :meth:`find` for
        ``owner``), its ``sha256``, ``metadata`` and owner; checked by a HEAD like any
        single PutObject, then indexed and counted."""
        etag = await self._copier.copy_object(
            source.key,
            key,
            source_etag=source.etag,
            size=source.size,
            metadata={**metadata, OWNER_METADATA: owner, "sha256": sha256},
            content_type=content_type,
            if_none_match=create_only,
        )
        await verify_stored(self._storage, key, etag=etag, size=source.size, sha256=sha256)
        await self.record(owner, key, source.size, sha256)
        if self._metrics is not None:
            self._metrics.deduplicated(protocol, source.size)
        log.info("instant upload key=%r bytes=%d copy of %r", key, source.size, source.key)
        return Copied(key, source.size, sha256, etag, source.key)

    def _lookup(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.dedup_lookup(result)

    async def _drop(self, entry_key: str, etag: str) -> None:
        try:
            await self._storage.delete_object(entry_key, if_match=etag)
        except ConditionFailed:
            pass  # rewritten meanwhile by a newer upload: that entry stays
        except ProxyError as e:
            log.warning("could not drop a stale content index entry: %s", e)
