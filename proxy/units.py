"""Sizes as people write them in config files and on command lines.

A leaf: the upload client (proxy.client) and the daemon's config both use it, and the
client must not import the daemon (.importlinter).
"""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_size(value: object) -> int:
    """``8388608``, ``"8MiB"``, ``"1.5GiB"``, ``"100MB"`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError('expected a size such as 8388608 or "8MiB"')
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = (m.group(2) or "b").lower()
            return int(float(m.group(1)) * _UNITS[unit])
    raise ValueError(f'expected a size such as 8388608 or "8MiB", got {value!r}')
