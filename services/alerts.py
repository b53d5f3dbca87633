"""Alerts from remote-monitoring findings: one live alert per patient and rule, kept in SQLite.

The rules are pure (``services/rpm_rules.py``); this module keeps their consequences:

* a finding out of range opens an alert, or **raises** the live one when it is worse (an
  ``alert_events`` row, never a second alert: the partial unique index ``alerts_one_live``
  backs that up); a finding back in range **clears** it where the rule allows (a BP crisis
  after a normal re-measure newer than the crisis reading, no-data when data arrives);
* people **acknowledge**, **snooze** until a time, and **resolve** with a note (sealed);
* :class:`AlertEngine` reads newly committed Observations (``Store.changes_since``, audited
  as ``service:rpm``), evaluates enrolled patients and moves its cursor in the same
  transaction as the alerts it produced; its ``tick(now)`` runs the time-based rules (data
  stopped, device silent, sync backlog), ends snoozes and **escalates** what nobody
  acknowledged in time (:func:`escalation_due`, pure).

Every change is one transaction holding the alert row, its ``alert_events`` row(s), the audit
record(s) (with the patient's pseudonymous key) and — where the clinical picture changes
(opened, raised, cleared, resolved) — the FHIR Flag/DetectedIssue on the alerts lane
(docs/adr/0005-alerts-as-fhir.md). Changes are planned from a snapshot and applied with an
optimistic check (``updated_at`` and ``state`` unchanged), so a nurse's click and the engine
never overwrite each other: the loser re-plans.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import orjson

from appliance import audit, db, fhir
from appliance.audit import AuditAction, AuditEvent
from appliance.errors import ApplianceError, NotFoundError, TamperedDataError
from appliance.store import Lane, Store, oldest_waiting
from services import rpm_rules
from services.rpm_rules import Finding, Reading, Rule, Severity, Thresholds

logger = logging.getLogger(__name__)

# What the worklist shows for an alert whose sealed finding fails authentication.
UNREADABLE_FINDING = "(the stored finding failed authentication: check the readings)"
ACTOR = "service:rpm"
SITE = "site"  # alerts.patient_id of site-level alerts (a patient id is a UUID: no clash)
CURSOR_KEY = "rpm.alerts.cursor"
DETAIL_LABEL = "alerts.detail"  # sealed columns (key_rotation.SEALED_COLUMNS)
NOTE_LABEL = "alerts.note"
ALERT_SYSTEM = "urn:telehealth-appliance:alert"
RULE_SYSTEM = "urn:telehealth-appliance:fhir:rpm-rule"
ALERT_STATE_SYSTEM = "urn:telehealth-appliance:fhir:alert-state"
FLAG_PRIORITY_URL = "http://hl7.org/fhir/StructureDefinition/flag-priority"
FLAG_PRIORITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/flag-priority-code"
FLAG_CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/flag-category"
MAX_NOTE = 2000
MAX_SNOOZE = timedelta(days=7)
_RETRIES = 4
_LOINC = "http://loinc.org"
# Which stored Observations (primary code) make the history of a measure, and how many.
_HISTORY: Mapping[rpm_rules.Measure, tuple[tuple[str, ...], int]] = {
    rpm_rules.Measure.SYSTOLIC: (("85354-9",), 20),
    rpm_rules.Measure.DIASTOLIC: (("85354-9",), 20),
    rpm_rules.Measure.SPO2: (("59408-5", "2708-6"), 10),
    rpm_rules.Measure.TEMPERATURE: (("8310-5",), 10),
    rpm_rules.Measure.WEIGHT: (("29463-7",), 60),
    rpm_rules.Measure.GLUCOSE: (("41653-7", "2339-0", "14743-9", "15074-8"), 10),
}


def _wanted_codes(new: Sequence[Reading]) -> dict[str, int]:
    """The primary codes whose history the new readings need, with how many of each."""
    wanted: dict[str, int] = {}
    for reading in new:
        codes, limit = _HISTORY.get(reading.measure, ((), 0))
        for code in codes:
            wanted[code] = max(wanted.get(code, 0), limit)
    return wanted


class AlertError(ApplianceError):
    """An alert change that cannot be made (resolved already, snooze in the past)."""


class _Conflict(Exception):
    """Someone changed an alert between the snapshot and the write: plan again."""


class AlertState(StrEnum):
    """Where an alert is in its life (``alerts.state``)."""

    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    SNOOZED = "snoozed"
    RESOLVED = "resolved"


class AlertAction(StrEnum):
    """What happened to an alert (``alert_events.action``)."""

    OPENED = "opened"
    RAISED = "raised"
    ACKNOWLEDGED = "acknowledged"
    SNOOZED = "snoozed"
    UNSNOOZED = "unsnoozed"
    ESCALATED = "escalated"
    RESOLVED = "resolved"
    CLEARED = "auto-cleared"


# Actions after which the alert waits for a person again (the escalation clock restarts).
_ATTENTION = (AlertAction.OPENED, AlertAction.RAISED, AlertAction.UNSNOOZED)
# Actions that change the clinical picture upstream: they write a Flag (and a finding).
_UPSTREAM = frozenset(
    {AlertAction.OPENED, AlertAction.RAISED, AlertAction.CLEARED, AlertAction.RESOLVED}
)


@dataclass(frozen=True, slots=True)
class Alert:
    """An alert row (no PHI: the values and the resolution note stay sealed)."""

    id: int  # 0 until written
    patient_id: str  # SITE for site-level alerts
    rule: str  # Finding.key: a Rule value, or ``device-silent:<device id>``
    severity: Severity
    state: AlertState
    opened_at: datetime
    updated_at: datetime
    attention_since: datetime  # last opened, raised or un-snoozed
    fhir_id: str  # the alert's identifier value (ALERT_SYSTEM) on every Flag
    trigger_ref: str | None = None  # Observation/<id>
    trigger_at: datetime | None = None  # that Observation's effective time
    acked_by: str | None = None
    acked_at: datetime | None = None
    snoozed_until: datetime | None = None
    escalated_at: datetime | None = None
    escalated_to: str | None = None
    resolved_at: datetime | None = None
    resolved_by: str | None = None
    resolution: str | None = None

    @property
    def live(self) -> bool:
        """Not resolved."""
        return self.state is not AlertState.RESOLVED


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """One ``alert_events`` row."""

    alert_id: int
    at: datetime
    actor: str
    action: AlertAction
    severity: Severity | None


def _default_after() -> dict[Severity, timedelta]:
    return {Severity.CRITICAL: timedelta(minutes=15), Severity.HIGH: timedelta(minutes=60)}


@dataclass(frozen=True, slots=True)
class EscalationPolicy:
    """After how long unacknowledged an alert of each severity goes to ``to_role``.

    Severities missing from ``after`` never escalate (alarm fatigue: a quiet scale is not
    a provider's page).
    """

    after: Mapping[Severity, timedelta] = field(default_factory=_default_after)
    to_role: str = "provider"


def escalation_policy(critical_min: int, high_min: int, to_role: str) -> EscalationPolicy:
    """The policy of the ``[rpm]`` site config (0 minutes: that severity never escalates)."""
    after = {
        severity: timedelta(minutes=minutes)
        for severity, minutes in ((Severity.CRITICAL, critical_min), (Severity.HIGH, high_min))
        if minutes > 0
    }
    return EscalationPolicy(after, to_role)


# -- pure decisions ---------------------------------------------------------------------


def plan_finding(alert: Alert | None, finding: Finding) -> AlertAction | None:
    """What a finding does to the live alert of its patient and rule (None: nothing)."""
    if alert is None or not alert.live:
        return None if finding.in_range else AlertAction.OPENED
    if finding.in_range:
        if not finding.clears:
            return None
        if alert.trigger_at is not None and finding.at <= alert.trigger_at:
            return None  # a re-measure must come after the reading that raised the alert
        return AlertAction.CLEARED
    return AlertAction.RAISED if finding.severity > alert.severity else None


def escalation_due(alert: Alert, now: datetime, policy: EscalationPolicy) -> bool:
    """Open (nobody acknowledged or snoozed it) for longer than the policy allows."""
    wait = policy.after.get(alert.severity)
    if alert.state is not AlertState.OPEN or wait is None:
        return False
    if alert.escalated_at is not None and alert.escalated_at >= alert.attention_since:
        return False  # escalated already since it last needed attention
    return now - alert.attention_since >= wait


def snooze_over(alert: Alert, now: datetime) -> bool:
    """A snoozed alert whose snooze has ended."""
    return (
        alert.state is AlertState.SNOOZED
        and alert.snoozed_until is not None
        and now >= alert.snoozed_until
    )


# -- FHIR -------------------------------------------------------------------------------

_PRIORITY = {
    Severity.LOW: ("PL", "Low priority"),
    Severity.MEDIUM: ("PM", "Medium priority"),
    Severity.HIGH: ("PH", "High priority"),
    Severity.CRITICAL: ("PH", "High priority"),
}
_ISSUE_SEVERITY = {
    Severity.LOW: "low",
    Severity.MEDIUM: "moderate",
    Severity.HIGH: "high",
    Severity.CRITICAL: "high",
}


def _rule_of(key: str) -> Rule:
    return Rule(key.partition(":")[0])


def _rule_concept(key: str, summary: str | None) -> dict[str, Any]:
    rule = _rule_of(key)
    title = rpm_rules.RULE_TITLES[rule]
    return {
        "coding": [{"system": RULE_SYSTEM, "code": rule.value, "display": title}],
        "text": title if summary is None else f"{title}: {summary}",
    }


def flag_resource(alert: Alert, summary: str | None) -> fhir.FhirJson:
    """A snapshot of the alert as a Flag: active while live, inactive once resolved."""
    period: dict[str, str] = {"start": alert.opened_at.isoformat()}
    if alert.resolved_at is not None:
        period["end"] = alert.resolved_at.isoformat()
    code, display = _PRIORITY.get(alert.severity, ("PN", "No alarm"))
    return {
        "resourceType": "Flag",
        "meta": {"tag": [{"system": ALERT_STATE_SYSTEM, "code": alert.state.value}]},
        "extension": [
            {
                "url": FLAG_PRIORITY_URL,
                "valueCodeableConcept": {
                    "coding": [{"system": FLAG_PRIORITY_SYSTEM, "code": code, "display": display}]
                },
            }
        ],
        "identifier": [{"system": ALERT_SYSTEM, "value": alert.fhir_id}],
        "status": "active" if alert.live else "inactive",
        "category": [
            {
                "coding": [
                    {"system": FLAG_CATEGORY_SYSTEM, "code": "clinical", "display": "Clinical"}
                ]
            }
        ],
        "code": _rule_concept(alert.rule, summary),
        "subject": {"reference": f"Patient/{alert.patient_id}"},
        "period": period,
    }


def detected_issue(alert: Alert, finding: Finding) -> fhir.FhirJson:
    """The finding behind an opened or raised alert, implicating its Observation."""
    issue: fhir.FhirJson = {
        "resourceType": "DetectedIssue",
        "identifier": [{"system": ALERT_SYSTEM, "value": alert.fhir_id}],
        "status": "final",
        "code": _rule_concept(alert.rule, None),
        "severity": _ISSUE_SEVERITY.get(finding.severity, "low"),
        "patient": {"reference": f"Patient/{alert.patient_id}"},
        "identifiedDateTime": finding.at.isoformat(),
        "detail": finding.summary,
    }
    if finding.observation_id is not None:
        issue["implicated"] = [{"reference": f"Observation/{finding.observation_id}"}]
    return issue


# -- persistence ------------------------------------------------------------------------

_COLUMNS = (
    "a.id, a.patient_id, a.rule, a.severity, a.state, a.opened_at, a.updated_at, "
    "(SELECT max(e.at) FROM alert_events e WHERE e.alert_id = a.id "
    "AND e.action IN ('opened', 'raised', 'unsnoozed')), a.fhir_id, a.trigger_ref, "
    "(SELECT r.effective FROM resources r WHERE r.logical_id = substr(a.trigger_ref, 13) "
    "AND r.type = 'Observation'), a.acked_by, a.acked_at, "
    "a.snoozed_until, a.escalated_at, a.escalated_to, a.resolved_at, a.resolved_by, a.resolution"
)


def _time(text: object) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _must(text: object) -> datetime:
    moment = _time(text)
    if moment is None:
        raise AlertError("alert row without a required time")
    return moment


def _text(moment: datetime | None) -> str | None:
    return None if moment is None else fhir.utc_text(moment)


def _alert(row: Sequence[Any]) -> Alert:
    return Alert(
        id=int(row[0]),
        patient_id=str(row[1]),
        rule=str(row[2]),
        severity=Severity(row[3]),
        state=AlertState(row[4]),
        opened_at=_must(row[5]),
        updated_at=_must(row[6]),
        attention_since=_time(row[7]) or _must(row[5]),
        fhir_id=str(row[8] or ""),
        trigger_ref=row[9],
        trigger_at=_time(row[10]),
        acked_by=row[11],
        acked_at=_time(row[12]),
        snoozed_until=_time(row[13]),
        escalated_at=_time(row[14]),
        escalated_to=row[15],
        resolved_at=_time(row[16]),
        resolved_by=row[17],
        resolution=row[18],
    )


def _live_alerts(conn: sqlite3.Connection) -> dict[tuple[str, str], Alert]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM alerts a WHERE a.state != 'resolved'"  # noqa: S608 - constant
    ).fetchall()
    return {(a.patient_id, a.rule): a for a in map(_alert, rows)}


@dataclass(slots=True)
class _Draft:
    """An alert being changed in one transaction (mutable while planned, then written)."""

    original: Alert | None
    alert: Alert
    events: list[tuple[AlertAction, datetime, str, Severity | None]] = field(default_factory=list)
    detail: str | None = None  # JSON {"summary", "detail"} to seal (the finding's values)
    note: str | None = None  # the resolution note to seal


class _Plan:
    """Changes to many alerts, planned against a snapshot of the live ones."""

    def __init__(self, live: Mapping[tuple[str, str], Alert], actor: str, now: datetime) -> None:
        self._live = dict(live)
        self._drafts: dict[tuple[str, str], _Draft] = {}
        self.done: list[_Draft] = []  # resolved within this plan (a new one may follow)
        self.resources: list[fhir.FhirJson] = []
        self.actor = actor
        self.now = now

    def current(self, patient_id: str, key: str) -> Alert | None:
        draft = self._drafts.get((patient_id, key))
        return draft.alert if draft is not None else self._live.get((patient_id, key))

    def live(self) -> list[Alert]:
        keys = set(self._live) | set(self._drafts)
        found = [self.current(*k) for k in sorted(keys)]
        return [a for a in found if a is not None and a.live]

    def drafts(self) -> list[_Draft]:
        return [*self.done, *self._drafts.values()]

    def change(
        self,
        alert: Alert,
        action: AlertAction,
        actor: str,
        *,
        finding: Finding | None = None,
        summary: str | None = None,
        note: str | None = None,
    ) -> Alert:
        key = (alert.patient_id, alert.rule)
        draft = self._drafts.get(key)
        if draft is None:
            original = self._live.get(key) if alert.id else None
            draft = self._drafts[key] = _Draft(original, alert)
        draft.alert = alert
        draft.events.append(
            (action, self.now, actor, alert.severity if action in _ATTENTION else None)
        )
        if finding is not None and not finding.in_range:
            draft.detail = orjson.dumps(
                {"summary": finding.summary, "detail": finding.detail}
            ).decode()
        if note is not None:
            draft.note = note
        if action in _UPSTREAM and alert.patient_id != SITE:
            if finding is not None and not finding.in_range:
                self.resources.append(detected_issue(alert, finding))
            self.resources.append(flag_resource(alert, summary))
        if not alert.live:
            # Resolved: the key is free again for a new alert later in this plan.
            self.done.append(self._drafts.pop(key))
            self._live.pop(key, None)
        return alert

    def apply(self, finding: Finding) -> None:
        """Plan what a rule's finding does."""
        patient = finding.patient_id or SITE
        alert = self.current(patient, finding.key)
        action = plan_finding(alert, finding)
        now = self.now
        if action is AlertAction.OPENED:
            fresh = Alert(
                id=0,
                patient_id=patient,
                rule=finding.key,
                severity=finding.severity,
                state=AlertState.OPEN,
                opened_at=now,
                updated_at=now,
                attention_since=now,
                fhir_id=fhir.uuid7(int(now.timestamp() * 1000)),
                trigger_ref=None
                if finding.observation_id is None
                else f"Observation/{finding.observation_id}",
                trigger_at=finding.at if finding.observation_id is not None else None,
            )
            self.change(fresh, action, self.actor, finding=finding, summary=finding.summary)
        elif action is AlertAction.RAISED and alert is not None:
            raised = replace(
                alert,
                severity=finding.severity,
                state=AlertState.OPEN,
                updated_at=now,
                attention_since=now,
                snoozed_until=None,
                trigger_ref=alert.trigger_ref
                if finding.observation_id is None
                else f"Observation/{finding.observation_id}",
                trigger_at=finding.at if finding.observation_id is not None else alert.trigger_at,
            )
            self.change(raised, action, self.actor, finding=finding, summary=finding.summary)
        elif action is AlertAction.CLEARED and alert is not None:
            cleared = replace(
                alert,
                state=AlertState.RESOLVED,
                updated_at=now,
                snoozed_until=None,
                resolved_at=now,
                resolved_by=self.actor,
                resolution=AlertAction.CLEARED.value,
            )
            self.change(cleared, action, self.actor)


def _write(
    conn: sqlite3.Connection, store: Store, drafts: Sequence[_Draft], cursor: int | None
) -> list[int]:
    """Apply planned drafts inside the caller's transaction; raises _Conflict when stale."""
    keyring = store.current_keyring(conn)
    events: list[AuditEvent] = []
    ids = []
    for draft in drafts:
        a = draft.alert
        values = (
            a.severity.value,
            a.state.value,
            _text(a.updated_at),
            a.trigger_ref,
            a.acked_by,
            _text(a.acked_at),
            _text(a.snoozed_until),
            _text(a.escalated_at),
            a.escalated_to,
            _text(a.resolved_at),
            a.resolved_by,
            a.resolution,
        )
        if draft.original is None:
            try:
                cur = conn.execute(
                    "INSERT INTO alerts (severity, state, updated_at, trigger_ref, acked_by, "
                    "acked_at, snoozed_until, escalated_at, escalated_to, resolved_at, "
                    "resolved_by, resolution, patient_id, rule, opened_at, fhir_id) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (*values, a.patient_id, a.rule, _text(a.opened_at), a.fhir_id),
                )
            except sqlite3.IntegrityError as exc:  # another live alert appeared meanwhile
                raise _Conflict from exc
            alert_id = int(cur.lastrowid or 0)
        else:
            old = draft.original
            cur = conn.execute(
                "UPDATE alerts SET severity = ?, state = ?, updated_at = ?, trigger_ref = ?, "
                "acked_by = ?, acked_at = ?, snoozed_until = ?, escalated_at = ?, "
                "escalated_to = ?, resolved_at = ?, resolved_by = ?, resolution = ? "
                "WHERE id = ? AND state = ? AND updated_at = ?",
                (*values, old.id, old.state.value, _text(old.updated_at)),
            )
            if cur.rowcount != 1:
                raise _Conflict
            alert_id = old.id
        ids.append(alert_id)
        if draft.detail is not None:
            sealed = keyring.seal(DETAIL_LABEL, str(alert_id), draft.detail)
            conn.execute("UPDATE alerts SET detail = ? WHERE id = ?", (sealed, alert_id))
        if draft.note is not None:
            sealed = keyring.seal(NOTE_LABEL, str(alert_id), draft.note)
            conn.execute("UPDATE alerts SET note = ? WHERE id = ?", (sealed, alert_id))
        conn.executemany(
            "INSERT INTO alert_events (alert_id, at, actor, action, severity) VALUES (?,?,?,?,?)",
            [
                (alert_id, _text(at), actor, action.value, None if sev is None else sev.value)
                for action, at, actor, sev in draft.events
            ],
        )
        key = None if a.patient_id == SITE else store.patient_key(f"Patient/{a.patient_id}")
        for action, _at, actor, _sev in draft.events:
            events.append(
                AuditEvent(
                    actor,
                    AuditAction.CREATE if action is AlertAction.OPENED else AuditAction.UPDATE,
                    patient_key=key,
                    entity=f"alert/{alert_id}",
                    detail=action.value,
                )
            )
    if cursor is not None:
        db.set_meta(conn, CURSOR_KEY, str(cursor))
    audit.append(conn, events, now=store.now())
    return ids


@dataclass(frozen=True, slots=True)
class AlertView:
    """An alert as a person's screen shows it: the row, its unsealed finding, where it came from.

    PHI (``values`` holds the measured numbers): only ever built by :meth:`AlertBook.views`,
    which audits the read.
    """

    alert: Alert
    summary: str  # the rule's threshold ("systolic ≥ 180"), no value
    values: str  # the measured values ("systolic 186 mm[Hg], diastolic 100 mm[Hg]")
    setting: str | None  # "home" or "clinic": the capture setting of the triggering reading

    @property
    def escalated(self) -> bool:
        """Escalated since the alert last needed attention, and still nobody on it."""
        a = self.alert
        return (
            a.state is AlertState.OPEN
            and a.escalated_at is not None
            and a.escalated_at >= a.attention_since
        )


def _trigger_setting(conn: sqlite3.Connection, store: Store, trigger_ref: str | None) -> str | None:
    """The capture setting tag of an alert's triggering Observation (decrypted on the DB thread)."""
    if trigger_ref is None or not trigger_ref.startswith("Observation/"):
        return None
    row = conn.execute(
        "SELECT id, logical_id, type, key_version, body FROM resources "
        "WHERE logical_id = ? AND type = 'Observation'",
        (trigger_ref.removeprefix("Observation/"),),
    ).fetchone()
    if row is None:
        return None
    try:
        resource = store.decrypt_stored(conn, tuple(row)).resource
    except TamperedDataError:
        return None  # logged by the store; the worklist shows the alert without its setting
    for tag in (resource.get("meta") or {}).get("tag") or []:
        if isinstance(tag, Mapping) and tag.get("system") == fhir.CAPTURE_SETTING_SYSTEM:
            return str(tag.get("code"))
    return None


async def last_readings(
    store: Store, patient_ids: Sequence[str], actor: str
) -> dict[str, datetime]:
    """Each patient's newest Observation time, from the plain index (one audited search)."""
    if not patient_ids:
        return {}
    keys = {pid: store.patient_key(f"Patient/{pid}") for pid in patient_ids}

    def work(conn: sqlite3.Connection) -> dict[str, datetime]:
        found = {}
        for pid, key in keys.items():
            row = conn.execute(
                "SELECT max(effective) FROM resources WHERE patient_key = ? "
                "AND type = 'Observation'",
                (key,),
            ).fetchone()
            moment = _time(row[0]) if row is not None else None
            if moment is not None:
                found[pid] = moment
        return found

    event = AuditEvent(actor, AuditAction.SEARCH, entity=f"Observation last reading x{len(keys)}")
    return await store.transact(work, [event])


class AlertBook:
    """The alerts in the store: the worklist's reads and the people's actions on them."""

    def __init__(self, store: Store, *, clock: Callable[[], datetime] | None = None) -> None:
        self._store = store
        self._clock = clock or store.now

    @property
    def store(self) -> Store:
        """The store the alerts live in."""
        return self._store

    async def commit(
        self,
        plan_work: Callable[[_Plan], None],
        actor: str,
        *,
        now: datetime | None = None,
        cursor: int | None = None,
    ) -> list[Alert]:
        """Plan against a fresh snapshot and write it; re-plan when someone got there first."""
        when = now or self._clock()
        for _ in range(_RETRIES):
            live = await db.run_sync(self._store.connection, _live_alerts)
            plan = _Plan(live, actor, when)
            plan_work(plan)
            drafts = plan.drafts()
            if not drafts and cursor is None:
                return []
            try:
                written = await self._write(plan, drafts, actor, cursor)
            except _Conflict:
                logger.info("an alert changed while planning; planning again")
                continue
            return [replace(d.alert, id=i) for d, i in zip(drafts, written, strict=True)]
        raise AlertError("alerts kept changing under this action; try again")

    async def _write(
        self, plan: _Plan, drafts: Sequence[_Draft], actor: str, cursor: int | None
    ) -> list[int]:
        """One transaction: FHIR resources (if any) with the alert rows, events and audit."""
        if not plan.resources:
            return await self._store.transact(
                lambda conn: _write(conn, self._store, drafts, cursor)
            )
        written: list[int] = []

        def also(conn: sqlite3.Connection, _ids: list[int]) -> None:
            written.extend(_write(conn, self._store, drafts, cursor))

        await self._store.create(plan.resources, actor, lane=Lane.ALERTS, also=also)
        return written

    # -- reads (audited: an alert says something about a patient) -------------------------

    async def live(self, actor: str, *, patient_id: str | None = None) -> list[Alert]:
        """Live alerts, most severe first, then oldest (audited as one search)."""
        where = "a.state != 'resolved'" + ("" if patient_id is None else " AND a.patient_id = ?")
        params = () if patient_id is None else (patient_id,)

        def work(conn: sqlite3.Connection) -> list[Alert]:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM alerts a WHERE {where}", params)  # noqa: S608 - constant
            return [_alert(r) for r in rows.fetchall()]

        key = None if patient_id is None else self._store.patient_key(f"Patient/{patient_id}")
        event = AuditEvent(actor, AuditAction.SEARCH, patient_key=key, entity="alert live")
        found = await self._store.transact(work, [event])
        return sorted(found, key=lambda a: (-a.severity.rank, a.opened_at, a.id))

    async def get(self, alert_id: int, actor: str) -> Alert:
        """One alert (audited as a read)."""

        def work(conn: sqlite3.Connection) -> Alert | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM alerts a WHERE a.id = ?",  # noqa: S608 - constant
                (alert_id,),
            ).fetchone()
            return None if row is None else _alert(row)

        event = AuditEvent(actor, AuditAction.READ, entity=f"alert/{alert_id}")
        found = await self._store.transact(work, [event])
        if found is None:
            raise NotFoundError(f"no alert {alert_id}")
        return found

    async def detail(self, alert_id: int, actor: str) -> tuple[str, str, str | None]:
        """``(summary, values, resolution note)`` of an alert, unsealed (audited as a read)."""

        def work(conn: sqlite3.Connection) -> tuple[bytes | None, bytes | None] | None:
            row = conn.execute(
                "SELECT detail, note FROM alerts WHERE id = ?", (alert_id,)
            ).fetchone()
            return None if row is None else (row[0], row[1])

        event = AuditEvent(actor, AuditAction.READ, entity=f"alert/{alert_id} detail")
        found = await self._store.transact(work, [event])
        if found is None:
            raise NotFoundError(f"no alert {alert_id}")
        keyring = self._store.keyring
        sealed_detail, sealed_note = found
        # Each sealed field on its own: one that fails authentication is said plainly, the
        # other is still shown, and the alert stays workable (acknowledge, resolve).
        info = {"summary": "", "detail": ""}
        note = None
        if sealed_detail is not None:
            try:
                info = orjson.loads(
                    keyring.unseal(DETAIL_LABEL, str(alert_id), bytes(sealed_detail))
                )
            except TamperedDataError:
                logger.error("alert %s: its sealed finding failed authentication", alert_id)
                info = {"summary": UNREADABLE_FINDING, "detail": ""}
        if sealed_note is not None:
            try:
                note = keyring.unseal(NOTE_LABEL, str(alert_id), bytes(sealed_note))
            except TamperedDataError:
                logger.error("alert %s: its sealed note failed authentication", alert_id)
                note = "(the stored note failed authentication)"
        return str(info["summary"]), str(info["detail"]), note

    async def views(self, actor: str, *, alert_ids: Sequence[int] | None = None) -> list[AlertView]:
        """Live alerts (or the ones named, resolved included) with their finding unsealed.

        For the worklist and its live stream: each alert's summary and values, and whether
        the reading that raised it was taken at home or in clinic (its Observation's capture
        setting, decrypted). Audited in one transaction: one search per patient named, so
        each patient's accounting of disclosures shows the screen that opened their alert.
        Ordered like :meth:`live`: most severe first, then oldest.
        """
        if alert_ids is not None and not alert_ids:
            return []
        store = self._store
        ids = tuple(alert_ids or ())
        where = (
            "a.state != 'resolved'"
            if alert_ids is None
            else f"a.id IN ({','.join('?' * len(ids))})"
        )

        def work(conn: sqlite3.Connection) -> list[AlertView]:
            rows = conn.execute(
                f"SELECT {_COLUMNS}, a.detail FROM alerts a WHERE {where}",  # noqa: S608 - constant
                ids,
            ).fetchall()
            keyring = store.current_keyring(conn)
            found = []
            for row in rows:
                alert = _alert(row)
                info = {"summary": "", "detail": ""}
                if row[-1] is not None:
                    try:
                        info = orjson.loads(
                            keyring.unseal(DETAIL_LABEL, str(alert.id), bytes(row[-1]))
                        )
                    except TamperedDataError:
                        # Shown, so that someone still acts on it; what it said is not known.
                        logger.error("alert %s: its sealed finding failed authentication", alert.id)
                        info = {"summary": UNREADABLE_FINDING, "detail": ""}
                found.append(
                    AlertView(
                        alert,
                        str(info["summary"]),
                        str(info["detail"]),
                        _trigger_setting(conn, store, alert.trigger_ref),
                    )
                )
            return found

        found = await db.run_sync(store.connection, work)
        patients = sorted({v.alert.patient_id for v in found})
        events = [
            AuditEvent(
                actor,
                AuditAction.SEARCH,
                patient_key=None if pid == SITE else store.patient_key(f"Patient/{pid}"),
                entity="alert worklist",
                detail=f"{sum(v.alert.patient_id == pid for v in found)} alert(s)",
            )
            for pid in patients
        ] or [AuditEvent(actor, AuditAction.SEARCH, entity="alert worklist x0")]
        await store.transact(lambda _conn: None, events)
        return sorted(found, key=lambda v: (-v.alert.severity.rank, v.alert.opened_at, v.alert.id))

    async def last_event_id(self) -> int:
        """The newest ``alert_events`` id (where a live stream of alert changes starts)."""
        rows = await self._store.query("SELECT coalesce(max(id), 0) FROM alert_events")
        return int(rows[0][0])

    async def changed_since(self, after_event_id: int, limit: int = 200) -> list[tuple[int, int]]:
        """``(alert id, its newest event id)`` of alerts changed after an event, in event order.

        Ids and times only (no PHI, no audit); the caller opens the alerts with :meth:`views`.
        """
        rows = await self._store.query(
            "SELECT alert_id, max(id) AS last FROM (SELECT id, alert_id FROM alert_events "
            "WHERE id > ? ORDER BY id LIMIT ?) GROUP BY alert_id ORDER BY last",
            (after_event_id, limit),
        )
        return [(int(a), int(e)) for a, e in rows]

    async def events(self, alert_id: int) -> list[AlertEvent]:
        """An alert's history, oldest first (ids, times, actions: nothing about the patient)."""
        rows = await self._store.query(
            "SELECT alert_id, at, actor, action, severity FROM alert_events "
            "WHERE alert_id = ? ORDER BY id",
            (alert_id,),
        )
        return [
            AlertEvent(
                int(r[0]),
                _must(r[1]),
                str(r[2]),
                AlertAction(r[3]),
                None if r[4] is None else Severity(r[4]),
            )
            for r in rows
        ]

    # -- people's actions ---------------------------------------------------------------

    async def _act(self, alert_id: int, actor: str, step: Callable[[_Plan, Alert], None]) -> Alert:
        box: list[Alert] = []

        def plan_work(plan: _Plan) -> None:
            box.clear()
            alert = next((a for a in plan.live() if a.id == alert_id), None)
            if alert is None:
                raise AlertError(f"alert {alert_id} is not live (resolved, or no such alert)")
            box.append(alert)
            step(plan, alert)

        changed = await self.commit(plan_work, actor)
        return changed[0] if changed else box[0]

    async def acknowledge(self, alert_id: int, actor: str) -> Alert:
        """Someone is on it: no escalation; a snooze ends. Acknowledging twice changes nothing."""
        now = self._clock()

        def step(plan: _Plan, alert: Alert) -> None:
            if alert.state is AlertState.ACKNOWLEDGED:
                return
            acked = replace(
                alert,
                state=AlertState.ACKNOWLEDGED,
                updated_at=now,
                acked_by=actor,
                acked_at=now,
                snoozed_until=None,
            )
            plan.change(acked, AlertAction.ACKNOWLEDGED, actor)

        return await self._act(alert_id, actor, step)

    async def snooze(self, alert_id: int, until: datetime, actor: str) -> Alert:
        """Quiet an alert until ``until`` (at most a week); it opens again then (``tick``)."""
        now = self._clock()
        if until.tzinfo is None:
            raise AlertError("snooze until a timezone-aware time")
        if until <= now or until - now > MAX_SNOOZE:
            raise AlertError("snooze until a time in the next 7 days")

        def step(plan: _Plan, alert: Alert) -> None:
            snoozed = replace(alert, state=AlertState.SNOOZED, updated_at=now, snoozed_until=until)
            plan.change(snoozed, AlertAction.SNOOZED, actor)

        return await self._act(alert_id, actor, step)

    async def resolve(self, alert_id: int, note: str, actor: str) -> Alert:
        """Close an alert with a note saying what was done (sealed; never empty)."""
        text = note.strip()
        if not text:
            raise AlertError("say what was done to resolve the alert")
        if len(text) > MAX_NOTE:
            raise AlertError(f"the note is longer than {MAX_NOTE} characters")
        now = self._clock()

        def step(plan: _Plan, alert: Alert) -> None:
            done = replace(
                alert,
                state=AlertState.RESOLVED,
                updated_at=now,
                snoozed_until=None,
                resolved_at=now,
                resolved_by=actor,
                resolution=AlertAction.RESOLVED.value,
            )
            plan.change(done, AlertAction.RESOLVED, actor, note=text)

        return await self._act(alert_id, actor, step)


