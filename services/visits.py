"""A telehealth visit seen by a remote provider: what the page shows, and completing it.

The provider view (``web/provider.py``, ``docs/provider.md``) reads through here, always as
the link's actor (``provider-link:<id>``), so every read is audited with the patient key.

**What "this visit" is.** The kiosk records the intake answers, the consent, the vitals and
the photos *before* it records the arrival Encounter (at its last step), and links them to the
patient only. So the visit starts at the intake's ``authored`` time when an intake was given
within :data:`CHECK_IN_LOOKBACK` before the arrival, else at the arrival itself; readings and
photos from then on are this visit's, older ones are history.

**Completing** writes, in one transaction, a new ``Encounter`` (status ``finished``, class
``VR``, ``period.end``, ``partOf`` the arrival, the diagnoses as ICD-10-CM ``reasonCode``, this
site as its location) and the visit note as a ``DocumentReference``, and marks the link
completed. The store keeps Encounters append-only (``Store.update`` edits Patients only), so
the arrival Encounter itself stays ``arrived``; the finished visit points at it with
``partOf`` and the link row names both. Then the claims service decides the Q3014 facility
fee for the finished Encounter.

Why a ``DocumentReference`` for the note and not a ``Composition``: a plain-text note is one
attachment with a LOINC document type, which is how US Core (Clinical Notes) and the EHRs we
deliver to exchange clinical notes; a ``Composition`` only stands as the first entry of a
document ``Bundle`` with sections, attester and custodian, which a free-text note does not need.
"""

from __future__ import annotations

import base64
import logging
import re
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from appliance import audit, db, fhir, visit_links
from appliance.audit import AuditAction, AuditEvent
from appliance.config import Config
from appliance.store import Store
from appliance.visit_links import VisitLink
from services import intake
from services.claims.fhir_claim import ICD10_SYSTEM
from services.claims.service import SITE_SYSTEM, ClaimsService

logger = logging.getLogger(__name__)

# The kiosk ends a flow after 30 minutes at most (web/kiosk.py FLOW_MAX_S): an intake more
# than an hour before the arrival belongs to another visit.
CHECK_IN_LOOKBACK = timedelta(hours=1)
NOTE_MAX_BYTES = 32 * 1024  # UTF-8; under the app's 64 KiB request cap with the form around it
CODES_MAX = 12  # an 837P carries at most 12 diagnosis codes (HI segment)
HISTORY_SCAN = 200
PHOTOS_SHOWN = 6
# ICD-10-CM: a letter, two digits (or digit + letter, e.g. C4A), then up to 4 characters after
# the dot. The same letters as the claim check (services/claims/checks.py), which refuses U.
_ICD10_CM = re.compile(r"([A-Z][0-9][0-9A-Z])\.?([0-9A-Z]{1,4})?")  # U codes too (U07.1)
LOINC = intake.LOINC
PROGRESS_NOTE = ("11506-3", "Progress note")
NOTE_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category"
VITAL_LABELS = {
    "85354-9": "Blood pressure",
    "8867-4": "Heart rate",
    "59408-5": "Oxygen saturation",
    "2708-6": "Oxygen saturation",
    "29463-7": "Body weight",
    "8310-5": "Body temperature",
    "2339-0": "Glucose",
    "41653-7": "Glucose",
    "9279-1": "Respiratory rate",
}


class VisitError(ValueError):
    """A note or code list that cannot be recorded; the message is shown to the provider."""


# -- reading the visit -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reading:
    """One vital-sign reading as the page shows it."""

    id: str
    code: str
    label: str
    value: str
    effective: str  # UTC text (sortable), "" when unknown

    def to_event(self, zone: ZoneInfo) -> dict[str, str]:
        """The JSON body of a live ``reading`` event."""
        return {"id": self.id, "label": self.label, "value": self.value, "time": self.shown(zone)}

    def shown(self, zone: ZoneInfo) -> str:
        """The clinic's wall-clock time of the reading."""
        if not self.effective:
            return ""
        moment = datetime.fromisoformat(self.effective.replace("Z", "+00:00"))
        return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M")


