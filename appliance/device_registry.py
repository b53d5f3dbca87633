"""Stations, registered devices, who is checked in where, and readings held for a nurse.

This is the state behind "a reading lands in the right chart" (issue 3):

* a **station** is a kiosk or an exam room; clinic devices are assigned to one;
* a **home device** is assigned to one patient instead (readings from a patient's home);
* a **check-in** says which patient is at a station from when to when; a station holds one
  patient at a time, so checking the next patient in closes the previous check-in;
* an **unmatched reading** is one that could not be given to a patient with certainty. It is
  held here, sealed (it is health data even without a name), until a nurse assigns it to a
  patient (it then enters the chart and the outbox in the same transaction that marks it
  assigned) or discards it with a reason. Nothing is dropped and nothing is guessed.

The routing decision itself is pure and lives in ``services/routing.py``. Every change here
is audited; reading the sealed payload of a held reading is audited as a read.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import orjson

from appliance import fhir
from appliance.audit import AuditAction, AuditEvent
from appliance.errors import ApplianceError, NotFoundError
from appliance.store import Store, StoredResource

UNMATCHED_TABLE = "unmatched_readings"
NOTE_LABEL = "unmatched_readings.note"  # sealed under its own label: not swappable with payload


class RegistryError(ApplianceError):
    """A registry change that cannot be made (unknown station, bad assignment)."""


class StationKind(StrEnum):
    """What a station is."""

    KIOSK = "kiosk"
    EXAM_ROOM = "exam-room"


class Setting(StrEnum):
    """Where a device's readings are taken (carried into each Observation as a tag)."""

    CLINIC = "clinic"
    HOME = "home"


class Transport(StrEnum):
    """How a device's readings reach the box (carried into each Observation as a tag)."""

    BLE = "ble"
    SERIAL = "serial"
    SIMULATED = "simulated"
    HUB = "hub"


class HeldState(StrEnum):
    """The life of an unmatched reading."""

    PENDING = "pending"
    ASSIGNED = "assigned"
    DISCARDED = "discarded"


@dataclass(frozen=True, slots=True)
class Station:
    """A kiosk or exam room."""

    id: str
    name: str
    kind: StationKind


@dataclass(frozen=True, slots=True)
class Device:
    """A registered device and what it last told us about itself."""

    id: str
    name: str
    transport: Transport
    profile: str
    address: str | None
    setting: Setting
    station_id: str | None
    patient_id: str | None
    requires_bonding: bool
    manufacturer: str | None
    model: str | None
    serial_number: str | None
    firmware_revision: str | None
    battery_percent: int | None
    fhir_device_id: str | None
    last_sequence: int | None
    last_seen: str | None


@dataclass(frozen=True, slots=True)
class CheckIn:
    """A patient's stay at a station; ``checked_out_at`` None while still there."""

    id: int
    station_id: str
    patient_id: str
    checked_in_at: str
    checked_out_at: str | None


@dataclass(frozen=True, slots=True)
class HeldReading:
    """An unmatched reading as listed for a nurse (no values: those are sealed)."""

    id: int
    device_id: str
    station_id: str | None
    received_at: str
    measured_at: str | None
    summary: str
    reason: str
    state: HeldState
    patient_id: str | None


_DEVICE_COLUMNS = (
    "id, name, transport, profile, address, setting, station_id, patient_id, requires_bonding, "
    "manufacturer, model, serial_number, firmware_revision, battery_percent, fhir_device_id, "
    "last_sequence, last_seen"
)
_HELD_COLUMNS = (
    "id, device_id, station_id, received_at, measured_at, summary, reason, state, patient_id"
)


def _device(row: Sequence[Any]) -> Device:
    return Device(
        id=row[0],
        name=row[1],
        transport=Transport(row[2]),
        profile=row[3],
        address=row[4],
        setting=Setting(row[5]),
        station_id=row[6],
        patient_id=row[7],
        requires_bonding=bool(row[8]),
        manufacturer=row[9],
        model=row[10],
        serial_number=row[11],
        firmware_revision=row[12],
        battery_percent=row[13],
        fhir_device_id=row[14],
        last_sequence=row[15],
        last_seen=row[16],
    )


