"""The device-vendor ingest endpoint: cellular RPM hubs post home readings as FHIR R4.

* ``POST /fhir/Observation`` — one Observation: ``201 Created`` and ``Location``, or ``200 OK``
  and the ``Location`` of the one already stored when it is a resend.
* ``POST /fhir`` — a ``transaction`` Bundle (all entries or none) or a ``batch`` Bundle (each
  entry answered on its own) of Observations: a ``transaction-response`` or
  ``batch-response`` Bundle.

What a vendor must send, and every answer, is in ``docs/ingest.md``. In short:

* **Authentication** by the vendor's API key (:mod:`services.vendor_keys`) in
  ``Authorization: Bearer`` or ``X-API-Key``; never a cookie. The browser CSRF check does not
  apply here (:func:`exempt_from_browser_csrf`): this API never reads the session cookie,
  and a key in a header is not something a browser attaches by itself, so there is nothing
  to forge. Failed attempts are audited and limited per client address; accepted requests
  are limited per vendor (token buckets, :class:`TokenBuckets`).
* **Validation**: FHIR R4B (:func:`appliance.fhir.validate`) plus what a reading needs here —
  a status of a real result, a coded ``code``, an effective time with a zone offset (so its
  day can be counted in the site's zone, ``services/rpm_billing.py``), a value, and a
  subject that is exactly one local Patient (by our id or by an identifier such as the
  EHR's MRN, looked up through the blind index; never guessed). Every problem is reported
  at once, by element path, never with the value.
* **Nothing half-written**: everything is checked before the one :meth:`Store.create` call,
  which writes the Observations, their outbox rows, the resend index and the audit record in
  one transaction.
* **Resends** create nothing: each reading's key — the vendor and the Observation's first
  identifier, or, without one, a hash of its whole content — is kept as a keyed digest in
  ``blind_index`` (kind ``vendor_reading``) in the same transaction as the Observation.
* Every stored reading is tagged ``capture-setting|home``, ``capture-method|vendor-hub``,
  ``time-source|device`` and ``vendor|<name>``; tags a vendor sent in our code systems are
  replaced, so a vendor cannot file a clinic reading.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
from quart import Blueprint, Quart, Response, current_app, request
from quart.blueprints import BlueprintSetupState
from quart.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from appliance import fhir
from appliance.audit import AuditAction, AuditEvent, Outcome
from appliance.errors import ApplianceError, InvalidResourceError, StoreError, TamperedDataError
from appliance.store import Store
from services.vendor_keys import KeyScope, VendorKeys
from services.vitals import CAPTURE_METHOD_SYSTEM, CAPTURE_SETTING_SYSTEM, TIME_SOURCE_SYSTEM
from web.app import app_state

logger = logging.getLogger(__name__)

bp = Blueprint("ingest", __name__)

FHIR_JSON = "application/fhir+json"
VENDOR_SYSTEM = "urn:telehealth-appliance:fhir:vendor"
OUR_TAG_PREFIX = "urn:telehealth-appliance:"
BLIND_KIND = "vendor_reading"
# The app's MAX_CONTENT_LENGTH (64 KiB) bounds a request; this bounds the work in one.
MAX_BUNDLE_ENTRIES = 100
# A hub sends a reading within minutes; hundreds of patients behind one vendor still fit.
VENDOR_BURST, VENDOR_PER_S = 120, 10.0
# A local integration reading the API (web/fhir_api.py): a sync script pages through a
# patient's readings; 200 a page at 5 pages a second is far beyond a clinic's needs.
READER_BURST, READER_PER_S = 60, 5.0
# Wrong keys: a few typos pass, a guessing run is slowed to one try in ten seconds.
FAILURE_BURST, FAILURE_PER_S = 10, 0.1
# An effective time later than this past the box's clock is a wrong device clock.
FUTURE_TOLERANCE = timedelta(minutes=10)
ACCEPTED_STATUSES = frozenset({"final", "amended", "corrected", "preliminary"})
_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


# -- rate limits ----------------------------------------------------------------------------


@dataclass(slots=True)
class TokenBuckets:
    """One token bucket per key; time is a parameter (seconds), so tests need no sleeping."""

    burst: float
    per_s: float
    max_keys: int = 10_000
    _state: dict[str, tuple[float, float]] = field(default_factory=dict)

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._state.get(key, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - at) * self.per_s)

    def wait_s(self, key: str, now: float) -> float:
        """Seconds until ``key`` has a token (0: it has one now); takes nothing."""
        tokens = self._tokens(key, now)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.per_s

    def take(self, key: str, now: float) -> float:
        """Take a token for ``key``: 0 when taken, else the seconds to wait (nothing taken)."""
        tokens = self._tokens(key, now)
        if tokens < 1:
            return (1 - tokens) / self.per_s
        if len(self._state) >= self.max_keys and key not in self._state:
            # Forget buckets that have refilled: they behave exactly like new ones.
            full = [k for k in self._state if self._tokens(k, now) >= self.burst]
            for k in full:
                del self._state[k]
        self._state[key] = (tokens - 1, now)
        return 0.0


@dataclass(frozen=True, slots=True)
class IngestLimits:
    """The API keys' per-app state: the rate limits (kept on the app, not the module).

    ``vendors`` limits each ingest key, ``readers`` each read key (``web/fhir_api.py``);
    ``failures`` limits failed keys per client address, for both APIs alike.
    """

    vendors: TokenBuckets = field(default_factory=lambda: TokenBuckets(VENDOR_BURST, VENDOR_PER_S))
    readers: TokenBuckets = field(default_factory=lambda: TokenBuckets(READER_BURST, READER_PER_S))
    failures: TokenBuckets = field(
        default_factory=lambda: TokenBuckets(FAILURE_BURST, FAILURE_PER_S)
    )


@bp.record_once
def _setup(state: BlueprintSetupState) -> None:
    state.app.extensions["ingest"] = IngestLimits()


def exempt_from_browser_csrf(app: Quart) -> None:
    """Let :func:`web.auth.enforce_csrf` pass over this blueprint's requests, and only them.

    Called by :func:`web.app.create_app` after the auth blueprint is registered. Safe because
    no view here reads the session cookie: a request is a vendor's only by its key header.
    """
    from web.auth import enforce_csrf

    checks = app.before_request_funcs[None]
    position = checks.index(enforce_csrf)  # ValueError (at start-up) if auth's check moved

    async def enforce_csrf_except_ingest() -> None:
        if request.blueprint != bp.name:
            await enforce_csrf()

    checks[position] = enforce_csrf_except_ingest


# -- OperationOutcome -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem, by element path (FHIRPath), never quoting a value."""

    expression: str
    diagnostics: str
    code: str = "invalid"
    severity: str = "error"

    def json(self) -> dict[str, Any]:
        """The ``OperationOutcome.issue`` element."""
        found: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            found["expression"] = [self.expression]
        return found


