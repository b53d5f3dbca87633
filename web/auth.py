"""Staff login, logout, sessions and CSRF for every blueprint.

* The session is server-side (:mod:`appliance.users`); the browser holds only the random
  token, in a cookie that is HttpOnly, SameSite=Strict and, over TLS, Secure with the
  ``__Host-`` prefix (bound to this host, path ``/``, never set by a sibling domain).
* Every unsafe request (POST, PUT, PATCH, DELETE) of a logged-in browser must carry the
  session's CSRF token (form field ``csrf_token`` or header ``X-CSRF-Token``). The login
  form, which has no session yet, uses a signed double-submit token instead: a random
  nonce in a short-lived cookie and, in the form, an HMAC of it with the time it was issued.
* Logins and failed logins are audited with the actor ``user:<username>`` (a username is
  not PHI). A failed attempt for an account that does not exist is recorded as
  ``user:(unknown)``, because what was typed may be a password in the wrong field.
* Repeated failures slow down (:class:`appliance.users.LoginThrottle`), never lock out.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import secrets
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import ParamSpec
from urllib.parse import quote

from quart import Blueprint, Response, abort, g, redirect, render_template, request
from quart.typing import ResponseReturnValue
from werkzeug.sansio.response import Response as BaseResponse

from appliance import audit, db, users
from appliance.audit import AuditAction, AuditEvent, Outcome
from appliance.users import Role, Session, User
from web.app import AppState, app_state

logger = logging.getLogger(__name__)

bp = Blueprint("auth", __name__)

P = ParamSpec("P")
View = Callable[P, Awaitable[ResponseReturnValue]]

LOGIN_FORM_TTL_S = 600
_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_UNKNOWN_ACTOR = "user:(unknown)"


def _cookie_name(state: AppState, base: str) -> str:
    return f"__Host-{base}" if state.secure else base


def _set_cookie(
    response: BaseResponse, state: AppState, base: str, value: str, max_age: int | None = None
) -> None:
    response.set_cookie(
        _cookie_name(state, base),
        value,
        max_age=max_age,
        path="/",
        secure=state.secure,
        httponly=True,
        samesite="Strict",
    )


def _delete_cookie(response: BaseResponse, state: AppState, base: str) -> None:
    response.delete_cookie(
        _cookie_name(state, base), path="/", secure=state.secure, httponly=True, samesite="Strict"
    )


# -- sessions ----------------------------------------------------------------------------


async def current_session() -> Session | None:
    """This request's live session (loaded once per request, restarting its idle timer)."""
    if "session" not in g:
        state = app_state()
        token = request.cookies.get(_cookie_name(state, "session"))
        g.session = None
        if token:
            g.session = await db.run_sync(
                state.store.connection,
                users.load_session,
                token,
                now=state.clock(),
                idle_timeout_s=state.config.web.session_idle_timeout_s,
            )
    session: Session | None = g.session
    return session


def session_token() -> str | None:
    """The raw session token of this request's cookie (for the live feed's re-checks)."""
    return request.cookies.get(_cookie_name(app_state(), "session"))


def login_required(
    role: Role | Iterable[Role] | None = None,
) -> Callable[[View[P]], View[P]]:
    """Decorate a view: anonymous browsers go to the login page, other roles get 403."""
    allowed = None if role is None else frozenset([role] if isinstance(role, Role) else role)

    def decorate(view: View[P]) -> View[P]:
        @functools.wraps(view)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> ResponseReturnValue:
            session = await current_session()
            if session is None:
                wants_stream = "text/event-stream" in request.accept_mimetypes.values()
                if request.method == "GET" and not wants_stream:
                    target = request.full_path.rstrip("?")
                    return redirect(f"/login?next={quote(target, safe='/')}")
                abort(401)
            if allowed is not None and session.user.role not in allowed:
                abort(403)
            return await view(*args, **kwargs)

        return wrapper

    return decorate


@bp.before_app_request
async def enforce_csrf() -> None:
    """Refuse an unsafe request from a logged-in browser that lacks the session's token."""
    if request.method not in _UNSAFE_METHODS or request.endpoint == "auth.login":
        return
    session = await current_session()
    if session is None:
        return  # nothing to forge: the view itself refuses anonymous requests
    form = await request.form
    sent = form.get("csrf_token") or request.headers.get("X-CSRF-Token", "")
    if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
        abort(403)


@bp.app_context_processor
async def session_context() -> dict[str, object]:
    """The logged-in user and CSRF token for templates (only what this request loaded)."""
    session: Session | None = g.get("session")
    return {
        "current_user": None if session is None else session.user,
        "csrf_token": None if session is None else session.csrf,
    }


