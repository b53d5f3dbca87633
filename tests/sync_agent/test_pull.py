"""Incremental pull-down against the real Medplum FHIR peer: cursors, paging, interruptions."""

from __future__ import annotations

import logging
import random
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import orjson
import pytest

from appliance import db, key_rotation
from appliance.config import UpstreamConfig
from appliance.device_registry import DeviceRegistry, Setting, Transport
from appliance.errors import TamperedDataError
from appliance.store import UNREADABLE_REPLACED, Store
from services.vitals import CAPTURE_SETTING_SYSTEM
from sync_agent import pull_streams, pull_twins, status
from sync_agent.outbox_delivery import Deliverer
from sync_agent.pull import Puller
from sync_agent.pull_import import ACTOR, HOME_TAG
from sync_agent.review_queue import ReviewQueue
from sync_agent.updates import UpdateSender
from sync_agent.upstream import FHIR_JSON
from tests import factories
from tests.fhir_peer.peer import FhirPeer
from tests.tamper import move_ciphertext
from web.kiosk import _find_appointment, normalise_code

pytestmark = pytest.mark.peer

NURSE = "user:nurse1"


class Transport_(httpx.AsyncBaseTransport):
    """The real HTTP transport, plus what a test needs: a request log, a dropped request, and
    optionally ``next`` links on search pages (the peer gives none; real servers do)."""

    def __init__(self, *, fail_at: int | None = None, add_next_links: bool = False) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.fail_at = fail_at
        self.add_next_links = add_next_links
        self.requests: list[httpx.URL] = []
        self.before: Callable[[httpx.Request], Awaitable[None]] | None = None
        self.cap: int | None = None  # the most _count the "server" serves per page
        self.self_links = False  # with add_next_links: each next link points at its own page
        # With add_next_links: each link names its search (as HAPI's do), and a link of a
        # search expired (expire_searches) is answered with ``expired``.
        self.search_ids = False
        # With add_next_links: the links at this origin instead (an EHR behind a proxy that
        # does not pass the host on writes its internal address, as HAPI does).
        self.link_origin: tuple[str, str, int] | None = None
        self.expired: Callable[[], httpx.Response] | None = None
        self._searches = 0
        self._expired_up_to = 0

    def expire_searches(self, answer: Callable[[], httpx.Response]) -> None:
        """Every search begun so far leaves the server's cache: its links get ``answer``."""
        self._expired_up_to, self.expired = self._searches, answer

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url)
        search = request.url.params.get("_search")
        if search is not None:
            request.url = request.url.copy_remove_param("_search")  # the peer's page as it is
            if self.expired is not None and int(search) <= self._expired_up_to:
                return self.expired()
        if self.before is not None:
            await self.before(request)
        asked = request.url.params.get("_count")
        if self.cap is not None and asked is not None and int(asked) > self.cap:
            request.url = request.url.copy_set_param("_count", str(self.cap))
        if self.fail_at is not None and len(self.requests) == self.fail_at:
            raise httpx.ConnectError("dropped by the test", request=request)
        response = await self._inner.handle_async_request(request)
        if not self.add_next_links or request.method != "GET":
            return response
        await response.aread()
        body = orjson.loads(response.content)
        query = dict(parse_qsl(request.url.query.decode()))
        count = int(query.get("_count", "0"))
        offset = int(query.get("_offset", "0"))
        total = body.get("total")
        more = offset + count < total if isinstance(total, int) else True
        if (
            body.get("type") == "searchset"
            and count
            and len(body.get("entry", [])) == count
            and more
        ):
            query["_offset"] = str(offset + count)
            if self.search_ids:
                if search is None:  # a search begun here, not a page of one
                    self._searches += 1
                    search = str(self._searches)
                query["_search"] = search
            url = request.url.copy_with(query=urlencode(query).encode())
            if self.link_origin is not None:
                scheme, host, port = self.link_origin
                url = url.copy_with(scheme=scheme, host=host, port=port)
            body["link"] = [
                {"relation": "next", "url": str(request.url if self.self_links else url)}
            ]
        return httpx.Response(
            response.status_code, headers={"Content-Type": FHIR_JSON}, content=orjson.dumps(body)
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.fixture
def transport(fhir_peer: FhirPeer) -> Transport_:
    fhir_peer.reset()
    return Transport_()


@pytest.fixture
async def client(fhir_peer: FhirPeer, transport: Transport_) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=fhir_peer.base_url,
        headers={"Content-Type": FHIR_JSON},
        timeout=5.0,
        transport=transport,
    ) as http:
        yield http


