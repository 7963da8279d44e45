"""The storage interface the upload handlers talk to, and its value types.

Handlers and the streaming layer know nothing of S3 wire details: they call
these methods with plain bytes-like bodies and get plain values back.  A backend
translates its own failures into :mod:`proxy.errors` at this boundary
(``StorageUnavailable`` for "try again later", ``StorageError`` for the rest,
``ObjectExists`` for a failed "create only" condition, ``KeyConflict`` when the key
is a folder on a store that cannot hold an object and a folder of one name).

Create-only (``if_none_match``) is a promise callers build on: of two such writes of one
key, at most one succeeds.  A backend whose store checks the condition apart from the
write queues them per key itself (S3Storage does, for SeaweedFS), so no caller has to.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, TypeAlias, runtime_checkable


class Pieces:
    """A body held in several buffers, to be sent in order and never joined: a part
    lives in a head and the rest of the part (see :mod:`proxy.engine.buffers`)."""

    __slots__ = ("_nbytes", "views")

    def __init__(self, views: Sequence[memoryview]) -> None:
        self.views = tuple(views)
        self._nbytes = sum(len(v) for v in self.views)

    @staticmethod
    def of(views: Sequence[memoryview]) -> Body:
        """The simplest body for ``views``: one view as it is, several as Pieces."""
        if len(views) == 1:
            return views[0]
        return Pieces(views) if views else b""

    def __len__(self) -> int:
        return self._nbytes

    def __iter__(self) -> Iterator[memoryview]:
        return iter(self.views)

    def __bytes__(self) -> bytes:
        return b"".join(self.views)


Body: TypeAlias = bytes | bytearray | memoryview | Pieces

# Called after every storage operation: (operation, seconds, error code or None).
# Operation names are a small fixed set, so they are safe as a metrics label.
OpObserver = Callable[[str, float, "str | None"], None]


@dataclass(frozen=True)
class PartChecksum:
    """A per-request integrity value the store verifies: ``algorithm`` is md5, crc32 or sha256;
    ``value`` is the base64 of the raw digest, as S3 headers carry it."""

    algorithm: str
    value: str


@dataclass(frozen=True)
class CompletedPart:
    number: int
    etag: str


def multipart_etag(parts: list[CompletedPart]) -> str:
    """The ETag S3 gives an object completed from ``parts``: the MD5 of the parts' MD5s,
    then "-" and the part count (for parts stored without SSE-KMS/-C).  SeaweedFS follows
    the same formula (tests/test_tus_integrity.py checks it)."""
    digests = b"".join(bytes.fromhex(p.etag.strip('"')) for p in parts)
    return f"{hashlib.md5(digests).hexdigest()}-{len(parts)}"


@dataclass(frozen=True)
class StoredPart:
    """A part as the store lists it (``ListParts``)."""

    number: int
    etag: str
    size: int
    # When the store received it, on the store's clock (None: the store does not say).
    last_modified: datetime | None = None


@dataclass(frozen=True)
class OpenMultipart:
    key: str
    upload_id: str
    initiated: datetime
    # The store's clock when it listed this upload (its answer's Date header), so an age
    # is measured on one clock whatever this host's clock says; None: no Date header.
    listed_at: datetime | None = None


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    content_type: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    last_modified: datetime | None = None  # as the store says (HEAD); None: not known


class Storage(Protocol):
    """What an upload needs from an object store."""

    bucket: str

    async def check(self) -> None:
        """Raise unless the store answers and the bucket exists."""

    async def head(self, key: str) -> ObjectInfo | None:
        """The object's size, etag and metadata, or None if there is no such object."""

    async def put_object(
        self,
        key: str,
        body: Body,
        *,
        metadata: dict[str, str],
        content_type: str,
        checksum: PartChecksum | None,
        if_none_match: bool,
    ) -> str:
        """Store a small object in one request; return its etag.  A key that is a folder
        (objects exist under ``key/``) where the store cannot also hold an object there
        raises :class:`~proxy.errors.KeyConflict`."""

    async def create_multipart(
        self, key: str, *, metadata: dict[str, str], content_type: str
    ) -> str:
        """Start a multipart upload; return its upload id."""

    async def upload_part(
        self,
        key: str,
        upload_id: str,
        number: int,
        body: Body,
        checksum: PartChecksum | None,
    ) -> str:
        """Store part ``number`` (1-based); return its etag.  Transient errors are retried here."""

    async def complete_multipart(
        self,
        key: str,
        upload_id: str,
        parts: list[CompletedPart],
        *,
        if_none_match: bool,
        size_bytes: int | None = None,
    ) -> str:
        """Make the object appear; return its etag.  With ``size_bytes`` a retry after a
        lost answer recognises its own completed object instead of failing.  A key that
        is a folder raises :class:`~proxy.errors.KeyConflict`, as for ``put_object``."""

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        """Drop a multipart upload and its parts.  Succeeds if it is already gone."""

    async def replace_metadata(
        self, key: str, *, etag: str, size: int, metadata: dict[str, str], content_type: str
    ) -> None:
        """Set metadata known only after the body was read, on the object whose etag is ``etag``."""

    async def delete_object(self, key: str, *, if_match: str | None = None) -> None:
        """Delete an object; succeeds if it does not exist.  With ``if_match``, only if its
        etag is still that one: otherwise (or if it is gone) raise
        :class:`~proxy.errors.ConditionFailed` and leave whatever is there."""

    async def list_parts(self, key: str, upload_id: str) -> list[StoredPart]:
        """The parts stored so far in a multipart upload, by part number.  A store that keeps
        every upload of one part number (SeaweedFS) lists each of them."""

    async def list_multipart(self, prefix: str = "") -> list[OpenMultipart]:
        """Open multipart uploads under ``prefix``."""


