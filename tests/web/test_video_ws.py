"""The video signalling WebSockets: who may connect, who may join which visit, bad frames.

Through the Quart test client's WebSocket support with the real app, store and visit link;
no media (tests/video/test_service.py covers the peer connections).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from quart.testing import QuartClient, WebsocketResponseError
from quart.testing.connections import WebsocketDisconnectError
from quart.typing import TestAppProtocol as AppClientFactory

from appliance.config import Config, IceServerConfig, VideoConfig, demo_config
from appliance.device_registry import DeviceRegistry, StationKind
from appliance.store import Store
from tests import factories
from tests.web.conftest import NURSE, ORIGIN, FakeClock, Peer, admit, both_in, form_token
from tests.web.test_kiosk import STATION, _paired
from tests.web.test_provider import Seeded, audit_rows, issue_link, join, seed
from tests.web.test_route_matrix import kiosk_token
from web import video


async def _drain(peer: Peer, errors: list[str]) -> None:
    while True:
        message = await peer.receive()
        errors.append(message.get("code", message["type"]))


@pytest.fixture
async def seeded(store: Store, clock: FakeClock) -> Seeded:
    found = await seed(store, clock)
    # Checked in at an exam room: the nurse's normal access to the patient (web/access.py).
    registry = DeviceRegistry(store)
    await registry.add_station("exam-1", "Exam room 1", StationKind.EXAM_ROOM, "user:test")
    await registry.check_in("exam-1", found.patient_id, "user:test")
    return found


@pytest.fixture
async def nurse(app: AppClientFactory, logged_in: QuartClient) -> QuartClient:
    return logged_in


@pytest.fixture
async def nurse_csrf(nurse: QuartClient) -> str:
    return form_token(await (await nurse.get("/mfa/")).get_data())


@pytest.fixture
async def link(nurse: QuartClient, seeded: Seeded) -> str:
    return await issue_link(nurse, seeded.encounter_id)


@pytest.fixture
async def provider(app: AppClientFactory, link: str) -> QuartClient:
    client: QuartClient = app.test_client()  # type: ignore[assignment]
    await join(client, link)
    return client


async def _handshake(client: QuartClient, path: str, headers: dict[str, str]) -> None:
    async with client.websocket(path, headers=headers) as ws:
        await ws.send("{}")
        await ws.receive()


async def refused_status(client: QuartClient, path: str, headers: dict[str, str]) -> int:
    with pytest.raises(WebsocketResponseError) as refused:
        await _handshake(client, path, headers)
    status: int = refused.value.response.status_code
    return status


async def test_each_route_refuses_a_missing_or_wrong_credential(
    app: AppClientFactory, nurse: QuartClient, provider: QuartClient, link: str
) -> None:
    anonymous: QuartClient = app.test_client()  # type: ignore[assignment]
    assert await refused_status(anonymous, "/video/ws", ORIGIN) == 401
    assert await refused_status(provider, "/video/ws", ORIGIN) == 401  # a link is no login
    assert await refused_status(nurse, f"/visit/{link}/video", ORIGIN) == 403  # not bound here
    assert await refused_status(anonymous, "/visit/" + "x" * 43 + "/video", ORIGIN) == 404
    assert await refused_status(nurse, "/kiosk/video", ORIGIN) == 403  # not a paired kiosk


async def test_a_handshake_from_another_origin_or_none_is_refused(
    nurse: QuartClient, provider: QuartClient, link: str
) -> None:
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "https://localhost"}, {}):
        assert await refused_status(nurse, "/video/ws", headers) == 403
        assert await refused_status(provider, f"/visit/{link}/video", headers) == 403


async def test_a_plain_get_passes_the_guard_and_is_told_to_upgrade(
    nurse: QuartClient, app: AppClientFactory
) -> None:
    response = await nurse.get("/video/ws")
    assert response.status_code == 426
    assert response.headers["Upgrade"] == "websocket"
    anonymous: QuartClient = app.test_client()  # type: ignore[assignment]
    assert (await anonymous.get("/video/ws")).status_code == 401


@pytest.fixture
async def connected(
    nurse: QuartClient, provider: QuartClient, link: str
) -> AsyncIterator[tuple[Peer, Peer]]:
    async with (
        nurse.websocket("/video/ws", headers=ORIGIN) as nurse_ws,
        provider.websocket(f"/visit/{link}/video", headers=ORIGIN) as provider_ws,
    ):
        yield Peer(nurse_ws), Peer(provider_ws)


async def test_a_nurse_admits_the_provider_into_the_same_visit(
    connected: tuple[Peer, Peer], seeded: Seeded, nurse_csrf: str, link: str, store: Store
) -> None:
    nurse, provider = connected
    visit = seeded.encounter_id
    await nurse.send(type="join", visit=visit, role="nurse", token=nurse_csrf)
    nurse_id = (await nurse.expect("joined", role="nurse", presence="admitted"))["participant"]
    await provider.send(type="join", visit=visit, role="provider", token=link)
    joined = await provider.expect("joined", role="provider", presence="waiting")
    await provider.expect("participant", participant=nurse_id, role="nurse")
    await nurse.expect("participant", participant=joined["participant"], presence="waiting")

    await nurse.send(type="admit", participant=joined["participant"])
    for each in (nurse, provider):
        await each.expect("admitted", participant=joined["participant"], by=nurse_id)

    key = store.patient_key(f"Patient/{seeded.patient_id}")
    nurse_rows = await audit_rows(store, f"user:{NURSE}")
    assert ("read", "success", key, "video visit joined as nurse") in nurse_rows
    rows = await store.query(
        "SELECT actor, patient_key FROM audit WHERE detail LIKE 'video visit joined%' ORDER BY id"
    )
    [(nurse_actor, nurse_key), (link_actor, link_key)] = rows
    assert nurse_actor == f"user:{NURSE}"
    assert str(link_actor).startswith("provider-link:")
    assert nurse_key == link_key == key


async def test_a_credential_joins_only_its_own_visit_in_its_own_role(
    connected: tuple[Peer, Peer], seeded: Seeded, nurse_csrf: str, link: str, store: Store
) -> None:
    nurse, provider = connected
    visit = seeded.encounter_id
    for fields in (
        {"visit": visit, "role": "nurse", "token": link},  # a provider is no nurse
        {"visit": seeded.other_id, "role": "provider", "token": link},  # not its visit
        {"visit": visit, "role": "provider", "token": "not-the-link"},
    ):
        await provider.send(type="join", **fields)
        await provider.expect("error", code="not_allowed")
    await nurse.send(type="join", visit=visit, role="nurse", token="not-the-csrf-token")
    await nurse.expect("error", code="not_allowed")
    await nurse.send(type="join", visit=seeded.other_id, role="nurse", token=nurse_csrf)
    await nurse.expect("error", code="not_allowed")  # not an arrival of today
    # Still free to join properly afterwards.
    await nurse.send(type="join", visit=visit, role="nurse", token=nurse_csrf)
    await nurse.expect("joined")


async def test_bad_frames_get_errors_and_the_room_goes_on(
    connected: tuple[Peer, Peer], seeded: Seeded, nurse_csrf: str, link: str
) -> None:
    nurse, provider = connected
    provider_id = await both_in(nurse, provider, seeded.encounter_id, nurse_csrf, link)

    await provider.ws.send("{nope")
    await provider.expect("error", code="malformed")
    await provider.ws.send(orjson.dumps({"type": "offer", "sdp": "v=0\r\n" + "a" * 70_000}))
    await provider.expect("error", code="too_large")
    await provider.send(type="offer", sdp="v=0\r\nm=video 9 RTP/AVP 96\r\n")
    await provider.expect("error", code="invalid_sdp")
    await provider.send(type="candidate", candidate="candidate:x 1 udp 1 0.0.0.0 1 typ host")
    await provider.expect("error", code="invalid_candidate")
    await provider.send(type="admit", participant=provider_id)
    await provider.expect("error", code="not_allowed")

    await nurse.send(type="admit", participant=provider_id)
    await nurse.expect("admitted", participant=provider_id)
    await provider.expect("admitted", participant=provider_id)


async def test_a_flooding_connection_is_closed_and_leaves_the_room(
    connected: tuple[Peer, Peer], seeded: Seeded, nurse_csrf: str, link: str
) -> None:
    nurse, provider = connected
    provider_id = await both_in(nurse, provider, seeded.encounter_id, nurse_csrf, link)

    for _ in range(400):
        await provider.ws.send("[]")
    errors: list[str] = []
    with pytest.raises(WebsocketDisconnectError) as closed:
        await _drain(provider, errors)
    assert errors.count("rate_limited") == 1, errors  # one reply, however long the flood
    assert errors[-1] == "left"  # the connection left the room as it was dropped
    assert closed.value.args == (1008,) or "1008" in str(closed.value)
    await nurse.expect("left", participant=provider_id)


async def test_a_revoked_link_takes_the_provider_out_of_the_call(
    connected: tuple[Peer, Peer],
    nurse: QuartClient,
    seeded: Seeded,
    nurse_csrf: str,
    link: str,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Revoking a link stops it at once: an admitted provider is taken out of the visit
    (not kept for a resume) and its connection closed, within a re-check of the link."""
    monkeypatch.setattr(video, "CREDENTIAL_CHECK_S", 0.1)
    nurse_ws, provider_ws = connected
    provider_id = await both_in(nurse_ws, provider_ws, seeded.encounter_id, nurse_csrf, link)
    await admit(nurse_ws, provider_ws, provider_id)
    await asyncio.sleep(0.3)  # re-checked a few times: still valid, still in
    [(link_id,)] = await store.query("SELECT id FROM visit_links")
    revoked = await nurse.post(f"/visit/links/{link_id}/revoke", form={"csrf_token": nurse_csrf})
    assert revoked.status_code == 303
    # "left", not "reconnecting": out of the visit, no seat kept for a resume.
    await nurse_ws.expect("left", participant=provider_id)
    messages: list[str] = []
    with pytest.raises(WebsocketDisconnectError) as closed:
        await _drain(provider_ws, messages)
    assert messages[-1] == "not_allowed", messages
    assert closed.value.args == (1008,) or "1008" in str(closed.value)


