"""Nonin pulse oximeters over a serial line: Data Format #7 (binary) and real-time ASCII, sans-I/O.

**Data Format #7** (OEM III module, Xpod, WristOx2; REFERENCE.md "Serial device protocols"):
75 frames/s of five bytes, 25 frames to a packet (3 packets/s)::

    01  STATUS  PLETH  DATA  CHK        CHK = (01 + STATUS + PLETH + DATA) mod 256

STATUS bit 7 is always 1; bit 0 (SYNC) is 1 on frame 1 of a packet only; bits 1-2 are the
perfusion of the current pulse (GPRF 0x02 green, RPRF 0x04 red, both 0x06 yellow, held for
12 frames per beat); bit 3 SNSA sensor alarm, bit 4 OOT out of track, bit 5 ARTF artifact,
bit 6 SNSD sensor disconnected. PLETH is one plethysmogram sample. The frame's position in
the packet fixes what DATA means (frame numbers from 1):

=====  ==========================================  =====  ===============================
frame  DATA                                        frame  DATA
=====  ==========================================  =====  ===============================
1, 2   HR MSB (bits 0-1), HR LSB (bits 0-6)        14-15  E-HR (8-beat) MSB, LSB
3      SpO2 (4-beat, bits 0-6)                     16     E-SpO2 (8-beat)
4      firmware revision                           17     E-SpO2-D (8-beat, display)
6, 7   3 Hz timer MSB, LSB (7 bits each) [1]       20-21  HR-D (4-beat, display) MSB, LSB
8      STAT2: bit 0 low battery, bit 5 SmartPoint  22-23  E-HR-D (8-beat, display) MSB, LSB
9      SpO2-D (4-beat, display)                    5, 12, 13, 18, 19, 24, 25: reserved
10, 11 SpO2 fast, SpO2 beat-to-beat
=====  ==========================================  =====  ===============================

[1] Frames 6-8 are reserved on the OEM III and carry the timer and STAT2 on the WristOx2 and
Xpod; they decode as 0/False where reserved. Rates are ((MSB & 3) << 7) | (LSB & 0x7F) with
511 = missing; saturations are byte & 0x7F with 127 = missing (both become None). "Display"
values hold the last reading for 10 s after the finger is removed; the others go missing at
once and are the ones to record. Sources: the frame table and status bits as implemented and
unit-tested in pez-globo/pufferfish-software (firmware/ventilator-controller-stm32,
Driver/Serial/Nonin/PacketReceiver.cpp, Types.h, Test/.../TestPacketReceiver.cpp); the
timer, STAT2 bits and display semantics from the Oxford IBME Java driver (package
uk.ac.ox.ibme.nonin, NoninPacket.java), both written from Nonin's OEM III / WristOx2 specs.

The decoder emits one :class:`NoninPacket` per complete, fully valid packet and never one
assembled across a gap: after garbage, a dropped or inserted byte or a bad checksum it slides
one byte at a time to the next frame with SYNC set and a valid checksum, and reports the
bytes it dropped once, as :class:`NoninResync`, just before the next good packet.

**Real-time ASCII** (2500 and BT4000, Avant 9600, 8600V, 9847): one line per second at 9600
baud, 8N1 (2 stop bits on the 9600), terminated by CR LF (Avant 9600 manual §5.3), after a
power-up header line naming the format and the date::

    [HH:MM:SS ]SPO2=XXX HR=YYY[ F][*][B]

``---`` for no data; the clock prefix is sent by the 8600V and 9847; ``F`` marks fast-
responding values (DIP switch 8 up, 2500/BT4000 and 9600 manuals); ``*`` a marked event;
``B`` a breath detected in the interval (9847 manual, Real-Time Serial Output). A header or
other unparsable line becomes a :class:`NoninAsciiSkipped` event, never an exception.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import time
from enum import StrEnum

from drivers.errors import ProtocolError
from drivers.line_protocol import LineFramer, Skipped

FRAME_SIZE = 5
FRAMES_PER_PACKET = 25
PACKET_SIZE = FRAME_SIZE * FRAMES_PER_PACKET
MISSING_RATE = 511
MISSING_SPO2 = 127

_SYNC = 0x01
_ALWAYS = 0x80
_PERFUSION_BITS = 0x06
_SENSOR_ALARM, _OUT_OF_TRACK, _ARTIFACT, _DISCONNECTED = 0x08, 0x10, 0x20, 0x40
_STARTS = b"\x01" * FRAMES_PER_PACKET
# Status byte class: 2 = frame 1 (bit 7 and SYNC), 1 = any other frame (bit 7, no SYNC), 0 = bad.
_STATUS_CLASS = bytes((2 if b & 0x81 == 0x81 else 1) if b & _ALWAYS else 0 for b in range(256))
_STATUS_EXPECTED = b"\x02" + b"\x01" * (FRAMES_PER_PACKET - 1)


class Perfusion(StrEnum):
    """Pulse amplitude quality from STATUS bits 1-2 (GPRF, RPRF; both set = yellow)."""

    NONE = "none"
    GREEN = "green"
    RED = "red"
    YELLOW = "yellow"


_PERFUSION = (Perfusion.NONE, Perfusion.GREEN, Perfusion.RED, Perfusion.YELLOW)


@dataclass(frozen=True, slots=True)
class NoninPacket:
    """One Data Format #7 packet (1/3 s). None = the oximeter's "missing" code.

    ``perfusion`` is that of the last pulse indicated in the packet (NONE if no beat fell in
    it); the four alarm flags are set if any frame set them. ``status`` (25 raw STATUS bytes)
    and ``pleth`` (25 samples) keep everything the flags summarise.
    """

    spo2: int | None
    pulse_rate: int | None
    spo2_display: int | None
    spo2_fast: int | None
    spo2_beat_to_beat: int | None
    spo2_extended: int | None
    spo2_extended_display: int | None
    pulse_rate_display: int | None
    pulse_rate_extended: int | None
    pulse_rate_extended_display: int | None
    firmware_revision: int
    timer: int
    low_battery: bool
    smartpoint: bool
    perfusion: Perfusion
    sensor_alarm: bool
    out_of_track: bool
    artifact: bool
    sensor_disconnected: bool
    pleth: bytes
    status: bytes


@dataclass(frozen=True, slots=True)
class NoninResync:
    """Bytes dropped before the packet that follows (start-up, garbage, a gap, a bad frame)."""

    discarded_bytes: int
    reason: str = "resynchronised on the next packet"


def _spo2(byte: int) -> int | None:
    value = byte & 0x7F
    return None if value == MISSING_SPO2 else value


def _rate(msb: int, lsb: int) -> int | None:
    value = ((msb & 0x03) << 7) | (lsb & 0x7F)
    return None if value == MISSING_RATE else value


def _packet(pkt: bytes) -> NoninPacket:
    status = pkt[1::FRAME_SIZE]
    d = pkt[3::FRAME_SIZE]
    any_status = 0
    perfusion = 0
    for s in status:
        any_status |= s
        if s & _PERFUSION_BITS:
            perfusion = s & _PERFUSION_BITS
    return NoninPacket(
        spo2=_spo2(d[2]),
        pulse_rate=_rate(d[0], d[1]),
        spo2_display=_spo2(d[8]),
        spo2_fast=_spo2(d[9]),
        spo2_beat_to_beat=_spo2(d[10]),
        spo2_extended=_spo2(d[15]),
        spo2_extended_display=_spo2(d[16]),
        pulse_rate_display=_rate(d[19], d[20]),
        pulse_rate_extended=_rate(d[13], d[14]),
        pulse_rate_extended_display=_rate(d[21], d[22]),
        firmware_revision=d[3],
        timer=((d[5] & 0x7F) << 7) | (d[6] & 0x7F),
        low_battery=bool(d[7] & 0x01),
        smartpoint=bool(d[7] & 0x20),
        perfusion=_PERFUSION[perfusion >> 1],
        sensor_alarm=bool(any_status & _SENSOR_ALARM),
        out_of_track=bool(any_status & _OUT_OF_TRACK),
        artifact=bool(any_status & _ARTIFACT),
        sensor_disconnected=bool(any_status & _DISCONNECTED),
        pleth=pkt[2::FRAME_SIZE],
        status=status,
    )


def _valid_packet(pkt: bytes) -> bool:
    if pkt[0::FRAME_SIZE] != _STARTS:
        return False
    status = pkt[1::FRAME_SIZE]
    if status.translate(_STATUS_CLASS) != _STATUS_EXPECTED:
        return False
    return all(
        (1 + s + p + d) & 0xFF == c
        for s, p, d, c in zip(status, pkt[2::5], pkt[3::5], pkt[4::5], strict=True)
    )


class NoninDf7Decoder:
    """Data Format #7 stream decoder: ``feed(bytes) -> [NoninResync?, NoninPacket, ...]``.

    Counters for the device-status page: ``packets``, ``resyncs``, ``discarded_bytes``.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pending_discard = 0
        self.packets = 0
        self.resyncs = 0
        self.discarded_bytes = 0

    def _drop(self, count: int) -> None:
        self._pending_discard += count
        self.discarded_bytes += count

    def feed(self, data: bytes) -> list[NoninPacket | NoninResync]:
        """Decode what ``data`` completes; keeps at most one partial packet. Never raises."""
        buf = self._buffer
        buf += data
        events: list[NoninPacket | NoninResync] = []
        n = len(buf)
        pos = 0
        while True:
            # Hunt for a frame 1: 0x01, STATUS with bit 7 and SYNC, and a valid checksum.
            start = buf.find(b"\x01", pos, n - FRAME_SIZE + 1) if n - pos >= FRAME_SIZE else -1
            while start >= 0 and not (
                buf[start + 1] & 0x81 == 0x81
                and (1 + buf[start + 1] + buf[start + 2] + buf[start + 3]) & 0xFF == buf[start + 4]
            ):
                start = buf.find(b"\x01", start + 1, n - FRAME_SIZE + 1)
            if start < 0:
                # No frame 1 can start before the last four bytes; keep those for next time.
                keep = max(pos, n - (FRAME_SIZE - 1))
                self._drop(keep - pos)
                pos = keep
                break
            self._drop(start - pos)
            if n - start < PACKET_SIZE:
                pos = start
                break
            pkt = bytes(buf[start : start + PACKET_SIZE])
            if not _valid_packet(pkt):
                self._drop(1)
                pos = start + 1
                continue
            if self._pending_discard:
                events.append(NoninResync(self._pending_discard))
                self.resyncs += 1
                self._pending_discard = 0
            events.append(_packet(pkt))
            self.packets += 1
            pos = start + PACKET_SIZE
        del buf[:pos]
        return events


