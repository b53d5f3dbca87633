"""The local FHIR read API: ``/fhir/metadata``, read and search, for local integrations.

A stable surface (DESIGN.md, "Stable surfaces"); what an integrator needs is in
``docs/fhir-api.md``. In short:

* ``GET /fhir/metadata`` — the CapabilityStatement, anonymous (no PHI), built from the same
  tables that govern the routes below (:data:`READ_TYPES`, :data:`SEARCH_PARAMS`), so it says
  exactly what is served.
* ``GET /fhir/<Type>/<id>`` — one resource of a type in :data:`READ_TYPES`, decrypted as the
  store keeps it (:meth:`Store.read`, audited), with ``ETag: W/"<local version>"`` and
  ``Last-Modified`` (its ``meta.lastUpdated``). An unknown id and a type not served are both
  404 ``not-found``; the store looks an id up within its type only.
* ``GET /fhir/Patient?identifier=system|value`` or ``?family=…&birthdate=YYYY-MM-DD`` — the
  store's blind indexes (:meth:`Store.find_by_identifier`, :meth:`Store.find_patients`).
* ``GET /fhir/Observation?patient=<id>`` (or ``subject=Patient/<id>``), with ``code=system|code``
  and ``date=`` bounds: :meth:`Store.patient_page` filters the plain index columns (patient
  key, type, code, effective time) and decrypts only the page returned; keyset paging
  (``_after=<id of the last one>``) so a ``next`` link costs one page, whatever the total.

Search is strict: a parameter not listed for the type (or a modifier, or a repeat) is a 400
OperationOutcome naming it, never silently ignored. ``_count`` defaults to
:data:`DEFAULT_COUNT`; more than :data:`MAX_COUNT` is served as :data:`MAX_COUNT` (the self
link says so).

Security: a ``read`` key (:class:`services.vendor_keys.KeyScope`) checked by the one key step of
both key APIs, :func:`web.ingest.authenticate` (failed keys audited and limited per address,
an ingest key refused with 403, each read key rate-limited). Every read and search is
audited by the store with the actor ``vendor:<name>``, a search naming what it returned. Logs
carry vendor names, types and counts only. Every route here is a GET and reads no cookie, so
the browser CSRF check has nothing to guard (it applies to unsafe methods only).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlencode

from quart import Blueprint, Response, request
from quart.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from appliance import __version__, fhir
from appliance.errors import NotFoundError
from appliance.store import Store
from services.vendor_keys import KeyScope
from web.app import app_state
from web.ingest import (
    FHIR_JSON,
    Issue,
    authenticate,
    fhir_response,
    operation_outcome,
    refuse,
    unexpected,
)

logger = logging.getLogger(__name__)

bp = Blueprint("fhir_api", __name__)

# The version of FHIR the app's models validate against (appliance/fhir.py: fhir.resources R4B,
# wire compatible with the R4 EHRs speak; REFERENCE.md).
FHIR_VERSION = "4.3.0"
# What a local integration may read: the clinical record made or kept here. Not served:
# Claim and Coverage (billing, docs/claims.md), AuditEvent and Provenance (the audit trail
# has its own report), Flag and DetectedIssue (RPM alert workflow), and definitional
# resources (Questionnaire, Organization, Practitioner) that are not the patient's record.
READ_TYPES = (
    "Appointment",
    "Consent",
    "Device",
    "DocumentReference",
    "Encounter",
    "Media",
    "Observation",
    "Patient",
    "QuestionnaireResponse",
)
DEFAULT_COUNT, MAX_COUNT = 50, 200
_PAGING = {"Patient": "_offset", "Observation": "_after"}


@dataclass(frozen=True, slots=True)
class SearchParam:
    """One search parameter as the CapabilityStatement lists it."""

    name: str
    type: str
    documentation: str


SEARCH_PARAMS: Mapping[str, tuple[SearchParam, ...]] = {
    "Patient": (
        SearchParam(
            "identifier",
            "token",
            "system|value, exact (the value compared without spaces and dashes, any case). "
            "Alone, or with family and birthdate (both must match).",
        ),
        SearchParam(
            "family",
            "string",
            "The whole family name (not a prefix; case and accents ignored); needs birthdate.",
        ),
        SearchParam("birthdate", "date", "YYYY-MM-DD, exact; needs family."),
    ),
    "Observation": (
        SearchParam(
            "patient", "reference", "The Patient's id (or Patient/<id>). Required, or subject."
        ),
        SearchParam("subject", "reference", "Patient/<id>; the same as patient."),
        SearchParam(
            "code", "token", "system|code, matched against the first coding of Observation.code."
        ),
        SearchParam(
            "date",
            "date",
            "The effective time, with prefix eq (default), ge, gt, le or lt; at most one lower "
            "and one upper bound. A date or partial date is a UTC day (month, year); a time "
            "needs a zone offset.",
        ),
    ),
}
# Accepted on every search besides the type's own parameters.
_COMMON = ("_count", "_format")
_JSON_FORMATS = frozenset({"json", FHIR_JSON, "application/json"})
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # a FHIR id
_TOKEN = re.compile(r"([^|]+)\|([^|]+)")
_DATE_PREFIX = re.compile(r"(eq|ge|gt|le|lt)?(.+)")
_PARTIAL_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")


class SearchError(Exception):
    """A search the API refuses; ``expression`` is the parameter, ``code`` the issue code."""

    def __init__(self, expression: str, diagnostics: str, code: str = "invalid") -> None:
        super().__init__(diagnostics)
        self.issue = Issue(expression, diagnostics, code)


def _base() -> str:
    return f"{app_state().config.web.public_url.rstrip('/')}/fhir"


def _phi_response(body: Mapping[str, Any], status: int = 200, **headers: str) -> Response:
    # The app adds no-store to every page; said here too, since this is PHI for other programs.
    return fhir_response(body, status, Cache_Control="no-store", **headers)


def _not_found(rtype: str) -> Response:
    if rtype not in READ_TYPES:
        text = f"resources of this type are not served here (see {_base()}/metadata)"
    else:
        text = f"no {rtype} with this id"
    return refuse(404, "", text, "not-found")


# -- the CapabilityStatement ----------------------------------------------------------------


def _resource_capability(rtype: str) -> dict[str, Any]:
    interactions = [{"code": "read"}]
    found: dict[str, Any] = {"type": rtype}
    if rtype in SEARCH_PARAMS:
        interactions.append({"code": "search-type"})
        found["searchParam"] = [
            {"name": p.name, "type": p.type, "documentation": p.documentation}
            for p in SEARCH_PARAMS[rtype]
        ]
    if rtype == "Observation":
        interactions.append(
            {
                "code": "create",
                "documentation": "Device vendors' home readings, with an ingest key "
                "(docs/ingest.md); not with a read key.",
            }
        )
    found["interaction"] = interactions
    found["versioning"] = "no-version"
    found["readHistory"] = False
    found["conditionalCreate"] = False
    return found


def capability_statement(now: datetime) -> dict[str, Any]:
    """What this server does, as FHIR says it (no PHI; the site's name and URL only)."""
    state = app_state()
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": now.astimezone(UTC).date().isoformat(),
        "publisher": state.config.site.name,
        "kind": "instance",
        "software": {"name": "Telehealth appliance", "version": __version__},
        "implementation": {
            "description": f"Local FHIR API of {state.config.site.name}",
            "url": _base(),
        },
        "fhirVersion": FHIR_VERSION,
        "format": [FHIR_JSON, "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": f"Search results are pages of at most {MAX_COUNT} "
                f"(_count, default {DEFAULT_COUNT}); unknown search parameters are refused "
                "(400), never ignored. See docs/fhir-api.md.",
                "security": {
                    "cors": False,
                    "description": "API keys issued on the appliance (`appliance vendors add "
                    "NAME --scope read` for reading, `--scope ingest` for device vendors "
                    "posting readings), sent as `Authorization: Bearer <key>` or "
                    "`X-API-Key: <key>`. A key has one scope: a read key cannot post, an "
                    "ingest key cannot read (403). Every read and search is audited with "
                    "the key's name. This statement needs no key.",
                },
                "resource": [_resource_capability(t) for t in READ_TYPES],
                "interaction": [
                    {"code": "transaction", "documentation": "Observations only; ingest key."},
                    {"code": "batch", "documentation": "Observations only; ingest key."},
                ],
            }
        ],
    }