async def _post(client: httpx.AsyncClient, resource: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(resource["resourceType"], json=resource)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def _appointment(
    patient: dict[str, Any], location: dict[str, Any], updated: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Appointment",
        "status": "booked",
        "start": "2026-11-30T15:00:00Z",
        "end": "2026-11-30T15:30:00Z",
        "participant": [
            {"actor": {"reference": f"Patient/{patient['id']}"}, "status": "accepted"},
            {"actor": {"reference": f"Location/{location['id']}"}, "status": "accepted"},
        ],
    }
    if updated is not None:
        body["meta"] = {"lastUpdated": updated}
    return body


class _Clock:
    """The puller's clock, moved on by the test (a Patient missed is asked again later)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _puller(store: Store, client: httpx.AsyncClient, site: dict[str, Any], **kwargs: Any) -> Puller:
    upstream = UpstreamConfig(
        name="ehr", base_url=str(client.base_url), location=f"Location/{site['id']}"
    )
    return Puller(store, client, upstream, **kwargs)


def _count(db_path: Path, rtype: str) -> int:
    conn = sqlite3.connect(db_path)
    found = int(
        conn.execute("SELECT count(*) FROM resources WHERE type = ?", (rtype,)).fetchone()[0]
    )
    conn.close()
    return found


def _outbox_rows(db_path: Path) -> int:
    conn = sqlite3.connect(db_path)
    found = int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
    conn.close()
    return found


async def _local_id(store: Store, rtype: str, upstream_id: str) -> str:
    rows = await store.query(
        "SELECT r.logical_id FROM upstream_links l JOIN resources r ON r.id = l.resource_id "
        "WHERE l.upstream_ref = ?",
        (f"{rtype}/{upstream_id}",),
    )
    assert rows, f"{rtype}/{upstream_id} was not pulled"
    return str(rows[0][0])


async def _enrol(store: Store, patient_logical_id: str) -> None:
    registry = DeviceRegistry(store)
    await registry.register_device(
        "home-bp-1",
        name="Home cuff",
        transport=Transport.HUB,
        profile="blood_pressure",
        address=None,
        setting=Setting.HOME,
        actor="user:admin",
    )
    await registry.assign_device("home-bp-1", "user:admin", patient_id=patient_logical_id)


async def test_pull_takes_this_sites_appointments_their_patients_and_home_readings(
    store: Store, client: httpx.AsyncClient, db_path: Path
) -> None:
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    other = await _post(client, {"resourceType": "Location", "name": "Another clinic"})
    ada = await _post(client, factories.patient(family="Adaperson"))
    bob = await _post(client, factories.patient(family="Bobperson", mrn="T0002"))
    eve = await _post(client, factories.patient(family="Eveperson", mrn="T0003"))
    await _post(client, _appointment(ada, site))
    await _post(client, _appointment(bob, site))
    await _post(client, _appointment(eve, other))
    for systolic in (121, 122, 123):
        await _post(client, factories.bp_observation(f"Patient/{ada['id']}", systolic=systolic))
    await _post(client, factories.bp_observation(f"Patient/{bob['id']}"))  # not enrolled
    clinic = factories.bp_observation(f"Patient/{ada['id']}", systolic=150)
    clinic["meta"] = {"tag": [{"system": CAPTURE_SETTING_SYSTEM, "code": "clinic"}]}
    await _post(client, clinic)  # a clinic reading from another box: not a home reading

    puller = _puller(store, client, site)
    first = await puller.pull_once()
    assert first.error is None
    assert (_count(db_path, "Appointment"), _count(db_path, "Patient")) == (2, 2)
    assert _count(db_path, "Observation") == 0  # nobody is enrolled yet

    ada_local = await _local_id(store, "Patient", ada["id"])
    appointment_local = await _local_id(
        store,
        "Appointment",
        ((await client.get("Appointment", params={"actor": f"Patient/{ada['id']}"})).json())[
            "entry"
        ][0]["resource"]["id"],
    )
    appointment = await store.read("Appointment", appointment_local, NURSE)
    actors = {p["actor"]["reference"] for p in appointment["participant"]}
    assert actors == {f"Patient/{ada_local}", f"Location/{site['id']}"}

    await _enrol(store, ada_local)
    second = await puller.pull_once(force=True)
    assert (second.created, second.skipped, second.error) == (3, 1, None)
    readings = await store.newest(f"Patient/{ada_local}", "Observation", NURSE)
    assert sorted(r["component"][0]["valueQuantity"]["value"] for r in readings) == [
        121,
        122,
        123,
    ]
    assert all(HOME_TAG in r["meta"]["tag"] for r in readings)
    # Pulled resources never go back up: nothing in the outbox, nothing for the deliverer.
    assert _outbox_rows(db_path) == 0
    assert (await Deliverer(store, client, max_entries=8).drain()).delivered == 0
    conn = sqlite3.connect(db_path)
    actors_seen = {row[0] for row in conn.execute("SELECT DISTINCT actor FROM audit")}
    cursors = conn.execute("SELECT stream, since FROM pull_cursors ORDER BY stream").fetchall()
    conn.close()
    assert "service:sync" in actors_seen
    assert [stream for stream, _ in cursors] == [
        f"Appointment Location/{site['id']}",
        f"Observation Patient/{ada['id']}",
    ]

    # A second pass finds nothing new and writes nothing.
    again = await puller.pull_once(force=True)
    assert (again.created, again.updated, again.held, again.error) == (0, 0, 0, None)
    assert (_count(db_path, "Appointment"), _count(db_path, "Observation")) == (2, 3)


@pytest.mark.parametrize("refusal", [400, 403, 404, 410])
async def test_one_refused_search_does_not_stop_the_other_patients_home_readings(
    store: Store,
    client: httpx.AsyncClient,
    transport: Transport_,
    fhir_peer: FhirPeer,
    db_path: Path,
    refusal: int,
) -> None:
    puller, patients, local = await _two_enrolled(store, client)
    # The first patient's search in the pass's order is refused (merged upstream, say).
    first, second = sorted(patients, key=lambda p: local[p["id"]])

    async def refuse_the_first_patients_search(request: httpx.Request) -> None:
        if request.url.params.get("subject") == f"Patient/{first['id']}":
            fhir_peer.fault("status", status=refusal)  # with the server's OperationOutcome

    transport.before = refuse_the_first_patients_search
    result = await puller.pull_once(force=True)
    # Before: the refusal ended the pass, and every patient after that one got nothing.
    assert (result.refused, result.created, result.link_down) == (1, 1, False)
    assert len(await store.newest(f"Patient/{local[second['id']]}", "Observation", NURSE)) == 1
    assert await store.newest(f"Patient/{local[first['id']]}", "Observation", NURSE) == []
    transport.before = None
    healed = await puller.pull_once(force=True)
    assert (healed.refused, healed.created, healed.error) == (0, 1, None)


async def _rename(store: Store, logical_id: str, family: str) -> None:
    """A nurse's edit of the patient's name here."""
    current = await store.read("Patient", logical_id, NURSE)
    await store.update("Patient", logical_id, {**current, "name": [{"family": family}]}, NURSE)


async def _pulled_ada(
    store: Store, client: httpx.AsyncClient
) -> tuple[Puller, dict[str, Any], dict[str, Any], str, str]:
    """Ada and her Appointment at this site, pulled and enrolled: the puller, Ada and the
    Appointment as the upstream holds them, and their local ids (Ada's, the Appointment's)."""
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    ada = await _post(client, factories.patient(family="Adaperson"))
    booked = await _post(client, _appointment(ada, site))
    puller = _puller(store, client, site)
    await puller.pull_once()
    ada_local = await _local_id(store, "Patient", ada["id"])
    appointment_local = await _local_id(store, "Appointment", booked["id"])
    await _enrol(store, ada_local)
    return puller, ada, booked, ada_local, appointment_local


async def test_an_upstream_change_is_pulled_as_an_update_of_the_same_local_resource(
    store: Store, client: httpx.AsyncClient, db_path: Path
) -> None:
    puller, ada, booked, ada_local, appointment_local = await _pulled_ada(store, client)

    arrived = {**booked, "status": "arrived"}
    assert (await client.put(f"Appointment/{booked['id']}", json=arrived)).status_code == 200
    renamed = {**ada, "name": [{"family": "Renamedperson", "given": ["Ada"]}]}
    assert (await client.put(f"Patient/{ada['id']}", json=renamed)).status_code == 200

    result = await puller.pull_once(force=True)
    assert (result.created, result.updated) == (0, 2)
    assert (_count(db_path, "Appointment"), _count(db_path, "Patient")) == (1, 1)
    assert (await store.read("Appointment", appointment_local, NURSE))["status"] == "arrived"
    patient = await store.read("Patient", ada_local, NURSE)
    assert patient["name"][0]["family"] == "Renamedperson"
    history = await store.history("Patient", ada_local, NURSE)
    assert [h["name"][0]["family"] for h in history] == ["Adaperson"]


async def test_a_pulled_copy_replaces_a_stored_copy_that_fails_authentication(
    store: Store, client: httpx.AsyncClient, db_path: Path, kek_path: Path
) -> None:
    puller, ada, _booked, ada_local, appointment_local = await _pulled_ada(store, client)
    move_ciphertext(db_path, ada_local, appointment_local)  # Ada's, now the Appointment's
    conn = sqlite3.connect(db_path)
    [(row_id, version, moved)] = conn.execute(
        "SELECT id, key_version, body FROM resources WHERE logical_id = ?", (ada_local,)
    ).fetchall()
    conn.close()
    with pytest.raises(TamperedDataError):
        await store.read("Patient", ada_local, NURSE)

    renamed = {**ada, "name": [{"family": "Renamedperson", "given": ["Ada"]}]}
    assert (await client.put(f"Patient/{ada['id']}", json=renamed)).status_code == 200
    result = await puller.pull_once(force=True)  # before: TamperedDataError, every pass
    assert (result.error, result.created, result.updated) == (None, 0, 1)
    patient = await store.read("Patient", ada_local, NURSE)
    assert patient["name"][0]["family"] == "Renamedperson"
    assert patient["id"] == ada_local
    assert await store.history("Patient", ada_local, NURSE) == []  # nothing readable to keep
    conn = sqlite3.connect(db_path)
    kept = conn.execute(
        "SELECT resource_id, key_version, body, replaced_by FROM unreadable_copies"
    ).fetchall()
    audited = conn.execute(
        "SELECT action, entity, detail FROM audit WHERE actor = ? AND entity = ?",
        (ACTOR, f"Patient/{ada_local}"),
    ).fetchall()
    conn.close()
    assert kept == [(row_id, version, moved, f"Patient/{ada['id']}")]  # as found, byte for byte
    assert audited[-1] == (
        "update",
        f"Patient/{ada_local}",
        f"pulled Patient/{ada['id']}; {UNREADABLE_REPLACED}",
    )
    # The next pass finds nothing wrong and nothing new.
    again = await puller.pull_once(force=True)
    assert (again.error, again.created, again.updated) == (None, 0, 0)
    # A data-key rotation keeps the key the kept bytes name, so they can still be examined.
    kek = kek_path.read_bytes()
    conn = db.connect_sync(db_path)
    key_rotation.rotate_data_key(conn, kek)
    rotated = key_rotation.reencrypt(conn, kek)
    conn.close()
    assert rotated.retired_versions == ()


async def test_a_pull_interrupted_mid_page_resumes_without_loss_or_duplicates(
    store: Store, client: httpx.AsyncClient, transport: Transport_, db_path: Path
) -> None:
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    for index in range(5):
        patient = await _post(client, factories.patient(mrn=f"T{index:04d}"))
        await _post(client, _appointment(patient, site))
    puller = _puller(store, client, site, page_size=2)
    # Requests: Appointment page 1, its Patients, Appointment page 2, its Patients (dropped).
    transport.fail_at = len(transport.requests) + 4
    broken = await puller.pull_once()
    assert broken.link_down
    assert (_count(db_path, "Appointment"), _count(db_path, "Patient")) == (2, 2)
    transport.fail_at = None
    resumed = await puller.pull_once(force=True)
    assert resumed.error is None
    assert resumed.created == 6  # the three appointments and three patients not yet taken
    assert (_count(db_path, "Appointment"), _count(db_path, "Patient")) == (5, 5)


SAME_INSTANT = "2026-11-26T08:00:00.000Z"


async def _one_instant(client: httpx.AsyncClient, n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The site, and one patient's ``n`` appointments there all stamped at ``SAME_INSTANT``;
    then one a second later. Returns the site and that later appointment."""
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    patient = await _post(client, factories.patient())
    for _ in range(n):
        await _post(client, _appointment(patient, site, updated=SAME_INSTANT))
    later = await _post(client, _appointment(patient, site, updated="2026-11-26T08:00:01.000Z"))
    return site, later


async def test_equal_timestamps_across_a_page_boundary_are_taken_once_each(
    store: Store, client: httpx.AsyncClient, db_path: Path
) -> None:
    site, later = await _one_instant(client, 5)
    puller = _puller(store, client, site, page_size=2)
    result = await puller.pull_once()
    assert result.error is None
    assert _count(db_path, "Appointment") == 6
    assert result.created == 7  # six appointments and their one patient
    await _local_id(store, "Appointment", later["id"])
    assert (await puller.pull_once(force=True)).created == 0


async def test_an_upstream_change_between_pages_loses_nothing_though_the_server_pages_by_offset(
    store: Store, client: httpx.AsyncClient, transport: Transport_, db_path: Path
) -> None:
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    patient = await _post(client, factories.patient())
    booked = [await _post(client, _appointment(patient, site)) for _ in range(6)]
    transport.add_next_links = True  # offset links, as many servers give

    searches: list[httpx.URL] = []

    async def the_ehr_changes_the_first_after_page_one(request: httpx.Request) -> None:
        if request.method == "GET" and request.url.path.endswith("/Appointment"):
            searches.append(request.url)
        if len(searches) == 2 and request.url == searches[-1]:
            moved = {**booked[0], "status": "arrived"}
            del moved["meta"]  # the server stamps it now: it moves to the end of the order
            async with httpx.AsyncClient(base_url=str(client.base_url)) as ehr:
                assert (await ehr.put(f"Appointment/{moved['id']}", json=moved)).status_code == 200

    transport.before = the_ehr_changes_the_first_after_page_one
    result = await _puller(store, client, site, page_size=3).pull_once()
    assert result.error is None
    # Following the offset link, the fourth (slid into the offset already read) was lost.
    for appointment in booked:
        await _local_id(store, "Appointment", appointment["id"])
    assert _count(db_path, "Appointment") == 6
    queries = [dict(parse_qsl(u.query.decode())) for u in searches]
    assert all("_offset" not in q for q in queries)
    assert all("_lastUpdated" in q for q in queries[1:])  # each page from the cursor
    first = await _local_id(store, "Appointment", booked[0]["id"])
    assert (await store.read("Appointment", first, NURSE))["status"] == "arrived"


@pytest.mark.parametrize("overlap_s", [600.0, 0.0])
async def test_a_resource_committed_late_behind_the_cursor_is_taken_on_the_next_pass(
    store: Store, client: httpx.AsyncClient, db_path: Path, overlap_s: float
) -> None:
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    patient = await _post(client, factories.patient())
    await _post(client, _appointment(patient, site, updated="2026-11-26T08:00:00.000Z"))
    puller = _puller(store, client, site, overlap_s=overlap_s)
    assert (await puller.pull_once()).created == 2
    # A write the server stamped before the one just read, committed after it was read.
    late = await _post(client, _appointment(patient, site, updated="2026-11-26T07:58:00.000Z"))
    again = await puller.pull_once(force=True)
    if overlap_s == 0:  # as before: behind the cursor, never seen
        assert again.created == 0
        assert _count(db_path, "Appointment") == 1
        return
    assert again.created == 1
    await _local_id(store, "Appointment", late["id"])
    assert _count(db_path, "Appointment") == 2
    # Read again on later passes, but held here: nothing is taken twice.
    third = await puller.pull_once(force=True)
    assert (third.created, third.updated, third.pages) == (0, 0, 1)


async def test_a_run_of_equal_timestamps_longer_than_the_largest_page_follows_next_links(
    store: Store,
    client: httpx.AsyncClient,
    transport: Transport_,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pull_streams, "MAX_PAGE_SIZE", 4)
    site, later = await _one_instant(client, 7)
    puller = _puller(store, client, site, page_size=2)
    stuck = await puller.pull_once()
    # No next link: the stream cannot page through that instant, and says so.
    assert (
        stuck.error == f"Appointment Location/{site['id']}: over 4 resources share one lastUpdated"
    )
    assert (stuck.stuck, stuck.refused) == (1, 0)  # the status reads pull_stuck from it
    assert _count(db_path, "Appointment") == 4
    transport.add_next_links = True
    result = await puller.pull_once(force=True)
    assert result.error is None
    assert _count(db_path, "Appointment") == 8
    await _local_id(store, "Appointment", later["id"])
    assert (await puller.pull_once(force=True)).created == 0


async def test_a_server_that_caps_count_is_paged_through_run_and_all(
    store: Store, client: httpx.AsyncClient, transport: Transport_, db_path: Path
) -> None:
    site, later = await _one_instant(client, 5)
    transport.cap, transport.add_next_links = 2, True  # asked for 8, it serves 2 a page
    result = await _puller(store, client, site, page_size=8).pull_once()
    # Before: the short page read as the last, and the stream stood still in that instant.
    assert (result.error, result.more) == (None, False)
    assert _count(db_path, "Appointment") == 6
    await _local_id(store, "Appointment", later["id"])


async def test_a_run_ending_the_stream_on_a_full_page_ends_the_pass(
    store: Store,
    client: httpx.AsyncClient,
    transport: Transport_,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pull_streams, "MAX_PAGE_SIZE", 4)
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    patient = await _post(client, factories.patient())
    for _ in range(8):  # an exact multiple of the page, and nothing after it
        await _post(client, _appointment(patient, site, updated=SAME_INSTANT))
    transport.add_next_links = True  # and no next link on the last, full, page
    puller = _puller(store, client, site, page_size=4, interval_s=3600)
    first = await puller.pull_once()
    assert (first.error, first.more) == (None, False)
    assert _count(db_path, "Appointment") == 8
    start = len(transport.requests)
    again = await puller.pull_once(force=True)
    # Before: it walked the run again up to max_pages, reporting "more", on every pass.
    assert (again.created, again.more) == (0, False)
    assert len(transport.requests) - start < 10


async def test_passes_are_paced_unless_forced(
    store: Store, client: httpx.AsyncClient, transport: Transport_
) -> None:
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    now = [datetime(2026, 11, 29, 9, tzinfo=UTC)]
    puller = _puller(store, client, site, interval_s=3600, clock=lambda: now[0])
    assert (await puller.pull_once()).due
    assert not (await puller.pull_once()).due
    assert (await puller.pull_once(force=True)).due
    now[0] += timedelta(minutes=61)
    assert (await puller.pull_once()).due
    now[0] -= timedelta(days=2)  # NTP steps back a clock that ran ahead: not stuck for days
    assert (await puller.pull_once()).due
    assert not (await puller.pull_once()).due


async def test_a_pull_holds_back_an_upstream_version_while_a_local_edit_is_pending(
    store: Store, client: httpx.AsyncClient, db_path: Path
) -> None:
    puller, ada, _booked, ada_local, _appointment_local = await _pulled_ada(store, client)
    await _rename(store, ada_local, "Mineperson")
    theirs = {**ada, "name": [{"family": "Theirsperson"}]}
    assert (await client.put(f"Patient/{ada['id']}", json=theirs)).status_code == 200

    held = await puller.pull_once(force=True)
    assert held.held == 1
    assert (await store.read("Patient", ada_local, NURSE))["name"][0]["family"] == "Mineperson"
    # The update meets the upstream's change: a review, with their newest version in it.
    assert (await UpdateSender(store, client, rng=random.Random(1)).send_once()).conflicts == 1
    newest = {**theirs, "name": [{"family": "Theirnewestperson"}]}
    assert (await client.put(f"Patient/{ada['id']}", json=newest)).status_code == 200
    assert (await puller.pull_once(force=True)).held == 1
    queue = ReviewQueue(store)
    [item] = await queue.items()
    assert (await queue.open(item.id, NURSE)).theirs["name"][0]["family"] == "Theirnewestperson"
    await queue.take_theirs(item.id, NURSE, theirs_version=item.theirs_version)
    patient = await store.read("Patient", ada_local, NURSE)
    assert patient["name"][0]["family"] == "Theirnewestperson"
    assert (await puller.pull_once(force=True)).updated == 0  # that version is current here


async def test_a_local_edit_the_upstream_refused_is_not_overwritten_by_a_pull_but_reviewed(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    puller, ada, _booked, ada_local, _appointment_local = await _pulled_ada(store, client)
    await _rename(store, ada_local, "Mineperson")
    fhir_peer.fault("status", status=422)  # a rule at the EHR refuses the edit: a dead letter
    assert (await UpdateSender(store, client, rng=random.Random(1)).send_once()).dead == 1
    theirs = {**ada, "name": [{"family": "Theirsperson"}]}
    assert (await client.put(f"Patient/{ada['id']}", json=theirs)).status_code == 200

    pulled = await puller.pull_once(force=True)
    # Before: the pull replaced the nurse's edit with the EHR's copy, silently.
    assert (pulled.held, pulled.updated) == (1, 0)
    assert (await store.read("Patient", ada_local, NURSE))["name"][0]["family"] == "Mineperson"
    queue = ReviewQueue(store)
    [item] = await queue.items()
    case = await queue.open(item.id, NURSE)
    assert case.mine["name"][0]["family"] == "Mineperson"
    assert case.theirs["name"][0]["family"] == "Theirsperson"
    assert case.reason is not None
    assert "injected fault: status 422" in case.reason  # the EHR's refusal, for the nurse
    assert item.base_version == ada["meta"]["versionId"]
    # Counted in the review queue now, not as a dead letter; a second pass opens nothing new.
    assert (await puller.pull_once(force=True)).held == 1
    assert len(await queue.items()) == 1
    conn = db.connect_sync(db_path)
    try:
        found = status.read_status(conn, datetime.now(UTC))
        assert (found.dead_total, found.reviews_open) == (0, 1)
    finally:
        conn.close()
    await queue.take_theirs(item.id, NURSE, theirs_version=item.theirs_version)
    assert (await store.read("Patient", ada_local, NURSE))["name"][0]["family"] == "Theirsperson"
    assert (await puller.pull_once(force=True)).held == 0


async def test_a_refused_edit_followed_by_one_that_landed_lets_the_pull_update_again(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    puller, ada, _booked, ada_local, _appointment_local = await _pulled_ada(store, client)
    sender = UpdateSender(store, client, rng=random.Random(1))
    await _rename(store, ada_local, "Typoperson")
    fhir_peer.fault("status", status=422)
    assert (await sender.send_once()).dead == 1
    await _rename(store, ada_local, "Mineperson")
    assert (await sender.send_once()).delivered == 1  # the nurse's correction landed
    landed = (await client.get(f"Patient/{ada['id']}")).json()
    theirs = {**landed, "name": [{"family": "Theirsperson"}]}
    assert (await client.put(f"Patient/{ada['id']}", json=theirs)).status_code == 200
    pulled = await puller.pull_once(force=True)
    # The refused edit was overtaken by one that landed: nothing to hold back or review.
    assert (pulled.held, pulled.updated) == (0, 1)
    assert await ReviewQueue(store).items() == []
    assert (await store.read("Patient", ada_local, NURSE))["name"][0]["family"] == "Theirsperson"


async def test_a_local_reading_about_a_pulled_patient_points_at_the_upstream_patient(
    store: Store, client: httpx.AsyncClient
) -> None:
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    ada = await _post(client, factories.patient())
    await _post(client, _appointment(ada, site))
    await _puller(store, client, site).pull_once()
    ada_local = await _local_id(store, "Patient", ada["id"])
    await store.create([factories.bp_observation(f"Patient/{ada_local}")], "service:devices")
    await Deliverer(store, client, max_entries=8).drain()
    [sent] = [e["resource"] for e in (await client.get("Observation")).json()["entry"]]
    assert sent["subject"]["reference"] == f"Patient/{ada['id']}"


async def test_a_record_carrying_our_identifier_under_another_upstream_id_is_not_stored_over_ours(
    store: Store, client: httpx.AsyncClient, db_path: Path
) -> None:
    """An EHR merge (or a copy) puts our identifier of a Patient made here on another record."""
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    [made] = await store.create([factories.patient(family="Ourperson")], NURSE)
    await Deliverer(store, client, max_entries=8).drain()
    ours = await store.read("Patient", made.logical_id, NURSE)
    [held_as] = [e["resource"] for e in (await client.get("Patient")).json()["entry"]]
    twin = factories.patient(family="Twinperson", mrn="T0009")
    twin["identifier"].append(
        {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{made.logical_id}"}
    )
    twin = await _post(client, twin)
    visit = await _post(client, _appointment(twin, site))

    result = await _puller(store, client, site).pull_once()
    assert (result.elsewhere, result.updated, result.error) == (1, 0, None)
    # Listed for staff (/sync, sync status), not only in the audit trail; once, however
    # often the pull meets it.
    await _puller(store, client, site).pull_once()
    [twin_seen] = await db.run_sync(store.connection, pull_twins.read_twins)
    assert (twin_seen.theirs, twin_seen.ours) == (
        f"Patient/{twin['id']}",
        f"Patient/{made.logical_id}",
    )
    # Before: the twin's content replaced ours, under our record's link to the other id.
    assert await store.read("Patient", made.logical_id, NURSE) == ours
    conn = sqlite3.connect(db_path)
    links = conn.execute("SELECT upstream_ref FROM upstream_links").fetchall()
    failures = conn.execute(
        "SELECT entity, detail FROM audit WHERE actor = ? AND outcome = 'failure'", (ACTOR,)
    ).fetchall()
    conn.close()
    assert (f"Patient/{twin['id']}",) not in links
    assert f"Patient/{held_as['id']}" in failures[0][1]
    assert failures[0][0] == f"Patient/{made.logical_id}"
    # A merge and a copy (perhaps of another person) look alike from here: what points at
    # the twin is not filed with our record, it keeps the twin's upstream reference.
    appointment = await store.read(
        "Appointment", await _local_id(store, "Appointment", visit["id"]), NURSE
    )
    actors = [p["actor"]["reference"] for p in appointment["participant"]]
    assert f"Patient/{twin['id']}" in actors
    assert f"Patient/{made.logical_id}" not in actors


async def _post_all(client: httpx.AsyncClient, resources: list[dict[str, Any]]) -> None:
    """Create ``resources`` upstream in batches (quicker than one request each)."""
    for start in range(0, len(resources), 200):
        entries = [
            {"resource": r, "request": {"method": "POST", "url": r["resourceType"]}}
            for r in resources[start : start + 200]
        ]
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": entries}
        response = await client.post("", json=bundle)
        assert response.status_code == 200, response.text
        assert all(e["response"]["status"].startswith("201") for e in response.json()["entry"])


async def test_a_run_of_equal_timestamps_longer_than_twenty_pages_is_passed_and_the_pull_settles(
    store: Store, client: httpx.AsyncClient, transport: Transport_, db_path: Path
) -> None:
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    patient = await _post(client, factories.patient())
    # One bulk load at the EHR: 1,100 appointments stamped with one instant; then one later.
    await _post_all(client, [_appointment(patient, site, updated=SAME_INSTANT)] * 1100)
    later = await _post(client, _appointment(patient, site, updated="2026-11-26T08:00:01.000Z"))
    transport.add_next_links = True  # offset links
    puller = _puller(store, client, site)  # 50 a page, 20 pages a pass
    passes = []
    for _ in range(5):
        passes.append(await puller.pull_once(force=True))
        if not passes[-1].more:
            break
    # Before: every pass walked the run from its start by 50s, got no further than the 20th
    # page, and said "more" — the sync loop asked again at once, for ever.
    assert (passes[-1].error, passes[-1].more) == (None, False)
    assert _count(db_path, "Appointment") == 1101
    await _local_id(store, "Appointment", later["id"])
    start = len(transport.requests)
    again = await puller.pull_once(force=True)
    assert (again.created, again.more, again.error) == (0, False, None)
    assert len(transport.requests) - start < 20


async def test_a_run_walked_by_next_links_resumes_where_the_last_pass_stopped(
    store: Store,
    client: httpx.AsyncClient,
    transport: Transport_,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pull_streams, "MAX_PAGE_SIZE", 2)
    site, later = await _one_instant(client, 15)
    transport.add_next_links = True
    puller = _puller(store, client, site, page_size=2, max_pages=4)
    passes = []
    for _ in range(6):
        passes.append(await puller.pull_once(force=True))
        if not passes[-1].more:
            break
    # Before: each pass began the run again at its first page and reached the same offset.
    assert [r.more for r in passes] == [True, True, False]
    assert all(r.error is None for r in passes)
    assert _count(db_path, "Appointment") == 16
    await _local_id(store, "Appointment", later["id"])


async def test_a_next_link_pointing_at_its_own_page_ends_the_pass_without_more(
    store: Store,
    client: httpx.AsyncClient,
    transport: Transport_,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pull_streams, "MAX_PAGE_SIZE", 4)
    site, _later = await _one_instant(client, 7)
    transport.add_next_links, transport.self_links = True, True
    puller = _puller(store, client, site, page_size=2)
    first = await puller.pull_once()
    start = len(transport.requests)
    again = await puller.pull_once(force=True)
    # Before: the link was followed to the end of max_pages, and the pass said "more".
    for result in (first, again):
        assert (result.more, result.error) == (
            False,
            f"Appointment Location/{site['id']}: over 4 resources share one lastUpdated",
        )
    assert _count(db_path, "Appointment") == 4
    assert len(transport.requests) - start < 10


async def _two_enrolled(
    store: Store, client: httpx.AsyncClient, clock: _Clock | None = None
) -> tuple[Puller, list[dict[str, Any]], dict[str, str]]:
    """Two patients with an appointment here, pulled and enrolled (a home cuff each), and a
    home reading each upstream: the puller, the patients upstream, upstream id → local id."""
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    patients = [
        await _post(client, factories.patient(family=family, mrn=mrn))
        for family, mrn in (("Adaperson", "T0001"), ("Bobperson", "T0002"))
    ]
    for patient in patients:
        await _post(client, _appointment(patient, site))
    puller = _puller(store, client, site, clock=clock or _Clock())
    await puller.pull_once()
    registry = DeviceRegistry(store)
    local = {}
    for index, patient in enumerate(patients):
        local[patient["id"]] = await _local_id(store, "Patient", patient["id"])
        await registry.register_device(
            f"home-bp-{index}",
            name="Home cuff",
            transport=Transport.HUB,
            profile="blood_pressure",
            address=None,
            setting=Setting.HOME,
            actor="user:admin",
        )
        await registry.assign_device(
            f"home-bp-{index}", "user:admin", patient_id=local[patient["id"]]
        )
        await _post(client, factories.bp_observation(f"Patient/{patient['id']}"))
    return puller, patients, local


def _refuse_patient_reads_naming(
    fhir_peer: FhirPeer, upstream_id: str
) -> Callable[[httpx.Request], Awaitable[None]]:
    """A ``before`` hook: the EHR answers 403 to any Patient read naming that patient."""

    async def refuse(request: httpx.Request) -> None:
        if request.url.path.endswith("/Patient") and upstream_id in request.url.params.get(
            "_id", ""
        ).split(","):
            fhir_peer.fault("status", status=403)

    return refuse


async def test_a_refused_patient_read_does_not_stop_the_other_enrolled_patients_home_readings(
    store: Store, client: httpx.AsyncClient, transport: Transport_, fhir_peer: FhirPeer
) -> None:
    clock = _Clock()
    puller, (ada, bob), local = await _two_enrolled(store, client, clock)
    transport.before = _refuse_patient_reads_naming(fhir_peer, ada["id"])  # restricted there
    result = await puller.pull_once(force=True)
    # Before: the refused refresh of Ada ended the pass; nobody's readings were pulled.
    assert (result.stopped_by, result.link_down, result.refused) == (None, False, 1)
    assert result.error == f"Patient/{ada['id']}: refused by the upstream (permanent)"
    for patient in (ada, bob):
        readings = await store.newest(f"Patient/{local[patient['id']]}", "Observation", NURSE)
        assert len(readings) == 1
    # Ada is asked for alone from now on (once her wait is over): the others' refresh is
    # one request, not refused.
    clock.advance(60)
    start = len(transport.requests)
    again = await puller.pull_once(force=True)
    assert again.refused == 1
    reads = [u for u in transport.requests[start:] if u.path.endswith("/Patient")]
    assert sorted(u.params["_id"] for u in reads) == sorted([ada["id"], bob["id"]])
    transport.before = None
    clock.advance(120)  # the wait doubled
    assert (await puller.pull_once(force=True)).refused == 0


async def test_an_appointment_page_whose_patient_is_refused_stores_the_rest_and_moves_on(
    store: Store,
    client: httpx.AsyncClient,
    transport: Transport_,
    fhir_peer: FhirPeer,
    db_path: Path,
) -> None:
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    patients = [await _post(client, factories.patient(mrn=f"T{i:04d}")) for i in range(3)]
    booked = [
        await _post(
            client,
            _appointment(p, site, updated=f"2026-11-26T08:00:0{i}.000Z")
            | {"identifier": [{"system": "urn:test:booking", "value": f"BOOK{i}X"}]},
        )
        for i, p in enumerate(patients)
    ]
    restricted = patients[1]
    transport.before = _refuse_patient_reads_naming(fhir_peer, restricted["id"])
    clock = _Clock()
    puller = _puller(store, client, site, page_size=2, clock=clock)
    result = await puller.pull_once()
    # Before: the page was refused whole, the cursor never moved, nothing was pulled, ever.
    assert (result.refused, result.stopped_by) == (1, None)
    assert _count(db_path, "Appointment") == 3
    assert _count(db_path, "Patient") == 2
    for patient in (patients[0], patients[2]):
        await _local_id(store, "Patient", patient["id"])
    # The restricted patient's appointment is kept; it names the patient as the EHR does.
    visit = await store.read(
        "Appointment", await _local_id(store, "Appointment", booked[1]["id"]), NURSE
    )
    assert f"Patient/{restricted['id']}" in [p["actor"]["reference"] for p in visit["participant"]]
    # The cursor moved on: later bookings are pulled (the refused patient asked again).
    newer = await _post(client, _appointment(patients[0], site))
    clock.advance(60)
    again = await puller.pull_once(force=True)
    assert (again.created, again.refused) == (1, 1)
    await _local_id(store, "Appointment", newer["id"])
    # The restriction lifted at the EHR: the patient is pulled on the next pass, though no
    # new appointment names them, and the kiosk finds them from the appointment's code.
    transport.before = None
    clock.advance(120)
    lifted = await puller.pull_once(force=True)
    assert (lifted.created, lifted.refused) == (1, 0)
    local = await _local_id(store, "Patient", restricted["id"])
    at_the_visit = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)
    found = await db.run_sync(
        store.connection, _find_appointment, store, normalise_code("BOOK1X"), at_the_visit, NURSE
    )
    assert found is not None
    assert found[1] == local


async def test_fixing_the_location_pulls_the_appointments_stamped_before_the_old_cursor(
    store: Store, client: httpx.AsyncClient, db_path: Path
) -> None:
    right = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    wrong = await _post(client, {"resourceType": "Location", "name": "Another clinic"})
    patient = await _post(client, factories.patient())
    for day in range(1, 6):  # booked here weeks ago
        await _post(client, _appointment(patient, right, updated=f"2026-11-0{day}T08:00:00.000Z"))
    await _post(client, _appointment(patient, wrong, updated="2026-11-20T08:00:00.000Z"))
    assert (await _puller(store, client, wrong).pull_once()).created == 2
    fixed = await _puller(store, client, right).pull_once()
    # Before: the wrong Location's cursor (20 November) was used, and nothing was pulled.
    assert (fixed.created, fixed.error) == (5, None)
    assert _count(db_path, "Appointment") == 6


async def test_patients_beyond_a_servers_cap_on_count_are_fetched_by_next_links(
    store: Store, client: httpx.AsyncClient, transport: Transport_, db_path: Path
) -> None:
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    group = [await _post(client, factories.patient(mrn=f"T{i:04d}")) for i in range(5)]
    visit = _appointment(group[0], site)
    visit["participant"] += [
        {"actor": {"reference": f"Patient/{p['id']}"}, "status": "accepted"} for p in group[1:]
    ]
    booked = await _post(client, visit)  # a group visit: five patients
    transport.cap, transport.add_next_links = 2, True  # asked for 5, it serves 2 a page
    result = await _puller(store, client, site).pull_once()
    # Before: only the first page of Patients was taken; three were never pulled.
    assert result.error is None
    assert _count(db_path, "Patient") == 5
    local = {await _local_id(store, "Patient", p["id"]) for p in group}
    stored = await store.read(
        "Appointment", await _local_id(store, "Appointment", booked["id"]), NURSE
    )
    patients = {p["actor"]["reference"] for p in stored["participant"]} - {f"Location/{site['id']}"}
    assert patients == {f"Patient/{i}" for i in local}


class _StampsToTheSecond(httpx.AsyncBaseTransport):
    """The real transport, but searches answer every resource's ``lastUpdated`` cut to the
    whole second, as a server that stamps to the second (the peer stamps milliseconds)."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        if request.method != "GET":
            return response
        await response.aread()
        body = orjson.loads(response.content)
        for entry in body.get("entry", []):
            meta = entry.get("resource", {}).get("meta", {})
            if "lastUpdated" in meta:
                meta["lastUpdated"] = meta["lastUpdated"][:19] + ".000Z"
        return httpx.Response(
            response.status_code, headers={"Content-Type": FHIR_JSON}, content=orjson.dumps(body)
        )


async def test_a_second_version_stamped_in_the_same_instant_is_pulled(
    store: Store, fhir_peer: FhirPeer
) -> None:
    async with httpx.AsyncClient(
        base_url=fhir_peer.base_url,
        headers={"Content-Type": FHIR_JSON},
        transport=_StampsToTheSecond(),
    ) as client:
        site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
        patient = await _post(client, factories.patient())
        booked = await _post(client, _appointment(patient, site))
        puller = _puller(store, client, site, overlap_s=0)
        assert (await puller.pull_once()).created == 2
        # Cancelled within the same second as the booking (retried until it is).
        while True:
            cancelled = {**booked, "status": "cancelled"}
            answer = (await client.put(f"Appointment/{booked['id']}", json=cancelled)).json()
            if answer["meta"]["lastUpdated"][:19] == booked["meta"]["lastUpdated"][:19]:
                break
            booked = await _post(client, _appointment(patient, site))
            assert (await puller.pull_once(force=True)).created == 1
        again = await puller.pull_once(force=True)
    # Before: taken for the same id at the cursor's instant; the booking stood here for ever.
    assert again.updated == 1
    local = await _local_id(store, "Appointment", booked["id"])
    assert (await store.read("Appointment", local, NURSE))["status"] == "cancelled"


async def test_a_walk_through_a_run_keeps_its_place_when_a_pass_fails(
    store: Store,
    client: httpx.AsyncClient,
    transport: Transport_,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pull_streams, "MAX_PAGE_SIZE", 2)
    site, later = await _one_instant(client, 15)
    transport.add_next_links = True
    puller = _puller(store, client, site, page_size=2, max_pages=4)
    assert (await puller.pull_once(force=True)).more
    # The link drops on the walk's next page: that pass fails.
    transport.fail_at = len(transport.requests) + 2
    assert (await puller.pull_once(force=True)).link_down
    transport.fail_at = None
    after_failure = len(transport.requests)
    passes = []
    for _ in range(6):
        passes.append(await puller.pull_once(force=True))
        if not passes[-1].more:
            break
    assert [r.more for r in passes] == [True, False]
    walked = [
        url.params.get("_offset")
        for url in transport.requests[after_failure:]
        if url.path.endswith("/Appointment") and "_offset" in url.params
    ]
    # Before: the failed pass dropped the walk's place, and the run was walked from its first
    # pages again (offsets 2 and 4 read a second time).
    assert walked == ["6", "8", "10", "12", "14"]
    assert _count(db_path, "Appointment") == 16
    await _local_id(store, "Appointment", later["id"])


async def test_a_refused_patient_is_asked_for_again_after_a_restart(
    store: Store,
    client: httpx.AsyncClient,
    transport: Transport_,
    fhir_peer: FhirPeer,
    db_path: Path,
) -> None:
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    restricted = await _post(client, factories.patient(mrn="T0001"))
    await _post(client, _appointment(restricted, site))
    transport.before = _refuse_patient_reads_naming(fhir_peer, restricted["id"])
    clock = _Clock()
    assert (await _puller(store, client, site, clock=clock).pull_once()).refused == 1
    assert _count(db_path, "Patient") == 0
    # The sync process restarts; the EHR has lifted the restriction meanwhile.
    transport.before = None
    clock.advance(60)
    restarted = await _puller(store, client, site, clock=clock).pull_once()
    # Before: the refused patient lived in memory only, and no new appointment named them.
    assert (restarted.created, restarted.refused) == (1, 0)
    await _local_id(store, "Patient", restricted["id"])


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00.000Z", "0001-01-01T00:30:00.000+01:00"])
async def test_a_cursor_at_year_one_does_not_end_the_pull(
    store: Store, client: httpx.AsyncClient, db_path: Path, stamp: str
) -> None:
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    patient = await _post(client, factories.patient())
    # A record migrated into the EHR with a placeholder stamp: a valid FHIR instant.
    await _post(client, _appointment(patient, site, updated=stamp))
    puller = _puller(store, client, site)
    assert (await puller.pull_once()).created == 2
    later = await _post(client, _appointment(patient, site))
    # Before: the ten minutes before that cursor are before year 1, and the OverflowError
    # escaped pull_once on every pass (the sync process exited and restarted, for ever).
    again = await puller.pull_once(force=True)
    assert (again.created, again.error) == (1, None)
    await _local_id(store, "Appointment", later["id"])
    assert _count(db_path, "Appointment") == 2


def _search_expired() -> httpx.Response:
    """HAPI's answer to a page of a search no longer in its cache."""
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "not-found", "diagnostics": "Search expired"}],
    }
    return httpx.Response(410, headers={"Content-Type": FHIR_JSON}, content=orjson.dumps(outcome))


