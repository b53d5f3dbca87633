"""Fleet monitoring: ``/healthz`` (JSON liveness) and ``/metrics`` (Prometheus text).

Both read the same non-PHI figures from the database at request time: each process's
heartbeat (written by :mod:`appliance.runtime`; the store is the bus), the outbox backlog
and the audit chain's length. ``/metrics`` adds the sync health of
:func:`sync_agent.status.read_status` (the figures of ``appliance sync status`` and the
``/sync`` page): per-lane oldest age, last success, the sync process online, steps failing,
the claims queue, audit export lag. Neither needs a login; neither shows anything about a
patient. ``/metrics`` uses a registry of its own per app, never prometheus_client's global
default one, so two apps in one process (tests) never share or collide on metrics.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography import x509
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from quart import Blueprint, Response, current_app
from quart.blueprints import BlueprintSetupState
from quart.typing import ResponseReturnValue

from appliance import db
from appliance.errors import StoreError
from appliance.runtime import HEARTBEAT_STALE_S
from appliance.store import Lane
from sync_agent.status import read_status
from sync_agent.status_figures import STEPS, SyncStatus, parse_time
from web.app import AppState, app_state

bp = Blueprint("health", __name__)

EXPECTED_PROCESSES = ("web", "devices", "sync")


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One process's last heartbeat as /healthz reports it."""

    pid: int | None
    age_s: float | None
    status: str  # ok | stale | missing


@dataclass(frozen=True, slots=True)
class Fleet:
    """What a fleet's monitoring watches besides sync (issue 9): no PHI, ids only."""

    # (severity, state) -> count of alerts not resolved
    alerts: dict[tuple[str, str], int]
    # device id -> (setting, seconds since last seen; None when never seen)
    devices: dict[str, tuple[str, float | None]]
    # audit records written after the newest signed checkpoint; its age (None: none yet)
    audit_after_checkpoint: int
    checkpoint_age_s: float | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The figures both endpoints report, read in one go."""

    processes: dict[str, Heartbeat]
    database: str  # "ok" or what went wrong
    pending_by_lane: dict[str, int] = field(default_factory=dict)
    dead_by_lane: dict[str, int] = field(default_factory=dict)
    oldest_pending_age_s: float | None = None
    audit_records: int = 0
    sync: SyncStatus | None = None
    fleet: Fleet | None = None

    @property
    def ok(self) -> bool:
        """Every expected process is beating and the database answers.

        Dead letters are reported but do not fail the check: they need a person, not a
        restart, and a failing check stops a rolling update.
        """
        return self.database == "ok" and all(b.status == "ok" for b in self.processes.values())


def _heartbeats(conn: sqlite3.Connection, now: datetime) -> dict[str, Heartbeat]:
    found: dict[str, Heartbeat] = {}
    rows = conn.execute("SELECT process, pid, beat_at FROM heartbeats ORDER BY process")
    for process, pid, beat_at in rows.fetchall():
        moment = parse_time(beat_at)
        if moment is None:  # not a time this appliance writes: nothing known of it
            found[str(process)] = Heartbeat(_whole(pid), None, "stale")
            continue
        age = (now - moment).total_seconds()
        # A beat far ahead of now (a clock set back since) says nothing either.
        status = "ok" if -HEARTBEAT_STALE_S <= age <= HEARTBEAT_STALE_S else "stale"
        found[str(process)] = Heartbeat(_whole(pid), round(age, 3), status)
    for process in EXPECTED_PROCESSES:
        found.setdefault(process, Heartbeat(None, None, "missing"))
    return found


def _whole(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_snapshot(conn: sqlite3.Connection, now: datetime) -> Snapshot:
    """Read every figure (on the database thread); a database error becomes its text."""
    try:
        processes = _heartbeats(conn, now)
        sync = read_status(conn, now)  # waiting and dead letters per lane, as /sync shows them
        pending = {lane.name: lane.waiting for lane in sync.lanes if lane.waiting}
        dead = {lane.name: lane.dead for lane in sync.lanes if lane.dead}
        ages = [lane.oldest_age_s for lane in sync.lanes if lane.oldest_age_s is not None]
        oldest_age = max(ages, default=None)  # the oldest waiting item of any lane
        # Audit ids are the chain positions 1..n, so the newest id is the count (O(1)).
        audit_records = int(conn.execute("SELECT coalesce(max(id), 0) FROM audit").fetchone()[0])
        fleet = _fleet(conn, now, audit_records)
    except (sqlite3.Error, StoreError, ValueError) as exc:
        return Snapshot({p: Heartbeat(None, None, "missing") for p in EXPECTED_PROCESSES}, str(exc))
    return Snapshot(processes, "ok", pending, dead, oldest_age, audit_records, sync, fleet)


def _age(now: datetime, stamp: str | None) -> float | None:
    if stamp is None:
        return None
    return round(max(0.0, (now - datetime.fromisoformat(stamp)).total_seconds()), 3)


def _fleet(conn: sqlite3.Connection, now: datetime, audit_records: int) -> Fleet:
    alerts = {
        (str(severity), str(state)): int(count)
        for severity, state, count in conn.execute(
            "SELECT severity, state, count(*) FROM alerts WHERE state != 'resolved' "
            "GROUP BY severity, state"
        ).fetchall()
    }
    devices = {
        str(device_id): (str(setting), _age(now, last_seen))
        for device_id, setting, last_seen in conn.execute(
            "SELECT id, setting, last_seen FROM devices WHERE retired_at IS NULL"
        ).fetchall()
    }
    checkpoint = conn.execute(
        "SELECT audit_id, ts FROM audit_checkpoints ORDER BY id DESC LIMIT 1"
    ).fetchone()
    if checkpoint is None:
        return Fleet(alerts, devices, audit_records, None)
    return Fleet(alerts, devices, audit_records - int(checkpoint[0]), _age(now, checkpoint[1]))


def _disk_free_bytes(path: Path) -> float | None:
    try:
        return float(shutil.disk_usage(path).free)
    except OSError:
        return None


def _certificate_days_left(path: Path | None, now: datetime) -> float | None:
    """Days until the web certificate expires (None: no certificate configured/readable)."""
    if path is None:
        return None
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return round((cert.not_valid_after_utc - now).total_seconds() / 86400, 3)


async def _snapshot(state: AppState) -> Snapshot:
    return await db.run_sync(state.store.connection, read_snapshot, state.clock())


def _host_metrics(state: AppState) -> Iterator[GaugeMetricFamily]:
    """Disk free under the data directory and the web certificate's days left."""
    db_file = state.store.path
    free = None if db_file is None else _disk_free_bytes(db_file.parent)
    disk = GaugeMetricFamily(
        "appliance_disk_free_bytes", "Free bytes on the file system of the database."
    )
    if free is not None:
        disk.add_metric([], free)
    yield disk
    days = _certificate_days_left(state.config.web.tls_cert, state.clock())
    cert = GaugeMetricFamily(
        "appliance_certificate_days_left",
        "Days until the web TLS certificate expires (absent without one).",
    )
    if days is not None:
        cert.add_metric([], days)
    yield cert


