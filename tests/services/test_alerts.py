"""Alerts on a real store: one per patient and rule, kept across restarts, never lost."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance import db, fhir
from appliance.device_registry import DeviceRegistry, Setting, Transport
from appliance.store import UNREADABLE_LEFT_OUT, Lane, Store
from services import alerts, vitals
from services.alerts import (
    Alert,
    AlertAction,
    AlertBook,
    AlertEngine,
    AlertError,
    AlertState,
    EscalationPolicy,
)
from services.rpm_enrollment import Enrollments
from services.rpm_rules import Program, Severity
from sync_agent import dead_letters, status
from tests import factories
from tests.tamper import move_ciphertext

NURSE = "user:nurse"
DEVICES = "service:devices"
NOW = datetime.now(UTC).replace(microsecond=0)


class Clock:
    """An injected clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> datetime:
        self.now += delta
        return self.now


async def _patient(store: Store, program: Program = Program.HYPERTENSION) -> str:
    [patient] = await store.create([factories.patient()], NURSE)
    await Enrollments(store).enroll(patient.logical_id, program, NURSE)
    return patient.logical_id


def _spo2(patient_id: str, value: float, at: datetime) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": vitals.VITAL_SIGNS,
        "code": {"coding": [{"system": vitals.LOINC, "code": "59408-5"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": at.isoformat(),
        "valueQuantity": {"value": value, "unit": "%", "system": vitals.UCUM, "code": "%"},
    }


async def _file(store: Store, *resources: dict[str, Any]) -> list[str]:
    stored = await store.create(list(resources), DEVICES)
    return [s.logical_id for s in stored]


async def _bp(
    store: Store, patient_id: str, systolic: float, diastolic: float, at: datetime
) -> str:
    [obs] = await _file(
        store,
        factories.bp_observation(f"Patient/{patient_id}", systolic, diastolic, at.isoformat()),
    )
    return obs


async def _engine(store: Store, clock: Clock, **kwargs: Any) -> tuple[AlertEngine, int]:
    kwargs.setdefault("backlog_hours", None)  # the sync-backlog rule has its own test
    engine = AlertEngine(store, clock=clock, **kwargs)
    return engine, await engine.cursor()


async def _alerts(store: Store) -> list[tuple[Any, ...]]:
    return await store.query(
        "SELECT id, patient_id, rule, severity, state, resolution FROM alerts ORDER BY id"
    )


async def _actions(store: Store, alert_id: int) -> list[str]:
    return [e.action.value for e in await AlertBook(store).events(alert_id)]


async def _alert_resources(store: Store) -> list[dict[str, Any]]:
    rows = await store.query(
        "SELECT r.logical_id, r.type, o.lane FROM resources r JOIN outbox o "
        "ON o.resource_id = r.id WHERE r.type IN ('Flag', 'DetectedIssue') ORDER BY r.id"
    )
    out = []
    for logical_id, rtype, lane in rows:
        assert lane == Lane.ALERTS
        out.append(await store.read(rtype, logical_id, NURSE))
    return out


async def test_a_crisis_opens_one_alert_with_a_valid_flag_and_detected_issue(store: Store) -> None:
    clock = Clock(NOW)
    patient = await _patient(store)
    engine, cursor = await _engine(store, clock)
    obs = await _bp(store, patient, 186, 100, NOW)
    cursor = await engine.evaluate_new(cursor)
    [(alert_id, who, rule, severity, state, _)] = await _alerts(store)
    assert (who, rule, severity, state) == (patient, "bp-crisis", "critical", "open")
    issue, flag = await _alert_resources(store)
    for resource in (issue, flag):
        fhir.validate(resource)
    assert issue["resourceType"] == "DetectedIssue"
    assert issue["implicated"] == [{"reference": f"Observation/{obs}"}]
    assert issue["severity"] == "high"
    assert issue["patient"] == {"reference": f"Patient/{patient}"}
    assert flag["status"] == "active"
    assert flag["subject"] == {"reference": f"Patient/{patient}"}
    assert flag["code"]["coding"][0]["code"] == "bp-crisis"
    assert flag["identifier"][1] == issue["identifier"][1]  # the alert's own identifier
    assert flag["identifier"][1]["system"] == alerts.ALERT_SYSTEM
    # The summary says which threshold; the values stay sealed in the alert.
    summary, values, note = await AlertBook(store).detail(alert_id, NURSE)
    assert summary == "systolic ≥ 180"
    assert values == "systolic 186 mm[Hg], diastolic 100 mm[Hg]"
    assert note is None
    sealed = await store.query("SELECT detail FROM alerts WHERE id = ?", (alert_id,))
    assert b"186" not in bytes(sealed[0][0])
    # The cursor moved in the same transaction; nothing new means nothing more.
    assert await engine.cursor() == cursor
    assert await engine.evaluate_new(cursor) == cursor
    assert len(await _alerts(store)) == 1


async def test_every_change_is_audited_with_the_patients_key(store: Store) -> None:
    clock = Clock(NOW)
    patient = await _patient(store)
    engine, cursor = await _engine(store, clock)
    await _bp(store, patient, 190, 100, NOW)
    await engine.evaluate_new(cursor)
    [(alert_id, *_)] = await _alerts(store)
    await engine.book.acknowledge(alert_id, NURSE)
    rows = await store.query(
        "SELECT actor, action, patient_key, detail FROM audit WHERE entity = ? ORDER BY id",
        (f"alert/{alert_id}",),
    )
    key = store.patient_key(f"Patient/{patient}")
    assert [(r[0], r[1], bytes(r[2]), r[3]) for r in rows] == [
        (alerts.ACTOR, "create", key, "opened"),
        (NURSE, "update", key, "acknowledged"),
    ]
    feed = await store.query(
        "SELECT count(*) FROM audit WHERE actor = ? AND action = 'search' AND entity LIKE "
        "'Observation feed%'",
        (alerts.ACTOR,),
    )
    assert feed[0][0] == 1


async def test_worsening_raises_the_live_alert_and_never_duplicates_it(store: Store) -> None:
    clock = Clock(NOW)
    patient = await _patient(store, Program.COPD)
    await Enrollments(store).enroll(patient, Program.COPD, NURSE, chronic_lung_disease=False)
    engine, cursor = await _engine(store, clock)
    await _file(store, _spo2(patient, 92, NOW))
    cursor = await engine.evaluate_new(cursor)
    [(alert_id, _, rule, severity, *_)] = await _alerts(store)
    assert (rule, severity) == ("spo2-low", "high")
    await engine.book.acknowledge(alert_id, NURSE)
    # The same again changes nothing; worse raises it and needs attention again.
    await _file(store, _spo2(patient, 91, NOW + timedelta(minutes=1)))
    cursor = await engine.evaluate_new(cursor)
    await _file(store, _spo2(patient, 85, NOW + timedelta(minutes=2)))
    cursor = await engine.evaluate_new(cursor)
    [(same_id, _, _, severity, state, _)] = await _alerts(store)
    assert (same_id, severity, state) == (alert_id, "critical", "open")
    assert await _actions(store, alert_id) == ["opened", "acknowledged", "raised"]
    flags = [r for r in await _alert_resources(store) if r["resourceType"] == "Flag"]
    assert [f["extension"][0]["valueCodeableConcept"]["coding"][0]["code"] for f in flags] == [
        "PH",
        "PH",
    ]
    assert len({f["identifier"][1]["value"] for f in flags}) == 1


async def test_a_normal_remeasure_clears_a_crisis_and_an_older_one_does_not(store: Store) -> None:
    clock = Clock(NOW)
    patient = await _patient(store)
    engine, cursor = await _engine(store, clock)
    await _bp(store, patient, 184, 95, NOW)
    cursor = await engine.evaluate_new(cursor)
    # A normal reading from before the crisis (a late upload) does not clear it.
    await _bp(store, patient, 120, 80, NOW - timedelta(minutes=30))
    cursor = await engine.evaluate_new(cursor)
    [(alert_id, _, _, _, state, _)] = await _alerts(store)
    assert state == "open"
    await _bp(store, patient, 150, 90, NOW + timedelta(minutes=3))
    await engine.evaluate_new(cursor)
    [(_, _, _, _, state, resolution)] = await _alerts(store)
    assert (state, resolution) == ("resolved", "auto-cleared")
    assert await _actions(store, alert_id) == ["opened", "auto-cleared"]
    flags = [r for r in await _alert_resources(store) if r["resourceType"] == "Flag"]
    assert [f["status"] for f in flags] == ["active", "inactive"]
    assert "end" in flags[1]["period"]
    fhir.validate(flags[1])


async def test_crisis_then_normal_then_crisis_in_one_batch_leaves_one_open_alert(
    store: Store,
) -> None:
    clock = Clock(NOW)
    patient = await _patient(store)
    engine, cursor = await _engine(store, clock)
    ref = f"Patient/{patient}"
    await _file(
        store,
        factories.bp_observation(ref, 185, 90, NOW.isoformat()),
        factories.bp_observation(ref, 130, 80, (NOW + timedelta(minutes=2)).isoformat()),
        factories.bp_observation(ref, 188, 90, (NOW + timedelta(minutes=4)).isoformat()),
    )
    await engine.evaluate_new(cursor)
    rows = await _alerts(store)
    assert [(a[2], a[4]) for a in rows if a[2] == "bp-crisis"] == [("bp-crisis", "open")]
    assert ("systolic-rise", "open") in [(a[2], a[4]) for a in rows]  # 130 -> 188


async def test_an_open_alert_survives_a_restart_without_a_duplicate(
    db_path: Path, kek_path: Path
) -> None:
    clock = Clock(NOW)
    store = await Store.open(db_path, kek_path)
    try:
        patient = await _patient(store, Program.HEART_FAILURE)
        engine, cursor = await _engine(store, clock)
        await _bp(store, patient, 85, 55, NOW)
        await engine.evaluate_new(cursor)
        await _bp(store, patient, 82, 50, NOW + timedelta(minutes=5))  # filed, not evaluated yet
    finally:
        await store.close()
    store = await Store.open(db_path, kek_path)
    try:
        engine = AlertEngine(store, clock=clock, backlog_hours=None)
        await engine.run_until_idle()  # resumes from the stored cursor: the 82/50 reading
        rows = await _alerts(store)
        assert [(r[2], r[3], r[4]) for r in rows] == [("hypotension", "high", "open")]
        assert await _actions(store, rows[0][0]) == ["opened"]
        acked = await engine.book.acknowledge(rows[0][0], NURSE)
        assert acked.state is AlertState.ACKNOWLEDGED
        await _bp(store, patient, 118, 76, NOW + timedelta(minutes=10))
        await engine.run_until_idle()
        assert await _actions(store, rows[0][0]) == ["opened", "acknowledged", "auto-cleared"]
        assert len(await _alerts(store)) == 1
    finally:
        await store.close()


async def test_escalates_what_nobody_acknowledged_and_not_twice(store: Store) -> None:
    clock = Clock(NOW)
    patient = await _patient(store)
    policy = EscalationPolicy({Severity.CRITICAL: timedelta(minutes=15)}, to_role="provider")
    engine, cursor = await _engine(store, clock, escalation=policy)
    await _bp(store, patient, 200, 110, NOW)
    await engine.evaluate_new(cursor)
    [(alert_id, *_)] = await _alerts(store)
    assert await engine.tick(NOW + timedelta(minutes=14, seconds=59)) == []
    [escalated] = await engine.tick(NOW + timedelta(minutes=15))
    assert (escalated.id, escalated.escalated_to) == (alert_id, "provider")
    assert escalated.escalated_at == NOW + timedelta(minutes=15)
    assert await engine.tick(NOW + timedelta(minutes=40)) == []
    assert await _actions(store, alert_id) == ["opened", "escalated"]
    stored = await engine.book.get(alert_id, NURSE)
    assert stored.escalated_to == "provider"


async def test_an_acknowledged_alert_does_not_escalate(store: Store) -> None:
    clock = Clock(NOW)
    patient = await _patient(store)
    engine, cursor = await _engine(store, clock)
    await _bp(store, patient, 200, 110, NOW)
    await engine.evaluate_new(cursor)
    [(alert_id, *_)] = await _alerts(store)
    clock.advance(timedelta(minutes=5))
    acked = await engine.book.acknowledge(alert_id, NURSE)
    assert (acked.state, acked.acked_by) == (AlertState.ACKNOWLEDGED, NURSE)
    assert await engine.book.acknowledge(alert_id, NURSE) == acked  # twice: no change
    assert await engine.tick(NOW + timedelta(hours=3)) == []


async def test_a_snooze_ends_on_time_and_restarts_the_escalation_clock(store: Store) -> None:
    clock = Clock(NOW)
    patient = await _patient(store)
    engine, cursor = await _engine(store, clock)
    await _bp(store, patient, 200, 110, NOW)
    await engine.evaluate_new(cursor)
    [(alert_id, *_)] = await _alerts(store)
    until = NOW + timedelta(hours=1)
    snoozed = await engine.book.snooze(alert_id, until, NURSE)
    assert (snoozed.state, snoozed.snoozed_until) == (AlertState.SNOOZED, until)
    assert await engine.tick(until - timedelta(seconds=1)) == []  # no escalation while snoozed
    [woken] = await engine.tick(until)
    assert (woken.state, woken.snoozed_until) == (AlertState.OPEN, None)
    assert await engine.tick(until + timedelta(minutes=14)) == []
    [escalated] = await engine.tick(until + timedelta(minutes=15))
    assert escalated.escalated_to == "provider"
    assert await _actions(store, alert_id) == ["opened", "snoozed", "unsnoozed", "escalated"]
    with pytest.raises(AlertError):
        await engine.book.snooze(alert_id, NOW - timedelta(minutes=1), NURSE)
    with pytest.raises(AlertError):
        await engine.book.snooze(alert_id, NOW + timedelta(days=8), NURSE)


async def test_resolve_needs_a_note_which_is_sealed(store: Store) -> None:
    clock = Clock(NOW)
    patient = await _patient(store)
    engine, cursor = await _engine(store, clock)
    await _bp(store, patient, 200, 110, NOW)
    await engine.evaluate_new(cursor)
    [(alert_id, *_)] = await _alerts(store)
    with pytest.raises(AlertError):
        await engine.book.resolve(alert_id, "   ", NURSE)
    done = await engine.book.resolve(alert_id, "Called the patient; took medication.", NURSE)
    assert (done.state, done.resolved_by, done.resolution) == (
        AlertState.RESOLVED,
        NURSE,
        "resolved",
    )
    assert (await engine.book.detail(alert_id, NURSE))[2] == "Called the patient; took medication."
    raw = await store.query("SELECT note FROM alerts WHERE id = ?", (alert_id,))
    assert b"medication" not in bytes(raw[0][0])
    with pytest.raises(AlertError):
        await engine.book.resolve(alert_id, "again", NURSE)
    with pytest.raises(AlertError):
        await engine.book.acknowledge(alert_id, NURSE)
    flags = [r for r in await _alert_resources(store) if r["resourceType"] == "Flag"]
    assert [f["status"] for f in flags] == ["active", "inactive"]
    # A new crisis after a resolution is a new alert.
    await _bp(store, patient, 200, 110, NOW + timedelta(minutes=30))
    await engine.run_until_idle()
    assert [(r[4]) for r in await _alerts(store)] == ["resolved", "open"]


async def test_no_data_fires_at_n_days_and_clears_when_data_arrives(store: Store) -> None:
    # The enrolment is stamped by the store's real clock: start from "now" at this test, not
    # at import (a long suite run would put the enrolment after the reading).
    start = datetime.now(UTC).replace(microsecond=0)
    clock = Clock(start)
    patient = await _patient(store)
    engine, cursor = await _engine(store, clock)
    last = start + timedelta(minutes=1)  # after the enrolment (counted from the later)
    await _bp(store, patient, 120, 80, last)
    cursor = await engine.evaluate_new(cursor)
    assert await engine.tick(last + timedelta(days=3) - timedelta(seconds=1)) == []
    [quiet] = await engine.tick(last + timedelta(days=3))
    assert (quiet.rule, quiet.severity, quiet.patient_id) == ("no-data", Severity.LOW, patient)
    assert quiet.trigger_ref is None
    # Quiet alerts are patient alerts: they go upstream too, without an Observation.
    issue = next(r for r in await _alert_resources(store) if r["resourceType"] == "DetectedIssue")
    assert "implicated" not in issue
    clock.advance(timedelta(days=3))
    await _bp(store, patient, 121, 79, clock.now)
    await engine.evaluate_new(cursor)
    [(_, _, rule, _, state, resolution)] = await _alerts(store)
    assert (rule, state, resolution) == ("no-data", "resolved", "auto-cleared")


async def test_a_silent_home_device_alerts_per_device_and_clears_when_seen(store: Store) -> None:
    patient = await _patient(store, Program.HEART_FAILURE)
    registry = DeviceRegistry(store)
    await registry.register_device(
        "scale-7",
        name="Home scale",
        transport=Transport.HUB,
        profile="weight",
        address=None,
        setting=Setting.HOME,
        actor=NURSE,
    )
    await registry.assign_device("scale-7", NURSE, patient_id=patient)
    await registry.note_seen("scale-7")
    seen = (await registry.device("scale-7")).last_seen
    assert seen is not None
    seen_at = datetime.fromisoformat(seen.replace("Z", "+00:00"))
    engine = AlertEngine(store, backlog_hours=None)
    changed = await engine.tick(seen_at + timedelta(hours=48))
    assert [(a.rule, a.patient_id) for a in changed] == [("device-silent:scale-7", patient)]
    await registry.note_seen("scale-7")
    now_seen = (await registry.device("scale-7")).last_seen
    assert now_seen is not None
    later = datetime.fromisoformat(now_seen.replace("Z", "+00:00")) + timedelta(hours=1)
    [cleared] = await engine.tick(later)
    assert (cleared.state, cleared.resolution) == (AlertState.RESOLVED, "auto-cleared")


async def test_a_sync_backlog_is_a_site_alert_without_fhir(store: Store) -> None:
    await store.create([factories.patient()], NURSE)  # waits in the outbox from now
    engine = AlertEngine(store, backlog_hours=24)
    start = store.now()
    assert await engine.tick(start + timedelta(hours=23)) == []
    [backlog] = await engine.tick(start + timedelta(hours=25))
    assert (backlog.patient_id, backlog.rule, backlog.severity) == (
        alerts.SITE,
        "sync-backlog",
        Severity.MEDIUM,
    )
    assert await _alert_resources(store) == []
    await store.query("SELECT 1")  # nothing delivered: it stays open
    assert [a.rule for a in await engine.book.live(NURSE)] == ["sync-backlog"]


async def test_a_sync_backlog_counts_from_when_an_item_joined_the_queue(
    db_path: Path, kek_path: Path
) -> None:
    """A waiting edit of an old record, or a dead letter sent again, is as old as its place
    in the queue, not as its record (whose UUIDv7 says when the record was made)."""
    clock = Clock(NOW - timedelta(days=30))
    store = await Store.open(db_path, kek_path, clock=clock)
    try:
        [patient] = await store.create([factories.patient()], NURSE)
        [reading] = await store.create(
            [factories.bp_observation(f"Patient/{patient.logical_id}")], NURSE
        )
        # A month ago the Patient landed upstream and the reading was refused.
        await store.query(
            "UPDATE outbox SET state = 'delivered', upstream_ref = 'Patient/up-1', "
            "delivered_at = '2026-10-30T09:00:00Z' WHERE resource_id = ?",
            (patient.row_id,),
        )
        await store.query(
            "UPDATE outbox SET state = 'dead', last_error = NULL WHERE resource_id = ?",
            (reading.row_id,),
        )
        clock.now = NOW
        edited = {**patient.resource, "gender": "female"}
        await store.update("Patient", patient.logical_id, edited, NURSE)
        resent = await db.run_sync(
            store.connection,
            lambda conn: dead_letters.resend_dead_letters(conn, actor=NURSE, now=NOW),
        )
        assert len(resent.resent) == 1

        sync = await db.run_sync(store.connection, status.read_status, NOW + timedelta(hours=1))
        [clinical] = [lane for lane in sync.lanes if lane.name == "clinical"]
        assert (clinical.waiting, clinical.oldest_age_s) == (2, 3600.0)
        engine = AlertEngine(store, clock=clock, backlog_hours=24)
        assert await engine.tick(NOW + timedelta(hours=23)) == []
        [backlog] = await engine.tick(NOW + timedelta(hours=25))
        assert (backlog.rule, backlog.severity) == ("sync-backlog", Severity.MEDIUM)
    finally:
        await store.close()


async def test_readings_of_patients_not_enrolled_raise_nothing(store: Store) -> None:
    [patient] = await store.create([factories.patient()], NURSE)
    engine, cursor = await _engine(store, Clock(NOW))
    await _bp(store, patient.logical_id, 220, 130, NOW)
    await engine.evaluate_new(cursor)
    assert await _alerts(store) == []


async def test_a_nurse_and_the_engine_at_once_never_lose_a_change(store: Store) -> None:
    clock = Clock(NOW)
    patient = await _patient(store, Program.COPD)
    await Enrollments(store).enroll(patient, Program.COPD, NURSE, chronic_lung_disease=False)
    engine, cursor = await _engine(store, clock)
    await _file(store, _spo2(patient, 92, NOW))
    cursor = await engine.evaluate_new(cursor)
    [(alert_id, *_)] = await _alerts(store)
    await _file(store, _spo2(patient, 84, NOW + timedelta(minutes=1)))
    await asyncio.gather(engine.evaluate_new(cursor), engine.book.acknowledge(alert_id, NURSE))
    actions = await _actions(store, alert_id)
    assert sorted(actions[1:]) == ["acknowledged", "raised"]
    [(_, _, _, severity, state, _)] = await _alerts(store)
    assert severity == "critical"
    # Whichever came last decides the state; both are recorded.
    assert state == ("open" if actions[-1] == "raised" else "acknowledged")


def test_pure_decisions() -> None:
    base = Alert(
        id=1,
        patient_id="p",
        rule="bp-crisis",
        severity=Severity.HIGH,
        state=AlertState.OPEN,
        opened_at=NOW,
        updated_at=NOW,
        attention_since=NOW,
        fhir_id="x",
        trigger_at=NOW,
    )
    policy = EscalationPolicy()
    assert not alerts.escalation_due(base, NOW + timedelta(minutes=59), policy)
    assert alerts.escalation_due(base, NOW + timedelta(minutes=60), policy)
    low = Alert(**{**_fields(base), "severity": Severity.LOW})
    assert not alerts.escalation_due(low, NOW + timedelta(days=2), policy)
    snoozed = Alert(
        **{**_fields(base), "state": AlertState.SNOOZED, "snoozed_until": NOW + timedelta(hours=1)}
    )
    assert not alerts.snooze_over(snoozed, NOW + timedelta(minutes=59))
    assert alerts.snooze_over(snoozed, NOW + timedelta(hours=1))
    assert alerts.plan_finding(None, _finding(Severity.NONE)) is None
    assert alerts.plan_finding(None, _finding(Severity.HIGH)) is AlertAction.OPENED
    assert alerts.plan_finding(base, _finding(Severity.HIGH)) is None
    assert alerts.plan_finding(base, _finding(Severity.CRITICAL)) is AlertAction.RAISED
    assert alerts.plan_finding(base, _finding(Severity.NONE)) is None  # not after the trigger
    later = _finding(Severity.NONE, at=NOW + timedelta(seconds=1))
    assert alerts.plan_finding(base, later) is AlertAction.CLEARED


def _fields(alert: Alert) -> dict[str, Any]:
    return {name: getattr(alert, name) for name in Alert.__slots__}  # type: ignore[attr-defined]


def _finding(severity: Severity, at: datetime = NOW) -> Any:
    from services.rpm_rules import Finding, Rule

    return Finding(Rule.BP_CRISIS, "p", severity, "s", at, "o")


async def test_a_change_made_elsewhere_meanwhile_is_planned_again(
    store: Store, db_path: Path
) -> None:
    clock = Clock(NOW)
    patient = await _patient(store, Program.COPD)
    await Enrollments(store).enroll(patient, Program.COPD, NURSE, chronic_lung_disease=False)
    engine, cursor = await _engine(store, clock)
    await _file(store, _spo2(patient, 92, NOW))
    await engine.evaluate_new(cursor)
    [(alert_id, *_)] = await _alerts(store)
    seen: list[AlertState] = []

    def plan_work(plan: Any) -> None:
        alert = next(a for a in plan.live() if a.id == alert_id)
        seen.append(alert.state)
        if len(seen) == 1:
            # The web process acknowledges it between our snapshot and our write.
            other = sqlite3.connect(db_path)
            other.execute(
                "UPDATE alerts SET state = 'acknowledged', acked_by = 'user:other', "
                "updated_at = ? WHERE id = ?",
                (fhir.utc_text(NOW + timedelta(seconds=1)), alert_id),
            )
            other.commit()
            other.close()
        snoozed = replace(alert, state=AlertState.SNOOZED, snoozed_until=NOW + timedelta(hours=1))
        plan.change(snoozed, AlertAction.SNOOZED, NURSE)

    [written] = await engine.book.commit(plan_work, NURSE)
    assert seen == [AlertState.OPEN, AlertState.ACKNOWLEDGED]
    assert (written.state, written.acked_by) == (AlertState.SNOOZED, "user:other")
    assert await _actions(store, alert_id) == ["opened", "snoozed"]


async def test_run_catches_up_and_ticks_then_stops(store: Store) -> None:
    patient = await _patient(store)
    engine = AlertEngine(store, backlog_hours=None)
    await engine.cursor()  # nothing stored yet: it would start at the newest resource
    await store.transact(
        lambda conn: conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, '0')", (alerts.CURSOR_KEY,)
        )
    )
    await _bp(store, patient, 200, 110, store.now())
    stopping = asyncio.Event()
    stopping.set()
    await asyncio.wait_for(engine.run(stopping), 10)
    assert [(a[2], a[4]) for a in await _alerts(store)] == [("bp-crisis", "open")]
    [(last_observation,)] = await store.query(
        "SELECT max(id) FROM resources WHERE type = 'Observation'"
    )
    assert await engine.cursor() == last_observation


