"""Tanita body-composition analysers (TBF-310, BC-418) over RS-232: the result line, sans-I/O.

After each measurement the analyser prints one ASCII line of comma-separated fields ending in
CR LF (Tanita's RS-232C output sheets for the TBF-310, and the SC-330 / BC-420MA manuals for
the family's terminator; REFERENCE.md "Serial device protocols"). The fields are positional
and the two models differ, so the field count tells them apart:

* **TBF-310**, 12 fields: body type, gender, height, weight, impedance, fat %, fat mass,
  fat-free mass, total body water, age, BMI, BMR.
* **BC-418**, 38 fields: "date", "time", body type, gender, height, weight, fat %, fat mass,
  fat-free mass, total body water, age, BMI, BMR, impedance (whole body); impedance of right
  leg, left leg, right arm, left arm; then fat %, fat mass, fat-free mass and predicted
  muscle mass for right leg, left leg, right arm, left arm and trunk (5 x 4). The date is
  ``"dd/mm/yy"`` and the time ``"hh:mm"``, both in double quotes.

Sources: the field order is the one read by OBiBa Onyx's Tanita instrument runners
(obiba/onyx, org.obiba.onyx.jade.instrument.tanita: Tbf310InstrumentRunner, whose test feeds
the TBF-310 line ``0,2,170,110.6,431,28.4,31.4,79.2,58.0,27,32.3,9771``, and
Bc418InstrumentRunner, which parses the date as dd/MM/yy). Body type 0 = standard,
2 = athletic; gender 1 = male, 2 = female (Tanita's output tables, e.g. SC-240/SC-330).

Decisions:

* The line carries no unit. The scale's unit setting (Onyx sends ``U0``, metric, to the
  BC-418 before measuring) is given to the decoder as ``mass_unit``; heights are then cm for
  kg and inches for lb, and fat mass, fat-free mass, body water and muscle mass are in the
  mass unit. BMR is in kJ (9771 for a 110.6 kg adult, as in the vector above, is not kcal).
* Numbers are kept as exact :class:`~decimal.Decimal` as printed (``58.0`` stays ``58.0``).
* The date and time are the analyser's naive wall clock; the caller attaches the zone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import TypeVar

from drivers.errors import ProtocolError
from drivers.line_protocol import LineFramer, Skipped

TBF_310_FIELDS = 12
BC_418_FIELDS = 38
MAX_LINE = 512
_NUMBER = re.compile(r"\d{1,6}(?:\.\d{1,3})?")
_INTEGER = re.compile(r"\d{1,6}")
_DATE = re.compile(r'"(\d\d)/(\d\d)/(\d\d)"')
_TIME = re.compile(r'"(\d\d):(\d\d)"')


class TanitaModel(StrEnum):
    """Which analyser printed the line (told apart by the field count)."""

    TBF_310 = "TBF-310"
    BC_418 = "BC-418"


class BodyType(StrEnum):
    """The equation set the analyser used: body type 0 or 2."""

    STANDARD = "standard"
    ATHLETIC = "athletic"


class Gender(StrEnum):
    """Gender as entered on the analyser: 1 or 2."""

    MALE = "male"
    FEMALE = "female"


class MassUnit(StrEnum):
    """The scale's configured unit, as a UCUM code."""

    KG = "kg"
    LB = "[lb_av]"


class Segment(StrEnum):
    """The BC-418's five body segments, in output order."""

    RIGHT_LEG = "right-leg"
    LEFT_LEG = "left-leg"
    RIGHT_ARM = "right-arm"
    LEFT_ARM = "left-arm"
    TRUNK = "trunk"


@dataclass(frozen=True, slots=True)
class SegmentResult:
    """One BC-418 segment; ``impedance`` (ohm) is None for the trunk, which has none."""

    segment: Segment
    impedance: int | None
    fat_percent: Decimal
    fat_mass: Decimal
    fat_free_mass: Decimal
    predicted_muscle_mass: Decimal


