"""Blood Pressure Measurement (GATT 0x2A35) and Intermediate Cuff Pressure (0x2A36), sans-I/O.

Wire layout (Bluetooth SIG Blood Pressure Service 1.1, §3.1 and §3.2, field definitions in the
GATT Specification Supplement; REFERENCE.md), all little-endian:

====  ===================================  ======================================
size  field                                present when
====  ===================================  ======================================
1     flags                                always
2     systolic (SFLOAT)                    always
2     diastolic (SFLOAT)                   always
2     mean arterial pressure (SFLOAT)      always
7     time stamp (Date Time)               flags bit 1
2     pulse rate (SFLOAT, beats/min)       flags bit 2
1     user id (u8, 0xFF = unknown user)    flags bit 3
2     measurement status (u16)             flags bit 4
====  ===================================  ======================================

Flags bit 0 selects kPa instead of mmHg for the three pressures. 0x2A36 has the same layout,
but only the first pressure means anything: the live cuff pressure during inflation. The
other two are unused there (cuffs send NaN, or 0 as in Nordic's test vectors); they are kept
as sent and never interpreted.

Decisions (documented here because the specification leaves them to the receiver):

* Flags bits 5-7 are reserved. A value that sets them is refused with ProtocolError, because
  a future field announced by such a bit would sit at an offset we cannot know.
* Bytes after the last flagged field are ignored and counted in ``trailing``: GATT values
  may be extended at their end by later versions of a characteristic, and refusing them would
  lose a valid reading from a newer cuff.
* Measurement status bits 6-15 are reserved for future use and ignored.
* A time stamp whose year, month or day is 0 ("not known") becomes None; one that is not a
  real date or time (month 13, hour 24) makes the whole value a ProtocolError, since a stored
  reading with a wrong time must not be mistaken for a new one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from drivers.errors import ProtocolError
from drivers.gatt import Action, CommonCharacteristics, Subscribe, uuid16
from drivers.ieee11073 import (
    SFloatValue,
    decode_datetime,
    decode_sfloat,
    encode_datetime,
    encode_sfloat,
)

# Flags field (BPS §3.1; GATT Specification Supplement, Blood Pressure Measurement).
_UNIT_KPA = 0x01
_TIMESTAMP = 0x02
_PULSE_RATE = 0x04
_USER_ID = 0x08
_STATUS = 0x10
_RESERVED_FLAGS = 0xE0

_FIXED_SIZE = 7  # flags + three SFLOAT pressures
_DATETIME_SIZE = 7
_UNKNOWN_USER = 0xFF  # User ID field: 0xFF is "unknown user"

SERVICE = uuid16(0x1810)
MEASUREMENT = uuid16(0x2A35)
INTERMEDIATE_CUFF_PRESSURE = uuid16(0x2A36)

MEASUREMENT_NAME = "Blood Pressure Measurement"
INTERMEDIATE_NAME = "Intermediate Cuff Pressure"


class PressureUnit(StrEnum):
    """The unit of the pressures, as the UCUM code FHIR expects (flags bit 0)."""

    MMHG = "mm[Hg]"
    KPA = "kPa"


class PulseRateRange(StrEnum):
    """Measurement status bits 3-4: the pulse rate against the cuff's own limits."""

    WITHIN = "within-range"  # 0
    EXCEEDS_UPPER = "exceeds-upper-limit"  # 1
    BELOW_LOWER = "below-lower-limit"  # 2
    RESERVED = "reserved"  # 3, reserved for future use


# Index = the two-bit wire code.
_PULSE_RATE_RANGES = (
    PulseRateRange.WITHIN,
    PulseRateRange.EXCEEDS_UPPER,
    PulseRateRange.BELOW_LOWER,
    PulseRateRange.RESERVED,
)


@dataclass(frozen=True, slots=True)
class BloodPressureStatus:
    """The measurement status field (flags bit 4): conditions a clinician must see."""

    body_movement: bool  # bit 0
    cuff_too_loose: bool  # bit 1
    irregular_pulse: bool  # bit 2
    pulse_rate_range: PulseRateRange  # bits 3-4
    improper_position: bool  # bit 5

    @classmethod
    def from_bits(cls, bits: int) -> BloodPressureStatus:
        """Decode the u16 status field; the reserved bits 6-15 are ignored."""
        return cls(
            body_movement=bool(bits & 0x01),
            cuff_too_loose=bool(bits & 0x02),
            irregular_pulse=bool(bits & 0x04),
            pulse_rate_range=_PULSE_RATE_RANGES[(bits >> 3) & 0x03],
            improper_position=bool(bits & 0x20),
        )

    def to_bits(self) -> int:
        """Encode as the u16 status field (reserved bits 0)."""
        return (
            int(self.body_movement)
            | int(self.cuff_too_loose) << 1
            | int(self.irregular_pulse) << 2
            | _PULSE_RATE_RANGES.index(self.pulse_rate_range) << 3
            | int(self.improper_position) << 5
        )


@dataclass(frozen=True, slots=True)
class BloodPressureMeasurement:
    """One decoded 0x2A35 value, or a 0x2A36 value when ``intermediate`` is True.

    ``timestamp`` is the cuff's naive wall-clock time (see
    :func:`drivers.ieee11073.decode_datetime`); the caller attaches the zone. ``user_id`` is
    None both when absent and when the cuff sent 0xFF, "unknown user". ``trailing`` counts
    ignored bytes after the flagged fields (see the module docstring).
    """

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
        """For 0x2A36, the live cuff pressure: the first pressure field, the only meaningful one."""
        return self.systolic


