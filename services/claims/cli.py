"""``appliance claims list|check|export|decisions|ready|override|submit|import-response|resolve``.

Registered by the CLI entry point (``appliance/cli.py``) like :mod:`services.rpm_cli`. The
list prints no PHI (claim numbers, local ids, dates, states, our check messages); ``export``
writes PHI to a file or stdout and is audited per claim as an export, ``check`` decrypts and
is audited as a read, with the actor ``cli:<login name>``.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.store import Store
from services.claims.acks import AckError
from services.claims.lifecycle import Lifecycle
from services.claims.model import ClaimStatus, Form, money
from services.claims.service import ClaimRow, ClaimsService

T = TypeVar("T")
CommandFactory = Callable[..., argparse.ArgumentParser]
_FORMATS = {"x12-837p": Form.PROFESSIONAL, "x12-837i": Form.INSTITUTIONAL}


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def _with_service(config: Config, work: Callable[[ClaimsService], Awaitable[T]]) -> T:
    async def go() -> T:
        store = await Store.open(config.paths.database, config.keys.kek_file)
        try:
            return await work(ClaimsService(store, config))
        finally:
            await store.close()

    return asyncio.run(go())


def _status(text: str) -> ClaimStatus:
    try:
        return ClaimStatus(text)
    except ValueError:
        known = ", ".join(s.value for s in ClaimStatus)
        raise argparse.ArgumentTypeError(f"unknown status {text!r}; one of {known}") from None


def _json(row: ClaimRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "claim_number": row.claim_number,
        "status": row.status.value,
        "service_date": row.service_date,
        "form": row.form,
        "payer_id": row.payer_id,
        "payer_kind": row.payer_kind,
        "charge": money(row.charge_cents),
        "fee": money(row.fee_cents),
        "patient_id": row.patient_id,
        "encounter_id": row.encounter_id,
        "x12_valid": row.x12_valid,
        "overridden": row.overridden,
        "problems": [{"code": p.code, "message": p.message} for p in row.problems],
    }


def _table(headers: list[str], rows: list[list[str]]) -> None:
    """A plain aligned table (rich is not among our dependencies; rpm_cli does the same)."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        line = "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True))
        sys.stdout.write(line.rstrip() + "\n")


def _print_rows(rows: list[ClaimRow], fmt: str, empty: str) -> None:
    if fmt == "json":
        sys.stdout.write(json.dumps([_json(r) for r in rows], indent=2) + "\n")
        return
    if not rows:
        sys.stdout.write(empty + "\n")
        return
    _table(
        ["ID", "CLAIM", "STATUS", "DATE", "FORM", "PAYER", "CHARGE", "PROBLEMS"],
        [
            [
                str(r.id), r.claim_number, r.status.value, r.service_date, r.form,
                f"{r.payer_kind} {r.payer_id}", f"${money(r.charge_cents)}",
                "; ".join(p.message for p in r.problems) or "-",
            ]
            for r in rows
        ],
    )  # fmt: skip


def cmd_list(args: argparse.Namespace, config: Config) -> int:
    rows = _with_service(config, lambda s: s.claims(args.status or ()))
    _print_rows(rows, args.format, "no claims" + (" with that status" if args.status else ""))
    return 0


def cmd_check(args: argparse.Namespace, config: Config) -> int:
    rows = _with_service(config, lambda s: s.recheck(args.claim or (), _actor()))
    _print_rows(rows, args.format, "no draft or ready claim to check")
    return 1 if any(r.problems for r in rows) else 0


def cmd_export(args: argparse.Namespace, config: Config) -> int:
    async def work(service: ClaimsService) -> str:
        ids = list(args.claim or ())
        if not ids:
            wanted = [ClaimStatus.READY] if not args.include_drafts else [
                ClaimStatus.READY, ClaimStatus.DRAFT,
            ]  # fmt: skip
            ids = [r.id for r in await service.claims(wanted)]
        if not ids:
            raise ApplianceError(
                "no claim to export (only ready claims, unless --claim or --include-drafts)"
            )
        if args.format == "fhir":
            return json.dumps(await service.export_fhir(ids, _actor()), indent=2) + "\n"
        form = _FORMATS[args.format]
        rows = await service.claims(ids=ids)
        other = [r.claim_number for r in rows if r.form != form.value]
        if other:
            raise ApplianceError(
                f"{', '.join(other)}: not {form.value} claims; export them with the other format"
            )
        return await service.export_x12(ids, _actor())

    text = _with_service(config, work)
    if args.output:
        Path(args.output).write_text(text, encoding="ascii" if args.format != "fhir" else "utf-8")
        sys.stderr.write(f"written to {args.output}\n")
    else:
        sys.stdout.write(text)
    return 0


def cmd_decisions(args: argparse.Namespace, config: Config) -> int:
    found = _with_service(config, lambda s: s.decisions())
    plain = [
        {"encounter_id": d.encounter_id, "outcome": d.outcome.value, "reason": d.reason,
         "claim_id": d.claim_id}
        for d in found
    ]  # fmt: skip
    if args.format == "json":
        sys.stdout.write(json.dumps(plain, indent=2) + "\n")
        return 0
    _table(
        ["ENCOUNTER", "OUTCOME", "CLAIM", "REASON"],
        [[d.encounter_id, d.outcome.value, str(d.claim_id or "-"), d.reason] for d in found],
    )
    return 0


