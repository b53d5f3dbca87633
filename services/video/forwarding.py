"""Forward a publisher's encoded media to N viewers without decoding or re-encoding.

aiortc only offers decoded frames: its ``RTCRtpReceiver`` reassembles frames in a jitter
buffer and hands them to a decoder thread, and its ``RTCRtpSender`` encodes whatever its
track returns. This module is the one place that reaches underneath, pinned to aiortc
``1.16.0`` (checked at import; ``tests/video/test_forwarding_internals.py`` fails loudly if
any of the internals below change):

* the receiver's ``__jitter_buffer`` is replaced: video frames are released on the RTP marker
  bit (stock aiortc waits for the next frame's first packet, one frame period per hop), a
  frame with a packet the relay has given up on is dropped at once and a keyframe asked for
  through the relay's limiter (so is one the buffer drops itself, instead of the receiver's
  own PLI), and audio packets are released as they arrive, since the viewer's own jitter
  buffer smooths;
* the receiver's ``__decoder_queue`` is replaced by a tap that hands each encoded frame to
  the relay; only the end-of-stream sentinel reaches the decoder thread, which therefore
  never creates a decoder;
* each viewer's sender gets a packer as its ``__encoder`` before it starts, so no codec
  context is ever created for a forwarded track; it records the viewer's REMB;
* each viewer's sender gets ``_FrameSender.run`` as its ``_run_rtp`` (the RTP loop ``send``
  starts): it sends each frame's packets in one go from the payloads the relay packetized
  once for all viewers, with one RTP header per sender (serialised by aiortc with the
  sender's ``__rtp_header_extensions_map`` and ``__mid``) patched per frame and packet,
  through the transport's ``_send_rtp``, and keeps the state aiortc's loop keeps:
  ``__rtp_history`` (RTX), the RTCP SR's ``__ntp_timestamp``, ``__rtp_timestamp``,
  ``__packet_count`` and ``__octet_count``, the ``__rtp_started`` / ``__rtp_exited``
  events; it reads ``_ssrc`` and ``_enabled``. A frame that finds the loop idle is sent at
  once from the relay's turn of the loop (``_FrameSender.send_now``, set on the track as
  ``ForwardedTrack.send_now``) when the viewer's pair is plain UDP: the DTLS transport's
  ``_state``, ``_tx_srtp`` and send counters, its ICE connection's ``_nominated`` pair
  (aioice ``CandidatePair.protocol``, ``remote_addr``; an ``aioice.ice.StunProtocol``
  exactly, never TURN) and that protocol's datagram ``transport``; anything else, and any
  frame while the loop is still sending one, goes through the loop and ``_send_rtp``.
  With ``frame_sender=False`` aiortc's own loop
  runs (its pre-encoded path, ``Encoder.pack`` for ``av.Packet``, packetizing per viewer),
  for comparison;
* the sender's ``_send_keyframe`` (called on PLI and FIR) is replaced per instance by the
  relay's keyframe request, rate-limited and sent to the publisher with the receiver's
  ``_send_rtcp_pli``. The packer's ``target_bitrate`` records the viewer's REMB;
* video packets still missing are NACKed again (``services/video/nack.py`` decides when)
  with the receiver's ``_send_rtcp_nack``: aiortc asks for a lost packet once;
* the publisher's ICE connection (aioice ``Connection``, under the receiver's
  ``transport.transport._connection``) gets ``_DirectSrtpReceive`` as its
  ``data_received``: an SRTP packet is handled as it is read, with the DTLS transport's
  ``_rx_srtp``, ``_state``, ``_handle_rtp_data`` and receive counters, instead of through the
  connection's ``_queue`` and the DTLS transport's task; all else still queues. Having
  handled one, it reads what else the nominated pair's socket holds (the ``_sock`` of
  asyncio's selector datagram transport; ``_nominated`` as above) and hands it to the pair's
  protocol as the loop would, at most ``READS_PER_CALL`` datagrams a callback;
* the receiver's ``__remote_bitrate_estimator`` is wrapped, so that the REMB the box sends
  the publisher never exceeds the cap the WAN leg sets (``services/video/bandwidth.py``);
* video is VP8 or H.264, as the publisher's offer chose; frames are packetized once per
  relay with aiortc's own ``Vp8Encoder._packetize`` or ``H264Encoder._split_bitstream`` and
  ``_packetize``. A viewer whose answer took the other codec is the one exception to
  "never decode": one shared decoder per track and one shared encoder per target codec
  (``services/video/transcode.py``) make a copy whose payloads go to each such viewer's
  ``_FrameSender`` as forwarded frames do; a box-wide ``TranscodeBudget`` caps the encoders.

Everything else goes through aiortc's public API. See docs/video.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fractions
import inspect
import logging
import queue
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import aioice.ice
import aiortc
import av
import pylibsrtp
from aiortc import (
    MediaStreamTrack,
    RTCDtlsTransport,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
)
from aiortc import sdp as aiortc_sdp
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.mediastreams import MediaStreamError
from aiortc.rate import RemoteBitrateEstimator
from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtcrtpparameters import RTCRtpCodecCapability, RTCRtpCodecParameters
from aiortc.rtcrtpsender import random_sequence_number
from aiortc.rtp import (
    RTP_HISTORY_SIZE,
    HeaderExtensions,
    HeaderExtensionsMap,
    RtpPacket,
    is_rtcp,
)
from aiortc.utils import random32, uint16_add, uint16_gt

from services.video.bandwidth import send_cap_now
from services.video.nack import NackSchedule
from services.video.transcode import SharedDecoder, SharedEncoder, TranscodeBudget

AIORTC_VERSION = "1.16.0"

if aiortc.__version__ != AIORTC_VERSION:  # pragma: no cover - guards an upgrade
    raise ImportError(
        f"services.video.forwarding adapts to aiortc {AIORTC_VERSION} internals, "
        f"found aiortc {aiortc.__version__}: re-check the internals listed in its "
        "docstring and run tests/video/test_forwarding_internals.py before changing the pin"
    )

logger = logging.getLogger(__name__)

# Name-mangled private attributes of aiortc 1.16.0 (set in each __init__).
RECEIVER_JITTER_BUFFER = "_RTCRtpReceiver__jitter_buffer"
RECEIVER_DECODER_QUEUE = "_RTCRtpReceiver__decoder_queue"
SENDER_ENCODER = "_RTCRtpSender__encoder"
RECEIVER_BITRATE_ESTIMATOR = "_RTCRtpReceiver__remote_bitrate_estimator"
# The sender state ``_FrameSender`` reads or keeps as ``RTCRtpSender._run_rtp`` would.
SENDER_RTP_STARTED = "_RTCRtpSender__rtp_started"
SENDER_RTP_EXITED = "_RTCRtpSender__rtp_exited"
SENDER_RTP_HISTORY = "_RTCRtpSender__rtp_history"
SENDER_EXTENSIONS_MAP = "_RTCRtpSender__rtp_header_extensions_map"
SENDER_MID = "_RTCRtpSender__mid"
SENDER_NTP_TIMESTAMP = "_RTCRtpSender__ntp_timestamp"
SENDER_RTP_TIMESTAMP = "_RTCRtpSender__rtp_timestamp"
SENDER_OCTET_COUNT = "_RTCRtpSender__octet_count"
SENDER_PACKET_COUNT = "_RTCRtpSender__packet_count"
# The DTLS transport's receive counters (its getStats), kept by ``_DirectSrtpReceive``.
DTLS_RX_BYTES = "_RTCDtlsTransport__rx_bytes"
DTLS_RX_PACKETS = "_RTCDtlsTransport__rx_packets"
DTLS_TX_BYTES = "_RTCDtlsTransport__tx_bytes"
DTLS_TX_PACKETS = "_RTCDtlsTransport__tx_packets"
SENDER_LOOP_STATE: dict[str, type | tuple[type, ...]] = {
    SENDER_RTP_STARTED: asyncio.Event,
    SENDER_RTP_EXITED: asyncio.Event,
    SENDER_RTP_HISTORY: dict,
    SENDER_EXTENSIONS_MAP: HeaderExtensionsMap,
    SENDER_MID: (str, type(None)),
    SENDER_NTP_TIMESTAMP: int,
    SENDER_RTP_TIMESTAMP: int,
    SENDER_OCTET_COUNT: int,
    SENDER_PACKET_COUNT: int,
    "_ssrc": int,
    "_enabled": bool,
}
NTP_UNIX_OFFSET = 2_208_988_800  # seconds from the NTP epoch (1900) to the Unix epoch (1970)

CLOCK_RATES = {"video": 90_000, "audio": 48_000}
MIME_TYPES = {"video": "video/VP8", "audio": "audio/opus"}  # the defaults
# The codecs a publisher's video may use: forwarded to viewers that take it, transcoded
# (services/video/transcode.py) for viewers that take only the other one.
VIDEO_MIME_TYPES = ("video/vp8", "video/h264")
# Frames a viewer may lag behind before it is resynchronised on a keyframe (~1 s of video).
VIEWER_QUEUE_FRAMES = {"video": 30, "audio": 50}
KEYFRAME_MIN_INTERVAL = 0.5  # seconds between keyframe requests sent to the publisher
# Datagrams the publisher's connection reads in one socket callback (_DirectSrtpReceive):
# a 720p keyframe is ~30 packets; the loop gets a turn at least this often under a flood.
READS_PER_CALL = 32
DATAGRAM_MAX = 256 * 1024  # asyncio's datagram transport reads up to this much


class AiortcInternalsChanged(RuntimeError):
    """aiortc no longer has an internal attribute the forwarding relay relies on."""


def _require(obj: object, name: str, expected: type | tuple[type, ...] | None = None) -> Any:
    try:
        value = getattr(obj, name)
    except AttributeError:
        raise AiortcInternalsChanged(
            f"{type(obj).__name__} has no {name!r} (aiortc {aiortc.__version__}, "
            f"forwarding is written for {AIORTC_VERSION})"
        ) from None
    if expected is not None and not isinstance(value, expected):
        names = (
            [t.__name__ for t in expected] if isinstance(expected, tuple) else [expected.__name__]
        )
        raise AiortcInternalsChanged(
            f"{type(obj).__name__}.{name} is a {type(value).__name__}, expected "
            f"{' or '.join(names)} (aiortc {aiortc.__version__})"
        )
    return value


def is_vp8_keyframe(data: bytes) -> bool:
    """Whether a depayloaded VP8 frame is a keyframe (RFC 6386 §9.1: P bit 0, start code)."""
    return len(data) >= 10 and not data[0] & 0x01 and data[3:6] == b"\x9d\x01\x2a"


def is_h264_keyframe(data: bytes) -> bool:
    """Whether a depayloaded H.264 frame (Annex B, as aiortc's ``h264_depayload`` makes it)
    holds an IDR slice (NAL type 5) or a sequence parameter set (7) (RFC 6184 §1.3).

    A start code cannot occur inside a NAL unit (emulation prevention, H.264 §7.4.1), so
    every ``00 00 01`` is followed by a NAL header.
    """
    start = data.find(b"\x00\x00\x01")
    while start != -1 and start + 3 < len(data):
        if data[start + 3] & 0x1F in (5, 7):
            return True
        start = data.find(b"\x00\x00\x01", start + 3)
    return False


def is_keyframe(mime_type: str, data: bytes) -> bool:
    """Whether a depayloaded VP8 or H.264 frame is a keyframe."""
    if mime_type.lower() == "video/h264":
        return is_h264_keyframe(data)
    return is_vp8_keyframe(data)


def packetize(mime_type: str, data: bytes, picture_id: int) -> list[bytes]:
    """A depayloaded frame's RTP payloads, as aiortc's own encoders packetize them.

    VP8: payload descriptors with ``picture_id`` (``Vp8Encoder._packetize``). H.264
    (packetization-mode 1): the Annex B stream split into NAL units, small ones aggregated
    (STAP-A), large ones fragmented (FU-A) (``H264Encoder._split_bitstream`` and
    ``_packetize``). Opus: the packet itself.
    """
    mime = mime_type.lower()
    if mime == "video/vp8":
        return Vp8Encoder._packetize(data, picture_id)
    if mime == "video/h264":
        return H264Encoder._packetize(H264Encoder._split_bitstream(data))
    return [data]


class MarkerJitterBuffer(JitterBuffer):
    """aiortc's video jitter buffer, releasing a frame as soon as its marker packet is in.

    A frame is released when every packet from its first to the one carrying the marker
    bit is present; a frame whose sender sets no marker is released, as stock aiortc does,
    when the next frame's first packet arrives. The receiver takes one frame per packet:
    when a repaired gap completes several, the others wait in ``ready`` (raw RTP
    timestamps) for the relay. Also remembers the media SSRC, which keyframe requests need,
    and tells ``on_packet`` (the relay's repeated NACKs) of every packet it is given.

    A missing packet the relay gives up on is ``abandon``ed: its frame, which can never be
    complete, is dropped with everything before it, so the frames behind it (the keyframe
    asked for) are released without waiting for the buffer to overflow; the given-up packet
    arriving late after all is dropped. With ``on_loss``, a frame aiortc's own logic drops
    (overflow, a stream reset) is reported to it instead of making the receiver send a PLI
    itself, so that keyframe request goes through the relay's limiter too.
    """

    def __init__(
        self,
        on_packet: Callable[[int], None] | None = None,
        on_loss: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(capacity=512, is_video=True)
        self.ssrc: int | None = None
        self.released_timestamp = 0  # raw RTP timestamp of the frame ``add`` last returned
        self.ready: list[JitterFrame] = []
        self._on_packet = on_packet
        self._on_loss = on_loss
        self._abandoned: tuple[int, int] | None = None  # [first, end) of the last abandon

    @property
    def origin(self) -> int | None:
        """The oldest sequence number still wanted (the first slot), None before any packet."""
        return self._origin

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        self.ssrc = packet.ssrc
        sequence_number = packet.sequence_number
        pli_flag, frame = (
            (False, None) if self._was_abandoned(sequence_number) else super().add(packet)
        )
        if self._on_packet is not None:
            origin = self._origin
            self._on_packet(sequence_number)
            if self._origin != origin:  # a frame was abandoned: the ones behind it may be in
                if frame is None:
                    frame = self._remove_frame(sequence_number)
                else:
                    while (more := self._pop_complete_frame()) is not None:
                        self.ready.append(more)
        if pli_flag and self._on_loss is not None:
            self._on_loss()
            pli_flag = False
        return pli_flag, frame

    def abandon(self, sequence_number: int) -> bool:
        """Give up on a missing packet: drop its frame and everything before it.

        The packets from the first slot through ``sequence_number`` go, then, if the packet
        before the lost one was in the middle of a frame, the rest of that frame. When the
        lost packet began a frame, what is left of that frame is released as one: it is not
        a keyframe, and the relay drops frames until a keyframe after a loss. False if the
        buffer is already past the packet (a frame it dropped itself).
        """
        origin = self._origin
        if origin is None or uint16_gt(origin, sequence_number):
            return False
        count = uint16_add(sequence_number, -origin) + 1
        if count > self._capacity:
            return False
        position = origin
        previous: RtpPacket | None = None
        for _ in range(count):
            packet = self._packets[position % self._capacity]
            if packet is not None:
                previous = packet
            position = uint16_add(position, 1)
        if previous is not None and not previous.marker:
            for _ in range(self._capacity - count):
                packet = self._packets[position % self._capacity]
                if packet is None or packet.timestamp != previous.timestamp:
                    break
                position = uint16_add(position, 1)
        self.remove(uint16_add(position, -origin))
        self._abandoned = (origin, position)
        return True

    def _was_abandoned(self, sequence_number: int) -> bool:
        """Whether the packet is one ``abandon`` dropped the frame of (arriving late): stock
        aiortc would take one 100 or more behind the first slot for a restarted stream and
        empty the buffer."""
        if self._abandoned is None or self._origin is None:
            return False
        first, end = self._abandoned
        return uint16_gt(self._origin, sequence_number) and (
            uint16_add(sequence_number, -first) < uint16_add(end, -first)
        )

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        self.ready = []  # not taken with the frame before them: that one was not delivered
        first = self._pop_complete_frame()
        if first is not None:
            self.released_timestamp = first.timestamp
            while (more := self._pop_complete_frame()) is not None:
                self.ready.append(more)
        return first

    def _pop_complete_frame(self) -> JitterFrame | None:
        if self._origin is None:
            return None
        packets: list[RtpPacket] = []
        for count in range(self._capacity):
            packet = self._packets[(self._origin + count) % self._capacity]
            if packet is None:
                return None
            if packets and packet.timestamp != packets[0].timestamp:
                self.remove(count)
                return _joined(packets)
            packets.append(packet)
            if packet.marker:
                self.remove(count + 1)
                return _joined(packets)
        return None


def _joined(packets: list[RtpPacket]) -> JitterFrame:
    data = b"".join(p._data for p in packets)  # type: ignore[attr-defined]
    return JitterFrame(data=data, timestamp=packets[0].timestamp)


class PassThroughAudioBuffer(JitterBuffer):
    """Releases each audio packet newer than the last one at once; older ones are dropped.

    An Opus packet is a whole frame, and the viewer's jitter buffer does the smoothing, so
    holding packets here (stock aiortc prefetches 4, 80 ms) would only add delay.
    """

    def __init__(self) -> None:
        super().__init__(capacity=16)
        self.ssrc: int | None = None
        self._last: int | None = None

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        self.ssrc = packet.ssrc
        if self._last is not None and not uint16_gt(packet.sequence_number, self._last):
            return False, None
        self._last = packet.sequence_number
        return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)  # type: ignore[attr-defined]


class CappedBitrateEstimator:
    """Wraps the receiver's bitrate estimator: the REMB it makes never exceeds ``cap``.

    aiortc's receiver feeds every video packet to its estimator and sends the publisher a
    REMB (RTCP PSFB fmt 15) whenever ``add`` returns ``(bitrate, ssrcs)``: every 0.5 s once
    initialised, and at once on overuse. The cap lowers what it returns; a cap lowered by
    more than 5 % is sent with the next packet rather than waiting for the estimator, and
    also before the estimator has initialised (its first 3 s).
    """

    def __init__(self, inner: RemoteBitrateEstimator) -> None:
        self._inner = inner
        self.cap: int | None = None
        self.last_sent: int | None = None  # the last REMB value handed to the receiver
        self._send_now = False

    def set_cap(self, cap: int | None) -> None:
        """Cap the REMB at ``cap`` bit/s (None: the estimator's own value)."""
        self.cap = cap
        self._send_now = cap is not None and send_cap_now(cap, self.last_sent)

    def add(
        self, arrival_time_ms: int, abs_send_time: int, payload_size: int, ssrc: int
    ) -> tuple[int, list[int]] | None:
        result = self._inner.add(
            arrival_time_ms=arrival_time_ms,
            abs_send_time=abs_send_time,
            payload_size=payload_size,
            ssrc=ssrc,
        )
        if self.cap is not None:
            if result is not None:
                result = (min(result[0], self.cap), result[1])
            elif self._send_now:
                result = (self.cap, list(self._inner.ssrcs))
        self._send_now = False
        if result is not None:
            self.last_sent = result[0]
        return result


class _DirectSrtpReceive:
    """Hands the publisher's SRTP packets to aiortc's RTP handling as they arrive.

    Stock aiortc puts every datagram into the ICE connection's queue, and the DTLS
    transport's task takes it from there on the next turn of the loop: a queue, a future, a
    task wake-up and a second ``select`` per packet. Installed as the aioice ``Connection``'s
    ``data_received`` (per instance), this takes an SRTP (not SRTCP) packet straight to what
    ``RTCDtlsTransport._recv_next`` does with it — the same receive counters, the same
    ``_rx_srtp.unprotect`` and the same ``_handle_rtp_data`` (parse, route, the receiver) —
    inside the socket's read callback. Everything else (DTLS, SRTCP, STUN, anything before
    SRTP is keyed or after the DTLS transport left ``connected``, and any packet while the
    queue still holds some) goes into the queue as before, so no packet overtakes one
    queued before it. ``_handle_rtp_data`` is run eagerly: it normally finishes without
    suspending (its RTCP sends are UDP writes); if it does suspend (a TURN channel still
    being bound), a task finishes it and the packets arriving meanwhile wait behind it, in
    order. Counts its packets in ``packets``.

    Having handled a packet, it reads what else the socket of the connection's nominated
    pair holds (``_drain``): a frame's packets arrive together, and stock asyncio reads one
    datagram per turn of the loop, each turn a ``select``. Each is passed to the pair's
    protocol exactly as the loop would pass it (so STUN, DTLS and SRTCP take their usual
    way); at most ``READS_PER_CALL`` datagrams are read in one callback, so a flood cannot
    keep the loop from its other work. Not on a TURN relay (its datagrams come wrapped).
    Counts the datagrams it read in ``drained``.
    """

    def __init__(self, dtls: Any, connection: Any, drain: bool = True) -> None:
        _require(dtls, "_rx_srtp")  # None until the DTLS handshake keys SRTP
        _require(dtls, "_handle_rtp_data")
        _require(dtls, "_state", DtlsState)
        _require(dtls, DTLS_RX_BYTES, int)
        _require(dtls, DTLS_RX_PACKETS, int)
        self._queue: asyncio.Queue[Any] = _require(connection, "_queue", asyncio.Queue)
        self._queued: Callable[[bytes, int], None] = _require(connection, "data_received")
        if list(inspect.signature(self._queued).parameters) != ["data", "component"]:
            raise AiortcInternalsChanged("aioice Connection.data_received changed its signature")
        self._dtls = dtls
        self._backlog: collections.deque[tuple[bytes, int]] | None = None
        self._task: asyncio.Task[None] | None = None  # held: the loop keeps tasks weakly
        self._connection = connection
        _require(connection, "_nominated", dict)
        self._drain_reads = drain  # False: read only by the loop, one datagram a turn
        self._draining = False
        self.packets = 0
        self.drained = 0  # datagrams read by _drain rather than by the loop
        self.failures = 0  # packets whose handling raised (logged, then dropped)

    @classmethod
    def install(cls, receiver: RTCRtpReceiver, drain: bool = True) -> _DirectSrtpReceive:
        """On the ICE connection under ``receiver``'s transport, once per connection (the
        publisher's audio and video share one with BUNDLE)."""
        dtls = _require(receiver, "transport")
        connection = _require(_require(dtls, "transport"), "_connection")
        installed = connection.__dict__.get("data_received")
        if isinstance(installed, cls):
            return installed
        direct = cls(dtls, connection, drain)
        connection.data_received = direct
        return direct

    def __call__(self, data: bytes, component: int) -> None:
        dtls = self._dtls
        rx_srtp = dtls._rx_srtp
        if (
            rx_srtp is None
            or not data
            or not 127 < data[0] < 192
            or is_rtcp(data)
            or not self._queue.empty()
            or dtls._state is not DtlsState.CONNECTED  # its ``state`` formats an enum
        ):
            self._queued(data, component)
            return
        setattr(dtls, DTLS_RX_BYTES, getattr(dtls, DTLS_RX_BYTES) + len(data))
        setattr(dtls, DTLS_RX_PACKETS, getattr(dtls, DTLS_RX_PACKETS) + 1)
        self.packets += 1
        arrival_time_ms = int((time.time() + NTP_UNIX_OFFSET) * 1000)  # aiortc's current_ms()
        if self._backlog is not None:  # an earlier packet's handling is still suspended
            self._backlog.append((data, arrival_time_ms))
        else:
            self._handle(data, arrival_time_ms)
        if self._drain_reads and not self._draining:
            self._drain()

    def _drain(self) -> None:
        """Hand the pair's protocol the datagrams its socket already holds, in order, as
        asyncio's datagram transport would on the next turns of the loop (its errors too)."""
        pair = self._connection._nominated.get(1)
        if pair is None or type(pair.protocol) is not aioice.ice.StunProtocol:
            return
        protocol = pair.protocol
        udp = getattr(protocol, "transport", None)  # set once its socket is made
        sock = getattr(udp, "_sock", None)  # asyncio's selector datagram transport's
        if udp is None or sock is None:
            return
        self._draining = True
        try:
            for _ in range(READS_PER_CALL - 1):
                if udp.is_closing():  # closing, or closed by what the last datagram did
                    return
                try:
                    data, addr = sock.recvfrom(DATAGRAM_MAX)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    protocol.error_received(exc)
                    return
                self.drained += 1
                protocol.datagram_received(data, addr)
        finally:
            self._draining = False

    def _unprotect(self, data: bytes) -> bytes | None:
        """The RTP packet, or None if SRTP refused it (dropped, as aiortc drops it)."""
        try:
            plain: bytes = self._dtls._rx_srtp.unprotect(data)
        except pylibsrtp.Error as exc:
            logger.debug("forwarding: SRTP unprotect failed: %s", exc)
            return None
        return plain

    def _handle(self, data: bytes, arrival_time_ms: int) -> None:
        plain = self._unprotect(data)
        if plain is None:
            return
        coroutine = self._dtls._handle_rtp_data(plain, arrival_time_ms=arrival_time_ms)
        try:
            awaited = coroutine.send(None)
        except StopIteration:
            return
        except Exception as exc:  # stock aiortc would end the DTLS transport's task on it
            self._failed(exc)
            return
        self._backlog = collections.deque()
        self._task = asyncio.ensure_future(self._finish(coroutine, awaited))

    async def _finish(self, coroutine: Any, awaited: Any) -> None:
        """Drive a suspended ``_handle_rtp_data`` as its task would, then the backlog."""
        try:
            while True:
                if awaited is None:  # a bare yield: asyncio.sleep(0)
                    await asyncio.sleep(0)
                else:
                    # As a task's step does with the future its coroutine yielded; else
                    # awaiting it again here fails ("await wasn't used with future").
                    awaited._asyncio_future_blocking = False
                    with contextlib.suppress(BaseException):  # the coroutine reads the outcome
                        await awaited
                try:
                    awaited = coroutine.send(None)
                except StopIteration:
                    break
            backlog = self._backlog
            while backlog:
                data, arrival_time_ms = backlog.popleft()
                if (plain := self._unprotect(data)) is not None:
                    await self._dtls._handle_rtp_data(plain, arrival_time_ms=arrival_time_ms)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)
        finally:
            self._backlog = None
            self._task = None

    def _failed(self, exc: Exception) -> None:
        """Log a packet whose handling raised: the first, then every 1000th (~6 s of
        video), so a fault on every packet cannot flood the journal."""
        self.failures += 1
        if self.failures == 1 or self.failures % 1000 == 0:
            logger.error(
                "forwarding: handling an RTP packet failed (%d so far)", self.failures, exc_info=exc
            )


class _FrameTap:
    """Stands in for the receiver's decoder queue: frames go to the relay, not a decoder.

    The decoder thread blocks on ``get`` of the original queue, which only ever receives the
    end-of-stream ``None``, so ``RTCRtpReceiver.stop()`` still ends the thread and its track.
    """

    def __init__(
        self,
        original: queue.Queue[Any],
        on_frame: Callable[[RTCRtpCodecParameters, JitterFrame], None],
    ) -> None:
        self._original = original
        self._on_frame = on_frame

    def put(self, item: tuple[RTCRtpCodecParameters, JitterFrame] | None) -> None:
        if item is None:
            self._original.put(None)
        else:
            self._on_frame(*item)

    def get(self) -> Any:
        return self._original.get()


class _ForwardingPacker:
    """Replaces a viewer sender's encoder: packetizes already-encoded frames, never encodes."""

    def __init__(
        self, kind: str, on_remb: Callable[[int], None], mime_type: str | None = None
    ) -> None:
        self._kind = kind
        self._mime_type = mime_type or MIME_TYPES[kind]
        self._on_remb = on_remb
        self._picture_id = 0
        self._remb = 0

    def encode(self, frame: object, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        raise AssertionError("a forwarded track is never encoded")

    def pack(self, packet: av.Packet[Any]) -> tuple[list[bytes], int]:
        assert packet.pts is not None
        if self._kind == "audio":
            return [bytes(packet)], packet.pts
        payloads = packetize(self._mime_type, bytes(packet), self._picture_id)
        self._picture_id = (self._picture_id + 1) % (1 << 15)
        return payloads, packet.pts

    # The sender sets this from the viewer's REMB (receiver estimated maximum bitrate).
    @property
    def target_bitrate(self) -> int:
        return self._remb

    @target_bitrate.setter
    def target_bitrate(self, bitrate: int) -> None:
        self._remb = bitrate
        self._on_remb(bitrate)


def ntp_time(now: float) -> int:
    """``now`` (Unix seconds) as a 64-bit NTP timestamp, as ``aiortc.clock.current_ntp_time``.

    aiortc computes it through ``datetime`` twice per packet; this is the same figure from a
    float, in about a third of the time (0.5 µs against 1.3 µs here); once per frame.
    """
    seconds = int(now)
    return ((seconds + NTP_UNIX_OFFSET) << 32) | int((now - seconds) * (1 << 32))


def _header_template(
    extensions_map: HeaderExtensionsMap, payload_type: int, ssrc: int, mid: str | None
) -> tuple[bytes, int | None]:
    """One sender's RTP header as aiortc serialises it, and where its abs-send-time sits.

    Sequence number, marker, timestamp and abs-send-time are left zero for the caller to
    fill in; the offset is None when abs-send-time was not negotiated.
    """

    def serialized(abs_send_time: int) -> bytes:
        packet = RtpPacket(payload_type=payload_type, ssrc=ssrc)
        packet.extensions = HeaderExtensions(mid=mid, abs_send_time=abs_send_time)
        return packet.serialize(extensions_map)

    low, high = serialized(0), serialized(0xFFFFFF)
    if len(low) != len(high):
        raise AiortcInternalsChanged("abs-send-time changes the RTP header's length")
    changed = [i for i, (a, b) in enumerate(zip(low, high, strict=True)) if a != b]
    if not changed:
        return low, None
    if changed != list(range(changed[0], changed[0] + 3)):
        raise AiortcInternalsChanged("abs-send-time is no longer serialised as 3 bytes")
    return low, changed[0]


class _RtxHistory(dict[int, Any]):
    """A viewer sender's RTX history (aiortc's ``__rtp_history``, which ``_retransmit`` reads
    with ``.get`` only): each packet sent is kept as a tuple, and the ``RtpPacket`` aiortc
    retransmits is made when a NACK asks for it. Nearly every packet is never asked for, and
    an ``RtpPacket`` per packet per viewer cost more than the rest of keeping the history."""

    __slots__ = ()

    def get(self, key: int, default: Any = None) -> Any:
        entry = super().get(key)
        if type(entry) is not tuple:
            return default if entry is None else entry
        payload_type, marker, sequence_number, timestamp, ssrc, payload, extensions = entry
        packet = RtpPacket(
            payload_type=payload_type,
            marker=marker,
            sequence_number=sequence_number,
            timestamp=timestamp,
            ssrc=ssrc,
            payload=payload,
        )
        packet.extensions = extensions
        return packet


class _FrameSender:
    """Replaces a viewer sender's ``_run_rtp``: each forwarded frame is sent in one go.

    Does what aiortc's loop does for a pre-encoded frame, per frame rather than per packet:
    the RTP header (with the mid and abs-send-time extensions) is serialised by aiortc's own
    ``RtpPacket.serialize`` once per sender, then its timestamp and abs-send-time are set
    per frame and its marker bit and sequence number per packet; the payloads come
    packetized by the relay, once for all viewers. Every packet still goes into the sender's RTX history (kept
    as tuples, made into an ``RtpPacket`` on a NACK: :class:`_RtxHistory`, so ``_retransmit``
    answers NACKs as before) and through ``RTCDtlsTransport._send_rtp``
    (SRTP, ICE, TURN); the figures the sender's RTCP SR reports (NTP and RTP timestamp,
    packet and octet counts) are kept per frame. ``wallclock`` gives Unix time.
    """

    def __init__(
        self,
        sender: RTCRtpSender,
        track: ForwardedTrack,
        packer: _ForwardingPacker,
        wallclock: Callable[[], float] = time.time,
        direct: bool = True,
    ) -> None:
        for name, expected in SENDER_LOOP_STATE.items():
            _require(sender, name, expected)
        _require(sender.transport, "_send_rtp")
        run_rtp = _require(sender, "_run_rtp")
        if list(inspect.signature(run_rtp).parameters) != ["codec"]:
            raise AiortcInternalsChanged("RTCRtpSender._run_rtp no longer takes (codec)")
        self._sender = sender
        self._track = track
        self._packer = packer
        self._wallclock = wallclock
        self._direct = direct and self._can_send_now(sender)
        self._busy = False
        # Set when the loop starts (run), as aiortc's loop sets its locals.
        self._history = _RtxHistory()
        self._mid: str | None = None
        self._payload_type = 0
        self._sequence_number = 0
        self._timestamp_origin = 0
        self._ssrc = 0
        self._base_header = b""
        self._abs_offset: int | None = None

    @staticmethod
    def _can_send_now(sender: RTCRtpSender) -> bool:
        """Whether the internals ``send_now`` reads are there (else: the loop only)."""
        dtls = sender.transport
        if not isinstance(dtls, RTCDtlsTransport):  # a test's stand-in: the loop only
            return False
        try:
            _require(dtls, "_state", DtlsState)
            _require(dtls, "_tx_srtp")  # None until the DTLS handshake keys SRTP
            _require(dtls, DTLS_TX_BYTES, int)
            _require(dtls, DTLS_TX_PACKETS, int)
            _require(_require(_require(dtls, "transport"), "_connection"), "_nominated", dict)
            _require(aioice.ice.CandidatePair, "remote_addr", property)
        except AiortcInternalsChanged as exc:
            logger.warning("forwarding: frames go through the sender's loop only: %s", exc)
            return False
        return True

    async def run(self, codec: RTCRtpCodecParameters) -> None:
        """The sender's RTP loop, started by ``RTCRtpSender.send`` as ``_run_rtp(codec)``."""
        sender = self._sender
        getattr(sender, SENDER_RTP_STARTED).set()
        self._history = _RtxHistory(getattr(sender, SENDER_RTP_HISTORY))
        setattr(sender, SENDER_RTP_HISTORY, self._history)
        extensions_map: HeaderExtensionsMap = getattr(sender, SENDER_EXTENSIONS_MAP)
        self._mid = getattr(sender, SENDER_MID)
        payload_type = codec.payloadType
        assert payload_type is not None  # negotiated before send() starts the loop
        self._payload_type = payload_type
        self._sequence_number = random_sequence_number()
        self._timestamp_origin = random32()
        self._ssrc = sender._ssrc
        self._base_header, self._abs_offset = _header_template(
            extensions_map, payload_type, self._ssrc, self._mid
        )
        if self._direct:
            self._track.send_now = self.send_now
        try:
            while True:
                packet, payloads = await self._track.recv_payloads()
                if not sender._enabled or not isinstance(packet, av.Packet):
                    continue
                if payloads is None:
                    payloads, _ = self._packer.pack(packet)
                if not payloads:
                    continue
                transport = sender.transport
                self._busy = True  # until its last packet is out, no frame overtakes it
                try:
                    for data in self._packets(packet, payloads):
                        await transport._send_rtp(data)
                finally:
                    self._busy = False
        except (asyncio.CancelledError, ConnectionError, MediaStreamError):
            pass
        except Exception:  # the sender's stop() waits for the exit event: always set it
            logger.exception("forwarding %s: sender loop failed", self._track.kind)
        self._track.send_now = None
        self._track.stop()
        getattr(sender, SENDER_RTP_EXITED).set()

    def _packets(self, packet: av.Packet[Any], payloads: list[bytes]) -> list[bytes]:
        """The frame's RTP packets, in order: each also goes into the RTX history, and the
        figures the RTCP SR reports are moved on as if they were sent."""
        sender = self._sender
        payload_type, ssrc, history = self._payload_type, self._ssrc, self._history
        assert packet.pts is not None
        timestamp = (self._timestamp_origin + packet.pts) & 0xFFFFFFFF
        ntp = ntp_time(self._wallclock())
        abs_send_time = (ntp >> 14) & 0xFFFFFF
        extensions = HeaderExtensions(mid=self._mid, abs_send_time=abs_send_time)
        header = bytearray(self._base_header)
        header[4:8] = timestamp.to_bytes(4, "big")
        if (offset := self._abs_offset) is not None:
            header[offset : offset + 3] = abs_send_time.to_bytes(3, "big")
        sequence_number = self._sequence_number
        last = len(payloads) - 1
        octets = 0
        out = []
        for index, payload in enumerate(payloads):
            marker = 1 if index == last else 0
            header[1] = marker << 7 | payload_type
            header[2] = sequence_number >> 8
            header[3] = sequence_number & 0xFF
            history[sequence_number % RTP_HISTORY_SIZE] = (
                payload_type,
                marker,
                sequence_number,
                timestamp,
                ssrc,
                payload,
                extensions,
            )
            out.append(bytes(header) + payload)
            octets += len(payload)
            sequence_number = (sequence_number + 1) & 0xFFFF
        self._sequence_number = sequence_number
        setattr(sender, SENDER_NTP_TIMESTAMP, ntp)
        setattr(sender, SENDER_RTP_TIMESTAMP, timestamp)
        setattr(sender, SENDER_OCTET_COUNT, getattr(sender, SENDER_OCTET_COUNT) + octets)
        setattr(sender, SENDER_PACKET_COUNT, getattr(sender, SENDER_PACKET_COUNT) + len(out))
        return out

    def send_now(self, packet: av.Packet[Any], payloads: list[bytes]) -> bool:
        """Send a frame from the caller's turn of the loop, not the sender's task: False
        (the frame is queued for the loop instead) unless it can go out at once.

        What ``RTCDtlsTransport._send_rtp`` and the aioice connection under it do with an
        RTP packet on a plain UDP pair (SRTP ``protect``, then the pair's datagram
        transport's ``sendto`` to its remote address, and the DTLS transport's send
        counters), without their four coroutines per packet or the task's wake-up per frame.
        Anything else — a frame while the loop is still sending one, the sender disabled,
        DTLS not ``connected``, no nominated pair, a TURN relay (its sends can wait for a
        channel binding) — goes through the loop and ``_send_rtp`` as before.
        """
        sender = self._sender
        if self._busy or not sender._enabled:
            return False
        dtls = sender.transport
        if (
            not isinstance(dtls, RTCDtlsTransport)
            or dtls._state is not DtlsState.CONNECTED
            or dtls._tx_srtp is None
        ):
            return False
        pair = dtls.transport._connection._nominated.get(1)
        if pair is None or type(pair.protocol) is not aioice.ice.StunProtocol:
            return False
        udp = getattr(pair.protocol, "transport", None)  # set once its socket is made
        if udp is None or udp.is_closing():
            return False
        protect, sendto, address = dtls._tx_srtp.protect, udp.sendto, pair.remote_addr
        octets = 0
        packets = self._packets(packet, payloads)
        for data in packets:
            protected = protect(data)
            sendto(protected, address)
            octets += len(protected)
        setattr(dtls, DTLS_TX_BYTES, getattr(dtls, DTLS_TX_BYTES) + octets)
        setattr(dtls, DTLS_TX_PACKETS, getattr(dtls, DTLS_TX_PACKETS) + len(packets))
        return True


class KeyframeRequestLimiter:
    """At most one keyframe request per interval; a request inside it is deferred, once."""

    def __init__(self, min_interval: float = KEYFRAME_MIN_INTERVAL) -> None:
        self._min_interval = min_interval
        self._last: float | None = None
        self._deferred = False

    def request(self, now: float) -> float | None:
        """Seconds to wait before sending (0: send now), or None if a send is already due."""
        if self._deferred:
            return None
        if self._last is None or now - self._last >= self._min_interval:
            self._last = now
            return 0.0
        self._deferred = True
        return self._last + self._min_interval - now

    def fired(self, now: float) -> None:
        """Record that the deferred request has been sent."""
        self._deferred = False
        self._last = now


@dataclass(slots=True)
class ViewerStats:
    """Counters for one viewer's forwarded track."""

    frames_out: int = 0
    frames_direct: int = 0  # of frames_out: sent as they were complete (_FrameSender.send_now)
    frames_dropped: int = 0
    keyframe_requests: int = 0
    remb_bps: int | None = None
    bytes_out: int = 0
    frames_paused: int = 0  # not forwarded while the WAN leg is audio only
    transcoded_to: str | None = None  # the viewer's codec when it gets a transcoded copy


@dataclass(slots=True)
class RelayStats:
    """Counters for one forwarded track."""

    frames_in: int = 0
    keyframes_in: int = 0
    bytes_in: int = 0
    frames_wrong_codec: int = 0
    keyframe_requests_sent: int = 0
    nacks_repeated: int = 0  # missing packets asked for again (aiortc asks once)
    nacks_given_up: int = 0  # missing packets no longer asked for, never repaired
    # Keyframes asked for because a frame will never be complete (a packet given up, or
    # dropped by the jitter buffer), retries included; sent through the same limiter.
    keyframe_requests_after_loss: int = 0
    frames_dropped_after_loss: int = 0  # not forwarded: after a lost frame, before a keyframe
    viewers: dict[str, ViewerStats] = field(default_factory=dict)
    # Viewers now given a decoded and re-encoded copy (their codec is not the publisher's):
    # the first for a codec costs an encoder, shared by the others; the first of all a
    # decoder too (services/video/transcode.py). Refused: no encoder left in the budget.
    transcoded_viewers: int = 0
    decoders_created: int = 0
    encoders_created: int = 0
    transcode_encoders: int = 0  # running now (at most one per target codec)
    transcodes_refused: int = 0
    transcodes_recovered: int = 0  # refused viewers given a copy once an encoder was free


class ForwardedTrack(MediaStreamTrack):
    """One viewer's copy of the publisher's track: yields ``av.Packet``, already encoded.

    A transcoded viewer's copy (``transcode``) is fed by a ``SharedEncoder`` instead of the
    publisher, with payloads packetized once by its encoder.
    """

    def __init__(self, kind: str, stats: ViewerStats, request_keyframe: Callable[[], None]) -> None:
        super().__init__()
        self.kind = kind
        self.stats = stats
        self._request_keyframe = request_keyframe
        self._queue: asyncio.Queue[
            tuple[av.Packet[Any] | av.VideoFrame, list[bytes] | None] | None
        ] = asyncio.Queue()
        self._limit = VIEWER_QUEUE_FRAMES[kind]
        self._awaiting_keyframe = kind == "video"
        self.paused = False
        self.transcoded = False
        # The sender's ``_FrameSender.send_now`` while its loop runs: a frame that finds
        # the queue empty is sent from the relay's own turn of the loop if it can be.
        self.send_now: Callable[[av.Packet[Any], list[bytes]], bool] | None = None

    def transcode(self, force_keyframe: Callable[[], None]) -> None:
        """From now on this copy is not the publisher's stream but a shared encoder's (or,
        refused, nothing); the viewer's keyframe requests go to ``force_keyframe``."""
        self.transcoded = True
        self._request_keyframe = force_keyframe
        self._awaiting_keyframe = self.kind == "video"
        while not self._queue.empty():  # encoded frames queued before the answer was known
            if self._queue.get_nowait() is None:
                self._queue.put_nowait(None)
                break

    def pause(self) -> None:
        """Stop forwarding (the WAN leg is audio only): frames queued are dropped too."""
        self.paused = True
        while not self._queue.empty():
            if self._queue.get_nowait() is None:  # ended meanwhile: keep the end
                self._queue.put_nowait(None)
                break

    def resume(self) -> None:
        """Forward again, from the next keyframe (asked for at once)."""
        if not self.paused:
            return
        self.paused = False
        if self.kind == "video":
            self._awaiting_keyframe = True
            self._ask_keyframe()

    def offer(
        self,
        packet: av.Packet[Any] | av.VideoFrame,
        keyframe: bool,
        payloads: list[bytes] | None = None,
    ) -> None:
        """Queue a frame; a lagging video viewer is flushed and resynchronised on a keyframe.

        ``payloads`` are the frame's RTP payloads if the relay packetized it already (once
        for all viewers); the viewer's sender packetizes it itself otherwise.
        """
        if self.paused:
            self.stats.frames_paused += 1
            return
        if self._awaiting_keyframe and not keyframe:
            self.stats.frames_dropped += 1
            self._ask_keyframe()
            return
        self._awaiting_keyframe = False
        if self._queue.qsize() >= self._limit:
            dropped = 0
            while not self._queue.empty():
                self._queue.get_nowait()
                dropped += 1
            self.stats.frames_dropped += dropped
            if self.kind == "video" and not keyframe:
                self._awaiting_keyframe = True
                self.stats.frames_dropped += 1
                self._ask_keyframe()
                return
        if (
            self.send_now is not None
            and payloads is not None
            and not self.transcoded
            and isinstance(packet, av.Packet)
            and self._queue.empty()
        ):
            try:
                sent = self.send_now(packet, payloads)
            except Exception:
                # This viewer only (the relay's other viewers are served in the same
                # call): its frames go through its sender's loop from now on, from the
                # next keyframe, since this one may have left only in part.
                logger.exception("forwarding %s: sending a frame at once failed", self.kind)
                self.send_now = None
                self.stats.frames_dropped += 1
                if self.kind == "video":
                    self._awaiting_keyframe = True
                    self._ask_keyframe()
                return
            if sent:
                self.stats.frames_out += 1
                self.stats.frames_direct += 1
                self.stats.bytes_out += packet.size
                return
        self._queue.put_nowait((packet, payloads))

    def request_keyframe(self) -> None:
        """The viewer sent PLI or FIR (ignored while paused: no frames are due)."""
        if not self.paused:
            self._ask_keyframe()

    def resync(self) -> None:
        """The publisher's stream starts over (it reconnected): video waits for a keyframe."""
        if self.kind == "video" and not self.transcoded:
            self._awaiting_keyframe = True

    def _ask_keyframe(self) -> None:
        self.stats.keyframe_requests += 1
        self._request_keyframe()

    def end(self) -> None:
        """End the track: the sender's loop stops at the next ``recv``."""
        self._queue.put_nowait(None)

    async def recv(self) -> av.Packet[Any] | av.VideoFrame:
        packet, _ = await self.recv_payloads()
        return packet

    async def recv_payloads(self) -> tuple[av.Packet[Any] | av.VideoFrame, list[bytes] | None]:
        """The next frame and its RTP payloads (None: not packetized by the relay)."""
        if self.readyState != "live":
            raise MediaStreamError
        item = await self._queue.get()
        if item is None:
            self.stop()
            raise MediaStreamError
        self.stats.frames_out += 1
        if self.transcoded and item[1] is not None:  # an encoder's payloads, no bitstream
            self.stats.bytes_out += sum(len(payload) for payload in item[1])
        elif isinstance(item[0], av.Packet):
            self.stats.bytes_out += item[0].size
        return item


class ForwardingRelay:
    """One published track (VP8 or H.264 video, Opus audio) fanned out to any number of viewers.

    ``attach`` takes the publisher's receiver (from its peer connection's transceivers,
    before the connection starts), ``add_viewer`` adds the track to a viewer's peer
    connection before its offer or answer is created. The clock is a parameter.
    ``repeat_nacks=False`` leaves loss repair to stock aiortc (one NACK per gap); it exists
    to measure what repeated NACKs are worth (tests/video/test_loss.py). For the WAN leg
    (services/video/service.py): ``on_remb`` hears each viewer's REMB, ``cap_publisher``
    caps the REMB sent to the publisher, ``pause_viewer`` / ``resume_viewer`` stop and
    restart one viewer's frames. ``frame_sender=False`` leaves each viewer's sender its stock
    aiortc RTP loop (packetizing per viewer, per-packet headers); it exists to measure what
    ``_FrameSender`` saves (bench/video_relay.py); ``direct_send=False`` sends every frame
    from the viewer's sender task (``_FrameSender.send_now``); ``direct_receive=False`` leaves the
    publisher's packets to aiortc's queue and DTLS task (``_DirectSrtpReceive``), and
    ``drain_reads=False`` has them read one per turn of the loop, for the same reason.
    ``transcode_budget`` is the box's cap on transcoding encoders (shared by every relay; one of its own, for one encoder, if not
    given); ``on_transcode_refused`` hears the id of a viewer refused for lack of one.
    """

    def __init__(
        self,
        kind: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        keyframe_min_interval: float = KEYFRAME_MIN_INTERVAL,
        repeat_nacks: bool = True,
        on_remb: Callable[[str, int], None] | None = None,
        frame_sender: bool = True,
        direct_send: bool = True,
        direct_receive: bool = True,
        drain_reads: bool = True,
        transcode_fallback: bool = True,
        transcode_budget: TranscodeBudget | None = None,
        on_transcode_refused: Callable[[str], None] | None = None,
        name: str = "",
    ) -> None:
        if kind not in MIME_TYPES:
            raise ValueError(f"cannot forward {kind!r} media")
        self.kind = kind
        self.name = name  # the publisher's participant id, for the log (never PHI)
        self.mime_type = MIME_TYPES[kind]
        self.codec = RTCRtpCodecParameters(
            mimeType=self.mime_type,
            clockRate=CLOCK_RATES[kind],
            channels=2 if kind == "audio" else None,
        )
        self.stats = RelayStats()
        # A viewer whose codec is not the publisher's gets a decoded and re-encoded copy,
        # offered to it as a second choice (video only); False: the publisher's codec only.
        self._transcode_fallback = transcode_fallback and kind == "video"
        self.decoder: SharedDecoder | None = None  # only while a viewer is transcoded
        self.encoders: dict[str, SharedEncoder] = {}  # by target codec, lower case
        self._budget = transcode_budget if transcode_budget is not None else TranscodeBudget()
        self._on_transcode_refused = on_transcode_refused
        # Viewers refused a transcoded copy, waiting for the box's budget (their track, codec).
        self._refused: dict[str, tuple[ForwardedTrack, RTCRtpCodecParameters]] = {}
        self._keyframe_min_interval = keyframe_min_interval
        self._clock = clock
        self._time_base = fractions.Fraction(1, CLOCK_RATES[kind])
        self._limiter = KeyframeRequestLimiter(keyframe_min_interval)
        self._receiver: RTCRtpReceiver | None = None
        self._buffer: MarkerJitterBuffer | PassThroughAudioBuffer | None = None
        self._viewers: dict[str, ForwardedTrack] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._codec_warned = False
        self._nacks = NackSchedule() if repeat_nacks and kind == "video" else None
        # When the relay last asked for a keyframe after a lost frame; None: not waiting.
        self._loss_asked_at: float | None = None
        self._on_remb = on_remb
        self._estimator: CappedBitrateEstimator | None = None
        self._frame_sender = frame_sender
        self._direct_send = direct_send
        self._direct_receive = direct_receive
        self._drain_reads = drain_reads
        # The publisher's DTLS transport whose ICE connection hands SRTP straight to it.
        self._direct_on: object | None = None
        self.direct: _DirectSrtpReceive | None = None  # shared by the publisher's tracks
        self._picture_id = 0  # VP8 picture ID of the frames packetized for every viewer
        # Output timestamps continue across a re-attach (the publisher reconnected): the new
        # receiver maps its stream from 0 again, so frames are shifted by ``_offset``.
        self._offset = 0
        self._last_pts: int | None = None
        self._last_at = 0.0
        self._rebase = False

    def attach(self, receiver: RTCRtpReceiver) -> None:
        """Take the publisher's encoded frames from ``receiver`` instead of decoding them.

        Attaching again (the publisher reconnected on a new peer connection) keeps every
        viewer: their timestamps continue from the last frame forwarded, shifted by the time
        that passed, and video viewers resume on the new stream's first keyframe.
        """
        original = _require(receiver, RECEIVER_DECODER_QUEUE, queue.Queue)
        _require(receiver, RECEIVER_JITTER_BUFFER, JitterBuffer)
        _require(receiver, "_send_rtcp_pli")
        buffer: MarkerJitterBuffer | PassThroughAudioBuffer
        if self.kind == "audio":
            buffer = PassThroughAudioBuffer()
        elif self._nacks is None:
            buffer = MarkerJitterBuffer()
        else:
            _require(receiver, "_send_rtcp_nack")
            buffer = MarkerJitterBuffer(on_packet=self._on_video_packet, on_loss=self._frame_lost)
        if self._receiver is not None:  # a new stream from the same publisher
            self._rebase = self._last_pts is not None
            self._loss_asked_at = None
            if self._nacks is not None:
                self._nacks = NackSchedule()
            for track in self._viewers.values():
                track.resync()
        if self.kind == "video":
            estimator = _require(receiver, RECEIVER_BITRATE_ESTIMATOR, RemoteBitrateEstimator)
            cap = self.publisher_cap
            self._estimator = CappedBitrateEstimator(estimator)
            self._estimator.set_cap(cap)
            setattr(receiver, RECEIVER_BITRATE_ESTIMATOR, self._estimator)
        setattr(receiver, RECEIVER_JITTER_BUFFER, buffer)
        setattr(receiver, RECEIVER_DECODER_QUEUE, _FrameTap(original, self._on_frame))
        self._receiver, self._buffer = receiver, buffer

    def set_codec(self, codec: RTCRtpCodecParameters) -> bool:
        """The codec the publisher's connection negotiated (see ``negotiated_codec``); True
        if it differs from the one before, when the caller re-adds the viewers (their
        connections negotiated for the old one)."""
        if self.kind != "video" or codec.mimeType.lower() not in VIDEO_MIME_TYPES:
            raise ValueError(f"cannot forward {codec.mimeType} as {self.kind}")
        changed = codec.mimeType.lower() != self.mime_type.lower()
        self.codec, self.mime_type = codec, codec.mimeType
        if changed:
            self._stop_transcoding()
            self._refused.clear()  # their legs are offered again for the new codec
        return changed

    def cap_publisher(self, bps: int | None) -> None:
        """Keep the REMB the box sends the publisher at or under ``bps`` (None: uncapped)."""
        if self._estimator is not None:
            self._estimator.set_cap(bps)

    def cap_transcoded(self, bps: int | None, remote_viewers: Collection[str]) -> None:
        """Keep each transcoding encoder that feeds any of ``remote_viewers`` at or under
        ``bps`` (the WAN leg's cap: its copy crosses the uplink as the publisher's stream
        would); the others only at their viewers' REMBs."""
        for encoder in self.encoders.values():
            feeds_remote = any(viewer in remote_viewers for viewer in encoder.sinks)
            encoder.set_ceiling(bps if feeds_remote else None)

    @property
    def publisher_cap(self) -> int | None:
        """The cap now set on the publisher's REMB (video only)."""
        return self._estimator.cap if self._estimator is not None else None

    def pause_viewer(self, viewer_id: str) -> None:
        """Stop forwarding to one viewer without closing anything (audio-only fallback)."""
        track = self._viewers.get(viewer_id)
        if track is not None:
            track.pause()

    def resume_viewer(self, viewer_id: str) -> None:
        """Forward to a paused viewer again, from a keyframe."""
        track = self._viewers.get(viewer_id)
        if track is not None:
            track.resume()

    def add_viewer(self, pc: RTCPeerConnection, viewer_id: str) -> RTCRtpSender:
        """Send this track to the viewer on ``pc``; negotiate the publisher's codec only."""
        if viewer_id in self._viewers:
            raise ValueError(f"viewer {viewer_id!r} already added")
        stats = ViewerStats()
        track = ForwardedTrack(self.kind, stats, self.request_keyframe)
        sender = pc.addTrack(track)
        if _require(sender, SENDER_ENCODER) is not None:
            raise AiortcInternalsChanged("RTCRtpSender created its encoder before sending")
        _require(sender, "_send_keyframe")

        def on_remb(bitrate: int) -> None:
            stats.remb_bps = bitrate
            shared = self.encoders.get((stats.transcoded_to or "").lower())
            if shared is not None:  # the lowest REMB of its viewers sets its bitrate
                shared.update_bitrate()
            if self._on_remb is not None:
                self._on_remb(viewer_id, bitrate)

        packer = _ForwardingPacker(self.kind, on_remb, self.mime_type)
        frame_loop = (
            _FrameSender(sender, track, packer, direct=self._direct_send)
            if self._frame_sender
            else None
        )
        stock_loop = _require(sender, "_run_rtp")

        async def run_rtp(codec: RTCRtpCodecParameters) -> None:
            # The viewer's answer decided ``codec``: forward if it is the publisher's.
            if codec.mimeType.lower() != self.mime_type.lower() and self.kind == "video":
                self._transcode_for(viewer_id, track, codec)
                # The shared encoder's payloads (refused: none) go out as forwarded frames
                # do; aiortc's stock loop cannot send payloads packetized elsewhere.
                await (frame_loop or _FrameSender(sender, track, packer, direct=False)).run(codec)
            elif frame_loop is not None:
                await frame_loop.run(codec)
            else:
                await stock_loop(codec)

        sender._run_rtp = run_rtp  # type: ignore[method-assign]
        setattr(sender, SENDER_ENCODER, packer)
        sender._send_keyframe = track.request_keyframe  # type: ignore[method-assign]
        for transceiver in pc.getTransceivers():
            if transceiver.sender is sender:
                transceiver.setCodecPreferences(self._viewer_codecs())
        self._viewers[viewer_id] = track
        self.stats.viewers[viewer_id] = stats
        return sender

    def _viewer_codecs(self) -> list[RTCRtpCodecCapability]:
        """What a viewer's leg offers: the publisher's codec first (same H.264 profile
        first), then, if transcoding is allowed, the other video codecs; RTX for each."""
        capabilities = RTCRtpSender.getCapabilities(self.kind).codecs
        mime = self.mime_type.lower()
        rtx = [c for c in capabilities if c.mimeType.lower() == f"{self.kind}/rtx"]
        same = [c for c in capabilities if c.mimeType.lower() == mime]
        profile = str(self.codec.parameters.get("profile-level-id", "")).lower()
        same.sort(key=lambda c: str(c.parameters.get("profile-level-id", "")).lower() != profile)
        others = [
            c
            for c in capabilities
            if self._transcode_fallback
            and c.mimeType.lower() != mime
            and c.mimeType.lower() in VIDEO_MIME_TYPES
        ]
        return same + others + rtx

    def _transcode_for(
        self,
        viewer_id: str,
        track: ForwardedTrack,
        codec: RTCRtpCodecParameters,
        *,
        again: bool = False,
    ) -> bool:
        """The viewer's answer did not take the publisher's codec: it joins the shared
        encoder for ``codec`` (made now, with the shared decoder if need be, if the box's
        budget allows one more). False if refused: the viewer is sent no video,
        ``on_transcode_refused`` is told, and it waits for an encoder to be given back
        anywhere in the box (``again``: this is that retry; refused again, it waits on
        quietly)."""
        mime = codec.mimeType.lower()
        if viewer_id not in self._viewers:  # removed before its sender started
            track.transcode(lambda: None)
            return False
        encoder = self.encoders.get(mime)
        if encoder is None:
            if not self._budget.acquire((self, mime)):
                track.transcode(lambda: None)  # neither forwarded nor encoded for
                self._refused[viewer_id] = (track, codec)
                self._budget.wait(self, self._retry_refused)
                if again:
                    return False
                self.stats.transcodes_refused += 1
                logger.warning(
                    "video relay %s: viewer %s cannot receive %s and the box already runs "
                    "%d transcoding encoder(s), its limit; no video is sent to it until one "
                    "is free",
                    self.name or "-",
                    viewer_id,
                    self.mime_type,
                    self._budget.limit,
                )
                if self._on_transcode_refused is not None:
                    self._on_transcode_refused(viewer_id)
                return False
            limiter = KeyframeRequestLimiter(self._keyframe_min_interval)
            encoder = SharedEncoder(codec, limiter, self._clock, is_keyframe)
            self.encoders[mime] = encoder
            self.stats.encoders_created += 1
            self.stats.transcode_encoders = len(self.encoders)
            if self.decoder is None:
                self.decoder = SharedDecoder(self.codec, self.request_keyframe)
                self.stats.decoders_created += 1
            self.decoder.add_sink(mime, encoder.offer_picture)
        track.transcode(encoder.request_keyframe)
        track.stats.transcoded_to = codec.mimeType
        encoder.add_sink(viewer_id, track)
        self._count_transcoded()
        logger.info(
            "video relay %s: viewer %s cannot receive %s; transcoding to %s for it "
            "(decode + re-encode, CPU-heavy; %d viewer(s) share this encoder)",
            self.name or "-",
            viewer_id,
            self.mime_type,
            codec.mimeType,
            len(encoder.sinks),
        )
        return True

    def _retry_refused(self) -> None:
        """An encoder was given back somewhere in the box: the viewers refused one try again
        (the first to ask gets it; the others wait for the next)."""
        refused, self._refused = self._refused, {}
        for viewer_id, (track, codec) in refused.items():
            if self._transcode_for(viewer_id, track, codec, again=True):
                self.stats.transcodes_recovered += 1

    def _count_transcoded(self) -> None:
        self.stats.transcoded_viewers = sum(len(e.sinks) for e in self.encoders.values())
        self.stats.transcode_encoders = len(self.encoders)

    def _close_encoder(self, mime: str) -> None:
        """Close one shared encoder, give it back to the budget, and the decoder if unused."""
        self.encoders.pop(mime).close()
        self._budget.release((self, mime))
        if self.decoder is not None:
            self.decoder.remove_sink(mime)
            if not self.decoder.sinks:  # nothing left to decode for
                self.decoder.close()
                self.decoder = None
        self._count_transcoded()

    def _stop_transcoding(self) -> None:
        for mime in list(self.encoders):
            self._close_encoder(mime)
        if self.decoder is not None:
            self.decoder.close()
            self.decoder = None

    def remove_viewer(self, viewer_id: str) -> None:
        """Stop forwarding to one viewer (its sender's loop ends); the last viewer of a
        shared encoder closes it, and the last encoder the decoder."""
        track = self._viewers.pop(viewer_id, None)
        if track is not None:
            track.end()
        self._refused.pop(viewer_id, None)
        for mime, encoder in list(self.encoders.items()):
            if viewer_id in encoder.sinks:
                encoder.remove_sink(viewer_id)
                if not encoder.sinks:
                    self._close_encoder(mime)
        self._count_transcoded()

    def stop(self) -> None:
        """End every viewer's track and cancel pending keyframe requests."""
        for viewer_id in list(self._viewers):
            self.remove_viewer(viewer_id)
        self._budget.forget(self)
        self._refused.clear()
        self._stop_transcoding()
        for task in self._tasks:
            task.cancel()

    def request_keyframe(self) -> None:
        """Ask the publisher for a keyframe, at most once per ``keyframe_min_interval``."""
        delay = self._limiter.request(self._clock())
        if delay is None:
            return
        if delay == 0.0:
            self._spawn(self._send_pli())
        else:
            self._spawn(self._send_pli_later(delay))

    async def _send_pli_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._limiter.fired(self._clock())
        await self._send_pli()

    async def _send_pli(self) -> None:
        if self._receiver is None or self._buffer is None or self._buffer.ssrc is None:
            return
        self.stats.keyframe_requests_sent += 1
        await self._receiver._send_rtcp_pli(self._buffer.ssrc)

    def _on_video_packet(self, sequence_number: int) -> None:
        if self._nacks is None or not isinstance(self._buffer, MarkerJitterBuffer):
            return
        now = self._clock()
        self._nacks.packet(sequence_number, now)
        lost = self._nacks.due(now, self._buffer.origin)
        self.stats.nacks_repeated = self._nacks.repeated
        self.stats.nacks_given_up = self._nacks.given_up
        if lost and self._receiver is not None and self._buffer.ssrc is not None:
            self._spawn(self._receiver._send_rtcp_nack(self._buffer.ssrc, lost))
        given_up = self._nacks.take_given_up()
        if given_up:
            for seq in given_up:
                self._buffer.abandon(seq)
            self._frame_lost()

    def _frame_lost(self) -> None:
        """A frame will never be complete: a packet of it was given up (no more NACKs), or
        the jitter buffer dropped it. The frames after it cannot be decoded until a keyframe,
        so they are not forwarded, and one is asked for now (rate-limited as any request);
        more losses before it comes ask nothing more."""
        if self._loss_asked_at is None:
            self._ask_keyframe_after_loss()

    def _ask_keyframe_after_loss(self) -> None:
        self._loss_asked_at = self._clock()
        self.stats.keyframe_requests_after_loss += 1
        self.request_keyframe()

    def _spawn(self, coroutine: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_frame(self, codec: RTCRtpCodecParameters, frame: JitterFrame) -> None:
        if self._direct_receive and self._receiver is not None:
            # Checked per frame, not at attach: aiortc settles the BUNDLE transport after
            # the track event, and a reconnected publisher comes with a new one.
            transport = self._receiver.transport
            if transport is not self._direct_on:
                self._direct_on = transport
                self.direct = None
                if isinstance(transport, RTCDtlsTransport):
                    try:
                        self.direct = _DirectSrtpReceive.install(self._receiver, self._drain_reads)
                    except AiortcInternalsChanged as exc:  # stock aiortc's path still works
                        logger.warning("forwarding: packets go through aiortc's queue: %s", exc)
        if codec.mimeType.lower() != self.mime_type.lower():
            self.stats.frames_wrong_codec += 1
            if not self._codec_warned:
                self._codec_warned = True
                logger.warning("forwarding %s: publisher sends %s", self.mime_type, codec.mimeType)
            return
        self._forward(frame)
        if isinstance(self._buffer, MarkerJitterBuffer) and self._buffer.ready:
            # Frames completed by the same packet: the receiver mapped only the first one's
            # timestamp (to ``frame.timestamp``); the others keep their distance from it.
            released, ready = self._buffer.released_timestamp, self._buffer.ready
            self._buffer.ready = []
            for extra in ready:
                extra.timestamp = frame.timestamp + ((extra.timestamp - released) & 0xFFFFFFFF)
                self._forward(extra)

    def _forward(self, frame: JitterFrame) -> None:
        keyframe = self.kind == "audio" or is_keyframe(self.mime_type, frame.data)
        self.stats.frames_in += 1
        self.stats.bytes_in += len(frame.data)
        if self.kind == "video" and keyframe:
            self.stats.keyframes_in += 1
        now = self._clock()
        if self._loss_asked_at is not None:
            if not keyframe:  # refers to the lost frame, directly or not: undecodable
                self.stats.frames_dropped_after_loss += 1
                if now - self._loss_asked_at >= self._keyframe_min_interval:
                    self._ask_keyframe_after_loss()  # the request or its keyframe was lost
                return
            self._loss_asked_at = None
        if not self._viewers:
            return
        if self._rebase and self._last_pts is not None:
            self._rebase = False
            elapsed = max(1, round((now - self._last_at) / self._time_base))
            self._offset = self._last_pts + elapsed - frame.timestamp
        pts = frame.timestamp + self._offset
        self._last_pts, self._last_at = pts, now
        packet = av.Packet(frame.data)
        packet.pts = pts
        packet.time_base = self._time_base
        payloads: list[bytes] | None = None
        forwarded = [track for track in self._viewers.values() if not track.transcoded]
        if self._frame_sender and forwarded:  # packetized once here, not once per viewer
            payloads = packetize(self.mime_type, frame.data, self._picture_id)
            self._picture_id = (self._picture_id + 1) % (1 << 15)
        for track in forwarded:
            track.offer(packet, keyframe, payloads)
        if self.decoder is not None:  # decoded once for every transcoded viewer
            self.decoder.feed(frame.data, pts, keyframe)


def publisher_receiver(pc: RTCPeerConnection, track: MediaStreamTrack) -> RTCRtpReceiver:
    """The receiver behind a track from ``pc``'s ``track`` event (public API only)."""
    for transceiver in pc.getTransceivers():
        if transceiver.receiver.track is track:
            return transceiver.receiver
    raise LookupError("track does not belong to this peer connection")


def negotiated_codec(pc: RTCPeerConnection, kind: str) -> RTCRtpCodecParameters | None:
    """The codec ``pc``'s local description (the box's answer) puts first for ``kind``.

    aiortc answers with the codecs both sides support in the order of the offer, and the
    offerer sends with the first of them, so a publisher's offer decides: VP8 if it lists
    VP8 first, H.264 if it lists H.264 first or only. None before an answer or for no such
    media.
    """
    description = pc.localDescription
    if description is None:
        return None
    for media in aiortc_sdp.SessionDescription.parse(description.sdp).media:
        if media.kind == kind:
            for codec in media.rtp.codecs:
                if codec.mimeType.lower() != f"{kind}/rtx":
                    return codec
    return None
