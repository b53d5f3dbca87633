"""Device readings become valid US Core Observations (every shape validated by fhir.resources)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance import fhir
from appliance.device_registry import Setting
from drivers.blood_pressure import (
    BloodPressureMeasurement,
    BloodPressureStatus,
    PressureUnit,
    PulseRateRange,
)
from drivers.ieee11073 import SFloatValue, Special
from services import routing, vitals
from services.vitals import Capture, CaptureMethod

ZONE = ZoneInfo("America/Chicago")
RECEIVED = datetime(2026, 11, 26, 15, 0, tzinfo=UTC)


def _capture(device_time: datetime | None, **kw: object) -> Capture:
    return Capture(
        setting=Setting.CLINIC,
        method=CaptureMethod.BLE,
        time=routing.reading_time(device_time, RECEIVED, ZONE, **kw),  # type: ignore[arg-type]
        device_display="cuff",
        device_ref="Device/d1",
    )


def _obs(m: BloodPressureMeasurement, patient: str | None = "Patient/p1") -> list[dict]:
    return vitals.blood_pressure_observations(m, patient, _capture(m.timestamp))


def _bp(**overrides: object) -> BloodPressureMeasurement:
    base = {
        "unit": PressureUnit.MMHG,
        "systolic": SFloatValue(142, 0),
        "diastolic": SFloatValue(91, 0),
        "mean_arterial": SFloatValue(108, 0),
        "timestamp": datetime(2026, 11, 26, 8, 45),
        "pulse_rate": SFloatValue(77, 0),
        "user_id": 1,
        "status": BloodPressureStatus(False, False, True, PulseRateRange.WITHIN, False),
    }
    return BloodPressureMeasurement(**{**base, **overrides})  # type: ignore[arg-type]


def test_blood_pressure_becomes_us_core_panel_and_heart_rate() -> None:
    bp, hr = _obs(_bp())
    assert bp["code"]["coding"][0]["code"] == "85354-9"
    assert [c["code"]["coding"][0]["code"] for c in bp["component"]] == ["8480-6", "8462-4"]
    assert bp["component"][0]["valueQuantity"] == {
        "value": 142,
        "unit": "mm[Hg]",
        "system": "http://unitsofmeasure.org",
        "code": "mm[Hg]",
    }
    assert bp["effectiveDateTime"] == "2026-11-26T08:45:00-06:00"
    assert bp["note"] == [{"text": "Irregular pulse detected"}]
    assert hr["code"]["coding"][0]["code"] == "8867-4"
    assert hr["valueQuantity"]["code"] == "/min"
    for resource in (bp, hr):
        fhir.validate(resource)


def test_kpa_is_converted_to_mmhg() -> None:
    [bp, _] = _obs(
        _bp(unit=PressureUnit.KPA, systolic=SFloatValue(160, -1), diastolic=SFloatValue(107, -1))
    )
    assert bp["component"][0]["valueQuantity"]["value"] == 120.0
    assert bp["component"][1]["valueQuantity"]["value"] == 80.3


def test_special_values_become_data_absent_reasons_not_numbers() -> None:
    [bp, hr] = _obs(
        _bp(diastolic=SFloatValue(0, 0, Special.NRES), pulse_rate=SFloatValue(0, 0, Special.NAN))
    )
    assert "valueQuantity" not in bp["component"][1]
    assert bp["component"][1]["dataAbsentReason"]["coding"][0]["code"] == "error"
    assert hr["dataAbsentReason"]["coding"][0]["code"] == "NaN"
    fhir.validate(bp)
    fhir.validate(hr)


def test_missing_device_clock_uses_arrival_time() -> None:
    [bp, _] = _obs(_bp(timestamp=None))
    assert bp["effectiveDateTime"] == RECEIVED.isoformat()
    assert {"system": vitals.TIME_SOURCE_SYSTEM, "code": "received"} in bp["meta"]["tag"]
    assert bp["note"][-1]["text"] == "The device sent no time; the time of receipt is recorded."


def test_device_clock_ahead_of_the_box_is_not_trusted() -> None:
    ahead = datetime(2026, 11, 26, 9, 30)  # 09:30 Chicago = 15:30 UTC, after receipt at 15:00
    [bp, _] = vitals.blood_pressure_observations(
        _bp(timestamp=ahead), "Patient/p1", _capture(ahead)
    )
    assert bp["effectiveDateTime"] == RECEIVED.isoformat()
    assert "ahead" in bp["note"][-1]["text"]


def test_observations_say_where_how_and_with_which_device() -> None:
    bp, hr = _obs(_bp())
    for resource in (bp, hr):
        tags = {(t["system"], t["code"]) for t in resource["meta"]["tag"]}
        assert tags == {
            (vitals.CAPTURE_SETTING_SYSTEM, "clinic"),
            (vitals.CAPTURE_METHOD_SYSTEM, "ble"),
            (vitals.TIME_SOURCE_SYSTEM, "device"),
        }
        assert resource["device"] == {"display": "cuff", "reference": "Device/d1"}


def test_an_unmatched_reading_has_no_subject_until_assigned() -> None:
    bp, hr = _obs(_bp(), patient=None)
    assert "subject" not in bp
    assert "subject" not in hr


values = st.one_of(
    st.builds(SFloatValue, st.integers(-2000, 2000), st.integers(-3, 2)),
    st.sampled_from([SFloatValue(0, 0, s) for s in Special]),
)


@settings(max_examples=60, deadline=None)
@given(unit=st.sampled_from(PressureUnit), s=values, d=values, p=st.one_of(st.none(), values))
def test_every_shape_the_builder_makes_is_valid_fhir(
    unit: PressureUnit, s: SFloatValue, d: SFloatValue, p: SFloatValue | None
) -> None:
    for resource in _obs(_bp(unit=unit, systolic=s, diastolic=d, pulse_rate=p)):
        fhir.validate(resource)
