"""A part's bytes as an aiohttp payload: streamed to botocore without a copy, with a stall timeout.

botocore hands a request body to aiohttp (under aiobotocore) as it is; registering
:class:`PartPayload` for :class:`PartBody` decides how aiohttp writes it.  This is the
backend's one use of aiohttp internals (``aiohttp.payload``, the writer it is handed):
the lock, not setup.cfg's ranges, decides which aiohttp runs (README, "Locked
installs").
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp.payload

from proxy.storage.base import Body, Pieces

# A body is handed to the socket in slices of this size, each of which the store must
# take within the read timeout (see PartPayload).
WRITE_SLICE_BYTES = 256 * 1024


class PartBody:
    """A part's bytes on their way to aiohttp, sent without being copied.

    aiohttp coalesces the buffered request headers with the first body write; on
    Python < 3.12.9 it does that with ``b"".join``, which copies the whole part
    (8 MiB per part: one extra part of RSS per part in flight, and the CPU of the
    copy and its page faults).  :class:`PartPayload` writes one byte first, so the
    join is tiny, then hands the rest to the transport as memoryviews, one per piece
    of the part (:class:`~proxy.storage.base.Pieces`).
    """

    __slots__ = ("_nbytes", "stall_timeout_s", "views")

    def __init__(self, body: Body, stall_timeout_s: float | None = None) -> None:
        pieces = body.views if isinstance(body, Pieces) else (body,)
        self.views = tuple(memoryview(p).cast("B") for p in pieces)
        self._nbytes = sum(len(v) for v in self.views)
        self.stall_timeout_s = stall_timeout_s

    def __len__(self) -> int:
        return self._nbytes

    def __bytes__(self) -> bytes:
        return b"".join(self.views)


class PartPayload(aiohttp.payload.Payload):
    """Writes a :class:`PartBody`, giving up when the store stops taking its bytes.

    aiohttp starts the read timeout only once the whole body is handed to the socket, so
    a store that stops reading (its TCP window closed: a stuck server, a broken path)
    would hold the request until TCP gives up, or for ever.  Here each slice of the body
    must be taken within ``stall_timeout_s`` (the read timeout), or the attempt fails
    like a read timeout (a TimeoutError, which aiohttp does not re-send)."""

    _value: PartBody

    def __init__(self, value: PartBody, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("content_type", "application/octet-stream")
        super().__init__(value, *args, **kwargs)
        self._size = len(value)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes(self._value).decode(encoding, errors)

    async def as_bytes(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return bytes(self._value)

    async def write(self, writer: Any) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        left = len(self._value) if content_length is None else content_length
        stall_s = self._value.stall_timeout_s
        for i, view in enumerate(v for v in self._value.views if v):
            if left <= 0:
                return
            view = view[:left]
            left -= len(view)
            if i == 0 and len(view) > 1:
                await writer.write(view[:1])
                view = view[1:]
            for start in range(0, len(view), WRITE_SLICE_BYTES):
                async with asyncio.timeout(stall_s):
                    await writer.write(view[start : start + WRITE_SLICE_BYTES])


aiohttp.payload.PAYLOAD_REGISTRY.register(PartPayload, PartBody)
