"""Sync health as staff see it (DESIGN.md, "Sync"): one read of the figures, no decryption.

``appliance sync status``, the ``/sync`` page and ``/metrics`` all show what
:func:`read_status` returns, so the three never disagree: whether the sync process is online
(its heartbeat row), items waiting per lane and the age of the oldest, the last successful
delivery, dead letters, the audit export's lag and the last "sync now" request.

Dead-letter messages are the upstream's own words and may quote the refused data (PHI), so
they are stored sealed; :func:`open_dead_letter_messages` opens them only on request and
records an audit record per message, in the patient's name, before returning any of them.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from appliance import audit, db
from appliance.audit import AuditAction, AuditEvent
from appliance.errors import TamperedDataError
from appliance.keys import Keyring
from appliance.runtime import HEARTBEAT_STALE_S
from appliance.store import Lane
from sync_agent.audit_export import ExportState, read_export_state

SYNC_NOW_KEY = "sync_now"
"""``meta`` key the sync process watches: a new value makes it skip its backoff."""
DEAD_LETTERS_SHOWN = 50


@dataclass(frozen=True, slots=True)
class LaneStatus:
    """One outbox lane: items waiting, the oldest one's age, and refused items."""

    name: str
    waiting: int
    oldest_age_s: float | None
    dead: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A refused outbox item, without its (sealed) message."""

    outbox_id: int
    lane: str
    type: str
    attempts: int


@dataclass(frozen=True, slots=True)
class ProcessStatus:
    """The sync process's heartbeat: when it last beat and the figures it published."""

    beat_at: datetime
    age_s: float
    figures: dict[str, object]

    @property
    def fresh(self) -> bool:
        """The process is alive (its heartbeat is recent)."""
        return self.age_s <= HEARTBEAT_STALE_S

    @property
    def online(self) -> bool:
        """Alive, with an upstream, and its last drain reached it."""
        return self.fresh and self.figures.get("online") is True

    @property
    def upstream(self) -> str | None:
        """The upstream's configured name (None: none configured)."""
        value = self.figures.get("upstream")
        return None if value is None else str(value)

    @property
    def last_failure(self) -> str | None:
        """The class of the last failure (transient, ambiguous…), never the server's words."""
        value = self.figures.get("last_failure")
        return None if value is None else str(value)


@dataclass(frozen=True, slots=True)
class SyncStatus:
    """Everything the status views show."""

    process: ProcessStatus | None
    lanes: tuple[LaneStatus, ...]
    last_success: datetime | None
    dead_total: int
    dead_letters: tuple[DeadLetter, ...]
    export: ExportState
    sync_now: str | None
    counts: tuple[tuple[int, str, int], ...]  # (lane, state, count): the raw outbox table

    @property
    def online(self) -> bool:
        """Whether the box currently reaches its upstream."""
        return self.process is not None and self.process.online

    @property
    def waiting(self) -> int:
        """Items waiting in every lane."""
        return sum(lane.waiting for lane in self.lanes)


def lane_name(lane: int) -> str:
    """``alerts``, ``claims``… (the number itself for a lane this release does not know)."""
    try:
        return Lane(lane).name.lower()
    except ValueError:
        return str(lane)


def uuid7_seconds(logical_id: str) -> float:
    """The creation time (Unix seconds) in a UUIDv7's first 48 bits (``fhir.uuid7``)."""
    return int(logical_id.replace("-", "")[:12], 16) / 1000


def _parse_time(text: object) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _process(conn: sqlite3.Connection, now: datetime) -> ProcessStatus | None:
    row = conn.execute("SELECT beat_at, status FROM heartbeats WHERE process = 'sync'").fetchone()
    beat_at = None if row is None else _parse_time(row[0])
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