def cmd_scan(args: argparse.Namespace, config: Config) -> int:
    """Decide every finished visit left undecided, however old (the sync process looks back
    30 days each hour)."""
    decided = _with_service(config, lambda s: s.scan(_actor()))
    if not decided:
        sys.stdout.write("every finished visit has a decision\n")
        return 0
    for outcome, count in sorted(decided.items()):
        sys.stdout.write(f"{outcome.value}: {count}\n")
    return 0


def cmd_ready(args: argparse.Namespace, config: Config) -> int:
    row = _with_service(config, lambda s: s.transition(args.claim_id, ClaimStatus.READY, _actor()))
    sys.stdout.write(f"claim {row.claim_number} is ready\n")
    return 0


def cmd_override(args: argparse.Namespace, config: Config) -> int:
    found = _with_service(
        config, lambda s: s.override_duplicate(args.encounter_id, args.reason, _actor())
    )
    sys.stdout.write(f"drafted claim {found.claim_id} (duplicate override, audited)\n")
    return 0


def cmd_submit(args: argparse.Namespace, config: Config) -> int:
    """Send ready claims now (what the sync process does after each drain)."""
    from sync_agent.claims_submit import ClaimsSubmitter  # the entry point assembles parts

    if config.claims.endpoint_url is None:
        raise ApplianceError("[claims] endpoint_url is not set: there is nowhere to submit to")

    def say(text: str) -> None:
        sys.stderr.write(text + "\n")

    async def work(service: ClaimsService) -> int:
        store = service.store
        result = await ClaimsSubmitter(store, config, service=service).submit(
            dry_run=args.dry_run, progress=say
        )
        if not args.dry_run:
            sys.stdout.write(
                f"{result.submitted} submitted, {result.in_review} in review, "
                f"{result.refused} refused, {result.not_sent} not sent, "
                f"{result.responses} response file(s) applied\n"
            )
        for error in result.errors:
            say(f"error: {error}")
        return 1 if result.errors or result.in_review or result.refused else 0

    return _with_service(config, work)


def cmd_import_response(args: argparse.Namespace, config: Config) -> int:
    """Apply a 999, 277CA or 835 file a biller downloaded from the clearinghouse."""
    text = Path(args.file).read_text(encoding="utf-8", errors="strict")

    async def work(service: ClaimsService) -> str:
        applied = await Lifecycle(service, service.store).apply_response(text, _actor())
        return "already applied (nothing changed)" if applied.duplicate else applied.summary

    try:
        summary = _with_service(config, work)
    except AckError as exc:
        sys.stderr.write(f"{args.file}: {exc}; nothing was changed\n")
        return 1
    sys.stdout.write(summary + "\n")
    return 0


def cmd_resolve(args: argparse.Namespace, config: Config) -> int:
    """Settle an in_review claim after asking the clearinghouse."""
    row = _with_service(
        config,
        lambda s: Lifecycle(s, s.store).resolve(args.claim_id, args.as_, args.reason, _actor()),
    )
    sys.stdout.write(f"claim {row.claim_number} is {row.status.value}\n")
    return 0


def add_commands(sub: Any, command: CommandFactory) -> None:
    """Add the ``claims`` command group to the CLI."""
    claims = sub.add_parser("claims", help="Q3014 facility-fee claims").add_subparsers(
        dest="claims_command", required=True, metavar="COMMAND"
    )
    p = command("list", cmd_list, "list claims with their status and problems", claims)
    p.add_argument("--status", type=_status, action="append", help="only this status (repeat)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p = command("check", cmd_check, "re-run the pre-submission checks (exit 1 on problems)", claims)
    p.add_argument("--claim", type=int, action="append", help="only this claim id (repeat)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p = command("export", cmd_export, "write claims as an X12 837 interchange or FHIR", claims)
    p.add_argument("--format", choices=(*_FORMATS, "fhir"), required=True)
    p.add_argument("--claim", type=int, action="append", help="claim id (repeat); default: ready")
    p.add_argument("--include-drafts", action="store_true", help="also export draft claims")
    p.add_argument("-o", "--output", help="write to this file (it holds patient data)")
    p = command("decisions", cmd_decisions, "why each telehealth visit was billed or not", claims)
    p.add_argument("--format", choices=("table", "json"), default="table")
    command("scan", cmd_scan, "decide finished visits left undecided, however old", claims)
    p = command("ready", cmd_ready, "mark a checked draft ready for submission", claims)
    p.add_argument("claim_id", type=int)
    p = command(
        "override", cmd_override, "draft a second Q3014 for a patient's day, with a reason", claims
    )
    p.add_argument("encounter_id")
    p.add_argument("--reason", required=True, help="why (stored encrypted, audited)")
    p = command("submit", cmd_submit, "send ready claims to the payer endpoint now", claims)
    p.add_argument("--dry-run", action="store_true", help="say what would be sent; send nothing")
    p = command(
        "import-response", cmd_import_response, "apply a 999, 277CA or 835 file by hand", claims
    )
    p.add_argument("file", help="the X12 file downloaded from the clearinghouse")
    p = command("resolve", cmd_resolve, "settle a claim in review, with a reason", claims)
    p.add_argument("claim_id", type=int)
    p.add_argument(
        "--as",
        dest="as_",
        choices=("acknowledged", "ready"),
        required=True,
        help="acknowledged: the clearinghouse has it; ready: it never arrived",
    )
    p.add_argument(
        "--reason", required=True, help="what the clearinghouse said (no patient details)"
    )
