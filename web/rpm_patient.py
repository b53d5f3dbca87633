"""Remote patient monitoring: one patient's trend charts, enrolment and thresholds (issue 4).

* ``GET /rpm/patients/<id>`` — who the patient is, their enrolment and this period's billing
  counters, their open alerts, a trend chart per vital over 7/30/90 days (home and clinic
  readings as distinct series, the patient's thresholds drawn as lines) with each chart's
  readings also as a table, and the forms: enrol / change program / end enrolment, the
  patient's own thresholds, and management time.
* ``GET /rpm/patients/<id>/series.json?window=30&setting=home`` — the chart data that
  ``static/rpm_patient.js`` draws with the vendored uPlot (``static/vendor/uplot``).

Nurses and admins use the whole page; providers read it (the forms are not shown to them,
and their changes are refused). Every read goes through the store or the RPM services under
the nurse's name, so each is
audited; every change goes through :mod:`services.rpm_enrollment` or
:mod:`services.rpm_billing`, which audit it. Changes answer with a redirect carrying a fixed
message key (no reflected text); refusals re-render the page with what was wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

from quart import Blueprint, abort, jsonify, redirect, request, url_for
from quart.typing import ResponseReturnValue

from appliance.errors import ApplianceError, NotFoundError
from appliance.numbers import small_int
from appliance.users import Role
from services import rpm_rules
from services.alerts import Alert, AlertBook
from services.rpm_billing import MAX_MINUTES, MAX_NOTE, PatientBilling, RpmBilling, RpmError
from services.rpm_enrollment import MAX_BACKDATE_DAYS, Enrollment, EnrollmentError, Enrollments
from services.rpm_rules import KG_PER_LB, Measure, Program, Rule, Severity, Thresholds
from web.access import require_access
from web.app import app_state
from web.auth import current_session, login_required
from web.nurse import display_name
from web.templating import render_template

bp = Blueprint("rpm_patient", __name__, url_prefix="/rpm/patients")

_STAFF = (Role.NURSE, Role.ADMIN)  # who changes enrolment, thresholds, time logs
# Providers (where alerts escalate) read the page and its charts; the forms are not theirs.
_VIEWERS = (Role.NURSE, Role.ADMIN, Role.PROVIDER)
WINDOWS = (7, 30, 90)
DEFAULT_WINDOW = 30
SETTINGS = ("all", "home", "clinic")
MAX_READINGS = 5000  # per page: a continuous glucose monitor sends ~290 a day
UNRECORDED = "unrecorded"  # a reading without a capture-setting tag
_LOINC = "http://loinc.org"

# Fixed messages after a change (the redirect carries only the key).
DONE = {
    "enrolled": "Enrolled. The 30-day billing periods count from the start date.",
    "program": "Enrolment updated.",
    "ended": "Enrolment ended. The readings and alerts stay in the chart.",
    "thresholds": "Thresholds saved. They apply to readings from now on.",
    "unchanged": "Nothing to change: the thresholds are as they were.",
    "time": "Management time logged.",
}

PROGRAM_LABELS = rpm_rules.PROGRAM_TITLES
SETTING_LABELS = {"home": "Home", "clinic": "Clinic", UNRECORDED: "Not recorded"}

# How people read the units of RULE_PARAMS and readings (UCUM is for machines).
UNIT_TEXT = rpm_rules.UNIT_TEXT


@dataclass(frozen=True, slots=True)
class RuleForm:
    """How the thresholds form names a rule and its parameters."""

    rule: Rule
    title: str
    params: Mapping[str, str]  # parameter → label


RULE_FORMS = (
    RuleForm(
        Rule.BP_CRISIS,
        "Blood-pressure crisis",
        {"systolic": "Systolic at or above", "diastolic": "Diastolic at or above"},
    ),
    RuleForm(Rule.HYPOTENSION, "Low blood pressure", {"systolic": "Systolic below"}),
    RuleForm(
        Rule.SYSTOLIC_RISE,
        "Systolic rise",
        {"mmhg": "Rise of more than", "within_hours": "Since a reading within"},
    ),
    RuleForm(
        Rule.SPO2_LOW, "Low SpO2", {"below": "Alert below", "critical_below": "Critical below"}
    ),
    RuleForm(
        Rule.FEVER, "Fever", {"celsius": "At or above", "urgent_celsius": "Urgent at or above"}
    ),
    RuleForm(
        Rule.GLUCOSE_LOW,
        "Low glucose",
        {"level1": "Level 1 at or below", "level2": "Level 2 below"},
    ),
    RuleForm(Rule.GLUCOSE_HIGH, "High glucose", {"above": "Above"}),
    RuleForm(Rule.WEIGHT_GAIN_DAY, "Weight gain in 1 day", {"lb": "Gain of at least"}),
    RuleForm(Rule.WEIGHT_GAIN_WEEK, "Weight gain in 7 days", {"lb": "Gain of at least"}),
    RuleForm(Rule.NO_DATA, "No readings", {"days": "For at least"}),
    RuleForm(Rule.DEVICE_SILENT, "Home device not seen", {"hours": "For at least"}),
)
RULE_TITLES = {f.rule.value: f.title for f in RULE_FORMS} | {
    Rule.SYNC_BACKLOG.value: "Sync backlog"
}
# Parameters that must stay in order (lower, upper), as rpm_rules checks them.
_ORDERED = {
    Rule.SPO2_LOW: ("critical_below", "below"),
    Rule.FEVER: ("celsius", "urgent_celsius"),
    Rule.GLUCOSE_LOW: ("level2", "level1"),
}


# -- the charts (pure) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChartSpec:
    """One trend chart: the measures it draws and the LOINC codes its Observations carry."""

    id: str
    title: str
    measures: tuple[Measure, ...]
    codes: tuple[str, ...]
    lines: tuple[tuple[Rule, str, str], ...]  # (rule, parameter, label with {v})
    note: str = ""


CHARTS = (
    ChartSpec(
        "bp",
        "Blood pressure",
        (Measure.SYSTOLIC, Measure.DIASTOLIC),
        ("85354-9",),
        (
            (Rule.BP_CRISIS, "systolic", "Crisis: systolic ≥ {v}"),
            (Rule.BP_CRISIS, "diastolic", "Crisis: diastolic ≥ {v}"),
            (Rule.HYPOTENSION, "systolic", "Low: systolic < {v}"),
        ),
    ),
    ChartSpec(
        "weight",
        "Weight",
        (Measure.WEIGHT,),
        ("29463-7",),
        (),
        note="Weight alerts are about gain, not a level: see the weight-gain thresholds.",
    ),
    ChartSpec(
        "spo2",
        "SpO2 and pulse",
        (Measure.SPO2, Measure.HEART_RATE),
        ("59408-5", "2708-6", "8867-4"),
        (
            (Rule.SPO2_LOW, "below", "SpO2 < {v}"),
            (Rule.SPO2_LOW, "critical_below", "Critical: SpO2 < {v}"),
        ),
    ),
    ChartSpec(
        "glucose",
        "Glucose",
        (Measure.GLUCOSE,),
        ("41653-7", "2339-0", "14743-9", "15074-8"),
        (
            (Rule.GLUCOSE_HIGH, "above", "High > {v}"),
            (Rule.GLUCOSE_LOW, "level1", "Low, level 1 ≤ {v}"),
            (Rule.GLUCOSE_LOW, "level2", "Low, level 2 < {v}"),
        ),
    ),
    ChartSpec(
        "temperature",
        "Temperature",
        (Measure.TEMPERATURE,),
        ("8310-5",),
        (
            (Rule.FEVER, "celsius", "Fever ≥ {v}"),
            (Rule.FEVER, "urgent_celsius", "Urgent fever ≥ {v}"),
        ),
    ),
)
MEASURE_LABELS = rpm_rules.MEASURE_LABELS
_UNITS = {
    Measure.SYSTOLIC: "mmHg",
    Measure.DIASTOLIC: "mmHg",
    Measure.HEART_RATE: "/min",
    Measure.SPO2: "%",
    Measure.TEMPERATURE: "°C",
    Measure.WEIGHT: "kg",
    Measure.GLUCOSE: "mg/dL",
}
ALL_CODES = tuple(f"{_LOINC}|{code}" for chart in CHARTS for code in chart.codes)


@dataclass(frozen=True, slots=True)
class Row:
    """One Observation in a chart's table: when, where, its values and any threshold crossed."""

    at: datetime
    shown_at: str
    setting: str
    values: Mapping[Measure, str]
    crossed: tuple[str, ...]


