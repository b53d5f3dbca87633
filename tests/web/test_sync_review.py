"""The review queue pages (/sync/review) over a real store, with conflicts made by the sync
agent against the real Medplum FHIR peer."""

from __future__ import annotations

import random
import re
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from quart.testing import QuartClient

from appliance import break_glass, db
from appliance.device_registry import DeviceRegistry, StationKind
from appliance.store import Store, UpstreamCopy
from sync_agent.review_queue import ReviewQueue, ReviewState
from sync_agent.updates import UpdateSender
from tests import factories
from tests.sync_agent.test_updates import newer_version_pulled_into_the_review
from tests.web.conftest import NURSE, FakeClock, form_token
from web.sync import compare

pytestmark = pytest.mark.peer

ACTOR = f"user:{NURSE}"


async def _conflict(
    store: Store, upstream: httpx.AsyncClient, *, checked_in: bool = True
) -> tuple[str, dict[str, Any]]:
    """A pulled Patient edited here ("Mineperson") and upstream ("Theirsperson"); the sync
    agent's update is refused with 412 and the change waits for review. ``checked_in``: the
    patient is at the clinic today (the nurse's normal access to the record)."""
    created = (await upstream.post("Patient", json=factories.patient(family="Firstperson"))).json()
    [imported] = await store.import_upstream(
        [
            UpstreamCopy(
                f"Patient/{created['id']}",
                created["meta"]["versionId"],
                created["meta"]["lastUpdated"],
                created,
            )
        ],
        "service:sync",
    )
    assert imported.logical_id is not None
    logical_id = imported.logical_id
    ours = await store.read("Patient", logical_id, ACTOR)
    await store.update(
        "Patient",
        logical_id,
        {**ours, "name": [{"family": "Mineperson", "given": ["Ada"]}]},
        ACTOR,
    )
    theirs = (await upstream.get(f"Patient/{created['id']}")).json()
    theirs["name"] = [{"family": "Theirsperson", "given": ["Ada"]}]
    assert (await upstream.put(f"Patient/{created['id']}", json=theirs)).status_code == 200
    sent = await UpdateSender(store, upstream, rng=random.Random(1)).send_once()
    assert sent.conflicts == 1
    if checked_in:
        registry = DeviceRegistry(store)
        await registry.add_station("kiosk-1", "Kiosk 1", StationKind.KIOSK, "user:setup")
        await registry.check_in("kiosk-1", logical_id, "user:setup")
    return logical_id, created


_SHOWN = re.compile(rb'name="theirs_version" value="([^"]*)"')


def _decision(page: bytes) -> dict[str, str]:
    """What a decision form of the page posts: its CSRF token and the upstream version the
    page showed."""
    shown = _SHOWN.search(page)
    assert shown is not None, "no theirs_version field on the page"
    return {"csrf_token": form_token(page), "theirs_version": shown.group(1).decode()}


def test_compare_marks_the_fields_that_differ_and_skips_server_parts() -> None:
    rows = compare(
        {"resourceType": "Patient", "id": "a", "name": [{"family": "A"}], "active": True},
        {
            "resourceType": "Patient",
            "id": "b",
            "meta": {"versionId": "2"},
            "name": [{"family": "B"}],
        },
    )
    assert [(r.path, r.mine, r.theirs, r.differs) for r in rows] == [
        ("resourceType", "Patient", "Patient", False),
        ("name[0].family", "A", "B", True),
        ("active", "true", None, True),
    ]


async def test_the_sync_page_counts_open_conflicts_and_the_list_shows_no_phi(
    logged_in: QuartClient, store: Store, upstream: httpx.AsyncClient
) -> None:
    await _conflict(store, upstream)
    page = await (await logged_in.get("/sync/")).get_data(as_text=True)
    assert "1 conflict waiting for a decision" in page
    listing = await logged_in.get("/sync/review")
    body = await listing.get_data(as_text=True)
    assert listing.status_code == 200
    assert "Compare and decide" in body
    assert "Mineperson" not in body
    assert "Theirsperson" not in body


async def test_opening_a_conflict_shows_both_versions_and_is_audited(
    logged_in: QuartClient, store: Store, upstream: httpx.AsyncClient, db_path: Path
) -> None:
    await _conflict(store, upstream)
    [item] = await ReviewQueue(store).items()
    response = await logged_in.get(f"/sync/review/{item.id}")
    body = await response.get_data(as_text=True)
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert 'data-path="name[0].family"' in body
    row = body.split('data-path="name[0].family"', 1)[1].split("</tr>", 1)[0]
    assert "Mineperson" in row
    assert "Theirsperson" in row
    assert "differs" in row
    reason = body.split('id="case-reason"', 1)[1].split("</p>", 1)[0]
    assert "the upstream changed since version" in reason
    conn = sqlite3.connect(db_path)
    reads = conn.execute(
        "SELECT actor, action FROM audit WHERE entity = ?", (f"review/{item.id}",)
    ).fetchall()
    conn.close()
    assert (ACTOR, "read") in reads
    conn = sqlite3.connect(db_path)
    [(detail,)] = conn.execute(
        "SELECT detail FROM audit WHERE entity = ? AND action = 'read'", (f"review/{item.id}",)
    ).fetchall()
    conn.close()
    assert detail.startswith("normal access: ")  # as every read of a record names it


