"""The devices process: device drivers turning readings into Observations in the store.

For the walking skeleton this runs the simulated blood-pressure cuff (``devices.simulated``
in the site config): its bytes go through the real 0x2A35 parser, then the FHIR builder,
then one store transaction per reading (Observation + outbox row + one audit record for the
batch). The Bluetooth and serial transports arrive with the device-driver issue and plug in
at :func:`ingest_payload`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from appliance import runtime, sdnotify
from appliance.errors import ApplianceError
from appliance.runtime import ProcessContext
from appliance.store import StoredResource
from drivers.blood_pressure import parse_measurement
from drivers.errors import ProtocolError
from drivers.simulated import SimulatedBloodPressureCuff
from services import demo, vitals

logger = logging.getLogger(__name__)

ACTOR = "service:devices"
SIMULATED_CUFF = "Simulated blood-pressure cuff (demo)"


async def ensure_demo_patients(ctx: ProcessContext) -> list[str]:
    """The demo's patient references, creating the synthetic patients on first start."""
    patients = await ctx.store.patients(ACTOR)
    if not patients:
        created = await ctx.store.create(demo.synthetic_patients(), ACTOR)
        patients = [item.resource for item in created]
        logger.info("created %d synthetic demo patients", len(created))
    return [f"Patient/{p['id']}" for p in patients]


async def ingest_payload(
    ctx: ProcessContext, payload: bytes, patient_ref: str, *, device: str, received: datetime
) -> list[StoredResource]:
    """Parse one 0x2A35 value and store its Observations; malformed bytes are logged once."""
    try:
        measurement = parse_measurement(payload)
    except ProtocolError as exc:
        logger.warning("discarded a malformed blood-pressure value from %s: %s", device, exc)
        return []
    observations = vitals.blood_pressure_observations(
        measurement,
        patient_ref,
        received=received,
        site_zone=ZoneInfo(ctx.config.site.timezone),
        device_display=device,
    )
    return await ctx.store.create(observations, ACTOR)


async def run_simulated(ctx: ProcessContext, *, rng: random.Random | None = None) -> None:
    """Take a simulated reading every ``devices.simulated_interval_s`` until stopping."""
    rng = rng or random.Random()  # noqa: S311 - simulated readings, not security
    zone = ZoneInfo(ctx.config.site.timezone)
    cuff = SimulatedBloodPressureCuff(rng=rng, now=lambda: datetime.now(zone).replace(tzinfo=None))
    patients = await ensure_demo_patients(ctx)
    readings = 0
    sdnotify.ready()
    while not ctx.stopping.is_set():
        patient = patients[readings % len(patients)]
        try:
            stored = await ingest_payload(
                ctx, cuff.next_payload(), patient, device=SIMULATED_CUFF, received=datetime.now(UTC)
            )
            readings += bool(stored)
        except ApplianceError as exc:
            # e.g. a full disk: nothing was acknowledged, the cuff's next reading retries.
            logger.error("could not store a reading: %s", exc)
        ctx.set_status(readings=readings, simulated=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.stopping.wait(), ctx.config.devices.simulated_interval_s)


async def main(ctx: ProcessContext) -> None:
    """Entry of the devices process."""
    if ctx.config.devices.simulated:
        await run_simulated(ctx)
        return
    logger.info("no simulated devices configured; Bluetooth and serial drivers are not built yet")
    sdnotify.ready()
    await ctx.stopping.wait()


if __name__ == "__main__":
    sys.exit(runtime.main_entry("devices", main))