def operation_outcome(issues: Sequence[Issue]) -> dict[str, Any]:
    """An OperationOutcome resource carrying ``issues``."""
    return {"resourceType": "OperationOutcome", "issue": [i.json() for i in issues]}


def fhir_response(body: Mapping[str, Any], status: int, **headers: str) -> Response:
    response = Response(orjson.dumps(body), status=status, mimetype=FHIR_JSON)
    for name, value in headers.items():
        response.headers[name.replace("_", "-")] = value
    return response


def refuse(status: int, expression: str, text: str, code: str, **headers: str) -> Response:
    return fhir_response(operation_outcome([Issue(expression, text, code)]), status, **headers)


def unexpected(error: Exception, api: str, store_failed: str, failed: str) -> Response:
    """An unexpected failure of a key API as an OperationOutcome: 503 with ``store_failed``
    (try again) when the store failed, else 500 with ``failed``. Logged with its type and
    stack only (as web/app.py): an exception's message may quote data."""
    logger.error(
        "%s failed: %s\n%s",
        api,
        type(error).__name__,
        "".join(traceback.format_tb(error.__traceback__)),
    )
    if isinstance(error, StoreError):
        return refuse(503, "", store_failed, "transient", Retry_After="5")
    if isinstance(error, TamperedDataError):
        # A record the request needs (the matching patient, say) fails authentication on this
        # appliance: the clinic restores it; until then, nothing is guessed or filed elsewhere.
        return refuse(
            503,
            "",
            "a record this request needs could not be read on the appliance (it failed its "
            "integrity check); the clinic has to restore it: send this again later",
            "transient",
            Retry_After="300",
        )
    return refuse(500, "", failed, "exception")


