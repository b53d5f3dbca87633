"""The patient kiosk over a real store: pairing, identify, walk-in, intake, consent, vitals,
photos, idle expiry, languages, CSRF and the audit trail. All data is synthetic."""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from quart.testing import QuartClient
from quart.typing import TestAppProtocol as AppClientFactory

from appliance import db, fhir, users
from appliance.device_registry import DeviceRegistry, StationKind
from appliance.store import Store
from services import intake
from tests import factories
from tests.tamper import move_ciphertext
from tests.web.conftest import PASSWORD, FakeClock, form_token, login
from web import kiosk

STATION = "kiosk-1"
ACTOR = f"kiosk:{STATION}"
_META = re.compile(rb'name="kiosk-csrf" content="([^"]+)"')
# A tiny valid PNG (1x1) and the start of a JPEG: what the magic-byte checks look at.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 2000


async def _paired(app: AppClientFactory, store: Store) -> QuartClient:
    """A client holding a kiosk cookie for STATION (inserted as pairing would)."""
    await DeviceRegistry(store).add_station(STATION, "Kiosk 1", StationKind.KIOSK, "user:admin")
    token = secrets.token_urlsafe(32)

    def work(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO kiosks (token_hash, station_id, paired_by, paired_at) "
            "VALUES (?, ?, 'test', '2026-01-01T00:00:00.000000Z')",
            (kiosk._hash(token), STATION),
        )

    await store.transact(work)
    client: QuartClient = app.test_client()  # type: ignore[assignment]
    secure = app.app.extensions["appliance"].secure  # type: ignore[attr-defined]
    name = "__Secure-kiosk" if secure else "kiosk"
    client.set_cookie("localhost", name, token, path="/kiosk", httponly=True, secure=secure)
    return client


@pytest.fixture
async def kc(app: AppClientFactory, store: Store) -> QuartClient:
    return await _paired(app, store)


async def _csrf(client: QuartClient) -> str:
    page = await client.get("/kiosk/")
    found = _META.search(await page.get_data())
    assert found is not None, "no kiosk CSRF token on the page"
    return found.group(1).decode()


async def _post(client: QuartClient, path: str, **fields: str) -> tuple[int, bytes]:
    """Post a kiosk form with the flow's token; returns the status and the page it leads to."""
    fields.setdefault("csrf_token", await _csrf(client))
    response = await client.post(path, form=fields)
    if response.status_code == 303:
        page = await client.get("/kiosk/")
        return page.status_code, await page.get_data()
    return response.status_code, await response.get_data()


async def _patient(store: Store, **kw: str) -> str:
    [stored] = await store.create([factories.patient(**kw)], "user:test")
    return stored.logical_id


async def _audit_rows(store: Store) -> list[tuple[str, str, str | None]]:
    rows = await store.query("SELECT actor, action, entity FROM audit ORDER BY id")
    return [(str(a), str(b), None if c is None else str(c)) for a, b, c in rows]


async def _identified(kc: QuartClient, store: Store) -> str:
    patient_id = await _patient(store)
    status, page = await _post(
        kc, "/kiosk/identify", mode="name", family="Testperson", birth_date="1961-04-09"
    )
    assert status == 200
    assert b"A. T." in page
    status, page = await _post(kc, "/kiosk/confirm", answer="yes")
    assert b"Are your details up to date?" in page
    return patient_id


# -- binding --------------------------------------------------------------------------------


async def test_an_unpaired_browser_is_sent_to_pairing_and_cannot_post(client: QuartClient) -> None:
    response = await client.get("/kiosk/")
    assert response.status_code == 302
    assert response.headers["Location"] == "/kiosk/pair"
    refused = await client.post("/kiosk/identify", form={"mode": "name"})
    assert refused.status_code == 403


