"""Throughput, CPU and memory of the proxy vs. direct-to-S3, on loopback.  Prints figures.

Starts its own SeaweedFS (loopback, free ports) and the daemon as a subprocess,
then runs:

  put-1g      curl -T of a 1 GiB file through the proxy
  direct-1g   the same file straight to S3 with aiobotocore, same part size and parallelism
  8x128m      8 concurrent curl uploads of 128 MiB through the proxy
  put-4g      (--big) a 4 GiB upload, to show peak RSS is flat in file size

For each: MiB/s, proxy peak RSS, proxy CPU seconds per GiB, bytes the proxy wrote to disk.

    .venv/bin/python bench/run.py [--scenarios put-1g,direct-1g,8x128m] [--big]
        [--part-checksum none|crc32|md5|sha256] [--no-hash-thread] [--repeat N]

Not a test: nothing here asserts.  SeaweedFS shares the 2 cores, so every CPU
second the proxy spends per GiB shows up as lost throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import Credentials, EmbeddedSeaweed, free_port

MiB = 1024 * 1024
GiB = 1024 * MiB
BUCKET = "bench-uploads"


@dataclass
class Figures:
    name: str
    nbytes: int
    seconds: float
    peak_rss: int
    cpu_s: float
    disk_write: int

    def row(self) -> str:
        gib = self.nbytes / GiB
        return (
            f"{self.name:<12} {self.nbytes / MiB:>8.0f} MiB"
            f" {self.nbytes / MiB / self.seconds:>8.1f} MiB/s"
            f" {self.peak_rss / MiB:>8.1f} MiB {self.cpu_s / gib:>8.2f} s/GiB"
            f" {self.disk_write:>10d} B"
        )


class Sampler:
    """Peak RSS of a process, sampled every 10 ms in a thread (does not need the event loop)."""

    def __init__(self, proc: psutil.Process) -> None:
        self.proc = proc
        self.peak = proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.01)

    def __enter__(self) -> Sampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def make_file(path: Path, size: int) -> Path:
    if path.exists() and path.stat().st_size == size:
        return path
    block = os.urandom(MiB)
    with path.open("wb") as f:
        for _ in range(size // MiB):
            f.write(block)
    return path


def disk_written(proc: psutil.Process) -> int:
    try:
        return int(proc.io_counters().write_bytes)
    except (psutil.Error, AttributeError):
        return -1


def measure(name: str, nbytes: int, proc: psutil.Process, run: object) -> Figures:
    cpu0 = proc.cpu_times()
    disk0 = disk_written(proc)
    with Sampler(proc) as s:
        t0 = time.perf_counter()
        run()  # type: ignore[operator]
        seconds = time.perf_counter() - t0
    cpu1 = proc.cpu_times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return Figures(name, nbytes, seconds, s.peak, cpu, disk_written(proc) - disk0)


def curl_put(url: str, path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["curl", "-sS", "-f", "-o", "/dev/null", "-T", str(path), url])


def wait_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"curl failed with {p.returncode}")


async def direct_upload(
    endpoint: str, creds: Credentials, path: Path, part: int, in_flight: int
) -> None:
    async with S3Storage(
        bucket=BUCKET,
        endpoint_url=endpoint,
        access_key=creds.access_key,
        secret_key=creds.secret_key,
    ) as s3:
        key = f"direct-{time.time_ns()}"
        uid = await s3.create_multipart(key, metadata={}, content_type="application/octet-stream")
        sem = asyncio.Semaphore(in_flight)
        parts: dict[int, str] = {}

        async def send(n: int, data: bytes) -> None:
            try:
                parts[n] = await s3.upload_part(key, uid, n, data, None)
            finally:
                sem.release()

        tasks = []
        with path.open("rb") as f:
            n = 0
            while True:
                await sem.acquire()
                data = f.read(part)
                if not data:
                    sem.release()
                    break
                n += 1
                tasks.append(asyncio.create_task(send(n, data)))
        await asyncio.gather(*tasks)
        from proxy.storage.base import CompletedPart

        await s3.complete_multipart(
            key, uid, [CompletedPart(i, parts[i]) for i in sorted(parts)], if_none_match=False
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenarios", default="put-1g,direct-1g,8x128m")
    ap.add_argument("--big", action="store_true", help="add put-4g")
    ap.add_argument("--part-size", default="8MiB")
    ap.add_argument("--parts-in-flight", type=int, default=2)
    ap.add_argument("--part-checksum", default="none")
    ap.add_argument("--no-hash-thread", action="store_true")
    ap.add_argument("--memory-budget", default="256MiB")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workdir", default="")
    args = ap.parse_args()
    scenarios = args.scenarios.split(",") + (["put-4g"] if args.big else [])

    work = Path(args.workdir or tempfile.mkdtemp(prefix="upload-proxy-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    creds = Credentials("benchkey", "benchsecret")
    sw = EmbeddedSeaweed(work / "seaweed", bucket=BUCKET, credentials=creds)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(sw.start(90))
    port = free_port()
    cfg = work / "config.toml"
    cfg.write_text(f"""
