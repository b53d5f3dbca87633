"""What each kind of device event means for the hub: file it, show it live, or ignore it.

:func:`describe` gives the routing facts of a measurement (its kinds, the device's time, whether
it came from the device's memory, its record number) without any value, and
:func:`observations` builds its FHIR Observations. Events that are not measurements
(Device Information, battery, record-transfer bookkeeping, a cuff's live pressure while it
inflates) are not filed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from appliance.device_registry import Device
from drivers.blood_pressure import BloodPressureMeasurement
from drivers.glucose import GlucoseMeasurement, SampleLocation, SampleType
from drivers.line_protocol import LineReading
from drivers.nonin import NoninAsciiReading, NoninPacket
from drivers.pulse_oximetry import ContinuousMeasurement, SpotCheckMeasurement
from drivers.tanita import TanitaResult
from drivers.thermometer import TemperatureMeasurement
from drivers.weight import WeightMeasurement
from services import gatt_observations, serial_observations, vitals
from services.vitals import Capture, FhirJson

CONTROL_SOLUTION_REASON = "a control-solution test (a meter check), not a patient's reading"


@dataclass(frozen=True, slots=True)
class ReadingFacts:
    """The facts about a measurement that routing needs (no values: no PHI).

    ``summary`` names the kinds of reading for staff lists ("Blood pressure, heart rate");
    ``stored`` is True for a record from the device's memory; ``sequence`` is its record
    number where the device numbers them; ``continuous`` marks a stream the hub samples;
    ``not_a_patient`` says why a reading belongs to nobody (a meter's control test).
    """

    summary: str
    device_time: datetime | None
    clock_not_set: bool = False
    stored: bool = False
    sequence: int | None = None
    continuous: bool = False
    not_a_patient: str | None = None


def describe(event: object) -> ReadingFacts | None:
    """What the hub must know to route ``event``; None for events that are not filed."""
    if isinstance(event, BloodPressureMeasurement):
        if event.intermediate:
            return None  # the live cuff pressure while inflating: shown, never filed
        summary = "Blood pressure" + (", heart rate" if event.pulse_rate is not None else "")
        return ReadingFacts(summary, event.timestamp)
    if isinstance(event, GlucoseMeasurement):
        control = SampleType.CONTROL_SOLUTION in (event.sample_type,) or (
            event.sample_location is SampleLocation.CONTROL_SOLUTION
        )
        return ReadingFacts(
            "Blood glucose",
            event.time,
            stored=True,  # every glucose record comes from the meter's memory (RACP)
            sequence=event.sequence_number,
            not_a_patient=CONTROL_SOLUTION_REASON if control else None,
        )
    if isinstance(event, SpotCheckMeasurement):
        status = event.measurement_status
        return ReadingFacts(
            "SpO2, heart rate",
            event.timestamp,
            clock_not_set=event.device_clock_not_set,
            stored=bool(status and status.data_from_measurement_storage),
        )
    if isinstance(event, ContinuousMeasurement):
        return ReadingFacts("SpO2, heart rate", None, continuous=True)
    if isinstance(event, TemperatureMeasurement):
        if event.intermediate:
            return None
        return ReadingFacts("Body temperature", event.timestamp)
    if isinstance(event, WeightMeasurement):
        extra = ", BMI, height" if event.bmi is not None else ""
        return ReadingFacts("Body weight" + extra, event.timestamp)
    return _describe_serial(event)


def _describe_serial(event: object) -> ReadingFacts | None:
    """Serial devices carry no clock we set: their readings are timed on receipt."""
    if isinstance(event, NoninPacket | NoninAsciiReading):
        if event.spo2 is None and event.pulse_rate is None:
            return None  # no finger in the sensor: nothing measured, nothing to file
        return ReadingFacts("SpO2, heart rate", None, continuous=True)
    if isinstance(event, TanitaResult):
        return ReadingFacts("Body weight, height, BMI, body fat", None)
    if isinstance(event, LineReading):
        return ReadingFacts(", ".join(v.name for v in event.values), None)
    return None


_BUILDERS: dict[type, Callable[[Any, str | None, Capture], list[FhirJson]]] = {
    BloodPressureMeasurement: vitals.blood_pressure_observations,
    GlucoseMeasurement: gatt_observations.glucose_observations,
    SpotCheckMeasurement: gatt_observations.spot_check_observations,
    ContinuousMeasurement: gatt_observations.continuous_observations,
    TemperatureMeasurement: gatt_observations.temperature_observations,
    WeightMeasurement: gatt_observations.weight_observations,
    NoninPacket: serial_observations.nonin_packet_observations,
    NoninAsciiReading: serial_observations.nonin_ascii_observations,
    TanitaResult: serial_observations.tanita_observations,
    LineReading: serial_observations.line_observations,
}


def observations(event: object, patient_ref: str | None, capture: Capture) -> list[FhirJson]:
    """The Observations for a measurement that :func:`describe` accepted."""
    builder = _BUILDERS.get(type(event))
    if builder is None:
        raise TypeError(f"no FHIR mapping for {type(event).__name__}")
    return builder(event, patient_ref, capture)


_DEVICE_TYPES = {
    "blood_pressure": "Blood pressure cuff",
    "glucose": "Blood glucose meter",
    "weight": "Weight scale",
    "pulse_oximetry": "Pulse oximeter",
    "thermometer": "Thermometer",
    "nonin-df7": "Pulse oximeter (Nonin, serial)",
    "nonin-ascii": "Pulse oximeter (Nonin, serial)",
    "tanita": "Body-composition scale (Tanita, serial)",
}
DEVICE_ID_SYSTEM = "urn:telehealth-appliance:device-id"


def device_resource(device: Device) -> FhirJson:
    """A FHIR Device from the registry and the device's own Device Information."""
    resource: FhirJson = {
        "resourceType": "Device",
        "identifier": [{"system": DEVICE_ID_SYSTEM, "value": device.id}],
        "status": "active",
        "deviceName": [{"name": device.name, "type": "user-friendly-name"}],
        "type": {"text": _DEVICE_TYPES.get(device.profile, device.profile)},
    }
    if device.manufacturer:
        resource["manufacturer"] = device.manufacturer
    if device.model:
        resource["modelNumber"] = device.model
        resource["deviceName"].append({"name": device.model, "type": "model-name"})
    if device.serial_number:
        resource["serialNumber"] = device.serial_number
    if device.firmware_revision:
        resource["version"] = [{"type": {"text": "firmware"}, "value": device.firmware_revision}]
    return resource
