"""The sync loop's rounds as the status shows them, against the real Medplum FHIR peer."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance import audit, db
from appliance.runtime import ProcessContext, write_heartbeat
from appliance.store import Store
from sync_agent import balp, process
from sync_agent.pacing import Pacing
from sync_agent.process import SyncLoop
from sync_agent.status import read_status
from sync_agent.status_figures import SyncStatus
from sync_agent.upstream import FHIR_JSON
from tests import factories
from tests.fhir_peer.peer import FhirPeer
from tests.sync_agent.test_faults import Longest, _loop_ctx
from tests.sync_agent.test_pull import _appointment, _post

pytestmark = pytest.mark.peer


class Refusing(httpx.AsyncBaseTransport):
    """The real transport; ``refuse(request)`` says which requests the EHR answers with a
    403 and its OperationOutcome (the peer's own fault, armed for that one request)."""

    def __init__(self, fhir_peer: FhirPeer) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._peer = fhir_peer
        self.refuse: Callable[[httpx.Request], bool] = lambda request: False
        self.unsorted = False  # the EHR ignores _sort: pages in the order records were made
        self.before: Callable[[httpx.Request], Awaitable[None]] | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.unsorted:
            request.url = request.url.copy_remove_param("_sort")
        if self.before is not None:
            await self.before(request)
        if self.refuse(request):
            self._peer.fault("status", status=403)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.fixture
def transport(fhir_peer: FhirPeer) -> Refusing:
    fhir_peer.reset()
    return Refusing(fhir_peer)


@pytest.fixture
async def client(fhir_peer: FhirPeer, transport: Refusing) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=fhir_peer.base_url,
        headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON},
        timeout=5.0,
        transport=transport,
    ) as http:
        yield http


def _searching(rtype: str) -> Callable[[httpx.Request], bool]:
    return lambda request: request.method == "GET" and request.url.path.endswith(f"/{rtype}")


async def _status(store: Store, ctx: ProcessContext) -> SyncStatus:
    """What ``sync status``, /sync and /metrics read: the heartbeat the process writes."""
    conn = store.connection
    figures = json.dumps(ctx.status, default=str)
    now = datetime.now(UTC)
    await db.run_sync(conn, write_heartbeat, "sync", now.isoformat(), figures)
    return await db.run_sync(conn, read_status, datetime.now(UTC))


async def _running(
    loop: SyncLoop, ctx: ProcessContext, until: Callable[[], bool], then: Awaitable[Any]
) -> Any:
    """Run the loop until ``until()`` (10 s at most), then await ``then`` with it running."""
    task = asyncio.create_task(loop.run())
    start = time.monotonic()
    try:
        while not until():
            assert not task.done(), task
            assert time.monotonic() - start < 10, ctx.status
            await asyncio.sleep(0.05)
        return await then
    finally:
        ctx.stopping.set()
        await asyncio.wait_for(task, 5)


async def test_a_pull_whose_every_search_is_refused_shows_as_a_failing_step(
    store: Store,
    client: httpx.AsyncClient,
    transport: Refusing,
    fhir_peer: FhirPeer,
    tmp_path: Path,
) -> None:
    """A token without the Appointment scope: every ``Appointment?actor=…`` answered 403."""
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    ada = await _post(client, factories.patient(family="Adaperson"))
    await _post(client, _appointment(ada, site))
    transport.refuse = _searching("Appointment")
    ctx = await _loop_ctx(
        tmp_path, store, str(client.base_url), 0.2, location=f"Location/{site['id']}"
    )
    pacing = Pacing(interval_s=0.2, backoff_base_s=0.5, backoff_cap_s=60.0)
    loop = SyncLoop(ctx, client, ctx.config.sync.upstreams[0], rng=Longest(), pacing=pacing)
    # Before: the refusal was counted and dropped; the pull read as working, /sync "Online".
    await _running(
        loop,
        ctx,
        lambda: bool(ctx.status.get("steps_failing")),
        asyncio.sleep(2.5),  # the step's backoff (1 s) runs out meanwhile, several rounds go
    )
    assert ctx.status["online"] is True  # the EHR answered: it is the pull that fails
    found = await _status(store, ctx)
    # Still failing once its backoff ran out: a round in which the puller's own interval
    # had not come round (no pass) does not clear it.
    assert found.steps_failing == {"pull": "refused"}
    assert found.pull_refused == 1
    assert not found.pull_stuck
    assert "injected fault" not in json.dumps(ctx.status)  # the server's words stay out
    assert await store.query("SELECT count(*) FROM resources WHERE type = 'Appointment'") == [(0,)]