async def test_the_same_link_joining_again_takes_the_seat_and_the_first_window_leaves(
    connected: tuple[Peer, Peer],
    provider: QuartClient,
    seeded: Seeded,
    nurse_csrf: str,
    link: str,
) -> None:
    """One credential, one seat: the provider opens the visit in a second window (the same
    browser, the same link): the first window is told ``joined_elsewhere`` and leaves, the
    new seat waits to be admitted again."""
    nurse_ws, first = connected
    visit = seeded.encounter_id
    first_id = await both_in(nurse_ws, first, visit, nurse_csrf, link)
    await admit(nurse_ws, first, first_id)
    async with provider.websocket(f"/visit/{link}/video", headers=ORIGIN) as second_ws:
        second = Peer(second_ws)
        await second.send(type="join", visit=visit, role="provider", token=link)
        error = await first.expect("error", code="joined_elsewhere")
        assert "another window or device" in error["message"]
        await first.expect("left", participant=first_id)
        joined = await second.expect("joined", role="provider", presence="waiting")
        assert joined["participant"] != first_id
        await nurse_ws.expect("left", participant=first_id)
        await nurse_ws.expect("participant", participant=joined["participant"], presence="waiting")
        # The first window's seat is gone: it cannot act in the room any more.
        await first.send(type="mute", participant=first_id, kind="audio", muted=True)
        assert (await first.receive())["code"] == "not_allowed"


