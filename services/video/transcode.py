"""Decode + re-encode, the forwarding relay's explicit fallback when codecs do not match.

The relay forwards encoded frames (services/video/forwarding.py). A viewer whose answer
did not accept the publisher's codec (a VP8 publisher and a viewer that takes H.264 only,
or the reverse) cannot be forwarded to; it gets a transcoded copy instead:

* one :class:`SharedDecoder` per published track, created when its first such viewer's
  sender starts and closed when the last one goes; it decodes each frame once, in a worker
  thread (never on the event loop), and hands the picture to the shared encoder;
* one :class:`SharedEncoder` per published track and target codec: aiortc's standard
  encoder for that codec (``aiortc.codecs.get_encoder``), encoding each picture once in a
  worker thread; its RTP payloads go to every viewer transcoded to that codec the way
  forwarded frames do (each viewer's ``_FrameSender``), at the lowest of their REMBs, and
  a PLI/FIR from any of them forces one keyframe (rate-limited); the publisher is asked for
  a keyframe only when the shared decoder needs one;
* a :class:`TranscodeBudget`, the box's: at most ``limit`` shared encoders at once, across
  every relay; a viewer that would need one more is refused (the relay says so).

It costs a decoder and an encoder's CPU (docs/video.md, "Codecs"), which is why the relay
logs each transcoded viewer and counts them (``RelayStats.transcoded_viewers``,
``transcode_encoders``).
"""

from __future__ import annotations

import asyncio
import fractions
import logging
from collections.abc import Callable
from typing import Any, Protocol

import av
from aiortc.codecs import depayload, get_decoder, get_encoder
from aiortc.codecs.base import Encoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from av.frame import Frame

logger = logging.getLogger(__name__)

VIDEO_TIME_BASE = fractions.Fraction(1, 90_000)
# Encoded frames waiting for the decoder before it drops them and starts again on a
# keyframe (~1 s of video): a decoder that cannot keep up must not grow a backlog.
DECODER_BACKLOG_FRAMES = 30
# Pictures waiting for the shared encoder before the oldest are dropped: an encoder that
# falls behind skips pictures (the stream stays valid) rather than adding delay.
ENCODER_BACKLOG_FRAMES = 3


class SharedDecoder:
    """Decodes one published video track once for every viewer that needs pictures.

    ``feed`` (on the event loop) takes each encoded frame with its output timestamp; a task
    decodes them in order in the default executor and calls every sink with the decoded
    ``VideoFrame`` (its ``pts`` the frame's, time base 1/90000). Decoding starts on a
    keyframe, asked for with ``request_keyframe``, and starts over on one after a backlog
    or a frame libav could not decode.
    """

    def __init__(self, codec: RTCRtpCodecParameters, request_keyframe: Callable[[], None]) -> None:
        self.codec = codec
        self.frames_decoded = 0
        self.frames_dropped = 0
        self.decode_errors = 0
        self._decoder = get_decoder(codec)
        self._request_keyframe = request_keyframe
        self._sinks: dict[str, Callable[[av.VideoFrame], None]] = {}
        self._queue: asyncio.Queue[tuple[bytes, int] | None] = asyncio.Queue()
        self._awaiting_keyframe = True
        self._task = asyncio.ensure_future(self._run())
        self._error_logged = False

    @property
    def sinks(self) -> list[str]:
        """The ids of the viewers given the decoded pictures."""
        return list(self._sinks)

    def add_sink(self, viewer_id: str, sink: Callable[[av.VideoFrame], None]) -> None:
        """Give ``sink`` every picture decoded from now on (the next keyframe is asked for)."""
        self._sinks[viewer_id] = sink
        self._awaiting_keyframe = True
        self._request_keyframe()

    def remove_sink(self, viewer_id: str) -> None:
        """Stop giving one viewer pictures."""
        self._sinks.pop(viewer_id, None)

    def feed(self, data: bytes, pts: int, keyframe: bool) -> None:
        """Queue one encoded frame (``pts`` in 1/90000 s) for decoding."""
        if self._queue.qsize() >= DECODER_BACKLOG_FRAMES:
            while not self._queue.empty():
                if self._queue.get_nowait() is None:  # closed meanwhile
                    self._queue.put_nowait(None)
                    return
                self.frames_dropped += 1
            self._awaiting_keyframe = True
        if self._awaiting_keyframe and not keyframe:
            self.frames_dropped += 1
            self._request_keyframe()
            return
        self._awaiting_keyframe = False
        self._queue.put_nowait((data, pts))

    def close(self) -> None:
        """Stop decoding (the last transcoded viewer went); the decoder is let go."""
        self._sinks.clear()
        self._task.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while (item := await self._queue.get()) is not None:
            frames = await loop.run_in_executor(None, self._decode, *item)
            if frames is None:
                self.decode_errors += 1
                if not self._error_logged:
                    self._error_logged = True
                    logger.info("transcoding: a %s frame could not be decoded", self.codec.mimeType)
                self._awaiting_keyframe = True
                self._request_keyframe()
                continue
            for frame in frames:
                self.frames_decoded += 1
                for sink in list(self._sinks.values()):
                    sink(frame)

    def _decode(self, data: bytes, pts: int) -> list[av.VideoFrame] | None:
        """Decode one frame (in a worker thread); None if libav refused it."""
        try:
            decoded: list[Frame] = self._decoder.decode(JitterFrame(data=data, timestamp=pts))
        except (av.FFmpegError, ValueError):
            return None
        frames = []
        for frame in decoded:
            if isinstance(frame, av.VideoFrame):
                frame.pts = pts if frame.pts is None else frame.pts
                frame.time_base = VIDEO_TIME_BASE
                frames.append(frame)
        return frames


