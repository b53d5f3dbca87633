"""Repeated NACKs: the retry schedule (pure, injected clock) and its aiortc touch-points.

The schedule tests feed sequence numbers and clock readings to ``NackSchedule``. The others
run a real aiortc 1.16.0 receiver on an in-memory transport (no network) and fail loudly
if aiortc changes how it NACKs underneath the relay. The last ones check what happens when
the relay gives up on a packet: its frame is dropped, the frames after it are not forwarded,
and one keyframe is asked for at once.
"""

from __future__ import annotations

import asyncio
import inspect

import pytest
from aiortc import RTCPeerConnection, RTCRtpReceiver
from aiortc.rtcrtpparameters import RTCRtpReceiveParameters
from aiortc.rtcrtpreceiver import RemoteStreamTrack
from aiortc.rtp import (
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    RTP_HISTORY_SIZE,
    RtcpPacket,
    RtcpPsfbPacket,
    RtcpRtpfbPacket,
    RtpPacket,
)

from services.video.forwarding import ForwardedTrack, ForwardingRelay, MarkerJitterBuffer
from services.video.nack import (
    DEFAULT_RETRY_INTERVAL,
    HORIZON,
    MAX_NACKS,
    MAX_RETRY_INTERVAL,
    MIN_RETRY_INTERVAL,
    NackSchedule,
)
from tests.video.test_forwarding_buffers import feed, packet
from tests.video.test_forwarding_internals import (
    DELTA,
    KEYFRAME,
    VP8,
    MemoryTransport,
    vp8_packets,
)


def schedule_with_gap(now: float = 0.0, **options: float) -> NackSchedule:
    """Packets 10 and 12 arrived at ``now``: 11 is missing and aiortc has just NACKed it."""
    schedule = NackSchedule(**options)  # type: ignore[arg-type]
    schedule.packet(10, now)
    schedule.packet(12, now)
    return schedule


def test_a_missing_packet_is_asked_for_again_every_retry_interval() -> None:
    schedule = schedule_with_gap()
    assert schedule.missing == [11]
    assert schedule.retry_interval == DEFAULT_RETRY_INTERVAL == 0.1
    assert schedule.due(0.099) == []
    assert schedule.due(0.1) == [11]
    assert schedule.due(0.15) == []
    assert schedule.due(0.2) == [11]
    assert schedule.repeated == 2


def test_a_repaired_packet_is_forgotten_and_times_the_round_trip() -> None:
    schedule = schedule_with_gap()
    schedule.packet(11, 0.04)
    assert schedule.missing == []
    assert schedule.due(10.0) == []
    assert (schedule.repaired, schedule.given_up) == (1, 0)
    assert schedule.srtt == pytest.approx(0.04)
    assert schedule.retry_interval == pytest.approx(0.06)  # 1.5 round trips


def test_round_trip_is_smoothed_and_sampled_from_the_first_nack() -> None:
    schedule = schedule_with_gap()
    schedule.packet(11, 0.04)
    schedule.packet(14, 1.0)  # 13 missing, NACKed at 1.0
    assert schedule.due(1.1) == [13]  # that NACK or its answer was lost
    schedule.packet(13, 1.14)  # sample 0.14 from the first NACK, not 0.04 from the last
    assert schedule.srtt == pytest.approx(0.04 + (0.14 - 0.04) / 8)


def test_retry_interval_stays_between_its_bounds() -> None:
    fast = schedule_with_gap()
    fast.packet(11, 0.001)
    assert fast.retry_interval == MIN_RETRY_INTERVAL == 0.02
    slow = schedule_with_gap()
    slow.packet(11, 2.0)
    assert slow.retry_interval == MAX_RETRY_INTERVAL == 0.25


def test_a_packet_is_given_up_after_max_nacks_in_all() -> None:
    schedule = schedule_with_gap(max_nacks=3)
    assert schedule.due(0.1) == [11]  # second NACK
    assert schedule.due(0.2) == [11]  # third
    assert schedule.due(0.31) == []
    assert schedule.missing == []
    assert (schedule.repeated, schedule.given_up) == (2, 1)
    assert MAX_NACKS == 10  # libwebrtc's kMaxNackRetries


