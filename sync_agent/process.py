"""The sync process: drains the outbox to the upstream EHR whenever the link allows.

It wakes when another process commits (``PRAGMA data_version`` changes) or when the
interval passes, drains until nothing is due, and backs off with jitter when the link is
down, so a dead upstream is not hammered and a fleet does not reconnect in lock-step. It
also seals the audit chain with a signed checkpoint every minute when records were added.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import sys
from datetime import UTC, datetime

from appliance import audit, db, runtime, sdnotify
from appliance.runtime import ProcessContext
from sync_agent.outbox_delivery import Deliverer, backoff_s
from sync_agent.upstream import build_client

logger = logging.getLogger(__name__)

CHECKPOINT_INTERVAL_S = 60.0
WAKE_POLL_S = 0.5


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


async def _checkpoints(ctx: ProcessContext) -> None:
    signer = ctx.store.keyring.signing_key
    while not ctx.stopping.is_set():
        try:
            await db.run_sync(ctx.store.connection, audit.checkpoint, signer, now=datetime.now(UTC))
        except Exception:
            logger.exception("audit checkpoint failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.stopping.wait(), CHECKPOINT_INTERVAL_S)


async def _wait_for_work(ctx: ProcessContext, seconds: float) -> None:
    """Sleep up to ``seconds``, returning early when another process commits or we stop."""
    conn = ctx.store.connection
    start = await db.run_sync(conn, _data_version)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not ctx.stopping.is_set() and loop.time() < deadline:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.stopping.wait(), min(WAKE_POLL_S, deadline - loop.time()))
        if await db.run_sync(conn, _data_version) != start:
            return


async def main(ctx: ProcessContext, *, rng: random.Random | None = None) -> None:
    """Entry of the sync process."""
    rng = rng or random.Random()  # noqa: S311 - jitter, not security
    checkpoints = asyncio.create_task(_checkpoints(ctx))
    upstreams = ctx.config.sync.upstreams
    try:
        if not upstreams:
            logger.info("no upstream configured; records stay in the outbox until one is")
            ctx.set_status(upstream=None)
            sdnotify.ready()
            await ctx.stopping.wait()
            return
        upstream = upstreams[0]
        async with build_client(upstream) as client:
            deliverer = Deliverer(
                ctx.store, client, max_entries=upstream.max_bundle_entries, rng=rng
            )
            sdnotify.ready()
            # Randomised start: a fleet coming back after an outage does not arrive at once.
            await _wait_for_work(ctx, rng.uniform(0, min(5.0, ctx.config.sync.interval_s)))
            failures = 0
            while not ctx.stopping.is_set():
                result = await deliverer.drain()
                online = not result.link_down
                failures = 0 if online else failures + 1
                ctx.set_status(
                    upstream=upstream.name,
                    online=online,
                    last_delivered=result.delivered,
                    dead=result.dead,
                    batch_size=deliverer.batch_size,
                    # Only the class of failure: the server's words may quote PHI.
                    last_failure=None if result.error is None else result.error.split(":", 1)[0],
                )
                if result.delivered or result.dead:
                    logger.info(
                        "delivered %d (%d already upstream), dead-lettered %d",
                        result.delivered,
                        result.existing,
                        result.dead,
                    )
                wait = (
                    ctx.config.sync.interval_s
                    if online
                    else backoff_s(failures, rng, base=1.0, cap=60.0)
                )
                await _wait_for_work(ctx, wait)
    finally:
        checkpoints.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await checkpoints


if __name__ == "__main__":
    sys.exit(runtime.main_entry("sync", main))
