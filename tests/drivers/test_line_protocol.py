"""Config-declared line protocols: validation of the TOML table, decoding, framing, fuzzing.

The two specs are the examples in drivers/line_protocol.py's docstring, loaded through
tomllib as a site config would be. Their lines are built from those specs (a thermometer
printing ``T=36.8C`` CR LF; a cuff printing ``SYS,DIA,PULSE`` between STX and ETX); LOINC
8310-5, 8480-6, 8462-4 and 8867-4 are body temperature, systolic and diastolic blood pressure
and heart rate.
"""

from __future__ import annotations

import tomllib
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from drivers.errors import ProtocolError
from drivers.line_protocol import (
    FieldSpec,
    FieldValue,
    LineDecoder,
    LineProtocolSpec,
    LineReading,
    LineSkipped,
    SpecError,
    from_mapping,
    parse_line,
)

SITE_CONFIG = r"""
[devices.thermometer.protocol]
name = "thermometer"
delimiter = "\r\n"
pattern = 'T=(?P<temp>\d{2,3}\.\d)C'
fields.temp = { loinc = "8310-5", unit = "Cel", display = "Body temperature" }

[devices.cuff.protocol]
name = "csv-cuff"
start = "\u0002"
delimiter = "\u0003"
pattern = '(?P<sys>\d{2,3}),(?P<dia>\d{2,3}),(?P<pulse>\d{2,3})'
fields.sys = { loinc = "8480-6", unit = "mm[Hg]", display = "Systolic blood pressure" }
fields.dia = { loinc = "8462-4", unit = "mm[Hg]", display = "Diastolic blood pressure" }
fields.pulse = { loinc = "8867-4", unit = "/min", display = "Heart rate" }
"""
DEVICES = tomllib.loads(SITE_CONFIG)["devices"]
THERMOMETER = from_mapping(DEVICES["thermometer"]["protocol"])
CUFF = from_mapping(DEVICES["cuff"]["protocol"])

TEMP = FieldSpec("8310-5", "Cel", "Body temperature")
THERMOMETER_READING = LineReading(
    "thermometer", (FieldValue("temp", "8310-5", "Cel", Decimal("36.8")),)
)
CUFF_READING = LineReading(
    "csv-cuff",
    (
        FieldValue("sys", "8480-6", "mm[Hg]", Decimal(120)),
        FieldValue("dia", "8462-4", "mm[Hg]", Decimal(80)),
        FieldValue("pulse", "8867-4", "/min", Decimal(72)),
    ),
)

VECTORS = [
    pytest.param(THERMOMETER, b"T=36.8C", b"\r\n", THERMOMETER_READING, id="thermometer"),
    pytest.param(CUFF, b"\x02120,80,72", b"\x03", CUFF_READING, id="csv-cuff"),
]


def _feed(spec: LineProtocolSpec, data: bytes, size: int) -> list[object]:
    decoder = LineDecoder(spec)
    events: list[object] = []
    for i in range(0, len(data), size):
        events += decoder.feed(data[i : i + size])
    return events


def test_the_docstring_examples_load_into_the_whole_expected_spec() -> None:
    expected = LineProtocolSpec(
        name="thermometer",
        delimiter=b"\r\n",
        pattern=THERMOMETER.pattern,
        fields={"temp": TEMP},
    )
    assert expected == THERMOMETER
    assert THERMOMETER.pattern.pattern == r"T=(?P<temp>\d{2,3}\.\d)C"
    assert (CUFF.start, CUFF.delimiter, CUFF.encoding, CUFF.max_line_length) == (
        b"\x02",
        b"\x03",
        "ascii",
        256,
    )
    assert list(CUFF.fields) == ["sys", "dia", "pulse"]


@pytest.mark.parametrize(("spec", "line", "end", "expected"), VECTORS)
@pytest.mark.parametrize("size", [1, 2, 5, 100])
def test_lines_decode_to_the_whole_expected_reading_in_any_chunking(
    spec: LineProtocolSpec, line: bytes, end: bytes, expected: LineReading, size: int
) -> None:
    assert _feed(spec, (line + end) * 3, size) == [expected] * 3


@pytest.mark.parametrize(("spec", "line", "end", "expected"), VECTORS)
def test_unterminated_truncations_emit_nothing(
    spec: LineProtocolSpec, line: bytes, end: bytes, expected: LineReading
) -> None:
    for length in range(len(line) + len(end)):
        assert LineDecoder(spec).feed((line + end)[:length]) == []


@pytest.mark.parametrize(("spec", "line", "end", "expected"), VECTORS)
def test_terminated_truncations_are_skipped_with_their_length(
    spec: LineProtocolSpec, line: bytes, end: bytes, expected: LineReading
) -> None:
    first = len(spec.start or b"")
    for length in range(first + 1, len(line)):
        events = LineDecoder(spec).feed(line[:length] + end + line + end)
        skipped = length - first
        assert events == [
            LineSkipped(f"{spec.name} line does not match the pattern ({skipped} bytes)", skipped),
            expected,
        ]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"T=3X.8C", "thermometer line does not match the pattern (7 bytes)"),
        (b"T=36.8\xb0C", "thermometer line is not valid ascii"),
        (b"T=36.8F", "thermometer line does not match the pattern (7 bytes)"),
    ],
)
def test_corrupted_lines_are_skipped_without_quoting_them(line: bytes, reason: str) -> None:
    events = LineDecoder(THERMOMETER).feed(line + b"\r\n")
    assert events == [LineSkipped(reason, len(line))]
    assert "36" not in reason


