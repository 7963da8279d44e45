"""HTTP/1.1 written by hand over asyncio streams, for tests that must control every byte
on the wire (framing tricks, half-sent bodies, never-read answers, source addresses)
and see every byte of the answer (headers a client library would hide or merge).

Only the standard library: these tests drive the daemon from the outside, so they
survive any reshuffle of its modules.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The daemon's own bounds are a few seconds; an answer that has not come by this is a failure.
ANSWER_TIMEOUT_S = 30.0


@dataclass
class Answer:
    status: int
    head: bytes  # status line and header lines, as received
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str | None:
        """The ``code`` of a JSON error body, else None."""
        try:
            value = self.json()
        except ValueError:
            return None
        return value.get("code") if isinstance(value, dict) else None

    def comparable(self) -> tuple[int, tuple[tuple[str, str], ...], bytes]:
        """Everything but the Date header: two answers equal here are indistinguishable."""
        kept = tuple(sorted((k, v) for k, v in self.headers.items() if k != "date"))
        return self.status, kept, self.body


def build(
    method: str,
    path: str,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    *,
    length: bool = True,
) -> bytes:
    """A request as bytes.  ``Content-Length`` is added for ``body`` unless ``length`` is
    False or the headers frame the body themselves (Content-Length, Transfer-Encoding)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: upload-proxy.test"]
    given = {k.lower() for k in (headers or {})}
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if length and not given & {"content-length", "transfer-encoding"}:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


async def connect(
    port: int, source: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to 127.0.0.1:port, from ``source`` (any 127.x.y.z: all of 127/8 is
    local on Linux, so each source address is another client to the daemon)."""
    local = (source, 0) if source else None
    return await asyncio.open_connection("127.0.0.1", port, local_addr=local)


async def read_answer(
    reader: asyncio.StreamReader, *, method: str = "GET", timeout_s: float = ANSWER_TIMEOUT_S
) -> Answer:
    """One answer (a ``100 Continue`` is an answer too: read again for the final one)."""
    async with asyncio.timeout(timeout_s):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if method == "HEAD" or status in (204, 304) or status < 200:
            body = b""
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        else:
            body = await reader.read()
    return Answer(status, head, headers, body)


async def exchange(
    port: int,
    method: str,
    path: str,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    *,
    source: str | None = None,
    timeout_s: float = ANSWER_TIMEOUT_S,
) -> Answer:
    """One request on its own connection (``Connection: close``), its final answer."""
    reader, writer = await connect(port, source)
    try:
        writer.write(build(method, path, {**(headers or {}), "Connection": "close"}, body))
        await writer.drain()
        answer = await read_answer(reader, method=method, timeout_s=timeout_s)
        while answer.status == 100:
            answer = await read_answer(reader, method=method, timeout_s=timeout_s)
        return answer
    finally:
        writer.close()


async def answers_to(port: int, request: bytes, *, method: str = "GET") -> list[Answer]:
    """Send ``request`` (bytes, see :func:`build`) on its own connection; every answer to
    it, interim ones (1xx: ``104 Upload Resumption Supported``) included, up to the final."""
    reader, writer = await connect(port)
    try:
        writer.write(request)
        await writer.drain()
        got = [await read_answer(reader, method=method)]
        while got[-1].status < 200:
            got.append(await read_answer(reader, method=method))
        return got
    finally:
        writer.close()


async def send_raw(port: int, data: bytes, *, timeout_s: float = 10.0) -> bytes:
    """Write ``data`` as is and return everything the server sends until it closes."""
    reader, writer = await connect(port)
    try:
        writer.write(data)
        await writer.drain()
        return (await read_until_closed(reader, timeout_s))[1]
    finally:
        writer.close()


async def read_until_closed(reader: asyncio.StreamReader, timeout_s: float) -> tuple[float, bytes]:
    """Read until the server closes; how long that took and what it sent.  Raises
    TimeoutError if it is still open after ``timeout_s``."""
    started = time.monotonic()
    async with asyncio.timeout(timeout_s):
        data = await reader.read()  # to EOF
    return time.monotonic() - started, data


def answers_in(stream: bytes) -> list[int]:
    """The status codes of the answers in a byte stream (pipelined answers, each framed
    by its Content-Length; a stream that does not parse ends the list)."""
    statuses = []
    while stream.startswith(b"HTTP/1."):
        head, sep, rest = stream.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.split(b"\r\n")
        statuses.append(int(lines[0].split()[1]))
        length = next(
            (
                int(v)
                for n, _, v in (ln.partition(b":") for ln in lines[1:])
                if n.strip().lower() == b"content-length"
            ),
            0,
        )
        stream = rest[length:]
    return statuses
