"""The patient kiosk: a shared touch screen at a station where patients check themselves in.

See ``docs/kiosk.md``. In short:

* **Binding.** A kiosk is not a staff session. An admin issues a one-time pairing code for a
  station (``/kiosk/admin``); typed into ``/kiosk/pair`` on the kiosk's browser it becomes a
  random long-lived token in an HttpOnly, SameSite=Strict cookie scoped to ``/kiosk`` (the
  database keeps only its SHA-256; an admin can revoke it). Every kiosk request is audited
  as ``kiosk:<station>``.
* **Flow state is server-side**, one :class:`Flow` per kiosk, in memory: which step, which
  patient (by logical id), the language and this flow's CSRF token. Every step is rendered at
  ``/kiosk/`` and every form posts and redirects back there, so no URL (and no history
  entry) carries PHI or a step another patient could go back to.
* **Idle reset.** ``kiosk.js`` resets after :data:`IDLE_TIMEOUT_S` without a touch; the
  server ends a flow on its own a little later (and a sweeper task does so with nobody
  asking), so a kiosk left mid-flow never shows the previous patient anything. Ending a
  flow checks the patient out of the station, so later readings are held for a nurse
  instead of being filed to someone who walked away.
* **Video visits.** Every kiosk page asks ``/kiosk/video/state`` every few seconds whether a
  nurse has the visit of the patient checked in at this station live; if so ``/kiosk/``
  shows the video panel (``kiosk_video.html``) instead of the step. While the kiosk is in
  the call, that question keeps the flow alive on the server, and ``kiosk.js`` suspends its
  idle reset, so neither ends a call; both resume when it is over.
* **No enumeration.** A look-up needs a birth date with the family name or appointment
  code; "not found" is one fixed answer after a fixed minimum time, whatever failed, and
  failures are limited per kiosk (:data:`IDENTIFY_FAILURES` per :data:`IDENTIFY_WINDOW_S`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gettext
import hashlib
import hmac
import json
import logging
import secrets
import sqlite3
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from enum import StrEnum
from typing import Any

from quart import (
    Blueprint,
    Response,
    abort,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
)
from quart.typing import ResponseReturnValue
from werkzeug.wrappers import Response as WerkzeugResponse

from appliance import audit, db, fhir
from appliance.audit import AuditAction, AuditEvent
from appliance.device_registry import CheckIn, DeviceRegistry, RegistryError, StationKind
from appliance.errors import NotFoundError, TamperedDataError
from appliance.numbers import ROW_ID_DIGITS, small_int
from appliance.store import (
    ChangedSinceReadError,
    ReviewPendingError,
    Store,
    resource_for_upstream,
)
from appliance.users import Role
from services import intake, visits
from services.video.rooms import Presence
from services.video.rooms import Role as VideoRole
from web.app import AppState, app_state
from web.auth import current_session, login_required
from web.kiosk_i18n import LANGUAGES, language_or_default, load_catalogs
from web.video_messages import video_messages

logger = logging.getLogger(__name__)

bp = Blueprint("kiosk", __name__, url_prefix="/kiosk")

IDLE_TIMEOUT_S = 90  # the figure; app.config["KIOSK_IDLE_TIMEOUT_S"] overrides it
SERVER_GRACE_S = 15  # the server ends a flow this long after the browser should have
FLOW_MAX_S = 30 * 60  # nobody takes half an hour at a kiosk: the flow ends regardless
IDENTIFY_FLOOR_S = 0.4  # every look-up answers after at least this long, match or not
IDENTIFY_FAILURES = 5
IDENTIFY_WINDOW_S = 10 * 60
POSTS_PER_MINUTE = 240  # photo chunks included (5 MB is ~90 chunks)
PAIRING_TTL_S = 10 * 60
PAIR_ATTEMPTS = 10  # per client address per PAIRING_TTL_S
PAIRING_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I
PAIRING_CODE_LENGTH = 10  # 50 bits: unguessable in 10 tries
COOKIE_MAX_AGE_S = 400 * 24 * 3600  # Chromium's ceiling for a cookie's lifetime
PHOTO_CHUNK_MAX = 60 * 1024  # under the app-wide 64 KiB request cap (see docs/kiosk.md)
SWEEP_EVERY_S = 5.0
# kiosk.js asks /kiosk/video/state every 3 s; a call seen then holds the flow this long.
CALL_HOLD_S = 15
APPOINTMENT_WINDOW = timedelta(hours=24)
APPOINTMENT_SCAN_LIMIT = 2000
_CLOSED_APPOINTMENT = frozenset({"cancelled", "noshow", "entered-in-error", "fulfilled"})
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_OPEN_ENDPOINTS = frozenset({"kiosk.pair_form", "kiosk.pair", "kiosk.admin", "kiosk.admin_post"})
# Requests the page's script makes by itself: no redirect to pairing (the script reads the
# 403), and no touch of the screen (they do not keep an idle flow alive).
_BY_THE_PAGE = frozenset({"kiosk.vitals_events", "kiosk.video_state"})

# Vital-sign labels by LOINC code (message ids; anything else shows its own code.text).
VITAL_LABELS = {
    "85354-9": "Blood pressure",
    "8867-4": "Heart rate",
    "59408-5": "Oxygen saturation",
    "2708-6": "Oxygen saturation",
    "29463-7": "Body weight",
    "8310-5": "Body temperature",
    "2339-0": "Glucose",
    "41653-7": "Glucose",
}


class Step(StrEnum):
    """Where a patient is in the check-in."""

    IDENTIFY = "identify"
    CONFIRM = "confirm"
    REGISTER = "register"
    FRONT_DESK = "front-desk"
    DETAILS = "details"
    INTAKE = "intake"
    CONSENT = "consent"
    VITALS = "vitals"
    PHOTOS = "photos"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class Kiosk:
    """A paired kiosk browser."""

    id: int
    station_id: str

    @property
    def actor(self) -> str:
        """The audit actor of everything done at this kiosk."""
        return f"kiosk:{self.station_id}"


@dataclass(slots=True)
class Flow:
    """One patient's way through the kiosk (server-side; ended by reset, finish or expiry)."""

    csrf: str
    started: datetime
    last_seen: datetime
    lang: str = "en"
    step: Step = Step.IDENTIFY
    candidate: str | None = None  # matched, not yet confirmed by the patient
    masked: str = ""
    appointment_id: str | None = None
    patient_id: str | None = None
    checked_in_at: str | None = None  # at the station (readings route to the patient)
    photo: bytearray = field(default_factory=bytearray)
    photos_sent: int = 0
    message: str | None = None  # a fixed sentence (message id) shown once
    ended: bool = False
    in_call_until: datetime | None = None  # the kiosk is in a video call: no idle expiry


