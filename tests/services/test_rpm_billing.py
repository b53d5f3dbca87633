"""RPM billing counters and staff time logs, over a real store in the site's zone (Chicago)."""

from __future__ import annotations

import sqlite3
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from appliance.store import UNREADABLE_LEFT_OUT, Store
from services.rpm_billing import (
    NOTE_LABEL,
    Period,
    RpmBilling,
    RpmError,
    at_risk,
    device_code,
    management_codes,
    period_on,
)
from services.vitals import CAPTURE_METHOD_SYSTEM, CAPTURE_SETTING_SYSTEM
from tests import factories

CHICAGO = ZoneInfo("America/Chicago")
ENROLLED = date(2026, 10, 1)


async def _enrolled_patient(store: Store, *, mrn: str = "T0001", ended: str | None = None) -> str:
    [patient] = await store.create([factories.patient(mrn=mrn)], "user:admin")
    await store.transact(
        lambda conn: conn.execute(
            "INSERT INTO rpm_enrollment (patient_id, program, enrolled_at, enrolled_by, "
            "ended_at) VALUES (?, 'hypertension', ?, 'user:admin', ?)",
            (patient.logical_id, "2026-10-01T09:00:00-05:00", ended),
        )
    )
    return patient.logical_id


def _reading(patient_id: str, at: datetime, setting: str = "home") -> dict[str, Any]:
    observation = factories.bp_observation(f"Patient/{patient_id}", effective=at.isoformat())
    observation["meta"] = {
        "tag": [
            {"system": CAPTURE_SETTING_SYSTEM, "code": setting},
            {"system": CAPTURE_METHOD_SYSTEM, "code": "ble"},
        ]
    }
    return observation


def _local(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=CHICAGO)


async def _readings_on(
    store: Store, patient_id: str, days: list[int], setting: str = "home"
) -> None:
    """Two readings a day on each ``ENROLLED + n`` day (morning and evening)."""
    resources = [
        _reading(patient_id, _local(ENROLLED + timedelta(days=n), hour), setting)
        for n in days
        for hour in (8, 20)
    ]
    await store.create(resources, "service:devices")


# -- the rules -----------------------------------------------------------------------------


def test_periods_are_30_days_from_the_enrolment_day() -> None:
    assert period_on(ENROLLED, ENROLLED) == Period(1, date(2026, 10, 1), date(2026, 10, 30))
    assert period_on(ENROLLED, date(2026, 10, 30)).number == 1
    assert period_on(ENROLLED, date(2026, 10, 31)) == Period(
        2, date(2026, 10, 31), date(2026, 11, 29)
    )
    with pytest.raises(ValueError):
        period_on(ENROLLED, date(2026, 9, 30))


@pytest.mark.parametrize(
    ("days", "code"),
    [(0, None), (1, None), (2, "99445"), (15, "99445"), (16, "99454"), (30, "99454")],
)
def test_device_codes_by_days_with_home_readings(days: int, code: str | None) -> None:
    assert device_code(days) == code


@pytest.mark.parametrize(
    ("minutes", "interactive", "codes"),
    [
        (9, True, ()),
        (10, True, ("99470",)),
        (19, True, ("99470",)),
        (20, True, ("99457",)),  # 99457 instead of 99470, never both
        (39, True, ("99457",)),
        (40, True, ("99457", "99458")),
        (65, True, ("99457", "99458", "99458")),
        (45, False, ()),  # no live call with the patient this month: no time code
    ],
)
def test_management_time_codes(minutes: int, interactive: bool, codes: tuple[str, ...]) -> None:
    assert management_codes(minutes, interactive) == codes


def test_at_risk_when_the_days_left_cannot_reach_16() -> None:
    period = period_on(ENROLLED, ENROLLED)
    as_of = date(2026, 10, 20)  # 10 days after today, and today itself, are left: 11
    assert at_risk([ENROLLED + timedelta(days=n) for n in range(4)], as_of, period)
    assert not at_risk([ENROLLED + timedelta(days=n) for n in range(5)], as_of, period)
    # Today already has its reading: it is not a day still to win.
    counted = [*(ENROLLED + timedelta(days=n) for n in range(4)), as_of]
    assert at_risk(counted, as_of, period)
    assert not at_risk([ENROLLED + timedelta(days=n) for n in range(16)], period.end, period)


