"""The claims queue for nurses and billers (issue 8): Q3014 claims, their states and answers.

``GET /claims/`` lists claims with filters (status, service date range, payer): status in
words, our check problems, the clearinghouse's 999/277CA messages and the 835's amounts in
plain words. ``GET /claims/<id>`` shows one claim with its event history. Nothing here
decrypts a claim or a chart: the ``claims`` tables hold no PHI (docs/adr/0006-claims.md), so
viewing needs no audit record; every action on a claim is a state move recorded in
``claim_events`` with the user as actor.

The queue also lists the clearinghouse's response files the poll could not apply (an 835
out of balance, a malformed 999: :meth:`Lifecycle.unreadable_responses`): their id at the
clearinghouse, kind, what is wrong and when, never the file. ``POST
/claims/unreadable-responses/clear`` takes the entries the page showed off the list (an
admin; audited).

Roles: the users module has nurse, provider and admin only, so nurses and admins see the
queue and may mark a checked draft ready (a biller's review); cancelling, resolving a claim
in review, overriding the one-per-day rule and clearing the list of response files are
decisions for an admin.
"""

from __future__ import annotations

from datetime import date

from quart import Blueprint, abort, redirect, request, url_for
from quart.typing import ResponseReturnValue

from appliance.errors import ApplianceError, NotFoundError
from appliance.numbers import small_int
from appliance.users import Role
from services.claims.lifecycle import Lifecycle
from services.claims.model import ClaimStatus, DecisionOutcome, money
from services.claims.service import ClaimsService
from web.app import app_state
from web.auth import current_session, login_required
from web.templating import render_template

bp = Blueprint("claims", __name__, url_prefix="/claims")

_VIEWERS = (Role.NURSE, Role.ADMIN)
STATUS_WORDS = {
    "draft": "Draft: waiting for review or a fix",
    "ready": "Ready: will be sent at the next sync",
    "sending": "Sending: waiting for the clearinghouse's answer",
    "submitted": "Submitted: the clearinghouse has it",
    "in_review": "In review: the answer was lost; confirm with the clearinghouse",
    "acknowledged": "Acknowledged (999): the file was readable",
    "accepted": "Accepted (277CA): the payer took it for adjudication",
    "rejected": "Rejected: correct it and resubmit",
    "paid": "Paid (835)",
    "denied": "Denied (835)",
    "cancelled": "Cancelled",
}


def _services() -> tuple[ClaimsService, Lifecycle]:
    state = app_state()
    service = ClaimsService(state.store, state.config)
    return service, Lifecycle(service, state.store)


async def _user() -> tuple[str, bool]:
    session = await current_session()
    assert session is not None  # login_required
    return session.user.actor, session.user.role is Role.ADMIN


def _day(text: str | None) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        abort(400)


async def _queue(notice: str | None = None, error: str | None = None) -> str:
    service, life = _services()
    args = request.args
    wanted = [s for s in args.getlist("status") if s]
    try:
        statuses = [ClaimStatus(s) for s in wanted]
    except ValueError:
        abort(400)
    since, until = _day(args.get("since")), _day(args.get("until"))
    payer = args.get("payer") or None
    rows = await life.search(statuses, since, until, payer)
    ids = [r.id for r in rows]
    messages = await life.messages(ids)
    payments = await life.payments(ids)
    duplicates = await service.decisions(DecisionOutcome.DUPLICATE)
    unreadable = await life.unreadable_responses()
    _, is_admin = await _user()
    return await render_template(
        "claims.html",
        rows=rows,
        messages=messages,
        payments=payments,
        duplicates=duplicates,
        unreadable=unreadable,
        statuses=[s.value for s in ClaimStatus],
        wanted=wanted,
        since=args.get("since", ""),
        until=args.get("until", ""),
        payer=payer or "",
        payers=app_state().config.claims.payers,
        words=STATUS_WORDS,
        money=money,
        is_admin=is_admin,
        notice=notice,
        error=error,
    )


