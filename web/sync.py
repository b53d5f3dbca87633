"""The sync health page (DESIGN.md, "Sync"): is the box online, what is waiting, what failed.

``GET /sync/`` shows nurses and admins the figures of :func:`sync_agent.status.read_status`
(the same as ``appliance sync status`` and ``/metrics``). Only an admin may act:

* ``POST /sync/now`` writes the ``sync_now`` meta row with its audit record in one
  transaction; the sync process wakes on the commit and skips its backoff;
* ``POST /sync/dead-letters/<id>/message`` opens one dead letter's sealed message (the
  upstream's words, which may quote PHI) and shows it on this response only, audited;
* ``POST /sync/dead-letters/<id>/resend`` and ``POST /sync/dead-letters/resend`` (all) put
  dead letters back in the outbox once the cause is fixed
  (:func:`sync_agent.dead_letters.resend_dead_letters`: audited, and the sync process tries at
  once);
* ``POST /sync/twins/clear`` clears the list of upstream records the pull left out as held
  twice (:func:`sync_agent.pull_twins.clear_twins`: audited; one still there comes back);
* ``POST /sync/trail-breaks/acknowledge`` acknowledges the audit trail breaks the export
  found, up to the count the page showed (:func:`sync_agent.audit_export_state.acknowledge_breaks`:
  audited; the count and its metric stay, a new break warns again).

The review queue (``/sync/review``) is for nurses and admins: local edits the upstream
refused because it had changed meanwhile (412 on ``If-Match``), or refused for another
reason before it changed the record itself. The list shows no PHI; opening one shows both
versions field by field and why it is there (audited as a read of that patient's record)
and the nurse decides: keep ours (the update is sent again, checked against their version)
or take theirs (it replaces ours here; ours stays in the history). Nothing is overwritten
without that decision.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from quart import Blueprint, abort, redirect, request, url_for
from quart.typing import ResponseReturnValue

from appliance import db
from appliance.errors import InvalidResourceError
from appliance.numbers import small_int
from appliance.users import Role
from sync_agent import dead_letters, pull_twins, status, sync_now_request
from sync_agent.audit_export_state import acknowledge_breaks
from sync_agent.outbox_failing import failing_items
from sync_agent.review_queue import (
    ReviewChangedError,
    ReviewError,
    ReviewItem,
    ReviewNotTakenError,
    ReviewQueue,
)
from web.access import decide
from web.app import app_state
from web.auth import current_session, login_required
from web.templating import render_template

bp = Blueprint("sync", __name__, url_prefix="/sync")

_VIEWERS = (Role.NURSE, Role.ADMIN)


# The sync process reports only the class of its last failure (the server's words may quote
# patient data); what each means for the person looking, and where to look.
FAILURE_TEXT = {
    "transient": "the EHR answered with errors or was busy; retrying with backoff",
    "ambiguous": "a bundle got no answer; resending it (safe: nothing is created twice)",
    "auth": "the EHR refused our credentials or certificate; check the site config and the "
    "EHR's registration of this box (and the access, the scopes, it grants)",
    "endpoint": "the upstream address does not take FHIR requests; check base_url in the "
    "site config",
    "too_large": "the EHR, or a proxy in front of it, refused a request as too large; "
    "sending smaller ones, or waiting if even one item is refused (check its body size limit)",
    "permanent": "the EHR refused an item; see the dead letters",
    "store": "the local store failed (a full disk?); see the journal",
    # Every search of a pull pass answered with a refusal of that search (status_figures.REFUSED).
    "refused": "the EHR refused every search of the pull (a 403 or 400 to each): check the "
    "scopes granted to this box's client there (Appointment, Patient, Observation read) and "
    "that it takes the search parameters; the journal names the resource type",
    # No page of a pull pass taken: the searches were answered out of order
    # (status_figures.UNORDERED).
    "unordered": "the EHR does not sort or filter the pull's searches as asked "
    "(_sort=_lastUpdated, _lastUpdated): those pages are not taken, the cursor stays; ask the "
    "EHR team to support both on Appointment and Observation searches",
    # No connection could be made at all: the clinic's own link, not the EHR.
    "unreachable": "no connection to the EHR could be made: check this clinic's internet "
    "link, DNS and firewall; records wait here and go when it is back",
}


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


async def _page(
    *,
    opened: dict[int, str] | None = None,
    notice: str | None = None,
    failing_message: str | None = None,
) -> str:
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
    open_reviews = await ReviewQueue(state.store).items()
    return await render_template(
        "sync.html",
        open_reviews=len(open_reviews),
        status=found,
        is_admin=is_admin,
        opened=opened or {},
        failing_message=failing_message,
        notice=notice,
        local=local,
        local_text=lambda text: _local_text(text, state.zone),
        age_text=age_text,
        failure_text=FAILURE_TEXT,
        last_success_age=last_success_age,
    )


@bp.get("/")
@login_required(role=_VIEWERS)
async def overview() -> ResponseReturnValue:
    """The sync health page."""
    resent = small_int(request.args.get("resent", ""))
    notice = None
    if resent is not None:
        notice = (
            f"{resent} dead letter{'' if resent == 1 else 's'} put back in the outbox; the "
            "sync process sends them now. One the upstream refuses again comes back here."
        )
    elif (acknowledged := small_int(request.args.get("acknowledged", ""))) is not None:
        notice = (
            f"{acknowledged} audit trail break{'' if acknowledged == 1 else 's'} acknowledged "
            "(in the audit trail under your name). A new one shows here again."
            if acknowledged
            else "Nothing new to acknowledge."
        )
    return await _page(notice=notice)


@bp.post("/twins/clear")
@login_required(role=Role.ADMIN)
async def twins_clear() -> ResponseReturnValue:
    """Clear the list of records held twice upstream (audited); back to the page."""
    state = app_state()
    actor, _ = await _actor()
    await db.run_sync(
        state.store.connection,
        lambda conn: pull_twins.clear_twins(conn, actor=actor, now=state.clock()),
    )
    return redirect(url_for("sync.overview"), 303)


@bp.post("/trail-breaks/acknowledge")
@login_required(role=Role.ADMIN)
async def trail_breaks_acknowledge() -> ResponseReturnValue:
    """Acknowledge the audit trail breaks the page showed (audited); back to the page."""
    state = app_state()
    actor, _ = await _actor()
    seen = small_int((await request.form).get("seen", ""))
    if seen is None:
        abort(400, "Which breaks: the form carries the count the page showed.")
    done = await db.run_sync(
        state.store.connection,
        lambda conn: acknowledge_breaks(conn, actor=actor, now=state.clock(), seen=seen),
    )
    return redirect(url_for("sync.overview", acknowledged=done), 303)


@bp.post("/now")
@login_required(role=Role.ADMIN)
async def sync_now() -> ResponseReturnValue:
    """Ask the sync process to try now (audited); back to the page."""
    state = app_state()
    actor, _ = await _actor()
    await db.run_sync(
        state.store.connection, sync_now_request.request_sync_now, actor, state.clock()
    )
    return redirect(url_for("sync.overview"), 303)


@bp.post("/dead-letters/<int:outbox_id>/message")
@login_required(role=Role.ADMIN)
async def dead_letter_message(outbox_id: int) -> ResponseReturnValue:
    """Open one dead letter's message for this response only (audited in the patient's name)."""
    state = app_state()
    actor, _ = await _actor()
    opened = await db.run_sync(
        state.store.connection,
        lambda conn: dead_letters.open_dead_letter_messages(
            conn,
            state.store.current_keyring,
            actor=actor,
            now=state.clock(),
            outbox_ids=[outbox_id],
        ),
    )
    if not opened:
        return await _page(notice="That dead letter is no longer there."), 404
    return await _page(opened=opened)


@bp.post("/failing/message")
@login_required(role=Role.ADMIN)
async def failing_message() -> ResponseReturnValue:
    """Open the last error of the oldest item the upstream keeps failing, for this response
    only (audited in the patient's name, as a dead letter's message)."""
    state = app_state()
    actor, _ = await _actor()

    def work(conn: sqlite3.Connection) -> str | None:
        return failing_items(conn).open_message(
            conn, state.store.current_keyring, actor=actor, now=state.clock()
        )

    message = await db.run_sync(state.store.connection, work)
    if message is None:
        return await _page(notice="No item is failing now."), 404
    return await _page(failing_message=message)


@bp.post("/dead-letters/<int:outbox_id>/resend")
@login_required(role=Role.ADMIN)
async def dead_letter_resend(outbox_id: int) -> ResponseReturnValue:
    """Send one dead letter again (a Patient takes its own along); back to the page."""
    return await _resend([outbox_id])


@bp.post("/dead-letters/resend")
@login_required(role=Role.ADMIN)
async def dead_letters_resend_all() -> ResponseReturnValue:
    """Send every dead letter again (those held for the review queue excepted)."""
    return await _resend(None)


async def _resend(outbox_ids: list[int] | None) -> ResponseReturnValue:
    state = app_state()
    actor, _ = await _actor()
    done = await db.run_sync(
        state.store.connection,
        lambda conn: dead_letters.resend_dead_letters(
            conn, actor=actor, now=state.clock(), outbox_ids=outbox_ids
        ),
    )
    if outbox_ids is not None and not done.resent:
        why = (
            "That update belongs to the review queue: it is decided there, not sent again "
            "from here."
            if done.in_review
            else "That dead letter is no longer there."
        )
        return await _page(notice=why), 409 if done.in_review else 404
    return redirect(url_for("sync.overview", resent=len(done.resent)), 303)


# -- the review queue -----------------------------------------------------------------------

# Server-owned or local-only parts of a resource: never a difference a nurse decides on.
_NOT_COMPARED = frozenset({"id", "meta", "text"})
_NOTICES = {
    "kept": "Kept the version made here; it is sent to the upstream again, checked against "
    "their current version.",
    "took": "Took the upstream's version; it replaces the one here (which stays in the "
    "record's history).",
}
_GONE = "That conflict was already decided or is gone."
_CHANGED = (
    "The EHR's copy changed while this page was open, so nothing was decided; look again: "
    "open the conflict to compare with their newest version."
)


@dataclass(frozen=True, slots=True)
class FieldRow:
    """One field of the compared versions (``None``: the version does not have it)."""

    path: str
    mine: str | None
    theirs: str | None

    @property
    def differs(self) -> bool:
        """The two versions disagree on this field."""
        return self.mine != self.theirs


def _flatten(value: Any, path: str, out: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(item, f"{path}.{key}" if path else str(key), out)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _flatten(item, f"{path}[{index}]", out)
    elif isinstance(value, bool):
        out[path] = "true" if value else "false"
    else:
        out[path] = str(value)


def compare(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[FieldRow]:
    """Both versions field by field (``name[0].family``), in the order they first appear."""
    flat_mine: dict[str, str] = {}
    flat_theirs: dict[str, str] = {}
    for key, value in mine.items():
        if key not in _NOT_COMPARED:
            _flatten(value, key, flat_mine)
    for key, value in theirs.items():
        if key not in _NOT_COMPARED:
            _flatten(value, key, flat_theirs)
    paths = list(dict.fromkeys([*flat_mine, *flat_theirs]))
    return [FieldRow(path, flat_mine.get(path), flat_theirs.get(path)) for path in paths]


async def _review_page(
    *, case: Any = None, rows: list[FieldRow] | None = None, notice: str | None = None
) -> str:
    state = app_state()
    queue = ReviewQueue(state.store)
    items: list[ReviewItem] = await queue.items()
    return await render_template(
        "sync_review.html",
        items=items,
        case=case,
        rows=rows or [],
        notice=notice,
        local=lambda text: _local_text(text, state.zone),
    )


def _local_text(text: str | None, zone: Any) -> str:
    if not text:
        return "–"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return text
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M")


@bp.get("/review")
@login_required(role=_VIEWERS)
async def review_list() -> ResponseReturnValue:
    """Open conflicts, oldest first (no PHI on this page until one is opened)."""
    return await _review_page(notice=_NOTICES.get(request.args.get("done", "")))


async def _review_access(review_id: int) -> str:
    """Why the current user may open a review item's two versions (its audit detail); 404
    when there is no such item.

    The access the user has to that patient (today's check-in, an enrolment, a break-glass
    grant) when there is one; else the review queue itself, named as such in the audit
    trail: deciding a sync conflict is work the queue gives nurses and admins, often the day
    after the visit, and the list shows no name or birth date to ask break-glass with.
    """
    state = app_state()
    try:
        item = await ReviewQueue(state.store).item(review_id)
    except ReviewError:
        abort(404)
    session = await current_session()
    assert session is not None  # login_required
    # Demographics are the only records edited here (store.UPDATABLE_TYPES): the Patient.
    access = await db.run_sync(
        state.store.connection,
        decide,
        session.user.id,
        item.logical_id,
        now=state.clock(),
        zone=state.zone,
    )
    if access is not None:
        return access.detail
    return f"review queue: deciding sync conflict {review_id}"


@bp.get("/review/<int:review_id>")
@login_required(role=_VIEWERS)
async def review_case(review_id: int) -> ResponseReturnValue:
    """Both versions of one conflict, field by field (audited as a read of the record)."""
    state = app_state()
    access = await _review_access(review_id)
    actor, _ = await _actor()
    try:
        case = await ReviewQueue(state.store).open(review_id, actor, access=access)
    except ReviewError:
        abort(404)
    return await _review_page(case=case, rows=compare(case.mine, case.theirs))


async def _shown_version() -> str | None:
    """The upstream version the decision form showed (empty: the review had none); a 400
    without it, since a decision is only ever made on the version the nurse compared."""
    shown = (await request.form).get("theirs_version")
    if shown is None:
        abort(400, "Which version: the form carries the upstream version the page showed.")
    return shown or None


@bp.post("/review/<int:review_id>/keep-mine")
@login_required(role=_VIEWERS)
async def review_keep_mine(review_id: int) -> ResponseReturnValue:
    """Keep the version made here: the update is queued again, checked against the upstream
    version the page showed (refused, 409, if the review holds a newer one by now)."""
    state = app_state()
    access = await _review_access(review_id)
    shown = await _shown_version()
    actor, _ = await _actor()
    try:
        await ReviewQueue(state.store).keep_mine(
            review_id, actor, access=access, theirs_version=shown
        )
    except ReviewChangedError:
        return await _review_page(notice=_CHANGED), 409
    except ReviewError:
        return await _review_page(notice=_GONE), 409
    return redirect(url_for("sync.review_list", done="kept"), 303)


@bp.post("/review/<int:review_id>/take-theirs")
@login_required(role=_VIEWERS)
async def review_take_theirs(review_id: int) -> ResponseReturnValue:
    """Take the upstream's version the page showed: it replaces the one here (refused, 409,
    if the review holds a newer one by now)."""
    state = app_state()
    access = await _review_access(review_id)
    shown = await _shown_version()
    actor, _ = await _actor()
    try:
        await ReviewQueue(state.store).take_theirs(
            review_id, actor, access=access, theirs_version=shown
        )
    except ReviewChangedError:
        return await _review_page(notice=_CHANGED), 409
    except ReviewNotTakenError:
        return await _review_page(
            notice="The upstream's version could not replace the one here (another change "
            "to this record is still waiting to go up, or the EHR's copy belongs to another "
            "record here), so nothing was decided. Look again later, or keep the version "
            "made here."
        ), 409
    except ReviewError:
        return await _review_page(notice=_GONE), 409
    except InvalidResourceError:
        return await _review_page(
            notice="The upstream's version is not valid FHIR, so it cannot replace the one "
            "here. Keep the version made here, or ask the EHR team to correct theirs."
        ), 422
    return redirect(url_for("sync.review_list", done="took"), 303)
