"""What a patient tells the kiosk, as FHIR: the intake Questionnaire and its answers, consent,
photos, arrival, insurance and the demographic edits they make.

Pure builders (no I/O, the time is a parameter): the kiosk blueprint (``web/kiosk.py``)
parses forms into the typed answers here and stores what these functions return.

* The **intake questionnaire** is one FHIR Questionnaire (reason for visit, symptoms, the
  PHQ-2). Its item texts are English and double as the gettext message ids the kiosk
  translates. Answers become a QuestionnaireResponse whose items carry the LOINC codes of
  the PHQ-2 (44250-9, 44255-8; answers LA6568-5 … LA6571-9) and the total score (55758-7,
  0-6; 3 or more is a positive screen, Kroenke et al., Med Care 2003;41:1284).
* **Consent** to a telehealth visit is a Consent (scope treatment, patient opted in) with the
  drawn signature as its ``sourceAttachment`` (PNG).
* **Photos** for store-and-forward are Media resources with the image inline (the store
  encrypts it like any resource).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from appliance import fhir
from appliance.numbers import small_int

QUESTIONNAIRE_URL = "urn:telehealth-appliance:questionnaire:kiosk-intake"
QUESTIONNAIRE_VERSION = "1"
CONSENT_POLICY = "urn:telehealth-appliance:consent:telehealth-visit:v1"
LOINC = "http://loinc.org"

REASON_MAX = 500
PHQ2_POSITIVE = 3  # Kroenke 2003: a total of 3 or more warrants the PHQ-9
SIGNATURE_MAX_BYTES = 40 * 1024  # a stroke drawing on a 600x200 canvas is 5-15 KB
PHOTO_MAX_BYTES = 5 * 1024 * 1024

# (value, English text = message id); "none" excludes the others.
SYMPTOMS: tuple[tuple[str, str], ...] = (
    ("fever", "Fever or chills"),
    ("cough", "Cough"),
    ("breath", "Shortness of breath"),
    ("pain", "Pain"),
    ("dizzy", "Dizziness"),
    ("none", "None of these"),
)

# PHQ-2 items: (link id, LOINC, English text) and the four answers (LOINC answer, score, text).
PHQ2_ITEMS: tuple[tuple[str, str, str], ...] = (
    ("phq2-interest", "44250-9", "Little interest or pleasure in doing things"),
    ("phq2-mood", "44255-8", "Feeling down, depressed, or hopeless"),
)
PHQ2_ANSWERS: tuple[tuple[str, int, str], ...] = (
    ("LA6568-5", 0, "Not at all"),
    ("LA6569-3", 1, "Several days"),
    ("LA6570-1", 2, "More than half the days"),
    ("LA6571-9", 3, "Nearly every day"),
)
PHQ2_TOTAL = ("phq2-total", "55758-7", "PHQ-2 total score")
PHQ2_STEM = "Over the last 2 weeks, how often have you been bothered by the following problems?"
REASON_TEXT = "What is the main reason for your visit today?"
SYMPTOMS_TEXT = "Do you have any of these symptoms?"


class IntakeError(ValueError):
    """A form that cannot become a resource; ``message`` is a fixed, translatable sentence."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class IntakeAnswers:
    """What the patient answered."""

    reason: str
    symptoms: tuple[str, ...]
    phq2: tuple[int, int]  # indexes into PHQ2_ANSWERS, in PHQ2_ITEMS order

    @property
    def phq2_score(self) -> int:
        """The PHQ-2 total, 0-6."""
        return sum(PHQ2_ANSWERS[i][1] for i in self.phq2)


def _coding(system: str, code: str, display: str) -> dict[str, str]:
    return {"system": system, "code": code, "display": display}


def questionnaire() -> fhir.FhirJson:
    """The kiosk intake Questionnaire (what the form is rendered from)."""
    return {
        "resourceType": "Questionnaire",
        "url": QUESTIONNAIRE_URL,
        "version": QUESTIONNAIRE_VERSION,
        "name": "KioskIntake",
        "title": "Kiosk intake",
        "status": "active",
        "subjectType": ["Patient"],
        "item": [
            {"linkId": "reason", "text": REASON_TEXT, "type": "string", "required": True,
             "maxLength": REASON_MAX},
            {
                "linkId": "symptoms",
                "text": SYMPTOMS_TEXT,
                "type": "choice",
                "repeats": True,
                "answerOption": [
                    {"valueCoding": {"system": f"{QUESTIONNAIRE_URL}:symptom", "code": value,
                                     "display": text}}
                    for value, text in SYMPTOMS
                ],
            },
            {
                "linkId": "phq2",
                "text": PHQ2_STEM,
                "type": "group",
                "code": [_coding(LOINC, "55757-9", "PHQ-2")],
                "item": [
                    *(
                        {
                            "linkId": link,
                            "code": [_coding(LOINC, code, text)],
                            "text": text,
                            "type": "choice",
                            "required": True,
                            "answerOption": [
                                {"valueCoding": _coding(LOINC, answer, label)}
                                for answer, _score, label in PHQ2_ANSWERS
                            ],
                        }
                        for link, code, text in PHQ2_ITEMS
                    ),
                    {
                        "linkId": PHQ2_TOTAL[0],
                        "code": [_coding(LOINC, PHQ2_TOTAL[1], PHQ2_TOTAL[2])],
                        "text": PHQ2_TOTAL[2],
                        "type": "integer",
                        "readOnly": True,
                    },
                ],
            },
        ],
    }  # fmt: skip


