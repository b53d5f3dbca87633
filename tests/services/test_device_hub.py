"""Readings reach the right chart through a real store, or wait for a nurse; nothing is lost."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from appliance import db, key_rotation
from appliance.device_registry import (
    DeviceRegistry,
    HeldState,
    RegistryError,
    Setting,
    StationKind,
    Transport,
)
from appliance.keys import load_keyring
from appliance.store import Store
from drivers.blood_pressure import BloodPressureSession, parse_measurement
from drivers.gatt import BatteryLevel, DeviceInformation
from drivers.simulated import SimulatedBloodPressureCuff, SimulatedCuffPeripheral
from services import readings, vitals
from services.device_hub import DeviceHub
from services.simulated_link import SimulatedGattLink
from services.vitals import CaptureMethod
from tests import factories

ZONE = ZoneInfo("America/Chicago")
ADMIN = "user:admin"
NURSE = "user:nurse"
BP_CODE = f"{vitals.LOINC}|{vitals.BP_PANEL}"


async def _setup(store: Store) -> tuple[DeviceRegistry, DeviceHub, str, str]:
    registry = DeviceRegistry(store)
    await registry.add_station("kiosk-1", "Kiosk 1", StationKind.KIOSK, ADMIN)
    await registry.register_device(
        "cuff-1",
        name="Kiosk cuff",
        transport=Transport.BLE,
        profile="blood_pressure",
        address="AA:BB:CC:DD:EE:01",
        setting=Setting.CLINIC,
        actor=ADMIN,
    )
    await registry.assign_device("cuff-1", ADMIN, station_id="kiosk-1")
    p1, p2 = await store.create([factories.patient(), factories.patient()], NURSE)
    return registry, DeviceHub(store, registry, ZONE), p1.logical_id, p2.logical_id


def _reading(
    seed: int = 1, *, later: timedelta = timedelta(0), at: datetime | None = None
) -> object:
    """A cuff reading taken now (+ ``later``) or ``at``; device times are whole seconds."""
    when = (at or datetime.now(UTC)) + later
    now = when.astimezone(ZONE).replace(tzinfo=None)
    cuff = SimulatedBloodPressureCuff(rng=random.Random(seed), now=lambda: now)
    return parse_measurement(cuff.next_payload())


async def test_reading_lands_in_the_chart_of_the_patient_checked_in_at_the_station(
    store: Store,
) -> None:
    registry, hub, p1, p2 = await _setup(store)
    await registry.check_in("kiosk-1", p1, NURSE)
    outcome = await hub.on_event("cuff-1", _reading(), datetime.now(UTC), CaptureMethod.BLE)
    assert outcome is not None
    assert outcome.held_id is None
    [bp] = await store.newest(f"Patient/{p1}", "Observation", NURSE, code=BP_CODE)
    assert bp["device"]["reference"].startswith("Device/")
    device = await store.read("Device", bp["device"]["reference"].split("/")[1], NURSE)
    assert device["identifier"][1] == {"system": readings.DEVICE_ID_SYSTEM, "value": "cuff-1"}
    # The next patient checked in gets the next reading; the first chart is unchanged. (A
    # reading in the very second of the hand-over could be either patient's: it is held.)
    handover = await registry.check_in("kiosk-1", p2, NURSE)
    in_that_second = _reading(2, at=datetime.fromisoformat(handover.checked_in_at))
    ambiguous = await hub.on_event("cuff-1", in_that_second, datetime.now(UTC), CaptureMethod.BLE)
    assert ambiguous is not None
    assert ambiguous.reason is not None
    assert "more than one patient" in ambiguous.reason
    later = _reading(3, later=timedelta(seconds=2))
    await hub.on_event("cuff-1", later, datetime.now(UTC) + timedelta(seconds=2), CaptureMethod.BLE)
    assert len(await store.newest(f"Patient/{p1}", "Observation", NURSE, code=BP_CODE)) == 1
    assert len(await store.newest(f"Patient/{p2}", "Observation", NURSE, code=BP_CODE)) == 1


async def test_reading_with_nobody_checked_in_is_held_then_assigned_by_a_nurse(
    store: Store,
) -> None:
    registry, hub, p1, _ = await _setup(store)
    outcome = await hub.on_event("cuff-1", _reading(), datetime.now(UTC), CaptureMethod.BLE)
    assert outcome is not None
    assert outcome.held_id is not None
    assert outcome.reason == "no patient was checked in at Kiosk 1 when the reading was taken"
    [held] = await registry.held()
    assert held.summary == "Blood pressure, heart rate"
    assert await store.newest(f"Patient/{p1}", "Observation", NURSE) == []
    outbox_before = await store.query("SELECT count(*) FROM outbox")
    stored = await registry.assign_held(held.id, p1, NURSE)
    assert [s.resource["subject"]["reference"] for s in stored] == [f"Patient/{p1}"] * 2
    assert len(await store.newest(f"Patient/{p1}", "Observation", NURSE)) == 2
    assert (await store.query("SELECT count(*) FROM outbox"))[0][0] == outbox_before[0][0] + 2
    assert await registry.held() == []
    [done] = await registry.held(HeldState.ASSIGNED)
    assert done.patient_id == p1
    with pytest.raises(RegistryError, match="no longer pending"):
        await registry.assign_held(held.id, p1, NURSE)
    # The refused second assignment stored nothing.
    assert len(await store.newest(f"Patient/{p1}", "Observation", NURSE)) == 2


async def test_discarding_needs_a_reason_and_keeps_the_reading(store: Store, db_path: Path) -> None:
    registry, hub, _, _ = await _setup(store)
    outcome = await hub.on_event("cuff-1", _reading(), datetime.now(UTC), CaptureMethod.BLE)
    assert outcome is not None
    assert outcome.held_id is not None
    with pytest.raises(RegistryError, match="say why"):
        await registry.discard_held(outcome.held_id, "  ", NURSE)
    await registry.discard_held(outcome.held_id, "Zebulon tested the cuff on himself", NURSE)
    [kept] = await registry.held(HeldState.DISCARDED)
    assert kept.id == outcome.held_id
    assert len(await registry.open_held(kept.id, NURSE)) == 2
    raw = db_path.read_bytes() + db_path.with_name(db_path.name + "-wal").read_bytes()
    assert b"Zebulon" not in raw
    assert b"8480-6" not in raw  # the held Observations are sealed, not plain JSON


async def test_held_readings_and_notes_are_resealed_on_data_key_rotation(
    store: Store, db_path: Path, kek_path: Path
) -> None:
    registry, hub, _, _ = await _setup(store)
    first = await hub.on_event("cuff-1", _reading(), datetime.now(UTC), CaptureMethod.BLE)
    second = await hub.on_event("cuff-1", _reading(3), datetime.now(UTC), CaptureMethod.BLE)
    assert first
    assert first.held_id
    assert second
    assert second.held_id
    await registry.discard_held(second.held_id, "test reading", NURSE)
    before = await registry.open_held(first.held_id, NURSE)
    kek = kek_path.read_bytes()
    conn = db.connect_sync(db_path)
    key_rotation.rotate_data_key(conn, kek)
    result = key_rotation.reencrypt(conn, kek)
    assert len(result.retired_versions) == 1
    keyring = load_keyring(conn, kek)
    note = conn.execute(
        "SELECT note FROM unmatched_readings WHERE id = ?", (second.held_id,)
    ).fetchone()[0]
    assert keyring.unseal("unmatched_readings.note", str(second.held_id), note) == "test reading"
    conn.close()
    reopened = await Store.open(db_path, kek_path)
    assert await DeviceRegistry(reopened).open_held(first.held_id, NURSE) == before
    await reopened.close()


async def test_home_device_readings_go_to_its_patient_tagged_home(store: Store) -> None:
    registry, hub, p1, _ = await _setup(store)
    await registry.register_device(
        "scale-home",
        name="Home cuff",
        transport=Transport.HUB,
        profile="blood_pressure",
        address=None,
        setting=Setting.HOME,
        actor=ADMIN,
    )
    with pytest.raises(RegistryError, match="home device"):
        await registry.assign_device("scale-home", ADMIN, station_id="kiosk-1")
    await registry.assign_device("scale-home", ADMIN, patient_id=p1)
    await hub.on_event("scale-home", _reading(), datetime.now(UTC), CaptureMethod.VENDOR_HUB)
    [bp] = await store.newest(f"Patient/{p1}", "Observation", NURSE, code=BP_CODE)
    tags = {t["code"] for t in bp["meta"]["tag"]}
    assert {"home", "vendor-hub"} <= tags


async def test_device_information_and_battery_update_the_registry(store: Store) -> None:
    registry, hub, _, _ = await _setup(store)
    received = datetime.now(UTC)
    await hub.on_event(
        "cuff-1", DeviceInformation("manufacturer", "Acme"), received, CaptureMethod.BLE
    )
    await hub.on_event(
        "cuff-1", DeviceInformation("serial_number", "SN-9"), received, CaptureMethod.BLE
    )
    await hub.on_event("cuff-1", BatteryLevel(41), received, CaptureMethod.BLE)
    device = await registry.device("cuff-1")
    assert (device.manufacturer, device.serial_number, device.battery_percent) == (
        "Acme",
        "SN-9",
        41,
    )
    assert device.last_seen is not None


async def test_record_number_commits_with_the_readings(store: Store) -> None:
    registry, _, p1, _ = await _setup(store)
    obs = factories.bp_observation(f"Patient/{p1}")
    await store.create([obs], "service:devices", also=registry.reading_filed("cuff-1", 41))
    assert (await registry.device("cuff-1")).last_sequence == 41

    def fail(conn: object, ids: list[int]) -> None:
        raise RegistryError("simulated failure inside the transaction")

    with pytest.raises(RegistryError):
        await store.create([obs], "service:devices", also=fail)
    assert len(await store.newest(f"Patient/{p1}", "Observation", NURSE)) == 1


async def test_check_in_closes_the_previous_patient_and_checkout_ends_it(store: Store) -> None:
    registry, _, p1, p2 = await _setup(store)
    await registry.check_in("kiosk-1", p1, NURSE)
    await registry.check_in("kiosk-1", p2, NURSE)
    first, second = await registry.checkins("kiosk-1")
    assert first.patient_id == p1
    assert first.checked_out_at == second.checked_in_at
    assert second.checked_out_at is None
    assert await registry.check_out("kiosk-1", NURSE)
    assert not await registry.check_out("kiosk-1", NURSE)
    with pytest.raises(RegistryError, match="no station"):
        await registry.check_in("nowhere", p1, NURSE)


async def test_simulated_cuff_runs_the_real_session_and_gets_its_clock_set(store: Store) -> None:
    registry, hub, p1, _ = await _setup(store)
    await registry.check_in("kiosk-1", p1, NURSE)
    received: list[object] = []

    async def on_event(event: object) -> None:
        received.append(event)
        await hub.on_event("cuff-1", event, datetime.now(UTC), CaptureMethod.SIMULATED)

    now = datetime.now(ZONE)
    peripheral = SimulatedCuffPeripheral(rng=random.Random(5), now=lambda: now)
    assert abs(peripheral.device_now() - now.replace(tzinfo=None)) >= timedelta(hours=2)
    link = SimulatedGattLink(
        peripheral, BloodPressureSession, on_event, clock=lambda: now.replace(tzinfo=None)
    )
    await link.connect()
    assert len(peripheral.time_writes) == 1
    assert peripheral.device_now() == now.replace(tzinfo=None, microsecond=0)
    await link.reading()
    assert {type(e).__name__ for e in received} >= {"DeviceInformation", "BatteryLevel"}
    [bp] = await store.newest(f"Patient/{p1}", "Observation", NURSE, code=BP_CODE)
    assert {"system": vitals.TIME_SOURCE_SYSTEM, "code": "device"} in bp["meta"]["tag"]
    assert (await registry.device("cuff-1")).model == "SIM-BP"
