"""The sync process: drains the outbox to the upstream EHR whenever the link allows.

After each round it waits in one of four ways, decided by how the round ended:

* **online** (the last bundle went through, or nothing was due): it waits ``interval_s``
  (± 20 %, so a fleet that came back together does not stay in step) and
  wakes early when another process adds outbox rows (``PRAGMA data_version`` moved and the
  newest outbox id changed — other processes' heartbeats do not count);
* **the server answered with an error** (5xx, 429, no answer to a sent bundle): full-jitter
  exponential backoff, ``BACKOFF_BASE_S`` doubling to ``BACKOFF_CAP_S`` (the site config's
  ``sync.backoff_cap_s``), never shorter than the
  server's ``Retry-After`` (up to ``RETRY_AFTER_CAP_S``); new readings do not cut it short — an overloaded EHR is not
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

"Sync now": staff (the ``/sync`` page, ``status.request_sync_now``) write the ``meta`` row
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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

import httpx

from appliance import audit, db, runtime, sdnotify
from appliance.config import UpstreamConfig
from appliance.errors import StoreError, TamperedDataError
from appliance.runtime import ProcessContext
from sync_agent.audit_export import AuditExporter, ExportResult
from sync_agent.claims_submit import ClaimsSubmitter  # claims (issue 8)
from sync_agent.drain_result import DrainResult
from sync_agent.lease import SyncLease, Turn
from sync_agent.outbox_delivery import Deliverer
from sync_agent.outbox_schedule import backoff_s
from sync_agent.pull import Puller
from sync_agent.pull_result import PullResult
from sync_agent.status import REFUSED, STEPS, SYNC_NOW_KEY, UNORDERED
from sync_agent.transport import build_client
from sync_agent.updates import UpdateResult, UpdateSender
from sync_agent.upstream import Failure, UpstreamError, failure_class

logger = logging.getLogger(__name__)

CHECKPOINT_INTERVAL_S = 60.0
WAKE_POLL_S = 0.5
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 300.0
PROBE_BASE_S = 0.5
PROBE_CAP_S = 5.0
PROBE_TIMEOUT_S = 2.0
# The longest the whole loop (or one step) waits on a server's ``Retry-After``. A server may
# ask for up to a day (upstream.MAX_RETRY_AFTER_S: each item keeps that much), but one 503
# with ``Retry-After: 86400`` from a maintenance page or a misconfigured proxy must not stop
# every lane, alerts first, for a day: past an hour the loop asks again.
RETRY_AFTER_CAP_S = 3600.0
# While online, the round trip of a ``HEAD metadata`` is measured this often and published
# as ``upstream_rtt_ms`` (the pre-call check shows it: web/precall.py).
RTT_EVERY_S = 60.0
# Rounds skipped this long (another process holds the sync lease) are logged as a warning, and
# again each time as long: a `sync once` suspended or stuck holds every lane back.
PAUSED_WARN_S = 600.0


@dataclass(frozen=True, slots=True)
class Pacing:
    """How long the loop waits between attempts (module docstring); tests shorten it."""

    interval_s: float
    backoff_base_s: float = BACKOFF_BASE_S
    backoff_cap_s: float = BACKOFF_CAP_S
    probe_base_s: float = PROBE_BASE_S
    probe_cap_s: float = PROBE_CAP_S
    probe_timeout_s: float = PROBE_TIMEOUT_S

    def backoff(self, failures: int, rng: random.Random) -> float:
        """Wait after the ``failures``-th failed drain in a row (full jitter)."""
        return backoff_s(failures, rng, base=self.backoff_base_s, cap=self.backoff_cap_s)

    def refused(self, failures: int, rng: random.Random, retry_after_s: float | None) -> float:
        """Wait after the ``failures``-th failure in a row of an exchange the server answered
        or not: the backoff, never shorter than the server's ``Retry-After`` up to
        :data:`RETRY_AFTER_CAP_S`."""
        asked = min(retry_after_s or 0.0, RETRY_AFTER_CAP_S)
        return max(self.backoff(failures, rng), asked)

    def online_wait(self, rng: random.Random) -> float:
        """Wait after a round that went through: ``interval_s`` ± 20 %. Boxes that came back
        together after a shared outage (their probes all answered within a few seconds)
        drift apart round by round instead of polling the EHR in lock-step for ever."""
        return self.interval_s * rng.uniform(0.8, 1.2)

    def probe_wait(self, probes: int, rng: random.Random) -> float:
        """Wait before the next probe, ``probes`` having failed (equal jitter, capped)."""
        ceiling = min(self.probe_cap_s, self.probe_base_s * 2 ** min(probes, 20))
        return rng.uniform(ceiling / 2, ceiling)


class _Step:
    """Backoff of one step after the outbox drain (updates, pull, audit export).

    Only the drain sets the loop's own pace, and with an empty outbox it sends nothing. So a
    step whose exchange keeps failing (the token endpoint refusing us, a 401 for ever, a 503
    with a ``Retry-After`` of an hour) would otherwise be tried again every ``interval_s`` —
    across a fleet, a storm of signed token requests. Each step backs off on its own instead,
    with jitter and never before the server's ``Retry-After``, and the drain goes on at its
    own pace. "Sync now" makes every step due again, and so does the link coming back
    (:meth:`link_back`) for a step held only because no connection could be made: after a
    night's outage the pull of today's appointments goes within seconds of the link, not
    when a backoff grown to minutes runs out.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.failures = 0
        self.not_before = 0.0
        # The class of the failure (a :class:`Failure`, :data:`REFUSED` or
        # :data:`UNORDERED`); never the
        # server's words, which may quote PHI.
        self.failure: str | None = None
        self.cut = False  # held back only for the link (no answer, no Retry-After)

    def due(self, now: float) -> bool:
        return now >= self.not_before

    def after(
        self,
        stopped_by: UpstreamError | None,
        now: float,
        pacing: Pacing,
        rng: random.Random,
        *,
        refused: str | None = None,
    ) -> None:
        """Pace the step by how its pass ended: ``stopped_by`` the failure of a whole
        exchange, or (``refused``, its class) every request of the pass answered with a
        refusal of that request alone (the pull's searches: :data:`REFUSED`, a 403 for a
        scope this box was not granted, a 400 for a parameter the server does not take;
        :data:`UNORDERED`, pages not sorted or filtered as asked), which no exchange failure
        says but which gets nothing now and will get nothing next time either."""
        if stopped_by is not None and stopped_by.failure in _STEP_STOPS:
            # No connection could be made: nothing of the server's side (a read timeout, a
            # reset, a slow search), which keeps its backoff however often the link is seen.
            cut = stopped_by.retry_after_s is None and isinstance(
                stopped_by.__cause__, httpx.ConnectError | httpx.ConnectTimeout
            )
            self._held(str(stopped_by.failure), stopped_by.retry_after_s, cut, now, pacing, rng)
        elif refused is not None:
            self._held(refused, None, False, now, pacing, rng)
        else:
            self.failures, self.not_before, self.failure = 0, 0.0, None

    def _held(
        self,
        failure: str,
        retry_after_s: float | None,
        cut: bool,
        now: float,
        pacing: Pacing,
        rng: random.Random,
    ) -> None:
        self.failures += 1
        self.failure, self.cut = failure, cut
        wait = pacing.refused(self.failures, rng, retry_after_s)
        self.not_before = now + wait
        # Only the class: the server's words may quote PHI.
        logger.warning("sync %s failed (%s); next try in %.0f s", self.name, failure, wait)

    def reset(self) -> None:
        self.failures, self.not_before = 0, 0.0

    def link_back(self) -> None:
        """The upstream answers again: due now if only the link held this step back. (Its
        failures still count: one failing on its own keeps backing off between such
        moments, which come at most once a probe interval.)"""
        if self.cut:
            self.not_before, self.cut = 0.0, False