def _data_byte(value: int | None, missing: int) -> int:
    return missing if value is None else value


def encode_df7(packet: NoninPacket) -> bytes:
    """Encode a packet (125 bytes), the exact inverse of the decoder; ValueError if unencodable."""
    p = packet
    if len(p.pleth) != FRAMES_PER_PACKET or len(p.status) != FRAMES_PER_PACKET:
        raise ValueError("pleth and status need 25 bytes each")
    if bytes(p.status).translate(_STATUS_CLASS) != _STATUS_EXPECTED:
        raise ValueError("status bytes need bit 7 set, and SYNC on frame 1 only")
    rates = {
        0: p.pulse_rate,
        13: p.pulse_rate_extended,
        19: p.pulse_rate_display,
        21: p.pulse_rate_extended_display,
    }
    spo2s = {
        2: p.spo2,
        8: p.spo2_display,
        9: p.spo2_fast,
        10: p.spo2_beat_to_beat,
        15: p.spo2_extended,
        16: p.spo2_extended_display,
    }
    data = bytearray(FRAMES_PER_PACKET)
    for index, rate in rates.items():
        raw = _data_byte(rate, MISSING_RATE)
        if rate is not None and not 0 <= rate < MISSING_RATE:
            raise ValueError("a pulse rate must be 0-510 or None")
        data[index], data[index + 1] = raw >> 7, raw & 0x7F
    for index, spo2 in spo2s.items():
        raw = _data_byte(spo2, MISSING_SPO2)
        if spo2 is not None and not 0 <= spo2 < MISSING_SPO2:
            raise ValueError("an SpO2 must be 0-126 or None")
        data[index] = raw
    if not 0 <= p.timer < 1 << 14 or not 0 <= p.firmware_revision <= 0xFF:
        raise ValueError("timer must be 0-16383 and firmware revision 0-255")
    data[3] = p.firmware_revision
    data[5], data[6] = p.timer >> 7, p.timer & 0x7F
    data[7] = int(p.low_battery) | int(p.smartpoint) << 5
    out = bytearray()
    for s, pl, d in zip(p.status, p.pleth, data, strict=True):
        out += bytes((1, s, pl, d, (1 + s + pl + d) & 0xFF))
    return bytes(out)