@dataclass(slots=True)
class Series:
    """One measure's readings from one setting, oldest first (epoch seconds, value)."""

    measure: Measure
    setting: str
    unit: str
    points: list[tuple[int, float]] = field(default_factory=list)

    def json(self) -> dict[str, Any]:
        """The JSON form ``rpm_patient.js`` draws."""
        return {
            "key": f"{self.measure.value}-{self.setting}",
            "measure": self.measure.value,
            "label": MEASURE_LABELS[self.measure],
            "setting": self.setting,
            "setting_label": SETTING_LABELS[self.setting],
            "unit": self.unit,
            "points": [[t, v] for t, v in self.points],
        }


@dataclass(frozen=True, slots=True)
class Line:
    """A threshold drawn across a chart."""

    rule: Rule
    param: str
    measure: Measure
    value: float
    label: str
    unit: str

    def json(self) -> dict[str, Any]:
        """The JSON form ``rpm_patient.js`` draws."""
        return {
            "rule": self.rule.value,
            "param": self.param,
            "measure": self.measure.value,
            "value": self.value,
            "label": self.label,
            "unit": self.unit,
        }


@dataclass(frozen=True, slots=True)
class Chart:
    """One vital's chart: series per measure and setting, threshold lines, table rows."""

    spec: ChartSpec
    units: Mapping[Measure, str]
    series: tuple[Series, ...]
    lines: tuple[Line, ...]
    rows: tuple[Row, ...]  # newest first

    @property
    def count(self) -> int:
        """How many Observations the chart shows."""
        return len(self.rows)

    def json(self) -> dict[str, Any]:
        """The JSON form ``rpm_patient.js`` draws."""
        return {
            "id": self.spec.id,
            "title": self.spec.title,
            "measures": [
                {"measure": m.value, "label": MEASURE_LABELS[m], "unit": self.units[m]}
                for m in self.spec.measures
            ],
            "series": [s.json() for s in self.series],
            "thresholds": [line.json() for line in self.lines],
            "count": self.count,
        }


