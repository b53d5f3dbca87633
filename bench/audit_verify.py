"""Verifying the audit chain (``appliance audit verify``), and appending to it.

Fills a temporary SQLite file (opened as the appliance opens it) with N audit records
through ``audit.append`` in transactions of 1,000 — the append figure — with a signed
checkpoint every 10,000 records, then times ``audit.verify`` over the whole trail (median
of ``--runs``). Baseline, same run, same file: a plain loop that reads the same rows with
the same query and chunked cursor and computes SHA-256 over each row's concatenated bytes
(text left undecoded) — the floor any chain check pays. The goal, 50,000 records/s on a
2-core box, keeps ``audit verify`` of a year of a busy clinic's trail under a minute.

    python bench/audit_verify.py [--quick] [--records N] [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance import audit, db
from appliance.audit import AuditAction, AuditEvent

BATCH = 1_000
CHECKPOINT_EVERY = 10_000
GOAL_RECORDS_PER_S = 50_000
PATIENTS = 200
FETCH_CHUNK = 10_000  # as audit.verify fetches
SELECT_ROWS = (
    "SELECT id, ts, actor, action, outcome, patient_key, entity, detail, prev_hash, hash "
    "FROM audit ORDER BY id"
)


def events(start: int, patient_keys: list[bytes]) -> list[AuditEvent]:
    """A device batch's worth of realistic records (pseudonymous keys, uuid entities)."""
    return [
        AuditEvent(
            "service:devices" if n % 4 else f"user:nurse{n % 7}",
            AuditAction.CREATE if n % 4 else AuditAction.READ,
            patient_key=patient_keys[n % PATIENTS],
            entity=f"Observation/{uuid.UUID(int=n)}",
            detail=None if n % 10 else "blood pressure",
        )
        for n in range(start, start + BATCH)
    ]


def fill(conn: sqlite3.Connection, records: int, signer: Ed25519PrivateKey) -> float:
    """Append ``records`` in 1,000-record transactions; returns the seconds spent appending."""
    patient_keys = [hashlib.sha256(f"patient {p}".encode()).digest() for p in range(PATIENTS)]
    now = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
    appending = 0.0
    for start in range(0, records, BATCH):
        batch = events(start, patient_keys)
        began = time.perf_counter()
        with db.transaction_sync(conn):
            audit.append(conn, batch, now=now + timedelta(seconds=start))
        appending += time.perf_counter() - began
        if (start + BATCH) % CHECKPOINT_EVERY == 0:
            audit.checkpoint(conn, signer, now=now + timedelta(seconds=start))
    audit.checkpoint(conn, signer, now=now + timedelta(seconds=records))
    return appending


def floor_pass(conn: sqlite3.Connection) -> int:
    """Read every row with the same query and chunking, SHA-256 of its bytes, nothing else."""
    saved = conn.text_factory
    conn.text_factory = bytes  # no UTF-8 decoding: the cheapest way to get the bytes
    try:
        sha256 = hashlib.sha256
        count = 0
        cursor = conn.execute(SELECT_ROWS)
        while chunk := cursor.fetchmany(FETCH_CHUNK):
            for _, ts, actor, action, outcome, key, entity, detail, link, digest in chunk:
                fields = (ts, actor, action, outcome, key or b"", entity or b"", detail or b"")
                sha256(b"".join((*fields, link, digest))).digest()
            count += len(chunk)
        return count
    finally:
        conn.text_factory = saved


def timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def figure(name: str, value: float, unit: str, **extra: Any) -> dict[str, Any]:
    return {"figure": name, "value": round(value, 1), "unit": unit, **extra}


def run(records: int, runs: int) -> list[dict[str, Any]]:
    signer = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        conn = db.connect_sync(Path(tmp) / "audit.db")
        with contextlib.closing(conn):
            sys.stderr.write(f"appending {records} audit records ...\n")
            append_s = fill(conn, records, signer)
            result = audit.verify(conn, signer.public_key())  # also warms the page cache
            if not (result.ok and result.records == records):
                raise SystemExit(f"verify failed on an untouched trail: {result}")
            ours, floor = [], []
            for _ in range(runs):  # interleaved, so drift in machine load hits both alike
                ours.append(timed(lambda: audit.verify(conn, signer.public_key())))
                floor.append(timed(lambda: floor_pass(conn)))
    verify_rate = records / statistics.median(ours)
    floor_rate = records / statistics.median(floor)
    return [
        figure(
            "audit_verify_records_per_s",
            verify_rate,
            "records/s",
            baseline=round(floor_rate, 1),
            ratio=round(verify_rate / floor_rate, 2),
            goal=f">= {GOAL_RECORDS_PER_S} records/s",
            met=verify_rate >= GOAL_RECORDS_PER_S,
            records=records,
            checkpoints=result.checkpoints,
        ),
        figure(
            "audit_append_records_per_s",
            records / append_s,
            "records/s",
            batch=BATCH,
            records=records,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 records instead of 200,000")
    parser.add_argument("--records", type=int, help="how many records (a multiple of 1,000)")
    parser.add_argument("--runs", type=int, default=3, help="verify runs; the median counts")
    args = parser.parse_args()
    records = args.records or (20_000 if args.quick else 200_000)
    if records <= 0 or records % BATCH:
        parser.error(f"--records must be a positive multiple of {BATCH}")
    rows = run(records, args.runs)
    for row in rows:
        print(json.dumps(row), flush=True)
    sys.stderr.write(f"{'figure':<30} {'value':>12} {'baseline':>12} {'ratio':>6}  goal\n")
    for row in rows:
        sys.stderr.write(
            f"{row['figure']:<30} {row['value']:>12,.0f} {row.get('baseline', '-'):>12} "
            f"{row.get('ratio', '-')!s:>6}  {row.get('goal', '-')} {row.get('met', '')}\n"
        )


if __name__ == "__main__":
    main()
