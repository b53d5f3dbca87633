"""A home cuff's crisis reading appears as an alert on the nurse's open worklist, in Chromium.

The whole path, each part real: the cuff's 0x2A35 bytes → ``BloodPressureSession`` →
``DeviceHub`` (routing to the home patient, FHIR, encrypted write with outbox and audit) on
the devices process's own store connection → ``AlertEngine.run`` with the devices process's
poll → the web app's ``/rpm/events`` stream → ``rpm.js`` inserting the row, with no reload.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e import live_server
from tests.e2e.conftest import LiveApp

pytestmark = pytest.mark.slow

# When each alert row first appears in the table (browser wall clock, ms), and a marker that
# survives only as long as the page is not reloaded.
_WATCH = """() => {
  window.__noReload = true;
  window.__seen = {};
  const body = document.querySelector('#alerts tbody');
  const note = () => {
    for (const row of body.rows) {
      const id = row.dataset.alertId;
      if (id && !(id in window.__seen)) { window.__seen[id] = Date.now(); }
    }
  };
  note();
  new MutationObserver(note).observe(body, {childList: true});
}"""


async def test_a_crisis_reading_appears_on_the_open_worklist_without_reload(
    live_app: LiveApp, page: Any, record_property: Any
) -> None:
    devices = await live_app.devices_store()
    cuff = await live_server.HomeCuff.enrol(devices, "Crisistest")
    calm = await live_server.HomeCuff.enrol(devices, "Calmtest", seed=2)
    async with live_server.alert_engine(devices):
        await live_app.log_in(page, "/rpm/")
        assert page.url.endswith("/rpm/")
        await page.wait_for_selector("#live.on", timeout=5000)  # the stream is connected
        assert await page.locator("#alerts tbody tr").count() == 0
        await page.evaluate(_WATCH)

        await calm.measure(128, 82)  # a normal reading raises nothing
        committed = await cuff.measure(192, 124)
        row = page.locator("#alerts tbody tr", has_text="Crisistest")
        await row.wait_for(timeout=5000)

        seen = await page.evaluate("() => window.__seen")
        [seen_ms] = seen.values()
        latency_ms = seen_ms - committed * 1000
        record_property("reading_commit_to_alert_on_screen_ms", round(latency_ms, 1))
        assert await page.evaluate("() => window.__noReload === true")
        assert await row.locator(".sev-label").text_content() == "Critical"
        assert await row.locator(".title").text_content() == "Blood pressure crisis"
        assert await row.locator(".values").text_content() == "BP 192/124 mmHg"
        assert await row.locator(".where .place").text_content() == "Home"
        assert await row.locator(".where .taken").text_content() != ""  # when it was taken
        assert await row.locator(".patient a").get_attribute("href") == (
            f"/rpm/patients/{cuff.patient_id}"
        )
        assert await page.locator("#alerts tbody tr").count() == 1
        assert await page.locator("#alerts-empty").is_hidden()

        # The live row's forms work: acknowledge it from the inserted row.
        async with page.expect_navigation():
            await row.get_by_role("button", name="Acknowledge").click()
        assert "Alert acknowledged." in await page.locator("#flash").text_content()
        acked = page.locator("#alerts tbody tr", has_text="Crisistest")
        assert "Acknowledged by nurse-e2e" in await acked.locator(".alert-state").text_content()
    # The engine ran where the devices process runs it, and wrote through its own connection.
    rows = await live_app.store.query("SELECT state, rule FROM alerts")
    assert rows == [("acknowledged", "bp-crisis")]
    assert latency_ms < 5000


async def test_the_worklist_runs_under_the_csp_without_violations(
    live_app: LiveApp, page: Any
) -> None:
    """rpm.js and rpm.css load as files; Chromium reports no Content-Security-Policy refusal."""
    messages: list[str] = []
    page.on("console", lambda msg: messages.append(msg.text))
    await live_app.log_in(page, "/rpm/")
    await page.wait_for_selector("#live.on", timeout=5000)  # rpm.js ran and connected
    badge = page.locator(".rpm-filter a[aria-current=page]")
    assert await badge.evaluate("el => getComputedStyle(el).borderRadius") != "0px"  # rpm.css
    assert [m for m in messages if "Content Security Policy" in m] == []
