"""Break-glass: time-limited emergency access to a record outside normal access.

HIPAA 164.312(a)(2)(ii) emergency access procedure; ONC 170.315(d)(6) emergency access.

**Normal access** on this appliance (docs/security.md): a nurse works with the patients
of her clinic day, so she may open the record of a patient who

* is checked in at one of this site's stations today (local day of the site), or still
  checked in, or
* is enrolled in remote monitoring (on the RPM worklist).

Anyone else — a patient who calls the clinic, someone brought in before check-in, a
colleague's patient — needs **break-glass**: the nurse finds the patient by family name
and birth date (blind index, never a list), gives a reason (a category and free text),
and gets :data:`GRANT_MINUTES` of access to that one record. The grant, and every access
made under it, is audited with the marker ``break-glass grant <id>``; the reason is kept
sealed (it may hold clinical facts) and shown to administrators beside the audit report.

Functions take a raw connection and run on the database thread.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from appliance import audit, db
from appliance.audit import AuditAction, AuditEvent
from appliance.errors import TamperedDataError
from appliance.fhir import utc_text
from appliance.keys import Keyring, KeySource, keyring_of

logger = logging.getLogger(__name__)

GRANT_MINUTES = 30
MIN_REASON_LENGTH = 10
MAX_REASON_LENGTH = 500
SEAL_LABEL = "break_glass.reason"  # also in key_rotation.SEALED_COLUMNS


class Category(StrEnum):
    """Why normal access is not enough (kept in clear in the audit detail: no PHI)."""

    EMERGENCY = "emergency care"
    PATIENT_CONTACT = "patient contacted the clinic"
    COVERING = "covering for a colleague"
    OTHER = "other"


class BreakGlassError(ValueError):
    """A grant could not be made as asked (the message is safe to show)."""


@dataclass(frozen=True, slots=True)
class Grant:
    """One break-glass grant."""

    id: int
    user_id: int
    username: str
    patient_id: str
    patient_key: bytes
    category: Category
    granted_at: datetime
    expires_at: datetime
    ended_at: datetime | None

    def active(self, now: datetime) -> bool:
        """Whether the grant still opens the record at ``now``."""
        return self.ended_at is None and now < self.expires_at

    @property
    def marker(self) -> str:
        """The audit detail every access under this grant carries."""
        return marker(self.id)


def marker(grant_id: int) -> str:
    """``break-glass grant <id>``: how the audit report recognises emergency access."""
    return f"break-glass grant {grant_id}"


CHECKED_IN_TODAY = "checked in today"
ENROLLED_IN_RPM = "enrolled in remote monitoring"
# The two ways normal access covers a patient, each a query for the patients it covers
# (one rule, used for one patient by normal_access and for all by normal_access_all).
_CHECKED_IN = (
    "SELECT patient_id FROM station_checkins WHERE (checked_in_at >= ? OR checked_out_at IS NULL)"
)
_ENROLLED = "SELECT patient_id FROM rpm_enrollment WHERE ended_at IS NULL"


def _midnight(now: datetime, zone: ZoneInfo) -> str:
    return utc_text(datetime.combine(now.astimezone(zone).date(), time(), tzinfo=zone))


def normal_access(
    conn: sqlite3.Connection, patient_id: str, *, now: datetime, zone: ZoneInfo
) -> str | None:
    """Why the staff may open this patient's record without break-glass, or None: the
    patient was checked in at a station today or is still checked in, or is enrolled in
    remote monitoring."""
    row = conn.execute(
        f"{_CHECKED_IN} AND patient_id = ? LIMIT 1", (_midnight(now, zone), patient_id)
    ).fetchone()
    if row is not None:
        return CHECKED_IN_TODAY
    if conn.execute(f"{_ENROLLED} AND patient_id = ? LIMIT 1", (patient_id,)).fetchone():
        return ENROLLED_IN_RPM
    return None


def normal_access_all(conn: sqlite3.Connection, *, now: datetime, zone: ZoneInfo) -> dict[str, str]:
    """:func:`normal_access` for every patient it covers at once (patient id → reason, in
    id order): two queries, whatever the number of patients."""
    reasons = {str(p): ENROLLED_IN_RPM for (p,) in conn.execute(_ENROLLED)}
    reasons.update(
        {str(p): CHECKED_IN_TODAY for (p,) in conn.execute(_CHECKED_IN, (_midnight(now, zone),))}
    )
    return dict(sorted(reasons.items()))


_GRANT_SELECT = (
    "SELECT g.id, g.user_id, u.username, g.patient_id, g.patient_key, g.category, "
    "g.granted_at, g.expires_at, g.ended_at FROM break_glass g JOIN users u ON u.id = g.user_id"
)


def _grant(row: Any) -> Grant:
    gid, uid, username, patient_id, key, category, granted, expires, ended = row
    return Grant(
        int(gid),
        int(uid),
        username,
        patient_id,
        bytes(key),
        Category(category),
        datetime.fromisoformat(granted),
        datetime.fromisoformat(expires),
        None if ended is None else datetime.fromisoformat(ended),
    )


def grant(
    conn: sqlite3.Connection,
    keyring: KeySource,
    *,
    user_id: int,
    actor: str,
    patient_id: str,
    category: Category | str,
    reason: str,
    now: datetime,
    minutes: int = GRANT_MINUTES,
) -> Grant:
    """Open ``patient_id``'s record to ``user_id`` for ``minutes``, audited with the reason."""
    try:
        checked = Category(category)
    except ValueError:
        raise BreakGlassError("choose why you need access") from None
    reason = reason.strip()
    if len(reason) < MIN_REASON_LENGTH:
        raise BreakGlassError(f"describe the reason in at least {MIN_REASON_LENGTH} characters")
    if len(reason) > MAX_REASON_LENGTH:
        raise BreakGlassError(f"keep the reason under {MAX_REASON_LENGTH} characters")
    key = keyring_of(keyring, conn).patient_key(f"Patient/{patient_id}")
    expires = now + timedelta(minutes=minutes)
    with db.transaction_sync(conn):
        cursor = conn.execute(
            "INSERT INTO break_glass (user_id, patient_id, patient_key, category, reason, "
            "granted_at, expires_at) VALUES (?,?,?,?,zeroblob(0),?,?)",
            (user_id, patient_id, key, checked.value, utc_text(now), utc_text(expires)),
        )
        grant_id = int(cursor.lastrowid or 0)
        conn.execute(
            "UPDATE break_glass SET reason = ? WHERE id = ?",
            (keyring_of(keyring, conn).seal(SEAL_LABEL, str(grant_id), reason), grant_id),
        )
        detail = f"{marker(grant_id)} opened: {checked.value}, {minutes} min"
        event = AuditEvent(
            actor,
            AuditAction.BREAK_GLASS,
            patient_key=key,
            entity=f"Patient/{patient_id}",
            detail=detail,
        )
        audit.append(conn, [event], now=now)
        row = conn.execute(_GRANT_SELECT + " WHERE g.id = ?", (grant_id,)).fetchone()
    return _grant(row)


