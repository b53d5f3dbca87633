"""The kiosk's video panel: shown while a nurse has the station's patient's visit live; a call
in progress holds the kiosk flow past its idle limit, and idle counts again after the call.

The real app and store, a paired kiosk (test client), the nurse as a participant of the
app's own video service (signalling only: no media is needed to be "in the room").
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from quart.testing import QuartClient
from quart.typing import TestAppProtocol as AppClientFactory

from appliance.device_registry import DeviceRegistry
from appliance.store import Store
from tests.video.test_service import Client
from tests.web.conftest import FakeClock
from tests.web.test_kiosk import STATION, _paired
from tests.web.test_provider import Seeded, seed
from tests.web.test_route_matrix import kiosk_token
from web import kiosk
from web.app import AppState
from web.video_messages import ENGLISH, video_messages

ORIGIN = {"Origin": "http://localhost"}
GONE_S = kiosk.IDLE_TIMEOUT_S + kiosk.SERVER_GRACE_S + 1  # past the server's idle limit


@pytest.fixture
async def kc(app: AppClientFactory, store: Store) -> QuartClient:
    return await _paired(app, store)


@pytest.fixture
async def seeded(store: Store, clock: FakeClock) -> Seeded:
    """Arrived today and, as the nurse would, checked in at the kiosk's station."""
    found = await seed(store, clock)
    await DeviceRegistry(store).check_in(STATION, found.patient_id, "user:nurse1")
    return found


@pytest.fixture
async def nurse_in(kc: QuartClient, seeded: Seeded) -> AsyncIterator[Client]:
    """The nurse has started the visit's video (joined its room)."""
    state: AppState = kc.app.extensions["appliance"]  # type: ignore[attr-defined]
    nurse = Client(state.video, "nurse")
    await nurse.join("nurse", visit=seeded.encounter_id)
    yield nurse
    await nurse.session.async_close()


async def _live(kc: QuartClient) -> bool:
    answer = await kc.get("/kiosk/video/state")
    assert answer.status_code == 200
    state: dict[str, Any] = await answer.get_json()
    return bool(state["live"])


async def _sweep(kc: QuartClient) -> dict[int, kiosk.Flow]:
    kstate = kc.app.extensions["kiosk"]  # type: ignore[attr-defined]
    await kiosk._sweep(kc.app.extensions["appliance"], kstate, kiosk.IDLE_TIMEOUT_S)  # type: ignore[attr-defined]
    flows: dict[int, kiosk.Flow] = kstate.flows
    return flows


async def test_the_kiosk_shows_the_panel_while_a_nurse_has_its_patients_visit_live(
    kc: QuartClient, store: Store, clock: FakeClock, seeded: Seeded
) -> None:
    assert not await _live(kc)  # no room open on the box
    state: AppState = kc.app.extensions["appliance"]  # type: ignore[attr-defined]
    nurse = Client(state.video, "nurse")
    # Another patient's visit going live is not this station's.
    other = await seed(store, clock)
    await nurse.join("nurse", visit=other.encounter_id)
    assert not await _live(kc)
    await nurse.send(type="leave")
    await nurse.join("nurse", visit=seeded.encounter_id)
    assert await _live(kc)
    token = await kiosk_token(kc)
    body = (await (await kc.get("/kiosk/")).get_data()).decode()
    assert 'id="video"' in body
    assert 'data-ws="/kiosk/video"' in body
    assert f'data-visit="{seeded.encounter_id}"' in body
    assert 'data-role="patient"' in body
    assert f'data-token="{token}"' in body  # the flow's token: what /kiosk/video checks
    assert "Join the video visit" in body
    assert 'id="video-end"' not in body  # only a nurse ends the visit
    # The nurse ends it: the kiosk's step is back.
    await nurse.send(type="end")
    assert not await _live(kc)
    body = (await (await kc.get("/kiosk/")).get_data()).decode()
    assert 'id="video"' not in body
    assert 'id="by-name"' in body
    await nurse.session.async_close()


def _video_messages(body: str) -> dict[str, str]:
    found = re.search(
        r'<script type="application/json" id="video-messages">(.*?)</script>', body, re.DOTALL
    )
    assert found is not None, "no video messages on the page"
    table: dict[str, str] = json.loads(found.group(1))
    return table


async def test_the_panel_speaks_the_check_ins_language_and_english_to_the_nurse(
    kc: QuartClient, logged_in: QuartClient, seeded: Seeded, nurse_in: Client
) -> None:
    spanish = video_messages(kiosk.load_catalogs()["es"].gettext)
    await kc.post("/kiosk/lang", form={"lang": "es", "csrf_token": await kiosk_token(kc)})
    body = (await (await kc.get("/kiosk/")).get_data()).decode()
    assert _video_messages(body) == spanish
    assert spanish["waiting"] == "Esperando a que la enfermera le dé entrada…"
    assert "Unirse a la visita por video" in body  # the join button, as before
    assert f">{spanish['micMute']}</button>" in body  # the panel's own buttons too
    assert "Mute my microphone" not in body
    # The nurse's page: English.
    page = await logged_in.get(f"/video/nurse?visit={seeded.encounter_id}")
    assert page.status_code == 200
    assert _video_messages((await page.get_data()).decode()) == ENGLISH


async def test_a_patient_checked_out_of_the_station_has_no_panel_here(
    kc: QuartClient, store: Store, nurse_in: Client
) -> None:
    assert await _live(kc)
    await DeviceRegistry(store).check_out(STATION, "user:nurse1")
    assert not await _live(kc)


async def test_a_call_in_progress_holds_the_flow_and_idle_counts_again_after_it(
    kc: QuartClient, clock: FakeClock, seeded: Seeded, nurse_in: Client
) -> None:
    token = await kiosk_token(kc)
    async with kc.websocket("/kiosk/video", headers=ORIGIN) as ws:
        await ws.send(
            orjson.dumps(
                {"type": "join", "visit": seeded.encounter_id, "role": "patient", "token": token}
            ).decode()
        )
        assert orjson.loads(await ws.receive())["type"] == "joined"
        # Ten minutes without a touch, the page asking every 30 s: the flow stays.
        for _ in range(20):
            clock.advance(30)
            assert await _live(kc)
            assert [f.csrf for f in (await _sweep(kc)).values()] == [token]
    # The patient left the call: idle counts from its end, and the flow ends as usual.
    assert await _live(kc)  # the nurse is still there
    clock.advance(kiosk.CALL_HOLD_S + 1)
    assert await _live(kc)
    assert [f.csrf for f in (await _sweep(kc)).values()] == [token]
    clock.advance(GONE_S)
    assert await _sweep(kc) == {}


async def test_asking_about_the_video_is_not_a_touch_of_the_screen(
    kc: QuartClient, clock: FakeClock, nurse_in: Client
) -> None:
    token = await kiosk_token(kc)
    [flow] = (await _sweep(kc)).values()
    for _ in range(4):
        clock.advance(GONE_S / 4 + 1)
        assert await _live(kc)  # live, but the kiosk is not in the call
    assert flow.ended  # the flow the patient was in ended as idle, questions or not
    assert [f.csrf for f in (await _sweep(kc)).values()] != [token]


async def test_an_unpaired_browser_cannot_ask(app: AppClientFactory) -> None:
    anonymous: QuartClient = app.test_client()  # type: ignore[assignment]
    assert (await anonymous.get("/kiosk/video/state")).status_code == 403
