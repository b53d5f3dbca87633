"""``/openapi.json`` against the real app: a valid OpenAPI 3.1 document, and schemathesis.

The app runs as in production — ``create_app`` under Hypercorn on a loopback socket
(:func:`tests.e2e.live_server.serve`) over a real SQLite store — but in a thread with its
own event loop, so schemathesis' synchronous client can call it from the test. The store
holds one synthetic patient enrolled in remote monitoring with a home cuff reading, a
nurse, a vendor key and a local integration's read key. Every operation of the document is
fuzzed (positive and negative data, derandomized so CI is repeatable) with the vendor key (the
read key for the FHIR read API) and a nurse's session supplied,
and every response is checked: no server error, a documented status, content type, headers
and body schema.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from quart.testing import QuartClient
from schemathesis import GenerationMode

from appliance import db
from appliance.config import demo_config
from appliance.keys import generate_kek_file
from appliance.runtime import write_heartbeat
from appliance.store import Store
from appliance.users import Role
from services.vendor_keys import KeyScope, VendorKeys
from tests import factories
from tests.e2e import live_server
from web.app import create_app
from web.health import EXPECTED_PROCESSES
from web.ingest import IngestLimits, TokenBuckets

NURSE, PASSWORD = "nurse-openapi", "correct horse battery staple"
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.9999.1"  # as tests.factories.patient
_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass(frozen=True)
class Served:
    """The app served on loopback, and what the test needs to call it."""

    url: str
    key: str  # the vendor's API key
    patient_id: str  # enrolled in RPM: the nurse's normal access covers them
    mrn: str
    read_key: str  # a local integration's key for the FHIR read API


async def _heartbeats(store: Store) -> None:
    """The three processes of the box beating, so /healthz answers 200 as on a live box."""
    started = datetime.now(UTC).isoformat()
    while True:
        for process in EXPECTED_PROCESSES:
            await db.run_sync(store.connection, write_heartbeat, process, started, "{}")
        await asyncio.sleep(2)


def _serve(folder: Path, ready: Any, stop: threading.Event) -> None:
    async def main() -> None:
        kek = folder / "keys" / "kek"
        generate_kek_file(kek)
        config = demo_config(folder)
        store = await Store.open(config.paths.database, kek)
        try:
            await live_server.create_user(store, NURSE, PASSWORD, Role.NURSE)
            key = await VendorKeys(store).add("acme-rpm", "user:admin")
            read_key = await VendorKeys(store).add("ehr-bridge", "user:admin", scope=KeyScope.READ)
            cuff = await live_server.HomeCuff.enrol(store, "Openapi")
            await cuff.measure(128, 82)
            beating = asyncio.create_task(_heartbeats(store))
            app = create_app(config, store)
            # The fuzzer sends far more than a hub would: lift the per-vendor rate limit
            # (the limit itself is tested in test_ingest.py).
            app.extensions["ingest"] = IngestLimits(
                vendors=TokenBuckets(1e6, 1e6), readers=TokenBuckets(1e6, 1e6)
            )
            async with live_server.serve(app) as url:
                ready.append(Served(url, key, cuff.patient_id, "E2E-Openapi", read_key))
                await asyncio.to_thread(stop.wait)
            beating.cancel()
        finally:
            await store.close()

    try:
        asyncio.run(main())
    except BaseException as error:  # reported to the fixture, which is waiting
        ready.append(error)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    found: list[Any] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=_serve, args=(tmp_path_factory.mktemp("openapi"), found, stop), daemon=True
    )
    thread.start()
    for _ in range(600):
        if found:
            break
        thread.join(0.05)
    assert found, "the app did not start"
    if isinstance(found[0], BaseException):
        raise found[0]
    try:
        yield found[0]
    finally:
        stop.set()
        thread.join(15)


def _plain(http: requests.Session) -> None:
    """Send the app's Secure cookies back over loopback http (as a browser does for 127.0.0.1)."""
    for cookie in http.cookies:
        cookie.secure = False


