"""The same claim as a FHIR R4 ``Claim``, and back: the encrypted record of a claim's content.

The store keeps each claim's content as one FHIR ``Claim`` (encrypted like every resource)
with the parties it names contained in it — the subscriber (``#subscriber``), the coverage
(``#coverage``), the payer and the site (``#payer``, ``#provider``) and the attending
practitioner (``#attending``) — so a claim stays exactly what was checked and sent even
when the chart changes later. :func:`from_fhir` reads it back for the X12 renderer.
Fields per REFERENCE.md: type institutional/professional, subType NUBC type of bill,
``item.revenue`` 0780, ``item.productOrService`` HCPCS Q3014, ``item.locationCodeableConcept``
CMS place of service, provider NPI, patient MBI (``http://hl7.org/fhir/sid/us-mbi``).
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

from services.claims.model import (
    BillingProvider,
    ClaimData,
    Form,
    Payer,
    PostalAddress,
    Practitioner,
    ServiceLine,
    Subscriber,
    money,
    to_cents,
)

NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
EIN_SYSTEM = "urn:oid:2.16.840.1.113883.4.4"
MBI_SYSTEM = "http://hl7.org/fhir/sid/us-mbi"
MEMBER_SYSTEM = "urn:telehealth-appliance:fhir:member-id"
PAYER_ID_SYSTEM = "urn:telehealth-appliance:fhir:x12-payer-id"
CLAIM_NUMBER_SYSTEM = "urn:telehealth-appliance:fhir:claim-number"
ENCOUNTER_SYSTEM = "urn:telehealth-appliance:fhir:encounter"
ICD10_SYSTEM = "http://hl7.org/fhir/sid/icd-10-cm"
HCPCS_SYSTEM = "https://bluebutton.cms.gov/resources/codesystem/hcpcs"
POS_SYSTEM = "https://www.cms.gov/Medicare/Coding/place-of-service-codes/Place_of_Service_Code_Set"
TOB_SYSTEM = "https://www.nubc.org/CodeSystem/TypeOfBill"
REVENUE_SYSTEM = "https://www.nubc.org/CodeSystem/RevenueCodes"
CLAIM_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/claim-type"
FILING_SYSTEM = "urn:telehealth-appliance:fhir:claim-filing-indicator"
SITE_TYPE_SYSTEM = "urn:telehealth-appliance:fhir:site-type"
OVERRIDE_URL = "urn:telehealth-appliance:fhir:duplicate-override-reason"
FEE_URL = "urn:telehealth-appliance:fhir:expected-fee"
_USD = "USD"


def _money(cents: int) -> dict[str, Any]:
    return {"value": float(Decimal(money(cents))), "currency": _USD}


def _cents(value: dict[str, Any]) -> int:
    return to_cents(Decimal(str(value["value"])))


def _address(address: PostalAddress) -> dict[str, Any]:
    return {
        "line": list(address.lines),
        "city": address.city,
        "state": address.state,
        "postalCode": address.postal_code,
    }


def _read_address(value: list[dict[str, Any]] | None) -> PostalAddress | None:
    if not value:
        return None
    first = value[0]
    return PostalAddress(
        tuple(first.get("line", [])),
        first.get("city", ""),
        first.get("state", ""),
        first.get("postalCode", ""),
    )


def _ident(resource: dict[str, Any], system: str) -> str:
    return next(
        (i["value"] for i in resource.get("identifier", []) if i.get("system") == system), ""
    )


def to_fhir(claim: ClaimData, *, status: str = "active", created: str) -> dict[str, Any]:
    """The FHIR R4 ``Claim`` of ``claim`` (``status``: FHIR's, draft or active)."""
    institutional = claim.form is Form.INSTITUTIONAL
    sub, payer, billing = claim.subscriber, claim.payer, claim.billing
    medicare = payer.kind == "medicare"
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": "subscriber",
        "identifier": [
            {"system": MBI_SYSTEM if medicare else MEMBER_SYSTEM, "value": sub.member_id}
        ],
        "name": [{"family": sub.family, "given": [sub.given]}],
    }
    if sub.gender:
        patient["gender"] = sub.gender
    if sub.birth_date:
        patient["birthDate"] = sub.birth_date.isoformat()
    if sub.address:
        patient["address"] = [_address(sub.address)]
    contained: list[dict[str, Any]] = [
        patient,
        {
            "resourceType": "Organization",
            "id": "payer",
            "identifier": [{"system": PAYER_ID_SYSTEM, "value": payer.id}],
            "name": payer.name,
            "type": [{"coding": [{"system": SITE_TYPE_SYSTEM, "code": payer.kind}]}],
        },
        {
            "resourceType": "Coverage",
            "id": "coverage",
            "status": "active",
            "type": {"coding": [{"system": FILING_SYSTEM, "code": payer.filing_indicator}]},
            "subscriberId": sub.member_id,
            "beneficiary": {"reference": "#subscriber"},
            "relationship": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/subscriber-relationship",
                        "code": "self",
                    }
                ]
            },
            "payor": [{"reference": "#payer"}],
        },
        {
            "resourceType": "Organization",
            "id": "provider",
            "identifier": [
                {"system": NPI_SYSTEM, "value": billing.npi},
                {"system": EIN_SYSTEM, "value": billing.tax_id},
            ],
            "name": billing.name,
            "address": [_address(billing.address)],
        },
    ]
    if claim.attending is not None:
        contained.append(
            {
                "resourceType": "Practitioner",
                "id": "attending",
                "identifier": [{"system": NPI_SYSTEM, "value": claim.attending.npi}],
                "name": [{"family": claim.attending.family, "given": [claim.attending.given]}],
            }
        )
    items = []
    for number, line in enumerate(claim.lines, 1):
        item: dict[str, Any] = {
            "sequence": number,
            "diagnosisSequence": [1] if claim.diagnoses else [],
            "productOrService": {"coding": [{"system": HCPCS_SYSTEM, "code": line.code}]},
            "servicedDate": line.service_date.isoformat(),
            "quantity": {"value": line.units},
            "unitPrice": _money(line.charge_cents // max(line.units, 1)),
            "net": _money(line.charge_cents),
        }
        if not item["diagnosisSequence"]:
            del item["diagnosisSequence"]
        if line.revenue_code:
            item["revenue"] = {"coding": [{"system": REVENUE_SYSTEM, "code": line.revenue_code}]}
        if claim.place_of_service:
            item["locationCodeableConcept"] = {
                "coding": [{"system": POS_SYSTEM, "code": claim.place_of_service}]
            }
        items.append(item)
    body: dict[str, Any] = {
        "resourceType": "Claim",
        "contained": contained,
        "identifier": [
            {"system": CLAIM_NUMBER_SYSTEM, "value": claim.claim_number},
            {"system": ENCOUNTER_SYSTEM, "value": claim.encounter_id},
        ],
        "extension": [{"url": FEE_URL, "valueMoney": _money(claim.fee_cents)}],
        "status": status,
        "type": {
            "coding": [
                {
                    "system": CLAIM_TYPE_SYSTEM,
                    "code": "institutional" if institutional else "professional",
                }
            ]
        },
        "use": "claim",
        "patient": {
            "reference": f"Patient/{claim.patient_id}",
            "identifier": {
                "system": MBI_SYSTEM if medicare else MEMBER_SYSTEM,
                "value": sub.member_id,
            },
        },
        "billablePeriod": {
            "start": claim.service_date.isoformat(),
            "end": claim.service_date.isoformat(),
        },
        "created": created,
        "insurer": {"reference": "#payer"},
        "provider": {
            "reference": "#provider",
            "identifier": {"system": NPI_SYSTEM, "value": billing.npi},
        },
        "priority": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/processpriority",
                    "code": "normal",
                }
            ]
        },
        "facility": {"reference": "#provider"},
        "insurance": [{"sequence": 1, "focal": True, "coverage": {"reference": "#coverage"}}],
        "item": items,
        "total": _money(claim.total_cents),
    }
    if claim.type_of_bill:
        body["subType"] = {"coding": [{"system": TOB_SYSTEM, "code": claim.type_of_bill}]}
    body["extension"].append(
        {"url": SITE_TYPE_SYSTEM, "valueCode": claim.site_type},
    )
    if claim.override_reason:
        body["extension"].append({"url": OVERRIDE_URL, "valueString": claim.override_reason})
    if claim.attending is not None:
        body["careTeam"] = [
            {
                "sequence": 1,
                "provider": {"reference": "#attending"},
                "role": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/claimcareteamrole",
                            "code": "primary",
                        }
                    ]
                },
            }
        ]
    if claim.diagnoses:
        body["diagnosis"] = [
            {
                "sequence": n,
                "diagnosisCodeableConcept": {"coding": [{"system": ICD10_SYSTEM, "code": code}]},
            }
            for n, code in enumerate(claim.diagnoses, 1)
        ]
    return body


