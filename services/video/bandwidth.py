"""The WAN leg's bandwidth decisions: publisher caps, audio-only fallback and restore. Pure.

The box's uplink carries one copy of a publisher's video per remote viewer (the remote
provider, on the WAN; the nurse and the patient station are on the LAN). Each remote
viewer's receiver estimates what its path can take and reports it as REMB (aiortc's
``RemoteBitrateEstimator``, Chromium's receive-side estimator: both are AIMD over the
delay gradient). From those reports and a configured uplink budget this module decides:

* **the cap of each publisher**: the lowest estimate among the remote viewers of its
  video, bounded by the uplink budget shared among the remote video streams (after an
  allowance per remote audio stream). The relay tells the publisher as REMB;
* **audio-only fallback**: a remote stream whose estimate falls below the threshold, on a
  path that is congested (not merely carrying a still picture), stops carrying video
  (audio goes on);
* **restore**: while video is paused the viewer's estimate cannot rise (an AIMD estimate
  only moves when media arrives, and is capped at 1.5 times what arrives), so after a
  back-off the relay *probes*: video is forwarded again without telling anyone. The probe
  succeeds when the estimate stays at or above threshold x ``restore_factor`` (or all the
  stream sends, if less) for ``restore_hold_s``; any congestion signal during the probe ends
  it, and the back-off doubles.

The estimate of a stream is the larger of its last REMB and the throughput it
*demonstrated*: the bytes the relay forwarded over the last ``window_s``, counted only when
the path showed no congestion in that window (``RemoteStream`` says what counts) and video
flowed throughout. Without it a viewer just out of
congestion would stay paused for many seconds: its REMB climbs back by at most 8 % a second
(aiortc's ``AimdRateControl``). See docs/video.md, "The WAN leg".

A remote viewer's own ``b=AS`` / ``b=TIAS`` (its answer's SDP: ``sdp_bandwidth``) is a
ceiling on what its publisher is capped to.

Time is a parameter (``now``, seconds, monotonic); no I/O.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

DEFAULT_UPLINK_KBPS = 2500
DEFAULT_AUDIO_ONLY_KBPS = 150
# Per remote audio stream: aiortc's Opus encoder runs at 96 kbit/s, plus ~20 kbit/s of
# RTP, SRTP and UDP/IP headers at 50 packets a second (a browser's Opus takes ~50 in all).
AUDIO_ALLOWANCE_BPS = 120_000
# What a video stream's share may ask of the encoder: its target is payload, and headers
# (~5 % at these rates) and its overshoot (aiortc's libvpx allows 15 %) come on top.
VIDEO_SHARE_FACTOR = 0.85
# A REMB below 95 % of the previous one: the receiver saw overuse (AIMD's decrease is to
# 85 % of the measured rate; increases and holds never lower it).
REMB_FALL = 0.95
# A REMB below this share of what the relay forwards: the path delivers clearly less than
# it is given (an AIMD estimate starts at, and climbs above, what arrives unless it overuses).
CONGESTED_RATIO = 0.75
# Receiver reports: more lost than this in two reports running is congestion (one alone may
# be a keyframe's burst overflowing a receive buffer: aiortc paces nothing); so is a round
# trip that grew by RTT_STEP_S since the last report and stands RTT_RISE_S over the least
# seen (a queue building at the bottleneck). aiortc's sender smooths its round trip (0.85
# old, 0.15 new), so after a queue drains the figure falls for seconds: falling never counts.
LOSS_LIMIT = 0.1
RTT_STEP_S = 0.02
RTT_RISE_S = 0.1
# A cap lowered by more than this is sent to the publisher at once; smaller moves ride on
# the next regular REMB (every 0.5 s from aiortc's estimator).
CAP_CHANGE = 0.05
# A bandwidth line in an SDP (RFC 4566 5.8 ``b=AS:<kbit/s>``, RFC 3890 ``b=TIAS:<bit/s>``):
# ASCII digits only (eleven at most), at most 10 Gbit/s; anything else is ignored.
MAX_SDP_BANDWIDTH_BPS = 10_000_000_000
_SDP_BANDWIDTH_VALUE = re.compile(r"[0-9]{1,11}")
_SDP_BANDWIDTH_UNIT = {"AS": 1000, "TIAS": 1}


class LinkState(StrEnum):
    """Whether a remote stream carries video."""

    VIDEO = "video"
    PAUSED = "paused"  # audio only; the clients were told
    PROBING = "probing"  # video forwarded again to test the path; the clients still see paused


class Change(StrEnum):
    """What ``RemoteStream.step`` asks the relay (and the clients) to do."""

    PAUSE = "pause"  # stop forwarding video; tell the clients
    PROBE = "probe"  # forward video again, quietly, asking for a keyframe
    PROBE_FAILED = "probe_failed"  # stop forwarding video again; the clients already know
    RESTORE = "restore"  # the probe held: tell the clients video is back


@dataclass(frozen=True, slots=True)
class WanPolicy:
    """The site's WAN settings (``[video]`` in the site config) and the timings around them."""

    uplink_kbps: int = DEFAULT_UPLINK_KBPS
    audio_only_kbps: int = DEFAULT_AUDIO_ONLY_KBPS
    restore_factor: float = 1.5  # hysteresis: restore only well above the threshold
    restore_hold_s: float = 3.0
    probe_after_s: float = 3.0  # the first probe after a pause; doubles after each failure
    probe_max_s: float = 30.0
    window_s: float = 2.0  # throughput is measured over this long

    def __post_init__(self) -> None:
        if self.uplink_kbps <= 0 or self.audio_only_kbps <= 0:
            raise ValueError("uplink_kbps and audio_only_kbps must be positive")
        if self.restore_factor < 1.0:
            raise ValueError("restore_factor must be at least 1")
        if not 0 < self.probe_after_s <= self.probe_max_s or self.window_s <= 0:
            raise ValueError("need 0 < probe_after_s <= probe_max_s and window_s > 0")

    @property
    def threshold_bps(self) -> int:
        return self.audio_only_kbps * 1000

    @property
    def restore_bps(self) -> float:
        return self.threshold_bps * self.restore_factor


