"""The audit report page: filters, sorting, pages, CSV export, chain status, nurse view."""

from __future__ import annotations

import csv
import io
import re
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
from quart.testing import QuartClient
from quart.typing import TestAppProtocol as ServedApp

from appliance import audit, db, users
from appliance.audit import AuditAction, AuditEvent
from appliance.store import Store
from tests import factories
from tests.web.conftest import NURSE, FakeClock, login
from web import audit_report

ADMIN = "admin1"
ADMIN_PASSWORD = "admin horse battery staple"
_ROW_ID = re.compile(rb'<tr data-id="(\d+)"')


@pytest.fixture
async def admin_client(app: ServedApp, store: Store, clock: FakeClock) -> QuartClient:
    await db.run_sync(
        store.connection, users.create_user, ADMIN, ADMIN_PASSWORD, users.Role.ADMIN, now=clock()
    )
    client: QuartClient = app.test_client()  # type: ignore[assignment]
    assert await login(client, ADMIN, ADMIN_PASSWORD) == 302
    return client


async def _add(store: Store, clock: FakeClock, events: list[AuditEvent]) -> None:
    def work(conn: sqlite3.Connection) -> None:
        with db.transaction_sync(conn):
            audit.append(conn, events, now=clock())

    await db.run_sync(store.connection, work)


def _ids(body: bytes) -> list[int]:
    return [int(x) for x in _ROW_ID.findall(body)]


async def test_the_admin_sees_the_report_newest_first_with_the_chain_intact(
    admin_client: QuartClient,
) -> None:
    response = await admin_client.get("/audit")
    body = await response.get_data()
    assert response.status_code == 200
    assert b'id="chain-status" class="chain chain-ok"' in body
    ids = _ids(body)
    assert ids == sorted(ids, reverse=True)
    assert ids


async def test_sorting_by_a_column_and_reversing(
    admin_client: QuartClient, store: Store, clock: FakeClock
) -> None:
    await _add(
        store,
        clock,
        [AuditEvent(f"user:{name}", AuditAction.READ, entity="x") for name in ("zed", "amy")],
    )
    body = await (await admin_client.get("/audit?sort=actor&dir=asc&action=read")).get_data()
    actors = re.findall(rb"<td>(user:[a-z0-9]+)</td>", body)
    assert actors == sorted(actors)
    assert actors[0] == b"user:amy"
    body = await (await admin_client.get("/audit?sort=actor&dir=desc&action=read")).get_data()
    assert re.findall(rb"<td>(user:[a-z0-9]+)</td>", body)[0] == b"user:zed"
    # An unknown sort key falls back to time, never reaches the SQL.
    response = await admin_client.get("/audit?sort=id;DROP TABLE audit")
    assert response.status_code == 200


async def test_filters_by_user_action_and_time_window(
    admin_client: QuartClient, store: Store, clock: FakeClock
) -> None:
    clock.advance(-3 * 86400)
    await _add(store, clock, [AuditEvent("user:old", AuditAction.READ, entity="old")])
    clock.advance(3 * 86400)
    await _add(store, clock, [AuditEvent("user:old", AuditAction.READ, entity="new")])
    body = await (await admin_client.get("/audit?user=old")).get_data()
    assert b"<td>old</td>" in body
    assert b"<td>new</td>" in body
    state = admin_client.app.extensions["appliance"]
    today = clock().astimezone(state.zone).date()
    body = await (await admin_client.get(f"/audit?user=old&since={today}")).get_data()
    assert b"<td>new</td>" in body
    assert b"<td>old</td>" not in body
    yesterday = today - timedelta(days=1)
    body = await (await admin_client.get(f"/audit?user=old&until={yesterday}")).get_data()
    assert b"<td>old</td>" in body
    assert b"<td>new</td>" not in body
    body = await (await admin_client.get("/audit?action=login")).get_data()
    assert b"<td>read</td>" not in body


