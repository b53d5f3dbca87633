"""Exam-camera stills across processes: the web process asks, the devices process takes them.

The web process faces the network and may not open video devices (its unit has
``PrivateDevices=yes``); the devices process owns the box's hardware. They meet in the store,
the bus between processes (DESIGN.md, "Processes"), in ``camera_requests`` (migration 0013):

* the web process :func:`submit`\\ s a request (``pending``) and :func:`wait`\\ s for its
  outcome, reading the row every ``poll_s``. At its deadline (:data:`STILL_WAIT_S`) it
  expires the request if nobody has claimed it, in one conditional ``UPDATE``: from then on
  no worker can take it, so a still nobody waits for is never taken later. A request
  already *claimed* at the deadline is left to finish (the camera's own frame timeout bounds
  it): the still the nurse asked for is stored with the visit, and the nurse is told so;
* :class:`StillWorker`, in the devices process, looks for open requests every ``poll_s``,
  claims the oldest pending one inside ``BEGIN IMMEDIATE`` (so two workers, in one process
  or two, never take the same request), opens the camera, takes the still, closes the camera
  (a V4L2 device held open keeps its light on), and stores the Media (encrypted, audited
  under the nurse who asked, queued for the EHR) in the same transaction that marks the
  request ``done``. A camera that is not there ends it ``failed`` with the device's words;
* requests left pending longer than :data:`REQUEST_TTL_S` (the web process stopped waiting
  without saying so) are expired rather than taken, and requests claimed longer than
  :data:`CLAIM_TTL_S` (a devices process stopped mid-still) are failed.

Both sides poll the row instead of ``PRAGMA data_version``: either costs one trip to the
connection's thread, and ``data_version`` does not move for a commit made on the same
connection (a process, or a test, running both sides). Finished rows are kept
:data:`KEEP_FINISHED` for troubleshooting, then deleted. No column is PHI (local ids, the
configured camera name, staff actors, times, the device's error text).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from appliance.config import ExamCameraConfig
from appliance.errors import ApplianceError
from appliance.store import Store
from services.video import camera_streams
from services.video.exam_camera import CameraError, CameraHub, take_still

logger = logging.getLogger(__name__)

# How long the web process waits for the devices process: opening a USB camera takes up to a
# second or two, its first frame up to exam_camera.STILL_TIMEOUT_S (5 s), the JPEG ~50 ms.
STILL_WAIT_S = 15.0
WAIT_POLL_S = 0.1  # the web side's read of the row: a still is ~0.3-2 s, so ≤ 0.1 s is added
CLAIM_POLL_S = 0.25  # the devices side's look for work (an indexed read of open rows)
REQUEST_TTL_S = STILL_WAIT_S  # older than the web's wait: nobody is waiting for it any more
CLAIM_TTL_S = 60.0  # far above open + STILL_TIMEOUT_S + encode: the worker is gone
KEEP_FINISHED = timedelta(days=7)
DEVICES_GONE = "the devices service stopped while taking it"

Clock = Callable[[], datetime]


class RequestState(StrEnum):
    """Where a request is; persisted in ``camera_requests.state``."""

    PENDING = "pending"
    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"
    EXPIRED = "expired"


FINISHED = frozenset({RequestState.DONE, RequestState.FAILED, RequestState.EXPIRED})


@dataclass(frozen=True, slots=True)
class StillRequest:
    """One row of ``camera_requests``."""

    id: int
    camera: str
    patient_id: str
    encounter_id: str
    requested_by: str
    requested_at: datetime
    state: RequestState
    media_id: str | None
    error: str | None


# The columns :func:`_request` reads, in its order (spelt out in each query: no SQL is built).


def _request(row: Sequence[object]) -> StillRequest:
    return StillRequest(
        id=int(str(row[0])),
        camera=str(row[1]),
        patient_id=str(row[2]),
        encounter_id=str(row[3]),
        requested_by=str(row[4]),
        requested_at=datetime.fromisoformat(str(row[5])),
        state=RequestState(str(row[6])),
        media_id=None if row[7] is None else str(row[7]),
        error=None if row[8] is None else str(row[8]),
    )


def _stamp(when: datetime) -> str:
    """A UTC time as fixed-width ISO text, so the stored times compare as strings."""
    return when.astimezone(UTC).isoformat(timespec="microseconds")


def _utcnow() -> datetime:
    return datetime.now(UTC)


# -- the web side ----------------------------------------------------------------------------


async def submit(
    store: Store,
    camera: str,
    patient_id: str,
    encounter_id: str,
    requested_by: str,
    now: datetime,
) -> int:
    """Ask the devices process for a still; returns the request's id once it is committed.

    ``CameraBusy`` while the camera is shown live in another visit: the still would be of
    that visit's patient, filed under this one's (and synced to the EHR as such).
    """

    def insert(conn: sqlite3.Connection) -> int:
        camera_streams.end_stale(conn, now)
        shown = camera_streams.shown_in(conn, camera)
        if shown is not None and shown != encounter_id:
            raise camera_streams.CameraBusy(
                f"the {camera} is live in another visit; stop it there first"
            )
        cursor = conn.execute(
            "INSERT INTO camera_requests "
            "(camera, patient_id, encounter_id, requested_by, requested_at) VALUES (?,?,?,?,?)",
            (camera, patient_id, encounter_id, requested_by, _stamp(now)),
        )
        return int(cursor.lastrowid or 0)

    return await store.transact(insert)


async def load(store: Store, request_id: int) -> StillRequest | None:
    """The request as it stands."""
    rows = await store.query(
        "SELECT id, camera, patient_id, encounter_id, requested_by, requested_at, state, "
        "media_id, error FROM camera_requests WHERE id = ?",
        (request_id,),
    )
    return _request(rows[0]) if rows else None


async def expire(store: Store, request_id: int, now: datetime) -> bool:
    """Expire the request if nobody has claimed it; whether it was expired."""

    def update(conn: sqlite3.Connection) -> bool:
        cursor = conn.execute(
            "UPDATE camera_requests SET state = ?, finished_at = ? WHERE id = ? AND state = ?",
            (RequestState.EXPIRED, _stamp(now), request_id, RequestState.PENDING),
        )
        return cursor.rowcount == 1

    return await store.transact(update)


async def wait(
    store: Store,
    request_id: int,
    *,
    timeout_s: float = STILL_WAIT_S,
    poll_s: float = WAIT_POLL_S,
    clock: Clock = _utcnow,
) -> StillRequest:
    """The request once finished, or at the deadline: expired if still pending, else as it is
    (``claimed``: the devices process is taking it and will store it).

    Cancelled (the client went away), the request is expired too if nobody has claimed it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while True:
            found = await load(store, request_id)
            if found is None:
                raise LookupError(f"camera request {request_id} is gone")
            left = deadline - loop.time()
            if found.state in FINISHED or left <= 0:
                break
            await asyncio.sleep(min(poll_s, left))
    except asyncio.CancelledError:
        with contextlib.suppress(ApplianceError, sqlite3.Error):
            await asyncio.shield(expire(store, request_id, clock()))
        raise
    if found.state is RequestState.PENDING and await expire(store, request_id, clock()):
        logger.warning("camera request %d expired: the devices service did not answer", found.id)
    final = await load(store, request_id)
    assert final is not None  # finished rows are kept for days
    return final