class SnapshotCollector(Collector):
    """Turns the snapshot taken for this scrape into Prometheus gauges."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.host: list[GaugeMetricFamily] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The gauges of the latest snapshot (none before the first scrape)."""
        snap = self.snapshot
        if snap is None:
            return
        # Every lane, as ever: the "claims" and "audit" lanes hold no outbox rows (their own
        # gauges are appliance_claims_* and appliance_audit_export_*), and stay at 0.
        pending = GaugeMetricFamily(
            "appliance_outbox_pending", "Outbox items waiting for delivery.", labels=["lane"]
        )
        dead = GaugeMetricFamily(
            "appliance_outbox_dead",
            "Outbox items refused for good (dead letters).",
            labels=["lane"],
        )
        for lane in Lane:
            name = lane.name.lower()
            pending.add_metric([name], snap.pending_by_lane.get(name, 0))
            dead.add_metric([name], snap.dead_by_lane.get(name, 0))
        yield pending
        yield dead
        oldest = GaugeMetricFamily(
            "appliance_outbox_oldest_pending_age_seconds",
            "Age of the oldest pending outbox item (0 when none).",
        )
        oldest.add_metric([], snap.oldest_pending_age_s or 0.0)
        yield oldest
        yield GaugeMetricFamily(
            "appliance_audit_records", "Records in the audit chain.", value=snap.audit_records
        )
        age = GaugeMetricFamily(
            "appliance_heartbeat_age_seconds",
            "Seconds since each process's last heartbeat (absent when it never beat).",
            labels=["process"],
        )
        up = GaugeMetricFamily(
            "appliance_process_up", "1 when the process's heartbeat is fresh.", labels=["process"]
        )
        for process, beat in snap.processes.items():
            if beat.age_s is not None:
                age.add_metric([process], beat.age_s)
            up.add_metric([process], 1.0 if beat.status == "ok" else 0.0)
        yield age
        yield up
        if snap.sync is not None:
            yield from _sync_metrics(snap.sync)
        if snap.fleet is not None:
            yield from _fleet_metrics(snap.fleet)
        yield from self.host
        yield GaugeMetricFamily(
            "appliance_database_up",
            "1 when the database answers.",
            value=1.0 if snap.database == "ok" else 0.0,
        )


