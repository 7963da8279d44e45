"""S3Storage: the storage protocol (:mod:`proxy.storage.base`) as calls on one S3 bucket.

Per-part cost is chosen on purpose (see ``bench/checksums.py`` and the README):

* ``payload_signing_enabled=False`` makes botocore send ``UNSIGNED-PAYLOAD``
  even over plain HTTP, so it does not SHA-256 every part a second time;
* ``request_checksum_calculation="when_required"`` stops botocore >= 1.36 adding
  its own CRC32 pass (and the trailer some S3-compatible stores reject);
* the streaming layer computes the configured per-part checksum (``part_checksum``)
  in the same pass as the whole-body SHA-256 and hands it in here.

botocore's own retries are off (``total_max_attempts=1``): the one retry policy, and
the translation of every failure into :mod:`proxy.errors`, are
:mod:`proxy.storage.s3.calls`, which also says who may send a request twice.
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, nullcontext
from datetime import datetime
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import ClientError

from proxy.errors import ConditionFailed, KeyConflict, ObjectExists, ProxyError, StorageError
from proxy.storage.base import (
    Body,
    CompletedPart,
    ObjectInfo,
    OpenMultipart,
    OpObserver,
    PartChecksum,
    StoredPart,
    multipart_etag,
)
from proxy.storage.keylocks import KeyLocks
from proxy.storage.s3 import copies, reads
from proxy.storage.s3.body import PartBody
from proxy.storage.s3.calls import MISSING_CODES, S3Calls, StoreFailing, error_code

_CHECKSUM_ARGS = {"md5": "ContentMD5", "crc32": "ChecksumCRC32", "sha256": "ChecksumSHA256"}


async def _none() -> None:
    return None


def _conditions(if_match: str | None, if_none_match: bool) -> dict[str, str]:
    """A conditional write's arguments: replace only that ETag, or only create."""
    extra = {} if if_match is None else {"IfMatch": if_match}
    if if_none_match:
        extra["IfNoneMatch"] = "*"
    return extra


def _etag_of(parts: list[CompletedPart]) -> str | None:
    """The multipart ETag S3 gives these parts, or None when a part's ETag is not a plain
    MD5 (SeaweedFS answers UploadPartCopy with "<md5>-<n>"): then a lost Complete answer
    cannot be recognised by its ETag, and is not guessed at."""
    try:
        return multipart_etag(parts)
    except ValueError:
        return None


def _server_time(response: dict[str, Any]) -> datetime | None:
    """The store's clock from an answer's ``Date`` header (RFC 9110 IMF-fixdate)."""
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if not date:
        return None
    try:
        return email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return None