@dataclass(frozen=True, slots=True)
class Intake:
    """The patient's answers at check-in."""

    reason: str
    symptoms: tuple[str, ...]
    phq2: tuple[tuple[str, str], ...]  # (question, answer)
    phq2_score: int | None
    authored: str

    @property
    def phq2_positive(self) -> bool:
        """A total of 3 or more is a positive screen (Kroenke 2003)."""
        return self.phq2_score is not None and self.phq2_score >= intake.PHQ2_POSITIVE

    @property
    def phq2_interpretation(self) -> str:
        """What the score means, in words."""
        if self.phq2_score is None:
            return "not scored"
        if self.phq2_positive:
            return "positive screen (3 or more): consider the PHQ-9"
        return "negative screen (below 3)"


@dataclass(frozen=True, slots=True)
class Photo:
    """A store-and-forward photo of this visit (the image is served separately)."""

    id: str
    title: str
    content_type: str
    taken: str


@dataclass(frozen=True, slots=True)
class Visit:
    """Everything the provider page shows."""

    encounter: fhir.FhirJson
    patient_name: str
    age: int | None
    gender: str
    started: str  # UTC text: where "this visit" begins
    intake: Intake | None
    consent: str | None  # when the telehealth consent was signed (UTC text), None: none
    vitals: tuple[Reading, ...]  # this visit's, oldest first
    history: tuple[Reading, ...]  # the newest earlier reading per vital
    photos: tuple[Photo, ...]


def reading_of(observation: Mapping[str, Any]) -> Reading | None:
    """A vital-sign Observation as a :class:`Reading` (None when it has no value to show)."""
    codings = observation.get("code", {}).get("coding", [])
    code = next((str(c.get("code")) for c in codings if c.get("system") == LOINC), "")
    label = VITAL_LABELS.get(code) or str(observation.get("code", {}).get("text", "")) or "Reading"
    if code == "85354-9":
        values: dict[str, Any] = {}
        for component in observation.get("component", []):
            ccode = next((c.get("code") for c in component.get("code", {}).get("coding", [])), "")
            values[str(ccode)] = component.get("valueQuantity", {}).get("value")
        sys_, dia = values.get("8480-6"), values.get("8462-4")
        if not isinstance(sys_, int | float) or not isinstance(dia, int | float):
            return None
        value = f"{sys_:g}/{dia:g} mmHg"
    else:
        quantity = observation.get("valueQuantity")
        if not isinstance(quantity, Mapping) or not isinstance(quantity.get("value"), int | float):
            return None
        unit = str(quantity.get("unit") or quantity.get("code") or "")
        value = f"{quantity['value']:g} {unit}".strip()
    return Reading(
        str(observation.get("id", "")), code, label, value, fhir.effective_utc(observation) or ""
    )


def display_name(patient: Mapping[str, Any]) -> str:
    """``Given Family`` from the official name, else the first one."""
    names = [n for n in patient.get("name", []) if isinstance(n, Mapping)]
    if not names:
        return "(no name on file)"
    name = next((n for n in names if n.get("use") == "official"), names[0])
    given = " ".join(str(g) for g in name.get("given", []) if g)
    return " ".join(p for p in (given, str(name.get("family", ""))) if p) or "(no name on file)"


def age_on(birth_date: object, today: date) -> int | None:
    """Whole years on ``today`` (None for a missing or partial birth date)."""
    if not isinstance(birth_date, str) or len(birth_date) != 10:
        return None
    try:
        born = date.fromisoformat(birth_date)
    except ValueError:
        return None
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


def _intake_of(response: Mapping[str, Any]) -> Intake:
    reason, symptoms, phq2 = "", [], []
    for item in response.get("item", []):
        link = item.get("linkId")
        answers = item.get("answer", [])
        if link == "reason" and answers:
            reason = str(answers[0].get("valueString", ""))
        elif link == "symptoms":
            symptoms = [str(a.get("valueCoding", {}).get("display", "")) for a in answers]
        elif link == "phq2":
            for sub in item.get("item", []):
                if sub.get("linkId") == intake.PHQ2_TOTAL[0]:
                    continue
                shown = sub.get("answer", [{}])[0].get("valueCoding", {}).get("display", "")
                phq2.append((str(sub.get("text", "")), str(shown)))
    return Intake(
        reason,
        tuple(symptoms),
        tuple(phq2),
        intake.phq2_score_of(response),
        fhir.effective_utc({"effectiveDateTime": response.get("authored")}) or "",
    )