def grant_by_id(conn: sqlite3.Connection, grant_id: int) -> Grant | None:
    """The grant with ``grant_id`` (active or not), or None."""
    row = conn.execute(_GRANT_SELECT + " WHERE g.id = ?", (grant_id,)).fetchone()
    return None if row is None else _grant(row)


def active_grant(
    conn: sqlite3.Connection, user_id: int, patient_id: str, *, now: datetime
) -> Grant | None:
    """``user_id``'s live grant for ``patient_id`` (what other views check), or None."""
    row = conn.execute(
        _GRANT_SELECT + " WHERE g.user_id = ? AND g.patient_id = ? AND g.ended_at IS NULL "
        "AND g.expires_at > ? ORDER BY g.id DESC LIMIT 1",
        (user_id, patient_id, utc_text(now)),
    ).fetchone()
    return None if row is None else _grant(row)


def grants_of(conn: sqlite3.Connection, user_id: int, *, now: datetime) -> list[Grant]:
    """``user_id``'s live grants, newest first."""
    rows = conn.execute(
        _GRANT_SELECT + " WHERE g.user_id = ? AND g.ended_at IS NULL AND g.expires_at > ? "
        "ORDER BY g.id DESC",
        (user_id, utc_text(now)),
    ).fetchall()
    return [_grant(row) for row in rows]


def end(conn: sqlite3.Connection, found: Grant, *, actor: str, now: datetime) -> None:
    """Close a grant before it expires (audited)."""
    with db.transaction_sync(conn):
        conn.execute(
            "UPDATE break_glass SET ended_at = ? WHERE id = ? AND ended_at IS NULL",
            (utc_text(now), found.id),
        )
        event = AuditEvent(
            actor,
            AuditAction.BREAK_GLASS,
            patient_key=found.patient_key,
            entity=f"Patient/{found.patient_id}",
            detail=f"{found.marker} closed",
        )
        audit.append(conn, [event], now=now)


@dataclass(frozen=True, slots=True)
class GrantWithReason:
    """A grant and its (unsealed) reason, for the administrator's review."""

    grant: Grant
    reason: str


def recent(
    conn: sqlite3.Connection, keyring: KeySource, *, since: datetime, limit: int = 50
) -> list[GrantWithReason]:
    """Grants made since ``since``, newest first, with their reasons (caller audits)."""
    rows = conn.execute(
        "SELECT g.id, g.user_id, u.username, g.patient_id, g.patient_key, g.category, "
        "g.granted_at, g.expires_at, g.ended_at, g.reason FROM break_glass g "
        "JOIN users u ON u.id = g.user_id WHERE g.granted_at >= ? ORDER BY g.id DESC LIMIT ?",
        (utc_text(since), limit),
    ).fetchall()
    ring = keyring_of(keyring, conn)
    return [GrantWithReason(_grant(tuple(row[:9])), _reason(ring, row)) for row in rows]


def _reason(keyring: Keyring, row: Sequence[Any]) -> str:
    """A grant's sealed reason; one that fails authentication is said to, not a failed report."""
    try:
        return keyring.unseal(SEAL_LABEL, str(row[0]), bytes(row[9]))
    except TamperedDataError:
        logger.error("break-glass grant %s: its sealed reason failed authentication", row[0])
        return "(the stored reason failed authentication)"
