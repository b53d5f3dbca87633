"""Login, logout, session cookies, CSRF, idle timeout and login throttling."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from http.cookies import SimpleCookie
from pathlib import Path

from quart.testing import QuartClient

from appliance import db, users
from appliance.store import Store
from appliance.users import LoginThrottle, Role
from tests.web.conftest import NURSE, FakeClock, form_token, login, submit_login
from web.app import AppState


def _audit(db_path: Path) -> list[tuple[str, str, str]]:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute("SELECT actor, action, outcome FROM audit ORDER BY id").fetchall()
    finally:
        conn.close()


async def test_wrong_password_shows_the_form_again_and_is_audited_as_failure(
    client: QuartClient, db_path: Path
) -> None:
    response = await submit_login(client, password="wrong password!")
    assert response.status_code == 401
    body = await response.get_data()
    assert b"Wrong username or password" in body
    assert b'name="password"' in body
    assert (f"user:{NURSE}", "login_failed", "failure") in _audit(db_path)
    assert (await client.get("/nurse/")).status_code == 302


async def test_unknown_account_is_audited_without_what_was_typed(
    client: QuartClient, db_path: Path
) -> None:
    assert await login(client, username="maybe-a-password", password="x" * 12) == 401
    assert ("user:(unknown)", "login_failed", "failure") in _audit(db_path)
    assert not any("maybe-a-password" in actor for actor, _, _ in _audit(db_path))


async def test_login_sets_a_strict_httponly_host_only_session_cookie(
    client: QuartClient, db_path: Path
) -> None:
    response = await submit_login(client)
    assert response.status_code == 302
    cookies = [h for h in response.headers.getlist("Set-Cookie") if "session=" in h]
    assert len(cookies) == 1
    parsed = SimpleCookie(cookies[0])
    # The demo config serves over TLS, so the cookie is Secure with the __Host- prefix.
    morsel = parsed["__Host-session"]
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "Strict"
    assert morsel["secure"] is True
    assert morsel["path"] == "/"
    assert not morsel["domain"]
    assert (f"user:{NURSE}", "login", "success") in _audit(db_path)


async def test_session_token_is_stored_only_as_its_hash(
    logged_in: QuartClient, db_path: Path
) -> None:
    assert logged_in.cookie_jar is not None
    token = next(c.value for c in logged_in.cookie_jar if c.name == "__Host-session")
    assert token is not None
    conn = sqlite3.connect(db_path)
    stored = conn.execute("SELECT token_hash FROM sessions").fetchall()
    conn.close()
    assert len(stored) == 1
    assert token.encode() not in stored[0][0]


async def test_login_without_the_form_token_is_refused(client: QuartClient) -> None:
    await client.get("/login")
    response = await client.post(
        "/login", form={"username": NURSE, "password": "correct horse battery"}
    )
    assert response.status_code == 403
    assert (await client.get("/nurse/")).status_code == 302


async def test_login_form_token_expires(client: QuartClient, clock: FakeClock) -> None:
    page = await client.get("/login")
    token = form_token(await page.get_data())
    clock.advance(601)
    response = await client.post(
        "/login",
        form={"username": NURSE, "password": "correct horse battery", "csrf_token": token},
    )
    assert response.status_code == 403


async def test_a_login_form_token_of_odd_digits_is_refused_not_a_500(client: QuartClient) -> None:
    page = await client.get("/login")
    mac = form_token(await page.get_data()).partition(".")[2]
    for token in ("²³.x", "9" * 400 + "." + mac, "1." + "é" * 64):
        response = await client.post(
            "/login",
            form={"username": NURSE, "password": "correct horse battery", "csrf_token": token},
        )
        assert response.status_code == 403  # before: ValueError / OverflowError / TypeError


async def test_post_without_session_csrf_token_is_refused(logged_in: QuartClient) -> None:
    response = await logged_in.post("/logout")
    assert response.status_code == 403
    assert b"Traceback" not in await response.get_data()
    # Still logged in: the forged logout did nothing.
    assert (await logged_in.get("/nurse/")).status_code == 200


async def test_logout_with_token_ends_the_session(logged_in: QuartClient, db_path: Path) -> None:
    page = await logged_in.get("/nurse/")
    token = form_token(await page.get_data())
    response = await logged_in.post("/logout", form={"csrf_token": token})
    assert response.status_code == 302
    assert (await logged_in.get("/nurse/")).status_code == 302
    assert (f"user:{NURSE}", "logout", "success") in _audit(db_path)


async def test_nurse_page_requires_login(client: QuartClient) -> None:
    response = await client.get("/nurse/", headers={"Accept": "text/html"})
    assert response.status_code == 302
    assert response.location.startswith("/login?next=/nurse/")


async def test_session_expires_after_idle_timeout(
    logged_in: QuartClient, clock: FakeClock, db_path: Path
) -> None:
    clock.advance(890)
    assert (await logged_in.get("/nurse/")).status_code == 200
    clock.advance(890)  # still alive: the last request restarted the idle timer
    assert (await logged_in.get("/nurse/")).status_code == 200
    clock.advance(901)
    assert (await logged_in.get("/nurse/")).status_code == 302
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT count(*) FROM sessions").fetchone()[0] == 0
    conn.close()


async def test_login_redirects_only_to_local_paths(client: QuartClient) -> None:
    response = await submit_login(client, next="//evil.example/")
    assert response.location == "/"


def test_throttle_slows_after_five_failures_and_caps_the_delay() -> None:
    throttle = LoginThrottle()
    now = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
    keys = ("account:nurse1", "ip:10.0.0.9")
    for _ in range(5):
        assert throttle.delay_s(keys, now) == 0
        throttle.failed(keys, now)
    delays = []
    for _ in range(6):
        delays.append(throttle.delay_s(keys, now))
        throttle.failed(keys, now)
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    # Another account from the same address is slowed too; nothing is ever locked.
    assert throttle.delay_s(("account:other", "ip:10.0.0.9"), now) == 5.0


def test_throttle_forgets_failures_after_the_window() -> None:
    throttle = LoginThrottle()
    start = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
    keys = ("account:nurse1", "ip:10.0.0.9")
    for _ in range(8):
        throttle.failed(keys, start)
    later = start.replace(minute=15, second=1)
    assert throttle.delay_s(keys, later) == 0


async def test_failed_logins_through_the_form_count_towards_the_throttle(
    client: QuartClient,
) -> None:
    state: AppState = client.app.extensions["appliance"]
    for _ in range(5):
        assert await login(client, password="wrong password!") == 401
    assert state.throttle.delay_s((f"account:{NURSE}", "ip:<local>"), state.clock()) > 0


async def test_each_role_lands_on_a_page_it_may_open(
    client: QuartClient, store: Store, clock: FakeClock
) -> None:
    """``/`` sends a provider to remote monitoring (a provider has no arrivals queue, and
    ``/nurse/`` would refuse them); nurses and anonymous visitors go to the queue."""
    assert (await client.get("/")).location == "/nurse/"
    await db.run_sync(
        store.connection,
        users.create_user,
        "prov1",
        "a long provider password",
        Role.PROVIDER,
        now=clock(),
    )
    assert await login(client, "prov1", "a long provider password") == 302
    home = await client.get("/")
    assert home.location == "/rpm/"
    assert (await client.get(home.location)).status_code == 200
    assert (await client.get("/nurse/")).status_code == 403