def _number(value: Fraction) -> float:
    return round(float(value), 1)


def _show(value: float) -> str:
    return f"{value:g}"


def _setting_of(reading: rpm_rules.Reading) -> str:
    return UNRECORDED if reading.setting is None else reading.setting.value


def _crossed(values: Mapping[Measure, Fraction], thresholds: Thresholds | None) -> list[str]:
    """The PHI-free summaries of the single-reading rules this reading is beyond."""
    if thresholds is None:
        return []
    checks: list[tuple[Rule, tuple[Severity, str]]] = []
    sys_v, dia_v = values.get(Measure.SYSTOLIC), values.get(Measure.DIASTOLIC)
    if sys_v is not None or dia_v is not None:
        checks.append((Rule.BP_CRISIS, rpm_rules.bp_crisis(sys_v, dia_v, thresholds)))
    if sys_v is not None:
        checks.append((Rule.HYPOTENSION, rpm_rules.hypotension(sys_v, thresholds)))
    if (spo2 := values.get(Measure.SPO2)) is not None:
        checks.append((Rule.SPO2_LOW, rpm_rules.spo2_low(spo2, thresholds)))
    if (celsius := values.get(Measure.TEMPERATURE)) is not None:
        checks.append((Rule.FEVER, rpm_rules.fever(celsius, thresholds)))
    if (glucose := values.get(Measure.GLUCOSE)) is not None:
        checks.append((Rule.GLUCOSE_LOW, rpm_rules.glucose_low(glucose, thresholds)))
        checks.append((Rule.GLUCOSE_HIGH, rpm_rules.glucose_high(glucose, thresholds)))
    return [
        summary
        for rule, (severity, summary) in checks
        if thresholds.on(rule) and severity > Severity.NONE
    ]


