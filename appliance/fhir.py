"""FHIR R4 helpers at the store's edge: validation, identity, and the plain index columns.

Validation uses ``fhir.resources.R4B`` (wire compatible with the R4 EHRs speak; REFERENCE.md).
Validation errors name the element path and the rule, never the offending value, because
the value may be PHI and error messages reach logs and HTTP responses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from appliance.errors import InvalidResourceError

# Our resources carry their own globally unique identifier, so a conditional create
# (``ifNoneExist: identifier=urn:ietf:rfc:3986|urn:uuid:...``) upstream is idempotent.
IDENTIFIER_SYSTEM = "urn:ietf:rfc:3986"

# Project-defined tag systems on every reading: where (clinic | home), how (ble | serial |
# manual | vendor-hub | simulated) it was captured, and where its time came from.
CAPTURE_SETTING_SYSTEM = "urn:telehealth-appliance:fhir:capture-setting"
CAPTURE_METHOD_SYSTEM = "urn:telehealth-appliance:fhir:capture-method"
TIME_SOURCE_SYSTEM = "urn:telehealth-appliance:fhir:time-source"

# Resource types whose subject/patient reference we index. Patient indexes itself.
_PATIENT_FIELDS = ("subject", "patient", "beneficiary")

FhirJson = dict[str, Any]


def uuid7(now_ms: int | None = None) -> str:
    """A time-ordered UUID (RFC 9562 version 7): 48-bit Unix ms time, then random bits.

    Time ordering keeps the ``logical_id`` index growing at its right edge like the rowid,
    so inserting it costs little more than an append.
    """
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | rand
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def identifier_value(logical_id: str) -> str:
    """The identifier value that makes a resource's upstream create idempotent."""
    return f"urn:uuid:{logical_id}"


# Deeper JSON is refused wherever it comes in (a vendor's hub, the upstream EHR): no real
# resource nests this far (an extension of an extension is a handful of levels), and deep
# input is how a parser or encoder is made to recurse until it fails (orjson's encoder stops
# at 255 levels with a TypeError; validation would raise RecursionError).
MAX_JSON_DEPTH = 64


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply ``value`` nests lists and objects, counted up to ``limit + 1`` (iterative)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_depth(value: Any, what: str = "the JSON") -> None:
    """Raise :class:`InvalidResourceError` when ``value`` nests deeper than allowed."""
    if json_depth(value) > MAX_JSON_DEPTH:
        raise InvalidResourceError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")


def validate(resource: Mapping[str, Any]) -> None:
    """Validate against FHIR R4(B); raises :class:`InvalidResourceError` listing every problem."""
    from fhir.resources.R4B import get_fhir_model_class

    rtype = resource.get("resourceType")
    if not isinstance(rtype, str):
        raise InvalidResourceError("resourceType: required")
    try:
        model = get_fhir_model_class(rtype)
    except (KeyError, ValueError) as exc:  # fhir.resources raises ValueError for an unknown type
        raise InvalidResourceError(f"resourceType: unknown type {rtype[:40]!r}") from exc
    check_depth(resource, rtype[:40])
    try:
        model.model_validate(dict(resource))
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False, include_url=False, include_context=False):
            where = ".".join(str(p) for p in (rtype, *err["loc"]))
            problems.append(f"{where}: {err['msg']}")
        raise InvalidResourceError("; ".join(problems)) from None


def patient_reference(resource: Mapping[str, Any]) -> str | None:
    """The ``Patient/<id>`` a resource is about, or None (the Patient itself counts)."""
    if resource.get("resourceType") == "Patient" and resource.get("id"):
        return f"Patient/{resource['id']}"
    for field in _PATIENT_FIELDS:
        ref = resource.get(field)
        if isinstance(ref, Mapping):
            value = ref.get("reference")
            if isinstance(value, str) and value.startswith("Patient/"):
                return value
    return None


def primary_code(resource: Mapping[str, Any]) -> str | None:
    """``system|code`` of the first coding of ``code`` (a LOINC code is not PHI)."""
    code = resource.get("code")
    if isinstance(code, Mapping):
        codings = code.get("coding")
        if isinstance(codings, list) and codings and isinstance(codings[0], Mapping):
            return f"{codings[0].get('system', '')}|{codings[0].get('code', '')}"
    return None


def effective_utc(resource: Mapping[str, Any]) -> str | None:
    """The clinically relevant time as fixed-width UTC text, so it sorts as a string."""
    for field in ("effectiveDateTime", "effectiveInstant", "issued", "recorded", "authoredOn"):
        value = resource.get(field)
        if isinstance(value, str):
            return _to_utc_text(value)
    period = resource.get("effectivePeriod") or resource.get("period")
    if isinstance(period, Mapping) and isinstance(period.get("start"), str):
        return _to_utc_text(period["start"])
    return None


def instant(value: object) -> datetime | None:
    """A FHIR instant or dateTime with a zone as a datetime; None for anything else."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def utc_text(moment: datetime) -> str:
    """Fixed-width UTC text (``2026-11-26T10:00:00.000000Z``) for plain date columns."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: the appliance stores timezone-aware times only")
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _to_utc_text(value: str) -> str | None:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None  # partial dates (YYYY, YYYY-MM) are valid FHIR but not indexable to an instant
    if parsed.tzinfo is None:
        return None
    return utc_text(parsed)
