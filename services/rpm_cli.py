"""``appliance vendors add [--scope ingest|read]|list|disable`` and ``appliance rpm time-log|billing``.

Registered by the CLI entry point (``appliance/cli.py``), as :mod:`services.device_cli` is.
Changes are audited with the actor ``cli:<login name>``; the billing look-up is audited as
``service:rpm`` on behalf of that login. Nothing printed is PHI: patients appear by their
local id, and a time log's note is never printed. A vendor's API key is printed once, by
``vendors add``, and is not stored anywhere but as its hash.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import date
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.store import Store
from services.rpm_billing import PatientBilling, RpmBilling
from services.vendor_keys import KeyScope, VendorKey, VendorKeys

T = TypeVar("T")
CommandFactory = Callable[..., argparse.ArgumentParser]


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _login() -> str:
    return getpass.getuser()


def _actor() -> str:
    return f"cli:{_login()}"


def _with_store(config: Config, work: Callable[[Store], Awaitable[T]]) -> T:
    async def go() -> T:
        store = await Store.open(config.paths.database, config.keys.kek_file)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(go())


def _table(headers: list[str], rows: list[list[Any]]) -> None:
    text = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in text)]) for i, h in enumerate(headers)]
    for row in [headers, *text]:
        _out("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a date as YYYY-MM-DD") from None


# -- vendors ----------------------------------------------------------------------------------


def cmd_vendors_add(args: argparse.Namespace, config: Config) -> int:
    scope = None if args.scope is None else KeyScope(args.scope)
    key = _with_store(
        config,
        lambda s: VendorKeys(s).add(args.vendor, _actor(), replace=args.replace, scope=scope),
    )
    what = "read key" if scope is KeyScope.READ else "API key"
    sys.stderr.write(
        f"{what} for {args.vendor} (shown once; give it over a secure channel, "
        "it is sent as 'Authorization: Bearer <key>'):\n"
    )
    _out(key)
    return 0


def cmd_vendors_list(args: argparse.Namespace, config: Config) -> int:
    vendors = _with_store(config, lambda s: VendorKeys(s).vendors())
    if args.format == "json":
        _out(json.dumps([_vendor_json(v) for v in vendors], indent=2))
        return 0
    if not vendors:
        _out("no vendor keys; add one with: appliance vendors add VENDOR")
        return 0
    _table(
        ["VENDOR", "SCOPE", "STATE", "CREATED", "BY", "DISABLED"],
        [
            [
                v.vendor,
                v.scope.value,
                "active" if v.active else "disabled",
                v.created_at,
                v.created_by,
                v.disabled_at,
            ]
            for v in vendors
        ],
    )
    return 0


def _vendor_json(vendor: VendorKey) -> dict[str, Any]:
    return {
        "vendor": vendor.vendor,
        "scope": vendor.scope.value,
        "active": vendor.active,
        "created_at": vendor.created_at,
        "created_by": vendor.created_by,
        "disabled_at": vendor.disabled_at,
    }


def cmd_vendors_disable(args: argparse.Namespace, config: Config) -> int:
    _with_store(config, lambda s: VendorKeys(s).disable(args.vendor, _actor()))
    _out(f"vendor {args.vendor} disabled: its key is refused from now on")
    return 0


# -- rpm --------------------------------------------------------------------------------------


def _billing(store: Store, config: Config) -> RpmBilling:
    return RpmBilling(store, ZoneInfo(config.site.timezone))


def cmd_rpm_time_log(args: argparse.Namespace, config: Config) -> int:
    log_id = _with_store(
        config,
        lambda s: _billing(s, config).log_time(
            args.patient_id,
            args.minutes,
            staff=args.staff or _login(),
            actor=_actor(),
            performed_on=args.on,
            interactive=args.interactive,
            note=args.note,
        ),
    )
    _out(f"logged {args.minutes} min for patient {args.patient_id} (time log {log_id})")
    return 0


def _billing_row(found: PatientBilling) -> list[Any]:
    period = found.period
    return [
        found.patient_id,
        f"#{period.number} {period.start.isoformat()}..{period.end.isoformat()}",
        len(found.days),
        found.device_code or "-",
        "ended" if found.ended else ("AT RISK" if found.at_risk else "no"),
        found.month,
        f"{found.minutes}{'' if found.interactive or not found.minutes else ' (no call)'}",
        " ".join(found.time_codes) or "-",
    ]


def cmd_rpm_billing(args: argparse.Namespace, config: Config) -> int:
    if args.patient and args.patient.startswith("Patient/"):
        raise ApplianceError("give the patient's local id, without 'Patient/'")
    found = _with_store(
        config,
        lambda s: _billing(s, config).billing(
            args.as_of, patient_id=args.patient, requested_by=_actor()
        ),
    )
    if args.format == "json":
        _out(json.dumps([f.json() for f in found], indent=2))
        return 0
    if not found:
        _out(
            "no patient is enrolled in remote monitoring"
            + (" with that id" if args.patient else "")
        )
        return 0
    _table(
        ["PATIENT", "PERIOD", "DAYS", "DEVICE CODE", "AT RISK", "MONTH", "MINUTES", "TIME CODES"],
        [_billing_row(f) for f in found],
    )
    return 0


def add_commands(sub: Any, command: CommandFactory) -> None:
    """Add the ``vendors`` and ``rpm`` command groups to the CLI."""
    vendors = sub.add_parser(
        "vendors", help="API keys: device vendors (ingest) and local integrations (read)"
    ).add_subparsers(dest="vendors_command", required=True, metavar="COMMAND")
    p = command("add", cmd_vendors_add, "issue a vendor's API key (printed once)", vendors)
    p.add_argument("vendor", help="short name: lower-case letters, digits, '-' (e.g. acme-rpm)")
    p.add_argument(
        "--replace", action="store_true", help="issue a new key; the old one stops working"
    )
    p.add_argument(
        "--scope",
        choices=[s.value for s in KeyScope],
        default=None,
        help="ingest: a device vendor's hub posts readings (the default for a new key); "
        "read: a local integration reads and searches /fhir/ (docs/fhir-api.md). "
        "With --replace, the key keeps its scope unless this is given",
    )
    p = command("list", cmd_vendors_list, "list vendors and whether their key works", vendors)
    p.add_argument("--format", choices=("table", "json"), default="table")
    p = command("disable", cmd_vendors_disable, "refuse a vendor's key from now on", vendors)
    p.add_argument("vendor")

    rpm = sub.add_parser("rpm", help="remote patient monitoring").add_subparsers(
        dest="rpm_command", required=True, metavar="COMMAND"
    )
    p = command("time-log", cmd_rpm_time_log, "log staff minutes on a patient's monitoring", rpm)
    p.add_argument("patient_id", help="local Patient id")
    p.add_argument("minutes", type=int, help="1 to 600")
    p.add_argument(
        "--interactive",
        action="store_true",
        help="the time included a live call with the patient or caregiver",
    )
    p.add_argument("--note", help="what was done (stored encrypted; never printed)")
    p.add_argument("--on", type=_day, help="the day the work was done (default today)")
    p.add_argument("--staff", help="who did the work (default: your login name)")
    p = command(
        "billing",
        cmd_rpm_billing,
        "per enrolled patient: 30-day period, days with home readings, device code, at-risk, "
        "minutes this month and time codes",
        rpm,
    )
    p.add_argument("--patient", help="only this local Patient id")
    p.add_argument("--as-of", type=_day, help="count as of this day (default today, site zone)")
    p.add_argument("--format", choices=("table", "json"), default="table")
