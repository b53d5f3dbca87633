"""Acknowledgements and remittances as typed results: 999, 277CA and 835, in plain words.

Pure: an :class:`~.x12_read.Interchange` in, a typed result out (bthome-ble style), no I/O.
Each parser checks what it relies on and raises :class:`AckError` (one root, a
``ValueError``) with a message that never quotes a value: a 999's IK4 may copy the bad data
(IK404) and an 835 names the patient (NM1*QC), so only codes, ids and amounts are read.

Code lists (X12 external code sources, the common subset; any other code is shown by number):
999 IK3 (716), IK4 (723), IK5/AK9 (717/715); 277CA STC claim status category (507) and
claim status (508) codes; 835 claim adjustment group and reason codes (CARC, 139).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from services.claims.model import to_cents
from services.claims.x12_read import Interchange, Segment, X12ReadError, read


class AckError(ValueError):
    """An acknowledgement or remittance we cannot apply (message safe to show: no values)."""


SEGMENT_ERRORS = {
    "1": "unrecognised segment",
    "2": "unexpected segment",
    "3": "required segment missing",
    "4": "loop occurs more often than allowed",
    "5": "segment used more often than allowed",
    "6": "segment not in the transaction set",
    "7": "segment out of order",
    "8": "segment has data element errors",
    "I4": "segment present that the implementation guide says is not used",
    "I6": "implementation-dependent segment missing",
    "I7": "loop occurs fewer times than the implementation guide requires",
    "I8": "segment used fewer times than the implementation guide requires",
    "I9": "segment present that the implementation guide says is not used here",
}
ELEMENT_ERRORS = {
    "1": "required element missing",
    "2": "conditionally required element missing",
    "3": "too many elements",
    "4": "element too short",
    "5": "element too long",
    "6": "invalid character in element",
    "7": "invalid code value",
    "8": "invalid date",
    "9": "invalid time",
    "10": "exclusion condition violated",
    "12": "too many repetitions",
    "13": "too many components",
    "I6": "code value not used by this implementation guide",
    "I9": "implementation-dependent element missing",
    "I10": "element present that the implementation guide says is not used",
    "I11": "too few repetitions",
    "I12": "value does not match the implementation guide's pattern",
    "I13": "element present that the implementation guide says is not used here",
}
ELEMENT_NAMES = {
    "66": "identification code qualifier",
    "67": "identification code (e.g. an NPI or member id)",
    "98": "entity identifier code",
    "116": "postal code",
    "127": "reference identification",
    "156": "state code",
    "782": "monetary amount",
    "1028": "claim submitter's identifier",
    "1035": "last or organisation name",
    "1036": "first name",
    "1251": "date",
    "1331": "facility code (place of service or type of bill)",
}
SET_RESULTS = {
    "A": "accepted",
    "E": "accepted with errors noted",
    "M": "rejected: message authentication failed",
    "P": "partially accepted",
    "R": "rejected",
    "W": "rejected: failed validity tests",
    "X": "rejected: could not be analysed after decryption",
}
STATUS_CATEGORIES = {
    "A0": ("forwarded to another entity", None),
    "A1": ("received by the clearinghouse or payer", True),
    "A2": ("accepted into the payer's adjudication system", True),
    "A3": ("returned as unprocessable", False),
    "A4": ("not found", False),
    "A5": ("split", True),
    "A6": ("rejected: information missing", False),
    "A7": ("rejected: information invalid", False),
    "A8": ("rejected: fields contradict each other", False),
}
STATUS_CODES = {
    "0": "no further status available",
    "19": "entity acknowledges receipt of the claim",
    "20": "accepted for processing",
    "21": "missing or invalid information",
    "116": "claim submitted to the wrong payer",
    "128": "the entity's tax id",
    "187": "the date(s) of service",
    "254": "the principal diagnosis code",
    "400": "claim is out of balance",
    "454": "the procedure code",
    "562": "the entity's NPI",
}
ENTITIES = {
    "41": "submitter",
    "40": "receiver",
    "85": "billing provider",
    "71": "attending provider",
    "IL": "subscriber",
    "QC": "patient",
    "PR": "payer",
}
ADJUSTMENT_GROUPS = {
    "CO": "contractual obligation",
    "PR": "patient responsibility",
    "OA": "other adjustment",
    "PI": "payer-initiated reduction",
    "CR": "correction or reversal",
}
ADJUSTMENT_REASONS = {
    "1": "deductible",
    "2": "coinsurance",
    "3": "copayment",
    "16": "the claim lacks information needed to adjudicate it",
    "18": "duplicate claim or service",
    "29": "the time limit for filing has expired",
    "45": "charge exceeds the fee schedule or maximum allowable",
    "50": "not deemed medically necessary by the payer",
    "96": "non-covered charge",
    "97": "included in the payment for another service",
    "109": "not covered by this payer: send it to the correct payer",
    "253": "sequestration (federal payment reduction)",
}


@dataclass(frozen=True, slots=True)
class SetAck:
    """A 999's answer for one transaction set (one claim): AK2/IK3/IK4/IK5."""

    st_control: str
    code: str  # IK501
    accepted: bool
    messages: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Ack999:
    """A 999: the group it answers (AK1 GS06), the per-set answers, and AK9."""

    control: str
    group_control: str
    group_code: str
    sets: tuple[SetAck, ...]


