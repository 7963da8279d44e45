"""How a TOML table becomes a frozen dataclass: field kinds and the one reader.

Each dataclass field says once how it is read: its kind (:func:`flag`, :func:`text`,
:func:`positive`, :func:`size`, :func:`choice`, :func:`strings`, a nested
:func:`section`, or a :func:`custom` reader for what needs special parsing), its
default, and its TOML key where that is not the field's name.  :func:`read_section`
reads any table into its dataclass from those fields, runs the section's cross-field
checks, then reports the keys it did not know.  Problems are recorded, never raised, so
that one :class:`ConfigError` can list them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from proxy.units import parse_size

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


class ConfigError(Exception):
    """Every problem found in one config file, one per line."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))


class Reader:
    """Pulls typed values out of one TOML table, recording problems instead of raising.
    Relative paths in it are relative to ``base`` (the config file's folder)."""

    def __init__(self, table: dict[str, Any], path: str, problems: list[str], base: Path) -> None:
        self.table = dict(table)
        self.path = path
        self.problems = problems
        self.base = base

    def _bad(self, key: str, why: str) -> None:
        self.problems.append(f"{self.path}.{key}: {why}" if self.path else f"{key}: {why}")

    def get(self, key: str, kind: type, default: Any) -> Any:
        if key not in self.table:
            return default
        value = self.table.pop(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self._bad(key, f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
            return default
        return value

    def size(self, key: str, default: int) -> int:
        if key not in self.table:
            return default
        try:
            return parse_size(self.table.pop(key))
        except ValueError as e:
            self._bad(key, str(e))
            return default

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value: str = self.get(key, str, default)
        if value not in choices:
            self._bad(key, f"must be one of {', '.join(choices)}; got {value!r}")
            return default
        return value

    def positive(self, key: str, kind: type, default: Any, *, allow_zero: bool = False) -> Any:
        value = self.get(key, kind, default)
        if value < 0 or (value == 0 and not allow_zero):
            self._bad(key, f"must be {'>= 0' if allow_zero else '> 0'}; got {value!r}")
            return default
        return value

    def strings(self, key: str) -> list[str]:
        # No value is echoed: a list of tokens typed as one string must not reach a log.
        value = self.table.pop(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self._bad(key, "expected a list of strings")
            return []
        return value

    def table_of(self, key: str) -> dict[str, Any]:
        value = self.table.pop(key, {})
        if not isinstance(value, dict):
            self._bad(key, "expected a table")
            return {}
        return value

    def section(self, key: str) -> Reader:
        """A reader for the table at ``key`` ([server], [storage.embedded])."""
        path = f"{self.path}.{key}" if self.path else key
        return Reader(self.table_of(key), path, self.problems, self.base)

    def check(self, value_ok: bool, key: str, why: str) -> None:
        if not value_ok:
            self._bad(key, why)

    def finish(self) -> None:
        for key in sorted(self.table):
            # The top level's keys are sections.
            where = f"{self.path}.{key}: unknown key" if self.path else f"{key}: unknown section"
            self.problems.append(where)


# How a field is read: (its section, its TOML key, its default) -> its value.
Read = Callable[[Reader, str, Any], Any]
_T = TypeVar("_T", bound="DataclassInstance")
# A section's cross-field checks, run after its fields are read; returns the section.
Check = Callable[[Reader, _T], _T]


def custom(default: Any, read: Read, key: str | None = None, *, repr: bool = True) -> Any:
    """A field read by ``read`` from TOML key ``key`` (default: the field's name)."""
    return field(default=default, repr=repr, metadata={"read": read, "key": key})


def flag(default: bool) -> Any:
    return custom(default, lambda r, k, d: r.get(k, bool, d))


def text(default: str) -> Any:
    return custom(default, lambda r, k, d: r.get(k, str, d))


def _file(r: Reader, key: str, default: str) -> str:
    path = r.get(key, str, default)
    return str(r.base / path) if path and not Path(path).is_absolute() else path


def file_path(default: str = "") -> Any:
    """A file's path as text ("" for none); a relative one is relative to the config file."""
    return custom(default, _file)


def positive(default: float, *, zero_ok: bool = False) -> Any:
    """A number > 0 (>= 0 with ``zero_ok``).  The default's type is the kind: an int
    default takes integers only, a float default any number."""
    kind = type(default)
    return custom(default, lambda r, k, d: r.positive(k, kind, d, allow_zero=zero_ok))


def size(default: int, key: str | None = None) -> Any:
    """A byte count: an integer or a string such as "8MiB" (proxy.units)."""
    return custom(default, lambda r, k, d: r.size(k, d), key)


def size_or_none(default: int | None, key: str) -> Any:
    """A byte count where 0 means None (no limit)."""
    return custom(default, lambda r, k, d: r.size(k, d or 0) or None, key)


def choice(default: str, choices: tuple[str, ...]) -> Any:
    return custom(default, lambda r, k, d: r.choice(k, choices, d))


def strings(default: tuple[str, ...] = ()) -> Any:
    return custom(default, lambda r, k, d: tuple(r.strings(k)) if k in r.table else d)


def section(cls: type[_T], check: Check[_T] | None = None) -> Any:
    """A table read into ``cls`` by :func:`read_section`, then checked by ``check``."""

    def read(r: Reader, key: str, default: None) -> _T:
        return read_section(cls, r.section(key), check)

    return field(default_factory=cls, metadata={"read": read, "key": None})


def read_section(cls: type[_T], r: Reader, check: Check[_T] | None) -> _T:
    """Each field of ``cls`` by its kind, then the section's checks, then its unknown keys.
    A field without a kind keeps its default unless the check sets it (listen_host and
    listen_port, both from server.listen)."""
    values = {}
    for f in fields(cls):
        if "read" in f.metadata:
            # A section's default (its default_factory) is never used: it is read.
            default = None if f.default is MISSING else f.default
            values[f.name] = f.metadata["read"](r, f.metadata["key"] or f.name, default)
    cfg = cls(**values)
    if check is not None:
        cfg = check(r, cfg)
    r.finish()
    return cfg
