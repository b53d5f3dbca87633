"""Device readings → US Core vital-sign Observations (LOINC + UCUM, REFERENCE.md).

The drivers give typed measurements with exact decimals and IEEE-11073 special values kept
distinct; this module only translates. A component whose value is a special value (NaN,
NRes, ±INF) carries a ``dataAbsentReason`` instead of a number, so nothing is invented.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any

from appliance import fhir
from appliance.device_registry import Setting
from drivers.blood_pressure import BloodPressureMeasurement, PressureUnit
from drivers.ieee11073 import SFloatValue, Special
from services.routing import ReadingTime, TimeFlag

FhirJson = dict[str, Any]

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

# Project-defined code systems for where and how a reading was captured (docs/devices.md);
# defined in appliance/fhir.py so the sync agent can read the tags without importing services.
CAPTURE_SETTING_SYSTEM = fhir.CAPTURE_SETTING_SYSTEM
CAPTURE_METHOD_SYSTEM = fhir.CAPTURE_METHOD_SYSTEM
TIME_SOURCE_SYSTEM = fhir.TIME_SOURCE_SYSTEM


class CaptureMethod(StrEnum):
    """How a reading reached the box."""

    BLE = "ble"
    SERIAL = "serial"
    MANUAL = "manual"
    VENDOR_HUB = "vendor-hub"
    SIMULATED = "simulated"


@dataclass(frozen=True, slots=True)
class Capture:
    """Where, how and when a reading was taken, and by which device (``Device/<id>``)."""

    setting: Setting
    method: CaptureMethod
    time: ReadingTime
    device_display: str
    device_ref: str | None = None


_TIME_NOTES = {
    TimeFlag.NO_DEVICE_TIME: "The device sent no time; the time of receipt is recorded.",
    TimeFlag.CLOCK_NOT_SET: "The device clock was not set; the time of receipt is recorded.",
    TimeFlag.CLOCK_AHEAD: "The device clock was ahead of the box; the time of receipt is recorded.",
}

VITAL_SIGNS = [
    {"coding": [{"system": CATEGORY_SYSTEM, "code": "vital-signs", "display": "Vital Signs"}]}
]


def loinc(code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display}


def quantity(value: SFloatValue | Decimal | None, ucum: str) -> dict[str, Any]:
    """``valueQuantity`` in a UCUM unit, or the ``dataAbsentReason`` of a special/absent value."""
    if value is None:
        return {"dataAbsentReason": {"coding": [{"system": ABSENT_SYSTEM, "code": "unknown"}]}}
    if isinstance(value, SFloatValue):
        if value.special is not None:
            code, display = _ABSENT[value.special]
            return {
                "dataAbsentReason": {
                    "coding": [{"system": ABSENT_SYSTEM, "code": code, "display": display}]
                }
            }
        value = value.to_decimal()
    return {"valueQuantity": {"value": value, "unit": ucum, "system": UCUM, "code": ucum}}


def _value(value: SFloatValue, unit: PressureUnit | None) -> dict[str, Any]:
    """A component/observation value: a UCUM quantity, or the reason it is absent."""
    if value.special is not None:
        return quantity(value, "/min")
    number = value.to_decimal()
    if unit is None:
        return {"valueQuantity": {"value": number, "unit": "/min", "system": UCUM, "code": "/min"}}
    if unit is PressureUnit.KPA:
        number = (number * MMHG_PER_KPA).quantize(Decimal("0.1"))
    return {"valueQuantity": {"value": number, "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"}}


def common_fields(patient_ref: str | None, capture: Capture, category: list[Any]) -> FhirJson:
    """The fields every device Observation shares: status, category, subject, time, device, tags."""
    device: FhirJson = {"display": capture.device_display}
    if capture.device_ref is not None:
        device["reference"] = capture.device_ref
    common: FhirJson = {
        "resourceType": "Observation",
        "meta": {
            "tag": [
                {"system": CAPTURE_SETTING_SYSTEM, "code": capture.setting.value},
                {"system": CAPTURE_METHOD_SYSTEM, "code": capture.method.value},
                {"system": TIME_SOURCE_SYSTEM, "code": capture.time.source.value},
            ]
        },
        "status": "final",
        "category": category,
        "effectiveDateTime": capture.time.effective.isoformat(),
        "device": device,
    }
    if patient_ref is not None:
        common["subject"] = {"reference": patient_ref}
    return common


def add_notes(resource: FhirJson, capture: Capture, notes: list[str]) -> None:
    """Append clinician-facing notes: device status bits, and why the time is not the device's."""
    texts = list(notes)
    if capture.time.flag is not None:
        texts.append(_TIME_NOTES[capture.time.flag])
    if texts:
        resource["note"] = [{"text": text} for text in texts]


def jsonable(resource: dict[str, Any]) -> dict[str, Any]:
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
    measurement: BloodPressureMeasurement, patient_ref: str | None, capture: Capture
) -> list[FhirJson]:
    """A US Core blood-pressure Observation, plus a heart-rate one when the cuff sent a pulse."""
    common = common_fields(patient_ref, capture, VITAL_SIGNS)
    bp: FhirJson = {
        **common,
        "code": loinc(BP_PANEL, "Blood pressure panel with all children optional"),
        "component": [
            {
                "code": loinc(SYSTOLIC, "Systolic blood pressure"),
                **_value(measurement.systolic, measurement.unit),
            },
            {
                "code": loinc(DIASTOLIC, "Diastolic blood pressure"),
                **_value(measurement.diastolic, measurement.unit),
            },
        ],
    }
    add_notes(bp, capture, _status_notes(measurement))
    result = [jsonable(bp)]
    if measurement.pulse_rate is not None:
        hr = {
            **common,
            "code": loinc(HEART_RATE, "Heart rate"),
            **_value(measurement.pulse_rate, None),
        }
        add_notes(hr, capture, [])
        result.append(jsonable(hr))
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
