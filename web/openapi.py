"""``GET /openapi.json``: the OpenAPI 3.1 document of the appliance's JSON API (issue 6).

What it describes, and nothing else (the HTML pages and their forms are not an API):

* the device-vendor ingest API (:mod:`web.ingest`): ``POST /fhir/Observation`` and
  ``POST /fhir``, authenticated by a vendor's API key (``Authorization: Bearer`` or
  ``X-API-Key``), answered in ``application/fhir+json`` — OperationOutcome on every error;
* the local FHIR read API (:mod:`web.fhir_api`): ``GET /fhir/metadata`` (anonymous), read by
  id and the searches of ``Patient`` and ``Observation``, authenticated by a *read* key on the
  same two headers;
* fleet monitoring (:mod:`web.health`): ``GET /healthz`` (JSON) and ``GET /metrics``
  (Prometheus text), anonymous;
* the remote-monitoring chart data (:mod:`web.rpm_patient`):
  ``GET /rpm/patients/{patient_id}/series.json``, for a staff session (the session cookie);
* this document itself.

The kiosk's photo upload (``/kiosk/photos/*``) answers in JSON too, but only to the kiosk
page's own script inside a check-in flow; it is not offered to integrators and not here.

The document is built per request from the constants the endpoints themselves enforce (the
body limit, the Bundle size, the statuses a reading may have) and from the app's settings
(the session cookie is ``__Host-session`` over TLS), so it cannot drift from them silently;
``tests/web/test_openapi.py`` runs schemathesis against the served document. It holds no
PHI and needs no login.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, current_app
from quart.typing import ResponseReturnValue

from web import fhir_api, ingest, rpm_patient
from web.app import app_state

bp = Blueprint("openapi", __name__)

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1.0.0"

_REF = "#/components/schemas/"
_FHIR = ingest.FHIR_JSON
_VENDOR_SECURITY: list[dict[str, list[str]]] = [{"vendorBearer": []}, {"vendorApiKey": []}]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"{_REF}{name}"}


def _fhir_content(schema: str) -> dict[str, Any]:
    return {_FHIR: {"schema": _ref(schema)}}


def _outcome(description: str, **headers: str) -> dict[str, Any]:
    """A response whose body is an OperationOutcome, with the headers named (``ref`` keys)."""
    found: dict[str, Any] = {
        "description": description,
        "content": _fhir_content("OperationOutcome"),
    }
    if headers:
        found["headers"] = {
            name: {"$ref": f"#/components/headers/{ref}"} for name, ref in headers.items()
        }
    return found


def _ingest_errors() -> dict[str, Any]:
    """The refusals both ingest operations share (``docs/ingest.md``, "Errors")."""
    limit_kib = current_app.config["MAX_CONTENT_LENGTH"] // 1024
    return {
        "400": _outcome(
            "Malformed: not JSON, not the expected resource, or a reading that breaks a rule; "
            "every problem is listed by FHIRPath, never quoting the value."
        ),
        "401": _outcome(
            "No key, or an unknown or disabled key.", **{"WWW-Authenticate": "WWWAuthenticate"}
        ),
        "413": _outcome(
            f"The body is over {limit_kib} KiB, or a Bundle has over "
            f"{ingest.MAX_BUNDLE_ENTRIES} entries."
        ),
        "415": _outcome(f"Not {_FHIR} or application/json in UTF-8."),
        "422": _outcome(
            "Well formed, but the subject is not exactly one patient of this clinic "
            "(`not-found` or `multiple-matches`)."
        ),
        "429": _outcome(
            "Rate limited (per vendor, or per address after failed keys).",
            **{"Retry-After": "RetryAfter"},
        ),
        "503": _outcome(
            "Could not be stored (disk, lock); nothing was half-stored. Resend.",
            **{"Retry-After": "RetryAfter"},
        ),
    }


def _read_errors() -> dict[str, Any]:
    """The refusals every read and search shares (``docs/fhir-api.md``, "Errors")."""
    return {
        "401": _outcome(
            "No key, or an unknown or disabled key.", **{"WWW-Authenticate": "WWWAuthenticate"}
        ),
        "403": _outcome("An ingest key: reading needs a key of scope `read` (`forbidden`)."),
        "429": _outcome(
            "Rate limited (per read key, or per address after failed keys).",
            **{"Retry-After": "RetryAfter"},
        ),
        "503": _outcome("The store did not answer; retry.", **{"Retry-After": "RetryAfter"}),
    }


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description, "schema": schema}


def _search(operation_id: str, rtype: str, summary: str) -> dict[str, Any]:
    string = {"type": "string", "minLength": 1}
    params = [_query(p.name, p.documentation, string) for p in fhir_api.SEARCH_PARAMS[rtype]]
    for param in params:
        if param["name"] == "date":
            param["schema"] = {"type": "array", "items": string, "maxItems": 2}
            param["style"], param["explode"] = "form", True
    params.append(
        _query(
            "_count",
            f"Results per page (default {fhir_api.DEFAULT_COUNT}; more than "
            f"{fhir_api.MAX_COUNT} is served as {fhir_api.MAX_COUNT}).",
            {"type": "integer", "minimum": 1},
        )
    )
    if rtype == "Patient":
        params.append(
            _query(
                "_offset",
                "Skip this many (from the `next` link).",
                {"type": "integer", "minimum": 0},
            )
        )
    else:
        params.append(
            _query(
                "_after",
                "The last Observation id of the page before (from the `next` link).",
                string,
            )
        )
    return {
        "operationId": operation_id,
        "tags": ["fhir"],
        "summary": summary,
        "description": "Strict: any other parameter, a modifier or a repeat is a 400 naming it.",
        "security": _VENDOR_SECURITY,
        "parameters": params,
        "responses": {
            "200": {
                "description": "One page: a searchset Bundle with `total` and a `next` link "
                "when more follow.",
                "content": _fhir_content("SearchBundle"),
            },
            "400": _outcome("A parameter that is unknown, unsupported, missing or malformed."),
            **_read_errors(),
        },
    }


def _fhir_read_paths() -> dict[str, Any]:
    return {
        "/fhir/metadata": {
            "get": {
                "operationId": "fhirMetadata",
                "tags": ["fhir"],
                "summary": "The CapabilityStatement: what the local FHIR API serves (no PHI).",
                "security": [],
                "responses": {
                    "200": {
                        "description": "FHIR CapabilityStatement.",
                        "content": _fhir_content("CapabilityStatement"),
                    }
                },
            }
        },
        "/fhir/{resource_type}/{resource_id}": {
            "get": {
                "operationId": "fhirRead",
                "tags": ["fhir"],
                "summary": "Read one resource by id (audited with the key's name).",
                "security": _VENDOR_SECURITY,
                "parameters": [
                    {
                        "name": "resource_type",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": list(fhir_api.READ_TYPES)},
                    },
                    {
                        "name": "resource_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^[A-Za-z0-9.-]{1,64}$"},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The resource as stored. `ETag` is the appliance's "
                        "version of it; `Last-Modified` its meta.lastUpdated.",
                        "headers": {
                            "ETag": {"schema": {"type": "string"}},
                            "Last-Modified": {"schema": {"type": "string"}},
                        },
                        "content": _fhir_content("Resource"),
                    },
                    "404": _outcome(
                        "No resource of this type has this id, or the type is not served "
                        "(`not-found` either way)."
                    ),
                    **_read_errors(),
                },
            }
        },
        "/fhir/Patient": {
            "get": _search(
                "fhirSearchPatient",
                "Patient",
                "Find patients by identifier, or by family name and birth date.",
            )
        },
    }


def _request_body(schema: str, what: str) -> dict[str, Any]:
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    content = {
        media: {"schema": _ref(schema)} for media in (_FHIR, "application/json")
    }  # UTF-8 only
    return {
        "required": True,
        "description": f"{what} At most {limit} bytes ({limit // 1024} KiB), UTF-8.",
        "content": content,
        "x-max-body-bytes": limit,
    }


def _paths() -> dict[str, Any]:
    location = {"Location": {"$ref": "#/components/headers/Location"}}
    return {
        **_fhir_read_paths(),
        "/fhir/Observation": {
            "get": _search(
                "fhirSearchObservation",
                "Observation",
                "One patient's Observations, newest first, by code and date.",
            ),
            "post": {
                "operationId": "ingestObservation",
                "tags": ["ingest"],
                "summary": "File one home reading (FHIR R4 Observation) from a vendor's hub.",
                "security": _VENDOR_SECURITY,
                "requestBody": _request_body("Observation", "One Observation."),
                "responses": {
                    "201": {
                        "description": "Stored; the stored Observation (the appliance's id).",
                        "headers": location,
                        "content": _fhir_content("StoredObservation"),
                    },
                    "200": {
                        "description": "A resend: nothing created; the first copy's Location.",
                        "headers": location,
                        "content": _fhir_content("OperationOutcome"),
                    },
                    **_ingest_errors(),
                },
            },
        },
        "/fhir": {
            "post": {
                "operationId": "ingestBundle",
                "tags": ["ingest"],
                "summary": "File a transaction (all or nothing) or batch Bundle of Observations.",
                "security": _VENDOR_SECURITY,
                "requestBody": _request_body(
                    "Bundle", "A transaction or batch Bundle; every entry POST Observation."
                ),
                "responses": {
                    "200": {
                        "description": "A transaction-response or batch-response Bundle.",
                        "content": _fhir_content("ResponseBundle"),
                    },
                    **_ingest_errors(),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "tags": ["monitoring"],
                "summary": "Liveness of the processes, the database and the outbox.",
                "security": [],
                "responses": {
                    "200": {
                        "description": "All is well.",
                        "content": {"application/json": {"schema": _ref("Health")}},
                    },
                    "503": {
                        "description": "Degraded: a process is stale or missing, or the "
                        "database does not answer.",
                        "content": {"application/json": {"schema": _ref("Health")}},
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "tags": ["monitoring"],
                "summary": "Prometheus text exposition of the same figures (no PHI).",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Prometheus text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/rpm/patients/{patient_id}/series.json": {
            "get": {
                "operationId": "rpmSeries",
                "tags": ["rpm"],
                "summary": "One patient's RPM chart data (the trend charts' series).",
                "description": "For nurses, administrators and providers whose normal access "
                "(or a break-glass grant) covers the patient; every read is audited.",
                "security": [{"staffSession": []}],
                "parameters": [
                    {
                        "name": "patient_id",
                        "in": "path",
                        "required": True,
                        "description": "The appliance's Patient id.",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "window",
                        "in": "query",
                        "description": "Days shown; anything else means "
                        f"{rpm_patient.DEFAULT_WINDOW}.",
                        "schema": {"type": "integer", "enum": list(rpm_patient.WINDOWS)},
                    },
                    {
                        "name": "setting",
                        "in": "query",
                        "description": "Which readings; anything else means all.",
                        "schema": {"type": "string", "enum": list(rpm_patient.SETTINGS)},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The charts.",
                        "content": {"application/json": {"schema": _ref("Series")}},
                    },
                    "302": {
                        "description": "No session: to the login page.",
                        "headers": location,
                    },
                    "401": _html("No session (a request that cannot be redirected)."),
                    "403": _html("Not a staff role that reads RPM, or outside normal access."),
                    "404": _html("No such patient."),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "tags": ["meta"],
                "summary": "This document.",
                "security": [],
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }


def _html(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/html": {"schema": {"type": "string"}}}}


def _schemas() -> dict[str, Any]:
    string = {"type": "string"}
    nullable_number = {"type": ["number", "null"]}
    reference = {
        "type": "object",
        "description": "One local patient: `reference` `Patient/<id>` or "
        "`Patient?identifier=<system>|<value>`, or an `identifier` (such as the EHR's MRN).",
        "properties": {"reference": string, "identifier": _ref("Identifier")},
    }
    return {
        "Identifier": {
            "type": "object",
            "properties": {"system": string, "value": string},
        },
        "Coding": {
            "type": "object",
            "properties": {"system": string, "code": string, "display": string},
        },
        "Observation": {
            "type": "object",
            "description": "A FHIR R4 Observation (checked against R4B) with what a reading "
            "needs here: a result status, a coded `code`, an effective time with a zone "
            "offset, a value (or components with values) and one local patient as subject. "
            "Other FHIR elements are allowed; `contained` and references other than the "
            "subject are not. See docs/ingest.md.",
            "required": ["resourceType", "status", "code", "subject"],
            "properties": {
                "resourceType": {"const": "Observation"},
                "identifier": {"type": "array", "items": _ref("Identifier")},
                "status": {"type": "string", "enum": sorted(ingest.ACCEPTED_STATUSES)},
                "code": {
                    "type": "object",
                    "properties": {
                        "coding": {"type": "array", "minItems": 1, "items": _ref("Coding")}
                    },
                },
                "subject": reference,
                "effectiveDateTime": {"type": "string", "format": "date-time"},
                "effectiveInstant": {"type": "string", "format": "date-time"},
                "valueQuantity": {"type": "object"},
                "component": {"type": "array", "items": {"type": "object"}},
            },
        },
        "StoredObservation": {
            "type": "object",
            "required": ["resourceType", "id", "subject", "meta"],
            "properties": {
                "resourceType": {"const": "Observation"},
                "id": string,
                "meta": {"type": "object"},
                "subject": {"type": "object", "properties": {"reference": string}},
            },
        },
        "Bundle": {
            "type": "object",
            "required": ["resourceType", "type"],
            "properties": {
                "resourceType": {"const": "Bundle"},
                "type": {"type": "string", "enum": ["transaction", "batch"]},
                "entry": {
                    "type": "array",
                    "maxItems": ingest.MAX_BUNDLE_ENTRIES,
                    "items": {
                        "type": "object",
                        "required": ["resource", "request"],
                        "properties": {
                            "resource": _ref("Observation"),
                            "request": {
                                "type": "object",
                                "required": ["method", "url"],
                                "properties": {
                                    "method": {"const": "POST"},
                                    "url": {"const": "Observation"},
                                },
                            },
                        },
                    },
                },
            },
        },
        "ResponseBundle": {
            "type": "object",
            "required": ["resourceType", "type", "entry"],
            "properties": {
                "resourceType": {"const": "Bundle"},
                "type": {"type": "string", "enum": ["transaction-response", "batch-response"]},
                "entry": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["response"],
                        "properties": {
                            "response": {
                                "type": "object",
                                "required": ["status"],
                                "properties": {
                                    "status": string,
                                    "location": string,
                                    "outcome": _ref("OperationOutcome"),
                                },
                            }
                        },
                    },
                },
            },
        },
        "Resource": {
            "type": "object",
            "required": ["resourceType", "id"],
            "properties": {"resourceType": string, "id": string, "meta": {"type": "object"}},
        },
        "SearchBundle": {
            "type": "object",
            "required": ["resourceType", "type", "total", "link"],
            "properties": {
                "resourceType": {"const": "Bundle"},
                "type": {"const": "searchset"},
                "total": {"type": "integer", "minimum": 0},
                "link": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["relation", "url"],
                        "properties": {
                            "relation": {"type": "string", "enum": ["self", "next"]},
                            "url": string,
                        },
                    },
                },
                "entry": {
                    "type": "array",
                    "maxItems": fhir_api.MAX_COUNT,
                    "items": {
                        "type": "object",
                        "required": ["fullUrl", "resource"],
                        "properties": {"fullUrl": string, "resource": _ref("Resource")},
                    },
                },
            },
        },
        "CapabilityStatement": {
            "type": "object",
            "required": ["resourceType", "status", "kind", "fhirVersion", "format", "rest"],
            "properties": {
                "resourceType": {"const": "CapabilityStatement"},
                "fhirVersion": {"const": fhir_api.FHIR_VERSION},
                "format": {"type": "array", "items": string},
                "rest": {"type": "array", "items": {"type": "object"}},
            },
        },
        "OperationOutcome": {
            "type": "object",
            "required": ["resourceType", "issue"],
            "properties": {
                "resourceType": {"const": "OperationOutcome"},
                "issue": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["severity", "code", "diagnostics"],
                        "properties": {
                            "severity": {
                                "type": "string",
                                "enum": ["fatal", "error", "warning", "information"],
                            },
                            "code": string,
                            "diagnostics": string,
                            "expression": {"type": "array", "items": string},
                        },
                    },
                },
            },
        },
        "Health": {
            "type": "object",
            "required": ["status", "processes", "database", "outbox"],
            "properties": {
                "status": {"type": "string", "enum": ["ok", "degraded"]},
                "processes": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "required": ["pid", "age_s", "status"],
                        "properties": {
                            "pid": {"type": ["integer", "null"]},
                            "age_s": nullable_number,
                            "status": {"type": "string", "enum": ["ok", "stale", "missing"]},
                        },
                    },
                },
                "database": {"type": "string", "description": "`ok` or what went wrong."},
                "outbox": {
                    "type": "object",
                    "required": ["pending", "oldest_pending_age_s", "dead"],
                    "properties": {
                        "pending": {"type": "integer", "minimum": 0},
                        "oldest_pending_age_s": nullable_number,
                        "dead": {"type": "integer", "minimum": 0},
                    },
                },
            },
        },
        "Series": {
            "type": "object",
            "required": [
                "patient_id",
                "window_days",
                "setting",
                "start",
                "end",
                "zone",
                "enrolled",
                "truncated",
                "charts",
            ],
            "properties": {
                "patient_id": string,
                "window_days": {"type": "integer", "enum": list(rpm_patient.WINDOWS)},
                "setting": {"type": "string", "enum": list(rpm_patient.SETTINGS)},
                "start": {"type": "integer", "description": "Unix seconds."},
                "end": {"type": "integer", "description": "Unix seconds."},
                "zone": {"type": "string", "description": "The site's IANA time zone."},
                "enrolled": {"type": "boolean"},
                "truncated": {"type": "boolean"},
                "charts": {"type": "array", "items": {"type": "object"}},
            },
        },
    }


def document() -> dict[str, Any]:
    """The OpenAPI document of the current app (inside an app or request context)."""
    state = app_state()
    cookie = "__Host-session" if state.secure else "session"  # as web/auth.py names it
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": f"Telehealth appliance JSON API ({state.config.site.name})",
            "version": API_VERSION,
            "description": "The appliance's JSON endpoints: the device-vendor ingest API, "
            "the local FHIR read API, fleet monitoring and the RPM chart data. Vendors: see "
            "docs/ingest.md; local integrations: docs/fhir-api.md.",
        },
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "headers": {
                "Location": {"schema": {"type": "string"}},
                "RetryAfter": {
                    "description": "Seconds to wait.",
                    "schema": {"type": "integer", "minimum": 1},
                },
                "WWWAuthenticate": {"schema": {"type": "string"}},
            },
            "securitySchemes": {
                "vendorBearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key (`appliance vendors add`): scope `ingest` "
                    "posts readings, scope `read` reads and searches under /fhir/.",
                },
                "vendorApiKey": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-API-Key",
                    "description": "The same key in another header.",
                },
                "staffSession": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": cookie,
                    "description": "A staff session from the login form (`POST /login`).",
                },
            },
        },
    }


@bp.get("/openapi.json")
async def openapi_json() -> ResponseReturnValue:
    """The document (anonymous: it describes the API, it holds no PHI)."""
    return document()
