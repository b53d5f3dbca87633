"""Which chart a reading belongs to, and when it was taken: pure decisions, clock injected.

**When.** Devices keep local wall time with no zone; the devices process sets their clocks
(Current Time 0x2A2B) on every connection, so a device time is read in the site's zone and
trusted, except when:

* the device sent no time, or said its clock is not set (PLX flag) → the time of receipt is
  used and the Observation says so;
* the device time is later than the time of receipt by more than the tolerance (a reading
  cannot come from the future: the clock is wrong) → the time of receipt, flagged.

A device time in the past is trusted: cuffs and meters hand over readings they stored while
out of reach. For such a *stored* reading the time of receipt says nothing, so a stored
reading without a trustworthy device time cannot be placed in time at all.

**Whose.** A home device belongs to one patient. A clinic device belongs to its station, and
its reading goes to the patient checked in at that station at the moment the reading was
taken — exactly one, or nobody: with none, several, or no trustworthy time, the reading is
held for a nurse (``unmatched``), never guessed. A reading taken before the current patient
checked in (a meter's memory holding the previous patient's readings) is therefore held.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from enum import StrEnum

from appliance import fhir
from appliance.device_registry import CheckIn, Device, Setting

DEFAULT_CLOCK_TOLERANCE = timedelta(minutes=5)
DEVICE_TIME_RESOLUTION = timedelta(seconds=1)


class TimeSource(StrEnum):
    """Where an Observation's effective time came from (said in the Observation)."""

    DEVICE = "device"
    RECEIVED = "received"


class TimeFlag(StrEnum):
    """Why the device's time was not used."""

    NO_DEVICE_TIME = "device-sent-no-time"
    CLOCK_NOT_SET = "device-clock-not-set"
    CLOCK_AHEAD = "device-clock-ahead"


@dataclass(frozen=True, slots=True)
class ReadingTime:
    """The effective time of a reading (timezone-aware) and how it was decided."""

    effective: datetime
    source: TimeSource
    flag: TimeFlag | None = None

    @property
    def trusted(self) -> bool:
        """Whether this is when the reading was really taken."""
        return self.source is TimeSource.DEVICE


def reading_time(
    device_time: datetime | None,
    received: datetime,
    site_zone: tzinfo,
    *,
    clock_not_set: bool = False,
    tolerance: timedelta = DEFAULT_CLOCK_TOLERANCE,
) -> ReadingTime:
    """Decide the effective time of a reading (see the module docstring).

    ``device_time`` is the device's naive wall-clock time; ``received`` is timezone-aware.
    """
    if received.tzinfo is None:
        raise ValueError("received must be timezone-aware")
    if device_time is None:
        return ReadingTime(received, TimeSource.RECEIVED, TimeFlag.NO_DEVICE_TIME)
    if clock_not_set:
        return ReadingTime(received, TimeSource.RECEIVED, TimeFlag.CLOCK_NOT_SET)
    measured = device_time.replace(tzinfo=site_zone)
    if measured - received > tolerance:
        return ReadingTime(received, TimeSource.RECEIVED, TimeFlag.CLOCK_AHEAD)
    return ReadingTime(measured, TimeSource.DEVICE)


@dataclass(frozen=True, slots=True)
class Routed:
    """The reading goes into this patient's chart."""

    patient_id: str
    setting: Setting


@dataclass(frozen=True, slots=True)
class Unmatched:
    """The reading is held for a nurse; ``reason`` is shown to staff and holds no PHI."""

    reason: str


def route(
    device: Device,
    when: ReadingTime,
    checkins: Sequence[CheckIn],
    *,
    stored: bool = False,
    station_name: str | None = None,
) -> Routed | Unmatched:
    """Whose chart a reading from ``device`` belongs to (see the module docstring).

    ``checkins`` are the station's check-ins around the reading's time; ``stored`` says the
    device handed over a reading from its memory rather than one just taken.
    """
    if device.setting is Setting.HOME:
        if device.patient_id is None:
            return Unmatched(f"home device {device.name} is not assigned to a patient")
        return Routed(device.patient_id, Setting.HOME)
    if device.station_id is None:
        return Unmatched(f"{device.name} is not assigned to a station")
    where = station_name or device.station_id
    if stored and not when.trusted:
        return Unmatched(f"a stored reading from {device.name} has no trustworthy time")
    # A device time names a whole second (the Date Time format has no fractions): the
    # reading was taken somewhere in [t, t + 1 s), so a check-in within that second counts.
    resolution = DEVICE_TIME_RESOLUTION if when.trusted else timedelta(0)
    start = fhir.utc_text(when.effective)
    end = fhir.utc_text(when.effective + resolution)
    present = {
        c.patient_id
        for c in checkins
        if c.station_id == device.station_id
        and (c.checked_in_at <= start or c.checked_in_at < end)
        and (c.checked_out_at is None or start < c.checked_out_at)
    }
    if not present:
        return Unmatched(f"no patient was checked in at {where} when the reading was taken")
    if len(present) > 1:
        return Unmatched(f"more than one patient was checked in at {where} at that time")
    return Routed(present.pop(), Setting.CLINIC)
