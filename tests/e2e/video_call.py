"""Steps the video e2e tests share: the app served for a visit, the nurse issuing the
provider's link, the provider's page waiting in the room, frames decoded on a page."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from appliance.config import demo_config
from appliance.store import Store
from appliance.users import Role
from tests.e2e import live_server
from tests.video.peers import wait_for
from tests.video.test_service import Client
from web.app import AppState, create_app

NURSE, PASSWORD = "nurse-video", "correct horse battery staple"


@contextlib.asynccontextmanager
async def served_app(tmp_path: Path, store: Store) -> AsyncIterator[tuple[str, AppState]]:
    """The demo app with the video nurse, served on 127.0.0.1: (base URL, its state)."""
    app = create_app(demo_config(tmp_path), store)
    await live_server.create_user(store, NURSE, PASSWORD, Role.NURSE)
    async with live_server.serve(app) as base_url:
        yield base_url, app.extensions["appliance"]


async def issue_link(nurse: Any, base_url: str) -> str:
    """The nurse logs in on ``nurse`` and issues a provider link; its path (``/visit/…``)."""
    await live_server.log_in(nurse, base_url, NURSE, PASSWORD, "/visit/new")
    await nurse.click("text=Issue the link")
    url = await nurse.input_value("#issued-url")
    return "/visit/" + url.rsplit("/visit/", 1)[1]


async def provider_waits(provider: Any, base_url: str, link_path: str) -> None:
    """The provider opens the link, joins, starts video and waits for the nurse."""
    await provider.goto(base_url + link_path)
    async with provider.expect_navigation():
        await provider.click("#join")
    await provider.click("#video-start")
    await provider.wait_for_selector("#video-status:has-text('Waiting for the nurse')")


async def frames_decoded(page: Any, publisher: str) -> int:
    """Frames the page's tile of ``publisher`` decoded (``data-frames-decoded``)."""
    value = await page.get_attribute(
        f"#video-tiles figure[data-publisher='{publisher}']", "data-frames-decoded"
    )
    return int(value or 0)


async def decoded_at_least(page: Any, publisher: str, frames: int) -> None:
    """Wait (up to ~45 s) until the page decoded ``frames`` from ``publisher``."""
    tile = f"#video-tiles figure[data-publisher='{publisher}']"
    await page.wait_for_selector(tile, timeout=15_000)
    for _ in range(150):
        if await frames_decoded(page, publisher) >= frames:
            return
        await page.wait_for_timeout(200)
    raise AssertionError(f"{frames} frames not decoded from {publisher}")


async def admitted_and_seeing_each_other(
    nurse: Any, provider: Any, patient: Client, encounter_id: str
) -> str:
    """The aiortc patient joins; the nurse's page admits the waiting provider and the
    patient; the patient publishes; both decode 30 of the other's frames. The provider's id."""
    await patient.join("patient", visit=encounter_id)
    for role in ("provider", "patient"):
        admit = f"#video-people li[data-role='{role}'] button:has-text('Admit')"
        await nurse.click(admit, timeout=10_000)
    await wait_for(lambda: any(m["type"] == "admitted" for m in patient.received), 10, "admitted")
    await patient.publish()
    provider_id: str = next(
        m["participant"]
        for m in patient.received
        if m["type"] == "participant" and m["role"] == "provider"
    )
    await decoded_at_least(provider, patient.id, 30)
    await wait_for(lambda: patient.video[provider_id] >= 30, 30, "provider at patient")
    return provider_id
