"""The pull's streams: each paged from its cursor through the upstream's search pages.

A stream is one search (``Appointment Location/<id>``, ``Observation Patient/<id>``) read in
``_lastUpdated`` order from its cursor, first looking back ``overlap_s`` for writes committed
late; a run of equal timestamps longer than a page is walked through by the server's ``next``
links, and where such a walk stopped is kept for the next pass. Each page read is handed to
:meth:`~sync_agent.pull_import.Importer.take`. The why of it all is in :mod:`sync_agent.pull`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx

from appliance import db, fhir
from appliance.config import UpstreamConfig
from appliance.store import Store
from sync_agent.pull_answers import (
    APPOINTMENTS,
    Cursor,
    asked_for,
    captured_elsewhere,
    last_updated,
    look_back,
)
from sync_agent.pull_import import Importer
from sync_agent.pull_result import PullResult
from sync_agent.pull_search import (
    REFUSALS,
    LinkRefused,
    Unordered,
    check_order,
    link_to_follow,
    next_page,
    search_page,
)
from sync_agent.pull_state import load_cursor, not_held
from sync_agent.upstream import Failure, UpstreamError, search_matches

logger = logging.getLogger(__name__)

MAX_PAGE_SIZE = 1000


def appointments_stream(location: str) -> str:
    """The cursor's name of the Appointments at ``location`` (``Location/<id>``).

    Keyed by the Location, as readings are by patient: a corrected ``sync.upstream.location``
    starts a stream of its own from the beginning instead of taking over the cursor of the
    wrong one (which would skip every appointment stamped before it). The stream of releases
    before this was plain ``Appointment``; that row is left unused, so an upgrade pulls the
    site's Appointments once more (imports are idempotent: nothing is duplicated).
    """
    return f"{APPOINTMENTS} {location}"


@dataclass(frozen=True, slots=True)
class _Walk:
    """Where a walk through one instant by the server's ``next`` links stopped (max_pages)."""

    at: str | None  # the instant of the run (the cursor's ``since``)
    link: str  # the next page, not read yet
    followed: frozenset[str] = frozenset()  # the links read so far: one read again is a loop


