"""Showing an exam camera live in the visit through the nurse's endpoint.

The web app (real store file, its video service) answers the offer of the devices process's
real :class:`StreamWorker`, on a second connection to the same database, with libav's test
pattern in place of /dev/video0. The nurse is in the visit as an aiortc client speaking the
wire messages (tests/video/test_service.py), and decodes the camera's frames.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.config import Config, ExamCameraConfig
from appliance.store import Store
from tests.e2e.live_server import stream_worker
from tests.video.peers import wait_for
from tests.video.test_service import Client, flowing
from tests.web.conftest import FakeClock
from tests.web.test_exam_still import CAMERA, _form, _nurse, nurse_account, seeded  # noqa: F401
from tests.web.test_provider import Seeded
from web.app import AppState

pytestmark = pytest.mark.usefixtures("loopback")


def _streams(db_path: Path) -> list[str]:
    conn = sqlite3.connect(db_path)
    try:
        return [str(r[0]) for r in conn.execute("SELECT state FROM camera_streams ORDER BY id")]
    finally:
        conn.close()


async def test_the_nurse_shows_the_camera_in_the_visit_and_stops_it(
    config: Config,
    store: Store,
    clock: FakeClock,
    seeded: Seeded,  # noqa: F811
    db_path: Path,
    kek_path: Path,
    nurse_account: None,  # noqa: F811
) -> None:
    async with (
        _nurse(config, store, clock) as nurse,
        stream_worker(db_path, kek_path, config.exam_cameras, clock=clock),
    ):
        page = await nurse.get(f"/video/nurse?visit={seeded.encounter_id}")
        assert f"Show {CAMERA} in the visit".encode() in await page.get_data()
        state: AppState = nurse.app.extensions["appliance"]
        in_visit = Client(state.video, "nurse's page")
        try:
            await in_visit.send(type="join", visit=seeded.encounter_id, role="nurse", token="t")
            form = {**await _form(nurse, seeded.encounter_id), "action": "start"}
            # Refused before anything is asked: no CSRF token, an unknown camera or action.
            no_token = {k: v for k, v in form.items() if k != "csrf_token"}
            assert (await nurse.post("/video/nurse/camera", form=no_token)).status_code == 403
            for bad in ({"camera": "no such camera"}, {"action": "record"}):
                answer = await nurse.post("/video/nurse/camera", form={**form, **bad})
                assert answer.status_code == 404

            started = await nurse.post("/video/nurse/camera", form=form)
            assert started.status_code == 200, await started.get_data()
            camera = (await started.get_json())["participant"]
            told = in_visit.last("participant", participant=camera)
            assert (told["role"], told["label"]) == ("camera", CAMERA)
            await flowing(in_visit.video, camera, 10)
            again = await nurse.post("/video/nurse/camera", form=form)
            assert again.status_code == 409
            assert _streams(db_path) == ["live"]
            # The page loaded now offers to stop it (before the call connects, too).
            reloaded = await (
                await nurse.get(f"/video/nurse?visit={seeded.encounter_id}")
            ).get_data()
            assert (
                f'data-stream="{CAMERA}" data-showing="true">Stop showing it'.encode() in reloaded
            )
            assert f"Show {CAMERA} in the visit".encode() not in reloaded

            stopped = await nurse.post("/video/nurse/camera", form={**form, "action": "stop"})
            assert (await stopped.get_json()) == {"stopped": 1, "camera": CAMERA}
            in_visit.last("left", participant=camera)
            await wait_for(lambda: _streams(db_path) == ["stopped"], 10, "the camera stopped")
            reloaded = await (
                await nurse.get(f"/video/nurse?visit={seeded.encounter_id}")
            ).get_data()
            assert f'data-showing="false">Show {CAMERA} in the visit'.encode() in reloaded
        finally:
            await in_visit.close()


async def test_a_camera_that_is_not_there_answers_with_the_devices_words(
    config: Config,
    store: Store,
    clock: FakeClock,
    seeded: Seeded,  # noqa: F811
    db_path: Path,
    kek_path: Path,
    nurse_account: None,  # noqa: F811
) -> None:
    gone = replace(config, exam_cameras=(ExamCameraConfig("otoscope", "/dev/video-unplugged"),))
    async with (
        _nurse(gone, store, clock) as nurse,
        stream_worker(db_path, kek_path, gone.exam_cameras, clock=clock),
    ):
        form = {**await _form(nurse, seeded.encounter_id, "otoscope"), "action": "start"}
        failed = await nurse.post("/video/nurse/camera", form=form)
    assert failed.status_code == 503
    error = (await failed.get_json())["error"]
    assert error.startswith("otoscope at /dev/video-unplugged: ")
    assert "No such file or directory" in error
    assert _streams(db_path) == ["failed"]


async def test_without_the_devices_service_the_nurse_is_told_and_nothing_starts_later(
    config: Config,
    store: Store,
    clock: FakeClock,
    seeded: Seeded,  # noqa: F811
    db_path: Path,
    kek_path: Path,
    nurse_account: None,  # noqa: F811
) -> None:
    async with _nurse(config, store, clock, wait_s=0.5) as nurse:
        form = {**await _form(nurse, seeded.encounter_id), "action": "start"}
        timed_out = await nurse.post("/video/nurse/camera", form=form)
    assert timed_out.status_code == 504
    assert "did not answer within 0.5 s" in (await timed_out.get_json())["error"]
    assert _streams(db_path) == ["expired"]
    async with stream_worker(db_path, kek_path, config.exam_cameras, clock=clock) as worker:
        await asyncio.sleep(1)
    assert worker.started == 0
    assert _streams(db_path) == ["expired"]


async def test_an_empty_visit_cannot_take_a_camera(
    config: Config,
    store: Store,
    clock: FakeClock,
    seeded: Seeded,  # noqa: F811
    db_path: Path,
    kek_path: Path,
    nurse_account: None,  # noqa: F811
) -> None:
    async with (
        _nurse(config, store, clock) as nurse,
        stream_worker(db_path, kek_path, config.exam_cameras, clock=clock),
    ):
        form = {**await _form(nurse, seeded.encounter_id), "action": "start"}
        refused = await nurse.post("/video/nurse/camera", form=form)
        assert refused.status_code == 409
        assert "nobody is in the visit" in (await refused.get_json())["error"]
        await wait_for(lambda: _streams(db_path) == ["failed"], 10, "the devices side gave up")
