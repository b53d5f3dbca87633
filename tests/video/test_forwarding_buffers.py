"""Pure parts of the relay: marker release, audio pass-through, keyframe limits, lagging viewers."""

from __future__ import annotations

from typing import Any

import av
import pytest
from aiortc.rtp import RtpPacket

from services.video.forwarding import (
    VIEWER_QUEUE_FRAMES,
    ForwardedTrack,
    KeyframeRequestLimiter,
    MarkerJitterBuffer,
    PassThroughAudioBuffer,
    ViewerStats,
)


def packet(seq: int, timestamp: int, marker: bool = False, data: bytes | None = None) -> RtpPacket:
    p = RtpPacket(sequence_number=seq & 0xFFFF, timestamp=timestamp, marker=int(marker), ssrc=7)
    p._data = data if data is not None else f"{seq}.".encode()  # type: ignore[attr-defined]
    return p


def feed(
    buffer: MarkerJitterBuffer | PassThroughAudioBuffer, packets: list[RtpPacket]
) -> list[bytes | None]:
    out = []
    for p in packets:
        _, frame = buffer.add(p)
        out.append(None if frame is None else frame.data)
    return out


def test_frame_released_on_its_marker_packet() -> None:
    buffer = MarkerJitterBuffer()
    assert feed(
        buffer, [packet(10, 90, data=b"a"), packet(11, 90, data=b"b"), packet(12, 90, True, b"c")]
    ) == [None, None, b"abc"]
    assert buffer.ssrc == 7
    assert feed(buffer, [packet(13, 180, True, b"d")]) == [b"d"]


def test_frame_released_when_a_reordered_packet_completes_it() -> None:
    buffer = MarkerJitterBuffer()
    assert feed(
        buffer, [packet(1, 90, data=b"a"), packet(3, 90, True, b"c"), packet(2, 90, data=b"b")]
    ) == [None, None, b"abc"]


def test_frames_completed_by_one_late_packet_are_all_released() -> None:
    buffer = MarkerJitterBuffer()
    assert feed(buffer, [packet(1, 90, data=b"a1"), packet(2, 90, True, b"a2")]) == [None, b"a1a2"]
    late, *rest = [
        packet(3, 180, data=b"b1"),
        packet(4, 180, True, b"b2"),
        packet(5, 270, True, b"c"),
        packet(6, 360, data=b"d1"),
    ]
    assert feed(buffer, rest) == [None] * 3
    assert feed(buffer, [late]) == [b"b1b2"]
    assert buffer.released_timestamp == 180
    assert [(f.data, f.timestamp) for f in buffer.ready] == [(b"c", 270)]
    assert feed(buffer, [packet(7, 360, True, b"d2")]) == [b"d1d2"]
    assert buffer.ready == []


def test_frame_with_a_missing_packet_is_held() -> None:
    buffer = MarkerJitterBuffer()
    assert feed(buffer, [packet(1, 90), packet(3, 90, True), packet(4, 180, True)]) == [
        None,
        None,
        None,
    ]


def test_frame_without_marker_released_by_the_next_frame_as_stock_aiortc_does() -> None:
    buffer = MarkerJitterBuffer()
    assert feed(buffer, [packet(1, 90, data=b"a"), packet(2, 180, data=b"b")]) == [None, b"a"]


def test_marker_release_across_sequence_wraparound() -> None:
    buffer = MarkerJitterBuffer()
    assert feed(buffer, [packet(65535, 90, data=b"a"), packet(0, 90, True, b"b")]) == [None, b"ab"]


def test_audio_packets_pass_at_once_and_stale_ones_are_dropped() -> None:
    buffer = PassThroughAudioBuffer()
    got = feed(
        buffer,
        [
            packet(65534, 0, data=b"1"),
            packet(0, 1920, data=b"3"),
            packet(65535, 960, data=b"2"),
            packet(0, 1920, data=b"3"),
            packet(1, 2880, data=b"4"),
        ],
    )
    assert got == [b"1", b"3", None, None, b"4"]


def test_keyframe_requests_limited_to_one_per_interval_with_one_deferred() -> None:
    limiter = KeyframeRequestLimiter(min_interval=0.5)
    assert limiter.request(10.0) == 0.0
    assert limiter.request(10.1) == pytest.approx(0.4)
    assert limiter.request(10.2) is None
    assert limiter.request(10.3) is None
    limiter.fired(10.5)
    assert limiter.request(10.6) == pytest.approx(0.4)
    limiter.fired(11.0)
    assert limiter.request(11.5) == 0.0


def frame(n: int) -> av.Packet[Any]:
    p = av.Packet(bytes([n]))
    p.pts = n
    return p


async def test_video_viewer_waits_for_a_keyframe_and_asks_for_one() -> None:
    asks: list[int] = []
    track = ForwardedTrack("video", ViewerStats(), lambda: asks.append(1))
    track.offer(frame(1), keyframe=False)
    track.offer(frame(2), keyframe=False)
    assert (track.stats.frames_dropped, len(asks)) == (2, 2)
    track.offer(frame(3), keyframe=True)
    track.offer(frame(4), keyframe=False)
    assert [(await track.recv()).pts for _ in range(2)] == [3, 4]
    assert track.stats.frames_out == 2


async def test_lagging_video_viewer_is_flushed_and_resynchronised_on_a_keyframe() -> None:
    asks: list[int] = []
    track = ForwardedTrack("video", ViewerStats(), lambda: asks.append(1))
    limit = VIEWER_QUEUE_FRAMES["video"]
    track.offer(frame(0), keyframe=True)
    for n in range(1, limit + 1):
        track.offer(frame(n), keyframe=False)
    assert track.stats.frames_dropped == limit + 1
    assert asks == [1]
    track.offer(frame(200), keyframe=False)
    track.offer(frame(201), keyframe=True)
    assert (await track.recv()).pts == 201


async def test_lagging_audio_viewer_drops_its_backlog_and_continues() -> None:
    track = ForwardedTrack("audio", ViewerStats(), lambda: None)
    limit = VIEWER_QUEUE_FRAMES["audio"]
    for n in range(limit + 1):
        track.offer(frame(n % 256), keyframe=True)
    assert track.stats.frames_dropped == limit
    assert (await track.recv()).pts == limit % 256


async def test_ended_track_stops_its_reader() -> None:
    from aiortc.mediastreams import MediaStreamError

    track = ForwardedTrack("audio", ViewerStats(), lambda: None)
    track.end()
    with pytest.raises(MediaStreamError):
        await track.recv()
    assert track.readyState == "ended"


async def test_a_paused_viewer_gets_nothing_and_resumes_on_a_keyframe_it_asks_for() -> None:
    asks: list[int] = []
    track = ForwardedTrack("video", ViewerStats(), lambda: asks.append(1))
    track.offer(frame(1), keyframe=True)
    track.offer(frame(2), keyframe=False)
    track.pause()  # the WAN leg went audio only: what is queued goes too
    track.offer(frame(3), keyframe=False)
    track.offer(frame(4), keyframe=True)
    assert track.stats.frames_paused == 2
    track.resume()
    assert len(asks) == 1  # a keyframe is asked for at once
    track.offer(frame(5), keyframe=False)
    track.offer(frame(6), keyframe=True)
    track.offer(frame(7), keyframe=False)
    assert [(await track.recv()).pts for _ in range(2)] == [6, 7]
    assert track.stats.bytes_out == len(bytes(frame(6))) + len(bytes(frame(7)))