def build_charts(
    observations: Sequence[Mapping[str, Any]],
    thresholds: Thresholds | None,
    zone: ZoneInfo,
    setting: str = "all",
) -> list[Chart]:
    """Every vital's chart from a patient's Observations (pure; ``setting`` filters)."""
    readings = [r for o in observations for r in rpm_rules.readings_from_observation(o)]
    if setting != "all":
        readings = [r for r in readings if _setting_of(r) == setting]
    # Weight in the unit the patient's scale uses (the newest reading's), else kg.
    weights = sorted(
        (r for r in readings if r.measure is Measure.WEIGHT), key=lambda r: r.effective
    )
    in_lb = bool(weights) and weights[-1].unit == "[lb_av]"
    units = {**_UNITS, Measure.WEIGHT: "lb" if in_lb else "kg"}

    def shown(reading: rpm_rules.Reading) -> float:
        value = reading.canonical
        if reading.measure is Measure.WEIGHT and in_lb:
            value = value / KG_PER_LB
        return _number(value)

    charts = []
    for spec in CHARTS:
        mine = sorted(
            (r for r in readings if r.measure in spec.measures),
            key=lambda r: (r.effective, r.observation_id),
        )
        settings = ["home", "clinic"]
        if setting != "all":
            settings = [setting]
        if any(_setting_of(r) == UNRECORDED for r in mine):
            settings.append(UNRECORDED)
        series = {(m, s): Series(m, s, units[m]) for m in spec.measures for s in settings}
        by_obs: dict[str, list[rpm_rules.Reading]] = {}
        for r in mine:
            series[(r.measure, _setting_of(r))].points.append(
                (int(r.effective.timestamp()), shown(r))
            )
            by_obs.setdefault(r.observation_id, []).append(r)
        rows = []
        for group in by_obs.values():
            first = group[0]
            values = {r.measure: r.canonical for r in group}
            rows.append(
                Row(
                    at=first.effective,
                    shown_at=first.effective.astimezone(zone).strftime("%Y-%m-%d %H:%M"),
                    setting=_setting_of(first),
                    values={r.measure: _recorded(r, shown(r), units[r.measure]) for r in group},
                    crossed=tuple(_crossed(values, thresholds)),
                )
            )
        rows.sort(key=lambda row: row.at, reverse=True)
        lines = []
        if thresholds is not None:
            for rule, param, label in spec.lines:
                if thresholds.on(rule):
                    measure = spec.measures[0]
                    value = _number(thresholds.value(rule, param))
                    lines.append(
                        Line(
                            rule,
                            param,
                            measure,
                            value,
                            label.format(v=_show(value)),
                            units[measure],
                        )
                    )
        charts.append(Chart(spec, units, tuple(series.values()), tuple(lines), tuple(rows)))
    return charts


def _recorded(reading: rpm_rules.Reading, value: float, unit: str) -> str:
    """``38.2 °C``, or ``38.2 °C (100.8 °F as measured)`` when converted."""
    text = f"{_show(value)} {unit}"
    same = rpm_rules.unit_text(reading.unit)
    if same != unit:
        text += f" ({reading.value} {same} as measured)"
    return text


# -- reads ----------------------------------------------------------------------------------


async def _actor() -> tuple[str, str]:
    session = await current_session()
    assert session is not None  # login_required
    return session.user.actor, session.user.username


async def _patient(patient_id: str, actor: str) -> dict[str, Any]:
    try:
        return await app_state().store.read("Patient", patient_id, actor)
    except NotFoundError:
        abort(404)


def _choices() -> tuple[int, str]:
    """The window (days) and setting asked for; anything unknown falls back to the default."""
    window_text = request.args.get("window", "")
    window = small_int(window_text) or DEFAULT_WINDOW
    if window not in WINDOWS:
        window = DEFAULT_WINDOW
    setting = request.args.get("setting", "all")
    return window, setting if setting in SETTINGS else "all"


def _site() -> rpm_rules.SiteDefaults:
    """The site's own defaults (``[rpm]`` quiet days and device-silent hours)."""
    rpm = app_state().config.rpm
    return rpm_rules.site_defaults(
        quiet_days=rpm.quiet_days, device_silent_hours=rpm.device_silent_hours
    )


def _thresholds(enrollment: Enrollment | None) -> Thresholds | None:
    if enrollment is None:
        return None
    try:
        return enrollment.thresholds(_site())
    except rpm_rules.ThresholdError:
        return None  # a stored override no longer valid: the form shows it to fix


