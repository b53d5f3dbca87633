"""The web app over a real store on a temp SQLite file, with a login helper and a fake clock;
and a page's video signalling WebSocket (``Peer``), for the tests that take a seat in a call."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pyotp
import pytest
from quart import Quart, Response
from quart.testing import QuartClient
from quart.typing import TestAppProtocol
from quart.typing import TestWebsocketConnectionProtocol as WebsocketConnection

from appliance import db, users
from appliance.config import Config, demo_config
from appliance.store import Store
from web.app import create_app

NURSE = "nurse1"
PASSWORD = "correct horse battery"
_TOKEN = re.compile(rb'name="csrf_token" value="([^"]+)"')
_SECRET = re.compile(rb'<code id="secret" class="secret">([A-Z2-7 ]+)</code>')
_RECOVERY = re.compile(rb"<li><code>([a-z0-9-]{19})</code></li>")
ORIGIN = {"Origin": "http://localhost"}  # the app's own: signalling refuses other origins


@dataclass
class FakeClock:
    """The app's clock; tests move it instead of sleeping."""

    now: datetime

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock(config: Config) -> FakeClock:
    """Now, but never within an hour of the site's midnight (moved forward to 01:00 then).

    Tests seed check-ins minutes before "now": run just after the site's midnight (06:00 UTC
    for the demo site's America/Chicago), those fell on "yesterday", outside today's
    arrivals. Only forward: the store stamps its own times with the wall clock, and those
    must not lie in the app's future (a whole run with this clock 12 h ahead passes; 12 h
    behind, the outbox's oldest age comes out negative).
    """
    now = datetime.now(UTC).replace(microsecond=0)
    local = now.astimezone(ZoneInfo(config.site.timezone))
    if local.hour in (23, 0):
        one_am = local.replace(hour=1, minute=0, second=0) + timedelta(
            days=1 if local.hour == 23 else 0
        )
        now = one_am.astimezone(UTC)
    return FakeClock(now)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    # The demo configuration puts the database and KEK where the shared `store` fixture does.
    return demo_config(tmp_path)


@pytest.fixture
async def app(config: Config, store: Store, clock: FakeClock) -> AsyncIterator[TestAppProtocol]:
    await db.run_sync(
        store.connection, users.create_user, NURSE, PASSWORD, users.Role.NURSE, now=clock()
    )
    quart_app: Quart = create_app(config, store, clock=clock, sse_poll_s=0.02)
    async with quart_app.test_app() as test_app:
        yield test_app


@pytest.fixture
def client(app: TestAppProtocol) -> QuartClient:
    return app.test_client()  # type: ignore[return-value]


def form_token(body: bytes) -> str:
    """The CSRF token of the first form on a page."""
    found = _TOKEN.search(body)
    assert found is not None, "no csrf_token field on the page"
    return found.group(1).decode()


async def submit_login(
    client: QuartClient, username: str = NURSE, password: str = PASSWORD, **extra: str
) -> Response:
    """Fetch the login form and submit it as a browser would (with its CSRF token)."""
    page = await client.get("/login")
    fields = {"username": username, "password": password, **extra}
    fields["csrf_token"] = form_token(await page.get_data())
    return await client.post("/login", form=fields)


async def enrol_mfa(client: QuartClient) -> list[str]:
    """Set up TOTP on the enrolment page as a person with an authenticator app would.

    Returns the secret (base32) followed by the recovery codes shown.
    """
    page = await client.get("/mfa/enrol")
    body = await page.get_data()
    found = _SECRET.search(body)
    assert found is not None, "no secret on the enrolment page"
    secret = found.group(1).decode().replace(" ", "")
    now = client.app.extensions["appliance"].clock()
    code = pyotp.TOTP(secret).at(now)
    done = await client.post("/mfa/enrol", form={"code": code, "csrf_token": form_token(body)})
    assert done.status_code == 200, done.status_code
    codes = [c.decode() for c in _RECOVERY.findall(await done.get_data())]
    return [secret, *codes]


async def login(client: QuartClient, username: str = NURSE, password: str = PASSWORD) -> int:
    """Log in through the real form; returns the status of the POST.

    An administrator without a second factor is sent to enrol one first (issue 6): the
    helper enrols, so tests of other pages get a full administrator session.
    """
    response = await submit_login(client, username, password)
    if response.status_code == 302 and response.location.startswith("/mfa/enrol"):
        await enrol_mfa(client)
    return response.status_code


@pytest.fixture
async def logged_in(client: QuartClient) -> QuartClient:
    assert await login(client) == 302
    return client


class Peer:
    """One video signalling WebSocket as a page would hold it."""

    def __init__(self, ws: WebsocketConnection) -> None:
        self.ws = ws

    async def send(self, **fields: object) -> None:
        await self.ws.send(orjson.dumps(fields).decode())

    async def receive(self) -> dict[str, Any]:
        data = await asyncio.wait_for(self.ws.receive(), 5)
        message: dict[str, Any] = orjson.loads(data)
        return message

    async def expect(self, type_: str, **fields: object) -> dict[str, Any]:
        message = await self.receive()
        assert message["type"] == type_, message
        assert {k: message.get(k) for k in fields} == fields, message
        return message


async def both_in(nurse: Peer, provider: Peer, visit: str, nurse_csrf: str, link: str) -> str:
    """The nurse joins the visit, then the provider (waiting), each told of the other; the
    provider's participant id."""
    await nurse.send(type="join", visit=visit, role="nurse", token=nurse_csrf)
    await nurse.expect("joined")
    await provider.send(type="join", visit=visit, role="provider", token=link)
    provider_id: str = (await provider.expect("joined"))["participant"]
    await provider.expect("participant", role="nurse")
    await nurse.expect("participant", participant=provider_id)
    return provider_id


async def admit(nurse: Peer, provider: Peer, provider_id: str) -> None:
    """The nurse admits the waiting provider; both are told."""
    await nurse.send(type="admit", participant=provider_id)
    for each in (nurse, provider):
        await each.expect("admitted", participant=provider_id)
