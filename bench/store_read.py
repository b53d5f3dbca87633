"""Reading a patient's newest 100 Observations (decrypted) with 1,000,000 in the store.

Ours: ``Store.newest(patient, "Observation", limit=100)`` through the async API — the
indexed query, AES-GCM decryption and JSON parsing of 100 rows, and the audit record the
read appends (a durable write). Baseline, same run and same file: the raw indexed query
alone (no decryption, no audit) through plain ``sqlite3``. p50/p95 over ``--reads`` reads
spread over 50 patients.

    python bench/store_read.py [--quick] [--rows N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from appliance.keys import generate_kek_file
from appliance.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import factories

PATIENTS = 50


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def fill(store: Store, rows: int) -> list[str]:
    patients = await store.create(
        [factories.patient(mrn=f"B{i:04d}") for i in range(PATIENTS)], "user:bench"
    )
    refs = [f"Patient/{p.logical_id}" for p in patients]
    rng = random.Random(7)
    made = 0
    last_report = time.monotonic()
    while made < rows:
        batch = []
        for _ in range(1000):
            day = rng.randrange(1, 28)
            batch.append(
                factories.bp_observation(
                    refs[rng.randrange(PATIENTS)],
                    systolic=rng.randint(90, 180),
                    effective=f"2026-{rng.randrange(1, 12):02d}-{day:02d}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:00+00:00",
                )
            )
        await store.create(batch, "service:devices", validate=False)
        made += len(batch)
        if time.monotonic() - last_report > 10:
            sys.stderr.write(f"  filled {made}/{rows}\n")
            last_report = time.monotonic()
    return refs


async def run(rows: int, reads: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-read-") as tmp:
        folder = Path(tmp)
        kek = folder / "kek"
        generate_kek_file(kek)
        db_path = folder / "store.db"
        store = await Store.open(db_path, kek)
        sys.stderr.write(f"filling {rows} Observations for {PATIENTS} patients ...\n")
        refs = await fill(store, rows)
        rng = random.Random(3)
        ours = []
        for _ in range(reads):
            ref = refs[rng.randrange(PATIENTS)]
            start = time.perf_counter()
            got = await store.newest(ref, "Observation", "user:bench", limit=100)
            ours.append((time.perf_counter() - start) * 1000)
            assert len(got) == 100
        await store.close()
        raw = sqlite3.connect(db_path)

        store2 = await Store.open(db_path, kek)
        keys = [store2.keyring.patient_key(r) for r in refs]
        await store2.close()
        base = []
        for _ in range(reads):
            key = keys[rng.randrange(PATIENTS)]
            start = time.perf_counter()
            rows_ = raw.execute(
                "SELECT id, logical_id, type, key_version, body FROM resources WHERE patient_key = ? "
                "AND type = 'Observation' ORDER BY effective DESC LIMIT 100",
                (key,),
            ).fetchall()
            base.append((time.perf_counter() - start) * 1000)
            assert len(rows_) == 100
        raw.close()
    p95, b95 = pct(ours, 0.95), pct(base, 0.95)
    for row in (
        {
            "figure": "newest_100_p95_ms",
            "value": round(p95, 3),
            "unit": "ms",
            "baseline": round(b95, 3),
            "ratio": round(p95 / b95, 2),
            "goal": "value < 10 ms",
            "met": p95 < 10,
            "rows": rows,
        },
        {
            "figure": "newest_100_p50_ms",
            "value": round(statistics.median(ours), 3),
            "unit": "ms",
            "baseline": round(statistics.median(base), 3),
            "ratio": round(statistics.median(ours) / statistics.median(base), 2),
        },
    ):
        print(json.dumps(row), flush=True)
    sys.stderr.write(
        f"newest 100 of {rows}: p50 {statistics.median(ours):.2f} ms, p95 {p95:.2f} ms "
        f"(raw query p95 {b95:.2f} ms)\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100,000 rows instead of 1,000,000")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--reads", type=int, default=300)
    args = parser.parse_args()
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    asyncio.run(run(rows, args.reads))


if __name__ == "__main__":
    main()
