"""The memory monitor on injected readings, and the cgroup v2 reader on a fake /proc and /sys."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from proxy.config import MemoryConfig
from proxy.errors import MemoryPressure
from proxy.obs.memory import Level, MemoryMonitor, MemoryReading, judge, read_cgroup, read_memory

MiB = 1024 * 1024


def reading(
    *,
    rss: int = 100 * MiB,
    total: int = 4096 * MiB,
    available: int = 3000 * MiB,
    cgroup_limit: int | None = None,
    cgroup_usage: int | None = None,
) -> MemoryReading:
    return MemoryReading(rss, rss, total, available, cgroup_limit, cgroup_usage)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_effective_limit_is_the_smallest_and_the_closest_limit_sets_the_level() -> None:
    config = MemoryConfig(limit_bytes=1024 * MiB)
    state = judge(reading(cgroup_limit=2048 * MiB, cgroup_usage=500 * MiB), config)
    assert state.limit_bytes == 1024 * MiB
    assert state.level is Level.NORMAL
    # The machine nearly full (other processes): the system pair decides, not our RSS.
    state = judge(reading(available=100 * MiB, cgroup_limit=2048 * MiB), config)
    assert (state.bound_by, state.level) == ("system", Level.CRITICAL)
    assert state.used_ratio == pytest.approx(3996 / 4096)
    # cgroup working set close to MemoryMax=.
    state = judge(reading(cgroup_limit=2048 * MiB, cgroup_usage=1700 * MiB), config)
    assert (state.bound_by, state.level) == ("cgroup", Level.WARNING)
    # Our own RSS over the configured ceiling.
    state = judge(reading(rss=990 * MiB), config)
    assert (state.bound_by, state.level, state.limit_bytes) == (
        "config",
        Level.CRITICAL,
        1024 * MiB,
    )


@pytest.mark.parametrize(
    ("used_mib", "level"),
    [
        (0, Level.NORMAL),
        (799, Level.NORMAL),
        (800, Level.WARNING),
        (949, Level.WARNING),
        (950, Level.CRITICAL),
        (1000, Level.CRITICAL),
    ],
)
def test_thresholds_are_inclusive(used_mib: int, level: Level) -> None:
    config = MemoryConfig(warning_ratio=0.8, critical_ratio=0.95)
    state = judge(reading(total=1000 * MiB, available=(1000 - used_mib) * MiB), config)
    assert state.level is level


def test_levels_refusal_retry_after_recovery_and_one_log_line_per_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    current = [reading(total=1000 * MiB, available=900 * MiB)]
    monitor = MemoryMonitor(
        MemoryConfig(sample_interval_s=2.5), lambda: current[0], collect=lambda: 0
    )
    caplog.set_level(logging.INFO, logger="proxy.obs.memory")
    assert monitor.sample().level is Level.NORMAL
    monitor.check_admission()
    current[0] = reading(total=1000 * MiB, available=100 * MiB)
    assert monitor.sample().level is Level.WARNING
    monitor.sample()
    monitor.check_admission()
    current[0] = reading(total=1000 * MiB, available=10 * MiB)
    monitor.sample()
    with pytest.raises(MemoryPressure) as refused:
        monitor.check_admission()
    assert refused.value.status == 503 and refused.value.code == "ERR_MEMORY_PRESSURE"
    assert refused.value.headers == {"Retry-After": "3"}
    current[0] = reading(total=1000 * MiB, available=900 * MiB)
    monitor.sample()
    monitor.check_admission()
    changes = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [m.split(":")[0] for m in changes] == [
        "memory pressure normal -> warning",
        "memory pressure warning -> critical",
        "memory pressure critical -> normal",
    ]


def test_gc_runs_at_most_once_per_interval_while_critical() -> None:
    clock = FakeClock()
    collected: list[float] = []
    critical = reading(total=1000 * MiB, available=10 * MiB)
    monitor = MemoryMonitor(
        MemoryConfig(sample_interval_s=5),
        lambda: critical,
        collect=lambda: collected.append(clock.now),
        clock=clock,
    )
    for step in range(12):  # samples every second for 12 s
        clock.now = 1000.0 + step
        monitor.sample()
    assert collected == [1000.0, 1005.0, 1010.0]


def test_no_gc_below_critical() -> None:
    calls: list[int] = []
    monitor = MemoryMonitor(
        MemoryConfig(),
        lambda: reading(total=1000 * MiB, available=150 * MiB),
        collect=lambda: calls.append(1),
    )
    for _ in range(3):
        assert monitor.sample().level is Level.WARNING
    assert calls == []


def _fake_cgroup(tmp_path: Path, own: str, files: dict[str, str]) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    mount = tmp_path / "sys/fs/cgroup/unified"
    (proc / "cgroup").write_text(f"4:memory:/whatever\n0::{own}\n")
    (proc / "mountinfo").write_text(
        "25 30 0:23 / /proc rw,nosuid - proc proc rw\n"
        f"41 31 0:38 / {mount} rw,relatime - cgroup2 cgroup2 rw\n"
    )
    for rel, text in files.items():
        path = mount / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return proc


def test_cgroup_limit_is_the_smallest_up_the_tree_and_usage_drops_inactive_cache(
    tmp_path: Path,
) -> None:
    own = "/system.slice/upload-proxy.service"
    proc = _fake_cgroup(
        tmp_path,
        own,
        {
            "memory.max": "max\n",
            "system.slice/memory.max": "1073741824\n",
            f"{own[1:]}/memory.max": "2147483648\n",
            f"{own[1:]}/memory.current": "600000000\n",
            f"{own[1:]}/memory.stat": "anon 400000000\nfile 200000000\ninactive_file 150000000\n",
        },
    )
    assert read_cgroup(proc) == (1073741824, 450000000)


def test_no_cgroup_limit(tmp_path: Path) -> None:
    proc = _fake_cgroup(tmp_path, "/", {"memory.max": "max\n"})
    assert read_cgroup(proc) == (None, None)
    assert read_cgroup(tmp_path / "nowhere") == (None, None)


def test_live_reading_is_plausible() -> None:
    r = read_memory()
    assert 0 < r.rss_bytes <= r.peak_rss_bytes
    assert 0 < r.system_available_bytes <= r.system_total_bytes
