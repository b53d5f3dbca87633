"""The aiortc internals services.video.forwarding relies on, pinned to aiortc 1.16.0.

If aiortc changes underneath, these fail first and name what moved. They use real aiortc
receivers and senders on an in-memory transport (no network), as aiortc's own tests do.
"""

from __future__ import annotations

import asyncio
import fractions
import inspect
import queue
import random
import socket
from collections.abc import Callable
from typing import Any

import aioice
import aioice.ice
import aiortc
import av
import pylibsrtp
import pytest
from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCRtpSender, clock
from aiortc.codecs import depayload
from aiortc.codecs.h264 import H264Decoder, H264Encoder, h264_depayload
from aiortc.codecs.vpx import Vp8Encoder, vp8_depayload
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rate import RemoteBitrateEstimator
from aiortc.rtcdtlstransport import RTCCertificate, RTCDtlsTransport
from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtcicetransport import RTCIceGatherer, RTCIceTransport
from aiortc.rtcrtpparameters import (
    RTCRtpCodecParameters,
    RTCRtpHeaderExtensionParameters,
    RTCRtpReceiveParameters,
    RTCRtpSendParameters,
)
from aiortc.rtcrtpreceiver import RemoteStreamTrack
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTP_HISTORY_SIZE,
    HeaderExtensionsMap,
    RtcpPacket,
    RtcpPsfbPacket,
    RtcpRtpfbPacket,
    RtpPacket,
    is_rtcp,
    pack_remb_fci,
    unpack_remb_fci,
)
from aiortc.stats import RTCStatsReport
from pylibsrtp import Policy, Session

from services.video.forwarding import (
    AIORTC_VERSION,
    DTLS_RX_BYTES,
    DTLS_RX_PACKETS,
    DTLS_TX_BYTES,
    DTLS_TX_PACKETS,
    READS_PER_CALL,
    RECEIVER_BITRATE_ESTIMATOR,
    RECEIVER_DECODER_QUEUE,
    RECEIVER_JITTER_BUFFER,
    SENDER_ENCODER,
    SENDER_EXTENSIONS_MAP,
    SENDER_LOOP_STATE,
    SENDER_NTP_TIMESTAMP,
    SENDER_RTP_HISTORY,
    SENDER_RTP_TIMESTAMP,
    AiortcInternalsChanged,
    CappedBitrateEstimator,
    ForwardedTrack,
    ForwardingRelay,
    KeyframeRequestLimiter,
    ViewerStats,
    _DirectSrtpReceive,
    _ForwardingPacker,
    _FrameSender,
    _header_template,
    is_h264_keyframe,
    is_keyframe,
    is_vp8_keyframe,
    ntp_time,
    packetize,
)
from services.video.transcode import SharedEncoder, TranscodeBudget
from tests.video.media import draw_frame_id, read_frame_id

VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=97)
KEYFRAME = b"\x10\x02\x00\x9d\x01\x2a\x40\x01\xf0\x00" + bytes(range(200)) * 10
DELTA = b"\x11\x02\x00" + bytes(range(100))


class MemoryTransport:
    """Just enough of RTCDtlsTransport for a receiver or sender: records what is sent."""

    state = "connected"
    _stats_id = "transport_memory"

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def _register_rtp_receiver(self, receiver: object, parameters: object) -> None:
        pass

    def _unregister_rtp_receiver(self, receiver: object) -> None:
        pass

    def _get_stats(self) -> RTCStatsReport:
        return RTCStatsReport()

    async def _send_rtp(self, data: bytes) -> None:
        self.sent.append(data)

    def _register_rtp_sender(self, sender: object, parameters: object) -> None:
        pass

    def _unregister_rtp_sender(self, sender: object) -> None:
        pass


def vp8_packets(frame: bytes, seq: int, timestamp: int) -> list[RtpPacket]:
    payloads = Vp8Encoder._packetize(frame, picture_id=1)
    return [
        RtpPacket(
            payload_type=97,
            sequence_number=(seq + i) & 0xFFFF,
            timestamp=timestamp,
            ssrc=1234,
            marker=int(i == len(payloads) - 1),
            payload=payload,
        )
        for i, payload in enumerate(payloads)
    ]


def test_aiortc_is_the_pinned_version() -> None:
    assert aiortc.__version__ == AIORTC_VERSION


async def test_receiver_and_sender_have_the_attributes_the_relay_replaces() -> None:
    receiver = RTCRtpReceiver("video", MemoryTransport())  # type: ignore[arg-type]
    assert isinstance(getattr(receiver, RECEIVER_JITTER_BUFFER), JitterBuffer)
    assert isinstance(getattr(receiver, RECEIVER_DECODER_QUEUE), queue.Queue)
    assert inspect.iscoroutinefunction(receiver._send_rtcp_pli)
    assert isinstance(getattr(receiver, RECEIVER_BITRATE_ESTIMATOR), RemoteBitrateEstimator)
    audio = RTCRtpReceiver("audio", MemoryTransport())  # type: ignore[arg-type]
    assert getattr(audio, RECEIVER_BITRATE_ESTIMATOR) is None  # REMB is video's only
    sender = RTCRtpSender("video", MemoryTransport())  # type: ignore[arg-type]
    assert getattr(sender, SENDER_ENCODER) is None
    assert callable(sender._send_keyframe)


async def test_real_receiver_hands_frames_to_the_relay_on_the_marker_and_stops() -> None:
    transport = MemoryTransport()
    receiver = RTCRtpReceiver("video", transport)  # type: ignore[arg-type]
    receiver._track = RemoteStreamTrack(kind="video")
    receiver._set_rtcp_ssrc(999)
    relay = ForwardingRelay("video")
    relay.attach(receiver)
    pc = RTCPeerConnection()
    sender = relay.add_viewer(pc, "viewer")
    track = sender.track
    assert isinstance(track, ForwardedTrack)
    await receiver.receive(RTCRtpReceiveParameters(codecs=[VP8]))
    try:
        packets = vp8_packets(KEYFRAME, seq=100, timestamp=5000)
        assert len(packets) >= 2
        for packet in packets:
            assert relay.stats.frames_in == 0
            await receiver._handle_rtp_packet(packet, arrival_time_ms=0)
        # Released on the marker packet, without waiting for the next frame.
        assert (relay.stats.frames_in, relay.stats.keyframes_in) == (1, 1)
        forwarded = await asyncio.wait_for(track.recv(), 1)
        assert bytes(forwarded) == KEYFRAME
        assert forwarded.pts == 0  # the receiver's timestamp mapper starts each stream at 0
        assert forwarded.time_base == fractions.Fraction(1, 90000)

        # A keyframe request goes to the publisher as an RTCP PLI for its SSRC.
        relay.request_keyframe()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert relay.stats.keyframe_requests_sent == 1
        [pli] = RtcpPacket.parse(transport.sent[-1])
        assert isinstance(pli, RtcpPsfbPacket)
        assert (pli.fmt, pli.media_ssrc) == (RTCP_PSFB_PLI, 1234)
    finally:
        # The decoder thread only ever sees the end-of-stream sentinel: stop() returns.
        await asyncio.wait_for(receiver.stop(), 5)
        await pc.close()


