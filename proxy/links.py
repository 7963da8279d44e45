"""Upload links ("file requests"): a signed grant that lets whoever holds it send files
through the upload page into one key prefix, until a time, within a size and a file cap.
No HTTP here (the page and its ``api/link`` are :mod:`proxy.web.page`).

A grant is ``upl1.<payload>.<sig>``: ``payload`` the link's terms as base64url JSON
(id, prefix, expiry, caps, note), ``sig`` HMAC-SHA256 with the signing secret
(:func:`proxy.auth.mac`) over a tag of its own and the payload, hex.  It rides in the page
URL's fragment (``/upload/#link=<grant>``), which browsers never send, and the page
presents it as ``Authorization: Bearer <grant>``.

The grant is a principal (``link:<id>``): tus uploads created with it belong to it, so
the page (and only it) can continue, inspect and cancel them.  Its terms are checked at
every request (signature, expiry, revocation) and at tus creation (prefix, size, file
cap; :mod:`proxy.web.page`).

State in the bucket, under ``<tus.state_prefix>links/`` (plain uploads cannot write
there), so every instance sees the same:

    revoked/<until>-<id>          empty: link <id> is revoked; removable after <until>
    <id>/files/<created>-<upload> empty: one per upload the link created (its file cap)

Revocations are read by each instance every ``page.revocation_check_s`` (a listing; no
request waits on S3 for it): a revoked link stops working within that time everywhere.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from proxy.auth import UPLOAD, Grant, Principal, mac
from proxy.errors import (
    BadSignature,
    ConditionFailed,
    InvalidKey,
    LinkExpired,
    LinkRevoked,
    StorageUnavailable,
    TooManyFiles,
    UrlLifetime,
)
from proxy.headers import ascii_uint
from proxy.keys import validate_key
from proxy.storage import markers

log = logging.getLogger(__name__)

GRANT_TAG = "upl1."
_DOMAIN = b"upload-proxy-link-v1\n"
_SIG_HEX_LEN = 64
ID_HEX_CHARS = 16
MAX_NOTE_CHARS = 500
MAX_PREFIX_BYTES = 512
# Prefix and note at their longest, as UTF-8 JSON in base64: well under the 16 KiB of
# headers a request may carry (server.max_header_bytes).
MAX_GRANT_CHARS = 4096
LINKS = "links/"
REVOKED = "revoked/"
# A file marker is written before its upload's state; one this old whose upload has
# neither state nor object is left over (a cancelled, failed or expired upload) and no
# longer counts.  Creation takes seconds; the margin covers a store that is slow to answer.
FILE_MARKER_GRACE_S = 120.0
# Retry-After when the revocation list is out of date (the store is not answering).
STALE_RETRY_AFTER_S = 10
_ID_RE = re.compile(f"[0-9a-f]{{{ID_HEX_CHARS}}}")


@dataclass(frozen=True)
class Link:
    """A link's terms.  ``prefix`` is relative to ``upload.key_prefix``; ``None`` caps
    mean "no cap of the link's own" (the server's limits still apply)."""

    id: str
    prefix: str
    expires_s: int
    max_size_bytes: int | None = None
    max_files: int | None = None
    note: str = ""

    @property
    def principal(self) -> Principal:
        return Principal("link", self.id)

    def payload(self) -> str:
        terms = {
            "v": 1,
            "id": self.id,
            "prefix": self.prefix,
            "exp": self.expires_s,
            "max_size": self.max_size_bytes,
            "max_files": self.max_files,
            "note": self.note,
        }
        raw = json.dumps(terms, separators=(",", ":"), ensure_ascii=False).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    @classmethod
    def from_payload(cls, payload: str) -> Link:
        """Raises ValueError (only ever called on a payload whose signature matched)."""
        try:
            raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
            terms = json.loads(raw)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"not a link payload: {e}") from None
        if not isinstance(terms, dict) or terms.get("v") != 1:
            raise ValueError("not a version 1 link")
        link = cls(
            id=_typed(terms, "id", str),
            prefix=_typed(terms, "prefix", str),
            expires_s=_typed(terms, "exp", int),
            max_size_bytes=_typed(terms, "max_size", int, optional=True),
            max_files=_typed(terms, "max_files", int, optional=True),
            note=_typed(terms, "note", str),
        )
        check_terms(link)
        return link


def _typed(terms: dict[str, Any], name: str, kind: type, *, optional: bool = False) -> Any:
    value = terms.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"link field {name!r} is not a {kind.__name__}")
    return value