async def test_a_batch_reads_each_patients_history_once_audited_per_patient(
    store: Store,
) -> None:
    clock = Clock(NOW)
    patients = [await _patient(store) for _ in range(3)]
    copd = await _patient(store, Program.COPD)
    for patient in patients:  # the earlier reading is history, not part of the batch
        await _bp(store, patient, 128, 80, NOW - timedelta(hours=2))
    engine, cursor = await _engine(store, clock)
    await _file(
        store,
        *[factories.bp_observation(f"Patient/{p}", 176, 95, NOW.isoformat()) for p in patients],
        _spo2(copd, 96, NOW),
    )
    await engine.evaluate_new(cursor)
    # The rise from 128 to 176 is only visible with the history read back from the store.
    rules = sorted((a[1], a[2]) for a in await _alerts(store))
    assert rules == sorted((p, "systolic-rise") for p in patients)
    rows = await store.query(
        "SELECT patient_key, detail, ts FROM audit WHERE actor = ? AND action = 'search' "
        "AND entity = 'Observation history' ORDER BY id",
        (alerts.ACTOR,),
    )
    keys = [bytes(r[0]) for r in rows]
    assert sorted(keys) == sorted(store.patient_key(f"Patient/{p}") for p in [*patients, copd])
    assert len(set(keys)) == 4  # one record per patient, not per code searched
    details = {bytes(r[0]): r[1] for r in rows}
    assert details[store.patient_key(f"Patient/{copd}")] == "2708-6 newest 10 59408-5 newest 10"
    assert len({r[2] for r in rows}) == 1  # written together, in one transaction


