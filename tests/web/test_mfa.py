"""TOTP second factor: forced enrolment for admins, the pre-MFA step, replay, recovery codes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pyotp
import pytest
from quart.testing import QuartClient

from appliance import db, key_rotation, keys, users
from appliance.store import Store
from tests.web.conftest import (
    NURSE,
    FakeClock,
    enrol_mfa,
    form_token,
    login,
    submit_login,
)
from web.app import AppState

ADMIN = "admin1"
ADMIN_PASSWORD = "admin horse battery staple"


@pytest.fixture
async def admin(store: Store, clock: FakeClock) -> str:
    await db.run_sync(
        store.connection, users.create_user, ADMIN, ADMIN_PASSWORD, users.Role.ADMIN, now=clock()
    )
    return ADMIN


def _rows(db_path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _audit(db_path: Path) -> list[tuple[object, ...]]:
    return _rows(db_path, "SELECT actor, action, outcome, detail FROM audit ORDER BY id")


def _cookie(client: QuartClient, name: str) -> str | None:
    assert client.cookie_jar is not None
    return next((c.value for c in client.cookie_jar if c.name == name), None)


async def _enrolled_admin(client: QuartClient) -> str:
    """Log the admin in (enrolling), log out; returns the TOTP secret."""
    response = await submit_login(client, ADMIN, ADMIN_PASSWORD)
    assert response.location == "/mfa/enrol"
    secret, *_codes = await enrol_mfa(client)
    await _logout(client)
    return secret


async def _logout(client: QuartClient) -> None:
    page = await client.get("/mfa/")
    await client.post("/logout", form={"csrf_token": form_token(await page.get_data())})


async def _code_step(client: QuartClient, code: str) -> int:
    page = await client.get("/login/mfa")
    assert page.status_code == 200
    token = form_token(await page.get_data())
    response = await client.post("/login/mfa", form={"code": code, "csrf_token": token})
    return response.status_code


async def test_an_admin_without_mfa_is_sent_to_enrol_and_has_no_session_until_then(
    client: QuartClient, admin: str, db_path: Path
) -> None:
    response = await submit_login(client, admin, ADMIN_PASSWORD, next="/sync/")
    assert response.status_code == 302
    assert response.location == "/mfa/enrol"
    # The password alone gives a challenge cookie, not a session: nothing else opens.
    assert _cookie(client, "__Host-session") is None
    assert _cookie(client, "__Host-mfa") is not None
    assert _rows(db_path, "SELECT count(*) FROM sessions") == [(0,)]
    assert (await client.get("/sync/")).status_code == 302
    assert (await client.get("/admin/users")).status_code == 302
    page = await client.get("/mfa/enrol")
    body = await page.get_data()
    assert page.status_code == 200
    assert b'src="data:image/svg+xml' in body
    assert b"Administrator accounts must use a second step" in body


async def test_enrolment_stores_the_secret_sealed_and_starts_a_fresh_session(
    client: QuartClient, admin: str, db_path: Path
) -> None:
    await submit_login(client, admin, ADMIN_PASSWORD)
    secret, *codes = await enrol_mfa(client)
    assert len(set(codes)) == 10
    token = _cookie(client, "__Host-session")
    assert token is not None
    assert _cookie(client, "__Host-mfa") is None
    [(sealed,)] = _rows(db_path, "SELECT secret FROM mfa_totp")
    assert isinstance(sealed, bytes)
    assert secret.encode() not in sealed
    assert secret.encode() not in db_path.read_bytes()
    stored = _rows(db_path, "SELECT code_hash FROM mfa_recovery_codes")
    assert len(stored) == 10
    assert not any(c.replace("-", "").encode() in db_path.read_bytes() for c in codes)
    assert (await client.get("/admin/users")).status_code == 200
    assert (f"user:{ADMIN}", "config", "success", "second factor enrolled") in _audit(db_path)


async def test_a_wrong_enrolment_code_does_not_enrol(
    client: QuartClient, admin: str, db_path: Path
) -> None:
    await submit_login(client, admin, ADMIN_PASSWORD)
    page = await client.get("/mfa/enrol")
    for code in ("000000", "²²²²²²"):  # before: the second was a TypeError, a 500
        response = await client.post(
            "/mfa/enrol", form={"code": code, "csrf_token": form_token(await page.get_data())}
        )
        assert response.status_code == 400
    assert _rows(db_path, "SELECT confirmed_at FROM mfa_totp") == [(None,)]
    assert _cookie(client, "__Host-session") is None


async def test_login_with_password_and_totp_and_the_code_cannot_be_replayed(
    client: QuartClient, admin: str, clock: FakeClock, db_path: Path
) -> None:
    secret = await _enrolled_admin(client)
    clock.advance(60)  # a later time step than the enrolment code
    response = await submit_login(client, admin, ADMIN_PASSWORD, next="/admin/users")
    assert response.location == "/login/mfa"
    code = pyotp.TOTP(secret).at(clock())
    assert await _code_step(client, code) == 302
    first = _cookie(client, "__Host-session")
    assert first is not None
    assert (await client.get("/admin/users")).status_code == 200
    assert (f"user:{ADMIN}", "login", "success", "password + totp") in _audit(db_path)
    await _logout(client)
    # Same code, same 30 s window: refused (RFC 6238 section 5.2, ASVS V2.8.4).
    await submit_login(client, admin, ADMIN_PASSWORD)
    assert await _code_step(client, code) == 401
    assert (f"user:{ADMIN}", "login_failed", "failure", "second factor wrong") in _audit(db_path)
    clock.advance(30)
    assert await _code_step(client, pyotp.TOTP(secret).at(clock())) == 302
    assert _cookie(client, "__Host-session") not in (None, first)


async def test_an_older_code_is_refused_after_a_newer_one_was_used(
    client: QuartClient, admin: str, clock: FakeClock
) -> None:
    secret = await _enrolled_admin(client)
    clock.advance(90)
    await submit_login(client, admin, ADMIN_PASSWORD)
    assert await _code_step(client, pyotp.TOTP(secret).at(clock())) == 302
    await _logout(client)
    await submit_login(client, admin, ADMIN_PASSWORD)
    # The previous step is inside the drift window, but older than the one just used.
    assert await _code_step(client, pyotp.TOTP(secret).at(clock(), counter_offset=-1)) == 401


async def test_a_recovery_code_works_once(client: QuartClient, admin: str) -> None:
    await submit_login(client, admin, ADMIN_PASSWORD)
    _secret, *codes = await enrol_mfa(client)
    await _logout(client)
    await submit_login(client, admin, ADMIN_PASSWORD)
    assert await _code_step(client, codes[3].upper()) == 302
    await _logout(client)
    await submit_login(client, admin, ADMIN_PASSWORD)
    assert await _code_step(client, codes[3]) == 401
    assert await _code_step(client, codes[4]) == 302


async def test_code_failures_are_throttled_and_the_challenge_dies_after_five(
    client: QuartClient, admin: str
) -> None:
    await _enrolled_admin(client)
    state: AppState = client.app.extensions["appliance"]
    await submit_login(client, admin, ADMIN_PASSWORD)
    for _ in range(4):
        assert await _code_step(client, "123456") == 401
    page = await client.get("/login/mfa")
    response = await client.post(
        "/login/mfa", form={"code": "123456", "csrf_token": form_token(await page.get_data())}
    )
    assert response.status_code == 302
    assert response.location == "/login"
    assert (await client.get("/login/mfa")).location == "/login"
    assert state.throttle.delay_s((f"mfa:{ADMIN}", "ip:<local>"), state.clock()) > 0
    # The password throttle is separate: a correct password does not clear code failures.
    await submit_login(client, admin, ADMIN_PASSWORD)
    assert state.throttle.delay_s((f"mfa:{ADMIN}",), state.clock()) > 0


async def test_the_mfa_form_needs_the_challenge_csrf_token(client: QuartClient, admin: str) -> None:
    secret = await _enrolled_admin(client)
    await submit_login(client, admin, ADMIN_PASSWORD)
    state: AppState = client.app.extensions["appliance"]
    code = pyotp.TOTP(secret).at(state.clock())
    response = await client.post("/login/mfa", form={"code": code})
    assert response.status_code == 403


async def test_mfa_is_optional_for_a_nurse_and_then_required_at_her_login(
    client: QuartClient, clock: FakeClock, db_path: Path
) -> None:
    assert await login(client) == 302
    assert _cookie(client, "__Host-session") is not None
    account = await client.get("/mfa/")
    assert b"Off." in await account.get_data()
    before = _cookie(client, "__Host-session")
    secret, *_codes = await enrol_mfa(client)
    assert _cookie(client, "__Host-session") != before  # new session id after enrolment
    await _logout(client)
    clock.advance(60)
    response = await submit_login(client)
    assert response.location == "/login/mfa"
    assert await _code_step(client, pyotp.TOTP(secret).at(clock())) == 302
    # She may turn it off again with a current code.
    clock.advance(30)
    page = await client.get("/mfa/")
    response = await client.post(
        "/mfa/remove",
        form={
            "code": pyotp.TOTP(secret).at(clock()),
            "csrf_token": form_token(await page.get_data()),
        },
    )
    assert response.status_code == 302
    assert _rows(db_path, "SELECT count(*) FROM mfa_totp") == [(0,)]
    assert (f"user:{NURSE}", "config", "success", "second factor removed") in _audit(db_path)


async def test_an_admin_cannot_turn_mfa_off(client: QuartClient, admin: str) -> None:
    await submit_login(client, admin, ADMIN_PASSWORD)
    secret, *_ = await enrol_mfa(client)
    page = await client.get("/mfa/")
    assert b"/mfa/remove" not in await page.get_data()
    state: AppState = client.app.extensions["appliance"]
    response = await client.post(
        "/mfa/remove",
        form={
            "code": pyotp.TOTP(secret).at(state.clock()),
            "csrf_token": form_token(await page.get_data()),
        },
    )
    assert response.status_code == 403


async def test_key_rotation_reseals_the_totp_secret(
    client: QuartClient, admin: str, clock: FakeClock, db_path: Path, kek_path: Path
) -> None:
    await submit_login(client, admin, ADMIN_PASSWORD)
    secret, *_ = await enrol_mfa(client)
    [(before,)] = _rows(db_path, "SELECT secret FROM mfa_totp")
    conn = db.connect_sync(db_path)
    try:
        kek = keys.read_kek_file(kek_path)
        version = key_rotation.rotate_data_key(conn, kek)
        key_rotation.reencrypt(conn, kek)
        keyring = keys.load_keyring(conn, kek)
        [(user_id, after)] = conn.execute("SELECT user_id, secret FROM mfa_totp").fetchall()
        assert int.from_bytes(after[:4], "big") == version != int.from_bytes(before[:4], "big")
        assert keyring.unseal("mfa_totp.secret", str(user_id), after) == secret
    finally:
        conn.close()


async def test_an_admin_signs_in_with_totp_after_a_data_key_rotation_in_another_process(
    client: QuartClient, admin: str, clock: FakeClock, db_path: Path, kek_path: Path
) -> None:
    secret = await _enrolled_admin(client)
    # `appliance keys rotate data` while the web process runs: the secret is re-sealed
    # under the new key and the old one retired.
    conn = db.connect_sync(db_path)
    try:
        kek = keys.read_kek_file(kek_path)
        key_rotation.rotate_data_key(conn, kek)
        assert key_rotation.reencrypt(conn, kek).retired_versions
    finally:
        conn.close()
    clock.advance(60)
    response = await submit_login(client, admin, ADMIN_PASSWORD)
    assert response.location == "/login/mfa"
    # Before: the web process opened it with the keys it loaded at start, which lack the
    # new one: no admin could sign in until a restart.
    assert await _code_step(client, pyotp.TOTP(secret).at(clock())) == 302
