"""Request preflight, shared by every upload route: who the client is, who is asking
(authentication, once per request), ``Expect: 100-continue``, declared digests, and the
body (read straight into part buffers, or as chunks) under the idle timeout and the
minimum rate.

Also :class:`Uploads`, what the upload handlers (plain and tus) share, set as an AppKey
by the app's cleanup context once the store is open, and :func:`reported`, which reports
a request refused before its body streamed as rejected (the one outcome reporter,
:mod:`proxy.engine.events`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.auth import UPLOAD, Authenticator, Grant
from proxy.config import LimitsConfig, UploadConfig
from proxy.engine.context import Engine
from proxy.engine.dedup import ContentIndex
from proxy.engine.events import UploadEvents
from proxy.engine.limits import (
    BodyPace,
    ClientInfo,
    ContentPolicy,
    Network,
    UploadSlots,
    client_info,
)
from proxy.engine.pipeline import Body, BodySource
from proxy.engine.upload import ExpectedDigests
from proxy.errors import (
    BadDigest,
    ClientTimeout,
    ExpectationFailed,
    IncompleteBody,
    ProxyError,
    TooSlow,
    UnsupportedTransferCoding,
)
from proxy.web.conn import BodyTap, Guarded
from proxy.web.errors import error_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")
_REPR_DIGEST_RE = re.compile(r"(?:^|,)\s*sha-256\s*=\s*:([A-Za-z0-9+/=]*):\s*(?:;[^,]*)?(?=,|$)")


def admit_all() -> None:
    """The admission check when nothing limits new uploads."""


@dataclass
class Uploads:
    """What the upload handlers use, fully built (the app sets it once the store is open).

    ``admit`` raises a :class:`ProxyError` when no new upload may start now (memory
    pressure); it runs right after authentication, the Expect handler included.
    """

    config: UploadConfig
    bucket: str
    engine: Engine
    auth: Authenticator
    slots: UploadSlots
    admit: Callable[[], None] = admit_all
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    policy: ContentPolicy = field(default_factory=ContentPolicy)
    trusted_proxies: tuple[Network, ...] = ()
    # Keys with a plain upload running in this process: the stale sweeper spares them.
    active_keys: Counter[str] = field(default_factory=Counter)
    # Key prefixes plain uploads may not write to (tus state, tus objects, content index).
    reserved_prefixes: tuple[str, ...] = ()

    @property
    def events(self) -> UploadEvents:
        return self.engine.events

    @property
    def dedup(self) -> ContentIndex | None:
        """The content index (instant uploads); None when dedup is off."""
        return self.engine.dedup

    def chunks(
        self,
        stream: Any,
        pace: BodyPace | None = None,
        read: Callable[[], Awaitable[bytes]] | None = None,
    ) -> AsyncIterator[bytes]:
        """A request body (or one form part of it) as chunks, under the idle timeout and
        the minimum rate.  Pass one ``pace`` for every part of one request."""
        if pace is None:
            pace = self.new_pace()
        return body_chunks(stream, self.config.idle_timeout_s, read, pace)

    def body(self, request: web.Request) -> Body:
        """The whole request body, under the idle timeout and the minimum rate: read
        straight into the part buffers when it is large and of a declared length (a
        :class:`~proxy.web.conn.BodyTap`; the connection then closes after the answer),
        else as chunks."""
        pace = self.new_pace()
        tapped = tap_body(request)
        if tapped is None:
            return self.chunks(request.content, pace)
        head, tap = tapped
        return TappedBody(head, tap, self.config.idle_timeout_s, pace)

    def new_pace(self) -> BodyPace:
        lc = self.limits
        return BodyPace(lc.min_body_rate_bytes_per_s, lc.body_rate_grace_s)


UPLOADS = web.AppKey("uploads", Uploads)
_CLIENT = web.RequestKey("client", ClientInfo)
_GRANT = web.RequestKey("grant", Grant)
# Set once the request's outcome is reported (its body began streaming, or it was
# rejected by the Expect handler): nothing more to report as rejected.
_REPORTED = web.RequestKey("reported", bool)


def request_client(request: web.Request) -> ClientInfo:
    """The real client behind trusted proxies (cached per request)."""
    info = request.get(_CLIENT)
    if info is None:
        info = client_info(
            request.remote,
            request.headers.get("X-Forwarded-For"),
            request.headers.get("X-Forwarded-Proto"),
            request.scheme,
            request.app[UPLOADS].trusted_proxies,
        )
        request[_CLIENT] = info
    assert isinstance(info, ClientInfo)
    return info


def authorize(request: web.Request, scope: str = UPLOAD) -> Grant:
    """Authenticate once per request and require ``scope``; raises 401/403 as a ProxyError."""
    grant = request.get(_GRANT)
    if grant is None:
        grant = request.app[UPLOADS].auth.authenticate(
            request.method, request.headers, request.query
        )
        request[_GRANT] = grant
    assert isinstance(grant, Grant)
    grant.require(scope)
    return grant


def b64_digest(value: str, size: int, what: str) -> bytes:
    """A base64 digest of ``size`` bytes from a header, or 400 ``ERR_BAD_DIGEST``."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != size:
        raise BadDigest(f"{what} is not a base64 {size}-byte digest")
    return raw


