"""The sync process: drains the outbox to the upstream EHR whenever the link allows.

After each round it waits in one of four ways, decided by how the round ended:

* **online** (the last bundle went through, or nothing was due): it waits ``interval_s``
  (± 20 %, so a fleet that came back together does not stay in step) and
  wakes early when another process adds outbox rows (``PRAGMA data_version`` moved and the
  newest outbox id changed — other processes' heartbeats do not count);
* **the server answered with an error** (5xx, 429, no answer to a sent bundle): full-jitter
  exponential backoff, ``BACKOFF_BASE_S`` doubling to ``BACKOFF_CAP_S`` (the site config's
  ``sync.backoff_cap_s``), never shorter than the server's ``Retry-After`` (up to
  ``RETRY_AFTER_CAP_S``); new readings do not cut it short — an overloaded EHR is not
  hammered because a clinic is busy, nor is a fleet in lock-step;
* **unreachable** (no connection could be made: refused, no route, DNS): no more drains —
  loading and sealing a bundle only to fail the connect again is waste — but a cheap probe,
  ``HEAD <base>/metadata`` with a ``PROBE_TIMEOUT_S`` timeout, at intervals that grow from
  ``PROBE_BASE_S`` to ``PROBE_CAP_S`` with jitter (each wait is uniform in [c/2, c], so probes
  never bunch up). Any HTTP answer ends the wait and a drain runs at once;
* **the store failed** (a full disk; a stored copy that fails authentication where nothing
  dead-letters it, as in the pull): the round stops where it was, the process stays
  up and backs off as for a server error, with ``last_failure = "store"`` and the store's
  one-line message in its status. Nothing is lost: what was not committed is still pending,
  and resending what the server had applied is harmless. (Letting the error end the process
  made it exit as for a configuration error, which is never restarted.)

Why probes rather than one long backoff: a clinic's link drops for hours (cellular, rural
DSL), and staff expect records to flow within seconds when it is back. With a plain backoff
capped at five minutes the first delivery after an outage would wait up to five minutes; a
probe costs one TCP connect (no database work, no body), so probing every few seconds keeps
the resume time under ``PROBE_CAP_S`` + one drain however long the outage, while a dead
upstream sees at most one connection attempt per ``PROBE_CAP_S / 2`` (≤ 1,440 an hour).
An upstream that answers, even with 503, is reachable: it gets the backoff, not the probes.

The steps after the drain (version-checked updates, the pull, the audit export) each back
off on their own when their exchange fails as a whole (no answer, 5xx, our credentials or
the token endpoint refused, not a FHIR address): jittered, from ``BACKOFF_BASE_S`` to
``BACKOFF_CAP_S``, never before the server's ``Retry-After``, while the drain keeps its pace.
An empty outbox sends nothing, so without that a refusing token endpoint was asked again
every ``interval_s``. Steps waiting out a backoff are in the status (``steps_failing``).
So is a pull pass that got no page, every search refused (``refused``: a 403 for a scope
the box's client lacks, a 400 for ``_sort``) or answered unsorted or unfiltered by
``_lastUpdated`` (``unordered``: pages the pull does not take): no exchange failed, but
nothing came of it, and nothing will until someone acts. A pass in which only some were
refused or unordered goes on with the others and publishes how many (``pull_refused``,
``pull_unordered``), and whether a stream is stuck (``pull_stuck``): counts only, never the
server's words nor the stream's patient. A walk ended by an expired ``next`` link is neither:
the next pass starts it again.
A step held back only because no connection could be made is due again as soon as the link
is seen back (a probe answered, a bundle went through): its backoff, grown to minutes over a
night's outage, would otherwise keep today's appointments from the pull long after the
status reads "online".

Detecting that the link is down costs one failed connect: the drain stops at the first
failed bundle and writes nothing to the items (see ``outbox_delivery``).

"Sync now": staff (the ``/sync`` page, ``sync_now_request.request_sync_now``) write the ``meta`` row
``sync_now``; when its value
changes, any remaining wait — backoff, probe interval or the randomised start — is skipped,
per-item backoffs are cancelled, and a drain runs at once. The check rides on the same
``data_version`` poll (every ``WAKE_POLL_S``), so it costs nothing while nothing is written.

One sender at a time: each round holds the store's sync lease (``sync_agent.lease``), so
``appliance sync once`` run beside this process never sends the same items at the same
moment. It waits for the round under way; meanwhile this process skips its rounds (the
claims still go, to the payer; a "Sync now" is kept for the first round that runs) and says
so (``paused_since``: "Paused" on ``/sync`` and in ``sync status``, a warning in the journal
every ``PAUSED_WARN_S``). A round that finds its last holder died in one (kill -9, a crash),
or ended by an exception while a step was sending, first waits the upstream's request
timeout: a bundle sent then may be with the server still.

At start the first drain is delayed by a random fraction of the interval (≤ 5 s), so a fleet
coming back after an outage does not arrive at once. The process also seals the audit chain
with a signed checkpoint every minute when records were added.

Where the parts live: :class:`SyncLoop` (its rounds, the lease pause, the status it
publishes) and the process entry point here; the loop's waits and each step's backoff in
``sync_agent.pacing``; what wakes a wait in ``sync_agent.wakeups``; the probe, the
round-trip measure and the offline probing in ``sync_agent.link_health``; what a round did
in ``sync_agent.round_result``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
from collections.abc import Callable
from datetime import UTC, datetime

import httpx

from appliance import audit, db, runtime, sdnotify
from appliance.config import UpstreamConfig
from appliance.errors import StoreError, TamperedDataError
from appliance.runtime import ProcessContext
from sync_agent.audit_export import AuditExporter
from sync_agent.claims_submit import ClaimsSubmitter  # claims (issue 8)
from sync_agent.drain_result import DrainResult
from sync_agent.lease import SyncLease, Turn
from sync_agent.link_health import LinkHealth, link_seen
from sync_agent.outbox_delivery import Deliverer
from sync_agent.pacing import Pacing, Step, why_no_page
from sync_agent.pull import Puller
from sync_agent.pull_result import PullResult
from sync_agent.round_result import Round
from sync_agent.status_figures import STEPS
from sync_agent.transport import build_client
from sync_agent.updates import UpdateSender
from sync_agent.upstream import UpstreamError, failure_class
from sync_agent.wakeups import Wake, Wakeups

logger = logging.getLogger(__name__)

CHECKPOINT_INTERVAL_S = 60.0
# Rounds skipped this long (another process holds the sync lease) are logged as a warning, and
# again each time as long: a `sync once` suspended or stuck holds every lane back.
PAUSED_WARN_S = 600.0
# The audit export's share of a round, in seconds: past it the round ends and the next starts
# at once, so an alert raised meanwhile waits this long at most, not a backlog's whole export
# (1,000 bundles to a slow EHR after an outage: many minutes). DESIGN.md: audit is the last lane.
EXPORT_BUDGET_S = 10.0


def _pull_figures(pulled: PullResult) -> dict[str, object]:
    """What a pull pass that ran to its end publishes of its searches that got nothing: how
    many the upstream refused, how many answered pages not sorted or filtered as asked (the
    other streams went on), and whether a stream is stuck at a run of equal timestamps it
    cannot page through. Counts only: the refusal's words and the stream's name (a patient's
    upstream id) stay out of the status."""
    return {
        "pull_refused": pulled.refused,
        "pull_unordered": pulled.unordered,
        "pull_stuck": pulled.stuck > 0,
    }


async def _checkpoints(ctx: ProcessContext) -> None:
    signer = ctx.store.keyring.signing_key
    while not ctx.stopping.is_set():
        try:
            await db.run_sync(ctx.store.connection, audit.checkpoint, signer, now=datetime.now(UTC))
        except Exception:
            logger.exception("audit checkpoint failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.stopping.wait(), CHECKPOINT_INTERVAL_S)


class SyncLoop:
    """Drain, then wait as the drain's outcome says (module docstring), until stopped."""

    def __init__(
        self,
        ctx: ProcessContext,
        client: httpx.AsyncClient,
        upstream: UpstreamConfig,
        *,
        rng: random.Random,
        pacing: Pacing | None = None,
    ) -> None:
        self._ctx = ctx
        self._client = client
        self._upstream = upstream
        self._rng = rng
        self._pacing = pacing or Pacing(
            interval_s=ctx.config.sync.interval_s, backoff_cap_s=ctx.config.sync.backoff_cap_s
        )
        self.deliverer = Deliverer(
            ctx.store, client, max_entries=upstream.max_bundle_entries, rng=rng
        )
        self.lease = SyncLease(ctx.store.path, unsure_s=self.deliverer.unsure_s)
        # Rounds skipped while another process (sync once) holds the lease: since when (loop
        # time), when that was last logged, and a "Sync now" that came meanwhile.
        self._paused_since: float | None = None
        self._paused_told = 0.0
        self._sync_now_kept = False
        self.updates = UpdateSender(
            ctx.store, client, rng=rng, also_known_as=upstream.also_known_as
        )
        self.puller = Puller(ctx.store, client, upstream)
        self.exporter = AuditExporter(
            ctx.store, client, site_id=ctx.config.site.id, batch=upstream.max_bundle_entries
        )
        self.wakeups = Wakeups(ctx)
        self.steps = {name: Step(name) for name in STEPS}
        self.link = LinkHealth(
            ctx, client, upstream, pacing=self._pacing, rng=rng, wakeups=self.wakeups
        )
        # -- claims (issue 8): ready claims to the payer endpoint, its acks back. ------------
        self.claims = ClaimsSubmitter(ctx.store, ctx.config)

    async def run(self) -> None:
        """The loop; returns when the context is stopping."""
        pacing, rng = self._pacing, self._rng
        # Known from the start, so the status says which upstream while the first round (a
        # long catch-up after a restart, say) is under way, not "no upstream configured".
        self._ctx.set_status(upstream=self._upstream.name)
        await self.wakeups.prime()
        # Randomised start: a fleet coming back after an outage does not arrive at once.
        wake = await self.wakeups.wait(rng.uniform(0, min(5.0, pacing.interval_s)), on_work=False)
        failures = 0
        while wake is not Wake.STOP:
            if wake is Wake.SYNC_NOW:
                failures = 0
            try:
                done = await self._round(wake)
                result, more = done.drained, done.more
            except (StoreError, TamperedDataError) as exc:
                # The store failed under us: a full disk, or a stored copy that fails
                # authentication where nothing dead-letters it. Nothing is lost (what was not
                # committed is still pending, and its resend is harmless), and exiting would
                # not help: keep this process up, say why, and try again with backoff.
                failures += 1
                wait = pacing.backoff(failures, rng)
                # Nothing is delivered meanwhile: not "online", whatever the last round was.
                self._ctx.set_status(online=False, last_failure="store", store_error=str(exc))
                self.link.rtt_ok = False  # the next round asks the link again, and says so
                logger.error("sync round stopped by the store: %s; retrying in %.0f s", exc, wait)
                wake = await self.wakeups.wait(wait, on_work=False)
                continue
            if self._ctx.stopping.is_set():
                break  # a stop takes one exchange, not the rest of the queue
            if not result.link_down:
                failures = 0
                wake = await self.wakeups.wait(
                    0.0 if more else pacing.online_wait(rng), on_work=True
                )
            elif result.unreachable:
                wake = await self.link.until_reachable()
                self.link.back = wake is Wake.TIMEOUT  # a probe answered
            else:
                failures += 1
                wait = pacing.refused(failures, rng, result.retry_after_s)
                wake = await self.wakeups.wait(wait, on_work=False)

    async def once(
        self,
        *,
        max_bundles: int = 1000,
        on_bundle: Callable[[DrainResult], None] | None = None,
        on_round: Callable[[Round], None] | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> list[Round]:
        """ "Sync now", once, to the end: what ``appliance sync once`` runs.

        The round "Sync now" starts (every item's retry delay cleared, every step due, the
        pull forced), then rounds at once while the last one got somewhere: edits go
        ``send_once``'s batch a round, an edit whose create went in this round goes in the
        next, a pull of many pages says ``more``. It ends when a round sends nothing more,
        the drain finds the link down, a step fails (it would only wait out its backoff; not
        while a round says ``more``: the audit export cut by its time budget goes on) or
        ``max_bundles`` bundles went. No claims: they go to the payer, not this upstream
        (``appliance claims submit``). ``on_bundle`` and ``on_round`` are told of each.
        Each round waits for the sync lease (the sync process's round under way: ``on_wait``
        is told when a round has to wait for it).
        """
        rounds: list[Round] = []
        wake = Wake.SYNC_NOW
        sent = 0
        while sent < max_bundles and not self._ctx.stopping.is_set():
            done = await self._round(
                wake,
                claims=False,
                max_bundles=max_bundles - sent,
                on_bundle=on_bundle,
                wait=True,
                on_wait=on_wait,
            )
            rounds.append(done)
            if on_round is not None:
                on_round(done)
            sent += done.drained.bundles
            if done.drained.link_down:
                break
            # A failing step would only wait out its backoff; but a round whose time budget
            # cut the audit export (or the pull) short has more to send at once regardless.
            if any(s.failures for s in self.steps.values()) and not done.more:
                break
            if not done.progressed:
                break
            wake = Wake.WORK
        return rounds

    async def _round(
        self,
        wake: Wake,
        *,
        claims: bool = True,
        max_bundles: int = 1000,
        on_bundle: Callable[[DrainResult], None] | None = None,
        wait: bool = False,
        on_wait: Callable[[], None] | None = None,
    ) -> Round:
        """One round, holding the sync lease (module docstring). Another process holds it:
        ``wait`` for it (``on_wait`` is told once), else the round is skipped (``busy``):
        only the claims go (to the payer, not the EHR; ``sync once`` sends none), and a
        "Sync now" is kept for the next round that runs. The last holder died in its round:
        first wait out what it may have had in flight."""
        async with self.lease.round(wait=wait, on_wait=on_wait) as turn:
            if turn is None:
                self._paused(wake)
                if claims:
                    await self.claims.run_once(stop=self._ctx.stopping.is_set)
                return Round(DrainResult(), busy=True)
            if self._paused_since is not None:
                self._paused_since = None
                self._ctx.set_status(paused_since=None)
                if self._sync_now_kept:
                    wake = Wake.SYNC_NOW
            self._sync_now_kept = False
            if turn.wait_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ctx.stopping.wait(), turn.wait_s)
                if self._ctx.stopping.is_set():
                    return Round(DrainResult())
            return await self._round_held(
                wake, turn, claims=claims, max_bundles=max_bundles, on_bundle=on_bundle
            )

    def _paused(self, wake: Wake) -> None:
        """A round skipped: another process (``appliance sync once``) holds the lease."""
        now = asyncio.get_running_loop().time()
        self._sync_now_kept |= wake is Wake.SYNC_NOW
        if self._paused_since is None:
            self._paused_since = self._paused_told = now
            self._ctx.set_status(paused_since=datetime.now(UTC).isoformat(timespec="seconds"))
            logger.info("another process (appliance sync once) is syncing; this one waits")
        elif now - self._paused_told >= PAUSED_WARN_S:
            self._paused_told = now
            logger.warning(
                "sending paused for %.0f min: another process (appliance sync once) holds the "
                "sync lease; is it stuck (suspended, or its terminal paused)?",
                (now - self._paused_since) / 60,
            )

    async def _round_held(
        self,
        wake: Wake,
        turn: Turn,
        *,
        claims: bool,
        max_bundles: int,
        on_bundle: Callable[[DrainResult], None] | None,
    ) -> Round:
        """One round: the outbox drain, claims, then (online) updates, pull and audit export."""
        if wake is Wake.SYNC_NOW:
            await self.deliverer.make_due()
        stopping = self._ctx.stopping.is_set

        def delivering(step: DrainResult) -> None:
            self._delivering(step)
            if on_bundle is not None:
                on_bundle(step)

        with turn.send():
            result = await self.deliverer.drain(
                max_bundles=max_bundles, stop=stopping, on_bundle=delivering
            )
        done = Round(result)
        self._report(result)
        if stopping():
            return done
        reached = None if result.link_down else await self.link.measure_rtt()
        if result.bundles or reached or self.link.back:
            self.link.back = False
            for step in self.steps.values():
                step.link_back()
        # -- claims (issue 8): after the drain, whatever the EHR link; never raises. -------
        if claims:
            await self.claims.run_once(stop=self._ctx.stopping.is_set)
        if result.link_down:
            return done
        # Then, in priority order after the outbox lanes: version-checked updates, pull-down
        # of schedules and home readings, and the audit trail last. None of them raises for
        # the link; each says what happened.
        loop = asyncio.get_running_loop()
        if wake is Wake.SYNC_NOW:
            for step in self.steps.values():
                step.reset()
        stops: list[UpstreamError] = []
        answered = False  # a step got the upstream's answer this round
        updates, pull, export = self.steps.values()
        if updates.due(loop.time()):
            with turn.send():
                done.updated = updated = await self.updates.send_once()
            updates.after(updated.stopped_by, loop.time(), self._pacing, self._rng)
            stops += [updated.stopped_by] if updated.stopped_by else []
            answered |= bool(updated.delivered or updated.conflicts or updated.dead)
        figures: dict[str, object] = {}
        if pull.due(loop.time()):
            done.pulled = pulled = await self.puller.pull_once(force=wake is Wake.SYNC_NOW)
            if pulled.due:
                # A pass not due yet (the puller's own interval) says nothing: it must not
                # clear a failure the last pass that ran found.
                pull.after(
                    pulled.stopped_by,
                    loop.time(),
                    self._pacing,
                    self._rng,
                    refused=why_no_page(pulled),
                )
            if pulled.due and pulled.stopped_by is None:
                figures |= _pull_figures(pulled)
            done.more = bool(pulled.more) and pulled.stopped_by is None
            stops += [pulled.stopped_by] if pulled.stopped_by else []
            answered |= pulled.pages > 0
        if export.due(loop.time()):
            with turn.send():
                done.exported = exported = await self.exporter.drain(
                    stop=stopping, budget_s=EXPORT_BUDGET_S
                )
            done.more |= exported.more
            answered |= exported.bundles > 0
            # An anchor refused for our access or the address paces the step as well: with
            # nothing else to export, it would be asked again every round. Not while the time
            # budget cut the records short: paced, they would wait for the anchor.
            anchor_stop = None if exported.more else exported.anchor_stopped_by
            stopped = exported.stopped_by or anchor_stop
            export.after(stopped, loop.time(), self._pacing, self._rng)
            stops += [stopped] if stopped else []
        figures["steps_failing"] = {
            s.name: str(s.failure) for s in self.steps.values() if s.failures
        }
        if result.bundles == 0 and not result.error:
            seen = link_seen(stops, reached, answered)
            if seen.get("online") is False:
                self.link.rtt_ok = False  # probed each round from now, to see it come back
            figures |= seen
        self._ctx.set_status(**figures)
        return done

    def _delivering(self, step: DrainResult) -> None:
        """A bundle went through in the middle of a drain (a catch-up after an outage may
        take minutes): the link is up now, whatever the last round said."""
        self._ctx.set_status(online=True, unreachable=False, last_failure=None)

    def _report(self, result: DrainResult) -> None:
        if result.bundles or result.link_down or result.error:
            # Only a drain that sent something says anything of the link; an empty outbox
            # leaves it to the round's other exchanges (link_seen).
            self._ctx.set_status(
                online=not result.link_down,
                unreachable=result.unreachable,
                # Only the class of failure: the server's words may quote PHI.
                last_failure=failure_class(result.error),
            )
        self._ctx.set_status(
            upstream=self._upstream.name,
            last_delivered=result.delivered,
            dead=result.dead,
            ambiguous=result.ambiguous,
            batch_size=self.deliverer.batch_size,
            store_error=None,
        )
        if result.delivered or result.dead:
            logger.info(
                "delivered %d (%d already upstream), dead-lettered %d",
                result.delivered,
                result.existing,
                result.dead,
            )


async def _claims_only(ctx: ProcessContext) -> None:
    """A site with no EHR upstream still submits its claims (issue 8) until stopped."""
    claims = ClaimsSubmitter(ctx.store, ctx.config)
    while not ctx.stopping.is_set():
        await claims.run_once(stop=ctx.stopping.is_set)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.stopping.wait(), ctx.config.sync.interval_s)


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
            # Claims go to the payer endpoint, not the EHR: they flow without an upstream.
            await _claims_only(ctx)
            return
        upstream = upstreams[0]
        async with build_client(upstream) as client:
            loop = SyncLoop(ctx, client, upstream, rng=rng)
            sdnotify.ready()
            await loop.run()
    finally:
        checkpoints.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await checkpoints


if __name__ == "__main__":
    sys.exit(runtime.main_entry("sync", main))
