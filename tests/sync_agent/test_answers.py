"""Whatever a server answers, the sync agent reads it without an exception (hypothesis).

A FHIR server, a gateway or a proxy in between may answer anything: an OperationOutcome
whose ``issue`` is a string, a Bundle whose entries are numbers, a status "201Created", a
``location`` that names no resource. Each reader of an answer must turn what it cannot use
into "absent" (a retry, a dead letter with a plain message, a page with nothing on it),
never raise: an exception there ended the sync process, and the next start met the same
answer. The property tests feed every reader arbitrary JSON shaped like the real thing; the
peer tests in ``test_faults.py`` send such answers through the fault proxy to the real drain.
"""

from __future__ import annotations

import contextlib
import re
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.claims.lifecycle import fhir_outcome
from sync_agent.audit_anchors import anchors_of
from sync_agent.balp import anchor_from_provenance
from sync_agent.outbox_bundle import entry_ref
from sync_agent.pull_answers import (
    Cursor,
    asked_for,
    captured_elsewhere,
    copy_of,
    localise,
    patients_of,
)
from sync_agent.review_queue import updated_of
from sync_agent.update_versions import version_of
from sync_agent.upstream import (
    Failure,
    bundle_entries,
    classify_for_resource,
    classify_response,
    entry_outcome,
    entry_status,
    is_outcome,
    next_link,
    outcome_text,
    retry_after_seconds,
    search_matches,
)

# The keys real answers use, so that generated objects often have the right shape with the
# wrong content, which is where a reader trips.
KEYS = [
    "resourceType",
    "id",
    "meta",
    "versionId",
    "lastUpdated",
    "entry",
    "resource",
    "response",
    "status",
    "location",
    "outcome",
    "issue",
    "diagnostics",
    "details",
    "text",
    "code",
    "search",
    "mode",
    "link",
    "relation",
    "url",
    "participant",
    "actor",
    "reference",
    "tag",
    "system",
    "extension",
    "valueString",
    "signature",
    "data",
]
WORDS = [
    "Bundle",
    "OperationOutcome",
    "Patient",
    "Appointment",
    "Observation",
    "Provenance",
    "match",
    "include",
    "next",
    "201 Created",
    "200 OK",
    "201Created",
    "2013",
    "²⁰¹",
    " 201",
    "412 Precondition Failed",
    "Patient/123",
    "Patient/123/_history/1",
    "http://x/fhir/R4/Observation/9/_history/2",
    "/123",
    "Patient/",
    "Patient/a b",
    "2026-11-29T08:00:00Z",
    "2026-11-29T08:00:00",
    "0001-01-01T00:00:00+05:00",
    "not a date",
    "",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.sampled_from(WORDS),
    st.text(max_size=12),
)
json_st = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), inner, max_size=5),
    ),
    max_leaves=30,
)


