"""Sessions, cookies, CSRF and headers across the whole app (what test_auth.py, test_admin.py
and test_mfa.py do not already cover): a live planted session, replay after logout on every
kind of request, idle expiry for every staff role, the flags of every cookie the app sets,
CSRF on every unsafe route of the url_map, and the headers of error pages."""

from __future__ import annotations

from http.cookies import Morsel, SimpleCookie

import pytest
from quart.testing import QuartClient
from quart.typing import TestAppProtocol as AppClientFactory

from appliance import db, users
from appliance.device_registry import DeviceRegistry, StationKind
from appliance.store import Store
from tests.web.conftest import PASSWORD, FakeClock, form_token, login, submit_login
from tests.web.test_kiosk import STATION, _issue_code
from tests.web.test_provider import issue_link, seed, visit_csrf
from tests.web.test_route_matrix import (
    Sent,
    World,
    build_path,
    build_world,
    header_problems,
    routes,
    send,
)
from web import health
from web.policy import CSRF_EXEMPT, POLICY, Audience

_FORM = {"Content-Type": "application/x-www-form-urlencoded"}
IDLE_S = 900  # demo config: web.session_idle_timeout_s
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Who sends each unsafe route in the CSRF sweep: the first audience the policy allows.
_PREFERENCE = (
    Audience.NURSE,
    Audience.ADMIN,
    Audience.PROVIDER,
    Audience.KIOSK,
    Audience.VISIT_LINK,
    Audience.MFA_VERIFY,
    Audience.MFA_ENROL,
    Audience.ANONYMOUS,
)


def _session_token(client: QuartClient) -> str | None:
    assert client.cookie_jar is not None
    return next((c.value for c in client.cookie_jar if c.name == "__Host-session"), None)


def _new_client(app: AppClientFactory) -> QuartClient:
    client: QuartClient = app.test_client()  # type: ignore[assignment]
    return client


# -- session fixation and replay ---------------------------------------------------------------


async def test_a_live_session_planted_before_login_is_ended_not_adopted(
    app: AppClientFactory, store: Store, clock: FakeClock
) -> None:
    """Fixation with a *valid* token: the attacker plants his own live session cookie in a
    browser showing the login form; the victim's login must get a new token and kill his."""
    await db.run_sync(
        store.connection, users.create_user, "victim1", PASSWORD, users.Role.NURSE, now=clock()
    )
    attacker = _new_client(app)
    assert await login(attacker) == 302
    planted = _session_token(attacker)
    assert planted is not None
    victim = _new_client(app)
    page = await victim.get("/login")  # the form is open before the cookie is planted
    victim.set_cookie("localhost", "__Host-session", planted)
    fields = {
        "username": "victim1",
        "password": PASSWORD,
        "csrf_token": form_token(await page.get_data()),
    }
    assert (await victim.post("/login", form=fields)).status_code == 302
    fresh = _session_token(victim)
    assert fresh not in (None, planted)
    assert (await attacker.get("/nurse/")).status_code == 302  # the planted session is gone
    rows = await store.query("SELECT u.username FROM sessions s JOIN users u ON u.id = s.user_id")
    assert rows == [("victim1",)]


async def test_after_logout_the_old_cookie_and_token_open_nothing(
    app: AppClientFactory, logged_in: QuartClient
) -> None:
    token = _session_token(logged_in)
    assert token is not None
    page = await logged_in.get("/nurse/")
    csrf = form_token(await page.get_data())
    assert (await logged_in.post("/logout", form={"csrf_token": csrf})).status_code == 302
    replay = _new_client(app)
    replay.set_cookie("localhost", "__Host-session", token)
    # A page, an event stream and a form post with the old session's own CSRF token.
    assert (await replay.get("/mfa/")).location.startswith("/login?next=/mfa/")
    stream = await replay.get("/nurse/events", headers={"Accept": "text/event-stream"})
    assert stream.status_code == 401
    posted = await replay.post(
        "/account/password",
        form={"csrf_token": csrf, "current_password": PASSWORD, "new_password": "x" * 16},
    )
    assert posted.status_code == 401
    assert await app.app.extensions["appliance"].store.query("SELECT 1 FROM sessions") == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("role", [users.Role.PROVIDER, users.Role.ADMIN])
