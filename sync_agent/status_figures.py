"""The figures of the sync's health, as ``appliance sync status``, the ``/sync`` page and
``/metrics`` show them (:func:`sync_agent.status.read_status` reads them from the store).

What the sync process publishes in its heartbeat (:class:`ProcessStatus`: online, the
steps failing and the class of their failure, the pull's refused and unordered searches),
the outbox lanes, the claims waiting for the payer, dead letters without their message, and
:class:`SyncStatus`, everything the status views show, with what each view derives from it
(online, waiting, the lanes staff read, paused for how long) so the three never disagree.
The words of a step's failure (``STEPS``, ``REFUSED``, ``UNORDERED``) are shared with the
sync process that writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from appliance.runtime import HEARTBEAT_STALE_S
from appliance.store import Lane
from sync_agent.audit_export_state import ExportState
from sync_agent.outbox_failing import FailingItems
from sync_agent.pull_twins import Twin

STEPS = ("updates", "pull", "audit export")
"""The steps after the outbox drain, each paced on its own (``steps_failing`` names them)."""
REFUSED = "refused"
"""The failure of a step each of whose requests the upstream refused (a pull pass with every
search answered 403 or 400), in ``steps_failing`` beside the classes of
:class:`sync_agent.upstream.Failure`."""
UNORDERED = "unordered"
"""The failure of a pull pass that got no page, its searches answered with pages not sorted or
filtered by ``_lastUpdated`` as asked (not taken: the cursors stay), in ``steps_failing``."""


# Lanes no outbox row is ever put in, so their outbox counts are always 0: claims have their
# own queue and payer endpoint (docs/adr/0006-claims.md, sync_agent/claims_submit.py), the
# audit trail its own export with its own cursor (sync_agent/audit_export.py). ``lanes``
# still names them (scripts read the JSON of ``sync status`` and
# ``appliance_outbox_pending{lane}``); what staff read shows what really waits there instead:
# :attr:`SyncStatus.claims` and the export's lag.
NO_OUTBOX_ROWS = frozenset({Lane.CLAIMS.name.lower(), Lane.AUDIT.name.lower()})


@dataclass(frozen=True, slots=True)
class ClaimsWaiting:
    """The claims queue (``claims.status``), which the sync process submits to the payer:
    counts and an age only, no PHI."""

    ready: int  # ready to submit (a batch on its way included)
    oldest_ready_age_s: float | None  # since the one waiting longest became ready
    in_review: int  # sent without a clear answer: a person decides, nothing is resent


NO_CLAIMS = ClaimsWaiting(0, None, 0)
NO_FAILING = FailingItems(0)


@dataclass(frozen=True, slots=True)
class LaneStatus:
    """One outbox lane: items waiting, the oldest one's age, and refused items."""

    name: str
    waiting: int
    oldest_age_s: float | None
    dead: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A refused outbox item, without its (sealed) message."""

    outbox_id: int
    lane: str
    type: str
    attempts: int


@dataclass(frozen=True, slots=True)
class ProcessStatus:
    """The sync process's heartbeat: when it last beat and the figures it published."""

    beat_at: datetime
    age_s: float
    figures: dict[str, object]

    @property
    def fresh(self) -> bool:
        """The process is alive (its heartbeat is recent; one far in the future, from a
        clock set back since, says nothing either)."""
        return -HEARTBEAT_STALE_S <= self.age_s <= HEARTBEAT_STALE_S

    @property
    def no_upstream(self) -> bool:
        """It said it has no upstream configured (records wait; claims still go)."""
        return "upstream" in self.figures and self.figures["upstream"] is None

    @property
    def starting(self) -> bool:
        """Alive, and its first round not over yet (nothing known of the link; its first
        heartbeat may come before it has said anything at all)."""
        return self.fresh and "online" not in self.figures and not self.no_upstream

    @property
    def unreachable(self) -> bool:
        """Its last attempt made no connection at all (the clinic's link, DNS, a firewall),
        as opposed to an upstream that answered with an error."""
        return self.figures.get("unreachable") is True

    @property
    def online(self) -> bool:
        """Alive, with an upstream, and its last drain reached it."""
        return self.fresh and self.figures.get("online") is True

    @property
    def upstream(self) -> str | None:
        """The upstream's configured name (None: none configured)."""
        value = self.figures.get("upstream")
        return None if value is None else str(value)

    @property
    def steps_failing(self) -> dict[str, str]:
        """Steps after the outbox drain waiting out a backoff → the class of their failure
        (updates, pull, audit export: the drain may be online while one of them is refused)."""
        value = self.figures.get("steps_failing")
        if not isinstance(value, dict):
            return {}
        return {str(k): str(v) for k, v in value.items()}

    @property
    def last_failure(self) -> str | None:
        """The class of the last failure (transient, ambiguous…), never the server's words."""
        value = self.figures.get("last_failure")
        return None if value is None else str(value)

    @property
    def pull_refused(self) -> int:
        """Searches the upstream refused in the last pull pass that ran to its end (a 4xx to
        that one search; the others went on)."""
        value = self.figures.get("pull_refused")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    @property
    def pull_unordered(self) -> int:
        """Searches of the last pull pass that ran to its end whose page the upstream did not
        sort or filter by ``_lastUpdated`` as asked (not taken; the others went on)."""
        value = self.figures.get("pull_unordered")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    @property
    def pull_stuck(self) -> bool:
        """A stream of the last pull pass cannot page past a run of equal timestamps."""
        return self.figures.get("pull_stuck") is True


