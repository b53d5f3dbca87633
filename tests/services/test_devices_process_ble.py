"""The devices process's runner end to end over Bluetooth without a radio: a registered cuff
(an emulated Bumble peripheral) → bleak → BleLink → the hub → the checked-in patient's chart."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from pathlib import Path

from appliance.config import demo_config
from appliance.device_registry import DeviceRegistry, Setting, StationKind, Transport
from appliance.runtime import ProcessContext
from appliance.store import Store
from drivers.blood_pressure import encode_measurement
from drivers.simulated import SimulatedBloodPressureCuff
from services.device_hub import DeviceHub
from services.devices import DeviceRunner
from tests import factories
from tests.drivers.ble_peripherals import blood_pressure_cuff
from tests.drivers.bumble_backend import VirtualRadio

NURSE = "user:nurse"
BP_CODE = "http://loinc.org|85354-9"


async def _until(check, seconds: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async def loop() -> None:  # the store is the bus: poll it
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    await asyncio.wait_for(loop(), seconds)


async def test_registered_cuff_reading_reaches_the_chart_through_the_devices_runner(
    store: Store, tmp_path: Path
) -> None:
    radio = VirtualRadio()
    cuff = blood_pressure_cuff(radio)
    await cuff.start()
    registry = DeviceRegistry(store)
    await registry.add_station("kiosk-1", "Kiosk 1", StationKind.KIOSK, NURSE)
    await registry.register_device(
        "kiosk1-cuff",
        name="Kiosk 1 cuff",
        transport=Transport.BLE,
        profile="blood_pressure",
        address=cuff.address,
        setting=Setting.CLINIC,
        actor=NURSE,
    )
    await registry.assign_device("kiosk1-cuff", NURSE, station_id="kiosk-1")
    [patient] = await store.create([factories.patient()], NURSE)
    await registry.check_in("kiosk-1", patient.logical_id, NURSE)

    ctx = ProcessContext(name="devices", config=demo_config(tmp_path), store=store)
    hub = DeviceHub(store, registry, UTC)
    runner = DeviceRunner(ctx, registry, hub, rng=random.Random(1), ble_backends=radio.backends())
    task = asyncio.create_task(runner.run())
    try:
        await cuff.wait_subscribed(0x2A35)
        now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
        reading = SimulatedBloodPressureCuff(rng=random.Random(9), now=lambda: now)
        await cuff.send(0x2A35, encode_measurement(reading.next_measurement()))
        ref = f"Patient/{patient.logical_id}"

        async def filed() -> bool:
            return bool(await store.newest(ref, "Observation", NURSE, code=BP_CODE))

        await _until(filed)
        assert runner.link_states["kiosk1-cuff"]["state"] == "connected"
    finally:
        ctx.stopping.set()
        await asyncio.wait_for(task, 10)
        await cuff.close()
        await radio.close()
    [bp] = await store.newest(ref, "Observation", NURSE, code=BP_CODE)
    assert {"system": "urn:telehealth-appliance:fhir:capture-method", "code": "ble"} in bp["meta"][
        "tag"
    ]
    device = await registry.device("kiosk1-cuff")
    assert (device.manufacturer, device.model, device.battery_percent) == (
        "Acme Medical",
        "BP-100",
        87,
    )
    assert device.fhir_device_id is not None
    fhir_device = await store.read("Device", device.fhir_device_id, NURSE)
    assert fhir_device["manufacturer"] == "Acme Medical"
    assert bp["device"]["reference"] == f"Device/{device.fhir_device_id}"
