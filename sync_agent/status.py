"""Sync health as staff see it (DESIGN.md, "Sync"): one read of the figures, no decryption.

``appliance sync status``, the ``/sync`` page and ``/metrics`` all show what
:func:`read_status` returns, so the three never disagree: whether the sync process is online
(its heartbeat row), items waiting per lane and the age of the oldest, the claims waiting
for the payer (their own queue: they never enter the outbox), the last successful
delivery, dead letters, the audit export's lag and the age of the oldest record it has not
sent, and the last "sync now" request.

The figures themselves, and what each view derives from them, are
:mod:`sync_agent.status_figures`; dead letters (opening their sealed messages, sending them
again) are :mod:`sync_agent.dead_letters`, the records held twice upstream
:mod:`sync_agent.pull_twins`, the "sync now" request :mod:`sync_agent.sync_now_request`.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime

from appliance import fhir
from appliance.store import Lane, oldest_waiting
from sync_agent.audit_export_state import read_export_state
from sync_agent.dead_letters import DEAD_LETTERS_SHOWN, IN_REVIEW
from sync_agent.outbox_failing import failing_items
from sync_agent.outbox_schedule import RETRY_HORIZON
from sync_agent.pull_twins import read_twins
from sync_agent.status_figures import (
    ClaimsWaiting,
    DeadLetter,
    LaneStatus,
    ProcessStatus,
    SyncStatus,
    lane_name,
    parse_time,
)
from sync_agent.sync_now_request import SYNC_NOW_KEY


def _process(conn: sqlite3.Connection, now: datetime) -> ProcessStatus | None:
    row = conn.execute("SELECT beat_at, status FROM heartbeats WHERE process = 'sync'").fetchone()
    beat_at = None if row is None else parse_time(row[0])
    if row is None or beat_at is None:
        return None
    try:
        figures = json.loads(row[1])
    except ValueError:
        figures = {}
    return ProcessStatus(
        beat_at=beat_at,
        age_s=round((now - beat_at).total_seconds(), 3),
        figures=figures if isinstance(figures, dict) else {},
    )


def read_status(conn: sqlite3.Connection, now: datetime, *, all_states: bool = False) -> SyncStatus:
    """Read every figure (on the database thread); ``now`` is timezone-aware.

    Cheap whatever the size of the outbox (delivered rows are never pruned, and ``/healthz``
    and ``/metrics`` answer anyone, on the web process's one database thread): waiting and
    dead items are counted through their partial indexes. ``all_states`` adds the raw count
    of every lane and state (``counts``: a scan of the whole outbox, for the CLI's JSON).
    The oldest waiting item's age is from when it joined the queue (:func:`appliance.store.oldest_waiting`). An
    update held for the review queue (the upstream's copy had changed) is counted there,
    open or decided, never as a dead letter: it is not a refusal, and a nurse's decision
    ends it. The claims queue is read through its status index, the oldest unexported audit
    record by its id.
    """
    counts = (
        tuple(
            (int(lane), str(state), int(count))
            for lane, state, count in conn.execute(
                "SELECT lane, state, count(*) FROM outbox GROUP BY lane, state ORDER BY lane, state"
            ).fetchall()
        )
        if all_states
        else ()
    )
    pending_by_lane = {
        int(lane): int(count)
        for lane, count in conn.execute(
            "SELECT lane, count(*) FROM outbox WHERE state = 'pending' GROUP BY lane"
        ).fetchall()
    }
    dead_by_lane = {
        int(lane): int(count)
        for lane, count in conn.execute(
            "SELECT o.lane, count(*) FROM outbox o INDEXED BY outbox_dead "  # noqa: S608 - constant
            f"WHERE o.state = 'dead' AND NOT {IN_REVIEW} "
            "GROUP BY o.lane"
        ).fetchall()
    }
    lanes = []
    joined = oldest_waiting(conn)
    for lane in Lane:
        since = joined.get(lane)
        age = None if since is None else round(max(0.0, (now - since).total_seconds()), 3)
        lanes.append(
            LaneStatus(
                lane.name.lower(), pending_by_lane.get(lane, 0), age, dead_by_lane.get(lane, 0)
            )
        )
    last = conn.execute("SELECT max(delivered_at) FROM outbox").fetchone()[0]
    dead = tuple(
        DeadLetter(int(oid), lane_name(lane), str(rtype), int(attempts))
        for oid, lane, rtype, attempts in conn.execute(
            # Through the dead letters' own index: by id alone, the planner walks the whole
            # outbox backwards looking for them once it is large (a scan on every scrape).
            "SELECT o.id, o.lane, r.type, o.attempts FROM outbox o INDEXED BY outbox_dead "  # noqa: S608 - constant
            f"JOIN resources r ON r.id = o.resource_id WHERE o.state = 'dead' AND NOT {IN_REVIEW} "
            "ORDER BY o.id DESC LIMIT ?",
            (DEAD_LETTERS_SHOWN,),
        ).fetchall()
    )
    [reviews_open] = conn.execute(
        "SELECT count(*) FROM review_queue WHERE state = 'open'"
    ).fetchone()
    sync_now = conn.execute("SELECT value FROM meta WHERE key = ?", (SYNC_NOW_KEY,)).fetchone()
    export = read_export_state(conn)
    return SyncStatus(
        process=_process(conn, now),
        lanes=tuple(lanes),
        last_success=parse_time(last),
        dead_total=sum(dead_by_lane.values()),
        dead_letters=dead,
        export=export,
        sync_now=None if sync_now is None else str(sync_now[0]),
        counts=counts,
        reviews_open=int(reviews_open),
        twins=read_twins(conn),
        claims=_claims_waiting(conn, now),
        export_oldest_age_s=_age_s(now, _first_unexported(conn, export.cursor)),
        failing=failing_items(conn),
    )


def _age_s(now: datetime, text: object) -> float | None:
    moment = parse_time(text)
    return None if moment is None else round(max(0.0, (now - moment).total_seconds()), 3)


def _claims_waiting(conn: sqlite3.Connection, now: datetime) -> ClaimsWaiting:
    """Ready and in-review claims (through ``claims_by_status``) and how long the oldest
    ready one has been ready: from its newest move into ready (``claim_events``), not from
    ``updated_at`` nor the ``ready → ready`` event that each submission attempt which sent
    nothing (the payer down) writes: with those, claims waiting for days read minutes old."""
    counts = dict(
        conn.execute(
            "SELECT status, count(*) FROM claims WHERE status IN ('ready', 'in_review') "
            "GROUP BY status"
        ).fetchall()
    )
    [since] = conn.execute(
        "SELECT min(coalesce((SELECT max(e.at) FROM claim_events e WHERE e.claim_id = c.id "
        "AND e.to_status = 'ready' AND coalesce(e.from_status, '') != 'ready'), c.updated_at)) "
        "FROM claims c WHERE c.status = 'ready'"
    ).fetchone()
    return ClaimsWaiting(
        int(counts.get("ready", 0)), _age_s(now, since), int(counts.get("in_review", 0))
    )


def _first_unexported(conn: sqlite3.Connection, cursor: int) -> str | None:
    """When the oldest audit record the export has not settled was written."""
    row = conn.execute(
        "SELECT ts FROM audit WHERE id > ? ORDER BY id LIMIT 1", (cursor,)
    ).fetchone()
    return None if row is None else str(row[0])


@dataclass(frozen=True, slots=True)
class StillWaiting:
    """Outbox items not delivered (``appliance sync once`` says why it left them)."""

    items: int
    edits: int  # of which local edits (version-checked updates)
    delayed: int  # of which waiting out a retry delay (set by an upstream's error, or asked)


def still_waiting(conn: sqlite3.Connection, now: datetime) -> StillWaiting:
    """The pending outbox items and those of them not due before a retry time (one beyond the
    retry horizon, left by a clock that was ahead, is due now: ``outbox_schedule.DUE_SQL``)."""
    moment = now.astimezone(UTC)
    items, edits, delayed = conn.execute(
        "SELECT count(*), coalesce(sum(kind = 'update'), 0), coalesce(sum(next_attempt_at > ? "
        "AND next_attempt_at <= ?), 0) FROM outbox WHERE state = 'pending'",
        (fhir.utc_text(moment), fhir.utc_text(moment + RETRY_HORIZON)),
    ).fetchone()
    return StillWaiting(int(items), int(edits), int(delayed))