async def test_frames_completed_by_a_late_packet_all_reach_viewers_in_order() -> None:
    receiver = RTCRtpReceiver("video", MemoryTransport())  # type: ignore[arg-type]
    receiver._track = RemoteStreamTrack(kind="video")
    relay = ForwardingRelay("video")
    relay.attach(receiver)
    pc = RTCPeerConnection()
    track = relay.add_viewer(pc, "viewer").track
    assert isinstance(track, ForwardedTrack)
    await receiver.receive(RTCRtpReceiveParameters(codecs=[VP8]))
    try:
        frames = [KEYFRAME, DELTA + b"1", DELTA + b"2", DELTA + b"3"]
        packets = [
            p
            for n, data in enumerate(frames)
            for p in vp8_packets(
                data, seq=100 + 10 * n, timestamp=(4_294_960_000 + 3000 * n) % 2**32
            )
        ]
        # Packets numbered without gaps; the first delta frame's packet arrives last.
        for seq, p in enumerate(packets, start=100):
            p.sequence_number = seq
        *keyframe, late, second, third = packets
        for p in [*keyframe, second, third]:
            await receiver._handle_rtp_packet(p, arrival_time_ms=0)
        assert relay.stats.frames_in == 1
        await receiver._handle_rtp_packet(late, arrival_time_ms=0)
        assert relay.stats.frames_in == 4
        forwarded = [await asyncio.wait_for(track.recv(), 1) for _ in frames]
        assert [bytes(p) for p in forwarded] == frames
        assert [p.pts for p in forwarded] == [0, 3000, 6000, 9000]  # across the RTP wrap
    finally:
        await asyncio.wait_for(receiver.stop(), 5)
        await pc.close()


async def test_stock_jitter_buffer_still_holds_a_frame_until_the_next_one() -> None:
    # Why MarkerJitterBuffer exists; if aiortc starts honouring the marker, revisit it.
    stock = JitterBuffer(capacity=512, is_video=True)
    for packet in vp8_packets(KEYFRAME, seq=1, timestamp=3000):
        packet._data = vp8_depayload(packet.payload)  # type: ignore[attr-defined]
        assert stock.add(packet) == (False, None)


async def test_sender_calls_its_keyframe_hook_on_pli_and_fir_and_reports_remb() -> None:
    sender = RTCRtpSender("video", MemoryTransport())  # type: ignore[arg-type]
    calls: list[str] = []
    sender._send_keyframe = lambda: calls.append("keyframe")  # type: ignore[method-assign]
    rembs: list[int] = []
    setattr(sender, SENDER_ENCODER, _ForwardingPacker("video", rembs.append))
    for fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
        await sender._handle_rtcp_packet(RtcpPsfbPacket(fmt=fmt, ssrc=1, media_ssrc=sender._ssrc))
    remb = pack_remb_fci(300_000, [sender._ssrc])
    await sender._handle_rtcp_packet(
        RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=1, media_ssrc=0, fci=remb)
    )
    assert calls == ["keyframe", "keyframe"]
    assert rembs == [300_000]


async def test_sender_packs_a_forwarded_packet_with_the_relay_packer_not_an_encoder() -> None:
    sender = RTCRtpSender("video", MemoryTransport())  # type: ignore[arg-type]
    track = ForwardedTrack("video", ViewerStats(), request_keyframe=lambda: None)
    sender.replaceTrack(track)
    packer = _ForwardingPacker("video", lambda bitrate: None)
    setattr(sender, SENDER_ENCODER, packer)
    packet = av.Packet(KEYFRAME)
    packet.pts, packet.time_base = 4500, fractions.Fraction(1, 90000)
    track.offer(packet, keyframe=True)
    encoded = await sender._next_encoded_frame(VP8)
    assert encoded is not None
    assert encoded.timestamp == 4500
    assert b"".join(vp8_depayload(p) for p in encoded.payloads) == KEYFRAME
    assert getattr(sender, SENDER_ENCODER) is packer


def test_packer_never_encodes() -> None:
    with pytest.raises(AssertionError):
        _ForwardingPacker("video", lambda bitrate: None).encode(draw_frame_id(0))


def test_vp8_keyframes_are_recognised_in_real_libvpx_output() -> None:
    encoder = Vp8Encoder()
    kinds = []
    for frame_id in range(3):
        frame = draw_frame_id(frame_id)
        frame.pts, frame.time_base = frame_id * 3000, fractions.Fraction(1, 90000)
        payloads, _ = encoder.encode(frame)
        kinds.append(is_vp8_keyframe(b"".join(vp8_depayload(p) for p in payloads)))
    assert kinds == [True, False, False]
    assert not is_vp8_keyframe(DELTA)
    assert not is_vp8_keyframe(b"")


def rembs_sent(transport: MemoryTransport) -> list[tuple[int, list[int]]]:
    found = []
    for data in transport.sent:
        for packet in RtcpPacket.parse(data):
            if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
                found.append(unpack_remb_fci(packet.fci))
    return found


async def test_the_remb_the_relay_sends_its_publisher_never_exceeds_the_cap() -> None:
    transport = MemoryTransport()
    receiver = RTCRtpReceiver("video", transport)  # type: ignore[arg-type]
    receiver._track = RemoteStreamTrack(kind="video")
    receiver._set_rtcp_ssrc(999)
    relay = ForwardingRelay("video")
    relay.attach(receiver)
    assert isinstance(getattr(receiver, RECEIVER_BITRATE_ESTIMATOR), CappedBitrateEstimator)
    await receiver.receive(RTCRtpReceiveParameters(codecs=[VP8]))
    seq, timestamp = 100, 0

    async def send_for(start_ms: int, end_ms: int) -> None:
        # ~1.2 Mbit/s: a 5 KB frame every 33 ms, its packets 1 ms apart, abs-send-time set.
        nonlocal seq, timestamp
        for frame_ms in range(start_ms, end_ms, 33):
            for offset, packet in enumerate(vp8_packets(KEYFRAME * 2, seq, timestamp)):
                sent_ms = frame_ms + offset
                packet.extensions.abs_send_time = (sent_ms << 18) // 1000 & 0xFFFFFF
                await receiver._handle_rtp_packet(packet, arrival_time_ms=sent_ms)
                seq += 1
            timestamp += 3000

    try:
        await send_for(0, 1000)
        assert rembs_sent(transport) == []  # aiortc's estimator waits 3 s before its first
        relay.cap_publisher(300_000)
        await send_for(1000, 1100)
        # Sent at once, for the publisher's SSRC, before the estimator has an estimate.
        assert rembs_sent(transport) == [(300_000, [1234])]
        await send_for(1100, 6000)
        later = rembs_sent(transport)[1:]
        assert len(later) >= 4
        assert all(bitrate <= 300_000 for bitrate, _ in later)
        relay.cap_publisher(None)
        count = len(rembs_sent(transport))
        await send_for(6000, 8000)
        uncapped = [bitrate for bitrate, _ in rembs_sent(transport)[count:]]
        assert uncapped
        assert min(uncapped) > 600_000
    finally:
        await asyncio.wait_for(receiver.stop(), 5)


