"""A small, strict reader of X12 interchanges (999, 277CA, 835 come back to us as X12).

Pure: text in, :class:`Interchange` out, no I/O. The delimiters are taken from the ISA
(element separator at byte 4, component separator ISA16, segment terminator after it), the
envelope is checked (ISA/IEA control numbers and group count, GS/GE, ST/SE control numbers
and segment counts), and anything else raises the one documented :class:`X12ReadError` with
a message that names segment ids and positions, never a value (a value may be PHI).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{1,2}")
ISA_LENGTH = 106  # the fixed-width ISA segment including its terminator


class X12ReadError(ValueError):
    """The text is not a well-formed X12 interchange (message safe to show: no values)."""


@dataclass(frozen=True, slots=True)
class Segment:
    """One segment: its id and elements (``elements[0]`` is the id, so ``[n]`` is XXnn)."""

    elements: tuple[str, ...]
    position: int  # 1-based within its transaction set (ST = 1)

    @property
    def id(self) -> str:
        """The segment id (``"CLP"``)."""
        return self.elements[0]

    def get(self, n: int) -> str:
        """Element ``n`` (1-based, as XX01), ``""`` when absent."""
        return self.elements[n] if n < len(self.elements) else ""


@dataclass(frozen=True, slots=True)
class TransactionSet:
    """ST..SE: its id (``"999"``), control number (ST02) and body segments (ST and SE included)."""

    id: str
    control: str
    segments: tuple[Segment, ...]


@dataclass(frozen=True, slots=True)
class Group:
    """GS..GE: functional identifier (GS01), control number, version (GS08), its sets."""

    functional_id: str
    control: str
    version: str
    sets: tuple[TransactionSet, ...]


@dataclass(frozen=True, slots=True)
class Interchange:
    """ISA..IEA with its groups; ``component`` is the component separator (ISA16)."""

    control: str
    sender: str
    receiver: str
    component: str
    groups: tuple[Group, ...]


def read(text: str) -> Interchange:
    """Parse and check one interchange; raises :class:`X12ReadError` on anything malformed."""
    if not isinstance(text, str):
        raise X12ReadError("not text")
    body = text.lstrip("\ufeff \r\n\t")
    if not body.startswith("ISA") or len(body) < ISA_LENGTH:
        raise X12ReadError("does not start with a complete ISA segment")
    element, component, terminator = body[3], body[104], body[105]
    if len({element, component, terminator}) != 3 or any(
        c.isalnum() or c == " " for c in (element, component, terminator)
    ):
        raise X12ReadError("the ISA does not declare three distinct delimiters")
    raw = [s.strip("\r\n") for s in body.split(terminator)]
    if raw and raw[-1].strip() == "":
        raw.pop()
    else:
        raise X12ReadError("the last segment is not terminated")
    segments = [tuple(s.split(element)) for s in raw]
    for index, seg in enumerate(segments):
        if not _SEGMENT_ID.fullmatch(seg[0]):
            raise X12ReadError(f"segment {index + 1}: not a segment id")
    isa = segments[0]
    if isa[0] != "ISA" or len(isa) != 17:
        raise X12ReadError("the ISA does not have 16 elements")
    if segments[-1][0] != "IEA" or len(segments[-1]) != 3:
        raise X12ReadError("the interchange does not end with an IEA")
    if segments[-1][2] != isa[13]:
        raise X12ReadError("IEA02 does not match ISA13")
    groups: list[Group] = []
    index = 1
    while index < len(segments) - 1:
        gs = segments[index]
        if gs[0] != "GS" or len(gs) < 9:
            raise X12ReadError(f"segment {index + 1}: expected GS, found {gs[0]}")
        index += 1
        sets: list[TransactionSet] = []
        while index < len(segments) - 1 and segments[index][0] == "ST":
            st = segments[index]
            if len(st) < 3:
                raise X12ReadError(f"segment {index + 1}: ST without a control number")
            start = index
            while index < len(segments) - 1 and segments[index][0] not in ("SE", "GE", "IEA"):
                index += 1
            se = segments[index]
            if se[0] != "SE" or len(se) < 3:
                raise X12ReadError(f"transaction set {st[2]}: no SE trailer")
            count = index - start + 1
            if se[2] != st[2]:
                raise X12ReadError(f"transaction set {st[2]}: SE02 does not match ST02")
            if se[1] != str(count):
                raise X12ReadError(
                    f"transaction set {st[2]}: SE01 says {se[1]} segments, there are {count}"
                )
            body_segs = tuple(
                Segment(seg, n) for n, seg in enumerate(segments[start : index + 1], 1)
            )
            sets.append(TransactionSet(st[1], st[2], body_segs))
            index += 1
        ge = segments[index] if index < len(segments) else ("",)
        if ge[0] != "GE" or len(ge) < 3:
            raise X12ReadError(f"group {gs[6]}: no GE trailer")
        if ge[2] != gs[6]:
            raise X12ReadError(f"group {gs[6]}: GE02 does not match GS06")
        if ge[1] != str(len(sets)):
            raise X12ReadError(f"group {gs[6]}: GE01 says {ge[1]} sets, there are {len(sets)}")
        groups.append(Group(gs[1], gs[6], gs[8], tuple(sets)))
        index += 1
    if segments[-1][1] != str(len(groups)):
        raise X12ReadError(f"IEA01 says {segments[-1][1]} groups, there are {len(groups)}")
    if not groups:
        raise X12ReadError("the interchange holds no functional group")
    return Interchange(isa[13], isa[6].strip(), isa[8].strip(), component, tuple(groups))
