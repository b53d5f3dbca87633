"""Whose chart a reading belongs to, and when it was taken: the pure rules."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from appliance.device_registry import CheckIn, Device, Setting, Transport
from services.routing import (
    ReadingTime,
    Routed,
    TimeFlag,
    TimeSource,
    Unmatched,
    reading_time,
    route,
)

ZONE = ZoneInfo("America/Chicago")
RECEIVED = datetime(2026, 11, 26, 16, 0, tzinfo=UTC)  # 10:00 in Chicago

CUFF = Device(
    id="cuff-1",
    name="Kiosk cuff",
    transport=Transport.BLE,
    profile="blood_pressure",
    address="AA:BB:CC:DD:EE:FF",
    setting=Setting.CLINIC,
    station_id="kiosk-1",
    patient_id=None,
    requires_bonding=False,
    manufacturer=None,
    model=None,
    serial_number=None,
    firmware_revision=None,
    battery_percent=None,
    fhir_device_id=None,
    last_sequence=None,
    last_seen=None,
)


def _at(hh: int, mm: int) -> ReadingTime:
    return reading_time(datetime(2026, 11, 26, hh, mm), RECEIVED, ZONE)


def _checkin(patient: str, start: str, end: str | None, station: str = "kiosk-1") -> CheckIn:
    return CheckIn(1, station, patient, start, end)


# 09:50-09:58 Chicago = 15:50-15:58 UTC, then p2 from 15:58 UTC, still there.
CHECKINS = [
    _checkin("p1", "2026-11-26T15:50:00.000000Z", "2026-11-26T15:58:00.000000Z"),
    _checkin("p2", "2026-11-26T15:58:00.000000Z", None),
]


def test_device_time_is_read_in_the_site_zone_and_trusted() -> None:
    when = _at(9, 59)
    assert when == ReadingTime(datetime(2026, 11, 26, 9, 59, tzinfo=ZONE), TimeSource.DEVICE, None)


@pytest.mark.parametrize(
    ("device_time", "kw", "flag"),
    [
        (None, {}, TimeFlag.NO_DEVICE_TIME),
        (datetime(2026, 11, 26, 9, 59), {"clock_not_set": True}, TimeFlag.CLOCK_NOT_SET),
        (datetime(2026, 11, 26, 10, 6), {}, TimeFlag.CLOCK_AHEAD),
    ],
)
def test_untrustworthy_device_times_fall_back_to_receipt_with_a_flag(
    device_time: datetime | None, kw: dict[str, bool], flag: TimeFlag
) -> None:
    assert reading_time(device_time, RECEIVED, ZONE, **kw) == ReadingTime(
        RECEIVED, TimeSource.RECEIVED, flag
    )


def test_a_device_a_little_ahead_within_tolerance_is_trusted() -> None:
    assert reading_time(datetime(2026, 11, 26, 10, 4), RECEIVED, ZONE).trusted


def test_naive_receipt_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        reading_time(None, RECEIVED.replace(tzinfo=None), ZONE)


def test_reading_goes_to_the_patient_checked_in_at_that_moment() -> None:
    assert route(CUFF, _at(9, 55), CHECKINS) == Routed("p1", Setting.CLINIC)
    assert route(CUFF, _at(9, 59), CHECKINS) == Routed("p2", Setting.CLINIC)


def test_checkout_instant_belongs_to_the_next_patient() -> None:
    assert route(CUFF, _at(9, 58), CHECKINS) == Routed("p2", Setting.CLINIC)


def test_reading_before_anyone_checked_in_is_held() -> None:
    decision = route(CUFF, _at(9, 40), CHECKINS, station_name="Kiosk 1")
    assert decision == Unmatched("no patient was checked in at Kiosk 1 when the reading was taken")


def test_two_patients_at_once_is_never_guessed() -> None:
    overlapping = [*CHECKINS, _checkin("p3", "2026-11-26T15:55:00.000000Z", None)]
    assert isinstance(route(CUFF, _at(9, 59), overlapping), Unmatched)


def test_checkins_at_other_stations_do_not_count() -> None:
    other = [_checkin("p9", "2026-11-26T15:00:00.000000Z", None, station="exam-1")]
    assert isinstance(route(CUFF, _at(9, 59), other), Unmatched)


def test_unassigned_clinic_device_is_held() -> None:
    assert route(replace(CUFF, station_id=None), _at(9, 59), CHECKINS) == Unmatched(
        "Kiosk cuff is not assigned to a station"
    )


def test_home_device_goes_to_its_patient_whatever_the_station() -> None:
    home = replace(CUFF, setting=Setting.HOME, station_id=None, patient_id="p7")
    assert route(home, _at(3, 0), []) == Routed("p7", Setting.HOME)
    assert isinstance(route(replace(home, patient_id=None), _at(3, 0), []), Unmatched)


def test_stored_reading_without_a_trustworthy_time_is_held() -> None:
    untrusted = reading_time(None, RECEIVED, ZONE)
    assert isinstance(route(CUFF, untrusted, CHECKINS, stored=True), Unmatched)
    # A live reading without a device time is placed at its receipt: p2 is there now.
    assert route(CUFF, untrusted, CHECKINS) == Routed("p2", Setting.CLINIC)


def test_clock_tolerance_is_configurable() -> None:
    ahead = datetime(2026, 11, 26, 10, 2)
    assert not reading_time(ahead, RECEIVED, ZONE, tolerance=timedelta(minutes=1)).trusted
