"""[auth]: who may upload, and the secrets and token hashes other sections read too.

Only hashes of tokens are kept; no secret or token ever appears in a repr or a message.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from proxy.config.reader import Reader, choice, custom, positive

AUTH_MODES = ("required", "none")
# What a bearer token may do (auth.scoped_tokens); "admin" is every scope.
TOKEN_SCOPES = ("upload", "download", "admin")
# A token hash as written in config.toml / a token file: "sha256:" + 64 hex digits.
_TOKEN_HASH_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
MIN_SECRET_BYTES = 32


def _read_secret_file(r: Reader, key: str, path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        # The message names the file, never its content.
        r.check(False, key, f"cannot read {path}: {getattr(e, 'strerror', None) or e}")
        return ""


def read_secret(r: Reader, key: str, default: bytes) -> bytes:
    """The secret in the file ``key`` names (b"" if none), at least MIN_SECRET_BYTES."""
    secret_file = r.get(key, str, "")
    if not secret_file:
        return default
    path = r.base / secret_file
    secret = _read_secret_file(r, key, path).strip().encode()
    r.check(
        not path.is_file() or len(secret) >= MIN_SECRET_BYTES,
        key,
        f"the secret must be at least {MIN_SECRET_BYTES} bytes (e.g. openssl rand -hex 32)",
    )
    return secret


def _token_hash(r: Reader, key: str, entry: str, *, plain_ok: bool) -> bytes | None:
    m = _TOKEN_HASH_RE.match(entry.strip().lower())
    if m:
        return bytes.fromhex(m.group(1))
    if plain_ok and len(entry.strip()) >= 16 and not entry.strip().startswith("sha256:"):
        # A plain token in a token file is hashed at once; only the hash is kept.
        return hashlib.sha256(entry.strip().encode()).digest()
    what = (
        'a "sha256:<64 hex>" hash or a plain token of >= 16 characters'
        if plain_ok
        else 'a "sha256:<64 hex>" hash (upload-proxy hash-token makes one)'
    )
    # Never echo the entry: it may be a token pasted in the wrong place.
    r.check(False, key, f"an entry is not {what}")
    return None


def _token_hashes(r: Reader, list_key: str, default: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """Hashes from a list of ``sha256:`` entries (``tokens``) and from the token file its
    sibling key names (``token_file``: hashes or plain tokens, one a line)."""
    file_key = list_key.removesuffix("s") + "_file"
    hashes = [_token_hash(r, list_key, entry, plain_ok=False) for entry in r.strings(list_key)]
    if token_file := r.get(file_key, str, ""):
        for line in _read_secret_file(r, file_key, r.base / token_file).splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                hashes.append(_token_hash(r, file_key, line, plain_ok=True))
    return tuple(h for h in hashes if h is not None)


@dataclass(frozen=True)
class ScopedToken:
    """A bearer token's hash with what it may do: ``scopes`` (of :data:`TOKEN_SCOPES`) on
    keys under ``prefix`` (relative to ``upload.key_prefix``; empty: every key)."""

    sha256: bytes = field(repr=False)
    scopes: frozenset[str]
    prefix: str = ""


def _scoped_tokens(r: Reader, key: str, default: tuple[()]) -> tuple[ScopedToken, ...]:
    """``scoped_tokens = [{tokens = ["sha256:…"] and/or token_file, scopes, prefix}]``."""
    entries = r.table.pop(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        r.check(False, key, "expected a list of tables {token, scopes, prefix}")
        return default
    out: list[ScopedToken] = []
    for i, entry in enumerate(entries):
        er = Reader(entry, f"{r.path}.{key}[{i}]", r.problems, r.base)
        scopes = er.strings("scopes")
        er.check(
            bool(scopes) and all(s in TOKEN_SCOPES for s in scopes),
            "scopes",
            f"must be a non-empty list of {', '.join(TOKEN_SCOPES)}",
        )
        prefix = er.get("prefix", str, "")
        er.check(
            prefix == "" or (prefix.endswith("/") and not prefix.startswith("/")),
            "prefix",
            "must be empty (every key) or end with '/' and not start with it, so 'user1/' "
            "does not also allow 'user10/...'",
        )
        hashes = _token_hashes(er, "tokens", ())
        er.check(bool(hashes), "tokens", "give the token's hash in tokens or a token_file")
        er.finish()
        out += [ScopedToken(h, frozenset(scopes), prefix) for h in hashes]
    return tuple(out)


@dataclass(frozen=True)
class AuthConfig:
    """Who may upload.  Only hashes of tokens are kept; the secret never appears in a repr."""

    mode: str = choice("required", AUTH_MODES)
    # From tokens and token_file.
    token_sha256: tuple[bytes, ...] = custom((), _token_hashes, "tokens", repr=False)
    signing_secret: bytes = custom(b"", read_secret, "signing_secret_file", repr=False)
    # Tokens that may read /status in full (upload ids and keys); never upload tokens.
    # From operator_tokens and operator_token_file.
    operator_token_sha256: tuple[bytes, ...] = custom(
        (), _token_hashes, "operator_tokens", repr=False
    )
    # A week: the longest an S3 (SigV4) presigned URL lives.
    signed_url_max_lifetime_s: float = positive(7 * 86400.0)
    # Tokens with scopes and an optional key prefix (``tokens`` above mean upload only).
    scoped_tokens: tuple[ScopedToken, ...] = custom((), _scoped_tokens, repr=False)

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


def check_auth(r: Reader, cfg: AuthConfig) -> AuthConfig:
    hashes, operators, scoped = cfg.token_sha256, cfg.operator_token_sha256, cfg.scoped_tokens
    r.check(
        not set(hashes) & set(operators),
        "operator_tokens",
        "a token is both an upload token and an operator token; give operators their own",
    )
    taken = set(hashes) | set(operators)
    r.check(
        not any(t.sha256 in taken for t in scoped)
        and len({t.sha256 for t in scoped}) == len(scoped),
        "scoped_tokens",
        "a token is listed twice (in tokens, operator_tokens or scoped_tokens): one entry each",
    )
    r.check(
        cfg.mode == "none" or bool(hashes) or bool(cfg.signing_secret) or bool(scoped),
        "mode",
        '"required" needs tokens, scoped_tokens, a token_file or a signing_secret_file; '
        'set mode = "none" to accept uploads from anyone who can reach the port',
    )
    return cfg
