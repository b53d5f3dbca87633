"""A signalling connection that drops: the seat waits, a new WebSocket resumes it with its token.

The real WebSocket routes of the app (Quart's test WebSockets, the real store and visit
link, as ``test_video_ws.py``) carry the nurse's and the provider's signalling; media is
aiortc on loopback (``tests/video/test_service.py``'s ``Client``), the patient an aiortc
participant of the app's own video service. docs/video.md, "Resuming after the signalling
connection drops".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import orjson
import pytest
from quart.testing import QuartClient
from quart.typing import TestWebsocketConnectionProtocol as WebsocketConnection

from appliance.store import Store
from services.video.service import VideoService
from tests.video.peers import wait_for
from tests.video.test_service import Client, flowing
from tests.web.conftest import ORIGIN
from tests.web.test_provider import Seeded
from tests.web.test_video_ws import (  # noqa: F401 - fixtures
    link,
    nurse,
    nurse_csrf,
    provider,
    seeded,
)


class Parties(NamedTuple):
    """The nurse's and the provider's browsers, the link, the nurse's token, the visit."""

    nurse: QuartClient
    provider: QuartClient
    link: str
    nurse_csrf: str
    seeded: Seeded


@pytest.fixture
def parties(
    nurse: QuartClient,  # noqa: F811 - the fixtures imported above
    provider: QuartClient,  # noqa: F811
    link: str,  # noqa: F811
    nurse_csrf: str,  # noqa: F811
    seeded: Seeded,  # noqa: F811
) -> Parties:
    return Parties(nurse, provider, link, nurse_csrf, seeded)


class Page(Client):
    """A page's signalling over a WebSocket of the app (it can move to a new one); media as
    ``Client`` (aiortc peers that count the frames they decode)."""

    def __init__(self, service: VideoService, name: str) -> None:
        super().__init__(service, name)
        self.me: str | None = None
        self._ws: WebsocketConnection | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        assert self.me is not None
        return self.me

    def attach(self, ws: WebsocketConnection) -> None:
        self._ws = ws
        self._reader = asyncio.create_task(self._read(ws))
        self._tasks.append(self._reader)

    def detach(self) -> None:
        assert self._reader is not None
        self._reader.cancel()
        self._ws = None

    async def _read(self, ws: WebsocketConnection) -> None:
        while True:
            data = await ws.receive()
            raw = data.encode() if isinstance(data, str) else data
            message = orjson.loads(raw)
            if message["type"] in ("joined", "resumed"):
                self.me = message["participant"]
            self._deliver(raw)

    async def send_raw(self, raw: str | bytes) -> None:
        assert self._ws is not None
        await self._ws.send(raw.decode() if isinstance(raw, bytes) else raw)

    async def told(self, type_: str, **fields: object) -> dict[str, Any]:
        """The newest ``type_`` message with ``fields``, once it has arrived."""

        def seen() -> bool:
            return any(
                m["type"] == type_ and all(m.get(k) == v for k, v in fields.items())
                for m in self.received
            )

        await wait_for(seen, 10, f"{self.name}: {type_} {fields}")
        return self.last(type_, **fields)


@contextlib.asynccontextmanager
async def socket(client: QuartClient, path: str) -> AsyncIterator[WebsocketConnection]:
    async with client.websocket(path, headers=ORIGIN) as ws:
        yield ws


async def _refused(client: QuartClient, path: str, service: VideoService, **resume: object) -> str:
    """What a fresh connection on ``path`` is told when it presents ``resume``."""
    page = Page(service, "refused")
    async with socket(client, path) as ws:
        page.attach(ws)
        await page.send(type="resume", **resume)
        error = await page.told("error")
        page.detach()
    await page.close()
    return f"{error['code']}: {error['message']}"


