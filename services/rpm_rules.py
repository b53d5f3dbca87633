"""Remote-monitoring alert rules: readings and thresholds in, findings out (pure, no I/O).

The rules (REFERENCE.md, "Remote patient monitoring"; defaults per program, overridable per
patient through :data:`RULE_PARAMS`, the one schema that validates them):

* **thresholds** on a single reading — blood-pressure crisis (systolic >= 180 and/or
  diastolic >= 120), hypotension (systolic < 90), SpO2 (< 94 %, < 88 % critical; with chronic
  lung disease < 88 % and < 85 %), fever (>= 38.0 °C, >= 39.5 °C urgent), glucose (<= 70 mg/dL
  level-1 low, < 54 level-2 low, > 250 high);
* **trends** — heart-failure weight gain (2 lb in a day, 5 lb in a week by default);
* **rate of change** — a systolic rise of more than N mmHg since the previous reading;
* **data stopped** — no reading from a patient for N days, a patient's home device not seen
  for N hours, and the site's sync backlog older than N hours (a site-level finding).

Every comparison is exact: values become :class:`~fractions.Fraction` from their decimal
text, so °F/°C (``(F - 32) x 5/9``), lb/kg (1 lb = 0.45359237 kg, exact by definition) and
mmol/L / mg/dL (x 18.0156, glucose's molar mass 180.156 g/mol) give the same finding for
the same quantity. A finding's ``summary`` names the rule and threshold, never the value
(it may reach the worklist, audit details and FHIR resources); the value goes in
``detail``, which callers seal.

Threshold findings come from each new reading; the "back in range" signal that lets an
alert clear itself comes only from the newest reading of that kind (history included), so a
late-arriving old reading never clears a newer abnormal one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from fractions import Fraction
from typing import Any

from appliance import fhir
from appliance.device_registry import Setting
from services.vitals import CAPTURE_SETTING_SYSTEM, LOINC

GLUCOSE_MG_DL_PER_MMOL_L = Fraction("18.0156")  # glucose 180.156 g/mol
KG_PER_LB = Fraction("0.45359237")  # international avoirdupois pound, exact
WEIGH_SLACK = timedelta(hours=6)  # daily weights are taken at slightly different times
MAX_AGE = timedelta(hours=48)  # an older reading (a meter's memory) raises no new alert
_COUNTED_STATUSES = frozenset({"final", "amended", "corrected"})


class ThresholdError(ValueError):
    """Thresholds that are not valid (every problem listed in the message)."""


class Severity(StrEnum):
    """How urgent a finding is, ordered ``NONE < LOW < MEDIUM < HIGH < CRITICAL``.

    Persisted by value; compare members with ``<``/``max`` (by rank, not alphabetically —
    in SQL order by :meth:`rank` computed in Python, never by the text).
    """

    NONE = "none"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """0 for NONE up to 4 for CRITICAL."""
        return _SEVERITY_ORDER.index(self)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank < other.rank

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank <= other.rank

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank > other.rank

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank >= other.rank


_SEVERITY_ORDER = tuple(Severity)


class Rule(StrEnum):
    """The alert rules (persisted in ``alerts.rule`` and ``rpm_thresholds.rule``)."""

    BP_CRISIS = "bp-crisis"
    HYPOTENSION = "hypotension"
    SPO2_LOW = "spo2-low"
    FEVER = "fever"
    GLUCOSE_LOW = "glucose-low"
    GLUCOSE_HIGH = "glucose-high"
    WEIGHT_GAIN_DAY = "weight-gain-day"
    WEIGHT_GAIN_WEEK = "weight-gain-week"
    SYSTOLIC_RISE = "systolic-rise"
    NO_DATA = "no-data"
    DEVICE_SILENT = "device-silent"
    SYNC_BACKLOG = "sync-backlog"


RULE_TITLES = {
    Rule.BP_CRISIS: "Blood pressure crisis",
    Rule.HYPOTENSION: "Low blood pressure",
    Rule.SPO2_LOW: "Low oxygen saturation",
    Rule.FEVER: "Fever",
    Rule.GLUCOSE_LOW: "Low blood glucose",
    Rule.GLUCOSE_HIGH: "High blood glucose",
    Rule.WEIGHT_GAIN_DAY: "Weight gain in a day",
    Rule.WEIGHT_GAIN_WEEK: "Weight gain in a week",
    Rule.SYSTOLIC_RISE: "Sharp rise in systolic pressure",
    Rule.NO_DATA: "No readings",
    Rule.DEVICE_SILENT: "Home device not seen",
    Rule.SYNC_BACKLOG: "Sync backlog",
}

# Rules whose alert closes itself when the condition is gone (Nightscout's model). Trend and
# rate-of-change findings are events a nurse must look at: they never clear themselves.
AUTO_CLEAR = frozenset(
    {
        Rule.BP_CRISIS,
        Rule.HYPOTENSION,
        Rule.SPO2_LOW,
        Rule.FEVER,
        Rule.GLUCOSE_LOW,
        Rule.GLUCOSE_HIGH,
        Rule.NO_DATA,
        Rule.DEVICE_SILENT,
        Rule.SYNC_BACKLOG,
    }
)


class Program(StrEnum):
    """RPM programs; each enables a set of rules with their default thresholds."""

    HYPERTENSION = "hypertension"
    HEART_FAILURE = "heart-failure"
    DIABETES = "diabetes"
    COPD = "copd"


# Safety rules apply in every program: a crisis reading matters whatever the enrolment.
_SAFETY = frozenset(
    {Rule.BP_CRISIS, Rule.SPO2_LOW, Rule.FEVER, Rule.GLUCOSE_LOW, Rule.NO_DATA, Rule.DEVICE_SILENT}
)
PROGRAM_RULES: Mapping[Program, frozenset[Rule]] = {
    Program.HYPERTENSION: _SAFETY | {Rule.HYPOTENSION, Rule.SYSTOLIC_RISE},
    Program.HEART_FAILURE: _SAFETY
    | {Rule.HYPOTENSION, Rule.WEIGHT_GAIN_DAY, Rule.WEIGHT_GAIN_WEEK},
    Program.DIABETES: _SAFETY | {Rule.GLUCOSE_HIGH},
    Program.COPD: _SAFETY,
}


@dataclass(frozen=True, slots=True)
class Param:
    """One threshold parameter: its default, the sane range a person may set, its unit."""

    default: Fraction
    low: Fraction
    high: Fraction
    unit: str


def _p(default: str, low: str, high: str, unit: str) -> Param:
    return Param(Fraction(default), Fraction(low), Fraction(high), unit)


# The one schema: defaults, validation of per-patient overrides, and the docs of each knob.
RULE_PARAMS: Mapping[Rule, Mapping[str, Param]] = {
    Rule.BP_CRISIS: {
        "systolic": _p("180", "140", "250", "mm[Hg]"),
        "diastolic": _p("120", "90", "160", "mm[Hg]"),
    },
    Rule.HYPOTENSION: {"systolic": _p("90", "60", "120", "mm[Hg]")},
    Rule.SPO2_LOW: {
        "below": _p("94", "80", "100", "%"),
        "critical_below": _p("88", "70", "100", "%"),
    },
    Rule.FEVER: {
        "celsius": _p("38.0", "37.0", "41.0", "Cel"),
        "urgent_celsius": _p("39.5", "37.5", "42.0", "Cel"),
    },
    Rule.GLUCOSE_LOW: {
        "level1": _p("70", "50", "120", "mg/dL"),
        "level2": _p("54", "30", "80", "mg/dL"),
    },
    Rule.GLUCOSE_HIGH: {"above": _p("250", "140", "600", "mg/dL")},
    Rule.WEIGHT_GAIN_DAY: {"lb": _p("2", "0.5", "10", "[lb_av]")},
    Rule.WEIGHT_GAIN_WEEK: {"lb": _p("5", "1", "20", "[lb_av]")},
    Rule.SYSTOLIC_RISE: {
        "mmhg": _p("40", "10", "100", "mm[Hg]"),
        "within_hours": _p("24", "1", "168", "h"),
    },
    Rule.NO_DATA: {"days": _p("3", "1", "30", "d")},
    Rule.DEVICE_SILENT: {"hours": _p("48", "1", "720", "h")},
}
# With chronic lung disease a lower SpO2 is the patient's normal (REFERENCE.md).
CHRONIC_LUNG_SPO2 = {"below": Fraction(88), "critical_below": Fraction(85)}
SITE_RULES = frozenset({Rule.SYNC_BACKLOG})


@dataclass(frozen=True, slots=True)
class Thresholds:
    """A patient's effective thresholds: which rules are on, and each rule's parameters."""

    enabled: frozenset[Rule]
    values: Mapping[Rule, Mapping[str, Fraction]]

    def on(self, rule: Rule) -> bool:
        """Whether ``rule`` is enabled for this patient."""
        return rule in self.enabled

    def value(self, rule: Rule, name: str) -> Fraction:
        """One parameter (the program default unless the patient has their own)."""
        return self.values[rule][name]


def _number(value: object) -> Fraction | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        return None
    try:
        dec = Decimal(str(value))
    except InvalidOperation:
        return None
    return Fraction(dec) if dec.is_finite() else None


def validate_params(rule: str, params: Mapping[str, object]) -> dict[str, Fraction | bool]:
    """A patient's parameters for one rule, checked against :data:`RULE_PARAMS`.

    ``params`` may hold any of the rule's parameters and ``enabled`` (bool). Raises
    :class:`ThresholdError` listing every problem at once.
    """
    try:
        known = Rule(rule)
    except ValueError:
        raise ThresholdError(f"{rule}: unknown rule") from None
    if known in SITE_RULES:
        raise ThresholdError(f"{rule}: a site-level rule, configured for the site")
    schema = RULE_PARAMS.get(known, {})
    problems: list[str] = []
    clean: dict[str, Fraction | bool] = {}
    for name, raw in params.items():
        if name == "enabled":
            if not isinstance(raw, bool):
                problems.append(f"{rule}.enabled: must be true or false")
            else:
                clean[name] = raw
            continue
        spec = schema.get(name)
        if spec is None:
            problems.append(f"{rule}.{name}: unknown parameter")
            continue
        number = _number(raw)
        if number is None:
            problems.append(f"{rule}.{name}: must be a number")
        elif not spec.low <= number <= spec.high:
            problems.append(
                f"{rule}.{name}: must be between {_show(spec.low)} and {_show(spec.high)} "
                f"{spec.unit}"
            )
        else:
            clean[name] = number
    if not problems:
        problems.extend(_cross_checks(known, clean))
    if problems:
        raise ThresholdError("; ".join(problems))
    return clean


def _cross_checks(rule: Rule, clean: Mapping[str, Fraction | bool]) -> list[str]:
    """Pairs that must stay ordered (checked where both are given)."""
    pairs = {
        Rule.SPO2_LOW: ("critical_below", "below"),
        Rule.FEVER: ("celsius", "urgent_celsius"),
        Rule.GLUCOSE_LOW: ("level2", "level1"),
    }
    pair = pairs.get(rule)
    if pair is None:
        return []
    lower, upper = clean.get(pair[0]), clean.get(pair[1])
    if isinstance(lower, Fraction) and isinstance(upper, Fraction) and lower > upper:
        return [f"{rule}: {pair[0]} must not be above {pair[1]}"]
    return []


# A site's own defaults for some parameters (the ``[rpm]`` site config), rule → name → value.
SiteDefaults = Mapping[Rule, Mapping[str, Fraction]]


def site_defaults(*, quiet_days: float, device_silent_hours: float) -> SiteDefaults:
    """The site-wide defaults the ``[rpm]`` config sets (no-data days, device-silent hours).

    Raises :class:`ThresholdError` when one is outside its parameter's range.
    """
    wanted = {
        Rule.NO_DATA: {"days": quiet_days},
        Rule.DEVICE_SILENT: {"hours": device_silent_hours},
    }
    out: dict[Rule, dict[str, Fraction]] = {}
    for rule, params in wanted.items():
        clean = validate_params(rule.value, params)
        out[rule] = {k: v for k, v in clean.items() if isinstance(v, Fraction)}
    return out


def thresholds_for(
    program: Program,
    *,
    chronic_lung_disease: bool,
    overrides: Mapping[str, Mapping[str, object]] = {},
    site: SiteDefaults | None = None,
) -> Thresholds:
    """Program defaults, then the site's, then chronic-lung-disease SpO2, then the patient's.

    Raises :class:`ThresholdError` when a stored override no longer validates.
    """
    values: dict[Rule, dict[str, Fraction]] = {
        rule: {name: spec.default for name, spec in params.items()}
        for rule, params in RULE_PARAMS.items()
    }
    for rule, params in (site or {}).items():
        values[rule].update(params)
    if chronic_lung_disease:
        values[Rule.SPO2_LOW].update(CHRONIC_LUNG_SPO2)
    enabled = set(PROGRAM_RULES[program])
    problems = []
    for rule_name, raw in sorted(overrides.items()):
        try:
            clean = validate_params(rule_name, raw)
        except ThresholdError as exc:
            problems.append(str(exc))
            continue
        rule = Rule(rule_name)
        for name, value in clean.items():
            if name == "enabled":
                (enabled.add if value else enabled.discard)(rule)
            elif isinstance(value, Fraction):
                values[rule][name] = value
        problems.extend(_cross_checks(rule, values[rule]))
    if problems:
        raise ThresholdError("; ".join(problems))
    return Thresholds(frozenset(enabled), values)


# -- readings ---------------------------------------------------------------------------


class Measure(StrEnum):
    """What a reading measures (canonical unit in brackets)."""

    SYSTOLIC = "systolic"  # mm[Hg]
    DIASTOLIC = "diastolic"  # mm[Hg]
    HEART_RATE = "heart-rate"  # /min
    SPO2 = "spo2"  # %
    TEMPERATURE = "temperature"  # Cel
    WEIGHT = "weight"  # kg
    GLUCOSE = "glucose"  # mg/dL


_BP_PANEL, _SYSTOLIC, _DIASTOLIC = "85354-9", "8480-6", "8462-4"
_SIMPLE_CODES = {
    "8867-4": Measure.HEART_RATE,
    "59408-5": Measure.SPO2,
    "2708-6": Measure.SPO2,
    "8310-5": Measure.TEMPERATURE,
    "29463-7": Measure.WEIGHT,
    "41653-7": Measure.GLUCOSE,
    "2339-0": Measure.GLUCOSE,
    "14743-9": Measure.GLUCOSE,
    "15074-8": Measure.GLUCOSE,
}
# Unit → factor (and offset) to the measure's canonical unit; anything else is not read.
_UNITS: Mapping[Measure, Mapping[str, Callable[[Fraction], Fraction]]] = {
    Measure.SYSTOLIC: {"mm[Hg]": lambda v: v},
    Measure.DIASTOLIC: {"mm[Hg]": lambda v: v},
    Measure.HEART_RATE: {"/min": lambda v: v},
    Measure.SPO2: {"%": lambda v: v},
    Measure.TEMPERATURE: {"Cel": lambda v: v, "[degF]": lambda v: (v - 32) * Fraction(5, 9)},
    Measure.WEIGHT: {
        "kg": lambda v: v,
        "[lb_av]": lambda v: v * KG_PER_LB,
        "g": lambda v: v / 1000,
    },
    Measure.GLUCOSE: {"mg/dL": lambda v: v, "mmol/L": lambda v: v * GLUCOSE_MG_DL_PER_MMOL_L},
}


@dataclass(frozen=True, slots=True)
class Reading:
    """One measured value from an Observation, as the rules need it."""

    observation_id: str
    patient_id: str | None
    measure: Measure
    value: Decimal
    unit: str  # UCUM, as recorded
    effective: datetime
    setting: Setting | None = None

    @property
    def canonical(self) -> Fraction:
        """The value exactly, in the measure's canonical unit (mm[Hg], %, Cel, kg, mg/dL)."""
        return _UNITS[self.measure][self.unit](Fraction(self.value))