def _shaped(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    """A dict that starts as ``kind`` and has any of the keys an answer of that kind has."""
    return st.fixed_dictionaries(
        {"resourceType": st.one_of(st.just(kind), json_st)},
        optional={key: json_st for key in KEYS if key != "resourceType"},
    )


def _entry() -> st.SearchStrategy[Any]:
    answer = st.fixed_dictionaries(
        {},
        optional={
            "status": st.one_of(st.sampled_from(WORDS), json_st),
            "location": st.one_of(st.sampled_from(WORDS), json_st),
            "outcome": st.one_of(_shaped("OperationOutcome"), json_st),
        },
    )
    entry = st.fixed_dictionaries(
        {},
        optional={
            "response": st.one_of(answer, json_st),
            "resource": st.one_of(_shaped("Patient"), json_st),
            "search": st.one_of(st.fixed_dictionaries({}, optional={"mode": json_st}), json_st),
        },
    )
    return st.one_of(entry, json_st)


bundles = st.one_of(
    st.fixed_dictionaries(
        {"resourceType": st.just("Bundle")},
        optional={
            "entry": st.one_of(st.lists(_entry(), max_size=5), json_st),
            "link": st.one_of(
                st.lists(
                    st.one_of(st.fixed_dictionaries({"relation": json_st, "url": json_st}), json_st)
                ),
                json_st,
            ),
        },
    ),
    json_st,
)
outcomes = st.one_of(_shaped("OperationOutcome"), json_st)
REF = re.compile(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}")
# Only its base URL is used (next links are kept to the upstream): no request is made.
_CLIENT = httpx.AsyncClient(base_url="http://ehr.test/fhir")


@settings(max_examples=400, deadline=None)
@given(
    outcomes, st.integers(min_value=100, max_value=599), st.one_of(st.none(), st.text(max_size=8))
)
def test_an_outcome_of_any_shape_is_one_line_and_a_class(
    body: Any, status: int, retry_after: str | None
) -> None:
    text = outcome_text(body)
    assert isinstance(text, str)
    assert len(text) <= 500
    refusal = fhir_outcome(body)  # a FHIR payer's answer to a claim (issue 8)
    assert refusal is None or isinstance(refusal, str)
    error = classify_response(status, body, retry_after)
    assert isinstance(error.failure, Failure)
    assert error.message
    assert error.retry_after_s is None or error.retry_after_s >= 0
    if error.failure is Failure.PERMANENT:
        # A dead letter only on a refusal of the content, never on a redirect or an
        # address that does not take the request.
        assert 400 <= status < 500
        assert status not in (404, 405, 406, 408, 409, 410, 415, 423, 425, 429)
        assert error.message == (outcome_text(body) or f"HTTP {status}")
    if status in (404, 405, 406, 410, 415) or 300 <= status < 400:
        assert error.failure is Failure.ENDPOINT
        assert "check base_url" in error.message
    if status == 504:  # a gateway gave up on a request it may have forwarded
        assert error.failure is Failure.AMBIGUOUS
    # About one resource or search: the same, except an address status in the server's own
    # OperationOutcome, which is about that resource (a dead letter), not the address.
    one = classify_for_resource(status, body, retry_after)
    if status in (404, 405, 406, 410, 415) and is_outcome(body):
        assert one.failure is Failure.PERMANENT
        assert one.message == (outcome_text(body) or f"HTTP {status}")
    else:
        assert one.failure is error.failure


@settings(max_examples=500, deadline=None)
@given(bundles)
def test_a_batch_answer_of_any_shape_gives_a_status_a_message_and_a_reference_or_none(
    body: Any,
) -> None:
    entries = bundle_entries(body)
    assert all(isinstance(e, dict) for e in entries)
    if isinstance(body, dict) and isinstance(body.get("entry"), list):
        assert len(entries) == len(body["entry"])  # positions kept: entry k answers item k
    for entry in [*entries, None, 7, "x"]:
        code = entry_status(entry)
        assert code == 0 or 100 <= code <= 999
        message = entry_outcome(entry, code)
        assert isinstance(message, str)
        assert message
        for rtype in ("Patient", "Observation"):
            ref = entry_ref(entry, rtype)
            # Only the item's own type: never an OperationOutcome's, nor a path segment's.
            assert ref is None or (REF.fullmatch(ref) and ref.startswith(f"{rtype}/")), ref


def test_a_refused_entrys_outcome_is_read_from_its_response_else_from_its_resource() -> None:
    def outcome(text: str) -> dict[str, Any]:
        issue = {"severity": "error", "code": "invalid", "diagnostics": text}
        return {"resourceType": "OperationOutcome", "issue": [issue]}

    status = {"status": "422 Unprocessable Entity"}
    # Before: an OperationOutcome in the entry's resource was not read; staff saw "HTTP 422".
    assert entry_outcome({"response": status, "resource": outcome("code required")}, 422) == (
        "code required"
    )
    both = {"response": {**status, "outcome": outcome("said here")}, "resource": outcome("x")}
    assert entry_outcome(both, 422) == "said here"
    assert entry_outcome({"response": status, "resource": {"resourceType": "Patient"}}, 422) == (
        "HTTP 422"
    )


@settings(max_examples=500, deadline=None)
@given(bundles, st.sampled_from(["Appointment", "Observation", "Patient"]))
def test_a_search_page_of_any_shape_gives_resources_to_import_or_nothing(
    body: Any, rtype: str
) -> None:
    found = search_matches(body, rtype)
    for resource in found:
        assert resource["resourceType"] == rtype
        assert isinstance(resource["id"], str)
        copy = copy_of(resource)
        assert copy.reference == f"{rtype}/{resource['id']}"
        assert copy.version_id is None or isinstance(copy.version_id, str)
        assert all(isinstance(p, str) for p in patients_of(resource))
        assert isinstance(captured_elsewhere(resource), bool)
    cursor = Cursor().advance(found)
    assert all(isinstance(seen, str) for seen in cursor.seen)
    assert all(isinstance(cursor.taken(r), bool) for r in found)
    link = next_link(body, _CLIENT)
    assert link is None or (isinstance(link, str) and link)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_shaped("Patient"), json_st))