async def _issue_code(store: Store, clock: FakeClock, code: str) -> None:
    """A pairing code as ``POST /kiosk/admin`` issues it (only its hash is stored)."""
    now = clock()

    def work(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO kiosk_pairings (code_hash, station_id, issued_by, issued_at, "
            "expires_at) VALUES (?, ?, 'user:admin1', ?, ?)",
            (
                kiosk._hash(code),
                STATION,
                fhir.utc_text(now),
                fhir.utc_text(now + timedelta(seconds=kiosk.PAIRING_TTL_S)),
            ),
        )

    await store.transact(work)


async def _pair(app: AppClientFactory, code: str) -> tuple[QuartClient, int, str]:
    screen: QuartClient = app.test_client()  # type: ignore[assignment]
    form = await screen.get("/kiosk/pair")
    token = form_token(await form.get_data())
    paired = await screen.post("/kiosk/pair", form={"code": code, "csrf_token": token})
    cookie = ";".join(paired.headers.getlist("Set-Cookie"))
    return screen, paired.status_code, cookie


async def test_a_one_time_pairing_code_binds_a_browser_to_the_station(
    app: AppClientFactory, store: Store, clock: FakeClock
) -> None:
    await DeviceRegistry(store).add_station(STATION, "Kiosk 1", StationKind.KIOSK, "user:admin")
    await _issue_code(store, clock, "ABCDE23456")
    screen, status, cookie = await _pair(app, "abcde-23456")
    assert status == 303
    assert "kiosk=" in cookie
    assert "Path=/kiosk" in cookie
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert (await screen.get("/kiosk/")).status_code == 200
    _, again, _ = await _pair(app, "ABCDE23456")
    assert again == 400  # one time only
    await _issue_code(store, clock, "ZZZZZ23456")
    clock.advance(kiosk.PAIRING_TTL_S + 1)
    _, late, _ = await _pair(app, "ZZZZZ23456")
    assert late == 400  # expired
    assert await store.query("SELECT count(*) FROM kiosks") == [(1,)]
    assert (ACTOR, "config", None) in await _audit_rows(store)


async def test_pairing_attempts_are_limited(app: AppClientFactory, store: Store) -> None:
    statuses = [(await _pair(app, f"WRONG{n:05d}"))[1] for n in range(kiosk.PAIR_ATTEMPTS + 1)]
    assert statuses[:-1] == [400] * kiosk.PAIR_ATTEMPTS
    assert statuses[-1] == 429


async def test_an_admin_issues_a_pairing_code(
    app: AppClientFactory, store: Store, clock: FakeClock
) -> None:
    await DeviceRegistry(store).add_station(STATION, "Kiosk 1", StationKind.KIOSK, "user:admin")
    await db.run_sync(
        store.connection, users.create_user, "admin1", PASSWORD, users.Role.ADMIN, now=clock()
    )
    admin: QuartClient = app.test_client()  # type: ignore[assignment]
    assert await login(admin, "admin1") == 302  # enrols the admin's second factor
    page = await admin.get("/kiosk/admin")
    assert page.status_code == 200
    issued = await admin.post(
        "/kiosk/admin",
        form={"station": STATION, "csrf_token": form_token(await page.get_data())},
    )
    found = re.search(rb'class="pairing-code">([A-Z0-9]+)<', await issued.get_data())
    assert found is not None
    _, status, _ = await _pair(app, found.group(1).decode())
    assert status == 303


async def test_a_nurse_cannot_issue_pairing_codes(logged_in: QuartClient) -> None:
    assert (await logged_in.get("/kiosk/admin")).status_code == 403


# -- identify -------------------------------------------------------------------------------


async def test_name_and_birth_date_find_the_patient_and_show_initials_only(
    kc: QuartClient, store: Store
) -> None:
    await _patient(store, family="Testperson", given="Ada")
    status, page = await _post(
        kc, "/kiosk/identify", mode="name", family=" testPERSON ", birth_date="1961-04-09"
    )
    assert status == 200
    assert b"A. T." in page
    assert b"Testperson" not in page
    assert b"Ada" not in page
    assert b"1961" not in page


async def test_an_appointment_code_or_its_qr_content_finds_the_patient(
    kc: QuartClient, store: Store
) -> None:
    patient_id = await _patient(store)
    start = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    appointment = {
        "resourceType": "Appointment",
        "status": "booked",
        "identifier": [{"system": "urn:example:appointment-code", "value": "K7Q-42X"}],
        "start": start,
        "end": start,
        "participant": [{"actor": {"reference": f"Patient/{patient_id}"}, "status": "accepted"}],
    }
    await store.create([appointment], "user:test")
    _status, page = await _post(
        kc, "/kiosk/identify", mode="code", code="appt:k7q42x", birth_date="1961-04-09"
    )
    assert b"A. T." in page
    await _post(kc, "/kiosk/reset")
    # The right code with the wrong birth date is no match at all.
    _status, page = await _post(
        kc, "/kiosk/identify", mode="code", code="K7Q-42X", birth_date="1961-04-10"
    )
    assert b"We could not find you" in page
    assert b"A. T." not in page


async def test_an_appointment_that_fails_authentication_does_not_stop_code_check_in(
    kc: QuartClient, store: Store, db_path: Path
) -> None:
    patient_id = await _patient(store)
    start = (datetime.now(UTC) + timedelta(hours=1)).isoformat()

    def appointment(code: str) -> dict[str, object]:
        return {
            "resourceType": "Appointment",
            "status": "booked",
            "identifier": [{"system": "urn:example:appointment-code", "value": code}],
            "start": start,
            "end": start,
            "participant": [
                {"actor": {"reference": f"Patient/{patient_id}"}, "status": "accepted"}
            ],
        }

    [mine, bad] = await store.create([appointment("K7Q-42X"), appointment("ZZZ-999")], "user:test")
    move_ciphertext(db_path, bad.logical_id, mine.logical_id)  # the newest, scanned first
    status, page = await _post(
        kc, "/kiosk/identify", mode="code", code="K7Q-42X", birth_date="1961-04-09"
    )
    assert status == 200  # before: 500 for every check-in by code
    assert b"A. T." in page
    failures = await store.query("SELECT entity FROM audit WHERE outcome = 'failure'")
    assert failures == [(f"Appointment/{bad.logical_id}",)]


async def test_an_unknown_name_and_a_wrong_birth_date_get_the_same_answer(
    kc: QuartClient, store: Store
) -> None:
    await _patient(store)
    token = await _csrf(kc)
    answers = []
    for family, born in (("Nobodyhere", "1961-04-09"), ("Testperson", "1961-04-10")):
        started = asyncio.get_running_loop().time()
        response = await kc.post(
            "/kiosk/identify",
            form={"mode": "name", "family": family, "birth_date": born, "csrf_token": token},
        )
        elapsed = asyncio.get_running_loop().time() - started
        page = await kc.get("/kiosk/")
        answers.append((response.status_code, response.headers["Location"], await page.get_data()))
        assert elapsed >= kiosk.IDENTIFY_FLOOR_S * 0.95
    assert answers[0] == answers[1]
    assert b"We could not find you" in answers[0][2]


async def test_failed_look_ups_are_limited_per_kiosk(kc: QuartClient, store: Store) -> None:
    await _patient(store)
    for _ in range(kiosk.IDENTIFY_FAILURES):
        await _post(kc, "/kiosk/identify", mode="name", family="Guess", birth_date="1961-04-09")
    _status, page = await _post(
        kc, "/kiosk/identify", mode="name", family="Testperson", birth_date="1961-04-09"
    )
    assert b"Too many tries" in page
    assert b"A. T." not in page


async def test_not_me_goes_to_the_front_desk(kc: QuartClient, store: Store) -> None:
    await _patient(store)
    await _post(kc, "/kiosk/identify", mode="name", family="Testperson", birth_date="1961-04-09")
    _status, page = await _post(kc, "/kiosk/confirm", answer="no")
    assert b"Please see the front desk" in page


async def test_an_unreadable_matching_record_sends_the_patient_to_the_front_desk(
    kc: QuartClient, store: Store, db_path: Path
) -> None:
    ada = await _patient(store)
    other = await _patient(store, family="Otherperson", given="Bo")
    move_ciphertext(db_path, ada, other)
    # Before: "we could not find you", then walk-in registration made a second chart.
    _status, page = await _post(
        kc, "/kiosk/identify", mode="name", family="Testperson", birth_date="1961-04-09"
    )
    assert b"Please see the front desk" in page
    await _post(kc, "/kiosk/reset")
    await _post(kc, "/kiosk/walk-in")
    _status, page = await _post(
        kc, "/kiosk/register", given="Ada", family="Testperson", birth_date="1961-04-09"
    )
    assert b"Please see the front desk" in page
    rows = await store.query("SELECT count(*) FROM resources WHERE type = 'Patient'")
    assert rows == [(2,)]  # no second chart


# -- walk-in --------------------------------------------------------------------------------


async def test_a_walk_in_matching_a_patient_goes_to_the_front_desk(
    kc: QuartClient, store: Store
) -> None:
    await _patient(store)
    await _post(kc, "/kiosk/walk-in")
    _status, page = await _post(
        kc, "/kiosk/register", given="Other", family="TESTPERSON", birth_date="1961-04-09"
    )
    assert b"Please see the front desk" in page
    assert b"A. T." not in page
    # Random tokens in the page (CSRF, CSP nonce) may spell "Ada" by chance: not a leak.
    assert b"Ada" not in re.sub(rb'"[A-Za-z0-9_\-+/=]{20,}"', b'""', page)
    assert len(await store.patients("user:test")) == 1


async def test_a_new_walk_in_is_registered(kc: QuartClient, store: Store) -> None:
    await _post(kc, "/kiosk/walk-in")
    _status, page = await _post(
        kc,
        "/kiosk/register",
        given="Bea",
        family="Newcomer",
        birth_date="1990-02-03",
        phone="555-0100",
    )
    assert b"Are your details up to date?" in page
    assert b"ends in 00" in page
    [patient] = await store.find_patients("Newcomer", "1990-02-03", "user:test")
    assert patient["telecom"][0]["value"] == "555-0100"


# -- the whole check-in ---------------------------------------------------------------------


async def test_new_details_are_saved_on_the_copy_stored_now_not_over_a_change_made_meanwhile(
    kc: QuartClient, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    patient_id = await _identified(kc, store)
    token = await _csrf(kc)  # the details page, read as it is shown
    read = store.read
    changed: list[str] = []

    async def read_then_changed(rtype: str, logical_id: str, actor: str) -> Any:
        found = await read(rtype, logical_id, actor)
        if not changed:  # between the kiosk's read and its write: the nurse corrects a name
            changed.append(logical_id)
            await store.update(
                rtype, logical_id, {**found, "name": [{"family": "Corrected"}]}, "user:nurse1"
            )
        return found

    monkeypatch.setattr(store, "read", read_then_changed)
    response = await kc.post("/kiosk/details", form={"phone": "555 0199", "csrf_token": token})
    assert response.status_code == 303
    monkeypatch.undo()
    assert changed == [patient_id]
    patient = await store.read("Patient", patient_id, "user:test")
    # Before: the kiosk wrote its copy (read before the correction) over it.
    assert patient["name"] == [{"family": "Corrected"}]
    assert patient["telecom"][0]["value"] == "555 0199"


async def test_the_check_in_stores_everything_and_files_readings_to_the_patient(
    kc: QuartClient, store: Store
) -> None:
    patient_id = await _identified(kc, store)
    other_id = await _patient(store, family="Otherperson", mrn="T0002")
    _status, page = await _post(
        kc, "/kiosk/details", phone="555 0199", payer="Synthetic Health", member_id="SH-000123"
    )
    assert b"A few questions" in page
    assert b"PHQ" not in page
    outbox = await store.query("SELECT kind FROM outbox WHERE kind = 'update'")
    assert len(outbox) == 1  # the demographics edit goes upstream, version-checked
    patient = await store.read("Patient", patient_id, "user:test")
    assert patient["telecom"][0]["value"] == "555 0199"
    [coverage] = await store.newest(f"Patient/{patient_id}", "Coverage", "user:test")
    assert coverage["subscriberId"] == "SH-000123"

    _status, page = await _post(kc, "/kiosk/intake", reason="Cough for a week")
    assert b"Please answer both questions" in page  # PHQ-2 is required
    status, page = await _post(  # before: "²" passed isdigit(), int() raised: a 500
        kc, "/kiosk/intake", reason="Cough", **{"phq2-interest": "²", "phq2-mood": "1"}
    )
    assert (status, b"Please answer both questions" in page) == (200, True)
    token = await _csrf(kc)
    response = await kc.post(
        "/kiosk/intake",
        form={
            "reason": "Cough  for a week",
            "symptoms": "cough",
            "phq2-interest": "1",
            "phq2-mood": "2",
            "csrf_token": token,
        },
    )
    assert response.status_code == 303
    [answers] = await store.newest(f"Patient/{patient_id}", "QuestionnaireResponse", "user:test")
    assert intake.phq2_score_of(answers) == 3
    assert answers["questionnaire"].startswith(intake.QUESTIONNAIRE_URL)
    assert answers["item"][0]["answer"][0]["valueString"] == "Cough for a week"

    _status, page = await _post(
        kc, "/kiosk/consent", agree="yes", signature="data:image/png;base64,AAAA"
    )
    assert b"Please sign in the box" in page
    signature = "data:image/png;base64," + base64.b64encode(PNG).decode()
    _status, page = await _post(kc, "/kiosk/consent", agree="yes", signature=signature)
    assert b"take your vital signs" in page
    [consent] = await store.newest(f"Patient/{patient_id}", "Consent", "user:test")
    assert base64.b64decode(consent["sourceAttachment"]["data"]) == PNG
    registry = DeviceRegistry(store)
    [checkin] = await registry.checkins(STATION)
    assert checkin.patient_id == patient_id
    assert checkin.checked_out_at is None

    # Live readings: this patient's, after the check-in, and nobody else's.
    now = datetime.now(UTC).isoformat()
    await store.create([factories.bp_observation(f"Patient/{other_id}", 99, 61, now)], "user:t")
    async with kc.request("/kiosk/vitals/events") as connection:
        await connection.send_complete()
        received = await asyncio.wait_for(connection.receive(), 1.0)
        await store.create(
            [factories.bp_observation(f"Patient/{patient_id}", 131, 84, now)], "service:devices"
        )
        async with asyncio.timeout(3):
            while b"event: reading" not in received:
                received += await connection.receive()
        await connection.disconnect()
    assert b"131/84 mmHg" in received
    assert b"99/61" not in received
    page = await (await kc.get("/kiosk/")).get_data()
    assert b"131/84 mmHg" in page
    assert b"99/61" not in page

    await _post(kc, "/kiosk/vitals/next")
    token = await _csrf(kc)
    for offset in range(0, len(JPEG), 1000):
        sent = await kc.post(
            "/kiosk/photos/chunk",
            data=JPEG[offset : offset + 1000],
            headers={"X-CSRF-Token": token, "X-Upload-Offset": str(offset)},
        )
        assert sent.status_code == 200
    done = await kc.post("/kiosk/photos/finish", headers={"X-CSRF-Token": token})
    assert (await done.get_json()) == {"photos": 1}
    [media] = await store.newest(f"Patient/{patient_id}", "Media", "user:test")
    assert base64.b64decode(media["content"]["data"]) == JPEG
    assert media["content"]["contentType"] == "image/jpeg"

    _status, page = await _post(kc, "/kiosk/finish")
    assert b"checked in" in page
    assert b"waiting room" in page
    [encounter] = await store.newest(f"Patient/{patient_id}", "Encounter", "user:test")
    assert encounter["status"] == "arrived"
    [checkin] = await registry.checkins(STATION)
    assert checkin.checked_out_at is not None  # readings from now on are held, not filed

    actions = {(a, b) for a, b, _ in await _audit_rows(store) if a == ACTOR}
    for expected in ("search", "read", "create", "update"):
        assert (ACTOR, expected) in actions
    # The resources themselves are encrypted at rest.
    bodies = b"".join(bytes(r[0]) for r in await store.query("SELECT body FROM resources"))
    assert b"SH-000123" not in bodies
    assert b"Cough" not in bodies


async def test_photos_are_capped_in_size_and_checked_by_magic_bytes(
    kc: QuartClient, store: Store
) -> None:
    await _identified(kc, store)
    flow = next(iter(kc.app.extensions["kiosk"].flows.values()))  # type: ignore[attr-defined]
    flow.step = kiosk.Step.PHOTOS
    token = await _csrf(kc)
    headers = {"X-CSRF-Token": token, "X-Upload-Offset": "0"}
    gif = await kc.post("/kiosk/photos/chunk", data=b"GIF89a" + b"\x00" * 100, headers=headers)
    assert gif.status_code == 415
    too_big_piece = await kc.post(
        "/kiosk/photos/chunk", data=PNG + b"\x00" * (70 * 1024), headers=headers
    )
    assert too_big_piece.status_code == 413  # the app-wide request cap
    chunk = PNG + b"\x00" * (kiosk.PHOTO_CHUNK_MAX - len(PNG))
    offset = 0
    status = 200
    while status == 200:
        response = await kc.post(
            "/kiosk/photos/chunk",
            data=chunk,
            headers={"X-CSRF-Token": token, "X-Upload-Offset": str(offset)},
        )
        status = response.status_code
        offset += len(chunk)
    assert status == 413
    assert offset > intake.PHOTO_MAX_BYTES
    assert len(flow.photo) == 0


# -- idle reset, expiry, CSRF, languages -----------------------------------------------------


async def test_an_idle_flow_expires_on_the_server_and_checks_the_patient_out(
    kc: QuartClient, store: Store, clock: FakeClock
) -> None:
    patient_id = await _identified(kc, store)
    flow = next(iter(kc.app.extensions["kiosk"].flows.values()))  # type: ignore[attr-defined]
    await DeviceRegistry(store).check_in(STATION, patient_id, ACTOR)
    flow.checked_in_at = "2026-01-01T00:00:00.000000Z"
    old_token = flow.csrf
    clock.advance(kiosk.IDLE_TIMEOUT_S + kiosk.SERVER_GRACE_S + 1)
    page = await (await kc.get("/kiosk/")).get_data()
    assert b"Welcome" in page
    assert b"details" not in page
    assert old_token.encode() not in page
    [checkin] = await DeviceRegistry(store).checkins(STATION)
    assert checkin.checked_out_at is not None
    stale = await kc.post("/kiosk/details", form={"csrf_token": old_token, "phone": "1"})
    assert stale.status_code == 403


async def test_the_sweeper_ends_flows_nobody_touches(
    kc: QuartClient, store: Store, clock: FakeClock
) -> None:
    await _identified(kc, store)
    kstate = kc.app.extensions["kiosk"]  # type: ignore[attr-defined]
    clock.advance(kiosk.IDLE_TIMEOUT_S + kiosk.SERVER_GRACE_S + 1)
    await kiosk._sweep(kc.app.extensions["appliance"], kstate, kiosk.IDLE_TIMEOUT_S)  # type: ignore[attr-defined]
    assert kstate.flows == {}


async def test_start_over_forgets_the_patient(kc: QuartClient, store: Store) -> None:
    await _identified(kc, store)
    _status, page = await _post(kc, "/kiosk/reset")
    assert b"Welcome" in page
    _status, page = await _post(kc, "/kiosk/details", phone="555")  # a replayed step
    assert b"Welcome" in page
    assert await store.query("SELECT 1 FROM outbox WHERE kind = 'update'") == []


async def test_kiosk_posts_need_the_flow_token(kc: QuartClient, store: Store) -> None:
    await _patient(store)
    response = await kc.post(
        "/kiosk/identify",
        form={"mode": "name", "family": "Testperson", "birth_date": "1961-04-09"},
    )
    assert response.status_code == 403
    wrong = await kc.post(
        "/kiosk/identify",
        form={"mode": "name", "family": "Testperson", "csrf_token": "x" * 43},
    )
    assert wrong.status_code == 403
    assert b"A. T." not in await (await kc.get("/kiosk/")).get_data()


async def test_the_kiosk_speaks_spanish(kc: QuartClient, store: Store) -> None:
    _status, page = await _post(kc, "/kiosk/lang", lang="es")
    assert b'<html lang="es">' in page
    assert b"Bienvenido" in page
    assert b"Welcome" not in page
    await _patient(store)
    _status, page = await _post(
        kc, "/kiosk/identify", mode="name", family="Nobody", birth_date="1961-04-09"
    )
    assert b"No pudimos encontrarle" in page
    _status, page = await _post(kc, "/kiosk/reset")
    assert b'<html lang="en">' in page  # the next patient starts in the default language


async def test_every_kiosk_page_sends_no_store_and_the_csp(kc: QuartClient) -> None:
    response = await kc.get("/kiosk/")
    assert response.headers["Cache-Control"] == "no-store"
    assert "unsafe-inline" not in response.headers["Content-Security-Policy"]
    body = await response.get_data()
    assert b"<script>" not in body
    assert b"style=" not in body


def test_the_spanish_catalog_translates_every_questionnaire_text() -> None:
    catalogs = kiosk.load_catalogs()
    texts = [intake.REASON_TEXT, intake.SYMPTOMS_TEXT, intake.PHQ2_STEM]
    texts += [t for _, t in intake.SYMPTOMS] + [t for *_, t in intake.PHQ2_ITEMS]
    texts += [t for *_, t in intake.PHQ2_ANSWERS] + list(kiosk.VITAL_LABELS.values())
    untranslated = [t for t in texts if catalogs["es"].gettext(t) == t]
    assert untranslated == []


def test_the_questionnaire_response_is_valid_fhir(tmp_path: Path) -> None:
    from appliance import fhir

    answers = intake.IntakeAnswers("Headache", ("none",), (3, 3))
    response = intake.questionnaire_response(answers, "Patient/x", datetime.now(UTC), "es")
    fhir.validate(response)
    fhir.validate(intake.questionnaire())
    assert intake.phq2_score_of(response) == 6
    assert orjson.loads(orjson.dumps(response))["language"] == "es"
