"""Remote patient monitoring: the nurse's worklist of alerts, quiet patients and billing risk.

* ``GET /rpm/`` — three lists, most urgent first: the live alerts (by severity, then the one
  waiting longest; each with its patient, rule, values, since when, where the reading was
  taken and its state: open, acknowledged, snoozed or escalated), then **quiet patients**
  (enrolled, no reading for their no-data threshold), then patients **at risk** of missing the
  16 days of home readings that 99454 needs this period (``services/rpm_billing.py``).
  ``?setting=home`` or ``?setting=clinic`` narrows the alerts to readings taken there.
* ``POST /rpm/alerts/<id>/acknowledge|snooze|resolve`` — the nurse's actions (CSRF-checked by
  ``web.auth``); each redirects back with a fixed message, or answers a 4xx page saying what
  is wrong (no such alert 404, already resolved 409, a missing note or duration 400).
  Providers — where alerts escalate — see the worklist and acknowledge; snoozing and
  resolving are the nurses' and admins'.
* ``GET /rpm/events`` — Server-Sent Events: an ``alert`` event whenever an alert is opened,
  raised, acknowledged, snoozed, escalated, un-snoozed or resolved, which ``static/rpm.js``
  applies to the open table (textContent only).

The stream follows ``web/nurse.py``: the store is the bus; it polls the newest
``alert_events`` id (a single-index look-up, no PHI) and only then opens the changed alerts
through :meth:`AlertBook.views`, audited under the nurse's name, as is every read here. The
event id is the ``alert_events`` id, so a reconnecting browser's ``Last-Event-ID`` replays
what it missed. The session is re-checked without touching it (automatic logoff).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from quart import Blueprint, Response, redirect, request, url_for
from quart.typing import ResponseReturnValue

from appliance.errors import ApplianceError, NotFoundError, TamperedDataError
from appliance.numbers import ROW_ID_DIGITS, small_int
from appliance.users import Role
from services import alerts, rpm_rules
from services.alerts import AlertBook, AlertError, AlertState, AlertView
from services.rpm_billing import RpmBilling
from services.rpm_enrollment import Enrollments
from web.app import AppState, app_state
from web.auth import current_session, login_required, session_alive, session_token
from web.nurse import display_name
from web.templating import render_template

bp = Blueprint("rpm", __name__, url_prefix="/rpm")

# Providers are where alerts escalate to: they see the worklist and acknowledge ("I am on
# it"); snoozing and resolving stay with the nurses (and admins) who run the program.
_VIEWERS = (Role.NURSE, Role.ADMIN, Role.PROVIDER)
_MANAGERS = (Role.NURSE, Role.ADMIN)
KEEPALIVE_S = 15.0
MAX_REPLAY_EVENTS = 1000  # how far back a reconnecting browser may ask to be replayed
FEED_BATCH = 200
SETTINGS = ("home", "clinic")
# The snooze lengths offered (form value → duration); AlertBook allows up to a week.
SNOOZE_CHOICES: Mapping[str, tuple[timedelta, str]] = {
    "15m": (timedelta(minutes=15), "15 minutes"),
    "1h": (timedelta(hours=1), "1 hour"),
    "4h": (timedelta(hours=4), "4 hours"),
    "24h": (timedelta(hours=24), "24 hours"),
}
# What the page says after an action: fixed sentences chosen by a code, never reflected text.
MESSAGES = {
    "acknowledged": "Alert acknowledged. It will not escalate while someone is on it.",
    "snoozed": "Alert snoozed. It comes back on the list when the snooze ends.",
    "resolved": "Alert resolved. Your note is saved with it.",
}
SEVERITY_LABELS = {
    rpm_rules.Severity.CRITICAL: "Critical",
    rpm_rules.Severity.HIGH: "High",
    rpm_rules.Severity.MEDIUM: "Medium",
    rpm_rules.Severity.LOW: "Low",
    rpm_rules.Severity.NONE: "None",
}
SITE_NAME = "Whole site"


class _Refused(Exception):
    """An action the worklist answers with a 4xx page (status and a fixed sentence)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _BadInput(AlertError):
    """A form value the action cannot take (a fixed sentence for the person)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _shown(moment: datetime | None, zone: ZoneInfo) -> str:
    return "" if moment is None else moment.astimezone(zone).strftime("%Y-%m-%d %H:%M")


def _when(moment: datetime | None, zone: ZoneInfo, now: datetime) -> str:
    """A time short enough for a narrow column: ``21:02`` today, else ``11-25 21:02``."""
    if moment is None:
        return ""
    local, today = moment.astimezone(zone), now.astimezone(zone)
    if local.date() == today.date():
        return local.strftime("%H:%M")
    return local.strftime("%m-%d %H:%M" if local.year == today.year else "%Y-%m-%d %H:%M")


def age_text(delta: timedelta) -> str:
    """``just now``, ``12 min``, ``3 h 5 min``, ``2 d 4 h`` — how long something has waited."""
    minutes = max(0, int(delta.total_seconds() // 60))
    if minutes < 1:
        return "just now"
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def rule_title(key: str) -> str:
    """The rule's name for people; ``device-silent:<device>`` names the device too."""
    rule, _, scope = key.partition(":")
    try:
        title = rpm_rules.RULE_TITLES[rpm_rules.Rule(rule)]
    except ValueError:
        return key
    return f"{title} ({scope})" if scope else title


