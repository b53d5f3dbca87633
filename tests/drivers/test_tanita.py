"""Tanita TBF-310 / BC-418 result lines: whole expected objects, siblings, streams, fuzzing.

"Onyx" is the TBF-310 line fed in obiba/onyx's Tbf310InstrumentRunnerTest.java
(org.obiba.onyx.jade.instrument.tanita), decoded here against the field order in
drivers/tanita.py. The BC-418 vector is built from the field order Onyx's
Bc418InstrumentRunner reads (no recorded BC-418 line was found).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.errors import ProtocolError
from drivers.tanita import (
    BodyType,
    Gender,
    MassUnit,
    Segment,
    SegmentResult,
    TanitaDecoder,
    TanitaModel,
    TanitaResult,
    TanitaSkipped,
    encode_result_line,
    parse_result_line,
)

D = Decimal

ONYX_TBF310 = b"0,2,170,110.6,431,28.4,31.4,79.2,58.0,27,32.3,9771"
ONYX_TBF310_EXPECTED = TanitaResult(
    model=TanitaModel.TBF_310,
    body_type=BodyType.STANDARD,
    gender=Gender.FEMALE,
    age=27,
    height=D("170"),
    weight=D("110.6"),
    mass_unit=MassUnit.KG,
    impedance=431,
    fat_percent=D("28.4"),
    fat_mass=D("31.4"),
    fat_free_mass=D("79.2"),
    total_body_water=D("58.0"),
    bmi=D("32.3"),
    bmr_kj=9771,
)

# Built from Onyx's BC-418 field order: date, time, body type 0, gender 1, 175 cm, 82.4 kg,
# 21.3 %, 17.6, 64.8, 47.4 kg, age 45, BMI 26.9, BMR 7820 kJ, 489 ohm; segment impedances
# RL 254, LL 258, RA 301, LA 305; then fat %, fat mass, FFM, muscle for RL, LL, RA, LA, trunk.
BC418 = (
    b'"26/11/26","08:30",0,1,175,82.4,21.3,17.6,64.8,47.4,45,26.9,7820,489,254,258,301,305,'
    b"19.8,2.5,10.1,9.6,20.5,2.6,10.1,9.6,18.9,0.8,3.4,3.2,19.6,0.8,3.3,3.1,22.5,10.9,37.6,35.8"
)
BC418_EXPECTED = TanitaResult(
    model=TanitaModel.BC_418,
    body_type=BodyType.STANDARD,
    gender=Gender.MALE,
    age=45,
    height=D("175"),
    weight=D("82.4"),
    mass_unit=MassUnit.KG,
    impedance=489,
    fat_percent=D("21.3"),
    fat_mass=D("17.6"),
    fat_free_mass=D("64.8"),
    total_body_water=D("47.4"),
    bmi=D("26.9"),
    bmr_kj=7820,
    measured_at=datetime(2026, 11, 26, 8, 30),
    segments=(
        SegmentResult(Segment.RIGHT_LEG, 254, D("19.8"), D("2.5"), D("10.1"), D("9.6")),
        SegmentResult(Segment.LEFT_LEG, 258, D("20.5"), D("2.6"), D("10.1"), D("9.6")),
        SegmentResult(Segment.RIGHT_ARM, 301, D("18.9"), D("0.8"), D("3.4"), D("3.2")),
        SegmentResult(Segment.LEFT_ARM, 305, D("19.6"), D("0.8"), D("3.3"), D("3.1")),
        SegmentResult(Segment.TRUNK, None, D("22.5"), D("10.9"), D("37.6"), D("35.8")),
    ),
)

VECTORS = [
    pytest.param(ONYX_TBF310, ONYX_TBF310_EXPECTED, id="onyx-tbf310"),
    pytest.param(BC418, BC418_EXPECTED, id="bc418-layout"),
]


@pytest.mark.parametrize(("line", "expected"), VECTORS)
def test_result_line_decodes_to_the_whole_expected_object(
    line: bytes, expected: TanitaResult
) -> None:
    assert parse_result_line(line) == expected
    assert parse_result_line(line + b"\r\n") == expected
    assert parse_result_line(line.decode()) == expected


@pytest.mark.parametrize(("line", "expected"), VECTORS)
def test_encoder_reproduces_the_vector(line: bytes, expected: TanitaResult) -> None:
    assert encode_result_line(expected) == line + b"\r\n"


def test_right_aligned_fields_are_trimmed() -> None:
    padded = b" 0, 2, 170, 110.6, 431, 28.4, 31.4, 79.2, 58.0, 27, 32.3, 9771"
    assert parse_result_line(padded) == ONYX_TBF310_EXPECTED


def test_pound_mode_keeps_the_numbers_and_changes_the_units() -> None:
    result = parse_result_line(ONYX_TBF310, mass_unit=MassUnit.LB)
    assert result == replace(ONYX_TBF310_EXPECTED, mass_unit=MassUnit.LB)
    assert (result.height_unit, ONYX_TBF310_EXPECTED.height_unit) == ("[in_i]", "cm")


def test_numbers_are_exact_decimals_as_printed() -> None:
    assert str(parse_result_line(ONYX_TBF310).total_body_water) == "58.0"


# --- Truncated and corrupted siblings ---------------------------------------------------------


@pytest.mark.parametrize(("line", "expected"), VECTORS)
def test_truncations_that_lose_a_field_are_protocol_errors(
    line: bytes, expected: TanitaResult
) -> None:
    for length in range(line.rindex(b",") + 1):
        with pytest.raises(ProtocolError) as caught:
            parse_result_line(line[:length])
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("line", "expected"), VECTORS)
def test_an_unterminated_line_is_never_emitted(line: bytes, expected: TanitaResult) -> None:
    whole = line + b"\r\n"
    for length in range(len(line) + 1):
        assert TanitaDecoder().feed(whole[:length]) == []


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (ONYX_TBF310.replace(b"110.6", b"11O.6"), "weight (field 4) is not a number"),
        (ONYX_TBF310.replace(b"110.6", b"-110.6"), "weight (field 4) is not a number"),
        (ONYX_TBF310.replace(b",431,", b",431.5,"), "impedance (field 5) is not a whole"),
        (b"0,3" + ONYX_TBF310[3:], "gender (field 2) is not one of 1/2"),
        (b"1" + ONYX_TBF310[1:], "body type (field 1) is not one of 0/2"),
        (ONYX_TBF310 + b",1", "13 fields, expected 12 (TBF-310) or 38 (BC-418)"),
        (BC418.replace(b"26/11/26", b"31/02/26"), "not a valid date and time"),
        (BC418.replace(b'"08:30"', b"08:30"), "date or time is not"),
        (BC418.replace(b",254,", b",2x4,"), "right-leg impedance (field 15) is not a whole"),
        (ONYX_TBF310.replace(b"2,", b"\xb2,", 1), "non-ASCII"),
    ],
)
def test_corrupted_lines_name_the_field_never_the_value(line: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_result_line(line)
    assert message in str(caught.value)
    for value in ("110.6", "11O.6", "31/02", "28.4"):
        assert value not in str(caught.value)


def test_encoder_refuses_a_bc418_result_without_its_time_stamp() -> None:
    with pytest.raises(ValueError, match="measured_at"):
        encode_result_line(replace(BC418_EXPECTED, measured_at=None))


# --- Stream -----------------------------------------------------------------------------------

STREAM = b"\xff\r\n" + ONYX_TBF310 + b"\r\nnot,a,result\r\n" + BC418 + b"\r\n"
STREAM_EXPECTED = [
    TanitaSkipped("Tanita line has non-ASCII bytes", 1),
    ONYX_TBF310_EXPECTED,
    TanitaSkipped("Tanita line has 3 fields, expected 12 (TBF-310) or 38 (BC-418)", 12),
    BC418_EXPECTED,
]


@pytest.mark.parametrize("size", [1, 2, 5, len(STREAM)])
def test_stream_gives_identical_events_in_any_chunking(size: int) -> None:
    decoder = TanitaDecoder()
    events: list[object] = []
    for i in range(0, len(STREAM), size):
        events += decoder.feed(STREAM[i : i + size])
    assert events == STREAM_EXPECTED


def test_overlong_line_is_skipped_and_the_next_decodes() -> None:
    events = TanitaDecoder().feed(b"9" * 5000 + b"\r\n" + ONYX_TBF310 + b"\r\n")
    assert events == [TanitaSkipped("line longer than the maximum", 5000), ONYX_TBF310_EXPECTED]


@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_give_tanita_events(data: bytes) -> None:
    events = TanitaDecoder().feed(data)
    assert all(isinstance(e, TanitaResult | TanitaSkipped) for e in events)


@given(st.lists(st.text(alphabet='0123456789.," :/-', max_size=8), min_size=10, max_size=40))
def test_parse_raises_only_protocol_error(fields: list[str]) -> None:
    try:
        parse_result_line(",".join(fields))
    except ProtocolError as exc:
        message = str(exc)
    else:
        return
    assert "\n" not in message


decimals = st.decimals(min_value=0, max_value=999, places=1)
whole = st.integers(0, 99999)
tbf310_results = st.builds(
    TanitaResult,
    model=st.just(TanitaModel.TBF_310),
    body_type=st.sampled_from(BodyType),
    gender=st.sampled_from(Gender),
    age=st.integers(0, 120),
    height=decimals,
    weight=decimals,
    mass_unit=st.sampled_from(MassUnit),
    impedance=whole,
    fat_percent=decimals,
    fat_mass=decimals,
    fat_free_mass=decimals,
    total_body_water=decimals,
    bmi=decimals,
    bmr_kj=whole,
)
bc418_results = st.builds(
    replace,
    tbf310_results,
    model=st.just(TanitaModel.BC_418),
    measured_at=st.datetimes(datetime(2000, 1, 1), datetime(2099, 12, 31)).map(
        lambda d: d.replace(second=0, microsecond=0)
    ),
    segments=st.tuples(
        *(
            st.builds(
                SegmentResult,
                st.just(segment),
                st.none() if segment is Segment.TRUNK else whole,
                decimals,
                decimals,
                decimals,
                decimals,
            )
            for segment in Segment
        )
    ),
)


@given(tbf310_results | bc418_results)
def test_encode_parse_round_trip(result: TanitaResult) -> None:
    line = encode_result_line(result)
    assert TanitaDecoder(mass_unit=result.mass_unit).feed(line) == [result]
