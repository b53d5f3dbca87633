"""An administrator's first sign-in in Chromium: forced TOTP enrolment, then password + code.

The authenticator app is pyotp reading the key printed under the QR code. Screenshots of
the enrolment page and the audit report are saved beside the test's temporary files
(``mfa-enrol.png``, ``audit-report.png``), or in ``APPLIANCE_SCREENSHOTS`` when set.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pyotp
import pytest

from appliance.users import Role
from tests.e2e import live_server
from tests.e2e.conftest import LiveApp

pytestmark = pytest.mark.slow

ADMIN = "admin-e2e"


def _shots(tmp_path: Path) -> Path:
    """``APPLIANCE_SCREENSHOTS`` (e.g. docs/images to refresh the docs), else the test's tmp."""
    return Path(os.environ.get("APPLIANCE_SCREENSHOTS") or tmp_path)


ADMIN_PASSWORD = "admin horse battery staple e2e"


async def test_admin_enrols_totp_on_first_login_then_logs_in_with_a_code(
    live_app: LiveApp, page: Any, tmp_path: Path
) -> None:
    await live_server.create_user(live_app.store, ADMIN, ADMIN_PASSWORD, Role.ADMIN)
    await live_app.log_in(page, "/audit", username=ADMIN, password=ADMIN_PASSWORD)
    assert page.url.endswith("/mfa/enrol")
    # Nothing else opens before enrolment: the password alone is not a session.
    await page.goto(live_app.url("/admin/users"))
    assert "/login" in page.url
    await page.goto(live_app.url("/mfa/enrol"))
    qr = page.locator("figure.qr img")
    assert (await qr.get_attribute("src") or "").startswith("data:image/svg+xml")
    assert await qr.evaluate("img => img.naturalWidth") > 0  # CSP allowed the data: image
    secret = (await page.locator("#secret").text_content() or "").replace(" ", "").strip()
    await page.screenshot(path=str(_shots(tmp_path) / "mfa-enrol.png"), full_page=True)

    await page.fill("#code", pyotp.TOTP(secret).now())
    async with page.expect_navigation():
        await page.click("button[type=submit].primary")
    codes = await page.locator("#recovery-codes code").all_text_contents()
    assert len(codes) == 10
    async with page.expect_navigation():
        await page.click("a.button.primary")
    assert page.url.endswith("/audit")

    async with page.expect_navigation():
        await page.click(".logout button")
    assert page.url.endswith("/login")

    await live_app.log_in(page, "/audit", username=ADMIN, password=ADMIN_PASSWORD)
    assert page.url.endswith("/login/mfa")
    # The enrolment code's step is used up; the next step's code is within the drift window.
    await page.fill("#code", pyotp.TOTP(secret).at(time.time(), counter_offset=1))
    async with page.expect_navigation():
        await page.click("button[type=submit]")
    assert page.url.endswith("/audit")
    status = await page.locator("#chain-status").text_content() or ""
    assert "Audit trail intact" in status
    assert await page.locator("#audit tbody tr", has_text="password + totp").count() >= 1
    await page.screenshot(path=str(_shots(tmp_path) / "audit-report.png"), full_page=True)
