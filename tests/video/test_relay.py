"""The forwarding relay end to end: aiortc peers on loopback, one publisher, N viewers."""

from __future__ import annotations

import asyncio
import statistics
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.codecs.vpx import Vp8Decoder, Vp8Encoder

from services.video.forwarding import DTLS_RX_PACKETS
from tests.video.peers import RelaySession, Viewer, relay_session, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("loopback")]


@pytest.fixture
def codec_census(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts codec objects created and VP8 frames encoded, process-wide."""
    census: Counter[str] = Counter()
    encoders: set[int] = set()

    def counting(cls: type, name: str) -> None:
        original: Callable[..., Any] = getattr(cls, name)

        def wrapper(self: object, *args: Any, **kwargs: Any) -> Any:
            census[f"{cls.__name__}.{name}"] += 1
            if name == "encode":
                encoders.add(id(self))
                census["Vp8Encoder instances encoding"] = len(encoders)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    for cls in (Vp8Decoder, OpusDecoder, OpusEncoder):
        counting(cls, "__init__")
    counting(Vp8Encoder, "encode")
    return census


def assert_in_order_and_complete(viewer: Viewer, first: int | None = None) -> list[int]:
    ids = viewer.ids()
    assert None not in ids, f"{viewer.name}: a frame's id could not be read back"
    numbers = [i for i in ids if i is not None]
    assert numbers, f"{viewer.name}: no frames"
    if first is not None:
        assert numbers[0] == first, f"{viewer.name}: first frame {numbers[0]}"
    expected = list(range(numbers[0], numbers[0] + len(numbers)))
    assert numbers == expected, f"{viewer.name}: frames out of order or missing"
    return numbers


def latencies_ms(session: RelaySession, viewer: Viewer) -> list[float]:
    return [
        (arrived - session.camera.made_at[frame_id]) * 1000
        for frame_id, arrived in viewer.video
        if frame_id is not None
    ]


async def test_three_viewers_get_every_frame_in_order_and_nothing_is_transcoded(
    codec_census: Counter[str],
) -> None:
    async with relay_session(viewers=3) as session:
        await wait_for(
            lambda: all(len(v.video) >= 60 and v.audio_frames >= 50 for v in session.viewers),
            20,
            "60 video frames and 1 s of audio at every viewer",
        )
        for viewer in session.viewers:
            assert_in_order_and_complete(viewer, first=0)
            latency = latencies_ms(session, viewer)
            # Correctness bound only (encode + relay + decode on a shared 2-core machine);
            # bench/video_relay.py measures.
            assert statistics.median(latency) < 1000, f"{viewer.name}: {latency}"
        stats = session.video_relay.stats
        assert stats.keyframes_in >= 1
        assert stats.frames_wrong_codec == 0
        assert all(s.frames_out >= 60 for s in stats.viewers.values())
        # Frames went out as they were complete, not through each viewer's sender task
        # (which still sends any that arrive while it is busy).
        assert all(s.frames_direct >= 50 for s in stats.viewers.values()), stats.viewers
        assert session.audio_relay.stats.frames_in >= 50
        # The publisher's packets were handled as read, not through aiortc's queue: one
        # handler for its BUNDLEd connection, counted in the DTLS transport's own figures.
        direct = session.video_relay.direct
        assert direct is not None
        assert session.audio_relay.direct is direct
        assert direct.packets >= 100
        [dtls] = {t.receiver.transport for t in session.relay_publisher_pc.getTransceivers()}
        assert getattr(dtls, DTLS_RX_PACKETS) >= direct.packets

    # Only the endpoints hold codecs: 1 publisher encoding, 3 viewers decoding. A relay that
    # decoded would add a decoder per track, one that re-encoded an encoder per viewer.
    assert codec_census["Vp8Encoder instances encoding"] == 1
    assert codec_census["Vp8Decoder.__init__"] == 3
    assert codec_census["OpusEncoder.__init__"] == 1
    assert codec_census["OpusDecoder.__init__"] == 3


async def test_viewer_keyframe_request_reaches_publisher_rate_limited() -> None:
    async with relay_session(viewers=3, keyframe_min_interval=1.0) as session:
        requests = 0
        force_keyframe = session.publisher_video_sender._send_keyframe

        def counting_keyframe_request() -> None:
            nonlocal requests
            requests += 1
            force_keyframe()

        session.publisher_video_sender._send_keyframe = counting_keyframe_request  # type: ignore[method-assign]
        await wait_for(lambda: all(len(v.video) >= 15 for v in session.viewers), 20, "frames")
        keyframes_before = session.video_relay.stats.keyframes_in
        assert requests == 0

        # One PLI from one viewer reaches the publisher, which sends a keyframe.
        first = session.viewers[0]
        receiver = first.pc.getTransceivers()[0].receiver
        await receiver._send_rtcp_pli(first.video_sender._ssrc)
        await wait_for(lambda: requests == 1, 5, "the PLI at the publisher")
        await wait_for(
            lambda: session.video_relay.stats.keyframes_in > keyframes_before, 5, "a keyframe"
        )

        # A burst from every viewer inside one interval: one request now, one deferred.
        await asyncio.sleep(1.1)
        for _ in range(4):
            for viewer in session.viewers:
                receiver = viewer.pc.getTransceivers()[0].receiver
                await receiver._send_rtcp_pli(viewer.video_sender._ssrc)
        await asyncio.sleep(2.5)
        assert 2 <= requests <= 3, requests
        frames = len(session.viewers[0].video)
        await wait_for(lambda: len(session.viewers[0].video) > frames + 5, 5, "more frames")
        for viewer in session.viewers:
            assert_in_order_and_complete(viewer, first=0)


async def test_late_viewer_starts_on_a_keyframe_requested_from_the_publisher() -> None:
    async with relay_session(viewers=1) as session:
        await wait_for(lambda: len(session.viewers[0].video) >= 30, 20, "frames at viewer-0")
        keyframes_before = session.video_relay.stats.keyframes_in
        late = await session.add_viewer("late")
        await wait_for(lambda: len(late.video) >= 30, 20, "30 frames at the late viewer")
        numbers = assert_in_order_and_complete(late)
        assert numbers[0] > 0
        assert session.video_relay.stats.keyframes_in > keyframes_before
        assert session.video_relay.stats.keyframe_requests_sent >= 1
        assert_in_order_and_complete(session.viewers[0], first=0)
