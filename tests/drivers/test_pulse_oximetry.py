"""0x2A5E / 0x2A5F / 0x2A60 decoding, whole expected objects, truncated and corrupted siblings.

Vectors marked "Spezi" are the byte arrays of StanfordSpezi/SpeziBluetooth,
Tests/SpeziBluetoothServicesTests/PLXTests.swift (commit 049b5aeb), decoded here against the
Pulse Oximeter Service 1.0.1 layout (§3.1-§3.3), not copied from Spezi's assertions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.errors import ProtocolError
from drivers.gatt import ReadCharacteristic, Subscribe
from drivers.ieee11073 import SFloatValue, Special
from drivers.pulse_oximetry import (
    CONTINUOUS,
    FEATURES,
    SPOT_CHECK,
    ContinuousMeasurement,
    DeviceAndSensorStatus,
    MeasurementStatus,
    PlxFeatures,
    PulseOximeterSession,
    SpO2PulseRate,
    SpotCheckMeasurement,
    encode_continuous,
    encode_features,
    encode_spot_check,
    parse_continuous,
    parse_features,
    parse_spot_check,
)

# Spezi testSpotCheckMeasurementCoding: flags 0x0F (time stamp, measurement status, device and
# sensor status, PAI); SpO2 0xF3AC = 940e-1; PR 0xF5BE = 1470e-1; 2024-11-29 23:08:57; status
# 0x4020 = bits 5 ongoing, 14 questionable; device 0x000022 = bits 1 equipment malfunction, 5
# low perfusion; PAI 0xE366 = 870e-2.
SPOT = bytes([15, 172, 243, 190, 245, 232, 7, 11, 29, 23, 8, 57, 32, 64, 34, 0, 0, 102, 227])
SPOT_EXPECTED = SpotCheckMeasurement(
    spo2=SFloatValue(940, -1),
    pulse_rate=SFloatValue(1470, -1),
    timestamp=datetime(2024, 11, 29, 23, 8, 57),
    measurement_status=MeasurementStatus(measurement_ongoing=True, questionable_measurement=True),
    device_status=DeviceAndSensorStatus(equipment_malfunction=True, low_perfusion=True),
    pulse_amplitude_index=SFloatValue(870, -2),
)

# Built from PLXS §3.1: flags 0x12 (measurement status, device clock not set); SpO2 97, PR 61;
# status 0x8000 = bit 15 invalid measurement.
SPOT_CLOCK_NOT_SET = bytes.fromhex("12 6100 3D00 0080")
SPOT_CLOCK_NOT_SET_EXPECTED = SpotCheckMeasurement(
    spo2=SFloatValue(97, 0),
    pulse_rate=SFloatValue(61, 0),
    measurement_status=MeasurementStatus(invalid_measurement=True),
    device_clock_not_set=True,
)

# Spezi testVerySimpleMeasurementCoding: flags 0; SpO2 100 % and PR 90, sent as E8 F3 / 84 F3
# (1000e-1, 900e-1) by Spezi's encoder and as 64 00 / 5A 00 in its decoding test.
CONTINUOUS_SIMPLE = bytes([0, 232, 243, 132, 243])
CONTINUOUS_SIMPLE_EXPECTED = ContinuousMeasurement(SFloatValue(1000, -1), SFloatValue(900, -1))
CONTINUOUS_INTEGERS = bytes([0, 100, 0, 90, 0])
CONTINUOUS_INTEGERS_EXPECTED = ContinuousMeasurement(SFloatValue(100, 0), SFloatValue(90, 0))

# Spezi testSimpleMeasurementCoding: flags 0x1C (status, device status, PAI); SpO2 95, PR 90;
# status 0x0020 = bit 5 ongoing; device status 0; PAI 0xF057 = 87e-1.
CONTINUOUS_STATUS = bytes([28, 95, 0, 90, 0, 32, 0, 0, 0, 0, 87, 240])
CONTINUOUS_STATUS_EXPECTED = ContinuousMeasurement(
    spo2=SFloatValue(95, 0),
    pulse_rate=SFloatValue(90, 0),
    measurement_status=MeasurementStatus(measurement_ongoing=True),
    device_status=DeviceAndSensorStatus(),
    pulse_amplitude_index=SFloatValue(87, -1),
)

# Spezi testFullMeasurementCoding: flags 0x1F; normal 990e-1 / 970e-1; fast 970e-1 / 1370e-1;
# slow 980e-1 / 690e-1; status 0x0120 = bits 5 ongoing, 8 fully qualified; device 0; PAI
# 0xE37A = 890e-2.
CONTINUOUS_FULL = bytes(
    [31, 222, 243, 202, 243, 202, 243, 90, 245, 212, 243, 178, 242, 32, 1, 0, 0, 0, 122, 227]
)
CONTINUOUS_FULL_EXPECTED = ContinuousMeasurement(
    spo2=SFloatValue(990, -1),
    pulse_rate=SFloatValue(970, -1),
    fast=SpO2PulseRate(SFloatValue(970, -1), SFloatValue(1370, -1)),
    slow=SpO2PulseRate(SFloatValue(980, -1), SFloatValue(690, -1)),
    measurement_status=MeasurementStatus(measurement_ongoing=True, fully_qualified_data=True),
    device_status=DeviceAndSensorStatus(),
    pulse_amplitude_index=SFloatValue(890, -2),
)

# Spezi testPLXFeaturesCoding: features 0x00A3 = bits 0 measurement status support, 1 device
# and sensor status support, 5 SpO2PR-Slow, 7 multiple bonds; measurement status support
# 0x1040 = bits 6 early estimate, 12 calibration ongoing; device status support 0x000180 =
# bits 7 nonpulsatile signal, 8 questionable pulse.
FEATURES_VECTOR = bytes([163, 0, 64, 16, 128, 1, 0])
FEATURES_EXPECTED = PlxFeatures(
    measurement_status_support=MeasurementStatus(
        early_estimated_data=True, calibration_ongoing=True
    ),
    device_status_support=DeviceAndSensorStatus(nonpulsatile_signal=True, questionable_pulse=True),
    spo2pr_slow=True,
    multiple_bonds=True,
)

SPOT_VECTORS = [
    pytest.param(SPOT, SPOT_EXPECTED, id="spezi-spot-check"),
    pytest.param(SPOT_CLOCK_NOT_SET, SPOT_CLOCK_NOT_SET_EXPECTED, id="clock-not-set"),
]
CONTINUOUS_VECTORS = [
    pytest.param(CONTINUOUS_SIMPLE, CONTINUOUS_SIMPLE_EXPECTED, id="spezi-very-simple"),
    pytest.param(CONTINUOUS_INTEGERS, CONTINUOUS_INTEGERS_EXPECTED, id="spezi-integers"),
    pytest.param(CONTINUOUS_STATUS, CONTINUOUS_STATUS_EXPECTED, id="spezi-simple"),
    pytest.param(CONTINUOUS_FULL, CONTINUOUS_FULL_EXPECTED, id="spezi-full"),
]


@pytest.mark.parametrize(("data", "expected"), SPOT_VECTORS)
def test_spot_check_decodes_to_the_whole_expected_object(
    data: bytes, expected: SpotCheckMeasurement
) -> None:
    assert parse_spot_check(data) == expected
    assert encode_spot_check(expected) == data


@pytest.mark.parametrize(("data", "expected"), CONTINUOUS_VECTORS)
def test_continuous_decodes_to_the_whole_expected_object(
    data: bytes, expected: ContinuousMeasurement
) -> None:
    assert parse_continuous(data) == expected
    assert encode_continuous(expected) == data


def test_spo2_100_is_the_same_number_whatever_the_exponent() -> None:
    a, b = parse_continuous(CONTINUOUS_SIMPLE), parse_continuous(CONTINUOUS_INTEGERS)
    assert a != b
    assert a.spo2.to_decimal() == b.spo2.to_decimal() == 100


def test_features_decode_to_the_whole_expected_object() -> None:
    assert parse_features(FEATURES_VECTOR) == FEATURES_EXPECTED
    assert encode_features(FEATURES_EXPECTED) == FEATURES_VECTOR


def test_features_without_status_support() -> None:
    # Built from PLXS §3.3: 0x005C = spot-check storage and time stamp, SpO2PR-Fast, PAI.
    assert parse_features(bytes.fromhex("5C00")) == PlxFeatures(
        spot_check_storage=True,
        spot_check_timestamp=True,
        spo2pr_fast=True,
        pulse_amplitude_index=True,
    )


@pytest.mark.parametrize("bit", range(16))
def test_every_device_status_bit_maps_to_its_own_field(bit: int) -> None:
    status = DeviceAndSensorStatus.from_bits(1 << bit)
    assert sum(map(int, (getattr(status, name) for name in status.__slots__))) == 1
    assert status.to_bits() == 1 << bit


@pytest.mark.parametrize("bit", range(5, 16))
def test_every_measurement_status_bit_maps_to_its_own_field(bit: int) -> None:
    status = MeasurementStatus.from_bits(1 << bit)
    assert sum(map(int, (getattr(status, name) for name in status.__slots__))) == 1
    assert status.to_bits() == 1 << bit


def test_reserved_status_bits_are_ignored() -> None:
    assert MeasurementStatus.from_bits(0x001F) == MeasurementStatus()
    assert DeviceAndSensorStatus.from_bits(0xFF0000) == DeviceAndSensorStatus()


def test_special_values_are_kept_distinct() -> None:
    m = parse_continuous(bytes.fromhex("00 FF07 0008"))
    assert (m.spo2, m.pulse_rate) == (
        SFloatValue(0, 0, Special.NAN),
        SFloatValue(0, 0, Special.NRES),
    )


# --- Truncated and corrupted siblings ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "parse"),
    [
        (SPOT, parse_spot_check),
        (SPOT_CLOCK_NOT_SET, parse_spot_check),
        (CONTINUOUS_FULL, parse_continuous),
        (CONTINUOUS_STATUS, parse_continuous),
        (CONTINUOUS_SIMPLE, parse_continuous),
        (FEATURES_VECTOR, parse_features),
    ],
)
def test_every_truncation_is_a_protocol_error(
    data: bytes, parse: Callable[[bytes], object]
) -> None:
    for length in range(len(data)):
        with pytest.raises(ProtocolError) as caught:
            parse(data[:length])
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize("reserved_bit", [0x20, 0x40, 0x80])
def test_reserved_flag_bits_are_refused(reserved_bit: int) -> None:
    with pytest.raises(ProtocolError, match="PLX Spot-Check Measurement flags"):
        parse_spot_check(bytes([SPOT[0] | reserved_bit]) + SPOT[1:])
    with pytest.raises(ProtocolError, match="PLX Continuous Measurement flags"):
        parse_continuous(bytes([CONTINUOUS_FULL[0] | reserved_bit]) + CONTINUOUS_FULL[1:])


def test_impossible_time_stamp_is_refused_without_the_date() -> None:
    corrupted = bytearray(SPOT)
    corrupted[8] = 0  # day 0 with month and year set: "not known" → None, not an error
    assert parse_spot_check(bytes(corrupted)).timestamp is None
    corrupted[8] = 31  # November 31
    with pytest.raises(ProtocolError, match="PLX Spot-Check Measurement time stamp") as caught:
        parse_spot_check(bytes(corrupted))
    assert "2024" not in str(caught.value)


def test_trailing_bytes_are_ignored_and_counted() -> None:
    assert parse_spot_check(SPOT + b"\x00") == replace(SPOT_EXPECTED, trailing=1)
    assert parse_continuous(CONTINUOUS_SIMPLE + b"\x00\x00") == replace(
        CONTINUOUS_SIMPLE_EXPECTED, trailing=2
    )
    assert parse_features(FEATURES_VECTOR + b"\x00") == replace(FEATURES_EXPECTED, trailing=1)


# --- Every flag combination -------------------------------------------------------------------


@pytest.mark.parametrize("flags", range(0x20))
def test_every_spot_check_flag_combination_round_trips(flags: int) -> None:
    m = SpotCheckMeasurement(
        spo2=SPOT_EXPECTED.spo2,
        pulse_rate=SPOT_EXPECTED.pulse_rate,
        timestamp=SPOT_EXPECTED.timestamp if flags & 0x01 else None,
        measurement_status=SPOT_EXPECTED.measurement_status if flags & 0x02 else None,
        device_status=SPOT_EXPECTED.device_status if flags & 0x04 else None,
        pulse_amplitude_index=SPOT_EXPECTED.pulse_amplitude_index if flags & 0x08 else None,
        device_clock_not_set=bool(flags & 0x10),
    )
    encoded = encode_spot_check(m)
    assert encoded[0] == flags
    assert parse_spot_check(encoded) == m


@pytest.mark.parametrize("flags", range(0x20))
def test_every_continuous_flag_combination_round_trips(flags: int) -> None:
    full = CONTINUOUS_FULL_EXPECTED
    m = ContinuousMeasurement(
        spo2=full.spo2,
        pulse_rate=full.pulse_rate,
        fast=full.fast if flags & 0x01 else None,
        slow=full.slow if flags & 0x02 else None,
        measurement_status=full.measurement_status if flags & 0x04 else None,
        device_status=full.device_status if flags & 0x08 else None,
        pulse_amplitude_index=full.pulse_amplitude_index if flags & 0x10 else None,
    )
    encoded = encode_continuous(m)
    assert encoded[0] == flags
    assert parse_continuous(encoded) == m


# --- Session ----------------------------------------------------------------------------------


def test_session_reads_features_and_subscribes_to_both_optionally() -> None:
    session = PulseOximeterSession(set_time=False)
    assert session.on_connected(datetime(2026, 1, 1))[-3:] == [
        ReadCharacteristic(FEATURES),
        Subscribe(SPOT_CHECK, optional=True),
        Subscribe(CONTINUOUS, optional=True),
    ]
    assert session.on_value(SPOT_CHECK, SPOT) == [SPOT_EXPECTED]
    assert session.on_value(CONTINUOUS, CONTINUOUS_FULL) == [CONTINUOUS_FULL_EXPECTED]
    assert session.on_value(FEATURES, FEATURES_VECTOR) == [FEATURES_EXPECTED]
    with pytest.raises(ProtocolError, match="unexpected characteristic"):
        session.on_value("00002a35-0000-1000-8000-00805f9b34fb", SPOT)


@pytest.mark.parametrize(
    ("discovered", "usable"),
    [
        ({SPOT_CHECK, FEATURES}, True),
        ({CONTINUOUS}, True),
        ({SPOT_CHECK, CONTINUOUS}, True),
        ({FEATURES}, False),
        (set(), False),
    ],
)
def test_session_needs_at_least_one_measurement_characteristic(
    discovered: set[str], usable: bool
) -> None:
    assert PulseOximeterSession().has_measurement(discovered) is usable


# --- Properties -------------------------------------------------------------------------------


@given(st.binary(max_size=30))
def test_arbitrary_bytes_decode_or_raise_protocol_error_only(data: bytes) -> None:
    for parse in (parse_spot_check, parse_continuous, parse_features):
        try:
            parse(data)
        except ProtocolError as exc:
            message = str(exc)
        else:
            continue
        assert "\n" not in message
        assert len(message) <= 100


@given(st.sampled_from([SPOT, CONTINUOUS_FULL, FEATURES_VECTOR]), st.data())
def test_corrupted_siblings_raise_protocol_error_or_decode(
    base: bytes, data: st.DataObject
) -> None:
    corrupted = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        corrupted[data.draw(st.integers(0, len(base) - 1))] = data.draw(st.integers(0, 255))
    cut = bytes(corrupted[: data.draw(st.integers(0, len(base)))])
    for parse in (parse_spot_check, parse_continuous, parse_features):
        with contextlib.suppress(ProtocolError):
            parse(cut)


sfloats = st.one_of(
    st.builds(SFloatValue, st.integers(-2045, 2045), st.integers(-8, 7)),
    st.sampled_from([SFloatValue(0, 0, special) for special in Special]),
)
statuses = st.integers(0, 0xFFFF).map(MeasurementStatus.from_bits)
device_statuses = st.integers(0, 0xFFFFFF).map(DeviceAndSensorStatus.from_bits)
pairs = st.builds(SpO2PulseRate, sfloats, sfloats)


@given(
    st.builds(
        SpotCheckMeasurement,
        spo2=sfloats,
        pulse_rate=sfloats,
        timestamp=st.none()
        | st.datetimes(datetime(1582, 1, 1), datetime(9999, 12, 31)).map(
            lambda d: d.replace(microsecond=0)
        ),
        measurement_status=st.none() | statuses,
        device_status=st.none() | device_statuses,
        pulse_amplitude_index=st.none() | sfloats,
        device_clock_not_set=st.booleans(),
    )
)
def test_spot_check_round_trip(m: SpotCheckMeasurement) -> None:
    assert parse_spot_check(encode_spot_check(m)) == m


@given(
    st.builds(
        ContinuousMeasurement,
        spo2=sfloats,
        pulse_rate=sfloats,
        fast=st.none() | pairs,
        slow=st.none() | pairs,
        measurement_status=st.none() | statuses,
        device_status=st.none() | device_statuses,
        pulse_amplitude_index=st.none() | sfloats,
    )
)
def test_continuous_round_trip(m: ContinuousMeasurement) -> None:
    assert parse_continuous(encode_continuous(m)) == m


@given(
    st.builds(
        PlxFeatures,
        measurement_status_support=st.none() | statuses,
        device_status_support=st.none() | device_statuses,
        spot_check_storage=st.booleans(),
        spot_check_timestamp=st.booleans(),
        spo2pr_fast=st.booleans(),
        spo2pr_slow=st.booleans(),
        pulse_amplitude_index=st.booleans(),
        multiple_bonds=st.booleans(),
    )
)
def test_features_round_trip(f: PlxFeatures) -> None:
    assert parse_features(encode_features(f)) == f
