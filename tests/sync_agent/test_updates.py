"""Version-checked updates and the review queue, against the real Medplum FHIR peer."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from appliance import db
from appliance.config import UpstreamConfig
from appliance.store import ReviewPendingError, Store, UpstreamCopy
from sync_agent import dead_letters, status
from sync_agent.outbox_delivery import Deliverer
from sync_agent.pull import Puller
from sync_agent.review_queue import (
    ReviewChangedError,
    ReviewError,
    ReviewItem,
    ReviewQueue,
    ReviewState,
)
from sync_agent.updates import UpdateSender
from sync_agent.upstream import Failure
from tests import factories
from tests.fhir_peer.peer import FhirPeer
from tests.tamper import move_ciphertext

pytestmark = pytest.mark.peer

NURSE = "user:nurse1"
START = datetime(2026, 11, 26, 12, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def _through(
    fhir_peer: FhirPeer, client: httpx.AsyncClient, transport: httpx.AsyncBaseTransport
) -> httpx.AsyncClient:
    """A client like ``client`` whose requests go through ``transport`` (the peer behind a
    server behaviour the test forces)."""
    return httpx.AsyncClient(
        base_url=fhir_peer.base_url, headers=dict(client.headers), transport=transport
    )


def _sender(store: Store, client: httpx.AsyncClient, clock: Clock | None = None) -> UpdateSender:
    return UpdateSender(store, client, rng=random.Random(1), clock=clock or Clock())


async def _pulled_patient(
    store: Store, client: httpx.AsyncClient, family: str = "Upstreamperson", **extra: Any
) -> tuple[str, dict[str, Any]]:
    """A Patient on the peer (with ``extra`` elements), and its local copy's logical id."""
    response = await client.post("Patient", json={**factories.patient(family=family), **extra})
    upstream = response.json()
    [imported] = await store.import_upstream(
        [
            UpstreamCopy(
                f"Patient/{upstream['id']}",
                upstream["meta"]["versionId"],
                upstream["meta"]["lastUpdated"],
                upstream,
            )
        ],
        "service:sync",
    )
    assert imported.logical_id is not None
    return imported.logical_id, upstream


async def _edit(store: Store, logical_id: str, family: str) -> None:
    current = await store.read("Patient", logical_id, NURSE)
    await store.update(
        "Patient", logical_id, {**current, "name": [{"family": family, "given": ["Ada"]}]}, NURSE
    )


