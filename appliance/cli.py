"""The ``appliance`` command line (a stable surface: DESIGN.md, "Stable surfaces").

Every command takes ``--config FILE`` (default ``$APPLIANCE_CONFIG`` or
``/etc/appliance/site.toml``) or ``--demo DATA_DIR``. Errors are one line on stderr with a
non-zero exit code; nothing here prints PHI.

This module is an entry point, so it is where the parts are assembled: the processes are
started as ``python -m web.main`` / ``services.devices`` / ``sync_agent.process``, and
``sync once`` imports the sync agent lazily (STYLE.md rule 1 keeps the core free of them)
and runs the sync process's own loop (``SyncLoop.once``), not a copy of it.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import getpass
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from appliance import __version__, audit, db
from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.keys import generate_kek_file, load_keyring
from appliance.runtime import add_config_arguments, config_from_args, setup_logging
from appliance.supervisor import ChildSpec

if TYPE_CHECKING:  # the sync agent is imported lazily, by the commands that use it
    from sync_agent.drain_result import DrainResult
    from sync_agent.round_result import Round
    from sync_agent.status import StillWaiting
    from sync_agent.status_figures import SyncStatus

PROCESS_MODULES = {"web": "web.main", "devices": "services.devices", "sync": "sync_agent.process"}
DEMO_USERS = (("nurse", "nurse-demo-2026", "nurse"), ("admin", "admin-demo-2026", "admin"))


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _open(config: Config) -> tuple[sqlite3.Connection, bytes]:
    """Open the database and read the key-encryption key (finishing a KEK rotation)."""
    from appliance.key_rotation import resolve_kek

    conn = db.connect_sync(config.paths.database)
    return conn, resolve_kek(conn, config.keys.kek_file)


# -- init / run / demo --------------------------------------------------------------------


def init_site(config: Config, *, dev_key: bool) -> list[str]:
    """Create the data directory, a development KEK if allowed, the schema and keys."""
    from appliance.keys import ensure_keys, read_kek_file

    notes = []
    config.paths.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not config.keys.kek_file.exists():
        if not dev_key:
            raise ApplianceError(
                f"{config.keys.kek_file}: no key-encryption key; provision it (Ansible) or run "
                "'appliance init --dev-key' on a development machine"
            )
        generate_kek_file(config.keys.kek_file)
        notes.append(f"generated a development key-encryption key at {config.keys.kek_file} (0600)")
    kek = read_kek_file(config.keys.kek_file)
    conn = db.connect_sync(config.paths.database)
    try:
        if ensure_keys(conn, kek):
            notes.append(f"created database and data keys at {config.paths.database}")
        load_keyring(conn, kek, config.keys.kek_file)
    finally:
        conn.close()
    return notes


def cmd_init(args: argparse.Namespace, config: Config) -> int:
    for note in init_site(config, dev_key=args.dev_key or args.demo is not None):
        _out(note)
    _out("ready")
    return 0


def _child_specs(args: argparse.Namespace, only: Sequence[str]) -> list[ChildSpec]:

    tail = ["--demo", str(Path(args.demo).resolve())] if args.demo else []
    if not args.demo and args.config:
        tail = ["--config", str(Path(args.config).resolve())]
    return [
        ChildSpec(name=name, argv=(sys.executable, "-m", PROCESS_MODULES[name], *tail))
        for name in only
    ]


def _supervise(args: argparse.Namespace, config: Config, banner: Callable[[], None] | None) -> int:
    from appliance.supervisor import Supervisor

    specs = _child_specs(args, args.only or list(PROCESS_MODULES))
    supervisor = Supervisor(specs)

    async def go() -> int:
        task = asyncio.create_task(supervisor.run())
        if banner is not None and await supervisor.wait_ready(60):
            banner()
        return await task

    return asyncio.run(go())


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    return _supervise(args, config, None)


def ensure_demo_users(config: Config) -> None:
    """Create the demo logins if they are missing (demo mode only)."""
    from appliance.users import create_user

    conn = db.connect_sync(config.paths.database)
    try:
        for username, password, role in DEMO_USERS:
            if (
                conn.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone()
                is None
            ):
                create_user(conn, username, password, role, now=datetime.now(UTC))
    finally:
        conn.close()


def cmd_demo(args: argparse.Namespace, config: Config) -> int:
    init_site(config, dev_key=True)
    if config.web.tls_cert is not None and not config.web.tls_cert.exists():
        from appliance.tls import ensure_dev_certificate

        ensure_dev_certificate(config.web.tls_cert.parent)
    ensure_demo_users(config)
    url = config.web.public_url

    def banner() -> None:
        _out("")
        _out("Telehealth appliance demo is running (Ctrl-C to stop)")
        _out(f"  Nurse console: {url}/nurse/")
        _out(f"  Monitoring:    {url}/rpm/  (remote-monitoring worklist, live alerts)")
        _out(f"  Sync:          {url}/sync/  (outbox, dead letters, review queue)")
        _out(f"  Claims:        {url}/claims/  (Q3014 facility-fee claims)")
        _out(f"  Health:        {url}/healthz")
        _out(f"  Metrics:       {url}/metrics")
        for username, password, role in DEMO_USERS:
            _out(f"  Demo login ({role}): {username} / {password}")
        _out("  (an admin sets up an authenticator app at the first sign-in: TOTP is required)")
        _out(f"  Kiosk:         {url}/kiosk/  (pair it from {url}/kiosk/admin as admin)")
        _out(f"  Data directory: {config.paths.data_dir} (synthetic patients only)")
        _out("")

    return _supervise(args, config, banner)


# -- audit --------------------------------------------------------------------------------


def _upstream_anchors(config: Config) -> tuple[list[audit.Checkpoint] | None, str]:
    """The site's checkpoint anchors at its first upstream, or None and why not."""
    from sync_agent.audit_anchors import fetch_upstream_anchors
    from sync_agent.transport import build_client
    from sync_agent.upstream import UpstreamError

    if not config.sync.upstreams:
        return None, "no upstream configured"
    upstream = config.sync.upstreams[0]

    async def go() -> list[audit.Checkpoint]:
        async with build_client(upstream) as client:
            return await fetch_upstream_anchors(
                client, config.site.id, also_known_as=upstream.also_known_as
            )

    try:
        return asyncio.run(go()), upstream.name
    except UpstreamError as exc:
        # Only the class: the server's words may quote what it refused.
        return None, f"{upstream.name} could not be asked ({exc.failure})"
    except ApplianceError as exc:  # a credential file that does not load: the local check
        return None, f"{upstream.name} could not be asked ({exc})"