class Window:
    """Events per key within a sliding window (rate limits; the clock is a parameter)."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._events: dict[str, deque[float]] = {}

    def _live(self, key: str, now: datetime) -> deque[float]:
        events = self._events.setdefault(key, deque())
        horizon = now.timestamp() - self.window_s
        while events and events[0] <= horizon:
            events.popleft()
        return events

    def exceeded(self, key: str, now: datetime) -> bool:
        """Whether ``key`` has used up its events in the window."""
        return len(self._live(key, now)) >= self.limit

    def hit(self, key: str, now: datetime) -> None:
        """Count one event for ``key``."""
        if len(self._events) > 10_000:
            self._events.clear()  # bounded memory; limits restart, which only eases them
        self._live(key, now).append(now.timestamp())


@dataclass(slots=True)
class KioskState:
    """The kiosk blueprint's state, kept on the app (``app.extensions["kiosk"]``)."""

    catalogs: dict[str, gettext.NullTranslations]
    flows: dict[int, Flow] = field(default_factory=dict)
    identify_failures: Window = field(
        default_factory=lambda: Window(IDENTIFY_FAILURES, IDENTIFY_WINDOW_S)
    )
    posts: Window = field(default_factory=lambda: Window(POSTS_PER_MINUTE, 60))
    pair_attempts: Window = field(default_factory=lambda: Window(PAIR_ATTEMPTS, PAIRING_TTL_S))
    # A station check-in's id → that patient's arrival Encounter today (None: none found).
    arrivals: dict[int, str | None] = field(default_factory=dict)


@bp.record_once
def _setup(setup: Any) -> None:
    setup.app.extensions["kiosk"] = KioskState(catalogs=load_catalogs())


def _kiosk_state() -> KioskState:
    state: KioskState = current_app.extensions["kiosk"]
    return state


def idle_timeout_s() -> int:
    """The browser-side idle reset (s); tests shorten it through the app's config."""
    return int(current_app.config.get("KIOSK_IDLE_TIMEOUT_S", IDLE_TIMEOUT_S))


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def cookie_name(state: AppState) -> str:
    """The paired kiosk's cookie (also read by the video signalling, web/video.py)."""
    return "__Secure-kiosk" if state.secure else "kiosk"


def _pair_cookie_name(state: AppState) -> str:
    # Path /kiosk rules out __Host-; __Secure- still keeps a plain-HTTP or sibling-domain
    # response from planting the pairing form's nonce.
    return "__Secure-kiosk_pair" if state.secure else "kiosk_pair"


# -- flows --------------------------------------------------------------------------------


def _new_flow(now: datetime) -> Flow:
    return Flow(csrf=secrets.token_urlsafe(32), started=now, last_seen=now)


def _expired(flow: Flow, now: datetime, idle_s: int) -> bool:
    if flow.in_call_until is not None and now < flow.in_call_until:
        return False  # a video call in progress is never ended by the idle rules
    idle = (now - flow.last_seen).total_seconds() > idle_s + SERVER_GRACE_S
    return idle or (now - flow.started).total_seconds() > FLOW_MAX_S


async def _end_flow(state: AppState, kiosk: Kiosk, flow: Flow, why: str) -> None:
    """Forget the flow and check its patient out of the station."""
    flow.ended = True
    flow.photo.clear()
    if flow.checked_in_at is not None:
        await DeviceRegistry(state.store).check_out(kiosk.station_id, kiosk.actor)
        flow.checked_in_at = None
    logger.info("kiosk %s: flow ended (%s)", kiosk.station_id, why)


async def _current_flow(state: AppState, kiosk: Kiosk) -> Flow:
    kstate = _kiosk_state()
    now = state.clock()
    flow = kstate.flows.get(kiosk.id)
    if flow is not None and _expired(flow, now, idle_timeout_s()):
        await _end_flow(state, kiosk, flow, "expired")
        flow = None
    if flow is None:
        flow = kstate.flows[kiosk.id] = _new_flow(now)
    return flow


async def _reset(state: AppState, kiosk: Kiosk, why: str) -> Flow:
    kstate = _kiosk_state()
    old = kstate.flows.pop(kiosk.id, None)
    if old is not None:
        await _end_flow(state, kiosk, old, why)
    flow = kstate.flows[kiosk.id] = _new_flow(state.clock())
    return flow


async def _sweep(app_state_: AppState, kstate: KioskState, idle_s: int) -> None:
    """End the flows nobody touched; runs with nobody at the kiosk asking."""
    now = app_state_.clock()
    rows = await app_state_.store.query("SELECT id, station_id FROM kiosks")
    stations = {int(r[0]): str(r[1]) for r in rows}
    for kiosk_id, flow in list(kstate.flows.items()):
        if _expired(flow, now, idle_s) and kiosk_id in stations:
            kstate.flows.pop(kiosk_id, None)
            await _end_flow(app_state_, Kiosk(kiosk_id, stations[kiosk_id]), flow, "swept")