class RemoteStream:
    """One publisher's video to one remote viewer: its estimate and whether it carries video.

    Feed it every REMB the viewer sends (``remb``), every receiver report (``report``: the
    loss and round trip the viewer's RTCP gives the relay's sender) and, regularly, the
    relay's running count of bytes forwarded to the viewer (``sent``); ``step`` says what to
    change, if anything.

    A low REMB alone is not a weak path: an AIMD estimate never exceeds 1.5 times what
    arrives, so a still picture at 40 kbit/s is reported at ~70. The path is **congested**
    when a REMB falls (AIMD lowers its estimate only on overuse) to under what the relay
    forwards, or sits well below it (``CONGESTED_RATIO``); when the viewer reports more than
    ``LOSS_LIMIT`` lost in two reports running; or when the round trip is growing and
    stands ``RTT_RISE_S`` over the least seen (a queue building at the bottleneck). Video
    pauses when the path is congested, the estimate is under the threshold, and the stream
    needs more than the path gives (it sends at least the threshold, or more than the REMB
    by that ratio).

    After a pause the viewer's REMB is stale (it moves only when media arrives, by at most
    8 % a second up): it is ignored until it falls (then it measures what arrives) or
    reaches the restore level, and the probe is judged on the other signals.
    """

    def __init__(self, policy: WanPolicy, now: float) -> None:
        self.policy = policy
        self.state = LinkState.VIDEO
        self.last_remb: int | None = None
        self.min_rtt: float | None = None
        self._last_rtt: float | None = None
        self._lossy_before = False
        self.congestion = ""  # what last signalled congestion (for the logs)
        self._remb_stale = False
        self._congested_at: float | None = None
        self._flowing_since = now  # start of the current video (or probe) period
        self._sent: deque[tuple[float, int]] = deque()
        self._good_since: float | None = None
        self._backoff = policy.probe_after_s
        self._probe_at: float | None = None
        self.pauses = 0
        self.probes = 0
        self.ceiling: int | None = None  # the viewer's own b=AS / b=TIAS (``set_ceiling``)

    @property
    def carries_video(self) -> bool:
        """Whether video is forwarded now (a probe forwards it too)."""
        return self.state is not LinkState.PAUSED

    def remb(self, bps: int, now: float) -> None:
        """The viewer reported its estimate for this stream."""
        fell = self.last_remb is not None and bps < REMB_FALL * self.last_remb
        if self._remb_stale and (fell or bps >= self.policy.restore_bps):
            self._remb_stale = False
        sent = self.sent_rate(now)
        if fell and sent is not None and bps < sent:
            # A fall from a figure above what is sent is no congestion: right after video
            # resumes, an AIMD estimator measures its first burst over a short window and
            # may report megabits, then come down.
            self._congest("REMB fell", now)
        elif not self._remb_stale and self._short_of_sent(bps, now):
            self._congest("REMB short of what is sent", now)
        self.last_remb = bps

    def report(self, fraction_lost: float, rtt: float | None, now: float) -> None:
        """A receiver report from the viewer: the fraction lost since the last, the round trip.

        Reports made while video is paused are about the time before (or about nothing).
        """
        if self.state is LinkState.PAUSED:
            return
        lossy = fraction_lost > LOSS_LIMIT
        if lossy and self._lossy_before:
            self._congest("loss reported", now)
        self._lossy_before = lossy
        if rtt is not None:
            self.min_rtt = rtt if self.min_rtt is None else min(self.min_rtt, rtt)
            rising = self._last_rtt is not None and rtt > self._last_rtt + RTT_STEP_S
            if rising and rtt > self.min_rtt + RTT_RISE_S:
                self._congest("round trip rising", now)
            self._last_rtt = rtt

    def sent(self, total_bytes: int, now: float) -> None:
        """The relay's running count of bytes forwarded to the viewer, read at ``now``."""
        self._sent.append((now, total_bytes))
        horizon = now - self.policy.window_s
        while len(self._sent) > 1 and self._sent[1][0] <= horizon:
            self._sent.popleft()

    def sent_rate(self, now: float) -> int | None:
        """Bits per second the relay forwarded over the last window (None: too few readings)."""
        if not self._sent:
            return None
        first_time, first_bytes = self._sent[0]
        last_time, last_bytes = self._sent[-1]
        if first_time > now - 0.75 * self.policy.window_s or last_time <= first_time:
            return None
        return int((last_bytes - first_bytes) * 8 / (last_time - first_time))

    def congested(self, now: float) -> bool:
        """Whether the path showed congestion within the last window."""
        return self._congested_at is not None and self._congested_at >= now - self.policy.window_s

    def throughput(self, now: float) -> int | None:
        """Bits per second forwarded over the last window, if the path showed no congestion."""
        if self.state is LinkState.PAUSED or self._flowing_since > now - self.policy.window_s:
            return None
        return None if self.congested(now) else self.sent_rate(now)

    def estimate(self, now: float) -> int | None:
        """What the path to the viewer is thought to carry (bit/s); None until known."""
        remb = None if self._remb_stale else self.last_remb
        values = [v for v in (remb, self.throughput(now)) if v is not None]
        return max(values) if values else None

    def set_ceiling(self, bps: int | None) -> None:
        """The viewer's SDP says it takes at most ``bps`` (``sdp_bandwidth``; None: no limit).

        A ceiling under the audio-only threshold counts as the threshold: below it the rule
        is audio only, which congestion decides (``step``), not a line in an SDP, and a cap
        of 0 would starve the video without the room being told. The ceiling bounds the
        cap (``cap_estimate``) and nothing else: pauses, probes and restores go on the
        path's own signals.
        """
        self.ceiling = None if bps is None else max(bps, self.policy.threshold_bps)

    def cap_estimate(self, now: float) -> int | None:
        """What this viewer lets its publisher send (bit/s; None: no limit known): its
        estimate, within its ceiling; the ceiling alone until an estimate is known. While
        probing, the estimate is what the probe is finding out: only the ceiling holds."""
        estimate = self.estimate(now) if self.state is LinkState.VIDEO else None
        known = [v for v in (estimate, self.ceiling) if v is not None]
        return min(known) if known else None

    def step(self, now: float) -> Change | None:
        """Advance the state machine; the change to make now, if any."""
        policy = self.policy
        if self.state is LinkState.VIDEO:
            if self._weak(now):
                return self._pause(now, Change.PAUSE)
            return None
        if self.state is LinkState.PAUSED:
            assert self._probe_at is not None
            if now < self._probe_at:
                return None
            self.state = LinkState.PROBING
            self.probes += 1
            self._flowing_since, self._good_since = now, None
            self._remb_stale = True
            self._lossy_before = False
            self._sent.clear()
            return Change.PROBE
        # Probing: any congestion fails it; the throughput demonstrated must reach
        # threshold x restore_factor, or all the stream sends if that is less (a still
        # picture), and hold there.
        if self._congested_at is not None and self._congested_at >= self._flowing_since:
            return self._fail_probe(now)
        estimate, sent = self.estimate(now), self.sent_rate(now)
        needed = policy.restore_bps if sent is None else min(policy.restore_bps, 0.9 * sent)
        if estimate is None or self.throughput(now) is None or estimate < needed:
            self._good_since = None
            limit = policy.window_s + 2 * policy.restore_hold_s
            return self._fail_probe(now) if now - self._flowing_since > limit else None
        if self._good_since is None:
            self._good_since = now
        if now - self._good_since >= policy.restore_hold_s:
            self.state = LinkState.VIDEO
            self._backoff = policy.probe_after_s
            return Change.RESTORE
        return None

    def _weak(self, now: float) -> bool:
        """Congested, under the threshold, and the stream wants more than the path gives."""
        if not self.congested(now) or self._flowing_since > now - self.policy.window_s:
            return False
        threshold = self.policy.threshold_bps
        if (self.estimate(now) or 0) >= threshold:
            return False
        sent = self.sent_rate(now)
        remb = None if self._remb_stale else self.last_remb
        return sent is not None and (
            sent >= threshold or (remb is not None and remb < CONGESTED_RATIO * sent)
        )

    def _congest(self, why: str, now: float) -> None:
        self._congested_at, self.congestion = now, why

    def _short_of_sent(self, remb: int, now: float) -> bool:
        sent = self.sent_rate(now)
        return sent is not None and remb < CONGESTED_RATIO * sent

    def _pause(self, now: float, change: Change) -> Change:
        self.state = LinkState.PAUSED
        self.pauses += change is Change.PAUSE
        self._probe_at = now + self._backoff
        self._sent.clear()
        return change

    def _fail_probe(self, now: float) -> Change:
        self._backoff = min(self.policy.probe_max_s, 2 * self._backoff)
        return self._pause(now, Change.PROBE_FAILED)


