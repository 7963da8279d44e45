"""Config loading: the shipped file is valid; every problem is reported at once; exit 78."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from proxy.__main__ import EX_CONFIG, main
from proxy.config import Config, ConfigError, advisories, from_dict, load, parse_size

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_loads_with_documented_defaults() -> None:
    cfg = load(ROOT / "config.toml")
    assert cfg.server.listen_host == "127.0.0.1" and cfg.server.listen_port == 8080
    assert cfg.storage.backend == "embedded"
    assert cfg.upload.part_size_bytes == 8 * 1024 * 1024
    assert cfg.upload.memory_budget_bytes == 256 * 1024 * 1024
    assert cfg.storage.embedded.data_dir == ROOT / "data" / "seaweedfs"
    assert cfg.storage.embedded.memory_limit_bytes == 256 * 1024 * 1024


def test_embedded_memory_limit() -> None:
    def limit(value: object) -> int | None:
        data = {"auth": {"mode": "none"}, "storage": {"embedded": {"memory_limit": value}}}
        return from_dict(data).storage.embedded.memory_limit_bytes

    assert limit(0) is None  # Go's default: no limit
    assert limit("192MiB") == 192 * 1024 * 1024
    with pytest.raises(ConfigError, match=r"storage\.embedded\.memory_limit"):
        limit("16MiB")


def test_shipped_config_documents_every_key() -> None:
    """Every key in config.toml has a comment line right above it (or above its group)."""
    lines = (ROOT / "config.toml").read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            above = [x for x in lines[max(0, i - 12) : i] if x.strip()]
            assert any(x.startswith("#") for x in above), f"undocumented key: {line}"


def test_every_problem_reported_at_once() -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(
            {
                "server": {"listen": "nope", "bogus": 1},
                "upload": {
                    "part_size": "1MiB",
                    "parts_in_flight": 0,
                    "part_checksum": "xxh3",
                    "memory_budget": "lots",
                },
                "storage": {"bucket": "b1", "endpoint_url": "ftp://x"},
                "extra": {},
                "auth": {"mode": "none"},
            }
        )
    text = "\n".join(e.value.problems)
    for fragment in [
        "server.listen",
        "server.bogus: unknown key",
        "upload.part_size",
        "upload.parts_in_flight",
        "upload.part_checksum",
        "upload.memory_budget",
        "storage.bucket",
        "storage.endpoint_url",
        "extra: unknown section",
    ]:
        assert fragment in text
    assert len(e.value.problems) == 10  # plus max_upload_size, which 1MiB parts cannot reach


def test_wrong_types_are_reported() -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(
            {"upload": {"overwrite": "yes", "admission_timeout_s": "5"}, "auth": {"mode": "none"}}
        )
    assert len(e.value.problems) == 2

    with pytest.raises(ConfigError) as e:
        from_dict({"server": "x", "auth": {"mode": "none"}})
    assert e.value.problems == ["server: expected a table"]


@pytest.mark.parametrize("hooks", [{}, {"http_secret_file": ""}])
def test_http_hooks_need_a_secret(hooks: dict[str, str]) -> None:
    """An empty http_secret_file is no secret: events would go out unsigned."""
    with pytest.raises(ConfigError) as e:
        from_dict(
            {"hooks": {"http_url": "http://hooks.example/", **hooks}, "auth": {"mode": "none"}}
        )
    assert [p.split(":")[0] for p in e.value.problems] == ["hooks.http_secret_file"]


def test_file_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    """As every other path in the config (data_dir, secret and token files, exec hooks)."""
    (tmp_path / "creds").write_text("[default]\n")
    (tmp_path / "ca.pem").write_text("")
    storage = {"backend": "s3", "credentials_file": "creds", "ca_bundle": "ca.pem"}
    cfg = from_dict({"storage": storage, "auth": {"mode": "none"}}, base_dir=tmp_path)
    assert cfg.storage.credentials_file == str(tmp_path / "creds")
    assert cfg.storage.ca_bundle == str(tmp_path / "ca.pem")
    with pytest.raises(ConfigError) as e:
        from_dict({"storage": storage, "auth": {"mode": "none"}}, base_dir=tmp_path / "elsewhere")
    assert sorted(p.split(":")[0] for p in e.value.problems) == [
        "storage.ca_bundle",
        "storage.credentials_file",
    ]


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (5, 5),
        ("8MiB", 8 << 20),
        ("1.5GiB", 3 << 29),
        ("100MB", 100_000_000),
        ("7 kib", 7168),
    ],
)
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "MiB", "-1", "1XB", True, -3, 1.5])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_bad_config_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text('[upload]\npart_size = "1KiB"\nnope = 1\n')
    assert main(["-c", str(bad)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert "upload.part_size" in err and "upload.nope: unknown key" in err


def test_check_config_subprocess() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "proxy", "--check-config", "-c", str(ROOT / "config.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "proxy", "-c", "/nonexistent.toml"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == EX_CONFIG


@pytest.mark.parametrize(
    ("upload", "tus", "bad"),
    [
        # The bug: objects under the state prefix; finishing a tus upload deleted them.
        ('key_prefix = ".tus/"', "", "upload.key_prefix"),
        ('key_prefix = ".tus/in/"', "", "upload.key_prefix"),
        # tus objects (key_prefix + object_prefix) and the state in one folder tree.
        ('key_prefix = "in/"', 'state_prefix = "in/tus/"', "tus.object_prefix"),
        ('key_prefix = "in/"', 'state_prefix = "in/"', "upload.key_prefix"),
        # The state inside key_prefix is fine (key_prefix = "" is that): plain uploads
        # are refused there.
        ('key_prefix = "in/"', 'state_prefix = "in/.tus/"', None),
        ('key_prefix = ""', 'object_prefix = "t/"', None),
    ],
)
def test_overlapping_tus_and_key_prefixes_exit_78(
    tmp_path: Path, upload: str, tus: str, bad: str | None
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[auth]\nmode = "none"\n[upload]\n{upload}\n[tus]\n{tus}\n')
    r = subprocess.run(
        [sys.executable, "-m", "proxy", "--check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if bad is None:
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode == EX_CONFIG and f"{bad}:" in r.stderr, r.stderr


def test_max_connections_at_or_below_the_upload_limit_is_advised_not_refused() -> None:
    assert advisories(load(ROOT / "config.toml")) == []  # the shipped pair: 256 > 64
    no_auth = {"auth": {"mode": "none"}}
    cfg = from_dict(
        {"server": {"max_connections": 64}, "limits": {"max_concurrent_uploads": 64}, **no_auth}
    )
    (advice,) = advisories(cfg)
    assert "server.max_connections (64)" in advice and "max_concurrent_uploads (64)" in advice
    assert advisories(from_dict({"server": {"max_connections": 65}, **no_auth})) == []


def test_shipped_config_has_every_declared_key() -> None:
    """Every key a section's fields declare stands in config.toml, under its [section]."""
    text = (ROOT / "config.toml").read_text()
    tables = {"": ""}  # section path -> its text in config.toml
    for part in text.split("\n[")[1:]:
        header, _, body = part.partition("]")
        tables[header] = body.split("\n[")[0]

    def missing(cls: type, path: str) -> list[str]:
        out = []
        for f in fields(cls):
            key = f.metadata.get("key") or f.name
            if is_dataclass(f.default_factory):
                out += missing(f.default_factory, f"{path}.{key}".lstrip("."))
            elif "read" in f.metadata and f"\n{key} = " not in tables.get(path, ""):
                out.append(f"{path}.{key}")
        return out

    assert missing(Config, "") == []
