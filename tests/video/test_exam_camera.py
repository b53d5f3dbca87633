"""Exam camera stills: libav's test pattern stands in for the USB camera (the same MediaPlayer
and libav path as /dev/video0, with the lavfi input instead of v4l2; CI has no camera)."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import av
import pytest

from appliance.config import ExamCameraConfig
from appliance.store import Store
from services.video.exam_camera import CameraError, ExamCamera, take_still
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
