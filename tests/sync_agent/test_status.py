"""The sync figures' cost: /healthz and /metrics answer anyone, on the web process's one
database thread, over an outbox whose delivered rows are never pruned."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from appliance import db
from appliance.store import Store
from sync_agent.status import SyncStatus, read_status
from tests import factories


async def test_the_figures_for_the_web_never_scan_the_outbox(store: Store, db_path: Path) -> None:
    [pat] = await store.create([factories.patient()], "user:nurse1")
    await store.create(
        # What a box holds after a while: thousands delivered (the planner chooses by size).
        [factories.bp_observation(f"Patient/{pat.logical_id}") for _ in range(3000)],
        "service:devices",
    )
    raw = sqlite3.connect(db_path, isolation_level=None)
    raw.execute("UPDATE outbox SET state = 'delivered', delivered_at = '2026-11-29T00:00:00Z'")
    raw.execute("UPDATE outbox SET state = 'pending' WHERE id % 3 = 0")
    raw.execute("ANALYZE")
    raw.close()
    asked: list[str] = []

    def read(conn: sqlite3.Connection, all_states: bool) -> SyncStatus:
        conn.set_trace_callback(asked.append)
        try:
            return read_status(conn, datetime.now(UTC), all_states=all_states)
        finally:
            conn.set_trace_callback(None)

    found = await db.run_sync(store.connection, read, False)
    assert sum(lane.waiting for lane in found.lanes) == 1000
    assert found.counts == ()

    def plans(conn: sqlite3.Connection) -> list[str]:
        steps = []
        for sql in asked:
            if "outbox" in sql and sql.lstrip().upper().startswith("SELECT"):
                steps += [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
        return steps

    steps = await db.run_sync(store.connection, plans)
    # Before: "SCAN outbox" for the count of every lane and state, on every scrape; then the
    # dead letters' list walked the whole outbox by id once it held thousands of rows. A scan
    # is allowed only through the partial indexes, which hold the waiting and dead rows alone
    # (the outbox is aliased "o" in some statements).
    small = ("outbox_pending", "outbox_waiting", "outbox_dead")
    scans = [
        step
        for step in steps
        if step.startswith("SCAN ")
        and step.split()[1] in ("outbox", "o")
        and not any(f"INDEX {index}" in step for index in small)
    ]
    assert scans == [], steps
    asked.clear()
    full = await db.run_sync(store.connection, read, True)  # the CLI's JSON: every state
    assert sum(count for _, state, count in full.counts if state == "delivered") == 2001
