"""Exam cameras: a USB (V4L2) camera on the box, as a track for the visit and for stills.

An otoscope or exam camera plugged into the box is opened once with libav (aiortc's
``MediaPlayer``: ``/dev/video0``, format ``v4l2``). Its frames are shared through aiortc's
``MediaRelay``: the visit gets one subscription as an extra video track (the one place the
box encodes video itself: the camera's frames are raw), and each still takes a short-lived
subscription of its own, so a still never steals frames from the visit.

A still is the next frame, encoded as JPEG (libav's ``mjpeg`` encoder, off the event loop)
and stored as a FHIR Media like the kiosk's photos (:func:`services.intake.photo_media`):
encrypted at rest by the store, audited, and queued in the outbox, so it reaches the EHR
when the link allows (store-and-forward). Nothing is recorded but the stills people take.

Opening a camera that is not there, or one that stops giving frames, raises
:class:`CameraError` with the device's path and what went wrong; nothing is stored.

Only the devices process opens cameras (its unit allows ``/dev/video*``; the web process's
does not): stills a nurse asks for in the web process reach it through the store
(:mod:`services.video.still_requests`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from fractions import Fraction

import av
from aiortc import MediaStreamTrack
from aiortc.contrib.media import MediaPlayer, MediaRelay
from aiortc.mediastreams import MediaStreamError

from appliance import fhir
from appliance.config import ExamCameraConfig
from appliance.store import Store, StoredResource
from services import intake

logger = logging.getLogger(__name__)

STILL_TIMEOUT_S = 5.0
JPEG_QUALITY = 3  # mjpeg quantiser: 2 (best) … 31; 3 keeps an otoscope's detail (~65 KB at 720p)
# What the devices process encodes for a live camera (VP8, in Python's aiortc): 640x480 at
# 15 fps costs about a fifth of what 1280x720 at 30 does; stills keep the camera's full size.
STREAM_MAX_SIZE = (640, 480)
STREAM_MAX_FPS = 15


class CameraError(RuntimeError):
    """The exam camera could not be opened or gave no frame."""


class ExamCamera:
    """One camera attached to the box; :meth:`open` before use, :meth:`close` after."""

    def __init__(self, config: ExamCameraConfig) -> None:
        self.config = config
        self._player: MediaPlayer | None = None
        self._relay = MediaRelay()

    async def open(self) -> None:
        """Open the device (libav opens it synchronously: off the event loop)."""
        options = {"video_size": self.config.size, "framerate": str(self.config.framerate)}
        if self.config.format == "lavfi":  # a test pattern: the source names its own size
            options = {}
        try:
            self._player = await asyncio.to_thread(
                MediaPlayer, self.config.device, format=self.config.format, options=options
            )
        except (av.FFmpegError, OSError) as exc:
            raise CameraError(f"{self.config.name} at {self.config.device}: {exc}") from exc
        if self._player.video is None:
            raise CameraError(f"{self.config.name} at {self.config.device}: no video stream")
        logger.info("%s opened at %s", self.config.name, self.config.device)

    def track(self) -> MediaStreamTrack:
        """A video track of the camera for the visit (one per call, all sharing the device)."""
        return self._relay.subscribe(self._source(), buffered=False)

    async def still(self) -> bytes:
        """The next frame as JPEG bytes."""
        subscription = self._relay.subscribe(self._source(), buffered=False)
        try:
            async with asyncio.timeout(STILL_TIMEOUT_S):
                frame = await subscription.recv()
        except (TimeoutError, MediaStreamError) as exc:
            raise CameraError(
                f"{self.config.name} at {self.config.device}: no frame within {STILL_TIMEOUT_S:g} s"
            ) from exc
        finally:
            subscription.stop()
        if not isinstance(frame, av.VideoFrame):
            raise CameraError(f"{self.config.name} at {self.config.device}: not a video frame")
        return await asyncio.to_thread(encode_jpeg, frame)

    async def close(self) -> None:
        """Release the device. Stopping the player joins its reader thread (up to one frame
        period), so it runs off the event loop; nothing in aiortc listens for its "ended"."""
        player, self._player = self._player, None
        if player is not None and player.video is not None:
            await asyncio.to_thread(player.video.stop)

    def _source(self) -> MediaStreamTrack:
        if self._player is None or self._player.video is None:
            raise CameraError(f"{self.config.name} at {self.config.device} is not open")
        return self._player.video


class CappedTrack(MediaStreamTrack):
    """A camera's frames at most ``max_size`` (scaled down, aspect kept) and ``max_fps``
    (frames dropped): what the visit gets, so the devices process's VP8 encoder stays cheap."""

    kind = "video"

    def __init__(
        self,
        source: MediaStreamTrack,
        max_size: tuple[int, int] = STREAM_MAX_SIZE,
        max_fps: float = STREAM_MAX_FPS,
    ) -> None:
        super().__init__()
        self._source = source
        self._max_width, self._max_height = max_size
        # Keep a frame once 90 % of the period has passed since the last one kept, so a
        # 30 fps camera gives exactly 15 and timestamp jitter does not drop extra frames.
        self._gap = 0.9 / max_fps
        self._next: float | None = None

    async def recv(self) -> av.VideoFrame:
        while True:
            frame = await self._source.recv()
            if not isinstance(frame, av.VideoFrame):
                raise MediaStreamError
            when = frame.time
            if when is None or self._next is None or when >= self._next:
                break
        if when is not None:
            self._next = when + self._gap
        scale = min(self._max_width / frame.width, self._max_height / frame.height)
        if scale < 1:
            width, height = int(frame.width * scale) // 2 * 2, int(frame.height * scale) // 2 * 2
            pts, time_base = frame.pts, frame.time_base
            frame = frame.reformat(width=width, height=height)
            frame.pts, frame.time_base = pts, time_base
        return frame

    def stop(self) -> None:
        super().stop()
        self._source.stop()


