"""Device readings become valid US Core Observations (every shape validated by fhir.resources)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance import fhir
from drivers.blood_pressure import (
    BloodPressureMeasurement,
    BloodPressureStatus,
    PressureUnit,
    PulseRateRange,
)
from drivers.ieee11073 import SFloatValue, Special
from services import vitals

ZONE = ZoneInfo("America/Chicago")
RECEIVED = datetime(2026, 11, 26, 15, 0, tzinfo=UTC)


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
    bp, hr = vitals.blood_pressure_observations(
        _bp(), "Patient/p1", received=RECEIVED, site_zone=ZONE, device_display="cuff"
    )
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
    [bp, _] = vitals.blood_pressure_observations(
        _bp(unit=PressureUnit.KPA, systolic=SFloatValue(160, -1), diastolic=SFloatValue(107, -1)),
        "Patient/p1",
        received=RECEIVED,
        site_zone=ZONE,
        device_display="cuff",
    )
    assert bp["component"][0]["valueQuantity"]["value"] == 120.0
    assert bp["component"][1]["valueQuantity"]["value"] == 80.3


def test_special_values_become_data_absent_reasons_not_numbers() -> None:
    [bp, hr] = vitals.blood_pressure_observations(
        _bp(diastolic=SFloatValue(0, 0, Special.NRES), pulse_rate=SFloatValue(0, 0, Special.NAN)),
        "Patient/p1",
        received=RECEIVED,
        site_zone=ZONE,
        device_display="cuff",
    )
    assert "valueQuantity" not in bp["component"][1]
    assert bp["component"][1]["dataAbsentReason"]["coding"][0]["code"] == "error"
    assert hr["dataAbsentReason"]["coding"][0]["code"] == "NaN"
    fhir.validate(bp)
    fhir.validate(hr)


def test_missing_device_clock_uses_arrival_time() -> None:
    [bp, _] = vitals.blood_pressure_observations(
        _bp(timestamp=None), "Patient/p1", received=RECEIVED, site_zone=ZONE, device_display="cuff"
    )
    assert bp["effectiveDateTime"] == RECEIVED.isoformat()


values = st.one_of(
    st.builds(SFloatValue, st.integers(-2000, 2000), st.integers(-3, 2)),
    st.sampled_from([SFloatValue(0, 0, s) for s in Special]),
)


@settings(max_examples=60, deadline=None)
@given(unit=st.sampled_from(PressureUnit), s=values, d=values, p=st.one_of(st.none(), values))
def test_every_shape_the_builder_makes_is_valid_fhir(
    unit: PressureUnit, s: SFloatValue, d: SFloatValue, p: SFloatValue | None
) -> None:
    for resource in vitals.blood_pressure_observations(
        _bp(unit=unit, systolic=s, diastolic=d, pulse_rate=p),
        "Patient/p1",
        received=RECEIVED,
        site_zone=ZONE,
        device_display="cuff",
    ):
        fhir.validate(resource)