def expected_digests(headers: Any) -> ExpectedDigests:
    """Whole-body digests from ``Content-MD5``, ``Repr-Digest`` or ``X-Content-SHA256``."""
    md5 = sha256 = None
    if (v := headers.get("Content-MD5")) is not None:
        md5 = b64_digest(v, 16, "Content-MD5")
    if (v := headers.get("Repr-Digest")) is not None:
        m = _REPR_DIGEST_RE.search(v)
        if m:
            sha256 = b64_digest(m.group(1), 32, "Repr-Digest sha-256")
        elif "sha-256" in v:
            raise BadDigest("Repr-Digest sha-256 is malformed")
    if (v := headers.get("X-Content-SHA256")) is not None:
        v = v.strip()
        try:
            own = bytes.fromhex(v) if len(v) == 64 else b64_digest(v, 32, "X-Content-SHA256")
        except ValueError:
            raise BadDigest("X-Content-SHA256 is not hex or base64 SHA-256") from None
        if sha256 is not None and own != sha256:
            raise BadDigest("Repr-Digest and X-Content-SHA256 disagree")
        sha256 = own
    return ExpectedDigests(md5=md5, sha256=sha256)


async def from_client(
    read: Callable[[], Awaitable[T]], idle_timeout_s: float, pace: BodyPace | None
) -> T:
    """``read()`` (a read of the request body) under the idle timeout and ``pace``'s
    minimum rate; the time it takes goes on the pace's clock.  Only time spent in here,
    waiting for the client, counts: not the time the caller holds back (back-pressure)."""
    allowance_s = float("inf") if pace is None else pace.allowance_s()
    if pace is not None and allowance_s <= 0:
        raise _too_slow(pace)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(min(idle_timeout_s, allowance_s)):
            return await read()
    except TimeoutError:
        if pace is not None and allowance_s < idle_timeout_s:
            raise _too_slow(pace) from None
        raise ClientTimeout(f"no body bytes for {idle_timeout_s}s") from None
    finally:
        if pace is not None:
            pace.record(loop.time() - started, 0)


async def body_chunks(
    stream: Any,
    idle_timeout_s: float,
    read: Callable[[], Awaitable[bytes]] | None = None,
    pace: BodyPace | None = None,
) -> AsyncIterator[bytes]:
    """The body as chunks; a stall longer than ``idle_timeout_s``, a rate below ``pace``'s
    minimum or a broken body raises (see :func:`from_client`)."""
    reader = read or stream.readany
    while True:
        try:
            chunk = await from_client(reader, idle_timeout_s, pace)
        except (HttpProcessingError, web.RequestPayloadError, ConnectionError, EOFError) as e:
            raise IncompleteBody(f"the request body ended early ({type(e).__name__})") from None
        if pace is not None:
            pace.record(0, len(chunk))
        if not chunk:
            return
        yield chunk


# Below this much body left, aiohttp reads it (and the connection can be kept alive).
TAP_MIN_BYTES = 1024 * 1024
# A tapped read that got bytes returns after this long even if its buffer is not full.
PROGRESS_S = 0.25


def tap_body(request: web.Request) -> tuple[bytes, BodyTap] | None:
    """Take the rest of the request's body from aiohttp: the bytes its parser holds, and
    a tap on the connection for the others.  None when aiohttp should read it: no
    declared length (chunked), little left, or not a connection of ours."""
    transport, stream = request.transport, request.content
    length = request.content_length
    if length is None or transport is None or stream.exception() is not None:
        return None
    protocol = transport.get_protocol()
    left = length - stream.total_bytes
    if not isinstance(protocol, Guarded) or stream.is_eof() or left < TAP_MIN_BYTES:
        return None
    # The bytes counted (total_bytes) are the bytes on the wire: the server never
    # decompresses bodies (auto_decompress=False in proxy.server), so the tap takes over
    # exactly where aiohttp's parser stopped.
    head = stream.read_nowait()
    # aiohttp's parser will never see the rest: its payload ends here, and the
    # connection closes after the answer (close_if_tapped says so in it).
    stream.feed_eof()
    request.protocol.close()
    return head, protocol.tap(left)