async def _upstream(client: httpx.AsyncClient, upstream: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = (await client.get(f"Patient/{upstream['id']}")).json()
    return body


async def _their_edit(client: httpx.AsyncClient, upstream: dict[str, Any], family: str) -> None:
    current = await _upstream(client, upstream)
    response = await client.put(
        f"Patient/{upstream['id']}",
        json={**current, "name": [{"family": family, "given": ["Ada"]}]},
    )
    assert response.status_code == 200


async def _edited(
    store: Store, client: httpx.AsyncClient
) -> tuple[str, dict[str, Any], Clock, UpdateSender]:
    """A pulled Patient edited here ("Editedperson"), and a sender on a clock the test moves."""
    logical_id, upstream = await _pulled_patient(store, client)
    await _edit(store, logical_id, "Editedperson")
    clock = Clock()
    return logical_id, upstream, clock, _sender(store, client, clock)


def _outbox(db_path: Path) -> list[tuple[str, str, str | None]]:
    conn = sqlite3.connect(db_path)
    rows = conn.execute(
        "SELECT kind, state, if_match FROM outbox WHERE kind = 'update' ORDER BY id"
    ).fetchall()
    conn.close()
    return rows


async def test_a_local_edit_goes_up_with_if_match_and_the_new_version_is_recorded(
    store: Store, client: httpx.AsyncClient, db_path: Path
) -> None:
    logical_id, upstream = await _pulled_patient(store, client)
    await _edit(store, logical_id, "Editedperson")
    result = await _sender(store, client).send_once()
    assert (result.delivered, result.conflicts, result.dead, result.error) == (1, 0, 0, None)
    now_upstream = await _upstream(client, upstream)
    assert now_upstream["name"][0]["family"] == "Editedperson"
    assert now_upstream["id"] == upstream["id"]  # updated in place, not created
    link = await store.upstream_link("Patient", logical_id)
    assert link is not None
    assert link.version_id == now_upstream["meta"]["versionId"] != upstream["meta"]["versionId"]
    assert _outbox(db_path) == [("update", "delivered", upstream["meta"]["versionId"])]
    # Nothing left: a second pass sends nothing.
    assert (await _sender(store, client).send_once()).delivered == 0
    # The next edit is checked against the version our update made.
    await _edit(store, logical_id, "Againperson")
    assert _outbox(db_path)[-1] == ("update", "pending", link.version_id)
    assert (await _sender(store, client).send_once()).delivered == 1


async def test_an_update_goes_without_the_narrative_of_the_version_before_the_edit(
    store: Store, client: httpx.AsyncClient
) -> None:
    narrative = {
        "status": "generated",
        "div": '<div xmlns="http://www.w3.org/1999/xhtml">Ada Upstreamperson</div>',
    }
    logical_id, upstream = await _pulled_patient(store, client, text=narrative)
    await _edit(store, logical_id, "Editedperson")
    sent: list[dict[str, Any]] = []

    async def keep_the_put(request: httpx.Request) -> None:
        if request.method == "PUT":
            sent.append(orjson.loads(request.content))

    client.event_hooks["request"].append(keep_the_put)
    try:
        assert (await _sender(store, client).send_once()).delivered == 1
    finally:
        client.event_hooks["request"].remove(keep_the_put)
    # Before: the old narrative went along ("Ada Upstreamperson", status generated), and
    # the EHR showed it over the new name.
    [put] = sent
    assert put["name"][0]["family"] == "Editedperson"
    assert "text" not in put
    assert "text" not in await _upstream(client, upstream)


async def test_a_concurrent_upstream_edit_puts_the_change_into_the_review_queue(
    store: Store, client: httpx.AsyncClient, db_path: Path
) -> None:
    logical_id, upstream = await _pulled_patient(store, client)
    await _edit(store, logical_id, "Mineperson")
    await _their_edit(client, upstream, "Theirsperson")
    result = await _sender(store, client).send_once()
    assert (result.delivered, result.conflicts) == (0, 1)
    # Nothing was overwritten on either side.
    assert (await _upstream(client, upstream))["name"][0]["family"] == "Theirsperson"
    assert (await store.read("Patient", logical_id, NURSE))["name"][0]["family"] == "Mineperson"
    assert _outbox(db_path) == [("update", "dead", upstream["meta"]["versionId"])]
    queue = ReviewQueue(store)
    [item] = await queue.items()
    assert (item.resource_type, item.logical_id, item.state) == ("Patient", logical_id, "open")
    assert item.upstream_ref == f"Patient/{upstream['id']}"
    assert item.base_version == upstream["meta"]["versionId"]
    case = await queue.open(item.id, NURSE)
    assert case.mine["name"][0]["family"] == "Mineperson"
    assert case.theirs["name"][0]["family"] == "Theirsperson"
    conn = sqlite3.connect(db_path)
    sealed = conn.execute("SELECT mine, theirs FROM review_queue").fetchone()
    assert all(b"person" not in bytes(blob) for blob in sealed)
    error = conn.execute("SELECT last_error FROM outbox WHERE kind = 'update'").fetchone()[0]
    assert store.keyring.unseal("outbox", "1", error).startswith("the upstream changed")
    opened = conn.execute(
        "SELECT actor, action FROM audit WHERE entity = ?", (f"review/{item.id}",)
    ).fetchall()
    conn.close()
    assert ("service:sync", "create") in opened
    assert (NURSE, "read") in opened
    # While it waits for the nurse, nobody edits over it.
    with pytest.raises(ReviewPendingError):
        await _edit(store, logical_id, "Thirdperson")


@pytest.mark.parametrize("status", [401, 302, 503])
async def test_a_conflict_whose_upstream_copy_cannot_be_read_now_waits_instead_of_dying(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path, status: int
) -> None:
    # The 412 is real; the GET of their copy that follows meets a lapsed token, a login page
    # or an outage. Before, anything but 408/429/5xx made the edit a dead letter, no review.
    logical_id, upstream = await _pulled_patient(store, client)
    await _edit(store, logical_id, "Mineperson")
    await _their_edit(client, upstream, "Theirsperson")

    async def fail_the_read_after_the_412(response: httpx.Response) -> None:
        if response.request.method == "PUT" and response.status_code == 412:
            fhir_peer.fault("status", status=status)

    client.event_hooks["response"].append(fail_the_read_after_the_412)
    clock = Clock()
    sender = _sender(store, client, clock)
    failed = await sender.send_once()
    assert (failed.dead, failed.conflicts, failed.retry) == (0, 0, 1)
    assert _outbox(db_path) == [("update", "pending", upstream["meta"]["versionId"])]
    client.event_hooks["response"].clear()
    clock.now += timedelta(hours=1)
    again = await sender.send_once()
    assert (again.dead, again.conflicts) == (0, 1)
    [item] = await ReviewQueue(store).items()
    assert (await ReviewQueue(store).open(item.id, NURSE)).mine["name"][0]["family"] == "Mineperson"


async def test_an_update_held_for_review_is_never_sent_again_from_the_dead_letters(
    store: Store, client: httpx.AsyncClient, db_path: Path
) -> None:
    logical_id, upstream = await _pulled_patient(store, client)
    await _edit(store, logical_id, "Mineperson")
    await _their_edit(client, upstream, "Theirsperson")
    assert (await _sender(store, client).send_once()).conflicts == 1
    conn = db.connect_sync(db_path)
    try:
        [(held,)] = conn.execute("SELECT id FROM outbox WHERE state = 'dead'").fetchall()
        now = datetime(2026, 11, 29, 9, tzinfo=UTC)
        everything = dead_letters.resend_dead_letters(conn, actor="user:admin1", now=now)
        this_one = dead_letters.resend_dead_letters(
            conn, actor="user:admin1", now=now, outbox_ids=[held]
        )
        assert everything == this_one == dead_letters.Resent((), (held,), ())
        assert conn.execute("SELECT state FROM outbox WHERE id = ?", (held,)).fetchone() == (
            "dead",
        )
        # Counted in the review queue, not as a dead letter (/sync, sync status, /metrics).
        found = status.read_status(conn, now)
        assert (found.dead_letters, found.dead_total, found.reviews_open) == ((), 0, 1)
        assert {lane.dead for lane in found.lanes} == {0}
    finally:
        conn.close()
    # The nurse's decision is the way on; the upstream's version was not overwritten.
    assert (await _upstream(client, upstream))["name"][0]["family"] == "Theirsperson"


async def test_keep_mine_requeues_the_update_against_the_upstreams_version(
    store: Store, client: httpx.AsyncClient, db_path: Path
) -> None:
    logical_id, upstream = await _pulled_patient(store, client)
    await _edit(store, logical_id, "Mineperson")
    await _their_edit(client, upstream, "Theirsperson")
    await _sender(store, client).send_once()
    queue = ReviewQueue(store)
    [item] = await queue.items()
    await queue.keep_mine(item.id, NURSE, theirs_version=item.theirs_version)
    assert await queue.items() == []
    [resolved] = await queue.items(ReviewState.KEPT_MINE)
    assert resolved.resolved_by == NURSE
    assert _outbox(db_path)[-1] == ("update", "pending", item.theirs_version)
    result = await _sender(store, client).send_once()
    assert result.delivered == 1
    assert (await _upstream(client, upstream))["name"][0]["family"] == "Mineperson"
    with pytest.raises(ReviewError):
        await queue.take_theirs(
            item.id, NURSE, theirs_version=item.theirs_version
        )  # already resolved


async def test_take_theirs_imports_the_upstreams_version_and_keeps_ours_in_the_history(
    store: Store, client: httpx.AsyncClient, db_path: Path
) -> None:
    logical_id, upstream = await _pulled_patient(store, client)
    await _edit(store, logical_id, "Mineperson")
    await _their_edit(client, upstream, "Theirsperson")
    await _sender(store, client).send_once()
    queue = ReviewQueue(store)
    [item] = await queue.items()
    await queue.take_theirs(item.id, NURSE, theirs_version=item.theirs_version)
    read = await store.read("Patient", logical_id, NURSE)
    assert read["name"][0]["family"] == "Theirsperson"
    assert read["id"] == logical_id
    history = await store.history("Patient", logical_id, NURSE)
    assert [h["name"][0]["family"] for h in history] == ["Upstreamperson", "Mineperson"]
    link = await store.upstream_link("Patient", logical_id)
    assert link is not None
    assert link.version_id == item.theirs_version
    assert [s for _, s, _ in _outbox(db_path)] == ["dead"]  # nothing re-queued
    assert (await _sender(store, client).send_once()).delivered == 0
    [resolved] = await queue.items(None)
    assert resolved.state is ReviewState.TOOK_THEIRS
    # A fresh edit is checked against their version and goes through.
    await _edit(store, logical_id, "Agreedperson")
    assert (await _sender(store, client).send_once()).delivered == 1


async def test_edits_waiting_for_their_creates_do_not_hold_back_the_updates_behind_them(
    store: Store, client: httpx.AsyncClient
) -> None:
    # A busy morning at the kiosk: 25 walk-ins registered and given a phone while the link
    # was down, so their creates (and these edits) wait; a pulled patient edited after them.
    for n in range(25):
        [pat] = await store.create([factories.patient(family=f"Walkin{chr(65 + n)}")], NURSE)
        await _edit(store, pat.logical_id, f"Walkinedit{chr(65 + n)}")
    logical_id, upstream = await _pulled_patient(store, client)
    await _edit(store, logical_id, "Editedperson")
    result = await _sender(store, client).send_once()
    # Before: the first 20 waiting edits filled every pass (delivered 0, waiting 20).
    assert (result.delivered, result.waiting, result.dead) == (1, 25, 0)
    assert (await _upstream(client, upstream))["name"][0]["family"] == "Editedperson"


async def test_an_edit_of_a_patient_whose_create_was_answered_without_a_location_goes_up(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    [pat] = await store.create([factories.patient()], NURSE)
    await Deliverer(store, client, max_entries=8, rng=random.Random(1)).drain()
    # The server took the create but its batch answer named no location (the deliverer
    # records it delivered all the same).
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE outbox SET upstream_ref = NULL WHERE kind = 'create'")
    conn.commit()
    conn.close()
    await _edit(store, pat.logical_id, "Editedperson")
    learnt = await _sender(store, client).send_once()
    # Before: dead-lettered at once, "not on the upstream (unknown)", and sent again it
    # died again; the EHR's later copy was then held back for ever with no review.
    assert (learnt.dead, learnt.waiting) == (0, 1)
    result = await _sender(store, client).send_once()
    assert (result.delivered, result.dead, result.conflicts) == (1, 0, 0)
    [upstream] = [e["resource"] for e in (await client.get("Patient")).json()["entry"]]
    assert upstream["name"][0]["family"] == "Editedperson"
    assert fhir_peer.count("Patient") == 1
    link = await store.upstream_link("Patient", pat.logical_id)
    assert link is not None
    assert link.upstream_ref == f"Patient/{upstream['id']}"


async def test_an_edit_of_a_patient_made_here_waits_for_its_create_then_goes_up(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    [pat] = await store.create([factories.patient()], NURSE)
    await _edit(store, pat.logical_id, "Editedperson")
    waiting = await _sender(store, client).send_once()
    assert (waiting.waiting, waiting.delivered) == (1, 0)
    deliverer = Deliverer(store, client, max_entries=8, rng=random.Random(1))
    assert (await deliverer.drain()).delivered == 1
    result = await _sender(store, client).send_once()
    assert (result.delivered, result.conflicts) == (1, 0)
    [upstream] = [e["resource"] for e in (await client.get("Patient")).json()["entry"]]
    assert upstream["name"][0]["family"] == "Editedperson"
    assert fhir_peer.count("Patient") == 1
    link = await store.upstream_link("Patient", pat.logical_id)
    assert link is not None
    assert (link.origin, link.version_id) == ("delivered", upstream["meta"]["versionId"])


async def test_history_not_offered_to_us_is_unknowable_not_a_credential_failure(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    [pat] = await store.create([factories.patient()], NURSE)
    await Deliverer(store, client, max_entries=8, rng=random.Random(1)).drain()
    await _edit(store, pat.logical_id, "Mineperson")
    fhir_peer.fault("status", status=403)  # GET Patient/x/_history: not for this client
    result = await _sender(store, client).send_once()
    # Before: "auth", and the edit waited for ever on a permission it will never get.
    assert (result.retry, result.error) == (0, None)
    assert result.conflicts == 1  # unknowable: a person compares the two versions
    [item] = await ReviewQueue(store).items()
    assert item.logical_id == pat.logical_id


class _KeepsNoHistory(httpx.AsyncBaseTransport):
    """The real transport, but ``_history`` lists only the current version, as a server
    that keeps no history does (Azure's ``no-version`` policy, history purged), and the
    methods sent are kept. ``paged``: it lists one version a page, its ``total`` saying
    how many there are."""

    def __init__(self, *, paged: bool = False) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._paged = paged
        self.methods: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.methods.append(request.method)
        response = await self._inner.handle_async_request(request)
        if request.method != "GET" or not request.url.path.endswith("/_history"):
            return response
        body = orjson.loads(await response.aread())
        body["total"] = len(body.get("entry", []))
        body["entry"] = body.get("entry", [])[:1]  # newest first, as FHIR lists them
        if not self._paged:
            del body["total"]
        return httpx.Response(
            response.status_code, headers=response.headers, content=orjson.dumps(body)
        )


async def _made_here_and_delivered(
    store: Store, client: httpx.AsyncClient
) -> tuple[str, dict[str, Any]]:
    """A Patient registered here, its create delivered (its version not read back)."""
    [pat] = await store.create([factories.patient()], NURSE)
    await Deliverer(store, client, max_entries=8, rng=random.Random(1)).drain()
    [upstream] = [e["resource"] for e in (await client.get("Patient")).json()["entry"]]
    return pat.logical_id, upstream


async def test_a_server_keeping_no_history_does_not_pass_the_ehrs_change_for_our_create(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    logical_id, upstream = await _made_here_and_delivered(store, client)
    # The EHR corrects the birth date; a nurse here changes the name on the copy made here.
    fixed = await client.put(
        f"Patient/{upstream['id']}", json={**upstream, "birthDate": "1961-09-04"}
    )
    assert fixed.status_code == 200
    await _edit(store, logical_id, "Mineperson")
    transport = _KeepsNoHistory()
    async with _through(fhir_peer, client, transport) as no_history:
        result = await _sender(store, no_history).send_once()
    # Before: the one version listed was taken for our create and the PUT overwrote the
    # EHR's correction with the old birth date, no review.
    assert (result.delivered, result.conflicts) == (0, 1)
    assert "PUT" not in transport.methods
    now_upstream = await _upstream(client, upstream)
    assert (now_upstream["birthDate"], now_upstream["name"][0]["family"]) == (
        "1961-09-04",
        "Testperson",
    )
    [item] = await ReviewQueue(store).items()
    case = await ReviewQueue(store).open(item.id, NURSE)
    assert (case.theirs["birthDate"], case.mine["name"][0]["family"]) == (
        "1961-09-04",
        "Mineperson",
    )


async def test_a_history_whose_total_counts_more_versions_than_our_create_is_a_change(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    logical_id, upstream = await _made_here_and_delivered(store, client)
    # Changed at the EHR and changed back: the newest version reads as our create did.
    for birth_date in ("1961-09-04", upstream["birthDate"]):
        current = await _upstream(client, upstream)
        await client.put(f"Patient/{upstream['id']}", json={**current, "birthDate": birth_date})
    await _edit(store, logical_id, "Mineperson")
    transport = _KeepsNoHistory(paged=True)  # one version on the page, total 3
    async with _through(fhir_peer, client, transport) as one_a_page:
        result = await _sender(store, one_a_page).send_once()
    # Before: one entry listed was enough; the total is no proof either way, so a person looks.
    assert (result.delivered, result.conflicts) == (0, 1)
    assert "PUT" not in transport.methods


async def test_on_a_server_keeping_no_history_our_unchanged_create_takes_the_edit(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    logical_id, upstream = await _made_here_and_delivered(store, client)
    await _edit(store, logical_id, "Mineperson")
    transport = _KeepsNoHistory()
    async with _through(fhir_peer, client, transport) as no_history:
        result = await _sender(store, no_history).send_once()
    assert (result.delivered, result.conflicts) == (1, 0)
    assert transport.methods == ["GET", "PUT"]  # its _history, then the update on it
    assert (await _upstream(client, upstream))["name"][0]["family"] == "Mineperson"


async def test_a_patient_made_here_and_changed_upstream_meanwhile_goes_to_review(
    store: Store, client: httpx.AsyncClient
) -> None:
    [pat] = await store.create([factories.patient()], NURSE)
    await Deliverer(store, client, max_entries=8, rng=random.Random(1)).drain()
    [upstream] = [e["resource"] for e in (await client.get("Patient")).json()["entry"]]
    await _their_edit(client, upstream, "Theirsperson")
    await _edit(store, pat.logical_id, "Mineperson")
    result = await _sender(store, client).send_once()
    assert (result.delivered, result.conflicts) == (0, 1)
    assert (await _upstream(client, upstream))["name"][0]["family"] == "Theirsperson"


async def test_a_lost_answer_is_resent_and_recognised_as_our_own_version(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    _logical_id, upstream, clock, sender = await _edited(store, client)
    fhir_peer.fault("close", after="response")  # the PUT lands, its answer is lost
    lost = await sender.send_once()
    assert (lost.delivered, lost.retry, lost.link_down) == (0, 1, False)
    assert (await _upstream(client, upstream))["name"][0]["family"] == "Editedperson"
    clock.now += timedelta(hours=1)
    again = await sender.send_once()  # 412 (the version moved), and it is ours: no review
    assert (again.delivered, again.conflicts) == (1, 0)
    assert await ReviewQueue(store).items() == []
    assert _outbox(db_path)[0][1] == "delivered"


async def test_a_lost_answer_then_a_later_edit_goes_on_our_own_version_not_to_review(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    logical_id, upstream, clock, sender = await _edited(store, client)
    fhir_peer.fault("close", after="response")  # the PUT lands, its answer is lost
    assert (await sender.send_once()).retry == 1
    ours = await _upstream(client, upstream)
    assert ours["name"][0]["family"] == "Editedperson"
    # Corrected again here meanwhile: the edit rides on the same outbox row.
    await _edit(store, logical_id, "Secondedit")
    clock.now += timedelta(hours=1)
    again = await sender.send_once()  # 412: the upstream holds our first edit, not this one
    # Before: a review of our edit against our own first one ("the upstream changed since
    # version 1"), whose "take theirs" dropped the second edit.
    assert (again.delivered, again.conflicts) == (1, 0)
    assert await ReviewQueue(store).items() == []
    now_upstream = await _upstream(client, upstream)
    assert now_upstream["name"][0]["family"] == "Secondedit"
    # Sent again on the version our first edit made, which is now the edit's base.
    assert _outbox(db_path) == [("update", "delivered", ours["meta"]["versionId"])]
    link = await store.upstream_link("Patient", logical_id)
    assert link is not None
    assert link.version_id == now_upstream["meta"]["versionId"]


async def test_an_upstream_change_after_our_lost_answer_still_goes_to_review(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    logical_id, upstream, clock, sender = await _edited(store, client)
    fhir_peer.fault("close", after="response")
    assert (await sender.send_once()).retry == 1
    await _their_edit(client, upstream, "Theirsperson")  # on top of our first edit
    await _edit(store, logical_id, "Secondedit")
    clock.now += timedelta(hours=1)
    result = await sender.send_once()
    assert (result.delivered, result.conflicts) == (0, 1)
    assert (await _upstream(client, upstream))["name"][0]["family"] == "Theirsperson"


async def test_a_transient_failure_retries_after_a_backoff(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    _logical_id, _, clock, sender = await _edited(store, client)
    fhir_peer.fault("status", status=503)
    failed = await sender.send_once()
    assert (failed.retry, failed.link_down) == (1, True)
    assert (await sender.send_once()).delivered == 0  # not due yet
    clock.now += timedelta(hours=1)
    assert (await sender.send_once()).delivered == 1


async def test_a_409_on_an_unchanged_upstream_version_is_retried_not_reviewed(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    _logical_id, upstream, clock, sender = await _edited(store, client)
    fhir_peer.fault("status", status=409)  # a lock at the EHR; nobody changed the record
    busy = await sender.send_once()
    assert (busy.conflicts, busy.dead, busy.retry) == (0, 0, 1)
    assert await ReviewQueue(store).items() == []
    clock.now += timedelta(hours=1)
    assert (await sender.send_once()).delivered == 1
    assert (await _upstream(client, upstream))["name"][0]["family"] == "Editedperson"


async def test_a_409_every_time_on_an_unchanged_version_goes_to_a_nurse_with_its_words(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    logical_id, _, clock, sender = await _edited(store, client)
    outcomes = []
    for _ in range(5):  # a rule at the EHR answers 409 every time
        fhir_peer.fault("status", status=409)
        outcomes.append(await sender.send_once())
        clock.now += timedelta(days=1)
    assert [(o.retry, o.conflicts) for o in outcomes] == [(1, 0)] * 4 + [(0, 1)]
    [item] = await ReviewQueue(store).items()
    assert item.logical_id == logical_id
    conn = sqlite3.connect(db_path)
    error = conn.execute("SELECT last_error FROM outbox WHERE kind = 'update'").fetchone()[0]
    conn.close()
    said = store.keyring.unseal("outbox", "1", error)
    assert said.startswith("refused 5 times with HTTP 409")
    assert "injected fault: status 409" in said


async def test_link_failures_before_a_409_do_not_count_as_its_refusals(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    _logical_id, _, clock, sender = await _edited(store, client)
    outcomes = []
    for fault in ["close"] * 4 + ["409"] * 5:  # four lost connections, then a lock
        if fault == "close":
            fhir_peer.fault("close")  # the request is not processed; no answer
        else:
            fhir_peer.fault("status", status=409)
        outcomes.append(await sender.send_once())
        clock.now += timedelta(days=1)
    # Before: the first 409 went to a nurse as "refused 5 times with HTTP 409".
    assert [(o.retry, o.conflicts) for o in outcomes] == [(1, 0)] * 8 + [(0, 1)]
    conn = sqlite3.connect(db_path)
    attempts, busy = conn.execute(
        "SELECT attempts, busy_409s FROM outbox WHERE kind = 'update'"
    ).fetchone()
    conn.close()
    assert (attempts, busy) == (9, 4)  # the fifth 409 opened the review


class _RefusesOneRecord(httpx.AsyncBaseTransport):
    """The real transport, but a PUT to one record is answered ``status`` with the server's
    OperationOutcome (a lock on that record, an access rule for it)."""

    def __init__(self, path: str, status: int) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._path = path
        self._status = status

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and request.url.path.endswith(self._path):
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "lock-error", "diagnostics": "locked"}],
            }
            return httpx.Response(self._status, json=outcome)
        return await self._inner.handle_async_request(request)


@pytest.mark.parametrize("refused", [409, 423, 403])
async def test_a_refusal_of_one_record_leaves_the_other_patients_edits_going(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path, refused: int
) -> None:
    locked, locked_upstream = await _pulled_patient(store, client, family="Lockedperson")
    other, other_upstream = await _pulled_patient(store, client, family="Otherperson")
    await _edit(store, locked, "Lockededit")  # first in the queue
    await _edit(store, other, "Otheredit")
    clock = Clock()
    async with _through(
        fhir_peer,
        client,
        _RefusesOneRecord(f"/Patient/{locked_upstream['id']}", refused),
    ) as ehr:
        result = await _sender(store, ehr, clock).send_once()
    # Before: the pass stopped at the locked record, the other edit was not tried, and the
    # sync status read offline (link_down) or the step backed off as if the link were down.
    assert (result.delivered, result.retry, result.conflicts, result.dead) == (1, 1, 0, 0)
    assert (result.link_down, result.stopped_by) == (False, None)
    assert (await _upstream(client, other_upstream))["name"][0]["family"] == "Otheredit"
    assert (await _upstream(client, locked_upstream))["name"][0]["family"] == "Lockedperson"
    assert _outbox(db_path)[0][1] == "pending"  # waits its backoff, then goes again
    assert await ReviewQueue(store).items() == []
    clock.now += timedelta(hours=1)
    assert (await _sender(store, client, clock).send_once()).delivered == 1
    assert (await _upstream(client, locked_upstream))["name"][0]["family"] == "Lockededit"


async def test_a_permanent_refusal_is_dead_lettered_with_the_servers_words(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    logical_id, _ = await _pulled_patient(store, client)
    await _edit(store, logical_id, "Editedperson")
    fhir_peer.fault("status", status=422)
    result = await _sender(store, client).send_once()
    assert (result.dead, result.conflicts) == (1, 0)
    conn = sqlite3.connect(db_path)
    error = conn.execute("SELECT last_error FROM outbox WHERE kind = 'update'").fetchone()[0]
    conn.close()
    assert "injected fault: status 422" in store.keyring.unseal("outbox", "1", error)
    assert await ReviewQueue(store).items() == []


async def test_an_address_that_does_not_take_the_update_leaves_it_waiting(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    _logical_id, upstream_ref, clock, sender = await _edited(store, client)
    fhir_peer.fault("status", status=302)  # a login page put in front of the EHR
    failed = await sender.send_once()
    # Before: a dead letter, though nothing was wrong with the edit.
    assert (failed.dead, failed.retry, failed.link_down) == (0, 1, False)
    assert (failed.error or "").startswith("endpoint: ")
    clock.now += timedelta(hours=1)
    assert (await sender.send_once()).delivered == 1
    assert (await _upstream(client, upstream_ref))["name"][0]["family"] == "Editedperson"


async def test_an_update_of_a_resource_the_upstream_no_longer_has_is_a_dead_letter(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    logical_id, _ = await _pulled_patient(store, client)
    await _edit(store, logical_id, "Editedperson")
    fhir_peer.fault("status", status=410)  # deleted (or merged) upstream: the server says so
    result = await _sender(store, client).send_once()
    assert (result.dead, result.retry, result.error) == (1, 0, None)


async def test_an_update_whose_stored_copy_fails_authentication_is_dead_lettered_not_stuck(
    store: Store, client: httpx.AsyncClient, db_path: Path
) -> None:
    broken, _ = await _pulled_patient(store, client, family="Brokenperson")
    fine, fine_upstream = await _pulled_patient(store, client, family="Fineperson")
    await _edit(store, broken, "Editedbroken")
    await _edit(store, fine, "Editedfine")
    move_ciphertext(db_path, broken, fine)
    # Before: TamperedDataError on every pass, holding back every update (and the pull).
    result = await _sender(store, client).send_once()
    assert (result.delivered, result.dead, result.error) == (1, 1, None)
    assert (await _upstream(client, fine_upstream))["name"][0]["family"] == "Editedfine"
    conn = sqlite3.connect(db_path)
    [(outbox_id, sealed)] = conn.execute(
        "SELECT id, last_error FROM outbox WHERE kind = 'update' AND state = 'dead'"
    ).fetchall()
    [audited] = conn.execute(
        "SELECT entity, detail FROM audit WHERE detail LIKE 'update: stored copy%'"
    ).fetchall()
    conn.close()
    assert "failed authentication" in store.keyring.unseal("outbox", str(outbox_id), sealed)
    assert audited == (
        f"Patient/{broken}",
        "update: stored copy failed authentication; not sent (dead letter)",
    )
    assert (await _sender(store, client).send_once()).dead == 0  # once, not at every pass


async def test_an_edit_made_while_the_update_is_on_the_wire_follows_it(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    logical_id, upstream = await _pulled_patient(store, client)
    await _edit(store, logical_id, "Firstedit")
    fhir_peer.fault("delay", delay_ms=400)
    sending = asyncio.create_task(_sender(store, client).send_once())
    await asyncio.sleep(0.2)
    await _edit(store, logical_id, "Secondedit")
    assert (await sending).delivered == 1
    link = await store.upstream_link("Patient", logical_id)
    assert link is not None
    assert _outbox(db_path)[-1] == ("update", "pending", link.version_id)
    assert (await _sender(store, client).send_once()).delivered == 1
    assert (await _upstream(client, upstream))["name"][0]["family"] == "Secondedit"


async def test_readings_keep_flowing_for_a_patient_whose_edit_waits_for_review(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    [pat] = await store.create([factories.patient()], NURSE)
    deliverer = Deliverer(store, client, max_entries=8, rng=random.Random(1))
    await deliverer.drain()
    [upstream] = [e["resource"] for e in (await client.get("Patient")).json()["entry"]]
    await _their_edit(client, upstream, "Theirsperson")
    await _edit(store, pat.logical_id, "Mineperson")
    assert (await _sender(store, client).send_once()).conflicts == 1
    await store.create([factories.bp_observation(f"Patient/{pat.logical_id}")], "service:devices")
    result = await deliverer.drain()
    assert (result.delivered, result.dead) == (1, 0)
    [sent] = [e["resource"] for e in (await client.get("Observation")).json()["entry"]]
    assert sent["subject"]["reference"] == f"Patient/{upstream['id']}"


class _NoMetaVersion(httpx.AsyncBaseTransport):
    """The real transport, but a read of one resource comes back without ``meta.versionId``
    (the version only in the ETag header), as some servers answer."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        if request.method != "GET" or request.url.path.count("/") != 4:  # /fhir/R4/Type/id
            return response
        body = orjson.loads(await response.aread())
        body.get("meta", {}).pop("versionId", None)
        return httpx.Response(
            response.status_code, headers=response.headers, content=orjson.dumps(body)
        )


async def test_a_conflict_read_whose_version_is_only_in_the_etag_keeps_it_for_keep_mine(
    store: Store, fhir_peer: FhirPeer, client: httpx.AsyncClient, db_path: Path
) -> None:
    logical_id, upstream = await _pulled_patient(store, client)
    await _edit(store, logical_id, "Mineperson")
    await _their_edit(client, upstream, "Theirsperson")
    their_version = (await client.get(f"Patient/{upstream['id']}")).json()["meta"]["versionId"]
    async with _through(fhir_peer, client, _NoMetaVersion()) as bare_meta:
        assert (await _sender(store, bare_meta).send_once()).conflicts == 1
        queue = ReviewQueue(store)
        [item] = await queue.items()
        # Before: None (read from the body only), so "keep mine" went without If-Match.
        assert item.theirs_version == their_version
        await queue.keep_mine(item.id, NURSE, theirs_version=item.theirs_version)
        assert _outbox(db_path)[-1] == ("update", "pending", their_version)
        assert (await _sender(store, bare_meta).send_once()).delivered == 1
    assert (await _upstream(client, upstream))["name"][0]["family"] == "Mineperson"


class _PutAnsweredBare(httpx.AsyncBaseTransport):
    """The real transport, but a PUT that succeeds is answered 200 with no body and no ETag,
    as some servers do (``Prefer: return=minimal`` their default); ``location``: with the
    version only in a ``Content-Location`` (``…/_history/<version>``)."""

    def __init__(self, *, location: bool) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._location = location

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        if request.method != "PUT" or response.status_code != 200:
            return response
        made = orjson.loads(await response.aread())
        headers = {}
        if self._location:
            where = f"{request.url}/_history/{made['meta']['versionId']}"
            headers["Content-Location"] = where
        return httpx.Response(200, headers=headers)


async def test_a_put_answered_with_its_version_only_in_content_location_keeps_it(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    logical_id, upstream = await _pulled_patient(store, client)
    await _edit(store, logical_id, "Editedperson")
    async with _through(
        fhir_peer,
        client,
        _PutAnsweredBare(location=True),
    ) as bare:
        assert (await _sender(store, bare).send_once()).delivered == 1
    link = await store.upstream_link("Patient", logical_id)
    assert link is not None
    # Before: None (read from the body and the ETag only), the known version lost with it.
    assert link.version_id == (await _upstream(client, upstream))["meta"]["versionId"]


async def test_after_a_put_answered_with_no_version_the_next_edit_goes_on_what_we_sent(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    logical_id, upstream = await _pulled_patient(store, client)
    await _edit(store, logical_id, "Editedperson")
    async with _through(
        fhir_peer,
        client,
        _PutAnsweredBare(location=False),
    ) as bare:
        assert (await _sender(store, bare).send_once()).delivered == 1
        link = await store.upstream_link("Patient", logical_id)
        assert link is not None
        assert link.version_id is None  # unknown: the version the PUT went on is stale
        await _edit(store, logical_id, "Againperson")
        result = await _sender(store, bare).send_once()
    # Before: every later edit went to a nurse, though only this box had changed the record.
    assert (result.delivered, result.conflicts) == (1, 0)
    assert (await _upstream(client, upstream))["name"][0]["family"] == "Againperson"


async def test_after_a_put_answered_with_no_version_an_ehr_change_still_goes_to_review(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    logical_id, upstream = await _pulled_patient(store, client)
    await _edit(store, logical_id, "Editedperson")
    async with _through(
        fhir_peer,
        client,
        _PutAnsweredBare(location=False),
    ) as bare:
        assert (await _sender(store, bare).send_once()).delivered == 1
        await _their_edit(client, upstream, "Theirsperson")
        await _edit(store, logical_id, "Againperson")
        result = await _sender(store, bare).send_once()
    assert (result.delivered, result.conflicts) == (0, 1)
    assert (await _upstream(client, upstream))["name"][0]["family"] == "Theirsperson"


async def newer_version_pulled_into_the_review(
    store: Store, client: httpx.AsyncClient, upstream: dict[str, Any], family: str
) -> None:
    """The EHR changes the record again while a nurse has its review open, and the next pull
    (a new booking of the patient at this site brings the Patient along) puts that version
    into the review."""
    await _their_edit(client, upstream, family)
    site = (await client.post("Location", json={"resourceType": "Location", "name": "Here"})).json()
    booked = await client.post(
        "Appointment",
        json={
            "resourceType": "Appointment",
            "status": "booked",
            "start": "2026-11-30T15:00:00Z",
            "end": "2026-11-30T15:30:00Z",
            "participant": [
                {"actor": {"reference": f"Patient/{upstream['id']}"}, "status": "accepted"},
                {"actor": {"reference": f"Location/{site['id']}"}, "status": "accepted"},
            ],
        },
    )
    assert booked.status_code == 201
    config = UpstreamConfig(
        name="ehr", base_url=str(client.base_url), location=f"Location/{site['id']}"
    )
    assert (await Puller(store, client, config).pull_once(force=True)).held == 1


def _decisions(db_path: Path, review_id: int) -> list[str]:
    conn = sqlite3.connect(db_path)
    try:
        rows = conn.execute(
            "SELECT detail FROM audit WHERE entity = ? AND action = 'update'",
            (f"review/{review_id}",),
        ).fetchall()
    finally:
        conn.close()
    return [str(detail) for (detail,) in rows]


async def _shown_then_changed_upstream(
    store: Store, client: httpx.AsyncClient
) -> tuple[str, dict[str, Any], ReviewItem, ReviewItem]:
    """A conflict as a nurse was shown it (their "Theirsperson"), and as it is after a pull
    put the EHR's next version ("Laterperson") into it while the page was open."""
    logical_id, upstream = await _pulled_patient(store, client)
    await _edit(store, logical_id, "Mineperson")
    await _their_edit(client, upstream, "Theirsperson")
    assert (await _sender(store, client).send_once()).conflicts == 1
    queue = ReviewQueue(store)
    [shown] = await queue.items()
    assert (await queue.open(shown.id, NURSE)).theirs["name"][0]["family"] == "Theirsperson"
    await newer_version_pulled_into_the_review(store, client, upstream, "Laterperson")
    [now] = await queue.items()
    assert now.theirs_version != shown.theirs_version
    return logical_id, upstream, shown, now


async def test_keep_mine_on_an_upstream_version_no_longer_in_the_review_is_refused(
    store: Store, client: httpx.AsyncClient, db_path: Path
) -> None:
    logical_id, upstream, shown, now = await _shown_then_changed_upstream(store, client)
    link = await store.upstream_link("Patient", logical_id)
    queue = ReviewQueue(store)
    with pytest.raises(ReviewChangedError):
        await queue.keep_mine(shown.id, NURSE, theirs_version=shown.theirs_version)
    # Before: queued with If-Match on the version nobody saw; the PUT overwrote it unseen.
    assert await queue.items() == [now]
    assert [state for _, state, _ in _outbox(db_path)] == ["dead"]
    assert await store.upstream_link("Patient", logical_id) == link
    assert _decisions(db_path, shown.id) == []
    assert (await _sender(store, client).send_once()).delivered == 0
    assert (await _upstream(client, upstream))["name"][0]["family"] == "Laterperson"
    # Decided again on the version the review shows now, it goes against that one.
    await queue.keep_mine(now.id, NURSE, theirs_version=now.theirs_version)
    assert _outbox(db_path)[-1] == ("update", "pending", now.theirs_version)
    assert (await _sender(store, client).send_once()).delivered == 1
    assert (await _upstream(client, upstream))["name"][0]["family"] == "Mineperson"


async def test_take_theirs_of_an_upstream_version_no_longer_in_the_review_is_refused(
    store: Store, client: httpx.AsyncClient, db_path: Path
) -> None:
    logical_id, _upstream_copy, shown, now = await _shown_then_changed_upstream(store, client)
    queue = ReviewQueue(store)
    with pytest.raises(ReviewChangedError):
        await queue.take_theirs(shown.id, NURSE, theirs_version=shown.theirs_version)
    assert await queue.items() == [now]
    assert (await store.read("Patient", logical_id, NURSE))["name"][0]["family"] == "Mineperson"
    assert _decisions(db_path, shown.id) == []
    await queue.take_theirs(now.id, NURSE, theirs_version=now.theirs_version)
    assert (await store.read("Patient", logical_id, NURSE))["name"][0]["family"] == "Laterperson"


def _content(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("id", "meta", "text")}


async def test_take_theirs_of_the_very_version_our_edit_was_based_on_makes_it_the_local_copy(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    logical_id, upstream, clock, sender = await _edited(store, client)
    for _ in range(5):  # a rule at the EHR answers 409 every time; their copy never changes
        fhir_peer.fault("status", status=409)
        await sender.send_once()
        clock.now += timedelta(days=1)
    queue = ReviewQueue(store)
    [item] = await queue.items()
    assert item.theirs_version == item.base_version == upstream["meta"]["versionId"]
    await queue.take_theirs(item.id, NURSE, theirs_version=item.theirs_version)
    # Before: marked "took the upstream version", but our edit stayed here and nothing was
    # pending, so the two copies stayed apart for good.
    here = await store.read("Patient", logical_id, NURSE)
    assert _content(here) == _content(await _upstream(client, upstream))
    assert here["name"][0]["family"] == "Upstreamperson"
    history = await store.history("Patient", logical_id, NURSE)
    assert history[-1]["name"][0]["family"] == "Editedperson"
    link = await store.upstream_link("Patient", logical_id)
    assert link is not None
    assert link.version_id == item.theirs_version
    assert [state for _, state, _ in _outbox(db_path)] == ["dead"]
    assert (await queue.items(None))[0].state is ReviewState.TOOK_THEIRS


async def test_a_review_shows_an_edit_saved_while_the_refused_update_was_on_the_wire(
    store: Store, client: httpx.AsyncClient, db_path: Path
) -> None:
    logical_id, upstream = await _pulled_patient(store, client)
    await _edit(store, logical_id, "Firstedit")
    await _their_edit(client, upstream, "Theirsperson")
    edited: list[str] = []

    async def edit_again_while_the_put_is_on_the_wire(request: httpx.Request) -> None:
        if request.method == "PUT" and not edited:
            edited.append(request.method)
            await _edit(store, logical_id, "Secondedit")

    client.event_hooks["request"].append(edit_again_while_the_put_is_on_the_wire)
    try:
        assert (await _sender(store, client).send_once()).conflicts == 1
    finally:
        client.event_hooks["request"].remove(edit_again_while_the_put_is_on_the_wire)
    assert edited
    queue = ReviewQueue(store)
    [item] = await queue.items()
    # Before: the version read before the PUT ("Firstedit"), so taking theirs discarded the
    # later correction unseen.
    assert (await queue.open(item.id, NURSE)).mine["name"][0]["family"] == "Secondedit"
    assert (await store.read("Patient", logical_id, NURSE))["name"][0]["family"] == "Secondedit"


# -- what this box sent, and what it did not ---------------------------------------------------


async def _pull(store: Store, upstream: dict[str, Any]) -> None:
    """The pull bringing the upstream's current version here."""
    copy = UpstreamCopy(
        f"Patient/{upstream['id']}",
        upstream["meta"]["versionId"],
        upstream["meta"]["lastUpdated"],
        upstream,
    )
    await store.import_upstream([copy], "service:sync")


async def test_an_ehr_undo_back_to_what_we_once_sent_is_not_taken_for_our_own_put(
    store: Store, client: httpx.AsyncClient
) -> None:
    logical_id, upstream = await _pulled_patient(store, client, family="Original")  # v1
    clock = Clock()
    await _edit(store, logical_id, "Edited")
    assert (await _sender(store, client, clock).send_once()).delivered == 1  # v2: ours
    await _their_edit(client, upstream, "Wrong")  # v3, the EHR's
    await _pull(store, await _upstream(client, upstream))
    await _their_edit(client, upstream, "Edited")  # v4: the EHR's undo, back to what we sent
    current = await store.read("Patient", logical_id, NURSE)  # "Wrong", on v3
    await store.update("Patient", logical_id, {**current, "birthDate": "1970-01-02"}, NURSE)
    clock.now += timedelta(hours=1)
    result = await _sender(store, client, clock).send_once()
    # Before: v4 matched a body some row of ours had once sent, the edit went on it, and the
    # EHR's undo was undone ("Wrong" again) with no review.
    assert (result.delivered, result.conflicts) == (0, 1)
    assert (await _upstream(client, upstream))["name"][0]["family"] == "Edited"


async def test_a_refused_put_then_take_theirs_then_the_same_change_at_the_ehr_is_reviewed(
    store: Store, client: httpx.AsyncClient
) -> None:
    logical_id, upstream = await _pulled_patient(store, client, family="Original")  # v1
    clock = Clock()
    await _their_edit(client, upstream, "Theirs")  # v2
    await _edit(store, logical_id, "Mine")  # on v1
    assert (await _sender(store, client, clock).send_once()).conflicts == 1  # 412: review
    queue = ReviewQueue(store)
    [item] = await queue.items()
    await queue.take_theirs(item.id, NURSE, theirs_version=item.theirs_version)
    await _their_edit(client, upstream, "Mine")  # v3: the EHR's own change, as ours was
    current = await store.read("Patient", logical_id, NURSE)  # "Theirs", on v2
    await store.update("Patient", logical_id, {**current, "birthDate": "1970-01-02"}, NURSE)
    clock.now += timedelta(hours=1)
    result = await _sender(store, client, clock).send_once()
    # Before: v3 matched the body of our refused PUT, and the edit went on it unreviewed.
    assert (result.delivered, result.conflicts) == (0, 1)
    assert (await _upstream(client, upstream))["name"][0]["family"] == "Mine"


async def test_an_additional_narrative_goes_back_with_the_edit(
    store: Store, client: httpx.AsyncClient
) -> None:
    note = '<div xmlns="http://www.w3.org/1999/xhtml">Interpreter required (Amharic)</div>'
    logical_id, upstream = await _pulled_patient(
        store, client, text={"status": "additional", "div": note}
    )
    await _edit(store, logical_id, "Editedperson")
    assert (await _sender(store, client).send_once()).delivered == 1
    # It says what the data does not: left out of the PUT, it was deleted at the EHR.
    assert (await _upstream(client, upstream))["text"] == {"status": "additional", "div": note}


class _NoWriteScope(httpx.AsyncBaseTransport):
    """The peer behind a token without write access: every PUT refused 403."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.puts = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "PUT":
            return await self._inner.handle_async_request(request)
        self.puts += 1
        issue = {"severity": "error", "code": "forbidden", "diagnostics": "scope not granted"}
        return httpx.Response(403, json={"resourceType": "OperationOutcome", "issue": [issue]})

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.mark.parametrize("edits", [1, 10])
async def test_403s_for_every_update_stop_the_pass_and_hold_the_step_back(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, edits: int
) -> None:
    for n in range(edits):
        logical_id, _ = await _pulled_patient(store, client, family=f"Person{n}")
        await _edit(store, logical_id, f"Edited{n}")
    transport = _NoWriteScope()
    async with _through(fhir_peer, client, transport) as ehr:
        result = await _sender(store, ehr).send_once()
    # Before: a 403 was one record's refusal, always: each pass sent every due edit, and
    # nothing held the step back (nor said "credentials") for as long as the scope lacked.
    assert transport.puts == min(edits, 3)
    assert result.link_down is False
    assert result.refused  # every update the pass sent: a 403
    assert result.stopped_by is not None  # what holds the step back, as "auth"
    assert result.stopped_by.failure is Failure.AUTH
    assert "HTTP 403" in result.stopped_by.message


@pytest.mark.parametrize("behind_a_proxy", [False, True])
async def test_take_theirs_stores_the_ehrs_references_to_itself_as_the_pull_does(
    store: Store, client: httpx.AsyncClient, behind_a_proxy: bool
) -> None:
    logical_id, upstream = await _pulled_patient(store, client)
    await _edit(store, logical_id, "Mineperson")
    theirs = await _upstream(client, upstream)
    theirs["name"] = [{"family": "Theirsperson", "given": ["Ada"]}]
    base = str(client.base_url).rstrip("/")
    # Behind a proxy that does not pass the host on, the EHR writes its internal address.
    internal = "http://localhost:8080/fhir/R4"
    at = internal if behind_a_proxy else base
    theirs["managingOrganization"] = {"reference": f"{at}/Organization/org-1"}
    assert (await client.put(f"Patient/{upstream['id']}", json=theirs)).status_code == 200
    sender = UpdateSender(store, client, rng=random.Random(1), also_known_as=(internal,))
    assert (await sender.send_once()).conflicts == 1
    queue = ReviewQueue(store)
    [item] = await queue.items()
    await queue.take_theirs(item.id, NURSE, theirs_version=item.theirs_version)
    stored = await store.read("Patient", logical_id, NURSE)
    # Before: stored absolute, as no pulled copy is (the pull makes them relative).
    assert stored["managingOrganization"] == {"reference": "Organization/org-1"}