class KeyframeLimiter(Protocol):
    """The relay's ``KeyframeRequestLimiter`` (services/video/forwarding.py)."""

    def request(self, now: float) -> float | None: ...

    def fired(self, now: float) -> None: ...


class EncodedSink(Protocol):
    """A transcoded viewer's copy of the track (``ForwardedTrack``), as the encoder sees it."""

    @property
    def stats(self) -> Any: ...

    def offer(self, packet: av.Packet[Any], keyframe: bool, payloads: list[bytes]) -> None: ...


class TranscodeBudget:
    """How many transcoding encoders the whole box may run at once (default 1).

    One encoder costs 13-63 % of a core (docs/video.md, "Codecs"), so the video service
    owns one budget and hands it to every relay it makes; a relay made without one gets its
    own. Holders are any hashable key (a relay and a target codec).
    """

    def __init__(self, limit: int = 1) -> None:
        if limit < 0:
            raise ValueError("the transcoding limit cannot be negative")
        self.limit = limit
        self._holders: set[object] = set()
        # Who was refused and wants to hear when an encoder is given back (insertion order).
        self._waiting: dict[object, Callable[[], None]] = {}

    @property
    def in_use(self) -> int:
        """Encoders running now."""
        return len(self._holders)

    def acquire(self, holder: object) -> bool:
        """Take one encoder for ``holder`` (True if it holds one now, already or anew)."""
        if holder in self._holders:
            return True
        if len(self._holders) >= self.limit:
            return False
        self._holders.add(holder)
        return True

    def release(self, holder: object) -> None:
        """Give ``holder``'s encoder back (no-op if it holds none); everyone waiting is
        woken, soon after (``call_soon``: never inside the releaser's own bookkeeping), and
        may try again; whoever is refused again waits again."""
        if holder not in self._holders:
            return
        self._holders.discard(holder)
        waiting, self._waiting = list(self._waiting.values()), {}
        if not waiting:
            return
        loop = asyncio.get_running_loop()
        for wake in waiting:
            loop.call_soon(wake)

    def wait(self, key: object, wake: Callable[[], None]) -> None:
        """Call ``wake`` once an encoder is given back (one call per ``key``)."""
        self._waiting[key] = wake

    def forget(self, key: object) -> None:
        """``key`` no longer waits (its relay stopped)."""
        self._waiting.pop(key, None)


