"""Opening the SQLite database: durability pragmas, schema migrations, transactions.

Every process (web, devices, sync, the CLI) opens the same file through this module, so the
settings that make an acknowledged write durable live in one place:

* ``journal_mode=WAL`` so readers never block the writer (DESIGN.md, "Processes");
* ``synchronous=FULL`` so a commit that returned survives power loss and ``kill -9``;
* ``secure_delete=ON`` so freed pages are zeroed rather than left with old ciphertext;
* ``temp_store=MEMORY`` so sorts and temporary indexes never spill to a temp file.

Writers use ``BEGIN IMMEDIATE`` so the write lock is taken up front and a busy database is
waited for (``busy_timeout``) instead of failing half-way through a transaction.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from importlib import resources as importlib_resources
from pathlib import Path
from typing import TypeVar

import aiosqlite

from appliance.errors import StoreError

logger = logging.getLogger(__name__)

T = TypeVar("T")

BUSY_TIMEOUT_MS = 15_000

_WAL = "PRAGMA journal_mode=WAL"

_PRAGMAS = (
    # First, so every later statement waits for a lock instead of failing at once. (The
    # switch to WAL does not call the busy handler; _switch_to_wal waits for it.)
    f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
    _WAL,
    "PRAGMA synchronous=FULL",
    "PRAGMA secure_delete=ON",
    "PRAGMA temp_store=MEMORY",
    "PRAGMA foreign_keys=ON",
)


def migrations() -> list[tuple[int, str]]:
    """Return the packaged migrations as ``(version, sql)`` pairs in order."""
    folder = importlib_resources.files("appliance") / "migrations"
    found: list[tuple[int, str]] = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), entry.read_text(encoding="utf-8")))
    return sorted(found)


def translate_error(exc: sqlite3.Error, path: Path | str) -> StoreError:
    """Turn a low-level SQLite error into a one-line message an operator can act on."""
    text = str(exc)
    if "database or disk is full" in text or "disk I/O error" in text:
        return StoreError(
            f"{path}: the disk is full or failing ({text}); nothing was written. "
            "Free space on the data volume, then retry."
        )
    if "malformed" in text or "not a database" in text:
        return StoreError(
            f"{path}: the database file is corrupt ({text}). Stop the appliance and restore "
            'the latest backup (docs/provisioning.md, "Backup and restore").'
        )
    if "locked" in text or "busy" in text:
        return StoreError(f"{path}: the database stayed locked for too long ({text}); retry.")
    if "readonly" in text or "unable to open" in text:
        return StoreError(
            f"{path}: cannot open the database for writing ({text}); check the data "
            "directory exists and belongs to the appliance user."
        )
    return StoreError(f"{path}: {text}")


def _apply_pragmas(conn: sqlite3.Connection) -> None:
    for pragma in _PRAGMAS:
        if pragma == _WAL:
            _switch_to_wal(conn)
        else:
            conn.execute(pragma)
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    if mode != "wal":
        raise StoreError(
            f"journal_mode is {mode!r}, WAL is required (is the file on a network share?)"
        )


def _switch_to_wal(conn: sqlite3.Connection) -> None:
    """Turn the file to WAL, waiting out another process doing the same.

    On a new file the switch needs an exclusive lock, and SQLite answers "locked" at once
    there without calling the busy handler: web and sync opening a new database at the same
    moment at boot would fail. So the wait the busy timeout promises is done here.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.001
    while True:
        try:
            conn.execute(_WAL)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _statements(sql: str) -> list[str]:
    """Split a migration script into statements with SQLite's own tokenizer (triggers too)."""
    found, pending = [], ""
    for line in sql.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            found.append(pending)
            pending = ""
    if pending.strip() and not all(
        not ln.strip() or ln.strip().startswith("--") for ln in pending.splitlines()
    ):
        raise ValueError(f"migration ends with an incomplete statement: {pending[:80]!r}")
    return found


