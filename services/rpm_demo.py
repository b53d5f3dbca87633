"""Remote-monitoring data for demo mode: enrolments, thresholds and a month of readings.

Four synthetic home-monitored patients (``demo.synthetic_patients(home=True)``; they never
visit the demo stations, so nothing simulated disturbs their data) are enrolled, back-dated
24 days (with a month of readings behind them) so the billing periods, charts and worklist have something to show on a fresh
``make run``. The station patients are left for the enrolment form.

* patient 0 — hypertension: home blood pressure morning and evening, two clinic visits,
  and a **crisis reading** 40 minutes ago (a critical alert);
* patient 1 — heart failure: daily home weight in lb and blood pressure, a clinic weight in
  kg, their own crisis threshold (systolic 170), and **2.5 lb gained since yesterday**
  (a weight-gain alert);
* patient 2 — COPD (chronic lung disease): daily SpO2 and pulse, temperatures in °F, and a
  newest **SpO2 of 87 %** (a high alert at the lung-disease threshold of 88 %);
* patient 3 — diabetes: glucose on only 8 days since the enrolment, the last 4 days ago:
  **quiet** (a no-data alert at the engine's first tick) and **at risk** of missing 99454.

Every value is made up, from a seeded RNG; times come from ``now`` in the site's zone. The
readings are filed after the alert engine has pinned its starting point (``devices.main``),
so the recent abnormal ones raise their alerts as a live reading would; older ones (beyond
the engine's 48-hour window) only fill the charts.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from appliance.store import Store
from services import demo, vitals
from services.rpm_enrollment import Enrollments
from services.rpm_rules import Program

logger = logging.getLogger(__name__)

ACTOR = "service:devices"
DAYS = 29  # readings from this many days back (a 30-day chart window)
ENROLLED_DAYS_AGO = 24  # day 25 of the first billing period (the service allows up to 30)


def _observation(
    patient_id: str, at: datetime, code: str, display: str, setting: str
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "meta": {
            "tag": [
                {"system": vitals.CAPTURE_SETTING_SYSTEM, "code": setting},
                {"system": vitals.CAPTURE_METHOD_SYSTEM, "code": "simulated"},
            ]
        },
        "status": "final",
        "category": vitals.VITAL_SIGNS,
        "code": vitals.loinc(code, display),
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": at.isoformat(),
    }


def _quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": vitals.UCUM, "code": unit}


def simple(
    patient_id: str, at: datetime, code: str, display: str, value: float, unit: str, setting: str
) -> dict[str, Any]:
    """A one-value vital-signs Observation (SpO2, pulse, weight, temperature, glucose)."""
    return {
        **_observation(patient_id, at, code, display, setting),
        "valueQuantity": _quantity(value, unit),
    }


def blood_pressure(
    patient_id: str, at: datetime, systolic: int, diastolic: int, setting: str
) -> dict[str, Any]:
    """A blood-pressure panel with its systolic and diastolic components."""
    return {
        **_observation(patient_id, at, vitals.BP_PANEL, "Blood pressure panel", setting),
        "component": [
            {
                "code": vitals.loinc(vitals.SYSTOLIC, "Systolic blood pressure"),
                "valueQuantity": _quantity(systolic, "mm[Hg]"),
            },
            {
                "code": vitals.loinc(vitals.DIASTOLIC, "Diastolic blood pressure"),
                "valueQuantity": _quantity(diastolic, "mm[Hg]"),
            },
        ],
    }


def _at(day: datetime, hour: int, minute: int, rng: random.Random) -> datetime:
    return day + timedelta(hours=hour, minutes=minute + rng.randint(-25, 25))


def history(
    patients: Sequence[str], now: datetime, zone: ZoneInfo, rng: random.Random
) -> list[dict[str, Any]]:
    """A month of readings for the first four patients, oldest first, none after ``now``."""
    hyper, failing, lungs, sugar = patients[:4]
    today = datetime.combine(now.astimezone(zone).date(), time.min, zone)
    days = [today - timedelta(days=n) for n in range(DAYS, -1, -1)]
    out: list[dict[str, Any]] = []
    for index, day in enumerate(days):
        last = index == len(days) - 1
        # Hypertension: morning and evening blood pressure, most days (today: below).
        if not last and rng.random() < 0.9:
            out.append(
                blood_pressure(
                    hyper, _at(day, 7, 30, rng), rng.randint(128, 150), rng.randint(78, 92), "home"
                )
            )
        if not last and rng.random() < 0.8:
            out.append(
                blood_pressure(
                    hyper, _at(day, 19, 30, rng), rng.randint(124, 146), rng.randint(76, 90), "home"
                )
            )
        # Heart failure: a morning weight in lb (slowly drifting; the last two: below) and
        # blood pressure.
        if index < len(days) - 2:
            pounds = 181.0 + index * 0.03 + rng.uniform(-0.6, 0.6)
            out.append(
                simple(
                    failing,
                    _at(day, 7, 0, rng),
                    "29463-7",
                    "Body weight",
                    round(pounds, 1),
                    "[lb_av]",
                    "home",
                )
            )
        if not last:
            out.append(
                blood_pressure(
                    failing,
                    _at(day, 7, 10, rng),
                    rng.randint(112, 134),
                    rng.randint(68, 82),
                    "home",
                )
            )
        # COPD: SpO2 and pulse every day, a temperature now and then (in °F).
        if not last:
            spo2_at = _at(day, 9, 0, rng)
            out.append(
                simple(
                    lungs, spo2_at, "59408-5", "Oxygen saturation", rng.randint(89, 95), "%", "home"
                )
            )
            out.append(
                simple(lungs, spo2_at, "8867-4", "Heart rate", rng.randint(72, 96), "/min", "home")
            )
            if index % 4 == 0:
                out.append(
                    simple(
                        lungs,
                        _at(day, 9, 5, rng),
                        "8310-5",
                        "Body temperature",
                        round(rng.uniform(97.6, 99.0), 1),
                        "[degF]",
                        "home",
                    )
                )
        # Diabetes: glucose on 9 scattered days, nothing in the last 4.
        if index in (4, 6, 9, 11, 14, 17, 19, 22, 25):
            out.append(
                simple(
                    sugar,
                    _at(day, 8, 0, rng),
                    "2339-0",
                    "Glucose",
                    rng.randint(92, 178),
                    "mg/dL",
                    "home",
                )
            )
    # Clinic visits: blood pressure twice, a weight in kg, SpO2 with a temperature in °C.
    visit = days[DAYS - 14] + timedelta(hours=10)
    out.append(blood_pressure(hyper, visit, 142, 88, "clinic"))
    out.append(blood_pressure(hyper, days[DAYS - 3] + timedelta(hours=11), 138, 86, "clinic"))
    out.append(
        simple(failing, visit + timedelta(hours=1), "29463-7", "Body weight", 82.6, "kg", "clinic")
    )
    out.append(simple(lungs, visit, "59408-5", "Oxygen saturation", 93, "%", "clinic"))
    out.append(simple(lungs, visit, "8310-5", "Body temperature", 36.9, "Cel", "clinic"))
    out.append(
        simple(sugar, days[6] + timedelta(hours=15), "2339-0", "Glucose", 131, "mg/dL", "clinic")
    )
    # The readings that need a nurse now (the newest of their kind).
    day_before = now - timedelta(hours=23)
    out.append(simple(failing, day_before, "29463-7", "Body weight", 182.1, "[lb_av]", "home"))
    today_weight = now - timedelta(hours=1)  # 2.5 lb in a day: over the 2 lb of the rule
    out.append(simple(failing, today_weight, "29463-7", "Body weight", 184.6, "[lb_av]", "home"))
    out.append(
        simple(lungs, now - timedelta(hours=2), "59408-5", "Oxygen saturation", 87, "%", "home")
    )
    out.append(blood_pressure(hyper, now - timedelta(hours=3), 146, 90, "home"))
    out.append(blood_pressure(hyper, now - timedelta(minutes=40), 184, 112, "home"))
    timed = [(datetime.fromisoformat(r["effectiveDateTime"]), r) for r in out]
    return [r for at, r in sorted(timed, key=lambda pair: pair[0]) if at <= now]


async def seed(store: Store, zone: ZoneInfo) -> bool:
    """Create and enrol the home-monitored demo patients with a month of readings, once.

    False (nothing added) when any enrolment exists: a previous start seeded the data, or a
    person enrolled someone.
    """
    if await store.query("SELECT 1 FROM rpm_enrollment LIMIT 1"):
        return False
    created = await store.create(demo.synthetic_patients(home=True), ACTOR)
    patients = [item.logical_id for item in created]
    now = store.now()
    first_day = now.astimezone(zone).date() - timedelta(days=ENROLLED_DAYS_AGO)
    start = datetime.combine(first_day, time.min, zone)
    book = Enrollments(store)
    programs = (Program.HYPERTENSION, Program.HEART_FAILURE, Program.COPD, Program.DIABETES)
    for patient_id, program in zip(patients, programs, strict=False):
        await book.enroll(patient_id, program, ACTOR, enrolled_at=start)
    await book.set_threshold(patients[1], "bp-crisis", {"systolic": 170}, ACTOR)
    readings = history(patients, now, zone, random.Random(2026))  # noqa: S311 - synthetic data
    await store.create(readings, ACTOR)
    logger.info("demo: %d home-monitored patients, %d readings", len(patients), len(readings))
    return True