# -- the login form's CSRF token ---------------------------------------------------------


def _form_mac(state: AppState, nonce: str, issued: int) -> str:
    message = f"login-form|{nonce}|{issued}".encode()
    return hmac.new(state.form_secret, message, hashlib.sha256).hexdigest()


def _login_form_token(state: AppState, nonce: str) -> str:
    issued = int(state.clock().timestamp())
    return f"{issued}.{_form_mac(state, nonce, issued)}"


def _login_form_token_ok(state: AppState, nonce: str | None, token: str) -> bool:
    issued_text, _, mac = token.partition(".")
    if not nonce or not issued_text.isdigit():
        return False
    issued = int(issued_text)
    age = state.clock().timestamp() - issued
    expected = _form_mac(state, nonce, issued)
    return 0 <= age <= LOGIN_FORM_TTL_S and hmac.compare_digest(mac, expected)


async def _login_page(
    state: AppState, *, status: int = 200, error: str | None = None, username: str = ""
) -> Response:
    nonce = secrets.token_urlsafe(16)
    body = await render_template(
        "login.html",
        login_token=_login_form_token(state, nonce),
        error=error,
        username=username,
        next=_safe_next(request.args.get("next")),
    )
    response = Response(body, status=status, mimetype="text/html")
    _set_cookie(response, state, "login", nonce, max_age=LOGIN_FORM_TTL_S)
    return response


def _safe_next(target: str | None) -> str:
    """Only a path on this site: an open redirect would make a fine phishing link."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return "/"


# -- audit -------------------------------------------------------------------------------


def _audit_login(
    conn: sqlite3.Connection, username: str, action: AuditAction, outcome: Outcome, now: datetime
) -> None:
    with db.transaction_sync(conn):
        known = conn.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone()
        actor = f"user:{username}" if known else _UNKNOWN_ACTOR
        audit.append(conn, [AuditEvent(actor, action, outcome=outcome)], now=now)


async def _record(username: str, action: AuditAction, outcome: Outcome) -> None:
    state = app_state()
    await db.run_sync(
        state.store.connection, _audit_login, username, action, outcome, state.clock()
    )


# -- views -------------------------------------------------------------------------------


@bp.get("/login")
async def login_form() -> ResponseReturnValue:
    """The login form (a logged-in user goes straight on)."""
    if await current_session() is not None:
        return redirect(_safe_next(request.args.get("next")))
    return await _login_page(app_state())


@bp.post("/login")
async def login() -> ResponseReturnValue:
    """Check the password, start a session and set its cookie."""
    state = app_state()
    form = await request.form
    nonce = request.cookies.get(_cookie_name(state, "login"))
    if not _login_form_token_ok(state, nonce, form.get("csrf_token", "")):
        abort(403)
    username = form.get("username", "").strip().lower()
    password = form.get("password", "")
    keys = (f"account:{username}", f"ip:{request.remote_addr}")
    delay = state.throttle.delay_s(keys, state.clock())
    if delay > 0:
        logger.info("login attempt slowed by %.1f s after repeated failures", delay)
        await asyncio.sleep(delay)
    conn = state.store.connection
    user: User | None = await db.run_sync(conn, users.authenticate, username, password)
    if user is None:
        state.throttle.failed(keys, state.clock())
        await _record(username, AuditAction.LOGIN_FAILED, Outcome.FAILURE)
        return await _login_page(
            state, status=401, error="Wrong username or password.", username=username
        )
    state.throttle.succeeded(keys[0])
    old = request.cookies.get(_cookie_name(state, "session"))
    if old:  # no session fixation: a login always starts a new session
        await db.run_sync(conn, users.delete_session, old)
    token, _csrf = await db.run_sync(conn, users.create_session, user.id, now=state.clock())
    await _record(username, AuditAction.LOGIN, Outcome.SUCCESS)
    response = redirect(_safe_next(form.get("next")))
    _set_cookie(response, state, "session", token)
    _delete_cookie(response, state, "login")
    return response


@bp.post("/logout")
async def logout() -> ResponseReturnValue:
    """End the session (CSRF-checked like every unsafe request) and go to the login page."""
    state = app_state()
    session = await current_session()
    token = session_token()
    if token:
        await db.run_sync(state.store.connection, users.delete_session, token)
    if session is not None:
        await _record(session.user.username, AuditAction.LOGOUT, Outcome.SUCCESS)
    response = redirect("/login")
    _delete_cookie(response, state, "session")
    return response