async def test_the_nurse_page_carries_the_panel_for_an_arrival_of_today_only(
    nurse: QuartClient, seeded: Seeded, nurse_csrf: str
) -> None:
    page = await nurse.get(f"/video/nurse?visit={seeded.encounter_id}")
    assert page.status_code == 200
    body = await page.get_data()
    assert b'data-ws="/video/ws"' in body
    assert f'data-visit="{seeded.encounter_id}"'.encode() in body
    assert f'data-token="{nurse_csrf}"'.encode() in body
    assert b'id="video-end"' in body
    assert (await nurse.get(f"/video/nurse?visit={seeded.other_id}")).status_code == 404
    assert (await nurse.get("/video/nurse")).status_code == 404


async def test_the_provider_page_carries_the_panel_for_its_own_link(
    provider: QuartClient, seeded: Seeded, link: str
) -> None:
    body = await (await provider.get(f"/visit/{link}")).get_data()
    assert f'data-ws="/visit/{link}/video"'.encode() in body
    assert f'data-visit="{seeded.encounter_id}"'.encode() in body
    assert b'data-role="provider"' in body
    assert b'id="video-end"' not in body  # only a nurse ends the visit


async def test_a_kiosk_joins_as_patient_the_visit_of_whoever_is_checked_in_at_its_station(
    app: AppClientFactory, store: Store, seeded: Seeded
) -> None:
    kiosk_client = await _paired(app, store)
    flow_token = await kiosk_token(kiosk_client)  # the kiosk page's own token
    async with kiosk_client.websocket("/kiosk/video", headers=ORIGIN) as ws:
        kiosk = Peer(ws)
        await kiosk.send(type="join", visit=seeded.encounter_id, role="patient", token=flow_token)
        await kiosk.expect("error", code="not_allowed")  # nobody checked in at its station yet
        await DeviceRegistry(store).check_in(STATION, seeded.patient_id, "user:test")
        await kiosk.send(type="join", visit=seeded.encounter_id, role="patient", token="x")
        await kiosk.expect("error", code="not_allowed")  # not the flow's token
        await kiosk.send(type="join", visit=seeded.encounter_id, role="nurse", token=flow_token)
        await kiosk.expect("error", code="not_allowed")  # a kiosk is no nurse
        await kiosk.send(type="join", visit=seeded.encounter_id, role="patient", token=flow_token)
        await kiosk.expect("joined", role="patient", presence="waiting")
    rows = await audit_rows(store, f"kiosk:{STATION}")
    key = store.patient_key(f"Patient/{seeded.patient_id}")
    assert ("read", "success", key, "video visit joined as patient") in rows


