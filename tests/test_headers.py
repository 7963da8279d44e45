"""Integer header values: ASCII digits only, whatever str.isdigit and int think."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from proxy.headers import MAX_DIGITS, ascii_uint


@given(st.text(max_size=25) | st.text(st.characters(categories=("Nd", "No")), max_size=5))
def test_only_ascii_digits_are_numbers(value: str) -> None:
    got = ascii_uint(value)
    if re.fullmatch(f"[0-9]{{1,{MAX_DIGITS}}}", value, flags=re.ASCII):
        assert got == int(value)
    else:
        assert got is None


@given(st.integers(0, 10**MAX_DIGITS - 1))
def test_every_number_in_range_round_trips(n: int) -> None:
    assert ascii_uint(str(n)) == n
    assert ascii_uint(str(n), max_digits=len(str(n)) - 1) is None
