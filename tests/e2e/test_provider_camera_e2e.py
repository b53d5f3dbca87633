"""The remote provider's exam-camera controls in Chromium: the provider joins by the link the
nurse issued and clicks *Take a still*; the devices process's worker (the demo's libav test
pattern) takes it, the page says so, and the Media is stored under the link's actor. A
screenshot of the page goes to ``APPLIANCE_SCREENSHOTS`` (e.g. docs/images, as
``provider-camera.png``) when that is set, else to the test's temporary directory."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from appliance.config import demo_config
from appliance.store import Store
from services import intake
from tests import factories
from tests.e2e import live_server
from tests.e2e.live_server import watch_problems
from tests.e2e.video_call import issue_link, served_app

pytestmark = pytest.mark.slow

CAMERA = "demo exam camera"


async def test_the_provider_takes_a_still_from_their_page(
    store: Store, db_path: Path, kek_path: Path, browser: Any, tmp_path: Path
) -> None:
    [patient] = await store.create([factories.patient(family="Zzcamerae2e")], "user:e2e")
    ref = f"Patient/{patient.logical_id}"
    [arrival] = await store.create(
        [intake.arrival(ref, datetime.now(UTC), "kiosk-1", None)], "kiosk:kiosk-1"
    )
    cameras = demo_config(tmp_path).exam_cameras  # the served app's (the test pattern)
    async with (
        served_app(tmp_path, store) as (base_url, _state),
        live_server.still_worker(db_path, kek_path, cameras),
    ):
        nurse = await (await browser.new_context()).new_page()
        link_path = await issue_link(nurse, base_url)

        context = await browser.new_context(viewport={"width": 1440, "height": 1100})
        provider = await context.new_page()
        problems = watch_problems(provider)
        await provider.goto(base_url + link_path)
        async with provider.expect_navigation():
            await provider.click("#join")
        await provider.click(f"#exam-cameras button[data-camera='{CAMERA}']")
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
        assert problems == []
    [(actor, encounter)] = await store.query(
        "SELECT requested_by, encounter_id FROM camera_requests WHERE state = 'done'"
    )
    assert str(actor).startswith("provider-link:")
    assert encounter == arrival.logical_id
