"""Where every device event lands: readings to the right chart, or held for a nurse.

Transports (BLE, serial, simulated) hand the hub decoded events with the device's id and the
time of receipt. The hub

1. keeps the registry's view of the device current (Device Information, battery, last seen);
2. turns a measurement into FHIR Observations (``services/vitals.py``) with its effective
   time decided by ``services/routing.py`` (device clock, corrected or flagged);
3. routes them: into the chart of the patient at the device's station at that moment (or the
   home patient's), in one store transaction with their outbox rows — or, when no patient
   can be named with certainty, into the held-readings queue. Never dropped, never guessed.

A glucose meter's stored records are numbered; the highest number stored is written in the
same transaction as the readings, so a download interrupted anywhere resumes after the last
record that is really in the store (no duplicates, none missed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo

from appliance import fhir
from appliance.device_registry import Device, DeviceRegistry, Setting
from appliance.store import Store, StoredResource
from drivers.gatt import BatteryLevel, DeviceInformation
from services import readings, routing
from services.routing import DEFAULT_CLOCK_TOLERANCE, Routed, Unmatched
from services.vitals import Capture, CaptureMethod

logger = logging.getLogger(__name__)

ACTOR = "service:devices"
_CHECKIN_LOOKBACK = timedelta(days=2)
# A continuous oximeter sends a value every second; one a minute goes into the chart.
CONTINUOUS_SAMPLE = timedelta(seconds=60)  # how far back a stored reading may find its check-in


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one measurement (for status counters and tests)."""

    stored: tuple[StoredResource, ...] = ()
    held_id: int | None = None
    reason: str | None = None


class DeviceHub:
    """Receives device events from every transport and files them."""

    def __init__(
        self,
        store: Store,
        registry: DeviceRegistry,
        site_zone: tzinfo,
        *,
        clock_tolerance: timedelta = DEFAULT_CLOCK_TOLERANCE,
        continuous_every: timedelta = CONTINUOUS_SAMPLE,
    ) -> None:
        self._store = store
        self._registry = registry
        self._zone = site_zone
        self._tolerance = clock_tolerance
        self.readings_stored = 0
        self.readings_held = 0
        self._sequences: dict[str, int | None] = {}
        self._continuous_every = continuous_every
        self._last_continuous: dict[str, datetime] = {}

    def last_sequence(self, device_id: str) -> int | None:
        """The highest stored-record number filed for a device (None: nothing yet).

        Kept in memory after each commit and loaded from the registry when a device is
        first seen (:meth:`load`), so a reconnect asks only for newer records.
        """
        return self._sequences.get(device_id)

    async def load(self, device: Device) -> None:
        """Learn a device's last filed record number from the registry."""
        self._sequences[device.id] = device.last_sequence

    async def on_event(
        self, device_id: str, event: object, received: datetime, method: CaptureMethod
    ) -> Outcome | None:
        """File one event from a device; returns what became of a measurement."""
        if isinstance(event, DeviceInformation):
            await self._registry.note_seen(device_id, **{event.field: event.value})
            return None
        if isinstance(event, BatteryLevel):
            await self._registry.note_seen(device_id, battery_percent=event.percent)
            return None
        reading = readings.describe(event)
        if reading is None:
            return None  # live-only (cuff inflating) or bookkeeping events: nothing to file
        if reading.continuous:
            last = self._last_continuous.get(device_id)
            if last is not None and received - last < self._continuous_every:
                return None  # a continuous oximeter streams ~1/s; the chart gets a sample
            self._last_continuous[device_id] = received
        device = await self._registry.device(device_id)
        when = routing.reading_time(
            reading.device_time,
            received,
            self._zone,
            clock_not_set=reading.clock_not_set,
            tolerance=self._tolerance,
        )
        device_ref = await self._device_reference(device)
        capture = Capture(
            setting=device.setting,
            method=method,
            time=when,
            device_display=device.name,
            device_ref=device_ref,
        )
        checkins = []
        station_name = None
        if device.setting is Setting.CLINIC and device.station_id is not None:
            since = fhir.utc_text(when.effective - _CHECKIN_LOOKBACK)
            checkins = await self._registry.checkins(device.station_id, since=since)
            station_name = await self._station_name(device.station_id)
        decision: Routed | Unmatched = routing.route(
            device, when, checkins, stored=reading.stored, station_name=station_name
        )
        if reading.not_a_patient is not None:
            decision = Unmatched(reading.not_a_patient)
        # The device's record number and "last seen" commit with the readings themselves.
        also = self._registry.reading_filed(device_id, reading.sequence)
        if isinstance(decision, Routed):
            resources = readings.observations(event, f"Patient/{decision.patient_id}", capture)
            stored = await self._store.create(resources, ACTOR, also=also)
            self._remember(device_id, reading.sequence)
            self.readings_stored += 1
            return Outcome(stored=tuple(stored))
        resources = readings.observations(event, None, capture)
        held_id = await self._registry.hold(
            device_id=device_id,
            station_id=device.station_id,
            received_at=received,
            measured_at=when.effective if when.trusted else None,
            summary=reading.summary,
            reason=decision.reason,
            resources=resources,
            also=also,
        )
        self._remember(device_id, reading.sequence)
        self.readings_held += 1
        logger.info("held a reading from device %s: %s", device_id, decision.reason)
        return Outcome(held_id=held_id, reason=decision.reason)

    def _remember(self, device_id: str, sequence: int | None) -> None:
        if sequence is not None:
            self._sequences[device_id] = sequence

    async def _station_name(self, station_id: str) -> str:
        for station in await self._registry.stations():
            if station.id == station_id:
                return station.name
        return station_id

    async def _device_reference(self, device: Device) -> str:
        """``Device/<id>`` of the FHIR Device describing this device, created on first use."""
        if device.fhir_device_id is None:
            [stored] = await self._store.create([readings.device_resource(device)], ACTOR)
            await self._registry.set_fhir_device(device.id, stored.logical_id)
            return f"Device/{stored.logical_id}"
        return f"Device/{device.fhir_device_id}"
