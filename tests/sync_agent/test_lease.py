"""The sync lease: one sender at a time per store, and a wait after a holder that died.

The lease is an ``flock`` on a real file beside a real database; two ``open()`` of it in one
process exclude each other as two processes do. The kill -9 is a real one, of a real child
process holding the lease. The rounds run against the real Medplum peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from appliance import fhir
from appliance.errors import StoreError
from appliance.runtime import ProcessContext
from appliance.store import Store
from sync_agent.lease import RECORD_SIZE, SyncLease, lock_path, want_path
from sync_agent.process import SyncLoop
from sync_agent.upstream import FHIR_JSON
from sync_agent.wakeups import Wake
from tests.fhir_peer.peer import FhirPeer
from tests.sync_agent.test_faults import _loop_ctx, _readings
from tests.sync_agent.test_outbox_delivery import _states
from tests.sync_agent.test_process import _status

NOON = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime = NOON) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _content(db_path: Path) -> bytes:
    """The lock file's record, without its padding (it is always the same size)."""
    raw = lock_path(db_path).read_bytes()
    assert len(raw) == RECORD_SIZE  # written in place, never truncated
    return raw.rstrip()


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


async def _round_failing(lease: SyncLease, *, while_sending: bool) -> None:
    """A round whose store fails: after a step that sent was answered, or in the middle."""
    async with lease.round() as turn:
        assert turn is not None
        with turn.send():
            if while_sending:
                raise StoreError("database or disk is full")
        raise StoreError("database or disk is full")


async def test_a_round_ended_by_an_exception_while_sending_makes_the_next_holder_wait(
    db_path: Path,
) -> None:
    clock = Clock()
    lease = SyncLease(db_path, unsure_s=30, clock=clock)
    with pytest.raises(StoreError):
        await _round_failing(lease, while_sending=False)  # the pull's write, say
    assert _content(db_path) == b""  # before: every later round waited 30 s, for nothing
    with pytest.raises(StoreError):
        await _round_failing(lease, while_sending=True)  # a bundle may be in flight
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
        == b"hold %s" % (NOON + timedelta(minutes=5, seconds=30)).isoformat().encode()
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


async def test_a_lease_whose_record_cannot_be_written_is_not_had(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new lock file on a full disk: a round sending with no "round" record behind it
    would leave no wait after a crash, so it does not run."""

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    ran = False
    with pytest.raises(StoreError, match=r"cannot write the sync lock file .*No space left"):
        async with SyncLease(db_path, unsure_s=30).round():
            ran = True  # before: the warning was logged and the round ran, sending
    assert not ran
    monkeypatch.undo()
    async with SyncLease(db_path, unsure_s=30).round() as turn:
        assert turn is not None  # the lock was freed


async def test_a_waiting_holder_to_be_gets_in_after_the_round_under_way_not_the_catch_up(
    db_path: Path,
) -> None:
    """The sync process in a catch-up: round after round at once, the lease free between two
    for no time at all. ``sync once`` waiting for it gets in after the round under way."""
    service, once = SyncLease(db_path, unsure_s=30), SyncLease(db_path, unsure_s=30)
    order: list[str] = []

    async def catch_up() -> None:
        for n in range(12):
            async with service.round() as turn:
                if turn is None:
                    order.append("skipped")
                    await asyncio.sleep(0.1)  # the sync loop's wait after a skipped round
                    continue
                order.append(f"round {n}")
                await asyncio.sleep(0.3)

    async def sync_once() -> None:
        await asyncio.sleep(0.1)  # the catch-up's first round is under way
        async with once.round(wait=True) as turn:
            assert turn is not None
            order.append("sync once")
            await asyncio.sleep(0.2)

    await asyncio.wait_for(asyncio.gather(catch_up(), sync_once()), 30)
    # Before: "sync once" came only after all twelve rounds (each left the lease free for no
    # longer than one step of the event loop, and a poll every 0.2 s never met it).
    assert order.index("sync once") <= 2
    assert "skipped" in order
    async with SyncLease(db_path, unsure_s=30).round() as turn:
        assert turn is not None  # the want lock was let go with the lease
    assert want_path(db_path).exists()


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
        StoreError, match=r"cannot open the sync lock file .*appliance\.db\.sync-(lock|want)"
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


@contextlib.asynccontextmanager
async def _sync_loop(
    fhir_peer: FhirPeer, store: Store, tmp_path: Path, timeout_s: float
) -> AsyncIterator[tuple[SyncLoop, ProcessContext, list[float]]]:
    """The sync process's loop on ``store`` (its status in the context), and when each of
    its POSTs went."""
    counts = {"now": 0, "most": 0}
    sent: list[float] = []
    ctx = await _loop_ctx(tmp_path, store, fhir_peer.base_url, interval_s=60)
    async with _client(fhir_peer, Watching(counts, sent), timeout_s) as client:
        yield SyncLoop(ctx, client, ctx.config.sync.upstreams[0], rng=random.Random(1)), ctx, sent


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
    counts = {"now": 0, "most": 0}
    sent: list[float] = []
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
async def test_a_round_is_skipped_while_another_process_holds_the_lease_and_says_so(
    fhir_peer: FhirPeer, store: Store, db_path: Path, tmp_path: Path
) -> None:
    fhir_peer.reset()
    await _readings(store, 3)
    raw = sqlite3.connect(db_path)
    with raw:  # each waiting out a retry delay: only "Sync now" sends them at once
        later = fhir.utc_text(datetime.now(UTC) + timedelta(hours=1))
        raw.execute("UPDATE outbox SET next_attempt_at = ?", (later,))
    raw.close()
    async with _sync_loop(fhir_peer, store, tmp_path, 5.0) as (loop, ctx, sent):
        claims_runs = []
        run_claims = loop.claims.run_once

        async def claims_run_once(*, stop: Callable[[], bool]) -> None:
            claims_runs.append(1)
            await run_claims(stop=stop)

        loop.claims.run_once = claims_run_once  # type: ignore[method-assign]
        async with SyncLease(db_path, unsure_s=30).round() as held:
            assert held is not None
            skipped = await loop._round(Wake.SYNC_NOW)  # staff pressed "Sync now" meanwhile
            paused = await _status(store, ctx)
        ran = await loop._round(Wake.WORK)
        resumed = await _status(store, ctx)
    assert skipped.busy
    assert skipped.drained.bundles == 0
    assert not skipped.progressed
    assert claims_runs == [1, 1]  # claims go to the payer, skipped round or not
    # Before: nothing said why nothing went; and the "Sync now" was lost with the round.
    assert paused.paused_for_s is not None
    assert paused.paused_for_s < 60
    assert resumed.paused_for_s is None
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
    async with _sync_loop(fhir_peer, store, tmp_path, 1.5) as (loop, _ctx, sent):
        began = time.monotonic()
        # "Sync now" does not cut it short: the server may be applying that request still.
        done = await loop._round(Wake.SYNC_NOW)
    assert loop.deliverer.unsure_s == 1.5  # the client's read timeout
    assert done.drained.delivered == 4
    # Before: the first POST went at once, overtaking a request the server may be applying.
    assert sent[0] - began >= 1.5
    assert _content(db_path) == b""