def _migrate(conn: sqlite3.Connection) -> int:
    current = int(conn.execute("PRAGMA user_version").fetchone()[0])
    for version, sql in migrations():
        if version <= current:
            continue
        # Each migration in its own transaction, so a crash leaves the previous version
        # intact. The version is read again under the write lock: two processes starting on
        # a new database (web and sync at boot) must not both apply the same migration.
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version <= current:
                conn.execute("COMMIT")
                continue
            logger.info("applying schema migration %04d", version)
            for statement in _statements(sql):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={version:d}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        current = version
    return current


def connect_sync(path: Path, *, migrate: bool = True) -> sqlite3.Connection:
    """Open the database for blocking use (CLI commands, benchmarks, backups)."""
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        _apply_pragmas(conn)
        if migrate:
            _migrate(conn)
        else:
            conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()
    except sqlite3.Error as exc:
        raise translate_error(exc, path) from exc
    return conn


def silence_driver_debug_logs() -> None:
    """aiosqlite logs every operation *with its arguments* at DEBUG: rows, PHI, even the KEK.

    Cap it at WARNING whatever the root level is, so no debug setting can leak them.
    """
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)


async def connect(path: Path, *, migrate: bool = True) -> aiosqlite.Connection:
    """Open the database for use from the event loop (aiosqlite runs it on its own thread)."""
    silence_driver_debug_logs()
    try:
        conn = await aiosqlite.connect(path, isolation_level=None)
    except sqlite3.Error as exc:
        raise translate_error(exc, path) from exc
    try:
        await run_sync(conn, _apply_pragmas)
        if migrate:
            await run_sync(conn, _migrate)
    except sqlite3.Error as exc:
        await conn.close()
        raise translate_error(exc, path) from exc
    except BaseException:
        await conn.close()
        raise
    return conn


@contextlib.asynccontextmanager
async def transaction(
    conn: aiosqlite.Connection, path: Path | str = "database"
) -> AsyncIterator[None]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``; rolls back on any error. Commit returning = durable."""
    try:
        await conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise translate_error(exc, path) from exc
    try:
        yield
        await conn.execute("COMMIT")
    except BaseException as exc:
        with contextlib.suppress(sqlite3.Error):
            await conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise translate_error(exc, path) from exc
        raise


@contextlib.contextmanager
def transaction_sync(conn: sqlite3.Connection, path: Path | str = "database") -> Iterator[None]:
    """Blocking twin of :func:`transaction` for CLI commands and benchmarks."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise translate_error(exc, path) from exc
    try:
        yield
        conn.execute("COMMIT")
    except BaseException as exc:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise translate_error(exc, path) from exc
        raise


def meta_value(conn: sqlite3.Connection, key: str) -> str | None:
    """The ``meta`` row ``key`` as text (None when absent)."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    if row is None:
        return None
    value = row[0]
    return value.decode() if isinstance(value, bytes) else str(value)


def set_meta(conn: sqlite3.Connection, key: str, value: str | bytes) -> None:
    """Write the ``meta`` row ``key`` (inside the caller's write transaction)."""
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


async def run_sync(
    conn: aiosqlite.Connection,
    fn: Callable[..., T],
    *args: object,
    **kwargs: object,
) -> T:
    """Run ``fn(raw_connection, *args)`` on the connection's own thread, in one hop.

    A write transaction (``BEGIN IMMEDIATE`` … inserts … ``COMMIT``) issued statement by
    statement through aiosqlite costs one thread round trip per statement; running it as
    one function costs one. aiosqlite exposes no public hook for this, so this is the single
    place that uses its ``_execute``/``_conn``; ``tests/appliance/test_db.py`` fails loudly if
    a new aiosqlite release changes them.
    """
    raw = conn._conn
    result: T = await conn._execute(fn, raw, *args, **kwargs)  # type: ignore[no-untyped-call]
    return result
