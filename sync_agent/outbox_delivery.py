"""Outbox delivery: pending rows → idempotent ``batch`` Bundles → per-item checkpoints.

Each outbox row's resource is sent as ``POST <Type>`` with
``ifNoneExist: identifier=urn:ietf:rfc:3986|urn:uuid:<logical id>``, so a resend after a
lost response finds the resource already there (200) instead of creating it twice (201).
Entries of a ``batch`` are independent: each gets its own outcome, a refused entry is
dead-lettered with the server's message and the rest land.

Entries carry no ``fullUrl``: batch entries do not reference each other, and a
``urn:uuid`` fullUrl equal to our identifier value gets rewritten by some servers (the
Medplum peer replaces it in every string of the Bundle, identifiers included), which would
break idempotency on the next resend.

References: a resource that points at one of ours, ``<Type>/<local id>`` (in any
Reference, at any depth: a reading's Patient and Device, an alert's implicated Observation,
an arrival's Appointment, a recording's Encounter), is sent pointing at that resource's
upstream id, learnt when it was delivered (its outbox row keeps the ``upstream_ref``) or
from its upstream link when it came from the upstream (a pulled Appointment). A reference
whose type is not that of the resource with that id is not ours and stays as it is. The
stored JSON bytes are sent with those references replaced in place, never parsed
(:func:`~sync_agent.outgoing.outgoing_body`). A batch therefore ends before the first item whose target is not
delivered yet; that resource comes earlier in outbox order, so it goes in this batch or the
next (dependencies respected without a transaction). Only a dead-lettered Patient takes
what points at it along; any other target refused (a Device, an Observation) drops the link
and keeps the rest of the Reference (its display name).

A resource that points at one of ours still waiting in the outbox pulls it into the bundle
ahead of itself, whatever lane that one is in: an alert (lane 0) about a patient registered a
moment ago (clinical, lane 2) must not wait for the whole clinical lane, nor block it.

A row whose stored copy fails authentication (altered on disk, or sealed with a key this box
does not hold) cannot be sent, since what it said is unknown: it is dead-lettered with a
message saying so and a separate audit record, and the rest flows. Its dependents follow it
as they follow a Patient the server refused.

Every answer is committed at once (delivered, dead, or retry-at), so a drain interrupted
anywhere resumes where it stopped; nothing is ever re-sent that the server acknowledged,
except when its answer was lost — and then the resend is harmless. Entry *k* of an answer is
item *k*'s, so an answer without exactly one entry per entry sent (one dropped, a batch-level
OperationOutcome put first) is matched to nothing: it fails as a whole (:class:`UnmatchedAnswer`,
transient) and every item is sent again, rather than each taking its neighbour's outcome and
upstream id.

A failure of the whole exchange (no connection, no answer, 5xx, 429) says nothing about the
items, so it writes nothing to their rows: they stay due, in lane order, and the caller (the
sync process) owns the pacing — it gets ``link_down``, ``unreachable`` (no connection was
made at all) and the server's ``Retry-After``. A week offline therefore costs no writes and
leaves no item behind a per-item backoff when the link returns. One exception: the items of
a bundle whose answer was lost (a timeout after sending, a 504) are not sent again before a
request timeout (the upstream's ``timeout_s``) has passed, "sync now" or not, in this process
or another (`appliance sync once`): the wait is kept in the row (``unsure_until``). The server
may be applying that request still, and conditional create is not atomic under concurrent
requests on HAPI (#3141), Microsoft's FHIR server (#1382) or Medplum (#4234). The rest flows
meanwhile. Only an entry-level answer that says nothing against the item (an entry's own
5xx/429/408/409/423/425, a 401/403 — our access, never a dead letter —, or a missing entry)
schedules that one item later with jittered exponential backoff (:func:`backoff_s`), its
last error in the server's words, sealed; :func:`failing_items` finds the items that keep
failing so, for the status.

One item can make a server (or a filter in front of it) fail the whole bundle — a 500, 502
or 403, no answer — and would stop the outbox for good, alerts included, if every drain sent
the same first items. So a bundle failing so in a way one entry may cause
(:func:`_may_be_an_entry`) is bisected: its items go again as they were once (a passing
fault), then in bundles halved at each failure until each gets an answer (kept in memory).
An item that fails alone, having failed before, makes the drain ask the server whether it is
up (``GET metadata``, a CapabilityStatement): if so, the server fails only that item, which
is set aside — it waits out a per-item backoff (counted, its last error kept, shown by
:func:`failing_items`), goes alone when due again (``outbox.alone``, so after a restart
too) — and the drain goes on; if not, it is an
outage, and nothing is written. That needs no other bundle to go through (an item may have
nothing else due behind it but its own readings). At most ``_MAX_ISOLATED`` items set aside
before go again per drain. Never a dead letter: bisecting costs requests (a dead EHR one
question more per round), never an item. An upstream that fails every POST but answers its
metadata (its database down) looks like one failing each item it is sent: a few items per
round are set aside, each for at most ``MAX_BACKOFF_S``.

Bundle size: a 413 (or "too many entries") halves it and it grows back by doubling after each
bundle that goes through, but not past a size refused before (for the next
``_TOO_LARGE_MEMORY`` bundles); the items of a bundle that got no answer are resent in
bundles of half its size, in case the timeout was its size. :meth:`Deliverer.drain` works one
bundle ahead (its docstring).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import httpx
import orjson

from appliance import audit, db, fhir
from appliance.audit import AuditAction, AuditEvent, Outcome
from appliance.errors import TamperedDataError
from appliance.keys import Keyring
from appliance.store import Store, upstream_refs_of_pulled
from sync_agent.outgoing import NO_LOCATION, Item, Outgoing, outgoing_body
from sync_agent.upstream import (
    ENTRY_NOT_THE_ITEM,
    Failure,
    UpstreamError,
    as_dict,
    as_list,
    bundle_entries,
    entry_answer,
    entry_outcome,
    entry_status,
    exchange,
    failure_class,
    post_bundle,
    response_json,
)

logger = logging.getLogger(__name__)

ACTOR = "service:sync"
MAX_BACKOFF_S = 300.0
# No item is ever scheduled further ahead than this (backoffs stop at MAX_BACKOFF_S, a
# server's Retry-After is capped here). A stored retry time beyond it can only come from a
# clock that was ahead and has been set back (a box without a battery-backed clock booting
# before NTP, then corrected): such an item is due now, not in years.
RETRY_HORIZON = timedelta(days=1)
# An outbox row (alias ``o``) is due: no retry time, one passed, or one beyond the horizon.
# Its two parameters are :func:`due_bounds`.
DUE_SQL = "(o.next_attempt_at IS NULL OR o.next_attempt_at <= ? OR o.next_attempt_at > ?)"
# What an entry's answer may name as the resource it made or found: ``Type/id``, FHIR's shapes.
_UPSTREAM_REF = re.compile(r"[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}")
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
_DEAD_DEPENDENCY = "depends on a Patient that was dead-lettered"
# A stored copy that fails authentication cannot be sent (we do not know what it said); it
# is dead-lettered instead of stopping the drain, and the rest flows.
UNREADABLE = (
    "the stored copy failed authentication (altered on disk, or sealed with a key this box "
    "does not hold) and was not sent; restore it from a backup or enter it again"
)
UNREADABLE_AUDIT = "stored copy failed authentication; not sent (dead letter)"
# Items whose answer was lost wait this long when the client has no read timeout (the
# upstream's default timeout_s).
_UNSURE_DEFAULT_S = 30.0
# At most this many items set aside before are sent again (alone) in one drain; the others
# due wait for a later drain, and the rest flows. An upstream that fails every POST but
# answers its metadata (its database down) then costs, per round of the sync loop, at most
# two requests (the item, the question whether the server is up) for each of these, and for
# each item the bisection brings down to one, besides the bundle that fails.
_MAX_ISOLATED = 3
# After this many bundles fitting, a size once refused as too large is tried again.
_TOO_LARGE_MEMORY = 100
# When every due item read waits for a dependency in a per-item backoff, the next due items
# are read past them, up to this many held ones per bundle chosen: one Patient whose entry the
# server keeps answering 5xx must not hold back everyone queued behind its readings.
_LOOK_PAST_HELD = 5_000


class UnmatchedAnswer(UpstreamError):
    """A bundle's answer whose entries cannot be matched to the items sent (not one each)."""

    __slots__ = ()


