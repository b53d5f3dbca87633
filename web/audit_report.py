"""The audit report (ONC 170.315(d)(3)): who did what to which patient, when.

``GET /audit`` filters the trail by time window (the site's local days), user, patient and
action, sorts by any column, pages through the result and exports it as CSV
(``/audit/export.csv``; the export is itself audited, ``export`` of ``AuditLog``). The
patient filter takes a family name and birth date, looked up through the blind index
(audited as a search) and turned into pseudonymous patient keys: the report never lists
patients and never shows a name. Break-glass grants and every access made under one are
highlighted, and administrators see the recent grants with their reasons beside the
report. The chain's integrity (:func:`appliance.audit.verify`, (d)(2)) is checked on a
connection of its own, in a worker thread, so a long trail never holds up other requests.

Administrators see everyone's actions; a nurse sees only her own.
"""

from __future__ import annotations

import asyncio
import csv
import io
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from quart import Blueprint, Response, request
from quart.typing import ResponseReturnValue

from appliance import audit, break_glass, db
from appliance.audit import AuditAction, AuditEvent, AuditRecord, Outcome, VerifyResult
from appliance.numbers import small_int
from appliance.users import Role, Session
from web.app import AppState, app_state
from web.auth import current_session, login_required
from web.templating import render_template

bp = Blueprint("audit_report", __name__, url_prefix="/audit")

PAGE_SIZE = 50
MAX_EXPORT_ROWS = 100_000
GRANTS_SHOWN_DAYS = 30
# Sortable columns: the parameter a link sends → the column it orders by (never user text).
SORTS = {"time": "id", "actor": "actor", "action": "action", "outcome": "outcome"}
_BREAK_GLASS_SQL = "(action = 'break_glass' OR detail LIKE 'break-glass grant %')"
_COLUMNS = "id, ts, actor, action, outcome, patient_key, entity, detail"
NO_PATIENT = "No patient has that family name and birth date."


@dataclass(frozen=True, slots=True)
class Filter:
    """What the report is asked for (already checked); empty means no condition."""

    since: datetime | None = None
    until: datetime | None = None
    actor: str | None = None
    patient_keys: tuple[bytes, ...] | None = None  # None: any patient; (): nobody matched
    action: AuditAction | None = None
    break_glass_only: bool = False
    sort: str = "time"
    descending: bool = True


def _where(f: Filter) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if f.since is not None:
        clauses.append("ts >= ?")
        params.append(audit.ts_text(f.since))
    if f.until is not None:
        clauses.append("ts < ?")
        params.append(audit.ts_text(f.until))
    if f.actor is not None:
        clauses.append("actor = ?")
        params.append(f.actor)
    if f.patient_keys is not None:
        # IN (NULL) matches nothing: the name and birth date matched no patient.
        clauses.append(f"patient_key IN ({','.join('?' * len(f.patient_keys)) or 'NULL'})")
        params.extend(f.patient_keys)
    if f.action is not None:
        clauses.append("action = ?")
        params.append(f.action.value)
    if f.break_glass_only:
        clauses.append(_BREAK_GLASS_SQL)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def query(
    conn: sqlite3.Connection, f: Filter, *, offset: int, limit: int
) -> tuple[list[AuditRecord], int]:
    """One page of matching records in the asked order, and how many match in all."""
    where, params = _where(f)
    total = int(conn.execute(f"SELECT count(*) FROM audit{where}", params).fetchone()[0])  # noqa: S608 - fixed clauses
    direction = "DESC" if f.descending else "ASC"
    order = f"{SORTS[f.sort]} {direction}, id {direction}"
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM audit{where} ORDER BY {order} LIMIT ? OFFSET ?",  # noqa: S608 - fixed clauses
        [*params, limit, offset],
    ).fetchall()
    records = [
        AuditRecord(
            rid,
            datetime.fromisoformat(ts),
            actor,
            AuditAction(action),
            Outcome(outcome),
            None if key is None else bytes(key),
            entity,
            detail,
        )
        for rid, ts, actor, action, outcome, key, entity, detail in rows
    ]
    return records, total


def is_break_glass(record: AuditRecord) -> bool:
    """Whether the report highlights ``record`` as emergency access."""
    return record.action is AuditAction.BREAK_GLASS or (record.detail or "").startswith(
        "break-glass grant "
    )


def _verify_file(path: Path, public_key: Ed25519PublicKey) -> VerifyResult:
    conn = db.connect_sync(path, migrate=False)
    try:
        return audit.verify(conn, public_key)
    finally:
        conn.close()


# -- reading the form -----------------------------------------------------------------------


def _day(text: str, zone: ZoneInfo) -> datetime | None:
    try:
        return datetime.combine(date.fromisoformat(text.strip()), time(), tzinfo=zone)
    except ValueError:
        return None


