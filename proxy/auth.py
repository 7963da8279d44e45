"""Who may upload and download: bearer tokens and HMAC-signed URLs.  No HTTP framework here.

Bearer tokens are kept only as SHA-256 hashes and compared in constant time
(:class:`TokenSet`): upload tokens here, operator tokens (``/status`` details) in
:mod:`proxy.web.ops`.  A token has scopes (``upload``, ``download``, ``admin`` = all) and
an optional key prefix; the plain ``auth.tokens`` mean upload, on every key.

A signed upload URL is our answer to S3 presigned URLs: a web app that holds the
signing secret hands a browser a URL that allows one method, on one key or under
one prefix (both relative to the proxy's ``key_prefix``), up to a size, until a
time.  The query carries::

    expires=<unix seconds>&key=<k> | prefix=<p>[&max_size=<bytes>]&sig=<hex>

and ``sig`` is HMAC-SHA256 over :func:`canonical` of those fields and the method.
:func:`sign_url` mints one (``upload-proxy sign`` on the command line).

Every failure is a :class:`~proxy.errors.ProxyError` whose message names no
secret, token or signature.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from proxy.config import AuthConfig, ScopedToken
from proxy.errors import (
    BadSignature,
    KeyNotAllowed,
    ScopeNotAllowed,
    Unauthorized,
    UrlExpired,
    UrlLifetime,
)
from proxy.headers import ascii_uint

SIGNED_FIELDS = ("expires", "key", "prefix", "max_size", "sig")
_SIG_HEX_LEN = 64
# expires and max_size are decimal; 20 digits hold any 64-bit value.
_MAX_NUMBER_LEN = 20

UPLOAD, DOWNLOAD, ADMIN = "upload", "download", "admin"
ALL_SCOPES = frozenset({UPLOAD, DOWNLOAD, ADMIN})
# Methods a signed URL of one method also allows: a link to GET an object may HEAD it.
_SIGNED_AS = {"HEAD": "GET"}


@dataclass(frozen=True)
class Principal:
    """Who made a request: the owner recorded on what it creates (a tus upload), which
    only the same principal may touch again.

    A small value, safe to store next to the upload and to log: ``kind`` is how the
    request authenticated (``anonymous`` when auth is off, ``token``, ``signed``) and
    ``ref`` (16 hex digits; empty for anonymous) tells principals of one kind apart.  For
    a bearer token it is a hash of the token's stored SHA-256, for a signed URL a hash of
    its signature: neither gives back the credential, nor anything that would pass as it.
    Later kinds (upload links, scoped tokens) are new ``kind`` values.
    """

    kind: str
    ref: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.ref}" if self.ref else self.kind

    def owns(self, recorded: str) -> bool:
        """Is ``recorded`` (``str`` of a principal, as stored) this principal?  In constant
        time: how long the answer takes says nothing about how much of it matched."""
        return hmac.compare_digest(str(self).encode(), recorded.encode("utf-8", "surrogateescape"))


ANONYMOUS = Principal("anonymous")
_PRINCIPAL_DOMAIN = b"upload-proxy principal v1\0"


def _principal(kind: str, material: bytes) -> Principal:
    digest = hashlib.sha256(_PRINCIPAL_DOMAIN + kind.encode() + b"\0" + material).hexdigest()
    return Principal(kind, digest[:16])


@dataclass(frozen=True)
class Grant:
    """What an authenticated request may do.  ``None`` fields mean "no restriction"."""

    via: str  # "none", "token" or "signed": safe to log
    key: str | None = None
    prefix: str | None = None
    max_size_bytes: int | None = None
    principal: Principal = ANONYMOUS
    # What the request may do (see ``allows``); auth off: everything.
    scopes: frozenset[str] = ALL_SCOPES

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or ADMIN in self.scopes

    def require(self, scope: str) -> None:
        """Raise 403 unless these credentials carry ``scope``."""
        if not self.allows(scope):
            raise ScopeNotAllowed(f"these credentials do not allow {scope}s")

    def covers(self, client_key: str) -> bool:
        """Is ``client_key`` (before the proxy's key_prefix) within the key or prefix?"""
        if self.key is not None and client_key != self.key:
            return False
        return self.prefix is None or client_key.startswith(self.prefix)

    def check_key(self, client_key: str) -> None:
        """Raise unless ``client_key`` (before the proxy's key_prefix) is allowed."""
        if self.key is not None and client_key != self.key:
            raise KeyNotAllowed("this signed URL is for another key")
        if self.prefix is not None and not client_key.startswith(self.prefix):
            what = "signed URL" if self.via == "signed" else "token"
            raise KeyNotAllowed(f"this {what} is for another prefix")

    def limit(self, configured_bytes: int) -> int:
        if self.max_size_bytes is None:
            return configured_bytes
        return min(configured_bytes, self.max_size_bytes)


OPEN = Grant(via="none")


def hash_token(token: str) -> str:
    """The form config.toml stores: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def canonical(
    method: str, expires: str, key: str | None, prefix: str | None, max_size: str
) -> bytes:
    """The signed string.  Each field is on its own line and key/prefix are tagged, so no
    value can be shifted into another field (newlines are refused in :func:`sign_url`, and
    a forged value with one cannot produce a valid signature anyway)."""
    scope = f"key:{key}" if key is not None else f"prefix:{prefix}"
    return "\n".join(("upload-proxy-v1", method.upper(), expires, scope, max_size)).encode()


def _mac(secret: bytes, message: bytes) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign_url(
    secret: bytes,
    method: str,
    *,
    key: str | None = None,
    prefix: str | None = None,
    expires_in_s: float = 3600,
    max_size_bytes: int | None = None,
    now: float | None = None,
) -> str:
    """Query string (without ``?``) of a signed upload URL for ``method``.

    ``key`` allows exactly that key (``PUT /uploads/<key>``); ``prefix`` allows any key
    under it (``PUT``) or generated keys under it (``POST /uploads``).  A prefix must end
    with "/" so "user1/" does not also allow "user10/...".
    """
    if (key is None) == (prefix is None):
        raise ValueError("give exactly one of key or prefix")
    if prefix is not None and not prefix.endswith("/"):
        raise ValueError("a prefix must end with '/'")
    if any("\n" in v for v in (key or "", prefix or "")):
        raise ValueError("key and prefix must not contain newlines")
    if expires_in_s <= 0:
        raise ValueError("expires_in_s must be > 0")
    expires = str(int((time.time() if now is None else now) + expires_in_s))
    max_size = "" if max_size_bytes is None else str(int(max_size_bytes))
    params: dict[str, str] = {"expires": expires}
    if key is not None:
        params["key"] = key
    else:
        params["prefix"] = prefix or ""
    if max_size:
        params["max_size"] = max_size
    params["sig"] = _mac(secret, canonical(method, expires, key, prefix, max_size))
    return urlencode(params, quote_via=quote)


def bearer_token(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None for anything else."""
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class TokenSet:
    """Bearer tokens, kept only as SHA-256 hashes.

    A presented token is hashed and compared with every stored hash using
    :func:`hmac.compare_digest`, without an early exit, so neither the comparison nor
    the number of hashes tried leaks which bytes matched.  (Hashing first also makes
    the comparison length-independent.)"""

    def __init__(self, token_sha256: tuple[bytes, ...] = ()) -> None:
        self._hashes = token_sha256

    def __len__(self) -> int:
        return len(self._hashes)

    def __repr__(self) -> str:
        return f"TokenSet({len(self._hashes)} hashes)"

    def match(self, token: str) -> bytes | None:
        """The token's SHA-256 if it is one of ours, else None."""
        presented = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        ok = False
        for stored in self._hashes:
            # Accumulate instead of returning early: the time taken does not say which matched.
            ok |= hmac.compare_digest(presented, stored)
        return presented if ok else None


class Authenticator:
    """Turns a request's method, headers and query into a :class:`Grant`, or raises."""

    def __init__(
        self,
        *,
        enabled: bool,
        token_sha256: tuple[bytes, ...] = (),
        signing_secret: bytes = b"",
        max_url_lifetime_s: float = AuthConfig.signed_url_max_lifetime_s,
        scoped_tokens: tuple[ScopedToken, ...] = (),
    ) -> None:
        self.enabled = enabled
        # The plain tokens keep meaning what they always did: upload, on every key.
        self._scoped = tuple(ScopedToken(h, frozenset({UPLOAD})) for h in token_sha256) + tuple(
            scoped_tokens
        )
        self._tokens = TokenSet(tuple(t.sha256 for t in self._scoped))
        self._secret = signing_secret
        self._max_lifetime_s = max_url_lifetime_s

    def __repr__(self) -> str:
        return (
            f"Authenticator(enabled={self.enabled}, tokens={len(self._tokens)}, "
            f"signed_urls={bool(self._secret)})"
        )

    def authenticate(
        self,
        method: str,
        headers: Mapping[str, str],
        query: Mapping[str, str],
        now: float | None = None,
    ) -> Grant:
        if not self.enabled:
            return OPEN
        auth = headers.get("Authorization")
        if auth is not None:
            return self._bearer(auth)
        if "sig" in query:
            return self._signed(method, query, time.time() if now is None else now)
        raise Unauthorized("authentication required: a bearer token or a signed URL")

    def _bearer(self, header: str) -> Grant:
        token = bearer_token(header)
        if token is None or not self._tokens:
            raise Unauthorized(
                "the Authorization header is not an accepted bearer token", error="invalid_token"
            )
        presented = self._tokens.match(token)
        if presented is None:
            raise Unauthorized("the bearer token is not valid", error="invalid_token")
        # The match was in constant time; which entry it was is no secret from the holder.
        entry = next(t for t in self._scoped if t.sha256 == presented)
        # presented equals the stored hash that matched: the principal is a hash of it.
        return Grant(
            via="token",
            prefix=entry.prefix or None,
            principal=_principal("token", presented),
            scopes=entry.scopes,
        )

    def _signed(self, method: str, query: Mapping[str, str], now: float) -> Grant:
        if not self._secret:
            raise BadSignature("signed URLs are not enabled here")
        sig = query.get("sig", "")
        expires = query.get("expires", "")
        key, prefix = query.get("key"), query.get("prefix")
        max_size = query.get("max_size", "")
        if (
            (key is None) == (prefix is None)
            or len(sig) != _SIG_HEX_LEN
            or len(expires) > _MAX_NUMBER_LEN
            or len(max_size) > _MAX_NUMBER_LEN
            or any("\n" in v for v in (expires, key or "", prefix or "", max_size))
        ):
            # Cheap refusals before any MAC work; newlines could shift fields in canonical().
            raise BadSignature("the signed URL is malformed")
        signed_method = _SIGNED_AS.get(method.upper(), method)
        expected = _mac(self._secret, canonical(signed_method, expires, key, prefix, max_size))
        if not hmac.compare_digest(expected.encode(), sig.lower().encode("ascii", "replace")):
            raise BadSignature("the signature does not match")
        # Fields are trusted only after the signature checks out; then they were ours.
        expires_s = ascii_uint(expires, max_digits=_MAX_NUMBER_LEN)
        if expires_s is None or expires_s < now:
            raise UrlExpired("the signed URL has expired")
        if expires_s - now > self._max_lifetime_s:
            # The URL carries no issue time, so "lives at most N" is "expires within N":
            # a leaked URL (browser history, a proxy log) is good for at most that long.
            raise UrlLifetime(
                f"the signed URL expires more than {self._max_lifetime_s:.0f} s from now, "
                "beyond auth.signed_url_max_lifetime_s"
            )
        if prefix is not None and not (prefix and prefix.endswith("/")):
            # sign_url never mints one, but a web app with the secret may sign its own: a
            # prefix "user1" would allow "user10/...", and "" every key.
            raise BadSignature("the signed prefix must be non-empty and end with '/'")
        max_size_bytes = ascii_uint(max_size, max_digits=_MAX_NUMBER_LEN) if max_size else None
        if max_size and max_size_bytes is None:
            raise BadSignature("the signed URL is malformed")
        return Grant(
            via="signed",
            key=key,
            prefix=prefix,
            max_size_bytes=max_size_bytes,
            principal=_principal("signed", sig.lower().encode("ascii")),
            # Bound to its method: a GET link reads, a PUT/POST one writes.
            scopes=frozenset({DOWNLOAD if signed_method.upper() == "GET" else UPLOAD}),
        )
