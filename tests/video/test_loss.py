"""Loss repair end to end: 2 % loss on the publisher's (WAN) leg, and the viewer keeps 30 fps.

The relay's receiver asks for packets still missing again (``services/video/nack.py``);
stock aiortc asks once. Two more tests make the difference deterministic: they drop
one video packet and the retransmission that answers the NACK for it, and nothing else,
with the relay's repeated NACKs and without them. The last drops one packet and every
retransmission for 1.5 s: the relay gives up on it and asks for a keyframe at once.

Publisher → relay runs through ``LossyLink`` (tests/video/lossy_proxy.py): 2 % of the
datagrams dropped each way (media, retransmissions, NACKs, RTCP and STUN alike), seeded,
and 25 ms of delay each way. The viewer's leg is loopback without loss. The publisher sends
640x480@30 VP8: the numbered blocks of ``tests/video/media.py`` in the top-left quarter and
a band of noise, which keeps aiortc's encoder near its bitrate target as a camera would.
No audio: aiortc does not NACK audio, and the Opus legs would only take CPU from the video
on a shared 2-core machine (a quarter of this test's CPU time). The figures include the
longest the event loop was late, so that a failure on an overloaded machine says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiortc import MediaStreamTrack
from av import VideoFrame

from services.video.forwarding import ForwardingRelay, publisher_receiver
from tests.video.lossy_proxy import LossyLink, rtp_header
from tests.video.media import HEIGHT as ID_HEIGHT
from tests.video.media import WIDTH as ID_WIDTH
from tests.video.media import NumberedVideoTrack
from tests.video.peers import RelaySession, Viewer, loopback_pc, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("loopback")]

logger = logging.getLogger(__name__)

WIDTH, HEIGHT = 640, 480
NOISE_ROWS = 16
LOSS = 0.02
ONE_WAY_DELAY = 0.025
WINDOW = 10.0  # seconds measured, after one second of loss to settle
SEED = 7


class LargeNumberedVideoTrack(NumberedVideoTrack):
    """640x480 numbered frames: ``draw_frame_id`` top left, grey, a band of noise below.

    ``read_frame_id`` reads the number back unchanged (it only samples the top-left blocks).
    The noise keeps aiortc's encoder at or above its target: 16 rows (the default) need
    ~0.6 Mbit/s even at its coarsest quantiser; 4 rows let it follow targets of 0.25-1 Mbit/s.
    """

    def __init__(self, noise_rows: int = NOISE_ROWS) -> None:
        super().__init__()
        self.noise_rows = noise_rows

    async def recv(self) -> VideoFrame:
        small = await super().recv()
        number = bytes(small.planes[0])
        grey = b"\x80" * (WIDTH - ID_WIDTH)
        rows = [number[y * ID_WIDTH : (y + 1) * ID_WIDTH] + grey for y in range(ID_HEIGHT)]
        rows += [b"\x80" * WIDTH] * (HEIGHT - ID_HEIGHT)
        noise = self.noise_rows
        luma = b"".join(rows[: HEIGHT - noise]) + os.urandom(WIDTH * noise)
        frame = VideoFrame(WIDTH, HEIGHT, "yuv420p")
        y_plane, u_plane, v_plane = frame.planes
        assert y_plane.line_size == WIDTH
        y_plane.update(luma)
        u_plane.update(b"\x80" * u_plane.buffer_size)
        v_plane.update(b"\x80" * v_plane.buffer_size)
        frame.pts, frame.time_base = small.pts, small.time_base
        return frame


@dataclass(frozen=True)
class Figures:
    """What the viewer saw during the window."""

    fps: float
    longest_gap_ms: float
    frames: int
    missing_ids: int
    dropped_datagrams: int
    nacks_repeated: int
    nacks_given_up: int
    kbps_in: float
    loop_late_ms: float
    keyframe_requests_after_loss: int = 0
    keyframe_requests_sent: int = 0


@contextlib.asynccontextmanager
async def lossy_session(repeat_nacks: bool) -> AsyncIterator[tuple[RelaySession, LossyLink]]:
    """One viewer on loopback; the publisher's leg through a lossy link (no loss yet)."""
    video_relay = ForwardingRelay("video", repeat_nacks=repeat_nacks)
    audio_relay = ForwardingRelay("audio")
    publisher, relay_publisher_pc = loopback_pc(), loopback_pc()
    camera = LargeNumberedVideoTrack()
    publisher_video_sender = publisher.addTrack(camera)

    @relay_publisher_pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        relay = video_relay if track.kind == "video" else audio_relay
        relay.attach(publisher_receiver(relay_publisher_pc, track))

    session = RelaySession(
        publisher, relay_publisher_pc, camera, publisher_video_sender, video_relay, audio_relay
    )
    link = LossyLink(seed=SEED, delay=ONE_WAY_DELAY)
    try:
        await session.add_viewer("viewer")
        await link.negotiate(publisher, relay_publisher_pc)
        await wait_for(
            lambda: relay_publisher_pc.connectionState == "connected", 10, "publisher connected"
        )
        yield session, link
    finally:
        video_relay.stop()
        audio_relay.stop()
        pcs = [publisher, relay_publisher_pc]
        for viewer in session.viewers:
            pcs += [viewer.relay_pc, viewer.pc]
        await asyncio.gather(*(pc.close() for pc in pcs))
        for viewer in session.viewers:
            for task in viewer.tasks:
                task.cancel()
        link.close()


