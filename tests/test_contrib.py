"""contrib/: the Grafana dashboard and Prometheus rules load, pass promtool, and use only
metric names the proxy exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from proxy import __version__
from proxy.config import MemoryConfig
from proxy.engine.buffers import BufferPool
from proxy.errors import REASONS
from proxy.obs.memory import MemoryReading, judge
from proxy.obs.metrics import Metrics

from obs_helpers import Samples, parse, promtool

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "contrib/grafana/upload-proxy.json"
ALERTS = ROOT / "contrib/prometheus/alerts.yml"
SCRAPE = ROOT / "contrib/prometheus/scrape.yml"
# Names the proxy is responsible for; Prometheus' own (up, ...) are not checked here.
_NAME_RE = re.compile(r"\b((?:proxy|process|python)_[A-Za-z0-9_]+)\b")
MiB = 1024 * 1024


def promtool_ok(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_alert_rules_pass_promtool_check() -> None:
    assert "SUCCESS: 6 rules found" in promtool_ok("check", "rules", str(ALERTS))


def test_alert_rules_fire_as_intended() -> None:
    promtool_ok("test", "rules", "alerts_test.yml", cwd=ROOT / "tests/promtool")


def test_scrape_example_is_a_valid_prometheus_config() -> None:
    promtool_ok("check", "config", str(SCRAPE))


def exposition() -> Samples:
    """Samples of an exposition with every optional source bound and an upload running."""
    metrics = Metrics(CollectorRegistry(), reasons=REASONS, live_uploads_max=4, version=__version__)
    metrics.bind_pool(BufferPool(64 * MiB, 8 * MiB))
    reading = MemoryReading(100 * MiB, 120 * MiB, 4096 * MiB, 3000 * MiB, 1024 * MiB, 200 * MiB)
    metrics.bind_memory(lambda: judge(reading, MemoryConfig()))
    metrics.bind_ready(lambda: True)
    metrics.upload_started("0123456789abcdef", "some/key").received(10)
    metrics.storage_op("upload_part", 0.2, "SlowDown")
    return parse(generate_latest(metrics.registry).decode())


def every_exported_name() -> set[str]:
    return {name for name, _ in exposition()}


def test_no_label_carries_an_upload_id_or_key() -> None:
    """Labels are bounded and reveal nothing: the running upload's id and key appear nowhere."""
    samples = exposition()
    labels = {k for _, labels in samples for k, _ in labels}
    ours = {"reason", "operation", "outcome", "slot", "le", "version", "route"}
    runtime = {"generation", "implementation", "major", "minor", "patchlevel"}  # python_*
    assert labels <= ours | runtime, labels - ours - runtime
    values = {v for _, labels in samples for _, v in labels}
    assert not {v for v in values if "0123456789abcdef" in v or "some/key" in v}


def exprs(node: Any) -> list[str]:
    """Every PromQL string in the dashboard: panel targets and template variable queries."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            else:
                found += exprs(value)
    elif isinstance(node, list):
        for item in node:
            found += exprs(item)
    return found


def uncommented(text: str) -> str:
    """The rules file without its comments (promtool has validated its structure)."""
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def test_dashboard_and_rules_reference_only_exported_metrics() -> None:
    exported = every_exported_name()
    dashboard = json.loads(DASHBOARD.read_text())
    used_by = {
        "dashboard": {n for e in exprs(dashboard) for n in _NAME_RE.findall(e)},
        "alerts": set(_NAME_RE.findall(uncommented(ALERTS.read_text()))),
    }
    for where, names in used_by.items():
        assert names - exported == set(), f"{where} uses metrics the proxy does not export"
    # What the issue asks the dashboard to show, and the alerts to watch.
    assert {
        "proxy_received_bytes_total",
        "proxy_stored_bytes_total",
        "proxy_uploads_in_flight",
        "proxy_active_upload_received_bytes_total",
        "proxy_uploads_failed_total",
        "proxy_hashed_bytes_total",
        "proxy_hash_duration_seconds_sum",
        "proxy_storage_request_duration_seconds_bucket",
        "proxy_memory_rss_bytes",
        "proxy_memory_limit_bytes",
        "proxy_buffer_pool_in_use_bytes",
        "proxy_buffer_pool_budget_bytes",
    } <= used_by["dashboard"]
    assert {
        "proxy_uploads_failed_total",
        "proxy_uploads_started_total",
        "proxy_memory_pressure_level",
        "proxy_storage_errors_total",
        "proxy_ready",
    } <= used_by["alerts"]


def test_dashboard_legends_use_exported_labels() -> None:
    """A legend naming a label the series lacks (the old per-upload {{upload}}) shows blank."""
    exported = {k for _, labels in exposition() for k, _ in labels} | {"job", "instance"}
    dashboard = json.loads(DASHBOARD.read_text())
    legends = [t.get("legendFormat", "") for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for legend in legends for m in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend)}
    assert used and used <= exported, used - exported


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert all(t["expr"] for t in p["targets"]), p["title"]
