"""Line-framed device protocols declared in the site config, so a clinic adds a device without code.

Many simple clinic devices print one ASCII result per line over RS-232: a thermometer's
``T=36.8C``, a cuff's ``120,80,72``. A :class:`LineProtocolSpec` says how to cut the stream
into lines (a delimiter such as ``"\\r\\n"`` or ETX ``"\\u0003"``, an optional start byte such
as STX, a maximum length) and how to read one: a regular expression whose named groups are
mapped to LOINC codes and UCUM units by :class:`FieldSpec`. A reading's value is the group's
text as an exact :class:`~decimal.Decimal` times the field's ``scale`` (``0.1`` for a device
that prints tenths without a point). Two examples, in the TOML the site config holds::

    [devices.thermometer.protocol]          # prints "T=36.8C" then CR LF
    name = "thermometer"
    delimiter = "\\r\\n"
    pattern = 'T=(?P<temp>\\d{2,3}\\.\\d)C'
    fields.temp = { loinc = "8310-5", unit = "Cel", display = "Body temperature" }

    [devices.cuff.protocol]                 # prints "SYS,DIA,PULSE" framed STX ... ETX
    name = "csv-cuff"
    start = "\\u0002"
    delimiter = "\\u0003"
    pattern = '(?P<sys>\\d{2,3}),(?P<dia>\\d{2,3}),(?P<pulse>\\d{2,3})'
    fields.sys = { loinc = "8480-6", unit = "mm[Hg]", display = "Systolic blood pressure" }
    fields.dia = { loinc = "8462-4", unit = "mm[Hg]", display = "Diastolic blood pressure" }
    fields.pulse = { loinc = "8867-4", unit = "/min", display = "Heart rate" }

:func:`from_mapping` validates such a table and reports every problem at once with its key
path in :class:`SpecError` (STYLE.md convention 7). :class:`LineFramer` is the framing alone; the Nonin ASCII and
Tanita decoders reuse it. Bytes that belong to no line (before a start byte, or a line longer
than the maximum, which is dropped whole without buffering it) are counted and reported once,
just before the next complete line, so every chunking of a stream gives the same events.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any

from drivers.errors import ProtocolError

_LOINC = re.compile(r"\d{1,7}-\d")
_KEYS = frozenset(
    {"name", "delimiter", "start", "encoding", "max_line_length", "pattern", "fields"}
)
_FIELD_KEYS = frozenset({"loinc", "unit", "display", "scale"})
MAX_LINE_LIMIT = 65536


class SpecError(ValueError):
    """A line-protocol table that does not validate; ``problems`` lists each with its key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("invalid line protocol: " + "; ".join(self.problems))


@dataclass(frozen=True, slots=True)
class Skipped:
    """Bytes the framer dropped: outside any frame, or part of an overlong line."""

    count: int
    reason: str


class LineFramer:
    """Cuts a byte stream into lines; sans-I/O, bounded memory, chunking-independent.

    ``delimiters`` are alternatives (``(b"\\r", b"\\n")`` accepts CR, LF and CR LF, whose
    empty second line is dropped). With ``start`` set, a line begins only after that byte.
    """

    def __init__(
        self, delimiters: tuple[bytes, ...], *, max_length: int, start: bytes | None = None
    ) -> None:
        if not delimiters or not all(delimiters):
            raise ValueError("at least one non-empty delimiter is required")
        alternatives = sorted(delimiters, key=len, reverse=True)
        self._split = re.compile(b"|".join(re.escape(d) for d in alternatives))
        self._longest = len(alternatives[0])
        self._max = max_length
        self._start = start
        self._buffer = bytearray()
        self._in_line = start is None
        self._overlong = False
        self._pending = Skipped(0, "")

    def _skip(self, count: int, reason: str) -> None:
        if count:
            self._pending = Skipped(self._pending.count + count, self._pending.reason or reason)

    def feed(self, data: bytes) -> list[bytes | Skipped]:
        """Complete lines (without delimiter or start byte), each after any skip it ended."""
        out: list[bytes | Skipped] = []
        buf = self._buffer
        buf += data
        pos = 0
        while pos < len(buf):
            if not self._in_line:
                assert self._start is not None
                found = buf.find(self._start, pos)
                end = found if found >= 0 else len(buf)
                self._skip(end - pos, "bytes outside a frame")
                if found < 0:
                    pos = end
                    break
                pos, self._in_line = found + len(self._start), True
                continue
            match = self._split.search(buf, pos)
            if match is None:
                # Keep a possible delimiter prefix; drop an overlong line without buffering it.
                if len(buf) - pos > self._max + self._longest:
                    self._skip(len(buf) - pos, "line longer than the maximum")
                    self._overlong, pos = True, len(buf)
                break
            line = bytes(buf[pos : match.start()])
            pos = match.end()
            self._in_line = self._start is None
            if self._overlong or len(line) > self._max:
                self._skip(len(line), "line longer than the maximum")
                self._overlong = False
                continue
            if self._pending.count:
                out.append(self._pending)
                self._pending = Skipped(0, "")
            if line:
                out.append(line)
        del buf[:pos]
        return out


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """How one named group becomes an observation: LOINC code, UCUM unit, label, scale."""

    loinc_code: str
    ucum_unit: str
    display: str
    scale: Decimal = Decimal(1)


