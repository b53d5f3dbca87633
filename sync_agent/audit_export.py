"""Audit export: the hash-chained audit records go upstream as FHIR AuditEvents, exactly once.

The shapes (IHE BALP AuditEvents, the checkpoint's Provenance) are built by the pure
:mod:`sync_agent.balp`; where the export stands is kept in ``meta`` by
:mod:`sync_agent.audit_export_state`; the anchors upstream are read back and the trail held
to them by :mod:`sync_agent.audit_anchors`. This module streams, sends and keeps count.

**Exactly once.** Records leave in id order from a cursor (the last audit id settled
upstream), in ``batch`` Bundles of conditional creates
(``ifNoneExist: _tag=<record system>|<chain hash>``), so a resend after a lost answer finds
the event (200) instead of making a second one. The cursor moves in the same transaction
that records the outcome; a bundle that fails leaves it. Errors are those of
:mod:`sync_agent.upstream`: transient or ambiguous → stop, retry later; too large → smaller
bundles; an entry the server refuses for good (or over 64 KB and too large alone) is recorded
(a count and the newest reasons) and passed, so one bad record never stalls the chain. A
401/403, for the bundle or one entry, is our access, not the record: the export stops there
and resends from the same place later.

**Passed over is lost**, so a refusal of a whole request counts against a record only when
the record went alone and the FHIR server itself refused it (400 or 422 with its
OperationOutcome), and only once a record after it has gone through
(:meth:`AuditExporter.export_once`). A proxy's page, a 407, 426 or 431, the same answer to two
records in a row, or :data:`REFUSED_RUN` such refusals in a row, is the exchange: the export
stops where it is, passing none over, and is paced as for an address or credentials refused.
(As many bad records in a row stop it too: a stall a person sees, not a trail lost unseen.)

**Anchor.** The newest signed checkpoint fit to anchor goes up first in each drain, as a
``Provenance`` carrying the box's Ed25519 signature: well-formed, signed by this box, and its
record held by the trail with its hash (newer rows that are not, inserted or left behind by
a cut, are passed over and logged; ``audit verify`` names them). The last one the upstream
took, and the last it refused for good, are remembered; an anchor not taken never holds the
records back (an entry the upstream answered but did not take is sent again after a pause;
only a failed exchange stops both). Each drain first checks that the trail still holds the
records at its cursor and at the anchor (``check_trail``): a trail cut back and grown again
is reported, once, and sent again, not anchored over in silence. ``appliance audit verify``
compares the local chain with every anchor upstream: a local trail truncated, or rewritten
and re-hashed, below a checkpoint held upstream is caught even when the local checkpoints
were removed with it (``appliance/audit.py``, "What is guaranteed"). An export state altered
in ``meta`` reads as none (the trail sent again, which the conditional creates make
harmless), never as an exception that ends the sync process.

Exporting audit records is not itself audited: they hold no PHI, and a record per export
would leave one new record to export after every export, for ever.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson

from appliance import audit, db, fhir
from appliance.store import Store
from sync_agent.audit_export_state import (
    CURSOR_KEY,
    ExportState,
    anchor_candidate,
    anchor_settled,
    check_trail,
    meta_number,
    read_export_state,
    set_anchor,
    set_unsure,
    settle,
    unsure_wait,
)
from sync_agent.balp import (
    ExportRow,
    audit_event,
    checkpoint_code,
    checkpoint_provenance,
    checkpoint_system,
    record_system,
)
from sync_agent.upstream import (
    ENTRY_NOT_THE_ITEM,
    Failure,
    UpstreamError,
    bundle_entries,
    entry_outcome,
    entry_status,
    lost_answer_wait_s,
    post_bundle,
)

logger = logging.getLogger(__name__)

# Entry statuses that say nothing against the record itself (upstream.ENTRY_NOT_THE_ITEM):
# the record is sent again later.
_NOT_THE_RECORD = ENTRY_NOT_THE_ITEM

_ROWS_SQL = (
    "SELECT id, ts, actor, action, outcome, patient_key, entity, detail, hash FROM audit "
    "WHERE id > ? ORDER BY id LIMIT ?"
)


def _load(
    conn: sqlite3.Connection, limit: int, after: int | None = None
) -> tuple[int, list[ExportRow], list[tuple[int, str]]]:
    """The cursor, the next records after it (after ``after`` when given), and those among
    them no AuditEvent can be made of (only tampering writes them: ``audit verify`` names
    them) with why.

    Text is read tolerantly (as ``audit.verify`` does), so a record that is not UTF-8, or a
    value of another type than the chain writes, is passed over as refused instead of
    raising and ending the sync process, which then restarted into the same record.
    """
    cursor = meta_number(conn, CURSOR_KEY)
    saved = conn.text_factory
    conn.text_factory = audit.tolerant_text
    try:
        rows = conn.execute(_ROWS_SQL, (cursor if after is None else after, limit)).fetchall()
    finally:
        conn.text_factory = saved
    good: list[ExportRow] = []
    bad: list[tuple[int, str]] = []
    for rid, ts, actor, action, outcome, pkey, entity, detail, digest in rows:
        texts = (ts, actor, action, outcome, entity, detail)
        if (
            not all(t is None or (isinstance(t, str) and _utf8(t)) for t in texts)
            or not isinstance(pkey, bytes | None)
            or not isinstance(digest, bytes)
        ):
            bad.append((int(rid), "stored record is not as the chain writes it (altered?)"))
            continue
        good.append(ExportRow(int(rid), ts, actor, action, outcome, pkey, entity, detail, digest))
    return cursor, good, bad


# A one-record bundle larger than this refused as too large: that record is (a detail of
# many ids, say), and it is passed over. Below it, a 413 is a limit in front of the server
# (a proxy's body limit far under one audit record of a few KB): the export stops and
# waits, paced, instead of passing every record over for good.
_ALONE_TOO_LARGE = 64 * 1024


def _alone_too_large(bundle: dict[str, Any]) -> bool:
    return len(orjson.dumps(bundle)) > _ALONE_TOO_LARGE


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# The whole-request refusals a FHIR server gives for what a request carries (the FHIR
# RESTful API: 400, the resource could not be parsed or failed basic validation; 422, it
# violates a profile or a business rule of the server), answered with its own
# OperationOutcome. Only such a refusal of a one-record bundle can be about that record.
# Any other (a proxy's page without an OperationOutcome, such as nginx's "400 Request
# Header Or Cookie Too Large"; 407, a proxy's own credentials; 426, an upgrade; 431, header
# fields; 411, 412, 414, 421, 428…) is about the exchange, and every record would get it.
_CONTENT_REFUSALS = frozenset({400, 422})


def _exchange_refusal(status: int, *, outcome: bool) -> UpstreamError:
    """A whole-request refusal that is not about the records: the export stops where it is
    and is paced, as for an address or credentials refused (no record passed over). (A 407,
    426 or 431 never gets here: ``classify_response`` makes them auth and endpoint.)"""
    said = "an OperationOutcome" if outcome else "no OperationOutcome"
    return UpstreamError(
        Failure.ENDPOINT,
        f"HTTP {status} to the whole request ({said}): about the exchange, not the records; "
        "none passed over",
    )


async def _post(client: httpx.AsyncClient, bundle: dict[str, Any]) -> dict[str, Any]:
    """:func:`sync_agent.upstream.post_bundle`, except that a refusal of the whole request
    is **permanent** (``HTTP <status>: <the server's words>``) only when it is a 400 or 422
    with the FHIR server's own OperationOutcome; any other is :func:`_exchange_refusal`'s.

    Before, any other 4xx was permanent: at one record a bundle, a proxy refusing every POST
    (a page of HTML, a 407, a 426, a 431) had each record passed over in turn, the cursor
    moved past the whole trail, and for the audit export passed over is lost.
    """
    try:
        return await post_bundle(client, bundle)
    except UpstreamError as refusal:
        status = refusal.status
        if refusal.failure is not Failure.PERMANENT or status is None:
            raise
        if status in _CONTENT_REFUSALS and refusal.outcome:
            raise UpstreamError(Failure.PERMANENT, f"HTTP {status}: {refusal.message}") from None
        raise _exchange_refusal(status, outcome=refusal.outcome) from None


class AnchorEntryError(UpstreamError):
    """The upstream answered the anchor's bundle but did not take its entry (the entry
    answered 5xx, 429, 401…): the exchange went through, so the records still go."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class _Run:
    """Records refused in a row, each alone, as a whole request, with the server's
    OperationOutcome (see :meth:`AuditExporter.export_once`): none held against its record
    until a record after them has gone through."""

    start: int  # the cursor they were sent from
    refused: tuple[tuple[int, UpstreamError], ...]  # (audit id, refusal), in id order

    def same_answer(self, refusal: UpstreamError) -> bool:
        """Whether one of the run got this very answer (status and the server's words)."""
        return any(earlier.message == refusal.message for _, earlier in self.refused)


