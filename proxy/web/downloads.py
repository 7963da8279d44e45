"""Downloads: ``GET``/``HEAD /uploads/{key}`` and ``GET {tus.base_path}{id}`` (a completed
tus upload, as tusd serves it).  Off unless ``downloads.enabled``.

Who may read what, decided before any S3 request: credentials with the ``download`` scope
(a bearer token of ``auth.scoped_tokens``, or a signed ``GET`` link bound to one key; auth
off: anyone), on keys within the token's prefix or the link's key.  A key outside them is
the same ``404`` as a missing key, and so are the proxy's own prefixes (tus state, tus
objects): a tus upload is read only through its own URL, by the principal that created it.

The object streams from S3 in constant memory: one ranged GetObject for exactly the bytes
sent, read one chunk at a time, and the next chunk is asked of the store only once the
client has taken the last one (``StreamResponse.write`` waits for the socket to drain),
so a slow reader slows the S3 read instead of filling memory.  A client that takes
nothing for ``downloads.send_timeout_s`` is cut off, freeing its S3 connection.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote, unquote

from aiohttp import web

from proxy.auth import DOWNLOAD, Grant
from proxy.config import DownloadsConfig
from proxy.errors import (
    ConditionFailed,
    NotFound,
    ProxyError,
    SignedUrlNotForTus,
    StorageUnavailable,
    TooManyDownloads,
)
from proxy.keys import full_key
from proxy.obs.metrics import Metrics
from proxy.storage.base import ObjectInfo, ObjectReader, StateStore, Storage
from proxy.tus.finished import OWNER_METADATA
from proxy.tus.state import storage_id, valid_id
from proxy.web.preflight import Handler, authorize
from proxy.web.ranges import ByteRange, Validators, byte_range, http_date, precondition

log = logging.getLogger(__name__)

# One chunk per write to the client: what a download holds, besides aiohttp's own
# socket buffers (its S3 read buffer, the transport's write buffer; ~64 KiB each).
CHUNK_BYTES = 256 * 1024
# A tus object written before the owner was recorded (tus.finished.OWNER_METADATA)
# belongs to "anonymous", like tus state without an owner.
_ANONYMOUS = "anonymous"
_SHA256_HEX_RE = re.compile(r"[0-9a-f]{64}")
# RFC 8187 attr-char, minus nothing: what may stay unescaped in filename*.
_ATTR_CHARS = "!#$&+-.^_`|~"


@dataclass
class Downloads:
    """What the download handlers use (set as an AppKey once the store is open)."""

    config: DownloadsConfig
    storage: Storage
    reader: ObjectReader
    metrics: Metrics
    key_prefix: str
    # Full keys (with key_prefix) no GET may read: tus state and tus objects.
    reserved_prefixes: tuple[str, ...] = ()
    # Where completed tus uploads are (key_prefix + tus.object_prefix); None: tus is off.
    tus_object_prefix: str | None = None
    lister: StateStore | None = None
    active: int = 0


DOWNLOADS = web.AppKey("downloads", Downloads)


def _reserved(dl: Downloads, key: str) -> bool:
    return key.startswith(dl.reserved_prefixes) or any(
        key == p.rstrip("/") for p in dl.reserved_prefixes
    )


async def get_object(request: web.Request) -> web.StreamResponse:
    """``GET``/``HEAD /uploads/{key}``."""
    dl = request.app[DOWNLOADS]
    grant = authorize(request, DOWNLOAD)
    client_key = request.match_info["key"]
    key = full_key(dl.key_prefix, client_key)
    if not grant.covers(client_key) or _reserved(dl, key):
        # Not "forbidden": that would confirm the key exists to someone who may not know.
        raise NotFound("no such object")
    obj = await dl.storage.head(key)
    if obj is None:
        raise NotFound("no such object")
    return await _serve(request, dl, obj, "uploads")


async def get_tus_upload(request: web.Request) -> web.StreamResponse:
    """``GET {base_path}{id}``: the object of a completed tus upload, to its creator."""
    dl = request.app[DOWNLOADS]
    grant = _tus_grant(request)
    url_id = request.match_info["id"]
    if dl.tus_object_prefix is None or dl.lister is None or not valid_id(url_id):
        raise NotFound("no such upload")
    folder = dl.tus_object_prefix + storage_id(url_id)
    # The key is "<folder>/<filename>" (or "<folder>" without a filename): list to find it.
    # An unfinished upload has no object yet: the same 404 as an unknown id.
    listed = [
        o
        for o in await dl.lister.list_objects(folder)
        if o.key == folder or o.key.startswith(folder + "/")
    ]
    obj = await dl.storage.head(listed[0].key) if len(listed) == 1 else None
    if obj is None or not grant.principal.owns(obj.metadata.get(OWNER_METADATA, _ANONYMOUS)):
        # Someone else's upload is exactly as unknown as one that does not exist.
        raise NotFound("no such upload")
    return await _serve(request, dl, obj, "files")


def _tus_grant(request: web.Request) -> Grant:
    grant = authorize(request, DOWNLOAD)
    if grant.via == "signed":
        raise SignedUrlNotForTus("tus uploads are read with a bearer token; links are for /uploads")
    return grant


def _headers(obj: ObjectInfo) -> dict[str, str]:
    h = {
        "Accept-Ranges": "bytes",
        "ETag": obj.etag,
        "Content-Type": obj.content_type or "application/octet-stream",
        # Stored bytes come from anyone who may upload: never let a browser run them as
        # a page of this origin (the upload page lives here), nor guess another type.
        "Content-Disposition": content_disposition(_filename(obj)),
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox",
    }
    if obj.last_modified is not None:
        h["Last-Modified"] = http_date(obj.last_modified)
    sha256 = obj.metadata.get("sha256", "")
    if _SHA256_HEX_RE.fullmatch(sha256):
        # RFC 9530: the digest of the whole representation, on 200 and 206 alike.
        h["Repr-Digest"] = f"sha-256=:{base64.b64encode(bytes.fromhex(sha256)).decode()}:"
    return h


def _filename(obj: ObjectInfo) -> str | None:
    """The original file name as stored: tus keeps it percent-encoded (S3 metadata is
    ASCII), form uploads as ASCII with "?" for the rest."""
    name = obj.metadata.get("filename")
    if name is not None and "tus-id" in obj.metadata:
        return unquote(name)
    return name


def content_disposition(filename: str | None) -> str:
    """``attachment``, with the name as RFC 6266 gives it: an ASCII ``filename`` for old
    clients and the exact UTF-8 ``filename*`` (RFC 8187)."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not name:
        return "attachment"
    fallback = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\%' else "_" for c in name)
    return (
        f'attachment; filename="{fallback}"; '
        f"filename*=UTF-8''{quote(name, safe=_ATTR_CHARS, errors='replace')}"
    )


