"""A patient's trend charts drawn by the vendored uPlot in Chromium, under the real CSP.

The page is served by Hypercorn over a real store; ``rpm_patient.js`` fetches
``series.json`` and draws each vital. Checked: the canvas has something drawn on it, the
legend names home and clinic series, the filter changes what is drawn, and the browser
reported no error (a Content-Security-Policy violation is one).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from appliance.store import Store
from services.rpm_enrollment import Enrollments
from services.rpm_rules import Program
from services.vitals import CAPTURE_METHOD_SYSTEM, CAPTURE_SETTING_SYSTEM
from tests import factories
from tests.e2e import live_server
from tests.e2e.conftest import LiveApp

pytestmark = pytest.mark.slow

LOINC = "http://loinc.org"

# How many pixels of the plot area are not blank (uPlot clears the canvas to transparent).
_PAINTED = """(id) => {
  const canvas = document.querySelector(`#chart-${id} canvas`);
  const ctx = canvas.getContext("2d");
  const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  let painted = 0;
  for (let i = 3; i < data.length; i += 4) { if (data[i] !== 0) { painted++; } }
  return painted;
}"""


def _tagged(observation: dict[str, Any], setting: str) -> dict[str, Any]:
    observation["meta"] = {
        "tag": [
            {"system": CAPTURE_SETTING_SYSTEM, "code": setting},
            {"system": CAPTURE_METHOD_SYSTEM, "code": "ble" if setting == "home" else "serial"},
        ]
    }
    return observation


def _quantity(
    patient_id: str, at: datetime, code: str, value: float, unit: str, setting: str
) -> dict[str, Any]:
    return _tagged(
        {
            "resourceType": "Observation",
            "status": "final",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "vital-signs",
                        }
                    ]
                }
            ],
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "subject": {"reference": f"Patient/{patient_id}"},
            "effectiveDateTime": at.isoformat(),
            "valueQuantity": {
                "value": value,
                "unit": unit,
                "system": "http://unitsofmeasure.org",
                "code": unit,
            },
        },
        setting,
    )


async def seed_monitored_patient(
    store: Store, now: datetime, *, days: int = 30, seed: int = 7
) -> str:
    """A synthetic hypertension patient enrolled ``days`` ago, with home and clinic readings.

    Home: blood pressure most mornings and evenings (a few days missed, one crisis reading),
    weight, SpO2 and pulse every morning, glucose now and then, a temperature during a cold.
    Clinic: a visit every ten days (blood pressure, weight, SpO2 and pulse, temperature).
    """
    rng = random.Random(seed)
    [patient] = await store.create(
        [factories.patient(family="Chartmann", given="Rosa", birth_date="1948-03-02", mrn="C-1")],
        "user:e2e",
    )
    pid = patient.logical_id
    await Enrollments(store).enroll(pid, Program.HYPERTENSION, "user:e2e")
    start = now - timedelta(days=days)
    await store.transact(  # test set-up: the service always starts an enrolment now
        lambda conn: conn.execute(
            "UPDATE rpm_enrollment SET enrolled_at = ? WHERE patient_id = ?",
            (start.isoformat(), pid),
        )
    )
    await Enrollments(store).set_threshold(pid, "bp-crisis", {"systolic": 170}, "user:e2e")
    readings: list[dict[str, Any]] = []
    missed = set(rng.sample(range(days), k=max(1, days // 5)))
    for day in range(days):
        morning = start + timedelta(days=day, hours=13, minutes=rng.randint(0, 40))
        if day not in missed:
            for at in (morning, morning + timedelta(hours=11)):
                if at > now - timedelta(hours=1):
                    continue  # nothing from the last hour
                systolic = 148 - day * 0.5 + rng.gauss(0, 6)
                diastolic = 90 - day * 0.2 + rng.gauss(0, 4)
                if day == days // 2 and at == morning:
                    systolic, diastolic = 176, 104
                readings.append(
                    _tagged(
                        factories.bp_observation(
                            f"Patient/{pid}",
                            round(systolic),
                            round(diastolic),
                            effective=at.isoformat(),
                        ),
                        "home",
                    )
                )
            weight = 185.0 + day * 0.05 + rng.gauss(0, 0.6)
            readings.append(_quantity(pid, morning, "29463-7", round(weight, 1), "[lb_av]", "home"))
            spo2 = min(99, round(95.5 + rng.gauss(0, 1.2)))
            readings.append(_quantity(pid, morning, "59408-5", spo2, "%", "home"))
            readings.append(
                _quantity(pid, morning, "8867-4", round(74 + rng.gauss(0, 5)), "/min", "home")
            )
            if day % 3 == 0:
                glucose = round(112 + rng.gauss(0, 18))
                readings.append(_quantity(pid, morning, "2339-0", glucose, "mg/dL", "home"))
            if days - 9 <= day <= days - 6:
                fever = round(37.4 + (0.8 if day == days - 8 else 0) + rng.gauss(0, 0.2), 1)
                readings.append(_quantity(pid, morning, "8310-5", fever, "Cel", "home"))
        if day % 10 == 4:
            visit = start + timedelta(days=day, hours=16)
            readings.append(
                _tagged(
                    factories.bp_observation(
                        f"Patient/{pid}",
                        round(156 - day * 0.4),
                        round(94 - day * 0.2),
                        effective=visit.isoformat(),
                    ),
                    "clinic",
                )
            )
            readings.append(
                _quantity(pid, visit, "29463-7", 186.4 + day * 0.04, "[lb_av]", "clinic")
            )
            readings.append(_quantity(pid, visit, "59408-5", 96, "%", "clinic"))
            readings.append(_quantity(pid, visit, "8867-4", 78, "/min", "clinic"))
            readings.append(_quantity(pid, visit, "8310-5", 36.9, "Cel", "clinic"))
    await store.create(readings, "service:devices")
    return pid


async def test_trend_charts_are_drawn_with_home_and_clinic_series(
    live_app: LiveApp, page: Any
) -> None:
    problems = live_server.watch_problems(page)
    patient_id = await seed_monitored_patient(live_app.store, datetime.now(UTC))
    await live_app.log_in(page, f"/rpm/patients/{patient_id}")
    assert page.url.endswith(f"/rpm/patients/{patient_id}")
    await page.wait_for_selector("#rpm-patient[data-charts-ready='true']", timeout=10_000)

    for chart_id in ("bp", "weight", "spo2", "glucose", "temperature"):
        assert await page.locator(f"#chart-{chart_id} canvas").count() == 1
        assert await page.evaluate(_PAINTED, chart_id) > 2000, f"{chart_id}: nothing drawn"
    legend = page.locator("#chart-bp .u-legend")
    labels = [t.strip() for t in await legend.locator(".u-series th").all_text_contents()]
    for label in ("Systolic · home", "Systolic · clinic", "Diastolic · home", "Diastolic · clinic"):
        assert label in labels
    # Home and clinic differ in more than colour: the clinic markers are dashed and hollow.
    home_marker = legend.locator(".setting-home .u-marker").first
    clinic_marker = legend.locator(".setting-clinic .u-marker").first
    style = "(el) => [getComputedStyle(el).borderTopStyle, getComputedStyle(el).backgroundColor]"
    assert await home_marker.evaluate(style) == ["solid", "rgb(11, 83, 148)"]
    assert await clinic_marker.evaluate(style) == ["dashed", "rgb(255, 255, 255)"]
    assert (
        "Crisis: systolic ≥ 170 mmHg"
        in await page.locator("section:has(#chart-bp) ul.thresholds").inner_text()
    )

    # The filter: home only reloads the page with home series alone.
    async with page.expect_navigation():
        await page.select_option("#setting", "home")
    await page.wait_for_selector("#rpm-patient[data-charts-ready='true']", timeout=10_000)
    assert "setting=home" in page.url
    labels = [
        t.strip()
        for t in await page.locator("#chart-bp .u-legend .u-series th").all_text_contents()
    ]
    assert "Systolic · home" in labels
    assert not any("clinic" in label for label in labels)
    assert problems == []
