"""The patient's side of a video visit at a kiosk, in Chromium with fake media.

An exam-room kiosk (Debian's Chromium, headless, ``--use-fake-device-for-media-stream``) is
paired to its station; the patient arrived today and is checked in there. The nurse is an
aiortc participant of the app's own ``VideoService`` (numbered frames), as in
``test_video_e2e.py``. When the nurse starts the visit the kiosk shows the video panel by
itself; the patient joins with the big button, the nurse admits, and media flows both ways.
The kiosk's idle reset (shortened here to 4 s) waits while the call is on, and works again
once the nurse has ended it. axe-core checks the page during the call; a screenshot goes to
``APPLIANCE_SCREENSHOTS`` (e.g. docs/images, as ``kiosk-video.png``) when that is set.
With the kiosk switched to Spanish, ``video.js``'s own texts (status line, the people list)
are Spanish too.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance import fhir
from appliance.config import demo_config
from appliance.device_registry import DeviceRegistry, StationKind
from appliance.store import Store
from services import intake
from tests import factories
from tests.e2e import live_server
from tests.e2e.live_server import watch_problems
from tests.e2e.test_accessibility_e2e import Axe, axe  # noqa: F401 - the axe fixture
from tests.e2e.video_call import frames_decoded
from tests.video.peers import wait_for
from tests.video.test_service import Client
from web.app import AppState, create_app

pytestmark = pytest.mark.slow

STATION = "exam-1"
CODE = "PAIRVIDEO2"
IDLE_S = 4  # the kiosk's idle reset, through the app's config (production: 90 s)
TABLET = {"width": 1280, "height": 800}


@pytest.fixture
async def served(
    tmp_path: Path, store: Store, loopback: None
) -> AsyncIterator[tuple[str, AppState]]:
    await DeviceRegistry(store).add_station(
        STATION, "Exam room 1", StationKind.EXAM_ROOM, "user:admin"
    )
    now = datetime.now(UTC)

    def issue(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO kiosk_pairings (code_hash, station_id, issued_by, issued_at, "
            "expires_at) VALUES (?, ?, 'user:admin', ?, ?)",
            (
                hashlib.sha256(CODE.encode()).digest(),
                STATION,
                fhir.utc_text(now),
                fhir.utc_text(now + timedelta(minutes=10)),
            ),
        )

    await store.transact(issue)
    app = create_app(demo_config(tmp_path), store)
    app.config["KIOSK_IDLE_TIMEOUT_S"] = IDLE_S
    async with live_server.serve(app) as base_url:
        yield base_url, app.extensions["appliance"]


async def _arrived_and_in_the_exam_room(store: Store) -> str:
    """A patient who checked in at the waiting-room kiosk, then was taken to the exam room."""
    [patient] = await store.create([factories.patient(family="Zzkioskvideo")], "user:e2e")
    ref = f"Patient/{patient.logical_id}"
    [arrival] = await store.create(
        [intake.arrival(ref, datetime.now(UTC) - timedelta(minutes=5), "kiosk-1", None)],
        "kiosk:kiosk-1",
    )
    await DeviceRegistry(store).check_in(STATION, patient.logical_id, "user:nurse-e2e")
    return arrival.logical_id


async def _paired_kiosk(media_browser: Any, base_url: str) -> tuple[Any, Any, list[str]]:
    """The exam-room kiosk's browser, paired to the station, at its first step (with the
    page's problems, watched from the start)."""
    context = await media_browser.new_context(viewport=TABLET)
    page = await context.new_page()
    problems = watch_problems(page)
    await page.goto(f"{base_url}/kiosk/")
    await page.fill("#pair-code", CODE)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{base_url}/kiosk/")
    await page.wait_for_selector("#by-name")
    return context, page, problems