# -- checking one Observation (pure) --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PatientRef:
    """How a vendor named the patient: our logical id, or an identifier (system + value)."""

    system: str | None  # None: ``value`` is our Patient id
    value: str


def _fhirpath(root: str, location: str) -> str:
    """``Observation.component.0.value`` (a validator location) as ``<root>.component[0].value``."""
    rest = location.partition(".")[2] if "." in location else ""
    rest = _INDEX.sub(r"[\1]", "." + rest)[1:] if rest else ""
    return f"{root}.{rest}" if rest else root


def _validation_issues(resource: Mapping[str, Any], root: str) -> list[Issue]:
    try:
        fhir.validate(resource)
    except InvalidResourceError as exc:
        issues = []
        for problem in str(exc).split("; "):
            location, sep, text = problem.partition(": ")
            if not sep:
                location, text = root, problem
            text = text.removeprefix("Value error, ")
            code = "required" if "required" in text else "invalid"
            issues.append(Issue(_fhirpath(root, location), text, code))
        return issues
    return []


def patient_ref(subject: Any) -> PatientRef | None:
    """The patient a ``subject`` names, or None when it names none we can look up."""
    if not isinstance(subject, Mapping):
        return None
    ref = subject.get("reference")
    if isinstance(ref, str):
        if ref.startswith("Patient?identifier="):
            system, sep, value = ref.removeprefix("Patient?identifier=").partition("|")
            return PatientRef(system, value) if sep and system and value else None
        rtype, _, rid = ref.partition("/")
        if rtype == "Patient" and re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", rid):
            return PatientRef(None, rid)
        return None
    ident = subject.get("identifier")
    if subject.get("type", "Patient") == "Patient" and isinstance(ident, Mapping):
        id_system, id_value = ident.get("system"), ident.get("value")
        if isinstance(id_system, str) and isinstance(id_value, str) and id_system and id_value:
            return PatientRef(id_system, id_value)
    return None


