"""The tamper-evident audit trail (HIPAA 164.312(b), ONC 170.315(d)(2) and (d)(3)).

Every access to PHI appends a record: who (``user:<name>`` or ``service:<process>``), what
action, which patient (the pseudonymous key, never a name), which entity, when (UTC) and
the outcome — the "who, what, when, which patient, outcome" of ASTM E2147 that (d)(2)
cites, and the fields IHE BALP puts in a FHIR AuditEvent when the record goes upstream.

**Chain.** ``hash = SHA-256(message)`` with, byte for byte (so an upstream verifier can
re-implement it)::

    message = prev_hash                 32 bytes; 32 zero bytes for record 1
              || id                     8-byte big-endian signed
              || tag[1] .. tag[7]       1 byte each
              || length[1] .. length[7] 4-byte big-endian unsigned each
              || data[1] .. data[7]     the fields' bytes, back to back

over the fields ts, actor, action, outcome, patient_key, entity, detail in that order,
where NULL is tag 0 with no data, TEXT tag 1 with its UTF-8 bytes, BLOB tag 2 with its
bytes, and anything else (only ever written by tampering) tag 3 with its Python ``repr``.
Every field's type and length sit in a fixed-size header before the data, so no two
different records encode alike — not even a TEXT and a BLOB holding the same bytes, which
matters because a patient key re-typed to TEXT would silently drop out of a (d)(3)
report's patient filter. One header per record keeps verification fast (one ``pack``).
The id is inside the hash, so moving a record is detected; ``ts`` is fixed-width UTC
(``2026-11-26T08:00:00.000000Z``), so time windows filter correctly as strings.

**What is guaranteed.** Triggers refuse UPDATE and DELETE. Someone with raw file access can
drop them, so :func:`verify` recomputes the whole chain and checks the signed checkpoints
(Ed25519, the box's key). Any edit, removal, insertion or reordering at or before the newest
checkpoint is reported at the first record it affects; a checkpoint also bounds truncation.
Records after the newest checkpoint are protected by the chain alone: someone who rewrites
or truncates that tail and recomputes every hash after it is caught only by the copy of the
checkpoint held upstream — which is why checkpoints are taken often and sent upstream.
"""

from __future__ import annotations

import functools
import hashlib
import sqlite3
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance import db

GENESIS = bytes(32)
"""``prev_hash`` of record 1."""

_FETCH_CHUNK = 10_000  # big enough that fetchmany's per-call cost vanishes, small in memory
_CHECKPOINT_DOMAIN = b"appliance-audit-checkpoint-v1\x00"  # a signature means only this
_RECORD_COLUMNS = "id, ts, actor, action, outcome, patient_key, entity, detail"
_HEAD_SQL = "SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1"

# id (signed: a tampered negative id must hash, not crash), 7 type tags, 7 lengths.
_header = struct.Struct(">q7B7I").pack
_pack_id = struct.Struct(">q").pack
_NULL, _TEXT, _BLOB, _OTHER = 0, 1, 2, 3

# Tampered TEXT need not be UTF-8; decoding with surrogateescape keeps the exact bytes
# (re-encoded identically by _typed) instead of letting sqlite3 raise mid-verification.
# Text as stored, even where only tampering could have written bytes that are not UTF-8
# (surrogate escapes keep them): verify and the audit export read the trail with it.
tolerant_text = functools.partial(str, encoding="utf-8", errors="surrogateescape")


def _append_only_guard(name: str, verb: str, table: str, what: str) -> tuple[str, str]:
    # Must match appliance/migrations/0001_initial.sql up to whitespace.
    return name, (
        f"CREATE TRIGGER {name} BEFORE {verb} ON {table} "
        f"BEGIN SELECT RAISE(ABORT, '{what} are append-only'); END"
    )


_GUARDS = dict(
    (
        _append_only_guard("audit_no_update", "UPDATE", "audit", "audit records"),
        _append_only_guard("audit_no_delete", "DELETE", "audit", "audit records"),
        _append_only_guard(
            "audit_checkpoints_no_update", "UPDATE", "audit_checkpoints", "audit checkpoints"
        ),
        _append_only_guard(
            "audit_checkpoints_no_delete", "DELETE", "audit_checkpoints", "audit checkpoints"
        ),
    )
)


class AuditAction(StrEnum):
    """What was done; persisted as its value, mapped to BALP AuditEvent shapes upstream."""

    READ = "read"
    SEARCH = "search"
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    EXPORT = "export"
    PRINT = "print"  # ASTM E2147 lists printing among the accesses (d)(2) must record
    SYNC = "sync"
    LOGIN = "login"
    LOGOUT = "logout"
    LOGIN_FAILED = "login_failed"
    BREAK_GLASS = "break_glass"  # 164.312(a)(2)(ii) emergency access, 170.315(d)(6)
    KEY_ROTATION = "key_rotation"
    CONFIG = "config"