async def _close_stale_checkins(state: AppState) -> None:
    """At start-up no flow exists, so a kiosk's open check-in belongs to nobody any more."""
    rows = await state.store.query(
        "SELECT DISTINCT station_id, actor FROM station_checkins "
        "WHERE checked_out_at IS NULL AND actor LIKE 'kiosk:%'"
    )
    registry = DeviceRegistry(state.store)
    for station_id, actor in rows:
        await registry.check_out(str(station_id), str(actor))


@bp.while_app_serving
async def _sweeper() -> AsyncGenerator[None, None]:
    state: AppState = current_app.extensions["appliance"]
    kstate = _kiosk_state()
    idle_s = idle_timeout_s()
    await _close_stale_checkins(state)

    async def loop() -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            try:
                await _sweep(state, kstate, idle_s)
            except Exception as exc:  # a failed sweep must not stop the next one
                # The type only: an exception's text may quote a patient's record.
                logger.error("kiosk sweep failed (%s)", type(exc).__name__)

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# -- every kiosk request -----------------------------------------------------------------


async def _load_kiosk(state: AppState) -> Kiosk | None:
    token = request.cookies.get(cookie_name(state))
    if not token:
        return None
    rows = await state.store.query(
        "SELECT id, station_id FROM kiosks WHERE token_hash = ? AND revoked_at IS NULL",
        (_hash(token),),
    )
    return Kiosk(int(rows[0][0]), str(rows[0][1])) if rows else None


@bp.before_request
async def _guard() -> ResponseReturnValue | None:
    """Only a paired kiosk; unsafe requests rate-limited and carrying the flow's CSRF token."""
    if request.endpoint in _OPEN_ENDPOINTS:
        return None
    state = app_state()
    kiosk = await _load_kiosk(state)
    if kiosk is None:
        if request.method == "GET" and request.endpoint not in _BY_THE_PAGE:
            return redirect("/kiosk/pair")
        abort(403)
    g.kiosk = kiosk
    flow = await _current_flow(state, kiosk)
    g.flow = flow
    now = state.clock()
    if request.method in _UNSAFE:
        kstate = _kiosk_state()
        key = f"kiosk:{kiosk.id}"
        if kstate.posts.exceeded(key, now):
            return await _page("kiosk_expired.html", status=429, reason="busy")
        kstate.posts.hit(key, now)
        sent = request.headers.get("X-CSRF-Token", "")
        if not sent and request.mimetype in (
            "application/x-www-form-urlencoded",
            "multipart/form-data",
        ):
            sent = (await request.form).get("csrf_token", "")
        if not hmac.compare_digest(sent.encode(), flow.csrf.encode()):
            return await _page("kiosk_expired.html", status=403, reason="expired")
    if request.endpoint not in _BY_THE_PAGE:
        flow.last_seen = now
    return None


@bp.context_processor
async def _kiosk_context() -> dict[str, object]:
    flow: Flow | None = g.get("flow")
    lang = flow.lang if flow is not None else language_or_default(request.args.get("lang"))
    translations = _kiosk_state().catalogs[lang]
    return {
        "_": translations.gettext,
        "lang": lang,
        "languages": LANGUAGES,
        "kiosk_csrf": None if flow is None else flow.csrf,
        "idle_timeout_s": idle_timeout_s(),
    }


def _kiosk() -> Kiosk:
    kiosk: Kiosk = g.kiosk
    return kiosk


def _flow() -> Flow:
    flow: Flow = g.flow
    return flow


def _t(message: str) -> str:
    return _kiosk_state().catalogs[_flow().lang].gettext(message)


async def _page(template: str, *, status: int = 200, **context: Any) -> Response:
    body = await render_template(template, **context)
    return Response(body, status=status, mimetype="text/html")


def _home() -> WerkzeugResponse:
    return redirect("/kiosk/", code=303)


def _go(step: Step, message: str | None = None) -> WerkzeugResponse:
    flow = _flow()
    flow.step = step
    flow.message = message
    return _home()


class StepError(Exception):
    """An action that does not belong to the step the flow is at (a stale page, a replay)."""


_PATIENT_STEPS = frozenset({Step.DETAILS, Step.INTAKE, Step.CONSENT, Step.VITALS, Step.PHOTOS})


def _needs(*steps: Step) -> None:
    """Refuse an action that does not belong to the step the flow is at."""
    flow = _flow()
    if flow.step not in steps or (flow.step in _PATIENT_STEPS and flow.patient_id is None):
        raise StepError(flow.step.value)


@bp.errorhandler(StepError)
async def _stale(_error: StepError) -> ResponseReturnValue:
    return _home()


# -- pairing (admin side and kiosk side) -------------------------------------------------


@bp.get("/admin")
@login_required(role=Role.ADMIN)
async def admin() -> ResponseReturnValue:
    """Pair a kiosk browser with a station, or revoke one."""
    return await _admin_page()


async def _admin_page(code: str | None = None, station: str | None = None) -> ResponseReturnValue:
    state = app_state()
    stations = list(await DeviceRegistry(state.store).stations())
    kiosks = await state.store.query(
        "SELECT id, station_id, paired_by, paired_at FROM kiosks WHERE revoked_at IS NULL "
        "ORDER BY paired_at"
    )
    return await render_template(
        "kiosk_admin.html",
        stations=[s for s in stations if s.kind is StationKind.KIOSK] or stations,
        kiosks=kiosks,
        code=code,
        code_station=station,
        ttl_min=PAIRING_TTL_S // 60,
        pair_url=f"{state.config.web.public_url.rstrip('/')}/kiosk/pair",
    )


