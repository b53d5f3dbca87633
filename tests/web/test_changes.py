"""The live pages' shared poll of the store (web/changes.py), on a real SQLite store."""

from __future__ import annotations

import asyncio

import pytest

from appliance.store import Store
from tests import factories
from web.changes import ChangeFeed

INTERVAL_S = 0.05


class _Counting:
    """The store, with its ``last_row_id`` calls counted."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.calls = 0

    async def last_row_id(self) -> int:
        self.calls += 1
        return await self.store.last_row_id()


async def test_fifty_streams_share_one_poll_per_interval(store: Store) -> None:
    counting = _Counting(store)
    feed = ChangeFeed(counting, INTERVAL_S)  # type: ignore[arg-type]
    seen: list[list[int]] = [[] for _ in range(50)]

    async def stream(mine: list[int]) -> None:
        for _ in range(6):
            mine.append(await feed.tick())

    await store.create([factories.patient(family="Feedone")], "user:test")
    first = await store.last_row_id()
    waiting = asyncio.gather(*(stream(mine) for mine in seen))
    await asyncio.sleep(INTERVAL_S * 2.5)
    await store.create([factories.patient(family="Feedtwo")], "user:test")
    await waiting
    await feed.close()
    # 50 streams x 6 ticks asked for: a handful of polls, not 300.
    assert 6 <= counting.calls <= 8, counting.calls
    assert all(mine == seen[0] for mine in seen), "every stream got the same answers"
    assert seen[0][0] == first
    assert seen[0][-1] == await store.last_row_id() > first


async def test_polling_stops_when_nobody_waits_and_restarts(store: Store) -> None:
    counting = _Counting(store)
    feed = ChangeFeed(counting, INTERVAL_S)  # type: ignore[arg-type]
    assert await feed.tick() == await store.last_row_id()
    await asyncio.sleep(INTERVAL_S * 6)
    idle_calls = counting.calls
    await asyncio.sleep(INTERVAL_S * 6)
    assert counting.calls == idle_calls, "no polling while no stream is open"
    assert idle_calls == 1
    assert await feed.tick() == await store.last_row_id()
    assert counting.calls == 2
    await feed.close()


async def test_a_failed_poll_reaches_every_waiting_stream() -> None:
    class Broken:
        async def last_row_id(self) -> int:
            raise OSError("disk I/O error")

    feed = ChangeFeed(Broken(), INTERVAL_S)  # type: ignore[arg-type]
    results = await asyncio.gather(feed.tick(), feed.tick(), return_exceptions=True)
    assert [type(r) for r in results] == [OSError, OSError]
    await feed.close()


async def test_a_cancelled_stream_does_not_disturb_the_others(store: Store) -> None:
    feed = ChangeFeed(store, INTERVAL_S)
    leaving = asyncio.create_task(feed.tick())
    staying = asyncio.create_task(feed.tick())
    await asyncio.sleep(0)
    leaving.cancel()
    assert await staying == await store.last_row_id()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    await feed.close()
