"""Glucose, weight, pulse-oximetry and temperature readings → FHIR Observations.

LOINC codes and UCUM units from REFERENCE.md ("Vital signs as FHIR"):

* SpO2: US Core Pulse Oximetry (``59408-5`` and ``2708-6``, ``%``), pulse rate as its own
  heart-rate Observation (``8867-4``, ``/min``);
* body temperature ``8310-5`` in ``Cel`` or ``[degF]`` as the thermometer sent it, with the
  site of measurement as ``bodySite`` text;
* body weight ``29463-7`` (``kg`` / ``[lb_av]``), and when the scale sends them, BMI
  ``39156-5`` (``kg/m2``) and body height ``8302-2`` (``cm`` / ``[in_i]``);
* glucose is a laboratory Observation, not a vital sign: capillary samples as "by
  glucometer" (``41653-7`` mg/dL, ``14743-9`` mmol/L), other blood samples as ``2339-0`` /
  ``15074-8``. The conversion from the wire's kg/L or mol/L is exact (only the exponent moves).

Every status bit a clinician must see (questionable or invalid SpO2, a glucose strip that was
too small, a device fault) becomes a ``note``; nothing is dropped or invented.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from drivers.glucose import (
    GlucoseMeasurement,
    GlucoseSensorStatus,
    GlucoseUnit,
    SampleType,
    to_clinical_units,
)
from drivers.ieee11073 import SFloatValue
from drivers.pulse_oximetry import ContinuousMeasurement, MeasurementStatus, SpotCheckMeasurement
from drivers.thermometer import TemperatureMeasurement, TemperatureType
from drivers.weight import WeightMeasurement, WeightUnits
from services.vitals import (
    CATEGORY_SYSTEM,
    HEART_RATE,
    LOINC,
    VITAL_SIGNS,
    Capture,
    FhirJson,
    add_notes,
    common_fields,
    jsonable,
    loinc,
    quantity,
)

SPO2 = "59408-5"
SPO2_BY_OXIMETRY = "2708-6"
BODY_TEMPERATURE = "8310-5"
BODY_WEIGHT = "29463-7"
BMI = "39156-5"
BODY_HEIGHT = "8302-2"
# (LOINC, display) by unit and whether the sample was capillary.
GLUCOSE_CODES = {
    ("mg/dL", True): ("41653-7", "Glucose [Mass/volume] in Capillary blood by Glucometer"),
    ("mmol/L", True): ("14743-9", "Glucose [Moles/volume] in Capillary blood by Glucometer"),
    ("mg/dL", False): ("2339-0", "Glucose [Mass/volume] in Blood"),
    ("mmol/L", False): ("15074-8", "Glucose [Moles/volume] in Blood"),
}
_CAPILLARY = {SampleType.CAPILLARY_WHOLE_BLOOD, SampleType.CAPILLARY_PLASMA}
_LABORATORY = [
    {"coding": [{"system": CATEGORY_SYSTEM, "code": "laboratory", "display": "Laboratory"}]}
]


def _flags(status: object, texts: dict[str, str]) -> list[str]:
    return [text for name, text in texts.items() if getattr(status, name, False)]


_PLX_NOTES = {
    "questionable_measurement": "Questionable measurement detected by the oximeter",
    "invalid_measurement": "Invalid measurement detected by the oximeter",
    "measurement_unavailable": "Measurement unavailable",
    "early_estimated_data": "Early estimate (not yet stable)",
    "data_for_demonstration": "Demonstration data",
    "data_for_testing": "Test data",
    "calibration_ongoing": "Calibration in progress",
}
_GLUCOSE_NOTES = {
    "device_battery_low": "Meter battery low at time of measurement",
    "sensor_malfunction": "Sensor malfunction or faulty at time of measurement",
    "sample_size_insufficient": "Sample size insufficient",
    "strip_insertion_error": "Strip insertion error",
    "strip_type_incorrect": "Strip type incorrect for the meter",
    "result_too_high": "Result higher than the meter can process",
    "result_too_low": "Result lower than the meter can process",
    "temperature_too_high": "Sensor temperature too high for a valid test",
    "temperature_too_low": "Sensor temperature too low for a valid test",
    "read_interrupted": "Sensor read interrupted (strip pulled too soon)",
    "general_device_fault": "General meter fault",
    "time_fault": "Time fault at the meter",
}


def _pulse(value: SFloatValue, patient_ref: str | None, capture: Capture) -> FhirJson:
    hr = {
        **common_fields(patient_ref, capture, VITAL_SIGNS),
        "code": loinc(HEART_RATE, "Heart rate"),
        **quantity(value, "/min"),
    }
    add_notes(hr, capture, [])
    return jsonable(hr)


def _spo2(
    spo2: SFloatValue,
    pulse: SFloatValue,
    status: MeasurementStatus | None,
    patient_ref: str | None,
    capture: Capture,
) -> list[FhirJson]:
    observation: FhirJson = {
        **common_fields(patient_ref, capture, VITAL_SIGNS),
        "code": {
            "coding": [
                {
                    "system": LOINC,
                    "code": SPO2,
                    "display": "Oxygen saturation in Arterial blood by Pulse oximetry",
                },
                {
                    "system": LOINC,
                    "code": SPO2_BY_OXIMETRY,
                    "display": "Oxygen saturation in Arterial blood",
                },
            ],
            "text": "Oxygen saturation (pulse oximetry)",
        },
        **quantity(spo2, "%"),
    }
    add_notes(observation, capture, _flags(status, _PLX_NOTES))
    return [jsonable(observation), _pulse(pulse, patient_ref, capture)]


def spot_check_observations(
    m: SpotCheckMeasurement, patient_ref: str | None, capture: Capture
) -> list[FhirJson]:
    """SpO2 and pulse rate from a PLX spot check."""
    return _spo2(m.spo2, m.pulse_rate, m.measurement_status, patient_ref, capture)


def continuous_observations(
    m: ContinuousMeasurement, patient_ref: str | None, capture: Capture
) -> list[FhirJson]:
    """SpO2 and pulse rate from a PLX continuous value (the hub files one now and then)."""
    return _spo2(m.spo2, m.pulse_rate, m.measurement_status, patient_ref, capture)


_BODY_SITES = {
    TemperatureType.ARMPIT: "Axilla",
    TemperatureType.EAR: "Ear",
    TemperatureType.FINGER: "Finger",
    TemperatureType.GASTROINTESTINAL_TRACT: "Gastrointestinal tract",
    TemperatureType.MOUTH: "Oral",
    TemperatureType.RECTUM: "Rectum",
    TemperatureType.TOE: "Toe",
    TemperatureType.TYMPANUM: "Tympanic membrane",
}


def temperature_observations(
    m: TemperatureMeasurement, patient_ref: str | None, capture: Capture
) -> list[FhirJson]:
    """A US Core body temperature."""
    observation: FhirJson = {
        **common_fields(patient_ref, capture, VITAL_SIGNS),
        "code": loinc(BODY_TEMPERATURE, "Body temperature"),
        **quantity(m.temperature, m.unit.value),
    }
    site = _BODY_SITES.get(m.temperature_type) if m.temperature_type else None
    if site is not None:
        observation["bodySite"] = {"text": site}
    add_notes(observation, capture, [])
    return [jsonable(observation)]


def weight_observations(
    m: WeightMeasurement, patient_ref: str | None, capture: Capture
) -> list[FhirJson]:
    """Body weight, and BMI and body height when the scale sent them."""
    imperial = m.units is WeightUnits.IMPERIAL
    base = common_fields(patient_ref, capture, VITAL_SIGNS)
    weight: FhirJson = {
        **base,
        "code": loinc(BODY_WEIGHT, "Body weight"),
        **quantity(m.weight, "[lb_av]" if imperial else "kg"),
    }
    notes = [] if m.weight is not None else ["The scale reported the measurement unsuccessful"]
    add_notes(weight, capture, notes)
    result = [jsonable(weight)]
    if m.bmi is not None and m.height is not None:
        bmi = {
            **base,
            "code": loinc(BMI, "Body mass index (BMI) [Ratio]"),
            **quantity(m.bmi, "kg/m2"),
        }
        # Height arrives in metres (SI) or inches; US Core asks for cm or [in_i].
        height_value = m.height if imperial else m.height * Decimal(100)
        height = {
            **base,
            "code": loinc(BODY_HEIGHT, "Body height"),
            **quantity(height_value, "[in_i]" if imperial else "cm"),
        }
        for extra in (bmi, height):
            add_notes(extra, capture, [])
            result.append(jsonable(extra))
    return result


def glucose_observations(
    m: GlucoseMeasurement, patient_ref: str | None, capture: Capture
) -> list[FhirJson]:
    """A laboratory glucose Observation from a meter record."""
    notes = _flags(m.status, _GLUCOSE_NOTES) if isinstance(m.status, GlucoseSensorStatus) else []
    capillary = m.sample_type in _CAPILLARY
    value: dict[str, Any]
    if m.concentration is None:
        unit = "mg/dL"
        value = quantity(None, unit)
        notes.append("The meter sent no concentration for this record")
    elif m.concentration.special is not None:
        unit = "mmol/L" if m.unit is GlucoseUnit.MOL_PER_L else "mg/dL"
        value = quantity(m.concentration, unit)
    else:
        number, unit = to_clinical_units(m)
        value = quantity(number, unit)
    code, display = GLUCOSE_CODES[unit, capillary]
    observation: FhirJson = {
        **common_fields(patient_ref, capture, _LABORATORY),
        "code": loinc(code, display),
        **value,
    }
    if m.sample_type is not None and m.sample_type is not SampleType.RESERVED:
        observation["specimen"] = {"display": m.sample_type.value.replace("-", " ")}
    add_notes(observation, capture, notes)
    return [jsonable(observation)]