def _proxy_not_found() -> httpx.Response:
    """A proxy's page for a path it does not pass on (not the FHIR server speaking)."""
    return httpx.Response(404, headers={"Content-Type": "text/html"}, content=b"<h1>Not Found</h1>")


@pytest.mark.parametrize("expired", [_search_expired, _proxy_not_found])
async def test_a_walk_whose_link_expired_upstream_starts_again_from_the_cursor(
    store: Store,
    client: httpx.AsyncClient,
    transport: Transport_,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    expired: Callable[[], httpx.Response],
) -> None:
    caplog.set_level(logging.WARNING, logger="sync_agent.pull_search")
    monkeypatch.setattr(pull_streams, "MAX_PAGE_SIZE", 2)
    site, later = await _one_instant(client, 15)
    transport.add_next_links, transport.search_ids = True, True
    puller = _puller(store, client, site, page_size=2, max_pages=4)
    assert (await puller.pull_once(force=True)).more  # the walk stops mid-way, link kept
    transport.expire_searches(expired)  # e.g. a link outage outlasting the server's cache
    passes = [await puller.pull_once(force=True) for _ in range(5)]
    # Before: the expired link was asked for again on every pass. A 410 refused the stream
    # for ever (nothing new pulled); a 404 stopped every pass ("check base_url"), so the
    # streams after it (home readings) were starved too.
    # Then (this session): counted as refused, so a pass of that one stream read as "the EHR
    # refused every search: check the scopes"; now a walk restarted, nothing refused.
    assert [(r.walks_restarted, r.refused, r.stopped_by) for r in passes[:2]] == [
        (1, 0, None),
        (0, 0, None),
    ]
    assert passes[0].error is not None
    assert "refused a next link" in passes[0].error
    assert "Search expired" not in passes[0].error  # its status, not the server's words
    status = expired().status_code
    assert f"pull: the upstream refused a next link of its own (HTTP {status}; " in caplog.text
    assert (passes[-1].error, passes[-1].more) == (None, False)
    assert _count(db_path, "Appointment") == 16
    await _local_id(store, "Appointment", later["id"])


