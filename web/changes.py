"""One poll of the store for every live page of the process.

The live pages (the nurse's arrivals queue, the kiosk's and the provider's vitals) are
Server-Sent Events streams that notice commits of other processes by polling the store's
newest row id (DESIGN.md, "Processes": the store is the bus). Each stream used to poll on
its own — with 50 nurses' dashboards open, 200 trips a second to the database thread that
queued behind the page requests (``bench/web.py``). A :class:`ChangeFeed` polls **once per
interval for the whole process**, and only while somebody is waiting: every stream awaits
:meth:`ChangeFeed.tick` and gets the same answer.
"""

from __future__ import annotations

import asyncio
import contextlib

from appliance.store import Store


class ChangeFeed:
    """The store's newest resource row id, polled every ``interval_s`` while awaited."""

    def __init__(self, store: Store, interval_s: float) -> None:
        self._store = store
        self._interval_s = interval_s
        self._next: asyncio.Future[int] | None = None
        self._task: asyncio.Task[None] | None = None

    async def tick(self) -> int:
        """Wait for the next poll (at most one interval away) and return its row id.

        A failed poll raises here, in every stream waiting on it (as its own poll did)."""
        future = self._next
        if future is None or future.done():
            future = asyncio.get_running_loop().create_future()
            # Retrieved even when every waiter has gone (no "never retrieved" warnings).
            future.add_done_callback(_retrieve)
            self._next = future
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll(), name="web-change-feed")
        return await asyncio.shield(future)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            future, self._next = self._next, None
            if future is None or future.done():
                return  # nobody asked during the last interval: stop until somebody does
            try:
                newest = await self._store.last_row_id()
            except Exception as error:  # handed to the waiting streams
                future.set_exception(error)
            else:
                future.set_result(newest)

    async def close(self) -> None:
        """Stop polling (the app is shutting down)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._next is not None and not self._next.done():
            self._next.cancel()


def _retrieve(future: asyncio.Future[int]) -> None:
    if not future.cancelled():
        future.exception()
