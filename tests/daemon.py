"""Run the real daemon (``python -m proxy``) as a subprocess, as systemd would."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.storage.seaweed import EmbeddedSeaweed, free_port
from tests.conftest import BUCKET


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


async def start_daemon(
    tmp_path: Path,
    sw: EmbeddedSeaweed,
    prefix: str,
    env: dict[str, str] | None = None,
    **overrides: dict[str, Any],
) -> Daemon:
    port = free_port()
    sections: dict[str, dict[str, Any]] = {
        "server": {"listen": f"127.0.0.1:{port}", "drain_timeout_s": 5},
        "upload": {
            "key_prefix": prefix,
            "part_size": "5MiB",
            "memory_budget": "64MiB",
            "max_upload_size": "1GiB",
        },
        "storage": {
            "backend": "s3",
            "bucket": BUCKET,
            "endpoint_url": sw.endpoint_url,
            "retry_attempts": 2,
            "retry_base_delay_s": 0.05,
        },
        "auth": {"mode": "none"},
        # tus state under the test's prefix too, so tests sharing the bucket stay apart.
        "tus": {"state_prefix": f"{prefix}.tus/"},
    }
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    cfg = write_config(tmp_path / f"daemon-{port}.toml", sections)
    return await launch(
        cfg,
        port,
        {
            "AWS_ACCESS_KEY_ID": sw.credentials.access_key,
            "AWS_SECRET_ACCESS_KEY": sw.credentials.secret_key,
            **(env or {}),
        },
    )


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
    daemon = Daemon(proc, port)
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