def parse_answers(form: Mapping[str, str], symptoms: Sequence[str]) -> IntakeAnswers:
    """Typed answers from the intake form; raises :class:`IntakeError` on a missing answer."""
    reason = " ".join(form.get("reason", "").split())
    if not reason:
        raise IntakeError("Please tell us why you are here today.")
    if len(reason) > REASON_MAX:
        raise IntakeError("Please keep the reason for your visit shorter.")
    known = {value for value, _ in SYMPTOMS}
    chosen = tuple(dict.fromkeys(s for s in symptoms if s in known))
    if "none" in chosen:
        chosen = ("none",)
    phq2: list[int] = []
    for link, _code, _text in PHQ2_ITEMS:
        value = form.get(link, "")
        answer = small_int(value)
        if answer is None or answer >= len(PHQ2_ANSWERS):
            raise IntakeError("Please answer both questions about how you have been feeling.")
        phq2.append(answer)
    return IntakeAnswers(reason, chosen, (phq2[0], phq2[1]))


def questionnaire_response(
    answers: IntakeAnswers, patient_ref: str, authored: datetime, language: str
) -> fhir.FhirJson:
    """The QuestionnaireResponse of ``answers``, linked to the patient and the Questionnaire."""
    symptom_text = dict(SYMPTOMS)
    phq2_items: list[dict[str, Any]] = [
        {
            "linkId": link,
            "text": text,
            "answer": [
                {"valueCoding": _coding(LOINC, PHQ2_ANSWERS[index][0], PHQ2_ANSWERS[index][2])}
            ],
        }
        for (link, _code, text), index in zip(PHQ2_ITEMS, answers.phq2, strict=True)
    ]
    phq2_items.append(
        {
            "linkId": PHQ2_TOTAL[0],
            "text": PHQ2_TOTAL[2],
            "answer": [{"valueInteger": answers.phq2_score}],
        }
    )
    items: list[dict[str, Any]] = [
        {"linkId": "reason", "text": REASON_TEXT, "answer": [{"valueString": answers.reason}]},
    ]
    if answers.symptoms:
        items.append(
            {
                "linkId": "symptoms",
                "text": SYMPTOMS_TEXT,
                "answer": [
                    {
                        "valueCoding": {
                            "system": f"{QUESTIONNAIRE_URL}:symptom",
                            "code": s,
                            "display": symptom_text[s],
                        }
                    }
                    for s in answers.symptoms
                ],
            }
        )
    items.append({"linkId": "phq2", "text": PHQ2_STEM, "item": phq2_items})
    return {
        "resourceType": "QuestionnaireResponse",
        "questionnaire": f"{QUESTIONNAIRE_URL}|{QUESTIONNAIRE_VERSION}",
        "status": "completed",
        "language": language,
        "subject": {"reference": patient_ref},
        "authored": authored.isoformat(),
        "item": items,
    }


def phq2_score_of(response: Mapping[str, Any]) -> int | None:
    """The PHQ-2 total stored in a QuestionnaireResponse (None when it has none)."""
    for group in response.get("item", []):
        for item in group.get("item", []) if isinstance(group, Mapping) else []:
            if isinstance(item, Mapping) and item.get("linkId") == PHQ2_TOTAL[0]:
                value = item.get("answer", [{}])[0].get("valueInteger")
                return value if isinstance(value, int) else None
    return None


# -- consent, photos, arrival, insurance, demographics -----------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def image_type(data: bytes) -> str | None:
    """``image/png`` or ``image/jpeg`` by the file's magic bytes, else None."""
    if data.startswith(PNG_MAGIC):
        return "image/png"
    if data.startswith(JPEG_MAGIC):
        return "image/jpeg"
    return None


