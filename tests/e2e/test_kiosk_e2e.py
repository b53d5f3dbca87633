"""The kiosk in Chromium: pairing, a whole check-in in Spanish with a live reading, and the
idle reset leaving nothing behind. Screenshots of the key screens go to the folder named by
``APPLIANCE_SCREENSHOTS`` (e.g. docs/images to refresh the docs), else to the test's tmp."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance import fhir
from appliance.config import demo_config
from appliance.device_registry import DeviceRegistry, StationKind
from appliance.store import Store
from tests import factories
from tests.e2e import live_server
from web.app import create_app

STATION = "kiosk-1"
CODE = "PAIRME2345"
IDLE_S = 4  # the test's idle timeout, through the app's config (production: 90 s)
TABLET = {"width": 1280, "height": 800}


def _shots(tmp_path: Path) -> Path:
    """Where screenshots go: never into the source tree unless asked."""
    return Path(os.environ.get("APPLIANCE_SCREENSHOTS") or tmp_path)


@dataclass
class Served:
    base_url: str
    store: Store
    db_path: Path
    kek_path: Path


@pytest.fixture
async def kiosk_app(
    tmp_path: Path, store: Store, db_path: Path, kek_path: Path
) -> AsyncIterator[Served]:
    await DeviceRegistry(store).add_station(STATION, "Kiosk 1", StationKind.KIOSK, "user:admin")
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
        yield Served(base_url, store, db_path, kek_path)


@pytest.fixture
async def tablet(browser: Any) -> AsyncIterator[Any]:
    context = await browser.new_context(viewport=TABLET, locale="es-US")
    opened = await context.new_page()
    try:
        yield opened
    finally:
        await context.close()


async def _pair(page: Any, base: str) -> None:
    await page.goto(f"{base}/kiosk/")
    assert page.url.endswith("/kiosk/pair")
    await page.fill("#pair-code", CODE)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{base}/kiosk/")


async def _draw_signature(page: Any) -> None:
    box = await page.locator("#signature-pad").bounding_box()
    await page.mouse.move(box["x"] + 40, box["y"] + 60)
    await page.mouse.down()
    for step in range(1, 12):
        await page.mouse.move(box["x"] + 40 + step * 40, box["y"] + 60 + (step % 3) * 40)
    await page.mouse.up()


@pytest.mark.timeout(120)
async def test_a_patient_checks_in_in_spanish_and_sees_the_reading_live(
    kiosk_app: Served, tablet: Any, tmp_path: Path
) -> None:
    page, base, store = tablet, kiosk_app.base_url, kiosk_app.store
    [patient] = await store.create([factories.patient()], "user:test")
    await _pair(page, base)
    await page.click("button[name=lang][value=es]")
    await page.wait_for_selector("html[lang=es]")
    assert "Bienvenido" in await page.inner_text("h1")
    await page.screenshot(path=str(_shots(tmp_path) / "kiosk-identify.png"))

    await page.fill("#family", "Testperson")
    await page.fill("#name-birth", "1961-04-09")
    await page.click("#by-name button[type=submit]")
    await page.wait_for_selector(".kiosk-masked")
    assert (await page.inner_text(".kiosk-masked")).strip() == "A. T."
    await page.click("button[name=answer][value=yes]")
    await page.wait_for_selector("#payer")
    await page.click("form[action='/kiosk/details'] button[type=submit]")

    await page.wait_for_selector("#q-reason")
    await page.fill("#q-reason", "Tos desde hace una semana")
    await page.check("input[name=symptoms][value=cough]")
    await page.check("input[name=phq2-interest][value='1']")
    await page.check("input[name=phq2-mood][value='2']")
    await page.screenshot(path=str(_shots(tmp_path) / "kiosk-questionnaire.png"), full_page=True)
    await page.click("form[action='/kiosk/intake'] button[type=submit]")

    await page.wait_for_selector("#signature-pad")
    await page.check("input[name=agree]")
    await _draw_signature(page)
    await page.click("form#consent-form button[type=submit]")

    await page.wait_for_selector("#readings", state="attached")
    devices = await Store.open(kiosk_app.db_path, kiosk_app.kek_path)
    try:
        observation = factories.bp_observation(
            f"Patient/{patient.logical_id}", 131, 84, datetime.now(UTC).isoformat()
        )
        await devices.create([observation], "service:devices")
    finally:
        await devices.close()
    await page.wait_for_selector("#readings li >> text=131/84 mmHg", timeout=10_000)
    assert "Presión arterial" in await page.inner_text("#readings")
    await page.click("form[action='/kiosk/vitals/next'] button")
    await page.click("form[action='/kiosk/finish'] button")
    await page.wait_for_selector("text=Ya está registrado")
    await page.screenshot(path=str(_shots(tmp_path) / "kiosk-checked-in.png"))

    [consent] = await store.newest(f"Patient/{patient.logical_id}", "Consent", "user:test")
    assert consent["sourceAttachment"]["contentType"] == "image/png"
    assert consent["language"] == "es"
    [checkin] = await DeviceRegistry(store).checkins(STATION)
    assert checkin.checked_out_at is not None


@pytest.mark.timeout(120)
async def test_the_idle_reset_leaves_nothing_behind(kiosk_app: Served, tablet: Any) -> None:
    page, base, store = tablet, kiosk_app.base_url, kiosk_app.store
    await store.create([factories.patient()], "user:test")
    await _pair(page, base)
    await page.fill("#family", "Testperson")
    await page.fill("#name-birth", "1961-04-09")
    await page.click("#by-name button[type=submit]")
    await page.click("button[name=answer][value=yes]")
    await page.wait_for_selector("#payer")
    await page.fill("#payer", "Synthetic Health")
    await page.evaluate("sessionStorage.setItem('left', 'x'); localStorage.setItem('left', 'y')")

    # Nobody touches the screen: the kiosk starts over by itself.
    await page.wait_for_selector("#by-name", timeout=(IDLE_S + 5) * 1000)
    assert await page.evaluate("sessionStorage.length + localStorage.length") == 0
    assert await page.input_value("#family") == ""
    body = await page.content()
    assert "A. T." not in body
    assert "Synthetic Health" not in body
    # Going back shows no earlier step: every page is /kiosk/, rendered from a fresh flow.
    await page.go_back()
    await page.wait_for_load_state()
    assert "A. T." not in await page.content()
    assert "#payer" not in await page.content()
    actors = await store.query("SELECT count(*) FROM audit WHERE actor = ?", (f"kiosk:{STATION}",))
    assert actors[0][0] > 0
