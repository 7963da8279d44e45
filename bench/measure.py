"""What bench/bench.py measures a server process with, and how it runs one.

* :class:`Watch`: over one row, a process's CPU seconds, bytes it wrote to disk, peak RSS
  and the bytes of files that appeared in its temp directory.
* :class:`Service`: a server started as a child process (the daemon, the peer), its output
  kept in memory (a log file would itself be a disk write of the process), ready once an
  HTTP URL answers.
* :func:`machine` and the ``*_version`` helpers: what the figures were measured on and with.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import platform
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO

import psutil


def _reset_peak_rss(pid: int) -> bool:
    """Restart the kernel's RSS high-water mark (VmHWM) at the current RSS (Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


class Watch:
    """CPU, disk writes, peak RSS and temp-file bytes of one process over a ``with`` block.

    Peak RSS is the kernel's high-water mark, reset at the start (exact, however short the
    peak), with a 10 ms sampler as the fall-back where the reset is not allowed.  Disk
    writes are ``write_bytes`` of /proc/PID/io: bytes the process dirtied in the page
    cache, so a temp file deleted before it reached the disk still counts.  Temp bytes are
    the largest size seen of every file under ``temp_dir`` (sampled every 10 ms).
    """

    def __init__(self, proc: psutil.Process, temp_dir: Path | None = None) -> None:
        self.proc = proc
        self.temp_dir = temp_dir
        self.cpu_s = 0.0
        self.disk_write_bytes = 0
        self.peak_rss_bytes = 0
        self._sampled_rss = 0
        self._file_sizes: dict[str, int] = {}
        self._files_before: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._exact_peak = False

    @property
    def temp_bytes(self) -> int:
        """Growth of the files under temp_dir during the block (files there before it
        count only for what they grew by)."""
        return sum(max(0, n - self._files_before.get(p, 0)) for p, n in self._file_sizes.items())

    def _cpu(self) -> float:
        t = self.proc.cpu_times()
        return float(t.user + t.system)

    def _scan_temp(self) -> None:
        if self.temp_dir is None:
            return
        for root, _dirs, files in os.walk(self.temp_dir):
            for name in files:
                path = os.path.join(root, name)
                with contextlib.suppress(OSError):  # deleted meanwhile
                    size = os.stat(path).st_size
                    self._file_sizes[path] = max(self._file_sizes.get(path, 0), size)

    def _sample(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self._sampled_rss = max(self._sampled_rss, self.proc.memory_info().rss)
            self._scan_temp()
            self._stop.wait(0.01)

    def __enter__(self) -> Watch:
        self._scan_temp()
        self._files_before = dict(self._file_sizes)
        self._exact_peak = _reset_peak_rss(self.proc.pid)
        self._cpu0 = self._cpu()
        self._disk0 = int(self.proc.io_counters().write_bytes)
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        if kind is not None:
            return
        self.cpu_s = self._cpu() - self._cpu0
        self.disk_write_bytes = int(self.proc.io_counters().write_bytes) - self._disk0
        hwm = _peak_rss(self.proc.pid) if self._exact_peak else None
        self.peak_rss_bytes = max(hwm or 0, self._sampled_rss)


class Service:
    """A server run as a child process; stdout and stderr kept (last lines) in memory."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str],
        ready_url: str,
        temp_dir: Path,
        ready_on_any_status: bool = False,
    ) -> None:
        self.name = name
        self.ready_url = ready_url
        self.ready_on_any_status = ready_on_any_status
        self.temp_dir = temp_dir
        temp_dir.mkdir(parents=True, exist_ok=True)
        self.output: collections.deque[str] = collections.deque(maxlen=200)
        # TMPDIR: where the process's temp files go (Python's tempfile, Node's os.tmpdir()).
        self.popen = subprocess.Popen(
            argv,
            env={**env, "TMPDIR": str(temp_dir)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.popen.stdout is not None
        self._drain = threading.Thread(target=self._keep, args=(self.popen.stdout,), daemon=True)
        self._drain.start()
        self.proc = psutil.Process(self.popen.pid)

    def _keep(self, stream: IO[bytes]) -> None:
        for line in stream:
            self.output.append(line.decode(errors="replace").rstrip())

    def tail(self) -> str:
        return "\n".join(self.output)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}"
                )
            try:
                with urllib.request.urlopen(self.ready_url, timeout=2) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError:
                if self.ready_on_any_status:
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f}s:\n{self.tail()}")

    def get(self, path: str) -> str:
        base = self.ready_url.split("/", 3)
        with urllib.request.urlopen(f"{base[0]}//{base[2]}{path}", timeout=10) as r:
            return str(r.read().decode())

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(40)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._drain.join(5)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, object]:
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def npm_versions(package_lock: Path) -> dict[str, str]:
    lock = json.loads(package_lock.read_text())["packages"]
    names = ("tus-js-client", "@tus/server", "@tus/s3-store")
    return {n: lock[f"node_modules/{n}"]["version"] for n in names}


def git_revision(repo: Path) -> str:
    r = subprocess.run(
        ["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    return r.stdout.strip()


def node_version() -> str:
    r = subprocess.run(["node", "--version"], capture_output=True, text=True)
    return r.stdout.strip()