async def test_a_pull_pass_with_some_searches_refused_counts_them_and_the_step_goes_on(
    store: Store,
    client: httpx.AsyncClient,
    transport: Refusing,
    fhir_peer: FhirPeer,
    tmp_path: Path,
) -> None:
    """The appointments come, their patient's read is refused (restricted at the EHR)."""
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    ada = await _post(client, factories.patient(family="Adaperson"))
    await _post(client, _appointment(ada, site))
    transport.refuse = _searching("Patient")
    ctx = await _loop_ctx(
        tmp_path, store, str(client.base_url), 0.2, location=f"Location/{site['id']}"
    )
    loop = SyncLoop(ctx, client, ctx.config.sync.upstreams[0], rng=Longest())
    await _running(loop, ctx, lambda: "pull_refused" in ctx.status, asyncio.sleep(0))
    found = await _status(store, ctx)
    # Before: nothing of it reached the status.
    assert found.pull_refused == 1
    assert found.steps_failing == {}  # the appointment itself came: the pull works
    assert await store.query("SELECT count(*) FROM resources WHERE type = 'Appointment'") == [(1,)]


async def test_a_pull_whose_every_search_is_answered_unsorted_fails_as_unordered_not_refused(
    store: Store,
    client: httpx.AsyncClient,
    transport: Refusing,
    fhir_peer: FhirPeer,
    tmp_path: Path,
) -> None:
    """An EHR ignoring ``_sort`` (strict handling asked or not): pages in its own order."""
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    ada = await _post(client, factories.patient(family="Adaperson"))
    for day in ("05", "01", "04"):
        await _post(client, _appointment(ada, site, updated=f"2026-11-{day}T08:00:00.000Z"))
    transport.unsorted = True
    ctx = await _loop_ctx(
        tmp_path, store, str(client.base_url), 0.2, location=f"Location/{site['id']}"
    )
    pacing = Pacing(interval_s=0.2, backoff_base_s=0.5, backoff_cap_s=60.0)
    loop = SyncLoop(ctx, client, ctx.config.sync.upstreams[0], rng=Longest(), pacing=pacing)
    await _running(loop, ctx, lambda: bool(ctx.status.get("steps_failing")), asyncio.sleep(0))
    found = await _status(store, ctx)
    # Before: counted as refused; /sync said "the EHR refused every search of the pull (a 403
    # or 400 to each): check the scopes", and appliance_sync_pull_searches_refused was 1.
    assert found.steps_failing == {"pull": "unordered"}
    assert (found.pull_unordered, found.pull_refused) == (1, 0)
    assert await store.query("SELECT count(*) FROM resources WHERE type = 'Appointment'") == [(0,)]


