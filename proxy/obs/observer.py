"""What a streaming body reports as it goes: the observer protocol every layer shares.

The engine feeds it (:class:`~proxy.engine.pipeline.PartPipeline`), metrics
(:class:`~proxy.obs.metrics.UploadProgress`), the outcome path's counters and the
``post-receive`` hook implement or wrap it.  It lives in this leaf so that the hooks can
wrap an observer without importing the engine, which calls the hooks (imports flow one
way: engine -> hooks -> leaves; ``.importlinter`` pins it).
"""

from __future__ import annotations

from typing import Protocol


class StreamObserver(Protocol):
    """Hooks for metrics and progress; every method must be cheap and must not raise."""

    def received(self, nbytes: int) -> None: ...
    def hashed(self, nbytes: int, seconds: float) -> None: ...
    def stored(self, nbytes: int) -> None: ...


class NullObserver:
    def received(self, nbytes: int) -> None:
        pass

    def hashed(self, nbytes: int, seconds: float) -> None:
        pass

    def stored(self, nbytes: int) -> None:
        pass
