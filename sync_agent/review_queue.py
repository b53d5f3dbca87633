"""The review queue: local edits the upstream refused as out of date, for a nurse to decide.

:class:`~sync_agent.updates.UpdateSender` opens a review when a version-checked update meets
a 412 (or 409) and the upstream holds another version than ours; the pull
(:mod:`sync_agent.pull_import`) opens one for a refused edit once the upstream has a newer
copy, and puts each newer upstream version into an open review (:func:`refresh_review`).
Both versions are kept sealed; nothing is overwritten either way.

:meth:`ReviewQueue.keep_mine` re-queues the update against the upstream's current version;
:meth:`ReviewQueue.take_theirs` makes the upstream's version the local copy (ours stays in
``resource_history``). Opening an item is audited as a read. A review shows our version as
stored when it opened (an edit saved while the refused PUT was on the wire included), and a
pull may put a newer upstream version into it while a nurse looks: a decision names the
upstream version it was made on, and is refused (:class:`ReviewChangedError`, nothing
changed) when the review holds another by the time it is recorded.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import orjson

from appliance import audit, db, fhir
from appliance.audit import AuditAction, AuditEvent
from appliance.errors import NotFoundError, TamperedDataError
from appliance.keys import Keyring
from appliance.store import (
    REFUSED_EDIT_SQL,
    Imported,
    ImportOutcome,
    Lane,
    Store,
    UpstreamCopy,
    link_for_resource,
    queued_at,
    save_link,
)

ACTOR = "service:sync"
REVIEW_TABLE = "review_queue"
MINE_LABEL = "review_queue.mine"
THEIRS_LABEL = "review_queue.theirs"


class ReviewError(NotFoundError):
    """A review item that does not exist or is no longer open."""


class ReviewChangedError(ReviewError):
    """A review item whose upstream version is no longer the one the decision was made on."""


class ReviewNotTakenError(ReviewError):
    """Take theirs could not make their copy the local one (it is held for a local change
    still waiting, or our identifier is on another record here): nothing was decided."""


def updated_of(resource: Any) -> str | None:
    meta = resource.get("meta") if isinstance(resource, dict) else None
    value = meta.get("lastUpdated") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def patient_key(store: Store, rtype: str, logical_id: str) -> bytes | None:
    return store.patient_key(f"Patient/{logical_id}") if rtype == "Patient" else None


@dataclass(frozen=True, slots=True)
class Conflict:
    """The upstream's copy a version-checked update met, and the version our edit was on."""

    theirs: fhir.FhirJson
    base: str | None
    # The version of ``theirs``: its meta.versionId, or the ETag of the answer that carried it
    # (a server may leave meta out of the body; "keep mine" then still goes with If-Match).
    version: str | None


def open_review(
    conn: sqlite3.Connection,
    keyring: Keyring,
    *,
    resource_id: int,
    outbox_id: int,
    upstream_ref: str,
    mine: fhir.FhirJson,
    conflict: Conflict,
    stamp: str,
) -> int:
    """Open a review of our edit ``mine`` against the upstream's copy (inside a write
    transaction), or put both versions into the one already open for the resource."""
    existing = conn.execute(
        "SELECT id FROM review_queue WHERE resource_id = ? AND state = 'open'",
        (resource_id,),
    ).fetchone()
    if existing is None:
        review_id = int(
            conn.execute("SELECT coalesce(max(id), 0) + 1 FROM review_queue").fetchone()[0]
        )
        conn.execute(
            "INSERT INTO review_queue (id, resource_id, outbox_id, upstream_ref, base_version, "
            "created_at, mine, theirs) VALUES (?, ?, ?, ?, ?, ?, x'', x'')",
            (review_id, resource_id, outbox_id, upstream_ref, conflict.base, stamp),
        )
    else:
        review_id = int(existing[0])
    conn.execute(
        "UPDATE review_queue SET mine = ? WHERE id = ?",
        (keyring.seal(MINE_LABEL, str(review_id), orjson.dumps(mine).decode()), review_id),
    )
    refresh_review(conn, keyring, review_id, conflict.theirs, conflict.version)
    return review_id


