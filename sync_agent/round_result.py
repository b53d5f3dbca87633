"""What one round of the sync loop did (:class:`Round`).

Returned by ``SyncLoop`` rounds (``sync_agent.process``): the loop paces itself by it,
``appliance sync once`` reports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sync_agent.audit_export import ExportResult
from sync_agent.drain_result import DrainResult
from sync_agent.pull_result import PullResult
from sync_agent.updates import UpdateResult


@dataclass(slots=True)
class Round:
    """What one round did: the loop paces itself by it, ``appliance sync once`` reports it.
    A step left out (not due, or the drain found the link down) is None."""

    drained: DrainResult
    more: bool = False  # the pull has more to fetch at once, or the export was cut short
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
