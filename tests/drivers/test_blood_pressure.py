"""0x2A35 / 0x2A36 decoding: whole expected objects, truncated and corrupted siblings."""

from __future__ import annotations

from datetime import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.blood_pressure import (
    BloodPressureMeasurement,
    BloodPressureStatus,
    PressureUnit,
    PulseRateRange,
    encode_measurement,
    parse_intermediate_cuff_pressure,
    parse_measurement,
)
from drivers.errors import ProtocolError
from drivers.ieee11073 import SFloatValue

# Built by hand from the Blood Pressure Service 1.1 layout (§3.1 of the BLS/BPS spec):
# flags 0x1E = timestamp + pulse + user id + status, mmHg;
# systolic 121 (79 00), diastolic 81 (51 00), MAP 106 (6A 00);
# 2026-11-26 08:30:15 (EA 07 0B 1A 08 1E 0F); pulse 72 (48 00); user 1; status 0x0004 (irregular pulse).
FULL = bytes.fromhex("1E" "7900" "5100" "6A00" "EA070B1A081E0F" "4800" "01" "0400")
FULL_EXPECTED = BloodPressureMeasurement(
    unit=PressureUnit.MMHG,
    systolic=SFloatValue(121, 0),
    diastolic=SFloatValue(81, 0),
    mean_arterial=SFloatValue(106, 0),
    timestamp=datetime(2026, 11, 26, 8, 30, 15),  # noqa: DTZ001
    pulse_rate=SFloatValue(72, 0),
    user_id=1,
    status=BloodPressureStatus(False, False, True, PulseRateRange.WITHIN, False),
)
# Minimal: flags 0x01 (kPa), 16.0 / 10.7 / 12.5 kPa as mantissa x 10^-1 (A0 F0, 6B F0, 7D F0).
MINIMAL = bytes.fromhex("01" "A0F0" "6BF0" "7DF0")


def test_full_measurement_decodes_to_the_whole_expected_object() -> None:
    assert parse_measurement(FULL) == FULL_EXPECTED


def test_minimal_kpa_measurement() -> None:
    m = parse_measurement(MINIMAL)
    assert m.unit is PressureUnit.KPA
    assert str(m.systolic.to_decimal()) == "16.0"
    assert (m.timestamp, m.pulse_rate, m.user_id, m.status, m.trailing) == (None, None, None, None, 0)


def test_unknown_user_is_none() -> None:
    data = bytes.fromhex("08" "7900" "5100" "6A00" "FF")
    assert parse_measurement(data).user_id is None


@pytest.mark.parametrize("vector", [FULL, MINIMAL])
def test_every_truncation_is_a_protocol_error(vector: bytes) -> None:
    for length in range(len(vector)):
        with pytest.raises(ProtocolError):
            parse_measurement(vector[:length])


def test_reserved_flag_bits_are_refused() -> None:
    with pytest.raises(ProtocolError, match="reserved"):
        parse_measurement(bytes((FULL[0] | 0x80,)) + FULL[1:])


def test_trailing_bytes_are_counted_not_fatal() -> None:
    assert parse_measurement(FULL + b"\x00\x01").trailing == 2


def test_intermediate_cuff_pressure_keeps_the_live_value() -> None:
    m = parse_intermediate_cuff_pressure(bytes.fromhex("00" "5A00" "FF07" "FF07"))
    assert m.intermediate
    assert m.current_cuff_pressure == SFloatValue(90, 0)


@given(st.binary(max_size=40))
def test_arbitrary_bytes_decode_or_raise_protocol_error_only(data: bytes) -> None:
    try:
        parse_measurement(data)
    except ProtocolError:
        pass


@given(st.binary(min_size=1, max_size=30), st.integers(min_value=0, max_value=255))
def test_corrupted_siblings_never_raise_anything_else(noise: bytes, flags: int) -> None:
    try:
        parse_measurement(bytes((flags,)) + FULL[1:][: len(noise)])
    except ProtocolError:
        pass


sfloats = st.builds(SFloatValue, st.integers(-2000, 2000), st.integers(-3, 3))


@given(
    st.builds(
        BloodPressureMeasurement,
        unit=st.sampled_from(PressureUnit),
        systolic=sfloats,
        diastolic=sfloats,
        mean_arterial=sfloats,
        timestamp=st.one_of(st.none(), st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31)).map(lambda d: d.replace(microsecond=0))),  # noqa: DTZ001
        pulse_rate=st.one_of(st.none(), sfloats),
        user_id=st.one_of(st.none(), st.integers(0, 254)),
        status=st.one_of(st.none(), st.builds(BloodPressureStatus, st.booleans(), st.booleans(), st.booleans(), st.sampled_from(PulseRateRange), st.booleans())),
    )
)
def test_encode_parse_round_trip(m: BloodPressureMeasurement) -> None:
    assert parse_measurement(encode_measurement(m)) == m