async def test_a_publishers_aiortc_encoder_takes_its_target_from_remb_within_its_limits() -> None:
    # How an aiortc publisher reacts to the cap: its sender sets the encoder's target
    # bitrate from REMB, which aiortc's VP8 encoder keeps within 250 kbit/s-1.5 Mbit/s.
    sender = RTCRtpSender("video", MemoryTransport())  # type: ignore[arg-type]
    encoder = Vp8Encoder()
    setattr(sender, SENDER_ENCODER, encoder)
    for bitrate, expected in ((400_000, 400_000), (100_000, 250_000), (9_000_000, 1_500_000)):
        remb = pack_remb_fci(bitrate, [sender._ssrc])
        await sender._handle_rtcp_packet(
            RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=1, media_ssrc=0, fci=remb)
        )
        assert encoder.target_bitrate == expected


async def test_a_publisher_reattached_on_a_new_receiver_continues_its_viewers_timeline() -> None:
    # The publisher reconnected: a new receiver maps its stream from 0 again; the viewer's
    # timestamps go on from the last frame, shifted by the time that passed, and it resumes
    # on the new stream's keyframe (a delta frame first is dropped).
    now = [100.0]
    relay = ForwardingRelay("video", clock=lambda: now[0])
    receivers = []
    for _ in range(2):
        receiver = RTCRtpReceiver("video", MemoryTransport())  # type: ignore[arg-type]
        receiver._track = RemoteStreamTrack(kind="video")
        receivers.append(receiver)
    pc = RTCPeerConnection()
    track = relay.add_viewer(pc, "viewer").track
    assert isinstance(track, ForwardedTrack)
    try:
        relay.attach(receivers[0])
        await receivers[0].receive(RTCRtpReceiveParameters(codecs=[VP8]))
        seq = 100
        for n, data in enumerate([KEYFRAME, DELTA + b"1"]):
            for packet in vp8_packets(data, seq, timestamp=50_000 + 3000 * n):
                await receivers[0]._handle_rtp_packet(packet, arrival_time_ms=0)
                seq += 1
            now[0] += 0.033
        first = [await asyncio.wait_for(track.recv(), 1) for _ in range(2)]
        assert [p.pts for p in first] == [0, 3000]
        await receivers[0].stop()

        now[0] += 2.0  # two seconds without the publisher
        relay.attach(receivers[1])
        relay.cap_publisher(None)
        await receivers[1].receive(RTCRtpReceiveParameters(codecs=[VP8]))
        seq = 7000
        for n, data in enumerate([DELTA + b"x", KEYFRAME, DELTA + b"2"]):
            for packet in vp8_packets(data, seq, timestamp=900_000 + 3000 * n):
                await receivers[1]._handle_rtp_packet(packet, arrival_time_ms=0)
                seq += 1
            now[0] += 0.033
        after = [await asyncio.wait_for(track.recv(), 1) for _ in range(2)]
        assert [bytes(p) for p in after] == [KEYFRAME, DELTA + b"2"]
        gap = after[0].pts - first[-1].pts
        # 2 s and two frame periods (the dropped delta and the last frame) at 90 kHz.
        assert gap == pytest.approx(90_000 * (2.0 + 0.033 + 0.033), abs=90)
        assert after[1].pts - after[0].pts == 3000
        assert track.stats.frames_dropped == 1
    finally:
        for receiver in receivers:
            await asyncio.wait_for(receiver.stop(), 5)
        await pc.close()


RTX = RTCRtpCodecParameters(
    mimeType="video/rtx", clockRate=90000, payloadType=98, parameters={"apt": 97}
)
SEND_PARAMETERS = RTCRtpSendParameters(
    codecs=[VP8, RTX],
    headerExtensions=[
        RTCRtpHeaderExtensionParameters(id=1, uri="urn:ietf:params:rtp-hdrext:sdes:mid"),
        RTCRtpHeaderExtensionParameters(
            id=3, uri="http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
        ),
    ],
    muxId="0",
)
WALLCLOCK = 1_790_000_000.25  # a Unix time, for the NTP and abs-send-time figures


async def send_one_frame(frame_sender: bool, frame: bytes) -> tuple[RTCRtpSender, list[bytes]]:
    """A real sender sends ``frame`` (pts 4500) with aiortc's loop or the relay's."""
    transport = MemoryTransport()
    track = ForwardedTrack("video", ViewerStats(), request_keyframe=lambda: None)
    sender = RTCRtpSender(track, transport)  # type: ignore[arg-type]
    packer = _ForwardingPacker("video", lambda bitrate: None)
    setattr(sender, SENDER_ENCODER, packer)
    if frame_sender:
        loop = _FrameSender(sender, track, packer, wallclock=lambda: WALLCLOCK)
        sender._run_rtp = loop.run  # type: ignore[method-assign]
    packet = av.Packet(frame)
    packet.pts, packet.time_base = 4500, fractions.Fraction(1, 90000)
    payloads = Vp8Encoder._packetize(frame, 0) if frame_sender else None
    track.offer(packet, keyframe=True, payloads=payloads)
    await sender.send(SEND_PARAMETERS)
    for _ in range(100):
        if transport.sent:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.01)
    return sender, transport.sent


def test_ntp_time_is_aiortcs_figure() -> None:
    assert ntp_time(clock.NTP_EPOCH.timestamp()) == 0
    now = clock.current_datetime()
    expected = clock.datetime_to_ntp(now)
    assert abs(ntp_time(now.timestamp()) - expected) < 2**32 // 1_000_000  # within 1 µs