def test_bytes_outside_a_start_byte_frame_are_counted_once_before_the_next_reading() -> None:
    stream = b"junk\x02120,80,72\x03\r\n\x02120,80,72\x03"
    for size in (1, 2, 5, len(stream)):
        assert _feed(CUFF, stream, size) == [
            LineSkipped("bytes outside a frame", 4),
            CUFF_READING,
            LineSkipped("bytes outside a frame", 2),
            CUFF_READING,
        ]


def test_overlong_line_is_dropped_whole_and_the_next_line_decodes() -> None:
    spec = from_mapping({**DEVICES["thermometer"]["protocol"], "max_line_length": 16})
    stream = b"T=" + b"9" * 100 + b"C\r\nT=36.8C\r\n"
    for size in (1, 2, 5, len(stream)):
        assert _feed(spec, stream, size) == [
            LineSkipped("line longer than the maximum", 103),
            THERMOMETER_READING,
        ]


def test_scale_makes_tenths_exact() -> None:
    raw = {
        "name": "tenths-thermometer",
        "delimiter": "\n",
        "pattern": r"T(?P<temp>\d{3})",
        "fields": {"temp": {"loinc": "8310-5", "unit": "Cel", "display": "T", "scale": 0.1}},
    }
    reading = parse_line(from_mapping(raw), b"T368")
    assert reading.values[0].value == Decimal("36.8")
    assert str(reading.values[0].value) == "36.8"


def test_optional_groups_that_did_not_match_are_left_out() -> None:
    raw = {
        "name": "spo2",
        "delimiter": "\n",
        "pattern": r"S(?P<spo2>\d+)(?: P(?P<pulse>\d+))?",
        "fields": {
            "spo2": {"loinc": "59408-5", "unit": "%", "display": "SpO2"},
            "pulse": {"loinc": "8889-8", "unit": "/min", "display": "Pulse"},
        },
    }
    assert parse_line(from_mapping(raw), b"S97") == LineReading(
        "spo2", (FieldValue("spo2", "59408-5", "%", Decimal(97)),)
    )


def test_parse_line_raises_protocol_error_for_a_mismatch() -> None:
    with pytest.raises(ProtocolError, match="does not match"):
        parse_line(THERMOMETER, b"hello")


# --- Config validation ------------------------------------------------------------------------


def test_every_problem_is_reported_at_once_with_its_key_path() -> None:
    raw: dict[str, Any] = {
        "colour": "blue",
        "encoding": "klingon",
        "max_line_length": 0,
        "pattern": r"S(?P<spo2>\d+) P(?P<hr>\d+)",
        "start": "\u2603",
        "fields": {
            "spo2": {"loinc": "59408", "display": "SpO2", "scale": "x", "colour": 1},
            "extra": {"loinc": "8867-4", "unit": "/min", "display": "Extra"},
        },
    }
    with pytest.raises(SpecError) as caught:
        from_mapping(raw)
    assert str(caught.value) == "invalid line protocol: " + "; ".join(caught.value.problems)
    assert sorted(caught.value.problems) == sorted(
        [
            "colour: unknown key",
            "name: required",
            "delimiter: required",
            "start: only characters U+0000 to U+00FF can be sent as bytes",
            "encoding: not a known text encoding",
            "max_line_length: must be 1-65536",
            "fields.spo2.colour: unknown key",
            "fields.spo2.loinc: must look like a LOINC code, e.g. 8310-5",
            "fields.spo2.unit: required",
            "fields.spo2.scale: must be a non-zero number",
            "fields.hr: required for the group in pattern",
            "fields.extra: no group of that name in pattern",
        ]
    )


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"pattern": "T=(?P<temp"}, "pattern: not a valid regular expression"),
        ({"pattern": r"T=\d+"}, "pattern: needs at least one named group"),
        ({"fields": {}}, "fields: required"),
        ({"delimiter": ""}, "delimiter: must be a non-empty string"),
        ({"max_line_length": True}, "max_line_length: must be an integer"),
        ({"fields": {"temp": "8310-5"}}, "fields.temp: must be a table"),
    ],
)
def test_single_problems_are_named(change: dict[str, Any], problem: str) -> None:
    with pytest.raises(SpecError) as caught:
        from_mapping({**DEVICES["thermometer"]["protocol"], **change})
    assert any(p.startswith(problem) for p in caught.value.problems)


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=4),
)
tables = st.dictionaries(
    st.sampled_from(["name", "delimiter", "start", "encoding", "max_line_length", "pattern", "x"]),
    values,
).flatmap(
    lambda t: st.dictionaries(
        st.text(max_size=5),
        st.dictionaries(st.sampled_from(["loinc", "unit", "display", "scale", "y"]), values)
        | values,
        max_size=3,
    ).map(lambda f: {**t, "fields": f})
)


@given(tables)
@example({"name": "x", "delimiter": "\n", "encoding": "\x00"})  # codecs: ValueError (NUL)
def test_from_mapping_raises_only_spec_error(raw: dict[str, Any]) -> None:
    try:
        from_mapping(raw)
    except SpecError as exc:
        problems = exc.problems
    else:
        return
    assert problems
    assert all(": " in p for p in problems)


@given(st.binary(max_size=300), st.sampled_from([THERMOMETER, CUFF]))
def test_arbitrary_bytes_only_give_line_events(data: bytes, spec: LineProtocolSpec) -> None:
    events = LineDecoder(spec).feed(data)
    assert all(isinstance(e, LineReading | LineSkipped) for e in events)