def _ignoring(
    parameter: str, rtype: str = "Appointment"
) -> Callable[[httpx.Request], Awaitable[None]]:
    """A ``before`` hook: the server ignores ``parameter`` on searches of ``rtype``, as FHIR
    servers do by default with one they do not support (without ``_sort``, the peer pages
    in the order the resources were made)."""

    async def ignore(request: httpx.Request) -> None:
        if request.url.path.endswith(f"/{rtype}"):
            request.url = request.url.copy_remove_param(parameter)

    return ignore


@pytest.mark.parametrize(
    ("ignored", "stamps", "why"),
    [
        # Booked in one order, changed since in another: the server's order is not theirs.
        ("_sort", ["05", "01", "04", "02", "03", "06"], "did not sort the page"),
        # Sorted, but never from the cursor: page two starts where page one did.
        ("_lastUpdated", ["01", "02", "03", "04", "05", "06"], "did not filter the page"),
    ],
)
async def test_a_page_not_in_lastupdated_order_is_not_taken_and_the_cursor_stays(
    store: Store,
    client: httpx.AsyncClient,
    transport: Transport_,
    db_path: Path,
    caplog: pytest.LogCaptureFixture,
    ignored: str,
    stamps: list[str],
    why: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="sync_agent.pull_search")
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    patient = await _post(client, factories.patient())
    for day in stamps:
        await _post(client, _appointment(patient, site, updated=f"2026-11-{day}T08:00:00.000Z"))
    transport.before = _ignoring(ignored)
    puller = _puller(store, client, site, page_size=2)
    lenient = await puller.pull_once()
    # Before, ignoring _sort: the cursor took the newest stamp of each page, and the older
    # records of later pages were skipped for good, unreported. Ignoring _lastUpdated: every
    # pass read the EHR's appointments from the first, doubling the page to reach the end.
    # Then counted in refused (/sync: "check the scopes"); now apart, in unordered.
    assert (lenient.unordered, lenient.refused, lenient.stopped_by) == (1, 0, None)
    assert lenient.error is not None
    assert why in lenient.error
    assert f"pull of one Appointment stream: the upstream {why} by _lastUpdated" in caplog.text
    conn = sqlite3.connect(db_path)
    [(cursor,)] = conn.execute("SELECT since FROM pull_cursors").fetchall() or [(None,)]
    conn.close()
    assert cursor is None or cursor <= "2026-11-02T08:00:00.000Z"  # past no page refused
    transport.before = None  # the server mended
    mended = await puller.pull_once(force=True)
    assert (mended.unordered, mended.refused, mended.error) == (0, 0, None)
    assert _count(db_path, "Appointment") == 6


