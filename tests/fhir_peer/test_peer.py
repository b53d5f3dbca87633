"""Tests of the loopback FHIR peer itself (Medplum fhir-router + MemoryRepository in Node)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.factories import bp_observation, patient
from tests.fhir_peer.peer import FhirPeer

pytestmark = pytest.mark.peer

FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
ID_SYSTEM = "urn:ietf:rfc:3986"


@pytest.fixture(scope="module")
def _own_fhir_peer() -> Iterator[FhirPeer]:
    # Only used when no conftest provides the session-wide `fhir_peer` fixture.
    with FhirPeer() as started:
        yield started


@pytest.fixture
def peer(request: pytest.FixtureRequest) -> FhirPeer:
    try:
        started: FhirPeer = request.getfixturevalue("fhir_peer")
    except pytest.FixtureLookupError:
        started = request.getfixturevalue("_own_fhir_peer")
    started.reset()
    return started


@pytest.fixture
def client(peer: FhirPeer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=peer.base_url, headers=FHIR_JSON, timeout=30.0) as c:
        yield c


def make_patient(client: httpx.Client) -> str:
    response = client.post("/Patient", json=patient())
    assert response.status_code == 201, response.text
    return f"Patient/{response.json()['id']}"


def bp_entry(patient_ref: str, *, full_url: str | None = None) -> dict[str, Any]:
    """A batch/transaction entry: conditional create of a US Core BP Observation."""
    key = f"urn:uuid:{uuid.uuid4()}"
    observation = bp_observation(patient_ref)
    observation["identifier"] = [{"system": ID_SYSTEM, "value": key}]
    return {
        "fullUrl": full_url or f"urn:uuid:{uuid.uuid4()}",
        "resource": observation,
        "request": {
            "method": "POST",
            "url": "Observation",
            "ifNoneExist": f"identifier={ID_SYSTEM}|{key}",
        },
    }


def bundle(kind: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


def test_metadata_and_search(client: httpx.Client) -> None:
    meta = client.get("/metadata")
    assert meta.status_code == 200
    assert meta.headers["content-type"].startswith("application/fhir+json")
    assert meta.json()["resourceType"] == "CapabilityStatement"
    assert meta.json()["fhirVersion"] == "4.0.1"

    patient_ref = make_patient(client)
    created = client.post("/Observation", json=bp_observation(patient_ref))
    assert created.status_code == 201
    assert created.headers["location"].startswith(f"{client.base_url}Observation/")
    assert created.headers["etag"].startswith('W/"')

    found = client.get("/Observation", params={"subject": patient_ref, "code": "85354-9"})
    assert found.status_code == 200
    body = found.json()
    assert body["resourceType"] == "Bundle"
    assert body["type"] == "searchset"
    assert body["total"] == 1
    assert body["entry"][0]["resource"]["id"] == created.json()["id"]

    assert client.get("/Observation", params={"code": "1234-5"}).json()["total"] == 0


def test_batch_conditional_create_is_idempotent(peer: FhirPeer, client: httpx.Client) -> None:
    patient_ref = make_patient(client)
    request = bundle("batch", [bp_entry(patient_ref), bp_entry(patient_ref)])

    first = client.post("", json=request)
    assert first.status_code == 200, first.text
    assert first.json()["type"] == "batch-response"
    first_entries = first.json()["entry"]
    assert [e["response"]["status"] for e in first_entries] == ["201", "201"]
    assert peer.count("Observation") == 2

    second = client.post("", json=request)
    assert second.status_code == 200, second.text
    second_entries = second.json()["entry"]
    # Existing resource: 200 and the already-stored resource (same id, same location).
    assert [e["response"]["status"] for e in second_entries] == ["200", "200"]
    assert [e["response"]["location"] for e in second_entries] == [
        e["response"]["location"] for e in first_entries
    ]
    assert [e["resource"]["id"] for e in second_entries] == [
        e["resource"]["id"] for e in first_entries
    ]
    assert peer.count("Observation") == 2


def test_conditional_create_header(peer: FhirPeer, client: httpx.Client) -> None:
    patient_ref = make_patient(client)
    key = f"urn:uuid:{uuid.uuid4()}"
    observation = bp_observation(patient_ref) | {
        "identifier": [{"system": ID_SYSTEM, "value": key}]
    }
    headers = {"If-None-Exist": f"identifier={ID_SYSTEM}|{key}"}

    first = client.post("/Observation", json=observation, headers=headers)
    second = client.post("/Observation", json=observation, headers=headers)
    assert (first.status_code, second.status_code) == (201, 200)
    assert "location" in first.headers
    assert second.json()["id"] == first.json()["id"]
    assert peer.count("Observation") == 1


def test_transaction_with_conditional_creates_limited_to_8_entries(
    peer: FhirPeer, client: httpx.Client
) -> None:
    patient_ref = make_patient(client)

    refused = client.post("", json=bundle("transaction", [bp_entry(patient_ref) for _ in range(9)]))
    assert refused.status_code == 400
    outcome = refused.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["details"]["text"] == (
        "Transaction requires strict isolation but has too many entries"
    )
    assert peer.count("Observation") == 0  # refused as a whole, nothing written

    accepted = client.post(
        "", json=bundle("transaction", [bp_entry(patient_ref) for _ in range(8)])
    )
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["type"] == "transaction-response"
    assert [e["response"]["status"] for e in accepted.json()["entry"]] == ["201"] * 8
    assert peer.count("Observation") == 8

    # The same 9 entries as a batch are fine.
    as_batch = client.post("", json=bundle("batch", [bp_entry(patient_ref) for _ in range(9)]))
    assert as_batch.status_code == 200
    assert peer.count("Observation") == 17


def test_batch_rewrites_fullurl_uuid_everywhere(peer: FhirPeer, client: httpx.Client) -> None:
    """Medplum replaces an entry's urn:uuid fullUrl in ANY string of the bundle, identifiers too.

    An entry whose fullUrl equals its identifier value is stored with identifier
    "Observation/<id>" and its ifNoneExist never matches again, so it is created twice.
    """
    patient_ref = make_patient(client)
    entry = bp_entry(patient_ref)
    key = entry["resource"]["identifier"][0]["value"]
    entry["fullUrl"] = key
    for _ in range(2):
        response = client.post("", json=bundle("batch", [entry]))
        assert response.status_code == 200
        stored = response.json()["entry"][0]
        assert stored["response"]["status"] == "201"
        assert (
            stored["resource"]["identifier"][0]["value"]
            == f"Observation/{stored['resource']['id']}"
        )
    assert peer.count("Observation") == 2


def test_bad_json_is_400_operation_outcome(client: httpx.Client) -> None:
    response = client.post("/Observation", content=b"{not json", headers=FHIR_JSON)
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"


def test_fault_status_then_recovers(peer: FhirPeer, client: httpx.Client) -> None:
    patient_ref = make_patient(client)
    peer.fault("status", status=503, count=1)

    failed = client.post("/Observation", json=bp_observation(patient_ref))
    assert failed.status_code == 503
    assert failed.json()["resourceType"] == "OperationOutcome"
    assert peer.count("Observation") == 0  # not processed

    ok = client.post("/Observation", json=bp_observation(patient_ref))
    assert ok.status_code == 201
    assert peer.count("Observation") == 1


def test_fault_close_after_response_loses_reply_but_keeps_write(
    peer: FhirPeer, client: httpx.Client
) -> None:
    patient_ref = make_patient(client)
    peer.fault("close", after="response")

    with pytest.raises(httpx.TransportError):
        client.post("/Observation", json=bp_observation(patient_ref))
    assert peer.count("Observation") == 1  # the write happened

    assert client.get("/Observation").json()["total"] == 1  # and the peer recovered


def test_fault_close_after_request_drops_write(peer: FhirPeer, client: httpx.Client) -> None:
    patient_ref = make_patient(client)
    peer.fault("close")

    with pytest.raises(httpx.TransportError):
        client.post("/Observation", json=bp_observation(patient_ref))
    assert peer.count("Observation") == 0


def test_fault_delay(peer: FhirPeer, client: httpx.Client) -> None:
    peer.fault("delay", delay_ms=1000)
    with pytest.raises(httpx.ReadTimeout):
        client.get("/metadata", timeout=0.3)
    # The delayed request still completes on the peer; later requests are not delayed.
    assert client.get("/metadata", timeout=5).status_code == 200


def test_reset_drops_everything(peer: FhirPeer, client: httpx.Client) -> None:
    make_patient(client)
    peer.fault("status", count=5)
    peer.reset()
    assert peer.count("Patient") == 0
    assert client.get("/metadata").status_code == 200  # reset also cleared the fault


def test_failed_transaction_is_not_rolled_back(peer: FhirPeer, client: httpx.Client) -> None:
    """A fidelity gap: MemoryRepository has no transactions, so earlier entries stay written."""
    request = bundle(
        "transaction",
        [
            {"resource": patient(), "request": {"method": "POST", "url": "Patient"}},
            {
                "resource": patient() | {"id": "other"},
                "request": {"method": "PUT", "url": "Patient/not-other"},
            },
        ],
    )
    response = client.post("", json=request)
    assert response.status_code == 400
    assert response.json()["issue"][0]["details"]["text"] == "Incorrect resource ID"
    assert peer.count("Patient") == 1  # a real Medplum server would have rolled this back
