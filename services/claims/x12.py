"""X12 837P (005010X222A1) and 837I (005010X223A2) for Q3014 claims: pure text builders.

One interchange (ISA/IEA) holds one functional group (GS/GE) of one form, and each claim is
its own transaction set (ST/SE): a 999 acknowledges per transaction set, so one set per claim
maps an acceptance or a rejection to exactly one claim. Control numbers come from the caller
(persisted and increasing: :mod:`.service`); so does the creation time, which makes an
interchange reproducible byte for byte from what the store keeps. Skeleton: REFERENCE.md,
"Originating-site facility fee (HCPCS Q3014)".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from services.claims.model import ClaimData, Form, PostalAddress, money

VERSIONS = {Form.PROFESSIONAL: "005010X222A1", Form.INSTITUTIONAL: "005010X223A2"}
_GENDER = {"female": "F", "male": "M"}
_NOT_ALLOWED = re.compile(r"[^A-Z0-9 .,&'/#-]")  # delimiters (* : ^ ~) can never get in


@dataclass(frozen=True, slots=True)
class Envelope:
    """Who sends to whom, and the interchange's control numbers and time."""

    submitter_name: str
    submitter_id: str
    contact_name: str
    contact_phone: str
    receiver_name: str
    receiver_id: str
    usage: str  # "T" test | "P" production (ISA15)
    interchange_control: int  # ISA13 / IEA02, 1..999999999
    group_control: int  # GS06 / GE02
    created: datetime  # local time of the site


def clean(text: str, limit: int = 60) -> str:
    """Upper-case, delimiter-free, single-spaced text cut to ``limit`` characters."""
    upper = text.upper().replace("*", " ").replace("~", " ")
    return " ".join(_NOT_ALLOWED.sub(" ", upper).split())[:limit].strip()


def _seg(*elements: str) -> str:
    parts = list(elements)
    while len(parts) > 1 and parts[-1] == "":
        parts.pop()
    return "*".join(parts)


def _address(address: PostalAddress) -> list[str]:
    lines = [clean(line, 55) for line in address.lines[:2]]
    return [
        _seg("N3", *lines),
        _seg("N4", clean(address.city, 30), address.state, address.postal_code.replace("-", "")),
    ]


