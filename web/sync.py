"""The sync health page (DESIGN.md, "Sync"): is the box online, what is waiting, what failed.

``GET /sync/`` shows nurses and admins the figures of :func:`sync_agent.status.read_status`
(the same as ``appliance sync status`` and ``/metrics``). Only an admin may act:

* ``POST /sync/now`` writes the ``sync_now`` meta row with its audit record in one
  transaction; the sync process wakes on the commit and skips its backoff;
* ``POST /sync/dead-letters/<id>/message`` opens one dead letter's sealed message (the
  upstream's words, which may quote PHI) and shows it on this response only, audited.
"""

from __future__ import annotations

from datetime import datetime

from quart import Blueprint, redirect, render_template, url_for
from quart.typing import ResponseReturnValue

from appliance import db
from appliance.users import Role
from sync_agent import status
from web.app import app_state
from web.auth import current_session, login_required

bp = Blueprint("sync", __name__, url_prefix="/sync")

_VIEWERS = (Role.NURSE, Role.ADMIN)


def age_text(seconds: float | None) -> str:
    """``42 s``, ``7 min``, ``3 h 5 min``, ``2 d 4 h`` (a dash when there is nothing)."""
    if seconds is None:
        return "–"
    whole = int(seconds)
    if whole < 120:
        return f"{whole} s"
    minutes = whole // 60
    if minutes < 120:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


async def _actor() -> tuple[str, bool]:
    session = await current_session()
    assert session is not None  # login_required
    return session.user.actor, session.user.role is Role.ADMIN


async def _page(*, opened: dict[int, str] | None = None, notice: str | None = None) -> str:
    state = app_state()
    now = state.clock()
    found = await db.run_sync(state.store.connection, status.read_status, now)
    _, is_admin = await _actor()

    def local(moment: datetime | None) -> str:
        if moment is None:
            return "never"
        return moment.astimezone(state.zone).strftime("%Y-%m-%d %H:%M:%S")

    last_success_age = (
        None if found.last_success is None else (now - found.last_success).total_seconds()
    )
    return await render_template(
        "sync.html",
        status=found,
        is_admin=is_admin,
        opened=opened or {},
        notice=notice,
        local=local,
        age_text=age_text,
        last_success_age=last_success_age,
    )


@bp.get("/")
@login_required(role=_VIEWERS)
async def overview() -> ResponseReturnValue:
    """The sync health page."""
    return await _page()


@bp.post("/now")
@login_required(role=Role.ADMIN)
async def sync_now() -> ResponseReturnValue:
    """Ask the sync process to try now (audited); back to the page."""
    state = app_state()
    actor, _ = await _actor()
    await db.run_sync(state.store.connection, status.request_sync_now, actor, state.clock())
    return redirect(url_for("sync.overview"), 303)


@bp.post("/dead-letters/<int:outbox_id>/message")
@login_required(role=Role.ADMIN)
async def dead_letter_message(outbox_id: int) -> ResponseReturnValue:
    """Open one dead letter's message for this response only (audited in the patient's name)."""
    state = app_state()
    actor, _ = await _actor()
    opened = await db.run_sync(
        state.store.connection,
        lambda conn: status.open_dead_letter_messages(
            conn, state.store.keyring, actor=actor, now=state.clock(), outbox_ids=[outbox_id]
        ),
    )
    if not opened:
        return await _page(notice="That dead letter is no longer there."), 404
    return await _page(opened=opened)
