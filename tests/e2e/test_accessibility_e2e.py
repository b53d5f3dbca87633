"""Accessibility (issue 6): axe-core checks every kiosk and staff page in Chromium.

The real app is served by Hypercorn over a real store with synthetic data, and each page is
reached the way a person reaches it (the kiosk through a whole check-in, staff through the
login form, an administrator through TOTP enrolment). On each page the test loads axe-core
(``tests/browser_assets``, pinned in its ``package-lock.json``; ``make test`` runs ``npm ci``
for it) and runs it with the WCAG 2.0/2.1 A and AA rules. No page may have a violation of
impact "serious" or "critical"; a failure lists, per page, each rule, its impact, what it
asks for and the first elements it found, so the template or style sheet can be fixed.

The pages keep their production Content-Security-Policy (``script-src 'self'``, no inline
script): axe-core's source is handed to Chromium's DevTools evaluation (``page.evaluate``),
which a page's CSP does not govern, rather than added as a ``<script>`` element the CSP
would (rightly) refuse. So what is checked is the page exactly as served — no
``bypass_csp`` context, no rule switched off, nothing excluded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyotp
import pytest

from appliance.device_registry import DeviceRegistry, StationKind
from appliance.users import Role
from services import intake
from services.alerts import AlertEngine
from tests import factories
from tests.e2e import live_server
from tests.e2e.conftest import LiveApp
from tests.e2e.test_kiosk_e2e import TABLET, _draw_signature
from tests.e2e.test_nurse_arrivals_e2e import _checked_in_patient, _kiosk_visit
from tests.e2e.test_rpm_chart_e2e import seed_monitored_patient
from tests.web.test_claims_page import seed as seed_claims
from tests.web.test_devices import _clinic, _held_reading

pytestmark = pytest.mark.slow

AXE = Path(__file__).parents[1] / "browser_assets" / "node_modules" / "axe-core" / "axe.min.js"
WCAG_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
BLOCKING = frozenset({"serious", "critical"})
ADMIN = "admin-a11y"
ADMIN_PASSWORD = "admin horse battery staple a11y"

# Runs axe on the whole document with the WCAG A/AA rules; returns only what is needed.
_RUN = """async (tags) => {
  const result = await axe.run(document, {
    runOnly: {type: "tag", values: tags},
    resultTypes: ["violations"],
  });
  return {
    version: axe.version,
    violations: result.violations.map((v) => ({
      id: v.id,
      impact: v.impact,
      help: v.help,
      helpUrl: v.helpUrl,
      targets: v.nodes.slice(0, 4).map((n) => n.target.join(" ")),
      summary: v.nodes.length ? v.nodes[0].failureSummary : "",
      count: v.nodes.length,
    })),
    passed: result.passes.map((r) => r.id),
  };
}"""

# An image with no text alternative (axe's "image-alt", impact critical), put on a page by
# the DOM API, which the page's CSP allows: proof that a violation is seen and reported.
_ADD_BAD_IMAGE = """() => {
  const img = document.createElement("img");
  img.id = "axe-probe";
  img.src = "data:image/gif;base64,R0lGODlhAQABAAAAACw=";
  document.querySelector("main").append(img);
}"""


@dataclass
class Axe:
    """axe-core run page by page; blocking findings are kept for one report at the end."""

    source: str
    checked: list[str] = field(default_factory=list)
    blocking: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    async def run(self, page: Any) -> list[dict[str, Any]]:
        """axe-core's WCAG A/AA violations on ``page`` as it is now."""
        await page.wait_for_load_state("load")
        if not await page.evaluate("() => typeof window.axe === 'object'"):
            await page.evaluate(self.source)  # DevTools evaluation: the page's CSP stays on
        result = await page.evaluate(_RUN, WCAG_TAGS)
        assert result["version"] == "4.14.1"
        # The rules did run on the page: its language and title were checked.
        assert {"html-has-lang", "document-title"} <= set(result["passed"])
        violations: list[dict[str, Any]] = result["violations"]
        return violations

    async def check(self, page: Any, name: str) -> None:
        found = [v for v in await self.run(page) if v["impact"] in BLOCKING]
        self.checked.append(name)
        if found:
            self.blocking[name] = found

    async def prove_it_reports(self, page: Any) -> None:
        """A known critical violation on ``page`` is found, with its element."""
        await page.evaluate(_ADD_BAD_IMAGE)
        found = {v["id"]: v for v in await self.run(page)}
        assert found["image-alt"]["impact"] == "critical"
        assert found["image-alt"]["targets"] == ["#axe-probe"]
        await page.evaluate("() => document.querySelector('#axe-probe').remove()")

    def report(self) -> str:
        lines = []
        for name, violations in self.blocking.items():
            lines.append(f"{name}:")
            for v in violations:
                lines.append(f"  [{v['impact']}] {v['id']}: {v['help']} ({v['count']} element(s))")
                lines.append(f"    {v['helpUrl']}")
                for target in v["targets"]:
                    lines.append(f"    - {target}")
                lines.append("    " + v["summary"].replace("\n", "\n    "))
        return "\n".join(lines)

    def assert_clean(self, expected_pages: int) -> None:
        assert len(self.checked) == expected_pages, self.checked
        assert not self.blocking, (
            "serious or critical accessibility violations (axe-core "
            f"{', '.join(WCAG_TAGS)}):\n{self.report()}"
        )