@bp.get("/fhir/metadata")
async def metadata() -> ResponseReturnValue:
    """The CapabilityStatement (anonymous, as FHIR servers serve it; no PHI)."""
    return fhir_response(capability_statement(app_state().clock()), 200)


# -- read -----------------------------------------------------------------------------------


async def _local_version(store: Store, rtype: str, logical_id: str) -> int:
    """1, plus one per version replaced in place (a local edit, an upstream refresh)."""
    rows = await store.query(
        "SELECT count(*) FROM resource_history h JOIN resources r ON r.id = h.resource_id "
        "WHERE r.logical_id = ? AND r.type = ?",
        (logical_id, rtype),
    )
    return 1 + int(rows[0][0])


def _last_modified(resource: Mapping[str, Any]) -> str | None:
    meta = resource.get("meta")
    moment = fhir.instant(meta.get("lastUpdated") if isinstance(meta, Mapping) else None)
    if moment is None:
        return None
    return format_datetime(moment.astimezone(UTC).replace(microsecond=0), usegmt=True)


@bp.get("/fhir/<rtype>/<rid>")
async def read(rtype: str, rid: str) -> ResponseReturnValue:
    """One resource by type and id (audited by the store as a read by ``vendor:<name>``)."""
    vendor = await authenticate(KeyScope.READ)
    if isinstance(vendor, Response):
        return vendor
    if rtype not in READ_TYPES or not _ID.fullmatch(rid):
        return _not_found(rtype)
    store = app_state().store
    try:
        resource = await store.read(rtype, rid, f"vendor:{vendor}")
    except NotFoundError:
        logger.info("vendor %s: read of a missing %s", vendor, rtype)
        return _not_found(rtype)
    version = await _local_version(store, rtype, rid)
    headers = {"ETag": f'W/"{version}"'}
    modified = _last_modified(resource)
    if modified is not None:
        headers["Last-Modified"] = modified
    logger.info("vendor %s: read %s/%s", vendor, rtype, rid)
    return _phi_response(resource, 200, **headers)


