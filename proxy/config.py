"""config.toml -> frozen dataclasses, validated at load.

The shipped ``config.toml`` is the reference: every key is documented there
(meaning, default, trade-off).  Each field below says once how it is read: its kind
(:func:`flag`, :func:`text`, :func:`positive`, :func:`size`, :func:`choice`,
:func:`strings`, or a :func:`custom` reader for secrets, token hashes, addresses and
paths), its default, and its TOML key where that is not the field's name.  One function,
:func:`_read`, reads any section into its dataclass from those fields; then the section's
cross-field checks run (the ``_check_*`` function beside it), then its unknown keys are
reported.  Loading never stops at the first problem: all unknown keys and bad values are
collected into one :class:`ConfigError`, so an operator fixes the file in one go.
``python -m proxy`` exits 78 (EX_CONFIG) on it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from proxy.naming import KeyTemplate
from proxy.units import parse_size

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

MiB = 1024 * 1024
GiB = 1024 * MiB
S3_MIN_PART_BYTES = 5 * MiB
S3_MAX_PART_BYTES = 5 * GiB
S3_MAX_PARTS = 10_000

PART_CHECKSUMS = ("none", "md5", "crc32", "sha256")
BACKENDS = ("embedded", "s3")
ADDRESSING_STYLES = ("path", "virtual", "auto")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
AUTH_MODES = ("required", "none")
# What a bearer token may do (auth.scoped_tokens); "admin" is every scope.
TOKEN_SCOPES = ("upload", "download", "admin")
# A token hash as written in config.toml / a token file: "sha256:" + 64 hex digits.
_TOKEN_HASH_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
MIN_SECRET_BYTES = 32
_MEDIA_TYPE_RE = re.compile(r"^[a-z0-9!#$&^_.+-]+/(?:\*|[a-z0-9!#$&^_.+-]+)$")
_EXTENSION_RE = re.compile(r"^\.[a-z0-9]{1,16}$")


class ConfigError(Exception):
    """Every problem found in one config file, one per line."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))