class SharedEncoder:
    """One published track re-encoded once in one codec for every viewer that needs it.

    The shared decoder's pictures (``offer_picture``, on the loop) are encoded in order by
    one of aiortc's encoders in the default executor; each encoded frame's RTP payloads
    (aiortc's encoder packetizes) go to every sink as a forwarded frame does, so each
    viewer's sender keeps its own SSRC, sequence numbers and RTX history. Its bitrate is the
    lowest REMB among the sinks, and never over ``ceiling`` (``set_ceiling``: the WAN leg's
    cap while a remote viewer takes this copy) (``update_bitrate``; aiortc's encoder clamps
    it: 500 kbit/s to 3 Mbit/s for H.264, 250 kbit/s to 1.5 Mbit/s for VP8); ``request_keyframe`` (a sink's
    PLI/FIR, or a sink that joined) forces one keyframe, rate-limited by ``limiter``.
    ``is_keyframe`` tells a depayloaded frame's kind (the relay's ``is_keyframe``).
    """

    def __init__(
        self,
        codec: RTCRtpCodecParameters,
        limiter: KeyframeLimiter,
        clock: Callable[[], float],
        is_keyframe: Callable[[str, bytes], bool],
        encoder: Encoder | None = None,
    ) -> None:
        self.codec = codec
        self._is_keyframe = is_keyframe
        self.inner = encoder or get_encoder(codec)
        self.ceiling: int | None = None  # bit/s, the WAN leg's cap (set_ceiling)
        self._default_bitrate: int | None = getattr(self.inner, "target_bitrate", None)
        self.frames_encoded = 0
        self.frames_dropped = 0
        self.keyframes_forced = 0
        self.encode_errors = 0
        self._limiter = limiter
        self._clock = clock
        self._sinks: dict[str, EncodedSink] = {}
        self._queue: asyncio.Queue[av.VideoFrame | None] = asyncio.Queue()
        self._force = False
        self._deferred: asyncio.TimerHandle | None = None
        self._task = asyncio.ensure_future(self._run())

    @property
    def sinks(self) -> list[str]:
        """The ids of the viewers given this copy."""
        return list(self._sinks)

    def add_sink(self, viewer_id: str, sink: EncodedSink) -> None:
        """Give ``sink`` the encoded frames from the next keyframe on (forced now)."""
        self._sinks[viewer_id] = sink
        self.update_bitrate()
        self.request_keyframe()

    def remove_sink(self, viewer_id: str) -> None:
        """Stop giving one viewer this copy (its REMB no longer counts)."""
        if self._sinks.pop(viewer_id, None) is not None:
            self.update_bitrate()

    def set_ceiling(self, bps: int | None) -> None:
        """Never encode above ``bps`` (None: no ceiling but the sinks' REMBs)."""
        if bps != self.ceiling:
            self.ceiling = bps
            self.update_bitrate()

    def update_bitrate(self) -> None:
        """Encode at the lowest REMB any sink reported and the ceiling (aiortc's default
        before either)."""
        limits = [s.stats.remb_bps for s in self._sinks.values() if s.stats.remb_bps]
        if self.ceiling is not None:
            limits.append(self.ceiling)
        bitrate = min(limits) if limits else self._default_bitrate
        if bitrate is not None and hasattr(self.inner, "target_bitrate"):
            self.inner.target_bitrate = bitrate

    @property
    def target_bitrate(self) -> int:
        """The bitrate the encoder uses now (bit/s, as aiortc clamped it)."""
        bitrate: int = getattr(self.inner, "target_bitrate", 0)
        return bitrate

    def request_keyframe(self) -> None:
        """Make the next encoded picture a keyframe, at most once per the limiter's interval
        (a request inside it is deferred to its end, once)."""
        delay = self._limiter.request(self._clock())
        if delay is None:
            return
        if delay == 0.0:
            self._force = True
        else:
            self._deferred = asyncio.get_running_loop().call_later(delay, self._fire_deferred)

    def _fire_deferred(self) -> None:
        self._deferred = None
        self._limiter.fired(self._clock())
        self._force = True

    def offer_picture(self, picture: av.VideoFrame) -> None:
        """Queue one decoded picture; a backlog is dropped, oldest first, not encoded late."""
        while self._queue.qsize() >= ENCODER_BACKLOG_FRAMES:
            if self._queue.get_nowait() is None:  # closed meanwhile
                self._queue.put_nowait(None)
                return
            self.frames_dropped += 1
        self._queue.put_nowait(picture)

    def close(self) -> None:
        """Stop encoding (the last viewer of this copy went)."""
        self._sinks.clear()
        if self._deferred is not None:
            self._deferred.cancel()
        self._task.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while (picture := await self._queue.get()) is not None:
            force, self._force = self._force, False
            if force:
                self.keyframes_forced += 1
            try:
                payloads, timestamp, keyframe = await loop.run_in_executor(
                    None, self._encode, picture, force
                )
            except (av.FFmpegError, ValueError):  # one bad picture; the next one is tried
                self.encode_errors += 1
                if self.encode_errors == 1:
                    logger.info(
                        "transcoding: a picture could not be encoded (%s)", self.codec.mimeType
                    )
                self._force = True
                continue
            if not payloads:
                continue
            self.frames_encoded += 1
            packet: av.Packet[Any] = av.Packet()
            packet.pts = timestamp
            for sink in list(self._sinks.values()):
                sink.offer(packet, keyframe, payloads)

    def _encode(self, picture: av.VideoFrame, force: bool) -> tuple[list[bytes], int, bool]:
        """Encode and packetize one picture (in a worker thread); whether it is a keyframe."""
        payloads, timestamp = self.inner.encode(picture, force)
        data = b"".join(depayload(self.codec, payload) for payload in payloads)
        return payloads, timestamp, self._is_keyframe(self.codec.mimeType, data)
