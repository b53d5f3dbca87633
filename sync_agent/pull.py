"""Pull-down: this site's Appointments, their Patients, and home readings of RPM patients.

What is pulled, from the first configured upstream (the one the outbox delivers to):

1. **Appointments of this site**: ``Appointment?actor=<sync.upstream.location>`` — the site's
   Location on that upstream is a participant of every appointment booked here. Without a
   configured ``location`` no Appointments are pulled.
2. **Their Patients**, fetched by id (``Patient?_id=a,b,…``, through the server's ``next``
   links when it serves fewer a page) with each page of Appointments and stored in the same
   transaction, so every pulled Appointment points at a local Patient — unless the upstream
   refuses us that Patient or leaves it out of its answer (below): the Appointment is stored
   all the same, naming the Patient by its upstream id. Only Patients not already current are
   fetched: unknown ones, and known ones only when changed since the version held
   (``_lastUpdated=gt…``). Enrolled RPM patients (below) are refreshed the same way on every
   pass.
3. **Home readings of enrolled RPM patients**: ``Observation?subject=Patient/<upstream id>``
   per patient. Until the RPM issue adds an enrolment table, *enrolled* means a patient with an
   assigned home device (``devices.setting = 'home'``, not retired). They are tagged as home
   readings (capture-setting ``home``), have no outbox row, so are never sent back; our own
   readings found there are recognised (``OWN``) and one tagged as captured elsewhere is skipped.

What a search answers is checked against what it asked for: by default a FHIR server ignores a
parameter it does not support, and one ignoring ``actor`` would answer with every Appointment
of the EHR. An Appointment without the site's Location among its participants, a reading
about another patient, a Patient of an id not asked for is passed over (counted in
``passed_over``, not stored, no Patient fetched for it); the cursor moves past it all the same.
A reference at the upstream's own address, absolute (``https://ehr/fhir/Patient/7``, however
its host, default port or scheme are spelled), is the relative one (FHIR R4, References) and
is stored so (:func:`~sync_agent.pull_answers.localise`): the Patient is fetched and the
copy points at the record here. One to another server stays as it is, and is not fetched.

**Incremental.** Every stream (``Appointment Location/<id>``; ``Observation Patient/<id>``)
pages through ``_lastUpdated=ge<cursor>&_sort=_lastUpdated&_count=N``, each page asked for
afresh from the cursor, with ``Prefer: handling=strict``: by default a FHIR server ignores a
parameter it does not support, and one ignoring ``_sort`` pages in its own order, so the
cursor would jump past what later pages hold. A page that is not in that order anyway (its
stamps go backwards, or one is older than the cursor by more than the look-back below) is
not taken: nothing of it is stored, the cursor stays, the stream counts in ``unordered``
(not in ``refused``: the server answered, it did not sort or filter as asked). The
server's ``next`` links are not followed: many page by offset, and a resource changed between
two pages moves to the end of the order, so the one behind it slides into the offset already
read and would be skipped for good. The cursor is the newest ``meta.lastUpdated`` taken plus
the ids taken at exactly that instant, and it is written in the transaction that stores the
page: a pass interrupted anywhere resumes at the last stored page, and a run of equal
timestamps cut by a page boundary is neither lost (``ge``) nor taken twice (the ids). A page
wholly inside the cursor's instant (a run of equal timestamps longer than the page: asked
again from the cursor, it would come back the same) doubles the page size, up to 1,000; past
that, or when the server serves fewer than asked, the server's ``next`` links (to the same
server only) are followed through that one instant, and without one the stream says it is
stuck. A walk through a run cut short by ``max_pages`` resumes at
its next link on the next pass (kept in memory: after a restart the walk starts the run
again), so a run of any length is passed; a link back to a page already read ends the walk.
A link the server refuses (its search expired: HAPI answers 410, a proxy 404) ends it too:
that pass counts the stream in ``walks_restarted`` (not in ``refused``: nothing was refused to
our access), and the next starts the run again from the cursor.
A pass says ``more`` (call again at once) only when a stream reached ``max_pages`` having
moved its cursor: a pass that got nowhere waits for the next interval like any other. Each
pass first reads again the ten minutes before the cursor (``overlap_s``) and takes what is
not held here: a server stamps ``lastUpdated`` when a write starts, so a write committed
late appears behind a cursor that has already moved past it.

**Failures.** The link, our credentials or the address failing stops the pass (the next one
resumes from the cursors). A refusal of one search (a 4xx about it: a patient merged or
restricted upstream, a parameter the server does not take) is counted in ``refused`` and the
other streams go on, so one patient's refused search never starves everyone after it. So
with Patients: a refused ``Patient?_id=…`` is asked again one id at a time, the refused ones
are left out (each counted in ``refused``, and asked for alone on later passes) and the rest
are stored; the page of Appointments and its cursor go on, as do the enrolled patients'
readings. A Patient asked for by id and missing from a 200 answer (filtered upstream, a
replica lagging, a page of the answer lost) is handled alike: counted in ``patients_missing``
and asked for alone on later passes until it comes. (One held here and asked for only if
changed, ``_lastUpdated=gt…``, is absent when unchanged: not counted.) Each is asked again
after a wait doubling at each miss, from a minute to a day (kept across restarts, "sync now"
included): a Patient deleted or merged away at the EHR costs one request a day, not one a
pass for ever. While it waits it is not asked for at all, nor counted.

**Stored** through :meth:`appliance.store.Store.import_upstream`: encrypted, audited as
``service:sync``, keeping the upstream id and version (the ``If-Match`` of a later local
edit); a re-pulled resource replaces the local copy under the same logical id — unless a
local edit of it is on its way up or waiting for review, in which case it is held back and an
open review gets the upstream's newer version instead. A copy the FHIR R4B model refuses (an
element it does not define, such as one of R5's) is not stored: it is audited as a failure
(its upstream id, type and the reason's class), logged (type and class), counted in
``skipped_invalid``, and its stream's cursor moves past it (changed at the EHR, it comes
again).
"""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from appliance import audit, db, fhir
from appliance.audit import AuditAction, AuditEvent, Outcome
from appliance.config import UpstreamConfig
from appliance.store import (
    Imported,
    ImportOutcome,
    Store,
    UpstreamCopy,
    resource_for_upstream,
)
from sync_agent.pull_answers import (
    APPOINTMENTS,
    Cursor,
    about,
    asked_for,
    captured_elsewhere,
    copy_of,
    invalid_reason,
    last_updated,
    localise,
    look_back,
    order_problem,
    patients_of,
)
from sync_agent.pull_state import (
    Missed,
    enrolled_upstream_refs,
    known_versions,
    load_cursor,
    load_refused,
    missed_again,
    not_held,
    save_cursor,
    save_refused,
)
from sync_agent.review_queue import refresh_review, review_refused_edit
from sync_agent.status import Twin, note_twins
from sync_agent.upstream import (
    Failure,
    UpstreamError,
    classify_for_resource,
    exchange,
    is_outcome,
    next_link,
    outcome_text,
    response_json,
    search_matches,
)

