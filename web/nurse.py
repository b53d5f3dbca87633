"""The nurse's arrivals queue and live vitals: today's patients, updated live.

``GET /nurse/`` renders, from the store, **today's arrivals** from the kiosk (Encounters in
status ``arrived`` or ``in-progress`` that started on the site's local day: arrival time,
station, what the kiosk collected, waiting time, a link to the chart), the newest blood
pressure of each of today's patients, and the latest readings. Only patients that normal
access covers appear (:func:`web.access.normally_visible`): nobody else is listed.

``GET /nurse/events`` is a Server-Sent Events stream: ``observation`` events with new blood
pressures and ``arrival`` events with a new or changed arrival row, which
``static/nurse.js`` applies to the page. The store is the bus (DESIGN.md, "Processes"): the
stream notices commits of other processes by polling the newest row id, a single-index
look-up, and only then decrypts the new rows. Every read goes through the store or is
audited here, under the nurse's name.

The stream ends when the browser goes away or the session expires. It re-checks the
session without touching it, so an open page alone never keeps a session alive (automatic
logoff, HIPAA 164.312(a)(2)(iii)); the browser is then told ``event: expired``.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from quart import Blueprint, Response, request
from quart.typing import ResponseReturnValue

from appliance import audit, db
from appliance.audit import AuditAction, AuditEvent, Outcome
from appliance.fhir import instant as _instant
from appliance.fhir import utc_text
from appliance.numbers import ROW_ID_DIGITS, small_int
from appliance.store import Store
from appliance.users import Role
from web.access import local_midnight, normal_access_reasons
from web.app import AppState, app_state
from web.auth import current_session, login_required, session_alive, session_token
from web.templating import render_template

bp = Blueprint("nurse", __name__, url_prefix="/nurse")

LOINC = "http://loinc.org"
BP_PANEL = "85354-9"
SYSTOLIC = "8480-6"
DIASTOLIC = "8462-4"

KEEPALIVE_S = 15.0
# How far back a reconnecting browser may ask to be replayed (rows of every type).
MAX_REPLAY_ROWS = 1000
FEED_BATCH = 200
# The blood-pressure panel's code as the store indexes it (system|code).
BP_PANEL_CODE = "http://loinc.org|85354-9"
LATEST_SHOWN = 20
_STAFF = (Role.NURSE, Role.ADMIN)
WAITING = ("arrived", "in-progress")  # Encounter statuses of a patient still in the queue
CLINIC_DAY = "checked in today"  # the normal-access reason of today's clinic patients
# The queue's name for a patient whose stored record fails authentication (journal, audit).
UNREADABLE_NAME = "(patient record unreadable: tell IT)"
# How long the stream trusts its answer to "may this nurse see this patient?".
ACCESS_CACHE_S = 10.0


@dataclass(frozen=True, slots=True)
class BloodPressure:
    """The numbers of one blood-pressure Observation the screen shows (None when absent)."""

    observation_id: str
    patient_id: str
    systolic: float | None
    diastolic: float | None
    unit: str
    effective: datetime | None
    interpretation: tuple[str, ...]

    def shown_time(self, zone: ZoneInfo) -> str:
        """The reading's time as the clinic's wall clock shows it."""
        if self.effective is None:
            return ""
        return self.effective.astimezone(zone).strftime("%Y-%m-%d %H:%M")

    def shown_pressure(self) -> str:
        """``128/82`` (a dash for a value the device could not measure)."""
        return "/".join("–" if v is None else f"{v:g}" for v in (self.systolic, self.diastolic))

    def to_event(self, zone: ZoneInfo) -> dict[str, Any]:
        """The JSON body of the ``observation`` event."""
        return {
            "observation_id": self.observation_id,
            "patient_id": self.patient_id,
            "systolic": self.systolic,
            "diastolic": self.diastolic,
            "unit": self.unit,
            "display": self.shown_pressure(),
            "effective": None if self.effective is None else self.effective.isoformat(),
            "effective_display": self.shown_time(zone),
            "interpretation": list(self.interpretation),
        }


def _has_loinc(concept: object, code: str) -> bool:
    if not isinstance(concept, Mapping):
        return False
    codings = concept.get("coding")
    return isinstance(codings, list) and any(
        isinstance(c, Mapping) and c.get("system") == LOINC and c.get("code") == code
        for c in codings
    )


def _quantity(component: Mapping[str, Any]) -> tuple[float | None, str | None]:
    quantity = component.get("valueQuantity")
    if not isinstance(quantity, Mapping) or not isinstance(quantity.get("value"), int | float):
        return None, None
    unit = quantity.get("code") or quantity.get("unit")
    return float(quantity["value"]), unit if isinstance(unit, str) else None


def _effective(observation: Mapping[str, Any]) -> datetime | None:
    value = observation.get("effectiveDateTime")
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None  # a partial date (2026-11) has no time of day to show
    return moment if moment.tzinfo is not None else None


def blood_pressure(observation: Mapping[str, Any]) -> BloodPressure | None:
    """The blood pressure in a US Core BP Observation (LOINC 85354-9), else None."""
    if observation.get("resourceType") != "Observation":
        return None
    if not _has_loinc(observation.get("code"), BP_PANEL):
        return None
    subject = observation.get("subject")
    reference = subject.get("reference") if isinstance(subject, Mapping) else None
    if not isinstance(reference, str) or not reference.startswith("Patient/"):
        return None
    values: dict[str, float | None] = {SYSTOLIC: None, DIASTOLIC: None}
    unit = "mm[Hg]"
    for component in observation.get("component", []):
        for code in values:
            if isinstance(component, Mapping) and _has_loinc(component.get("code"), code):
                values[code], found_unit = _quantity(component)
                unit = found_unit or unit
    flags = tuple(
        str(coding["code"])
        for concept in observation.get("interpretation", [])
        if isinstance(concept, Mapping)
        for coding in concept.get("coding", [])
        if isinstance(coding, Mapping) and coding.get("code")
    )
    return BloodPressure(
        observation_id=str(observation.get("id", "")),
        patient_id=reference.removeprefix("Patient/"),
        systolic=values[SYSTOLIC],
        diastolic=values[DIASTOLIC],
        unit=unit,
        effective=_effective(observation),
        interpretation=flags,
    )


def display_name(patient: Mapping[str, Any]) -> str:
    """``Family, Given`` from the official name, else the first one."""
    names = [n for n in patient.get("name", []) if isinstance(n, Mapping)]
    if not names:
        return "(no name)"
    name = next((n for n in names if n.get("use") == "official"), names[0])
    family = str(name.get("family", "")).strip()
    given = " ".join(str(g) for g in name.get("given", []) if g).strip()
    return ", ".join(part for part in (family, given) if part) or str(name.get("text", ""))


# -- arrivals ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrival:
    """One patient in today's arrivals queue: the kiosk's Encounter and what was collected."""

    encounter_id: str
    patient_id: str
    name: str
    status: str
    arrived: datetime
    station: str
    intake: int  # QuestionnaireResponses answered today
    consent: int  # Consents signed today
    vitals: int  # Observations taken today
    photos: int  # Media taken today

    def waiting_minutes(self, now: datetime) -> int:
        """Whole minutes since arrival (never negative)."""
        return max(0, int((now - self.arrived).total_seconds() // 60))

    def to_event(self, zone: ZoneInfo, now: datetime) -> dict[str, Any]:
        """The JSON body of the ``arrival`` event."""
        return {
            "encounter_id": self.encounter_id,
            "patient_id": self.patient_id,
            "name": self.name,
            "status": self.status,
            "arrived": self.arrived.isoformat(),
            "arrived_display": self.arrived.astimezone(zone).strftime("%H:%M"),
            "arrived_epoch": int(self.arrived.timestamp()),
            "waiting_minutes": self.waiting_minutes(now),
            "station": self.station,
            "intake": self.intake,
            "consent": self.consent,
            "vitals": self.vitals,
            "photos": self.photos,
            "chart_url": f"/patients/{self.patient_id}",
            "video_url": f"/video/nurse?visit={self.encounter_id}",
        }


def _station(encounter: Mapping[str, Any]) -> str:
    for location in encounter.get("location", []):
        inner = location.get("location") if isinstance(location, Mapping) else None
        display = inner.get("display") if isinstance(inner, Mapping) else None
        if isinstance(display, str):
            return display.removeprefix("kiosk ")
    return ""


def _rows(
    conn: sqlite3.Connection,
    store: Store,
    sql: str,
    params: Iterable[object],
    actor: str,
    events: list[AuditEvent],
) -> list[dict[str, Any]]:
    """The resources ``sql`` selects; one whose stored copy fails authentication is left out
    (logged, with a failure record in ``events``) rather than failing the whole screen."""
    rows = conn.execute(sql, tuple(params)).fetchall()
    return [r.resource for r in store.decrypt_readable(conn, rows, actor, events)]


def arrivals_sync(
    conn: sqlite3.Connection,
    store: Store,
    actor: str,
    visible: Mapping[str, str],
    *,
    now: datetime,
    zone: ZoneInfo,
    audit_into: list[AuditEvent] | None = None,
) -> list[Arrival]:
    """Today's arrivals of the ``visible`` patients (id → access reason), oldest first.

    Runs on the database thread. Only the Encounters of visible patients are decrypted;
    each patient shown is audited (one search record with the patient's key), committed
    here, or added to ``audit_into`` for the caller to commit with its own records.
    """
    if not visible:
        return []
    midnight = utc_text(local_midnight(now, zone))
    keys = {store.patient_key(f"Patient/{p}"): p for p in visible}
    marks = ",".join("?" * len(keys))
    events: list[AuditEvent] = []
    encounters = _rows(
        conn,
        store,
        "SELECT id, logical_id, type, key_version, body FROM resources "  # noqa: S608 - placeholders only
        f"WHERE type = 'Encounter' AND effective >= ? AND patient_key IN ({marks}) "
        "ORDER BY effective",
        (midnight, *keys),
        actor,
        events,
    )
    waiting = [e for e in encounters if e.get("status") in WAITING]
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for encounter in waiting:
        ref = str(encounter.get("subject", {}).get("reference", ""))
        by_patient.setdefault(ref.removeprefix("Patient/"), []).append(encounter)
    found: list[Arrival] = []
    start = local_midnight(now, zone)
    shown = [p for p in by_patient if p in visible]
    if not shown:
        _audit(conn, events, audit_into, now)
        return found
    # One query each for every patient shown (not four per patient): names, today's
    # readings and photos counted, and their intake answers and consents.
    key_of = {p: store.patient_key(f"Patient/{p}") for p in shown}
    id_marks = ",".join("?" * len(shown))
    names = {
        str(r["id"]): display_name(r)
        for r in _rows(
            conn,
            store,
            "SELECT id, logical_id, type, key_version, body FROM resources "  # noqa: S608 - placeholders only
            f"WHERE type = 'Patient' AND logical_id IN ({id_marks})",
            shown,
            actor,
            events,
        )
    }  # an unreadable Patient still arrives, named as such (UNREADABLE_NAME)
    unreadable = {
        e.entity.removeprefix("Patient/")
        for e in events
        if e.outcome is Outcome.FAILURE and e.entity and e.entity.startswith("Patient/")
    }
    counted: dict[tuple[bytes, str], int] = {
        (bytes(k), str(t)): int(n)
        for k, t, n in conn.execute(
            "SELECT patient_key, type, count(*) FROM resources "  # noqa: S608 - placeholders only
            f"WHERE patient_key IN ({id_marks}) AND type IN ('Observation', 'Media') "
            "AND effective >= ? GROUP BY patient_key, type",
            (*key_of.values(), midnight),
        )
    }
    answered: dict[bytes, list[dict[str, Any]]] = {}
    rows = conn.execute(
        "SELECT id, logical_id, type, key_version, body, patient_key FROM resources "  # noqa: S608 - placeholders only
        f"WHERE patient_key IN ({id_marks}) AND type IN ('QuestionnaireResponse', 'Consent')",
        tuple(key_of.values()),
    ).fetchall()
    key_by_row = {int(row[0]): bytes(row[5]) for row in rows}
    for item in store.decrypt_readable(conn, [row[:5] for row in rows], actor, events):
        answered.setdefault(key_by_row[item.row_id], []).append(item.resource)

    def today(resource: Mapping[str, Any], field: str) -> bool:
        moment = _instant(resource.get(field))
        return moment is not None and moment >= start

    for patient_id in shown:
        key = key_of[patient_id]
        name = names.get(
            patient_id, UNREADABLE_NAME if patient_id in unreadable else "(unknown patient)"
        )
        mine_answered = answered.get(bytes(key), [])
        # Neither carries an indexed time (authored, dateTime): decrypted, then compared.
        intake = sum(
            1
            for r in mine_answered
            if r["resourceType"] == "QuestionnaireResponse" and today(r, "authored")
        )
        consent = sum(
            1 for r in mine_answered if r["resourceType"] == "Consent" and today(r, "dateTime")
        )
        for encounter in by_patient[patient_id]:
            arrived = _instant(encounter.get("period", {}).get("start")) or now
            found.append(
                Arrival(
                    encounter_id=str(encounter["id"]),
                    patient_id=patient_id,
                    name=name,
                    status=str(encounter.get("status", "")),
                    arrived=arrived,
                    station=_station(encounter),
                    intake=intake,
                    consent=consent,
                    vitals=counted.get((bytes(key), "Observation"), 0),
                    photos=counted.get((bytes(key), "Media"), 0),
                )
            )
        events.append(
            AuditEvent(
                actor,
                AuditAction.SEARCH,
                patient_key=key,
                entity="Encounter+Patient+QuestionnaireResponse+Consent arrivals today",
                detail=f"normal access: {visible[patient_id]}",
            )
        )
    _audit(conn, events, audit_into, now)
    found.sort(key=lambda a: a.arrived)
    return found


def _audit(
    conn: sqlite3.Connection,
    events: list[AuditEvent],
    audit_into: list[AuditEvent] | None,
    now: datetime,
) -> None:
    """Commit ``events`` here, or hand them to the caller to commit with its own."""
    if audit_into is not None:
        audit_into.extend(events)
    elif events:
        with db.transaction_sync(conn):
            audit.append(conn, events, now=now)


def _visible(conn: sqlite3.Connection, *, now: datetime, zone: ZoneInfo) -> dict[str, str]:
    """Patient id → normal-access reason, for every patient normal access covers now."""
    return normal_access_reasons(conn, now=now, zone=zone)


def patients_and_pressures_sync(
    conn: sqlite3.Connection,
    store: Store,
    actor: str,
    patient_ids: Iterable[str],
    *,
    audit_into: list[AuditEvent] | None = None,
) -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """Each patient (skipping unknown ids) with their newest blood-pressure panel, if any.

    Runs on the database thread. Audited as :meth:`Store.read` and :meth:`Store.newest` would
    audit it (a read of the Patient, a search of its newest panel), but all in one write
    transaction (or added to ``audit_into``): one commit (an fsync, ``synchronous=FULL``)
    instead of two per patient, which was most of the page's time with a busy day's queue
    (bench/web.py).
    """
    wanted = list(dict.fromkeys(patient_ids))
    found: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = []
    events: list[AuditEvent] = []
    if not wanted:
        return found
    # Two queries for all of them (not two per patient): the Patients, then each one's
    # newest panel — the index (patient_key, type, effective) ranks them, only the
    # newest is decrypted.
    marks = ",".join("?" * len(wanted))
    # A row whose stored copy fails authentication is left out (logged and audited by
    # decrypt_readable): that patient or panel is missing, the screen still works.
    patients = {
        item.logical_id: item.resource
        for item in store.decrypt_readable(
            conn,
            conn.execute(
                "SELECT id, logical_id, type, key_version, body FROM resources "  # noqa: S608 - placeholders only
                f"WHERE type = 'Patient' AND logical_id IN ({marks})",
                wanted,
            ).fetchall(),
            actor,
            events,
        )
    }
    key_of = {p: store.patient_key(f"Patient/{p}") for p in wanted}
    panels = conn.execute(
        "SELECT id, logical_id, type, key_version, body, patient_key FROM ("  # noqa: S608 - placeholders only
        "SELECT id, logical_id, type, key_version, body, patient_key, row_number() OVER "
        "(PARTITION BY patient_key ORDER BY effective DESC, id DESC) AS rank "
        f"FROM resources WHERE patient_key IN ({marks}) AND type = 'Observation' "
        "AND code = ?) WHERE rank = 1",
        (*key_of.values(), BP_PANEL_CODE),
    ).fetchall()
    key_by_row = {int(row[0]): bytes(row[5]) for row in panels}
    newest: dict[bytes, dict[str, Any]] = {
        key_by_row[item.row_id]: item.resource
        for item in store.decrypt_readable(conn, [row[:5] for row in panels], actor, events)
    }
    for patient_id in wanted:
        events.append(AuditEvent(actor, AuditAction.READ, entity=f"Patient/{patient_id}"))
        patient = patients.get(patient_id)
        if patient is None:
            continue
        key = key_of[patient_id]
        events.append(
            AuditEvent(
                actor,
                AuditAction.SEARCH,
                patient_key=key,
                entity=f"Observation {BP_PANEL_CODE} newest 1",
            )
        )
        found.append((patient_id, patient, newest.get(bytes(key))))
    _audit(conn, events, audit_into, store.now())
    return found


# -- the page ------------------------------------------------------------------------------


def dashboard_sync(
    conn: sqlite3.Connection, store: Store, actor: str, *, now: datetime, zone: ZoneInfo
) -> tuple[list[Arrival], list[tuple[str, dict[str, Any], dict[str, Any] | None]]]:
    """Everything ``GET /nurse/`` shows, in one call on the database thread: who normal
    access covers, today's arrivals, and today's patients with their newest blood pressure.
    The reads are audited in **one** transaction, committed before anything is returned —
    one commit (an fsync) per page instead of two, and one trip to the database thread
    instead of three (the single web process's bottleneck under load, bench/web.py)."""
    visible = _visible(conn, now=now, zone=zone)
    events: list[AuditEvent] = []
    arrivals = arrivals_sync(conn, store, actor, visible, now=now, zone=zone, audit_into=events)
    # Today's clinic patients: checked in at a station today, or arrived at the kiosk.
    today = {p for p, reason in visible.items() if reason == CLINIC_DAY}
    today |= {a.patient_id for a in arrivals}
    found = patients_and_pressures_sync(conn, store, actor, sorted(today), audit_into=events)
    if events:
        with db.transaction_sync(conn):
            audit.append(conn, events, now=now)
    return arrivals, found


@dataclass(frozen=True, slots=True)
class _Row:
    patient_id: str
    name: str
    birth_date: str
    reading: BloodPressure | None


@bp.get("/")
@login_required(role=_STAFF)
async def vitals() -> ResponseReturnValue:
    """Today's arrivals, the newest blood pressure of today's patients, the latest readings."""
    state = app_state()
    session = await current_session()
    assert session is not None  # login_required
    actor = session.user.actor
    now = state.clock()
    arrivals, found = await db.run_sync(
        state.store.connection, dashboard_sync, state.store, actor, now=now, zone=state.zone
    )
    rows = []
    for patient_id, patient, newest in found:
        reading = None if newest is None else blood_pressure(newest)
        birth_date = str(patient.get("birthDate", ""))
        rows.append(_Row(patient_id, display_name(patient), birth_date, reading))
    rows.sort(key=lambda row: row.name.casefold())
    names = {row.patient_id: row.name for row in rows}
    timed = [
        (row.reading.effective, row.reading)
        for row in rows
        if row.reading is not None and row.reading.effective is not None
    ]
    timed.sort(key=lambda pair: pair[0], reverse=True)
    latest = [reading for _, reading in timed[:LATEST_SHOWN]]
    return await render_template(
        "nurse.html",
        arrivals=arrivals,
        rows=rows,
        latest=latest,
        names=names,
        zone=state.zone,
        now=now,
    )


@bp.get("/events")
@login_required(role=_STAFF)
async def events() -> ResponseReturnValue:
    """Server-Sent Events: ``observation`` (blood pressures) and ``arrival`` events."""
    state = app_state()
    session = await current_session()
    token = session_token()
    assert session is not None  # login_required
    assert token is not None
    newest = await state.store.last_row_id()
    start = newest
    asked = request.headers.get("Last-Event-ID", "").strip()
    replay_from = small_int(asked, ROW_ID_DIGITS)
    if replay_from is not None:
        start = min(newest, max(replay_from, newest - MAX_REPLAY_ROWS))
    # The stream outlives the request context: it gets everything it needs now.
    body = _feed(state, session.user.actor, token, start)
    response = Response(body, mimetype="text/event-stream")
    response.headers["X-Accel-Buffering"] = "no"
    response.timeout = None
    return response


class _Visibility:
    """The stream's memory of which patients normal access covers (refreshed every 10 s)."""

    def __init__(self, state: AppState) -> None:
        self._state = state
        self._visible: dict[str, str] = {}
        self._until = float("-inf")

    async def now(self) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        if loop.time() >= self._until:
            state = self._state
            self._visible = await db.run_sync(
                state.store.connection, _visible, now=state.clock(), zone=state.zone
            )
            self._until = loop.time() + ACCESS_CACHE_S
        return self._visible

    def forget(self) -> None:
        """A new arrival or check-in may have changed who is covered: ask again."""
        self._until = float("-inf")


def _subject_id(resource: Mapping[str, Any]) -> str | None:
    subject = resource.get("subject")
    ref = subject.get("reference") if isinstance(subject, Mapping) else None
    return (
        ref.removeprefix("Patient/")
        if isinstance(ref, str) and ref.startswith("Patient/")
        else None
    )


async def _feed(state: AppState, actor: str, token: str, after: int) -> AsyncIterator[bytes]:
    store = state.store
    loop = asyncio.get_running_loop()
    session_check_s = min(5.0, 20 * state.sse_poll_s)
    next_keepalive = loop.time() + KEEPALIVE_S
    next_session_check = loop.time() + session_check_s
    visibility = _Visibility(state)
    yield b"retry: 3000\n\n"
    while True:
        newest = await state.changes.tick()  # one poll per interval for all streams
        if loop.time() >= next_session_check:
            next_session_check = loop.time() + session_check_s
            if not await session_alive(state, token):
                yield b"event: expired\ndata: {}\n\n"
                return
        while after < newest:
            batch = await store.changes_since(
                after, ["Observation", "Encounter"], actor, limit=FEED_BATCH
            )
            touched: dict[str, int] = {}  # patient → the row id of their latest change
            for item in batch.resources:
                patient_id = _subject_id(item.resource)
                if patient_id is None:
                    continue
                if item.type == "Encounter":
                    visibility.forget()
                visible = await visibility.now()
                if patient_id not in visible:
                    continue  # outside normal access: not on this screen
                touched[patient_id] = item.row_id
                reading = blood_pressure(item.resource)
                if reading is not None:
                    data = json.dumps(reading.to_event(state.zone), separators=(",", ":"))
                    yield f"id: {item.row_id}\nevent: observation\ndata: {data}\n\n".encode()
                    next_keepalive = loop.time() + KEEPALIVE_S
            if touched:
                visible = await visibility.now()
                now = state.clock()
                changed = await db.run_sync(
                    store.connection,
                    arrivals_sync,
                    store,
                    actor,
                    {p: visible[p] for p in touched if p in visible},
                    now=now,
                    zone=state.zone,
                )
                for arrival in changed:
                    data = json.dumps(arrival.to_event(state.zone, now), separators=(",", ":"))
                    row_id = touched[arrival.patient_id]
                    yield f"id: {row_id}\nevent: arrival\ndata: {data}\n\n".encode()
                    next_keepalive = loop.time() + KEEPALIVE_S
            full = batch.scanned == FEED_BATCH
            after = batch.last_row_id if full else max(newest, batch.last_row_id)
        if loop.time() >= next_keepalive:
            next_keepalive = loop.time() + KEEPALIVE_S
            yield b": keepalive\n\n"