def _patient_still_dead(conn: sqlite3.Connection, item: Item) -> bool:
    """Whether a Patient ``item`` points at is a dead letter now (asked under the write lock)."""
    patients = sorted({lid for rtype, lid in item.local_refs() if rtype == "Patient"})
    return (
        conn.execute(
            "SELECT 1 FROM resources r JOIN outbox o ON o.resource_id = r.id "  # noqa: S608 - placeholders only
            f"WHERE r.logical_id IN ({','.join('?' * len(patients))}) AND r.type = 'Patient' "
            "AND o.kind = 'create' AND o.state = 'dead' LIMIT 1",
            patients,
        ).fetchone()
        is not None
    )


@dataclass(frozen=True, slots=True)
class _Batch:
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
    """What :meth:`Deliverer._plan` chose: to send, to dead-letter, and the outbox ids of
    items held back (a dependency waits out a per-item backoff) with the references they
    wait on; ``ended`` when the bundle ended at an item waiting for one in this bundle or
    the one in flight."""

    ready: list[tuple[Item, Outgoing]]
    dead: list[tuple[Item, str]]
    held: list[int]
    waits_on: set[str]
    ended: bool


@dataclass
class DrainResult:
    """What one drain did (figures for logs, /healthz and tests; no PHI)."""

    delivered: int = 0
    existing: int = 0
    dead: int = 0
    retry: int = 0
    ambiguous: int = 0
    bundles: int = 0
    error: str | None = None
    # The exchange failed as a whole (transient or ambiguous): nothing was marked.
    link_down: bool = False
    # No connection could be made at all (refused, unreachable, DNS): the link is down.
    unreachable: bool = False
    # The server asked for this pause (429/503 Retry-After).
    retry_after_s: float | None = None
    batch_size: int = 0
    failures: list[str] = field(default_factory=list)