def cmd_audit_verify(args: argparse.Namespace, config: Config) -> int:
    from sync_agent.audit_anchors import verify_against_anchors

    anchors, where = (None, "not asked (--local)") if args.local else _upstream_anchors(config)
    conn, kek = _open(config)
    try:
        keyring = load_keyring(conn, kek, config.keys.kek_file)
        total = int(conn.execute("SELECT count(*) FROM audit").fetchone()[0])
        with tqdm(total=total, unit="rec", disable=args.quiet or not sys.stderr.isatty()) as bar:

            def progress(done: int, _total: int) -> None:
                bar.update(done - bar.n)

            result = audit.verify(conn, keyring.signing_public_key, progress=progress)
            if result.ok and anchors:
                # Every anchor held upstream, not just the newest: a trail cut back and
                # grown again is anchored anew, and only the older anchors tell.
                result = verify_against_anchors(conn, keyring.signing_public_key, anchors)
    finally:
        conn.close()
    if not result.ok:
        sys.stderr.write(f"audit trail NOT intact: {result.problem}\n")
        return 1
    _out(f"audit trail intact: {result.records} records, {result.checkpoints} signed checkpoints")
    if anchors:
        _out(f"held to the {len(anchors)} checkpoint anchors at {where}")
    elif anchors is not None:
        _out(f"no checkpoint anchored at {where} yet")
    else:
        sys.stderr.write(f"upstream anchors not checked: {where}\n")
    return 0


def cmd_audit_acknowledge(args: argparse.Namespace, config: Config) -> int:
    from sync_agent.audit_export_state import acknowledge_breaks, read_export_state

    conn = db.connect_sync(config.paths.database)  # no key needed: nothing is opened
    try:
        found = read_export_state(conn)
        if not found.unacknowledged_breaks:
            _out(f"nothing to acknowledge ({found.breaks} trail break(s) found, all acknowledged)")
            return 0
        done = acknowledge_breaks(
            conn, actor=_cli_actor(), now=datetime.now(UTC), seen=found.breaks
        )
    finally:
        conn.close()
    _out(
        f"{done} audit trail break(s) acknowledged (audited); the count stays in "
        "appliance_audit_trail_breaks, and a new break warns again"
    )
    return 0


def _parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def cmd_audit_report(args: argparse.Namespace, config: Config) -> int:
    conn, kek = _open(config)
    try:
        patient_key = None
        if args.patient:
            keyring = load_keyring(conn, kek, config.keys.kek_file)
            patient_key = keyring.patient_key(
                args.patient if args.patient.startswith("Patient/") else f"Patient/{args.patient}"
            )
        records = audit.report(
            conn,
            since=_parse_time(args.since),
            until=_parse_time(args.until),
            actor=args.user if args.user is None or ":" in args.user else f"user:{args.user}",
            patient_key=patient_key,
            limit=args.limit,
        )
        rows = audit.format_report_rows(records)
    finally:
        conn.close()
    if args.format == "json":
        for row in rows:
            _out(json.dumps(row))
    elif rows:
        writer = csv.DictWriter(
            sys.stdout, fieldnames=list(rows[0]), delimiter="," if args.format == "csv" else "\t"
        )
        writer.writeheader()
        writer.writerows(rows)
    return 0


# -- keys ---------------------------------------------------------------------------------


