"""Upstream records the pull left out as twins: they carry the identifier of a record held
here under another upstream id (a merge at the EHR, or a copy).

The pull notes them (:func:`note_twins`, inside its import transaction) in a ``meta`` row,
newest last; the status views list them (:func:`read_twins`) and an admin clears the list
once the EHR team has looked at the records (:func:`clear_twins`, audited). No PHI:
references only.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from appliance import audit, db
from appliance.audit import AuditAction, AuditEvent


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
