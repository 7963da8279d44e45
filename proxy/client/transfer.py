"""One file to the proxy: plain ``PUT /uploads/<key>`` below the tus threshold, tus above.

Both stream the file from disk (:mod:`proxy.client.source`) and hash it as it is read;
the upload counts only when the server's SHA-256 equals ours:

* PUT: one request with ``Content-Length`` and ``Expect: 100-continue`` (so a 401 or 413
  comes back before any body byte is sent); the 201 JSON carries ``sha256``.  A failed
  PUT starts again from byte 0: that is why only small files take this way.
* tus: creation (``POST``), then ``PATCH``es of ``chunk_size`` bytes from the offset the
  server confirmed.  After any failure the next step is a ``HEAD``: the server may have
  kept part of a broken PATCH, and only its offset counts.  The completing PATCH's answer
  carries ``Upload-SHA256`` (a header of this proxy).  The upload URL is remembered
  (:mod:`proxy.client.resume`) so a new run continues it; such a run first re-reads the
  already-sent prefix from disk to bring its hash up to the server's offset.

Every request runs under a stall watchdog rather than a total timeout: a 20 GiB PATCH
over a slow link may take hours, but ``stall_timeout_s`` without a body byte accepted by
the socket, or without an answer after the last one, means the connection is dead.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import mimetypes
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urljoin

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.client.dedup import identical, prehash, put_headers, refused
from proxy.client.progress import FileProgress, FileResult
from proxy.client.resume import ResumeStore, fingerprint
from proxy.client.retry import Backoff, RetryPolicy, UploadError, retry_after_s
from proxy.client.source import FileChanged, FileIdentity, FileSource, Hash, RateLimit

TUS_VERSION = "1.0.0"
SHA256_HEADER = "Upload-SHA256"  # proxy-specific, see proxy/web/tus.py
MAX_ANSWER_BYTES = 64 * 1024
WATCHDOG_TICK_S = 0.5
# Server answers that say "wait and try again" although they are 4xx: the proxy's idle
# timeout (408) and its per-client upload limit (429, with Retry-After).
RETRYABLE_4XX = frozenset({408, 429})


@dataclass(frozen=True)
class Options:
    base_url: str  # scheme://host[:port][/path], no trailing slash
    # Secrets: kept out of the repr, so logging an Options never shows them.
    token: str | None = field(default=None, repr=False)
    signed_query: str | None = field(default=None, repr=False)  # --signed-url's query, verbatim
    signed_key: str | None = None  # the one key a key-signed URL allows
    signed_prefix: str | None = None  # keys a prefix-signed URL allows
    key_prefix: str = ""
    tus_path: str = "/files/"
    tus_threshold_bytes: int = 32 * 1024 * 1024
    chunk_size_bytes: int = 128 * 1024 * 1024
    chunk_checksum: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    stall_timeout_s: float = 120.0
    # Hash each file before sending it and ask for an instant upload (see proxy/client/dedup.py).
    dedup: bool = True
    # Replace a different file at a PUT key (else: If-None-Match: *, and a 409 is an error).
    overwrite: bool = False

    @property
    def signed(self) -> bool:
        return self.signed_query is not None

    def use_tus(self, size: int) -> bool:
        # Signed URLs are bound to one PUT; tus needs a bearer token (see proxy/web/tus.py).
        return not self.signed and size >= self.tus_threshold_bytes

    def put_key(self, path: str) -> str:
        if self.signed_key is not None:
            return self.signed_key
        return (self.signed_prefix or "") + self.key_prefix + os.path.basename(path)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def error(self, retryable: bool | None = None) -> UploadError:
        """The proxy's JSON error ``{code, message}`` (or what another hop sent) as an
        :class:`UploadError`; 5xx, 408 and 429 are retryable unless told otherwise."""
        code, message = f"HTTP_{self.status}", self.body[:200].decode("utf-8", "replace").strip()
        try:
            doc = json.loads(self.body)
            if isinstance(doc, dict):
                code, message = str(doc.get("code", code)), str(doc.get("message", message))
        except ValueError:
            pass
        if retryable is None:
            # ERR_STORAGE: S3 refused the request itself; the proxy documents it as final.
            retryable = (self.status >= 500 or self.status in RETRYABLE_4XX) and (
                code != "ERR_STORAGE"
            )
        return UploadError(
            f"{self.status} {message or 'no message'}",
            code=code,
            status=self.status,
            retryable=retryable,
            retry_after_s=retry_after_s(self.headers.get("Retry-After")),
        )


class _Activity:
    """When the request last moved; the watchdog compares against it."""

    def __init__(self) -> None:
        self.last_s = time.monotonic()

    def touch(self) -> None:
        self.last_s = time.monotonic()


@dataclass
class _Job:
    path: str
    identity: FileIdentity
    source: FileSource
    progress: FileProgress
    backoff: Backoff
    started_s: float = field(default_factory=time.monotonic)
    resumed_from: int = 0
    sha256: str | None = None  # hashed before sending (instant uploads), hex

    def result(self, ok: bool, **kw: Any) -> FileResult:
        return FileResult(
            path=self.path,
            ok=ok,
            protocol=self.progress.protocol,
            size=self.identity.size,
            resumed_from=self.resumed_from,
            sent_bytes=self.progress.sent_bytes,
            attempts=self.backoff.attempts,
            seconds=time.monotonic() - self.started_s,
            **kw,
        )


RetryHook = Callable[[FileProgress, int, float, UploadError], None]


@dataclass(eq=False)
class Uploader:
    session: aiohttp.ClientSession
    options: Options = field(repr=False)  # holds the bearer token
    store: ResumeStore
    on_retry: RetryHook
    rate: RateLimit | None = None

    async def upload(self, path: str, progress: FileProgress) -> FileResult:
        """Upload one file; every failure becomes a failed :class:`FileResult`."""
        try:
            identity = FileIdentity.of(path)
            source = FileSource(identity, self.rate)
        except OSError as e:
            return FileResult(path, False, "-", 0, code="ERR_FILE", message=str(e))
        job = _Job(path, identity, source, progress, Backoff(self.options.retry))
        progress.size = identity.size
        progress.started_s = time.monotonic()
        try:
            if self.options.dedup and identity.size:
                job.sha256 = await prehash(job.source, progress)
            if self.options.use_tus(identity.size):
                progress.protocol = "tus"
                return await self._tus(job)
            progress.protocol = "put"
            return await self._put(job)
        except UploadError as e:
            return job.result(False, code=e.code, status=e.status, message=e.message)
        except FileChanged as e:
            return job.result(False, code="ERR_FILE_CHANGED", message=str(e))
        except OSError as e:
            return job.result(False, code="ERR_FILE", message=str(e))
        finally:
            progress.done = True
            source.close()

    async def _retrying(
        self, job: _Job, step: Callable[[], Awaitable[FileResult | None]]
    ) -> FileResult:
        """Run ``step`` until it returns a result; back off between retryable failures."""
        while True:
            try:
                result = await step()
                if result is not None:
                    return result
                continue
            except UploadError as e:
                delay = job.backoff.next_delay_s(e)
                if delay is None:
                    raise
                self.on_retry(job.progress, job.backoff.attempts, delay, e)
            await asyncio.sleep(delay)

    # -- HTTP plumbing ---------------------------------------------------------------

    def _body(
        self, job: _Job, start: int, end: int, hashes: tuple[Hash, ...], activity: _Activity
    ) -> AsyncIterator[bytes]:
        job.progress.position = start

        def moved(nbytes: int) -> None:
            activity.touch()
            job.progress.position += nbytes
            job.progress.sent_bytes += nbytes

        return job.source.chunks(start, end, hashes, moved)

    async def _request(
        self,
        method: str,
        url: str | URL,
        headers: dict[str, str],
        body: AsyncIterator[bytes] | None = None,
        activity: _Activity | None = None,
    ) -> Answer:
        """One request under the stall watchdog; network trouble is a retryable error."""
        activity = activity or _Activity()
        headers = {**self.options.auth_headers(), **headers}

        async def go() -> Answer:
            async with self.session.request(
                method, url, headers=headers, data=body, expect100=body is not None
            ) as r:
                payload = await r.content.read(MAX_ANSWER_BYTES)
                return Answer(r.status, r.headers, payload)

        task = asyncio.ensure_future(go())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=WATCHDOG_TICK_S)
                if done:
                    return task.result()
                if time.monotonic() - activity.last_s > self.options.stall_timeout_s:
                    raise UploadError(
                        f"no progress for {self.options.stall_timeout_s:g}s",
                        code="ERR_STALLED",
                        retryable=True,
                    )
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise UploadError(
                f"network error: {e or type(e).__name__}", code="ERR_NETWORK", retryable=True
            ) from None
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    # -- plain PUT -------------------------------------------------------------------

    async def _put(self, job: _Job) -> FileResult:
        opts = self.options
        key = opts.put_key(job.path)
        url = f"{opts.base_url}/uploads/{quote(key, safe='/~')}"
        if opts.signed_query is not None:
            url += "?" + opts.signed_query
        size = job.identity.size

        async def attempt() -> FileResult:
            h = hashlib.sha256()
            activity = _Activity()
            headers = {
                "Content-Length": str(size),
                "Content-Type": _content_type(job.path),
                **put_headers(job.sha256, self.options.overwrite),
            }
            body = self._body(job, 0, size, (h,), activity) if size else None
            # encoded=True: the signed query goes out byte for byte, as it was signed.
            answer = await self._request("PUT", URL(url, encoded=True), headers, body, activity)
            if answer.status == 409 and (skipped := identical(answer, job.sha256)):
                job.source.check_unchanged()
                return job.result(True, sha256=job.sha256, key=key, skipped=skipped)
            if answer.status != 201:
                raise refused(answer, key, self.options.overwrite)
            job.source.check_unchanged()
            try:
                doc = json.loads(answer.body)
                stored_key, theirs = str(doc["key"]), str(doc["sha256"])
            except (ValueError, KeyError, TypeError):
                raise UploadError(
                    "the server's answer has no sha256", code="ERR_BAD_ANSWER"
                ) from None
            # An instant upload read no body: the digest to compare is the one sent ahead.
            instant = doc.get("deduplicated") is True
            ours = job.sha256 if instant and job.sha256 else h.hexdigest()
            if theirs != ours:
                raise _mismatch(ours, theirs)
            return job.result(True, sha256=ours, key=stored_key, deduplicated=instant)

        return await self._retrying(job, attempt)

    # -- tus ---------------------------------------------------------------------------

    async def _tus(self, job: _Job) -> FileResult:
        create_url = self.options.base_url + self.options.tus_path
        fp = fingerprint(job.identity, create_url)
        state = _TusState(upload_url=self.store.get(fp), resuming=True)

        async def step() -> FileResult | None:
            try:
                return await self._tus_step(job, state, create_url, fp)
            except UploadError:
                state.offset = None  # whatever failed, ask the server where it stands
                raise

        return await self._retrying(job, step)

    async def _tus_step(
        self, job: _Job, st: _TusState, create_url: str, fp: str
    ) -> FileResult | None:
        size = job.identity.size
        if st.upload_url is None:
            st.upload_url, created = await self._tus_create(job, create_url)
            if job.sha256 and created.headers.get("Upload-Offset") == str(size):
                # Complete on creation: the server copied content this token stored.
                st.server_sha256 = created.headers.get(SHA256_HEADER)
                st.sha256 = _Known(job.sha256)
                return self._tus_done(job, st, fp, deduplicated=True)
            self.store.put(fp, st.upload_url, job.identity)
            st.offset, st.resuming = 0, False
        if st.offset is None:
            head = await self._request("HEAD", st.upload_url, {"Tus-Resumable": TUS_VERSION})
            if head.status in (404, 410) or (
                head.status == 200 and head.headers.get("Upload-Length") != str(size)
            ):
                self.store.forget(fp)
                if st.sent_last_byte:
                    raise UploadError(
                        "the server forgot the upload after receiving every byte; it may be "
                        "stored, but it cannot be verified",
                        code="ERR_UNVERIFIED",
                    )
                st.restart()
                return None
            if head.status != 200:
                raise head.error()
            st.offset = int(head.headers.get("Upload-Offset", "0"))
            if st.resuming:
                job.resumed_from, st.resuming = st.offset, False
        offset = st.offset
        job.progress.position = offset
        if st.hashed_bytes > offset:  # offsets only grow; never trust a hash past the server's
            st.sha256, st.hashed_bytes = hashlib.sha256(), 0
        if st.hashed_bytes < offset:
            # A new run, or the server kept part of a broken PATCH: hash what it has.
            await job.source.hash_range(st.sha256, st.hashed_bytes, offset)
            st.hashed_bytes = offset
        # At offset == size this is an empty PATCH: it makes the server finish a completion
        # that a crash interrupted, and answer with the digest (HEAD cannot tell "done").
        end = min(offset + self.options.chunk_size_bytes, size)
        try:
            answer = await self._tus_patch(job, st, offset, end)
        finally:
            if end == size and job.progress.position == size:
                st.sent_last_byte = True
        if answer.status != 204:
            raise answer.error(retryable=answer.status in (404, 409, 410, 423, 460) or None)
        new_offset = int(answer.headers.get("Upload-Offset", "-1"))
        if new_offset != end:
            raise UploadError(
                f"the server reports offset {new_offset} after a PATCH to {end}",
                code="ERR_OFFSET",
                retryable=True,
            )
        st.offset, st.sha256, st.hashed_bytes = end, st.pending_sha256, end
        st.server_sha256 = answer.headers.get(SHA256_HEADER)
        job.backoff.progressed()
        if end == size:
            if st.server_sha256 is None:
                raise UploadError(
                    f"the server did not send {SHA256_HEADER}; is it upload-proxy?",
                    code="ERR_UNVERIFIED",
                )
            return self._tus_done(job, st, fp)
        return None

    def _tus_done(
        self, job: _Job, st: _TusState, fp: str, *, deduplicated: bool = False
    ) -> FileResult:
        self.store.forget(fp)  # complete on the server, whatever we conclude below
        job.source.check_unchanged()
        ours = st.sha256.hexdigest()
        if st.server_sha256 != ours:
            raise _mismatch(ours, st.server_sha256 or "")
        job.progress.position = job.identity.size
        return job.result(True, sha256=ours, upload_url=st.upload_url, deduplicated=deduplicated)

    async def _tus_create(self, job: _Job, create_url: str) -> tuple[str, Answer]:
        name = os.path.basename(job.path)
        meta = f"filename {_b64(name)},filetype {_b64(_content_type(job.path))}"
        if job.sha256:
            meta += f",sha256 {_b64(job.sha256)}"
        headers = {
            "Tus-Resumable": TUS_VERSION,
            "Upload-Length": str(job.identity.size),
            "Upload-Metadata": meta,
        }
        answer = await self._request("POST", create_url, headers)
        if answer.status != 201 or "Location" not in answer.headers:
            raise answer.error()
        return urljoin(create_url, answer.headers["Location"]), answer

    async def _tus_patch(self, job: _Job, st: _TusState, offset: int, end: int) -> Answer:
        assert st.upload_url is not None
        headers = {
            "Tus-Resumable": TUS_VERSION,
            "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream",
            "Content-Length": str(end - offset),
        }
        if self.options.chunk_checksum and end > offset:
            # A second read and hash of the chunk before it is sent (see README, Client).
            chunk_hash = hashlib.sha256()
            await job.source.hash_range(chunk_hash, offset, end)
            headers["Upload-Checksum"] = "sha256 " + base64.b64encode(chunk_hash.digest()).decode()
        # Hash into a copy: if this PATCH breaks, the server's offset may be anywhere in it.
        st.pending_sha256 = st.sha256.copy()
        activity = _Activity()
        body = (
            self._body(job, offset, end, (st.pending_sha256,), activity) if end > offset else None
        )
        return await self._request("PATCH", st.upload_url, headers, body, activity)


@dataclass
class _TusState:
    upload_url: str | None
    resuming: bool  # the upload URL came from the resume store; its offset is news
    offset: int | None = None  # None: HEAD before the next PATCH
    sha256: Hash = field(default_factory=hashlib.sha256)
    hashed_bytes: int = 0
    pending_sha256: Hash = None
    server_sha256: str | None = None
    sent_last_byte: bool = False

    def restart(self) -> None:
        self.upload_url, self.offset, self.server_sha256 = None, None, None
        self.sha256, self.hashed_bytes = hashlib.sha256(), 0


class _Known:
    """A digest known already (the file was hashed before an instant upload)."""

    def __init__(self, hex_digest: str) -> None:
        self._hex = hex_digest

    def hexdigest(self) -> str:
        return self._hex


def _mismatch(ours: str, theirs: str) -> UploadError:
    return UploadError(
        f"SHA-256 mismatch: the file read {ours}, the server stored {theirs or 'nothing known'}",
        code="ERR_SHA256_MISMATCH",
    )


def _b64(value: str) -> str:
    return base64.b64encode(value.encode("utf-8", "surrogateescape")).decode()


def _content_type(path: str) -> str:
    return mimetypes.guess_type(path)[0] or "application/octet-stream"
