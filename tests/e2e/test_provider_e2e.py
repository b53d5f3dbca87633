"""The provider view in Chromium: a nurse issues a link, the provider (another browser)
joins, sees a reading arrive live, writes the note and completes the visit. A screenshot
goes to ``APPLIANCE_SCREENSHOTS`` (e.g. docs/images) only when that is set."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services import intake
from tests import factories
from tests.e2e.conftest import LiveApp
from tests.e2e.live_server import watch_problems

PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00"
    b"\x90wS\xde\x00\x00\x00\x0cIDATx\x9cc\xf8\xcf\xc0\x00\x00\x03\x01\x01\x00\xc9\xfe\x92\xef"
    b"\x00\x00\x00\x00IEND\xaeB`\x82"
)  # a 1x1 PNG

pytestmark = pytest.mark.slow


async def test_provider_joins_sees_a_live_reading_and_completes(
    live_app: LiveApp, browser: Any, page: Any, tmp_path: Path
) -> None:
    store = live_app.store
    now = datetime.now(UTC)
    [patient] = await store.create([factories.patient(family="Zzprovidere2e")], "user:e2e")
    ref = f"Patient/{patient.logical_id}"
    answers = intake.IntakeAnswers("Cough and fever since Monday", ("fever", "cough"), (1, 1))
    await store.create(
        [
            intake.questionnaire_response(answers, ref, now - timedelta(minutes=9), "en"),
            intake.consent(ref, PNG, now - timedelta(minutes=8), "en", "I agree"),
            factories.bp_observation(ref, 138, 88, (now - timedelta(days=20)).isoformat()),
            factories.bp_observation(ref, 126, 80, (now - timedelta(minutes=6)).isoformat()),
            intake.photo_media(ref, PNG, now - timedelta(minutes=5), "kiosk-1"),
            intake.arrival(ref, now - timedelta(seconds=2), "kiosk-1", None),
        ],
        "kiosk:kiosk-1",
    )

    # The nurse issues the link.
    await live_app.log_in(page, "/visit/new")
    await page.click("text=Issue the link")
    url = await page.input_value("#issued-url")
    path = "/visit/" + url.rsplit("/visit/", 1)[1]

    # The provider, in a browser of their own, joins.
    context = await browser.new_context(viewport={"width": 1440, "height": 1100})
    provider = await context.new_page()
    problems = watch_problems(provider)
    await provider.goto(live_app.url(path))
    async with provider.expect_navigation():
        await provider.click("#join")
    await provider.wait_for_selector("#live.on", timeout=5000)
    assert "Cough and fever since Monday" in await provider.inner_text("#reason")
    assert "2 of 6" in await provider.inner_text("#phq2")
    assert "126/80 mmHg" in await provider.inner_text("#vitals")
    assert "138/88 mmHg" in await provider.inner_text("#history")

    # A reading taken now, by the devices process, appears by itself.
    devices = await live_app.devices_store()
    await devices.create(
        [factories.bp_observation(ref, 131, 84, datetime.now(UTC).isoformat())], "service:devices"
    )
    await provider.wait_for_selector("#vitals li:has-text('131/84 mmHg')", timeout=5000)
    await provider.fill("#note", "Viral URI. Fluids and rest; return if breathing gets worse.")
    await provider.fill("#codes", "J06.9, R50.9")
    shots = os.environ.get("APPLIANCE_SCREENSHOTS")
    if shots:
        await provider.screenshot(path=str(Path(shots) / "provider-visit.png"), full_page=True)
    else:
        await provider.screenshot(path=str(tmp_path / "provider-visit.png"), full_page=True)
    async with provider.expect_navigation():
        await provider.click("#complete")
    assert "Visit completed" in await provider.inner_text("#done")
    assert problems == []

    # The link is spent: opening it again is a clear refusal, and so is any other browser.
    response = await provider.goto(live_app.url(path))
    assert response.status == 410
    rows = await store.query("SELECT finished_encounter_id, claim_outcome FROM visit_links")
    [(finished_id, outcome)] = rows
    encounter = await store.read("Encounter", finished_id, "user:e2e")
    assert encounter["status"] == "finished"
    assert outcome == "not-eligible"  # the demo site does not bill Q3014
    await context.close()
    assert re.fullmatch(r"/visit/[A-Za-z0-9_-]{40,}", path)
