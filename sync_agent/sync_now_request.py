"""The "sync now" request: a ``meta`` row the sync process watches, whose new value makes it
skip its backoff and try at once. An admin writes it from the ``/sync`` page, and a resend of
dead letters with it (:func:`sync_agent.dead_letters.resend_dead_letters`); the status views
show the last one.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime

from appliance import audit, db
from appliance.audit import AuditAction, AuditEvent

SYNC_NOW_KEY = "sync_now"
"""``meta`` key the sync process watches: a new value makes it skip its backoff."""


def write_sync_now(conn: sqlite3.Connection, now: datetime) -> str:
    """Write the ``sync_now`` request, inside the caller's transaction; its value."""
    value = now.isoformat()
    db.set_meta(conn, SYNC_NOW_KEY, value)
    return value


def request_sync_now(conn: sqlite3.Connection, actor: str, now: datetime) -> str:
    """Write the ``sync_now`` request and its audit record in one transaction; its value."""
    with db.transaction_sync(conn):
        value = write_sync_now(conn, now)
        audit.append(
            conn,
            [AuditEvent(actor, AuditAction.SYNC, entity="outbox", detail="sync now requested")],
            now=now,
        )
    return value
