"""Break-glass: emergency access by name + birth date with a reason, time-limited, audited."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from quart.testing import QuartClient
from quart.typing import TestAppProtocol as ServedApp

from appliance import break_glass, db, users
from appliance.device_registry import DeviceRegistry, StationKind
from appliance.store import Store
from tests import factories
from tests.web.conftest import NURSE, FakeClock, form_token, login

REASON = "Patient called with chest pain, needs last readings"
ADMIN = "admin1"
ADMIN_PASSWORD = "admin horse battery staple"


@pytest.fixture
async def patient_id(store: Store) -> str:
    [patient] = await store.create(
        [factories.patient(family="Glasstest", given="Bea", birth_date="1948-03-04", mrn="BG1")],
        "user:setup",
    )
    await store.create(
        [factories.bp_observation(f"Patient/{patient.logical_id}", 151, 93)], "user:setup"
    )
    return patient.logical_id


async def _request(client: QuartClient, **overrides: str) -> tuple[int, str, bytes]:
    page = await client.get("/break-glass")
    fields = {
        "family": "glasstest",
        "birth_date": "1948-03-04",
        "category": break_glass.Category.PATIENT_CONTACT.value,
        "reason": REASON,
        "csrf_token": form_token(await page.get_data()),
        **overrides,
    }
    response = await client.post("/break-glass", form=fields)
    return response.status_code, response.location or "", await response.get_data()


def _audit(db_path: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(
            "SELECT actor, action, outcome, patient_key, entity, detail FROM audit ORDER BY id"
        ).fetchall()
    finally:
        conn.close()


async def test_a_grant_opens_the_record_and_every_view_is_marked(
    logged_in: QuartClient, patient_id: str, store: Store, db_path: Path
) -> None:
    status, location, _ = await _request(logged_in)
    assert status == 302
    assert location.startswith("/break-glass/")
    grant_id = int(location.rsplit("/", 1)[1])
    page = await logged_in.get(location)
    body = await page.get_data()
    assert page.status_code == 200
    assert b"Glasstest, Bea" in body
    assert b"151 mm[Hg] / 93 mm[Hg]" in body
    key = store.patient_key(f"Patient/{patient_id}")
    marker = f"break-glass grant {grant_id}"
    records = _audit(db_path)
    actor = f"user:{NURSE}"
    assert (
        actor,
        "break_glass",
        "success",
        key,
        f"Patient/{patient_id}",
        f"{marker} opened: patient contacted the clinic, 30 min",
    ) in records
    assert (actor, "read", "success", key, f"Patient/{patient_id}", marker) in records
    assert (actor, "search", "success", key, "Observation newest 20", marker) in records
    # The reason is sealed, never in clear in the database or the audit trail.
    assert REASON.encode() not in db_path.read_bytes()


async def test_the_grant_expires_after_thirty_minutes(
    logged_in: QuartClient, patient_id: str, clock: FakeClock, db_path: Path
) -> None:
    _, location, _ = await _request(logged_in)
    for _ in range(2):  # 29 minutes, never idle for the 15 that would end the session
        clock.advance(14.5 * 60)
        assert (await logged_in.get(location)).status_code == 200
    clock.advance(61)
    response = await logged_in.get(location)
    assert response.status_code == 403
    assert b"Glasstest" not in await response.get_data()
    assert any(r[1] == "read" and r[2] == "denied" for r in _audit(db_path))


async def test_closing_a_grant_early(logged_in: QuartClient, patient_id: str) -> None:
    _, location, _ = await _request(logged_in)
    page = await logged_in.get(location)
    response = await logged_in.post(
        f"{location}/end", form={"csrf_token": form_token(await page.get_data())}
    )
    assert response.status_code == 302
    assert (await logged_in.get(location)).status_code == 403


async def test_a_reason_and_category_are_required(
    logged_in: QuartClient, patient_id: str, db_path: Path
) -> None:
    status, _, body = await _request(logged_in, reason="short")
    assert status == 400
    assert b"at least 10 characters" in body
    status, _, _ = await _request(logged_in, category="because")
    assert status == 400
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT count(*) FROM break_glass").fetchone() == (0,)
    conn.close()


async def test_no_match_shows_nothing_to_browse(logged_in: QuartClient, patient_id: str) -> None:
    status, _, body = await _request(logged_in, family="nobody")
    assert status == 404
    assert b"No patient has that family name" in body
    assert b"Glasstest" not in body


async def test_a_patient_checked_in_today_needs_no_break_glass(
    logged_in: QuartClient, patient_id: str, store: Store, db_path: Path
) -> None:
    registry = DeviceRegistry(store)
    await registry.add_station("kiosk-1", "Kiosk 1", StationKind.KIOSK, "user:setup")
    await registry.check_in("kiosk-1", patient_id, "user:setup")
    status, _, body = await _request(logged_in)
    assert status == 200
    assert b"checked in today" in body
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT count(*) FROM break_glass").fetchone() == (0,)
    conn.close()


async def test_someone_elses_grant_does_not_open(
    logged_in: QuartClient, app: ServedApp, patient_id: str, store: Store, clock: FakeClock
) -> None:
    _, location, _ = await _request(logged_in)
    await db.run_sync(
        store.connection,
        users.create_user,
        "nurse2",
        "another nurse password",
        users.Role.NURSE,
        now=clock(),
    )
    other: QuartClient = app.test_client()  # type: ignore[assignment]
    assert await login(other, "nurse2", "another nurse password") == 302
    assert (await other.get(location)).status_code == 404


async def test_the_admin_sees_break_glass_highlighted_with_its_reason(
    logged_in: QuartClient, app: ServedApp, patient_id: str, store: Store, clock: FakeClock
) -> None:
    _, location, _ = await _request(logged_in)
    await logged_in.get(location)
    await db.run_sync(
        store.connection, users.create_user, ADMIN, ADMIN_PASSWORD, users.Role.ADMIN, now=clock()
    )
    admin: QuartClient = app.test_client()  # type: ignore[assignment]
    assert await login(admin, ADMIN, ADMIN_PASSWORD) == 302
    body = await (await admin.get("/audit?break_glass=1")).get_data()
    assert body.count(b'class="break-glass"') >= 3  # grant, read, search
    assert b"<td>login</td>" not in body
    assert REASON.encode() in body  # the reviewer sees why
    assert b"Glasstest" not in body


async def test_a_grant_whose_sealed_reason_fails_authentication_leaves_the_report_working(
    logged_in: QuartClient,
    app: ServedApp,
    patient_id: str,
    store: Store,
    clock: FakeClock,
    db_path: Path,
) -> None:
    _, location, _ = await _request(logged_in)
    await logged_in.get(location)
    conn = sqlite3.connect(db_path)  # the sealed reason altered on disk
    [(grant_id, sealed)] = conn.execute("SELECT id, reason FROM break_glass").fetchall()
    altered = bytearray(sealed)
    altered[-1] ^= 0x01
    conn.execute("UPDATE break_glass SET reason = ? WHERE id = ?", (bytes(altered), grant_id))
    conn.commit()
    conn.close()
    await db.run_sync(
        store.connection, users.create_user, ADMIN, ADMIN_PASSWORD, users.Role.ADMIN, now=clock()
    )
    admin: QuartClient = app.test_client()  # type: ignore[assignment]
    assert await login(admin, ADMIN, ADMIN_PASSWORD) == 302
    response = await admin.get("/audit?break_glass=1")
    assert response.status_code == 200  # before: 500 for 30 days, the whole report
    body = await response.get_data()
    assert b"(the stored reason failed authentication)" in body
    assert body.count(b'class="break-glass"') >= 3


async def test_twins_with_the_same_name_and_birth_date_are_chosen_between(
    logged_in: QuartClient, patient_id: str, store: Store
) -> None:
    [twin] = await store.create(
        [factories.patient(family="Glasstest", given="Cy", birth_date="1948-03-04", mrn="BG2")],
        "user:setup",
    )
    status, _, body = await _request(logged_in)
    assert status == 200
    assert b"More than one patient matches" in body
    status, location, _ = await _request(logged_in, patient_id=twin.logical_id)
    assert status == 302
    assert b"Glasstest, Cy" in await (await logged_in.get(location)).get_data()
