"""Exam camera stills: libav's test pattern stands in for the USB camera (the same MediaPlayer
and libav path as /dev/video0, with the lavfi input instead of v4l2; CI has no camera).

Then the devices process's :class:`StillWorker` serving the web process's requests through a
real database file (tests/web/test_exam_still.py covers the endpoint's side)."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import av
import pytest

from appliance import db
from appliance.config import ExamCameraConfig
from appliance.store import Store
from services.video import still_requests
from services.video.exam_camera import CameraError, ExamCamera, take_still
from services.video.still_requests import RequestState, StillWorker
from tests import factories

PATTERN = ExamCameraConfig(device="testsrc2=size=640x480:rate=30", format="lavfi", name="otoscope")
NURSE = "user:nurse1"


def _decoded(jpeg: bytes) -> av.VideoFrame:
    codec = av.CodecContext.create("mjpeg", "r")
    [frame] = codec.decode(av.Packet(jpeg))
    assert isinstance(frame, av.VideoFrame)
    return frame


async def test_a_still_is_stored_as_an_encrypted_audited_media_queued_for_the_ehr(
    store: Store, db_path: Path
) -> None:
    [pat] = await store.create([factories.patient()], NURSE)
    ref = f"Patient/{pat.logical_id}"
    camera = ExamCamera(PATTERN)
    await camera.open()
    try:
        taken = datetime(2026, 11, 27, 15, 0, tzinfo=UTC)
        stored = await take_still(store, camera, ref, NURSE, taken, "Encounter/enc-1")
    finally:
        await camera.close()
    media = await store.read("Media", stored.logical_id, NURSE)
    assert media["subject"] == {"reference": ref}
    assert media["encounter"] == {"reference": "Encounter/enc-1"}
    assert media["deviceName"] == "otoscope"
    assert media["content"]["contentType"] == "image/jpeg"
    jpeg = base64.b64decode(media["content"]["data"])
    assert media["content"]["size"] == len(jpeg)
    frame = _decoded(jpeg)
    assert (frame.width, frame.height) == (640, 480)
    conn = sqlite3.connect(db_path)
    try:
        # Encrypted at rest: neither the image nor its base64 is in the database file.
        raw = b"".join(row[0] for row in conn.execute("SELECT body FROM resources"))
        assert jpeg[100:164] not in raw
        assert media["content"]["data"][200:264].encode() not in raw
        [(state,)] = conn.execute(
            "SELECT o.state FROM outbox o JOIN resources r ON r.id = o.resource_id "
            "WHERE r.logical_id = ?",
            (stored.logical_id,),
        ).fetchall()
        assert state == "pending"  # goes upstream when the link allows
        audited = conn.execute(
            "SELECT count(*) FROM audit WHERE actor = ? AND entity = ?",
            (NURSE, f"Media/{stored.logical_id}"),
        ).fetchone()[0]
        assert audited >= 1
    finally:
        conn.close()


async def test_the_visit_track_and_stills_share_the_camera() -> None:
    camera = ExamCamera(PATTERN)
    await camera.open()
    track = camera.track()
    try:
        first = await asyncio.wait_for(track.recv(), 5)
        assert isinstance(first, av.VideoFrame)
        jpeg = await camera.still()
        # The visit's track keeps its frames coming after a still was taken.
        after = await asyncio.wait_for(track.recv(), 5)
        assert isinstance(after, av.VideoFrame)
        assert after.pts is not None
        assert first.pts is not None
        assert after.pts > first.pts
        assert jpeg[:2] == b"\xff\xd8"  # SOI
        assert jpeg[-2:] == b"\xff\xd9"  # EOI
    finally:
        track.stop()
        await camera.close()


async def test_a_missing_camera_is_a_clear_error_and_nothing_is_stored(store: Store) -> None:
    camera = ExamCamera(ExamCameraConfig(device="/dev/video-not-here", name="exam camera"))
    with pytest.raises(CameraError, match="exam camera at /dev/video-not-here"):
        await camera.open()
    with pytest.raises(CameraError, match="is not open"):
        await camera.still()
    assert await store.last_row_id() == 0


# -- the devices process's worker: requests from the web process through the store ----------


async def _ask(store: Store, patient_id: str, count: int, now: datetime) -> list[int]:
    return [
        await still_requests.submit(store, "otoscope", patient_id, f"enc-{n}", NURSE, now)
        for n in range(count)
    ]


async def _finished(store: Store, asked: list[int]) -> bool:
    found = [await still_requests.load(store, request_id) for request_id in asked]
    return all(f is not None and f.state in still_requests.FINISHED for f in found)


def _rows(db_path: Path) -> list[tuple[int, str, str | None, str | None]]:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(
            "SELECT id, state, claimed_by, media_id FROM camera_requests ORDER BY id"
        ).fetchall()
    finally:
        conn.close()


async def test_two_workers_never_take_the_same_request(
    store: Store, db_path: Path, kek_path: Path
) -> None:
    [pat] = await store.create([factories.patient()], NURSE)
    asked = await _ask(store, pat.logical_id, 6, datetime.now(UTC))
    # Two devices processes' workers, each on its own connection to the database.
    stores = [await Store.open(db_path, kek_path) for _ in range(2)]
    workers = [
        StillWorker(s, [PATTERN], name=f"devices:{n}", poll_s=0.01) for n, s in enumerate(stores)
    ]
    stopping = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stopping)) for w in workers]
    try:
        async with asyncio.timeout(60):
            while not await _finished(store, asked):  # noqa: ASYNC110 - the store is the bus
                await asyncio.sleep(0.05)
    finally:
        stopping.set()
        await asyncio.gather(*tasks)
        for opened in stores:
            await opened.close()
    rows = _rows(db_path)
    assert [row[0] for row in rows] == asked
    assert sum(w.taken for w in workers) == 6  # each request taken once, by one of them
    media_ids = [media for _id, _state, _by, media in rows]
    assert len(set(media_ids)) == 6
    for n, media_id in enumerate(media_ids):
        assert media_id is not None
        media = await store.read("Media", media_id, NURSE)
        assert media["encounter"] == {"reference": f"Encounter/enc-{n}"}
        assert media["subject"] == {"reference": f"Patient/{pat.logical_id}"}


def test_concurrent_claims_on_two_connections_are_disjoint(db_path: Path) -> None:
    conn = db.connect_sync(db_path)
    with db.transaction_sync(conn):
        for n in range(200):
            conn.execute(
                "INSERT INTO camera_requests "
                "(camera, patient_id, encounter_id, requested_by, requested_at) VALUES (?,?,?,?,?)",
                ("otoscope", "p", f"enc-{n}", NURSE, datetime.now(UTC).isoformat()),
            )
    conn.close()

    start = threading.Barrier(2)  # both connections open, then both claim at once

    def claim_all(worker: str) -> list[int]:
        own = db.connect_sync(db_path)
        claimed: list[int] = []
        start.wait()
        try:
            while True:
                with db.transaction_sync(own):
                    found = still_requests.claim_next(own, worker, datetime.now(UTC))
                if found is None:
                    return claimed
                claimed.append(found.id)
                time.sleep(0.002)  # taking the still: the other connection gets its turn
        finally:
            own.close()

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(claim_all, ["a", "b"])
    assert first
    assert second
    assert not set(first) & set(second)
    assert sorted(first + second) == list(range(1, 201))


async def test_the_worker_expires_a_request_nobody_waits_for_and_fails_an_abandoned_one(
    store: Store, db_path: Path
) -> None:
    [pat] = await store.create([factories.patient()], NURSE)
    now = datetime.now(UTC)
    [stale] = await _ask(store, pat.logical_id, 1, now - timedelta(minutes=1))
    [abandoned] = await _ask(store, pat.logical_id, 1, now - timedelta(minutes=5))
    await store.transact(
        lambda conn: conn.execute(
            "UPDATE camera_requests SET state = 'claimed', claimed_by = 'gone', claimed_at = ? "
            "WHERE id = ?",
            ((now - timedelta(minutes=5)).isoformat(timespec="microseconds"), abandoned),
        )
    )
    before = await store.last_row_id()
    worker = StillWorker(store, [PATTERN], name="devices:1")
    assert await worker.serve_one() is None
    final = {row[0]: row[1] for row in _rows(db_path)}
    assert final == {stale: "expired", abandoned: "failed"}
    found = await still_requests.load(store, abandoned)
    assert found is not None
    assert found.error == still_requests.DEVICES_GONE
    assert await store.last_row_id() == before  # no still taken for either


async def test_a_request_for_a_camera_this_box_does_not_have_fails_cleanly(store: Store) -> None:
    request_id = await still_requests.submit(
        store, "dermatoscope", "p", "enc-1", NURSE, datetime.now(UTC)
    )
    worker = StillWorker(store, [PATTERN], name="devices:1")
    served = await worker.serve_one()
    assert served is not None
    assert served.id == request_id
    found = await still_requests.load(store, request_id)
    assert found is not None
    assert found.state is RequestState.FAILED
    assert found.error == "no camera named 'dermatoscope' in the site config"


_UNDER_MDWE = """
import asyncio, ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(3)  # the kernel predates it (Linux 6.3)
import av
from appliance.config import ExamCameraConfig
from services.video.exam_camera import ExamCamera, encode_jpeg

