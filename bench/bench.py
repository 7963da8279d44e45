"""The benchmark of upload-proxy: its floor, direct-to-S3, PUT, tus and a peer tus server,
in one sitting against one SeaweedFS.  Prints one table and the ratios the performance
targets are stated in; writes the raw figures as JSON.  Not a test: nothing here asserts
(the exit code says only whether every stored object had the right SHA-256).

    make bench          # npm ci in bench/js, then every row at 1 GiB
    make bench-quick    # the same at 128 MiB
    .venv/bin/python bench/bench.py [--size 1GiB] [--concurrent-size SIZE] [--repeat N]
        [--only ROW,ROW] [--big] [--part-size SIZE] [--parts-in-flight N]
        [--direct-in-flight N] [--part-checksum none|crc32|md5|sha256]
        [--workdir DIR] [--compare bench/results/OLD.json]

It starts, on loopback with free ports: SeaweedFS (the ``weed mini`` the daemon embeds,
started here so that every server points at the same store), the daemon as a subprocess
(``python -m proxy -c <config>``: the shipped defaults except the listen port, storage
pointed at that SeaweedFS, auth none, and the part options given here), fresh for each
round, and for ``peer-tus-server`` @tus/server + @tus/s3-store (bench/js/peer-server.mjs).

Rows (--only takes these names):
  sha256-floor     one hashlib SHA-256 pass over the file: CPU of that pass alone
  direct           the file straight to S3 with aiobotocore (bench/direct.py, a child
                   process): same part size and checksum, --direct-in-flight parts in flight
  put              curl -T through the proxy
  tus-1-patch      tus-js-client (bench/js/tus-upload.mjs), chunkSize unset: one PATCH
  tus-8mib         tus-js-client, chunkSize 8 MiB
  put-4g           (--big) a 4 GiB curl -T (--big-size; the row is named by the size)
  put-8x           8 concurrent curl -T of --concurrent-size (default size / 8), shown as
                   put-8x<MiB>m
  tus-8x           8 concurrent tus-js-client uploads in one PATCH each
  peer-tus-server  tus-js-client, one PATCH, to @tus/server + @tus/s3-store
  wan-1            tus-js-client, one PATCH, through an EMULATED long-distance link
                   (bench/wanlink.py: --wan-rtt-ms, --wan-loss; a user-space relay,
                   because this machine's kernel has no sch_netem), --wan-size bytes
  wan-4x           the same file and link, tus-js-client parallelUploads: 4 on slice
                   boundaries aligned to the part size (tus concatenation, no copy)

Columns: MiB/s (the client's transfer time: curl's process, tus-js-client's start to
success; 8x: first start to last end), CPU seconds per GiB, peak RSS, bytes written to
disk (/proc/PID/io write_bytes) and the bytes files grew by in its temp dir ($TMPDIR,
sampled every 10 ms), all of the server process (proxy or peer; direct: the uploader's own) and not
of the client or SeaweedFS, which share the same cores.  Each stored object's SHA-256 is
checked afterwards (proxy: its sha256 metadata; direct and peer: a GET re-hash), outside
the figures, and deleted.  With --repeat N every figure is the median of N rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from measure import (
    Service,
    Watch,
    git_revision,
    load_average,
    machine,
    node_version,
    npm_versions,
)
from report import (
    GiB,
    MiB,
    Sample,
    checks,
    compare,
    header,
    median,
    ops_per_patch,
    table,
    write_json,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.config import parse_size
from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import Credentials, EmbeddedSeaweed, free_port
from proxy.tus.state import storage_id

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
JS = BENCH / "js"
BUCKET = "bench"
ROWS = (
    "sha256-floor",
    "direct",
    "put",
    "tus-1-patch",
    "tus-8mib",
    "put-4g",
    "put-8x",
    "tus-8x",
    "peer-tus-server",
    "wan-1",
    "wan-4x",
)
NODE_ROWS = {"tus-1-patch", "tus-8mib", "tus-8x", "peer-tus-server", "wan-1", "wan-4x"}
WAN_PARALLEL = 4
CONCURRENT = 8
WARM_UP_BYTES = 16 * MiB
READ_BYTES = 8 * MiB


def size_label(nbytes: int) -> str:
    """128m, 4g: how a row's name says its size."""
    return f"{nbytes / GiB:g}g" if nbytes % GiB == 0 else f"{nbytes / MiB:g}m"


