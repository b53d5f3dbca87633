"""The WAN leg end to end: the video service, real aiortc clients, the remote one behind a link.

The patient publishes 640x480@30 VP8 with a band of noise (``LargeNumberedVideoTrack``,
0.6-0.7 Mbit/s uncapped); the nurse watches on loopback (the LAN); the remote provider's
subscribe connections from the box go through ``LossyLink`` (tests/video/lossy_proxy.py),
which can put a bottleneck with a queue on the way to the provider, as a squeezed WAN
uplink does. What the provider receives is counted at that link (every datagram of the
video transport: RTP, retransmissions, RTCP).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import pytest

from services.video.bandwidth import LinkState, WanPolicy, budget_share
from services.video.forwarding import ForwardingRelay
from services.video.rooms import MediaKind
from services.video.service import VideoService
from tests.video.lossy_proxy import LossyLink
from tests.video.peers import wait_for
from tests.video.test_loss import LargeNumberedVideoTrack
from tests.video.test_service import VISIT, Client, flowing, video_service

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("loopback")]

logger = logging.getLogger(__name__)


class RemoteClient(Client):
    """A client on the WAN: every connection to the box (subscribe and publish) goes through
    a link of its own; ``set_blackhole`` cuts them all, those made meanwhile included.

    Like the page (web/static/video.js), it notices its connections failed, here when no
    video has arrived for ``FAILED_AFTER_S``, and asks the box to rebuild them: a
    ``reconnect`` message and a new publish offer, at most every ``RETRY_S``.
    """

    FAILED_AFTER_S = 2.0
    RETRY_S = 10.0

    def __init__(self, service: VideoService, name: str) -> None:
        super().__init__(service, name)
        self.links: list[LossyLink] = []
        self._link_for: dict[str, LossyLink] = {}  # offer → its link
        self.blackholed = False
        self.reconnects = 0
        self._camera_factory: Any = None

    async def route_offer(self, sdp: str) -> str:
        link = LossyLink(seed=1 + 10 * len(self.links))
        self.links.append(link)
        routed = await link.route_offer(sdp)
        link.set_blackhole(self.blackholed)
        self._link_for[sdp] = link
        return routed

    def route_answer(self, offer: str, answer: str) -> str:
        return self._link_for.pop(offer).route_answer(offer, answer)

    def set_blackhole(self, on: bool) -> None:
        """Drop everything between this client and the box, both ways (the WAN gone)."""
        self.blackholed = on
        for link in self.links:
            link.set_blackhole(on)

    def watch(self) -> None:
        """Start noticing failed connections (once the media flows)."""
        self._tasks.append(asyncio.create_task(self._watch()))

    async def _watch(self) -> None:
        last_try = 0.0
        while True:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            newest = max((times[-1] for times in self.video_times.values() if times), default=now)
            if now - newest > self.FAILED_AFTER_S and now - last_try > self.RETRY_S:
                last_try = now
                self.reconnects += 1
                await self.send(type="reconnect")
                if self.publish_pc is not None:
                    await self.publish_pc.close()
                await self.publish()

    def link(self) -> LossyLink:
        """The link of the newest subscribe connection (audio and video share its first
        transport: the client accepts the box's BUNDLE)."""
        return self.links[-1]

    async def close(self) -> None:
        await super().close()
        for link in self.links:
            link.close()


async def kbps_at_viewer(link: LossyLink, seconds: float) -> float:
    """kbit/s the link delivered to the viewer over the next ``seconds`` (every datagram)."""

    def delivered() -> int:
        return sum(proxy.to_answerer.bytes for proxy in link.proxies)

    before, start = delivered(), time.monotonic()
    await asyncio.sleep(seconds)
    return (delivered() - before) * 8 / (time.monotonic() - start) / 1000


async def kbps_into_relay(relay: ForwardingRelay, seconds: float) -> float:
    """kbit/s of encoded video the publisher sent the relay over the next ``seconds``."""
    before, start = relay.stats.bytes_in, time.monotonic()
    await asyncio.sleep(seconds)
    return (relay.stats.bytes_in - before) * 8 / (time.monotonic() - start) / 1000


async def visit(
    service: VideoService, client: Any, noise_rows: int = 16
) -> tuple[Client, Client, RemoteClient, ForwardingRelay]:
    """Nurse and patient in the visit, the patient's camera flowing to the nurse; the
    provider joined and waiting (not yet admitted)."""
    nurse, patient = client("nurse"), client("patient")
    provider = client("provider", RemoteClient)
    await nurse.join("nurse")
    await patient.join("patient")
    await provider.join("provider")
    await nurse.send(type="admit", participant=patient.id)
    await patient.publish(LargeNumberedVideoTrack(noise_rows))
    await flowing(nurse.video, patient.id, 30, seconds=20)
    return nurse, patient, provider, service.relays(VISIT, patient.id)[MediaKind.VIDEO]


BUDGET_KBPS = 500


async def test_with_the_budget_cut_the_publishers_bitrate_settles_under_it() -> None:
    service = VideoService(wan=WanPolicy(uplink_kbps=BUDGET_KBPS))
    async with video_service(service) as (service, client):
        # Little noise: aiortc's encoder can follow a cap down to its 250 kbit/s minimum.
        nurse, patient, provider, video = await visit(service, client, noise_rows=4)
        # Nobody remote yet: nothing caps the camera, which sends more than the budget.
        assert video.publisher_cap is None
        uncapped = await kbps_into_relay(video, 3.0)

        await nurse.send(type="admit", participant=provider.id)
        await flowing(provider.video, patient.id, 10, seconds=20)
        share = budget_share(service.wan, 1, 1)  # one remote video stream, one audio
        # The watcher caps at its next tick (every 0.25 s), not on admission: frames may
        # reach the viewer first (a full CI run on a fast machine saw 10 before the tick).
        await wait_for(lambda: video.publisher_cap is not None, 5, "the publisher capped")
        assert video.publisher_cap is not None
        assert video.publisher_cap <= share
        await asyncio.sleep(5.0)  # the encoder settles on its new target
        at_viewer = await kbps_at_viewer(provider.link(), 4.0)
        into_relay = await kbps_into_relay(video, 2.0)
        logger.info(
            "budget %d kbit/s: uncapped %.0f kbit/s; capped at %s bit/s: %.0f kbit/s at the "
            "remote viewer, %.0f into the relay",
            BUDGET_KBPS,
            uncapped,
            video.publisher_cap,
            at_viewer,
            into_relay,
        )
        assert uncapped > 1.3 * share / 1000, uncapped  # the cap has something to cut
        assert into_relay <= 1.1 * share / 1000, into_relay  # the publisher follows it
        # Everything the remote viewer gets, audio and headers included, fits the budget.
        assert at_viewer <= BUDGET_KBPS, at_viewer
        assert at_viewer >= 0.5 * BUDGET_KBPS, at_viewer  # capped, not starved
        # The nurse (LAN) gets the same, capped stream, and it keeps coming.
        await flowing(nurse.video, patient.id, 30, seconds=5)
        assert provider.errors() == nurse.errors() == []


async def test_a_squeezed_link_goes_audio_only_and_video_comes_back_when_it_clears() -> None:
    # The first probe 5 s after the pause: after the checks below, which must see no video.
    service = VideoService(wan=WanPolicy(uplink_kbps=2500, audio_only_kbps=150, probe_after_s=5))
    async with video_service(service) as (service, client):
        nurse, patient, provider, _video = await visit(service, client)
        await nurse.send(type="admit", participant=provider.id)
        await flowing(provider.video, patient.id, 30, seconds=20)
        remote = service.remote_stream(VISIT, patient.id, provider.id)
        assert remote is not None
        # aiortc's estimator reports after 3 s of media.
        await wait_for(lambda: remote.last_remb is not None, 10, "the viewer's first REMB")
        assert remote.state is LinkState.VIDEO

        squeezed_at = time.monotonic()
        provider.link().rate_to_answerer(100_000)
        await wait_for(
            lambda: any(m["type"] == "video_paused" for m in provider.received),
            20,
            "video paused",
        )
        paused_after, paused_remb = time.monotonic() - squeezed_at, remote.last_remb
        message = provider.last("video_paused")
        assert message == {
            "type": "video_paused",
            "publisher": patient.id,
            "viewer": provider.id,
            "paused": True,
        }
        nurse.last("video_paused", paused=True)  # the room is told
        await asyncio.sleep(1.0)  # frames already queued at the bottleneck drain
        frames = provider.video[patient.id]
        await flowing(provider.audio, patient.id, 50, seconds=5)  # audio goes on
        assert provider.video[patient.id] <= frames + 2  # video does not
        await flowing(nurse.video, patient.id, 30, seconds=5)  # nor does the LAN stop

        # Still squeezed: the first probe (5 s after the pause) must find out and fail.
        await wait_for(
            lambda: remote.probes == 1 and remote.state is LinkState.PAUSED,
            20,
            "a failed probe",
        )
        failed_because = remote.congestion
        assert not any(m["type"] == "video_paused" and not m["paused"] for m in provider.received)

        cleared_at = time.monotonic()
        provider.link().rate_to_answerer(None)
        await wait_for(
            lambda: any(m["type"] == "video_paused" and not m["paused"] for m in provider.received),
            # The next probe comes 10 s after the failed one; on a loaded machine a probe can
            # fail again on the machine's own stalls (the back-off then doubles: 20, 30 s),
            # so allow four probes. Typical: restored 15 s after the squeeze ends.
            100,
            "video restored",
        )
        restored_after = time.monotonic() - cleared_at
        await flowing(provider.video, patient.id, 30, seconds=10)
        logger.info(
            "squeeze to 100 kbit/s: paused after %.1f s (REMB %s); a probe while squeezed failed "
            "(%s); cleared: restored after %.1f s (probes %d)",
            paused_after,
            paused_remb,
            failed_because,
            restored_after,
            remote.probes,
        )
        assert remote.state is LinkState.VIDEO
        assert provider.errors() == []


def window(times: list[float], start: float, end: float) -> tuple[float, float]:
    """fps over [start, end] and the longest wait for a frame in ms (the edges count)."""
    inside = [t for t in times if start <= t <= end]
    edges = [start, *inside, end]
    longest = max(b - a for a, b in itertools.pairwise(edges))
    return (len(inside) - 1) / (inside[-1] - inside[0]), longest * 1000


async def test_a_dropped_wan_leg_comes_back_without_a_new_call_while_the_lan_never_stalls() -> None:
    async with video_service() as (service, client):
        nurse, patient = client("nurse"), client("patient")
        provider = client("provider", RemoteClient)
        for each, role in ((nurse, "nurse"), (patient, "patient"), (provider, "provider")):
            await each.join(role)
        for each in (patient, provider):
            await nurse.send(type="admit", participant=each.id)
        for each in (nurse, patient, provider):
            await each.publish()
        pairs = [(a, b) for a in (nurse, patient, provider) for b in (nurse, patient, provider)]
        for viewer, publisher in pairs:
            if viewer is not publisher:
                await flowing(viewer.video, publisher.id, 30, seconds=30)
        provider_id = provider.id
        assert service.connections(VISIT) == 9  # three publish, six subscribe
        local_connections = {
            each.name: (dict(each.subscriptions), each.publish_pc) for each in (nurse, patient)
        }
        provider.watch()
        await asyncio.sleep(1.0)

        start = time.monotonic()
        provider.set_blackhole(True)
        await asyncio.sleep(5.0)
        provider.set_blackhole(False)
        lifted = time.monotonic()
        for viewer, publisher in pairs:
            if viewer is not publisher and provider in (viewer, publisher):
                await flowing(viewer.video, publisher.id, 30, seconds=40)
        back_after = time.monotonic() - lifted
        await asyncio.sleep(1.0)
        end = time.monotonic()

        figures = {
            f"{viewer.name}<-{publisher.name}": window(viewer.video_times[publisher.id], start, end)
            for viewer, publisher in ((nurse, patient), (patient, nurse))
        }
        logger.info(
            "WAN leg blackholed 5 s: back %.1f s after, %d reconnect(s); local legs "
            "(fps, longest wait ms) %s",
            back_after,
            provider.reconnects,
            {k: (round(f, 2), round(g)) for k, (f, g) in figures.items()},
        )
        # Typically 50-85 ms; once, in a full CI run, both local directions waited ~520 ms
        # at the same moment: this one interpreter also runs the remote client's own
        # rebuild (its new connections, ICE, DTLS) beside the box's, which on the box would
        # be another machine. A second or more would be a call visibly interrupted.
        for name, (fps, longest_ms) in figures.items():
            assert fps >= 29.5, (name, figures)
            assert longest_ms <= 1000, (name, figures)
        # The same visit: nobody left or joined, the provider kept its id; the box holds the
        # same number of connections (the replaced ones closed).
        assert provider.id == provider_id
        assert provider.reconnects >= 1
        # Only the provider's connections were replaced: the nurse's and the patient's
        # (their views of the provider included) are the very same peer connections.
        for each in (nurse, patient):
            assert (dict(each.subscriptions), each.publish_pc) == local_connections[each.name]
        assert all(m["type"] not in ("left", "participant") for m in nurse.received[3:])
        assert service.connections(VISIT) == 9
        assert nurse.errors() + patient.errors() + provider.errors() == []
        assert nurse.unreadable == patient.unreadable == provider.unreadable == 0