def encode_df7_packet(
    spo2: int | None,
    pulse_rate: int | None,
    *,
    perfusion: Perfusion = Perfusion.GREEN,
    sensor_alarm: bool = False,
    out_of_track: bool = False,
    artifact: bool = False,
    sensor_disconnected: bool = False,
    pleth: bytes = bytes(range(100, 125)),
    firmware_revision: int = 0,
    timer: int = 0,
) -> bytes:
    """A simulated packet: every averaged/display value equals ``spo2`` / ``pulse_rate``.

    The status flags are set on all 25 frames; decodes to :func:`df7_packet`'s result.
    """
    return encode_df7(
        df7_packet(
            spo2,
            pulse_rate,
            perfusion=perfusion,
            sensor_alarm=sensor_alarm,
            out_of_track=out_of_track,
            artifact=artifact,
            sensor_disconnected=sensor_disconnected,
            pleth=pleth,
            firmware_revision=firmware_revision,
            timer=timer,
        )
    )


def df7_packet(
    spo2: int | None,
    pulse_rate: int | None,
    *,
    perfusion: Perfusion = Perfusion.GREEN,
    sensor_alarm: bool = False,
    out_of_track: bool = False,
    artifact: bool = False,
    sensor_disconnected: bool = False,
    pleth: bytes = bytes(range(100, 125)),
    firmware_revision: int = 0,
    timer: int = 0,
) -> NoninPacket:
    """The :class:`NoninPacket` that :func:`encode_df7_packet` encodes (same arguments)."""
    flags = (
        _ALWAYS
        | _PERFUSION.index(perfusion) << 1
        | (_SENSOR_ALARM if sensor_alarm else 0)
        | (_OUT_OF_TRACK if out_of_track else 0)
        | (_ARTIFACT if artifact else 0)
        | (_DISCONNECTED if sensor_disconnected else 0)
    )
    return NoninPacket(
        spo2=spo2,
        pulse_rate=pulse_rate,
        spo2_display=spo2,
        spo2_fast=spo2,
        spo2_beat_to_beat=spo2,
        spo2_extended=spo2,
        spo2_extended_display=spo2,
        pulse_rate_display=pulse_rate,
        pulse_rate_extended=pulse_rate,
        pulse_rate_extended_display=pulse_rate,
        firmware_revision=firmware_revision,
        timer=timer,
        low_battery=False,
        smartpoint=False,
        perfusion=perfusion,
        sensor_alarm=sensor_alarm,
        out_of_track=out_of_track,
        artifact=artifact,
        sensor_disconnected=sensor_disconnected,
        pleth=bytes(pleth),
        status=bytes((flags | _SYNC,)) + bytes((flags,)) * (FRAMES_PER_PACKET - 1),
    )


