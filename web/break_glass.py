"""Break-glass pages: emergency access to a record outside normal access, with a reason.

``GET /break-glass`` asks for the patient's family name and birth date (a blind-index
look-up: no list of patients, nothing to browse) and the reason; ``POST`` grants
:data:`appliance.break_glass.GRANT_MINUTES` of access to that one record, or says that
normal access already covers the patient (see :mod:`appliance.break_glass` for what
"normal" is). ``GET /break-glass/<grant>`` shows the record while the grant lasts; every
read is audited with the marker ``break-glass grant <id>``, which the audit report
highlights. ``POST /break-glass/<grant>/end`` closes the grant early.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from datetime import date
from typing import Any

from quart import Blueprint, Response, abort, redirect, request
from quart.typing import ResponseReturnValue

from appliance import audit, break_glass, db
from appliance.audit import AuditAction, AuditEvent, Outcome
from appliance.break_glass import BreakGlassError, Category, Grant
from appliance.numbers import ROW_ID_DIGITS, small_int
from appliance.users import Role, Session
from web.app import AppState, app_state
from web.auth import current_session, login_required
from web.nurse import display_name
from web.templating import render_template

bp = Blueprint("break_glass", __name__, url_prefix="/break-glass")

_WHO = (Role.NURSE, Role.ADMIN)
OBSERVATIONS_SHOWN = 20


def _lookup(
    conn: sqlite3.Connection, state: AppState, digest: bytes, actor: str
) -> list[dict[str, Any]]:
    """Patients with this name + birth-date digest, audited as a break-glass search."""
    rows = conn.execute(
        "SELECT r.id, r.logical_id, r.type, r.key_version, r.body FROM blind_index b "
        "JOIN resources r ON r.id = b.resource_id WHERE b.kind = 'name_dob' AND b.digest = ?",
        (digest,),
    ).fetchall()
    found = [state.store.decrypt_stored(conn, row).resource for row in rows]
    with db.transaction_sync(conn):
        event = AuditEvent(
            actor,
            AuditAction.SEARCH,
            entity="Patient by name_dob",
            detail=f"break-glass request, {len(found)} found",
        )
        audit.append(conn, [event], now=state.clock())
    return found


def _read_record(
    conn: sqlite3.Connection, state: AppState, grant: Grant, actor: str
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The patient and their newest Observations, audited with the grant's marker."""
    patient_rows = conn.execute(
        "SELECT id, logical_id, type, key_version, body FROM resources "
        "WHERE type = 'Patient' AND logical_id = ?",
        (grant.patient_id,),
    ).fetchall()
    observation_rows = conn.execute(
        "SELECT id, logical_id, type, key_version, body FROM resources "
        "WHERE patient_key = ? AND type = 'Observation' ORDER BY effective DESC LIMIT ?",
        (grant.patient_key, OBSERVATIONS_SHOWN),
    ).fetchall()
    patient = state.store.decrypt_stored(conn, patient_rows[0]).resource if patient_rows else None
    observations = [state.store.decrypt_stored(conn, row).resource for row in observation_rows]
    with db.transaction_sync(conn):
        events = [
            AuditEvent(
                actor,
                AuditAction.READ,
                patient_key=grant.patient_key,
                entity=f"Patient/{grant.patient_id}",
                detail=grant.marker,
            ),
            AuditEvent(
                actor,
                AuditAction.SEARCH,
                patient_key=grant.patient_key,
                entity=f"Observation newest {OBSERVATIONS_SHOWN}",
                detail=grant.marker,
            ),
        ]
        audit.append(conn, events, now=state.clock())
    return patient, observations


def _observation_line(observation: Mapping[str, Any]) -> tuple[str, str, str]:
    """(what, value, when) of an Observation, as plain text for the record page."""
    code = observation.get("code", {})
    codings = code.get("coding", []) if isinstance(code, Mapping) else []
    what = (code.get("text") if isinstance(code, Mapping) else None) or next(
        (c.get("display") or c.get("code") for c in codings if isinstance(c, Mapping)), "?"
    )

    def quantity(item: Mapping[str, Any]) -> str:
        q = item.get("valueQuantity")
        if isinstance(q, Mapping) and "value" in q:
            return f"{q['value']:g} {q.get('unit') or q.get('code') or ''}".strip()
        return ""

    parts = [quantity(observation)] + [
        quantity(c) for c in observation.get("component", []) if isinstance(c, Mapping)
    ]
    return (
        str(what),
        " / ".join(p for p in parts if p),
        str(observation.get("effectiveDateTime", "")),
    )


async def _form(
    session: Session, *, error: str | None = None, notice: str | None = None, status: int = 200
) -> Response:
    state = app_state()
    grants = await db.run_sync(
        state.store.connection, break_glass.grants_of, session.user.id, now=state.clock()
    )
    body = await render_template(
        "break_glass.html",
        categories=list(Category),
        grants=grants,
        error=error,
        notice=notice,
        minutes=break_glass.GRANT_MINUTES,
        min_reason=break_glass.MIN_REASON_LENGTH,
        zone=state.zone,
    )
    return Response(body, status=status, mimetype="text/html")


