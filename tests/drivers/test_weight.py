"""0x2A9D / 0x2A9E decoding, whole expected objects, truncated and corrupted siblings.

Vectors marked "im97mori" are byte arrays of im97mori-github/AndroidBLEUtil,
characteristic/characteristic-wss/src/androidTest/java/org/im97mori/ble/characteristic/wss/
WeightMeasurementTest.java (commit 073f9315); "Spezi" feature values come from
StanfordSpezi/SpeziBluetooth, Tests/SpeziBluetoothServicesTests/WeightScaleTests.swift
(commit 361acec2). Both are decoded here against the Weight Scale Service 1.0 layout (§3.1,
§3.2), not copied from their assertions (im97mori reads 0xFFFF as a weight and accepts
February 31; Spezi scales readings by the feature resolution: the specification does neither).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from datetime import datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.errors import ProtocolError
from drivers.gatt import ReadCharacteristic, Subscribe
from drivers.weight import (
    FEATURE,
    MEASUREMENT,
    WeightMeasurement,
    WeightScaleFeature,
    WeightScaleSession,
    WeightUnits,
    encode_feature,
    encode_measurement,
    parse_feature,
    parse_measurement,
)

# Built from WSS §3.2: flags 0x0E (SI, time stamp, user, BMI + height); weight 0x6078 = 24696
# × 0.005 = 123.480 kg; 2026-11-26 08:30:15; user 1; BMI 0x00F1 = 24.1; height 0x06C2 = 1.730 m.
FULL_SI = bytes.fromhex("0E 7860 EA070B1A081E0F 01 F100 C206")
FULL_SI_EXPECTED = WeightMeasurement(
    units=WeightUnits.SI,
    weight=Decimal("123.480"),
    timestamp=datetime(2026, 11, 26, 8, 30, 15),
    user_id=1,
    bmi=Decimal("24.1"),
    height=Decimal("1.730"),
)

# Built from WSS §3.2: flags 0x09 (imperial, BMI + height); 20000 × 0.01 = 200.00 lb;
# BMI 280 × 0.1 = 28.0; height 700 × 0.1 = 70.0 in.
IMPERIAL = bytes.fromhex("09 204E 1801 BC02")
IMPERIAL_EXPECTED = WeightMeasurement(
    units=WeightUnits.IMPERIAL,
    weight=Decimal("200.00"),
    bmi=Decimal("28.0"),
    height=Decimal("70.0"),
)

VECTORS = [
    pytest.param(FULL_SI, FULL_SI_EXPECTED, id="full-si"),
    pytest.param(IMPERIAL, IMPERIAL_EXPECTED, id="imperial"),
    # im97mori test_constructor001 / 003: flags 0 / 1, weight 0.
    pytest.param(
        bytes([0, 0, 0]), WeightMeasurement(WeightUnits.SI, Decimal(0)), id="im97mori-001"
    ),
    pytest.param(
        bytes([1, 0, 0]), WeightMeasurement(WeightUnits.IMPERIAL, Decimal(0)), id="im97mori-003"
    ),
    # im97mori test_constructor002 / 004: 0xFFFF is "measurement unsuccessful", not a weight.
    pytest.param(
        bytes([0, 0xFF, 0xFF]), WeightMeasurement(WeightUnits.SI, None), id="im97mori-002"
    ),
    pytest.param(
        bytes([1, 0xFF, 0xFF]), WeightMeasurement(WeightUnits.IMPERIAL, None), id="im97mori-004"
    ),
    # im97mori test_constructor101: time stamp 1582 with month and day 0, "not known".
    pytest.param(
        bytes([2, 0, 0, 0x2E, 0x06, 0, 0, 0, 0, 0]),
        WeightMeasurement(WeightUnits.SI, Decimal(0)),
        id="im97mori-101",
    ),
    # im97mori test_constructor102: 9999-01-01 23:59:59.
    pytest.param(
        bytes([2, 0, 0, 0x0F, 0x27, 1, 1, 23, 59, 59]),
        WeightMeasurement(WeightUnits.SI, Decimal(0), timestamp=datetime(9999, 1, 1, 23, 59, 59)),
        id="im97mori-102",
    ),
]


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_measurement_decodes_to_the_whole_expected_object(
    data: bytes, expected: WeightMeasurement
) -> None:
    assert parse_measurement(data) == expected


@pytest.mark.parametrize(("data", "expected"), VECTORS[:6])
def test_encoder_reproduces_the_vector_bytes(data: bytes, expected: WeightMeasurement) -> None:
    assert encode_measurement(expected) == data


def test_unknown_user_decodes_to_none() -> None:
    assert parse_measurement(FULL_SI[:10] + b"\xff" + FULL_SI[11:]).user_id is None


def test_ucum_codes_follow_the_units() -> None:
    assert (WeightUnits.SI.weight_ucum, WeightUnits.SI.height_ucum) == ("kg", "m")
    assert (WeightUnits.IMPERIAL.weight_ucum, WeightUnits.IMPERIAL.height_ucum) == (
        "[lb_av]",
        "[in_i]",
    )


# --- Truncated and corrupted siblings ---------------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_every_truncation_is_a_protocol_error(data: bytes, expected: WeightMeasurement) -> None:
    for length in range(len(data)):
        with pytest.raises(ProtocolError) as caught:
            parse_measurement(data[:length])
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize("reserved_bit", [0x10, 0x20, 0x40, 0x80])
def test_reserved_flag_bits_are_refused(reserved_bit: int) -> None:
    with pytest.raises(ProtocolError, match="reserved bits 4-7"):
        parse_measurement(bytes([FULL_SI[0] | reserved_bit]) + FULL_SI[1:])


def test_a_separate_height_bit_4_is_refused() -> None:
    # The known misparse: BMI on bit 3, height on bit 4. Per WSS both ride on bit 3 alone.
    with pytest.raises(ProtocolError, match="flags 0x18 set reserved bits"):
        parse_measurement(bytes.fromhex("18 7860 F100 C206"))


def test_impossible_time_stamp_is_refused_without_the_date() -> None:
    # im97mori test_constructor103: 9999-02-31, which that library accepts.
    with pytest.raises(ProtocolError, match="Weight Measurement time stamp") as caught:
        parse_measurement(bytes([2, 0, 0, 0x0F, 0x27, 2, 31, 0, 0, 0]))
    assert "9999" not in str(caught.value)


def test_trailing_bytes_are_ignored_and_counted() -> None:
    assert parse_measurement(IMPERIAL + b"\x00") == replace(IMPERIAL_EXPECTED, trailing=1)


# --- Every flag combination -------------------------------------------------------------------


@pytest.mark.parametrize("flags", range(0x10))
def test_every_flag_combination_round_trips(flags: int) -> None:
    imperial = flags & 0x01
    m = WeightMeasurement(
        units=WeightUnits.IMPERIAL if imperial else WeightUnits.SI,
        weight=IMPERIAL_EXPECTED.weight if imperial else FULL_SI_EXPECTED.weight,
        timestamp=FULL_SI_EXPECTED.timestamp if flags & 0x02 else None,
        user_id=FULL_SI_EXPECTED.user_id if flags & 0x04 else None,
        bmi=FULL_SI_EXPECTED.bmi if flags & 0x08 else None,
        height=(IMPERIAL_EXPECTED.height if imperial else FULL_SI_EXPECTED.height)
        if flags & 0x08
        else None,
    )
    encoded = encode_measurement(m)
    assert encoded[0] == flags
    assert parse_measurement(encoded) == m


@pytest.mark.parametrize(
    "measurement",
    [
        replace(FULL_SI_EXPECTED, weight=Decimal("0.001")),  # not a 0.005 kg step
        replace(FULL_SI_EXPECTED, weight=Decimal("327.675")),  # 0xFFFF steps: the error code
        replace(FULL_SI_EXPECTED, height=None),
        replace(FULL_SI_EXPECTED, user_id=0xFF),
        replace(IMPERIAL_EXPECTED, height=Decimal("70.05")),
    ],
)
def test_encoder_refuses_values_that_do_not_fit(measurement: WeightMeasurement) -> None:
    with pytest.raises(ValueError):
        encode_measurement(measurement)


# --- Weight Scale Feature ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected", "steps"),
    [
        # Spezi testWeightScaleFeatureStrings: raw value 0x07, time stamp, multiple users and
        # BMI supported, resolutions not specified.
        (
            "07000000",
            WeightScaleFeature(True, True, True, 0, 0),
            (None, None, None, None),
        ),
        # Spezi features2: 20 g weight resolution (code 5) and 5 mm height resolution (code 2),
        # BMI supported: 0x04 | 5 << 3 | 2 << 7 = 0x012C.
        (
            "2C010000",
            WeightScaleFeature(False, False, True, 5, 2),
            (Decimal("0.02"), Decimal("0.05"), Decimal("0.005"), Decimal("0.5")),
        ),
        # Built from WSS §3.1.1: finest codes, 7 (0.005 kg / 0.01 lb) and 3 (1 mm / 0.1 in).
        (
            "B8010000",
            WeightScaleFeature(False, False, False, 7, 3),
            (Decimal("0.005"), Decimal("0.01"), Decimal("0.001"), Decimal("0.1")),
        ),
        # Reserved codes 8 (weight) and 4 (height), and reserved bits 10-31, are ignored.
        (
            "40FEFFFF",
            WeightScaleFeature(False, False, False, 8, 4),
            (None, None, None, None),
        ),
    ],
)
def test_feature_decodes_with_its_resolution_table(
    data: str, expected: WeightScaleFeature, steps: tuple[Decimal | None, ...]
) -> None:
    feature = parse_feature(bytes.fromhex(data))
    assert feature == expected
    assert (
        feature.weight_resolution_kg,
        feature.weight_resolution_lb,
        feature.height_resolution_m,
        feature.height_resolution_in,
    ) == steps
    assert parse_feature(encode_feature(feature)) == feature


def test_short_feature_is_refused_and_trailing_counted() -> None:
    for length in range(4):
        with pytest.raises(ProtocolError, match="Weight Scale Feature"):
            parse_feature(bytes(length))
    assert parse_feature(bytes(6)).trailing == 2


# --- Session ----------------------------------------------------------------------------------


def test_session_reads_the_feature_and_subscribes() -> None:
    session = WeightScaleSession(set_time=False)
    assert session.on_connected(datetime(2026, 1, 1))[-2:] == [
        ReadCharacteristic(FEATURE),
        Subscribe(MEASUREMENT),
    ]
    assert session.on_value(MEASUREMENT, IMPERIAL) == [IMPERIAL_EXPECTED]
    assert session.on_value(FEATURE, bytes.fromhex("07000000")) == [
        WeightScaleFeature(True, True, True)
    ]
    with pytest.raises(ProtocolError, match="unexpected characteristic"):
        session.on_value("00002a18-0000-1000-8000-00805f9b34fb", IMPERIAL)


# --- Properties -------------------------------------------------------------------------------


@given(st.binary(max_size=30))
def test_arbitrary_bytes_decode_or_raise_protocol_error_only(data: bytes) -> None:
    for parse in (parse_measurement, parse_feature):
        try:
            parse(data)
        except ProtocolError as exc:
            message = str(exc)
        else:
            continue
        assert "\n" not in message
        assert len(message) <= 100


@given(st.sampled_from([FULL_SI, IMPERIAL]), st.data())
def test_corrupted_siblings_raise_protocol_error_or_decode(
    base: bytes, data: st.DataObject
) -> None:
    corrupted = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        corrupted[data.draw(st.integers(0, len(base) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ProtocolError):
        parse_measurement(bytes(corrupted[: data.draw(st.integers(0, len(base)))]))


@st.composite
def measurements(draw: st.DrawFn) -> WeightMeasurement:
    imperial = draw(st.booleans())
    weight_step, height_step = (
        (Decimal("0.01"), Decimal("0.1")) if imperial else (Decimal("0.005"), Decimal("0.001"))
    )
    with_bmi = draw(st.booleans())
    return WeightMeasurement(
        units=WeightUnits.IMPERIAL if imperial else WeightUnits.SI,
        weight=draw(st.none() | st.integers(0, 0xFFFE).map(lambda n: n * weight_step)),
        timestamp=draw(
            st.none()
            | st.datetimes(datetime(1582, 1, 1), datetime(9999, 12, 31)).map(
                lambda d: d.replace(microsecond=0)
            )
        ),
        user_id=draw(st.none() | st.integers(0, 254)),
        bmi=draw(st.integers(0, 0xFFFF)) * Decimal("0.1") if with_bmi else None,
        height=draw(st.integers(0, 0xFFFF)) * height_step if with_bmi else None,
    )


@given(measurements())
def test_measurement_round_trip(m: WeightMeasurement) -> None:
    assert parse_measurement(encode_measurement(m)) == m
