"""The nurse's live vitals screen: every patient's newest blood pressure, updated live.

``GET /nurse/`` renders the table from the store; ``GET /nurse/events`` is a Server-Sent
Events stream of new blood-pressure Observations, which ``static/nurse.js`` applies to the
table. The store is the bus (DESIGN.md, "Processes"): the stream notices commits of the
devices process by polling the newest row id, a single-index look-up, and only then
decrypts the new rows. Every read goes through the store, so every one is audited under
the nurse's name.

The stream ends when the browser goes away or the session expires. It re-checks the
session without touching it, so an open page alone never keeps a session alive (automatic
logoff, HIPAA 164.312(a)(2)(iii)); the browser is then told ``event: expired``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from quart import Blueprint, Response, render_template, request
from quart.typing import ResponseReturnValue

from appliance import db, users
from appliance.users import Role
from web.app import AppState, app_state
from web.auth import current_session, login_required, session_token

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


@dataclass(frozen=True, slots=True)
class _Row:
    patient_id: str
    name: str
    birth_date: str
    reading: BloodPressure | None


@bp.get("/")
@login_required(role=_STAFF)
async def vitals() -> ResponseReturnValue:
    """The table of patients with their newest blood pressure, and the latest readings."""
    state = app_state()
    session = await current_session()
    assert session is not None  # login_required
    actor = session.user.actor
    rows = []
    for patient in await state.store.patients(actor):
        patient_id = str(patient["id"])
        newest = await state.store.newest(
            f"Patient/{patient_id}", "Observation", actor, limit=1, code=BP_PANEL_CODE
        )
        reading = next((r for r in map(blood_pressure, newest) if r is not None), None)
        birth_date = str(patient.get("birthDate", ""))
        rows.append(_Row(patient_id, display_name(patient), birth_date, reading))
    names = {row.patient_id: row.name for row in rows}
    timed = [
        (row.reading.effective, row.reading)
        for row in rows
        if row.reading is not None and row.reading.effective is not None
    ]
    timed.sort(key=lambda pair: pair[0], reverse=True)
    latest = [reading for _, reading in timed[:LATEST_SHOWN]]
    return await render_template(
        "nurse.html", rows=rows, latest=latest, names=names, zone=state.zone
    )


@bp.get("/events")
@login_required(role=_STAFF)
async def events() -> ResponseReturnValue:
    """Server-Sent Events: ``observation`` events with blood pressures as they are stored."""
    state = app_state()
    session = await current_session()
    token = session_token()
    assert session is not None  # login_required
    assert token is not None
    newest = await state.store.last_row_id()
    start = newest
    asked = request.headers.get("Last-Event-ID", "").strip()
    if asked.isdigit():
        start = min(newest, max(int(asked), newest - MAX_REPLAY_ROWS))
    # The stream outlives the request context: it gets everything it needs now.
    body = _feed(state, session.user.actor, token, start)
    response = Response(body, mimetype="text/event-stream")
    response.headers["X-Accel-Buffering"] = "no"
    response.timeout = None
    return response


async def _session_alive(state: AppState, token: str) -> bool:
    session = await db.run_sync(
        state.store.connection,
        users.load_session,
        token,
        now=state.clock(),
        idle_timeout_s=state.config.web.session_idle_timeout_s,
        touch=False,
    )
    return session is not None


async def _feed(state: AppState, actor: str, token: str, after: int) -> AsyncIterator[bytes]:
    store = state.store
    loop = asyncio.get_running_loop()
    session_check_s = min(5.0, 20 * state.sse_poll_s)
    next_keepalive = loop.time() + KEEPALIVE_S
    next_session_check = loop.time() + session_check_s
    yield b"retry: 3000\n\n"
    while True:
        await asyncio.sleep(state.sse_poll_s)
        if loop.time() >= next_session_check:
            next_session_check = loop.time() + session_check_s
            if not await _session_alive(state, token):
                yield b"event: expired\ndata: {}\n\n"
                return
        newest = await store.last_row_id()
        while after < newest:
            batch = await store.changes_since(after, ["Observation"], actor, limit=FEED_BATCH)
            for item in batch:
                reading = blood_pressure(item.resource)
                if reading is not None:
                    data = json.dumps(reading.to_event(state.zone), separators=(",", ":"))
                    yield f"id: {item.row_id}\nevent: observation\ndata: {data}\n\n".encode()
                    next_keepalive = loop.time() + KEEPALIVE_S
            full = len(batch) == FEED_BATCH
            after = batch[-1].row_id if full else max(newest, batch[-1].row_id if batch else 0)
        if loop.time() >= next_keepalive:
            next_keepalive = loop.time() + KEEPALIVE_S
            yield b": keepalive\n\n"
