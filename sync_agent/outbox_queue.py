"""The outbox as delivery reads and settles it, on the database thread (:class:`OutboxQueue`):
which due items go in the next bundle, and what is remembered of them between bundles.

References: a resource that points at one of ours, ``<Type>/<local id>`` (in any
Reference, at any depth: a reading's Patient and Device, an alert's implicated Observation,
an arrival's Appointment, a recording's Encounter), is sent pointing at that resource's
upstream id, learnt when it was delivered (its outbox row keeps the ``upstream_ref``) or
from its upstream link when it came from the upstream (a pulled Appointment). A reference
whose type is not that of the resource with that id is not ours and stays as it is. The
stored JSON bytes are sent with those references replaced in place, never parsed
(:func:`~sync_agent.outgoing.outgoing_body`). A batch therefore ends before the first item
whose target is not delivered yet; that resource comes earlier in outbox order, so it goes
in this batch or the next (dependencies respected without a transaction). Only a dead-lettered Patient takes
what points at it along; any other target refused (a Device, an Observation) drops the link
and keeps the rest of the Reference (its display name).

A resource that points at one of ours still waiting in the outbox pulls it into the bundle
ahead of itself, whatever lane that one is in: an alert (lane 0) about a patient registered a
moment ago (clinical, lane 2) must not wait for the whole clinical lane, nor block it.

A row whose stored copy fails authentication (altered on disk, or sealed with a key this box
does not hold) cannot be sent, since what it said is unknown: it is dead-lettered with a
message saying so and a separate audit record, and the rest flows. Its dependents follow it
as they follow a Patient the server refused.

The :class:`~sync_agent.outbox_delivery.Deliverer` runs each method here through
``db.run_sync`` and owns the rest: the bundle size, sending, and the drain.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Set
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import orjson

from appliance import db
from appliance.errors import TamperedDataError
from appliance.store import Store, upstream_refs_of_pulled
from sync_agent.outbox_bundle import may_be_an_entry
from sync_agent.outbox_outcomes import DEAD_DEPENDENCY, UNREADABLE, record_outcomes
from sync_agent.outbox_schedule import DUE_SQL, due_bounds, iso
from sync_agent.outgoing import NO_LOCATION, Item, Outgoing, outgoing_body
from sync_agent.upstream import Failure, UpstreamError

_ITEM_COLUMNS = (
    "o.id, o.lane, o.attempts, o.alone, r.id, r.logical_id, r.type, r.key_version, r.body"
)
# Rows of the bundle in flight (a JSON array of outbox ids) are skipped before the join, so
# their resources are not read twice.
_PENDING_SQL = (
    f"SELECT {_ITEM_COLUMNS} FROM outbox o JOIN resources r ON r.id = o.resource_id "  # noqa: S608 - constant
    "WHERE o.state = 'pending' AND o.kind = 'create' "
    f"AND {DUE_SQL} "
    "AND o.id NOT IN (SELECT value FROM json_each(?)) "
    "ORDER BY o.lane, o.id LIMIT ?"
)
# SQLite's default limit on host parameters is 999 (older builds); stay well below it.
_IN_CHUNK = 500
# Upstream references of delivered (or dead) resources never change: remembered, bounded.
_REF_CACHE_MAX = 50_000
# When every due item read waits for a dependency in a per-item backoff, the next due items
# are read past them, up to this many held ones per bundle chosen: one Patient whose entry the
# server keeps answering 5xx must not hold back everyone queued behind its readings.
_LOOK_PAST_HELD = 5_000


@dataclass(frozen=True, slots=True)
class Batch:
    """One bundle's worth: the entries to send, and items refused without sending."""

    ready: list[tuple[Item, Outgoing]]
    dead: list[tuple[Item, str]]
    # Nothing to send yet, but more due items may lie past the held ones read so far (they
    # are remembered, so the next read starts past them).
    more: bool = False

    @property
    def taken(self) -> tuple[Item, ...]:
        """Every item of this bundle, sent or not: none may be read again until it is settled."""
        return tuple(item for item, _ in self.ready) + tuple(item for item, _ in self.dead)


class _Plan(NamedTuple):
    """What :meth:`OutboxQueue._plan` chose: to send, to dead-letter, and the outbox ids of
    items held back (a dependency waits out a per-item backoff) with the references they
    wait on; ``ended`` when the bundle ended at an item waiting for one in this bundle or
    the one in flight."""

    ready: list[tuple[Item, Outgoing]]
    dead: list[tuple[Item, str]]
    held: list[int]
    waits_on: set[str]
    ended: bool


