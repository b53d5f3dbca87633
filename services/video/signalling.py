"""The video signalling protocol: JSON messages over a WebSocket, parsed and checked. Pure.

Every client message passes ``Inbound.receive`` (one per connection): a token-bucket rate
limit, a size cap, strict JSON, then a schema per ``type``. SDP and ICE candidates are
checked structurally (DTLS-SRTP only, bounded, well-formed candidates) before aiortc ever
sees them. Anything wrong raises ``SignallingError`` (a ``ValueError``) carrying the code
sent back in an ``error`` message; nothing else escapes, and no state outside the
connection's own ``Inbound`` changes, so one connection cannot disturb another room.
Messages are documented in docs/video.md.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, TypeVar

import orjson

from services.video import rooms
from services.video.rooms import MediaKind, Role

MAX_MESSAGE_BYTES = 64 * 1024
MAX_CANDIDATE_CHARS = 512
MAX_MEDIA_SECTIONS = 16
MESSAGES_PER_SECOND = 20.0  # sustained: candidates trickle, mute toggles
MESSAGE_BURST = 40  # a browser's first burst: join, offer and a dozen candidates
FLOOD_CLOSE_AFTER = 200  # rejected messages in a row before the connection is dropped

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{1,2048}")
_SDP_LINE = re.compile(r"[a-z]=[\x20-\x7e\t]*")
_MEDIA_LINE = re.compile(r"m=(audio|video|application) (\d{1,5})(?:/\d+)? (\S+)(?: \S+)+")
_FOUNDATION = re.compile(r"[A-Za-z0-9+/]{1,32}")
_CANDIDATE_CHARS = re.compile(r"[\x21-\x7e ]*")
_MDNS_NAME = re.compile(r"[A-Za-z0-9-]{1,63}\.local")
_EXTENSION_NAME = re.compile(r"[A-Za-z0-9-]{1,32}")
_EXTENSION_VALUE = re.compile(r"[\x21-\x7e]{1,256}")
_SRTP_PROFILES = {"UDP/TLS/RTP/SAVPF", "UDP/TLS/RTP/SAVP"}
_DATA_PROFILES = {"UDP/DTLS/SCTP", "DTLS/SCTP"}
_CANDIDATE_TYPES = {"host", "srflx", "prflx", "relay"}
_E = TypeVar("_E", bound=StrEnum)


class ErrorCode(StrEnum):
    """Why a message was rejected (protocol errors; room refusals use ``RoomErrorCode``)."""

    RATE_LIMITED = "rate_limited"
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_FIELD = "invalid_field"
    INVALID_SDP = "invalid_sdp"
    INVALID_CANDIDATE = "invalid_candidate"
    RESUME_REFUSED = "resume_refused"  # a resume token from elsewhere, used already, or late
    # The same credential joined the visit again (another window or device): this seat left.
    JOINED_ELSEWHERE = "joined_elsewhere"
    # A subscribe leg's viewer takes only the other video codec and the box's transcoding
    # encoders are all in use: that publisher's video is not sent to it (audio is).
    TRANSCODING_UNAVAILABLE = "transcoding_unavailable"


class SignallingError(ValueError):
    """A rejected client message; ``code`` goes back to the client, ``reply`` says whether to."""

    def __init__(self, code: ErrorCode, detail: str, reply: bool = True) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Join:
    """Join a visit's room with the signed link's token (verified by the web app)."""

    visit: str
    role: Role
    token: str


@dataclass(frozen=True, slots=True)
class Description:
    """An SDP offer or answer (DTLS-SRTP only); ``pc`` names the connection (None: publish)."""

    kind: Literal["offer", "answer"]
    sdp: str
    pc: str | None = None


@dataclass(frozen=True, slots=True)
class Candidate:
    """A trickled ICE candidate; an empty ``candidate`` ends the trickle."""

    candidate: str
    sdp_mid: str | None
    sdp_mline_index: int | None
    pc: str | None = None  # which peer connection; None: the sender's publish connection


@dataclass(frozen=True, slots=True)
class Admit:
    """A nurse admits a waiting participant."""

    participant: str


@dataclass(frozen=True, slots=True)
class Mute:
    """Mute or unmute a participant's audio or video."""

    participant: str
    kind: MediaKind
    muted: bool


