"""The local FHIR read API over a real store: metadata, read, search, keys, audit, limits."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quart.testing import QuartClient
from quart.typing import TestAppProtocol as AppFactory
from werkzeug.datastructures import Headers

import appliance
from appliance import fhir
from appliance.store import Store, UpstreamCopy
from services.vendor_keys import KeyScope, VendorKeys
from tests import factories
from tests.tamper import flip_byte
from tests.web.conftest import FakeClock
from web import fhir_api
from web.ingest import IngestLimits, TokenBuckets

MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.9999.1"  # as tests.factories.patient
LOINC = "http://loinc.org"


@pytest.fixture
async def read_key(store: Store) -> str:
    return await VendorKeys(store).add("ehr-bridge", "user:admin", scope=KeyScope.READ)


@pytest.fixture
async def ingest_key(store: Store) -> str:
    return await VendorKeys(store).add("acme-rpm", "user:admin")


@pytest.fixture
async def patient_id(store: Store) -> str:
    [patient] = await store.create([factories.patient(mrn="MRN-1001")], "user:admin")
    return patient.logical_id


async def _get(
    client: QuartClient, path: str, key: str | None, *, header: str = "Authorization"
) -> tuple[int, dict[str, Any], Headers]:
    headers = {}
    if key is not None:
        headers[header] = f"Bearer {key}" if header == "Authorization" else key
    response = await client.get(path, headers=headers)
    assert response.mimetype == "application/fhir+json", (path, response.status_code)
    return response.status_code, orjson.loads(await response.get_data()), response.headers


def _issue(outcome: dict[str, Any]) -> tuple[str, str]:
    assert outcome["resourceType"] == "OperationOutcome"
    fhir.validate(outcome)
    issue = outcome["issue"][0]
    return issue["code"], issue.get("expression", [""])[0]


async def _audit(store: Store, since: int = 0) -> list[tuple[Any, ...]]:
    return await store.query(
        "SELECT actor, action, outcome, entity, detail, patient_key FROM audit WHERE id > ? "
        "ORDER BY id",
        (since,),
    )


async def _last_audit_id(store: Store) -> int:
    return int((await store.query("SELECT coalesce(max(id), 0) FROM audit"))[0][0])


def _readings(patient_id: str, clock: FakeClock, n: int) -> list[dict[str, Any]]:
    return [
        factories.bp_observation(
            f"Patient/{patient_id}", effective=(clock() - timedelta(hours=i)).isoformat()
        )
        for i in range(n)
    ]


# -- metadata ------------------------------------------------------------------------------


async def test_metadata_is_a_valid_capability_statement_of_exactly_what_is_served(
    client: QuartClient,
) -> None:
    status, statement, headers = await _get(client, "/fhir/metadata", None)  # no key needed
    assert status == 200
    fhir.validate(statement)
    assert statement["fhirVersion"] == "4.3.0"  # the R4B models of appliance/fhir.py
    assert statement["software"]["version"] == appliance.__version__
    assert "application/fhir+json" in statement["format"]
    [rest] = statement["rest"]
    assert "Bearer" in rest["security"]["description"]
    served = {
        r["type"]: (
            {i["code"] for i in r["interaction"]},
            {p["name"] for p in r.get("searchParam", [])},
        )
        for r in rest["resource"]
    }
    assert set(served) == set(fhir_api.READ_TYPES)
    assert "Claim" not in served
    assert "AuditEvent" not in served
    for rtype, (interactions, params) in served.items():
        expected = {"read"}
        if rtype in ("Patient", "Observation"):
            expected.add("search-type")
        if rtype == "Observation":
            expected.add("create")
        assert interactions == expected, rtype
        assert params == {p.name for p in fhir_api.SEARCH_PARAMS.get(rtype, ())}
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch"}
    assert "no-store" in headers["Cache-Control"]


async def test_every_listed_interaction_is_answered_and_nothing_else(
    client: QuartClient, read_key: str
) -> None:
    status, statement, _ = await _get(client, "/fhir/metadata", None)
    for resource in statement["rest"][0]["resource"]:
        rtype = resource["type"]
        status, body, _ = await _get(client, f"/fhir/{rtype}/no-such-id", read_key)
        assert (status, _issue(body)[0]) == (404, "not-found"), rtype
        assert body["issue"][0]["diagnostics"] == f"no {rtype} with this id"
        status, body, _ = await _get(client, f"/fhir/{rtype}", read_key)
        searchable = any(i["code"] == "search-type" for i in resource["interaction"])
        assert status == 400, rtype
        assert _issue(body)[0] == ("required" if searchable else "not-supported"), rtype
    for unserved in ("Claim", "AuditEvent", "Coverage", "Nonsense"):
        status, body, _ = await _get(client, f"/fhir/{unserved}/no-such-id", read_key)
        assert (status, _issue(body)[0]) == (404, "not-found")
        status, body, _ = await _get(client, f"/fhir/{unserved}", read_key)
        assert (status, _issue(body)[0]) == (404, "not-found")


# -- read ----------------------------------------------------------------------------------


async def test_each_served_type_reads_back_as_stored_and_is_audited_with_the_vendor(
    client: QuartClient, store: Store, read_key: str, patient_id: str
) -> None:
    ref = f"Patient/{patient_id}"
    made = {
        "Observation": factories.bp_observation(ref),
        "Encounter": {
            "resourceType": "Encounter",
            "status": "finished",
            "class": {
                "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                "code": "AMB",
            },
            "subject": {"reference": ref},
        },
        "Device": {"resourceType": "Device", "status": "active", "patient": {"reference": ref}},
        "Consent": {
            "resourceType": "Consent",
            "status": "active",
            "scope": {"coding": [{"code": "treatment"}]},
            "category": [{"coding": [{"code": "59284-0", "system": LOINC}]}],
            "patient": {"reference": ref},
        },
        "QuestionnaireResponse": {
            "resourceType": "QuestionnaireResponse",
            "status": "completed",
            "subject": {"reference": ref},
        },
        "Media": {
            "resourceType": "Media",
            "status": "completed",
            "subject": {"reference": ref},
            "content": {"contentType": "image/jpeg", "data": "AAAA"},
        },
        "DocumentReference": {
            "resourceType": "DocumentReference",
            "status": "current",
            "subject": {"reference": ref},
            "content": [{"attachment": {"contentType": "text/plain", "data": "AAAA"}}],
        },
        "Appointment": {
            "resourceType": "Appointment",
            "status": "booked",
            "participant": [{"actor": {"reference": ref}, "status": "accepted"}],
        },
    }
    stored = {r.type: r for r in await store.create(list(made.values()), "user:admin")}
    stored_patient = (await store.find_by_identifier(MRN_SYSTEM, "MRN-1001", "user:test"))[0]
    assert set(stored) | {"Patient"} == set(fhir_api.READ_TYPES)
    for rtype in fhir_api.READ_TYPES:
        logical_id = patient_id if rtype == "Patient" else stored[rtype].logical_id
        expected = stored_patient if rtype == "Patient" else stored[rtype].resource
        before = await _last_audit_id(store)
        status, body, headers = await _get(client, f"/fhir/{rtype}/{logical_id}", read_key)
        assert status == 200, rtype
        assert body == expected
        assert headers["ETag"] == 'W/"1"'
        assert headers["Last-Modified"].endswith(" GMT")
        assert headers["Cache-Control"] == "no-store"
        [(actor, action, outcome, entity, _detail, _key)] = await _audit(store, before)
        assert (actor, action, outcome, entity) == (
            "vendor:ehr-bridge",
            "read",
            "success",
            f"{rtype}/{logical_id}",
        )


async def test_the_etag_counts_local_versions(
    client: QuartClient, store: Store, read_key: str, patient_id: str
) -> None:
    current = await store.read("Patient", patient_id, "user:test")
    edited = {**current, "gender": "other"}
    await store.update("Patient", patient_id, edited, "user:admin")
    status, body, headers = await _get(client, f"/fhir/Patient/{patient_id}", read_key)
    assert status == 200
    assert (body["gender"], headers["ETag"]) == ("other", 'W/"2"')


async def test_an_id_of_another_type_is_not_found_and_does_not_say_so(
    client: QuartClient, store: Store, read_key: str, patient_id: str
) -> None:
    missing = await _get(client, "/fhir/Observation/0000-nothing", read_key)
    other_type = await _get(client, f"/fhir/Observation/{patient_id}", read_key)
    assert missing[0] == other_type[0] == 404
    assert missing[1] == other_type[1]


# -- keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize("presented", [None, "thv_not-a-key", "disabled"])
async def test_a_missing_wrong_or_disabled_key_gets_401_and_is_audited(
    client: QuartClient, store: Store, read_key: str, patient_id: str, presented: str | None
) -> None:
    if presented == "disabled":
        await VendorKeys(store).disable("ehr-bridge", "user:admin")
        presented = read_key
    for path in (f"/fhir/Patient/{patient_id}", f"/fhir/Patient?identifier={MRN_SYSTEM}|MRN-1001"):
        before = await _last_audit_id(store)
        status, body, headers = await _get(client, path, presented)
        assert (status, _issue(body)[0]) == (401, "security")
        assert headers["WWW-Authenticate"] == 'Bearer realm="read"'
        [(actor, action, outcome, entity, _d, _k)] = await _audit(store, before)
        expected = (
            ("vendor:ehr-bridge", "denied")
            if presented == read_key
            else ("vendor:(unknown)", "failure")
        )
        assert (actor, outcome, action, entity) == (*expected, "login_failed", "fhir read")


async def test_an_ingest_key_cannot_read_and_a_read_key_cannot_post(
    client: QuartClient,
    store: Store,
    read_key: str,
    ingest_key: str,
    patient_id: str,
    clock: FakeClock,
) -> None:
    before = await _last_audit_id(store)
    status, body, _ = await _get(client, f"/fhir/Patient/{patient_id}", ingest_key)
    assert (status, _issue(body)[0]) == (403, "forbidden")
    assert "patient" not in orjson.dumps(body).decode().lower().replace("ingest", "")
    [(actor, action, outcome, entity, _d, _k)] = await _audit(store, before)
    assert (actor, action, outcome, entity) == ("vendor:acme-rpm", "read", "denied", "fhir read")

    reading = factories.bp_observation(
        f"Patient/{patient_id}", effective=(clock() - timedelta(minutes=5)).isoformat()
    )
    before = await _last_audit_id(store)
    for path, body_sent in (
        ("/fhir/Observation", reading),
        ("/fhir", {"resourceType": "Bundle", "type": "batch", "entry": []}),
    ):
        response = await client.post(
            path,
            data=orjson.dumps(body_sent),
            headers={
                "Authorization": f"Bearer {read_key}",
                "Content-Type": "application/fhir+json",
            },
        )
        assert response.status_code == 403
        assert _issue(orjson.loads(await response.get_data()))[0] == "forbidden"
    rows = await _audit(store, before)
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("vendor:ehr-bridge", "create", "denied", "fhir ingest")
    ] * 2
    assert await store.query("SELECT count(*) FROM resources WHERE type = 'Observation'") == [(0,)]


async def test_wrong_keys_share_the_ingest_failure_limit_and_reads_have_their_own_rate(
    app: AppFactory, client: QuartClient, store: Store, read_key: str, patient_id: str
) -> None:
    path = f"/fhir/Patient/{patient_id}"
    statuses = [(await _get(client, path, "wrong"))[0] for _ in range(10)]
    assert statuses == [401] * 10
    status, _, headers = await _get(client, path, read_key)  # the address's budget is spent
    assert status == 429
    assert int(headers["Retry-After"]) >= 1
    quart = app.app  # type: ignore[attr-defined]
    quart.extensions["ingest"] = IngestLimits(readers=TokenBuckets(burst=2, per_s=0.001))
    assert [(await _get(client, path, read_key))[0] for _ in range(3)] == [200, 200, 429]


async def test_x_api_key_and_a_session_cookie_is_not_a_credential(
    logged_in: QuartClient, read_key: str, patient_id: str
) -> None:
    status, _, _ = await _get(logged_in, f"/fhir/Patient/{patient_id}", None)
    assert status == 401
    status, _, _ = await _get(
        logged_in, f"/fhir/Patient/{patient_id}", read_key, header="X-API-Key"
    )
    assert status == 200


# -- search: Patient -----------------------------------------------------------------------


async def test_patient_by_identifier_and_by_family_and_birthdate(
    client: QuartClient, store: Store, read_key: str, patient_id: str
) -> None:
    before = await _last_audit_id(store)
    status, bundle, _ = await _get(
        client, f"/fhir/Patient?identifier={quote(MRN_SYSTEM)}|MRN-1001", read_key
    )
    assert status == 200
    fhir.validate(bundle)
    assert (bundle["type"], bundle["total"]) == ("searchset", 1)
    assert [e["resource"]["id"] for e in bundle["entry"]] == [patient_id]
    assert bundle["entry"][0]["fullUrl"].endswith(f"/fhir/Patient/{patient_id}")
    [(actor, action, _o, entity, detail, _k)] = await _audit(store, before)
    assert (actor, action, entity) == ("vendor:ehr-bridge", "search", "Patient by identifier")
    assert detail == f"returned Patient/{patient_id}"

    status, bundle, _ = await _get(
        client, "/fhir/Patient?family=testperson&birthdate=1961-04-09", read_key
    )
    assert [e["resource"]["id"] for e in bundle["entry"]] == [patient_id]
    status, bundle, _ = await _get(
        client,
        f"/fhir/Patient?family=Testperson&birthdate=1961-04-09&identifier={MRN_SYSTEM}|OTHER",
        read_key,
    )
    assert (status, bundle["total"], "entry" in bundle) == (200, 0, False)
    fhir.validate(bundle)  # an empty page is still a valid Bundle (no empty arrays)


async def test_patient_search_pages_with_count_and_a_next_link(
    client: QuartClient, store: Store, read_key: str, patient_id: str
) -> None:
    await store.create(
        [factories.patient(given=g, mrn=f"MRN-2{i}") for i, g in enumerate(("Bo", "Cy"))],
        "user:admin",
    )
    seen: list[str] = []
    path: str | None = "/fhir/Patient?family=Testperson&birthdate=1961-04-09&_count=2"
    pages = 0
    while path is not None:
        status, bundle, _ = await _get(client, path, read_key)
        assert status == 200
        assert bundle["total"] == 3
        seen += [e["resource"]["id"] for e in bundle["entry"]]
        following = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        path = urlsplit(following[0])._replace(scheme="", netloc="").geturl() if following else None
        pages += 1
    assert pages == 2
    assert len(set(seen)) == 3
    assert patient_id in seen


@pytest.mark.parametrize(
    ("query", "expression", "code"),
    [
        ("name=Testperson", "name", "not-supported"),
        ("family:exact=Testperson&birthdate=1961-04-09", "family:exact", "not-supported"),
        ("_sort=-date&identifier=a|b", "_sort", "not-supported"),
        ("family=Testperson", "birthdate", "required"),
        ("family=Testperson&birthdate=1961-04", "birthdate", "invalid"),
        ("identifier=MRN-1001", "identifier", "invalid"),
        ("identifier=a|b&identifier=c|d", "identifier", "invalid"),
        ("identifier=a|b&_count=0", "_count", "invalid"),
        ("identifier=a|b&_count=ten", "_count", "invalid"),
        ("identifier=a|b&_format=xml", "_format", "not-supported"),
        ("identifier=a|b&_after=x", "_after", "not-supported"),
        ("", "", "required"),
    ],
)
async def test_unsupported_or_malformed_patient_searches_are_400_naming_the_parameter(
    client: QuartClient, read_key: str, query: str, expression: str, code: str
) -> None:
    status, body, _ = await _get(client, f"/fhir/Patient?{query}", read_key)
    assert status == 400
    assert _issue(body) == (code, expression)


# -- search: Observation -------------------------------------------------------------------


async def test_observations_by_patient_page_newest_first_with_count_and_next(
    client: QuartClient, store: Store, read_key: str, patient_id: str, clock: FakeClock
) -> None:
    created = await store.create(_readings(patient_id, clock, 5), "service:devices")
    newest_first = [r.logical_id for r in created]  # reading i is i hours old
    [other] = await store.create([factories.patient(family="Otherperson")], "user:admin")
    await store.create(_readings(other.logical_id, clock, 2), "service:devices")
    before = await _last_audit_id(store)
    seen: list[str] = []
    path: str | None = f"/fhir/Observation?patient={patient_id}&_count=2"
    while path is not None:
        status, bundle, _ = await _get(client, path, read_key)
        assert status == 200
        fhir.validate(bundle)
        assert bundle["total"] == 5
        assert len(bundle["entry"]) <= 2
        seen += [e["resource"]["id"] for e in bundle["entry"]]
        following = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        path = urlsplit(following[0])._replace(scheme="", netloc="").geturl() if following else None
    assert seen == newest_first
    rows = await _audit(store, before)
    assert len(rows) == 3  # one per page
    key = store.patient_key(f"Patient/{patient_id}")
    for actor, action, _o, _entity, _detail, patient_key in rows:
        assert (actor, action, bytes(patient_key)) == ("vendor:ehr-bridge", "search", key)
    assert rows[0][4] == f"returned Observation {newest_first[0]}, {newest_first[1]}"

    by_subject = await _get(client, f"/fhir/Observation?subject=Patient/{patient_id}", read_key)
    assert [e["resource"]["id"] for e in by_subject[1]["entry"]] == newest_first


async def test_a_damaged_reading_is_left_out_of_a_search_with_an_outcome_not_a_failure(
    client: QuartClient,
    store: Store,
    read_key: str,
    patient_id: str,
    clock: FakeClock,
    db_path: Path,
) -> None:
    created = await store.create(_readings(patient_id, clock, 5), "service:devices")
    ids = [r.logical_id for r in created]  # newest first
    flip_byte(db_path, ids[1])  # a bad sector under the last reading of the first page
    before = await _last_audit_id(store)
    pages = []
    path: str | None = f"/fhir/Observation?patient={patient_id}&_count=2"
    while path is not None:
        status, bundle, _ = await _get(client, path, read_key)
        assert status == 200, bundle
        fhir.validate(bundle)
        pages.append(bundle)
        following = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        path = urlsplit(following[0])._replace(scheme="", netloc="").geturl() if following else None
    matches = [
        e["resource"]["id"]
        for page in pages
        for e in page["entry"]
        if e["search"]["mode"] == "match"
    ]
    assert matches == [ids[0], *ids[2:]]  # the paging goes on past the damaged one
    assert [page["total"] for page in pages] == [5, 5, 5]
    [outcome] = [e for e in pages[0]["entry"] if e["search"]["mode"] == "outcome"]
    assert _issue(outcome["resource"]) == ("processing", "")
    assert outcome["resource"]["issue"][0]["severity"] == "warning"
    assert "1 matching Observation" in outcome["resource"]["issue"][0]["diagnostics"]
    assert all(e["search"]["mode"] == "match" for page in pages[1:] for e in page["entry"])
    failures = [row for row in await _audit(store, before) if row[2] != "success"]
    assert [(actor, entity) for actor, _a, _o, entity, _d, _k in failures] == [
        ("vendor:ehr-bridge", f"Observation/{ids[1]}")
    ]


async def test_observations_by_code_and_date(
    client: QuartClient, store: Store, read_key: str, patient_id: str, clock: FakeClock
) -> None:
    readings = _readings(patient_id, clock, 4)
    readings[0]["code"] = {"coding": [{"system": LOINC, "code": "8867-4"}]}  # a heart rate
    readings[0]["valueQuantity"] = readings[0].pop("component")[0]["valueQuantity"]
    created = await store.create(readings, "service:devices")
    ids = [r.logical_id for r in created]

    async def found(query: str) -> list[str]:
        status, bundle, _ = await _get(
            client, f"/fhir/Observation?patient={patient_id}&{query}", read_key
        )
        assert status == 200, bundle
        return [e["resource"]["id"] for e in bundle.get("entry", [])]

    assert await found(f"code={quote(LOINC)}|85354-9") == ids[1:]
    assert await found(f"code={quote(LOINC)}|8867-4") == ids[:1]
    cut = quote((clock() - timedelta(hours=1, minutes=30)).isoformat())
    assert await found(f"date=ge{cut}") == ids[:2]
    assert await found(f"date=lt{cut}") == ids[2:]
    lower = quote((clock() - timedelta(hours=2, minutes=30)).isoformat())
    assert await found(f"date=lt{cut}&date=gt{lower}") == ids[2:3]
    assert await found("date=1999") == []
    today = clock().date().isoformat()
    assert set(await found(f"date=le{today[:4]}")) == set(ids)


@pytest.mark.parametrize(
    ("query", "expression"),
    [
        ("code=85354-9", "code"),
        ("date=2026-13-01", "date"),
        ("date=2026-11-20T10:00:00", "date"),  # no zone
        ("date=ge2026-01-01&date=gt2026-02-01", "date"),
        ("date=", "date"),
        ("date=ge0001-01-01T00:00:00%2B14:00", "date"),
        ("_after=0000-nothing", "_after"),
        ("_offset=2", "_offset"),
        ("value-quantity=gt100", "value-quantity"),
    ],
)
async def test_malformed_observation_searches_are_400(
    client: QuartClient, read_key: str, patient_id: str, query: str, expression: str
) -> None:
    status, body, _ = await _get(
        client, f"/fhir/Observation?patient={patient_id}&{query}", read_key
    )
    assert status == 400
    assert _issue(body)[1] == expression


async def test_an_observation_search_needs_exactly_one_patient(
    client: QuartClient, read_key: str, patient_id: str
) -> None:
    for query in ("code=a|b", f"patient={patient_id}&subject=Patient/{patient_id}"):
        status, body, _ = await _get(client, f"/fhir/Observation?{query}", read_key)
        assert (status, _issue(body)) == (400, ("required", "patient"))
    status, body, _ = await _get(client, f"/fhir/Observation?subject={patient_id}", read_key)
    assert (status, _issue(body)) == (400, ("invalid", "subject"))


async def test_count_over_the_maximum_is_served_as_the_maximum(
    client: QuartClient, read_key: str, patient_id: str
) -> None:
    status, bundle, _ = await _get(
        client, f"/fhir/Observation?patient={patient_id}&_count=5000", read_key
    )
    assert status == 200
    [self_link] = [link["url"] for link in bundle["link"] if link["relation"] == "self"]
    assert ("_count", "200") in parse_qsl(urlsplit(self_link).query)


# -- an upstream copy reads back as the store keeps it -------------------------------------


async def test_an_upstream_copy_is_served_with_its_own_meta_and_our_version(
    client: QuartClient, store: Store, read_key: str
) -> None:
    copy = UpstreamCopy(
        "Patient/up-1",
        "7",
        "2026-11-01T10:00:00Z",
        {**factories.patient(mrn="MRN-UP"), "id": "up-1", "meta": {"versionId": "7"}},
    )
    [imported] = await store.import_upstream([copy], "service:sync")
    assert imported.logical_id is not None
    status, body, headers = await _get(client, f"/fhir/Patient/{imported.logical_id}", read_key)
    assert status == 200
    assert body["meta"]["versionId"] == "7"  # the upstream's, as stored
    assert headers["ETag"] == 'W/"1"'  # ours


# -- no query string gives a server error --------------------------------------------------

_NAMES = st.sampled_from(
    [
        "identifier",
        "family",
        "birthdate",
        "patient",
        "subject",
        "code",
        "date",
        "_count",
        "_offset",
        "_after",
        "_format",
        "_sort",
        "name",
        "family:exact",
        "",
    ]
)
_VALUES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "a|b",
            "|",
            "||",
            "ge2026",
            "lt9999-12-31",
            "ge0001-01-01T00:00:00+14:00",
            "eq",
            "0",
            "999999999999",
            "Patient/x",
            "Patient/",
            "2026-02-30",
            "9999-12-31T23:59:59-14:00",
        ]
    ),
)


@given(
    rtype=st.sampled_from(["Patient", "Observation"]),
    pairs=st.lists(st.tuples(_NAMES | st.text(max_size=10), _VALUES), max_size=5),
)
@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
async def test_arbitrary_query_strings_never_give_a_server_error(
    app: AppFactory, read_key: str, patient_id: str, rtype: str, pairs: list[tuple[str, str]]
) -> None:
    quart = app.app  # type: ignore[attr-defined]
    quart.extensions["ingest"] = IngestLimits(readers=TokenBuckets(1e9, 1e9))
    client = app.test_client()
    query = "&".join(f"{quote(n, safe='')}={quote(v, safe='')}" for n, v in pairs)
    response = await client.get(
        f"/fhir/{rtype}?{query}", headers={"Authorization": f"Bearer {read_key}"}
    )
    assert response.status_code in (200, 400), response.status_code
    body = orjson.loads(await response.get_data())
    assert body["resourceType"] == ("Bundle" if response.status_code == 200 else "OperationOutcome")