def _add(total: DrainResult, step: DrainResult) -> None:
    total.delivered += step.delivered
    total.existing += step.existing
    total.dead += step.dead
    total.retry += step.retry
    total.ambiguous += step.ambiguous
    total.bundles += step.bundles
    if step.error:
        total.error = step.error
        total.failures.append(step.error)
    total.link_down = step.link_down
    total.unreachable = step.unreachable
    total.retry_after_s = step.retry_after_s


def backoff_s(
    attempts: int, rng: random.Random, *, base: float = 2.0, cap: float = MAX_BACKOFF_S
) -> float:
    """Full-jitter exponential backoff: uniform(0, min(cap, base * 2**attempts))."""
    return rng.uniform(0, min(cap, base * (2 ** min(attempts, 20))))


def _iso(moment: datetime) -> str:
    return fhir.utc_text(moment)


def due_bounds(now: str) -> tuple[str, str]:
    """``now`` and the retry horizon after it: a row is due unless its time is in between."""
    moment = datetime.fromisoformat(now.removesuffix("Z")).replace(tzinfo=UTC)
    return now, _iso(moment + RETRY_HORIZON)


def _entry_ref(entry: Any, rtype: str) -> str | None:
    """``<rtype>/id`` of what an entry created or found: from its location, else its resource.

    Only a reference of the item's own type with an id counts: an OperationOutcome in the
    entry, a resource without an id, or a location whose last segments are not
    ``<rtype>/<id>`` (``https://ehr/Fhir/123``) name nothing, and were taken for the
    resource's upstream id (``OperationOutcome/None``, ``Fhir/123``) that everything pointing
    at it was then sent with. None when nothing does (the item is delivered all the same;
    what refers to it is then sent by our identifier, see :func:`~sync_agent.outgoing.outgoing_body`).
    """
    location = entry_answer(entry).get("location")
    if isinstance(location, str) and location:
        head, sep, rid = location.split("/_history", 1)[0].rpartition("/")
        ref = f"{head.rpartition('/')[2]}/{rid}"
        if sep and ref.startswith(f"{rtype}/") and _UPSTREAM_REF.fullmatch(ref):
            return ref
    resource = entry.get("resource") if isinstance(entry, dict) else None
    if isinstance(resource, dict) and resource.get("resourceType") == rtype:
        found = resource.get("id")
        if isinstance(found, str) and _UPSTREAM_REF.fullmatch(f"{rtype}/{found}"):
            return f"{rtype}/{found}"
    return None


def _may_be_an_entry(exc: UpstreamError) -> bool:
    """Whether a bundle's failure as a whole may be one entry's doing, so that bisecting it
    finds the entry: the server, or a filter in front of it, answered 5xx or 403 without a
    ``Retry-After`` (a server that throws on one resource, a WAF that refuses one), an
    answer that cannot be matched to the entries, or none at all once the request went.
    Not a connection that could not be made, our credentials (401, 407), a pause asked
    for (429, ``Retry-After``), or an address that does not take the request."""
    if exc.retry_after_s is not None:
        return False
    if exc.failure is Failure.AMBIGUOUS or isinstance(exc, UnmatchedAnswer):
        return True
    return exc.status is not None and (exc.status == 403 or exc.status >= 500)


