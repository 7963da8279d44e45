"""A fault-injecting HTTP proxy for the path between the daemon and S3 (tests only).

It sits where the daemon's ``[storage] endpoint_url`` points and forwards to the real
store, one request per connection: it reads one whole HTTP/1.1 request, names the S3
operation it is (:func:`classify`), applies the first rule the test installed for that
operation (and key, and occurrence), forwards the request on a fresh connection to the
store, reads the store's whole answer and hands it back with ``Connection: close``, so
the client opens a new connection for its next request and every request is seen, and
faulted, on its own.  Every request is recorded (:class:`Record`): operation, key, the
store's status (None when the store never saw it) and the fault applied, so a test can
assert what happened on the wire, including the requests the daemon's HTTP library
sent again on its own.

Faults (:class:`Fault`), each at a point that means something to the client:

* ``error(status, code)``: the store is not asked; the client gets S3's error answer
  (``status``, ``<Code>code</Code>``), as from a store that refused (500 InternalError,
  503 SlowDown, 403 AccessDenied ...);
* ``lost_answer``: the store carried the request out; its answer is read in full, then
  the client's connection is reset (SO_LINGER 0) without a byte of it;
* ``reset_before``: the client's connection is reset before the store saw anything;
* ``delay(s)``: the request reaches the store ``s`` late (after the client may have given
  up: it is forwarded anyway, as a packet in flight would be); ``delay(s, answer=True)``:
  the store acts at once, its answer reaches the client ``s`` late;
* ``blackhole(s)``: the request is read and nothing is said for ``s`` seconds, then the
  connection is reset; the store never sees it;
* ``trickle(rate)``: the answer reaches the client at ``rate`` bytes per second;
  ``trickle(rate, request=True)``: the request's body is read from the client at that
  rate (a slow link to the store; the store sees the request once it is all in);
* ``stall(s)``: the request's body is not read for ``s`` seconds (the store's window
  stays closed once the socket buffers are full), then the connection is reset;
* ``hold()`` / ``hold(answer=True)``: the request (or the store's answer to it) waits
  until the test calls :meth:`Rule.release` (e.g. after killing the daemon); then it is
  forwarded (or answered), or dropped with a reset.  Requests still held when the proxy
  closes are reset, so ``hold(answer=True)`` with no release is an answer that never
  comes: the client's read timeout decides.

A rule may wait for another to have applied (``after``), and the operation ``"*"`` is
every operation: ``fp.add("*", blackhole(s), times=None, after=first)`` is the store gone
from the request ``first`` caught on.

Bodies are held in memory: tests send a few MiB at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, unquote, urlsplit

HEAD_LIMIT_BYTES = 1024 * 1024
TRICKLE_STEP_S = 0.05

# Operations the daemon's S3 client sends, as the proxy names them.  Requests for keys
# under the tus state prefix get their own names (the same S3 calls on small objects).
OPS = (
    "HeadBucket",
    "CreateBucket",
    "HeadObject",
    "GetObject",
    "PutObject",
    "DeleteObject",
    "CopyObject",
    "CreateMultipartUpload",
    "UploadPart",
    "UploadPartCopy",
    "CompleteMultipartUpload",
    "AbortMultipartUpload",
    "ListParts",
    "ListMultipartUploads",
    "ListObjectsV2",
    "StateRead",
    "StateWrite",
    "StateDelete",
    "StateList",
)


@dataclass(frozen=True)
class Fault:
    kind: str
    seconds: float = 0.0
    rate_bytes_per_s: float = 0.0
    answer: bool = False  # delay / hold / trickle: the answer, not the request
    status: int = 0  # error: the status and S3 error code the client gets
    code: str = ""

    def __str__(self) -> str:
        if self.kind == "error":
            return f"error({self.status}-{self.code})"
        where = "-answer" if self.answer else ""
        if self.kind == "trickle":
            where = "" if self.answer else "-request"
            return f"trickle{where}({_rate(self.rate_bytes_per_s)})"
        if self.seconds:
            return f"{self.kind}{where}({self.seconds:g}s)"
        return f"{self.kind}{where}"


def _rate(bytes_per_s: float) -> str:
    for unit, size in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if bytes_per_s >= size:
            return f"{bytes_per_s / size:g}{unit}/s"
    return f"{bytes_per_s:g}B/s"


def error(status: int, code: str) -> Fault:
    return Fault("error", status=status, code=code)


def lost_answer() -> Fault:
    return Fault("lost_answer")


def reset_before() -> Fault:
    return Fault("reset_before")


def delay(seconds: float, *, answer: bool = False) -> Fault:
    return Fault("delay", seconds=seconds, answer=answer)


def blackhole(seconds: float) -> Fault:
    return Fault("blackhole", seconds=seconds)


def trickle(rate_bytes_per_s: float, *, request: bool = False) -> Fault:
    return Fault("trickle", rate_bytes_per_s=rate_bytes_per_s, answer=not request)


def stall(seconds: float) -> Fault:
    return Fault("stall", seconds=seconds)


def hold(*, answer: bool = False) -> Fault:
    return Fault("hold", answer=answer)


@dataclass
class Rule:
    """Apply ``fault`` to requests of ``op`` (``"*"``: any) whose key, query string and
    body match the regexes ``key``, ``query`` and ``body`` (searched; None: any), from the
    ``nth`` such request on, ``times`` times (None: every one after), once the rule
    ``after`` (if any) has applied."""

    op: str
    fault: Fault
    key: str | None = None
    nth: int = 1
    times: int | None = 1
    query: str | None = None  # a regex the query string must contain
    body: bytes | None = None  # a regex the request body must contain
    after: Rule | None = None
    matched: int = 0
    applied: int = 0
    held: asyncio.Event = field(default_factory=asyncio.Event)
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _forward: bool = False

    @property
    def slow_request(self) -> bool:
        """Applies while the request is read, before its body is known."""
        return self.fault.kind == "stall" or (
            self.fault.kind == "trickle" and not self.fault.answer
        )

    def matches(self, op: str, key: str, query: str, body: bytes | None) -> bool:
        return (
            self.op in (op, "*")
            and (self.after is None or self.after.applied > 0)
            and (self.key is None or re.search(self.key, key) is not None)
            and (self.query is None or re.search(self.query, query) is not None)
            and (self.body is None or (body is not None and re.search(self.body, body) is not None))
        )

    def take(self) -> bool:
        """Count a matching request; True if the fault applies to it."""
        self.matched += 1
        if self.matched < self.nth:
            return False
        if self.times is not None and self.applied >= self.times:
            return False
        self.applied += 1
        return True

    def release(self, *, forward: bool) -> None:
        """Let held requests go: on to the store / to the client (``forward``), or reset."""
        self._forward = forward
        self._released.set()


@dataclass
class Record:
    op: str
    method: str
    key: str
    query: str
    headers: dict[str, str]  # the request's, names in lower case
    fault: str | None = None
    status: int | None = None  # the store's answer; None: the store never answered it
    delivered: bool = False  # the answer reached the client
    # The store has answered it, or it will never reach the store.
    settled: bool = False
    started_s: float = field(default_factory=time.monotonic)
    ended_s: float | None = None


@dataclass
class _Request:
    method: str
    target: str
    head: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.head:
            if k.lower() == name:
                return v
        return None


@dataclass
class _Answer:
    status: int
    head: bytes  # status line and headers, rewritten for Connection: close
    body: bytes


def classify(
    method: str, target: str, headers: dict[str, str], *, state_prefix: str = ""
) -> tuple[str, str]:
    """(operation, key) of a path-style S3 request."""
    url = urlsplit(target)
    query = parse_qs(url.query, keep_blank_values=True)
    _, _, key = url.path.lstrip("/").partition("/")
    key = unquote(key)
    copy = "x-amz-copy-source" in headers
    state = bool(state_prefix) and key.startswith(state_prefix)
    if not key:
        if method == "GET" and "uploads" in query:
            return "ListMultipartUploads", ""
        if method == "GET":
            prefix = query.get("prefix", [""])[0]
            listed = bool(state_prefix) and prefix.startswith(state_prefix)
            return ("StateList" if listed else "ListObjectsV2"), prefix
        return ("CreateBucket" if method == "PUT" else "HeadBucket"), ""
    if "uploadId" in query:
        by_method = {
            "PUT": "UploadPartCopy" if copy else "UploadPart",
            "POST": "CompleteMultipartUpload",
            "DELETE": "AbortMultipartUpload",
            "GET": "ListParts",
        }
        return by_method.get(method, f"{method}?uploadId"), key
    if method == "POST" and "uploads" in query:
        return "CreateMultipartUpload", key
    if method == "PUT":
        return ("CopyObject" if copy else "StateWrite" if state else "PutObject"), key
    if method == "GET":
        return ("StateRead" if state else "GetObject"), key
    if method == "DELETE":
        return ("StateDelete" if state else "DeleteObject"), key
    if method == "HEAD":
        return "HeadObject", key
    return method, key


class FaultProxy:
    """``async with FaultProxy(upstream_url, state_prefix=...) as fp``; point the client at
    ``fp.url``; ``fp.add(op, fault)`` before the requests it is meant for."""

    def __init__(self, upstream_url: str, *, state_prefix: str = "") -> None:
        up = urlsplit(upstream_url)
        assert up.hostname is not None and up.port is not None, upstream_url
        self._up_host, self._up_port = up.hostname, up.port
        self.state_prefix = state_prefix
        self.rules: list[Rule] = []
        self.records: list[Record] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", 0, limit=HEAD_LIMIT_BYTES
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        for rule in self.rules:
            rule.release(forward=False)
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- what the tests use -----------------------------------------------------------

    def add(
        self,
        op: str,
        fault: Fault,
        *,
        key: str | None = None,
        nth: int = 1,
        times: int | None = 1,
        query: str | None = None,
        body: bytes | None = None,
        after: Rule | None = None,
    ) -> Rule:
        assert op in OPS or op == "*", op
        rule = Rule(op, fault, key=key, nth=nth, times=times, query=query, body=body, after=after)
        assert not (rule.slow_request and body is not None), "a slow read cannot match a body"
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        for rule in self.rules:
            rule.release(forward=False)
        self.rules.clear()

    def seen(
        self, op: str | None = None, key: str | None = None, query: str | None = None
    ) -> list[Record]:
        """The recorded requests of ``op`` (any if None) whose key and query string match
        ``key`` and ``query`` (regexes; None: any)."""
        return [
            r
            for r in self.records
            if (op is None or r.op == op)
            and (key is None or re.search(key, r.key))
            and (query is None or re.search(query, r.query))
        ]

    async def quiet(self, timeout_s: float = 30) -> None:
        """Until every request seen so far has reached the store and been answered, or
        will never reach it (a delayed one may arrive after the client gave up on it)."""
        await self.wait_for(lambda: all(r.settled for r in self.records), timeout_s)

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 30) -> None:
        """Until ``predicate()`` holds; re-checked after every request's start and end."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(predicate)

    # -- serving ----------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record: Record | None = None
        try:
            got = await _read_head(reader, writer)
            if got is None:
                return
            method, target, head = got
            headers = {k.lower(): v for k, v in head}
            op, key = classify(method, target, headers, state_prefix=self.state_prefix)
            query = urlsplit(target).query
            rule = next(
                (
                    r
                    for r in self.rules
                    if r.slow_request and r.matches(op, key, query, None) and r.take()
                ),
                None,
            )
            if rule is not None and rule.fault.kind == "stall":
                record = Record(op, method, key, query, headers, str(rule.fault), settled=True)
                self.records.append(record)
                await self._notify()
                await asyncio.sleep(rule.fault.seconds)
                return _reset(writer)
            rate = None if rule is None else rule.fault.rate_bytes_per_s
            req = _Request(method, target, head, await _read_body(reader, head, rate=rate))
            rule = rule or next(
                (
                    r
                    for r in self.rules
                    if not r.slow_request and r.matches(op, key, query, req.body) and r.take()
                ),
                None,
            )
            record = Record(op, req.method, key, query, headers)
            record.fault = None if rule is None else str(rule.fault)
            self.records.append(record)
            await self._notify()
            await self._handle(req, record, rule, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            if record is not None:
                record.settled = True
                record.ended_s = time.monotonic()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            with contextlib.suppress(RuntimeError):  # the loop is closing
                await self._notify()

    async def _handle(
        self, req: _Request, record: Record, rule: Rule | None, writer: asyncio.StreamWriter
    ) -> None:
        fault = None if rule is None else rule.fault
        kind = None if fault is None else fault.kind
        if kind == "reset_before":
            return _reset(writer)
        if kind == "error" and fault is not None:
            record.settled = True  # never forwarded
            await self._notify()
            writer.write(_error_answer(fault.status, fault.code))
            await writer.drain()
            record.delivered = True
            return None
        if kind == "blackhole":
            assert fault is not None
            record.settled = True  # never forwarded
            await self._notify()
            await asyncio.sleep(fault.seconds)
            return _reset(writer)
        if kind == "delay" and fault is not None and not fault.answer:
            await asyncio.sleep(fault.seconds)
        if kind == "hold" and rule is not None and not rule.fault.answer:
            rule.held.set()
            await self._notify()
            await rule._released.wait()
            if not rule._forward:
                return _reset(writer)
        answer = await self._forward(req)
        record.status = answer.status
        record.settled = True
        await self._notify()
        if kind == "lost_answer":
            return _reset(writer)
        if kind == "delay" and fault is not None and fault.answer:
            await asyncio.sleep(fault.seconds)
        if kind == "hold" and rule is not None and rule.fault.answer:
            rule.held.set()
            await self._notify()
            await rule._released.wait()
            if not rule._forward:
                return _reset(writer)
        if kind == "trickle" and fault is not None and fault.answer:
            await _trickle(writer, answer.head + answer.body, fault.rate_bytes_per_s)
        else:
            writer.write(answer.head + answer.body)
            await writer.drain()
        record.delivered = True

    async def _forward(self, req: _Request) -> _Answer:
        reader, writer = await asyncio.open_connection(
            self._up_host, self._up_port, limit=HEAD_LIMIT_BYTES
        )
        try:
            head = [(k, v) for k, v in req.head if k.lower() not in _HOP_HEADERS]
            head.append(("Connection", "close"))
            lines = [f"{req.method} {req.target} HTTP/1.1"] + [f"{k}: {v}" for k, v in head]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + req.body)
            await writer.drain()
            return await _read_answer(reader, head_only=req.method == "HEAD")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


