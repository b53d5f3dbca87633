"""An exam camera live in a visit: the devices process publishes it, the video service answers.

The devices process owns the camera (the web process's unit has ``PrivateDevices=yes``), so it
sends the media: it joins the visit as a WebRTC participant of its own, an aiortc peer that
publishes one video track and receives nothing. Its offer and the box's answer cross the
store, the bus between the processes (DESIGN.md, "Processes"), in ``camera_streams``
(migration 0014); no listener and no credential are added to either process. Why this and
not a loopback WebSocket with a token: docs/video.md, "Exam cameras".

* The web process (the nurse's "Show <camera> in the visit") :func:`submit`\\ s a ``pending``
  request and :func:`wait_offer`\\ s; at its deadline an unanswered request is expired in one
  conditional ``UPDATE``, so no devices process starts it later.
* :class:`StreamWorker` (devices process) claims it inside ``BEGIN IMMEDIATE``, opens the
  camera through the :class:`~services.video.exam_camera.CameraHub` (stills share the
  capture), makes its offer (ICE gathered first: one offer, one answer, no trickle) and
  writes it (``offered``), only if the request is still claimed.
* The web process adds the camera to the room (:meth:`VideoService.add_camera`) and writes
  the answer (``live``); the devices process applies it. While live the devices process
  stamps ``alive_at`` every :data:`ALIVE_EVERY_S`.
* It ends when the nurse stops it (:func:`stop`: the camera leaves the room at once, the row
  is ``stopping`` until the devices process closes the camera: ``stopped``), when the visit
  ends or everyone else leaves (:class:`StreamWatcher` in the web process sees the camera is
  no longer in the visit: ``stopping``), or when the devices process dies (its stamp older
  than :data:`ALIVE_TTL_S`: the watcher takes the camera out, ``failed``). The devices side
  also stops on its own if its connection fails (the web process died).

No column is PHI. The session descriptions (host addresses, ICE credentials, DTLS
fingerprints of one stream's connection) are cleared when the stream ends and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from appliance.config import ExamCameraConfig
from appliance.errors import ApplianceError
from appliance.store import Store
from services.video.exam_camera import CameraError, CameraHub, CappedTrack
from services.video.service import CameraRefused, VideoService

logger = logging.getLogger(__name__)

START_WAIT_S = 15.0  # the web's wait for the offer: opening a camera takes a second or two
WAIT_POLL_S = 0.1
CLAIM_POLL_S = 0.25  # the devices side's look for work, and its read of a live row
ALIVE_EVERY_S = 1.0  # the devices process's stamp on a live stream
ALIVE_TTL_S = 5.0  # a stamp older than this: the devices process is gone
WATCH_S = 0.5  # the web process's look at live streams
KEEP_FINISHED = timedelta(days=7)
# A still asked longer ago than this is done, expired or abandoned (still_requests: its
# REQUEST_TTL_S and CLAIM_TTL_S, both within it); a younger one may still be being taken.
STILL_IN_FLIGHT_S = 60.0
DEVICES_GONE = "the devices service stopped"
CONNECTION_FAILED = "the camera's connection to the video service failed"

Clock = Callable[[], datetime]


class StreamState(StrEnum):
    """Where a stream is; persisted in ``camera_streams.state``."""

    PENDING = "pending"
    CLAIMED = "claimed"
    OFFERED = "offered"
    LIVE = "live"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    EXPIRED = "expired"


FINISHED = frozenset({StreamState.STOPPED, StreamState.FAILED, StreamState.EXPIRED})
# The states a nurse's or provider's stop acts on, and what their pages show as shown.
SHOWN = (StreamState.PENDING, StreamState.CLAIMED, StreamState.OFFERED, StreamState.LIVE)


class CameraBusy(Exception):
    """The camera is already in a visit (or being started)."""


@dataclass(frozen=True, slots=True)
class CameraStream:
    """One row of ``camera_streams`` (without its times)."""

    id: int
    camera: str
    encounter_id: str
    state: StreamState
    participant_id: str | None
    offer: str | None
    answer: str | None
    error: str | None


# The columns :func:`_stream` reads, in its order (spelt out in each query: no SQL is built).


def _stream(row: Sequence[object]) -> CameraStream:
    def text(value: object) -> str | None:
        return None if value is None else str(value)

    return CameraStream(
        id=int(str(row[0])),
        camera=str(row[1]),
        encounter_id=str(row[2]),
        state=StreamState(str(row[3])),
        participant_id=text(row[4]),
        offer=text(row[5]),
        answer=text(row[6]),
        error=text(row[7]),
    )


def _stamp(when: datetime) -> str:
    """A UTC time as fixed-width ISO text, so the stored times compare as strings."""
    return when.astimezone(UTC).isoformat(timespec="microseconds")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def end_stale(conn: sqlite3.Connection, now: datetime) -> None:
    """End what nobody will finish: a request not live after :data:`START_WAIT_S` (the web's
    wait is over) is expired; a live or stopping stream whose devices process stopped
    stamping it is failed. Old finished rows are deleted."""
    stamp = _stamp(now)
    started = _stamp(now - timedelta(seconds=START_WAIT_S))
    expired = conn.execute(
        "UPDATE camera_streams SET state = 'expired', finished_at = ?, offer = NULL "
        "WHERE state IN ('pending', 'claimed', 'offered') AND requested_at < ?",
        (stamp, started),
    ).rowcount
    gone = conn.execute(
        "UPDATE camera_streams SET state = 'failed', finished_at = ?, error = ?, offer = NULL, "
        "answer = NULL WHERE state IN ('live', 'stopping') AND alive_at < ?",
        (stamp, DEVICES_GONE, _stamp(now - timedelta(seconds=ALIVE_TTL_S))),
    ).rowcount
    if expired or gone:
        logger.warning("camera streams: %d expired unanswered, %d without devices", expired, gone)
    conn.execute("DELETE FROM camera_streams WHERE finished_at < ?", (_stamp(now - KEEP_FINISHED),))


async def load(store: Store, stream_id: int) -> CameraStream | None:
    """The stream as it stands."""
    rows = await store.query(
        "SELECT id, camera, encounter_id, state, participant_id, offer, answer, error "
        "FROM camera_streams WHERE id = ?",
        (stream_id,),
    )
    return _stream(rows[0]) if rows else None


async def _finish(
    store: Store, stream_id: int, state: StreamState, now: datetime, error: str | None = None
) -> bool:
    """End a stream not ended yet; its session descriptions are cleared."""

    def update(conn: sqlite3.Connection) -> bool:
        cursor = conn.execute(
            "UPDATE camera_streams SET state = ?, finished_at = ?, error = coalesce(?, error), "
            "offer = NULL, answer = NULL "
            "WHERE id = ? AND state NOT IN ('stopped', 'failed', 'expired')",
            (state, _stamp(now), error, stream_id),
        )
        return cursor.rowcount == 1

    return await store.transact(update)


# -- the web side ----------------------------------------------------------------------------


def shown_in(conn: sqlite3.Connection, camera: str) -> str | None:
    """The visit ``camera`` is shown in (or being started for), if any; call
    :func:`end_stale` first in the same transaction."""
    row = conn.execute(
        "SELECT encounter_id FROM camera_streams WHERE camera = ? AND state IN "
        "('pending', 'claimed', 'offered', 'live', 'stopping') LIMIT 1",
        (camera,),
    ).fetchone()
    return None if row is None else str(row[0])


async def submit(
    store: Store, camera: str, encounter_id: str, requested_by: str, now: datetime
) -> int:
    """Ask the devices process to show ``camera`` in the visit; ``CameraBusy`` if it is on."""

    def insert(conn: sqlite3.Connection) -> int | str:
        """The new stream's id, or why the camera is busy (returned, not raised: what
        ``end_stale`` ended stays committed)."""
        end_stale(conn, now)
        if shown_in(conn, camera) is not None:
            return f"the {camera} is already in a visit"
        if still_in_flight(conn, camera, encounter_id, now):
            return f"the {camera} is taking a still for another visit; try again shortly"
        cursor = conn.execute(
            "INSERT INTO camera_streams (camera, encounter_id, requested_by, requested_at) "
            "VALUES (?,?,?,?)",
            (camera, encounter_id, requested_by, _stamp(now)),
        )
        return int(cursor.lastrowid or 0)

    outcome = await store.transact(insert)
    if isinstance(outcome, str):
        raise CameraBusy(outcome)
    return outcome


def still_in_flight(
    conn: sqlite3.Connection, camera: str, encounter_id: str, now: datetime
) -> bool:
    """Whether a still for another visit is asked of ``camera`` and not done yet (pending or
    being taken, asked less than :data:`STILL_IN_FLIGHT_S` ago). The devices process takes a
    still from the live capture when the camera is streaming, so showing the camera in this
    visit meanwhile would put this visit's patient in the other visit's record
    (``still_requests.submit`` guards the other order). Call inside the transaction that
    inserts the stream."""
    row = conn.execute(
        "SELECT 1 FROM camera_requests WHERE camera = ? AND encounter_id != ? "
        "AND state IN ('pending', 'claimed') AND requested_at >= ? LIMIT 1",
        (camera, encounter_id, _stamp(now - timedelta(seconds=STILL_IN_FLIGHT_S))),
    ).fetchone()
    return row is not None


async def wait_offer(
    store: Store,
    stream_id: int,
    *,
    timeout_s: float = START_WAIT_S,
    poll_s: float = WAIT_POLL_S,
    clock: Clock = _utcnow,
) -> CameraStream:
    """The stream once the devices process offered (or failed), or at the deadline expired:
    a request expired before its offer is answered is never started (the devices side's
    offer and this expiry are both conditional on the state)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    waiting = (StreamState.PENDING, StreamState.CLAIMED)
    try:
        while True:
            found = await load(store, stream_id)
            if found is None:
                raise LookupError(f"camera stream {stream_id} is gone")
            left = deadline - loop.time()
            if found.state not in waiting or left <= 0:
                break
            await asyncio.sleep(min(poll_s, left))
    except asyncio.CancelledError:
        with contextlib.suppress(ApplianceError, sqlite3.Error):
            await asyncio.shield(_finish(store, stream_id, StreamState.EXPIRED, clock()))
        raise
    if found.state in waiting and await _finish(store, stream_id, StreamState.EXPIRED, clock()):
        logger.warning("camera stream %d expired: the devices service did not answer", found.id)
    final = await load(store, stream_id)
    assert final is not None  # finished rows are kept for days
    return final