def _loinc_codes(concept: object) -> list[str]:
    if not isinstance(concept, Mapping):
        return []
    codings = concept.get("coding")
    if not isinstance(codings, list):
        return []
    return [
        str(c.get("code"))
        for c in codings
        if isinstance(c, Mapping) and c.get("system") == LOINC and c.get("code")
    ]


def _quantity(holder: Mapping[str, Any], measure: Measure) -> tuple[Decimal, str] | None:
    quantity = holder.get("valueQuantity")
    if not isinstance(quantity, Mapping):
        return None
    unit = quantity.get("code") or quantity.get("unit")
    number = _number(quantity.get("value"))
    if number is None or not isinstance(unit, str) or unit not in _UNITS[measure]:
        return None
    return Decimal(str(quantity.get("value"))), unit


def _effective(resource: Mapping[str, Any]) -> datetime | None:
    text = resource.get("effectiveDateTime") or resource.get("effectiveInstant")
    period = resource.get("effectivePeriod")
    if text is None and isinstance(period, Mapping):
        text = period.get("start")
    return fhir.instant(text)


def _setting(resource: Mapping[str, Any]) -> Setting | None:
    meta = resource.get("meta")
    tags = meta.get("tag") if isinstance(meta, Mapping) else None
    for tag in tags if isinstance(tags, list) else []:
        if isinstance(tag, Mapping) and tag.get("system") == CAPTURE_SETTING_SYSTEM:
            try:
                return Setting(str(tag.get("code")))
            except ValueError:
                return None
    return None


