"""GetObject in the shapes the daemon reads: small objects whole, streams, byte ranges, and
the comparison of a stored object with a body we sent.

Each function takes the :class:`~proxy.storage.s3.calls.S3Calls` of an open
:class:`~proxy.storage.s3.S3Storage`; the storage's methods of the same names call them.
A body is read one chunk per ask (the socket is read no further ahead than aiohttp's
small read buffer: a slow consumer slows the store).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from botocore.exceptions import ClientError

from proxy.errors import (
    ConditionFailed,
    NotFound,
    ObjectExists,
    ProxyError,
    StorageError,
    StorageUnavailable,
)
from proxy.storage.base import Body
from proxy.storage.s3.body import PartBody
from proxy.storage.s3.calls import MISSING_CODES, S3Calls, classify, error_code

# Read size when comparing a stored object with what we sent (put_conditional).
_COMPARE_BYTES = 1024 * 1024


async def _get_or_none(s3: S3Calls, key: str) -> dict[str, Any] | None:
    """GetObject's answer (its body not read yet), or None if there is no such object."""
    try:
        r: dict[str, Any] = await s3.client.get_object(Bucket=s3.bucket, Key=key)
    except ClientError as e:
        if error_code(e) in MISSING_CODES:
            return None
        raise
    return r


async def get_small(s3: S3Calls, key: str, max_bytes: int) -> tuple[bytes, str] | None:
    async def go() -> tuple[bytes, str] | None:
        r = await _get_or_none(s3, key)
        if r is None:
            return None
        async with r["Body"] as body:
            if int(r.get("ContentLength", 0)) > max_bytes:
                raise StorageError(f"{key} is larger than {max_bytes} bytes")
            data: bytes = await body.read()
        return data, str(r.get("ETag", ""))

    return await s3.call("get_object", go)


async def holds_body(s3: S3Calls, key: str, body: Body) -> dict[str, Any] | None:
    """``{"ETag": ...}`` if the object at ``key`` holds exactly ``body`` (compared as
    it is read, in bounded chunks), else None."""
    views = PartBody(body).views

    async def go() -> dict[str, Any] | None:
        r = await _get_or_none(s3, key)
        if r is None:
            return None
        async with r["Body"] as stream:
            if int(r.get("ContentLength", -1)) != len(body):
                return None
            for view in views:
                pos = 0
                while pos < len(view):
                    chunk: bytes = await stream.read(min(len(view) - pos, _COMPARE_BYTES))
                    if not chunk or view[pos : pos + len(chunk)] != chunk:
                        return None
                    pos += len(chunk)
        return {"ETag": r.get("ETag", "")}

    return await s3.call("get_object", go)


async def iter_object(s3: S3Calls, key: str, *, chunk_bytes: int) -> AsyncIterator[bytes]:
    # Only opening the object is retried: a body that breaks off half-way cannot be
    # rewound without the caller knowing, so it surfaces as StorageUnavailable.
    r = await s3.call("get_object", lambda: s3.client.get_object(Bucket=s3.bucket, Key=key))
    async for chunk in _chunks(key, r, chunk_bytes):
        yield chunk


async def read_range(
    s3: S3Calls, key: str, *, first_byte: int, last_byte: int, etag: str, chunk_bytes: int
) -> AsyncGenerator[bytes, None]:
    async def go() -> dict[str, Any] | None:
        try:
            r: dict[str, Any] = await s3.client.get_object(
                Bucket=s3.bucket,
                Key=key,
                Range=f"bytes={first_byte}-{last_byte}",
                IfMatch=etag,
            )
            return r
        except ClientError as e:
            if error_code(e) in MISSING_CODES:
                return None
            raise

    try:
        r = await s3.call("get_object", go)
    except ObjectExists as e:
        raise ConditionFailed(f"{key} changed while it was being read") from e
    if r is None:
        raise NotFound("no such object")
    wanted = last_byte - first_byte + 1
    if int(r.get("ContentLength", -1)) != wanted:
        # A store that ignored the Range would have us send bytes we did not promise.
        r["Body"].close()
        raise StorageError(f"storage answered a {wanted}-byte range with another length")
    async for chunk in _chunks(key, r, chunk_bytes):
        yield chunk


async def _chunks(key: str, r: dict[str, Any], chunk_bytes: int) -> AsyncIterator[bytes]:
    """A GetObject answer's body, one chunk per ask (the module docstring says why)."""
    async with r["Body"] as body:
        while True:
            try:
                chunk: bytes = await body.read(chunk_bytes)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                outcome = classify(exc)
                if isinstance(outcome, ProxyError):
                    raise outcome from exc
                raise StorageUnavailable(f"reading {key} broke off ({outcome.code})") from exc
            if not chunk:
                return
            yield chunk