class CameraHub:
    """The cameras open in the devices process, shared: a still taken while the camera is in
    a visit comes from the same capture (a V4L2 device opens once), and the last user closes
    it (a camera held open keeps its light on)."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[ExamCamera, int]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def is_open(self, name: str) -> bool:
        """Whether the camera is open now (for tests and the heartbeat)."""
        return name in self._open

    @contextlib.asynccontextmanager
    async def use(self, config: ExamCameraConfig) -> AsyncIterator[ExamCamera]:
        """The camera, open for the ``async with`` block (``CameraError`` if it cannot be)."""
        lock = self._locks.setdefault(config.name, asyncio.Lock())
        async with lock:
            camera, users = self._open.get(config.name, (None, 0))
            if camera is None:
                camera = ExamCamera(config)
                try:
                    await camera.open()
                except BaseException:
                    await camera.close()
                    raise
            self._open[config.name] = (camera, users + 1)
        try:
            yield camera
        finally:
            await asyncio.shield(self._release(config.name))

    async def _release(self, name: str) -> None:
        async with self._locks[name]:
            camera, users = self._open[name]
            if users > 1:
                self._open[name] = (camera, users - 1)
                return
            del self._open[name]
            await camera.close()


def encode_jpeg(frame: av.VideoFrame) -> bytes:
    """One frame as a baseline JPEG (full-range YUV 4:2:0, as cameras and browsers expect)."""
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height = frame.width, frame.height
    codec.pix_fmt = "yuvj420p"
    codec.time_base = Fraction(1, 30)
    codec.qmin = codec.qmax = JPEG_QUALITY  # a fixed quantiser, not a bitrate
    packets = codec.encode(frame.reformat(format="yuvj420p"))
    packets += codec.encode(None)
    return b"".join(bytes(packet) for packet in packets)


def still_media(
    patient_ref: str,
    jpeg: bytes,
    taken: datetime,
    camera: str,
    encounter_ref: str | None = None,
) -> fhir.FhirJson:
    """The still as a FHIR Media: the kiosk photo's shape, from the exam camera, in the visit."""
    media = intake.photo_media(patient_ref, jpeg, taken, camera)
    media["deviceName"] = camera
    media["content"]["title"] = f"Still from the {camera}"
    if encounter_ref is not None:
        media["encounter"] = {"reference": encounter_ref}
    return media


async def take_still(
    store: Store,
    camera: ExamCamera,
    patient_ref: str,
    actor: str,
    taken: datetime,
    encounter_ref: str | None = None,
    *,
    also: Callable[[sqlite3.Connection, list[int]], None] | None = None,
) -> StoredResource:
    """Take a still and store it (encrypted, audited, queued for the EHR).

    ``also(conn, row_ids)`` runs in the Media's own write transaction (the devices process
    marks the web's request done with it: both commit, or neither).
    """
    jpeg = await camera.still()
    [stored] = await store.create(
        [still_media(patient_ref, jpeg, taken, camera.config.name, encounter_ref)],
        actor,
        audit_each=True,
        also=also,
    )
    return stored
