"""Audit export to the real Medplum peer: BALP-shaped AuditEvents, exactly once, anchored."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from appliance import audit, db, fhir
from appliance.audit import AuditAction, AuditEvent, Outcome
from appliance.store import Store
from sync_agent import balp
from sync_agent.audit_anchors import (
    anchors_of,
    fetch_upstream_anchors,
    verify_against_anchor,
    verify_against_anchors,
)
from sync_agent.audit_export import AuditExporter
from sync_agent.audit_export_state import acknowledge_breaks, read_export_state
from sync_agent.balp import ExportRow, anchor_from_provenance, audit_event, checkpoint_provenance
from sync_agent.upstream import FHIR_JSON, Failure, UpstreamError
from tests import factories
from tests.fhir_peer.peer import FhirPeer
from tests.sync_agent.fault_proxy import Fault, FaultProxy
from tests.tamper import unguarded

SITE = "test-clinic"
T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)


def _row(action: AuditAction, outcome: Outcome = Outcome.SUCCESS, **fields: object) -> ExportRow:
    values: dict[str, object] = {
        "id": 7,
        "ts": audit.ts_text(T0),
        "actor": "user:nurse1",
        "action": str(action),
        "outcome": outcome.value,
        "patient_key": None,
        "entity": None,
        "detail": None,
        "hash": bytes(range(32)),
    }
    values.update(fields)
    return ExportRow(**values)  # type: ignore[arg-type]


# -- the shapes (pure) -----------------------------------------------------------------------


@pytest.mark.parametrize("action", list(AuditAction))
@pytest.mark.parametrize("outcome", list(Outcome))
def test_every_action_and_outcome_builds_a_valid_r4_audit_event(
    action: AuditAction, outcome: Outcome
) -> None:
    event = audit_event(
        _row(action, outcome, patient_key=b"\x01" * 16, entity="Observation x3", detail="d"),
        site_id=SITE,
    )
    fhir.validate(event)
    assert event["subtype"][-1] == {"system": balp.ACTION_SYSTEM, "code": action.value}
    assert event["outcome"] == {"success": "0", "denied": "4", "failure": "8"}[outcome.value]


def test_a_patient_read_has_the_balp_patient_read_shape_with_only_the_pseudonymous_key() -> None:
    key = bytes.fromhex("a1" * 16)
    event = audit_event(
        _row(
            AuditAction.READ,
            patient_key=key,
            entity="Observation/01890a5d-ac96-774b-bcce-b302099a8057",
        ),
        site_id=SITE,
    )
    assert event["type"]["code"] == "rest"
    assert event["subtype"][0] == {
        "system": "http://hl7.org/fhir/restful-interaction",
        "code": "read",
        "display": "read",
    }
    assert event["action"] == "R"
    assert event["recorded"] == "2026-11-26T08:00:00.000000Z"
    # BALP: the box (the server accessed) is the Destination Role; before, it said Source.
    [box] = [agent for agent in event["agent"] if agent["requestor"] is False]
    assert box["type"]["coding"] == [
        {
            "system": "http://dicom.nema.org/resources/ontology/DCM",
            "code": "110152",
            "display": "Destination Role ID",
        }
    ]
    patient, data = event["entity"]
    assert patient == {
        "what": {
            "type": "Patient",
            "identifier": {
                "system": f"urn:telehealth-appliance:site:{SITE}:patient-key",
                "value": key.hex(),
            },
        },
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
            "code": "1",
            "display": "Person",
        },
        "role": {
            "system": "http://terminology.hl7.org/CodeSystem/object-role",
            "code": "1",
            "display": "Patient",
        },
    }
    # The resource is named by the identifier it carries upstream, not by a local id.
    assert data["what"] == {
        "type": "Observation",
        "identifier": {
            "system": "urn:ietf:rfc:3986",
            "value": "urn:uuid:01890a5d-ac96-774b-bcce-b302099a8057",
        },
    }
    user, box = event["agent"]
    assert user["who"]["identifier"]["value"] == "user:nurse1"
    assert user["requestor"] is True
    assert user["type"]["coding"][0]["code"] == "IRCP"
    assert box["who"]["identifier"]["value"] == SITE
    assert event["source"]["site"] == SITE
    assert event["meta"]["tag"][0]["code"] == bytes(range(32)).hex()


@pytest.mark.parametrize(
    ("action", "type_code", "subtype_code", "code"),
    [
        (AuditAction.SEARCH, "rest", "search", "E"),
        (AuditAction.CREATE, "rest", "create", "C"),
        (AuditAction.UPDATE, "rest", "update", "U"),
        (AuditAction.DELETE, "rest", "delete", "D"),
        (AuditAction.LOGIN, "110114", "110122", "E"),
        (AuditAction.LOGOUT, "110114", "110123", "E"),
        (AuditAction.LOGIN_FAILED, "110114", "110122", "E"),
        (AuditAction.BREAK_GLASS, "110113", "110127", "E"),
        (AuditAction.KEY_ROTATION, "110113", "110129", "E"),
        (AuditAction.EXPORT, "110106", balp.ACTION_SYSTEM, "R"),
        (AuditAction.SYNC, "110106", balp.ACTION_SYSTEM, "R"),
    ],
)
def test_actions_map_to_balp_and_dicom_codes(
    action: AuditAction, type_code: str, subtype_code: str, code: str
) -> None:
    event = audit_event(_row(action), site_id=SITE)
    assert event["type"]["code"] == type_code
    first = event["subtype"][0]
    assert subtype_code in (first["code"], first["system"])
    assert event["action"] == code


def test_a_tampered_action_is_a_value_error_not_a_crash() -> None:
    with pytest.raises(ValueError):
        audit_event(_row("teleport"), site_id=SITE)  # type: ignore[arg-type]


def test_the_anchor_is_a_valid_provenance_that_round_trips(store: Store) -> None:
    signer = store.keyring.signing_key
    checkpoint = audit.Checkpoint(5, b"\x07" * 32, T0, signer.sign(b"x"))
    resource = checkpoint_provenance(
        checkpoint, site_id=SITE, public_key_hex=store.keyring.signing_public_key_hex()
    )
    fhir.validate(resource)
    assert anchor_from_provenance(resource) == checkpoint
    with pytest.raises(ValueError):
        anchor_from_provenance({"resourceType": "Provenance"})
    # An "anchor" no checkpoint can be (a server's, or anyone's with write access there): a
    # huge id crashed the signature check and hid the real newest anchor.
    huge = json.loads(json.dumps(resource).replace('"5"', f'"{2**64}"'))
    with pytest.raises(ValueError):
        anchor_from_provenance(huge)
    [found] = anchors_of({"entry": [{"resource": resource}, {"resource": huge}]})
    assert found == checkpoint


# -- against the peer ----------------------------------------------------------------------


async def _records(store: Store, n: int) -> None:
    """One patient (its create is audited with the pseudonymous key) and n-1 audited reads."""
    [pat] = await store.create([factories.patient(family=factories.MARKER_FAMILY)], "user:nurse1")
    for _ in range(n - 1):
        await store.read("Patient", pat.logical_id, "user:nurse1")


def _lose_cursor(db_path: Path) -> None:
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute("DELETE FROM meta WHERE key LIKE 'audit_export.%'")
    raw.close()


def _raw(db_path: Path, sql: str, *params: object) -> None:
    """One statement on the database file, as someone with file access would run it."""
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute(sql, params)
    raw.close()


def _set_meta(db_path: Path, key: str, value: str | None) -> None:
    _raw(
        db_path,
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        key,
        value,
    )


@pytest.fixture
async def proxy(fhir_peer: FhirPeer) -> AsyncIterator[FaultProxy]:
    """The fault proxy (tests/sync_agent/fault_proxy.py) in front of a reset peer."""
    fhir_peer.reset()
    started = await FaultProxy(fhir_peer.control_url).start()
    try:
        yield started
    finally:
        await started.close()


@pytest.fixture
async def proxied(proxy: FaultProxy) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on the peer through the fault proxy."""
    async with httpx.AsyncClient(
        base_url=proxy.base_url, headers={"Content-Type": FHIR_JSON}, timeout=5.0
    ) as http:
        yield http


