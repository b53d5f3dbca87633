"""Who is enrolled in remote monitoring, in which program, with which thresholds.

A patient is enrolled in one program at a time (``rpm_enrollment``, keyed by patient); the
program gives the rules and their default thresholds (``services/rpm_rules.py``), and a
clinician may set a patient's own value for any rule (``rpm_thresholds``, validated against
:data:`services.rpm_rules.RULE_PARAMS`: sane ranges, every problem listed at once) or turn a
rule on or off for them. Unenrolling ends the enrolment (``ended_at``; the row is kept: the
billing periods count from it); enrolling again starts a new one.

Every change is audited with the patient's pseudonymous key; reads of who is enrolled are
audited as searches (an enrolment says what a patient is monitored for).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction

import orjson

from appliance import fhir
from appliance.audit import AuditAction, AuditEvent
from appliance.errors import ApplianceError
from appliance.store import Store
from services import rpm_rules
from services.rpm_rules import Program, ThresholdError, Thresholds


class EnrollmentError(ApplianceError):
    """An enrolment change that cannot be made (not enrolled, invalid thresholds)."""


@dataclass(frozen=True, slots=True)
class Enrollment:
    """A patient's current enrolment and their own thresholds (rule → parameters)."""

    patient_id: str
    program: Program
    chronic_lung_disease: bool
    enrolled_at: datetime
    enrolled_by: str
    overrides: Mapping[str, Mapping[str, float | bool]]

    def thresholds(self, site: rpm_rules.SiteDefaults | None = None) -> Thresholds:
        """The thresholds in force (program and ``site`` defaults, lung disease, own values)."""
        return rpm_rules.thresholds_for(
            self.program,
            chronic_lung_disease=self.chronic_lung_disease,
            overrides=self.overrides,
            site=site,
        )


def _jsonable(params: Mapping[str, Fraction | bool]) -> dict[str, float | int | bool]:
    """Validated parameters as JSON: whole numbers stay integers, others exact decimals."""
    out: dict[str, float | int | bool] = {}
    for name, value in params.items():
        if isinstance(value, bool):
            out[name] = value
        elif value.denominator == 1:
            out[name] = int(value)
        else:
            out[name] = float(value)
    return out


# An ended enrolment is replaced by the new one; a current one changes program and keeps its
# start (_ENROLL) or takes the one given (_ENROLL_FROM, a back-dated start).
_ENROLL_SQL = (
    "INSERT INTO rpm_enrollment (patient_id, program, chronic_lung_disease, enrolled_at, "
    "enrolled_by) VALUES (?, ?, ?, ?, ?) ON CONFLICT (patient_id) DO UPDATE SET "
    "program = excluded.program, chronic_lung_disease = excluded.chronic_lung_disease, "
    "enrolled_at = CASE WHEN ended_at IS NULL THEN {current} ELSE excluded.enrolled_at END, "
    "enrolled_by = CASE WHEN ended_at IS NULL THEN enrolled_by ELSE excluded.enrolled_by END, "
    "ended_at = NULL"
)
_ENROLL = _ENROLL_SQL.format(current="enrolled_at")
_ENROLL_FROM = _ENROLL_SQL.format(current="excluded.enrolled_at")
MAX_BACKDATE_DAYS = 30  # how far back an enrolment may start (a late-entered enrolment)


