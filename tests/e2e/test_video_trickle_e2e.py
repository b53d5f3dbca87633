"""Chromium trickles its ICE candidates: offers and answers go at once, candidates after.

As ``test_video_e2e.py``: the nurse and the provider in Chromium with fake media over the
real routes, the patient an aiortc peer of the app's own video service. Playwright records
every frame each page's signalling socket sends and receives. Each page's publish offer
goes out without waiting for ICE gathering (fewer ``a=candidate`` lines than the
``candidate`` messages that follow it, none sent before it), each subscribe answer too, and
every connection's candidates end with one empty ``candidate``; the box refuses none (no
``error`` comes back), and media flows both ways: the provider's page decodes the patient,
the patient and the nurse's page decode the provider.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from appliance.store import Store
from tests.e2e.live_server import watch_problems
from tests.e2e.test_video_e2e import _arrived_patient
from tests.e2e.video_call import (
    admitted_and_seeing_each_other,
    decoded_at_least,
    issue_link,
    provider_waits,
)
from tests.video.peers import wait_for
from tests.video.test_service import Client
from web.app import AppState

pytestmark = pytest.mark.slow

PUBLISH = "publish"  # the key of a page's publish connection (its messages carry no pc)


class Recorded:
    """The JSON messages a page's video socket sent and received, in order."""

    def __init__(self, page: Any) -> None:
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        page.on("websocket", self._socket)

    def _socket(self, ws: Any) -> None:
        if ws.url.endswith("/video") or ws.url.endswith("/video/ws"):
            ws.on("framesent", lambda payload: self.sent.append(json.loads(payload)))
            ws.on("framereceived", lambda payload: self.received.append(json.loads(payload)))

    def trickled(self) -> dict[str, tuple[str, list[str]]]:
        """Each connection's description (the publish offer, or an answer) and the
        candidates sent after it, in order; asserts none went before it."""
        found: dict[str, tuple[str, list[str]]] = {}
        for message in self.sent:
            key = message.get("pc") or PUBLISH
            if message["type"] in ("offer", "answer"):
                assert key not in found, f"{key}: described twice"
                found[key] = (message["sdp"], [])
            elif message["type"] == "candidate":
                assert key in found, f"{key}: a candidate sent before its description"
                found[key][1].append(message["candidate"])
        return found

    async def ended(self, connections: int, name: str) -> None:
        """Wait until ``connections`` were described and each sent its empty candidate."""

        def done() -> bool:
            ended = {
                m.get("pc") or PUBLISH
                for m in self.sent
                if m["type"] == "candidate" and not m["candidate"]
            }
            return len(self.trickled()) == connections and ended == set(self.trickled())

        await wait_for(done, 15, f"the {name} page's {connections} connections trickled")


async def test_the_pages_send_offers_and_answers_at_once_and_trickle_their_candidates(
    video_app: tuple[str, AppState], store: Store, media_browser: Any
) -> None:
    base_url, state = video_app
    encounter_id = await _arrived_patient(store)

    nurse_context = await media_browser.new_context()
    nurse = await nurse_context.new_page()
    nurse_problems = watch_problems(nurse)
    nurse_socket = Recorded(nurse)
    link_path = await issue_link(nurse, base_url)
    await nurse.goto(f"{base_url}/video/nurse?visit={encounter_id}")
    await nurse.click("#video-start")

    provider_context = await media_browser.new_context()
    provider = await provider_context.new_page()
    provider_problems = watch_problems(provider)
    provider_socket = Recorded(provider)
    await provider_waits(provider, base_url, link_path)

    patient = Client(state.video, "patient")
    try:
        provider_id = await admitted_and_seeing_each_other(nurse, provider, patient, encounter_id)
        await decoded_at_least(nurse, provider_id, 30)  # page to page, through the box

        # Each page: its publish offer and its two answers (the others' media), each sent
        # before gathering was done and followed by its candidates, ended by an empty one.
        for name, page in (("nurse", nurse_socket), ("provider", provider_socket)):
            await page.ended(3, name)
            for key, (sdp, candidates) in page.trickled().items():
                in_sdp = sdp.count("a=candidate:")
                trickled = [c for c in candidates if c]
                assert trickled, f"{name} {key}: no candidate trickled"
                assert in_sdp < len(trickled), f"{name} {key}: gathered before it was sent"
                assert candidates[-1] == "", f"{name} {key}: a candidate after the end"
                assert candidates.count("") == 1, f"{name} {key}: ended twice"
            # The box refused nothing it was sent, and the page shows no error.
            assert [m for m in page.received if m["type"] == "error"] == [], name
        assert await nurse.locator("#video-status.error").count() == 0
        assert await provider.locator("#video-status.error").count() == 0
        assert patient.errors() == []
        assert nurse_problems == []
        assert provider_problems == []
    finally:
        await patient.close()
        await provider_context.close()
        await nurse_context.close()
