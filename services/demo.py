"""Synthetic patients for demo mode and tests. Every name and number here is made up.

The remote-monitoring part of the demo (enrolments, a month of home readings, alerts) is
``services/rpm_demo.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

from appliance.device_registry import DeviceRegistry, Setting, StationKind, Transport
from appliance.store import Store

logger = logging.getLogger(__name__)

# Invented names; any resemblance to a real person is accidental.
_PEOPLE = (
    ("Alvarez", "Rosa", "female", "1958-03-14"),
    ("Begay", "Thomas", "male", "1949-11-02"),
    ("Carver", "Maple", "female", "1971-07-23"),
    ("Dunmore", "Elias", "male", "1963-01-30"),
    ("Espinoza", "Lucia", "female", "1980-09-05"),
)
# Remote-monitoring patients (services/rpm_demo.py): measured at home, never checked in at
# the demo stations, so their charts and alerts stay as seeded until a nurse acts.
_HOME_PEOPLE = (
    ("Fairweather", "Orrin", "male", "1952-06-18"),
    ("Galloway", "Ines", "female", "1947-02-09"),
    ("Harrow", "Delphine", "female", "1956-10-27"),
    ("Ibarra", "Tomas", "male", "1968-04-12"),
)
DEMO_MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.9999.1"  # a made-up OID arc for demo MRNs
HOME_MRN_PREFIX = "RPM"  # demo MRNs of the home-monitored patients
# Every synthetic patient a fresh demo creates (clinic and home-monitored).
PATIENT_COUNT = len(_PEOPLE) + len(_HOME_PEOPLE)


def synthetic_patients(
    rng: random.Random | None = None, *, home: bool = False
) -> list[dict[str, Any]]:
    """US Core-shaped Patients with demo MRNs; deterministic for a given RNG.

    ``home``: the remote-monitoring patients instead of the ones seen at the stations.
    """
    rng = rng or random.Random(2026)  # noqa: S311 - synthetic data, not security
    prefix = HOME_MRN_PREFIX if home else "DEMO"
    patients = []
    for family, given, gender, birth in _HOME_PEOPLE if home else _PEOPLE:
        mrn = f"{prefix}{rng.randrange(100000, 999999)}"
        patients.append(
            {
                "resourceType": "Patient",
                "identifier": [
                    {
                        "system": DEMO_MRN_SYSTEM,
                        "value": mrn,
                        "type": {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                    "code": "MR",
                                }
                            ]
                        },
                    }
                ],
                "name": [{"family": family, "given": [given]}],
                "gender": gender,
                "birthDate": birth,
                "address": [{"city": "Pine Valley", "state": "TX", "postalCode": "79999"}],
            }
        )
    return patients


# -- demo stations and devices ---------------------------------------------------------------

DEMO_STATIONS = (
    ("kiosk-1", "Kiosk 1", StationKind.KIOSK),
    ("exam-1", "Exam room 1", StationKind.EXAM_ROOM),
)
# (device id, name, profile, setting, station); the last is a home device of patient 0. One
# simulated device per Bluetooth profile and serial protocol, driven by the real decoders.
DEMO_DEVICES = (
    ("sim-bp-kiosk-1", "Kiosk 1 cuff (simulated)", "blood_pressure", Setting.CLINIC, "kiosk-1"),
    ("sim-ox-kiosk-1", "Kiosk 1 oximeter (simulated)", "pulse_oximetry", Setting.CLINIC, "kiosk-1"),
    (
        "sim-thermo-kiosk-1",
        "Kiosk 1 thermometer (simulated)",
        "thermometer",
        Setting.CLINIC,
        "kiosk-1",
    ),
    ("sim-bp-exam-1", "Exam room 1 cuff (simulated)", "blood_pressure", Setting.CLINIC, "exam-1"),
    (
        "sim-glucose-exam-1",
        "Exam room 1 glucose meter (simulated)",
        "glucose",
        Setting.CLINIC,
        "exam-1",
    ),
    ("sim-scale-exam-1", "Exam room 1 scale (simulated)", "weight", Setting.CLINIC, "exam-1"),
    (
        "sim-nonin-exam-1",
        "Exam room 1 Nonin DF7 (simulated serial)",
        "nonin-df7",
        Setting.CLINIC,
        "exam-1",
    ),
    (
        "sim-tanita-exam-1",
        "Exam room 1 Tanita (simulated serial)",
        "tanita",
        Setting.CLINIC,
        "exam-1",
    ),
    ("sim-bp-home-1", "Home cuff (simulated)", "blood_pressure", Setting.HOME, None),
)
ACTOR = "service:devices"


async def seed_devices(store: Store, registry: DeviceRegistry) -> list[str]:
    """Synthetic patients, demo stations and simulated devices (idempotent); the ids of the
    patients seen at the stations (not the remote-monitoring ones)."""
    patients = await store.patients(ACTOR)
    if not patients:
        created = await store.create(synthetic_patients(), ACTOR)
        patients = [item.resource for item in created]
        logger.info("created %d synthetic demo patients", len(created))
    ids = [str(p["id"]) for p in patients if not is_home_patient(p)]
    for station_id, name, kind in DEMO_STATIONS:
        await registry.add_station(station_id, name, kind, ACTOR)
    known = {d.id for d in await registry.devices()}
    for device_id, name, profile, setting, station in DEMO_DEVICES:
        if device_id in known:
            continue
        await registry.register_device(
            device_id,
            name=name,
            transport=Transport.SIMULATED,
            profile=profile,
            address=None,
            setting=setting,
            actor=ACTOR,
        )
        if station is not None:
            await registry.assign_device(device_id, ACTOR, station_id=station)
        else:
            await registry.assign_device(device_id, ACTOR, patient_id=ids[0])
    return ids


def is_home_patient(patient: dict[str, Any]) -> bool:
    """One of the demo's remote-monitoring patients (kept away from the demo stations)."""
    return any(
        i.get("system") == DEMO_MRN_SYSTEM and str(i.get("value", "")).startswith(HOME_MRN_PREFIX)
        for i in patient.get("identifier") or []
    )


async def front_desk(
    registry: DeviceRegistry,
    patient_ids: list[str],
    stop: asyncio.Event,
    *,
    interval_s: float,
    offset_s: float = 0.0,
) -> None:
    """Check the next synthetic patient in at each demo station every ``interval_s``.

    ``offset_s`` keeps hand-overs away from the simulated devices' reading ticks: a reading
    in the very second of a hand-over could be either patient's, and is rightly held.
    """
    turn = 0
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), offset_s)
    while not stop.is_set():
        for offset, (station_id, _name, _kind) in enumerate(DEMO_STATIONS):
            patient = patient_ids[(turn + offset) % len(patient_ids)]
            await registry.check_in(station_id, patient, ACTOR)
        turn += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