def arrival_start(encounter: Mapping[str, Any]) -> str:
    """The arrival's ``period.start`` as UTC text ("" when it has none)."""
    start = (encounter.get("period") or {}).get("start")
    return fhir.effective_utc({"effectiveDateTime": start}) or ""


def _utc(moment: datetime) -> str:
    return fhir.utc_text(moment)


def _parse_utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def visit_start(store: Store, link: VisitLink, encounter: Mapping[str, Any]) -> str:
    """Where this visit begins (UTC text): the intake given at check-in, else the arrival."""
    found = await _intake_response(store, link, encounter)
    arrived = arrival_start(encounter)
    if found is None:
        return arrived
    authored = fhir.effective_utc({"effectiveDateTime": found.get("authored")}) or arrived
    return min(authored, arrived) if arrived else authored


async def _intake_response(
    store: Store, link: VisitLink, encounter: Mapping[str, Any]
) -> fhir.FhirJson | None:
    arrived = arrival_start(encounter)
    if not arrived:
        return None
    earliest = _utc(_parse_utc(arrived) - CHECK_IN_LOOKBACK)
    latest = _utc(_parse_utc(arrived) + timedelta(minutes=1))
    responses = await store.newest(
        f"Patient/{link.patient_id}", "QuestionnaireResponse", link.actor, limit=10
    )
    for response in responses:
        authored = fhir.effective_utc({"effectiveDateTime": response.get("authored")}) or ""
        questionnaire = str(response.get("questionnaire", ""))
        if questionnaire.startswith(intake.QUESTIONNAIRE_URL) and earliest <= authored <= latest:
            return response
    return None


async def load_visit(store: Store, link: VisitLink, zone: ZoneInfo, now: datetime) -> Visit:
    """Read what the provider page shows, as the link's actor (each read audited)."""
    patient_ref = f"Patient/{link.patient_id}"
    actor = link.actor
    encounter = await store.read("Encounter", link.encounter_id, actor)
    patient = await store.read("Patient", link.patient_id, actor)
    response = await _intake_response(store, link, encounter)
    found_intake = None if response is None else _intake_of(response)
    arrived = arrival_start(encounter)
    started = arrived
    if found_intake is not None and found_intake.authored:
        started = min(found_intake.authored, arrived) if arrived else found_intake.authored
    consents = await store.newest(patient_ref, "Consent", actor, limit=5)
    consent = next(
        (
            fhir.effective_utc({"effectiveDateTime": c.get("dateTime")}) or ""
            for c in consents
            if c.get("status") == "active"
            and any(p.get("uri") == intake.CONSENT_POLICY for p in c.get("policy", []))
        ),
        None,
    )
    observations = await store.newest(patient_ref, "Observation", actor, limit=HISTORY_SCAN)
    readings = [r for r in map(reading_of, observations) if r is not None]
    vitals = tuple(reversed([r for r in readings if r.effective and r.effective >= started]))
    history: dict[str, Reading] = {}
    for reading in readings:  # newest first: the first of each code is its last reading
        if reading.effective and reading.effective < started:
            history.setdefault(reading.code or reading.label, reading)
    photos = tuple(
        Photo(
            str(media.get("id", "")),
            str(media.get("content", {}).get("title", "Photo")),
            str(media.get("content", {}).get("contentType", "")),
            fhir.effective_utc(media) or "",
        )
        for media in await store.newest(patient_ref, "Media", actor, limit=PHOTOS_SHOWN)
        if (fhir.effective_utc(media) or "") >= started
    )
    return Visit(
        encounter=encounter,
        patient_name=display_name(patient),
        age=age_on(patient.get("birthDate"), now.astimezone(zone).date()),
        gender=str(patient.get("gender", "")),
        started=started,
        intake=found_intake,
        consent=consent,
        vitals=vitals,
        history=tuple(history.values()),
        photos=photos,
    )


