"""Blood Pressure Measurement (GATT 0x2A35) and Intermediate Cuff Pressure (0x2A36).

Layout (Bluetooth SIG Blood Pressure Service 1.1, §3.1; REFERENCE.md): flags (u8), then
systolic, diastolic and mean arterial pressure as SFLOAT, then in flag order: timestamp
(b1, 7-byte DateTime), pulse rate (b2, SFLOAT), user id (b3, u8, 0xFF unknown), measurement
status (b4, u16). Flag b0 selects kPa instead of mmHg. Bits 5-7 are reserved: a value that
sets them is refused, because the fields after it could not be located with certainty.
Bytes after the flagged fields are ignored (later versions of the characteristic may append
fields) and counted in ``trailing``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum, StrEnum

from drivers.errors import ProtocolError
from drivers.ieee11073 import SFloatValue, decode_datetime, decode_sfloat, encode_datetime, encode_sfloat

_UNIT_KPA = 0x01
_TIMESTAMP = 0x02
_PULSE = 0x04
_USER = 0x08
_STATUS = 0x10
_RESERVED = 0xE0


class PressureUnit(StrEnum):
    """UCUM codes of the two units the profile allows."""

    MMHG = "mm[Hg]"
    KPA = "kPa"


class PulseRateRange(IntEnum):
    """Measurement status bits 3-4."""

    WITHIN = 0
    EXCEEDS_UPPER = 1
    BELOW_LOWER = 2
    RESERVED = 3


@dataclass(frozen=True, slots=True)
class BloodPressureStatus:
    """Measurement status flags a clinician must see."""

    body_movement: bool
    cuff_too_loose: bool
    irregular_pulse: bool
    pulse_rate_range: PulseRateRange
    improper_position: bool

    @classmethod
    def from_bits(cls, bits: int) -> BloodPressureStatus:
        """Decode the u16 status field."""
        return cls(bool(bits & 1), bool(bits & 2), bool(bits & 4), PulseRateRange((bits >> 3) & 3), bool(bits & 32))

    def to_bits(self) -> int:
        """Encode as the u16 status field."""
        return (int(self.body_movement) | int(self.cuff_too_loose) << 1 | int(self.irregular_pulse) << 2
                | int(self.pulse_rate_range) << 3 | int(self.improper_position) << 5)


@dataclass(frozen=True, slots=True)
class BloodPressureMeasurement:
    """One decoded 0x2A35 (or 0x2A36, with ``intermediate``) value."""

    unit: PressureUnit
    systolic: SFloatValue
    diastolic: SFloatValue
    mean_arterial: SFloatValue
    timestamp: datetime | None = None
    pulse_rate: SFloatValue | None = None
    user_id: int | None = None
    status: BloodPressureStatus | None = None
    intermediate: bool = False
    trailing: int = 0

    @property
    def current_cuff_pressure(self) -> SFloatValue:
        """For 0x2A36: the live cuff pressure (the only meaningful value)."""
        return self.systolic


def _parse(data: bytes, intermediate: bool) -> BloodPressureMeasurement:
    if not data:
        raise ProtocolError("blood pressure value is empty")
    flags = data[0]
    if flags & _RESERVED:
        raise ProtocolError(f"blood pressure flags 0x{flags:02X} set reserved bits")
    need = 7 + 7 * bool(flags & _TIMESTAMP) + 2 * bool(flags & _PULSE) + bool(flags & _USER) + 2 * bool(flags & _STATUS)
    if len(data) < need:
        raise ProtocolError(f"blood pressure value is {len(data)} bytes, flags 0x{flags:02X} need {need}")
    offset = 7
    timestamp = pulse = user = status = None
    if flags & _TIMESTAMP:
        timestamp = decode_datetime(data, offset)
        offset += 7
    if flags & _PULSE:
        pulse = decode_sfloat(data, offset)
        offset += 2
    if flags & _USER:
        user = None if data[offset] == 0xFF else data[offset]
        offset += 1
    if flags & _STATUS:
        status = BloodPressureStatus.from_bits(int.from_bytes(data[offset : offset + 2], "little"))
        offset += 2
    return BloodPressureMeasurement(
        unit=PressureUnit.KPA if flags & _UNIT_KPA else PressureUnit.MMHG,
        systolic=decode_sfloat(data, 1),
        diastolic=decode_sfloat(data, 3),
        mean_arterial=decode_sfloat(data, 5),
        timestamp=timestamp,
        pulse_rate=pulse,
        user_id=user,
        status=status,
        intermediate=intermediate,
        trailing=len(data) - offset,
    )


def parse_measurement(data: bytes) -> BloodPressureMeasurement:
    """Decode a Blood Pressure Measurement (0x2A35); raises :class:`ProtocolError` only."""
    return _parse(bytes(data), intermediate=False)


def parse_intermediate_cuff_pressure(data: bytes) -> BloodPressureMeasurement:
    """Decode an Intermediate Cuff Pressure (0x2A36) notification."""
    return _parse(bytes(data), intermediate=True)


def encode_measurement(m: BloodPressureMeasurement) -> bytes:
    """Encode (the simulated cuff and tests); round-trips with :func:`parse_measurement`."""
    flags = (_UNIT_KPA if m.unit is PressureUnit.KPA else 0)
    body = encode_sfloat(m.systolic) + encode_sfloat(m.diastolic) + encode_sfloat(m.mean_arterial)
    if m.timestamp is not None:
        flags |= _TIMESTAMP
        body += encode_datetime(m.timestamp)
    if m.pulse_rate is not None:
        flags |= _PULSE
        body += encode_sfloat(m.pulse_rate)
    if m.user_id is not None:
        flags |= _USER
        body += bytes((m.user_id,))
    if m.status is not None:
        flags |= _STATUS
        body += m.status.to_bits().to_bytes(2, "little")
    return bytes((flags,)) + body
