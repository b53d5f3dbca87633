"""The demo's remote-monitoring data: enrolled once, charts filled, the promised alerts raised."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from appliance.device_registry import DeviceRegistry
from appliance.store import Store
from services import demo, rpm_demo, rpm_rules
from services.alerts import AlertEngine
from services.rpm_billing import RpmBilling
from services.rpm_enrollment import Enrollments

CHICAGO = ZoneInfo("America/Chicago")
NURSE = "user:nurse"


def test_the_month_of_readings_is_in_the_past_and_parses() -> None:
    now = datetime(2026, 11, 27, 9, 15, tzinfo=UTC)
    readings = rpm_demo.history(["a", "b", "c", "d"], now, CHICAGO, random.Random(1))
    times = [datetime.fromisoformat(r["effectiveDateTime"]) for r in readings]
    assert times == sorted(times)
    assert max(times) <= now
    assert min(times) >= now - timedelta(days=31)
    parsed = [
        m
        for n, r in enumerate(readings)
        for m in rpm_rules.readings_from_observation({**r, "id": f"obs-{n}"})  # ids: the store's
    ]
    assert len(parsed) >= len(readings)  # every one is a reading the rules and charts know
    settings = {m.setting.value for m in parsed if m.setting is not None}
    assert settings == {"home", "clinic"}
    assert {m.unit for m in parsed if m.measure is rpm_rules.Measure.WEIGHT} == {"[lb_av]", "kg"}


async def test_demo_enrols_home_patients_once_and_raises_the_promised_alerts(
    store: Store,
) -> None:
    registry = DeviceRegistry(store)
    stations = await demo.seed_devices(store, registry)
    engine = AlertEngine(store, backlog_hours=None)
    await engine.pin_start()
    assert await rpm_demo.seed(store, CHICAGO)
    assert not await rpm_demo.seed(store, CHICAGO)  # a restart adds nothing
    assert await demo.seed_devices(store, registry) == stations  # stations see only theirs
    enrolled = await Enrollments(store).enrolled(NURSE)
    by_program = {e.program.value: e.patient_id for e in enrolled}
    assert sorted(by_program) == ["copd", "diabetes", "heart-failure", "hypertension"]
    assert not {e.patient_id for e in enrolled} & set(stations)
    today = store.now().astimezone(CHICAGO).date()
    assert {e.enrolled_at.astimezone(CHICAGO).date() for e in enrolled} == {
        today - timedelta(days=rpm_demo.ENROLLED_DAYS_AGO)
    }
    await engine.run_until_idle()
    await engine.tick(store.now())
    live = {(a.patient_id, a.rule): a.severity.value for a in await engine.book.live(NURSE)}
    hyper, failing, lungs, sugar = (
        by_program[p] for p in ("hypertension", "heart-failure", "copd", "diabetes")
    )
    assert live == {
        (hyper, "bp-crisis"): "critical",
        (failing, "weight-gain-day"): "medium",
        (lungs, "spo2-low"): "high",
        (sugar, "no-data"): "low",
    }
    billing = {b.patient_id: b for b in await RpmBilling(store, CHICAGO).billing(actor=NURSE)}
    assert billing[sugar].at_risk
    assert not billing[hyper].at_risk
    assert len(billing[failing].days) >= 16
