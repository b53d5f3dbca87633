"""IEEE 11073-20601 SFLOAT and FLOAT numbers and the Bluetooth Date Time, as health profiles send them.

Number formats (IEEE 11073-20601 SFLOAT-Type and FLOAT-Type, which the Bluetooth SIG GATT
Specification Supplement calls "medfloat16" and "medfloat32"), little-endian, two's complement:

* SFLOAT, 16 bits: 4-bit exponent (high nibble) and 12-bit mantissa;
* FLOAT, 32 bits: 8-bit exponent (high byte) and 24-bit mantissa;

and the value is ``mantissa × 10^exponent``. Values are kept as that exact pair and converted
to :class:`~decimal.Decimal`, never to a binary float, so SpO2 100 % sent as ``64 00``
(100 × 10^0) by one device and ``E8 F3`` (1000 × 10^-1) by another is the same number
(REFERENCE.md, "Bluetooth SIG GATT health profiles").

Five codes with exponent 0 are special values, and they stay distinct because they mean
different things (NaN: no value; NRes: beyond the sensor's resolution; ±INF; reserved):

=========  ========  ============
special    SFLOAT    FLOAT
=========  ========  ============
NaN        0x07FF    0x007FFFFF
NRes       0x0800    0x00800000
+INF       0x07FE    0x007FFFFE
-INF       0x0802    0x00800002
reserved   0x0801    0x00800001
=========  ========  ============

The same mantissas with any other exponent are ordinary numbers. Decoding is therefore total:
every 16-bit and every 32-bit pattern decodes, and re-encodes to the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from drivers.errors import ProtocolError


class Special(StrEnum):
    """The IEEE 11073-20601 special values, kept distinct because they mean different things."""

    NAN = "NaN"
    NRES = "NRes"
    POSITIVE_INFINITY = "+INF"
    NEGATIVE_INFINITY = "-INF"
    RESERVED = "reserved"


# Raw codes of the specials (exponent 0, so the whole value equals the mantissa field).
_SFLOAT_SPECIALS: dict[int, Special] = {
    0x07FF: Special.NAN,
    0x0800: Special.NRES,
    0x07FE: Special.POSITIVE_INFINITY,
    0x0802: Special.NEGATIVE_INFINITY,
    0x0801: Special.RESERVED,
}
_FLOAT_SPECIALS: dict[int, Special] = {
    0x007FFFFF: Special.NAN,
    0x00800000: Special.NRES,
    0x007FFFFE: Special.POSITIVE_INFINITY,
    0x00800002: Special.NEGATIVE_INFINITY,
    0x00800001: Special.RESERVED,
}
_SFLOAT_CODES = {special: code for code, special in _SFLOAT_SPECIALS.items()}
_FLOAT_CODES = {special: code for code, special in _FLOAT_SPECIALS.items()}

# DateTime year range (GATT Specification Supplement, Date Time: 1582-9999, 0 = not known).
_YEAR_MIN = 1582
_YEAR_MAX = 9999


@dataclass(frozen=True, slots=True)
class SFloatValue:
    """A decoded IEEE-11073 number (from an SFLOAT or a FLOAT): finite, or one special value.

    A finite value is ``mantissa × 10^exponent`` with ``special`` None; the pair is kept as
    sent, so ``SFloatValue(100, 0)`` and ``SFloatValue(1000, -1)`` are different objects with
    equal :meth:`to_decimal`. A special value is ``SFloatValue(0, 0, Special.X)``; its
    mantissa and exponent carry no meaning and must be 0.
    """

    mantissa: int
    exponent: int
    special: Special | None = None

    def __post_init__(self) -> None:
        if self.special is not None and (self.mantissa, self.exponent) != (0, 0):
            raise ValueError("a special value has mantissa 0 and exponent 0")

    @property
    def is_finite(self) -> bool:
        """True for an ordinary number, False for any special value."""
        return self.special is None

    def to_decimal(self) -> Decimal:
        """The exact value; raises ValueError for a special value, which has none."""
        if self.special is not None:
            raise ValueError(f"{self.special} has no numeric value")
        # Built from the digit tuple, so no Decimal context can round it.
        digits = tuple(int(d) for d in str(abs(self.mantissa)))
        return Decimal((int(self.mantissa < 0), digits, self.exponent))


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value & (1 << (bits - 1)) else value


def _need(data: bytes, offset: int, size: int, field: str) -> None:
    if offset < 0 or len(data) < offset + size:
        have = max(0, len(data) - offset)
        raise ProtocolError(f"{field} needs {size} bytes at offset {offset}, {have} left")


def _decode(
    data: bytes,
    offset: int,
    size: int,
    specials: dict[int, Special],
    mantissa_bits: int,
    field: str,
) -> SFloatValue:
    _need(data, offset, size, field)
    raw = int.from_bytes(data[offset : offset + size], "little")
    special = specials.get(raw)
    if special is not None:
        return SFloatValue(0, 0, special)
    mantissa = raw & ((1 << mantissa_bits) - 1)
    exponent_bits = size * 8 - mantissa_bits
    return SFloatValue(
        _signed(mantissa, mantissa_bits), _signed(raw >> mantissa_bits, exponent_bits)
    )


def decode_sfloat(data: bytes, offset: int = 0) -> SFloatValue:
    """Decode the SFLOAT at ``data[offset:offset + 2]``; raises ProtocolError only if short."""
    return _decode(data, offset, 2, _SFLOAT_SPECIALS, 12, "SFLOAT")


def decode_float(data: bytes, offset: int = 0) -> SFloatValue:
    """Decode the 32-bit FLOAT at ``data[offset:offset + 4]``; raises ProtocolError only if short."""
    return _decode(data, offset, 4, _FLOAT_SPECIALS, 24, "FLOAT")


def _encode(value: SFloatValue, mantissa_bits: int, exponent_bits: int, name: str) -> int:
    m_lo, m_hi = -(1 << (mantissa_bits - 1)), (1 << (mantissa_bits - 1)) - 1
    e_lo, e_hi = -(1 << (exponent_bits - 1)), (1 << (exponent_bits - 1)) - 1
    if not (m_lo <= value.mantissa <= m_hi and e_lo <= value.exponent <= e_hi):
        raise ValueError(f"mantissa or exponent does not fit a {name}")
    mask = (1 << mantissa_bits) - 1
    return ((value.exponent & ((1 << exponent_bits) - 1)) << mantissa_bits) | (
        value.mantissa & mask
    )


def encode_sfloat(value: SFloatValue) -> bytes:
    """Encode as SFLOAT (2 bytes, little-endian).

    Raises ValueError when the mantissa (-2048..2047) or exponent (-8..7) does not fit, or when
    a finite value would be read back as a special (mantissa 2046, 2047, -2046..-2048 with
    exponent 0): rescale it first, e.g. 2046 as 205 × 10^1 loses a digit, so the caller decides.
    """
    if value.special is not None:
        return _SFLOAT_CODES[value.special].to_bytes(2, "little")
    raw = _encode(value, 12, 4, "SFLOAT")
    if raw in _SFLOAT_SPECIALS:
        raise ValueError("finite value collides with an SFLOAT special code")
    return raw.to_bytes(2, "little")


def encode_float(value: SFloatValue) -> bytes:
    """Encode as 32-bit FLOAT (4 bytes, little-endian); ValueError as for :func:`encode_sfloat`."""
    if value.special is not None:
        return _FLOAT_CODES[value.special].to_bytes(4, "little")
    raw = _encode(value, 24, 8, "FLOAT")
    if raw in _FLOAT_SPECIALS:
        raise ValueError("finite value collides with a FLOAT special code")
    return raw.to_bytes(4, "little")


def decode_datetime(data: bytes, offset: int = 0) -> datetime | None:
    """Decode the 7-byte Bluetooth Date Time at ``data[offset:offset + 7]``.

    Layout (GATT Specification Supplement, Date Time, 0x2A08): year u16 LE (1582-9999),
    month (1-12), day (1-31), hours (0-23), minutes (0-59), seconds (0-59). Year, month or
    day 0 means "not known" and gives None, since no datetime can be formed.

    The result is NAIVE on purpose: the device clock has no zone (and may be wrong), so the
    caller attaches the site's zone when it decides what the reading's time is. A date or
    time that does not exist raises ProtocolError; its message names the field but not the
    value, because a measurement's date is PHI.
    """
    _need(data, offset, 7, "DateTime")
    year = int.from_bytes(data[offset : offset + 2], "little")
    month, day, hour, minute, second = data[offset + 2 : offset + 7]
    if year == 0 or month == 0 or day == 0:
        return None
    if not _YEAR_MIN <= year <= _YEAR_MAX:
        raise ProtocolError("DateTime year is outside 1582-9999")
    try:
        # Naive by design (see docstring): DTZ001 would have us invent a zone the device lacks.
        return datetime(year, month, day, hour, minute, second)  # noqa: DTZ001
    except ValueError:
        raise ProtocolError("DateTime is not a valid date and time") from None


def encode_datetime(moment: datetime | None) -> bytes:
    """Encode as a 7-byte Bluetooth Date Time; None gives all zeros ("not known").

    The wall-clock fields are written as they are and any tzinfo is dropped, since the format
    has no zone; microseconds are dropped too. Raises ValueError for a year outside 1582-9999.
    """
    if moment is None:
        return bytes(7)
    if not _YEAR_MIN <= moment.year <= _YEAR_MAX:
        raise ValueError("DateTime year must be 1582-9999")
    return moment.year.to_bytes(2, "little") + bytes(
        (moment.month, moment.day, moment.hour, moment.minute, moment.second)
    )
