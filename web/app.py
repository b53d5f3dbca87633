"""The Quart application factory: one app per call, its store and config kept on the app.

There is no module-level app (STYLE.md, convention 6): the web entry point
(:mod:`web.main`) and each test build their own with :func:`create_app`. Every response
carries the security headers of OWASP ASVS V14.4: a strict Content-Security-Policy (no
inline script or style, so every script and stylesheet is a file in ``web/static/``),
``nosniff``, no referrer, no framing, HSTS over TLS, and ``Cache-Control: no-store`` on
everything but static assets, since any page may carry PHI.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from quart import Quart, Response, current_app, redirect, request
from quart.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException
from werkzeug.routing import IntegerConverter, Map

from appliance.config import Config
from appliance.errors import TamperedDataError
from appliance.numbers import ROW_ID_DIGITS
from appliance.store import Store
from appliance.users import LoginThrottle, Role
from services.video import still_requests
from services.video.bandwidth import WanPolicy
from services.video.camera_streams import StreamWatcher
from services.video.service import VideoService
from services.video.turn import ice_servers
from web.changes import ChangeFeed
from web.templating import render_template

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
HSTS = "max-age=31536000"
_HERE = Path(__file__).parent

# What an error page says: a fixed sentence per status, never the exception's text, which
# could name a record (and so a patient).
_ERROR_TEXT = {
    400: "The request could not be understood.",
    401: "Please log in.",
    403: "This action is not allowed. If you were filling in a form, reload the page and "
    "try again.",
    404: "There is no page at this address.",
    405: "This address does not accept that kind of request.",
}
_GENERIC_ERROR = "Something went wrong on the appliance. Try again; if it keeps happening, call IT."
_UNREADABLE_ERROR = (
    "This record could not be read: its stored copy failed the appliance's integrity check "
    "(damaged or altered on disk). Nothing else is affected. Tell IT "
    '(docs/troubleshooting.md, "failed authentication").'
)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class AppState:
    """What the blueprints share, kept on the app (``app.extensions["appliance"]``)."""

    config: Config
    store: Store
    clock: Clock
    sse_poll_s: float
    zone: ZoneInfo
    secure: bool  # served over TLS: Secure, ``__Host-`` cookies and HSTS
    changes: ChangeFeed  # the live pages' one poll of the store (web/changes.py)
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    # Signs the pre-login CSRF tokens; per process, so a restart only voids open login forms.
    form_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    # Video rooms and the box's peer connections (docs/video.md); closed after serving.
    video: VideoService = field(default_factory=VideoService)
    # How long a still waits for the devices process (services/video/still_requests.py).
    still_wait_s: float = still_requests.STILL_WAIT_S


def app_state() -> AppState:
    """The current app's :class:`AppState` (inside a request or app context)."""
    state: AppState = current_app.extensions["appliance"]
    return state


class RowIdConverter(IntegerConverter):
    """``<int:...>`` in every route: at most :data:`ROW_ID_DIGITS` digits, so an id binds.

    Werkzeug's own takes any number of digits, and ``/sync/review/99999999999999999999``
    was an ``OverflowError`` (a 500) instead of a 404.
    """

    def __init__(
        self,
        url_map: Map,
        fixed_digits: int = 0,
        min: int | None = None,
        max: int | None = None,
        signed: bool = False,
    ) -> None:
        largest = 10**ROW_ID_DIGITS - 1
        super().__init__(url_map, fixed_digits, min, largest if max is None else max, signed)