# -- search: parsing (pure) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    """A search as understood: its parameters, validated, and the page wanted."""

    rtype: str
    params: dict[str, list[str]]  # the type's own parameters, as given
    count: int
    offset: int = 0  # Patient pages
    after: str | None = None  # Observation pages: the id of the last one of the page before


def parse_query(rtype: str, args: Sequence[tuple[str, str]]) -> Query:
    """The search ``args`` ask for; :class:`SearchError` naming the first parameter refused."""
    own = {p.name for p in SEARCH_PARAMS[rtype]}
    paging = _PAGING[rtype]
    allowed = own | set(_COMMON) | {paging}
    params: dict[str, list[str]] = {}
    for name, value in args:
        if name not in allowed:
            raise SearchError(
                name,
                f"unknown or unsupported search parameter for {rtype} (supported: "
                f"{', '.join(sorted(allowed))})",
                "not-supported",
            )
        params.setdefault(name, []).append(value)
    for name, values in params.items():
        limit = 2 if name == "date" else 1
        if len(values) > limit:
            raise SearchError(
                name, "given more than once" if limit == 1 else "given more than twice"
            )
    for fmt in params.pop("_format", []):
        if fmt not in _JSON_FORMATS:
            raise SearchError("_format", f"only {FHIR_JSON} is served", "not-supported")
    count = DEFAULT_COUNT
    for text in params.pop("_count", []):
        if not text.isascii() or not text.isdigit() or int(text) < 1:
            raise SearchError("_count", "must be a whole number from 1")
        count = MAX_COUNT if len(text) > 6 else min(int(text), MAX_COUNT)
    offset, after = 0, None
    for text in params.pop("_offset", []):
        if not text.isascii() or not text.isdigit() or len(text) > 9:
            raise SearchError("_offset", "must be a whole number from 0")
        offset = int(text)
    for text in params.pop("_after", []):
        if not _ID.fullmatch(text):
            raise SearchError("_after", "must be the id of the last Observation of a page")
        after = text
    return Query(rtype, params, count, offset, after)


def token(name: str, text: str) -> tuple[str, str]:
    """``system|value`` as its two parts (both required: the blind index needs both)."""
    found = _TOKEN.fullmatch(text)
    if found is None or not found.group(1).strip() or not found.group(2).strip():
        raise SearchError(name, "must be system|value (both parts)")
    return found.group(1), found.group(2)


