"""An exam camera live in a visit: the devices side publishes it, the video service answers.

Real components: libav's ``lavfi`` test pattern in place of /dev/video0 (the same
``MediaPlayer`` path), the devices process's :class:`StreamWorker` on its own connection to
the database file, the web side's functions and :class:`StreamWatcher` on another, the video
service, and aiortc clients speaking the wire messages as the nurse and the remote provider
(tests/video/test_service.py). ICE on 127.0.0.1 only (the ``loopback`` fixture).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aioice.ice
import pytest
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from appliance.config import ExamCameraConfig
from appliance.store import Store
from services.video import camera_streams, still_requests
from services.video.camera_streams import (
    CameraBusy,
    StreamState,
    StreamWatcher,
    StreamWorker,
)
from services.video.exam_camera import CameraHub
from services.video.service import CameraRefused, VideoService
from services.video.signalling import ErrorCode, Inbound, SignallingError
from services.video.still_requests import StillWorker
from tests import factories
from tests.video.peers import wait_for
from tests.video.test_service import VISIT, Client, flowing, video_service

PATTERN = ExamCameraConfig(device="testsrc2=size=640x480:rate=30", format="lavfi", name="otoscope")
LARGE = ExamCameraConfig(device="testsrc2=size=1280x720:rate=30", format="lavfi", name="large")
MISSING = ExamCameraConfig(device="/dev/video-not-plugged", name="exam camera")
NURSE = "user:nurse1"

pytestmark = pytest.mark.usefixtures("loopback")


class SizingClient(Client):
    """A client that also notes the size of each video frame it decodes, per publisher."""

    def __init__(self, service: VideoService, name: str) -> None:
        super().__init__(service, name)
        self.sizes: dict[str, set[tuple[int, int]]] = {}

    async def _consume(self, track: MediaStreamTrack, publisher: str) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                if isinstance(frame, VideoFrame):
                    self.video[publisher] += 1
                    self.sizes.setdefault(publisher, set()).add((frame.width, frame.height))


@dataclass
class Box:
    """The web side (``store``, ``service``, nurse and provider) and the devices side."""

    store: Store
    devices_store: Store
    service: VideoService
    worker: StreamWorker
    hub: CameraHub
    nurse: Client
    provider: SizingClient
    db_path: Path


@contextlib.asynccontextmanager
async def box(store: Store, db_path: Path, kek_path: Path) -> AsyncIterator[Box]:
    devices_store = await Store.open(db_path, kek_path)
    hub = CameraHub()
    worker = StreamWorker(devices_store, [PATTERN, LARGE, MISSING], hub, name="devices:1")
    worker_stopping = asyncio.Event()
    task = asyncio.create_task(worker.run(worker_stopping))
    try:
        async with video_service() as (service, client):
            nurse = client("nurse")
            provider = client("provider", SizingClient)
            assert isinstance(provider, SizingClient)
            await nurse.join("nurse")
            await provider.join("provider")
            await nurse.send(type="admit", participant=provider.id)
            yield Box(store, devices_store, service, worker, hub, nurse, provider, db_path)
    finally:
        worker_stopping.set()
        await task
        await devices_store.close()


async def show(b: Box, camera: str = PATTERN.name) -> str:
    """What the nurse's "Show … in the visit" does (web/video.py show_exam_camera)."""
    stream_id = await camera_streams.submit(b.store, camera, VISIT, NURSE, datetime.now(UTC))
    stream = await camera_streams.wait_offer(b.store, stream_id, timeout_s=15)
    assert stream.state is StreamState.OFFERED, stream
    return await camera_streams.start(b.store, b.service, stream, datetime.now(UTC))


def _states(db_path: Path) -> list[str]:
    conn = sqlite3.connect(db_path)
    try:
        return [str(r[0]) for r in conn.execute("SELECT state FROM camera_streams ORDER BY id")]
    finally:
        conn.close()


def _descriptions_left(db_path: Path) -> int:
    conn = sqlite3.connect(db_path)
    try:
        [(count,)] = conn.execute(
            "SELECT count(*) FROM camera_streams WHERE state IN ('stopped', 'failed', 'expired') "
            "AND (offer IS NOT NULL OR answer IS NOT NULL)"
        ).fetchall()
        return int(count)
    finally:
        conn.close()