async def test_the_streams_searches_ask_the_server_to_be_strict(
    store: Store, client: httpx.AsyncClient, transport: Transport_
) -> None:
    puller, _patients, _local = await _two_enrolled(store, client)
    preferences: list[tuple[str, str | None]] = []

    async def note(request: httpx.Request) -> None:
        if "_sort" in request.url.params:
            preferences.append((request.url.path, request.headers.get("Prefer")))

    transport.before = note
    await puller.pull_once(force=True)
    # The Appointments' look-back and page from the cursor; each patient's first page of
    # readings. Before: no Prefer, and a server ignored what it did not support.
    searched = sorted(path.rpartition("/")[2] for path, _prefer in preferences)
    assert searched == ["Appointment", "Appointment", "Observation", "Observation"]
    assert {prefer for _path, prefer in preferences} == {"handling=strict"}


async def test_other_sites_appointments_from_a_server_ignoring_actor_are_passed_over(
    store: Store, client: httpx.AsyncClient, transport: Transport_, db_path: Path
) -> None:
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    other = await _post(client, {"resourceType": "Location", "name": "Another clinic"})
    ada = await _post(client, factories.patient(family="Adaperson"))
    eve = await _post(client, factories.patient(family="Eveperson", mrn="T0003"))
    ours = await _post(client, _appointment(ada, site, updated="2026-11-26T08:00:00.000Z"))
    # Ours too, naming the Location as a server may: absolute, with its version.
    absolute = _appointment(ada, site, updated="2026-11-26T08:00:00.500Z")
    absolute["participant"][1]["actor"]["reference"] = (
        f"{str(client.base_url).rstrip('/')}/Location/{site['id']}/_history/1"
    )
    also_ours = await _post(client, absolute)
    await _post(client, _appointment(eve, other, updated="2026-11-26T08:00:01.000Z"))
    transport.before = _ignoring("actor")
    puller = _puller(store, client, site)
    result = await puller.pull_once()
    # Before: every Appointment of the EHR was stored, its Patient fetched: another site's
    # patient on this box.
    assert (result.created, result.passed_over, result.error) == (3, 1, None)
    await _local_id(store, "Appointment", ours["id"])
    await _local_id(store, "Appointment", also_ours["id"])
    assert (_count(db_path, "Appointment"), _count(db_path, "Patient")) == (2, 1)
    conn = sqlite3.connect(db_path)
    links = {row[0] for row in conn.execute("SELECT upstream_ref FROM upstream_links")}
    [(since,)] = conn.execute("SELECT since FROM pull_cursors").fetchall()
    conn.close()
    assert f"Patient/{eve['id']}" not in links
    assert since == "2026-11-26T08:00:01.000Z"  # the cursor passed it
    again = await puller.pull_once(force=True)  # read again by the look-back: not counted
    assert (again.created, again.passed_over) == (0, 0)


