"""Acknowledged encrypted Observation writes per second, against plain sqlite3 in the same run.

Ours: ``Store.create`` (AES-256-GCM, index columns, outbox row, audit record) through the
async API, returning only after COMMIT. Baseline: plain ``sqlite3`` inserting one blob of
the same size per reading, same durability settings (WAL, synchronous=FULL), same
transaction sizes. Both run alternately ``--rounds`` times; medians are reported.

FHIR validation (``fhir.resources.R4B``) is reported as its own figure (µs per resource),
and the store's rate with validation on as a further figure.

    python bench/store_ingest.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance import fhir
from appliance.keys import generate_kek_file
from appliance.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import factories


def emit(
    figure: str,
    value: float,
    unit: str,
    baseline: float | None = None,
    goal: str | None = None,
    met: bool | None = None,
) -> dict[str, Any]:
    row: dict[str, Any] = {"figure": figure, "value": round(value, 2), "unit": unit}
    if baseline is not None:
        row["baseline"] = round(baseline, 2)
        row["ratio"] = round(value / baseline, 3)
    if goal is not None:
        row["goal"] = goal
        row["met"] = met
    print(json.dumps(row), flush=True)
    return row


def plain_rate(folder: Path, blob_size: int, total: int, per_txn: int) -> float:
    path = folder / f"plain-{secrets.token_hex(4)}.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "secure_delete=ON", "temp_store=MEMORY"):
        conn.execute(f"PRAGMA {pragma}")
    conn.execute("CREATE TABLE readings (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    blob = secrets.token_bytes(blob_size)
    start = time.perf_counter()
    for _ in range(total // per_txn):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO readings (body) VALUES (?)", [(blob,)] * per_txn)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return total / elapsed


async def store_rate(
    folder: Path, total: int, per_txn: int, *, validate: bool
) -> tuple[float, int]:
    kek = folder / f"kek-{secrets.token_hex(4)}"
    generate_kek_file(kek)
    store = await Store.open(folder / f"store-{secrets.token_hex(4)}.db", kek)
    [pat] = await store.create([factories.patient()], "user:bench")
    ref = f"Patient/{pat.logical_id}"
    batch = [factories.bp_observation(ref, systolic=120 + i % 40) for i in range(per_txn)]
    start = time.perf_counter()
    for _ in range(total // per_txn):
        await store.create(batch, "service:devices", validate=validate)
    elapsed = time.perf_counter() - start
    size = await store.connection.execute(
        "SELECT avg(length(body)) FROM resources WHERE type = 'Observation'"
    )
    row = await size.fetchone()
    await store.close()
    return total / elapsed, int(row[0]) if row else 0


def validation_us(samples: int) -> float:
    obs = factories.bp_observation("Patient/0190a0b4-0000-7000-8000-000000000000")
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        fhir.validate(obs)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    single_n, batch_n = (100, 5_000) if args.quick else (300, 20_000)
    results: dict[str, list[float]] = {
        k: []
        for k in (
            "plain_single",
            "store_single",
            "plain_batch",
            "store_batch",
            "store_batch_validated",
        )
    }
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        folder = Path(tmp)
        _, blob_size = asyncio.run(store_rate(folder, 10, 10, validate=False))
        for _ in range(rounds):
            results["plain_single"].append(plain_rate(folder, blob_size, single_n, 1))
            results["store_single"].append(
                asyncio.run(store_rate(folder, single_n, 1, validate=False))[0]
            )
            results["plain_batch"].append(plain_rate(folder, blob_size, batch_n, 100))
            results["store_batch"].append(
                asyncio.run(store_rate(folder, batch_n, 100, validate=False))[0]
            )
            results["store_batch_validated"].append(
                asyncio.run(store_rate(folder, batch_n // 10, 100, validate=True))[0]
            )
    med = {k: statistics.median(v) for k, v in results.items()}
    rows = [
        emit(
            "store_ingest_single_per_s",
            med["store_single"],
            "writes/s",
            med["plain_single"],
            "ratio >= 0.5",
            med["store_single"] / med["plain_single"] >= 0.5,
        ),
        emit(
            "store_ingest_batched_per_s",
            med["store_batch"],
            "writes/s",
            med["plain_batch"],
            "ratio >= 0.5",
            med["store_batch"] / med["plain_batch"] >= 0.5,
        ),
        emit(
            "store_ingest_batched_validated_per_s",
            med["store_batch_validated"],
            "writes/s",
            med["plain_batch"],
        ),
        emit("fhir_validation_us_per_resource", validation_us(300 if args.quick else 2000), "us"),
    ]
    sys.stderr.write(f"\nstore ingest (medians of {rounds} rounds, blob {blob_size} B)\n")
    for row in rows:
        sys.stderr.write(
            f"  {row['figure']:<40} {row['value']:>10} {row['unit']:<9} baseline {row.get('baseline', '-')!s:>10} ratio {row.get('ratio', '-')}\n"
        )


if __name__ == "__main__":
    main()
