"""IEEE-11073 SFLOAT/FLOAT and Bluetooth Date Time: exact decimals, distinct specials, total decoding.

Byte vectors are derived from the IEEE 11073-20601 SFLOAT-Type / FLOAT-Type definitions and
REFERENCE.md ("Bluetooth SIG GATT health profiles"); the 18.9 / 11 vectors are the pressures of
NordicSemiconductor/Android-BLE-Library, ble-common/src/test/java/no/nordicsemi/android/ble/
common/callback/bps/BloodPressureMeasurementDataCallbackTest.java (commit 2fb061d9).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
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

SFLOAT_SPECIALS = {
    bytes.fromhex("FF07"): Special.NAN,
    bytes.fromhex("0008"): Special.NRES,
    bytes.fromhex("FE07"): Special.POSITIVE_INFINITY,
    bytes.fromhex("0208"): Special.NEGATIVE_INFINITY,
    bytes.fromhex("0108"): Special.RESERVED,
}
FLOAT_SPECIALS = {
    bytes.fromhex("FFFF7F00"): Special.NAN,
    bytes.fromhex("00008000"): Special.NRES,
    bytes.fromhex("FEFF7F00"): Special.POSITIVE_INFINITY,
    bytes.fromhex("02008000"): Special.NEGATIVE_INFINITY,
    bytes.fromhex("01008000"): Special.RESERVED,
}


# --- SFLOAT -----------------------------------------------------------------------------------


def test_spo2_100_percent_in_both_device_encodings_is_the_same_decimal() -> None:
    # REFERENCE.md: one oximeter sends 64 00 (100 x 10^0), another E8 F3 (1000 x 10^-1).
    assert decode_sfloat(bytes.fromhex("6400")) == SFloatValue(100, 0)
    assert decode_sfloat(bytes.fromhex("E8F3")) == SFloatValue(1000, -1)
    assert decode_sfloat(bytes.fromhex("6400")).to_decimal() == Decimal(100)
    assert decode_sfloat(bytes.fromhex("E8F3")).to_decimal() == Decimal(100)


@pytest.mark.parametrize(
    ("raw", "expected", "decimal"),
    [
        ("BDF0", SFloatValue(189, -1), "18.9"),  # Nordic BPM "some": systolic 18.9 kPa
        ("0B00", SFloatValue(11, 0), "11"),  # Nordic BPM "some": diastolic 11 kPa
        ("8A00", SFloatValue(138, 0), "138"),  # Nordic BPM "full": systolic 138 mmHg
        ("FF0F", SFloatValue(-1, 0), "-1"),  # mantissa 0xFFF is -1 in 12-bit two's complement
        ("0080", SFloatValue(0, -8), "0E-8"),  # smallest exponent
        ("FF77", SFloatValue(2047, 7), "2.047E+10"),  # NaN's mantissa with exponent 7 is a number
        ("0018", SFloatValue(-2048, 1), "-2.048E+4"),  # NRes's mantissa with exponent 1 too
    ],
)
def test_sfloat_vectors(raw: str, expected: SFloatValue, decimal: str) -> None:
    value = decode_sfloat(bytes.fromhex(raw))
    assert value == expected
    assert value.is_finite
    assert str(value.to_decimal()) == decimal
    assert encode_sfloat(value) == bytes.fromhex(raw)


@pytest.mark.parametrize(("raw", "special"), SFLOAT_SPECIALS.items())
def test_sfloat_specials_stay_distinct(raw: bytes, special: Special) -> None:
    value = decode_sfloat(raw)
    assert value == SFloatValue(0, 0, special)
    assert not value.is_finite
    with pytest.raises(ValueError, match="no numeric value"):
        value.to_decimal()
    assert encode_sfloat(value) == raw


def test_every_sfloat_decodes_and_re_encodes_to_the_same_bytes() -> None:
    # Exhaustive rather than sampled: 65,536 patterns take a fraction of a second.
    specials: dict[bytes, Special] = {}
    for raw in range(0x10000):
        data = raw.to_bytes(2, "little")
        value = decode_sfloat(data)
        if value.special is not None:
            specials[data] = value.special
        else:
            value.to_decimal()
        assert encode_sfloat(value) == data
    assert specials == SFLOAT_SPECIALS


def test_sfloat_at_an_offset_and_too_short() -> None:
    assert decode_sfloat(bytes.fromhex("AA6400"), 1) == SFloatValue(100, 0)
    for data, offset in [(b"", 0), (b"\x01", 0), (b"\x01\x02", 1), (b"\x01\x02", 3)]:
        with pytest.raises(ProtocolError, match="SFLOAT needs 2 bytes"):
            decode_sfloat(data, offset)


@pytest.mark.parametrize(
    "value",
    [
        SFloatValue(2048, 0),  # mantissa beyond 12 bits
        SFloatValue(-2049, 0),
        SFloatValue(1, 8),  # exponent beyond 4 bits
        SFloatValue(1, -9),
        SFloatValue(2047, 0),  # would read back as NaN
        SFloatValue(-2048, 0),  # NRes
        SFloatValue(2046, 0),  # +INF
        SFloatValue(-2046, 0),  # -INF
        SFloatValue(-2047, 0),  # reserved
    ],
)
def test_sfloat_encoder_refuses_what_would_not_read_back(value: SFloatValue) -> None:
    with pytest.raises(ValueError, match="SFLOAT"):
        encode_sfloat(value)


def test_a_special_value_carries_no_mantissa() -> None:
    with pytest.raises(ValueError, match="special"):
        SFloatValue(2047, 0, Special.NAN)


def test_to_decimal_is_exact_beyond_the_default_context() -> None:
    # 29 significant digits would be rounded by a Decimal context of 28.
    assert SFloatValue(-(10**28) - 1, -3).to_decimal() == Decimal("-10000000000000000000000000.001")


# --- FLOAT ------------------------------------------------------------------------------------


def test_float_temperature_vector() -> None:
    # 36.6 degC as mantissa 366 (0x00016E), exponent -1 (0xFF): 6E 01 00 FF.
    value = decode_float(bytes.fromhex("6E0100FF"))
    assert value == SFloatValue(366, -1)
    assert value.to_decimal() == Decimal("36.6")
    assert encode_float(value) == bytes.fromhex("6E0100FF")


def test_float_negative_mantissa() -> None:
    # -1 x 10^0: mantissa 0xFFFFFF.
    assert decode_float(bytes.fromhex("FFFFFF00")) == SFloatValue(-1, 0)


@pytest.mark.parametrize(("raw", "special"), FLOAT_SPECIALS.items())
def test_float_specials_stay_distinct(raw: bytes, special: Special) -> None:
    value = decode_float(raw)
    assert value == SFloatValue(0, 0, special)
    assert encode_float(value) == raw


def test_float_special_mantissas_with_another_exponent_are_numbers() -> None:
    assert decode_float(bytes.fromhex("FFFF7F01")) == SFloatValue(0x7FFFFF, 1)
    assert decode_float(bytes.fromhex("000080FF")) == SFloatValue(-(2**23), -1)


@given(st.integers(min_value=0, max_value=0xFFFFFFFF))
def test_every_float_decodes_and_re_encodes_to_the_same_bytes(raw: int) -> None:
    data = raw.to_bytes(4, "little")
    value = decode_float(data)
    assert (value.special is not None) == (data in FLOAT_SPECIALS)
    if value.is_finite:
        value.to_decimal()
    assert encode_float(value) == data


def test_float_too_short_and_too_large() -> None:
    with pytest.raises(ProtocolError, match="FLOAT needs 4 bytes"):
        decode_float(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="FLOAT"):
        encode_float(SFloatValue(2**23, 0))
    with pytest.raises(ValueError, match="FLOAT"):
        encode_float(SFloatValue(0x7FFFFF, 0))  # NaN's code


# --- Date Time --------------------------------------------------------------------------------


def test_datetime_vector() -> None:
    # 2026-11-26 07:05:09: EA 07 (2026), 0B, 1A, 07, 05, 09.
    data = bytes.fromhex("EA070B1A070509")
    assert decode_datetime(data) == datetime(2026, 11, 26, 7, 5, 9)
    assert encode_datetime(datetime(2026, 11, 26, 7, 5, 9)) == data


@pytest.mark.parametrize(
    "raw",
    [
        "00000000000000",  # all "not known"
        "0000041114293B",  # Nordic BPM "full": year 0, April 17 20:41:59
        "EA07001A070509",  # month 0
        "EA070B00070509",  # day 0
    ],
)
def test_unknown_year_month_or_day_is_none(raw: str) -> None:
    assert decode_datetime(bytes.fromhex(raw)) is None


@pytest.mark.parametrize(
    "raw",
    [
        "EA070D01000000",  # month 13
        "EA070B20000000",  # day 32
        "EA07021E000000",  # 30 February
        "EA070B1A180000",  # hour 24
        "EA070B1A003C00",  # minute 60
        "EA070B1A00003C",  # second 60
        "2D060101000000",  # year 1581, before the format's range
        "10270101000000",  # year 10000
    ],
)
def test_impossible_datetime_is_a_protocol_error_without_the_value(raw: str) -> None:
    with pytest.raises(ProtocolError, match="DateTime") as caught:
        decode_datetime(bytes.fromhex(raw))
    assert not any(ch.isdigit() for ch in str(caught.value).replace("1582-9999", ""))


def test_datetime_is_naive_and_zone_dropped_on_encode() -> None:
    decoded = decode_datetime(bytes.fromhex("EA070B1A070509"))
    assert decoded is not None
    assert decoded.tzinfo is None
    aware = datetime(2026, 11, 26, 7, 5, 9, 999, tzinfo=timezone(timedelta(hours=-7)))
    assert encode_datetime(aware) == bytes.fromhex("EA070B1A070509")
    assert encode_datetime(None) == bytes(7)


def test_datetime_too_short_and_encoder_range() -> None:
    for length in range(7):
        with pytest.raises(ProtocolError, match="DateTime needs 7 bytes"):
            decode_datetime(bytes.fromhex("EA070B1A070509")[:length])
    with pytest.raises(ValueError, match="1582"):
        encode_datetime(datetime(1500, 1, 1, tzinfo=UTC))


@given(st.datetimes(min_value=datetime(1582, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)))
def test_datetime_round_trip(moment: datetime) -> None:
    moment = moment.replace(microsecond=0)
    assert decode_datetime(encode_datetime(moment)) == moment


@given(st.binary(min_size=7, max_size=7))
def test_arbitrary_datetime_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    try:
        decode_datetime(data)
    except ProtocolError as exc:
        message = str(exc)
    else:
        return
    assert "\n" not in message
