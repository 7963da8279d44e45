"""Prometheus metrics: one :class:`Metrics` object over an injected ``CollectorRegistry``.

A leaf module: it imports nothing of ours.  What it needs from the pool, the
memory monitor and the readiness probe it describes as small protocols and reads
at scrape time, so gauges are never stale and nothing has to push updates.

Labels are bounded: ``reason`` comes from a fixed list (anything else is filed
under ``other``), ``operation`` from the storage backend's fixed set of calls, and
``slot`` on the ``proxy_active_upload_*`` series is a number below
``live_uploads_max``: a running upload takes the lowest free slot and gives it back
when it ends (uploads beyond that many have no live series).  No label carries an
upload id, a key or anything derived from them: a tus id in a label would be a
credential (with auth off, the id alone lets anyone continue or delete the upload),
and ``/metrics`` may be served to a scraper on another machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.obs.memory import MemoryState

T = TypeVar("T")

KiB = 1024
SIZE_BUCKETS_BYTES = tuple(float(KiB * 4**i) for i in range(14))  # 1 KiB .. 64 GiB
UPLOAD_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
HASH_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
STORAGE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OTHER_REASON = "other"
DEDUP_PROTOCOLS = ("http", "tus")
DEDUP_LOOKUPS = ("hit", "miss", "stale")
DOWNLOAD_ROUTES = ("uploads", "files")
# full / partial (206) / head / not_modified: answered; refused: an error answer before
# the body; broken: the body was cut (client gone or stalled, store broke off).
DOWNLOAD_OUTCOMES = ("full", "partial", "head", "not_modified", "refused", "broken")


class UploadProgress:
    """One running upload: the stream observer of its body, and what /status shows of it."""

    __slots__ = (
        "_metrics",
        "key",
        "received_bytes",
        "slot",
        "started",
        "started_unix",
        "stored_bytes",
        "upload_id",
    )

    def __init__(self, metrics: Metrics, upload_id: str, key: str) -> None:
        self._metrics = metrics
        self.upload_id = upload_id
        self.key = key
        self.slot: int | None = None  # the live series' label, while it holds one
        self.started = metrics.clock()
        self.started_unix = time.time()
        self.received_bytes = 0
        self.stored_bytes = 0

    def received(self, nbytes: int) -> None:
        self.received_bytes += nbytes
        self._metrics.received_bytes.inc(nbytes)

    def hashed(self, nbytes: int, seconds: float) -> None:
        self._metrics.hashed_bytes.inc(nbytes)
        self._metrics.hash_seconds.observe(seconds)

    def stored(self, nbytes: int) -> None:
        self.stored_bytes += nbytes
        self._metrics.stored_bytes.inc(nbytes)

    def age_s(self) -> float:
        return self._metrics.clock() - self.started


class Metrics:
    """Every metric the proxy exports, registered on ``registry``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        reasons: Iterable[str],
        live_uploads_max: int,
        version: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if live_uploads_max < 0:
            raise ValueError("live_uploads_max must be >= 0")
        self.registry = registry
        self.clock = clock
        self.live_uploads_max = live_uploads_max
        self.reasons = frozenset(reasons) | {OTHER_REASON}
        self._active: dict[str, UploadProgress] = {}
        self._slots: list[UploadProgress | None] = [None] * live_uploads_max
        self._pool: object | None = None
        self._listeners: dict[str, object] = {}
        self._memory: Callable[[], MemoryState | None] = lambda: None
        self._ready: Callable[[], bool | None] = lambda: None

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def histogram(
            name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()
        ) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        self.received_bytes = counter("proxy_received_bytes", "Upload body bytes received.")
        self.stored_bytes = counter("proxy_stored_bytes", "Upload body bytes stored to S3.")
        self.hashed_bytes = counter("proxy_hashed_bytes", "Upload body bytes hashed.")
        self.started = counter("proxy_uploads_started", "Uploads whose body streaming began.")
        self.completed = counter("proxy_uploads_completed", "Uploads stored as an object.")
        self.failed = counter(
            "proxy_uploads_failed", "Uploads that began streaming and failed.", ("reason",)
        )
        self.rejected = counter(
            "proxy_uploads_rejected",
            "Upload requests refused before any body byte was read.",
            ("reason",),
        )
        self.dedup_uploads = counter(
            "proxy_dedup_uploads",
            "Uploads stored by server-side copy of content already stored (instant uploads).",
            ("protocol",),
        )
        self.dedup_saved_bytes = counter(
            "proxy_dedup_saved_bytes",
            "Body bytes instant uploads did not transfer.",
            ("protocol",),
        )
        self.dedup_lookups = counter(
            "proxy_dedup_lookups",
            "Content index lookups by result (hit, miss, stale: the entry was dropped).",
            ("result",),
        )
        # Downloads: route is "uploads" or "files", outcome one of DOWNLOAD_OUTCOMES.
        self.download_bytes = counter(
            "proxy_download_bytes", "Object bytes sent to downloading clients.", ("route",)
        )
        self.downloads = counter(
            "proxy_downloads", "Download requests by route and outcome.", ("route", "outcome")
        )
        self.storage_errors = counter(
            "proxy_storage_errors", "Failed S3 request attempts.", ("operation",)
        )
        self.upload_size = histogram(
            "proxy_upload_size_bytes", "Size of stored objects.", SIZE_BUCKETS_BYTES
        )
        self.upload_seconds = histogram(
            "proxy_upload_duration_seconds",
            "Time from the first body byte to the outcome.",
            UPLOAD_BUCKETS_S,
            ("outcome",),
        )
        self.hash_seconds = histogram(
            "proxy_hash_duration_seconds", "Time spent hashing one part.", HASH_BUCKETS_S
        )
        self.storage_seconds = histogram(
            "proxy_storage_request_duration_seconds",
            "Time of one S3 request attempt, failed ones included.",
            STORAGE_BUCKETS_S,
            ("operation",),
        )
        # Every reason and outcome exists from the start, so rate() sees the first failure.
        for reason in sorted(self.reasons):
            self.failed.labels(reason)
            self.rejected.labels(reason)
        for outcome in ("completed", "failed"):
            self.upload_seconds.labels(outcome)
        for protocol in DEDUP_PROTOCOLS:
            self.dedup_uploads.labels(protocol)
            self.dedup_saved_bytes.labels(protocol)
        for result in DEDUP_LOOKUPS:
            self.dedup_lookups.labels(result)
        for route in DOWNLOAD_ROUTES:
            self.download_bytes.labels(route)
            for outcome in DOWNLOAD_OUTCOMES:
                self.downloads.labels(route, outcome)
        Info("proxy_build", "Version of the running proxy.", registry=registry).info(
            {"version": version}
        )
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        registry.register(_Sampled(self))

    def bind_pool(self, pool: object) -> None:
        """The part-buffer pool (:class:`proxy.engine.buffers.BufferPool`): it must have
        every attribute _POOL_GAUGES reads (checked here, not at the first scrape)."""
        self._pool = _having(pool, _POOL_GAUGES)

    def bind_listener(self, name: str, listener: object) -> None:
        """A listener's connection guard (:class:`proxy.web.conn.ConnectionGuard`), with
        the attributes _LISTENER_SERIES reads.  ``name`` is a label value: one of a fixed
        few ("main", "metrics")."""
        self._listeners[name] = _having(listener, _LISTENER_SERIES)

    def bind_memory(self, source: Callable[[], MemoryState | None]) -> None:
        self._memory = source

    def bind_ready(self, source: Callable[[], bool | None]) -> None:
        self._ready = source

    def _reason(self, reason: str) -> str:
        return reason if reason in self.reasons else OTHER_REASON

    def _track(self, upload_id: str, key: str) -> UploadProgress:
        self._untrack(upload_id)
        progress = UploadProgress(self, upload_id, key)
        self._active[upload_id] = progress
        for n, holder in enumerate(self._slots):
            if holder is None:
                self._slots[n], progress.slot = progress, n
                break
        return progress

    def _untrack(self, upload_id: str) -> None:
        progress = self._active.pop(upload_id, None)
        if progress is not None and progress.slot is not None:
            self._slots[progress.slot] = None

    def upload_started(self, upload_id: str, key: str) -> UploadProgress:
        progress = self._track(upload_id, key)
        self.started.inc()
        return progress

    def upload_created(self) -> None:
        """An upload that will arrive over several requests (tus) was created: it counts as
        started now, and as completed when its last PATCH completes it."""
        self.started.inc()

    def transfer_started(self, upload_id: str, key: str) -> UploadProgress:
        """A body that is one piece of an upload (a tus PATCH): live progress and byte
        counters, but not counted as an upload of its own."""
        return self._track(upload_id, key)

    def transfer_finished(self, upload_id: str) -> None:
        self._untrack(upload_id)

    def upload_finished(
        self, upload_id: str, *, reason: str | None, seconds: float, size_bytes: int
    ) -> None:
        """``reason`` None means the object was stored."""
        self._untrack(upload_id)
        if reason is None:
            self.completed.inc()
            self.upload_size.observe(size_bytes)
            self.upload_seconds.labels("completed").observe(seconds)
        else:
            self.failed.labels(self._reason(reason)).inc()
            self.upload_seconds.labels("failed").observe(seconds)

    def deduplicated(self, protocol: str, size_bytes: int) -> None:
        """An upload was stored by copy: ``size_bytes`` never crossed the network."""
        label = protocol if protocol in DEDUP_PROTOCOLS else OTHER_REASON
        self.dedup_uploads.labels(label).inc()
        self.dedup_saved_bytes.labels(label).inc(size_bytes)

    def dedup_lookup(self, result: str) -> None:
        self.dedup_lookups.labels(result if result in DEDUP_LOOKUPS else OTHER_REASON).inc()

    def upload_rejected(self, reason: str) -> None:
        self.rejected.labels(self._reason(reason)).inc()

    def storage_op(self, operation: str, seconds: float, error: str | None) -> None:
        """The storage backend's ``OpObserver``: one call per S3 request attempt."""
        self.storage_seconds.labels(operation).observe(seconds)
        if error is not None:
            self.storage_errors.labels(operation).inc()

    def active(self) -> list[UploadProgress]:
        """Running uploads, oldest first."""
        return list(self._active.values())

    def collect_sampled(self) -> Iterator[Metric]:
        active = self.active()
        yield GaugeMetricFamily("proxy_uploads_in_flight", "Uploads streaming now.", len(active))
        yield from _live_series([u for u in self._slots if u is not None])
        if self._pool is not None:
            yield from _gauges(_POOL_GAUGES, self._pool)
        if self._listeners:
            yield from _listener_series(self._listeners)
        memory = self._memory()
        if memory is not None:
            yield from _gauges(_MEMORY_GAUGES, memory)
        ready = self._ready()
        if ready is not None:
            yield GaugeMetricFamily(
                "proxy_ready", "1 when the last readiness check passed, else 0.", int(ready)
            )


