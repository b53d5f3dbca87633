"""Sync health as staff see it (DESIGN.md, "Sync"): one read of the figures, no decryption.

``appliance sync status``, the ``/sync`` page and ``/metrics`` all show what
:func:`read_status` returns, so the three never disagree: whether the sync process is online
(its heartbeat row), items waiting per lane and the age of the oldest, the claims waiting
for the payer (their own queue: they never enter the outbox), the last successful
delivery, dead letters, the audit export's lag and the age of the oldest record it has not
sent, and the last "sync now" request.

Dead-letter messages are the upstream's own words and may quote the refused data (PHI), so
they are stored sealed; :func:`open_dead_letter_messages` opens them only on request and
records an audit record per message, in the patient's name, before returning any of them.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from appliance import audit, db, fhir
from appliance.audit import AuditAction, AuditEvent
from appliance.errors import TamperedDataError
from appliance.keys import KeySource, keyring_of
from appliance.runtime import HEARTBEAT_STALE_S
from appliance.store import Lane, oldest_waiting, queued_at
from sync_agent.audit_export_state import ExportState, read_export_state
from sync_agent.outbox_failing import FailingItems, failing_items
from sync_agent.outbox_schedule import RETRY_HORIZON

SYNC_NOW_KEY = "sync_now"
"""``meta`` key the sync process watches: a new value makes it skip its backoff."""
STEPS = ("updates", "pull", "audit export")
"""The steps after the outbox drain, each paced on its own (``steps_failing`` names them)."""
REFUSED = "refused"
"""The failure of a step each of whose requests the upstream refused (a pull pass with every
search answered 403 or 400), in ``steps_failing`` beside the classes of
:class:`sync_agent.upstream.Failure`."""
UNORDERED = "unordered"
"""The failure of a pull pass that got no page, its searches answered with pages not sorted or
filtered by ``_lastUpdated`` as asked (not taken: the cursors stay), in ``steps_failing``."""
DEAD_LETTERS_SHOWN = 50
# An outbox row (alias ``o``) held for the review queue (an update the upstream's changes
# overtook): counted and decided there, never a dead letter, never sent again from them.
_IN_REVIEW = "EXISTS (SELECT 1 FROM review_queue q WHERE q.outbox_id = o.id)"


# Lanes no outbox row is ever put in, so their outbox counts are always 0: claims have their
# own queue and payer endpoint (docs/adr/0006-claims.md, sync_agent/claims_submit.py), the
# audit trail its own export with its own cursor (sync_agent/audit_export.py). ``lanes``
# still names them (scripts read the JSON of ``sync status`` and
# ``appliance_outbox_pending{lane}``); what staff read shows what really waits there instead:
# :attr:`SyncStatus.claims` and the export's lag.
NO_OUTBOX_ROWS = frozenset({Lane.CLAIMS.name.lower(), Lane.AUDIT.name.lower()})


@dataclass(frozen=True, slots=True)
class ClaimsWaiting:
    """The claims queue (``claims.status``), which the sync process submits to the payer:
    counts and an age only, no PHI."""

    ready: int  # ready to submit (a batch on its way included)
    oldest_ready_age_s: float | None  # since the one waiting longest became ready
    in_review: int  # sent without a clear answer: a person decides, nothing is resent


NO_CLAIMS = ClaimsWaiting(0, None, 0)
NO_FAILING = FailingItems(0)


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
class Resent:
    """What :func:`resend_dead_letters` did, by outbox id."""

    resent: tuple[int, ...]
    in_review: tuple[int, ...]  # held for the review queue (decided there): left as is
    missing: tuple[int, ...]  # asked for, and not a dead letter (any more)


@dataclass(frozen=True, slots=True)
class ProcessStatus:
    """The sync process's heartbeat: when it last beat and the figures it published."""

    beat_at: datetime
    age_s: float
    figures: dict[str, object]

    @property
    def fresh(self) -> bool:
        """The process is alive (its heartbeat is recent; one far in the future, from a
        clock set back since, says nothing either)."""
        return -HEARTBEAT_STALE_S <= self.age_s <= HEARTBEAT_STALE_S

    @property
    def no_upstream(self) -> bool:
        """It said it has no upstream configured (records wait; claims still go)."""
        return "upstream" in self.figures and self.figures["upstream"] is None

    @property
    def starting(self) -> bool:
        """Alive, and its first round not over yet (nothing known of the link; its first
        heartbeat may come before it has said anything at all)."""
        return self.fresh and "online" not in self.figures and not self.no_upstream

    @property
    def unreachable(self) -> bool:
        """Its last attempt made no connection at all (the clinic's link, DNS, a firewall),
        as opposed to an upstream that answered with an error."""
        return self.figures.get("unreachable") is True

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
    def steps_failing(self) -> dict[str, str]:
        """Steps after the outbox drain waiting out a backoff → the class of their failure
        (updates, pull, audit export: the drain may be online while one of them is refused)."""
        value = self.figures.get("steps_failing")
        if not isinstance(value, dict):
            return {}
        return {str(k): str(v) for k, v in value.items()}

    @property
    def last_failure(self) -> str | None:
        """The class of the last failure (transient, ambiguous…), never the server's words."""
        value = self.figures.get("last_failure")
        return None if value is None else str(value)

    @property
    def pull_refused(self) -> int:
        """Searches the upstream refused in the last pull pass that ran to its end (a 4xx to
        that one search; the others went on)."""
        value = self.figures.get("pull_refused")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    @property
    def pull_unordered(self) -> int:
        """Searches of the last pull pass that ran to its end whose page the upstream did not
        sort or filter by ``_lastUpdated`` as asked (not taken; the others went on)."""
        value = self.figures.get("pull_unordered")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    @property
    def pull_stuck(self) -> bool:
        """A stream of the last pull pass cannot page past a run of equal timestamps."""
        return self.figures.get("pull_stuck") is True