def from_fhir(body: dict[str, Any]) -> ClaimData:
    """Read a ``Claim`` written by :func:`to_fhir` back into :class:`ClaimData`."""
    parts = {c["id"]: c for c in body.get("contained", [])}
    patient, payer_org = parts["subscriber"], parts["payer"]
    coverage, provider = parts["coverage"], parts["provider"]
    extensions = {e["url"]: e for e in body.get("extension", [])}
    institutional = body["type"]["coding"][0]["code"] == "institutional"
    attending = None
    if "attending" in parts:
        person = parts["attending"]
        attending = Practitioner(
            _ident(person, NPI_SYSTEM), person["name"][0]["family"], person["name"][0]["given"][0]
        )
    birth = patient.get("birthDate")
    items = body.get("item", [])
    location = items[0].get("locationCodeableConcept") if items else None
    address = _read_address(provider.get("address"))
    return ClaimData(
        claim_number=_ident(body, CLAIM_NUMBER_SYSTEM),
        form=Form.INSTITUTIONAL if institutional else Form.PROFESSIONAL,
        site_type=extensions[SITE_TYPE_SYSTEM]["valueCode"],
        place_of_service=None if location is None else location["coding"][0]["code"],
        type_of_bill=body["subType"]["coding"][0]["code"] if "subType" in body else None,
        billing=BillingProvider(
            provider["name"],
            _ident(provider, NPI_SYSTEM),
            _ident(provider, EIN_SYSTEM),
            address or PostalAddress((), "", "", ""),
        ),
        attending=attending,
        subscriber=Subscriber(
            family=patient["name"][0]["family"],
            given=patient["name"][0]["given"][0],
            birth_date=None if birth is None else date.fromisoformat(birth),
            gender=patient.get("gender"),
            member_id=coverage["subscriberId"],
            address=_read_address(patient.get("address")),
        ),
        payer=Payer(
            _ident(payer_org, PAYER_ID_SYSTEM),
            payer_org["name"],
            payer_org["type"][0]["coding"][0]["code"],
            coverage["type"]["coding"][0]["code"],
        ),
        service_date=date.fromisoformat(body["billablePeriod"]["start"]),
        diagnoses=tuple(
            d["diagnosisCodeableConcept"]["coding"][0]["code"] for d in body.get("diagnosis", [])
        ),
        lines=tuple(
            ServiceLine(
                item["productOrService"]["coding"][0]["code"],
                _cents(item["net"]),
                int(item["quantity"]["value"]),
                date.fromisoformat(item["servicedDate"]),
                item["revenue"]["coding"][0]["code"] if "revenue" in item else None,
            )
            for item in items
        ),
        total_cents=_cents(body["total"]),
        patient_id=body["patient"]["reference"].removeprefix("Patient/"),
        encounter_id=_ident(body, ENCOUNTER_SYSTEM),
        fee_cents=_cents(extensions[FEE_URL]["valueMoney"]),
        override_reason=extensions.get(OVERRIDE_URL, {}).get("valueString"),
    )
