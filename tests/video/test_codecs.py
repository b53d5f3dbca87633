"""Codecs through the relay: H.264 forwarded like VP8, and transcoding only on a mismatch.

Real aiortc peers on loopback: a publisher whose offer lists its codec, the relay's
connections as the video service holds them (the publisher's answer decides the codec,
``negotiated_codec``), and viewers whose answers accept both codecs or only one. Frames
carry their number, so each viewer checks order and completeness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiortc import (
    AudioStreamTrack,
    MediaStreamTrack,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.codecs.h264 import H264Decoder, H264Encoder
from aiortc.codecs.vpx import Vp8Decoder, Vp8Encoder
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpparameters import RTCRtpCodecCapability
from av import VideoFrame

from services.video.bandwidth import WanPolicy, budget_share
from services.video.forwarding import (
    SENDER_ENCODER,
    ForwardingRelay,
    _ForwardingPacker,
    negotiated_codec,
    publisher_receiver,
)
from services.video.rooms import MediaKind
from services.video.service import VideoService
from tests.video.media import NumberedVideoTrack, read_frame_id
from tests.video.peers import loopback_pc, negotiate, wait_for
from tests.video.test_service import OTHER_VISIT, VISIT, Client, flowing, video_service

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("loopback")]

VP8, H264 = "video/VP8", "video/H264"


def preferences(*mime_types: str) -> list[RTCRtpCodecCapability]:
    """aiortc's video capabilities for ``mime_types``, in that order, with RTX."""
    codecs = RTCRtpSender.getCapabilities("video").codecs
    chosen = [c for mime in mime_types for c in codecs if c.mimeType.lower() == mime.lower()]
    return chosen + [c for c in codecs if c.mimeType.lower() == "video/rtx"]


