"""Every error class and code is declared in proxy/errors.py, each code by one class; the
reasons the metrics use are the ones contrib/README.md documents."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from proxy import errors
from proxy.errors import REASONS, ProxyError

ROOT = Path(__file__).resolve().parent.parent


def error_classes() -> list[type[ProxyError]]:
    return [
        c
        for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, ProxyError) and c.__module__ == errors.__name__
    ]


def test_each_code_is_declared_by_one_class() -> None:
    declared: dict[str, str] = {}
    for cls in error_classes():
        code = cls.__dict__.get("code")
        if code is None:
            continue
        assert code not in declared, f"{code} declared by {declared[code]} and {cls.__name__}"
        declared[code] = cls.__name__
    assert len(declared) > 40  # the scan saw the classes (a vacuous pass otherwise)


def test_a_second_class_for_a_code_or_an_unlisted_reason_fails_at_declaration() -> None:
    with pytest.raises(TypeError, match="ERR_BUSY is declared by Busy"):

        class AlsoBusy(ProxyError, code="ERR_BUSY"):
            pass

    with pytest.raises(TypeError, match="not one of REASONS"):

        class Odd(ProxyError, code="ERR_TEST_ODD", reason="odd"):
            pass

    with pytest.raises(TypeError, match="ERR_GONE is declared by Gone"):

        class AlsoGone(ProxyError):
            code = "ERR_GONE"

    class Fine(errors.Busy):  # inherits code, status and reason: declares nothing new
        pass

    assert (Fine.code, Fine.status, Fine.reason) == ("ERR_BUSY", 503, "busy")


def test_every_reason_is_listed() -> None:
    for cls in error_classes():
        assert cls.reason in REASONS, cls


def test_no_code_or_error_class_is_made_outside_errors_py() -> None:
    """Raise sites use a declared class: no ``code=`` or ``reason=`` overrides, and no
    ProxyError subclass is declared anywhere else."""
    offenders = []
    for path in sorted((ROOT / "proxy").rglob("*.py")):
        if path.name == "errors.py" and path.parent.name == "proxy":
            continue
        text = path.read_text()
        if "proxy/client/" in str(path):
            continue  # the client is not the daemon: its errors are its own
        for pattern in (r"\bcode=\"ERR_", r"\breason=\"", r"class \w+\((\w+\.)?ProxyError\)"):
            for m in re.finditer(pattern, text):
                line = text.count("\n", 0, m.start()) + 1
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {m.group(0)}")
    assert offenders == []


def test_contrib_readme_lists_exactly_the_reasons() -> None:
    text = (ROOT / "contrib" / "README.md").read_text()
    m = re.search(r"`reason` is one of: (.*?)\.  ", text, re.S)
    assert m is not None, "the reason list is missing from contrib/README.md"
    documented = set(re.findall(r"`(\w+)`", m.group(1)))
    assert documented == {*REASONS, "other"}


def test_http_statuses_map_to_declared_classes() -> None:
    assert errors.http_error(404, "x").code == "ERR_NOT_FOUND"
    assert errors.http_error(405, "x").code == "ERR_METHOD_NOT_ALLOWED"
    assert errors.http_error(411, "x").status == 411
    assert errors.http_error(411, "x").code == "ERR_LENGTH_REQUIRED"
    assert errors.http_error(418, "x").code == "ERR_HTTP_418"
