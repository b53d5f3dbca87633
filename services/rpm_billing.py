"""Remote patient monitoring billing counters (Medicare 2026) and staff time logs.

**Device supply — 99454 / 99445, per 30-day period.** Periods run from the enrolment:
period 1 starts on the calendar day (site zone, ``config.site.timezone``) of
``rpm_enrollment.enrolled_at`` and is 30 calendar days long; period 2 starts the next day,
and so on, whatever the calendar month. A day counts when the patient has at least one
reading taken **at home** that day — an Observation tagged
``urn:telehealth-appliance:fhir:capture-setting|home`` whose effective time falls on that
calendar day in the site's zone (a reading at 23:30 in Chicago is that day, not the next
UTC day). Clinic readings never count (REFERENCE.md, "Remote patient monitoring"), nor do
readings entered in error. 16 or more days earn 99454; 2 to 15 days earn 99445 (new in
2026); fewer earn neither. A period is **at risk** when, counting today if it has no
reading yet, the days left in it can no longer bring the count to 16.

**Management time — 99470 / 99457 / 99458, per calendar month** (site zone) of the logged
``performed_on`` days, all minutes of the month added up. All three require interactive
communication with the patient or caregiver during the month (at least one log marked
``interactive``); without it, no time code is earned. Our reading of how they interact:
99470 (first 10 minutes, new in 2026) and 99457 (first 20 minutes) are **alternatives for
the same first block of time, never both**: 10-19 minutes earn 99470; 20 or more earn 99457
instead, plus one 99458 for each further full 20 minutes (40 min: 99457 + 99458; 60 min:
99457 + 2 x 99458); under 10 minutes earn nothing. 99458 is an add-on to 99457 only, never
to 99470. Payers may cap 99458 units; that cap is not applied here (*verify* per payer).

**Reading the days without decrypting everything.** The store indexes resources by
``(patient_key, type, effective)`` in plain columns; the capture setting is inside the
encrypted body. So for each patient the period's Observations are found by that index alone
(row id and effective time: a covering index scan), each is placed on its local day by
comparing its time with the day's local midnight in UTC, and a body is fetched and
decrypted only for a day not counted yet, in time order: a patient measuring three times a
day costs about one decryption per day, not three. Each patient's look-up is audited as one
search (actor ``service:rpm`` by default, naming the person who asked in the detail), all
in one write. Measured on the development machine: 1,000 enrolled patients x 30 days x 3
readings (90,000 Observations, one a day in clinic) counted in about 1.1 s, decrypting
30,000 bodies; decrypting all 90,000 in one table scan takes about as long (AES-GCM is
cheap next to SQLite and Python per row), so the gain is fewer PHI bodies opened, and a cost
that grows with days rather than readings (``docs/ingest.md``).

Time-log notes are free text a person writes, so they are sealed (:meth:`Keyring.seal`)
under their own label, :data:`NOTE_LABEL`, bound to the row id.
"""

from __future__ import annotations

import bisect
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from appliance import db, fhir
from appliance.audit import AuditAction, AuditEvent
from appliance.errors import ApplianceError
from appliance.store import Store
from services.vitals import CAPTURE_SETTING_SYSTEM

PERIOD_DAYS = 30
FULL_DAYS = 16  # 99454
LEAST_DAYS = 2  # 99445
NOTE_LABEL = "rpm_time_log.note"  # sealed under its own label (key_rotation.SEALED_COLUMNS)
MAX_MINUTES = 600  # the table's CHECK: one log is at most a working day
MAX_NOTE = 2000
_NOT_COUNTED_STATUSES = frozenset({"entered-in-error", "cancelled"})


class RpmError(ApplianceError):
    """An RPM record that cannot be made (patient not enrolled, minutes out of range)."""


# -- the rules (pure) -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Period:
    """One 30-day device-supply period: its number (1 = from enrolment) and first/last day."""

    number: int
    start: date
    end: date  # inclusive


def period_on(enrolled_on: date, day: date) -> Period:
    """The period of an enrolment that ``day`` falls in (``day`` on or after enrolment)."""
    if day < enrolled_on:
        raise ValueError("day is before the enrolment")
    index = (day - enrolled_on).days // PERIOD_DAYS
    start = enrolled_on + timedelta(days=index * PERIOD_DAYS)
    return Period(index + 1, start, start + timedelta(days=PERIOD_DAYS - 1))


