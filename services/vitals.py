"""Device readings → US Core vital-sign Observations (LOINC + UCUM, REFERENCE.md).

The drivers give typed measurements with exact decimals and IEEE-11073 special values kept
distinct; this module only translates. A component whose value is a special value (NaN,
NRes, ±INF) carries a ``dataAbsentReason`` instead of a number, so nothing is invented.
"""

from __future__ import annotations

from datetime import datetime, tzinfo
from decimal import Decimal
from typing import Any

from drivers.blood_pressure import BloodPressureMeasurement, PressureUnit
from drivers.ieee11073 import SFloatValue, Special

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/observation-category"
ABSENT_SYSTEM = "http://terminology.hl7.org/CodeSystem/data-absent-reason"

BP_PANEL = "85354-9"
SYSTOLIC = "8480-6"
DIASTOLIC = "8462-4"
HEART_RATE = "8867-4"
# 1 kPa = 7.500615 mm[Hg]; US Core requires mm[Hg] for blood pressure.
MMHG_PER_KPA = Decimal("7.500615")

_ABSENT = {
    Special.NAN: ("NaN", "Not a Number (NaN)"),
    Special.POSITIVE_INFINITY: ("PINF", "Positive Infinity (PINF)"),
    Special.NEGATIVE_INFINITY: ("NINF", "Negative Infinity (NINF)"),
    Special.NRES: ("error", "Error"),
    Special.RESERVED: ("error", "Error"),
}

_VITAL_SIGNS = [
    {"coding": [{"system": CATEGORY_SYSTEM, "code": "vital-signs", "display": "Vital Signs"}]}
]


def _code(code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display}


def _value(value: SFloatValue, unit: PressureUnit | None) -> dict[str, Any]:
    """A component/observation value: a UCUM quantity, or the reason it is absent."""
    if value.special is not None:
        code, display = _ABSENT[value.special]
        return {
            "dataAbsentReason": {
                "coding": [{"system": ABSENT_SYSTEM, "code": code, "display": display}]
            }
        }
    number = value.to_decimal()
    if unit is None:
        return {"valueQuantity": {"value": number, "unit": "/min", "system": UCUM, "code": "/min"}}
    if unit is PressureUnit.KPA:
        number = (number * MMHG_PER_KPA).quantize(Decimal("0.1"))
    return {"valueQuantity": {"value": number, "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"}}


def effective_time(measured: datetime | None, received: datetime, site_zone: tzinfo) -> datetime:
    """When the reading was taken: the device clock in the site's zone, else arrival time.

    Device clocks carry no zone (Bluetooth DateTime is local wall time); the devices process
    sets them from the box (Current Time 0x2A2B), so the site's zone is the right one.
    """
    if measured is None:
        return received
    return measured.replace(tzinfo=site_zone)


def _jsonable(resource: dict[str, Any]) -> dict[str, Any]:
    """Decimals → JSON numbers without binary-float noise (120 stays 120, 16.5 stays 16.5)."""

    def convert(value: Any) -> Any:
        if isinstance(value, Decimal):
            return int(value) if value == value.to_integral_value() else float(value)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    result: dict[str, Any] = convert(resource)
    return result


def blood_pressure_observations(
    measurement: BloodPressureMeasurement,
    patient_ref: str,
    *,
    received: datetime,
    site_zone: tzinfo,
    device_display: str,
) -> list[dict[str, Any]]:
    """A US Core blood-pressure Observation, plus a heart-rate one when the cuff sent a pulse."""
    when = effective_time(measurement.timestamp, received, site_zone).isoformat()
    common: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "category": _VITAL_SIGNS,
        "subject": {"reference": patient_ref},
        "effectiveDateTime": when,
        "device": {"display": device_display},
    }
    bp: dict[str, Any] = {
        **common,
        "code": _code(BP_PANEL, "Blood pressure panel with all children optional"),
        "component": [
            {
                "code": _code(SYSTOLIC, "Systolic blood pressure"),
                **_value(measurement.systolic, measurement.unit),
            },
            {
                "code": _code(DIASTOLIC, "Diastolic blood pressure"),
                **_value(measurement.diastolic, measurement.unit),
            },
        ],
    }
    notes = _status_notes(measurement)
    if notes:
        bp["note"] = [{"text": text} for text in notes]
    result = [_jsonable(bp)]
    if measurement.pulse_rate is not None:
        hr = {
            **common,
            "code": _code(HEART_RATE, "Heart rate"),
            **_value(measurement.pulse_rate, None),
        }
        result.append(_jsonable(hr))
    return result


def _status_notes(measurement: BloodPressureMeasurement) -> list[str]:
    """Measurement-status bits a clinician must see (0x2A35 status field)."""
    status = measurement.status
    if status is None:
        return []
    flags = [
        (status.body_movement, "Body movement detected during measurement"),
        (status.cuff_too_loose, "Cuff fit too loose"),
        (status.irregular_pulse, "Irregular pulse detected"),
        (status.improper_position, "Improper measurement position"),
    ]
    return [text for present, text in flags if present]
