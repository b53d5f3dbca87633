"""The tamper-evident audit trail (HIPAA 164.312(b), ONC 170.315(d)(2) and (d)(3)).

Every access to PHI appends a record: who (``user:<name>`` or ``service:<process>``), what
action, which patient (the pseudonymous key, never a name), which entity, when (UTC) and
the outcome. Records form a hash chain: ``hash = SHA-256(prev_hash || encode(record))``
where ``encode`` length-prefixes every field, so no two different records encode alike,
and the record id is part of it, so reordering is detected. Triggers refuse UPDATE and
DELETE; someone with raw file access can drop them, which is why :func:`verify` recomputes
the whole chain, checks the signed checkpoints (Ed25519, the box's key) and reports the
triggers' absence too. The newest checkpoint bounds truncation: records cut off after it
are detected (the sync issue also sends it upstream).
"""

from __future__ import annotations

import hashlib
import sqlite3
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance import db

GENESIS = bytes(32)
_TRIGGERS = ("audit_no_update", "audit_no_delete")
_CHUNK = 5000


class AuditAction(StrEnum):
    """What was done (IHE BALP maps these to AuditEvent.action/subtype when sent upstream)."""

    READ = "read"
    SEARCH = "search"
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    EXPORT = "export"
    SYNC = "sync"
    LOGIN = "login"
    LOGOUT = "logout"
    LOGIN_FAILED = "login_failed"
    BREAK_GLASS = "break_glass"
    KEY_ROTATION = "key_rotation"
    CONFIG = "config"


class Outcome(StrEnum):
    """Whether the access succeeded."""

    SUCCESS = "success"
    FAILURE = "failure"
    DENIED = "denied"


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One access to record; ``detail`` is free text that must never hold PHI."""

    actor: str
    action: AuditAction
    outcome: Outcome = Outcome.SUCCESS
    patient_key: bytes | None = None
    entity: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """A stored record as read back for reports."""

    id: int
    ts: datetime
    actor: str
    action: str
    outcome: str
    patient_key: bytes | None
    entity: str | None
    detail: str | None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement: the chain up to ``audit_id`` ends in ``hash``."""

    audit_id: int
    hash: bytes
    ts: str
    signature: bytes

    def to_json(self) -> dict[str, Any]:
        """The form sent upstream."""
        return {"audit_id": self.audit_id, "hash": self.hash.hex(), "ts": self.ts, "signature": self.signature.hex()}


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of :func:`verify`; ``problem`` names the first bad record in one line."""

    ok: bool
    records: int
    checkpoints: int
    first_bad_id: int | None = None
    problem: str | None = None


def ts_text(moment: datetime) -> str:
    """Fixed-width UTC text, so time windows filter correctly as strings."""
    if moment.tzinfo is None:
        raise ValueError("audit timestamps must be timezone-aware")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _field(value: str | bytes | None) -> bytes:
    if value is None:
        return b"\xff"  # distinct from any length-prefixed value, including the empty one
    data = value.encode() if isinstance(value, str) else value
    return struct.pack(">I", len(data)) + data


def record_hash(
    prev_hash: bytes,
    record_id: int,
    ts: str,
    actor: str,
    action: str,
    outcome: str,
    patient_key: bytes | None,
    entity: str | None,
    detail: str | None,
) -> bytes:
    """SHA-256 over the previous hash and the record's canonical encoding."""
    return hashlib.sha256(
        b"".join(
            (
                prev_hash,
                struct.pack(">Q", record_id),
                _field(ts),
                _field(actor),
                _field(action),
                _field(outcome),
                _field(patient_key),
                _field(entity),
                _field(detail),
            )
        )
    ).digest()


def append(conn: sqlite3.Connection, events: Sequence[AuditEvent], *, now: datetime) -> int:
    """Append records inside the caller's open write transaction; returns the last id.

    The caller holds the write lock (``BEGIN IMMEDIATE``), so the head cannot move under us.
    """
    ts = ts_text(now)
    head = conn.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    last_id, prev = (0, GENESIS) if head is None else (int(head[0]), bytes(head[1]))
    rows = []
    for event in events:
        last_id += 1
        digest = record_hash(
            prev, last_id, ts, event.actor, event.action.value, event.outcome.value,
            event.patient_key, event.entity, event.detail,
        )
        rows.append((last_id, ts, event.actor, event.action.value, event.outcome.value,
                     event.patient_key, event.entity, event.detail, prev, digest))
        prev = digest
    conn.executemany(
        "INSERT INTO audit (id, ts, actor, action, outcome, patient_key, entity, detail, prev_hash, hash) "
        "VALUES (?,?,?,?,?,?,?,?,?,?)",
        rows,
    )
    return last_id


def _checkpoint_message(audit_id: int, digest: bytes, ts: str) -> bytes:
    return b"appliance-audit-checkpoint-v1\x00" + struct.pack(">Q", audit_id) + digest + ts.encode()