async def close_if_tapped(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: a connection whose body was tapped cannot be reused.  (Asked
    of the connection: a handler may have answered with a clone of the request.)"""
    transport = request.transport
    protocol = None if transport is None else transport.get_protocol()
    if isinstance(protocol, Guarded) and protocol.tapped:
        response.force_close()
        # This hook runs after aiohttp chose the Connection header (on aiohttp 3.14).
        response.headers["Connection"] = "close"


class TappedBody(BodySource):
    """A request body read through a :class:`~proxy.web.conn.BodyTap`, under the idle
    timeout and ``pace``'s minimum rate (the same rules as :func:`from_client`)."""

    def __init__(self, head: bytes, tap: BodyTap, idle_timeout_s: float, pace: BodyPace) -> None:
        self._head = memoryview(head)  # what aiohttp had read already
        self._tap = tap
        self._idle_timeout_s = idle_timeout_s
        self._pace = pace
        if head:
            pace.record(0, len(head))

    async def more(self) -> bool:
        if self._head:
            return True
        self._check()
        return self._tap.remaining > 0

    async def readinto(self, view: memoryview) -> int:
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        self._check()
        tap = self._tap
        tap.start(view)
        try:
            await self._wait()
        finally:
            got = tap.stop()
        if not got:
            self._check()
        return got

    def _check(self) -> None:
        failure = self._tap.failure
        if failure is not None and self._tap.remaining:
            raise IncompleteBody(f"the request body ended early ({type(failure).__name__})")

    async def _wait(self) -> None:
        """Until the read is over, or bytes arrived and :data:`PROGRESS_S` passed (so the
        counters and progress hooks move with a slow client too); a stall or a rate below
        the minimum raises."""
        tap, pace = self._tap, self._pace
        woken = tap.woken
        assert woken is not None
        loop = asyncio.get_running_loop()
        since = loop.time()
        while not woken.done():
            allowance_s = pace.allowance_s()
            if allowance_s <= 0:
                raise _too_slow(pace)
            seen, started = tap.got, loop.time()
            stall_left_s = self._idle_timeout_s - (started - since)
            await asyncio.wait((woken,), timeout=min(stall_left_s, allowance_s, PROGRESS_S))
            now = loop.time()
            pace.record(now - started, tap.got - seen)
            if tap.got:
                return
            if now - since >= self._idle_timeout_s:
                raise ClientTimeout(f"no body bytes for {self._idle_timeout_s}s")


def _too_slow(pace: BodyPace) -> TooSlow:
    return TooSlow(
        f"the body arrives at less than {pace.min_bytes_per_s:g} bytes/s "
        f"(averaged over {pace.window_s:g}s)"
    )


def check_transfer_coding(request: web.Request) -> None:
    """Chunked is the one transfer coding we take.  aiohttp's parser also takes
    ``gzip, chunked`` (any codings before a final chunked) and hands over the bytes still
    gzipped: stored as they came, they would not be the client's file."""
    codings = [
        c.strip().lower()
        for value in request.headers.getall("Transfer-Encoding", ())
        for c in value.split(",")
        if c.strip()
    ]
    if codings and codings != ["chunked"]:
        raise UnsupportedTransferCoding(
            f"only the chunked transfer coding is supported; got {', '.join(codings)!r}"
        )


@web.middleware
async def transfer_coding_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """:func:`check_transfer_coding` for every request (the Expect handler checks first)."""
    check_transfer_coding(request)
    return await handler(request)


async def expect_with(
    request: web.Request, check: Callable[[web.Request], Any]
) -> web.StreamResponse | None:
    """Run the pre-body ``check``; answer 100 Continue only if it passes.  A check that
    returns a response has answered the request without its body (an instant upload):
    that answer goes out instead, and the connection closes (the body was never asked
    for, so the connection cannot be reused)."""
    if request.headers.get("Expect", "").lower() != "100-continue":
        return error_response(ExpectationFailed("unsupported Expect header"))
    try:
        check_transfer_coding(request)
        result = check(request)
        if asyncio.iscoroutine(result):
            result = await result
    except ProxyError as e:
        request.app[UPLOADS].events.rejected(e)
        request[_REPORTED] = True
        return error_response(e, close=True)
    if isinstance(result, web.StreamResponse):
        request[_REPORTED] = True
        result.force_close()
        return result
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
    return None


def streaming(request: web.Request) -> None:
    """The request's body begins streaming: its outcome is reported from here on by what
    streams it (a failure is no longer a rejection)."""
    request[_REPORTED] = True


def reported(handler: Handler) -> Handler:
    """Report a request refused before its body began streaming as rejected."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ProxyError as e:
            if not request.get(_REPORTED):
                request.app[UPLOADS].events.rejected(e)
            raise

    return wrapped
