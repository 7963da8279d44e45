"""Object keys: validation of client-chosen keys and generation of new ones."""

from __future__ import annotations

import re
import unicodedata
import uuid

from proxy.errors import InvalidKey

MAX_KEY_BYTES = 1024
_EXT_RE = re.compile(r"\.([A-Za-z0-9]{1,16})$")


def validate_key(key: str) -> str:
    """Return ``key`` if it is safe to use as an object key; raise :class:`InvalidKey`."""
    if not key:
        raise InvalidKey("the key is empty")
    if key.startswith("/"):
        raise InvalidKey("the key must not start with '/'")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise InvalidKey("the key must not contain control characters")
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
    return key


def full_key(prefix: str, key: str) -> str:
    """The stored key: the configured prefix plus the validated client key."""
    stored = prefix + validate_key(key)
    if len(stored.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidKey(f"the key with its prefix exceeds {MAX_KEY_BYTES} bytes")
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