@dataclass(frozen=True, slots=True)
class LineProtocolSpec:
    """A complete line protocol: framing, text encoding, the pattern and its fields."""

    name: str
    delimiter: bytes
    pattern: re.Pattern[str]
    fields: Mapping[str, FieldSpec]
    start: bytes | None = None
    encoding: str = "ascii"
    max_line_length: int = 256


@dataclass(frozen=True, slots=True)
class FieldValue:
    """One decoded value: the group name, its LOINC code and UCUM unit, the exact value."""

    name: str
    loinc: str
    unit: str
    value: Decimal


@dataclass(frozen=True, slots=True)
class LineReading:
    """One line that matched, with its values in the pattern's group order."""

    protocol: str
    values: tuple[FieldValue, ...]


@dataclass(frozen=True, slots=True)
class LineSkipped:
    """A line (or stray bytes) that did not decode; ``reason`` never quotes the data."""

    reason: str
    discarded_bytes: int


def _text(raw: Mapping[str, Any], key: str, path: str, problems: list[str]) -> str | None:
    value = raw.get(key)
    if value is None:
        problems.append(f"{path}{key}: required")
    elif not isinstance(value, str) or not value:
        problems.append(f"{path}{key}: must be a non-empty string")
    else:
        return value
    return None


def _field(name: str, raw: object, problems: list[str]) -> FieldSpec | None:
    path = f"fields.{name}."
    if not isinstance(raw, Mapping):
        problems.append(f"fields.{name}: must be a table")
        return None
    problems.extend(f"{path}{key}: unknown key" for key in sorted(set(raw) - _FIELD_KEYS))
    loinc = _text(raw, "loinc", path, problems)
    if loinc is not None and not _LOINC.fullmatch(loinc):
        problems.append(f"{path}loinc: must look like a LOINC code, e.g. 8310-5")
    unit = _text(raw, "unit", path, problems)
    display = _text(raw, "display", path, problems)
    scale = Decimal(1)
    raw_scale = raw.get("scale", 1)
    try:
        if isinstance(raw_scale, bool) or not isinstance(raw_scale, int | float | str):
            raise InvalidOperation
        # str() first: TOML 0.1 is a binary float, and the intent is exactly one tenth.
        scale = Decimal(str(raw_scale))
        if not scale.is_finite() or scale == 0:
            raise InvalidOperation
    except InvalidOperation:
        problems.append(f"{path}scale: must be a non-zero number")
    if loinc is None or unit is None or display is None:
        return None
    return FieldSpec(loinc, unit, display, scale)


def _byte_string(raw: Mapping[str, Any], key: str, problems: list[str]) -> bytes | None:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        problems.append(f"{key}: must be a non-empty string")
        return None
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        problems.append(f"{key}: only characters U+0000 to U+00FF can be sent as bytes")
        return None