@dataclass(frozen=True, slots=True)
class ClaimStatus277:
    """One claim's status in a 277CA (2200D TRN*2 + STC)."""

    claim_number: str
    accepted: bool | None  # None: informational (A0)
    codes: tuple[str, ...]  # "A7:562:85" composites
    messages: tuple[str, ...]
    payer_claim_id: str | None


@dataclass(frozen=True, slots=True)
class Ack277:
    """A 277CA: each claim's status."""

    control: str
    claims: tuple[ClaimStatus277, ...]


@dataclass(frozen=True, slots=True)
class Adjustment:
    """One CAS adjustment: group (CO/PR/OA/PI/CR), reason code, cents."""

    group: str
    reason: str
    cents: int

    def words(self) -> str:
        """``$0.62 contractual obligation: charge exceeds the fee schedule (CO-45)``."""
        group = ADJUSTMENT_GROUPS.get(self.group, f"group {self.group}")
        reason = ADJUSTMENT_REASONS.get(self.reason, f"reason code {self.reason}")
        sign = "-" if self.cents < 0 else ""
        cents = abs(self.cents)
        return f"{sign}${cents // 100}.{cents % 100:02d} {group}: {reason} ({self.group}-{self.reason})"


@dataclass(frozen=True, slots=True)
class Remittance:
    """One CLP of an 835, reconciled (billed = paid + every adjustment)."""

    claim_number: str
    status_code: str
    billed_cents: int
    paid_cents: int
    patient_cents: int
    allowed_cents: int
    adjustments: tuple[Adjustment, ...]
    payer_claim_id: str | None

    @property
    def denied(self) -> bool:
        """CLP02 4 (denied), or nothing paid and nothing owed by the patient."""
        return self.status_code == "4" or (self.paid_cents == 0 and self.patient_cents == 0)

    @property
    def reversal(self) -> bool:
        """CLP02 22: the payer takes back an earlier payment (a person handles it)."""
        return self.status_code == "22"


@dataclass(frozen=True, slots=True)
class Ack835:
    """An 835: its control number and the claims it pays or denies."""

    control: str
    claims: tuple[Remittance, ...]


def _control_number(text: str | None) -> bool:
    """An X12 control number as the 999 quotes it: 1 to 9 ASCII digits (not "²", not 20 digits)."""
    return text is not None and 0 < len(text) <= 9 and text.isascii() and text.isdigit()


def kind(interchange: Interchange) -> str:
    """``"999"``, ``"277CA"`` or ``"835"`` from the first group's transaction sets."""
    sets = {s.id for g in interchange.groups for s in g.sets}
    if sets == {"999"}:
        return "999"
    if sets == {"277"}:
        return "277CA"
    if sets == {"835"}:
        return "835"
    raise AckError(
        f"not a 999, 277CA or 835 (transaction sets: {', '.join(sorted(sets)) or 'none'})"
    )


