"""IEEE 11073-20601 SFLOAT (16-bit) and FLOAT (32-bit) numbers, as Bluetooth health profiles send them.

Values are exact decimals (``mantissa × 10^exponent``), never binary floats, so 100 % sent as
``64 00`` (mantissa 100, exponent 0) and as ``E8 F3`` (1000 × 10^-1) are the same Decimal.
The special values stay distinct because they mean different things (REFERENCE.md): NaN (no
value), NRes (beyond the resolution), ±INF, and the reserved code.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from drivers.errors import ProtocolError


class Special(StrEnum):
    """IEEE-11073 special values."""

    NAN = "NaN"
    NRES = "NRes"
    POSITIVE_INFINITY = "+INF"
    NEGATIVE_INFINITY = "-INF"
    RESERVED = "reserved"


# Mantissa codes of the specials (they use exponent 0), per format.
_SFLOAT_SPECIALS = {0x07FF: Special.NAN, 0x0800: Special.NRES, 0x07FE: Special.POSITIVE_INFINITY,
                    0x0802: Special.NEGATIVE_INFINITY, 0x0801: Special.RESERVED}
_FLOAT_SPECIALS = {0x7FFFFF: Special.NAN, 0x800000: Special.NRES, 0x7FFFFE: Special.POSITIVE_INFINITY,
                   0x800002: Special.NEGATIVE_INFINITY, 0x800001: Special.RESERVED}


@dataclass(frozen=True, slots=True)
class SFloatValue:
    """A decoded IEEE-11073 number (SFLOAT or FLOAT): finite, or one of the specials."""

    mantissa: int
    exponent: int
    special: Special | None = None

    @property
    def is_finite(self) -> bool:
        """True for an ordinary number."""
        return self.special is None

    def to_decimal(self) -> Decimal:
        """The exact value; raises ValueError for a special value."""
        if self.special is not None:
            raise ValueError(f"{self.special} has no numeric value")
        return Decimal(self.mantissa).scaleb(self.exponent)


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value & (1 << (bits - 1)) else value


def decode_sfloat(data: bytes, offset: int = 0) -> SFloatValue:
    """Decode the SFLOAT at ``data[offset:offset+2]`` (little-endian)."""
    if len(data) < offset + 2:
        raise ProtocolError(f"SFLOAT needs 2 bytes at offset {offset}, have {max(0, len(data) - offset)}")
    raw = int.from_bytes(data[offset : offset + 2], "little")
    mantissa = raw & 0x0FFF
    if mantissa in _SFLOAT_SPECIALS and (raw >> 12) == 0:
        return SFloatValue(0, 0, _SFLOAT_SPECIALS[mantissa])
    return SFloatValue(_signed(mantissa, 12), _signed(raw >> 12, 4))


def decode_float(data: bytes, offset: int = 0) -> SFloatValue:
    """Decode the 32-bit FLOAT at ``data[offset:offset+4]`` (little-endian)."""
    if len(data) < offset + 4:
        raise ProtocolError(f"FLOAT needs 4 bytes at offset {offset}, have {max(0, len(data) - offset)}")
    raw = int.from_bytes(data[offset : offset + 4], "little")
    mantissa = raw & 0xFFFFFF
    if mantissa in _FLOAT_SPECIALS and (raw >> 24) == 0:
        return SFloatValue(0, 0, _FLOAT_SPECIALS[mantissa])
    return SFloatValue(_signed(mantissa, 24), _signed(raw >> 24, 8))


def encode_sfloat(value: SFloatValue) -> bytes:
    """Encode as SFLOAT; raises ValueError when mantissa or exponent do not fit."""
    if value.special is not None:
        code = {v: k for k, v in _SFLOAT_SPECIALS.items()}[value.special]
        return code.to_bytes(2, "little")
    if not -2048 <= value.mantissa <= 2045 or not -8 <= value.exponent <= 7:
        raise ValueError("value does not fit an SFLOAT")
    if (value.mantissa & 0x0FFF) in _SFLOAT_SPECIALS and value.exponent == 0:
        raise ValueError("mantissa collides with a special value")
    return (((value.exponent & 0xF) << 12) | (value.mantissa & 0x0FFF)).to_bytes(2, "little")


def encode_float(value: SFloatValue) -> bytes:
    """Encode as 32-bit FLOAT."""
    if value.special is not None:
        code = {v: k for k, v in _FLOAT_SPECIALS.items()}[value.special]
        return code.to_bytes(4, "little")
    if not -(1 << 23) <= value.mantissa <= (1 << 23) - 3 or not -128 <= value.exponent <= 127:
        raise ValueError("value does not fit a FLOAT")
    return (((value.exponent & 0xFF) << 24) | (value.mantissa & 0xFFFFFF)).to_bytes(4, "little")


def decode_datetime(data: bytes, offset: int = 0) -> datetime | None:
    """Bluetooth Date Time (7 bytes): year u16, month, day, hour, minute, second.

    Year, month or day 0 means unknown → None. The result is naive: the device clock has no
    zone; the caller attaches the site's zone.
    """
    if len(data) < offset + 7:
        raise ProtocolError(f"DateTime needs 7 bytes at offset {offset}, have {max(0, len(data) - offset)}")
    year = int.from_bytes(data[offset : offset + 2], "little")
    month, day, hour, minute, second = data[offset + 2 : offset + 7]
    if year == 0 or month == 0 or day == 0:
        return None
    try:
        return datetime(year, month, day, hour, minute, second)  # noqa: DTZ001 - device wall time, zone attached by the caller
    except ValueError as exc:
        raise ProtocolError(f"DateTime out of range ({exc})") from None


def encode_datetime(moment: datetime | None) -> bytes:
    """Encode a naive wall-clock time (None → all zeros, 'unknown')."""
    if moment is None:
        return bytes(7)
    return moment.year.to_bytes(2, "little") + bytes(
        (moment.month, moment.day, moment.hour, moment.minute, moment.second)
    )
