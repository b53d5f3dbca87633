"""A kiosk check-in appears live on the nurse's open arrivals queue; her chart shows the intake.

Chromium against the real app: the nurse opens ``/nurse/`` and waits for the stream; another
store connection (as the kiosk's web flow and the devices process would) stores what a kiosk
check-in stores — station check-in, intake, consent, a reading, a photo, the arrival — with
the kiosk's own builders (``services/intake.py``); the row appears without a reload, and the
chart it links to shows the answers, the PHQ-2 reading and the photo. Screenshots go to
``APPLIANCE_SCREENSHOTS`` (e.g. docs/images) only when that is set, else to the test's tmp.
"""

from __future__ import annotations

import os
import struct
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.device_registry import DeviceRegistry, StationKind
from appliance.store import Store
from services import intake
from tests import factories
from tests.e2e import live_server
from tests.e2e.conftest import LiveApp

pytestmark = pytest.mark.slow
KIOSK = "kiosk:kiosk-1"


def _png(width: int = 160, height: int = 120) -> bytes:
    """A small synthetic PNG (a colour gradient), made here so no image file is needed."""
    rows = b"".join(
        b"\x00" + b"".join(bytes((40 + x, 90 + y // 2, 160)) for x in range(width))
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        intake.PNG_MAGIC
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


async def _checked_in_patient(store: Store, family: str, given: str, birth: str) -> str:
    [patient] = await store.create(
        [factories.patient(family=family, given=given, birth_date=birth, mrn=f"E2E{family[:3]}")],
        "user:setup",
    )
    registry = DeviceRegistry(store)
    if "kiosk-1" not in {s.id for s in await registry.stations()}:
        await registry.add_station("kiosk-1", "Waiting room kiosk", StationKind.KIOSK, "user:setup")
    await registry.check_in("kiosk-1", patient.logical_id, KIOSK)
    return patient.logical_id


async def _kiosk_visit(
    store: Store, patient_id: str, arrived: datetime, answers: intake.IntakeAnswers
) -> None:
    """What the kiosk stores for one check-in, in the kiosk's order, ending with the arrival."""
    ref = f"Patient/{patient_id}"
    await store.create([intake.questionnaire_response(answers, ref, arrived, "en")], KIOSK)
    await store.create([intake.consent(ref, _png(60, 20), arrived, "en", "I agree")], KIOSK)
    await store.create(
        [factories.bp_observation(ref, 138, 86, effective=arrived.isoformat())], "service:devices"
    )
    await store.create([intake.photo_media(ref, _png(), arrived, "kiosk-1")], KIOSK)
    await store.create([intake.arrival(ref, arrived, "kiosk-1", None)], KIOSK)
    await DeviceRegistry(store).check_out("kiosk-1", KIOSK)


async def test_a_kiosk_check_in_appears_live_and_the_chart_shows_the_intake(
    live_app: LiveApp, page: Any, tmp_path: Path
) -> None:
    shots = Path(os.environ.get("APPLIANCE_SCREENSHOTS") or tmp_path)
    kiosk = await live_app.devices_store()
    now = datetime.now(UTC)
    # Someone who arrived earlier this morning, already in the queue when the page opens.
    earlier = await _checked_in_patient(kiosk, "Okonkwo", "Grace", "1958-07-21")
    await _kiosk_visit(
        kiosk,
        earlier,
        now - timedelta(minutes=24),
        intake.IntakeAnswers("Blood pressure check", ("none",), (0, 0)),
    )
    problems = live_server.watch_problems(page)
    await live_app.log_in(page, "/nurse/")
    assert page.url.endswith("/nurse/")
    await page.wait_for_selector("#live.on", timeout=5000)
    assert await page.locator("#arrivals tbody tr").count() == 1
    await page.evaluate("() => { window.__noReload = true; }")

    patient_id = await _checked_in_patient(kiosk, "Lindqvist", "Maja", "1971-11-02")
    await _kiosk_visit(
        kiosk,
        patient_id,
        datetime.now(UTC),
        intake.IntakeAnswers("Cough and fever since Monday", ("fever", "cough"), (2, 2)),
    )
    row = page.locator("#arrivals tbody tr", has_text="Lindqvist")
    await row.wait_for(timeout=5000)
    assert await page.evaluate("() => window.__noReload === true")
    assert await row.locator(".station").text_content() == "kiosk-1"
    assert await row.locator(".intake").text_content() == "Yes"
    assert await row.locator(".consent").text_content() == "Yes"
    assert await row.locator(".vitals").text_content() == "Yes (1)"
    assert await row.locator(".photos").text_content() == "1"
    assert await page.locator("#arrivals-count").text_content() == "2"
    vitals_row = page.locator("#patients tbody tr", has_text="Lindqvist")
    assert await vitals_row.locator(".bp").text_content() == "138/86 mm[Hg]"
    assert "Lindqvist, Maja" in await page.inner_text("#latest")
    await page.screenshot(path=str(shots / "nurse-arrivals.png"), full_page=True)
    await page.screenshot(path=str(shots / "nurse-console.png"), full_page=True)

    async with page.expect_navigation():
        await row.locator("a.open-chart").click()
    assert page.url.endswith(f"/patients/{patient_id}")
    assert await page.locator("#patient-name").text_content() == "Lindqvist, Maja"
    intake_text = await page.inner_text("#intake")
    assert "Cough and fever since Monday" in intake_text
    assert "Fever or chills, Cough" in intake_text
    assert "PHQ-2 score: 4" in intake_text
    assert "Positive screen" in intake_text
    assert "138/86 mmHg" in await page.inner_text("#this-visit")
    photo = page.locator("#photos img")
    await photo.wait_for()
    assert await photo.evaluate("img => img.complete && img.naturalWidth") == 160
    await page.screenshot(path=str(shots / "patient-chart.png"), full_page=True)
    assert problems == []