async def test_a_reading_that_fails_authentication_stops_no_ones_alerts(
    store: Store, db_path: Path
) -> None:
    clock = Clock(NOW)
    ada, bo, cy = [await _patient(store) for _ in range(3)]
    old = await _bp(store, cy, 128, 80, NOW - timedelta(hours=2))  # Cy's history
    engine, _start = await _engine(store, clock, batch=2)
    await engine.run_until_idle()  # its starting point: what follows is new
    first = await _bp(store, ada, 188, 101, NOW)  # a crisis, unreadable by the time it is read
    decoy = await _bp(store, ada, 120, 78, NOW - timedelta(minutes=1))
    await _bp(store, bo, 190, 102, NOW)  # a crisis behind it, in the next batch
    await _bp(store, cy, 176, 95, NOW)  # a rise from Cy's history, whose one row is bad too
    move_ciphertext(db_path, first, decoy)
    move_ciphertext(db_path, old, decoy)
    # Before: TamperedDataError on every pass; run() logged it and never got past the row,
    # so no patient's reading was evaluated again, nor any time-based rule ticked.
    await engine.run_until_idle()
    opened = sorted((a[1], a[2]) for a in await _alerts(store))
    assert opened == [(bo, "bp-crisis")]  # Cy's rise needed the unreadable history
    [(last_reading,)] = await store.query(
        "SELECT max(id) FROM resources WHERE type = 'Observation'"
    )
    assert await engine.cursor() == last_reading  # past the bad row, and everything after
    failures = await store.query(
        "SELECT actor, entity, detail FROM audit WHERE outcome = 'failure' ORDER BY id"
    )
    assert failures == [  # logged and audited where it was met: the feed, then histories
        (alerts.ACTOR, f"Observation/{first}", UNREADABLE_LEFT_OUT),
        (alerts.ACTOR, f"Observation/{first}", UNREADABLE_LEFT_OUT),
        (alerts.ACTOR, f"Observation/{old}", UNREADABLE_LEFT_OUT),
    ]
    assert await engine.evaluate_new(await engine.cursor()) == await engine.cursor()
    # The worklist shows an alert whose triggering reading became unreadable afterwards.
    [view] = await AlertBook(store).views(NURSE)
    trigger = view.alert.trigger_ref.removeprefix("Observation/")
    move_ciphertext(db_path, trigger, decoy)
    [view] = await AlertBook(store).views(NURSE)  # before: TamperedDataError, no worklist
    assert (view.alert.patient_id, view.summary) == (bo, "systolic ≥ 180")