async def test_sender_has_the_rtp_loop_the_frame_sender_replaces() -> None:
    sender = RTCRtpSender("video", MemoryTransport())  # type: ignore[arg-type]
    for name, expected in SENDER_LOOP_STATE.items():
        assert isinstance(getattr(sender, name), expected), name
    assert list(inspect.signature(sender._run_rtp).parameters) == ["codec"]
    # send() starts the loop through the instance attribute, which the relay replaces.
    assert "self._run_rtp(parameters.codecs[0])" in inspect.getsource(RTCRtpSender.send)
    # _retransmit answers NACKs from the history the frame sender fills.
    assert "__rtp_history.get(" in inspect.getsource(RTCRtpSender._retransmit)
    # The RTCP SR reports the figures the frame sender keeps.
    source = inspect.getsource(RTCRtpSender._run_rtcp)
    for name in ("ntp_timestamp", "rtp_timestamp", "packet_count", "octet_count"):
        assert f"self.__{name}" in source
    track = ForwardedTrack("video", ViewerStats(), request_keyframe=lambda: None)
    packer = _ForwardingPacker("video", lambda bitrate: None)
    del sender._RTCRtpSender__rtp_history  # type: ignore[attr-defined]
    with pytest.raises(AiortcInternalsChanged, match="__rtp_history"):
        _FrameSender(sender, track, packer)


async def test_frame_sender_sends_the_packets_aiortcs_loop_sends() -> None:
    stock_sender, stock = await send_one_frame(frame_sender=False, frame=KEYFRAME)
    sender, sent = await send_one_frame(frame_sender=True, frame=KEYFRAME)
    try:
        extensions_map = getattr(sender, SENDER_EXTENSIONS_MAP)
        assert len(sent) == len(stock) >= 2
        ours = [RtpPacket.parse(data, extensions_map) for data in sent]
        theirs = [RtpPacket.parse(data, extensions_map) for data in stock]
        assert [p.payload for p in ours] == [p.payload for p in theirs]
        assert [p.marker for p in ours] == [p.marker for p in theirs] == [0] * (len(sent) - 1) + [1]
        assert [p.payload_type for p in ours] == [97] * len(sent)
        assert {p.ssrc for p in ours} == {sender._ssrc}
        assert len({p.timestamp for p in ours}) == 1
        first = ours[0].sequence_number
        assert [p.sequence_number for p in ours] == [(first + n) % 65536 for n in range(len(sent))]
        abs_send_time = (ntp_time(WALLCLOCK) >> 14) & 0xFFFFFF
        for packet in ours:
            assert packet.extensions.mid == "0"
            assert packet.extensions.abs_send_time == abs_send_time
        assert {p.extensions.mid for p in theirs} == {"0"}
        assert all(p.extensions.abs_send_time is not None for p in theirs)
        # Byte for byte what aiortc's own serialisation makes of the same packet.
        for data, packet in zip(sent, ours, strict=True):
            assert packet.serialize(extensions_map) == data
        # The history (kept as tuples) gives back each packet as it was sent, as the
        # RtpPacket aiortc's _retransmit reads; an unknown slot gives None.
        history = getattr(sender, SENDER_RTP_HISTORY)
        for data, packet in zip(sent, ours, strict=True):
            kept = history.get(packet.sequence_number % RTP_HISTORY_SIZE)
            assert isinstance(kept, RtpPacket)
            assert kept.serialize(extensions_map) == data
        assert history.get((first + len(sent)) % RTP_HISTORY_SIZE) is None

        # The RTCP SR figures and the stats, as aiortc's loop keeps them.
        stats = [s for s in (await sender.getStats()).values() if s.type == "outbound-rtp"]
        assert stats[0].packetsSent == len(sent)
        assert stats[0].bytesSent == sum(len(p.payload) for p in ours)
        assert getattr(sender, SENDER_NTP_TIMESTAMP) == ntp_time(WALLCLOCK)
        assert getattr(sender, SENDER_RTP_TIMESTAMP) == ours[0].timestamp

        # A NACK is answered from the history, by RTX.
        lost = ours[1].sequence_number
        nack = RtcpRtpfbPacket(fmt=1, ssrc=1, media_ssrc=sender._ssrc, lost=[lost])
        await sender._handle_rtcp_packet(nack)
        rtx = RtpPacket.parse(sent[-1], extensions_map)
        assert (rtx.payload_type, rtx.ssrc) == (98, sender._rtx_ssrc)
        assert rtx.payload == lost.to_bytes(2, "big") + ours[1].payload
        assert rtx.extensions.mid == "0"
    finally:
        # The track ending ends the loop; stop() returns once it has exited.
        track = sender.track
        assert isinstance(track, ForwardedTrack)
        track.end()
        await asyncio.wait_for(sender.stop(), 5)
        await asyncio.wait_for(stock_sender.stop(), 5)
    assert track.readyState == "ended"


def test_header_template_without_abs_send_time_is_aiortcs_header() -> None:
    # An audio sender negotiates mid (and audio level) but not abs-send-time.
    extensions_map = HeaderExtensionsMap()
    extensions_map.configure(
        RTCRtpSendParameters(
            headerExtensions=[
                RTCRtpHeaderExtensionParameters(id=1, uri="urn:ietf:params:rtp-hdrext:sdes:mid")
            ]
        )
    )
    header, offset = _header_template(extensions_map, 111, 0x01020304, "1")
    assert offset is None
    packet = RtpPacket.parse(header + b"opus", extensions_map)
    assert (packet.payload_type, packet.ssrc, packet.extensions.mid) == (111, 0x01020304, "1")
    assert packet.extensions.abs_send_time is None


H264 = RTCRtpCodecParameters(
    mimeType="video/H264",
    clockRate=90000,
    payloadType=99,
    parameters={"packetization-mode": "1", "profile-level-id": "42e01f"},
)


def x264_frames(count: int, noise: bool = False) -> list[list[bytes]]:
    """``count`` numbered frames through aiortc's own H.264 encoder: RTP payloads each.

    ``noise`` draws random pixels instead (a keyframe too large for one packet).
    """
    encoder = H264Encoder()
    frames = []
    for frame_id in range(count):
        frame = draw_frame_id(frame_id)
        if noise:
            frame.planes[0].update(random.Random(frame_id).randbytes(frame.planes[0].buffer_size))
        frame.pts, frame.time_base = frame_id * 3000, fractions.Fraction(1, 90000)
        payloads, _ = encoder.encode(frame)
        frames.append(payloads)
    return frames


def test_h264_keyframes_are_recognised_in_real_libx264_output() -> None:
    # The receiver depayloads each packet with aiortc's h264_depayload (Annex B out).
    frames = [b"".join(depayload(H264, p) for p in payloads) for payloads in x264_frames(3)]
    assert [is_h264_keyframe(frame) for frame in frames] == [True, False, False]
    assert frames[0].startswith(b"\x00\x00\x00\x01")
    assert not is_h264_keyframe(b"")
    assert not is_h264_keyframe(b"\x00\x00\x01")
    assert is_h264_keyframe(b"\x00\x00\x00\x01\x67\x42")  # an SPS alone
    assert not is_h264_keyframe(b"\x00\x00\x00\x01\x41\x9a")  # a non-IDR slice


