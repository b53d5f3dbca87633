"""Outbox items the upstream keeps answering with an error: the status's "Failing items".

Such an item is never dead-lettered (a 401/403 is our access, a 5xx, 429 or no answer says
nothing against it, and an item set aside is the server's doing as far as we know): it is
sent again with backoff for as long as it lasts (:mod:`sync_agent.outbox_delivery`), and
this is how staff get to see it: ``sync status``, the ``/sync`` page and
``appliance_outbox_failing_items``.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from datetime import datetime

from appliance import audit, db
from appliance.audit import AuditAction, AuditEvent
from appliance.errors import TamperedDataError
from appliance.keys import KeySource, keyring_of


@dataclass(frozen=True, slots=True)
class FailingItems:
    """Pending outbox rows the upstream keeps answering with an error: ``count`` of them, and
    the oldest (lowest outbox id) with its type, attempts and last error, sealed.

    Such an item is never dead-lettered (a 401/403 is our access, a 5xx, 429 or no answer
    says nothing against it): it is sent again with backoff for as long as it lasts, and
    this is how staff get to see it.
    """

    count: int
    oldest: int | None = None
    type: str | None = None
    attempts: int = 0
    # The server's words, which may quote what it refused (PHI): opened on demand, audited.
    sealed: bytes | str | None = field(default=None, repr=False)
    patient_key: bytes | None = field(default=None, repr=False)

    def open_message(
        self, conn: sqlite3.Connection, keyring: KeySource, *, actor: str, now: datetime
    ) -> str | None:
        """The oldest one's last error in clear (None when there is none), with a ``read``
        audit record of the opening committed first, as for a dead letter's message
        (``dead_letters.open_dead_letter_messages``)."""
        if self.oldest is None or self.sealed is None:
            return None
        if isinstance(self.sealed, str):
            message = self.sealed
        else:
            try:
                message = keyring_of(keyring, conn).unseal("outbox", str(self.oldest), self.sealed)
            except TamperedDataError:
                message = "(the message could not be opened)"
        event = AuditEvent(
            actor,
            AuditAction.READ,
            patient_key=self.patient_key,
            entity=f"outbox/{self.oldest}",
            detail="failing item's message opened",
        )
        with db.transaction_sync(conn):
            audit.append(conn, [event], now=now)
        return message


def failing_items(conn: sqlite3.Connection, *, min_attempts: int = 3) -> FailingItems:
    """Pending rows (creates and updates) sent at least ``min_attempts`` times that still
    carry an error (a delivery clears it). For the status; read-only.

    Through the index ``outbox_failing``, which holds only the waiting rows that carry an
    error (named: with no rows in it when ANALYZE ran, the planner took the index of every
    waiting row instead, 20 ms a scrape at 100,000 waiting after a long outage).
    """
    count, oldest = conn.execute(
        "SELECT count(*), min(id) FROM outbox INDEXED BY outbox_failing "
        "WHERE state = 'pending' AND last_error IS NOT NULL AND attempts >= ?",
        (min_attempts,),
    ).fetchone()
    if not count:
        return FailingItems(0)
    rtype, attempts, sealed, patient_key = conn.execute(
        "SELECT r.type, o.attempts, o.last_error, r.patient_key FROM outbox o "
        "JOIN resources r ON r.id = o.resource_id WHERE o.id = ?",
        (oldest,),
    ).fetchone()
    return FailingItems(
        int(count),
        int(oldest),
        str(rtype),
        int(attempts),
        sealed if sealed is None or isinstance(sealed, str) else bytes(sealed),
        None if patient_key is None else bytes(patient_key),
    )
