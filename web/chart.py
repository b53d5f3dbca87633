"""The patient chart: who the patient is and what was collected about them, for the nurse.

* ``GET /patients/<id>`` — demographics (contact details and identifiers masked), vitals of
  this visit (the site's local day) and their history by vital, the intake questionnaire's
  answers with the PHQ-2 score and what it means, consents, photos and visit history.
* ``GET /patients/<id>/photos/<media>`` — one photo, only through this authenticated route
  (audited, ``Cache-Control: no-store`` like every page), never as a static file.

Both call :func:`web.access.require_access` first: normal access or a live break-glass
grant, else a 403 page offering break-glass (:func:`denied`, registered app-wide, so any
patient page that raises :class:`web.access.AccessDenied` gets it). Every read is audited
under the nurse with the patient's key and the access it was made under.
"""

from __future__ import annotations

import base64
import binascii
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from quart import Blueprint, Response, abort
from quart.typing import ResponseReturnValue

from appliance import audit, db
from appliance.audit import AuditAction, AuditEvent
from appliance.fhir import instant as _instant
from appliance.store import Store
from appliance.users import Role
from services import intake
from web.access import Access, AccessDenied, local_midnight, require_access
from web.app import app_state
from web.auth import current_session, login_required
from web.nurse import display_name
from web.templating import render_template

bp = Blueprint("chart", __name__, url_prefix="/patients")

_STAFF = (Role.NURSE, Role.ADMIN)
OBSERVATIONS_READ = 500  # newest first; a chart is about the recent course
HISTORY_PER_VITAL = 10
_LOINC = "http://loinc.org"
# UCUM is for machines; how people write the units on a chart.
_UNIT_TEXT = {"mm[Hg]": "mmHg", "Cel": "°C", "[degF]": "°F", "/min": "/min", "[lb_av]": "lb"}
_IMAGE_TYPES = frozenset({"image/png", "image/jpeg"})
# Short names a nurse reads at a glance, by LOINC code.
VITAL_NAMES = {
    "85354-9": "Blood pressure",
    "8867-4": "Heart rate",
    "59408-5": "SpO2",
    "2708-6": "SpO2",
    "8310-5": "Temperature",
    "29463-7": "Weight",
    "8302-2": "Height",
    "39156-5": "BMI",
    "9279-1": "Respiratory rate",
    "41653-7": "Glucose",
    "2339-0": "Glucose",
    "14743-9": "Glucose",
    "15074-8": "Glucose",
}


# -- what the page shows (pure) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Vital:
    """One Observation as a line of the chart."""

    code: str
    name: str
    value: str
    at: datetime | None
    shown_at: str


@dataclass(frozen=True, slots=True)
class VitalHistory:
    """One vital's readings, newest first."""

    name: str
    readings: tuple[Vital, ...]
    total: int


@dataclass(frozen=True, slots=True)
class Answer:
    """One answered question of the intake."""

    question: str
    answer: str


@dataclass(frozen=True, slots=True)
class Intake:
    """One QuestionnaireResponse, with the PHQ-2 score and its reading."""

    authored: str
    language: str
    answers: tuple[Answer, ...]
    phq2: int | None
    phq2_positive: bool
    phq2_text: str


@dataclass(frozen=True, slots=True)
class ConsentView:
    """One Consent."""

    status: str
    signed: str
    scope: str
    policy: str
    signature: bool


@dataclass(frozen=True, slots=True)
class Photo:
    """One photo (its bytes are served by the photo route)."""

    id: str
    taken: str
    content_type: str
    size: int


@dataclass(frozen=True, slots=True)
class Visit:
    """One Encounter in the visit history."""

    id: str
    start: str
    status: str
    kind: str
    where: str


def _shown(value: object, zone: ZoneInfo) -> str:
    moment = _instant(value)
    return "" if moment is None else moment.astimezone(zone).strftime("%Y-%m-%d %H:%M")


def _loinc(concept: object) -> str:
    codings = concept.get("coding", []) if isinstance(concept, Mapping) else []
    return next(
        (
            str(c.get("code"))
            for c in codings
            if isinstance(c, Mapping) and c.get("system") == _LOINC
        ),
        "",
    )