async def start(
    store: Store,
    service: VideoService,
    stream: CameraStream,
    now: datetime,
) -> str:
    """Add an offered stream's camera to its visit and hand the devices process the answer;
    the camera's participant id. ``CameraRefused`` (the stream is failed) if the service
    cannot take it or the devices process gave up meanwhile."""
    assert stream.offer is not None  # offered
    try:
        participant, answer = await service.add_camera(
            stream.encounter_id, stream.camera, stream.offer
        )
    except CameraRefused as refused:
        await _finish(store, stream.id, StreamState.FAILED, now, f"not shown: {refused}")
        raise

    def update(conn: sqlite3.Connection) -> bool:
        cursor = conn.execute(
            "UPDATE camera_streams SET state = 'live', participant_id = ?, answer = ?, "
            "alive_at = ? WHERE id = ? AND state = 'offered'",
            (participant, answer, _stamp(now), stream.id),
        )
        return cursor.rowcount == 1

    if not await store.transact(update):
        await service.remove_camera(stream.encounter_id, participant)
        raise CameraRefused("the devices service gave up before the answer")
    logger.info("camera stream %d live (%s) as %s", stream.id, stream.camera, participant)
    return participant


async def showing(store: Store, encounter_id: str) -> set[str]:
    """The cameras shown in the visit, or on their way: what :func:`stop` would stop, and
    what a second start would be refused (409). The visit's pages render their buttons from
    it, so a camera shown before the page loaded is offered as one to stop."""
    rows = await store.query(
        "SELECT camera FROM camera_streams WHERE encounter_id = ? AND state IN (?, ?, ?, ?)",
        (encounter_id, *SHOWN),
    )
    return {str(row[0]) for row in rows}


