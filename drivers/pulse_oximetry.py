"""PLX Spot-Check (GATT 0x2A5E), PLX Continuous (0x2A5F) and PLX Features (0x2A60), sans-I/O.

Wire layouts (Bluetooth SIG Pulse Oximeter Service 1.0.1, §3.1-§3.3; field definitions in the
GATT Specification Supplement; REFERENCE.md), all little-endian, SpO2 in % and pulse rate in
beats/min as SFLOAT:

0x2A5E: flags; SpO2, PR; then by flags bit: 0 time stamp (Date Time), 1 measurement status
(u16), 2 device and sensor status (u24), 3 pulse amplitude index (SFLOAT, %). Bit 4 carries no
field: "device clock is not set", so the time stamp must not be trusted.

0x2A5F: flags; SpO2, PR (normal); then by flags bit: 0 SpO2, PR fast, 1 SpO2, PR slow, 2
measurement status (u16), 3 device and sensor status (u24), 4 pulse amplitude index (SFLOAT).

0x2A60: supported features (u16); measurement status support (u16) if bit 0; device and sensor
status support (u24) if bit 1.

Every status bit is a boolean field (field order is bit order), so the FHIR layer can carry
"questionable" or "invalid" measurements and an unset device clock into the Observation.

Decisions, as for :mod:`drivers.blood_pressure`: flags bits 5-7 are reserved and refused;
bytes after the flagged fields are counted in ``trailing``; reserved status bits (measurement
status 0-4, device and sensor status 16-23) and feature bits 8-15 are ignored; a time stamp of
year/month/day 0 is None and an impossible one is a ProtocolError.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, fields
from datetime import datetime
from typing import TypeVar

from drivers.errors import ProtocolError
from drivers.gatt import Action, CommonCharacteristics, ReadCharacteristic, Subscribe, uuid16
from drivers.ieee11073 import (
    SFloatValue,
    decode_datetime,
    decode_sfloat,
    encode_datetime,
    encode_sfloat,
)

SERVICE = uuid16(0x1822)
SPOT_CHECK = uuid16(0x2A5E)
CONTINUOUS = uuid16(0x2A5F)
FEATURES = uuid16(0x2A60)

SPOT_CHECK_NAME = "PLX Spot-Check Measurement"
CONTINUOUS_NAME = "PLX Continuous Measurement"
FEATURES_NAME = "PLX Features"

_RESERVED_FLAGS = 0xE0
_MEASUREMENT_STATUS_FIRST_BIT = 5  # bits 0-4 are reserved

_T = TypeVar("_T", "MeasurementStatus", "DeviceAndSensorStatus")


def _from_bits(cls: type[_T], bits: int, first: int) -> _T:
    # Field order is bit order, from ``first``; other (reserved) bits are ignored.
    return cls(*(bits >> (first + i) & 1 == 1 for i in range(len(fields(cls)))))


def _to_bits(status: MeasurementStatus | DeviceAndSensorStatus, first: int) -> int:
    return sum(int(getattr(status, f.name)) << (first + i) for i, f in enumerate(fields(status)))


@dataclass(frozen=True, slots=True)
class MeasurementStatus:
    """Measurement status (u16); the fields are bits 5-15."""

    measurement_ongoing: bool = False
    early_estimated_data: bool = False
    validated_data: bool = False
    fully_qualified_data: bool = False
    data_from_measurement_storage: bool = False
    data_for_demonstration: bool = False
    data_for_testing: bool = False
    calibration_ongoing: bool = False
    measurement_unavailable: bool = False
    questionable_measurement: bool = False
    invalid_measurement: bool = False

    @classmethod
    def from_bits(cls, bits: int) -> MeasurementStatus:
        """Decode the u16 field; the reserved bits 0-4 are ignored."""
        return _from_bits(cls, bits, _MEASUREMENT_STATUS_FIRST_BIT)

    def to_bits(self) -> int:
        """Encode as the u16 field (reserved bits 0)."""
        return _to_bits(self, _MEASUREMENT_STATUS_FIRST_BIT)


@dataclass(frozen=True, slots=True)
class DeviceAndSensorStatus:
    """Device and sensor status (u24); the fields are bits 0-15."""

    extended_display_update_ongoing: bool = False
    equipment_malfunction: bool = False
    signal_processing_irregularity: bool = False
    inadequate_signal: bool = False
    poor_signal: bool = False
    low_perfusion: bool = False
    erratic_signal: bool = False
    nonpulsatile_signal: bool = False
    questionable_pulse: bool = False
    signal_analysis_ongoing: bool = False
    sensor_interference: bool = False
    sensor_unconnected_to_user: bool = False
    unknown_sensor_connected: bool = False
    sensor_displaced: bool = False
    sensor_malfunctioning: bool = False
    sensor_disconnected: bool = False

    @classmethod
    def from_bits(cls, bits: int) -> DeviceAndSensorStatus:
        """Decode the u24 field; the reserved bits 16-23 are ignored."""
        return _from_bits(cls, bits, 0)

    def to_bits(self) -> int:
        """Encode as the u24 field (reserved bits 0)."""
        return _to_bits(self, 0)


@dataclass(frozen=True, slots=True)
class SpO2PulseRate:
    """An SpO2 (%) and pulse rate (beats/min) pair, exact as sent."""

    spo2: SFloatValue
    pulse_rate: SFloatValue


@dataclass(frozen=True, slots=True)
class SpotCheckMeasurement:
    """One decoded 0x2A5E value; ``timestamp`` is the oximeter's naive wall clock, untrusted
    when ``device_clock_not_set``."""

    spo2: SFloatValue
    pulse_rate: SFloatValue
    timestamp: datetime | None = None
    measurement_status: MeasurementStatus | None = None
    device_status: DeviceAndSensorStatus | None = None
    pulse_amplitude_index: SFloatValue | None = None
    device_clock_not_set: bool = False
    trailing: int = 0


@dataclass(frozen=True, slots=True)
class ContinuousMeasurement:
    """One decoded 0x2A5F value: the normal SpO2/PR and, when sent, the fast and slow ones."""

    spo2: SFloatValue
    pulse_rate: SFloatValue
    fast: SpO2PulseRate | None = None
    slow: SpO2PulseRate | None = None
    measurement_status: MeasurementStatus | None = None
    device_status: DeviceAndSensorStatus | None = None
    pulse_amplitude_index: SFloatValue | None = None
    trailing: int = 0


@dataclass(frozen=True, slots=True)
class PlxFeatures:
    """0x2A60: the optional fields and status bits this oximeter supports.

    ``measurement_status_support`` and ``device_status_support`` mark the supported bits (a
    True field = that bit is supported); None when the oximeter supports no status field.
    """

    measurement_status_support: MeasurementStatus | None = None
    device_status_support: DeviceAndSensorStatus | None = None
    spot_check_storage: bool = False
    spot_check_timestamp: bool = False
    spo2pr_fast: bool = False
    spo2pr_slow: bool = False
    pulse_amplitude_index: bool = False
    multiple_bonds: bool = False
    trailing: int = 0


class _Reader:
    """Bounds-checked once up front by the caller, then read in wire order."""

    def __init__(self, data: bytes, offset: int) -> None:
        self.data, self.offset = data, offset

    def sfloat(self) -> SFloatValue:
        value = decode_sfloat(self.data, self.offset)
        self.offset += 2
        return value

    def uint(self, size: int) -> int:
        value = int.from_bytes(self.data[self.offset : self.offset + size], "little")
        self.offset += size
        return value


def _check(data: bytes, name: str, reserved: int, need: int) -> int:
    if not data:
        raise ProtocolError(f"{name} is empty")
    flags = data[0]
    if flags & reserved:
        raise ProtocolError(f"{name} flags 0x{flags:02X} set reserved bits 5-7")
    if len(data) < need:
        raise ProtocolError(f"{name} is {len(data)} bytes, flags 0x{flags:02X} need {need}")
    return flags


def _size(flags: int, sizes: tuple[int, ...]) -> int:
    return sum(size for bit, size in enumerate(sizes) if flags >> bit & 1)


def parse_spot_check(data: bytes) -> SpotCheckMeasurement:
    """Decode a PLX Spot-Check Measurement (0x2A5E) value; raises ProtocolError only."""
    data = bytes(data)
    flags = data[0] if data else 0
    flags = _check(data, SPOT_CHECK_NAME, _RESERVED_FLAGS, 5 + _size(flags, (7, 2, 3, 2)))
    read = _Reader(data, 1)
    spo2, pulse_rate = read.sfloat(), read.sfloat()
    timestamp = None
    if flags & 0x01:
        try:
            timestamp = decode_datetime(data, read.offset)
        except ProtocolError as exc:
            raise ProtocolError(f"{SPOT_CHECK_NAME} time stamp: {exc}") from None
        read.offset += 7
    status = MeasurementStatus.from_bits(read.uint(2)) if flags & 0x02 else None
    device = DeviceAndSensorStatus.from_bits(read.uint(3)) if flags & 0x04 else None
    pai = read.sfloat() if flags & 0x08 else None
    return SpotCheckMeasurement(
        spo2,
        pulse_rate,
        timestamp,
        status,
        device,
        pai,
        bool(flags & 0x10),
        len(data) - read.offset,
    )


def encode_spot_check(m: SpotCheckMeasurement) -> bytes:
    """Encode as a 0x2A5E value; round-trips with :func:`parse_spot_check` (not ``trailing``).

    Raises ValueError when a value does not fit its SFLOAT or the year a Date Time.
    """
    flags = 0x10 if m.device_clock_not_set else 0
    body = encode_sfloat(m.spo2) + encode_sfloat(m.pulse_rate)
    if m.timestamp is not None:
        flags |= 0x01
        body += encode_datetime(m.timestamp)
    if m.measurement_status is not None:
        flags |= 0x02
        body += m.measurement_status.to_bits().to_bytes(2, "little")
    if m.device_status is not None:
        flags |= 0x04
        body += m.device_status.to_bits().to_bytes(3, "little")
    if m.pulse_amplitude_index is not None:
        flags |= 0x08
        body += encode_sfloat(m.pulse_amplitude_index)
    return bytes((flags,)) + body


def parse_continuous(data: bytes) -> ContinuousMeasurement:
    """Decode a PLX Continuous Measurement (0x2A5F) value; raises ProtocolError only."""
    data = bytes(data)
    flags = data[0] if data else 0
    flags = _check(data, CONTINUOUS_NAME, _RESERVED_FLAGS, 5 + _size(flags, (4, 4, 2, 3, 2)))
    read = _Reader(data, 1)
    spo2, pulse_rate = read.sfloat(), read.sfloat()
    fast = SpO2PulseRate(read.sfloat(), read.sfloat()) if flags & 0x01 else None
    slow = SpO2PulseRate(read.sfloat(), read.sfloat()) if flags & 0x02 else None
    status = MeasurementStatus.from_bits(read.uint(2)) if flags & 0x04 else None
    device = DeviceAndSensorStatus.from_bits(read.uint(3)) if flags & 0x08 else None
    pai = read.sfloat() if flags & 0x10 else None
    return ContinuousMeasurement(
        spo2, pulse_rate, fast, slow, status, device, pai, len(data) - read.offset
    )


def encode_continuous(m: ContinuousMeasurement) -> bytes:
    """Encode as a 0x2A5F value; round-trips with :func:`parse_continuous` (not ``trailing``)."""
    flags = 0
    body = encode_sfloat(m.spo2) + encode_sfloat(m.pulse_rate)
    for bit, pair in ((0x01, m.fast), (0x02, m.slow)):
        if pair is not None:
            flags |= bit
            body += encode_sfloat(pair.spo2) + encode_sfloat(pair.pulse_rate)
    if m.measurement_status is not None:
        flags |= 0x04
        body += m.measurement_status.to_bits().to_bytes(2, "little")
    if m.device_status is not None:
        flags |= 0x08
        body += m.device_status.to_bits().to_bytes(3, "little")
    if m.pulse_amplitude_index is not None:
        flags |= 0x10
        body += encode_sfloat(m.pulse_amplitude_index)
    return bytes((flags,)) + body


def parse_features(data: bytes) -> PlxFeatures:
    """Decode PLX Features (0x2A60); ProtocolError when short for its support bits."""
    data = bytes(data)
    if len(data) < 2:
        raise ProtocolError(f"{FEATURES_NAME} is {len(data)} bytes, needs 2")
    bits = int.from_bytes(data[:2], "little")
    need = 2 + _size(bits, (2, 3))
    if len(data) < need:
        raise ProtocolError(f"{FEATURES_NAME} is {len(data)} bytes, bits 0x{bits:04X} need {need}")
    read = _Reader(data, 2)
    status = MeasurementStatus.from_bits(read.uint(2)) if bits & 0x01 else None
    device = DeviceAndSensorStatus.from_bits(read.uint(3)) if bits & 0x02 else None
    return PlxFeatures(
        measurement_status_support=status,
        device_status_support=device,
        spot_check_storage=bool(bits & 0x04),
        spot_check_timestamp=bool(bits & 0x08),
        spo2pr_fast=bool(bits & 0x10),
        spo2pr_slow=bool(bits & 0x20),
        pulse_amplitude_index=bool(bits & 0x40),
        multiple_bonds=bool(bits & 0x80),
        trailing=len(data) - read.offset,
    )


def encode_features(f: PlxFeatures) -> bytes:
    """Encode as a 0x2A60 value; round-trips with :func:`parse_features` (not ``trailing``)."""
    flags = (
        f.spot_check_storage,
        f.spot_check_timestamp,
        f.spo2pr_fast,
        f.spo2pr_slow,
        f.pulse_amplitude_index,
        f.multiple_bonds,
    )
    bits = sum(int(flag) << (bit + 2) for bit, flag in enumerate(flags))
    body = b""
    if f.measurement_status_support is not None:
        bits |= 0x01
        body += f.measurement_status_support.to_bits().to_bytes(2, "little")
    if f.device_status_support is not None:
        bits |= 0x02
        body += f.device_status_support.to_bits().to_bytes(3, "little")
    return bits.to_bytes(2, "little") + body


class PulseOximeterSession:
    """The GATT session for a pulse oximeter (Pulse Oximeter Service 0x1822).

    Reads the features (optional) and subscribes to spot-check indications and continuous
    notifications, each optional, because the service requires at least one of the two but
    not a particular one. :class:`~drivers.gatt.Subscribe` cannot say "one of these", so the
    session states it as data: :attr:`requires_one_of` lists the alternatives and
    :meth:`has_measurement` tells the transport, after service discovery, whether the
    connection is usable (if not, it treats it as a missing required characteristic).
    """

    profile = "pulse_oximetry"
    service_uuid = SERVICE
    requires_one_of: frozenset[str] = frozenset({SPOT_CHECK, CONTINUOUS})

    def __init__(self, *, set_time: bool = True) -> None:
        self._common = CommonCharacteristics(set_time=set_time)

    def has_measurement(self, discovered: Collection[str]) -> bool:
        """Whether the discovered characteristic UUIDs include a measurement to subscribe to."""
        return not self.requires_one_of.isdisjoint(discovered)

    def on_connected(self, now: datetime) -> list[Action]:
        """Common reads and the clock, the features read, then the two subscriptions."""
        return [
            *self._common.actions(now),
            ReadCharacteristic(FEATURES),
            Subscribe(SPOT_CHECK, optional=True),
            Subscribe(CONTINUOUS, optional=True),
        ]

    def on_value(self, uuid: str, value: bytes) -> list[object]:
        """Decode a spot check, a continuous value, the features or a common characteristic."""
        if uuid == SPOT_CHECK:
            return [parse_spot_check(value)]
        if uuid == CONTINUOUS:
            return [parse_continuous(value)]
        if uuid == FEATURES:
            return [parse_features(value)]
        if self._common.handles(uuid):
            return self._common.on_value(uuid, value)
        raise ProtocolError(f"a pulse oximeter sent an unexpected characteristic {uuid}")
