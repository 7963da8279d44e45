"""Key validation and generation, including property tests over arbitrary text."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import InvalidKey
from proxy.keys import (
    MAX_KEY_BYTES,
    MAX_SEGMENT_BYTES,
    full_key,
    generated_key,
    safe_extension,
    validate_key,
)

# Bidi classes of the embeddings, overrides and isolates and their terminators.
BIDI_CONTROLS = {"LRE", "RLE", "PDF", "LRO", "RLO", "LRI", "RLI", "FSI", "PDI"}


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "dir/file.txt",
        "ünï/cødé",
        "a.b/c..d",
        "/".join(["x" * 255] * 3 + ["x" * 254, "x"]),  # 1024 bytes, each segment at the 255 limit
        "é" * 127 + "x",  # 255 bytes of UTF-8 in one segment
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian: needs ZWNJ
        "family-\U0001f468\u200d\U0001f469\u200d\U0001f467.jpg",  # emoji: needs ZWJ
    ],
)
def test_valid(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/abs",
        "a/../b",
        "..",
        ".",
        "a/./b",
        "a//b",
        "dir/",
        "a/b/",
        "a\nb",
        "a\x00b",
        "a\x7fb",
        "a\\..\\..\\x",
        "win\\path",
        "x" * 1025,
        "é" * 513,
        "s" * 256,  # one segment over 255 bytes, though the key is within 1024
        "dir/" + "é" * 128,  # 256 bytes of UTF-8 in the last segment
        "nel\x85x",
        "c1\x9bx",
        "invoice\u202egpj.exe",
        "a\u2066b",
        "a\u2069b",
        "a\u200fb",
        "a\u2028b",
        "a\u2029b",
        "a\u200bb",
        "a\ufeffb",
    ],
)
def test_invalid(key: str) -> None:
    with pytest.raises(InvalidKey):
        validate_key(key)


def test_a_prefix_without_a_slash_counts_in_the_first_segment() -> None:
    assert full_key("pre-", "s" * 251) == "pre-" + "s" * 251
    with pytest.raises(InvalidKey):
        full_key("pre-", "s" * 252)


@given(st.text(max_size=300))
def test_any_text_is_either_rejected_or_safe(key: str) -> None:
    try:
        stored = full_key("pre/", key)
    except InvalidKey:
        return
    assert stored.startswith("pre/")
    parts = stored.split("/")
    assert ".." not in parts and "." not in parts
    assert all(ord(c) >= 0x20 and not 0x7F <= ord(c) <= 0x9F for c in stored)
    assert not any(unicodedata.bidirectional(c) in BIDI_CONTROLS for c in stored)
    assert not any(unicodedata.category(c) in ("Zl", "Zp") for c in stored)
    assert "\\" not in stored
    assert not stored.endswith("/")
    assert len(stored.encode()) <= MAX_KEY_BYTES
    assert all(len(s.encode()) <= MAX_SEGMENT_BYTES for s in parts)


@pytest.mark.parametrize(
    ("name", "ext"),
    [
        ("a.JPG", ".jpg"),
        ("../../x.tar.gz", ".gz"),
        ("noext", ""),
        ("a.", ""),
        (None, ""),
        ("evil.ph p", ""),
        ("x.verylongextensionname1", ""),
        ("c:\\dir\\f.Txt", ".txt"),
    ],
)
def test_safe_extension(name: str | None, ext: str) -> None:
    assert safe_extension(name) == ext


@given(st.text(max_size=200))
def test_generated_keys_stay_under_prefix(name: str) -> None:
    key = generated_key("in/", name)
    assert key.startswith("in/") and "/" not in key[3:]
    validate_key(key)
