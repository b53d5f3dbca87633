"""Serial clinic devices → FHIR Observations (Nonin oximeters, Tanita scales, line protocols).

* A Nonin packet or ASCII line gives SpO2 (US Core pulse oximetry) and a heart rate; sensor
  alarms, artifact and out-of-track flags become notes. The hub samples these streams (a DF7
  oximeter sends three packets a second).
* A Tanita result gives body weight, height, BMI and body-fat percentage (LOINC ``41982-0``).
* A configured line protocol gives one Observation per value, with the LOINC code and UCUM
  unit the site declared — except that systolic and diastolic pressures arriving together
  become one US Core blood-pressure panel, as US Core requires.
"""

from __future__ import annotations

from decimal import Decimal

from drivers.line_protocol import FieldValue, LineReading
from drivers.nonin import NoninAsciiReading, NoninPacket
from drivers.tanita import TanitaResult
from services import gatt_observations
from services.vitals import (
    BP_PANEL,
    DIASTOLIC,
    HEART_RATE,
    LOINC,
    SYSTOLIC,
    VITAL_SIGNS,
    Capture,
    FhirJson,
    add_notes,
    common_fields,
    jsonable,
    loinc,
    quantity,
)

BODY_FAT = "41982-0"
_NONIN_NOTES = {
    "sensor_alarm": "Oximeter sensor alarm",
    "out_of_track": "Oximeter out of track (signal lost)",
    "artifact": "Artifact detected by the oximeter",
    "low_battery": "Oximeter battery low",
}


def _spo2_pair(
    spo2: int | None, pulse: int | None, notes: list[str], patient_ref: str | None, capture: Capture
) -> list[FhirJson]:
    base = common_fields(patient_ref, capture, VITAL_SIGNS)
    result = []
    if spo2 is not None:
        observation: FhirJson = {
            **base,
            "code": {
                "coding": [
                    {"system": LOINC, "code": gatt_observations.SPO2},
                    {"system": LOINC, "code": gatt_observations.SPO2_BY_OXIMETRY},
                ],
                "text": "Oxygen saturation (pulse oximetry)",
            },
            **quantity(Decimal(spo2), "%"),
        }
        add_notes(observation, capture, notes)
        result.append(jsonable(observation))
    if pulse is not None:
        hr: FhirJson = {
            **base,
            "code": loinc(HEART_RATE, "Heart rate"),
            **quantity(Decimal(pulse), "/min"),
        }
        add_notes(hr, capture, notes)
        result.append(jsonable(hr))
    return result


def nonin_packet_observations(
    packet: NoninPacket, patient_ref: str | None, capture: Capture
) -> list[FhirJson]:
    """SpO2 and heart rate from a Data Format #7 packet (the 4-beat averages)."""
    notes = [text for name, text in _NONIN_NOTES.items() if getattr(packet, name)]
    return _spo2_pair(packet.spo2, packet.pulse_rate, notes, patient_ref, capture)


def nonin_ascii_observations(
    reading: NoninAsciiReading, patient_ref: str | None, capture: Capture
) -> list[FhirJson]:
    """SpO2 and heart rate from a real-time ASCII line."""
    return _spo2_pair(reading.spo2, reading.pulse_rate, [], patient_ref, capture)


def tanita_observations(
    result: TanitaResult, patient_ref: str | None, capture: Capture
) -> list[FhirJson]:
    """Body weight, height, BMI and body fat from a body-composition result line."""
    base = common_fields(patient_ref, capture, VITAL_SIGNS)
    values = [
        (gatt_observations.BODY_WEIGHT, "Body weight", result.weight, result.mass_unit.value),
        (gatt_observations.BODY_HEIGHT, "Body height", result.height, result.height_unit),
        (gatt_observations.BMI, "Body mass index (BMI) [Ratio]", result.bmi, "kg/m2"),
    ]
    out = []
    for code, display, value, unit in values:
        observation = {**base, "code": loinc(code, display), **quantity(value, unit)}
        add_notes(observation, capture, [])
        out.append(jsonable(observation))
    fat = {
        **common_fields(patient_ref, capture, []),
        "code": loinc(BODY_FAT, "Percentage of body fat Measured"),
        **quantity(result.fat_percent, "%"),
    }
    fat.pop("category")
    add_notes(fat, capture, [])
    out.append(jsonable(fat))
    return out


def line_observations(
    reading: LineReading, patient_ref: str | None, capture: Capture
) -> list[FhirJson]:
    """One Observation per declared value; systolic + diastolic become one BP panel."""
    by_code = {v.loinc: v for v in reading.values}
    out: list[FhirJson] = []
    rest: list[FieldValue] = list(reading.values)
    if SYSTOLIC in by_code and DIASTOLIC in by_code:
        panel: FhirJson = {
            **common_fields(patient_ref, capture, VITAL_SIGNS),
            "code": loinc(BP_PANEL, "Blood pressure panel with all children optional"),
            "component": [
                {
                    "code": loinc(SYSTOLIC, "Systolic blood pressure"),
                    **quantity(by_code[SYSTOLIC].value, by_code[SYSTOLIC].unit),
                },
                {
                    "code": loinc(DIASTOLIC, "Diastolic blood pressure"),
                    **quantity(by_code[DIASTOLIC].value, by_code[DIASTOLIC].unit),
                },
            ],
        }
        add_notes(panel, capture, [])
        out.append(jsonable(panel))
        rest = [v for v in rest if v.loinc not in (SYSTOLIC, DIASTOLIC)]
    for value in rest:
        observation: FhirJson = {
            **common_fields(patient_ref, capture, VITAL_SIGNS),
            "code": {"coding": [{"system": LOINC, "code": value.loinc}], "text": value.name},
            **quantity(value.value, value.unit),
        }
        add_notes(observation, capture, [])
        out.append(jsonable(observation))
    return out
