"""Stations, devices and held readings in the web UI, over a real store."""

from __future__ import annotations

import random
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from quart.testing import QuartClient

from appliance import db, users
from appliance.device_registry import DeviceRegistry, HeldState, Setting, StationKind, Transport
from appliance.store import Store
from drivers.blood_pressure import parse_measurement
from drivers.simulated import SimulatedBloodPressureCuff
from services.device_hub import DeviceHub
from services.vitals import CaptureMethod
from tests import factories
from tests.web.conftest import FakeClock, form_token, login
from web.devices import UNREADABLE_VALUES

ADMIN = "admin1"
ADMIN_PASSWORD = "admin horse battery staple"


async def _clinic(store: Store) -> tuple[DeviceRegistry, str]:
    registry = DeviceRegistry(store)
    await registry.add_station("kiosk-1", "Kiosk 1", StationKind.KIOSK, "user:admin")
    await registry.register_device(
        "cuff-1",
        name="Kiosk cuff",
        transport=Transport.BLE,
        profile="blood_pressure",
        address="AA:BB:CC:DD:EE:01",
        setting=Setting.CLINIC,
        actor="user:admin",
    )
    await registry.assign_device("cuff-1", "user:admin", station_id="kiosk-1")
    [patient] = await store.create(
        [factories.patient(family="Testperson", given="Ada", birth_date="1961-04-09")],
        "user:admin",
    )
    return registry, patient.logical_id


async def _held_reading(store: Store, registry: DeviceRegistry) -> int:
    now = datetime.now(UTC).replace(tzinfo=None)
    cuff = SimulatedBloodPressureCuff(rng=random.Random(3), now=lambda: now)
    hub = DeviceHub(store, registry, UTC)
    outcome = await hub.on_event(
        "cuff-1", parse_measurement(cuff.next_payload()), datetime.now(UTC), CaptureMethod.BLE
    )
    assert outcome is not None
    assert outcome.held_id is not None
    return outcome.held_id


async def test_nurse_checks_a_patient_in_at_a_station(logged_in: QuartClient, store: Store) -> None:
    registry, patient_id = await _clinic(store)
    page = await logged_in.get("/devices/")
    body = await page.get_data()
    assert b"Kiosk 1" in body
    assert b"Testperson, Ada" in body  # offered in the check-in list
    assert b"Register a device" not in body  # admin only
    token = form_token(body)
    response = await logged_in.post(
        "/devices/stations/kiosk-1/checkin", form={"csrf_token": token, "patient_id": patient_id}
    )
    assert response.status_code == 302
    [checkin] = await registry.checkins("kiosk-1")
    assert checkin.patient_id == patient_id
    after = (await (await logged_in.get("/devices/")).get_data()).decode()
    assert "Check out" in after


async def test_check_in_without_the_csrf_token_is_refused(
    logged_in: QuartClient, store: Store
) -> None:
    registry, patient_id = await _clinic(store)
    response = await logged_in.post(
        "/devices/stations/kiosk-1/checkin", form={"patient_id": patient_id}
    )
    assert response.status_code == 403
    assert await registry.checkins("kiosk-1") == []


async def test_unknown_patient_cannot_be_checked_in(logged_in: QuartClient, store: Store) -> None:
    registry, _ = await _clinic(store)
    token = form_token(await (await logged_in.get("/devices/")).get_data())
    response = await logged_in.post(
        "/devices/stations/kiosk-1/checkin", form={"csrf_token": token, "patient_id": "nope"}
    )
    assert response.status_code == 400
    assert b"Choose a patient" in await response.get_data()
    assert await registry.checkins("kiosk-1") == []