@dataclass(frozen=True, slots=True)
class AlertRow:
    """One live alert as the worklist and its stream show it."""

    id: int
    patient_id: str
    patient_name: str
    rule: str
    title: str
    severity: str
    severity_label: str
    rank: int
    summary: str
    values: str
    setting: str | None
    taken_at: str  # site time of the reading that raised it, short ("" without one)
    opened_at: str  # ISO, for ordering live rows
    since: str  # site wall clock
    age: str
    state: str  # open, acknowledged, snoozed, escalated, resolved
    state_label: str
    live: bool

    @property
    def site(self) -> bool:
        """A site-level alert (a sync backlog): about the appliance, not a patient."""
        return self.patient_id == alerts.SITE

    def to_event(self) -> dict[str, Any]:
        """The JSON body of an ``alert`` event."""
        return {
            "id": self.id,
            "patient_id": self.patient_id,
            "patient_name": self.patient_name,
            "patient_url": self.patient_url,
            "site": self.site,
            "rule": self.rule,
            "title": self.title,
            "severity": self.severity,
            "severity_label": self.severity_label,
            "rank": self.rank,
            "summary": self.summary,
            "values": self.values,
            "setting": self.setting,
            "taken_at": self.taken_at,
            "opened_at": self.opened_at,
            "since": self.since,
            "age": self.age,
            "state": self.state,
            "state_label": self.state_label,
            "live": self.live,
        }

    @property
    def patient_url(self) -> str | None:
        """The patient's chart page (none for a site-level alert)."""
        return None if self.site else f"/rpm/patients/{self.patient_id}"


def alert_row(view: AlertView, names: Mapping[str, str], zone: ZoneInfo, now: datetime) -> AlertRow:
    """What a person sees of an alert (PHI: the name and values come from audited reads)."""
    a = view.alert
    if view.escalated:
        state = "escalated"
        label = f"Escalated to {a.escalated_to or 'another role'} at {_shown(a.escalated_at, zone)}"
    elif a.state is AlertState.SNOOZED:
        state, label = "snoozed", f"Snoozed until {_shown(a.snoozed_until, zone)}"
    elif a.state is AlertState.ACKNOWLEDGED:
        who = (a.acked_by or "").removeprefix("user:")
        state, label = "acknowledged", f"Acknowledged by {who} at {_shown(a.acked_at, zone)}"
    elif a.state is AlertState.RESOLVED:
        state, label = "resolved", f"Resolved at {_shown(a.resolved_at, zone)}"
    else:
        state, label = "open", "Open: nobody on it yet"
    if a.patient_id == alerts.SITE:
        name = SITE_NAME
    else:
        name = names.get(a.patient_id, "(patient not on this appliance)")
    return AlertRow(
        id=a.id,
        patient_id=a.patient_id,
        patient_name=name,
        rule=a.rule,
        title=rule_title(a.rule),
        severity=a.severity.value,
        severity_label=SEVERITY_LABELS.get(a.severity, a.severity.value),
        rank=a.severity.rank,
        summary=view.summary,
        values=rpm_rules.describe_values(view.values),
        setting=view.setting,
        taken_at=_when(a.trigger_at, zone, now),
        opened_at=a.opened_at.isoformat(),
        since=_shown(a.opened_at, zone),
        age=age_text(now - a.opened_at),
        state=state,
        state_label=label,
        live=a.live,
    )


