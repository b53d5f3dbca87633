"""``appliance devices|stations|held`` and ``appliance decode``: pairing, routing, field checks.

Registered here by the CLI entry point (``appliance/cli.py``), so the core package does not
import services. Registry changes are audited with the actor ``cli:<login name>``; nothing
printed here is PHI (patients appear by their local id only, held readings by kind).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from appliance.config import Config
from appliance.device_registry import DeviceRegistry, Setting, StationKind, Transport
from appliance.errors import ApplianceError
from appliance.store import Store

T = TypeVar("T")
CommandFactory = Callable[..., argparse.ArgumentParser]


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def _with_registry(config: Config, work: Callable[[DeviceRegistry], Awaitable[T]]) -> T:
    async def go() -> T:
        store = await Store.open(config.paths.database, config.keys.kek_file)
        try:
            return await work(DeviceRegistry(store))
        finally:
            await store.close()

    return asyncio.run(go())


def _table(headers: list[str], rows: list[list[Any]]) -> None:
    text = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)
    ]
    _out("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in text:
        _out("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


# -- devices ----------------------------------------------------------------------------------


def cmd_devices_list(args: argparse.Namespace, config: Config) -> int:
    devices = _with_registry(config, lambda r: r.devices())
    if args.format == "json":
        _out(json.dumps([_device_json(d) for d in devices], indent=2))
        return 0
    _table(
        [
            "ID",
            "NAME",
            "TRANSPORT",
            "PROFILE",
            "ADDRESS",
            "SETTING",
            "ASSIGNED",
            "BATTERY",
            "LAST SEEN",
        ],
        [
            [
                d.id,
                d.name,
                d.transport.value,
                d.profile,
                d.address,
                d.setting.value,
                d.station_id or (f"patient {d.patient_id}" if d.patient_id else "-"),
                None if d.battery_percent is None else f"{d.battery_percent}%",
                d.last_seen or "never",
            ]
            for d in devices
        ],
    )
    return 0


def _device_json(device: Any) -> dict[str, Any]:
    return {
        name: (value.value if hasattr(value, "value") else value)
        for name, value in ((f, getattr(device, f)) for f in device.__dataclass_fields__)
    }


def cmd_devices_add(args: argparse.Namespace, config: Config) -> int:
    from services import device_profiles

    transport = Transport(args.transport)
    device_profiles.check_profile(args.profile, transport, config)
    if transport is Transport.SERIAL and not args.address:
        raise ApplianceError("a serial device needs --address (the port, e.g. /dev/ttyUSB0)")

    async def work(registry: DeviceRegistry) -> None:
        await registry.register_device(
            args.device_id,
            name=args.name or args.device_id,
            transport=transport,
            profile=args.profile,
            address=args.address,
            setting=Setting(args.setting),
            actor=_actor(),
            requires_bonding=args.bonding,
        )
        if args.station:
            await registry.assign_device(args.device_id, _actor(), station_id=args.station)

    _with_registry(config, work)
    _out(f"registered device {args.device_id}; the devices process picks it up within seconds")
    return 0


def cmd_devices_scan(args: argparse.Namespace, config: Config | None) -> int:
    from drivers.ble import BluetoothUnavailableError, discover
    from services import device_profiles

    by_service = {device_profiles.service_uuid(p): p for p in device_profiles.GATT_PROFILES}
    _out(f"scanning for {args.seconds:g} s for Bluetooth health devices ...")
    try:
        found = asyncio.run(discover(list(by_service), seconds=args.seconds))
    except BluetoothUnavailableError as exc:
        raise ApplianceError(str(exc)) from None
    if not found:
        _out("none found: wake the device (take a measurement) and scan again")
        return 0
    _table(
        ["ADDRESS", "NAME", "PROFILE", "SIGNAL"],
        [
            [
                a.address,
                a.name or "(no name)",
                ", ".join(by_service[u] for u in a.service_uuids),
                f"{a.rssi} dBm" if a.rssi is not None else "",
            ]
            for a in found
        ],
    )
    _out("register one with: appliance devices add ID --transport ble --profile P --address A")
    return 0


def cmd_devices_assign(args: argparse.Namespace, config: Config) -> int:
    if sum(bool(x) for x in (args.station, args.patient, args.none)) != 1:
        raise ApplianceError("give exactly one of --station, --patient or --none")
    _with_registry(
        config,
        lambda r: r.assign_device(
            args.device_id, _actor(), station_id=args.station, patient_id=args.patient
        ),
    )
    _out(f"device {args.device_id} assigned")
    return 0


def cmd_devices_retire(args: argparse.Namespace, config: Config) -> int:
    _with_registry(config, lambda r: r.retire_device(args.device_id, _actor()))
    _out(f"device {args.device_id} retired")
    return 0


# -- stations ---------------------------------------------------------------------------------


def cmd_stations_add(args: argparse.Namespace, config: Config) -> int:
    _with_registry(
        config,
        lambda r: r.add_station(args.station_id, args.name, StationKind(args.kind), _actor()),
    )
    _out(f"station {args.station_id} saved")
    return 0


def cmd_stations_list(args: argparse.Namespace, config: Config) -> int:
    async def work(registry: DeviceRegistry) -> list[list[Any]]:
        rows = []
        for station in await registry.stations():
            present = [c for c in await registry.checkins(station.id) if c.checked_out_at is None]
            rows.append(
                [
                    station.id,
                    station.name,
                    station.kind.value,
                    present[0].patient_id if present else "-",
                ]
            )
        return rows

    _table(["ID", "NAME", "KIND", "CHECKED IN (patient id)"], _with_registry(config, work))
    return 0


def cmd_stations_checkin(args: argparse.Namespace, config: Config) -> int:
    async def work(registry: DeviceRegistry) -> None:
        await registry.store.read("Patient", args.patient_id, _actor())  # NotFoundError if absent
        await registry.check_in(args.station_id, args.patient_id, _actor())

    _with_registry(config, work)
    _out(f"patient {args.patient_id} checked in at {args.station_id}")
    return 0


def cmd_stations_checkout(args: argparse.Namespace, config: Config) -> int:
    closed = _with_registry(config, lambda r: r.check_out(args.station_id, _actor()))
    _out(f"{args.station_id}: " + ("checked out" if closed else "nobody was checked in"))
    return 0


# -- held readings ----------------------------------------------------------------------------


def cmd_held_list(args: argparse.Namespace, config: Config) -> int:
    held = _with_registry(config, lambda r: r.held())
    _table(
        ["ID", "RECEIVED", "DEVICE", "STATION", "READING", "WHY HELD"],
        [
            [h.id, h.received_at, h.device_id, h.station_id or "-", h.summary, h.reason]
            for h in held
        ],
    )
    return 0


def cmd_held_assign(args: argparse.Namespace, config: Config) -> int:
    async def work(registry: DeviceRegistry) -> int:
        await registry.store.read("Patient", args.patient_id, _actor())
        return len(await registry.assign_held(args.held_id, args.patient_id, _actor()))

    count = _with_registry(config, work)
    _out(f"held reading {args.held_id}: {count} Observation(s) filed to patient {args.patient_id}")
    return 0


def cmd_held_discard(args: argparse.Namespace, config: Config) -> int:
    _with_registry(config, lambda r: r.discard_held(args.held_id, args.note, _actor()))
    _out(f"held reading {args.held_id} set aside (kept, not deleted)")
    return 0


# -- decode -----------------------------------------------------------------------------------


def _decode_needs_config(args: argparse.Namespace) -> bool:
    """decode reads the site config only when given one, or for a site-declared protocol."""
    given = args.config is not None or getattr(args, "demo", None) is not None
    return given or str(args.serial or "").startswith("line:")


def cmd_decode(args: argparse.Namespace, config: Config | None) -> int:
    from zoneinfo import ZoneInfo

    from services import decode

    zone = ZoneInfo(config.site.timezone) if config is not None else ZoneInfo(args.timezone)
    try:
        data = decode.parse_hex(" ".join(args.hex))
        if args.gatt:
            result = decode.decode_gatt(decode.parse_uuid16(args.gatt), data, zone=zone)
            notes: list[str] = []
        else:
            spec = None
            if args.serial.startswith("line:"):
                assert config is not None  # _decode_needs_config
                spec = config.devices.line_protocol(args.serial.removeprefix("line:"))
                if spec is None:
                    raise decode.DecodeError(
                        f"no [[devices.line_protocol]] named {args.serial[5:]!r} in {config.source}"
                    )
            result, notes = decode.decode_serial(args.serial, data, line_spec=spec, zone=zone)
    except decode.DecodeError as exc:
        sys.stderr.write(f"appliance decode: {exc}\n")
        return 2
    for note in notes:
        sys.stderr.write(f"appliance decode: {note}\n")
    _out(json.dumps(result, indent=2, default=str))
    return 0


# -- the parser -------------------------------------------------------------------------------


def add_commands(sub: Any, command: CommandFactory) -> None:
    """Add the ``devices``, ``stations`` and ``held`` command groups to the CLI."""
    devices = sub.add_parser("devices", help="registered devices").add_subparsers(
        dest="devices_command", required=True, metavar="COMMAND"
    )
    p = command(
        "list", cmd_devices_list, "list registered devices and what they last reported", devices
    )
    p.add_argument("--format", choices=("table", "json"), default="table")
    p = command("add", cmd_devices_add, "register (pair) a device", devices)
    p.add_argument("device_id", help="a short stable id, e.g. kiosk1-cuff")
    p.add_argument("--name", help="name shown to staff")
    p.add_argument("--transport", choices=[t.value for t in Transport], required=True)
    p.add_argument(
        "--profile", required=True, help="blood_pressure, glucose, nonin-df7, line:<name>, ..."
    )
    p.add_argument("--address", help="Bluetooth address (omit to match by service) or serial port")
    p.add_argument("--setting", choices=[s.value for s in Setting], default="clinic")
    p.add_argument("--station", help="assign to this station at once")
    p.add_argument("--bonding", action="store_true", help="the device requires pairing (bond)")
    p = command(
        "scan", cmd_devices_scan, "list Bluetooth health devices in range (for pairing)", devices
    )
    p.add_argument("--seconds", type=float, default=10.0, help="how long to scan (default 10)")
    p.set_defaults(needs_config=False)
    p = command(
        "assign", cmd_devices_assign, "assign a device to a station or a home patient", devices
    )
    p.add_argument("device_id")
    p.add_argument("--station")
    p.add_argument("--patient", help="local Patient id (home devices)")
    p.add_argument("--none", action="store_true", help="unassign")
    p = command("retire", cmd_devices_retire, "stop using a device (history is kept)", devices)
    p.add_argument("device_id")

    stations = sub.add_parser("stations", help="kiosks and exam rooms").add_subparsers(
        dest="stations_command", required=True, metavar="COMMAND"
    )
    p = command("add", cmd_stations_add, "add or rename a station", stations)
    p.add_argument("station_id")
    p.add_argument("--name", required=True)
    p.add_argument("--kind", choices=[k.value for k in StationKind], default="exam-room")
    command("list", cmd_stations_list, "list stations and who is checked in", stations)
    p = command("checkin", cmd_stations_checkin, "check a patient in at a station", stations)
    p.add_argument("station_id")
    p.add_argument("patient_id", help="local Patient id")
    p = command("checkout", cmd_stations_checkout, "end the check-in at a station", stations)
    p.add_argument("station_id")

    p = command(
        "decode",
        cmd_decode,
        "print the FHIR Observations (or decoded fields) a device's bytes become",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--gatt", metavar="UUID", help="a characteristic such as 0x2A35")
    which.add_argument(
        "--serial", metavar="PROTOCOL", help="nonin-df7, nonin-ascii, tanita or line:<name>"
    )
    p.add_argument("hex", nargs="+", help="the bytes in hex (spaces and colons allowed)")
    p.add_argument(
        "--timezone",
        default="UTC",
        help="zone of the device clock when no site config is given (default UTC)",
    )
    p.set_defaults(needs_config=_decode_needs_config)

    held = sub.add_parser("held", help="readings held for a nurse").add_subparsers(
        dest="held_command", required=True, metavar="COMMAND"
    )
    command("list", cmd_held_list, "list readings waiting to be assigned", held)
    p = command("assign", cmd_held_assign, "file a held reading to a patient's chart", held)
    p.add_argument("held_id", type=int)
    p.add_argument("patient_id", help="local Patient id")
    p = command("discard", cmd_held_discard, "set a held reading aside with a reason", held)
    p.add_argument("held_id", type=int)
    p.add_argument("--note", required=True, help="why (kept sealed in the store)")
