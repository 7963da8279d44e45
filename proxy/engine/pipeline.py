"""Request body -> S3 parts: the one streaming engine every protocol uses.  No HTTP, no boto.

A :class:`PartPipeline` carries one body (a plain upload, or one tus PATCH) into parts of
one S3 multipart upload:

* the body is read into parts (:class:`~proxy.engine.buffers.PartBuffer`): straight from
  the socket when the web layer offers a :class:`BodySource` (no chunk objects, no copy),
  else chunks are copied in; part memory is leased from the shared pool only as bytes
  arrive; the first lease is the upload's
  admission (503 ``ERR_BUSY`` after ``admission_timeout_s``), later waits are the
  back-pressure that slows the client;
* a full part is sent while the next one fills, with at most ``parts_in_flight`` parts
  uploading; the multipart upload is created when the first part is sent, so a body that
  ends below one part is stored by :meth:`put_whole` (one PutObject) and never has one;
* each part is hashed exactly once, strictly in the order parts were dispatched, by the
  caller's :class:`BodyDigest` plus the per-part checksum S3 verifies (in a worker thread
  above :data:`~proxy.engine.hashing.HASH_IN_THREAD_MIN_BYTES`); when S3 needs no part
  checksum the hash overlaps with the part's upload;
* a part that fails is recorded, never retried here (the storage retries): the next
  dispatch, :meth:`check` or :meth:`settle` reports it.  The parts stored so far are
  :meth:`sent`, in order, each with the digest state after it.

What differs between protocols are parameters, not copies: ``front_bytes`` (tus: bytes
of earlier PATCHes that lead the first part, fetched by ``fill_front`` only when that
part is sent), ``fence`` (tus: called before a part starts; raises once the upload's
lease is running out), the digest and its per-part state, and what the caller does with
the bytes left after the last full part (:attr:`tail`): a last part, a whole object, or
(tus) a pending segment.  Failure handling is the caller's too: a plain upload cancels
and aborts everything, a tus PATCH settles and keeps the parts that made it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeAlias, TypeVar

from proxy.engine.buffers import Buffers, PartBuffer, PoolTimeout, release_view
from proxy.engine.hashing import off_loop, part_checksum
from proxy.errors import (
    Busy,
    ObjectExists,
    ProxyError,
    StorageError,
    StorageUnavailable,
    TooLarge,
)
from proxy.obs.observer import NullObserver, StreamObserver
from proxy.storage.base import PartChecksum, Pieces, Storage

S = TypeVar("S")
S_co = TypeVar("S_co", covariant=True)


@dataclass(frozen=True)
class StreamSettings:
    part_size_bytes: int
    parts_in_flight: int
    admission_timeout_s: float
    part_checksum: str = "none"
    hash_in_thread: bool = True
    # Longest one part (or whole-object) upload may take, retries included; None:
    # unbounded.  The S3 client's own timeouts end within it; it also bounds what they do
    # not (a body send that stalls), and for tus a part still in flight after its lease
    # ended could land over a new holder's part.
    part_timeout_s: float | None = None


class BodyDigest(Protocol[S_co]):
    """The caller's whole-body hashes, fed one part at a time, strictly in order."""

    def update(self, views: Sequence[memoryview], own: Sequence[memoryview]) -> S_co:
        """Add one part's bytes (``views``; ``own`` is the part of them this body carried,
        the rest came from ``front_bytes``); return the state to keep with the part.
        Runs in a worker thread for large parts."""


@dataclass(frozen=True)
class PartTarget:
    """Where the body's parts go."""

    key: str
    content_type: str
    metadata: dict[str, str]  # the object's, as the multipart upload is created with it
    multipart_id: str = ""  # "" until the first part is sent: created then
    first_number: int = 1  # the body's first part number
    front_bytes: int = 0  # bytes of earlier bodies that lead the first part (tus)


@dataclass(frozen=True)
class SentPart(Generic[S]):
    """A part the store acknowledged, with the digest state after its bytes."""

    number: int
    etag: str
    size: int
    state: S