logger = logging.getLogger(__name__)

ACTOR = "service:sync"
HOME_TAG = {"system": fhir.CAPTURE_SETTING_SYSTEM, "code": "home"}
MAX_PAGE_SIZE = 1000
_ID_CHUNK = 50  # ids per Patient?_id= request: keeps the URL short on every server
# What drops a walk through a run: the server refused the link, or the address took it not.
_REFUSALS = frozenset({Failure.PERMANENT, Failure.ENDPOINT})


class _Unordered(UpstreamError):
    """A page not in the order asked for (:func:`order_problem`): not taken."""


class _LinkRefused(UpstreamError):
    """A ``next`` link of the server's own refused (its search expired): the walk ends."""


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


@dataclass
class PullResult:
    """What one pass did (figures for logs and status; no PHI)."""

    due: bool = True
    pages: int = 0
    created: int = 0
    updated: int = 0
    current: int = 0
    held: int = 0
    skipped: int = 0  # ours, captured elsewhere, or invalid
    # Of ``skipped``: copies refused by validation (an element R4B does not define...), not
    # stored; audited and logged (type and reason class) once a version. The look-back may
    # meet one again on later passes: counted again, as ``skipped`` always did.
    skipped_invalid: int = 0
    # Answered but not asked for: an Appointment without this site's Location, a reading
    # about another patient, a Patient of another id (a server ignoring a search parameter
    # it does not support, as FHIR servers do by default). Not stored; the cursor passes.
    passed_over: int = 0
    # Patients asked for by id and not in the answer (filtered, a replica lagging): their
    # Appointments name them by the upstream id; asked for again, with a growing wait (a
    # minute doubling to a day), until they come.
    patients_missing: int = 0
    # Copies carrying our identifier of a record the upstream holds under another id (a merge
    # at the EHR?): not stored, audited; a person looks at both records there.
    elsewhere: int = 0
    more: bool = False  # stopped at max_pages: call again soon
    refused: int = 0  # streams whose search the upstream refused (the others went on)
    # Streams whose page the upstream did not sort or filter by _lastUpdated as asked: not
    # taken, the cursor stays (the others went on). Not ``refused``: no scope is missing.
    unordered: int = 0
    # Streams whose walk through a run ended at a next link the server refused (its search
    # expired, or a proxy not passing its paging on): started again from the cursor next pass.
    walks_restarted: int = 0
    stuck: int = 0  # streams that cannot page past a run of equal lastUpdated at their cursor
    error: str | None = None
    link_down: bool = False
    stopped_by: UpstreamError | None = None  # the exchange failure that ended the pass

    def count(self, outcomes: Sequence[Imported]) -> None:
        """Add the outcomes of one import."""
        for item in outcomes:
            if item.outcome is ImportOutcome.CREATED:
                self.created += 1
            elif item.outcome is ImportOutcome.UPDATED:
                self.updated += 1
            elif item.outcome is ImportOutcome.CURRENT:
                self.current += 1
            elif item.outcome is ImportOutcome.HELD:
                self.held += 1
            elif item.outcome is ImportOutcome.ELSEWHERE:
                self.elsewhere += 1
            else:
                self.skipped += 1
                if item.outcome is ImportOutcome.INVALID:
                    self.skipped_invalid += 1


