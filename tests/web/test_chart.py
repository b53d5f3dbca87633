"""The patient chart and the one access rule (normal access or break-glass), over a real store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from quart.testing import QuartClient
from quart.typing import TestAppProtocol as ServedApp

from appliance import break_glass, db, users
from appliance.device_registry import DeviceRegistry, StationKind
from appliance.store import Store
from services import intake
from services.rpm_enrollment import Enrollments
from services.rpm_rules import Program
from tests import factories
from tests.web.conftest import NURSE, FakeClock, form_token, login

KIOSK = "kiosk:kiosk-1"
PNG = intake.PNG_MAGIC + b"\x00\x00\x00\rIHDR synthetic photo bytes"
ADMIN, ADMIN_PASSWORD = "admin1", "admin horse battery staple"


async def _patient(store: Store, family: str = "Charttest") -> str:
    [stored] = await store.create(
        [factories.patient(family=family, given="Cora", birth_date="1950-02-03", mrn="MRN98765")],
        "user:setup",
    )
    return stored.logical_id


async def _check_in(store: Store, patient_id: str) -> None:
    registry = DeviceRegistry(store)
    if "kiosk-1" not in {s.id for s in await registry.stations()}:
        await registry.add_station("kiosk-1", "Kiosk 1", StationKind.KIOSK, "user:setup")
    await registry.check_in("kiosk-1", patient_id, "user:setup")


async def _visit(store: Store, clock: FakeClock, patient_id: str) -> str:
    """A kiosk check-in as the kiosk stores it; returns the photo's Media id."""
    ref = f"Patient/{patient_id}"
    now = clock()
    answers = intake.IntakeAnswers("Dizzy since Monday", ("dizzy", "pain"), (2, 1))
    await store.create([intake.questionnaire_response(answers, ref, now, "es")], KIOSK)
    await store.create([intake.consent(ref, PNG, now, "es", "Acepto")], KIOSK)
    await store.create(
        [factories.bp_observation(ref, 141, 88, effective=now.isoformat())], "service:devices"
    )
    await store.create(
        [factories.bp_observation(ref, 150, 95, effective="2025-01-02T09:00:00-06:00")],
        "service:devices",
    )
    [media] = await store.create([intake.photo_media(ref, PNG, now, "kiosk-1")], KIOSK)
    await store.create([intake.arrival(ref, now, "kiosk-1", None)], KIOSK)
    return media.logical_id