def transaction(claim: ClaimData, st_control: int, envelope: Envelope) -> list[str]:
    """The segments of one claim's transaction set, ST through SE (without terminators)."""
    form = claim.form
    version = VERSIONS[form]
    st = f"{st_control:04d}"
    when = envelope.created
    billing, sub, payer = claim.billing, claim.subscriber, claim.payer
    segs = [
        _seg("ST", "837", st, version),
        _seg(
            "BHT",
            "0019",
            "00",
            f"{envelope.interchange_control}{st}",
            when.strftime("%Y%m%d"),
            when.strftime("%H%M"),
            "CH",
        ),
        _seg(
            "NM1",
            "41",
            "2",
            clean(envelope.submitter_name),
            "",
            "",
            "",
            "",
            "46",
            envelope.submitter_id,
        ),
        _seg("PER", "IC", clean(envelope.contact_name), "TE", envelope.contact_phone),
        _seg(
            "NM1",
            "40",
            "2",
            clean(envelope.receiver_name),
            "",
            "",
            "",
            "",
            "46",
            envelope.receiver_id,
        ),
        _seg("HL", "1", "", "20", "1"),
        _seg("NM1", "85", "2", clean(billing.name), "", "", "", "", "XX", billing.npi),
        *_address(billing.address),
        _seg("REF", "EI", billing.tax_id),
        _seg("HL", "2", "1", "22", "0"),
        _seg("SBR", "P", "18", "", "", "", "", "", "", payer.filing_indicator),
        _seg(
            "NM1",
            "IL",
            "1",
            clean(sub.family, 60),
            clean(sub.given, 35),
            "",
            "",
            "",
            "MI",
            clean(sub.member_id, 80).replace(" ", ""),
        ),
    ]
    if sub.address is not None:
        segs += _address(sub.address)
    if sub.birth_date is not None:
        segs.append(
            _seg("DMG", "D8", sub.birth_date.strftime("%Y%m%d"), _GENDER.get(sub.gender or "", "U"))
        )
    segs.append(_seg("NM1", "PR", "2", clean(payer.name), "", "", "", "", "PI", payer.id))
    total = money(claim.total_cents)
    day = claim.service_date.strftime("%Y%m%d")
    dx = list(claim.diagnoses)
    if form is Form.PROFESSIONAL:
        segs.append(
            _seg(
                "CLM",
                claim.claim_number,
                total,
                "",
                "",
                f"{claim.place_of_service}:B:1",
                "Y",
                "A",
                "Y",
                "Y",
            )
        )
        segs.append(
            _seg("HI", *(f"{'ABK' if i == 0 else 'ABF'}:{code}" for i, code in enumerate(dx[:12])))
        )
        for number, line in enumerate(claim.lines, 1):
            segs += [
                _seg("LX", str(number)),
                _seg(
                    "SV1",
                    f"HC:{line.code}",
                    money(line.charge_cents),
                    "UN",
                    str(line.units),
                    "",
                    "",
                    "1",
                ),
                _seg("DTP", "472", "D8", line.service_date.strftime("%Y%m%d")),
            ]
    else:
        tob = claim.type_of_bill or "131"
        segs += [
            _seg(
                "CLM",
                claim.claim_number,
                total,
                "",
                "",
                f"{tob[:2]}:A:{tob[2:]}",
                "",
                "A",
                "Y",
                "Y",
            ),
            _seg("DTP", "434", "RD8", f"{day}-{day}"),
            _seg("CL1", "", "", "01"),
            _seg("HI", f"ABK:{dx[0]}") if dx else _seg("HI"),
            _seg("HI", f"APR:{dx[0]}") if dx else _seg("HI"),
        ]
        if len(dx) > 1:
            segs.append(_seg("HI", *(f"ABF:{code}" for code in dx[1:13])))
        if claim.attending is not None:
            att = claim.attending
            segs.append(
                _seg(
                    "NM1",
                    "71",
                    "1",
                    clean(att.family),
                    clean(att.given, 35),
                    "",
                    "",
                    "",
                    "XX",
                    att.npi,
                )
            )
        for number, line in enumerate(claim.lines, 1):
            segs += [
                _seg("LX", str(number)),
                _seg(
                    "SV2",
                    line.revenue_code or "0780",
                    f"HC:{line.code}",
                    money(line.charge_cents),
                    "UN",
                    str(line.units),
                ),
                _seg("DTP", "472", "D8", line.service_date.strftime("%Y%m%d")),
            ]
    segs.append(_seg("SE", str(len(segs) + 1), st))
    return segs


def interchange(envelope: Envelope, form: Form, claims: Sequence[tuple[ClaimData, int]]) -> str:
    """One ISA/GS/(ST..SE)*/GE/IEA interchange of ``(claim, ST02)`` pairs, all of ``form``."""
    if not claims:
        raise ValueError("an interchange needs at least one claim")
    if any(claim.form is not form for claim, _ in claims):
        raise ValueError(f"every claim of a {form.value} interchange must be a {form.value}")
    when = envelope.created
    icn = f"{envelope.interchange_control:09d}"
    sender = clean(envelope.submitter_id, 15).replace(" ", "")
    receiver = clean(envelope.receiver_id, 15).replace(" ", "")
    segs = [
        "*".join(
            [
                "ISA",
                "00",
                " " * 10,
                "00",
                " " * 10,
                "ZZ",
                f"{sender:<15}",
                "ZZ",
                f"{receiver:<15}",
                when.strftime("%y%m%d"),
                when.strftime("%H%M"),
                "^",
                "00501",
                icn,
                "0",
                envelope.usage,
                ":",
            ]
        ),
        _seg(
            "GS",
            "HC",
            sender,
            receiver,
            when.strftime("%Y%m%d"),
            when.strftime("%H%M"),
            str(envelope.group_control),
            "X",
            VERSIONS[form],
        ),
    ]
    for claim, st_control in claims:
        segs += transaction(claim, st_control, envelope)
    segs += [_seg("GE", str(len(claims)), str(envelope.group_control)), _seg("IEA", "1", icn)]
    return "".join(f"{s}~\n" for s in segs)
