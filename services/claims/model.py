"""The claim: its content (what both the X12 837 and the FHIR Claim are made from) and states.

States and who moves a claim between them (docs/adr/0006-claims.md)::

    draft ──► ready ──► submitted ──► acknowledged ──► accepted ──► paid
      ▲  │      │          │               │             │
      │  ▼      ▼          ▼               ▼             └──► denied
    (cancelled) draft    in_review       rejected ──► draft (corrected)
                           │
                           ├──► acknowledged / rejected (the answer turned up)
                           └──► ready (proved never received: may be sent again)

A claim being sent is still ``ready`` with ``claims.sending_batch`` set (the intent written
before the request, :mod:`.lifecycle`): it is never picked again meanwhile. ``submitted`` means
the clearinghouse clearly received it; a request that may have landed without a clear answer
(timeout after sending, reset, 5xx, a crash mid-send) goes ``ready → in_review``, never a
blind resend. Money is integer cents; dates are dates.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum


class ClaimStatus(StrEnum):
    """Where a claim is in its life (persisted in ``claims.status``)."""

    DRAFT = "draft"
    READY = "ready"
    SUBMITTED = "submitted"
    IN_REVIEW = "in_review"
    ACKNOWLEDGED = "acknowledged"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    PAID = "paid"
    DENIED = "denied"
    CANCELLED = "cancelled"


_S = ClaimStatus
TRANSITIONS: dict[ClaimStatus, frozenset[ClaimStatus]] = {
    _S.DRAFT: frozenset({_S.READY, _S.CANCELLED}),
    # ready → in_review: only the submitter, for a request that may have landed (lifecycle.py)
    _S.READY: frozenset({_S.DRAFT, _S.SUBMITTED, _S.IN_REVIEW, _S.CANCELLED}),
    _S.SUBMITTED: frozenset({_S.ACKNOWLEDGED, _S.REJECTED, _S.IN_REVIEW}),
    _S.IN_REVIEW: frozenset({_S.ACKNOWLEDGED, _S.REJECTED, _S.READY, _S.CANCELLED}),
    _S.ACKNOWLEDGED: frozenset({_S.ACCEPTED, _S.REJECTED}),
    _S.ACCEPTED: frozenset({_S.PAID, _S.DENIED}),
    _S.REJECTED: frozenset({_S.DRAFT, _S.CANCELLED}),
    _S.PAID: frozenset(),
    _S.DENIED: frozenset({_S.DRAFT}),
    _S.CANCELLED: frozenset(),
}
"""Allowed moves. ``rejected``/``denied`` → ``draft`` is a corrected claim (new frequency)."""

# The content of a claim may be rebuilt (re-checked against a corrected site config) only
# before it has left the box.
EDITABLE = frozenset({ClaimStatus.DRAFT, ClaimStatus.READY})


class Form(StrEnum):
    """The X12 implementation a claim is sent as."""

    PROFESSIONAL = "837P"  # 005010X222A1
    INSTITUTIONAL = "837I"  # 005010X223A2


class DecisionOutcome(StrEnum):
    """What the trigger decided for one finished encounter (``claim_decisions.outcome``)."""

    DRAFTED = "drafted"
    NOT_ELIGIBLE = "not-eligible"
    NOT_AT_SITE = "not-at-site"
    DUPLICATE = "duplicate"
    NOT_TELEHEALTH = "not-telehealth"


def to_cents(amount: Decimal) -> int:
    """Dollars (exact decimal) to whole cents, half up; never through float."""
    return int((amount * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def money(cents: int) -> str:
    """Cents as the X12/FHIR decimal text: ``3185`` → ``"31.85"``."""
    return f"{cents // 100}.{cents % 100:02d}"


@dataclass(frozen=True, slots=True)
class PostalAddress:
    """A postal address as an 837 N3/N4 carries it."""

    lines: tuple[str, ...]
    city: str
    state: str
    postal_code: str


@dataclass(frozen=True, slots=True)
class BillingProvider:
    """The site (2010AA): organisation name, NPI, EIN and address."""

    name: str
    npi: str
    tax_id: str
    address: PostalAddress


@dataclass(frozen=True, slots=True)
class Practitioner:
    """A person on the claim (837I 2310A attending)."""

    npi: str
    family: str
    given: str


@dataclass(frozen=True, slots=True)
class Subscriber:
    """The patient, who is the subscriber (SBR02 = 18): 2010BA."""

    family: str
    given: str
    birth_date: date | None
    gender: str | None  # FHIR administrative gender
    member_id: str  # the MBI for Medicare
    address: PostalAddress | None


@dataclass(frozen=True, slots=True)
class Payer:
    """2010BB payer and the claim filing indicator (SBR09)."""

    id: str
    name: str
    kind: str  # PayerKind value
    filing_indicator: str


@dataclass(frozen=True, slots=True)
class ServiceLine:
    """One 2400 line: Q3014, one unit."""

    code: str
    charge_cents: int
    units: int
    service_date: date
    revenue_code: str | None


@dataclass(frozen=True, slots=True)
class ClaimData:
    """Everything a Q3014 claim says; rendered as X12 (:mod:`.x12`) and FHIR (:mod:`.fhir_claim`)."""

    claim_number: str  # CLM01: patient control number, unique per site
    form: Form
    site_type: str
    place_of_service: str | None  # 837P
    type_of_bill: str | None  # 837I: facility type digits + frequency
    billing: BillingProvider
    attending: Practitioner | None
    subscriber: Subscriber
    payer: Payer
    service_date: date
    diagnoses: tuple[str, ...]  # ICD-10-CM, without the dot
    lines: tuple[ServiceLine, ...]
    total_cents: int
    patient_id: str
    encounter_id: str
    fee_cents: int  # the fee schedule (or payer) amount: what the payer should allow
    override_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Problem:
    """One failed pre-submission check: a stable code and a message a biller can act on.

    Messages never quote the value (it may be PHI); they name the field and the rule.
    """

    code: str
    message: str