def readings_from_observation(resource: Mapping[str, Any]) -> list[Reading]:
    """The readings in an Observation the rules understand; [] for anything else.

    Never raises: an Observation of another kind, without a number, in an unknown unit,
    without a timezone-aware time, or not final (entered in error) gives no readings.
    """
    if resource.get("resourceType") != "Observation":
        return []
    if resource.get("status") not in _COUNTED_STATUSES:
        return []
    obs_id, effective = resource.get("id"), _effective(resource)
    if not isinstance(obs_id, str) or effective is None:
        return []
    subject = resource.get("subject")
    ref = subject.get("reference") if isinstance(subject, Mapping) else None
    patient = (
        ref.removeprefix("Patient/")
        if isinstance(ref, str) and ref.startswith("Patient/")
        else None
    )
    setting = _setting(resource)

    def reading(measure: Measure, holder: Mapping[str, Any]) -> Reading | None:
        found = _quantity(holder, measure)
        if found is None:
            return None
        return Reading(obs_id, patient, measure, found[0], found[1], effective, setting)

    codes = _loinc_codes(resource.get("code"))
    out: list[Reading | None] = []
    if _BP_PANEL in codes:
        for component in resource.get("component") or []:
            if not isinstance(component, Mapping):
                continue
            parts = _loinc_codes(component.get("code"))
            if _SYSTOLIC in parts:
                out.append(reading(Measure.SYSTOLIC, component))
            elif _DIASTOLIC in parts:
                out.append(reading(Measure.DIASTOLIC, component))
    else:
        measure = next((_SIMPLE_CODES[c] for c in codes if c in _SIMPLE_CODES), None)
        if measure is not None:
            out.append(reading(measure, resource))
    return [r for r in out if r is not None]


