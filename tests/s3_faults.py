"""A real fault proxy in front of SeaweedFS's S3 API: S3 requests as the wire carries them.

Faults a wrapper Storage cannot make (they sit *below* S3Storage: its retries and its
classification of errors are what the tests prove) are made here, on the wire, instead
of by swapping S3Storage's private client.  Every request is forwarded unchanged (same
Host, so the SigV4 signature still holds) unless a fault is queued for its operation:

* :class:`Answer`: the store answers with an S3 error (status + code) and does nothing;
* ``Drop``: the connection is closed before any answer (a network failure);
* ``LoseAnswer``: the store does the work, then its answer never comes (the client
  times out, as it would on a hung store: give the S3Storage a short ``read_timeout_s``).

Why LoseAnswer holds the answer rather than dropping the connection: aiohttp silently
resends an idempotent request (PUT) whose reused keep-alive connection was closed, so a
drop after the work would show S3Storage a first attempt that already fails with 412.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import EmbeddedSeaweed

# Per hop (RFC 9110 7.6.1) or recomputed by aiohttp; Expect is answered by our server.
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect"}


@dataclass(frozen=True)
class Answer:
    status: int
    code: str


class Lost(enum.Enum):
    DROP = "the connection closes before the store sees the request"
    ANSWER = "the store does the work; its answer never comes"


Drop, LoseAnswer = Lost.DROP, Lost.ANSWER
Fault = Answer | Lost


def operation(request: web.Request) -> str:
    """The S3 operation name (as botocore calls it) of the requests the tests fault."""
    q, method = request.query, request.method
    if method == "PUT" and "partNumber" in q:
        return "UploadPartCopy" if "x-amz-copy-source" in request.headers else "UploadPart"
    if method == "POST" and "uploadId" in q:
        return "CompleteMultipartUpload"
    if method == "POST" and "uploads" in q:
        return "CreateMultipartUpload"
    if method == "PUT":
        return "CopyObject" if "x-amz-copy-source" in request.headers else "PutObject"
    return method


class S3FaultProxy:
    def __init__(self, upstream: str) -> None:
        self._upstream = upstream.rstrip("/")
        self._faults: dict[tuple[str, int | None], list[Fault]] = defaultdict(list)
        # (operation, part number or None) of every request that reached us, in order.
        self.calls: list[tuple[str, int | None]] = []
        self.url = ""
        self._closing = asyncio.Event()

    def inject(self, op: str, *faults: Fault, part: int | None = None) -> None:
        """The next requests of ``op`` (for ``part`` only, if given) meet ``faults`` in turn."""
        self._faults[(op, part)].extend(faults)

    def count(self, op: str, part: int | None = None) -> int:
        return sum(1 for o, p in self.calls if o == op and (part is None or p == part))

    def _next_fault(self, op: str, part: int | None) -> Fault | None:
        for k in ((op, part), (op, None)):
            if self._faults.get(k):
                return self._faults[k].pop(0)
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        op = operation(request)
        part = int(request.query["partNumber"]) if "partNumber" in request.query else None
        self.calls.append((op, part))
        body = await request.read()  # the client has sent it all before any fault
        fault = self._next_fault(op, part)
        if isinstance(fault, Answer):
            xml = (
                f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{fault.code}</Code>"
                "<Message>injected</Message></Error>"
            )
            return web.Response(status=fault.status, text=xml, content_type="application/xml")
        if fault is Drop:
            return self._drop(request)
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS
        )
        async with self._session.request(
            request.method, self._upstream + request.path_qs, headers=headers, data=body
        ) as r:
            answer = await r.read()
            if fault is LoseAnswer:
                await self._closing.wait()  # until the proxy stops; the client gives up first
                return self._drop(request)
            out = CIMultiDict((k, v) for k, v in r.headers.items() if k.lower() not in _HOP_HEADERS)
            if request.method == "HEAD":  # the object's length, not the (empty) body's
                out["Content-Length"] = r.headers.get("Content-Length", "0")
                return web.Response(status=r.status, headers=out)
            return web.Response(status=r.status, body=answer, headers=out)

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()  # a reset, not an answer
        return web.Response()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[S3FaultProxy]:
        # auto_decompress off: bodies go back byte for byte with their own headers.
        async with aiohttp.ClientSession(auto_decompress=False) as self._session:
            runner = web.AppRunner(web.Application(client_max_size=1 << 30))
            runner.app.router.add_route("*", "/{tail:.*}", self._handle)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            self.url = f"http://{host}:{port}"
            try:
                yield self
            finally:
                self._closing.set()
                await runner.cleanup()


@contextlib.asynccontextmanager
async def faulty_s3(
    seaweed: EmbeddedSeaweed, **kw: Any
) -> AsyncIterator[tuple[S3Storage, S3FaultProxy]]:
    """An S3Storage that reaches ``seaweed`` through a fault proxy (``kw``: its settings)."""
    async with S3FaultProxy(seaweed.endpoint_url).running() as faults:
        storage = S3Storage(
            bucket=seaweed.bucket,
            endpoint_url=faults.url,
            access_key=seaweed.credentials.access_key,
            secret_key=seaweed.credentials.secret_key,
            **kw,
        )
        async with storage:
            yield storage, faults
