"""Nonin Data Format #7 and real-time ASCII: whole expected objects, siblings, resync, fuzzing.

Vectors marked "Pufferfish" are the frames asserted in pez-globo/pufferfish-software,
firmware/ventilator-controller-stm32/Core/Test/Pufferfish/Driver/Serial/Nonin/
TestPacketReceiver.cpp ("A Valid First Packet": HR 72, SpO2 97, revision 48; and "A valid
Packet with status byte errors set"), decoded here against the DF7 table in the module
docstring rather than copied from their assertions. ASCII lines follow the formats printed in
the Nonin 2500/BT4000, Avant 9600, 8600V and 9847 manuals (Real-Time Data Output sections).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.errors import ProtocolError
from drivers.nonin import (
    NoninAsciiDecoder,
    NoninAsciiReading,
    NoninAsciiSkipped,
    NoninDf7Decoder,
    NoninPacket,
    NoninResync,
    Perfusion,
    df7_packet,
    encode_ascii_line,
    encode_df7,
    encode_df7_packet,
    parse_ascii_line,
)


def _frames(*frames: str) -> bytes:
    return bytes.fromhex("".join(frames))


# Pufferfish "A Valid First Packet", frame by frame (frame 1 has SYNC: status 0x81).
PUFFERFISH_FRAMES = [
    "01 81 01 00 83",  # 1 HR MSB
    "01 80 01 48 CA",  # 2 HR LSB (72)
    "01 80 01 61 E3",  # 3 SpO2 (97)
    "01 80 01 30 B2",  # 4 firmware revision (48)
    *["01 80 01 00 82"] * 4,  # 5-8 reserved on the OEM III
    "01 80 01 61 E3",  # 9 SpO2-D
    "01 80 01 61 E3",  # 10 SpO2 fast
    "01 80 01 61 E3",  # 11 SpO2 beat-to-beat
    "01 80 01 00 82",  # 12 reserved
    "01 80 01 00 82",  # 13 reserved
    "01 80 01 00 82",  # 14 E-HR MSB
    "01 80 01 48 CA",  # 15 E-HR LSB
    "01 80 01 61 E3",  # 16 E-SpO2
    "01 80 01 61 E3",  # 17 E-SpO2-D
    "01 80 01 00 82",  # 18 reserved
    "01 80 01 00 82",  # 19 reserved
    "01 80 01 00 82",  # 20 HR-D MSB
    "01 80 01 48 CA",  # 21 HR-D LSB
    "01 80 01 00 82",  # 22 E-HR-D MSB
    "01 80 01 48 CA",  # 23 E-HR-D LSB
    "01 80 01 00 82",  # 24 reserved
    "01 80 01 00 82",  # 25 reserved
]
PUFFERFISH = _frames(*PUFFERFISH_FRAMES)
PUFFERFISH_EXPECTED = NoninPacket(
    spo2=97,
    pulse_rate=72,
    spo2_display=97,
    spo2_fast=97,
    spo2_beat_to_beat=97,
    spo2_extended=97,
    spo2_extended_display=97,
    pulse_rate_display=72,
    pulse_rate_extended=72,
    pulse_rate_extended_display=72,
    firmware_revision=48,
    timer=0,
    low_battery=False,
    smartpoint=False,
    perfusion=Perfusion.NONE,
    sensor_alarm=False,
    out_of_track=False,
    artifact=False,
    sensor_disconnected=False,
    pleth=b"\x01" * 25,
    status=b"\x81" + b"\x80" * 24,
)

# Frames 2-8 of Pufferfish "status byte errors set" (their checksums are valid: 0x82 green,
# 0x86 yellow, 0x84 red, 0x88 sensor alarm, 0x90 out of track, 0xA0 artifact, 0xC0 sensor
# disconnected) spliced into the valid packet. Its frames 9-25 are not used: they carry wrong
# checksums on purpose, so that packet is a corrupted sibling (below).
PUFFERFISH_STATUS_FRAMES = [
    "01 82 01 48 CC",
    "01 86 01 61 E9",
    "01 84 01 30 B6",
    "01 88 01 00 8A",
    "01 90 01 00 92",
    "01 A0 01 00 A2",
    "01 C0 01 00 C2",
]
STATUS_SPLICE = _frames(PUFFERFISH_FRAMES[0], *PUFFERFISH_STATUS_FRAMES, *PUFFERFISH_FRAMES[8:])
STATUS_SPLICE_EXPECTED = replace(
    PUFFERFISH_EXPECTED,
    perfusion=Perfusion.RED,  # the last pulse indication in the packet (frame 4, 0x84)
    sensor_alarm=True,
    out_of_track=True,
    artifact=True,
    sensor_disconnected=True,
    status=bytes.fromhex("81 82 86 84 88 90 A0 C0") + b"\x80" * 17,
)
PUFFERFISH_BAD_CHECKSUMS = _frames(
    PUFFERFISH_FRAMES[0],
    *PUFFERFISH_STATUS_FRAMES,
    "01 00 01 00 63",  # bit 7 clear and a wrong checksum
    "01 80 01 00 E3",
    "01 80 01 00 E3",
    *["01 80 01 00 82"] * 3,
    "01 80 01 00 CA",
    "01 80 01 00 E3",
    "01 80 01 00 E3",
    *["01 80 01 00 82"] * 3,
    "01 80 01 00 CA",
    "01 80 01 00 82",
    "01 80 01 00 CA",
    "01 80 01 00 82",
    "01 80 01 00 82",
)

# Built from the DF7 layout: rate 300 (MSB 2, LSB 0x2C: 2 << 7 | 44), SpO2 88 (0x58).
HIGH_RATE_FIRST_FRAMES = _frames("01 83 64 02 EA", "01 82 65 2C 14", "01 82 66 58 41")
HIGH_RATE_EXPECTED = df7_packet(88, 300, perfusion=Perfusion.GREEN)
HIGH_RATE = encode_df7_packet(88, 300)

# Built from the layout: finger out, SpO2 127 and HR 511 ("missing"), disconnect + alarm.
MISSING_EXPECTED = df7_packet(
    None, None, perfusion=Perfusion.NONE, sensor_alarm=True, sensor_disconnected=True
)
MISSING = encode_df7_packet(
    None, None, perfusion=Perfusion.NONE, sensor_alarm=True, sensor_disconnected=True
)

VECTORS = [
    pytest.param(PUFFERFISH, PUFFERFISH_EXPECTED, id="pufferfish-valid"),
    pytest.param(STATUS_SPLICE, STATUS_SPLICE_EXPECTED, id="pufferfish-status-bits"),
    pytest.param(HIGH_RATE, HIGH_RATE_EXPECTED, id="rate-300"),
    pytest.param(MISSING, MISSING_EXPECTED, id="missing-values"),
]


def _chunked(
    factory: Callable[[], NoninDf7Decoder | NoninAsciiDecoder], data: bytes, size: int
) -> list[object]:
    decoder = factory()
    events: list[object] = []
    for i in range(0, len(data), size):
        events += decoder.feed(data[i : i + size])
    return events


# --- Data Format #7 ---------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_packet_decodes_to_the_whole_expected_object(data: bytes, expected: NoninPacket) -> None:
    assert NoninDf7Decoder().feed(data) == [expected]


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_encoder_reproduces_the_vector_bytes(data: bytes, expected: NoninPacket) -> None:
    assert encode_df7(expected) == data


def test_rate_above_255_uses_the_msb_bits() -> None:
    assert HIGH_RATE[:15] == HIGH_RATE_FIRST_FRAMES


@pytest.mark.parametrize(("data", "expected"), VECTORS)
@pytest.mark.parametrize("size", [1, 2, 5])
def test_chunked_feeding_gives_identical_events(
    data: bytes, expected: NoninPacket, size: int
) -> None:
    stream = b"\x80\x01" + data + data[:40] + data + data
    whole = NoninDf7Decoder().feed(stream)
    assert whole == [NoninResync(2), expected, NoninResync(40), expected, expected]
    assert _chunked(NoninDf7Decoder, stream, size) == whole


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_every_truncation_emits_nothing(data: bytes, expected: NoninPacket) -> None:
    for length in range(len(data)):
        assert NoninDf7Decoder().feed(data[:length]) == []


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_every_single_byte_corruption_drops_that_packet_only(
    data: bytes, expected: NoninPacket
) -> None:
    for offset in range(len(data)):
        corrupted = bytearray(data)
        corrupted[offset] ^= 0x5A
        events = NoninDf7Decoder().feed(data + bytes(corrupted) + data)
        assert events == [expected, NoninResync(len(data)), expected], offset


def test_the_pufferfish_packet_with_wrong_checksums_is_never_emitted() -> None:
    events = NoninDf7Decoder().feed(PUFFERFISH + PUFFERFISH_BAD_CHECKSUMS + PUFFERFISH)
    assert events == [PUFFERFISH_EXPECTED, NoninResync(125), PUFFERFISH_EXPECTED]


def test_resyncs_after_garbage_prefix() -> None:
    garbage = b"\x01\x81\x00\x00\x82" + bytes(range(256)) + b"\x01\x81"
    assert NoninDf7Decoder().feed(garbage + HIGH_RATE) == [
        NoninResync(len(garbage)),
        HIGH_RATE_EXPECTED,
    ]


@pytest.mark.parametrize(
    ("defect", "discarded"),
    [
        (lambda p: p[:60] + p[61:], 124),  # a dropped byte
        (lambda p: p[:60] + b"\x55" + p[60:], 126),  # an inserted byte
        (lambda p: p[:-1] + bytes([(p[-1] + 1) & 0xFF]), 125),  # bad checksum, last frame
    ],
    ids=["dropped-byte", "inserted-byte", "bad-checksum"],
)
def test_resyncs_after_a_defect_and_never_stitches_across_it(
    defect: Callable[[bytes], bytes], discarded: int
) -> None:
    decoder = NoninDf7Decoder()
    events = decoder.feed(PUFFERFISH + defect(HIGH_RATE) + MISSING)
    assert events == [PUFFERFISH_EXPECTED, NoninResync(discarded), MISSING_EXPECTED]
    assert (decoder.packets, decoder.resyncs, decoder.discarded_bytes) == (2, 1, discarded)


def test_a_stream_joined_mid_packet_starts_with_one_resync() -> None:
    assert NoninDf7Decoder().feed(PUFFERFISH[37:] + MISSING) == [
        NoninResync(125 - 37),
        MISSING_EXPECTED,
    ]


def test_encoder_refuses_values_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="SpO2"):
        encode_df7_packet(127, 60)
    with pytest.raises(ValueError, match="pulse rate"):
        encode_df7_packet(97, 511)
    with pytest.raises(ValueError, match="status"):
        encode_df7(replace(PUFFERFISH_EXPECTED, status=b"\x80" * 25))


packets = st.builds(
    df7_packet,
    st.none() | st.integers(0, 126),
    st.none() | st.integers(0, 510),
    perfusion=st.sampled_from(Perfusion),
    sensor_alarm=st.booleans(),
    out_of_track=st.booleans(),
    artifact=st.booleans(),
    sensor_disconnected=st.booleans(),
    pleth=st.binary(min_size=25, max_size=25),
    firmware_revision=st.integers(0, 255),
    timer=st.integers(0, 16383),
)


@given(packets)
def test_encode_decode_round_trip(packet: NoninPacket) -> None:
    assert NoninDf7Decoder().feed(encode_df7(packet)) == [packet]


@given(st.binary(max_size=600))
def test_arbitrary_bytes_only_give_df7_events(data: bytes) -> None:
    events = NoninDf7Decoder().feed(data)
    assert all(isinstance(e, NoninPacket | NoninResync) for e in events)


@given(st.binary(max_size=300), packets)
def test_garbage_before_a_packet_never_hides_it(garbage: bytes, packet: NoninPacket) -> None:
    encoded = encode_df7(packet)
    events = NoninDf7Decoder().feed(garbage + encoded + encoded)
    assert events[-2:] == [packet, packet]


# --- Real-time ASCII --------------------------------------------------------------------------

ASCII_VECTORS = [
    # 2500 / BT4000 manual, DIP switch 8 down: "SPO2=XXX HR=YYY".
    pytest.param(b"SPO2=097 HR=072", NoninAsciiReading(97, 72), id="standard"),
    # Same manual: no data from the oximeter.
    pytest.param(b"SPO2=--- HR=---", NoninAsciiReading(None, None), id="no-data"),
    # Avant 9600 / 2500 manuals, DIP switch 8 up: fast-responding values.
    pytest.param(b"SPO2=095 HR=061 F", NoninAsciiReading(95, 61, fast=True), id="fast"),
    # 2500 manual: event marker "*".
    pytest.param(b"SPO2=100 HR=128*", NoninAsciiReading(100, 128, event_marker=True), id="event"),
    # 8600V / 9847 manuals: "HH:MM:SS SPO2=XXX HR=YYY"; 9847: "B" after a detected breath.
    pytest.param(
        b"14:05:09 SPO2=093 HR=---B",
        NoninAsciiReading(93, None, clock=time(14, 5, 9), breath=True),
        id="clock-breath",
    ),
]


@pytest.mark.parametrize(("line", "expected"), ASCII_VECTORS)
def test_ascii_line_decodes_to_the_whole_expected_object(
    line: bytes, expected: NoninAsciiReading
) -> None:
    assert parse_ascii_line(line) == expected
    assert parse_ascii_line(line + b"\r\n") == expected


@pytest.mark.parametrize(("line", "expected"), ASCII_VECTORS)
def test_ascii_encoder_reproduces_the_vector(line: bytes, expected: NoninAsciiReading) -> None:
    assert encode_ascii_line(expected) == line + b"\r\n"


@pytest.mark.parametrize(("line", "expected"), ASCII_VECTORS)
def test_ascii_truncations_before_the_rate_are_protocol_errors(
    line: bytes, expected: NoninAsciiReading
) -> None:
    for length in range(line.index(b"HR=") + 5):
        with pytest.raises(ProtocolError) as caught:
            parse_ascii_line(line[:length])
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("line", "field"),
    [
        (b"SPO2=1O0 HR=072", "not SPO2=/HR="),  # letter O for a zero
        (b"SPO2=101 HR=072", "SPO2 is above 100"),
        (b"25:00:00 SPO2=097 HR=072", "clock"),
        (b"SPO2=097 HR=072 X", "not SPO2=/HR="),
        (b"SPO2=097 HR=07\xb2", "non-ASCII"),
    ],
)
def test_corrupted_ascii_lines_name_the_field_not_the_value(line: bytes, field: str) -> None:
    with pytest.raises(ProtocolError, match=field) as caught:
        parse_ascii_line(line)
    assert "097" not in str(caught.value)
    assert "101" not in str(caught.value)


ASCII_STREAM = (
    b"Nonin 9600 format 1 26/11/26\r\n"  # the power-up header (content varies by model)
    b"SPO2=097 HR=072\r\n"
    b"SPO2=096 HR=073\n"
    b"SPO2=--- HR=---\r"
    b"14:05:09 SPO2=093 HR=---B\r\n"
)
ASCII_STREAM_EXPECTED = [
    NoninAsciiSkipped("Nonin ASCII line is not SPO2=/HR= (28 chars)", 28),
    NoninAsciiReading(97, 72),
    NoninAsciiReading(96, 73),
    NoninAsciiReading(None, None),
    NoninAsciiReading(93, None, clock=time(14, 5, 9), breath=True),
]


@pytest.mark.parametrize("size", [1, 2, 5, len(ASCII_STREAM)])
def test_ascii_stream_accepts_cr_lf_and_crlf_in_any_chunking(size: int) -> None:
    assert _chunked(NoninAsciiDecoder, ASCII_STREAM, size) == ASCII_STREAM_EXPECTED


@pytest.mark.parametrize("size", [1, 5, 4096])
def test_overlong_ascii_line_is_dropped_whole_without_buffering(size: int) -> None:
    decoder = NoninAsciiDecoder()
    noise = b"x" * 100_000
    events: list[object] = []
    for i in range(0, len(noise), size):
        events += decoder.feed(noise[i : i + size])
        assert len(decoder._framer._buffer) <= 82  # bounded: max line + a delimiter
    events += decoder.feed(b"\r\nSPO2=097 HR=072\r\n")
    assert events == [
        NoninAsciiSkipped("line longer than the maximum", 100_000),
        NoninAsciiReading(97, 72),
    ]


@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_give_ascii_events(data: bytes) -> None:
    events = NoninAsciiDecoder().feed(data)
    assert all(isinstance(e, NoninAsciiReading | NoninAsciiSkipped) for e in events)


@given(st.text(max_size=60))
def test_parse_ascii_line_raises_only_protocol_error(text: str) -> None:
    try:
        parse_ascii_line(text)
    except ProtocolError as exc:
        message = str(exc)
    else:
        return
    assert "\n" not in message


@given(
    st.builds(
        NoninAsciiReading,
        st.none() | st.integers(0, 100),
        st.none() | st.integers(0, 999),
        clock=st.none() | st.times().map(lambda t: t.replace(microsecond=0)),
        fast=st.booleans(),
        event_marker=st.booleans(),
        breath=st.booleans(),
    )
)
def test_ascii_round_trip(reading: NoninAsciiReading) -> None:
    assert NoninAsciiDecoder().feed(encode_ascii_line(reading)) == [reading]
