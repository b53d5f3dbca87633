"""The nurse's arrivals queue, live vitals and their Server-Sent Events stream, over a real store."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

from quart.testing import QuartClient

from appliance.device_registry import DeviceRegistry, StationKind
from appliance.store import UNREADABLE_LEFT_OUT, Store
from services import intake
from tests import factories
from tests.tamper import move_ciphertext
from tests.web.conftest import NURSE, FakeClock
from web.nurse import UNREADABLE_NAME

DEVICES = "service:devices"
KIOSK = "kiosk:kiosk-1"


async def _patient(store: Store, *, checked_in: bool = True, family: str = "Testperson") -> str:
    """A patient; checked in at a station today (normal access) unless told otherwise."""
    [stored] = await store.create(
        [factories.patient(family=family, given="Ada", birth_date="1961-04-09")],
        "user:admin",
    )
    if checked_in:
        await _check_in(store, stored.logical_id)
    return stored.logical_id


async def _check_in(store: Store, patient_id: str, station: str = "kiosk-1") -> None:
    registry = DeviceRegistry(store)
    if station not in {s.id for s in await registry.stations()}:
        await registry.add_station(station, station.title(), StationKind.KIOSK, "user:setup")
    await registry.check_in(station, patient_id, "user:setup")


async def _kiosk_visit(store: Store, clock: FakeClock, patient_id: str) -> str:
    """What the kiosk stores for a check-in (its own builders), ending with the arrival."""
    ref = f"Patient/{patient_id}"
    now = clock()
    answers = intake.IntakeAnswers("Cough for a week", ("cough",), (2, 1))
    signature = intake.PNG_MAGIC + b"synthetic signature"
    await store.create(
        [intake.questionnaire_response(answers, ref, now, "en")], KIOSK, audit_each=True
    )
    await store.create(
        [intake.consent(ref, signature, now, "en", "I agree")], KIOSK, audit_each=True
    )
    await store.create([factories.bp_observation(ref, 133, 84, effective=now.isoformat())], DEVICES)
    [arrival] = await store.create(
        [intake.arrival(ref, now, "kiosk-1", None)], KIOSK, audit_each=True
    )
    return arrival.logical_id


async def test_page_shows_each_patient_with_the_newest_blood_pressure(
    logged_in: QuartClient, store: Store
) -> None:
    patient_id = await _patient(store)
    ref = f"Patient/{patient_id}"
    older = factories.bp_observation(ref, 150, 95, effective="2026-11-26T08:00:00-06:00")
    newest = factories.bp_observation(ref, 128, 82, effective="2026-11-26T09:30:00-06:00")
    await store.create([older], DEVICES)
    await store.create([newest], DEVICES)
    response = await logged_in.get("/nurse/")
    assert response.status_code == 200
    body = (await response.get_data()).decode()
    assert "Testperson, Ada" in body
    assert "1961-04-09" in body
    assert "128/82" in body
    assert "150/95" not in body
    # Shown in the site's zone (America/Chicago): 09:30-06:00 stays 09:30.
    assert "2026-11-26 09:30" in body
    assert f'data-patient-id="{patient_id}"' in body


async def test_heart_rate_at_the_same_time_does_not_hide_the_blood_pressure(
    logged_in: QuartClient, store: Store
) -> None:
    patient_id = await _patient(store)
    ref = f"Patient/{patient_id}"
    bp = factories.bp_observation(ref, 131, 79)
    heart_rate = {
        **{k: v for k, v in bp.items() if k != "component"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "valueQuantity": {
            "value": 64,
            "unit": "/min",
            "system": "http://unitsofmeasure.org",
            "code": "/min",
        },
    }
    await store.create([bp, heart_rate], DEVICES)
    body = (await (await logged_in.get("/nurse/")).get_data()).decode()
    assert "131/79" in body


async def test_reading_the_page_is_audited_as_searches_by_the_nurse(
    logged_in: QuartClient, store: Store, db_path: Path
) -> None:
    patient_id = await _patient(store)
    await store.create([factories.bp_observation(f"Patient/{patient_id}")], DEVICES)
    assert (await logged_in.get("/nurse/")).status_code == 200
    conn = sqlite3.connect(db_path)
    rows = conn.execute(
        "SELECT entity FROM audit WHERE actor = ? AND action = 'search' ORDER BY id",
        (f"user:{NURSE}",),
    ).fetchall()
    conn.close()
    entities = [entity for (entity,) in rows]
    assert "Patient all" not in entities  # nobody is listed who is outside normal access
    assert any(entity.startswith("Observation") and "newest" in entity for entity in entities)


async def test_event_stream_delivers_a_new_observation_within_a_second(
    logged_in: QuartClient, store: Store
) -> None:
    patient_id = await _patient(store)
    async with logged_in.request("/nurse/events") as connection:
        await connection.send_complete()
        received = await asyncio.wait_for(connection.receive(), 1.0)
        assert received.startswith(b"retry:")  # the stream has its starting row now
        assert connection.headers is not None
        assert connection.headers["Content-Type"].startswith("text/event-stream")
        assert connection.headers["Cache-Control"] == "no-store"
        [obs] = await store.create(
            [factories.bp_observation(f"Patient/{patient_id}", 142, 91)], DEVICES
        )
        async with asyncio.timeout(1.0):
            while b"\n\n" not in received.split(b"\n\n", 1)[1]:
                received += await connection.receive()
        await connection.disconnect()
    event = received.split(b"\n\n")[1].decode()
    lines = dict(line.split(": ", 1) for line in event.splitlines())
    assert lines["event"] == "observation"
    assert int(lines["id"]) == obs.row_id
    data = json.loads(lines["data"])
    assert data["patient_id"] == patient_id
    assert data["observation_id"] == obs.logical_id
    assert (data["systolic"], data["diastolic"], data["unit"]) == (142, 91, "mm[Hg]")
    assert data["effective"] == "2026-11-26T09:30:00-06:00"
    assert data["interpretation"] == []


async def test_event_stream_replays_after_last_event_id(
    logged_in: QuartClient, store: Store
) -> None:
    patient_id = await _patient(store)
    [first] = await store.create(
        [factories.bp_observation(f"Patient/{patient_id}", 120, 80)], DEVICES
    )
    [second] = await store.create(
        [factories.bp_observation(f"Patient/{patient_id}", 121, 81)], DEVICES
    )
    headers = {"Last-Event-ID": str(first.row_id)}
    async with logged_in.request("/nurse/events", headers=headers) as connection:
        await connection.send_complete()
        received = b""
        async with asyncio.timeout(1.0):
            while b"event: observation" not in received:
                received += await connection.receive()
        await connection.disconnect()
    assert f"id: {second.row_id}\n".encode() in received
    assert f"id: {first.row_id}\n".encode() not in received


async def test_event_stream_ends_when_the_session_expires(
    logged_in: QuartClient, clock: FakeClock
) -> None:
    async with logged_in.request("/nurse/events") as connection:
        await connection.send_complete()
        received = await asyncio.wait_for(connection.receive(), 1.0)
        clock.advance(901)
        async with asyncio.timeout(2.0):
            while b"event: expired" not in received:
                received += await connection.receive()
        await connection.disconnect()
    assert b"event: expired" in received


async def test_event_stream_requires_login(client: QuartClient) -> None:
    response = await client.get("/nurse/events", headers={"Accept": "text/event-stream"})
    assert response.status_code == 401


async def test_names_are_escaped_in_the_page(logged_in: QuartClient, store: Store) -> None:
    [stored] = await store.create(
        [factories.patient(family="<b>Bold</b>", given="Ann")], "user:admin"
    )
    await _check_in(store, stored.logical_id)
    body = (await (await logged_in.get("/nurse/")).get_data()).decode()
    assert "&lt;b&gt;Bold&lt;/b&gt;, Ann" in body
    assert "<b>Bold" not in body


# -- who is listed ---------------------------------------------------------------------------


async def test_only_patients_within_normal_access_are_listed(
    logged_in: QuartClient, store: Store
) -> None:
    await _patient(store, family="Seentoday")
    stranger = await _patient(store, checked_in=False, family="Notheretoday")
    await store.create([factories.bp_observation(f"Patient/{stranger}", 177, 99)], DEVICES)
    body = (await (await logged_in.get("/nurse/")).get_data()).decode()
    assert "Seentoday, Ada" in body
    assert "Notheretoday" not in body
    assert stranger not in body
    assert "177/99" not in body


async def test_an_arrival_outside_normal_access_is_not_in_the_queue(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    stranger = await _patient(store, checked_in=False, family="Notheretoday")
    await store.create([intake.arrival(f"Patient/{stranger}", clock(), "kiosk-1", None)], KIOSK)
    body = (await (await logged_in.get("/nurse/")).get_data()).decode()
    assert "Notheretoday" not in body
    assert "Nobody has checked in at the kiosk yet today." in body


# -- the arrivals queue ------------------------------------------------------------------------


def _arrival_row(body: str, encounter_id: str) -> str:
    start = body.index(f'data-encounter-id="{encounter_id}"')
    return body[start : body.index("</tr>", start)]


async def test_a_kiosk_check_in_is_queued_with_what_the_kiosk_collected(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    patient_id = await _patient(store)
    encounter_id = await _kiosk_visit(store, clock, patient_id)
    clock.advance(12 * 60 + 5)
    body = (await (await logged_in.get("/nurse/")).get_data()).decode()
    row = _arrival_row(body, encounter_id)
    assert f'data-patient-id="{patient_id}"' in row
    assert f'<a href="/patients/{patient_id}">Testperson, Ada</a>' in row
    assert '<td class="station">kiosk-1</td>' in row
    assert '<td class="intake yes">Yes</td>' in row
    assert '<td class="consent yes">Yes</td>' in row
    assert '<td class="vitals yes">Yes (1)</td>' in row
    assert '<td class="photos">0</td>' in row
    assert '<td class="num waiting">12 min</td>' in row
    assert 'id="arrivals-count">1<' in body


async def test_a_check_in_without_intake_says_so(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    patient_id = await _patient(store)
    [arrival] = await store.create(
        [intake.arrival(f"Patient/{patient_id}", clock(), "kiosk-1", None)], KIOSK
    )
    row = _arrival_row(
        (await (await logged_in.get("/nurse/")).get_data()).decode(), arrival.logical_id
    )
    assert '<td class="intake no">No</td>' in row
    assert '<td class="consent no">No</td>' in row
    assert '<td class="vitals no">No</td>' in row


async def test_finished_visits_and_yesterdays_arrivals_leave_the_queue(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    patient_id = await _patient(store)
    ref = f"Patient/{patient_id}"
    finished = {**intake.arrival(ref, clock(), "kiosk-1", None), "status": "finished"}
    yesterday = intake.arrival(ref, clock() - timedelta(days=1, hours=1), "kiosk-1", None)
    [done, old] = await store.create([finished, yesterday], KIOSK)
    body = (await (await logged_in.get("/nurse/")).get_data()).decode()
    assert done.logical_id not in body
    assert old.logical_id not in body
    assert "Nobody has checked in at the kiosk yet today." in body


async def test_the_queue_read_is_audited_with_the_patient_key(
    logged_in: QuartClient, store: Store, clock: FakeClock, db_path: Path
) -> None:
    patient_id = await _patient(store)
    await _kiosk_visit(store, clock, patient_id)
    assert (await logged_in.get("/nurse/")).status_code == 200
    conn = sqlite3.connect(db_path)
    rows = conn.execute(
        "SELECT patient_key, detail FROM audit WHERE actor = ? AND entity LIKE '%arrivals today'",
        (f"user:{NURSE}",),
    ).fetchall()
    conn.close()
    assert rows == [(store.patient_key(f"Patient/{patient_id}"), "normal access: checked in today")]


# -- the live stream -------------------------------------------------------------------------


async def _events_until(connection: Any, marker: bytes) -> bytes:
    received = b""
    async with asyncio.timeout(2.0):
        while marker not in received:
            received += await connection.receive()
    return received


async def test_event_stream_sends_a_new_arrival(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    patient_id = await _patient(store)
    async with logged_in.request("/nurse/events") as connection:
        await connection.send_complete()
        await asyncio.wait_for(connection.receive(), 1.0)
        encounter_id = await _kiosk_visit(store, clock, patient_id)
        received = await _events_until(connection, f'"encounter_id":"{encounter_id}"'.encode())
        await connection.disconnect()
    event = next(e for e in received.decode().split("\n\n") if "event: arrival" in e)
    data = json.loads(dict(line.split(": ", 1) for line in event.splitlines())["data"])
    assert data["patient_id"] == patient_id
    assert data["name"] == "Testperson, Ada"
    assert (data["intake"], data["consent"], data["vitals"], data["photos"]) == (1, 1, 1, 0)
    assert data["station"] == "kiosk-1"
    assert data["chart_url"] == f"/patients/{patient_id}"


async def test_event_stream_leaves_out_patients_outside_normal_access(
    logged_in: QuartClient, store: Store
) -> None:
    stranger = await _patient(store, checked_in=False, family="Notheretoday")
    seen = await _patient(store)
    async with logged_in.request("/nurse/events") as connection:
        await connection.send_complete()
        await asyncio.wait_for(connection.receive(), 1.0)
        await store.create([factories.bp_observation(f"Patient/{stranger}", 177, 99)], DEVICES)
        await store.create([factories.bp_observation(f"Patient/{seen}", 121, 71)], DEVICES)
        received = await _events_until(connection, seen.encode())
        await connection.disconnect()
    assert stranger.encode() not in received
    assert b'"systolic":121' in received


async def test_records_that_fail_authentication_leave_the_queue_and_the_stream_working(
    logged_in: QuartClient, store: Store, clock: FakeClock, db_path: Path
) -> None:
    ada = await _patient(store)
    # At another kiosk: checked in at Ada's, Bo would check her out at the store's clock,
    # which is "yesterday" for the app's when the test runs in the hour before the site's
    # midnight (the app's clock is moved past it), and she would leave today's queue.
    bo = await _patient(store, family="Otherperson", checked_in=False)
    await _check_in(store, bo, "kiosk-2")
    ada_visit = await _kiosk_visit(store, clock, ada)
    bo_visit = await _kiosk_visit(store, clock, bo)
    [start] = await store.create([factories.bp_observation(f"Patient/{bo}", 120, 80)], DEVICES)
    [bad] = await store.create([factories.bp_observation(f"Patient/{ada}", 150, 95)], DEVICES)
    [good] = await store.create([factories.bp_observation(f"Patient/{bo}", 122, 82)], DEVICES)
    move_ciphertext(db_path, ada, bo)  # Ada's Patient record
    move_ciphertext(db_path, bad.logical_id, good.logical_id)  # her newest reading
    response = await logged_in.get("/nurse/")
    assert response.status_code == 200  # before: 500, for every nurse, all day
    body = (await response.get_data()).decode()
    assert "Otherperson, Ada" in _arrival_row(body, bo_visit)
    assert UNREADABLE_NAME in _arrival_row(body, ada_visit)  # she is still queued
    assert "Testperson" not in body  # what cannot be read is not guessed at
    chart = await logged_in.get(f"/patients/{ada}")  # her chart says why, in plain words
    assert chart.status_code == 500
    assert "integrity check (damaged or altered on disk)" in (await chart.get_data()).decode()
    # The live stream steps over the unreadable reading to the next one.
    headers = {"Last-Event-ID": str(start.row_id)}
    async with logged_in.request("/nurse/events", headers=headers) as connection:
        await connection.send_complete()
        received = await _events_until(connection, f"id: {good.row_id}\n".encode())
        await connection.disconnect()
    assert f"id: {bad.row_id}\n".encode() not in received
    conn = sqlite3.connect(db_path)
    failures = conn.execute(
        "SELECT actor, entity, detail FROM audit WHERE outcome = 'failure'"
    ).fetchall()
    conn.close()
    assert {entity for _, entity, _ in failures} == {
        f"Patient/{ada}",
        f"Observation/{bad.logical_id}",
    }
    assert {(actor, detail) for actor, _, detail in failures} == {
        (f"user:{NURSE}", UNREADABLE_LEFT_OUT)
    }