def _quantity(item: Mapping[str, Any]) -> tuple[float | None, str]:
    q = item.get("valueQuantity")
    if not isinstance(q, Mapping) or not isinstance(q.get("value"), int | float):
        return None, ""
    unit = q.get("unit") or q.get("code") or ""
    return float(q["value"]), str(unit)


def vital(observation: Mapping[str, Any], zone: ZoneInfo) -> Vital | None:
    """An Observation as a chart line; None when it has no value to show."""
    code = _loinc(observation.get("code"))
    name = VITAL_NAMES.get(code)
    if name is None:
        concept = observation.get("code")
        text = concept.get("text") if isinstance(concept, Mapping) else None
        name = str(text or code or "Observation")
    if code == "85354-9":
        parts = {
            _loinc(c.get("code")): _quantity(c)
            for c in observation.get("component", [])
            if isinstance(c, Mapping)
        }
        systolic, unit = parts.get("8480-6", (None, ""))
        diastolic, _ = parts.get("8462-4", (None, ""))
        if systolic is None and diastolic is None:
            return None
        value = "/".join("–" if v is None else f"{v:g}" for v in (systolic, diastolic))
        value = f"{value} {_UNIT_TEXT.get(unit, unit) or 'mmHg'}"
    else:
        number, unit = _quantity(observation)
        if number is None:
            return None
        value = f"{number:g} {_UNIT_TEXT.get(unit, unit)}".strip()
    when = observation.get("effectiveDateTime") or observation.get("effectiveInstant")
    return Vital(code, name, value, _instant(when), _shown(when, zone))


def vitals_by_name(vitals: Sequence[Vital]) -> list[VitalHistory]:
    """Readings grouped by vital, each newest first, the vitals in alphabetical order."""
    groups: dict[str, list[Vital]] = {}
    for v in vitals:
        groups.setdefault(v.name, []).append(v)
    return [
        VitalHistory(name, tuple(readings[:HISTORY_PER_VITAL]), len(readings))
        for name, readings in sorted(groups.items())
    ]


def phq2_reading(score: int | None) -> tuple[bool, str]:
    """Whether a PHQ-2 total is a positive screen, and what to say about it."""
    if score is None:
        return False, "No PHQ-2 total recorded."
    if score >= intake.PHQ2_POSITIVE:
        return True, (
            f"Positive screen ({score} of 6, 3 or more): follow up with the PHQ-9 "
            "(Kroenke et al. 2003)."
        )
    return False, f"Negative screen ({score} of 6, below 3)."


def _answer_text(answer: Mapping[str, Any]) -> str:
    if "valueCoding" in answer and isinstance(answer["valueCoding"], Mapping):
        coding = answer["valueCoding"]
        return str(coding.get("display") or coding.get("code") or "")
    for key in ("valueString", "valueInteger", "valueBoolean", "valueDecimal", "valueDate"):
        if key in answer:
            return str(answer[key])
    return ""


def intake_view(response: Mapping[str, Any], zone: ZoneInfo) -> Intake:
    """A QuestionnaireResponse as question-and-answer lines (groups flattened)."""
    answers: list[Answer] = []

    def walk(items: Sequence[Any]) -> None:
        for item in items:
            if not isinstance(item, Mapping):
                continue
            if item.get("linkId") == intake.PHQ2_TOTAL[0]:
                continue  # shown as the score
            given = [_answer_text(a) for a in item.get("answer", []) if isinstance(a, Mapping)]
            if given:
                answers.append(
                    Answer(str(item.get("text", item.get("linkId", ""))), ", ".join(given))
                )
            walk(item.get("item", []))

    walk(response.get("item", []))
    score = intake.phq2_score_of(response)
    positive, text = phq2_reading(score)
    return Intake(
        authored=_shown(response.get("authored"), zone),
        language=str(response.get("language", "")),
        answers=tuple(answers),
        phq2=score,
        phq2_positive=positive,
        phq2_text=text,
    )


def consent_view(consent: Mapping[str, Any], zone: ZoneInfo) -> ConsentView:
    """A Consent as the chart lists it."""
    scope = consent.get("scope", {})
    codings = scope.get("coding", []) if isinstance(scope, Mapping) else []
    policies = [p.get("uri", "") for p in consent.get("policy", []) if isinstance(p, Mapping)]
    return ConsentView(
        status=str(consent.get("status", "")),
        signed=_shown(consent.get("dateTime"), zone),
        scope=", ".join(str(c.get("display") or c.get("code")) for c in codings),
        policy=", ".join(str(p) for p in policies),
        signature=isinstance(consent.get("sourceAttachment"), Mapping),
    )


