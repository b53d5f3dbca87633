"""The device-vendor ingest endpoint over a real store: keys, validation, resends, Bundles."""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from quart.testing import QuartClient
from werkzeug.datastructures import Headers

from appliance import fhir
from appliance.store import Store
from services.vendor_keys import VendorKeys
from services.vitals import CAPTURE_METHOD_SYSTEM, CAPTURE_SETTING_SYSTEM
from tests import factories
from tests.tamper import move_ciphertext
from tests.web.conftest import FakeClock
from web.ingest import VENDOR_SYSTEM, TokenBuckets

MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.9999.1"
MARKER = "Zzyzx-4417"  # a value that must never be echoed back


@pytest.fixture
async def key(store: Store) -> str:
    return await VendorKeys(store).add("acme-rpm", "user:admin")


@pytest.fixture
async def patient_id(store: Store) -> str:
    [patient] = await store.create([factories.patient(mrn="MRN-1001")], "user:admin")
    return patient.logical_id


def _reading(
    clock: FakeClock, subject: dict[str, Any], *, ident: str | None = "r-1", minutes_ago: int = 30
) -> dict[str, Any]:
    effective = (clock() - timedelta(minutes=minutes_ago)).isoformat()
    observation = factories.bp_observation("Patient/x", effective=effective)
    observation["subject"] = subject
    if ident is not None:
        observation["identifier"] = [{"system": "https://acme.example/readings", "value": ident}]
    return observation


def _by_mrn(mrn: str = "MRN-1001") -> dict[str, Any]:
    return {"identifier": {"system": MRN_SYSTEM, "value": mrn}}


async def _post(
    client: QuartClient,
    path: str,
    body: Any,
    key: str | None,
    *,
    content_type: str = "application/fhir+json",
    header: str = "Authorization",
) -> tuple[int, dict[str, Any], Headers]:
    headers = {"Content-Type": content_type}
    if key is not None:
        headers[header] = f"Bearer {key}" if header == "Authorization" else key
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    response = await client.post(path, data=data, headers=headers)
    raw = await response.get_data()
    assert response.mimetype == "application/fhir+json"
    return response.status_code, orjson.loads(raw), response.headers


async def _observations(store: Store) -> int:
    rows = await store.query("SELECT count(*) FROM resources WHERE type = 'Observation'")
    return int(rows[0][0])


def _expressions(outcome: dict[str, Any]) -> dict[str, str]:
    assert outcome["resourceType"] == "OperationOutcome"
    fhir.validate(outcome)
    return {i.get("expression", [""])[0]: i["diagnostics"] for i in outcome["issue"]}


# -- one Observation -----------------------------------------------------------------------


async def test_reading_by_mrn_lands_tagged_as_a_vendor_home_reading(
    client: QuartClient, store: Store, key: str, patient_id: str, clock: FakeClock
) -> None:
    status, body, headers = await _post(
        client, "/fhir/Observation", _reading(clock, _by_mrn()), key
    )
    assert status == 201
    assert headers["Location"].endswith(f"/fhir/Observation/{body['id']}")
    [stored] = await store.newest(f"Patient/{patient_id}", "Observation", "user:test")
    assert stored["id"] == body["id"]
    assert stored["subject"] == {"reference": f"Patient/{patient_id}"}
    tags = {(t["system"], t["code"]) for t in stored["meta"]["tag"]}
    assert {
        (CAPTURE_SETTING_SYSTEM, "home"),
        (CAPTURE_METHOD_SYSTEM, "vendor-hub"),
        (VENDOR_SYSTEM, "acme-rpm"),
    } <= tags
    actors = await store.query("SELECT actor, action FROM audit WHERE action = 'create'")
    assert ("vendor:acme-rpm", "create") in actors
    outbox = await store.query("SELECT count(*) FROM outbox")
    assert outbox[0][0] == 2  # the Patient and the reading, both on their way upstream


async def test_patient_named_by_id_or_conditional_reference_and_x_api_key(
    client: QuartClient, store: Store, key: str, patient_id: str, clock: FakeClock
) -> None:
    by_id = _reading(clock, {"reference": f"Patient/{patient_id}"}, ident="a")
    status, _, _ = await _post(client, "/fhir/Observation", by_id, key, header="X-API-Key")
    assert status == 201
    conditional = _reading(
        clock, {"reference": f"Patient?identifier={MRN_SYSTEM}|MRN-1001"}, ident="b"
    )
    status, _, _ = await _post(
        client, "/fhir/Observation", conditional, key, content_type="application/json"
    )
    assert status == 201
    assert await _observations(store) == 2