# A pass forced by "sync now" asks again for every Patient refused or missing before.
_ANY_TIME = datetime.max.replace(tzinfo=UTC)


class Puller:
    """Pulls from one upstream into one store, incrementally; call :meth:`pull_once` often."""

    def __init__(
        self,
        store: Store,
        client: httpx.AsyncClient,
        upstream: UpstreamConfig,
        *,
        page_size: int = 50,
        max_pages: int = 20,
        interval_s: float = 60.0,
        overlap_s: float = 600.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._client = client
        self._upstream = upstream
        self._page_size = page_size
        self._max_pages = max_pages
        self._interval_s = interval_s
        self._overlap_s = overlap_s
        self._clock = clock
        self._last_pass: datetime | None = None
        self._more = False
        self._walks: dict[str, _Walk] = {}  # stream → where its walk through a run stopped
        # Patients the upstream refused us, or left out of its answer, and when each is due
        # again: asked for alone, so that the others' read is one request and not a refused
        # one followed by one per id, after a wait doubling at each miss (a deleted Patient
        # costs a request a day, not a minute), until they come. Kept in ``meta`` (upstream
        # references, times and counts only), so a restart keeps both.
        self._refused: dict[str, Missed] = {}
        self._waits_over = datetime.min.replace(tzinfo=UTC)  # waits ending by then are over
        self._refused_loaded = False
        # Versions refused by validation and recorded already (``<ref>@<version>``): the
        # look-back meets them again while the cursor is near, and they are audited once.
        self._invalid_seen: set[str] = set()

    # -- the pass --------------------------------------------------------------------------

    async def pull_once(self, *, force: bool = False) -> PullResult:
        """One pass when due (every ``interval_s``, at once while more is waiting, or when
        forced: "sync now"). Never raises for the link: the result says what happened."""
        now = self._clock()
        if (
            not force
            and not self._more
            and self._last_pass is not None
            # A clock stepped back (NTP correcting a clock that ran ahead) makes it due, not
            # "not due" until the clock catches up again, which may be days.
            and 0 <= (now - self._last_pass).total_seconds() < self._interval_s
        ):
            return PullResult(due=False)
        self._last_pass = now
        result = PullResult()
        conn = self._store.connection
        if not self._refused_loaded:
            self._refused = await db.run_sync(conn, load_refused, self._upstream.name)
            self._refused_loaded = True
        refused_before = dict(self._refused)
        # "Sync now" asks every one of them again, whatever its wait: a person pressing it
        # has often just had a restriction lifted at the EHR.
        self._waits_over = _ANY_TIME if force else now
        due_again = {r for r, missed in self._refused.items() if missed.due <= self._waits_over}
        try:
            if (location := self._upstream.location) is not None:
                stream = appointments_stream(location)
                await self._guarded(stream, APPOINTMENTS, {"actor": location}, result)
            enrolled = await db.run_sync(self._store.connection, enrolled_upstream_refs)
            # A Patient refused here (or missing from the answer) is left out (counted); every
            # stream below still runs. One refused or missing before is asked again once its
            # wait is over: an Appointment pulled meanwhile names it by the upstream's id until
            # it is here (the kiosk finds it by its link).
            patients = await self._patients(set(enrolled) | due_again, result)
            if patients:
                await self._import(patients, result)
            for ref in enrolled:
                await self._guarded(f"Observation {ref}", "Observation", {"subject": ref}, result)
        except UpstreamError as exc:
            result.error = str(exc)
            result.link_down = exc.failure in (Failure.TRANSIENT, Failure.AMBIGUOUS)
            result.stopped_by = exc
            # Only the class: a server's words may quote what it refused.
            logger.warning("pull stopped: %s", exc.failure)
        if self._refused != refused_before:
            await db.run_sync(conn, save_refused, self._upstream.name, self._refused)
        self._more = result.more
        if result.passed_over:
            logger.warning(
                "pull: %d resources the searches did not ask for passed over (not stored); "
                "does the upstream ignore a search parameter?",
                result.passed_over,
            )
        if result.elsewhere:
            logger.warning(
                "pull: %d upstream records carry the identifier of a record held here under "
                "another upstream id (merged at the EHR?); not stored, listed on /sync",
                result.elsewhere,
            )
        if result.created or result.updated or result.held:
            logger.info(
                "pulled %d new, %d updated, %d held back (local edits pending), %d pages",
                result.created,
                result.updated,
                result.held,
                result.pages,
            )
        return result

    async def _get(
        self, url: str, params: dict[str, str] | None = None, *, strict: bool = False
    ) -> Any:
        """A search page's Bundle. ``strict``: the server is asked to refuse a parameter it
        does not support (``Prefer: handling=strict``) instead of ignoring it, which is FHIR's
        default: a server ignoring ``_sort`` pages in its own order, one ignoring ``actor``
        answers with every Appointment it holds. Not on a server's own ``next`` links: all in
        them is its own."""
        headers = {"Prefer": "handling=strict"} if strict else None
        response = await exchange(self._client, "GET", url, params=params, headers=headers)
        body = response_json(response)
        status = response.status_code
        if status == 403:
            # To one search a 403 is that patient restricted upstream, not our credentials
            # (a 401): the other streams go on (_guarded).
            said = outcome_text(body) or "HTTP 403"
            raise UpstreamError(
                Failure.PERMANENT,
                f"the upstream refused this search: {said}",
                status=status,
                outcome=is_outcome(body),
            )
        if status >= 300:
            refusal = classify_for_resource(
                status,
                body,
                response.headers.get("Retry-After"),
                served=response.headers.get("Date"),
            )
            refusal.status, refusal.outcome = status, is_outcome(body)
            raise refusal
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            raise UpstreamError(Failure.TRANSIENT, f"HTTP {response.status_code} without a Bundle")
        return body

    def _check_order(self, rtype: str, resources: list[fhir.FhirJson], since: str | None) -> None:
        """Refuse a page that is not in the order asked for (:func:`order_problem`), before
        anything of it is taken: the stream's cursor stays, and it is counted in
        ``unordered``."""
        why = order_problem(resources, since, self._overlap_s)
        if why is not None:
            logger.warning("pull of one %s stream: %s", rtype, why)  # words of ours only
            raise _Unordered(Failure.PERMANENT, why)

    async def _guarded(
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
            if isinstance(exc, _Unordered):
                result.unordered += 1
                return
            if isinstance(exc, _LinkRefused):
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
            refused = isinstance(exc, UpstreamError) and exc.failure in _REFUSALS
            if walk is not None and not refused:
                self._walks.setdefault(stream, walk)
            raise

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
                bundle = await self._next_page(next_url)
            else:
                query = {**params, "_sort": "_lastUpdated", "_count": str(size)}
                if cursor.since is not None:
                    query["_lastUpdated"] = f"ge{cursor.since}"
                bundle = await self._get(rtype, query, strict=True)
            resources = search_matches(bundle, rtype)
            self._check_order(rtype, resources, cursor.since)
            before = cursor
            cursor = await self._take(stream, rtype, params, resources, cursor, result, save=True)
            link = next_link(bundle, self._client)
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

    async def _next_page(self, link: str) -> Any:
        """The page at one of the server's ``next`` links. A refusal of it, or an address
        status, is a refusal of this stream's walk (the other streams go on), not the
        address failing: the server answered this stream's search from its cursor (the page
        that gave the link, or the look-back), and a 404 or 410 to one of its links is its
        search expired, or a proxy not passing its paging on."""
        try:
            return await self._get(link)
        except UpstreamError as exc:
            if exc.failure not in _REFUSALS:
                raise
            # The status only: the server's words may quote data.
            why = (
                f"the upstream refused a next link of its own (HTTP {exc.status}; its search "
                "expired?): the stream starts again from its cursor on the next pass"
            )
            logger.warning("pull: %s", why)
            raise _LinkRefused(
                Failure.PERMANENT, why, status=exc.status, outcome=exc.outcome
            ) from exc

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

    def _matches(self, rtype: str, params: dict[str, str], resource: fhir.FhirJson) -> bool:
        """Whether ``resource`` is one the stream's search asked for (:func:`asked_for`)."""
        return asked_for(rtype, params, resource)

    async def _take(
        self,
        stream: str,
        rtype: str,
        params: dict[str, str],
        resources: list[fhir.FhirJson],
        cursor: Cursor,
        result: PullResult,
        *,
        save: bool,
    ) -> Cursor:
        """Store the resources of one page not taken yet (an Appointment's Patients with it)
        and, with ``save``, the stream's new cursor in the same transaction; the cursor after
        the page. One the stream's search should not have matched is passed over (counted),
        the cursor moving past it all the same."""
        unseen = [r for r in resources if not cursor.taken(r)]
        fresh = [r for r in unseen if self._matches(rtype, params, r)]
        result.passed_over += len(unseen) - len(fresh)
        fresh = [localise(r, self._upstream.base_url) for r in fresh]
        after = cursor.advance(resources)
        copies = [copy_of(r) for r in fresh]
        tags: list[dict[str, str]] = []
        if rtype == APPOINTMENTS:
            wanted = set().union(*(patients_of(r) for r in fresh)) if fresh else set()
            copies = await self._patients(wanted, result) + copies
        elif rtype == "Observation":
            result.skipped += sum(1 for r in fresh if captured_elsewhere(r))
            copies = [c for c in copies if not captured_elsewhere(c.resource)]
            tags = [HOME_TAG]

        def then(conn: sqlite3.Connection) -> None:
            if save:
                save_cursor(conn, self._upstream.name, stream, after, self._clock())

        await self._import(copies, result, tags=tags, then=then)
        result.pages += 1
        return after

    async def _import(
        self,
        copies: list[UpstreamCopy],
        result: PullResult,
        *,
        tags: Sequence[Mapping[str, str]] = (),
        then: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        """Store ``copies`` (``then`` in the same transaction: a cursor moved) and count what
        became of them. Copies refused by validation are audited in that transaction and
        logged once it committed, once a version (the look-back meets them again)."""
        recorded: list[tuple[str, str, str]] = []

        def also(conn: sqlite3.Connection, outcomes: list[Imported]) -> None:
            self._after_import(conn, outcomes, copies)
            recorded.extend(self._record_invalid(conn, outcomes, copies))
            if then is not None:
                then(conn)

        result.count(await self._store.import_upstream(copies, ACTOR, tags=tags, also=also))
        if len(self._invalid_seen) + len(recorded) > 10_000:
            self._invalid_seen.clear()  # bounded: at worst one is audited again
        self._invalid_seen.update(key for key, _rtype, _reason in recorded)
        found = Counter((rtype, reason) for _key, rtype, reason in recorded)
        for (rtype, reason), count in sorted(found.items()):
            # The type and the reason's class: no id, nothing of the data.
            logger.warning(
                "pull: %d %s not stored, they fail validation (%s); audited, the stream "
                "goes on past them",
                count,
                rtype,
                reason,
            )

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
            resources = search_matches(await self._get(rtype, query, strict=True), rtype)
            self._check_order(rtype, resources, floor.since)
            inside = [
                r
                for r in resources
                if (at := fhir.instant(last_updated(r))) is not None and at < since_at
            ]
            # Left out as the stream leaves them out (never stored, so never "held").
            wanted = [
                r
                for r in inside
                if self._matches(rtype, params, r)
                and not (rtype == "Observation" and captured_elsewhere(r))
            ]
            late = await db.run_sync(conn, not_held, wanted)
            if late:
                before = result.created + result.updated
                await self._take(stream, rtype, params, late, Cursor(), result, save=False)
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

    async def _patients(self, refs: set[str], result: PullResult) -> list[UpstreamCopy]:
        """The Patients among ``refs`` that are not current here, fetched by id. One the
        upstream refuses us is left out and counted in ``refused`` (one not in its answer, in
        ``patients_missing``); the others are fetched all the same. One refused or missing
        before is left out, uncounted, until its wait is over ("sync now" ends every wait)."""
        over = self._waits_over
        refs = {r for r in refs if (m := self._refused.get(r)) is None or m.due <= over}
        if not refs:
            return []
        known = await db.run_sync(self._store.connection, known_versions, sorted(refs))
        versions = {r: v for r, v in known.items() if v is not None}
        unknown = sorted(r for r in refs if r not in versions)
        copies: list[UpstreamCopy] = []
        for group, changed_only in ((unknown, False), (sorted(versions), True)):
            shared = [r for r in group if r not in self._refused]
            chunks = [shared[i : i + _ID_CHUNK] for i in range(0, len(shared), _ID_CHUNK)]
            chunks += [[r] for r in group if r in self._refused]
            for chunk in chunks:
                since = None
                if changed_only:
                    since = min(
                        (versions[r] for r in chunk),
                        key=lambda v: fhir.instant(v) or datetime.min.replace(tzinfo=UTC),
                    )
                copies += await self._patients_or_refused(chunk, since, result)
        return copies

    async def _patients_or_refused(
        self, chunk: list[str], since: str | None, result: PullResult
    ) -> list[UpstreamCopy]:
        """The Patients of ``chunk``; a refused read (a 4xx about it: a patient restricted,
        merged or deleted upstream) asked again one id at a time, the refused ones counted.
        Those refused, or asked for whatever their version and not answered, are asked for
        alone on later passes, each after a wait doubling at each miss."""
        try:
            found = await self._read_patients(chunk, since, result)
        except UpstreamError as exc:
            if exc.failure is not Failure.PERMANENT:
                raise
            if len(chunk) > 1:
                return [
                    c
                    for ref in chunk
                    for c in await self._patients_or_refused([ref], since, result)
                ]
            self._refused[chunk[0]] = missed_again(self._refused.get(chunk[0]), self._clock())
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
                self._refused[ref] = missed_again(self._refused.get(ref), self._clock())
            else:
                self._refused.pop(ref, None)
        if missing:
            result.patients_missing += len(missing)
            logger.warning(
                "pull: %d Patients asked for by id were not in the upstream's answer; "
                "asked for again later (after a wait doubling at each miss, up to a day)",
                len(missing),
            )
        return found

    async def _read_patients(
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
        bundle = await self._get("Patient", query)
        base = self._upstream.base_url
        answered = [copy_of(localise(r, base)) for r in search_matches(bundle, "Patient")]
        followed: set[str] = set()
        for _ in range(len(chunk)):
            link = next_link(bundle, self._client)
            if link is None or link in followed:
                break
            followed.add(link)
            bundle = await self._get(link)
            answered += [copy_of(localise(r, base)) for r in search_matches(bundle, "Patient")]
        asked = set(chunk)
        found = {c.reference: c for c in answered if c.reference in asked}
        result.passed_over += len({c.reference for c in answered} - asked)
        return list(found.values())

    def _after_import(
        self, conn: sqlite3.Connection, outcomes: list[Imported], copies: list[UpstreamCopy]
    ) -> None:
        """In the import's transaction: newer copies held for review, twins noted."""
        self._hold_newer(conn, outcomes, copies)
        at = fhir.utc_text(self._clock())
        note_twins(
            conn,
            [
                Twin(o.reference, f"{o.reference.partition('/')[0]}/{o.logical_id}", at)
                for o in outcomes
                if o.outcome is ImportOutcome.ELSEWHERE
            ],
        )

    def _record_invalid(
        self, conn: sqlite3.Connection, outcomes: list[Imported], copies: list[UpstreamCopy]
    ) -> list[tuple[str, str, str]]:
        """Audit each copy refused by validation and not recorded yet (not stored, its
        stream's cursor moves past it: a patient whose appointment never reached the kiosk
        is explained); ``(<ref>@<version>, type, reason)`` of each. The upstream id, the type
        and the reason's class only: the validator's words may quote the data."""
        by_ref = {c.reference: c for c in copies}
        recorded = []
        events = []
        for item in outcomes:
            copy = by_ref.get(item.reference)
            if item.outcome is not ImportOutcome.INVALID or copy is None:
                continue
            key = f"{item.reference}@{item.version_id or copy.last_updated}"
            if key in self._invalid_seen:
                continue
            reason = invalid_reason(copy.resource)
            recorded.append((key, copy.type, reason))
            patient = about(copy.resource)
            local = None if patient is None else resource_for_upstream(conn, patient)
            events.append(
                AuditEvent(
                    ACTOR,
                    AuditAction.SYNC,
                    outcome=Outcome.FAILURE,
                    patient_key=(
                        None if local is None else self._store.patient_key(f"Patient/{local[1]}")
                    ),
                    # The local resource it would have replaced, else the type alone: an
                    # upstream id there would read as a local one.
                    entity=(
                        copy.type if item.logical_id is None else f"{copy.type}/{item.logical_id}"
                    ),
                    detail=f"pulled {item.reference}: not stored, it fails validation ({reason})",
                )
            )
        if events:
            audit.append(conn, events, now=self._clock())
        return recorded

    def _hold_newer(
        self,
        conn: sqlite3.Connection,
        outcomes: list[Imported],
        copies: Sequence[UpstreamCopy],
    ) -> None:
        """A newer upstream version of a resource under review goes into the review; one of a
        resource whose local edit the upstream refused opens a review (nothing overwritten)."""
        by_ref = {c.reference: c for c in copies}
        for item in outcomes:
            if item.outcome is not ImportOutcome.HELD or item.row_id is None:
                continue
            review = conn.execute(
                "SELECT id FROM review_queue WHERE resource_id = ? AND state = 'open'",
                (item.row_id,),
            ).fetchone()
            copy = by_ref.get(item.reference)
            if copy is None:
                continue
            if review is not None:
                refresh_review(
                    conn,
                    self._store.current_keyring(conn),
                    int(review[0]),
                    copy.resource,
                    copy.version_id,
                )
            else:
                # Held for a local edit the upstream refused: a nurse decides between them.
                review_refused_edit(conn, self._store, item.row_id, copy, self._clock())
