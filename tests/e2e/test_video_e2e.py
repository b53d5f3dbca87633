"""A video visit in Chromium: the provider joins through the real page, a nurse admits.

Debian's Chromium, headless, with fake media (``--use-fake-device-for-media-stream``): the
nurse on ``/video/nurse`` and the provider on the visit link's page, both over the real
WebSocket routes of the app served by Hypercorn on 127.0.0.1. The patient is an aiortc peer
handed to the app's own ``VideoService`` (in this process; no kiosk page has a video panel
yet) sending numbered frames. Media must flow both ways: the provider page's
``inbound-rtp`` counts decoded frames from the patient, and the patient decodes the
provider's fake camera. The nurse then shows the exam camera (the demo's libav test pattern,
published by the devices process's worker) and the provider's page decodes it as a third
tile. A screenshot goes to ``APPLIANCE_SCREENSHOTS`` (e.g. docs/images,
as ``video-provider.png``) when that is set.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.config import demo_config
from appliance.device_registry import DeviceRegistry, StationKind
from appliance.store import Store
from appliance.users import Role
from services import intake
from tests import factories
from tests.e2e import live_server
from tests.e2e.live_server import watch_problems
from tests.e2e.video_call import NURSE, PASSWORD, frames_decoded, issue_link, provider_waits
from tests.video.peers import wait_for
from tests.video.test_service import Client
from web.app import AppState, create_app

pytestmark = pytest.mark.slow

PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00"
    b"\x90wS\xde\x00\x00\x00\x0cIDATx\x9cc\xf8\xcf\xc0\x00\x00\x03\x01\x01\x00\xc9\xfe\x92\xef"
    b"\x00\x00\x00\x00IEND\xaeB`\x82"
)  # a 1x1 PNG


@pytest.fixture
async def served(
    tmp_path: Path, store: Store, db_path: Path, kek_path: Path, loopback: None
) -> AsyncIterator[tuple[str, AppState]]:
    config = demo_config(tmp_path)
    app = create_app(config, store)
    await live_server.create_user(store, NURSE, PASSWORD, Role.NURSE)
    # The devices process's side: it takes the exam-camera stills the page asks for, and
    # publishes a camera the nurse shows in the visit.
    async with (
        live_server.serve(app) as base_url,
        live_server.still_worker(db_path, kek_path, config.exam_cameras),
        live_server.stream_worker(db_path, kek_path, config.exam_cameras),
    ):
        yield base_url, app.extensions["appliance"]


async def _arrived_patient(store: Store) -> str:
    now = datetime.now(UTC)
    [patient] = await store.create([factories.patient(family="Zzvideoe2e")], "user:e2e")
    ref = f"Patient/{patient.logical_id}"
    stored = await store.create(
        [
            intake.consent(ref, PNG, now - timedelta(minutes=8), "en", "I agree"),
            factories.bp_observation(ref, 126, 80, (now - timedelta(minutes=6)).isoformat()),
            intake.arrival(ref, now - timedelta(seconds=2), "kiosk-1", None),
        ],
        "kiosk:kiosk-1",
    )
    # Checked in at the exam room: the nurse's normal access to the patient (web/access.py).
    registry = DeviceRegistry(store)
    await registry.add_station("exam-1", "Exam room 1", StationKind.EXAM_ROOM, "user:e2e")
    await registry.check_in("exam-1", patient.logical_id, "user:e2e")
    return stored[-1].logical_id


async def test_provider_page_and_patient_see_each_other_after_the_nurse_admits(
    served: tuple[str, AppState], store: Store, media_browser: Any, tmp_path: Path
) -> None:
    base_url, state = served
    encounter_id = await _arrived_patient(store)

    # The nurse issues the provider's link, then opens the visit's video page.
    nurse_context = await media_browser.new_context(viewport={"width": 1280, "height": 900})
    nurse = await nurse_context.new_page()
    nurse.on("dialog", lambda dialog: dialog.accept())
    link_path = await issue_link(nurse, base_url)
    # From the arrivals queue: the patient's row links to the visit's video page.
    await nurse.goto(f"{base_url}/nurse/")
    row = nurse.locator(f'#arrivals tr[data-encounter-id="{encounter_id}"]')
    async with nurse.expect_navigation():
        await row.locator("a.open-video").click()
    assert nurse.url.endswith(f"/video/nurse?visit={encounter_id}")
    assert "Zzvideoe2e" in await nurse.inner_text("h1")
    await nurse.click("#video-start")

    # The provider joins by the link in a browser of their own, and waits.
    provider_context = await media_browser.new_context(viewport={"width": 1440, "height": 1100})
    provider = await provider_context.new_page()
    problems = watch_problems(provider)
    await provider_waits(provider, base_url, link_path)

    # The patient (aiortc, numbered frames) joins the same room.
    patient = Client(state.video, "patient")
    try:
        await patient.join("patient", visit=encounter_id)

        # The nurse admits both from the page.
        for role in ("provider", "patient"):
            admit = f"#video-people li[data-role='{role}'] button:has-text('Admit')"
            await nurse.click(admit, timeout=10_000)
        await wait_for(
            lambda: any(
                m["type"] == "admitted" and m["participant"] == patient.id for m in patient.received
            ),
            10,
            "the patient admitted",
        )
        await patient.publish()
        provider_id = next(
            m["participant"]
            for m in patient.received
            if m["type"] == "participant" and m["role"] == "provider"
        )

        # Media both ways: the provider's page decodes the patient, the patient the provider.
        tile = f"#video-tiles figure[data-publisher='{patient.id}']"
        await provider.wait_for_selector(tile, timeout=15_000)
        for _ in range(150):
            if await frames_decoded(provider, patient.id) >= 30:
                break
            await provider.wait_for_timeout(200)
        assert await frames_decoded(provider, patient.id) >= 30
        await wait_for(lambda: patient.video[provider_id] >= 30, 30, "provider frames at patient")
        await wait_for(lambda: patient.audio[provider_id] >= 50, 30, "provider audio at patient")
        nurse_tile = "#video-tiles figure.remote"
        await nurse.wait_for_selector(nurse_tile, timeout=15_000)
        await provider.wait_for_selector(f"{tile} .stats:has-text('fps')", timeout=10_000)

        shots = os.environ.get("APPLIANCE_SCREENSHOTS")
        target = Path(shots) if shots else tmp_path
        await provider.screenshot(path=str(target / "video-provider.png"), full_page=False)

        # A still from the exam camera (the demo's libav test pattern) while the call goes on.
        await nurse.click("#exam-cameras button[data-camera='demo exam camera']")
        await nurse.wait_for_selector(
            "#exam-camera-status:has-text('Still from the demo exam camera saved')",
            timeout=15_000,
        )
        assert await nurse.locator("#video-tiles figure.remote").count() >= 1  # still in the call

        # The nurse shows the exam camera in the visit: the provider gets a third tile, named
        # after the camera, with decoded frames; "Stop showing it" takes it away.
        show = "#exam-cameras button[data-stream='demo exam camera']"
        tiles_before = await provider.locator("#video-tiles figure.remote").count()
        await nurse.click(show)
        await nurse.wait_for_selector(f"{show}:has-text('Stop showing it')", timeout=20_000)
        await wait_for(
            lambda: any(m.get("role") == "camera" for m in patient.received), 10, "the camera"
        )
        camera_id = next(m["participant"] for m in patient.received if m.get("role") == "camera")
        camera_tile = f"#video-tiles figure[data-publisher='{camera_id}']"
        await provider.wait_for_selector(camera_tile, timeout=30_000)
        assert await provider.locator("#video-tiles figure.remote").count() == tiles_before + 1
        for _ in range(150):
            if await frames_decoded(provider, camera_id) >= 10:
                break
            await provider.wait_for_timeout(200)
        assert await frames_decoded(provider, camera_id) >= 10
        await provider.wait_for_selector(
            f"{camera_tile} .who:has-text('demo exam camera')", timeout=5_000
        )
        # The provider's page knows the camera the nurse showed, and stops it; the nurse's
        # page learns that too.
        await provider.wait_for_selector(f"{show}:has-text('Stop showing it')", timeout=5_000)
        await provider.click(show)
        await provider.wait_for_selector(
            f"{show}:has-text('Show demo exam camera')", timeout=10_000
        )
        await provider.wait_for_selector(camera_tile, state="detached", timeout=10_000)
        await nurse.wait_for_selector(f"{show}:has-text('Show demo exam camera')", timeout=10_000)

        # The nurse ends the visit: everyone is told and the box closes every connection.
        await nurse.click("#video-end")
        await provider.wait_for_selector("#video-status:has-text('The visit has ended')")
        await wait_for(
            lambda: any(m["type"] == "ended" for m in patient.received), 10, "ended at patient"
        )
        await wait_for(  # told first, then the box closes its connections
            lambda: state.video.connections(encounter_id) == 0, 10, "the connections closed"
        )
        assert problems == []
    finally:
        await patient.close()
        await provider_context.close()
        await nurse_context.close()