# -- the devices side ------------------------------------------------------------------------


def claim_next(conn: sqlite3.Connection, worker: str, now: datetime) -> StillRequest | None:
    """Claim the oldest pending request for ``worker``; call inside ``BEGIN IMMEDIATE``.

    Stale requests are ended first: pending past :data:`REQUEST_TTL_S` expired, claimed past
    :data:`CLAIM_TTL_S` failed. The write lock held by the caller's transaction makes the
    claim atomic: another worker's claim waits for it and then finds the row taken.
    """
    stamp = _stamp(now)
    expired = conn.execute(
        "UPDATE camera_requests SET state = ?, finished_at = ? "
        "WHERE state = ? AND requested_at < ?",
        (
            RequestState.EXPIRED,
            stamp,
            RequestState.PENDING,
            _stamp(now - timedelta(seconds=REQUEST_TTL_S)),
        ),
    ).rowcount
    abandoned = conn.execute(
        "UPDATE camera_requests SET state = ?, finished_at = ?, error = ? "
        "WHERE state = ? AND claimed_at < ?",
        (
            RequestState.FAILED,
            stamp,
            DEVICES_GONE,
            RequestState.CLAIMED,
            _stamp(now - timedelta(seconds=CLAIM_TTL_S)),
        ),
    ).rowcount
    if expired or abandoned:
        logger.warning(
            "camera requests: %d expired unclaimed, %d abandoned mid-still", expired, abandoned
        )
    row = conn.execute(
        "UPDATE camera_requests SET state = ?, claimed_by = ?, claimed_at = ? "
        "WHERE id = (SELECT id FROM camera_requests WHERE state = ? ORDER BY id LIMIT 1) "
        "RETURNING id, camera, patient_id, encounter_id, requested_by, requested_at, state, "
        "media_id, error",
        (RequestState.CLAIMED, worker, stamp, RequestState.PENDING),
    ).fetchone()
    return None if row is None else _request(row)