def review_refused_edit(
    conn: sqlite3.Connection, store: Store, resource_id: int, theirs: UpstreamCopy, now: datetime
) -> int | None:
    """A review for a local edit the upstream refused (a dead letter nobody decided) now
    that the upstream has a newer copy (the pull found it, inside its write transaction).

    Neither version is dropped: ours stays here, theirs goes into the review, and a nurse
    decides as for a version conflict. None when there is no such edit, or ours cannot be
    read (then the upstream's copy stays held back, and the store check names the record).
    """
    found = conn.execute(REFUSED_EDIT_SQL, (resource_id,)).fetchone()
    stored = conn.execute(
        "SELECT id, logical_id, type, key_version, body FROM resources WHERE id = ?",
        (resource_id,),
    ).fetchone()
    link = link_for_resource(conn, resource_id)
    if found is None or stored is None or link is None:
        return None
    try:
        mine = store.decrypt_stored(conn, tuple(stored))
    except TamperedDataError:
        return None
    outbox_id, if_match = int(found[0]), found[1]
    conflict = Conflict(theirs.resource, if_match or link.version_id, theirs.version_id)
    review_id = open_review(
        conn,
        store.current_keyring(conn),
        resource_id=resource_id,
        outbox_id=outbox_id,
        upstream_ref=link.upstream_ref,
        mine=mine.resource,
        conflict=conflict,
        stamp=fhir.utc_text(now),
    )
    audit.append(
        conn,
        [
            AuditEvent(
                ACTOR,
                AuditAction.CREATE,
                patient_key=patient_key(store, mine.type, mine.logical_id),
                entity=f"review/{review_id}",
                detail=f"{mine.type}/{mine.logical_id}: refused local edit, changed upstream",
            )
        ],
        now=now,
    )
    return review_id


def refresh_review(
    conn: sqlite3.Connection,
    keyring: Keyring,
    review_id: int,
    theirs: fhir.FhirJson,
    version: str | None,
) -> None:
    """Put the upstream's newest version into an open review (inside a write transaction).

    ``version`` is the one the upstream gave for it (the body's meta.versionId, or the
    answer's ETag): "keep mine" sends the edit with ``If-Match`` on it.
    """
    conn.execute(
        "UPDATE review_queue SET theirs = ?, theirs_version = ?, theirs_updated = ? WHERE id = ?",
        (
            keyring.seal(THEIRS_LABEL, str(review_id), orjson.dumps(theirs).decode()),
            version,
            updated_of(theirs),
            review_id,
        ),
    )


# -- the review queue -----------------------------------------------------------------------


class ReviewState(StrEnum):
    """The life of a review item."""

    OPEN = "open"
    KEPT_MINE = "kept-mine"
    TOOK_THEIRS = "took-theirs"


@dataclass(frozen=True, slots=True)
class ReviewItem:
    """A conflict as listed for a nurse (no PHI: the versions themselves stay sealed)."""

    id: int
    resource_type: str
    logical_id: str
    upstream_ref: str
    base_version: str | None
    theirs_version: str | None
    created_at: str
    state: ReviewState
    resolved_by: str | None
    resolved_at: str | None


@dataclass(frozen=True, slots=True)
class ReviewCase:
    """An opened review item: our version (local ids) and the upstream's (upstream ids)."""

    item: ReviewItem
    mine: fhir.FhirJson
    theirs: fhir.FhirJson
    reason: str | None = None  # why it is here: the EHR's refusal, or "the upstream changed…"


_ITEM_SQL = (
    "SELECT q.id, r.type, r.logical_id, q.upstream_ref, q.base_version, q.theirs_version, "
    "q.created_at, q.state, q.resolved_by, q.resolved_at FROM review_queue q "
    "JOIN resources r ON r.id = q.resource_id"
)


def _with_access(detail: str, access: str | None) -> str:
    # The access first, as every read of a record gives it (the audit report finds
    # break-glass by its marker at the start).
    return detail if access is None else f"{access}; {detail}"


def _item(row: tuple[Any, ...]) -> ReviewItem:
    return ReviewItem(
        id=row[0],
        resource_type=row[1],
        logical_id=row[2],
        upstream_ref=row[3],
        base_version=row[4],
        theirs_version=row[5],
        created_at=row[6],
        state=ReviewState(row[7]),
        resolved_by=row[8],
        resolved_at=row[9],
    )