# -- the engine -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Enrolled:
    """An enrolled patient as the engine needs them (thresholds already resolved)."""

    patient_id: str
    enrolled_at: datetime
    thresholds: Thresholds


class AlertEngine:
    """Evaluates new readings and the passing of time into alerts, for enrolled patients."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], datetime] | None = None,
        escalation: EscalationPolicy | None = None,
        backlog_hours: float | None = 24.0,
        batch: int = 200,
        max_age: timedelta = rpm_rules.MAX_AGE,
        site: rpm_rules.SiteDefaults | None = None,
    ) -> None:
        """``site``: the site's own defaults (``[rpm]`` quiet days, device-silent hours);
        ``backlog_hours`` None turns the sync-backlog rule off."""
        self._store = store
        self._site = site or {}
        self._clock = clock or store.now
        self.book = AlertBook(store, clock=self._clock)
        self._escalation = escalation or EscalationPolicy()
        self._backlog_hours = backlog_hours
        self._batch = batch
        self._max_age = max_age
        self._lock = asyncio.Lock()  # evaluate_new and tick plan against the same alerts
        self._pinned = False  # the starting cursor is stored (run_until_idle pins it once)

    async def cursor(self) -> int:
        """Where evaluation resumes: the stored cursor, else the newest resource now.

        Starting at the newest resource on first use means deploying the engine raises no
        alerts about readings from before it ran.
        """
        rows = await self._store.query("SELECT value FROM meta WHERE key = ?", (CURSOR_KEY,))
        if rows:
            return int(rows[0][0])
        return await self._store.last_row_id()

    async def enrolled(self, only: Collection[str] | None = None) -> dict[str, Enrolled]:
        """Enrolled patients (of ``only``) with their thresholds (a bad stored override:
        program defaults). Thresholds are worked out only for the patients asked about."""
        rows = await self._store.query(
            "SELECT patient_id, program, chronic_lung_disease, enrolled_at FROM rpm_enrollment "
            "WHERE ended_at IS NULL"
        )
        overrides: dict[str, dict[str, Any]] = {}
        for patient_id, rule, params in await self._store.query(
            "SELECT t.patient_id, t.rule, t.params FROM rpm_thresholds t JOIN rpm_enrollment e "
            "ON e.patient_id = t.patient_id WHERE e.ended_at IS NULL"
        ):
            overrides.setdefault(patient_id, {})[rule] = orjson.loads(params)
        found = {}
        for patient_id, program, lung, enrolled_at in rows:
            if only is not None and patient_id not in only:
                continue
            program_ = rpm_rules.Program(program)
            try:
                thresholds = rpm_rules.thresholds_for(
                    program_,
                    chronic_lung_disease=bool(lung),
                    overrides=overrides.get(patient_id, {}),
                    site=self._site,
                )
            except rpm_rules.ThresholdError:
                logger.error("stored thresholds no longer validate; program defaults used")
                thresholds = rpm_rules.thresholds_for(
                    program_, chronic_lung_disease=bool(lung), site=self._site
                )
            found[patient_id] = Enrolled(patient_id, _must(enrolled_at), thresholds)
        return found

    async def pin_start(self) -> None:
        """Store where a first run starts (once per engine; a stored cursor is kept).

        Without a stored cursor, :meth:`cursor` answers "the newest resource now" afresh on
        every pass, which would step over whatever arrived since the previous one. Readings
        committed after this call are evaluated.
        """
        if self._pinned:
            return
        start = await self._store.last_row_id()
        await self._store.transact(
            lambda conn: conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                (CURSOR_KEY, str(start)),
            )
        )
        self._pinned = True

    async def evaluate_new(self, after_row_id: int) -> int:
        """Evaluate Observations committed after ``after_row_id``; returns the next cursor.

        The cursor is stored in the same transaction as the alerts these readings produced,
        so a crash evaluates a batch again or not at all, never half.
        """
        async with self._lock:
            changes = await self._store.changes_since(
                after_row_id, ["Observation"], ACTOR, limit=self._batch
            )
            if not changes.scanned:
                return after_row_id
            # Past rows that failed authentication too (left out, logged and audited by the
            # store): one bad row must not stop the alerts of every patient behind it.
            cursor = changes.last_row_id
            now = self._clock()
            new = [
                r
                for row in changes.resources
                for r in rpm_rules.readings_from_observation(row.resource)
            ]
            enrolled = await self.enrolled({r.patient_id for r in new if r.patient_id})
            by_patient: dict[str, list[Reading]] = {}
            for reading in new:
                if reading.patient_id in enrolled:
                    by_patient.setdefault(reading.patient_id, []).append(reading)
            histories = await self._histories(by_patient)
            findings: list[Finding] = []
            for patient_id, new in sorted(by_patient.items()):
                findings += rpm_rules.evaluate(
                    patient_id,
                    new,
                    histories.get(patient_id, []),
                    enrolled[patient_id].thresholds,
                    now,
                    max_age=self._max_age,
                )

            def plan_work(plan: _Plan) -> None:
                for finding in findings:
                    plan.apply(finding)

            await self.book.commit(plan_work, ACTOR, now=now, cursor=cursor)
            return cursor

    async def _histories(
        self, by_patient: Mapping[str, Sequence[Reading]]
    ) -> dict[str, list[Reading]]:
        """Each patient's stored readings of the kinds that just arrived, in one hop.

        The searches of a whole batch run on the database thread together and are audited
        in one short transaction with one search record per patient (``Store.newest`` would
        commit one record, one fsync, per patient and code: the engine's bottleneck, see
        docs/benchmarks.md). The records are written before any reading is used, as the
        store's own reads do.
        """
        wanted = {pid: _wanted_codes(new) for pid, new in by_patient.items()}
        wanted = {pid: codes for pid, codes in wanted.items() if codes}
        if not wanted:
            return {}
        store = self._store
        keys = {pid: store.patient_key(f"Patient/{pid}") for pid in wanted}

        def work(conn: sqlite3.Connection) -> dict[str, list[fhir.FhirJson]]:
            found: dict[str, list[fhir.FhirJson]] = {}
            events: list[AuditEvent] = []
            for pid, codes in sorted(wanted.items()):
                resources = found.setdefault(pid, [])
                for code, limit in sorted(codes.items()):
                    rows = conn.execute(
                        "SELECT id, logical_id, type, key_version, body FROM resources "
                        "WHERE patient_key = ? AND type = 'Observation' AND code = ? "
                        "ORDER BY effective DESC LIMIT ?",
                        (keys[pid], f"{_LOINC}|{code}", limit),
                    ).fetchall()
                    resources += [
                        r.resource for r in store.decrypt_readable(conn, rows, ACTOR, events)
                    ]
                events.append(
                    AuditEvent(
                        ACTOR,
                        AuditAction.SEARCH,
                        patient_key=keys[pid],
                        entity="Observation history",
                        detail=" ".join(f"{code} newest {n}" for code, n in sorted(codes.items())),
                    )
                )
            with db.transaction_sync(conn):
                audit.append(conn, events, now=store.now())
            return found

        found = await db.run_sync(store.connection, work)
        return {
            pid: [
                r for resource in resources for r in rpm_rules.readings_from_observation(resource)
            ]
            for pid, resources in found.items()
        }

    async def run_until_idle(self) -> int:
        """Evaluate from the stored cursor until nothing new is left; returns the cursor.

        A fresh engine first stores where it starts (:meth:`pin_start`), so a reading
        committed between two calls is evaluated by the second, not stepped over.
        """
        await self.pin_start()
        cursor = await self.cursor()
        while True:
            following = await self.evaluate_new(cursor)
            if following == cursor:
                return cursor
            cursor = following

    async def run(
        self, stopping: asyncio.Event, *, poll_s: float = 2.0, tick_s: float = 60.0
    ) -> None:
        """Evaluate new readings every ``poll_s`` and tick every ``tick_s`` until stopping.

        One pass always runs (so a stop requested at start still catches up). A store error
        (a full disk) is logged and retried on the next pass; nothing is skipped, because the
        cursor only moves with the alerts it produced.
        """
        loop = asyncio.get_running_loop()
        last_tick: float | None = None
        while True:
            try:
                await self.run_until_idle()
                if last_tick is None or loop.time() - last_tick >= tick_s:
                    await self.tick(self._clock())
                    last_tick = loop.time()
            except ApplianceError as exc:
                logger.error("alert evaluation failed (%s); retrying", type(exc).__name__)
            if stopping.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), poll_s)

    async def tick(self, now: datetime) -> list[Alert]:
        """Time-based rules, snoozes ending and escalation at ``now``; returns changed alerts."""
        async with self._lock:
            enrolled = await self.enrolled()
            last = await self._last_readings(list(enrolled))
            devices = await self._store.query(
                "SELECT id, patient_id, last_seen, registered_at FROM devices "
                "WHERE setting = 'home' AND retired_at IS NULL AND patient_id IS NOT NULL "
                "ORDER BY id"
            )
            findings: list[Finding] = []
            for patient_id, who in sorted(enrolled.items()):
                quiet = rpm_rules.quiet_patient(
                    patient_id, last.get(patient_id), who.enrolled_at, who.thresholds, now
                )
                if quiet is not None:
                    findings.append(quiet)
            for device_id, patient_id, last_seen, registered_at in devices:
                owner = enrolled.get(patient_id)
                if owner is None:
                    continue
                silent = rpm_rules.silent_device(
                    device_id,
                    patient_id,
                    _time(last_seen),
                    _must(registered_at),
                    owner.thresholds,
                    now,
                )
                if silent is not None:
                    findings.append(silent)
            if self._backlog_hours is not None:
                oldest = await self._oldest_pending()
                findings.append(rpm_rules.sync_backlog(oldest, now, self._backlog_hours))
            policy = self._escalation

            def plan_work(plan: _Plan) -> None:
                for finding in findings:
                    plan.apply(finding)
                for alert in plan.live():
                    if snooze_over(alert, now):
                        alert = replace(
                            alert,
                            state=AlertState.OPEN,
                            updated_at=now,
                            attention_since=now,
                            snoozed_until=None,
                        )
                        plan.change(alert, AlertAction.UNSNOOZED, ACTOR)
                    if escalation_due(alert, now, policy):
                        escalated = replace(
                            alert, updated_at=now, escalated_at=now, escalated_to=policy.to_role
                        )
                        plan.change(escalated, AlertAction.ESCALATED, ACTOR)

            return await self.book.commit(plan_work, ACTOR, now=now)

    async def _last_readings(self, patient_ids: Sequence[str]) -> dict[str, datetime]:
        """Each patient's newest Observation time (one audited search as the engine)."""
        return await last_readings(self._store, patient_ids, ACTOR)

    async def _oldest_pending(self) -> datetime | None:
        """When the item waiting longest to go upstream joined the outbox (any lane)."""
        joined = await db.run_sync(self._store.connection, oldest_waiting)
        return min(joined.values(), default=None)