async def test_vendor_tags_in_our_systems_are_replaced(
    client: QuartClient, store: Store, key: str, patient_id: str, clock: FakeClock
) -> None:
    reading = _reading(clock, _by_mrn())
    reading["meta"] = {"tag": [{"system": CAPTURE_SETTING_SYSTEM, "code": "clinic"}]}
    status, body, _ = await _post(client, "/fhir/Observation", reading, key)
    assert status == 201
    settings = [t["code"] for t in body["meta"]["tag"] if t["system"] == CAPTURE_SETTING_SYSTEM]
    assert settings == ["home"]


@pytest.mark.parametrize(
    ("subject", "code"),
    [
        ({"identifier": {"system": MRN_SYSTEM, "value": "MRN-9999"}}, "not-found"),
        ({"reference": "Patient/0000-nobody"}, "not-found"),
        ({"identifier": {"system": MRN_SYSTEM, "value": "MRN-1001"}}, "multiple-matches"),
    ],
)
async def test_a_patient_that_is_not_exactly_one_local_patient_is_refused(
    client: QuartClient,
    store: Store,
    key: str,
    patient_id: str,
    clock: FakeClock,
    subject: dict[str, Any],
    code: str,
) -> None:
    if code == "multiple-matches":
        await store.create([factories.patient(family="Otherperson", mrn="MRN-1001")], "user:admin")
    status, body, _ = await _post(client, "/fhir/Observation", _reading(clock, subject), key)
    assert status == 422
    assert [i["code"] for i in body["issue"]] == [code]
    assert _expressions(body).keys() == {"Observation.subject"}
    assert await _observations(store) == 0


async def test_every_mistake_is_named_by_path_without_its_value(
    client: QuartClient, store: Store, key: str, patient_id: str, clock: FakeClock
) -> None:
    reading = _reading(clock, {"display": MARKER})
    del reading["status"]
    reading["code"] = {"text": MARKER}
    del reading["effectiveDateTime"]
    reading["component"][0]["valueQuantity"]["value"] = MARKER
    del reading["component"][1]["valueQuantity"]
    reading["device"] = {"reference": f"Device/{MARKER}"}
    reading["contained"] = [factories.patient(family=MARKER)]
    status, body, _ = await _post(client, "/fhir/Observation", reading, key)
    assert status == 400
    problems = _expressions(body)
    assert {
        "Observation.status",
        "Observation.code.coding",
        "Observation.effective[x]",
        "Observation.component[0].valueQuantity.value",
        "Observation.subject",
        "Observation.device.reference",
        "Observation.contained",
    } <= problems.keys()
    assert MARKER.encode() not in orjson.dumps(body)
    assert await _observations(store) == 0


@pytest.mark.parametrize(
    ("effective", "diagnostic"),
    [
        ("2026-11-20", "zone offset is required"),  # a day without a time or zone
        (None, "in the future"),
    ],
)
async def test_an_effective_time_that_cannot_be_placed_is_refused(
    client: QuartClient,
    store: Store,
    key: str,
    patient_id: str,
    clock: FakeClock,
    effective: str | None,
    diagnostic: str,
) -> None:
    reading = _reading(clock, _by_mrn())
    reading["effectiveDateTime"] = effective or (clock() + timedelta(hours=2)).isoformat()
    status, body, _ = await _post(client, "/fhir/Observation", reading, key)
    assert status == 400
    assert diagnostic in _expressions(body)["Observation.effective[x]"]


async def test_a_value_and_an_observation_are_required(
    client: QuartClient, store: Store, key: str, patient_id: str, clock: FakeClock
) -> None:
    reading = _reading(clock, _by_mrn())
    del reading["component"]
    status, body, _ = await _post(client, "/fhir/Observation", reading, key)
    assert status == 400
    assert "Observation.value[x]" in _expressions(body)
    status, body, _ = await _post(client, "/fhir/Observation", factories.patient(), key)
    assert status == 400
    assert _expressions(body).keys() == {"Observation.resourceType"}


async def test_wrong_content_type_and_bad_json_are_refused(
    client: QuartClient, store: Store, key: str, patient_id: str, clock: FakeClock
) -> None:
    reading = _reading(clock, _by_mrn())
    status, body, _ = await _post(
        client, "/fhir/Observation", reading, key, content_type="text/plain"
    )
    assert (status, body["issue"][0]["code"]) == (415, "not-supported")
    status, body, _ = await _post(client, "/fhir/Observation", b'{"resourceType": ', key)
    assert (status, body["issue"][0]["code"]) == (400, "structure")
    assert await _observations(store) == 0