def patient_id(name: str, text: str) -> str:
    """The Patient id a ``patient`` or ``subject`` parameter names."""
    value = text.removeprefix("Patient/")
    if not _ID.fullmatch(value) or (name == "subject" and not text.startswith("Patient/")):
        raise SearchError(
            name, "must be Patient/<id>" if name == "subject" else "must be a Patient id"
        )
    return value


def _day_range(year: int, month: int | None, day: int | None) -> tuple[datetime, datetime]:
    if month is None:
        return datetime(year, 1, 1, tzinfo=UTC), datetime(year + 1, 1, 1, tzinfo=UTC)
    if day is None:
        start = datetime(year, month, 1, tzinfo=UTC)
        later = start + timedelta(days=32)
        return start, datetime(later.year, later.month, 1, tzinfo=UTC)
    start = datetime(year, month, day, tzinfo=UTC)
    return start, start + timedelta(days=1)


def date_bounds(values: Sequence[str]) -> tuple[str | None, str | None]:
    """The ``date`` parameters as ``(since, until)``: UTC text, inclusive and exclusive."""
    since: datetime | None = None
    until: datetime | None = None
    for text in values:
        found = _DATE_PREFIX.fullmatch(text)
        if found is None:
            raise SearchError("date", "must not be empty")
        prefix, value = found.group(1) or "eq", found.group(2)
        try:
            partial = _PARTIAL_DATE.fullmatch(value)
            if partial is not None:
                year, month, day = (None if g is None else int(g) for g in partial.groups())
                assert year is not None
                start, end = _day_range(year, month, day)
            else:
                moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
                if moment.tzinfo is None:
                    raise SearchError("date", "a time needs a zone offset (Z or +hh:mm)")
                start, end = moment, moment + timedelta(microseconds=1)
            start.astimezone(UTC)  # out of range near years 1 and 9999: OverflowError
            end.astimezone(UTC)
        except (ValueError, OverflowError):
            raise SearchError(
                "date", "must be [eq|ge|gt|le|lt] then YYYY, YYYY-MM, YYYY-MM-DD or a date-time"
            ) from None
        low = {"eq": start, "ge": start, "gt": end}.get(prefix)
        high = {"eq": end, "le": end, "lt": start}.get(prefix)
        if low is not None:
            if since is not None and prefix != "eq":
                raise SearchError("date", "at most one lower bound (ge or gt)")
            since = low if since is None else max(since, low)
        if high is not None:
            if until is not None and prefix != "eq":
                raise SearchError("date", "at most one upper bound (le or lt)")
            until = high if until is None else min(until, high)
    return (
        None if since is None else fhir.utc_text(since),
        None if until is None else fhir.utc_text(until),
    )


# -- search: running ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Found:
    """A page of results: the resources, the total, and the next page's extra parameters."""

    resources: list[fhir.FhirJson]
    total: int
    next_page: dict[str, str] | None
    left_out: int = 0  # matches on this page that could not be read (failed authentication)


async def _search_patients(store: Store, query: Query, actor: str) -> Found:
    params = query.params
    identifier = params.get("identifier", [None])[0]
    family = params.get("family", [None])[0]
    birthdate = params.get("birthdate", [None])[0]
    if identifier is None and family is None and birthdate is None:
        raise SearchError(
            "", "search Patient by identifier, or by family and birthdate", "required"
        )
    if (family is None) != (birthdate is None):
        missing = "birthdate" if birthdate is None else "family"
        raise SearchError(missing, "family and birthdate are searched together", "required")
    if birthdate is not None:
        birthdate = birthdate.removeprefix("eq")
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", birthdate):
            raise SearchError("birthdate", "must be YYYY-MM-DD (exact)")
    if family is not None and not family.strip():
        raise SearchError("family", "must not be empty")
    system_value = None if identifier is None else token("identifier", identifier)
    # Each look-up is audited by the store as a search naming the Patients it returned.
    sets: list[list[fhir.FhirJson]] = []
    if system_value is not None:
        sets.append(await store.find_by_identifier(*system_value, actor))
    if family is not None and birthdate is not None:
        sets.append(await store.find_patients(family, birthdate, actor))
    ids = set.intersection(*({str(p.get("id")) for p in found} for found in sets))
    unique = {str(p["id"]): p for found in sets for p in found if str(p.get("id")) in ids}
    matches = sorted(unique.values(), key=lambda p: str(p["id"]))
    page = matches[query.offset : query.offset + query.count]
    more = query.offset + query.count < len(matches)
    return Found(page, len(matches), {"_offset": str(query.offset + query.count)} if more else None)