@bp.post("/admin")
@login_required(role=Role.ADMIN)
async def admin_post() -> ResponseReturnValue:
    """Issue a one-time pairing code for a station, or revoke a paired kiosk."""
    state = app_state()
    session = await current_session()
    assert session is not None  # login_required
    form = await request.form
    now = state.clock()
    revoke = small_int(form.get("revoke", ""), ROW_ID_DIGITS)
    if revoke is not None:

        def revoke_work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE kiosks SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (fhir.utc_text(now), revoke),
            )

        event = AuditEvent(
            session.user.actor, AuditAction.CONFIG, entity=f"kiosk/{revoke}", detail="revoked"
        )
        await state.store.transact(revoke_work, [event])
        _kiosk_state().flows.pop(revoke, None)
        return redirect("/kiosk/admin", code=303)
    station_id = form.get("station", "")
    if station_id not in {s.id for s in await DeviceRegistry(state.store).stations()}:
        abort(400)
    code = "".join(secrets.choice(PAIRING_ALPHABET) for _ in range(PAIRING_CODE_LENGTH))

    def work(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO kiosk_pairings (code_hash, station_id, issued_by, issued_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                _hash(code),
                station_id,
                session.user.actor,
                fhir.utc_text(now),
                fhir.utc_text(now + timedelta(seconds=PAIRING_TTL_S)),
            ),
        )

    event = AuditEvent(
        session.user.actor,
        AuditAction.CONFIG,
        entity=f"station/{station_id}",
        detail="kiosk pairing code issued",
    )
    await state.store.transact(work, [event])
    return await _admin_page(code=code, station=station_id)


def _pair_mac(state: AppState, nonce: str) -> str:
    return hmac.new(state.form_secret, f"kiosk-pair|{nonce}".encode(), "sha256").hexdigest()


async def _pair_page(error: str | None = None, status: int = 200) -> Response:
    state = app_state()
    nonce = secrets.token_urlsafe(16)
    response = await _page(
        "kiosk_pair.html", status=status, pair_token=_pair_mac(state, nonce), error=error
    )
    response.set_cookie(
        _pair_cookie_name(state),
        nonce,
        max_age=PAIRING_TTL_S,
        path="/kiosk",
        secure=state.secure,
        httponly=True,
        samesite="Strict",
    )
    return response


@bp.get("/pair")
async def pair_form() -> ResponseReturnValue:
    """The kiosk browser's pairing form (type the code an admin issued)."""
    return await _pair_page()


@bp.post("/pair")
async def pair() -> ResponseReturnValue:
    """Turn a one-time pairing code into this browser's long-lived kiosk cookie."""
    state = app_state()
    form = await request.form
    nonce = request.cookies.get(_pair_cookie_name(state), "")
    if not nonce or not hmac.compare_digest(
        form.get("csrf_token", "").encode(), _pair_mac(state, nonce).encode()
    ):
        abort(403)
    now = state.clock()
    kstate = _kiosk_state()
    key = f"pair:{request.remote_addr}"
    if kstate.pair_attempts.exceeded(key, now):
        return await _pair_page("Too many attempts. Wait a few minutes.", status=429)
    kstate.pair_attempts.hit(key, now)
    code = "".join(ch for ch in form.get("code", "").upper() if ch.isalnum())
    token = secrets.token_urlsafe(32)

    def work(conn: sqlite3.Connection) -> str | None:
        row = conn.execute(
            "SELECT station_id FROM kiosk_pairings WHERE code_hash = ? AND used_at IS NULL "
            "AND expires_at >= ?",
            (_hash(code), fhir.utc_text(now)),
        ).fetchone()
        if row is None:
            return None
        station_id = str(row[0])
        conn.execute(
            "UPDATE kiosk_pairings SET used_at = ? WHERE code_hash = ?",
            (fhir.utc_text(now), _hash(code)),
        )
        conn.execute(
            "INSERT INTO kiosks (token_hash, station_id, paired_by, paired_at) VALUES (?, ?, ?, ?)",
            (_hash(token), station_id, f"pairing code {code[:2]}…", fhir.utc_text(now)),
        )
        audit.append(
            conn,
            [AuditEvent(f"kiosk:{station_id}", AuditAction.CONFIG, detail="kiosk paired")],
            now=now,
        )
        return station_id

    station_id = await db.run_sync(state.store.connection, _in_transaction, work)
    if station_id is None:
        return await _pair_page("That code is not valid. Ask an administrator.", status=400)
    response = redirect("/kiosk/", code=303)
    response.set_cookie(
        cookie_name(state),
        token,
        max_age=COOKIE_MAX_AGE_S,
        path="/kiosk",
        secure=state.secure,
        httponly=True,
        samesite="Strict",
    )
    response.delete_cookie(
        _pair_cookie_name(state),
        path="/kiosk",
        secure=state.secure,
        httponly=True,
        samesite="Strict",
    )
    return response


def _in_transaction(conn: sqlite3.Connection, work: Any) -> Any:
    with db.transaction_sync(conn):
        return work(conn)


# -- the pages ---------------------------------------------------------------------------


@bp.get("/")
async def home() -> ResponseReturnValue:
    """Whatever step the kiosk's flow is at."""
    state = app_state()
    flow, kiosk = _flow(), _kiosk()
    visit, _in_call = await _live_visit(state, kiosk)
    if visit is not None:
        # The panel's own texts too (video.js's) in the check-in's language.
        return await _page(
            "kiosk_video.html", step="video", visit=visit, video_messages=video_messages(_t)
        )
    message, flow.message = flow.message, None
    context: dict[str, Any] = {"step": flow.step.value, "message": message}
    if flow.step is Step.CONFIRM:
        context["masked"] = flow.masked
    elif flow.step is Step.DETAILS:
        context.update(await _on_file(state, kiosk, flow))
    elif flow.step is Step.INTAKE:
        context.update(intake_form=_intake_view(), phq2_answers=intake.PHQ2_ANSWERS)
    elif flow.step is Step.CONSENT:
        context["signature_max"] = intake.SIGNATURE_MAX_BYTES
    elif flow.step is Step.VITALS:
        devices = await DeviceRegistry(state.store).devices()
        context["devices"] = [d.name for d in devices if d.station_id == kiosk.station_id]
        context["readings"] = await _readings(state, kiosk, flow, _t)
    elif flow.step is Step.PHOTOS:
        context.update(
            photos_sent=flow.photos_sent,
            photo_max=intake.PHOTO_MAX_BYTES,
            chunk_max=PHOTO_CHUNK_MAX,
        )
    return await _page(f"kiosk_{flow.step.value.replace('-', '_')}.html", **context)