# An anchor entry the upstream answered but did not take (a 5xx entry in a 200 batch) is
# sent again after this, doubled each time up to the cap, not on every drain.
ANCHOR_RETRY_S = 30.0
ANCHOR_RETRY_CAP_S = 900.0
# Records refused alone in a row, with other answers, before the run is taken for the
# exchange refusing them (the same answer twice is taken so at once).
REFUSED_RUN = 4
# Records read past a run for the next one that can be sent alone (unreadable ones, which
# only tampering writes, are passed over on the way).
_CONTROL_WINDOW = 8


# -- the exporter ---------------------------------------------------------------------------


@dataclass
class ExportResult:
    """What an export did (figures for logs, the heartbeat and tests; no PHI)."""

    exported: int = 0  # created upstream, or found there already
    existing: int = 0  # of which the upstream already had (a resend)
    refused: int = 0
    retry: int = 0
    bundles: int = 0
    anchored: int | None = None  # audit id of the checkpoint anchored by this call
    anchor_error: str | None = None  # the anchor not taken (the records went on regardless)
    anchor_stopped_by: UpstreamError | None = None  # why (credentials, address…): paced
    # Newer checkpoints not anchored: malformed, not this box's signature, or not held by
    # the trail (``checkpoint <row id>: why``, ids only); ``audit verify`` tells more.
    unfit_checkpoints: list[str] = field(default_factory=list)
    trail_broken: str | None = None  # check_trail's finding at the start of this export
    error: str | None = None
    link_down: bool = False
    stopped_by: UpstreamError | None = None  # the exchange failure that ended the export
    cursor: int = 0
    failures: list[str] = field(default_factory=list)
    more: bool = False  # ended by its time budget, not for want of records: more at once


