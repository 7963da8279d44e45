"""The one way tests start a daemon of their own.

* :func:`start_daemon`: the real daemon (``python -m proxy -c FILE``) as a subprocess, as
  systemd runs it: on the test config (``conftest.base_sections``: the session's
  SeaweedFS, everything under the test's key prefix, a free port) with keyword sections
  over it (``server={"drain_timeout_s": 2}`` changes one key, not the whole section).
  Use it for what only a process shows: signals, exit codes, restarts, RSS, sd_notify,
  the log, a daemon behind nginx or the fault proxy.  :meth:`Daemon.restart` starts it
  again on the same config and port (after a kill); :func:`launch` runs a config file
  the test wrote itself (the embedded store, a scale-out instance).
* ``start_proxy`` (the conftest fixture): the same app in the test's process, on the
  same config, with an injected Storage (a wrapper, ``faulty_s3``) or pool; its runtime
  and app are at hand (``proxy.uploads``, ``proxy.pool``).  Most tests use it: it starts
  in milliseconds.  ``conftest.serving`` is the whole in-process Server (every listener).

Both stop on the way out of the test (``start_proxy``) or in the test's ``finally``
(``await daemon.stop()``: a kill; a test that means a clean stop signals and waits).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.storage.seaweed import EmbeddedSeaweed, free_port
from tests.conftest import base_sections, merge_sections


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Daemon:
    proc: asyncio.subprocess.Process
    port: int
    config: Path
    env: dict[str, str] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout_s: float = 30) -> int:
        async with asyncio.timeout(timeout_s):
            rc = await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return rc

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def wait_log(self, text: str, timeout_s: float = 30) -> None:
        """Until a line containing ``text`` has been logged (what a test waits on for a
        step only the log shows, e.g. a signal handled)."""
        try:
            async with asyncio.timeout(timeout_s):
                while not any(text in line for line in self.log):
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"not logged within {timeout_s}s: {text!r}") from None

    async def restart(self, timeout_s: float = 30) -> Daemon:
        """The same daemon (config file, port, environment) started again, once this one
        is gone (killed here if it still runs).  The new one has a log of its own."""
        await self.stop()
        return await launch(self.config, self.port, self.env, timeout_s=timeout_s)


async def start_daemon(
    tmp_path: Path,
    sw: EmbeddedSeaweed,
    prefix: str,
    env: dict[str, str] | None = None,
    **overrides: dict[str, Any],
) -> Daemon:
    """The daemon as a subprocess on the test config with ``overrides`` over it, listening
    on a free port (or the one ``server={"listen": ...}`` names); ``env`` adds to its
    environment (the store's keys are passed as systemd would, in AWS_* variables)."""
    base = base_sections(sw, prefix)
    port = free_port()
    base["server"]["listen"] = f"127.0.0.1:{port}"
    # What subprocess daemons have always run with: the daemon's default part checksum
    # (none) and a smaller size cap than in-process tests.
    del base["upload"]["part_checksum"]
    base["upload"]["max_upload_size"] = "1GiB"
    sections = merge_sections(base, overrides)
    port = int(sections["server"]["listen"].rsplit(":", 1)[1])
    cfg = write_config(tmp_path / f"daemon-{port}.toml", sections)
    daemon = await launch(
        cfg,
        port,
        {
            "AWS_ACCESS_KEY_ID": sw.credentials.access_key,
            "AWS_SECRET_ACCESS_KEY": sw.credentials.secret_key,
            **(env or {}),
        },
    )
    metrics = sections["server"].get("metrics_listen")
    if metrics:  # "listening on" is logged before the metrics listener binds
        try:
            await wait_accepting(metrics)
        except BaseException:
            await daemon.stop()
            raise
    return daemon


@contextlib.asynccontextmanager
async def running_daemon(
    tmp_path: Path, sw: EmbeddedSeaweed, prefix: str, **overrides: dict[str, Any]
) -> AsyncIterator[Daemon]:
    """:func:`start_daemon` for the length of a ``with`` block (a fixture's body); stopped
    (killed) on the way out, whatever happened."""
    daemon = await start_daemon(tmp_path, sw, prefix, **overrides)
    try:
        yield daemon
    finally:
        await daemon.stop()


async def wait_accepting(address: str, timeout_s: float = 30) -> None:
    """Until ``host:port`` accepts a connection."""
    host, _, port = address.rpartition(":")
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return


async def spawn(cfg: Path, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """``python -m proxy -c cfg`` with stderr piped; systemd's variables are not passed."""
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))},
        **(env or {}),
    }
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "-c",
        str(cfg),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=full_env,
    )


async def launch(
    cfg: Path, port: int, env: dict[str, str] | None = None, timeout_s: float = 30
) -> Daemon:
    """Start the daemon on ``cfg`` and wait until it listens on ``port``."""
    proc = await spawn(cfg, env)
    daemon = Daemon(proc, port, cfg, dict(env or {}))
    listening = asyncio.Event()

    async def read_log() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            daemon.log.append(line)
            if "listening on" in line:
                listening.set()

    daemon._reader = asyncio.create_task(read_log())
    try:
        async with asyncio.timeout(timeout_s):
            while not listening.is_set():
                if proc.returncode is not None:
                    raise RuntimeError("daemon exited:\n" + "\n".join(daemon.log))
                await asyncio.sleep(0.05)
    except BaseException:
        await daemon.stop()
        raise
    return daemon