def _check_start(enrolled_at: datetime, now: datetime) -> datetime:
    """A back-dated start, checked: aware, not after ``now``, at most 30 calendar days back."""
    zone = enrolled_at.tzinfo
    if zone is None or enrolled_at.utcoffset() is None:
        raise EnrollmentError("the enrolment start needs a time zone")
    if enrolled_at > now:
        raise EnrollmentError("the enrolment cannot start in the future")
    today = now.astimezone(zone).date()
    if (today - enrolled_at.date()).days > MAX_BACKDATE_DAYS:
        raise EnrollmentError(
            f"the enrolment can start at most {MAX_BACKDATE_DAYS} days back ({today})"
        )
    return enrolled_at


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class Enrollments:
    """Enrolment and per-patient thresholds, kept in the store's database."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def _event(self, actor: str, action: AuditAction, patient_id: str, detail: str) -> AuditEvent:
        return AuditEvent(
            actor,
            action,
            patient_key=self._store.patient_key(f"Patient/{patient_id}"),
            entity="rpm-enrollment",
            detail=detail,
        )

    async def enroll(
        self,
        patient_id: str,
        program: Program | str,
        actor: str,
        *,
        chronic_lung_disease: bool | None = None,
        enrolled_at: datetime | None = None,
    ) -> Enrollment:
        """Enrol a patient (or move them to another program; their thresholds are kept).

        ``chronic_lung_disease`` defaults to True for COPD, else False. ``enrolled_at``
        back-dates the start (the billing periods count from its calendar day in its own
        time zone): not in the future, and at most :data:`MAX_BACKDATE_DAYS` calendar days
        back. Without it a new enrolment starts now and a current one keeps its start; with
        it a current enrolment's start is corrected.
        """
        try:
            chosen = Program(program)
        except ValueError:
            known = ", ".join(p.value for p in Program)
            raise EnrollmentError(f"unknown program {program!r}; one of {known}") from None
        lung = chosen is Program.COPD if chronic_lung_disease is None else chronic_lung_disease
        moment = self._store.now()
        now = fhir.utc_text(moment)
        start = now if enrolled_at is None else fhir.utc_text(_check_start(enrolled_at, moment))
        sql = _ENROLL if enrolled_at is None else _ENROLL_FROM

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(sql, (patient_id, chosen.value, int(lung), start, actor))

        detail = f"enrolled {chosen.value}" + ("" if enrolled_at is None else f" from {start}")
        event = self._event(actor, AuditAction.CREATE, patient_id, detail)
        await self._store.transact(work, [event])
        return await self._current(patient_id)

    async def unenroll(self, patient_id: str, actor: str) -> None:
        """End a patient's enrolment (the row stays; alerts already open stay open)."""
        now = fhir.utc_text(self._store.now())

        def work(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE rpm_enrollment SET ended_at = ? WHERE patient_id = ? AND ended_at IS NULL",
                (now, patient_id),
            )
            if cur.rowcount != 1:
                raise EnrollmentError("the patient is not enrolled")

        event = self._event(actor, AuditAction.UPDATE, patient_id, "unenrolled")
        await self._store.transact(work, [event])

    async def set_threshold(
        self, patient_id: str, rule: str, params: Mapping[str, object], actor: str
    ) -> Thresholds:
        """Set a patient's own parameters for one rule; returns the thresholds in force.

        ``params`` holds any of the rule's parameters (``{"systolic": 170}``) and/or
        ``enabled``. Invalid values are refused with every problem listed, and so is a value
        that would put the rule's thresholds out of order with what is already set.
        """
        if not params:
            raise EnrollmentError(f"{rule}: no parameters given")
        try:
            clean = rpm_rules.validate_params(rule, params)
        except ThresholdError as exc:
            raise EnrollmentError(str(exc)) from None
        current = await self._current(patient_id)
        merged = {**current.overrides.get(rule, {}), **_jsonable(clean)}
        trial = {**current.overrides, rule: merged}
        try:
            thresholds = rpm_rules.thresholds_for(
                current.program, chronic_lung_disease=current.chronic_lung_disease, overrides=trial
            )
        except ThresholdError as exc:
            raise EnrollmentError(str(exc)) from None
        now = fhir.utc_text(self._store.now())
        body = orjson.dumps(merged, option=orjson.OPT_SORT_KEYS).decode()

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO rpm_thresholds (patient_id, rule, params, set_by, set_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (patient_id, rule) DO UPDATE SET "
                "params = excluded.params, set_by = excluded.set_by, set_at = excluded.set_at",
                (patient_id, rule, body, actor, now),
            )

        # The rule and the values a clinician chose are not identifying: they go in the detail.
        event = self._event(actor, AuditAction.CONFIG, patient_id, f"threshold {rule} {body}")
        await self._store.transact(work, [event])
        return thresholds

    async def clear_threshold(self, patient_id: str, rule: str, actor: str) -> bool:
        """Back to the program default for one rule; False when there was nothing to clear."""

        def work(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "DELETE FROM rpm_thresholds WHERE patient_id = ? AND rule = ?", (patient_id, rule)
            )
            return cur.rowcount > 0

        event = self._event(actor, AuditAction.CONFIG, patient_id, f"threshold {rule} cleared")
        return await self._store.transact(work, [event])

    async def get(self, patient_id: str, actor: str) -> Enrollment | None:
        """A patient's current enrolment, None when not enrolled (audited as a read)."""
        found = await self._read(patient_id, actor)
        return found.get(patient_id)

    async def enrolled(self, actor: str, *, program: Program | None = None) -> list[Enrollment]:
        """Everyone enrolled now (in ``program``), by enrolment time (audited as a search)."""
        found = await self._read(None, actor, program=program)
        return sorted(found.values(), key=lambda e: (e.enrolled_at, e.patient_id))

    async def _current(self, patient_id: str) -> Enrollment:
        found = (await self._read(patient_id, None)).get(patient_id)
        if found is None:
            raise EnrollmentError("the patient is not enrolled")
        return found

    async def _read(
        self, patient_id: str | None, actor: str | None, *, program: Program | None = None
    ) -> dict[str, Enrollment]:
        where = ["ended_at IS NULL"]
        params: list[str] = []
        if patient_id is not None:
            where.append("patient_id = ?")
            params.append(patient_id)
        if program is not None:
            where.append("program = ?")
            params.append(program.value)
        clause = " AND ".join(where)

        def work(conn: sqlite3.Connection) -> dict[str, Enrollment]:
            rows = conn.execute(
                "SELECT patient_id, program, chronic_lung_disease, enrolled_at, enrolled_by "  # noqa: S608 - fixed clauses
                f"FROM rpm_enrollment WHERE {clause}",
                params,
            ).fetchall()
            overrides: dict[str, dict[str, dict[str, float | bool]]] = {}
            for pid, rule, body in conn.execute(
                "SELECT patient_id, rule, params FROM rpm_thresholds ORDER BY patient_id, rule"
            ).fetchall():
                overrides.setdefault(pid, {})[rule] = orjson.loads(body)
            return {
                pid: Enrollment(
                    pid, Program(prog), bool(lung), _time(at), by, overrides.get(pid, {})
                )
                for pid, prog, lung, at, by in rows
            }

        if actor is None:  # an internal check before a change the caller audits
            return await self._store.transact(work)
        key = None if patient_id is None else self._store.patient_key(f"Patient/{patient_id}")
        entity = "rpm-enrollment" + ("" if patient_id else " all")
        event = AuditEvent(
            actor,
            AuditAction.READ if patient_id else AuditAction.SEARCH,
            patient_key=key,
            entity=entity,
        )
        return await self._store.transact(work, [event])