def _expected_size(flags: int) -> int:
    return (
        _FIXED_SIZE
        + (_DATETIME_SIZE if flags & _TIMESTAMP else 0)
        + (2 if flags & _PULSE_RATE else 0)
        + (1 if flags & _USER_ID else 0)
        + (2 if flags & _STATUS else 0)
    )


def _parse(data: bytes, *, intermediate: bool) -> BloodPressureMeasurement:
    name = INTERMEDIATE_NAME if intermediate else MEASUREMENT_NAME
    if not data:
        raise ProtocolError(f"{name} is empty")
    flags = data[0]
    if flags & _RESERVED_FLAGS:
        raise ProtocolError(f"{name} flags 0x{flags:02X} set reserved bits 5-7")
    need = _expected_size(flags)
    if len(data) < need:
        raise ProtocolError(f"{name} is {len(data)} bytes, flags 0x{flags:02X} need {need}")
    # From here every read is in bounds: the length was checked against the flags.
    offset = _FIXED_SIZE
    timestamp = None
    if flags & _TIMESTAMP:
        try:
            timestamp = decode_datetime(data, offset)
        except ProtocolError as exc:
            raise ProtocolError(f"{name} time stamp: {exc}") from None
        offset += _DATETIME_SIZE
    pulse_rate = None
    if flags & _PULSE_RATE:
        pulse_rate = decode_sfloat(data, offset)
        offset += 2
    user_id = None
    if flags & _USER_ID:
        user_id = None if data[offset] == _UNKNOWN_USER else data[offset]
        offset += 1
    status = None
    if flags & _STATUS:
        status = BloodPressureStatus.from_bits(int.from_bytes(data[offset : offset + 2], "little"))
        offset += 2
    return BloodPressureMeasurement(
        unit=PressureUnit.KPA if flags & _UNIT_KPA else PressureUnit.MMHG,
        systolic=decode_sfloat(data, 1),
        diastolic=decode_sfloat(data, 3),
        mean_arterial=decode_sfloat(data, 5),
        timestamp=timestamp,
        pulse_rate=pulse_rate,
        user_id=user_id,
        status=status,
        intermediate=intermediate,
        trailing=len(data) - offset,
    )


def parse_measurement(data: bytes) -> BloodPressureMeasurement:
    """Decode a Blood Pressure Measurement (0x2A35) value.

    Raises :class:`~drivers.errors.ProtocolError`, and nothing else, when the value is short
    for its flags, sets reserved flag bits or carries an impossible time stamp.
    """
    return _parse(bytes(data), intermediate=False)


def parse_intermediate_cuff_pressure(data: bytes) -> BloodPressureMeasurement:
    """Decode an Intermediate Cuff Pressure (0x2A36) value; read ``current_cuff_pressure``.

    Same layout and the same errors as :func:`parse_measurement`.
    """
    return _parse(bytes(data), intermediate=True)


def encode_measurement(measurement: BloodPressureMeasurement) -> bytes:
    """Encode as a 0x2A35 (or, same layout, 0x2A36) value, for the simulated cuff and tests.

    Round-trips with :func:`parse_measurement`: flags are derived from which optional fields
    are set. ``intermediate`` and ``trailing`` are not encoded. Raises ValueError when a value
    does not fit its field (an SFLOAT, a user id outside 0-254, a year outside 1582-9999).
    """
    m = measurement
    flags = _UNIT_KPA if m.unit is PressureUnit.KPA else 0
    body = encode_sfloat(m.systolic) + encode_sfloat(m.diastolic) + encode_sfloat(m.mean_arterial)
    if m.timestamp is not None:
        flags |= _TIMESTAMP
        body += encode_datetime(m.timestamp)
    if m.pulse_rate is not None:
        flags |= _PULSE_RATE
        body += encode_sfloat(m.pulse_rate)
    if m.user_id is not None:
        if not 0 <= m.user_id < _UNKNOWN_USER:
            raise ValueError("user id must be 0-254 (0xFF means unknown: use None)")
        flags |= _USER_ID
        body += bytes((m.user_id,))
    if m.status is not None:
        flags |= _STATUS
        body += m.status.to_bits().to_bytes(2, "little")
    return bytes((flags,)) + body


class BloodPressureSession:
    """The GATT session for a blood-pressure cuff (Blood Pressure Service 0x1810).

    Subscribes to the measurement indications (required) and to intermediate cuff pressure
    notifications (optional: shown live on the kiosk while the cuff inflates).
    """

    profile = "blood_pressure"
    service_uuid = SERVICE

    def __init__(self, *, set_time: bool = True) -> None:
        self._common = CommonCharacteristics(set_time=set_time)

    def on_connected(self, now: datetime) -> list[Action]:
        """Common reads and the clock, then the two subscriptions."""
        return [
            *self._common.actions(now),
            Subscribe(MEASUREMENT),
            Subscribe(INTERMEDIATE_CUFF_PRESSURE, optional=True),
        ]

    def on_value(self, uuid: str, value: bytes) -> list[object]:
        """Decode a measurement, a live cuff pressure or a common characteristic."""
        if uuid == MEASUREMENT:
            return [parse_measurement(value)]
        if uuid == INTERMEDIATE_CUFF_PRESSURE:
            return [parse_intermediate_cuff_pressure(value)]
        if self._common.handles(uuid):
            return self._common.on_value(uuid, value)
        raise ProtocolError(f"a blood-pressure cuff sent an unexpected characteristic {uuid}")
