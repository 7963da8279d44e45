"""config.toml -> frozen dataclasses, validated at load.

The shipped ``config.toml`` is the reference: every key is documented there
(meaning, default, trade-off).  proxy.config.sections declares each section's fields
(kind, default, TOML key) and checks, proxy.config.auth the [auth] section with the
secrets and token hashes, and proxy.config.reader the one reader that turns any table
into its dataclass.  Loading never stops at the first problem: all unknown keys and bad
values are collected into one :class:`ConfigError`, so an operator fixes the file in one
go.  ``python -m proxy`` exits 78 (EX_CONFIG) on it.
"""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from proxy.config.auth import AUTH_MODES, MIN_SECRET_BYTES, TOKEN_SCOPES, AuthConfig, ScopedToken
from proxy.config.reader import ConfigError, Reader, read_section
from proxy.config.sections import (
    ADDRESSING_STYLES,
    BACKENDS,
    HOOK_EVENTS,
    LOG_FORMATS,
    LOG_LEVELS,
    PART_CHECKSUMS,
    S3_MAX_PART_BYTES,
    S3_MAX_PARTS,
    S3_MIN_PART_BYTES,
    Config,
    DedupConfig,
    DownloadsConfig,
    EmbeddedConfig,
    GiB,
    HooksConfig,
    LimitsConfig,
    LoggingConfig,
    MemoryConfig,
    MiB,
    PageConfig,
    ServerConfig,
    StorageConfig,
    TusConfig,
    UploadConfig,
    default_client_buffer_bytes,
)
from proxy.units import parse_size

# The names proxy.config has always offered.
__all__ = [
    "ADDRESSING_STYLES",
    "AUTH_MODES",
    "BACKENDS",
    "HOOK_EVENTS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MIN_SECRET_BYTES",
    "PART_CHECKSUMS",
    "S3_MAX_PARTS",
    "S3_MAX_PART_BYTES",
    "S3_MIN_PART_BYTES",
    "TOKEN_SCOPES",
    "AuthConfig",
    "Config",
    "ConfigError",
    "DedupConfig",
    "DownloadsConfig",
    "EmbeddedConfig",
    "GiB",
    "HooksConfig",
    "LimitsConfig",
    "LoggingConfig",
    "MemoryConfig",
    "MiB",
    "PageConfig",
    "ScopedToken",
    "ServerConfig",
    "StorageConfig",
    "TusConfig",
    "UploadConfig",
    "advisories",
    "default_client_buffer_bytes",
    "from_dict",
    "load",
    "parse_size",
]


def from_dict(
    data: dict[str, Any], *, base_dir: Path | None = None, source: str = "config"
) -> Config:
    """Build a validated :class:`Config`; raise one :class:`ConfigError` listing every problem."""
    problems: list[str] = []
    cfg = read_section(Config, Reader(data, "", problems, base_dir or Path.cwd()), _check_config)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _check_config(r: Reader, cfg: Config) -> Config:
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