# --- Real-time ASCII --------------------------------------------------------------------------

ASCII_MAX_LINE = 80  # the longest real line is 33 characters; headers are shorter than 80
_ASCII_LINE = re.compile(
    r"(?:(?P<h>\d\d):(?P<m>\d\d):(?P<s>\d\d) +)?"
    r"SPO2=(?P<spo2>\d{3}|---) +HR=(?P<hr>\d{3}|---)(?P<flags>(?: *[F*B])*) *"
)


@dataclass(frozen=True, slots=True)
class NoninAsciiReading:
    """One real-time ASCII line. ``clock`` is the oximeter's naive wall-clock time, if sent."""

    spo2: int | None
    pulse_rate: int | None
    clock: time | None = None
    fast: bool = False
    event_marker: bool = False
    breath: bool = False


@dataclass(frozen=True, slots=True)
class NoninAsciiSkipped:
    """A line that is not a reading (the power-up header, noise); ``reason`` quotes no data."""

    reason: str
    discarded_bytes: int


def parse_ascii_line(line: str | bytes) -> NoninAsciiReading:
    """Parse one line (terminator optional); ProtocolError names the field, never the value."""
    if isinstance(line, bytes):
        try:
            line = line.decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError("Nonin ASCII line has non-ASCII bytes") from None
    match = _ASCII_LINE.fullmatch(line.strip("\r\n"))
    if match is None:
        raise ProtocolError(f"Nonin ASCII line is not SPO2=/HR= ({len(line)} chars)")
    spo2 = None if match["spo2"] == "---" else int(match["spo2"])
    if spo2 is not None and spo2 > 100:
        raise ProtocolError("Nonin ASCII SPO2 is above 100")
    clock = None
    if match["h"] is not None:
        try:
            clock = time(int(match["h"]), int(match["m"]), int(match["s"]))
        except ValueError:
            raise ProtocolError("Nonin ASCII clock is not a valid time") from None
    flags = match["flags"]
    return NoninAsciiReading(
        spo2=spo2,
        pulse_rate=None if match["hr"] == "---" else int(match["hr"]),
        clock=clock,
        fast="F" in flags,
        event_marker="*" in flags,
        breath="B" in flags,
    )