def test_h264_frames_are_packetized_as_aiortcs_encoder_packetizes_them() -> None:
    frames = x264_frames(3, noise=True)
    assert any(payload[0] & 0x1F == 28 for payload in frames[0])  # FU-A: a large keyframe
    assert frames[0][0][0] & 0x1F == 24  # STAP-A: SPS and PPS (and SEI) together
    for payloads in frames:
        depayloaded = b"".join(h264_depayload(p) for p in payloads)
        # Packetized once by the relay: the same payloads the publisher's encoder sent.
        assert packetize("video/H264", depayloaded, picture_id=0) == payloads
        packer = _ForwardingPacker("video", lambda bitrate: None, "video/H264")
        packet = av.Packet(depayloaded)
        packet.pts, packet.time_base = 4500, fractions.Fraction(1, 90000)
        assert packer.pack(packet) == (payloads, 4500)


def test_forwarded_h264_decodes_with_aiortcs_decoder() -> None:
    decoder = H264Decoder()
    for frame_id, payloads in enumerate(x264_frames(3)):
        data = b"".join(h264_depayload(p) for p in payloads)
        (picture,) = decoder.decode(JitterFrame(data=data, timestamp=frame_id * 3000))
        assert isinstance(picture, av.VideoFrame)
        assert read_frame_id(picture) == frame_id


def test_a_viewer_is_offered_the_publishers_codec_first_and_the_other_for_transcoding() -> None:
    relay = ForwardingRelay("video")
    assert relay.set_codec(H264) is True
    offered = [(c.mimeType, c.parameters.get("profile-level-id")) for c in relay._viewer_codecs()]
    assert offered == [
        ("video/H264", "42e01f"),
        ("video/H264", "42001f"),
        ("video/VP8", None),
        ("video/rtx", None),
    ]
    assert relay.set_codec(H264) is False
    strict = ForwardingRelay("video", transcode_fallback=False)
    assert [c.mimeType for c in strict._viewer_codecs()] == ["video/VP8", "video/rtx"]
    with pytest.raises(ValueError, match="VP9"):
        relay.set_codec(RTCRtpCodecParameters(mimeType="video/VP9", clockRate=90000))


async def test_a_shared_encoder_encodes_once_and_gives_every_viewer_the_same_payloads() -> None:
    # One H.264 encoder for two transcoded viewers: each picture is encoded and packetized
    # once; both tracks get the same payloads (their senders add their own headers).
    now = [0.0]
    encoder = SharedEncoder(
        H264, KeyframeRequestLimiter(0.5), lambda: now[0], is_keyframe, H264Encoder()
    )
    tracks = [ForwardedTrack("video", ViewerStats(), request_keyframe=lambda: None) for _ in "ab"]
    for name, track in zip("ab", tracks, strict=True):
        track.transcode(encoder.request_keyframe)
        encoder.add_sink(name, track)
    for frame_id in range(3):
        picture = draw_frame_id(frame_id)
        picture.pts, picture.time_base = 3000 * frame_id, fractions.Fraction(1, 90000)
        encoder.offer_picture(picture)
    received = [[await t.recv_payloads() for _ in range(3)] for t in tracks]
    assert encoder.frames_encoded == 3
    for (packet_a, payloads_a), (packet_b, payloads_b) in zip(*received, strict=True):
        assert packet_a is packet_b
        assert payloads_a is payloads_b
    assert [p.pts for p, _ in received[0]] == [0, 3000, 6000]
    assert received[0][0][1] is not None
    assert is_h264_keyframe(b"".join(h264_depayload(p) for p in received[0][0][1]))
    assert tracks[0].stats.bytes_out == sum(len(p) for _, ps in received[0] for p in ps or [])

    # The lowest REMB sets the bitrate (aiortc clamps it to 500 kbit/s .. 3 Mbit/s).
    tracks[0].stats.remb_bps, tracks[1].stats.remb_bps = 2_000_000, 700_000
    encoder.update_bitrate()
    assert encoder.target_bitrate == 700_000
    encoder.remove_sink("b")
    assert encoder.target_bitrate == 2_000_000

    # The second viewer's join asked inside the 0.5 s: that keyframe was deferred, once.
    assert encoder.keyframes_forced == 1
    now[0] = 0.5
    await asyncio.sleep(0.55)  # the deferred request fires (the loop's timer)

    # Then a PLI from a viewer, past the interval, forces one more.
    async def next_is_keyframe(frame_id: int) -> bool:
        picture = draw_frame_id(frame_id)
        picture.pts, picture.time_base = 3000 * frame_id, fractions.Fraction(1, 90000)
        encoder.offer_picture(picture)
        _packet, payloads = await tracks[0].recv_payloads()
        assert payloads is not None
        return is_h264_keyframe(b"".join(h264_depayload(p) for p in payloads))

    assert await next_is_keyframe(9)
    now[0] = 2.0
    tracks[0].request_keyframe()
    assert await next_is_keyframe(10)
    assert encoder.keyframes_forced == 3
    encoder.close()


def test_the_transcode_budget_counts_encoders_across_holders() -> None:
    budget = TranscodeBudget(1)
    assert budget.acquire(("relay-1", "video/H264"))
    assert budget.acquire(("relay-1", "video/H264"))  # held already
    assert not budget.acquire(("relay-2", "video/VP8"))
    budget.release(("relay-1", "video/H264"))
    assert budget.acquire(("relay-2", "video/VP8"))
    assert budget.in_use == 1
    assert not TranscodeBudget(0).acquire("any")
    with pytest.raises(ValueError, match="negative"):
        TranscodeBudget(-1)


async def test_a_released_encoder_wakes_those_refused_soon_not_inside_the_release() -> None:
    budget = TranscodeBudget(1)
    assert budget.acquire("relay-1/H264")
    woken: list[str] = []
    budget.wait("relay-2", lambda: woken.append("relay-2"))
    budget.wait("relay-3", lambda: woken.append("relay-3"))
    budget.wait("relay-3", lambda: woken.append("relay-3 again"))  # one call per key
    budget.forget("relay-2")  # its relay stopped
    budget.release("nobody")  # held nothing: wakes nobody
    budget.release("relay-1/H264")
    assert woken == []  # never inside the releaser's own bookkeeping
    await asyncio.sleep(0)
    assert woken == ["relay-3 again"]
    budget.release("relay-1/H264")  # given back already: nothing more
    await asyncio.sleep(0)
    assert woken == ["relay-3 again"]