async def test_an_alert_whose_sealed_finding_fails_authentication_stays_workable(
    store: Store, db_path: Path
) -> None:
    clock = Clock(NOW)
    ada, bo = [await _patient(store) for _ in range(2)]
    engine, cursor = await _engine(store, clock)
    await _bp(store, ada, 186, 100, NOW)
    await _bp(store, bo, 188, 102, NOW)
    await engine.evaluate_new(cursor)
    [(first, *_), (second, *_)] = await _alerts(store)
    conn = sqlite3.connect(db_path)  # the second alert's sealed finding moved onto the first
    conn.execute(
        "UPDATE alerts SET detail = (SELECT detail FROM alerts WHERE id = ?) WHERE id = ?",
        (second, first),
    )
    conn.commit()
    conn.close()
    book = AlertBook(store)
    views = {v.alert.id: v for v in await book.views(NURSE)}  # before: TamperedDataError
    assert views[first].summary == alerts.UNREADABLE_FINDING
    assert views[second].summary == "systolic ≥ 180"
    summary, values, note = await book.detail(first, NURSE)
    assert (summary, values, note) == (alerts.UNREADABLE_FINDING, "", None)
    await book.acknowledge(first, NURSE)  # and it can still be worked
    assert [a[4] for a in await _alerts(store)] == ["acknowledged", "open"]


