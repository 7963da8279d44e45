"""`python -m build` and `upload-proxy install-service --destdir`, for real.

One staging install per module (a venv from requirements/daemon.lock and the wheel just
built, the slow part), then: its layout and modes, the installed daemon running from that
venv against the session's SeaweedFS, the unit through systemd-analyze verify, the
sysusers/tmpfiles entries applied to the staging root, a second run that changes
nothing, and last an uninstall that keeps config and data.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.auth import hash_token
from proxy.storage.seaweed import EmbeddedSeaweed, free_port

from conftest import BUCKET, wait_up
from daemon import write_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
VENV = Path("opt/upload-proxy/venv")
UNIT = Path("usr/local/lib/systemd/system/upload-proxy.service")
SYSUSERS = Path("usr/local/lib/sysusers.d/upload-proxy.conf")
TMPFILES = Path("usr/local/lib/tmpfiles.d/upload-proxy.conf")
CONFIG = Path("etc/upload-proxy/config.toml")
TOKENS = Path("etc/upload-proxy/tokens")


def install_service(destdir: Path, *args: str | Path) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "proxy", "install-service", "--destdir", destdir, *args],
        capture_output=True,
        text=True,
        timeout=900,  # a venv from the lock; minutes on a loaded 2-core machine
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def source_copy(dest: Path) -> Path:
    """The checkout's own files (git's list where there is one), copied to ``dest``.

    setuptools builds the sdist inside the source tree (egg-info, a release tree it
    deletes again) from a file list taken first: with the other test worker running in
    the same checkout, a build there once failed on a file gone between list and copy."""
    if (ROOT / ".git").exists():
        listed = subprocess.run(
            ["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
        ).stdout.split(b"\0")
        for rel in filter(None, (name.decode() for name in listed)):
            if (ROOT / rel).is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dest / rel)
    else:  # an unpacked sdist: no git, nothing but sources
        heavy = shutil.ignore_patterns(".venv", "node_modules", "data", "*.egg-info", "__pycache__")
        shutil.copytree(ROOT, dest, ignore=heavy, dirs_exist_ok=True)
    return dest


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m build`: an sdist, and a wheel built from that sdist."""
    out = tmp_path_factory.mktemp("dist")
    src = source_copy(tmp_path_factory.mktemp("src"))
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def staged(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A staging root with the service installed, and the token it printed."""
    destdir = tmp_path_factory.mktemp("destdir")
    (wheel,) = dist.glob("upload_proxy-*-py3-none-any.whl")
    out = install_service(destdir, "--package", wheel)
    tokens = re.findall(r"shown once.*\n\s*\n\s+(\S+)\n", out)
    assert len(tokens) == 1, out
    return destdir, tokens[0]


def test_build_makes_a_wheel_and_an_sdist_with_what_install_service_needs(dist: Path) -> None:
    import tarfile
    import zipfile

    (sdist,) = dist.glob("upload_proxy-*.tar.gz")
    (wheel,) = dist.glob("upload_proxy-*-py3-none-any.whl")
    shipped = ["requirements/daemon.lock", "systemd/upload-proxy.service", "docs/deploy-pi.md"]
    wheel_names = zipfile.ZipFile(wheel).namelist()
    sdist_names = tarfile.open(sdist).getnames()
    for rel in shipped:
        assert any(n.endswith(f"data/share/upload-proxy/{rel}") for n in wheel_names), rel
        assert any(n.endswith(f"/{rel}") for n in sdist_names), rel


def test_layout_modes_and_config(staged: tuple[Path, str]) -> None:
    destdir, token = staged
    for rel in (UNIT, SYSUSERS, TMPFILES, CONFIG, Path("opt/upload-proxy/docs/deploy-pi.md")):
        assert (destdir / rel).is_file(), rel
    assert (destdir / UNIT).read_bytes() == (ROOT / "systemd/upload-proxy.service").read_bytes()
    assert (destdir / TOKENS).stat().st_mode & 0o777 == 0o600
    assert hash_token(token) in (destdir / TOKENS).read_text()
    assert token not in (destdir / TOKENS).read_text()
    assert re.search(r'^mode = "required"$', (destdir / CONFIG).read_text(), re.M)
    assert (destdir / SYSUSERS).read_text().splitlines()[-1].startswith("u upload-proxy - ")


def test_the_venv_runs_from_the_final_path(staged: tuple[Path, str]) -> None:
    """Nothing in the venv's scripts names the staging root; the daemon and its locked
    dependencies come from the venv, not from this checkout."""
    destdir, _ = staged
    venv = destdir / VENV
    assert (venv / "bin/upload-proxy").read_text().startswith("#!/opt/upload-proxy/venv/bin/")
    texts = [p for p in (venv / "bin").iterdir() if p.is_file() and b"\0" not in p.read_bytes()]
    assert len(texts) > 3
    assert [p.name for p in texts if str(destdir).encode() in p.read_bytes()] == []
    probe = "import aiohttp, proxy, proxy.server, proxy.storage.s3; print(proxy.__file__)"
    r = subprocess.run(
        [venv / "bin/python", "-c", probe], capture_output=True, text=True, cwd=destdir
    )
    assert r.stdout.startswith(str(venv / "lib")), r.stdout + r.stderr
    lock_aiohttp = re.search(
        r"^aiohttp==(\S+)", (ROOT / "requirements/daemon.lock").read_text(), re.M
    )
    assert lock_aiohttp
    r = subprocess.run(
        [venv / "bin/python", "-c", "import aiohttp; print(aiohttp.__version__)"],
        capture_output=True,
        text=True,
    )
    assert r.stdout.strip() == lock_aiohttp.group(1)


async def test_the_installed_daemon_takes_an_upload_with_the_token(
    staged: tuple[Path, str], seaweed: EmbeddedSeaweed, tmp_path: Path
) -> None:
    """The installed config's auth, run from the installed venv (storage pointed at the
    session's SeaweedFS instead of an embedded one, to keep this quick)."""
    destdir, token = staged
    port = free_port()
    config = write_config(
        destdir / "etc/upload-proxy/test.toml",
        {
            "server": {"listen": f"127.0.0.1:{port}"},
            "upload": {"key_prefix": "install-service/"},
            "storage": {"backend": "s3", "bucket": BUCKET, "endpoint_url": seaweed.endpoint_url},
            "auth": {"mode": "required", "token_file": "tokens"},
        },
    )
    env = {
        "PATH": os.environ["PATH"],
        "AWS_ACCESS_KEY_ID": seaweed.credentials.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweed.credentials.secret_key,
    }
    venv_python = destdir / VENV / "bin/python"
    proc = await asyncio.create_subprocess_exec(
        venv_python, "-m", "proxy", "-c", config, cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    body = os.urandom(100_000)
    try:
        await wait_up(url)
        async with aiohttp.ClientSession() as http:
            async with http.put(f"{url}/uploads/a.bin", data=body) as r:
                assert r.status == 401
            headers = {"Authorization": f"Bearer {token}"}
            async with http.put(f"{url}/uploads/a.bin", data=body, headers=headers) as r:
                assert r.status == 201, await r.text()
                assert (await r.json())["sha256"] == hashlib.sha256(body).hexdigest()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        config.unlink()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_installed_unit_verifies(staged: tuple[Path, str]) -> None:
    destdir, _ = staged
    exe = destdir / VENV / "bin/upload-proxy"
    r = subprocess.run(
        [ROOT / "systemd/check-unit.sh", destdir / UNIT, exe, "2.0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify: ok" in r.stdout


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_sysusers_and_tmpfiles_entries_apply(staged: tuple[Path, str]) -> None:
    """What a package's postinst (or the live install) runs, applied to the staging root:
    the user exists and owns the 0600 token file."""
    destdir, _ = staged
    for cmd in (["systemd-sysusers"], ["systemd-tmpfiles", "--create"]):
        conf = destdir / (SYSUSERS if cmd[0] == "systemd-sysusers" else TMPFILES)
        subprocess.run([*cmd, f"--root={destdir}", conf], check=True, capture_output=True)
    passwd = (destdir / "etc/passwd").read_text()
    m = re.search(r"^upload-proxy:x:(\d+):(\d+):.*:/var/lib/upload-proxy:", passwd, re.M)
    assert m, passwd
    st = (destdir / TOKENS).stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (int(m[1]), int(m[2]), 0o600)


def test_a_second_run_changes_nothing(staged: tuple[Path, str], dist: Path) -> None:
    destdir, _ = staged
    files = [UNIT, SYSUSERS, TMPFILES, CONFIG, TOKENS, VENV / "bin/upload-proxy"]
    before = {f: ((destdir / f).read_bytes(), (destdir / f).stat().st_mtime_ns) for f in files}
    (wheel,) = dist.glob("upload_proxy-*-py3-none-any.whl")
    out = install_service(destdir, "--package", wheel)
    assert "shown once" not in out
    assert re.search(r"unchanged\s+\S+/venv", out), out
    assert re.search(r"kept\s+\S+/config.toml", out), out
    after = {f: ((destdir / f).read_bytes(), (destdir / f).stat().st_mtime_ns) for f in files}
    assert after == before


def test_uninstall_keeps_config_and_data(staged: tuple[Path, str]) -> None:
    """Runs last in this module: it takes the staged install away."""
    destdir, _ = staged
    data = destdir / "var/lib/upload-proxy/seaweedfs/volume.dat"
    data.parent.mkdir(parents=True)
    data.write_bytes(b"uploaded bytes")
    assert (destdir / VENV).is_dir() and (destdir / UNIT).is_file()  # there to remove
    out = install_service(destdir, "--uninstall")
    assert "Kept:" in out
    for gone in (VENV, UNIT, SYSUSERS, TMPFILES, Path("opt/upload-proxy")):
        assert not (destdir / gone).exists(), gone
    assert data.read_bytes() == b"uploaded bytes"
    assert (destdir / CONFIG).is_file() and (destdir / TOKENS).is_file()
