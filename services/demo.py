"""Synthetic patients for demo mode and tests. Every name and number here is made up."""

from __future__ import annotations

import random
from typing import Any

# Invented names; any resemblance to a real person is accidental.
_PEOPLE = (
    ("Alvarez", "Rosa", "female", "1958-03-14"),
    ("Begay", "Thomas", "male", "1949-11-02"),
    ("Carver", "Maple", "female", "1971-07-23"),
    ("Dunmore", "Elias", "male", "1963-01-30"),
    ("Espinoza", "Lucia", "female", "1980-09-05"),
)
DEMO_MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.9999.1"  # a made-up OID arc for demo MRNs


def synthetic_patients(rng: random.Random | None = None) -> list[dict[str, Any]]:
    """US Core-shaped Patients with demo MRNs; deterministic for a given RNG."""
    rng = rng or random.Random(2026)  # noqa: S311 - synthetic data, not security
    patients = []
    for family, given, gender, birth in _PEOPLE:
        mrn = f"DEMO{rng.randrange(100000, 999999)}"
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