async def test_a_deeply_nested_body_is_refused_as_structure_not_a_500(
    client: QuartClient, store: Store, key: str, patient_id: str, clock: FakeClock
) -> None:
    reading = _reading(clock, _by_mrn())
    nested: dict[str, Any] = {"url": "urn:example:x", "valueString": "synthetic"}
    for _ in range(100):  # valid FHIR, and small: before, it was stored (201)
        nested = {"url": "urn:example:x", "extension": [nested]}
    reading["extension"] = [nested]
    raw = b'{"url":"urn:example:x","extension":[' * 120 + b"{}" + b"]}" * 120
    for body in (json.dumps(reading).encode(), raw):  # orjson itself refuses to encode it
        status, answer, _ = await _post(client, "/fhir/Observation", body, key)
        # What no device sends, and what makes parsers and encoders recurse: refused first.
        assert (status, answer["issue"][0]["code"]) == (400, "structure")
        assert "deeper than 64 levels" in answer["issue"][0]["diagnostics"]
    assert await _observations(store) == 0


async def test_a_reading_for_a_patient_whose_record_is_unreadable_is_refused_for_now(
    client: QuartClient, store: Store, key: str, patient_id: str, clock: FakeClock, db_path: Path
) -> None:
    [other] = await store.create([factories.patient(mrn="MRN-2002")], "user:admin")
    move_ciphertext(db_path, patient_id, other.logical_id)
    status, body, headers = await _post(
        client, "/fhir/Observation", _reading(clock, _by_mrn()), key
    )
    # Before: the match read as "no such patient" (422) or a 500; never filed elsewhere.
    assert (status, body["issue"][0]["code"], headers["Retry-After"]) == (503, "transient", "300")
    assert "integrity check" in body["issue"][0]["diagnostics"]
    assert await _observations(store) == 0


async def test_an_oversized_body_gets_413_with_an_operation_outcome(
    client: QuartClient, store: Store, key: str, patient_id: str, clock: FakeClock
) -> None:
    reading = _reading(clock, _by_mrn())
    reading["note"] = [{"text": "x" * 70_000}]
    status, body, _ = await _post(client, "/fhir/Observation", reading, key)
    assert status == 413
    assert body["issue"][0]["code"] == "too-costly"
    assert await _observations(store) == 0


# -- keys, cookies and limits --------------------------------------------------------------


@pytest.mark.parametrize("presented", [None, "thv_not-a-key", "disabled"])
async def test_a_missing_wrong_or_disabled_key_gets_401(
    client: QuartClient,
    store: Store,
    key: str,
    patient_id: str,
    clock: FakeClock,
    presented: str | None,
) -> None:
    if presented == "disabled":
        await VendorKeys(store).disable("acme-rpm", "user:admin")
        presented = key
    status, body, headers = await _post(
        client, "/fhir/Observation", _reading(clock, _by_mrn()), presented
    )
    assert status == 401
    assert body["issue"][0]["code"] == "security"
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert await _observations(store) == 0
    [(actor, outcome)] = await store.query(
        "SELECT actor, outcome FROM audit WHERE action = 'login_failed'"
    )
    expected = (
        ("vendor:acme-rpm", "denied") if presented == key else ("vendor:(unknown)", "failure")
    )
    assert (actor, outcome) == expected


async def test_a_browser_session_cookie_is_not_a_credential(
    logged_in: QuartClient, store: Store, key: str, patient_id: str, clock: FakeClock
) -> None:
    reading = _reading(clock, _by_mrn())
    status, body, _ = await _post(logged_in, "/fhir/Observation", reading, None)
    assert status == 401
    assert body["issue"][0]["code"] == "security"
    assert await _observations(store) == 0
    # The key is the credential; the cookie beside it is ignored, so no CSRF token is needed.
    status, _, _ = await _post(logged_in, "/fhir/Observation", reading, key)
    assert status == 201
    # The browser pages keep their CSRF check.
    assert (await logged_in.post("/logout")).status_code == 403


async def test_repeated_wrong_keys_are_throttled_per_address(
    client: QuartClient, store: Store, key: str, patient_id: str, clock: FakeClock
) -> None:
    reading = _reading(clock, _by_mrn())
    statuses = [(await _post(client, "/fhir/Observation", reading, "wrong"))[0] for _ in range(11)]
    assert statuses == [401] * 10 + [429]
    status, _, headers = await _post(client, "/fhir/Observation", reading, key)
    assert status == 429
    assert int(headers["Retry-After"]) >= 1
    clock.advance(10)
    assert (await _post(client, "/fhir/Observation", reading, key))[0] == 201