@pytest.mark.timeout(150)
async def test_the_patient_joins_from_the_kiosk_and_idle_waits_for_the_call_to_end(
    served: tuple[str, AppState],
    store: Store,
    media_browser: Any,
    axe: Axe,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    base_url, state = served
    visit = await _arrived_and_in_the_exam_room(store)
    context, page, problems = await _paired_kiosk(media_browser, base_url)

    nurse = Client(state.video, "nurse")
    try:
        # The nurse starts the visit: the kiosk shows the panel by itself.
        await nurse.join("nurse", visit=visit)
        await page.wait_for_selector("#video", timeout=10_000)
        assert await page.inner_text("#video-start") == "Join the video visit"
        await page.click("#video-start")
        await page.wait_for_selector("#video-status:has-text('Waiting for the nurse')")
        await wait_for(
            lambda: any(
                m["type"] == "participant" and m["role"] == "patient" for m in nurse.received
            ),
            10,
            "the kiosk in the room",
        )
        patient_id = next(
            m["participant"]
            for m in nurse.received
            if m["type"] == "participant" and m["role"] == "patient"
        )
        await nurse.send(type="admit", participant=patient_id)
        await nurse.publish()

        # Media both ways: the kiosk decodes the nurse, the nurse the kiosk's fake camera.
        tile = f"#video-tiles figure[data-publisher='{nurse.id}']"
        await page.wait_for_selector(tile, timeout=15_000)
        await wait_for(lambda: nurse.video[patient_id] >= 30, 30, "kiosk frames at the nurse")
        for _ in range(150):
            if await frames_decoded(page, nurse.id) >= 30:
                break
            await page.wait_for_timeout(200)
        assert await frames_decoded(page, nurse.id) >= 30

        shots = os.environ.get("APPLIANCE_SCREENSHOTS")
        target = Path(shots) if shots else tmp_path
        await page.screenshot(path=str(target / "kiosk-video.png"), full_page=False)
        await axe.check(page, "kiosk: video visit")
        axe.assert_clean(1)

        # Three idle periods without a touch: the call goes on, no warning, no reset.
        before = await frames_decoded(page, nurse.id)
        await page.wait_for_timeout(3 * IDLE_S * 1000)
        assert await page.locator("#video").count() == 1
        assert await page.locator("#kiosk-idle-warning").is_hidden()
        assert await frames_decoded(page, nurse.id) > before
        assert not [m for m in nurse.received if m["type"] == "left"]

        # The nurse ends the visit: the kiosk says so, then its step is back, then the idle
        # reset works again.
        await nurse.send(type="end")
        await page.wait_for_selector("#video-status:has-text('The visit has ended')")
        await page.wait_for_selector("#by-name", timeout=15_000)
        async with page.expect_request(
            lambda r: r.url.endswith("/kiosk/reset") and r.method == "POST",
            timeout=(IDLE_S + 5) * 1000,
        ):
            pass
    finally:
        await nurse.session.async_close()
        await context.close()
    assert problems == []


@pytest.mark.timeout(90)
async def test_the_video_panel_speaks_the_kiosks_spanish(
    served: tuple[str, AppState], store: Store, media_browser: Any
) -> None:
    base_url, state = served
    visit = await _arrived_and_in_the_exam_room(store)
    context, page, problems = await _paired_kiosk(media_browser, base_url)
    await page.click("button[name=lang][value=es]")
    await page.wait_for_selector("html[lang=es]")
    nurse = Client(state.video, "nurse")
    try:
        await nurse.join("nurse", visit=visit)
        await page.wait_for_selector("#video", timeout=10_000)
        await page.click("#video-start")
        # video.js's own texts, from the page's table: the status line and the people list.
        await page.wait_for_selector(
            "#video-status:has-text('Esperando a que la enfermera le dé entrada')"
        )
        me = page.locator("#video-people li[data-role=patient]")
        await me.locator(".presence:has-text('esperando para entrar')").wait_for()
        assert await me.locator(".role").inner_text() == "Paciente (usted)"
        nurse_entry = page.locator("#video-people li[data-role=nurse]")
        assert await nurse_entry.locator(".role").inner_text() == "Enfermera"
        await nurse.send(type="end")
        await page.wait_for_selector("#video-status:has-text('La visita ha terminado')")
    finally:
        await nurse.session.async_close()
        await context.close()
    assert problems == []