# -- the video visit ----------------------------------------------------------------------


def _local_midnight(state: AppState) -> datetime:
    today = state.clock().astimezone(state.zone).date()
    return datetime.combine(today, time()).replace(tzinfo=state.zone)


async def _arrival_of(state: AppState, kiosk: Kiosk, checkin: CheckIn) -> str | None:
    """The arrival Encounter today of the patient of a check-in at this station (cached: one
    audited search per check-in, made only while some video room is open)."""
    arrivals = _kiosk_state().arrivals
    if checkin.id not in arrivals:
        if len(arrivals) > 1000:
            arrivals.clear()  # bounded memory; a look-up again costs one search
        found = await visits.arrivals(state.store, kiosk.actor, _local_midnight(state))
        arrivals[checkin.id] = next(
            (a.encounter_id for a in found if a.patient_id == checkin.patient_id), None
        )
    return arrivals[checkin.id]


async def _live_visit(state: AppState, kiosk: Kiosk) -> tuple[str | None, bool]:
    """The visit of the patient checked in at this kiosk's station, if a nurse has it live
    (the nurse is in its video room), and whether a patient (this kiosk) is in it too.

    The same patient the video route lets this kiosk join (web/video.py): checked in at the
    station, arrived today. No room open on the box: nothing is read at all.
    """
    rooms = state.video.rooms
    if not len(rooms):
        return None, False
    registry = DeviceRegistry(state.store)
    for checkin in await registry.checkins(kiosk.station_id):
        if checkin.checked_out_at:
            continue
        visit = await _arrival_of(state, kiosk, checkin)
        if visit is None or visit not in rooms or rooms.get(visit).ended:
            continue
        people = list(rooms.get(visit))
        if any(p.role is VideoRole.NURSE and p.presence is Presence.ADMITTED for p in people):
            return visit, any(p.role is VideoRole.PATIENT for p in people)
    return None, False


@bp.get("/video/state")
async def video_state() -> ResponseReturnValue:
    """Whether this station's patient has a live video visit (``kiosk.js`` asks every 3 s).

    Not a touch of the screen; but while the kiosk is in the call it holds the flow
    (:data:`CALL_HOLD_S`), and the idle time counts from the call's end.
    """
    state, kiosk, flow = app_state(), _kiosk(), _flow()
    visit, in_call = await _live_visit(state, kiosk)
    if in_call:
        now = state.clock()
        flow.last_seen = now
        flow.in_call_until = now + timedelta(seconds=CALL_HOLD_S)
    return jsonify(live=visit is not None)


@bp.post("/lang")
async def switch_language() -> ResponseReturnValue:
    """Show the kiosk in another language (kept for this patient's flow only)."""
    _flow().lang = language_or_default((await request.form).get("lang"))
    return _home()


@bp.post("/reset")
async def reset() -> ResponseReturnValue:
    """Start over / I'm done / the idle timer: forget the flow, check the patient out."""
    form = await request.form
    why = "idle" if form.get("why") == "idle" else "reset"
    await _reset(app_state(), _kiosk(), why)
    if request.headers.get("X-Requested-With") == "kiosk.js":
        return Response(status=204)
    return _home()


# -- identify ----------------------------------------------------------------------------


def _birth_date(text: str, today: date) -> str | None:
    try:
        born = date.fromisoformat(text.strip())
    except ValueError:
        return None
    return born.isoformat() if date(1900, 1, 1) <= born <= today else None


def normalise_code(text: str) -> str:
    """An appointment code as typed or scanned (QR content ``appt:<code>``), canonical."""
    value = text.strip()
    if value.lower().startswith("appt:"):
        value = value[5:]
    return "".join(ch for ch in value if ch.isalnum()).upper()


def masked_name(patient: Mapping[str, Any]) -> str:
    """Initials only (``A. T.``): enough to recognise oneself, too little to learn a name."""
    names = [n for n in patient.get("name", []) if isinstance(n, Mapping)]
    if not names:
        return "?"
    name = next((n for n in names if n.get("use") == "official"), names[0])
    given = [str(x) for x in name.get("given", []) if x]
    family = str(name.get("family", ""))
    initials = [part[0].upper() + "." for part in (*given[:1], family) if part]
    return " ".join(initials) or "?"


def _find_appointment(
    conn: sqlite3.Connection, store: Store, code: str, now: datetime, actor: str
) -> tuple[str, str] | None:
    """``(appointment id, patient id)`` of an open appointment near now carrying ``code``."""
    rows = conn.execute(
        "SELECT id, logical_id, type, key_version, body FROM resources "
        "WHERE type = 'Appointment' ORDER BY id DESC LIMIT ?",
        (APPOINTMENT_SCAN_LIMIT,),
    ).fetchall()
    found: tuple[str, str] | None = None
    # Decrypted one at a time up to the match; one that fails authentication is left out
    # (logged, audited) rather than failing every check-in by code.
    failures: list[AuditEvent] = []
    readable = (
        item for row in rows for item in store.decrypt_readable(conn, [row], actor, failures)
    )
    for item in readable:
        appointment = item.resource
        if appointment.get("status") in _CLOSED_APPOINTMENT:
            continue
        codes = {
            normalise_code(str(i.get("value", "")))
            for i in appointment.get("identifier", [])
            if isinstance(i, Mapping) and i.get("system") != fhir.IDENTIFIER_SYSTEM
        }
        if code not in codes:
            continue
        start = appointment.get("start")
        if isinstance(start, str):
            with contextlib.suppress(ValueError):
                when = datetime.fromisoformat(start.replace("Z", "+00:00"))
                if when.tzinfo is not None and abs(when - now) > APPOINTMENT_WINDOW:
                    continue
        patient = next(
            (
                p["actor"]["reference"]
                for p in appointment.get("participant", [])
                if str(p.get("actor", {}).get("reference", "")).startswith("Patient/")
            ),
            None,
        )
        if patient is not None:
            found = (str(appointment["id"]), _local_patient_id(conn, patient))
            break
    event = AuditEvent(
        actor,
        AuditAction.SEARCH,
        patient_key=None if found is None else store.patient_key(f"Patient/{found[1]}"),
        entity="Appointment by code",
        outcome=audit.Outcome.SUCCESS,
    )
    with db.transaction_sync(conn):
        audit.append(conn, [event, *failures], now=now)
    return found