@dataclass(frozen=True, slots=True)
class QuietRow:
    """An enrolled patient with no reading for their no-data threshold."""

    patient_id: str
    name: str
    program: str
    last_reading: str  # site wall clock, or "never"
    quiet_for: str
    threshold_days: str
    seconds: float  # for ordering: longest quiet first


@dataclass(frozen=True, slots=True)
class AtRiskRow:
    """An enrolled patient whose period can no longer reach the 16 days 99454 needs."""

    patient_id: str
    name: str
    program: str
    days: int
    period: str
    days_left: int
    best: int  # the most days the period can still reach


async def _actor() -> str:
    session = await current_session()
    assert session is not None  # login_required
    return session.user.actor


async def _names(actor: str) -> dict[str, str]:
    """Every local patient's display name (one audited search, as the nurse screen does)."""
    return {str(p["id"]): display_name(p) for p in await app_state().store.patients(actor)}


async def _quiet(actor: str, names: Mapping[str, str], now: datetime) -> list[QuietRow]:
    state = app_state()
    enrolled = await Enrollments(state.store).enrolled(actor)
    last = await alerts.last_readings(state.store, [e.patient_id for e in enrolled], actor)
    site = rpm_rules.site_defaults(
        quiet_days=state.config.rpm.quiet_days,
        device_silent_hours=state.config.rpm.device_silent_hours,
    )
    rows = []
    for enrollment in enrolled:
        try:
            thresholds = enrollment.thresholds(site)
        except rpm_rules.ThresholdError:
            thresholds = rpm_rules.thresholds_for(
                enrollment.program, chronic_lung_disease=enrollment.chronic_lung_disease, site=site
            )
        newest = last.get(enrollment.patient_id)
        finding = rpm_rules.quiet_patient(
            enrollment.patient_id, newest, enrollment.enrolled_at, thresholds, now
        )
        if finding is None or finding.in_range:
            continue
        since = enrollment.enrolled_at if newest is None else max(newest, enrollment.enrolled_at)
        days = thresholds.value(rpm_rules.Rule.NO_DATA, "days")
        rows.append(
            QuietRow(
                patient_id=enrollment.patient_id,
                name=names.get(enrollment.patient_id, "(patient not on this appliance)"),
                program=rpm_rules.PROGRAM_TITLES[enrollment.program],
                last_reading="never" if newest is None else _shown(newest, state.zone),
                quiet_for=age_text(now - since),
                threshold_days=f"{float(days):g}",
                seconds=(now - since).total_seconds(),
            )
        )
    return sorted(rows, key=lambda r: (-r.seconds, r.name))


async def _at_risk(actor: str, names: Mapping[str, str]) -> list[AtRiskRow]:
    state = app_state()
    billing = RpmBilling(state.store, state.zone)
    today = billing.today()
    rows = []
    for item in await billing.billing(actor=actor, requested_by=actor):
        if not item.at_risk:
            continue
        left = (item.period.end - today).days + (0 if today in item.days else 1)
        rows.append(
            AtRiskRow(
                patient_id=item.patient_id,
                name=names.get(item.patient_id, "(patient not on this appliance)"),
                program=_program_title(item.program),
                days=len(item.days),
                period=f"{item.period.start.isoformat()} to {item.period.end.isoformat()}",
                days_left=max(0, left),
                best=len(item.days) + max(0, left),
            )
        )
    return sorted(rows, key=lambda r: (r.best, r.name))