async def test_an_appointment_naming_its_patient_by_the_ehrs_own_address_is_filed_with_it(
    store: Store, client: httpx.AsyncClient, db_path: Path
) -> None:
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    ada = await _post(client, factories.patient(family="Adaperson"))
    bob = await _post(client, factories.patient(family="Bobperson", mrn="T0002"))
    booked = _appointment(ada, site)
    base = str(client.base_url).rstrip("/")
    # The EHR's own address, its host and scheme spelled in capitals (the same address).
    booked["participant"][0]["actor"]["reference"] = (
        f"HTTP://{base.removeprefix('http://').upper().replace('/FHIR', '/fhir')}"
        f"/Patient/{ada['id']}"
    )
    # Another server's Patient with an id the EHR also has: another person.
    booked["participant"].append(
        {
            "actor": {"reference": f"https://directory.example/fhir/Patient/{bob['id']}"},
            "status": "accepted",
        }
    )
    made = await _post(client, booked)
    result = await _puller(store, client, site).pull_once()
    # Before: the Patient was not fetched, and the stored Appointment pointed at no record
    # here (the kiosk could not find the patient's visit).
    assert (result.created, result.error) == (2, None)
    ada_local = await _local_id(store, "Patient", ada["id"])
    appointment = await store.read(
        "Appointment", await _local_id(store, "Appointment", made["id"]), NURSE
    )
    actors = [p["actor"]["reference"] for p in appointment["participant"]]
    assert actors == [
        f"Patient/{ada_local}",
        f"Location/{site['id']}",
        f"https://directory.example/fhir/Patient/{bob['id']}",  # not ours: left as it is
    ]
    assert _count(db_path, "Patient") == 1  # Bob was not fetched by the tail of that address