def test_token_buckets_allow_a_burst_then_the_steady_rate() -> None:
    buckets = TokenBuckets(burst=3, per_s=0.5)
    assert [buckets.take("acme", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("acme", 100.0) == pytest.approx(2.0)
    assert buckets.take("other", 100.0) == 0.0
    assert buckets.wait_s("acme", 101.0) == pytest.approx(1.0)
    assert buckets.take("acme", 102.0) == 0.0


# -- resends -------------------------------------------------------------------------------


@pytest.mark.parametrize("ident", ["r-77", None])
async def test_a_resend_answers_200_with_the_stored_reading(
    client: QuartClient,
    store: Store,
    key: str,
    patient_id: str,
    clock: FakeClock,
    ident: str | None,
) -> None:
    reading = _reading(clock, _by_mrn(), ident=ident)
    first = await _post(client, "/fhir/Observation", reading, key)
    again = await _post(client, "/fhir/Observation", copy.deepcopy(reading), key)
    assert first[0] == 201
    assert again[0] == 200
    assert again[2]["Location"] == first[2]["Location"]
    assert again[1]["issue"][0]["code"] == "duplicate"
    assert await _observations(store) == 1


async def test_a_different_reading_with_a_new_identifier_is_stored(
    client: QuartClient, store: Store, key: str, patient_id: str, clock: FakeClock
) -> None:
    for ident in ("r-1", "r-2"):
        assert (
            await _post(client, "/fhir/Observation", _reading(clock, _by_mrn(), ident=ident), key)
        )[0] == 201
    assert await _observations(store) == 2


# -- Bundles -------------------------------------------------------------------------------


def _bundle(kind: str, resources: list[Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {"resource": r, "request": {"method": "POST", "url": "Observation"}} for r in resources
        ],
    }


async def test_a_transaction_lands_whole(
    client: QuartClient, store: Store, key: str, patient_id: str, clock: FakeClock
) -> None:
    readings = [_reading(clock, _by_mrn(), ident=f"t-{i}", minutes_ago=i) for i in range(3)]
    status, body, _ = await _post(client, "/fhir", _bundle("transaction", readings), key)
    assert status == 200
    fhir.validate(body)
    assert body["type"] == "transaction-response"
    assert [e["response"]["status"] for e in body["entry"]] == ["201 Created"] * 3
    assert await _observations(store) == 3
    again = await _post(client, "/fhir", _bundle("transaction", readings), key)
    assert [e["response"]["status"] for e in again[1]["entry"]] == ["200 OK"] * 3
    assert await _observations(store) == 3


async def test_a_transaction_with_one_bad_entry_writes_nothing(
    client: QuartClient, store: Store, key: str, patient_id: str, clock: FakeClock
) -> None:
    readings = [_reading(clock, _by_mrn(), ident=f"t-{i}") for i in range(3)]
    del readings[1]["status"]
    audit_before = await store.query("SELECT count(*) FROM audit")
    status, body, _ = await _post(client, "/fhir", _bundle("transaction", readings), key)
    assert status == 400
    assert _expressions(body).keys() == {"Bundle.entry[1].resource.status"}
    assert await _observations(store) == 0
    assert await store.query("SELECT count(*) FROM outbox WHERE resource_id > 1") == [(0,)]
    assert await store.query("SELECT count(*) FROM audit") == audit_before


async def test_a_batch_with_one_bad_entry_files_the_rest(
    client: QuartClient, store: Store, key: str, patient_id: str, clock: FakeClock
) -> None:
    readings = [_reading(clock, _by_mrn(), ident=f"b-{i}") for i in range(3)]
    readings[0]["subject"] = _by_mrn("MRN-9999")
    bundle = _bundle("batch", readings)
    bundle["entry"][2]["request"]["method"] = "PUT"
    status, body, _ = await _post(client, "/fhir", bundle, key)
    assert status == 200
    fhir.validate(body)
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses == ["422 Unprocessable Entity", "201 Created", "400 Bad Request"]
    assert _expressions(body["entry"][2]["response"]["outcome"]).keys() == {
        "Bundle.entry[2].request"
    }
    assert await _observations(store) == 1


async def test_the_same_reading_twice_in_one_bundle_is_stored_once(
    client: QuartClient, store: Store, key: str, patient_id: str, clock: FakeClock
) -> None:
    reading = _reading(clock, _by_mrn())
    status, body, _ = await _post(client, "/fhir", _bundle("batch", [reading, reading]), key)
    assert status == 200
    first, second = (e["response"] for e in body["entry"])
    assert (first["status"], second["status"]) == ("201 Created", "200 OK")
    assert first["location"] == second["location"]
    assert await _observations(store) == 1


async def test_a_bundle_of_another_kind_is_refused(
    client: QuartClient, store: Store, key: str, patient_id: str, clock: FakeClock
) -> None:
    status, body, _ = await _post(client, "/fhir", _bundle("collection", []), key)
    assert status == 400
    assert _expressions(body).keys() == {"Bundle.type"}
    status, body, _ = await _post(client, "/fhir", _bundle("batch", [{}] * 101), key)
    assert status == 413
    assert _expressions(body).keys() == {"Bundle.entry"}