def signature_png(data_url: str) -> bytes:
    """The PNG bytes of a canvas ``data:image/png;base64,…`` URL (size-capped, type-checked)."""
    prefix = "data:image/png;base64,"
    if not data_url.startswith(prefix):
        raise IntakeError("Please sign in the box.")
    encoded = data_url[len(prefix) :]
    if len(encoded) > SIGNATURE_MAX_BYTES * 4 // 3 + 4:
        raise IntakeError("The signature is too large. Please clear it and sign again.")
    try:
        png = base64.b64decode(encoded, validate=True)
    except ValueError as exc:
        raise IntakeError("Please sign in the box.") from exc
    if image_type(png) != "image/png" or len(png) > SIGNATURE_MAX_BYTES:
        raise IntakeError("Please sign in the box.")
    return png


def consent(
    patient_ref: str, signature: bytes, signed: datetime, language: str, consent_text: str
) -> fhir.FhirJson:
    """The patient's consent to a telehealth visit, with the drawn signature attached."""
    return {
        "resourceType": "Consent",
        "status": "active",
        "language": language,
        "scope": {
            "coding": [
                _coding(
                    "http://terminology.hl7.org/CodeSystem/consentscope", "treatment", "Treatment"
                )
            ]
        },
        "category": [{"coding": [_coding(LOINC, "59284-0", "Patient Consent")]}],
        "patient": {"reference": patient_ref},
        "dateTime": signed.isoformat(),
        "policy": [{"uri": CONSENT_POLICY}],
        "sourceAttachment": {
            "contentType": "image/png",
            "language": language,
            "data": base64.b64encode(signature).decode(),
            "title": f"Signature: {consent_text}"[:250],
            "creation": signed.isoformat(),
        },
        "provision": {"type": "permit"},
    }


def photo_media(patient_ref: str, image: bytes, taken: datetime, station: str) -> fhir.FhirJson:
    """A store-and-forward photo as a FHIR Media (the image inline; the store encrypts it)."""
    content_type = image_type(image)
    if content_type is None:
        raise IntakeError("Only JPEG or PNG photos can be sent.")
    if len(image) > PHOTO_MAX_BYTES:
        raise IntakeError("The photo is too large (at most 5 MB).")
    return {
        "resourceType": "Media",
        "status": "completed",
        "type": {
            "coding": [
                _coding("http://terminology.hl7.org/CodeSystem/media-type", "image", "Image")
            ]
        },
        "subject": {"reference": patient_ref},
        "createdDateTime": taken.isoformat(),
        "issued": taken.isoformat(),
        "deviceName": f"kiosk {station}",
        "content": {
            "contentType": content_type,
            "data": base64.b64encode(image).decode(),
            "title": "Photo taken at the kiosk",
            "size": len(image),
        },
    }


def arrival(
    patient_ref: str, arrived: datetime, station: str, appointment_id: str | None
) -> fhir.FhirJson:
    """The patient's arrival: an Encounter in status ``arrived`` (the nurse's queue)."""
    encounter: fhir.FhirJson = {
        "resourceType": "Encounter",
        "status": "arrived",
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "VR",
            "display": "virtual",
        },
        "subject": {"reference": patient_ref},
        "period": {"start": arrived.isoformat()},
        "location": [{"location": {"display": f"kiosk {station}"}}],
    }
    if appointment_id is not None:
        encounter["appointment"] = [{"reference": f"Appointment/{appointment_id}"}]
    return encounter


def coverage(patient_ref: str, payer: str, member_id: str) -> fhir.FhirJson:
    """Insurance the patient reported at the kiosk (a new Coverage; staff verify it)."""
    return {
        "resourceType": "Coverage",
        "status": "draft",  # self-reported until the front desk verifies it
        "beneficiary": {"reference": patient_ref},
        "subscriberId": member_id,
        "payor": [{"display": payer}],
    }


def walk_in_patient(given: str, family: str, birth_date: str, phone: str) -> fhir.FhirJson:
    """A Patient registered at the kiosk by a walk-in."""
    patient: fhir.FhirJson = {
        "resourceType": "Patient",
        "name": [{"use": "official", "family": family, "given": [given]}],
        "birthDate": birth_date,
    }
    if phone:
        patient["telecom"] = [{"system": "phone", "value": phone, "use": "mobile"}]
    return patient


def with_contact(
    patient: Mapping[str, Any], phone: str, line: str, city: str, postal: str
) -> fhir.FhirJson | None:
    """``patient`` with a new phone and/or home address; None when nothing changes."""
    body = dict(patient)
    changed = False
    if phone:
        others = [t for t in body.get("telecom", []) if t.get("system") != "phone"]
        body["telecom"] = [{"system": "phone", "value": phone, "use": "mobile"}, *others]
        changed = True
    if line or city or postal:
        address: dict[str, Any] = {"use": "home"}
        if line:
            address["line"] = [line]
        if city:
            address["city"] = city
        if postal:
            address["postalCode"] = postal
        others = [a for a in body.get("address", []) if a.get("use") != "home"]
        body["address"] = [address, *others]
        changed = True
    return body if changed else None