def _program_title(program: str) -> str:
    try:
        return rpm_rules.PROGRAM_TITLES[rpm_rules.Program(program)]
    except ValueError:
        return program


def _setting_filter(value: str | None) -> str | None:
    return value if value in SETTINGS else None


@bp.get("/")
@login_required(role=_VIEWERS)
async def worklist() -> ResponseReturnValue:
    """Live alerts, then quiet patients, then patients at risk of missing 99454."""
    state = app_state()
    session = await current_session()
    assert session is not None  # login_required
    actor = session.user.actor
    now = state.clock()
    setting = _setting_filter(request.args.get("setting"))
    names = await _names(actor)
    views = await AlertBook(state.store, clock=state.clock).views(actor)
    rows = [alert_row(v, names, state.zone, now) for v in views]
    shown = [r for r in rows if setting is None or r.setting == setting]
    done = request.args.get("done", "")
    return await render_template(
        "rpm_worklist.html",
        alerts=shown,
        hidden=len(rows) - len(shown),
        quiet=await _quiet(actor, names, now),
        at_risk=await _at_risk(actor, names),
        setting=setting or "",
        settings=SETTINGS,
        snooze_choices=[(k, label) for k, (_d, label) in SNOOZE_CHOICES.items()],
        message=MESSAGES.get(done),
        max_note=alerts.MAX_NOTE,
        can_manage=session.user.role in _MANAGERS,
    )


async def _refused(error: _Refused) -> ResponseReturnValue:
    page = await render_template(
        "rpm_worklist_error.html", status=error.status, message=error.message
    )
    return page, error.status


Action = Callable[[AlertBook, str, Mapping[str, str]], Awaitable[None]]


async def _act(alert_id: int, done: str, work: Action) -> ResponseReturnValue:
    """Check the alert is there and live, run the action, redirect back with its message."""
    state = app_state()
    actor = await _actor()
    form = await request.form
    setting = _setting_filter(form.get("setting"))
    book = AlertBook(state.store, clock=state.clock)
    try:
        try:
            alert = await book.get(alert_id, actor)
        except NotFoundError:
            raise _Refused(404, "There is no alert with this number.") from None
        if not alert.live:
            raise _Refused(
                409, "This alert is already resolved. The worklist shows what is still open."
            )
        try:
            await work(book, actor, form)
        except AlertError as exc:
            if isinstance(exc, _BadInput):
                raise _Refused(400, exc.message) from None
            raise _Refused(
                409,
                "This alert changed meanwhile (resolved or cleared). Reload the worklist.",
            ) from None
    except _Refused as refused:
        return await _refused(refused)
    except ApplianceError:
        return await _refused(_Refused(503, "The change could not be saved. Try again."))
    if setting:
        return redirect(url_for("rpm.worklist", done=done, setting=setting))
    return redirect(url_for("rpm.worklist", done=done))


@bp.post("/alerts/<int:alert_id>/acknowledge")
@login_required(role=_VIEWERS)
async def acknowledge(alert_id: int) -> ResponseReturnValue:
    """Someone is on it: no escalation; a snooze ends."""

    async def work(book: AlertBook, actor: str, _form: Mapping[str, str]) -> None:
        await book.acknowledge(alert_id, actor)

    return await _act(alert_id, "acknowledged", work)


@bp.post("/alerts/<int:alert_id>/snooze")
@login_required(role=_MANAGERS)
async def snooze(alert_id: int) -> ResponseReturnValue:
    """Quiet an alert for a chosen time; it opens again when the snooze ends."""

    async def work(book: AlertBook, actor: str, form: Mapping[str, str]) -> None:
        choice = SNOOZE_CHOICES.get(form.get("duration", ""))
        if choice is None:
            raise _BadInput("Choose how long to snooze the alert.")
        await book.snooze(alert_id, app_state().clock() + choice[0], actor)

    return await _act(alert_id, "snoozed", work)