async def _charts(
    patient_id: str, window: int, setting: str, thresholds: Thresholds | None, actor: str
) -> tuple[list[Chart], bool]:
    state = app_state()
    since = state.clock() - timedelta(days=window)
    billing = RpmBilling(state.store, state.zone)
    found, cut = await billing.observations(
        patient_id, since, ALL_CODES, actor=actor, limit=MAX_READINGS
    )
    return build_charts(found, thresholds, state.zone, setting), cut


# -- the page -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ThresholdField:
    """One input of the thresholds form."""

    name: str  # form field name
    label: str
    unit: str
    value: str  # the patient's own value, or what was typed
    default: str  # the program default in force (the placeholder)
    low: str
    high: str
    step: str
    error: str | None


@dataclass(frozen=True, slots=True)
class ThresholdRow:
    """One rule in the thresholds form."""

    rule: str
    title: str
    fields: tuple[ThresholdField, ...]
    enabled: str  # "" (program default), "on" or "off"
    default_on: bool
    on: bool
    own: bool  # the patient has their own value(s) for the rule
    error: str | None


def _plain(value: Fraction | float | int) -> str:
    """A threshold as people write it: 38.0 → 38, 0.5 stays 0.5."""
    exact = Fraction(str(value)) if not isinstance(value, Fraction) else value
    return format((Decimal(exact.numerator) / Decimal(exact.denominator)).normalize(), "f")


def _threshold_rows(
    enrollment: Enrollment,
    submitted: Mapping[str, str] | None,
    errors: Mapping[str, str],
) -> list[ThresholdRow]:
    defaults = rpm_rules.thresholds_for(
        enrollment.program, chronic_lung_disease=enrollment.chronic_lung_disease, site=_site()
    )
    current = _thresholds(enrollment) or defaults
    rows = []
    for form in RULE_FORMS:
        rule = form.rule.value
        own = enrollment.overrides.get(rule, {})
        fields = []
        for param, label in form.params.items():
            spec = rpm_rules.RULE_PARAMS[form.rule][param]
            name = f"t.{rule}.{param}"
            mine = own.get(param)
            value = (
                submitted.get(name, "")
                if submitted is not None
                else ("" if mine is None or isinstance(mine, bool) else _plain(mine))
            )
            fields.append(
                ThresholdField(
                    name=name,
                    label=label,
                    unit=UNIT_TEXT.get(spec.unit, spec.unit),
                    value=value,
                    default=_plain(defaults.value(form.rule, param)),
                    low=_plain(spec.low),
                    high=_plain(spec.high),
                    step="0.1" if spec.low.denominator != 1 or spec.unit == "Cel" else "1",
                    error=errors.get(name),
                )
            )
        own_enabled = own.get("enabled")
        enabled = (
            submitted.get(f"t.{rule}.enabled", "")
            if submitted is not None
            else ("" if not isinstance(own_enabled, bool) else ("on" if own_enabled else "off"))
        )
        rows.append(
            ThresholdRow(
                rule=rule,
                title=form.title,
                fields=tuple(fields),
                enabled=enabled,
                default_on=defaults.on(form.rule),
                on=current.on(form.rule),
                own=bool(own),
                error=errors.get(rule),
            )
        )
    return rows


@dataclass(frozen=True, slots=True)
class AlertView:
    """An open alert as the page lists it."""

    id: int
    rule: str
    severity: str
    state: str
    opened: str
    escalated_to: str | None
    severity_label: str
    state_label: str


def _alert_view(alert: Alert, zone: ZoneInfo) -> AlertView:
    rule, _, scope = alert.rule.partition(":")
    title = RULE_TITLES.get(rule, rule) + (f" ({scope})" if scope else "")
    return AlertView(
        alert.id,
        title,
        alert.severity.value,
        alert.state.value,
        alert.opened_at.astimezone(zone).strftime("%Y-%m-%d %H:%M"),
        alert.escalated_to,
        alert.severity.value.capitalize(),
        alert.state.value.capitalize(),
    )