async def stop(store: Store, service: VideoService, camera: str, encounter_id: str) -> int:
    """The nurse stops showing ``camera`` in the visit: it leaves the room now, and the
    devices process closes it; how many streams were stopped (0 or 1)."""

    def update(conn: sqlite3.Connection) -> list[str | None]:
        rows = conn.execute(
            "UPDATE camera_streams SET state = 'stopping' WHERE camera = ? AND encounter_id = ? "
            "AND state IN (?, ?, ?, ?) RETURNING participant_id",
            (camera, encounter_id, *SHOWN),
        ).fetchall()
        return [None if row[0] is None else str(row[0]) for row in rows]

    participants = await store.transact(update)
    for participant in participants:
        if participant is not None:
            await service.remove_camera(encounter_id, participant)
    return len(participants)


def _stopping(stream_id: int) -> Callable[[sqlite3.Connection], None]:
    def update(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE camera_streams SET state = 'stopping' WHERE id = ? AND state = 'live'",
            (stream_id,),
        )

    return update


class StreamWatcher:
    """Web process: takes a camera out of its visit when the devices process stops stamping
    it; marks a stream ``stopping`` when its camera is no longer in the visit (ended, left
    alone, or the web process restarted)."""

    def __init__(
        self,
        store: Store,
        service: VideoService,
        *,
        clock: Clock = _utcnow,
        poll_s: float = WATCH_S,
    ) -> None:
        self._store = store
        self._service = service
        self._clock = clock
        self._poll_s = poll_s

    async def run(self, stopping: asyncio.Event) -> None:
        """Watch until ``stopping``; a store error is logged and retried."""
        while not stopping.is_set():
            try:
                await self.check()
            except (ApplianceError, sqlite3.Error) as exc:
                logger.error("camera streams: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self._poll_s)

    async def check(self) -> None:
        """One look at the open streams."""
        now = self._clock()
        # First end what nobody will finish: a stream whose devices process stopped
        # stamping it is failed (end_stale logs how many).
        await self._store.transact(lambda conn: end_stale(conn, now))
        # Streams in a room, and those that ended lately (the devices side failed or
        # stopped them, or it died): their camera must not stay in the room.
        rows = await self._store.query(
            "SELECT id, encounter_id, participant_id, state FROM camera_streams "
            "WHERE participant_id IS NOT NULL AND (state IN ('live', 'stopping') "
            "OR finished_at > ?)",
            (_stamp(now - timedelta(seconds=60)),),
        )
        for stream_id, visit, participant, state in rows:
            if state == StreamState.LIVE and not self._service.camera_in_visit(visit, participant):
                await self._service.remove_camera(visit, participant)
                logger.info("camera stream %d stopping: its visit is over", stream_id)
                await self._store.transact(_stopping(stream_id))
            elif state != StreamState.LIVE:
                await self._service.remove_camera(visit, participant)  # no-op once gone


# -- the devices side ------------------------------------------------------------------------


def gather_loopback_only() -> None:
    """Make this process's aiortc peers gather 127.0.0.1 only (the devices process: its only
    peers are cameras publishing to the box's own video service).

    aioice gathers host candidates on every interface but loopback and has no option for
    it, so its address lookup is replaced, process-wide; ``tests/video/test_camera_streams``
    checks the function still exists with this signature.
    """
    import aioice.ice

    def loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return ["127.0.0.1"]

    aioice.ice.get_host_addresses = loopback


def claim_next(conn: sqlite3.Connection, worker: str, now: datetime) -> CameraStream | None:
    """Claim the oldest pending stream for ``worker``; call inside ``BEGIN IMMEDIATE``."""
    end_stale(conn, now)
    row = conn.execute(
        "UPDATE camera_streams SET state = 'claimed', claimed_by = ?, claimed_at = ? "
        "WHERE id = (SELECT id FROM camera_streams WHERE state = 'pending' ORDER BY id LIMIT 1) "
        "RETURNING id, camera, encounter_id, state, participant_id, offer, answer, error",
        (worker, _stamp(now)),
    ).fetchone()
    return None if row is None else _stream(row)


class StreamWorker:
    """Devices process: publishes the cameras nurses show in visits, each as its own peer."""

    def __init__(
        self,
        store: Store,
        cameras: Sequence[ExamCameraConfig],
        hub: CameraHub,
        *,
        name: str,
        clock: Clock = _utcnow,
        poll_s: float = CLAIM_POLL_S,
        on_status: Callable[..., None] | None = None,
    ) -> None:
        self._store = store
        self._cameras = {camera.name: camera for camera in cameras}
        self._hub = hub
        self._name = name
        self._clock = clock
        self._poll_s = poll_s
        self._on_status = on_status
        self._streams: dict[int, asyncio.Task[None]] = {}
        self.started = 0
        self.failed = 0

    @property
    def streaming(self) -> int:
        """How many streams this worker is serving now."""
        return len(self._streams)

    async def run(self, stopping: asyncio.Event) -> None:
        """Serve requests until ``stopping``, then stop every stream (``stopped``)."""
        try:
            while not stopping.is_set():
                try:
                    claimed = await self.claim()
                except (ApplianceError, sqlite3.Error) as exc:
                    logger.error("camera streams: %s", exc)
                    claimed = None
                if claimed is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stopping.wait(), self._poll_s)
        finally:
            tasks = list(self._streams.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def claim(self) -> CameraStream | None:
        """Claim the oldest pending request, if any, and start serving it."""
        open_rows = await self._store.query(
            "SELECT 1 FROM camera_streams WHERE state = 'pending' LIMIT 1"
        )
        if not open_rows:
            return None
        stream = await self._store.transact(
            lambda conn: claim_next(conn, self._name, self._clock())
        )
        if stream is not None:
            task = asyncio.create_task(self._serve(stream), name=f"camera stream {stream.id}")
            self._streams[stream.id] = task
            task.add_done_callback(functools.partial(self._ended, stream.id))
        return stream

    def _ended(self, stream_id: int, _task: asyncio.Task[None]) -> None:
        self._streams.pop(stream_id, None)

    async def _serve(self, stream: CameraStream) -> None:
        config = self._cameras.get(stream.camera)
        try:
            if config is None:
                raise CameraError(f"no camera named {stream.camera!r} in the site config")
            async with self._hub.use(config) as camera:
                track = CappedTrack(camera.track())
                pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
                try:
                    pc.addTransceiver(track, direction="sendonly")
                    await pc.setLocalDescription(await pc.createOffer())
                    if await self._offer(stream.id, pc.localDescription.sdp):
                        self.started += 1
                        await self._publish(stream.id, pc)
                finally:
                    await pc.close()
                    track.stop()
        except CameraError as error:
            # The device's path and libav's words: no patient data.
            logger.warning("camera stream %d failed: %s", stream.id, error)
            await self._fail(stream.id, str(error))
        except asyncio.CancelledError:
            with contextlib.suppress(ApplianceError, sqlite3.Error):
                await asyncio.shield(self._fail(stream.id, DEVICES_GONE))
            raise
        except Exception as error:  # one camera's failure must not stop the worker
            logger.error("camera stream %d: unexpected %s", stream.id, type(error).__name__)
            await self._fail(stream.id, f"unexpected {type(error).__name__} in the devices service")
        if self._on_status is not None:
            self._on_status(streams_started=self.started, streams_failed=self.failed)

    async def _offer(self, stream_id: int, sdp: str) -> bool:
        def update(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE camera_streams SET state = 'offered', offer = ? "
                "WHERE id = ? AND state = 'claimed'",
                (sdp, stream_id),
            )
            return cursor.rowcount == 1

        offered = await self._store.transact(update)
        if not offered:
            logger.info("camera stream %d ended before its offer", stream_id)
        return offered

    async def _publish(self, stream_id: int, pc: RTCPeerConnection) -> None:
        """Apply the answer, stamp the row while live, and return once the stream is over."""
        loop = asyncio.get_running_loop()
        stamped = float("-inf")
        answered = False
        while True:
            if loop.time() - stamped >= ALIVE_EVERY_S:
                stamped = loop.time()
                now = _stamp(self._clock())

                def alive(conn: sqlite3.Connection, now: str = now) -> list[tuple[str, str]]:
                    return conn.execute(
                        "UPDATE camera_streams SET alive_at = ? WHERE id = ? "
                        "AND state = 'live' RETURNING state, answer",
                        (now, stream_id),
                    ).fetchall()

                rows = list(await self._store.transact(alive))
                if not rows:
                    rows = await self._store.query(
                        "SELECT state, answer FROM camera_streams WHERE id = ?", (stream_id,)
                    )
            else:
                rows = await self._store.query(
                    "SELECT state, answer FROM camera_streams WHERE id = ?", (stream_id,)
                )
            state = StreamState(str(rows[0][0])) if rows else StreamState.STOPPED
            if state is StreamState.LIVE and not answered:
                answer = RTCSessionDescription(sdp=str(rows[0][1]), type="answer")
                await pc.setRemoteDescription(answer)
                answered = True
                stamped = float("-inf")  # stamp at once: the web side counts from its answer
            if state not in (StreamState.OFFERED, StreamState.LIVE):
                break
            if pc.connectionState in ("failed", "closed"):
                # The box closes its side when the nurse stops the camera: that is a stop,
                # told by the row an instant later, not a failure.
                await asyncio.sleep(self._poll_s)
                after = await self._store.query(
                    "SELECT state FROM camera_streams WHERE id = ?", (stream_id,)
                )
                if after and StreamState(str(after[0][0])) in (
                    StreamState.OFFERED,
                    StreamState.LIVE,
                ):
                    logger.warning(
                        "camera stream %d: %s (ICE %s, %s)",
                        stream_id,
                        CONNECTION_FAILED,
                        pc.iceConnectionState,
                        "answered" if answered else "before the answer",
                    )
                    await self._fail(stream_id, CONNECTION_FAILED)
                    return
                state = StreamState(str(after[0][0])) if after else StreamState.STOPPED
                break
            await asyncio.sleep(self._poll_s)
        await _finish(self._store, stream_id, StreamState.STOPPED, self._clock())
        logger.info("camera stream %d stopped (%s)", stream_id, state)

    async def _fail(self, stream_id: int, error: str) -> None:
        self.failed += 1
        await _finish(self._store, stream_id, StreamState.FAILED, self._clock(), error)