async def test_run_until_idle_on_a_fresh_engine_keeps_its_starting_point(store: Store) -> None:
    clock = Clock(NOW)
    patient = await _patient(store)
    engine = AlertEngine(store, clock=clock, backlog_hours=None)
    start = await engine.run_until_idle()  # nothing new: the start is stored all the same
    await _bp(store, patient, 192, 104, NOW)
    assert await engine.run_until_idle() > start
    assert [(a[2], a[4]) for a in await _alerts(store)] == [("bp-crisis", "open")]
    # Another engine on the same database (a restart) resumes there, not at the newest row.
    later = AlertEngine(store, clock=clock, backlog_hours=None)
    assert await later.cursor() == await engine.cursor()


async def test_the_site_config_sets_escalation_backlog_and_quiet_days(store: Store) -> None:
    from appliance.config import RpmConfig
    from services.devices import alert_engine

    start = datetime.now(UTC).replace(microsecond=0)
    quiet, own = await _patient(store), await _patient(store)
    await Enrollments(store).set_threshold(own, "no-data", {"days": 5}, NURSE)
    config = RpmConfig(
        escalate_critical_min=5, escalate_high_min=0, sync_backlog_hours=0, quiet_days=1
    )
    engine = alert_engine(store, config)
    # One day without readings: quiet for the site's 1 day; the patient's own 5 days win.
    changed = await engine.tick(start + timedelta(days=1, minutes=1))
    assert [(a.patient_id, a.rule) for a in changed] == [(quiet, "no-data")]
    # Backlog off: the outbox has waited two days (the patients), and no site alert opens.
    assert await engine.tick(start + timedelta(days=2)) == []
    assert alerts.SITE not in {a.patient_id for a in await engine.book.live(NURSE)}
    # A critical alert escalates after 5 minutes; a high one never does (0 minutes).
    crisis = alert_engine(store, config, clock=Clock(start))
    cursor = await crisis.cursor()
    await _bp(store, quiet, 200, 110, start)
    await _bp(store, own, 85, 60, start)
    await crisis.evaluate_new(cursor)
    changed = await crisis.tick(start + timedelta(minutes=5))
    assert [(a.patient_id, a.rule, a.escalated_to) for a in changed] == [
        (quiet, "bp-crisis", "provider")
    ]
    assert not await crisis.tick(start + timedelta(hours=12))  # hypotension (high): never
