"""The WAN leg's decisions (services/video/bandwidth.py): pure, the clock injected."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.video.bandwidth import (
    AUDIO_ALLOWANCE_BPS,
    VIDEO_SHARE_FACTOR,
    Change,
    LinkState,
    RemoteStream,
    WanPolicy,
    budget_share,
    publisher_cap,
    send_cap_now,
)

POLICY = WanPolicy(uplink_kbps=2500, audio_only_kbps=150)


def flowing(stream: RemoteStream, start: float, end: float, bps: int, total: int = 0) -> int:
    """Feed the relay's byte counter at ``bps`` every 0.25 s over [start, end]; the new total."""
    now = start
    while now <= end + 1e-9:
        stream.sent(total, now)
        total += bps // 8 // 4
        now += 0.25
    return total


def run(
    stream: RemoteStream, start: float, end: float, bps: int | None = None, total: int = 0
) -> list[tuple[float, Change]]:
    """Step every 0.25 s over [start, end], feeding the byte counter at ``bps`` if given."""
    changes = []
    now = start
    while now <= end + 1e-9:
        if bps is not None:
            stream.sent(total, now)
            total += bps // 8 // 4
        change = stream.step(now)
        if change is not None:
            changes.append((round(now, 2), change))
        now += 0.25
    return changes


def test_a_remb_below_the_threshold_and_short_of_what_is_sent_pauses_video() -> None:
    stream = RemoteStream(POLICY, now=0.0)
    assert run(stream, 0.0, 2.0, 500_000) == []
    stream.remb(600_000, 2.0)
    assert stream.step(2.0) is None
    stream.sent(125_000, 2.25)
    stream.remb(120_000, 2.25)  # the viewer overused: 0.85 x the little that got through
    assert stream.step(2.25) is Change.PAUSE
    assert stream.state is LinkState.PAUSED
    assert not stream.carries_video
    assert stream.step(2.5) is None  # paused: nothing to do until the probe is due


def test_a_low_remb_for_a_still_picture_does_not_pause() -> None:
    # An AIMD estimate never exceeds 1.5 x what arrives: 40 kbit/s sent, ~70 reported. Even
    # a fall (overuse from a jittery CPU) is no weak path while it still carries the stream.
    stream = RemoteStream(POLICY, now=0.0)
    total = 0
    for tick in range(40):
        now = tick * 0.25
        stream.sent(total, now)
        total += 40_000 // 8 // 4
        if tick == 16:
            stream.remb(70_000, now)
        if tick == 30:
            stream.remb(34_000, now)
        assert stream.step(now) is None
    assert stream.estimate(9.0) == 34_000  # the fall voids the throughput for a window
    assert stream.estimate(9.75) == pytest.approx(40_000, rel=0.05)  # and no longer


def test_demonstrated_throughput_alone_never_pauses() -> None:
    stream = RemoteStream(POLICY, now=0.0)
    assert run(stream, 0.0, 5.0, 50_000) == []
    assert stream.throughput(5.0) == pytest.approx(50_000, rel=0.05)


def test_a_probe_that_holds_restores_video_and_one_that_congests_backs_off() -> None:
    stream = RemoteStream(POLICY, now=0.0)
    run(stream, 0.0, 2.0, 500_000)
    stream.remb(80_000, 2.0)
    assert stream.step(2.0) is Change.PAUSE
    assert stream.step(2.0 + POLICY.probe_after_s - 0.01) is None
    probe = 2.0 + POLICY.probe_after_s
    assert stream.step(probe) is Change.PROBE
    assert stream.carries_video
    assert stream.state is LinkState.PROBING

    # The path is congested still: the viewer's estimate falls again. Back off twice as long.
    total = flowing(stream, probe, probe + 2.0, 500_000)
    stream.remb(70_000, probe + 2.0)  # a fall, under what is sent
    assert stream.step(probe + 2.0) is Change.PROBE_FAILED
    assert stream.state is LinkState.PAUSED
    second = probe + 2.0 + 2 * POLICY.probe_after_s
    assert stream.step(second - 0.01) is None
    assert stream.step(second) is Change.PROBE

    # Clear now: the REMB climbs slowly from its low value, but 500 kbit/s flow without any
    # fall, so the estimate is the throughput, above 1.5 x the threshold, held for 3 s.
    stream.remb(75_000, second + 0.5)
    changes = run(stream, second + 0.25, second + 8.0, 500_000, total)
    assert [c for _, c in changes] == [Change.RESTORE]
    restored_at = changes[0][0]
    assert restored_at == pytest.approx(second + POLICY.window_s + POLICY.restore_hold_s, abs=0.3)
    assert stream.state is LinkState.VIDEO
    assert stream.estimate(second + 8.0) == pytest.approx(500_000, rel=0.05)


