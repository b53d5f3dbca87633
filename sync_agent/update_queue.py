"""The database thread's side of the version-checked updates (:mod:`sync_agent.updates`).

:class:`UpdateQueue` loads the due update rows, each with its resource as stored now and the
body that goes upstream (upstream ids, without the narrative of the version before the edit),
dead-letters a row whose resource no longer opens, and records what an exchange ended in, one
transaction each: delivered (the link's new version kept, a later edit queued on top), set
aside as a dead letter or held for a nurse's review, or retried after a delay.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from appliance import audit, db, fhir
from appliance.audit import AuditAction, AuditEvent, Outcome
from appliance.errors import TamperedDataError
from appliance.store import (
    Store,
    UpstreamLink,
    link_for_resource,
    queued_at,
    rewrite_references,
    save_link,
)
from sync_agent.outbox_outcomes import UNREADABLE, UNREADABLE_AUDIT
from sync_agent.outbox_schedule import DUE_SQL, due_bounds
from sync_agent.review_queue import ACTOR, Conflict, open_review, patient_key
from sync_agent.update_versions import to_upstream
from sync_agent.upstream import as_dict

logger = logging.getLogger(__name__)

_CREATE_PENDING = (
    "EXISTS (SELECT 1 FROM outbox c WHERE c.resource_id = o.resource_id "
    "AND c.kind = 'create' AND c.state = 'pending')"
)
_LOAD_SQL = (
    "SELECT o.id, o.lane, o.attempts, o.busy_409s, o.if_match, r.id, r.logical_id, r.type, "  # noqa: S608 - constants
    "r.key_version, r.body FROM outbox o JOIN resources r ON r.id = o.resource_id "
    "WHERE o.state = 'pending' AND o.kind = 'update' "
    f"AND {DUE_SQL} AND NOT {_CREATE_PENDING} ORDER BY o.id LIMIT ?"
)
# Updates whose resource's create has not landed yet: counted, not loaded (20 of them loaded
# first on every pass held back every due update behind them).
_WAITING_SQL = (
    "SELECT count(*) FROM outbox o "  # noqa: S608 - constants
    f"WHERE o.state = 'pending' AND o.kind = 'update' AND {_CREATE_PENDING}"
)


@dataclass(frozen=True, slots=True)
class UpdateRow:
    """A due update row, its resource as read (local ids) and as it goes upstream."""

    outbox_id: int
    lane: int
    attempts: int  # every try, whatever ended it
    busy_409s: int  # the 409s on a version nobody changed among them
    if_match: str | None
    resource_id: int
    logical_id: str
    type: str
    blob: bytes  # the ciphertext as read: a later edit changes it
    resource: fhir.FhirJson  # local ids
    outgoing: fhir.FhirJson | None  # upstream ids; None without an upstream id
    link: UpstreamLink | None
    create_state: str | None


class UpdateQueue:
    """The update rows of one store, loaded and recorded on the database thread."""

    def __init__(self, store: Store, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._clock = clock

    def load(
        self, conn: sqlite3.Connection, now: str, limit: int
    ) -> tuple[list[UpdateRow], int, int]:
        """The due updates whose create has landed, how many were dead-lettered as unreadable
        (see below), and how many wait for their create."""
        rows = []
        unreadable: list[tuple[int, str]] = []
        for outbox_id, lane, attempts, busy_409s, if_match, *resource_row in conn.execute(
            _LOAD_SQL, (*due_bounds(now), limit)
        ).fetchall():
            try:
                stored = self._store.decrypt_stored(conn, tuple(resource_row))
            except TamperedDataError:
                # What it said is unknown, so it cannot go up; it must not hold back the
                # updates behind it (nor, by failing the round, the pull and audit export).
                unreadable.append((outbox_id, f"{resource_row[2]}/{resource_row[1]}"))
                continue
            link = link_for_resource(conn, stored.row_id)
            create = conn.execute(
                "SELECT state FROM outbox WHERE resource_id = ? AND kind = 'create' "
                "ORDER BY id DESC LIMIT 1",
                (stored.row_id,),
            ).fetchone()
            outgoing = None
            if link is not None:
                outgoing = rewrite_references(stored.resource, lambda ref: to_upstream(conn, ref))
                outgoing["id"] = link.upstream_ref.partition("/")[2]
                # The narrative is of the version before the edit (the old name, the old
                # phone): the EHR would show it as if current. Left out, the server makes
                # its own from the data, or has none. Not one that says more than the data
                # ("additional": an interpreter needed, say): a PUT replaces the whole
                # resource, and leaving it out would delete that at the EHR.
                if as_dict(outgoing.get("text")).get("status") != "additional":
                    outgoing.pop("text", None)
                meta = outgoing.pop("meta", None)
                if isinstance(meta, dict) and meta.get("tag"):
                    outgoing["meta"] = {"tag": meta["tag"]}
            rows.append(
                UpdateRow(
                    outbox_id,
                    lane,
                    attempts,
                    busy_409s,
                    if_match,
                    stored.row_id,
                    stored.logical_id,
                    stored.type,
                    bytes(resource_row[4]),
                    stored.resource,
                    outgoing,
                    link,
                    None if create is None else str(create[0]),
                )
            )
        if unreadable:
            self._dead_unreadable(conn, unreadable)
        return rows, len(unreadable), int(conn.execute(_WAITING_SQL).fetchone()[0])

    def _dead_unreadable(self, conn: sqlite3.Connection, rows: list[tuple[int, str]]) -> None:
        with db.transaction_sync(conn):
            keyring = self._store.current_keyring(conn)  # a rotation seen before sealing
            for outbox_id, _entity in rows:
                conn.execute(
                    "UPDATE outbox SET state = 'dead', last_error = ?, attempts = attempts + 1 "
                    "WHERE id = ? AND state = 'pending'",
                    (keyring.seal("outbox", str(outbox_id), UNREADABLE), outbox_id),
                )
            audit.append(
                conn,
                [
                    AuditEvent(
                        ACTOR,
                        AuditAction.SYNC,
                        outcome=Outcome.FAILURE,
                        entity=entity,
                        detail=f"update: {UNREADABLE_AUDIT}",
                    )
                    for _, entity in rows
                ],
                now=self._clock(),
            )

    # -- recording outcomes (on the database thread, one transaction each) ---------------

    def delivered(
        self,
        conn: sqlite3.Connection,
        row: UpdateRow,
        ref: str,
        version: str | None,
        updated: str | None,
        now: datetime,
    ) -> None:
        """Record the row delivered to ``ref`` and the link's new ``version``, audited; an
        edit saved while it was on the wire is queued to go next, on top."""
        assert row.link is not None
        stamp = fhir.utc_text(now)
        with db.transaction_sync(conn):
            conn.execute(
                "UPDATE outbox SET state = 'delivered', upstream_ref = ?, delivered_at = ?, "
                "attempts = attempts + 1, last_error = NULL WHERE id = ? AND state = 'pending'",
                (ref, stamp, row.outbox_id),
            )
            save_link(conn, row.link, version_id=version, last_updated=updated, now=stamp)
            blob = conn.execute(
                "SELECT body FROM resources WHERE id = ?", (row.resource_id,)
            ).fetchone()[0]
            pending = conn.execute(
                "SELECT 1 FROM outbox WHERE resource_id = ? AND kind = 'update' "
                "AND state = 'pending'",
                (row.resource_id,),
            ).fetchone()
            if bytes(blob) != row.blob and pending is None:
                # Edited again while this one was on the wire: that edit goes next, on top.
                conn.execute(
                    "INSERT INTO outbox (lane, resource_id, kind, if_match, queued_at) "
                    "VALUES (?, ?, 'update', ?, ?)",
                    (row.lane, row.resource_id, version, queued_at(now)),
                )
            event = AuditEvent(
                ACTOR,
                AuditAction.SYNC,
                patient_key=patient_key(self._store, row.type, row.logical_id),
                entity=f"{row.type}/{row.logical_id}",
                detail=f"updated upstream {ref}",
            )
            audit.append(conn, [event], now=now)

    def dead(
        self,
        conn: sqlite3.Connection,
        row: UpdateRow,
        message: str,
        conflict: Conflict | None,
        now: datetime,
    ) -> None:
        """Set the row aside with ``message`` (sealed), audited; with a ``conflict``, open a
        review of both versions for a nurse."""
        key = patient_key(self._store, row.type, row.logical_id)
        entity = f"{row.type}/{row.logical_id}"
        with db.transaction_sync(conn):
            keyring = self._store.current_keyring(conn)  # a rotation seen before sealing
            conn.execute(
                "UPDATE outbox SET state = 'dead', last_error = ?, attempts = attempts + 1 "
                "WHERE id = ? AND state = 'pending'",
                (keyring.seal("outbox", str(row.outbox_id), message), row.outbox_id),
            )
            events = [
                AuditEvent(
                    ACTOR,
                    AuditAction.SYNC,
                    outcome=Outcome.FAILURE,
                    patient_key=key,
                    entity=entity,
                    detail="update refused upstream"
                    + (" (conflict: held for review)" if conflict else " (dead letter)"),
                )
            ]
            if conflict is not None:
                assert row.link is not None
                mine = self._as_stored_now(conn, row)
                review_id = open_review(
                    conn,
                    keyring,
                    resource_id=mine.resource_id,
                    outbox_id=mine.outbox_id,
                    upstream_ref=row.link.upstream_ref,
                    mine=mine.resource,
                    conflict=conflict,
                    stamp=fhir.utc_text(now),
                )
                events.append(
                    AuditEvent(
                        ACTOR,
                        AuditAction.CREATE,
                        patient_key=key,
                        entity=f"review/{review_id}",
                        detail=entity,
                    )
                )
            audit.append(conn, events, now=now)

    def _as_stored_now(self, conn: sqlite3.Connection, row: UpdateRow) -> UpdateRow:
        """``row`` with the resource as stored now (inside the transaction opening a review).

        An edit saved while the refused update was on the wire rides on the same outbox row
        (as in :meth:`delivered`), so it is what the nurse's decision keeps or replaces: the
        review must show it, not the version read before the PUT.
        """
        found = conn.execute(
            "SELECT id, logical_id, type, key_version, body FROM resources WHERE id = ?",
            (row.resource_id,),
        ).fetchone()
        if found is None or bytes(found[4]) == row.blob:
            return row
        try:
            stored = self._store.decrypt_stored(conn, tuple(found))
        except TamperedDataError:
            # Unreadable now: the review keeps the last version that could be read; the
            # update itself is dead-lettered as unreadable if it is ever sent again.
            logger.warning(
                "resource row %s failed authentication while its conflict was recorded; "
                "the review shows the version read before the update was sent",
                row.resource_id,
            )
            return row
        return replace(row, blob=bytes(found[4]), resource=stored.resource)

    def retry(
        self,
        conn: sqlite3.Connection,
        row: UpdateRow,
        message: str,
        delay: float,
        now: datetime,
        busy: bool = False,
    ) -> None:
        """Have the row wait ``delay`` seconds with ``message`` (sealed); ``busy``: a 409 on
        a version nobody changed, counted apart (``busy_409s``)."""
        with db.transaction_sync(conn):
            sealed = self._store.current_keyring(conn).seal("outbox", str(row.outbox_id), message)
            conn.execute(
                "UPDATE outbox SET last_error = ?, attempts = attempts + 1, next_attempt_at = ?, "
                "busy_409s = busy_409s + ? WHERE id = ? AND state = 'pending'",
                (sealed, fhir.utc_text(now + timedelta(seconds=delay)), int(busy), row.outbox_id),
            )


def keep_location(conn: sqlite3.Connection, resource_id: int, ref: str) -> None:
    """The upstream id of a create answered without one, learnt by our identifier."""
    with db.transaction_sync(conn):
        conn.execute(
            "UPDATE outbox SET upstream_ref = ? WHERE resource_id = ? AND kind = 'create' "
            "AND state = 'delivered' AND upstream_ref IS NULL",
            (ref, resource_id),
        )