async def test_the_provider_sees_the_camera_as_a_labelled_tile_until_the_nurse_stops_it(
    store: Store, db_path: Path, kek_path: Path
) -> None:
    async with box(store, db_path, kek_path) as b:
        camera = await show(b)
        # Everyone is told of the camera: its role and its configured name.
        for each in (b.nurse, b.provider):
            told = each.last("participant", participant=camera)
            assert told == {
                "type": "participant",
                "participant": camera,
                "role": "camera",
                "presence": "admitted",
                "label": "otoscope",
            }
        await flowing(b.provider.video, camera, 20)
        await flowing(b.nurse.video, camera, 5)
        # The camera publishes only: no connection carries anything to it.
        assert b.service.connections(VISIT) == 3  # its publish, camera → nurse and → provider
        assert b.hub.is_open("otoscope")
        assert _states(db_path) == ["live"]

        # A second start of the same camera is refused while it is on.
        with pytest.raises(CameraBusy):
            await camera_streams.submit(store, "otoscope", VISIT, NURSE, datetime.now(UTC))
        # A still from it for another visit too (that visit's patient is not on it); for
        # this visit it is asked.
        with pytest.raises(CameraBusy):
            await still_requests.submit(
                store, "otoscope", "patient-x", "other-visit", NURSE, datetime.now(UTC)
            )
        assert await still_requests.submit(
            store, "otoscope", "patient-x", VISIT, NURSE, datetime.now(UTC)
        )

        assert await camera_streams.stop(store, b.service, "otoscope", VISIT) == 1
        b.provider.last("left", participant=camera)  # the tile goes at once
        await wait_for(lambda: _states(db_path) == ["stopped"], 10, "the devices side stopped")
        await wait_for(lambda: not b.hub.is_open("otoscope"), 10, "the camera closed")
        await wait_for(lambda: b.worker.streaming == 0, 10, "the stream's task ended")
        assert _descriptions_left(db_path) == 0
        assert b.service.connections(VISIT) == 0


async def test_a_large_camera_is_sent_at_most_640x480_and_15_fps(
    store: Store, db_path: Path, kek_path: Path
) -> None:
    async with box(store, db_path, kek_path) as b:
        camera = await show(b, LARGE.name)
        await flowing(b.provider.video, camera, 10)
        start = b.provider.video[camera]
        await asyncio.sleep(3)
        rate = (b.provider.video[camera] - start) / 3
        assert 8 <= rate <= 16.5  # 30 fps from the camera, 15 sent (some slack for the loop)
        assert b.provider.sizes[camera] == {(640, 360)}  # 1280x720 scaled, aspect kept
        await camera_streams.stop(store, b.service, LARGE.name, VISIT)


async def test_the_visit_ending_stops_the_camera_on_the_devices_side(
    store: Store, db_path: Path, kek_path: Path
) -> None:
    async with box(store, db_path, kek_path) as b:
        camera = await show(b)
        await flowing(b.provider.video, camera, 5)
        await b.nurse.send(type="end")
        b.provider.last("ended")
        watcher = StreamWatcher(store, b.service)
        await watcher.check()  # the camera is no longer in the visit: stopping
        await wait_for(lambda: _states(db_path) == ["stopped"], 10, "the devices side stopped")
        await wait_for(lambda: not b.hub.is_open("otoscope"), 10, "the camera closed")


async def test_a_devices_process_that_stops_stamping_is_taken_out_of_the_visit(
    store: Store, db_path: Path, kek_path: Path
) -> None:
    async with box(store, db_path, kek_path) as b:
        camera = await show(b)
        await flowing(b.provider.video, camera, 5)
        # Seen from a few seconds on: the devices process's last stamp is older than the TTL.
        later = datetime.now(UTC) + timedelta(seconds=camera_streams.ALIVE_TTL_S + 1)
        await StreamWatcher(store, b.service, clock=lambda: later).check()
        b.provider.last("left", participant=camera)
        assert b.service.connections(VISIT) == 0
        assert _states(db_path)[0] in ("failed", "stopped")


