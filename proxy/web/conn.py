"""Connection limits for every listener: a header deadline and a cap on open connections.

aiohttp has neither.  Its keep-alive timer (``keepalive_timeout``, set from
``server.keepalive_timeout_s``) runs from the end of each response until the next
request's headers are parsed, so it already closes idle kept-alive connections and
connections that trickle the headers of a *later* request (tests/test_connections.py
pins that).  It does not bound the *first* request of a connection on the aiohttp
versions we accept: a connection that sends nothing, or trickles header lines, stays
open for as long as the peer likes.  :class:`GuardedSite` wraps the protocol aiohttp
makes for each connection so that:

* a connection whose first request's headers (up to the empty line that ends them) are
  not complete within ``header_timeout_s`` of its accept is closed, with a 408
  ``ERR_HEADER_TIMEOUT`` answer when it sent anything;
* at most ``max_connections`` are open per listener, and at most
  ``max_connections_per_client`` from one client (an IPv4 address, an IPv6 /64: see
  :func:`~proxy.engine.limits.client_group`) unless the peer is a trusted proxy (nginx
  carries everyone's requests): one more is answered 503 ``ERR_TOO_MANY_CONNECTIONS``
  and closed before aiohttp sees it, so one address cannot hold every connection;
* a connection whose answer cannot be written for ``send_timeout_s`` (the peer does not
  read: the transport has paused writing and not resumed) is aborted.  aiohttp's writer
  waits for the socket to drain for ever, and while it waits neither timeout above
  runs, so a peer that pipelines requests and never reads their answers would hold the
  connection (and its handler) for good.  Like nginx's ``send_timeout``, it bounds the
  wait between two successful writes, not a whole answer.  The kernel would otherwise
  take megabytes of answers the peer never reads before writing pauses (send buffers
  autotune up to ``tcp_wmem``'s maximum): ``TCP_NOTSENT_LOWAT`` keeps what it holds
  *unsent* to :data:`NOTSENT_LOWAT_BYTES`, so a stalled peer is noticed after that much,
  while bytes in flight (what a fast link needs) are not limited.

It is also where a large request body can be read without aiohttp (:class:`BodyTap`):
the wrapper is a buffered protocol, so the kernel copies the body's bytes straight into
the part buffer the upload reads into, instead of into a ``bytes`` per read that
aiohttp's parser copies into another per body chunk, and the upload copies once more.
Outside a tap, each read lands in one buffer shared by the listener's connections and is
handed to aiohttp as ``bytes`` right away (the copy the event loop made before).

Why a protocol wrapper: aiohttp has no hook for either.  ``web.BaseSite`` is its public
base for custom sites, and the wrapper only forwards ``asyncio.Protocol`` calls, so no
private aiohttp attribute is read (the attributes used are ``BaseSite``'s own, as in its
subclasses).  The protocol it wraps is aiohttp's ``web.RequestHandler``, made here as
``web.Server`` would make it, so that its ``handle_error`` can answer in JSON.  Once the
first request's headers are in, the wrapper is a pass-through: it never ends a
connection that is streaming a body.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import re
import socket
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from yarl import URL

from proxy.engine.limits import Network, client_group, is_trusted
from proxy.errors import HeaderTimeout, ProxyError, TooManyConnections
from proxy.web.errors import SERVER_HEADER, JsonErrorRequestHandler

log = logging.getLogger(__name__)

# The empty line ending the headers: CRLF CRLF, or bare LFs as lenient parsers accept.
_HEADERS_END = re.compile(rb"\n\r?\n")
_RETRY_AFTER_S = 1
# One read outside a tap: what uvloop and asyncio read at once by default.
READ_BYTES = 256 * 1024
# Unsent bytes the kernel may queue per connection (see the module docstring): a few ms
# of writes at gigabit speed, so a reading peer never waits on the event loop for more.
NOTSENT_LOWAT_BYTES = 256 * 1024


class ConnectionGuard:
    """One listener's connection count and header deadline, with counters for metrics."""

    def __init__(
        self,
        header_timeout_s: float,
        max_connections: int,
        send_timeout_s: float = 60.0,
        *,
        max_per_client: int | None = None,
        trusted: tuple[Network, ...] = (),
    ) -> None:
        """``max_per_client`` None: no per-client cap; ``trusted`` peers have none."""
        per_client = max_connections if max_per_client is None else max_per_client
        if header_timeout_s <= 0 or send_timeout_s <= 0 or min(max_connections, per_client) < 1:
            raise ValueError(
                "header_timeout_s and send_timeout_s must be > 0, the connection caps >= 1"
            )
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.send_timeout_s = send_timeout_s
        self.max_per_client = per_client
        self._trusted = trusted
        # Open connections per client group; never outgrows the open connections.
        self._by_client: dict[str, int] = {}
        self.open = 0
        self.refused_total = 0
        self.header_timeouts_total = 0
        # Every connection's reads outside a tap land here, one at a time, and are
        # copied out at once (see the module docstring).
        self.read_buffer = memoryview(bytearray(READ_BYTES))

    def admit(self, peer: str) -> str | None:
        """Count a new connection from ``peer``; why it is refused, or None.  A connection
        admitted is given back with :meth:`leave`."""
        group = None if is_trusted(peer, self._trusted) else client_group(peer)
        if self.open >= self.max_connections:
            return "too many open connections; retry shortly"
        if group is not None and self._by_client.get(group, 0) >= self.max_per_client:
            return "too many open connections from your address; retry shortly"
        self.open += 1
        if group is not None:
            self._by_client[group] = self._by_client.get(group, 0) + 1
        return None

    def leave(self, peer: str) -> None:
        self.open -= 1
        if is_trusted(peer, self._trusted):
            return
        group = client_group(peer)
        left = self._by_client.get(group, 0) - 1
        if left > 0:
            self._by_client[group] = left
        else:
            self._by_client.pop(group, None)

    def wrap(
        self, factory: Callable[[], asyncio.BaseProtocol]
    ) -> Callable[[], asyncio.BufferedProtocol]:
        """A protocol factory for ``loop.create_server`` that guards ``factory``'s protocols."""
        return lambda: Guarded(self, factory)


