"""Signalling messages: the documented schema, and rejection of whatever else arrives."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime

import orjson
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import candidate_from_sdp
from hypothesis import given, settings
from hypothesis import strategies as st

from services.video import rooms
from services.video.rooms import MediaKind, Role
from services.video.signalling import (
    FLOOD_CLOSE_AFTER,
    MAX_MESSAGE_BYTES,
    MESSAGE_BURST,
    Admit,
    Candidate,
    Description,
    End,
    ErrorCode,
    Inbound,
    Join,
    Leave,
    MessageRateLimiter,
    Mute,
    Reconnect,
    SignallingError,
    encode_candidate,
    encode_description,
    encode_error,
    encode_event,
    encode_joined,
    encode_video_paused,
    parse_message,
    validate_candidate,
)
from tests.video.peers import loopback_pc

_NOON = datetime(2026, 11, 27, 12, tzinfo=UTC)

CHROME_OFFER = "\r\n".join(
    [
        "v=0",
        "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "a=msid-semantic: WMS",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111 63",
        "c=IN IP4 0.0.0.0",
        "a=rtcp:9 IN IP4 0.0.0.0",
        "a=candidate:1467250027 1 udp 2122260223 0f1b3c2a-5d4e-4f60-8a7b-9c0d1e2f3a4b.local 54321 typ host generation 0 network-id 1",
        "a=candidate:842163049 1 udp 1686052607 203.0.113.7 47000 typ srflx raddr 0.0.0.0 rport 0 generation 0",
        "a=ice-ufrag:Xk3e",
        "a=ice-pwd:VYw1W2hbz8mXiQPr0oFvPpLk",
        "a=fingerprint:sha-256 7B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08",
        "a=setup:actpass",
        "a=mid:0",
        "a=sendrecv",
        "a=rtcp-mux",
        "a=rtpmap:111 opus/48000/2",
        "a=fmtp:111 minptime=10;useinbandfec=1",
        "m=video 9 UDP/TLS/RTP/SAVPF 96 97",
        "c=IN IP4 0.0.0.0",
        "a=mid:1",
        "a=sendrecv",
        "a=rtcp-mux",
        "a=rtpmap:96 VP8/90000",
        "a=rtcp-fb:96 nack pli",
        "a=rtpmap:97 rtx/90000",
        "a=fmtp:97 apt=96",
        "",
    ]
)


def message(**fields: object) -> bytes:
    return orjson.dumps(fields)


def rejected(code: ErrorCode) -> pytest.RaisesExc[SignallingError]:
    return pytest.raises(SignallingError, match=f"^{code}: ")


def test_every_documented_client_message_parses() -> None:
    assert parse_message(
        message(type="join", visit="v-1", role="provider", token="a.b-c_d")
    ) == Join("v-1", Role.PROVIDER, "a.b-c_d")
    assert parse_message(message(type="offer", sdp=CHROME_OFFER)) == Description(
        "offer", CHROME_OFFER
    )
    assert parse_message(message(type="answer", sdp=CHROME_OFFER)).kind == "answer"  # type: ignore[union-attr]
    candidate = (
        "candidate:842163049 1 udp 1686052607 203.0.113.7 47000 typ srflx raddr 0.0.0.0 rport 0"
    )
    assert parse_message(
        message(
            type="candidate",
            candidate=candidate,
            sdpMid="0",
            sdpMLineIndex=0,
            usernameFragment="Xk3e",
        )
    ) == Candidate(candidate, "0", 0)
    assert parse_message(message(type="candidate", candidate="")) == Candidate("", None, None)
    assert parse_message(message(type="admit", participant="p-2")) == Admit("p-2")
    assert parse_message(message(type="mute", participant="p-2", kind="audio", muted=True)) == Mute(
        "p-2", MediaKind.AUDIO, True
    )
    assert parse_message('{"type": "end"}') == End()
    assert parse_message('{"type": "leave"}') == Leave()
    assert parse_message('{"type": "reconnect"}') == Reconnect()
    with pytest.raises(SignallingError):
        parse_message('{"type": "reconnect", "pc": "a1-2"}')


def test_offer_answer_and_candidate_may_name_their_peer_connection() -> None:
    assert parse_message(message(type="offer", sdp=CHROME_OFFER, pc="a1b2-3")) == Description(
        "offer", CHROME_OFFER, "a1b2-3"
    )
    assert parse_message(message(type="answer", sdp=CHROME_OFFER, pc="x")).pc == "x"  # type: ignore[union-attr]
    assert parse_message(message(type="candidate", candidate="", pc="a1b2-3")) == Candidate(
        "", None, None, "a1b2-3"
    )
    assert parse_message(message(type="offer", sdp=CHROME_OFFER)).pc is None  # type: ignore[union-attr]


@pytest.mark.parametrize("pc", [None, "", "a b", "x" * 65, "dot.ted", 3, ["a"], {"a": 1}])
@pytest.mark.parametrize("kind", ["offer", "answer", "candidate"])
def test_a_malformed_peer_connection_id_is_rejected(kind: str, pc: object) -> None:
    body = {"candidate": ""} if kind == "candidate" else {"sdp": CHROME_OFFER}
    with rejected(ErrorCode.INVALID_FIELD):
        parse_message(message(type=kind, pc=pc, **body))


def test_only_offer_answer_and_candidate_take_a_peer_connection_id() -> None:
    with rejected(ErrorCode.INVALID_FIELD):
        parse_message(message(type="admit", participant="p-2", pc="a"))
    with rejected(ErrorCode.INVALID_FIELD):
        parse_message(message(type="leave", pc="a"))


@pytest.mark.usefixtures("loopback")
async def test_aiortc_offer_with_its_candidates_is_accepted() -> None:
    pc: RTCPeerConnection = loopback_pc()
    try:
        pc.addTransceiver("video")
        pc.addTransceiver("audio")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        assert "a=candidate:" in sdp
        assert parse_message(message(type="offer", sdp=sdp)) == Description("offer", sdp)
        RTCSessionDescription(sdp=sdp, type="offer")
    finally:
        await pc.close()


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\xff\xfe", ErrorCode.MALFORMED),
        ("not json", ErrorCode.MALFORMED),
        ("[1, 2]", ErrorCode.MALFORMED),
        ('{"type": "offer", "sdp": "v=0"} trailing', ErrorCode.MALFORMED),
        ("[" * 5000 + "]" * 5000, ErrorCode.MALFORMED),
        ('{"sdp": "v=0"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": "shutdown"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": 7}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": "end", "by": "me"}', ErrorCode.INVALID_FIELD),
        ('{"type": "admit"}', ErrorCode.INVALID_FIELD),
        ('{"type": "admit", "participant": "../etc"}', ErrorCode.INVALID_FIELD),
        ('{"type": "admit", "participant": ""}', ErrorCode.INVALID_FIELD),
        ('{"type": "join", "visit": "v", "role": "admin", "token": "t"}', ErrorCode.INVALID_FIELD),
        (
            '{"type": "join", "visit": "v", "role": ["nurse"], "token": "t"}',
            ErrorCode.INVALID_FIELD,
        ),
        (
            '{"type": "join", "visit": "v", "role": "nurse", "token": "t t"}',
            ErrorCode.INVALID_FIELD,
        ),
        (
            '{"type": "mute", "participant": "p", "kind": "video", "muted": 1}',
            ErrorCode.INVALID_FIELD,
        ),
        (
            '{"type": "mute", "participant": "p", "kind": "screen", "muted": true}',
            ErrorCode.INVALID_FIELD,
        ),
        ('{"type": "offer", "sdp": 5}', ErrorCode.INVALID_SDP),
        ('{"type": "candidate", "candidate": null}', ErrorCode.INVALID_CANDIDATE),
    ],
)
def test_malformed_messages_are_rejected(raw: str | bytes, code: ErrorCode) -> None:
    with rejected(code):
        parse_message(raw)


def without(line_start: str) -> str:
    return "\r\n".join(
        line for line in CHROME_OFFER.split("\r\n") if not line.startswith(line_start)
    )


@pytest.mark.parametrize(
    "sdp",
    [
        "",
        "hello",
        "o=- 1 2 IN IP4 127.0.0.1\r\nv=0\r\n",
        "v=0\r\ns=-\r\n",  # no media
        without("a=fingerprint"),  # DTLS-SRTP only
        CHROME_OFFER.replace("UDP/TLS/RTP/SAVPF 111", "RTP/AVP 111"),  # plain RTP
        CHROME_OFFER.replace("m=video 9", "m=video 99999"),
        CHROME_OFFER.replace("m=video 9 UDP/TLS/RTP/SAVPF 96 97", "m=video"),
        CHROME_OFFER.replace("s=-", "s=\x00"),
        CHROME_OFFER.replace("s=-", "S=-"),
        CHROME_OFFER.replace("s=-", "s=café"),
        CHROME_OFFER.replace("203.0.113.7", "224.0.0.251"),  # multicast candidate
        CHROME_OFFER.replace("typ srflx", "typ bogus"),
        CHROME_OFFER + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n" * 16,
    ],
)
def test_bad_sdp_is_rejected(sdp: str) -> None:
    with rejected(ErrorCode.INVALID_SDP):
        parse_message(message(type="offer", sdp=sdp))


@pytest.mark.parametrize(
    "candidate",
    [
        "candidate:1 1 udp 2122260223 192.0.2.10 54321 typ host",
        "1 1 UDP 2122260223 192.0.2.10 54321 typ host",
        "candidate:abc+/ 2 tcp 1518280447 2001:db8::1 9 typ host tcptype active",
        "candidate:1 1 udp 41885439 198.51.100.2 3478 typ relay raddr 203.0.113.7 rport 47000",
        "candidate:1 1 udp 2122260223 0f1b3c2a-5d4e-4f60-8a7b-9c0d1e2f3a4b.local 54321 typ host",
    ],
)
def test_good_candidates(candidate: str) -> None:
    validate_candidate(candidate)


@pytest.mark.parametrize(
    "candidate",
    [
        "candidate:1 1 udp 2122260223 192.0.2.10 54321 typ",
        "candidate:1 1 udp 2122260223 192.0.2.10 54321 host host",
        "candidate:1 1 sctp 2122260223 192.0.2.10 54321 typ host",
        "candidate:1 0 udp 2122260223 192.0.2.10 54321 typ host",
        "candidate:1 1 udp 99999999999 192.0.2.10 54321 typ host",
        "candidate:1 1 udp -5 192.0.2.10 54321 typ host",
        "candidate:1 1 udp 1 192.0.2.10 65536 typ host",
        "candidate:1 1 udp 1 192.0.2.10 ５４ typ host",
        "candidate:1 1 udp 1 example.com 54321 typ host",
        "candidate:1 1 udp 1 0.0.0.0 54321 typ host",
        "candidate:1 1 udp 1 255.255.255.255 54321 typ host",
        "candidate:1 1 udp 1 ff02::1 54321 typ host",
        "candidate:1 1 udp 1 192.0.2.10 54321 typ host raddr nowhere rport 1",
        "candidate:1 1 udp 1 192.0.2.10 54321 typ host rport 70000",
        "candidate:1 1 udp 1 192.0.2.10 54321 typ host generation",
        "candidate:1 1 udp 1 192.0.2.10  54321 typ host",
        # aiortc splits on any whitespace: it would read other fields than the check did
        "candidate:1 1 udp 1 fe80::1%a\tb 54321 typ host",
        "candidate:1 1 udp 1 192.0.2.10 54321 typ host\tgeneration 0",
        "candidate:1 1 udp 1 fe80::1%eth0 54321 typ host",
        "candidate:" + "x" * 40 + " 1 udp 1 192.0.2.10 54321 typ host",
        "candidate:1 1 udp 1 192.0.2.10 54321 typ host ext " + "v" * 600,
    ],
)
def test_bogus_candidates_are_rejected(candidate: str) -> None:
    with rejected(ErrorCode.INVALID_CANDIDATE):
        parse_message(message(type="candidate", candidate=candidate, sdpMid="0"))


def test_candidate_needs_its_media_section() -> None:
    with rejected(ErrorCode.INVALID_CANDIDATE):
        parse_message(
            message(type="candidate", candidate="candidate:1 1 udp 1 192.0.2.1 5 typ host")
        )
    for index in (-1, 16, True, "0"):
        with rejected(ErrorCode.INVALID_CANDIDATE):
            parse_message(message(type="candidate", candidate="", sdpMLineIndex=index))


def test_oversized_message_is_rejected_before_parsing() -> None:
    padding = "a=x-pad:" + "p" * MAX_MESSAGE_BYTES
    with rejected(ErrorCode.TOO_LARGE):
        parse_message(message(type="offer", sdp=CHROME_OFFER + padding))
    with rejected(ErrorCode.TOO_LARGE):
        parse_message(" " * (MAX_MESSAGE_BYTES + 1))
    with rejected(ErrorCode.TOO_LARGE):  # counted in UTF-8 bytes, not characters
        parse_message('"' + "é" * (MAX_MESSAGE_BYTES // 2) + '"')


def test_rate_limiter_allows_a_burst_then_the_sustained_rate() -> None:
    limiter = MessageRateLimiter(rate=10.0, burst=5)
    assert [limiter.allow(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert limiter.allow(0.05) is False
    assert limiter.allow(0.1) is True
    assert limiter.allow(0.1) is False
    assert [limiter.allow(10.0) for _ in range(6)] == [True] * 5 + [False]  # refills to burst only


def test_flooding_connection_is_limited_and_then_dropped_without_touching_another() -> None:
    flooder, neighbour = Inbound(), Inbound()
    end = '{"type": "leave"}'
    replies = []
    for _ in range(MESSAGE_BURST):
        assert flooder.receive(end, now=1.0) == Leave()
    for _ in range(FLOOD_CLOSE_AFTER):
        assert not flooder.closing
        with rejected(ErrorCode.RATE_LIMITED) as caught:
            flooder.receive(end, now=1.0)
        replies.append(caught.value.reply)
    assert flooder.closing
    assert replies == [True] + [False] * (FLOOD_CLOSE_AFTER - 1)  # one error reply per flood
    assert neighbour.receive(end, now=1.0) == Leave()
    assert not neighbour.closing


def test_a_good_message_resets_the_rejection_count() -> None:
    inbound = Inbound()
    for _ in range(FLOOD_CLOSE_AFTER - 1):
        with rejected(ErrorCode.MALFORMED):
            inbound.receive("{", now=0.0 + _ / 10)
    assert inbound.receive('{"type": "end"}', now=100.0) == End()
    with rejected(ErrorCode.MALFORMED):
        inbound.receive("{", now=100.0)
    assert not inbound.closing


def test_server_messages_encode_as_documented() -> None:
    assert orjson.loads(encode_error(ErrorCode.TOO_LARGE, "x")) == {
        "type": "error",
        "code": "too_large",
        "message": "x",
    }
    assert orjson.loads(encode_error(rooms.RoomErrorCode.NOT_ALLOWED, "y"))["code"] == "not_allowed"
    assert orjson.loads(encode_description(Description("answer", "v=0"))) == {
        "type": "answer",
        "sdp": "v=0",
    }
    assert orjson.loads(encode_candidate(Candidate("", "0", None))) == {
        "type": "candidate",
        "candidate": "",
        "sdpMid": "0",
        "sdpMLineIndex": None,
    }
    assert orjson.loads(encode_description(Description("offer", "v=0", "a1-2"))) == {
        "type": "offer",
        "sdp": "v=0",
        "pc": "a1-2",
    }
    assert orjson.loads(encode_candidate(Candidate("", None, 0, "a1-2")))["pc"] == "a1-2"
    events: list[rooms.Event] = [
        rooms.Joined("p", Role.PATIENT, rooms.Presence.WAITING),
        rooms.Admitted("p", "n"),
        rooms.MuteChanged("p", MediaKind.VIDEO, True, "n"),
        rooms.Left("p"),
        rooms.Ended("n"),
    ]
    assert [orjson.loads(encode_event(e)) for e in events] == [
        {"type": "participant", "participant": "p", "role": "patient", "presence": "waiting"},
        {"type": "admitted", "participant": "p", "by": "n"},
        {"type": "muted", "participant": "p", "kind": "video", "muted": True, "by": "n"},
        {"type": "left", "participant": "p"},
        {"type": "ended", "by": "n"},
    ]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
message_objects = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["join", "offer", "answer", "candidate", "admit", "mute", "end", "leave", "x"]
        )
    },
    optional={
        key: json_values | st.text(max_size=80)
        for key in (
            "visit",
            "role",
            "token",
            "sdp",
            "candidate",
            "sdpMid",
            "sdpMLineIndex",
            "participant",
            "kind",
            "muted",
        )
    },
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300) | message_objects.map(json.dumps))
def test_parser_raises_only_signalling_errors(raw: str | bytes) -> None:
    with contextlib.suppress(SignallingError):
        parse_message(raw)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(CHROME_OFFER.split("\r\n")) | st.text(max_size=60),
        max_size=40,
    )
)
def test_sdp_checks_raise_only_signalling_errors(lines: list[str]) -> None:
    with contextlib.suppress(SignallingError):
        parse_message(message(type="offer", sdp="\r\n".join(["v=0", *lines])))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "candidate:1",
                "1",
                "udp",
                "tcp",
                "2122260223",
                "192.0.2.1",
                "::1",
                "x.local",
                "typ",
                "host",
                "raddr",
                "rport",
                "0",
                "",
            ]
        )
        | st.text(max_size=12),
        max_size=14,
    ).map(" ".join)
)
def test_candidate_checks_raise_only_signalling_errors(candidate: str) -> None:
    """Whatever the check lets through, aiortc parses (to the address the check read)."""
    try:
        validate_candidate(candidate)
    except SignallingError:
        return
    parsed = candidate_from_sdp(candidate.removeprefix("candidate:"))
    assert parsed.ip == candidate.removeprefix("candidate:").split(" ")[4]


def test_wan_leg_messages_encode_as_documented() -> None:
    assert orjson.loads(encode_video_paused("a1", "b2", True)) == {
        "type": "video_paused",
        "publisher": "a1",
        "viewer": "b2",
        "paused": True,
    }
    participant = rooms.Participant("b2", Role.PROVIDER, rooms.Presence.WAITING, joined_at=_NOON)
    assert "iceServers" not in orjson.loads(encode_joined(participant))
    turn = {"urls": ["turn:turn.example.test:3478"], "username": "u", "credential": "c"}
    assert orjson.loads(encode_joined(participant, [turn])) == {
        "type": "joined",
        "participant": "b2",
        "role": "provider",
        "presence": "waiting",
        "muted": [],
        "iceServers": [turn],
    }