def test_packets_the_jitter_buffer_has_passed_are_not_asked_for() -> None:
    schedule = schedule_with_gap()
    schedule.packet(15, 0.0)  # 13 and 14 missing too
    assert schedule.due(0.1, oldest_wanted=14) == [14]
    assert schedule.missing == [14]
    assert schedule.given_up == 2


def test_a_new_gap_counts_as_a_nack_of_every_missing_packet() -> None:
    # aiortc sends its whole missing list whenever a gap opens: no duplicate right after.
    schedule = schedule_with_gap()
    schedule.packet(14, 0.08)  # 13 missing; aiortc NACKs [11, 13]
    assert schedule.due(0.1) == []
    assert schedule.due(0.19) == [11, 13]


def test_gives_up_on_the_first_packet_nacked_by_aiortc_too() -> None:
    schedule = schedule_with_gap(max_nacks=2)
    schedule.packet(14, 0.05)  # aiortc's second NACK of 11
    assert schedule.due(0.2) == [13]
    assert schedule.given_up == 1


def test_given_up_packets_are_handed_out_once_oldest_first() -> None:
    schedule = schedule_with_gap(max_nacks=1)
    schedule.packet(14, 0.0)  # 13 missing too
    assert schedule.due(0.1) == []
    assert schedule.take_given_up() == [11, 13]
    assert schedule.take_given_up() == []
    schedule.packet(15 + HORIZON, 0.2)  # 15 missing, then beyond the sender's history
    schedule.packet(16 + HORIZON, 0.2)
    assert schedule.take_given_up() == [15]


def test_sequence_numbers_wrap_and_come_out_oldest_first() -> None:
    schedule = NackSchedule()
    schedule.packet(65533, 0.0)
    schedule.packet(1, 0.0)
    assert schedule.missing == [65534, 65535, 0]
    assert schedule.due(0.1, oldest_wanted=65534) == [65534, 65535, 0]
    schedule.packet(65535, 0.12)
    assert schedule.missing == [65534, 0]


def test_packets_older_than_the_senders_history_are_forgotten() -> None:
    assert HORIZON == RTP_HISTORY_SIZE == 128
    schedule = NackSchedule()
    schedule.packet(0, 0.0)
    schedule.packet(2, 0.0)
    schedule.packet(200, 0.0)  # 3-199 missing, only the newest 128 can still be resent
    assert schedule.missing == list(range(72, 200))
    assert schedule.given_up == 1  # 1


def test_reordered_and_duplicate_packets_change_nothing() -> None:
    schedule = schedule_with_gap()
    schedule.packet(10, 0.01)
    schedule.packet(12, 0.01)
    assert schedule.missing == [11]
    assert schedule.srtt is None


@pytest.mark.parametrize(
    "options",
    [
        {"min_interval": 0.0},
        {"min_interval": 0.2, "default_interval": 0.1},
        {"default_interval": 0.3},
        {"max_nacks": 0},
        {"horizon": 0x8000},
    ],
)
def test_nonsense_settings_are_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        NackSchedule(**options)  # type: ignore[arg-type]


# --- the aiortc touch-points ---------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def nacks_sent(transport: MemoryTransport) -> list[list[int]]:
    return [
        list(packet.lost)
        for data in transport.sent
        for packet in RtcpPacket.parse(data)
        if isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK
    ]


def one_packet_frame(seq: int) -> RtpPacket:
    [packet] = vp8_packets(DELTA + bytes([seq & 0xFF]), seq=seq, timestamp=3000 * seq)
    return packet


async def started_receiver(transport: MemoryTransport) -> RTCRtpReceiver:
    receiver = RTCRtpReceiver("video", transport)  # type: ignore[arg-type]
    receiver._track = RemoteStreamTrack(kind="video")
    receiver._set_rtcp_ssrc(999)
    return receiver


