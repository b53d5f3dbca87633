"""Why the sync loop stops waiting: new outbox rows, a "Sync now" request, a stop.

Both ride on one ``PRAGMA data_version`` poll every :data:`WAKE_POLL_S`, so they cost
nothing while nothing is written (``sync_agent.process``'s docstring).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from enum import Enum

from appliance import db
from appliance.runtime import ProcessContext
from sync_agent.sync_now_request import SYNC_NOW_KEY

WAKE_POLL_S = 0.5


class Wake(Enum):
    """Why a wait ended."""

    TIMEOUT = "timeout"
    WORK = "work"
    SYNC_NOW = "sync_now"
    STOP = "stop"


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def _marks(conn: sqlite3.Connection) -> tuple[int, int, bytes | str | None]:
    """(data_version, newest outbox id, the sync-now value), read on the DB thread."""
    version = _data_version(conn)
    newest = int(conn.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0])
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (SYNC_NOW_KEY,)).fetchone()
    return version, newest, None if row is None else row[0]


class Wakeups:
    """Watches the store for reasons to stop waiting: new outbox rows, a "sync now" request."""

    def __init__(self, ctx: ProcessContext) -> None:
        self._ctx = ctx
        self._version = -1
        self._newest = 0
        self._sync_now: bytes | str | None = None

    async def prime(self) -> None:
        """Take the current marks as seen (a request made before we started is not new)."""
        self._version, self._newest, self._sync_now = await db.run_sync(
            self._ctx.store.connection, _marks
        )

    async def _check(self) -> Wake | None:
        conn = self._ctx.store.connection
        if await db.run_sync(conn, _data_version) == self._version:
            return None
        self._version, newest, sync_now = await db.run_sync(conn, _marks)
        if sync_now != self._sync_now:
            self._sync_now = sync_now
            return Wake.SYNC_NOW
        if newest != self._newest:
            self._newest = newest
            return Wake.WORK
        return None

    async def wait(self, seconds: float, *, on_work: bool) -> Wake:
        """Sleep up to ``seconds``; return early on stop, "sync now" or (``on_work``) new rows."""
        stopping = self._ctx.stopping
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not stopping.is_set():
            left = deadline - loop.time()
            if left <= 0:
                return Wake.TIMEOUT
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), min(WAKE_POLL_S, left))
            if stopping.is_set():
                break
            wake = await self._check()
            if wake is Wake.SYNC_NOW or (wake is Wake.WORK and on_work):
                return wake
        return Wake.STOP