class Outcome(StrEnum):
    """How the attempt ended (BALP: AuditEvent.outcome)."""

    SUCCESS = "success"
    FAILURE = "failure"
    DENIED = "denied"  # refused by access control, as distinct from an error


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One access to record. No field may hold PHI.

    ``actor`` is ``user:<username>`` or ``service:<process>``; ``patient_key`` is the
    pseudonymous keyed-HMAC patient key, never a name or identifier; ``entity`` names what
    was touched (``Observation/<uuid>``, ``Observation x25``); ``detail`` is non-PHI text.
    """

    actor: str
    action: AuditAction
    outcome: Outcome = Outcome.SUCCESS
    patient_key: bytes | None = None
    entity: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """A stored record as read back for (d)(3) reports."""

    id: int
    ts: datetime
    actor: str
    action: AuditAction
    outcome: Outcome
    patient_key: bytes | None
    entity: str | None
    detail: str | None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement that the chain up to record ``audit_id`` ends in ``hash``."""

    audit_id: int
    hash: bytes
    ts: datetime
    signature: bytes

    def message(self) -> bytes:
        """The exact bytes the Ed25519 signature covers."""
        return _checkpoint_message(self.audit_id, self.hash, ts_text(self.ts))

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form, as sent upstream (hex bytes, the signed timestamp text)."""
        return {
            "audit_id": self.audit_id,
            "hash": self.hash.hex(),
            "ts": ts_text(self.ts),
            "signature": self.signature.hex(),
        }


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of :func:`verify`.

    ``records`` and ``checkpoints`` count what was verified intact (everything when ``ok``);
    ``first_bad_id`` is the first record found bad and ``problem`` says why in one line.
    """

    ok: bool
    records: int
    checkpoints: int
    first_bad_id: int | None = None
    problem: str | None = None


class _Broken(Exception):
    """Internal: the first problem found, unwinding out of the walk."""

    def __init__(self, first_bad_id: int, problem: str) -> None:
        super().__init__(problem)
        self.first_bad_id = first_bad_id
        self.problem = problem


