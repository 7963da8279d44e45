"""Memory readings (process RSS, system, cgroup v2) and the admission decision they drive.

Three limits can bite a daemon on a Raspberry Pi: an operator's own ceiling for the
process (``[memory] limit``), systemd's ``MemoryMax=`` (the cgroup v2 ``memory.max``
of our cgroup or an ancestor) and the machine's RAM.  Each is paired with the usage
it constrains (RSS, the cgroup's working set, the machine's used memory); the
pressure level comes from whichever pair is closest to its limit, so a machine that
runs out because of *other* processes also makes us stop taking new uploads.

What each figure counts matters with the embedded store, which is a child process:
RSS is this daemon's alone, while the cgroup (under systemd, the service's) holds the
daemon *and* the embedded SeaweedFS, whose memory MemoryMax= has to cover too.
:data:`FIGURES` says so in words and ``/status`` shows it next to the numbers.

Only new uploads are refused at critical: a running upload's memory is already
bounded by the buffer pool, and cutting it off would waste the bytes it has sent.
The declared size of an upload never matters here: memory does not grow with it.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import psutil

from proxy.config import MemoryConfig
from proxy.errors import MemoryPressure

log = logging.getLogger(__name__)

DEFAULT_CGROUP_MOUNT = Path("/sys/fs/cgroup")

# What each figure of the memory report counts (shown in /status as "figures").
FIGURES = {
    "rss_bytes": "this daemon process only (not the embedded SeaweedFS, a child process)",
    "peak_rss_bytes": "this daemon process only: its highest RSS since start",
    "cgroup_usage_bytes": (
        "every process in the daemon's cgroup, under systemd the daemon and the embedded "
        "SeaweedFS together: memory.current less inactive page cache; null without a limit"
    ),
    "cgroup_limit_bytes": (
        "the smallest memory.max of the daemon's cgroup and its parents (systemd "
        "MemoryMax=), which the daemon and the embedded SeaweedFS share"
    ),
    "system_total_bytes": "the machine's RAM",
    "system_available_bytes": "the machine's available memory (all processes)",
    "limit_bytes": (
        "the smallest limit that applies: [memory] limit (against rss_bytes, the daemon "
        "only), the cgroup limit (against cgroup_usage_bytes) or RAM (against used memory)"
    ),
    "bound_by": "which pair is closest to its limit: config, cgroup or system",
}


class Level(IntEnum):
    NORMAL = 0
    WARNING = 1
    CRITICAL = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class MemoryReading:
    """One sample of the raw figures; the cgroup ones are None when there is no limit."""

    rss_bytes: int
    peak_rss_bytes: int
    system_total_bytes: int
    system_available_bytes: int
    cgroup_limit_bytes: int | None
    cgroup_usage_bytes: int | None


@dataclass(frozen=True)
class MemoryState(MemoryReading):
    """A reading judged against the limits."""

    limit_bytes: int
    used_ratio: float
    bound_by: str
    level: Level


MemoryReader = Callable[[], MemoryReading]


def _cgroup_mount(mountinfo: Path) -> Path:
    try:
        for line in mountinfo.read_text().splitlines():
            # "... mount-point options - fstype source super-options"; hybrid hosts
            # mount v2 at /sys/fs/cgroup/unified, pure v2 hosts at /sys/fs/cgroup.
            head, _, tail = line.partition(" - ")
            if tail.split(" ", 1)[0] == "cgroup2":
                return Path(head.split(" ")[4])
    except OSError:
        pass
    return DEFAULT_CGROUP_MOUNT


def _read_int(path: Path) -> int | None:
    """An integer file such as memory.max; None for "max", a missing or unreadable file."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def read_cgroup(proc_self: Path = Path("/proc/self")) -> tuple[int | None, int | None]:
    """(limit, working set) of our cgroup v2, or (None, None) outside one with a limit.

    The limit is the smallest ``memory.max`` from our cgroup up to the mount root:
    systemd may set ``MemoryMax=`` on a slice above the service.  The usage is
    ``memory.current`` minus the inactive page cache, which the kernel reclaims
    before it would kill anything (the figure ``docker stats`` calls usage).
    """
    try:
        lines = (proc_self / "cgroup").read_text().splitlines()
    except OSError:
        return None, None
    rel = next((line[3:] for line in lines if line.startswith("0::")), None)
    if rel is None:
        return None, None
    mount = _cgroup_mount(proc_self / "mountinfo")
    own = mount / rel.lstrip("/")
    limits = []
    for directory in [own, *own.parents]:
        if not directory.is_relative_to(mount):
            break
        if (limit := _read_int(directory / "memory.max")) is not None:
            limits.append(limit)
    if not limits:
        return None, None
    usage = _read_int(own / "memory.current")
    if usage is not None:
        usage -= _inactive_file(own / "memory.stat")
    return min(limits), usage


