"""The common GATT characteristics and the session contract, blood-pressure session included.

Battery Level vectors marked "Nordic" are from NordicSemiconductor/Android-BLE-Library,
ble-common/src/test/java/no/nordicsemi/android/ble/common/callback/battery/
BatteryLevelDataCallbackTest.java (commit 2b393ebb). The Current Time moment is the one in
StanfordSpezi/SpeziBluetooth, Tests/SpeziBluetoothServicesTests/CurrentTimeTests.swift (commit
387ed5d7), encoded here from the GATT Specification Supplement (Current Time 0x2A2B), since
Spezi's test asserts decoded structures, not bytes.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers import blood_pressure
from drivers.blood_pressure import BloodPressureSession
from drivers.errors import ProtocolError
from drivers.gatt import (
    BATTERY_LEVEL,
    CURRENT_TIME,
    DEVICE_INFORMATION_FIELDS,
    BatteryLevel,
    CommonCharacteristics,
    DeviceInformation,
    GattSession,
    ReadCharacteristic,
    Subscribe,
    WriteCharacteristic,
    encode_current_time,
    parse_battery_level,
    parse_device_information,
    uuid16,
)
from drivers.glucose import GlucoseSession
from drivers.pulse_oximetry import PulseOximeterSession
from drivers.thermometer import ThermometerSession
from drivers.weight import WeightScaleSession

MANUFACTURER = uuid16(0x2A29)
MODEL = uuid16(0x2A24)
NOW = datetime(2024, 6, 6, 12, 4, 44)  # Spezi nowTestTime, a Thursday


def test_uuid16_is_the_lower_case_bluetooth_base_uuid() -> None:
    assert uuid16(0x2A35) == "00002a35-0000-1000-8000-00805f9b34fb"
    assert uuid16(0xFFFF) == "0000ffff-0000-1000-8000-00805f9b34fb"


# --- Device Information -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uuid", "value", "expected"),
    [
        (
            MANUFACTURER,
            b"Nordic Semiconductor",
            DeviceInformation("manufacturer", "Nordic Semiconductor"),
        ),
        (MODEL, b"BP-710\x00\x00", DeviceInformation("model", "BP-710")),  # NUL padding dropped
        (uuid16(0x2A25), b" SN 0042 ", DeviceInformation("serial_number", "SN 0042")),
        (uuid16(0x2A26), "1.2.3-ü".encode(), DeviceInformation("firmware_revision", "1.2.3-ü")),
        (uuid16(0x2A27), b"", DeviceInformation("hardware_revision", "")),
        (uuid16(0x2A28), b"sw", DeviceInformation("software_revision", "sw")),
    ],
)
def test_device_information_strings_decode(
    uuid: str, value: bytes, expected: DeviceInformation
) -> None:
    assert parse_device_information(uuid, value) == expected


def test_device_information_refuses_bad_values_without_quoting_them() -> None:
    with pytest.raises(ProtocolError, match="not UTF-8") as caught:
        parse_device_information(MODEL, b"\xffsecret")
    assert "secret" not in str(caught.value)
    with pytest.raises(ProtocolError, match="model is 249 bytes"):
        parse_device_information(MODEL, b"x" * 249)
    with pytest.raises(ProtocolError, match="not a Device Information string"):
        parse_device_information(BATTERY_LEVEL, b"x")


# --- Battery Level ----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "percent"), [(b"\x64", 100), (b"\x0f", 15), (b"\x00", 0)])
def test_battery_level_decodes(value: bytes, percent: int) -> None:
    # Nordic fullBattery (0x64) and lowBattery (0x0F); 0 % from the specification's range.
    assert parse_battery_level(value) == BatteryLevel(percent)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"\x64\x00", "2 bytes"),  # Nordic dataTooLong
        (b"\x65", "outside 0-100"),  # Nordic batteryLevelOutOfRange
        (b"", "0 bytes"),
    ],
)
def test_battery_level_refuses_malformed_values(value: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_battery_level(value)


# --- Current Time -----------------------------------------------------------------------------


def test_current_time_encodes_date_time_weekday_fractions_and_reason() -> None:
    # 2024 (E8 07), June 6, 12:04:44; Thursday = 4; fractions256 0; adjust reason 0x01 manual.
    assert encode_current_time(NOW) == bytes.fromhex("E8070606 0C042C 04 00 01")


@pytest.mark.parametrize(
    ("moment", "weekday"),
    [(datetime(2024, 6, 3), 1), (datetime(2024, 6, 9, 23, 59, 59), 7)],
    ids=["monday", "sunday"],
)
def test_current_time_day_of_week_runs_monday_1_to_sunday_7(moment: datetime, weekday: int) -> None:
    assert encode_current_time(moment)[7] == weekday


def test_current_time_writes_the_wall_clock_and_drops_zone_and_microseconds() -> None:
    aware = datetime(2024, 6, 6, 12, 4, 44, 999_999, tzinfo=UTC)
    assert encode_current_time(aware) == encode_current_time(NOW)


@given(st.datetimes(datetime(1582, 1, 1), datetime(9999, 12, 31)))
def test_current_time_is_always_ten_bytes(moment: datetime) -> None:
    encoded = encode_current_time(moment)
    assert len(encoded) == 10
    assert int.from_bytes(encoded[:2], "little") == moment.year


# --- Common characteristics -------------------------------------------------------------------


def test_common_actions_read_every_string_and_the_battery_then_set_the_clock() -> None:
    actions = CommonCharacteristics().actions(NOW)
    assert actions == [
        *(ReadCharacteristic(uuid) for uuid in DEVICE_INFORMATION_FIELDS),
        ReadCharacteristic(BATTERY_LEVEL),
        WriteCharacteristic(CURRENT_TIME, encode_current_time(NOW)),
    ]
    assert all(action.optional for action in actions)
    assert CommonCharacteristics(set_time=False).actions(NOW) == actions[:-1]


def test_common_characteristics_handle_reads_but_not_the_clock_write() -> None:
    common = CommonCharacteristics()
    assert common.handles(BATTERY_LEVEL)
    assert all(common.handles(uuid) for uuid in DEVICE_INFORMATION_FIELDS)
    assert not common.handles(CURRENT_TIME)
    assert common.on_value(MODEL, b"GL-50") == [DeviceInformation("model", "GL-50")]


# --- Blood-pressure session -------------------------------------------------------------------

NORDIC_SOME = bytes([0x15, 0xBD, 0xF0, 0x0B, 0x00, 0x9F, 0xF0, 0x3C, 0x00, 0x12, 0x00])


def test_blood_pressure_session_subscribes_after_the_common_actions() -> None:
    session = BloodPressureSession()
    assert session.on_connected(NOW) == [
        *CommonCharacteristics().actions(NOW),
        Subscribe(blood_pressure.MEASUREMENT),
        Subscribe(blood_pressure.INTERMEDIATE_CUFF_PRESSURE, optional=True),
    ]
    assert BloodPressureSession(set_time=False).on_connected(NOW)[-3:] == [
        ReadCharacteristic(BATTERY_LEVEL),
        Subscribe(blood_pressure.MEASUREMENT),
        Subscribe(blood_pressure.INTERMEDIATE_CUFF_PRESSURE, optional=True),
    ]


def test_blood_pressure_session_routes_each_characteristic_to_its_decoder() -> None:
    session = BloodPressureSession()
    assert session.on_value(blood_pressure.MEASUREMENT, NORDIC_SOME) == [
        blood_pressure.parse_measurement(NORDIC_SOME)
    ]
    [live] = session.on_value(blood_pressure.INTERMEDIATE_CUFF_PRESSURE, NORDIC_SOME)
    assert isinstance(live, blood_pressure.BloodPressureMeasurement)
    assert live.intermediate
    assert session.on_value(BATTERY_LEVEL, b"\x0f") == [BatteryLevel(15)]
    assert session.on_value(MANUFACTURER, b"Omron") == [DeviceInformation("manufacturer", "Omron")]


def test_blood_pressure_session_lets_decoder_errors_and_strangers_raise_protocol_error() -> None:
    session = BloodPressureSession()
    with pytest.raises(ProtocolError, match="Blood Pressure Measurement"):
        session.on_value(blood_pressure.MEASUREMENT, NORDIC_SOME[:5])
    with pytest.raises(ProtocolError, match="unexpected characteristic"):
        session.on_value(uuid16(0x2A18), NORDIC_SOME)


# --- Every session honours the contract -------------------------------------------------------

SESSIONS: list[GattSession] = [
    BloodPressureSession(),
    GlucoseSession(last_sequence=None),
    WeightScaleSession(),
    PulseOximeterSession(),
    ThermometerSession(),
]


@pytest.mark.parametrize("session", SESSIONS, ids=lambda s: s.profile)
def test_every_session_starts_with_the_common_actions_and_names_its_service(
    session: GattSession,
) -> None:
    common = CommonCharacteristics().actions(NOW)
    actions = session.on_connected(NOW)
    assert actions[: len(common)] == common
    assert any(isinstance(action, Subscribe) and not action.optional for action in actions) or (
        session.profile == "pulse_oximetry"  # one of two optional subscriptions must exist
    )
    assert session.service_uuid.endswith("-0000-1000-8000-00805f9b34fb")
    assert session.on_value(BATTERY_LEVEL, b"\x32") == [BatteryLevel(50)]