class ReviewQueue:
    """Local edits the upstream refused as out of date, waiting for a nurse to decide."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def items(self, state: ReviewState | None = ReviewState.OPEN) -> list[ReviewItem]:
        """Review items (open ones by default), oldest first; their contents stay sealed."""
        where, params = (" WHERE q.state = ?", (state.value,)) if state else ("", ())
        rows = await self._store.query(f"{_ITEM_SQL}{where} ORDER BY q.id", params)
        return [_item(row) for row in rows]

    async def _get(self, review_id: int) -> tuple[ReviewItem, bytes, bytes, int]:
        rows = await self._store.query(f"{_ITEM_SQL} WHERE q.id = ?", (review_id,))
        sealed = await self._store.query(
            "SELECT mine, theirs, resource_id FROM review_queue WHERE id = ?", (review_id,)
        )
        if not rows or not sealed:
            raise ReviewError(f"no review item {review_id}")
        mine, theirs, resource_id = sealed[0]
        return _item(rows[0]), bytes(mine), bytes(theirs), int(resource_id)

    async def item(self, review_id: int) -> ReviewItem:
        """One review item as listed (its contents stay sealed); ReviewError if none."""
        item, _, _, _ = await self._get(review_id)
        return item

    async def open(self, review_id: int, actor: str, *, access: str | None = None) -> ReviewCase:
        """Both versions of a review item (audited as a read of that patient's record, with
        ``access``: the access it was opened under, as every read of a record names it)."""
        item, mine, theirs, _ = await self._get(review_id)
        event = AuditEvent(
            actor,
            AuditAction.READ,
            patient_key=patient_key(self._store, item.resource_type, item.logical_id),
            entity=f"review/{review_id}",
            detail=_with_access(f"{item.resource_type}/{item.logical_id}", access),
        )
        await self._store.transact(lambda _conn: None, [event])
        keyring = self._store.keyring  # the transaction loaded any key rotated in meanwhile
        return ReviewCase(
            item,
            orjson.loads(keyring.unseal(MINE_LABEL, str(review_id), mine)),
            orjson.loads(keyring.unseal(THEIRS_LABEL, str(review_id), theirs)),
            await self._reason(review_id),
        )

    async def _reason(self, review_id: int) -> str | None:
        """The message its update was held with (sealed: a server's words may quote data),
        shown with the two versions; None when there is none or it does not open."""
        rows = await self._store.query(
            "SELECT o.id, o.last_error FROM review_queue q JOIN outbox o ON o.id = q.outbox_id "
            "WHERE q.id = ?",
            (review_id,),
        )
        if not rows or rows[0][1] is None:
            return None
        try:
            return self._store.keyring.unseal("outbox", str(rows[0][0]), bytes(rows[0][1]))
        except TamperedDataError:
            return None

    def _resolve(
        self,
        conn: sqlite3.Connection,
        review_id: int,
        state: ReviewState,
        actor: str,
        shown: str | None,
    ) -> str | None:
        """Record the decision on an open review (inside the decision's write transaction);
        the upstream version it was made on.

        ReviewError when it is no longer open; ReviewChangedError when ``shown`` is not the
        upstream version it holds now (a pull put a newer one in since it was shown).
        """
        found = conn.execute(
            "SELECT theirs_version FROM review_queue WHERE id = ? AND state = 'open'",
            (review_id,),
        ).fetchone()
        if found is None:
            raise ReviewError(f"review item {review_id} is not open")
        version: str | None = found[0]
        if shown != version:
            raise ReviewChangedError(
                f"review item {review_id}: the upstream version changed since it was shown"
            )
        cur = conn.execute(
            "UPDATE review_queue SET state = ?, resolved_by = ?, resolved_at = ? "
            "WHERE id = ? AND state = 'open' AND theirs_version IS ?",
            (state.value, actor, fhir.utc_text(self._store.now()), review_id, version),
        )
        if cur.rowcount != 1:
            raise ReviewError(f"review item {review_id} is not open")
        return version

    async def keep_mine(
        self,
        review_id: int,
        actor: str,
        *,
        access: str | None = None,
        theirs_version: str | None,
    ) -> None:
        """Keep our version: re-queue the update, checked against the upstream's version.

        ``theirs_version``: the upstream version the person deciding was shown. When the
        review holds another by now, ReviewChangedError and nothing changes: keeping ours over
        a version nobody saw would overwrite it unseen. Required: a decision always names
        what it was made on.
        """
        item, _, _, resource_id = await self._get(review_id)

        def work(conn: sqlite3.Connection) -> None:
            version = self._resolve(conn, review_id, ReviewState.KEPT_MINE, actor, theirs_version)
            lane = conn.execute(
                "SELECT o.lane FROM review_queue q JOIN outbox o ON o.id = q.outbox_id "
                "WHERE q.id = ?",
                (review_id,),
            ).fetchone()
            conn.execute(
                "INSERT INTO outbox (lane, resource_id, kind, if_match, queued_at) "
                "VALUES (?, ?, 'update', ?, ?)",
                (
                    int(Lane.CLINICAL) if lane is None else lane[0],
                    resource_id,
                    version,
                    queued_at(self._store.now()),
                ),
            )
            link = link_for_resource(conn, resource_id)
            if link is not None:
                # Our copy is now "theirs plus our edit": a pull of their version changes nothing.
                save_link(
                    conn,
                    link,
                    version_id=version,
                    last_updated=link.last_updated,
                    now=fhir.utc_text(self._store.now()),
                )

        event = AuditEvent(
            actor,
            AuditAction.UPDATE,
            patient_key=patient_key(self._store, item.resource_type, item.logical_id),
            entity=f"review/{review_id}",
            detail=_with_access("kept the local version; update re-queued", access),
        )
        await self._store.transact(work, [event])

    async def take_theirs(
        self,
        review_id: int,
        actor: str,
        *,
        access: str | None = None,
        theirs_version: str | None,
    ) -> None:
        """Take the upstream's version: it becomes the local copy (ours stays in the history).

        ``theirs_version`` as for :meth:`keep_mine`. Either way the copy taken is the one the
        review holds when the decision is recorded (ReviewChangedError if a pull replaced it
        in between).
        """
        item, _, sealed, resource_id = await self._get(review_id)
        if theirs_version != item.theirs_version:
            raise ReviewChangedError(
                f"review item {review_id}: the upstream version changed since it was shown"
            )
        keyring = await db.run_sync(self._store.connection, self._store.current_keyring)
        theirs = orjson.loads(keyring.unseal(THEIRS_LABEL, str(review_id), sealed))
        # Refused here, before the review is marked resolved.
        await asyncio.to_thread(fhir.validate, theirs)
        copy = UpstreamCopy(item.upstream_ref, item.theirs_version, updated_of(theirs), theirs)
        event = AuditEvent(
            actor,
            AuditAction.UPDATE,
            patient_key=patient_key(self._store, item.resource_type, item.logical_id),
            entity=f"review/{review_id}",
            detail=_with_access("took the upstream version", access),
        )

        def before(conn: sqlite3.Connection) -> None:
            self._resolve(conn, review_id, ReviewState.TOOK_THEIRS, actor, item.theirs_version)
            # The link names the version our edit was based on, which may be the very one
            # taken (a 409 every time on an unchanged version): the import would skip it as
            # already held (CURRENT) and keep our edit. The local copy is that version plus
            # our edit, so no upstream version; the import records theirs on the link.
            conn.execute(
                "UPDATE upstream_links SET version_id = NULL WHERE resource_id = ?",
                (resource_id,),
            )
            audit.append(conn, [event], now=self._store.now())

        def replaced(_conn: sqlite3.Connection, outcomes: list[Imported]) -> None:
            # Resolved as "took theirs" only if their copy is now the local one.
            if [o.outcome for o in outcomes] != [ImportOutcome.UPDATED]:
                found = ", ".join(o.outcome.value for o in outcomes) or "nothing"
                raise ReviewNotTakenError(
                    f"review item {review_id}: the upstream version was not stored ({found})"
                )

        await self._store.import_upstream(
            [copy], actor, reason="review", before=before, also=replaced
        )