@pytest.fixture
def axe() -> Axe:
    if not AXE.exists():
        pytest.fail(
            f"{AXE} is missing: run `npm ci --prefix tests/browser_assets` (make test does)"
        )
    return Axe(AXE.read_text(encoding="utf-8"))


async def _enrol_admin(live_app: LiveApp, page: Any, axe: Axe) -> None:
    """The administrator's first sign-in (after a mistyped password): TOTP enrolment and
    recovery codes."""
    await live_server.create_user(live_app.store, ADMIN, ADMIN_PASSWORD, Role.ADMIN)
    await page.goto(live_app.url("/login"))
    await axe.prove_it_reports(page)
    await axe.check(page, "login")
    await page.fill("#username", ADMIN)
    await page.fill("#password", "not the password")
    async with page.expect_navigation():
        await page.click("button[type=submit]")
    await page.wait_for_selector(".error[role=alert]")
    await axe.check(page, "login refused")
    await live_app.log_in(page, "/kiosk/admin", username=ADMIN, password=ADMIN_PASSWORD)
    assert page.url.endswith("/mfa/enrol")
    await axe.check(page, "MFA enrolment")
    secret = (await page.locator("#secret").text_content() or "").replace(" ", "").strip()
    await page.fill("#code", pyotp.TOTP(secret).now())
    async with page.expect_navigation():
        await page.click("button[type=submit].primary")
    assert await page.locator("#recovery-codes code").count() == 10
    await axe.check(page, "MFA recovery codes")


