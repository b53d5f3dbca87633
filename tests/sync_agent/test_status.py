"""The sync figures' cost: /healthz and /metrics answer anyone, on the web process's one
database thread, over an outbox whose delivered rows are never pruned."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance import db
from appliance.store import Store
from services.claims.lifecycle import Lifecycle
from services.claims.model import ClaimStatus
from services.claims.service import ClaimsService
from sync_agent.status import read_status
from sync_agent.status_figures import SyncStatus
from tests import factories
from tests.services.test_claims import encounter, make_mbi, patient, site_doc


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
    small = ("outbox_pending", "outbox_waiting", "outbox_dead", "outbox_failing")
    scans = [
        step
        for step in steps
        if step.startswith("SCAN ")
        and step.split()[1] in ("outbox", "o")
        and not any(f"INDEX {index}" in step for index in small)
    ]
    assert scans == [], steps
    # The items the upstream keeps failing: through their own index, which holds only the
    # waiting rows that carry an error (before it, every waiting row was read on each scrape).
    [failing_sql] = [sql for sql in asked if "last_error IS NOT NULL" in sql]
    failing_plan = await db.run_sync(
        store.connection,
        lambda conn: [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {failing_sql}")],
    )
    assert any("INDEX outbox_failing" in step for step in failing_plan), failing_plan
    asked.clear()
    full = await db.run_sync(store.connection, read, True)  # the CLI's JSON: every state
    assert sum(count for _, state, count in full.counts if state == "delivered") == 2001


async def claims_for_the_payer(
    store: Store, *, meanwhile: Callable[[], None] = lambda: None
) -> None:
    """Three claims made ready: one sent without a clear answer (in review), two still ready
    after a submission that sent nothing (the payer down), ``meanwhile()`` before it."""
    service = ClaimsService(store, site_doc(auto_ready=False))
    life = Lifecycle(service, store)
    rng = random.Random(5)
    ids = []
    for day in ("02", "03", "04"):
        [pat] = await store.create([patient(make_mbi(rng))], "user:test")
        [enc] = await store.create(
            [encounter(pat.logical_id, start=f"2026-03-{day}T10:00:00-06:00")], "user:test"
        )
        decided = await service.on_visit_finished(enc.resource)
        assert decided.claim_id is not None
        ids.append(decided.claim_id)
    await service.transition(ids[0], ClaimStatus.READY, "user:biller")
    batch = await life.take_batch("x12")
    assert batch is not None
    await life.ambiguous(batch.id, "no answer: ReadTimeout")
    for claim_id in ids[1:]:
        await service.transition(claim_id, ClaimStatus.READY, "user:biller")
    meanwhile()
    batch = await life.take_batch("x12")
    assert batch is not None
    await life.not_sent(batch.id, "no connection: ConnectError")


async def test_claims_and_the_audit_trail_show_what_waits_for_them_not_an_empty_lane(
    db_path: Path, kek_path: Path
) -> None:
    start = datetime.now(UTC)
    moment = [start]
    store = await Store.open(db_path, kek_path, clock=lambda: moment[0])
    try:

        def a_day_later() -> None:
            moment[0] = start + timedelta(days=1)

        await claims_for_the_payer(store, meanwhile=a_day_later)
        later = start + timedelta(days=2)
        found = await db.run_sync(store.connection, read_status, later)
    finally:
        await store.close()
    # Before: the outbox's "claims" and "audit" lanes, always empty, were all there was.
    assert {lane.name: lane.waiting for lane in found.lanes}["claims"] == 0
    assert [lane.name for lane in found.outbox_lanes] == ["alerts", "clinical"]
    assert (found.claims.ready, found.claims.in_review) == (2, 1)
    # Ready for two days: the attempt a day later that sent nothing does not restart it.
    assert found.claims.oldest_ready_age_s == pytest.approx(2 * 86400, abs=5)
    assert found.export.lag > 0
    assert found.export_oldest_age_s == pytest.approx(2 * 86400, abs=60)