class Streams:
    """Pages the streams of one upstream into one store, each from its own cursor."""

    def __init__(
        self,
        store: Store,
        client: httpx.AsyncClient,
        upstream: UpstreamConfig,
        importer: Importer,
        *,
        page_size: int,
        max_pages: int,
        overlap_s: float,
    ) -> None:
        self._store = store
        self._client = client
        self._upstream = upstream
        self._importer = importer
        self._page_size = page_size
        self._max_pages = max_pages
        self._overlap_s = overlap_s
        self._walks: dict[str, _Walk] = {}  # stream → where its walk through a run stopped

    async def guarded(
        self, stream: str, rtype: str, params: dict[str, str], result: PullResult
    ) -> None:
        """One stream; a refusal of this one search (a 4xx about it: a patient restricted
        (403), merged or deleted (404/410 with the server's OperationOutcome) upstream, a
        parameter the server does not take) is recorded and the other streams go on; so is a
        page not sorted or filtered as asked (``unordered``) and a walk ended at a next link
        the server refused (``walks_restarted``), each logged where it was met. The link, our
        credentials (401) or the address failing stops the pass."""
        try:
            await self._stream(stream, rtype, params, result)
        except UpstreamError as exc:
            if exc.failure is not Failure.PERMANENT:
                raise
            result.error = f"{stream}: {exc}"
            if isinstance(exc, Unordered):
                result.unordered += 1
                return
            if isinstance(exc, LinkRefused):
                result.walks_restarted += 1
                return
            result.refused += 1
            # The type only: the stream names a patient's upstream id, the server's words
            # may quote data.
            logger.warning("pull of one %s stream refused by the upstream; the rest go on", rtype)

    async def _stream(
        self, stream: str, rtype: str, params: dict[str, str], result: PullResult
    ) -> None:
        """Page through one stream from its cursor, storing each page with the new cursor."""
        conn = self._store.connection
        cursor = await db.run_sync(conn, load_cursor, self._upstream.name, stream)
        if cursor.since is not None:
            await self._sweep(stream, rtype, params, cursor.since, result)
        # Following the server's links through the cursor's instant: where the last pass's
        # walk stopped, if the cursor is still in that instant.
        walk = self._walks.pop(stream, None)
        resumed = walk is not None and walk.at == cursor.since
        next_url = walk.link if walk is not None and resumed else None
        followed: set[str] = set(walk.followed) if walk is not None and resumed else set()
        try:
            await self._pages(stream, rtype, params, result, cursor, next_url, followed)
        except BaseException as exc:
            # A failed pass (the link, our credentials, a stop) keeps the walk's place. A
            # refusal drops it: a server's next link does not live for ever (HAPI answers 410
            # once its search has left the cache, a proxy 404), and kept, it was asked for
            # again on every pass, the stream going nowhere. The next pass starts the run
            # again from the cursor, with links of a fresh search.
            refused = isinstance(exc, UpstreamError) and exc.failure in REFUSALS
            if walk is not None and not refused:
                self._walks.setdefault(stream, walk)
            raise

    async def _sweep(
        self, stream: str, rtype: str, params: dict[str, str], since: str, result: PullResult
    ) -> None:
        """Read again the ``overlap_s`` before the cursor and take what was missed there.

        A server stamps ``lastUpdated`` when a write starts, not when it commits: a write
        that commits after a later-stamped one was read (or a server node whose clock is
        behind) appears behind the cursor, where ``ge<cursor>`` never looks. Resources held
        here at that version (nearly all) are left alone; the cursor does not move.
        """
        since_at = fhir.instant(since)
        if since_at is None or self._overlap_s <= 0:
            return
        conn = self._store.connection
        floor = Cursor(look_back(since_at, self._overlap_s))
        for _ in range(self._max_pages):
            query = {**params, "_sort": "_lastUpdated", "_count": str(self._page_size)}
            query["_lastUpdated"] = f"ge{floor.since}"
            resources = search_matches(
                await search_page(self._client, rtype, query, strict=True), rtype
            )
            check_order(rtype, resources, floor.since, self._overlap_s)
            inside = [
                r
                for r in resources
                if (at := fhir.instant(last_updated(r))) is not None and at < since_at
            ]
            # Left out as the stream leaves them out (never stored, so never "held").
            wanted = [
                r
                for r in inside
                if asked_for(rtype, params, r)
                and not (rtype == "Observation" and captured_elsewhere(r))
            ]
            late = await db.run_sync(conn, not_held, wanted)
            if late:
                before = result.created + result.updated
                await self._importer.take(stream, rtype, params, late, Cursor(), result, save=False)
                if result.created + result.updated > before:
                    logger.info(
                        "pull %s: %d resources committed late, taken now",
                        rtype,
                        result.created + result.updated - before,
                    )
            after = floor.advance(inside)
            if len(inside) < len(resources) or len(resources) < self._page_size or after == floor:
                return  # reached the cursor, the end, or a run of equal timestamps: enough
            floor = after

    async def _pages(
        self,
        stream: str,
        rtype: str,
        params: dict[str, str],
        result: PullResult,
        cursor: Cursor,
        next_url: str | None,
        followed: set[str],
    ) -> None:
        """Up to ``max_pages`` pages of one stream from ``cursor`` (or a walk's ``next_url``)."""
        start = cursor
        size = self._page_size
        for _ in range(self._max_pages):
            if next_url is not None:
                followed.add(next_url)
                bundle = await next_page(self._client, next_url)
            else:
                query = {**params, "_sort": "_lastUpdated", "_count": str(size)}
                if cursor.since is not None:
                    query["_lastUpdated"] = f"ge{cursor.since}"
                bundle = await search_page(self._client, rtype, query, strict=True)
            resources = search_matches(bundle, rtype)
            check_order(rtype, resources, cursor.since, self._overlap_s)
            before = cursor
            cursor = await self._importer.take(
                stream, rtype, params, resources, cursor, result, save=True
            )
            link = link_to_follow(bundle, self._client, self._upstream.also_known_as)
            if next_url is not None:
                # Walking through one instant: on while it lasts (a page may bring nothing
                # new: one read by a walk before a restart), back to asking from the cursor
                # once past it; no link, and the search is done.
                if link is None:
                    return
                if cursor.since != before.since:
                    next_url = None
                    continue
                if link in followed:
                    self._stuck(stream, rtype, result, "a next link leads back to a page read")
                    return
                next_url = link
                continue
            if link is None and len(resources) < size:
                return  # the last page (a short page with a next link: the server's cap)
            if cursor.since != before.since:
                continue  # the next page is asked for from the cursor, never by a next link
            # The whole page is in the cursor's instant: asked again, it would be the same.
            if len(resources) >= size and size < MAX_PAGE_SIZE:
                size = min(MAX_PAGE_SIZE, size * 2)
                continue
            if link is not None:
                # A run of equal timestamps longer than the largest page (or than the
                # server's cap on _count): through that one instant by the server's links.
                next_url = link
                continue
            self._stuck(stream, rtype, result, "the server gives no next link")
            return
        if next_url is not None:
            self._walks[stream] = _Walk(cursor.since, next_url, frozenset(followed))
        # Cut short by max_pages: again at once, but only if this pass got somewhere (else
        # the sync loop would ask again and again for the same pages).
        if cursor != start:
            result.more = True

    def _stuck(self, stream: str, rtype: str, result: PullResult, why: str) -> None:
        """This stream cannot page through the run of equal timestamps at its cursor."""
        logger.warning(
            "pull %s: more than %d resources share one lastUpdated and %s; this stream "
            "cannot get past them",
            rtype,
            MAX_PAGE_SIZE,
            why,
        )
        result.error = f"{stream}: over {MAX_PAGE_SIZE} resources share one lastUpdated"
        result.stuck += 1