def _details(db_path: Path, entity: str) -> list[str]:
    conn = sqlite3.connect(db_path)
    try:
        rows = conn.execute("SELECT detail FROM audit WHERE entity = ? ORDER BY id", (entity,))
        return [str(detail) for (detail,) in rows.fetchall()]
    finally:
        conn.close()


async def test_a_conflict_outside_normal_access_is_opened_under_the_review_queue_named(
    logged_in: QuartClient, store: Store, upstream: httpx.AsyncClient, db_path: Path
) -> None:
    """Decided the day after the visit, say: the queue shows no name or birth date to ask
    break-glass with, so the queue is the access, and the audit trail says so."""
    await _conflict(store, upstream, checked_in=False)
    [item] = await ReviewQueue(store).items()
    opened = await logged_in.get(f"/sync/review/{item.id}")
    assert opened.status_code == 200
    decided = await logged_in.post(
        f"/sync/review/{item.id}/keep-mine", form=_decision(await opened.get_data())
    )
    assert decided.status_code == 303
    read, kept = _details(db_path, f"review/{item.id}")[-2:]
    # Before: 'Patient/…' alone, no access named (or, in between, a 403 and a break-glass
    # offer no one could use).
    assert read.startswith(f"review queue: deciding sync conflict {item.id}; Patient/")
    assert kept.startswith(f"review queue: deciding sync conflict {item.id}; kept the local")


async def test_a_conflict_opened_under_break_glass_carries_the_grant_marker_first(
    logged_in: QuartClient,
    store: Store,
    upstream: httpx.AsyncClient,
    db_path: Path,
    clock: FakeClock,
) -> None:
    logical_id, _ = await _conflict(store, upstream, checked_in=False)
    [item] = await ReviewQueue(store).items()
    [(user_id,)] = await store.query("SELECT id FROM users WHERE username = ?", (NURSE,))
    grant = await db.run_sync(
        store.connection,
        lambda conn: break_glass.grant(
            conn,
            store.keyring,
            user_id=int(user_id),
            actor=ACTOR,
            patient_id=logical_id,
            category=break_glass.Category.PATIENT_CONTACT,
            reason="the patient phoned about a wrong address on the record",
            now=clock(),  # the app's: near the site's midnight it runs ahead
        ),
    )
    assert (await logged_in.get(f"/sync/review/{item.id}")).status_code == 200
    [read] = [d for d in _details(db_path, f"review/{item.id}") if "break-glass" in d]
    # The audit report finds break-glass by the marker at the start of the detail.
    assert read.startswith(f"{break_glass.marker(grant.id)}; Patient/")


async def test_keep_mine_requeues_the_update_which_then_lands_upstream(
    logged_in: QuartClient, store: Store, upstream: httpx.AsyncClient
) -> None:
    _, created = await _conflict(store, upstream)
    [item] = await ReviewQueue(store).items()
    page = await (await logged_in.get(f"/sync/review/{item.id}")).get_data()
    decided = await logged_in.post(f"/sync/review/{item.id}/keep-mine", form=_decision(page))
    assert decided.status_code == 303
    assert decided.headers["Location"].endswith("/sync/review?done=kept")
    assert await ReviewQueue(store).items() == []
    sent = await UpdateSender(store, upstream, rng=random.Random(2)).send_once()
    assert (sent.delivered, sent.conflicts) == (1, 0)
    now_upstream = (await upstream.get(f"Patient/{created['id']}")).json()
    assert now_upstream["name"][0]["family"] == "Mineperson"
    # Deciding twice is refused, with a clear page.
    again = await logged_in.post(f"/sync/review/{item.id}/keep-mine", form=_decision(page))
    assert again.status_code == 409
    assert "already decided" in await again.get_data(as_text=True)


async def test_take_theirs_replaces_ours_here(
    logged_in: QuartClient, store: Store, upstream: httpx.AsyncClient
) -> None:
    logical_id, _ = await _conflict(store, upstream)
    [item] = await ReviewQueue(store).items()
    page = await (await logged_in.get(f"/sync/review/{item.id}")).get_data()
    decided = await logged_in.post(f"/sync/review/{item.id}/take-theirs", form=_decision(page))
    assert decided.status_code == 303
    assert "Took the upstream" in await (await logged_in.get(decided.headers["Location"])).get_data(
        as_text=True
    )
    here = await store.read("Patient", logical_id, ACTOR)
    assert here["name"][0]["family"] == "Theirsperson"