class BodySource(abc.ABC):
    """A request body read straight into the caller's buffers (no chunk objects)."""

    @abc.abstractmethod
    async def more(self) -> bool:
        """Whether the body has another byte (False: it ended).  Raises if it broke."""

    @abc.abstractmethod
    async def readinto(self, view: memoryview) -> int:
        """Read the next bytes into ``view``: at least one once :meth:`more` said so, at
        most ``len(view)``.  Raises, with nothing read, if the body broke; bytes read
        before a break are returned first (the next call raises)."""


class ChunkSource(BodySource):
    """A body given as chunks (``bytes`` objects), copied into the caller's buffers."""

    __slots__ = ("_chunks", "_left")

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._left = memoryview(b"")

    async def more(self) -> bool:
        while not self._left:
            chunk = await anext(self._chunks, None)
            if chunk is None:
                return False
            self._left = memoryview(chunk)
        return True

    async def readinto(self, view: memoryview) -> int:
        if not await self.more():
            return 0
        left = self._left
        n = min(len(view), len(left))
        view[:n] = left[:n]
        self._left = left[n:]
        return n


# What a pipeline reads: a body source, or chunks.
Body: TypeAlias = BodySource | AsyncIterator[bytes]


def _never_fenced() -> None:
    pass


class PartPipeline(Generic[S]):
    """Carries one body into parts.  :meth:`receive`, then the caller's ending
    (:meth:`dispatch` the tail, :meth:`put_whole`, or keep it); :meth:`close` always."""

    def __init__(
        self,
        storage: Storage,
        buffers: Buffers,
        settings: StreamSettings,
        target: PartTarget,
        digest: BodyDigest[S],
        *,
        limit_bytes: int,
        too_large: str,
        declared_bytes: int | None = None,
        observer: StreamObserver | None = None,
        fence: Callable[[], None] = _never_fenced,
        fill_front: Callable[[PartBuffer], Awaitable[None]] | None = None,
    ) -> None:
        self._storage = storage
        self._buffers = buffers
        self._settings = settings
        self._target = target
        self._digest = digest
        self._limit_bytes = limit_bytes
        self._too_large = too_large  # the message of the TooLarge past limit_bytes
        self._obs: StreamObserver = observer or NullObserver()
        self._fence = fence
        self._fill_front = fill_front
        front = target.front_bytes
        self._total = None if declared_bytes is None else front + declared_bytes
        self.multipart_id = target.multipart_id
        self.received_bytes = 0
        # Bytes at the front of the tail that are not this body's, and whether they still
        # have to be fetched (fill_front) before the tail is sent.
        self.front = front
        self._unfilled = front > 0
        self._parted_bytes = 0  # bytes in the parts dispatched so far
        self._next_number = target.first_number
        self._admitted = False
        self._tasks: dict[asyncio.Task[None], PartBuffer] = {}
        self._done: dict[int, SentPart[S]] = {}
        self._failure: BaseException | None = None
        self._last_hash: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        # The bytes after the last dispatched part (memory is leased as bytes arrive).
        self.tail: PartBuffer | None = self._new_part(front)

    # -- receiving -----------------------------------------------------------------------

    def _new_part(self, start: int = 0) -> PartBuffer:
        """The next part, sized to what is left of a declared body (no memory yet)."""
        size = self._settings.part_size_bytes
        if self._total is not None and self._total > self._parted_bytes:
            size = min(size, self._total - self._parted_bytes)
        return PartBuffer(self._buffers, size, start)

    async def receive(self, body: Body) -> None:
        """Read the body into parts, sending each full part once more bytes come."""
        assert self.tail is not None
        source = body if isinstance(body, BodySource) else ChunkSource(body)
        part = self.tail
        while await source.more():
            if part.full:
                # More bytes are coming, so this full part is not the last one.
                await self.dispatch()
                part = self.tail = self._new_part()
            if not part.room:
                await self._lease(part)
            view = part.room_view()
            try:
                n = await source.readinto(view)
            finally:
                release_view(view)
            self.received_bytes += n
            self._obs.received(n)
            if self.received_bytes > self._limit_bytes:
                # Before the part counts them: no byte past the limit is ever stored.
                raise TooLarge(self._too_large)
            part.advance(n)

    async def _lease(self, part: PartBuffer) -> None:
        """Memory for the part's next bytes.  The body's first lease is its admission:
        503 ERR_BUSY if none frees up within the admission timeout.  Later leases are
        waited for: that wait is the back-pressure."""
        if self._admitted:
            await part.lease()
            return
        timeout_s = self._settings.admission_timeout_s
        try:
            await part.lease(timeout_s=timeout_s)
        except PoolTimeout:
            raise Busy(
                "all upload buffers are in use; retry later",
                headers={"Retry-After": str(max(1, round(timeout_s)))},
            ) from None
        self._admitted = True

    async def fill_front(self) -> None:
        """Fetch the front bytes (earlier bodies') into the room kept for them in the tail."""
        if not self._unfilled or self.tail is None:
            return
        assert self._fill_front is not None, "front_bytes without fill_front"
        await self.tail.cover()
        await self._fill_front(self.tail)
        self._unfilled = False

    # -- parts -------------------------------------------------------------------------

    async def dispatch(self) -> None:
        """Send the tail as the next part once fewer than ``parts_in_flight`` are sending;
        the multipart upload is created with the first.  The tail is then None."""
        part = self.tail
        assert part is not None
        self._fence()
        if not self.multipart_id:
            t = self._target
            self.multipart_id = await self._storage.create_multipart(
                t.key, metadata=t.metadata, content_type=t.content_type
            )
        await self.fill_front()
        while len(self._tasks) >= self._settings.parts_in_flight:
            self.check()
            await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        self.check()
        own = part.views(self.front) if self.front else None
        self.tail, self.front = None, 0
        self._parted_bytes += part.filled
        number = self._next_number
        self._next_number += 1
        # Chained here, in dispatch order: each part's hash waits for the previous one's.
        prev, self._last_hash = self._last_hash, self._loop.create_future()
        task = asyncio.create_task(self._send(number, part, own, prev, self._last_hash))
        self._tasks[task] = part
        task.add_done_callback(self._part_done)

    def _part_done(self, task: asyncio.Task[None]) -> None:
        # Also for a task cancelled before it ran (its own finally never did).
        self._tasks.pop(task).release()
        # Retrieved for every part, not only the first to fail: a second part failing the
        # same way is known already, and asyncio would log it as never retrieved.
        failure = asyncio.CancelledError() if task.cancelled() else task.exception()
        if self._failure is None:
            self._failure = failure

    def check(self) -> None:
        """Raise the first part failure, in the caller's task, where it ends the body."""
        failure = self._failure
        if failure is None:
            return
        if isinstance(failure, ProxyError):
            raise failure
        raise StorageError("a part could not be stored") from failure

    @property
    def failed(self) -> bool:
        return self._failure is not None

    async def _send(
        self,
        number: int,
        part: PartBuffer,
        own: list[memoryview] | None,
        prev: asyncio.Future[None] | None,
        mine: asyncio.Future[None],
    ) -> None:
        views = part.views()
        try:
            if self._settings.part_checksum == "none":
                # Nothing S3 needs depends on the hash: send and hash at once.
                hashing = asyncio.ensure_future(self._hash(views, own, prev, mine))
                try:
                    etag = await self._upload_part(number, views, None)
                finally:
                    _, state = await hashing
            else:
                checksum, state = await self._hash(views, own, prev, mine)
                etag = await self._upload_part(number, views, checksum)
            self._done[number] = SentPart(number, etag, part.filled, state)
            self._obs.stored(part.filled)
        finally:
            part.release()

    async def _upload_part(
        self, number: int, views: list[memoryview], checksum: PartChecksum | None
    ) -> str:
        t = self._target
        async with self._bounded("an UploadPart"):
            return await self._storage.upload_part(
                t.key, self.multipart_id, number, Pieces.of(views), checksum
            )

    @contextlib.asynccontextmanager
    async def _bounded(self, what: str) -> AsyncIterator[None]:
        """One storage operation within ``part_timeout_s``; past it, the store counts as
        unavailable (503 with Retry-After), as when its own retries run out: a bare
        TimeoutError would be a 500."""
        bound_s = self._settings.part_timeout_s
        try:
            async with asyncio.timeout(bound_s):
                yield
        except TimeoutError:
            raise StorageUnavailable(
                f"storage did not finish {what} within {bound_s:.0f}s",
                headers={"Retry-After": "5"},
            ) from None

    async def _hash(
        self,
        views: list[memoryview],
        own: list[memoryview] | None,
        prev: asyncio.Future[None] | None,
        mine: asyncio.Future[None],
    ) -> tuple[PartChecksum | None, S]:
        """Hash one part after the previous part's hash finished."""
        digest, algorithm = self._digest, self._settings.part_checksum
        mine_views = views if own is None else own

        def work() -> tuple[PartChecksum | None, S, float]:
            t0 = time.perf_counter()
            state = digest.update(views, mine_views)
            checksum = part_checksum(algorithm, views)
            return checksum, state, time.perf_counter() - t0

        nbytes = sum(len(v) for v in views)
        try:
            if prev is not None:
                await asyncio.shield(prev)
            checksum, state, seconds = await off_loop(work, nbytes, self._settings.hash_in_thread)
        finally:
            if not mine.done():
                mine.set_result(None)
        self._obs.hashed(nbytes, seconds)
        return checksum, state

    async def settle(self, timeout_s: float | None = None) -> None:
        """Wait for the parts in flight (not cancelled: what they store counts); after
        ``timeout_s`` give up on those still running (they count as failed)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
        for task in list(self._tasks):
            task.cancel()
            if self._failure is None:
                self._failure = TimeoutError(f"a part upload ran past {timeout_s}s")

    async def cancel(self) -> None:
        """Cancel the parts in flight and wait for them to end."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def sent(self) -> list[SentPart[S]]:
        """The parts stored, in order from the first, up to the first that is not."""
        parts: list[SentPart[S]] = []
        number = self._target.first_number
        while number in self._done:
            parts.append(self._done[number])
            number += 1
        return parts

    @property
    def dispatched(self) -> int:
        """How many parts this body started (stored or not)."""
        return self._next_number - self._target.first_number

    # -- the whole object in one request ---------------------------------------------------

    async def put_whole(
        self,
        metadata: Callable[[S], dict[str, str]],
        *,
        if_none_match: bool,
        on_exists: Callable[[int, dict[str, str]], Awaitable[str]] | None = None,
        before_put: Callable[[], Awaitable[None]] | None = None,
    ) -> SentPart[S]:
        """Store the tail, the body's every byte (no part was dispatched), as the whole
        object with one PutObject: hashed first, then ``metadata(state)`` (which may raise,
        e.g. a digest mismatch: nothing is stored then), then ``before_put()`` (which may
        refuse too: a pre-finish hook).  A create-only put that finds the key taken asks
        ``on_exists(size, metadata)`` for the etag of what is there, if it is ours."""
        part = self.tail
        assert part is not None and not self.dispatched
        self._fence()
        await self.fill_front()
        own = part.views(self.front) if self.front else None
        self.tail, self.front = None, 0
        number = self._next_number
        self._next_number += 1
        size = part.filled
        try:
            views = part.views()
            prev, self._last_hash = self._last_hash, self._loop.create_future()
            checksum, state = await self._hash(views, own, prev, self._last_hash)
            meta = metadata(state)
            if before_put is not None:
                await before_put()
            t = self._target
            try:
                async with self._bounded("a PutObject"):
                    etag = await self._storage.put_object(
                        t.key,
                        Pieces.of(views),
                        metadata=meta,
                        content_type=t.content_type,
                        checksum=checksum,
                        if_none_match=if_none_match,
                    )
            except ObjectExists:
                if on_exists is None:
                    raise
                etag = await on_exists(size, meta)
        finally:
            part.release()
        sent = self._done[number] = SentPart(number, etag, size, state)
        self._obs.stored(size)
        return sent

    def close(self) -> None:
        """Give back the tail's memory (the parts in flight give back their own)."""
        part, self.tail = self.tail, None
        if part is not None:
            part.release()