async def _kiosk_check_in(
    page: Any, live_app: LiveApp, code: str, patient_id: str, axe: Axe
) -> None:
    """A whole kiosk check-in, identify in English and the rest in Spanish."""
    await page.goto(live_app.url("/kiosk/"))
    assert page.url.endswith("/kiosk/pair")
    await axe.check(page, "kiosk: pair")
    await page.fill("#pair-code", code)
    async with page.expect_navigation():
        await page.click("button[type=submit]")
    await page.wait_for_selector("#by-name")
    await axe.check(page, "kiosk: identify (en)")
    await page.fill("#family", "Nobodyhere")
    await page.fill("#name-birth", "1961-04-09")
    await page.click("#by-name button[type=submit]")
    await page.wait_for_selector(".kiosk-message[role=alert]")
    await axe.check(page, "kiosk: not found (en)")

    async with page.expect_navigation():
        await page.click("form[action='/kiosk/walk-in'] button")
    await page.wait_for_selector("form[action='/kiosk/register']")
    await axe.check(page, "kiosk: register a walk-in")
    async with page.expect_navigation():
        await page.click("#kiosk-reset button")

    await page.fill("#family", "Testperson")
    await page.fill("#name-birth", "1961-04-09")
    await page.click("#by-name button[type=submit]")
    await page.wait_for_selector(".kiosk-masked")
    await axe.check(page, "kiosk: confirm (en)")
    await page.click("button[name=answer][value=no]")
    await page.wait_for_selector("body[data-step=front-desk]")
    await axe.check(page, "kiosk: see the front desk")
    async with page.expect_navigation():
        await page.click("#kiosk-reset button")

    await page.click("button[name=lang][value=es]")
    await page.wait_for_selector("html[lang=es]")
    await axe.check(page, "kiosk: identify (es)")
    await page.fill("#family", "Testperson")
    await page.fill("#name-birth", "1961-04-09")
    await page.click("#by-name button[type=submit]")
    await page.wait_for_selector(".kiosk-masked")
    await axe.check(page, "kiosk: confirm (es)")
    await page.click("button[name=answer][value=yes]")
    await page.wait_for_selector("#payer")
    await axe.check(page, "kiosk: details (es)")
    await page.click("form[action='/kiosk/details'] button[type=submit]")
    await page.wait_for_selector("#q-reason")
    await axe.check(page, "kiosk: intake questionnaire (es)")
    await page.fill("#q-reason", "Tos desde hace una semana")
    await page.check("input[name=symptoms][value=cough]")
    await page.check("input[name=phq2-interest][value='1']")
    await page.check("input[name=phq2-mood][value='0']")
    await page.click("form[action='/kiosk/intake'] button[type=submit]")
    await page.wait_for_selector("#signature-pad")
    await axe.check(page, "kiosk: consent (es)")
    await page.check("input[name=agree]")
    await _draw_signature(page)
    await page.click("form#consent-form button[type=submit]")
    await page.wait_for_selector("#readings", state="attached")
    devices = await live_app.devices_store()  # the kiosk's cuff, through the devices process
    observation = factories.bp_observation(
        f"Patient/{patient_id}", 131, 84, datetime.now(UTC).isoformat()
    )
    await devices.create([observation], "service:devices")
    await page.wait_for_selector("#readings li", timeout=10_000)  # shown live
    await axe.check(page, "kiosk: vital signs (es)")
    await page.click("form[action='/kiosk/vitals/next'] button")
    await page.wait_for_selector("#photo")
    await axe.check(page, "kiosk: photos (es)")
    await page.click("form[action='/kiosk/finish'] button")
    await page.wait_for_selector("body[data-step=done]")
    await axe.check(page, "kiosk: checked in (es)")


@pytest.mark.timeout(180)
async def test_kiosk_and_admin_pages_have_no_serious_or_critical_violations(
    live_app: LiveApp, browser: Any, page: Any, axe: Axe
) -> None:
    store = live_app.store
    await DeviceRegistry(store).add_station("kiosk-1", "Kiosk 1", StationKind.KIOSK, "user:e2e")
    [patient] = await store.create([factories.patient()], "user:e2e")  # A. Testperson

    await _enrol_admin(live_app, page, axe)
    async with page.expect_navigation():
        await page.click("a.button.primary")
    assert page.url.endswith("/kiosk/admin")
    await axe.check(page, "kiosk pairing (admin)")
    await page.select_option("#station", "kiosk-1")
    async with page.expect_navigation():
        await page.click("form[action='/kiosk/admin'] button[type=submit]")
    await axe.check(page, "kiosk pairing code issued (admin)")
    code = (await page.locator("code.pairing-code").text_content() or "").strip()
    for path, name in (
        ("/admin/users", "admin: users"),
        ("/audit", "audit report"),
        ("/mfa/", "MFA: account"),
        ("/account/password", "password change"),
    ):
        await page.goto(live_app.url(path))
        assert page.url.endswith(path), page.url
        await axe.check(page, name)

    async with page.expect_navigation():
        await page.click(".logout button")
    await live_app.log_in(page, "/audit", username=ADMIN, password=ADMIN_PASSWORD)
    assert page.url.endswith("/login/mfa")
    await axe.check(page, "MFA: code at sign-in")  # the code itself: test_login_mfa_e2e

    context = await browser.new_context(viewport=TABLET, locale="en-US")
    try:
        await _kiosk_check_in(await context.new_page(), live_app, code, patient.logical_id, axe)
    finally:
        await context.close()
    axe.assert_clean(expected_pages=25)