def _fleet_metrics(fleet: Fleet) -> Iterator[GaugeMetricFamily]:
    alerts = GaugeMetricFamily(
        "appliance_alerts",
        "Remote-monitoring alerts not resolved, by severity and state.",
        labels=["severity", "state"],
    )
    for severity in ("critical", "high", "medium", "low"):
        for state in ("open", "acknowledged", "snoozed"):
            alerts.add_metric([severity, state], fleet.alerts.get((severity, state), 0))
    for (severity, state), count in fleet.alerts.items():
        if severity not in ("critical", "high", "medium", "low"):
            alerts.add_metric([severity, state], count)
    yield alerts
    seen = GaugeMetricFamily(
        "appliance_device_last_seen_age_seconds",
        "Seconds since each registered device was last heard from (absent: never).",
        labels=["device", "setting"],
    )
    for device_id, (setting, seen_s) in sorted(fleet.devices.items()):
        if seen_s is not None:
            seen.add_metric([device_id, setting], seen_s)
    yield seen
    yield GaugeMetricFamily(
        "appliance_devices_registered",
        "Registered (not retired) devices.",
        value=len(fleet.devices),
    )
    yield GaugeMetricFamily(
        "appliance_audit_records_after_checkpoint",
        "Audit records written after the newest signed checkpoint.",
        value=fleet.audit_after_checkpoint,
    )
    age = GaugeMetricFamily(
        "appliance_audit_checkpoint_age_seconds",
        "Age of the newest signed audit checkpoint (absent before the first).",
    )
    if fleet.checkpoint_age_s is not None:
        age.add_metric([], fleet.checkpoint_age_s)
    yield age


