"""aiortc peers on loopback around a forwarding relay: one publisher, N viewers.

The relay's side of each leg is an ``RTCPeerConnection`` as the product will hold it; the
publisher and viewers are plain aiortc peers. ICE gathers 127.0.0.1 only (the ``loopback``
fixture) and no STUN server is configured, so nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiortc import (
    AudioStreamTrack,
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
)
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from services.video.forwarding import ForwardingRelay, publisher_receiver
from tests.video.media import NumberedVideoTrack, read_frame_id


def loopback_pc() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


async def negotiate(offerer: RTCPeerConnection, answerer: RTCPeerConnection) -> None:
    await offerer.setLocalDescription(await offerer.createOffer())
    await answerer.setRemoteDescription(offerer.localDescription)
    await answerer.setLocalDescription(await answerer.createAnswer())
    await offerer.setRemoteDescription(answerer.localDescription)


async def wait_for(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class Viewer:
    """A viewer peer and what it decoded: (frame id, monotonic arrival) and audio frames."""

    name: str
    pc: RTCPeerConnection
    relay_pc: RTCPeerConnection
    video_sender: RTCRtpSender
    video: list[tuple[int | None, float]] = field(default_factory=list)
    audio_frames: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def ids(self) -> list[int | None]:
        return [frame_id for frame_id, _ in self.video]


async def _consume(track: MediaStreamTrack, viewer: Viewer) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            frame = await track.recv()
            if isinstance(frame, VideoFrame):
                viewer.video.append((read_frame_id(frame), time.monotonic()))
            else:
                viewer.audio_frames += 1


@dataclass
class RelaySession:
    """Publisher → relay → viewers, all connected."""

    publisher: RTCPeerConnection
    relay_publisher_pc: RTCPeerConnection
    camera: NumberedVideoTrack
    publisher_video_sender: RTCRtpSender
    video_relay: ForwardingRelay
    audio_relay: ForwardingRelay
    viewers: list[Viewer] = field(default_factory=list)

    async def add_viewer(self, name: str) -> Viewer:
        relay_pc, pc = loopback_pc(), loopback_pc()
        video_sender = self.video_relay.add_viewer(relay_pc, name)
        self.audio_relay.add_viewer(relay_pc, name)
        viewer = Viewer(name, pc, relay_pc, video_sender)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            viewer.tasks.append(asyncio.ensure_future(_consume(track, viewer)))

        await negotiate(relay_pc, pc)
        await wait_for(lambda: pc.connectionState == "connected", 10, f"{name} connected")
        self.viewers.append(viewer)
        return viewer


@contextlib.asynccontextmanager
async def relay_session(
    viewers: int, keyframe_min_interval: float = 0.5
) -> AsyncIterator[RelaySession]:
    """Connect ``viewers`` viewers first, then the publisher, so every viewer sees frame 0."""
    video_relay = ForwardingRelay("video", keyframe_min_interval=keyframe_min_interval)
    audio_relay = ForwardingRelay("audio")
    publisher, relay_publisher_pc = loopback_pc(), loopback_pc()
    camera = NumberedVideoTrack()
    publisher_video_sender = publisher.addTrack(camera)
    publisher.addTrack(AudioStreamTrack())

    @relay_publisher_pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        relay = video_relay if track.kind == "video" else audio_relay
        relay.attach(publisher_receiver(relay_publisher_pc, track))

    session = RelaySession(
        publisher, relay_publisher_pc, camera, publisher_video_sender, video_relay, audio_relay
    )
    try:
        for index in range(viewers):
            await session.add_viewer(f"viewer-{index}")
        await negotiate(publisher, relay_publisher_pc)
        yield session
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