def check_terms(link: Link) -> None:
    """Raise ValueError unless ``link``'s terms are ones we would mint.  Checked when a
    link is minted and again when one is used: a grant signed by hand with the secret is
    held to the same rules (a prefix ``user1`` would also allow ``user10/...``)."""
    if not is_link_id(link.id):
        raise ValueError(f"a link id is {ID_HEX_CHARS} lowercase hex digits")
    if not link.prefix.endswith("/") or len(link.prefix.encode()) > MAX_PREFIX_BYTES:
        raise ValueError(f"the prefix must end with '/' and be at most {MAX_PREFIX_BYTES} bytes")
    try:
        validate_key(link.prefix + "x")
    except InvalidKey as e:
        raise ValueError(f"the prefix is not a valid key prefix: {e.message}") from None
    for name, cap in (("max_size", link.max_size_bytes), ("max_files", link.max_files)):
        if cap is not None and cap <= 0:
            raise ValueError(f"{name} must be > 0")
    if len(link.note) > MAX_NOTE_CHARS:
        raise ValueError(f"the note is longer than {MAX_NOTE_CHARS} characters")
    if any(not c.isprintable() for c in link.note):
        raise ValueError("the note must be printable text on one line")


def new_link_id() -> str:
    return secrets.token_hex(ID_HEX_CHARS // 2)


def mint(secret: bytes, link: Link) -> str:
    """The grant for ``link`` (terms checked: ValueError)."""
    if not secret:
        raise ValueError("no signing secret")
    check_terms(link)
    payload = link.payload()
    return f"{GRANT_TAG}{payload}.{_sign(secret, payload)}"


def _sign(secret: bytes, payload: str) -> str:
    return mac(secret, _DOMAIN + payload.encode())


def is_link_id(value: str) -> bool:
    return _ID_RE.fullmatch(value) is not None


def unverified_link(value: str) -> Link | None:
    """The terms in a grant, or in a page URL carrying one, read without the secret (for
    ``upload-proxy link --revoke``: the id names what to revoke, the expiry how long the
    revocation must be kept; nothing is granted).  None when ``value`` holds no grant."""
    grant = value.strip().rpartition("link=")[2].partition("&")[0]
    if not grant.startswith(GRANT_TAG):
        return None
    try:
        return Link.from_payload(grant[len(GRANT_TAG) :].partition(".")[0])
    except ValueError:
        return None


class Revocations:
    """The revoked link ids as this instance last read them from the bucket.

    Until the first read, and once the last successful read is older than
    ``stale_after_s``, no link is accepted (503, retried by the page): a link must not
    work again because the store stopped answering."""

    def __init__(self, stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s
        self._ids: frozenset[str] = frozenset()
        self._read_at_s: float | None = None

    def update(self, ids: Iterable[str], read_at_s: float) -> None:
        self._ids = frozenset(ids)
        self._read_at_s = read_at_s

    def check(self, link_id: str, now_s: float) -> None:
        if self._read_at_s is None or now_s - self._read_at_s > self.stale_after_s:
            raise StorageUnavailable(
                "cannot check upload links right now (the store is not answering)",
                headers={"Retry-After": str(STALE_RETRY_AFTER_S)},
            )
        if link_id in self._ids:
            raise LinkRevoked("this upload link has been revoked")


class LinkVerifier:
    """Grants from link credentials (:class:`proxy.auth.LinkCheck`)."""

    def __init__(self, secret: bytes, *, max_lifetime_s: float, revocations: Revocations) -> None:
        self._secret = secret
        self._max_lifetime_s = max_lifetime_s
        self.revocations = revocations

    def __repr__(self) -> str:
        return "LinkVerifier()"

    def recognises(self, credential: str) -> bool:
        return credential.startswith(GRANT_TAG)

    def verify(self, credential: str, now_s: float) -> Link:
        payload, dot, sig = credential[len(GRANT_TAG) :].partition(".")
        if not dot or len(sig) != _SIG_HEX_LEN or len(credential) > MAX_GRANT_CHARS:
            raise BadSignature("the upload link is malformed")
        expected = _sign(self._secret, payload)
        if not hmac.compare_digest(expected.encode(), sig.lower().encode("ascii", "replace")):
            raise BadSignature("the upload link's signature does not match")
        # The terms are trusted only now: they are ours.
        try:
            link = Link.from_payload(payload)
        except ValueError:
            raise BadSignature("the upload link's terms are not valid") from None
        if link.expires_s < now_s:
            raise LinkExpired("this upload link has expired")
        if link.expires_s - now_s > self._max_lifetime_s:
            # As for signed URLs: a link lives at most that long from any moment it is used.
            raise UrlLifetime(
                f"the upload link expires more than {self._max_lifetime_s:.0f} s from now, "
                "beyond auth.signed_url_max_lifetime_s"
            )
        self.revocations.check(link.id, now_s)
        return link

    def grant(self, credential: str, now: float) -> Grant:
        link = self.verify(credential, now)
        return Grant(
            via="link",
            prefix=link.prefix,
            max_size_bytes=link.max_size_bytes,
            principal=link.principal,
            link=link,
            # Uploads only: a link never reads back (downloads need their own scope).
            scopes=frozenset({UPLOAD}),
        )


# Is the upload with this storage id still there (unfinished state, or its object)?
Alive = Callable[[str], Awaitable[bool]]


class LinkStore:
    """Links' state in the bucket: revocations and file markers (layout: module doc)."""

    def __init__(
        self,
        storage: markers.MarkerStore,
        state_prefix: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage
        self.folder = f"{state_prefix}{LINKS}"
        self.clock = clock

    # -- revocation ------------------------------------------------------------------------

    async def revoked(self) -> list[tuple[str, int]]:
        """(id, until) of every revocation entry."""
        out = []
        for obj in await self.storage.list_objects(self.folder + REVOKED):
            until, _, link_id = obj.key.rpartition("/")[2].partition("-")
            until_s = ascii_uint(until)
            if until_s is not None and is_link_id(link_id):
                out.append((link_id, until_s))
        return out

    async def revoked_ids(self) -> set[str]:
        """The ids of revoked links that have not expired yet (the others are refused
        anyway)."""
        now = self.clock()
        return {link_id for link_id, until_s in await self.revoked() if until_s >= now}

    async def revoke(self, link_id: str, until_s: int) -> None:
        """Revoke ``link_id``; the entry may go after ``until_s`` (when the link expires)."""
        if not is_link_id(link_id):
            raise ValueError("not a link id")
        try:
            await self.storage.put_conditional(
                f"{self.folder}{REVOKED}{until_s}-{link_id}", b"", if_none_match=True
            )
        except ConditionFailed:
            pass  # revoked already

    async def prune_revocations(self) -> int:
        """Delete entries of links that have expired since; return how many."""
        now = self.clock()
        gone = [(i, u) for i, u in await self.revoked() if u < now]
        for link_id, until_s in gone:
            await self.storage.delete_object(f"{self.folder}{REVOKED}{until_s}-{link_id}")
        return len(gone)

    # -- the file cap ------------------------------------------------------------------------

    def files_folder(self, link_id: str) -> str:
        return f"{self.folder}{link_id}/files/"

    def file_marker(self, link_id: str, upload_id: str, created_s: float) -> str:
        return f"{self.files_folder(link_id)}{int(created_s)}-{upload_id}"

    async def reserve_file(self, link: Link, upload_id: str, alive: Alive) -> str:
        """Count a new upload of ``link`` against its ``max_files``; its marker key.
        Raises :class:`TooManyFiles` when the link has no place left.

        Races between instances are settled by :func:`proxy.storage.markers.reserve`
        (never more than ``max_files``).  Places of uploads that are gone (cancelled,
        failed, expired) are freed lazily, only when the cap is reached."""
        marker = self.file_marker(link.id, upload_id, self.clock())
        if link.max_files is None:
            await self.storage.put_conditional(marker, b"", if_none_match=True)
            return marker
        folder = self.files_folder(link.id)
        if await markers.reserve(self.storage, folder, marker, link.max_files):
            return marker
        if await self._free_places(link.id, alive) and await markers.reserve(
            self.storage, folder, marker, link.max_files
        ):
            return marker
        raise TooManyFiles(f"this upload link takes {link.max_files} files and has none left")

    async def files_used(self, link: Link, alive: Alive) -> int:
        """How many files the link has taken (uploads begun and not gone)."""
        used = len(await self.storage.list_objects(self.files_folder(link.id)))
        if link.max_files is not None and used >= link.max_files:
            used -= await self._free_places(link.id, alive)
        return used

    async def release(self, marker: str) -> None:
        await self.storage.delete_object(marker)

    async def _free_places(self, link_id: str, alive: Alive) -> int:
        """Delete the markers of uploads that are gone; return how many.  At most one
        liveness check per marker, so bounded by the cap (plus racing creations)."""
        freed = 0
        now = self.clock()
        for obj in await self.storage.list_objects(self.files_folder(link_id)):
            created, _, upload_id = obj.key.rpartition("/")[2].partition("-")
            created_s = ascii_uint(created)
            if created_s is None or now - created_s < FILE_MARKER_GRACE_S:
                continue
            if not await alive(upload_id):
                await self.storage.delete_object(obj.key)
                freed += 1
        return freed