async def test_a_nurse_cannot_see_or_join_the_visit_of_a_patient_outside_normal_access(
    nurse: QuartClient, store: Store, clock: FakeClock, nurse_csrf: str, seeded: Seeded
) -> None:
    # Arrived today, but never checked in at a station nor enrolled: no normal access.
    stranger = await seed(store, clock, factories.patient(family="Zzstranger"))
    page = await nurse.get(f"/video/nurse?visit={stranger.encounter_id}")
    assert page.status_code == 403
    assert b"Zzstranger" not in await page.get_data()
    async with nurse.websocket("/video/ws", headers=ORIGIN) as ws:
        peer = Peer(ws)
        await peer.send(type="join", visit=stranger.encounter_id, role="nurse", token=nurse_csrf)
        await peer.expect("error", code="not_allowed")
        # The patient the nurse may see is still joinable on the same connection.
        await peer.send(type="join", visit=seeded.encounter_id, role="nurse", token=nurse_csrf)
        await peer.expect("joined", role="nurse", presence="admitted")
    # The refusal is audited (who tried which visit), as the page's is.
    denied = await store.query(
        "SELECT action, outcome, entity, detail FROM audit WHERE actor = ? "
        "AND outcome = 'denied' AND detail LIKE 'video visit %'",
        (f"user:{NURSE}",),
    )
    assert denied == [
        (
            "read",
            "denied",
            f"Encounter/{stranger.encounter_id}",
            "video visit join as nurse refused",
        )
    ]


