"""Version-checked updates upstream; the conflicts they meet go to the review queue.

A person's edit of demographics (:meth:`appliance.store.Store.update`) leaves an outbox row
``kind='update'`` whose ``if_match`` names the upstream version the edit was based on.
:class:`UpdateSender` sends those rows one at a time — each carries its own precondition, and
a refusal must reach a person — as ``PUT <Type>/<upstream id>`` with ``If-Match: W/"<version>"``
and the resource as it is *now* (so one row also carries any later edit), without its
generated narrative (``text``: it describes the version before the edit; one whose status
is ``additional`` says more than the data and goes as it is):

* 200/201 → delivered; the new upstream version (from the body's ``meta``, the ETag, or a
  ``Location``/``Content-Location`` ending ``_history/<version>``) is recorded as the base of
  the next edit. An answer that names none leaves it unknown: the next edit takes the
  upstream's version when its copy is what this box sent (below), else a nurse decides;
* 412 (or 409, which some servers answer for a version conflict) → the upstream changed
  meanwhile. If it now holds exactly our version (our own earlier PUT whose answer was
  lost), the row is delivered. If it holds the body this row sent on the very version its
  edit is based on (``outbox.sent``, (version, keyed digest) pairs kept before each PUT
  goes: that PUT landed, its answer lost, and the resource was edited again since), the
  row is sent again on that version, once a pass. Nothing looser: a body sent on another
  version or by another row may have been put back at the EHR by someone since (an undo,
  the same change made there after a nurse took theirs), and is theirs to review. Otherwise the row is set aside ('dead', sealed message) and a review
  item keeps both versions, sealed, for a nurse (:mod:`sync_agent.review_queue`). Nothing is
  overwritten either way;
* 5xx, 429, 408, no connection, no answer → retried later with jittered backoff, and the
  pass stops there (so it does at a 401: our credentials). Resending a PUT whose answer was
  lost is safe: it meets a 412, and the rule above recognises our version;
* a refusal of that one record — a 409 on a version nobody changed (a lock; after 5 of them,
  counted apart from other tries, a nurse decides), a 423, a 403 (an access rule for it) →
  that row is retried later and the pass goes on to the others: the link is not in question.
  But three 403s in a row with nothing taken (or every row of a shorter pass refused so)
  is this box's client without write access (a scope at the EHR): the pass stops and the
  step is held back as a whole, as for our credentials;
* any other 4xx → dead letter with the server's message (sealed, it may quote PHI).

A row whose resource has no upstream id yet waits until its create lands. A resource made
here whose upstream version was never read back (``if_match`` NULL) gets it from
``_history``: a single version there whose content is what our create sent is our own
create. More versions (or a ``total`` above one), another content, or a create whose sent
version is not certain (an edit saved before it was delivered) go the way of a 412: one
version alone is no proof, as a server keeping no history lists only the current one,
whoever wrote it.

The review queue itself (a nurse keeps ours or takes theirs) is
:mod:`sync_agent.review_queue`. The database thread's side (loading the due rows, recording
each outcome) is :class:`sync_agent.update_queue.UpdateQueue`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from appliance import db, fhir
from appliance.store import Store
from sync_agent.outbox_schedule import RETRY_HORIZON, backoff_s
from sync_agent.pull_answers import localise
from sync_agent.review_queue import Conflict, updated_of
from sync_agent.update_queue import UpdateQueue, UpdateRow, keep_location
from sync_agent.update_versions import (
    content,
    created_content,
    digest,
    note_sending,
    ours_after,
    version_in_location,
    version_of,
)
from sync_agent.upstream import (
    Failure,
    UpstreamError,
    bundle_entries,
    classify_for_resource,
    exchange,
    outcome_text,
    response_json,
    retry_after_seconds,
    search_matches,
)

logger = logging.getLogger(__name__)

_CONFLICT = (409, 412)
_BUSY_TRIES = 5  # a 409 on an unchanged version: tried this often, then put to a nurse
# Refusals of one record, not of the link nor of this client as a whole (that is a 401): a
# lock on it (a 409 on a version nobody changed, a 423), an access rule for it (a 403, as
# the pull reads one for a search). The row waits its backoff; the other records go on.
_RECORD_REFUSALS = frozenset({403, 409, 423})
# 403s one after another, nothing taken in the pass: the client lacks write access (a scope),
# not one record a rule of the EHR's restricts; the pass stops and the step backs off.
_FORBIDDEN_IN_A_ROW = 3


def _server_message(response: httpx.Response) -> str:
    return outcome_text(response_json(response)) or f"HTTP {response.status_code}"


class _RecordRefused(UpstreamError):
    """A refusal of one record (:data:`_RECORD_REFUSALS`): its row waits, the pass goes on."""

    __slots__ = ()


class _Busy(_RecordRefused):
    """A 409 on a version nobody changed: counted apart from other tries (``busy_409s``)."""

    __slots__ = ()


def _must_wait(response: httpx.Response, body: Any) -> UpstreamError | None:
    """For a failed exchange with one resource's address: the error to raise when the
    update must wait and be tried again (the link, a rate limit, our credentials, the
    address itself; or that record alone, :class:`_RecordRefused`), None when the answer is
    about the resource: a dead letter (:func:`~sync_agent.upstream.classify_for_resource`)."""
    status = response.status_code
    refusal = classify_for_resource(
        status,
        body,
        response.headers.get("Retry-After"),
        served=response.headers.get("Date"),
    )
    if status in _RECORD_REFUSALS:
        said = outcome_text(body) or f"HTTP {status}"
        return _RecordRefused(
            Failure.PERMANENT if status == 403 else Failure.TRANSIENT,
            f"the upstream refused this record for now (HTTP {status}): {said}",
            refusal.retry_after_s,
        )
    if refusal.failure in (Failure.PERMANENT, Failure.TOO_LARGE):
        return None
    return refusal


# -- the sender ------------------------------------------------------------------------------


@dataclass
class UpdateResult:
    """What one pass did (figures for logs and status; no PHI)."""

    delivered: int = 0
    conflicts: int = 0
    dead: int = 0
    retry: int = 0
    waiting: int = 0
    error: str | None = None
    link_down: bool = False
    stopped_by: UpstreamError | None = None  # the exchange failure that ended the pass
    # Every update the pass sent was refused with a 403 (then stopped_by says so, as auth:
    # this box's client without write access, the step held back as a whole).
    refused: bool = False


class UpdateSender:
    """Sends the pending version-checked updates of one store to one upstream."""

    def __init__(
        self,
        store: Store,
        client: httpx.AsyncClient,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        also_known_as: tuple[str, ...] = (),
    ) -> None:
        self._store = store
        self._client = client
        self._also_known_as = also_known_as  # the EHR's other addresses (own_address)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._clock = clock
        self._queue = UpdateQueue(store, clock)  # its rows, on the database thread

    async def send_once(self, *, max_items: int = 20) -> UpdateResult:
        """Send the due updates (at most ``max_items``); stops at a failure of the link, of a
        whole server or of our credentials. A refusal of one record (locked, restricted:
        :data:`_RECORD_REFUSALS`) has that row wait and the others go on. Never raises for
        the link: the result says what happened."""
        result = UpdateResult()
        now = self._clock()
        conn = self._store.connection
        rows, result.dead, result.waiting = await db.run_sync(
            conn, self._queue.load, fhir.utc_text(now), max_items
        )
        forbidden = in_a_row = 0
        for row in rows:
            try:
                await self._send(row, now, result)
            except UpstreamError as exc:
                delay = (
                    min(exc.retry_after_s, RETRY_HORIZON.total_seconds())
                    if exc.retry_after_s is not None
                    else backoff_s(row.attempts, self._rng)
                )
                busy = isinstance(exc, _Busy)
                await db.run_sync(conn, self._queue.retry, row, exc.message, delay, now, busy)
                result.retry += 1
                result.error = str(exc)
                if isinstance(exc, _RecordRefused):
                    # About this record alone: the link is up, and the others are tried.
                    # Unless 403s come one after another with nothing taken: that is this
                    # box's client without the write access (a scope at the EHR), and
                    # every row would be sent again for nothing, pass after pass.
                    is_403 = exc.failure is Failure.PERMANENT
                    forbidden += is_403
                    in_a_row = in_a_row + 1 if is_403 else 0
                    taken = result.delivered or result.conflicts or result.dead
                    if in_a_row >= _FORBIDDEN_IN_A_ROW and not taken:
                        result.stopped_by = UpstreamError(
                            Failure.AUTH,
                            f"the upstream refused {in_a_row} updates in a row with HTTP "
                            "403: does this box's client have write access (a scope) "
                            "for them there?",
                        )
                        break
                    continue
                result.link_down = exc.failure is Failure.TRANSIENT
                result.stopped_by = exc
                break
        answered = result.delivered or result.conflicts or result.dead
        result.refused = forbidden > 0 and forbidden == result.retry and not answered
        if result.refused and result.stopped_by is None:
            result.stopped_by = UpstreamError(
                Failure.AUTH,
                f"the upstream refused every update of the pass ({forbidden}) with HTTP 403: "
                "does this box's client have write access (a scope) for them there?",
            )
        if answered:
            logger.info(
                "updates: %d delivered, %d conflicts for review, %d dead-lettered",
                result.delivered,
                result.conflicts,
                result.dead,
            )
        return result

    async def _send(self, row: UpdateRow, now: datetime, result: UpdateResult) -> None:
        conn = self._store.connection
        if row.link is None or row.outgoing is None:
            if row.create_state == "pending":
                # Its create went back into the queue since the load (sent again by staff).
                result.waiting += 1
                return
            if row.create_state == "delivered" and await self._learn_location(row):
                result.waiting += 1  # its upstream id is known now: sent on the next pass
                return
            why = {
                "dead": "its create was refused upstream",
                "delivered": "its create was answered without a location, and no single "
                "record upstream carries our identifier",
            }.get(row.create_state or "", "unknown")
            await db.run_sync(
                conn, self._queue.dead, row, f"not on the upstream ({why})", None, now
            )
            result.dead += 1
            return
        ref = row.link.upstream_ref
        base = row.if_match or row.link.version_id
        rebased = False
        if base is None:
            base = await self._own_version(row, ref)
            if base is None:
                base = await self._conflict(row, ref, None, now, result, rebase=True)
                if base is None:
                    return
                rebased = True
        sent_digest = digest(self._store, row.outgoing)
        while True:
            # Kept before it goes: if the answer is lost, the copy upstream may be this one.
            await db.run_sync(conn, note_sending, row.outbox_id, base, sent_digest)
            response = await exchange(
                self._client, "PUT", ref, json=row.outgoing, headers={"If-Match": f'W/"{base}"'}
            )
            status = response.status_code
            if 200 <= status < 300:
                body = response_json(response)
                # With no version said at all, the link's version becomes unknown (the one
                # we sent on is stale now): the next edit finds it by what this one sent
                # (_conflict), or goes to a nurse.
                version = version_of(body, response) or version_in_location(response, ref)
                await db.run_sync(
                    conn, self._queue.delivered, row, ref, version, updated_of(body), now
                )
                result.delivered += 1
            elif status in _CONFLICT:
                busy = response if status == 409 else None
                # Once a pass: a version of ours met again is looked at on the next one.
                base = await self._conflict(
                    row, ref, base, now, result, busy=busy, rebase=not rebased
                )
                if base is not None:
                    rebased = True
                    continue
            else:
                wait = _must_wait(response, response_json(response))
                if wait is not None:
                    raise wait
                await db.run_sync(conn, self._queue.dead, row, _server_message(response), None, now)
                result.dead += 1
            return

    async def _learn_location(self, row: UpdateRow) -> bool:
        """Find the upstream id of a resource whose create the server took without saying
        where it put it (a batch answer with no ``location``): by our identifier, which every
        create carries. Kept on the create's outbox row, where the link is read from. False
        when no single record upstream carries it."""
        ours = f"{fhir.IDENTIFIER_SYSTEM}|{fhir.identifier_value(row.logical_id)}"
        response = await exchange(self._client, "GET", row.type, params={"identifier": ours})
        body = response_json(response)
        if response.status_code >= 300 and (wait := _must_wait(response, body)):
            raise wait
        found = search_matches(body, row.type)
        if response.status_code != 200 or len(found) != 1:
            return False
        ref = f"{row.type}/{found[0]['id']}"
        await db.run_sync(self._store.connection, keep_location, row.resource_id, ref)
        return True

    async def _own_version(self, row: UpdateRow, ref: str) -> str | None:
        """The version of a resource we created, if nobody has changed it since (else None).

        From ``_history``: one version there, whose content is what our create sent. One
        version alone proves nothing: a server that keeps no history (Azure's
        ``no-version`` policy, HealthLake without it, history purged) lists only the
        current version, whoever wrote it, and taking that for our create would overwrite
        the EHR's change unseen. A ``total`` above one is a change too. When what the create
        sent is not certain (:func:`~sync_agent.update_versions.created_content`), nothing is asked: the conflict read decides,
        and a person if the copies differ (a false "changed" costs a review; a false
        "unchanged" overwrites the EHR).
        """
        created = await db.run_sync(
            self._store.connection, created_content, self._store, row.resource_id, row.resource
        )
        if created is None:
            return None
        response = await exchange(self._client, "GET", f"{ref}/_history")
        status = response.status_code
        # A 403 here is history not offered to us, not our credentials: the version is
        # unknowable and the conflict read below decides.
        if (
            status >= 300
            and status != 403
            and (wait := _must_wait(response, response_json(response)))
        ):
            raise wait
        body = response_json(response)
        entries = bundle_entries(body)
        total = body.get("total") if isinstance(body, dict) else None
        if (
            status != 200
            or len(entries) != 1
            or (isinstance(total, int) and not isinstance(total, bool) and total > 1)
        ):
            return None  # changed upstream since our create (or unknowable): a person decides
        resource = entries[0].get("resource")
        if not isinstance(resource, dict) or content(resource) != created:
            return None  # the one version listed is not ours: someone else's change
        return version_of(resource)

    async def _conflict(
        self,
        row: UpdateRow,
        ref: str,
        base: str | None,
        now: datetime,
        result: UpdateResult,
        *,
        busy: httpx.Response | None = None,
        rebase: bool = False,
    ) -> str | None:
        """Read the upstream copy after a 412/409 (or when the base is unknown) and record
        what follows: delivered (it is our version), retried (busy), a review. Returns the
        version to send again on instead (``rebase``): the copy upstream is one this box
        sent (:func:`~sync_agent.update_versions.note_sending`), whose answer was lost, and a later edit rides on the row."""
        conn = self._store.connection
        response = await exchange(self._client, "GET", ref)
        theirs = response_json(response)
        if response.status_code >= 300 and (wait := _must_wait(response, theirs)):
            # Not reading their copy (our credentials lapsed, a proxy's page) is no reason
            # to give up on our edit: it waits, and the conflict is looked at again.
            raise wait
        if (
            response.status_code != 200
            or not isinstance(theirs, dict)
            or fhir.json_depth(theirs) > fhir.MAX_JSON_DEPTH
        ):
            message = f"version conflict, and the upstream copy is unreadable: {_server_message(response)}"
            await db.run_sync(conn, self._queue.dead, row, message, None, now)
            result.dead += 1
            return None
        # Its references to the EHR itself as the pull stores them (relative): so they are
        # compared with ours, and so a nurse's "take theirs" stores them as the pull would.
        theirs = localise(theirs, str(self._client.base_url), self._also_known_as)
        version = version_of(theirs, response)
        if content(theirs) == content(row.outgoing):
            # Our own earlier PUT landed and its answer was lost: nothing to review.
            await db.run_sync(
                conn, self._queue.delivered, row, ref, version, updated_of(theirs), now
            )
            result.delivered += 1
            return None
        unchanged = base is not None and version == base
        if rebase and version is not None and not unchanged:
            ours = await db.run_sync(conn, ours_after, row.outbox_id, row.resource_id, base)
            if digest(self._store, theirs) in ours:
                # An earlier PUT of ours landed, its answer lost, and the resource was edited
                # again since: nobody else changed it, so no review of our edit against
                # itself (whose "take theirs" would drop the later edit). It goes on that.
                return version
        message = f"the upstream changed since version {base or 'unknown'}: held for review"
        if busy is not None and unchanged:
            said = _server_message(busy)
            if row.busy_409s + 1 < _BUSY_TRIES:
                # A 409 while their copy is still the version our edit is based on: nobody
                # changed it (a lock, a busy server). Tried again, not for a nurse. Counted
                # apart: tries the link failed are no refusals by the EHR.
                raise _Busy(
                    Failure.TRANSIENT,
                    f"HTTP 409, version unchanged: {said}",
                    retry_after_seconds(
                        busy.headers.get("Retry-After"),
                        now=now,
                        served=busy.headers.get("Date"),
                    ),
                )
            # Refused that way every time: a rule at the EHR, then, and a person decides.
            message = f"refused {_BUSY_TRIES} times with HTTP 409 ({said}): held for review"
        await db.run_sync(
            conn, self._queue.dead, row, message, Conflict(theirs, base, version), now
        )
        result.conflicts += 1
        return None
