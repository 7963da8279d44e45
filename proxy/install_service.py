"""``upload-proxy install-service``: the daemon as a systemd service, from the lock.

What it puts where (all under ``--destdir`` when given, as a package build would)::

    /usr/local/lib/sysusers.d/upload-proxy.conf   the system user (systemd-sysusers format)
    /usr/local/lib/tmpfiles.d/upload-proxy.conf   owner and mode 0600 of the token file
    {prefix}/venv                                 python3 -m venv, then pip --require-hashes
                                                  -r daemon.lock, then the package --no-deps
    {prefix}/docs/deploy-pi.md                    the unit's Documentation=
    /etc/upload-proxy/config.toml                 auth "required", embedded store in
                                                  /var/lib/upload-proxy (kept if present)
    /etc/upload-proxy/tokens                      one generated token's hash (kept if present)
    /usr/local/lib/systemd/system/upload-proxy.service   systemd/upload-proxy.service as is

/usr/local/lib is where systemd looks for units, users and tmpfiles an administrator
installed (as opposed to the distribution's /usr/lib), and it leaves /etc/systemd for
``systemctl edit``.  The unit runs with ``DynamicUser=yes`` and ``User=upload-proxy``:
systemd then uses the static user when it exists, so the token file can be 0600 and
owned by it.  Without ``--destdir`` the user is created at once (``systemd-sysusers``,
or ``useradd`` where systemd is absent); with it, nothing outside the destdir is touched.

Running it again changes nothing that exists (config, token, a venv built from the same
lock and package); ``--uninstall`` removes the venv, the unit and the entries above and
leaves the configuration, the uploaded data (/var/lib/upload-proxy) and the user alone.

This module uses the standard library only, so that ``python3 -m proxy.install_service``
works from a source checkout on a Raspberry Pi that has nothing else installed yet.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from proxy.auth import hash_token

NAME = "upload-proxy"
DEFAULT_PREFIX = Path("/opt/upload-proxy")
CONFIG_DIR = Path("/etc/upload-proxy")
STATE_DIR = Path("/var/lib/upload-proxy")  # the unit's StateDirectory=
UNIT_DIR = Path("/usr/local/lib/systemd/system")
SYSUSERS = Path("/usr/local/lib/sysusers.d") / f"{NAME}.conf"
TMPFILES = Path("/usr/local/lib/tmpfiles.d") / f"{NAME}.conf"
UNIT = f"{NAME}.service"
# Files shipped beside the package: in a source checkout, or installed by the wheel as
# data files under {sys.prefix}/share/upload-proxy with the same relative paths.
LOCK = "requirements/daemon.lock"
UNIT_SOURCE = f"systemd/{UNIT}"
DOC = "docs/deploy-pi.md"
VENV_STAMP = ".upload-proxy-installed"

SYSUSERS_TEXT = f"""\
# The user upload-proxy.service runs as (written by upload-proxy install-service).
u {NAME} - "upload-proxy daemon" {STATE_DIR}
"""
TMPFILES_TEXT = f"""\
# The token hashes are readable by the service only (written by upload-proxy install-service).
z {CONFIG_DIR}/tokens 0600 {NAME} {NAME} -
"""
CONFIG_TEXT = f"""\
# upload-proxy configuration, written by `upload-proxy install-service` on {{date}}.
# Every key, its default and its trade-off: config.toml in the source.  Memory and part
# sizes for a Raspberry Pi: {{prefix}}/docs/deploy-pi.md.  After editing:
#   {{prefix}}/venv/bin/upload-proxy --check-config -c {CONFIG_DIR}/config.toml

[server]
listen = "127.0.0.1:8080"          # loopback: nginx in front (contrib/nginx)
trusted_proxies = ["127.0.0.1", "::1"]

[upload]
key_prefix = "incoming/"           # the stale-upload sweeper looks only under here
memory_budget = "256MiB"

[storage]
backend = "embedded"               # or "s3" with endpoint_url for MinIO
bucket = "uploads"

[storage.embedded]
data_dir = "{STATE_DIR}/seaweedfs"

[auth]
mode = "required"
# sha256: hashes, one per line; add one with: echo -n "$TOKEN" | upload-proxy hash-token
token_file = "tokens"

[logging]
format = "json"                    # journald / Loki
"""


def resource(rel: str) -> Path:
    """A file shipped with the package: from the checkout, else from the wheel's data."""
    here = Path(__file__).resolve().parent.parent
    for root in (here, Path(sys.prefix) / "share" / NAME):
        if (root / rel).is_file():
            return root / rel
    raise FileNotFoundError(f"{rel} not found beside {here} nor in {sys.prefix}/share/{NAME}")


