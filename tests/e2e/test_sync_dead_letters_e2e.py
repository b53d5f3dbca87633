"""Dead letters in Chromium: an admin sends a refused Patient again once the EHR is fixed.

The refusal is real (the Medplum peer's reject rule answers the Patient's entry 422 and the
deliverer dead-letters its readings after it); the page is served by Hypercorn under the
production CSP. Set ``APPLIANCE_SCREENSHOTS=DIR`` to keep screenshots of the page before and
after.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest

from appliance import db
from appliance.runtime import write_heartbeat
from appliance.users import Role
from sync_agent.lease import SyncLease
from sync_agent.outbox_delivery import Deliverer
from sync_agent.process import SyncLoop
from sync_agent.pull_twins import Twin, note_twins
from sync_agent.wakeups import Wake
from tests import factories
from tests.e2e import live_server
from tests.e2e.conftest import LiveApp
from tests.fhir_peer.peer import FhirPeer
from tests.sync_agent.test_faults import _loop_ctx

pytestmark = [pytest.mark.slow, pytest.mark.peer]

ADMIN = "admin-e2e"
ADMIN_PASSWORD = "admin horse battery staple e2e"


async def _sign_in_as_admin(live_app: LiveApp, page: Any) -> None:
    """The administrator's first sign-in: TOTP enrolment, then the page asked for."""
    await live_server.create_user(live_app.store, ADMIN, ADMIN_PASSWORD, Role.ADMIN)
    await live_app.log_in(page, "/sync/", username=ADMIN, password=ADMIN_PASSWORD)
    assert page.url.endswith("/mfa/enrol")
    secret = (await page.locator("#secret").text_content() or "").replace(" ", "").strip()
    await page.fill("#code", pyotp.TOTP(secret).now())
    async with page.expect_navigation():
        await page.click("button[type=submit].primary")
    await page.goto(live_app.url("/sync/"))