def raw_error(transport: asyncio.Transport, error: ProxyError) -> None:
    """Answer ``error`` as JSON and close, on a connection aiohttp has not answered on."""
    body = json.dumps(error.to_json()).encode()
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "Content-Length": str(len(body)),
        "Connection": "close",
        # Every answer carries the same bare product token (see proxy.web.errors).
        "Server": SERVER_HEADER,
        **error.headers,
    }
    head = f"HTTP/1.1 {error.status} {http.HTTPStatus(error.status).phrase}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    transport.write(head.encode() + body)
    transport.close()


def _limit_unsent(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    option = getattr(socket, "TCP_NOTSENT_LOWAT", None)  # Linux, macOS
    if sock is None or option is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, NOTSENT_LOWAT_BYTES)
    except OSError:
        pass  # not TCP (a test's socket pair): nothing to limit


class BodyTap:
    """The rest of one request body (``nbytes``), read by the kernel straight into the
    reader's buffers while aiohttp's parser is bypassed.

    The reader starts a read into a view (:meth:`start`) and waits for :attr:`woken`: it is set
    once the view is full, the body is complete, or the connection broke or ended early;
    :meth:`stop` ends the read and says how many bytes landed.  Reading is paused between
    reads, so the socket's own buffers hold what the client sends meanwhile (TCP flow
    control, as when aiohttp pauses).  The bypassed parser still expects those bytes, so
    the connection must close after the answer (the caller sees to it)."""

    def __init__(self, transport: asyncio.Transport, nbytes: int) -> None:
        self._transport = transport
        self.remaining = nbytes
        self.failure: BaseException | None = None
        self._view: memoryview | None = None
        self._got = 0
        self._stash = bytearray()  # bytes read while no view was set (see _buffer)
        self.woken: asyncio.Future[None] | None = None

    @property
    def got(self) -> int:
        """Bytes in the current read so far."""
        return self._got

    def start(self, view: memoryview) -> None:
        """Read into ``view`` (at most what is left of the body)."""
        assert self._view is None, "one read at a time"
        self.woken = asyncio.get_running_loop().create_future()
        if self._stash:
            n = min(len(self._stash), len(view))
            view[:n] = self._stash[:n]
            del self._stash[:n]
            self._got = n
            self.woken.set_result(None)
            return
        self._got = 0
        if self.failure is not None or not self.remaining:
            self.woken.set_result(None)
            return
        self._view = view[: self.remaining]
        self._transport.resume_reading()

    def stop(self) -> int:
        """End the read; the bytes it got."""
        if self._view is not None:
            self._view = None
            self._transport.pause_reading()
        self.woken = None
        got, self._got = self._got, 0
        return got

    # -- from the protocol --------------------------------------------------------------

    def _buffer(self) -> memoryview | None:
        view = self._view
        return None if view is None else view[self._got :]

    def _filled(self, nbytes: int) -> None:
        self._got += nbytes
        self.remaining -= nbytes
        assert self._view is not None
        if self._got == len(self._view):
            self._view = None
            self._transport.pause_reading()
            self._wake()

    def _stashed(self, data: memoryview) -> None:
        # Reading is paused whenever no view is set, so this is what a transport read
        # after the pause, if any: kept for the next read, never more than the body.
        take = min(len(data), self.remaining)
        self._stash += data[:take]
        self.remaining -= take
        self._transport.pause_reading()

    def _ended(self, failure: BaseException) -> None:
        if self.failure is None:
            self.failure = failure
        self._view = None
        self._wake()

    def _wake(self) -> None:
        if self.woken is not None and not self.woken.done():
            self.woken.set_result(None)