def default_package() -> Path | None:
    """The source checkout this module runs from, if it is one."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "setup.cfg").is_file() else None


class Installer:
    def __init__(self, destdir: Path, prefix: Path, python: str) -> None:
        self.destdir = destdir
        self.prefix = prefix
        self.python = python
        self.live = destdir == Path("/")  # act on this system, not only write files

    def path(self, p: Path) -> Path:
        return self.destdir / p.relative_to("/")

    def write(self, p: Path, text: str, mode: int = 0o644) -> None:
        target = self.path(p)
        target.parent.mkdir(parents=True, exist_ok=True)
        old = target.read_text() if target.exists() else None
        if old != text:
            tmp = target.with_name(target.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, target)
        os.chmod(target, mode)
        say("wrote" if old != text else "unchanged", target)

    def run(self, *argv: str | Path) -> None:
        subprocess.run([str(a) for a in argv], check=True)

    # -- install -------------------------------------------------------------------

    def install(self, package: Path, lock: Path) -> None:
        self.write(SYSUSERS, SYSUSERS_TEXT)
        self.write(TMPFILES, TMPFILES_TEXT)
        if self.live:
            self.create_user()
        self.install_venv(package, lock)
        self.write(self.prefix / DOC, resource(DOC).read_text())
        token = self.install_config()
        self.write(UNIT_DIR / UNIT, resource(UNIT_SOURCE).read_text())
        dropin = UNIT_DIR / f"{UNIT}.d" / "prefix.conf"
        if self.prefix != DEFAULT_PREFIX:
            exe = self.prefix / "venv" / "bin" / NAME
            self.write(
                dropin,
                "# install-service --prefix: the venv is not where the unit expects it.\n"
                f"[Service]\nExecStart=\nExecStart={exe} -c {CONFIG_DIR}/config.toml\n",
            )
        elif self.path(dropin).exists():
            self.path(dropin).unlink()
        if self.live and Path("/run/systemd/system").is_dir():
            self.run("systemctl", "daemon-reload")
        next_steps(self, token)

    def create_user(self) -> None:
        if shutil.which("systemd-sysusers"):
            self.run("systemd-sysusers", SYSUSERS)
        elif subprocess.run(["getent", "passwd", NAME], capture_output=True).returncode != 0:
            # No systemd here (a container, a chroot): the same user by hand.
            self.run(
                "useradd", "--system", "--user-group", "--no-create-home",
                "--home-dir", STATE_DIR, "--shell", "/usr/sbin/nologin", NAME,
            )  # fmt: skip

    def install_venv(self, package: Path, lock: Path) -> None:
        venv = self.path(self.prefix / "venv")
        stamp = venv / VENV_STAMP
        digest = hashlib.sha256(lock.read_bytes())
        # A wheel is the same bytes every time; a source tree may have changed since.
        digest.update(package.read_bytes() if package.is_file() else os.urandom(16))
        if stamp.exists() and stamp.read_text() == digest.hexdigest():
            say("unchanged", venv, f"({lock.name} and {package.name} as before)")
            return
        say("building", venv, f"from {lock} and {package}")
        self.run(self.python, "-m", "venv", "--clear", venv)
        pip = (venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-compile")
        self.run(*pip, "--require-hashes", "-r", lock)
        self.run(*pip, "--no-deps", package)
        if not self.live:
            self.relocate(venv)
        # Byte-compile now: under ProtectSystem=strict the service cannot write __pycache__.
        # -s/-p: tracebacks name /opt/..., not the destdir the files were built in.
        strip = ("-s", str(self.destdir), "-p", "/") if not self.live else ()
        self.run(
            venv / "bin" / "python", "-m", "compileall", "-q", "-f", "-j0", *strip, venv / "lib"
        )
        stamp.write_text(digest.hexdigest())

    def relocate(self, venv: Path) -> None:
        """Scripts built in the destdir name it in their #! line; the unit runs them from /."""
        built, final = str(venv).encode(), str(self.prefix / "venv").encode()
        for script in [*(venv / "bin").iterdir(), venv / "pyvenv.cfg"]:
            if script.is_file() and not script.is_symlink():
                data = script.read_bytes()
                if built in data and b"\0" not in data:
                    script.write_bytes(data.replace(built, final))

    def install_config(self) -> str | None:
        """config.toml and the token file, unless they exist; the new token, if any."""
        self.path(CONFIG_DIR).mkdir(parents=True, exist_ok=True)
        config = self.path(CONFIG_DIR / "config.toml")
        if config.exists():
            say("kept", config)
        else:
            date = time.strftime("%Y-%m-%d")
            self.write(
                CONFIG_DIR / "config.toml", CONFIG_TEXT.format(date=date, prefix=self.prefix)
            )
        tokens = CONFIG_DIR / "tokens"
        if self.path(tokens).exists():
            say("kept", self.path(tokens), "(no new token)")
            return None
        token = secrets.token_urlsafe(32)
        self.write(tokens, f"# written by install-service\n{hash_token(token)}\n", mode=0o600)
        if self.live:
            if shutil.which("systemd-tmpfiles"):
                self.run("systemd-tmpfiles", "--create", TMPFILES)
            else:
                shutil.chown(tokens, NAME, NAME)
        return token

    # -- uninstall -----------------------------------------------------------------

    def uninstall(self) -> None:
        if self.live and Path("/run/systemd/system").is_dir():
            subprocess.run(["systemctl", "disable", "--now", UNIT], check=False)
        for p in (UNIT_DIR / UNIT, SYSUSERS, TMPFILES, self.prefix / DOC):
            if self.path(p).exists():
                self.path(p).unlink()
                say("removed", self.path(p))
        for d in (UNIT_DIR / f"{UNIT}.d", self.prefix / "venv"):
            if self.path(d).exists():
                shutil.rmtree(self.path(d))
                say("removed", self.path(d))
        for d in (self.prefix / "docs", self.prefix):
            if self.path(d).is_dir() and not any(self.path(d).iterdir()):
                self.path(d).rmdir()
        if self.live and Path("/run/systemd/system").is_dir():
            self.run("systemctl", "daemon-reload")
        print(
            f"\nKept: {CONFIG_DIR} (config and token hashes), {STATE_DIR} (uploaded data, "
            f"also /var/lib/private/{NAME} under DynamicUser) and the user {NAME}.\n"
            f"Remove them by hand if the data is no longer wanted."
        )


