"""The nurse's live vitals page and its Server-Sent Events stream, over a real store."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

from quart.testing import QuartClient

from appliance.store import Store
from tests import factories
from tests.web.conftest import NURSE, FakeClock

DEVICES = "service:devices"


async def _patient(store: Store) -> str:
    [stored] = await store.create(
        [factories.patient(family="Testperson", given="Ada", birth_date="1961-04-09")],
        "user:admin",
    )
    return stored.logical_id


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
    assert "Patient all" in entities
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
    await store.create([factories.patient(family="<b>Bold</b>", given="Ann")], "user:admin")
    body = (await (await logged_in.get("/nurse/")).get_data()).decode()
    assert "&lt;b&gt;Bold&lt;/b&gt;, Ann" in body
    assert "<b>Bold" not in body