def make_file(path: Path, size: int) -> Path:
    """Random bytes (nothing for the store to compress or deduplicate), kept for reuse."""
    if not (path.exists() and path.stat().st_size == size):
        with path.open("wb") as f:
            for off in range(0, size, READ_BYTES):
                f.write(os.urandom(min(READ_BYTES, size - off)))
    return path


def sha256_pass(path: Path) -> tuple[str, float]:
    """The file's SHA-256 and the CPU seconds of the hashing alone (not the reads)."""
    h = hashlib.sha256()
    buf = bytearray(READ_BYTES)
    view = memoryview(buf)
    cpu_s = 0.0
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            t0 = time.thread_time()
            h.update(view[:n])
            cpu_s += time.thread_time() - t0
    return h.hexdigest(), cpu_s


def storage_ops(metrics_text: str) -> dict[str, float]:
    """S3 requests so far by operation, from the daemon's /metrics."""
    prefix = "proxy_storage_request_duration_seconds_count{"
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith(prefix) and 'operation="' in line:
            op = line.split('operation="', 1)[1].split('"', 1)[0]
            out[op] = out.get(op, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


class Bench:
    """One sitting: the store, the settings, the files; a daemon (and peer) per round."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        shipped_all = tomllib.loads((ROOT / "config.toml").read_text())
        shipped = shipped_all["upload"]
        # where the daemon puts finished tus uploads (it is given no key_prefix)
        self.tus_objects = str(shipped_all["tus"]["object_prefix"])
        self.part_bytes = parse_size(args.part_size or shipped["part_size"])
        self.parts_in_flight = int(args.parts_in_flight or shipped["parts_in_flight"])
        self.direct_in_flight = int(args.direct_in_flight or self.parts_in_flight)
        self.part_checksum = str(args.part_checksum or shipped["part_checksum"])
        self.budget_bytes = parse_size(shipped["memory_budget"])
        self.size = parse_size(args.size)
        self.concurrent_size = parse_size(args.concurrent_size or self.size // CONCURRENT)
        self.big_size = parse_size(args.big_size)
        self.creds = Credentials("bench" + secrets.token_hex(6), secrets.token_urlsafe(24))
        self.env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.creds.access_key,
            "AWS_SECRET_ACCESS_KEY": self.creds.secret_key,
        }
        self.loop = asyncio.new_event_loop()
        self.seaweed = EmbeddedSeaweed(work / "seaweedfs", bucket=BUCKET, credentials=self.creds)
        self.s3: S3Storage | None = None
        self.daemon: Service | None = None
        self.peer: Service | None = None
        self.files: dict[str, Path] = {}
        self.digests: dict[Path, str] = {}
        self.idle_rss_bytes: list[int] = []
        self.rows: list[str] = []
        self.failures: list[str] = []
        self.round = 0

    # -- set-up --------------------------------------------------------------------------

    def prepare_files(self, rows: list[str]) -> None:
        sizes = {"main": self.size}
        if {"put-8x", "tus-8x"} & set(rows):
            sizes["concurrent"] = self.concurrent_size
        if "put-4g" in rows:
            sizes["big"] = self.big_size
        if {"wan-1", "wan-4x"} & set(rows):
            sizes["wan"] = parse_size(self.args.wan_size)
        for name, size in sizes.items():
            path = make_file(self.work / f"{name}-{size}.bin", size)
            self.files[name] = path
            self.digests[path] = sha256_pass(path)[0]
        self.files["warm-up"] = make_file(self.work / "warm-up.bin", WARM_UP_BYTES)

    def start_store(self) -> None:
        self.loop.run_until_complete(self.seaweed.start(90))
        self.s3 = S3Storage(
            bucket=BUCKET,
            endpoint_url=self.seaweed.endpoint_url,
            access_key=self.creds.access_key,
            secret_key=self.creds.secret_key,
        )
        self.loop.run_until_complete(self.s3.open())

    def daemon_config(self, port: int) -> str:
        upload = []
        if self.args.part_size:
            upload.append(f'part_size = "{self.args.part_size}"')
        if self.args.parts_in_flight:
            upload.append(f"parts_in_flight = {self.parts_in_flight}")
        if self.args.part_checksum:
            upload.append(f'part_checksum = "{self.part_checksum}"')
        return "\n".join(
            [
                "[server]",
                f'listen = "127.0.0.1:{port}"',
                "[upload]",
                *upload,
                "[auth]",
                'mode = "none"',
                "[storage]",
                'backend = "s3"',
                f'bucket = "{BUCKET}"',
                f'endpoint_url = "{self.seaweed.endpoint_url}"',
                "",
            ]
        )

    def start_daemon(self) -> Service:
        port = free_port()
        config = self.work / "proxy.toml"
        config.write_text(self.daemon_config(port))
        daemon = Service(
            "daemon",
            [sys.executable, "-m", "proxy", "-c", str(config)],
            env=self.env,
            ready_url=f"http://127.0.0.1:{port}/healthz",
            temp_dir=self.work / "tmp-proxy",
        )
        daemon.wait_ready()
        self.daemon = daemon
        self.idle_rss_bytes.append(daemon.proc.memory_info().rss)
        self.put_urls(daemon, [self.files["warm-up"]], "warm-up")  # first-request costs
        if NODE_ROWS & set(self.rows):
            self.tus(self.tus_endpoint(daemon), self.files["warm-up"], None, 1)
        return daemon

    def start_peer(self) -> Service:
        port = free_port()
        peer = Service(
            "peer @tus/server",
            [
                "node",
                str(JS / "peer-server.mjs"),
                str(port),
                self.seaweed.endpoint_url,
                BUCKET,
                str(self.part_bytes),
            ],
            env=self.env,
            ready_url=f"http://127.0.0.1:{port}/files",
            temp_dir=self.work / "tmp-peer",
            ready_on_any_status=True,
        )
        peer.wait_ready()
        self.peer = peer
        result = self.tus(peer.ready_url, self.files["warm-up"], None, 1)
        self.peer_keys(result, keep_objects=False)
        return peer

    # -- clients -------------------------------------------------------------------------

    def put_urls(self, daemon: Service, paths: list[Path], name: str) -> tuple[float, list[str]]:
        base = daemon.ready_url.rsplit("/", 1)[0]
        keys = [f"bench-{name}-r{self.round}-{i}" for i in range(len(paths))]
        t0 = time.perf_counter()
        curls = [
            subprocess.Popen(
                ["curl", "-sS", "-f", "-o", "/dev/null", "-T", str(p), f"{base}/uploads/{k}"]
            )
            for p, k in zip(paths, keys, strict=True)
        ]
        codes = [c.wait() for c in curls]
        seconds = time.perf_counter() - t0
        if any(codes):
            raise RuntimeError(f"curl failed: exit codes {codes}\n{daemon.tail()}")
        return seconds, keys

    def tus_endpoint(self, daemon: Service) -> str:
        return daemon.ready_url.rsplit("/", 1)[0] + "/files/"

    def tus(
        self, endpoint: str, path: Path, chunk: int | None, count: int, parallel: int = 1
    ) -> dict[str, Any]:
        argv = ["node", str(JS / "tus-upload.mjs"), endpoint, str(path)]
        argv += [str(chunk) if chunk else "inf", str(count), str(parallel), str(self.part_bytes)]
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"tus-js-client failed: {r.stderr.strip()}")
        result: dict[str, Any] = json.loads(r.stdout)
        return result

    # -- verification (not timed) ----------------------------------------------------------

    async def _check(self, key: str, size: int, digest: str, rehash: bool) -> bool:
        assert self.s3 is not None
        if rehash:
            h, got = hashlib.sha256(), 0
            async for chunk in self.s3.iter_object(key, chunk_bytes=MiB):
                h.update(chunk)
                got += len(chunk)
            ok = got == size and h.hexdigest() == digest
        else:
            info = await self.s3.head(key)
            ok = info is not None and info.size == size and info.metadata.get("sha256") == digest
        await self.s3.delete_object(key)
        return ok

    def check(self, keys: list[str], size: int, digest: str, rehash: bool = False) -> bool:
        async def all_ok() -> bool:
            return all([await self._check(k, size, digest, rehash) for k in keys])

        if not keys:
            return False  # nothing stored: not a vacuous pass

        return self.loop.run_until_complete(all_ok())

    def tus_keys(self, result: dict[str, Any]) -> list[str]:
        """The proxy stores a tus upload as <key_prefix><object_prefix><storage id>/<filename>
        (the storage id is derived from the secret id in the URL): found by listing."""
        assert self.s3 is not None
        keys: list[str] = []
        for url in result["urls"]:
            # <storage id>/<filename>, or <storage id> alone (a concatenated final)
            base = f"{self.tus_objects}{storage_id(url.rstrip('/').rsplit('/', 1)[1])}"
            found = self.loop.run_until_complete(self.s3.list_objects(base))
            keys += [o.key for o in found if o.key == base or o.key.startswith(base + "/")]
        return keys

    def peer_keys(self, result: dict[str, Any], *, keep_objects: bool) -> list[str]:
        """@tus/s3-store stores an upload as <id> beside <id>.info: the infos are deleted,
        the objects' keys returned (the objects kept to be checked, or deleted too)."""
        assert self.s3 is not None
        ids = [url.rstrip("/").rsplit("/", 1)[1] for url in result["urls"]]
        for upload_id in ids:
            self.loop.run_until_complete(self.s3.delete_object(f"{upload_id}.info"))
            if not keep_objects:
                self.loop.run_until_complete(self.s3.delete_object(upload_id))
        return ids

    # -- rows ----------------------------------------------------------------------------

    def proxy_row(
        self, name: str, nbytes: int, client: Callable[[Service], dict[str, Any]]
    ) -> Sample:
        daemon = self.daemon
        assert daemon is not None
        ops0 = storage_ops(daemon.get("/metrics"))
        with Watch(daemon.proc, daemon.temp_dir) as w:
            result = client(daemon)
        ops1 = storage_ops(daemon.get("/metrics"))
        return Sample(
            name,
            nbytes,
            result["seconds"],
            w.cpu_s,
            w.peak_rss_bytes,
            w.disk_write_bytes,
            w.temp_bytes,
            result["verified"](),
            result.get("patches"),
            {op: n - ops0.get(op, 0) for op, n in ops1.items() if n - ops0.get(op, 0)},
        )

    def put_row(self, name: str, file: str, count: int) -> Sample:
        path = self.files[file]
        size, digest = path.stat().st_size, self.digests[path]

        def client(daemon: Service) -> dict[str, Any]:
            seconds, keys = self.put_urls(daemon, [path] * count, name)
            return {"seconds": seconds, "verified": lambda: self.check(keys, size, digest)}

        return self.proxy_row(name, size * count, client)

    def tus_row(
        self, name: str, file: str, chunk: int | None, count: int, parallel: int = 1,
        via: Callable[[str], str] | None = None,
    ) -> Sample:  # fmt: skip
        path = self.files[file]
        size, digest = path.stat().st_size, self.digests[path]

        def client(daemon: Service) -> dict[str, Any]:
            endpoint = self.tus_endpoint(daemon)
            result = self.tus(via(endpoint) if via else endpoint, path, chunk, count, parallel)

            def verified() -> bool:
                keys = self.tus_keys(result)  # one object per upload, or it is wrong
                return len(keys) == count and self.check(keys, size, digest)

            result["verified"] = verified
            return result

        return self.proxy_row(name, size * count, client)

    def floor_row(self) -> Sample:
        """MiB/s here is one core's hashing rate: the CPU seconds stand for the time."""
        cpu_s = sha256_pass(self.files["main"])[1]
        return Sample("sha256-floor", self.size, cpu_s, cpu_s)

    def direct_row(self) -> Sample:
        path = self.files["main"]
        key = f"bench-direct-r{self.round}"
        argv = [sys.executable, str(BENCH / "direct.py"), self.seaweed.endpoint_url, BUCKET, key]
        argv += [str(path), str(self.part_bytes), str(self.direct_in_flight), self.part_checksum]
        r = subprocess.run(argv, capture_output=True, text=True, env=self.env)
        if r.returncode != 0:
            raise RuntimeError(f"direct upload failed:\n{r.stderr}")
        fig = json.loads(r.stdout)
        verified = self.check([key], self.size, self.digests[path], rehash=True)
        return Sample(
            "direct",
            self.size,
            fig["seconds"],
            fig["cpu_s"],
            fig["peak_rss_bytes"],
            fig["disk_write_bytes"],
            None,
            verified,
        )

    def peer_row(self) -> Sample:
        peer = self.peer or self.start_peer()
        path = self.files["main"]
        endpoint = peer.ready_url
        with Watch(peer.proc, peer.temp_dir) as w:
            result = self.tus(endpoint, path, None, 1)
        keys = self.peer_keys(result, keep_objects=True)
        verified = self.check(keys, self.size, self.digests[path], rehash=True)
        return Sample(
            "peer-tus-server",
            self.size,
            result["seconds"],
            w.cpu_s,
            w.peak_rss_bytes,
            w.disk_write_bytes,
            w.temp_bytes,
            verified,
            result["patches"],
        )

    def wan_row(self, row: str) -> Sample:
        """tus-js-client through bench/wanlink.py (started per row, on loopback)."""
        daemon = self.daemon
        assert daemon is not None
        port = daemon.ready_url.split(":")[2].split("/")[0]
        argv = [sys.executable, str(BENCH / "wanlink.py"), "127.0.0.1", port]
        argv += ["--rtt-ms", str(self.args.wan_rtt_ms), "--loss", str(self.args.wan_loss)]
        link = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        try:
            assert link.stdout is not None
            info = json.loads(link.stdout.readline())
            print(
                f"  emulated link (user-space relay, no sch_netem here): RTT "
                f"{self.args.wan_rtt_ms:g} ms, loss {self.args.wan_loss:g} -> "
                f"{info['rate_bytes_s'] / MiB:.2f} MiB/s per connection",
                flush=True,
            )

            def via(endpoint: str) -> str:
                return endpoint.replace(f":{port}/", f":{info['port']}/")

            parallel = WAN_PARALLEL if row == "wan-4x" else 1
            return self.tus_row(row, "wan", None, 1, parallel, via)
        finally:
            link.terminate()
            link.wait()

    def concurrent_name(self, kind: str) -> str:
        return f"{kind}{size_label(self.concurrent_size)}"

    def run_row(self, row: str) -> Sample:
        if row == "sha256-floor":
            return self.floor_row()
        if row == "direct":
            return self.direct_row()
        if row == "peer-tus-server":
            return self.peer_row()
        if row == "put":
            return self.put_row(row, "main", 1)
        if row == "put-4g":
            return self.put_row(f"put-{size_label(self.big_size)}", "big", 1)
        if row == "put-8x":
            return self.put_row(self.concurrent_name(row), "concurrent", CONCURRENT)
        if row in ("wan-1", "wan-4x"):
            return self.wan_row(row)
        if row == "tus-8x":
            return self.tus_row(self.concurrent_name(row), "concurrent", None, CONCURRENT)
        chunk = 8 * MiB if row == "tus-8mib" else None
        return self.tus_row(row, "main", chunk, 1)

    def run_round(self, rows: list[str]) -> dict[str, Sample]:
        self.rows = rows
        out: dict[str, Sample] = {}
        self.start_daemon()
        try:
            for row in rows:
                try:
                    sample = self.run_row(row)
                except Exception as e:
                    # One broken row (a client error, a dead server, a storage error while
                    # checking) must not lose the others; it is reported and fails the run.
                    self.failures.append(f"round {self.round + 1} {row}: {e}")
                    print(f"  round {self.round + 1} {row} FAILED: {e}", flush=True)
                    continue
                out[sample.row] = sample
                rss = "-" if sample.peak_rss_bytes is None else f"{sample.peak_rss_bytes / MiB:.1f}"
                print(
                    f"  round {self.round + 1} {sample.row:<17}{sample.mib_s:9.1f} MiB/s"
                    f"{sample.cpu_s_per_gib:7.2f} CPU s/GiB  peak RSS {rss} MiB"
                    f"  sha256 {'-' if sample.verified is None else sample.verified}",
                    flush=True,
                )
        finally:
            for service in (self.daemon, self.peer):
                if service is not None:
                    service.stop()
            self.daemon = self.peer = None
        return out

    def close(self) -> None:
        if self.s3 is not None:
            self.loop.run_until_complete(self.s3.close())
        self.loop.run_until_complete(self.seaweed.stop())
        self.loop.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--size", default="1GiB", help="bytes per single upload (default 1GiB)")
    ap.add_argument("--concurrent-size", default="", help="bytes per concurrent upload (size/8)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; figures are medians")
    ap.add_argument("--only", default="", help=f"comma-separated rows of: {', '.join(ROWS)}")
    ap.add_argument("--big", action="store_true", help="add put-4g")
    ap.add_argument("--big-size", default="4GiB", help="bytes of put-4g (named by its size)")
    ap.add_argument("--wan-size", default="32MiB", help="bytes of the wan-* rows (32MiB)")
    ap.add_argument("--wan-rtt-ms", type=float, default=80.0, help="emulated RTT (80)")
    ap.add_argument("--wan-loss", type=float, default=0.005, help="emulated loss rate (0.005)")
    ap.add_argument("--part-size", default="", help="upload.part_size (default: shipped)")
    ap.add_argument("--parts-in-flight", type=int, default=0, help="upload.parts_in_flight")
    ap.add_argument("--direct-in-flight", type=int, default=0, help="direct (parts_in_flight)")
    ap.add_argument("--part-checksum", default="", choices=["", "none", "crc32", "md5", "sha256"])
    ap.add_argument("--workdir", default="", help="keep files and store here (default: temp)")
    ap.add_argument("--results", default=str(BENCH / "results"), help="where the JSON goes")
    ap.add_argument("--compare", default="", help="an earlier JSON to compare with")
    return ap.parse_args(argv)


def selected_rows(args: argparse.Namespace) -> list[str]:
    wanted = [r.strip() for r in args.only.split(",") if r.strip()]
    for r in wanted:
        if r not in ROWS:
            raise SystemExit(f"unknown row {r!r}; rows: {', '.join(ROWS)}")
    if not wanted:
        wanted = [r for r in ROWS if r != "put-4g" or args.big]
    elif args.big and "put-4g" not in wanted:
        wanted.append("put-4g")
    return [r for r in ROWS if r in wanted]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = selected_rows(args)
    if NODE_ROWS & set(rows) and not (JS / "node_modules").is_dir():
        raise SystemExit("bench/js/node_modules missing: run `make bench` (npm ci in bench/js)")
    started, load_start = datetime.now(UTC), load_average()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="upload-proxy-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, work)
    rounds: list[dict[str, Sample]] = []
    try:
        print(f"# preparing files in {work}", flush=True)
        bench.prepare_files(rows)
        bench.start_store()
        for bench.round in range(args.repeat):
            rounds.append(bench.run_round(rows))
    finally:
        bench.close()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return finish(args, bench, rounds, started, load_start)


def finish(
    args: argparse.Namespace,
    bench: Bench,
    rounds: list[dict[str, Sample]],
    started: datetime,
    load_start: list[float],
) -> int:
    """Medians and checks; the JSON written first (a report bug must not lose a run)."""
    names = list(dict.fromkeys(name for r in rounds for name in r))
    medians = {name: median([r[name] for r in rounds if name in r]) for name in names}
    idle = int(statistics.median_low(bench.idle_rss_bytes))
    targets = checks(medians, idle, bench.budget_bytes)
    finished = datetime.now(UTC)
    doc: dict[str, Any] = {
        "schema": 1,
        "started": started.isoformat(),
        "finished": finished.isoformat(),
        "machine": {
            **machine(),
            "load_average_start": load_start,
            "load_average_end": load_average(),
        },
        "versions": {
            **npm_versions(JS / "package-lock.json"),
            "node": node_version(),
            "proxy": git_revision(ROOT),
        },
        "settings": {
            "size_bytes": bench.size,
            "concurrent": [CONCURRENT, bench.concurrent_size],
            "repeat": args.repeat,
            "part_size_bytes": bench.part_bytes,
            "parts_in_flight": bench.parts_in_flight,
            "direct_in_flight": bench.direct_in_flight,
            "part_checksum": bench.part_checksum,
            "memory_budget_bytes": bench.budget_bytes,
            "idle_rss_bytes": bench.idle_rss_bytes,
        },
        "rounds": [{n: s.as_json() for n, s in r.items()} for r in rounds],
        "median": {n: s.as_json() for n, s in medians.items()},
        "checks": [asdict(c) for c in targets],
        "failures": bench.failures,
    }
    out = Path(args.results) / f"{started:%Y%m%dT%H%M%SZ}.json"
    write_json(out, doc)
    print("\n" + header(doc, (finished - started).total_seconds()) + "\n")
    print(table(list(medians.values())))
    print("\nratios and targets (✓ met, ✗ not met; no mark: for information)")
    print("\n".join(c.line() for c in targets))
    per_patch = ops_per_patch(medians)
    if per_patch:
        print("\n" + per_patch)
    print(f"\nraw figures: {out}")
    if args.compare:
        print("\n" + compare(medians, Path(args.compare)))
    if bench.failures:
        print("\nFAILED rows:\n  " + "\n  ".join(bench.failures))
    wrong = [s.row for r in rounds for s in r.values() if s.verified is False]
    if wrong:
        print(f"\nWRONG SHA-256 of the stored object: {', '.join(wrong)}")
    return 1 if bench.failures or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
