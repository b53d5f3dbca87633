"""IHE BALP shapes: audit records as FHIR R4 AuditEvents, checkpoints as Provenance (pure).

Each record becomes one R4 ``AuditEvent`` shaped after the IHE Basic Audit Log Patterns
(BALP 1.1, ``IHE.BasicAudit.*``, https://profiles.ihe.net/ITI/BALP/): REST accesses use
``type`` audit-event-type ``rest`` with a restful-interaction ``subtype`` and the action code
BALP fixes (read R, search E, create C, update U, delete D); the rest use DICOM PS3.16 event
types (110106 Export, 110114 User Authentication with 110122 Login / 110123 Logout, 110113
Security Alert with 110127 Emergency Override Started / 110129 Security Configuration /
110131 Software Configuration). Every event also carries our own action in the subtype
system :data:`ACTION_SYSTEM`, so the mapping loses nothing (export, print and sync share a
DICOM code). The requesting agent is our actor string; the appliance is the source
(``source.site`` and observer = the site id). The patient is an entity (type 1 Person, role
1 Patient) whose ``what`` is a logical ``Reference(Patient)`` holding only the pseudonymous
patient key under a site-scoped system: nothing is decrypted and no PHI is added. No
``meta.profile`` is claimed: BALP requires ``agent.network``, which the records do not hold.

An R4 AuditEvent has no ``identifier`` element, so a record's identity (its chain hash, hex)
travels as a ``meta.tag`` under :func:`record_system`; ``_tag`` is searchable on every
server, which makes the conditional create (``ifNoneExist: _tag=<system>|<hash>``) work.

Bytes in, dicts out: no I/O here (STYLE.md, sans-I/O); :mod:`sync_agent.audit_export` sends.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from appliance import fhir
from appliance.audit import AuditAction, Checkpoint, Outcome
from sync_agent.upstream import as_list

ACTION_SYSTEM = "urn:telehealth-appliance:fhir:audit-action"
CHECKPOINT_EXTENSION = "urn:telehealth-appliance:fhir:audit-checkpoint"
SITE_SYSTEM = "urn:telehealth-appliance:site"

_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
_REST = "http://hl7.org/fhir/restful-interaction"
_DCM = "http://dicom.nema.org/resources/ontology/DCM"
_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
_PROVENANCE_AGENT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
_SIGNATURE_TYPE = "urn:iso-astm:E1762-95:2013"
Coding = dict[str, str]


def _coding(system: str, code: str, display: str) -> Coding:
    return {"system": system, "code": code, "display": display}


_REST_TYPE = _coding(_EVENT_TYPE, "rest", "Restful Operation")
_EXPORT = _coding(_DCM, "110106", "Export")
_AUTHENTICATION = _coding(_DCM, "110114", "User Authentication")
_SECURITY_ALERT = _coding(_DCM, "110113", "Security Alert")

# action → (type, standard subtype or None, AuditEvent.action). REST codes and action codes
# from the BALP profiles Read/Query/Create/Update/Delete; the others from DICOM PS3.16
# CID 400-403 (event types, authentication and security-alert subtypes).
_SHAPES: dict[AuditAction, tuple[Coding, Coding | None, str]] = {
    AuditAction.READ: (_REST_TYPE, _coding(_REST, "read", "read"), "R"),
    AuditAction.SEARCH: (_REST_TYPE, _coding(_REST, "search", "search"), "E"),
    AuditAction.CREATE: (_REST_TYPE, _coding(_REST, "create", "create"), "C"),
    AuditAction.UPDATE: (_REST_TYPE, _coding(_REST, "update", "update"), "U"),
    AuditAction.DELETE: (_REST_TYPE, _coding(_REST, "delete", "delete"), "D"),
    AuditAction.EXPORT: (_EXPORT, None, "R"),
    AuditAction.PRINT: (_EXPORT, None, "R"),
    AuditAction.SYNC: (_EXPORT, None, "R"),
    AuditAction.LOGIN: (_AUTHENTICATION, _coding(_DCM, "110122", "Login"), "E"),
    AuditAction.LOGOUT: (_AUTHENTICATION, _coding(_DCM, "110123", "Logout"), "E"),
    AuditAction.LOGIN_FAILED: (_AUTHENTICATION, _coding(_DCM, "110122", "Login"), "E"),
    AuditAction.BREAK_GLASS: (
        _SECURITY_ALERT,
        _coding(_DCM, "110127", "Emergency Override Started"),
        "E",
    ),
    AuditAction.KEY_ROTATION: (
        _SECURITY_ALERT,
        _coding(_DCM, "110129", "Security Configuration"),
        "E",
    ),
    AuditAction.CONFIG: (_SECURITY_ALERT, _coding(_DCM, "110131", "Software Configuration"), "E"),
}
# R4 AuditEvent.outcome: 0 success, 4 minor failure (refused, may retry), 8 serious failure.
_OUTCOMES = {Outcome.SUCCESS: "0", Outcome.DENIED: "4", Outcome.FAILURE: "8"}
# The person's part in the event (BALP: IRCP for reads and queries; AUT for creates).
_RECEIVES = frozenset({AuditAction.READ, AuditAction.SEARCH, AuditAction.EXPORT, AuditAction.PRINT})
_AUTHORS = frozenset(
    {
        AuditAction.CREATE,
        AuditAction.UPDATE,
        AuditAction.DELETE,
        AuditAction.CONFIG,
        AuditAction.KEY_ROTATION,
    }
)


def record_system(site_id: str) -> str:
    """The tag system that identifies this site's audit records (code = chain hash, hex)."""
    return f"{SITE_SYSTEM}:{site_id}:audit-record"