def budget_share(policy: WanPolicy, video_streams: int, audio_streams: int) -> int:
    """Encoder bit/s for each remote video stream: the budget after the audio allowance,
    less the packet overhead, shared equally."""
    spare = policy.uplink_kbps * 1000 - AUDIO_ALLOWANCE_BPS * audio_streams
    return max(0, int(VIDEO_SHARE_FACTOR * spare) // max(1, video_streams))


def publisher_cap(share: int, estimates: Iterable[int | None]) -> int:
    """A publisher's cap: the lowest known estimate among its remote viewers, within ``share``."""
    known = [e for e in estimates if e is not None]
    return min([share, *known])


def send_cap_now(cap: int, last_sent: int | None) -> bool:
    """Whether a new cap must reach the publisher now rather than with the next regular REMB."""
    return last_sent is None or cap < (1 - CAP_CHANGE) * last_sent


@dataclass(frozen=True, slots=True)
class SdpBandwidth:
    """The bandwidth an SDP gives one kind of media (``sdp_bandwidth``)."""

    bps: int | None  # None: no usable bandwidth line
    ignored: tuple[str, ...] = ()  # why lines were ignored: fixed texts, for the logs


def sdp_bandwidth(sdp: str, kind: str = "video") -> SdpBandwidth:
    """The ceiling an SDP's bandwidth lines put on its first ``kind`` m-section, in bit/s.

    ``b=TIAS:<bit/s>`` (RFC 3890) wins over ``b=AS:<kbit/s>`` (RFC 4566) when both are
    there; the media section's lines win over the session's (before the first ``m=``),
    which apply only when it has none. Several of one type: the lowest. A value is one to
    eleven ASCII digits and at most ``MAX_SDP_BANDWIDTH_BPS``; anything else in an ``AS`` or
    ``TIAS`` line (or a ``b=`` line without a type) is ignored and said so in ``ignored``.
    Other types (CT, RR, RS) are not ceilings on one stream: skipped. Zero is returned as
    zero (``RemoteStream.set_ceiling`` decides what it means). Never raises.
    """
    found: dict[str, dict[str, list[int]]] = {"session": {}, "media": {}}
    ignored: list[str] = []
    section: str | None = "session"
    seen_kind = False
    for raw in sdp.split("\n"):
        line = raw.removesuffix("\r")
        if line.startswith("m="):
            is_kind = not seen_kind and line[2:].split(" ", 1)[0] == kind
            seen_kind = seen_kind or is_kind
            section = "media" if is_kind else None
            continue
        if section is None or not line.startswith("b="):
            continue
        bwtype, colon, value = line[2:].partition(":")
        if not colon:
            ignored.append("a bandwidth line without a type")
            continue
        unit = _SDP_BANDWIDTH_UNIT.get(bwtype)
        if unit is None:
            continue
        if not _SDP_BANDWIDTH_VALUE.fullmatch(value) or int(value) * unit > MAX_SDP_BANDWIDTH_BPS:
            ignored.append(f"b={bwtype} is not a whole number up to 10 Gbit/s")
            continue
        found[section].setdefault(bwtype, []).append(int(value) * unit)
    for level in ("media", "session"):
        for bwtype in ("TIAS", "AS"):
            if values := found[level].get(bwtype):
                return SdpBandwidth(min(values), tuple(ignored))
    return SdpBandwidth(None, tuple(ignored))