@dataclass(frozen=True, slots=True)
class TanitaResult:
    """One result line. Masses are in ``mass_unit``; height in cm (kg) or inches (lb)."""

    model: TanitaModel
    body_type: BodyType
    gender: Gender
    age: int
    height: Decimal
    weight: Decimal
    mass_unit: MassUnit
    impedance: int
    fat_percent: Decimal
    fat_mass: Decimal
    fat_free_mass: Decimal
    total_body_water: Decimal
    bmi: Decimal
    bmr_kj: int
    measured_at: datetime | None = None
    segments: tuple[SegmentResult, ...] = ()

    @property
    def height_unit(self) -> str:
        """UCUM code of ``height``: cm with kg, inches with lb."""
        return "cm" if self.mass_unit is MassUnit.KG else "[in_i]"


@dataclass(frozen=True, slots=True)
class TanitaSkipped:
    """A line that is not a result; ``reason`` names the field, never its value."""

    reason: str
    discarded_bytes: int


def _number(fields: list[str], index: int, name: str) -> Decimal:
    text = fields[index]
    if not _NUMBER.fullmatch(text):
        raise ProtocolError(f"Tanita {name} (field {index + 1}) is not a number")
    return Decimal(text)


def _integer(fields: list[str], index: int, name: str) -> int:
    if not _INTEGER.fullmatch(fields[index]):
        raise ProtocolError(f"Tanita {name} (field {index + 1}) is not a whole number")
    return int(fields[index])


_Code = TypeVar("_Code", bound=StrEnum)


def _code(fields: list[str], index: int, name: str, codes: dict[str, _Code]) -> _Code:
    try:
        return codes[fields[index]]
    except KeyError:
        raise ProtocolError(
            f"Tanita {name} (field {index + 1}) is not one of {'/'.join(codes)}"
        ) from None


_BODY_TYPES: dict[str, BodyType] = {"0": BodyType.STANDARD, "2": BodyType.ATHLETIC}
_GENDERS: dict[str, Gender] = {"1": Gender.MALE, "2": Gender.FEMALE}


def _timestamp(date_text: str, time_text: str) -> datetime:
    date_match, time_match = _DATE.fullmatch(date_text), _TIME.fullmatch(time_text)
    if date_match is None or time_match is None:
        raise ProtocolError('Tanita date or time is not "dd/mm/yy", "hh:mm"')
    day, month, year = (int(g) for g in date_match.groups())
    hour, minute = (int(g) for g in time_match.groups())
    try:
        # Naive by design: the analyser's clock has no zone (see the module docstring).
        return datetime(2000 + year, month, day, hour, minute)  # noqa: DTZ001
    except ValueError:
        raise ProtocolError("Tanita date or time is not a valid date and time") from None


