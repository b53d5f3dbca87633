"""Every Bluetooth profile end to end without a radio: simulated peripheral → the real session
→ the hub → valid FHIR in the right chart (the same code path a real device takes after bleak)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from appliance import fhir
from appliance.device_registry import DeviceRegistry, HeldState, Setting, StationKind, Transport
from appliance.store import Store
from drivers import glucose
from drivers.ieee11073 import SFloatValue
from drivers.simulated import SimulatedGlucoseMeter
from services import device_profiles, gatt_observations, vitals
from services.device_hub import DeviceHub
from services.simulated_link import SimulatedGattLink
from services.vitals import CaptureMethod
from tests import factories

NURSE = "user:nurse"
# profile → the LOINC codes of the Observations one reading produces
EXPECTED = {
    "blood_pressure": {vitals.BP_PANEL, vitals.HEART_RATE},
    "glucose": {"41653-7"},
    "weight": {gatt_observations.BODY_WEIGHT, gatt_observations.BMI, gatt_observations.BODY_HEIGHT},
    "pulse_oximetry": {gatt_observations.SPO2, vitals.HEART_RATE},
    "thermometer": {gatt_observations.BODY_TEMPERATURE},
}


async def _station_with(store: Store, profile: str) -> tuple[DeviceRegistry, DeviceHub, str]:
    registry = DeviceRegistry(store)
    await registry.add_station("exam-1", "Exam room 1", StationKind.EXAM_ROOM, NURSE)
    await registry.register_device(
        "dev-1",
        name=f"Simulated {profile}",
        transport=Transport.SIMULATED,
        profile=profile,
        address=None,
        setting=Setting.CLINIC,
        actor=NURSE,
    )
    await registry.assign_device("dev-1", NURSE, station_id="exam-1")
    [patient] = await store.create([factories.patient()], NURSE)
    await registry.check_in("exam-1", patient.logical_id, NURSE)
    return registry, DeviceHub(store, registry, UTC), patient.logical_id


def _link(registry_hub: DeviceHub, device: object, peripheral: object) -> SimulatedGattLink:
    async def on_event(event: object) -> None:
        await registry_hub.on_event("dev-1", event, datetime.now(UTC), CaptureMethod.SIMULATED)

    return SimulatedGattLink(
        peripheral,  # type: ignore[arg-type]
        device_profiles.session_factory(device, registry_hub.last_sequence),  # type: ignore[arg-type]
        on_event,
        clock=lambda: datetime.now(UTC).replace(tzinfo=None),
    )


@pytest.mark.parametrize("profile", sorted(EXPECTED))
async def test_each_profile_lands_valid_fhir_in_the_checked_in_patients_chart(
    store: Store, profile: str
) -> None:
    registry, hub, patient_id = await _station_with(store, profile)
    device = await registry.device("dev-1")
    await hub.load(device)
    peripheral = device_profiles.simulated_peripheral(
        profile, rng=random.Random(7), now=lambda: datetime.now(UTC)
    )
    link = _link(hub, device, peripheral)
    await link.connect()
    await link.reading()
    observations = await store.newest(f"Patient/{patient_id}", "Observation", NURSE)
    codes = {o["code"]["coding"][0]["code"] for o in observations}
    assert codes == EXPECTED[profile]
    for observation in observations:
        fhir.validate(observation)
        assert observation["device"]["reference"].startswith("Device/")
        assert {"system": vitals.TIME_SOURCE_SYSTEM, "code": "device"} in observation["meta"]["tag"]
    assert link.protocol_errors == 0
    assert await registry.held() == []


async def test_glucose_meter_reconnects_download_only_new_records(store: Store) -> None:
    registry, hub, patient_id = await _station_with(store, "glucose")
    device = await registry.device("dev-1")
    await hub.load(device)
    meter = SimulatedGlucoseMeter(rng=random.Random(3), now=lambda: datetime.now(UTC))
    link = _link(hub, device, meter)
    await link.connect()  # nothing stored yet: "no records found"
    for _ in range(4):
        await link.reading()  # each test: stored, then the meter is connected again
    observations = await store.newest(f"Patient/{patient_id}", "Observation", NURSE)
    assert len(observations) == 4
    assert (await registry.device("dev-1")).last_sequence == 4
    # A restarted devices process learns the last record from the registry, not from memory.
    fresh = DeviceHub(store, registry, UTC)
    await fresh.load(await registry.device("dev-1"))
    again = _link(fresh, await registry.device("dev-1"), meter)
    await again.connect()
    assert len(await store.newest(f"Patient/{patient_id}", "Observation", NURSE)) == 4
    values = Counter(o["valueQuantity"]["value"] for o in observations)
    assert sum(values.values()) == 4


async def test_control_solution_test_is_held_not_filed(store: Store) -> None:
    registry, hub, patient_id = await _station_with(store, "glucose")
    control = glucose.GlucoseMeasurement(
        sequence_number=9,
        base_time=datetime.now(UTC).replace(tzinfo=None, microsecond=0),
        time_offset=0,
        concentration=SFloatValue(110, -5),
        unit=glucose.GlucoseUnit.KG_PER_L,
        sample_type=glucose.SampleType.CONTROL_SOLUTION,
        sample_location=glucose.SampleLocation.CONTROL_SOLUTION,
    )
    outcome = await hub.on_event("dev-1", control, datetime.now(UTC), CaptureMethod.BLE)
    assert outcome is not None
    assert outcome.reason is not None
    assert "control-solution" in outcome.reason
    assert await store.newest(f"Patient/{patient_id}", "Observation", NURSE) == []
    assert len(await registry.held(HeldState.PENDING)) == 1
    # The record number still moves on: the meter is not asked for it again.
    assert (await registry.device("dev-1")).last_sequence == 9
    real = replace(
        control,
        sequence_number=10,
        sample_type=glucose.SampleType.CAPILLARY_WHOLE_BLOOD,
        sample_location=glucose.SampleLocation.FINGER,
    )
    await hub.on_event("dev-1", real, datetime.now(UTC), CaptureMethod.BLE)
    [stored] = await store.newest(f"Patient/{patient_id}", "Observation", NURSE)
    assert stored["valueQuantity"] == {
        "value": 110,
        "unit": "mg/dL",
        "system": "http://unitsofmeasure.org",
        "code": "mg/dL",
    }
