"""[tus] config: defaults, and every bad key reported at once."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, from_dict


def test_defaults() -> None:
    tus = from_dict({"auth": {"mode": "none"}}).tus
    assert tus.enabled and tus.base_path == "/files/" and tus.state_prefix == ".tus/"
    assert tus.object_prefix == "tus/"
    assert tus.cors_allow_origins == ()


def test_all_problems_in_one_error() -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(
            {
                "tus": {
                    "base_path": "files",
                    "state_prefix": "/abs",
                    "object_prefix": "../x",
                    "cors_allow_origins": ["ftp://x"],
                    "lock_lease_s": 1,
                    "expire_after_s": 0,
                    "sweep_interval_s": -1,
                    "colour": "red",
                },
                "auth": {"mode": "none"},
            }
        )
    text = str(e.value)
    for key in (
        "base_path",
        "state_prefix",
        "object_prefix",
        "cors_allow_origins",
        "lock_lease_s",
        "expire_after_s",
        "sweep_interval_s",
        "colour: unknown key",
    ):
        assert f"tus.{key}" in text, key
    assert len(e.value.problems) == 8


def test_shipped_config_toml_loads() -> None:
    from pathlib import Path

    from proxy.config import load

    cfg = load(Path(__file__).parent.parent / "config.toml")
    assert cfg.tus.lock_lease_s == 30


@pytest.mark.parametrize("value", ["", "tus", "/tus/", "a//", "../x/", "./", ".tus/", "a b/"])
def test_object_prefix_must_be_plain_segments(value: str) -> None:
    with pytest.raises(ConfigError) as e:
        from_dict({"tus": {"object_prefix": value}, "auth": {"mode": "none"}})
    assert "tus.object_prefix" in str(e.value)