def test_a_resource_of_any_shape_gives_a_version_and_a_time_or_none(resource: Any) -> None:
    version = version_of(resource)
    assert version is None or isinstance(version, str)
    updated = updated_of(resource)
    assert updated is None or isinstance(updated, str)
    if isinstance(resource, dict):
        assert all(isinstance(p, str) for p in patients_of(resource))
        assert isinstance(captured_elsewhere(resource), bool)


_BASE = "https://ehr.test/fhir/R4"
references = st.one_of(
    st.text(max_size=30),
    st.builds(
        lambda prefix, tail: prefix + tail,
        st.sampled_from(
            [
                _BASE + "/",
                "HTTPS://EHR.TEST:443/fhir/R4/",
                "http://ehr.test/fhir/R4/",
                "https://ehr.test:8443/fhir/R4/",
                "https://ehr.test/fhir/R4b/",
                "https://other.test/fhir/R4/",
                "https://ehr.test/fhir/",
                "https://[::1/fhir/R4/",
                "ftp://ehr.test/fhir/R4/",
            ]
        ),
        st.one_of(
            st.text(max_size=20),
            st.sampled_from(["Patient/7", "Patient/7/_history/2", "patient/7", "Patient/"]),
        ),
    ),
)


def _references(value: Any) -> list[Any]:
    if isinstance(value, dict):
        found = [value["reference"]] if "reference" in value else []
        return found + [r for v in value.values() for r in _references(v)]
    if isinstance(value, list):
        return [r for v in value for r in _references(v)]
    return []


@settings(max_examples=400, deadline=None)
@given(
    st.recursive(
        st.fixed_dictionaries({"reference": st.one_of(references, json_st)}),
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)
        ),
        max_leaves=8,
    )
)
def test_only_references_at_the_upstreams_own_address_are_made_relative(value: Any) -> None:
    resource = {"resourceType": "Appointment", "x": value}
    before, after = _references(resource), _references(localise(resource, _BASE))
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        if new == old or not isinstance(old, str):
            continue  # (not text: a Reference nested in one, whose own are compared too)
        # Changed: an absolute address of the upstream itself, now its <Type>/<id> tail.
        assert old.lower().startswith(("https://ehr.test", "http://ehr.test"))
        assert "/fhir/R4/" in old
        assert old.endswith("/" + new)
        assert new.split("/")[0].isalpha()
        assert new.count("/") in (1, 3)


def test_a_reference_is_made_relative_at_the_upstreams_address_however_spelled() -> None:
    refs = [
        "HTTPS://EHR.test:443/fhir/R4/Patient/7",
        "http://ehr.test/fhir/R4/Location/9/_history/2",
        "https://ehr.test/fhir/R4/Patient/7?_format=json",  # a search, not a reference
        "https://other.test/fhir/R4/Patient/7",  # another server: another person
        "https://ehr.test/fhir/R4b/Patient/7",  # another base on the same host
        "https://ehr.test/fhir/R4/Patient/7/extra",
        "Patient/7",
    ]
    done = localise({"p": [{"reference": r} for r in refs]}, _BASE + "/")
    assert [p["reference"] for p in done["p"]] == [
        "Patient/7",
        "Location/9/_history/2",
        *refs[2:],
    ]