class TestTheSitesIceServers:
    """``[[video.ice_server]]`` reaches the browsers through the app's own video service."""

    @pytest.fixture
    def config(self, tmp_path: Path) -> Config:
        secret = tmp_path / "turn-credential"
        secret.write_text("s3cret\n", encoding="utf-8")
        turn = IceServerConfig(
            urls=("turns:turn.example.test:5349",), username="clinic", credential_file=secret
        )
        return replace(demo_config(tmp_path), video=VideoConfig(ice_servers=(turn,)))

    async def test_joined_carries_them_and_a_reconnect_keeps_the_provider_in(
        self, connected: tuple[Peer, Peer], seeded: Seeded, nurse_csrf: str, link: str
    ) -> None:
        nurse, provider = connected
        await nurse.send(type="join", visit=seeded.encounter_id, role="nurse", token=nurse_csrf)
        joined = await nurse.expect("joined", role="nurse")
        assert joined["iceServers"] == [
            {"urls": ["turns:turn.example.test:5349"], "username": "clinic", "credential": "s3cret"}
        ]
        await provider.send(type="join", visit=seeded.encounter_id, role="provider", token=link)
        provider_id = (await provider.expect("joined", role="provider"))["participant"]
        await provider.expect("participant", role="nurse")
        await nurse.expect("participant", participant=provider_id)
        await nurse.send(type="admit", participant=provider_id)
        await provider.expect("admitted", participant=provider_id)
        await nurse.expect("admitted", participant=provider_id)
        await provider.send(type="reconnect")
        await provider.send(type="reconnect")
        await provider.expect("error", code="rate_limited")  # only the second one
        await provider.send(type="leave")
        await nurse.expect("left", participant=provider_id)


class TestATurnServerWithASharedSecret:
    """``secret_file``: the app gives each participant its own expiring TURN login."""

    @pytest.fixture
    def config(self, tmp_path: Path) -> Config:
        secret = tmp_path / "turn-secret"
        secret.write_text("shared-with-coturn\n", encoding="utf-8")
        turn = IceServerConfig(urls=("turns:turn.example.test:5349",), secret_file=secret)
        return replace(demo_config(tmp_path), video=VideoConfig(ice_servers=(turn,)))

    async def test_nurse_and_provider_get_different_logins_naming_no_one(
        self, connected: tuple[Peer, Peer], seeded: Seeded, nurse_csrf: str, link: str
    ) -> None:
        nurse, provider = connected
        await nurse.send(type="join", visit=seeded.encounter_id, role="nurse", token=nurse_csrf)
        await provider.send(type="join", visit=seeded.encounter_id, role="provider", token=link)
        logins = []
        for joined in (
            await nurse.expect("joined", role="nurse"),
            await provider.expect("joined", role="provider"),
        ):
            [ice] = joined["iceServers"]
            expiry, _, who = ice["username"].partition(":")
            assert who == joined["participant"]
            assert int(expiry) > time.time() + 14_000  # the default lifetime, 4 h
            assert ice["credential"] != "shared-with-coturn"
            logins.append(ice["credential"])
        assert logins[0] != logins[1]


class TestTheTranscodingCap:
    """``[video] transcode_encoders`` reaches the app's one video service."""

    @pytest.fixture
    def config(self, tmp_path: Path) -> Config:
        return replace(demo_config(tmp_path), video=VideoConfig(transcode_encoders=0))

    async def test_the_service_budget_is_the_sites(self, app: AppClientFactory) -> None:
        state = app.app.extensions["appliance"]  # type: ignore[attr-defined]
        assert state.video.transcode_budget.limit == 0
        assert state.video.transcode_budget.acquire("a relay") is False