def _segments(interchange: Interchange) -> list[Segment]:
    return [seg for g in interchange.groups for s in g.sets for seg in s.segments]


def _ik3(seg: Segment) -> str:
    loop = f" (loop {seg.get(3)})" if seg.get(3) else ""
    what = SEGMENT_ERRORS.get(seg.get(4), f"error code {seg.get(4) or 'missing'}")
    return f"segment {seg.get(1)} at position {seg.get(2)}{loop}: {what}"


def _ik4(seg: Segment, where: str, component: str) -> str:
    position = seg.get(1).replace(component, ".")
    name = ELEMENT_NAMES.get(seg.get(2), f"element {seg.get(2)}" if seg.get(2) else "element")
    what = ELEMENT_ERRORS.get(seg.get(3), f"error code {seg.get(3) or 'missing'}")
    # IK404 (a copy of the bad value) is never read: it may be PHI.
    return f"{where}, element {position} ({name}): {what}"


def parse_999(interchange: Interchange) -> Ack999:
    """Per-set answers of a 999; IK3/IK4 become plain-word messages on the set."""
    if kind(interchange) != "999":
        raise AckError("not a 999")
    results: list[SetAck] = []
    group_control = group_code = ""
    for group in interchange.groups:
        for tset in group.sets:
            current: str | None = None
            messages: list[str] = []
            where = "the transaction set"
            for seg in tset.segments:
                if seg.id == "AK1":
                    group_control = seg.get(2)
                elif seg.id == "AK2":
                    current, messages = seg.get(2), []
                    if not _control_number(current):
                        raise AckError("AK2 without a numeric transaction set control number")
                elif seg.id == "IK3":
                    where = f"segment {seg.get(1)} at position {seg.get(2)}"
                    messages.append(_ik3(seg))
                elif seg.id == "IK4":
                    messages.append(_ik4(seg, where, interchange.component))
                elif seg.id == "IK5":
                    if current is None:
                        raise AckError("IK5 without an AK2")
                    code = seg.get(1)
                    if code not in SET_RESULTS:
                        raise AckError("IK501 is not an acknowledgement code")
                    messages.insert(0, f"999: {SET_RESULTS[code]}")
                    results.append(SetAck(current, code, code in ("A", "E"), tuple(messages)))
                    current = None
                elif seg.id == "AK9":
                    group_code = seg.get(1)
                    if group_code not in SET_RESULTS:
                        raise AckError("AK901 is not an acknowledgement code")
            if current is not None:
                raise AckError("AK2 without its IK5")
    if not _control_number(group_control):
        raise AckError("the 999 has no AK1 naming the group it answers")
    if not group_code:
        raise AckError("the 999 has no AK9")
    return Ack999(interchange.control, group_control, group_code, tuple(results))


def _stc_words(composite: str, component: str) -> tuple[bool | None, str]:
    parts = composite.split(component)
    category = parts[0]
    if category not in STATUS_CATEGORIES:
        raise AckError("STC01 is not a claim status category code")
    words, accepted = STATUS_CATEGORIES[category]
    text = f"277CA {category}: {words}"
    if len(parts) > 1 and parts[1]:
        text += f"; {STATUS_CODES.get(parts[1], f'status code {parts[1]}')}"
    if len(parts) > 2 and parts[2]:
        text += f" ({ENTITIES.get(parts[2], f'entity {parts[2]}')})"
    return accepted, text


