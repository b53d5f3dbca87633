"""Audit export: the hash-chained audit records go upstream as FHIR AuditEvents, exactly once.

The shapes (IHE BALP AuditEvents, the checkpoint's Provenance) are built by the pure
:mod:`sync_agent.balp`; this module streams, sends and keeps count.

**Exactly once.** Records leave in id order from a cursor (``meta`` key :data:`CURSOR_KEY`,
the last audit id settled upstream), in ``batch`` Bundles of conditional creates
(``ifNoneExist: _tag=<record system>|<chain hash>``), so a resend after a lost answer finds
the event (200) instead of making a second one. The cursor moves in the same transaction
that records the outcome; a bundle that fails leaves it. Errors are those of
:mod:`sync_agent.upstream`: transient or ambiguous → stop, retry later; too large → smaller
bundles; an entry the server refuses for good (or over 64 KB and too large alone) is recorded
(:data:`REFUSED_KEY`: a count and the newest reasons) and passed, so one bad record never
stalls the chain. A 401/403, for the bundle or one entry, is our access, not the record: the
export stops there and resends from the same place later.

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
a cut, are passed over and logged; ``audit verify`` names them). :data:`ANCHOR_KEY`
remembers the last one the upstream took, :data:`ANCHOR_REFUSED_KEY` the last it refused for
good; an anchor not taken never holds the records back (an entry the upstream answered but
did not take is sent again after a pause; only a failed exchange stops both). Each drain
first checks that the trail still holds the records at its cursor and at the anchor
(:func:`check_trail`): a trail cut back and grown again is reported, once, and sent again,
not anchored over in silence. :func:`verify_against_anchors` compares the local chain with
every anchor upstream (:func:`fetch_upstream_anchors`; ``appliance audit verify`` does): a
local trail truncated, or rewritten and re-hashed, below a checkpoint held upstream is caught
even when the local checkpoints were removed with it (``appliance/audit.py``, "What is
guaranteed"). An export state altered in ``meta`` reads as none (the trail sent again, which
the conditional creates make harmless), never as an exception that ends the sync process.

Exporting audit records is not itself audited: they hold no PHI, and a record per export
would leave one new record to export after every export, for ever.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance import audit, db, fhir
from appliance.audit import AuditAction, AuditEvent, Checkpoint, Outcome, VerifyResult
from appliance.store import Store
from sync_agent.balp import (
    ExportRow,
    anchor_from_provenance,
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
    as_dict,
    as_list,
    bundle_entries,
    classify_response,
    entry_outcome,
    entry_status,
    exchange,
    next_link,
    post_bundle,
    response_json,
)

logger = logging.getLogger(__name__)

ACTOR = "service:sync"
CURSOR_KEY = "audit_export.cursor"
REFUSED_KEY = "audit_export.refused"
CURSOR_HASH_KEY = "audit_export.cursor_hash"  # the chain hash of the record at the cursor
ANCHOR_KEY = "audit_export.anchor"  # the newest checkpoint the upstream took
ANCHOR_HASH_KEY = "audit_export.anchor_hash"  # its chain hash
BREAKS_KEY = "audit_export.breaks"  # times the trail was found cut back or rewritten under us
# How many of those a person has acknowledged (after looking into them): the count itself only
# grows, so the metric and the alert keep the history; the red warning goes once acknowledged.
BREAKS_ACKNOWLEDGED_KEY = "audit_export.breaks_acknowledged"
# The places (``<id>:<hash>``) the breaks counted found lost: a break is counted once.
BREAKS_SEEN_KEY = "audit_export.breaks_seen"
BREAKS_SEEN_KEPT = 50
ANCHOR_REFUSED_KEY = "audit_export.anchor_refused"  # the newest it refused for good (not resent)
REFUSED_KEPT = 20  # the newest refusals kept with their reason; the count is kept in full

# Entry statuses that say nothing against the record itself (upstream.ENTRY_NOT_THE_ITEM):
# the record is sent again later.
_NOT_THE_RECORD = ENTRY_NOT_THE_ITEM

_ROWS_SQL = (
    "SELECT id, ts, actor, action, outcome, patient_key, entity, detail, hash FROM audit "
    "WHERE id > ? ORDER BY id LIMIT ?"
)


def verify_against_anchor(
    conn: sqlite3.Connection, public_key: Ed25519PublicKey, anchor: Checkpoint
) -> VerifyResult:
    """:func:`appliance.audit.verify`, then the local chain against the upstream's anchor.

    The anchor must carry this box's signature, the local trail must reach its record, and
    the (recomputed, so trustworthy) hash there must be the signed one. A trail cut back
    below the anchor, even with its local checkpoints removed and the chain re-hashed, fails.
    """
    return verify_against_anchors(conn, public_key, [anchor])


def verify_against_anchors(
    conn: sqlite3.Connection, public_key: Ed25519PublicKey, anchors: Sequence[Checkpoint]
) -> VerifyResult:
    """:func:`verify_against_anchor` for each of ``anchors``: the first failure, else the
    local verification. Not only the newest: a trail cut back and grown again past the
    newest old anchor is anchored anew, and only the older anchors then tell."""
    for anchor in anchors:  # the signatures first: they cost no walk of the chain
        try:
            public_key.verify(anchor.signature, anchor.message())
        except InvalidSignature:
            return VerifyResult(
                False,
                0,
                0,
                anchor.audit_id,
                f"{_label(anchor)}: signature does not verify (not this box's)",
            )
    local = audit.verify(conn, public_key)
    if not local.ok:
        return local
    for anchor in anchors:
        if local.records < anchor.audit_id:
            return VerifyResult(
                False,
                local.records,
                local.checkpoints,
                local.records + 1,
                f"{_label(anchor)}: the local audit trail ends at record {local.records} "
                "(truncated)",
            )
        row = conn.execute("SELECT hash FROM audit WHERE id = ?", (anchor.audit_id,)).fetchone()
        if row is None or bytes(row[0]) != anchor.hash:
            return VerifyResult(
                False,
                local.records,
                local.checkpoints,
                anchor.audit_id,
                f"{_label(anchor)}: the local chain differs from the signed hash (records up "
                "to it rewritten, or cut back and grown again)",
            )
    return local


def _label(anchor: Checkpoint) -> str:
    return f"upstream anchor (record {anchor.audit_id}, signed {audit.ts_text(anchor.ts)})"


# -- state in the meta table ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportState:
    """Where the export stands (read without decrypting anything)."""

    cursor: int  # the last audit id settled upstream (exported or refused)
    head: int  # the newest audit id
    refused: int  # records (and anchors) the upstream refused for good
    recent_refusals: tuple[tuple[int, str], ...]  # (audit id, reason), newest last
    anchored: int  # audit id of the newest checkpoint anchored upstream (0: none)
    breaks: int = 0  # times the local trail no longer held what was exported or anchored
    breaks_acknowledged: int = 0  # of those, how many a person has acknowledged

    @property
    def lag(self) -> int:
        """Records not yet exported."""
        return max(0, self.head - self.cursor)

    @property
    def unacknowledged_breaks(self) -> int:
        """Breaks found since the last acknowledgement: a security incident still open."""
        return max(0, self.breaks - self.breaks_acknowledged)


def _meta_text(conn: sqlite3.Connection, key: str) -> str | None:
    """:func:`appliance.db.meta_value`, None for a row that is not text (altered)."""
    try:
        return db.meta_value(conn, key)
    except (ValueError, sqlite3.OperationalError):  # bytes or TEXT that are not UTF-8
        return None


def _whole(value: object) -> int:
    """``value`` as a whole number an audit id can be (0 to 2**63 - 1), else 0."""
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0
    return number if 0 <= number < 2**63 else 0


def _number(conn: sqlite3.Connection, key: str) -> int:
    """A number kept in ``meta`` (a count, the cursor, an anchored audit id); 0 when absent
    or not one. An altered row reads as none, never as a failed status page or an exception
    out of the export (which ended the sync process, restarted into the same row for ever).
    Nothing is lost by it: a cursor read as 0 sends the trail again and an anchor read as 0
    the newest checkpoint, both harmless (conditional creates)."""
    return _whole(_meta_text(conn, key) or 0)


def _refusals(conn: sqlite3.Connection) -> dict[str, Any]:
    """The refusals kept under :data:`REFUSED_KEY`: ``count`` (a whole number) and
    ``recent`` (``[audit id, reason]`` pairs); what is not so reads as none."""
    text = _meta_text(conn, REFUSED_KEY)
    loaded: Any = None
    if text:
        try:
            loaded = json.loads(text)
        except ValueError:
            loaded = None
    loaded = loaded if isinstance(loaded, dict) else {}
    recent = loaded.get("recent")
    return {
        "count": _whole(loaded.get("count", 0)),
        "recent": [
            [_whole(item[0]), str(item[1])]
            for item in (recent if isinstance(recent, list) else [])
            if isinstance(item, list) and len(item) == 2 and _whole(item[0]) > 0
        ],
    }


def read_export_state(conn: sqlite3.Connection) -> ExportState:
    """The cursor, the chain head, the refusals and the newest anchor (cheap reads)."""
    head = int(conn.execute("SELECT coalesce(max(id), 0) FROM audit").fetchone()[0])
    refused = _refusals(conn)
    return ExportState(
        cursor=_number(conn, CURSOR_KEY),
        head=head,
        refused=refused["count"],
        recent_refusals=tuple((rid, reason) for rid, reason in refused["recent"]),
        anchored=_number(conn, ANCHOR_KEY),
        breaks=_number(conn, BREAKS_KEY),
        breaks_acknowledged=_number(conn, BREAKS_ACKNOWLEDGED_KEY),
    )


ACKNOWLEDGED_DETAIL = "audit trail break acknowledged"


def acknowledge_breaks(conn: sqlite3.Connection, *, actor: str, now: datetime, seen: int) -> int:
    """Acknowledge the audit trail breaks found so far, up to ``seen`` (the count the person
    was shown, so a break found since is not acknowledged unseen); audited. Returns how many
    were newly acknowledged (0: nothing to acknowledge).

    For after the incident has been looked into (``appliance audit verify``, the report to
    the security officer): the warning on ``/sync`` and in ``sync status`` goes, the count
    (``appliance_audit_trail_breaks``) stays, and a new break warns again.
    """
    with db.transaction_sync(conn):
        breaks = _number(conn, BREAKS_KEY)
        before = _number(conn, BREAKS_ACKNOWLEDGED_KEY)
        upto = min(seen, breaks)
        if upto <= before:
            return 0
        db.set_meta(conn, BREAKS_ACKNOWLEDGED_KEY, str(upto))
        audit.append(
            conn,
            [
                AuditEvent(
                    actor,
                    AuditAction.CONFIG,
                    entity="audit",
                    detail=f"{ACKNOWLEDGED_DETAIL}: {before + 1} to {upto} of {breaks}"
                    if upto > before + 1
                    else f"{ACKNOWLEDGED_DETAIL}: {upto} of {breaks}",
                )
            ],
            now=now,
        )
    return upto - before


def _settle(
    conn: sqlite3.Connection, start: int, end: int, refused: Sequence[tuple[int, str]]
) -> int:
    """Move the cursor from ``start`` to ``end`` and record the refusals, in one transaction.

    Returns the cursor after. Another exporter (``appliance sync once`` beside the sync
    process) may have settled the same records first; then nothing is counted twice.
    """
    with db.transaction_sync(conn):
        current = _number(conn, CURSOR_KEY)
        if current != start or end <= start:
            return current
        db.set_meta(conn, CURSOR_KEY, str(end))
        db.set_meta(conn, CURSOR_HASH_KEY, f"{end}:{_hash_at(conn, end)}")
        if refused:
            _record_refusals(conn, refused)
    return end


def _record_refusals(conn: sqlite3.Connection, refused: Sequence[tuple[int, str]]) -> None:
    state = _refusals(conn)
    recent = [*state.get("recent", []), *([rid, reason[:300]] for rid, reason in refused)]
    state = {"count": state["count"] + len(refused), "recent": recent[-REFUSED_KEPT:]}
    db.set_meta(conn, REFUSED_KEY, json.dumps(state))


def _set_anchor(conn: sqlite3.Connection, checkpoint: Checkpoint, refusal: str | None) -> None:
    """Record a checkpoint the upstream took, or refused for good (kept apart: a refused one
    is not resent, and is not reported as anchored)."""
    audit_id = checkpoint.audit_id
    key = ANCHOR_KEY if refusal is None else ANCHOR_REFUSED_KEY
    with db.transaction_sync(conn):
        if _number(conn, key) >= audit_id:
            return
        db.set_meta(conn, key, str(audit_id))
        if refusal is None:
            db.set_meta(conn, ANCHOR_HASH_KEY, f"{audit_id}:{checkpoint.hash.hex()}")
        else:
            _record_refusals(conn, [(audit_id, f"checkpoint anchor refused: {refusal}")])


def _hash_at(conn: sqlite3.Connection, audit_id: int) -> str:
    row = conn.execute("SELECT hash FROM audit WHERE id = ?", (audit_id,)).fetchone()
    return bytes(row[0]).hex() if row is not None and isinstance(row[0], bytes) else ""


def _still_held(conn: sqlite3.Connection, id_key: str, hash_key: str) -> tuple[int, str, bool]:
    """The audit id under ``id_key``, the hash remembered for it under ``hash_key``, and
    whether the trail still holds it with that hash (True when there is nothing to compare).

    The hash is kept as ``<id>:<hash>``: when the id is not the one under ``id_key`` (an
    older release moved the cursor or the anchor and knew nothing of hashes), nothing is
    known to compare, which is not a break.
    """
    audit_id = _number(conn, id_key)
    remembered_id, _, remembered = (_meta_text(conn, hash_key) or "").partition(":")
    if audit_id == 0 or not remembered or remembered_id != str(audit_id):
        return audit_id, "", True
    return audit_id, remembered, _hash_at(conn, audit_id) == remembered


def _breaks_seen(conn: sqlite3.Connection) -> list[str]:
    """The places (``<id>:<hash>``) found lost by the breaks counted, newest last."""
    try:
        seen = json.loads(_meta_text(conn, BREAKS_SEEN_KEY) or "[]")
    except ValueError:
        return []
    return [item for item in seen if isinstance(item, str)] if isinstance(seen, list) else []


def check_trail(conn: sqlite3.Connection, now: datetime) -> str | None:
    """Whether the local trail still holds the records exported and anchored; None if so.

    The export remembers the chain hash at its cursor and at the checkpoint anchored
    upstream. A trail cut back below them (with its local checkpoints removed, so that
    :func:`appliance.audit.verify` alone passes) and grown again would otherwise be exported
    and anchored on top as if nothing had happened, its new records under ids already sent
    skipped, and the newest anchor upstream, now of the new chain, would vouch for it.

    When it no longer holds them: an audit record saying so (a failure, exported like any
    other, so the upstream learns of it), the count under :data:`BREAKS_KEY`, an error in
    the journal, and the export goes back to the anchored checkpoint if that still holds, else
    to the start. Resending what the upstream has is harmless (conditional creates by chain
    hash); the records of the new chain go up beside the old ones, and the upstream keeps both
    chains' anchors, which :func:`verify_against_anchors` holds the trail to.

    A break is counted once: the places lost (id and hash) are kept under
    :data:`BREAKS_SEEN_KEY`, and the same places found lost again (the cursor or the anchor
    set back to them, by an older release say) are mended the same way without a second
    count, audit record or finding (None).
    """
    with db.transaction_sync(conn):
        cursor, cursor_hash, cursor_held = _still_held(conn, CURSOR_KEY, CURSOR_HASH_KEY)
        anchored, anchor_hash, anchor_held = _still_held(conn, ANCHOR_KEY, ANCHOR_HASH_KEY)
        if cursor_held and anchor_held:
            return None
        places = (
            (cursor, cursor_hash, cursor_held, "exported"),
            (anchored, anchor_hash, anchor_held, "anchored upstream"),
        )
        lost = [f"record {audit_id} as {what}" for audit_id, _, held, what in places if not held]
        lost_at = [f"{audit_id}:{digest}" for audit_id, digest, held, _ in places if not held]
        problem = (
            f"the local audit trail no longer holds {' nor '.join(lost)} "
            "(cut back or rewritten under the export)"
        )
        rewind = anchored if anchor_held else 0
        db.set_meta(conn, CURSOR_KEY, str(rewind))
        db.set_meta(conn, CURSOR_HASH_KEY, f"{rewind}:{_hash_at(conn, rewind)}" if rewind else "")
        if not anchor_held:
            # The new chain's checkpoints are anchored from the start again (the old
            # anchors stay upstream: verify_against_anchors holds the trail to them).
            conn.execute(
                "DELETE FROM meta WHERE key IN (?, ?, ?)",
                (ANCHOR_KEY, ANCHOR_HASH_KEY, ANCHOR_REFUSED_KEY),
            )
        seen = _breaks_seen(conn)
        counted = all(place in seen for place in lost_at)
        if not counted:
            seen = [*(place for place in seen if place not in lost_at), *lost_at]
            db.set_meta(conn, BREAKS_SEEN_KEY, json.dumps(seen[-BREAKS_SEEN_KEPT:]))
            db.set_meta(conn, BREAKS_KEY, str(_number(conn, BREAKS_KEY) + 1))
            audit.append(
                conn,
                [
                    AuditEvent(
                        ACTOR,
                        AuditAction.EXPORT,
                        outcome=Outcome.FAILURE,
                        entity="audit",
                        detail=f"{problem}; export resent from record {rewind + 1}",
                    )
                ],
                now=now,
            )
    if counted:
        logger.warning(
            "audit trail break found again (counted before); export resent from record %d",
            rewind + 1,
        )
        return None
    logger.error("%s; run 'appliance audit verify'", problem)
    return problem


def _anchor_settled(conn: sqlite3.Connection) -> int:
    """The newest checkpoint settled upstream, taken or refused (0: none)."""
    return max(_number(conn, ANCHOR_KEY), _number(conn, ANCHOR_REFUSED_KEY))


# Checkpoints looked at, newest first, for one fit to anchor: the few newer ones a person
# with file access may have inserted or altered are passed over, a flood of them is not
# read to its end on every drain (``audit verify`` names the first of them anyway).
ANCHOR_CANDIDATES = 16
_CHECKPOINTS_SQL = (
    "SELECT id, audit_id, hash, ts, signature FROM audit_checkpoints ORDER BY id DESC LIMIT ?"
)


def _anchor_candidate(
    conn: sqlite3.Connection, public_key: Ed25519PublicKey
) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint fit to anchor, and why each newer one is not (ids only).

    Fit: well-formed, signed by this box, and the trail holds its record with its hash.
    Before, the newest row was anchored as it was: one with a timestamp that does not parse
    raised out of the export (and ended the sync process, restarted into the same row for
    ever); one whose record was cut away, or inserted far ahead, was anchored, then found
    missing by :func:`check_trail` on every drain, a break counted and the export rewound
    to the start each time.
    """
    saved = conn.text_factory
    conn.text_factory = audit.tolerant_text
    try:
        rows = conn.execute(_CHECKPOINTS_SQL, (ANCHOR_CANDIDATES,)).fetchall()
    finally:
        conn.text_factory = saved
    unfit: list[str] = []
    for cp_id, audit_id, digest, ts, signature in rows:
        found, why = _fit_checkpoint(conn, public_key, audit_id, digest, ts, signature)
        if found is not None:
            return found, unfit
        unfit.append(f"checkpoint {cp_id}: {why}")
    return None, unfit


