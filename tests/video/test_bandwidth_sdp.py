"""``b=AS`` / ``b=TIAS`` on the WAN leg (docs/video.md, "The WAN leg", **b=AS.**).

The parser (services/video/bandwidth.py: ``sdp_bandwidth``) without network, Hypothesis
where it fits; then the service with real aiortc clients on loopback: a remote viewer's
``b=AS:200`` bounds the REMB the relay sends its publisher.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.video.bandwidth import (
    MAX_SDP_BANDWIDTH_BPS,
    SdpBandwidth,
    budget_share,
    sdp_bandwidth,
)
from services.video.rooms import MediaKind
from tests.video.peers import wait_for
from tests.video.test_loss import LargeNumberedVideoTrack
from tests.video.test_service import VISIT, Client, flowing, video_service

SESSION = ["v=0", "o=- 1 1 IN IP4 0.0.0.0", "s=-", "t=0 0", "a=group:BUNDLE 0 1"]
AUDIO = [
    "m=audio 9 UDP/TLS/RTP/SAVPF 111",
    "c=IN IP4 0.0.0.0",
    "a=mid:0",
    "a=rtpmap:111 opus/48000/2",
]
VIDEO = [
    "m=video 9 UDP/TLS/RTP/SAVPF 96",
    "c=IN IP4 0.0.0.0",
    "a=mid:1",
    "a=rtpmap:96 VP8/90000",
    "a=fingerprint:sha-256 00:11",
]


def sdp(
    session: Sequence[str] = (),
    audio: Sequence[str] = (),
    video: Sequence[str] = (),
    eol: str = "\r\n",
) -> str:
    """The template with ``b=`` lines after the session's ``t=`` and each section's ``c=``."""
    lines = [*SESSION[:4], *session, *SESSION[4:]]
    lines += [*AUDIO[:2], *audio, *AUDIO[2:], *VIDEO[:2], *video, *VIDEO[2:]]
    return eol.join(lines) + eol


REASONS = [
    ("a bandwidth line without a type",),
    ("b=AS is not a whole number up to 10 Gbit/s",),
    ("b=TIAS is not a whole number up to 10 Gbit/s",),
]

# -- the parser ------------------------------------------------------------------------------


def test_a_media_level_line_is_the_ceiling_and_tias_wins_over_as() -> None:
    assert sdp_bandwidth(sdp()) == SdpBandwidth(None)
    assert sdp_bandwidth(sdp(video=["b=AS:200"])) == SdpBandwidth(200_000)
    assert sdp_bandwidth(sdp(video=["b=TIAS:180000"])) == SdpBandwidth(180_000)
    assert sdp_bandwidth(sdp(video=["b=AS:200", "b=TIAS:250000"])).bps == 250_000
    assert sdp_bandwidth(sdp(video=["b=TIAS:250000", "b=AS:200"])).bps == 250_000
    assert sdp_bandwidth(sdp(video=["b=AS:300", "b=AS:200"])).bps == 200_000  # the lowest
    assert sdp_bandwidth(sdp(video=["b=AS:0"])).bps == 0  # RemoteStream decides what 0 means
    assert sdp_bandwidth(sdp(video=["b=AS:0200"])).bps == 200_000
    assert sdp_bandwidth(sdp(video=["b=AS:200"]), "audio").bps is None
    assert sdp_bandwidth(sdp(video=["b=AS:200"], eol="\n")).bps == 200_000


def test_the_session_line_applies_only_without_a_media_one() -> None:
    assert sdp_bandwidth(sdp(session=["b=AS:500"])).bps == 500_000
    assert sdp_bandwidth(sdp(session=["b=TIAS:400000", "b=AS:500"])).bps == 400_000
    assert sdp_bandwidth(sdp(session=["b=AS:100"], video=["b=AS:500"])).bps == 500_000
    assert sdp_bandwidth(sdp(session=["b=AS:500"], video=["b=TIAS:x"])).bps == 500_000
    # The audio section's line is about audio.
    assert sdp_bandwidth(sdp(audio=["b=AS:64"])).bps is None
    # Only the first video section counts.
    second = sdp(video=["b=AS:300"]) + "\r\n".join([*VIDEO[:2], "b=AS:100", *VIDEO[2:]])
    assert sdp_bandwidth(second).bps == 300_000


@pytest.mark.parametrize(
    "line",
    [
        "b=AS:",
        "b=AS:-1",
        "b=AS:+200",
        "b=AS: 200",
        "b=AS:200 ",
        "b=AS:2e3",
        "b=AS:200.5",
        "b=AS:0x10",
        "b=AS:\u0662\u0660\u0660",  # Arabic-Indic digits: str.isdigit says yes
        "b=AS:12345678901",  # over 10 Gbit/s
        "b=AS:10000001",
        "b=TIAS:10000000001",
        "b=TIAS:000000000001",  # twelve digits
        "b=AS",
    ],
)
def test_garbage_is_ignored_and_said_so(line: str) -> None:
    result = sdp_bandwidth(sdp(video=[line]))
    assert result.bps is None
    # The reason is a fixed text: nothing from the line itself goes to the log.
    assert result.ignored in REASONS


def test_other_types_and_case_variants_are_not_ceilings() -> None:
    for line in ("b=CT:100", "b=RR:0", "b=RS:0", "b=X-YZ:5", "b=as:100", "b=Tias:100"):
        assert sdp_bandwidth(sdp(video=[line])) == SdpBandwidth(None)


def test_a_ceiling_of_ten_gigabits_is_the_largest() -> None:
    assert sdp_bandwidth(sdp(video=["b=AS:10000000"])).bps == MAX_SDP_BANDWIDTH_BPS
    assert sdp_bandwidth(sdp(video=["b=TIAS:10000000000"])).bps == MAX_SDP_BANDWIDTH_BPS


@given(st.text())
def test_any_text_gives_a_bounded_value_or_none(text: str) -> None:
    result = sdp_bandwidth(text)
    assert result.bps is None or 0 <= result.bps <= MAX_SDP_BANDWIDTH_BPS
    assert all(isinstance(reason, str) for reason in result.ignored)


_LINES = st.one_of(
    st.sampled_from(["m=video 9 X 96", "m=audio 9 X 111", "c=IN IP4 0.0.0.0", "a=mid:0"]),
    st.builds(
        lambda kind, value: f"b={kind}:{value}",
        st.sampled_from(["AS", "TIAS", "CT", "", "as"]),
        st.one_of(st.integers(-5, 10**12).map(str), st.text(max_size=12)),
    ),
    st.text(max_size=20),
)


@given(st.lists(_LINES, max_size=30), st.sampled_from(["\n", "\r\n", "\r"]))
def test_any_mix_of_sdp_lines_gives_a_bounded_value_or_none(lines: list[str], eol: str) -> None:
    result = sdp_bandwidth(eol.join(lines))
    assert result.bps is None or 0 <= result.bps <= MAX_SDP_BANDWIDTH_BPS


@given(
    kbps=st.integers(0, MAX_SDP_BANDWIDTH_BPS // 1000),
    bps=st.integers(0, MAX_SDP_BANDWIDTH_BPS),
    session_kbps=st.integers(0, 10**6),
)
def test_valid_values_round_trip(kbps: int, bps: int, session_kbps: int) -> None:
    assert sdp_bandwidth(sdp(video=[f"b=AS:{kbps}"])).bps == kbps * 1000
    assert sdp_bandwidth(sdp(video=[f"b=TIAS:{bps}"])).bps == bps
    assert sdp_bandwidth(sdp(video=[f"b=AS:{kbps}", f"b=TIAS:{bps}"])).bps == bps
    assert sdp_bandwidth(sdp(session=[f"b=AS:{session_kbps}"])).bps == session_kbps * 1000
    both = sdp(session=[f"b=AS:{session_kbps}"], video=[f"b=AS:{kbps}"])
    assert sdp_bandwidth(both) == SdpBandwidth(kbps * 1000)


# -- the line the box writes -----------------------------------------------------------------


def _video_section(text: str) -> list[str]:
    lines = text.split("\r\n")
    start = lines.index(VIDEO[0])
    return lines[start:]


# -- the service, real aiortc clients on loopback ---------------------------------------------


class CappingViewer(Client):
    """A remote viewer whose answers say ``b=AS:200`` in their video section, after ``c=``
    (as a browser's munged answer would)."""

    def route_answer(self, offer: str, answer: str) -> str:
        if offer == self._publish_offer:
            return answer  # the box's answer to its own publish offer: as it is
        return re.sub(r"(m=video [^\r\n]*\r\nc=[^\r\n]*\r\n)", r"\1b=AS:200\r\n", answer)


@pytest.mark.slow
@pytest.mark.usefixtures("loopback")
async def test_a_remote_viewers_b_as_caps_the_remb_its_publisher_gets() -> None:
    async with video_service() as (service, client):
        nurse, patient = client("nurse"), client("patient")
        provider = client("provider", CappingViewer)
        await nurse.join("nurse")
        await patient.join("patient")
        await provider.join("provider")
        await nurse.send(type="admit", participant=patient.id)
        # ~0.6 Mbit/s: the viewer's estimate and the relay's throughput to it exceed 200.
        await patient.publish(LargeNumberedVideoTrack())
        await flowing(nurse.video, patient.id, 10, seconds=20)
        video = service.relays(VISIT, patient.id)[MediaKind.VIDEO]
        assert video.publisher_cap is None  # nobody remote: uncapped

        await nurse.send(type="admit", participant=provider.id)
        await flowing(provider.video, patient.id, 10, seconds=20)
        remote = service.remote_stream(VISIT, patient.id, provider.id)
        assert remote is not None
        assert remote.ceiling == 200_000
        assert budget_share(service.wan, 1, 1) > 1_000_000  # the share alone would not cap
        estimator = video._estimator  # what the relay's receiver sends the publisher
        assert estimator is not None
        await wait_for(
            lambda: estimator.last_sent is not None and estimator.last_sent <= 200_000,
            10,
            "a REMB of at most 200 kbit/s to the publisher",
        )
        # aiortc's viewer reports its estimate after 3 s of media: it changes nothing.
        await wait_for(lambda: remote.last_remb is not None, 10, "the viewer's first REMB")
        await flowing(provider.video, patient.id, 10, seconds=5)
        # The ceiling decides: the share and the viewer's estimate are both higher.
        assert video.publisher_cap == 200_000, (
            video.publisher_cap,
            remote.estimate(time.monotonic()),
        )
        assert estimator.last_sent is not None
        assert estimator.last_sent <= 200_000
        assert provider.errors() == nurse.errors() == patient.errors() == []
