"""How one S3 call is made: retried with bounded, jittered backoff, every failure translated.

botocore's own retries are off (``total_max_attempts=1``, :mod:`proxy.storage.s3.store`):
they would re-send the body from a stream it cannot rewind (our memoryviews), and we
want one retry policy with backoff whose total time is bounded.  Everything botocore
(or aiohttp under it) raises is translated here into :mod:`proxy.errors` (:func:`classify`);
nothing above this package sees it.

Who sends a request again (found with the fault proxy of ``tests/faultproxy.py``):

* botocore: never (above);
* aiohttp, under aiobotocore: once, at once, a request whose method it deems
  idempotent (GET, HEAD, PUT, DELETE: so PutObject, UploadPart, CopyObject,
  UploadPartCopy, DeleteObject and the tus state writes, not the POSTs
  CreateMultipartUpload and CompleteMultipartUpload) whose connection broke before the
  answer came (reset or closed: ``ClientOSError``, ``ServerDisconnectedError``; not a
  timeout), fresh connection or reused.  It re-sends our payload as it is (it can: our
  pieces are not consumed by a send);
* :meth:`S3Calls.call`: up to ``retry_attempts`` attempts with jittered backoff.

So one attempt of ours may reach S3 twice, and a refusal can be the answer to our own
first request that S3 carried out and whose answer was lost: a create-only write gets
"precondition failed" on what we count as the first attempt.  Every write that can be
refused that way checks, on a refusal, whether S3 holds exactly what we sent
(``recover`` in :meth:`S3Calls.call`, the body comparison in
:meth:`~proxy.storage.s3.S3Storage.put_conditional`), whatever the attempt number.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from proxy.errors import (
    ObjectExists,
    ProxyError,
    StorageCredentials,
    StorageError,
    StorageUnavailable,
)
from proxy.storage.base import OpObserver

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
        "OperationAborted",
    }
)
MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


class Transient(Exception):
    """An attempt failed in a way that another attempt may fix."""

    def __init__(self, code: str, *, answered: bool = False) -> None:
        super().__init__(code)
        self.code = code
        self.answered = answered  # the store itself said so (5xx), not the network


class StoreFailing(StorageUnavailable):
    """Every attempt was answered by the store with a server error (not a network failure)."""


def classify(exc: BaseException) -> ProxyError | Transient:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "Unknown"))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
            return ObjectExists("an object with this key already exists")
        if code in TRANSIENT_CODES or status >= 500:
            return Transient(code, answered=True)
        return StorageError(f"storage refused the request ({code})")
    if isinstance(exc, NoCredentialsError):
        return StorageCredentials("no storage credentials configured")
    if isinstance(exc, BotoCoreError | aiohttp.ClientError | asyncio.TimeoutError | OSError):
        return Transient(type(exc).__name__)
    return StorageError(f"unexpected storage failure ({type(exc).__name__})")


def error_code(exc: ClientError) -> object:
    """The S3 error code of a refusal (``NoSuchKey``, ``NoSuchUpload``, "404", ...)."""
    return exc.response.get("Error", {}).get("Code")


class S3Calls:
    """One bucket through one aiobotocore client, and the one way to call it (:meth:`call`).

    :class:`~proxy.storage.s3.S3Storage` owns the client's lifecycle and sets
    :attr:`client` when it opens; the modules that make its calls (reads, copies) are
    handed this object rather than the storage itself."""

    def __init__(
        self, bucket: str, *, attempts: int, base_delay_s: float, observer: OpObserver | None
    ) -> None:
        if attempts < 1:
            raise ValueError("retry_attempts must be >= 1")
        self.bucket = bucket
        self.client: Any = None
        self.observer = observer
        self._attempts = attempts
        self._base_delay_s = base_delay_s

    async def call(
        self,
        op: str,
        fn: Callable[[], Awaitable[T]],
        recover: Callable[[], Awaitable[T | None]] | None = None,
    ) -> T:
        """Run one S3 operation with bounded, jittered retries; translate every failure.

        A request that timed out or lost its connection may still have been carried out.
        For operations that are not idempotent (a conditional PUT, CompleteMultipartUpload)
        the retry then fails ("precondition failed", "no such upload") although the work
        is done.  ``recover`` checks for that after a failed attempt and returns the
        result the lost answer would have carried, or None.  "Precondition failed" is
        checked on the first attempt too: aiohttp may have re-sent that attempt's PUT
        after its first answer was lost (see the module's docstring), and a real
        conflict costs one read more.
        """
        last = "unknown"
        answered = False
        for attempt in range(self._attempts):
            if attempt:
                delay = self._base_delay_s * (2 ** (attempt - 1))
                await asyncio.sleep(random.uniform(delay / 2, delay))
            started = time.monotonic()
            try:
                result = await fn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                outcome = classify(exc)
                self._observe(op, started, getattr(outcome, "code", "error"))
                if isinstance(outcome, ProxyError):
                    echo = attempt or isinstance(outcome, ObjectExists)
                    if echo and recover is not None and (done := await recover()) is not None:
                        log.warning("s3 %s: an earlier attempt had succeeded", op)
                        return done
                    raise outcome from exc
                last, answered = outcome.code, outcome.answered
                log.warning(
                    "s3 %s failed (%s), attempt %d/%d", op, last, attempt + 1, self._attempts
                )
                continue
            self._observe(op, started, None)
            return result
        if recover is not None:
            with contextlib.suppress(ProxyError):
                if (done := await recover()) is not None:
                    return done
        raise (StoreFailing if answered else StorageUnavailable)(
            f"storage did not answer {op} after {self._attempts} attempts ({last})",
            headers={"Retry-After": "5"},
        )

    def _observe(self, op: str, started: float, error: str | None) -> None:
        if self.observer is not None:
            self.observer(op, time.monotonic() - started, error)