def cmd_keys_rotate(args: argparse.Namespace, config: Config) -> int:
    from appliance import key_rotation

    conn, kek = _open(config)
    try:
        if args.what == "kek":
            fingerprint = key_rotation.rotate_kek(conn, config.keys.kek_file, args.new_kek_file)
            _out(f"key-encryption key rotated; new fingerprint {fingerprint}")
            if args.new_kek_file:
                _out(f"install {args.new_kek_file} as {config.keys.kek_file} before the next start")
            return 0
        if not args.resume:
            version = key_rotation.rotate_data_key(conn, kek)
            _out(f"data key version {version} is now active; re-encrypting existing records")
        with tqdm(unit="rows", disable=not sys.stderr.isatty()) as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            result = key_rotation.reencrypt(conn, kek, batch=args.batch, progress=progress)
        _out(
            f"re-encrypted {result.rows} rows; retired key versions: {list(result.retired_versions) or 'none'}"
        )
        if result.unreadable or result.unreadable_sealed:
            rows = ", ".join(str(r) for r in result.unreadable[:20])
            more = (
                "" if len(result.unreadable) <= 20 else f" and {len(result.unreadable) - 20} more"
            )
            advice = []
            if result.unreadable:
                advice.append(
                    "Restore the records from a backup (appliance store repair --from "
                    "<decrypted backup>, docs/operations.md), then run "
                    "`appliance keys rotate data --resume`."
                )
            if result.unreadable_sealed:
                advice.append(
                    "The sealed values (messages, notes, earlier versions) cannot be restored "
                    "one by one; the old key stays while they name it."
                )
            sys.stderr.write(
                f"{len(result.unreadable)} record(s) and {result.unreadable_sealed} sealed "
                f"value(s) failed authentication and were left as they were "
                f"(resources rows: {rows or 'none'}{more}); their old key is kept. "
                + " ".join(advice)
                + "\n"
            )
            return 1
        return 0
    finally:
        conn.close()


# -- store --------------------------------------------------------------------------------


def _progress_bar(quiet: bool) -> Any:
    """A bar for store_repair's ``progress(done, total)``, which says the total first."""
    return tqdm(unit="rec", disable=quiet or not sys.stderr.isatty())