async def test_receiver_sends_nacks_with_the_signature_the_relay_calls() -> None:
    receiver = await started_receiver(MemoryTransport())
    assert inspect.iscoroutinefunction(receiver._send_rtcp_nack)
    assert list(inspect.signature(receiver._send_rtcp_nack).parameters) == ["media_ssrc", "lost"]


async def test_stock_receiver_nacks_a_lost_packet_only_once() -> None:
    # Why nack.py exists. If aiortc starts repeating NACKs itself, the relay's can go.
    transport = MemoryTransport()
    receiver = await started_receiver(transport)
    await receiver.receive(RTCRtpReceiveParameters(codecs=[VP8]))
    try:
        for seq in [100, 101, *range(103, 140)]:
            await receiver._handle_rtp_packet(one_packet_frame(seq), arrival_time_ms=seq * 33)
        assert nacks_sent(transport) == [[102]]
    finally:
        await asyncio.wait_for(receiver.stop(), 5)


async def relay_fed(repeat_nacks: bool) -> tuple[MemoryTransport, ForwardingRelay]:
    """Frames 100-108 (one packet each, 102 lost until t=0.25 s) through a relay's receiver."""
    transport = MemoryTransport()
    receiver = await started_receiver(transport)
    clock = FakeClock()
    relay = ForwardingRelay("video", clock=clock, repeat_nacks=repeat_nacks)
    relay.attach(receiver)
    await receiver.receive(RTCRtpReceiveParameters(codecs=[VP8]))
    try:
        arrivals = [(0.0, 100), (0.0, 101), (0.0, 103), (0.05, 104), (0.1, 105), (0.15, 106)]
        arrivals += [(0.2, 107), (0.25, 102), (0.5, 108)]
        for now, seq in arrivals:
            clock.now = now
            await receiver._handle_rtp_packet(one_packet_frame(seq), arrival_time_ms=0)
            for _ in range(3):
                await asyncio.sleep(0)  # the relay's NACK task
        assert relay.stats.frames_in == 9  # released, in order, once 102 came
    finally:
        relay.stop()
        await asyncio.wait_for(receiver.stop(), 5)
    return transport, relay


async def test_relay_repeats_a_nack_until_the_packet_arrives() -> None:
    transport, relay = await relay_fed(repeat_nacks=True)
    # aiortc's own at 0.0, the relay's at 0.1 and 0.2; nothing once 102 arrived.
    assert nacks_sent(transport) == [[102], [102], [102]]
    assert (relay.stats.nacks_repeated, relay.stats.nacks_given_up) == (2, 0)


async def test_relay_without_repeated_nacks_leaves_aiortc_alone() -> None:
    transport, relay = await relay_fed(repeat_nacks=False)
    assert nacks_sent(transport) == [[102]]
    assert relay.stats.nacks_repeated == 0


async def test_relay_that_repairs_a_loss_asks_for_no_keyframe() -> None:
    transport, relay = await relay_fed(repeat_nacks=True)
    assert plis_sent(transport) == 0
    assert relay.stats.keyframe_requests_after_loss == 0
    assert relay.stats.frames_dropped_after_loss == 0


# --- giving up on a packet -----------------------------------------------------------------


def test_abandoning_a_packet_drops_its_frame_and_releases_the_ones_behind_it() -> None:
    buffer = MarkerJitterBuffer()
    # Frame 90 is packets 1-3 with 2 lost; frames 180 (4-5) and 270 (6) are complete.
    held = [packet(1, 90, data=b"a1"), packet(3, 90, True, b"a3")]
    held += [packet(4, 180, data=b"b1"), packet(5, 180, True, b"b2"), packet(6, 270, True, b"c")]
    assert feed(buffer, held) == [None] * 5
    assert buffer.abandon(2)
    assert buffer.origin == 4  # 1-2, and 3, the rest of frame 90
    assert feed(buffer, [packet(7, 360, True, b"d")]) == [b"b1b2"]
    assert [f.data for f in buffer.ready] == [b"c", b"d"]
    assert not buffer.abandon(2)  # already past it