@settings(max_examples=400, deadline=None)
@given(bundles)
def test_an_anchor_search_of_any_shape_gives_an_anchor_or_none(body: Any) -> None:
    for entry in bundle_entries(body):
        with contextlib.suppress(ValueError):  # "not an anchor" is the one error it has
            anchor_from_provenance(entry.get("resource"))
    anchors = anchors_of(body)
    latest = anchors[-1] if anchors else None
    assert latest is None or isinstance(latest.audit_id, int)


NOW = datetime(2026, 11, 26, 12, tzinfo=UTC)
DATES = [
    "Thu, 26 Nov 2026 12:02:00 GMT",
    "Sun, 06 Nov 1994 08:49:37 GMT",
    "Sunday, 06-Nov-94 08:49:37 GMT",
    "Sun Nov  6 08:49:37 1994",
    "Fri, 31 Dec 9999 23:59:59 GMT",
    "Thu, 26 Nov 2026 12:02:00 +2400",
    "Thu, 31 Feb 2026 12:00:00 GMT",
    "Thu, 26 Nov 2026",
    "Thu",
]


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.none(),
        st.text(max_size=14),
        st.sampled_from(["²", "1e400", "inf", "nan", "-5", "1.5", "30", *DATES]),
        st.datetimes(timezones=st.just(UTC)).map(lambda d: format_datetime(d, usegmt=True)),
    )
)
def test_a_retry_after_of_any_text_is_seconds_within_a_day_or_none(value: str | None) -> None:
    delay = retry_after_seconds(value, now=NOW)
    assert delay is None or 0 <= delay <= 86_400
    if value is not None and value.isascii() and value.isdigit() and len(value) < 6:
        assert delay == float(value)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("Thu, 26 Nov 2026 12:02:00 GMT", 120.0),  # RFC 9110's IMF-fixdate
        ("Thu, 26 Nov 2026 12:02:00 +0000", 120.0),
        ("  Thu, 26 Nov 2026 12:00:30 GMT ", 30.0),
        ("Thursday, 26-Nov-26 12:01:00 GMT", 60.0),  # obsolete RFC 850 form
        ("Thu Nov 26 12:00:10 2026", 10.0),  # obsolete asctime form, read as GMT
        ("Thu, 26 Nov 2026 11:00:00 GMT", 0.0),  # already past: now
        ("Fri, 27 Nov 2026 13:00:00 GMT", 86_400.0),  # capped at a day, as seconds are
        ("Thu, 31 Feb 2026 12:00:00 GMT", None),
        ("Thu, 26 Nov 2026", None),
        ("26 Nov 2026 12:02:00 GMT", None),  # no day name: no HTTP-date
    ],
)
def test_a_retry_after_date_is_the_seconds_until_it(value: str, seconds: float | None) -> None:
    # Before: every HTTP-date was None, and the usual backoff applied.
    assert retry_after_seconds(value, now=NOW) == seconds


def test_a_retry_after_date_in_a_refusal_is_read_against_the_current_time() -> None:
    soon = format_datetime(datetime.now(UTC) + timedelta(minutes=10), usegmt=True)
    delay = classify_response(503, None, soon).retry_after_s
    assert delay is not None
    assert 590 <= delay <= 600


def test_a_retry_after_date_is_counted_from_the_servers_date_not_the_boxs_clock() -> None:
    # The box's clock a day behind (no battery clock, NTP not answered yet): the server asks
    # for a minute, by its own clock. Before: the loop waited an hour, each item a day.
    server_now = datetime.now(UTC) + timedelta(days=1)
    retry = format_datetime(server_now + timedelta(seconds=60), usegmt=True)
    served = format_datetime(server_now, usegmt=True)
    delay = classify_response(503, None, retry, served=served).retry_after_s
    assert delay == 60.0
    assert classify_for_resource(429, None, retry, served=served).retry_after_s == 60.0
    # A Date that is no date: the box's clock, as before.
    assert classify_response(503, None, retry, served="soon").retry_after_s == 86_400.0


