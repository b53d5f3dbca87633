"""Synthetic FHIR resources for tests. Every name and number is invented."""

from __future__ import annotations

from typing import Any

MARKER_FAMILY = "Zzyzxmarkerfamily"


def patient(
    family: str = "Testperson",
    given: str = "Ada",
    birth_date: str = "1961-04-09",
    mrn: str = "T0001",
) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.9999.1", "value": mrn}],
        "name": [{"family": family, "given": [given]}],
        "gender": "female",
        "birthDate": birth_date,
    }


def bp_observation(
    patient_ref: str,
    systolic: float = 128,
    diastolic: float = 82,
    effective: str = "2026-11-26T09:30:00-06:00",
) -> dict[str, Any]:
    loinc = "http://loinc.org"
    ucum = "http://unitsofmeasure.org"

    def component(code: str, value: float) -> dict[str, Any]:
        return {
            "code": {"coding": [{"system": loinc, "code": code}]},
            "valueQuantity": {"value": value, "unit": "mm[Hg]", "system": ucum, "code": "mm[Hg]"},
        }

    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "vital-signs",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": loinc, "code": "85354-9"}]},
        "subject": {"reference": patient_ref},
        "effectiveDateTime": effective,
        "component": [component("8480-6", systolic), component("8462-4", diastolic)],
    }


# A minimal valid site configuration for CLI and process tests; extend it per test.
SITE_TOML = """
[site]
id = "test-clinic"
name = "Test Clinic"
type = "office"
npi = "1234567893"
tax_id = "12-3456789"
timezone = "America/Chicago"

[site.address]
lines = ["1 Test Way"]
city = "Testville"
state = "TX"
postal_code = "79999"

[paths]
data_dir = "data"
"""