async def test_the_devices_process_stopping_takes_its_camera_out(
    store: Store, db_path: Path, kek_path: Path
) -> None:
    devices_store = await Store.open(db_path, kek_path)
    worker = StreamWorker(devices_store, [PATTERN], CameraHub(), name="devices:2")
    stopping = asyncio.Event()
    task = asyncio.create_task(worker.run(stopping))
    try:
        async with video_service() as (service, client):
            nurse, provider = client("nurse"), client("provider")
            await nurse.join("nurse")
            await provider.join("provider")
            await nurse.send(type="admit", participant=provider.id)
            stream_id = await camera_streams.submit(
                store, "otoscope", VISIT, NURSE, datetime.now(UTC)
            )
            stream = await camera_streams.wait_offer(store, stream_id)
            camera = await camera_streams.start(store, service, stream, datetime.now(UTC))
            await flowing(provider.video, camera, 5)
            stopping.set()  # SIGTERM: the worker ends its streams (failed: devices gone)
            await task
            assert _states(db_path) == ["failed"]
            await StreamWatcher(store, service).check()
            provider.last("left", participant=camera)
    finally:
        stopping.set()
        await task
        await devices_store.close()


async def test_a_camera_that_cannot_be_opened_answers_with_the_devices_words(
    store: Store, db_path: Path, kek_path: Path
) -> None:
    async with box(store, db_path, kek_path) as b:
        stream_id = await camera_streams.submit(
            store, MISSING.name, VISIT, NURSE, datetime.now(UTC)
        )
        stream = await camera_streams.wait_offer(store, stream_id, timeout_s=15)
        assert stream.state is StreamState.FAILED
        assert stream.error is not None
        assert "/dev/video-not-plugged" in stream.error
        assert b.service.connections(VISIT) == 0
        assert not b.hub.is_open(MISSING.name)
        # Not busy afterwards: the nurse can try again.
        await camera_streams.submit(store, MISSING.name, VISIT, NURSE, datetime.now(UTC))


async def test_a_request_nobody_answered_in_time_is_never_started_later(
    store: Store, db_path: Path, kek_path: Path
) -> None:
    stream_id = await camera_streams.submit(store, "otoscope", VISIT, NURSE, datetime.now(UTC))
    stream = await camera_streams.wait_offer(store, stream_id, timeout_s=0.3)
    assert stream.state is StreamState.EXPIRED
    async with box(store, db_path, kek_path) as b:
        await asyncio.sleep(1)  # the devices worker looks four times a second
        assert _states(db_path) == ["expired"]
        assert not b.hub.is_open("otoscope")
        assert b.worker.started == 0


async def test_an_offer_the_devices_side_gave_up_on_is_not_answered(
    store: Store, db_path: Path, kek_path: Path
) -> None:
    async with box(store, db_path, kek_path) as b:
        stream_id = await camera_streams.submit(store, "otoscope", VISIT, NURSE, datetime.now(UTC))
        stream = await camera_streams.wait_offer(store, stream_id, timeout_s=15)
        assert stream.state is StreamState.OFFERED

        def give_up(conn: sqlite3.Connection) -> None:  # as the devices side stopping does
            conn.execute("UPDATE camera_streams SET state = 'failed' WHERE id = ?", (stream_id,))

        await store.transact(give_up)
        with pytest.raises(CameraRefused):
            await camera_streams.start(store, b.service, stream, datetime.now(UTC))
        assert b.service.connections(VISIT) == 0
        assert [m for m in b.provider.received if m.get("role") == "camera"] != []
        camera_id = next(m for m in b.provider.received if m.get("role") == "camera")
        b.provider.last("left", participant=camera_id["participant"])


async def test_a_camera_is_refused_in_an_empty_visit_and_cannot_be_joined_as(
    store: Store, db_path: Path, kek_path: Path
) -> None:
    service = VideoService()
    with pytest.raises(CameraRefused):
        await service.add_camera("nobody-here", "otoscope", "v=0\r\n")
    with pytest.raises(SignallingError) as refused:
        Inbound().receive(b'{"type":"join","visit":"v","role":"camera","token":"t"}', 0.0)
    assert refused.value.code is ErrorCode.INVALID_FIELD
    await service.async_close()