async def test_an_admin_sends_a_refused_patient_again_and_it_lands_with_its_readings(
    live_app: LiveApp, page: Any, upstream: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    problems = live_server.watch_problems(page)
    store = live_app.store
    [pat] = await store.create([factories.patient(family="Refusedperson")], "user:e2e")
    await store.create(
        [factories.bp_observation(f"Patient/{pat.logical_id}", systolic=s) for s in (131, 132)],
        "service:devices",
    )
    deliverer = Deliverer(store, upstream, max_entries=8, rng=random.Random(1))
    fhir_peer.reject("Refusedperson")  # an EHR rule, relaxed by its team later
    try:
        dead = (await deliverer.drain()).dead + (await deliverer.drain()).dead
    finally:
        fhir_peer.reject(None)
    assert dead == 3

    await _sign_in_as_admin(live_app, page)
    assert await page.locator("#dead-total").inner_text() == "3"
    rows = page.locator("#dead-letters tbody tr")
    assert await rows.count() == 3
    folder = os.environ.get("APPLIANCE_SCREENSHOTS")
    if folder:
        await page.screenshot(path=str(Path(folder) / "sync-dead-letters.png"), full_page=True)
    patient_row = page.locator("#dead-letters tbody tr", has_text="Patient")
    async with page.expect_navigation():
        await patient_row.get_by_role("button", name="Send again").click()
    assert page.url.endswith("/sync/?resent=3")  # the Patient took its two readings along
    notice = await page.locator("p.notice").inner_text()
    assert "3 dead letters put back in the outbox" in notice
    assert await page.locator("#dead-total").inner_text() == "0"
    assert await page.locator("#waiting").inner_text() == "3 items"
    if folder:
        await page.screenshot(path=str(Path(folder) / "sync-dead-letters-sent.png"), full_page=True)

    delivered = await deliverer.drain()
    assert (delivered.delivered, delivered.dead) == (3, 0)
    assert (fhir_peer.count("Patient"), fhir_peer.count("Observation")) == (1, 2)

    # Later the site's base_url is mistyped: the page says so in words, not "endpoint".
    now = datetime.now(UTC).isoformat()
    raw = sqlite3.connect(live_app.db_path)
    with raw:
        raw.execute(
            "INSERT INTO heartbeats (process, pid, started_at, beat_at, status) "
            "VALUES ('sync', 1, ?, ?, ?)",
            (
                now,
                now,
                json.dumps({"upstream": "ehr", "online": False, "last_failure": "endpoint"}),
            ),
        )
    raw.close()
    await page.reload()
    assert "check base_url" in await page.locator("#last-failure").inner_text()
    if folder:
        await page.screenshot(path=str(Path(folder) / "sync-endpoint.png"))

    # Back online, but the EHR refuses the audit export (our access), and the export found
    # the local audit trail cut back under it: both said in words.
    raw = sqlite3.connect(live_app.db_path)
    with raw:
        raw.execute(
            "UPDATE heartbeats SET status = ? WHERE process = 'sync'",
            (
                json.dumps(
                    {"upstream": "ehr", "online": True, "steps_failing": {"audit export": "auth"}}
                ),
            ),
        )
        raw.execute("INSERT INTO meta (key, value) VALUES ('audit_export.breaks', '1')")
        # And the pull met an EHR record carrying our identifier under another id.
        note_twins(raw, [Twin("Patient/77", "Patient/01a2-local", "2026-11-29T08:00:00Z")])
    raw.close()
    await page.reload()
    assert "1 EHR record not pulled" in await page.locator("#twins").inner_text()
    held = await page.locator("#steps-failing").inner_text()
    assert "Audit export" in held
    assert "refused our credentials" in held
    assert "appliance audit verify" in await page.locator("#trail-breaks").inner_text()
    if folder:
        await page.screenshot(path=str(Path(folder) / "sync-held-back.png"), full_page=True)
    # Looked into and reported: the admin acknowledges it and the red warning goes.
    async with page.expect_navigation():
        await page.click("#trail-breaks button[type=submit]")
    assert "1 audit trail break acknowledged" in await page.content()
    said = await page.locator("#trail-breaks").inner_text()
    assert "all acknowledged" in said
    assert await page.locator("#trail-breaks .state-bad").count() == 0
    assert problems == []


async def test_an_admin_sees_an_item_the_ehr_keeps_refusing_for_our_access_and_its_message(
    live_app: LiveApp, page: Any, upstream: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    """A reading the EHR answers 403 on its entry (a scope missing there): never a dead
    letter, so before the "Failing items" row nothing but the oldest age showed it."""
    problems = live_server.watch_problems(page)
    store = live_app.store
    [pat] = await store.create([factories.patient(family="Scopeperson")], "user:e2e")
    await store.create(
        [factories.bp_observation(f"Patient/{pat.logical_id}", systolic=177)], "service:devices"
    )
    now = [datetime.now(UTC)]
    deliverer = Deliverer(
        store, upstream, max_entries=8, rng=random.Random(1), clock=lambda: now[0]
    )
    fhir_peer.reject("8480-6", status=403)  # every reading's entry: its LOINC code
    try:
        for _ in range(3):  # three tries, each once its backoff has passed
            assert (await deliverer.drain()).retry == 1
            now[0] += timedelta(minutes=10)
    finally:
        fhir_peer.reject(None)
    assert fhir_peer.count("Patient") == 1  # the Patient went; only its reading is refused

    await _sign_in_as_admin(live_app, page)
    failing = await page.locator("#failing").inner_text()
    assert "1 item the EHR keeps answering with an error" in failing
    assert "the oldest: Observation, tried 3 times" in failing
    async with page.expect_navigation():
        await page.click("#failing-message")
    message = await page.locator("#failing-opened + p + blockquote").inner_text()
    assert message.startswith("entry HTTP 403")
    folder = os.environ.get("APPLIANCE_SCREENSHOTS")
    if folder:
        await page.screenshot(path=str(Path(folder) / "sync-failing.png"), full_page=True)
    assert problems == []


async def test_a_nurse_sees_the_sync_process_paused_while_sync_once_sends(
    live_app: LiveApp, page: Any, fhir_peer: FhirPeer, tmp_path: Path
) -> None:
    """The sync process skips its round while ``appliance sync once`` holds the sync lease,
    and says so: before, the page read "Online" and nothing went, with no word of why."""
    problems = live_server.watch_problems(page)
    sync_store = await live_app.devices_store()  # the sync process's own connection
    ctx = await _loop_ctx(tmp_path, sync_store, fhir_peer.base_url, interval_s=60)
    async with (
        httpx.AsyncClient(base_url=fhir_peer.base_url) as client,
        SyncLease(live_app.db_path, unsure_s=30).round() as held,  # sync once, sending
    ):
        assert held is not None
        loop = SyncLoop(ctx, client, ctx.config.sync.upstreams[0], rng=random.Random(1))
        skipped = await loop._round(Wake.WORK)
        assert skipped.busy
        figures = json.dumps(ctx.status, default=str)
        await db.run_sync(sync_store.connection, write_heartbeat, "sync", "", figures)
        await live_app.log_in(page, "/sync/")
        link = await page.locator("#link").inner_text()
        assert link.startswith("Paused not checked yet")  # not "Starting": no round runs
        paused = await page.locator("#paused").inner_text()
        assert paused.startswith("Paused for ")
        assert "appliance sync once is sending from this box" in paused
        folder = os.environ.get("APPLIANCE_SCREENSHOTS")
        if folder:
            await page.screenshot(path=str(Path(folder) / "sync-paused.png"), full_page=True)
    assert problems == []
