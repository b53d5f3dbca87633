"""The audio-only notice in Chromium: the provider page's link squeezed, then cleared.

The app as served, with the site's default ``[video]`` settings (2500 kbit/s uplink, audio
only under 150 kbit/s). The provider is in Chromium on the visit link's page, over the real
route; the nurse (admitting) and the patient are aiortc peers of the app's own video
service, the patient sending 640x480 VP8 with a band of noise (``LargeNumberedVideoTrack``,
~0.6 Mbit/s, as in tests/video/test_wan.py). Playwright passes the provider page's
WebSocket through, message by message and in order, rewriting only the ICE candidates of
the box's subscribe offers and those the page gives for its answers (in the answer, or
trickled after it as ``candidate`` messages, held until the page's last), so that every
datagram between the box and the page's subscribe connection crosses a ``LossyLink``
(tests/video/lossy_proxy.py) with a bottleneck that can be set. Nothing else is faked: the box's WAN leg decides from
Chromium's own REMB and receiver reports.

Squeezed to 100 kbit/s, the box pauses the patient's video to the provider and the page
shows the calm notice over the patient's tile (a ``status`` live region), which passes axe;
cleared, the box's probe restores the video and the notice goes. A screenshot of the notice
goes to ``APPLIANCE_SCREENSHOTS`` as ``pause-notice.png`` when that is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.store import Store
from services.video.rooms import MediaKind
from tests.e2e.live_server import watch_problems
from tests.e2e.test_accessibility_e2e import AXE, Axe
from tests.e2e.test_video_e2e import _arrived_patient
from tests.e2e.video_call import (
    decoded_at_least,
    frames_decoded,
    issue_link,
    provider_waits,
)
from tests.video.lossy_proxy import CANDIDATE, LossyLink, host_candidates
from tests.video.peers import wait_for
from tests.video.test_loss import LargeNumberedVideoTrack
from tests.video.test_service import Client
from web.app import AppState

pytestmark = pytest.mark.slow

NOTICE = "Video paused: weak connection. Audio continues."
SQUEEZE_BPS = 100_000  # well under the default 150 kbit/s threshold, as test_wan.py's


class SqueezableSignalling:
    """The provider page's signalling, passed through in order; the box's subscribe offers
    and the page's answers and candidates for them are rewritten so that each subscribe
    connection's datagrams cross a ``LossyLink`` of its own (``links``, by ``pc``)."""

    def __init__(self) -> None:
        self.links: dict[str, LossyLink] = {}
        self._offers: dict[str, str] = {}  # the box's offers as it made them, by pc
        # The page's candidates for each answered pc, (section, candidate), held until its
        # empty one: then one per section goes on, behind the link's proxy.
        self._held: dict[str, list[tuple[int, str]]] = {}
        self.failures: list[BaseException] = []  # a rewrite that failed (the test fails)
        self.sockets = 0
        self._tasks: list[asyncio.Task[None]] = []

    def route(self, ws: Any) -> None:
        """``page.route_web_socket``'s handler: one socket of the page."""
        self.sockets += 1
        server = ws.connect_to_server()
        from_server: asyncio.Queue[str | bytes] = asyncio.Queue()
        from_page: asyncio.Queue[str | bytes] = asyncio.Queue()
        server.on_message(from_server.put_nowait)
        ws.on_message(from_page.put_nowait)
        self._tasks += [
            asyncio.create_task(self._pump(from_server, self._from_box, ws.send)),
            asyncio.create_task(self._pump(from_page, self._from_page, server.send)),
        ]

    async def _pump(
        self,
        queue: asyncio.Queue[str | bytes],
        rewrite: Callable[[str | bytes], Awaitable[list[str | bytes]]],
        forward: Callable[[str | bytes], None],
    ) -> None:
        while True:
            raw = await queue.get()
            try:
                for message in await rewrite(raw):
                    forward(message)
            except Exception as error:  # reported by the test, not lost in a task
                self.failures.append(error)
                forward(raw)

    async def _from_box(self, raw: str | bytes) -> list[str | bytes]:
        message = json.loads(raw)
        if message.get("type") != "offer" or not message.get("pc"):
            return [raw]
        link = LossyLink(seed=1 + 10 * len(self.links))
        self.links[message["pc"]], self._offers[message["pc"]] = link, message["sdp"]
        message["sdp"] = await link.route_offer(message["sdp"])
        return [json.dumps(message)]

    async def _from_page(self, raw: str | bytes) -> list[str | bytes]:
        message = json.loads(raw)
        pc = message.get("pc") or ""
        link = self.links.get(pc)
        if link is None:
            return [raw]
        if message.get("type") == "answer":
            # Its candidates (those Chromium had when it was sent) wait with the trickled.
            self._held[pc], message["sdp"] = _without_candidates(message["sdp"])
            return [json.dumps(message)]
        if message.get("type") != "candidate":
            return [raw]
        if message["candidate"]:
            self._held[pc].append((message.get("sdpMLineIndex") or 0, message["candidate"]))
            return []
        routed = _route_chromium_candidates(link, self._offers[pc], self._held.pop(pc))
        return [
            *(
                json.dumps({"type": "candidate", "candidate": c, "sdpMLineIndex": i, "pc": pc})
                for i, c in routed
            ),
            raw,
        ]

    def squeeze(self, bps: int | None) -> None:
        """A bottleneck of ``bps`` from the box to the page on every link (None: none)."""
        for link in self.links.values():
            link.rate_to_answerer(bps)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for link in self.links.values():
            link.close()


