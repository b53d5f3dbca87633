"""What one pass of the pull did: :class:`PullResult`, figures for logs and status (no PHI).

:class:`sync_agent.pull.Puller` makes one a pass; the streams, the Patients fetched by id and
the imports each add theirs to it, and the sync process turns it into status figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from appliance.store import Imported, ImportOutcome
from sync_agent.upstream import UpstreamError


@dataclass
class PullResult:
    """What one pass did (figures for logs and status; no PHI)."""

    due: bool = True
    pages: int = 0
    created: int = 0
    updated: int = 0
    current: int = 0
    held: int = 0
    skipped: int = 0  # ours, captured elsewhere, or invalid
    # Of ``skipped``: copies refused by validation (an element R4B does not define...), not
    # stored; audited and logged (type and reason class) once a version. The look-back may
    # meet one again on later passes: counted again, as ``skipped`` always did.
    skipped_invalid: int = 0
    # Answered but not asked for: an Appointment without this site's Location, a reading
    # about another patient, a Patient of another id (a server ignoring a search parameter
    # it does not support, as FHIR servers do by default). Not stored; the cursor passes.
    passed_over: int = 0
    # Patients asked for by id and not in the answer (filtered, a replica lagging): their
    # Appointments name them by the upstream id; asked for again, with a growing wait (a
    # minute doubling to a day), until they come.
    patients_missing: int = 0
    # Copies carrying our identifier of a record the upstream holds under another id (a merge
    # at the EHR?): not stored, audited; a person looks at both records there.
    elsewhere: int = 0
    more: bool = False  # stopped at max_pages: call again soon
    refused: int = 0  # streams whose search the upstream refused (the others went on)
    # Streams whose page the upstream did not sort or filter by _lastUpdated as asked: not
    # taken, the cursor stays (the others went on). Not ``refused``: no scope is missing.
    unordered: int = 0
    # Streams whose walk through a run ended at a next link the server refused (its search
    # expired, or a proxy not passing its paging on): started again from the cursor next pass.
    walks_restarted: int = 0
    stuck: int = 0  # streams that cannot page past a run of equal lastUpdated at their cursor
    error: str | None = None
    link_down: bool = False
    stopped_by: UpstreamError | None = None  # the exchange failure that ended the pass

    def count(self, outcomes: Sequence[Imported]) -> None:
        """Add the outcomes of one import."""
        for item in outcomes:
            if item.outcome is ImportOutcome.CREATED:
                self.created += 1
            elif item.outcome is ImportOutcome.UPDATED:
                self.updated += 1
            elif item.outcome is ImportOutcome.CURRENT:
                self.current += 1
            elif item.outcome is ImportOutcome.HELD:
                self.held += 1
            elif item.outcome is ImportOutcome.ELSEWHERE:
                self.elsewhere += 1
            else:
                self.skipped += 1
                if item.outcome is ImportOutcome.INVALID:
                    self.skipped_invalid += 1
