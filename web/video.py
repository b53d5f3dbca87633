"""The video visit's signalling over WebSockets (issue 7): authenticate, then the video service.

One route per audience, because each audience's credential is a cookie scoped to its own
path (the visit link's to ``/visit``, the kiosk's to ``/kiosk``):

* ``/video/ws``: a nurse's (or admin's) staff session; joins as ``nurse`` one of today's
  arrivals. The ``join`` token is the session's CSRF token (only a page of this box has it).
* ``/visit/<token>/video``: the remote provider's visit link, bound to this browser (its
  ``/visit`` cookie); joins as ``provider`` that link's visit. The ``join`` token is the
  link's own. Unknown tokens count against the provider pages' guess throttle.
* ``/kiosk/video``: a paired kiosk or exam-room station; joins as ``patient`` the visit of
  the patient checked in at its station. The ``join`` token is the kiosk flow's CSRF token.

A visit's room is named by its arrival Encounter's id. The handshake must come from this
box's own origin (a cross-site page cannot ride the cookies). Then every frame passes
``Inbound`` (rate limit, 64 KiB cap, schema); rejected frames are answered ``error`` (once
per flood) and a flooding connection, or one that does not read what it is sent, is closed
with 1008. An HTTP GET on these addresses passes the same guard and answers 426. Joining is
audited (``read`` of the Encounter, success or denied) under the caller's actor.

Exam cameras (a still into the record, a camera shown live in the visit) are asked by the
nurse (``/video/nurse/still``, ``/video/nurse/camera``: the visit named in the form, the
patient access rule) or by the remote provider (``/visit/<token>/video/still``,
``/visit/<token>/video/camera``: the link bound to this browser as for signalling, its own
visit only, its form token ``visit_csrf``, and, to take a still or show a camera, the link's
seat in the call admitted by the nurse: 409 from the waiting room or outside the call,
audited denied); both then run the same code under their actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, time
from typing import Any
from urllib.parse import urlsplit

from quart import Blueprint, Response, abort, current_app, has_websocket_context, request, websocket
from quart.typing import ResponseReturnValue
from quart.wrappers.base import BaseRequestWebsocket
from werkzeug.datastructures import MultiDict

from appliance import db, users, visit_links
from appliance.audit import AuditAction, AuditEvent, Outcome
from appliance.device_registry import DeviceRegistry
from appliance.users import Role as StaffRole
from appliance.visit_links import LinkState, VisitLink
from services import visits
from services.video import camera_streams, still_requests
from services.video.rooms import Role, RoomErrorCode
from services.video.service import CameraRefused, Session
from services.video.signalling import Inbound, Join, Resume, SignallingError, encode_error
from web.access import decide, require_access
from web.app import AppState, app_state

# The cookie names and the session gate belong to the guards that own them.
from web.auth import cookie_name as staff_cookie_name
from web.auth import current_session, login_required, session_gate
from web.kiosk import cookie_name as kiosk_cookie_name
from web.provider import LINK_CHECK_S, Guesses, check_form_token
from web.provider import cookie_name as visit_cookie_name
from web.templating import render_template
from web.video_messages import video_messages

logger = logging.getLogger(__name__)

bp = Blueprint("video", __name__)

OUTGOING_QUEUE = 256  # server messages a client may leave unread before it is dropped
POLICY_VIOLATION = 1008  # WebSocket close code (RFC 6455 §7.4.1)
FLUSH_S = 1.0  # how long a flooding client's queued replies may take before it is dropped
CREDENTIAL_CHECK_S = LINK_CHECK_S  # how often an open connection's visit link is re-checked
_CLINIC = (StaffRole.NURSE, StaffRole.ADMIN)
# Told (through exam_camera.js, after "No still: " or "Not shown: ") to a remote provider
# whose seat in the call is not admitted.
NOT_ADMITTED = "you can use the exam cameras once the nurse has admitted you to the call"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is on the connection, as its credential says, and which visits it may join."""

    role: Role
    actor: str
    token: str  # what ``join.token`` must be
    patient_of: Callable[[str], Awaitable[str | None]]  # the visit's patient, if allowed
    # Asked every ``CREDENTIAL_CHECK_S`` while connected (a visit link revoked, completed or
    # expired meanwhile): False takes the caller out of the visit and closes the connection.
    still_valid: Callable[[], Awaitable[bool]] | None = None


