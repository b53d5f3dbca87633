"""The RPM worklist over a real store: ordering, actions, CSRF, roles, the live stream, audit."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from quart.testing import QuartClient

from appliance import db, users
from appliance.store import Store
from services import alerts, vitals
from services.alerts import AlertEngine
from services.rpm_enrollment import Enrollments
from services.rpm_rules import Program
from tests import factories
from tests.web.conftest import NURSE, PASSWORD, FakeClock, form_token, login
from web.rpm import _when, rule_title

ACTOR = f"user:{NURSE}"
DEVICES = "service:devices"


async def _patient(store: Store, family: str, program: Program = Program.HYPERTENSION) -> str:
    [patient] = await store.create([factories.patient(family=family, mrn=family)], DEVICES)
    await Enrollments(store).enroll(patient.logical_id, program, DEVICES)
    return patient.logical_id


def _spo2(patient_id: str, value: float, at: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": vitals.VITAL_SIGNS,
        "code": {"coding": [{"system": vitals.LOINC, "code": "59408-5"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": at,
        "valueQuantity": {"value": value, "unit": "%", "system": vitals.UCUM, "code": "%"},
        "meta": {"tag": [{"system": vitals.CAPTURE_SETTING_SYSTEM, "code": "home"}]},
    }


async def _engine(store: Store, clock: FakeClock) -> tuple[AlertEngine, int]:
    engine = AlertEngine(store, clock=clock, backlog_hours=None)
    return engine, await engine.cursor()


async def _crisis(store: Store, patient_id: str, clock: FakeClock, systolic: float = 188) -> None:
    bp = factories.bp_observation(f"Patient/{patient_id}", systolic, 100, clock().isoformat())
    bp["meta"] = {"tag": [{"system": vitals.CAPTURE_SETTING_SYSTEM, "code": "clinic"}]}
    await store.create([bp], DEVICES)


async def _alert_ids(store: Store) -> dict[str, int]:
    rows = await store.query("SELECT id, rule FROM alerts ORDER BY id")
    return {str(rule): int(i) for i, rule in rows}


async def _state(store: Store, alert_id: int) -> str:
    [(state,)] = await store.query("SELECT state FROM alerts WHERE id = ?", (alert_id,))
    return str(state)


async def _three_alerts(store: Store, clock: FakeClock) -> dict[str, str]:
    """A high SpO2 alert (oldest), a critical BP crisis, and a later high SpO2 alert."""
    first = await _patient(store, "Firstspo")
    crisis = await _patient(store, "Crisisbp")
    later = await _patient(store, "Laterspo")
    engine, cursor = await _engine(store, clock)
    await store.create([_spo2(first, 91, clock().isoformat())], DEVICES)
    cursor = await engine.evaluate_new(cursor)
    clock.advance(60)
    await _crisis(store, crisis, clock)
    cursor = await engine.evaluate_new(cursor)
    clock.advance(60)
    await store.create([_spo2(later, 92, clock().isoformat())], DEVICES)
    await engine.evaluate_new(cursor)
    return {"first": first, "crisis": crisis, "later": later}


async def test_worklist_orders_alerts_by_severity_then_age(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    await _three_alerts(store, clock)
    page = (await (await logged_in.get("/rpm/")).get_data()).decode()
    order = [m.group(1) for m in re.finditer(r'<a href="/rpm/patients/[^"]+">(\w+), Ada</a>', page)]
    assert order[:3] == ["Crisisbp", "Firstspo", "Laterspo"]
    assert "Blood pressure crisis" in page
    assert "BP 188/100 mmHg" in page  # unsealed for the nurse, in the units people read
    assert "Critical" in page  # severity in words, not colour alone
    assert 'data-events="/rpm/events"' in page


async def test_setting_filter_keeps_only_alerts_from_readings_taken_there(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    await _three_alerts(store, clock)
    home = (await (await logged_in.get("/rpm/?setting=home")).get_data()).decode()
    clinic = (await (await logged_in.get("/rpm/?setting=clinic")).get_data()).decode()
    assert "Firstspo" in home
    assert "Crisisbp" not in home
    assert "Crisisbp" in clinic
    assert "Firstspo" not in clinic
    assert "2 more alerts" in clinic


async def test_quiet_and_at_risk_patients_are_listed_below_the_alerts(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    quiet = await _patient(store, "Quietone")
    risky = await _patient(store, "Riskyone")
    # Enrolled 20 days ago with no home reading: 11 days left cannot reach 16.
    enrolled = (store.now() - timedelta(days=20)).isoformat()
    await store.transact(
        lambda conn: conn.execute(
            "UPDATE rpm_enrollment SET enrolled_at = ? WHERE patient_id = ?", (enrolled, risky)
        )
    )
    page = (await (await logged_in.get("/rpm/")).get_data()).decode()
    quiet_part = page.split('id="quiet-heading"')[1].split('id="risk-heading"')[0]
    risk_part = page.split('id="risk-heading"')[1]
    assert "Riskyone" in quiet_part  # 20 days without a reading
    assert "Quietone" not in quiet_part  # enrolled just now: not quiet yet
    assert "Riskyone" in risk_part
    assert "Quietone" not in risk_part
    clock.advance(timedelta(days=4).total_seconds())
    assert await login(logged_in) == 302  # the old session timed out meanwhile
    page = (await (await logged_in.get("/rpm/")).get_data()).decode()
    assert "Quietone" in page.split('id="quiet-heading"')[1].split('id="risk-heading"')[0]
    assert quiet in page


async def _post(client: QuartClient, path: str, **fields: str) -> Any:
    page = await client.get("/rpm/")
    fields.setdefault("csrf_token", form_token(await page.get_data()))
    return await client.post(path, form=fields)


async def test_acknowledge_snooze_and_resolve_with_a_note(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    await _three_alerts(store, clock)
    ids = await _alert_ids(store)
    crisis = ids["bp-crisis"]
    response = await _post(logged_in, f"/rpm/alerts/{crisis}/acknowledge")
    assert response.status_code == 302
    assert response.headers["Location"] == "/rpm/?done=acknowledged"
    assert await _state(store, crisis) == "acknowledged"
    page = (await (await logged_in.get(response.headers["Location"])).get_data()).decode()
    assert "Alert acknowledged." in page
    assert f"Acknowledged by {NURSE}" in page

    response = await _post(
        logged_in, f"/rpm/alerts/{crisis}/snooze", duration="4h", setting="clinic"
    )
    assert response.headers["Location"] == "/rpm/?done=snoozed&setting=clinic"
    [(state, until)] = await store.query(
        "SELECT state, snoozed_until FROM alerts WHERE id = ?", (crisis,)
    )
    assert state == "snoozed"
    assert until.startswith((clock() + timedelta(hours=4)).strftime("%Y-%m-%dT%H:%M"))

    response = await _post(logged_in, f"/rpm/alerts/{crisis}/resolve", note="   ")
    assert response.status_code == 400
    assert "Write a note" in (await response.get_data()).decode()
    assert await _state(store, crisis) == "snoozed"

    response = await _post(
        logged_in, f"/rpm/alerts/{crisis}/resolve", note="Called; re-measured 142/88."
    )
    assert response.status_code == 302
    assert await _state(store, crisis) == "resolved"
    _summary, _values, note = await alerts.AlertBook(store).detail(crisis, ACTOR)
    assert note == "Called; re-measured 142/88."
    page = (await (await logged_in.get("/rpm/")).get_data()).decode()
    assert "Crisisbp" not in page.split('id="quiet-heading"')[0]
    actions = await store.query(
        "SELECT actor, detail FROM audit WHERE entity = ? ORDER BY id", (f"alert/{crisis}",)
    )
    assert [tuple(a) for a in actions if a[1] in ("acknowledged", "snoozed", "resolved")] == [
        (ACTOR, "acknowledged"),
        (ACTOR, "snoozed"),
        (ACTOR, "resolved"),
    ]


async def test_errors_are_clear_4xx_pages(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    await _three_alerts(store, clock)
    crisis = (await _alert_ids(store))["bp-crisis"]
    missing = await _post(logged_in, "/rpm/alerts/999999/acknowledge")
    assert missing.status_code == 404
    assert "There is no alert with this number." in (await missing.get_data()).decode()
    bad = await _post(logged_in, f"/rpm/alerts/{crisis}/snooze", duration="forever")
    assert bad.status_code == 400
    assert "Choose how long" in (await bad.get_data()).decode()
    await _post(logged_in, f"/rpm/alerts/{crisis}/resolve", note="Seen in clinic.")
    again = await _post(logged_in, f"/rpm/alerts/{crisis}/acknowledge")
    assert again.status_code == 409
    assert "already resolved" in (await again.get_data()).decode()


async def test_actions_without_the_csrf_token_are_refused(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    await _three_alerts(store, clock)
    crisis = (await _alert_ids(store))["bp-crisis"]
    response = await logged_in.post(f"/rpm/alerts/{crisis}/acknowledge", form={})
    assert response.status_code == 403
    forged = await logged_in.post(
        f"/rpm/alerts/{crisis}/resolve", form={"csrf_token": "forged", "note": "x"}
    )
    assert forged.status_code == 403
    assert await _state(store, crisis) == "open"


async def test_providers_see_the_worklist_and_acknowledge_but_do_not_snooze_or_resolve(
    client: QuartClient, store: Store, clock: FakeClock
) -> None:
    anonymous = await client.get("/rpm/")
    assert anonymous.status_code == 302
    assert anonymous.headers["Location"].startswith("/login?next=/rpm/")
    assert (await client.post("/rpm/alerts/1/acknowledge", form={})).status_code == 401
    await _three_alerts(store, clock)
    crisis = (await _alert_ids(store))["bp-crisis"]
    await db.run_sync(
        store.connection, users.create_user, "prov1", PASSWORD, users.Role.PROVIDER, now=clock()
    )
    assert await login(client, "prov1") == 302
    response = await client.get("/rpm/")
    assert response.status_code == 200
    page = (await response.get_data()).decode()
    assert "Crisisbp" in page
    assert f"/rpm/alerts/{crisis}/acknowledge" in page
    assert "/snooze" not in page  # not theirs: no dead buttons
    assert "/resolve" not in page
    assert "As a provider you can acknowledge alerts" in page
    async with client.request("/rpm/events") as connection:
        await connection.send_complete()
        assert (await asyncio.wait_for(connection.receive(), 1.0)).startswith(b"retry:")
        await connection.disconnect()
    for action, fields in (("snooze", {"duration": "1h"}), ("resolve", {"note": "Seen."})):
        refused = await _post(client, f"/rpm/alerts/{crisis}/{action}", **fields)
        assert refused.status_code == 403
    assert await _state(store, crisis) == "open"
    acked = await _post(client, f"/rpm/alerts/{crisis}/acknowledge")
    assert acked.status_code == 302
    [(state, by)] = await store.query("SELECT state, acked_by FROM alerts WHERE id = ?", (crisis,))
    assert (state, by) == ("acknowledged", "user:prov1")


async def test_reading_the_worklist_is_audited_under_the_nurse(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    patients = await _three_alerts(store, clock)
    await logged_in.get("/rpm/")
    rows = await store.query(
        "SELECT patient_key, detail FROM audit WHERE actor = ? AND action = 'search' "
        "AND entity = 'alert worklist'",
        (ACTOR,),
    )
    keys = {bytes(r[0]) for r in rows}
    assert keys == {store.patient_key(f"Patient/{p}") for p in patients.values()}
    names = await store.query(
        "SELECT count(*) FROM audit WHERE actor = ? AND entity = 'Patient all'", (ACTOR,)
    )
    assert names[0][0] >= 1


async def _next_event(connection: Any, received: bytes, kind: bytes) -> tuple[bytes, str, str]:
    """Read until a whole ``event: <kind>`` block arrived; returns (rest, id, data)."""
    pattern = re.compile(rb"id: (\d+)\nevent: " + kind + rb"\ndata: (.*?)\n\n", re.S)
    async with asyncio.timeout(2.0):
        while (found := pattern.search(received)) is None:
            received += await connection.receive()
    return received[found.end() :], found.group(1).decode(), found.group(2).decode()


async def test_stream_emits_an_alert_when_the_engine_evaluates_a_crisis(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    patient = await _patient(store, "Streamcase")
    engine, cursor = await _engine(store, clock)
    async with logged_in.request("/rpm/events") as connection:
        await connection.send_complete()
        received = await asyncio.wait_for(connection.receive(), 1.0)
        assert received.startswith(b"retry:")
        await _crisis(store, patient, clock, systolic=196)
        await engine.evaluate_new(cursor)
        received, first_id, data = await _next_event(connection, b"", b"alert")
        alert = json.loads(data)
        assert alert["patient_name"] == "Streamcase, Ada"
        assert alert["title"] == "Blood pressure crisis"
        assert alert["severity"] == "critical"
        assert alert["values"] == "BP 196/100 mmHg"
        assert alert["state"] == "open"
        assert alert["setting"] == "clinic"
        taken = clock().astimezone(ZoneInfo("America/Chicago")).strftime("%H:%M")
        assert alert["taken_at"] == taken  # when the reading was taken: today, site time
        assert alert["patient_url"] == f"/rpm/patients/{patient}"
        # A state change is an event too.
        await engine.book.acknowledge(alert["id"], "user:someone")
        _rest, second_id, data = await _next_event(connection, received, b"alert")
        assert json.loads(data)["state"] == "acknowledged"
        assert int(second_id) > int(first_id)
        await connection.disconnect()
    opened = await store.query(
        "SELECT count(*) FROM audit WHERE actor = ? AND entity = 'alert worklist' "
        "AND patient_key = ?",
        (ACTOR, store.patient_key(f"Patient/{patient}")),
    )
    assert opened[0][0] == 2  # each event's alert was opened under the nurse's name


async def test_stream_replays_after_last_event_id(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    await _three_alerts(store, clock)
    ids = await _alert_ids(store)
    events = await store.query("SELECT id, alert_id FROM alert_events ORDER BY id")
    first_event = int(events[0][0])
    headers = {"Last-Event-ID": str(first_event)}
    async with logged_in.request("/rpm/events", headers=headers) as connection:
        await connection.send_complete()
        _rest, event_id, data = await _next_event(connection, b"", b"alert")
        await connection.disconnect()
    assert int(event_id) > first_event
    assert json.loads(data)["id"] != events[0][1]
    assert json.loads(data)["id"] in ids.values()


async def test_a_site_alert_shows_as_the_whole_site_without_a_patient_link(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    await _patient(store, "Waitingone")  # its Patient waits in the outbox from now
    engine = AlertEngine(store, clock=clock, backlog_hours=24)
    [backlog] = await engine.tick(store.now() + timedelta(hours=25))
    assert backlog.patient_id == alerts.SITE
    page = (await (await logged_in.get("/rpm/")).get_data()).decode()
    row = page.split(f'data-alert-id="{backlog.id}"')[1].split("</tr>")[0]
    assert '<span class="site-alert" title="About the appliance, not a patient">Whole site' in row
    assert "/rpm/patients/" not in row
    assert "Sync backlog" in row
    async with logged_in.request("/rpm/events", headers={"Last-Event-ID": "0"}) as connection:
        await connection.send_complete()
        _rest, _id, data = await _next_event(connection, b"", b"alert")
        await connection.disconnect()
    event = json.loads(data)
    assert (event["site"], event["patient_url"], event["patient_name"]) == (
        True,
        None,
        "Whole site",
    )


def test_reading_times_are_short_in_the_narrow_taken_column() -> None:
    zone = ZoneInfo("America/Chicago")
    now = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)  # 21:00 on the 26th in Chicago
    assert _when(datetime(2026, 11, 27, 2, 2, tzinfo=UTC), zone, now) == "20:02"
    assert _when(datetime(2026, 11, 26, 2, 2, tzinfo=UTC), zone, now) == "11-25 20:02"
    assert _when(datetime(2025, 12, 31, 18, 0, tzinfo=UTC), zone, now) == "2025-12-31 12:00"
    assert _when(None, zone, now) == ""


def test_a_device_alert_names_its_device() -> None:
    assert rule_title("device-silent:cuff-17") == "Home device not seen (cuff-17)"
    assert rule_title("bp-crisis") == "Blood pressure crisis"
    assert rule_title("something-new") == "something-new"