def _advance(bar: Any) -> Callable[[int, int], None]:
    def step(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return step


def cmd_store_check(args: argparse.Namespace, config: Config) -> int:
    from appliance import store_repair

    conn, kek = _open(config)
    try:
        load_keyring(conn, kek, config.keys.kek_file)  # the wrong key: one line naming the file
        with _progress_bar(args.quiet) as bar:
            damaged = store_repair.check(
                conn, kek, actor=_cli_actor(), now=datetime.now(UTC), progress=_advance(bar)
            )
            total = bar.total
    finally:
        conn.close()
    if not damaged:
        _out(f"all {total} stored records authenticate")
        return 0
    _out(f"{len(damaged)} of {total} stored records fail authentication (altered or damaged):")
    for item in damaged:
        _out(f"  {item.reference}  (row {item.row_id})")
    _out(
        "Treat it as a security incident (keep a copy of the database file), then restore them "
        "from a backup: appliance store repair --from <decrypted backup> (docs/operations.md)"
    )
    return 1


def cmd_store_repair(args: argparse.Namespace, config: Config) -> int:
    from appliance import store_repair

    conn, kek = _open(config)
    try:
        load_keyring(conn, kek, config.keys.kek_file)  # the wrong key: one line naming the file
        with _progress_bar(args.quiet) as bar:
            done = store_repair.repair(
                conn,
                kek,
                args.backup,
                actor=_cli_actor(),
                now=datetime.now(UTC),
                progress=_advance(bar),
            )
    finally:
        conn.close()
    if not done.restored and not done.left:
        _out("nothing to repair: every stored record authenticates")
        return 0
    for item in done.restored:
        _out(f"restored  {item.reference}  (row {item.row_id})")
    for item, why in done.left:
        _out(f"left      {item.reference}  (row {item.row_id}): {why}")
    if done.dead_letters:
        _out(
            "their dead letters can now be sent: appliance sync resend "
            + " ".join(map(str, done.dead_letters))
        )
    return 1 if done.left else 0


# -- users --------------------------------------------------------------------------------


def cmd_users_add(args: argparse.Namespace, config: Config) -> int:
    from appliance.users import create_user

    if args.password_file:
        password = Path(args.password_file).read_text(encoding="utf-8").strip()
    else:
        password = getpass.getpass(f"Password for {args.username}: ")
        if getpass.getpass("Again: ") != password:
            raise ApplianceError("the passwords do not match; nothing was changed")
    conn = db.connect_sync(config.paths.database)
    try:
        now = datetime.now(UTC)
        create_user(conn, args.username, password, args.role, now=now)
        with db.transaction_sync(conn):
            audit.append(
                conn,
                [
                    audit.AuditEvent(
                        _cli_actor(),
                        audit.AuditAction.CONFIG,
                        entity=f"user:{args.username}",
                        detail=f"account created at the terminal ({args.role})",
                    )
                ],
                now=now,
            )
    finally:
        conn.close()
    _out(f"user {args.username} ({args.role}) added")
    return 0


def cmd_users_reset_mfa(args: argparse.Namespace, config: Config) -> int:
    """The way back in for an admin who lost both the authenticator and the recovery codes."""
    from appliance import mfa

    conn = db.connect_sync(config.paths.database)
    try:
        row = conn.execute("SELECT id FROM users WHERE username = ?", (args.username,)).fetchone()
        if row is None:
            raise ApplianceError(f"no user {args.username!r}; nothing was changed")
        now = datetime.now(UTC)
        with db.transaction_sync(conn):
            mfa.remove(conn, int(row[0]))
            audit.append(
                conn,
                [
                    audit.AuditEvent(
                        _cli_actor(),
                        audit.AuditAction.CONFIG,
                        entity=f"user:{args.username}",
                        detail="second factor removed at the terminal",
                    )
                ],
                now=now,
            )
    finally:
        conn.close()
    _out(
        f"the second factor of {args.username} is removed; an admin must set up a new one "
        "at the next sign-in"
    )
    return 0


# -- sync ---------------------------------------------------------------------------------


def _sync_status_json(found: SyncStatus, messages: dict[int, str] | None) -> dict[str, object]:
    """The JSON form (its first three keys are those of earlier releases: scripts rely on it)."""
    process = found.process
    return {
        "outbox": [
            {"lane": lane, "state": state, "count": count} for lane, state, count in found.counts
        ],
        "dead_letters": [
            {
                "outbox_id": d.outbox_id,
                "lane": d.lane,
                "type": d.type,
                "attempts": d.attempts,
                # Opened only with --show-errors (audited): the upstream's words may quote PHI.
                "error": None if messages is None else messages.get(d.outbox_id),
            }
            for d in found.dead_letters
        ],
        "sync_process": None
        if process is None
        else {"beat_at": process.beat_at.isoformat(), "age_s": process.age_s, **process.figures},
        "online": found.online,
        "lanes": [
            {
                "lane": lane.name,
                "waiting": lane.waiting,
                "oldest_age_s": lane.oldest_age_s,
                "dead": lane.dead,
            }
            for lane in found.lanes
        ],
        "waiting": found.waiting,
        "last_success": None if found.last_success is None else found.last_success.isoformat(),
        "dead_total": found.dead_total,
        # Items the upstream keeps answering with an error, sent again (never dead letters).
        "failing": {
            "count": found.failing.count,
            "oldest": found.failing.oldest,
            "type": found.failing.type,
            "attempts": found.failing.attempts,
        },
        "reviews_open": found.reviews_open,
        "twins": [{"theirs": t.theirs, "ours": t.ours, "at": t.at} for t in found.twins],
        # The claims queue (they never enter the outbox: its "claims" lane stays at 0).
        "claims": {
            "ready": found.claims.ready,
            "oldest_ready_age_s": found.claims.oldest_ready_age_s,
            "in_review": found.claims.in_review,
        },
        "audit_export": {
            "cursor": found.export.cursor,
            "head": found.export.head,
            "lag": found.export.lag,
            "oldest_age_s": found.export_oldest_age_s,
            "refused": found.export.refused,
            "anchored": found.export.anchored,
            "breaks": found.export.breaks,
            "breaks_acknowledged": found.export.breaks_acknowledged,
        },
        "sync_now": found.sync_now,
    }


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole < 120:
        return f"{whole} s"
    if whole < 7200:
        return f"{whole // 60} min"
    if whole < 172_800:
        return f"{whole // 3600} h {whole % 3600 // 60} min"
    return f"{whole // 86_400} d {whole % 86_400 // 3600} h"


def _sync_status_table(
    found: SyncStatus, messages: dict[int, str] | None, now: datetime
) -> list[str]:
    process = found.process
    if process is None:
        link = "unknown: the sync process has never run"
    elif not process.fresh:
        link = (
            f"unknown: the sync process is not running (last heartbeat {_age(process.age_s)} ago)"
        )
    elif process.starting and found.paused_for_s is not None:
        link = f"paused ({process.upstream or 'upstream'}; not checked yet: sync once is sending)"
    elif process.starting:
        link = f"starting ({process.upstream or 'upstream'}; the first round is under way)"
    elif process.upstream is None:
        link = "no upstream configured"
    elif found.online:
        link = f"online ({process.upstream})"
    elif process.unreachable:
        link = (
            f"OFFLINE ({process.upstream}; no connection could be made: check this clinic's "
            "internet link, DNS and firewall)"
        )
    else:
        link = f"OFFLINE ({process.upstream}; last failure: {process.last_failure or 'unknown'})"
    if found.last_success is None:
        success = "never"
    else:
        ago = _age((now - found.last_success).total_seconds())
        success = f"{found.last_success.isoformat(timespec='seconds')} ({ago} ago)"
    export = found.export
    failing = found.steps_failing
    refused = found.pull_refused
    unordered = found.pull_unordered
    lines = [
        f"Upstream       {link}",
        *(
            [f"Held back      {', '.join(f'{k} ({v})' for k, v in failing.items())}: backing off"]
            if failing
            else []
        ),
        *(
            [
                f"Pull           {refused} search(es) refused by the EHR in the last pass (the "
                "others went on; check the scopes of this box's client there; the journal "
                "names the resource type)"
            ]
            if refused
            else []
        ),
        *(
            [
                f"Pull           {unordered} page(s) the EHR did not sort or filter as asked "
                "(_sort=_lastUpdated, _lastUpdated): not taken, those cursors stay; ask the "
                "EHR team"
            ]
            if unordered
            else []
        ),
        *(
            [
                "Pull           a search cannot get past over 1,000 records sharing one "
                "lastUpdated (the journal names the resource type)"
            ]
            if found.pull_stuck
            else []
        ),
        *(
            [
                f"Paused         for {_age(paused)}: appliance sync once is sending; the "
                "sync process waits for it to end"
            ]
            if (paused := found.paused_for_s) is not None
            else []
        ),
        f"Last success   {success}",
        f"Waiting        {found.waiting}",
        f"Claims         {found.claims.ready} ready to submit to the payer"
        + (
            f" (the oldest for {_age(found.claims.oldest_ready_age_s)})"
            if found.claims.ready
            else ""
        )
        + (
            f", {found.claims.in_review} in review (a person decides: appliance claims list)"
            if found.claims.in_review
            else ""
        ),
        f"Dead letters   {found.dead_total}",
        *(
            [
                f"Failing        {found.failing.count} item(s) the EHR keeps answering with an "
                f"error (the oldest: {found.failing.type}, tried {found.failing.attempts} "
                "times); sent again, never dropped (its message: /sync)"
            ]
            if found.failing.count
            else []
        ),
        f"Review queue   {found.reviews_open} waiting for a decision (/sync/review)",
        *(
            [
                f"Held twice     {len(found.twins)} EHR record(s) not pulled: they carry the "
                "identifier of a record here held under another EHR id (see /sync)"
            ]
            if found.twins
            else []
        ),
        f"Audit export   {export.lag} waiting"
        + (
            f", the oldest for {_age(found.export_oldest_age_s)}"
            if found.export_oldest_age_s is not None
            else ""
        )
        + f" (exported up to record {export.cursor} of "
        f"{export.head}; {export.refused} refused; checkpoint anchored at record {export.anchored})"
        + (
            f"; TRAIL CUT BACK OR REWRITTEN {export.unacknowledged_breaks} time(s)"
            + (" since the last acknowledgement" if export.breaks_acknowledged else "")
            + ": run 'appliance audit verify', report it, then 'appliance audit acknowledge'"
            if export.unacknowledged_breaks
            else f"; {export.breaks} trail break(s), acknowledged"
            if export.breaks
            else ""
        ),
        f"Sync now       {found.sync_now or 'never asked'}",
        "",
        f"{'Lane':<10} {'Waiting':>8} {'Oldest':>12} {'Dead':>6}",
    ]
    # The outbox's lanes; claims and the audit trail have their own lines above.
    lines += [
        f"{lane.name:<10} {lane.waiting:>8} {_age(lane.oldest_age_s):>12} {lane.dead:>6}"
        for lane in found.outbox_lanes
    ]
    if found.dead_letters:
        lines += ["", f"{'Dead letter':>11}  {'Lane':<9} {'Resource':<22} {'Attempts':>8}"]
        for d in found.dead_letters:
            lines.append(f"{d.outbox_id:>11}  {d.lane:<9} {d.type:<22} {d.attempts:>8}")
            if messages is not None and d.outbox_id in messages:
                lines.append(f"{'':>13}{messages[d.outbox_id] or '(no message)'}")
        if messages is None:
            lines.append("(messages hidden: --show-errors opens them, recorded in the audit trail)")
        lines.append("(once the cause is fixed: appliance sync resend ITEM… or --all)")
    return lines


def _cli_actor() -> str:
    """The audit actor of a person at the box's terminal: the OS account they are logged in as."""
    try:
        login = getpass.getuser()
    except (OSError, KeyError):
        login = f"uid{os.getuid()}"
    return f"service:cli:{login}"


def cmd_sync_status(args: argparse.Namespace, config: Config) -> int:
    from sync_agent.dead_letters import open_dead_letter_messages
    from sync_agent.status import read_status

    now = datetime.now(UTC)
    conn, kek = _open(config)
    try:
        found = read_status(conn, now, all_states=True)
        messages = None
        if args.show_errors:
            keyring = load_keyring(conn, kek, config.keys.kek_file)
            messages = open_dead_letter_messages(
                conn,
                keyring,
                actor=_cli_actor(),
                now=now,
                outbox_ids=[d.outbox_id for d in found.dead_letters],
            )
    finally:
        conn.close()
    fmt = args.format
    if fmt == "auto":  # a table for a person, JSON for a script (as earlier releases printed)
        fmt = "table" if sys.stdout.isatty() else "json"
    if fmt == "json":
        _out(json.dumps(_sync_status_json(found, messages), indent=2))
    else:
        for line in _sync_status_table(found, messages, now):
            _out(line)
    return 0


def cmd_sync_resend(args: argparse.Namespace, config: Config) -> int:
    from sync_agent.dead_letters import resend_dead_letters

    if args.all == bool(args.outbox_ids):
        raise ApplianceError("name the dead letters to send again (their item numbers), or --all")
    conn = db.connect_sync(config.paths.database)  # no key needed: nothing is opened
    try:
        done = resend_dead_letters(
            conn,
            actor=_cli_actor(),
            now=datetime.now(UTC),
            outbox_ids=None if args.all else args.outbox_ids,
        )
    finally:
        conn.close()
    _out(
        f"{len(done.resent)} dead letter{'' if len(done.resent) == 1 else 's'} back in the "
        "outbox; the sync process sends them now (appliance sync status shows how it goes)"
    )
    if done.in_review:
        _out(
            "left as they are, held for the review queue (decide them at /sync/review): "
            + ", ".join(map(str, done.in_review))
        )
    if done.missing:
        raise ApplianceError(
            "not dead letters (delivered, waiting, or no such item): "
            + ", ".join(map(str, done.missing))
        )
    return 0


def cmd_sync_once(args: argparse.Namespace, config: Config) -> int:
    import random

    from appliance.runtime import ProcessContext
    from appliance.store import Store
    from sync_agent.audit_export_state import read_export_state
    from sync_agent.drain_result import DrainResult, add_step
    from sync_agent.process import SyncLoop
    from sync_agent.status import still_waiting
    from sync_agent.transport import build_client
    from sync_agent.upstream import failure_class

    if not config.sync.upstreams:
        raise ApplianceError("no [[sync.upstream]] is configured; nothing to sync to")
    upstream = config.sync.upstreams[0]

    async def go() -> int:
        store = await Store.open(config.paths.database, config.keys.kek_file)
        try:
            conn = store.connection
            # What it will try: every item waiting (their retry delays are cleared first, as
            # "Sync now" does), creates and edits, and the audit records not exported yet.
            waiting = await db.run_sync(conn, still_waiting, datetime.now(UTC))
            lag = (await db.run_sync(conn, read_export_state)).lag
            # The sync process's own loop, run as "Sync now" runs it; its figures stay here
            # (this is not the sync process: no heartbeat is written).
            ctx = ProcessContext(name="sync once", config=config, store=store)
            async with build_client(upstream) as client:
                loop = SyncLoop(ctx, client, upstream, rng=random.Random())  # noqa: S311 - jitter
                with tqdm(
                    total=waiting.items + lag,
                    unit="item",
                    desc="sent",
                    disable=args.quiet or not sys.stderr.isatty(),
                ) as bar:

                    def bundle(step: DrainResult) -> None:
                        bar.update(step.delivered + step.dead)

                    def round_done(done: Round) -> None:
                        if done.updated is not None:
                            u = done.updated
                            bar.update(u.delivered + u.conflicts + u.dead)
                        if done.exported is not None:
                            bar.update(done.exported.exported + done.exported.refused)
                        if bar.n > bar.total:  # the audit records of this run's own sends
                            bar.total = bar.n
                            bar.refresh()

                    def lease_busy() -> None:
                        if not args.quiet:
                            bar.write(
                                "appliance: the sync process is sending; waiting for its round "
                                "to end",
                                file=sys.stderr,
                            )

                    rounds = await loop.once(
                        max_bundles=args.max_bundles,
                        on_bundle=bundle,
                        on_round=round_done,
                        on_wait=lease_busy,
                    )
            left = await db.run_sync(conn, still_waiting, datetime.now(UTC))
        finally:
            await store.close()
        drained = DrainResult()
        for done in rounds:
            add_step(drained, done.drained)
        found = ctx.status.get("steps_failing")
        failing = {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}
        summary = _once_summary(rounds, drained, failing)
        summary["waiting"] = left.items
        _out(json.dumps(summary))
        # One line, the reason last (scripts match its end): what is left, then why.
        still = _still_waiting_words(left, max_reached=drained.bundles >= args.max_bundles)
        if drained.link_down:
            said = failure_class(drained.error)
            if drained.unreachable:
                said = f"{said} (cannot connect to {upstream.name})"
            sys.stderr.write(f"appliance: {still}sync failed, the upstream link is down: {said}\n")
            return 2
        if failing:
            step, said = next(iter(failing.items()))
            how = f"at the {step}"
            if said in ("transient", "ambiguous"):
                how += ", the upstream link is down"
            if ctx.status.get("unreachable") is True:
                said = f"{said} (cannot connect to {upstream.name})"
            sys.stderr.write(f"appliance: {still}sync failed {how}: {said}\n")
            return 2
        if left.items:
            sys.stderr.write(f"appliance: {still.removesuffix('; ')}\n")
            return 3
        return 0

    return asyncio.run(go())


def _once_summary(
    rounds: Sequence[Round], drained: DrainResult, failing: dict[str, str]
) -> dict[str, object]:
    """The JSON ``sync once`` prints: counts and classes only (the server's words may quote
    what it refused, PHI: they stay sealed in the outbox, opened only on an audited page)."""
    from sync_agent.upstream import failure_class

    summary: dict[str, object] = {k: v for k, v in drained.__dict__.items() if k != "failures"}
    summary["error"] = failure_class(drained.error)
    updated = [d.updated for d in rounds if d.updated is not None]
    summary["updates"] = {
        "delivered": sum(u.delivered for u in updated),
        "conflicts": sum(u.conflicts for u in updated),
        "dead": sum(u.dead for u in updated),
    }
    pulled = [d.pulled for d in rounds if d.pulled is not None and d.pulled.due]
    summary["pull"] = {
        "created": sum(p.created for p in pulled),
        "updated": sum(p.updated for p in pulled),
        "refused": sum(p.refused for p in pulled),
    }
    exported = [d.exported for d in rounds if d.exported is not None]
    if exported:
        summary["audit_export"] = {
            "exported": sum(e.exported for e in exported),
            "existing": sum(e.existing for e in exported),
            "refused": sum(e.refused for e in exported),
            "cursor": exported[-1].cursor,
            "anchored": next((e.anchored for e in exported if e.anchored is not None), None),
        }
    summary["steps_failing"] = failing
    return summary


def _still_waiting_words(left: StillWaiting, *, max_reached: bool) -> str:
    """``3 items still waiting (1 edit): … (appliance sync status); `` for the line
    ``sync once`` ends with ('' when none is)."""
    if not left.items:
        return ""
    parts = []
    if left.delayed:
        parts.append(f"{left.delayed} waiting out a retry delay after the upstream's answer")
    if rest := left.items - left.delayed:
        why = (
            "--max-bundles reached"
            if max_reached
            else "held behind the items they depend on, or stopped by the failure"
        )
        parts.append(f"{rest} not sent ({why})")
    edits = f" ({left.edits} edit{'' if left.edits == 1 else 's'})" if left.edits else ""
    return (
        f"{left.items} item{'' if left.items == 1 else 's'} still waiting{edits}: "
        + ", ".join(parts)
        + " (see appliance sync status); "
    )


# -- the parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree (``--help`` at every level)."""
    parser = argparse.ArgumentParser(prog="appliance", description="Telehealth edge appliance.")
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str,
        handler: Callable[..., int],
        help_text: str,
        parent: argparse._SubParsersAction[argparse.ArgumentParser] = sub,
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text)
        add_config_arguments(p)
        p.set_defaults(handler=handler)
        return p

    p = command("init", cmd_init, "create the data directory, database and keys")
    p.add_argument(
        "--dev-key",
        action="store_true",
        help="generate a development key-encryption key if none exists",
    )
    for name, handler, text in (
        ("run", cmd_run, "start the web, devices and sync processes under the supervisor"),
        ("demo", cmd_demo, "demo mode: synthetic patients, simulated devices, demo logins"),
    ):
        p = command(name, handler, text)
        p.add_argument(
            "--only",
            action="append",
            choices=sorted(PROCESS_MODULES),
            help="start only these processes",
        )

    audit_cmd = sub.add_parser("audit", help="verify and report the audit trail").add_subparsers(
        dest="audit_command", required=True, metavar="COMMAND"
    )
    p = command(
        "verify",
        cmd_audit_verify,
        "check the hash chain and signed checkpoints, and hold the trail to the checkpoints "
        "anchored upstream; exit 1 naming the first bad record",
        audit_cmd,
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--local", action="store_true", help="do not ask the upstream for its anchors")
    command(
        "acknowledge",
        cmd_audit_acknowledge,
        "acknowledge the audit trail breaks the sync's export found, once looked into and "
        "reported (audited; the warning on /sync and in sync status goes, the count stays)",
        audit_cmd,
    )
    p = command(
        "report", cmd_audit_report, "list audit records by time window, user and patient", audit_cmd
    )
    p.add_argument("--since", help="ISO time (UTC if no offset)")
    p.add_argument("--until", help="ISO time (UTC if no offset)")
    p.add_argument("--user", help="username (or actor such as service:devices)")
    p.add_argument("--patient", help="local Patient id")
    p.add_argument("--limit", type=int)
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")

    keys_cmd = sub.add_parser("keys", help="key management").add_subparsers(
        dest="keys_command", required=True, metavar="COMMAND"
    )
    p = command(
        "rotate",
        cmd_keys_rotate,
        "rotate the key-encryption key (re-wrap) or the data key (re-encrypt)",
        keys_cmd,
    )
    p.add_argument("what", choices=("kek", "data"))
    p.add_argument(
        "--new-kek-file", type=Path, help="use this new KEK instead of generating one (kek only)"
    )
    p.add_argument(
        "--batch", type=int, default=500, help="rows per re-encryption transaction (data only)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted re-encryption without a new key",
    )

    store_cmd = sub.add_parser(
        "store", help="stored records: integrity check, restore from a backup"
    ).add_subparsers(dest="store_command", required=True, metavar="COMMAND")
    p = command(
        "check",
        cmd_store_check,
        "decrypt every stored record; exit 1 naming those that fail authentication",
        store_cmd,
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = command(
        "repair",
        cmd_store_repair,
        "restore the records that fail authentication from a decrypted backup, where its "
        "copy is the same version; exit 1 naming any left",
        store_cmd,
    )
    p.add_argument(
        "--from", dest="backup", type=Path, required=True, help="the decrypted backup file"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    users_cmd = sub.add_parser("users", help="staff accounts").add_subparsers(
        dest="users_command", required=True, metavar="COMMAND"
    )
    p = command("add", cmd_users_add, "add a staff account (argon2id password hash)", users_cmd)
    p.add_argument("username")
    p.add_argument("--role", choices=("nurse", "provider", "admin"), default="nurse")
    p.add_argument(
        "--password-file", type=Path, help="read the password from a file instead of prompting"
    )
    p = command(
        "reset-mfa",
        cmd_users_reset_mfa,
        "remove an account's authenticator and recovery codes (audited; for a lost phone)",
        users_cmd,
    )
    p.add_argument("username")

    sync_cmd = sub.add_parser("sync", help="outbox delivery").add_subparsers(
        dest="sync_command", required=True, metavar="COMMAND"
    )
    p = command(
        "status",
        cmd_sync_status,
        "online or not, steps held back, items waiting per lane and the oldest's age, the "
        "claims queue, last success, dead letters, audit export lag",
        sync_cmd,
    )
    p.add_argument(
        "--format",
        choices=("auto", "table", "json"),
        default="auto",
        help="table on a terminal, JSON otherwise (default auto)",
    )
    p.add_argument(
        "--show-errors",
        action="store_true",
        help="open the dead letters' messages (they may quote patient data; audited)",
    )
    p = command(
        "once",
        cmd_sync_once,
        "'Sync now' once, to the end, with the first upstream: clear every retry delay, send "
        "what waits (creates and edits), pull, export the audit trail (claims: appliance "
        "claims submit). Exit 0 when nothing is left waiting; 2 when the link or a step "
        "failed; 3 when items are still waiting without a failure (e.g. --max-bundles), "
        "saying how many and why",
        sync_cmd,
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--max-bundles",
        type=int,
        default=1000,
        help="send at most this many bundles of the outbox (default 1000)",
    )
    p = command(
        "resend",
        cmd_sync_resend,
        "put dead letters back in the outbox once the cause is fixed (a Patient takes its "
        "readings along; audited)",
        sync_cmd,
    )
    p.add_argument("outbox_ids", nargs="*", type=int, metavar="ITEM", help="dead letter numbers")
    p.add_argument("--all", action="store_true", help="every dead letter")

    # Device registry, routing and decoding live with the device services (an entry point
    # may assemble the parts; STYLE.md rule 1).
    from services import device_cli

    device_cli.add_commands(sub, command)
    from services import rpm_cli  # vendor keys (ingest) and RPM billing, likewise

    rpm_cli.add_commands(sub, command)
    from services.claims import cli as claims_cli  # Q3014 claims (issue 8), likewise

    claims_cli.add_commands(sub, command)
    _add_discover(sub, command)
    _add_visits(sub, command)
    return parser


def _cmd_visit_link(args: argparse.Namespace, config: Config) -> int:
    """``appliance visits link issue|list|revoke``: provider links (docs/provider.md)."""
    from appliance import visit_links
    from appliance.store import Store

    actor, now = f"cli:{getpass.getuser()}", datetime.now(UTC)

    async def go() -> int:
        store = await Store.open(config.paths.database, config.keys.kek_file)
        try:
            conn = store.connection
            if args.link_command == "list":
                for link in await db.run_sync(conn, visit_links.recent, now=now, limit=200):
                    _out(f"{link.id}\t{link.state(now).value}\t{link.issued_at}\t"
                         f"{link.expires_at}\t{link.claim_outcome or ''}")  # fmt: skip
                return 0
            if args.link_command == "revoke":
                found = await db.run_sync(conn, visit_links.by_id, args.id)
                if found is None:
                    raise ApplianceError(f"no visit link {args.id}")
                key = store.patient_key(f"Patient/{found.patient_id}")
                done = await db.run_sync(
                    conn, visit_links.revoke, args.id, by=actor, patient_key=key, now=now
                )
                _out("revoked" if done else "already ended")
                return 0
            encounter = await store.read("Encounter", args.encounter, actor)
            patient = str(encounter.get("subject", {}).get("reference", ""))
            if encounter.get("status") != "arrived" or not patient.startswith("Patient/"):
                raise ApplianceError("that Encounter is not an arrived patient's")
            link, token = await db.run_sync(
                conn, visit_links.issue, args.encounter, patient.removeprefix("Patient/"),
                issued_by=actor, patient_key=store.patient_key(patient), now=now,
                provider_name=args.provider or "",
            )  # fmt: skip
            _out(f"{config.web.public_url.rstrip('/')}/visit/{token}")
            sys.stderr.write(f"visit link {link.id}, valid until {link.expires_at}\n")
            return 0
        finally:
            await store.close()

    return asyncio.run(go())


def _add_visits(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """``appliance visits link ...``: single-visit links for remote providers (issue 6)."""
    visits_cmd = sub.add_parser("visits", help="telehealth visits").add_subparsers(
        dest="visits_command", required=True, metavar="COMMAND"
    )
    link_cmd = visits_cmd.add_parser("link", help="provider links").add_subparsers(
        dest="link_command", required=True, metavar="COMMAND"
    )
    p = command("issue", _cmd_visit_link, "issue a link for an arrived Encounter", link_cmd)
    p.add_argument("encounter", help="local id of the arrival Encounter")
    p.add_argument("--provider", help="the provider's name (the note's author)")
    command("list", _cmd_visit_link, "links issued in the last day (no PHI)", link_cmd)
    p = command("revoke", _cmd_visit_link, "withdraw a link at once", link_cmd)
    p.add_argument("id", type=int)


def _cmd_discover(args: argparse.Namespace, config: object) -> int:
    # zeroconf is imported only by the command that needs it (~0.2 s at every start else).
    from appliance import discovery

    return discovery.cmd_discover(args, config)


def _add_discover(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """``appliance discover``: list the boxes advertised on the LAN (mDNS; issue 9)."""
    p = command("discover", _cmd_discover, "list the appliances advertised on the LAN (mDNS)", sub)
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to listen (default 3)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    p.add_argument(
        "--interface",
        action="append",
        metavar="ADDRESS",
        help="listen only on the interface with this IPv4 address (repeatable; default all)",
    )
    p.set_defaults(needs_config=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(os.environ.get("APPLIANCE_LOG_LEVEL", "WARNING"))
    try:
        # A few commands (decode) work without a site config unless one is given.
        wanted = getattr(args, "needs_config", True)
        if callable(wanted):
            wanted = wanted(args)
        config = config_from_args(args) if wanted else None
        return int(args.handler(args, config))
    except ApplianceError as exc:
        sys.stderr.write(f"appliance: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