def _connection() -> BaseRequestWebsocket:
    return websocket if has_websocket_context() else request


def _local_midnight(state: AppState) -> datetime:
    today = state.clock().astimezone(state.zone).date()
    return datetime.combine(today, time()).replace(tzinfo=state.zone)


async def _todays_arrival(state: AppState, actor: str, visit: str) -> str | None:
    found = await visits.arrivals(state.store, actor, _local_midnight(state))
    return next((a.patient_id for a in found if a.encounter_id == visit), None)


# -- who is asking ---------------------------------------------------------------------------


async def _nurse() -> Caller:
    state, conn = app_state(), _connection()
    token = conn.cookies.get(staff_cookie_name(state, "session"))
    session = None
    if token:
        session = await db.run_sync(
            state.store.connection,
            users.load_session,
            token,
            now=state.clock(),
            idle_timeout_s=state.config.web.session_idle_timeout_s,
        )
    if session is None:
        abort(401)
    if session_gate(session) is not None or session.user.role not in _CLINIC:
        abort(403)
    actor, user_id = session.user.actor, session.user.id

    async def patient_of(visit: str) -> str | None:
        # As every patient page: normal access (checked in today, enrolled) or break-glass.
        patient = await _todays_arrival(state, actor, visit)
        if patient is None:
            return None
        allowed = await db.run_sync(
            state.store.connection, decide, user_id, patient, now=state.clock(), zone=state.zone
        )
        return patient if allowed is not None else None

    return Caller(Role.NURSE, actor, session.csrf, patient_of)


async def _provider_link(token: str) -> VisitLink:
    """The active visit link of ``token``, bound to this browser (else 429, 404 or 403)."""
    state, conn = app_state(), _connection()
    guesses: Guesses = current_app.extensions["provider"]
    address, now = f"ip:{conn.remote_addr}", state.clock()
    if guesses.exceeded(address, now):
        abort(429)
    link = None
    if 20 <= len(token) <= 100:
        link = await db.run_sync(state.store.connection, visit_links.by_token, token)
    if link is None:
        guesses.failed(address, now)
        logger.info("unknown visit link token refused (video)")
        abort(404)
    patient_key = state.store.patient_key(f"Patient/{link.patient_id}")
    browser = conn.cookies.get(visit_cookie_name(state), "")
    refusal = None
    if link.state(now) is not LinkState.ACTIVE:
        refusal = f"video: visit link {link.state(now).value}"
    elif (
        link.browser_hash is None
        or not browser
        or not hmac.compare_digest(visit_links.token_hash(browser), link.browser_hash)
    ):
        refusal = "video: another browser refused"
    if refusal is not None:
        await _audit(state, link.actor, patient_key, link.encounter_id, Outcome.DENIED, refusal)
        abort(403)
    return link


async def _provider(token: str) -> Caller:
    state = app_state()
    link = await _provider_link(token)
    link_id = link.id

    async def active() -> VisitLink | None:
        """The link as it stands now, if it still works."""
        current = await db.run_sync(state.store.connection, visit_links.by_id, link_id)
        if current is None or current.state(state.clock()) is not LinkState.ACTIVE:
            return None
        return current

    async def patient_of(visit: str) -> str | None:
        current = await active()
        return current.patient_id if current and current.encounter_id == visit else None

    async def still_valid() -> bool:
        return await active() is not None

    return Caller(Role.PROVIDER, link.actor, token, patient_of, still_valid)