async def test_an_alert_raised_during_a_long_audit_export_goes_before_the_rest_of_it(
    store: Store,
    client: httpx.AsyncClient,
    transport: Refusing,
    fhir_peer: FhirPeer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The audit lane is the last (DESIGN.md): a backlog's export (after an outage, 1,000
    bundles to a slow EHR) must not hold a new item of the outbox back until it ends."""
    monkeypatch.setattr(process, "EXPORT_BUDGET_S", 0.0)  # every round: one export bundle
    [patient] = await store.create([factories.patient()], "user:nurse1")
    for _ in range(40):  # audited reads: 41 records, 6 bundles of 8
        await store.read("Patient", patient.logical_id, "user:nurse1")
    raised: list[str] = []

    async def during_the_export(request: httpx.Request) -> None:
        if not raised and request.method == "POST" and b'"AuditEvent"' in request.content:
            raised.append("raised")  # an item for the outbox while the export goes on
            await store.create([factories.patient(family="Laterperson")], "user:nurse1")

    transport.before = during_the_export
    ctx = await _loop_ctx(tmp_path, store, str(client.base_url), 0.2)
    loop = SyncLoop(ctx, client, ctx.config.sync.upstreams[0], rng=Longest())
    rounds = await loop.once()
    first, second = rounds[0].exported, rounds[1].exported
    assert raised
    assert first is not None
    assert second is not None
    assert (first.bundles, first.more) == (1, True)  # before: the whole backlog, 41 records
    assert rounds[1].drained.delivered == 1  # the new item, before the export went on
    assert second.bundles == 1
    assert sum(r.exported.exported for r in rounds if r.exported is not None) >= 41
    assert fhir_peer.count("Patient") == 2


async def test_an_anchor_refused_for_our_access_holds_no_record_back_across_rounds(
    store: Store,
    client: httpx.AsyncClient,
    fhir_peer: FhirPeer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A token without Provenance write (the anchor's entry answered 403 in a 200 batch):
    the records still go (audit_export: an anchor not taken never holds them back), however
    many rounds the export's time budget cuts them into; the step says it at the end."""
    monkeypatch.setattr(process, "EXPORT_BUDGET_S", 0.0)  # every round: one export bundle
    [patient] = await store.create([factories.patient()], "user:nurse1")
    for _ in range(40):  # audited reads: 41 records, 6 bundles of 8
        await store.read("Patient", patient.logical_id, "user:nurse1")
    signer = store.keyring.signing_key
    await db.run_sync(store.connection, audit.checkpoint, signer, now=datetime.now(UTC))
    ctx = await _loop_ctx(tmp_path, store, str(client.base_url), 0.2)
    loop = SyncLoop(ctx, client, ctx.config.sync.upstreams[0], rng=Longest())
    fhir_peer.reject(balp.CHECKPOINT_EXTENSION, status=403)  # the Provenance entry only
    try:
        rounds = await loop.once()
    finally:
        fhir_peer.reject(None)
    # Before: the first round's one bundle paced the step for the anchor, and 'sync once'
    # ended there (in the sync process: the rest waited out a backoff of up to 5 min for
    # each 10 s of export).
    assert sum(r.exported.exported for r in rounds if r.exported is not None) >= 41
    assert fhir_peer.count("AuditEvent") >= 41
    assert fhir_peer.count("Provenance") == 0
    assert loop.steps["audit export"].failure == "auth"  # said once the backlog went


async def test_sync_once_takes_the_whole_audit_backlog_though_another_step_fails(
    store: Store,
    client: httpx.AsyncClient,
    transport: Refusing,
    fhir_peer: FhirPeer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A token without the Appointment scope (every Appointment search answered 403: the
    pull fails, as it will next time) and an audit backlog: 'sync once' sends the backlog,
    as it did before the export's time budget cut it into rounds, then says the pull
    fails."""
    monkeypatch.setattr(process, "EXPORT_BUDGET_S", 0.0)  # every round: one export bundle
    site = await _post(client, {"resourceType": "Location", "name": "This clinic"})
    [patient] = await store.create([factories.patient()], "user:nurse1")
    for _ in range(40):  # audited reads: 41 records, 6 bundles of 8
        await store.read("Patient", patient.logical_id, "user:nurse1")
    transport.refuse = _searching("Appointment")
    ctx = await _loop_ctx(
        tmp_path, store, str(client.base_url), 0.2, location=f"Location/{site['id']}"
    )
    loop = SyncLoop(ctx, client, ctx.config.sync.upstreams[0], rng=Longest())
    rounds = await loop.once()
    # Before: the first round's one bundle of records, then 'sync once' ended on the pull.
    assert sum(r.exported.exported for r in rounds if r.exported is not None) >= 41
    assert fhir_peer.count("AuditEvent") >= 41
    assert loop.steps["pull"].failure == "refused"