@pytest.fixture
def codec_census(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts video decoders created and the encoders that encoded, process-wide."""
    census: Counter[str] = Counter()
    encoders: dict[str, set[int]] = {"Vp8Encoder": set(), "H264Encoder": set()}

    def counting(cls: type, name: str) -> None:
        original: Callable[..., Any] = getattr(cls, name)

        def wrapper(self: object, *args: Any, **kwargs: Any) -> Any:
            if name == "encode":
                encoders[cls.__name__].add(id(self))
                census[f"{cls.__name__} instances encoding"] = len(encoders[cls.__name__])
            else:
                census[f"{cls.__name__}.{name}"] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    for decoder in (Vp8Decoder, H264Decoder):
        counting(decoder, "__init__")
    for encoder in (Vp8Encoder, H264Encoder):
        counting(encoder, "encode")
    return census


@dataclass
class CodecViewer:
    """A viewer accepting some codecs, and the frame ids it decoded."""

    name: str
    pc: RTCPeerConnection
    relay_pc: RTCPeerConnection
    sender: RTCRtpSender
    ids: list[int | None] = field(default_factory=list)
    keyframes: int = 0  # pictures its decoder marked as decoded from a keyframe
    task: asyncio.Task[None] | None = None

    async def consume(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                assert isinstance(frame, VideoFrame)
                self.ids.append(read_frame_id(frame))
                self.keyframes += frame.key_frame

    def codec(self) -> str:
        codec = negotiated_codec(self.pc, "video")  # the viewer's answer
        assert codec is not None
        return codec.mimeType


@dataclass
class CodecRoom:
    """One publisher sending ``codec`` through a video relay to viewers."""

    relay: ForwardingRelay
    publisher: RTCPeerConnection
    relay_pc: RTCPeerConnection
    publisher_sender: RTCRtpSender
    viewers: dict[str, CodecViewer] = field(default_factory=dict)

    async def add_viewer(self, name: str, *accepts: str) -> CodecViewer:
        relay_pc, pc = loopback_pc(), loopback_pc()
        sender = self.relay.add_viewer(relay_pc, name)
        viewer = CodecViewer(name, pc, relay_pc, sender)
        if accepts:  # an answer limited to these codecs; otherwise aiortc's (both)
            transceiver = pc.addTransceiver("video", direction="recvonly")
            transceiver.setCodecPreferences(preferences(*accepts))

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            viewer.task = asyncio.ensure_future(viewer.consume(track))

        await negotiate(relay_pc, pc)
        await wait_for(lambda: pc.connectionState == "connected", 10, f"{name} connected")
        self.viewers[name] = viewer
        return viewer

    async def remove_viewer(self, name: str) -> None:
        viewer = self.viewers.pop(name)
        self.relay.remove_viewer(name)
        await asyncio.gather(viewer.relay_pc.close(), viewer.pc.close())
        if viewer.task is not None:
            viewer.task.cancel()


@contextlib.asynccontextmanager
async def codec_room(*publisher_codecs: str) -> AsyncIterator[CodecRoom]:
    """A publisher offering ``publisher_codecs`` (in that order), connected to a relay."""
    relay = ForwardingRelay("video", name="publisher-1")
    publisher, relay_pc = loopback_pc(), loopback_pc()
    sender = publisher.addTrack(NumberedVideoTrack())
    for transceiver in publisher.getTransceivers():
        transceiver.setCodecPreferences(preferences(*publisher_codecs))

    @relay_pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        relay.attach(publisher_receiver(relay_pc, track))

    room = CodecRoom(relay, publisher, relay_pc, sender)
    try:
        await negotiate(publisher, relay_pc)
        codec = negotiated_codec(relay_pc, "video")
        assert codec is not None
        relay.set_codec(codec)
        yield room
    finally:
        relay.stop()
        pcs = [publisher, relay_pc]
        for viewer in room.viewers.values():
            pcs += [viewer.relay_pc, viewer.pc]
            if viewer.task is not None:
                viewer.task.cancel()
        await asyncio.gather(*(pc.close() for pc in pcs))


def assert_in_order(viewer: CodecViewer, complete: bool = True) -> list[int]:
    assert None not in viewer.ids, f"{viewer.name}: a frame's id could not be read back"
    numbers = [i for i in viewer.ids if i is not None]
    assert numbers, f"{viewer.name}: no frames"
    assert numbers == sorted(set(numbers)), f"{viewer.name}: frames out of order or repeated"
    if complete:
        expected = list(range(numbers[0], numbers[0] + len(numbers)))
        assert numbers == expected, f"{viewer.name}: frames missing"
    else:  # a transcoded copy may drop a picture under load, never reorder one
        assert len(numbers) >= 0.8 * (numbers[-1] - numbers[0] + 1), f"{viewer.name}: gaps"
    return numbers


async def test_h264_publisher_is_forwarded_to_h264_viewers_without_decoding(
    codec_census: Counter[str],
) -> None:
    async with codec_room(H264, VP8) as room:
        assert room.relay.mime_type == H264
        both = await room.add_viewer("viewer-both")
        only = await room.add_viewer("viewer-h264", H264)
        await wait_for(
            lambda: all(len(v.ids) >= 60 for v in room.viewers.values()), 30, "60 frames each"
        )
        assert both.codec() == only.codec() == H264
        for viewer in room.viewers.values():
            assert_in_order(viewer)
            assert isinstance(getattr(viewer.sender, SENDER_ENCODER), _ForwardingPacker)
        stats = room.relay.stats
        assert stats.keyframes_in >= 1  # IDR / SPS recognised
        assert stats.frames_wrong_codec == 0
        assert stats.transcoded_viewers == stats.decoders_created == 0
        assert room.relay.decoder is None
        assert all(v.transcoded_to is None for v in stats.viewers.values())

        # A viewer's keyframe request reaches the publisher, which sends one.
        requests = 0
        force_keyframe = room.publisher_sender._send_keyframe

        def counting_keyframe_request() -> None:
            nonlocal requests
            requests += 1
            force_keyframe()

        room.publisher_sender._send_keyframe = counting_keyframe_request  # type: ignore[method-assign]
        await asyncio.sleep(0.6)  # past the rate limit of the viewers' own start
        keyframes = stats.keyframes_in
        receiver = only.pc.getTransceivers()[0].receiver
        await receiver._send_rtcp_pli(only.sender._ssrc)
        await wait_for(lambda: requests >= 1, 5, "the PLI at the publisher")
        await wait_for(lambda: stats.keyframes_in > keyframes, 5, "an H.264 keyframe")
        frames = len(only.ids)
        await wait_for(lambda: len(only.ids) > frames + 10, 10, "frames after the keyframe")
        for viewer in room.viewers.values():
            assert_in_order(viewer)

    # Only the endpoints hold codecs: the publisher's encoder, each viewer's decoder.
    assert codec_census["H264Encoder instances encoding"] == 1
    assert codec_census["H264Decoder.__init__"] == 2
    assert codec_census["Vp8Decoder.__init__"] == 0
    assert codec_census["Vp8Encoder instances encoding"] == 0


async def test_vp8_publisher_transcoded_for_h264_only_viewers_forwarded_to_vp8_viewer(
    codec_census: Counter[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.video.forwarding")
    async with codec_room(VP8, H264) as room:
        assert room.relay.mime_type == VP8
        vp8 = await room.add_viewer("viewer-vp8")
        assert room.relay.decoder is None  # nothing transcoded yet: no decoder
        first = await room.add_viewer("viewer-h264-a", H264)
        second = await room.add_viewer("viewer-h264-b", H264)
        await wait_for(
            lambda: all(len(v.ids) >= 60 for v in room.viewers.values()), 40, "60 frames each"
        )
        assert vp8.codec() == VP8
        assert first.codec() == second.codec() == H264
        assert_in_order(vp8)
        assert_in_order(first, complete=False)
        assert_in_order(second, complete=False)

        stats = room.relay.stats
        assert stats.transcoded_viewers == 2
        assert stats.decoders_created == 1  # one decoder for the track, shared
        assert stats.encoders_created == stats.transcode_encoders == 1  # one H.264 encoder
        assert stats.viewers["viewer-vp8"].transcoded_to is None
        assert stats.viewers["viewer-h264-a"].transcoded_to == H264
        assert stats.viewers["viewer-h264-b"].bytes_out > 0  # what the shared encoder made
        shared = room.relay.encoders["video/h264"]
        assert isinstance(shared.inner, H264Encoder)
        assert sorted(shared.sinks) == ["viewer-h264-a", "viewer-h264-b"]
        # Every viewer's sender sends frames packetized once, forwarded or encoded.
        for viewer in room.viewers.values():
            assert isinstance(getattr(viewer.sender, SENDER_ENCODER), _ForwardingPacker)
        logged = [r for r in caplog.records if "transcoding to video/H264" in r.getMessage()]
        assert [r.levelno for r in logged] == [logging.INFO, logging.INFO]
        assert {"viewer-h264-a", "viewer-h264-b"} == {r.args[1] for r in logged}  # type: ignore[index]

        # The last transcoded viewer leaving ends the decoding; forwarding goes on.
        await room.remove_viewer("viewer-h264-a")
        assert stats.transcoded_viewers == 1
        assert room.relay.decoder is not None
        assert stats.transcode_encoders == 1
        await room.remove_viewer("viewer-h264-b")
        assert stats.transcoded_viewers == stats.transcode_encoders == 0
        assert room.relay.decoder is None
        assert room.relay.encoders == {}
        frames = len(vp8.ids)
        await wait_for(lambda: len(vp8.ids) > frames + 15, 10, "frames at the VP8 viewer")
        assert_in_order(vp8)

    # Publisher's VP8 encoder, the relay's one VP8 decoder, and ONE H.264 encoder shared by
    # the transcoded viewers; the VP8 viewer's decoder and the H.264 viewers' decoders.
    assert codec_census["Vp8Encoder instances encoding"] == 1
    assert codec_census["Vp8Decoder.__init__"] == 2
    assert codec_census["H264Encoder instances encoding"] == 1
    assert codec_census["H264Decoder.__init__"] == 2


async def test_h264_publisher_transcoded_for_a_vp8_only_viewer(
    codec_census: Counter[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.video.forwarding")
    started = time.monotonic()
    async with codec_room(H264) as room:
        assert room.relay.mime_type == H264
        h264 = await room.add_viewer("viewer-h264")
        vp8 = await room.add_viewer("viewer-vp8", VP8)
        await wait_for(
            lambda: all(len(v.ids) >= 60 for v in room.viewers.values()), 40, "60 frames each"
        )
        assert (h264.codec(), vp8.codec()) == (H264, VP8)
        assert_in_order(h264)
        assert_in_order(vp8, complete=False)
        stats = room.relay.stats
        assert (stats.transcoded_viewers, stats.decoders_created) == (1, 1)
        assert stats.viewers["viewer-vp8"].transcoded_to == VP8
        assert stats.viewers["viewer-h264"].transcoded_to is None
        assert isinstance(room.relay.encoders["video/vp8"].inner, Vp8Encoder)
        logged = [r for r in caplog.records if "transcoding to video/VP8" in r.getMessage()]
        assert len(logged) == 1
        assert "publisher-1" in logged[0].getMessage()

        # The transcoded viewer's keyframe request is answered by the shared encoder.
        sent = stats.keyframe_requests_sent
        receiver = vp8.pc.getTransceivers()[0].receiver
        await asyncio.sleep(0.6)
        sent = stats.keyframe_requests_sent
        await receiver._send_rtcp_pli(vp8.sender._ssrc)
        frames = len(vp8.ids)
        await wait_for(lambda: len(vp8.ids) > frames + 10, 10, "frames after the PLI")
        assert stats.keyframe_requests_sent == sent
        assert stats.viewers["viewer-vp8"].keyframe_requests >= 1
    assert time.monotonic() - started < 120

    assert codec_census["H264Encoder instances encoding"] == 1
    assert codec_census["H264Decoder.__init__"] == 2  # the relay's (shared) and the viewer's
    assert codec_census["Vp8Encoder instances encoding"] == 1
    assert codec_census["Vp8Decoder.__init__"] == 1


class H264Publisher(Client):
    """A client whose publish offer lists H.264 only for its video."""

    async def publish(self, camera: MediaStreamTrack | None = None) -> None:
        pc = self.publish_pc = loopback_pc()
        pc.addTrack(camera or NumberedVideoTrack())
        pc.addTrack(AudioStreamTrack())
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "video":
                transceiver.setCodecPreferences(preferences(H264))
        await pc.setLocalDescription(await pc.createOffer())
        self._publish_offer = pc.localDescription.sdp
        await self.send(type="offer", sdp=await self.route_offer(self._publish_offer))


class Vp8OnlyViewer(Client):
    """A client whose answers accept VP8 only for video."""

    accepts: tuple[str, ...] = (VP8,)

    async def _answer(self, pc_id: str, sdp: str) -> None:
        publisher = pc_id.split("-")[0]
        pc = self.subscriptions[pc_id] = loopback_pc()
        transceiver = pc.addTransceiver("video", direction="recvonly")
        transceiver.setCodecPreferences(preferences(*self.accepts))

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self._tasks.append(asyncio.create_task(self._consume(track, publisher)))

        await pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        await self.send(type="answer", sdp=pc.localDescription.sdp, pc=pc_id)


async def test_the_service_forwards_an_h264_publisher_and_transcodes_for_a_vp8_only_viewer() -> (
    None
):
    async with video_service() as (service, client):
        nurse = client("nurse")
        patient = client("patient", H264Publisher)
        provider = client("provider", Vp8OnlyViewer)
        await nurse.join("nurse")
        await patient.join("patient")
        await provider.join("provider")
        await nurse.send(type="admit", participant=patient.id)
        await nurse.send(type="admit", participant=provider.id)
        await patient.publish()
        await flowing(nurse.video, patient.id, 30, seconds=30)
        await flowing(provider.video, patient.id, 30, seconds=30)
        await flowing(provider.audio, patient.id, 50)
        assert nurse.unreadable == provider.unreadable == 0
        relay = service.relays(VISIT, patient.id)[MediaKind.VIDEO]
        assert relay.mime_type == H264
        assert relay.stats.viewers[nurse.id].transcoded_to is None  # forwarded
        assert relay.stats.viewers[provider.id].transcoded_to == VP8
        assert relay.stats.transcoded_viewers == 1
        assert nurse.errors() + patient.errors() + provider.errors() == []


async def test_a_remote_viewers_transcoded_copy_is_held_to_the_wan_cap() -> None:
    # 500 kbit/s of uplink: one remote video and one remote audio stream, a 323 kbit/s share.
    service = VideoService(wan=WanPolicy(uplink_kbps=500))
    async with video_service(service) as (service, client):
        nurse = client("nurse")
        patient = client("patient", H264Publisher)
        provider = client("provider", Vp8OnlyViewer)  # remote: its copy crosses the uplink
        for each, role in ((nurse, "nurse"), (patient, "patient"), (provider, "provider")):
            await each.join(role)
        await nurse.send(type="admit", participant=patient.id)
        await nurse.send(type="admit", participant=provider.id)
        await patient.publish()
        await flowing(provider.video, patient.id, 30, seconds=30)
        relay = service.relays(VISIT, patient.id)[MediaKind.VIDEO]
        shared = relay.encoders[VP8.lower()]
        share = budget_share(service.wan, 1, 1)
        assert share == 323_000
        await wait_for(lambda: shared.ceiling is not None, 5, "the WAN cap on the encoder")
        assert shared.ceiling == relay.publisher_cap
        assert shared.ceiling is not None
        assert shared.ceiling <= share
        # A REMB above the cap changes nothing; one under it decides (as the relay's REMB
        # handler does: the viewer's figure, then the encoder's bitrate).
        viewer = relay.stats.viewers[provider.id]
        viewer.remb_bps = 1_200_000
        shared.update_bitrate()
        assert shared.target_bitrate == shared.ceiling
        viewer.remb_bps = 280_000
        shared.update_bitrate()
        assert shared.target_bitrate == 280_000
        await flowing(provider.video, patient.id, 10, seconds=30)
        assert nurse.errors() + patient.errors() + provider.errors() == []


async def test_a_viewer_preferring_the_other_codec_but_taking_the_publishers_is_forwarded(
    codec_census: Counter[str],
) -> None:
    # The viewer's answer lists H.264 first, VP8 second. aiortc sends with the first codec
    # of the box's own preference order that the answer kept (``filter_preferred_codecs``),
    # so the publisher's VP8 is forwarded: nothing is transcoded for a taste.
    async with codec_room(VP8) as room:
        viewer = await room.add_viewer("viewer-h264-first", H264, VP8)
        await wait_for(lambda: len(viewer.ids) >= 45, 30, "45 frames")
        assert_in_order(viewer)
        assert isinstance(getattr(viewer.sender, SENDER_ENCODER), _ForwardingPacker)
        stats = room.relay.stats
        assert stats.transcoded_viewers == stats.decoders_created == 0
        assert stats.viewers["viewer-h264-first"].transcoded_to is None
    assert codec_census["H264Encoder instances encoding"] == 0


async def test_h264_only_viewers_share_one_encoder_at_the_lower_remb_and_its_keyframes(
    codec_census: Counter[str],
) -> None:
    async with codec_room(VP8) as room:
        first = await room.add_viewer("viewer-h264-a", H264)
        await wait_for(lambda: len(first.ids) >= 30, 30, "30 frames at the first")
        second = await room.add_viewer("viewer-h264-b", H264)  # joins mid-stream
        await wait_for(lambda: len(second.ids) >= 30, 30, "30 frames at the second")
        assert second.keyframes >= 1  # it started on a keyframe forced for it
        relay, stats = room.relay, room.relay.stats
        shared = relay.encoders["video/h264"]
        assert (stats.encoders_created, stats.transcode_encoders) == (1, 1)

        # Each REMB reaches the sender's encoder slot as aiortc's sender hands it on; the
        # shared encoder takes the lower (aiortc's H.264 encoder clamps to >= 500 kbit/s).
        getattr(first.sender, SENDER_ENCODER).target_bitrate = 1_800_000
        getattr(second.sender, SENDER_ENCODER).target_bitrate = 900_000
        assert shared.target_bitrate == 900_000
        getattr(second.sender, SENDER_ENCODER).target_bitrate = 2_400_000
        assert shared.target_bitrate == 1_800_000

        # One viewer's PLI: one keyframe from the shared encoder, which both receive; the
        # publisher is not asked.
        await asyncio.sleep(0.6)  # past the rate limit of the second viewer's join
        forced, sent = shared.keyframes_forced, stats.keyframe_requests_sent
        keyframes = first.keyframes, second.keyframes
        receiver = first.pc.getTransceivers()[0].receiver
        await receiver._send_rtcp_pli(first.sender._ssrc)
        await wait_for(lambda: shared.keyframes_forced > forced, 5, "a forced keyframe")
        await wait_for(
            lambda: first.keyframes > keyframes[0] and second.keyframes > keyframes[1],
            10,
            "the keyframe at both viewers",
        )
        assert shared.keyframes_forced == forced + 1
        assert stats.keyframe_requests_sent == sent
        assert_in_order(first, complete=False)
        assert_in_order(second, complete=False)
    # The publisher's VP8 encoder; one H.264 encoder on the relay for both viewers.
    assert codec_census["H264Encoder instances encoding"] == 1
    assert codec_census["Vp8Encoder instances encoding"] == 1
    assert codec_census["Vp8Decoder.__init__"] == 1


class H264OnlyViewer(Vp8OnlyViewer):
    """A client whose answers accept H.264 only for video."""

    accepts = (H264,)


async def test_a_viewer_needing_an_encoder_beyond_the_boxs_cap_is_refused_clearly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="services.video.forwarding")
    async with video_service() as (service, client):
        assert service.transcode_budget.limit == 1  # the default: one encoder per box
        # Visit 1: an H.264 publisher and a VP8-only viewer take the box's one encoder.
        nurse, patient = client("nurse"), client("patient", H264Publisher)
        provider = client("provider", Vp8OnlyViewer)
        for each, role in ((nurse, "nurse"), (patient, "patient"), (provider, "provider")):
            await each.join(role)
        await nurse.send(type="admit", participant=patient.id)
        await nurse.send(type="admit", participant=provider.id)
        await patient.publish()
        await flowing(provider.video, patient.id, 30, seconds=30)

        # Visit 2: a VP8 publisher and an H.264-only viewer would need another (VP8 → H.264).
        nurse_2, patient_2 = client("nurse-2"), client("patient-2")
        provider_2 = client("provider-2", H264OnlyViewer)
        for each, role in ((nurse_2, "nurse"), (patient_2, "patient"), (provider_2, "provider")):
            await each.join(role, OTHER_VISIT)
        await nurse_2.send(type="admit", participant=patient_2.id)
        await nurse_2.send(type="admit", participant=provider_2.id)
        await patient_2.publish()
        await wait_for(lambda: "transcoding_unavailable" in provider_2.errors(), 20, "the refusal")
        refusal = provider_2.last("error", code="transcoding_unavailable")
        assert "already converting video for another participant" in refusal["message"]
        relay_2 = service.relays(OTHER_VISIT, patient_2.id)[MediaKind.VIDEO]
        assert relay_2.stats.transcodes_refused == 1
        assert relay_2.encoders == {}
        assert relay_2.decoder is None
        assert relay_2.stats.viewers[provider_2.id].transcoded_to is None

        # Everyone else goes on: visit 1's transcoded copy, visit 2's forwarded video, and
        # the refused viewer's audio.
        await flowing(provider.video, patient.id, 30, seconds=30)
        await flowing(nurse_2.video, patient_2.id, 30, seconds=30)
        await flowing(provider_2.audio, patient_2.id, 50)
        assert provider_2.video[patient_2.id] == 0
        assert nurse.errors() + provider.errors() + nurse_2.errors() + patient_2.errors() == []
        assert service.transcode_budget.in_use == 1
        warned = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1
        assert provider_2.id in warned[0].getMessage()

        # The first encoder's last viewer leaves: its encoder and decoder close, and the
        # refused viewer gets the freed encoder without asking (no reconnect, same legs).
        await provider.send(type="leave")
        relay_1 = service.relays(VISIT, patient.id)[MediaKind.VIDEO]
        await wait_for(lambda: relay_1.encoders == {}, 10, "the first encoder closed")
        assert relay_1.decoder is None
        await flowing(provider_2.video, patient_2.id, 30, seconds=30)
        assert relay_2.stats.transcodes_recovered == 1
        assert relay_2.stats.viewers[provider_2.id].transcoded_to == "video/H264"
        assert service.transcode_budget.in_use == 1
        assert provider_2.errors() == ["transcoding_unavailable"]  # told once, not again