@pytest.mark.peer
async def test_a_drain_with_a_time_budget_ends_after_it_and_says_there_is_more(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    await _records(store, 11)
    exporter = AuditExporter(store, client, site_id=SITE, batch=4)
    cut = await exporter.drain(budget_s=0)  # past the budget at once: one bundle, no more
    assert (cut.bundles, cut.exported, cut.more, cut.error) == (1, 4, True, None)
    rest = await exporter.drain(budget_s=60)
    assert (rest.bundles, rest.exported, rest.more, rest.cursor) == (2, 7, False, 11)
    assert fhir_peer.count("AuditEvent") == 11


@pytest.mark.peer
async def test_n_records_become_n_audit_events_even_after_the_cursor_is_lost(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    await _records(store, 11)
    exporter = AuditExporter(store, client, site_id=SITE, batch=4)
    result = await exporter.drain()
    assert (result.exported, result.refused, result.error, result.cursor) == (11, 0, None, 11)
    assert result.bundles == 3
    assert fhir_peer.count("AuditEvent") == 11
    state = await db.run_sync(store.connection, read_export_state)
    assert (state.cursor, state.head, state.lag) == (11, 11, 0)
    # Lost cursor (a restored backup): everything is sent again and nothing is duplicated.
    _lose_cursor(db_path)
    again = await AuditExporter(store, client, site_id=SITE, batch=8).drain()
    assert (again.exported, again.existing) == (11, 11)
    assert fhir_peer.count("AuditEvent") == 11
    # What went upstream holds no PHI: the marker name never left the box.
    page = (await client.get("AuditEvent", params={"_count": "50"})).text
    assert factories.MARKER_FAMILY not in page
    assert "patient-key" in page


@pytest.mark.peer
async def test_a_link_failure_leaves_the_cursor_and_the_next_export_resumes(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    await _records(store, 3)
    fhir_peer.fault("status", status=503, count=1)
    failed = await AuditExporter(store, client, site_id=SITE).drain()
    assert failed.link_down
    assert failed.cursor == 0
    assert fhir_peer.count("AuditEvent") == 0
    resumed = await AuditExporter(store, client, site_id=SITE).drain()
    assert (resumed.exported, resumed.cursor) == (3, 3)


@pytest.mark.peer
async def test_an_address_that_does_not_take_the_request_passes_over_no_record(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    await _records(store, 3)
    fhir_peer.fault("status", status=404, count=50)  # a wrong base_url
    for _ in range(5):
        # Before: "permanent", so one at a time, each record refused and passed over for good.
        failed = await AuditExporter(store, client, site_id=SITE).drain()
        assert (failed.exported, failed.refused, failed.cursor) == (0, 0, 0)
        assert (failed.error or "").startswith("endpoint: ")
    fhir_peer.clear_fault()
    resumed = await AuditExporter(store, client, site_id=SITE).drain()
    assert (resumed.exported, resumed.refused, resumed.cursor) == (3, 0, 3)


@pytest.mark.peer
async def test_a_lost_answer_is_resent_without_a_duplicate(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    await _records(store, 3)
    fhir_peer.fault("close", after="response")  # written upstream, the answer never comes
    first = await AuditExporter(store, client, site_id=SITE, clock=lambda: T0).drain()
    assert first.error is not None
    assert first.cursor == 0
    later = T0 + timedelta(seconds=6)  # past the request timeout (the client's 5 s)
    again = await AuditExporter(store, client, site_id=SITE, clock=lambda: later).drain()
    assert (again.exported, again.existing) == (3, 3)
    assert fhir_peer.count("AuditEvent") == 3


class _Clock:
    """The exporter's clock; a test moves it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.mark.peer
async def test_a_lost_answer_is_not_resent_before_a_request_timeout_by_any_exporter(
    store: Store, proxied: httpx.AsyncClient, proxy: FaultProxy, fhir_peer: FhirPeer
) -> None:
    await _records(store, 3)
    clock = _Clock(T0)
    await proxy.set(Fault.DROP, count=1)  # applied upstream, the answer never comes
    first = await AuditExporter(store, proxied, site_id=SITE, clock=clock).drain()
    assert first.stopped_by is not None
    assert first.stopped_by.failure is Failure.AMBIGUOUS
    assert proxy.counts["requests"] == 1
    # The next round a few seconds on, a 'Sync now', or 'appliance sync once' (another
    # exporter): before, the bundle went again at once, while the server may still have been
    # applying the first (a conditional create is not atomic under concurrent requests on
    # HAPI, Microsoft's FHIR server or Medplum: two copies of each AuditEvent).
    clock.now = T0 + timedelta(seconds=4)
    waiting = await AuditExporter(store, proxied, site_id=SITE, clock=clock).drain()
    assert (waiting.bundles, waiting.cursor, waiting.error) == (0, 0, None)
    assert proxy.counts["requests"] == 1
    clock.now = T0 + timedelta(seconds=6)  # past the request timeout (the client's 5 s)
    again = await AuditExporter(store, proxied, site_id=SITE, clock=clock).drain()
    assert (again.exported, again.existing, again.cursor) == (3, 3, 3)
    assert fhir_peer.count("AuditEvent") == 3


@pytest.mark.peer
async def test_a_lost_answers_wait_is_not_kept_past_a_clock_set_back(
    store: Store, proxied: httpx.AsyncClient, proxy: FaultProxy, fhir_peer: FhirPeer
) -> None:
    await _records(store, 2)
    clock = _Clock(T0 + timedelta(days=365))  # a box that booted a year ahead
    await proxy.set(Fault.DROP, count=1)
    await AuditExporter(store, proxied, site_id=SITE, clock=clock).drain()
    clock.now = T0  # NTP sets it right: the wait is not a year long
    again = await AuditExporter(store, proxied, site_id=SITE, clock=clock).drain()
    assert (again.exported, again.cursor) == (2, 2)


@pytest.mark.peer
async def test_a_refused_record_is_recorded_and_the_chain_moves_on(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    await _records(store, 2)

    def work(conn: sqlite3.Connection) -> None:
        audit.append(
            conn, [AuditEvent("service:test", AuditAction.CONFIG, detail="refuse-me")], now=T0
        )

    await store.transact(work)
    await _records(store, 2)
    fhir_peer.reject("refuse-me")
    try:
        result = await AuditExporter(store, client, site_id=SITE, batch=8).drain()
    finally:
        fhir_peer.reject(None)
    assert (result.exported, result.refused, result.cursor) == (4, 1, 5)
    state = await db.run_sync(store.connection, read_export_state)
    assert state.refused == 1
    assert state.recent_refusals[0][0] == 3
    assert fhir_peer.count("AuditEvent") == 4


@pytest.mark.peer
async def test_the_checkpoint_goes_upstream_and_exposes_a_truncated_local_chain(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    await _records(store, 6)
    conn = store.connection
    keyring = store.keyring
    checkpoint = await db.run_sync(conn, audit.checkpoint, keyring.signing_key, now=T0)
    assert checkpoint is not None
    result = await AuditExporter(store, client, site_id=SITE).drain()
    assert result.anchored == checkpoint.audit_id == 6
    assert fhir_peer.count("Provenance") == 1
    await AuditExporter(store, client, site_id=SITE).drain()  # already anchored: not resent
    assert fhir_peer.count("Provenance") == 1

    [anchor] = await fetch_upstream_anchors(client, SITE)
    assert anchor == checkpoint
    public = keyring.signing_public_key
    intact = await db.run_sync(conn, verify_against_anchor, public, anchor)
    assert intact.ok

    # Someone with file access cuts the trail back to record 4 and removes the checkpoint
    # that would have given it away locally; the local chain alone then looks intact.
    unguarded(db_path, "DELETE FROM audit WHERE id > 4", "DELETE FROM audit_checkpoints")
    assert (await db.run_sync(conn, audit.verify, public)).ok
    truncated = await db.run_sync(conn, verify_against_anchor, public, anchor)
    assert not truncated.ok
    assert truncated.first_bad_id == 5
    assert "truncated" in (truncated.problem or "")


async def test_an_anchor_signed_by_another_key_is_refused(store: Store) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    await _records(store, 2)
    forged = audit.Checkpoint(2, b"\x00" * 32, T0, Ed25519PrivateKey.generate().sign(b"x"))
    result = await db.run_sync(
        store.connection, verify_against_anchor, store.keyring.signing_public_key, forged
    )
    assert not result.ok
    assert "signature" in (result.problem or "")


@pytest.mark.peer
async def test_records_the_upstream_forbids_us_wait_for_access_instead_of_being_passed_over(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    await _records(store, 5)
    fhir_peer.reject("audit record", status=403)  # an access policy without AuditEvent create
    try:
        forbidden = await AuditExporter(store, client, site_id=SITE).drain()
    finally:
        fhir_peer.reject(None)
    # Before: 5 refused, the cursor at 5, and none of them ever sent once access was mended.
    assert (forbidden.exported, forbidden.refused, forbidden.cursor) == (0, 0, 0)
    assert (forbidden.error or "").startswith("auth: ")
    mended = await AuditExporter(store, client, site_id=SITE).drain()
    assert (mended.exported, mended.refused, mended.cursor) == (5, 0, 5)
    assert fhir_peer.count("AuditEvent") == 5


@pytest.mark.peer
async def test_a_413_on_one_small_record_is_a_limit_in_front_waited_on_not_a_refusal(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    await _records(store, 3)
    fhir_peer.fault("status", status=413, count=10)  # a proxy's body limit, far too low
    exporter = AuditExporter(store, client, site_id=SITE, batch=2)
    stopped = await exporter.drain()
    # Shrunk to one, still refused: it waits (paced by the sync loop), nothing passed over.
    assert (stopped.exported, stopped.refused, stopped.cursor) == (0, 0, 0)
    assert stopped.stopped_by is not None
    assert stopped.stopped_by.failure is Failure.TOO_LARGE
    fhir_peer.clear_fault()  # the proxy's limit raised
    mended = await exporter.drain()
    assert (mended.exported, mended.refused, mended.cursor) == (3, 0, 3)


@pytest.mark.peer
async def test_a_record_too_large_even_alone_is_passed_over_not_a_stall(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:

    def work(conn: sqlite3.Connection) -> None:  # a detail naming thousands of ids
        detail = "returned Observation " + ", ".join(f"id-{i:06d}" for i in range(8000))
        audit.append(conn, [AuditEvent("user:nurse1", AuditAction.SEARCH, detail=detail)], now=T0)

    await store.transact(work)
    await _records(store, 2)
    fhir_peer.fault("status", status=413, count=2)  # 2 → 1 entry, then the large one alone
    result = await AuditExporter(store, client, site_id=SITE, batch=2).drain()
    # Before: at one entry a 413 was an error on every call, and the chain stood still.
    assert (result.exported, result.refused, result.cursor, result.error) == (2, 1, 3, None)
    state = await db.run_sync(store.connection, read_export_state)
    assert state.recent_refusals[0][0] == 1
    assert state.recent_refusals[0][1].startswith("too_large: ")


# nginx's answer when the request's headers (a long bearer token, say) pass its limit.
_NGINX_400 = (
    b"<html>\r\n<head><title>400 Request Header Or Cookie Too Large</title></head>\r\n<body>\r\n"
    b"<center><h1>400 Bad Request</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n"
    b"</html>\r\n"
)


@pytest.mark.peer
@pytest.mark.parametrize(
    ("status", "body", "failure"),
    [
        (400, _NGINX_400, Failure.ENDPOINT),
        # With an OperationOutcome (the proxy's own), still about the exchange, not a record.
        (407, None, Failure.AUTH),
        (426, None, Failure.ENDPOINT),
        (431, None, Failure.ENDPOINT),
    ],
)
async def test_a_refusal_of_every_request_in_front_of_the_server_passes_over_no_record(
    store: Store,
    proxied: httpx.AsyncClient,
    proxy: FaultProxy,
    fhir_peer: FhirPeer,
    status: int,
    body: bytes | None,
    failure: Failure,
) -> None:
    await _records(store, 5)
    await proxy.set(Fault.STATUS, status=status, body=body)  # every request, until healed
    exporter = AuditExporter(store, proxied, site_id=SITE, batch=4)
    for _ in range(3):
        stopped = await exporter.drain()
        # Before: permanent, so one at a time and each record refused alone, passed over
        # for good: the cursor past the whole trail, none of it ever sent.
        assert (stopped.exported, stopped.refused, stopped.cursor) == (0, 0, 0)
        assert stopped.stopped_by is not None
        assert stopped.stopped_by.failure is failure  # paced by the sync loop, as such
        assert not stopped.link_down  # something answered: the box is online
    state = await db.run_sync(store.connection, read_export_state)
    assert (state.cursor, state.refused) == (0, 0)
    await proxy.heal()
    mended = await exporter.drain()
    assert (mended.exported, mended.refused, mended.cursor) == (5, 0, 5)
    assert fhir_peer.count("AuditEvent") == 5


@pytest.mark.peer
async def test_every_record_refused_alone_with_the_same_outcome_is_the_exchange_not_the_records(
    store: Store, proxied: httpx.AsyncClient, proxy: FaultProxy, fhir_peer: FhirPeer
) -> None:
    """A gateway that speaks FHIR refusing every bundle with its own OperationOutcome."""
    await _records(store, 6)
    await proxy.set(Fault.STATUS, status=400)  # an OperationOutcome, the same each time
    exporter = AuditExporter(store, proxied, site_id=SITE, batch=4)
    stopped = await exporter.drain()
    # Before: every record refused alone and passed over, the trail lost upstream.
    assert (stopped.exported, stopped.refused, stopped.cursor) == (0, 0, 0)
    assert stopped.stopped_by is not None
    assert stopped.stopped_by.failure is Failure.ENDPOINT
    assert stopped.stopped_by.message.startswith(
        "records 1, 2, each sent alone, refused as a whole request (HTTP 400): the exchange"
    )
    await proxy.heal()
    mended = await exporter.drain()
    assert (mended.exported, mended.refused, mended.cursor) == (6, 0, 6)


class _NumberedRefusals(httpx.AsyncBaseTransport):
    """The real transport, but the first ``refuse`` POSTs are refused as a whole with an
    OperationOutcome naming the request, as a gateway that speaks FHIR does: never the same
    answer twice."""

    def __init__(self, refuse: int) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.refuse = refuse

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST" or self.refuse <= 0:
            return await self._inner.handle_async_request(request)
        self.refuse -= 1
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [
                {"severity": "error", "code": "processing", "diagnostics": f"#{self.refuse}"}
            ],
        }
        return httpx.Response(400, headers={"Content-Type": FHIR_JSON}, json=outcome)

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.mark.peer
@pytest.mark.parametrize(
    ("refuse", "after"),
    [(2, (2, 2, 4, None)), (1000, (0, 0, 0, "endpoint: records 1, 2, 3, 4, each sent alone"))],
)
async def test_records_refused_alone_in_a_row_are_passed_over_only_once_a_later_one_goes(
    store: Store, fhir_peer: FhirPeer, refuse: int, after: tuple[int, int, int, str | None]
) -> None:
    fhir_peer.reset()
    await _records(store, 4)
    async with httpx.AsyncClient(
        base_url=fhir_peer.base_url,
        headers={"Content-Type": FHIR_JSON},
        transport=_NumberedRefusals(refuse),
    ) as gateway:
        result = await AuditExporter(store, gateway, site_id=SITE, batch=1).drain()
    # Two in a row, then record 3 goes: the two were about their records, passed over. A
    # run of them with none going: the exchange, every record kept. Before, a gateway that
    # names each request in its answer had the whole trail passed over, one by one.
    exported, refused, cursor, error = after
    assert (result.exported, result.refused, result.cursor) == (exported, refused, cursor)
    if error is None:
        assert result.error is None
    else:
        assert (result.error or "").startswith(error)
        assert not result.link_down
    assert fhir_peer.count("AuditEvent") == exported


@pytest.mark.peer
async def test_a_record_refused_alone_waits_for_the_next_one_to_go_and_is_then_passed_over(
    store: Store, proxied: httpx.AsyncClient, proxy: FaultProxy, fhir_peer: FhirPeer
) -> None:
    await _records(store, 1)
    await proxy.set(Fault.STATUS, status=422, count=1)  # the server refusing record 1
    exporter = AuditExporter(store, proxied, site_id=SITE, batch=1)
    waiting = await exporter.drain()
    # Nothing after it yet to tell the record from the exchange: kept, not passed over.
    # Before: passed over at once.
    assert (waiting.exported, waiting.refused, waiting.cursor) == (0, 0, 0)
    assert waiting.stopped_by is not None
    assert waiting.stopped_by.failure is Failure.PERMANENT
    assert not waiting.link_down
    await _records(store, 3)
    await proxy.set(Fault.STATUS, status=422, count=1)  # record 1 alone, refused again
    moved = await exporter.drain()
    # Record 2 alone went through: the refusal was about record 1, which is passed over.
    assert (moved.exported, moved.refused, moved.cursor, moved.error) == (3, 1, 4, None)
    state = await db.run_sync(store.connection, read_export_state)
    assert state.recent_refusals[0][0] == 1
    assert state.recent_refusals[0][1].startswith("permanent: HTTP 422: ")
    assert fhir_peer.count("AuditEvent") == 3


@pytest.mark.peer
@pytest.mark.parametrize("status", [403, 422])
async def test_an_anchor_the_upstream_does_not_take_holds_no_record_back_nor_reads_as_anchored(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, status: int
) -> None:
    await _records(store, 6)
    await db.run_sync(store.connection, audit.checkpoint, store.keyring.signing_key, now=T0)
    fhir_peer.reject(balp.CHECKPOINT_EXTENSION, status=status)  # Provenance only
    try:
        result = await AuditExporter(store, client, site_id=SITE).drain()
    finally:
        fhir_peer.reject(None)
    # Before: a 403 anchor stopped every record behind it; either was reported as anchored.
    assert (result.exported, result.cursor, result.anchored) == (6, 6, None)
    assert (result.anchor_error or "").startswith("auth: ") == (status == 403)
    # Our access refused: the sync loop paces the export as for any refused exchange (it
    # was asked again every round); a refusal for good is not an exchange failure.
    paced = result.anchor_stopped_by
    assert (paced is not None and paced.failure is Failure.AUTH) == (status == 403)
    state = await db.run_sync(store.connection, read_export_state)
    assert state.anchored == 0
    assert fhir_peer.count("Provenance") == 0
    again = await AuditExporter(store, client, site_id=SITE).drain()
    if status == 403:  # our access, mended since: the anchor goes now
        assert (again.anchored, again.anchor_error) == (6, None)
        assert fhir_peer.count("Provenance") == 1
    else:  # refused for good: not sent again, the refusal counted
        assert again.anchored is None
        assert state.refused == 1
        assert fhir_peer.count("Provenance") == 0


@pytest.mark.peer
@pytest.mark.parametrize("status", [500, 503, 429, 409, 423, 425])
async def test_an_anchor_entry_the_upstream_fails_in_an_answered_bundle_holds_no_record_back(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, status: int
) -> None:
    await _records(store, 5)
    await db.run_sync(store.connection, audit.checkpoint, store.keyring.signing_key, now=T0)
    now = [T0]
    exporter = AuditExporter(store, client, site_id=SITE, clock=lambda: now[0])
    fhir_peer.reject(balp.CHECKPOINT_EXTENSION, status=status)  # the Provenance entry only
    try:
        result = await exporter.drain()
    finally:
        fhir_peer.reject(None)
    # Before: a transient stop before any record, every drain, and the box read offline.
    assert (result.exported, result.cursor, result.anchored) == (5, 5, None)
    assert (result.error, result.link_down, result.stopped_by) == (None, False, None)
    assert (result.anchor_error or "").startswith(
        f"transient: checkpoint anchor: entry HTTP {status}"
    )
    assert result.anchor_stopped_by is None  # the sync loop must not read the link as cut
    assert fhir_peer.count("AuditEvent") == 5
    # The anchor is paced on its own: not sent again on the next drain...
    await _records(store, 1)
    paced = await exporter.drain()
    assert (paced.exported, paced.anchored, paced.anchor_error) == (1, None, None)
    assert fhir_peer.count("Provenance") == 0
    # ...but once its wait is over.
    now[0] += timedelta(seconds=31)
    again = await exporter.drain()
    assert (again.anchored, again.anchor_error) == (5, None)
    assert fhir_peer.count("Provenance") == 1


@pytest.mark.peer
async def test_an_anchors_pause_is_not_stretched_by_a_clock_set_back(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    await _records(store, 2)
    await db.run_sync(store.connection, audit.checkpoint, store.keyring.signing_key, now=T0)
    now = [T0 + timedelta(days=30)]  # a box that booted with its clock a month ahead
    exporter = AuditExporter(store, client, site_id=SITE, clock=lambda: now[0])
    fhir_peer.reject(balp.CHECKPOINT_EXTENSION, status=503)  # the Provenance entry only
    try:
        assert (await exporter.drain()).anchor_error is not None  # paced: 30 s
    finally:
        fhir_peer.reject(None)
    now[0] = T0 + timedelta(minutes=20)  # NTP sets it right; past the longest pause since
    # Before: the pause ran to the wrong clock's time, a month on: the trail went unanchored.
    again = await exporter.drain()
    assert (again.anchored, again.anchor_error) == (2, None)
    assert fhir_peer.count("Provenance") == 1


@pytest.mark.peer
async def test_an_anchor_refused_as_a_whole_request_is_paced_not_sent_every_round(
    store: Store, proxied: httpx.AsyncClient, proxy: FaultProxy, fhir_peer: FhirPeer
) -> None:
    await _records(store, 2)
    await db.run_sync(store.connection, audit.checkpoint, store.keyring.signing_key, now=T0)
    now = [T0]
    exporter = AuditExporter(store, proxied, site_id=SITE, clock=lambda: now[0])
    await proxy.set(Fault.STATUS, status=422, count=1)  # the anchor's request, with its OO
    first = await exporter.drain()
    assert (first.exported, first.anchored) == (2, None)
    assert (first.anchor_error or "").startswith("permanent: ")
    assert proxy.counts["status"] == 1
    for _ in range(3):  # the next rounds, 5 s apart
        now[0] += timedelta(seconds=5)
        await proxy.set(Fault.STATUS, status=422, count=1)
        await exporter.drain()
    # Before: not in the sync loop's step stops either, so the anchor went again every round
    # (5 s), refused, with a warning in the journal each time, for as long as it lasted.
    assert proxy.counts["status"] == 1
    await proxy.set(Fault.NONE)
    now[0] += timedelta(seconds=31)
    again = await exporter.drain()
    assert (again.anchored, again.anchor_error) == (2, None)
    assert fhir_peer.count("Provenance") == 1


@pytest.mark.peer
async def test_a_failed_exchange_for_the_anchor_still_stops_both(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    await _records(store, 3)
    await db.run_sync(store.connection, audit.checkpoint, store.keyring.signing_key, now=T0)
    fhir_peer.fault("status", status=503, count=1)  # the anchor's whole request
    failed = await AuditExporter(store, client, site_id=SITE).drain()
    assert (failed.exported, failed.cursor, failed.link_down) == (0, 0, True)
    assert fhir_peer.count("AuditEvent") == 0


@pytest.mark.peer
async def test_altered_audit_rows_are_passed_over_as_refused_not_a_crash(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    await _records(store, 5)
    unguarded(
        db_path,
        "UPDATE audit SET patient_key = 'text now' WHERE id = 2",
        "UPDATE audit SET detail = CAST(x'ff00fe' AS TEXT) WHERE id = 3",
        "UPDATE audit SET hash = 'not bytes' WHERE id = 4",
    )
    # Before: TypeError / OperationalError out of the export, and the process restarted
    # into the same record for ever.
    result = await AuditExporter(store, client, site_id=SITE).drain()
    assert (result.exported, result.refused, result.cursor, result.error) == (2, 3, 5, None)
    state = await db.run_sync(store.connection, read_export_state)
    assert sorted(rid for rid, _ in state.recent_refusals) == [2, 3, 4]
    assert fhir_peer.count("AuditEvent") == 2
    assert store.connection._conn.text_factory is str  # as it was for everyone else


@pytest.mark.peer
async def test_a_trail_cut_back_and_grown_again_is_caught_reported_upstream_and_resent(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    conn, keyring = store.connection, store.keyring
    [pat] = await store.create([factories.patient()], "user:nurse1")
    for _ in range(5):
        await store.read("Patient", pat.logical_id, "user:nurse1")
    await db.run_sync(conn, audit.checkpoint, keyring.signing_key, now=T0)
    first = await AuditExporter(store, client, site_id=SITE).drain()
    assert (first.exported, first.anchored, first.trail_broken) == (6, 6, None)

    # Cut back to record 4 with its checkpoints, then the clinic's day goes on: records 5-7
    # (new ones under ids already exported) and the sync process's next checkpoint at 7.
    unguarded(db_path, "DELETE FROM audit WHERE id > 4", "DELETE FROM audit_checkpoints")
    for _ in range(3):
        await store.read("Patient", pat.logical_id, "user:nurse1")
    await db.run_sync(conn, audit.checkpoint, keyring.signing_key, now=T0)
    assert (await db.run_sync(conn, audit.verify, keyring.signing_public_key)).ok

    again = await AuditExporter(store, client, site_id=SITE).drain()
    # Before: records 5-7 were skipped (the cursor stood at 6) and the new chain anchored at
    # 7, so the newest anchor upstream vouched for it and nothing said anything.
    assert "no longer holds record 6 as exported nor record 6 as anchored upstream" in (
        again.trail_broken or ""
    )
    state = await db.run_sync(conn, read_export_state)
    assert (state.breaks, state.cursor, state.head, state.anchored) == (1, 8, 8, 7)
    raw = sqlite3.connect(db_path)
    [(said,)] = raw.execute(
        "SELECT detail FROM audit WHERE action = 'export' AND outcome = 'failure'"
    ).fetchall()
    raw.close()
    assert "resent from record 1" in said
    # Upstream: the six first, the three new under the same ids, and the record of the break.
    assert fhir_peer.count("AuditEvent") == 10
    anchors = await fetch_upstream_anchors(client, SITE)
    assert [a.audit_id for a in anchors] == [6, 7]
    caught = await db.run_sync(conn, verify_against_anchors, keyring.signing_public_key, anchors)
    assert not caught.ok
    assert caught.first_bad_id == 6
    # The newest anchor alone passes: that is why every anchor is checked.
    newest = await db.run_sync(conn, verify_against_anchor, keyring.signing_public_key, anchors[-1])
    assert newest.ok
    # Found once: the export goes on from the new chain without raising it again.
    third = await AuditExporter(store, client, site_id=SITE).drain()
    assert third.trail_broken is None
    assert (await db.run_sync(conn, read_export_state)).breaks == 1


@pytest.mark.peer
async def test_a_cursor_moved_by_an_older_release_is_not_taken_for_a_break(
    store: Store, client: httpx.AsyncClient, db_path: Path
) -> None:
    await _records(store, 5)
    await AuditExporter(store, client, site_id=SITE).drain()
    await _records(store, 2)
    # Rolled back for a while: that release exported 6-8 and moved the cursor, knowing
    # nothing of the hash kept beside it (still the one of record 5).
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute("UPDATE meta SET value = '8' WHERE key = 'audit_export.cursor'")
    raw.close()
    again = await AuditExporter(store, client, site_id=SITE).drain()
    # Before: "cut back or rewritten" on an intact trail, everything resent, a red banner.
    assert again.trail_broken is None
    assert (await db.run_sync(store.connection, read_export_state)).breaks == 0


@pytest.mark.peer
async def test_a_trail_cut_back_under_its_checkpoint_is_one_break_and_that_checkpoint_not_anchored(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    conn, keyring = store.connection, store.keyring
    await _records(store, 6)
    await db.run_sync(conn, audit.checkpoint, keyring.signing_key, now=T0)
    assert (await AuditExporter(store, client, site_id=SITE).drain()).anchored == 6
    # A naive cut: the newest records only, the checkpoint at record 6 left in its table.
    unguarded(db_path, "DELETE FROM audit WHERE id > 4")
    found = [await AuditExporter(store, client, site_id=SITE).drain() for _ in range(4)]
    # Before: the checkpoint at 6 was anchored again each drain, found missing on the next,
    # the export rewound to the start and one more break counted: 4 drains, 4 breaks.
    assert [r.trail_broken is not None for r in found] == [True, False, False, False]
    assert {r.anchored for r in found} == {None}
    assert found[0].unfit_checkpoints == [
        "checkpoint 1: record 6: not held by the trail (cut away, or inserted ahead)"
    ]
    state = await db.run_sync(conn, read_export_state)
    # Records 1-4 and the record of the break (5), each sent once more, no more.
    assert (state.breaks, state.anchored, state.cursor, state.head) == (1, 0, 5, 5)


@pytest.mark.peer
@pytest.mark.parametrize("altered", ["inserted ahead", "forged at the head"])
async def test_a_checkpoint_row_inserted_by_hand_is_not_anchored_and_pins_nothing(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path, altered: str
) -> None:
    conn, keyring = store.connection, store.keyring
    await _records(store, 30)
    signed = await db.run_sync(conn, audit.checkpoint, keyring.signing_key, now=T0)
    assert signed is not None
    # INSERT is not guarded by a trigger (only audit verify tells).
    audit_id, digest = (2**62, b"\x01" * 32) if altered == "inserted ahead" else (30, signed.hash)
    _raw(
        db_path,
        "INSERT INTO audit_checkpoints (audit_id, hash, ts, signature) VALUES (?, ?, ?, ?)",
        audit_id,
        digest,
        audit.ts_text(T0),
        b"\x02" * 64,
    )
    exporter = AuditExporter(store, client, site_id=SITE, batch=4)
    drains = [await exporter.drain(max_bundles=3) for _ in range(3)]
    # Before: the row was anchored as it was. Ahead, it was found missing on each drain, a
    # break counted and the export rewound, the cursor never past 12 of 30; forged, an
    # anchor no verification can pass went upstream, and the real one never.
    state = await db.run_sync(conn, read_export_state)
    assert (state.cursor, state.head, state.breaks, state.anchored) == (30, 30, 0, 30)
    assert await fetch_upstream_anchors(client, SITE) == [signed]
    assert drains[0].anchored == 30
    assert drains[0].unfit_checkpoints == [
        f"checkpoint 2: record {audit_id}: signature does not verify (forged or altered)"
    ]


@pytest.mark.peer
async def test_a_break_found_again_at_the_same_place_is_not_counted_twice(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    conn, keyring = store.connection, store.keyring
    await _records(store, 6)
    await db.run_sync(conn, audit.checkpoint, keyring.signing_key, now=T0)
    await AuditExporter(store, client, site_id=SITE).drain()
    anchor_hash = await db.run_sync(conn, db.meta_value, "audit_export.anchor_hash")
    unguarded(db_path, "DELETE FROM audit WHERE id > 4", "DELETE FROM audit_checkpoints")
    assert (await AuditExporter(store, client, site_id=SITE).drain()).trail_broken is not None
    # An older release beside it (appliance sync once) sets the anchor back where it was.
    for key, value in [("audit_export.anchor", "6"), ("audit_export.anchor_hash", anchor_hash)]:
        _set_meta(db_path, key, value)
    again = await AuditExporter(store, client, site_id=SITE).drain()
    # Before: a second break, a second record of it, the warning raised again.
    assert again.trail_broken is None
    state = await db.run_sync(conn, read_export_state)
    assert (state.breaks, state.cursor, state.head, state.anchored) == (1, 5, 5, 0)
    raw = sqlite3.connect(db_path)
    said = raw.execute("SELECT count(*) FROM audit WHERE outcome = 'failure'").fetchone()[0]
    raw.close()
    assert said == 1


@pytest.mark.peer
@pytest.mark.parametrize(
    ("ts", "signature"),
    [("yesterday", b"\x02" * 64), ("2026-11-26T08:00:00", b"\x02" * 64), (T0, b"short")],
    ids=["not a time", "no time zone", "short signature"],
)
async def test_a_malformed_checkpoint_row_is_passed_over_not_a_crash(
    store: Store,
    client: httpx.AsyncClient,
    fhir_peer: FhirPeer,
    db_path: Path,
    ts: str | datetime,
    signature: bytes,
) -> None:
    conn = store.connection
    await _records(store, 3)
    signed = await db.run_sync(conn, audit.checkpoint, store.keyring.signing_key, now=T0)
    assert signed is not None
    stored = audit.ts_text(ts) if isinstance(ts, datetime) else ts
    _raw(
        db_path,
        "INSERT INTO audit_checkpoints (audit_id, hash, ts, signature) VALUES (3, ?, ?, ?)",
        signed.hash,
        stored,
        signature,
    )
    # Before: a ValueError out of drain(), which ended the sync process (restarted by
    # systemd into the same row for ever: outbox, pull and claims stopped with it).
    result = await AuditExporter(store, client, site_id=SITE).drain()
    assert (result.exported, result.cursor, result.anchored, result.error) == (3, 3, 3, None)
    assert await fetch_upstream_anchors(client, SITE) == [signed]  # not the altered row
    [unfit] = result.unfit_checkpoints
    assert unfit.startswith("checkpoint 2: record 3: ")


@pytest.mark.peer
async def test_altered_export_state_in_meta_reads_as_none_and_loses_nothing(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    conn = store.connection
    await _records(store, 4)
    await db.run_sync(conn, audit.checkpoint, store.keyring.signing_key, now=T0)
    await AuditExporter(store, client, site_id=SITE).drain()
    for key, value in [
        ("audit_export.cursor", "four"),
        ("audit_export.anchor", "1e3"),
        ("audit_export.anchor_refused", "9" * 30),  # past any audit id SQLite can hold
        ("audit_export.refused", '{"count": "many", "recent": [["x", 1], 2]}'),
    ]:
        _set_meta(db_path, key, value)
    # Before: a ValueError on every status page and out of every drain.
    state = await db.run_sync(conn, read_export_state)
    assert (state.cursor, state.anchored, state.refused, state.recent_refusals) == (0, 0, 0, ())
    again = await AuditExporter(store, client, site_id=SITE).drain()
    # Sent again from the start and anchored again: found upstream, nothing twice.
    assert (again.exported, again.existing, again.cursor, again.anchored) == (4, 4, 4, 4)
    assert (fhir_peer.count("AuditEvent"), fhir_peer.count("Provenance")) == (4, 1)


@pytest.mark.peer
async def test_after_a_break_the_new_chains_checkpoints_are_anchored_from_the_start(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    conn, keyring = store.connection, store.keyring
    await _records(store, 6)
    await db.run_sync(conn, audit.checkpoint, keyring.signing_key, now=T0)
    assert (await AuditExporter(store, client, site_id=SITE).drain()).anchored == 6
    unguarded(db_path, "DELETE FROM audit WHERE id > 4", "DELETE FROM audit_checkpoints")
    await _records(store, 1)  # record 5 of the new chain
    await db.run_sync(conn, audit.checkpoint, keyring.signing_key, now=T0)
    found = await AuditExporter(store, client, site_id=SITE).drain()
    assert found.trail_broken is not None
    # Before: the old anchor's id (6) was kept, so checkpoint 5 was never anchored.
    assert found.anchored == 5
    assert [a.audit_id for a in await fetch_upstream_anchors(client, SITE)] == [5, 6]


@pytest.mark.peer
async def test_a_new_chains_checkpoint_at_an_old_anchors_id_is_anchored_beside_it(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    fhir_peer.reset()
    conn, keyring = store.connection, store.keyring
    await _records(store, 6)
    await db.run_sync(conn, audit.checkpoint, keyring.signing_key, now=T0)
    assert (await AuditExporter(store, client, site_id=SITE).drain()).anchored == 6
    # Cut back to 4, grown to 6 again, signed at 6: the same id as the old anchor.
    unguarded(db_path, "DELETE FROM audit WHERE id > 4", "DELETE FROM audit_checkpoints")
    await _records(store, 2)
    await db.run_sync(conn, audit.checkpoint, keyring.signing_key, now=T0)
    found = await AuditExporter(store, client, site_id=SITE).drain()
    assert found.trail_broken is not None
    assert found.anchored == 6
    anchors = await fetch_upstream_anchors(client, SITE)
    # Before: keyed by id alone, the new anchor met the old one (200) and was not stored,
    # though the export counted it anchored.
    assert [a.audit_id for a in anchors] == [6, 6]
    assert len({a.hash for a in anchors}) == 2
    newest = await db.run_sync(conn, audit.latest_checkpoint)
    assert newest is not None
    assert newest.hash in {a.hash for a in anchors}
    caught = await db.run_sync(conn, verify_against_anchors, keyring.signing_public_key, anchors)
    assert not caught.ok


class _TwoPerPage(httpx.AsyncBaseTransport):
    """The real transport, but Provenance searches come two at a time with ``next`` links,
    as a server capping ``_count`` answers (the peer itself gives no links)."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.pages = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "GET" or not request.url.path.endswith("/Provenance"):
            return await self._inner.handle_async_request(request)
        self.pages += 1
        offset = int(request.url.params.get("_offset", "0"))
        request.url = request.url.copy_set_param("_count", "2").copy_set_param(
            "_offset", str(offset)
        )
        response = await self._inner.handle_async_request(request)
        body = json.loads(await response.aread())
        if len(body.get("entry", [])) == 2:
            later = request.url.copy_set_param("_offset", str(offset + 2))
            body["link"] = [{"relation": "next", "url": str(later)}]
        return httpx.Response(200, headers={"Content-Type": "application/fhir+json"}, json=body)


@pytest.mark.peer
async def test_verification_holds_the_trail_to_every_anchor_page_after_page(
    store: Store, fhir_peer: FhirPeer, db_path: Path
) -> None:
    fhir_peer.reset()
    conn, keyring = store.connection, store.keyring
    paged = _TwoPerPage()
    async with httpx.AsyncClient(
        base_url=fhir_peer.base_url,
        headers={"Content-Type": "application/fhir+json"},
        transport=paged,
    ) as client:
        await _records(store, 6)
        await db.run_sync(conn, audit.checkpoint, keyring.signing_key, now=T0)
        await AuditExporter(store, client, site_id=SITE).drain()
        unguarded(db_path, "DELETE FROM audit WHERE id > 4", "DELETE FROM audit_checkpoints")
        for _ in range(5):  # the new chain grows and is anchored again and again
            await _records(store, 2)
            await db.run_sync(conn, audit.checkpoint, keyring.signing_key, now=T0)
            await AuditExporter(store, client, site_id=SITE).drain()
        anchors = await fetch_upstream_anchors(client, SITE)
    # Before: only the newest page (of 50) was read; the old chain's anchor scrolls out.
    assert paged.pages >= 3
    # The old chain's 6, then the new one's, its own 6 beside the old (keyed by id and hash).
    assert [a.audit_id for a in anchors] == [6, 6, 9, 11, 13, 15]
    caught = await db.run_sync(conn, verify_against_anchors, keyring.signing_public_key, anchors)
    assert (caught.ok, caught.first_bad_id) == (False, 6)


@pytest.mark.peer
async def test_a_page_that_is_not_a_search_bundle_is_not_read_as_no_anchors(
    store: Store, proxied: httpx.AsyncClient, proxy: FaultProxy
) -> None:
    await _records(store, 2)
    await db.run_sync(store.connection, audit.checkpoint, store.keyring.signing_key, now=T0)
    await AuditExporter(store, proxied, site_id=SITE).drain()
    # A single sign-on page in front of the EHR, answered 200 to the search.
    login = b"<html><body><form action='/sso/login'>Sign in</form></body></html>"
    await proxy.set(Fault.REPLACE, status=200, body=login, count=1)
    # Before: no entries, so "no anchors", and `audit verify` said the trail was intact.
    with pytest.raises(UpstreamError) as caught:
        await fetch_upstream_anchors(proxied, SITE)
    assert caught.value.failure is Failure.TRANSIENT
    assert [a.audit_id for a in await fetch_upstream_anchors(proxied, SITE)] == [2]


@pytest.mark.peer
async def test_a_next_link_off_the_upstream_leaves_the_anchors_incomplete_not_ended(
    store: Store, proxied: httpx.AsyncClient, proxy: FaultProxy
) -> None:
    await _records(store, 2)
    await db.run_sync(store.connection, audit.checkpoint, store.keyring.signing_key, now=T0)
    await AuditExporter(store, proxied, site_id=SITE).drain()
    page = (
        await proxied.get("Provenance", params={"_tag": balp.checkpoint_system(SITE) + "|"})
    ).json()
    # A server behind a reverse proxy naming its own host in the links.
    page["link"] = [{"relation": "next", "url": "http://ehr.internal:8080/fhir/R4/Provenance?p=2"}]
    await proxy.set(Fault.REPLACE, status=200, body=json.dumps(page).encode(), count=1)
    # Before: read as the last page, the older anchors behind it never checked.
    with pytest.raises(UpstreamError) as caught:
        await fetch_upstream_anchors(proxied, SITE)
    assert caught.value.failure is Failure.ENDPOINT
    assert "not all read" in caught.value.message


@pytest.mark.peer
async def test_a_next_link_at_an_address_the_upstream_is_also_known_as_is_read_at_its_base(
    store: Store, proxied: httpx.AsyncClient, proxy: FaultProxy
) -> None:
    await _records(store, 2)
    await db.run_sync(store.connection, audit.checkpoint, store.keyring.signing_key, now=T0)
    await AuditExporter(store, proxied, site_id=SITE).drain()
    everything = await fetch_upstream_anchors(proxied, SITE)
    assert [a.audit_id for a in everything] == [2]
    # The first page holds nothing but a link at the server's internal address, to the rest.
    tag = balp.checkpoint_system(SITE) + "|"
    rest = httpx.URL("http://ehr.internal:8080/fhir/R4/Provenance", params={"_tag": tag})
    page = {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": [{"relation": "next", "url": str(rest)}],
    }
    await proxy.set(Fault.REPLACE, status=200, body=json.dumps(page).encode(), count=1)
    # ehr.internal is never asked (it does not resolve here): the link is asked at the proxy.
    also = ("http://EHR.internal:8080/fhir/R4/",)
    assert await fetch_upstream_anchors(proxied, SITE, also_known_as=also) == everything


async def test_breaks_are_acknowledged_up_to_the_count_shown_and_audited(
    store: Store, db_path: Path
) -> None:
    conn = store.connection
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute("INSERT INTO meta (key, value) VALUES ('audit_export.breaks', '2')")
    state = await db.run_sync(conn, read_export_state)
    assert (state.breaks, state.unacknowledged_breaks) == (2, 2)

    # The person saw one (a second was found while the page was open): only that one goes.
    done = await db.run_sync(
        conn, lambda c: acknowledge_breaks(c, actor="user:admin1", now=T0, seen=1)
    )
    assert done == 1
    state = await db.run_sync(conn, read_export_state)
    assert (state.breaks, state.breaks_acknowledged, state.unacknowledged_breaks) == (2, 1, 1)
    # A stale or forged count above the real one acknowledges only what was found.
    assert (
        await db.run_sync(
            conn, lambda c: acknowledge_breaks(c, actor="user:admin1", now=T0, seen=99)
        )
        == 1
    )
    assert (
        await db.run_sync(
            conn, lambda c: acknowledge_breaks(c, actor="user:admin1", now=T0, seen=2)
        )
        == 0
    )
    state = await db.run_sync(conn, read_export_state)
    assert (state.breaks, state.unacknowledged_breaks) == (2, 0)
    said = raw.execute(
        "SELECT actor, action, detail FROM audit WHERE detail LIKE 'audit trail break%' ORDER BY id"
    ).fetchall()
    assert said == [
        ("user:admin1", "config", "audit trail break acknowledged: 1 of 2"),
        ("user:admin1", "config", "audit trail break acknowledged: 2 of 2"),
    ]
    # Altered counts read as none rather than failing every status page.
    with raw:
        raw.execute("UPDATE meta SET value = 'x' WHERE key = 'audit_export.breaks_acknowledged'")
    raw.close()
    state = await db.run_sync(conn, read_export_state)
    assert (state.breaks, state.breaks_acknowledged, state.unacknowledged_breaks) == (2, 0, 2)


class _MisnumberedAnswer(httpx.AsyncBaseTransport):
    """The real transport, but the next batch answer loses its first entry, or gains a
    batch-level OperationOutcome entry (refusing) in front: the entries no longer line up."""

    def __init__(self, how: str) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.how: str | None = how

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        if request.method != "POST" or self.how is None:
            return response
        body = json.loads(await response.aread())
        entries = body.get("entry", [])
        if self.how == "one dropped":
            entries = entries[1:]
        else:
            outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error"}]}
            entries = [{"resource": outcome, "response": {"status": "400"}}, *entries]
        body["entry"], self.how = entries, None
        return httpx.Response(200, headers={"Content-Type": "application/fhir+json"}, json=body)


@pytest.mark.peer
@pytest.mark.parametrize("how", ["one dropped", "an outcome in front"])
async def test_an_answer_whose_entries_do_not_line_up_is_taken_for_no_record(
    store: Store, fhir_peer: FhirPeer, how: str
) -> None:
    fhir_peer.reset()
    await _records(store, 4)
    async with httpx.AsyncClient(
        base_url=fhir_peer.base_url,
        headers={"Content-Type": "application/fhir+json"},
        transport=_MisnumberedAnswer(how),
    ) as client:
        exporter = AuditExporter(store, client, site_id=SITE, batch=4)
        first = await exporter.export_once()
        # Before: matched by position. An outcome in front passed record 1 over as refused
        # (for the audit export, lost), and one dropped settled records on others' answers.
        assert (first.exported, first.refused, first.cursor) == (0, 0, 0)
        answered = {"one dropped": 3, "an outcome in front": 5}[how]
        assert first.stopped_by is not None
        assert first.stopped_by.message == (
            f"the answer has {answered} entries for 4 records sent: none taken"
        )
        again = await exporter.drain()
    assert (again.exported, again.refused, again.cursor) == (4, 0, 4)
    state = await db.run_sync(store.connection, read_export_state)
    assert (state.refused, state.cursor) == (0, 4)
