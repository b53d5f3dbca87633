"""Signed, expiring, single-visit links for a remote provider (issue 6, provider view).

A remote provider has no staff account: a nurse issues a link for one arrival Encounter and
the link is the provider's credential for that visit only (``docs/provider.md``).

* The link carries a random 256-bit token; only its SHA-256 is stored (``visit_links``,
  migration 0012), like session tokens and kiosk pairing codes.
* It works for :data:`LINK_TTL` after issue, until revoked, and until the visit is
  completed, whichever comes first.
* The first browser to join binds it: the SHA-256 of that browser's random cookie is
  stored, and any other browser is refused.
* Everything done through a link is audited with the actor ``provider-link:<id>``
  (:func:`actor`) and the patient's pseudonymous key.

Functions take a raw connection and run on the database thread; the time is a parameter.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from appliance import audit, db
from appliance.audit import AuditAction, AuditEvent, Outcome
from appliance.fhir import utc_text

# Long enough for a provider to be paged and join a visit the same morning, short enough that
# a link forwarded by mistake is dead by the afternoon.
LINK_TTL = timedelta(hours=2)
TOKEN_BYTES = 32  # 256 bits: guessing is hopeless; the web layer throttles it anyway
PROVIDER_NAME_MAX = 100
_COLUMNS = (
    "id, encounter_id, patient_id, provider_name, issued_by, issued_at, expires_at, "
    "browser_hash, revoked_at, completed_at, finished_encounter_id, note_id, claim_outcome"
)


class LinkState(StrEnum):
    """Whether a link still opens its visit."""

    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"
    COMPLETED = "completed"


@dataclass(frozen=True, slots=True)
class VisitLink:
    """One issued link (no PHI: local ids, times, hashes, staff actors)."""

    id: int
    encounter_id: str
    patient_id: str
    provider_name: str
    issued_by: str
    issued_at: str
    expires_at: str
    browser_hash: bytes | None
    revoked_at: str | None
    completed_at: str | None
    finished_encounter_id: str | None
    note_id: str | None
    claim_outcome: str | None

    @property
    def actor(self) -> str:
        """The audit actor of everything done through this link."""
        return actor(self.id)

    def state(self, now: datetime) -> LinkState:
        """Revoked and completed win over expired: they say what a person did."""
        if self.completed_at is not None:
            return LinkState.COMPLETED
        if self.revoked_at is not None:
            return LinkState.REVOKED
        if utc_text(now) >= self.expires_at:
            return LinkState.EXPIRED
        return LinkState.ACTIVE


def actor(link_id: int) -> str:
    """``provider-link:<id>``: the audit actor of a link's provider."""
    return f"provider-link:{link_id}"


def token_hash(token: str) -> bytes:
    """The SHA-256 kept in place of a token (of a link or of a browser cookie)."""
    return hashlib.sha256(token.encode()).digest()


def _link(row: Any) -> VisitLink:
    return VisitLink(
        int(row[0]),
        str(row[1]),
        str(row[2]),
        str(row[3]),
        str(row[4]),
        str(row[5]),
        str(row[6]),
        None if row[7] is None else bytes(row[7]),
        row[8],
        row[9],
        row[10],
        row[11],
        row[12],
    )


