"""The layer contracts hold (README "Code map"): the same check `make lint` runs.

import-linter reads ``.importlinter``; it can only name an external package whole, so
"only web/ speaks aiohttp.web" is checked here from the source as well (ruff's TID251 does
the same in `make lint`).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROXY = ROOT / "proxy"


def test_import_contracts_are_kept() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    run = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout and "5 kept" in run.stdout, run.stdout


def imports_aiohttp_web(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            if any(
                a.name == "aiohttp.web" or a.name.startswith("aiohttp.web.") for a in node.names
            ):
                return True
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.module.startswith("aiohttp.web"):
                return True
            if node.module == "aiohttp" and any(a.name == "web" for a in node.names):
                return True
    return False


def test_only_web_and_the_composition_root_import_aiohttp_web() -> None:
    users = {str(p.relative_to(PROXY)) for p in PROXY.rglob("*.py") if imports_aiohttp_web(p)}
    allowed = {"app.py", "server.py"}
    assert "web/uploads.py" in users  # the scan sees the real uses (no vacuous pass)
    assert {u for u in users if not u.startswith("web/") and u not in allowed} == set()


def test_no_test_reaches_into_the_storage_client() -> None:
    """Faults go through a wrapper Storage (tests/wrapped.py) or the fault proxy
    (tests/faultproxy.py), reads through the Storage interface: never ``x._client``."""
    reaching = []
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "_client"
                and not (isinstance(node.value, ast.Name) and node.value.id == "self")
            ):
                reaching.append(f"{path.name}:{node.lineno}")
    assert reaching == []


def test_no_module_imports_another_modules_private_names() -> None:
    """What one module of the daemon shares with another is public (no underscore):
    ``from proxy.x import _helper`` or ``x._helper`` from elsewhere is a private name
    leaking into an API nobody chose."""
    reaching = []
    for path in PROXY.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("proxy"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        reaching.append(f"{path.relative_to(PROXY)}:{node.lineno} {alias.name}")
                    modules.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                modules.update(a.asname or a.name for a in node.names if a.name.startswith("proxy"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in modules
            ):
                reaching.append(
                    f"{path.relative_to(PROXY)}:{node.lineno} {node.value.id}.{node.attr}"
                )
    assert reaching == []
