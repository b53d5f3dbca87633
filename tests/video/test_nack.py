"""Repeated NACKs: the retry schedule (pure, injected clock) and its aiortc touch-points.

The schedule tests feed sequence numbers and clock readings to ``NackSchedule``. The others
run a real aiortc 1.16.0 receiver on an in-memory transport (no network) and fail loudly
if aiortc changes how it NACKs underneath the relay.
"""

from __future__ import annotations

import asyncio
import inspect

import pytest
from aiortc import RTCRtpReceiver
from aiortc.rtcrtpparameters import RTCRtpReceiveParameters
from aiortc.rtcrtpreceiver import RemoteStreamTrack
from aiortc.rtp import RTCP_RTPFB_NACK, RTP_HISTORY_SIZE, RtcpPacket, RtcpRtpfbPacket, RtpPacket

from services.video.forwarding import ForwardingRelay
from services.video.nack import (
    DEFAULT_RETRY_INTERVAL,
    HORIZON,
    MAX_NACKS,
    MAX_RETRY_INTERVAL,
    MIN_RETRY_INTERVAL,
    NackSchedule,
)
from tests.video.test_forwarding_internals import DELTA, VP8, MemoryTransport, vp8_packets


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