async def _kiosk() -> Caller:
    state, conn = app_state(), _connection()
    token = conn.cookies.get(kiosk_cookie_name(state))
    rows = []
    if token:
        rows = await state.store.query(
            "SELECT id, station_id FROM kiosks WHERE token_hash = ? AND revoked_at IS NULL",
            (hashlib.sha256(token.encode()).digest(),),
        )
    if not rows:
        abort(403)
    kiosk_id, station_id = int(rows[0][0]), str(rows[0][1])
    actor = f"kiosk:{station_id}"
    flow = current_app.extensions["kiosk"].flows.get(kiosk_id)
    flow_token = flow.csrf if flow is not None else ""

    async def patient_of(visit: str) -> str | None:
        open_checkins = [
            c
            for c in await DeviceRegistry(state.store).checkins(station_id)
            if not c.checked_out_at
        ]
        patient = await _todays_arrival(state, actor, visit)
        if patient is None or not any(c.patient_id == patient for c in open_checkins):
            return None
        return patient

    return Caller(Role.PATIENT, actor, flow_token, patient_of)


# -- the routes ------------------------------------------------------------------------------


@bp.get("/video/ws")
@bp.websocket("/video/ws")
async def nurse_ws() -> ResponseReturnValue:
    """A nurse's signalling connection."""
    return await _serve(await _nurse())


@bp.get("/visit/<token>/video")
@bp.websocket("/visit/<token>/video")
async def provider_ws(token: str) -> ResponseReturnValue:
    """The remote provider's signalling connection (the bound visit link)."""
    return await _serve(await _provider(token))


@bp.get("/kiosk/video")
@bp.websocket("/kiosk/video")
async def kiosk_ws() -> ResponseReturnValue:
    """The patient station's signalling connection (a paired kiosk)."""
    return await _serve(await _kiosk())


async def _nurse_arrival(visit: str) -> tuple[str, visits.Arrival]:
    """The nurse's actor and today's arrival ``visit``, which the nurse may see (else 404/403)."""
    state = app_state()
    session = await current_session()
    assert session is not None  # login_required
    actor = session.user.actor
    found = await visits.arrivals(state.store, actor, _local_midnight(state))
    arrival = next((a for a in found if a.encounter_id == visit), None)
    if arrival is None:
        abort(404)
    await require_access(arrival.patient_id)  # AccessDenied: the 403 page offering break-glass
    return actor, arrival


@bp.get("/video/nurse")
@login_required(role=_CLINIC)
async def nurse_visit() -> ResponseReturnValue:
    """The nurse's video page for one of today's arrivals (``?visit=<Encounter id>``)."""
    state = app_state()
    visit = request.args.get("visit", "")
    actor, arrival = await _nurse_arrival(visit)
    patient = await state.store.read("Patient", arrival.patient_id, actor)
    arrived = datetime.fromisoformat(arrival.arrived.replace("Z", "+00:00"))
    return await render_template(
        "video_nurse.html",
        visit=visit,
        patient_name=visits.display_name(patient),
        arrived=arrived.astimezone(state.zone).strftime("%H:%M"),
        cameras=[camera.name for camera in state.config.exam_cameras],
        showing=await camera_streams.showing(state.store, visit),
        video_messages=video_messages(),
    )


@bp.post("/video/nurse/still")
@login_required(role=_CLINIC)
async def take_exam_still() -> ResponseReturnValue:
    """A still from an exam camera into the visit's patient's record; JSON, the call goes on.

    The nurse names the visit (``visit``, one of today's arrivals the nurse may see) and the
    camera; see :func:`_exam_still`.
    """
    form = await request.form
    visit = form.get("visit", "")
    actor, arrival = await _nurse_arrival(visit)
    return await _exam_still(form.get("camera", ""), arrival.patient_id, visit, actor)


@bp.post("/video/nurse/camera")
@login_required(role=_CLINIC)
async def show_exam_camera() -> ResponseReturnValue:
    """Show an exam camera live in the visit (``action=start``) or stop showing it (``stop``).

    The nurse names the visit (``visit``, as for a still); see :func:`_exam_camera`.
    """
    form = await request.form
    visit = form.get("visit", "")
    actor, _arrival = await _nurse_arrival(visit)
    return await _exam_camera(form.get("camera", ""), form.get("action", ""), visit, actor)


async def _provider_form(token: str) -> tuple[VisitLink, MultiDict[str, str]]:
    """The link of a provider's camera POST and its form: the link bound to this browser as
    for signalling (429, 404 counted as a guess, 403), then the link's own form token
    (``visit_csrf``, 403), as every form of the provider's pages."""
    link = await _provider_link(token)
    form = await request.form
    check_form_token(app_state(), link, form.get("visit_csrf", ""))
    return link, form