async def test_patient_filter_goes_through_the_blind_index_and_is_audited(
    admin_client: QuartClient, store: Store, clock: FakeClock, db_path: Path
) -> None:
    [first, second] = await store.create(
        [
            factories.patient(family="Filtertest", birth_date="1950-01-02", mrn="F1"),
            factories.patient(family="Othertest", birth_date="1950-01-02", mrn="F2"),
        ],
        "user:setup",
    )
    await store.read("Patient", first.logical_id, "user:someone")
    await store.read("Patient", second.logical_id, "user:someone")
    body = await (
        await admin_client.get("/audit?family=filtertest&birth_date=1950-01-02")
    ).get_data()
    key = store.patient_key(f"Patient/{first.logical_id}").hex()
    other = store.patient_key(f"Patient/{second.logical_id}").hex()
    assert key[:12].encode() in body
    assert other[:12].encode() not in body
    assert b"Filtertest" not in body  # the report never shows a name
    conn = sqlite3.connect(db_path)
    searches = conn.execute(
        "SELECT actor FROM audit WHERE action = 'search' AND entity = 'Patient by name_dob'"
    ).fetchall()
    conn.close()
    assert (f"user:{ADMIN}",) in searches
    body = await (await admin_client.get("/audit?family=nobody&birth_date=1950-01-02")).get_data()
    assert b"No patient has that family name" in body
    assert _ids(body) == []


async def test_pages_of_fifty(admin_client: QuartClient, store: Store, clock: FakeClock) -> None:
    await _add(
        store,
        clock,
        [AuditEvent("user:bulk", AuditAction.READ, entity=f"e{i}") for i in range(120)],
    )
    first = _ids(await (await admin_client.get("/audit?user=bulk")).get_data())
    third = _ids(await (await admin_client.get("/audit?user=bulk&page=3")).get_data())
    assert len(first) == audit_report.PAGE_SIZE
    assert len(third) == 20
    assert max(third) < min(first)


async def test_csv_export_is_audited_and_defuses_formulas(
    admin_client: QuartClient, store: Store, clock: FakeClock, db_path: Path
) -> None:
    await _add(
        store,
        clock,
        [AuditEvent("user:csv", AuditAction.READ, entity="=HYPERLINK(1)", detail="+1")],
    )
    response = await admin_client.get("/audit/export.csv?user=csv")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO((await response.get_data()).decode())))
    assert [(r["actor"], r["entity"], r["detail"]) for r in rows] == [
        ("user:csv", "'=HYPERLINK(1)", "'+1")
    ]
    conn = sqlite3.connect(db_path)
    [(actor, detail)] = conn.execute(
        "SELECT actor, detail FROM audit WHERE action = 'export' AND entity = 'AuditLog'"
    ).fetchall()
    conn.close()
    assert actor == f"user:{ADMIN}"
    assert detail == "csv export of 1 of 1 records"


async def test_a_damaged_chain_is_shown(admin_client: QuartClient, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("UPDATE audit SET actor = 'user:someone-else' WHERE id = 1")
    conn.commit()
    conn.close()
    body = await (await admin_client.get("/audit")).get_data()
    assert b"chain chain-bad" in body
    assert b"record 1: hash does not match" in body


async def test_a_nurse_sees_only_her_own_actions(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    await _add(store, clock, [AuditEvent("user:someone", AuditAction.READ, entity="theirs")])
    body = await (await logged_in.get("/audit?user=someone")).get_data()
    assert b"<td>theirs</td>" not in body
    assert f"<td>user:{NURSE}</td>".encode() in body
    assert b"chain-status" not in body
    assert b"Break-glass grants" not in body
    rows = list(
        csv.DictReader(
            io.StringIO((await (await logged_in.get("/audit/export.csv")).get_data()).decode())
        )
    )
    assert {r["actor"] for r in rows} == {f"user:{NURSE}"}


async def test_anonymous_users_are_sent_to_log_in(client: QuartClient) -> None:
    assert (await client.get("/audit")).status_code == 302
    assert (await client.get("/audit/export.csv")).status_code == 302