async def readings_since(store: Store, link: VisitLink, started: str) -> list[Reading]:
    """This visit's readings so far, oldest first (the live feed's poll; audited)."""
    newest = await store.newest(f"Patient/{link.patient_id}", "Observation", link.actor, limit=20)
    found = [r for r in map(reading_of, newest) if r is not None and r.effective >= started]
    return list(reversed(found))


async def photo(store: Store, link: VisitLink, media_id: str) -> tuple[bytes, str] | None:
    """The image of one of the patient's photos, decrypted (None: not this patient's)."""
    media = await store.read("Media", media_id, link.actor)
    if fhir.patient_reference(media) != f"Patient/{link.patient_id}":
        return None
    content = media.get("content", {})
    kind = intake.image_type(base64.b64decode(content.get("data", ""))[:16])
    if kind is None:
        return None
    return base64.b64decode(content["data"]), kind


# -- arrivals a nurse may issue a link for ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrival:
    """An arrived patient's Encounter, for the nurse's choice."""

    encounter_id: str
    patient_id: str
    arrived: str  # UTC text


async def arrivals(store: Store, actor: str, since: datetime) -> list[Arrival]:
    """Encounters in status ``arrived`` since ``since``, newest first (audited as a search)."""

    def work(conn: sqlite3.Connection) -> list[Arrival]:
        rows = conn.execute(
            "SELECT id, logical_id, type, key_version, body FROM resources "
            "WHERE type = 'Encounter' AND effective >= ? ORDER BY effective DESC LIMIT 200",
            (_utc(since),),
        ).fetchall()
        found = []
        # One that fails authentication is left out (logged, audited): the others can
        # still be seen by a provider.
        failures: list[AuditEvent] = []
        for item in store.decrypt_readable(conn, rows, actor, failures):
            body = item.resource
            patient = fhir.patient_reference(body)
            if body.get("status") == "arrived" and patient is not None:
                found.append(
                    Arrival(item.logical_id, patient.removeprefix("Patient/"), arrival_start(body))
                )
        event = AuditEvent(actor, AuditAction.SEARCH, entity=f"Encounter arrived x{len(found)}")
        with db.transaction_sync(conn):
            audit.append(conn, [event, *failures], now=store.now())
        return found

    return await db.run_sync(store.connection, work)


# -- completing --------------------------------------------------------------------------


def parse_codes(text: str) -> tuple[str, ...]:
    """ICD-10-CM codes from what the provider typed (commas, spaces or lines between them).

    Returns them as ``R06.00`` (dotted, upper case), each once; raises :class:`VisitError`
    naming the first malformed one (a code is not PHI).
    """
    codes: list[str] = []
    for raw in re.split(r"[\s,;]+", text.strip()):
        if not raw:
            continue
        found = _ICD10_CM.fullmatch(raw.upper())
        if found is None:
            raise VisitError(f"{raw[:10]!r} is not an ICD-10-CM code (e.g. R06.00, J02.9, I10)")
        head, tail = found.group(1), found.group(2)
        codes.append(f"{head}.{tail}" if tail else head)
    unique = tuple(dict.fromkeys(codes))
    if not unique:
        raise VisitError("Give at least one ICD-10-CM diagnosis code.")
    if len(unique) > CODES_MAX:
        raise VisitError(f"At most {CODES_MAX} diagnosis codes.")
    return unique


def clean_note(text: str) -> str:
    """The note as it will be stored (line ends normalised); raises on empty or too long."""
    note = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    if not note:
        raise VisitError("Write the visit note before completing the visit.")
    if len(note.encode()) > NOTE_MAX_BYTES:
        raise VisitError(f"The note is too long (at most {NOTE_MAX_BYTES // 1024} KB of text).")
    return note


