"""Items the upstream fails whole bundles for, and answers that were lost, against the peer.

An item that makes the server (or a filter in front of it) fail every bundle it is in is
bisected down to itself; failing alone once more, the drain asks the server whether it is
up (``GET metadata``) and, if so, sets the item aside with a per-item backoff while the rest
flows. A lost answer's wait is kept in the row, so no process's "sync now" cuts it short.
"""

from __future__ import annotations

import json
import random
import sqlite3
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from appliance import db, fhir
from appliance.store import Lane, Store
from sync_agent.drain_result import DrainResult
from sync_agent.outbox_delivery import Deliverer
from sync_agent.outbox_failing import failing_items
from sync_agent.process import SyncLoop
from sync_agent.upstream import FHIR_JSON
from sync_agent.wakeups import Wake
from tests import factories
from tests.fhir_peer.peer import FhirPeer
from tests.sync_agent.test_faults import Clock, FailsBundlesWith, _loop_ctx, _rows

pytestmark = pytest.mark.peer

_FLAG = {"resourceType": "Flag", "status": "active", "code": {"text": "Zzpoison"}}


def _client(fhir_peer: FhirPeer, transport: httpx.AsyncBaseTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=fhir_peer.base_url,
        headers={"Content-Type": FHIR_JSON},
        timeout=5.0,
        transport=transport,
    )


def _deliverer(store: Store, client: httpx.AsyncClient, clock: Clock) -> Deliverer:
    return Deliverer(store, client, max_entries=8, rng=random.Random(1), clock=clock)


async def _rounds(deliverer: Deliverer, clock: Clock, rounds: int) -> list[DrainResult]:
    """Drains as the sync loop's rounds run them, each one past any per-item backoff."""
    results = []
    for _ in range(rounds):
        results.append(await deliverer.drain())
        clock.now += timedelta(minutes=10)
    return results


def _failing(db_path: Path) -> tuple[int, str | None]:
    conn = db.connect_sync(db_path)
    try:
        found = failing_items(conn, min_attempts=1)
    finally:
        conn.close()
    return found.count, found.type


@pytest.mark.parametrize("poisoned", [3, 4, 7])
async def test_alerts_the_server_fails_at_the_head_of_the_queue_are_set_aside_and_the_rest_flows(
    store: Store, fhir_peer: FhirPeer, db_path: Path, poisoned: int
) -> None:
    fhir_peer.reset()
    [pat] = await store.create([factories.patient()], "user:nurse1")
    ref = f"Patient/{pat.logical_id}"
    upstream = FailsBundlesWith(b"Zzpoison", 500)  # the EHR throws on every Flag
    clock = Clock()
    async with _client(fhir_peer, upstream) as client:
        deliverer = _deliverer(store, client, clock)
        assert (await deliverer.drain()).delivered == 1
        await store.create(
            [{**_FLAG, "subject": {"reference": ref}} for _ in range(poisoned)],
            "service:rpm",
            lane=Lane.ALERTS,
        )
        await store.create(
            [factories.bp_observation(ref, systolic=150 + i) for i in range(3)],
            "service:devices",
        )
        results = await _rounds(deliverer, clock, 15)
    # Before: with four or more, the fourth one failing alone was taken for an outage every
    # round (nothing written, link down) and the readings behind never went.
    assert sum(result.delivered for result in results) == 3
    assert fhir_peer.count("Observation") == 3
    assert not any(result.link_down for result in results[-5:])
    states = [(state, attempts > 0) for state, attempts, _ in _rows(db_path)]
    assert (
        states == [("delivered", True)] + [("pending", True)] * poisoned + [("delivered", True)] * 3
    )
    assert _failing(db_path) == (poisoned, "Flag")  # shown, never dead letters