async def _filter(
    state: AppState, session: Session, args: Mapping[str, str]
) -> tuple[Filter, list[str]]:
    """The filter the query string asks for, and what could not be understood."""
    problems: list[str] = []
    since = _day(args.get("since", ""), state.zone) if args.get("since") else None
    until = _day(args.get("until", ""), state.zone) if args.get("until") else None
    if (args.get("since") and since is None) or (args.get("until") and until is None):
        problems.append("Dates must be given as YYYY-MM-DD.")
    if until is not None:
        until += timedelta(days=1)  # the "to" day is included
    actor = None
    if session.user.role is not Role.ADMIN:
        actor = session.user.actor  # a nurse sees her own actions only
    elif args.get("user", "").strip():
        actor = f"user:{args['user'].strip().lower()}"
    action = None
    if args.get("action"):
        try:
            action = AuditAction(args["action"])
        except ValueError:
            problems.append("Unknown action.")
    keys: tuple[bytes, ...] | None = None
    family, birth = args.get("family", "").strip(), args.get("birth_date", "").strip()
    if family or birth:
        if not (family and birth) or _day(birth, state.zone) is None:
            problems.append(
                "To filter by patient give the family name and birth date (YYYY-MM-DD)."
            )
        else:
            found = await state.store.find_patients(family, birth, session.user.actor)
            keys = tuple(state.store.patient_key(f"Patient/{p['id']}") for p in found)
            if not keys:
                problems.append(NO_PATIENT)
    sort = args.get("sort", "time")
    return (
        Filter(
            since=since,
            until=until,
            actor=actor,
            patient_keys=keys,
            action=action,
            break_glass_only=args.get("break_glass") == "1",
            sort=sort if sort in SORTS else "time",
            descending=args.get("dir", "desc") != "asc",
        ),
        problems,
    )


def _page_number(args: Mapping[str, str]) -> int:
    raw = args.get("page", "1")
    return max(small_int(raw) or 1, 1)


def _link(args: Mapping[str, str], **changes: str) -> str:
    merged = {k: v for k, v in args.items() if v}
    merged.update(changes)
    return "/audit?" + urlencode(merged)


# -- views ----------------------------------------------------------------------------------


@bp.get("")
@login_required(role=(Role.ADMIN, Role.NURSE))
async def report() -> ResponseReturnValue:
    """The report page: filters, sortable table, pages, chain status, break-glass grants."""
    state = app_state()
    session = await current_session()
    assert session is not None  # login_required
    args = {k: request.args.get(k, "") for k in request.args}
    wanted, problems = await _filter(state, session, args)
    page = _page_number(args)
    conn = state.store.connection
    records: list[AuditRecord] = []
    total = 0
    if not (wanted.patient_keys is not None and not wanted.patient_keys):
        records, total = await db.run_sync(
            conn, query, wanted, offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE
        )
    is_admin = session.user.role is Role.ADMIN
    chain: VerifyResult | None = None
    grants: Sequence[break_glass.GrantWithReason] = ()
    if is_admin:
        chain = await asyncio.to_thread(
            _verify_file, state.config.paths.database, state.store.keyring.signing_public_key
        )
        grants = await db.run_sync(
            conn,
            _recent_grants,
            state,
            session.user.actor,
            state.clock() - timedelta(days=GRANTS_SHOWN_DAYS),
        )
    pages = max((total + PAGE_SIZE - 1) // PAGE_SIZE, 1)
    return await render_template(
        "audit_report.html",
        records=records,
        total=total,
        page=page,
        pages=pages,
        args=args,
        link=_link,
        wanted=wanted,
        problems=problems,
        actions=list(AuditAction),
        is_admin=is_admin,
        chain=chain,
        grants=grants,
        zone=state.zone,
        is_break_glass=is_break_glass,
        export_link="/audit/export.csv?" + urlencode({k: v for k, v in args.items() if v}),
    )


def _recent_grants(
    conn: sqlite3.Connection, state: AppState, actor: str, since: datetime
) -> list[break_glass.GrantWithReason]:
    grants = break_glass.recent(conn, state.store.current_keyring, since=since)
    if grants:  # the reasons may name clinical facts: reading them is an access
        with db.transaction_sync(conn):
            event = AuditEvent(
                actor, AuditAction.READ, entity=f"BreakGlass x{len(grants)}", detail="reasons"
            )
            audit.append(conn, [event], now=state.clock())
    return grants


def _cell(value: str) -> str:
    # OWASP CSV injection: a cell a spreadsheet would run as a formula is quoted as text.
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _export(conn: sqlite3.Connection, wanted: Filter, actor: str, now: datetime) -> str:
    records, total = query(conn, wanted, offset=0, limit=MAX_EXPORT_ROWS)
    rows = audit.format_report_rows(records)
    out = io.StringIO()
    writer = csv.DictWriter(
        out,
        fieldnames=["id", "time_utc", "actor", "action", "outcome", "patient", "entity", "detail"],
        lineterminator="\r\n",
    )
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    with db.transaction_sync(conn):
        event = AuditEvent(
            actor,
            AuditAction.EXPORT,
            entity="AuditLog",
            detail=f"csv export of {len(rows)} of {total} records",
        )
        audit.append(conn, [event], now=now)
    return out.getvalue()


@bp.get("/export.csv")
@login_required(role=(Role.ADMIN, Role.NURSE))
async def export() -> ResponseReturnValue:
    """The filtered report as CSV (audited as an export)."""
    state = app_state()
    session = await current_session()
    assert session is not None
    args = {k: request.args.get(k, "") for k in request.args}
    wanted, problems = await _filter(state, session, args)
    problems = [p for p in problems if p != NO_PATIENT]  # no match: an empty export
    if problems:
        return Response("\r\n".join(problems) + "\r\n", status=400, mimetype="text/plain")
    body = await db.run_sync(
        state.store.connection, _export, wanted, session.user.actor, state.clock()
    )
    stamp = state.clock().astimezone(state.zone).strftime("%Y%m%d-%H%M")
    response = Response(body, mimetype="text/csv")
    response.headers["Content-Disposition"] = f'attachment; filename="audit-{stamp}.csv"'
    return response