def parse_277ca(interchange: Interchange) -> Ack277:
    """Claim-level statuses (TRN*2 = our claim number, then its STC segments)."""
    if kind(interchange) != "277CA":
        raise AckError("not a 277CA")
    found: list[ClaimStatus277] = []
    comp = interchange.component
    claim: str | None = None
    codes: list[str] = []
    messages: list[str] = []
    verdicts: list[bool | None] = []
    payer_id: str | None = None

    def close() -> None:
        if claim is None:
            return
        if not codes:
            raise AckError("a claim in the 277CA has no STC status")
        accepted: bool | None = None
        if False in verdicts:
            accepted = False
        elif True in verdicts:
            accepted = True
        found.append(ClaimStatus277(claim, accepted, tuple(codes), tuple(messages), payer_id))

    level = ""
    for seg in _segments(interchange):
        if seg.id == "TRN" and seg.get(1) == "2" and level == "PT":  # 2200D: the claim
            close()
            claim, codes, messages, verdicts, payer_id = seg.get(2), [], [], [], None
            if not claim:
                raise AckError("TRN*2 without a claim number")
        elif seg.id == "HL" or seg.id == "SE":
            close()
            claim, level = None, seg.get(3)
        elif seg.id == "STC" and claim is not None:
            for composite in (seg.get(1), seg.get(10), seg.get(11)):
                if composite:
                    accepted, words = _stc_words(composite, comp)
                    codes.append(composite.replace(comp, ":"))
                    messages.append(words)
                    verdicts.append(accepted)
        elif seg.id == "REF" and seg.get(1) == "1K" and claim is not None:
            payer_id = seg.get(2) or None
    close()
    return Ack277(interchange.control, tuple(found))


def _cents(text: str, what: str) -> int:
    if not re.fullmatch(r"-?[0-9]{1,10}(\.[0-9]{1,2})?", text):
        raise AckError(f"{what} is not an amount")
    try:
        return to_cents(Decimal(text))
    except InvalidOperation:  # pragma: no cover - the pattern already refuses
        raise AckError(f"{what} is not an amount") from None


def _cas(seg: Segment) -> list[Adjustment]:
    group = seg.get(1)
    if group not in ADJUSTMENT_GROUPS:
        raise AckError("CAS01 is not an adjustment group code")
    found = []
    for first in (2, 5, 8, 11, 14, 17):
        reason = seg.get(first)
        if not reason:
            continue
        found.append(Adjustment(group, reason, _cents(seg.get(first + 1), "a CAS amount")))
    if not found:
        raise AckError("CAS without an adjustment")
    return found


def parse_835(interchange: Interchange) -> Ack835:
    """Each CLP with its CAS adjustments (claim and service level), reconciled."""
    if kind(interchange) != "835":
        raise AckError("not an 835")
    found: list[Remittance] = []
    clp: Segment | None = None
    adjustments: list[Adjustment] = []

    def close() -> None:
        if clp is None:
            return
        billed = _cents(clp.get(3), "CLP03")
        paid = _cents(clp.get(4), "CLP04")
        patient = _cents(clp.get(5), "CLP05") if clp.get(5) else 0
        number = clp.get(1)
        total = sum(a.cents for a in adjustments)
        if billed - total != paid:
            raise AckError(
                f"claim {number}: billed minus adjustments is not the paid amount (the 835 is "
                "out of balance)"
            )
        owed = sum(a.cents for a in adjustments if a.group == "PR")
        if clp.get(5) and owed != patient:
            raise AckError(f"claim {number}: patient responsibility does not match its CAS*PR")
        allowed = billed - sum(a.cents for a in adjustments if a.group != "PR")
        found.append(
            Remittance(
                number,
                clp.get(2),
                billed,
                paid,
                patient,
                allowed,
                tuple(adjustments),
                clp.get(7) or None,
            )
        )

    for seg in _segments(interchange):
        if seg.id == "CLP":
            close()
            clp, adjustments = seg, []
            status = seg.get(2)
            if not seg.get(1) or not (status.isascii() and status.isdigit() and len(status) <= 2):
                raise AckError("CLP without a claim number or status")
        elif seg.id in ("LX", "SE", "PLB"):
            close()
            clp = None
        elif seg.id == "CAS" and clp is not None:
            adjustments += _cas(seg)
    close()
    return Ack835(interchange.control, tuple(found))


Parsed = Ack999 | Ack277 | Ack835


def parse(text: str) -> tuple[str, Parsed]:
    """Read any of the three; ``(kind, result)``. Raises :class:`AckError` for anything else."""
    try:
        interchange = read(text)
    except X12ReadError as exc:
        raise AckError(str(exc)) from None
    found = kind(interchange)
    if found == "999":
        return found, parse_999(interchange)
    if found == "277CA":
        return found, parse_277ca(interchange)
    return found, parse_835(interchange)
