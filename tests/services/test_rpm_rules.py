"""The alert rules are pure: Observations and thresholds in, findings out, exactly."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.device_registry import Setting
from services import rpm_rules, vitals
from services.rpm_rules import (
    Finding,
    Measure,
    Program,
    Reading,
    Rule,
    Severity,
    ThresholdError,
    Thresholds,
    describe_values,
)
from tests import factories

NOW = datetime(2026, 11, 26, 15, 0, tzinfo=UTC)
PATIENT = "0190a1b2-0000-7000-8000-000000000001"
DEFAULTS = rpm_rules.thresholds_for(Program.HEART_FAILURE, chronic_lung_disease=False)
ALL_ON = Thresholds(frozenset(Rule) - rpm_rules.SITE_RULES, DEFAULTS.values)


def _obs(
    code: str, value: Any, unit: str, *, at: datetime = NOW, obs_id: str = "o1"
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": obs_id,
        "meta": {"tag": [{"system": vitals.CAPTURE_SETTING_SYSTEM, "code": "home"}]},
        "status": "final",
        "code": {"coding": [{"system": vitals.LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{PATIENT}"},
        "effectiveDateTime": at.isoformat(),
        "valueQuantity": {"value": value, "unit": unit, "system": vitals.UCUM, "code": unit},
    }


def _reading(
    measure: Measure, value: str, unit: str, *, at: datetime = NOW, obs_id: str = "o1"
) -> Reading:
    return Reading(obs_id, PATIENT, measure, Decimal(value), unit, at, Setting.HOME)


def _bp(systolic: str, diastolic: str, *, at: datetime = NOW, obs_id: str = "bp1") -> list[Reading]:
    return [
        _reading(Measure.SYSTOLIC, systolic, "mm[Hg]", at=at, obs_id=obs_id),
        _reading(Measure.DIASTOLIC, diastolic, "mm[Hg]", at=at, obs_id=obs_id),
    ]


def _findings(
    new: list[Reading],
    history: list[Reading] | None = None,
    thresholds: Thresholds = ALL_ON,
    now: datetime = NOW,
) -> list[Finding]:
    return rpm_rules.evaluate(PATIENT, new, history or [], thresholds, now)


def _severity(findings: list[Finding], rule: Rule) -> Severity:
    return max((f.severity for f in findings if f.rule is rule), default=Severity.NONE)


# -- extraction -------------------------------------------------------------------------


def test_extracts_both_components_of_a_blood_pressure_panel() -> None:
    body = factories.bp_observation(f"Patient/{PATIENT}", systolic=182, diastolic=96)
    body["id"] = "bp-1"
    readings = rpm_rules.readings_from_observation(body)
    assert [(r.measure, r.value, r.unit) for r in readings] == [
        (Measure.SYSTOLIC, Decimal(182), "mm[Hg]"),
        (Measure.DIASTOLIC, Decimal(96), "mm[Hg]"),
    ]
    assert readings[0].patient_id == PATIENT
    assert readings[0].effective == datetime(2026, 11, 26, 15, 30, tzinfo=UTC)


def test_extracts_value_unit_time_and_capture_setting() -> None:
    [reading] = rpm_rules.readings_from_observation(_obs("8310-5", 100.4, "[degF]"))
    assert reading == Reading(
        "o1", PATIENT, Measure.TEMPERATURE, Decimal("100.4"), "[degF]", NOW, Setting.HOME
    )
    assert reading.canonical == 38  # (100.4 - 32) x 5/9, exactly


@pytest.mark.parametrize(
    "change",
    [
        {"status": "entered-in-error"},
        {"valueQuantity": {"value": 90, "unit": "furlongs", "code": "furlongs"}},
        {"valueQuantity": {"value": "lots", "unit": "%", "code": "%"}},
        {"effectiveDateTime": "2026-11-26T09:00:00"},  # no timezone: not an instant
        {"effectiveDateTime": "2026-11"},
        {"code": {"coding": [{"system": vitals.LOINC, "code": "9279-1"}]}},  # respiratory rate
        {"resourceType": "Patient"},
        {"valueQuantity": None, "dataAbsentReason": {"text": "error"}},
    ],
)
def test_gives_nothing_for_what_it_cannot_read(change: dict[str, Any]) -> None:
    assert rpm_rules.readings_from_observation({**_obs("59408-5", 91, "%"), **change}) == []


def test_never_raises_on_garbage() -> None:
    for junk in (
        {},
        {"resourceType": "Observation", "id": 3},
        {
            "resourceType": "Observation",
            "status": "final",
            "id": "x",
            "effectiveDateTime": NOW.isoformat(),
            "code": "nope",
            "component": "x",
        },
    ):
        assert rpm_rules.readings_from_observation(junk) == []


# -- thresholds -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("systolic", "diastolic", "severity", "summary"),
    [
        ("179", "119", Severity.NONE, None),
        ("180", "90", Severity.CRITICAL, "systolic ≥ 180"),
        ("150", "120", Severity.CRITICAL, "diastolic ≥ 120"),
        ("200", "125", Severity.CRITICAL, "systolic ≥ 180 and diastolic ≥ 120"),
    ],
)
def test_blood_pressure_crisis_at_180_and_or_120(
    systolic: str, diastolic: str, severity: Severity, summary: str | None
) -> None:
    findings = [f for f in _findings(_bp(systolic, diastolic)) if f.rule is Rule.BP_CRISIS]
    assert _severity(findings, Rule.BP_CRISIS) is severity
    if summary is not None:
        [crisis] = [f for f in findings if not f.in_range]
        assert crisis.summary == summary
        assert crisis.observation_id == "bp1"
        assert crisis.detail == "systolic 200 mm[Hg], diastolic 125 mm[Hg]" or systolic != "200"
        assert "200" not in crisis.summary  # the value is PHI: never in the summary


def test_hypotension_below_90_systolic() -> None:
    assert _severity(_findings(_bp("89", "60")), Rule.HYPOTENSION) is Severity.HIGH
    assert _severity(_findings(_bp("90", "60")), Rule.HYPOTENSION) is Severity.NONE


@pytest.mark.parametrize(
    ("spo2", "lung", "severity"),
    [
        ("94", False, Severity.NONE),
        ("93", False, Severity.HIGH),
        ("87", False, Severity.CRITICAL),
        ("90", True, Severity.NONE),
        ("87", True, Severity.HIGH),
        ("84", True, Severity.CRITICAL),
    ],
)
def test_spo2_thresholds_are_lower_with_chronic_lung_disease(
    spo2: str, lung: bool, severity: Severity
) -> None:
    thresholds = rpm_rules.thresholds_for(Program.COPD, chronic_lung_disease=lung)
    findings = _findings([_reading(Measure.SPO2, spo2, "%")], thresholds=thresholds)
    assert _severity(findings, Rule.SPO2_LOW) is severity


@pytest.mark.parametrize(
    ("value", "unit", "severity"),
    [
        ("37.9", "Cel", Severity.NONE),
        ("38.0", "Cel", Severity.MEDIUM),
        ("100.4", "[degF]", Severity.MEDIUM),  # exactly 38.0 °C
        ("100.3", "[degF]", Severity.NONE),
        ("39.5", "Cel", Severity.HIGH),
    ],
)
def test_fever_from_38_celsius_in_either_unit(value: str, unit: str, severity: Severity) -> None:
    findings = _findings([_reading(Measure.TEMPERATURE, value, unit)])
    assert _severity(findings, Rule.FEVER) is severity


@pytest.mark.parametrize(
    ("value", "unit", "low", "high"),
    [
        ("71", "mg/dL", Severity.NONE, Severity.NONE),
        ("70", "mg/dL", Severity.HIGH, Severity.NONE),
        ("54", "mg/dL", Severity.HIGH, Severity.NONE),
        ("53.9", "mg/dL", Severity.CRITICAL, Severity.NONE),
        ("250", "mg/dL", Severity.NONE, Severity.NONE),
        ("251", "mg/dL", Severity.NONE, Severity.MEDIUM),
        ("3.8", "mmol/L", Severity.HIGH, Severity.NONE),  # 68.46 mg/dL
        ("3.9", "mmol/L", Severity.NONE, Severity.NONE),  # 70.26 mg/dL: not <= 70
        ("2.9", "mmol/L", Severity.CRITICAL, Severity.NONE),
        ("13.9", "mmol/L", Severity.NONE, Severity.MEDIUM),  # 250.42 mg/dL
    ],
)
def test_glucose_levels_in_mg_dl_and_mmol_l(
    value: str, unit: str, low: Severity, high: Severity
) -> None:
    findings = _findings([_reading(Measure.GLUCOSE, value, unit)])
    assert _severity(findings, Rule.GLUCOSE_LOW) is low
    assert _severity(findings, Rule.GLUCOSE_HIGH) is high


def test_rules_outside_the_program_do_not_fire() -> None:
    diabetes = rpm_rules.thresholds_for(Program.DIABETES, chronic_lung_disease=False)
    assert (
        _severity(_findings(_bp("85", "50"), thresholds=diabetes), Rule.HYPOTENSION)
        is Severity.NONE
    )
    assert (
        _severity(_findings(_bp("185", "50"), thresholds=diabetes), Rule.BP_CRISIS)
        is Severity.CRITICAL
    )


def test_a_patient_override_changes_the_threshold_and_can_turn_a_rule_off() -> None:
    mine = rpm_rules.thresholds_for(
        Program.HYPERTENSION,
        chronic_lung_disease=False,
        overrides={"bp-crisis": {"systolic": 170}, "no-data": {"enabled": False}},
    )
    assert (
        _severity(_findings(_bp("172", "80"), thresholds=mine), Rule.BP_CRISIS) is Severity.CRITICAL
    )
    assert not mine.on(Rule.NO_DATA)


def test_invalid_parameters_are_refused_all_at_once() -> None:
    with pytest.raises(ThresholdError) as caught:
        rpm_rules.validate_params(
            "bp-crisis", {"systolic": 400, "diastolic": "high", "colour": 1, "enabled": "yes"}
        )
    message = str(caught.value)
    for part in ("bp-crisis.systolic", "bp-crisis.diastolic", "bp-crisis.colour", "enabled"):
        assert part in message
    with pytest.raises(ThresholdError, match="level2 must not be above level1"):
        rpm_rules.validate_params("glucose-low", {"level1": 60, "level2": 65})
    with pytest.raises(ThresholdError, match="unknown rule"):
        rpm_rules.validate_params("vibes", {})
    with pytest.raises(ThresholdError, match="site-level"):
        rpm_rules.validate_params("sync-backlog", {})
    with pytest.raises(ThresholdError):
        rpm_rules.validate_params("fever", {"celsius": True})


# -- trends and rate of change ----------------------------------------------------------


def test_heart_failure_weight_gain_in_a_day_across_units() -> None:
    # Yesterday's weighing was a little earlier in the day than 24 hours ago: still "a day".
    yesterday = _reading(
        Measure.WEIGHT, "80", "kg", at=NOW - timedelta(hours=24, minutes=10), obs_id="w0"
    )
    # 80 kg = 176.3698 lb; 178.37 lb is 2.0002 lb more.
    today = _reading(Measure.WEIGHT, "178.37", "[lb_av]", obs_id="w1")
    findings = _findings([today], [yesterday])
    [day] = [f for f in findings if f.rule is Rule.WEIGHT_GAIN_DAY]
    assert day.severity is Severity.MEDIUM
    assert day.summary == "weight gain ≥ 2 lb in 1 day"
    assert _severity(findings, Rule.WEIGHT_GAIN_WEEK) is Severity.NONE
    barely_less = _reading(Measure.WEIGHT, "178.36", "[lb_av]", obs_id="w1")
    assert _severity(_findings([barely_less], [yesterday]), Rule.WEIGHT_GAIN_DAY) is Severity.NONE


def test_weekly_gain_counts_from_the_lightest_weight_of_the_week() -> None:
    light = _reading(Measure.WEIGHT, "78", "kg", at=NOW - timedelta(days=6), obs_id="w-6")
    middle = _reading(Measure.WEIGHT, "79.5", "kg", at=NOW - timedelta(days=1), obs_id="w-1")
    today = _reading(Measure.WEIGHT, "80.3", "kg", obs_id="w0")  # +2.3 kg = 5.07 lb on the week
    findings = _findings([today], [light, middle])
    assert _severity(findings, Rule.WEIGHT_GAIN_WEEK) is Severity.MEDIUM
    assert _severity(findings, Rule.WEIGHT_GAIN_DAY) is Severity.NONE  # +0.8 kg = 1.76 lb
    too_old = _reading(Measure.WEIGHT, "70", "kg", at=NOW - timedelta(days=8), obs_id="w-8")
    assert _severity(_findings([today], [too_old, middle]), Rule.WEIGHT_GAIN_WEEK) is Severity.NONE


def test_systolic_rise_between_consecutive_readings() -> None:
    before = _bp("120", "80", at=NOW - timedelta(hours=2), obs_id="bp0")
    assert _severity(_findings(_bp("161", "85"), before), Rule.SYSTOLIC_RISE) is Severity.MEDIUM
    assert _severity(_findings(_bp("160", "85"), before), Rule.SYSTOLIC_RISE) is Severity.NONE
    long_ago = _bp("120", "80", at=NOW - timedelta(hours=30), obs_id="bp0")
    assert _severity(_findings(_bp("165", "85"), long_ago), Rule.SYSTOLIC_RISE) is Severity.NONE


# -- back in range ----------------------------------------------------------------------


def test_back_in_range_comes_from_the_newest_reading_only() -> None:
    crisis = _bp("190", "100", at=NOW, obs_id="late-crisis")
    old_normal = _bp("120", "80", at=NOW - timedelta(minutes=5), obs_id="old-normal")
    # The normal reading arrives late: a newer crisis is already in the history.
    findings = _findings(old_normal, crisis)
    assert not [f for f in findings if f.rule is Rule.BP_CRISIS]
    # A normal re-measure after the crisis says "in range", and that clears.
    remeasure = _bp("150", "90", at=NOW + timedelta(minutes=3), obs_id="remeasure")
    [clear] = [f for f in _findings(remeasure, crisis) if f.rule is Rule.BP_CRISIS]
    assert clear.clears
    assert clear.observation_id == "remeasure"


def test_a_late_crisis_older_than_a_normal_reading_opens_and_is_cleared_by_it() -> None:
    newer_normal = _bp("120", "80", at=NOW, obs_id="normal")
    old_crisis = _bp("185", "100", at=NOW - timedelta(minutes=10), obs_id="crisis")
    findings = [f for f in _findings(old_crisis, newer_normal) if f.rule is Rule.BP_CRISIS]
    assert [(f.severity, f.observation_id) for f in findings] == [
        (Severity.CRITICAL, "crisis"),
        (Severity.NONE, "normal"),
    ]


def test_trend_findings_never_clear_themselves() -> None:
    finding = Finding(Rule.WEIGHT_GAIN_DAY, PATIENT, Severity.NONE, "x", NOW)
    assert finding.in_range
    assert not finding.clears


def test_an_old_reading_from_a_meters_memory_raises_nothing() -> None:
    old = _reading(Measure.GLUCOSE, "40", "mg/dL", at=NOW - timedelta(days=3))
    assert _severity(_findings([old]), Rule.GLUCOSE_LOW) is Severity.NONE


def test_any_reading_says_data_is_arriving() -> None:
    [arriving] = [
        f for f in _findings([_reading(Measure.HEART_RATE, "70", "/min")]) if f.rule is Rule.NO_DATA
    ]
    assert arriving.clears


# -- data stopped -----------------------------------------------------------------------


def test_no_data_fires_exactly_at_n_days() -> None:
    last = NOW - timedelta(days=5)
    at = last + timedelta(days=3)
    before = rpm_rules.quiet_patient(
        PATIENT, last, last - timedelta(days=30), ALL_ON, at - timedelta(microseconds=1)
    )
    due = rpm_rules.quiet_patient(PATIENT, last, last - timedelta(days=30), ALL_ON, at)
    assert before is not None
    assert before.severity is Severity.NONE
    assert due is not None
    assert due.severity is Severity.LOW
    assert due.summary == "no reading for 3 days"


def test_no_data_counts_from_enrolment_when_nothing_ever_came() -> None:
    enrolled = NOW - timedelta(days=2)
    first = rpm_rules.quiet_patient(PATIENT, None, enrolled, ALL_ON, NOW)
    assert first is not None
    assert first.severity is Severity.NONE
    later = rpm_rules.quiet_patient(PATIENT, None, enrolled, ALL_ON, NOW + timedelta(days=1))
    assert later is not None
    assert later.severity is Severity.LOW


def test_device_silence_is_per_device_and_sync_backlog_is_site_level() -> None:
    silent = rpm_rules.silent_device(
        "scale-7", PATIENT, NOW - timedelta(hours=48), NOW - timedelta(days=9), ALL_ON, NOW
    )
    assert silent is not None
    assert (silent.severity, silent.key) == (Severity.LOW, "device-silent:scale-7")
    backlog = rpm_rules.sync_backlog(NOW - timedelta(hours=25), NOW, 24)
    assert (backlog.severity, backlog.patient_id) == (Severity.MEDIUM, None)
    assert rpm_rules.sync_backlog(None, NOW, 24).in_range


def test_severity_is_ordered_by_rank_not_by_text() -> None:
    assert Severity.NONE < Severity.LOW < Severity.MEDIUM < Severity.HIGH < Severity.CRITICAL
    assert max([Severity.HIGH, Severity.CRITICAL, Severity.LOW]) is Severity.CRITICAL
    assert sorted([Severity.CRITICAL, Severity.NONE, Severity.MEDIUM]) == [
        Severity.NONE,
        Severity.MEDIUM,
        Severity.CRITICAL,
    ]


# -- properties -------------------------------------------------------------------------

tenths = st.integers(min_value=0, max_value=10_000).map(lambda n: Decimal(n) / 10)


def _one(measure: Measure, value: Decimal, unit: str, rule: Rule) -> Severity:
    return _severity(_findings([_reading(measure, str(value), unit)]), rule)


@given(st.integers(40, 300), st.integers(20, 200), st.integers(0, 60), st.integers(0, 60))
def test_a_higher_blood_pressure_never_lowers_the_crisis_severity(
    s: int, d: int, ds: int, dd: int
) -> None:
    low = _severity(_findings(_bp(str(s), str(d))), Rule.BP_CRISIS)
    high = _severity(_findings(_bp(str(s + ds), str(d + dd))), Rule.BP_CRISIS)
    assert high >= low
    lower = _severity(_findings(_bp(str(s - ds), str(d))), Rule.HYPOTENSION)
    assert lower >= _severity(_findings(_bp(str(s), str(d))), Rule.HYPOTENSION)


@given(tenths, tenths)
def test_worse_single_values_never_lower_the_severity(a: Decimal, b: Decimal) -> None:
    lo, hi = min(a, b), max(a, b)
    assert _one(Measure.SPO2, lo, "%", Rule.SPO2_LOW) >= _one(Measure.SPO2, hi, "%", Rule.SPO2_LOW)
    assert _one(Measure.GLUCOSE, lo, "mg/dL", Rule.GLUCOSE_LOW) >= _one(
        Measure.GLUCOSE, hi, "mg/dL", Rule.GLUCOSE_LOW
    )
    assert _one(Measure.GLUCOSE, hi, "mg/dL", Rule.GLUCOSE_HIGH) >= _one(
        Measure.GLUCOSE, lo, "mg/dL", Rule.GLUCOSE_HIGH
    )
    t_lo, t_hi = lo / 100 + 34, hi / 100 + 34
    assert _one(Measure.TEMPERATURE, t_hi, "Cel", Rule.FEVER) >= _one(
        Measure.TEMPERATURE, t_lo, "Cel", Rule.FEVER
    )


@given(st.integers(60_000, 120_000), st.integers(0, 5_000), st.integers(0, 5_000))
def test_a_heavier_weight_never_lowers_the_gain_severity(base_g: int, a: int, b: int) -> None:
    earlier = _reading(
        Measure.WEIGHT, str(Decimal(base_g) / 1000), "kg", at=NOW - timedelta(hours=20), obs_id="w0"
    )
    lo, hi = sorted((a, b))

    def gain(extra_g: int) -> Severity:
        today = _reading(Measure.WEIGHT, str(Decimal(base_g + extra_g) / 1000), "kg", obs_id="w1")
        return _severity(_findings([today], [earlier]), Rule.WEIGHT_GAIN_DAY)

    assert gain(hi) >= gain(lo)


def _without_units(findings: list[Finding]) -> list[tuple[Any, ...]]:
    return [(f.rule, f.severity, f.summary, f.at, f.observation_id) for f in findings]


@given(st.integers(300, 450))
def test_fahrenheit_and_celsius_give_the_same_finding(tenths_c: int) -> None:
    celsius = Decimal(tenths_c) / 10
    fahrenheit = celsius * 9 / 5 + 32  # exact: a tenth of a degree C is 0.18 °F
    a = _findings([_reading(Measure.TEMPERATURE, str(celsius), "Cel")])
    b = _findings([_reading(Measure.TEMPERATURE, str(fahrenheit), "[degF]")])
    assert _without_units(a) == _without_units(b)


@given(st.integers(10_000, 40_000), st.integers(-600, 600))
def test_pounds_and_kilograms_give_the_same_finding(hundredths_lb: int, gain: int) -> None:
    lb_before, lb_now = Decimal(hundredths_lb) / 100, Decimal(hundredths_lb + gain) / 100
    per_lb = Decimal("0.45359237")  # exact: pounds to kilograms is a finite decimal

    def findings(unit: str, convert: Decimal) -> list[Finding]:
        earlier = _reading(
            Measure.WEIGHT,
            str(lb_before * convert),
            unit,
            at=NOW - timedelta(hours=23),
            obs_id="w0",
        )
        today = _reading(Measure.WEIGHT, str(lb_now * convert), unit, obs_id="w1")
        return _findings([today], [earlier])

    assert _without_units(findings("[lb_av]", Decimal(1))) == _without_units(findings("kg", per_lb))


@given(st.integers(10, 400))
def test_mmol_per_litre_and_mg_per_decilitre_give_the_same_finding(tenths_mmol: int) -> None:
    mmol = Decimal(tenths_mmol) / 10
    mg = mmol * Decimal("18.0156")  # exact: the conversion is a finite decimal
    a = _findings([_reading(Measure.GLUCOSE, str(mmol), "mmol/L")])
    b = _findings([_reading(Measure.GLUCOSE, str(mg), "mg/dL")])
    assert _without_units(a) == _without_units(b)


@settings(max_examples=50)
@given(st.lists(st.integers(60, 220), min_size=1, max_size=8), st.randoms())
def test_findings_depend_only_on_the_inputs(systolics: list[int], rng: random.Random) -> None:
    readings = [
        r
        for i, s in enumerate(systolics)
        for r in _bp(str(s), "80", at=NOW - timedelta(minutes=10 * i), obs_id=f"bp{i}")
    ]
    shuffled = list(readings)
    rng.shuffle(shuffled)
    assert _findings(readings) == _findings(shuffled) == _findings(list(readings))


@given(st.integers(0, 10 * 24 * 3600))
def test_no_data_never_fires_before_n_days(seconds_quiet: int) -> None:
    last = NOW - timedelta(days=30)
    finding = rpm_rules.quiet_patient(
        PATIENT, last, last - timedelta(days=1), ALL_ON, last + timedelta(seconds=seconds_quiet)
    )
    assert finding is not None
    assert (finding.severity is Severity.LOW) == (seconds_quiet >= 3 * 24 * 3600)


def test_values_are_described_in_the_units_people_read() -> None:
    assert describe_values("systolic 196 mm[Hg], diastolic 100 mm[Hg]") == "BP 196/100 mmHg"
    assert describe_values("systolic 85 mm[Hg]") == "Systolic 85 mmHg"
    assert describe_values("spo2 91 %") == "SpO2 91 %"
    assert describe_values("temperature 38.4 Cel") == "Temperature 38.4 °C"
    assert describe_values("temperature 101.3 [degF]") == "Temperature 101.3 °F"
    assert describe_values("weight 180.2 [lb_av]") == "Weight 180.2 lb"
    assert describe_values("weight 82.1 kg") == "Weight 82.1 kg"
    assert describe_values("glucose 3.1 mmol/L") == "Glucose 3.1 mmol/L"
    assert describe_values("glucose 48 mg/dL") == "Glucose 48 mg/dL"
    assert describe_values("heart-rate 130 /min") == "Pulse 130 /min"
    assert describe_values("") == ""
    assert describe_values("something else") == "something else"


def test_the_detail_of_a_finding_reads_back_for_people() -> None:
    at = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
    reading = Reading("o1", "p1", Measure.TEMPERATURE, Decimal("38.4"), "Cel", at)
    assert describe_values(rpm_rules._detail(reading)) == "Temperature 38.4 °C"