@pytest.mark.parametrize(
    ("status", "failure"),
    [(502, Failure.TRANSIENT), (503, Failure.TRANSIENT), (504, Failure.AMBIGUOUS)],
)
def test_only_a_gateway_timeout_is_ambiguous_among_the_gateway_errors(
    status: int, failure: Failure
) -> None:
    # A 504 came from a gateway that gave up waiting on a request it may have forwarded:
    # the drain sends it again smaller (before: transient, the same bundle for ever).
    error = classify_response(status, None, "7")
    assert (error.failure, error.retry_after_s) == (failure, 7.0)
    assert classify_for_resource(status, None, None).failure is failure


def test_a_next_link_is_followed_only_on_the_upstream_itself() -> None:
    def page(url: str) -> dict[str, Any]:
        return {"resourceType": "Bundle", "link": [{"relation": "next", "url": url}]}

    on_it = "http://ehr.test/fhir/Patient?_offset=50"
    assert next_link(page(on_it), _CLIENT) == on_it
    # Our credentials go with the request: never to another host, nor beside the base path.
    assert next_link(page("http://other.test/fhir/Patient?_offset=50"), _CLIENT) is None
    assert next_link(page("http://ehr.test/fhirx/Patient?_offset=50"), _CLIENT) is None
    assert next_link(page("https://ehr.test/fhir/Patient?_offset=50"), _CLIENT) is None
    # HAPI's paging links are queries on the base itself (they were never followed).
    hapi = "http://ehr.test/fhir?_getpages=c9b2&_getpagesoffset=20&_count=20"
    assert next_link(page(hapi), _CLIENT) == hapi
    # Behind a proxy that does not pass the host on, HAPI writes its own address instead.
    internal = "http://localhost:8080/fhir?_getpages=c9b2&_getpagesoffset=20"
    assert next_link(page(internal), _CLIENT) is None
    also = ["http://localhost:8080/fhir"]
    assert next_link(page(internal), _CLIENT, also) == hapi.removesuffix("&_count=20")


@pytest.mark.parametrize(
    "reference",
    [
        "http://ehr.example.org/fhir/R4/Location/L1",
        "https://EHR.example.org/fhir/R4/Location/L1",
        "https://ehr.example.org:443/fhir/R4/Location/L1",
        "https://internal-node-3:8080/fhir/Location/L1/_history/2",
    ],
)
def test_a_reference_to_the_searched_resource_matches_however_it_spells_the_servers_address(
    reference: str,
) -> None:
    """The upstream's base_url is ``https://ehr.example.org/fhir/R4/``."""

    def appointment(actor: Any) -> dict[str, Any]:
        return {
            "resourceType": "Appointment",
            "participant": [
                {"actor": {"reference": "Patient/p1"}},
                {"actor": {"reference": actor}},
            ],
        }

    def reading(subject: str) -> dict[str, Any]:
        return {"resourceType": "Observation", "subject": {"reference": subject}}

    # Before: only the exact base_url text was stripped; an EHR storing its references as
    # http://, in capitals, with :443 or behind a gateway had every Appointment (and every
    # home reading) passed over, the cursor moving past them for good.
    assert asked_for("Appointment", {"actor": "Location/L1"}, appointment(reference))
    patient = reference.replace("Location/L1", "Patient/p1")
    assert asked_for("Observation", {"subject": "Patient/p1"}, reading(patient))
    assert not asked_for("Appointment", {"actor": "Location/L2"}, appointment(reference))
    assert not asked_for("Observation", {"subject": "Patient/p2"}, reading(patient))
    # Relative references as before; other text, or none, names nothing asked for.
    for same in ("Location/L1", "Location/L1/_history/3"):
        assert asked_for("Appointment", {"actor": "Location/L1"}, appointment(same))
    for other in ("Location/L10", "L1", "https://ehr.example.org/L1", "urn:uuid:L1", 7, None):
        assert not asked_for("Appointment", {"actor": "Location/L1"}, appointment(other))
