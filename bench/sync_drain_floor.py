"""The least an outbox drain with the agent's guarantees costs, against the agent and a bare
client in the same run: where issue 5's ratio goal stands (docs/benchmarks.md, "Sync figures").

The floor is a drain with nothing but the per-item work delivery cannot do without, each step
the agent's own code: read the due rows in lane order and decrypt them
(``OutboxQueue._items``), map the references and cut the server-owned fields
(``_upstream_refs``, ``outgoing_body``), encode the batch Bundle, POST it (httpx), and record
every entry's outcome with its audit record in one ``synchronous=FULL`` transaction. It has
none of the agent's planning (dependencies pulled ahead, dead letters, per-item backoff,
bundle sizing), and it is pipelined one bundle ahead as ``Deliverer.drain`` is. The same
queue (``bench/sync_drain.py``'s fast upstream, 100 entries per bundle) is drained by the
agent, by the floor and by the bare client (the agent's recorded bundles), alternately.

Also the floor's CPU per item, step by step (``time.thread_time`` on the thread that runs
it; ``event_loop`` is httpx, the answers and the hand-offs), beside the bare client's, which
is httpx and reading the answer only.

And two lower floors, to see whether another way of recording exactly-once could reach the
goal (none of them is a design we could ship as it is):

* ``per_bundle``: the outcome recorded as one row per bundle (the first and last outbox id,
  the upstream ids in a blob) instead of one ``UPDATE`` per item, and the next bundle read
  past a watermark instead of by state: the cheapest record of "delivered" there is;
* ``least``: that, and each resource sent as decrypted, with no reference mapped and no
  server-owned field cut (wrong upstream: the bench's endpoint does not look). What is left
  is reading, decrypting, the Bundle, httpx and one row per bundle.

    python bench/sync_drain_floor.py [--quick] [--items N] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import sync_drain

from appliance import audit, db, fhir
from appliance.audit import AuditAction, AuditEvent
from appliance.store import Store
from sync_agent.outbox_bundle import entry_ref
from sync_agent.outbox_outcomes import ACTOR
from sync_agent.outbox_queue import _PENDING_SQL, OutboxQueue
from sync_agent.outbox_schedule import DUE_SQL, due_bounds, iso
from sync_agent.outgoing import outgoing_body
from sync_agent.upstream import FHIR_JSON, exchange, response_json

BUNDLE = 100
FLOORS = ("floor", "per_bundle", "least")
# The next bundle past a watermark, for the lower floors (their rows stay 'pending').
_PAST_MARK_SQL = _PENDING_SQL.replace(f"AND {DUE_SQL} ", "").replace(
    "AND o.id NOT IN (SELECT value FROM json_each(?)) ", "AND o.id > ? "
)
assert _PAST_MARK_SQL != _PENDING_SQL
_RECORD_SQL = (
    "UPDATE outbox SET state = 'delivered', upstream_ref = v.ref, delivered_at = ?, "
    "attempts = attempts + 1, last_error = NULL "
    "FROM (SELECT value ->> 0 AS id, value ->> 1 AS ref FROM json_each(?)) AS v "
    "WHERE outbox.id = v.id AND outbox.state = 'pending'"
)


async def floor_drain(
    db_path: Path, kek: Path, base_url: str, kind: str = "floor"
) -> tuple[float, dict[str, float]]:
    """Items/s of one floor drain (:data:`FLOORS`), and its CPU per item (µs) by step."""
    store = await Store.open(db_path, kek)
    conn = store.connection
    spent: dict[str, float] = collections.defaultdict(float)
    targets: dict[str, str | None] = {}
    mark = [0]

    def bundles_table(raw: Any) -> None:
        raw.execute(
            "CREATE TABLE IF NOT EXISTS bench_bundles_delivered "
            "(first INTEGER PRIMARY KEY, last INTEGER, at TEXT, refs BLOB)"
        )
        raw.execute("DELETE FROM bench_bundles_delivered")

    await db.run_sync(conn, bundles_table)

    def plan(raw: Any, busy: list[int], now: str) -> tuple[list[int], bytes] | None:
        started = time.thread_time()
        if kind == "floor":
            rows = raw.execute(
                _PENDING_SQL, (*due_bounds(now), orjson.dumps(busy).decode(), BUNDLE)
            ).fetchall()
        else:
            rows = raw.execute(_PAST_MARK_SQL, (mark[0], BUNDLE)).fetchall()
            mark[0] = rows[-1][0] if rows else mark[0]
        spent["select"] += time.thread_time() - started
        if not rows:
            return None
        started = time.thread_time()
        items = queue._items(raw, rows)
        spent["decrypt"] += time.thread_time() - started
        started = time.thread_time()
        refs = {item.outbox_id: item.local_refs() for item in items}
        wanted = {lid for found in refs.values() for _, lid in found} - targets.keys()
        if wanted:
            targets.update(queue._upstream_refs(raw, wanted))
        entries = [
            {
                "resource": orjson.Fragment(item.raw)
                if kind == "least"
                else outgoing_body(item, refs[item.outbox_id], targets),
                "request": {
                    "method": "POST",
                    "url": item.type,
                    "ifNoneExist": f"identifier={fhir.IDENTIFIER_SYSTEM}|"
                    f"{fhir.identifier_value(item.logical_id)}",
                },
            }
            for item in items
        ]
        spent["rewrite"] += time.thread_time() - started
        started = time.thread_time()
        body = orjson.dumps({"resourceType": "Bundle", "type": "batch", "entry": entries})
        spent["encode"] += time.thread_time() - started
        return [item.outbox_id for item in items], body

    def record(raw: Any, ids: list[int], answer: dict[str, Any]) -> None:
        started = time.thread_time()
        moment = datetime.now(UTC)
        refs = [entry_ref(entry, "Observation") for entry in answer["entry"]]
        with db.transaction_sync(raw):
            if kind == "floor":
                raw.execute(
                    _RECORD_SQL,
                    (iso(moment), orjson.dumps(list(zip(ids, refs, strict=True))).decode()),
                )
            else:
                raw.execute(
                    "INSERT INTO bench_bundles_delivered (first, last, at, refs) "
                    "VALUES (?, ?, ?, ?)",
                    (ids[0], ids[-1], iso(moment), orjson.dumps(refs)),
                )
            event = AuditEvent(
                ACTOR, AuditAction.SYNC, entity=f"Observation x{len(ids)}", detail="delivered"
            )
            audit.append(raw, [event], now=moment)
        spent["record"] += time.thread_time() - started

    async def send(body: bytes) -> dict[str, Any]:
        response = await exchange(
            client, "POST", "", content=body, headers={"Content-Type": FHIR_JSON}
        )
        answer: dict[str, Any] = response_json(response)
        return answer

    async with sync_drain._client(base_url) as client:
        queue = OutboxQueue(store)
        now = iso(datetime.now(UTC))
        delivered = 0
        start, loop_cpu = time.perf_counter(), time.thread_time()
        batch = await db.run_sync(conn, plan, [], now)
        sending = None if batch is None else asyncio.ensure_future(send(batch[1]))
        while batch is not None and sending is not None:
            ahead = await db.run_sync(conn, plan, batch[0], now)
            answer = await sending
            sending = None if ahead is None else asyncio.ensure_future(send(ahead[1]))
            await db.run_sync(conn, record, batch[0], answer)
            delivered += len(batch[0])
            batch = ahead
        elapsed = time.perf_counter() - start
        spent["event_loop"] = time.thread_time() - loop_cpu
    await store.close()
    return delivered / elapsed, {step: cpu / delivered * 1e6 for step, cpu in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--items", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    items = args.items or (10_000 if args.quick else 50_000)
    rounds = args.rounds or (2 if args.quick else 3)
    rates: dict[str, list[float]] = {"agent": [], **{k: [] for k in FLOORS}, "bare": []}
    bare_cpu: list[float] = []
    steps: dict[str, dict[str, list[float]]] = {k: collections.defaultdict(list) for k in FLOORS}
    with (
        tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp,
        sync_drain.UpstreamProcess() as upstream,
    ):
        db_path, kek = sync_drain.populate_in_child(Path(tmp), items)
        recorded = Path(tmp) / "bundles.bin"
        for round_no in range(rounds):
            upstream.reset()
            upstream.record(recorded if round_no == 0 else None)
            rate, delivered, _ = asyncio.run(
                sync_drain.agent_drain(db_path, kek, upstream.base_url, BUNDLE)
            )
            assert delivered == items + 1, delivered
            rates["agent"].append(rate)
            upstream.record(None)
            sync_drain.requeue(db_path)
            for kind in FLOORS:
                upstream.reset()
                rate, split = asyncio.run(floor_drain(db_path, kek, upstream.base_url, kind))
                assert upstream.control.get("/__count").json()["count"] == items + 1
                rates[kind].append(rate)
                for step, cpu in split.items():
                    steps[kind][step].append(cpu)
                sync_drain.requeue(db_path)
            upstream.reset()
            rate, posted, cpu = asyncio.run(sync_drain.bare_post(upstream.base_url, recorded))
            assert posted == items + 1, posted
            rates["bare"].append(rate)
            bare_cpu.append(cpu)
    agent, floor, bare = (statistics.median(rates[k]) for k in ("agent", "floor", "bare"))
    rows = [
        sync_drain.emit(
            "sync_drain_floor_items_per_s",
            floor,
            "items/s",
            bare,
            "ratio >= 0.7",
            floor / bare >= 0.7,
        ),
        sync_drain.emit("sync_drain_agent_items_per_s_against_the_floor", agent, "items/s", floor),
        sync_drain.emit("sync_drain_bare_cpu_us_per_item", statistics.median(bare_cpu), "µs"),
    ]
    for kind in FLOORS[1:]:
        lower = statistics.median(rates[kind])
        name = f"sync_drain_floor_{kind}_items_per_s"
        rows.append(
            sync_drain.emit(name, lower, "items/s", bare, "ratio >= 0.7", lower / bare >= 0.7)
        )
    for kind in FLOORS:
        prefix = "sync_drain_floor_cpu_us" if kind == "floor" else f"sync_drain_floor_{kind}_cpu_us"
        for step, values in steps[kind].items():
            rows.append(sync_drain.emit(f"{prefix}_{step}", statistics.median(values), "µs"))
    runs = ", ".join(f"{k} {[round(r) for r in rates[k]]}" for k in rates)
    sys.stderr.write(
        f"\nsync drain floor ({items} Observations, bundles of {BUNDLE}, medians of {rounds} "
        f"rounds; {runs} items/s)\n"
    )
    for row in rows:
        sys.stderr.write(f"  {json.dumps(row)}\n")


if __name__ == "__main__":
    main()
