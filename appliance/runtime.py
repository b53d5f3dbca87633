"""What every long-running process of the box shares: arguments, logging, heartbeat, shutdown.

The web, devices and sync processes are started the same way by systemd (one unit each,
``Type=notify``) and by ``appliance run`` (the supervisor): ``python -m <entry> --config
FILE`` or ``--demo DATA_DIR``. Each one

* loads the site configuration once and opens the store with the key-encryption key;
* writes a heartbeat row every few seconds (``/healthz`` reads them: the store is the bus);
* tells systemd (or the supervisor) ``READY=1`` once it serves, and pings ``WATCHDOG=1``
  only while its heartbeat succeeds, so a wedged process is restarted;
* stops cleanly on SIGTERM/SIGINT: the current write commits or rolls back, nothing
  acknowledged is lost;
* exits 78 (EX_CONFIG, never restarted) on an error of its configuration, keys or data
  directory at start, and 75 (EX_TEMPFAIL, restarted with backoff) when the store fails it
  while running (a full disk, a stored row that fails authentication): those can heal
  without anyone editing the configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from appliance import db, sdnotify
from appliance.config import Config, demo_config, load
from appliance.errors import ApplianceError, StoreError, TamperedDataError
from appliance.store import Store
from appliance.supervisor import EX_CONFIG

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 5.0
# sysexits.h EX_TEMPFAIL: a temporary failure, restarted (EX_CONFIG, never restarted, is the
# supervisor's, which the systemd units match).
EX_TEMPFAIL = 75
# /healthz calls a process stale when its heartbeat is older than this.
HEARTBEAT_STALE_S = 15.0


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` or ``--demo DATA_DIR`` (embedded demo defaults)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--config", type=Path, help="site configuration TOML file")
    group.add_argument(
        "--demo", type=Path, metavar="DATA_DIR", help="use the embedded demo configuration"
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the configuration named by the arguments (or ``$APPLIANCE_CONFIG``)."""
    if getattr(args, "demo", None) is not None:
        return demo_config(Path(args.demo).resolve())
    path = getattr(args, "config", None) or os.environ.get("APPLIANCE_CONFIG")
    if path is None:
        path = "/etc/appliance/site.toml"
    return load(Path(path))


def setup_logging(level: str | None = None) -> None:
    """Plain one-line logs to stderr (journald adds the timestamp). Never PHI."""
    logging.basicConfig(
        level=(level or os.environ.get("APPLIANCE_LOG_LEVEL", "INFO")).upper(),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def write_heartbeat(conn: sqlite3.Connection, process: str, started_at: str, status: str) -> None:
    """Upsert this process's heartbeat row (one short write transaction)."""
    with db.transaction_sync(conn):
        conn.execute(
            "INSERT INTO heartbeats (process, pid, started_at, beat_at, status) VALUES (?,?,?,?,?) "
            "ON CONFLICT (process) DO UPDATE SET pid = excluded.pid, started_at = "
            "excluded.started_at, beat_at = excluded.beat_at, status = excluded.status",
            (process, os.getpid(), started_at, datetime.now(UTC).isoformat(), status),
        )


@dataclass
class ProcessContext:
    """Handed to a process's main coroutine: its config, store and a stop signal."""

    name: str
    config: Config
    store: Store
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    status: dict[str, object] = field(default_factory=dict)

    def set_status(self, **values: object) -> None:
        """Non-PHI status figures shown in /healthz (e.g. readings taken, items pending)."""
        self.status.update(values)


Main = Callable[[ProcessContext], Coroutine[object, object, None]]


async def _heartbeat_loop(ctx: ProcessContext, healthy: list[bool]) -> None:
    started = datetime.now(UTC).isoformat()
    while True:
        try:
            await db.run_sync(
                ctx.store.connection,
                write_heartbeat,
                ctx.name,
                started,
                json.dumps(ctx.status, default=str),
            )
            healthy[0] = True
        except (ApplianceError, sqlite3.Error) as exc:
            healthy[0] = False
            logger.warning("heartbeat failed: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.stopping.wait(), HEARTBEAT_INTERVAL_S)
        if ctx.stopping.is_set():
            return


async def serve(name: str, config: Config, main: Main) -> int:
    """Open the store, run ``main`` with heartbeat and watchdog, stop on SIGTERM."""
    store = await Store.open(config.paths.database, config.keys.kek_file)
    ctx = ProcessContext(name=name, config=config, store=store)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ctx.stopping.set)
    healthy = [True]
    heartbeat = asyncio.create_task(_heartbeat_loop(ctx, healthy))
    watchdog = asyncio.create_task(sdnotify.run_watchdog(lambda: healthy[0]))
    main_task = asyncio.create_task(main(ctx))
    stop_task = asyncio.create_task(ctx.stopping.wait())
    try:
        done, _ = await asyncio.wait({main_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        sdnotify.stopping()
        ctx.stopping.set()
        if main_task in done:
            try:
                main_task.result()  # re-raise a crash so the supervisor/systemd restarts us
            except (StoreError, TamperedDataError) as exc:
                # The store failed the running process (a full disk, a row that fails
                # authentication): unlike a configuration error at start, that can heal
                # without anyone editing anything, so the exit asks for a restart.
                print(f"appliance-{name}: {exc}", file=sys.stderr)  # noqa: T201 - one line
                return EX_TEMPFAIL
        else:
            try:
                await asyncio.wait_for(main_task, 10)
            except TimeoutError:
                logger.warning("%s did not stop within 10 s; cancelling", name)
        return 0
    finally:
        for task in (heartbeat, watchdog, main_task, stop_task):
            task.cancel()
        await asyncio.gather(heartbeat, watchdog, main_task, stop_task, return_exceptions=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await store.close()


def main_entry(name: str, main: Main, argv: list[str] | None = None) -> int:
    """The ``python -m`` entry of a process: parse arguments, run, map errors to exit codes."""
    parser = argparse.ArgumentParser(
        prog=f"appliance-{name}", description=f"The appliance's {name} process."
    )
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        config = config_from_args(args)
        return asyncio.run(serve(name, config, main))
    except ApplianceError as exc:
        # One clear line naming the problem; systemd shows it in `systemctl status`.
        print(f"appliance-{name}: {exc}", file=sys.stderr)  # noqa: T201 - fatal message to stderr
        return EX_CONFIG  # systemd's RestartPreventExitStatus stops a restart loop