def _live_series(uploads: list[UploadProgress]) -> Iterator[Metric]:
    received = CounterMetricFamily(
        "proxy_active_upload_received_bytes",
        "Body bytes received so far by the upload running in a slot (gone once it ends).",
        labels=["slot"],
    )
    stored = CounterMetricFamily(
        "proxy_active_upload_stored_bytes",
        "Body bytes stored so far by the upload running in a slot (gone once it ends).",
        labels=["slot"],
    )
    start = GaugeMetricFamily(
        "proxy_active_upload_start_time_seconds",
        "Unix time the upload running in a slot began (a new value: another upload).",
        labels=["slot"],
    )
    for u in uploads:
        slot = [str(u.slot)]
        received.add_metric(slot, u.received_bytes)
        stored.add_metric(slot, u.stored_bytes)
        start.add_metric(slot, u.started_unix)
    yield from (received, stored, start)


def _listener_series(listeners: dict[str, object]) -> Iterator[Metric]:
    for family, name, attribute, doc in _LISTENER_SERIES:
        metric = family(name, doc, labels=["listener"])
        for label, guard in listeners.items():
            metric.add_metric([label], getattr(guard, attribute))
        yield metric


# (kind, name, attribute of each bound listener, help), one series per listener.
_LISTENER_SERIES: tuple[
    tuple[type[GaugeMetricFamily | CounterMetricFamily], str, str, str], ...
] = (
    (GaugeMetricFamily, "proxy_connections_open", "open", "Open connections on a listener."),
    (
        CounterMetricFamily,
        "proxy_connections_refused",
        "refused_total",
        "Connections answered 503 and closed: the listener had max_connections open.",
    ),
    (
        CounterMetricFamily,
        "proxy_connections_header_timeouts",
        "header_timeouts_total",
        "Connections closed because their first request's headers took over header_timeout_s.",
    ),
)