async def test_a_still_taken_while_streaming_shares_the_live_capture(
    store: Store, db_path: Path, kek_path: Path
) -> None:
    [pat] = await store.create([factories.patient()], NURSE)
    async with box(store, db_path, kek_path) as b:
        camera = await show(b)
        await flowing(b.provider.video, camera, 5)
        stills = StillWorker(b.devices_store, [PATTERN], name="devices:1", hub=b.hub)
        asked = await still_requests.submit(
            store, "otoscope", pat.logical_id, VISIT, NURSE, datetime.now(UTC)
        )
        assert await stills.serve_one() is not None
        done = await still_requests.load(store, asked)
        assert done is not None
        assert done.state is still_requests.RequestState.DONE
        assert b.hub.is_open("otoscope")  # the stream still holds it
        await flowing(b.provider.video, camera, 10)  # and its frames keep coming
        await camera_streams.stop(store, b.service, "otoscope", VISIT)
        await wait_for(lambda: not b.hub.is_open("otoscope"), 10, "the camera closed")


def test_aioice_still_has_the_address_lookup_the_devices_process_replaces() -> None:
    """``gather_loopback_only`` replaces it; if aioice renames it, this fails loudly."""
    parameters = list(inspect.signature(aioice.ice.get_host_addresses).parameters)
    assert parameters == ["use_ipv4", "use_ipv6"]


_UNDER_MDWE = """
import asyncio, ctypes, fractions, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(3)  # the kernel predates it (Linux 6.3)
import av
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.codecs.vpx import Vp8Encoder
encoder = Vp8Encoder()
source = av.open("testsrc2=size=640x480:rate=15", format="lavfi")
for n, frame in enumerate(source.decode(video=0)):
    if n == 10:
        break
    frame.pts, frame.time_base = n * 6000, fractions.Fraction(1, 90000)
    payloads, _timestamp = encoder.encode(frame)
    assert payloads
async def offer():
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())  # DTLS certificate, ICE
    await pc.close()
asyncio.run(offer())
"""


def test_the_cameras_peer_and_vp8_encoder_run_without_writable_executable_memory() -> None:
    """The devices unit keeps ``MemoryDenyWriteExecute=yes``: the stream's VP8 encoding and
    its peer connection (DTLS certificate, ICE) run under the kernel's W^X switch."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _UNDER_MDWE], cwd=root, capture_output=True, text=True, check=False
    )
    if done.returncode == 3:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    assert done.returncode == 0, done.stderr[-2000:]


async def test_no_camera_shown_while_it_takes_a_still_for_another_visit(store: Store) -> None:
    """The other order of the wrong-patient still (``still_requests.submit`` guards the
    first): a still for visit X asked and not done yet, then the camera shown in visit Y,
    and the devices process would take X's still from Y's live capture. The stream is
    refused until the still is done; a still of the same visit, or a finished or long
    abandoned one, holds nothing back."""
    now = datetime.now(UTC)
    asked = await still_requests.submit(store, "otoscope", "patient-x", "visit-x", NURSE, now)
    with pytest.raises(CameraBusy, match="taking a still for another visit"):
        await camera_streams.submit(store, "otoscope", VISIT, NURSE, now)
    # Another camera, or the still's own visit, is not held back.
    assert await camera_streams.submit(store, "exam-cam", VISIT, NURSE, now)
    await still_requests.submit(store, "derm-cam", "patient-x", "visit-x", NURSE, now)
    assert await camera_streams.submit(store, "derm-cam", "visit-x", NURSE, now)

    # Being taken (claimed by the devices process) holds it back too; done, it does not.
    claimed = await store.transact(lambda conn: still_requests.claim_next(conn, "devices", now))
    assert claimed is not None
    assert claimed.id == asked
    with pytest.raises(CameraBusy):
        await camera_streams.submit(store, "otoscope", VISIT, NURSE, now)
    await store.transact(
        lambda conn: still_requests.finish(
            conn, asked, still_requests.RequestState.FAILED, now, error="test"
        )
    )
    assert await camera_streams.submit(store, "otoscope", VISIT, NURSE, now)

    # A still asked long ago and never finished (the devices process is gone) is not in
    # flight: the bound covers the still side's own expiry and abandonment times.
    assert still_requests.REQUEST_TTL_S <= camera_streams.STILL_IN_FLIGHT_S
    assert still_requests.CLAIM_TTL_S <= camera_streams.STILL_IN_FLIGHT_S
    late = now + timedelta(seconds=camera_streams.STILL_IN_FLIGHT_S + 1)
    await still_requests.submit(store, "skin-cam", "patient-x", "visit-x", NURSE, now)
    with pytest.raises(CameraBusy):
        await camera_streams.submit(store, "skin-cam", "visit-z", NURSE, now)
    assert await camera_streams.submit(store, "skin-cam", "visit-z", NURSE, late)