def _local_patient_id(conn: sqlite3.Connection, reference: str) -> str:
    """The local id of the Patient an appointment names. An Appointment pulled while the EHR
    refused us its Patient names it by the EHR's id (sync_agent/pull.py); pulled since, the
    Patient is here under an id of our own, found through its upstream link."""
    patient_id = reference.removeprefix("Patient/")
    here = conn.execute(
        "SELECT 1 FROM resources WHERE logical_id = ? AND type = 'Patient'", (patient_id,)
    ).fetchone()
    if here is None and (linked := resource_for_upstream(conn, reference)) is not None:
        return linked[1]
    return patient_id


async def _read_patient(store: Store, patient_id: str, actor: str) -> fhir.FhirJson | None:
    try:
        return await store.read("Patient", patient_id, actor)
    except NotFoundError:
        return None


async def _lookup(
    state: AppState, kiosk: Kiosk, form: Mapping[str, str]
) -> tuple[list[fhir.FhirJson], str | None]:
    """Patients matching the form (by appointment code or family name, each with birth date)."""
    store, actor = state.store, kiosk.actor
    birth = _birth_date(form.get("birth_date", ""), state.clock().date())
    if birth is None:
        return [], None
    if form.get("mode") == "code":
        code = normalise_code(form.get("code", ""))
        if len(code) < 4:
            return [], None
        hit = await db.run_sync(
            store.connection, _find_appointment, store, code, state.clock(), actor
        )
        if hit is None:
            return [], None
        patient = await _read_patient(store, hit[1], actor)
        if patient is None or patient.get("birthDate") != birth:
            return [], None
        return [patient], hit[0]
    family = " ".join(form.get("family", "").split())[:100]
    if not family:
        return [], None
    return await store.find_patients(family, birth, actor), None