async def _page(
    patient_id: str,
    *,
    error: str | None = None,
    errors: Mapping[str, str] | None = None,
    submitted: Mapping[str, str] | None = None,
    status: int = 200,
) -> ResponseReturnValue:
    state = app_state()
    session = await current_session()
    assert session is not None  # login_required
    actor = session.user.actor
    window, setting = _choices()
    patient = await _patient(patient_id, actor)
    enrollment = await Enrollments(state.store).get(patient_id, actor)
    thresholds = _thresholds(enrollment)
    billing: PatientBilling | None = None
    if enrollment is not None:
        found = await RpmBilling(state.store, state.zone).billing(
            patient_id=patient_id, actor=actor
        )
        billing = found[0] if found else None
    alerts = await AlertBook(state.store).live(actor, patient_id=patient_id)
    charts, cut = await _charts(patient_id, window, setting, thresholds, actor)
    today = state.clock().astimezone(state.zone).date()
    page = await render_template(
        "rpm_patient.html",
        patient_id=patient_id,
        name=display_name(patient),
        birth_date=str(patient.get("birthDate", "")),
        enrollment=enrollment,
        enrolled_on=None
        if enrollment is None
        else enrollment.enrolled_at.astimezone(state.zone).date().isoformat(),
        program_label=PROGRAM_LABELS,
        programs=list(Program),
        billing=billing,
        days_left=None if billing is None else (billing.period.end - today).days,
        alerts=[_alert_view(a, state.zone) for a in alerts],
        charts=charts,
        cut=cut,
        max_readings=MAX_READINGS,
        window=window,
        windows=WINDOWS,
        setting=setting,
        settings=SETTINGS,
        setting_labels=SETTING_LABELS,
        measure_labels=MEASURE_LABELS,
        threshold_rows=None
        if enrollment is None
        else _threshold_rows(enrollment, submitted, errors or {}),
        thresholds_broken=enrollment is not None and thresholds is None,
        today=today.isoformat(),
        can_manage=session.user.role in _STAFF,
        earliest_start=(today - timedelta(days=MAX_BACKDATE_DAYS)).isoformat(),
        max_backdate_days=MAX_BACKDATE_DAYS,
        max_minutes=MAX_MINUTES,
        max_note=MAX_NOTE,
        error=error,
        done=DONE.get(request.args.get("done", "")),
        series_url=url_for(
            "rpm_patient.series", patient_id=patient_id, window=window, setting=setting
        ),
    )
    return page, status


@bp.get("/<patient_id>")
@login_required(role=_VIEWERS)
async def patient(patient_id: str) -> ResponseReturnValue:
    """The patient's RPM page."""
    await require_access(patient_id)
    return await _page(patient_id)


@bp.get("/<patient_id>/series.json")
@login_required(role=_VIEWERS)
async def series(patient_id: str) -> ResponseReturnValue:
    """The charts' data: per vital, series per measure and setting, and threshold lines."""
    await require_access(patient_id)
    state = app_state()
    actor, _ = await _actor()
    window, setting = _choices()
    await _patient(patient_id, actor)
    enrollment = await Enrollments(state.store).get(patient_id, actor)
    charts, cut = await _charts(patient_id, window, setting, _thresholds(enrollment), actor)
    now = state.clock()
    return jsonify(
        {
            "patient_id": patient_id,
            "window_days": window,
            "setting": setting,
            "start": int((now - timedelta(days=window)).timestamp()),
            "end": int(now.timestamp()),
            "zone": state.zone.key,
            "enrolled": enrollment is not None,
            "truncated": cut,
            "charts": [chart.json() for chart in charts],
        }
    )


# -- changes --------------------------------------------------------------------------------


async def _form() -> dict[str, str]:
    form = await request.form
    return {k: str(v).strip() for k, v in form.items()}


def _done(patient_id: str, key: str) -> ResponseReturnValue:
    return redirect(url_for("rpm_patient.patient", patient_id=patient_id, done=key), 303)


