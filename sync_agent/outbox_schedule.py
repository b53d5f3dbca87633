"""When an outbox row is due: the retry horizon, the due test in SQL, and the backoff.

A row waits out a retry time (``next_attempt_at``), set from :func:`backoff_s` after an
answer that says nothing against the item, or from a server's ``Retry-After``. None is ever
further ahead than :data:`RETRY_HORIZON`: a time beyond it was left by a clock set back, and
the row is due now (:data:`DUE_SQL`, with :func:`due_bounds`). Shared by delivery
(:mod:`sync_agent.outbox_delivery`), updates (:mod:`sync_agent.updates`) and the status.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from appliance import fhir

MAX_BACKOFF_S = 300.0
# No item is ever scheduled further ahead than this (backoffs stop at MAX_BACKOFF_S, a
# server's Retry-After is capped here). A stored retry time beyond it can only come from a
# clock that was ahead and has been set back (a box without a battery-backed clock booting
# before NTP, then corrected): such an item is due now, not in years.
RETRY_HORIZON = timedelta(days=1)
# An outbox row (alias ``o``) is due: no retry time, one passed, or one beyond the horizon.
# Its two parameters are :func:`due_bounds`.
DUE_SQL = "(o.next_attempt_at IS NULL OR o.next_attempt_at <= ? OR o.next_attempt_at > ?)"


def backoff_s(
    attempts: int, rng: random.Random, *, base: float = 2.0, cap: float = MAX_BACKOFF_S
) -> float:
    """Full-jitter exponential backoff: uniform(0, min(cap, base * 2**attempts))."""
    return rng.uniform(0, min(cap, base * (2 ** min(attempts, 20))))


def iso(moment: datetime) -> str:
    """``moment`` as stored in the outbox's time columns (UTC text)."""
    return fhir.utc_text(moment)


def due_bounds(now: str) -> tuple[str, str]:
    """``now`` and the retry horizon after it: a row is due unless its time is in between."""
    moment = datetime.fromisoformat(now.removesuffix("Z")).replace(tzinfo=UTC)
    return now, iso(moment + RETRY_HORIZON)