def _sync_metrics(sync: SyncStatus) -> Iterator[GaugeMetricFamily]:
    """The sync health gauges (DESIGN.md, "Sync": what staff see, for the fleet too)."""
    oldest = GaugeMetricFamily(
        "appliance_outbox_lane_oldest_pending_age_seconds",
        "Age of the oldest item waiting in each lane (0 when none).",
        labels=["lane"],
    )
    for lane in sync.lanes:
        oldest.add_metric([lane.name], lane.oldest_age_s or 0.0)
    yield oldest
    yield GaugeMetricFamily(
        "appliance_outbox_dead_letters",
        "Outbox items refused for good, all lanes.",
        value=sync.dead_total,
    )
    yield GaugeMetricFamily(
        "appliance_outbox_failing_items",
        "Outbox items the upstream keeps answering with an error (tried 3 times or more; "
        "sent again, never dead-lettered).",
        value=sync.failing.count,
    )
    yield GaugeMetricFamily(
        "appliance_sync_paused_seconds",
        "How long the sync process has skipped its rounds because another process "
        "(appliance sync once) holds the sync lease; 0 when it is not.",
        value=sync.paused_for_s or 0.0,
    )
    yield GaugeMetricFamily(
        "appliance_sync_reviews_open",
        "Local edits the EHR's changes overtook, waiting for a nurse's decision.",
        value=sync.reviews_open,
    )
    last = GaugeMetricFamily(
        "appliance_sync_last_success_timestamp_seconds",
        "Unix time of the newest successful delivery (absent before the first).",
    )
    if sync.last_success is not None:
        last.add_metric([], sync.last_success.timestamp())
    yield last
    yield GaugeMetricFamily(
        "appliance_sync_online",
        "1 when the sync process is alive and its last drain reached the upstream.",
        value=1.0 if sync.online else 0.0,
    )
    failing = GaugeMetricFamily(
        "appliance_sync_step_failing",
        "1 while a step after the outbox drain (updates, pull, audit export) fails and backs "
        "off: its exchange failed as a whole, or no search of a pull pass got a page (refused, "
        "or answered unsorted or unfiltered by _lastUpdated).",
        labels=["step"],
    )
    for step in dict.fromkeys([*STEPS, *sync.steps_failing]):
        failing.add_metric([step], 1.0 if step in sync.steps_failing else 0.0)
    yield failing
    yield GaugeMetricFamily(
        "appliance_sync_pull_searches_refused",
        "Searches the upstream refused in the last pull pass (the others went on).",
        value=sync.pull_refused,
    )
    yield GaugeMetricFamily(
        "appliance_sync_pull_searches_unordered",
        "Searches of the last pull pass whose page the upstream did not sort or filter by "
        "_lastUpdated as asked (not taken, the cursor stays; the others went on).",
        value=sync.pull_unordered,
    )
    yield GaugeMetricFamily(
        "appliance_sync_pull_stuck",
        "1 when a pull search cannot page past a run of records with one lastUpdated.",
        value=1.0 if sync.pull_stuck else 0.0,
    )
    yield GaugeMetricFamily(
        "appliance_audit_export_lag_records",
        "Audit records not yet exported upstream.",
        value=sync.export.lag,
    )
    export_age = GaugeMetricFamily(
        "appliance_audit_export_oldest_age_seconds",
        "Age of the oldest audit record not yet exported upstream (0 when none).",
    )
    export_age.add_metric([], sync.export_oldest_age_s or 0.0)
    yield export_age
    # The claims queue: claims never enter the outbox, so appliance_outbox_pending{lane=
    # "claims"} stays 0 whatever waits for the payer.
    yield GaugeMetricFamily(
        "appliance_claims_ready",
        "Claims ready to submit to the payer (their own queue, not the outbox).",
        value=sync.claims.ready,
    )
    ready_age = GaugeMetricFamily(
        "appliance_claims_oldest_ready_age_seconds",
        "Seconds since the claim ready longest became ready (0 when none).",
    )
    ready_age.add_metric([], sync.claims.oldest_ready_age_s or 0.0)
    yield ready_age
    yield GaugeMetricFamily(
        "appliance_claims_in_review",
        "Claims sent without a clear answer, waiting for a person's decision.",
        value=sync.claims.in_review,
    )
    yield GaugeMetricFamily(
        "appliance_audit_export_refused",
        "Audit records (and checkpoint anchors) the upstream refused for good.",
        value=sync.export.refused,
    )
    yield GaugeMetricFamily(
        "appliance_audit_trail_breaks",
        "Times the audit export found the local trail no longer holding records it had "
        "exported or anchored (cut back or rewritten): alert on any.",
        value=sync.export.breaks,
    )
    yield GaugeMetricFamily(
        "appliance_audit_trail_breaks_unacknowledged",
        "Audit trail breaks no one has acknowledged yet (appliance audit acknowledge, or "
        "the button on /sync).",
        value=sync.export.unacknowledged_breaks,
    )


@dataclass(frozen=True, slots=True)
class _Metrics:
    registry: CollectorRegistry
    collector: SnapshotCollector


@bp.record_once
def _register_metrics(setup: BlueprintSetupState) -> None:
    app = setup.app
    registry = CollectorRegistry(auto_describe=False)
    collector = SnapshotCollector()
    registry.register(collector)
    app.extensions["web.health.metrics"] = _Metrics(registry, collector)


@bp.get("/healthz")
async def healthz() -> ResponseReturnValue:
    """Liveness of the processes, the database and the outbox; 503 unless all is well."""
    snap = await _snapshot(app_state())
    body = {
        "status": "ok" if snap.ok else "degraded",
        "processes": {
            name: {"pid": beat.pid, "age_s": beat.age_s, "status": beat.status}
            for name, beat in snap.processes.items()
        },
        "database": snap.database,
        "outbox": {
            "pending": sum(snap.pending_by_lane.values()),
            "oldest_pending_age_s": snap.oldest_pending_age_s,
            "dead": sum(snap.dead_by_lane.values()),
        },
    }
    return body, 200 if snap.ok else 503


@bp.get("/metrics")
async def metrics() -> ResponseReturnValue:
    """Prometheus text exposition of the same figures, read at scrape time."""
    found: _Metrics = current_app.extensions["web.health.metrics"]
    # No await between taking the snapshot and rendering it: concurrent scrapes cannot mix.
    state = app_state()
    found.collector.snapshot = await _snapshot(state)
    found.collector.host = list(_host_metrics(state))
    return Response(generate_latest(found.registry), content_type=CONTENT_TYPE_LATEST)