async def _search_observations(store: Store, query: Query, actor: str) -> Found:
    params = query.params
    named = [(n, params[n][0]) for n in ("patient", "subject") if n in params]
    if len(named) != 1:
        raise SearchError(
            "patient", "search Observation by patient (or subject), exactly one", "required"
        )
    pid = patient_id(*named[0])
    code = None
    if "code" in params:
        system, value = token("code", params["code"][0])
        code = f"{system}|{value}"
    since, until = date_bounds(params.get("date", []))
    try:
        page = await store.patient_page(
            f"Patient/{pid}",
            "Observation",
            actor,
            limit=query.count,
            code=code,
            since=since,
            until=until,
            after=query.after,
        )
    except NotFoundError:
        raise SearchError("_after", "not the id of an Observation of this search") from None
    last = page.last_read  # a page that ends on an unreadable row goes on after it
    next_page = {"_after": last} if page.more and last is not None else None
    return Found(page.resources, page.total, next_page, page.left_out)


def _link(query: Query, **extra: str) -> str:
    pairs = [(name, value) for name, values in query.params.items() for value in values]
    pairs += [("_count", str(query.count)), *extra.items()]
    return f"{_base()}/{query.rtype}?{urlencode(pairs)}"


def searchset(query: Query, found: Found) -> dict[str, Any]:
    """The ``searchset`` Bundle of one page."""
    this_page = {}
    if query.offset:
        this_page["_offset"] = str(query.offset)
    if query.after:
        this_page["_after"] = query.after
    links = [{"relation": "self", "url": _link(query, **this_page)}]
    if found.next_page is not None:
        links.append({"relation": "next", "url": _link(query, **found.next_page)})
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": found.total,
        "link": links,
    }
    if found.resources:  # FHIR JSON has no empty arrays
        bundle["entry"] = [
            {
                "fullUrl": f"{_base()}/{query.rtype}/{r['id']}",
                "resource": r,
                "search": {"mode": "match"},
            }
            for r in found.resources
        ]
    if found.left_out:
        # Said in the Bundle (FHIR's search mode "outcome"), not by failing the whole search.
        issue = Issue(
            "",
            f"{found.left_out} matching {query.rtype} on this page could not be read on the "
            "appliance (it failed its integrity check) and is left out; the clinic has to "
            "restore it",
            code="processing",
            severity="warning",
        )
        bundle.setdefault("entry", []).append(
            {"resource": operation_outcome([issue]), "search": {"mode": "outcome"}}
        )
    return bundle


@bp.get("/fhir/<rtype>")
async def search(rtype: str) -> ResponseReturnValue:
    """Search one type (``Patient``, ``Observation``): a ``searchset`` Bundle of one page."""
    vendor = await authenticate(KeyScope.READ)
    if isinstance(vendor, Response):
        return vendor
    if rtype not in READ_TYPES:
        return _not_found(rtype)
    if rtype not in SEARCH_PARAMS:
        text = f"{rtype} is read by id only; search is served for {', '.join(SEARCH_PARAMS)}"
        return refuse(400, "", text, "not-supported")
    store, actor = app_state().store, f"vendor:{vendor}"
    try:
        query = parse_query(rtype, list(request.args.items(multi=True)))
        if rtype == "Patient":
            found = await _search_patients(store, query, actor)
        else:
            found = await _search_observations(store, query, actor)
    except SearchError as refused:
        return fhir_response(operation_outcome([refused.issue]), 400)
    logger.info(
        "vendor %s: searched %s, %d of %d returned",
        vendor,
        rtype,
        len(found.resources),
        found.total,
    )
    return _phi_response(searchset(query, found))


# -- errors: an OperationOutcome, never the HTML error page ---------------------------------


@bp.errorhandler(HTTPException)
async def _http_error(error: HTTPException) -> ResponseReturnValue:
    status = error.code or 500
    return refuse(status, "", error.name, "not-found" if status == 404 else "processing")


@bp.errorhandler(Exception)
async def _unexpected_error(error: Exception) -> ResponseReturnValue:
    return unexpected(
        error,
        "fhir read API",
        "the store did not answer; try again",
        "the appliance failed to answer",
    )