@pytest.mark.parametrize(
    ("fraction_lost", "rtt"), [(0.3, 0.05), (0.0, 0.35)], ids=["loss", "queueing"]
)
def test_a_probe_on_a_path_that_still_loses_or_queues_fails(
    fraction_lost: float, rtt: float
) -> None:
    stream = RemoteStream(POLICY, now=0.0)
    stream.report(0.0, 0.05, 1.0)  # the round trip before: 50 ms
    run(stream, 0.0, 2.0, 500_000)
    stream.remb(100_000, 2.0)
    assert stream.step(2.0) is Change.PAUSE
    probe = 2.0 + POLICY.probe_after_s
    assert stream.step(probe) is Change.PROBE
    # The REMB is stale (100 kbit/s from before the pause): only the reports can tell.
    total, now = 0, probe
    while stream.state is LinkState.PROBING:
        now += 0.25
        stream.sent(total, now)
        total += 500_000 // 32
        stream.remb(100_000, now)
        if now - probe >= 1.0:
            stream.report(fraction_lost, rtt, now)
        assert stream.step(now) in (None, Change.PROBE_FAILED)
    # Loss counts from the second lossy report running (one may be a keyframe's burst).
    assert now - probe == (1.25 if fraction_lost else 1.0)


def test_one_lossy_report_alone_is_no_congestion() -> None:
    stream = RemoteStream(POLICY, now=0.0)
    stream.report(0.4, 0.01, 1.0)  # a keyframe's burst overflowed a buffer
    stream.report(0.0, 0.01, 2.0)
    stream.report(0.3, 0.01, 3.0)
    assert not stream.congested(3.0)
    stream.report(0.3, 0.01, 4.0)
    assert stream.congested(4.0)
    assert stream.congestion == "loss reported"


def test_a_remb_falling_from_above_what_is_sent_is_no_congestion() -> None:
    # Right after video resumes, an AIMD estimator may report megabits, then come down.
    stream = RemoteStream(POLICY, now=0.0)
    run(stream, 0.0, 2.0, 500_000)
    stream.remb(13_800_000, 2.0)
    stream.remb(2_000_000, 2.1)
    assert not stream.congested(2.1)
    stream.remb(300_000, 2.2)
    assert stream.congested(2.2)
    assert stream.congestion == "REMB fell"


def test_a_round_trip_still_falling_after_a_squeeze_does_not_fail_the_probe() -> None:
    # aiortc smooths the round trip: once the queue drains it falls over several reports.
    stream = RemoteStream(POLICY, now=0.0)
    stream.report(0.0, 0.01, 0.5)
    run(stream, 0.0, 2.0, 500_000)
    for rtt in (0.1, 0.2, 0.3):  # the squeeze: the queue builds
        stream.report(0.0, rtt, 2.0)
    assert stream.congested(2.0)
    stream.remb(80_000, 2.0)
    assert stream.step(2.0) is Change.PAUSE
    probe = 2.0 + POLICY.probe_after_s
    assert stream.step(probe) is Change.PROBE
    total, now, rtt, changes = 0, probe, 0.3, []
    while now < probe + 8:
        now += 0.25
        stream.sent(total, now)
        total += 500_000 // 32
        if round(now * 4) % 4 == 0:  # a report a second, the smoothed round trip decaying
            rtt = 0.85 * rtt + 0.15 * 0.01
            stream.report(0.0, rtt, now)
        if (change := stream.step(now)) is not None:
            changes.append(change)
    assert changes == [Change.RESTORE]


def test_after_a_restore_the_stale_remb_neither_pauses_nor_hides_a_new_squeeze() -> None:
    stream = RemoteStream(POLICY, now=0.0)
    run(stream, 0.0, 2.0, 500_000)
    stream.remb(80_000, 2.0)
    assert stream.step(2.0) is Change.PAUSE
    probe = 2.0 + POLICY.probe_after_s
    assert stream.step(probe) is Change.PROBE
    total, now, restored_at = 0, probe, None
    for _ in range(80):  # 20 s at 500 kbit/s, the REMB stuck low
        now += 0.25
        stream.sent(total, now)
        total += 500_000 // 32
        if round(now * 4) % 2 == 0:
            stream.remb(82_000, now)
        if stream.step(now) is Change.RESTORE:
            restored_at = now
    assert restored_at is not None
    assert stream.state is LinkState.VIDEO
    # The squeeze comes back: reports show loss; video pauses again.
    stream.report(0.4, None, now)
    stream.report(0.4, None, now + 0.1)
    now += 0.25
    stream.sent(total, now)
    assert stream.step(now) is Change.PAUSE


