"""Dead letters: outbox items the upstream refused, which staff read and send again.

Dead-letter messages are the upstream's own words and may quote the refused data (PHI), so
they are stored sealed; :func:`open_dead_letter_messages` opens them only on request and
records an audit record per message, in the patient's name, before returning any of them.
:func:`resend_dead_letters` puts them back in the outbox once the cause is fixed. An update
held for the review queue is no dead letter (:data:`IN_REVIEW`): it is decided there.
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
from appliance.keys import KeySource, keyring_of
from appliance.store import queued_at
from sync_agent.sync_now_request import write_sync_now

DEAD_LETTERS_SHOWN = 50
# An outbox row (alias ``o``) held for the review queue (an update the upstream's changes
# overtook): counted and decided there, never a dead letter, never sent again from them.
IN_REVIEW = "EXISTS (SELECT 1 FROM review_queue q WHERE q.outbox_id = o.id)"


@dataclass(frozen=True, slots=True)
class Resent:
    """What :func:`resend_dead_letters` did, by outbox id."""

    resent: tuple[int, ...]
    in_review: tuple[int, ...]  # held for the review queue (decided there): left as is
    missing: tuple[int, ...]  # asked for, and not a dead letter (any more)


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
            write_sync_now(conn, now)
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
        f"SELECT o.id, r.type, r.patient_key, {IN_REVIEW}, o.kind FROM outbox o "  # noqa: S608 - constant
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
