"""Sans-I/O GATT sessions: what to do with a connected health device, as actions and readings.

A transport (bleak on the box, Bumble in tests) knows how to scan, connect, read, write and
subscribe; it knows nothing about blood pressure or glucose. A *session* knows the profile
and nothing about radios. They meet through two calls (STYLE.md convention 2):

* :meth:`GattSession.on_connected` returns the first :data:`Action` list: read the Device
  Information and Battery Level, set the device clock, subscribe to the measurements.
* :meth:`GattSession.on_value` takes every value the device sends or a read returns and gives
  back decoded events (a measurement, :class:`DeviceInformation`, :class:`BatteryLevel`) and
  any follow-up actions (the glucose session asks the Record Access Control Point for stored
  records from there).

The transport performs actions in order, skips an ``optional`` action whose characteristic
the device lacks, and treats a missing required one as a failed connection. A decoder's
:class:`~drivers.errors.ProtocolError` propagates out of ``on_value``; the transport logs it
once and keeps the connection.

Common services (Bluetooth SIG Assigned Numbers; GATT Specification Supplement):
Device Information 0x180A (manufacturer 0x2A29, model 0x2A24, serial 0x2A25, hardware
0x2A27, firmware 0x2A26, software 0x2A28), Battery 0x180F (Battery Level 0x2A19, u8 percent),
Current Time 0x1805 (Current Time 0x2A2B: Date Time, day of week, fractions256, adjust
reason; written so that the device's own time stamps are right).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from drivers.errors import ProtocolError
from drivers.ieee11073 import encode_datetime

_BASE_UUID = "0000{:04x}-0000-1000-8000-00805f9b34fb"


def uuid16(short: int) -> str:
    """The full, lower-case 128-bit UUID of a Bluetooth SIG 16-bit UUID (as bleak reports it)."""
    return _BASE_UUID.format(short)


DEVICE_INFORMATION_SERVICE = uuid16(0x180A)
BATTERY_SERVICE = uuid16(0x180F)
CURRENT_TIME_SERVICE = uuid16(0x1805)
BATTERY_LEVEL = uuid16(0x2A19)
CURRENT_TIME = uuid16(0x2A2B)

# Device Information characteristics → the DeviceInformation field they fill.
DEVICE_INFORMATION_FIELDS: dict[str, str] = {
    uuid16(0x2A29): "manufacturer",
    uuid16(0x2A24): "model",
    uuid16(0x2A25): "serial_number",
    uuid16(0x2A27): "hardware_revision",
    uuid16(0x2A26): "firmware_revision",
    uuid16(0x2A28): "software_revision",
}
_DIS_TEXT_MAX = 248  # longest UTF-8 string a single ATT read can carry with a 251-byte MTU

# Current Time adjust reason (u8): bit 0 manual time update.
_ADJUST_MANUAL = 0x01


@dataclass(frozen=True, slots=True)
class ReadCharacteristic:
    """Read a characteristic once; the value comes back through ``on_value``."""

    uuid: str
    optional: bool = True


@dataclass(frozen=True, slots=True)
class WriteCharacteristic:
    """Write a value (with response unless ``response`` is False)."""

    uuid: str
    value: bytes
    optional: bool = True
    response: bool = True


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Enable notifications or indications (whichever the characteristic supports)."""

    uuid: str
    optional: bool = False


Action = ReadCharacteristic | WriteCharacteristic | Subscribe


@dataclass(frozen=True, slots=True)
class DeviceInformation:
    """One Device Information field, as read; the devices service collects them into a Device."""

    field: str
    value: str


@dataclass(frozen=True, slots=True)
class BatteryLevel:
    """Battery Level 0x2A19: percent, 0-100."""

    percent: int


class GattSession(Protocol):
    """One connection's worth of profile logic; a new session per connection."""

    profile: str
    service_uuid: str

    def on_connected(self, now: datetime) -> list[Action]:
        """The actions to perform once connected; ``now`` is the site's naive wall clock."""
        ...

    def on_value(self, uuid: str, value: bytes) -> list[object]:
        """Decode one value: events and follow-up :data:`Action` objects, in order."""
        ...


def parse_device_information(uuid: str, value: bytes) -> DeviceInformation:
    """Decode a Device Information string characteristic (UTF-8, trailing NULs dropped)."""
    name = DEVICE_INFORMATION_FIELDS.get(uuid)
    if name is None:
        raise ProtocolError(f"characteristic {uuid} is not a Device Information string")
    if len(value) > _DIS_TEXT_MAX:
        raise ProtocolError(f"Device Information {name} is {len(value)} bytes")
    try:
        text = bytes(value).rstrip(b"\x00").decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"Device Information {name} is not UTF-8") from None
    return DeviceInformation(field=name, value=text.strip())


def parse_battery_level(value: bytes) -> BatteryLevel:
    """Decode Battery Level 0x2A19: one byte, 0-100 percent (101-255 are reserved)."""
    if len(value) != 1:
        raise ProtocolError(f"Battery Level is {len(value)} bytes, expected 1")
    if value[0] > 100:
        raise ProtocolError(f"Battery Level 0x{value[0]:02X} is outside 0-100")
    return BatteryLevel(percent=value[0])


def encode_current_time(now: datetime) -> bytes:
    """The 10-byte Current Time 0x2A2B value for ``now`` (naive site wall time).

    Date Time (7), day of week (1 = Monday … 7 = Sunday), fractions256 (0: not known to that
    precision), adjust reason (manual time update).
    """
    return encode_datetime(now) + bytes([now.isoweekday(), 0, _ADJUST_MANUAL])


@dataclass(frozen=True, slots=True)
class CommonCharacteristics:
    """Device Information, Battery Level and Current Time: shared by every health session."""

    set_time: bool = True

    def actions(self, now: datetime) -> list[Action]:
        """Reads of every Device Information string and the battery, and the clock write."""
        actions: list[Action] = [ReadCharacteristic(uuid) for uuid in DEVICE_INFORMATION_FIELDS]
        actions.append(ReadCharacteristic(BATTERY_LEVEL))
        if self.set_time:
            actions.append(WriteCharacteristic(CURRENT_TIME, encode_current_time(now)))
        return actions

    def handles(self, uuid: str) -> bool:
        """Whether ``uuid`` is one of the common characteristics."""
        return uuid in DEVICE_INFORMATION_FIELDS or uuid == BATTERY_LEVEL

    def on_value(self, uuid: str, value: bytes) -> list[object]:
        """Decode a common characteristic's value."""
        if uuid == BATTERY_LEVEL:
            return [parse_battery_level(value)]
        return [parse_device_information(uuid, value)]