def visit_view(encounter: Mapping[str, Any], zone: ZoneInfo) -> Visit:
    """An Encounter as a line of the visit history."""
    kind = encounter.get("class", {})
    where = [
        str(loc.get("location", {}).get("display", ""))
        for loc in encounter.get("location", [])
        if isinstance(loc, Mapping)
    ]
    return Visit(
        id=str(encounter.get("id", "")),
        start=_shown(encounter.get("period", {}).get("start"), zone),
        status=str(encounter.get("status", "")),
        kind=str(kind.get("display") or kind.get("code") or "")
        if isinstance(kind, Mapping)
        else "",
        where=", ".join(w for w in where if w),
    )


def masked_phone(patient: Mapping[str, Any]) -> str:
    """The first phone number with all but its last two digits hidden."""
    for telecom in patient.get("telecom", []):
        if isinstance(telecom, Mapping) and telecom.get("system") == "phone":
            digits = "".join(ch for ch in str(telecom.get("value", "")) if ch.isdigit())
            return f"••• ••• ••{digits[-2:]}" if len(digits) >= 2 else "on file"
    return ""


def masked_identifiers(patient: Mapping[str, Any]) -> list[str]:
    """Identifiers other than the appliance's own, each showing its last four characters."""
    shown = []
    for ident in patient.get("identifier", []):
        if not isinstance(ident, Mapping) or str(ident.get("system", "")).startswith("urn:ietf"):
            continue
        value = str(ident.get("value", ""))
        shown.append("••••" + value[-4:] if len(value) > 4 else "••••")
    return shown


def age_on(birth_date: str, today: date) -> int | None:
    """Whole years between a full birth date and ``today`` (None for a partial date)."""
    try:
        born = date.fromisoformat(birth_date)
    except ValueError:
        return None
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


# -- reads ----------------------------------------------------------------------------------

_SELECT = "SELECT id, logical_id, type, key_version, body FROM resources "


@dataclass(frozen=True, slots=True)
class _Record:
    patient: dict[str, Any] | None
    observations: list[dict[str, Any]]
    encounters: list[dict[str, Any]]
    responses: list[dict[str, Any]]
    consents: list[dict[str, Any]]
    media: list[dict[str, Any]]


def _read_record(
    conn: sqlite3.Connection, store: Store, access: Access, actor: str, now: datetime
) -> _Record:
    """The patient's chart, audited with the patient's key and the access it is read under."""
    key = store.patient_key(f"Patient/{access.patient_id}")

    def rows(sql: str, params: tuple[object, ...]) -> list[dict[str, Any]]:
        return [store.decrypt_stored(conn, r).resource for r in conn.execute(sql, params)]

    patients = rows(_SELECT + "WHERE type = 'Patient' AND logical_id = ?", (access.patient_id,))
    observations = rows(
        _SELECT + "WHERE patient_key = ? AND type = 'Observation' ORDER BY effective DESC LIMIT ?",
        (key, OBSERVATIONS_READ),
    )
    by_type: dict[str, list[dict[str, Any]]] = {}
    for resource in rows(
        _SELECT + "WHERE patient_key = ? AND type IN "
        "('Encounter', 'QuestionnaireResponse', 'Consent', 'Media') ORDER BY id DESC",
        (key,),
    ):
        by_type.setdefault(str(resource["resourceType"]), []).append(resource)
    events = [
        AuditEvent(
            actor,
            AuditAction.READ,
            patient_key=key,
            entity=f"Patient/{access.patient_id}",
            detail=access.detail,
        ),
        AuditEvent(
            actor,
            AuditAction.SEARCH,
            patient_key=key,
            entity=f"Observation newest {OBSERVATIONS_READ}; "
            "Encounter+QuestionnaireResponse+Consent+Media all (chart)",
            detail=access.detail,
        ),
    ]
    with db.transaction_sync(conn):
        audit.append(conn, events, now=now)
    return _Record(
        patients[0] if patients else None,
        observations,
        by_type.get("Encounter", []),
        by_type.get("QuestionnaireResponse", []),
        by_type.get("Consent", []),
        by_type.get("Media", []),
    )


