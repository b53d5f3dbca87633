"""Weight Measurement (GATT 0x2A9D) and Weight Scale Feature (0x2A9E), sans-I/O.

Wire layout of 0x2A9D (Bluetooth SIG Weight Scale Service 1.0, §3.2; field definitions in the
GATT Specification Supplement; REFERENCE.md), all little-endian:

====  ==================================================  ==================================
size  field                                               present when
====  ==================================================  ==================================
1     flags                                               always
2     weight (u16 × 0.005 kg, or × 0.01 lb if bit 0)      always; 0xFFFF = unsuccessful
7     time stamp (Date Time)                              flags bit 1
1     user id (u8, 0xFF = unknown user)                   flags bit 2
2     BMI (u16 × 0.1 kg/m²)                               flags bit 3
2     height (u16 × 0.001 m, or × 0.1 in if bit 0)        flags bit 3 (with the BMI)
====  ==================================================  ==================================

Flags bit 3 announces the BMI *and* the height together; bits 4-7 are reserved. Some popular
parsers give the height its own bit 4 (REFERENCE.md, "weight flag bit 4"): the specification
does not, so a value setting bit 4 is refused like any other reserved bit.

The scale of the weight and height fields is fixed by the flags alone. The resolutions in
0x2A9E say how finely the scale measures, not how the value is encoded, so they are reported
but never applied to a reading (one independent implementation multiplies by them).

Decisions, as for :mod:`drivers.blood_pressure`: reserved flag bits are refused; bytes after
the flagged fields are counted in ``trailing``; a time stamp of year/month/day 0 is None and
an impossible one is a ProtocolError. 0x2A9E's reserved bits 10-31 are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from drivers.errors import ProtocolError
from drivers.gatt import Action, CommonCharacteristics, ReadCharacteristic, Subscribe, uuid16
from drivers.ieee11073 import decode_datetime, encode_datetime

SERVICE = uuid16(0x181D)
MEASUREMENT = uuid16(0x2A9D)
FEATURE = uuid16(0x2A9E)

MEASUREMENT_NAME = "Weight Measurement"
FEATURE_NAME = "Weight Scale Feature"

_IMPERIAL = 0x01
_TIMESTAMP = 0x02
_USER_ID = 0x04
_BMI_AND_HEIGHT = 0x08
_RESERVED_FLAGS = 0xF0

_UNSUCCESSFUL = 0xFFFF  # Weight field: "measurement unsuccessful"
_UNKNOWN_USER = 0xFF
_U16_MAX = 0xFFFF

# Field resolutions: (SI, imperial).
_WEIGHT_STEP = (Decimal("0.005"), Decimal("0.01"))
_HEIGHT_STEP = (Decimal("0.001"), Decimal("0.1"))
_BMI_STEP = Decimal("0.1")

# Weight Scale Feature resolution codes (WSS §3.1.1): index = code, (kg, lb); 0 = not specified.
_WEIGHT_RESOLUTIONS = (
    None,
    (Decimal("0.5"), Decimal("1")),
    (Decimal("0.2"), Decimal("0.5")),
    (Decimal("0.1"), Decimal("0.2")),
    (Decimal("0.05"), Decimal("0.1")),
    (Decimal("0.02"), Decimal("0.05")),
    (Decimal("0.01"), Decimal("0.02")),
    (Decimal("0.005"), Decimal("0.01")),
)
# Height resolution codes: index = code, (m, in); 0 = not specified.
_HEIGHT_RESOLUTIONS = (
    None,
    (Decimal("0.01"), Decimal("1")),
    (Decimal("0.005"), Decimal("0.5")),
    (Decimal("0.001"), Decimal("0.1")),
)


class WeightUnits(StrEnum):
    """Flags bit 0: SI (kg, m) or imperial (lb, in)."""

    SI = "si"
    IMPERIAL = "imperial"

    @property
    def weight_ucum(self) -> str:
        """The UCUM code of the weight: ``kg`` or ``[lb_av]``."""
        return "kg" if self is WeightUnits.SI else "[lb_av]"

    @property
    def height_ucum(self) -> str:
        """The UCUM code of the height: ``m`` or ``[in_i]``."""
        return "m" if self is WeightUnits.SI else "[in_i]"


@dataclass(frozen=True, slots=True)
class WeightMeasurement:
    """One decoded 0x2A9D value, with exact decimal values in ``units``.

    ``weight`` is None when the scale sent 0xFFFF, "measurement unsuccessful". ``bmi`` (kg/m²)
    and ``height`` are both set or both None. ``user_id`` is None when absent or 0xFF
    (unknown user). ``timestamp`` is the scale's naive wall clock.
    """

    units: WeightUnits
    weight: Decimal | None
    timestamp: datetime | None = None
    user_id: int | None = None
    bmi: Decimal | None = None
    height: Decimal | None = None
    trailing: int = 0


def parse_measurement(data: bytes) -> WeightMeasurement:
    """Decode a Weight Measurement (0x2A9D) value; raises ProtocolError and nothing else."""
    data = bytes(data)
    if not data:
        raise ProtocolError(f"{MEASUREMENT_NAME} is empty")
    flags = data[0]
    if flags & _RESERVED_FLAGS:
        raise ProtocolError(f"{MEASUREMENT_NAME} flags 0x{flags:02X} set reserved bits 4-7")
    need = (
        3
        + (7 if flags & _TIMESTAMP else 0)
        + (1 if flags & _USER_ID else 0)
        + (4 if flags & _BMI_AND_HEIGHT else 0)
    )
    if len(data) < need:
        raise ProtocolError(
            f"{MEASUREMENT_NAME} is {len(data)} bytes, flags 0x{flags:02X} need {need}"
        )
    imperial = int(bool(flags & _IMPERIAL))
    raw_weight = int.from_bytes(data[1:3], "little")
    offset = 3
    timestamp = None
    if flags & _TIMESTAMP:
        try:
            timestamp = decode_datetime(data, offset)
        except ProtocolError as exc:
            raise ProtocolError(f"{MEASUREMENT_NAME} time stamp: {exc}") from None
        offset += 7
    user_id = None
    if flags & _USER_ID:
        user_id = None if data[offset] == _UNKNOWN_USER else data[offset]
        offset += 1
    bmi = height = None
    if flags & _BMI_AND_HEIGHT:
        bmi = int.from_bytes(data[offset : offset + 2], "little") * _BMI_STEP
        height = int.from_bytes(data[offset + 2 : offset + 4], "little") * _HEIGHT_STEP[imperial]
        offset += 4
    return WeightMeasurement(
        units=WeightUnits.IMPERIAL if imperial else WeightUnits.SI,
        weight=None if raw_weight == _UNSUCCESSFUL else raw_weight * _WEIGHT_STEP[imperial],
        timestamp=timestamp,
        user_id=user_id,
        bmi=bmi,
        height=height,
        trailing=len(data) - offset,
    )


def _steps(value: Decimal, step: Decimal, limit: int, field: str) -> bytes:
    count = value / step
    if count != count.to_integral_value() or not 0 <= count <= limit:
        raise ValueError(f"{field} is not a whole number of {step} steps in range")
    return int(count).to_bytes(2, "little")


def encode_measurement(m: WeightMeasurement) -> bytes:
    """Encode as a 0x2A9D value (simulated scale, tests); round-trips with parse_measurement.

    Raises ValueError when a value is not a whole number of its field's steps or does not fit
    (weight up to 0xFFFE steps), when only one of BMI and height is set, or for user id 0xFF.
    """
    imperial = int(m.units is WeightUnits.IMPERIAL)
    flags = _IMPERIAL if imperial else 0
    if m.weight is None:
        body = _UNSUCCESSFUL.to_bytes(2, "little")
    else:
        body = _steps(m.weight, _WEIGHT_STEP[imperial], _UNSUCCESSFUL - 1, "weight")
    if m.timestamp is not None:
        flags |= _TIMESTAMP
        body += encode_datetime(m.timestamp)
    if m.user_id is not None:
        if not 0 <= m.user_id < _UNKNOWN_USER:
            raise ValueError("user id must be 0-254 (0xFF means unknown: use None)")
        flags |= _USER_ID
        body += bytes((m.user_id,))
    if (m.bmi is None) != (m.height is None):
        raise ValueError("BMI and height go together")
    if m.bmi is not None and m.height is not None:
        flags |= _BMI_AND_HEIGHT
        body += _steps(m.bmi, _BMI_STEP, _U16_MAX, "BMI")
        body += _steps(m.height, _HEIGHT_STEP[imperial], _U16_MAX, "height")
    return bytes((flags,)) + body


@dataclass(frozen=True, slots=True)
class WeightScaleFeature:
    """0x2A9E: what the scale supports, and how finely it measures (codes as sent).

    ``weight_resolution`` (bits 3-6) and ``height_resolution`` (bits 7-9) are the wire codes;
    the properties turn them into steps, None for 0 ("not specified") and reserved codes.
    """

    timestamp_supported: bool = False
    multiple_users_supported: bool = False
    bmi_supported: bool = False
    weight_resolution: int = 0
    height_resolution: int = 0
    trailing: int = 0

    def _weight(self, index: int) -> Decimal | None:
        code = self.weight_resolution
        pair = _WEIGHT_RESOLUTIONS[code] if code < len(_WEIGHT_RESOLUTIONS) else None
        return None if pair is None else pair[index]

    def _height(self, index: int) -> Decimal | None:
        code = self.height_resolution
        pair = _HEIGHT_RESOLUTIONS[code] if code < len(_HEIGHT_RESOLUTIONS) else None
        return None if pair is None else pair[index]

    @property
    def weight_resolution_kg(self) -> Decimal | None:
        """The weighing step in kg."""
        return self._weight(0)

    @property
    def weight_resolution_lb(self) -> Decimal | None:
        """The weighing step in lb."""
        return self._weight(1)

    @property
    def height_resolution_m(self) -> Decimal | None:
        """The height step in m."""
        return self._height(0)

    @property
    def height_resolution_in(self) -> Decimal | None:
        """The height step in inches."""
        return self._height(1)


def parse_feature(data: bytes) -> WeightScaleFeature:
    """Decode a Weight Scale Feature (0x2A9E) value (u32); ProtocolError only if short."""
    data = bytes(data)
    if len(data) < 4:
        raise ProtocolError(f"{FEATURE_NAME} is {len(data)} bytes, needs 4")
    bits = int.from_bytes(data[:4], "little")
    return WeightScaleFeature(
        timestamp_supported=bool(bits & 0x01),
        multiple_users_supported=bool(bits & 0x02),
        bmi_supported=bool(bits & 0x04),
        weight_resolution=bits >> 3 & 0x0F,
        height_resolution=bits >> 7 & 0x07,
        trailing=len(data) - 4,
    )


def encode_feature(feature: WeightScaleFeature) -> bytes:
    """Encode as a 0x2A9E value; ValueError for a resolution code that does not fit its bits."""
    if not (0 <= feature.weight_resolution <= 0x0F and 0 <= feature.height_resolution <= 0x07):
        raise ValueError("resolution codes are 4 bits (weight) and 3 bits (height)")
    bits = (
        int(feature.timestamp_supported)
        | int(feature.multiple_users_supported) << 1
        | int(feature.bmi_supported) << 2
        | feature.weight_resolution << 3
        | feature.height_resolution << 7
    )
    return bits.to_bytes(4, "little")


class WeightScaleSession:
    """The GATT session for a weight scale (Weight Scale Service 0x181D).

    Reads the feature (optional: it is mandatory in the service, but a missing one loses
    nothing a reading needs) and subscribes to the measurement indications.
    """

    profile = "weight"
    service_uuid = SERVICE

    def __init__(self, *, set_time: bool = True) -> None:
        self._common = CommonCharacteristics(set_time=set_time)

    def on_connected(self, now: datetime) -> list[Action]:
        """Common reads and the clock, the feature read, then the subscription."""
        return [*self._common.actions(now), ReadCharacteristic(FEATURE), Subscribe(MEASUREMENT)]

    def on_value(self, uuid: str, value: bytes) -> list[object]:
        """Decode a measurement, the feature or a common characteristic."""
        if uuid == MEASUREMENT:
            return [parse_measurement(value)]
        if uuid == FEATURE:
            return [parse_feature(value)]
        if self._common.handles(uuid):
            return self._common.on_value(uuid, value)
        raise ProtocolError(f"a weight scale sent an unexpected characteristic {uuid}")