def finished_encounter(
    arrival: Mapping[str, Any],
    arrival_id: str,
    codes: Sequence[str],
    ended: datetime,
    config: Config,
    provider_name: str,
) -> fhir.FhirJson:
    """The finished telehealth visit: a new Encounter, ``partOf`` the arrival."""
    site = config.site
    locations = [dict(entry) for entry in arrival.get("location", [])]
    locations.append(
        {
            "location": {
                "identifier": {"system": SITE_SYSTEM, "value": site.id},
                "display": site.name,
            }
        }
    )
    body: fhir.FhirJson = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "VR",
            "display": "virtual",
        },
        "subject": dict(arrival.get("subject", {})),
        "period": {"start": (arrival.get("period") or {}).get("start"), "end": ended.isoformat()},
        "partOf": {"reference": f"Encounter/{arrival_id}"},
        "reasonCode": [{"coding": [{"system": ICD10_SYSTEM, "code": code}]} for code in codes],
        "location": locations,
    }
    if arrival.get("appointment"):
        body["appointment"] = [dict(a) for a in arrival["appointment"]]
    if provider_name:
        body["participant"] = [{"individual": {"display": provider_name}}]
    return body


def visit_note(
    patient_ref: str, arrival_id: str, note: str, written: datetime, author: str
) -> fhir.FhirJson:
    """The provider's plain-text note as a US Core clinical-note DocumentReference."""
    return {
        "resourceType": "DocumentReference",
        "status": "current",
        "docStatus": "final",
        "type": {"coding": [{"system": LOINC, "code": PROGRESS_NOTE[0], "display": PROGRESS_NOTE[1]}]},
        "category": [{"coding": [{"system": NOTE_CATEGORY, "code": "clinical-note",
                                  "display": "Clinical Note"}]}],
        "subject": {"reference": patient_ref},
        "date": written.isoformat(),
        "author": [{"display": author}],
        "description": "Telehealth visit note",
        "content": [{"attachment": {
            "contentType": "text/plain; charset=utf-8",
            "data": base64.b64encode(note.encode()).decode(),
            "title": "Visit note",
            "creation": written.isoformat(),
        }}],
        "context": {"encounter": [{"reference": f"Encounter/{arrival_id}"}]},
    }  # fmt: skip


@dataclass(frozen=True, slots=True)
class Completed:
    """What completing a visit did (no PHI)."""

    finished_encounter_id: str
    note_id: str
    claim_outcome: str
    claim_reason: str


class AlreadyEnded(VisitError):
    """The link was completed or revoked meanwhile (another tab, a nurse): nothing written."""


async def complete(
    store: Store,
    config: Config,
    link: VisitLink,
    note_text: str,
    codes_text: str,
    now: datetime,
) -> Completed:
    """Finish the visit: Encounter + note + link completed in one transaction, then the claim."""
    note = clean_note(note_text)
    codes = parse_codes(codes_text)
    arrival = await store.read("Encounter", link.encounter_id, link.actor)
    author = link.provider_name or f"Remote provider (visit link {link.id})"
    resources = [
        finished_encounter(arrival, link.encounter_id, codes, now, config, link.provider_name),
        visit_note(f"Patient/{link.patient_id}", link.encounter_id, note, now, author),
    ]

    def also(conn: sqlite3.Connection, row_ids: list[int]) -> None:
        ids = dict(
            conn.execute(
                "SELECT type, logical_id FROM resources WHERE id IN (?, ?)", tuple(row_ids)
            ).fetchall()
        )
        if not visit_links.mark_completed(
            conn,
            link.id,
            finished_encounter_id=str(ids["Encounter"]),
            note_id=str(ids["DocumentReference"]),
            now=now,
        ):
            raise AlreadyEnded("This visit was already completed or its link was revoked.")

    stored = await store.create(resources, link.actor, audit_each=True, also=also)
    encounter, document = stored[0], stored[1]
    try:
        decided = await ClaimsService(store, config).on_visit_finished(
            encounter.resource, patient_at_site=True
        )
        outcome, reason = decided.outcome.value, decided.reason
    except Exception as exc:  # the restart scan decides it later (docs/claims.md)
        # The type only: an exception's message may quote chart data.
        logger.error("claims decision for a finished visit failed (%s)", type(exc).__name__)
        outcome, reason = "error", "the claims decision failed; it is retried at the next scan"
    await db.run_sync(store.connection, visit_links.record_claim_outcome, link.id, outcome)
    return Completed(encounter.logical_id, document.logical_id, outcome, reason)
