"""Browser tests: the real app under Hypercorn on loopback, driven by headless Chromium.

Fixtures for any browser test:

* ``live_app`` — ``web.app.create_app`` over a real SQLite store (the shared ``store``
  fixture's file), served on 127.0.0.1 on a free port, with a nurse account;
  ``live_app.url(path)``, ``live_app.store``, ``await live_app.log_in(page)``, and
  ``await live_app.devices_store()`` for a second connection to the same database, as another
  process (devices, sync) would have;
* ``video_app`` — the demo app with the video nurse (``video_call.served_app``), ICE on
  loopback only: ``(base URL, its state)``, for the video tests;
* ``browser`` / ``page`` — Debian's Chromium (``/usr/bin/chromium``) through Playwright,
  never a downloaded browser (``media_browser``: with its fake camera and microphone). Skipped with a reason only when that binary is absent;
  ``make test`` installs it, so in CI these tests run.

These tests serve the app on the wall clock and seed a visit's steps up to 24 minutes back
("arrived earlier this morning"). Just after the demo site's midnight those steps would fall
on yesterday, outside today's arrivals, so a session that starts in the half hour around
that midnight (05:55-06:25 UTC, an hour earlier in summer) first waits until it has passed
(:func:`live_server.wait_for_the_day`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from appliance.config import demo_config
from appliance.store import Store
from appliance.users import Role
from tests.e2e import live_server
from web.app import AppState, create_app

NURSE = "nurse-e2e"


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The first browser test of the run carries the wait for the site's day (the fixture
    below, up to :func:`live_server.most_wait_for_the_day`) in its set-up: its timeout is that
    much longer. Before, pytest-timeout ended the wait, and every browser test of a run that
    reached them just after the demo site's midnight (06:00–06:25 UTC) errored."""
    first = next((item for item in items if item.path.is_relative_to(_HERE)), None)
    if first is not None:
        usual = float(config.getini("timeout") or 0) or 300.0
        most = live_server.most_wait_for_the_day().total_seconds()
        first.add_marker(pytest.mark.timeout(usual + most), append=False)  # before its own


_HERE = Path(__file__).parent


@pytest.fixture(scope="session", autouse=True)
def _clear_of_the_sites_midnight(tmp_path_factory: pytest.TempPathFactory) -> None:
    site = demo_config(tmp_path_factory.mktemp("demo-site")).site
    wait = live_server.wait_for_the_day(datetime.now(UTC), ZoneInfo(site.timezone))
    if wait:
        sys.stderr.write(
            f"\nbrowser tests: waiting {wait / 60:.0f} min for the demo site's midnight to "
            "pass (their seeds reach 24 minutes back)\n"
        )
        time.sleep(wait)


PASSWORD = "correct horse battery staple"


@dataclass
class LiveApp:
    """The served app: its base URL, its store, and helpers to use it as a person would."""

    base_url: str
    store: Store
    db_path: Path
    kek_path: Path
    _others: list[Store] = field(default_factory=list)

    def url(self, path: str = "/") -> str:
        return f"{self.base_url}{path}"

    async def log_in(
        self, page: Any, path: str = "/", username: str = NURSE, password: str = PASSWORD
    ) -> None:
        """Sign ``page`` in through the login form (the nurse by default), landing on ``path``."""
        await live_server.log_in(page, self.base_url, username, password, path)

    async def devices_store(self) -> Store:
        """Another connection to the same database, as the devices or sync process has."""
        other = await Store.open(self.db_path, self.kek_path)
        self._others.append(other)
        return other


@pytest.fixture
async def live_app(
    tmp_path: Path, store: Store, db_path: Path, kek_path: Path
) -> AsyncIterator[LiveApp]:
    config = demo_config(tmp_path)  # its database and KEK are where the store fixture put them
    await live_server.create_user(store, NURSE, PASSWORD, Role.NURSE)
    app = create_app(config, store)  # the production SSE poll (0.25 s)
    async with live_server.serve(app) as base_url:
        served = LiveApp(base_url, store, db_path, kek_path)
        try:
            yield served
        finally:
            for other in served._others:
                await other.close()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not live_server.CHROMIUM.exists():
        pytest.skip(f"{live_server.CHROMIUM} is not installed (`make test` installs chromium)")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await live_server.launch_chromium(playwright)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def media_browser() -> AsyncIterator[Any]:
    """As ``browser``, with Chromium's fake camera and microphone, permissions granted."""
    if not live_server.CHROMIUM.exists():
        pytest.skip(f"{live_server.CHROMIUM} is not installed (`make test` installs chromium)")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await live_server.launch_chromium(playwright, fake_media=True)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    context = await browser.new_context(viewport={"width": 1440, "height": 1000})
    opened = await context.new_page()
    try:
        yield opened
    finally:
        await context.close()


@pytest.fixture
async def video_app(
    tmp_path: Path, store: Store, loopback: None
) -> AsyncIterator[tuple[str, AppState]]:
    """The demo app with the video nurse, served; aioice gathers 127.0.0.1 only."""
    from tests.e2e.video_call import served_app  # aiortc only for the video tests

    async with served_app(tmp_path, store) as served:
        yield served
