"""Outbox delivery: pending rows → idempotent ``batch`` Bundles → per-item checkpoints.

Each outbox row's resource is sent as ``POST <Type>`` with
``ifNoneExist: identifier=urn:ietf:rfc:3986|urn:uuid:<logical id>``, so a resend after a
lost response finds the resource already there (200) instead of creating it twice (201).
Entries of a ``batch`` are independent: each gets its own outcome, a refused entry is
dead-lettered with the server's message and the rest land.

Entries carry no ``fullUrl``: batch entries do not reference each other, and a
``urn:uuid`` fullUrl equal to our identifier value gets rewritten by some servers (the
Medplum peer replaces it in every string of the Bundle, identifiers included), which would
break idempotency on the next resend.

Which items go in a bundle, in what order, and what delivery remembers of them between
bundles (references to our resources, dependencies pulled ahead, copies that cannot be read):
:mod:`sync_agent.outbox_queue`.

Every answer is committed at once (delivered, dead, or retry-at), so a drain interrupted
anywhere resumes where it stopped; nothing is ever re-sent that the server acknowledged,
except when its answer was lost — and then the resend is harmless. Entry *k* of an answer is
item *k*'s, so an answer without exactly one entry per entry sent (one dropped, a batch-level
OperationOutcome put first) is matched to nothing: it fails as a whole
(:class:`~sync_agent.outbox_bundle.UnmatchedAnswer`, transient) and every item is sent again,
rather than each taking its neighbour's outcome and upstream id.

A failure of the whole exchange (no connection, no answer, 5xx, 429) says nothing about the
items, so it writes nothing to their rows: they stay due, in lane order, and the caller (the
sync process) owns the pacing — it gets ``link_down``, ``unreachable`` (no connection was
made at all) and the server's ``Retry-After``. A week offline therefore costs no writes and
leaves no item behind a per-item backoff when the link returns. One exception: the items of
a bundle whose answer was lost (a timeout after sending, a 504) are not sent again before a
request timeout (the upstream's ``timeout_s``) has passed, "sync now" or not, in this process
or another (`appliance sync once`): the wait is kept in the row (``unsure_until``). The server
may be applying that request still, and conditional create is not atomic under concurrent
requests on HAPI (#3141), Microsoft's FHIR server (#1382) or Medplum (#4234). The rest flows
meanwhile. Only an entry-level answer that says nothing against the item (an entry's own
5xx/429/408/409/423/425, a 401/403 — our access, never a dead letter —, or a missing entry)
schedules that one item later with jittered exponential backoff
(:func:`~sync_agent.outbox_schedule.backoff_s`), its last error in the server's words,
sealed; :func:`failing_items` finds the items that keep failing so, for the status.

One item can make a server (or a filter in front of it) fail the whole bundle — a 500, 502
or 403, no answer — and would stop the outbox for good, alerts included, if every drain sent
the same first items. So a bundle failing so in a way one entry may cause
(:func:`~sync_agent.outbox_bundle.may_be_an_entry`) is bisected: its items go again as they
were once (a passing fault), then in bundles halved at each failure until each gets an answer
(kept in memory).
An item that fails alone, having failed before, makes the drain ask the server whether it is
up (``GET metadata``, a CapabilityStatement): if so, the server fails only that item, which
is set aside — it waits out a per-item backoff (counted, its last error kept, shown by
:func:`failing_items`), goes alone when due again (``outbox.alone``, so after a restart
too) — and the drain goes on; if not, it is an
outage, and nothing is written. That needs no other bundle to go through (an item may have
nothing else due behind it but its own readings). At most ``_MAX_ISOLATED`` items set aside
before go again per drain. Never a dead letter: bisecting costs requests (a dead EHR one
question more per round), never an item. An upstream that fails every POST but answers its
metadata (its database down) looks like one failing each item it is sent: a few items per
round are set aside, each for at most ``MAX_BACKOFF_S``.

Bundle size: a 413 (or "too many entries") halves it and it grows back by doubling after each
bundle that goes through, but not past a size refused before (for the next
``_TOO_LARGE_MEMORY`` bundles); the items of a bundle that got no answer are resent in
bundles of half its size, in case the timeout was its size. :meth:`Deliverer.drain` works one
bundle ahead (its docstring).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx

from appliance import db
from appliance.store import Store
from sync_agent.drain_result import DrainResult, add_step
from sync_agent.outbox_bundle import UnmatchedAnswer, bundle, entry_ref, not_taken
from sync_agent.outbox_queue import Batch, OutboxQueue
from sync_agent.outbox_schedule import backoff_s, due_bounds, iso
from sync_agent.outgoing import Item, Outgoing
from sync_agent.upstream import (
    ENTRY_NOT_THE_ITEM,
    Failure,
    UpstreamError,
    as_dict,
    as_list,
    bundle_entries,
    entry_outcome,
    entry_status,
    exchange,
    failure_class,
    lost_answer_wait_s,
    post_bundle,
    response_json,
)

logger = logging.getLogger(__name__)

# At most this many items set aside before are sent again (alone) in one drain; the others
# due wait for a later drain, and the rest flows. An upstream that fails every POST but
# answers its metadata (its database down) then costs, per round of the sync loop, at most
# two requests (the item, the question whether the server is up) for each of these, and for
# each item the bisection brings down to one, besides the bundle that fails.
_MAX_ISOLATED = 3
# After this many bundles fitting, a size once refused as too large is tried again.
_TOO_LARGE_MEMORY = 100


class Deliverer:
    """Drains the outbox of one store to one upstream FHIR server."""

    def __init__(
        self,
        store: Store,
        client: httpx.AsyncClient,
        *,
        max_entries: int,
        rng: random.Random | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        unsure_s: float | None = None,
    ) -> None:
        """``unsure_s``: how long items whose answer was lost are not sent again (default:
        ``client``'s read timeout, which :func:`sync_agent.upstream.build_client` sets to the
        upstream's ``timeout_s``)."""
        self._store = store
        self._client = client
        self._max_entries = max_entries
        self._batch_size = max_entries
        # Bundles of this many entries were refused as too large: growing back stops below,
        # until enough bundles went through to try again (the limit may have been transient).
        self._too_large_at: int | None = None
        self._fits_since = 0
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._clock = clock
        self._unsure_s = lost_answer_wait_s(client) if unsure_s is None else unsure_s
        # The database thread's side: reading and planning bundles, recording outcomes.
        self._queue = OutboxQueue(store)
        # For the rest of a drain in which _MAX_ISOLATED items set aside were sent again, those
        # set aside are not sent (``barred``, OutboxQueue.choose).
        self._aside_barred = False

    @property
    def unsure_s(self) -> float:
        """How long an item whose answer was lost is not sent again (the request timeout)."""
        return self._unsure_s

    @property
    def batch_size(self) -> int:
        """The current bundle size (shrinks when the server says bundles are too large)."""
        return self._batch_size

    # -- the drain -----------------------------------------------------------------------

    async def _prepare(
        self, in_flight: tuple[Item, ...] = (), *, forget_held: bool = False
    ) -> tuple[Batch | None, datetime]:
        now = self._clock()
        batch = await db.run_sync(
            self._store.connection,
            self._queue.choose,
            iso(now),
            in_flight,
            self._batch_size,
            self._aside_barred,
            forget_held,
        )
        return batch, now

    def _send(self, batch: Batch) -> asyncio.Task[dict[str, Any]]:
        return asyncio.ensure_future(self._post(batch.ready))

    async def _post(self, ready: list[tuple[Item, Outgoing]]) -> dict[str, Any]:
        """POST the bundle; its answer, which must have one entry per entry sent."""
        response = await post_bundle(self._client, bundle(ready))
        answered = len(as_list(as_dict(response).get("entry")))
        if answered != len(ready):
            # Entries are matched to items by position: one answer dropped, or one extra (a
            # batch-level OperationOutcome first), shifts every position after it, and each
            # item would take its neighbour's outcome and upstream id. None is trusted.
            raise UnmatchedAnswer(
                Failure.TRANSIENT,
                f"the answer has {answered} entries for the {len(ready)} sent; "
                "none is taken, all are sent again",
            )
        return response

    async def _settle(self, batch: Batch, response: dict[str, Any], result: DrainResult) -> None:
        """Record each entry's outcome (delivered, dead, retry-at) in one transaction.

        Retry times count from now, when the answer is in: the bundle was planned before the
        previous one's answer came (one bundle ahead), and a backoff measured from then was
        mostly spent before it began.
        """
        now = self._clock()
        result.bundles = 1
        dead = list(batch.dead)
        delivered: list[tuple[Item, str | None]] = []
        retry: list[tuple[Item, str, float]] = []
        # One entry per item (:meth:`_post` saw to it): entry k is item k's answer.
        for (item, _body), entry in zip(batch.ready, bundle_entries(response), strict=True):
            code = entry_status(entry)
            if 200 <= code < 300:
                delivered.append((item, entry_ref(entry, item.type)))
                result.existing += code == 200
            elif 400 <= code < 500 and code not in ENTRY_NOT_THE_ITEM:
                dead.append((item, entry_outcome(entry, code)))
            else:
                retry.append((item, not_taken(entry, code), backoff_s(item.attempts, self._rng)))
        result.dead = await db.run_sync(
            self._store.connection, self._queue.record, delivered, dead, retry, now
        )
        result.delivered, result.retry = len(delivered), len(retry)
        self._grow()

    async def _only_dead(self, batch: Batch, now: datetime, result: DrainResult) -> None:
        result.dead = await db.run_sync(
            self._store.connection, self._queue.record, [], batch.dead, [], now
        )

    async def drain_once(self) -> DrainResult:
        """Send one bundle of due items; returns what happened. Never raises for the link.

        One bundle only: an item failing alone again is not set aside here (:meth:`drain`)."""
        result = DrainResult(batch_size=self._batch_size)
        batch, now = await self._prepare()
        if batch is None:
            return result
        if not batch.ready:
            await self._only_dead(batch, now, result)
            return result
        try:
            response = await self._send(batch)
        except UpstreamError as exc:
            await self._on_bundle_failure(exc, batch.ready, list(batch.dead), result)
            return result
        await self._settle(batch, response, result)
        return result

    def _grow(self) -> None:
        """A bundle went through: grow back towards the maximum, below a known refusal."""
        ceiling = self._max_entries
        if self._too_large_at is not None:
            self._fits_since += 1
            if self._fits_since >= _TOO_LARGE_MEMORY:
                self._too_large_at = None
            else:
                ceiling = min(ceiling, self._too_large_at - 1)
        self._batch_size = max(self._batch_size, min(ceiling, self._batch_size * 2))

    async def _on_bundle_failure(
        self,
        exc: UpstreamError,
        ready: list[tuple[Item, Outgoing]],
        dead: list[tuple[Item, str]],
        result: DrainResult,
    ) -> bool:
        """Act on a bundle that failed as a whole; whether it held one item that had failed
        before (bisected down to it,
        :meth:`~sync_agent.outbox_queue.OutboxQueue.failed_whole`): :meth:`drain` then asks
        whether the server is up, to tell that item's doing from an outage."""
        conn = self._store.connection
        now = self._clock()  # the exchange has just failed
        result.error = str(exc)
        if exc.failure is Failure.TOO_LARGE and len(ready) > 1:
            self._batch_size = max(1, len(ready) // 2)
            self._too_large_at = min(len(ready), self._too_large_at or len(ready))
            self._fits_since = 0
            logger.info(
                "upstream refused a bundle of %d as too large; now sending %d",
                len(ready),
                self._batch_size,
            )
            if dead:
                result.dead = await db.run_sync(conn, self._queue.record, [], dead, [], now)
            return False
        if exc.failure is Failure.PERMANENT and len(ready) > 1:
            # The whole bundle was refused: send one at a time to find the entry at fault.
            self._batch_size = 1
            if dead:
                result.dead = await db.run_sync(conn, self._queue.record, [], dead, [], now)
            return False
        if exc.failure in (Failure.PERMANENT, Failure.TOO_LARGE):
            dead.extend((item, exc.message) for item, _ in ready)
            result.dead = await db.run_sync(conn, self._queue.record, [], dead, [], now)
            return False
        # Transient, ambiguous, auth, endpoint: the exchange failed, not (as far as we know)
        # the items. Nothing is written to their rows (they stay due, in order; an answer lost
        # is waited out, OutboxQueue.failed_whole); the caller paces the next attempt.
        result.link_down = True
        result.unreachable = exc.failure is Failure.TRANSIENT and isinstance(
            exc.__cause__, httpx.TransportError
        )
        result.retry_after_s = exc.retry_after_s
        if exc.failure is Failure.AMBIGUOUS:
            result.ambiguous = len(ready)
            # A timeout may be the bundle's size: resend smaller, grow back on success.
            self._batch_size = max(1, len(ready) // 2)
        items = [item for item, _ in ready]
        again = await db.run_sync(conn, self._queue.failed_whole, items, exc, now, self._unsure_s)
        if dead:
            result.dead = await db.run_sync(conn, self._queue.record, [], dead, [], now)
        return again

    async def _server_up(self) -> bool:
        """Whether the upstream answers ``GET metadata`` with a CapabilityStatement (2xx):
        it is up, so a bundle it just failed was that bundle's doing. No answer, another
        status or another body: not known to be up (an outage, a login page in front)."""
        try:
            response = await exchange(self._client, "GET", "metadata")
        except UpstreamError:
            return False
        body = response_json(response) if 200 <= response.status_code < 300 else None
        return as_dict(body).get("resourceType") == "CapabilityStatement"

    async def _set_aside(self, item: Item, exc: UpstreamError, result: DrainResult) -> None:
        """The server is up and failed ``item`` alone, again: it waits out a per-item backoff
        (never shorter than the wait of an answer lost), counted, its last error in the
        server's words (sealed), shown by :func:`failing_items`; alone when due again. Never
        a dead letter: a 5xx, a 403 or no answer says nothing against the item itself."""
        now = self._clock()
        delay = backoff_s(item.attempts, self._rng)
        if exc.failure is Failure.AMBIGUOUS:
            delay = max(delay, self._unsure_s)
        message = f"the upstream failed every bundle with it, alone too, and is up: {exc}"
        await db.run_sync(
            self._store.connection, self._queue.record, [], [], [], now, [(item, message, delay)]
        )
        result.retry += 1
        result.link_down = result.unreachable = False
        result.retry_after_s = None
        logger.warning(
            "upstream failed outbox item %d alone again (%s) and is up; it waits out a backoff",
            item.outbox_id,
            failure_class(str(exc)),
        )

    async def drain(
        self,
        *,
        max_bundles: int = 1000,
        stop: Callable[[], bool] = lambda: False,
        on_bundle: Callable[[DrainResult], None] | None = None,
    ) -> DrainResult:
        """Drain until nothing is due, the link fails, ``max_bundles`` were sent, or ``stop()``.

        ``stop`` is asked before each bundle goes out (the process is shutting down): the
        bundle on the wire is waited for and its answer committed, nothing more is sent, so a
        stop takes one exchange however long the queue. That holds for a bundle sent ahead
        too: a stop that arrives while *k*'s answer is being committed and *k+1* already
        travels waits for *k+1*'s answer, so after a clean stop nothing the server applied is
        left pending here.

        ``on_bundle`` is told each bundle's outcome once it is committed (the sync process
        says "online" from the first one, not only when a long catch-up is over).

        Pipelined, one bundle ahead: while bundle *k* is on the wire the next one is read and
        planned (its items, and those pointing at *k*'s, left out); once *k*'s answer is in,
        *k+1* goes out at once and *k*'s outcomes are committed while it travels. So *k+1* is
        never sent before *k* succeeded, and the database work overlaps the network instead of
        adding to it. Nothing else changes: each answer is committed as it comes, a failure
        drops the bundle read ahead (unsent, still pending).

        An item that fails alone, having failed before (bisected down to it), makes the drain
        ask the server whether it is up (``GET metadata``): up, the server fails only that
        item, which is set aside (:meth:`_set_aside`) and the drain goes on; not up, it is an
        outage: nothing written, ``link_down``. Once :data:`_MAX_ISOLATED` items set aside
        before failed again in a drain, the others set aside wait for the next drain.
        """
        total = DrainResult()
        send: asyncio.Task[dict[str, Any]] | None = None
        retried = 0  # items set aside before, sent again and failed again
        try:
            batch, now = await self._prepare(forget_held=True)
            sent = 0
            while batch is not None and sent < max_bundles:
                if send is None and stop():
                    break  # a bundle already on the wire is waited for, below
                step = DrainResult()
                if not batch.ready:
                    if batch.dead:
                        await self._only_dead(batch, now, step)
                        add_step(total, step)
                    if not step.dead and not batch.more:
                        # Everything due waits for something not due yet, or for the
                        # bundle in flight.
                        break
                    batch, now = await self._prepare()
                    continue
                if send is None:
                    send = self._send(batch)
                sent += 1
                ahead: Batch | None = None
                if sent < max_bundles and not stop():
                    ahead, ahead_now = await self._prepare(batch.taken)
                try:
                    response = await send
                except UpstreamError as exc:
                    send = None
                    again = await self._on_bundle_failure(exc, batch.ready, list(batch.dead), step)
                    if again:
                        [(item, _)] = batch.ready
                        retried += item.outbox_id in self._queue.aside
                        if await self._server_up():
                            await self._set_aside(item, exc, step)
                        # Enough of them for one round: the next drain takes the next ones.
                        self._aside_barred = retried >= _MAX_ISOLATED
                    add_step(total, step)
                    if step.link_down:
                        break
                    batch, now = await self._prepare()  # the size changed: plan again
                    continue
                send = None
                stopping = stop()
                if ahead is not None and ahead.ready and not stopping:
                    send = self._send(ahead)
                await self._settle(batch, response, step)
                add_step(total, step)
                if on_bundle is not None:
                    on_bundle(step)
                if stopping:
                    break
                if ahead is not None and ahead.ready:
                    batch, now = ahead, ahead_now
                else:
                    # Nothing read ahead, or only items waiting for this bundle's answers.
                    batch, now = await self._prepare()
        finally:
            self._aside_barred = False
            if send is not None:
                # Never sent for good (stopped, or an error): the items stay pending, and a
                # request that did reach the server is harmless to resend.
                send.cancel()
                with contextlib.suppress(asyncio.CancelledError, UpstreamError):
                    await send
        total.batch_size = self._batch_size
        return total

    async def make_due(self) -> int:
        """Cancel every per-item backoff ("sync now"); returns how many rows were waiting.

        Not the wait of items whose answer was lost a moment ago (``unsure_until``, written
        by any process): the server may be applying that request still, and a resend now
        could make a second copy. Such an item is due when that wait ends, whatever backoff
        it had on top.
        """

        def work(conn: sqlite3.Connection) -> int:
            # The wait stands while it is ahead, but not beyond the horizon (a clock set back).
            bounds = due_bounds(iso(self._clock()))
            standing = "CASE WHEN unsure_until > ? AND unsure_until <= ? THEN unsure_until END"
            with db.transaction_sync(conn):
                cursor = conn.execute(
                    f"UPDATE outbox SET next_attempt_at = {standing} "  # noqa: S608 - constant
                    "WHERE state = 'pending' AND next_attempt_at IS NOT NULL "
                    f"AND next_attempt_at IS NOT {standing}",
                    (*bounds, *bounds),
                )
            self._queue.forget_held()  # everything is due now
            return int(cursor.rowcount)

        return await db.run_sync(self._store.connection, work)
