"""Server-side copies: the store copies, no byte of the object passes through the daemon.

Two uses: :meth:`~proxy.storage.s3.S3Storage.replace_metadata` relabels an object in
place (CopyObject onto itself; above CopyObject's 5 GiB limit a multipart copy), and
:meth:`~proxy.storage.s3.S3Storage.copy_object` copies one key to another (instant
uploads), always as a multipart copy: UploadPartCopy of ranges of the source, then a
completion that can be create-only.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from proxy.storage.base import CompletedPart
from proxy.storage.s3.calls import S3Calls

if TYPE_CHECKING:
    from proxy.storage.s3.store import S3Storage

# S3 refuses CopyObject above 5 GiB; bigger objects get their metadata by a
# server-side multipart copy (UploadPartCopy), which moves no bytes through us.
MAX_COPY_BYTES = 5 * 1024**3
COPY_PART_BYTES = 1024**3


async def copy_in_place(
    s3: S3Calls, key: str, *, etag: str, metadata: dict[str, str], content_type: str
) -> None:
    """CopyObject of ``key`` onto itself with new metadata, if it still has ``etag``."""
    await s3.call(
        "copy_object",
        lambda: s3.client.copy_object(
            Bucket=s3.bucket,
            Key=key,
            CopySource={"Bucket": s3.bucket, "Key": key},
            CopySourceIfMatch=etag,
            MetadataDirective="REPLACE",
            Metadata=metadata,
            ContentType=content_type,
        ),
    )


async def multipart_copy(
    store: S3Storage,
    source: str,
    key: str,
    *,
    etag: str,
    size: int,
    part_bytes: int,
    metadata: dict[str, str],
    content_type: str,
    if_none_match: bool = False,
) -> str:
    """``source`` (as long as it has ``etag``) copied to ``key`` in ranges of
    ``part_bytes``; the new object's ETag.  Through the store's own multipart calls, so
    the completion queues and recovers like any other (and a failure aborts)."""
    upload_id = await store.create_multipart(key, metadata=metadata, content_type=content_type)
    try:
        parts: list[CompletedPart] = []
        for number, start in enumerate(range(0, size, part_bytes), start=1):
            end = min(start + part_bytes, size) - 1
            part_etag = await store.copy_part(
                key, upload_id, number, source=source, source_etag=etag,
                first_byte=start, last_byte=end,
            )  # fmt: skip
            parts.append(CompletedPart(number, part_etag))
        return await store.complete_multipart(
            key, upload_id, parts, if_none_match=if_none_match, size_bytes=size
        )
    except BaseException:
        await asyncio.shield(store.abort_multipart(key, upload_id))
        raise