def _without_candidates(answer: str) -> tuple[list[tuple[int, str]], str]:
    """The answer's candidates, (section, ``candidate:…``), and the answer without them."""
    candidates, lines, section = [], [], -1
    for line in answer.split("\r\n"):
        section += line.startswith("m=")
        if line.startswith("a=candidate:"):
            candidates.append((section, line.removeprefix("a=")))
        else:
            lines.append(line)
    return candidates, "\r\n".join(lines)


def _route_chromium_candidates(
    link: LossyLink, offer: str, candidates: list[tuple[int, str]]
) -> list[tuple[int, str]]:
    """Of Chromium's candidates for one answer, (section, candidate), one UDP host
    candidate per section (loopback if it has one) behind the proxy of the box's candidate
    in that section; the others are left out: the box reaches the page only through it.

    ``LossyLink.route_answer`` pairs candidates one to one, as two aiortc peers on loopback
    give them in their SDP; Chromium trickles one per interface, TCP ones too, and accepting
    the box's BUNDLE, candidates for the first section only."""
    offered = host_candidates(offer)
    chosen: dict[int, tuple[str, str, str, str]] = {}  # section → the regex groups
    for section, candidate in candidates:
        found = CANDIDATE.match("a=" + candidate)
        if found is None:
            continue
        loopback = found.group(2) == "127.0.0.1"
        if section not in chosen or (loopback and chosen[section][1] != "127.0.0.1"):
            chosen[section] = (found.group(1), found.group(2), found.group(3), found.group(4))
    assert chosen, f"no UDP host candidate from Chromium: {candidates}"
    routed = []
    for section, (before, address, port, after) in sorted(chosen.items()):
        [proxy] = [p for p in link.proxies if p.offerer == offered[section][0]]
        proxy.answerer = (address, int(port))
        host, proxy_port = proxy.a
        routed.append((section, f"{before}{host} {proxy_port}{after}".removeprefix("a=")))
    return routed