async def _not_in_the_call(link: VisitLink, asked: str) -> ResponseReturnValue | None:
    """409 unless the link's provider has a seat admitted in the link's visit (the video
    service's room, not the page): the waiting room is the nurse's say over when the provider
    is with the patient, and a still or a camera shows the exam room. The refusal is audited
    ``denied`` under the link's actor, as the link's other refusals are. None when admitted."""
    state = app_state()
    if state.video.is_admitted(link.encounter_id, link.actor):
        return None
    key = state.store.patient_key(f"Patient/{link.patient_id}")
    detail = f"video: exam {asked} refused, not admitted to the call"
    await _audit(state, link.actor, key, link.encounter_id, Outcome.DENIED, detail)
    return {"error": NOT_ADMITTED}, 409


@bp.post("/visit/<token>/video/still")
async def provider_exam_still(token: str) -> ResponseReturnValue:
    """The remote provider's still: the link's own visit and patient (a ``visit`` in the form
    is ignored), stored under the link's actor, once the nurse has admitted the provider to
    the call (else 409); otherwise as the nurse's."""
    link, form = await _provider_form(token)
    if (refused := await _not_in_the_call(link, "still")) is not None:
        return refused
    return await _exam_still(form.get("camera", ""), link.patient_id, link.encounter_id, link.actor)


@bp.post("/visit/<token>/video/camera")
async def provider_exam_camera(token: str) -> ResponseReturnValue:
    """The remote provider shows an exam camera in the link's own visit, once the nurse has
    admitted the provider to the call (else 409), or stops it (at any time: stopping only
    takes the exam room's picture away)."""
    link, form = await _provider_form(token)
    camera, action = form.get("camera", ""), form.get("action", "")
    if action != "stop" and (refused := await _not_in_the_call(link, "camera")) is not None:
        return refused
    return await _exam_camera(camera, action, link.encounter_id, link.actor)


async def _exam_still(name: str, patient_id: str, visit: str, actor: str) -> ResponseReturnValue:
    """A still from camera ``name`` for ``visit``, asked as ``actor`` (who may: the caller
    checked); an undeclared camera 404; 409 while the camera is shown live in another visit
    (the still would be of that visit's patient).

    This process may not open cameras (its unit has ``PrivateDevices=yes``): it asks the
    devices process through the store and waits for the outcome, one still at a time per
    camera (services/video/still_requests.py). The devices process opens the camera for the
    still and closes it after, and stores the Media encrypted, audited under ``actor`` and
    queued for the EHR. 200 ``{"media", "camera"}``; 503: the camera failed (the device's
    words); 504: the devices service did not answer in time (the request is expired, never
    taken later) or is still taking the still (it will be stored with the visit).
    """
    state = app_state()
    if state.config.exam_camera(name) is None:
        abort(404)
    locks: dict[str, asyncio.Lock] = current_app.extensions.setdefault("exam_cameras", {})
    async with locks.setdefault(name, asyncio.Lock()):
        try:
            request_id = await still_requests.submit(
                state.store, name, patient_id, visit, actor, state.clock()
            )
        except camera_streams.CameraBusy as busy:  # live in another visit: another patient
            return {"error": str(busy)}, 409
        outcome = await still_requests.wait(
            state.store, request_id, timeout_s=state.still_wait_s, clock=state.clock
        )
    waited = f"{state.still_wait_s:g} s"
    match outcome.state:
        case still_requests.RequestState.DONE:
            return {"media": outcome.media_id, "camera": name}
        case still_requests.RequestState.FAILED:
            # The device's path and libav's words: no patient data.
            logger.warning("exam camera still %d failed: %s", request_id, outcome.error)
            return {"error": outcome.error}, 503
        case still_requests.RequestState.CLAIMED:
            message = (
                f"the devices service did not finish the still within {waited}; "
                "it will be stored with the visit if the camera gives a frame"
            )
            return {"error": message}, 504
        case _:
            message = (
                f"the devices service did not answer within {waited}; no still was taken "
                "(is appliance-devices running?)"
            )
            return {"error": message}, 504