class AuditExporter:
    """Streams one store's audit chain to one upstream FHIR server, then anchors it."""

    def __init__(
        self,
        store: Store,
        client: httpx.AsyncClient,
        *,
        site_id: str,
        batch: int = 8,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        unsure_s: float | None = None,
    ) -> None:
        """``unsure_s``: how long nothing is sent after an answer lost (default: ``client``'s
        read timeout, the upstream's ``timeout_s``), as the outbox waits for its items."""
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self._store = store
        self._client = client
        self._site_id = site_id
        self._max_batch = batch
        self._batch = batch
        self._clock = clock
        self._run: _Run | None = None
        self._unfit: list[str] = []  # the unfit checkpoints last logged
        self._anchor_failures = 0  # anchor entries answered and not taken, in a row
        self._anchor_not_before: datetime | None = None
        self._unsure_s = lost_answer_wait_s(client) if unsure_s is None else unsure_s

    @property
    def batch_size(self) -> int:
        """The current bundle size (shrinks when the server says bundles are too large)."""
        return self._batch

    async def state(self) -> ExportState:
        """Where the export stands now."""
        return await db.run_sync(self._store.connection, read_export_state)

    async def anchor_once(self) -> int | None:
        """Send the newest checkpoint fit to anchor upstream unless it is there; its audit
        id, else None.

        Fit (:func:`anchor_candidate`): well-formed, this box's signature, and held by the
        trail; newer ones that are not are passed over, logged once. Raises
        :class:`UpstreamError` for a failure of the exchange (nothing is recorded), and
        :class:`AnchorEntryError` when the upstream answered but did not take the entry. A
        checkpoint the server refuses for good is recorded as a refusal and not retried.
        """
        conn = self._store.connection
        checkpoint, unfit = await db.run_sync(
            conn, anchor_candidate, self._store.keyring.signing_public_key
        )
        if unfit and unfit != self._unfit:
            logger.error(
                "audit checkpoints not anchored: %s; run 'appliance audit verify'",
                "; ".join(unfit),
            )
        self._unfit = unfit
        settled = await db.run_sync(conn, anchor_settled)
        if checkpoint is None or checkpoint.audit_id <= settled:
            return None
        resource = checkpoint_provenance(
            checkpoint,
            site_id=self._site_id,
            public_key_hex=self._store.keyring.signing_public_key_hex(),
        )
        tag = f"{checkpoint_system(self._site_id)}|{checkpoint_code(checkpoint)}"
        bundle = {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                {
                    "resource": resource,
                    "request": {
                        "method": "POST",
                        "url": "Provenance",
                        "ifNoneExist": f"_tag={tag}",
                    },
                }
            ],
        }
        response = await _post(self._client, bundle)
        entry = (bundle_entries(response) or [{}])[0]
        code = entry_status(entry)
        if 200 <= code < 300:
            await db.run_sync(conn, set_anchor, checkpoint, None)
            return checkpoint.audit_id
        if 400 <= code < 500 and code not in _NOT_THE_RECORD:
            message = entry_outcome(entry, code)
            logger.warning("upstream refused the audit checkpoint anchor: HTTP %d", code)
            await db.run_sync(conn, set_anchor, checkpoint, message)
            return None
        failure = Failure.AUTH if code in (401, 403) else Failure.TRANSIENT
        raise AnchorEntryError(failure, f"checkpoint anchor: entry HTTP {code or 'missing'}")

    async def _anchor(self, result: ExportResult) -> UpstreamError | None:
        """The anchor step of :meth:`export_once`: the failure that stops the records too
        (the exchange failed: transient or ambiguous), else None."""
        now = self._clock()
        paused = self._anchor_not_before
        # Paced after an entry not taken lately; a pause further ahead than the longest there
        # is was measured on a clock since set back (NTP on a box that booted ahead): over.
        if paused is not None and now < paused <= now + timedelta(seconds=ANCHOR_RETRY_CAP_S):
            return None
        try:
            result.anchored = await self.anchor_once()
        except AnchorEntryError as exc:
            # Answered: the link is up and the records go on. Our access (401/403) paces
            # the step in the sync loop; the upstream's own trouble with the entry (a 5xx
            # entry in a 200 batch) paces the anchor alone, here.
            result.anchor_error = str(exc)
            logger.warning("audit checkpoint anchor not taken upstream: %s", exc.failure)
            if exc.failure is Failure.AUTH:
                result.anchor_stopped_by = exc
            else:
                self._pace_anchor(now)
            return None
        except UpstreamError as exc:
            if exc.failure in (Failure.TRANSIENT, Failure.AMBIGUOUS):
                return exc
            result.anchor_error = str(exc)
            result.anchor_stopped_by = exc
            logger.warning("audit checkpoint anchor not taken upstream: %s", exc.failure)
            if exc.failure is Failure.PERMANENT:
                # The FHIR server's 400/422 to the anchor's whole request: no step stop in
                # the sync loop paces it (the records went), so it is paced here, as above.
                self._pace_anchor(now)
            return None
        finally:
            result.unfit_checkpoints = list(self._unfit)
        self._anchor_failures, self._anchor_not_before = 0, None
        return None

    def _pace_anchor(self, now: datetime) -> None:
        """The anchor not taken again: not sent before 30 s doubled each time (at most 15 min)."""
        self._anchor_failures += 1
        wait = ANCHOR_RETRY_S * 2 ** min(self._anchor_failures - 1, 20)
        self._anchor_not_before = now + timedelta(seconds=min(wait, ANCHOR_RETRY_CAP_S))

    def _bundle(self, built: Sequence[tuple[ExportRow, fhir.FhirJson]]) -> dict[str, Any]:
        system = record_system(self._site_id)
        return {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                {
                    "resource": event,
                    "request": {
                        "method": "POST",
                        "url": "AuditEvent",
                        "ifNoneExist": f"_tag={system}|{row.hash.hex()}",
                    },
                }
                for row, event in built
            ],
        }

    async def export_once(self, *, anchor: bool = True) -> ExportResult:
        """Anchor the newest checkpoint (unless ``anchor`` is false), then send one bundle of
        records after the cursor.

        Never raises for the link: a failure is in the result and the cursor stays put. An
        anchor the upstream does not take (our access to Provenance, a rule of the server,
        its own trouble with the entry) is reported in ``anchor_error`` and does not hold
        the records back; only a failure of the whole exchange stops both.

        A record refused alone, as a whole request, with the server's OperationOutcome
        (:func:`_post`), is not passed over at once: the next call sends the next record
        alone, and so on. Once the upstream answers one with a batch response, those refused
        before it are passed over.
        The same answer twice, or :data:`REFUSED_RUN` refusals in a row, is the exchange,
        not the records: the export stops (**endpoint**, paced) with none passed over. With
        no record after them yet, they wait (sent alone again next time).

        An exchange whose answer was lost (ambiguous) is not sent again before a request
        timeout, by this exporter or another process's (kept in ``meta``): the server may
        be applying it still, and a resend overtaking it could make a second copy. Meanwhile
        nothing is sent, and the call says so by sending nothing (not a failure).
        """
        conn = self._store.connection
        if await db.run_sync(conn, unsure_wait, self._clock(), self._unsure_s):
            return ExportResult(cursor=await db.run_sync(conn, meta_number, CURSOR_KEY))
        result = await self._export_once(anchor=anchor)
        if result.stopped_by is not None and result.stopped_by.failure is Failure.AMBIGUOUS:
            until = self._clock() + timedelta(seconds=self._unsure_s)
            await db.run_sync(conn, set_unsure, until)
        return result

    async def _export_once(self, *, anchor: bool) -> ExportResult:
        result = ExportResult()
        conn = self._store.connection
        if anchor:
            result.trail_broken = await db.run_sync(conn, check_trail, self._clock())
            stop = await self._anchor(result)
            if stop is not None:
                return self._failed(result, stop, await db.run_sync(conn, meta_number, CURSOR_KEY))
        run, self._run = self._run, None
        start, rows, refused = await db.run_sync(conn, _load, self._batch)
        result.cursor = start
        if run is not None and rows and (run.start, run.refused[0][0]) == (start, rows[0].id):
            # The next record after the run, alone: it tells the records from the exchange.
            ids = [rid for rid, _ in run.refused]
            _, later, bad = await db.run_sync(conn, _load, len(ids) + _CONTROL_WINDOW, start)
            if [row.id for row in later[: len(ids)]] != ids:
                run = None  # the trail moved under it (another exporter): judged anew
            elif len(later) == len(ids):  # no record after it yet: it waits
                return self._failed(result, run.refused[-1][1], start)
            else:
                rows = later[len(ids) : len(ids) + 1]
                refused = [(rid, str(exc)) for rid, exc in run.refused]
                refused += [(rid, why) for rid, why in bad if rid < rows[0].id]
        else:
            run = None
        if not rows and not refused:
            return result
        built: list[tuple[ExportRow, fhir.FhirJson]] = []
        for row in rows:
            try:
                built.append((row, audit_event(row, site_id=self._site_id)))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                # Only tampering writes a record like this; verify names it. Pass it by.
                refused.append((row.id, f"cannot be expressed as an AuditEvent: {exc}"))
        end = max([row.id for row in rows] + [rid for rid, _ in refused])
        if built:
            bundle = self._bundle(built)
            try:
                response = await _post(self._client, bundle)
            except UpstreamError as exc:
                alone = built[0][0].id if len(built) == 1 else None
                if alone is None or exc.failure not in (Failure.PERMANENT, Failure.TOO_LARGE):
                    return self._failed(result, exc, start)
                if exc.failure is Failure.TOO_LARGE and not _alone_too_large(bundle):
                    return self._failed(result, exc, start)  # a limit in front: it waits
                if exc.failure is Failure.TOO_LARGE and run is None:
                    refused.append((alone, str(exc)))  # too large alone: it will never go
                else:
                    return self._refused_alone(result, start, run, alone, exc)
            else:
                result.bundles = 1
                end = self._answered(result, built, response, refused, end)
                self._batch = min(self._max_batch, self._batch * 2)
        refused = [(rid, reason) for rid, reason in refused if rid <= end]
        result.refused = len(refused)
        result.cursor = await db.run_sync(conn, settle, start, end, refused)
        if refused:
            logger.warning("upstream refused %d audit record(s); passed over", len(refused))
        return result

    def _refused_alone(
        self,
        result: ExportResult,
        start: int,
        run: _Run | None,
        record: int,
        refusal: UpstreamError,
    ) -> ExportResult:
        """``record``, sent alone after ``run`` (if any), refused as a whole request: the run
        grows, and the next call sends the next record alone; or, the same answer as one
        before it or a run of :data:`REFUSED_RUN`, the exchange: the export stops (paced),
        passing none over."""
        refused = (*(run.refused if run is not None else ()), (record, refusal))
        if (run is not None and run.same_answer(refusal)) or len(refused) >= REFUSED_RUN:
            said = refusal.message.split(":", 1)[0]  # "HTTP 400" (not the server's words)
            said = said if said.startswith("HTTP ") else str(refusal.failure)
            stop = UpstreamError(
                Failure.ENDPOINT,
                f"records {', '.join(str(rid) for rid, _ in refused)}, each sent alone, "
                f"refused as a whole request ({said}): the exchange, not the records; "
                "none passed over",
            )
            return self._failed(result, stop, start)
        self._run = _Run(start, refused)
        result.failures.append(str(refusal))
        return result  # not a stop: the next call sends the next record alone

    def _answered(
        self,
        result: ExportResult,
        built: Sequence[tuple[ExportRow, fhir.FhirJson]],
        response: dict[str, Any],
        refused: list[tuple[int, str]],
        end: int,
    ) -> int:
        """Count a bundle's entry answers into ``result`` and ``refused``; the audit id to
        settle up to (before the first entry to send again).

        Entries answer in the order sent, one each; an answer with another count (one lost,
        a batch-level OperationOutcome in front) cannot be matched to the records, so none
        of it is taken: a refusal read off a neighbour's entry would pass a record over, and
        for the audit export passed over is lost. All are sent again (harmless: conditional
        creates)."""
        entries = bundle_entries(response)
        if len(entries) != len(built):
            result.retry = len(built)
            stop = UpstreamError(
                Failure.TRANSIENT,
                f"the answer has {len(entries)} entries for {len(built)} records sent: none taken",
            )
            result.error, result.stopped_by = str(stop), stop
            result.failures.append(result.error)
            return built[0][0].id - 1
        for index, (row, _event) in enumerate(built):
            entry = entries[index] if index < len(entries) else {}
            code = entry_status(entry)
            if 200 <= code < 300:
                result.exported += 1
                result.existing += code == 200
            elif 400 <= code < 500 and code not in _NOT_THE_RECORD:
                refused.append((row.id, entry_outcome(entry, code)))
            else:
                # Settle only up to here: the rest is resent (harmlessly) next time. A
                # 401/403 entry is our credentials or access policy, not the record: it
                # waits for them to be mended, like a refused request.
                result.retry = sum(1 for r, _ in built if r.id >= row.id)
                failure = Failure.AUTH if code in (401, 403) else Failure.TRANSIENT
                stop = UpstreamError(failure, f"entry HTTP {code or 'missing'}")
                result.error, result.stopped_by = str(stop), stop
                result.failures.append(result.error)
                return row.id - 1
        return end

    def _failed(self, result: ExportResult, exc: UpstreamError, cursor: int) -> ExportResult:
        result.cursor = cursor
        result.error = str(exc)
        result.failures.append(result.error)
        if exc.failure is Failure.TOO_LARGE and self._batch > 1:
            self._batch = max(1, self._batch // 2)
            result.error = None  # not a stop: the next call sends a smaller bundle
        elif exc.failure is Failure.PERMANENT and self._batch > 1:
            self._batch = 1  # one at a time finds the record at fault
            result.error = None
        else:
            result.link_down = exc.failure is Failure.TRANSIENT
            result.stopped_by = exc
        return result

    async def drain(
        self,
        *,
        max_bundles: int = 1000,
        stop: Callable[[], bool] = lambda: False,
        budget_s: float | None = None,
    ) -> ExportResult:
        """Export until nothing is left, the link fails, ``max_bundles`` were sent, or
        ``stop()`` (asked before each bundle: the process is shutting down). With
        ``budget_s``, no bundle starts once that long has gone since the first, and the
        result says ``more``: the audit lane is the last, and the sync loop's next round
        drains the outbox (a new alert) before the export goes on."""
        total = ExportResult()
        started = time.monotonic()
        for sent in range(max_bundles):
            if stop():
                break
            if budget_s is not None and sent and time.monotonic() - started >= budget_s:
                total.more = True
                break
            # The anchor once a drain: it is the newest checkpoint, not one per bundle.
            step = await self.export_once(anchor=sent == 0)
            total.anchor_error = total.anchor_error or step.anchor_error
            total.anchor_stopped_by = total.anchor_stopped_by or step.anchor_stopped_by
            total.unfit_checkpoints = total.unfit_checkpoints or step.unfit_checkpoints
            total.trail_broken = total.trail_broken or step.trail_broken
            total.exported += step.exported
            total.existing += step.existing
            total.refused += step.refused
            total.retry = step.retry
            total.bundles += step.bundles
            total.cursor = step.cursor
            total.anchored = step.anchored if step.anchored is not None else total.anchored
            total.failures.extend(step.failures)
            idle = step.bundles == 0 and step.refused == 0 and not step.failures
            if idle or step.error is not None:
                total.error, total.link_down = step.error, step.link_down
                total.stopped_by = step.stopped_by
                break
        return total
