"""Every route of the app as every audience, against the policy table of ``web/policy.py``.

The world: a real store with synthetic patients A (checked in at an exam room today: normal
access) and B (no care relationship), a nurse, a provider, an administrator (second factor
enrolled), a paired kiosk, a remote provider's browser bound to a visit link for A, a
vendor's API key, a local integration's read key, and two browsers half-way through a login (second factor pending). Each
route of ``app.url_map`` is sent by each of them — GET for safe methods, POST with the
audience's own valid CSRF token for unsafe ones — and what the guard did is compared with
the table. Every response is also checked for the security headers.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from urllib.parse import urlsplit

import pytest
from quart import Quart
from quart.testing import QuartClient
from quart.typing import TestAppProtocol as AppClientFactory
from werkzeug.datastructures import Headers
from werkzeug.routing import Rule as UrlRule

from appliance import db, users
from appliance.config import Config
from appliance.device_registry import DeviceRegistry, StationKind
from appliance.store import Store
from services.vendor_keys import KeyScope, VendorKeys
from tests.web.conftest import NURSE, PASSWORD, FakeClock, form_token, login, submit_login
from tests.web.test_kiosk import _identified, _paired
from tests.web.test_provider import Seeded, issue_link, join, seed, visit_csrf
from web.app import CONTENT_SECURITY_POLICY, create_app
from web.policy import POLICY, Audience, unclassified

PROVIDER_USER, ADMIN_USER, SPARE_USER, WALK_IN_USER = "prov1", "admin1", "spare1", "walkin1"
FRESH_ADMIN = "admin2"  # an administrator who has not set up a second factor yet
EXAM_ROOM = "exam-1"
NO_ID = "999999"  # a well-formed id of nothing: the guard runs first, then the 404
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_KIOSK_META = re.compile(rb'name="kiosk-csrf" content="([^"]+)"')
# Where a refused browser is sent: to log in, to pair the kiosk, or through a forced step.
_REFUSAL_PATHS = frozenset({"/login", "/kiosk/pair", "/mfa/enrol", "/account/password"})
# The session-ending probes run last for each audience, login after logout.
_LAST = ("auth.logout", "auth.login")
AUDIENCES = tuple(Audience)


@dataclass
class Sent:
    """One request as sent and what came back (the first chunk only of an event stream)."""

    audience: Audience
    endpoint: str
    method: str
    path: str
    status: int
    headers: Headers
    body: bytes


@dataclass
class World:
    """The app, its synthetic data and one client per audience."""

    app: AppClientFactory
    store: Store
    seeded: Seeded
    visit_token: str
    api_key: str
    spare_id: int
    clients: dict[Audience, QuartClient] = field(default_factory=dict)
    csrf: dict[Audience, str] = field(default_factory=dict)  # each audience's own token
    link_csrf: str = ""  # the visit link's form token (field ``visit_csrf``)
    read_key: str = ""  # a local integration's read key (web/fhir_api.py)

    @property
    def quart(self) -> Quart:
        found: Quart = self.app.app  # type: ignore[attr-defined]
        return found

    def params(self, patient_id: str | None = None, media_id: str | None = None) -> dict[str, str]:
        """A value for every path parameter of the app (patient A's unless told)."""
        return {
            "patient_id": patient_id or self.seeded.patient_id,
            "media_id": media_id or self.seeded.media_id,
            "token": self.visit_token,
            "user_id": str(self.spare_id),
            "filename": "app.css",
            "device_id": "no-such-device",
            "station_id": "no-such-station",
            **dict.fromkeys(
                ("grant_id", "claim_id", "alert_id", "outbox_id", "review_id", "held_id"), NO_ID
            ),
            "link_id": NO_ID,
            "rtype": "Patient",  # the FHIR read API: read and search
            "rid": NO_ID,
        }

    def scope(self, audience: Audience) -> dict[str, object]:
        # One client address per audience: per-address throttles (vendor-key failures,
        # unknown visit links, pairing attempts) must not leak between audiences.
        return {"client": (f"10.0.0.{AUDIENCES.index(audience) + 10}", 40000)}


def _new_client(app: AppClientFactory) -> QuartClient:
    client: QuartClient = app.test_client()  # type: ignore[assignment]
    return client


async def _create_user(store: Store, clock: FakeClock, name: str, role: users.Role) -> int:
    user_id: int = await db.run_sync(
        store.connection, users.create_user, name, PASSWORD, role, now=clock()
    )
    return user_id


async def build_world(app: AppClientFactory, store: Store, clock: FakeClock) -> World:
    """Everyone and everything the matrix needs (the nurse ``nurse1`` comes from conftest)."""
    await _create_user(store, clock, PROVIDER_USER, users.Role.PROVIDER)
    await _create_user(store, clock, ADMIN_USER, users.Role.ADMIN)
    await _create_user(store, clock, FRESH_ADMIN, users.Role.ADMIN)
    await _create_user(store, clock, WALK_IN_USER, users.Role.NURSE)
    spare_id = await _create_user(store, clock, SPARE_USER, users.Role.NURSE)
    seeded = await seed(store, clock)
    registry = DeviceRegistry(store)
    await registry.add_station(EXAM_ROOM, "Exam 1", StationKind.EXAM_ROOM, "user:test")
    await registry.check_in(EXAM_ROOM, seeded.patient_id, "user:test")  # A: normal access
    api_key = await VendorKeys(store).add("acme-hubs", "user:test")

    clients = {audience: _new_client(app) for audience in Audience}
    for audience, name in (
        (Audience.NURSE, NURSE),
        (Audience.PROVIDER, PROVIDER_USER),
        (Audience.ADMIN, ADMIN_USER),  # the helper enrols the required second factor
    ):
        assert await login(clients[audience], name) == 302, name
    read_key = await VendorKeys(store).add("ehr-bridge", "user:test", scope=KeyScope.READ)
    world = World(app, store, seeded, "", api_key, spare_id, clients, read_key=read_key)
    world.visit_token = await issue_link(clients[Audience.NURSE], seeded.encounter_id)
    world.link_csrf = visit_csrf(await join(clients[Audience.VISIT_LINK], world.visit_token))
    clients[Audience.KIOSK] = await _paired(app, store)
    verify = await submit_login(clients[Audience.MFA_VERIFY], ADMIN_USER)
    assert verify.location == "/login/mfa"
    enrol = await submit_login(clients[Audience.MFA_ENROL], FRESH_ADMIN)
    assert enrol.location == "/mfa/enrol"

    for audience in (Audience.NURSE, Audience.PROVIDER, Audience.ADMIN):
        page = await clients[audience].get("/mfa/")
        world.csrf[audience] = form_token(await page.get_data())
    page = await clients[Audience.MFA_VERIFY].get("/login/mfa")
    world.csrf[Audience.MFA_VERIFY] = form_token(await page.get_data())
    page = await clients[Audience.MFA_ENROL].get("/mfa/enrol")
    world.csrf[Audience.MFA_ENROL] = form_token(await page.get_data())
    return world


# -- sending -----------------------------------------------------------------------------


async def kiosk_token(client: QuartClient) -> str:
    """The kiosk flow's current CSRF token (a reset or a finished flow makes a new one)."""
    found = _KIOSK_META.search(await (await client.get("/kiosk/")).get_data())
    assert found is not None, "no kiosk CSRF token on the page"
    return found.group(1).decode()


async def send(
    world: World,
    audience: Audience,
    method: str,
    path: str,
    *,
    endpoint: str = "",
    form: Mapping[str, str] | None = None,
    with_csrf: bool = True,
) -> Sent:
    """Send as ``audience``: its cookies, its key or CSRF token, its own client address.

    A GET is read through a raw connection so an event stream answers with its headers and
    first chunk instead of never ending.
    """
    client = world.clients[audience]
    headers: dict[str, str] = {}
    if audience is Audience.API_KEY:
        headers["Authorization"] = f"Bearer {world.api_key}"
    if audience is Audience.READ_KEY:
        headers["Authorization"] = f"Bearer {world.read_key}"
    scope = world.scope(audience)
    if method not in _UNSAFE:
        async with client.request(path, method=method, headers=headers, scope_base=scope) as conn:
            await conn.send_complete()
            first = await asyncio.wait_for(conn.receive(), 5.0)
            await conn.disconnect()
        assert conn.status_code is not None
        assert conn.headers is not None
        return Sent(audience, endpoint, method, path, conn.status_code, conn.headers, first)
    fields = dict(form or {})
    if with_csrf:
        token = world.csrf.get(audience)
        if audience is Audience.KIOSK:
            token = await kiosk_token(client)
        if token is not None:
            headers["X-CSRF-Token"] = token
            fields.setdefault("csrf_token", token)
        fields.setdefault("visit_csrf", world.link_csrf)
    response = await client.open(
        path, method=method, form=fields, headers=headers, scope_base=scope
    )
    body = await response.get_data()
    return Sent(audience, endpoint, method, path, response.status_code, response.headers, body)


def refused(sent: Sent) -> bool:
    """The app's ways of saying no: 401, 403, or off to log in, pair or a forced step."""
    if sent.status in (401, 403):
        return True
    if 300 <= sent.status < 400:
        return urlsplit(sent.headers.get("Location", "")).path in _REFUSAL_PATHS
    return False


def _ends_session(sent: Sent) -> bool:
    cookies = SimpleCookie()
    for header in sent.headers.getlist("Set-Cookie"):
        cookies.load(header)
    morsel = cookies.get("__Host-session")
    return sent.status == 302 and morsel is not None and morsel.value == ""


def _code_checked(sent: Sent) -> bool:
    # A wrong code is answered 401 with the form again: the view ran. A refusal is 403 or
    # a redirect to the login page.
    return sent.status == 401 or not refused(sent)


# How to tell "the view ran" where the default (not refused, no crash) cannot.
REACHED: dict[str, Callable[[Sent], bool]] = {
    "auth.logout": _ends_session,  # everyone is sent to /login afterwards
    "auth.mfa_verify": _code_checked,
}


def reached(sent: Sent) -> bool:
    """Whether the request got past the guard to the view."""
    check = REACHED.get(sent.endpoint)
    if check is not None:
        return check(sent)
    return not refused(sent)


def header_problems(sent: Sent) -> list[str]:
    """What is missing from the security headers of one response."""
    h = sent.headers
    expected = {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
    }
    problems = [f"{name}={h.get(name)!r}" for name, want in expected.items() if h.get(name) != want]
    if not h.get("Strict-Transport-Security", "").startswith("max-age="):
        problems.append("no HSTS")
    if sent.endpoint != "static" and h.get("Cache-Control") != "no-store":
        problems.append(f"Cache-Control={h.get('Cache-Control')!r}")
    return problems


async def login_probe(world: World, audience: Audience) -> Sent:
    """POST /login as a browser would: with the form's nonce cookie and signed token."""
    form_page = _new_client(world.app)
    page = await form_page.get("/login")
    token = form_token(await page.get_data())
    assert form_page.cookie_jar is not None
    nonce = next(c.value for c in form_page.cookie_jar if c.name == "__Host-login")
    assert nonce is not None
    world.clients[audience].set_cookie("localhost", "__Host-login", nonce)
    fields = {"username": WALK_IN_USER, "password": PASSWORD, "csrf_token": token}
    return await send(
        world, audience, "POST", "/login", endpoint="auth.login", form=fields, with_csrf=False
    )


async def pair_probe(world: World, audience: Audience) -> Sent:
    """POST /kiosk/pair with the pairing form's token and a code nobody issued."""
    client = world.clients[audience]
    page = await client.get("/kiosk/pair", scope_base=world.scope(audience))
    found = re.search(rb'name="csrf_token" value="([^"]+)"', await page.get_data())
    assert found is not None
    fields = {"code": "ABCDEFGHJK", "csrf_token": found.group(1).decode()}
    return await send(
        world, audience, "POST", "/kiosk/pair", endpoint="kiosk.pair", form=fields, with_csrf=False
    )


def routes(app: Quart) -> list[tuple[UrlRule, str]]:
    """Every (rule, method) of the app, HEAD and OPTIONS aside."""
    found = []
    for rule in app.url_map.iter_rules():
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            found.append((rule, method))

    def order(rm: tuple[UrlRule, str]) -> tuple[int, str, str]:
        rule, method = rm
        last = _LAST.index(rule.endpoint) + 1 if rule.endpoint in _LAST else 0
        return last, rule.rule, method

    return sorted(found, key=order)


def build_path(world: World, rule: UrlRule, method: str, **params: str) -> str:
    values = world.params(**params)
    missing = [a for a in rule.arguments if a not in values]
    assert not missing, f"give tests/web/test_route_matrix.py a value for {missing} ({rule.rule})"
    adapter = world.quart.url_map.bind("localhost")
    path: str = adapter.build(rule.endpoint, {a: values[a] for a in rule.arguments}, method=method)
    return path


async def probe(world: World, audience: Audience, rule: UrlRule, method: str) -> Sent:
    """One route as one audience, sent as that audience would legitimately send it."""
    if rule.endpoint == "auth.login" and method == "POST":
        return await login_probe(world, audience)
    if rule.endpoint == "kiosk.pair" and method == "POST":
        return await pair_probe(world, audience)
    path = build_path(world, rule, method)
    return await send(world, audience, method, path, endpoint=rule.endpoint)


def deviation_table(rows: Iterable[tuple[str, str, str, str, str]]) -> str:
    lines = [f"{'endpoint':32} {'method':6} {'audience':13} {'policy':7} got"]
    lines += [f"{e:32} {m:6} {a:13} {p:7} {g}" for e, m, a, p, g in rows]
    return "\n".join(lines)


# -- the tests ---------------------------------------------------------------------------


@pytest.fixture
async def world(app: AppClientFactory, store: Store, clock: FakeClock) -> World:
    return await build_world(app, store, clock)


def test_every_route_is_classified_in_the_policy_table(app: AppClientFactory) -> None:
    quart: Quart = app.app  # type: ignore[attr-defined]
    endpoints = {rule.endpoint for rule in quart.url_map.iter_rules()}
    missing = unclassified(endpoints)
    assert not missing, (
        "routes missing from web/policy.py POLICY (add an entry naming who may reach each; "
        f"see docs/security.md, 'Route policy'): {', '.join(missing)}"
    )
    assert not set(POLICY) - endpoints, f"stale entries in POLICY: {set(POLICY) - endpoints}"


async def test_an_unclassified_route_is_refused_at_run_time(
    config: Config, store: Store, clock: FakeClock
) -> None:
    quart = create_app(config, store, clock=clock)

    async def surprise() -> str:
        return "should never be served"

    quart.add_url_rule("/surprise", "surprise", surprise)
    async with quart.test_app() as served:
        response = await served.test_client().get("/surprise")
    assert response.status_code == 403
    assert b"should never be served" not in await response.get_data()


@pytest.mark.slow
async def test_every_route_as_every_audience_follows_the_policy_table(world: World) -> None:
    deviations: list[tuple[str, str, str, str, str]] = []
    header_issues: list[str] = []
    checked = 0
    for audience in AUDIENCES:
        for rule, method in routes(world.quart):
            sent = await probe(world, audience, rule, method)
            checked += 1
            allowed = audience in POLICY[rule.endpoint].audiences
            got = f"{sent.status} {sent.headers.get('Location', '')}".strip()
            degraded = sent.status == 503 and rule.endpoint == "health.healthz"  # no heartbeats
            if sent.status >= 500 and not degraded:
                deviations.append((rule.endpoint, method, audience, "-", f"error {got}"))
            elif reached(sent) != allowed:
                want = "allow" if allowed else "deny"
                deviations.append((rule.endpoint, method, audience, want, got))
            header_issues += [
                f"{rule.endpoint} {method} {audience}: {p}" for p in header_problems(sent)
            ]
    assert checked >= len(AUDIENCES) * len(POLICY)
    assert not deviations, "deviations from web/policy.py:\n" + deviation_table(deviations)
    assert not header_issues, "\n".join(header_issues)


# -- one patient's access does not open another's --------------------------------------------


async def test_no_patient_route_opens_a_patient_outside_the_care_relationship(
    world: World,
) -> None:
    """Patient B (not checked in, not enrolled) through every patient route, every staff role.

    GET and POST alike, with the role's valid CSRF token: refused (break-glass needed), the
    refusal audited as denied, nothing of B on the page, nothing written for B.
    """
    other = world.seeded.other_id
    rows = [(r, m) for r, m in routes(world.quart) if "patient_id" in r.arguments]
    assert {r.endpoint for r, _m in rows} >= {"chart.chart", "rpm_patient.patient"}
    key = world.store.patient_key(f"Patient/{other}")
    before = await world.store.query("SELECT count(*) FROM audit WHERE patient_key = ?", (key,))
    leaks = []
    tried = 0
    for audience in (Audience.NURSE, Audience.ADMIN, Audience.PROVIDER):
        for rule, method in rows:
            if audience not in POLICY[rule.endpoint].audiences:
                continue  # the role itself is refused: the matrix covers that
            path = build_path(
                world, rule, method, patient_id=other, media_id=world.seeded.other_media_id
            )
            sent = await send(world, audience, method, path, endpoint=rule.endpoint)
            tried += 1
            if sent.status != 403 or b"Zzother" in sent.body:
                leaks.append(f"{rule.endpoint} {method} {audience}: {sent.status}")
    assert tried >= 10
    assert not leaks, "patient B reached without a care relationship:\n" + "\n".join(leaks)
    rows_b = await world.store.query(
        "SELECT actor, action, outcome FROM audit WHERE patient_key = ? ORDER BY id", (key,)
    )
    new = rows_b[int(before[0][0]) :]
    assert len(new) == tried  # one denied read per attempt, nothing else about B
    assert {(str(action), str(outcome)) for _actor, action, outcome in new} == {("read", "denied")}
    assert (
        await world.store.query("SELECT 1 FROM rpm_enrollment WHERE patient_id = ?", (other,)) == []
    )


async def test_the_next_patient_at_the_kiosk_reads_nothing_of_the_previous_one(
    world: World,
) -> None:
    """Patient P is identified at the kiosk, then the flow is reset; every kiosk route is
    then sent again (with the new flow's token): no page shows P and the kiosk reads
    nothing more of P's record."""
    kiosk = world.clients[Audience.KIOSK]
    patient_id = await _identified(kiosk, world.store)  # "A. T.", shown at the confirm step
    reset = await send(world, Audience.KIOSK, "POST", "/kiosk/reset", endpoint="kiosk.reset")
    assert reset.status == 303
    key = world.store.patient_key(f"Patient/{patient_id}")
    mark = (await world.store.query("SELECT max(id) FROM audit"))[0][0]
    shown = []
    for rule, method in routes(world.quart):
        if rule.endpoint.startswith("kiosk.") and Audience.KIOSK in POLICY[rule.endpoint].audiences:
            sent = await probe(world, Audience.KIOSK, rule, method)
            page = sent.body
            if sent.status == 303:  # every kiosk step answers on /kiosk/
                page = (await send(world, Audience.KIOSK, "GET", "/kiosk/")).body
            if b"A. T." in page or patient_id.encode() in page or b"Testperson" in page:
                shown.append(f"{rule.endpoint} {method}")
    assert not shown, f"the previous patient shown by {shown}"
    later = await world.store.query(
        "SELECT action FROM audit WHERE id > ? AND patient_key = ?", (mark, key)
    )
    assert later == []
    flows = world.quart.extensions["kiosk"].flows
    assert all(flow.patient_id is None for flow in flows.values())