def encode_ascii_line(reading: NoninAsciiReading) -> bytes:
    """Encode as the oximeter prints it, CR LF included (for the simulator and tests)."""
    spo2 = "---" if reading.spo2 is None else f"{reading.spo2:03d}"
    rate = "---" if reading.pulse_rate is None else f"{reading.pulse_rate:03d}"
    prefix = "" if reading.clock is None else reading.clock.strftime("%H:%M:%S ")
    suffix = (" F" if reading.fast else "") + ("*" if reading.event_marker else "")
    suffix += "B" if reading.breath else ""
    return f"{prefix}SPO2={spo2} HR={rate}{suffix}\r\n".encode("ascii")


class NoninAsciiDecoder:
    """Line-stream decoder for real-time ASCII: accepts CR, LF or CR LF; bounded buffering."""

    def __init__(self, *, max_line: int = ASCII_MAX_LINE) -> None:
        self._framer = LineFramer((b"\r", b"\n"), max_length=max_line)

    def feed(self, data: bytes) -> list[NoninAsciiReading | NoninAsciiSkipped]:
        """Readings, and skip events for headers, noise and overlong lines. Never raises."""
        events: list[NoninAsciiReading | NoninAsciiSkipped] = []
        for item in self._framer.feed(data):
            if isinstance(item, Skipped):
                events.append(NoninAsciiSkipped(item.reason, item.count))
                continue
            try:
                events.append(parse_ascii_line(item))
            except ProtocolError as exc:
                events.append(NoninAsciiSkipped(str(exc), len(item)))
        return events