class Guarded(asyncio.BufferedProtocol):
    """Forwards every call to aiohttp's protocol; watches the first request's headers;
    hands a body to a :class:`BodyTap` on request."""

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.BaseProtocol]) -> None:
        self._guard = guard
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        # uvloop's transports are not asyncio.Transport subclasses, only alike: cast.
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None
        self._peer = "unknown"
        self._sent_something = False
        self._tail = b""
        self._tap: BodyTap | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        guard = self._guard
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        refusal = guard.admit(self._peer)
        if refusal is not None:
            guard.refused_total += 1
            log.debug("refused a connection: %s (%d open)", refusal, guard.open)
            raw_error(
                self._transport,
                TooManyConnections(refusal, headers={"Retry-After": str(_RETRY_AFTER_S)}),
            )
            return
        _limit_unsent(transport)
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(guard.header_timeout_s, self._headers_late)
        inner = self._factory()
        assert isinstance(inner, asyncio.Protocol)
        self._inner = inner
        inner.connection_made(transport)

    @property
    def tapped(self) -> bool:
        return self._tap is not None

    def tap(self, nbytes: int) -> BodyTap:
        """Read the next ``nbytes`` (the rest of the current request's body, of which
        aiohttp holds no byte) with a :class:`BodyTap` instead of aiohttp.  For good:
        the connection is closed after the answer."""
        assert self._transport is not None and self._tap is None
        self._tap = BodyTap(self._transport, nbytes)
        self._transport.pause_reading()
        return self._tap

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._tap is not None:
            view = self._tap._buffer()
            if view is not None:
                return view
        return self._guard.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        tap = self._tap
        if tap is None:
            self.data_received(bytes(self._guard.read_buffer[:nbytes]))
        elif tap._buffer() is not None:
            tap._filled(nbytes)
        else:
            tap._stashed(self._guard.read_buffer[:nbytes])

    def data_received(self, data: bytes) -> None:
        if self._deadline is not None:
            self._watch(data)
        if self._inner is not None:
            self._inner.data_received(data)

    def _watch(self, data: bytes) -> None:
        if not self._sent_something:
            # Empty lines before the request line are allowed (RFC 9112 2.2): not an end.
            data = data.lstrip(b"\r\n")
            if not data:
                return
            self._sent_something = True
        # The end may straddle two reads: look at the seam, then at the new bytes alone
        # (no copy of a large first read that carries body bytes too).
        if _HEADERS_END.search(self._tail + data[:2]) or _HEADERS_END.search(data):
            self._deadline.cancel()  # type: ignore[union-attr]
            self._deadline = None
            self._tail = b""
        else:
            self._tail = data[-2:]

    def _headers_late(self) -> None:
        self._deadline = None
        self._guard.header_timeouts_total += 1
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        log.debug("closed a connection: no complete request headers in time")
        if self._sent_something:
            raw_error(
                transport,
                HeaderTimeout(
                    f"the request headers were not complete within "
                    f"{self._guard.header_timeout_s:g}s"
                ),
            )
        else:
            transport.close()

    def eof_received(self) -> bool | None:
        if self._tap is not None:
            self._tap._ended(EOFError("the client ended the connection"))
        return None if self._inner is None else self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tap is not None:
            self._tap._ended(exc or ConnectionResetError("the connection was lost"))
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._stop_send_deadline()
        if self._inner is not None:
            self._guard.leave(self._peer)
            self._inner.connection_lost(exc)
            self._inner = None

    def pause_writing(self) -> None:
        if self._send_deadline is None:
            loop = asyncio.get_running_loop()
            self._send_deadline = loop.call_later(self._guard.send_timeout_s, self._send_late)
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._stop_send_deadline()
        if self._inner is not None:
            self._inner.resume_writing()

    def _stop_send_deadline(self) -> None:
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None

    def _send_late(self) -> None:
        self._send_deadline = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        log.debug("aborted a connection: its peer read nothing for %gs", self._guard.send_timeout_s)
        # Nothing more can be written to it: abort drops what is buffered and closes now.
        transport.abort()


class GuardedSite(web.BaseSite):
    """A TCP site (like ``web.TCPSite``) whose connections pass a :class:`ConnectionGuard`
    and are served by :class:`~proxy.web.errors.JsonErrorRequestHandler` (aiohttp's own
    protocol, with parser errors as JSON), made with ``handler_kwargs``."""

    __slots__ = ("_guard", "_handler_kwargs", "_host", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        guard: ConnectionGuard,
        handler_kwargs: dict[str, Any],
    ) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._guard = guard
        self._handler_kwargs = handler_kwargs

    @property
    def guard(self) -> ConnectionGuard:
        return self._guard

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self._port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        kwargs = self._handler_kwargs

        def protocol() -> web.RequestHandler:
            # What aiohttp's web.Server makes per connection, with our handle_error.
            return JsonErrorRequestHandler(server, loop=loop, **kwargs)

        # BaseSite's own attribute, as TCPSite sets it: BaseSite.stop and
        # BaseRunner.addresses read it.
        self._server = await loop.create_server(
            self._guard.wrap(protocol),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )
