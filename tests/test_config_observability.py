"""[memory] and server.metrics_listen: defaults, the shipped file, every error at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, MemoryConfig, from_dict, load

ROOT = Path(__file__).resolve().parent.parent

# Auth is required unless said otherwise; these tests are about other sections.
OPEN = {"auth": {"mode": "none"}}


def test_defaults_match_the_shipped_reference() -> None:
    shipped = load(ROOT / "config.toml")
    assert shipped.memory == MemoryConfig() == from_dict(OPEN).memory
    assert shipped.server.metrics_listen is None
    text = (ROOT / "config.toml").read_text()
    for key in ("metrics_listen", "limit", "warning_ratio", "critical_ratio", "sample_interval_s"):
        assert f"\n{key} = " in text, f"{key} is not documented in config.toml"


def test_values_are_parsed() -> None:
    cfg = from_dict(
        {
            **OPEN,
            "server": {"metrics_listen": "[::1]:9108"},
            "memory": {
                "limit": "1GiB",
                "warning_ratio": 0.7,
                "critical_ratio": 0.9,
                "sample_interval_s": 1,
            },
        }
    )
    assert cfg.server.metrics_listen == ("::1", 9108)
    assert cfg.memory == MemoryConfig(1024**3, 0.7, 0.9, 1.0)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(
            {
                **OPEN,
                "server": {"listen": "127.0.0.1:9000", "metrics_listen": "127.0.0.1:9000"},
                "upload": {"memory_budget": "256MiB"},
                "memory": {
                    "limit": "200MiB",
                    "warning_ratio": 0.96,
                    "critical_ratio": 0.95,
                    "sample_interval_s": 0,
                    "spare": 1,
                },
            }
        )
    assert sorted(e.value.problems) == sorted(
        [
            "server.metrics_listen: must differ from listen (/metrics is served there anyway)",
            "memory.critical_ratio: need warning_ratio < critical_ratio <= 1; got 0.96 and 0.95",
            "memory.limit: must exceed upload.memory_budget (268435456 bytes): the part buffers "
            "alone would reach it; got 209715200",
            "memory.sample_interval_s: must be > 0; got 0.0",
            "memory.spare: unknown key",
        ]
    )


def test_a_bad_metrics_address_is_named() -> None:
    with pytest.raises(ConfigError) as e:
        from_dict({**OPEN, "server": {"metrics_listen": "9108"}})
    assert e.value.problems == ["server.metrics_listen: expected HOST:PORT, got '9108'"]
