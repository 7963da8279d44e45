"""Conditional and range requests for downloads (RFC 9110 sections 13 and 14): pure
functions of the request headers and the object's validators, no I/O.

Only what a file server needs: one byte range (``a-b``, ``a-``, ``-n``); a header asking
for several ranges, or malformed, is ignored (the whole object, as RFC 9110 allows), so a
client never gets a ``multipart/byteranges`` body it did not expect.  ETags are compared
as S3 gives them (strong); ``W/`` tags match only in the weak comparison of
``If-None-Match``.  Numbers are ASCII digits (``\\d`` would take other scripts' digits).
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from proxy.errors import PreconditionFailed, RangeNotSatisfiable

_RANGE_RE = re.compile(r"\s*bytes\s*=\s*([0-9]{0,20})\s*-\s*([0-9]{0,20})\s*", re.IGNORECASE)
_ETAG_RE = re.compile(r'\s*(W/)?("[^"]*")\s*(?:,|$)')


@dataclass(frozen=True)
class Validators:
    """What identifies the object's current version."""

    etag: str  # quoted, as S3 gives it
    last_modified: datetime | None
    size_bytes: int


@dataclass(frozen=True)
class ByteRange:
    first: int
    last: int  # inclusive

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    def content_range(self, size_bytes: int) -> str:
        return f"bytes {self.first}-{self.last}/{size_bytes}"


def http_date(when: datetime) -> str:
    # botocore's tzutc() is not datetime.timezone.utc, which format_datetime insists on.
    return email.utils.format_datetime(when.astimezone(UTC), usegmt=True)


def _date(value: str) -> datetime | None:
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return when if when.tzinfo is not None else None


def _whole_seconds(when: datetime) -> datetime:
    # HTTP dates have one-second resolution; S3's Last-Modified may carry less or more.
    return when.replace(microsecond=0)


def _tags(header: str) -> list[tuple[bool, str]] | None:
    """``(weak, "tag")`` per entry; None for ``*``; [] when the header is malformed."""
    if header.strip() == "*":
        return None
    out: list[tuple[bool, str]] = []
    pos = 0
    while pos < len(header):
        m = _ETAG_RE.match(header, pos)
        if m is None or m.end() == pos:
            return []
        out.append((m.group(1) is not None, m.group(2)))
        pos = m.end()
    return out


def _matches(header: str, etag: str, *, strong: bool) -> bool:
    tags = _tags(header)
    if tags is None:
        return True  # "*": any current representation
    weak_etag = etag.startswith("W/")
    opaque = etag[2:] if weak_etag else etag
    return any(tag == opaque and not (strong and (weak or weak_etag)) for weak, tag in tags)


def precondition(method: str, headers: Mapping[str, str], v: Validators) -> int | None:
    """304 or 412 as RFC 9110 section 13.2.2 orders the checks, else None (go on).

    A 412 is raised as :class:`PreconditionFailed`; 304 is returned (it is no error)."""
    get = headers.get
    lm = None if v.last_modified is None else _whole_seconds(v.last_modified)
    if (im := get("If-Match")) is not None:
        if not _matches(im, v.etag, strong=True):
            raise PreconditionFailed("If-Match: the object has another ETag")
    elif (ius := get("If-Unmodified-Since")) is not None:
        when = _date(ius)
        if when is not None and lm is not None and lm > when:
            raise PreconditionFailed("If-Unmodified-Since: the object changed since")
    if (inm := get("If-None-Match")) is not None:
        if _matches(inm, v.etag, strong=False):
            if method in ("GET", "HEAD"):
                return 304
            raise PreconditionFailed("If-None-Match: the object has that ETag")
    elif method in ("GET", "HEAD") and (ims := get("If-Modified-Since")) is not None:
        when = _date(ims)
        if when is not None and lm is not None and lm <= when:
            return 304
    return None


def _if_range_holds(value: str, v: Validators) -> bool:
    """RFC 9110 13.1.5: a strong ETag match, or a date equal to Last-Modified."""
    value = value.strip()
    if value.startswith('"') or value.startswith("W/"):
        return not value.startswith("W/") and value == v.etag and not v.etag.startswith("W/")
    when = _date(value)
    return (
        when is not None and v.last_modified is not None and _whole_seconds(v.last_modified) == when
    )


def byte_range(method: str, headers: Mapping[str, str], v: Validators) -> ByteRange | None:
    """The one range to send, or None for the whole object.

    Raises :class:`RangeNotSatisfiable` (with ``Content-Range: bytes */N``) for a range
    that starts at or past the end, or any range of an empty object."""
    get = headers.get
    value = get("Range")
    if method != "GET" or value is None:
        return None  # Range is defined for GET only (RFC 9110 14.2)
    if (if_range := get("If-Range")) is not None and not _if_range_holds(if_range, v):
        return None  # the client's copy is stale: send it the whole new one
    m = _RANGE_RE.fullmatch(value)
    if m is None:
        return None  # several ranges, another unit or malformed: ignored
    first_s, last_s = m.groups()
    size = v.size_bytes
    if not first_s and not last_s:
        return None
    if not first_s:
        suffix = int(last_s)
        if suffix == 0 or size == 0:
            raise _unsatisfiable(size)
        return ByteRange(max(0, size - suffix), size - 1)
    first = int(first_s)
    last = int(last_s) if last_s else size - 1
    if last_s and last < first:
        return None  # an invalid range-spec: the header is ignored
    if first >= size:
        raise _unsatisfiable(size)
    return ByteRange(first, min(last, size - 1))


def _unsatisfiable(size: int) -> RangeNotSatisfiable:
    return RangeNotSatisfiable(
        f"the range is outside the object's {size} bytes",
        headers={"Content-Range": f"bytes */{size}"},
    )
