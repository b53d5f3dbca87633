"""The browser tests' guard against the demo site's midnight (tests/e2e/conftest.py)."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from tests.e2e.live_server import wait_for_the_day

CHICAGO = ZoneInfo("America/Chicago")  # the demo site's zone


def test_the_midnight_guard_waits_only_around_the_sites_midnight() -> None:
    at = datetime(2026, 11, 29, tzinfo=CHICAGO)  # midnight in Chicago, 06:00 UTC
    assert wait_for_the_day(at + timedelta(hours=9), CHICAGO) == 0.0
    assert wait_for_the_day(at + timedelta(minutes=10), CHICAGO) == 15 * 60
    assert wait_for_the_day(at - timedelta(minutes=2), CHICAGO) == 27 * 60
    assert wait_for_the_day(at - timedelta(minutes=6), CHICAGO) == 0.0
    assert wait_for_the_day(at + timedelta(minutes=25), CHICAGO) == 0.0