def _read_media(
    conn: sqlite3.Connection, store: Store, access: Access, media_id: str, actor: str, now: datetime
) -> dict[str, Any] | None:
    """One of the patient's Media (another patient's id finds nothing), audited."""
    key = store.patient_key(f"Patient/{access.patient_id}")
    row = conn.execute(
        _SELECT + "WHERE type = 'Media' AND logical_id = ? AND patient_key = ?", (media_id, key)
    ).fetchone()
    if row is None:
        return None
    media = store.decrypt_stored(conn, row).resource
    with db.transaction_sync(conn):
        event = AuditEvent(
            actor,
            AuditAction.READ,
            patient_key=key,
            entity=f"Media/{media_id}",
            detail=access.detail,
        )
        audit.append(conn, [event], now=now)
    return media


# -- views ----------------------------------------------------------------------------------


@bp.app_errorhandler(AccessDenied)
async def denied(error: AccessDenied) -> ResponseReturnValue:
    """The 403 page of any patient page outside the user's access, offering break-glass."""
    body = await render_template(
        "chart_denied.html",
        may_break_glass=error.user.role in _STAFF,
    )
    return Response(body, status=403, mimetype="text/html")


@bp.get("/<patient_id>")
@login_required(role=_STAFF)
async def chart(patient_id: str) -> ResponseReturnValue:
    """The patient's chart (audited under the nurse, with the access it was opened under)."""
    access = await require_access(patient_id)
    state = app_state()
    session = await current_session()
    assert session is not None  # login_required
    now = state.clock()
    zone = state.zone
    record = await db.run_sync(
        state.store.connection, _read_record, state.store, access, session.user.actor, now
    )
    if record.patient is None:
        abort(404)
    patient = record.patient
    vitals = [v for v in (vital(o, zone) for o in record.observations) if v is not None]
    midnight = local_midnight(now, zone)
    this_visit = [v for v in vitals if v.at is not None and v.at >= midnight]
    photos = [
        Photo(
            id=str(m.get("id", "")),
            taken=_shown(m.get("createdDateTime") or m.get("issued"), zone),
            content_type=str(m.get("content", {}).get("contentType", "")),
            size=int(m.get("content", {}).get("size", 0) or 0),
        )
        for m in record.media
    ]
    address = next((a for a in patient.get("address", []) if isinstance(a, Mapping)), None)
    birth_date = str(patient.get("birthDate", ""))
    return await render_template(
        "chart.html",
        patient_id=patient_id,
        access=access,
        name=display_name(patient),
        birth_date=birth_date,
        age=age_on(birth_date, now.astimezone(zone).date()),
        gender=str(patient.get("gender", "")),
        phone=masked_phone(patient),
        address_city="" if address is None else str(address.get("city", "")),
        address_on_file=address is not None,
        identifiers=masked_identifiers(patient),
        this_visit=this_visit,
        history=vitals_by_name(vitals),
        observations_cut=len(record.observations) == OBSERVATIONS_READ,
        intakes=[intake_view(r, zone) for r in record.responses],
        consents=[consent_view(c, zone) for c in record.consents],
        photos=photos,
        visits=[visit_view(e, zone) for e in record.encounters],
        expires=None
        if access.grant is None
        else access.grant.expires_at.astimezone(zone).strftime("%H:%M"),
        rpm=access.reason == "enrolled in remote monitoring",
    )


@bp.get("/<patient_id>/photos/<media_id>")
@login_required(role=_STAFF)
async def photo(patient_id: str, media_id: str) -> ResponseReturnValue:
    """One of the patient's photos (audited; ``no-store`` like every page)."""
    access = await require_access(patient_id)
    state = app_state()
    session = await current_session()
    assert session is not None  # login_required
    media = await db.run_sync(
        state.store.connection,
        _read_media,
        state.store,
        access,
        media_id,
        session.user.actor,
        state.clock(),
    )
    content = media.get("content") if media is not None else None
    if not isinstance(content, Mapping) or content.get("contentType") not in _IMAGE_TYPES:
        abort(404)
    try:
        data = base64.b64decode(str(content.get("data", "")), validate=True)
    except (binascii.Error, ValueError):
        abort(404)
    if intake.image_type(data) != content["contentType"]:
        abort(404)  # never serve bytes as a type they are not
    response = Response(data, mimetype=str(content["contentType"]))
    response.headers["Content-Disposition"] = "inline"
    return response
