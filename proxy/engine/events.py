"""The one place an upload's outcome is reported, for every protocol.

Every upload request ends in exactly one report:

* :meth:`UploadEvents.rejected`: refused before any work on its body (authentication,
  headers, limits, the tus creation cap, an unknown or someone else's tus upload; also a
  tus PATCH whose body fails its Upload-Checksum: the PATCH is refused, the upload lives);
* :meth:`UploadEvents.started` then :meth:`UploadEvents.finished`: an upload, from its
  first body byte (a plain upload) or its creation (tus, :meth:`UploadEvents.created`) to
  its object, or to its failure (a plain upload's error; for tus the completion giving
  up, termination by the client, expiry).  The PATCHes of a tus upload in between are
  :meth:`UploadEvents.transfer` s: live progress and byte counters, not uploads.

``finished`` writes one log line, the same fields for every protocol (``protocol``, id,
key quoted, bytes, sha256, duration, rate, result, remote (the client's address), auth),
feeds the metrics and the status counters: so ``proxy_uploads_failed_total`` /
``_rejected_total`` and the alerts built on them see tus as they see PUT.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from proxy.errors import ProxyError, Terminated
from proxy.hooks.dispatch import Hooks
from proxy.hooks.payload import HookUpload, Reason
from proxy.obs.metrics import Metrics
from proxy.obs.observer import StreamObserver

log = logging.getLogger(__name__)

# Server-side failures are warnings; the client's own endings (and successes) are info.
_CLIENT_SIDE = frozenset(
    {"client_disconnect", "client_timeout", "terminated", "expired", "checksum_mismatch"}
)


@dataclass
class UploadStats:
    """Plain counters the status line (sd_notify) and /status can read."""

    received_bytes: int = 0
    completed: int = 0
    failed: int = 0


@dataclass(frozen=True)
class Outcome:
    """How one upload ended: ``error`` None means its object is stored."""

    protocol: str  # "http" (PUT, POST) or "tus"
    upload_id: str
    key: str
    size_bytes: int
    sha256: str | None
    seconds: float
    error: ProxyError | None = None
    client: str = "-"  # the client's address, "-" when the proxy itself ended it
    auth: str = "-"  # how the request authenticated: none, token, signed
    # For hooks: the object metadata and the principal (str of proxy.auth.Principal).
    metadata: dict[str, str] | None = None
    principal: str = "-"


class _Counting:
    """Adds received bytes to the status counters, then passes every event on."""

    def __init__(self, stats: UploadStats, inner: StreamObserver) -> None:
        self._stats = stats
        self._inner = inner

    def received(self, nbytes: int) -> None:
        self._stats.received_bytes += nbytes
        self._inner.received(nbytes)

    def hashed(self, nbytes: int, seconds: float) -> None:
        self._inner.hashed(nbytes, seconds)

    def stored(self, nbytes: int) -> None:
        self._inner.stored(nbytes)


class UploadEvents:
    """Reports outcomes into ``metrics``, ``stats`` and the log."""

    def __init__(self, metrics: Metrics, stats: UploadStats | None = None) -> None:
        self.metrics = metrics
        self.stats = stats or UploadStats()
        # Set by the app once the store is open: a failed upload's post-fail (or
        # post-terminate) goes from here.  post-finish does not: it must be durable before
        # the success answer, so the completing paths record it themselves.
        self.hooks = Hooks.disabled()

    def rejected(self, error: ProxyError) -> None:
        self.metrics.upload_rejected(error.reason)

    def started(self, upload_id: str, key: str) -> StreamObserver:
        """A one-request upload's body begins streaming; its observer."""
        return _Counting(self.stats, self.metrics.upload_started(upload_id, key))

    def created(self) -> None:
        """A multi-request upload (tus) was created: it counts as started now."""
        self.metrics.upload_created()

    @contextmanager
    def transfer(self, upload_id: str, key: str) -> Iterator[StreamObserver]:
        """One body of a multi-request upload (a tus PATCH): live progress, byte counters
        and the status line's byte count, without counting it as an upload."""
        try:
            yield _Counting(self.stats, self.metrics.transfer_started(upload_id, key))
        finally:
            self.metrics.transfer_finished(upload_id)

    def finished(self, outcome: Outcome) -> None:
        o, error = outcome, outcome.error
        result = "ok" if error is None else error.code
        if error is None:
            self.stats.completed += 1
        else:
            self.stats.failed += 1
        self.metrics.upload_finished(
            o.upload_id,
            reason=None if error is None else error.reason,
            seconds=o.seconds,
            size_bytes=o.size_bytes,
        )
        if error is not None:
            self._hook_failure(o, error)
        rate = o.size_bytes / o.seconds / 2**20 if o.seconds > 0 else 0.0
        level = logging.INFO
        if error is not None and error.reason not in _CLIENT_SIDE and error.status >= 500:
            level = logging.WARNING
        log.log(
            level,
            "upload id=%s key=%r bytes=%d sha256=%s duration_s=%.3f rate_mib_s=%.1f result=%s "
            "remote=%s auth=%s protocol=%s",
            o.upload_id,
            o.key,
            o.size_bytes,
            o.sha256 or "-",
            o.seconds,
            rate,
            result,
            o.client,
            o.auth,
            o.protocol,
            extra={
                "upload": {
                    "id": o.upload_id,
                    "key": o.key,
                    "bytes": o.size_bytes,
                    "sha256": o.sha256,
                    "duration_s": round(o.seconds, 3),
                    "rate_mib_s": round(rate, 2),
                    "result": result,
                    # "remote", as the JSON line has always named it (log queries use it).
                    "remote": o.client,
                    "auth": o.auth,
                    "protocol": o.protocol,
                }
            },
        )

    def _hook_failure(self, o: Outcome, error: ProxyError) -> None:
        upload = HookUpload(
            o.protocol, o.upload_id, o.key, None, o.size_bytes, o.metadata or {},
            principal=o.principal,
        )  # fmt: skip
        if isinstance(error, Terminated):
            self.hooks.notify("post-terminate", upload)
        else:
            self.hooks.notify("post-fail", upload, reason=Reason(error.code, error.message))


def auth_of(principal: str) -> str:
    """How the creator of a tus upload authenticated, from its recorded principal
    (``anonymous``, ``token:<ref>``, ``signed:<ref>``), as a plain upload logs it."""
    kind = principal.split(":", 1)[0]
    return "none" if kind == "anonymous" else kind