def _link_seen(
    stops: list[UpstreamError], reached: bool | None, answered: bool = False
) -> dict[str, object]:
    """What a round whose drain sent nothing saw of the link: the steps after the drain
    found it down (a pulled cable with an empty outbox), or the round-trip probe answered
    or not; ``answered``: a step got the upstream's answer this round (a pull's page), which
    says the link is up whatever the probe said (a proxy refusing ``HEAD``, a probe timing
    out on a slow link). Nothing new: no figures (the last ones stand)."""
    cut = [e for e in stops if e.failure in (Failure.TRANSIENT, Failure.AMBIGUOUS)]
    if not cut and (answered or reached):
        return {"online": True, "unreachable": False, "last_failure": None}
    if cut or reached is False:
        no_connection = reached is False or any(
            isinstance(e.__cause__, httpx.ConnectError | httpx.ConnectTimeout) for e in cut
        )
        return {
            "online": False,
            "unreachable": no_connection,
            "last_failure": str(cut[0].failure) if cut else str(Failure.TRANSIENT),
        }
    return {}


def _why_no_page(pulled: PullResult) -> str | None:
    """Why no search of a pull pass that ran to its end got a page, or None: :data:`REFUSED`
    when one was refused (a token without the Appointment scope, a server that does not take
    ``_sort=_lastUpdated`` strictly), else :data:`UNORDERED` when one answered pages not
    sorted or filtered by ``_lastUpdated`` as asked. It fails the same way on every pass until
    someone acts at the EHR or in the site config, so the step counts as failing (and backs
    off). A walk ended by an expired next link is neither: the next pass starts it again."""
    if pulled.stopped_by is not None or pulled.pages > 0:
        return None
    if pulled.refused > 0:
        return REFUSED
    return UNORDERED if pulled.unordered > 0 else None


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