def issue(
    conn: sqlite3.Connection,
    encounter_id: str,
    patient_id: str,
    *,
    issued_by: str,
    patient_key: bytes,
    now: datetime,
    provider_name: str = "",
) -> tuple[VisitLink, str]:
    """A new link for one arrival Encounter; returns it and the token (shown once)."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    name = " ".join(provider_name.split())[:PROVIDER_NAME_MAX]
    with db.transaction_sync(conn):
        cur = conn.execute(
            "INSERT INTO visit_links (token_hash, encounter_id, patient_id, provider_name, "
            "issued_by, issued_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                token_hash(token),
                encounter_id,
                patient_id,
                name,
                issued_by,
                utc_text(now),
                utc_text(now + LINK_TTL),
            ),
        )
        link_id = int(cur.lastrowid or 0)
        event = AuditEvent(
            issued_by,
            AuditAction.CREATE,
            patient_key=patient_key,
            entity=f"Encounter/{encounter_id}",
            detail=f"visit link {link_id} issued ({actor(link_id)}), {LINK_TTL} valid",
        )
        audit.append(conn, [event], now=now)
    found = by_id(conn, link_id)
    assert found is not None  # inserted a moment ago
    return found, token


def by_token(conn: sqlite3.Connection, token: str) -> VisitLink | None:
    """The link a token opens (whatever its state), or None for an unknown token."""
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM visit_links WHERE token_hash = ?",  # noqa: S608 - constant
        (token_hash(token),),
    ).fetchone()
    return None if row is None else _link(row)


def by_id(conn: sqlite3.Connection, link_id: int) -> VisitLink | None:
    """A link by its number."""
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM visit_links WHERE id = ?",  # noqa: S608 - constant
        (link_id,),
    ).fetchone()
    return None if row is None else _link(row)


def recent(conn: sqlite3.Connection, *, now: datetime, limit: int = 50) -> list[VisitLink]:
    """Links issued in the last day, newest first (for the nurse's list and the CLI)."""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM visit_links WHERE issued_at >= ? "  # noqa: S608 - constant
        "ORDER BY id DESC LIMIT ?",
        (utc_text(now - timedelta(days=1)), limit),
    ).fetchall()
    return [_link(r) for r in rows]


def bind(
    conn: sqlite3.Connection,
    link: VisitLink,
    browser: bytes,
    *,
    patient_key: bytes,
    now: datetime,
) -> bool:
    """Bind an unbound link to ``browser`` (a cookie's SHA-256); False if another has it.

    One conditional UPDATE, so two browsers racing to join cannot both win.
    """
    with db.transaction_sync(conn):
        cur = conn.execute(
            "UPDATE visit_links SET browser_hash = ?, bound_at = ? "
            "WHERE id = ? AND browser_hash IS NULL",
            (browser, utc_text(now), link.id),
        )
        won = cur.rowcount == 1
        if not won:
            row = conn.execute(
                "SELECT browser_hash FROM visit_links WHERE id = ?", (link.id,)
            ).fetchone()
            won = row is not None and row[0] is not None and bytes(row[0]) == browser
        event = AuditEvent(
            link.actor,
            AuditAction.LOGIN,
            outcome=Outcome.SUCCESS if won else Outcome.DENIED,
            patient_key=patient_key,
            entity=f"Encounter/{link.encounter_id}",
            detail="visit link joined" if won else "visit link already used by another browser",
        )
        audit.append(conn, [event], now=now)
    return won


def revoke(
    conn: sqlite3.Connection, link_id: int, *, by: str, patient_key: bytes, now: datetime
) -> bool:
    """Stop a link from working (audited); False when it was already revoked or completed."""
    with db.transaction_sync(conn):
        cur = conn.execute(
            "UPDATE visit_links SET revoked_at = ?, revoked_by = ? "
            "WHERE id = ? AND revoked_at IS NULL AND completed_at IS NULL",
            (utc_text(now), by, link_id),
        )
        done = cur.rowcount == 1
        if done:
            event = AuditEvent(
                by,
                AuditAction.CONFIG,
                patient_key=patient_key,
                entity=f"visit-link/{link_id}",
                detail="visit link revoked",
            )
            audit.append(conn, [event], now=now)
    return done


def mark_completed(
    conn: sqlite3.Connection,
    link_id: int,
    *,
    finished_encounter_id: str,
    note_id: str,
    now: datetime,
) -> bool:
    """Record that the visit was completed (the link stops working); False if it already was.

    Runs inside the caller's transaction.
    """
    cur = conn.execute(
        "UPDATE visit_links SET completed_at = ?, finished_encounter_id = ?, note_id = ? "
        "WHERE id = ? AND completed_at IS NULL AND revoked_at IS NULL",
        (utc_text(now), finished_encounter_id, note_id, link_id),
    )
    return cur.rowcount == 1


def record_claim_outcome(conn: sqlite3.Connection, link_id: int, outcome: str) -> None:
    """Keep the claims decision beside the link, for the nurse side to show."""
    with db.transaction_sync(conn):
        conn.execute("UPDATE visit_links SET claim_outcome = ? WHERE id = ?", (outcome, link_id))