def _not_taken(entry: Any, code: int) -> str:
    """Why an entry is sent again (an answer that says nothing against the item: our access,
    "later", a 5xx, none at all), in the server's words when it gave any. Sealed when stored,
    as a dead letter's message is: those words may quote what was sent."""
    head = f"entry HTTP {code}" if code else "entry answer missing"
    said = entry_outcome(entry, code)
    return head if said == f"HTTP {code}" else f"{head}: {said}"


class Deliverer:
    """Drains the outbox of one store to one upstream FHIR server."""

    def __init__(
        self,
        store: Store,
        client: httpx.AsyncClient,
        *,
        max_entries: int,
        rng: random.Random | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        unsure_s: float | None = None,
    ) -> None:
        """``unsure_s``: how long items whose answer was lost are not sent again (default:
        ``client``'s read timeout, which :func:`sync_agent.upstream.build_client` sets to the
        upstream's ``timeout_s``)."""
        self._store = store
        self._client = client
        self._max_entries = max_entries
        self._batch_size = max_entries
        # Bundles of this many entries were refused as too large: growing back stops below,
        # until enough bundles went through to try again (the limit may have been transient).
        self._too_large_at: int | None = None
        self._fits_since = 0
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._clock = clock
        self._refs: dict[str, str] = {}
        # Items found held for a dependency's backoff, and the references they wait on: not
        # read again (and decrypted) for every bundle of a drain, until one of those is
        # settled. Touched on the database thread only.
        self._held: set[int] = set()
        self._held_on: set[str] = set()
        if unsure_s is None:
            unsure_s = client.timeout.read
        self._unsure_s = _UNSURE_DEFAULT_S if unsure_s is None else unsure_s
        # Outbox id → the most entries of a bundle it may go in: items of a bundle that
        # failed as a whole go in smaller ones (halved each time) until they get an answer,
        # whatever the bundle size has grown back to meanwhile. Database thread only.
        self._caps: dict[int, int] = {}
        # Items set aside (failed alone again, the server up), until they get an answer; for
        # the rest of a drain in which _MAX_ISOLATED of them were sent again, not sent.
        self._aside: set[int] = set()
        self._aside_barred = False

    @property
    def unsure_s(self) -> float:
        """How long an item whose answer was lost is not sent again (the request timeout)."""
        return self._unsure_s

    @property
    def batch_size(self) -> int:
        """The current bundle size (shrinks when the server says bundles are too large)."""
        return self._batch_size

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
        ``status.resend_dead_letters``).
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
        in_flight: frozenset[str] = frozenset(),
        busy: frozenset[int] = frozenset(),
    ) -> _Plan:
        """Choose the items of this bundle, dependencies first; and those to dead-letter.

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
            items = (ahead + rest)[: self._batch_size]
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
                dead.append((item, _DEAD_DEPENDENCY))
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

    @staticmethod
    def _bundle(entries: list[tuple[Item, Outgoing]]) -> dict[str, Any]:
        return {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                {
                    "resource": body,
                    "request": {
                        "method": "POST",
                        "url": item.type,
                        "ifNoneExist": f"identifier={fhir.IDENTIFIER_SYSTEM}|{fhir.identifier_value(item.logical_id)}",
                    },
                }
                for item, body in entries
            ],
        }

    # -- recording outcomes --------------------------------------------------------------

    def _record(
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
        were dead-lettered."""
        stamp = _iso(now)
        with db.transaction_sync(conn):
            # Messages to seal (nearly never, in a drain): a data-key rotation committed
            # meanwhile is seen first.
            keyring = self._store.current_keyring(conn) if dead or retry or isolated else None
            # Planned dead for a dead-lettered Patient, which staff may have sent again
            # since (status.resend_dead_letters): such an item stays due, and goes after it.
            dead = [
                (item, message)
                for item, message in dead
                if message != _DEAD_DEPENDENCY or _patient_still_dead(conn, item)
            ]
            if delivered:
                # One statement for the whole bundle (the ids and references as one JSON
                # array): a row-by-row executemany hands the GIL back and forth with the
                # event loop once per row, which is most of a drain's cost.
                conn.execute(
                    "UPDATE outbox SET state = 'delivered', upstream_ref = v.ref, "
                    "delivered_at = ?, attempts = attempts + 1, last_error = NULL "
                    "FROM (SELECT value ->> 0 AS id, value ->> 1 AS ref FROM json_each(?)) AS v "
                    "WHERE outbox.id = v.id AND outbox.state = 'pending'",
                    (
                        stamp,
                        orjson.dumps([(item.outbox_id, ref) for item, ref in delivered]).decode(),
                    ),
                )
            conn.executemany(
                "UPDATE outbox SET state = 'dead', last_error = ?, attempts = attempts + 1, "
                "alone = 0 WHERE id = ? AND state = 'pending'",
                [(self._seal(keyring, item, message), item.outbox_id) for item, message in dead],
            )
            # An entry answered (retry) goes in bundles again; one set aside goes alone.
            conn.executemany(
                "UPDATE outbox SET last_error = ?, attempts = attempts + 1, next_attempt_at = ?, "
                "alone = ? WHERE id = ? AND state = 'pending'",
                [
                    (
                        self._seal(keyring, item, message),
                        _iso(now + timedelta(seconds=delay)),
                        alone,
                        item.outbox_id,
                    )
                    for alone, outcomes in ((0, retry), (1, isolated or ()))
                    for item, message, delay in outcomes
                ],
            )
            events = []
            if delivered:
                types = sorted({item.type for item, _ in delivered})
                events.append(
                    AuditEvent(
                        ACTOR,
                        AuditAction.SYNC,
                        entity=f"{'+'.join(types)} x{len(delivered)}",
                        detail="delivered upstream",
                    )
                )
            unreadable = sum(1 for item, _ in dead if not item.raw)
            if len(dead) > unreadable:
                events.append(
                    AuditEvent(
                        ACTOR,
                        AuditAction.SYNC,
                        outcome=Outcome.FAILURE,
                        entity=f"x{len(dead) - unreadable}",
                        detail="refused upstream (dead letter)",
                    )
                )
            if unreadable:
                events.append(
                    AuditEvent(
                        ACTOR,
                        AuditAction.SYNC,
                        outcome=Outcome.FAILURE,
                        entity=f"x{unreadable}",
                        detail=UNREADABLE_AUDIT,
                    )
                )
            if events:
                audit.append(conn, events, now=now)
        if self._held_on and any(
            item.key in self._held_on for item, _ in [*delivered, *dead]
        ):  # what they waited on is settled: they are read again
            self._forget_held()
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

    def _forget_held(self) -> None:
        self._held.clear()
        self._held_on.clear()

    @staticmethod
    def _seal(keyring: Keyring | None, item: Item, message: str) -> bytes:
        # The server's diagnostics may quote what it refused (names, identifiers): PHI,
        # so the message is stored encrypted like the resource itself (see error_message).
        assert keyring is not None  # loaded by _record whenever there is a message
        return keyring.seal("outbox", str(item.outbox_id), message)

    # -- the drain -----------------------------------------------------------------------

    def _choose(
        self,
        conn: sqlite3.Connection,
        now: str,
        in_flight: tuple[Item, ...],
        forget_held: bool = False,
    ) -> _Batch | None:
        if forget_held:  # a new drain: a dependency's backoff may have passed since
            self._forget_held()
        busy = {item.outbox_id for item in in_flight} | self._held
        if self._aside_barred:
            busy |= self._aside
        flying = frozenset(item.key for item in in_flight)
        looked_past = 0
        while True:
            skip = frozenset(busy)
            items = self._load(conn, now, self._batch_size, skip)
            if not items:
                return None if not looked_past else _Batch([], [])
            plan = self._plan(conn, items, now, flying, skip)
            self._held.update(plan.held)
            self._held_on |= plan.waits_on
            if plan.ready or plan.dead or plan.ended or not plan.held:
                return _Batch(plan.ready, plan.dead)
            # Every item read waits out a dependency's backoff: read on past them, a bounded
            # stretch per call (the database thread is shared).
            busy.update(plan.held)
            looked_past += len(plan.held)
            if looked_past >= _LOOK_PAST_HELD:
                return _Batch([], [], more=True)

    async def _prepare(
        self, in_flight: tuple[Item, ...] = (), *, forget_held: bool = False
    ) -> tuple[_Batch | None, datetime]:
        now = self._clock()
        batch = await db.run_sync(
            self._store.connection, self._choose, _iso(now), in_flight, forget_held
        )
        return batch, now

    def _send(self, batch: _Batch) -> asyncio.Task[dict[str, Any]]:
        return asyncio.ensure_future(self._post(batch.ready))

    async def _post(self, ready: list[tuple[Item, Outgoing]]) -> dict[str, Any]:
        """POST the bundle; its answer, which must have one entry per entry sent."""
        response = await post_bundle(self._client, self._bundle(ready))
        answered = len(as_list(as_dict(response).get("entry")))
        if answered != len(ready):
            # Entries are matched to items by position: one answer dropped, or one extra (a
            # batch-level OperationOutcome first), shifts every position after it, and each
            # item would take its neighbour's outcome and upstream id. None is trusted.
            raise UnmatchedAnswer(
                Failure.TRANSIENT,
                f"the answer has {answered} entries for the {len(ready)} sent; "
                "none is taken, all are sent again",
            )
        return response

    async def _settle(self, batch: _Batch, response: dict[str, Any], result: DrainResult) -> None:
        """Record each entry's outcome (delivered, dead, retry-at) in one transaction.

        Retry times count from now, when the answer is in: the bundle was planned before the
        previous one's answer came (one bundle ahead), and a backoff measured from then was
        mostly spent before it began.
        """
        now = self._clock()
        result.bundles = 1
        dead = list(batch.dead)
        delivered: list[tuple[Item, str | None]] = []
        retry: list[tuple[Item, str, float]] = []
        # One entry per item (:meth:`_post` saw to it): entry k is item k's answer.
        for (item, _body), entry in zip(batch.ready, bundle_entries(response), strict=True):
            code = entry_status(entry)
            if 200 <= code < 300:
                delivered.append((item, _entry_ref(entry, item.type)))
                result.existing += code == 200
            elif 400 <= code < 500 and code not in ENTRY_NOT_THE_ITEM:
                dead.append((item, entry_outcome(entry, code)))
            else:
                retry.append((item, _not_taken(entry, code), backoff_s(item.attempts, self._rng)))
        result.dead = await db.run_sync(
            self._store.connection, self._record, delivered, dead, retry, now
        )
        result.delivered, result.retry = len(delivered), len(retry)
        self._grow()

    async def _only_dead(self, batch: _Batch, now: datetime, result: DrainResult) -> None:
        result.dead = await db.run_sync(
            self._store.connection, self._record, [], batch.dead, [], now
        )

    async def drain_once(self) -> DrainResult:
        """Send one bundle of due items; returns what happened. Never raises for the link.

        One bundle only: an item failing alone again is not set aside here (:meth:`drain`)."""
        result = DrainResult(batch_size=self._batch_size)
        batch, now = await self._prepare()
        if batch is None:
            return result
        if not batch.ready:
            await self._only_dead(batch, now, result)
            return result
        try:
            response = await self._send(batch)
        except UpstreamError as exc:
            await self._on_bundle_failure(exc, batch.ready, list(batch.dead), result)
            return result
        await self._settle(batch, response, result)
        return result

    def _grow(self) -> None:
        """A bundle went through: grow back towards the maximum, below a known refusal."""
        ceiling = self._max_entries
        if self._too_large_at is not None:
            self._fits_since += 1
            if self._fits_since >= _TOO_LARGE_MEMORY:
                self._too_large_at = None
            else:
                ceiling = min(ceiling, self._too_large_at - 1)
        self._batch_size = max(self._batch_size, min(ceiling, self._batch_size * 2))

    async def _on_bundle_failure(
        self,
        exc: UpstreamError,
        ready: list[tuple[Item, Outgoing]],
        dead: list[tuple[Item, str]],
        result: DrainResult,
    ) -> bool:
        """Act on a bundle that failed as a whole; whether it held one item that had failed
        before (bisected down to it, :meth:`_failed_whole`): :meth:`drain` then asks whether
        the server is up, to tell that item's doing from an outage."""
        conn = self._store.connection
        now = self._clock()  # the exchange has just failed
        result.error = str(exc)
        if exc.failure is Failure.TOO_LARGE and len(ready) > 1:
            self._batch_size = max(1, len(ready) // 2)
            self._too_large_at = min(len(ready), self._too_large_at or len(ready))
            self._fits_since = 0
            logger.info(
                "upstream refused a bundle of %d as too large; now sending %d",
                len(ready),
                self._batch_size,
            )
            if dead:
                result.dead = await db.run_sync(conn, self._record, [], dead, [], now)
            return False
        if exc.failure is Failure.PERMANENT and len(ready) > 1:
            # The whole bundle was refused: send one at a time to find the entry at fault.
            self._batch_size = 1
            if dead:
                result.dead = await db.run_sync(conn, self._record, [], dead, [], now)
            return False
        if exc.failure in (Failure.PERMANENT, Failure.TOO_LARGE):
            dead.extend((item, exc.message) for item, _ in ready)
            result.dead = await db.run_sync(conn, self._record, [], dead, [], now)
            return False
        # Transient, ambiguous, auth, endpoint: the exchange failed, not (as far as we know)
        # the items. Nothing is written to their rows (they stay due, in order; an answer lost
        # is waited out, _failed_whole); the caller paces the next attempt.
        result.link_down = True
        result.unreachable = exc.failure is Failure.TRANSIENT and isinstance(
            exc.__cause__, httpx.TransportError
        )
        result.retry_after_s = exc.retry_after_s
        if exc.failure is Failure.AMBIGUOUS:
            result.ambiguous = len(ready)
            # A timeout may be the bundle's size: resend smaller, grow back on success.
            self._batch_size = max(1, len(ready) // 2)
        items = [item for item, _ in ready]
        again = await db.run_sync(conn, self._failed_whole, items, exc, now)
        if dead:
            result.dead = await db.run_sync(conn, self._record, [], dead, [], now)
        return again

    async def _server_up(self) -> bool:
        """Whether the upstream answers ``GET metadata`` with a CapabilityStatement (2xx):
        it is up, so a bundle it just failed was that bundle's doing. No answer, another
        status or another body: not known to be up (an outage, a login page in front)."""
        try:
            response = await exchange(self._client, "GET", "metadata")
        except UpstreamError:
            return False
        body = response_json(response) if 200 <= response.status_code < 300 else None
        return as_dict(body).get("resourceType") == "CapabilityStatement"

    async def _set_aside(self, item: Item, exc: UpstreamError, result: DrainResult) -> None:
        """The server is up and failed ``item`` alone, again: it waits out a per-item backoff
        (never shorter than the wait of an answer lost), counted, its last error in the
        server's words (sealed), shown by :func:`failing_items`; alone when due again. Never
        a dead letter: a 5xx, a 403 or no answer says nothing against the item itself."""
        now = self._clock()
        delay = backoff_s(item.attempts, self._rng)
        if exc.failure is Failure.AMBIGUOUS:
            delay = max(delay, self._unsure_s)
        message = f"the upstream failed every bundle with it, alone too, and is up: {exc}"
        await db.run_sync(
            self._store.connection, self._record, [], [], [], now, [(item, message, delay)]
        )
        result.retry += 1
        result.link_down = result.unreachable = False
        result.retry_after_s = None
        logger.warning(
            "upstream failed outbox item %d alone again (%s) and is up; it waits out a backoff",
            item.outbox_id,
            failure_class(str(exc)),
        )

    def _failed_whole(
        self, conn: sqlite3.Connection, items: list[Item], exc: UpstreamError, now: datetime
    ) -> bool:
        """Note a bundle that failed as a whole; whether its one item had failed before.

        Its answer lost (ambiguous): its items are not due before a request timeout from now,
        the server may be applying the request still (a conditional create is not atomic
        under concurrent requests on HAPI #3141, Microsoft's FHIR server #1382 or Medplum
        #4234, so a resend that overtook it could create a second copy); no attempt is
        counted, nothing was answered. The wait is kept in the row (``unsure_until``), so
        "sync now" leaves it alone in any process (:meth:`make_due`). They then go in bundles
        of half the size (it may have been the size that took too long).

        Failed in a way one entry may have caused (:func:`_may_be_an_entry`): its items go
        again as they were the first time (a passing fault), then in bundles halved at each
        failure, until each gets an answer: bisection, so one item that makes the server or
        a filter in front of it fail the whole bundle ends up alone, and the rest flows.
        """
        ids = [item.outbox_id for item in items]
        ambiguous = exc.failure is Failure.AMBIGUOUS
        if ambiguous:
            until = _iso(now + timedelta(seconds=self._unsure_s))
            with db.transaction_sync(conn):
                conn.execute(
                    "UPDATE outbox SET next_attempt_at = ?, unsure_until = ? "
                    "WHERE id IN (SELECT value FROM json_each(?)) AND state = 'pending'",
                    (until, until, orjson.dumps(ids).decode()),
                )
        if not (ambiguous or _may_be_an_entry(exc)):
            return False
        again = len(ids) == 1 and ids[0] in self._caps
        if len(self._caps) > _REF_CACHE_MAX:
            self._caps.clear()  # bounded; forgetting costs only a bigger bundle failing again
        for oid in ids:
            seen = oid in self._caps
            cap = len(ids) // 2 if seen or ambiguous else len(ids)
            self._caps[oid] = max(1, min(cap, self._caps.get(oid, cap)))
        return again

    async def drain(
        self,
        *,
        max_bundles: int = 1000,
        stop: Callable[[], bool] = lambda: False,
        on_bundle: Callable[[DrainResult], None] | None = None,
    ) -> DrainResult:
        """Drain until nothing is due, the link fails, ``max_bundles`` were sent, or ``stop()``.

        ``stop`` is asked before each bundle goes out (the process is shutting down): the
        bundle on the wire is waited for and its answer committed, nothing more is sent, so a
        stop takes one exchange however long the queue. That holds for a bundle sent ahead
        too: a stop that arrives while *k*'s answer is being committed and *k+1* already
        travels waits for *k+1*'s answer, so after a clean stop nothing the server applied is
        left pending here.

        ``on_bundle`` is told each bundle's outcome once it is committed (the sync process
        says "online" from the first one, not only when a long catch-up is over).

        Pipelined, one bundle ahead: while bundle *k* is on the wire the next one is read and
        planned (its items, and those pointing at *k*'s, left out); once *k*'s answer is in,
        *k+1* goes out at once and *k*'s outcomes are committed while it travels. So *k+1* is
        never sent before *k* succeeded, and the database work overlaps the network instead of
        adding to it. Nothing else changes: each answer is committed as it comes, a failure
        drops the bundle read ahead (unsent, still pending).

        An item that fails alone, having failed before (bisected down to it), makes the drain
        ask the server whether it is up (``GET metadata``): up, the server fails only that
        item, which is set aside (:meth:`_set_aside`) and the drain goes on; not up, it is an
        outage: nothing written, ``link_down``. Once :data:`_MAX_ISOLATED` items set aside
        before failed again in a drain, the others set aside wait for the next drain.
        """
        total = DrainResult()
        send: asyncio.Task[dict[str, Any]] | None = None
        retried = 0  # items set aside before, sent again and failed again
        try:
            batch, now = await self._prepare(forget_held=True)
            sent = 0
            while batch is not None and sent < max_bundles:
                if send is None and stop():
                    break  # a bundle already on the wire is waited for, below
                step = DrainResult()
                if not batch.ready:
                    if batch.dead:
                        await self._only_dead(batch, now, step)
                        _add(total, step)
                    if not step.dead and not batch.more:
                        # Everything due waits for something not due yet, or for the
                        # bundle in flight.
                        break
                    batch, now = await self._prepare()
                    continue
                if send is None:
                    send = self._send(batch)
                sent += 1
                ahead: _Batch | None = None
                if sent < max_bundles and not stop():
                    ahead, ahead_now = await self._prepare(batch.taken)
                try:
                    response = await send
                except UpstreamError as exc:
                    send = None
                    again = await self._on_bundle_failure(exc, batch.ready, list(batch.dead), step)
                    if again:
                        [(item, _)] = batch.ready
                        retried += item.outbox_id in self._aside
                        if await self._server_up():
                            await self._set_aside(item, exc, step)
                        # Enough of them for one round: the next drain takes the next ones.
                        self._aside_barred = retried >= _MAX_ISOLATED
                    _add(total, step)
                    if step.link_down:
                        break
                    batch, now = await self._prepare()  # the size changed: plan again
                    continue
                send = None
                stopping = stop()
                if ahead is not None and ahead.ready and not stopping:
                    send = self._send(ahead)
                await self._settle(batch, response, step)
                _add(total, step)
                if on_bundle is not None:
                    on_bundle(step)
                if stopping:
                    break
                if ahead is not None and ahead.ready:
                    batch, now = ahead, ahead_now
                else:
                    # Nothing read ahead, or only items waiting for this bundle's answers.
                    batch, now = await self._prepare()
        finally:
            self._aside_barred = False
            if send is not None:
                # Never sent for good (stopped, or an error): the items stay pending, and a
                # request that did reach the server is harmless to resend.
                send.cancel()
                with contextlib.suppress(asyncio.CancelledError, UpstreamError):
                    await send
        total.batch_size = self._batch_size
        return total

    async def make_due(self) -> int:
        """Cancel every per-item backoff ("sync now"); returns how many rows were waiting.

        Not the wait of items whose answer was lost a moment ago (``unsure_until``, written
        by any process): the server may be applying that request still, and a resend now
        could make a second copy. Such an item is due when that wait ends, whatever backoff
        it had on top.
        """

        def work(conn: sqlite3.Connection) -> int:
            # The wait stands while it is ahead, but not beyond the horizon (a clock set back).
            bounds = due_bounds(_iso(self._clock()))
            standing = "CASE WHEN unsure_until > ? AND unsure_until <= ? THEN unsure_until END"
            with db.transaction_sync(conn):
                cursor = conn.execute(
                    f"UPDATE outbox SET next_attempt_at = {standing} "  # noqa: S608 - constant
                    "WHERE state = 'pending' AND next_attempt_at IS NOT NULL "
                    f"AND next_attempt_at IS NOT {standing}",
                    (*bounds, *bounds),
                )
            self._forget_held()  # everything is due now
            return int(cursor.rowcount)

        return await db.run_sync(self._store.connection, work)
