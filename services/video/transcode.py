"""Decode + re-encode, the forwarding relay's explicit fallback when codecs do not match.

The relay forwards encoded frames (services/video/forwarding.py). A viewer whose answer
did not accept the publisher's codec (a VP8 publisher and a viewer that takes H.264 only,
or the reverse) cannot be forwarded to; it gets a transcoded copy instead:

* one :class:`SharedDecoder` per published track, created when its first such viewer's
  sender starts and closed when the last one goes; it decodes each frame once, in a worker
  thread (never on the event loop), and hands the picture to every transcoded viewer;
* one :class:`TranscodingEncoder` per transcoded viewer: aiortc's standard encoder for the
  viewer's codec (``aiortc.codecs.get_encoder``), run by the viewer sender's own stock RTP
  loop (which encodes in a thread too), so that the viewer's REMB sets its bitrate and its
  PLI/FIR forces a keyframe of its own; the publisher is asked for a keyframe only when the
  shared decoder needs one.

It costs a decoder and an encoder's CPU (docs/video.md, "Codecs"), which is why the relay
logs each transcoded viewer and counts them (``RelayStats.transcoded_viewers``).
"""

from __future__ import annotations

import asyncio
import fractions
import logging
from collections.abc import Callable
from typing import Any

import av
from aiortc.codecs import get_decoder
from aiortc.codecs.base import Encoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from av.frame import Frame

logger = logging.getLogger(__name__)

VIDEO_TIME_BASE = fractions.Fraction(1, 90_000)
# Encoded frames waiting for the decoder before it drops them and starts again on a
# keyframe (~1 s of video): a decoder that cannot keep up must not grow a backlog.
DECODER_BACKLOG_FRAMES = 30


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


def own_copy(picture: av.VideoFrame) -> av.VideoFrame:
    """A copy of a picture the shared decoder gave every transcoded viewer.

    aiortc's ``H264Encoder`` sets ``pict_type`` on the frame it encodes (to force a
    keyframe, or to clear that), so two encoders in two threads must not share one. About
    0.1 ms for 640x480, against ~20 ms to encode it.
    """
    copy = av.VideoFrame(picture.width, picture.height, picture.format.name)
    for source, target in zip(picture.planes, copy.planes, strict=True):
        data = bytes(source)
        if source.line_size == target.line_size:
            target.update(data)
            continue
        width, step = min(source.line_size, target.line_size), source.line_size
        pad = bytes(target.line_size - width)
        target.update(
            b"".join(data[r * step : r * step + width] + pad for r in range(target.height))
        )
    copy.pts = picture.pts
    if picture.time_base is not None:
        copy.time_base = picture.time_base
    return copy


class TranscodingEncoder:
    """A transcoded viewer sender's encoder: aiortc's own, plus the relay's bookkeeping.

    The sender's stock loop calls ``encode`` in a worker thread and sets ``target_bitrate``
    from the viewer's REMB (handed on to ``on_remb`` too); ``force_keyframe`` (the viewer's
    PLI or FIR, on the loop) makes the next picture a keyframe; ``on_bytes`` is told the
    size of each encoded frame (from the worker thread; its only writer).
    """

    def __init__(
        self, inner: Encoder, on_remb: Callable[[int], None], on_bytes: Callable[[int], None]
    ) -> None:
        self.inner = inner
        self._on_remb = on_remb
        self._on_bytes = on_bytes
        self._force = False

    def force_keyframe(self) -> None:
        """Make the next encoded picture a keyframe."""
        self._force = True

    def encode(self, frame: Frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        """Encode one decoded picture with aiortc's encoder (called in a worker thread)."""
        force, self._force = force_keyframe or self._force, False
        if isinstance(frame, av.VideoFrame):
            frame = own_copy(frame)
        payloads, timestamp = self.inner.encode(frame, force)
        self._on_bytes(sum(len(payload) for payload in payloads))
        return payloads, timestamp

    def pack(self, packet: av.Packet[Any]) -> tuple[list[bytes], int]:
        raise AssertionError("a transcoded track yields pictures, never encoded packets")

    @property
    def target_bitrate(self) -> int:
        """The viewer's REMB, as aiortc's encoder clamps it."""
        bitrate: int = getattr(self.inner, "target_bitrate", 0)
        return bitrate

    @target_bitrate.setter
    def target_bitrate(self, bitrate: int) -> None:
        if hasattr(self.inner, "target_bitrate"):
            self.inner.target_bitrate = bitrate
        self._on_remb(bitrate)