def test_a_probe_of_a_still_picture_restores_at_what_it_sends() -> None:
    stream = RemoteStream(POLICY, now=0.0)
    run(stream, 0.0, 2.0, 500_000)
    stream.remb(100_000, 2.0)
    assert stream.step(2.0) is Change.PAUSE
    probe = 2.0 + POLICY.probe_after_s
    assert stream.step(probe) is Change.PROBE
    # 120 kbit/s (under 1.5 x the threshold) arrive without congestion: that is all it needs.
    changes = run(stream, probe + 0.25, probe + 10, 120_000)
    assert [c for _, c in changes] == [Change.RESTORE]


def test_back_off_doubles_up_to_its_maximum() -> None:
    policy = WanPolicy(probe_after_s=2, probe_max_s=5)
    stream = RemoteStream(policy, now=-2.0)
    run(stream, -2.0, 0.0, 500_000)
    stream.remb(100_000, 0.0)
    assert stream.step(0.0) is Change.PAUSE
    probes = []
    now = 0.0
    while now < 40:
        change = stream.step(now)
        if change is Change.PROBE:
            probes.append(now)
            stream.report(0.5, None, now + 0.1)  # the probe congests at once: half lost
            stream.report(0.5, None, now + 0.2)
        now = round(now + 0.25, 2)
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(probes)]
    assert probes[0] == 2.0
    assert gaps[:3] == [4.25, 5.25, 5.25]  # 4 s, then 5 s (the cap), plus a tick to fail


def test_budget_is_shared_after_the_audio_allowance() -> None:
    assert budget_share(POLICY, 1, 1) == int(VIDEO_SHARE_FACTOR * (2_500_000 - AUDIO_ALLOWANCE_BPS))
    assert (
        budget_share(POLICY, 2, 2)
        == int(VIDEO_SHARE_FACTOR * (2_500_000 - 2 * AUDIO_ALLOWANCE_BPS)) // 2
    )
    assert budget_share(POLICY, 0, 0) == int(VIDEO_SHARE_FACTOR * 2_500_000)
    assert budget_share(WanPolicy(uplink_kbps=100), 1, 5) == 0


def test_the_cap_is_the_lowest_known_estimate_within_the_share() -> None:
    assert publisher_cap(1_000_000, [None, 800_000, 400_000]) == 400_000
    assert publisher_cap(300_000, [None, 800_000]) == 300_000
    assert publisher_cap(300_000, []) == 300_000


@given(
    share=st.integers(0, 10**8),
    estimates=st.lists(st.one_of(st.none(), st.integers(0, 10**8)), max_size=6),
)
def test_a_cap_never_exceeds_the_share_or_any_known_estimate(
    share: int, estimates: list[int | None]
) -> None:
    cap = publisher_cap(share, estimates)
    assert cap <= share
    assert all(cap <= e for e in estimates if e is not None)
    assert cap in [share, *estimates]


@given(
    uplink=st.integers(100, 1_000_000),
    video=st.integers(0, 40),
    audio=st.integers(0, 40),
)
def test_the_shares_never_add_up_to_more_than_the_budget(
    uplink: int, video: int, audio: int
) -> None:
    share = budget_share(WanPolicy(uplink_kbps=uplink), video, audio)
    assert share >= 0
    assert share * video + AUDIO_ALLOWANCE_BPS * audio <= max(
        uplink * 1000, AUDIO_ALLOWANCE_BPS * audio
    )


def test_only_a_clearly_lower_cap_is_sent_at_once() -> None:
    assert send_cap_now(500_000, None)
    assert send_cap_now(400_000, 500_000)
    assert not send_cap_now(480_000, 500_000)
    assert not send_cap_now(900_000, 500_000)


@given(
    rembs=st.lists(
        st.tuples(st.floats(0, 0.5), st.integers(0, 3_000_000)), min_size=1, max_size=60
    ),
)
def test_the_state_machine_only_moves_along_its_edges(rembs: list[tuple[float, int]]) -> None:
    allowed = {
        (LinkState.VIDEO, Change.PAUSE, LinkState.PAUSED),
        (LinkState.PAUSED, Change.PROBE, LinkState.PROBING),
        (LinkState.PROBING, Change.PROBE_FAILED, LinkState.PAUSED),
        (LinkState.PROBING, Change.RESTORE, LinkState.VIDEO),
    }
    stream = RemoteStream(POLICY, now=0.0)
    now, total = 0.0, 0
    for gap, bps in rembs:
        now += gap
        stream.remb(bps, now)
        total += bps // 32
        stream.sent(total, now)
        before = stream.state
        change = stream.step(now)
        if change is None:
            assert stream.state is before
        else:
            assert (before, change, stream.state) in allowed
        # Video is never paused without a report below the threshold from the viewer.
        if change is Change.PAUSE:
            assert stream.last_remb is not None
            assert stream.last_remb < POLICY.threshold_bps


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        WanPolicy(restore_factor=0.5)
    with pytest.raises(ValueError):
        WanPolicy(probe_after_s=10, probe_max_s=5)
    with pytest.raises(ValueError):
        WanPolicy(uplink_kbps=0)


