"""The database layer: durability pragmas, migrations, and the aiosqlite internals we rely on."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import aiosqlite
import pytest

from appliance import db, fhir
from appliance.errors import StoreError


async def test_connection_has_the_durability_settings(tmp_path: Path) -> None:
    conn = await db.connect(tmp_path / "a.db")
    try:

        def pragmas(raw: sqlite3.Connection) -> tuple[object, ...]:
            return tuple(
                raw.execute(f"PRAGMA {name}").fetchone()[0]
                for name in (
                    "journal_mode",
                    "synchronous",
                    "secure_delete",
                    "temp_store",
                    "foreign_keys",
                )
            )

        # synchronous FULL = 2, temp_store MEMORY = 2
        assert await db.run_sync(conn, pragmas) == ("wal", 2, 1, 2, 1)
    finally:
        await conn.close()


def test_migrations_apply_once_and_record_the_version(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    latest = db.migrations()[-1][0]
    conn = db.connect_sync(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == latest
    conn.close()
    again = db.connect_sync(path)  # no error from re-creating tables: nothing re-applied
    assert again.execute("PRAGMA user_version").fetchone()[0] == latest
    again.close()


def test_aiosqlite_internals_run_sync_relies_on_are_still_there() -> None:
    # run_sync uses Connection._execute and Connection._conn (see appliance/db.py). If an
    # aiosqlite upgrade renames them, this fails with a clear pointer instead of a hang.
    assert callable(getattr(aiosqlite.Connection, "_execute", None)), (
        "aiosqlite changed: fix db.run_sync"
    )
    assert isinstance(aiosqlite.Connection.__dict__.get("_conn"), property), (
        "aiosqlite changed: fix db.run_sync"
    )


async def test_run_sync_runs_on_the_connection_thread_and_returns(tmp_path: Path) -> None:
    conn = await db.connect(tmp_path / "a.db")
    try:
        assert (
            await db.run_sync(conn, lambda raw, x: raw.execute("SELECT ?", (x,)).fetchone()[0], 41)
            == 41
        )
    finally:
        await conn.close()


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    conn = db.connect_sync(tmp_path / "a.db")

    def fail_inside() -> None:
        with db.transaction_sync(conn):
            conn.execute("INSERT INTO meta (key, value) VALUES ('x', 'y')")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fail_inside()
    assert conn.execute("SELECT count(*) FROM meta WHERE key = 'x'").fetchone()[0] == 0
    conn.close()


def test_unopenable_location_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as info:
        db.connect_sync(tmp_path / "missing-dir" / "a.db")
    assert "\n" not in str(info.value)
    assert "data directory" in str(info.value)


def test_migration_numbers_are_contiguous_from_one() -> None:
    # The runner applies every migration above the database's user_version: a number added
    # later below the highest would never run on a database already past it.
    versions = [version for version, _ in db.migrations()]
    assert versions == list(range(1, len(versions) + 1))


def test_outbox_items_waiting_before_0017_get_when_they_joined_the_queue(tmp_path: Path) -> None:
    """0017 fills ``queued_at`` for items not yet delivered: a create from its UUIDv7, an
    update (its record may be months old) and an id not laid out as ours from now."""
    conn = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    for _version, sql in db.migrations()[:16]:
        for statement in db._statements(sql):
            conn.execute(statement)
    conn.execute("PRAGMA user_version=16")
    month_ago = int(time.time() * 1000) - 30 * 86_400_000
    rows = [(1, fhir.uuid7(month_ago), "Observation"), (2, "pulled-id-7", "Patient")]
    conn.executemany(
        "INSERT INTO resources (id, logical_id, type, key_version, body) VALUES (?, ?, ?, 1, x'00')",
        rows,
    )
    conn.executemany(
        "INSERT INTO outbox (id, lane, resource_id, state, kind) VALUES (?, 2, ?, ?, ?)",
        [
            (1, 1, "pending", "create"),
            (2, 1, "dead", "create"),
            (3, 1, "pending", "update"),
            (4, 2, "pending", "create"),
            (5, 1, "delivered", "create"),
        ],
    )
    conn.close()
    before = int(time.time() * 1000)
    migrated = db.connect_sync(tmp_path / "a.db")
    after = int(time.time() * 1000)
    found = dict(migrated.execute("SELECT id, queued_at FROM outbox").fetchall())
    assert found[1] == found[2] == month_ago
    assert before - 1000 <= found[3] <= after
    assert before - 1000 <= found[4] <= after
    assert found[5] is None
    plan = migrated.execute(
        "EXPLAIN QUERY PLAN SELECT min(queued_at) FROM outbox WHERE state = 'pending' AND lane = 2"
    ).fetchall()
    assert "outbox_waiting" in str(plan)
    migrated.close()


def test_processes_starting_together_on_a_new_database_migrate_it_once(tmp_path: Path) -> None:
    """Web and sync start at the same moment at boot: neither may apply a migration twice."""
    import multiprocessing

    latest = db.migrations()[-1][0]
    # One pool, many new files: the workers are already running, so they meet on each new
    # file within a millisecond, as at boot. (Switching a new file to WAL answered "locked"
    # at once, without the busy timeout, in about one round in seven.)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        for attempt in range(40):
            path = tmp_path / f"race-{attempt}.db"
            versions = pool.map(_open_and_migrate, [path] * 4)
            assert versions == [latest] * 4, f"round {attempt}"


def test_a_migration_script_is_split_like_sqlite_splits_it() -> None:
    script = (
        "CREATE TABLE t (x TEXT DEFAULT ';');\n"
        "CREATE TRIGGER g BEFORE DELETE ON t\nBEGIN SELECT RAISE(ABORT, 'no; never'); END;\n"
        "-- a trailing comment\n"
    )
    assert [s.split()[1] for s in db._statements(script)] == ["TABLE", "TRIGGER"]
    with pytest.raises(ValueError, match="incomplete statement"):
        db._statements("CREATE TABLE u (x")


def _open_and_migrate(path: Path) -> int:
    conn = db.connect_sync(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()