# (name, attribute of the bound object, help); a None attribute leaves the series out.
_POOL_GAUGES = (
    ("proxy_buffer_pool_in_use_bytes", "in_use_bytes", "Part-buffer bytes leased now."),
    ("proxy_buffer_pool_budget_bytes", "budget_bytes", "Cap on part-buffer bytes."),
    ("proxy_buffer_pool_idle_bytes", "idle_bytes", "Free part buffers kept for reuse."),
    ("proxy_buffer_pool_peak_in_use_bytes", "peak_in_use_bytes", "Most bytes ever leased."),
    ("proxy_buffer_pool_waiting", "waiting", "Requests waiting for a part buffer."),
)
_MEMORY_GAUGES = (
    (
        "proxy_memory_rss_bytes",
        "rss_bytes",
        "Resident memory of the daemon process (not the embedded store).",
    ),
    (
        "proxy_memory_peak_rss_bytes",
        "peak_rss_bytes",
        "Highest resident memory of the daemon process (not the embedded store).",
    ),
    ("proxy_memory_system_total_bytes", "system_total_bytes", "Physical memory."),
    (
        "proxy_memory_system_available_bytes",
        "system_available_bytes",
        "Memory the machine can still hand out without swapping.",
    ),
    ("proxy_memory_cgroup_limit_bytes", "cgroup_limit_bytes", "cgroup v2 memory.max."),
    (
        "proxy_memory_cgroup_usage_bytes",
        "cgroup_usage_bytes",
        "cgroup v2 memory.current less inactive page cache: daemon and embedded store.",
    ),
    (
        "proxy_memory_limit_bytes",
        "limit_bytes",
        "Effective memory limit: the smallest of config, cgroup and physical RAM.",
    ),
    (
        "proxy_memory_used_ratio",
        "used_ratio",
        "Usage over limit for the limit closest to being reached.",
    ),
    (
        "proxy_memory_pressure_level",
        "level",
        "Memory pressure: 0 normal, 1 warning, 2 critical (new uploads refused).",
    ),
)


def _having(source: T, table: tuple[tuple[Any, ...], ...]) -> T:
    """``source``, once it is checked to have every attribute ``table`` reads (a row's
    second-to-last item): a renamed attribute fails at start-up, not at a scrape."""
    missing = [row[-2] for row in table if not hasattr(source, row[-2])]
    if missing:
        raise TypeError(f"{type(source).__name__} lacks {', '.join(missing)}")
    return source


def _gauges(table: tuple[tuple[str, str, str], ...], source: object) -> Iterator[Metric]:
    for name, attribute, doc in table:
        value = getattr(source, attribute)
        if value is not None:
            yield GaugeMetricFamily(name, doc, value)


class _Sampled(Collector):
    """Series read at scrape time from the live objects."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics.collect_sampled()

    def describe(self) -> Iterable[Metric]:
        # Described as empty: the set of series depends on what is bound and running.
        return []
