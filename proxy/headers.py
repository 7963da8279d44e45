"""Integer header values, parsed one way everywhere.  A leaf: imports nothing of ours.

``str.isdigit`` and ``int`` accept far more than HTTP allows: ``"²".isdigit()`` is true
but ``int("²")`` raises (a 500 if it escapes), and ``int("١٢")`` (Arabic-Indic digits)
is 12.  HTTP's integer fields are ``1*DIGIT`` with DIGIT = ASCII 0-9 (RFC 9110), so
that is all we take; aiohttp parses ``Content-Length`` itself, strictly.
"""

from __future__ import annotations

# 19 digits hold any value below 2**63: every size and offset S3 can take.
MAX_DIGITS = 19
_DIGITS = frozenset("0123456789")


def ascii_uint(value: str, *, max_digits: int = MAX_DIGITS) -> int | None:
    """``value`` as a non-negative integer if it is 1 to ``max_digits`` ASCII digits, else None.

    No sign, no spaces, no underscores (``int`` takes ``"1_0"``), nothing else."""
    if not 0 < len(value) <= max_digits or not _DIGITS.issuperset(value):
        return None
    return int(value)
