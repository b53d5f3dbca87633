"""A patient's RPM page: charts' data, counters, alerts and the forms, over a real store."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from quart.testing import QuartClient

from appliance import db, users
from appliance.config import Config, RpmConfig
from appliance.device_registry import DeviceRegistry, StationKind
from appliance.store import Store
from services.alerts import AlertEngine
from services.rpm_billing import RpmBilling
from services.rpm_enrollment import Enrollments
from services.rpm_rules import Program
from services.vitals import CAPTURE_METHOD_SYSTEM, CAPTURE_SETTING_SYSTEM
from tests import factories
from tests.web.conftest import NURSE, PASSWORD, FakeClock, form_token, login
from web.app import create_app
from web.rpm_patient import build_charts

LOINC = "http://loinc.org"
NURSE_ACTOR = f"user:{NURSE}"
CHICAGO = ZoneInfo("America/Chicago")


def _tag(observation: dict[str, Any], setting: str) -> dict[str, Any]:
    observation["meta"] = {
        "tag": [
            {"system": CAPTURE_SETTING_SYSTEM, "code": setting},
            {"system": CAPTURE_METHOD_SYSTEM, "code": "ble"},
        ]
    }
    return observation


def bp(
    patient_id: str, at: datetime, systolic: float, diastolic: float, setting: str
) -> dict[str, Any]:
    return _tag(
        factories.bp_observation(
            f"Patient/{patient_id}", systolic, diastolic, effective=at.isoformat()
        ),
        setting,
    )


def simple(
    patient_id: str, at: datetime, code: str, value: float, unit: str, setting: str
) -> dict[str, Any]:
    observation = {
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
    }
    return _tag(observation, setting)


async def _patient(store: Store, *, family: str = "Testperson", mrn: str = "T0001") -> str:
    """A patient the staff may open: checked in at the clinic today (web/access.py)."""
    [patient] = await store.create(
        [factories.patient(family=family, given="Ada", birth_date="1961-04-09", mrn=mrn)],
        "user:admin",
    )
    registry = DeviceRegistry(store)
    if "room-1" not in {station.id for station in await registry.stations()}:
        await registry.add_station("room-1", "Exam room 1", StationKind.EXAM_ROOM, "user:setup")
    await registry.check_in("room-1", patient.logical_id, "user:setup")
    return patient.logical_id


async def _enrolled_with_readings(store: Store, clock: FakeClock) -> str:
    """Enrolled 10 days ago (hypertension): home readings on 3 days, a clinic visit, an old one."""
    patient_id = await _patient(store)
    await Enrollments(store).enroll(patient_id, Program.HYPERTENSION, "user:admin")
    now = clock()
    # Enrolled ten days ago (test set-up: the service always starts an enrolment now).
    await store.transact(
        lambda conn: conn.execute(
            "UPDATE rpm_enrollment SET enrolled_at = ? WHERE patient_id = ?",
            ((now - timedelta(days=10)).isoformat(), patient_id),
        )
    )
    readings = [
        bp(patient_id, now - timedelta(days=2, hours=3), 132, 84, "home"),
        bp(patient_id, now - timedelta(days=1, hours=3), 136, 86, "home"),
        bp(patient_id, now - timedelta(hours=3), 141, 88, "home"),
        bp(patient_id, now - timedelta(days=1, hours=6), 150, 92, "clinic"),
        bp(patient_id, now - timedelta(days=20), 128, 80, "home"),  # outside a 7-day window
        simple(patient_id, now - timedelta(hours=5), "59408-5", 95, "%", "home"),
        simple(patient_id, now - timedelta(hours=5), "8867-4", 72, "/min", "home"),
        simple(patient_id, now - timedelta(days=1, hours=6), "29463-7", 81.2, "kg", "clinic"),
        simple(patient_id, now - timedelta(hours=4), "8310-5", 100.8, "[degF]", "home"),
        simple(patient_id, now - timedelta(hours=4), "2339-0", 65, "mg/dL", "home"),
    ]
    await store.create(readings, "service:devices")
    return patient_id


async def _audit(store: Store, patient_id: str, since_id: int) -> list[tuple[str, str, str]]:
    rows = await store.query(
        "SELECT actor, action, entity FROM audit WHERE id > ? AND patient_key = ? ORDER BY id",
        (since_id, store.patient_key(f"Patient/{patient_id}")),
    )
    return [(str(a), str(b), str(c)) for a, b, c in rows]


async def _last_audit(store: Store) -> int:
    return int((await store.query("SELECT coalesce(max(id), 0) FROM audit"))[0][0])


def _chart(data: dict[str, Any], chart_id: str) -> dict[str, Any]:
    return next(c for c in data["charts"] if c["id"] == chart_id)


def _points(chart: dict[str, Any], measure: str, setting: str) -> list[float]:
    [series] = [s for s in chart["series"] if (s["measure"], s["setting"]) == (measure, setting)]
    return [value for _, value in series["points"]]


# -- the page ---------------------------------------------------------------------------------


async def test_page_shows_the_patient_counters_alerts_charts_and_tables(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    patient_id = await _enrolled_with_readings(store, clock)
    engine = AlertEngine(store, backlog_hours=None)
    cursor = await engine.cursor()  # the engine starts after what is already stored
    await store.create(
        [bp(patient_id, clock() - timedelta(minutes=30), 186, 96, "home")], "service:devices"
    )
    await engine.evaluate_new(cursor)
    await RpmBilling(store, CHICAGO).log_time(
        patient_id, 12, staff=NURSE, actor=NURSE_ACTOR, interactive=True
    )
    response = await logged_in.get(f"/rpm/patients/{patient_id}")
    assert response.status_code == 200
    body = (await response.get_data()).decode()
    assert "Testperson, Ada" in body
    assert "Born 1961-04-09" in body
    assert "Hypertension" in body
    assert "Enrolled" in body
    # Home days since the enrolment (clinic readings, and the 20-day-old reading, never count):
    # 3 or 4 local days, depending on the hour the test runs.
    days = int(re.search(r'id="home-days">(\d+)<', body).group(1))  # type: ignore[union-attr]
    assert 3 <= days <= 4
    assert "99445 so far" in body
    assert re.search(r'id="minutes"><strong>12</strong> min · 99470', body)
    assert re.search(
        r"<td>Blood-pressure crisis</td>\s*<td><span class=\"sev sev-critical\">Critical<", body
    )
    for chart_id in ("bp", "spo2", "weight", "glucose", "temperature"):
        assert f'id="chart-{chart_id}"' in body
    assert "Crisis: systolic ≥ 180 mmHg" in body
    # The readings as tables: where, values, what threshold a value is beyond.
    assert "186 mmHg" in body
    assert "systolic ≥ 180" in body
    assert "38.2 °C (100.8 °F as measured)" in body
    assert "glucose ≤ 70 mg/dL (level 1)" in body
    assert "<td>Clinic</td>" in body
    assert "<td>Home</td>" in body
    # Assets are files (CSP): the vendored chart library and the page's script and styles.
    assert "/static/vendor/uplot/uPlot.iife.min.js" in body
    assert "/static/rpm_patient.js" in body
    assert "/static/rpm_patient.css" in body
    assert "<script>" not in body
    assert "style=" not in body
    assert "onclick" not in body
    assert (
        f'data-series-url="/rpm/patients/{patient_id}/series.json?window=30&amp;setting=all"'
        in body
    )


async def test_page_reads_are_audited_under_the_nurse(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    patient_id = await _enrolled_with_readings(store, clock)
    before = await _last_audit(store)
    assert (await logged_in.get(f"/rpm/patients/{patient_id}")).status_code == 200
    entities = {
        (action, entity)
        for actor, action, entity in await _audit(store, patient_id, before)
        if actor == NURSE_ACTOR
    }
    assert ("read", "rpm-enrollment") in entities
    assert ("search", "alert live") in entities
    assert any(a == "search" and e.startswith("Observation trend since") for a, e in entities)
    assert any(a == "search" and e.startswith("Observation home days") for a, e in entities)
    # The Patient itself (read by id: the entity names it).
    rows = await store.query(
        "SELECT actor, action FROM audit WHERE id > ? AND entity = ?",
        (before, f"Patient/{patient_id}"),
    )
    assert (NURSE_ACTOR, "read") in [tuple(r) for r in rows]


async def test_a_patient_not_enrolled_has_charts_without_thresholds_and_an_enrol_form(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    patient_id = await _patient(store)
    await store.create(
        [bp(patient_id, clock() - timedelta(hours=2), 130, 80, "home")], "service:devices"
    )
    body = (await (await logged_in.get(f"/rpm/patients/{patient_id}")).get_data()).decode()
    assert "Not enrolled" in body
    assert ">Enrol</button>" in body
    assert "Thresholds for this patient" not in body
    assert "No thresholds: the patient is not enrolled." in body
    data = await (await logged_in.get(f"/rpm/patients/{patient_id}/series.json")).get_json()
    assert data["enrolled"] is False
    assert _chart(data, "bp")["thresholds"] == []
    assert _points(_chart(data, "bp"), "systolic", "home") == [130]


async def test_unknown_patient_is_404(logged_in: QuartClient) -> None:
    for path in ("/rpm/patients/no-such-patient", "/rpm/patients/no-such-patient/series.json"):
        assert (await logged_in.get(path)).status_code == 404


async def test_a_patient_outside_normal_access_needs_break_glass(
    logged_in: QuartClient, store: Store
) -> None:
    # Neither checked in today nor enrolled: the same rule as the chart (web/access.py).
    [stranger] = await store.create(
        [factories.patient(family="Elsewhere", given="Bo", birth_date="1970-01-01", mrn="T0009")],
        "user:admin",
    )
    for path in (
        f"/rpm/patients/{stranger.logical_id}",
        f"/rpm/patients/{stranger.logical_id}/series.json",
    ):
        refused = await logged_in.get(path)
        assert refused.status_code == 403
    assert "Elsewhere" not in await refused.get_data(as_text=True)


async def test_providers_read_the_page_but_change_nothing_and_anonymous_log_in(
    client: QuartClient, store: Store, clock: FakeClock
) -> None:
    patient_id = await _patient(store)
    anonymous = await client.get(f"/rpm/patients/{patient_id}")
    assert anonymous.status_code == 302
    assert "/login" in anonymous.headers["Location"]
    await db.run_sync(
        store.connection,
        users.create_user,
        "provider1",
        "provider horse battery",
        users.Role.PROVIDER,
        now=clock(),
    )
    assert await login(client, "provider1", "provider horse battery") == 302
    page = await client.get(f"/rpm/patients/{patient_id}")
    assert page.status_code == 200  # where alerts escalate: they read the chart
    body = (await page.get_data()).decode()
    assert "Trends" in body
    for form in ("/enroll", "/unenroll", "/thresholds", "/time"):
        assert f'action="/rpm/patients/{patient_id}{form}"' not in body
    assert "Nurses and administrators change the enrolment" in body
    assert (await client.get(f"/rpm/patients/{patient_id}/series.json")).status_code == 200
    token = form_token(await (await client.get("/devices/")).get_data())
    for path, fields in (
        ("enroll", {"program": "hypertension"}),
        ("unenroll", {}),
        ("thresholds", {"t.bp-crisis.systolic": "170"}),
        ("time", {"minutes": "20"}),
    ):
        refused = await client.post(
            f"/rpm/patients/{patient_id}/{path}", form={"csrf_token": token, **fields}
        )
        assert refused.status_code == 403
    assert await Enrollments(store).get(patient_id, "user:test") is None


# -- series.json --------------------------------------------------------------------------------


async def test_series_split_home_and_clinic_with_thresholds(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    patient_id = await _enrolled_with_readings(store, clock)
    await Enrollments(store).set_threshold(patient_id, "bp-crisis", {"systolic": 170}, "user:admin")
    response = await logged_in.get(f"/rpm/patients/{patient_id}/series.json")
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    data = await response.get_json()
    assert (data["window_days"], data["setting"], data["enrolled"]) == (30, "all", True)
    assert data["zone"] == "America/Chicago"
    assert data["end"] - data["start"] == 30 * 86400
    chart = _chart(data, "bp")
    assert _points(chart, "systolic", "home") == [128, 132, 136, 141]  # oldest first
    assert _points(chart, "systolic", "clinic") == [150]
    assert _points(chart, "diastolic", "clinic") == [92]
    lines = {(t["rule"], t["param"]): t["value"] for t in chart["thresholds"]}
    assert lines == {
        ("bp-crisis", "systolic"): 170,  # the patient's own
        ("bp-crisis", "diastolic"): 120,  # the program default
        ("hypotension", "systolic"): 90,
    }
    assert all(t["unit"] == "mmHg" for t in chart["thresholds"])
    spo2 = _chart(data, "spo2")
    assert _points(spo2, "spo2", "home") == [95]
    assert _points(spo2, "heart-rate", "home") == [72]
    assert {t["value"] for t in spo2["thresholds"]} == {94, 88}
    temperature = _chart(data, "temperature")
    assert _points(temperature, "temperature", "home") == [38.2]  # 100.8 °F in °C
    assert [m["unit"] for m in temperature["measures"]] == ["°C"]
    weight = _chart(data, "weight")
    assert _points(weight, "weight", "clinic") == [81.2]
    assert weight["thresholds"] == []
    glucose = _chart(data, "glucose")
    assert {(t["rule"], t["value"]) for t in glucose["thresholds"]} == {
        ("glucose-low", 70),
        ("glucose-low", 54),
    }  # glucose-high is not a hypertension rule


async def test_series_respects_the_window_and_the_setting_filter(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    patient_id = await _enrolled_with_readings(store, clock)
    base = f"/rpm/patients/{patient_id}/series.json"
    week = await (await logged_in.get(f"{base}?window=7")).get_json()
    assert week["window_days"] == 7
    assert _points(_chart(week, "bp"), "systolic", "home") == [132, 136, 141]
    home = await (await logged_in.get(f"{base}?window=90&setting=home")).get_json()
    bp_home = _chart(home, "bp")
    assert {s["setting"] for s in bp_home["series"]} == {"home"}
    assert bp_home["count"] == 4
    assert _chart(home, "weight")["count"] == 0  # the only weight was taken in clinic
    clinic = await (await logged_in.get(f"{base}?setting=clinic")).get_json()
    assert [s["points"] for s in _chart(clinic, "bp")["series"] if s["measure"] == "systolic"] == [
        [[int((clock() - timedelta(days=1, hours=6)).timestamp()), 150]]
    ]
    # Anything else falls back to the defaults rather than failing.
    odd = await (await logged_in.get(f"{base}?window=1000&setting=garden")).get_json()
    assert (odd["window_days"], odd["setting"]) == (30, "all")


async def test_series_read_is_audited(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    patient_id = await _enrolled_with_readings(store, clock)
    before = await _last_audit(store)
    await logged_in.get(f"/rpm/patients/{patient_id}/series.json?window=7")
    found = await _audit(store, patient_id, before)
    assert (
        NURSE_ACTOR,
        "search",
        f"Observation trend since {(clock() - timedelta(days=7)).date().isoformat()}",
    ) in found
    assert (NURSE_ACTOR, "read", "rpm-enrollment") in found


async def test_page_filter_shows_only_the_chosen_setting_in_the_tables(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    patient_id = await _enrolled_with_readings(store, clock)
    body = (
        await (
            await logged_in.get(f"/rpm/patients/{patient_id}?setting=clinic&window=7")
        ).get_data()
    ).decode()
    assert "<td>Clinic</td>" in body
    assert "<td>Home</td>" not in body
    assert '<option value="clinic" selected>' in body
    assert '<option value="7" selected>' in body
    assert "No temperature readings (clinic) in the last 7 days." in body
    assert "series.json?window=7&amp;setting=clinic" in body


# -- the pure chart builder ----------------------------------------------------------------------


def test_weight_is_shown_in_the_unit_of_the_patients_scale() -> None:
    at = datetime(2026, 11, 2, 8, 0, tzinfo=CHICAGO)
    observations = [
        {**simple("p1", at, "29463-7", 180.4, "[lb_av]", "home"), "id": "o1"},
        {**simple("p1", at + timedelta(days=1), "29463-7", 182.6, "[lb_av]", "home"), "id": "o2"},
    ]
    [weight] = [c for c in build_charts(observations, None, CHICAGO) if c.spec.id == "weight"]
    assert weight.units[weight.spec.measures[0]] == "lb"
    assert [v for _, v in weight.series[0].points] == [180.4, 182.6]
    assert weight.rows[0].values[weight.spec.measures[0]] == "182.6 lb"
    assert weight.rows[0].shown_at == "2026-11-03 08:00"


# -- enrolment ------------------------------------------------------------------------------------


async def test_nurse_enrols_changes_program_and_ends_the_enrolment(
    logged_in: QuartClient, store: Store
) -> None:
    patient_id = await _patient(store)
    page = await logged_in.get(f"/rpm/patients/{patient_id}")
    token = form_token(await page.get_data())
    response = await logged_in.post(
        f"/rpm/patients/{patient_id}/enroll",
        form={"csrf_token": token, "program": "heart-failure", "chronic_lung_disease": ""},
    )
    assert response.status_code == 303
    assert response.headers["Location"] == f"/rpm/patients/{patient_id}?done=enrolled"
    enrolled = await Enrollments(store).get(patient_id, "user:test")
    assert enrolled is not None
    assert (enrolled.program, enrolled.enrolled_by, enrolled.chronic_lung_disease) == (
        Program.HEART_FAILURE,
        NURSE_ACTOR,
        False,
    )
    after = (await (await logged_in.get(response.headers["Location"])).get_data()).decode()
    assert "Enrolled. The 30-day billing periods count from the start date." in after
    assert "Heart failure" in after
    assert "Thresholds for this patient" in after

    moved = await logged_in.post(
        f"/rpm/patients/{patient_id}/enroll",
        form={"csrf_token": token, "program": "copd", "chronic_lung_disease": "yes"},
    )
    assert moved.headers["Location"].endswith("done=program")
    copd = await Enrollments(store).get(patient_id, "user:test")
    assert copd is not None
    assert copd.program is Program.COPD
    assert copd.chronic_lung_disease
    assert copd.enrolled_at == enrolled.enrolled_at  # a program change keeps the start

    ended = await logged_in.post(f"/rpm/patients/{patient_id}/unenroll", form={"csrf_token": token})
    assert ended.headers["Location"].endswith("done=ended")
    assert await Enrollments(store).get(patient_id, "user:test") is None
    rows = await store.query(
        "SELECT actor, detail FROM audit WHERE patient_key = ? AND entity = 'rpm-enrollment' "
        "AND detail IS NOT NULL ORDER BY id",
        (store.patient_key(f"Patient/{patient_id}"),),
    )
    assert [tuple(r) for r in rows] == [
        (NURSE_ACTOR, "enrolled heart-failure"),
        (NURSE_ACTOR, "enrolled copd"),
        (NURSE_ACTOR, "unenrolled"),
    ]


async def test_an_enrolment_can_start_up_to_30_days_back(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    patient_id = await _patient(store)
    page = (await (await logged_in.get(f"/rpm/patients/{patient_id}")).get_data()).decode()
    today = clock().astimezone(CHICAGO).date()
    earliest = today - timedelta(days=30)
    assert f'name="enrolled_on" value="{today}" min="{earliest}" max="{today}"' in page
    assert "up to 30 days back" in page
    token = form_token(page.encode())
    for wrong in (today + timedelta(days=1), earliest - timedelta(days=1), "last week"):
        refused = await logged_in.post(
            f"/rpm/patients/{patient_id}/enroll",
            form={"csrf_token": token, "program": "diabetes", "enrolled_on": str(wrong)},
        )
        assert refused.status_code == 400
        assert (
            f"Start date: today or up to 30 days back ({earliest}"
            in (await refused.get_data()).decode()
        )
    assert await Enrollments(store).get(patient_id, "user:test") is None
    started = today - timedelta(days=12)
    response = await logged_in.post(
        f"/rpm/patients/{patient_id}/enroll",
        form={"csrf_token": token, "program": "diabetes", "enrolled_on": started.isoformat()},
    )
    assert response.status_code == 303
    enrolled = await Enrollments(store).get(patient_id, "user:test")
    assert enrolled is not None
    assert enrolled.enrolled_at.astimezone(CHICAGO).date() == started
    after = (await (await logged_in.get(f"/rpm/patients/{patient_id}")).get_data()).decode()
    assert f"since {started}" in after
    assert f"{started.isoformat()} to {(started + timedelta(days=29)).isoformat()}" in after
    assert 'name="enrolled_on"' not in after  # a current enrolment keeps its start


async def test_enrolment_refusals_say_what_is_wrong(logged_in: QuartClient, store: Store) -> None:
    patient_id = await _patient(store)
    token = form_token(await (await logged_in.get(f"/rpm/patients/{patient_id}")).get_data())
    bad = await logged_in.post(
        f"/rpm/patients/{patient_id}/enroll", form={"csrf_token": token, "program": "gardening"}
    )
    assert bad.status_code == 400
    assert "Choose one of the programs listed." in (await bad.get_data()).decode()
    not_enrolled = await logged_in.post(
        f"/rpm/patients/{patient_id}/unenroll", form={"csrf_token": token}
    )
    assert not_enrolled.status_code == 400
    assert "The patient is not enrolled." in (await not_enrolled.get_data()).decode()
    assert await Enrollments(store).get(patient_id, "user:test") is None


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("enroll", {"program": "hypertension"}),
        ("unenroll", {}),
        ("thresholds", {"t.bp-crisis.systolic": "170"}),
        ("time", {"minutes": "20"}),
    ],
)
async def test_changes_without_the_csrf_token_are_refused(
    logged_in: QuartClient, store: Store, path: str, fields: dict[str, str]
) -> None:
    patient_id = await _patient(store)
    await Enrollments(store).enroll(patient_id, Program.DIABETES, "user:admin")
    response = await logged_in.post(f"/rpm/patients/{patient_id}/{path}", form=fields)
    assert response.status_code == 403
    forged = await logged_in.post(
        f"/rpm/patients/{patient_id}/{path}", form={**fields, "csrf_token": "forged"}
    )
    assert forged.status_code == 403
    enrolled = await Enrollments(store).get(patient_id, "user:test")
    assert enrolled is not None
    assert enrolled.program is Program.DIABETES
    assert enrolled.overrides == {}
    assert await store.query("SELECT count(*) FROM rpm_time_log") == [(0,)]


# -- thresholds -----------------------------------------------------------------------------------


async def _enrolled(store: Store, program: Program = Program.HYPERTENSION) -> str:
    patient_id = await _patient(store)
    await Enrollments(store).enroll(patient_id, program, "user:admin")
    return patient_id


async def test_nurse_sets_and_clears_the_patients_own_thresholds(
    logged_in: QuartClient, store: Store
) -> None:
    patient_id = await _enrolled(store)
    page = (await (await logged_in.get(f"/rpm/patients/{patient_id}")).get_data()).decode()
    assert 'name="t.bp-crisis.systolic" value="" placeholder="180"' in page
    assert "140–250 mmHg; default 180" in page
    token = form_token(page.encode())
    saved = await logged_in.post(
        f"/rpm/patients/{patient_id}/thresholds",
        form={
            "csrf_token": token,
            "t.bp-crisis.systolic": "170",
            "t.spo2-low.below": "92",
            "t.no-data.enabled": "off",
            "t.hypotension.systolic": "",
        },
    )
    assert saved.status_code == 303
    assert saved.headers["Location"].endswith("done=thresholds")
    enrolled = await Enrollments(store).get(patient_id, "user:test")
    assert enrolled is not None
    assert enrolled.overrides == {
        "bp-crisis": {"systolic": 170},
        "spo2-low": {"below": 92},
        "no-data": {"enabled": False},
    }
    page = (await (await logged_in.get(saved.headers["Location"])).get_data()).decode()
    assert "Thresholds saved." in page
    assert 'name="t.bp-crisis.systolic" value="170"' in page
    assert '<option value="off" selected>Off</option>' in page

    # Same values again: nothing written; blank: back to the program default.
    again = await logged_in.post(
        f"/rpm/patients/{patient_id}/thresholds",
        form={
            "csrf_token": token,
            "t.bp-crisis.systolic": "170",
            "t.spo2-low.below": "92",
            "t.no-data.enabled": "off",
        },
    )
    assert again.headers["Location"].endswith("done=unchanged")
    cleared = await logged_in.post(
        f"/rpm/patients/{patient_id}/thresholds",
        form={"csrf_token": token, "t.spo2-low.below": "92"},
    )
    assert cleared.headers["Location"].endswith("done=thresholds")
    enrolled = await Enrollments(store).get(patient_id, "user:test")
    assert enrolled is not None
    assert enrolled.overrides == {"spo2-low": {"below": 92}}
    rows = await store.query(
        "SELECT actor, detail FROM audit WHERE patient_key = ? AND action = 'config' ORDER BY id",
        (store.patient_key(f"Patient/{patient_id}"),),
    )
    details = [(str(a), str(d)) for a, d in rows]
    assert (NURSE_ACTOR, 'threshold bp-crisis {"systolic":170}') in details
    assert (NURSE_ACTOR, "threshold bp-crisis cleared") in details
    assert (NURSE_ACTOR, "threshold no-data cleared") in details


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"t.bp-crisis.systolic": "300"},
            "Blood-pressure crisis, systolic at or above: must be between 140 and 250 mmHg.",
        ),
        ({"t.fever.celsius": "warm"}, "Fever, at or above: enter a number in °C."),
        # Finite, but seconds of work on the event loop to compare (before: accepted as input)
        ({"t.fever.celsius": "1e10000000"}, "Fever, at or above: enter a number in °C."),
        (
            {"t.spo2-low.critical_below": "93", "t.spo2-low.below": "90"},
            "Low SpO2: “critical below” (93 %) must not be above “alert below” (90 %).",
        ),
        (  # one side blank: checked against the program default (level 1 at 70)
            {"t.glucose-low.level2": "75"},
            "Low glucose: “level 2 below” (75 mg/dL) must not be above “level 1 at or below” "
            "(70 mg/dL).",
        ),
        ({"t.fever.enabled": "maybe"}, "Fever: choose program default, on or off."),
    ],
)
async def test_invalid_thresholds_are_refused_with_a_clear_message(
    logged_in: QuartClient, store: Store, fields: dict[str, str], message: str
) -> None:
    patient_id = await _enrolled(store)
    token = form_token(await (await logged_in.get(f"/rpm/patients/{patient_id}")).get_data())
    response = await logged_in.post(
        f"/rpm/patients/{patient_id}/thresholds",
        form={"csrf_token": token, "t.bp-crisis.diastolic": "110", **fields},
    )
    assert response.status_code == 400
    body = (await response.get_data()).decode()
    assert message in body.replace("&#34;", '"')
    assert "The thresholds were not saved" in body
    assert 'name="t.bp-crisis.diastolic" value="110"' in body  # what was typed is kept
    enrolled = await Enrollments(store).get(patient_id, "user:test")
    assert enrolled is not None
    assert enrolled.overrides == {}


async def test_thresholds_need_an_enrolment(logged_in: QuartClient, store: Store) -> None:
    patient_id = await _patient(store)
    token = form_token(await (await logged_in.get(f"/rpm/patients/{patient_id}")).get_data())
    response = await logged_in.post(
        f"/rpm/patients/{patient_id}/thresholds",
        form={"csrf_token": token, "t.bp-crisis.systolic": "170"},
    )
    assert response.status_code == 400
    assert "Enrol the patient before setting thresholds." in (await response.get_data()).decode()


# -- management time ------------------------------------------------------------------------------


async def test_nurse_logs_management_time(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    patient_id = await _enrolled(store)
    token = form_token(await (await logged_in.get(f"/rpm/patients/{patient_id}")).get_data())
    response = await logged_in.post(
        f"/rpm/patients/{patient_id}/time",
        form={
            "csrf_token": token,
            "minutes": "22",
            "interactive": "on",
            "note": "Called re: evening BP",
        },
    )
    assert response.status_code == 303
    assert response.headers["Location"].endswith("done=time")
    rows = await store.query("SELECT staff, minutes, interactive, note FROM rpm_time_log")
    [(staff, minutes, interactive, note)] = rows
    assert (staff, minutes, interactive) == (NURSE, 22, 1)
    assert b"evening" not in bytes(note)  # sealed
    page = (await (await logged_in.get(response.headers["Location"])).get_data()).decode()
    assert "Management time logged." in page
    assert re.search(r'id="minutes"><strong>22</strong> min · 99457', page)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"minutes": "0"}, "Minutes: a whole number from 1 to 600."),
        ({"minutes": "ten"}, "Minutes: a whole number from 1 to 600."),
        ({"minutes": "10", "performed_on": "yesterday"}, "Date: use the date picker"),
        ({"minutes": "10", "performed_on": "2099-01-01"}, "up to today"),
        ({"minutes": "10", "performed_on": "2001-01-01"}, "on which the patient was enrolled"),
    ],
)
async def test_invalid_time_logs_are_refused(
    logged_in: QuartClient, store: Store, fields: dict[str, str], message: str
) -> None:
    patient_id = await _enrolled(store)
    token = form_token(await (await logged_in.get(f"/rpm/patients/{patient_id}")).get_data())
    response = await logged_in.post(
        f"/rpm/patients/{patient_id}/time", form={"csrf_token": token, **fields}
    )
    assert response.status_code == 400
    assert message in (await response.get_data()).decode()
    assert await store.query("SELECT count(*) FROM rpm_time_log") == [(0,)]


async def test_the_site_config_sets_the_no_data_and_device_defaults_shown(
    config: Config, store: Store, clock: FakeClock
) -> None:
    patient_id = await _patient(store)
    await Enrollments(store).enroll(patient_id, Program.HYPERTENSION, "user:admin")
    await db.run_sync(
        store.connection, users.create_user, NURSE, PASSWORD, users.Role.NURSE, now=clock()
    )
    site = replace(config, rpm=RpmConfig(quiet_days=5, device_silent_hours=12))
    app = create_app(site, store, clock=clock, sse_poll_s=0.02)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert await login(client) == 302
        page = (await (await client.get(f"/rpm/patients/{patient_id}")).get_data()).decode()
    assert 'name="t.no-data.days" value="" placeholder="5"' in page
    assert 'name="t.device-silent.hours" value="" placeholder="12"' in page
    assert "1–30 days; default 5" in page