# -- counting over the store ---------------------------------------------------------------


async def test_sixteen_home_days_earn_99454_and_clinic_readings_never_count(
    store: Store,
) -> None:
    patient_id = await _enrolled_patient(store)
    await _readings_on(store, patient_id, list(range(15)))
    await _readings_on(store, patient_id, [20, 21, 22], setting="clinic")
    billing = RpmBilling(store, CHICAGO)
    [found] = await billing.billing(date(2026, 10, 25))
    assert len(found.days) == 15
    assert found.device_code == "99445"
    assert not found.at_risk  # 15 + 6 days left (25th..30th)
    await _readings_on(store, patient_id, [24])
    [found] = await billing.billing(date(2026, 10, 25))
    assert (len(found.days), found.device_code) == (16, "99454")


async def test_an_unreadable_reading_does_not_count_and_the_report_still_comes(
    store: Store, db_path: Path
) -> None:
    patient_id = await _enrolled_patient(store)
    other = await _enrolled_patient(store, mrn="T0002")
    await _readings_on(store, patient_id, [0, 1])
    await _readings_on(store, other, [0, 1, 2])
    conn = sqlite3.connect(db_path)  # the morning reading of day 1 unreadable (moved row)
    [(bad, source)] = conn.execute(
        "SELECT r.id, (SELECT min(id) FROM resources WHERE type = 'Observation') FROM resources r "
        "WHERE r.type = 'Observation' AND r.effective LIKE '2026-10-02T13:%'"
        " AND r.patient_key = (SELECT patient_key FROM resources WHERE id = "
        "(SELECT min(id) FROM resources WHERE type = 'Observation'))"
    ).fetchall()
    conn.execute(
        "UPDATE resources SET body = (SELECT body FROM resources WHERE id = ?) WHERE id = ?",
        (source, bad),
    )
    conn.commit()
    conn.close()
    found = await RpmBilling(store, CHICAGO).billing(date(2026, 10, 25))  # before: raised
    days = {b.patient_id: len(b.days) for b in found}
    # Day 1 still counts through its evening reading; the other patient is untouched.
    assert days == {patient_id: 2, other: 3}
    failures = await store.query("SELECT actor, detail FROM audit WHERE outcome = 'failure'")
    assert failures == [("service:rpm", UNREADABLE_LEFT_OUT)]


async def test_days_are_counted_in_the_site_zone(store: Store) -> None:
    patient_id = await _enrolled_patient(store)
    day = date(2026, 10, 5)
    # 23:30 in Chicago is 04:30 UTC the next day; both readings are on the 5th locally.
    await store.create(
        [_reading(patient_id, _local(day, 0, 30)), _reading(patient_id, _local(day, 23, 30))],
        "service:devices",
    )
    # The evening before enrolment (local) is not in the period, though it is the 1st in UTC.
    await store.create([_reading(patient_id, _local(date(2026, 9, 30), 21))], "service:devices")
    [found] = await RpmBilling(store, CHICAGO).billing(date(2026, 10, 10))
    assert found.days == (day,)
    assert found.device_code is None


async def test_two_to_fifteen_days_earn_99445_and_the_period_goes_at_risk(store: Store) -> None:
    patient_id = await _enrolled_patient(store)
    await _readings_on(store, patient_id, [0, 3])
    [found] = await RpmBilling(store, CHICAGO).billing(date(2026, 10, 20))
    assert (len(found.days), found.device_code, found.at_risk) == (2, "99445", True)
    [early] = await RpmBilling(store, CHICAGO).billing(date(2026, 10, 5))
    assert not early.at_risk  # 2 + 26 days still open