class OutboxQueue:
    """The due items of one store's outbox, bundle by bundle, and their outcomes recorded.

    Every method runs on the store connection's thread (``db.run_sync``), and so does every
    change to what it remembers.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._refs: dict[str, str] = {}
        # Items found held for a dependency's backoff, and the references they wait on: not
        # read again (and decrypted) for every bundle of a drain, until one of those is
        # settled. Touched on the database thread only.
        self._held: set[int] = set()
        self._held_on: set[str] = set()
        # Outbox id → the most entries of a bundle it may go in: items of a bundle that
        # failed as a whole go in smaller ones (halved each time) until they get an answer,
        # whatever the bundle size has grown back to meanwhile. Database thread only.
        self._caps: dict[int, int] = {}
        # Items set aside (failed alone again, the server up), until they get an answer; for
        # the rest of a drain in which the Deliverer's _MAX_ISOLATED of them were sent again,
        # not sent (``barred``, :meth:`choose`).
        self._aside: set[int] = set()

    @property
    def aside(self) -> Set[int]:
        """Outbox ids of the items set aside, until they get an answer."""
        return self._aside

    # -- reading the outbox ----------------------------------------------------------------

    def _items(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[Item]:
        # Columns: outbox id, lane, attempts, alone, then the resource row (_ITEM_COLUMNS).
        for row in rows:
            if row[3]:  # set aside (by this process or one before it): alone when due
                self._caps[row[0]] = 1
                self._aside.add(row[0])
        return [Item(row[0], row[1], row[2], row[5], row[6], self._raw(conn, row)) for row in rows]

    def _raw(self, conn: sqlite3.Connection, row: tuple[Any, ...]) -> bytes:
        """The resource's JSON as stored; empty if it fails authentication (logged by the store)."""
        try:
            return self._store.decrypt_stored_json(conn, row[4:])
        except TamperedDataError:
            return b""

    def _load(
        self, conn: sqlite3.Connection, now: str, limit: int, busy: frozenset[int] = frozenset()
    ) -> list[Item]:
        """Due items in lane order, skipping ``busy`` outbox ids (a bundle in flight)."""
        skip = orjson.dumps(sorted(busy)).decode()
        rows = conn.execute(_PENDING_SQL, (*due_bounds(now), skip, limit)).fetchall()
        return self._items(conn, rows)

    def _load_by_logical_id(
        self,
        conn: sqlite3.Connection,
        logical_ids: list[str],
        now: str,
        busy: frozenset[int] = frozenset(),
    ) -> list[Item]:
        """Due pending creates of these resources (dependencies pulled ahead of their lane),
        but not those in ``busy`` (in flight, or already found held in this drain)."""
        rows: list[tuple[Any, ...]] = []
        for start in range(0, len(logical_ids), _IN_CHUNK):
            chunk = logical_ids[start : start + _IN_CHUNK]
            rows += conn.execute(
                f"SELECT {_ITEM_COLUMNS} FROM resources r JOIN outbox o ON o.resource_id = r.id "  # noqa: S608 - placeholders only
                f"WHERE r.logical_id IN ({','.join('?' * len(chunk))}) AND o.state = 'pending' "
                f"AND o.kind = 'create' AND {DUE_SQL}",
                (*chunk, *due_bounds(now)),
            ).fetchall()
        return self._items(conn, sorted(row for row in rows if row[0] not in busy))

    def _upstream_refs(self, conn: sqlite3.Connection, keys: set[str]) -> dict[str, str | None]:
        """Reference (``Type/<local id>``) → upstream reference (None while not delivered).

        ``"absent"``: not a resource of ours, or ours under another type (the reference is
        left as is); ``"dead"``: ours, refused upstream. Upstream references are final and
        remembered, so a drain of many readings of a few patients asks the database once per
        patient; "dead" is not (staff may send a dead letter again:
        ``dead_letters.resend_dead_letters``).
        """
        found: dict[str, str | None] = {}
        unknown: dict[str, set[str]] = {}  # logical id → the types references give it
        for key in keys:
            known = self._refs.get(key)
            if known is not None:
                found[key] = known
                continue
            rtype, _, logical_id = key.partition("/")
            unknown.setdefault(logical_id, set()).add(rtype)
        ids = list(unknown)
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            rows = conn.execute(
                "SELECT r.logical_id, r.type, o.upstream_ref, o.state FROM resources r "  # noqa: S608 - placeholders only
                "JOIN outbox o ON o.resource_id = r.id "
                f"WHERE r.logical_id IN ({','.join('?' * len(chunk))}) AND o.kind = 'create'",
                chunk,
            ).fetchall()
            states = {(rtype, logical_id): (ref, state) for logical_id, rtype, ref, state in rows}
            # What came from the upstream has no create row: its link says where.
            pulled = upstream_refs_of_pulled(conn, chunk)
            for logical_id in chunk:
                for rtype in unknown[logical_id]:
                    key = f"{rtype}/{logical_id}"
                    ref, state = states.get((rtype, logical_id), (None, None))
                    if state is None:
                        link = pulled.get(logical_id, "")
                        found[key] = link if link.startswith(f"{rtype}/") else "absent"
                    elif state == "delivered":
                        found[key] = ref or NO_LOCATION
                    elif state == "dead":
                        found[key] = "dead"
                    else:
                        found[key] = None
        if len(self._refs) > _REF_CACHE_MAX:
            self._refs.clear()
        for key, target in found.items():
            if target not in (None, "absent", "dead"):
                self._refs[key] = target
        return found

    # -- building the bundle -------------------------------------------------------------

    def _plan(
        self,
        conn: sqlite3.Connection,
        items: list[Item],
        now: str,
        size: int,
        in_flight: frozenset[str] = frozenset(),
        busy: frozenset[int] = frozenset(),
    ) -> _Plan:
        """Choose the items of this bundle (at most ``size``), dependencies first; and those
        to dead-letter.

        One of ours that a loaded item points at and that is itself due goes at the
        front (loaded from any lane when it is not among the items); the bundle then ends
        before the first item pointing at something in this same bundle or in the one still
        in flight (``in_flight``: their references, ``Type/<local id>``; it needs that
        resource's upstream id, known only from the answer), so a lane keeps its order. An
        item whose dependency is waiting out a backoff is held back, and so is one whose
        dependency is ``busy`` (found held earlier in this drain, or in flight): a busy item is
        never pulled ahead again. (It was: an alert's reading held for its Patient's backoff
        was pulled ahead of the alert each time, the alert cut off the bundle, and the same
        plan was made for ever, sending nothing.) One pointing at a dead-lettered Patient is
        dead-lettered, and so is one whose stored copy fails authentication.
        """
        local = {item.outbox_id: item.local_refs() for item in items}
        refs: dict[str, str | None] = {}
        # An alert → its Observation → the reading's Device → the Device's Patient.
        for _ in range(4):
            for item in items:
                if item.outbox_id not in local:
                    local[item.outbox_id] = item.local_refs()
            wanted = {
                f"{rtype}/{lid}" for item in items for rtype, lid in local[item.outbox_id]
            } - refs.keys()
            if not wanted:
                break
            refs.update(self._upstream_refs(conn, wanted))
            pending = {key for key in wanted if refs[key] is None} - in_flight
            if not pending:
                break
            loaded = {item.key: item for item in items}
            ahead = [loaded[key] for key in pending if key in loaded]
            more = sorted({key.partition("/")[2] for key in pending - loaded.keys()})
            ahead += [
                item
                for item in self._load_by_logical_id(conn, more, now, busy)
                if item.key in pending
            ]
            ahead.sort(key=lambda item: item.outbox_id)
            moved = {item.outbox_id for item in ahead}
            rest = [item for item in items if item.outbox_id not in moved]
            items = (ahead + rest)[:size]
        in_batch: set[str] = set()
        ready: list[tuple[Item, Outgoing]] = []
        dead: list[tuple[Item, str]] = []
        held_ids: list[int] = []
        waits_on: set[str] = set()
        caps = self._caps
        room = len(items)
        for item in items:
            if not item.raw:
                dead.append((item, UNREADABLE))
                continue
            blocked = waits = held = False
            for rtype, local_id in local[item.outbox_id]:
                key = f"{rtype}/{local_id}"
                target = refs.get(key)
                if target == "dead":
                    # A reading stands without its device (the name stays, the link goes);
                    # nothing stands without its Patient.
                    blocked = blocked or rtype == "Patient"
                elif key in in_batch or key in in_flight:
                    waits = True  # it goes in this bundle; this item in the next one
                elif target is None:
                    held = True  # not due yet (per-item backoff): this item waits for it
                    waits_on.add(key)
            if waits:
                return _Plan(ready, dead, held_ids, waits_on, ended=True)
            if blocked:
                dead.append((item, DEAD_DEPENDENCY))
                continue
            if held:
                held_ids.append(item.outbox_id)
                continue
            if caps:
                # An item of a bundle that failed whole goes in a smaller one (_caps); the
                # bundle ends before an item that may not join one this large.
                room = min(room, caps.get(item.outbox_id, room))
                if len(ready) >= room:
                    return _Plan(ready, dead, held_ids, waits_on, ended=True)
            ready.append((item, outgoing_body(item, local[item.outbox_id], refs)))
            in_batch.add(item.key)
        return _Plan(ready, dead, held_ids, waits_on, ended=False)

    # -- the next bundle ------------------------------------------------------------------

    def choose(
        self,
        conn: sqlite3.Connection,
        now: str,
        in_flight: tuple[Item, ...],
        size: int,
        barred: bool,
        forget_held: bool = False,
    ) -> Batch | None:
        """The next bundle of at most ``size`` due items, none of those ``in_flight``, nor
        (``barred``) any set aside; None when nothing is due."""
        if forget_held:  # a new drain: a dependency's backoff may have passed since
            self.forget_held()
        busy = {item.outbox_id for item in in_flight} | self._held
        if barred:
            busy |= self._aside
        flying = frozenset(item.key for item in in_flight)
        looked_past = 0
        while True:
            skip = frozenset(busy)
            items = self._load(conn, now, size, skip)
            if not items:
                return None if not looked_past else Batch([], [])
            plan = self._plan(conn, items, now, size, flying, skip)
            self._held.update(plan.held)
            self._held_on |= plan.waits_on
            if plan.ready or plan.dead or plan.ended or not plan.held:
                return Batch(plan.ready, plan.dead)
            # Every item read waits out a dependency's backoff: read on past them, a bounded
            # stretch per call (the database thread is shared).
            busy.update(plan.held)
            looked_past += len(plan.held)
            if looked_past >= _LOOK_PAST_HELD:
                return Batch([], [], more=True)

    # -- recording outcomes --------------------------------------------------------------

    def record(
        self,
        conn: sqlite3.Connection,
        delivered: list[tuple[Item, str | None]],
        dead: list[tuple[Item, str]],
        retry: list[tuple[Item, str, float]],
        now: datetime,
        isolated: list[tuple[Item, str, float]] | None = None,
    ) -> int:
        """Commit a bundle's outcomes and its items refused without sending (or an item set
        aside, ``isolated``: as ``retry``, and sent alone when due again); returns how many
        were dead-lettered (:func:`~sync_agent.outbox_outcomes.record_outcomes`). What was
        remembered of them is settled too."""
        dead = record_outcomes(conn, self._store, delivered, dead, retry, now, isolated)
        if self._held_on and any(
            item.key in self._held_on for item, _ in [*delivered, *dead]
        ):  # what they waited on is settled: they are read again
            self.forget_held()
        if self._caps:  # answered: back to bundles of any size
            for answered in (delivered, dead, retry):
                for row in answered:
                    self._caps.pop(row[0].outbox_id, None)
                    self._aside.discard(row[0].outbox_id)
        if len(self._aside) > _REF_CACHE_MAX:
            self._aside.clear()  # bounded; forgotten, one is bisected again if it fails
        for item, _message, _delay in isolated or ():
            self._caps[item.outbox_id] = 1  # alone when due again
            self._aside.add(item.outbox_id)
        return len(dead)

    def forget_held(self) -> None:
        """Read the items found held again (a dependency's backoff may have passed)."""
        self._held.clear()
        self._held_on.clear()

    def failed_whole(
        self,
        conn: sqlite3.Connection,
        items: list[Item],
        exc: UpstreamError,
        now: datetime,
        unsure_s: float,
    ) -> bool:
        """Note a bundle that failed as a whole; whether its one item had failed before.

        Its answer lost (ambiguous): its items are not due before a request timeout
        (``unsure_s``) from now, the server may be applying the request still (a conditional
        create is not atomic under concurrent requests on HAPI #3141, Microsoft's FHIR server
        #1382 or Medplum #4234, so a resend that overtook it could create a second copy); no
        attempt is counted, nothing was answered. The wait is kept in the row
        (``unsure_until``), so "sync now" leaves it alone in any process
        (:meth:`~sync_agent.outbox_delivery.Deliverer.make_due`). They then go in bundles of
        half the size (it may have been the size that took too long).

        Failed in a way one entry may have caused
        (:func:`~sync_agent.outbox_bundle.may_be_an_entry`): its items go again as they were
        the first time (a passing fault), then in bundles halved at each
        failure, until each gets an answer: bisection, so one item that makes the server or
        a filter in front of it fail the whole bundle ends up alone, and the rest flows.
        """
        ids = [item.outbox_id for item in items]
        ambiguous = exc.failure is Failure.AMBIGUOUS
        if ambiguous:
            until = iso(now + timedelta(seconds=unsure_s))
            with db.transaction_sync(conn):
                conn.execute(
                    "UPDATE outbox SET next_attempt_at = ?, unsure_until = ? "
                    "WHERE id IN (SELECT value FROM json_each(?)) AND state = 'pending'",
                    (until, until, orjson.dumps(ids).decode()),
                )
        if not (ambiguous or may_be_an_entry(exc)):
            return False
        again = len(ids) == 1 and ids[0] in self._caps
        if len(self._caps) > _REF_CACHE_MAX:
            self._caps.clear()  # bounded; forgetting costs only a bigger bundle failing again
        for oid in ids:
            seen = oid in self._caps
            cap = len(ids) // 2 if seen or ambiguous else len(ids)
            self._caps[oid] = max(1, min(cap, self._caps.get(oid, cap)))
        return again