async def test_a_squeezed_provider_page_shows_the_audio_only_notice_until_video_returns(
    video_app: tuple[str, AppState], store: Store, media_browser: Any, tmp_path: Path
) -> None:
    base_url, state = video_app
    encounter_id = await _arrived_patient(store)

    # The nurse issues the provider's link (her own video is an aiortc peer, below).
    nurse_context = await media_browser.new_context()
    nurse_page = await nurse_context.new_page()
    link_path = await issue_link(nurse_page, base_url)
    await nurse_context.close()

    signalling = SqueezableSignalling()
    provider_context = await media_browser.new_context(viewport={"width": 1280, "height": 900})
    provider = await provider_context.new_page()
    problems = watch_problems(provider)
    await provider.route_web_socket(re.compile(r".*/video$"), signalling.route)
    await provider_waits(provider, base_url, link_path)

    nurse, patient = Client(state.video, "nurse"), Client(state.video, "patient")
    try:
        await nurse.join("nurse", visit=encounter_id)
        await patient.join("patient", visit=encounter_id)
        provider_id = next(
            m["participant"]
            for m in nurse.received
            if m["type"] == "participant" and m["role"] == "provider"
        )
        for participant in (provider_id, patient.id):
            await nurse.send(type="admit", participant=participant)
        await patient.publish(LargeNumberedVideoTrack())
        tile = f"#video-tiles figure[data-publisher='{patient.id}']"
        await decoded_at_least(provider, patient.id, 30)
        remote = state.video.remote_stream(encounter_id, patient.id, provider_id)
        assert remote is not None  # the provider is a remote viewer: the WAN leg watches
        await wait_for(lambda: remote.last_remb is not None, 15, "Chromium's first REMB")
        # No notice before the squeeze. (On a loaded 2-core machine Chromium's estimator has
        # seen its own stalls as a queue and the box paused on it: then wait for the restore.)
        await provider.locator(f"{tile} .video-notice").wait_for(state="detached", timeout=60_000)

        # The provider's downlink squeezed: the box pauses the video, the page says so calmly.
        signalling.squeeze(SQUEEZE_BPS)
        notice = provider.locator(f"{tile} .video-notice")
        await notice.filter(has_text=NOTICE).wait_for(state="visible", timeout=30_000)
        assert await notice.get_attribute("role") == "status"  # a polite live region
        assert await provider.get_by_role("status").filter(has_text=NOTICE).count() == 1
        me = provider.locator(f"#video-people li[data-participant='{provider_id}']")
        assert "weak connection: audio only" in await me.inner_text()
        nurse.last("video_paused", publisher=patient.id, viewer=provider_id, paused=True)
        assert await provider.locator(f"{tile} video").is_visible()  # the tile stays
        audio = state.video.relays(encounter_id, patient.id)[MediaKind.AUDIO]
        heard = audio.stats.viewers[provider_id].frames_out
        await wait_for(  # 20 ms Opus frames
            lambda: audio.stats.viewers[provider_id].frames_out >= heard + 50,
            5,
            "audio still forwarded to the provider",
        )
        axe = Axe(AXE.read_text())
        await axe.check(provider, "provider page, video paused")
        assert axe.blocking == {}, axe.blocking
        shots = os.environ.get("APPLIANCE_SCREENSHOTS")
        target = Path(shots) if shots else tmp_path
        await provider.screenshot(path=str(target / "pause-notice.png"), full_page=False)

        # Cleared: the box's probe finds the path good again, and the notice goes.
        signalling.squeeze(None)
        # The first probe 3 s after the pause, held 3 s; on a loaded machine a probe may
        # fail on the machine's own stalls (the back-off doubles: 6, 12, 24 s).
        await notice.wait_for(state="detached", timeout=90_000)
        nurse.last("video_paused", publisher=patient.id, viewer=provider_id, paused=False)
        assert "weak connection" not in await me.inner_text()
        before = await frames_decoded(provider, patient.id)
        await decoded_at_least(provider, patient.id, before + 30)
        assert signalling.sockets == 1  # one signalling connection throughout
        assert signalling.failures == []
        assert problems == []
    finally:
        for client in (patient, nurse):
            with contextlib.suppress(Exception):
                await client.close()
        await provider_context.close()
        signalling.close()
