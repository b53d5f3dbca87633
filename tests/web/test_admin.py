"""User administration, forced password change, and the session rules of issue 6."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from quart.testing import QuartClient
from quart.typing import TestAppProtocol as ServedApp

from appliance import db, users
from appliance.store import Store
from tests.web.conftest import NURSE, PASSWORD, FakeClock, form_token, login, submit_login

ADMIN = "admin1"
ADMIN_PASSWORD = "admin horse battery staple"


@pytest.fixture
async def admin_client(app: ServedApp, store: Store, clock: FakeClock) -> QuartClient:
    await db.run_sync(
        store.connection, users.create_user, ADMIN, ADMIN_PASSWORD, users.Role.ADMIN, now=clock()
    )
    client: QuartClient = app.test_client()  # type: ignore[assignment]
    assert await login(client, ADMIN, ADMIN_PASSWORD) == 302  # enrols MFA on the way
    return client


def _rows(db_path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _user_id(db_path: Path, username: str) -> int:
    [(uid,)] = _rows(db_path, "SELECT id FROM users WHERE username = ?", (username,))
    assert isinstance(uid, int)
    return uid


async def _post(client: QuartClient, path: str, **fields: str) -> tuple[int, bytes]:
    page = await client.get("/admin/users")
    fields["csrf_token"] = form_token(await page.get_data())
    response = await client.post(path, form=fields)
    return response.status_code, await response.get_data()


def _config_audit(db_path: Path) -> list[tuple[object, ...]]:
    return _rows(
        db_path, "SELECT actor, entity, detail FROM audit WHERE action = 'config' ORDER BY id"
    )


async def test_a_nurse_cannot_reach_user_administration(logged_in: QuartClient) -> None:
    assert (await logged_in.get("/admin/users")).status_code == 403


async def test_the_admin_sees_every_account(admin_client: QuartClient) -> None:
    response = await admin_client.get("/admin/users")
    body = await response.get_data()
    assert response.status_code == 200
    assert b'data-username="nurse1"' in body
    assert b'data-username="admin1"' in body
    assert b"password_hash" not in body


async def test_create_an_account_audited_and_forced_to_change_password(
    admin_client: QuartClient, client: QuartClient, db_path: Path
) -> None:
    status, _ = await _post(
        admin_client,
        "/admin/users",
        username="nurse2",
        role="nurse",
        password="initial password 1",
    )
    assert status == 302
    assert (f"user:{ADMIN}", "User/nurse2", "created with role nurse") in _config_audit(db_path)
    # The new nurse logs in and must choose her own password before anything else.
    assert await login(client, "nurse2", "initial password 1") == 302
    response = await client.get("/nurse/")
    assert response.location == "/account/password"
    page = await client.get("/account/password")
    token = form_token(await page.get_data())
    fields = {
        "current_password": "initial password 1",
        "new_password": "her own secret phrase",
        "new_password_again": "her own secret phrase",
        "csrf_token": token,
    }
    assert (await client.post("/account/password", form=fields)).status_code == 302
    assert (await client.get("/nurse/")).status_code == 200
    assert ("user:nurse2", "User/nurse2", "password changed") in _config_audit(db_path)


async def test_a_weak_initial_password_is_refused(admin_client: QuartClient, db_path: Path) -> None:
    status, body = await _post(
        admin_client, "/admin/users", username="nurse3", role="nurse", password="short"
    )
    assert status == 400
    assert b"at least 12 characters" in body
    assert _rows(db_path, "SELECT 1 FROM users WHERE username = 'nurse3'") == []


async def test_reset_password_ends_sessions_and_forces_a_change(
    admin_client: QuartClient, logged_in: QuartClient, db_path: Path
) -> None:
    nurse_id = _user_id(db_path, NURSE)
    status, _ = await _post(
        admin_client, f"/admin/users/{nurse_id}/password", password="temporary pass 42"
    )
    assert status == 302
    assert (await logged_in.get("/nurse/")).status_code == 302  # her session ended
    assert await login(logged_in, NURSE, PASSWORD) == 401  # the old password is gone
    assert await login(logged_in, NURSE, "temporary pass 42") == 302
    assert (await logged_in.get("/nurse/")).location == "/account/password"
    assert (f"user:{ADMIN}", f"User/{NURSE}", "password reset") in _config_audit(db_path)


async def test_disable_ends_sessions_and_blocks_login_then_enable(
    admin_client: QuartClient, logged_in: QuartClient, db_path: Path
) -> None:
    nurse_id = _user_id(db_path, NURSE)
    assert (await _post(admin_client, f"/admin/users/{nurse_id}/disable"))[0] == 302
    assert (await logged_in.get("/nurse/")).status_code == 302
    assert await login(logged_in) == 401
    assert (await _post(admin_client, f"/admin/users/{nurse_id}/enable"))[0] == 302
    assert await login(logged_in) == 302
    details = [d for _, e, d in _config_audit(db_path) if e == f"User/{NURSE}"]
    assert details == ["disabled", "enabled"]


async def test_an_admin_cannot_disable_themselves_or_the_last_admin(
    admin_client: QuartClient, db_path: Path, store: Store, clock: FakeClock
) -> None:
    me = _user_id(db_path, ADMIN)
    status, body = await _post(admin_client, f"/admin/users/{me}/disable")
    assert status == 400
    assert b"cannot disable your own account" in body
    # With the second admin disabled, the first is the last enabled one: nobody (not even
    # another, disabled, admin acting through the store) can disable them.
    other = await db.run_sync(
        store.connection,
        users.create_user,
        "admin2",
        ADMIN_PASSWORD,
        users.Role.ADMIN,
        now=clock(),
    )
    assert (await _post(admin_client, f"/admin/users/{other}/disable"))[0] == 302
    with pytest.raises(users.LastAdminError):
        await db.run_sync(
            store.connection,
            users.set_disabled,
            me,
            True,
            acting_user_id=other,
            actor="user:admin2",
            now=clock(),
        )
    assert _rows(db_path, "SELECT disabled FROM users WHERE id = ?", (me,)) == [(0,)]


async def test_reset_mfa_makes_the_admin_enrol_again(
    admin_client: QuartClient, app: ServedApp, store: Store, clock: FakeClock, db_path: Path
) -> None:
    await db.run_sync(
        store.connection, users.create_user, "admin2", ADMIN_PASSWORD, users.Role.ADMIN, now=clock()
    )
    second: QuartClient = app.test_client()  # type: ignore[assignment]
    assert await login(second, "admin2", ADMIN_PASSWORD) == 302
    assert (await second.get("/admin/users")).status_code == 200
    other = _user_id(db_path, "admin2")
    assert (await _post(admin_client, f"/admin/users/{other}/mfa-reset"))[0] == 302
    assert (await second.get("/admin/users")).status_code == 302  # session ended
    response = await submit_login(second, "admin2", ADMIN_PASSWORD)
    assert response.location == "/mfa/enrol"
    me = _user_id(db_path, ADMIN)
    status, body = await _post(admin_client, f"/admin/users/{me}/mfa-reset")
    assert status == 400
    assert b"another administrator" in body
    assert (f"user:{ADMIN}", "User/admin2", "second factor reset") in _config_audit(db_path)


async def test_admin_actions_need_the_csrf_token(admin_client: QuartClient, db_path: Path) -> None:
    nurse_id = _user_id(db_path, NURSE)
    for path in (
        "/admin/users",
        f"/admin/users/{nurse_id}/disable",
        f"/admin/users/{nurse_id}/enable",
        f"/admin/users/{nurse_id}/password",
        f"/admin/users/{nurse_id}/mfa-reset",
        "/mfa/recovery-codes",
        "/account/password",
        "/break-glass",
    ):
        response = await admin_client.post(path, form={"password": "whatever password 1"})
        assert response.status_code == 403, path
    assert _rows(db_path, "SELECT disabled FROM users WHERE id = ?", (nurse_id,)) == [(0,)]


# -- session rules -----------------------------------------------------------------------------


def _session_cookie(client: QuartClient) -> str | None:
    assert client.cookie_jar is not None
    return next((c.value for c in client.cookie_jar if c.name == "__Host-session"), None)


async def test_login_replaces_a_planted_session_id(client: QuartClient, db_path: Path) -> None:
    planted = "attacker-chosen-session-token-0123456789abcdef"
    client.set_cookie("localhost", "__Host-session", planted)
    assert await login(client) == 302
    fresh = _session_cookie(client)
    assert fresh not in (None, planted)
    assert _rows(db_path, "SELECT count(*) FROM sessions") == [(1,)]


async def test_a_logged_out_session_cookie_cannot_be_replayed(
    logged_in: QuartClient, app: ServedApp
) -> None:
    token = _session_cookie(logged_in)
    assert token is not None
    page = await logged_in.get("/nurse/")
    await logged_in.post("/logout", form={"csrf_token": form_token(await page.get_data())})
    replay: QuartClient = app.test_client()  # type: ignore[assignment]
    replay.set_cookie("localhost", "__Host-session", token)
    assert (await replay.get("/nurse/")).status_code == 302


async def test_a_session_ends_after_twelve_hours_however_busy(
    logged_in: QuartClient, clock: FakeClock
) -> None:
    for _ in range(51):  # a request every 14 minutes (never idle), 11.9 h in all
        clock.advance(14 * 60)
        assert (await logged_in.get("/nurse/")).status_code == 200
    clock.advance(14 * 60)  # 12.1 h after login
    assert (await logged_in.get("/nurse/")).status_code == 302


async def test_the_mfa_challenge_cookie_is_host_bound_strict_and_short_lived(
    client: QuartClient, store: Store, clock: FakeClock
) -> None:
    await db.run_sync(
        store.connection, users.create_user, ADMIN, ADMIN_PASSWORD, users.Role.ADMIN, now=clock()
    )
    response = await submit_login(client, ADMIN, ADMIN_PASSWORD)
    [cookie] = [h for h in response.headers.getlist("Set-Cookie") if h.startswith("__Host-mfa=")]
    lowered = cookie.lower()
    for flag in ("secure", "httponly", "samesite=strict", "path=/", "max-age=300"):
        assert flag in lowered, flag
    assert "domain=" not in lowered
    clock.advance(301)
    assert (await client.get("/mfa/enrol")).location.startswith("/login")