# --- the publisher's packets handled as read (_DirectSrtpReceive) ---------------------------

SRTP_KEY = bytes(range(30))  # synthetic keying material, as DTLS would derive


def direct_transport() -> tuple[RTCDtlsTransport, Session]:
    """A real DTLS transport on a real (unconnected) ICE connection, keyed for SRTP as the
    handshake would leave it, and the publisher's side of those keys."""
    dtls = RTCDtlsTransport(
        RTCIceTransport(RTCIceGatherer()), [RTCCertificate.generateCertificate()]
    )
    dtls._rx_srtp = Session(Policy(key=SRTP_KEY, ssrc_type=Policy.SSRC_ANY_INBOUND))
    dtls._set_state(DtlsState.CONNECTED)
    return dtls, Session(Policy(key=SRTP_KEY, ssrc_type=Policy.SSRC_ANY_OUTBOUND))


def srtp(tx: Session, seq: int) -> bytes:
    packet = RtpPacket(payload_type=97, sequence_number=seq, timestamp=seq, ssrc=1234)
    packet.payload = bytes([seq & 0xFF]) * 20
    return tx.protect(packet.serialize())


async def test_the_ice_connection_and_dtls_transport_have_what_direct_receive_uses() -> None:
    dtls, _ = direct_transport()
    connection = dtls.transport._connection
    assert isinstance(connection._queue, asyncio.Queue)
    assert list(inspect.signature(connection.data_received).parameters) == ["data", "component"]
    assert inspect.iscoroutinefunction(dtls._handle_rtp_data)
    assert getattr(dtls, DTLS_RX_BYTES) == getattr(dtls, DTLS_RX_PACKETS) == 0
    receiver = RTCRtpReceiver("video", dtls)
    direct = _DirectSrtpReceive.install(receiver)
    assert connection.data_received is direct
    assert _DirectSrtpReceive.install(receiver) is direct  # once per connection
    await dtls.stop()


async def test_srtp_is_handled_as_it_is_read_and_everything_else_still_queues() -> None:
    dtls, tx = direct_transport()
    connection = dtls.transport._connection
    handled: list[tuple[int, int]] = []

    async def handle(data: bytes, arrival_time_ms: int) -> None:
        handled.append((RtpPacket.parse(data).sequence_number, arrival_time_ms))

    dtls._handle_rtp_data = handle  # type: ignore[method-assign]
    direct = _DirectSrtpReceive(dtls, connection)
    before_keys = srtp(tx, 1)
    dtls._rx_srtp, rx = None, dtls._rx_srtp
    direct(before_keys, 1)  # SRTP not keyed yet: the DTLS task's business
    assert connection._queue.qsize() == 1
    assert handled == []
    connection._queue.get_nowait()
    dtls._rx_srtp = rx

    now_ms = clock.current_ms()
    direct(srtp(tx, 2), 1)
    [(seq, arrival)] = handled  # handled inside the call, no turn of the loop
    assert seq == 2
    assert abs(arrival - now_ms) < 1000
    assert getattr(dtls, DTLS_RX_PACKETS) == 1
    assert getattr(dtls, DTLS_RX_BYTES) > 0
    assert connection._queue.empty()
    assert direct.packets == 1

    rtcp = tx.protect_rtcp(bytes(RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=1, media_ssrc=2)))
    dtls_record = b"\x16\xfe\xfd" + bytes(20)
    for other in (rtcp, dtls_record):
        direct(other, 1)
    assert [connection._queue.get_nowait() for _ in range(2)] == [(rtcp, 1), (dtls_record, 1)]
    # With anything queued, SRTP queues behind it: nothing overtakes.
    direct(dtls_record, 1)
    third = srtp(tx, 3)
    direct(third, 1)
    assert connection._queue.qsize() == 2
    assert len(handled) == 1
    connection._queue.get_nowait(), connection._queue.get_nowait()

    tampered = bytearray(srtp(tx, 4))
    tampered[-1] ^= 0xFF  # fails authentication: dropped, as aiortc drops it
    direct(bytes(tampered), 1)
    direct(srtp(tx, 5), 1)
    assert [seq for seq, _ in handled] == [2, 5]
    dtls._set_state(DtlsState.CLOSED)
    direct(srtp(tx, 6), 1)  # a closed transport handles nothing itself
    assert connection._queue.qsize() == 1
    assert [seq for seq, _ in handled] == [2, 5]


async def test_a_suspended_packet_holds_the_ones_behind_it_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dtls, tx = direct_transport()
    connection = dtls.transport._connection
    handled: list[int] = []
    release = asyncio.Event()

    async def handle(data: bytes, arrival_time_ms: int) -> None:
        seq = RtpPacket.parse(data).sequence_number
        if seq == 10:
            await release.wait()  # as a TURN channel still being bound would
        if 20 <= seq < 26:
            raise RuntimeError("synthetic failure")
        handled.append(seq)

    dtls._handle_rtp_data = handle  # type: ignore[method-assign]
    direct = _DirectSrtpReceive(dtls, connection)
    for seq in (10, 11, 12):
        direct(srtp(tx, seq), 1)
    await asyncio.sleep(0.01)
    assert handled == []  # 11 and 12 wait behind 10
    release.set()
    await wait_until(lambda: len(handled) == 3)
    assert handled == [10, 11, 12]
    direct(srtp(tx, 13), 1)
    assert handled[-1] == 13  # and the next is handled as read again
    with caplog.at_level("ERROR", logger="services.video.forwarding"):
        direct(srtp(tx, 20), 1)
    assert "handling an RTP packet failed (1 so far)" in caplog.text
    caplog.clear()
    with caplog.at_level("ERROR", logger="services.video.forwarding"):
        for seq in range(21, 26):
            direct(srtp(tx, seq), 1)
    assert direct.failures == 6
    assert caplog.text == ""  # a fault on every packet does not flood the journal
    direct(srtp(tx, 30), 1)
    assert handled[-1] == 30
    assert connection._queue.empty()


async def relay_socket(
    connection: Any, protocol_type: type = aioice.ice.StunProtocol
) -> tuple[asyncio.DatagramTransport, socket.socket]:
    """The relay's end of a nominated pair, as ICE leaves it (``nominated_udp``), and the
    publisher's socket at the other end."""
    publisher = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    publisher.bind(("127.0.0.1", 0))
    udp = await nominated_udp(connection, publisher.getsockname(), protocol_type)
    return udp, publisher