def checkpoint_system(site_id: str) -> str:
    """The tag system of this site's checkpoint anchors (code: :func:`checkpoint_code`)."""
    return f"{SITE_SYSTEM}:{site_id}:audit-checkpoint"


def checkpoint_code(checkpoint: Checkpoint) -> str:
    """The anchor's tag code, ``<audit id>:<chain hash, hex>``: what its conditional create
    is keyed on. Both, not the id alone: a trail cut back and grown again signs a checkpoint
    at an id an old anchor holds, and keyed by id that new anchor met the old one (200) and
    was never stored upstream."""
    return f"{checkpoint.audit_id}:{checkpoint.hash.hex()}"


def patient_key_system(site_id: str) -> str:
    """The identifier system of this site's pseudonymous patient keys (value = key, hex)."""
    return f"{SITE_SYSTEM}:{site_id}:patient-key"


def actor_system(site_id: str) -> str:
    """The identifier system of this site's actors (``user:<name>``, ``service:<process>``)."""
    return f"{SITE_SYSTEM}:{site_id}:actor"


@dataclass(frozen=True, slots=True)
class ExportRow:
    """One audit record as the exporter reads it (the stored values and the chain hash)."""

    id: int
    ts: str
    actor: str
    action: str
    outcome: str
    patient_key: bytes | None
    entity: str | None
    detail: str | None
    hash: bytes


def _site_agent(site_id: str) -> dict[str, Any]:
    return {"identifier": {"system": SITE_SYSTEM, "value": site_id}, "display": site_id}


def _data_entity(row: ExportRow, action: AuditAction) -> dict[str, Any] | None:
    if row.entity is None and row.detail is None:
        return None
    entity: dict[str, Any] = {"type": _coding(_ENTITY_TYPE, "2", "System Object")}
    if action is AuditAction.SEARCH and row.entity is not None:
        entity["role"] = _coding(_OBJECT_ROLE, "24", "Query")
        entity["description"] = row.entity
        entity["query"] = base64.b64encode(row.entity.encode()).decode()
    elif row.entity is not None:
        entity["role"] = _coding(_OBJECT_ROLE, "4", "Domain Resource")
        rtype, _, local_id = row.entity.partition("/")
        if rtype[:1].isupper() and len(local_id) == 36 and local_id.count("-") == 4:
            # The identifier the resource itself carries upstream (outbox delivery).
            entity["what"] = {
                "type": rtype,
                "identifier": {
                    "system": fhir.IDENTIFIER_SYSTEM,
                    "value": fhir.identifier_value(local_id),
                },
            }
        else:
            entity["what"] = {"display": row.entity}
    if row.detail is not None:
        entity["detail"] = [{"type": "detail", "valueString": row.detail}]
    return entity


