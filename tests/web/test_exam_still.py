"""Exam-camera stills through the nurse's endpoint, taken by the devices process's worker.

The web app (real store file) asks through ``camera_requests``; the devices side is the
real :class:`StillWorker` on a second connection to the same database, as the devices
process has, with libav's test pattern in place of /dev/video0 (CI has no camera).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC
from pathlib import Path

import pytest
from quart.testing import QuartClient

from appliance import db, users
from appliance.config import Config, ExamCameraConfig
from appliance.device_registry import DeviceRegistry, StationKind
from appliance.store import Store
from services.video import still_requests
from tests import factories
from tests.e2e.live_server import still_worker
from tests.web.conftest import NURSE, PASSWORD, FakeClock, form_token, login
from tests.web.test_provider import Seeded, seed
from web.app import create_app

CAMERA = "demo exam camera"  # the demo configuration's: libav's test pattern


@pytest.fixture
async def seeded(store: Store, clock: FakeClock) -> Seeded:
    found = await seed(store, clock)
    # Checked in at an exam room: the nurse's normal access to the patient (web/access.py).
    registry = DeviceRegistry(store)
    await registry.add_station("exam-1", "Exam room 1", StationKind.EXAM_ROOM, "user:test")
    await registry.check_in("exam-1", found.patient_id, "user:test")
    return found


@pytest.fixture
async def nurse_account(store: Store, clock: FakeClock) -> None:
    await db.run_sync(
        store.connection, users.create_user, NURSE, PASSWORD, users.Role.NURSE, now=clock()
    )


@contextlib.asynccontextmanager
async def _nurse(
    config: Config, store: Store, clock: FakeClock, wait_s: float = still_requests.STILL_WAIT_S
) -> AsyncIterator[QuartClient]:
    """The web app (its still's wait bounded by ``wait_s``) and a nurse logged in to it."""
    app = create_app(config, store, clock=clock, still_wait_s=wait_s)
    async with app.test_app() as test_app:
        nurse: QuartClient = test_app.test_client()  # type: ignore[assignment]
        assert await login(nurse) == 302
        yield nurse


async def _form(nurse: QuartClient, visit: str, camera: str = CAMERA) -> dict[str, str]:
    csrf = form_token(await (await nurse.get("/mfa/")).get_data())
    return {"visit": visit, "camera": camera, "csrf_token": csrf}


def _requests(db_path: Path) -> list[tuple[str, str | None]]:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute("SELECT state, media_id FROM camera_requests ORDER BY id").fetchall()
    finally:
        conn.close()


async def test_a_still_asked_through_the_page_is_taken_by_the_devices_worker(
    config: Config,
    store: Store,
    clock: FakeClock,
    seeded: Seeded,
    db_path: Path,
    kek_path: Path,
    nurse_account: None,
) -> None:
    async with (
        _nurse(config, store, clock) as nurse,
        still_worker(db_path, kek_path, config.exam_cameras, clock=clock),
    ):
        page = await nurse.get(f"/video/nurse?visit={seeded.encounter_id}")
        assert f'data-camera="{CAMERA}"'.encode() in await page.get_data()
        form = await _form(nurse, seeded.encounter_id)
        answer = await nurse.post("/video/nurse/still", form=form)
        assert answer.status_code == 200, await answer.get_data()
        media_id = (await answer.get_json())["media"]
        # Refused before anything is asked: no CSRF token, an unknown camera, a patient
        # outside normal access.
        no_token = {k: v for k, v in form.items() if k != "csrf_token"}
        assert (await nurse.post("/video/nurse/still", form=no_token)).status_code == 403
        unknown = {**form, "camera": "no such camera"}
        assert (await nurse.post("/video/nurse/still", form=unknown)).status_code == 404
        stranger = await seed(store, clock, factories.patient(family="Zzstill"))
        outside = {**form, "visit": stranger.encounter_id}
        assert (await nurse.post("/video/nurse/still", form=outside)).status_code == 403
    media = await store.read("Media", media_id, "user:test")
    assert media["subject"] == {"reference": f"Patient/{seeded.patient_id}"}
    assert media["encounter"] == {"reference": f"Encounter/{seeded.encounter_id}"}
    assert media["deviceName"] == CAMERA
    assert media["content"]["contentType"] == "image/jpeg"
    jpeg = base64.b64decode(media["content"]["data"])
    assert jpeg[:2] == b"\xff\xd8"
    assert _requests(db_path) == [("done", media_id)]
    conn = sqlite3.connect(db_path)
    try:
        # Encrypted at rest; audited under the nurse who asked; queued for the EHR.
        raw = b"".join(row[0] for row in conn.execute("SELECT body FROM resources"))
        assert jpeg[100:164] not in raw
        assert media["content"]["data"][200:264].encode() not in raw
        audited = conn.execute(
            "SELECT count(*) FROM audit WHERE actor = ? AND entity = ?",
            (f"user:{NURSE}", f"Media/{media_id}"),
        ).fetchone()[0]
        assert audited == 1
        [(outbox,)] = conn.execute(
            "SELECT o.state FROM outbox o JOIN resources r ON r.id = o.resource_id "
            "WHERE r.logical_id = ?",
            (media_id,),
        ).fetchall()
        assert outbox == "pending"
    finally:
        conn.close()


async def test_no_still_while_the_camera_is_live_in_another_visit(
    config: Config,
    store: Store,
    clock: FakeClock,
    seeded: Seeded,
    db_path: Path,
    kek_path: Path,
    nurse_account: None,
) -> None:
    """The camera shows another visit's patient: a still asked for this visit would be that
    patient's picture filed under this one (and synced to the EHR). 409, nothing asked;
    once the stream has ended, the still is taken."""
    other = await seed(store, clock, factories.patient(family="Zzother"))
    stamp = clock().astimezone(UTC).isoformat(timespec="microseconds")
    conn = sqlite3.connect(db_path)
    with conn:
        stream = conn.execute(
            "INSERT INTO camera_streams (camera, encounter_id, requested_by, requested_at, "
            "state, alive_at) VALUES (?, ?, 'user:other', ?, 'live', ?)",
            (CAMERA, other.encounter_id, stamp, stamp),
        ).lastrowid
    before = await store.last_row_id()
    async with (
        _nurse(config, store, clock) as nurse,
        still_worker(db_path, kek_path, config.exam_cameras, clock=clock) as worker,
    ):
        form = await _form(nurse, seeded.encounter_id)
        refused = await nurse.post("/video/nurse/still", form=form)
        assert refused.status_code == 409
        assert (await refused.get_json())["error"] == (
            f"the {CAMERA} is live in another visit; stop it there first"
        )
        assert _requests(db_path) == []
        assert await store.last_row_id() == before
        with conn:
            conn.execute("UPDATE camera_streams SET state = 'stopped' WHERE id = ?", (stream,))
        taken = await nurse.post("/video/nurse/still", form=form)
        assert taken.status_code == 200, await taken.get_data()
    conn.close()
    assert (worker.taken, worker.failed) == (1, 0)
    media = await store.read("Media", (await taken.get_json())["media"], "user:test")
    assert media["subject"] == {"reference": f"Patient/{seeded.patient_id}"}


async def test_a_camera_that_is_not_there_answers_with_the_devices_words(
    config: Config,
    store: Store,
    clock: FakeClock,
    seeded: Seeded,
    db_path: Path,
    kek_path: Path,
    nurse_account: None,
) -> None:
    gone = replace(config, exam_cameras=(ExamCameraConfig("otoscope", "/dev/video-unplugged"),))
    before = await store.last_row_id()
    async with (
        _nurse(gone, store, clock) as nurse,
        still_worker(db_path, kek_path, gone.exam_cameras, clock=clock) as worker,
    ):
        form = await _form(nurse, seeded.encounter_id, "otoscope")
        failed = await nurse.post("/video/nurse/still", form=form)
    assert failed.status_code == 503
    error = (await failed.get_json())["error"]
    assert error.startswith("otoscope at /dev/video-unplugged: ")
    assert "No such file or directory" in error
    assert await store.last_row_id() == before
    assert (worker.taken, worker.failed) == (0, 1)
    assert _requests(db_path) == [("failed", None)]


async def test_without_the_devices_service_the_nurse_is_told_and_no_still_comes_later(
    config: Config,
    store: Store,
    clock: FakeClock,
    seeded: Seeded,
    db_path: Path,
    kek_path: Path,
    nurse_account: None,
) -> None:
    before = await store.last_row_id()
    async with _nurse(config, store, clock, wait_s=0.5) as nurse:
        timed_out = await nurse.post(
            "/video/nurse/still", form=await _form(nurse, seeded.encounter_id)
        )
    assert timed_out.status_code == 504
    assert (await timed_out.get_json())["error"] == (
        "the devices service did not answer within 0.5 s; no still was taken "
        "(is appliance-devices running?)"
    )
    assert _requests(db_path) == [("expired", None)]
    # The devices service comes back: the expired request is not taken.
    async with still_worker(db_path, kek_path, config.exam_cameras, clock=clock) as worker:
        await asyncio.sleep(3 * still_requests.CLAIM_POLL_S)
    assert (worker.taken, worker.failed) == (0, 0)
    assert _requests(db_path) == [("expired", None)]
    assert await store.last_row_id() == before


async def test_a_still_claimed_but_unfinished_at_the_deadline_is_reported_as_on_its_way(
    config: Config,
    store: Store,
    clock: FakeClock,
    seeded: Seeded,
    db_path: Path,
    kek_path: Path,
    nurse_account: None,
) -> None:
    devices = await Store.open(db_path, kek_path)

    async def claim_and_stall() -> None:  # a devices process still opening its camera
        def claim(conn: sqlite3.Connection) -> still_requests.StillRequest | None:
            return still_requests.claim_next(conn, "slow", clock())

        while await devices.transact(claim) is None:  # noqa: ASYNC110 - the store is the bus
            await asyncio.sleep(0.02)

    try:
        async with _nurse(config, store, clock, wait_s=1.0) as nurse:
            form = await _form(nurse, seeded.encounter_id)
            claimer = asyncio.create_task(claim_and_stall())
            late = await nurse.post("/video/nurse/still", form=form)
            await asyncio.wait_for(claimer, 5)
    finally:
        await devices.close()
    assert late.status_code == 504
    assert (await late.get_json())["error"] == (
        "the devices service did not finish the still within 1 s; "
        "it will be stored with the visit if the camera gives a frame"
    )
    assert _requests(db_path) == [("claimed", None)]