async def main():
    camera = ExamCamera(ExamCameraConfig(device=sys.argv[1], format="lavfi", name="otoscope"))
    await camera.open()
    try:
        assert (await camera.still())[:2] == b"\\xff\\xd8"
    finally:
        await camera.close()
    # What UVC cameras hand over raw: YUYV 4:2:2 and NV12, scaled to JPEG's 4:2:0.
    for pix_fmt in ("yuyv422", "nv12"):
        assert encode_jpeg(av.VideoFrame(1280, 720, pix_fmt))[:2] == b"\\xff\\xd8"

asyncio.run(main())
"""


def test_a_still_needs_no_writable_executable_memory() -> None:
    """The devices unit keeps ``MemoryDenyWriteExecute=yes`` while it takes stills: the same
    path under the kernel's own W^X switch, ``prctl(PR_SET_MDWE)``, which fails any mapping
    that would be writable and executable (systemd applies it, or an equivalent seccomp
    filter, for that directive)."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _UNDER_MDWE, PATTERN.device],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode == 3:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    assert done.returncode == 0, done.stderr[-2000:]


async def test_a_worker_stopped_after_storing_its_still_leaves_the_request_done(
    store: Store,
) -> None:
    now = datetime.now(UTC)
    request_id = await still_requests.submit(store, "otoscope", "p", "enc-1", NURSE, now)
    await store.transact(lambda conn: still_requests.claim_next(conn, "devices:1", now))
    await store.transact(
        lambda conn: still_requests.finish(conn, request_id, RequestState.DONE, now, media_id="m")
    )
    # What a cancelled worker records on its way out: it must not undo the stored still.
    await store.transact(
        lambda conn: still_requests.finish(
            conn, request_id, RequestState.FAILED, now, error=still_requests.DEVICES_GONE
        )
    )
    found = await still_requests.load(store, request_id)
    assert found is not None
    assert (found.state, found.media_id, found.error) == (RequestState.DONE, "m", None)
