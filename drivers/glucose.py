"""Glucose Measurement (0x2A18), Measurement Context (0x2A34), the Record Access Control Point
(0x2A52) and the session that fetches a meter's new stored records, sans-I/O.

Wire layout of 0x2A18 (Bluetooth SIG Glucose Service 1.0.1, §3.1; field definitions in the
GATT Specification Supplement; REFERENCE.md), all little-endian:

====  ==============================================  ======================================
size  field                                           present when
====  ==============================================  ======================================
1     flags                                           always
2     sequence number (u16)                           always
7     base time (Date Time)                           always
2     time offset (s16, minutes)                      flags bit 0
2     concentration (SFLOAT; kg/L, or mol/L if b2)    flags bit 1
1     type (LOW nibble) and sample location (HIGH)    flags bit 1
2     sensor status annunciation (u16)                flags bit 3
====  ==============================================  ======================================

Flags bit 4 says a 0x2A34 context with the same sequence number follows. The type is the low
nibble of the type/location byte, as the specification says; some popular parsers swap them.

0x2A34: flags, sequence number (u16), then by flags bit: 7 extended flags (u8, first), 0
carbohydrate id (u8) + carbohydrate (SFLOAT, kg), 1 meal (u8), 2 tester (LOW nibble) / health
(HIGH nibble), 3 exercise duration (u16 s, 0xFFFF = overrun) + intensity (u8 %), 4 medication
id (u8) + medication (SFLOAT, kg, or litres if bit 5), 6 HbA1c (SFLOAT, %).

Decisions, as for :mod:`drivers.blood_pressure`: reserved flag bits are refused (a field they
announce would shift the known ones); bytes after the flagged fields are counted in
``trailing``; status bits 12-15 are ignored; a base time of year/month/day 0 is None, and an
impossible one, or an offset that moves it outside 1582-9999, is a ProtocolError. Codes the
specification reserves decode to a ``RESERVED`` member, which encodes as 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import TypeVar

from drivers.errors import ProtocolError
from drivers.gatt import Action, CommonCharacteristics, Subscribe, WriteCharacteristic, uuid16
from drivers.ieee11073 import (
    SFloatValue,
    decode_datetime,
    decode_sfloat,
    encode_datetime,
    encode_sfloat,
)
from drivers.record_access import (
    RacpOpCode,
    RacpOperator,
    RacpRequest,
    RacpResponseCode,
    StoredRecordCount,
    encode_racp_request,
    parse_racp_response,
)

SERVICE = uuid16(0x1808)
MEASUREMENT = uuid16(0x2A18)
MEASUREMENT_CONTEXT = uuid16(0x2A34)
RECORD_ACCESS_CONTROL_POINT = uuid16(0x2A52)

MEASUREMENT_NAME = "Glucose Measurement"
CONTEXT_NAME = "Glucose Measurement Context"

# Measurement flags (GLS §3.1.1).
_TIME_OFFSET = 0x01
_CONCENTRATION = 0x02
_UNIT_MOL_PER_L = 0x04
_STATUS = 0x08
_CONTEXT_FOLLOWS = 0x10
_RESERVED_FLAGS = 0xE0
_FIXED_SIZE = 10  # flags, sequence number, base time

# Context flags (GLS §3.2.1).
_CARBOHYDRATE = 0x01
_MEAL = 0x02
_TESTER_HEALTH = 0x04
_EXERCISE = 0x08
_MEDICATION = 0x10
_MEDICATION_LITRES = 0x20
_HBA1C = 0x40
_EXTENDED_FLAGS = 0x80
_CONTEXT_SIZES = ((0x80, 1), (0x01, 3), (0x02, 1), (0x04, 1), (0x08, 3), (0x10, 3), (0x40, 2))

_SEQUENCE_MAX = 0xFFFF
_YEAR_MIN = 1582  # Date Time range (GATT Specification Supplement)
_HALF_SEQUENCE_SPACE = 0x8000  # serial-number arithmetic (RFC 1982) over u16


class GlucoseUnit(StrEnum):
    """Concentration unit as sent (flags bit 2), as a UCUM code."""

    KG_PER_L = "kg/L"
    MOL_PER_L = "mol/L"


class SampleType(StrEnum):
    """Type nibble (LOW nibble of the type/location byte)."""

    RESERVED = "reserved"
    CAPILLARY_WHOLE_BLOOD = "capillary-whole-blood"
    CAPILLARY_PLASMA = "capillary-plasma"
    VENOUS_WHOLE_BLOOD = "venous-whole-blood"
    VENOUS_PLASMA = "venous-plasma"
    ARTERIAL_WHOLE_BLOOD = "arterial-whole-blood"
    ARTERIAL_PLASMA = "arterial-plasma"
    UNDETERMINED_WHOLE_BLOOD = "undetermined-whole-blood"
    UNDETERMINED_PLASMA = "undetermined-plasma"
    INTERSTITIAL_FLUID = "interstitial-fluid"
    CONTROL_SOLUTION = "control-solution"


class SampleLocation(StrEnum):
    """Sample location nibble (HIGH nibble of the type/location byte)."""

    RESERVED = "reserved"
    FINGER = "finger"
    ALTERNATE_SITE = "alternate-site-test"
    EARLOBE = "earlobe"
    CONTROL_SOLUTION = "control-solution"
    NOT_AVAILABLE = "not-available"


class Carbohydrate(StrEnum):
    """Context carbohydrate id."""

    RESERVED = "reserved"
    BREAKFAST = "breakfast"
    LUNCH = "lunch"
    DINNER = "dinner"
    SNACK = "snack"
    DRINK = "drink"
    SUPPER = "supper"
    BRUNCH = "brunch"


class Meal(StrEnum):
    """Context meal."""

    RESERVED = "reserved"
    PREPRANDIAL = "preprandial"
    POSTPRANDIAL = "postprandial"
    FASTING = "fasting"
    CASUAL = "casual"
    BEDTIME = "bedtime"


class Tester(StrEnum):
    """Context tester (LOW nibble of the tester/health byte)."""

    RESERVED = "reserved"
    SELF = "self"
    HEALTH_CARE_PROFESSIONAL = "health-care-professional"
    LAB_TEST = "lab-test"
    NOT_AVAILABLE = "not-available"


class Health(StrEnum):
    """Context health (HIGH nibble of the tester/health byte)."""

    RESERVED = "reserved"
    MINOR_ISSUES = "minor-health-issues"
    MAJOR_ISSUES = "major-health-issues"
    DURING_MENSES = "during-menses"
    UNDER_STRESS = "under-stress"
    NO_ISSUES = "no-health-issues"
    NOT_AVAILABLE = "not-available"


class Medication(StrEnum):
    """Context medication id."""

    RESERVED = "reserved"
    RAPID_ACTING_INSULIN = "rapid-acting-insulin"
    SHORT_ACTING_INSULIN = "short-acting-insulin"
    INTERMEDIATE_ACTING_INSULIN = "intermediate-acting-insulin"
    LONG_ACTING_INSULIN = "long-acting-insulin"
    PRE_MIXED_INSULIN = "pre-mixed-insulin"


_E = TypeVar("_E", bound=StrEnum)
# Index = wire code; index 0 is RESERVED, which is also what reserved codes decode to.
_TYPES = tuple(SampleType)
_LOCATIONS = (
    *tuple(SampleLocation)[:5],
    *(SampleLocation.RESERVED,) * 10,
    SampleLocation.NOT_AVAILABLE,
)
_CARBOHYDRATES = tuple(Carbohydrate)
_MEALS = tuple(Meal)
_TESTERS = (*tuple(Tester)[:4], *(Tester.RESERVED,) * 11, Tester.NOT_AVAILABLE)
_HEALTHS = (*tuple(Health)[:6], *(Health.RESERVED,) * 9, Health.NOT_AVAILABLE)
_MEDICATIONS = tuple(Medication)


def _lookup(table: tuple[_E, ...], code: int) -> _E:
    return table[code] if code < len(table) else table[0]


@dataclass(frozen=True, slots=True)
class GlucoseSensorStatus:
    """Sensor status annunciation (flags bit 3); field order is bit order, 0-11."""

    device_battery_low: bool = False
    sensor_malfunction: bool = False
    sample_size_insufficient: bool = False
    strip_insertion_error: bool = False
    strip_type_incorrect: bool = False
    result_too_high: bool = False
    result_too_low: bool = False
    temperature_too_high: bool = False
    temperature_too_low: bool = False
    read_interrupted: bool = False
    general_device_fault: bool = False
    time_fault: bool = False

    @classmethod
    def from_bits(cls, bits: int) -> GlucoseSensorStatus:
        """Decode the u16 field; the reserved bits 12-15 are ignored."""
        return cls(*(bool(bits >> i & 1) for i in range(len(fields(cls)))))

    def to_bits(self) -> int:
        """Encode as the u16 field (reserved bits 0)."""
        return sum(int(getattr(self, f.name)) << i for i, f in enumerate(fields(self)))


@dataclass(frozen=True, slots=True)
class GlucoseMeasurement:
    """One decoded 0x2A18 record.

    ``base_time`` is the meter's naive wall clock (None when sent as "not known") and
    ``time_offset`` the minutes to add to it (None when absent); read :attr:`time`.
    ``unit``, ``sample_type`` and ``sample_location`` are None exactly when ``concentration``
    is. Convert with :func:`to_clinical_units`.
    """

    sequence_number: int
    base_time: datetime | None
    time_offset: int | None = None
    concentration: SFloatValue | None = None
    unit: GlucoseUnit | None = None
    sample_type: SampleType | None = None
    sample_location: SampleLocation | None = None
    status: GlucoseSensorStatus | None = None
    context_follows: bool = False
    trailing: int = 0

    @property
    def time(self) -> datetime | None:
        """The effective time of the reading: base time plus offset (naive, meter clock)."""
        if self.base_time is None:
            return None
        return self.base_time + timedelta(minutes=self.time_offset or 0)


def to_clinical_units(measurement: GlucoseMeasurement) -> tuple[Decimal, str]:
    """The concentration in mg/dL (from kg/L) or mmol/L (from mol/L), exactly, with its UCUM.

    kg/L × 10^5 = mg/dL and mol/L × 10^3 = mmol/L: only the exponent moves, so no digit is
    rounded. Raises ValueError when there is no concentration or it is a special value.
    """
    value, unit = measurement.concentration, measurement.unit
    if value is None or unit is None:
        raise ValueError("the measurement carries no concentration")
    if not value.is_finite:
        raise ValueError(f"{value.special} has no numeric value")
    shift, ucum = (5, "mg/dL") if unit is GlucoseUnit.KG_PER_L else (3, "mmol/L")
    return SFloatValue(value.mantissa, value.exponent + shift).to_decimal(), ucum


def _check(data: bytes, name: str, need: int, flags: int, reserved: int) -> None:
    if not data:
        raise ProtocolError(f"{name} is empty")
    if flags & reserved:
        raise ProtocolError(f"{name} flags 0x{flags:02X} set reserved bits")
    if len(data) < need:
        raise ProtocolError(f"{name} is {len(data)} bytes, flags 0x{flags:02X} need {need}")


def parse_measurement(data: bytes) -> GlucoseMeasurement:
    """Decode a Glucose Measurement (0x2A18) value; raises ProtocolError and nothing else."""
    data = bytes(data)
    flags = data[0] if data else 0
    need = (
        _FIXED_SIZE
        + (2 if flags & _TIME_OFFSET else 0)
        + (3 if flags & _CONCENTRATION else 0)
        + (2 if flags & _STATUS else 0)
    )
    _check(data, MEASUREMENT_NAME, need, flags, _RESERVED_FLAGS)
    try:
        base_time = decode_datetime(data, 3)
    except ProtocolError as exc:
        raise ProtocolError(f"{MEASUREMENT_NAME} base time: {exc}") from None
    offset, time_offset = _FIXED_SIZE, None
    if flags & _TIME_OFFSET:
        time_offset = int.from_bytes(data[offset : offset + 2], "little", signed=True)
        offset += 2
    concentration = unit = sample_type = location = None
    if flags & _CONCENTRATION:
        concentration = decode_sfloat(data, offset)
        unit = GlucoseUnit.MOL_PER_L if flags & _UNIT_MOL_PER_L else GlucoseUnit.KG_PER_L
        sample_type = _lookup(_TYPES, data[offset + 2] & 0x0F)
        location = _lookup(_LOCATIONS, data[offset + 2] >> 4)
        offset += 3
    status = None
    if flags & _STATUS:
        status = GlucoseSensorStatus.from_bits(int.from_bytes(data[offset : offset + 2], "little"))
        offset += 2
    if base_time is not None and time_offset:
        try:
            effective: datetime | None = base_time + timedelta(minutes=time_offset)
        except OverflowError:
            effective = None
        if effective is None or effective.year < _YEAR_MIN:
            raise ProtocolError(f"{MEASUREMENT_NAME} time offset leaves the date range")
    return GlucoseMeasurement(
        sequence_number=int.from_bytes(data[1:3], "little"),
        base_time=base_time,
        time_offset=time_offset,
        concentration=concentration,
        unit=unit,
        sample_type=sample_type,
        sample_location=location,
        status=status,
        context_follows=bool(flags & _CONTEXT_FOLLOWS),
        trailing=len(data) - offset,
    )


def encode_measurement(m: GlucoseMeasurement) -> bytes:
    """Encode as a 0x2A18 value (for the simulated meter and tests); round-trips with
    :func:`parse_measurement`. ``trailing`` is not encoded. Raises ValueError when a value does
    not fit its field, or ``unit``/``sample_type``/``sample_location`` and ``concentration``
    are not all set or all None.
    """
    flags = _CONTEXT_FOLLOWS if m.context_follows else 0
    body = _u16(m.sequence_number, "sequence number") + encode_datetime(m.base_time)
    if m.time_offset is not None:
        if not -0x8000 <= m.time_offset < 0x8000:
            raise ValueError("time offset must fit an s16")
        flags |= _TIME_OFFSET
        body += m.time_offset.to_bytes(2, "little", signed=True)
    parts = (m.concentration, m.unit, m.sample_type, m.sample_location)
    if any(part is not None for part in parts):
        if m.concentration is None or m.unit is None or m.sample_type is None:
            raise ValueError("concentration, unit, type and location go together")
        if m.sample_location is None:
            raise ValueError("concentration, unit, type and location go together")
        flags |= _CONCENTRATION | (_UNIT_MOL_PER_L if m.unit is GlucoseUnit.MOL_PER_L else 0)
        nibbles = _TYPES.index(m.sample_type) | _LOCATIONS.index(m.sample_location) << 4
        body += encode_sfloat(m.concentration) + bytes((nibbles,))
    if m.status is not None:
        flags |= _STATUS
        body += m.status.to_bits().to_bytes(2, "little")
    return bytes((flags,)) + body


@dataclass(frozen=True, slots=True)
class GlucoseMeasurementContext:
    """One decoded 0x2A34 value; pair it with the measurement of the same sequence number.

    Amounts are as sent: carbohydrate in kg, medication in kg or litres
    (``medication_in_litres``), HbA1c in %; exercise duration in seconds (0xFFFF = overrun).
    """

    sequence_number: int
    extended_flags: int | None = None
    carbohydrate: Carbohydrate | None = None
    carbohydrate_amount: SFloatValue | None = None
    meal: Meal | None = None
    tester: Tester | None = None
    health: Health | None = None
    exercise_duration: int | None = None
    exercise_intensity: int | None = None
    medication: Medication | None = None
    medication_amount: SFloatValue | None = None
    medication_in_litres: bool = False
    hba1c: SFloatValue | None = None
    trailing: int = 0


def parse_measurement_context(data: bytes) -> GlucoseMeasurementContext:
    """Decode a Glucose Measurement Context (0x2A34) value; raises ProtocolError only.

    Its flags byte uses all 8 bits, so none is refused; the medication-unit bit is kept as
    sent even without a medication field.
    """
    data = bytes(data)
    flags = data[0] if data else 0
    need = 3 + sum(size for bit, size in _CONTEXT_SIZES if flags & bit)
    _check(data, CONTEXT_NAME, need, flags, 0)
    c = GlucoseMeasurementContext(
        sequence_number=int.from_bytes(data[1:3], "little"),
        medication_in_litres=bool(flags & _MEDICATION_LITRES),
    )
    offset = 3
    if flags & _EXTENDED_FLAGS:
        c = replace(c, extended_flags=data[offset])
        offset += 1
    if flags & _CARBOHYDRATE:
        carbohydrate = _lookup(_CARBOHYDRATES, data[offset])
        c = replace(
            c, carbohydrate=carbohydrate, carbohydrate_amount=decode_sfloat(data, offset + 1)
        )
        offset += 3
    if flags & _MEAL:
        c = replace(c, meal=_lookup(_MEALS, data[offset]))
        offset += 1
    if flags & _TESTER_HEALTH:
        tester = _lookup(_TESTERS, data[offset] & 0x0F)
        c = replace(c, tester=tester, health=_lookup(_HEALTHS, data[offset] >> 4))
        offset += 1
    if flags & _EXERCISE:
        duration = int.from_bytes(data[offset : offset + 2], "little")
        c = replace(c, exercise_duration=duration, exercise_intensity=data[offset + 2])
        offset += 3
    if flags & _MEDICATION:
        medication = _lookup(_MEDICATIONS, data[offset])
        c = replace(c, medication=medication, medication_amount=decode_sfloat(data, offset + 1))
        offset += 3
    if flags & _HBA1C:
        c = replace(c, hba1c=decode_sfloat(data, offset))
        offset += 2
    return replace(c, trailing=len(data) - offset)


def encode_measurement_context(c: GlucoseMeasurementContext) -> bytes:
    """Encode as a 0x2A34 value; round-trips with :func:`parse_measurement_context`.

    Paired fields (carbohydrate and amount, tester and health, exercise duration and
    intensity, medication and amount) must be set together; ValueError otherwise.
    """
    flags = _MEDICATION_LITRES if c.medication_in_litres else 0
    body = b""
    pairs = (
        (_CARBOHYDRATE, c.carbohydrate, c.carbohydrate_amount),
        (_TESTER_HEALTH, c.tester, c.health),
        (_EXERCISE, c.exercise_duration, c.exercise_intensity),
        (_MEDICATION, c.medication, c.medication_amount),
    )
    for bit, first, second in pairs:
        if (first is None) != (second is None):
            raise ValueError(f"context fields of flag 0x{bit:02X} go together")
    if c.extended_flags is not None:
        flags |= _EXTENDED_FLAGS
        body += bytes((c.extended_flags,))
    if c.carbohydrate is not None and c.carbohydrate_amount is not None:
        flags |= _CARBOHYDRATE
        body += bytes((_CARBOHYDRATES.index(c.carbohydrate),))
        body += encode_sfloat(c.carbohydrate_amount)
    if c.meal is not None:
        flags |= _MEAL
        body += bytes((_MEALS.index(c.meal),))
    if c.tester is not None and c.health is not None:
        flags |= _TESTER_HEALTH
        body += bytes((_TESTERS.index(c.tester) | _HEALTHS.index(c.health) << 4,))
    if c.exercise_duration is not None and c.exercise_intensity is not None:
        flags |= _EXERCISE
        body += _u16(c.exercise_duration, "exercise duration") + bytes((c.exercise_intensity,))
    if c.medication is not None and c.medication_amount is not None:
        flags |= _MEDICATION
        body += bytes((_MEDICATIONS.index(c.medication),)) + encode_sfloat(c.medication_amount)
    if c.hba1c is not None:
        flags |= _HBA1C
        body += encode_sfloat(c.hba1c)
    return bytes((flags,)) + _u16(c.sequence_number, "sequence number") + body


def _u16(value: int, field: str) -> bytes:
    if not 0 <= value <= _SEQUENCE_MAX:
        raise ValueError(f"{field} must be 0-65535")
    return value.to_bytes(2, "little")


# --- The session ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordTransferComplete:
    """The meter has sent every requested record ("no records found" included: ``records`` 0).

    ``last_sequence`` is the newest sequence number seen so far (serial-number order, so a
    wrap from 0xFFFF to 0 counts as newer); persist it and pass it to the next session.
    """

    records: int
    last_sequence: int | None


@dataclass(frozen=True, slots=True)
class RecordTransferFailed:
    """The meter answered the record request with an error; ``code`` is a RacpResponseCode
    when known (else the raw byte). ``records`` arrived before the error and are valid.
    """

    code: int
    records: int
    last_sequence: int | None


def _is_newer(sequence: int, than: int | None) -> bool:
    return than is None or 0 < (sequence - than) % (_SEQUENCE_MAX + 1) < _HALF_SEQUENCE_SPACE


class GlucoseSession:
    """The GATT session for a glucose meter (Glucose Service 0x1808): fetch new stored records.

    On connect it subscribes to measurements, contexts (optional) and the RACP, and asks for
    "all records" when ``last_sequence`` is None, else for "sequence number >= last + 1", so a
    reconnect fetches only records after the last one seen. Sequence numbers are u16:

    * ``last_sequence`` 0xFFFF: nothing above it can exist, so the request is "<= 0x7FFE", the
      half of the number space that is newer than 0xFFFF in serial-number arithmetic (RFC 1982;
      a meter holds far fewer than 32 768 records).
    * A ">=" transfer that ends having reached 0xFFFF may continue at 0 after a wrap, so the
      session follows it with that same "<= 0x7FFE" request before reporting completion.
    * A record that is not newer than ``last_sequence`` in that arithmetic (a meter ignoring
      the filter) is dropped, with its context, so nothing is delivered twice.

    Limitation: a meter whose counter restarted (factory reset) answers "no records found"
    until it passes ``last_sequence`` again; the devices service should offer "fetch all".
    """

    profile = "glucose"
    service_uuid = SERVICE

    def __init__(self, *, last_sequence: int | None, set_time: bool = True) -> None:
        if last_sequence is not None and not 0 <= last_sequence <= _SEQUENCE_MAX:
            raise ValueError("last_sequence must be 0-65535 or None")
        self._common = CommonCharacteristics(set_time=set_time)
        self._floor = last_sequence
        self._newest = last_sequence
        self._records = 0
        self._operator = RacpOperator.ALL

    def on_connected(self, now: datetime) -> list[Action]:
        """Common reads and the clock, the three subscriptions, then the record request."""
        return [
            *self._common.actions(now),
            Subscribe(MEASUREMENT),
            Subscribe(MEASUREMENT_CONTEXT, optional=True),
            Subscribe(RECORD_ACCESS_CONTROL_POINT),
            self._request(),
        ]

    def _request(self) -> WriteCharacteristic:
        if self._newest is None:
            request = RacpRequest(RacpOpCode.REPORT_STORED_RECORDS, RacpOperator.ALL)
        elif self._newest < _SEQUENCE_MAX:
            operand = (self._newest + 1,)
            request = RacpRequest(
                RacpOpCode.REPORT_STORED_RECORDS, RacpOperator.GREATER_OR_EQUAL, operand
            )
        else:
            operand = (_HALF_SEQUENCE_SPACE - 2,)  # 0x7FFE: newer than 0xFFFF
            request = RacpRequest(
                RacpOpCode.REPORT_STORED_RECORDS, RacpOperator.LESS_OR_EQUAL, operand
            )
        self._operator = request.operator
        return WriteCharacteristic(
            RECORD_ACCESS_CONTROL_POINT, encode_racp_request(request), optional=False
        )

    def on_value(self, uuid: str, value: bytes) -> list[object]:
        """Decode a record, a context, a RACP answer or a common characteristic."""
        if uuid == MEASUREMENT:
            measurement = parse_measurement(value)
            sequence = measurement.sequence_number
            if self._floor is not None and not _is_newer(sequence, self._floor):
                return []
            if _is_newer(sequence, self._newest):
                self._newest = sequence
            self._records += 1
            return [measurement]
        if uuid == MEASUREMENT_CONTEXT:
            context = parse_measurement_context(value)
            if self._floor is not None and not _is_newer(context.sequence_number, self._floor):
                return []
            return [context]
        if uuid == RECORD_ACCESS_CONTROL_POINT:
            return self._on_control_point(value)
        if self._common.handles(uuid):
            return self._common.on_value(uuid, value)
        raise ProtocolError(f"a glucose meter sent an unexpected characteristic {uuid}")

    def _on_control_point(self, value: bytes) -> list[object]:
        response = parse_racp_response(value)
        if isinstance(response, StoredRecordCount):
            return [response]
        if response.request_op_code != RacpOpCode.REPORT_STORED_RECORDS:
            return [response]
        records, self._records = self._records, 0
        if response.code not in (RacpResponseCode.SUCCESS, RacpResponseCode.NO_RECORDS_FOUND):
            return [RecordTransferFailed(response.code, records, self._newest)]
        if self._operator is RacpOperator.GREATER_OR_EQUAL and self._newest == _SEQUENCE_MAX:
            self._records = records  # the wrap follow-up is part of the same transfer
            return [self._request()]
        return [RecordTransferComplete(records, self._newest)]