# Hop-by-hop headers the proxy replaces (and Expect, which it answers itself; botocore
# never signs it).
_HOP_HEADERS = frozenset({"connection", "keep-alive", "expect", "proxy-connection"})


def part_number(n: int) -> str:
    """The ``query`` regex of requests for part ``n`` (UploadPart, UploadPartCopy)."""
    return rf"(^|&)partNumber={n}(&|$)"


def _error_answer(status: int, code: str) -> bytes:
    body = (
        "<?xml version='1.0' encoding='UTF-8'?>"
        f"<Error><Code>{code}</Code><Message>injected</Message></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset: the peer sees ECONNRESET, not an orderly end."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _trickle(writer: asyncio.StreamWriter, data: bytes, rate_bytes_per_s: float) -> None:
    step = max(1, int(rate_bytes_per_s * TRICKLE_STEP_S))
    for i in range(0, len(data), step):
        writer.write(data[i : i + step])
        await writer.drain()
        await asyncio.sleep(TRICKLE_STEP_S)


def _parse_head(raw: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = raw.decode("latin-1").split("\r\n")
    head = []
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            head.append((k.strip(), v.strip()))
    return lines[0], head


async def _read_body(
    reader: asyncio.StreamReader,
    head: list[tuple[str, str]],
    *,
    until_eof: bool = False,
    rate: float | None = None,
) -> bytes:
    """A message body as it came (chunked bodies stay chunked); at ``rate`` bytes per
    second if given (bodies with a Content-Length only)."""
    headers = {k.lower(): v for k, v in head}
    if rate is not None and "content-length" in headers:
        out, left = bytearray(), int(headers["content-length"])
        step = max(1, int(rate * TRICKLE_STEP_S))
        while left:
            out += await reader.readexactly(min(step, left))
            left -= min(step, left)
            await asyncio.sleep(TRICKLE_STEP_S)
        return bytes(out)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            out += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    line = await reader.readuntil(b"\r\n")
                    out += line
                    if line == b"\r\n":
                        return bytes(out)
            out += await reader.readexactly(size + 2)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read() if until_eof else b""


async def _read_head(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[str, str, list[tuple[str, str]]] | None:
    """A request's method, target and headers; its body is the client's to send next."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None  # the client connected and left
    start, head = _parse_head(raw[:-4])
    method, target, _ = start.split(" ", 2)
    expect = next((v for k, v in head if k.lower() == "expect"), "")
    if expect.lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    return method, target, head


async def _read_answer(reader: asyncio.StreamReader, *, head_only: bool) -> _Answer:
    while True:
        raw = await reader.readuntil(b"\r\n\r\n")
        start, head = _parse_head(raw[:-4])
        status = int(start.split(" ", 2)[1])
        if status >= 200:
            break  # 1xx: interim answers, not passed on
    no_body = head_only or status in (204, 304)
    body = b"" if no_body else await _read_body(reader, head, until_eof=True)
    kept = [(k, v) for k, v in head if k.lower() not in _HOP_HEADERS]
    lines = [start] + [f"{k}: {v}" for k, v in kept] + ["Connection: close"]
    return _Answer(status, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), body)