@bp.get("/")
@login_required(role=_VIEWERS)
async def queue() -> ResponseReturnValue:
    """The claims queue with its filters."""
    cleared = small_int(request.args.get("cleared", ""))
    notice = None
    if cleared is not None:
        notice = (
            f"{cleared} response file{'' if cleared == 1 else 's'} taken off the list (in the "
            "audit trail under your name)."
            if cleared
            else "Nothing was taken off the list."
        )
    return await _queue(notice=notice)


@bp.get("/<int:claim_id>")
@login_required(role=_VIEWERS)
async def detail(claim_id: int) -> ResponseReturnValue:
    """One claim: state, problems, answers, amounts, and every event."""
    return await _detail(claim_id)


async def _detail(claim_id: int, notice: str | None = None, error: str | None = None) -> str:
    service, life = _services()
    try:
        row = await service.claim(claim_id)
    except NotFoundError:
        abort(404)
    _, is_admin = await _user()
    return await render_template(
        "claims_detail.html",
        row=row,
        history=await life.history(claim_id),
        payment=(await life.payments([claim_id])).get(claim_id),
        words=STATUS_WORDS,
        money=money,
        is_admin=is_admin,
        notice=notice,
        error=error,
    )


async def _act(claim_id: int, action: str) -> ResponseReturnValue:
    service, life = _services()
    actor, is_admin = await _user()
    form = await request.form
    reason = (form.get("reason") or "").strip()
    try:
        if action == "ready":
            await service.transition(claim_id, ClaimStatus.READY, actor, "reviewed in the queue")
        elif not is_admin:
            abort(403)
        elif action == "cancel":
            if len(reason) < 10:
                raise ApplianceError("give a reason of at least 10 characters to cancel")
            await service.transition(claim_id, ClaimStatus.CANCELLED, actor, f"cancelled: {reason}")
        elif action == "resolve":
            await life.resolve(claim_id, form.get("as", ""), reason, actor)
    except NotFoundError:
        abort(404)
    except ApplianceError as exc:
        return await _detail(claim_id, error=str(exc)), 409
    return redirect(url_for("claims.detail", claim_id=claim_id), 303)


@bp.post("/<int:claim_id>/ready")
@login_required(role=_VIEWERS)
async def mark_ready(claim_id: int) -> ResponseReturnValue:
    """A biller's review is done: the checked draft may be sent."""
    return await _act(claim_id, "ready")


@bp.post("/<int:claim_id>/cancel")
@login_required(role=Role.ADMIN)
async def cancel(claim_id: int) -> ResponseReturnValue:
    """Cancel a claim that was not sent (with a reason)."""
    return await _act(claim_id, "cancel")


@bp.post("/<int:claim_id>/resolve")
@login_required(role=Role.ADMIN)
async def resolve(claim_id: int) -> ResponseReturnValue:
    """Settle a claim in review: acknowledged (they have it) or ready (it never arrived)."""
    return await _act(claim_id, "resolve")


@bp.post("/override")
@login_required(role=Role.ADMIN)
async def override() -> ResponseReturnValue:
    """Draft a second Q3014 for a patient's day, with a reason (audited)."""
    service, _ = _services()
    actor, _ = await _user()
    form = await request.form
    try:
        decided = await service.override_duplicate(
            form.get("encounter_id", ""), form.get("reason", ""), actor
        )
    except ApplianceError as exc:
        return await _queue(error=str(exc)), 409
    return redirect(url_for("claims.detail", claim_id=decided.claim_id or 0), 303)


@bp.post("/unreadable-responses/clear")
@login_required(role=Role.ADMIN)
async def clear_unreadable() -> ResponseReturnValue:
    """Take the response files the page showed off the list once dealt with (audited).

    The form carries the digest of each entry shown: one the poll noted since stays.
    """
    _, life = _services()
    actor, _ = await _user()
    seen = (await request.form).getlist("seen")
    cleared = await life.clear_unreadable_responses(actor, seen=set(seen))
    return redirect(url_for("claims.queue", cleared=cleared), 303)
