"""Finding the stored records that fail authentication, and restoring them from a backup.

A resource whose stored ciphertext no longer authenticates (altered or moved on disk, a bad
sector) is left out of the screens and the sync, which carry on for everyone else, and each
read that meets it names it in the journal and the audit trail (docs/troubleshooting.md).
What staff then need is the whole list, and a way to put those records right that does not
throw away everything written since the last backup by restoring the whole database:

* :func:`check` decrypts every row of ``resources`` (nothing is kept or shown) and names
  those that fail, by type, logical id and row;
* :func:`repair` takes each one's copy from a backup of this box's store (the decrypted
  backup file: still the store's own ciphertext) when that copy is **the same version** —
  the same row, logical id, type and plain index columns, and as many earlier versions in
  ``resource_history`` — and authenticates under this box's keys. The damaged bytes are
  kept as found in ``unreadable_copies`` (for whoever investigates), the restored row is
  audited in the patient's name, and a record changed since the backup is left alone: its
  backup copy is an older version, and restoring it would undo a change without a word.

Both run while the appliance runs: the restore re-checks each row under the write lock, so
a row that a pulled copy healed meanwhile is not overwritten.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from appliance import audit, db, fhir
from appliance.audit import AuditAction, AuditEvent
from appliance.errors import ApplianceError, TamperedDataError
from appliance.keys import Keyring
from appliance.store import TABLE

logger = logging.getLogger(__name__)

BATCH = 1000
RESTORED_DETAIL = "stored copy failed authentication; restored from a backup (same version)"
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class Damaged:
    """A ``resources`` row whose stored copy fails authentication."""

    row_id: int
    type: str
    logical_id: str

    @property
    def reference(self) -> str:
        """``Type/logical id``, as the audit trail and the journal name it."""
        return f"{self.type}/{self.logical_id}"


@dataclass(frozen=True, slots=True)
class Repair:
    """What :func:`repair` did."""

    restored: tuple[Damaged, ...]
    left: tuple[tuple[Damaged, str], ...]  # not restored, and why
    dead_letters: tuple[int, ...]  # outbox dead letters of restored records: send them again


def _authenticates(keyring: Keyring, logical_id: str, version: int, body: bytes) -> bool:
    try:
        keyring.decrypt(TABLE, logical_id, version, body)
    except TamperedDataError:
        return False
    return True


def check(
    conn: sqlite3.Connection,
    keyring: Keyring,
    *,
    actor: str,
    now: datetime,
    progress: Progress | None = None,
) -> list[Damaged]:
    """Every stored resource whose copy fails authentication, in row order.

    Every record is decrypted (and dropped at once): one audit record says so, with the
    counts only.
    """
    total = int(conn.execute("SELECT count(*) FROM resources").fetchone()[0])
    damaged: list[Damaged] = []
    last, done = 0, 0
    while True:
        rows = conn.execute(
            "SELECT id, logical_id, type, key_version, body FROM resources WHERE id > ? "
            "ORDER BY id LIMIT ?",
            (last, BATCH),
        ).fetchall()
        if not rows:
            break
        for row_id, logical_id, rtype, version, body in rows:
            if not _authenticates(keyring, logical_id, int(version), bytes(body)):
                damaged.append(Damaged(int(row_id), str(rtype), str(logical_id)))
        last = int(rows[-1][0])
        done += len(rows)
        if progress is not None:
            progress(done, total)
    with db.transaction_sync(conn):
        audit.append(
            conn,
            [
                AuditEvent(
                    actor,
                    AuditAction.READ,
                    entity=f"resources x{done}",
                    detail=f"integrity check: {len(damaged)} fail authentication",
                )
            ],
            now=now,
        )
    return damaged


def _open_backup(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise ApplianceError(f"{path}: no such file (decrypt the backup first: docs/operations.md)")
    source = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        source.execute("SELECT id, logical_id, key_version, body FROM resources LIMIT 1")
    except sqlite3.DatabaseError as exc:
        source.close()
        raise ApplianceError(
            f"{path}: not a database of this appliance ({exc}); give the decrypted backup "
            '(appliance-<time>.db, docs/provisioning.md "Backup and restore")'
        ) from exc
    return source


def _history_count(conn: sqlite3.Connection, row_id: int) -> int:
    try:
        found = conn.execute(
            "SELECT count(*) FROM resource_history WHERE resource_id = ?", (row_id,)
        ).fetchone()
    except sqlite3.OperationalError:  # a backup from before the table existed
        return 0
    return int(found[0])


_PLAIN = "SELECT logical_id, type, patient_key, code, effective FROM resources WHERE id = ?"


def _candidate(
    conn: sqlite3.Connection, source: sqlite3.Connection, keyring: Keyring, item: Damaged
) -> tuple[int, bytes] | str:
    """The backup's copy of ``item`` as ``(key_version, body)``, or why it cannot be used."""
    theirs = source.execute(_PLAIN, (item.row_id,)).fetchone()
    if theirs is None or tuple(theirs[:2]) != (item.logical_id, item.type):
        return "not in this backup (stored after it was made)"
    ours = conn.execute(_PLAIN, (item.row_id,)).fetchone()
    if tuple(ours) != tuple(theirs) or _history_count(conn, item.row_id) != _history_count(
        source, item.row_id
    ):
        return (
            "changed since this backup: its copy there is an older version (enter the "
            "record again, or try a newer backup)"
        )
    version, body = source.execute(
        "SELECT key_version, body FROM resources WHERE id = ?", (item.row_id,)
    ).fetchone()
    if not _authenticates(keyring, item.logical_id, int(version), bytes(body)):
        return "the backup's copy does not authenticate either (or its key is gone)"
    return int(version), bytes(body)