def _audit(db_path: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(
            "SELECT actor, action, outcome, patient_key, entity, detail FROM audit ORDER BY id"
        ).fetchall()
    finally:
        conn.close()


async def _break_glass(client: QuartClient, family: str = "Charttest") -> int:
    page = await client.get("/break-glass")
    response = await client.post(
        "/break-glass",
        form={
            "family": family,
            "birth_date": "1950-02-03",
            "category": break_glass.Category.PATIENT_CONTACT.value,
            "reason": "Patient phoned about dizziness, needs her readings",
            "csrf_token": form_token(await page.get_data()),
        },
    )
    assert response.status_code == 302, response.status_code
    return int(response.location.rsplit("/", 1)[1])


# -- the chart ------------------------------------------------------------------------------


async def test_chart_shows_demographics_masked_vitals_intake_consent_photos_and_visits(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    patient_id = await _patient(store)
    await _check_in(store, patient_id)
    media_id = await _visit(store, clock, patient_id)
    response = await logged_in.get(f"/patients/{patient_id}")
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = (await response.get_data()).decode()
    assert "Charttest, Cora" in body
    assert "1950-02-03" in body
    assert "••••8765" in body
    assert "MRN98765" not in body
    # This visit's reading, and both readings in the history by vital.
    visit = body[body.index('id="this-visit"') : body.index('id="intake"')]
    assert "141/88 mmHg" in visit
    assert "150/95" not in visit
    history = body[body.index('id="history"') : body.index('id="consent"')]
    assert "Blood pressure" in history
    assert "150/95 mmHg" in history
    # The intake answers, the PHQ-2 score (2 + 1) and its reading.
    assert "Dizzy since Monday" in body
    assert "Dizziness, Pain" in body
    assert "More than half the days" in body
    assert "PHQ-2 score: 3" in body
    assert "Positive screen" in body
    assert "language es" in body
    consent = body[body.index('id="consent"') : body.index('id="visits"')]
    assert "active" in consent
    assert "on file" in consent
    assert f'src="/patients/{patient_id}/photos/{media_id}"' in body
    visits = body[body.index('id="visits"') : body.index('id="photos"')]
    assert "arrived" in visits
    assert "kiosk kiosk-1" in visits


async def test_a_negative_phq2_is_read_as_negative(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    patient_id = await _patient(store)
    await _check_in(store, patient_id)
    answers = intake.IntakeAnswers("Follow-up", (), (0, 1))
    await store.create(
        [intake.questionnaire_response(answers, f"Patient/{patient_id}", clock(), "en")], KIOSK
    )
    body = (await (await logged_in.get(f"/patients/{patient_id}")).get_data()).decode()
    assert "PHQ-2 score: 1" in body
    assert "Negative screen" in body


async def test_every_chart_read_is_audited_under_the_nurse_with_the_access(
    logged_in: QuartClient, store: Store, clock: FakeClock, db_path: Path
) -> None:
    patient_id = await _patient(store)
    await _check_in(store, patient_id)
    media_id = await _visit(store, clock, patient_id)
    before = len(_audit(db_path))
    assert (await logged_in.get(f"/patients/{patient_id}")).status_code == 200
    assert (await logged_in.get(f"/patients/{patient_id}/photos/{media_id}")).status_code == 200
    key = store.patient_key(f"Patient/{patient_id}")
    mine = [r for r in _audit(db_path)[before:] if r[0] == f"user:{NURSE}" and r[1] != "login"]
    assert [(r[1], r[3], r[4], r[5]) for r in mine] == [
        ("read", key, f"Patient/{patient_id}", "normal access: checked in today"),
        (
            "search",
            key,
            "Observation newest 500; Encounter+QuestionnaireResponse+Consent+Media all (chart)",
            "normal access: checked in today",
        ),
        ("read", key, f"Media/{media_id}", "normal access: checked in today"),
    ]


async def test_photo_is_served_only_to_its_own_patients_chart(
    logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    patient_id = await _patient(store)
    other = await _patient(store, family="Otherchart")
    await _check_in(store, patient_id)
    media_id = await _visit(store, clock, patient_id)
    response = await logged_in.get(f"/patients/{patient_id}/photos/{media_id}")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "image/png"
    assert response.headers["Cache-Control"] == "no-store"
    assert await response.get_data() == PNG
    # The same photo through another patient's chart (who is in normal access too): nothing.
    await store.transact(
        lambda conn: conn.execute(
            "INSERT INTO station_checkins (station_id, patient_id, checked_in_at, actor) "
            "SELECT 'kiosk-1', ?, checked_in_at, actor FROM station_checkins LIMIT 1",
            (other,),
        )
    )
    assert (await logged_in.get(f"/patients/{other}/photos/{media_id}")).status_code == 404
    assert (await logged_in.get(f"/patients/{patient_id}/photos/nope")).status_code == 404


async def test_unknown_patient_is_404(logged_in: QuartClient) -> None:
    assert (await logged_in.get("/patients/no-such-patient")).status_code == 404


async def test_anonymous_is_sent_to_log_in(client: QuartClient, store: Store) -> None:
    patient_id = await _patient(store)
    response = await client.get(f"/patients/{patient_id}")
    assert response.status_code == 302
    assert response.location.startswith("/login")


# -- the access rule -----------------------------------------------------------------------


async def test_a_patient_outside_normal_access_is_refused_with_break_glass_offered(
    logged_in: QuartClient, store: Store, clock: FakeClock, db_path: Path
) -> None:
    patient_id = await _patient(store)
    media_id = await _visit(store, clock, patient_id)  # an arrival alone is not a check-in
    response = await logged_in.get(f"/patients/{patient_id}")
    assert response.status_code == 403
    body = (await response.get_data()).decode()
    assert "outside your normal access" in body
    assert 'href="/break-glass"' in body
    assert "Charttest" not in body
    assert "Dizzy" not in body
    photo = await logged_in.get(f"/patients/{patient_id}/photos/{media_id}")
    assert photo.status_code == 403
    assert await photo.get_data() != PNG
    key = store.patient_key(f"Patient/{patient_id}")
    denied = [r for r in _audit(db_path) if r[2] == "denied"]
    assert [(r[0], r[1], r[3], r[4]) for r in denied] == 2 * [
        (f"user:{NURSE}", "read", key, f"Patient/{patient_id}")
    ]
    reads = [r for r in _audit(db_path) if r[0] == f"user:{NURSE}" and r[1] in ("read", "search")]
    assert all(r[2] == "denied" for r in reads)


async def test_break_glass_opens_the_chart_until_the_grant_expires(
    logged_in: QuartClient, store: Store, clock: FakeClock, db_path: Path
) -> None:
    patient_id = await _patient(store)
    await _visit(store, clock, patient_id)
    assert (await logged_in.get(f"/patients/{patient_id}")).status_code == 403
    grant_id = await _break_glass(logged_in)
    opened = await logged_in.get(f"/patients/{patient_id}")
    assert opened.status_code == 200
    body = (await opened.get_data()).decode()
    assert f"Emergency access (grant {grant_id}" in body
    assert "Dizzy since Monday" in body
    marked = [r for r in _audit(db_path) if r[5] == break_glass.marker(grant_id)]
    assert {r[4] for r in marked} >= {f"Patient/{patient_id}"}
    # Keep the session alive (15 min idle timeout) while the 30-minute grant runs out.
    for _ in range(2):
        clock.advance(14 * 60)
        assert (await logged_in.get(f"/patients/{patient_id}")).status_code == 200
    clock.advance((break_glass.GRANT_MINUTES - 28) * 60 + 1)
    assert (await logged_in.get(f"/patients/{patient_id}")).status_code == 403


async def test_closing_the_grant_early_closes_the_chart(
    logged_in: QuartClient, store: Store
) -> None:
    patient_id = await _patient(store)
    grant_id = await _break_glass(logged_in)
    assert (await logged_in.get(f"/patients/{patient_id}")).status_code == 200
    page = await logged_in.get(f"/break-glass/{grant_id}")
    await logged_in.post(
        f"/break-glass/{grant_id}/end", form={"csrf_token": form_token(await page.get_data())}
    )
    assert (await logged_in.get(f"/patients/{patient_id}")).status_code == 403


async def test_remote_monitoring_enrolment_is_normal_access(
    logged_in: QuartClient, store: Store
) -> None:
    patient_id = await _patient(store)
    await Enrollments(store).enroll(patient_id, Program.HYPERTENSION, "user:admin")
    response = await logged_in.get(f"/patients/{patient_id}")
    assert response.status_code == 200
    body = (await response.get_data()).decode()
    assert "enrolled in remote monitoring" in body
    assert f'href="/rpm/patients/{patient_id}"' in body


async def test_admins_follow_the_same_rule(app: ServedApp, store: Store, clock: FakeClock) -> None:
    await db.run_sync(
        store.connection, users.create_user, ADMIN, ADMIN_PASSWORD, users.Role.ADMIN, now=clock()
    )
    client: QuartClient = app.test_client()  # type: ignore[assignment]
    await login(client, ADMIN, ADMIN_PASSWORD)
    patient_id = await _patient(store)
    assert (await client.get(f"/patients/{patient_id}")).status_code == 403
    await _break_glass(client)
    assert (await client.get(f"/patients/{patient_id}")).status_code == 200


async def test_a_grant_is_personal(
    app: ServedApp, logged_in: QuartClient, store: Store, clock: FakeClock
) -> None:
    patient_id = await _patient(store)
    await _break_glass(logged_in)
    await db.run_sync(
        store.connection,
        users.create_user,
        "nurse2",
        "another long password",
        users.Role.NURSE,
        now=clock(),
    )
    colleague: QuartClient = app.test_client()  # type: ignore[assignment]
    await login(colleague, "nurse2", "another long password")
    assert (await colleague.get(f"/patients/{patient_id}")).status_code == 403


@pytest.mark.parametrize("role", [users.Role.PROVIDER])
async def test_providers_do_not_use_the_nurse_chart(
    app: ServedApp, store: Store, clock: FakeClock, role: users.Role
) -> None:
    await db.run_sync(
        store.connection, users.create_user, "prov1", "provider long password", role, now=clock()
    )
    client: QuartClient = app.test_client()  # type: ignore[assignment]
    await login(client, "prov1", "provider long password")
    patient_id = await _patient(store)
    await _check_in(store, patient_id)
    assert (await client.get(f"/patients/{patient_id}")).status_code == 403