@dataclass(frozen=True, slots=True)
class SyncStatus:
    """Everything the status views show."""

    process: ProcessStatus | None
    lanes: tuple[LaneStatus, ...]
    last_success: datetime | None
    dead_total: int
    dead_letters: tuple[DeadLetter, ...]
    export: ExportState
    sync_now: str | None
    counts: tuple[tuple[int, str, int], ...]  # (lane, state, count): the raw outbox table
    reviews_open: int = 0  # local edits the upstream's changes overtook, waiting for a nurse
    # Upstream records the pull left out: they carry the identifier of a record held here
    # under another upstream id (a merge at the EHR, or a copy), newest last.
    twins: tuple[Twin, ...] = ()
    claims: ClaimsWaiting = NO_CLAIMS
    # Age of the oldest audit record not exported yet (None: nothing waiting).
    export_oldest_age_s: float | None = None
    # Items the upstream keeps answering with an error (our access refused, a 5xx of their
    # own, or whole bundles failed for them): sent again for as long as it lasts, never
    # dead-lettered, so this is where staff see them.
    failing: FailingItems = NO_FAILING

    @property
    def online(self) -> bool:
        """Whether the box currently reaches its upstream."""
        return self.process is not None and self.process.online

    @property
    def waiting(self) -> int:
        """Items waiting in every lane."""
        return sum(lane.waiting for lane in self.lanes)

    @property
    def outbox_lanes(self) -> tuple[LaneStatus, ...]:
        """The lanes outbox rows are put in (alerts, clinical), for the tables staff read;
        one of the others shows only if something is there after all."""
        return tuple(
            lane
            for lane in self.lanes
            if lane.name not in NO_OUTBOX_ROWS or lane.waiting or lane.dead
        )

    @property
    def steps_failing(self) -> dict[str, str]:
        """Steps after the drain the sync process says are failing, while it is alive (a
        stale heartbeat's say nothing of now)."""
        process = self.process
        return process.steps_failing if process is not None and process.fresh else {}

    @property
    def pull_refused(self) -> int:
        """Searches refused in the sync process's last pull pass, while it is alive."""
        process = self.process
        return process.pull_refused if process is not None and process.fresh else 0

    @property
    def pull_unordered(self) -> int:
        """Searches answered unsorted or unfiltered in the sync process's last pull pass,
        while it is alive."""
        process = self.process
        return process.pull_unordered if process is not None and process.fresh else 0

    @property
    def paused_for_s(self) -> float | None:
        """How long the sync process has skipped its rounds, another process (``appliance
        sync once``) holding the sync lease (None: it is not, or not alive)."""
        process = self.process
        if process is None or not process.fresh:
            return None
        since = parse_time(process.figures.get("paused_since"))
        if since is None:
            return None
        return max(0.0, (process.beat_at - since).total_seconds() + process.age_s)

    @property
    def pull_stuck(self) -> bool:
        """A pull stream stuck in the sync process's last pass, while it is alive."""
        process = self.process
        return process is not None and process.fresh and process.pull_stuck


def lane_name(lane: int) -> str:
    """``alerts``, ``claims``… (the number itself for a lane this release does not know)."""
    try:
        return Lane(lane).name.lower()
    except ValueError:
        return str(lane)


def parse_time(text: object) -> datetime | None:
    """An aware ISO time, or None for anything else (a heartbeat row is anyone's to write)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None
