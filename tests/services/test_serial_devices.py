"""Serial devices end to end: bytes on a real pseudo-terminal → pyserial → decoder → the hub →
the checked-in patient's chart; and every serial protocol through its simulated device."""

from __future__ import annotations

import asyncio
import os
import random
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance import fhir
from appliance.config import Config, demo_config
from appliance.device_registry import DeviceRegistry, Setting, StationKind, Transport
from appliance.store import Store
from drivers import nonin
from drivers.line_protocol import from_mapping
from drivers.serial_port import SerialSource
from services import device_profiles, gatt_observations, serial_observations, vitals
from services.device_hub import DeviceHub
from services.simulated_link import SimulatedSerialLink
from services.vitals import CaptureMethod
from tests import factories

NURSE = "user:nurse"
EXPECTED = {
    "nonin-df7": {gatt_observations.SPO2, vitals.HEART_RATE},
    "nonin-ascii": {gatt_observations.SPO2, vitals.HEART_RATE},
    "tanita": {
        gatt_observations.BODY_WEIGHT,
        gatt_observations.BODY_HEIGHT,
        gatt_observations.BMI,
        serial_observations.BODY_FAT,
    },
}
THERMO_CUFF = """
[[devices.line_protocol]]
name = "csv-cuff"
start = "\\u0002"
delimiter = "\\u0003"
pattern = '(?P<sys>\\d{2,3}),(?P<dia>\\d{2,3}),(?P<pulse>\\d{2,3})'
fields.sys = { loinc = "8480-6", unit = "mm[Hg]", display = "Systolic blood pressure" }
fields.dia = { loinc = "8462-4", unit = "mm[Hg]", display = "Diastolic blood pressure" }
fields.pulse = { loinc = "8867-4", unit = "/min", display = "Heart rate" }
"""


async def _exam_room(
    store: Store, profile: str, transport: Transport, address: str | None = None
) -> tuple[DeviceRegistry, DeviceHub, str]:
    registry = DeviceRegistry(store)
    await registry.add_station("exam-1", "Exam room 1", StationKind.EXAM_ROOM, NURSE)
    await registry.register_device(
        "ser-1",
        name=f"{profile} device",
        transport=transport,
        profile=profile,
        address=address,
        setting=Setting.CLINIC,
        actor=NURSE,
    )
    await registry.assign_device("ser-1", NURSE, station_id="exam-1")
    [patient] = await store.create([factories.patient()], NURSE)
    await registry.check_in("exam-1", patient.logical_id, NURSE)
    return registry, DeviceHub(store, registry, UTC), patient.logical_id


def _filer(hub: DeviceHub, method: CaptureMethod):  # type: ignore[no-untyped-def]
    async def on_event(event: object) -> None:
        await hub.on_event("ser-1", event, datetime.now(UTC), method)

    return on_event


@pytest.mark.parametrize("profile", sorted(EXPECTED))
async def test_each_serial_protocol_lands_valid_fhir_in_the_chart(
    store: Store, profile: str
) -> None:
    _, hub, patient_id = await _exam_room(store, profile, Transport.SIMULATED)
    device, decoder = device_profiles.simulated_serial(
        profile, rng=random.Random(4), now=lambda: datetime.now(UTC)
    )
    link = SimulatedSerialLink(
        device, decoder, _filer(hub, CaptureMethod.SIMULATED), rng=random.Random(5)
    )
    await link.reading()
    await link.reading()  # a streaming oximeter's second value within the minute is not filed
    observations = await store.newest(f"Patient/{patient_id}", "Observation", NURSE)
    assert {o["code"]["coding"][0]["code"] for o in observations} == EXPECTED[profile]
    assert len(observations) == len(EXPECTED[profile]) * (2 if profile == "tanita" else 1)
    for observation in observations:
        fhir.validate(observation)
        assert {"system": vitals.TIME_SOURCE_SYSTEM, "code": "received"} in observation["meta"][
            "tag"
        ]


def test_line_protocol_from_site_config_builds_a_bp_panel_and_heart_rate() -> None:
    spec = from_mapping(tomllib.loads(THERMO_CUFF)["devices"]["line_protocol"][0])
    from drivers.line_protocol import LineDecoder
    from services import readings, routing

    [reading] = LineDecoder(spec).feed(b"\x02128,82,71\x03")
    capture = vitals.Capture(
        Setting.CLINIC,
        CaptureMethod.SERIAL,
        routing.reading_time(None, datetime.now(UTC), UTC),
        "csv cuff",
    )
    panel, hr = readings.observations(reading, "Patient/p1", capture)
    assert panel["code"]["coding"][0]["code"] == vitals.BP_PANEL
    assert [c["valueQuantity"]["value"] for c in panel["component"]] == [128, 82]
    assert hr["valueQuantity"]["value"] == 71
    fhir.validate(panel)
    fhir.validate(hr)


def test_serial_profile_needs_a_declared_line_protocol(tmp_path: Path) -> None:
    config: Config = demo_config(tmp_path)
    with pytest.raises(device_profiles.UnknownProfileError, match="not a serial profile"):
        device_profiles.check_profile("line:nope", Transport.SERIAL, config)


async def test_nonin_on_a_real_pty_lands_in_the_checked_in_patients_chart(
    store: Store, tmp_path: Path
) -> None:
    master, slave = os.openpty()
    link = tmp_path / "ttyUSB0"
    link.symlink_to(os.ttyname(slave))
    registry, hub, patient_id = await _exam_room(
        store, "nonin-df7", Transport.SERIAL, f"{link}@9600"
    )
    device = await registry.device("ser-1")
    port, baud, factory = device_profiles.serial_port(device, demo_config(tmp_path))
    assert (port, baud) == (str(link), 9600)
    filed = asyncio.Event()

    async def on_event(event: object) -> None:
        outcome = await hub.on_event("ser-1", event, datetime.now(UTC), CaptureMethod.SERIAL)
        if outcome is not None:
            filed.set()

    stop = asyncio.Event()
    source = SerialSource(port, baud, factory, on_event, rng=random.Random(1))
    task = asyncio.create_task(source.run(stop))
    try:
        for _ in range(200):  # pyserial flushes the input when it opens: wait for the open
            if source.status.connected:
                break
            await asyncio.sleep(0.02)
        # Garbage first, then three packets a second's worth: the decoder resynchronises.
        os.write(master, b"\x00\x17garbage" + nonin.encode_df7_packet(97, 72) * 3)
        await asyncio.wait_for(filed.wait(), 10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        os.close(master)
        os.close(slave)
    spo2, hr = sorted(
        await store.newest(f"Patient/{patient_id}", "Observation", NURSE),
        key=lambda o: o["code"]["coding"][0]["code"],
    )
    assert spo2["valueQuantity"]["value"] == 97
    assert hr["valueQuantity"]["value"] == 72
    assert {"system": vitals.CAPTURE_METHOD_SYSTEM, "code": "serial"} in spo2["meta"]["tag"]
