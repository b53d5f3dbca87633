"""The remote provider's exam-camera controls in Chromium: the provider joins by the link the
nurse issued and starts the video; from the waiting room *Take a still* is refused and the
page says why; once the nurse has admitted the provider (from the nurse's video page) the
devices process's worker (the demo's libav test pattern) takes it, the page says so, and the
Media is stored under the link's actor. A screenshot of the page goes to
``APPLIANCE_SCREENSHOTS`` (e.g. docs/images, as ``provider-camera.png``) when that is set,
else to the test's temporary directory."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from appliance.config import demo_config
from appliance.device_registry import DeviceRegistry, StationKind
from appliance.store import Store
from services import intake
from tests import factories
from tests.e2e import live_server
from tests.e2e.live_server import watch_problems
from tests.e2e.video_call import issue_link, provider_waits, served_app
from web.video import NOT_ADMITTED

pytestmark = pytest.mark.slow

CAMERA = "demo exam camera"


@pytest.mark.usefixtures("loopback")
async def test_the_provider_takes_a_still_from_their_page_once_admitted(
    store: Store, db_path: Path, kek_path: Path, media_browser: Any, tmp_path: Path
) -> None:
    [patient] = await store.create([factories.patient(family="Zzcamerae2e")], "user:e2e")
    ref = f"Patient/{patient.logical_id}"
    [arrival] = await store.create(
        [intake.arrival(ref, datetime.now(UTC), "kiosk-1", None)], "kiosk:kiosk-1"
    )
    # Checked in at the exam room: the nurse's normal access to the patient (web/access.py).
    registry = DeviceRegistry(store)
    await registry.add_station("exam-1", "Exam room 1", StationKind.EXAM_ROOM, "user:e2e")
    await registry.check_in("exam-1", patient.logical_id, "user:e2e")
    cameras = demo_config(tmp_path).exam_cameras  # the served app's (the test pattern)
    async with (
        served_app(tmp_path, store) as (base_url, _state),
        live_server.still_worker(db_path, kek_path, cameras),
    ):
        nurse = await (await media_browser.new_context()).new_page()
        link_path = await issue_link(nurse, base_url)
        await nurse.goto(f"{base_url}/video/nurse?visit={arrival.logical_id}")
        await nurse.click("#video-start")

        context = await media_browser.new_context(viewport={"width": 1440, "height": 1100})
        provider = await context.new_page()
        problems = watch_problems(provider)
        await provider_waits(provider, base_url, link_path)
        # From the waiting room: refused, and the page says why (the box's own words).
        still = f"#exam-cameras button[data-camera='{CAMERA}']"
        await provider.click(still)
        await provider.wait_for_selector(
            f"#exam-camera-status:has-text('No still: {NOT_ADMITTED}')", timeout=10_000
        )
        # The nurse admits the provider from the nurse's video page; then the still is taken.
        admit = "#video-people li[data-role='provider'] button:has-text('Admit')"
        await nurse.click(admit, timeout=10_000)
        await provider.wait_for_selector("#video-status:has-text('In the visit')", timeout=20_000)
        await provider.click(still)
        await provider.wait_for_selector(
            f"#exam-camera-status[role='status']:has-text('Still from the {CAMERA} saved')",
            timeout=20_000,
        )
        # In the clinic's time, as the page's other times (Chromium runs in UTC here).
        saved = (await provider.inner_text("#exam-camera-status")).rsplit(" ", 1)[1]
        zone = ZoneInfo(demo_config(tmp_path).site.timezone)
        now = datetime.now(zone)
        assert saved.rstrip(".") in {
            (now - timedelta(minutes=m)).strftime("%H:%M") for m in range(3)
        }, saved
        shots = os.environ.get("APPLIANCE_SCREENSHOTS")
        target = Path(shots) if shots else tmp_path
        await provider.locator("#exam-cameras").scroll_into_view_if_needed()
        await provider.screenshot(path=str(target / "provider-camera.png"), full_page=False)
        # The refusal's 409 (and Chromium's console line for it) and nothing else.
        assert f"409 {base_url}{link_path}/video/still" in problems
        assert [p for p in problems if "409" not in p] == []
    [(actor, encounter)] = await store.query(
        "SELECT requested_by, encounter_id FROM camera_requests WHERE state = 'done'"
    )
    assert str(actor).startswith("provider-link:")
    assert encounter == arrival.logical_id