# Failures of a whole exchange, which say nothing about the items: a step stopped by one
# waits out a backoff. (Refusals of single items are handled by the step itself.)
_STEP_STOPS = (
    Failure.TRANSIENT,
    Failure.AMBIGUOUS,
    Failure.AUTH,
    Failure.ENDPOINT,
    Failure.TOO_LARGE,  # at one entry: a limit in front of the server, not the items
)


@dataclass(slots=True)
class Round:
    """What one round did: the loop paces itself by it, ``appliance sync once`` reports it.
    A step left out (not due, or the drain found the link down) is None."""

    drained: DrainResult
    more: bool = False  # the pull has more to fetch at once
    updated: UpdateResult | None = None
    pulled: PullResult | None = None
    exported: ExportResult | None = None
    busy: bool = False  # another process (``appliance sync once``) held the sync lease

    @property
    def progressed(self) -> bool:
        """Something went or came: another round at once may find more due (an edit whose
        create went in this one, the next batch of edits, the pull's next pages). The audit
        export is not counted: it drains all there is, its own records included."""
        updated = self.updated
        return bool(
            self.drained.bundles
            or self.drained.dead
            or self.more
            or (updated is not None and (updated.delivered or updated.conflicts or updated.dead))
        )


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


async def probe(client: httpx.AsyncClient, timeout_s: float) -> bool:
    """Whether the upstream answers at all (``HEAD metadata``; any status counts).

    Sent without the client's authentication: the CapabilityStatement is public, a 401 is an
    answer too, and a probe must not fetch tokens from a token endpoint while offline. A TLS
    refusal (``UpstreamError`` from the transport) is an answer as well: the drain that
    follows reports it as an authentication problem and backs off. So is a connection made
    whose answer is slow or odd (a server building its CapabilityStatement on each request, a
    satellite link): only a connection that could not be made is "unreachable" — else such
    an upstream would never be sent a bundle, which allows far longer than the probe.
    """
    # As long to connect as a bundle gets (a satellite link's TCP and TLS take seconds); the
    # answer itself gets ``timeout_s``, and a slow one counts as reached (below).
    connect = max(timeout_s, client.timeout.connect or timeout_s)
    try:
        await client.head(
            "metadata", timeout=httpx.Timeout(timeout_s, connect=connect), auth=httpx.Auth()
        )
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.ProxyError, httpx.PoolTimeout):
        return False
    except httpx.HTTPError:
        return True  # connected: the drain finds out the rest, with its own timeouts
    except UpstreamError as exc:
        return not isinstance(exc.__cause__, httpx.TransportError)
    return True


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
        self.steps = {name: _Step(name) for name in STEPS}
        self.probes = 0
        self._rtt_at: float | None = None
        self._rtt_ok = True
        self._link_back = False  # a probe answered after the drain found no connection
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
                self._rtt_ok = False  # the next round asks the link again, and says so
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
                wake = await self._until_reachable()
                self._link_back = wake is Wake.TIMEOUT  # a probe answered
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
        the drain finds the link down, a step fails (it would only wait out its backoff) or
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
            if done.drained.link_down or any(s.failures for s in self.steps.values()):
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
        reached = None if result.link_down else await self._measure_rtt()
        if result.bundles or reached or self._link_back:
            self._link_back = False
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
                    refused=_why_no_page(pulled),
                )
            if pulled.due and pulled.stopped_by is None:
                figures |= _pull_figures(pulled)
            done.more = bool(pulled.more) and pulled.stopped_by is None
            stops += [pulled.stopped_by] if pulled.stopped_by else []
            answered |= pulled.pages > 0
        if export.due(loop.time()):
            with turn.send():
                done.exported = exported = await self.exporter.drain(stop=stopping)
            answered |= exported.bundles > 0
            # An anchor refused for our access or the address paces the step as well: with
            # nothing else to export, it would be asked again every round.
            stopped = exported.stopped_by or exported.anchor_stopped_by
            export.after(stopped, loop.time(), self._pacing, self._rng)
            stops += [stopped] if stopped else []
        figures["steps_failing"] = {
            s.name: str(s.failure) for s in self.steps.values() if s.failures
        }
        if result.bundles == 0 and not result.error:
            seen = _link_seen(stops, reached, answered)
            if seen.get("online") is False:
                self._rtt_ok = False  # probed each round from now, to see it come back
            figures |= seen
        self._ctx.set_status(**figures)
        return done

    async def _measure_rtt(self) -> bool | None:
        """Time one ``HEAD metadata`` (at most every :data:`RTT_EVERY_S`); no PHI, no auth.

        Whether the upstream answered (None: not asked this round). After one that did not,
        asked every round but never more often than the offline probes (``probe_cap_s / 2``,
        however short ``interval_s``), so the status says "online" again soon after the link
        is back."""
        loop = asyncio.get_running_loop()
        every = RTT_EVERY_S if self._rtt_ok else self._pacing.probe_cap_s / 2
        if self._rtt_at is not None and loop.time() - self._rtt_at < every:
            return None
        self._rtt_at = start = loop.time()
        self._rtt_ok = await probe(self._client, self._pacing.probe_timeout_s)
        if self._rtt_ok:
            self._ctx.set_status(upstream_rtt_ms=round((loop.time() - start) * 1000, 1))
        return self._rtt_ok

    async def _until_reachable(self) -> Wake:
        logger.warning(
            "upstream %s unreachable; probing every %.0f s at most",
            self._upstream.name,
            self._pacing.probe_cap_s,
        )
        loop = asyncio.get_running_loop()
        since = loop.time()
        failed = 0
        while True:
            wake = await self.wakeups.wait(
                self._pacing.probe_wait(failed, self._rng), on_work=False
            )
            if wake is not Wake.TIMEOUT:
                return wake
            self.probes += 1
            if await probe(self._client, self._pacing.probe_timeout_s):
                logger.info(
                    "upstream %s answers again after %.0f s",
                    self._upstream.name,
                    loop.time() - since,
                )
                return Wake.TIMEOUT
            failed += 1

    def _delivering(self, step: DrainResult) -> None:
        """A bundle went through in the middle of a drain (a catch-up after an outage may
        take minutes): the link is up now, whatever the last round said."""
        self._ctx.set_status(online=True, unreachable=False, last_failure=None)

    def _report(self, result: DrainResult) -> None:
        if result.bundles or result.link_down or result.error:
            # Only a drain that sent something says anything of the link; an empty outbox
            # leaves it to the round's other exchanges (_link_seen).
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
