"""The provider view: a remote provider joins one visit by a signed, expiring link.

See ``docs/provider.md``. In short:

* A nurse (or admin) picks an arrived patient's Encounter at ``/visit/new`` and gets a link
  ``/visit/<token>`` (:mod:`appliance.visit_links`: only the token's SHA-256 is stored; 2 h;
  revocable). The provider has no staff account: the link is the credential for that visit.
* Opening the link shows a *Join* button; joining binds the link to that browser through a
  random cookie scoped to ``/visit`` (a mail scanner that fetches the link does not bind it).
  Another browser is refused. The cookie is ``SameSite=Lax``, not Strict: the provider opens
  the link from a mail or chat app, a cross-site navigation on which a Strict cookie is not
  sent, and the bound browser would be refused its own visit. Every form carries a CSRF
  token derived from the link and the browser, so Lax opens nothing to forgery.
* Unknown tokens are throttled per client address (:data:`GUESSES` per
  :data:`GUESS_WINDOW_S`, then 429 for every link from that address until the window passes).
* Everything is read and written as ``provider-link:<id>``, audited with the patient key.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, time
from typing import Any

from quart import Blueprint, Response, abort, current_app, redirect, request
from quart.typing import ResponseReturnValue
from werkzeug.wrappers import Response as WerkzeugResponse

from appliance import db, visit_links
from appliance.audit import AuditAction, AuditEvent, Outcome
from appliance.errors import NotFoundError
from appliance.users import Role
from appliance.visit_links import LinkState, VisitLink
from services import visits
from services.video import camera_streams
from web.app import AppState, app_state
from web.auth import current_session, login_required
from web.templating import render_template
from web.video_messages import video_messages

logger = logging.getLogger(__name__)

bp = Blueprint("provider", __name__, url_prefix="/visit")

GUESSES = 10  # unknown tokens per client address per window
GUESS_WINDOW_S = 10 * 60
LINK_CHECK_S = 2.0  # how often an open live feed re-checks that its link still works
_STAFF = (Role.NURSE, Role.ADMIN)
_REFUSED = {
    LinkState.EXPIRED: "This visit link has expired. Ask the clinic for a new one.",
    LinkState.REVOKED: "This visit link was withdrawn by the clinic.",
    LinkState.COMPLETED: "This visit has been completed. The link no longer opens it.",
}


@dataclass(slots=True)
class Guesses:
    """Unknown-token attempts per client address in a sliding window (the clock is a parameter)."""

    limit: int = GUESSES
    window_s: float = GUESS_WINDOW_S
    _seen: dict[str, deque[float]] = field(default_factory=dict)

    def _live(self, key: str, now: datetime) -> deque[float]:
        seen = self._seen.setdefault(key, deque())
        while seen and seen[0] <= now.timestamp() - self.window_s:
            seen.popleft()
        return seen

    def exceeded(self, key: str, now: datetime) -> bool:
        """Whether ``key`` has used up its attempts."""
        return len(self._live(key, now)) >= self.limit

    def failed(self, key: str, now: datetime) -> None:
        """Count one unknown token from ``key``."""
        if len(self._seen) > 10_000:
            self._seen.clear()  # bounded memory; limits restart, which only eases them
        self._live(key, now).append(now.timestamp())


@bp.record_once
def _setup(setup: Any) -> None:
    setup.app.extensions["provider"] = Guesses()


def _guesses() -> Guesses:
    found: Guesses = current_app.extensions["provider"]
    return found


def cookie_name(state: AppState) -> str:
    """The cookie binding a visit link to a browser (also read by web/video.py)."""
    # __Host- needs path "/"; this cookie is scoped to /visit, so the __Secure- prefix.
    return "__Secure-visit" if state.secure else "visit"


def form_token(state: AppState, link: VisitLink) -> str:
    """The CSRF token of the link's forms (``visit_csrf``): derived from the link and the
    browser it is bound to (also checked by web/video.py's camera routes)."""
    bound = (link.browser_hash or b"").hex()
    message = f"visit-form|{link.id}|{bound}".encode()
    return hmac.new(state.form_secret, message, hashlib.sha256).hexdigest()


def _patient_key(state: AppState, link: VisitLink) -> bytes:
    return state.store.patient_key(f"Patient/{link.patient_id}")


async def _audit(link: VisitLink, action: AuditAction, outcome: Outcome, detail: str) -> None:
    state = app_state()
    event = AuditEvent(
        link.actor,
        action,
        outcome=outcome,
        patient_key=_patient_key(state, link),
        entity=f"Encounter/{link.encounter_id}",
        detail=detail,
    )
    await state.store.transact(lambda _conn: None, [event])


async def _page(template: str, status: int = 200, **context: Any) -> Response:
    # A staff session in the same browser makes web.auth demand its CSRF token on every
    # POST; loading the session here lets the templates carry it beside the link's own.
    await current_session()
    body = await render_template(template, **context)
    return Response(body, status=status, mimetype="text/html")


async def _refusal(message: str, status: int) -> Response:
    return await _page("provider_refused.html", status=status, message=message)


class Refused(Exception):
    """A request the link does not allow; carries the page to answer with."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


@bp.errorhandler(Refused)
async def _refused(error: Refused) -> ResponseReturnValue:
    return error.response


async def _link_for(token: str, *, need_bound: bool = True) -> VisitLink:
    """The active link of ``token``, bound to this browser (else raises :class:`Refused`)."""
    state = app_state()
    now = state.clock()
    guesses, address = _guesses(), f"ip:{request.remote_addr}"
    if guesses.exceeded(address, now):
        raise Refused(await _refusal("Too many wrong links from this network. Wait a while.", 429))
    link = None
    if 20 <= len(token) <= 100:
        link = await db.run_sync(state.store.connection, visit_links.by_token, token)
    if link is None:
        guesses.failed(address, now)
        logger.info("unknown visit link token refused")
        raise Refused(await _refusal("This visit link is not valid.", 404))
    link_state = link.state(now)
    if link_state is not LinkState.ACTIVE:
        await _audit(link, AuditAction.READ, Outcome.DENIED, f"visit link {link_state.value}")
        raise Refused(await _refusal(_REFUSED[link_state], 410))
    if need_bound:
        browser = request.cookies.get(cookie_name(state), "")
        if link.browser_hash is None:
            raise Refused(Response(status=303, headers={"Location": f"/visit/{token}"}))
        if not browser or not hmac.compare_digest(
            visit_links.token_hash(browser), link.browser_hash
        ):
            await _audit(link, AuditAction.READ, Outcome.DENIED, "another browser refused")
            raise Refused(await _another_browser())
    return link


async def _another_browser() -> Response:
    return await _refusal(
        "This visit link is already open in another browser. Use that browser, or ask the "
        "clinic for a new link.",
        403,
    )


def check_form_token(state: AppState, link: VisitLink, sent: str) -> None:
    """403 unless ``sent`` is the link's form token."""
    if not hmac.compare_digest(sent.encode(), form_token(state, link).encode()):
        abort(403)


# -- the nurse side: issuing and revoking ---------------------------------------------------


async def _new_page(issued: tuple[VisitLink, str] | None = None, error: str | None = None) -> str:
    state = app_state()
    session = await current_session()
    assert session is not None  # login_required
    actor = session.user.actor
    local_midnight = datetime.combine(state.clock().astimezone(state.zone).date(), time())
    since = local_midnight.replace(tzinfo=state.zone)
    found = await visits.arrivals(state.store, actor, since)
    rows = []
    for arrival in found:
        try:
            patient = await state.store.read("Patient", arrival.patient_id, actor)
        except NotFoundError:
            continue
        rows.append(
            {
                "encounter_id": arrival.encounter_id,
                "name": visits.display_name(patient),
                "birth_date": str(patient.get("birthDate", "")),
                "arrived": _shown(state, arrival.arrived),
            }
        )
    recent = await db.run_sync(
        state.store.connection, visit_links.recent, now=state.clock(), limit=30
    )
    now = state.clock()
    links = [
        {
            "id": link.id,
            "state": link.state(now).value,
            "provider": link.provider_name,
            "issued": _shown(state, link.issued_at),
            "expires": _shown(state, link.expires_at),
            "bound": link.browser_hash is not None,
            "claim": link.claim_outcome or "",
        }
        for link in recent
    ]
    url = None
    if issued is not None:
        url = f"{state.config.web.public_url.rstrip('/')}/visit/{issued[1]}"
    return await render_template(
        "provider_new.html",
        arrivals=rows,
        links=links,
        issued_url=url,
        issued_id=None if issued is None else issued[0].id,
        ttl_hours=int(visit_links.LINK_TTL.total_seconds() // 3600),
        error=error,
    )


def _shown(state: AppState, utc_text: str) -> str:
    if not utc_text:
        return ""
    moment = datetime.fromisoformat(utc_text.replace("Z", "+00:00"))
    return moment.astimezone(state.zone).strftime("%Y-%m-%d %H:%M")


@bp.get("/new")
@login_required(role=_STAFF)
async def new() -> ResponseReturnValue:
    """Today's arrivals, to issue a provider link for one; the links issued lately."""
    return await _new_page()


@bp.post("/new")
@login_required(role=_STAFF)
async def issue() -> ResponseReturnValue:
    """Issue a link for one arrived Encounter; the link is shown once."""
    state = app_state()
    session = await current_session()
    assert session is not None
    form = await request.form
    encounter_id = form.get("encounter", "")
    local_midnight = datetime.combine(state.clock().astimezone(state.zone).date(), time())
    arrivals = await visits.arrivals(
        state.store, session.user.actor, local_midnight.replace(tzinfo=state.zone)
    )
    chosen = next((a for a in arrivals if a.encounter_id == encounter_id), None)
    if chosen is None:
        return await _new_page(error="Choose one of today's arrivals."), 400
    issued = await db.run_sync(
        state.store.connection,
        visit_links.issue,
        chosen.encounter_id,
        chosen.patient_id,
        issued_by=session.user.actor,
        patient_key=state.store.patient_key(f"Patient/{chosen.patient_id}"),
        now=state.clock(),
        provider_name=form.get("provider_name", ""),
    )
    return await _new_page(issued=issued)


@bp.post("/links/<int:link_id>/revoke")
@login_required(role=_STAFF)
async def revoke(link_id: int) -> ResponseReturnValue:
    """Withdraw a link: it stops working at once (an open page's live feed ends too, and its
    video connection leaves the visit within ``web.video.CREDENTIAL_CHECK_S``)."""
    state = app_state()
    session = await current_session()
    assert session is not None
    link = await db.run_sync(state.store.connection, visit_links.by_id, link_id)
    if link is None:
        abort(404)
    await db.run_sync(
        state.store.connection,
        visit_links.revoke,
        link_id,
        by=session.user.actor,
        patient_key=_patient_key(state, link),
        now=state.clock(),
    )
    return redirect("/visit/new", code=303)


# -- the provider side ------------------------------------------------------------------------


@bp.get("/<token>")
async def visit(token: str) -> ResponseReturnValue:
    """The visit page (after joining), or the *Join* page for a link not used yet."""
    state = app_state()
    link = await _link_for(token, need_bound=False)
    if link.browser_hash is None:
        await _audit(link, AuditAction.READ, Outcome.SUCCESS, "visit link opened, not joined")
        return await _page("provider_join.html", token=token, form_token=form_token(state, link))
    link = await _link_for(token)
    page = await _visit_page(token, link)
    await _audit(link, AuditAction.READ, Outcome.SUCCESS, "visit page")
    return page


async def _visit_page(
    token: str, link: VisitLink, status: int = 200, error: str | None = None, **form: str
) -> Response:
    """The visit page of ``link``; after a refused completion, with its ``error`` and the
    ``note`` and ``codes`` as typed."""
    state = app_state()
    shown = await visits.load_visit(state.store, link, state.zone, state.clock())
    return await _page(
        "provider_visit.html",
        status=status,
        token=token,
        link=link,
        visit=shown,
        zone=state.zone,
        shown=lambda text: _shown(state, text),
        form_token=form_token(state, link),
        cameras=[camera.name for camera in state.config.exam_cameras],
        showing=await camera_streams.showing(state.store, link.encounter_id),
        video_messages=video_messages(),
        note_max=visits.NOTE_MAX_BYTES,
        error=error,
        note=form.get("note", ""),
        codes=form.get("codes", ""),
    )


@bp.post("/<token>/join")
async def join(token: str) -> ResponseReturnValue:
    """Bind the link to this browser (the first one only) and open the visit."""
    state = app_state()
    link = await _link_for(token, need_bound=False)
    check_form_token(state, link, (await request.form).get("visit_csrf", ""))
    browser = request.cookies.get(cookie_name(state), "")
    if len(browser) < 32:
        browser = secrets.token_urlsafe(32)
    won = await db.run_sync(
        state.store.connection,
        visit_links.bind,
        link,
        visit_links.token_hash(browser),
        patient_key=_patient_key(state, link),
        now=state.clock(),
    )
    if not won:
        return await _another_browser()
    response: WerkzeugResponse = redirect(f"/visit/{token}", code=303)
    response.set_cookie(
        cookie_name(state),
        browser,
        max_age=int(visit_links.LINK_TTL.total_seconds()),
        path="/visit",
        secure=state.secure,
        httponly=True,
        samesite="Lax",
    )
    return response


@bp.get("/<token>/photos/<media_id>")
async def photo(token: str, media_id: str) -> ResponseReturnValue:
    """One of the patient's photos, decrypted, shown inline and never cached."""
    state = app_state()
    link = await _link_for(token)
    try:
        found = await visits.photo(state.store, link, media_id)
    except NotFoundError:
        found = None
    if found is None:
        await _audit(link, AuditAction.READ, Outcome.DENIED, "photo not of this patient")
        abort(404)
    data, kind = found
    response = Response(data, mimetype=kind)
    response.headers["Content-Disposition"] = 'inline; filename="photo"'
    return response


@bp.get("/<token>/events")
async def events(token: str) -> ResponseReturnValue:
    """Server-Sent Events: this visit's readings as they are stored, and nobody else's."""
    state = app_state()
    link = await _link_for(token)
    encounter = await state.store.read("Encounter", link.encounter_id, link.actor)
    started = await visits.visit_start(state.store, link, encounter)
    response = Response(_feed(state, link, started), mimetype="text/event-stream")
    response.headers["X-Accel-Buffering"] = "no"
    response.timeout = None
    return response


async def _feed(state: AppState, link: VisitLink, started: str) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    sent: set[str] = set()
    after = -1
    next_check = loop.time() + LINK_CHECK_S
    yield b"retry: 3000\n\n"
    while True:
        if loop.time() >= next_check:
            next_check = loop.time() + LINK_CHECK_S
            current = await db.run_sync(state.store.connection, visit_links.by_id, link.id)
            if current is None or current.state(state.clock()) is not LinkState.ACTIVE:
                yield b"event: ended\ndata: {}\n\n"
                return
        newest = await state.changes.tick()  # one poll per interval for all streams
        if newest != after:
            after = newest
            for reading in await visits.readings_since(state.store, link, started):
                if reading.id not in sent:
                    sent.add(reading.id)
                    data = json.dumps(reading.to_event(state.zone), separators=(",", ":"))
                    yield f"event: reading\ndata: {data}\n\n".encode()


@bp.post("/<token>/complete")
async def complete(token: str) -> ResponseReturnValue:
    """Store the note and diagnoses, finish the Encounter, decide the claim; the link ends."""
    state = app_state()
    link = await _link_for(token)
    form = await request.form
    check_form_token(state, link, form.get("visit_csrf", ""))
    note, codes = form.get("note", ""), form.get("codes", "")
    try:
        done = await visits.complete(state.store, state.config, link, note, codes, state.clock())
    except visits.AlreadyEnded:
        return await _refusal(_REFUSED[LinkState.COMPLETED], 410)
    except visits.VisitError as error:
        return await _visit_page(token, link, 400, str(error), note=note, codes=codes)
    logger.info("visit link %s completed; claim %s", link.id, done.claim_outcome)
    return await _page("provider_done.html", done=done)
