"""Whole numbers read from outside: form fields, headers, query strings, LAN neighbours."""

from __future__ import annotations

# Digits of a row id as it may come in (a URL, a form, Last-Event-ID): 18 always fit SQLite's
# 64-bit integer, where 20 do not.
ROW_ID_DIGITS = 18


def small_int(text: str | None, max_digits: int = 9) -> int | None:
    """``text`` as a non-negative int when it is 1 to ``max_digits`` ASCII digits, else None.

    ``str.isdigit()`` accepts "²" (which ``int()`` refuses) and any length (SQLite refuses
    integers past 2**63, and a 4,300-digit string is a ValueError): a request with such a
    number got a 500 instead of the answer for a bad value.
    """
    if text is None or not 0 < len(text) <= max_digits:
        return None
    if not (text.isascii() and text.isdigit()):
        return None
    return int(text)
