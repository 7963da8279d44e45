"""The shipped unit passes systemd-analyze verify and rates <= 2.0 on security."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "upload-proxy.service"


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze missing (make test-deps installs it as root)",
)
def test_unit_verifies_and_is_hardened() -> None:
    exe = Path(sys.executable).parent / "upload-proxy"
    r = subprocess.run(
        [str(ROOT / "systemd" / "check-unit.sh"), str(UNIT), str(exe), "2.0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify: ok" in r.stdout


def test_unit_matches_the_daemon() -> None:
    text = UNIT.read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["Type"] == "notify"
    assert settings["RestartPreventExitStatus"] == "78"
    from proxy.__main__ import EX_CONFIG
    from proxy.config import ServerConfig
    from proxy.server import ABORT_GRACE_S, RUNNER_SHUTDOWN_TIMEOUT_S
    from proxy.storage.seaweed import STOP_TIMEOUT_S

    assert EX_CONFIG == 78
    # SIGTERM to the daemon only: it drains, aborts, then stops the embedded store
    # itself (tests/test_shutdown.py::test_sigterm_to_the_daemon_alone_...).
    assert settings["KillMode"] == "mixed"
    stop_s = int(settings["TimeoutStopSec"])
    needed_s = (
        ServerConfig().drain_timeout_s + ABORT_GRACE_S + RUNNER_SHUTDOWN_TIMEOUT_S + STOP_TIMEOUT_S
    )
    assert stop_s >= needed_s + 5, (stop_s, needed_s)
    # The arithmetic is written down in the unit, with the figures in use.
    for figure in (ServerConfig().drain_timeout_s, ABORT_GRACE_S, STOP_TIMEOUT_S, stop_s):
        assert f" {figure:.0f}s" in text, figure
