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
