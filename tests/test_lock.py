"""The lock files agree with setup.cfg, and every install is pinned with hashes.

``make install`` installs ``requirements/dev.lock`` with ``pip --require-hashes`` and the
package itself with ``--no-deps``, so a requirement added to setup.cfg but not locked
would simply be missing; a lock that no longer satisfies setup.cfg would run code the
package does not claim to support.  Both fail here, with the fix (``make lock``).
"""

from __future__ import annotations

import configparser
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tools.check_aarch64 import read_lock as lock_entries

ROOT = Path(__file__).resolve().parent.parent
DAEMON_LOCK = ROOT / "requirements" / "daemon.lock"
DEV_LOCK = ROOT / "requirements" / "dev.lock"
TOOLS_IN = ROOT / "requirements" / "tools.in"
FIX = "run `make lock` and commit requirements/"


@dataclass(frozen=True)
class Pin:
    version: str
    marker: Marker | None
    hashes: tuple[str, ...]


def read_lock(path: Path) -> dict[str, Pin]:
    pins: dict[str, Pin] = {}
    for req, hashes in lock_entries(path):
        (spec,) = req.specifier
        assert spec.operator == "==", f"{path.name}: {req} is not pinned with =="
        pins[canonicalize_name(req.name)] = Pin(spec.version, req.marker, tuple(hashes))
    return pins


def setup_cfg_requirements() -> dict[str, list[Requirement]]:
    """install_requires and each extra (``%(test)s`` expanded), comments dropped."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")

    def parse(text: str) -> list[Requirement]:
        lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
        return [Requirement(line) for line in lines if line]

    groups = {"install_requires": parse(cfg["options"]["install_requires"])}
    for extra, text in cfg["options.extras_require"].items():
        groups[extra] = parse(text)
    return groups


def unsatisfied(reqs: list[Requirement], pins: dict[str, Pin]) -> list[str]:
    problems = []
    for req in reqs:
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{req} is not in the lock")
        elif not req.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{req} is not satisfied by the locked {req.name}=={pin.version}")
    return problems


def test_daemon_lock_satisfies_install_requires() -> None:
    problems = unsatisfied(setup_cfg_requirements()["install_requires"], read_lock(DAEMON_LOCK))
    assert not problems, f"{DAEMON_LOCK.name}: {problems}; {FIX}"


@pytest.mark.parametrize("group", ["install_requires", "test", "dev"])
def test_dev_lock_satisfies_setup_cfg(group: str) -> None:
    problems = unsatisfied(setup_cfg_requirements()[group], read_lock(DEV_LOCK))
    assert not problems, f"{DEV_LOCK.name}: {problems}; {FIX}"


def test_dev_lock_has_the_tools_and_the_build_backend() -> None:
    """make lock needs uv, make dist needs build; both build with the locked setuptools."""
    tools = [Requirement(line) for line in TOOLS_IN.read_text().splitlines() if line[:1].isalpha()]
    build_requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    reqs = tools + [Requirement(r) for r in build_requires["requires"]]
    problems = unsatisfied(reqs, read_lock(DEV_LOCK))
    assert not problems, f"{DEV_LOCK.name}: {problems}; {FIX}"


def test_tests_run_the_versions_the_daemon_is_deployed_with() -> None:
    daemon, dev = read_lock(DAEMON_LOCK), read_lock(DEV_LOCK)
    # Markers may differ (a dev tool may need a package on more Pythons); files may not.
    files = {n: (p.version, p.hashes) for n, p in daemon.items()}
    same = {n for n in daemon if (dev[n].version, dev[n].hashes) == files[n]}
    differ = {n: (daemon[n].version, dev[n].version) for n in daemon.keys() - same}
    assert not differ, f"daemon.lock vs dev.lock: {differ}; {FIX}"


@pytest.mark.parametrize("lock", [DAEMON_LOCK, DEV_LOCK], ids=lambda p: p.name)
def test_every_pin_has_hashes(lock: Path) -> None:
    """pip --require-hashes refuses a lock with one unhashed entry; say which here."""
    pins = read_lock(lock)
    assert len(pins) > 10  # the parser found the entries (a vacuous pass otherwise)
    assert [name for name, pin in pins.items() if not pin.hashes] == []


def test_the_venv_is_what_the_lock_says() -> None:
    """What `make install` put into the venv running these tests is the locked set."""
    from importlib.metadata import distributions

    pins = read_lock(DEV_LOCK)
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in distributions()}
    wrong = {
        name: (pin.version, installed.get(name))
        for name, pin in pins.items()
        if (pin.marker is None or pin.marker.evaluate()) and installed.get(name) != pin.version
    }
    assert not wrong, f"locked vs installed: {wrong}; run `make install`"


# The npm pieces: tus-js-client for tests/test_tus_clients.py, the bench's client and
# peer (bench/js), the upload page's build (webui).
JS_DIRS = [ROOT / "tests" / "js", ROOT / "bench" / "js", ROOT / "webui"]


@pytest.mark.parametrize("js_dir", JS_DIRS, ids=lambda d: str(d.relative_to(ROOT)))
def test_npm_lock_pins_every_package_with_an_integrity_hash(js_dir: Path) -> None:
    lock = json.loads((js_dir / "package-lock.json").read_text())
    manifest = json.loads((js_dir / "package.json").read_text())
    packages = lock["packages"]
    for field in ("dependencies", "devDependencies"):
        wanted = manifest.get(field, {})
        assert packages[""].get(field, {}) == wanted, "package-lock.json is stale: npm install"
        assert all(f"node_modules/{name}" in packages for name in wanted)
    deps = {k: v for k, v in packages.items() if k and not v.get("link")}
    assert deps, "nothing locked"
    loose = [k for k, v in deps.items() if not v.get("integrity", "").startswith("sha512-")]
    assert loose == [], f"no sha512 integrity for {loose}"


def test_npm_is_only_used_through_its_lock() -> None:
    """`npm ci` installs exactly package-lock.json; `npm install` / npx may resolve anew.
    (`npm test` runs a script of the package with what `npm ci` installed.)"""
    files = [ROOT / "Makefile", ROOT / ".ci" / "run", *ROOT.glob("tests/*.py")]
    files += [*ROOT.glob("bench/*.py"), *ROOT.glob("tools/*")]
    # `npm <command>` in a shell line, or "npm", "<command>" in a Python argv list.
    command = re.compile(r"""\bnpx\b|\bnpm(?:[ \t]+|["'],\s*["'])([a-z-]+)""")
    uses = [
        (f.name, m.group(0))
        for f in files
        if f.is_file() and f.name != Path(__file__).name
        for m in command.finditer(f.read_text())
    ]
    assert ("Makefile", "npm ci") in uses  # the scan sees the real use
    allowed = {"npm ci", 'npm", "ci', "npm test"}
    assert {use for _, use in uses} <= allowed, f"npm without its lock: {uses}"
