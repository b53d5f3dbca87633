"""Device drivers: Nonin DF7 decode rate on one core, and reading-to-stored latency.

1. **DF7 frames decoded per second** by ``NoninDf7Decoder`` on one core, fed the way a UART
   read loop would (4 KiB and 64-byte chunks), against a baseline measured in the same run:
   a bare Python loop that only verifies every frame's checksum (the least any pure-Python
   decoder must do). A real oximeter sends 75 frames/s, so ``rate / 75`` is the number of
   oximeters one core could decode.
2. **Reading-to-stored latency**: from a cuff's 0x2A35 value reaching the session to the
   Observations committed in the store (decode → routing → FHIR → validation → encrypted
   write with outbox and audit), p50/p95 over many readings, against the store's own
   ``create`` of the same pre-built Observations (validation included) in the same run.
   Goal: p95 < 200 ms.

    python bench/drivers.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.device_registry import DeviceRegistry, Setting, StationKind, Transport
from appliance.keys import generate_kek_file
from appliance.store import Store
from drivers import blood_pressure, nonin
from drivers.simulated import SimulatedBloodPressureCuff
from services import readings, routing
from services.device_hub import DeviceHub
from services.vitals import Capture, CaptureMethod
from tests import factories

FRAMES_PER_SECOND = 75  # a Nonin OEM III module's DF7 output
ACTOR = "service:devices"


def emit(figure: str, value: float, unit: str, **extra: Any) -> None:
    row: dict[str, Any] = {"figure": figure, "value": round(value, 3), "unit": unit, **extra}
    print(json.dumps(row), flush=True)


def df7_stream(packets: int) -> bytes:
    rng = random.Random(1)
    return b"".join(
        nonin.encode_df7_packet(rng.randint(85, 100), rng.randint(40, 180)) for _ in range(packets)
    )


def decode_rate(data: bytes, chunk: int) -> float:
    decoder = nonin.NoninDf7Decoder()
    start = time.perf_counter()
    packets = 0
    for offset in range(0, len(data), chunk):
        packets += len(decoder.feed(data[offset : offset + chunk]))
    elapsed = time.perf_counter() - start
    assert packets == len(data) // 125, "every packet must decode"
    return (len(data) // 5) / elapsed


def checksum_floor_rate(data: bytes) -> float:
    start = time.perf_counter()
    good = 0
    for i in range(0, len(data), 5):
        good += (data[i] + data[i + 1] + data[i + 2] + data[i + 3]) & 0xFF == data[i + 4]
    elapsed = time.perf_counter() - start
    assert good == len(data) // 5
    return (len(data) // 5) / elapsed


async def latency(folder: Path, readings_count: int) -> tuple[list[float], list[float]]:
    kek = folder / "kek"
    generate_kek_file(kek)
    store = await Store.open(folder / "bench.db", kek)
    registry = DeviceRegistry(store)
    await registry.add_station("kiosk-1", "Kiosk 1", StationKind.KIOSK, ACTOR)
    await registry.register_device(
        "cuff-1",
        name="Kiosk cuff",
        transport=Transport.BLE,
        profile="blood_pressure",
        address=None,
        setting=Setting.CLINIC,
        actor=ACTOR,
    )
    await registry.assign_device("cuff-1", ACTOR, station_id="kiosk-1")
    [patient] = await store.create([factories.patient()], "user:bench")
    await registry.check_in("kiosk-1", patient.logical_id, "user:bench")
    hub = DeviceHub(store, registry, UTC)
    session = blood_pressure.BloodPressureSession()
    rng = random.Random(2)
    ours: list[float] = []
    base: list[float] = []
    for _ in range(readings_count):
        now = datetime.now(UTC)
        cuff = SimulatedBloodPressureCuff(rng=rng, now=lambda now=now: now.replace(tzinfo=None))  # type: ignore[misc]
        payload = cuff.next_payload()
        start = time.perf_counter()
        for event in session.on_value(blood_pressure.MEASUREMENT, payload):
            outcome = await hub.on_event("cuff-1", event, datetime.now(UTC), CaptureMethod.BLE)
            if outcome is None or not outcome.stored:
                raise SystemExit("bench: a reading was not filed into the chart")
        ours.append((time.perf_counter() - start) * 1000)
        # Baseline: the store writing the same Observations, already built.
        event = blood_pressure.parse_measurement(payload)
        capture = Capture(
            Setting.CLINIC,
            CaptureMethod.BLE,
            routing.reading_time(event.timestamp, datetime.now(UTC), UTC),
            "Kiosk cuff",
        )
        built = readings.observations(event, f"Patient/{patient.logical_id}", capture)
        start = time.perf_counter()
        await store.create(built, ACTOR)
        base.append((time.perf_counter() - start) * 1000)
    await store.close()
    return ours, base


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    args = parser.parse_args()
    rounds = 3 if args.quick else 5
    data = df7_stream(600 if args.quick else 3000)  # 125 bytes = 25 frames per packet
    big, small, floor = [], [], []
    for _ in range(rounds):
        big.append(decode_rate(data, 4096))
        small.append(decode_rate(data, 64))
        floor.append(checksum_floor_rate(data))
    rate = statistics.median(big)
    baseline = statistics.median(floor)
    emit(
        "nonin_df7_frames_per_s_4k_reads",
        rate,
        "frames/s",
        baseline=round(baseline, 1),
        ratio=round(rate / baseline, 3),
        devices_per_core=int(rate // FRAMES_PER_SECOND),
        goal=f">= {FRAMES_PER_SECOND} frames/s (one oximeter)",
        met=rate >= FRAMES_PER_SECOND,
    )
    emit(
        "nonin_df7_frames_per_s_64b_reads",
        statistics.median(small),
        "frames/s",
        devices_per_core=int(statistics.median(small) // FRAMES_PER_SECOND),
    )
    with tempfile.TemporaryDirectory() as folder:
        ours, base = asyncio.run(latency(Path(folder), 100 if args.quick else 400))
    emit(
        "reading_to_stored_p95",
        p95(ours),
        "ms",
        p50=round(statistics.median(ours), 3),
        baseline=round(p95(base), 3),
        ratio=round(p95(ours) / p95(base), 3),
        goal="p95 < 200 ms",
        met=p95(ours) < 200,
    )


if __name__ == "__main__":
    main()
