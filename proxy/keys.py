"""Object keys: validation of client-chosen keys and generation of new ones."""

from __future__ import annotations

import re
import unicodedata
import uuid

from proxy.errors import InvalidKey

# S3 limits a whole key to 1024 bytes of UTF-8; a filer-backed store (SeaweedFS, and most
# file systems under a store) also limits each path segment, to 255 bytes like a file name.
# A key past either is refused here, before a byte is read, instead of by the store after
# the body (which would be a 502, a store failure, for what is a bad key).
MAX_KEY_BYTES = 1024
MAX_SEGMENT_BYTES = 255
_EXT_RE = re.compile(r"\.([A-Za-z0-9]{1,16})$")

# Characters that change how the text around them is shown, split or compared, so a key
# holding one looks like another key in a listing, a browser or a log line:
# * C0 and C1 controls and DEL (C1 includes NEL, U+0085, a line break to some tools);
# * line and paragraph separators (U+2028, U+2029: line breaks to JavaScript and editors);
# * the bidirectional embeddings, overrides, isolates and marks ("Trojan Source",
#   CVE-2021-42574): "invoice\u202egpj.exe" shows as "invoiceexe.jpg";
# * invisible format characters that make two different keys look the same: zero width
#   space, word joiner and the invisible operators, the deprecated format characters,
#   the BOM, interlinear annotation marks.
# Zero width (non-)joiners (U+200C, U+200D) stay allowed: Persian, Indic scripts and
# emoji sequences need them.
_UNSAFE_CODEPOINTS = frozenset(
    [
        *range(0x00, 0x20),
        *range(0x7F, 0xA0),
        0x061C,  # Arabic letter mark
        0x200B,  # zero width space
        0x200E,  # left-to-right mark
        0x200F,  # right-to-left mark
        0x2028,  # line separator
        0x2029,  # paragraph separator
        *range(0x202A, 0x202F),  # LRE, RLE, PDF, LRO, RLO
        *range(0x2060, 0x2065),  # word joiner, invisible operators
        *range(0x2066, 0x206A),  # LRI, RLI, FSI, PDI
        *range(0x206A, 0x2070),  # deprecated format characters
        0xFEFF,  # BOM / zero width no-break space
        *range(0xFFF9, 0xFFFC),  # interlinear annotation
    ]
)


def validate_key(key: str) -> str:
    """Return ``key`` if it is safe to use as an object key; raise :class:`InvalidKey`."""
    if not key:
        raise InvalidKey("the key is empty")
    if key.startswith("/"):
        raise InvalidKey("the key must not start with '/'")
    if any(ord(c) in _UNSAFE_CODEPOINTS for c in key):
        raise InvalidKey(
            "the key must not contain control, line-separator, bidirectional or invisible "
            "format characters"
        )
    if "\\" in key:
        # Some stores (SeaweedFS) turn "\" into "/": "a\..\..\x" would then climb out
        # of the key prefix.  S3 allows it, but no one needs it in an upload key.
        raise InvalidKey("the key must not contain '\\'")
    segments = key.split("/")
    if any(s in (".", "..") for s in segments):
        raise InvalidKey("the key must not contain '.' or '..' segments")
    if "" in segments[:-1]:
        raise InvalidKey("the key must not contain empty segments ('//')")
    if segments[-1] == "":
        # S3 stores "dir/" as a folder marker: SeaweedFS keeps an empty directory entry
        # and drops the body, so the object the client was promised would not exist.
        raise InvalidKey("the key must not end with '/'")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidKey("the key is not valid UTF-8") from None
    if size > MAX_KEY_BYTES:
        raise InvalidKey(f"the key is {size} bytes of UTF-8; at most {MAX_KEY_BYTES} allowed")
    _check_segments(segments)
    return key


def _check_segments(segments: list[str]) -> None:
    longest = max(len(s.encode("utf-8")) for s in segments)
    if longest > MAX_SEGMENT_BYTES:
        raise InvalidKey(
            f"a key segment is {longest} bytes of UTF-8; at most {MAX_SEGMENT_BYTES} allowed"
        )


def full_key(prefix: str, key: str) -> str:
    """The stored key: the configured prefix plus the validated client key."""
    stored = prefix + validate_key(key)
    if len(stored.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidKey(f"the key with its prefix exceeds {MAX_KEY_BYTES} bytes")
    # A prefix without a trailing "/" joins its last segment to the key's first.
    _check_segments(stored.split("/"))
    return stored


def safe_extension(filename: str | None) -> str:
    """``.jpg`` from ``"Holiday Photo.JPG"``; empty for anything odd."""
    if not filename:
        return ""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    m = _EXT_RE.search(base)
    return "." + m.group(1).lower() if m else ""


def generated_key(prefix: str, filename: str | None = None) -> str:
    return f"{prefix}{uuid.uuid4().hex}{safe_extension(filename)}"


_UNSAFE_NAME_RE = re.compile(r"[^\w .()+,=@~-]")


def safe_filename(filename: str | None, max_bytes: int = 200) -> str:
    """One key segment from a client's file name: ``"../a\\Ho:li*day.JPG"`` -> ``"Ho_li_day.JPG"``.

    The last path component only, characters outside letters, digits and ``.()+,=@~ -``
    replaced, no leading or trailing dots or spaces (so never ``.`` or ``..``), at most
    ``max_bytes`` of UTF-8.  Empty when nothing usable is left.
    """
    if not filename:
        return ""
    base = unicodedata.normalize("NFC", filename.replace("\\", "/").rsplit("/", 1)[-1])
    name = _UNSAFE_NAME_RE.sub("_", base).strip(" .")
    while len(name.encode("utf-8")) > max_bytes:
        name = name[:-1].rstrip(" .")
    return name