async def test_a_patient_the_server_fails_with_only_its_own_readings_due_is_set_aside(
    store: Store, fhir_peer: FhirPeer, db_path: Path
) -> None:
    fhir_peer.reset()
    [patient] = await store.create([factories.patient(family="Zzpoison")], "user:nurse1")
    ref = f"Patient/{patient.logical_id}"
    await store.create(
        [factories.bp_observation(ref, systolic=120 + i) for i in range(2)], "service:devices"
    )
    clock = Clock()
    upstream = FailsBundlesWith(b"Zzpoison", 500)
    async with _client(fhir_peer, upstream) as client:
        results = await _rounds(_deliverer(store, client, clock), clock, 8)
    # Sent alone (its readings wait for it), failing alone again in the next round, it is
    # found at fault: the server answers its metadata. Before: every round link down, since
    # no other bundle could go through to tell, so the sync loop skipped the pull, the
    # updates and the audit export for good, and nothing was ever counted against it.
    assert [result.link_down for result in results] == [True] + [False] * 7
    assert [attempts > 0 for _, attempts, _ in _rows(db_path)] == [True, False, False]
    assert _failing(db_path) == (1, "Patient")
    assert upstream.posts == 8  # the Patient alone, once a round


async def test_an_item_set_aside_and_due_again_alone_does_not_put_the_round_link_down(
    store: Store, fhir_peer: FhirPeer, db_path: Path
) -> None:
    fhir_peer.reset()
    await store.create([factories.patient(family="Zzpoison")], "user:nurse1")
    await store.create([factories.patient(family="Other")], "user:nurse1")
    clock = Clock()
    upstream = FailsBundlesWith(b"Zzpoison", 502)
    async with _client(fhir_peer, upstream) as client:
        results = await _rounds(_deliverer(store, client, clock), clock, 8)
    # Before: once the other Patient had gone, the one due again alone had no next bundle
    # to tell it from an outage, and each round was link down.
    assert [(r.link_down, r.retry) for r in results[-4:]] == [(False, 1)] * 4
    assert [state for state, _, _ in _rows(db_path)] == ["pending", "delivered"]
    assert _rows(db_path)[0][1] >= 4


class LosesAnswers(httpx.AsyncBaseTransport):
    """The peer, with the answer to each POST lost after the server applied it."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.lose = True
        self.posts = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method == "POST":
            self.posts += 1
            if self.lose:
                await response.aread()
                raise httpx.ReadTimeout("answer lost", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_sync_now_in_another_process_leaves_the_wait_after_a_lost_answer(
    store: Store, fhir_peer: FhirPeer, db_path: Path
) -> None:
    fhir_peer.reset()
    await store.create([factories.patient()], "user:nurse1")
    clock = Clock()
    upstream = LosesAnswers()
    async with _client(fhir_peer, upstream) as client:
        lost = await _deliverer(store, client, clock).drain()
        assert (lost.ambiguous, lost.link_down) == (1, True)
        [(_, _, until)] = _rows(db_path)
        assert until is not None
        # `appliance sync once`, or the sync process after a restart: another Deliverer.
        # Before: it cleared the wait (kept in the first one's memory) and sent at once,
        # while the server might still be applying the first request.
        other = _deliverer(store, client, clock)
        clock.now += timedelta(seconds=1)
        assert await other.make_due() == 0
        assert _rows(db_path) == [("pending", 0, until)]
        assert (await other.drain()).bundles == 0
        assert upstream.posts == 1
        clock.now += timedelta(seconds=4)  # a request timeout (the client's, 5 s) on
        upstream.lose = False
        again = await other.drain()
    assert (again.delivered, again.existing) == (1, 1)  # already there: no duplicate
    assert fhir_peer.count("Patient") == 1


async def test_sync_now_cuts_a_set_aside_items_backoff_to_the_wait_after_its_lost_answer(
    store: Store, fhir_peer: FhirPeer, db_path: Path
) -> None:
    fhir_peer.reset()
    await store.create([factories.patient(family="Zzpoison")], "user:nurse1")
    clock = Clock()
    upstream = FailsBundlesWith(b"Zzpoison", 504)  # a gateway gives up on that one
    async with _client(fhir_peer, upstream) as client:
        deliverer = _deliverer(store, client, clock)
        for _ in range(6):  # bisected, then set aside: attempts counted, longer backoffs
            await deliverer.drain()
            clock.now += timedelta(minutes=10)
        await deliverer.drain()  # alone, a 504 again: the answer lost a moment ago
        [(_, attempts, retry_at)] = _rows(db_path)
        assert attempts >= 4
        clock.now += timedelta(seconds=1)
        await deliverer.make_due()
    # The backoff goes, the wait of a lost answer (a request timeout, 5 s) stays.
    [(_, _, at)] = _rows(db_path)
    assert at is not None
    assert retry_at is not None
    assert at < retry_at
    assert at == fhir.utc_text(clock.now + timedelta(seconds=4))


class BlackHole(httpx.AsyncBaseTransport):
    """A server that takes every request and never answers (every request times out)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, int]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        entries = len(json.loads(request.content)["entry"]) if request.content else 0
        self.requests.append((request.method, entries))
        raise httpx.ReadTimeout("no answer", request=request)