def ts_text(moment: datetime) -> str:
    """The stored form of a time: UTC, always microseconds, always ``Z`` (27 characters)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("audit timestamps must be timezone-aware")
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def _typed(value: object) -> tuple[int, bytes]:
    if isinstance(value, str):
        return _TEXT, value.encode("utf-8", "surrogateescape")
    if value is None:
        return _NULL, b""
    if isinstance(value, bytes | bytearray | memoryview):
        return _BLOB, bytes(value)
    return _OTHER, repr(value).encode()


def record_hash(
    prev_hash: bytes,
    record_id: int,
    ts: Any,
    actor: Any,
    action: Any,
    outcome: Any,
    patient_key: Any,
    entity: Any,
    detail: Any,
) -> bytes:
    """SHA-256 of a record's canonical message (the module docstring gives its layout).

    Values are as SQLite stores them (``str``, ``bytes``, ``None``; ``int`` or ``float``
    only after tampering), so the same function serves :func:`append` and :func:`verify`.
    """
    # Fast path for the shapes honest records have; it runs once per record in verify,
    # whose throughput is a goal (bench/audit_verify.py). Anything else — wrong types,
    # surrogate-escaped text — raises here and takes the general path below.
    try:
        if patient_key is None:
            pk_tag, pk = _NULL, b""
        elif patient_key.__class__ is bytes:
            pk_tag, pk = _BLOB, patient_key
        else:
            raise TypeError
        t, a, ac, o = ts.encode(), actor.encode(), action.encode(), outcome.encode()
        e_tag, e = (_NULL, b"") if entity is None else (_TEXT, entity.encode())
        d_tag, d = (_NULL, b"") if detail is None else (_TEXT, detail.encode())
        lengths = len(t), len(a), len(ac), len(o), len(pk), len(e), len(d)
        header = _header(record_id, _TEXT, _TEXT, _TEXT, _TEXT, pk_tag, e_tag, d_tag, *lengths)
        return hashlib.sha256(b"".join((prev_hash, header, t, a, ac, o, pk, e, d))).digest()
    except (AttributeError, TypeError, UnicodeEncodeError):
        pass
    tags, data = zip(
        *map(_typed, (ts, actor, action, outcome, patient_key, entity, detail)), strict=True
    )
    header = _header(record_id, *tags, *map(len, data))
    return hashlib.sha256(prev_hash + header + b"".join(data)).digest()


def _head(conn: sqlite3.Connection) -> tuple[int, bytes]:
    row = conn.execute(_HEAD_SQL).fetchone()
    return (0, GENESIS) if row is None else (int(row[0]), bytes(row[1]))


def append(conn: sqlite3.Connection, events: Sequence[AuditEvent], *, now: datetime) -> int:
    """Append ``events`` at time ``now`` (timezone-aware); returns the id of the last record.

    Runs inside the caller's open write transaction (``BEGIN IMMEDIATE``), so the records
    commit or vanish together with the access they describe, and the caller's write lock
    keeps the chain head from moving between reading it and inserting after it. With no
    events it returns the current head id.
    """
    ts = ts_text(now)
    if not conn.in_transaction:
        raise RuntimeError("audit.append must run inside the caller's BEGIN IMMEDIATE")
    last_id, prev = _head(conn)
    rows: list[tuple[object, ...]] = []
    for event in events:
        last_id += 1
        fields = (
            ts,
            event.actor,
            AuditAction(event.action).value,
            Outcome(event.outcome).value,
            event.patient_key,
            event.entity,
            event.detail,
        )
        digest = record_hash(prev, last_id, *fields)
        rows.append((last_id, *fields, prev, digest))
        prev = digest
    # Explicit ids: the chain is computed before the insert, so SQLite must not choose them.
    conn.executemany(
        f"INSERT INTO audit ({_RECORD_COLUMNS}, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?,?)",  # noqa: S608 - constant column list
        rows,
    )
    return last_id


def _checkpoint_message(audit_id: int, digest: bytes, ts: str) -> bytes:
    # Fixed-width fields first, the one variable field last: unambiguous without prefixes.
    return _CHECKPOINT_DOMAIN + _pack_id(audit_id) + digest + ts.encode("utf-8", "surrogateescape")


def checkpoint(
    conn: sqlite3.Connection, signer: Ed25519PrivateKey, *, now: datetime
) -> Checkpoint | None:
    """Sign the chain head in its own transaction; None when nothing is new since the last.

    A checkpoint is what makes a rewritten or truncated chain detectable: the chain alone
    can be recomputed by anyone with file access, a signature cannot.
    """
    ts = ts_text(now)
    with db.transaction_sync(conn):
        audit_id, digest = _head(conn)
        if audit_id == 0:
            return None
        last = _last_signed(conn, signer.public_key())
        if last is not None and last >= audit_id:
            return None
        signature = signer.sign(_checkpoint_message(audit_id, digest, ts))
        conn.execute(
            "INSERT INTO audit_checkpoints (audit_id, hash, ts, signature) VALUES (?,?,?,?)",
            (audit_id, digest, ts, signature),
        )
    return Checkpoint(audit_id, digest, _parse_ts(ts), signature)


def _last_signed(conn: sqlite3.Connection, public_key: Ed25519PublicKey) -> int | None:
    """The record the newest checkpoint this box signed covers; None before the first.

    Rows whose signature does not verify are passed over: a row inserted by hand far ahead
    (INSERT is not guarded; ``audit verify`` names it) would otherwise stop every later
    checkpoint, and the newest records would go unsigned.
    """
    rows = conn.execute(
        "SELECT audit_id, hash, ts, signature FROM audit_checkpoints ORDER BY id DESC"
    )
    for audit_id, digest, ts, signature in rows:
        if not (
            isinstance(audit_id, int)
            and isinstance(digest, bytes)
            and isinstance(ts, str)
            and isinstance(signature, bytes)
        ):
            continue
        try:
            public_key.verify(signature, _checkpoint_message(audit_id, digest, ts))
        except (InvalidSignature, struct.error, ValueError):
            continue
        return audit_id
    return None


def latest_checkpoint(conn: sqlite3.Connection) -> Checkpoint | None:
    """The newest checkpoint, as sent upstream; None before the first one."""
    row = conn.execute(
        "SELECT audit_id, hash, ts, signature FROM audit_checkpoints ORDER BY id DESC LIMIT 1"
    ).fetchone()
    if row is None:
        return None
    return Checkpoint(int(row[0]), bytes(row[1]), _parse_ts(row[2]), bytes(row[3]))


def _guard_problems(conn: sqlite3.Connection) -> list[str]:
    found = {
        name: " ".join(str(sql).split())
        for name, sql in conn.execute("SELECT name, sql FROM sqlite_schema WHERE type = 'trigger'")
    }
    return [name for name, sql in _GUARDS.items() if found.get(name) != sql]


def _checked_checkpoints(
    conn: sqlite3.Connection, public_key: Ed25519PublicKey
) -> tuple[list[tuple[int, int, bytes]], _Broken | None]:
    """Checkpoints that are well-formed, signed and in order, then the first fault if any.

    Each good one is ``(checkpoint id, audit_id, hash)``; a fault carries the record it
    concerns, so the walk can report it in record order.
    """
    good: list[tuple[int, int, bytes]] = []
    rows = conn.execute(
        "SELECT id, audit_id, hash, ts, signature FROM audit_checkpoints ORDER BY id"
    ).fetchall()
    for cp_id, audit_id, digest, ts, signature in rows:
        expected_id = len(good) + 1
        last_audit_id = good[-1][1] if good else 0
        if not (
            isinstance(audit_id, int)
            and isinstance(digest, bytes)
            and len(digest) == len(GENESIS)
            and isinstance(ts, str)
            and isinstance(signature, bytes)
        ):
            return good, _Broken(last_audit_id + 1, f"checkpoint {cp_id}: malformed (altered)")
        label = f"checkpoint {cp_id} (record {audit_id})"
        if cp_id != expected_id:
            return good, _Broken(
                audit_id,
                f"{label}: checkpoint {expected_id} is missing (removed)",
            )
        try:
            public_key.verify(signature, _checkpoint_message(audit_id, digest, ts))
        except InvalidSignature:
            return good, _Broken(audit_id, f"{label}: signature does not verify (forged)")
        if audit_id <= last_audit_id:
            return good, _Broken(
                audit_id,
                f"{label}: not after checkpoint {cp_id - 1} (record {last_audit_id}); "
                "checkpoints out of order",
            )
        good.append((cp_id, audit_id, digest))
    return good, None


_NO_CHECKPOINT = (0, -1, b"")


def _chunks(conn: sqlite3.Connection) -> Iterator[list[Any]]:
    """The records in id order, in big chunks, decoding text the fast way until it fails.

    Only tampering writes TEXT that is not UTF-8; sqlite3 then raises mid-chunk, and the
    rest is re-read after the last record handed out, keeping the raw bytes (the caller
    restores the connection's text factory).
    """
    select = f"SELECT {_RECORD_COLUMNS}, prev_hash, hash FROM audit"  # noqa: S608 - constant
    cursor = conn.execute(select + " ORDER BY id")
    last_id: int | None = None
    while True:
        try:
            chunk = cursor.fetchmany(_FETCH_CHUNK)
        except sqlite3.OperationalError:
            if conn.text_factory is tolerant_text:
                raise
            conn.text_factory = tolerant_text
            if last_id is None:
                cursor = conn.execute(select + " ORDER BY id")
            else:
                cursor = conn.execute(select + " WHERE id > ? ORDER BY id", (last_id,))
            continue
        if not chunk:
            return
        last_id = chunk[-1][0]
        yield chunk


class _Walk:
    """One pass over the chain; counts what it verified even when it stops early."""

    def __init__(self, checkpoints: list[tuple[int, int, bytes]]) -> None:
        self.checkpoints = checkpoints
        self.records = 0
        self.verified_checkpoints = 0

    def run(
        self,
        conn: sqlite3.Connection,
        fault: _Broken | None,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        """Recompute the chain in id order; raises :class:`_Broken` at the first problem.

        A checkpoint ``fault`` is raised when the walk reaches the record it names, so
        problems come out in record order whichever table they are in.
        """
        total = int(conn.execute("SELECT ifnull(max(id), 0) FROM audit").fetchone()[0])
        fault_at = -1 if fault is None else max(fault.first_bad_id, 1)
        pending = iter(self.checkpoints)
        cp_id, cp_at, cp_hash = next(pending, _NO_CHECKPOINT)
        expected = 0
        prev = GENESIS
        hash_of = record_hash  # a local: this loop is the throughput figure in bench/
        for chunk in _chunks(conn):
            for rid, ts, actor, action, outcome, pkey, entity, detail, link, stored in chunk:
                expected += 1
                if rid != expected:
                    raise _id_gap(rid, expected)
                if link != prev:
                    raise _Broken(
                        rid,
                        f"record {rid}: previous-hash link broken "
                        "(a record before it was removed, inserted or reordered)",
                    )
                prev = hash_of(prev, rid, ts, actor, action, outcome, pkey, entity, detail)
                if prev != stored:
                    raise _Broken(rid, f"record {rid}: hash does not match its contents (altered)")
                self.records = rid
                if rid == cp_at:
                    if cp_hash != prev:
                        raise _Broken(
                            rid,
                            f"checkpoint {cp_id} (record {rid}): signed hash differs from "
                            "the chain (records up to it were rewritten)",
                        )
                    self.verified_checkpoints += 1
                    cp_id, cp_at, cp_hash = next(pending, _NO_CHECKPOINT)
                if rid == fault_at and fault is not None:
                    raise fault
            if progress is not None:
                progress(expected, total)
        if cp_at != _NO_CHECKPOINT[1]:
            newest_id, newest_at, _ = self.checkpoints[-1]
            raise _Broken(
                expected + 1,
                f"checkpoint {newest_id} (record {newest_at}): the audit trail ends at record "
                f"{expected} (truncated)",
            )
        if fault is not None:
            raise fault


def _id_gap(rid: int, expected: int) -> _Broken:
    if rid > expected:
        return _Broken(
            expected,
            f"record {expected}: missing, the trail jumps from record {expected - 1} to {rid} "
            "(removed)",
        )
    return _Broken(rid, f"record {rid}: ids must start at 1 (inserted)")


def verify(
    conn: sqlite3.Connection,
    public_key: Ed25519PublicKey,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyResult:
    """Check the whole trail and stop at the first bad record (170.315(d)(2) integrity).

    Streams the records in id order and checks that ids run 1, 2, 3…, that each
    ``prev_hash`` is the previous record's hash, that each hash recomputes, that every
    checkpoint is signed by ``public_key``, in order and matches the record it names, that
    the newest checkpoint is not beyond the last record (truncation), and that the
    append-only triggers are intact. ``progress(done, total)`` is called after each chunk.
    Reads one consistent snapshot, so it can run while the appliance keeps appending.
    """
    saved_text_factory = conn.text_factory
    own_snapshot = not conn.in_transaction
    conn.text_factory = tolerant_text  # the few schema and checkpoint rows: never raise
    if own_snapshot:
        conn.execute("BEGIN")  # deferred: a read snapshot, no write lock
    try:
        guards = _guard_problems(conn)
        checkpoints, fault = _checked_checkpoints(conn, public_key)
        conn.text_factory = str  # the records: fast, and _chunks falls back when it fails
        walk = _Walk(checkpoints)
        try:
            walk.run(conn, fault, progress)
        except _Broken as broken:
            problem = broken.problem
            if guards:
                problem += f"; append-only triggers also missing or altered: {', '.join(guards)}"
            return VerifyResult(
                False, walk.records, walk.verified_checkpoints, broken.first_bad_id, problem
            )
        if guards:
            return VerifyResult(
                False,
                walk.records,
                walk.verified_checkpoints,
                None,
                f"append-only triggers missing or altered ({', '.join(guards)}): "
                "records could be changed without trace",
            )
        return VerifyResult(True, walk.records, walk.verified_checkpoints)
    finally:
        if own_snapshot:
            conn.execute("COMMIT")
        conn.text_factory = saved_text_factory


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
    """Records in ``[since, until)`` by actor, patient and action, oldest first ((d)(3)).

    The window compares the stored text, which is exact because :func:`ts_text` is
    fixed-width UTC.
    """
    clauses: list[str] = []
    params: list[str | bytes | int] = []
    for clause, value in (
        ("ts >= ?", None if since is None else ts_text(since)),
        ("ts < ?", None if until is None else ts_text(until)),
        ("actor = ?", actor),
        ("patient_key = ?", patient_key),
        ("action = ?", None if action is None else AuditAction(action).value),
    ):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    sql = f"SELECT {_RECORD_COLUMNS} FROM audit"  # noqa: S608 - constant column list
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += " ORDER BY id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [
        AuditRecord(
            rid,
            _parse_ts(ts),
            actor_,
            AuditAction(act),
            Outcome(out),
            None if pkey is None else bytes(pkey),
            entity,
            detail,
        )
        for rid, ts, actor_, act, out, pkey, entity, detail in conn.execute(sql, params)
    ]


def format_report_rows(records: Sequence[AuditRecord]) -> list[dict[str, str]]:
    """Records as flat string rows (same keys in every row) for table, CSV and JSON output.

    The patient is shown as the hex of its pseudonymous key: the report never holds PHI.
    """
    return [
        {
            "id": str(r.id),
            "time_utc": ts_text(r.ts),
            "actor": r.actor,
            "action": r.action.value,
            "outcome": r.outcome.value,
            "patient": "" if r.patient_key is None else r.patient_key.hex(),
            "entity": r.entity or "",
            "detail": r.detail or "",
        }
        for r in records
    ]