def finish(
    conn: sqlite3.Connection,
    request_id: int,
    state: RequestState,
    now: datetime,
    *,
    media_id: str | None = None,
    error: str | None = None,
) -> None:
    """End a claimed request (inside the caller's write transaction); prune old rows.

    A stored still always makes its request ``done``; a failure only ends a request still
    ``claimed`` (a worker stopped after its still was stored must not undo that).
    """
    if state is RequestState.DONE:
        sql = (
            "UPDATE camera_requests SET state = ?, finished_at = ?, media_id = ?, error = ? "
            "WHERE id = ?"
        )
        params: tuple[object, ...] = (state, _stamp(now), media_id, error, request_id)
    else:
        sql = (
            "UPDATE camera_requests SET state = ?, finished_at = ?, media_id = ?, error = ? "
            "WHERE id = ? AND state = ?"
        )
        params = (state, _stamp(now), media_id, error, request_id, RequestState.CLAIMED)
    conn.execute(sql, params)
    conn.execute(
        "DELETE FROM camera_requests WHERE finished_at < ?", (_stamp(now - KEEP_FINISHED),)
    )


class StillWorker:
    """Takes the stills the web process asks for, one at a time (devices process)."""

    def __init__(
        self,
        store: Store,
        cameras: Sequence[ExamCameraConfig],
        *,
        name: str,
        clock: Clock = _utcnow,
        poll_s: float = CLAIM_POLL_S,
        on_status: Callable[..., None] | None = None,
        hub: CameraHub | None = None,
    ) -> None:
        self._store = store
        self._hub = hub or CameraHub()  # shared with the live streams (camera_streams.py)
        self._cameras = {camera.name: camera for camera in cameras}
        self._name = name
        self._clock = clock
        self._poll_s = poll_s
        self._on_status = on_status
        self.taken = 0
        self.failed = 0

    async def run(self, stopping: asyncio.Event) -> None:
        """Serve requests until ``stopping``; a store error is logged and retried."""
        while not stopping.is_set():
            try:
                served = await self.serve_one()
            except (ApplianceError, sqlite3.Error) as exc:
                logger.error("camera requests: %s", exc)
                served = None
            if served is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), self._poll_s)

    async def serve_one(self) -> StillRequest | None:
        """Claim and serve the oldest pending request, if any; returns it as claimed."""
        open_rows = await self._store.query(
            "SELECT 1 FROM camera_requests WHERE state IN (?, ?) LIMIT 1",
            (RequestState.PENDING, RequestState.CLAIMED),
        )
        if not open_rows:
            return None
        request = await self._store.transact(
            lambda conn: claim_next(conn, self._name, self._clock())
        )
        if request is None:
            return None
        try:
            await self._take(request)
        except asyncio.CancelledError:
            with contextlib.suppress(ApplianceError, sqlite3.Error):
                await asyncio.shield(self._fail(request, DEVICES_GONE))
            raise
        if self._on_status is not None:
            self._on_status(stills_taken=self.taken, stills_failed=self.failed)
        return request

    async def _take(self, request: StillRequest) -> None:
        config = self._cameras.get(request.camera)
        if config is None:
            await self._fail(request, f"no camera named {request.camera!r} in the site config")
            return

        def done(conn: sqlite3.Connection, row_ids: list[int]) -> None:
            [(media_id,)] = conn.execute(
                "SELECT logical_id FROM resources WHERE id = ?", (row_ids[0],)
            ).fetchall()
            finish(conn, request.id, RequestState.DONE, self._clock(), media_id=media_id)

        try:
            async with self._hub.use(config) as camera:  # the live capture, if streaming
                await take_still(
                    self._store,
                    camera,
                    f"Patient/{request.patient_id}",
                    request.requested_by,
                    self._clock(),
                    f"Encounter/{request.encounter_id}",
                    also=done,
                )
                # Counted and logged before the camera closes (up to a frame period).
                self.taken += 1
                logger.info("camera request %d done (%s)", request.id, request.camera)
        except CameraError as error:
            # The device's path and libav's words: no patient data.
            logger.warning("camera request %d failed: %s", request.id, error)
            await self._fail(request, str(error))
            return
        except ApplianceError as error:  # the store refused the Media (a full disk, ...)
            logger.error("camera request %d: the still was not stored: %s", request.id, error)
            await self._fail(request, f"the still was not stored: {error}")
            return
        except Exception as error:  # one bad still must not stop the worker
            logger.error(
                "camera request %d failed: unexpected %s", request.id, type(error).__name__
            )
            await self._fail(request, f"unexpected {type(error).__name__} in the devices service")
            return

    async def _fail(self, request: StillRequest, error: str) -> None:
        self.failed += 1
        now = self._clock()
        await self._store.transact(
            lambda conn: finish(conn, request.id, RequestState.FAILED, now, error=error)
        )