async def test_a_decision_needs_the_csrf_token(
    logged_in: QuartClient, store: Store, upstream: httpx.AsyncClient
) -> None:
    await _conflict(store, upstream)
    [item] = await ReviewQueue(store).items()
    refused = await logged_in.post(f"/sync/review/{item.id}/take-theirs", form={})
    assert refused.status_code == 403
    assert len(await ReviewQueue(store).items()) == 1


async def test_an_unknown_conflict_is_a_404(logged_in: QuartClient) -> None:
    assert (await logged_in.get("/sync/review/999")).status_code == 404


async def test_an_id_too_long_for_sqlite_is_not_found_not_a_500(logged_in: QuartClient) -> None:
    for path in ("/sync/review/99999999999999999999", "/sync/review/999999999999999999"):
        response = await logged_in.get(path)
        assert response.status_code == 404  # before: OverflowError binding it, a 500


@pytest.mark.parametrize("decision", ["keep-mine", "take-theirs"])
async def test_a_decision_on_an_upstream_version_that_changed_while_the_page_was_open_is_refused(
    logged_in: QuartClient,
    store: Store,
    upstream: httpx.AsyncClient,
    db_path: Path,
    decision: str,
) -> None:
    logical_id, created = await _conflict(store, upstream)
    [shown] = await ReviewQueue(store).items()
    page = await (await logged_in.get(f"/sync/review/{shown.id}")).get_data()
    assert _decision(page)["theirs_version"] == shown.theirs_version
    await newer_version_pulled_into_the_review(store, upstream, created, "Laterperson")
    refused = await logged_in.post(f"/sync/review/{shown.id}/{decision}", form=_decision(page))
    # Before: decided against the version the pull had just put in, which nobody had seen
    # ("keep mine" then overwrote it upstream).
    assert refused.status_code == 409
    assert "changed while this page was open" in await refused.get_data(as_text=True)
    [now] = await ReviewQueue(store).items()
    assert (now.state, now.id) == (ReviewState.OPEN, shown.id)
    assert now.theirs_version != shown.theirs_version
    here = await store.read("Patient", logical_id, ACTOR)
    assert here["name"][0]["family"] == "Mineperson"
    assert await store.query("SELECT 1 FROM outbox WHERE state = 'pending'") == []
    assert not [d for d in _details(db_path, f"review/{shown.id}") if "version" in d]
    # Looked at again, the newest version is shown and the decision goes through.
    again = await (await logged_in.get(f"/sync/review/{shown.id}")).get_data()
    assert b"Laterperson" in again
    decided = await logged_in.post(f"/sync/review/{shown.id}/{decision}", form=_decision(again))
    assert decided.status_code == 303


async def test_a_decision_that_does_not_name_the_version_it_was_made_on_is_refused(
    logged_in: QuartClient, store: Store, upstream: httpx.AsyncClient
) -> None:
    await _conflict(store, upstream)
    [item] = await ReviewQueue(store).items()
    page = await (await logged_in.get(f"/sync/review/{item.id}")).get_data()
    for decision in ("keep-mine", "take-theirs"):
        refused = await logged_in.post(
            f"/sync/review/{item.id}/{decision}", form={"csrf_token": form_token(page)}
        )
        assert refused.status_code == 400
    assert [i.state for i in await ReviewQueue(store).items()] == [ReviewState.OPEN]


async def test_take_theirs_that_cannot_replace_ours_says_so_and_decides_nothing(
    logged_in: QuartClient, store: Store, upstream: httpx.AsyncClient, db_path: Path
) -> None:
    logical_id, _ = await _conflict(store, upstream)
    [item] = await ReviewQueue(store).items()
    page = await (await logged_in.get(f"/sync/review/{item.id}")).get_data()
    # Another change to this record is waiting to go up (queued by another path while the
    # page was open): their copy is held back for it, so it cannot land.
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute(
            "INSERT INTO outbox (lane, resource_id, kind, queued_at) SELECT 2, id, 'update', "
            "'2026-11-29T09:00:00.000000Z' FROM resources WHERE logical_id = ?",
            (logical_id,),
        )
    raw.close()
    decided = await logged_in.post(f"/sync/review/{item.id}/take-theirs", form=_decision(page))
    # Before: a 500 page (the store's error escaped the route).
    assert decided.status_code == 409
    assert "could not replace the one here" in await decided.get_data(as_text=True)
    assert [i.id for i in await ReviewQueue(store).items()] == [item.id]
    assert (await store.read("Patient", logical_id, ACTOR))["name"][0]["family"] == "Mineperson"