def create_app(
    config: Config,
    store: Store,
    *,
    clock: Clock = _utcnow,
    sse_poll_s: float = 0.25,
    still_wait_s: float = still_requests.STILL_WAIT_S,
) -> Quart:
    """Build the web app over an open ``store``; ``clock`` gives aware UTC datetimes;
    ``still_wait_s`` bounds an exam-camera still's wait for the devices process."""
    # Imported here, not at the top: the blueprints import :func:`app_state` from this
    # module, so importing them first would be circular.
    from web import admin, audit_report, break_glass, fhir_api, ingest, openapi
    from web.auth import bp as auth_bp
    from web.auth import current_session
    from web.chart import bp as chart_bp
    from web.claims import bp as claims_bp
    from web.devices import bp as devices_bp
    from web.health import bp as health_bp
    from web.kiosk import bp as kiosk_bp
    from web.nurse import bp as nurse_bp
    from web.policy import deny_unclassified
    from web.precall import bp as precall_bp
    from web.provider import bp as provider_bp
    from web.rpm import bp as rpm_bp
    from web.rpm_patient import bp as rpm_patient_bp
    from web.sync import bp as sync_bp
    from web.video import bp as video_bp

    app = Quart(
        __name__,
        static_folder=str(_HERE / "static"),
        template_folder=str(_HERE / "templates"),
    )
    app.jinja_options = {**app.jinja_options, "autoescape": True}
    # Before any route is added: an id in a URL that SQLite cannot bind is "not found".
    app.url_map.converters["int"] = RowIdConverter
    app.config.update(MAX_CONTENT_LENGTH=64 * 1024, PROPAGATE_EXCEPTIONS=False)
    app.extensions["appliance"] = AppState(
        config=config,
        store=store,
        clock=clock,
        sse_poll_s=sse_poll_s,
        changes=ChangeFeed(store, sse_poll_s),
        zone=ZoneInfo(config.site.timezone),
        secure=config.web.tls_cert is not None or config.web.public_url.startswith("https:"),
        still_wait_s=still_wait_s,
        video=VideoService(
            wan=WanPolicy(
                uplink_kbps=config.video.uplink_kbps,
                audio_only_kbps=config.video.audio_only_kbps,
            ),
            ice_servers=ice_servers(config.video.ice_servers),
            transcode_encoders=config.video.transcode_encoders,
        ),
    )
    # Deny by default: an endpoint missing from the policy table (web/policy.py) is refused
    # before any other hook runs.
    app.before_request(deny_unclassified)
    app.register_blueprint(auth_bp)
    app.register_blueprint(nurse_bp)
    app.register_blueprint(chart_bp)
    app.register_blueprint(devices_bp)
    app.register_blueprint(health_bp)
    app.register_blueprint(sync_bp)
    app.register_blueprint(rpm_bp)
    app.register_blueprint(rpm_patient_bp)
    app.register_blueprint(ingest.bp)
    app.register_blueprint(fhir_api.bp)  # GET /fhir/metadata, read and search (read keys)
    app.register_blueprint(openapi.bp)  # GET /openapi.json (issue 6)
    app.register_blueprint(claims_bp)
    app.register_blueprint(kiosk_bp)
    app.register_blueprint(provider_bp)
    app.register_blueprint(precall_bp)  # issue 7: the pre-call check
    app.register_blueprint(video_bp)  # issue 7: the video visit's signalling
    for security_bp in (admin.bp, audit_report.bp, break_glass.bp):  # issue 6 security
        app.register_blueprint(security_bp)
    ingest.exempt_from_browser_csrf(app)  # the vendor API takes a key, never the session cookie

    @app.get("/")
    async def index() -> ResponseReturnValue:
        """Each role's home page: providers have no arrivals queue, but remote monitoring."""
        session = await current_session()
        if session is not None and session.user.role is Role.PROVIDER:
            return redirect("/rpm/")
        return redirect("/nurse/")

    @app.context_processor
    async def site() -> dict[str, object]:
        return {"site_name": config.site.name, "site_zone": config.site.timezone}

    @app.after_serving
    async def stop_change_feed() -> None:
        await app.extensions["appliance"].changes.close()

    if config.exam_cameras:
        # A camera shown in a visit leaves it when its devices process stops stamping it,
        # and is stopped when its visit is over (services/video/camera_streams.py).
        watching = asyncio.Event()

        @app.before_serving
        async def watch_camera_streams() -> None:
            state = app.extensions["appliance"]
            watcher = StreamWatcher(state.store, state.video, clock=state.clock)
            app.extensions["camera_streams"] = asyncio.create_task(
                watcher.run(watching), name="exam camera streams"
            )

        @app.after_serving
        async def stop_watching_camera_streams() -> None:
            watching.set()
            task = app.extensions.pop("camera_streams", None)
            if task is not None:
                await task

    @app.after_serving
    async def close_video() -> None:
        await app.extensions["appliance"].video.async_close()

    app.after_request(_security_headers)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


async def _security_headers(response: Response) -> Response:
    headers = response.headers
    headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    headers["X-Frame-Options"] = "DENY"
    if request.endpoint != "static":
        headers["Cache-Control"] = "no-store"
    if app_state().secure or request.scheme == "https":
        headers["Strict-Transport-Security"] = HSTS
    return response


async def _error_page(status: int, message: str) -> ResponseReturnValue:
    return await render_template("error.html", status=status, message=message), status


async def _http_error(error: HTTPException) -> ResponseReturnValue:
    status = error.code or 500
    if status < 400:  # a redirect raised as an exception (RequestRedirect) is not an error
        return error.get_response()
    return await _error_page(status, _ERROR_TEXT.get(status, _GENERIC_ERROR))


async def _unexpected_error(error: Exception) -> ResponseReturnValue:
    if isinstance(error, TamperedDataError):
        # One record, read by id (a chart, an alert): said plainly, and the store has logged
        # its row. Lists and feeds leave such a record out instead (Store.decrypt_readable).
        logger.error("%s: a record failed authentication", request.endpoint)
        return await _error_page(500, _UNREADABLE_ERROR)
    # The type and the stack only: an exception's message may quote data (PHI).
    logger.error(
        "unhandled %s in %s\n%s",
        type(error).__name__,
        request.endpoint,
        "".join(traceback.format_tb(error.__traceback__)),
    )
    return await _error_page(500, _GENERIC_ERROR)