@bp.post("/<patient_id>/enroll")
@login_required(role=_STAFF)
async def enroll(patient_id: str) -> ResponseReturnValue:
    """Enrol the patient, or change the program of their current enrolment."""
    await require_access(patient_id)
    state = app_state()
    actor, _ = await _actor()
    form = await _form()
    await _patient(patient_id, actor)
    lung_choice = form.get("chronic_lung_disease", "")
    if lung_choice not in ("", "yes", "no"):
        return await _page(
            patient_id, error="Choose whether the patient has chronic lung disease.", status=400
        )
    book = Enrollments(state.store)
    before = await book.get(patient_id, actor)
    start: datetime | None = None
    if before is None and form.get("enrolled_on"):
        today = state.clock().astimezone(state.zone).date()
        earliest = today - timedelta(days=MAX_BACKDATE_DAYS)
        try:
            day = date.fromisoformat(form["enrolled_on"])
        except ValueError:
            day = None
        if day is None or not earliest <= day <= today:
            return await _page(
                patient_id,
                error=f"Start date: today or up to {MAX_BACKDATE_DAYS} days back "
                f"({earliest.isoformat()} to {today.isoformat()}), never in the future.",
                status=400,
            )
        if day < today:  # today: the enrolment starts now
            start = datetime.combine(day, time.min, state.zone)
    if form.get("program") not in {p.value for p in Program}:
        return await _page(patient_id, error="Choose one of the programs listed.", status=400)
    try:
        await book.enroll(
            patient_id,
            form.get("program", ""),
            actor,
            chronic_lung_disease=None if not lung_choice else lung_choice == "yes",
            enrolled_at=start,
        )
    except EnrollmentError:
        return await _page(
            patient_id, error="The enrolment was not saved; check the start date.", status=400
        )
    return _done(patient_id, "enrolled" if before is None else "program")


@bp.post("/<patient_id>/unenroll")
@login_required(role=_STAFF)
async def unenroll(patient_id: str) -> ResponseReturnValue:
    """End the patient's enrolment (kept for billing; alerts already open stay open)."""
    await require_access(patient_id)
    actor, _ = await _actor()
    await _patient(patient_id, actor)
    try:
        await Enrollments(app_state().store).unenroll(patient_id, actor)
    except EnrollmentError:
        return await _page(patient_id, error="The patient is not enrolled.", status=400)
    return _done(patient_id, "ended")


def _parse_thresholds(
    form: Mapping[str, str], enrollment: Enrollment
) -> tuple[dict[str, dict[str, object]], dict[str, str]]:
    """The patient's own values per rule from the form, and what is wrong (field → message)."""
    wanted: dict[str, dict[str, object]] = {}
    errors: dict[str, str] = {}
    defaults = rpm_rules.thresholds_for(
        enrollment.program, chronic_lung_disease=enrollment.chronic_lung_disease, site=_site()
    )
    for rule_form in RULE_FORMS:
        rule = rule_form.rule.value
        params: dict[str, object] = {}
        for param, label in rule_form.params.items():
            spec = rpm_rules.RULE_PARAMS[rule_form.rule][param]
            name = f"t.{rule}.{param}"
            raw = form.get(name, "")
            if not raw:
                continue
            unit = UNIT_TEXT.get(spec.unit, spec.unit)
            try:
                number = Decimal(raw[:40])
            except InvalidOperation:
                number = Decimal("NaN")
            # "1e10000000" is finite, and turning it into a Fraction took seconds on the event
            # loop: no threshold has more than a handful of digits either side of the point.
            if not number.is_finite() or len(raw) > 40 or abs(number.adjusted()) > 6:
                errors[name] = f"{rule_form.title}, {label.lower()}: enter a number in {unit}."
            elif not spec.low <= Fraction(number) <= spec.high:
                errors[name] = (
                    f"{rule_form.title}, {label.lower()}: must be between {_plain(spec.low)} "
                    f"and {_plain(spec.high)} {unit}."
                )
            else:
                params[param] = raw
        enabled = form.get(f"t.{rule}.enabled", "")
        if enabled in ("on", "off"):
            params["enabled"] = enabled == "on"
        elif enabled:
            errors[rule] = f"{rule_form.title}: choose program default, on or off."
        if not any(f"t.{rule}.{p}" in errors for p in rule_form.params):
            problem = _out_of_order(rule_form, params, defaults)
            if problem:
                errors[rule] = problem
        wanted[rule] = params
    return wanted, errors


