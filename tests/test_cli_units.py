"""The client's pure parts: backoff bounds, Retry-After, the line format, the resume store."""

from __future__ import annotations

import email.utils
import random
import time
from pathlib import Path

import pytest

from proxy.client.progress import line
from proxy.client.resume import ResumeStore, fingerprint
from proxy.client.retry import Backoff, RetryPolicy, UploadError, retry_after_s
from proxy.client.source import FileIdentity
from proxy.client.transfer import Options
from tests.cli_helpers import parse_line

NETWORK = UploadError("reset", code="ERR_NETWORK", retryable=True)


def test_backoff_grows_with_jitter_and_stops_after_max_attempts() -> None:
    b = Backoff(RetryPolicy(max_attempts=6, base_delay_s=1, max_delay_s=8), random.Random(1))
    delays = [b.next_delay_s(NETWORK) for _ in range(6)]
    assert delays[-1] is None  # the sixth failure in a row ends it
    caps = [1, 2, 4, 8, 8]
    for d, cap in zip(delays[:-1], caps, strict=True):
        assert d is not None and cap / 2 <= d <= cap
    assert b.attempts == 6


def test_progress_resets_the_budget_and_4xx_is_final() -> None:
    b = Backoff(RetryPolicy(max_attempts=2, base_delay_s=0.1, max_delay_s=0.1))
    assert b.next_delay_s(NETWORK) is not None
    b.progressed()
    assert b.next_delay_s(NETWORK) is not None  # counted again from zero
    assert b.next_delay_s(NETWORK) is None
    final = UploadError("401", code="ERR_UNAUTHORIZED", status=401)
    assert Backoff(RetryPolicy()).next_delay_s(final) is None


def test_retry_after_is_honoured_within_the_time_budget() -> None:
    policy = RetryPolicy(base_delay_s=0.1, max_delay_s=0.2, max_time_s=60)
    busy = UploadError("503", code="ERR_BUSY", status=503, retryable=True, retry_after_s=7)
    assert Backoff(policy).next_delay_s(busy) == 7
    too_late = UploadError("503", status=503, retryable=True, retry_after_s=600)
    assert Backoff(policy).next_delay_s(too_late) is None  # would pass max_time_s


def test_retry_after_forms() -> None:
    now = time.time()
    assert retry_after_s("5") == 5.0
    assert retry_after_s(email.utils.formatdate(now + 30, usegmt=True), now) == pytest.approx(
        30, abs=1
    )
    assert retry_after_s("soon") is None and retry_after_s(None) is None
    # ASCII digits only: "\u00b2" passes str.isdigit() and broke float().
    assert retry_after_s("\u00b2") is None and retry_after_s("\u0661") is None


def test_lines_round_trip_through_the_documented_pattern() -> None:
    text = line("ok", path='dir with space/"q".bin', size=3, rate_mib_s=1.5, key=None, n=0)
    assert text.startswith("ok ") and "\n" not in text
    assert parse_line(text) == (
        "ok",
        {"path": 'dir with space/"q".bin', "size": 3, "rate_mib_s": 1.5, "key": None, "n": 0},
    )


def test_resume_store_keys_on_path_size_mtime_and_server(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    ident = FileIdentity.of(str(f))
    store = ResumeStore(tmp_path / "cache")
    fp = fingerprint(ident, "http://h/files/")
    assert fingerprint(ident, "http://other/files/") != fp
    store.put(fp, "http://h/files/1", ident)
    assert store.get(fp) == "http://h/files/1"
    f.write_bytes(b"abcd")  # a different file now: a different upload
    assert fingerprint(FileIdentity.of(str(f)), "http://h/files/") != fp
    (tmp_path / "cache" / f"{fp}.json").write_text("{broken")
    assert store.get(fp) is None  # damaged entries start afresh
    store.forget(fp)
    store.forget(fp)  # forgetting twice is fine
    assert list((tmp_path / "cache").iterdir()) == []


def test_secrets_stay_out_of_reprs() -> None:
    """Logging the options never shows the bearer token or a signed URL's signature."""
    opts = Options("http://x", token="tok-SECRET", signed_query="X-Signature=sig-SECRET")
    assert "SECRET" not in repr(opts) and "SECRET" not in str(opts)