async def _exam_camera(name: str, action: str, visit: str, actor: str) -> ResponseReturnValue:
    """Camera ``name`` shown live in ``visit`` (``action`` ``start``) or no longer (``stop``),
    asked as ``actor`` (who may: the caller checked); an undeclared camera or action 404.

    The devices process owns the camera and publishes it as a participant of its own (video
    only, on loopback); its offer and the video service's answer cross the store
    (services/video/camera_streams.py). 200 ``{"participant"}`` once the camera is in the
    room; 409 when it is already in a visit or the visit cannot take it; 503 with the
    device's words; 504 when the devices service did not answer in time. Stopping stops the
    camera only if it is in ``visit``.
    """
    state = app_state()
    if state.config.exam_camera(name) is None or action not in ("start", "stop"):
        abort(404)
    if action == "stop":
        stopped = await camera_streams.stop(state.store, state.video, name, visit)
        return {"stopped": stopped, "camera": name}
    try:
        stream_id = await camera_streams.submit(state.store, name, visit, actor, state.clock())
    except camera_streams.CameraBusy as busy:
        return {"error": str(busy)}, 409
    stream = await camera_streams.wait_offer(
        state.store, stream_id, timeout_s=state.still_wait_s, clock=state.clock
    )
    match stream.state:
        case camera_streams.StreamState.OFFERED:
            try:
                participant = await camera_streams.start(
                    state.store, state.video, stream, state.clock()
                )
            except CameraRefused as refused:
                return {"error": f"not shown: {refused}"}, 409
            return {"participant": participant, "camera": name}
        case camera_streams.StreamState.FAILED:
            # The device's path and libav's words: no patient data.
            logger.warning("exam camera stream %d failed: %s", stream_id, stream.error)
            return {"error": stream.error}, 503
        case _:
            waited = f"{state.still_wait_s:g} s"
            message = (
                f"the devices service did not answer within {waited}; the camera is not "
                "shown (is appliance-devices running?)"
            )
            return {"error": message}, 504


def _same_origin(conn: BaseRequestWebsocket) -> bool:
    origin = urlsplit(conn.headers.get("Origin", ""))
    scheme = "https" if conn.scheme in ("wss", "https") else "http"
    return origin.scheme == scheme and origin.netloc == conn.host


async def _serve(caller: Caller) -> ResponseReturnValue:
    if not has_websocket_context():
        return Response(
            "This address takes a WebSocket (video visit signalling).\n",
            status=426,
            headers={"Upgrade": "websocket"},
            mimetype="text/plain",
        )
    if not _same_origin(websocket):
        logger.info("video signalling refused: cross-origin handshake")
        abort(403)
    state = app_state()
    outgoing: asyncio.Queue[bytes] = asyncio.Queue(OUTGOING_QUEUE)
    overflowed = asyncio.Event()

    def send(data: bytes) -> None:
        try:
            outgoing.put_nowait(data)
        except asyncio.QueueFull:
            overflowed.set()

    session = state.video.session(send, caller.actor)
    await websocket.accept()
    reader = asyncio.create_task(_read(state, caller, session, send))
    tasks = [reader, asyncio.create_task(_write(outgoing)), asyncio.create_task(overflowed.wait())]
    watcher = None
    if caller.still_valid is not None:
        watcher = asyncio.create_task(_until_invalid(caller.still_valid))
        tasks.append(watcher)
    flooded = revoked = False
    try:
        done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        flooded = _returned(reader, done)
        revoked = watcher is not None and _returned(watcher, done)
    finally:
        for task in tasks:
            task.cancel()
        # A flooding connection, or one whose link stopped working, leaves the visit. Any
        # other end (the client went, the network dropped, a send stalled until the queue
        # filled) keeps the seat for a ``resume`` on a new connection (docs/video.md).
        leaves = flooded or revoked
        closing = session.async_close() if leaves else session.async_disconnected()
        await asyncio.shield(closing)
    if revoked:
        logger.info("video signalling: %s no longer valid, taken out of the visit", caller.role)
        send(encode_error(RoomErrorCode.NOT_ALLOWED, "this visit link no longer works"))
    for task in done:
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("video signalling failed (%s)", type(error).__name__)
    if not overflowed.is_set():  # a flood: the replies already queued still go out
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_flush(outgoing), FLUSH_S)
    # The reader stopped (a flood) or the client does not read what it is sent: drop it.
    await websocket.close(POLICY_VIOLATION)
    return ""  # ignored once accepted


