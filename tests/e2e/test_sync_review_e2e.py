"""The sync review queue in Chromium: a nurse compares both versions and decides.

The conflict is real (the sync agent's version-checked update refused with 412 by the
Medplum peer); the page is served by Hypercorn under the production CSP. Set
``APPLIANCE_SCREENSHOTS=DIR`` to keep a screenshot of the comparison.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from sync_agent.review_queue import ReviewQueue
from tests.e2e import live_server
from tests.e2e.conftest import LiveApp
from tests.web.test_sync_review import _conflict

pytestmark = [pytest.mark.slow, pytest.mark.peer]


async def test_a_nurse_compares_both_versions_and_keeps_ours(
    live_app: LiveApp, page: Any, upstream: httpx.AsyncClient
) -> None:
    problems = live_server.watch_problems(page)
    await _conflict(live_app.store, upstream)
    await live_app.log_in(page, "/sync/")
    await page.get_by_role("link", name="Review queue").click()
    await page.get_by_role("link", name="Compare and decide").click()
    changed = page.locator('tr.differs[data-path="name[0].family"]')
    assert await changed.locator("td.mine").inner_text() == "Mineperson"
    assert await changed.locator("td.theirs").inner_text() == "Theirsperson"
    folder = os.environ.get("APPLIANCE_SCREENSHOTS")
    if folder:
        await page.screenshot(path=str(Path(folder) / "sync-review.png"), full_page=True)
    await page.get_by_role("button", name="Keep the version made here").click()
    await page.wait_for_url("**/sync/review?done=kept")
    assert "Kept the version made here" in await page.locator("p.notice").inner_text()
    assert await ReviewQueue(live_app.store).items() == []
    assert problems == []
