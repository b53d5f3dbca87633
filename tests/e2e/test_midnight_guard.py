"""The browser tests' guard against the demo site's midnight (tests/e2e/conftest.py)."""

from __future__ import annotations

from datetime import datetime, timedelta

from tests.e2e.live_server import SITE_ZONE, wait_for_the_day


def test_the_midnight_guard_waits_only_around_the_sites_midnight() -> None:
    at = datetime(2026, 11, 29, tzinfo=SITE_ZONE)  # midnight in Chicago, 06:00 UTC
    assert wait_for_the_day(at + timedelta(hours=9)) == 0.0
    assert wait_for_the_day(at + timedelta(minutes=10)) == 15 * 60
    assert wait_for_the_day(at - timedelta(minutes=2)) == 27 * 60
    assert wait_for_the_day(at - timedelta(minutes=6)) == 0.0
    assert wait_for_the_day(at + timedelta(minutes=25)) == 0.0