class _Reader:
    """Pulls typed values out of one TOML table, recording problems instead of raising.
    Relative paths in it are relative to ``base`` (the config file's folder)."""

    def __init__(self, table: dict[str, Any], path: str, problems: list[str], base: Path) -> None:
        self.table = dict(table)
        self.given = frozenset(self.table)  # every key it had, read or not
        self.path = path
        self.problems = problems
        self.base = base

    def _bad(self, key: str, why: str) -> None:
        self.problems.append(f"{self.path}.{key}: {why}")

    def get(self, key: str, kind: type, default: Any) -> Any:
        if key not in self.table:
            return default
        value = self.table.pop(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self._bad(key, f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
            return default
        return value

    def size(self, key: str, default: int) -> int:
        if key not in self.table:
            return default
        try:
            return parse_size(self.table.pop(key))
        except ValueError as e:
            self._bad(key, str(e))
            return default

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value: str = self.get(key, str, default)
        if value not in choices:
            self._bad(key, f"must be one of {', '.join(choices)}; got {value!r}")
            return default
        return value

    def positive(self, key: str, kind: type, default: Any, *, allow_zero: bool = False) -> Any:
        value = self.get(key, kind, default)
        if value < 0 or (value == 0 and not allow_zero):
            self._bad(key, f"must be {'>= 0' if allow_zero else '> 0'}; got {value!r}")
            return default
        return value

    def strings(self, key: str) -> list[str]:
        # No value is echoed: a list of tokens typed as one string must not reach a log.
        value = self.table.pop(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self._bad(key, "expected a list of strings")
            return []
        return value

    def table_of(self, key: str) -> dict[str, Any]:
        value = self.table.pop(key, {})
        if not isinstance(value, dict):
            self._bad(key, "expected a table")
            return {}
        return value

    def section(self, key: str) -> _Reader:
        """A reader for the table at ``key`` ([server], [storage.embedded])."""
        path = f"{self.path}.{key}" if self.path else key
        return _Reader(self.table_of(key), path, self.problems, self.base)

    def check(self, value_ok: bool, key: str, why: str) -> None:
        if not value_ok:
            self._bad(key, why)

    def finish(self) -> None:
        for key in sorted(self.table):
            # The top level's keys are sections.
            where = f"{self.path}.{key}: unknown key" if self.path else f"{key}: unknown section"
            self.problems.append(where)


# How a field is read: (its section, its TOML key, its default) -> its value.
Read = Callable[[_Reader, str, Any], Any]
_T = TypeVar("_T", bound="DataclassInstance")
# A section's cross-field checks, run after its fields are read; returns the section.
Check = Callable[[_Reader, _T], _T]


def custom(default: Any, read: Read, key: str | None = None, *, repr: bool = True) -> Any:
    """A field read by ``read`` from TOML key ``key`` (default: the field's name)."""
    return field(default=default, repr=repr, metadata={"read": read, "key": key})


def flag(default: bool) -> Any:
    return custom(default, lambda r, k, d: r.get(k, bool, d))


def text(default: str) -> Any:
    return custom(default, lambda r, k, d: r.get(k, str, d))


def positive(default: float, *, zero_ok: bool = False) -> Any:
    """A number > 0 (>= 0 with ``zero_ok``).  The default's type is the kind: an int
    default takes integers only, a float default any number."""
    kind = type(default)
    return custom(default, lambda r, k, d: r.positive(k, kind, d, allow_zero=zero_ok))


def size(default: int, key: str | None = None) -> Any:
    """A byte count: an integer or a string such as "8MiB" (proxy.units)."""
    return custom(default, lambda r, k, d: r.size(k, d), key)


def size_or_none(default: int | None, key: str) -> Any:
    """A byte count where 0 means None (no limit)."""
    return custom(default, lambda r, k, d: r.size(k, d or 0) or None, key)


def choice(default: str, choices: tuple[str, ...]) -> Any:
    return custom(default, lambda r, k, d: r.choice(k, choices, d))


def strings(default: tuple[str, ...] = ()) -> Any:
    return custom(default, lambda r, k, d: tuple(r.strings(k)) if k in r.table else d)


def section(cls: type[_T], check: Check[_T] | None = None) -> Any:
    """A table read into ``cls`` by :func:`_read`, then checked by ``check``."""

    def read(r: _Reader, key: str, default: None) -> _T:
        return _read(cls, r.section(key), check)

    return field(default_factory=cls, metadata={"read": read, "key": None})


def _read(cls: type[_T], r: _Reader, check: Check[_T] | None) -> _T:
    """Each field of ``cls`` by its kind, then the section's checks, then its unknown keys."""
    values = {}
    for f in fields(cls):
        if "read" in f.metadata:
            # A section's default (its default_factory) is never used: _read builds it.
            default = None if f.default is MISSING else f.default
            values[f.name] = f.metadata["read"](r, f.metadata["key"] or f.name, default)
    cfg = cls(**values)
    if check is not None:
        cfg = check(r, cfg)
    r.finish()
    return cfg


def _split_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _metrics_listen(r: _Reader, key: str, default: None) -> tuple[str, int] | None:
    if value := r.get(key, str, ""):
        try:
            return _split_listen(value)
        except ValueError as e:
            r.check(False, key, str(e))
    return default


def _networks(
    r: _Reader, key: str, default: tuple[()]
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for value in r.strings(key):
        try:
            out.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            r.check(False, key, f"not an IP address or CIDR: {value!r}")
    return tuple(out)


@dataclass(frozen=True)
class ServerConfig:
    # Both from listen = "HOST:PORT" (_check_server reads it).
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    drain_timeout_s: float = positive(30.0, zero_ok=True)
    lingering_time_s: float = positive(5.0, zero_ok=True)
    # None: /metrics is served on the main listener only.
    metrics_listen: tuple[str, int] | None = custom(None, _metrics_listen)
    max_header_bytes: int = size(16 * 1024)
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = custom(
        (), _networks
    )
    status_interval_s: float = positive(10.0)
    header_timeout_s: float = positive(15.0)
    keepalive_timeout_s: float = positive(30.0)
    max_connections: int = positive(256)
    max_connections_per_client: int = positive(32)
    send_timeout_s: float = positive(60.0)


def _check_server(r: _Reader, cfg: ServerConfig) -> ServerConfig:
    host, port = cfg.listen_host, cfg.listen_port
    try:
        host, port = _split_listen(r.get("listen", str, f"{host}:{port}"))
    except ValueError as e:
        r.check(False, "listen", str(e))
    r.check(
        cfg.metrics_listen != (host, port) or port == 0,
        "metrics_listen",
        "must differ from listen (/metrics is served there anyway)",
    )
    r.check(
        1024 <= cfg.max_header_bytes <= 1024 * 1024,
        "max_header_bytes",
        f"must be between 1KiB and 1MiB; got {cfg.max_header_bytes}",
    )
    return replace(cfg, listen_host=host, listen_port=port)


@dataclass(frozen=True)
class UploadConfig:
    key_prefix: str = text("")
    overwrite: bool = flag(False)
    max_upload_size_bytes: int = size(64 * GiB, "max_upload_size")
    part_size_bytes: int = size(8 * MiB, "part_size")
    parts_in_flight: int = positive(2)
    memory_budget_bytes: int = size(256 * MiB, "memory_budget")
    admission_timeout_s: float = positive(5.0)
    idle_timeout_s: float = positive(60.0)
    part_checksum: str = choice("none", PART_CHECKSUMS)
    hash_in_thread: bool = flag(True)
    stale_upload_after_s: float = positive(86400.0, zero_ok=True)
    sweep_interval_s: float = positive(3600.0)
    # "": the built-in naming (POST: {id}{ext}; tus: {storage id}/{filename}); see proxy.naming.
    key_template: str = text("")


def _check_upload(r: _Reader, cfg: UploadConfig) -> UploadConfig:
    if cfg.key_template:
        try:
            KeyTemplate.parse(cfg.key_template)
        except ValueError as e:
            r.check(False, "key_template", str(e))
    r.check(
        cfg.stale_upload_after_s == 0 or cfg.stale_upload_after_s >= 60,
        "stale_upload_after_s",
        "must be 0 (sweeper off) or at least 60: a younger upload may still be running",
    )
    part = cfg.part_size_bytes
    r.check(
        S3_MIN_PART_BYTES <= part <= S3_MAX_PART_BYTES,
        "part_size",
        f"must be between 5MiB and 5GiB (S3 limits); got {part}",
    )
    r.check(
        cfg.max_upload_size_bytes <= part * S3_MAX_PARTS,
        "max_upload_size",
        f"{cfg.max_upload_size_bytes} bytes needs more than {S3_MAX_PARTS} parts of "
        f"{part} bytes; raise part_size or lower max_upload_size",
    )
    r.check(
        cfg.memory_budget_bytes >= part,
        "memory_budget",
        f"must hold at least one part ({part} bytes); got {cfg.memory_budget_bytes}",
    )
    r.check(
        cfg.key_prefix == "" or (not cfg.key_prefix.startswith("/") and ".." not in cfg.key_prefix),
        "key_prefix",
        "must not start with '/' or contain '..'",
    )
    return cfg


@dataclass(frozen=True)
class EmbeddedConfig:
    # Relative to the config file's folder.
    data_dir: Path = custom(Path("data/seaweedfs"), lambda r, k, d: r.base / r.get(k, str, str(d)))
    s3_port: int = positive(8333)
    weed_binary: str = text("")
    start_timeout_s: float = positive(60.0)
    # GOMEMLIMIT for weed; None: Go's default (no limit).
    memory_limit_bytes: int | None = size_or_none(256 * MiB, "memory_limit")


def _check_embedded(r: _Reader, cfg: EmbeddedConfig) -> EmbeddedConfig:
    r.check(cfg.s3_port < 55536, "s3_port", "must be < 55536 (SeaweedFS adds 10000 for gRPC)")
    r.check(
        cfg.memory_limit_bytes is None or cfg.memory_limit_bytes >= 64 * MiB,
        "memory_limit",
        f"must be 0 (no limit) or at least 64MiB; got {cfg.memory_limit_bytes}",
    )
    return cfg


@dataclass(frozen=True)
class StorageConfig:
    backend: str = choice("embedded", BACKENDS)
    bucket: str = text("uploads")
    endpoint_url: str = text("")
    region: str = text("us-east-1")
    addressing_style: str = choice("path", ADDRESSING_STYLES)
    verify_tls: bool = flag(True)
    ca_bundle: str = text("")
    credentials_file: str = text("")
    profile: str = text("")
    connect_timeout_s: float = positive(5.0)
    read_timeout_s: float = positive(60.0)
    retry_attempts: int = positive(4)
    retry_base_delay_s: float = positive(0.25, zero_ok=True)
    max_pool_connections: int = positive(32)
    embedded: EmbeddedConfig = section(EmbeddedConfig, _check_embedded)

    @property
    def operation_bound_s(self) -> float:
        """About the longest one S3 operation runs, retries included: every attempt's connect
        and read timeouts plus the longest backoffs between them (~262 s by default)."""
        attempts = self.retry_attempts
        backoff_s = self.retry_base_delay_s * ((1 << (attempts - 1)) - 1)
        return attempts * (self.connect_timeout_s + self.read_timeout_s) + backoff_s


def _check_storage(r: _Reader, cfg: StorageConfig) -> StorageConfig:
    r.check(
        re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", cfg.bucket) is not None,
        "bucket",
        f"must be a DNS-style bucket name (3-63 chars of a-z, 0-9, '.', '-'); got {cfg.bucket!r}",
    )
    if cfg.endpoint_url:
        r.check(
            cfg.endpoint_url.startswith(("http://", "https://")),
            "endpoint_url",
            f"must start with http:// or https://; got {cfg.endpoint_url!r}",
        )
    if cfg.credentials_file:
        path = Path(cfg.credentials_file)
        r.check(path.is_file(), "credentials_file", f"no such file: {cfg.credentials_file}")
    return cfg


@dataclass(frozen=True)
class MemoryConfig:
    limit_bytes: int | None = size_or_none(None, "limit")
    warning_ratio: float = positive(0.80)
    critical_ratio: float = positive(0.95)
    sample_interval_s: float = positive(5.0)


def _check_memory(r: _Reader, cfg: MemoryConfig) -> MemoryConfig:
    r.check(
        cfg.warning_ratio < cfg.critical_ratio <= 1.0,
        "critical_ratio",
        f"need warning_ratio < critical_ratio <= 1; got {cfg.warning_ratio} and "
        f"{cfg.critical_ratio}",
    )
    return cfg


def _read_secret_file(r: _Reader, key: str, path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        # The message names the file, never its content.
        r.check(False, key, f"cannot read {path}: {getattr(e, 'strerror', None) or e}")
        return ""


def _secret(r: _Reader, key: str, default: bytes) -> bytes:
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


def _token_hash(r: _Reader, key: str, entry: str, *, plain_ok: bool) -> bytes | None:
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


def _token_hashes(r: _Reader, list_key: str, default: tuple[bytes, ...]) -> tuple[bytes, ...]:
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


def _scoped_tokens(r: _Reader, key: str, default: tuple[()]) -> tuple[ScopedToken, ...]:
    """``scoped_tokens = [{tokens = ["sha256:…"] and/or token_file, scopes, prefix}]``."""
    entries = r.table.pop(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        r.check(False, key, "expected a list of tables {token, scopes, prefix}")
        return default
    out: list[ScopedToken] = []
    for i, entry in enumerate(entries):
        er = _Reader(entry, f"{r.path}.{key}[{i}]", r.problems, r.base)
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
class DownloadsConfig:
    """``GET``/``HEAD /uploads/{key}`` and ``GET /files/{id}``: off unless configured."""

    enabled: bool = flag(False)
    # Downloads at once; each holds one S3 connection while its client reads.
    max_concurrent: int = positive(16)
    # Longest one write to a client may wait for it to read, before the download is cut.
    send_timeout_s: float = positive(60.0)


@dataclass(frozen=True)
class AuthConfig:
    """Who may upload.  Only hashes of tokens are kept; the secret never appears in a repr."""

    mode: str = choice("required", AUTH_MODES)
    # From tokens and token_file.
    token_sha256: tuple[bytes, ...] = custom((), _token_hashes, "tokens", repr=False)
    signing_secret: bytes = custom(b"", _secret, "signing_secret_file", repr=False)
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


def _check_auth(r: _Reader, cfg: AuthConfig) -> AuthConfig:
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


def _matching(pattern: re.Pattern[str], what: str, normalise: Callable[[str], str]) -> Read:
    """A list of strings, each normalised, then matched against ``pattern``."""

    def read(r: _Reader, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        values = tuple(normalise(v) for v in r.strings(key))
        for v in values:
            r.check(pattern.match(v) is not None, key, f"not {what}: {v!r}")
        return values

    return read


def _dotted(extension: str) -> str:
    extension = extension.strip().lower()
    return extension if extension.startswith(".") else "." + extension


@dataclass(frozen=True)
class LimitsConfig:
    max_concurrent_uploads: int = positive(64)
    max_uploads_per_client: int = positive(8)
    allowed_content_types: tuple[str, ...] = custom(
        (),
        _matching(
            _MEDIA_TYPE_RE,
            'a media type such as "image/png" or "image/*"',
            lambda t: t.strip().lower(),
        ),
    )
    allowed_extensions: tuple[str, ...] = custom(
        (),
        _matching(_EXTENSION_RE, 'an extension such as ".jpg" (1-16 letters or digits)', _dotted),
    )
    # 0: default_client_buffer_bytes(upload) (from_dict fills it in).
    max_buffer_bytes_per_client: int = size(0)
    min_body_rate_bytes_per_s: int = size(4096)
    body_rate_grace_s: float = positive(30.0)


def default_client_buffer_bytes(upload: UploadConfig) -> int:
    """A quarter of the budget, but at least what one upload uses at full speed (one part
    filling, ``parts_in_flight`` sending), and never more than the budget."""
    full_speed = (upload.parts_in_flight + 1) * upload.part_size_bytes
    budget = upload.memory_budget_bytes
    return min(budget, max(budget // 4, full_speed))


@dataclass(frozen=True)
class LoggingConfig:
    level: str = choice("info", LOG_LEVELS)
    format: str = choice("text", LOG_FORMATS)


def _origins(r: _Reader, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    origins: list[Any] = r.get(key, list, list(default))
    r.check(
        all(isinstance(o, str) and re.fullmatch(r"\*|https?://[^/\s]+", o) for o in origins),
        key,
        f'must list "*" or origins like "https://app.example.com" (no path); got {origins!r}',
    )
    return tuple(str(o) for o in origins)


@dataclass(frozen=True)
class TusConfig:
    enabled: bool = flag(True)
    base_path: str = text("/files/")
    state_prefix: str = text(".tus/")
    object_prefix: str = text("tus/")
    expire_after_s: float = positive(86400.0)
    max_lifetime_s: float = positive(7 * 86400.0)
    sweep_interval_s: float = positive(600.0, zero_ok=True)
    lock_lease_s: float = positive(30.0)
    cors_allow_origins: tuple[str, ...] = custom((), _origins)
    cors_max_age_s: int = positive(86400, zero_ok=True)
    max_unfinished_per_principal: int = positive(20, zero_ok=True)  # 0: no cap
    # IETF resumable uploads: announce the upload URL in a 104 interim answer (off: nginx
    # desynchronises on a 1xx other than 100/103 from an HTTP/1.1 backend, its ticket 1427).
    send_104: bool = flag(False)

    def expiry_s(self, created_s: float, active_s: float) -> float:
        """When an unfinished upload expires: ``expire_after_s`` after its last sign of
        life (``active_s``), but never later than ``max_lifetime_s`` after its creation,
        whatever the activity (S3 lifecycle rules count from the creation too)."""
        return min(active_s + self.expire_after_s, created_s + self.max_lifetime_s)


def _check_tus(r: _Reader, cfg: TusConfig) -> TusConfig:
    r.check(
        re.fullmatch(r"/(?:[A-Za-z0-9._~-]+/)*", cfg.base_path) is not None,
        "base_path",
        f"must start and end with '/' and hold only URL-safe path segments; got {cfg.base_path!r}",
    )
    _check_own_prefix(r, "state_prefix", cfg.state_prefix)
    r.check(
        re.fullmatch(r"(?:[A-Za-z0-9_~-][A-Za-z0-9._~-]*/)+", cfg.object_prefix) is not None,
        "object_prefix",
        "must be one or more key segments each ending with '/' (letters, digits, '._~-', "
        f"not starting with '.'); got {cfg.object_prefix!r}",
    )
    r.check(cfg.lock_lease_s >= 3, "lock_lease_s", f"must be >= 3 s; got {cfg.lock_lease_s}")
    return cfg


def _check_own_prefix(r: _Reader, key: str, prefix: str) -> None:
    """A bucket prefix the proxy keeps for its own objects (tus state, content index)."""
    r.check(
        prefix.endswith("/") and not prefix.startswith("/") and ".." not in prefix,
        key,
        f"must end with '/', not start with '/' nor contain '..'; got {prefix!r}",
    )


HOOK_EVENTS = (
    "pre-create",
    "post-create",
    "post-receive",
    "pre-finish",
    "post-finish",
    "post-terminate",
    "post-fail",
)


def _exec_path(r: _Reader, key: str, default: str) -> str:
    path = r.get(key, str, default)
    return str(r.base / path) if path and not Path(path).is_absolute() else path


@dataclass(frozen=True)
class HooksConfig:
    """Where upload events go (proxy.hooks).  No http_url and no exec_path: hooks are off."""

    http_url: str = text("")
    http_secret: bytes = custom(b"", _secret, "http_secret_file", repr=False)
    # Relative to the config file's folder.
    exec_path: str = custom("", _exec_path)
    events: tuple[str, ...] = strings(("pre-create", "post-finish", "post-terminate", "post-fail"))
    timeout_s: float = positive(10.0)
    progress_interval_s: float = positive(10.0)
    retry_max_delay_s: float = positive(300.0)
    outbox_poll_interval_s: float = positive(10.0)

    @property
    def enabled(self) -> bool:
        return bool(self.http_url or self.exec_path)


def _check_hooks(r: _Reader, cfg: HooksConfig) -> HooksConfig:
    bad = [e for e in cfg.events if e not in HOOK_EVENTS]
    r.check(not bad, "events", f"unknown event(s) {bad!r}; known: {', '.join(HOOK_EVENTS)}")
    r.check(
        not (cfg.http_url and cfg.exec_path),
        "exec_path",
        "set http_url or exec_path, not both: each event goes to one receiver",
    )
    r.check(
        not cfg.http_url or re.fullmatch(r"https?://[^\s/]+(/\S*)?", cfg.http_url) is not None,
        "http_url",
        f"must be an http:// or https:// URL; got {cfg.http_url!r}",
    )
    r.check(
        not cfg.http_url or "http_secret_file" in r.given,
        "http_secret_file",
        "is required with http_url: receivers must be able to tell our requests from forgeries",
    )
    r.check(
        not cfg.exec_path or os.access(cfg.exec_path, os.X_OK),
        "exec_path",
        f"{cfg.exec_path!r} is not an executable file",
    )
    return cfg


@dataclass(frozen=True)
class DedupConfig:
    """Instant uploads by SHA-256 (see proxy/engine/dedup.py)."""

    enabled: bool = flag(True)
    index_prefix: str = text(".dedup/")


def _check_dedup(r: _Reader, cfg: DedupConfig) -> DedupConfig:
    _check_own_prefix(r, "index_prefix", cfg.index_prefix)
    return cfg


@dataclass(frozen=True)
class PageConfig:
    """The browser upload page (proxy/webui/static/) and its upload links."""

    enabled: bool = flag(False)
    path: str = text("/upload/")
    # Where senders reach the daemon, for the links `upload-proxy link` prints; "": the
    # listen address (fine on loopback only).  A trailing "/" is dropped.
    public_url: str = custom("", lambda r, k, d: r.get(k, str, d).rstrip("/"))
    chunk_size_bytes: int = size(64 * MiB, "chunk_size")
    revocation_check_s: float = positive(10.0)


def _check_page(r: _Reader, cfg: PageConfig) -> PageConfig:
    r.check(
        re.fullmatch(r"/(?:[A-Za-z0-9._~-]+/)+", cfg.path) is not None,
        "path",
        "must start and end with '/', name at least one segment and hold only URL-safe "
        f"path segments; got {cfg.path!r}",
    )
    r.check(
        cfg.public_url == ""
        or re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", cfg.public_url) is not None,
        "public_url",
        f'must be "" or like "https://uploads.example.org" (no query); got {cfg.public_url!r}',
    )
    r.check(
        MiB <= cfg.chunk_size_bytes <= S3_MAX_PART_BYTES,
        "chunk_size",
        f"must be between 1MiB and 5GiB; got {cfg.chunk_size_bytes}",
    )
    r.check(
        cfg.revocation_check_s >= 1,
        "revocation_check_s",
        f"must be >= 1 s; got {cfg.revocation_check_s}",
    )
    return cfg


@dataclass(frozen=True)
class Config:
    server: ServerConfig = section(ServerConfig, _check_server)
    upload: UploadConfig = section(UploadConfig, _check_upload)
    storage: StorageConfig = section(StorageConfig, _check_storage)
    memory: MemoryConfig = section(MemoryConfig, _check_memory)
    auth: AuthConfig = section(AuthConfig, _check_auth)
    limits: LimitsConfig = section(LimitsConfig)
    logging: LoggingConfig = section(LoggingConfig)
    tus: TusConfig = section(TusConfig, _check_tus)
    page: PageConfig = section(PageConfig, _check_page)
    dedup: DedupConfig = section(DedupConfig, _check_dedup)
    downloads: DownloadsConfig = section(DownloadsConfig)
    hooks: HooksConfig = section(HooksConfig, _check_hooks)


def from_dict(
    data: dict[str, Any], *, base_dir: Path | None = None, source: str = "config"
) -> Config:
    """Build a validated :class:`Config`; raise one :class:`ConfigError` listing every problem."""
    problems: list[str] = []
    cfg = _read(Config, _Reader(data, "", problems, base_dir or Path.cwd()), _check_config)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _check_config(r: _Reader, cfg: Config) -> Config:
    """What one section asks of another; fills in limits.max_buffer_bytes_per_client."""
    r.problems.extend(_budget_conflicts(cfg))
    r.problems.extend(_tus_overlaps(cfg.upload, cfg.tus))
    r.problems.extend(_page_conflicts(cfg.page, cfg.tus))
    r.problems.extend(_dedup_overlaps(cfg))
    if cfg.limits.max_buffer_bytes_per_client:
        return cfg
    client_buffer_bytes = default_client_buffer_bytes(cfg.upload)
    return replace(cfg, limits=replace(cfg.limits, max_buffer_bytes_per_client=client_buffer_bytes))


def _budget_conflicts(cfg: Config) -> list[str]:
    """upload.memory_budget must stay under the process' memory limit, and hold one
    client's buffers (at least one part)."""
    part, budget = cfg.upload.part_size_bytes, cfg.upload.memory_budget_bytes
    limit, client = cfg.memory.limit_bytes or 0, cfg.limits.max_buffer_bytes_per_client
    problems = []
    if not (limit == 0 or limit > budget):
        problems.append(
            f"memory.limit: must exceed upload.memory_budget ({budget} bytes): the part "
            f"buffers alone would reach it; got {limit}"
        )
    if not (client == 0 or part <= client <= budget):
        problems.append(
            "limits.max_buffer_bytes_per_client: must be 0 (the default share) or between "
            f"part_size ({part}) and memory_budget ({budget}); got {client}"
        )
    return problems


def _page_conflicts(page: PageConfig, tus: TusConfig) -> list[str]:
    """The page's path must not shadow or be shadowed by another route."""
    if not page.enabled:
        return []
    problems = []
    if not tus.enabled:
        problems.append("page.enabled: the upload page sends files over tus; set tus.enabled")
    taken = (tus.base_path, "/uploads/", "/healthz/", "/readyz/", "/status/", "/metrics/")
    if any(page.path.startswith(p) or p.startswith(page.path) for p in taken):
        problems.append(
            f"page.path: {page.path!r} overlaps another route (tus.base_path {tus.base_path!r}, "
            "/uploads, /healthz, /readyz, /status or /metrics)"
        )
    return problems


def _tus_overlaps(upload: UploadConfig, tus: TusConfig) -> list[str]:
    """Where plain objects, tus objects and tus state live must not overlap.

    The tus state of upload ``<id>`` is every object under ``<state_prefix><id>/``, all
    deleted when the upload ends; the sweeper reads everything under ``state_prefix``.
    A ``key_prefix`` inside (or equal to) ``state_prefix`` puts objects there, and
    ``key_prefix + object_prefix`` (where tus objects go) overlapping ``state_prefix``
    either way can make ``<id>/`` one folder for both: finishing an upload would delete
    its own object.  The state prefix inside ``key_prefix`` is fine (the shipped default,
    key_prefix = "", is that): plain uploads are refused under ``state_prefix``."""
    problems = []
    kp, sp = upload.key_prefix, tus.state_prefix
    objects = kp + tus.object_prefix
    if kp.startswith(sp):
        problems.append(
            f"upload.key_prefix: {kp!r} lies inside tus.state_prefix {sp!r}; the tus state "
            "cleanup would delete uploaded objects: give them separate prefixes"
        )
    elif objects.startswith(sp) or sp.startswith(objects):
        problems.append(
            f"tus.object_prefix: tus objects ({objects!r}) and tus.state_prefix ({sp!r}) "
            "overlap; the tus state cleanup would delete finished uploads: give them "
            "separate prefixes"
        )
    return problems


def _dedup_overlaps(cfg: Config) -> list[str]:
    """The content index lives apart from everything else: a key_prefix inside it would
    let uploads write index entries, and the tus prefixes overlapping it either way would
    let one cleanup delete the other's objects.  The index inside key_prefix is fine (the
    default, key_prefix = "", is that): plain uploads are refused under index_prefix."""
    if not cfg.dedup.enabled:
        return []
    ip = cfg.dedup.index_prefix
    problems = []
    if cfg.upload.key_prefix.startswith(ip):
        problems.append(
            f"upload.key_prefix: {cfg.upload.key_prefix!r} lies inside dedup.index_prefix "
            f"{ip!r}; uploads could write index entries: give them separate prefixes"
        )
    tus_prefixes = (cfg.tus.state_prefix, cfg.upload.key_prefix + cfg.tus.object_prefix)
    for other in tus_prefixes if cfg.tus.enabled else ():
        if other.startswith(ip) or ip.startswith(other):
            problems.append(
                f"dedup.index_prefix: {ip!r} and the tus prefix {other!r} overlap: give "
                "them separate prefixes"
            )
    return problems


def advisories(cfg: Config) -> list[str]:
    """Settings that are valid but probably not what was meant; logged at start.

    ``server.max_connections`` below or at ``limits.max_concurrent_uploads`` is coherent
    (the smaller cap wins, and tests use tiny connection caps), so it is not a
    :class:`ConfigError`; but the upload limit is then never reached and a listener full
    of uploads answers health checks and tus HEADs with 503."""
    out = []
    conns, uploads = cfg.server.max_connections, cfg.limits.max_concurrent_uploads
    if conns <= uploads:
        out.append(
            f"server.max_connections ({conns}) <= limits.max_concurrent_uploads ({uploads}):"
            f" at most {conns} uploads run at once, and a listener full of uploads refuses"
            " health checks; keep max_connections above max_concurrent_uploads"
        )
    return out


def load(path: str | Path) -> Config:
    """Read and validate a TOML config file.  Relative paths inside it are relative to it."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError([f"cannot read {p}: {e.strerror}"], str(p)) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"not valid TOML: {e}"], str(p)) from e
    return from_dict(data, base_dir=p.resolve().parent, source=str(p))