def test_a_lost_first_packet_leaves_the_rest_of_its_frame_to_the_keyframe_gate() -> None:
    # Nothing says where the lost packet's frame ended: what is left of it is released, and
    # the relay drops it (not a keyframe) as it drops every frame until one after a loss.
    buffer = MarkerJitterBuffer()
    assert feed(buffer, [packet(1, 90, True, b"a")]) == [b"a"]
    assert feed(buffer, [packet(3, 180, data=b"b2"), packet(4, 180, True, b"b3")]) == [None] * 2
    assert buffer.abandon(2)
    assert feed(buffer, [packet(5, 270, True, b"c")]) == [b"b2b3"]


def test_a_given_up_packet_arriving_late_does_not_empty_the_buffer() -> None:
    # Stock aiortc takes a packet 100 or more behind the first slot for a restarted stream:
    # it empties the buffer and waits there, behind a hole, for 512 packets.
    buffer = MarkerJitterBuffer()
    assert feed(buffer, [packet(1, 0, True)]) == [b"1."]
    frames = [packet(seq, 90 * seq, True) for seq in range(3, 203)]
    assert feed(buffer, frames) == [None] * 200  # 2 missing
    assert buffer.abandon(2)
    assert feed(buffer, [packet(203, 90 * 203, True)]) == [b"3."]
    buffer.ready = []
    assert feed(buffer, [packet(2, 180, True)]) == [None]  # 201 behind: dropped
    assert buffer.origin == 204
    assert feed(buffer, [packet(204, 90 * 204, True)]) == [b"204."]


def plis_sent(transport: MemoryTransport) -> int:
    return sum(
        1
        for data in transport.sent
        for packet in RtcpPacket.parse(data)
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_PLI
    )


class GivenUp:
    """A relay on a real receiver and one viewer, fed frames one packet each with a clock."""

    def __init__(self) -> None:
        self.transport = MemoryTransport()
        self.clock = FakeClock()
        self.relay = ForwardingRelay("video", clock=self.clock)
        self.pc = RTCPeerConnection()
        self.receiver: RTCRtpReceiver | None = None
        self.track: ForwardedTrack | None = None

    async def __aenter__(self) -> GivenUp:
        self.receiver = await started_receiver(self.transport)
        self.relay.attach(self.receiver)
        track = self.relay.add_viewer(self.pc, "viewer").track
        assert isinstance(track, ForwardedTrack)
        self.track = track
        await self.receiver.receive(RTCRtpReceiveParameters(codecs=[VP8]))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.relay.stop()
        assert self.receiver is not None
        await asyncio.wait_for(self.receiver.stop(), 5)
        await self.pc.close()

    async def send(self, now: float, packets: list[RtpPacket]) -> None:
        assert self.receiver is not None
        self.clock.now = now
        for p in packets:
            await self.receiver._handle_rtp_packet(p, arrival_time_ms=0)
        for _ in range(3):
            await asyncio.sleep(0)  # the relay's NACK and PLI tasks

    def forwarded(self) -> list[bytes]:
        """Frames queued for the viewer since the last call."""
        assert self.track is not None
        out = []
        while not self.track._queue.empty():
            item = self.track._queue.get_nowait()
            assert item is not None
            out.append(bytes(item[0]))
        return out


def delta(seq: int) -> list[RtpPacket]:
    return [one_packet_frame(seq)]


def keyframe(seq: int) -> list[RtpPacket]:
    return vp8_packets(KEYFRAME, seq=seq, timestamp=3000 * seq)


