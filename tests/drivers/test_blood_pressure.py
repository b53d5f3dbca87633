"""0x2A35 / 0x2A36 decoding: whole expected objects, and truncated and corrupted siblings.

Vectors marked "Nordic" are the byte arrays asserted in NordicSemiconductor/Android-BLE-Library,
ble-common/src/test/java/no/nordicsemi/android/ble/common/callback/bps/
BloodPressureMeasurementDataCallbackTest.java (commit 2fb061d9) and
IntermediateCuffPressureDataCallbackTest.java (commit 47ffb895), decoded here against the
Blood Pressure Service 1.1 layout (§3.1, §3.2) rather than copied from Nordic's assertions.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
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
from drivers.ieee11073 import SFloatValue, Special

NAN = SFloatValue(0, 0, Special.NAN)

# Nordic "full": flags 0x1E (mmHg, time stamp, pulse, user, status); 138/88/120 mmHg; time
# stamp with year 0 (not known) so None; pulse 60; user 1; status 0x0027 = body movement, cuff
# too loose, irregular pulse, pulse rate within range, improper position.
NORDIC_FULL = bytes.fromhex("1E 8A00 5800 7800 0000 04 11 14 29 3B 3C00 01 2700")
NORDIC_FULL_EXPECTED = BloodPressureMeasurement(
    unit=PressureUnit.MMHG,
    systolic=SFloatValue(138, 0),
    diastolic=SFloatValue(88, 0),
    mean_arterial=SFloatValue(120, 0),
    timestamp=None,
    pulse_rate=SFloatValue(60, 0),
    user_id=1,
    status=BloodPressureStatus(
        body_movement=True,
        cuff_too_loose=True,
        irregular_pulse=True,
        pulse_rate_range=PulseRateRange.WITHIN,
        improper_position=True,
    ),
)

# Nordic "some": flags 0x15 (kPa, pulse, status); 18.9/11/15.9 kPa; pulse 60; status 0x0012 =
# cuff too loose, pulse rate below the lower limit.
NORDIC_SOME = bytes([0x15, 0xBD, 0xF0, 0x0B, 0x00, 0x9F, 0xF0, 0x3C, 0x00, 0x12, 0x00])
NORDIC_SOME_EXPECTED = BloodPressureMeasurement(
    unit=PressureUnit.KPA,
    systolic=SFloatValue(189, -1),
    diastolic=SFloatValue(11, 0),
    mean_arterial=SFloatValue(159, -1),
    pulse_rate=SFloatValue(60, 0),
    status=BloodPressureStatus(False, True, False, PulseRateRange.BELOW_LOWER, False),
)

# Nordic "minimal": flags 0x00 (mmHg, nothing optional); 18.9/11/15.9.
NORDIC_MINIMAL = bytes([0x00, 0xBD, 0xF0, 0x0B, 0x00, 0x9F, 0xF0])
NORDIC_MINIMAL_EXPECTED = BloodPressureMeasurement(
    unit=PressureUnit.MMHG,
    systolic=SFloatValue(189, -1),
    diastolic=SFloatValue(11, 0),
    mean_arterial=SFloatValue(159, -1),
)

# Built from the BPS 1.1 §3.1 layout: flags 0x1E; 121/81/106 mmHg (79 00, 51 00, 6A 00);
# 2026-11-26 08:30:15 (EA 07 0B 1A 08 1E 0F); pulse 72 (48 00); user 0xFF (unknown);
# status 0x000C = irregular pulse, pulse rate exceeds the upper limit.
DATED = bytes.fromhex("1E790051006A00EA070B1A081E0F4800FF0C00")
DATED_EXPECTED = BloodPressureMeasurement(
    unit=PressureUnit.MMHG,
    systolic=SFloatValue(121, 0),
    diastolic=SFloatValue(81, 0),
    mean_arterial=SFloatValue(106, 0),
    timestamp=datetime(2026, 11, 26, 8, 30, 15),
    pulse_rate=SFloatValue(72, 0),
    user_id=None,
    status=BloodPressureStatus(False, False, True, PulseRateRange.EXCEEDS_UPPER, False),
)

VECTORS = [
    pytest.param(NORDIC_FULL, NORDIC_FULL_EXPECTED, id="nordic-full"),
    pytest.param(NORDIC_SOME, NORDIC_SOME_EXPECTED, id="nordic-some"),
    pytest.param(NORDIC_MINIMAL, NORDIC_MINIMAL_EXPECTED, id="nordic-minimal"),
    pytest.param(DATED, DATED_EXPECTED, id="dated"),
]

# Nordic ICP "full", "some" and "minimal": the cuff pressure is 4 mmHg, 11.1 kPa and 21.5 mmHg;
# Nordic fills the unused diastolic and MAP with 0; the last, our own, uses NaN there instead.
ICP_VECTORS = [
    pytest.param(
        bytes.fromhex("1E 0400 0000 0000 0000 04 11 14 29 3B 3C00 01 2700"),
        replace(
            NORDIC_FULL_EXPECTED,
            systolic=SFloatValue(4, 0),
            diastolic=SFloatValue(0, 0),
            mean_arterial=SFloatValue(0, 0),
            intermediate=True,
        ),
        id="nordic-icp-full",
    ),
    pytest.param(
        bytes([0x15, 0x6F, 0xF0, 0x00, 0x00, 0x00, 0x00, 0x3C, 0x00, 0x12, 0x00]),
        replace(
            NORDIC_SOME_EXPECTED,
            systolic=SFloatValue(111, -1),
            diastolic=SFloatValue(0, 0),
            mean_arterial=SFloatValue(0, 0),
            intermediate=True,
        ),
        id="nordic-icp-some",
    ),
    pytest.param(
        bytes([0x00, 0xD7, 0xF0, 0xFF, 0x07, 0xFF, 0x07]),  # 21.5 mmHg, NaN, NaN
        BloodPressureMeasurement(
            unit=PressureUnit.MMHG,
            systolic=SFloatValue(215, -1),
            diastolic=NAN,
            mean_arterial=NAN,
            intermediate=True,
        ),
        id="icp-minimal-nan",
    ),
]


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_measurement_decodes_to_the_whole_expected_object(
    data: bytes, expected: BloodPressureMeasurement
) -> None:
    assert parse_measurement(data) == expected


# nordic-full (year-0 time stamp) and dated (user 0xFF) decode those fields to None, which
# encodes as "absent", so only these two are byte-exact; the round trip covers the rest.
@pytest.mark.parametrize(("data", "expected"), [VECTORS[1], VECTORS[2]])
def test_encoder_reproduces_the_vector_bytes(
    data: bytes, expected: BloodPressureMeasurement
) -> None:
    assert encode_measurement(expected) == data


def test_encoder_writes_every_optional_field_in_wire_order() -> None:
    known_user = replace(DATED_EXPECTED, user_id=7)
    assert encode_measurement(known_user) == DATED[:16] + b"\x07" + DATED[17:]


@pytest.mark.parametrize(("data", "expected"), ICP_VECTORS)
def test_intermediate_cuff_pressure_decodes_to_the_whole_expected_object(
    data: bytes, expected: BloodPressureMeasurement
) -> None:
    parsed = parse_intermediate_cuff_pressure(data)
    assert parsed == expected
    assert parsed.current_cuff_pressure == expected.systolic


def test_pressures_are_exact_decimals() -> None:
    m = parse_measurement(NORDIC_SOME)
    assert [str(v.to_decimal()) for v in (m.systolic, m.diastolic, m.mean_arterial)] == [
        "18.9",
        "11",
        "15.9",
    ]


# --- Truncated and corrupted siblings ---------------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), VECTORS + ICP_VECTORS)
def test_every_truncation_is_a_protocol_error(
    data: bytes, expected: BloodPressureMeasurement
) -> None:
    parse = parse_intermediate_cuff_pressure if expected.intermediate else parse_measurement
    for length in range(len(data)):
        with pytest.raises(ProtocolError) as caught:
            parse(data[:length])
        assert "\n" not in str(caught.value)
        assert len(str(caught.value)) <= 100


@pytest.mark.parametrize(("data", "expected"), VECTORS)
@pytest.mark.parametrize("reserved_bit", [0x20, 0x40, 0x80])
def test_reserved_flag_bits_are_refused(
    data: bytes, expected: BloodPressureMeasurement, reserved_bit: int
) -> None:
    with pytest.raises(ProtocolError, match="reserved bits"):
        parse_measurement(bytes([data[0] | reserved_bit]) + data[1:])


def test_flags_announcing_a_missing_time_stamp_are_refused() -> None:
    # Nordic onInvalidDataReceived_noTimestamp: flags 3 (kPa + time stamp) in a 7-byte value.
    with pytest.raises(
        ProtocolError, match=r"Blood Pressure Measurement is 7 bytes, flags 0x03 need 14"
    ):
        parse_measurement(bytes([3, 2, 3, 4, 5, 6, 7]))


def test_too_short_for_the_pressures_is_refused() -> None:
    # Nordic onInvalidDataReceived_toShort: 6 bytes.
    with pytest.raises(ProtocolError, match="Intermediate Cuff Pressure is 6 bytes"):
        parse_intermediate_cuff_pressure(bytes([1, 2, 3, 4, 5, 6]))


def test_empty_value_is_refused() -> None:
    with pytest.raises(ProtocolError, match="empty"):
        parse_measurement(b"")


@pytest.mark.parametrize(
    ("offset", "value"),
    [(9, 0x0D), (10, 0x20), (11, 0x18), (12, 0x3C), (13, 0x3C), (7, 0x01)],
    ids=["month-13", "day-32", "hour-24", "minute-60", "second-60", "year-1"],
)
def test_impossible_time_stamp_is_refused_without_the_date(offset: int, value: int) -> None:
    corrupted = bytearray(DATED)
    corrupted[offset] = value
    if offset == 7:
        corrupted[8] = 0x00
    with pytest.raises(ProtocolError, match="Blood Pressure Measurement time stamp") as caught:
        parse_measurement(bytes(corrupted))
    assert "2026" not in str(caught.value)


def test_trailing_bytes_are_ignored_and_counted() -> None:
    assert parse_measurement(DATED + b"\x00\x01") == replace(DATED_EXPECTED, trailing=2)


def test_reserved_status_bits_are_ignored() -> None:
    corrupted = NORDIC_SOME[:-2] + (0x12 | 0xFFC0).to_bytes(2, "little")
    assert parse_measurement(corrupted) == NORDIC_SOME_EXPECTED


def test_pulse_rate_range_code_3_is_reserved_not_an_error() -> None:
    corrupted = NORDIC_SOME[:-2] + (0x18).to_bytes(2, "little")
    status = parse_measurement(corrupted).status
    assert status == BloodPressureStatus(False, False, False, PulseRateRange.RESERVED, False)


def test_special_pressures_are_kept_distinct() -> None:
    # Systolic NRes, diastolic +INF, MAP NaN, pulse -INF: each stays what the cuff said.
    assert parse_measurement(bytes.fromhex("040008FE07FF070208")) == BloodPressureMeasurement(
        unit=PressureUnit.MMHG,
        systolic=SFloatValue(0, 0, Special.NRES),
        diastolic=SFloatValue(0, 0, Special.POSITIVE_INFINITY),
        mean_arterial=NAN,
        pulse_rate=SFloatValue(0, 0, Special.NEGATIVE_INFINITY),
    )


def test_encoder_refuses_the_unknown_user_code() -> None:
    with pytest.raises(ValueError, match="user id"):
        encode_measurement(replace(NORDIC_MINIMAL_EXPECTED, user_id=0xFF))


# --- Properties -------------------------------------------------------------------------------


@given(st.binary(max_size=40))
def test_arbitrary_bytes_decode_or_raise_protocol_error_only(data: bytes) -> None:
    for parse in (parse_measurement, parse_intermediate_cuff_pressure):
        try:
            parse(data)
        except ProtocolError as exc:
            message = str(exc)
        else:
            continue
        assert "\n" not in message
        assert len(message) <= 100


@given(st.sampled_from([NORDIC_FULL, NORDIC_SOME, DATED]), st.data())
def test_corrupted_siblings_raise_protocol_error_or_decode(
    base: bytes, data: st.DataObject
) -> None:
    corrupted = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        corrupted[data.draw(st.integers(0, len(base) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(base)))
    with contextlib.suppress(ProtocolError):
        parse_measurement(bytes(corrupted[:cut]))


sfloats = st.one_of(
    st.builds(SFloatValue, st.integers(-2045, 2045), st.integers(-8, 7)),
    st.sampled_from([SFloatValue(0, 0, special) for special in Special]),
)
statuses = st.builds(
    BloodPressureStatus,
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.sampled_from(PulseRateRange),
    st.booleans(),
)
measurements = st.builds(
    BloodPressureMeasurement,
    unit=st.sampled_from(PressureUnit),
    systolic=sfloats,
    diastolic=sfloats,
    mean_arterial=sfloats,
    timestamp=st.none()
    | st.datetimes(min_value=datetime(1582, 1, 1), max_value=datetime(9999, 12, 31)).map(
        lambda d: d.replace(microsecond=0)
    ),
    pulse_rate=st.none() | sfloats,
    user_id=st.none() | st.integers(0, 254),
    status=st.none() | statuses,
)


@given(measurements)
def test_encode_parse_round_trip(m: BloodPressureMeasurement) -> None:
    assert parse_measurement(encode_measurement(m)) == m
    assert parse_intermediate_cuff_pressure(encode_measurement(m)) == replace(m, intermediate=True)
