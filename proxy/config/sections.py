"""The sections of config.toml, each a frozen dataclass with its cross-field checks
beside it, and :class:`Config`, which holds them all.  config.toml documents every key
(meaning, default, trade-off); a comment here says what the code needs to know."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from proxy.config.auth import AuthConfig, check_auth, read_secret
from proxy.config.reader import (
    Read,
    Reader,
    choice,
    custom,
    file_path,
    flag,
    positive,
    section,
    size,
    size_or_none,
    strings,
    text,
)
from proxy.naming import KeyTemplate

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
_MEDIA_TYPE_RE = re.compile(r"^[a-z0-9!#$&^_.+-]+/(?:\*|[a-z0-9!#$&^_.+-]+)$")
_EXTENSION_RE = re.compile(r"^\.[a-z0-9]{1,16}$")


def _split_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _metrics_listen(r: Reader, key: str, default: None) -> tuple[str, int] | None:
    if value := r.get(key, str, ""):
        try:
            return _split_listen(value)
        except ValueError as e:
            r.check(False, key, str(e))
    return default


def _networks(
    r: Reader, key: str, default: tuple[()]
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


def _check_server(r: Reader, cfg: ServerConfig) -> ServerConfig:
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


def _check_upload(r: Reader, cfg: UploadConfig) -> UploadConfig:
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


def _check_embedded(r: Reader, cfg: EmbeddedConfig) -> EmbeddedConfig:
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
    ca_bundle: str = file_path()
    credentials_file: str = file_path()
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


def _check_storage(r: Reader, cfg: StorageConfig) -> StorageConfig:
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
    for key, path in (("credentials_file", cfg.credentials_file), ("ca_bundle", cfg.ca_bundle)):
        r.check(not path or Path(path).is_file(), key, f"no such file: {path}")
    return cfg


@dataclass(frozen=True)
class MemoryConfig:
    limit_bytes: int | None = size_or_none(None, "limit")
    warning_ratio: float = positive(0.80)
    critical_ratio: float = positive(0.95)
    sample_interval_s: float = positive(5.0)


def _check_memory(r: Reader, cfg: MemoryConfig) -> MemoryConfig:
    r.check(
        cfg.warning_ratio < cfg.critical_ratio <= 1.0,
        "critical_ratio",
        f"need warning_ratio < critical_ratio <= 1; got {cfg.warning_ratio} and "
        f"{cfg.critical_ratio}",
    )
    return cfg


@dataclass(frozen=True)
class DownloadsConfig:
    """``GET``/``HEAD /uploads/{key}`` and ``GET /files/{id}``: off unless configured."""

    enabled: bool = flag(False)
    # Downloads at once; each holds one S3 connection while its client reads.
    max_concurrent: int = positive(16)
    # Longest one write to a client may wait for it to read, before the download is cut.
    send_timeout_s: float = positive(60.0)


def _matching(pattern: re.Pattern[str], what: str, normalise: Callable[[str], str]) -> Read:
    """A list of strings, each normalised, then matched against ``pattern``."""

    def read(r: Reader, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
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


def _origins(r: Reader, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
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


def _check_tus(r: Reader, cfg: TusConfig) -> TusConfig:
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


def _check_own_prefix(r: Reader, key: str, prefix: str) -> None:
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


@dataclass(frozen=True)
class HooksConfig:
    """Where upload events go (proxy.hooks).  No http_url and no exec_path: hooks are off."""

    http_url: str = text("")
    http_secret: bytes = custom(b"", read_secret, "http_secret_file", repr=False)
    # Relative to the config file's folder.
    exec_path: str = file_path()
    events: tuple[str, ...] = strings(("pre-create", "post-finish", "post-terminate", "post-fail"))
    timeout_s: float = positive(10.0)
    progress_interval_s: float = positive(10.0)
    retry_max_delay_s: float = positive(300.0)
    outbox_poll_interval_s: float = positive(10.0)

    @property
    def enabled(self) -> bool:
        return bool(self.http_url or self.exec_path)


def _check_hooks(r: Reader, cfg: HooksConfig) -> HooksConfig:
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
        # Non-empty: http_secret_file = "" would send every event unsigned.
        not cfg.http_url or bool(cfg.http_secret),
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


def _check_dedup(r: Reader, cfg: DedupConfig) -> DedupConfig:
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


def _check_page(r: Reader, cfg: PageConfig) -> PageConfig:
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
    auth: AuthConfig = section(AuthConfig, check_auth)
    limits: LimitsConfig = section(LimitsConfig)
    logging: LoggingConfig = section(LoggingConfig)
    tus: TusConfig = section(TusConfig, _check_tus)
    page: PageConfig = section(PageConfig, _check_page)
    dedup: DedupConfig = section(DedupConfig, _check_dedup)
    downloads: DownloadsConfig = section(DownloadsConfig)
    hooks: HooksConfig = section(HooksConfig, _check_hooks)