def _returned(task: asyncio.Task[Any], done: set[asyncio.Task[Any]]) -> bool:
    """``task`` ended by returning (not cancelled, no exception)."""
    return task in done and not task.cancelled() and task.exception() is None


async def _until_invalid(still_valid: Callable[[], Awaitable[bool]]) -> None:
    """Returns once ``still_valid()`` says no (asked every ``CREDENTIAL_CHECK_S``)."""
    while True:
        await asyncio.sleep(CREDENTIAL_CHECK_S)
        if not await still_valid():
            return


async def _flush(outgoing: asyncio.Queue[bytes]) -> None:
    while not outgoing.empty():
        await websocket.send(outgoing.get_nowait().decode())


async def _write(outgoing: asyncio.Queue[bytes]) -> None:
    while True:
        data = await outgoing.get()
        await websocket.send(data.decode())


async def _read(
    state: AppState, caller: Caller, session: Session, send: Callable[[bytes], None]
) -> None:
    inbound = Inbound()
    loop = asyncio.get_running_loop()
    while True:
        raw = await websocket.receive()
        try:
            message = inbound.receive(raw, loop.time())
        except SignallingError as error:
            if error.reply:
                send(encode_error(error.code, error.detail))
            if inbound.closing:
                logger.info("video signalling: flooding connection dropped")
                return
            continue
        if isinstance(message, Join) and not session.joined:
            patient = await _may_join(caller, message)
            detail = f"video visit joined as {caller.role}"
            await _take_seat(state, caller, session, send, message, patient, detail)
        elif isinstance(message, Resume) and not session.joined:
            # The same checks as a join's, but the seat's token stands for the page's: the
            # service holds it to the credential (the actor) that joined.
            patient = await caller.patient_of(message.visit)
            detail = f"video visit resumed as {caller.role}"
            await _take_seat(state, caller, session, send, message, patient, detail)
        else:
            await session.handle(message)


async def _take_seat(
    state: AppState,
    caller: Caller,
    session: Session,
    send: Callable[[bytes], None],
    message: Join | Resume,
    patient: str | None,
    detail: str,
) -> None:
    """A ``join`` or ``resume``: refused ``not_allowed`` when ``patient`` is None (the caller
    may not take a seat in that visit), else handed to the service; a seat taken is audited
    as a ``read`` of the Encounter with ``detail``."""
    if patient is None:
        # Refusals are audited too (who tried which visit), as the pages' are; the patient
        # stays unresolved: the caller may not know whose visit it is.
        verb = "resume" if isinstance(message, Resume) else "join"
        refused = f"video visit {verb} as {caller.role} refused"
        await _audit(state, caller.actor, None, message.visit, Outcome.DENIED, refused)
        send(encode_error(RoomErrorCode.NOT_ALLOWED, "this link or login cannot join that"))
        return
    await session.handle(message)
    if session.joined:
        key = state.store.patient_key(f"Patient/{patient}")
        await _audit(state, caller.actor, key, message.visit, Outcome.SUCCESS, detail)


async def _may_join(caller: Caller, message: Join) -> str | None:
    """The visit's patient if ``caller`` may join it in that role with that token, else None."""
    if message.role is not caller.role or not caller.token:
        return None
    if not hmac.compare_digest(message.token.encode(), caller.token.encode()):
        return None
    return await caller.patient_of(message.visit)


async def _audit(
    state: AppState,
    actor: str,
    patient_key: bytes | None,
    visit: str,
    outcome: Outcome,
    detail: str,
) -> None:
    event = AuditEvent(
        actor,
        AuditAction.READ,
        outcome=outcome,
        patient_key=patient_key,
        entity=f"Encounter/{visit}",
        detail=detail,
    )
    await state.store.transact(lambda _conn: None, [event])
