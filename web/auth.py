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
* **Second factor** (:mod:`appliance.mfa`): after the right password, a user with TOTP —
  and every administrator, who must enrol one before anything else — gets only a
  *challenge* cookie that the MFA pages alone accept. The session (a new token) starts when
  the code is proven. Codes are throttled like passwords, per account and per address.
* A session whose password an administrator reset, or an administrator session without a
  second factor, reaches nothing but the password and MFA pages until that is fixed.
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

from quart import Blueprint, Response, abort, g, redirect, request
from quart.typing import ResponseReturnValue
from werkzeug.sansio.response import Response as BaseResponse

from appliance import audit, db, mfa, users
from appliance.audit import AuditAction, AuditEvent, Outcome
from appliance.mfa import Challenge, ChallengePurpose
from appliance.numbers import small_int
from appliance.users import Role, Session, User, UserError
from web.app import AppState, app_state
from web.templating import render_template

logger = logging.getLogger(__name__)

bp = Blueprint("auth", __name__)

P = ParamSpec("P")
View = Callable[P, Awaitable[ResponseReturnValue]]

LOGIN_FORM_TTL_S = 600
_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_UNKNOWN_ACTOR = "user:(unknown)"
# What a gated session (password to change, admin without MFA) may still reach.
_GATE_EXEMPT = frozenset(
    {"auth.password_form", "auth.change_password", "auth.mfa_enrol_form", "auth.mfa_enrol"}
)
# Pre-MFA forms check the challenge's own CSRF token, not a session's.
_CHALLENGE_ENDPOINTS = frozenset({"auth.mfa_verify", "auth.mfa_enrol"})
# Forms that carry their own signed double-submit token in ``csrf_token`` (the login form,
# the kiosk pairing form): the session's token cannot share that field, so a staff session
# in the same browser must not be asked for it (it would refuse them all).
_OWN_TOKEN_ENDPOINTS = frozenset({"auth.login", "kiosk.pair"})


def cookie_name(state: AppState, base: str) -> str:
    """A staff cookie's name: ``__Host-`` prefixed when the box is served over HTTPS."""
    return f"__Host-{base}" if state.secure else base


def _set_cookie(
    response: BaseResponse, state: AppState, base: str, value: str, max_age: int | None = None
) -> None:
    response.set_cookie(
        cookie_name(state, base),
        value,
        max_age=max_age,
        path="/",
        secure=state.secure,
        httponly=True,
        samesite="Strict",
    )


def _delete_cookie(response: BaseResponse, state: AppState, base: str) -> None:
    response.delete_cookie(
        cookie_name(state, base), path="/", secure=state.secure, httponly=True, samesite="Strict"
    )


# -- sessions ----------------------------------------------------------------------------


async def current_session() -> Session | None:
    """This request's live session (loaded once per request, restarting its idle timer)."""
    if "session" not in g:
        state = app_state()
        token = request.cookies.get(cookie_name(state, "session"))
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
    return request.cookies.get(cookie_name(app_state(), "session"))


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
            gate = session_gate(session)
            if gate is not None and request.endpoint not in _GATE_EXEMPT:
                if request.method == "GET":
                    return redirect(gate)
                abort(403)
            if allowed is not None and session.user.role not in allowed:
                abort(403)
            return await view(*args, **kwargs)

        return wrapper

    return decorate


def session_gate(session: Session) -> str | None:
    """Where a session must go before anything else (None: nowhere)."""
    if session.user.role is Role.ADMIN and not session.mfa_enabled:
        return "/mfa/enrol"
    if session.must_change_password:
        return "/account/password"
    return None


@bp.before_app_request
async def enforce_csrf() -> None:
    """Refuse an unsafe request from a logged-in browser that lacks the session's token."""
    if request.method not in _UNSAFE_METHODS or request.endpoint in _OWN_TOKEN_ENDPOINTS:
        return
    if request.endpoint in _CHALLENGE_ENDPOINTS and await current_challenge() is not None:
        return  # the view checks the challenge's own token
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
    issued = small_int(issued_text, 12)
    if not nonce or issued is None or not mac.isascii():  # compare_digest takes ASCII only
        return False
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
    conn: sqlite3.Connection,
    username: str,
    action: AuditAction,
    outcome: Outcome,
    now: datetime,
    detail: str | None,
    entity: str | None,
) -> None:
    with db.transaction_sync(conn):
        known = conn.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone()
        actor = f"user:{username}" if known else _UNKNOWN_ACTOR
        event = AuditEvent(actor, action, outcome=outcome, entity=entity, detail=detail)
        audit.append(conn, [event], now=now)