def _inactive_file(stat: Path) -> int:
    try:
        for line in stat.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "inactive_file" and value.isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def read_memory() -> MemoryReading:
    """The live figures for this process and machine."""
    vm = psutil.virtual_memory()
    limit, usage = read_cgroup()
    rss = psutil.Process().memory_info().rss
    # ru_maxrss (KiB on Linux) is the kernel's high-water mark, so it catches peaks between
    # samples; it lags the per-thread RSS counters a little, hence the max with now.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return MemoryReading(
        rss_bytes=rss,
        peak_rss_bytes=max(peak, rss),
        system_total_bytes=vm.total,
        system_available_bytes=vm.available,
        cgroup_limit_bytes=limit,
        cgroup_usage_bytes=usage,
    )


def judge(reading: MemoryReading, config: MemoryConfig) -> MemoryState:
    """Level the reading: the (usage, limit) pair closest to its limit decides."""
    pairs = [
        (
            "system",
            reading.system_total_bytes - reading.system_available_bytes,
            reading.system_total_bytes,
        )
    ]
    if reading.cgroup_limit_bytes is not None:
        pairs.append(("cgroup", reading.cgroup_usage_bytes or 0, reading.cgroup_limit_bytes))
    if config.limit_bytes is not None:
        pairs.append(("config", reading.rss_bytes, config.limit_bytes))
    ratios = [(used / limit if limit > 0 else 1.0, name) for name, used, limit in pairs]
    ratio, bound_by = max(ratios)
    if ratio >= config.critical_ratio:
        level = Level.CRITICAL
    elif ratio >= config.warning_ratio:
        level = Level.WARNING
    else:
        level = Level.NORMAL
    return MemoryState(
        **vars(reading),
        limit_bytes=min(limit for _, _, limit in pairs),
        used_ratio=ratio,
        bound_by=bound_by,
        level=level,
    )


class MemoryMonitor:
    """Samples memory every ``sample_interval_s`` and decides whether new uploads may start.

    ``read``, ``collect`` and ``clock`` are injectable so tests can drive levels
    without allocating gigabytes.
    """

    def __init__(
        self,
        config: MemoryConfig,
        read: MemoryReader = read_memory,
        *,
        collect: Callable[[], object] = gc.collect,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._read = read
        self._collect = collect
        self._clock = clock
        self._state: MemoryState | None = None
        self._last_gc: float | None = None

    @property
    def retry_after_s(self) -> int:
        """What a refused client is told: the level cannot change before the next sample."""
        return max(1, math.ceil(self.config.sample_interval_s))

    @property
    def state(self) -> MemoryState:
        return self._state if self._state is not None else self.sample()

    def sample(self) -> MemoryState:
        state = judge(self._read(), self.config)
        before = self._state.level if self._state is not None else Level.NORMAL
        self._state = state
        if state.level != before:
            cgroup = state.cgroup_usage_bytes
            log.warning(
                "memory pressure %s -> %s: %.0f%% of the %s limit (daemon RSS %d MiB, "
                "cgroup with the embedded store %s MiB, smallest limit %d MiB)",
                before.label,
                state.level.label,
                state.used_ratio * 100,
                state.bound_by,
                state.rss_bytes >> 20,
                "-" if cgroup is None else cgroup >> 20,
                state.limit_bytes >> 20,
            )
        if state.level is Level.CRITICAL:
            self._maybe_collect()
        return state

    def _maybe_collect(self) -> None:
        # A full collection stalls the event loop; once per interval is plenty to
        # return cyclic garbage and not enough to starve running uploads.
        now = self._clock()
        if self._last_gc is not None and now - self._last_gc < self.config.sample_interval_s:
            return
        self._last_gc = now
        found = self._collect()
        log.info("memory critical: garbage collection found %s unreachable objects", found)

    def check_admission(self) -> None:
        """Raise :class:`MemoryPressure` if a new upload must not start now."""
        state = self.state
        if state.level is Level.CRITICAL:
            raise MemoryPressure(
                f"memory is critical ({state.used_ratio:.0%} of the {state.bound_by} limit); "
                "retry later",
                headers={"Retry-After": str(self.retry_after_s)},
            )

    async def run(self) -> None:
        """Sample for ever; a failed reading is logged and the old state kept."""
        while True:
            try:
                self.sample()
            except Exception:
                log.exception("memory sample failed")
            await asyncio.sleep(self.config.sample_interval_s)


class HeapTrimmer:
    """Hands free heap memory back to the OS once no part buffer is leased.

    Part buffers are big, but after glibc raises its mmap threshold (it does so each
    time a large mmapped block is freed, up to 32 MiB) they come from the heap, and a
    freed heap block is rarely returned: after a burst of concurrent uploads RSS would
    stay near the budget for good.  ``malloc_trim`` releases those pages (madvise),
    and running it only when the pool falls idle keeps it off the per-part path.
    (Pinning the mmap threshold instead measured +0.6 CPU-s per GiB: transient
    part-sized blocks in the send path were then mapped and faulted in afresh.)
    """

    def __init__(self) -> None:
        self._trim: Callable[[int], int] | None
        try:
            self._trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc
            self._trim = None

    def __call__(self) -> None:
        if self._trim is not None:
            self._trim(0)