async def test_held_reading_is_shown_with_its_values_and_filed_by_a_nurse(
    logged_in: QuartClient, store: Store
) -> None:
    registry, patient_id = await _clinic(store)
    held_id = await _held_reading(store, registry)
    page = await logged_in.get("/devices/held")
    body = (await page.get_data()).decode()
    assert "Blood pressure: " in body
    assert "Heart rate: " in body
    assert "no patient was checked in at Kiosk 1" in body
    token = form_token(body.encode())
    response = await logged_in.post(
        f"/devices/held/{held_id}/assign", form={"csrf_token": token, "patient_id": patient_id}
    )
    assert response.status_code == 302
    assert await registry.held() == []
    assert len(await store.newest(f"Patient/{patient_id}", "Observation", "user:test")) == 2
    again = await logged_in.get("/devices/held")
    assert b"Nothing waiting" in await again.get_data()


async def test_set_aside_needs_a_reason(logged_in: QuartClient, store: Store) -> None:
    registry, _ = await _clinic(store)
    held_id = await _held_reading(store, registry)
    token = form_token(await (await logged_in.get("/devices/held")).get_data())
    refused = await logged_in.post(
        f"/devices/held/{held_id}/discard", form={"csrf_token": token, "note": " "}
    )
    assert refused.status_code == 400
    done = await logged_in.post(
        f"/devices/held/{held_id}/discard", form={"csrf_token": token, "note": "test reading"}
    )
    assert done.status_code == 302
    assert [h.id for h in await registry.held(HeldState.DISCARDED)] == [held_id]


async def test_a_held_reading_whose_values_fail_authentication_can_still_be_discarded(
    logged_in: QuartClient, store: Store, db_path: Path
) -> None:
    registry, _ = await _clinic(store)
    held_id = await _held_reading(store, registry)
    conn = sqlite3.connect(db_path)  # its sealed payload altered on disk (one byte flipped)
    [(payload,)] = conn.execute(
        "SELECT payload FROM unmatched_readings WHERE id = ?", (held_id,)
    ).fetchall()
    flipped = bytearray(payload)
    flipped[-1] ^= 0x01
    conn.execute(
        "UPDATE unmatched_readings SET payload = ? WHERE id = ?", (bytes(flipped), held_id)
    )
    conn.commit()
    conn.close()
    page = await logged_in.get("/devices/held")
    assert page.status_code == 200  # before: 500, and no held reading could be handled
    body = await page.get_data()
    assert UNREADABLE_VALUES.encode() in body
    token = form_token(body)
    done = await logged_in.post(
        f"/devices/held/{held_id}/discard", form={"csrf_token": token, "note": "unreadable"}
    )
    assert done.status_code == 302
    assert [h.id for h in await registry.held(HeldState.DISCARDED)] == [held_id]


async def test_only_an_admin_registers_and_assigns_devices(
    client: QuartClient, logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    registry, _ = await _clinic(store)
    token = form_token(await (await logged_in.get("/devices/")).get_data())
    form = {
        "csrf_token": token,
        "device_id": "ox-1",
        "transport": "ble",
        "profile": "blood_pressure",
    }
    assert (await logged_in.post("/devices/register", form=form)).status_code == 403
    await db.run_sync(
        store.connection, users.create_user, ADMIN, ADMIN_PASSWORD, users.Role.ADMIN, now=clock()
    )
    await logged_in.post("/logout", form={"csrf_token": token})
    assert await login(client, ADMIN, ADMIN_PASSWORD) == 302
    page = await client.get("/devices/")
    body = await page.get_data()
    assert b"Register a device" in body
    token = form_token(body)
    bad = await client.post(
        "/devices/register",
        form={"csrf_token": token, "device_id": "ox-1", "transport": "ble", "profile": "espresso"},
    )
    assert bad.status_code == 400
    assert b"not a ble profile" in await bad.get_data()
    ok = await client.post(
        "/devices/register",
        form={
            "csrf_token": token,
            "device_id": "cuff-2",
            "name": "Exam cuff",
            "transport": "ble",
            "profile": "blood_pressure",
            "setting": "clinic",
            "station_id": "kiosk-1",
        },
    )
    assert ok.status_code == 302
    assert (await registry.device("cuff-2")).station_id == "kiosk-1"
    unassign = await client.post(
        "/devices/cuff-2/assign", form={"csrf_token": token, "target": "none"}
    )
    assert unassign.status_code == 302
    assert (await registry.device("cuff-2")).station_id is None