async def test_every_staff_role_is_logged_off_after_fifteen_idle_minutes(
    app: AppClientFactory, store: Store, clock: FakeClock, role: users.Role
) -> None:
    # The nurse's case is tests/web/test_auth.py; admins and providers follow the same rule.
    await db.run_sync(store.connection, users.create_user, "staff9", PASSWORD, role, now=clock())
    client = _new_client(app)
    assert await login(client, "staff9") == 302
    clock.advance(IDLE_S - 1)
    assert (await client.get("/mfa/")).status_code == 200
    clock.advance(IDLE_S + 1)
    response = await client.get("/mfa/")
    assert response.location.startswith("/login?next=/mfa/")
    assert await store.query("SELECT 1 FROM sessions") == []


# -- cookies -------------------------------------------------------------------------------


def _morsels(headers: list[str]) -> dict[str, Morsel[str]]:
    found: dict[str, Morsel[str]] = {}
    for header in headers:
        parsed: SimpleCookie = SimpleCookie()
        parsed.load(header)
        found.update(parsed)
    return found


async def test_every_cookie_the_app_sets_is_prefixed_secure_httponly_and_same_site(
    app: AppClientFactory, store: Store, clock: FakeClock
) -> None:
    set_cookies: list[str] = []
    # The login form (nonce), the session, the MFA challenge (admin).
    await db.run_sync(
        store.connection, users.create_user, "admin9", PASSWORD, users.Role.ADMIN, now=clock()
    )
    browser = _new_client(app)
    set_cookies += (await browser.get("/login")).headers.getlist("Set-Cookie")
    set_cookies += (await submit_login(browser)).headers.getlist("Set-Cookie")
    set_cookies += (await submit_login(_new_client(app), "admin9")).headers.getlist("Set-Cookie")
    # The kiosk: pairing form nonce, then the station cookie.
    await DeviceRegistry(store).add_station(STATION, "Kiosk 1", StationKind.KIOSK, "user:test")
    await _issue_code(store, clock, "ABCDE23456")
    screen = _new_client(app)
    form = await screen.get("/kiosk/pair")
    set_cookies += form.headers.getlist("Set-Cookie")
    fields = {"code": "ABCDE23456", "csrf_token": form_token(await form.get_data())}
    paired = await screen.post("/kiosk/pair", form=fields)
    assert paired.status_code == 303
    set_cookies += paired.headers.getlist("Set-Cookie")
    # The remote provider's browser binding.
    seeded = await seed(store, clock)
    link = await issue_link(browser, seeded.encounter_id)
    provider = _new_client(app)
    body = await (await provider.get(f"/visit/{link}")).get_data()
    joined = await provider.post(f"/visit/{link}/join", form={"visit_csrf": visit_csrf(body)})
    set_cookies += joined.headers.getlist("Set-Cookie")

    morsels = _morsels(set_cookies)
    expected = {
        "__Host-login": "/",
        "__Host-session": "/",
        "__Host-mfa": "/",
        "__Secure-kiosk_pair": "/kiosk",
        "__Secure-kiosk": "/kiosk",
        "__Secure-visit": "/visit",
    }
    assert set(expected) <= set(morsels), sorted(morsels)
    for name, morsel in morsels.items():
        assert name.startswith(("__Host-", "__Secure-")), name
        assert morsel["secure"] is True, name
        assert morsel["httponly"] is True, name
        assert not morsel["domain"], name
        assert morsel["path"] == expected.get(name, "/"), name
        if name.startswith("__Host-"):
            assert morsel["path"] == "/", name
        # The visit cookie is Lax on purpose (docs/provider.md): the link is opened from a
        # mail or chat app, and its forms carry their own token.
        assert morsel["samesite"] == ("Lax" if name == "__Secure-visit" else "Strict"), name


