"""The resumable SHA-256: any split, saved and restored at any point, gives hashlib's digest."""

from __future__ import annotations

import hashlib
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.tus import hash as tus_hash


def test_openssl_state_is_available_here() -> None:
    # The whole point: on this platform restarts must not cost a re-read.
    assert tus_hash.resumable_available()


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=6))
def test_any_split_with_export_and_restore_matches_hashlib(data: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    h = tus_hash.new_sha256()
    for a, b in itertools.pairwise(points):
        h.update(memoryview(bytearray(data[a:b])))  # writable views, as part buffers are
        saved = h.export()
        assert saved is not None
        restored = tus_hash.resume_sha256(saved, b)
        assert restored.export() == saved
        h = restored
    assert h.digest() == hashlib.sha256(data).digest()


def test_a_state_that_does_not_match_the_byte_count_is_refused() -> None:
    h = tus_hash.new_sha256()
    h.update(b"x" * 100)
    saved = h.export()
    assert saved is not None
    assert tus_hash.resume_sha256(saved, 100).digest() == hashlib.sha256(b"x" * 100).digest()
    for wrong in (99, 101, 164):
        assert tus_hash.resume_sha256(saved, wrong).digest() is None  # re-read instead
    assert tus_hash.resume_sha256("garbage", 100).digest() is None
    assert tus_hash.resume_sha256(None, 100).digest() is None


def test_copy_is_independent() -> None:
    h = tus_hash.new_sha256()
    h.update(b"abc")
    snap = h.copy()
    h.update(b"def")
    assert snap.digest() == hashlib.sha256(b"abc").digest()
    assert h.digest() == hashlib.sha256(b"abcdef").digest()