@dataclass(frozen=True, slots=True)
class End:
    """A nurse ends the visit."""


@dataclass(frozen=True, slots=True)
class Leave:
    """The sender leaves the visit."""


@dataclass(frozen=True, slots=True)
class Reconnect:
    """The sender's media connections failed (its network flapped): rebuild its subscribe
    connections. It re-offers its publish connection itself; nobody else's connection
    changes."""


@dataclass(frozen=True, slots=True)
class Resume:
    """Take one's seat back on a new connection after the previous one dropped, with the
    resume token the box gave on ``joined`` (or the last ``resumed``). Single use."""

    visit: str
    participant: str
    token: str = field(repr=False)  # a secret: never in a repr, so never in a log


ClientMessage = Join | Description | Candidate | Admit | Mute | End | Leave | Reconnect | Resume

# type → (required fields, optional fields)
_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "join": (frozenset({"visit", "role", "token"}), frozenset()),
    "offer": (frozenset({"sdp"}), frozenset({"pc"})),
    "answer": (frozenset({"sdp"}), frozenset({"pc"})),
    "candidate": (
        frozenset({"candidate"}),
        frozenset({"sdpMid", "sdpMLineIndex", "usernameFragment", "pc"}),
    ),
    "admit": (frozenset({"participant"}), frozenset()),
    "mute": (frozenset({"participant", "kind", "muted"}), frozenset()),
    "end": (frozenset(), frozenset()),
    "leave": (frozenset(), frozenset()),
    "reconnect": (frozenset(), frozenset()),
    "resume": (frozenset({"visit", "participant", "token"}), frozenset()),
}