async def test_readings_after_the_as_of_day_and_other_periods_are_not_counted(
    store: Store,
) -> None:
    patient_id = await _enrolled_patient(store)
    await _readings_on(store, patient_id, [1, 2, 3, 31, 32])
    billing = RpmBilling(store, CHICAGO)
    [found] = await billing.billing(date(2026, 10, 2))
    assert [d.day for d in found.days] == [2]
    [second] = await billing.billing(date(2026, 11, 5))
    assert second.period.number == 2
    assert [d.isoformat() for d in second.days] == ["2026-11-01", "2026-11-02"]


async def test_the_look_up_is_audited_per_patient_as_service_rpm(store: Store) -> None:
    first = await _enrolled_patient(store)
    await _enrolled_patient(store, mrn="T0002")
    await _readings_on(store, first, [0])
    await RpmBilling(store, CHICAGO).billing(date(2026, 10, 3), requested_by="cli:alice")
    rows = await store.query(
        "SELECT actor, action, detail FROM audit WHERE actor = 'service:rpm' ORDER BY id"
    )
    assert rows == [("service:rpm", "search", "rpm billing for cli:alice")] * 2


async def test_an_ended_enrolment_is_counted_to_its_end_and_never_at_risk(store: Store) -> None:
    patient_id = await _enrolled_patient(store, ended="2026-10-10T12:00:00-05:00")
    await _readings_on(store, patient_id, [0, 1, 12])
    [found] = await RpmBilling(store, CHICAGO).billing(date(2026, 10, 20))
    assert (len(found.days), found.ended, found.at_risk) == (2, True, False)
    assert await RpmBilling(store, CHICAGO).billing(date(2026, 12, 1)) == []


# -- staff time ----------------------------------------------------------------------------


async def test_time_logs_add_up_per_month_with_a_sealed_note(store: Store) -> None:
    patient_id = await _enrolled_patient(store)
    billing = RpmBilling(store, CHICAGO)
    note = "Called about the evening readings"
    log_id = await billing.log_time(
        patient_id,
        15,
        staff="nurse1",
        actor="user:nurse1",
        performed_on=date(2026, 10, 3),
        interactive=True,
        note=note,
    )
    [found] = await billing.billing(date(2026, 10, 20))
    assert (found.month, found.minutes, found.time_codes) == ("2026-10", 15, ("99470",))
    await billing.log_time(
        patient_id, 30, staff="nurse1", actor="user:nurse1", performed_on=date(2026, 10, 18)
    )
    await billing.log_time(  # another month: not added to October
        patient_id, 30, staff="nurse1", actor="user:nurse1", performed_on=date(2026, 11, 2)
    )
    [found] = await billing.billing(date(2026, 10, 31))
    assert (found.minutes, found.time_codes) == (45, ("99457", "99458"))
    [(sealed,)] = await store.query("SELECT note FROM rpm_time_log WHERE id = ?", (log_id,))
    assert note.encode() not in sealed
    assert store.keyring.unseal(NOTE_LABEL, str(log_id), sealed) == note
    assert await billing.open_note(log_id, "user:nurse1") == note
    audit = await store.query(
        "SELECT action, entity FROM audit WHERE actor = 'user:nurse1' ORDER BY id"
    )
    assert audit[0] == ("create", "rpm-time-log")
    assert audit[-1] == ("read", f"rpm-time-log/{log_id}")


@pytest.mark.parametrize(
    ("minutes", "day", "problem"),
    [
        (0, date(2026, 10, 3), "minutes"),
        (601, date(2026, 10, 3), "minutes"),
        (10, date(2026, 9, 30), "not enrolled"),
        (10, date(2099, 1, 1), "future"),
    ],
)
async def test_time_logs_that_cannot_be_billed_are_refused(
    store: Store, minutes: int, day: date, problem: str
) -> None:
    patient_id = await _enrolled_patient(store)
    with pytest.raises(RpmError, match=problem):
        await RpmBilling(store, CHICAGO).log_time(
            patient_id, minutes, staff="nurse1", actor="user:nurse1", performed_on=day
        )
    assert await store.query("SELECT count(*) FROM rpm_time_log") == [(0,)]
