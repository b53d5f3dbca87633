"""What the pull reads in a search answer: pure functions of the resources, no I/O.

:mod:`sync_agent.pull` asks; this reads. The cursor of a stream (:class:`Cursor`), whether a
page is in the order asked for (:func:`order_problem`) and whether a resource is one the
search asked for (:func:`asked_for`): by default a FHIR server ignores a parameter it does
not support, so neither the order nor the filter is taken on trust.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from appliance import fhir
from appliance.errors import InvalidResourceError
from appliance.store import UpstreamCopy
from sync_agent.own_address import origins, own_reference
from sync_agent.upstream import as_dict, as_list

APPOINTMENTS = "Appointment"

# Why a page is refused when a server searched otherwise than asked (no data in either).
UNSORTED = (
    "the upstream did not sort the page by _lastUpdated (its stamps go backwards; is "
    "_sort=_lastUpdated supported?): not taken, the stream's cursor stays"
)
UNFILTERED = (
    "the upstream did not filter the page by _lastUpdated (it holds records stamped well "
    "before the cursor; is _lastUpdated supported?): not taken, the stream's cursor stays"
)


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a stream stands: the newest ``lastUpdated`` taken, and the versions taken at it.

    ``seen`` holds ``<id>@<versionId>`` (``<id>`` alone for a resource without a version, and
    in cursors saved by releases before this one, which then stands for any version): a
    server stamping to the second may give a record's next version the same instant (an
    appointment booked and cancelled within one second), and that one is not taken yet.
    """

    since: str | None = None
    seen: frozenset[str] = frozenset()

    def advance(self, resources: Iterable[fhir.FhirJson]) -> Cursor:
        """The cursor after taking ``resources`` (in any order)."""
        since, seen = self.since, set(self.seen)
        since_at = fhir.instant(since)
        for resource in resources:
            updated = last_updated(resource)
            at = fhir.instant(updated)
            if at is None:
                continue
            if since_at is None or at > since_at:
                since, since_at, seen = updated, at, {seen_key(resource)}
            elif at == since_at:
                seen.add(seen_key(resource))
        return Cursor(since, frozenset(seen))

    def taken(self, resource: fhir.FhirJson) -> bool:
        """Whether ``resource`` (this version) was taken already."""
        at = fhir.instant(last_updated(resource))
        if at is None or at != fhir.instant(self.since):
            return False
        return seen_key(resource) in self.seen or str(resource.get("id")) in self.seen


def look_back(since_at: datetime, seconds: float) -> str:
    """``seconds`` before ``since_at``, as UTC text; the earliest instant there is when that
    falls before year 1 (a placeholder stamp on migrated data, ``0001-01-01T00:00:00Z``):
    ``datetime`` cannot go there, and the OverflowError ended the sync process, every pass."""
    try:
        return fhir.utc_text(since_at - timedelta(seconds=seconds))
    except OverflowError:
        return fhir.utc_text(datetime.min.replace(tzinfo=UTC))


def seen_key(resource: fhir.FhirJson) -> str:
    """``<id>@<versionId>``, or the id alone when the server gives no version."""
    rid = str(resource.get("id"))
    meta = resource.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    return f"{rid}@{version}" if isinstance(version, str) and version else rid


def last_updated(resource: fhir.FhirJson) -> str | None:
    meta = resource.get("meta")
    value = meta.get("lastUpdated") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def copy_of(resource: fhir.FhirJson) -> UpstreamCopy:
    meta = resource.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    return UpstreamCopy(
        f"{resource['resourceType']}/{resource['id']}",
        version if isinstance(version, str) else None,
        last_updated(resource),
        resource,
    )


def patients_of(appointment: fhir.FhirJson) -> set[str]:
    """The ``Patient/<id>`` participants of an Appointment (localised: :func:`localise`)."""
    found = set()
    for participant in as_list(appointment.get("participant")):
        ref = as_dict(as_dict(participant).get("actor")).get("reference")
        if isinstance(ref, str) and ref.startswith("Patient/") and ref.count("/") == 1:
            found.add(ref)
    return found


def localise(resource: fhir.FhirJson, base_url: str, also: Iterable[str] = ()) -> fhir.FhirJson:
    """``resource`` with every absolute reference to the upstream itself made relative.

    FHIR R4 (References, "Literal references"): an absolute URL at the server's own base
    *is* the relative reference. An EHR may write its own resources so (``https://ehr/fhir/
    Patient/7``); left so, an Appointment's Patient was never fetched and the stored copy
    pointed at no local record (the store maps relative references only). Only the
    upstream's own addresses count (``base_url``, and ``also``: those it writes for itself
    behind a gateway, :mod:`sync_agent.own_address`), however their case, default port or
    scheme are spelled: a reference to another server (a directory's Practitioner) is
    another resource, even with the same ``<Type>/<id>``, and stays as it is.
    """
    if fhir.json_depth(resource) > fhir.MAX_JSON_DEPTH:
        return resource  # refused by the store as it is (and walked, it could blow the stack)
    bases = origins(base_url, also)
    if not bases:
        return resource

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            out = {k: walk(v) for k, v in value.items()}
            ref = value.get("reference")
            if isinstance(ref, str) and "://" in ref:
                out["reference"] = own_reference(ref, bases) or ref
            return out
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    walked: fhir.FhirJson = walk(resource)
    return walked