def parse_message(raw: str | bytes) -> ClientMessage:
    """Parse one client message; ``SignallingError`` is the only exception raised."""
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    if size > MAX_MESSAGE_BYTES:
        raise SignallingError(
            ErrorCode.TOO_LARGE, f"{size} bytes, the limit is {MAX_MESSAGE_BYTES}"
        )
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SignallingError(ErrorCode.MALFORMED, f"not JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise SignallingError(ErrorCode.MALFORMED, "a message is a JSON object")
    kind = data.pop("type", None)
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise SignallingError(ErrorCode.UNKNOWN_TYPE, "unknown or missing type")
    required, optional = _FIELDS[kind]
    missing, extra = required - data.keys(), data.keys() - required - optional
    if missing or extra:
        raise SignallingError(
            ErrorCode.INVALID_FIELD,
            f"{kind}: missing {sorted(missing)}, unexpected {sorted(extra)[:5]}",
        )
    return _build(kind, data)


def _build(kind: str, data: dict[str, Any]) -> ClientMessage:
    if kind == "join":
        role = _enum(data, "role", Role)
        if role is Role.CAMERA:  # only the box adds a camera (services/video/camera_streams.py)
            raise SignallingError(ErrorCode.INVALID_FIELD, "a client cannot join as a camera")
        return Join(
            visit=_matching(data, "visit", _ID),
            role=role,
            token=_matching(data, "token", _TOKEN),
        )
    if kind in ("offer", "answer"):
        sdp = data["sdp"]
        if not isinstance(sdp, str):
            raise SignallingError(ErrorCode.INVALID_SDP, "sdp is a string")
        pc = _optional_id(data, "pc")
        validate_sdp(sdp)
        return Description("offer" if kind == "offer" else "answer", sdp, pc)
    if kind == "candidate":
        return _candidate(data)
    if kind == "admit":
        return Admit(_matching(data, "participant", _ID))
    if kind == "mute":
        muted = data["muted"]
        if not isinstance(muted, bool):
            raise SignallingError(ErrorCode.INVALID_FIELD, "muted is true or false")
        return Mute(_matching(data, "participant", _ID), _enum(data, "kind", MediaKind), muted)
    if kind == "reconnect":
        return Reconnect()
    if kind == "resume":
        return Resume(
            visit=_matching(data, "visit", _ID),
            participant=_matching(data, "participant", _ID),
            token=_matching(data, "token", _TOKEN),
        )
    return End() if kind == "end" else Leave()


def _matching(data: dict[str, Any], name: str, pattern: re.Pattern[str]) -> str:
    value = data[name]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise SignallingError(ErrorCode.INVALID_FIELD, f"{name} is malformed")
    return value


def _optional_id(data: dict[str, Any], name: str) -> str | None:
    if name not in data:
        return None
    return _matching(data, name, _ID)


def _enum(data: dict[str, Any], name: str, enum: type[_E]) -> _E:
    value = data[name]
    try:
        return enum(value)
    except (ValueError, TypeError):
        raise SignallingError(
            ErrorCode.INVALID_FIELD, f"{name} is not one of {list(enum)}"
        ) from None


def _candidate(data: dict[str, Any]) -> Candidate:
    pc = _optional_id(data, "pc")
    candidate = data["candidate"]
    if not isinstance(candidate, str):
        raise SignallingError(ErrorCode.INVALID_CANDIDATE, "candidate is a string")
    if candidate:
        validate_candidate(candidate)
    mid = data.get("sdpMid")
    if mid is not None and (not isinstance(mid, str) or not _ID.fullmatch(mid)):
        raise SignallingError(ErrorCode.INVALID_CANDIDATE, "sdpMid is malformed")
    index = data.get("sdpMLineIndex")
    if index is not None and (
        isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_MEDIA_SECTIONS
    ):
        raise SignallingError(ErrorCode.INVALID_CANDIDATE, "sdpMLineIndex is out of range")
    fragment = data.get("usernameFragment")
    if fragment is not None and (not isinstance(fragment, str) or not _TOKEN.fullmatch(fragment)):
        raise SignallingError(ErrorCode.INVALID_CANDIDATE, "usernameFragment is malformed")
    if candidate and mid is None and index is None:
        raise SignallingError(ErrorCode.INVALID_CANDIDATE, "sdpMid or sdpMLineIndex is needed")
    return Candidate(candidate, mid, index, pc)


def validate_sdp(sdp: str) -> None:
    """Check an offer or answer's structure: SDP lines, DTLS-SRTP media, valid candidates."""
    lines = sdp.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or lines[0].rstrip("\r") != "v=0":
        raise SignallingError(ErrorCode.INVALID_SDP, "an SDP starts with v=0")
    media = 0
    fingerprint = False
    for number, raw_line in enumerate(lines, 1):
        line = raw_line.removesuffix("\r")
        if not _SDP_LINE.fullmatch(line):
            raise SignallingError(ErrorCode.INVALID_SDP, f"line {number} is not an SDP line")
        if line.startswith("m="):
            media += 1
            match = _MEDIA_LINE.fullmatch(line)
            if media > MAX_MEDIA_SECTIONS or match is None:
                raise SignallingError(ErrorCode.INVALID_SDP, f"line {number}: bad media line")
            kind, port, profile = match.groups()
            allowed = _DATA_PROFILES if kind == "application" else _SRTP_PROFILES
            if profile not in allowed or int(port) > 65535:
                raise SignallingError(
                    ErrorCode.INVALID_SDP, f"line {number}: {kind} must use DTLS ({profile})"
                )
        elif line.startswith("a=fingerprint:"):
            fingerprint = True
        elif line.startswith("a=candidate:"):
            try:
                validate_candidate(line[2:])
            except SignallingError as exc:
                raise SignallingError(
                    ErrorCode.INVALID_SDP, f"line {number}: {exc.detail}"
                ) from None
    if not media:
        raise SignallingError(ErrorCode.INVALID_SDP, "no media section")
    if not fingerprint:
        raise SignallingError(ErrorCode.INVALID_SDP, "no DTLS fingerprint (DTLS-SRTP only)")


def validate_candidate(candidate: str) -> None:
    """Check an ICE candidate attribute (RFC 8839 §5.1), with or without ``candidate:``."""
    if len(candidate) > MAX_CANDIDATE_CHARS:
        raise SignallingError(ErrorCode.INVALID_CANDIDATE, "candidate is too long")
    if not _CANDIDATE_CHARS.fullmatch(candidate):
        # aiortc splits on any whitespace, this check on spaces: a tab or a newline would
        # let the two read different fields.
        raise SignallingError(ErrorCode.INVALID_CANDIDATE, "only printable ASCII and spaces")
    fields = candidate.removeprefix("candidate:").split(" ")
    if len(fields) < 8 or len(fields) % 2:
        raise SignallingError(ErrorCode.INVALID_CANDIDATE, "wrong number of fields")
    foundation, component, transport, priority, address, port, typ, kind, *rest = fields
    if not _FOUNDATION.fullmatch(foundation):
        raise SignallingError(ErrorCode.INVALID_CANDIDATE, "bad foundation")
    if not _number(component, 1, 256) or not _number(priority, 0, 2**32 - 1):
        raise SignallingError(ErrorCode.INVALID_CANDIDATE, "bad component or priority")
    if transport.lower() not in ("udp", "tcp"):
        raise SignallingError(ErrorCode.INVALID_CANDIDATE, "transport is udp or tcp")
    _check_address(address)
    if not _number(port, 0, 65535) or typ != "typ" or kind not in _CANDIDATE_TYPES:
        raise SignallingError(ErrorCode.INVALID_CANDIDATE, "bad port or type")
    for name, value in zip(rest[::2], rest[1::2], strict=True):
        if name == "raddr":
            _check_address(value, related=True)
        elif name == "rport":
            if not _number(value, 0, 65535):
                raise SignallingError(ErrorCode.INVALID_CANDIDATE, "bad rport")
        elif not _EXTENSION_NAME.fullmatch(name) or not _EXTENSION_VALUE.fullmatch(value):
            raise SignallingError(ErrorCode.INVALID_CANDIDATE, "bad extension")


def _number(text: str, low: int, high: int) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 10 and low <= int(text) <= high


def _check_address(text: str, related: bool = False) -> None:
    if _MDNS_NAME.fullmatch(text):
        return  # browsers hide host addresses behind mDNS names
    try:
        if "%" in text:  # an IPv6 zone names an interface of the sender's, not an address
            raise ValueError(text)
        address = ipaddress.ip_address(text)
    except ValueError:
        raise SignallingError(
            ErrorCode.INVALID_CANDIDATE, "address is not an IP or .local"
        ) from None
    # A related address of 0.0.0.0 is how browsers hide it; a connection address never is.
    if address.is_multicast or (address.is_unspecified and not related):
        raise SignallingError(ErrorCode.INVALID_CANDIDATE, "address cannot be connected to")
    if isinstance(address, ipaddress.IPv4Address) and address == ipaddress.IPv4Address(
        "255.255.255.255"
    ):
        raise SignallingError(ErrorCode.INVALID_CANDIDATE, "address cannot be connected to")


class MessageRateLimiter:
    """A token bucket per connection: ``rate`` messages a second, bursts up to ``burst``."""

    def __init__(self, rate: float = MESSAGES_PER_SECOND, burst: int = MESSAGE_BURST) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last: float | None = None

    def allow(self, now: float) -> bool:
        """Take a token if there is one (``now`` in seconds, monotonic)."""
        if self._last is not None:
            self._tokens = min(self._burst, self._tokens + max(0.0, now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class Inbound:
    """One connection's incoming side: rate limit, then ``parse_message``.

    A rejected message raises ``SignallingError``; while a peer floods, only the first
    rejection asks for a reply (so the answer is not a flood of its own), and after
    ``FLOOD_CLOSE_AFTER`` rejections in a row ``closing`` turns true: drop the connection.
    """

    def __init__(self, limiter: MessageRateLimiter | None = None) -> None:
        self._limiter = limiter or MessageRateLimiter()
        self._rejected_in_a_row = 0
        self._rate_limited = False

    @property
    def closing(self) -> bool:
        return self._rejected_in_a_row >= FLOOD_CLOSE_AFTER

    def receive(self, raw: str | bytes, now: float) -> ClientMessage:
        """The parsed message, or ``SignallingError``."""
        if not self._limiter.allow(now):
            self._rejected_in_a_row += 1
            reply, self._rate_limited = not self._rate_limited, True
            raise SignallingError(ErrorCode.RATE_LIMITED, "too many messages", reply=reply)
        self._rate_limited = False
        try:
            message = parse_message(raw)
        except SignallingError:
            self._rejected_in_a_row += 1
            raise
        self._rejected_in_a_row = 0
        return message


# -- server → client ------------------------------------------------------------------------


def encode_error(code: ErrorCode | rooms.RoomErrorCode, detail: str) -> bytes:
    """An ``error`` message."""
    return orjson.dumps({"type": "error", "code": str(code), "message": detail})


def encode_description(description: Description) -> bytes:
    """An ``offer`` or ``answer`` from the relay (with ``pc`` when it names one)."""
    body = {"type": description.kind, "sdp": description.sdp}
    if description.pc is not None:
        body["pc"] = description.pc
    return orjson.dumps(body)


def encode_candidate(candidate: Candidate) -> bytes:
    """A ``candidate`` from the relay (with ``pc`` when it names one)."""
    body: dict[str, Any] = {
        "type": "candidate",
        "candidate": candidate.candidate,
        "sdpMid": candidate.sdp_mid,
        "sdpMLineIndex": candidate.sdp_mline_index,
    }
    if candidate.pc is not None:
        body["pc"] = candidate.pc
    return orjson.dumps(body)


def encode_joined(
    participant: rooms.Participant,
    ice_servers: list[dict[str, Any]] | None = None,
    resume_token: str | None = None,
    *,
    resumed: bool = False,
) -> bytes:
    """``joined``: the answer to the sender's own ``join`` (with the site's STUN/TURN
    servers for the browser's connections, when any are configured, and the token that
    resumes the seat on a new connection); ``resumed`` (same fields) answers ``resume``."""
    body: dict[str, Any] = {
        "type": "resumed" if resumed else "joined",
        "participant": participant.id,
        "role": str(participant.role),
        "presence": str(participant.presence),
        "muted": sorted(participant.muted),
    }
    if resume_token is not None:
        body["resume"] = resume_token
    if ice_servers:
        body["iceServers"] = ice_servers
    return orjson.dumps(body)


def encode_participant(participant: rooms.Participant, reconnecting: bool) -> bytes:
    """``participant`` for someone already in the room, as a newcomer (or a participant
    resuming its seat) learns of them: with their mute state and whether their connection
    is down (``reconnecting``)."""
    body: dict[str, Any] = {
        "type": "participant",
        "participant": participant.id,
        "role": str(participant.role),
        "presence": str(participant.presence),
        "muted": sorted(participant.muted),
        "reconnecting": reconnecting,
    }
    if participant.label is not None:  # a camera's configured name
        body["label"] = participant.label
    return orjson.dumps(body)


def encode_reconnecting(participant: str, reconnecting: bool) -> bytes:
    """``reconnecting``: a participant's signalling connection dropped (``true``: the seat
    is kept for the grace period) or came back (``false``)."""
    return orjson.dumps(
        {"type": "reconnecting", "participant": participant, "reconnecting": reconnecting}
    )


def encode_video_paused(publisher: str, viewer: str, paused: bool) -> bytes:
    """``video_paused``: the WAN leg stopped (or restored) a publisher's video to a viewer."""
    return orjson.dumps(
        {"type": "video_paused", "publisher": publisher, "viewer": viewer, "paused": paused}
    )


def encode_event(event: rooms.Event) -> bytes:
    """A room event, as told to the room's participants."""
    body: dict[str, Any]
    match event:
        case rooms.Joined(participant_id, role, presence, label):
            body = {"type": "participant", "participant": participant_id, "role": str(role)}
            body["presence"] = str(presence)
            if label is not None:  # a camera's configured name
                body["label"] = label
        case rooms.Admitted(participant_id, by):
            body = {"type": "admitted", "participant": participant_id, "by": by}
        case rooms.MuteChanged(participant_id, kind, muted, by):
            body = {"type": "muted", "participant": participant_id, "kind": str(kind)}
            body |= {"muted": muted, "by": by}
        case rooms.Left(participant_id):
            body = {"type": "left", "participant": participant_id}
        case rooms.Ended(by):
            body = {"type": "ended", "by": by}
    return orjson.dumps(body)