async def test_a_burst_is_read_in_one_callback_a_bounded_number_at_a_time() -> None:
    dtls, tx = direct_transport()
    connection = dtls.transport._connection
    handled: list[int] = []

    async def handle(data: bytes, arrival_time_ms: int) -> None:
        handled.append(RtpPacket.parse(data).sequence_number)

    dtls._handle_rtp_data = handle  # type: ignore[method-assign]
    direct = _DirectSrtpReceive(dtls, connection)
    connection.data_received = direct
    udp, publisher = await relay_socket(connection)
    to = udp.get_extra_info("sockname")
    try:
        burst = READS_PER_CALL + 8
        for seq in range(burst):  # all in the socket before the loop reads the first
            publisher.sendto(srtp(tx, seq), to)
        await wait_until(lambda: len(handled) == burst)
        assert handled == list(range(burst))
        # The loop read two (one per callback); the rest were read behind them: 31, then 7,
        # so the loop got a turn after READS_PER_CALL datagrams.
        assert direct.drained == burst - 2
        assert direct.packets == burst

        # What is not SRTP takes its usual way from the drain too, and nothing overtakes it.
        dtls_record = b"\x16\xfe\xfd" + bytes(20)
        for seq in range(100, 103):
            publisher.sendto(srtp(tx, seq), to)
        publisher.sendto(dtls_record, to)
        later = [srtp(tx, seq) for seq in range(103, 106)]
        for data in later:
            publisher.sendto(data, to)
        await wait_until(lambda: connection._queue.qsize() == 4)
        assert handled[burst:] == [100, 101, 102]
        assert [connection._queue.get_nowait() for _ in range(4)] == [
            (dtls_record, 1),
            *((data, 1) for data in later),
        ]
        assert direct.drained == burst - 2 + 6
    finally:
        udp.close()
        publisher.close()


async def test_no_drain_through_a_relay_or_when_turned_off() -> None:
    for protocol_type, drain in ((SlowRelayProtocol, True), (aioice.ice.StunProtocol, False)):
        dtls, tx = direct_transport()
        connection = dtls.transport._connection
        handled: list[int] = []

        async def handle(data: bytes, arrival_time_ms: int, into: list[int] = handled) -> None:
            into.append(RtpPacket.parse(data).sequence_number)

        dtls._handle_rtp_data = handle  # type: ignore[method-assign]
        direct = _DirectSrtpReceive(dtls, connection, drain=drain)
        connection.data_received = direct
        udp, publisher = await relay_socket(connection, protocol_type)
        try:
            for seq in range(10):
                publisher.sendto(srtp(tx, seq), udp.get_extra_info("sockname"))
            await wait_until(lambda into=handled: len(into) == 10)  # type: ignore[misc]
            assert handled == list(range(10))
            assert direct.drained == 0, protocol_type
        finally:
            udp.close()
            publisher.close()


async def wait_until(predicate: Callable[[], bool], seconds: float = 2.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


# --- frames sent as they are complete (_FrameSender.send_now) -------------------------------


class Sink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not is_rtcp(data):  # the sender's RTCP reports come when they are due
            self.received.append(data)


class SlowRelayProtocol(aioice.ice.StunProtocol):
    """A relayed pair's protocol as far as the relay can tell (not aioice's plain UDP
    one): each send waits a little first, as a TURN channel being bound makes it wait."""

    async def send_data(self, data: bytes, addr: tuple[str, int]) -> None:
        await asyncio.sleep(0.02)
        self.transport.sendto(data, addr)


async def nominated_udp(
    connection: Any,
    remote: tuple[str, int],
    protocol_type: type = aioice.ice.StunProtocol,
) -> asyncio.DatagramTransport:
    """Nominate a pair on an ICE connection, as ICE would: a real UDP socket on 127.0.0.1
    (whose protocol hands what it reads to ``connection``) to the ``remote`` address."""
    udp, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: protocol_type(connection), local_addr=("127.0.0.1", 0)
    )
    (host, port), (r_host, r_port) = udp.get_extra_info("sockname"), remote
    protocol.local_candidate = aioice.Candidate(
        foundation="1", component=1, transport="udp", priority=1, host=host, port=port, type="host"
    )
    remote_candidate = aioice.Candidate(
        foundation="2",
        component=1,
        transport="udp",
        priority=1,
        host=r_host,
        port=r_port,
        type="host",
    )
    connection._nominated[1] = aioice.ice.CandidatePair(protocol, remote_candidate)
    return udp


def av_packet(frame: bytes, pts: int) -> av.Packet[Any]:
    packet = av.Packet(frame)
    packet.pts, packet.time_base = pts, fractions.Fraction(1, 90000)
    return packet