async def _serve(
    request: web.Request, dl: Downloads, obj: ObjectInfo, route: str
) -> web.StreamResponse:
    v = Validators(obj.etag, obj.last_modified, obj.size)
    headers = _headers(obj)
    if precondition(request.method, request.headers, v) == 304:
        dl.metrics.downloads.labels(route, "not_modified").inc()
        keep = ("ETag", "Last-Modified", "Content-Disposition")
        return web.Response(status=304, headers={k: headers[k] for k in keep if k in headers})
    rng = byte_range(request.method, request.headers, v)
    if rng is not None:
        headers["Content-Range"] = rng.content_range(obj.size)
    response = web.StreamResponse(status=200 if rng is None else 206, headers=headers)
    response.content_length = obj.size if rng is None else rng.length
    if request.method == "HEAD" or response.content_length == 0:
        dl.metrics.downloads.labels(route, "head" if request.method == "HEAD" else "full").inc()
        await response.prepare(request)
        await response.write_eof()
        return response
    if dl.active >= dl.config.max_concurrent:
        raise TooManyDownloads(
            f"{dl.config.max_concurrent} downloads are running", headers={"Retry-After": "5"}
        )
    dl.active += 1
    try:
        return await _stream(request, dl, obj, rng or ByteRange(0, obj.size - 1), response, route)
    finally:
        dl.active -= 1


async def _stream(
    request: web.Request,
    dl: Downloads,
    obj: ObjectInfo,
    rng: ByteRange,
    response: web.StreamResponse,
    route: str,
) -> web.StreamResponse:
    chunks = dl.reader.read_range(
        obj.key, first_byte=rng.first, last_byte=rng.last, etag=obj.etag, chunk_bytes=CHUNK_BYTES
    )
    async with contextlib.aclosing(chunks):
        # The first chunk before the status line: a store that fails (or an object that
        # changed since the HEAD) still gets a proper error answer.
        try:
            first = await anext(chunks, b"")
        except ConditionFailed:
            raise StorageUnavailable(
                "the object changed while it was being read; try again",
                headers={"Retry-After": "1"},
            ) from None
        await response.prepare(request)
        sent = await _send(request, dl, response, first, chunks, route)
    outcome = "full" if rng.length == obj.size else "partial"
    if sent != rng.length:
        outcome = "broken"
    dl.metrics.downloads.labels(route, outcome).inc()
    log.info(
        "download key=%r status=%d bytes=%d/%d result=%s",
        obj.key,
        response.status,
        sent,
        rng.length,
        outcome,
    )
    return response


async def _send(
    request: web.Request,
    dl: Downloads,
    response: web.StreamResponse,
    first: bytes,
    chunks: AsyncIterator[bytes],
    route: str,
) -> int:
    """Write ``first`` and the rest; the number of bytes sent.  Once the status line is out
    an error can only end the connection (the client sees fewer bytes than
    Content-Length, so it knows)."""
    sent = 0
    counter = dl.metrics.download_bytes.labels(route)
    chunk = first
    try:
        while chunk:
            async with asyncio.timeout(dl.config.send_timeout_s):
                await response.write(chunk)
            sent += len(chunk)
            counter.inc(len(chunk))
            chunk = await anext(chunks, b"")
    except asyncio.CancelledError:
        raise
    except (ProxyError, ConnectionError, TimeoutError) as e:
        log.info("download cut after %d bytes: %s", sent, type(e).__name__)
        if request.transport is not None:
            request.transport.abort()
    return sent


def counted(route: str, handler: Handler) -> Handler:
    """Count a download refused before its body (any error answer) under ``route``."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ProxyError:
            request.app[DOWNLOADS].metrics.downloads.labels(route, "refused").inc()
            raise

    return wrapped


def add_routes(app: web.Application, tus_item_path: str | None) -> None:
    """GET and HEAD on the upload path (aiohttp routes a method per resource, so PUT there
    stays the upload's); GET on a tus upload's URL (its HEAD stays tus's)."""
    uploads = counted("uploads", get_object)
    app.router.add_route("GET", "/uploads/{key:[\\s\\S]+}", uploads)
    app.router.add_route("HEAD", "/uploads/{key:[\\s\\S]+}", uploads)
    if tus_item_path is not None:
        app.router.add_route("GET", tus_item_path, counted("files", get_tus_upload))
