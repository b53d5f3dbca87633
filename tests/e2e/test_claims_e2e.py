"""The claims queue in Chromium: what needs a person shows, and an admin clears the list.

A sync pass runs against the test clearinghouse on loopback: a ready claim that cannot be
made into an 837 is held back with its reason (the others would go), and an 835 that does
not balance is kept on the list of response files that could not be applied. The page is
served by Hypercorn under the production CSP. Set ``APPLIANCE_SCREENSHOTS=DIR`` to keep a
screenshot of the queue with the list showing.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import pyotp
import pytest

from appliance.users import Role
from services.claims.model import ClaimStatus
from services.claims.service import ClaimsService
from tests.e2e import live_server
from tests.e2e.conftest import LiveApp
from tests.e2e.test_accessibility_e2e import AXE, Axe
from tests.services.test_claims import site_doc
from tests.web.test_claims_page import _poll_a_bad_835
from tests.web.test_claims_page import seed as seed_claims

pytestmark = pytest.mark.slow

ADMIN = "admin-claims-e2e"
ADMIN_PASSWORD = "admin horse battery staple claims"


async def _sign_in_as_admin(live_app: LiveApp, page: Any) -> None:
    """The administrator's first sign-in: TOTP enrolment, then the claims queue."""
    await live_server.create_user(live_app.store, ADMIN, ADMIN_PASSWORD, Role.ADMIN)
    await live_app.log_in(page, "/claims/", username=ADMIN, password=ADMIN_PASSWORD)
    assert page.url.endswith("/mfa/enrol")
    secret = (await page.locator("#secret").text_content() or "").replace(" ", "").strip()
    await page.fill("#code", pyotp.TOTP(secret).now())
    async with page.expect_navigation():
        await page.click("button[type=submit].primary")
    await page.goto(live_app.url("/claims/"))


async def test_an_admin_sees_a_held_claim_and_the_files_not_applied_and_clears_the_list(
    live_app: LiveApp, page: Any
) -> None:
    axe = Axe(AXE.read_text(encoding="utf-8"))  # the accessibility test's checker
    problems = live_server.watch_problems(page)
    store = live_app.store
    ids = await seed_claims(store)
    service = ClaimsService(store, site_doc(auto_ready=False))
    await service.transition(ids["draft"], ClaimStatus.READY, "user:biller")
    raw = sqlite3.connect(live_app.db_path)  # its row and its content disagree
    with raw:
        raw.execute("UPDATE claims SET form = '837I' WHERE id = ?", (ids["draft"],))
    raw.close()
    await _poll_a_bad_835(store)  # the pass holds the claim back, then polls

    await _sign_in_as_admin(live_app, page)
    held = page.locator(f"#claims tr[data-claim-id='{ids['draft']}']")
    assert "could not be made into an X12 837 (ValueError)" in await held.inner_text()
    listed = page.locator("#unreadable tbody tr")
    assert await listed.count() == 1
    cells = await listed.first.locator("td").all_inner_texts()
    assert cells[:2] == ["1", "835"]
    assert "(the 835 is out of balance)" in cells[2]
    await axe.check(page, "claims queue with files not applied")
    assert not axe.blocking, axe.report()
    folder = os.environ.get("APPLIANCE_SCREENSHOTS")
    if folder:
        await page.screenshot(path=str(Path(folder) / "claims-queue.png"), full_page=True)

    async with page.expect_navigation():
        await page.get_by_role("button", name="Clear the list").click()
    assert page.url.endswith("/claims/?cleared=1")
    assert "1 response file taken off the list" in await page.locator("p.notice").inner_text()
    assert await page.locator("#unreadable-responses").count() == 0
    assert problems == []
