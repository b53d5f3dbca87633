"""Taking what the pull read into the store: a page's resources, their Patients, its cursor.

:mod:`sync_agent.pull_streams` hands each page it reads to :meth:`Importer.take`: what the
search asked for is stored through :meth:`appliance.store.Store.import_upstream` with the
Patients it names and the stream's new cursor, in one transaction. In that transaction a newer
upstream version of a resource under review goes into the review, twins are noted, and a copy
the FHIR R4B model refuses is audited (once a version) instead of stored.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from appliance import audit, fhir
from appliance.audit import AuditAction, AuditEvent, Outcome
from appliance.config import UpstreamConfig
from appliance.store import Imported, ImportOutcome, Store, UpstreamCopy, resource_for_upstream
from sync_agent.pull_answers import (
    APPOINTMENTS,
    Cursor,
    about,
    asked_for,
    captured_elsewhere,
    copy_of,
    invalid_reason,
    localise,
    patients_of,
)
from sync_agent.pull_patients import PatientFetcher
from sync_agent.pull_result import PullResult
from sync_agent.pull_state import save_cursor
from sync_agent.pull_twins import Twin, note_twins
from sync_agent.review_queue import refresh_review, review_refused_edit

logger = logging.getLogger(__name__)

ACTOR = "service:sync"
HOME_TAG = {"system": fhir.CAPTURE_SETTING_SYSTEM, "code": "home"}


class Importer:
    """Stores what the pull read from one upstream, with the cursor it moved, and counts it."""

    def __init__(
        self,
        store: Store,
        upstream: UpstreamConfig,
        patients: PatientFetcher,
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._upstream = upstream
        self._patients = patients
        self._clock = clock
        # Versions refused by validation and recorded already (``<ref>@<version>``): the
        # look-back meets them again while the cursor is near, and they are audited once.
        self._invalid_seen: set[str] = set()

    async def take(
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
        fresh = [r for r in unseen if asked_for(rtype, params, r)]
        result.passed_over += len(unseen) - len(fresh)
        fresh = [localise(r, self._upstream.base_url, self._upstream.also_known_as) for r in fresh]
        after = cursor.advance(resources)
        copies = [copy_of(r) for r in fresh]
        tags: list[dict[str, str]] = []
        if rtype == APPOINTMENTS:
            wanted = set().union(*(patients_of(r) for r in fresh)) if fresh else set()
            copies = await self._patients.fetch(wanted, result) + copies
        elif rtype == "Observation":
            result.skipped += sum(1 for r in fresh if captured_elsewhere(r))
            copies = [c for c in copies if not captured_elsewhere(c.resource)]
            tags = [HOME_TAG]

        def then(conn: sqlite3.Connection) -> None:
            if save:
                save_cursor(conn, self._upstream.name, stream, after, self._clock())

        await self.import_copies(copies, result, tags=tags, then=then)
        result.pages += 1
        return after

    async def import_copies(
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
