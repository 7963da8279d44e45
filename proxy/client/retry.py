"""When to try again, and how long to wait: exponential backoff with jitter, bounded.

The budget is counted since the last *progress* (bytes the server confirmed), not since
the start: a flaky link that keeps moving an upload forward is never given up on, while
one that makes no progress for ``max_attempts`` tries or ``max_time_s`` seconds is.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass, field


class UploadError(Exception):
    """One file's upload failed.  ``retryable`` says whether trying again may help."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "ERR_CLIENT",
        status: int | None = None,
        retryable: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.retryable = retryable
        self.retry_after_s = retry_after_s


def retry_after_s(value: str | None, now_s: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None if unusable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "\u00b2".isdigit() is true too
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now_s is None else now_s))


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 10
    max_time_s: float = 300.0
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.max_time_s < 0 or self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError("retry delays must be >= 0 and max_delay_s >= base_delay_s")


@dataclass
class Backoff:
    """The retry state of one file."""

    policy: RetryPolicy
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0  # consecutive, since the last progress
    attempts: int = 1  # requests that carried (or would carry) the body, for reports
    _since_s: float = field(default_factory=time.monotonic)

    def progressed(self) -> None:
        self.failures = 0
        self._since_s = time.monotonic()

    def next_delay_s(self, error: UploadError) -> float | None:
        """Seconds to wait before the next try, or None when the budget is spent."""
        if not error.retryable:
            return None
        self.failures += 1
        if self.failures >= self.policy.max_attempts:
            return None
        exp = min(self.policy.max_delay_s, self.policy.base_delay_s * 2 ** (self.failures - 1))
        # "Equal jitter": at least half the exponential delay, so clients that failed
        # together (a restarted proxy) spread out without any of them hammering it.
        delay: float = exp / 2 + self.rng.uniform(0, exp / 2)
        if error.retry_after_s is not None:
            # The server knows best when it has room again; never retry earlier than asked.
            delay = max(delay, min(error.retry_after_s, self.policy.max_time_s))
        if time.monotonic() - self._since_s + delay > self.policy.max_time_s:
            return None
        self.attempts += 1
        return delay