async def test_giving_up_on_packets_asks_for_one_keyframe_at_once() -> None:
    # 102 and 109 are lost for good (10 NACKs each, 0.1 s apart, no round trip measured;
    # packets every 62.5 ms): given up at 1.25 s and 1.625 s, inside one 0.5 s interval.
    async with GivenUp() as run:
        await run.send(0.0, keyframe(98) + delta(100) + delta(101))
        assert run.forwarded() == [KEYFRAME, DELTA + b"\x64", DELTA + b"\x65"]
        seqs = [seq for seq in range(103, 132) if seq != 109]
        for step, seq in enumerate(seqs):
            await run.send(0.0625 * step, delta(seq))
            if run.relay.stats.nacks_given_up == 0:
                assert plis_sent(run.transport) == 0
        stats = run.relay.stats
        assert stats.nacks_given_up == 2
        assert plis_sent(run.transport) == 1  # one PLI for both, sent at the first
        assert (stats.keyframe_requests_after_loss, stats.keyframe_requests_sent) == (1, 1)
        # The frames behind the holes came out once given up, and none reached the viewer.
        assert run.forwarded() == []
        assert stats.frames_in == 3 + len(seqs)
        assert stats.frames_dropped_after_loss == len(seqs)

        # The lost packets arrive after all: dropped, nothing asked.
        await run.send(1.7, delta(102) + delta(109))
        assert plis_sent(run.transport) == 1
        assert stats.frames_in == 3 + len(seqs)

        # The keyframe asked for: forwarded, and the frames after it.
        await run.send(1.7, keyframe(132) + delta(134))
        assert run.forwarded() == [KEYFRAME, DELTA + b"\x86"]
        assert stats.keyframe_requests_after_loss == 1
        assert plis_sent(run.transport) == 1


async def test_a_keyframe_that_does_not_come_is_asked_for_again_each_interval() -> None:
    async with GivenUp() as run:
        await run.send(0.0, keyframe(98) + delta(100) + delta(101))
        seqs = list(range(103, 140))  # 102 given up at 1.25 s; 2.25 s in all
        for step, seq in enumerate(seqs):
            await run.send(0.0625 * step, delta(seq))
        stats = run.relay.stats
        assert stats.keyframe_requests_after_loss == 3  # at 1.25, 1.75 and 2.25 s
        assert plis_sent(run.transport) == 3
        assert stats.frames_dropped_after_loss == len(seqs)


async def test_a_packet_the_sender_no_longer_has_is_given_up_through_the_limiter() -> None:
    # 101 is lost and 128 packets follow at once: the publisher's sender keeps no more, so
    # it is given up without waiting for 10 NACKs (stock aiortc would wait for 512 packets
    # and then send its own PLI, unlimited). A viewer asked for a keyframe just before: the
    # relay's request waits for the end of the 0.5 s interval, as any request does.
    async with GivenUp() as run:
        await run.send(0.0, keyframe(98) + delta(100))
        run.relay.request_keyframe()
        await run.send(0.0, [])
        assert plis_sent(run.transport) == 1
        await run.send(0.1, [one_packet_frame(seq) for seq in range(102, 102 + 200)])
        stats = run.relay.stats
        assert stats.nacks_given_up == 1
        assert stats.keyframe_requests_after_loss == 1
        assert plis_sent(run.transport) == 1  # deferred...
        await asyncio.sleep(0.6)
        assert plis_sent(run.transport) == 2  # ...to the end of the interval
        assert run.forwarded() == [KEYFRAME, DELTA + b"\x64"]  # none after the hole
        assert stats.frames_dropped_after_loss == 200


def test_a_frame_the_buffer_drops_itself_is_reported_instead_of_a_stock_pli() -> None:
    # A packet far behind the first slot: aiortc's buffer takes it for a restarted stream,
    # empties itself and flags a PLI, which the relay sends through its limiter instead.
    losses: list[str] = []
    buffer = MarkerJitterBuffer(on_loss=lambda: losses.append("lost"))
    assert feed(buffer, [packet(1000, 90, True)]) == [b"1000."]
    pli_flag, frame = buffer.add(packet(800, 180, True))
    assert not pli_flag
    assert frame is not None
    assert frame.data == b"800."
    assert losses == ["lost"]
    stock = MarkerJitterBuffer()
    feed(stock, [packet(1000, 90, True)])
    assert stock.add(packet(800, 180, True))[0] is True
