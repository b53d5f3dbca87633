"""The sync lease: one sender at a time per store, and a wait after a holder that died.

The lease is an ``flock`` on a real file beside a real database; two ``open()`` of it in one
process exclude each other as two processes do. The kill -9 is a real one, of a real child
process holding the lease. The rounds run against the real Medplum peer.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from appliance.errors import StoreError
from appliance.store import Store
from sync_agent.lease import SyncLease, lock_path
from sync_agent.process import SyncLoop, Wake
from sync_agent.upstream import FHIR_JSON
from tests.fhir_peer.peer import FhirPeer
from tests.sync_agent.test_faults import _loop_ctx, _readings
from tests.sync_agent.test_outbox_delivery import _states

NOON = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime = NOON) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _content(db_path: Path) -> bytes:
    return lock_path(db_path).read_bytes()


# -- the lease alone --------------------------------------------------------------------------


async def test_a_second_holder_is_kept_out_until_the_first_round_ends(db_path: Path) -> None:
    first, second = (SyncLease(db_path, unsure_s=30) for _ in range(2))
    async with first.round() as turn:
        assert turn is not None
        async with second.round() as other:
            assert other is None  # held: the round is skipped
        assert _content(db_path).startswith(b"round %d " % os.getpid())
    assert _content(db_path) == b""  # ended cleanly
    async with second.round() as other:
        assert other is not None
        assert (other.crashed, other.unsure_until, other.wait_s) == (False, None, 0.0)


async def test_a_holder_to_be_that_waits_gets_the_lease_when_the_round_under_way_ends(
    db_path: Path,
) -> None:
    first, second = SyncLease(db_path, unsure_s=30), SyncLease(db_path, unsure_s=30)
    told: list[float] = []
    order: list[str] = []

    async def waiting() -> None:
        async with second.round(wait=True, on_wait=lambda: told.append(time.monotonic())) as t:
            assert t is not None
            order.append("second")

    async with first.round():
        task = asyncio.create_task(waiting())
        await asyncio.sleep(0.5)
        assert not task.done()
        order.append("first ends")
    await asyncio.wait_for(task, 5)
    assert order == ["first ends", "second"]
    assert len(told) == 1  # told once, not at every try


async def test_a_round_ended_by_an_exception_makes_the_next_holder_wait_the_request_timeout(
    db_path: Path,
) -> None:
    clock = Clock()
    lease = SyncLease(db_path, unsure_s=30, clock=clock)
    with pytest.raises(StoreError):
        async with lease.round():
            raise StoreError("database or disk is full")
    assert _content(db_path).startswith(b"round ")
    clock.now = NOON + timedelta(minutes=5)
    async with lease.round() as turn:
        assert turn is not None
        assert turn.crashed
        assert turn.unsure_until == clock.now + timedelta(seconds=30)
        assert turn.wait_s == 30.0
        clock.now += timedelta(seconds=10)  # stopped before the wait was over
    # The wait not over is passed on: the next holder (sync once, say) keeps it.
    assert (
        _content(db_path)
        == b"hold %s\n" % (NOON + timedelta(minutes=5, seconds=30)).isoformat().encode()
    )
    async with lease.round() as turn:
        assert turn is not None
        assert not turn.crashed
        assert turn.unsure_until == NOON + timedelta(minutes=5, seconds=30)
        assert turn.wait_s == 20.0
        clock.now = NOON + timedelta(minutes=6)  # this time it was waited out
    assert _content(db_path) == b""
    async with lease.round() as turn:
        assert turn is not None
        assert turn.unsure_until is None


@pytest.mark.parametrize(
    "content",
    [b"rou", b"hold", b"hold yesterday\n", b"hold 2026-11-30T12:00:00\n", b"\x00\x00\x00"],
    ids=["torn", "hold-no-time", "hold-not-a-time", "hold-naive", "nul"],
)
async def test_a_file_that_says_nothing_readable_counts_as_a_round_that_did_not_end(
    db_path: Path, content: bytes
) -> None:
    lock_path(db_path).write_bytes(content)
    clock = Clock()
    async with SyncLease(db_path, unsure_s=7, clock=clock).round() as turn:
        assert turn is not None
        assert (turn.crashed, turn.unsure_until) == (True, NOON + timedelta(seconds=7))


async def test_a_hold_far_ahead_a_clock_set_back_is_cut_to_one_request_timeout(
    db_path: Path,
) -> None:
    lock_path(db_path).write_bytes(b"hold 2027-01-01T00:00:00+00:00\n")
    async with SyncLease(db_path, unsure_s=30, clock=Clock()).round() as turn:
        assert turn is not None
        assert turn.unsure_until == NOON + timedelta(seconds=30)


async def test_a_lock_file_that_cannot_be_opened_is_a_store_error_saying_which(
    tmp_path: Path,
) -> None:
    lease = SyncLease(tmp_path / "missing" / "appliance.db", unsure_s=30)
    with pytest.raises(
        StoreError, match=r"cannot open the sync lock file .*appliance\.db\.sync-lock"
    ):
        async with lease.round():
            pass


async def test_a_holder_killed_in_its_round_leaves_the_lease_free_and_the_wait_to_the_next(
    db_path: Path,
) -> None:
    """kill -9 of a real process holding the lease: the kernel frees it at once, and the file
    tells the next holder a request may be with the server still."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import asyncio, sys\n"
            "from pathlib import Path\n"
            "from sync_agent.lease import SyncLease\n"
            "async def main():\n"
            "    async with SyncLease(Path(sys.argv[1]), unsure_s=30).round() as turn:\n"
            "        print('held', flush=True)\n"
            "        await asyncio.sleep(60)\n"
            "asyncio.run(main())\n",
            str(db_path),
        ],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).parents[2],
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"held\n"
        async with SyncLease(db_path, unsure_s=30).round() as turn:
            assert turn is None  # the child holds it
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        child.kill()
    clock = Clock()
    async with SyncLease(db_path, unsure_s=12, clock=clock).round() as turn:
        assert turn is not None
        assert turn.crashed
        assert turn.unsure_until == NOON + timedelta(seconds=12)


