"""0x2A1C / 0x2A1E / 0x2A1D decoding, whole expected objects, truncated and corrupted siblings.

The vector marked "Nordic" is the byte array of NordicSemiconductor/Android-BLE-Library,
ble-common/src/test/java/no/nordicsemi/android/ble/common/callback/ht/
TemperatureMeasurementDataCallbackTest.java (commit 2b393ebb), decoded here against the Health
Thermometer Service 1.0 layout (§3.1), not copied from Nordic's assertions.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from datetime import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.errors import ProtocolError
from drivers.gatt import ReadCharacteristic, Subscribe
from drivers.ieee11073 import SFloatValue, Special
from drivers.thermometer import (
    INTERMEDIATE_TEMPERATURE,
    MEASUREMENT,
    TEMPERATURE_TYPE,
    StaticTemperatureType,
    TemperatureMeasurement,
    TemperatureType,
    TemperatureUnit,
    ThermometerSession,
    encode_measurement,
    encode_temperature_type,
    parse_intermediate_temperature,
    parse_measurement,
    parse_temperature_type,
)

# Nordic onTemperatureMeasurementReceived: flags 0x06 (Celsius, time stamp, type); FLOAT
# 0xFE000EB0 = 3760 × 10^-2 = 37.60 °C; 2012-12-05 11:50:27; type 4 finger.
NORDIC = bytes([0x06, 0xB0, 0x0E, 0x00, 0xFE, 0xDC, 0x07, 0x0C, 0x05, 0x0B, 0x32, 0x1B, 0x04])
NORDIC_EXPECTED = TemperatureMeasurement(
    unit=TemperatureUnit.CELSIUS,
    temperature=SFloatValue(3760, -2),
    timestamp=datetime(2012, 12, 5, 11, 50, 27),
    temperature_type=TemperatureType.FINGER,
)

# Built from HTS §3.1: flags 0x01 (Fahrenheit); FLOAT 0xFF0003DA = 986 × 10^-1 = 98.6 °F.
FAHRENHEIT = bytes.fromhex("01 DA0300FF")
FAHRENHEIT_EXPECTED = TemperatureMeasurement(TemperatureUnit.FAHRENHEIT, SFloatValue(986, -1))

# Built from HTS §3.1: flags 0x04 (type); FLOAT NaN (0x007FFFFF); type 9 tympanum.
NAN_TYMPANUM = bytes.fromhex("04 FFFF7F00 09")
NAN_TYMPANUM_EXPECTED = TemperatureMeasurement(
    TemperatureUnit.CELSIUS,
    SFloatValue(0, 0, Special.NAN),
    temperature_type=TemperatureType.TYMPANUM,
)

VECTORS = [
    pytest.param(NORDIC, NORDIC_EXPECTED, id="nordic"),
    pytest.param(FAHRENHEIT, FAHRENHEIT_EXPECTED, id="fahrenheit"),
    pytest.param(NAN_TYMPANUM, NAN_TYMPANUM_EXPECTED, id="nan-tympanum"),
]


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_measurement_decodes_to_the_whole_expected_object(
    data: bytes, expected: TemperatureMeasurement
) -> None:
    assert parse_measurement(data) == expected
    assert encode_measurement(expected) == data


def test_intermediate_temperature_has_the_same_layout() -> None:
    assert parse_intermediate_temperature(NORDIC) == replace(NORDIC_EXPECTED, intermediate=True)


def test_temperature_is_exact() -> None:
    assert str(parse_measurement(NORDIC).temperature.to_decimal()) == "37.60"


@pytest.mark.parametrize(
    ("raw", "special"),
    [
        ("FFFF7F00", Special.NAN),
        ("00008000", Special.NRES),
        ("FEFF7F00", Special.POSITIVE_INFINITY),
        ("02008000", Special.NEGATIVE_INFINITY),
        ("01008000", Special.RESERVED),
    ],
)
def test_special_float_values_are_kept_distinct(raw: str, special: Special) -> None:
    m = parse_measurement(bytes.fromhex("00" + raw))
    assert m.temperature == SFloatValue(0, 0, special)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (1, TemperatureType.ARMPIT),
        (2, TemperatureType.BODY),
        (3, TemperatureType.EAR),
        (4, TemperatureType.FINGER),
        (5, TemperatureType.GASTROINTESTINAL_TRACT),
        (6, TemperatureType.MOUTH),
        (7, TemperatureType.RECTUM),
        (8, TemperatureType.TOE),
        (9, TemperatureType.TYMPANUM),
        (0, TemperatureType.RESERVED),
        (10, TemperatureType.RESERVED),
        (255, TemperatureType.RESERVED),
    ],
)
def test_temperature_type_codes(code: int, expected: TemperatureType) -> None:
    assert parse_measurement(NAN_TYMPANUM[:-1] + bytes((code,))).temperature_type == expected
    assert parse_temperature_type(bytes((code,))) == StaticTemperatureType(expected)


def test_temperature_type_characteristic_round_trips_and_refuses_empty() -> None:
    value = StaticTemperatureType(TemperatureType.MOUTH)
    assert encode_temperature_type(value) == b"\x06"
    with pytest.raises(ProtocolError, match="Temperature Type is empty"):
        parse_temperature_type(b"")


# --- Truncated and corrupted siblings ---------------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_every_truncation_is_a_protocol_error(
    data: bytes, expected: TemperatureMeasurement
) -> None:
    for length in range(len(data)):
        with pytest.raises(ProtocolError) as caught:
            parse_measurement(data[:length])
        assert "\n" not in str(caught.value)


def test_missing_type_is_refused() -> None:
    # Nordic onInvalidDataReceived: the vector without its type byte.
    with pytest.raises(
        ProtocolError, match=r"Temperature Measurement is 12 bytes, flags 0x06 need 13"
    ):
        parse_measurement(NORDIC[:-1])


@pytest.mark.parametrize("reserved_bit", [0x08, 0x10, 0x20, 0x40, 0x80])
def test_reserved_flag_bits_are_refused(reserved_bit: int) -> None:
    with pytest.raises(ProtocolError, match="reserved bits 3-7"):
        parse_intermediate_temperature(bytes([NORDIC[0] | reserved_bit]) + NORDIC[1:])


def test_impossible_time_stamp_is_refused_without_the_date() -> None:
    corrupted = bytearray(NORDIC)
    corrupted[7] = 13  # month
    with pytest.raises(ProtocolError, match="Temperature Measurement time stamp") as caught:
        parse_measurement(bytes(corrupted))
    assert "2012" not in str(caught.value)


def test_trailing_bytes_are_ignored_and_counted() -> None:
    assert parse_measurement(FAHRENHEIT + b"\x00\x00") == replace(FAHRENHEIT_EXPECTED, trailing=2)


@pytest.mark.parametrize("flags", range(0x08))
def test_every_flag_combination_round_trips(flags: int) -> None:
    m = TemperatureMeasurement(
        unit=TemperatureUnit.FAHRENHEIT if flags & 0x01 else TemperatureUnit.CELSIUS,
        temperature=NORDIC_EXPECTED.temperature,
        timestamp=NORDIC_EXPECTED.timestamp if flags & 0x02 else None,
        temperature_type=NORDIC_EXPECTED.temperature_type if flags & 0x04 else None,
    )
    encoded = encode_measurement(m)
    assert encoded[0] == flags
    assert parse_measurement(encoded) == m


# --- Session ----------------------------------------------------------------------------------


def test_session_reads_the_type_and_subscribes() -> None:
    session = ThermometerSession(set_time=False)
    assert session.on_connected(datetime(2026, 1, 1))[-3:] == [
        ReadCharacteristic(TEMPERATURE_TYPE),
        Subscribe(MEASUREMENT),
        Subscribe(INTERMEDIATE_TEMPERATURE, optional=True),
    ]
    assert session.on_value(MEASUREMENT, NORDIC) == [NORDIC_EXPECTED]
    assert session.on_value(INTERMEDIATE_TEMPERATURE, FAHRENHEIT) == [
        replace(FAHRENHEIT_EXPECTED, intermediate=True)
    ]
    assert session.on_value(TEMPERATURE_TYPE, b"\x01") == [
        StaticTemperatureType(TemperatureType.ARMPIT)
    ]
    with pytest.raises(ProtocolError, match="unexpected characteristic"):
        session.on_value("00002a35-0000-1000-8000-00805f9b34fb", NORDIC)


# --- Properties -------------------------------------------------------------------------------


@given(st.binary(max_size=20))
def test_arbitrary_bytes_decode_or_raise_protocol_error_only(data: bytes) -> None:
    for parse in (parse_measurement, parse_intermediate_temperature, parse_temperature_type):
        try:
            parse(data)
        except ProtocolError as exc:
            message = str(exc)
        else:
            continue
        assert "\n" not in message
        assert len(message) <= 100


@given(st.data())
def test_corrupted_siblings_raise_protocol_error_or_decode(data: st.DataObject) -> None:
    corrupted = bytearray(NORDIC)
    for _ in range(data.draw(st.integers(1, 4))):
        corrupted[data.draw(st.integers(0, len(NORDIC) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ProtocolError):
        parse_measurement(bytes(corrupted[: data.draw(st.integers(0, len(NORDIC)))]))


floats = st.one_of(
    st.builds(SFloatValue, st.integers(-(2**23) + 3, 2**23 - 3), st.integers(-128, 127)),
    st.sampled_from([SFloatValue(0, 0, special) for special in Special]),
)
measurements = st.builds(
    TemperatureMeasurement,
    unit=st.sampled_from(TemperatureUnit),
    temperature=floats,
    timestamp=st.none()
    | st.datetimes(datetime(1582, 1, 1), datetime(9999, 12, 31)).map(
        lambda d: d.replace(microsecond=0)
    ),
    temperature_type=st.none() | st.sampled_from(TemperatureType),
)


@given(measurements)
def test_encode_parse_round_trip(m: TemperatureMeasurement) -> None:
    assert parse_measurement(encode_measurement(m)) == m
