"""H.264 through the relay with a real browser: forwarded both ways, never transcoded.

Debian's Chromium, headless with fake media, is the provider on the visit link's page over
the real routes of the app served on 127.0.0.1; the clinic side are aiortc peers of the
app's own video service (as in test_video_wan_e2e.py). ``web/static/video.js`` offers VP8
first; here an init script (the test's only, the page's code is untouched) keeps a
reference to every ``RTCPeerConnection`` the page makes, for ``getStats``, and, when asked,
makes its ``setCodecPreferences`` put H.264 (packetization-mode 1, Constrained Baseline
42e01f) first, so the page publishes H.264.

1. The page publishes H.264; an aiortc nurse whose answers list H.264 first decodes it,
   forwarded: the publish leg negotiated H.264 and the relay made no decoder or encoder.
2. An aiortc patient publishes H.264 only (``H264Publisher``); the page, publishing its
   own VP8, decodes the patient's H.264, forwarded: its ``inbound-rtp`` codec is H.264.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from appliance.store import Store
from services.video.forwarding import ForwardingRelay, negotiated_codec
from services.video.rooms import MediaKind
from tests.e2e.live_server import watch_problems
from tests.e2e.test_video_e2e import _arrived_patient
from tests.e2e.video_call import decoded_at_least, issue_link, provider_waits
from tests.video.peers import wait_for
from tests.video.test_codecs import H264, H264Publisher, Vp8OnlyViewer
from tests.video.test_service import Client
from web.app import AppState

pytestmark = pytest.mark.slow

# Before the page's own scripts: keep the page's peer connections; with ``h264`` true, any
# video codec preferences the page sets get H.264 (packetization-mode 1, 42e01f) first.
KEEP_PCS = """
(() => {
  const Native = window.RTCPeerConnection;
  window.__pcs = [];
  window.RTCPeerConnection = class extends Native {
    constructor(...args) {
      super(...args);
      window.__pcs.push(this);
    }
  };
})();
"""
H264_FIRST = """
(() => {
  const original = RTCRtpTransceiver.prototype.setCodecPreferences;
  RTCRtpTransceiver.prototype.setCodecPreferences = function (codecs) {
    const h264 = RTCRtpSender.getCapabilities("video").codecs.filter(function (c) {
      const fmtp = c.sdpFmtpLine || "";
      return c.mimeType.toLowerCase() === "video/h264"
        && fmtp.includes("packetization-mode=1") && fmtp.includes("profile-level-id=42e01f");
    });
    window.__h264Offered = h264.length;
    return original.call(this, h264.slice(0, 1).concat(codecs));
  };
})();
"""
# The codec of each video RTP stream of the page's connections: [direction, mime, fmtp].
VIDEO_CODECS = """
async () => {
  const found = [];
  for (const pc of window.__pcs) {
    if (pc.connectionState === "closed") continue;
    const stats = await pc.getStats();
    stats.forEach((report) => {
      if ((report.type === "inbound-rtp" || report.type === "outbound-rtp")
          && report.kind === "video" && report.codecId) {
        const codec = stats.get(report.codecId);
        found.push([report.type, codec.mimeType, codec.sdpFmtpLine || ""]);
      }
    });
  }
  return found;
}
"""


class H264FirstViewer(Vp8OnlyViewer):
    """A client whose answers list H.264 first, VP8 second, for video."""

    accepts = (H264, "video/VP8")


@contextlib.asynccontextmanager
async def provider_in_room(
    video_app: tuple[str, AppState], store: Store, media_browser: Any, *, h264: bool
) -> AsyncIterator[tuple[Any, list[str], str, Client]]:
    """The provider's page waiting in a visit, and an aiortc nurse (an ``H264FirstViewer``)
    in it: (page, its problems, the visit's id, the nurse). The nurse admits no one."""
    base_url, state = video_app
    encounter_id = await _arrived_patient(store)
    nurse_context = await media_browser.new_context()
    link_path = await issue_link(await nurse_context.new_page(), base_url)
    await nurse_context.close()

    context = await media_browser.new_context()
    await context.add_init_script(KEEP_PCS + (H264_FIRST if h264 else ""))
    provider = await context.new_page()
    problems = watch_problems(provider)
    nurse = H264FirstViewer(state.video, "nurse")
    try:
        await provider_waits(provider, base_url, link_path)
        await nurse.join("nurse", visit=encounter_id)
        yield provider, problems, encounter_id, nurse
    finally:
        with contextlib.suppress(Exception):
            await nurse.close()
        await context.close()


def provider_of(client: Client) -> str:
    """The provider's participant id, as ``client`` was told it."""
    participant: str = next(
        m["participant"]
        for m in client.received
        if m["type"] == "participant" and m["role"] == "provider"
    )
    return participant


def assert_forwarded(relay: ForwardingRelay, *viewers: str) -> None:
    """H.264 in, and out to ``viewers`` as it came: nothing decoded or encoded."""
    assert relay.mime_type.lower() == "video/h264"
    stats = relay.stats
    assert stats.frames_in > 0
    assert stats.keyframes_in >= 1  # an IDR or SPS recognised
    assert stats.frames_wrong_codec == 0
    assert (stats.transcoded_viewers, stats.decoders_created, stats.encoders_created) == (0, 0, 0)
    assert relay.decoder is None
    assert relay.encoders == {}
    for viewer in viewers:
        assert stats.viewers[viewer].transcoded_to is None
        assert stats.viewers[viewer].frames_out > 0


async def test_chromium_publishing_h264_is_forwarded_to_an_aiortc_viewer(
    video_app: tuple[str, AppState], store: Store, media_browser: Any
) -> None:
    _, state = video_app
    async with provider_in_room(video_app, store, media_browser, h264=True) as room:
        provider, problems, encounter_id, nurse = room
        provider_id = provider_of(nurse)
        await nurse.send(type="admit", participant=provider_id)
        await wait_for(lambda: nurse.video[provider_id] >= 60, 30, "60 frames at the nurse")
        assert await provider.evaluate("window.__h264Offered") >= 1

        # The publish leg: the codec the box's answer to the page put first (``set_codec``
        # on the relay), and the page's own outbound-rtp, are H.264 packetization-mode 1.
        relay = state.video.relays(encounter_id, provider_id)[MediaKind.VIDEO]
        assert relay.codec.mimeType.lower() == "video/h264"
        assert str(relay.codec.parameters.get("packetization-mode")) == "1"
        sent = await provider.evaluate(VIDEO_CODECS)
        assert [c[1].lower() for c in sent if c[0] == "outbound-rtp"] == ["video/h264"], sent

        # Forwarded to the nurse, who answered H.264 first and decodes it.
        assert_forwarded(relay, nurse.id)
        [nurse_pc] = nurse.subscriptions.values()
        answered = negotiated_codec(nurse_pc, "video")
        assert answered is not None
        assert answered.mimeType.lower() == "video/h264"
        assert nurse.errors() == []
        assert problems == []


async def test_an_aiortc_h264_publisher_is_forwarded_to_the_chromium_page(
    video_app: tuple[str, AppState], store: Store, media_browser: Any
) -> None:
    _, state = video_app
    async with provider_in_room(video_app, store, media_browser, h264=False) as room:
        provider, problems, encounter_id, nurse = room
        patient = H264Publisher(state.video, "patient")
        try:
            await patient.join("patient", visit=encounter_id)
            provider_id = provider_of(nurse)
            for participant in (provider_id, patient.id):
                await nurse.send(type="admit", participant=participant)
            await patient.publish()
            await decoded_at_least(provider, patient.id, 60)

            relay = state.video.relays(encounter_id, patient.id)[MediaKind.VIDEO]
            assert_forwarded(relay, provider_id, nurse.id)
            codecs = await provider.evaluate(VIDEO_CODECS)
            received = [c for c in codecs if c[0] == "inbound-rtp"]
            # One inbound video stream, the patient's (the nurse publishes nothing): H.264.
            assert [c[1].lower() for c in received] == ["video/h264"], codecs
            assert "packetization-mode=1" in received[0][2]
            # The page's own camera went out as video.js offers it: VP8, forwarded too.
            assert [c[1].lower() for c in codecs if c[0] == "outbound-rtp"] == ["video/vp8"]
            assert nurse.errors() + patient.errors() == []
            assert problems == []
        finally:
            with contextlib.suppress(Exception):
                await patient.close()