async def test_an_outage_of_timeouts_costs_at_most_two_requests_a_round_and_counts_nothing(
    store: Store, db_path: Path
) -> None:
    await store.create([factories.patient() for _ in range(10)], "user:nurse1")
    clock = Clock()
    hole = BlackHole()
    async with httpx.AsyncClient(base_url="http://ehr.invalid/", timeout=5.0, transport=hole) as c:
        deliverer = _deliverer(store, c, clock)
        per_round = []
        for _ in range(12):
            before = len(hole.requests)
            result = await deliverer.drain()
            assert result.link_down
            per_round.append(len(hole.requests) - before)
            clock.now += timedelta(seconds=6)  # past the wait after each lost answer
    # Before: up to four bundles a round, each a full request timeout. Now one bundle, and
    # once an item has been bisected down to itself, one question whether the server is up.
    assert max(per_round) <= 2, per_round
    conn = sqlite3.connect(db_path)
    try:
        counted = conn.execute(
            "SELECT count(*) FROM outbox WHERE attempts > 0 OR last_error IS NOT NULL"
        ).fetchone()[0]
    finally:
        conn.close()
    assert counted == 0


async def test_a_round_with_an_item_the_server_fails_alone_goes_on_to_the_pull(
    store: Store, fhir_peer: FhirPeer, tmp_path: Path
) -> None:
    fhir_peer.reset()
    await store.create([factories.patient(family="Zzpoison")], "user:nurse1")
    ctx = await _loop_ctx(tmp_path, store, fhir_peer.base_url, 60.0, location="Location/L1")
    async with _client(fhir_peer, FailsBundlesWith(b"Zzpoison", 500)) as client:
        loop = SyncLoop(ctx, client, ctx.config.sync.upstreams[0], rng=random.Random(1))
        rounds = [await loop._round(Wake.WORK) for _ in range(4)]
    # Before: every round ended at the drain (link down): no pull, and the status offline.
    assert [r.drained.link_down for r in rounds] == [True, False, False, False]
    assert all(r.pulled is not None for r in rounds[1:])
    assert ctx.status.get("online") is True


async def test_an_item_set_aside_goes_alone_after_a_restart_too(
    store: Store, fhir_peer: FhirPeer, db_path: Path
) -> None:
    fhir_peer.reset()
    await store.create([factories.patient(family="Zzpoison")], "user:nurse1")
    clock = Clock()
    upstream = FailsBundlesWith(b"Zzpoison", 500)
    async with _client(fhir_peer, upstream) as client:
        await _rounds(_deliverer(store, client, clock), clock, 3)
        assert _failing(db_path) == (1, "Patient")  # set aside
        [other] = await store.create([factories.patient(family="Other")], "user:nurse1")
        ref = f"Patient/{other.logical_id}"
        await store.create(
            [factories.bp_observation(ref, systolic=120 + i) for i in range(6)], "service:devices"
        )
        posts = upstream.posts
        # The sync process restarted: a new deliverer, nothing in its memory.
        first = await _deliverer(store, client, clock).drain()
    # Before: it went in the first bundle of eight again, which failed whole (link down, no
    # delivery), and the queue behind it was bisected anew over the rounds that followed.
    assert (first.link_down, first.delivered, first.retry) == (False, 7, 1)
    # It alone, then the other Patient, then its readings (they wait for its upstream id).
    assert upstream.posts - posts == 3
    assert [state for state, _, _ in _rows(db_path)] == ["pending"] + ["delivered"] * 7
