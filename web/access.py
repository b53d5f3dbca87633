"""Who may open a patient's record: the one access check of every patient page.

Staff (nurses, admins — admins follow the same rule — and providers) may open a patient's
record when **normal access** covers the patient (:func:`appliance.break_glass.normal_access`:
checked in at a station today or still checked in, or enrolled in remote monitoring) or when
they hold a live **break-glass grant** for that patient
(:func:`appliance.break_glass.active_grant`). Anything else is refused with
:class:`AccessDenied`, which the chart blueprint turns into a 403 page offering break-glass
(``web/chart.py``); the refusal is audited as ``denied``.

Every read a view makes after :func:`require_access` carries :attr:`Access.detail` in its
audit records, so the audit report tells emergency access (``break-glass grant <id>``)
from normal access.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from quart import abort

from appliance import audit, break_glass, db
from appliance.audit import AuditAction, AuditEvent, Outcome
from appliance.break_glass import Grant
from appliance.users import User
from web.app import app_state
from web.auth import current_session


@dataclass(frozen=True, slots=True)
class Access:
    """Why the current user may open ``patient_id``: a normal-access reason or a grant."""

    patient_id: str
    reason: str
    grant: Grant | None = None

    @property
    def detail(self) -> str:
        """The audit detail of every read made under this access."""
        if self.grant is not None:
            return self.grant.marker
        return f"normal access: {self.reason}"


class AccessDenied(Exception):
    """The current user may not open this patient's record (rendered as a 403 page)."""

    def __init__(self, patient_id: str, user: User) -> None:
        super().__init__("outside normal access")
        self.patient_id = patient_id
        self.user = user


def decide(
    conn: sqlite3.Connection, user_id: int, patient_id: str, *, now: datetime, zone: ZoneInfo
) -> Access | None:
    """The access ``user_id`` has to ``patient_id`` at ``now``, or None (database thread)."""
    reason = break_glass.normal_access(conn, patient_id, now=now, zone=zone)
    if reason is not None:
        return Access(patient_id, reason)
    grant = break_glass.active_grant(conn, user_id, patient_id, now=now)
    if grant is not None:
        return Access(patient_id, "break-glass", grant)
    return None


def _exists(conn: sqlite3.Connection, patient_id: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM resources WHERE type = 'Patient' AND logical_id = ?", (patient_id,)
    ).fetchone()
    return row is not None


def _refuse(
    conn: sqlite3.Connection, actor: str, patient_id: str, key: bytes, now: datetime
) -> None:
    with db.transaction_sync(conn):
        event = AuditEvent(
            actor,
            AuditAction.READ,
            outcome=Outcome.DENIED,
            patient_key=key,
            entity=f"Patient/{patient_id}",
            detail="outside normal access, no break-glass grant",
        )
        audit.append(conn, [event], now=now)


async def require_access(patient_id: str) -> Access:
    """The current user's access to ``patient_id``; 404 if unknown, :class:`AccessDenied` if none.

    Call it first in every view that shows one patient (after ``login_required``).
    """
    state = app_state()
    session = await current_session()
    assert session is not None  # login_required
    conn = state.store.connection
    now = state.clock()
    found = await db.run_sync(conn, decide, session.user.id, patient_id, now=now, zone=state.zone)
    if found is not None:
        return found
    if not await db.run_sync(conn, _exists, patient_id):
        abort(404)
    key = state.store.patient_key(f"Patient/{patient_id}")
    await db.run_sync(conn, _refuse, session.user.actor, patient_id, key, now)
    raise AccessDenied(patient_id, session.user)


def normally_visible(conn: sqlite3.Connection, *, now: datetime, zone: ZoneInfo) -> list[str]:
    """Every patient normal access covers at ``now`` (database thread), as ids: the
    patients of today's station check-ins (and those still checked in) and of current
    remote-monitoring enrolments (:func:`appliance.break_glass.normal_access_all`)."""
    return list(normal_access_reasons(conn, now=now, zone=zone))


def normal_access_reasons(
    conn: sqlite3.Connection, *, now: datetime, zone: ZoneInfo
) -> dict[str, str]:
    """:func:`normally_visible` with each patient's reason (patient id → reason), in id
    order: :func:`appliance.break_glass.normal_access_all`, the same rule as one patient's
    :func:`~appliance.break_glass.normal_access`, in two queries."""
    return break_glass.normal_access_all(conn, now=now, zone=zone)


def local_midnight(now: datetime, zone: ZoneInfo) -> datetime:
    """The start of the site's local day that contains ``now``."""
    return datetime.combine(now.astimezone(zone).date(), datetime.min.time(), tzinfo=zone)
