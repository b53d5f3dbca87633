"""Stations, devices and held readings: where a nurse makes sure readings reach the right chart.

* ``GET /devices/`` — each station and who is checked in there (check in / check out), every
  registered device with what it last reported and its link state from the devices process;
  admins register, assign and retire devices here (pairing: a device is registered by its
  address, or matched by the service it advertises).
* ``GET /devices/held`` — readings no patient could be given with certainty, with their values
  (each opened with an audited read), to file into a chart or set aside with a reason.

Every change goes through :class:`~appliance.device_registry.DeviceRegistry`, which audits it
under the signed-in user. Errors re-render the page with a message (no reflected text).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from quart import Blueprint, redirect, request, url_for
from quart.typing import ResponseReturnValue

from appliance.device_registry import (
    DeviceRegistry,
    RegistryError,
    Setting,
    StationKind,
    Transport,
)
from appliance.errors import ApplianceError, NotFoundError, TamperedDataError
from appliance.users import Role
from web.app import app_state
from web.auth import current_session, login_required
from web.nurse import display_name
from web.templating import render_template

logger = logging.getLogger(__name__)
# What the held-readings page shows for values whose sealed copy fails authentication.
UNREADABLE_VALUES = "(the stored values failed authentication: discard it)"

bp = Blueprint("devices", __name__, url_prefix="/devices")

_STAFF = (Role.NURSE, Role.ADMIN)
_FORM_ID_MAX = 64


@dataclass(frozen=True, slots=True)
class HeldView:
    """A held reading with its values, as the page shows it."""

    id: int
    received: str
    device: str
    station: str
    reason: str
    values: tuple[str, ...]
    taken: str | None


def _registry() -> DeviceRegistry:
    return DeviceRegistry(app_state().store)


async def _actor() -> str:
    session = await current_session()
    assert session is not None  # login_required
    return session.user.actor


def _quantity(node: Mapping[str, Any]) -> str:
    quantity = node.get("valueQuantity")
    if isinstance(quantity, Mapping) and "value" in quantity:
        return f"{quantity['value']:g} {quantity.get('code') or quantity.get('unit') or ''}".strip()
    if "dataAbsentReason" in node:
        return "not measured"
    return "?"


# Short names a nurse reads at a glance (LOINC's long names are for machines).
SHORT_NAMES = {
    "85354-9": "Blood pressure",
    "8867-4": "Heart rate",
    "59408-5": "SpO2",
    "2708-6": "SpO2",
    "8310-5": "Temperature",
    "29463-7": "Weight",
    "8302-2": "Height",
    "39156-5": "BMI",
    "41982-0": "Body fat",
    "41653-7": "Glucose",
    "14743-9": "Glucose",
    "2339-0": "Glucose",
    "15074-8": "Glucose",
}


def describe_observation(observation: Mapping[str, Any]) -> str:
    """``Blood pressure: 128/82 mm[Hg]``, ``Heart rate: 72 /min`` — for a person to check."""
    code = observation.get("code")
    codings = code.get("coding", []) if isinstance(code, Mapping) else []
    first = codings[0].get("code") if codings and isinstance(codings[0], Mapping) else None
    name = SHORT_NAMES.get(str(first)) or (code.get("text") if isinstance(code, Mapping) else None)
    components = [c for c in observation.get("component", []) if isinstance(c, Mapping)]
    if components:
        values = [_quantity(c) for c in components]
        units = {v.split(" ", 1)[1] for v in values if " " in v}
        if len(units) == 1:
            unit = units.pop()
            value = "/".join(v.split(" ", 1)[0] for v in values) + f" {unit}"
        else:
            value = ", ".join(values)
    else:
        value = _quantity(observation)
    return f"{name or 'Observation'}: {value}"


async def _patients(actor: str) -> list[tuple[str, str]]:
    patients = await app_state().store.patients(actor)
    return sorted(
        ((str(p["id"]), f"{display_name(p)} ({p.get('birthDate', '')})") for p in patients),
        key=lambda pair: pair[1],
    )


async def _link_states() -> dict[str, Any]:
    rows = await app_state().store.query("SELECT status FROM heartbeats WHERE process = 'devices'")
    if not rows:
        return {}
    try:
        status = json.loads(rows[0][0])
    except ValueError:
        return {}
    links = status.get("links", {}) if isinstance(status, dict) else {}
    return links if isinstance(links, dict) else {}


async def _overview(error: str | None = None, status: int = 200) -> ResponseReturnValue:
    registry = _registry()
    actor = await _actor()
    session = await current_session()
    assert session is not None
    stations = await registry.stations()
    patients = await _patients(actor)
    names = dict(patients)
    present: dict[str, str] = {}
    for station in stations:
        open_ = [c for c in await registry.checkins(station.id) if c.checked_out_at is None]
        if open_:
            present[station.id] = names.get(open_[-1].patient_id, "(unknown patient)")
    zone = app_state().zone
    seen = {
        d.id: datetime.fromisoformat(d.last_seen).astimezone(zone).strftime("%Y-%m-%d %H:%M")
        for d in await registry.devices()
        if d.last_seen
    }
    page = await render_template(
        "devices.html",
        stations=stations,
        station_names={s.id: s.name for s in stations},
        seen=seen,
        present=present,
        devices=await registry.devices(),
        links=await _link_states(),
        held_count=len(await registry.held()),
        patients=patients,
        names=names,
        is_admin=session.user.role is Role.ADMIN,
        transports=[t.value for t in Transport],
        settings=[s.value for s in Setting],
        kinds=[k.value for k in StationKind],
        error=error,
    )
    return page, status


@bp.get("/")
@login_required(role=_STAFF)
async def overview() -> ResponseReturnValue:
    """Stations, devices and how many readings wait for a nurse."""
    return await _overview()


async def _form() -> dict[str, str]:
    form = await request.form
    return {k: str(v).strip() for k, v in form.items()}


async def _do(work: Any, back: str = "devices.overview") -> ResponseReturnValue:
    """Run a registry change; on a refusal re-render with its (PHI-free) message."""
    try:
        await work
    except (RegistryError, NotFoundError, ValueError) as exc:
        if back == "devices.held":
            return await _held_page(str(exc), 400)
        return await _overview(str(exc), 400)
    except ApplianceError as exc:
        return await _overview(f"Could not save: {exc}", 503)
    return redirect(url_for(back))


@bp.post("/stations/<station_id>/checkin")
@login_required(role=_STAFF)
async def check_in(station_id: str) -> ResponseReturnValue:
    """Check the chosen patient in at a station."""
    form = await _form()
    actor = await _actor()
    patient_id = form.get("patient_id", "")
    if patient_id not in dict(await _patients(actor)):
        return await _overview("Choose a patient to check in.", 400)
    return await _do(_registry().check_in(station_id, patient_id, actor))


@bp.post("/stations/<station_id>/checkout")
@login_required(role=_STAFF)
async def check_out(station_id: str) -> ResponseReturnValue:
    """End the check-in at a station."""
    return await _do(_registry().check_out(station_id, await _actor()))


@bp.post("/stations")
@login_required(role=Role.ADMIN)
async def add_station() -> ResponseReturnValue:
    """Add or rename a station (admin)."""
    form = await _form()
    station_id, name = form.get("station_id", ""), form.get("name", "")
    if not station_id or not name or len(station_id) > _FORM_ID_MAX:
        return await _overview("A station needs an id (up to 64 characters) and a name.", 400)
    return await _do(
        _registry().add_station(
            station_id, name, StationKind(form.get("kind", "exam-room")), await _actor()
        )
    )


@bp.post("/register")
@login_required(role=Role.ADMIN)
async def register() -> ResponseReturnValue:
    """Register (pair) a device (admin)."""
    from services import device_profiles

    form = await _form()
    device_id = form.get("device_id", "")
    if not device_id or len(device_id) > _FORM_ID_MAX:
        return await _overview("A device needs an id of up to 64 characters.", 400)
    try:
        transport = Transport(form.get("transport", ""))
        setting = Setting(form.get("setting", "clinic"))
        device_profiles.check_profile(form.get("profile", ""), transport, app_state().config)
    except (ValueError, ApplianceError) as exc:
        return await _overview(str(exc), 400)
    actor = await _actor()
    registry = _registry()

    async def work() -> None:
        await registry.register_device(
            device_id,
            name=form.get("name") or device_id,
            transport=transport,
            profile=form["profile"],
            address=form.get("address") or None,
            setting=setting,
            actor=actor,
            requires_bonding=form.get("bonding") == "on",
        )
        if form.get("station_id"):
            await registry.assign_device(device_id, actor, station_id=form["station_id"])

    return await _do(work())


@bp.post("/<device_id>/assign")
@login_required(role=Role.ADMIN)
async def assign(device_id: str) -> ResponseReturnValue:
    """Assign a device to a station or a home patient, or unassign it (admin)."""
    form = await _form()
    target = form.get("target", "")
    kind, _, value = target.partition(":")
    station = value if kind == "station" else None
    patient = value if kind == "patient" else None
    return await _do(
        _registry().assign_device(device_id, await _actor(), station_id=station, patient_id=patient)
    )


@bp.post("/<device_id>/retire")
@login_required(role=Role.ADMIN)
async def retire(device_id: str) -> ResponseReturnValue:
    """Retire a device (admin); its readings stay in the charts."""
    return await _do(_registry().retire_device(device_id, await _actor()))


# -- held readings ------------------------------------------------------------------------------


async def _held_page(error: str | None = None, status: int = 200) -> ResponseReturnValue:
    registry = _registry()
    actor = await _actor()
    stations = {s.id: s.name for s in await registry.stations()}
    devices = {d.id: d.name for d in await registry.devices()}
    views = []
    zone = app_state().zone
    for held in await registry.held():
        try:
            observations = await registry.open_held(held.id, actor)
        except TamperedDataError:
            # Listed all the same, so that it can be discarded; what it said is not known.
            logger.error("held reading %s: its sealed values failed authentication", held.id)
            observations = None
        received = datetime.fromisoformat(held.received_at).astimezone(zone)
        taken = (
            datetime.fromisoformat(held.measured_at).astimezone(zone).strftime("%H:%M")
            if held.measured_at
            else None
        )
        views.append(
            HeldView(
                id=held.id,
                received=received.strftime("%Y-%m-%d %H:%M"),
                device=devices.get(held.device_id, held.device_id),
                station=stations.get(held.station_id or "", "—"),
                reason=held.reason,
                values=(UNREADABLE_VALUES,)
                if observations is None
                else tuple(describe_observation(o) for o in observations),
                taken=taken,
            )
        )
    page = await render_template(
        "held.html", held=views, patients=await _patients(actor), error=error
    )
    return page, status


@bp.get("/held")
@login_required(role=_STAFF)
async def held() -> ResponseReturnValue:
    """Readings waiting for a nurse to name the patient."""
    return await _held_page()


@bp.post("/held/<int:held_id>/assign")
@login_required(role=_STAFF)
async def assign_held(held_id: int) -> ResponseReturnValue:
    """File a held reading into the chosen patient's chart."""
    form = await _form()
    actor = await _actor()
    patient_id = form.get("patient_id", "")
    if patient_id not in dict(await _patients(actor)):
        return await _held_page("Choose the patient this reading belongs to.", 400)
    return await _do(_registry().assign_held(held_id, patient_id, actor), "devices.held")


@bp.post("/held/<int:held_id>/discard")
@login_required(role=_STAFF)
async def discard_held(held_id: int) -> ResponseReturnValue:
    """Set a held reading aside with a reason (kept, never deleted)."""
    form = await _form()
    return await _do(
        _registry().discard_held(held_id, form.get("note", ""), await _actor()), "devices.held"
    )
