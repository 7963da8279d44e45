"""An in-memory storage for back-pressure and cancellation unit tests (behaviour tests use S3)."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime

from proxy.errors import ConditionFailed
from proxy.storage.base import (
    Body,
    CompletedPart,
    ObjectInfo,
    OpenMultipart,
    PartChecksum,
    Pieces,
)

# start_proxy() sections for a proxy on GatedStorage: a core Storage without the state
# store capability tus needs, so tus is off (the app refuses to start it there).
NO_TUS = {"tus": {"enabled": False}}


def sha256_of(body: Body) -> bytes:
    """SHA-256 of a body, also when it comes in pieces (no join)."""
    h = hashlib.sha256()
    for piece in body.views if isinstance(body, Pieces) else (body,):
        h.update(piece)
    return h.digest()


class GatedStorage:
    """Keeps a running SHA-256 per upload instead of the bytes; ``gate`` holds every part."""

    def __init__(self) -> None:
        self.bucket = "fake"
        self.gate = asyncio.Event()
        self.gate.set()
        self.parts: dict[str, dict[int, tuple[int, bytes]]] = {}
        self.objects: dict[str, ObjectInfo] = {}
        self.aborted: list[str] = []
        self.sending = 0
        self.max_sending = 0
        self._ids = 0

    async def check(self) -> None:
        pass

    async def head(self, key: str) -> ObjectInfo | None:
        return self.objects.get(key)

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
        await self.gate.wait()
        self.objects[key] = ObjectInfo(key, len(body), "etag", content_type, dict(metadata))
        return "etag"

    async def create_multipart(
        self, key: str, *, metadata: dict[str, str], content_type: str
    ) -> str:
        self._ids += 1
        uid = f"u{self._ids}"
        self.parts[uid] = {}
        return uid

    async def upload_part(
        self, key: str, upload_id: str, number: int, body: Body, checksum: PartChecksum | None
    ) -> str:
        self.sending += 1
        self.max_sending = max(self.max_sending, self.sending)
        try:
            await self.gate.wait()
            await asyncio.sleep(0)
            self.parts[upload_id][number] = (len(body), sha256_of(body))
        finally:
            self.sending -= 1
        return f"e{number}"

    async def complete_multipart(
        self,
        key: str,
        upload_id: str,
        parts: list[CompletedPart],
        *,
        if_none_match: bool,
        size_bytes: int | None = None,
    ) -> str:
        size = sum(self.parts[upload_id][p.number][0] for p in parts)
        del self.parts[upload_id]
        self.objects[key] = ObjectInfo(key, size, "etag-mp")
        return "etag-mp"

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        self.aborted.append(upload_id)
        self.parts.pop(upload_id, None)

    async def replace_metadata(
        self, key: str, *, etag: str, size: int, metadata: dict[str, str], content_type: str
    ) -> None:
        info = self.objects[key]
        self.objects[key] = ObjectInfo(key, info.size, info.etag, content_type, dict(metadata))

    async def delete_object(self, key: str, *, if_match: str | None = None) -> None:
        if if_match is not None and (key not in self.objects or self.objects[key].etag != if_match):
            raise ConditionFailed(f"{key} is not the object it was")
        self.objects.pop(key, None)

    async def list_multipart(self, prefix: str = "") -> list[OpenMultipart]:
        return [OpenMultipart("?", uid, datetime.now(UTC)) for uid in self.parts]