@dataclass(frozen=True, slots=True)
class Twin:
    """An upstream record left out of the pull: it carries the identifier of ``ours``, which
    the upstream holds under another id. No PHI: references only."""

    theirs: str  # the upstream reference of the record left out (``Patient/123``)
    ours: str  # our record it names (``Patient/<local id>``)
    at: str  # when the pull first met it (UTC text)


# ``meta`` key of the twins (a JSON list, newest last, at most TWINS_KEPT).
TWINS_KEY = "pull.twins"
TWINS_KEPT = 50
TWINS_CLEARED_DETAIL = "records held twice upstream: list cleared"


def note_twins(conn: sqlite3.Connection, twins: Sequence[Twin]) -> None:
    """Add upstream records left out as twins (inside the pull's import transaction); one
    met again keeps its first time."""
    if not twins:
        return
    known = list(read_twins(conn))
    have = {t.theirs for t in known}
    for twin in twins:
        if twin.theirs not in have:
            have.add(twin.theirs)
            known.append(twin)
    db.set_meta(
        conn, TWINS_KEY, json.dumps([[t.theirs, t.ours, t.at] for t in known[-TWINS_KEPT:]])
    )


def read_twins(conn: sqlite3.Connection) -> tuple[Twin, ...]:
    """The twins noted so far (an altered row reads as none)."""
    try:
        loaded = json.loads(db.meta_value(conn, TWINS_KEY) or "[]")
    except (TypeError, ValueError):
        return ()
    if not isinstance(loaded, list):
        return ()
    return tuple(
        Twin(*item)
        for item in loaded
        if isinstance(item, list) and len(item) == 3 and all(isinstance(v, str) for v in item)
    )