def repair(
    conn: sqlite3.Connection,
    keyring: Keyring,
    backup: Path,
    *,
    actor: str,
    now: datetime,
    progress: Progress | None = None,
) -> Repair:
    """Restore every damaged record whose backup copy is the same version (module docstring)."""
    source = _open_backup(backup)
    try:
        damaged = check(conn, keyring, actor=actor, now=now, progress=progress)
        usable: list[tuple[Damaged, int, bytes]] = []
        left: list[tuple[Damaged, str]] = []
        for item in damaged:
            found = _candidate(conn, source, keyring, item)
            if isinstance(found, str):
                left.append((item, found))
            else:
                usable.append((item, *found))
    finally:
        source.close()
    restored: list[Damaged] = []
    stamp = fhir.utc_text(now)
    with db.transaction_sync(conn):
        events = []
        for item, version, body in usable:
            row = conn.execute(
                "SELECT key_version, body, patient_key FROM resources WHERE id = ? "
                "AND logical_id = ?",
                (item.row_id, item.logical_id),
            ).fetchone()
            if row is None or _authenticates(keyring, item.logical_id, int(row[0]), bytes(row[1])):
                left.append((item, "changed while this ran (it authenticates now)"))
                continue
            conn.execute(
                "INSERT INTO unreadable_copies (resource_id, key_version, body, found_at, "
                "replaced_by) VALUES (?, ?, ?, ?, ?)",
                (item.row_id, row[0], row[1], stamp, f"backup:{backup.name}"),
            )
            conn.execute(
                "UPDATE resources SET key_version = ?, body = ? WHERE id = ?",
                (version, body, item.row_id),
            )
            restored.append(item)
            events.append(
                AuditEvent(
                    actor,
                    AuditAction.UPDATE,
                    patient_key=None if row[2] is None else bytes(row[2]),
                    entity=item.reference,
                    detail=RESTORED_DETAIL,
                )
            )
        if events:
            audit.append(conn, events, now=now)
    for item in restored:
        logger.warning("resource row %s restored from backup %s", item.row_id, backup.name)
    dead = tuple(
        int(oid)
        for (oid,) in conn.execute(
            "SELECT id FROM outbox WHERE state = 'dead' AND resource_id IN "
            "(SELECT value FROM json_each(?)) ORDER BY id",
            (str([item.row_id for item in restored]),),
        ).fetchall()
    )
    left.sort(key=lambda pair: pair[0].row_id)
    return Repair(tuple(restored), tuple(left), dead)
