"""What the upload paths call: :class:`Hooks`.

* :meth:`Hooks.blocking` (``pre-create``, ``pre-finish``): one attempt within
  ``timeout_s``; the reply can refuse the upload (:class:`~proxy.errors.HookRejected`) or,
  for pre-create, change its key and metadata.  A receiver that does not answer refuses
  it too (:class:`~proxy.errors.HookUnavailable`, 503): an unchecked upload must not pass
  for a checked one.
* :meth:`Hooks.record_finish` (``post-finish``): recorded in the :class:`~.outbox.Outbox`
  before the success answer, then delivered in the background until acknowledged.
* :meth:`Hooks.notify` (everything else): in the background, retried with backoff a few
  times (``NOTIFY_ATTEMPTS``) and then dropped with a WARNING.  These are not kept
  across a restart: only post-finish is worth the S3 writes.

Every event type not in ``hooks.events`` costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Coroutine, Iterable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy.config import HOOK_EVENTS, HooksConfig
from proxy.errors import HookRejected, HookUnavailable, ProxyError
from proxy.hooks.outbox import Outbox
from proxy.hooks.payload import (
    GO_ON,
    NO_REQUEST,
    HookReply,
    HookRequest,
    HookUpload,
    Reason,
    event_body,
    finish_event_id,
    new_event_id,
)
from proxy.hooks.transports import ExecTransport, HookFailed, HttpTransport, Transport
from proxy.obs.observer import StreamObserver

log = logging.getLogger(__name__)

NOTIFY_ATTEMPTS = 5
MAX_BACKGROUND = 1000  # notifications in flight; beyond, new ones are dropped (counted)


class HookMetrics:
    """Per event type and transport: both small fixed sets."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.invocations = Counter(
            "proxy_hook_invocations",
            "Hook deliveries attempted.",
            ("event", "transport"),
            registry=registry,
        )
        self.failures = Counter(
            "proxy_hook_failures",
            "Hook deliveries the receiver did not acknowledge (timeout, error, refusal).",
            ("event", "transport"),
            registry=registry,
        )
        self.seconds = Histogram(
            "proxy_hook_seconds",
            "Time a hook delivery took, acknowledged or not.",
            ("event", "transport"),
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.dropped = Counter(
            "proxy_hook_dropped",
            "Non-durable hook events given up on (retries spent, or too many in flight).",
            ("event",),
            registry=registry,
        )
        self.outbox_depth = Gauge(
            "proxy_hook_outbox_depth",
            "post-finish events in the bucket's outbox at the last listing (all instances').",
            registry=registry,
        )

    def prime(self, transport: str) -> None:
        for event in HOOK_EVENTS:
            self.invocations.labels(event, transport)
            self.failures.labels(event, transport)
            self.dropped.labels(event)


@dataclass(eq=False)
class Hooks:
    """Upload events to the configured receiver (none: every call is a no-op)."""

    config: HooksConfig
    _: KW_ONLY
    bucket: str
    transport: Transport | None
    outbox: Outbox | None
    metrics: HookMetrics | None
    events: frozenset[str] = field(init=False)
    _background: set[asyncio.Task[None]] = field(init=False, default_factory=set)
    _kick: asyncio.Event = field(init=False, default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.events = frozenset(self.config.events) if self.transport is not None else frozenset()
        if self.metrics is not None and self.transport is not None:
            self.metrics.prime(self.transport.name)

    @classmethod
    def disabled(cls) -> Hooks:
        return cls(HooksConfig(), bucket="", transport=None, outbox=None, metrics=None)

    @classmethod
    def build(
        cls, config: HooksConfig, *, bucket: str, outbox: Outbox | None, registry: CollectorRegistry
    ) -> Hooks:
        transport: Transport | None = None
        if config.http_url:
            transport = HttpTransport(config.http_url, config.http_secret, config.timeout_s)
        elif config.exec_path:
            transport = ExecTransport(config.exec_path, config.timeout_s)
        return cls(
            config, bucket=bucket, transport=transport, outbox=outbox, metrics=HookMetrics(registry)
        )

    def wants(self, event_type: str) -> bool:
        return event_type in self.events

    # -- sending ---------------------------------------------------------------------------

    async def _send(self, event_type: str, event_id: str, body: bytes) -> HookReply:
        assert self.transport is not None
        started = time.monotonic()
        name = self.transport.name
        try:
            return await self.transport.send(event_type, event_id, body)
        except BaseException:
            if self.metrics is not None:
                self.metrics.failures.labels(event_type, name).inc()
            raise
        finally:
            if self.metrics is not None:
                self.metrics.invocations.labels(event_type, name).inc()
                self.metrics.seconds.labels(event_type, name).observe(time.monotonic() - started)

    async def _ack(self, event_type: str, event_id: str, body: bytes) -> None:
        await self._send(event_type, event_id, body)

    # -- blocking ----------------------------------------------------------------------------

    async def blocking(
        self, event_type: str, upload: HookUpload, request: HookRequest = NO_REQUEST
    ) -> HookReply:
        """Ask the receiver; raise when it refuses or does not answer."""
        if not self.wants(event_type):
            return GO_ON
        event_id = new_event_id()
        body = event_body(event_type, event_id, upload, bucket=self.bucket, request=request)
        try:
            reply = await self._send(event_type, event_id, body)
        except HookFailed as e:
            log.warning("hook %s upload=%s: %s; refusing the upload", event_type, upload.id, e)
            raise HookUnavailable(
                f"the {event_type} hook did not answer; try again later",
                headers={"Retry-After": "10"},
            ) from None
        if reply.reject:
            raise HookRejected(
                reply.message or f"the upload was refused by the {event_type} hook",
                status=reply.status or HookRejected.status,
            )
        return reply

    # -- durable: post-finish --------------------------------------------------------------------

    async def record_finish(self, upload: HookUpload, request: HookRequest = NO_REQUEST) -> None:
        """Keep the upload's post-finish in the outbox (raises if the store refuses: the
        caller must not answer success then), and deliver it in the background."""
        if not self.wants("post-finish") or self.outbox is None:
            return
        event_id = finish_event_id(upload)
        body = event_body("post-finish", event_id, upload, bucket=self.bucket, request=request)
        await self.outbox.record(event_id, "post-finish", body)
        self._spawn(self._deliver_recorded(event_id))

    async def _deliver_recorded(self, event_id: str) -> None:
        assert self.outbox is not None
        try:
            if not await self.outbox.deliver(event_id, self._ack):
                self._kick.set()  # failed: the loop retries it when due
        except ProxyError as e:
            log.warning("hook outbox: %s: %s", event_id, e)

    async def run_outbox(self) -> None:
        """Deliver what is due, every ``outbox_poll_interval_s`` (at start-up too: what a
        previous run, or another instance, left)."""
        if self.outbox is None or not self.wants("post-finish"):
            return
        interval = self.config.outbox_poll_interval_s
        while True:
            try:
                await self.outbox.deliver_due(self._ack)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("hook outbox run failed: %s", e)
            if self.metrics is not None:
                self.metrics.outbox_depth.set(self.outbox.depth)
            self._kick.clear()
            try:
                await asyncio.wait_for(self._kick.wait(), interval)
                # Something failed just now: give the receiver a moment before the listing.
                await asyncio.sleep(min(interval, 1.0))
            except TimeoutError:
                pass

    # -- fire and forget -------------------------------------------------------------------------

    def notify(
        self,
        event_type: str,
        upload: HookUpload,
        request: HookRequest = NO_REQUEST,
        reason: Reason | None = None,
    ) -> None:
        if not self.wants(event_type):
            return
        if len(self._background) >= MAX_BACKGROUND:
            log.warning("hook %s upload=%s dropped: too many in flight", event_type, upload.id)
            if self.metrics is not None:
                self.metrics.dropped.labels(event_type).inc()
            return
        event_id = new_event_id()
        body = event_body(
            event_type, event_id, upload, bucket=self.bucket, request=request, reason=reason
        )
        self._spawn(self._notify(event_type, event_id, body, upload.id))

    async def _notify(self, event_type: str, event_id: str, body: bytes, upload_id: str) -> None:
        delay = 0.5
        for attempt in range(1, NOTIFY_ATTEMPTS + 1):
            try:
                await self._send(event_type, event_id, body)
                return
            except HookFailed as e:
                if attempt == NOTIFY_ATTEMPTS:
                    log.warning(
                        "hook %s upload=%s event=%s dropped after %d attempts: %s",
                        event_type, upload_id, event_id, attempt, e,
                    )  # fmt: skip
                    if self.metrics is not None:
                        self.metrics.dropped.labels(event_type).inc()
                    return
            await asyncio.sleep(min(delay, self.config.retry_max_delay_s) * (0.5 + random.random()))
            delay *= 2

    def progress(self, upload: HookUpload, observer: StreamObserver) -> StreamObserver:
        """``observer`` that also sends ``post-receive`` at most every
        ``progress_interval_s`` while the body streams."""
        if not self.wants("post-receive"):
            return observer
        return _Progress(self, upload, observer)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Let background deliveries finish within ``timeout_s`` (the outbox keeps the
        ones that matter), then close the transport."""
        pending: Iterable[asyncio.Task[None]] = list(self._background)
        if pending:
            _, left = await asyncio.wait(pending, timeout=self.config.timeout_s)
            for task in left:
                task.cancel()
        if self.transport is not None:
            await self.transport.close()


class _Progress:
    def __init__(self, hooks: Hooks, upload: HookUpload, inner: StreamObserver) -> None:
        self._hooks = hooks
        self._upload = upload
        self._inner = inner
        self._offset = upload.offset
        self._last = time.monotonic()

    def received(self, nbytes: int) -> None:
        self._inner.received(nbytes)
        self._offset += nbytes
        now = time.monotonic()
        if now - self._last >= self._hooks.config.progress_interval_s:
            self._last = now
            u = self._upload
            self._hooks.notify(
                "post-receive",
                HookUpload(u.protocol, u.id, u.key, u.size, self._offset, u.metadata,
                           principal=u.principal),
            )  # fmt: skip

    def hashed(self, nbytes: int, seconds: float) -> None:
        self._inner.hashed(nbytes, seconds)

    def stored(self, nbytes: int) -> None:
        self._inner.stored(nbytes)