def window_figures(viewer: Viewer, start: float, end: float) -> tuple[float, float, int, int]:
    """fps, longest gap in ms, frames decoded, frame ids skipped, in ``[start, end]``.

    The frame rate is over the span the window's frames cover (first to last), so that a
    backlog still in flight at the window's end (the pipeline running late on a busy CPU)
    does not count as frames lost; a stall is the gap's business, and for the gap the
    window's edges count as frames, so a stall at either end is measured in full.
    """
    inside = [(i, t) for i, t in viewer.video if start <= t <= end]
    times = [start, *(t for _, t in inside), end]
    longest = max(b - a for a, b in itertools.pairwise(times))
    ids = [i for i, _ in inside if i is not None]
    missing = (ids[-1] - ids[0] + 1 - len(set(ids))) if ids else 0
    span = inside[-1][1] - inside[0][1] if len(inside) > 1 else 0.0
    fps = (len(inside) - 1) / span if span > 0 else 0.0
    return fps, longest * 1000, len(inside), missing


class LoopLateness:
    """How late the event loop runs a 10 ms sleep, at worst: a stall of the test itself."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, time.monotonic() - before - 0.01)

    def stop(self) -> float:
        """Stop watching; the worst lateness in ms."""
        self._task.cancel()
        return round(self.worst * 1000, 1)


async def run_lossy_stream(repeat_nacks: bool) -> Figures:
    async with lossy_session(repeat_nacks) as (session, link):
        viewer = session.viewers[0]
        await wait_for(lambda: len(viewer.video) >= 30, 20, "30 frames before the loss starts")
        link.loss = LOSS
        await asyncio.sleep(1.0)
        bytes_before = session.video_relay.stats.bytes_in
        lateness = LoopLateness()
        start = time.monotonic()
        await asyncio.sleep(WINDOW)
        end = time.monotonic()
        loop_late_ms = lateness.stop()
        kbps = (session.video_relay.stats.bytes_in - bytes_before) * 8 / (end - start) / 1000
        fps, longest_ms, frames, missing = window_figures(viewer, start, end)
        stats = session.video_relay.stats
        figures = Figures(
            fps=round(fps, 2),
            longest_gap_ms=round(longest_ms, 1),
            frames=frames,
            missing_ids=missing,
            dropped_datagrams=link.dropped(),
            nacks_repeated=stats.nacks_repeated,
            nacks_given_up=stats.nacks_given_up,
            kbps_in=round(kbps),
            loop_late_ms=loop_late_ms,
        )
        logger.info("lossy stream, repeat_nacks=%s: %s", repeat_nacks, figures)
        return figures


class LoseOne:
    """Picks one video packet, then drops retransmissions: the first one (which answers its
    NACK) or, with ``hold``, every one for ``hold`` seconds (SRTP hides which packet a
    retransmission carries, and only the one packet is missing)."""

    def __init__(
        self, video_payload_type: int, rtx_payload_type: int, hold: float | None = None
    ) -> None:
        self._video, self._rtx, self._hold = video_payload_type, rtx_payload_type, hold
        self.dropped_at: float | None = None
        self.done = False

    def __call__(self, datagram: bytes) -> bool:
        header = rtp_header(datagram)
        if header is None or self.done:
            return False
        if self.dropped_at is None:
            if header[0] == self._video:
                self.dropped_at = time.monotonic()
                return True
            return False
        if self._hold is None:  # the first retransmission, then nothing more
            self.done = header[0] == self._rtx
            return self.done
        if time.monotonic() - self.dropped_at >= self._hold:
            self.done = True
            return False
        return header[0] == self._rtx


def video_payload_types(sdp: str) -> tuple[int, int]:
    """The negotiated VP8 payload type and its RTX payload type."""
    vp8 = re.search(r"a=rtpmap:(\d+) VP8/90000", sdp)
    assert vp8 is not None
    rtx = re.search(rf"a=fmtp:(\d+) apt={vp8.group(1)}\r\n", sdp)
    assert rtx is not None
    return int(vp8.group(1)), int(rtx.group(1))


async def run_lost_retransmission(
    repeat_nacks: bool, seconds: float, for_good: bool = False
) -> Figures:
    async with lossy_session(repeat_nacks) as (session, link):
        viewer = session.viewers[0]
        await wait_for(lambda: len(viewer.video) >= 30, 20, "30 frames before the drop")
        answer = session.relay_publisher_pc.localDescription.sdp
        drop = LoseOne(*video_payload_types(answer), hold=1.5 if for_good else None)
        link.drop_to_answerer(drop)
        await wait_for(lambda: drop.done, 5, "a packet and its retransmission(s) dropped")
        assert drop.dropped_at is not None
        lateness = LoopLateness()
        await asyncio.sleep(drop.dropped_at + seconds - time.monotonic())
        loop_late_ms = lateness.stop()
        fps, longest_ms, frames, missing = window_figures(
            viewer, drop.dropped_at, drop.dropped_at + seconds
        )
        stats = session.video_relay.stats
        figures = Figures(
            fps=round(fps, 2),
            longest_gap_ms=round(longest_ms, 1),
            frames=frames,
            missing_ids=missing,
            dropped_datagrams=link.dropped(),
            nacks_repeated=stats.nacks_repeated,
            nacks_given_up=stats.nacks_given_up,
            kbps_in=0,
            loop_late_ms=loop_late_ms,
            keyframe_requests_after_loss=stats.keyframe_requests_after_loss,
            keyframe_requests_sent=stats.keyframe_requests_sent,
        )
        logger.info(
            "lost retransmission%s, repeat_nacks=%s: %s",
            " for good" if for_good else "",
            repeat_nacks,
            figures,
        )
        return figures


async def test_two_percent_loss_on_the_publisher_leg_keeps_30_fps_without_stalls() -> None:
    figures = await run_lossy_stream(repeat_nacks=True)
    assert figures.dropped_datagrams >= 10, figures  # the link really was lossy
    assert figures.fps >= 29.5, figures
    assert figures.longest_gap_ms <= 500, figures
    assert figures.missing_ids == 0, figures


async def test_a_lost_retransmission_is_asked_for_again() -> None:
    figures = await run_lost_retransmission(repeat_nacks=True, seconds=3.0)
    assert figures.dropped_datagrams == 2, figures
    assert figures.nacks_repeated >= 1, figures
    assert figures.longest_gap_ms <= 500, figures
    assert figures.missing_ids == 0, figures


async def test_stock_aiortc_stalls_when_a_retransmission_is_lost() -> None:
    # Why the repeated NACKs exist: aiortc asks again only when a new gap opens, and here
    # none does, so the relay's jitter buffer waits for 512 packets (seconds) behind the hole.
    figures = await run_lost_retransmission(repeat_nacks=False, seconds=3.0)
    assert figures.dropped_datagrams == 2, figures
    assert figures.nacks_repeated == 0, figures
    assert figures.longest_gap_ms >= 2000, figures


async def test_a_packet_given_up_on_is_followed_by_a_keyframe_at_once() -> None:
    # 10 NACKs ~0.1 s apart go unanswered: the relay gives up ~1 s after the drop and asks
    # for a keyframe then, instead of waiting for 512 packets (seconds) behind the hole.
    figures = await run_lost_retransmission(repeat_nacks=True, seconds=4.0, for_good=True)
    assert figures.nacks_given_up == 1, figures
    assert figures.keyframe_requests_after_loss == 1, figures
    assert figures.longest_gap_ms <= 2000, figures
    assert figures.missing_ids > 0, figures  # the frames between the loss and the keyframe