async def test_other_patients_readings_from_a_server_ignoring_subject_are_passed_over(
    store: Store, client: httpx.AsyncClient, transport: Transport_, db_path: Path
) -> None:
    puller, patients, local = await _two_enrolled(store, client)
    outsider = await _post(client, factories.patient(family="Outsiderperson", mrn="T0009"))
    await _post(client, factories.bp_observation(f"Patient/{outsider['id']}"))
    transport.before = _ignoring("subject", "Observation")
    result = await puller.pull_once(force=True)
    # Before: each enrolled patient's search stored every reading of the EHR, the readings
    # of a patient nobody enrolled here too. Each stream passes over the two not its own.
    assert (result.created, result.passed_over, result.error) == (2, 4, None)
    assert _count(db_path, "Observation") == 2
    for patient in patients:
        readings = await store.newest(f"Patient/{local[patient['id']]}", "Observation", NURSE)
        assert len(readings) == 1


async def test_patients_not_asked_for_from_a_server_ignoring_id_are_passed_over(
    store: Store, client: httpx.AsyncClient, transport: Transport_, db_path: Path
) -> None:
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    ada = await _post(client, factories.patient(family="Adaperson"))
    await _post(client, factories.patient(family="Eveperson", mrn="T0003"))  # not booked here
    await _post(client, _appointment(ada, site))
    transport.before = _ignoring("_id", "Patient")
    transport.add_next_links = True  # one page per id asked for: Ada, then the next
    result = await _puller(store, client, site).pull_once()
    # Before: every Patient the answer held was stored.
    assert (result.created, result.passed_over, result.error) == (2, 1, None)
    assert _count(db_path, "Patient") == 1
    await _local_id(store, "Patient", ada["id"])


def _leave_out_of_patient_reads(upstream_id: str) -> Callable[[httpx.Request], Awaitable[None]]:
    """A ``before`` hook: the EHR answers Patient reads without that patient, 200 all the
    same (a record filtered from searches, a replica lagging behind)."""

    async def leave_out(request: httpx.Request) -> None:
        asked = request.url.params.get("_id", "").split(",")
        if request.url.path.endswith("/Patient") and upstream_id in asked:
            others = [i for i in asked if i != upstream_id] or ["nobody-by-that-id"]
            request.url = request.url.copy_set_param("_id", ",".join(others))

    return leave_out


async def test_a_patient_left_out_of_a_read_is_asked_for_again_until_it_comes(
    store: Store, client: httpx.AsyncClient, transport: Transport_, db_path: Path
) -> None:
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    ada, bob = [await _post(client, factories.patient(mrn=f"T000{i}")) for i in (1, 2)]
    code = {"identifier": [{"system": "urn:test:booking", "value": "BOOK2X"}]}
    await _post(client, _appointment(bob, site) | code)
    await _post(client, _appointment(ada, site))
    transport.before = _leave_out_of_patient_reads(bob["id"])
    clock = _Clock()
    puller = _puller(store, client, site, clock=clock)
    first = await puller.pull_once()
    assert (first.created, first.patients_missing, first.refused) == (3, 1, 0)
    # Asked for alone while missing (once a minute has passed): the others' read is not
    # held up by it.
    clock.advance(60)
    start = len(transport.requests)
    again = await puller.pull_once(force=True)
    assert again.patients_missing == 1
    reads = [u.params["_id"] for u in transport.requests[start:] if u.path.endswith("/Patient")]
    assert reads == [bob["id"]]
    transport.before = None  # the replica caught up
    # Before: only a refusal (4xx) was asked for again; the Appointment named an upstream
    # Patient nobody fetched again, and the kiosk could not find the patient.
    clock.advance(120)
    caught_up = await _puller(store, client, site, clock=clock).pull_once()  # after a restart
    assert (caught_up.created, caught_up.patients_missing) == (1, 0)
    assert _count(db_path, "Patient") == 2
    # The kiosk finds Bob from his appointment's code (the Appointment names him by the
    # EHR's id, which his link resolves).
    at_the_visit = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)
    found = await db.run_sync(
        store.connection, _find_appointment, store, normalise_code("BOOK2X"), at_the_visit, NURSE
    )
    assert found is not None
    assert found[1] == await _local_id(store, "Patient", bob["id"])