def _out_of_order(
    rule_form: RuleForm, params: Mapping[str, object], defaults: Thresholds
) -> str | None:
    """Why a rule's pair of levels is out of order (a blank one is its default), if it is."""
    ordered = _ORDERED.get(rule_form.rule)
    if ordered is None:
        return None

    def value_of(param: str) -> Fraction:
        raw = params.get(param)
        if isinstance(raw, str):
            return Fraction(Decimal(raw))
        return defaults.value(rule_form.rule, param)

    lower_name, upper_name = ordered
    lower, upper = value_of(lower_name), value_of(upper_name)
    if lower <= upper:
        return None
    unit = UNIT_TEXT.get(rpm_rules.RULE_PARAMS[rule_form.rule][lower_name].unit, "")
    return (
        f"{rule_form.title}: “{rule_form.params[lower_name].lower()}” ({_plain(lower)} {unit}) "
        f"must not be above “{rule_form.params[upper_name].lower()}” ({_plain(upper)} {unit})."
    )


def _same(rule: str, a: Mapping[str, object], b: Mapping[str, object]) -> bool:
    if not a or not b:
        return not a and not b
    try:
        return rpm_rules.validate_params(rule, a) == rpm_rules.validate_params(rule, b)
    except rpm_rules.ThresholdError:
        return False


@bp.post("/<patient_id>/thresholds")
@login_required(role=_STAFF)
async def thresholds(patient_id: str) -> ResponseReturnValue:
    """Save the patient's own thresholds (a blank field is the program default)."""
    await require_access(patient_id)
    state = app_state()
    actor, _ = await _actor()
    form = await _form()
    await _patient(patient_id, actor)
    book = Enrollments(state.store)
    enrollment = await book.get(patient_id, actor)
    if enrollment is None:
        return await _page(
            patient_id, error="Enrol the patient before setting thresholds.", status=400
        )
    wanted, errors = _parse_thresholds(form, enrollment)
    if not errors:
        try:  # the rules engine's own check of the whole set, as it will be used
            rpm_rules.thresholds_for(
                enrollment.program,
                chronic_lung_disease=enrollment.chronic_lung_disease,
                overrides={rule: params for rule, params in wanted.items() if params},
                site=_site(),
            )
        except rpm_rules.ThresholdError as exc:
            errors["form"] = str(exc)
    if errors:
        first = "The thresholds were not saved: " + " ".join(errors.values())
        return await _page(patient_id, error=first, errors=errors, submitted=form, status=400)
    changed = False
    try:
        for rule, params in wanted.items():
            own = enrollment.overrides.get(rule, {})
            if _same(rule, own, params):
                continue
            changed = True
            if not params or set(own) - set(params):
                await book.clear_threshold(patient_id, rule, actor)
            if params:
                await book.set_threshold(patient_id, rule, params, actor)
    except EnrollmentError as exc:  # changed by someone else meanwhile
        return await _page(patient_id, error=f"The thresholds were not saved: {exc}", status=409)
    return _done(patient_id, "thresholds" if changed else "unchanged")


@bp.post("/<patient_id>/time")
@login_required(role=_STAFF)
async def log_time(patient_id: str) -> ResponseReturnValue:
    """Log minutes of management time (99457/99458/99470) with an optional note."""
    await require_access(patient_id)
    state = app_state()
    actor, username = await _actor()
    form = await _form()
    await _patient(patient_id, actor)
    minutes_text = form.get("minutes", "")
    minutes = small_int(minutes_text)
    if minutes is None or not 0 < minutes <= MAX_MINUTES:
        return await _page(
            patient_id, error=f"Minutes: a whole number from 1 to {MAX_MINUTES}.", status=400
        )
    day_text = form.get("performed_on", "")
    try:
        day = date.fromisoformat(day_text) if day_text else None
    except ValueError:
        return await _page(patient_id, error="Date: use the date picker (YYYY-MM-DD).", status=400)
    note = form.get("note", "")
    if len(note) > MAX_NOTE:
        return await _page(patient_id, error=f"Note: at most {MAX_NOTE} characters.", status=400)
    try:
        await RpmBilling(state.store, state.zone).log_time(
            patient_id,
            minutes,
            staff=username,
            actor=actor,
            performed_on=day,
            interactive=form.get("interactive") == "on",
            note=note or None,
        )
    except RpmError:
        return await _page(
            patient_id,
            error="Time can be logged only for a day on which the patient was enrolled, "
            "up to today.",
            status=400,
        )
    except ApplianceError:
        return await _page(patient_id, error="Could not save; try again.", status=503)
    return _done(patient_id, "time")