async def _floor(started: float) -> None:
    """Answer no sooner than :data:`IDENTIFY_FLOOR_S` after ``started`` (loop time)."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, started + IDENTIFY_FLOOR_S - loop.time()))


_NOT_FOUND = "We could not find you with those details. Please check them, or see the front desk."
_TOO_MANY = "Too many tries. Please see the front desk."


@bp.post("/identify")
async def identify() -> ResponseReturnValue:
    """Find the patient; one fixed answer for every kind of "not found"."""
    _needs(Step.IDENTIFY)
    state, kiosk, flow = app_state(), _kiosk(), _flow()
    kstate = _kiosk_state()
    started = asyncio.get_running_loop().time()
    now = state.clock()
    key = f"kiosk:{kiosk.id}"
    if kstate.identify_failures.exceeded(key, now):
        await _floor(started)
        return _go(Step.IDENTIFY, _TOO_MANY)
    try:
        matches, appointment_id = await _lookup(state, kiosk, await request.form)
    except TamperedDataError:
        # A matching record is unreadable (logged and audited by the store): a person sorts
        # it out, rather than "not found" sending the patient on to register a second time.
        await _floor(started)
        return _go(Step.FRONT_DESK)
    await _floor(started)
    if not matches:
        kstate.identify_failures.hit(key, now)
        return _go(Step.IDENTIFY, _NOT_FOUND)
    if len(matches) > 1:
        return _go(Step.FRONT_DESK)
    flow.candidate = str(matches[0]["id"])
    flow.appointment_id = appointment_id
    flow.masked = masked_name(matches[0])
    return _go(Step.CONFIRM)


@bp.post("/confirm")
async def confirm() -> ResponseReturnValue:
    """The patient says the masked name is (or is not) them."""
    _needs(Step.CONFIRM)
    flow = _flow()
    if (await request.form).get("answer") != "yes" or flow.candidate is None:
        flow.candidate = None
        return _go(Step.FRONT_DESK)
    flow.patient_id, flow.candidate = flow.candidate, None
    return _go(Step.DETAILS)


@bp.post("/walk-in")
async def walk_in() -> ResponseReturnValue:
    """No appointment: register."""
    _needs(Step.IDENTIFY)
    return _go(Step.REGISTER)


@bp.post("/register")
async def register() -> ResponseReturnValue:
    """Register a walk-in, unless a patient with that name and birth date exists already."""
    _needs(Step.REGISTER)
    state, kiosk, flow = app_state(), _kiosk(), _flow()
    kstate = _kiosk_state()
    form = await request.form
    started = asyncio.get_running_loop().time()
    now = state.clock()
    key = f"kiosk:{kiosk.id}"
    given = " ".join(form.get("given", "").split())[:100]
    family = " ".join(form.get("family", "").split())[:100]
    phone = "".join(ch for ch in form.get("phone", "") if ch.isdigit() or ch in "+ -()")[:30]
    birth = _birth_date(form.get("birth_date", ""), state.clock().date())
    if not given or not family or birth is None:
        return _go(Step.REGISTER, "Please fill in your name and birth date.")
    if kstate.identify_failures.exceeded(key, now):
        await _floor(started)
        return _go(Step.IDENTIFY, _TOO_MANY)
    kstate.identify_failures.hit(key, now)  # each registration try counts, like a failed look-up
    try:
        existing = await state.store.find_patients(family, birth, kiosk.actor)
    except TamperedDataError:
        existing = [{}]  # someone matches whose record is unreadable: not a second chart
    await _floor(started)
    if existing:
        return _go(Step.FRONT_DESK)
    [stored] = await state.store.create(
        [intake.walk_in_patient(given, family, birth, phone)], kiosk.actor, audit_each=True
    )
    flow.patient_id = stored.logical_id
    return _go(Step.DETAILS)


# -- demographics and insurance ----------------------------------------------------------


def _last(value: str, keep: int = 2) -> str:
    digits = "".join(ch for ch in value if ch.isalnum())
    return digits[-keep:] if len(digits) > keep else ""


async def _on_file(state: AppState, kiosk: Kiosk, flow: Flow) -> dict[str, Any]:
    """What is on file, masked: the last digits of the phone and member id, whether an address."""
    assert flow.patient_id is not None
    ref = f"Patient/{flow.patient_id}"
    patient = await _read_patient(state.store, flow.patient_id, kiosk.actor) or {}
    phone = next(
        (t.get("value", "") for t in patient.get("telecom", []) if t.get("system") == "phone"),
        "",
    )
    coverage = await state.store.newest(ref, "Coverage", kiosk.actor, limit=1)
    return {
        "phone_end": _last(str(phone)),
        "has_address": bool(patient.get("address")),
        "member_end": _last(str(coverage[0].get("subscriberId", ""))) if coverage else "",
        "has_coverage": bool(coverage),
    }


@bp.post("/details")
async def details() -> ResponseReturnValue:
    """New phone, address or insurance (blank keeps what is on file)."""
    _needs(Step.DETAILS)
    state, kiosk, flow = app_state(), _kiosk(), _flow()
    assert flow.patient_id is not None
    form = await request.form

    def field_(name: str, limit: int = 100) -> str:
        return " ".join(form.get(name, "").split())[:limit]

    phone = "".join(ch for ch in field_("phone", 30) if ch.isdigit() or ch in "+ -()")
    message = None
    changes = (phone, field_("line"), field_("city"), field_("postal", 12))
    if any(changes) and not await _save_contact(state.store, flow.patient_id, kiosk, changes):
        message = "The front desk will update your details."
    payer, member = field_("payer"), field_("member_id", 40)
    if payer and member:
        await state.store.create(
            [intake.coverage(f"Patient/{flow.patient_id}", payer, member)],
            kiosk.actor,
            audit_each=True,
        )
    return _go(Step.INTAKE, message)


async def _save_contact(
    store: Store, patient_id: str, kiosk: Kiosk, changes: tuple[str, str, str, str]
) -> bool:
    """The patient's new contact details on the copy stored now; False: left to the desk.

    Written only over the very copy it was made from: if the sync process stores the EHR's
    newer version in between (``ChangedSinceReadError``), the change is made again on that
    one, so what the EHR changed is never undone by a copy read a moment before.
    """
    for _ in range(3):
        patient = await _read_patient(store, patient_id, kiosk.actor)
        if patient is None:
            return True  # nothing to update (the patient was merged away meanwhile)
        updated = intake.with_contact(patient, *changes)
        if updated is None:
            return True  # nothing changes
        try:
            await store.update("Patient", patient_id, updated, kiosk.actor, based_on=patient)
        except ReviewPendingError:
            return False
        except ChangedSinceReadError:
            continue
        return True
    return False


# -- intake questionnaire ----------------------------------------------------------------


def _intake_view() -> list[Mapping[str, Any]]:
    """The Questionnaire's items, as the template walks them."""
    items: list[Mapping[str, Any]] = intake.questionnaire()["item"]
    return items


@bp.post("/intake")
async def intake_answers() -> ResponseReturnValue:
    """Store the answers as a QuestionnaireResponse (with the PHQ-2 score)."""
    _needs(Step.INTAKE)
    state, kiosk, flow = app_state(), _kiosk(), _flow()
    assert flow.patient_id is not None
    form = await request.form
    try:
        answers = intake.parse_answers(form, form.getlist("symptoms"))
    except intake.IntakeError as error:
        return _go(Step.INTAKE, error.message)
    response = intake.questionnaire_response(
        answers, f"Patient/{flow.patient_id}", state.clock(), flow.lang
    )
    await state.store.create([response], kiosk.actor, audit_each=True)
    return _go(Step.CONSENT)


# -- consent -----------------------------------------------------------------------------

CONSENT_TEXT = (
    "I agree to be seen by a health care provider over a video visit. I understand that I "
    "can stop the visit at any time and ask for an in-person visit instead."
)


@bp.post("/consent")
async def consent() -> ResponseReturnValue:
    """Store the signed consent, then check the patient in at the station for vitals."""
    _needs(Step.CONSENT)
    state, kiosk, flow = app_state(), _kiosk(), _flow()
    assert flow.patient_id is not None
    form = await request.form
    if form.get("agree") != "yes":
        return _go(Step.CONSENT, "Please tick the box to agree, then sign.")
    try:
        signature = intake.signature_png(form.get("signature", ""))
    except intake.IntakeError as error:
        return _go(Step.CONSENT, error.message)
    resource = intake.consent(
        f"Patient/{flow.patient_id}", signature, state.clock(), flow.lang, _t(CONSENT_TEXT)
    )
    await state.store.create([resource], kiosk.actor, audit_each=True)
    try:
        checkin = await DeviceRegistry(state.store).check_in(
            kiosk.station_id, flow.patient_id, kiosk.actor
        )
    except RegistryError:
        logger.warning("kiosk %s: its station is not registered", kiosk.station_id)
        return _go(Step.PHOTOS)
    flow.checked_in_at = checkin.checked_in_at
    return _go(Step.VITALS)


# -- vitals ------------------------------------------------------------------------------