def _other_references(value: Any, path: str) -> list[str]:
    """Paths of every ``reference`` under ``value`` (the subject's is checked apart)."""
    found = []
    if isinstance(value, Mapping):
        if isinstance(value.get("reference"), str):
            found.append(path)
        for key, item in value.items():
            found += _other_references(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _other_references(item, f"{path}[{index}]")
    return found


def check_observation(resource: Any, root: str, now: datetime) -> list[Issue]:
    """Every reason ``resource`` cannot be filed as a vendor's home reading (none: it can).

    FHIR R4B validity first, then what a reading needs here. Pure, but the R4B validation
    costs ~0.2 ms: call it off the event loop for more than one.
    """
    if not isinstance(resource, Mapping) or resource.get("resourceType") != "Observation":
        return [Issue(f"{root}.resourceType", "must be Observation", "not-supported")]
    issues = _validation_issues(resource, root)
    status = resource.get("status")
    if not (isinstance(status, str) and status in ACCEPTED_STATUSES) and not any(
        i.expression == f"{root}.status" for i in issues
    ):
        issues.append(
            Issue(f"{root}.status", f"must be one of {', '.join(sorted(ACCEPTED_STATUSES))}")
        )
    code = resource.get("code")
    codings = code.get("coding") if isinstance(code, Mapping) else None
    if not (
        isinstance(codings, list)
        and any(isinstance(c, Mapping) and c.get("system") and c.get("code") for c in codings)
    ):
        issues.append(
            Issue(f"{root}.code.coding", "a coding with system and code is required", "required")
        )
    # Only effective[x] (effective_utc would fall back to ``issued``, the time of the report).
    try:
        effective = fhir.effective_utc(
            {k: v for k, v in resource.items() if k.startswith("effective")}
        )
    except OverflowError:  # e.g. 9999-12-31T23:59:59-14:00: past the last representable UTC time
        effective = ""
    if effective == "":
        issues.append(Issue(f"{root}.effective[x]", "is out of range (years 1 to 9999 in UTC)"))
    elif effective is None:
        issues.append(
            Issue(
                f"{root}.effective[x]",
                "a date and time with a zone offset is required (effectiveDateTime, "
                "effectiveInstant or effectivePeriod.start)",
                "required",
            )
        )
    elif datetime.fromisoformat(effective.replace("Z", "+00:00")) > now + FUTURE_TOLERANCE:
        issues.append(Issue(f"{root}.effective[x]", "is in the future (check the device clock)"))
    components = resource.get("component")
    has_value = any(k.startswith("value") for k in resource) or any(
        isinstance(c, Mapping) and any(k.startswith("value") for k in c)
        for c in (components if isinstance(components, list) else [])
    )
    if not has_value:
        issues.append(
            Issue(
                f"{root}.value[x]", "a value (or a component with a value) is required", "required"
            )
        )
    if patient_ref(resource.get("subject")) is None:
        issues.append(
            Issue(
                f"{root}.subject",
                "must name one patient: reference Patient/<id>, "
                "Patient?identifier=<system>|<value>, or identifier with system and value",
                "required" if "subject" not in resource else "invalid",
            )
        )
    if "contained" in resource:
        issues.append(
            Issue(f"{root}.contained", "contained resources are not accepted", "not-supported")
        )
    for key, item in resource.items():
        if key not in ("subject", "contained"):
            for path in _other_references(item, f"{root}.{key}"):
                issues.append(
                    Issue(
                        f"{path}.reference",
                        "only subject may reference a resource; describe others with display "
                        "or identifier",
                        "not-supported",
                    )
                )
    return issues


def _check_all(resources: Sequence[tuple[Any, str]], now: datetime) -> list[list[Issue]]:
    return [check_observation(resource, root, now) for resource, root in resources]


def prepare(resource: Mapping[str, Any], patient_id: str, vendor: str) -> dict[str, Any]:
    """The Observation as stored: our subject reference and tags; the vendor's id dropped."""
    body = {k: v for k, v in resource.items() if k != "id"}
    meta = {
        k: v for k, v in (body.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")
    }
    kept = [
        t
        for t in meta.get("tag", [])
        if not (isinstance(t, Mapping) and str(t.get("system", "")).startswith(OUR_TAG_PREFIX))
    ]
    meta["tag"] = [
        *kept,
        {"system": CAPTURE_SETTING_SYSTEM, "code": "home"},
        {"system": CAPTURE_METHOD_SYSTEM, "code": "vendor-hub"},
        {"system": TIME_SOURCE_SYSTEM, "code": "device"},
        {"system": VENDOR_SYSTEM, "code": vendor},
    ]
    body["meta"] = meta
    body["subject"] = {"reference": f"Patient/{patient_id}"}
    return body


def resend_key(vendor: str, body: Mapping[str, Any]) -> str:
    """What makes a reading the same reading: its first identifier, else all its content."""
    for ident in body.get("identifier") or []:
        if isinstance(ident, Mapping):
            system, value = ident.get("system"), ident.get("value")
            if isinstance(system, str) and isinstance(value, str):
                return f"{vendor}\x00identifier\x00{system}|{value}"
    content = {k: v for k, v in body.items() if k not in ("id", "meta")}
    digest = hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"{vendor}\x00content\x00{digest}"


# -- filing ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Entry:
    """One posted Observation on its way through: its problems, or what became of it."""

    resource: Any
    root: str
    issues: list[Issue] = field(default_factory=list)
    body: dict[str, Any] | None = None
    digest: bytes = b""
    logical_id: str | None = None
    created: bool = False

    @property
    def status(self) -> int:
        """The HTTP status this entry earns."""
        if self.issues:
            return _status(self.issues)
        return 201 if self.created else 200


def _status(issues: Sequence[Issue]) -> int:
    """400 for a malformed reading; 422 when it is well formed but names no single patient."""
    return 422 if all(i.code in ("not-found", "multiple-matches") for i in issues) else 400


class _Resent(ApplianceError):
    """A reading was stored by a concurrent request between the look-up and the write."""


async def _resolve(store: Store, ref: PatientRef, actor: str) -> str | Issue:
    if ref.system is None:
        rows = await store.query(
            "SELECT logical_id FROM resources WHERE type = 'Patient' AND logical_id = ?",
            (ref.value,),
        )
        if rows:
            return str(rows[0][0])
        return Issue("", "no local patient has this id", "not-found")
    found = await store.find_by_identifier(ref.system, ref.value, actor)
    ids = {str(p["id"]) for p in found if p.get("resourceType") == "Patient"}
    if len(ids) == 1:
        return ids.pop()
    if ids:
        return Issue(
            "", "the identifier matches more than one patient; refused", "multiple-matches"
        )
    return Issue("", "no local patient has this identifier", "not-found")


async def _resolve_subjects(store: Store, entries: Sequence[Entry], vendor: str) -> None:
    actor = f"vendor:{vendor}"
    known: dict[PatientRef, str | Issue] = {}
    for entry in entries:
        if entry.issues:
            continue
        ref = patient_ref(entry.resource.get("subject"))
        assert ref is not None  # checked by check_observation
        if ref not in known:
            known[ref] = await _resolve(store, ref, actor)
        found = known[ref]
        if isinstance(found, Issue):
            entry.issues.append(Issue(f"{entry.root}.subject", found.diagnostics, found.code))
        else:
            entry.body = prepare(entry.resource, found, vendor)
            entry.digest = store.keyring.blind(BLIND_KIND, resend_key(vendor, entry.body))


async def _stored(store: Store, digests: Sequence[bytes]) -> dict[bytes, str]:
    found: dict[bytes, str] = {}
    for start in range(0, len(digests), 500):
        chunk = digests[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows = await store.query(
            "SELECT b.digest, r.logical_id FROM blind_index b JOIN resources r "  # noqa: S608 - placeholders only
            f"ON r.id = b.resource_id WHERE b.kind = ? AND b.digest IN ({marks})",
            (BLIND_KIND, *chunk),
        )
        found.update({bytes(d): str(i) for d, i in rows})
    return found


async def _write(store: Store, entries: Sequence[Entry], vendor: str) -> None:
    """Store the good entries that are not resends, in one transaction (retried on a race)."""
    good = [e for e in entries if not e.issues and e.body is not None]
    for _attempt in range(3):
        stored = await _stored(store, [e.digest for e in good])
        new: dict[bytes, Entry] = {}
        for entry in good:
            if entry.digest not in stored and entry.digest not in new:
                new[entry.digest] = entry
        if new:
            fresh = list(new.values())

            def also(conn: Any, ids: list[int], fresh: list[Entry] = fresh) -> None:
                marks = [(BLIND_KIND, e.digest, row) for e, row in zip(fresh, ids, strict=True)]
                for kind, digest, _row in marks:
                    if conn.execute(
                        "SELECT 1 FROM blind_index WHERE kind = ? AND digest = ?", (kind, digest)
                    ).fetchone():
                        raise _Resent("a reading was stored meanwhile")
                conn.executemany(
                    "INSERT INTO blind_index (kind, digest, resource_id) VALUES (?, ?, ?)", marks
                )

            patients = {str(e.body["subject"]["reference"]) for e in fresh if e.body}
            try:
                created = await store.create(
                    [e.body for e in fresh if e.body is not None],
                    f"vendor:{vendor}",
                    validate=False,  # every entry passed check_observation; prepare adds tags
                    audit_each=len(patients) > 1,
                    also=also,
                )
            except _Resent:
                continue
            for entry, item in zip(fresh, created, strict=True):
                stored[entry.digest] = item.logical_id
                entry.created = True
                entry.logical_id = item.logical_id
        for entry in good:
            if entry.logical_id is None:
                entry.logical_id = stored[entry.digest]
        return
    raise StoreError("readings kept being resent while being stored; try again")


async def _file(entries: list[Entry], vendor: str, *, atomic: bool) -> bool:
    """Check, resolve and store ``entries``; False (nothing written) when atomic and any fail."""
    state = app_state()
    checked = await asyncio.to_thread(
        _check_all, [(e.resource, e.root) for e in entries], state.clock()
    )
    for entry, issues in zip(entries, checked, strict=True):
        entry.issues.extend(issues)  # after any found in the Bundle entry around it
    if atomic and any(e.issues for e in entries):
        return False
    await _resolve_subjects(state.store, entries, vendor)
    if atomic and any(e.issues for e in entries):
        return False
    await _write(state.store, entries, vendor)
    created = sum(e.created for e in entries)
    refused = sum(bool(e.issues) for e in entries)
    logger.info(
        "vendor %s: %d readings stored, %d resent, %d refused",
        vendor,
        created,
        len(entries) - created - refused,
        refused,
    )
    return True


# -- requests -------------------------------------------------------------------------------


def _presented_key() -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = request.headers.get("X-API-Key", "").strip()
    return key or None


async def authenticate(scope: KeyScope) -> str | Response:
    """The vendor of the request's key if it is valid for ``scope``, or the response refusing it.

    The one key check of both key APIs (ingest, and the read API of ``web/fhir_api.py``):
    failed keys are audited (``login_failed``) and limited per client address; a valid key
    of the other scope is refused with 403 ``forbidden`` and audited as denied; accepted
    requests are limited per key (``vendors`` for ingest, ``readers`` for read).
    """
    state = app_state()
    limits: IngestLimits = current_app.extensions["ingest"]
    now = state.clock().timestamp()
    address = request.remote_addr or "unknown"
    entity = "fhir ingest" if scope is KeyScope.INGEST else "fhir read"
    wait = limits.failures.wait_s(address, now)
    if wait > 0:
        return refuse(
            429,
            "",
            "too many failed attempts; try later",
            "throttled",
            Retry_After=str(int(wait) + 1),
        )
    presented = _presented_key()
    found = await VendorKeys(state.store).check(presented) if presented else None
    if found is None or found.vendor is None or not found.active:
        limits.failures.take(address, now)
        known = found is not None and found.vendor is not None  # a disabled key
        event = AuditEvent(
            f"vendor:{found.vendor}" if known and found else "vendor:(unknown)",
            AuditAction.LOGIN_FAILED,
            outcome=Outcome.DENIED if known else Outcome.FAILURE,
            entity=entity,
        )
        await state.store.transact(lambda _conn: None, [event])
        return refuse(
            401,
            "",
            "a valid API key is required (Authorization: Bearer <key>)",
            "security",
            WWW_Authenticate=f'Bearer realm="{scope.value}"',
        )
    if found.scope is not scope:
        # A real key used for what it was not issued for: access control, not a guess.
        action = AuditAction.CREATE if scope is KeyScope.INGEST else AuditAction.READ
        event = AuditEvent(
            f"vendor:{found.vendor}",
            action,
            outcome=Outcome.DENIED,
            entity=entity,
            detail=f"a {found.scope.value} key; this API needs a {scope.value} key",
        )
        await state.store.transact(lambda _conn: None, [event])
        return refuse(
            403,
            "",
            f"this key is a {found.scope.value} key; this API needs a {scope.value} key",
            "forbidden",
        )
    buckets = limits.vendors if scope is KeyScope.INGEST else limits.readers
    wait = buckets.take(found.vendor, now)
    if wait > 0:
        return refuse(
            429, "", "too many requests; slow down", "throttled", Retry_After=str(int(wait) + 1)
        )
    return found.vendor


async def _read_json() -> Any:
    """The request's JSON body; raises :class:`_BadRequest` with the response to send."""
    mimetype = request.mimetype
    charset = request.mimetype_params.get("charset", "utf-8").lower()
    if mimetype not in (FHIR_JSON, "application/json") or charset not in ("utf-8", "utf8"):
        raise _BadRequest(
            refuse(415, "", f"send {FHIR_JSON} (or application/json) in UTF-8", "not-supported")
        )
    data = await request.get_data(cache=False)
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise _BadRequest(refuse(400, "", "the body is not valid JSON", "structure")) from None
    if fhir.json_depth(body) > fhir.MAX_JSON_DEPTH:
        raise _BadRequest(
            refuse(400, "", f"the body nests deeper than {fhir.MAX_JSON_DEPTH} levels", "structure")
        )
    return body


class _BadRequest(Exception):
    """Carries the response refusing a request's body."""

    def __init__(self, response: Response) -> None:
        super().__init__("bad request")
        self.response = response


_RESENT = operation_outcome(
    [Issue("", "already stored: a resend of this reading", "duplicate", "information")]
)


def _location(logical_id: str) -> str:
    base = app_state().config.web.public_url.rstrip("/")
    return f"{base}/fhir/Observation/{logical_id}"


def _entry_response(entry: Entry) -> dict[str, Any]:
    status = entry.status
    if entry.issues:
        reason = {400: "400 Bad Request", 422: "422 Unprocessable Entity"}[status]
        return {"response": {"status": reason, "outcome": operation_outcome(entry.issues)}}
    found: dict[str, Any] = {
        "status": "201 Created" if entry.created else "200 OK",
        "location": f"Observation/{entry.logical_id}",
    }
    if not entry.created:
        found["outcome"] = _RESENT
    return {"response": found}


@bp.post("/fhir/Observation")
async def post_observation() -> ResponseReturnValue:
    """File one Observation."""
    vendor = await authenticate(KeyScope.INGEST)
    if isinstance(vendor, Response):
        return vendor
    try:
        resource = await _read_json()
    except _BadRequest as bad:
        return bad.response
    entry = Entry(resource, "Observation")
    await _file([entry], vendor, atomic=True)
    if entry.issues:
        return fhir_response(operation_outcome(entry.issues), entry.status)
    assert entry.logical_id is not None
    location = _location(entry.logical_id)
    if not entry.created:
        return fhir_response(_RESENT, 200, Location=location)
    assert entry.body is not None
    stored = {**entry.body, "id": entry.logical_id}
    return fhir_response(stored, 201, Location=location)


def _bundle_entries(bundle: Any) -> tuple[list[Entry], str] | Response:
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
        return refuse(
            400,
            "Bundle.resourceType",
            "POST /fhir takes a transaction or batch Bundle (one Observation: POST "
            "/fhir/Observation)",
            "not-supported",
        )
    kind = bundle.get("type")
    if kind not in ("transaction", "batch"):
        return refuse(400, "Bundle.type", "must be transaction or batch", "not-supported")
    items = bundle.get("entry", [])
    if not isinstance(items, list):
        return refuse(400, "Bundle.entry", "must be a list", "structure")
    if len(items) > MAX_BUNDLE_ENTRIES:
        return refuse(
            413, "Bundle.entry", f"at most {MAX_BUNDLE_ENTRIES} entries per Bundle", "too-costly"
        )
    entries = []
    for index, item in enumerate(items):
        root = f"Bundle.entry[{index}]"
        item = item if isinstance(item, Mapping) else {}
        entry = Entry(item.get("resource"), f"{root}.resource")
        req = item.get("request")
        if not (
            isinstance(req, Mapping)
            and req.get("method") == "POST"
            and str(req.get("url", "")).strip("/") == "Observation"
        ):
            entry.issues.append(
                Issue(f"{root}.request", "must be method POST, url Observation", "not-supported")
            )
        entries.append(entry)
    return entries, str(kind)


@bp.post("/fhir")
async def post_bundle() -> ResponseReturnValue:
    """File a transaction (all or nothing) or batch (entry by entry) Bundle of Observations."""
    vendor = await authenticate(KeyScope.INGEST)
    if isinstance(vendor, Response):
        return vendor
    try:
        bundle = await _read_json()
    except _BadRequest as bad:
        return bad.response
    parsed = _bundle_entries(bundle)
    if isinstance(parsed, Response):
        return parsed
    entries, kind = parsed
    if not await _file(entries, vendor, atomic=kind == "transaction"):
        issues = [i for e in entries for i in e.issues]
        return fhir_response(operation_outcome(issues), _status(issues))
    response = {
        "resourceType": "Bundle",
        "type": f"{kind}-response",
        "entry": [_entry_response(e) for e in entries],
    }
    return fhir_response(response, 200)


# -- errors: an OperationOutcome, never the HTML error page ---------------------------------


@bp.errorhandler(HTTPException)
async def _http_error(error: HTTPException) -> ResponseReturnValue:
    status = error.code or 500
    if status == 413:
        limit = current_app.config["MAX_CONTENT_LENGTH"] // 1024
        text = f"the body is larger than {limit} KiB: send fewer readings per Bundle"
        return refuse(413, "", text, "too-costly")
    return refuse(status, "", error.name, "processing")


@bp.errorhandler(Exception)
async def _unexpected_error(error: Exception) -> ResponseReturnValue:
    return unexpected(
        error,
        "ingest",
        "the readings could not be stored; send them again",
        "the appliance failed to file the readings",
    )