# -- CSRF on every unsafe route ------------------------------------------------------------------


@pytest.fixture
async def world(app: AppClientFactory, store: Store, clock: FakeClock) -> World:
    return await build_world(app, store, clock)


async def test_every_unsafe_route_refuses_a_request_without_its_csrf_token(world: World) -> None:
    """Each unsafe route of the url_map, sent by an audience allowed to use it but without
    any token (no form field, no header): 403. Only the key-authenticated vendor API is
    exempt, and it reads no cookie."""
    accepted = []
    sent_count = 0
    for rule, method in routes(world.quart):
        if method not in _UNSAFE or rule.endpoint in CSRF_EXEMPT:
            continue
        allowed = POLICY[rule.endpoint].audiences
        holder = next((a for a in _PREFERENCE if a in allowed), None)
        assert holder is not None, f"{rule.endpoint}: nobody to send it as"
        if rule.endpoint == "auth.mfa_enrol":
            holder = Audience.MFA_ENROL  # the challenge's own token (the session's is below)
        path = build_path(world, rule, method)
        for audience in {holder, *(allowed & {Audience.NURSE})}:
            sent = await send(
                world, audience, method, path, endpoint=rule.endpoint, with_csrf=False
            )
            sent_count += 1
            if sent.status != 403:
                accepted.append(f"{rule.endpoint} {method} as {audience}: {sent.status}")
    assert sent_count >= 50
    assert not accepted, "unsafe requests accepted without a CSRF token:\n" + "\n".join(accepted)
    # Nothing was done: the staff sessions and the kiosk flow are still there.
    for audience in (Audience.NURSE, Audience.ADMIN, Audience.PROVIDER):
        assert (await send(world, audience, "GET", "/mfa/")).status == 200
    assert {"ingest.post_observation", "ingest.post_bundle"} == CSRF_EXEMPT


# -- headers on error pages and static files -------------------------------------------------------


async def test_error_pages_and_static_files_carry_the_security_headers(
    logged_in: QuartClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(_state: object) -> object:
        raise RuntimeError("synthetic failure")

    monkeypatch.setattr(health, "_snapshot", broken)
    responses = {
        "404": (await logged_in.get("/no-such-page"), 404, ""),
        "405": (await logged_in.get("/logout"), 405, ""),
        "413": (
            await logged_in.post("/logout", data=b"x=" + b"y" * (70 * 1024), headers=_FORM),
            413,
            "",
        ),
        "500": (await logged_in.get("/healthz"), 500, ""),
        "static": (await logged_in.get("/static/app.css"), 200, "static"),
        "static 404": (await logged_in.get("/static/no-such-file.css"), 404, "static"),
    }
    problems = []
    for name, (response, status, endpoint) in responses.items():
        assert response.status_code == status, name
        body = await response.get_data()
        assert b"Traceback" not in body, name
        assert b"synthetic failure" not in body, name
        sent = Sent(Audience.NURSE, endpoint or name, "GET", name, status, response.headers, body)
        problems += [f"{name}: {p}" for p in header_problems(sent)]
    assert not problems, problems
    # Static files are the one thing a browser may cache, and they carry no PHI.
    assert responses["static"][0].headers.get("Cache-Control") != "no-store"
    assert not POLICY["static"].phi


def test_phi_pages_are_named_in_the_policy_table() -> None:
    phi = {endpoint for endpoint, rule in POLICY.items() if rule.phi}
    # Spot checks of the table itself: the pages that show a patient are marked.
    assert {"chart.chart", "chart.photo", "nurse.vitals", "rpm_patient.patient"} <= phi
    assert {"provider.visit", "provider.photo", "kiosk.home"} <= phi
    assert not {"static", "health.healthz", "health.metrics", "auth.login_form"} & phi