async def _seed_clinic_day(live_app: LiveApp) -> tuple[str, str, int]:
    """Synthetic data so every staff page has rows to show: a held reading, a kiosk arrival
    with intake and photo, a monitored patient with alerts, and claims in several states.
    Returns the arrived patient, the monitored patient and a claim."""
    store = live_app.store
    registry, _ = await _clinic(store)
    await _held_reading(store, registry)
    kiosk = await live_app.devices_store()
    arrived = await _checked_in_patient(kiosk, "Lindqvist", "Maja", "1971-11-02")
    answers = intake.IntakeAnswers("Cough and fever since Monday", ("fever", "cough"), (2, 2))
    await _kiosk_visit(kiosk, arrived, datetime.now(UTC) - timedelta(minutes=5), answers)
    engine = AlertEngine(kiosk)
    await engine.run_until_idle()  # a fresh engine starts from here
    monitored = await seed_monitored_patient(kiosk, datetime.now(UTC))
    cuff = await live_server.HomeCuff.enrol(kiosk, "Crisistest")
    await cuff.measure(192, 124)  # a crisis reading from home, now
    await engine.run_until_idle()
    claims = await seed_claims(store)
    return arrived, monitored, claims["rejected"]


@pytest.mark.timeout(180)
async def test_nurse_and_provider_pages_have_no_serious_or_critical_violations(
    live_app: LiveApp, browser: Any, page: Any, axe: Axe
) -> None:
    arrived, monitored, claim = await _seed_clinic_day(live_app)
    await live_app.log_in(page, "/nurse/")
    assert page.url.endswith("/nurse/")
    await page.wait_for_selector("#live.on", timeout=5000)
    assert await page.locator("#arrivals tbody tr").count() == 1
    await axe.check(page, "nurse: arrivals")
    pages = (
        (f"/patients/{arrived}", "#photos img", "patient chart"),
        ("/devices/", "table", "devices"),
        ("/devices/held", "table", "held readings"),
        ("/rpm/", "#alerts tbody tr", "RPM worklist"),
        (f"/rpm/patients/{monitored}", "#rpm-patient[data-charts-ready='true']", "RPM patient"),
        ("/claims/", "table", "claims queue"),
        (f"/claims/{claim}", "h1", "claim detail"),
        ("/sync/", "h1", "sync status"),
        ("/sync/review", "h1", "sync review queue"),
        ("/break-glass", "form", "emergency access"),
        ("/precall/", "#start", "pre-call check"),
        ("/visit/new", "input[name=encounter]", "provider links"),
    )
    for path, ready, name in pages:
        await page.goto(live_app.url(path))
        assert page.url.endswith(path), page.url
        await page.wait_for_selector(ready, timeout=10_000)
        await axe.check(page, name)
    async with page.expect_navigation():
        await page.click("text=Issue the link")
    await axe.check(page, "provider link issued")
    url = await page.input_value("#issued-url")
    missing = await page.goto(live_app.url("/nurse/no-such-page"))
    assert missing is not None
    assert missing.status == 404
    await axe.check(page, "error page")

    # The provider, in a browser of their own: join, the visit, and the end of it.
    context = await browser.new_context(viewport={"width": 1440, "height": 1000})
    try:
        provider = await context.new_page()
        await provider.goto(live_app.url("/visit/" + url.rsplit("/visit/", 1)[1]))
        await axe.check(provider, "provider: join")
        async with provider.expect_navigation():
            await provider.click("#join")
        await provider.wait_for_selector("#live.on", timeout=5000)
        await axe.check(provider, "provider: visit")
        await provider.fill("#note", "Viral URI. Fluids and rest.")
        await provider.fill("#codes", "J06.9")
        async with provider.expect_navigation():
            await provider.click("#complete")
        await provider.wait_for_selector("#done")
        await axe.check(provider, "provider: visit completed")
    finally:
        await context.close()
    axe.assert_clean(expected_pages=18)
