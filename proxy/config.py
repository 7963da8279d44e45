"""config.toml -> frozen dataclasses, validated at load.

The shipped ``config.toml`` is the reference: every key is documented there
(meaning, default, trade-off).  Loading never stops at the first problem: all
unknown keys and bad values are collected into one :class:`ConfigError`, so an
operator fixes the file in one go.  ``python -m proxy`` exits 78 (EX_CONFIG) on it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from proxy.naming import KeyTemplate
from proxy.units import parse_size

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


@dataclass(frozen=True)
class ServerConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    drain_timeout_s: float = 30.0
    lingering_time_s: float = 5.0
    # None: /metrics is served on the main listener only.
    metrics_listen: tuple[str, int] | None = None
    max_header_bytes: int = 16 * 1024
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    status_interval_s: float = 10.0
    header_timeout_s: float = 15.0
    keepalive_timeout_s: float = 30.0
    max_connections: int = 256
    max_connections_per_client: int = 32
    send_timeout_s: float = 60.0


@dataclass(frozen=True)
class UploadConfig:
    key_prefix: str = ""
    overwrite: bool = False
    max_upload_size_bytes: int = 64 * GiB
    part_size_bytes: int = 8 * MiB
    parts_in_flight: int = 2
    memory_budget_bytes: int = 256 * MiB
    admission_timeout_s: float = 5.0
    idle_timeout_s: float = 60.0
    part_checksum: str = "none"
    hash_in_thread: bool = True
    stale_upload_after_s: float = 86400.0
    sweep_interval_s: float = 3600.0
    # "": the built-in naming (POST: {id}{ext}; tus: {storage id}/{filename}); see proxy.naming.
    key_template: str = ""


@dataclass(frozen=True)
class EmbeddedConfig:
    data_dir: Path = Path("data/seaweedfs")
    s3_port: int = 8333
    weed_binary: str = ""
    start_timeout_s: float = 60.0
    # GOMEMLIMIT for weed; None: Go's default (no limit).
    memory_limit_bytes: int | None = 256 * MiB


@dataclass(frozen=True)
class StorageConfig:
    backend: str = "embedded"
    bucket: str = "uploads"
    endpoint_url: str = ""
    region: str = "us-east-1"
    addressing_style: str = "path"
    verify_tls: bool = True
    ca_bundle: str = ""
    credentials_file: str = ""
    profile: str = ""
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    retry_attempts: int = 4
    retry_base_delay_s: float = 0.25
    max_pool_connections: int = 32
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)

    @property
    def operation_bound_s(self) -> float:
        """About the longest one S3 operation runs, retries included: every attempt's connect
        and read timeouts plus the longest backoffs between them (~262 s by default)."""
        attempts = self.retry_attempts
        backoff_s = self.retry_base_delay_s * ((1 << (attempts - 1)) - 1)
        return attempts * (self.connect_timeout_s + self.read_timeout_s) + backoff_s


@dataclass(frozen=True)
class MemoryConfig:
    limit_bytes: int | None = None
    warning_ratio: float = 0.80
    critical_ratio: float = 0.95
    sample_interval_s: float = 5.0


@dataclass(frozen=True)
class ScopedToken:
    """A bearer token's hash with what it may do: ``scopes`` (of :data:`TOKEN_SCOPES`) on
    keys under ``prefix`` (relative to ``upload.key_prefix``; empty: every key)."""

    sha256: bytes = field(repr=False)
    scopes: frozenset[str]
    prefix: str = ""


@dataclass(frozen=True)
class DownloadsConfig:
    """``GET``/``HEAD /uploads/{key}`` and ``GET /files/{id}``: off unless configured."""

    enabled: bool = False
    # Downloads at once; each holds one S3 connection while its client reads.
    max_concurrent: int = 16
    # Longest one write to a client may wait for it to read, before the download is cut.
    send_timeout_s: float = 60.0


@dataclass(frozen=True)
class AuthConfig:
    """Who may upload.  Only hashes of tokens are kept; the secret never appears in a repr."""

    mode: str = "required"
    token_sha256: tuple[bytes, ...] = field(default=(), repr=False)
    signing_secret: bytes = field(default=b"", repr=False)
    # Tokens that may read /status in full (upload ids and keys); never upload tokens.
    operator_token_sha256: tuple[bytes, ...] = field(default=(), repr=False)
    # A week: the longest an S3 (SigV4) presigned URL lives.
    signed_url_max_lifetime_s: float = 7 * 86400.0
    # Tokens with scopes and an optional key prefix (``tokens`` above mean upload only).
    scoped_tokens: tuple[ScopedToken, ...] = field(default=(), repr=False)

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


@dataclass(frozen=True)
class LimitsConfig:
    max_concurrent_uploads: int = 64
    max_uploads_per_client: int = 8
    allowed_content_types: tuple[str, ...] = ()
    allowed_extensions: tuple[str, ...] = ()
    # 0: default_client_buffer_bytes(upload) (from_dict fills it in).
    max_buffer_bytes_per_client: int = 0
    min_body_rate_bytes_per_s: int = 4096
    body_rate_grace_s: float = 30.0


def default_client_buffer_bytes(upload: UploadConfig) -> int:
    """A quarter of the budget, but at least what one upload uses at full speed (one part
    filling, ``parts_in_flight`` sending), and never more than the budget."""
    full_speed = (upload.parts_in_flight + 1) * upload.part_size_bytes
    budget = upload.memory_budget_bytes
    return min(budget, max(budget // 4, full_speed))


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class TusConfig:
    enabled: bool = True
    base_path: str = "/files/"
    state_prefix: str = ".tus/"
    object_prefix: str = "tus/"
    expire_after_s: float = 86400.0
    max_lifetime_s: float = 7 * 86400.0
    sweep_interval_s: float = 600.0
    lock_lease_s: float = 30.0
    cors_allow_origins: tuple[str, ...] = ()
    cors_max_age_s: int = 86400
    max_unfinished_per_principal: int = 20  # 0: no cap
    # IETF resumable uploads: announce the upload URL in a 104 interim answer (off: nginx
    # desynchronises on a 1xx other than 100/103 from an HTTP/1.1 backend, its ticket 1427).
    send_104: bool = False

    def expiry_s(self, created_s: float, active_s: float) -> float:
        """When an unfinished upload expires: ``expire_after_s`` after its last sign of
        life (``active_s``), but never later than ``max_lifetime_s`` after its creation,
        whatever the activity (S3 lifecycle rules count from the creation too)."""
        return min(active_s + self.expire_after_s, created_s + self.max_lifetime_s)


HOOK_EVENTS = (
    "pre-create",
    "post-create",
    "post-receive",
    "pre-finish",
    "post-finish",
    "post-terminate",
    "post-fail",
)


@dataclass(frozen=True)
class HooksConfig:
    """Where upload events go (proxy.hooks).  No http_url and no exec_path: hooks are off."""

    http_url: str = ""
    http_secret: bytes = field(default=b"", repr=False)
    exec_path: str = ""
    events: tuple[str, ...] = ("pre-create", "post-finish", "post-terminate", "post-fail")
    timeout_s: float = 10.0
    progress_interval_s: float = 10.0
    retry_max_delay_s: float = 300.0
    outbox_poll_interval_s: float = 10.0

    @property
    def enabled(self) -> bool:
        return bool(self.http_url or self.exec_path)


@dataclass(frozen=True)
class PageConfig:
    """The browser upload page (proxy/webui/static/) and its upload links."""

    enabled: bool = False
    path: str = "/upload/"
    # Where senders reach the daemon, for the links `upload-proxy link` prints; "": the
    # listen address (fine on loopback only).
    public_url: str = ""
    chunk_size_bytes: int = 64 * MiB
    revocation_check_s: float = 10.0


@dataclass(frozen=True)
class DedupConfig:
    """Instant uploads by SHA-256 (see proxy/engine/dedup.py)."""

    enabled: bool = True
    index_prefix: str = ".dedup/"


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upload: UploadConfig = field(default_factory=UploadConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tus: TusConfig = field(default_factory=TusConfig)
    page: PageConfig = field(default_factory=PageConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    downloads: DownloadsConfig = field(default_factory=DownloadsConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)


class _Reader:
    """Pulls typed values out of one TOML table, recording problems instead of raising."""

    def __init__(self, table: dict[str, Any], path: str, problems: list[str]) -> None:
        self.table = dict(table)
        self.path = path
        self.problems = problems

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

    def check(self, value_ok: bool, key: str, why: str) -> None:
        if not value_ok:
            self._bad(key, why)

    def finish(self) -> None:
        for key in sorted(self.table):
            self.problems.append(f"{self.path}.{key}: unknown key")


def _split_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _server(r: _Reader) -> ServerConfig:
    d = ServerConfig()
    host, port = d.listen_host, d.listen_port
    listen = r.get("listen", str, f"{host}:{port}")
    try:
        host, port = _split_listen(listen)
    except ValueError as e:
        r.check(False, "listen", str(e))
    metrics_listen = None
    if value := r.get("metrics_listen", str, ""):
        try:
            metrics_listen = _split_listen(value)
        except ValueError as e:
            r.check(False, "metrics_listen", str(e))
    cfg = ServerConfig(
        listen_host=host,
        listen_port=port,
        drain_timeout_s=r.positive("drain_timeout_s", float, d.drain_timeout_s, allow_zero=True),
        lingering_time_s=r.positive("lingering_time_s", float, d.lingering_time_s, allow_zero=True),
        metrics_listen=metrics_listen,
        max_header_bytes=r.size("max_header_bytes", d.max_header_bytes),
        trusted_proxies=tuple(_networks(r, "trusted_proxies")),
        status_interval_s=r.positive("status_interval_s", float, d.status_interval_s),
        header_timeout_s=r.positive("header_timeout_s", float, d.header_timeout_s),
        keepalive_timeout_s=r.positive("keepalive_timeout_s", float, d.keepalive_timeout_s),
        max_connections=r.positive("max_connections", int, d.max_connections),
        max_connections_per_client=r.positive(
            "max_connections_per_client", int, d.max_connections_per_client
        ),
        send_timeout_s=r.positive("send_timeout_s", float, d.send_timeout_s),
    )
    r.check(
        metrics_listen != (host, port) or port == 0,
        "metrics_listen",
        "must differ from listen (/metrics is served there anyway)",
    )
    r.check(
        1024 <= cfg.max_header_bytes <= 1024 * 1024,
        "max_header_bytes",
        f"must be between 1KiB and 1MiB; got {cfg.max_header_bytes}",
    )
    r.finish()
    return cfg


def _networks(r: _Reader, key: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = []
    for value in r.strings(key):
        try:
            out.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            r.check(False, key, f"not an IP address or CIDR: {value!r}")
    return out


def _upload(r: _Reader) -> UploadConfig:
    d = UploadConfig()
    cfg = UploadConfig(
        key_prefix=r.get("key_prefix", str, d.key_prefix),
        overwrite=r.get("overwrite", bool, d.overwrite),
        max_upload_size_bytes=r.size("max_upload_size", d.max_upload_size_bytes),
        part_size_bytes=r.size("part_size", d.part_size_bytes),
        parts_in_flight=r.positive("parts_in_flight", int, d.parts_in_flight),
        memory_budget_bytes=r.size("memory_budget", d.memory_budget_bytes),
        admission_timeout_s=r.positive("admission_timeout_s", float, d.admission_timeout_s),
        idle_timeout_s=r.positive("idle_timeout_s", float, d.idle_timeout_s),
        part_checksum=r.choice("part_checksum", PART_CHECKSUMS, d.part_checksum),
        hash_in_thread=r.get("hash_in_thread", bool, d.hash_in_thread),
        stale_upload_after_s=r.positive(
            "stale_upload_after_s", float, d.stale_upload_after_s, allow_zero=True
        ),
        sweep_interval_s=r.positive("sweep_interval_s", float, d.sweep_interval_s),
        key_template=r.get("key_template", str, d.key_template),
    )
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
    r.finish()
    return cfg


def _embedded(r: _Reader, base: Path) -> EmbeddedConfig:
    d = EmbeddedConfig()
    data_dir = Path(r.get("data_dir", str, str(d.data_dir)))
    cfg = EmbeddedConfig(
        data_dir=data_dir if data_dir.is_absolute() else base / data_dir,
        s3_port=r.positive("s3_port", int, d.s3_port),
        weed_binary=r.get("weed_binary", str, d.weed_binary),
        start_timeout_s=r.positive("start_timeout_s", float, d.start_timeout_s),
        memory_limit_bytes=r.size("memory_limit", d.memory_limit_bytes or 0) or None,
    )
    r.check(cfg.s3_port < 55536, "s3_port", "must be < 55536 (SeaweedFS adds 10000 for gRPC)")
    r.check(
        cfg.memory_limit_bytes is None or cfg.memory_limit_bytes >= 64 * MiB,
        "memory_limit",
        f"must be 0 (no limit) or at least 64MiB; got {cfg.memory_limit_bytes}",
    )
    r.finish()
    return cfg


def _storage(r: _Reader, base: Path) -> StorageConfig:
    d = StorageConfig()
    embedded = _embedded(_Reader(r.table_of("embedded"), f"{r.path}.embedded", r.problems), base)
    bucket = r.get("bucket", str, d.bucket)
    cfg = StorageConfig(
        backend=r.choice("backend", BACKENDS, d.backend),
        bucket=bucket,
        endpoint_url=r.get("endpoint_url", str, d.endpoint_url),
        region=r.get("region", str, d.region),
        addressing_style=r.choice("addressing_style", ADDRESSING_STYLES, d.addressing_style),
        verify_tls=r.get("verify_tls", bool, d.verify_tls),
        ca_bundle=r.get("ca_bundle", str, d.ca_bundle),
        credentials_file=r.get("credentials_file", str, d.credentials_file),
        profile=r.get("profile", str, d.profile),
        connect_timeout_s=r.positive("connect_timeout_s", float, d.connect_timeout_s),
        read_timeout_s=r.positive("read_timeout_s", float, d.read_timeout_s),
        retry_attempts=r.positive("retry_attempts", int, d.retry_attempts),
        retry_base_delay_s=r.positive(
            "retry_base_delay_s", float, d.retry_base_delay_s, allow_zero=True
        ),
        max_pool_connections=r.positive("max_pool_connections", int, d.max_pool_connections),
        embedded=embedded,
    )
    r.check(
        re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", cfg.bucket) is not None,
        "bucket",
        f"must be a DNS-style bucket name (3-63 chars of a-z, 0-9, '.', '-'); got {bucket!r}",
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
    r.finish()
    return cfg


def _memory(r: _Reader, budget_bytes: int) -> MemoryConfig:
    d = MemoryConfig()
    limit = r.size("limit", 0)
    cfg = MemoryConfig(
        limit_bytes=limit or None,
        warning_ratio=r.positive("warning_ratio", float, d.warning_ratio),
        critical_ratio=r.positive("critical_ratio", float, d.critical_ratio),
        sample_interval_s=r.positive("sample_interval_s", float, d.sample_interval_s),
    )
    r.check(
        cfg.warning_ratio < cfg.critical_ratio <= 1.0,
        "critical_ratio",
        f"need warning_ratio < critical_ratio <= 1; got {cfg.warning_ratio} and "
        f"{cfg.critical_ratio}",
    )
    r.check(
        limit == 0 or limit > budget_bytes,
        "limit",
        f"must exceed upload.memory_budget ({budget_bytes} bytes): the part buffers alone "
        f"would reach it; got {limit}",
    )
    r.finish()
    return cfg


def _read_secret_file(r: _Reader, key: str, path_str: str) -> str:
    try:
        return Path(path_str).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        # The message names the file, never its content.
        r.check(False, key, f"cannot read {path_str}: {getattr(e, 'strerror', None) or e}")
        return ""


def _secret(r: _Reader, base: Path, key: str) -> bytes:
    """The secret in the file ``key`` names (b"" if none), at least MIN_SECRET_BYTES."""
    secret_file = r.get(key, str, "")
    if not secret_file:
        return b""
    path = Path(secret_file) if Path(secret_file).is_absolute() else base / secret_file
    secret = _read_secret_file(r, key, str(path)).strip().encode()
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


def _token_hashes(r: _Reader, base: Path, list_key: str, file_key: str) -> list[bytes]:
    """Hashes from a list of ``sha256:`` entries and from a token file (hashes or plain)."""
    hashes: list[bytes] = []
    for entry in r.strings(list_key):
        h = _token_hash(r, list_key, entry, plain_ok=False)
        if h is not None:
            hashes.append(h)
    token_file = r.get(file_key, str, "")
    if token_file:
        path = Path(token_file) if Path(token_file).is_absolute() else base / token_file
        for line in _read_secret_file(r, file_key, str(path)).splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                h = _token_hash(r, file_key, line, plain_ok=True)
                if h is not None:
                    hashes.append(h)
    return hashes


def _auth(r: _Reader, base: Path) -> AuthConfig:
    d = AuthConfig()
    mode = r.choice("mode", AUTH_MODES, d.mode)
    hashes = _token_hashes(r, base, "tokens", "token_file")
    operators = _token_hashes(r, base, "operator_tokens", "operator_token_file")
    r.check(
        not set(hashes) & set(operators),
        "operator_tokens",
        "a token is both an upload token and an operator token; give operators their own",
    )
    secret = _secret(r, base, "signing_secret_file")
    lifetime = r.positive("signed_url_max_lifetime_s", float, AuthConfig.signed_url_max_lifetime_s)
    scoped = _scoped_tokens(r, base)
    taken = set(hashes) | set(operators)
    r.check(
        not any(t.sha256 in taken for t in scoped)
        and len({t.sha256 for t in scoped}) == len(scoped),
        "scoped_tokens",
        "a token is listed twice (in tokens, operator_tokens or scoped_tokens): one entry each",
    )
    r.check(
        mode == "none" or bool(hashes) or bool(secret) or bool(scoped),
        "mode",
        '"required" needs tokens, scoped_tokens, a token_file or a signing_secret_file; '
        'set mode = "none" to accept uploads from anyone who can reach the port',
    )
    r.finish()
    return AuthConfig(
        mode=mode,
        token_sha256=tuple(hashes),
        signing_secret=secret,
        operator_token_sha256=tuple(operators),
        signed_url_max_lifetime_s=lifetime,
        scoped_tokens=tuple(scoped),
    )


def _scoped_tokens(r: _Reader, base: Path) -> list[ScopedToken]:
    """``scoped_tokens = [{tokens = ["sha256:…"] and/or token_file, scopes, prefix}]``."""
    entries = r.table.pop("scoped_tokens", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        r.check(False, "scoped_tokens", "expected a list of tables {token, scopes, prefix}")
        return []
    out: list[ScopedToken] = []
    for i, entry in enumerate(entries):
        er = _Reader(entry, f"{r.path}.scoped_tokens[{i}]", r.problems)
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
        hashes = _token_hashes(er, base, "tokens", "token_file")
        er.check(bool(hashes), "tokens", "give the token's hash in tokens or a token_file")
        er.finish()
        out += [ScopedToken(h, frozenset(scopes), prefix) for h in hashes]
    return out


def _downloads(r: _Reader) -> DownloadsConfig:
    d = DownloadsConfig()
    cfg = DownloadsConfig(
        enabled=r.get("enabled", bool, d.enabled),
        max_concurrent=r.positive("max_concurrent", int, d.max_concurrent),
        send_timeout_s=r.positive("send_timeout_s", float, d.send_timeout_s),
    )
    r.finish()
    return cfg


def _limits(r: _Reader, upload: UploadConfig) -> LimitsConfig:
    d = LimitsConfig()
    types = [t.strip().lower() for t in r.strings("allowed_content_types")]
    for t in types:
        r.check(
            _MEDIA_TYPE_RE.match(t) is not None,
            "allowed_content_types",
            f'not a media type such as "image/png" or "image/*": {t!r}',
        )
    exts = [e.strip().lower() for e in r.strings("allowed_extensions")]
    exts = [e if e.startswith(".") else "." + e for e in exts]
    for e in exts:
        r.check(
            _EXTENSION_RE.match(e) is not None,
            "allowed_extensions",
            f'not an extension such as ".jpg" (1-16 letters or digits): {e!r}',
        )
    client_buffer_bytes = r.size("max_buffer_bytes_per_client", 0)
    cfg = LimitsConfig(
        max_concurrent_uploads=r.positive("max_concurrent_uploads", int, d.max_concurrent_uploads),
        max_uploads_per_client=r.positive("max_uploads_per_client", int, d.max_uploads_per_client),
        allowed_content_types=tuple(types),
        allowed_extensions=tuple(exts),
        max_buffer_bytes_per_client=client_buffer_bytes or default_client_buffer_bytes(upload),
        min_body_rate_bytes_per_s=r.size("min_body_rate_bytes_per_s", d.min_body_rate_bytes_per_s),
        body_rate_grace_s=r.positive("body_rate_grace_s", float, d.body_rate_grace_s),
    )
    part, budget = upload.part_size_bytes, upload.memory_budget_bytes
    r.check(
        client_buffer_bytes == 0 or part <= client_buffer_bytes <= budget,
        "max_buffer_bytes_per_client",
        f"must be 0 (the default share) or between part_size ({part}) and memory_budget "
        f"({budget}); got {client_buffer_bytes}",
    )
    r.finish()
    return cfg


def _logging(r: _Reader) -> LoggingConfig:
    d = LoggingConfig()
    cfg = LoggingConfig(
        level=r.choice("level", LOG_LEVELS, d.level),
        format=r.choice("format", LOG_FORMATS, d.format),
    )
    r.finish()
    return cfg


def _tus(r: _Reader) -> TusConfig:
    d = TusConfig()
    origins: list[Any] = r.get("cors_allow_origins", list, list(d.cors_allow_origins))
    cfg = TusConfig(
        enabled=r.get("enabled", bool, d.enabled),
        base_path=r.get("base_path", str, d.base_path),
        state_prefix=r.get("state_prefix", str, d.state_prefix),
        object_prefix=r.get("object_prefix", str, d.object_prefix),
        expire_after_s=r.positive("expire_after_s", float, d.expire_after_s),
        max_lifetime_s=r.positive("max_lifetime_s", float, d.max_lifetime_s),
        sweep_interval_s=r.positive("sweep_interval_s", float, d.sweep_interval_s, allow_zero=True),
        lock_lease_s=r.positive("lock_lease_s", float, d.lock_lease_s),
        cors_allow_origins=tuple(str(o) for o in origins),
        cors_max_age_s=r.positive("cors_max_age_s", int, d.cors_max_age_s, allow_zero=True),
        max_unfinished_per_principal=r.positive(
            "max_unfinished_per_principal", int, d.max_unfinished_per_principal, allow_zero=True
        ),
        send_104=r.get("send_104", bool, d.send_104),
    )
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
    origin_re = re.compile(r"\*|https?://[^/\s]+")
    r.check(
        all(isinstance(o, str) and origin_re.fullmatch(o) for o in origins),
        "cors_allow_origins",
        f'must list "*" or origins like "https://app.example.com" (no path); got {origins!r}',
    )
    r.check(cfg.lock_lease_s >= 3, "lock_lease_s", f"must be >= 3 s; got {cfg.lock_lease_s}")
    r.finish()
    return cfg


def _page(r: _Reader) -> PageConfig:
    d = PageConfig()
    cfg = PageConfig(
        enabled=r.get("enabled", bool, d.enabled),
        path=r.get("path", str, d.path),
        public_url=r.get("public_url", str, d.public_url).rstrip("/"),
        chunk_size_bytes=r.size("chunk_size", d.chunk_size_bytes),
        revocation_check_s=r.positive("revocation_check_s", float, d.revocation_check_s),
    )
    r.check(
        re.fullmatch(r"/(?:[A-Za-z0-9._~-]+/)+", cfg.path) is not None,
        "path",
        "must start and end with '/', name at least one segment and hold only URL-safe "
        f"path segments; got {cfg.path!r}",
    )
    url_re = re.compile(r"https?://[^/\s?#]+(/[^\s?#]*)?")
    r.check(
        cfg.public_url == "" or url_re.fullmatch(cfg.public_url) is not None,
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
    r.finish()
    return cfg


def _dedup(r: _Reader) -> DedupConfig:
    d = DedupConfig()
    cfg = DedupConfig(
        enabled=r.get("enabled", bool, d.enabled),
        index_prefix=r.get("index_prefix", str, d.index_prefix),
    )
    _check_own_prefix(r, "index_prefix", cfg.index_prefix)
    r.finish()
    return cfg


def _hooks(r: _Reader, base: Path) -> HooksConfig:
    d = HooksConfig()
    events = r.strings("events") if "events" in r.table else list(d.events)
    has_secret_file = "http_secret_file" in r.table
    secret = _secret(r, base, "http_secret_file")
    exec_path = r.get("exec_path", str, d.exec_path)
    if exec_path and not Path(exec_path).is_absolute():
        exec_path = str(base / exec_path)
    cfg = HooksConfig(
        http_url=r.get("http_url", str, d.http_url),
        http_secret=secret,
        exec_path=exec_path,
        events=tuple(events),
        timeout_s=r.positive("timeout_s", float, d.timeout_s),
        progress_interval_s=r.positive("progress_interval_s", float, d.progress_interval_s),
        retry_max_delay_s=r.positive("retry_max_delay_s", float, d.retry_max_delay_s),
        outbox_poll_interval_s=r.positive(
            "outbox_poll_interval_s", float, d.outbox_poll_interval_s
        ),
    )
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
        not cfg.http_url or has_secret_file,
        "http_secret_file",
        "is required with http_url: receivers must be able to tell our requests from forgeries",
    )
    r.check(
        not cfg.exec_path or os.access(cfg.exec_path, os.X_OK),
        "exec_path",
        f"{cfg.exec_path!r} is not an executable file",
    )
    r.finish()
    return cfg


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


def _check_own_prefix(r: _Reader, key: str, prefix: str) -> None:
    """A bucket prefix the proxy keeps for its own objects (tus state, content index)."""
    r.check(
        prefix.endswith("/") and not prefix.startswith("/") and ".." not in prefix,
        key,
        f"must end with '/', not start with '/' nor contain '..'; got {prefix!r}",
    )


def from_dict(
    data: dict[str, Any], *, base_dir: Path | None = None, source: str = "config"
) -> Config:
    """Build a validated :class:`Config`; raise one :class:`ConfigError` listing every problem."""
    problems: list[str] = []
    base = base_dir or Path.cwd()
    top = _Reader(data, "", problems)
    section = {f.name: _Reader(top.table_of(f.name), f.name, problems) for f in fields(Config)}
    for key in sorted(top.table):
        problems.append(f"{key}: unknown section")
    upload = _upload(section["upload"])
    cfg = Config(
        server=_server(section["server"]),
        upload=upload,
        storage=_storage(section["storage"], base),
        memory=_memory(section["memory"], upload.memory_budget_bytes),
        auth=_auth(section["auth"], base),
        limits=_limits(section["limits"], upload),
        logging=_logging(section["logging"]),
        tus=_tus(section["tus"]),
        page=_page(section["page"]),
        dedup=_dedup(section["dedup"]),
        downloads=_downloads(section["downloads"]),
        hooks=_hooks(section["hooks"], base),
    )
    problems.extend(_tus_overlaps(cfg.upload, cfg.tus))
    problems.extend(_page_conflicts(cfg.page, cfg.tus))
    problems.extend(_dedup_overlaps(cfg))
    if problems:
        raise ConfigError(problems, source)
    return cfg


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