def _fit_checkpoint(
    conn: sqlite3.Connection,
    public_key: Ed25519PublicKey,
    audit_id: object,
    digest: object,
    ts: object,
    signature: object,
) -> tuple[Checkpoint | None, str]:
    """A stored checkpoint's values as a :class:`Checkpoint` fit to anchor, else why not."""
    if not (
        isinstance(audit_id, int)
        and 0 < audit_id < 2**63
        and isinstance(digest, bytes)
        and len(digest) == len(audit.GENESIS)
        and isinstance(ts, str)
        and isinstance(signature, bytes)
    ):
        return None, "malformed (altered)"
    try:
        moment = datetime.fromisoformat(ts)
        if moment.utcoffset() is None:
            raise ValueError("no time zone")
        found = Checkpoint(audit_id, digest, moment.astimezone(UTC), signature)
    except (ValueError, OverflowError):
        return None, f"record {audit_id}: malformed timestamp (altered)"
    try:
        public_key.verify(signature, found.message())
    except InvalidSignature:
        return None, f"record {audit_id}: signature does not verify (forged or altered)"
    if _hash_at(conn, audit_id) != digest.hex():
        return None, f"record {audit_id}: not held by the trail (cut away, or inserted ahead)"
    return found, ""


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
    cursor = _number(conn, CURSOR_KEY)
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
    ) -> None:
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

        Fit (:func:`_anchor_candidate`): well-formed, this box's signature, and held by the
        trail; newer ones that are not are passed over, logged once. Raises
        :class:`UpstreamError` for a failure of the exchange (nothing is recorded), and
        :class:`AnchorEntryError` when the upstream answered but did not take the entry. A
        checkpoint the server refuses for good is recorded as a refusal and not retried.
        """
        conn = self._store.connection
        checkpoint, unfit = await db.run_sync(
            conn, _anchor_candidate, self._store.keyring.signing_public_key
        )
        if unfit and unfit != self._unfit:
            logger.error(
                "audit checkpoints not anchored: %s; run 'appliance audit verify'",
                "; ".join(unfit),
            )
        self._unfit = unfit
        settled = await db.run_sync(conn, _anchor_settled)
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
            await db.run_sync(conn, _set_anchor, checkpoint, None)
            return checkpoint.audit_id
        if 400 <= code < 500 and code not in _NOT_THE_RECORD:
            message = entry_outcome(entry, code)
            logger.warning("upstream refused the audit checkpoint anchor: HTTP %d", code)
            await db.run_sync(conn, _set_anchor, checkpoint, message)
            return None
        failure = Failure.AUTH if code in (401, 403) else Failure.TRANSIENT
        raise AnchorEntryError(failure, f"checkpoint anchor: entry HTTP {code or 'missing'}")

    async def _anchor(self, result: ExportResult) -> UpstreamError | None:
        """The anchor step of :meth:`export_once`: the failure that stops the records too
        (the exchange failed: transient or ambiguous), else None."""
        now = self._clock()
        if self._anchor_not_before is not None and now < self._anchor_not_before:
            return None  # an entry not taken lately: paced
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
                self._anchor_failures += 1
                wait = ANCHOR_RETRY_S * 2 ** min(self._anchor_failures - 1, 20)
                self._anchor_not_before = now + timedelta(seconds=min(wait, ANCHOR_RETRY_CAP_S))
            return None
        except UpstreamError as exc:
            if exc.failure in (Failure.TRANSIENT, Failure.AMBIGUOUS):
                return exc
            result.anchor_error = str(exc)
            result.anchor_stopped_by = exc
            logger.warning("audit checkpoint anchor not taken upstream: %s", exc.failure)
            return None
        finally:
            result.unfit_checkpoints = list(self._unfit)
        self._anchor_failures, self._anchor_not_before = 0, None
        return None

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
        """
        result = ExportResult()
        conn = self._store.connection
        if anchor:
            result.trail_broken = await db.run_sync(conn, check_trail, self._clock())
            stop = await self._anchor(result)
            if stop is not None:
                return self._failed(result, stop, await db.run_sync(conn, _number, CURSOR_KEY))
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
        result.cursor = await db.run_sync(conn, _settle, start, end, refused)
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
        settle up to (before the first entry to send again)."""
        entries = bundle_entries(response)
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
        self, *, max_bundles: int = 1000, stop: Callable[[], bool] = lambda: False
    ) -> ExportResult:
        """Export until nothing is left, the link fails, ``max_bundles`` were sent, or
        ``stop()`` (asked before each bundle: the process is shutting down)."""
        total = ExportResult()
        for sent in range(max_bundles):
            if stop():
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


ANCHOR_PAGE = 1000  # anchors asked for per page (a few hundred bytes each)
ANCHOR_PAGES = 500  # pages followed at most: half a million anchors, a year of minutes


async def fetch_upstream_anchors(
    client: httpx.AsyncClient,
    site_id: str,
    *,
    page: int = ANCHOR_PAGE,
    max_pages: int = ANCHOR_PAGES,
) -> list[Checkpoint]:
    """This site's checkpoint anchors upstream, all of them (through the server's ``next``
    links, up to ``max_pages``), by audit id.

    All, not the newest few: the anchors of a chain cut back and grown again scroll out of
    any window of the newest within the hour, one being anchored every minute. Raises
    :class:`UpstreamError` when the server cannot be asked, when a page is not a search
    Bundle (a login page answered 200 read as "no anchors", and the trail passed as intact),
    and when a ``next`` link leaves the upstream (not followed: our credentials would go
    with it; nor read as the end, which would leave the older anchors unchecked).
    """
    params: dict[str, str] | None = {
        "_tag": f"{checkpoint_system(site_id)}|",
        "_sort": "-recorded",
        "_count": str(page),
    }
    url = "Provenance"
    anchors: list[Checkpoint] = []
    for _ in range(max_pages):
        response = await exchange(client, "GET", url, params=params)
        body = response_json(response)
        if response.status_code >= 300:
            raise classify_response(
                response.status_code,
                body,
                response.headers.get("Retry-After"),
                served=response.headers.get("Date"),
            )
        if as_dict(body).get("resourceType") != "Bundle":
            raise UpstreamError(
                Failure.TRANSIENT,
                f"anchor search: HTTP {response.status_code} without a search Bundle",
            )
        anchors += anchors_of(body)
        link = next_link(body, client)
        if link is None and _says_next(body):
            raise UpstreamError(
                Failure.ENDPOINT,
                "anchor search: the next page is not on the upstream (not followed); "
                "the anchors were not all read",
            )
        if link is None:
            break
        url, params = link, None
    return sorted(anchors, key=lambda cp: (cp.audit_id, cp.ts))


def _says_next(bundle: Any) -> bool:
    """Whether a search page has a ``next`` link of any kind (see :func:`next_link`)."""
    return any(
        as_dict(link).get("relation") == "next" for link in as_list(as_dict(bundle).get("link"))
    )


def anchors_of(body: Any) -> list[Checkpoint]:
    """The checkpoint anchors in a Provenance search answer, by audit id (what is not one is
    skipped)."""
    anchors = []
    for entry in bundle_entries(body):
        try:
            anchors.append(anchor_from_provenance(entry.get("resource")))
        except ValueError:
            continue
    return sorted(anchors, key=lambda cp: (cp.audit_id, cp.ts))