# -- optional capabilities: a layer that needs one asks for it (tusd's composer idea) -------


@runtime_checkable
class StateStore(Protocol):
    """Small objects, conditional writes and listing: the tus layer keeps its upload state
    in the bucket with them, so any instance sharing the bucket can continue an upload.
    A backend without them still serves plain uploads; tus is then unavailable."""

    async def get_small(self, key: str, max_bytes: int) -> tuple[bytes, str] | None:
        """The whole body and etag of an object of at most ``max_bytes``, or None if absent.

        A larger object is a :class:`~proxy.errors.StorageError` (it is not one of ours)."""

    async def put_conditional(
        self, key: str, body: Body, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        """Write a small object only if its etag is ``if_match`` / only if it does not exist;
        return the new etag.  A lost condition raises :class:`~proxy.errors.ConditionFailed`."""

    def iter_object(self, key: str, *, chunk_bytes: int) -> AsyncIterator[bytes]:
        """The object's bytes in chunks of at most ``chunk_bytes`` (bounded memory).

        A missing object or a read that breaks off raises a storage error."""

    async def list_objects(self, prefix: str) -> list[ObjectInfo]:
        """Every object under ``prefix`` (key, size, etag), in key order."""


@runtime_checkable
class Copier(Protocol):
    """Server-side copies: instant uploads (proxy/engine/dedup.py) make a new object from
    one already stored without a byte passing through the proxy."""

    async def copy_object(
        self,
        source: str,
        key: str,
        *,
        source_etag: str,
        size: int,
        metadata: dict[str, str],
        content_type: str,
        if_none_match: bool,
    ) -> str:
        """Copy ``size`` bytes of ``source`` while its etag is ``source_etag`` to a new
        object ``key`` (create-only with ``if_none_match``: :class:`~proxy.errors.ObjectExists`
        if taken) with ``metadata``; return the new etag.  Nothing is left on failure."""


@runtime_checkable
class PartCopier(Protocol):
    """Server-side ``UploadPartCopy``: one part of a multipart upload made from a byte
    range of a stored object, with no byte passing through the proxy.  tus
    concatenation assembles unaligned partial uploads with it (proxy/tus/concat.py)."""

    async def copy_part(
        self,
        key: str,
        upload_id: str,
        number: int,
        *,
        source: str,
        source_etag: str,
        first_byte: int,
        last_byte: int,
    ) -> str:
        """Part ``number`` of ``upload_id`` at ``key`` := bytes ``first_byte``..``last_byte``
        (inclusive) of ``source`` while its etag is ``source_etag``; return the part's etag."""


@runtime_checkable
class ObjectReader(Protocol):
    """Ranged reads of whole objects: what downloads need."""

    def read_range(
        self, key: str, *, first_byte: int, last_byte: int, etag: str, chunk_bytes: int
    ) -> AsyncGenerator[bytes, None]:
        """Bytes ``first_byte``..``last_byte`` (inclusive) of the object whose etag is still
        ``etag``, in chunks of at most ``chunk_bytes``: only those bytes are asked of the
        store (a ranged GET), and the next chunk is read only when the caller asks for it,
        so a slow consumer slows the read.  A missing object raises
        :class:`~proxy.errors.NotFound`, another etag :class:`~proxy.errors.ConditionFailed`,
        a read that breaks off a storage error."""


@runtime_checkable
class Observable(Protocol):
    """A store that reports every request attempt to an :data:`OpObserver` (metrics)."""

    def set_observer(self, observer: OpObserver | None) -> None: ...