async def test_a_frame_finding_its_sender_idle_goes_out_at_once_in_order_with_the_loops() -> None:
    dtls = RTCDtlsTransport(
        RTCIceTransport(RTCIceGatherer()), [RTCCertificate.generateCertificate()]
    )
    dtls._tx_srtp = Session(Policy(key=SRTP_KEY, ssrc_type=Policy.SSRC_ANY_OUTBOUND))
    dtls._set_state(DtlsState.CONNECTED)
    viewer = Session(Policy(key=SRTP_KEY, ssrc_type=Policy.SSRC_ANY_INBOUND))
    sink, sunk = await asyncio.get_running_loop().create_datagram_endpoint(
        Sink, local_addr=("127.0.0.1", 0)
    )
    connection, sink_at = dtls.transport._connection, sink.get_extra_info("sockname")
    stats = ViewerStats()
    track = ForwardedTrack("video", stats, request_keyframe=lambda: None)
    sender = RTCRtpSender(track, dtls)
    packer = _ForwardingPacker("video", lambda bitrate: None)
    setattr(sender, SENDER_ENCODER, packer)
    frame_loop = _FrameSender(sender, track, packer, wallclock=lambda: WALLCLOCK)
    sender._run_rtp = frame_loop.run  # type: ignore[method-assign]
    extensions_map = getattr(sender, SENDER_EXTENSIONS_MAP)
    frames = [KEYFRAME, DELTA + b"b" * 3000, DELTA + b"c" * 1500, DELTA]
    payloads = [Vp8Encoder._packetize(frame, n) for n, frame in enumerate(frames)]
    try:
        first = payloads[0]
        assert track.send_now is None  # until the loop runs: frames queue for it
        await sender.send(SEND_PARAMETERS)
        await wait_until(lambda: track.send_now is not None)
        assert frame_loop.send_now(av_packet(frames[0], 0), first) is False  # no pair yet

        await nominated_udp(connection, sink_at)
        track.offer(av_packet(frames[0], 0), keyframe=True, payloads=first)
        # Sent inside offer, through SRTP and the pair's socket: nothing for the loop.
        assert track._queue.empty()
        assert (stats.frames_out, stats.frames_direct) == (1, 1)
        assert getattr(dtls, DTLS_TX_PACKETS) == len(first)
        await wait_until(lambda: len(sunk.received) == len(first))
        assert getattr(dtls, DTLS_TX_BYTES) == sum(len(d) for d in sunk.received)

        # A pair that is not plain UDP (TURN): the loop sends, through _send_rtp; a frame
        # offered while it is still sending waits for it, even on a plain pair again.
        await nominated_udp(connection, sink_at, SlowRelayProtocol)
        track.offer(av_packet(frames[1], 3000), keyframe=False, payloads=payloads[1])
        assert track._queue.qsize() == 1
        await wait_until(lambda: len(sunk.received) > len(first))  # the loop is mid-frame
        await nominated_udp(connection, sink_at)
        track.offer(av_packet(frames[2], 6000), keyframe=False, payloads=payloads[2])
        sent_so_far = sum(map(len, payloads[:3]))
        await wait_until(lambda: len(sunk.received) == sent_so_far)
        # And once the loop is idle again, the next frame goes out at once.
        track.offer(av_packet(frames[3], 9000), keyframe=False, payloads=payloads[3])
        assert (stats.frames_out, stats.frames_direct) == (4, 2)
        await wait_until(lambda: len(sunk.received) == sum(map(len, payloads)))

        packets = [RtpPacket.parse(viewer.unprotect(d), extensions_map) for d in sunk.received]
        start = packets[0].sequence_number
        assert [p.sequence_number for p in packets] == [
            (start + n) % 65536 for n in range(len(packets))
        ]
        assert [p.payload for p in packets] == [x for frame in payloads for x in frame]
        markers = [0] * (len(first) - 1) + [1]
        assert [p.marker for p in packets[: len(first)]] == markers
        assert sorted({p.timestamp - packets[0].timestamp for p in packets}) == [
            0,
            3000,
            6000,
            9000,
        ]
        abs_send_time = (ntp_time(WALLCLOCK) >> 14) & 0xFFFFFF
        assert {(p.extensions.mid, p.extensions.abs_send_time) for p in packets} == {
            ("0", abs_send_time)
        }
        assert getattr(dtls, DTLS_TX_PACKETS) == len(packets)
        report = [s for s in (await sender.getStats()).values() if s.type == "outbound-rtp"]
        assert report[0].packetsSent == len(packets)
        assert report[0].bytesSent == sum(len(p.payload) for p in packets)

        # A NACK for a packet sent at once is answered from the history, by RTX.
        lost = packets[1].sequence_number
        await sender._handle_rtcp_packet(
            RtcpRtpfbPacket(fmt=1, ssrc=1, media_ssrc=sender._ssrc, lost=[lost])
        )
        await wait_until(lambda: len(sunk.received) == len(packets) + 1)
        rtx = RtpPacket.parse(viewer.unprotect(sunk.received[-1]), extensions_map)
        assert (rtx.payload_type, rtx.ssrc) == (98, sender._rtx_ssrc)
        assert rtx.payload == lost.to_bytes(2, "big") + packets[1].payload

        # Not sent at once (and nothing sent, no sequence number used): the sender
        # disabled, DTLS no longer connected.
        sender._enabled = False
        assert frame_loop.send_now(av_packet(DELTA, 12000), [DELTA]) is False
        sender._enabled = True
        dtls._set_state(DtlsState.CLOSED)
        assert frame_loop.send_now(av_packet(DELTA, 12000), [DELTA]) is False
        await asyncio.sleep(0.05)
        assert len(sunk.received) == len(packets) + 1
    finally:
        track.end()
        await asyncio.wait_for(sender.stop(), 5)
        sink.close()
        for pair in dtls.transport._connection._nominated.values():
            pair.protocol.transport.close()
    assert track.send_now is None  # the loop's end takes it back


async def test_a_sender_on_a_stand_in_transport_only_ever_uses_its_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    track = ForwardedTrack("video", ViewerStats(), request_keyframe=lambda: None)
    sender = RTCRtpSender(track, MemoryTransport())  # type: ignore[arg-type]
    packer = _ForwardingPacker("video", lambda bitrate: None)
    with caplog.at_level("WARNING", logger="services.video.forwarding"):
        frame_loop = _FrameSender(sender, track, packer)
    assert caplog.text == ""  # not a DTLS transport: quietly, not as an internal gone
    sender._run_rtp = frame_loop.run  # type: ignore[method-assign]
    setattr(sender, SENDER_ENCODER, packer)
    await sender.send(SEND_PARAMETERS)
    await asyncio.sleep(0.01)
    assert track.send_now is None
    track.end()
    await asyncio.wait_for(sender.stop(), 5)


async def test_a_dtls_transport_without_what_send_now_reads_leaves_frames_to_the_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dtls = RTCDtlsTransport(
        RTCIceTransport(RTCIceGatherer()), [RTCCertificate.generateCertificate()]
    )
    track = ForwardedTrack("video", ViewerStats(), request_keyframe=lambda: None)
    sender = RTCRtpSender(track, dtls)
    packer = _ForwardingPacker("video", lambda bitrate: None)
    assert _FrameSender(sender, track, packer)._direct
    del dtls._RTCDtlsTransport__tx_bytes  # type: ignore[attr-defined]
    with caplog.at_level("WARNING", logger="services.video.forwarding"):
        frame_loop = _FrameSender(sender, track, packer)
    assert not frame_loop._direct
    assert "__tx_bytes" in caplog.text
    assert "sender's loop only" in caplog.text


def test_a_viewer_whose_send_at_once_fails_goes_back_to_its_loop_from_a_keyframe(
    caplog: pytest.LogCaptureFixture,
) -> None:
    asked: list[str] = []
    stats = ViewerStats()
    track = ForwardedTrack("video", stats, request_keyframe=lambda: asked.append("keyframe"))

    def failing(packet: av.Packet[Any], payloads: list[bytes]) -> bool:
        raise pylibsrtp.Error("srtp_err_status_fail")

    track.send_now = failing
    with caplog.at_level("ERROR", logger="services.video.forwarding"):
        # Raised inside the relay's fan-out, it would cost every later viewer the frame.
        track.offer(av_packet(KEYFRAME, 0), keyframe=True, payloads=[KEYFRAME])
    assert "sending a frame at once failed" in caplog.text
    assert track.send_now is None
    assert (stats.frames_out, stats.frames_dropped, asked) == (0, 1, ["keyframe"])
    track.offer(av_packet(DELTA, 3000), keyframe=False, payloads=[DELTA])
    assert track._queue.empty()  # it may have left in part: the viewer resyncs on a keyframe
    track.offer(av_packet(KEYFRAME, 6000), keyframe=True, payloads=[KEYFRAME])
    assert track._queue.qsize() == 1  # for the sender's loop