def about(resource: fhir.FhirJson) -> str | None:
    """The upstream ``Patient/<id>`` a pulled resource is about (an Appointment's first
    Patient participant), or None."""
    if resource.get("resourceType") == APPOINTMENTS:
        for participant in as_list(resource.get("participant")):
            ref = as_dict(as_dict(participant).get("actor")).get("reference")
            if isinstance(ref, str) and ref.startswith("Patient/"):
                return ref
        return None
    return fhir.patient_reference(resource)


# pydantic's words for the two commonest refusals (fhir.validate gives "<path>: <message>").
_REASONS = {
    "Extra inputs are not permitted": "an element FHIR R4B does not define",
    "Field required": "a required element missing",
}


def invalid_reason(resource: fhir.FhirJson) -> str:
    """Why ``resource`` fails validation, as classes that quote nothing of it (the paths
    and messages may: an element's value, a key the sender chose)."""
    try:
        fhir.validate(resource)
    except InvalidResourceError as exc:
        said = {problem.rpartition(": ")[2] for problem in str(exc).split("; ")}
        return ", ".join(sorted({_REASONS.get(s, "a value FHIR R4B does not take") for s in said}))
    return "not FHIR R4B"  # refused by the store's check, passed here: no detail to give


def captured_elsewhere(observation: fhir.FhirJson) -> bool:
    return any(
        isinstance(t, dict)
        and t.get("system") == fhir.CAPTURE_SETTING_SYSTEM
        and t.get("code") != "home"
        for t in as_list(as_dict(observation.get("meta")).get("tag"))
    )


def order_problem(
    resources: Iterable[fhir.FhirJson], since: str | None, slack_s: float
) -> str | None:
    """Why a page of ``_lastUpdated=ge<since>&_sort=_lastUpdated`` is not that, or None: its
    stamps go backwards, or one is before ``since`` by more than ``slack_s`` (the look-back:
    a server comparing coarser than it stamps may give a little before). Strict handling is
    asked for, but a server may not honour it; taken, such a page moves the cursor past what
    later pages hold before it, for good."""
    floor = fhir.instant(since)
    slack = timedelta(seconds=max(slack_s, 0.0))
    previous: datetime | None = None
    for resource in resources:
        at = fhir.instant(last_updated(resource))
        if at is None:
            continue
        if previous is not None and at < previous:
            return UNSORTED
        if floor is not None and floor - at > slack:
            return UNFILTERED
        previous = at
    return None


def asked_for(rtype: str, params: dict[str, str], resource: fhir.FhirJson) -> bool:
    """Whether ``resource`` is one the stream's search asks for: an Appointment with the
    site's Location (``actor``) among its participants, an Observation about the stream's
    patient (``subject``). The server is not trusted to have applied them: by default a FHIR
    server ignores a parameter it does not support, and one ignoring ``actor`` answers with
    every Appointment of the EHR, other sites' patients too. A reference is compared by its
    ``<Type>/<id>`` (:func:`relative`), however it spells the server's address."""
    if rtype == APPOINTMENTS and "actor" in params:
        actors = (
            as_dict(as_dict(p).get("actor")).get("reference")
            for p in as_list(resource.get("participant"))
        )
        return params["actor"] in {relative(a) for a in actors}
    if rtype == "Observation" and "subject" in params:
        subject = as_dict(resource.get("subject")).get("reference")
        return relative(subject) == params["subject"]
    return True


def relative(reference: Any) -> str | None:
    """``<Type>/<id>`` of a reference, without a version (``/_history/<v>``): a relative
    one as it is, an absolute one by its last two segments; any other text as it is; None
    when not text.

    An EHR may store absolute references that spell its address otherwise than our
    ``base_url`` (``http`` for ``https``, the host in capitals, ``:443``, an internal host
    name behind a gateway): compared as text, every Appointment of the site was passed over
    and the cursor moved past them for good. The search asked the server for its own
    resources, so the ``<Type>/<id>`` tail is what it names.
    """
    if not isinstance(reference, str):
        return None
    found = reference.partition("/_history/")[0]
    if "://" not in found:
        return found
    parts = found.rstrip("/").split("/")  # scheme:, "", host, …, Type, id
    return "/".join(parts[-2:]) if len(parts) >= 5 else found
