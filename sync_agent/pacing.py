"""How long the sync loop waits between attempts, and each step after the drain.

:class:`Pacing` holds the loop's waits (online, backoff, probe intervals; the design is in
``sync_agent.process``'s docstring); :class:`Step` is the backoff of one step after the
outbox drain (updates, pull, audit export), which the drain's pace does not set.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import httpx

from sync_agent.outbox_schedule import backoff_s
from sync_agent.pull_result import PullResult
from sync_agent.status_figures import REFUSED, UNORDERED
from sync_agent.upstream import Failure, UpstreamError

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True, slots=True)
class Pacing:
    """How long the loop waits between attempts (``sync_agent.process``'s docstring); tests
    shorten it."""

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


# Failures of a whole exchange, which say nothing about the items: a step stopped by one
# waits out a backoff. (Refusals of single items are handled by the step itself.)
STEP_STOPS = (
    Failure.TRANSIENT,
    Failure.AMBIGUOUS,
    Failure.AUTH,
    Failure.ENDPOINT,
    Failure.TOO_LARGE,  # at one entry: a limit in front of the server, not the items
)


class Step:
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
        if stopped_by is not None and stopped_by.failure in STEP_STOPS:
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


def why_no_page(pulled: PullResult) -> str | None:
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