def _held(row: Sequence[Any]) -> HeldReading:
    return HeldReading(
        id=row[0],
        device_id=row[1],
        station_id=row[2],
        received_at=row[3],
        measured_at=row[4],
        summary=row[5],
        reason=row[6],
        state=HeldState(row[7]),
        patient_id=row[8],
    )


class DeviceRegistry:
    """Stations, devices, check-ins and held readings, kept in the store's database."""

    def __init__(self, store: Store) -> None:
        self._store = store

    @property
    def store(self) -> Store:
        """The store this registry lives in."""
        return self._store

    def _now(self) -> str:
        return fhir.utc_text(self._store.now())

    # -- stations ------------------------------------------------------------------------

    async def add_station(self, station_id: str, name: str, kind: StationKind, actor: str) -> None:
        """Register a station (idempotent for the same id and values)."""

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO stations (id, name, kind, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET name = excluded.name, kind = excluded.kind",
                (station_id, name, kind.value, self._now()),
            )

        event = AuditEvent(actor, AuditAction.CONFIG, entity=f"station/{station_id}")
        await self._store.transact(work, [event])

    async def stations(self) -> list[Station]:
        """Every station, by name."""
        rows = await self._store.query("SELECT id, name, kind FROM stations ORDER BY name")
        return [Station(r[0], r[1], StationKind(r[2])) for r in rows]

    # -- devices -------------------------------------------------------------------------

    async def register_device(
        self,
        device_id: str,
        *,
        name: str,
        transport: Transport,
        profile: str,
        address: str | None,
        setting: Setting,
        actor: str,
        requires_bonding: bool = False,
    ) -> None:
        """Register (or re-describe) a device; its assignment is kept."""

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO devices (id, name, transport, profile, address, setting, "
                "requires_bonding, registered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET name = excluded.name, "
                "transport = excluded.transport, profile = excluded.profile, "
                "address = excluded.address, setting = excluded.setting, "
                "requires_bonding = excluded.requires_bonding, retired_at = NULL",
                (
                    device_id,
                    name,
                    transport.value,
                    profile,
                    address,
                    setting.value,
                    int(requires_bonding),
                    self._now(),
                ),
            )

        event = AuditEvent(actor, AuditAction.CONFIG, entity=f"device/{device_id}")
        await self._store.transact(work, [event])

    async def assign_device(
        self,
        device_id: str,
        actor: str,
        *,
        station_id: str | None = None,
        patient_id: str | None = None,
    ) -> None:
        """Assign a clinic device to a station, or a home device to a patient (or unassign)."""
        if station_id is not None and patient_id is not None:
            raise RegistryError("assign a device to a station or to a patient, not both")
        device = await self.device(device_id)
        if station_id is not None and device.setting is Setting.HOME:
            raise RegistryError(f"device {device_id} is a home device: assign it to a patient")
        if patient_id is not None and device.setting is Setting.CLINIC:
            raise RegistryError(f"device {device_id} is a clinic device: assign it to a station")
        if station_id is not None and station_id not in {s.id for s in await self.stations()}:
            raise RegistryError(f"no station {station_id!r}; add it first")

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE devices SET station_id = ?, patient_id = ? WHERE id = ?",
                (station_id, patient_id, device_id),
            )

        key = None if patient_id is None else self._store.patient_key(f"Patient/{patient_id}")
        detail = f"station {station_id}" if station_id else ("patient" if patient_id else "none")
        event = AuditEvent(
            actor, AuditAction.CONFIG, patient_key=key, entity=f"device/{device_id}", detail=detail
        )
        await self._store.transact(work, [event])

    async def retire_device(self, device_id: str, actor: str) -> None:
        """Stop using a device (kept for the history its readings refer to)."""
        await self.device(device_id)

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE devices SET retired_at = ?, station_id = NULL, patient_id = NULL "
                "WHERE id = ?",
                (self._now(), device_id),
            )

        event = AuditEvent(
            actor, AuditAction.CONFIG, entity=f"device/{device_id}", detail="retired"
        )
        await self._store.transact(work, [event])

    async def devices(self) -> list[Device]:
        """Every registered device that is not retired, by name."""
        rows = await self._store.query(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE retired_at IS NULL ORDER BY name"  # noqa: S608 - constant
        )
        return [_device(row) for row in rows]

    async def device(self, device_id: str) -> Device:
        """One device; :class:`NotFoundError` when it is not registered."""
        rows = await self._store.query(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE id = ?",  # noqa: S608 - constant
            (device_id,),
        )
        if not rows:
            raise NotFoundError(f"no device {device_id!r} is registered")
        return _device(rows[0])

    async def note_seen(self, device_id: str, **info: str | int | None) -> None:
        """Record that a device connected, with any Device Information or battery it sent."""
        allowed = {"manufacturer", "model", "serial_number", "firmware_revision", "battery_percent"}
        unknown = set(info) - allowed
        if unknown:
            raise ValueError(f"unknown device fields {sorted(unknown)}")
        columns = ["last_seen", *info]
        values = [self._now(), *info.values()]

        def work(conn: sqlite3.Connection) -> None:
            sets = ", ".join(f"{c} = ?" for c in columns)
            conn.execute(f"UPDATE devices SET {sets} WHERE id = ?", (*values, device_id))  # noqa: S608 - allow-listed names

        await self._store.transact(work)

    async def set_fhir_device(self, device_id: str, logical_id: str) -> None:
        """Remember the Device resource that describes this device."""
        await self._store.transact(
            lambda conn: conn.execute(
                "UPDATE devices SET fhir_device_id = ? WHERE id = ?", (logical_id, device_id)
            )
        )

    def reading_filed(
        self, device_id: str, sequence: int | None
    ) -> Callable[[sqlite3.Connection, list[int]], None]:
        """A Store.create ``also`` hook: the device was seen now; its last record number."""
        now = self._now()

        def also(conn: sqlite3.Connection, _ids: list[int]) -> None:
            if sequence is None:
                conn.execute("UPDATE devices SET last_seen = ? WHERE id = ?", (now, device_id))
            else:
                conn.execute(
                    "UPDATE devices SET last_seen = ?, last_sequence = ? WHERE id = ?",
                    (now, sequence, device_id),
                )

        return also

    # -- check-ins -----------------------------------------------------------------------

    async def check_in(self, station_id: str, patient_id: str, actor: str) -> CheckIn:
        """Check a patient in at a station, closing whoever was checked in there before."""
        if station_id not in {s.id for s in await self.stations()}:
            raise RegistryError(f"no station {station_id!r}")
        now = self._now()

        def work(conn: sqlite3.Connection) -> int:
            conn.execute(
                "UPDATE station_checkins SET checked_out_at = ? "
                "WHERE station_id = ? AND checked_out_at IS NULL",
                (now, station_id),
            )
            cur = conn.execute(
                "INSERT INTO station_checkins (station_id, patient_id, checked_in_at, actor) "
                "VALUES (?, ?, ?, ?)",
                (station_id, patient_id, now, actor),
            )
            return int(cur.lastrowid or 0)

        key = self._store.patient_key(f"Patient/{patient_id}")
        event = AuditEvent(
            actor,
            AuditAction.UPDATE,
            patient_key=key,
            entity=f"station/{station_id}",
            detail="check-in",
        )
        row_id = await self._store.transact(work, [event])
        return CheckIn(row_id, station_id, patient_id, now, None)

    async def check_out(self, station_id: str, actor: str) -> bool:
        """Close the open check-in at a station; False when nobody was checked in."""
        now = self._now()

        def work(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE station_checkins SET checked_out_at = ? "
                "WHERE station_id = ? AND checked_out_at IS NULL",
                (now, station_id),
            )
            return cur.rowcount > 0

        event = AuditEvent(
            actor, AuditAction.UPDATE, entity=f"station/{station_id}", detail="check-out"
        )
        return await self._store.transact(work, [event])

    async def checkins(self, station_id: str, *, since: str | None = None) -> list[CheckIn]:
        """A station's check-ins that were open at or after ``since`` (all when None)."""
        rows = await self._store.query(
            "SELECT id, station_id, patient_id, checked_in_at, checked_out_at "
            "FROM station_checkins WHERE station_id = ? "
            "AND (checked_out_at IS NULL OR checked_out_at >= ?) ORDER BY checked_in_at",
            (station_id, since or ""),
        )
        return [CheckIn(*row) for row in rows]

    # -- readings held for a nurse -------------------------------------------------------

    async def hold(
        self,
        *,
        device_id: str,
        station_id: str | None,
        received_at: datetime,
        measured_at: datetime | None,
        summary: str,
        reason: str,
        resources: Sequence[fhir.FhirJson],
        also: Callable[[sqlite3.Connection, list[int]], None] | None = None,
    ) -> int:
        """Hold readings no patient could be given with certainty; returns the held id.

        ``summary`` and ``reason`` must not hold PHI (kinds of reading, "no patient checked
        in at Kiosk 1"); the Observations themselves are sealed.
        """
        payload = orjson.dumps(list(resources)).decode()

        def work(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO unmatched_readings (device_id, station_id, received_at, "
                "measured_at, summary, reason, payload) VALUES (?, ?, ?, ?, ?, ?, x'')",
                (
                    device_id,
                    station_id,
                    fhir.utc_text(received_at),
                    None if measured_at is None else fhir.utc_text(measured_at),
                    summary,
                    reason,
                ),
            )
            held_id = int(cur.lastrowid or 0)
            sealed = self._store.current_keyring(conn).seal(UNMATCHED_TABLE, str(held_id), payload)
            conn.execute(
                "UPDATE unmatched_readings SET payload = ? WHERE id = ?", (sealed, held_id)
            )
            if also is not None:
                also(conn, [])
            return held_id

        event = AuditEvent(
            "service:devices",
            AuditAction.CREATE,
            entity=f"unmatched-reading x{len(resources)}",
            detail=f"device {device_id}",
        )
        return await self._store.transact(work, [event])

    async def held(self, state: HeldState | None = HeldState.PENDING) -> list[HeldReading]:
        """Held readings (pending by default), oldest first; values stay sealed."""
        where, params = ("WHERE state = ?", (state.value,)) if state else ("", ())
        rows = await self._store.query(
            f"SELECT {_HELD_COLUMNS} FROM unmatched_readings {where} ORDER BY received_at, id",  # noqa: S608 - constant
            params,
        )
        return [_held(row) for row in rows]

    async def open_held(self, held_id: int, actor: str) -> list[fhir.FhirJson]:
        """The Observations of a held reading (audited as a read)."""

        def work(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT payload FROM unmatched_readings WHERE id = ?", (held_id,)
            ).fetchone()
            return None if row is None else bytes(row[0])

        event = AuditEvent(actor, AuditAction.READ, entity=f"unmatched-reading/{held_id}")
        sealed = await self._store.transact(work, [event])
        if sealed is None:
            raise NotFoundError(f"no held reading {held_id}")
        # transact loaded any data key another process rotated in.
        resources: list[fhir.FhirJson] = orjson.loads(
            self._store.keyring.unseal(UNMATCHED_TABLE, str(held_id), sealed)
        )
        return resources

    async def assign_held(self, held_id: int, patient_id: str, actor: str) -> list[StoredResource]:
        """Give a held reading to a patient: it enters the chart and the outbox, atomically."""
        resources = await self.open_held(held_id, actor)
        reference = f"Patient/{patient_id}"
        for resource in resources:
            resource["subject"] = {"reference": reference}
        now = self._now()

        def also(conn: sqlite3.Connection, _ids: list[int]) -> None:
            cur = conn.execute(
                "UPDATE unmatched_readings SET state = 'assigned', patient_id = ?, "
                "resolved_by = ?, resolved_at = ? WHERE id = ? AND state = 'pending'",
                (patient_id, actor, now, held_id),
            )
            if cur.rowcount != 1:
                raise RegistryError(f"held reading {held_id} is no longer pending")

        return await self._store.create(resources, actor, also=also)

    async def discard_held(self, held_id: int, note: str, actor: str) -> None:
        """Set a held reading aside with a reason (kept, never deleted; audited)."""
        if not note.strip():
            raise RegistryError("say why the reading is discarded")
        now = self._now()
        text = note.strip()[:500]

        def work(conn: sqlite3.Connection) -> None:
            sealed = self._store.current_keyring(conn).seal(NOTE_LABEL, str(held_id), text)
            cur = conn.execute(
                "UPDATE unmatched_readings SET state = 'discarded', note = ?, resolved_by = ?, "
                "resolved_at = ? WHERE id = ? AND state = 'pending'",
                (sealed, actor, now, held_id),
            )
            if cur.rowcount != 1:
                raise RegistryError(f"held reading {held_id} is not pending")

        event = AuditEvent(
            actor, AuditAction.UPDATE, entity=f"unmatched-reading/{held_id}", detail="discarded"
        )
        await self._store.transact(work, [event])