@bp.get("")
@login_required(role=_WHO)
async def request_form() -> ResponseReturnValue:
    """Ask for emergency access: patient by family name + birth date, and why."""
    session = await current_session()
    assert session is not None
    return await _form(session)


@bp.post("")
@login_required(role=_WHO)
async def request_access() -> ResponseReturnValue:
    """Find the patient and grant time-limited access (or say normal access covers them)."""
    state = app_state()
    session = await current_session()
    assert session is not None
    form = await request.form
    family = form.get("family", "").strip()
    birth = form.get("birth_date", "").strip()
    category = form.get("category", "")
    reason = form.get("reason", "").strip()
    try:
        date.fromisoformat(birth)
    except ValueError:
        return await _form(session, error="Give the birth date as YYYY-MM-DD.", status=400)
    if not family:
        return await _form(session, error="Give the patient's family name.", status=400)
    if category not in {c.value for c in Category}:
        return await _form(session, error="Choose why you need access.", status=400)
    if len(reason) < break_glass.MIN_REASON_LENGTH:
        return await _form(
            session,
            error=f"Describe the reason in at least {break_glass.MIN_REASON_LENGTH} characters.",
            status=400,
        )
    conn = state.store.connection
    digest = state.store.keyring.name_birthdate_index(family, birth)
    found = await db.run_sync(conn, _lookup, state, digest, session.user.actor)
    if not found:
        return await _form(
            session, error="No patient has that family name and birth date.", status=404
        )
    chosen = form.get("patient_id", "")
    if len(found) > 1 and chosen not in {str(p["id"]) for p in found}:
        return await render_template(
            "break_glass_choose.html",
            matches=[(str(p["id"]), display_name(p), str(p.get("gender", ""))) for p in found],
            family=family,
            birth_date=birth,
            category=category,
            reason=reason,
        )
    patient_id = chosen if len(found) > 1 else str(found[0]["id"])
    normal = await db.run_sync(
        conn, break_glass.normal_access, patient_id, now=state.clock(), zone=state.zone
    )
    if normal is not None:
        return await _form(
            session,
            notice=f"This patient is {normal}: normal access covers them, no emergency "
            "access is needed.",
        )
    try:
        grant = await db.run_sync(
            conn,
            break_glass.grant,
            state.store.current_keyring,
            user_id=session.user.id,
            actor=session.user.actor,
            patient_id=patient_id,
            category=category,
            reason=reason,
            now=state.clock(),
        )
    except BreakGlassError as exc:
        return await _form(session, error=str(exc), status=400)
    return redirect(f"/break-glass/{grant.id}")


async def _own_grant(grant_id: str, session: Session) -> Grant:
    state = app_state()
    found = None
    wanted = small_int(grant_id, ROW_ID_DIGITS)
    if wanted is not None:
        found = await db.run_sync(state.store.connection, break_glass.grant_by_id, wanted)
    if found is None or found.user_id != session.user.id:
        abort(404)
    return found


def _refuse(conn: sqlite3.Connection, state: AppState, grant: Grant, actor: str) -> None:
    with db.transaction_sync(conn):
        event = AuditEvent(
            actor,
            AuditAction.READ,
            outcome=Outcome.DENIED,
            patient_key=grant.patient_key,
            entity=f"Patient/{grant.patient_id}",
            detail=f"{grant.marker} no longer active",
        )
        audit.append(conn, [event], now=state.clock())


@bp.get("/<grant_id>")
@login_required(role=_WHO)
async def record(grant_id: str) -> ResponseReturnValue:
    """The record opened by a live grant (each view audited with the grant's marker)."""
    state = app_state()
    session = await current_session()
    assert session is not None
    grant = await _own_grant(grant_id, session)
    conn = state.store.connection
    if not grant.active(state.clock()):
        await db.run_sync(conn, _refuse, state, grant, session.user.actor)
        body = await render_template("break_glass_ended.html", grant=grant)
        return Response(body, status=403, mimetype="text/html")
    patient, observations = await db.run_sync(conn, _read_record, state, grant, session.user.actor)
    return await render_template(
        "break_glass_record.html",
        grant=grant,
        patient=patient,
        name="" if patient is None else display_name(patient),
        lines=[_observation_line(o) for o in observations],
        zone=state.zone,
    )


@bp.post("/<grant_id>/end")
@login_required(role=_WHO)
async def end(grant_id: str) -> ResponseReturnValue:
    """Close a grant before it runs out."""
    state = app_state()
    session = await current_session()
    assert session is not None
    grant = await _own_grant(grant_id, session)
    if grant.active(state.clock()):
        await db.run_sync(
            state.store.connection,
            break_glass.end,
            grant,
            actor=session.user.actor,
            now=state.clock(),
        )
    return redirect("/break-glass")