def parse_result_line(line: str | bytes, *, mass_unit: MassUnit = MassUnit.KG) -> TanitaResult:
    """Parse one result line (CR LF optional); ProtocolError names the field, not the value."""
    if isinstance(line, bytes):
        try:
            line = line.decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError("Tanita line has non-ASCII bytes") from None
    fields = [f.strip() for f in line.strip("\r\n").split(",")]
    if len(fields) == TBF_310_FIELDS:
        f = fields
        return TanitaResult(
            model=TanitaModel.TBF_310,
            body_type=_code(f, 0, "body type", _BODY_TYPES),
            gender=_code(f, 1, "gender", _GENDERS),
            height=_number(f, 2, "height"),
            weight=_number(f, 3, "weight"),
            impedance=_integer(f, 4, "impedance"),
            fat_percent=_number(f, 5, "fat %"),
            fat_mass=_number(f, 6, "fat mass"),
            fat_free_mass=_number(f, 7, "fat-free mass"),
            total_body_water=_number(f, 8, "body water"),
            age=_integer(f, 9, "age"),
            bmi=_number(f, 10, "BMI"),
            bmr_kj=_integer(f, 11, "BMR"),
            mass_unit=mass_unit,
        )
    if len(fields) == BC_418_FIELDS:
        f = fields
        measured_at = _timestamp(f[0], f[1])
        segments = []
        for n, segment in enumerate(Segment):
            base = 18 + 4 * n
            segments.append(
                SegmentResult(
                    segment=segment,
                    impedance=None
                    if segment is Segment.TRUNK
                    else _integer(f, 14 + n, f"{segment} impedance"),
                    fat_percent=_number(f, base, f"{segment} fat %"),
                    fat_mass=_number(f, base + 1, f"{segment} fat mass"),
                    fat_free_mass=_number(f, base + 2, f"{segment} fat-free mass"),
                    predicted_muscle_mass=_number(f, base + 3, f"{segment} muscle mass"),
                )
            )
        return TanitaResult(
            model=TanitaModel.BC_418,
            body_type=_code(f, 2, "body type", _BODY_TYPES),
            gender=_code(f, 3, "gender", _GENDERS),
            height=_number(f, 4, "height"),
            weight=_number(f, 5, "weight"),
            fat_percent=_number(f, 6, "fat %"),
            fat_mass=_number(f, 7, "fat mass"),
            fat_free_mass=_number(f, 8, "fat-free mass"),
            total_body_water=_number(f, 9, "body water"),
            age=_integer(f, 10, "age"),
            bmi=_number(f, 11, "BMI"),
            bmr_kj=_integer(f, 12, "BMR"),
            impedance=_integer(f, 13, "impedance"),
            mass_unit=mass_unit,
            measured_at=measured_at,
            segments=tuple(segments),
        )
    raise ProtocolError(
        f"Tanita line has {len(fields)} fields, expected {TBF_310_FIELDS} (TBF-310)"
        f" or {BC_418_FIELDS} (BC-418)"
    )


def encode_result_line(result: TanitaResult) -> bytes:
    """Encode as the analyser prints it, CR LF included (for the simulator and tests).

    The unit is not encoded (the line has none). Raises ValueError for a BC-418 result
    without a time stamp or five segments.
    """
    r = result
    body = "0" if r.body_type is BodyType.STANDARD else "2"
    gender = "1" if r.gender is Gender.MALE else "2"
    if r.model is TanitaModel.TBF_310:
        values = [body, gender, r.height, r.weight, r.impedance, r.fat_percent, r.fat_mass]
        values += [r.fat_free_mass, r.total_body_water, r.age, r.bmi, r.bmr_kj]
    else:
        if r.measured_at is None or [s.segment for s in r.segments] != list(Segment):
            raise ValueError("a BC-418 result needs measured_at and the five segments in order")
        values = [f'"{r.measured_at:%d/%m/%y}"', f'"{r.measured_at:%H:%M}"', body, gender]
        values += [r.height, r.weight, r.fat_percent, r.fat_mass, r.fat_free_mass]
        values += [r.total_body_water, r.age, r.bmi, r.bmr_kj, r.impedance]
        values += [s.impedance for s in r.segments[:4]]
        for s in r.segments:
            values += [s.fat_percent, s.fat_mass, s.fat_free_mass, s.predicted_muscle_mass]
    return (",".join(str(v) for v in values) + "\r\n").encode("ascii")


class TanitaDecoder:
    """Line-stream decoder: ``feed(bytes) -> [TanitaResult | TanitaSkipped, ...]``."""

    def __init__(self, *, mass_unit: MassUnit = MassUnit.KG) -> None:
        self._mass_unit = mass_unit
        self._framer = LineFramer((b"\r", b"\n"), max_length=MAX_LINE)

    def feed(self, data: bytes) -> list[TanitaResult | TanitaSkipped]:
        """Results, and skip events for lines that do not decode. Never raises."""
        events: list[TanitaResult | TanitaSkipped] = []
        for item in self._framer.feed(data):
            if isinstance(item, Skipped):
                events.append(TanitaSkipped(item.reason, item.count))
                continue
            try:
                events.append(parse_result_line(item, mass_unit=self._mass_unit))
            except ProtocolError as exc:
                events.append(TanitaSkipped(str(exc), len(item)))
        return events