class S3Storage:
    """:class:`proxy.storage.base.Storage` over any S3-compatible endpoint."""

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        addressing_style: str = "path",
        verify: bool | str = True,
        access_key: str | None = None,
        secret_key: str | None = None,
        credentials_file: str | None = None,
        profile: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        retry_attempts: int = 4,
        retry_base_delay_s: float = 0.25,
        max_pool_connections: int = 32,
        observer: OpObserver | None = None,
        max_copy_bytes: int = copies.MAX_COPY_BYTES,
        copy_part_bytes: int = copies.COPY_PART_BYTES,
    ) -> None:
        self.bucket = bucket
        self._s3 = S3Calls(
            bucket, attempts=retry_attempts, base_delay_s=retry_base_delay_s, observer=observer
        )
        # What open() makes the botocore session and its S3 client with.
        self._session_vars = {"credentials_file": credentials_file, "profile": profile}
        self._client_args: dict[str, Any] = {
            "endpoint_url": endpoint_url or None,
            "region_name": region,
            "aws_access_key_id": access_key,
            "aws_secret_access_key": secret_key,
            "verify": verify,
            "config": AioConfig(
                s3={"addressing_style": addressing_style, "payload_signing_enabled": False},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"total_max_attempts": 1},
                connect_timeout=connect_timeout_s,
                read_timeout=read_timeout_s,
                max_pool_connections=max_pool_connections,
                parameter_validation=False,
            ),
        }
        self._read_timeout_s = read_timeout_s
        # Objects above max_copy_bytes are relabelled by UploadPartCopy in pieces of
        # copy_part_bytes (lowered by the tests, which cannot copy 5 GiB).
        self._max_copy_bytes = max_copy_bytes
        self._copy_part_bytes = copy_part_bytes
        self._stack = AsyncExitStack()
        self._creates = KeyLocks()

    def set_observer(self, observer: OpObserver | None) -> None:
        self._s3.observer = observer

    @property
    def _client(self) -> Any:
        """The open aiobotocore client (None while closed); calls on it go through
        :meth:`S3Calls.call <proxy.storage.s3.calls.S3Calls.call>`."""
        return self._s3.client

    @property
    def creates(self) -> KeyLocks:
        """The create-only writes in progress, by key (see :meth:`_create_only`)."""
        return self._creates

    def _create_only(self, key: str, if_none_match: bool) -> AbstractAsyncContextManager[None]:
        """Around a write that sends ``If-None-Match: *``: one at a time per key.

        SeaweedFS checks the condition before it writes, not atomically with the write:
        two create-only writes of one key that overlap can both succeed (seen under load:
        two completions, both answered 201), and the first one's caller then reports an
        object that was replaced.  Queued here, the second meets the first's object and
        is refused (ObjectExists).  Every create-only write of every protocol (plain,
        tus, IETF, instant-upload copies, tus state) comes through here; it covers this
        process only: across instances the store's own check is all there is
        (docs/scale-out.md).  Held for the one store call (its retries and its check
        for a lost answer included), never while a body is received: once per
        completion, not per part."""
        return self._creates.hold(key) if if_none_match else nullcontext()

    async def open(self) -> S3Storage:
        session: AioSession = get_session()
        for name, value in self._session_vars.items():
            if value:
                session.set_config_variable(name, value)
        self._s3.client = await self._stack.enter_async_context(
            session.create_client("s3", **self._client_args)
        )
        return self

    async def close(self) -> None:
        await self._stack.aclose()
        self._s3.client = None

    async def __aenter__(self) -> S3Storage:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _stored_as(
        self, key: str, size: int, etag: str | None = None, metadata: dict[str, str] | None = None
    ) -> dict[str, Any] | None:
        """``{"ETag": ...}`` if ``key`` holds exactly what we sent (by multipart ETag, or by
        size and our own metadata, which carries the body's SHA-256), else None."""
        obj = await self.head(key)
        if obj is None or obj.size != size:
            return None
        if etag is not None and obj.etag.strip('"') != etag:
            return None
        if metadata is not None and (
            not metadata or any(obj.metadata.get(k) != v for k, v in metadata.items())
        ):
            return None
        return {"ETag": obj.etag}

    @contextlib.asynccontextmanager
    async def _folder_conflicts(self, key: str) -> AsyncIterator[None]:
        """Turn a failed write to a key that is a folder into :class:`KeyConflict`.

        SeaweedFS keeps ``a`` and ``a/b`` side by side only when ``a`` came first.  Writing
        ``a`` over an existing folder ``a/`` fails as "precondition failed" with
        If-None-Match (though HEAD finds no object) and as a 500 InternalError without
        it, which looks transient but never heals.  Both would be a wrong answer (key
        exists / try again later), so on failure we look: no object at the key but
        objects under ``key/`` means the key is a folder.  Checked only after a failure,
        so a successful write costs no extra request."""
        try:
            yield
        except (ObjectExists, StoreFailing) as e:
            # (A store that cannot be reached is not asked again: that would double the
            # time an outage takes to report.)
            if isinstance(e, ConditionFailed):
                raise
            try:
                folder = await self.head(key) is None and await self._has_children(key)
            except ProxyError:
                folder = False  # cannot tell: the original error stands
            if folder:
                raise KeyConflict(
                    f"the key {key!r} is a folder (objects exist under {key + '/'!r}); "
                    "it cannot also hold an object"
                ) from e
            raise

    async def _has_children(self, key: str) -> bool:
        r = await self._s3.call(
            "list_objects_v2",
            lambda: self._client.list_objects_v2(Bucket=self.bucket, Prefix=key + "/", MaxKeys=1),
        )
        return int(r.get("KeyCount", 0) or 0) > 0

    async def check(self) -> None:
        await self._s3.call("head_bucket", lambda: self._client.head_bucket(Bucket=self.bucket))

    async def create_bucket(self) -> None:
        try:
            await self.check()
        except StorageError:
            await self._s3.call(
                "create_bucket", lambda: self._client.create_bucket(Bucket=self.bucket)
            )

    async def head(self, key: str) -> ObjectInfo | None:
        async def go() -> dict[str, Any] | None:
            try:
                r: dict[str, Any] = await self._client.head_object(Bucket=self.bucket, Key=key)
                return r
            except ClientError as e:
                if error_code(e) in MISSING_CODES:
                    return None
                raise

        r = await self._s3.call("head_object", go)
        if r is None:
            return None
        return ObjectInfo(
            key=key,
            size=int(r.get("ContentLength", 0)),
            etag=str(r.get("ETag", "")),
            content_type=str(r.get("ContentType", "")),
            metadata=dict(r.get("Metadata", {})),
            last_modified=r.get("LastModified"),
        )

    @staticmethod
    def _checksum_args(checksum: PartChecksum | None) -> dict[str, str]:
        if checksum is None:
            return {}
        return {_CHECKSUM_ARGS[checksum.algorithm]: checksum.value}

    async def put_object(
        self,
        key: str,
        body: Body,
        *,
        metadata: dict[str, str],
        content_type: str,
        checksum: PartChecksum | None,
        if_none_match: bool,
    ) -> str:
        async with self._folder_conflicts(key), self._create_only(key, if_none_match):
            return await self._put(
                key,
                body,
                recover=lambda: self._stored_as(key, len(body), metadata=metadata),
                Metadata=metadata,
                ContentType=content_type,
                **self._checksum_args(checksum),
                **_conditions(None, if_none_match),
            )

    async def _put(
        self,
        key: str,
        body: Body,
        *,
        recover: Callable[[], Awaitable[dict[str, Any] | None]],
        **extra: str | dict[str, str],
    ) -> str:
        """One PutObject of ``body`` (retried; ``recover`` as :meth:`_call` says); its ETag."""
        r = await self._s3.call(
            "put_object",
            lambda: self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=PartBody(body, self._read_timeout_s),
                ContentLength=len(body),
                **extra,
            ),
            recover=recover,
        )
        return str(r["ETag"])

    async def create_multipart(
        self, key: str, *, metadata: dict[str, str], content_type: str
    ) -> str:
        r = await self._s3.call(
            "create_multipart_upload",
            lambda: self._client.create_multipart_upload(
                Bucket=self.bucket, Key=key, Metadata=metadata, ContentType=content_type
            ),
        )
        return str(r["UploadId"])

    async def upload_part(
        self,
        key: str,
        upload_id: str,
        number: int,
        body: Body,
        checksum: PartChecksum | None,
    ) -> str:
        extra = self._checksum_args(checksum)
        r = await self._s3.call(
            "upload_part",
            lambda: self._client.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=PartBody(body, self._read_timeout_s),
                ContentLength=len(body),
                **extra,
            ),
        )
        return str(r["ETag"])

    async def copy_part(
        self,
        key: str,
        upload_id: str,
        number: int,
        *,
        source: str,
        source_etag: str,
        first_byte: int,
        last_byte: int,
    ) -> str:
        r = await self._s3.call(
            "upload_part_copy",
            functools.partial(
                self._client.upload_part_copy,
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                CopySource={"Bucket": self.bucket, "Key": source},
                CopySourceIfMatch=source_etag,
                CopySourceRange=f"bytes={first_byte}-{last_byte}",
            ),
        )
        return str(r["CopyPartResult"]["ETag"])

    async def complete_multipart(
        self,
        key: str,
        upload_id: str,
        parts: list[CompletedPart],
        *,
        if_none_match: bool,
        size_bytes: int | None = None,
    ) -> str:
        extra = {"IfNoneMatch": "*"} if if_none_match else {}
        async with self._folder_conflicts(key), self._create_only(key, if_none_match):
            r = await self._s3.call(
                "complete_multipart_upload",
                lambda: self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={
                        "Parts": [{"PartNumber": p.number, "ETag": p.etag} for p in parts]
                    },
                    **extra,
                ),
                recover=lambda: (
                    self._stored_as(key, size_bytes, etag=etag)
                    if size_bytes is not None and (etag := _etag_of(parts)) is not None
                    else _none()
                ),
            )
        return str(r["ETag"])

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        async def go() -> None:
            try:
                await self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id
                )
            except ClientError as e:
                if error_code(e) != "NoSuchUpload":
                    raise

        await self._s3.call("abort_multipart_upload", go)

    async def replace_metadata(
        self, key: str, *, etag: str, size: int, metadata: dict[str, str], content_type: str
    ) -> None:
        if size <= self._max_copy_bytes:
            await copies.copy_in_place(
                self._s3, key, etag=etag, metadata=metadata, content_type=content_type
            )
            return
        await copies.multipart_copy(
            self, key, key, etag=etag, size=size, part_bytes=self._copy_part_bytes,
            metadata=metadata, content_type=content_type,
        )  # fmt: skip

    async def copy_object(
        self,
        source: str,
        key: str,
        *,
        source_etag: str,
        size: int,
        metadata: dict[str, str],
        content_type: str,
        if_none_match: bool,
    ) -> str:
        # Always a multipart copy (one UploadPartCopy per GiB), even below CopyObject's
        # 5 GiB: its completion takes If-None-Match, so a create-only copy is atomic on
        # every store that makes completions conditional; CopyObject has no such header.
        # (The completion queues behind other create-only writes of ``key``: _create_only.)
        return await copies.multipart_copy(
            self, source, key, etag=source_etag, size=size, part_bytes=self._copy_part_bytes,
            metadata=metadata, content_type=content_type, if_none_match=if_none_match,
        )  # fmt: skip

    async def delete_object(self, key: str, *, if_match: str | None = None) -> None:
        extra = {} if if_match is None else {"IfMatch": if_match}
        try:
            await self._s3.call(
                "delete_object",
                lambda: self._client.delete_object(Bucket=self.bucket, Key=key, **extra),
            )
        except ObjectExists as e:
            # 412: the object is no longer the one we meant (or is gone); it stays.
            raise ConditionFailed(f"{key} is not the object it was") from e

    async def list_parts(self, key: str, upload_id: str) -> list[StoredPart]:
        out: list[StoredPart] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "UploadId": upload_id}
        while True:
            r = await self._s3.call(
                "list_parts", functools.partial(self._client.list_parts, **dict(kwargs))
            )
            for p in r.get("Parts", []) or []:
                out.append(
                    StoredPart(
                        int(p["PartNumber"]),
                        str(p["ETag"]),
                        int(p["Size"]),
                        p.get("LastModified"),
                    )
                )
            if not r.get("IsTruncated"):
                return out
            kwargs["PartNumberMarker"] = r.get("NextPartNumberMarker", 0)

    async def list_multipart(self, prefix: str = "") -> list[OpenMultipart]:
        out: list[OpenMultipart] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            r = await self._s3.call(
                "list_multipart_uploads",
                # partial copies kwargs now: the markers change on the next page.
                functools.partial(self._client.list_multipart_uploads, **kwargs),
            )
            listed_at = _server_time(r)
            for u in r.get("Uploads", []) or []:
                out.append(OpenMultipart(u["Key"], u["UploadId"], u["Initiated"], listed_at))
            if not r.get("IsTruncated"):
                return out
            kwargs["KeyMarker"] = r.get("NextKeyMarker", "")
            kwargs["UploadIdMarker"] = r.get("NextUploadIdMarker", "")

    async def get_small(self, key: str, max_bytes: int) -> tuple[bytes, str] | None:
        return await reads.get_small(self._s3, key, max_bytes)

    async def put_conditional(
        self, key: str, body: Body, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        try:
            async with self._create_only(key, if_none_match):
                return await self._put(
                    key,
                    body,
                    # "Changed since you read it" / "key taken" may answer a re-send of our
                    # own write (proxy.storage.s3.calls).  Every conditional write of ours is
                    # unique (tus state carries a new rev and lease owner, segments a random
                    # key), so an object holding exactly our body is our write, not
                    # someone else's.
                    recover=lambda: reads.holds_body(self._s3, key, body),
                    **_conditions(if_match, if_none_match),
                )
        except ObjectExists as e:
            # 412 on If-Match means "changed since you read it", not "key taken".
            raise ConditionFailed(f"{key} was changed by someone else") from e

    def iter_object(self, key: str, *, chunk_bytes: int) -> AsyncIterator[bytes]:
        return reads.iter_object(self._s3, key, chunk_bytes=chunk_bytes)

    def read_range(
        self, key: str, *, first_byte: int, last_byte: int, etag: str, chunk_bytes: int
    ) -> AsyncGenerator[bytes, None]:
        return reads.read_range(
            self._s3,
            key,
            first_byte=first_byte,
            last_byte=last_byte,
            etag=etag,
            chunk_bytes=chunk_bytes,
        )

    async def list_objects(self, prefix: str) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}

        async def page(kw: dict[str, Any]) -> dict[str, Any]:
            r: dict[str, Any] = await self._client.list_objects_v2(**kw)
            return r

        while True:
            r = await self._s3.call("list_objects_v2", functools.partial(page, dict(kwargs)))
            for o in r.get("Contents", []) or []:
                out.append(ObjectInfo(str(o["Key"]), int(o.get("Size", 0)), str(o.get("ETag", ""))))
            if not r.get("IsTruncated"):
                return out
            kwargs["ContinuationToken"] = r["NextContinuationToken"]