def audit_event(row: ExportRow, *, site_id: str) -> fhir.FhirJson:
    """The BALP-shaped R4 AuditEvent of one record (pure; raises ValueError on a bad row)."""
    action, outcome = AuditAction(row.action), Outcome(row.outcome)
    event_type, subtype, code = _SHAPES[action]
    requestor: dict[str, Any] = {
        "who": {"identifier": {"system": actor_system(site_id), "value": row.actor}},
        "name": row.actor.partition(":")[2] or row.actor,
        "requestor": True,
    }
    if row.actor.startswith("service:"):
        requestor["type"] = {"coding": [_coding(_DCM, "110150", "Application")]}
    elif action in _RECEIVES:
        requestor["type"] = {"coding": [_coding(_PARTICIPATION, "IRCP", "information recipient")]}
    elif action in _AUTHORS:
        requestor["type"] = {"coding": [_coding(_PARTICIPATION, "AUT", "author")]}
    entities = []
    if row.patient_key is not None:
        entities.append(
            {
                "what": {
                    "type": "Patient",
                    "identifier": {
                        "system": patient_key_system(site_id),
                        "value": row.patient_key.hex(),
                    },
                },
                "type": _coding(_ENTITY_TYPE, "1", "Person"),
                "role": _coding(_OBJECT_ROLE, "1", "Patient"),
            }
        )
    data = _data_entity(row, action)
    if data is not None:
        entities.append(data)
    event: fhir.FhirJson = {
        "resourceType": "AuditEvent",
        "meta": {
            "tag": [
                {
                    "system": record_system(site_id),
                    "code": row.hash.hex(),
                    "display": f"audit record {row.id}",
                }
            ]
        },
        "type": event_type,
        "subtype": [
            *([subtype] if subtype is not None else []),
            {"system": ACTION_SYSTEM, "code": action.value},
        ],
        "action": code,
        "recorded": row.ts,
        "outcome": _OUTCOMES[outcome],
        "agent": [
            requestor,
            {
                # BALP: the server accessed (this box) is the Destination; the client, the Source.
                "type": {"coding": [_coding(_DCM, "110152", "Destination Role ID")]},
                "who": _site_agent(site_id),
                "requestor": False,
            },
        ],
        "source": {
            "site": site_id,
            "observer": _site_agent(site_id),
            "type": [_coding(_SOURCE_TYPE, "4", "Application Server")],
        },
    }
    if outcome is not Outcome.SUCCESS:
        event["outcomeDesc"] = outcome.value
    if entities:
        event["entity"] = entities
    return event


def checkpoint_provenance(
    checkpoint: Checkpoint, *, site_id: str, public_key_hex: str
) -> fhir.FhirJson:
    """The anchor of a signed checkpoint: a Provenance over the chain head's AuditEvent.

    ``signature.data`` is the raw Ed25519 signature over :meth:`Checkpoint.message`; the
    extension holds the signed fields byte for byte (the timestamp text is part of what was
    signed, so it travels as a string, not only as the ``recorded`` instant).
    """
    signed = checkpoint.to_json()
    who = _site_agent(site_id)
    return {
        "resourceType": "Provenance",
        "meta": {
            "tag": [
                {
                    "system": checkpoint_system(site_id),
                    "code": checkpoint_code(checkpoint),
                    "display": f"audit checkpoint at record {checkpoint.audit_id}",
                }
            ]
        },
        "extension": [
            {
                "url": CHECKPOINT_EXTENSION,
                "extension": [
                    {"url": "auditId", "valueString": str(checkpoint.audit_id)},
                    {"url": "hash", "valueString": signed["hash"]},
                    {"url": "signedTs", "valueString": signed["ts"]},
                    {"url": "publicKey", "valueString": public_key_hex},
                ],
            }
        ],
        "target": [
            {
                "type": "AuditEvent",
                "identifier": {"system": record_system(site_id), "value": signed["hash"]},
                "display": f"audit record {checkpoint.audit_id}",
            }
        ],
        "recorded": signed["ts"],
        "agent": [
            {
                "type": {"coding": [_coding(_PROVENANCE_AGENT, "author", "Author")]},
                "who": who,
            }
        ],
        "signature": [
            {
                "type": [_coding(_SIGNATURE_TYPE, "1.2.840.10065.1.12.1.14", "Source Signature")],
                "when": signed["ts"],
                "who": who,
                "sigFormat": "application/octet-stream",
                "data": base64.b64encode(checkpoint.signature).decode(),
            }
        ],
    }


def anchor_from_provenance(resource: Any) -> Checkpoint:
    """The checkpoint an anchor Provenance carries; raises ValueError when it is not one.

    ``resource`` is whatever a server sent: any shape that is not an anchor is a ValueError.
    """
    if not isinstance(resource, dict):
        raise ValueError("not an audit checkpoint anchor (not a resource)")
    fields: dict[str, str] = {}
    for ext in as_list(resource.get("extension")):
        if isinstance(ext, dict) and ext.get("url") == CHECKPOINT_EXTENSION:
            for part in as_list(ext.get("extension")):
                if isinstance(part, dict) and isinstance(part.get("valueString"), str):
                    fields[str(part.get("url"))] = part["valueString"]
    signatures = resource.get("signature") or [{}]
    try:
        found = Checkpoint(
            audit_id=int(fields["auditId"]),
            hash=bytes.fromhex(fields["hash"]),
            ts=datetime.fromisoformat(fields["signedTs"]).astimezone(UTC),
            signature=base64.b64decode(signatures[0]["data"], validate=True),
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"not an audit checkpoint anchor ({type(exc).__name__})") from None
    # What no checkpoint of ours can be (an audit id is a SQLite rowid, a hash SHA-256): such
    # an "anchor" would crash the signature check, or hide the real newest one.
    if not 1 <= found.audit_id < 2**63 or len(found.hash) != 32:
        raise ValueError("not an audit checkpoint anchor (audit id or hash out of range)")
    return found