async def _record(
    username: str,
    action: AuditAction,
    outcome: Outcome,
    detail: str | None = None,
    entity: str | None = None,
) -> None:
    state = app_state()
    await db.run_sync(
        state.store.connection,
        _audit_login,
        username,
        action,
        outcome,
        state.clock(),
        detail,
        entity,
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
    nonce = request.cookies.get(cookie_name(state, "login"))
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
    next_path = _safe_next(form.get("next"))
    enrolled = await db.run_sync(conn, mfa.is_enabled, user.id)
    if enrolled or user.role is Role.ADMIN:
        purpose = ChallengePurpose.VERIFY if enrolled else ChallengePurpose.ENROL
        challenge = await db.run_sync(
            conn, mfa.create_challenge, user.id, purpose, next_path, now=state.clock()
        )
        response = redirect("/login/mfa" if enrolled else "/mfa/enrol")
        _set_cookie(response, state, "mfa", challenge, max_age=mfa.CHALLENGE_TTL_S)
        _delete_cookie(response, state, "login")
        return response
    response = redirect(next_path)
    await _start_session(response, state, user, "password")
    return response


async def _start_session(response: BaseResponse, state: AppState, user: User, how: str) -> None:
    """A new session for ``user`` on ``response`` (audited as a login ``how``)."""
    conn = state.store.connection
    old = request.cookies.get(cookie_name(state, "session"))
    if old:  # no session fixation: a login always starts a new session
        await db.run_sync(conn, users.delete_session, old)
    challenge = request.cookies.get(cookie_name(state, "mfa"))
    if challenge:
        await db.run_sync(conn, mfa.end_challenge, challenge)
    token, _csrf = await db.run_sync(conn, users.create_session, user.id, now=state.clock())
    await _record(user.username, AuditAction.LOGIN, Outcome.SUCCESS, detail=how)
    _set_cookie(response, state, "session", token)
    _delete_cookie(response, state, "login")
    _delete_cookie(response, state, "mfa")


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


# -- the second factor ---------------------------------------------------------------------


async def current_challenge() -> Challenge | None:
    """This request's pre-MFA challenge (a correct password, no session yet), if any."""
    if "mfa_challenge" not in g:
        state = app_state()
        token = request.cookies.get(cookie_name(state, "mfa"))
        g.mfa_challenge = None
        if token:
            g.mfa_challenge = await db.run_sync(
                state.store.connection, mfa.load_challenge, token, now=state.clock()
            )
    challenge: Challenge | None = g.mfa_challenge
    return challenge


def _challenge_token() -> str:
    token = request.cookies.get(cookie_name(app_state(), "mfa"))
    assert token is not None  # only called once current_challenge() found one
    return token


def _challenge_csrf_ok(challenge: Challenge, sent: str) -> bool:
    return hmac.compare_digest(sent.encode(), challenge.csrf.encode())


def _mfa_keys(username: str) -> tuple[str, str]:
    # Not the password's "account:" key: a correct password must not reset code failures.
    return (f"mfa:{username}", f"ip:{request.remote_addr}")


async def _slow_down(keys: tuple[str, str]) -> None:
    state = app_state()
    delay = state.throttle.delay_s(keys, state.clock())
    if delay > 0:
        logger.info("second-factor attempt slowed by %.1f s after repeated failures", delay)
        await asyncio.sleep(delay)


@bp.get("/login/mfa")
async def mfa_verify_form() -> ResponseReturnValue:
    """Ask a password-verified user for the code of their authenticator app."""
    challenge = await current_challenge()
    if challenge is None or challenge.purpose is not ChallengePurpose.VERIFY:
        return redirect("/login")
    return await render_template("login_mfa.html", challenge_csrf=challenge.csrf, error=None)


@bp.post("/login/mfa")
async def mfa_verify() -> ResponseReturnValue:
    """Check the TOTP or recovery code; only now does the session start."""
    state = app_state()
    challenge = await current_challenge()
    if challenge is None or challenge.purpose is not ChallengePurpose.VERIFY:
        return redirect("/login")
    form = await request.form
    if not _challenge_csrf_ok(challenge, form.get("csrf_token", "")):
        abort(403)
    keys = _mfa_keys(challenge.username)
    await _slow_down(keys)
    conn = state.store.connection
    method = await db.run_sync(
        conn,
        mfa.verify,
        state.store.current_keyring,
        challenge.user_id,
        form.get("code", ""),
        now=state.clock(),
    )
    if method is None:
        state.throttle.failed(keys, state.clock())
        await db.run_sync(conn, mfa.count_failed_attempt, _challenge_token())
        await _record(
            challenge.username, AuditAction.LOGIN_FAILED, Outcome.FAILURE, "second factor wrong"
        )
        if challenge.attempts + 1 >= mfa.CHALLENGE_MAX_ATTEMPTS:
            response = redirect("/login")
            _delete_cookie(response, state, "mfa")
            return response
        body = await render_template(
            "login_mfa.html", challenge_csrf=challenge.csrf, error="That code is not right."
        )
        return Response(body, status=401, mimetype="text/html")
    state.throttle.succeeded(keys[0])
    user = User(challenge.user_id, challenge.username, Role(challenge.role))
    response = redirect(challenge.next_path)
    await _start_session(response, state, user, f"password + {method.value}")
    return response


async def _enrolling_user() -> tuple[User, Challenge | None] | None:
    """Who is enrolling: the holder of an ``enrol`` challenge, else the session's user."""
    challenge = await current_challenge()
    if challenge is not None and challenge.purpose is ChallengePurpose.ENROL:
        return User(challenge.user_id, challenge.username, Role(challenge.role)), challenge
    session = await current_session()
    if session is None:
        return None
    return session.user, None


async def _enrol_page(user: User, csrf: str, *, error: str | None, status: int) -> Response:
    state = app_state()
    secret = await db.run_sync(
        state.store.connection,
        mfa.begin_enrolment,
        state.store.current_keyring,
        user.id,
        now=state.clock(),
    )
    uri = mfa.provisioning_uri(secret, user.username, state.config.site.name)
    body = await render_template(
        "mfa_enrol.html",
        qr=mfa.qr_data_uri(uri),
        secret=" ".join(secret[i : i + 4] for i in range(0, len(secret), 4)),
        form_csrf=csrf,
        required=user.role is Role.ADMIN,
        error=error,
    )
    return Response(body, status=status, mimetype="text/html")


@bp.get("/mfa/enrol")
async def mfa_enrol_form() -> ResponseReturnValue:
    """Set up an authenticator app: QR code, the secret as text, and a code to confirm."""
    found = await _enrolling_user()
    if found is None:
        return redirect("/login?next=/mfa/enrol")
    user, challenge = found
    if challenge is None:
        session = await current_session()
        assert session is not None
        if session.mfa_enabled:
            return redirect("/mfa/")
        csrf = session.csrf
    else:
        csrf = challenge.csrf
    return await _enrol_page(user, csrf, error=None, status=200)


@bp.post("/mfa/enrol")
async def mfa_enrol() -> ResponseReturnValue:
    """Confirm the new factor with a code; show the recovery codes once; new session id."""
    state = app_state()
    found = await _enrolling_user()
    if found is None:
        return redirect("/login")
    user, challenge = found
    form = await request.form
    if challenge is not None and not _challenge_csrf_ok(challenge, form.get("csrf_token", "")):
        abort(403)
    session = await current_session()
    if challenge is None and session is not None and session.mfa_enabled:
        return redirect("/mfa/")  # already enrolled (another tab): nothing to confirm
    csrf = challenge.csrf if challenge is not None else session.csrf if session else ""
    keys = _mfa_keys(user.username)
    await _slow_down(keys)
    conn = state.store.connection
    try:
        codes = await db.run_sync(
            conn,
            mfa.confirm_enrolment,
            state.store.current_keyring,
            user.id,
            form.get("code", ""),
            now=state.clock(),
        )
    except ValueError:  # already enrolled (another tab): nothing to confirm
        return redirect("/mfa/")
    if codes is None:
        state.throttle.failed(keys, state.clock())
        if challenge is not None:
            await db.run_sync(conn, mfa.count_failed_attempt, _challenge_token())
        return await _enrol_page(
            user, csrf, error="That code is not right. Check the phone's clock.", status=400
        )
    state.throttle.succeeded(keys[0])
    await _record(
        user.username,
        AuditAction.CONFIG,
        Outcome.SUCCESS,
        "second factor enrolled",
        f"User/{user.username}",
    )
    next_path = challenge.next_path if challenge is not None else "/mfa/"
    body = await render_template("mfa_recovery.html", codes=codes, next_path=next_path)
    response = Response(body, mimetype="text/html")
    # A new session id for the stronger login (no fixation across the MFA step).
    await _start_session(response, state, user, "password + totp (enrolment)")
    return response


async def _account_page(session: Session, *, message: str | None = None) -> str:
    state = app_state()
    left = await db.run_sync(state.store.connection, mfa.recovery_codes_left, session.user.id)
    return await render_template(
        "mfa_account.html",
        enrolled=session.mfa_enabled,
        codes_left=left,
        may_remove=session.user.role is not Role.ADMIN,
        message=message,
    )


@bp.get("/mfa/")
@login_required()
async def mfa_account() -> ResponseReturnValue:
    """The person's own sign-in security: second factor, recovery codes, password."""
    session = await current_session()
    assert session is not None
    return await _account_page(session)


async def _own_code_ok(session: Session, code: str) -> bool:
    state = app_state()
    keys = _mfa_keys(session.user.username)
    await _slow_down(keys)
    method = await db.run_sync(
        state.store.connection,
        mfa.verify,
        state.store.current_keyring,
        session.user.id,
        code,
        now=state.clock(),
    )
    if method is None:
        state.throttle.failed(keys, state.clock())
        return False
    return True


@bp.post("/mfa/recovery-codes")
@login_required()
async def mfa_new_recovery_codes() -> ResponseReturnValue:
    """Replace the recovery codes (proven with a current code)."""
    state = app_state()
    session = await current_session()
    assert session is not None
    form = await request.form
    if not session.mfa_enabled or not await _own_code_ok(session, form.get("code", "")):
        return await _account_page(session, message="That code is not right."), 400
    codes = await db.run_sync(
        state.store.connection, mfa.regenerate_recovery_codes, session.user.id
    )
    await _record(
        session.user.username,
        AuditAction.CONFIG,
        Outcome.SUCCESS,
        "recovery codes replaced",
        f"User/{session.user.username}",
    )
    return await render_template("mfa_recovery.html", codes=codes, next_path="/mfa/")


def _remove_factor(conn: sqlite3.Connection, user_id: int) -> None:
    with db.transaction_sync(conn):
        mfa.remove(conn, user_id)


@bp.post("/mfa/remove")
@login_required(role=(Role.NURSE, Role.PROVIDER))
async def mfa_remove() -> ResponseReturnValue:
    """A nurse turns her optional second factor off (proven with a current code)."""
    state = app_state()
    session = await current_session()
    assert session is not None
    form = await request.form
    if not session.mfa_enabled or not await _own_code_ok(session, form.get("code", "")):
        return await _account_page(session, message="That code is not right."), 400
    await db.run_sync(state.store.connection, _remove_factor, session.user.id)
    await _record(
        session.user.username,
        AuditAction.CONFIG,
        Outcome.SUCCESS,
        "second factor removed",
        f"User/{session.user.username}",
    )
    return redirect("/mfa/")


# -- changing one's own password -------------------------------------------------------------


@bp.get("/account/password")
@login_required()
async def password_form() -> ResponseReturnValue:
    """Change one's own password (forced after an administrator set it)."""
    session = await current_session()
    assert session is not None
    return await render_template(
        "login_password_change.html", forced=session.must_change_password, error=None
    )


@bp.post("/account/password")
@login_required()
async def change_password() -> ResponseReturnValue:
    """Check the current password, set the new one, end the account's other sessions."""
    state = app_state()
    session = await current_session()
    assert session is not None
    form = await request.form
    new = form.get("new_password", "")
    error = None
    if new != form.get("new_password_again", ""):
        error = "The two new passwords differ."
    else:
        keys = (f"account:{session.user.username}", f"ip:{request.remote_addr}")
        await _slow_down(keys)
        try:
            changed = await db.run_sync(
                state.store.connection,
                users.change_own_password,
                session.user.id,
                form.get("current_password", ""),
                new,
                keep_token=session_token(),
                now=state.clock(),
            )
        except UserError as exc:
            error = f"{str(exc)[:1].upper()}{str(exc)[1:]}."
        else:
            if changed:
                return redirect("/")
            state.throttle.failed(keys, state.clock())
            error = "The current password is not right."
    body = await render_template(
        "login_password_change.html", forced=session.must_change_password, error=error
    )
    return Response(body, status=400, mimetype="text/html")


async def session_alive(state: AppState, token: str) -> bool:
    """Is the session still valid? Checked without touching it, so a long-lived stream
    (server-sent events) alone never keeps a session alive (HIPAA 164.312(a)(2)(iii))."""
    session = await db.run_sync(
        state.store.connection,
        users.load_session,
        token,
        now=state.clock(),
        idle_timeout_s=state.config.web.session_idle_timeout_s,
        touch=False,
    )
    return session is not None
