"""Temperature Measurement (GATT 0x2A1C), Intermediate Temperature (0x2A1E) and Temperature
Type (0x2A1D), sans-I/O.

Wire layout of 0x2A1C and 0x2A1E (Bluetooth SIG Health Thermometer Service 1.0, §3.1 and
§3.3; field definitions in the GATT Specification Supplement; REFERENCE.md), little-endian:

====  ============================================  ======================================
size  field                                         present when
====  ============================================  ======================================
1     flags                                         always
4     temperature (FLOAT; °C, or °F if bit 0)       always
7     time stamp (Date Time)                        flags bit 1
1     temperature type (u8)                         flags bit 2
====  ============================================  ======================================

Temperature type codes: 1 armpit, 2 body (general), 3 ear (usually earlobe), 4 finger, 5
gastro-intestinal tract, 6 mouth, 7 rectum, 8 toe, 9 tympanum (ear drum); 0 and 10-255 are
reserved and decode to RESERVED (encoded as 0). A thermometer with a fixed site reads it from
0x2A1D instead of sending it in every measurement.

Decisions, as for :mod:`drivers.blood_pressure`: flags bits 3-7 are reserved and refused;
bytes after the flagged fields are counted in ``trailing``; a time stamp of year/month/day 0
is None and an impossible one is a ProtocolError. FLOAT special values are kept as sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from drivers.errors import ProtocolError
from drivers.gatt import Action, CommonCharacteristics, ReadCharacteristic, Subscribe, uuid16
from drivers.ieee11073 import (
    SFloatValue,
    decode_datetime,
    decode_float,
    encode_datetime,
    encode_float,
)

SERVICE = uuid16(0x1809)
MEASUREMENT = uuid16(0x2A1C)
TEMPERATURE_TYPE = uuid16(0x2A1D)
INTERMEDIATE_TEMPERATURE = uuid16(0x2A1E)

MEASUREMENT_NAME = "Temperature Measurement"
INTERMEDIATE_NAME = "Intermediate Temperature"

_FAHRENHEIT = 0x01
_TIMESTAMP = 0x02
_TYPE = 0x04
_RESERVED_FLAGS = 0xF8


class TemperatureUnit(StrEnum):
    """Flags bit 0, as the UCUM code FHIR expects."""

    CELSIUS = "Cel"
    FAHRENHEIT = "[degF]"


class TemperatureType(StrEnum):
    """Where the temperature was taken (0x2A1D, or the measurement's type field)."""

    RESERVED = "reserved"
    ARMPIT = "armpit"
    BODY = "body"
    EAR = "ear"
    FINGER = "finger"
    GASTROINTESTINAL_TRACT = "gastrointestinal-tract"
    MOUTH = "mouth"
    RECTUM = "rectum"
    TOE = "toe"
    TYMPANUM = "tympanum"


_TYPES = tuple(TemperatureType)  # index = wire code


def _temperature_type(code: int) -> TemperatureType:
    return _TYPES[code] if code < len(_TYPES) else TemperatureType.RESERVED


@dataclass(frozen=True, slots=True)
class TemperatureMeasurement:
    """One decoded 0x2A1C value, or a 0x2A1E value when ``intermediate`` is True.

    ``temperature`` is the exact FLOAT as sent (read ``to_decimal()``), in ``unit``.
    ``timestamp`` is the thermometer's naive wall clock.
    """

    unit: TemperatureUnit
    temperature: SFloatValue
    timestamp: datetime | None = None
    temperature_type: TemperatureType | None = None
    intermediate: bool = False
    trailing: int = 0


@dataclass(frozen=True, slots=True)
class StaticTemperatureType:
    """0x2A1D: the one site this thermometer measures at, read once."""

    temperature_type: TemperatureType


def _parse(data: bytes, *, intermediate: bool) -> TemperatureMeasurement:
    name = INTERMEDIATE_NAME if intermediate else MEASUREMENT_NAME
    if not data:
        raise ProtocolError(f"{name} is empty")
    flags = data[0]
    if flags & _RESERVED_FLAGS:
        raise ProtocolError(f"{name} flags 0x{flags:02X} set reserved bits 3-7")
    need = 5 + (7 if flags & _TIMESTAMP else 0) + (1 if flags & _TYPE else 0)
    if len(data) < need:
        raise ProtocolError(f"{name} is {len(data)} bytes, flags 0x{flags:02X} need {need}")
    offset = 5
    timestamp = None
    if flags & _TIMESTAMP:
        try:
            timestamp = decode_datetime(data, offset)
        except ProtocolError as exc:
            raise ProtocolError(f"{name} time stamp: {exc}") from None
        offset += 7
    temperature_type = None
    if flags & _TYPE:
        temperature_type = _temperature_type(data[offset])
        offset += 1
    return TemperatureMeasurement(
        unit=TemperatureUnit.FAHRENHEIT if flags & _FAHRENHEIT else TemperatureUnit.CELSIUS,
        temperature=decode_float(data, 1),
        timestamp=timestamp,
        temperature_type=temperature_type,
        intermediate=intermediate,
        trailing=len(data) - offset,
    )


def parse_measurement(data: bytes) -> TemperatureMeasurement:
    """Decode a Temperature Measurement (0x2A1C) value; raises ProtocolError and nothing else."""
    return _parse(bytes(data), intermediate=False)


def parse_intermediate_temperature(data: bytes) -> TemperatureMeasurement:
    """Decode an Intermediate Temperature (0x2A1E) value; same layout and errors."""
    return _parse(bytes(data), intermediate=True)


def encode_measurement(m: TemperatureMeasurement) -> bytes:
    """Encode as a 0x2A1C (or 0x2A1E) value, for the simulated thermometer and tests.

    Round-trips with :func:`parse_measurement`; ``intermediate`` and ``trailing`` are not
    encoded. Raises ValueError when the temperature does not fit a FLOAT or the year does not
    fit a Date Time.
    """
    flags = _FAHRENHEIT if m.unit is TemperatureUnit.FAHRENHEIT else 0
    body = encode_float(m.temperature)
    if m.timestamp is not None:
        flags |= _TIMESTAMP
        body += encode_datetime(m.timestamp)
    if m.temperature_type is not None:
        flags |= _TYPE
        body += bytes((_TYPES.index(m.temperature_type),))
    return bytes((flags,)) + body


def parse_temperature_type(data: bytes) -> StaticTemperatureType:
    """Decode Temperature Type (0x2A1D): one u8 code; ProtocolError when empty."""
    if not data:
        raise ProtocolError("Temperature Type is empty")
    return StaticTemperatureType(_temperature_type(data[0]))


def encode_temperature_type(value: StaticTemperatureType) -> bytes:
    """Encode a Temperature Type (0x2A1D) value."""
    return bytes((_TYPES.index(value.temperature_type),))


class ThermometerSession:
    """The GATT session for a thermometer (Health Thermometer Service 0x1809).

    Reads the fixed temperature type (optional), subscribes to the measurement indications
    and to intermediate temperatures (optional: the live value while the probe settles).
    """

    profile = "thermometer"
    service_uuid = SERVICE

    def __init__(self, *, set_time: bool = True) -> None:
        self._common = CommonCharacteristics(set_time=set_time)

    def on_connected(self, now: datetime) -> list[Action]:
        """Common reads and the clock, the type read, then the two subscriptions."""
        return [
            *self._common.actions(now),
            ReadCharacteristic(TEMPERATURE_TYPE),
            Subscribe(MEASUREMENT),
            Subscribe(INTERMEDIATE_TEMPERATURE, optional=True),
        ]

    def on_value(self, uuid: str, value: bytes) -> list[object]:
        """Decode a measurement, an intermediate temperature, the type or a common value."""
        if uuid == MEASUREMENT:
            return [parse_measurement(value)]
        if uuid == INTERMEDIATE_TEMPERATURE:
            return [parse_intermediate_temperature(value)]
        if uuid == TEMPERATURE_TYPE:
            return [parse_temperature_type(value)]
        if self._common.handles(uuid):
            return self._common.on_value(uuid, value)
        raise ProtocolError(f"a thermometer sent an unexpected characteristic {uuid}")
