"""IEEE-11073 SFLOAT/FLOAT: exact decimals, specials kept distinct, never an unexpected error."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.errors import ProtocolError
from drivers.ieee11073 import (
    SFloatValue,
    Special,
    decode_datetime,
    decode_float,
    decode_sfloat,
    encode_datetime,
    encode_float,
    encode_sfloat,
)


def test_spo2_100_percent_in_both_device_encodings_is_the_same_decimal() -> None:
    # REFERENCE.md: one device sends 64 00, another E8 F3 (1000 x 10^-1).
    assert decode_sfloat(bytes.fromhex("6400")).to_decimal() == Decimal(100)
    assert decode_sfloat(bytes.fromhex("E8F3")).to_decimal() == Decimal(100)


@pytest.mark.parametrize(
    ("raw", "special"),
    [("FF07", Special.NAN), ("0008", Special.NRES), ("FE07", Special.POSITIVE_INFINITY),
     ("0208", Special.NEGATIVE_INFINITY), ("0108", Special.RESERVED)],
)
def test_sfloat_specials_stay_distinct(raw: str, special: Special) -> None:
    value = decode_sfloat(bytes.fromhex(raw))
    assert value.special is special
    assert not value.is_finite
    with pytest.raises(ValueError, match="no numeric value"):
        value.to_decimal()


@pytest.mark.parametrize(
    ("raw", "special"),
    [("FFFF7F00", Special.NAN), ("00008000", Special.NRES), ("FEFF7F00", Special.POSITIVE_INFINITY),
     ("02008000", Special.NEGATIVE_INFINITY), ("01008000", Special.RESERVED)],
)
def test_float_specials_stay_distinct(raw: str, special: Special) -> None:
    assert decode_float(bytes.fromhex(raw)).special is special


def test_float_temperature_value() -> None:
    # 36.6 degC as mantissa 366, exponent -1: 6E 01 00 FF
    assert decode_float(bytes.fromhex("6E0100FF")).to_decimal() == Decimal("36.6")


def test_negative_mantissa_and_exponent() -> None:
    assert decode_sfloat(encode_sfloat(SFloatValue(-5, -2))).to_decimal() == Decimal("-0.05")


@given(st.integers(min_value=0, max_value=0xFFFF))
def test_every_sfloat_decodes_without_error(raw: int) -> None:
    value = decode_sfloat(raw.to_bytes(2, "little"))
    assert value.is_finite or value.special is not None
    assert encode_sfloat(value) == raw.to_bytes(2, "little") or value.special is None


@given(st.integers(min_value=0, max_value=0xFFFFFFFF))
def test_every_float_decodes_without_error(raw: int) -> None:
    decode_float(raw.to_bytes(4, "little"))


def test_short_input_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        decode_sfloat(b"\x01")
    with pytest.raises(ProtocolError):
        decode_float(b"\x01\x02\x03")


def test_datetime_round_trip_and_unknown_year() -> None:
    moment = datetime(2026, 11, 26, 7, 5, 9)  # noqa: DTZ001 - device wall time is naive
    assert decode_datetime(encode_datetime(moment)) == moment
    assert decode_datetime(bytes(7)) is None
    with pytest.raises(ProtocolError):
        decode_datetime(bytes.fromhex("EA070D01000000"))  # month 13
