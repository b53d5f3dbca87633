"""A bundle's outcomes as recorded: outbox rows delivered, dead or due again, and their audit.

:func:`record_outcomes` commits them in one transaction (on the database thread); the
messages kept are sealed (:func:`seal`), since the server's words may quote what it refused.
Dead-letter messages of items never sent: :data:`UNREADABLE` (a stored copy that fails
authentication) and :data:`DEAD_DEPENDENCY` (a Patient refused upstream).
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta

import orjson

from appliance import audit, db
from appliance.audit import AuditAction, AuditEvent, Outcome
from appliance.keys import Keyring
from appliance.store import Store
from sync_agent.outbox_schedule import iso
from sync_agent.outgoing import Item

ACTOR = "service:sync"
DEAD_DEPENDENCY = "depends on a Patient that was dead-lettered"
# A stored copy that fails authentication cannot be sent (we do not know what it said); it
# is dead-lettered instead of stopping the drain, and the rest flows.
UNREADABLE = (
    "the stored copy failed authentication (altered on disk, or sealed with a key this box "
    "does not hold) and was not sent; restore it from a backup or enter it again"
)
UNREADABLE_AUDIT = "stored copy failed authentication; not sent (dead letter)"


def patient_still_dead(conn: sqlite3.Connection, item: Item) -> bool:
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


def record_outcomes(
    conn: sqlite3.Connection,
    store: Store,
    delivered: list[tuple[Item, str | None]],
    dead: list[tuple[Item, str]],
    retry: list[tuple[Item, str, float]],
    now: datetime,
    isolated: list[tuple[Item, str, float]] | None = None,
) -> list[tuple[Item, str]]:
    """Commit a bundle's outcomes and its items refused without sending (or an item set
    aside, ``isolated``: as ``retry``, and sent alone when due again); returns those
    dead-lettered."""
    stamp = iso(now)
    with db.transaction_sync(conn):
        # Messages to seal (nearly never, in a drain): a data-key rotation committed
        # meanwhile is seen first.
        keyring = store.current_keyring(conn) if dead or retry or isolated else None
        # Planned dead for a dead-lettered Patient, which staff may have sent again
        # since (dead_letters.resend_dead_letters): such an item stays due, and goes after it.
        dead = [
            (item, message)
            for item, message in dead
            if message != DEAD_DEPENDENCY or patient_still_dead(conn, item)
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
            [(seal(keyring, item, message), item.outbox_id) for item, message in dead],
        )
        # An entry answered (retry) goes in bundles again; one set aside goes alone.
        conn.executemany(
            "UPDATE outbox SET last_error = ?, attempts = attempts + 1, next_attempt_at = ?, "
            "alone = ? WHERE id = ? AND state = 'pending'",
            [
                (
                    seal(keyring, item, message),
                    iso(now + timedelta(seconds=delay)),
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
    return dead


def seal(keyring: Keyring | None, item: Item, message: str) -> bytes:
    """An outcome's message as stored: sealed with the current data key, bound to the row."""
    # The server's diagnostics may quote what it refused (names, identifiers): PHI,
    # so the message is stored encrypted like the resource itself (see error_message).
    assert keyring is not None  # loaded by record_outcomes whenever there is a message
    return keyring.seal("outbox", str(item.outbox_id), message)