def read_status(conn: sqlite3.Connection, now: datetime) -> SyncStatus:
    """Read every figure (on the database thread); ``now`` is timezone-aware.

    Waiting items are counted through the partial index of pending rows; the oldest waiting
    item's age comes from its resource's UUIDv7 (the outbox keeps no creation time).
    """
    counts = tuple(
        (int(lane), str(state), int(count))
        for lane, state, count in conn.execute(
            "SELECT lane, state, count(*) FROM outbox GROUP BY lane, state ORDER BY lane, state"
        ).fetchall()
    )
    lanes = []
    for lane in Lane:
        oldest = conn.execute(
            "SELECT r.logical_id FROM outbox o JOIN resources r ON r.id = o.resource_id "
            "WHERE o.state = 'pending' AND o.lane = ? ORDER BY o.id LIMIT 1",
            (int(lane),),
        ).fetchone()
        age = None
        if oldest is not None:
            try:
                age = round(max(0.0, now.timestamp() - uuid7_seconds(str(oldest[0]))), 3)
            except ValueError:
                age = None
        by_state = {state: count for number, state, count in counts if number == lane}
        lanes.append(
            LaneStatus(lane.name.lower(), by_state.get("pending", 0), age, by_state.get("dead", 0))
        )
    last = conn.execute("SELECT max(delivered_at) FROM outbox").fetchone()[0]
    dead = tuple(
        DeadLetter(int(oid), lane_name(lane), str(rtype), int(attempts))
        for oid, lane, rtype, attempts in conn.execute(
            "SELECT o.id, o.lane, r.type, o.attempts FROM outbox o "
            "JOIN resources r ON r.id = o.resource_id WHERE o.state = 'dead' "
            "ORDER BY o.id DESC LIMIT ?",
            (DEAD_LETTERS_SHOWN,),
        ).fetchall()
    )
    sync_now = conn.execute("SELECT value FROM meta WHERE key = ?", (SYNC_NOW_KEY,)).fetchone()
    return SyncStatus(
        process=_process(conn, now),
        lanes=tuple(lanes),
        last_success=_parse_time(last),
        dead_total=sum(count for _, state, count in counts if state == "dead"),
        dead_letters=dead,
        export=read_export_state(conn),
        sync_now=None if sync_now is None else str(sync_now[0]),
        counts=counts,
    )


def request_sync_now(conn: sqlite3.Connection, actor: str, now: datetime) -> str:
    """Write the ``sync_now`` request and its audit record in one transaction; its value."""
    value = now.isoformat()
    with db.transaction_sync(conn):
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (SYNC_NOW_KEY, value),
        )
        audit.append(
            conn,
            [AuditEvent(actor, AuditAction.SYNC, entity="outbox", detail="sync now requested")],
            now=now,
        )
    return value


def open_dead_letter_messages(
    conn: sqlite3.Connection,
    keyring: Keyring,
    *,
    actor: str,
    now: datetime,
    outbox_ids: Sequence[int] | None = None,
    limit: int = DEAD_LETTERS_SHOWN,
) -> dict[int, str]:
    """Unseal dead-letter messages (all, newest first, or those of ``outbox_ids``), audited.

    One ``read`` record per message opened, carrying the patient key of the refused
    resource, commits before any message is returned. A message that does not open (a key
    this process has not loaded, or tampering) is shown as such, and still audited.
    """
    sql = (
        "SELECT o.id, o.last_error, r.patient_key FROM outbox o "
        "JOIN resources r ON r.id = o.resource_id WHERE o.state = 'dead'"
    )
    params: list[int] = []
    if outbox_ids is not None:
        if not outbox_ids:
            return {}
        sql += f" AND o.id IN ({','.join('?' * len(outbox_ids))})"
        params.extend(outbox_ids)
    sql += " ORDER BY o.id DESC LIMIT ?"
    params.append(limit)
    rows = conn.execute(sql, params).fetchall()
    messages: dict[int, str] = {}
    events = []
    for oid, sealed, patient_key in rows:
        if sealed is None:
            messages[int(oid)] = ""
        elif isinstance(sealed, str):
            messages[int(oid)] = sealed
        else:
            try:
                messages[int(oid)] = keyring.unseal("outbox", str(oid), bytes(sealed))
            except TamperedDataError:
                messages[int(oid)] = "(the message could not be opened)"
        events.append(
            AuditEvent(
                actor,
                AuditAction.READ,
                patient_key=None if patient_key is None else bytes(patient_key),
                entity=f"outbox/{oid}",
                detail="dead-letter message opened",
            )
        )
    if events:
        with db.transaction_sync(conn):
            audit.append(conn, events, now=now)
    return messages
