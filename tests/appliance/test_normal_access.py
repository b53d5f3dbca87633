"""Normal access (no break-glass needed): one patient's answer and everybody's agree.

``break_glass.normal_access`` answers for one patient (the chart, the RPM page);
``break_glass.normal_access_all`` for every patient at once (the nurse's queue and its live
stream). Both read the same two rules; this checks them against each other over patients in
every state, on a real store, with the local day's edge in the site's time zone.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from appliance import break_glass, db
from appliance.device_registry import DeviceRegistry, StationKind
from appliance.store import Store
from services.rpm_enrollment import Enrollments
from services.rpm_rules import Program
from tests import factories

ZONE = ZoneInfo("America/Chicago")
ACTOR = "user:test"


async def test_everyone_at_once_agrees_with_one_at_a_time(store: Store) -> None:
    made = await store.create(
        [factories.patient(family=f"Access{i}", mrn=f"AC{i:03d}") for i in range(6)], ACTOR
    )
    ids = [item.logical_id for item in made]
    registry = DeviceRegistry(store)
    for station in ("exam-1", "exam-2", "exam-3"):
        await registry.add_station(station, station, StationKind.EXAM_ROOM, ACTOR)
    enrolments = Enrollments(store)
    await registry.check_in("exam-1", ids[0], ACTOR)  # still checked in
    await registry.check_in("exam-2", ids[1], ACTOR)  # checked in today, then out
    await registry.check_out("exam-2", ACTOR)
    await enrolments.enroll(ids[2], Program.HYPERTENSION, ACTOR)  # enrolled
    await enrolments.enroll(ids[3], Program.HYPERTENSION, ACTOR)  # enrolled, then ended
    await enrolments.unenroll(ids[3], ACTOR)
    await registry.check_in("exam-3", ids[4], ACTOR)  # both: checked in wins
    await enrolments.enroll(ids[4], Program.HYPERTENSION, ACTOR)
    # ids[5]: nothing at all.

    def both(conn: object, now: datetime) -> tuple[dict[str, str], dict[str, str | None]]:
        everyone = break_glass.normal_access_all(conn, now=now, zone=ZONE)  # type: ignore[arg-type]
        each = {
            p: break_glass.normal_access(conn, p, now=now, zone=ZONE)  # type: ignore[arg-type]
            for p in ids
        }
        return everyone, each

    now = datetime.now(UTC)
    everyone, each = await db.run_sync(store.connection, both, now)
    assert everyone == {p: reason for p, reason in each.items() if reason is not None}
    assert list(everyone) == sorted(everyone)
    assert each == {
        ids[0]: break_glass.CHECKED_IN_TODAY,
        ids[1]: break_glass.CHECKED_IN_TODAY,
        ids[2]: break_glass.ENROLLED_IN_RPM,
        ids[3]: None,
        ids[4]: break_glass.CHECKED_IN_TODAY,
        ids[5]: None,
    }
    # Two local days later: the one checked out is no longer covered; the one still checked
    # in and the enrolled ones still are.
    later = now + timedelta(days=2)
    everyone, each = await db.run_sync(store.connection, both, later)
    assert everyone == {p: reason for p, reason in each.items() if reason is not None}
    assert set(everyone) == {ids[0], ids[2], ids[4]}
    assert everyone[ids[4]] == break_glass.CHECKED_IN_TODAY
