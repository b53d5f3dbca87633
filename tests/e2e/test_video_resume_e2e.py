"""The provider's page in Chromium takes its seat back after its signalling socket drops.

As ``test_video_e2e.py`` (the nurse and the provider in Chromium with fake media over the
real routes, the patient an aiortc peer of the app's own video service), then Playwright
cuts the provider page's WebSocket both ways (``route_web_socket``): the nurse's page shows
the provider reconnecting, ``video.js`` opens a new socket after its backoff and resumes
with the seat's token, nobody admits anyone again, and the provider's page keeps decoding
the patient while the patient keeps decoding the provider.

Then the same after a reload of the provider's page: the old page hands its seat to the next
through the tab's ``sessionStorage``, the new page resumes it at once (no admission, the same
participant id), rebuilds its media legs and media flows both ways again; after *Leave the
video* a reload keeps nothing and the page starts afresh.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from appliance.store import Store
from tests.e2e.live_server import watch_problems
from tests.e2e.test_video_e2e import _arrived_patient
from tests.e2e.video_call import (
    admitted_and_seeing_each_other,
    decoded_at_least,
    frames_decoded,
    issue_link,
    provider_waits,
)
from tests.video.peers import wait_for
from tests.video.test_service import Client
from web.app import AppState

pytestmark = pytest.mark.slow


@contextlib.asynccontextmanager
async def _provider_waiting(
    state: AppState,
    base_url: str,
    store: Store,
    media_browser: Any,
    before_join: Callable[[Any], Awaitable[None]] | None = None,
) -> AsyncIterator[tuple[str, Any, Any, Any, Client]]:
    """A patient arrived; the nurse's page in the video; the provider's page (its own
    browser context; ``before_join`` run on it first) joined by its link and waiting; the
    patient an aiortc peer, not joined yet. Yields (the visit, the nurse's page, the
    provider's context, its page, the patient)."""
    encounter_id = await _arrived_patient(store)
    nurse_context = await media_browser.new_context()
    nurse = await nurse_context.new_page()
    link_path = await issue_link(nurse, base_url)
    await nurse.goto(f"{base_url}/video/nurse?visit={encounter_id}")
    await nurse.click("#video-start")

    provider_context = await media_browser.new_context()
    provider = await provider_context.new_page()
    if before_join is not None:
        await before_join(provider)
    await provider_waits(provider, base_url, link_path)
    patient = Client(state.video, "patient")
    try:
        yield encounter_id, nurse, provider_context, provider, patient
    finally:
        await patient.close()
        await provider_context.close()
        await nurse_context.close()


async def test_the_provider_page_resumes_its_seat_after_its_socket_drops(
    video_app: tuple[str, AppState], store: Store, media_browser: Any
) -> None:
    base_url, state = video_app
    watched: list[list[str]] = []  # the provider page's problems, from before it joins
    sockets: list[tuple[Any, Any]] = []  # (the page's side, the server's side)

    def route(ws: Any) -> None:
        sockets.append((ws, ws.connect_to_server()))  # messages pass as they are

    async def cut_in(page: Any) -> None:
        watched.append(watch_problems(page))
        await page.route_web_socket(re.compile(r".*/video$"), route)

    async with _provider_waiting(state, base_url, store, media_browser, cut_in) as call:
        encounter_id, nurse, _provider_context, provider, patient = call
        provider_id = await admitted_and_seeing_each_other(nurse, provider, patient, encounter_id)

        # The provider's socket dies, both ways, without a word.
        page_side, server_side = sockets[-1]
        await server_side.close(code=4000, reason="cut by the test")
        await page_side.close(code=4000, reason="cut by the test")
        provider_row = f"#video-people li[data-participant='{provider_id}']"
        await nurse.wait_for_selector(f"{provider_row} .reconnecting", timeout=10_000)

        # video.js reconnects, resumes the seat with its token; nobody admits anyone.
        await nurse.wait_for_selector(f"{provider_row} .reconnecting", state="detached")
        assert len(sockets) >= 2
        assert await nurse.locator(f"{provider_row} button:has-text('Admit')").count() == 0
        await provider.wait_for_selector("#video-status:has-text('In the visit')")
        before = await frames_decoded(provider, patient.id)
        await decoded_at_least(provider, patient.id, before + 30)
        seen = patient.video[provider_id]
        await wait_for(lambda: patient.video[provider_id] >= seen + 30, 30, "provider again")
        assert all(m["type"] != "left" for m in patient.received)
        assert watched == [[]]


async def test_a_reloaded_provider_page_takes_its_seat_back_without_admission(
    video_app: tuple[str, AppState], store: Store, media_browser: Any
) -> None:
    base_url, state = video_app
    async with _provider_waiting(state, base_url, store, media_browser) as call:
        encounter_id, nurse, _provider_context, provider, patient = call
        provider_id = await admitted_and_seeing_each_other(nurse, provider, patient, encounter_id)
        # In the call, the token is in the page's memory only, not in the tab's storage.
        assert await provider.evaluate("() => sessionStorage.length") == 0
        await wait_for(lambda: state.video.connections(encounter_id) == 9, 15, "9 connections")

        # The provider reloads the page mid-visit (F5): the same seat, nobody admits again.
        problems = watch_problems(provider)
        await provider.reload()
        me = f"#video-people li[data-participant='{provider_id}']"
        await provider.wait_for_selector(f"{me}:has-text('(you)')", timeout=15_000)
        assert await provider.evaluate("() => sessionStorage.length") == 0  # taken at once
        await provider.wait_for_selector("#video-status:has-text('In the visit')", timeout=20_000)
        provider_row = f"#video-people li[data-participant='{provider_id}']"
        await nurse.wait_for_selector(f"{provider_row} .reconnecting", state="detached")
        assert await nurse.locator(f"{provider_row} button:has-text('Admit')").count() == 0
        assert await provider.locator("#video-leave").is_visible()
        # Media both ways again, on the new page's connections.
        await decoded_at_least(provider, patient.id, 30)
        seen = patient.video[provider_id]
        await wait_for(lambda: patient.video[provider_id] >= seen + 30, 30, "provider again")
        assert all(m["type"] != "left" for m in patient.received)
        # Three publishers, each seen by two: the page's old connections were replaced.
        assert state.video.connections(encounter_id) == 9
        assert problems == []

        # Leaving keeps nothing for a later load: a reload then starts afresh.
        await provider.click("#video-leave")
        await provider.wait_for_selector("#video-start", state="visible")
        await wait_for(lambda: state.video.connections(encounter_id) == 4, 15, "provider gone")
        await provider.reload()
        await provider.wait_for_selector("#video-start", state="visible")
        assert await provider.inner_text("#video-status") == "Not started."
        await provider.wait_for_timeout(1000)
        assert await nurse.locator(f"{provider_row}").count() == 0  # no seat taken


async def test_a_second_window_of_the_same_link_takes_the_seat_and_the_first_stops(
    video_app: tuple[str, AppState], store: Store, media_browser: Any
) -> None:
    """One credential, one seat (docs/video.md, "Rooms"): the provider opens the visit in a
    second tab of the same browser and starts the video there. The first tab is told, stops
    its camera and calls, and does not join back; the second waits to be admitted."""
    base_url, state = video_app
    async with _provider_waiting(state, base_url, store, media_browser) as call:
        encounter_id, nurse, provider_context, first, patient = call
        first_id = await admitted_and_seeing_each_other(nurse, first, patient, encounter_id)
        problems = watch_problems(first)
        second = await provider_context.new_page()
        await second.goto(first.url)  # the visit's page, in the same (bound) browser
        await second.click("#video-start")
        await second.wait_for_selector("#video-status:has-text('Waiting for the nurse')")

        await first.wait_for_selector(
            "#video-status:has-text('from another window or device')", timeout=10_000
        )
        await first.wait_for_selector("#video-start", state="visible")
        assert await first.locator("#video-tiles figure[data-publisher]").count() == 0
        assert await first.locator("#video-self").is_hidden()
        await nurse.wait_for_selector(
            f"#video-people li[data-participant='{first_id}']", state="detached"
        )
        waiting = "#video-people li[data-role='provider'] button:has-text('Admit')"
        await nurse.wait_for_selector(waiting, timeout=10_000)
        await first.wait_for_timeout(1500)  # the first tab does not take the seat back
        assert await second.inner_text("#video-status") == "Waiting for the nurse to let you in…"
        provider_rows = nurse.locator("#video-people li[data-role='provider']")
        assert await provider_rows.count() == 1
        assert problems == []

        await nurse.click(waiting)
        await second.wait_for_selector("#video-status:has-text('In the visit')", timeout=20_000)
        await decoded_at_least(second, patient.id, 30)
