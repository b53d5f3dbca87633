"""Whole numbers from outside (forms, headers, LAN records): digits only, ASCII, bounded."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from appliance.numbers import small_int


def test_what_isdigit_accepts_and_int_or_sqlite_cannot_take_is_none() -> None:
    assert small_int("²") is None  # "²".isdigit() is True; int("²") raises
    assert small_int("١٢") is None  # Arabic-Indic digits: int() takes them, no form sends them
    assert small_int("9" * 10) is None  # past max_digits (SQLite stops at 2**63)
    assert small_int("9" * 18, 18) == 10**18 - 1
    assert (small_int(""), small_int(None), small_int("-1"), small_int(" 1")) == (None,) * 4
    assert small_int("0012") == 12


@given(st.one_of(st.none(), st.text(max_size=12)), st.integers(1, 18))
def test_any_text_is_a_bounded_int_or_none(text: str | None, digits: int) -> None:
    found = small_int(text, digits)
    assert found is None or 0 <= found < 10**digits
    if found is not None:
        assert text is not None
        assert int(text) == found