# -- a remote viewer's own b=AS / b=TIAS: a ceiling on what its publisher is capped to ------


def test_the_ceiling_bounds_the_cap_from_the_start_and_below_a_higher_estimate() -> None:
    stream = RemoteStream(POLICY, now=0.0)
    assert stream.cap_estimate(0.0) is None  # nothing known: the share alone caps
    stream.set_ceiling(200_000)
    assert stream.cap_estimate(0.0) == 200_000  # before any REMB or throughput
    total = flowing(stream, 0.0, 3.0, 600_000)
    stream.remb(900_000, 3.0)
    assert stream.estimate(3.0) == 900_000  # the path's own estimate is left as it is
    assert stream.cap_estimate(3.0) == 200_000
    assert publisher_cap(budget_share(POLICY, 1, 1), [stream.cap_estimate(3.0)]) == 200_000
    flowing(stream, 3.25, 5.0, 150_000, total)
    stream.remb(160_000, 5.0)  # a lower estimate is lower still
    assert stream.cap_estimate(5.0) == 160_000
    stream.set_ceiling(None)  # a later answer without one
    assert stream.cap_estimate(5.0) == 160_000


@pytest.mark.parametrize("declared", [0, 1, 149_999])
def test_a_ceiling_under_the_threshold_counts_as_the_threshold(declared: int) -> None:
    stream = RemoteStream(POLICY, now=0.0)
    stream.set_ceiling(declared)
    assert stream.ceiling == POLICY.threshold_bps
    assert publisher_cap(budget_share(POLICY, 1, 1), [stream.cap_estimate(0.0)]) == 150_000


def test_the_ceiling_neither_pauses_nor_keeps_a_probe_from_restoring() -> None:
    # A path that carries 600 kbit/s with no congestion: a ceiling at the threshold pauses
    # nothing (only congestion does), and a probe restores on what the path demonstrates.
    stream = RemoteStream(POLICY, now=0.0)
    stream.set_ceiling(POLICY.threshold_bps)
    assert run(stream, 0.0, 6.0, 600_000) == []
    assert stream.state is LinkState.VIDEO

    squeezed = RemoteStream(POLICY, now=0.0)
    squeezed.set_ceiling(POLICY.threshold_bps)
    total = flowing(squeezed, 0.0, 2.0, 500_000)
    squeezed.sent(total + 4_000, 2.25)
    squeezed.remb(100_000, 2.25)
    assert squeezed.step(2.25) is Change.PAUSE
    assert run(squeezed, 2.5, 5.25) == [(5.25, Change.PROBE)]
    # While probing the estimate is what the probe finds out: only the ceiling holds.
    assert squeezed.cap_estimate(5.25) == POLICY.threshold_bps
    changes = run(squeezed, 5.5, 15.0, 600_000)
    assert [change for _, change in changes] == [Change.RESTORE]
    assert squeezed.state is LinkState.VIDEO
    assert squeezed.cap_estimate(15.0) == POLICY.threshold_bps


@given(
    ceiling=st.one_of(st.none(), st.integers(0, 10**10)),
    rembs=st.lists(
        st.tuples(st.floats(0, 0.5), st.integers(0, 3_000_000)), min_size=1, max_size=40
    ),
)
def test_the_cap_never_exceeds_the_ceiling_nor_falls_under_the_threshold_for_it(
    ceiling: int | None, rembs: list[tuple[float, int]]
) -> None:
    stream = RemoteStream(POLICY, now=0.0)
    stream.set_ceiling(ceiling)
    share = budget_share(POLICY, 1, 1)
    now, total = 0.0, 0
    for gap, bps in rembs:
        now += gap
        stream.remb(bps, now)
        total += bps // 32
        stream.sent(total, now)
        stream.step(now)
        limit = stream.cap_estimate(now)
        cap = publisher_cap(share, [limit])
        estimate = stream.estimate(now) if stream.state is LinkState.VIDEO else None
        bounded = None if ceiling is None else max(ceiling, POLICY.threshold_bps)
        # The lowest of the share, the estimate and the ceiling, which alone never takes the
        # cap under the threshold (only a low estimate does).
        assert cap == min(v for v in (share, estimate, bounded) if v is not None)
        assert limit is not None or (ceiling is None and estimate is None)
