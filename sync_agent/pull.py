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

**Where each part lives.** :class:`Puller` runs a pass. :mod:`sync_agent.pull_streams` pages
each stream, asking through :mod:`sync_agent.pull_search`; :mod:`sync_agent.pull_import` takes
each page into the store with the Patients :mod:`sync_agent.pull_patients` fetches by id.
:mod:`sync_agent.pull_answers` reads what was answered, :mod:`sync_agent.pull_state` keeps the
cursors, and :mod:`sync_agent.pull_result` holds what a pass did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

import httpx

from appliance import db
from appliance.config import UpstreamConfig
from appliance.store import Store
from sync_agent.pull_answers import APPOINTMENTS
from sync_agent.pull_import import Importer
from sync_agent.pull_patients import PatientFetcher
from sync_agent.pull_result import PullResult
from sync_agent.pull_state import enrolled_upstream_refs, load_refused, save_refused
from sync_agent.pull_streams import Streams, appointments_stream
from sync_agent.upstream import Failure, UpstreamError

logger = logging.getLogger(__name__)

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
        self._upstream = upstream
        self._interval_s = interval_s
        self._clock = clock
        self._last_pass: datetime | None = None
        self._more = False
        self._patients = PatientFetcher(store, client, upstream, clock)
        self._refused_loaded = False
        self._importer = Importer(store, upstream, self._patients, clock)
        self._streams = Streams(
            store,
            client,
            upstream,
            self._importer,
            page_size=page_size,
            max_pages=max_pages,
            overlap_s=overlap_s,
        )

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
            self._patients.refused = await db.run_sync(conn, load_refused, self._upstream.name)
            self._refused_loaded = True
        refused_before = dict(self._patients.refused)
        # "Sync now" asks every one of them again, whatever its wait: a person pressing it
        # has often just had a restriction lifted at the EHR.
        waits_over = self._patients.waits_over = _ANY_TIME if force else now
        due_again = {r for r, missed in self._patients.refused.items() if missed.due <= waits_over}
        try:
            if (location := self._upstream.location) is not None:
                stream = appointments_stream(location)
                await self._streams.guarded(stream, APPOINTMENTS, {"actor": location}, result)
            enrolled = await db.run_sync(self._store.connection, enrolled_upstream_refs)
            # A Patient refused here (or missing from the answer) is left out (counted); every
            # stream below still runs. One refused or missing before is asked again once its
            # wait is over: an Appointment pulled meanwhile names it by the upstream's id until
            # it is here (the kiosk finds it by its link).
            patients = await self._patients.fetch(set(enrolled) | due_again, result)
            if patients:
                await self._importer.import_copies(patients, result)
            for ref in enrolled:
                await self._streams.guarded(
                    f"Observation {ref}", "Observation", {"subject": ref}, result
                )
        except UpstreamError as exc:
            result.error = str(exc)
            result.link_down = exc.failure in (Failure.TRANSIENT, Failure.AMBIGUOUS)
            result.stopped_by = exc
            # Only the class: a server's words may quote what it refused.
            logger.warning("pull stopped: %s", exc.failure)
        if self._patients.refused != refused_before:
            await db.run_sync(conn, save_refused, self._upstream.name, self._patients.refused)
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