async def test_an_appointment_the_r4b_model_refuses_is_audited_logged_and_counted(
    store: Store, client: httpx.AsyncClient, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sync_agent.pull_import")
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    ada = await _post(client, factories.patient(family="Adaperson"))
    # An element R5 added (an R4 server with R5 backports may send it): R4B refuses it.
    r5 = _appointment(ada, site, updated="2026-11-26T08:00:00.000Z")
    refused = await _post(client, r5 | {"cancellationDate": "2026-11-29T10:00:00Z"})
    await _post(client, _appointment(ada, site, updated="2026-11-26T08:00:01.000Z"))
    puller = _puller(store, client, site)
    result = await puller.pull_once()
    # Before: dropped with no trace (counted among "skipped" with our own and the clinic's
    # readings), the cursor past it: the patient came, the kiosk had no appointment.
    assert (result.created, result.skipped, result.skipped_invalid) == (2, 1, 1)
    ada_local = await _local_id(store, "Patient", ada["id"])
    conn = sqlite3.connect(db_path)
    failures = conn.execute(
        "SELECT action, entity, detail, patient_key FROM audit WHERE actor = ? "
        "AND outcome = 'failure'",
        (ACTOR,),
    ).fetchall()
    [(since,)] = conn.execute("SELECT since FROM pull_cursors").fetchall()
    conn.close()
    assert failures == [
        (
            "sync",
            "Appointment",
            f"pulled Appointment/{refused['id']}: not stored, it fails validation "
            "(an element FHIR R4B does not define)",
            store.patient_key(f"Patient/{ada_local}"),
        )
    ]
    assert since == "2026-11-26T08:00:01.000Z"
    # The journal names the type and the reason's class; no id, nothing of the record.
    warnings = [r.getMessage() for r in caplog.records if r.name == "sync_agent.pull_import"]
    assert warnings == [
        "pull: 1 Appointment not stored, they fail validation (an element FHIR R4B does not "
        "define); audited, the stream goes on past them"
    ]
    # The look-back meets it again on the next pass: counted, not audited or logged again.
    again = await puller.pull_once(force=True)
    assert (again.created, again.skipped_invalid) == (0, 1)
    conn = sqlite3.connect(db_path)
    [(audited,)] = conn.execute(
        "SELECT count(*) FROM audit WHERE actor = ? AND outcome = 'failure'", (ACTOR,)
    ).fetchall()
    conn.close()
    assert audited == 1
    assert len([r for r in caplog.records if r.name == "sync_agent.pull_import"]) == 1


def _set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    with db.transaction_sync(conn):
        db.set_meta(conn, key, value)


async def test_a_patient_deleted_at_the_ehr_is_asked_for_less_and_less_often_across_restarts(
    store: Store, client: httpx.AsyncClient, transport: Transport_
) -> None:
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    await _post(client, _appointment({"id": "merged-away"}, site))
    gone = "Patient/merged-away"  # the EHR no longer holds it (deleted, or merged away)
    clock = _Clock()

    def reads() -> int:
        return sum(1 for url in transport.requests if url.path.endswith("/Patient"))

    assert (await _puller(store, client, site, clock=clock).pull_once()).patients_missing == 1
    waits = [60 * 2**n for n in range(11)] + [86_400, 86_400]  # a minute doubling to a day
    for wait in waits:
        clock.advance(wait - 1)
        puller = _puller(store, client, site, clock=clock)  # restarted: the wait is kept
        before = reads()
        early = await puller.pull_once()
        # Before: asked for alone on every pass (60 s) for ever, a GET and a warning each.
        assert (reads() - before, early.patients_missing) == (0, 0)
        clock.advance(1)
        due = await puller.pull_once(force=True)
        assert (reads() - before, due.patients_missing) == (1, 1)
    kept = await db.run_sync(store.connection, db.meta_value, "pull.refused_patients.ehr")
    assert orjson.loads(kept or "null")[gone]["misses"] == len(waits) + 1
    # "Sync now" asks at once, whatever the wait (a restriction just lifted at the EHR).
    before = reads()
    now_asked = await _puller(store, client, site, clock=clock).pull_once(force=True)
    assert (reads() - before, now_asked.patients_missing) == (1, 1)
    # The list releases before this one kept reads as due now.
    await db.run_sync(
        store.connection, _set_meta, "pull.refused_patients.ehr", orjson.dumps([gone]).decode()
    )
    before = reads()
    upgraded = await _puller(store, client, site, clock=clock).pull_once()
    assert (reads() - before, upgraded.patients_missing) == (1, 1)


class _DeepAppointment(httpx.AsyncBaseTransport):
    """The peer, with each Appointment of a search nested 600 levels deep in an extension
    (orjson reads it; the store refuses past fhir.MAX_JSON_DEPTH)."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        if request.method != "GET" or not request.url.path.endswith("/Appointment"):
            return response
        deep = b'{"x":' * 600 + b"1" + b"}" * 600
        body = (await response.aread()).replace(
            b'{"resourceType":"Appointment",',
            b'{"resourceType":"Appointment","modifierExtension":[{"url":"u","valueX":'
            + deep
            + b"}],",
        )
        headers = {
            k: v
            for k, v in response.headers.items()
            if k.lower() not in ("content-length", "content-encoding")
        }
        return httpx.Response(response.status_code, headers=headers, content=body)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_a_deeply_nested_pulled_resource_is_refused_not_a_crash(
    store: Store, client: httpx.AsyncClient, db_path: Path
) -> None:
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    ada = await _post(client, factories.patient(family="Adaperson"))
    await _post(client, _appointment(ada, site))
    async with httpx.AsyncClient(
        base_url=client.base_url, headers=dict(client.headers), transport=_DeepAppointment()
    ) as ehr:
        result = await _puller(store, ehr, site).pull_once()
    # Before: a RecursionError out of the pull (localising its references), which ended the
    # sync process, and the same page again after each restart.
    assert (result.skipped_invalid, result.error) == (1, None)
    assert _count(db_path, "Appointment") == 0


INTERNAL = "http://localhost:8080/fhir/R4"  # the path is the peer's: only the origin differs


@pytest.mark.parametrize("configured", [False, True])
async def test_an_ehr_writing_its_internal_address_is_followed_when_configured(
    store: Store,
    client: httpx.AsyncClient,
    transport: Transport_,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    configured: bool,
) -> None:
    # Behind a proxy that does not pass the public host on: a run of equal timestamps longer
    # than the largest page, with next links and the patient's reference at that address.
    monkeypatch.setattr(pull_streams, "MAX_PAGE_SIZE", 4)
    caplog.set_level(logging.WARNING, logger="sync_agent.pull_search")
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    patient = await _post(client, factories.patient())
    made = []
    for _ in range(7):
        booked = _appointment(patient, site, updated=SAME_INSTANT)
        booked["participant"][0]["actor"]["reference"] = f"{INTERNAL}/Patient/{patient['id']}"
        made.append(await _post(client, booked))
    transport.add_next_links, transport.link_origin = True, ("http", "localhost", 8080)
    upstream = UpstreamConfig(
        name="ehr",
        base_url=str(client.base_url),
        location=f"Location/{site['id']}",
        also_known_as=(INTERNAL,) if configured else (),
    )
    result = await Puller(store, client, upstream, page_size=2).pull_once()
    # Nothing ever goes to that address: our credentials would go with it.
    assert all(url.host != "localhost" for url in transport.requests)
    if not configured:
        # Not followed, and the journal says where the links pointed.
        assert result.stuck == 1
        assert _count(db_path, "Appointment") == 4
        assert _count(db_path, "Patient") == 0  # another server's, by its reference
        # The base it is at, as also_known_as takes it (the case below lists it so).
        assert f"pull: a next link at {INTERNAL} is not the upstream's address" in caplog.text
        return
    # Configured: its links are asked at the base URL, its references are its own.
    assert (result.error, result.stuck) == (None, 0)
    assert _count(db_path, "Appointment") == 7
    assert "next link at" not in caplog.text
    local = await _local_id(store, "Patient", patient["id"])
    for appointment in made:
        stored = await store.read(
            "Appointment", await _local_id(store, "Appointment", appointment["id"]), NURSE
        )
        assert stored["participant"][0]["actor"]["reference"] == f"Patient/{local}"