def from_mapping(raw: Mapping[str, Any]) -> LineProtocolSpec:
    """Validate a plain (TOML-style) table; :class:`SpecError` lists every problem with its path.

    Paths are relative to the table (``fields.spo2.unit: required``) so the caller can prefix
    where the table sits in its own config.
    """
    problems: list[str] = [f"{key}: unknown key" for key in sorted(set(raw) - _KEYS)]
    name = _text(raw, "name", "", problems)
    delimiter = _byte_string(raw, "delimiter", problems) if "delimiter" in raw else None
    if "delimiter" not in raw:
        problems.append("delimiter: required")
    start = _byte_string(raw, "start", problems) if "start" in raw else None
    encoding = raw.get("encoding", "ascii")
    try:
        codecs.lookup(encoding)
    except (LookupError, TypeError, ValueError):  # ValueError: a name with a NUL in it
        problems.append("encoding: not a known text encoding")
    max_length = raw.get("max_line_length", 256)
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        problems.append("max_line_length: must be an integer")
    elif not 1 <= max_length <= MAX_LINE_LIMIT:
        problems.append(f"max_line_length: must be 1-{MAX_LINE_LIMIT}")
    pattern = None
    source = _text(raw, "pattern", "", problems)
    if source is not None:
        try:
            pattern = re.compile(source)
        except re.error as exc:
            problems.append(f"pattern: not a valid regular expression ({exc.msg})")
    raw_fields = raw.get("fields")
    fields: dict[str, FieldSpec] = {}
    if not isinstance(raw_fields, Mapping) or not raw_fields:
        problems.append("fields: required, a table with one entry per named group")
    else:
        for field_name, field_raw in raw_fields.items():
            spec = _field(str(field_name), field_raw, problems)
            if spec is not None:
                fields[str(field_name)] = spec
    if pattern is not None and isinstance(raw_fields, Mapping):
        groups = set(pattern.groupindex)
        if not groups:
            problems.append("pattern: needs at least one named group, e.g. (?P<temp>...)")
        problems.extend(
            f"fields.{g}: required for the group in pattern"
            for g in sorted(groups - set(raw_fields))
        )
        problems.extend(
            f"fields.{f}: no group of that name in pattern"
            for f in sorted(set(raw_fields) - groups)
        )
    if problems:
        raise SpecError(problems)
    assert name is not None
    assert delimiter is not None
    assert pattern is not None
    return LineProtocolSpec(
        name=name,
        delimiter=delimiter,
        pattern=pattern,
        fields=MappingProxyType(fields),
        start=start,
        encoding=encoding,
        max_line_length=max_length,
    )


def parse_line(spec: LineProtocolSpec, line: bytes) -> LineReading:
    """Decode one line (without its delimiter); ProtocolError if it does not match."""
    try:
        text = line.decode(spec.encoding)
    except UnicodeDecodeError:
        raise ProtocolError(f"{spec.name} line is not valid {spec.encoding}") from None
    match = spec.pattern.fullmatch(text)
    if match is None:
        raise ProtocolError(f"{spec.name} line does not match the pattern ({len(line)} bytes)")
    values = []
    for name in sorted(spec.pattern.groupindex, key=spec.pattern.groupindex.__getitem__):
        raw = match.group(name)
        if raw is None:  # an optional group that did not take part
            continue
        field = spec.fields[name]
        try:
            number = Decimal(raw.strip())
        except InvalidOperation:
            raise ProtocolError(f"{spec.name} field {name} is not a number") from None
        if not number.is_finite():
            raise ProtocolError(f"{spec.name} field {name} is not a finite number")
        values.append(FieldValue(name, field.loinc_code, field.ucum_unit, number * field.scale))
    return LineReading(spec.name, tuple(values))


class LineDecoder:
    """Stream decoder for a :class:`LineProtocolSpec`: ``feed(bytes) -> list[event]``."""

    def __init__(self, spec: LineProtocolSpec) -> None:
        self._spec = spec
        self._framer = LineFramer(
            (spec.delimiter,), max_length=spec.max_line_length, start=spec.start
        )

    def feed(self, data: bytes) -> list[LineReading | LineSkipped]:
        """Readings and skip events; never raises on device bytes."""
        events: list[LineReading | LineSkipped] = []
        for item in self._framer.feed(data):
            if isinstance(item, Skipped):
                events.append(LineSkipped(item.reason, item.count))
                continue
            try:
                events.append(parse_line(self._spec, item))
            except ProtocolError as exc:
                events.append(LineSkipped(str(exc), len(item)))
        return events
