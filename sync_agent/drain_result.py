"""What one outbox drain did: :class:`DrainResult`, the figures it reports (logs, /healthz,
the CLI, tests; no PHI), and how a drain sums up its bundles' figures (:func:`add_step`).

Returned by :class:`sync_agent.outbox_delivery.Deliverer`, read by the sync process.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DrainResult:
    """What one drain did (figures for logs, /healthz and tests; no PHI)."""

    delivered: int = 0
    existing: int = 0
    dead: int = 0
    retry: int = 0
    ambiguous: int = 0
    bundles: int = 0
    error: str | None = None
    # The exchange failed as a whole (transient or ambiguous): nothing was marked.
    link_down: bool = False
    # No connection could be made at all (refused, unreachable, DNS): the link is down.
    unreachable: bool = False
    # The server asked for this pause (429/503 Retry-After).
    retry_after_s: float | None = None
    batch_size: int = 0
    failures: list[str] = field(default_factory=list)


def add_step(total: DrainResult, step: DrainResult) -> None:
    """Add one bundle's (or one round's) ``step`` to a drain's ``total`` (its error, link,
    pause and bundle size: the latest)."""
    total.delivered += step.delivered
    total.existing += step.existing
    total.dead += step.dead
    total.retry += step.retry
    total.ambiguous += step.ambiguous
    total.bundles += step.bundles
    total.batch_size = step.batch_size
    if step.error:
        total.error = step.error
        total.failures.append(step.error)
    total.link_down = step.link_down
    total.unreachable = step.unreachable
    total.retry_after_s = step.retry_after_s