# -- rounds of the sync loop, on the Medplum peer -----------------------------------------------


class Watching(httpx.AsyncBaseTransport):
    """The real transport, counting POSTs on the wire at once (each held a moment, so two
    senders that overlap are seen to) and when each was sent."""

    def __init__(self, counts: dict[str, int], sent: list[float]) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._counts = counts
        self._sent = sent

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST":
            return await self._inner.handle_async_request(request)
        self._sent.append(time.monotonic())
        self._counts["now"] += 1
        self._counts["most"] = max(self._counts["most"], self._counts["now"])
        try:
            await asyncio.sleep(0.05)
            return await self._inner.handle_async_request(request)
        finally:
            self._counts["now"] -= 1

    async def aclose(self) -> None:
        await self._inner.aclose()


def _client(fhir_peer: FhirPeer, transport: Watching, timeout_s: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=fhir_peer.base_url,
        headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON},
        timeout=timeout_s,
        transport=transport,
    )


@pytest.fixture
async def second_store(db_path: Path, kek_path: Path) -> AsyncIterator[Store]:
    """The same database opened again, as a second process (``appliance sync once``) does."""
    opened = await Store.open(db_path, kek_path)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.mark.peer
async def test_sync_once_beside_the_sync_process_never_sends_at_the_same_time(
    fhir_peer: FhirPeer, store: Store, second_store: Store, db_path: Path, tmp_path: Path
) -> None:
    fhir_peer.reset()
    await _readings(store, 40)  # 41 items, bundles of 8: six exchanges each way at least
    counts, sent = {"now": 0, "most": 0}, []
    ctx = await _loop_ctx(tmp_path, store, fhir_peer.base_url, interval_s=60)
    other_ctx = await _loop_ctx(tmp_path, second_store, fhir_peer.base_url, interval_s=60)
    upstream = ctx.config.sync.upstreams[0]
    async with (
        _client(fhir_peer, Watching(counts, sent), 5.0) as client,
        _client(fhir_peer, Watching(counts, sent), 5.0) as other_client,
    ):
        service = SyncLoop(ctx, client, upstream, rng=random.Random(1))
        once = SyncLoop(other_ctx, other_client, upstream, rng=random.Random(2))
        told: list[str] = []
        service_round = asyncio.create_task(service._round(Wake.WORK))
        await asyncio.sleep(0.02)  # the sync process's round has begun
        rounds = await once.once(on_wait=lambda: told.append("waiting"))
        done = await service_round
        skipped = await service._round(Wake.WORK)
    # Before: both drained the same due items at once (two POSTs on the wire together).
    assert counts["most"] == 1
    assert told == ["waiting"]
    assert done.drained.delivered + sum(r.drained.delivered for r in rounds) == 41
    assert not skipped.busy  # the lease is free again once sync once is done
    assert _states(db_path) == [("delivered", 41)]
    assert (fhir_peer.count("Observation"), fhir_peer.count("Patient")) == (40, 1)


@pytest.mark.peer
async def test_a_round_is_skipped_while_another_process_holds_the_lease(
    fhir_peer: FhirPeer, store: Store, db_path: Path, tmp_path: Path
) -> None:
    fhir_peer.reset()
    await _readings(store, 3)
    counts, sent = {"now": 0, "most": 0}, []
    ctx = await _loop_ctx(tmp_path, store, fhir_peer.base_url, interval_s=60)
    async with _client(fhir_peer, Watching(counts, sent), 5.0) as client:
        loop = SyncLoop(ctx, client, ctx.config.sync.upstreams[0], rng=random.Random(1))
        async with SyncLease(db_path, unsure_s=30).round() as held:
            assert held is not None
            skipped = await loop._round(Wake.SYNC_NOW)
        ran = await loop._round(Wake.WORK)
    assert skipped.busy
    assert skipped.drained.bundles == 0
    assert not skipped.progressed
    assert sent
    assert ran.drained.delivered == 4
    assert _states(db_path) == [("delivered", 4)]


@pytest.mark.peer
async def test_after_a_holder_died_in_its_round_nothing_is_sent_before_a_request_timeout(
    fhir_peer: FhirPeer, store: Store, db_path: Path, tmp_path: Path
) -> None:
    fhir_peer.reset()
    await _readings(store, 3)
    # What a process killed in its round leaves (the kill itself: the test above).
    lock_path(db_path).write_bytes(b"round 12345 2026-11-30T12:00:00+00:00\n")
    counts, sent = {"now": 0, "most": 0}, []
    ctx = await _loop_ctx(tmp_path, store, fhir_peer.base_url, interval_s=60)
    async with _client(fhir_peer, Watching(counts, sent), 1.5) as client:
        loop = SyncLoop(ctx, client, ctx.config.sync.upstreams[0], rng=random.Random(1))
        began = time.monotonic()
        # "Sync now" does not cut it short: the server may be applying that request still.
        done = await loop._round(Wake.SYNC_NOW)
    assert loop.deliverer.unsure_s == 1.5  # the client's read timeout
    assert done.drained.delivered == 4
    # Before: the first POST went at once, overtaking a request the server may be applying.
    assert sent[0] - began >= 1.5
    assert _content(db_path) == b""