def device_code(days: int) -> str | None:
    """The device-supply code ``days`` with home readings earn in one period."""
    if days >= FULL_DAYS:
        return "99454"
    if days >= LEAST_DAYS:
        return "99445"
    return None


def at_risk(days: Sequence[date], as_of: date, period: Period) -> bool:
    """Whether the period can no longer reach 16 days, counting from ``as_of`` on."""
    counted = len(days)
    if counted >= FULL_DAYS:
        return False
    still_open = (period.end - as_of).days + (0 if as_of in days else 1)
    return counted + max(0, still_open) < FULL_DAYS


def management_codes(minutes: int, interactive: bool) -> tuple[str, ...]:
    """The month's time codes: 99470 for 10-19 min, else 99457 + 99458 per further 20 min."""
    if not interactive or minutes < 10:
        return ()
    if minutes < 20:
        return ("99470",)
    return ("99457",) + ("99458",) * ((minutes - 20) // 20)


def day_start_utc(day: date, zone: ZoneInfo) -> str:
    """Local midnight of ``day`` as the store's fixed-width UTC text (for range queries)."""
    moment = datetime.combine(day, time(), zone).astimezone(UTC)
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def is_home_reading(observation: dict[str, Any]) -> bool:
    """Tagged as taken at home, and not withdrawn."""
    if observation.get("status") in _NOT_COUNTED_STATUSES:
        return False
    tags = (observation.get("meta") or {}).get("tag") or []
    return any(t.get("system") == CAPTURE_SETTING_SYSTEM and t.get("code") == "home" for t in tags)


# -- records --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Enrollment:
    """A patient enrolled in a monitoring program."""

    patient_id: str
    program: str
    enrolled_on: date
    ended_on: date | None


@dataclass(frozen=True, slots=True)
class PatientBilling:
    """What one enrolled patient has earned as of a day (no PHI: the local id only)."""

    patient_id: str
    program: str
    period: Period
    days: tuple[date, ...]  # the days with a home reading, up to as_of
    device_code: str | None
    at_risk: bool
    ended: bool
    month: str  # YYYY-MM
    minutes: int
    interactive: bool
    time_codes: tuple[str, ...]

    def json(self) -> dict[str, Any]:
        """A plain-JSON form (for ``appliance rpm billing --format json``)."""
        return {
            "patient_id": self.patient_id,
            "program": self.program,
            "period": {
                "number": self.period.number,
                "start": self.period.start.isoformat(),
                "end": self.period.end.isoformat(),
            },
            "days_with_home_readings": len(self.days),
            "device_code": self.device_code,
            "at_risk": self.at_risk,
            "ended": self.ended,
            "month": self.month,
            "minutes": self.minutes,
            "interactive": self.interactive,
            "time_codes": list(self.time_codes),
        }


def _day(text: str, zone: ZoneInfo) -> date:
    """The site-zone day of a stored time: a date as it is, a time without an offset as UTC."""
    if len(text) == 10:
        return date.fromisoformat(text)
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(zone).date()


@dataclass(frozen=True, slots=True)
class _Window:
    """The days of one enrolment to count: its period, up to ``last`` (as-of or end day)."""

    enrollment: Enrollment
    patient_key: bytes
    period: Period
    last: date


class RpmBilling:
    """Billing counters and staff time logs over the store, in the site's zone."""

    def __init__(self, store: Store, zone: ZoneInfo) -> None:
        self._store = store
        self._zone = zone

    def today(self) -> date:
        """Today in the site's zone (by the store's clock)."""
        return self._store.now().astimezone(self._zone).date()

    async def enrollments(self, patient_id: str | None = None) -> list[Enrollment]:
        """Enrolments (one patient's, or all), by patient id."""
        where, params = ("WHERE patient_id = ?", (patient_id,)) if patient_id else ("", ())
        rows = await self._store.query(
            "SELECT patient_id, program, enrolled_at, ended_at FROM rpm_enrollment "  # noqa: S608 - constant
            f"{where} ORDER BY patient_id",
            params,
        )
        return [
            Enrollment(str(p), str(program), _day(start, self._zone), end and _day(end, self._zone))
            for p, program, start, end in rows
        ]

    async def observations(
        self,
        patient_id: str,
        since: datetime,
        codes: Sequence[str],
        *,
        actor: str,
        limit: int = 5000,
    ) -> tuple[list[dict[str, Any]], bool]:
        """A patient's Observations coded one of ``codes`` (``system|code``) taken since ``since``.

        Newest first, at most ``limit``; the flag is True when older ones in the window were
        left out. Audited as one search. For the patient page's trend charts: the index
        ``(patient_key, type, effective)`` bounds the scan to the window, so a long history
        costs nothing, and only the wanted codes are decrypted.
        """
        key = self._store.patient_key(f"Patient/{patient_id}")
        marks = ",".join("?" * len(codes))
        store = self._store

        def work(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT id, logical_id, type, key_version, body FROM resources "  # noqa: S608 - placeholders only
                f"WHERE patient_key = ? AND type = 'Observation' AND effective >= ? "
                f"AND code IN ({marks}) ORDER BY effective DESC LIMIT ?",
                (key, fhir.utc_text(since), *codes, limit + 1),
            ).fetchall()
            return [store.decrypt_stored(conn, tuple(row)).resource for row in rows]

        found = await db.run_sync(store.connection, work) if codes else []
        event = AuditEvent(
            actor,
            AuditAction.SEARCH,
            patient_key=key,
            entity=f"Observation trend since {since.date().isoformat()}",
            detail=f"{min(len(found), limit)} readings",
        )
        await store.transact(lambda _conn: None, [event])
        return found[:limit], len(found) > limit

    # -- staff time ---------------------------------------------------------------------

    async def log_time(
        self,
        patient_id: str,
        minutes: int,
        *,
        staff: str,
        actor: str,
        performed_on: date | None = None,
        interactive: bool = False,
        note: str | None = None,
    ) -> int:
        """Record minutes of a staff member's work on a patient's monitoring; returns the id."""
        day = performed_on or self.today()
        if not 0 < minutes <= MAX_MINUTES:
            raise RpmError(f"minutes must be 1 to {MAX_MINUTES}")
        if day > self.today():
            raise RpmError("the day the work was done cannot be in the future")
        found = await self.enrollments(patient_id)
        if not found or day < found[0].enrolled_on:
            raise RpmError(f"patient {patient_id} was not enrolled in RPM on {day.isoformat()}")
        text = (note or "").strip()[:MAX_NOTE]
        logged_at = self._store.now().isoformat()

        def work(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO rpm_time_log (patient_id, staff, performed_on, minutes, "
                "interactive, logged_at) VALUES (?, ?, ?, ?, ?, ?)",
                (patient_id, staff, day.isoformat(), minutes, int(interactive), logged_at),
            )
            row_id = int(cur.lastrowid or 0)
            if text:
                sealed = self._store.current_keyring(conn).seal(NOTE_LABEL, str(row_id), text)
                conn.execute("UPDATE rpm_time_log SET note = ? WHERE id = ?", (sealed, row_id))
            return row_id

        event = AuditEvent(
            actor,
            AuditAction.CREATE,
            patient_key=self._store.patient_key(f"Patient/{patient_id}"),
            entity="rpm-time-log",
            detail=f"{minutes} min{' interactive' if interactive else ''} by {staff}",
        )
        return await self._store.transact(work, [event])

    async def open_note(self, log_id: int, actor: str) -> str | None:
        """The sealed note of a time log (audited as a read); None when it has none."""
        rows = await self._store.query(
            "SELECT patient_id, note FROM rpm_time_log WHERE id = ?", (log_id,)
        )
        if not rows:
            raise RpmError(f"no time log {log_id}")
        patient_id, sealed = rows[0]
        event = AuditEvent(
            actor,
            AuditAction.READ,
            patient_key=self._store.patient_key(f"Patient/{patient_id}"),
            entity=f"rpm-time-log/{log_id}",
        )
        # The audit record's transaction also loads a data key another process rotated in.
        await self._store.transact(lambda _conn: None, [event])
        if sealed is None:
            return None
        return self._store.keyring.unseal(NOTE_LABEL, str(log_id), bytes(sealed))

    # -- counters -----------------------------------------------------------------------

    async def billing(
        self,
        as_of: date | None = None,
        *,
        patient_id: str | None = None,
        actor: str = "service:rpm",
        requested_by: str | None = None,
    ) -> list[PatientBilling]:
        """Every enrolled patient's counters as of ``as_of`` (default today, site zone).

        Listed: enrolments begun by ``as_of`` and not ended before its month began. An ended
        enrolment is counted up to its last day and is never at risk.
        """
        day = as_of or self.today()
        month_start = day.replace(day=1)
        chosen = [
            e
            for e in await self.enrollments(patient_id)
            if e.enrolled_on <= day and (e.ended_on is None or e.ended_on >= month_start)
        ]
        windows: list[_Window] = []
        for enrollment in chosen:
            last = day if enrollment.ended_on is None else min(day, enrollment.ended_on)
            key = self._store.patient_key(f"Patient/{enrollment.patient_id}")
            windows.append(_Window(enrollment, key, period_on(enrollment.enrolled_on, last), last))
        failures: list[AuditEvent] = []
        days = await db.run_sync(self._store.connection, self._home_days, windows, actor, failures)
        events = [
            AuditEvent(
                actor,
                AuditAction.SEARCH,
                patient_key=w.patient_key,
                entity=f"Observation home days {w.period.start.isoformat()}..{w.last.isoformat()}",
                detail="rpm billing" + (f" for {requested_by}" if requested_by else ""),
            )
            for w in windows
        ] + failures
        if events:
            await self._store.transact(lambda _conn: None, events)
        time_by_patient = await self._month_time(month_start, day)
        found = []
        for window, counted in zip(windows, days, strict=True):
            enrollment, period = window.enrollment, window.period
            ended = enrollment.ended_on is not None and enrollment.ended_on <= day
            minutes, interactive = time_by_patient.get(enrollment.patient_id, (0, False))
            found.append(
                PatientBilling(
                    patient_id=enrollment.patient_id,
                    program=enrollment.program,
                    period=period,
                    days=counted,
                    device_code=device_code(len(counted)),
                    at_risk=not ended and at_risk(counted, window.last, period),
                    ended=ended,
                    month=month_start.strftime("%Y-%m"),
                    minutes=minutes,
                    interactive=interactive,
                    time_codes=management_codes(minutes, interactive),
                )
            )
        return found

    def _home_days(
        self,
        conn: sqlite3.Connection,
        windows: Sequence[_Window],
        actor: str,
        failures: list[AuditEvent],
    ) -> list[tuple[date, ...]]:
        """Per window, the local days with a home reading (decrypting at most until one a day).

        The scan reads the index only (``patient_key, type, effective`` plus the rowid); a body
        is fetched and decrypted only for a day not yet counted, in time order. A reading that
        fails authentication does not count (it is logged, with a record in ``failures``).
        """
        store, zone = self._store, self._zone
        result = []
        for window in windows:
            days = [
                window.period.start + timedelta(days=n)
                for n in range((window.last - window.period.start).days + 2)
            ]
            # Local midnights as UTC text: a reading's day is found by comparing strings.
            edges = [day_start_utc(d, zone) for d in days]
            rows = conn.execute(
                "SELECT id, effective FROM resources WHERE patient_key = ? "
                "AND type = 'Observation' AND effective >= ? AND effective < ? ORDER BY effective",
                (window.patient_key, edges[0], edges[-1]),
            ).fetchall()
            found: set[date] = set()
            for row_id, effective in rows:
                day = days[bisect.bisect_right(edges, effective) - 1]
                if day in found:
                    continue  # this day already counts: no need to open another reading
                row = conn.execute(
                    "SELECT id, logical_id, type, key_version, body FROM resources WHERE id = ?",
                    (row_id,),
                ).fetchone()
                readable = store.decrypt_readable(conn, [row], actor, failures)
                if readable and is_home_reading(readable[0].resource):
                    found.add(day)
            result.append(tuple(sorted(found)))
        return result

    async def _month_time(self, month_start: date, last: date) -> dict[str, tuple[int, bool]]:
        rows = await self._store.query(
            "SELECT patient_id, sum(minutes), max(interactive) FROM rpm_time_log "
            "WHERE performed_on >= ? AND performed_on <= ? GROUP BY patient_id",
            (month_start.isoformat(), last.isoformat()),
        )
        return {str(p): (int(m), bool(i)) for p, m, i in rows}