def say(what: str, path: Path, note: str = "") -> None:
    print(f"{what:>9}  {path}{' ' + note if note else ''}")


def next_steps(inst: Installer, token: str | None) -> None:
    share = f"{inst.prefix}/venv/share/{NAME}"
    if token:
        print(f"\nBearer token (shown once; only its hash is stored):\n\n    {token}\n")
    if not inst.live:
        print(
            f"Installed into {inst.destdir}.  On the target: systemd-sysusers {SYSUSERS} "
            f"&& systemd-tmpfiles --create {TMPFILES}"
        )
    print(f"""Next steps (details: {inst.prefix}/docs/deploy-pi.md):
  1. Start it:    systemctl enable --now {UNIT}; journalctl -u {UNIT} -f
  2. Try it:      curl -H "Authorization: Bearer $TOKEN" -T FILE \\
                      http://127.0.0.1:8080/uploads/test/FILE
  3. nginx site:  cp {share}/contrib/nginx/upload-proxy.conf /etc/nginx/sites-available/{NAME}
                  (set server_name, enable TLS), link it into sites-enabled, nginx -t, reload
  4. Prometheus:  add {share}/contrib/prometheus/scrape.yml (127.0.0.1:8080/metrics) to
                  scrape_configs, and contrib/prometheus/alerts.yml to rule_files""")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "install-service",
        help="install the daemon as a systemd service (run as root)",
        description="Install the daemon as a systemd service: a service user, a virtual "
        "environment, /etc/upload-proxy/config.toml with a generated token (printed once), "
        "and the unit.  Running it again changes nothing; --uninstall removes it and keeps "
        "your configuration and uploaded data.",
    )
    configure(p)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--destdir", type=Path, default=Path("/"), help="staging root (default /)")
    p.add_argument("--prefix", type=Path, default=DEFAULT_PREFIX, help="default %(default)s")
    p.add_argument(
        "--package",
        type=Path,
        default=None,
        help="wheel (or source tree) to install; default: the checkout this runs from",
    )
    p.add_argument("--lock", type=Path, default=None, help=f"default: the shipped {LOCK}")
    p.add_argument(
        "--python",
        default="/usr/bin/python3",
        help="interpreter the venv is made with (default %(default)s: the service "
        "cannot read a Python under /root or /home)",
    )
    p.add_argument("--uninstall", action="store_true", help="remove; keep config and data")


def run(args: argparse.Namespace) -> int:
    if not args.prefix.is_absolute() or not args.destdir.is_absolute():
        print("install-service: --prefix and --destdir must be absolute", file=sys.stderr)
        return 2
    inst = Installer(args.destdir, args.prefix, args.python)
    if inst.live and os.geteuid() != 0:
        print("install-service: run as root (or give --destdir)", file=sys.stderr)
        return 2
    if args.uninstall:
        inst.uninstall()
        return 0
    package = args.package or default_package()
    if package is None:
        print("install-service: --package WHEEL is needed outside a checkout", file=sys.stderr)
        return 2
    try:
        lock = args.lock or resource(LOCK)
        inst.install(package.resolve(), lock.resolve())
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"install-service: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.install_service", description=__doc__)
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
