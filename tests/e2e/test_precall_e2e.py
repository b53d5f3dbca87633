"""The pre-call check in Chromium with its fake camera and microphone: every row is measured
and the verdict shown. A screenshot goes to ``APPLIANCE_SCREENSHOTS`` (e.g. docs/images)
only when that is set."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import LiveApp
from tests.e2e.live_server import watch_problems

pytestmark = pytest.mark.slow


async def test_the_check_reports_devices_and_network_and_a_verdict(
    live_app: LiveApp, media_browser: Any
) -> None:
    context = await media_browser.new_context(viewport={"width": 1280, "height": 1100})
    page = await context.new_page()
    problems = watch_problems(page)
    try:
        await live_app.log_in(page, "/precall/")
        await page.click("#start")
        # The fake camera gives a picture; the fake microphone beeps.
        await page.wait_for_selector('#camera[data-state="ok"]', timeout=15_000)
        assert re.search(r"\d+×\d+", await page.text_content("#camera") or "")
        await page.wait_for_selector('#microphone[data-state="ok"]', timeout=15_000)
        # The speaker question waits for the person.
        await page.wait_for_selector("#speaker-ask:not([hidden])", timeout=10_000)
        await page.click("#heard-yes")
        await page.wait_for_selector('#verdict:not([data-state="waiting"])', timeout=30_000)
        rtt = await page.text_content("#rtt") or ""
        assert re.fullmatch(r"\d+ ms \(median of 10\)", rtt), rtt
        for row in ("#down", "#up"):
            text = await page.text_content(row) or ""
            assert re.fullmatch(r"\d+\.\d Mbit/s", text), (row, text)
            rate = float(text.split()[0])
            assert rate > 0.3, (row, text)  # loopback: far above audio-only
        assert await page.get_attribute("#rtt", "data-state") == "ok"
        # No sync process runs in this test: the box's own link is reported, not hidden.
        upstream = await page.text_content("#upstream") or ""
        assert "sync service is not running" in upstream
        assert await page.get_attribute("#verdict", "data-state") == "warn"
        verdict = await page.text_content("#verdict") or ""
        assert verdict == "Ready, with warnings (the box's link to the EHR): page the provider."
        shots = os.environ.get("APPLIANCE_SCREENSHOTS")
        if shots:
            await page.screenshot(path=str(Path(shots) / "precall.png"), full_page=True)
        assert problems == []
    finally:
        await context.close()