@bp.post("/alerts/<int:alert_id>/resolve")
@login_required(role=_MANAGERS)
async def resolve(alert_id: int) -> ResponseReturnValue:
    """Close an alert with a note saying what was done (required)."""

    async def work(book: AlertBook, actor: str, form: Mapping[str, str]) -> None:
        note = form.get("note", "").strip()
        if not note:
            raise _BadInput("Write a note saying what was done before resolving the alert.")
        if len(note) > alerts.MAX_NOTE:
            raise _BadInput(f"The note is longer than {alerts.MAX_NOTE} characters.")
        await book.resolve(alert_id, note, actor)

    return await _act(alert_id, "resolved", work)


# -- the live stream ------------------------------------------------------------------------


@bp.get("/events")
@login_required(role=_VIEWERS)
async def events() -> ResponseReturnValue:
    """Server-Sent Events: ``alert`` events as alerts open, worsen and change state."""
    state = app_state()
    session = await current_session()
    token = session_token()
    assert session is not None  # login_required
    assert token is not None
    book = AlertBook(state.store, clock=state.clock)
    newest = await book.last_event_id()
    start = newest
    asked = request.headers.get("Last-Event-ID", "").strip()
    replay_from = small_int(asked, ROW_ID_DIGITS)
    if replay_from is not None:
        start = min(newest, max(replay_from, newest - MAX_REPLAY_EVENTS))
    # The stream outlives the request context: it gets everything it needs now.
    body = _feed(state, book, session.user.actor, token, start)
    response = Response(body, mimetype="text/event-stream")
    response.headers["X-Accel-Buffering"] = "no"
    response.timeout = None
    return response


async def _names_of(
    state: AppState, actor: str, patient_ids: Iterable[str], known: dict[str, str]
) -> None:
    """Add the names of patients this stream has not named yet (each an audited read)."""
    for patient_id in patient_ids:
        if patient_id in known or patient_id == alerts.SITE:
            continue
        try:
            known[patient_id] = display_name(await state.store.read("Patient", patient_id, actor))
        except NotFoundError:
            known[patient_id] = "(patient not on this appliance)"
        except TamperedDataError:
            known[patient_id] = "(patient record unreadable)"  # logged by the store


async def _feed(
    state: AppState, book: AlertBook, actor: str, token: str, after: int
) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    session_check_s = min(5.0, 20 * state.sse_poll_s)
    next_keepalive = loop.time() + KEEPALIVE_S
    next_session_check = loop.time() + session_check_s
    names: dict[str, str] = {}
    yield b"retry: 3000\n\n"
    while True:
        if loop.time() >= next_session_check:
            next_session_check = loop.time() + session_check_s
            if not await session_alive(state, token):
                yield b"event: expired\ndata: {}\n\n"
                return
        while after < await book.last_event_id():
            changed = await book.changed_since(after, FEED_BATCH)
            if not changed:
                break
            views = {
                v.alert.id: v for v in await book.views(actor, alert_ids=[a for a, _ in changed])
            }
            await _names_of(state, actor, (v.alert.patient_id for v in views.values()), names)
            now = state.clock()
            for alert_id, event_id in changed:
                view = views.get(alert_id)
                if view is not None:
                    row = alert_row(view, names, state.zone, now)
                    data = json.dumps(row.to_event(), separators=(",", ":"))
                    yield f"id: {event_id}\nevent: alert\ndata: {data}\n\n".encode()
                    next_keepalive = loop.time() + KEEPALIVE_S
            after = changed[-1][1]
        if loop.time() >= next_keepalive:
            next_keepalive = loop.time() + KEEPALIVE_S
            yield b": keepalive\n\n"
        await asyncio.sleep(state.sse_poll_s)