def clear_twins(conn: sqlite3.Connection, *, actor: str, now: datetime) -> int:
    """Clear the list once the EHR team has looked at the records (audited); how many went.
    A twin still there upstream is listed again when the pull meets it again."""
    with db.transaction_sync(conn):
        known = read_twins(conn)
        if not known:
            return 0
        conn.execute("DELETE FROM meta WHERE key = ?", (TWINS_KEY,))
        audit.append(
            conn,
            [
                AuditEvent(
                    actor,
                    AuditAction.CONFIG,
                    entity="pull",
                    detail=f"{TWINS_CLEARED_DETAIL} ({len(known)}: "
                    + ", ".join(t.theirs for t in known)[:400]
                    + ")",
                )
            ],
            now=now,
        )
    return len(known)


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
    reviews_open: int = 0  # local edits the upstream's changes overtook, waiting for a nurse
    # Upstream records the pull left out: they carry the identifier of a record held here
    # under another upstream id (a merge at the EHR, or a copy), newest last.
    twins: tuple[Twin, ...] = ()
    claims: ClaimsWaiting = NO_CLAIMS
    # Age of the oldest audit record not exported yet (None: nothing waiting).
    export_oldest_age_s: float | None = None
    # Items the upstream keeps answering with an error (our access refused, a 5xx of their
    # own, or whole bundles failed for them): sent again for as long as it lasts, never
    # dead-lettered, so this is where staff see them.
    failing: FailingItems = NO_FAILING

    @property
    def online(self) -> bool:
        """Whether the box currently reaches its upstream."""
        return self.process is not None and self.process.online

    @property
    def waiting(self) -> int:
        """Items waiting in every lane."""
        return sum(lane.waiting for lane in self.lanes)

    @property
    def outbox_lanes(self) -> tuple[LaneStatus, ...]:
        """The lanes outbox rows are put in (alerts, clinical), for the tables staff read;
        one of the others shows only if something is there after all."""
        return tuple(
            lane
            for lane in self.lanes
            if lane.name not in NO_OUTBOX_ROWS or lane.waiting or lane.dead
        )

    @property
    def steps_failing(self) -> dict[str, str]:
        """Steps after the drain the sync process says are failing, while it is alive (a
        stale heartbeat's say nothing of now)."""
        process = self.process
        return process.steps_failing if process is not None and process.fresh else {}

    @property
    def pull_refused(self) -> int:
        """Searches refused in the sync process's last pull pass, while it is alive."""
        process = self.process
        return process.pull_refused if process is not None and process.fresh else 0

    @property
    def pull_unordered(self) -> int:
        """Searches answered unsorted or unfiltered in the sync process's last pull pass,
        while it is alive."""
        process = self.process
        return process.pull_unordered if process is not None and process.fresh else 0

    @property
    def paused_for_s(self) -> float | None:
        """How long the sync process has skipped its rounds, another process (``appliance
        sync once``) holding the sync lease (None: it is not, or not alive)."""
        process = self.process
        if process is None or not process.fresh:
            return None
        since = parse_time(process.figures.get("paused_since"))
        if since is None:
            return None
        return max(0.0, (process.beat_at - since).total_seconds() + process.age_s)

    @property
    def pull_stuck(self) -> bool:
        """A pull stream stuck in the sync process's last pass, while it is alive."""
        process = self.process
        return process is not None and process.fresh and process.pull_stuck


def lane_name(lane: int) -> str:
    """``alerts``, ``claims``… (the number itself for a lane this release does not know)."""
    try:
        return Lane(lane).name.lower()
    except ValueError:
        return str(lane)