[server]
listen = "127.0.0.1:{port}"
[upload]
overwrite = true
part_size = "{args.part_size}"
parts_in_flight = {args.parts_in_flight}
part_checksum = "{args.part_checksum}"
hash_in_thread = {"false" if args.no_hash_thread else "true"}
memory_budget = "{args.memory_budget}"
admission_timeout_s = 60
[auth]
mode = "none"
[storage]
backend = "s3"
bucket = "{BUCKET}"
endpoint_url = "{sw.endpoint_url}"
[logging]
level = "warning"
""")
    env = dict(
        os.environ, AWS_ACCESS_KEY_ID=creds.access_key, AWS_SECRET_ACCESS_KEY=creds.secret_key
    )
    daemon = subprocess.Popen([sys.executable, "-m", "proxy", "-c", str(cfg)], env=env)
    url = f"http://127.0.0.1:{port}/uploads"
    try:
        for _ in range(300):
            r = subprocess.run(
                [
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    f"http://127.0.0.1:{port}/healthz",
                ],
                capture_output=True,
                text=True,
            )
            if r.stdout == "200":
                break
            time.sleep(0.1)
        proxy = psutil.Process(daemon.pid)
        me = psutil.Process()
        idle_rss = proxy.memory_info().rss
        f1g = make_file(work / "1g.bin", GiB)
        f128 = make_file(work / "128m.bin", 128 * MiB)
        part = int(args.part_size.removesuffix("MiB")) * MiB
        print(
            f"# proxy idle RSS {idle_rss / MiB:.1f} MiB; part_size={args.part_size} "
            f"parts_in_flight={args.parts_in_flight} part_checksum={args.part_checksum} "
            f"hash_in_thread={not args.no_hash_thread} cpus={os.cpu_count()}"
        )
        print(
            f"{'scenario':<12} {'size':>12} {'rate':>13} {'peak RSS':>12} {'CPU':>14} "
            f"{'disk writes':>12}"
        )
        for _ in range(args.repeat):
            for sc in scenarios:
                if sc == "put-1g":
                    fig = measure(sc, GiB, proxy, lambda: wait_all([curl_put(f"{url}/b/1g", f1g)]))
                elif sc == "direct-1g":
                    fig = measure(
                        sc,
                        GiB,
                        me,
                        lambda: loop.run_until_complete(
                            direct_upload(sw.endpoint_url, creds, f1g, part, args.parts_in_flight)
                        ),
                    )
                    fig.peak_rss = 0  # the bench process itself: not comparable
                elif sc == "8x128m":
                    fig = measure(
                        sc,
                        8 * 128 * MiB,
                        proxy,
                        lambda: wait_all([curl_put(f"{url}/b/c{i}", f128) for i in range(8)]),
                    )
                elif sc == "put-4g":
                    f4g = make_file(work / "4g.bin", 4 * GiB)
                    fig = measure(
                        sc,
                        4 * GiB,
                        proxy,
                        lambda f=f4g: wait_all([curl_put(f"{url}/b/4g", f)]),  # type: ignore[misc]
                    )
                else:
                    raise SystemExit(f"unknown scenario {sc}")
                print(fig.row(), flush=True)
    finally:
        daemon.terminate()
        daemon.wait(30)
        loop.run_until_complete(sw.stop())
        loop.close()


if __name__ == "__main__":
    main()