def vital_lines(observation: Mapping[str, Any], gettext_: Any) -> tuple[str, str] | None:
    """``(label, value)`` of a vital-sign Observation as the kiosk shows it."""
    codings = observation.get("code", {}).get("coding", [])
    code = next((str(c.get("code")) for c in codings if c.get("system") == intake.LOINC), "")
    label = VITAL_LABELS.get(code)
    label = gettext_(label) if label else str(observation.get("code", {}).get("text", ""))
    if code == "85354-9":
        values: dict[str, Any] = {}
        for component in observation.get("component", []):
            ccode = next((c.get("code") for c in component.get("code", {}).get("coding", [])), "")
            values[str(ccode)] = component.get("valueQuantity", {}).get("value")
        sys_, dia = values.get("8480-6"), values.get("8462-4")
        if sys_ is None or dia is None:
            return None
        return label, f"{sys_:g}/{dia:g} mmHg"
    quantity = observation.get("valueQuantity")
    if not isinstance(quantity, Mapping) or not isinstance(quantity.get("value"), int | float):
        return None
    unit = str(quantity.get("unit") or quantity.get("code") or "")
    return label or gettext_("Reading"), f"{quantity['value']:g} {unit}".strip()


async def _readings(
    state: AppState, kiosk: Kiosk, flow: Flow, gettext_: Any
) -> list[dict[str, str]]:
    """This flow's readings: the patient's Observations since the station check-in."""
    if flow.patient_id is None or flow.checked_in_at is None:
        return []
    newest = await state.store.newest(
        f"Patient/{flow.patient_id}", "Observation", kiosk.actor, limit=20
    )
    shown = []
    for observation in reversed(newest):
        when = fhir.effective_utc(observation)
        if when is None or when < flow.checked_in_at:
            continue
        line = vital_lines(observation, gettext_)
        if line is not None:
            shown.append({"id": str(observation.get("id")), "label": line[0], "value": line[1]})
    return shown


@bp.get("/vitals/events")
async def vitals_events() -> ResponseReturnValue:
    """Server-Sent Events: this kiosk's current patient's readings, and nobody else's."""
    state, kiosk, flow = app_state(), _kiosk(), _flow()
    if flow.step not in (Step.VITALS, Step.PHOTOS) or flow.checked_in_at is None:
        abort(409)
    gettext_ = _kiosk_state().catalogs[flow.lang].gettext
    body = _feed(state, _kiosk_state(), kiosk, flow, gettext_)
    response = Response(body, mimetype="text/event-stream")
    response.headers["X-Accel-Buffering"] = "no"
    response.timeout = None
    return response


async def _feed(
    state: AppState, kstate: KioskState, kiosk: Kiosk, flow: Flow, gettext_: Any
) -> AsyncIterator[bytes]:
    sent: set[str] = set()
    after = -1
    yield b"retry: 3000\n\n"
    while True:
        if kstate.flows.get(kiosk.id) is not flow or flow.ended or flow.checked_in_at is None:
            yield b"event: reset\ndata: {}\n\n"
            return
        newest = await state.changes.tick()  # one poll per interval for all streams
        if newest != after:
            after = newest
            for reading in await _readings(state, kiosk, flow, gettext_):
                if reading["id"] not in sent:
                    sent.add(reading["id"])
                    flow.last_seen = state.clock()  # a reading is somebody at the station
                    data = json.dumps(reading, separators=(",", ":"))
                    yield f"event: reading\ndata: {data}\n\n".encode()


@bp.post("/vitals/next")
async def vitals_next() -> ResponseReturnValue:
    """On to photos."""
    _needs(Step.VITALS)
    return _go(Step.PHOTOS)


# -- photos ------------------------------------------------------------------------------


@bp.post("/photos/chunk")
async def photo_chunk() -> ResponseReturnValue:
    """One piece of a photo (the app caps every request at 64 KiB; a photo is up to 5 MB)."""
    _needs(Step.PHOTOS)
    flow = _flow()
    offset = request.headers.get("X-Upload-Offset", "")
    data = await request.get_data(False, False, False)
    if small_int(offset) != len(flow.photo) or len(data) > PHOTO_CHUNK_MAX:
        flow.photo.clear()
        return jsonify(error=_t("The upload was interrupted. Please try again.")), 409
    if len(flow.photo) + len(data) > intake.PHOTO_MAX_BYTES:
        flow.photo.clear()
        return jsonify(error=_t("The photo is too large (at most 5 MB).")), 413
    if not flow.photo and intake.image_type(data[:16]) is None:
        return jsonify(error=_t("Only JPEG or PNG photos can be sent.")), 415
    flow.photo.extend(data)
    return jsonify(received=len(flow.photo))


@bp.post("/photos/finish")
async def photo_finish() -> ResponseReturnValue:
    """Store the uploaded photo, encrypted, as a Media of the patient."""
    _needs(Step.PHOTOS)
    state, kiosk, flow = app_state(), _kiosk(), _flow()
    assert flow.patient_id is not None
    image = bytes(flow.photo)
    flow.photo.clear()
    try:
        media = intake.photo_media(
            f"Patient/{flow.patient_id}", image, state.clock(), kiosk.station_id
        )
    except intake.IntakeError as error:
        return jsonify(error=_t(error.message)), 415
    await state.store.create([media], kiosk.actor, audit_each=True)
    flow.photos_sent += 1
    return jsonify(photos=flow.photos_sent)


@bp.post("/finish")
async def finish() -> ResponseReturnValue:
    """Record the arrival, leave the station free, and say "you're checked in"."""
    _needs(Step.PHOTOS)
    state, kiosk, flow = app_state(), _kiosk(), _flow()
    assert flow.patient_id is not None
    flow.photo.clear()
    await state.store.create(
        [
            intake.arrival(
                f"Patient/{flow.patient_id}",
                state.clock(),
                kiosk.station_id,
                flow.appointment_id,
            )
        ],
        kiosk.actor,
        audit_each=True,
    )
    if flow.checked_in_at is not None:
        await DeviceRegistry(state.store).check_out(kiosk.station_id, kiosk.actor)
        flow.checked_in_at = None
    return _go(Step.DONE)
