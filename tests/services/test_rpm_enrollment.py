"""Enrolment and per-patient thresholds: validated, audited, and what the engine uses."""

from __future__ import annotations

from datetime import datetime, timedelta
from fractions import Fraction
from zoneinfo import ZoneInfo

import pytest

from appliance.store import Store
from services.alerts import AlertEngine
from services.rpm_enrollment import EnrollmentError, Enrollments
from services.rpm_rules import Program, Rule
from tests import factories

NURSE = "user:nurse"


async def _patient(store: Store) -> str:
    [patient] = await store.create([factories.patient()], NURSE)
    return patient.logical_id


async def _audit(store: Store, patient_id: str) -> list[tuple[str, str, str]]:
    rows = await store.query(
        "SELECT action, entity, detail FROM audit WHERE patient_key = ? AND entity LIKE "
        "'rpm-enrollment%' ORDER BY id",
        (store.patient_key(f"Patient/{patient_id}"),),
    )
    return [(r[0], r[1], r[2]) for r in rows]


async def test_enrol_list_and_unenrol_are_audited(store: Store) -> None:
    book = Enrollments(store)
    a, b = await _patient(store), await _patient(store)
    enrolled = await book.enroll(a, "heart-failure", NURSE)
    assert (enrolled.program, enrolled.chronic_lung_disease, enrolled.enrolled_by) == (
        Program.HEART_FAILURE,
        False,
        NURSE,
    )
    await book.enroll(b, Program.COPD, NURSE)
    assert [e.patient_id for e in await book.enrolled(NURSE)] == [a, b]
    assert [e.patient_id for e in await book.enrolled(NURSE, program=Program.COPD)] == [b]
    copd = await book.get(b, NURSE)
    assert copd is not None
    assert copd.chronic_lung_disease  # COPD implies it unless said otherwise
    await book.unenroll(a, NURSE)
    assert await book.get(a, NURSE) is None
    with pytest.raises(EnrollmentError):
        await book.unenroll(a, NURSE)
    assert [(x[0], x[2]) for x in await _audit(store, a) if x[2]] == [
        ("create", "enrolled heart-failure"),
        ("update", "unenrolled"),
    ]


async def test_enrolling_again_starts_a_new_enrolment_and_a_program_change_keeps_the_start(
    store: Store,
) -> None:
    book = Enrollments(store)
    patient = await _patient(store)
    first = await book.enroll(patient, Program.HYPERTENSION, NURSE)
    moved = await book.enroll(patient, Program.HEART_FAILURE, "user:other")
    assert (moved.program, moved.enrolled_at, moved.enrolled_by) == (
        Program.HEART_FAILURE,
        first.enrolled_at,
        NURSE,
    )
    await book.unenroll(patient, NURSE)
    again = await book.enroll(patient, Program.DIABETES, "user:other")
    assert again.enrolled_by == "user:other"
    assert again.enrolled_at >= first.enrolled_at
    with pytest.raises(EnrollmentError, match="unknown program"):
        await book.enroll(patient, "astrology", NURSE)


async def test_thresholds_are_validated_merged_and_cleared(store: Store) -> None:
    book = Enrollments(store)
    patient = await _patient(store)
    with pytest.raises(EnrollmentError, match="not enrolled"):
        await book.set_threshold(patient, "bp-crisis", {"systolic": 170}, NURSE)
    await book.enroll(patient, Program.HYPERTENSION, NURSE)
    thresholds = await book.set_threshold(patient, "bp-crisis", {"systolic": 170}, NURSE)
    assert thresholds.value(Rule.BP_CRISIS, "systolic") == 170
    thresholds = await book.set_threshold(patient, "bp-crisis", {"diastolic": 110.5}, NURSE)
    assert thresholds.value(Rule.BP_CRISIS, "systolic") == 170  # kept
    assert thresholds.value(Rule.BP_CRISIS, "diastolic") == Fraction("110.5")
    with pytest.raises(EnrollmentError) as caught:
        await book.set_threshold(patient, "bp-crisis", {"systolic": 999, "diastolic": "x"}, NURSE)
    assert "bp-crisis.systolic" in str(caught.value)
    assert "bp-crisis.diastolic" in str(caught.value)
    # In order with what is already set: level 2 above an existing level 1 is refused.
    await book.set_threshold(patient, "glucose-low", {"level1": 60}, NURSE)
    with pytest.raises(EnrollmentError, match="level2 must not be above level1"):
        await book.set_threshold(patient, "glucose-low", {"level2": 65}, NURSE)
    with pytest.raises(EnrollmentError, match="no parameters"):
        await book.set_threshold(patient, "fever", {}, NURSE)
    current = await book.get(patient, NURSE)
    assert current is not None
    assert current.overrides["bp-crisis"] == {"systolic": 170, "diastolic": 110.5}
    assert await book.clear_threshold(patient, "bp-crisis", NURSE)
    assert not await book.clear_threshold(patient, "bp-crisis", NURSE)
    current = await book.get(patient, NURSE)
    assert current is not None
    assert current.thresholds().value(Rule.BP_CRISIS, "systolic") == 180
    details = [x[2] for x in await _audit(store, patient)]
    assert 'threshold bp-crisis {"systolic":170}' in details
    assert "threshold bp-crisis cleared" in details


async def test_the_engine_uses_the_patients_thresholds(store: Store) -> None:
    book = Enrollments(store)
    patient = await _patient(store)
    await book.enroll(patient, Program.DIABETES, NURSE)
    await book.set_threshold(patient, "hypotension", {"enabled": True, "systolic": 100}, NURSE)
    await book.set_threshold(patient, "no-data", {"enabled": False}, NURSE)
    who = (await AlertEngine(store).enrolled())[patient]
    assert who.thresholds.on(Rule.HYPOTENSION)
    assert who.thresholds.value(Rule.HYPOTENSION, "systolic") == 100
    assert not who.thresholds.on(Rule.NO_DATA)


async def test_an_enrolment_may_start_up_to_30_days_back_never_in_the_future(
    store: Store,
) -> None:
    book = Enrollments(store)
    a, b = await _patient(store), await _patient(store)
    zone = ZoneInfo("America/Chicago")
    today = store.now().astimezone(zone).date()
    earliest = datetime.combine(today - timedelta(days=30), datetime.min.time(), zone)
    started = await book.enroll(a, Program.HYPERTENSION, NURSE, enrolled_at=earliest)
    assert started.enrolled_at == earliest  # midnight of that day, site time
    too_early = earliest - timedelta(minutes=1)  # 31 calendar days back
    tomorrow = store.now() + timedelta(hours=1)
    for wrong, why in (
        (too_early, "at most 30 days back"),
        (tomorrow, "cannot start in the future"),
        (datetime(2026, 1, 1), "needs a time zone"),  # naive: the mistake tested
    ):
        with pytest.raises(EnrollmentError, match=why):
            await book.enroll(b, Program.HYPERTENSION, NURSE, enrolled_at=wrong)
    assert await book.get(b, NURSE) is None
    # A program change keeps the start; a start given with it corrects the start.
    moved = await book.enroll(a, Program.DIABETES, NURSE)
    assert moved.enrolled_at == earliest
    corrected = await book.enroll(
        a, Program.DIABETES, NURSE, enrolled_at=earliest + timedelta(days=2)
    )
    assert corrected.enrolled_at == earliest + timedelta(days=2)
    details = [x[2] for x in await _audit(store, a) if x[2].startswith("enrolled")]
    assert details[0].startswith("enrolled hypertension from ")
    assert details[1] == "enrolled diabetes"