@pytest.fixture(scope="module")
def http(served: Served) -> Iterator[requests.Session]:
    """A nurse's session (logged in through the real form) that also carries the vendor key."""
    with requests.Session() as session:
        form = session.get(f"{served.url}/login", timeout=10)
        _plain(session)
        token = _TOKEN.search(form.text)
        assert token is not None
        done = session.post(
            f"{served.url}/login",
            data={"username": NURSE, "password": PASSWORD, "csrf_token": token.group(1)},
            allow_redirects=False,
            timeout=10,
        )
        assert done.status_code == 302, done.status_code
        _plain(session)
        assert any(c.name.endswith("session") for c in session.cookies)
        session.headers["Authorization"] = f"Bearer {served.key}"
        yield session


@pytest.fixture(scope="module")
def api_schema(served: Served) -> Any:
    return schemathesis.openapi.from_url(f"{served.url}/openapi.json")


CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.response_schema_conformance,
]


def test_document_is_valid_openapi_31(served: Served, api_schema: Any) -> None:
    response = requests.get(f"{served.url}/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    document = response.json()
    assert document["openapi"].startswith("3.1")
    api_schema.validate()  # the OpenAPI 3.1 meta-schema; raises on any error
    for name, found in document["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(found), name
    assert set(document["paths"]) == {
        "/fhir/metadata",
        "/fhir/{resource_type}/{resource_id}",
        "/fhir/Patient",
        "/fhir/Observation",
        "/fhir",
        "/healthz",
        "/metrics",
        "/rpm/patients/{patient_id}/series.json",
        "/openapi.json",
    }
    # The limits the endpoints enforce, stated in the document.
    ingest = document["paths"]["/fhir/Observation"]["post"]
    assert ingest["requestBody"]["x-max-body-bytes"] == 64 * 1024
    bundle = document["components"]["schemas"]["Bundle"]
    assert bundle["properties"]["entry"]["maxItems"] == 100
    # Served over TLS in production, so the session cookie is __Host- bound.
    schemes = document["components"]["securitySchemes"]
    assert schemes["staffSession"]["name"] == "__Host-session"


READ_API = ("fhirRead", "fhirSearchPatient", "fhirSearchObservation")  # the read key's
WITH_INPUT = ("ingestObservation", "ingestBundle", "rpmSeries", *READ_API)
RUNS = [
    *(
        (op, GenerationMode.POSITIVE)
        for op in (*WITH_INPUT, "healthz", "metrics", "openapi", "fhirMetadata")
    ),
    *((op, GenerationMode.NEGATIVE) for op in WITH_INPUT),  # the others take nothing to break
]


# schemathesis' own pytest plugin (``@schema.parametrize()`` over ``from_fixture``) rewrites
# ``node._nodeid``, which pytest 9 no longer has; its strategies with Hypothesis' ``@given``
# are the documented way to use it in any other test, and give one test per operation.
@pytest.mark.slow
@pytest.mark.parametrize(("operation_id", "mode"), RUNS)
def test_api_conforms_to_its_document(
    api_schema: Any,
    http: requests.Session,
    served: Served,
    operation_id: str,
    mode: GenerationMode,
) -> None:
    operation = api_schema.find_operation_by_id(operation_id)
    headers = {"Authorization": f"Bearer {served.read_key}"} if operation_id in READ_API else {}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=25,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def call(case: Any) -> None:
        case.call_and_validate(session=http, headers=headers, checks=CHECKS)

    call()


# -- the document against real successes (the fuzzer rarely makes a valid reading) ------------


def _reading(mrn: str, ident: str) -> dict[str, Any]:
    effective = (datetime.now(UTC) - timedelta(minutes=20)).isoformat()
    observation = factories.bp_observation("Patient/x", effective=effective)
    observation["subject"] = {"identifier": {"system": MRN_SYSTEM, "value": mrn}}
    observation["identifier"] = [{"system": "https://acme.example/readings", "value": ident}]
    return observation


def test_accepted_readings_match_the_document(
    served: Served, http: requests.Session, api_schema: Any
) -> None:
    one = api_schema["/fhir/Observation"]["POST"]
    reading = _reading(served.mrn, "openapi-1")
    for expected in (201, 200):  # stored, then a resend
        case = one.Case(body=reading, media_type="application/fhir+json")
        response = case.call_and_validate(session=http, checks=CHECKS)
        assert response.status_code == expected
    bundle = api_schema["/fhir"]["POST"]
    entries = [
        {
            "resource": _reading(served.mrn, f"openapi-b{i}"),
            "request": {"method": "POST", "url": "Observation"},
        }
        for i in range(3)
    ]
    for kind in ("transaction", "batch"):
        body = {"resourceType": "Bundle", "type": kind, "entry": entries}
        case = bundle.Case(body=body, media_type="application/fhir+json")
        response = case.call_and_validate(session=http, checks=CHECKS)
        assert response.status_code == 200
        assert response.json()["type"] == f"{kind}-response"
    series = api_schema["/rpm/patients/{patient_id}/series.json"]["GET"]
    case = series.Case(path_parameters={"patient_id": served.patient_id}, query={"window": 7})
    response = case.call_and_validate(session=http, checks=CHECKS)
    assert response.status_code == 200
    assert response.json()["charts"], "the enrolled patient's reading is charted"


def test_fhir_reads_match_the_document(served: Served, api_schema: Any) -> None:
    with requests.Session() as reader:
        reader.headers["Authorization"] = f"Bearer {served.read_key}"
        metadata = api_schema["/fhir/metadata"]["GET"].Case()
        assert metadata.call_and_validate(session=reader, checks=CHECKS).status_code == 200
        read = api_schema["/fhir/{resource_type}/{resource_id}"]["GET"].Case(
            path_parameters={"resource_type": "Patient", "resource_id": served.patient_id}
        )
        response = read.call_and_validate(session=reader, checks=CHECKS)
        assert response.status_code == 200
        etag = {k.lower(): v for k, v in response.headers.items()}["etag"]
        assert etag in ('W/"1"', ['W/"1"'])  # schemathesis keeps each header as a list
        patients = api_schema["/fhir/Patient"]["GET"].Case(
            query={"identifier": f"{MRN_SYSTEM}|{served.mrn}"}
        )
        response = patients.call_and_validate(session=reader, checks=CHECKS)
        assert response.json()["total"] == 1
        readings = api_schema["/fhir/Observation"]["GET"].Case(
            query={"patient": served.patient_id, "_count": 1}
        )
        response = readings.call_and_validate(session=reader, checks=CHECKS)
        assert response.status_code == 200
        assert response.json()["entry"]


async def test_served_anonymously(client: QuartClient) -> None:
    response = await client.get("/openapi.json")  # no login: a document, not a redirect
    assert response.status_code == 200
    document = orjson.loads(await response.get_data())
    assert document["paths"]["/healthz"]["get"]["security"] == []
    assert "no-store" in response.headers["Cache-Control"]


# -- server errors schemathesis' kind of input found, fixed, and kept fixed -------------------


@pytest.mark.parametrize(
    "effective",
    [
        {"effectiveDateTime": "9999-12-31T23:59:59-14:00"},  # after the last UTC instant
        {"effectiveInstant": "0001-01-01T00:00:00+14:00"},  # before the first
        {"effectivePeriod": {"start": "9999-12-31T20:00:00-05:00"}},
    ],
)
async def test_unrepresentable_effective_time_is_a_400(
    client: QuartClient, store: Store, effective: dict[str, Any]
) -> None:
    # It was a 500: the UTC conversion overflowed datetime's range (found while fuzzing).
    key = await VendorKeys(store).add("acme-rpm", "user:admin")
    observation = {
        k: v for k, v in _reading("MRN-1", "r-1").items() if not k.startswith("effective")
    }
    response = await client.post(
        "/fhir/Observation",
        data=orjson.dumps({**observation, **effective}),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/fhir+json"},
    )
    assert response.status_code == 400
    outcome = orjson.loads(await response.get_data())
    issues = {i["expression"][0]: i["diagnostics"] for i in outcome["issue"] if "expression" in i}
    assert issues["Observation.effective[x]"] == "is out of range (years 1 to 9999 in UTC)"
