"""Where the audit export stands, kept in the ``meta`` table, and what the trail still holds.

The export's cursor, refusals, anchor and trail breaks live in ``meta`` rows (keys below), so
``sync status``, ``/sync`` and ``/metrics`` read them without the keys and without a network.
Everything here reads an altered row as absent, never as an exception: a cursor read as 0
sends the trail again and an anchor read as 0 the newest checkpoint, both harmless (the
export's creates are conditional). :func:`check_trail` and :func:`anchor_candidate` decide
whether the trail still holds what was exported and what may be anchored; the exporter that
uses them is :mod:`sync_agent.audit_export`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance import audit, db
from appliance.audit import AuditAction, AuditEvent, Checkpoint, Outcome

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
# An exchange whose answer was lost: nothing is sent before this time (ISO), by any process.
UNSURE_KEY = "audit_export.unsure_until"
REFUSED_KEPT = 20  # the newest refusals kept with their reason; the count is kept in full


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


def meta_number(conn: sqlite3.Connection, key: str) -> int:
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
        cursor=meta_number(conn, CURSOR_KEY),
        head=head,
        refused=refused["count"],
        recent_refusals=tuple((rid, reason) for rid, reason in refused["recent"]),
        anchored=meta_number(conn, ANCHOR_KEY),
        breaks=meta_number(conn, BREAKS_KEY),
        breaks_acknowledged=meta_number(conn, BREAKS_ACKNOWLEDGED_KEY),
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
        breaks = meta_number(conn, BREAKS_KEY)
        before = meta_number(conn, BREAKS_ACKNOWLEDGED_KEY)
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


def settle(
    conn: sqlite3.Connection, start: int, end: int, refused: Sequence[tuple[int, str]]
) -> int:
    """Move the cursor from ``start`` to ``end`` and record the refusals, in one transaction.

    Returns the cursor after. Another exporter (``appliance sync once`` beside the sync
    process) may have settled the same records first; then nothing is counted twice.
    """
    with db.transaction_sync(conn):
        current = meta_number(conn, CURSOR_KEY)
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


def set_unsure(conn: sqlite3.Connection, until: datetime) -> None:
    """An export's answer was lost: nothing is sent again before ``until``, by any process
    (the server may be applying that request still; a conditional create is not atomic under
    concurrent requests on HAPI #3141, Microsoft's FHIR server #1382 or Medplum #4234)."""
    with db.transaction_sync(conn):
        db.set_meta(conn, UNSURE_KEY, until.isoformat())


def unsure_wait(conn: sqlite3.Connection, now: datetime, longest_s: float) -> float:
    """Seconds until the export may send after an answer lost (:func:`set_unsure`); 0 when
    it may now. A wait longer than ``longest_s`` (a clock set back since) is not kept."""
    text = _meta_text(conn, UNSURE_KEY)
    try:
        until = datetime.fromisoformat(text) if text else None
    except ValueError:
        return 0.0
    if until is None or until.tzinfo is None:
        return 0.0
    wait = (until - now).total_seconds()
    return wait if 0 < wait <= longest_s else 0.0


def set_anchor(conn: sqlite3.Connection, checkpoint: Checkpoint, refusal: str | None) -> None:
    """Record a checkpoint the upstream took, or refused for good (kept apart: a refused one
    is not resent, and is not reported as anchored)."""
    audit_id = checkpoint.audit_id
    key = ANCHOR_KEY if refusal is None else ANCHOR_REFUSED_KEY
    with db.transaction_sync(conn):
        if meta_number(conn, key) >= audit_id:
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
    audit_id = meta_number(conn, id_key)
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
            db.set_meta(conn, BREAKS_KEY, str(meta_number(conn, BREAKS_KEY) + 1))
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


def anchor_settled(conn: sqlite3.Connection) -> int:
    """The newest checkpoint settled upstream, taken or refused (0: none)."""
    return max(meta_number(conn, ANCHOR_KEY), meta_number(conn, ANCHOR_REFUSED_KEY))


# Checkpoints looked at, newest first, for one fit to anchor: the few newer ones a person
# with file access may have inserted or altered are passed over, a flood of them is not
# read to its end on every drain (``audit verify`` names the first of them anyway).
ANCHOR_CANDIDATES = 16
_CHECKPOINTS_SQL = (
    "SELECT id, audit_id, hash, ts, signature FROM audit_checkpoints ORDER BY id DESC LIMIT ?"
)


def anchor_candidate(
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