def parse_time(text: object) -> datetime | None:
    """An aware ISO time, or None for anything else (a heartbeat row is anyone's to write)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


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
            f"WHERE o.state = 'dead' AND NOT {_IN_REVIEW} "
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
            f"JOIN resources r ON r.id = o.resource_id WHERE o.state = 'dead' AND NOT {_IN_REVIEW} "
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


def _write_sync_now(conn: sqlite3.Connection, now: datetime) -> str:
    value = now.isoformat()
    db.set_meta(conn, SYNC_NOW_KEY, value)
    return value


def request_sync_now(conn: sqlite3.Connection, actor: str, now: datetime) -> str:
    """Write the ``sync_now`` request and its audit record in one transaction; its value."""
    with db.transaction_sync(conn):
        value = _write_sync_now(conn, now)
        audit.append(
            conn,
            [AuditEvent(actor, AuditAction.SYNC, entity="outbox", detail="sync now requested")],
            now=now,
        )
    return value


RESENT_DETAIL = "dead letter sent again"


def resend_dead_letters(
    conn: sqlite3.Connection,
    *,
    actor: str,
    now: datetime,
    outbox_ids: Sequence[int] | None = None,
) -> Resent:
    """Put dead letters back in the outbox (all, or those of ``outbox_ids``), audited.

    For when what the upstream refused has been put right at the EHR (a profile, a
    permission, a Practitioner it did not know) or on the box's side (a ``base_url``). Each
    keeps its place in its lane (its outbox id) but joins the queue now (its waiting age
    starts again), its attempts start again from zero, and its old message goes; a resend
    is safe, since every create is conditional on our identifier. A Patient sent again takes the patient's other dead letters with it: its
    readings were refused because of it. An update held for the review queue stays as it
    is: the decision there stands. One audit record per item, in the patient's name, and
    the ``sync_now`` request, in the same transaction, so the sync process tries at once.
    """
    with db.transaction_sync(conn):  # chosen and changed under one write lock
        chosen, found = _resendable(conn, outbox_ids)
        ids = sorted(oid for oid, (_key, in_review) in chosen.items() if not in_review)
        if ids:
            conn.execute(
                "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = NULL, "
                "last_error = NULL, queued_at = ? WHERE state = 'dead' "
                "AND id IN (SELECT value FROM json_each(?))",
                (queued_at(now), json.dumps(ids)),
            )
            _write_sync_now(conn, now)
            audit.append(
                conn,
                [
                    AuditEvent(
                        actor,
                        AuditAction.SYNC,
                        patient_key=chosen[oid][0],
                        entity=f"outbox/{oid}",
                        detail=RESENT_DETAIL,
                    )
                    for oid in ids
                ],
                now=now,
            )
    held = tuple(sorted(oid for oid, (_key, in_review) in chosen.items() if in_review))
    missing = () if outbox_ids is None else tuple(sorted(set(outbox_ids) - found))
    return Resent(tuple(ids), held, missing)


def _resendable(
    conn: sqlite3.Connection, outbox_ids: Sequence[int] | None
) -> tuple[dict[int, tuple[bytes | None, bool]], set[int]]:
    """Dead letters asked for (and their patients' others): id → (patient key, in review);
    and the ids asked for that are dead letters."""
    base = (
        f"SELECT o.id, r.type, r.patient_key, {_IN_REVIEW}, o.kind FROM outbox o "  # noqa: S608 - constant
        "INDEXED BY outbox_dead JOIN resources r ON r.id = o.resource_id WHERE o.state = 'dead'"
    )
    if outbox_ids is None:
        rows = conn.execute(base).fetchall()
    else:
        rows = conn.execute(
            base + " AND o.id IN (SELECT value FROM json_each(?))",  # noqa: S608 - constants
            (json.dumps(sorted(set(outbox_ids))),),
        ).fetchall()
    found = {int(oid) for oid, *_ in rows}
    if outbox_ids is not None:
        # A Patient's own dead letters come along (its readings were refused because of it).
        patients = {
            bytes(key)
            for _oid, rtype, key, in_review, kind in rows
            if rtype == "Patient" and kind == "create" and key and not in_review
        }
        for key in sorted(patients):
            rows += conn.execute(base + " AND r.patient_key = ?", (key,)).fetchall()
    chosen = {
        int(oid): (None if key is None else bytes(key), bool(in_review))
        for oid, _type, key, in_review, _kind in rows
    }
    return chosen, found


def open_dead_letter_messages(
    conn: sqlite3.Connection,
    keyring: KeySource,
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
        "SELECT o.id, o.last_error, r.patient_key FROM outbox o INDEXED BY outbox_dead "
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
    ring = keyring_of(keyring, conn)
    messages: dict[int, str] = {}
    events = []
    for oid, sealed, patient_key in rows:
        if sealed is None:
            messages[int(oid)] = ""
        elif isinstance(sealed, str):
            messages[int(oid)] = sealed
        else:
            try:
                messages[int(oid)] = ring.unseal("outbox", str(oid), bytes(sealed))
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
