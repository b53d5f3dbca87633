"""Our own pre-submission checks, beyond what X12 syntax validation (pyx12) can see.

pyx12 checks segment structure and code lists; it checks neither the NPI check digit nor
that the lines add up to CLM02 (REFERENCE.md). Each failure is a :class:`Problem` whose
message names the field and the rule but never quotes the value (it may be PHI), and is
stored on the claim. Pure functions: "today" is a parameter.
"""

from __future__ import annotations

import re
from datetime import date, timedelta

from appliance.config import npi_is_valid
from services.claims.model import ClaimData, Form, PostalAddress, Problem

# The MBI (CMS, "Understanding the Medicare Beneficiary Identifier format"): 11 characters,
# position 1 a digit 1-9; 4, 7, 10, 11 digits; 2, 5, 8, 9 letters; 3 and 6 a letter or digit.
# Letters never used: S, L, O, I, B, Z.
_MBI_LETTER = "[AC-HJKMNP-RT-Y]"
_MBI_EITHER = "[AC-HJKMNP-RT-Y0-9]"
MBI_PATTERN = re.compile(
    f"[1-9]{_MBI_LETTER}{_MBI_EITHER}[0-9]{_MBI_LETTER}{_MBI_EITHER}[0-9]"
    f"{_MBI_LETTER}{_MBI_LETTER}[0-9][0-9]"
)
_ICD10_CM = re.compile(r"[A-Z][0-9][0-9A-Z]([0-9A-Z]{1,4})?")  # U codes too (U07.1)
_ZIP9 = re.compile(r"[0-9]{9}")
_EIN = re.compile(r"[0-9]{9}")


def mbi_is_valid(mbi: str) -> bool:
    """Whether ``mbi`` has the Medicare Beneficiary Identifier format (no dashes)."""
    return MBI_PATTERN.fullmatch(mbi) is not None


def _address_problems(address: PostalAddress | None, who: str, code: str) -> list[Problem]:
    if address is None or not address.lines or not address.city:
        return [Problem(code, f"{who} address: street and city are required")]
    problems = []
    if len(address.state) != 2:
        problems.append(Problem(code, f"{who} address: a 2-letter state code is required"))
    digits = address.postal_code.replace("-", "")
    if not re.fullmatch(r"[0-9]{5}([0-9]{4})?", digits):
        problems.append(Problem(code, f"{who} address: the ZIP code must be 5 or 9 digits"))
    return problems


def check(claim: ClaimData, *, today: date, timely_filing_days: int) -> list[Problem]:
    """Every problem with ``claim``; an empty list means it may be submitted."""
    p: list[Problem] = []
    billing = claim.billing
    if not npi_is_valid(billing.npi):
        p.append(
            Problem(
                "npi",
                "billing provider NPI (site.npi): fails the check digit (Luhn with prefix 80840)",
            )
        )
    if not _EIN.fullmatch(billing.tax_id):
        p.append(Problem("tax-id", "billing provider tax id (site.tax_id): must be a 9-digit EIN"))
    if not billing.name.strip():
        p.append(Problem("site-data", "billing provider name (site.name) is missing"))
    p += _address_problems(billing.address, "billing provider (site.address)", "site-data")
    if not _ZIP9.fullmatch(billing.address.postal_code.replace("-", "")):
        p.append(
            Problem(
                "site-data",
                "billing provider ZIP (site.address.postal_code): the "
                "837 requires ZIP+4 (9 digits)",
            )
        )
    if claim.form is Form.INSTITUTIONAL:
        if claim.attending is None:
            p.append(
                Problem(
                    "site-data",
                    "attending provider (claims.attending_npi, "
                    "attending_family, attending_given) is required on an 837I",
                )
            )
        elif not npi_is_valid(claim.attending.npi):
            p.append(
                Problem(
                    "npi",
                    "attending provider NPI (claims.attending_npi): fails the "
                    "check digit (Luhn with prefix 80840)",
                )
            )
        if not claim.type_of_bill or not re.fullmatch(r"[0-9]{3}", claim.type_of_bill):
            p.append(Problem("site-data", "type of bill missing for an 837I"))
        if any(line.revenue_code != "0780" for line in claim.lines):
            p.append(Problem("line", "every 837I line of Q3014 needs revenue code 0780"))
    elif claim.place_of_service != "11":
        p.append(Problem("site-data", "place of service must be 11 (office) on an 837P"))

    sub = claim.subscriber
    if claim.payer.kind == "medicare" and not mbi_is_valid(sub.member_id):
        p.append(
            Problem(
                "mbi",
                "subscriber MBI: not in the Medicare Beneficiary Identifier "
                "format (11 characters, no dashes, no S L O I B Z)",
            )
        )
    if not sub.member_id.strip():
        p.append(Problem("member-id", "subscriber member id is missing"))
    if not sub.family.strip() or not sub.given.strip():
        p.append(Problem("patient", "subscriber family and given name are required"))
    if sub.birth_date is None:
        p.append(Problem("patient", "subscriber birth date is missing"))
    if sub.gender not in ("male", "female", "other", "unknown"):
        p.append(Problem("patient", "subscriber administrative gender is missing"))
    p += _address_problems(sub.address, "subscriber", "patient")

    if not claim.diagnoses:
        p.append(Problem("diagnosis", "no diagnosis code: the visit needs at least one ICD-10-CM"))
    for index, code in enumerate(claim.diagnoses, 1):
        if not _ICD10_CM.fullmatch(code):
            p.append(Problem("diagnosis", f"diagnosis {index}: not an ICD-10-CM code"))

    if not claim.lines:
        p.append(Problem("line", "the claim has no service line"))
    if sum(line.charge_cents * 1 for line in claim.lines) != claim.total_cents:
        p.append(Problem("totals", "the total charge (CLM02) is not the sum of the line charges"))
    for index, line in enumerate(claim.lines, 1):
        if line.charge_cents <= 0 or line.units < 1:
            p.append(Problem("line", f"line {index}: charge and units must be positive"))
        if line.code != "Q3014":
            p.append(Problem("line", f"line {index}: the procedure code must be Q3014"))
        if line.service_date != claim.service_date:
            p.append(Problem("dates", f"line {index}: service date differs from the claim's"))

    day = claim.service_date
    if day > today:
        p.append(Problem("dates", "date of service is in the future"))
    if sub.birth_date is not None and day < sub.birth_date:
        p.append(Problem("dates", "date of service is before the patient's birth"))
    if sub.birth_date is not None and sub.birth_date > today:
        p.append(Problem("dates", "birth date is in the future"))
    if today > day + timedelta(days=timely_filing_days):
        p.append(
            Problem(
                "dates",
                f"past the timely filing limit ({timely_filing_days} days "
                "after the date of service)",
            )
        )
    if not claim.claim_number or len(claim.claim_number) > 20:
        p.append(Problem("claim-number", "claim number (CLM01) must be 1-20 characters"))
    return p
