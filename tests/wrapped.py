"""Fault injection above the storage interface: a Storage that delegates every call to the
real S3Storage, and lets a test replace the calls it wants to fail, delay or count."""

from __future__ import annotations

from collections import Counter
from typing import Any

from proxy.storage.s3 import S3Storage


class Wrapped:
    """Every Storage call goes to ``inner`` unless a subclass (or a test) overrides it;
    ``calls`` counts the overridden ones a subclass chooses to count."""

    def __init__(self, inner: S3Storage) -> None:
        self.inner = inner
        self.bucket = inner.bucket
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Multiparts(Wrapped):
    """Records the multipart uploads the daemon creates and aborts, so that a test
    asserting "nothing is left" also proves there was something to leave: it cannot pass
    on a handler that never started a multipart upload."""

    def __init__(self, inner: S3Storage) -> None:
        super().__init__(inner)
        self.created: list[tuple[str, str]] = []
        self.aborted: list[tuple[str, str]] = []

    async def create_multipart(self, key: str, **kw: Any) -> str:
        upload_id: str = await self.inner.create_multipart(key, **kw)
        self.created.append((key, upload_id))
        return upload_id

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        await self.inner.abort_multipart(key, upload_id)
        self.aborted.append((key, upload_id))

    def assert_all_aborted(self) -> None:
        """At least one multipart upload was created, and every one was aborted."""
        assert self.created, "no multipart upload was ever created: nothing to prove"
        assert sorted(self.aborted) == sorted(self.created), (self.created, self.aborted)
