"""The Patients the pull fetches by id, and those the upstream refused it or left out.

The pull (:mod:`sync_agent.pull`) asks for the Patients of each page of Appointments, and for
the enrolled RPM patients on every pass, through :class:`PatientFetcher`: only those not
current here (unknown, or changed since the version held), ``Patient?_id=a,b,…`` in chunks.
One refused to us or missing from the answer is left out, counted, and asked for alone after a
wait doubling at each miss (:func:`~sync_agent.pull_state.missed_again`); the others are
fetched all the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

import httpx

from appliance import db, fhir
from appliance.config import UpstreamConfig
from appliance.store import Store, UpstreamCopy
from sync_agent.pull_answers import copy_of, localise
from sync_agent.pull_result import PullResult
from sync_agent.pull_search import link_to_follow, search_page
from sync_agent.pull_state import Missed, known_versions, missed_again
from sync_agent.upstream import Failure, UpstreamError, search_matches

logger = logging.getLogger(__name__)

_ID_CHUNK = 50  # ids per Patient?_id= request: keeps the URL short on every server


class PatientFetcher:
    """Fetches the Patients of one upstream by id; keeps those it refused or left out."""

    def __init__(
        self,
        store: Store,
        client: httpx.AsyncClient,
        upstream: UpstreamConfig,
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._client = client
        self._upstream = upstream
        self._clock = clock
        # Patients the upstream refused us, or left out of its answer, and when each is due
        # again: asked for alone, so that the others' read is one request and not a refused
        # one followed by one per id, after a wait doubling at each miss (a deleted Patient
        # costs a request a day, not a minute), until they come. Kept in ``meta`` (upstream
        # references, times and counts only) by the pull, so a restart keeps both.
        self.refused: dict[str, Missed] = {}
        self.waits_over = datetime.min.replace(tzinfo=UTC)  # waits ending by then are over

    async def fetch(self, refs: set[str], result: PullResult) -> list[UpstreamCopy]:
        """The Patients among ``refs`` that are not current here, fetched by id. One the
        upstream refuses us is left out and counted in ``refused`` (one not in its answer, in
        ``patients_missing``); the others are fetched all the same. One refused or missing
        before is left out, uncounted, until its wait is over ("sync now" ends every wait)."""
        over = self.waits_over
        refs = {r for r in refs if (m := self.refused.get(r)) is None or m.due <= over}
        if not refs:
            return []
        known = await db.run_sync(self._store.connection, known_versions, sorted(refs))
        versions = {r: v for r, v in known.items() if v is not None}
        unknown = sorted(r for r in refs if r not in versions)
        copies: list[UpstreamCopy] = []
        for group, changed_only in ((unknown, False), (sorted(versions), True)):
            shared = [r for r in group if r not in self.refused]
            chunks = [shared[i : i + _ID_CHUNK] for i in range(0, len(shared), _ID_CHUNK)]
            chunks += [[r] for r in group if r in self.refused]
            for chunk in chunks:
                since = None
                if changed_only:
                    since = min(
                        (versions[r] for r in chunk),
                        key=lambda v: fhir.instant(v) or datetime.min.replace(tzinfo=UTC),
                    )
                copies += await self._fetch_or_refused(chunk, since, result)
        return copies

    async def _fetch_or_refused(
        self, chunk: list[str], since: str | None, result: PullResult
    ) -> list[UpstreamCopy]:
        """The Patients of ``chunk``; a refused read (a 4xx about it: a patient restricted,
        merged or deleted upstream) asked again one id at a time, the refused ones counted.
        Those refused, or asked for whatever their version and not answered, are asked for
        alone on later passes, each after a wait doubling at each miss."""
        try:
            found = await self._read(chunk, since, result)
        except UpstreamError as exc:
            if exc.failure is not Failure.PERMANENT:
                raise
            if len(chunk) > 1:
                return [
                    c for ref in chunk for c in await self._fetch_or_refused([ref], since, result)
                ]
            self.refused[chunk[0]] = missed_again(self.refused.get(chunk[0]), self._clock())
            result.refused += 1
            # The upstream id and the class only: the server's words may quote data.
            result.error = f"{chunk[0]}: refused by the upstream ({exc.failure})"
            logger.warning("pull of one Patient refused by the upstream; the rest go on")
            return []
        # Asked for whatever its version, absent is missing; asked only if changed since the
        # version held, absent is unchanged.
        missing = set(chunk) - {c.reference for c in found} if since is None else set()
        for ref in chunk:
            if ref in missing:
                self.refused[ref] = missed_again(self.refused.get(ref), self._clock())
            else:
                self.refused.pop(ref, None)
        if missing:
            result.patients_missing += len(missing)
            logger.warning(
                "pull: %d Patients asked for by id were not in the upstream's answer; "
                "asked for again later (after a wait doubling at each miss, up to a day)",
                len(missing),
            )
        return found

    async def _read(
        self, chunk: list[str], since: str | None, result: PullResult
    ) -> list[UpstreamCopy]:
        """``Patient?_id=<chunk>`` (changed since ``since``), through the server's next links
        when it serves fewer a page than asked: at most one page per id. A Patient not asked
        for (a server ignoring ``_id``) is passed over: this box holds its site's patients.
        Not asked with strict handling: what comes back is checked against ``chunk``, and a
        server ignoring ``_lastUpdated`` here only sends a Patient that has not changed."""
        query = {"_id": ",".join(r.partition("/")[2] for r in chunk), "_count": str(len(chunk))}
        if since is not None:
            query["_lastUpdated"] = f"gt{since}"
        bundle = await search_page(self._client, "Patient", query)
        base, also = self._upstream.base_url, self._upstream.also_known_as
        answered = [copy_of(localise(r, base, also)) for r in search_matches(bundle, "Patient")]
        followed: set[str] = set()
        for _ in range(len(chunk)):
            link = link_to_follow(bundle, self._client, also)
            if link is None or link in followed:
                break
            followed.add(link)
            bundle = await search_page(self._client, link)
            answered += [
                copy_of(localise(r, base, also)) for r in search_matches(bundle, "Patient")
            ]
        asked = set(chunk)
        found = {c.reference: c for c in answered if c.reference in asked}
        result.passed_over += len({c.reference for c in answered} - asked)
        return list(found.values())
