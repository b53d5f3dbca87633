"""User administration for administrators (``/admin/users``).

List the staff accounts; create one (role and an initial password that meets the policy,
to be changed at first login); reset a password (the person must change it, their
sessions end); disable or enable an account; reset a lost second factor. Every change is
audited in the same transaction as the change itself (``config`` records naming
``User/<username>``; HIPAA 164.312(a)(2)(i) unique user identification, ASVS V2.1 and
V3.3). An administrator cannot disable themselves, nor disable the last administrator.
"""

from __future__ import annotations

from quart import Blueprint, Response, redirect, request
from quart.typing import ResponseReturnValue

from appliance import db, users
from appliance.numbers import small_int
from appliance.users import Role, UserError
from web.app import app_state
from web.auth import current_session, login_required
from web.templating import render_template

bp = Blueprint("admin", __name__, url_prefix="/admin")

_DONE = {
    "created": "Account created. Give the person their initial password in person; they "
    "choose their own at first sign-in.",
    "password": "Password reset. The person must choose a new one at next sign-in; their "
    "open sessions have ended.",
    "disabled": "Account disabled; its open sessions have ended.",
    "enabled": "Account enabled.",
    "mfa": "Second factor reset. The person sets it up again at next sign-in (required for "
    "administrators).",
}


async def _page(*, error: str | None = None, status: int = 200) -> Response:
    state = app_state()
    session = await current_session()
    assert session is not None  # login_required
    accounts = await db.run_sync(state.store.connection, users.list_users)
    body = await render_template(
        "admin_users.html",
        accounts=accounts,
        me=session.user.id,
        roles=list(Role),
        error=error,
        done=_DONE.get(request.args.get("done", "")),
        min_length=users.MIN_PASSWORD_LENGTH,
        zone=state.zone,
    )
    return Response(body, status=status, mimetype="text/html")


def _message(error: UserError) -> str:
    text = str(error)
    return f"{text[:1].upper()}{text[1:]}."


@bp.get("/users")
@login_required(role=Role.ADMIN)
async def user_list() -> ResponseReturnValue:
    """Every staff account with its role, state and second factor."""
    return await _page()


@bp.post("/users")
@login_required(role=Role.ADMIN)
async def create() -> ResponseReturnValue:
    """Create an account; the initial password must be changed at first login."""
    state = app_state()
    session = await current_session()
    assert session is not None
    form = await request.form
    try:
        await db.run_sync(
            state.store.connection,
            users.create_user,
            form.get("username", "").strip().lower(),
            form.get("password", ""),
            form.get("role", ""),
            now=state.clock(),
            must_change_password=True,
            actor=session.user.actor,
        )
    except UserError as exc:
        return await _page(error=_message(exc), status=400)
    return redirect("/admin/users?done=created")


def _user_id(raw: str) -> int:
    found = small_int(raw)
    return -1 if found is None else found


@bp.post("/users/<user_id>/password")
@login_required(role=Role.ADMIN)
async def reset_password(user_id: str) -> ResponseReturnValue:
    """Set a new password that the person must change at next login."""
    state = app_state()
    session = await current_session()
    assert session is not None
    form = await request.form
    try:
        await db.run_sync(
            state.store.connection,
            users.reset_password,
            _user_id(user_id),
            form.get("password", ""),
            actor=session.user.actor,
            now=state.clock(),
        )
    except UserError as exc:
        return await _page(error=_message(exc), status=400)
    return redirect("/admin/users?done=password")


async def _set_disabled(user_id: str, disabled: bool) -> ResponseReturnValue:
    state = app_state()
    session = await current_session()
    assert session is not None
    try:
        await db.run_sync(
            state.store.connection,
            users.set_disabled,
            _user_id(user_id),
            disabled,
            acting_user_id=session.user.id,
            actor=session.user.actor,
            now=state.clock(),
        )
    except UserError as exc:
        return await _page(error=_message(exc), status=400)
    return redirect(f"/admin/users?done={'disabled' if disabled else 'enabled'}")


@bp.post("/users/<user_id>/disable")
@login_required(role=Role.ADMIN)
async def disable(user_id: str) -> ResponseReturnValue:
    """Disable an account (never one's own, never the last administrator)."""
    return await _set_disabled(user_id, True)


@bp.post("/users/<user_id>/enable")
@login_required(role=Role.ADMIN)
async def enable(user_id: str) -> ResponseReturnValue:
    """Enable a disabled account."""
    return await _set_disabled(user_id, False)


@bp.post("/users/<user_id>/mfa-reset")
@login_required(role=Role.ADMIN)
async def reset_mfa(user_id: str) -> ResponseReturnValue:
    """Remove someone's second factor (a lost phone); never one's own."""
    state = app_state()
    session = await current_session()
    assert session is not None
    try:
        await db.run_sync(
            state.store.connection,
            users.reset_second_factor,
            _user_id(user_id),
            acting_user_id=session.user.id,
            actor=session.user.actor,
            now=state.clock(),
        )
    except UserError as exc:
        return await _page(error=_message(exc), status=400)
    return redirect("/admin/users?done=mfa")