# -- findings ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """What a rule concluded. ``severity`` NONE means "in range" (the auto-clear signal).

    ``summary`` is PHI-free (rule and threshold); ``detail`` holds the values and must be
    sealed wherever it is stored. ``scope`` narrows a rule to one device.
    """

    rule: Rule
    patient_id: str | None
    severity: Severity
    summary: str
    at: datetime
    observation_id: str | None = None
    detail: str = ""
    scope: str | None = None

    @property
    def key(self) -> str:
        """The alert key: one live alert per patient and key (``device-silent:<device>``)."""
        return self.rule.value if self.scope is None else f"{self.rule.value}:{self.scope}"

    @property
    def in_range(self) -> bool:
        """The condition is absent."""
        return self.severity is Severity.NONE

    @property
    def clears(self) -> bool:
        """In range, for a rule that lets an alert clear itself."""
        return self.in_range and self.rule in AUTO_CLEAR


def _show(value: Fraction) -> str:
    """A threshold as people write it (38.0 stays 38, 0.5 stays 0.5)."""
    dec = Decimal(value.numerator) / Decimal(value.denominator)
    return format(dec.normalize(), "f")


@dataclass(frozen=True, slots=True)
class _Bp:
    observation_id: str
    effective: datetime
    systolic: Reading | None
    diastolic: Reading | None


def _bp_pairs(readings: Iterable[Reading]) -> list[_Bp]:
    by_obs: dict[str, dict[Measure, Reading]] = {}
    for r in readings:
        if r.measure in (Measure.SYSTOLIC, Measure.DIASTOLIC):
            by_obs.setdefault(r.observation_id, {})[r.measure] = r
    pairs = [
        _Bp(
            obs,
            next(iter(parts.values())).effective,
            parts.get(Measure.SYSTOLIC),
            parts.get(Measure.DIASTOLIC),
        )
        for obs, parts in by_obs.items()
    ]
    return sorted(pairs, key=lambda p: (p.effective, p.observation_id))


def _detail(*readings: Reading | None) -> str:
    # "systolic 186 mm[Hg], diastolic 100 mm[Hg]": parsed back by describe_values.
    return ", ".join(f"{r.measure.value} {r.value} {r.unit}" for r in readings if r is not None)


# -- for people -------------------------------------------------------------------------

# How people write the UCUM units the readings and thresholds carry.
UNIT_TEXT: Mapping[str, str] = {
    "mm[Hg]": "mmHg",
    "%": "%",
    "Cel": "°C",
    "[degF]": "°F",
    "kg": "kg",
    "[lb_av]": "lb",
    "g": "g",
    "mg/dL": "mg/dL",
    "mmol/L": "mmol/L",
    "/min": "/min",
    "h": "hours",
    "d": "days",
}
MEASURE_LABELS: Mapping[Measure, str] = {
    Measure.SYSTOLIC: "Systolic",
    Measure.DIASTOLIC: "Diastolic",
    Measure.HEART_RATE: "Pulse",
    Measure.SPO2: "SpO2",
    Measure.TEMPERATURE: "Temperature",
    Measure.WEIGHT: "Weight",
    Measure.GLUCOSE: "Glucose",
}
PROGRAM_TITLES: Mapping[Program, str] = {
    Program.HYPERTENSION: "Hypertension",
    Program.HEART_FAILURE: "Heart failure",
    Program.DIABETES: "Diabetes",
    Program.COPD: "COPD",
}


def unit_text(unit: str) -> str:
    """A UCUM unit as people write it (``Cel`` → ``°C``); unknown units unchanged."""
    return UNIT_TEXT.get(unit, unit)


def describe_values(detail: str) -> str:
    """A finding's sealed ``detail`` for a screen: ``BP 186/100 mmHg``, ``SpO2 91 %``.

    Parts that are not ``<measure> <value> <unit>`` are shown as they are.
    """
    parts: list[tuple[str, str, str]] = []
    for chunk in filter(None, (c.strip() for c in detail.split(","))):
        name, _, rest = chunk.partition(" ")
        value, _, unit = rest.partition(" ")
        parts.append((name, value, unit))
    known = {m.value for m in Measure}
    pressure = {n: (v, u) for n, v, u in parts if n in ("systolic", "diastolic")}
    out: list[str] = []
    for name, value, unit in parts:
        if name not in known or not value:
            out.append(" ".join(x for x in (name, value, unit) if x))
        elif name == "systolic" and "diastolic" in pressure and pressure["diastolic"][1] == unit:
            out.append(f"BP {value}/{pressure['diastolic'][0]} {unit_text(unit)}")
        elif name == "diastolic" and "systolic" in pressure and pressure["systolic"][1] == unit:
            continue  # shown with the systolic value
        else:
            out.append(f"{MEASURE_LABELS[Measure(name)]} {value} {unit_text(unit)}".rstrip())
    return ", ".join(out)


# A threshold check: (severity, summary) for one reading (or BP pair) of a patient.
_Check = tuple[Severity, str]


def bp_crisis(systolic: Fraction | None, diastolic: Fraction | None, t: Thresholds) -> _Check:
    """Crisis when systolic >= its threshold and/or diastolic >= its threshold."""
    s_at, d_at = t.value(Rule.BP_CRISIS, "systolic"), t.value(Rule.BP_CRISIS, "diastolic")
    parts = []
    if systolic is not None and systolic >= s_at:
        parts.append(f"systolic ≥ {_show(s_at)}")
    if diastolic is not None and diastolic >= d_at:
        parts.append(f"diastolic ≥ {_show(d_at)}")
    if parts:
        return Severity.CRITICAL, " and ".join(parts)
    return Severity.NONE, f"below {_show(s_at)}/{_show(d_at)}"


def hypotension(systolic: Fraction, t: Thresholds) -> _Check:
    """Systolic below its threshold."""
    below = t.value(Rule.HYPOTENSION, "systolic")
    if systolic < below:
        return Severity.HIGH, f"systolic < {_show(below)}"
    return Severity.NONE, f"systolic ≥ {_show(below)}"


def spo2_low(spo2: Fraction, t: Thresholds) -> _Check:
    """SpO2 below the (critical) threshold."""
    below, critical = t.value(Rule.SPO2_LOW, "below"), t.value(Rule.SPO2_LOW, "critical_below")
    if spo2 < critical:
        return Severity.CRITICAL, f"SpO2 < {_show(critical)} %"
    if spo2 < below:
        return Severity.HIGH, f"SpO2 < {_show(below)} %"
    return Severity.NONE, f"SpO2 ≥ {_show(below)} %"


def fever(celsius: Fraction, t: Thresholds) -> _Check:
    """Temperature at or above the (urgent) fever threshold."""
    at, urgent = t.value(Rule.FEVER, "celsius"), t.value(Rule.FEVER, "urgent_celsius")
    if celsius >= urgent:
        return Severity.HIGH, f"temperature ≥ {_show(urgent)} °C"
    if celsius >= at:
        return Severity.MEDIUM, f"temperature ≥ {_show(at)} °C"
    return Severity.NONE, f"temperature < {_show(at)} °C"


def glucose_low(mg_dl: Fraction, t: Thresholds) -> _Check:
    """Level 2 (< 54 mg/dL) is critical; level 1 (<= 70 mg/dL) high."""
    level1, level2 = t.value(Rule.GLUCOSE_LOW, "level1"), t.value(Rule.GLUCOSE_LOW, "level2")
    if mg_dl < level2:
        return Severity.CRITICAL, f"glucose < {_show(level2)} mg/dL (level 2)"
    if mg_dl <= level1:
        return Severity.HIGH, f"glucose ≤ {_show(level1)} mg/dL (level 1)"
    return Severity.NONE, f"glucose > {_show(level1)} mg/dL"


def glucose_high(mg_dl: Fraction, t: Thresholds) -> _Check:
    """Glucose above the high threshold."""
    above = t.value(Rule.GLUCOSE_HIGH, "above")
    if mg_dl > above:
        return Severity.MEDIUM, f"glucose > {_show(above)} mg/dL"
    return Severity.NONE, f"glucose ≤ {_show(above)} mg/dL"


_SINGLE_CHECKS: Mapping[
    Measure, tuple[tuple[Rule, Callable[[Fraction, Thresholds], _Check]], ...]
] = {
    Measure.SPO2: ((Rule.SPO2_LOW, spo2_low),),
    Measure.TEMPERATURE: ((Rule.FEVER, fever),),
    Measure.GLUCOSE: ((Rule.GLUCOSE_LOW, glucose_low), (Rule.GLUCOSE_HIGH, glucose_high)),
}


def evaluate(
    patient_id: str,
    new: Sequence[Reading],
    history: Sequence[Reading],
    thresholds: Thresholds,
    now: datetime,
    *,
    max_age: timedelta = MAX_AGE,
) -> list[Finding]:
    """Findings for a patient's new readings, given their recent history.

    ``history`` may include the new readings (duplicates are ignored). A new reading older
    than ``max_age`` before ``now`` raises nothing (a meter's memory of last month), but may
    still say "back in range". The result depends only on the arguments, in any order.
    """
    known = {(r.observation_id, r.measure): r for r in (*history, *new)}
    everything = sorted(known.values(), key=lambda r: (r.effective, r.observation_id, r.measure))
    fresh = sorted(
        {(r.observation_id, r.measure): r for r in new}.values(),
        key=lambda r: (r.effective, r.observation_id, r.measure),
    )
    if not fresh:
        return []
    recent = now - max_age
    findings: list[Finding] = []

    def add(rule: Rule, check: _Check, at: datetime, obs: str, detail: str) -> None:
        findings.append(Finding(rule, patient_id, check[0], check[1], at, obs, detail))

    # Blood pressure: crisis, hypotension (threshold rules), systolic rise (rate of change).
    all_bp, new_bp = _bp_pairs(everything), _bp_pairs(fresh)
    for pair in new_bp:
        if pair.effective < recent:
            continue
        sys_v = None if pair.systolic is None else pair.systolic.canonical
        dia_v = None if pair.diastolic is None else pair.diastolic.canonical
        detail = _detail(pair.systolic, pair.diastolic)
        if thresholds.on(Rule.BP_CRISIS):
            check = bp_crisis(sys_v, dia_v, thresholds)
            if check[0] > Severity.NONE:
                add(Rule.BP_CRISIS, check, pair.effective, pair.observation_id, detail)
        if thresholds.on(Rule.HYPOTENSION) and sys_v is not None:
            check = hypotension(sys_v, thresholds)
            if check[0] > Severity.NONE:
                add(Rule.HYPOTENSION, check, pair.effective, pair.observation_id, detail)
        if thresholds.on(Rule.SYSTOLIC_RISE) and sys_v is not None:
            rise = _systolic_rise(pair, sys_v, all_bp, thresholds)
            if rise is not None:
                add(Rule.SYSTOLIC_RISE, rise, pair.effective, pair.observation_id, detail)
    if new_bp and all_bp:
        latest = all_bp[-1]
        sys_v = None if latest.systolic is None else latest.systolic.canonical
        dia_v = None if latest.diastolic is None else latest.diastolic.canonical
        detail = _detail(latest.systolic, latest.diastolic)
        if thresholds.on(Rule.BP_CRISIS) and (sys_v is not None or dia_v is not None):
            check = bp_crisis(sys_v, dia_v, thresholds)
            if check[0] is Severity.NONE:
                add(Rule.BP_CRISIS, check, latest.effective, latest.observation_id, detail)
        if thresholds.on(Rule.HYPOTENSION) and sys_v is not None:
            check = hypotension(sys_v, thresholds)
            if check[0] is Severity.NONE:
                add(Rule.HYPOTENSION, check, latest.effective, latest.observation_id, detail)

    # Single-value thresholds (SpO2, temperature, glucose): each new reading, then the newest.
    for measure, checks in _SINGLE_CHECKS.items():
        new_of = [r for r in fresh if r.measure is measure]
        if not new_of:
            continue
        latest_r = [r for r in everything if r.measure is measure][-1]
        for rule, fn in checks:
            if not thresholds.on(rule):
                continue
            for r in new_of:
                check = fn(r.canonical, thresholds)
                if r.effective >= recent and check[0] > Severity.NONE:
                    add(rule, check, r.effective, r.observation_id, _detail(r))
            check = fn(latest_r.canonical, thresholds)
            if check[0] is Severity.NONE:
                add(rule, check, latest_r.effective, latest_r.observation_id, _detail(latest_r))

    # Heart-failure weight gain over a day and a week.
    weights = [r for r in everything if r.measure is Measure.WEIGHT]
    for r in (r for r in fresh if r.measure is Measure.WEIGHT and r.effective >= recent):
        for rule, window, label in (
            (Rule.WEIGHT_GAIN_DAY, timedelta(days=1), "1 day"),
            (Rule.WEIGHT_GAIN_WEEK, timedelta(days=7), "7 days"),
        ):
            if thresholds.on(rule):
                check = weight_gain(r, weights, window, rule, thresholds, label)
                if check[0] > Severity.NONE:
                    add(rule, check, r.effective, r.observation_id, _detail(r))

    # Any reading at all means data is arriving.
    if thresholds.on(Rule.NO_DATA):
        last = fresh[-1]
        findings.append(
            Finding(Rule.NO_DATA, patient_id, Severity.NONE, "readings arriving", last.effective)
        )
    return sorted(findings, key=_finding_order)


def _finding_order(f: Finding) -> tuple[datetime, int, int, str]:
    # Abnormal before "in range" at the same instant: a reading that both opens (old) and
    # reports the newest state clears only what it must.
    return f.at, list(Rule).index(f.rule), -f.severity.rank, f.observation_id or ""


def weight_gain(
    reading: Reading,
    weights: Sequence[Reading],
    window: timedelta,
    rule: Rule,
    thresholds: Thresholds,
    label: str,
) -> _Check:
    """Gain of ``reading`` over the lightest earlier weight in the window (+ slack)."""
    start = reading.effective - window - WEIGH_SLACK
    earlier = [
        w.canonical
        for w in weights
        if start <= w.effective < reading.effective and w.observation_id != reading.observation_id
    ]
    limit = thresholds.value(rule, "lb")
    if not earlier:
        return Severity.NONE, "no earlier weight"
    gain_lb = (reading.canonical - min(earlier)) / KG_PER_LB
    if gain_lb >= limit:
        return Severity.MEDIUM, f"weight gain ≥ {_show(limit)} lb in {label}"
    return Severity.NONE, f"weight gain < {_show(limit)} lb in {label}"


def _systolic_rise(
    pair: _Bp, systolic: Fraction, all_bp: Sequence[_Bp], thresholds: Thresholds
) -> _Check | None:
    limit = thresholds.value(Rule.SYSTOLIC_RISE, "mmhg")
    within = timedelta(hours=float(thresholds.value(Rule.SYSTOLIC_RISE, "within_hours")))
    before = [p for p in all_bp if p.effective < pair.effective and p.systolic is not None]
    if not before:
        return None
    previous = before[-1]
    assert previous.systolic is not None  # filtered above
    if pair.effective - previous.effective > within:
        return None
    if systolic - previous.systolic.canonical > limit:
        return Severity.MEDIUM, f"systolic rise > {_show(limit)} mmHg since the previous reading"
    return None


# -- data stopped -----------------------------------------------------------------------


def quiet_patient(
    patient_id: str,
    last_reading: datetime | None,
    enrolled_at: datetime,
    thresholds: Thresholds,
    now: datetime,
) -> Finding | None:
    """No reading for N days (counted from enrolment when none ever came); None when off."""
    if not thresholds.on(Rule.NO_DATA):
        return None
    days = thresholds.value(Rule.NO_DATA, "days")
    since = max(last_reading, enrolled_at) if last_reading is not None else enrolled_at
    if now - since >= timedelta(days=float(days)):
        return Finding(
            Rule.NO_DATA, patient_id, Severity.LOW, f"no reading for {_show(days)} days", now
        )
    return Finding(Rule.NO_DATA, patient_id, Severity.NONE, "readings arriving", now)


def silent_device(
    device_id: str,
    patient_id: str,
    last_seen: datetime | None,
    registered_at: datetime,
    thresholds: Thresholds,
    now: datetime,
) -> Finding | None:
    """A patient's home device not seen for N hours (from registration if never)."""
    if not thresholds.on(Rule.DEVICE_SILENT):
        return None
    hours = thresholds.value(Rule.DEVICE_SILENT, "hours")
    since = last_seen or registered_at
    due = now - since >= timedelta(hours=float(hours))
    return Finding(
        Rule.DEVICE_SILENT,
        patient_id,
        Severity.LOW if due else Severity.NONE,
        f"device not seen for {_show(hours)} hours" if due else "device seen",
        now,
        scope=device_id,
    )


def sync_backlog(oldest_pending: datetime | None, now: datetime, hours: float) -> Finding:
    """The site's oldest item waiting to go upstream is older than ``hours`` (site level)."""
    due = oldest_pending is not None and now - oldest_pending >= timedelta(hours=hours)
    limit = _show(Fraction(str(hours)))
    return Finding(
        Rule.SYNC_BACKLOG,
        None,
        Severity.MEDIUM if due else Severity.NONE,
        f"items waiting to sync for over {limit} hours" if due else "sync caught up",
        now,
    )