@pytest.mark.slow
@pytest.mark.usefixtures("loopback")
async def test_a_dropped_provider_resumes_with_its_token_and_the_local_legs_never_stop(
    parties: Parties, store: Store
) -> None:
    nurse, provider, link, nurse_csrf, seeded = parties  # noqa: F811 - names of the fixtures
    service: VideoService = nurse.app.extensions["appliance"].video
    visit, provider_path = seeded.encounter_id, f"/visit/{link}/video"
    nurse_page, provider_page = Page(service, "nurse"), Page(service, "provider")
    patient = Client(service, "patient")
    try:
        async with socket(nurse, "/video/ws") as nurse_ws:
            nurse_page.attach(nurse_ws)
            await nurse_page.send(type="join", visit=visit, role="nurse", token=nurse_csrf)
            await nurse_page.told("joined")
            first = socket(provider, provider_path)
            provider_page.attach(await first.__aenter__())
            await provider_page.send(type="join", visit=visit, role="provider", token=link)
            joined = await provider_page.told("joined", presence="waiting")
            provider_id = provider_page.id
            seat = {"visit": visit, "participant": provider_id, "token": joined["resume"]}
            await patient.join("patient", visit=visit)
            for someone in (provider_id, patient.id):
                await nurse_page.send(type="admit", participant=someone)
            await provider_page.told("admitted", participant=provider_id)
            await provider_page.publish()
            await patient.publish()
            await flowing(nurse_page.video, patient.id, 20)
            await flowing(patient.video, provider_id, 20)
            await flowing(provider_page.video, patient.id, 20)
            nurse_pcs, patient_pcs = dict(nurse_page.subscriptions), dict(patient.subscriptions)

            # The provider's WebSocket goes without a word (its TCP connection died).
            provider_page.detach()
            await first.__aexit__(None, None, None)
            dropped_at = asyncio.get_running_loop().time()
            await nurse_page.told("reconnecting", participant=provider_id, reconnecting=True)
            await wait_for(
                lambda: any(m["type"] == "reconnecting" for m in patient.received), 5, "patient"
            )
            # The seat and every media leg stay: the provider's media still flows both ways.
            await flowing(nurse_page.video, patient.id, 20)
            await flowing(patient.video, provider_id, 20)
            await flowing(nurse_page.video, provider_id, 10)

            # A token from another credential, for another visit, or made up: refused.
            assert await _refused(nurse, "/video/ws", service, **seat) == (
                "resume_refused: that seat was joined with another credential"
            )
            other_visit = seat | {"visit": seeded.other_id}
            assert (await _refused(provider, provider_path, service, **other_visit)).startswith(
                "not_allowed"
            )
            made_up = seat | {"token": "A" * 43}
            assert await _refused(provider, provider_path, service, **made_up) == (
                "resume_refused: not that seat's token"
            )

            # A new WebSocket with the token takes the seat back: no admission.
            async with socket(provider, provider_path) as second:
                provider_page.attach(second)
                await provider_page.send(type="resume", **seat)
                resumed = await provider_page.told("resumed", presence="admitted")
                assert resumed["participant"] == provider_id
                assert resumed["resume"] != seat["token"]
                audited = await store.query(
                    "SELECT actor, outcome FROM audit WHERE detail = 'video visit resumed as provider'"
                )
                assert [(str(a).split(":")[0], o) for a, o in audited] == [
                    ("provider-link", "success")
                ]
                await provider_page.told("participant", participant=nurse_page.id)
                await nurse_page.told("reconnecting", participant=provider_id, reconnecting=False)
                # Its page rebuilds its media legs (as after its network failed).
                assert provider_page.publish_pc is not None
                await provider_page.publish_pc.close()
                await provider_page.send(type="reconnect")
                await provider_page.publish()
                await flowing(provider_page.video, patient.id, 20)  # new subscribe connections
                await flowing(patient.video, provider_id, 20)  # the new publish connection
                await flowing(nurse_page.video, provider_id, 10)
                assert provider_page.errors() == []

                # The token, once used, is spent.
                assert await _refused(provider, provider_path, service, **seat) == (
                    "resume_refused: that resume token was used already"
                )
                # The local legs never stopped: the same connections, no wait over 1 s.
                assert nurse_page.subscriptions == nurse_pcs
                assert patient.subscriptions == patient_pcs
                times = nurse_page.video_times[patient.id]
                during = [t for t in times if t >= dropped_at - 1]
                gaps = [b - a for a, b in itertools.pairwise(during)]
                assert max(gaps) < 1.0, max(gaps)
                assert all(m["type"] != "left" for m in nurse_page.received)
                assert nurse_page.errors() + patient.errors() == []

                await provider_page.send(type="leave")
                await nurse_page.told("left", participant=provider_id)
                provider_page.detach()
            nurse_page.detach()
    finally:
        for each in [nurse_page, provider_page, patient]:
            await each.close()


async def test_after_the_grace_period_the_provider_leaves_and_must_be_admitted_again(
    parties: Parties,
) -> None:
    nurse, provider, link, nurse_csrf, seeded = parties  # noqa: F811 - names of the fixtures
    service: VideoService = nurse.app.extensions["appliance"].video
    service.resume_grace_s = 0.3
    visit, provider_path = seeded.encounter_id, f"/visit/{link}/video"
    nurse_page, provider_page = Page(service, "nurse"), Page(service, "provider")
    try:
        async with socket(nurse, "/video/ws") as nurse_ws:
            nurse_page.attach(nurse_ws)
            await nurse_page.send(type="join", visit=visit, role="nurse", token=nurse_csrf)
            await nurse_page.told("joined")
            async with socket(provider, provider_path) as first:
                provider_page.attach(first)
                await provider_page.send(type="join", visit=visit, role="provider", token=link)
                joined = await provider_page.told("joined")
                await nurse_page.send(type="admit", participant=provider_page.id)
                await provider_page.told("admitted")
                provider_page.detach()
            provider_id = provider_page.id
            await nurse_page.told("reconnecting", participant=provider_id, reconnecting=True)
            await nurse_page.told("left", participant=provider_id)
            seat = {"visit": visit, "participant": provider_id, "token": joined["resume"]}
            assert (await _refused(provider, provider_path, service, **seat)).startswith(
                "resume_refused: that seat is gone"
            )
            async with socket(provider, provider_path) as second:
                provider_page.attach(second)
                await provider_page.send(type="join", visit=visit, role="provider", token=link)
                await provider_page.told("joined", presence="waiting")  # admitted again, or not
                provider_page.detach()
            nurse_page.detach()
    finally:
        for each in (nurse_page, provider_page):
            await each.close()


async def test_a_flooding_connection_still_leaves_at_once(
    parties: Parties,
) -> None:
    nurse, provider, link, nurse_csrf, seeded = parties  # noqa: F811 - names of the fixtures
    service: VideoService = nurse.app.extensions["appliance"].video
    visit = seeded.encounter_id
    nurse_page, flooder = Page(service, "nurse"), Page(service, "flooder")
    try:
        async with socket(nurse, "/video/ws") as nurse_ws:
            nurse_page.attach(nurse_ws)
            await nurse_page.send(type="join", visit=visit, role="nurse", token=nurse_csrf)
            await nurse_page.told("joined")
            async with socket(provider, f"/visit/{link}/video") as ws:
                flooder.attach(ws)
                await flooder.send(type="join", visit=visit, role="provider", token=link)
                await flooder.told("joined")
                for _ in range(400):
                    await ws.send("[]")
                await nurse_page.told("left", participant=flooder.id)
                flooder.detach()
            assert all(m["type"] != "reconnecting" for m in nurse_page.received)
            nurse_page.detach()
    finally:
        for each in (nurse_page, flooder):
            await each.close()