def checkpoint(conn: sqlite3.Connection, signer: Ed25519PrivateKey, *, now: datetime) -> Checkpoint | None:
    """Sign the current chain head; None when nothing was added since the last checkpoint."""
    ts = ts_text(now)
    with db.transaction_sync(conn):
        head = conn.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
        if head is None:
            return None
        last = conn.execute("SELECT max(audit_id) FROM audit_checkpoints").fetchone()[0]
        if last is not None and int(last) >= int(head[0]):
            return None
        audit_id, digest = int(head[0]), bytes(head[1])
        signature = signer.sign(_checkpoint_message(audit_id, digest, ts))
        conn.execute(
            "INSERT INTO audit_checkpoints (audit_id, hash, ts, signature) VALUES (?,?,?,?)",
            (audit_id, digest, ts, signature),
        )
    return Checkpoint(audit_id, digest, ts, signature)


def _bad(records: int, checkpoints: int, record_id: int | None, problem: str) -> VerifyResult:
    return VerifyResult(False, records, checkpoints, record_id, problem)


def verify(
    conn: sqlite3.Connection,
    public_key: Ed25519PublicKey,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyResult:
    """Recompute the chain and check the signed checkpoints; stops at the first bad record."""
    present = {name for (name,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'trigger'")}
    missing = [t for t in _TRIGGERS if t not in present]
    checkpoints = conn.execute(
        "SELECT id, audit_id, hash, ts, signature FROM audit_checkpoints ORDER BY id"
    ).fetchall()
    by_record: dict[int, tuple[int, bytes]] = {}
    previous_cp = 0
    for cp_id, audit_id, digest, ts, signature in checkpoints:
        try:
            public_key.verify(bytes(signature), _checkpoint_message(int(audit_id), bytes(digest), str(ts)))
        except InvalidSignature:
            return _bad(0, len(checkpoints), int(audit_id), f"checkpoint {cp_id} (record {audit_id}): signature does not verify")
        if int(audit_id) <= previous_cp:
            return _bad(0, len(checkpoints), int(audit_id), f"checkpoint {cp_id}: checkpoints out of order")
        previous_cp = int(audit_id)
        by_record[int(audit_id)] = (cp_id, bytes(digest))

    total = int(conn.execute("SELECT count(*) FROM audit").fetchone()[0])
    sha256 = hashlib.sha256
    pack_q = struct.Struct(">Q").pack
    field = _field
    expected_id = 0
    prev = GENESIS
    cursor = conn.execute(
        "SELECT id, ts, actor, action, outcome, patient_key, entity, detail, prev_hash, hash FROM audit ORDER BY id"
    )
    while True:
        chunk = cursor.fetchmany(_CHUNK)
        if not chunk:
            break
        for rid, ts, actor, action, outcome, pkey, entity, detail, prev_hash, digest in chunk:
            expected_id += 1
            if rid != expected_id:
                return _bad(expected_id - 1, len(checkpoints), rid,
                            f"record {rid}: expected record {expected_id} (a record was removed or inserted)")
            if prev_hash != prev:
                return _bad(rid - 1, len(checkpoints), rid,
                            f"record {rid}: previous-hash link broken (a record before it was removed, inserted or reordered)")
            computed = sha256(
                b"".join((prev, pack_q(rid), field(ts), field(actor), field(action), field(outcome),
                          field(pkey), field(entity), field(detail)))
            ).digest()
            if computed != digest:
                return _bad(rid - 1, len(checkpoints), rid, f"record {rid}: hash does not match its contents (altered)")
            cp = by_record.get(rid)
            if cp is not None and cp[1] != computed:
                return _bad(rid - 1, len(checkpoints), rid,
                            f"checkpoint {cp[0]} (record {rid}): signed hash differs from the chain (rewritten)")
            prev = computed
        if progress is not None:
            progress(expected_id, total)
    if previous_cp > expected_id:
        cp_id = by_record[previous_cp][0]
        return _bad(expected_id, len(checkpoints), expected_id + 1,
                    f"checkpoint {cp_id} (record {previous_cp}): the audit trail ends at record {expected_id} (truncated)")
    if missing:
        return _bad(expected_id, len(checkpoints), None,
                    f"append-only triggers missing ({', '.join(missing)}): records could be edited")
    return VerifyResult(True, expected_id, len(checkpoints))


def report(
    conn: sqlite3.Connection,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    actor: str | None = None,
    patient_key: bytes | None = None,
    action: AuditAction | None = None,
    limit: int | None = None,
) -> list[AuditRecord]:
    """Records filtered by time window, actor, patient and action, oldest first."""
    clauses, params = [], []
    for clause, value in (
        ("ts >= ?", None if since is None else ts_text(since)),
        ("ts < ?", None if until is None else ts_text(until)),
        ("actor = ?", actor),
        ("patient_key = ?", patient_key),
        ("action = ?", None if action is None else action.value),
    ):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    sql = "SELECT id, ts, actor, action, outcome, patient_key, entity, detail FROM audit"
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += " ORDER BY id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [
        AuditRecord(rid, datetime.fromisoformat(ts.replace("Z", "+00:00")), a, act, out,
                    None if pk is None else bytes(pk), ent, det)
        for rid, ts, a, act, out, pk, ent, det in conn.execute(sql, params)
    ]


def format_report_rows(records: Sequence[AuditRecord]) -> list[dict[str, str]]:
    """Records as flat string rows for table, CSV and JSON output."""
    return [
        {
            "id": str(r.id),
            "time_utc": r.ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "actor": r.actor,
            "action": r.action,
            "outcome": r.outcome,
            "patient": "" if r.patient_key is None else r.patient_key.hex(),
            "entity": r.entity or "",
            "detail": r.detail or "",
        }
        for r in records
    ]
