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
  the same row, logical id, type and plain index columns, the same upstream version (for a
  record linked to the EHR), and as many earlier versions and replaced copies
  (``resource_history``, ``unreadable_copies``) — and authenticates under this box's keys.
  It is sealed again under the active data key (so it depends on no older key), the
  damaged bytes are kept as found in ``unreadable_copies`` (for whoever investigates), and
  the restore is audited in the patient's name. A record changed since the backup is left
  alone: its backup copy is an older version, and restoring it would undo a change without
  a word.

Both run while the appliance runs. Keys are read again when a row names a version this run
has not loaded (a data-key rotation meanwhile), and the restore re-checks each row under the
write lock, so a row that a pulled copy healed meanwhile is not overwritten.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from appliance import audit, db, fhir
from appliance.audit import AuditAction, AuditEvent
from appliance.errors import ApplianceError, TamperedDataError
from appliance.keys import load_keyring
from appliance.store import TABLE

logger = logging.getLogger(__name__)

BATCH = 1000
RESTORED_DETAIL = "stored copy failed authentication; restored from a backup (same version)"
Progress = Callable[[int, int], None]  # (done, total), called first with (0, total)


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


class _Keys:
    """The keyring, read again from the database when a row names a version not loaded."""

    def __init__(self, conn: sqlite3.Connection, kek: bytes) -> None:
        self._conn, self._kek = conn, kek
        self.ring = load_keyring(conn, kek)

    def open(self, logical_id: str, version: int, body: bytes) -> bytes | None:
        """The plaintext, or None when the copy fails authentication."""
        if version not in self.ring.data_keys:
            self.ring = load_keyring(self._conn, self._kek)  # a rotation in another process
        try:
            return self.ring.decrypt(TABLE, logical_id, version, body)
        except TamperedDataError:
            return None


def check(
    conn: sqlite3.Connection,
    kek: bytes,
    *,
    actor: str,
    now: datetime,
    progress: Progress | None = None,
) -> list[Damaged]:
    """Every stored resource whose copy fails authentication, in row order.

    Every record is decrypted (and dropped at once): one audit record says so, with the
    counts only.
    """
    return _check(conn, _Keys(conn, kek), actor, now, progress)


def _check(
    conn: sqlite3.Connection, keys: _Keys, actor: str, now: datetime, progress: Progress | None
) -> list[Damaged]:
    total = int(conn.execute("SELECT count(*) FROM resources").fetchone()[0])
    if progress is not None:
        progress(0, total)  # the total first, for a bar
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
            if keys.open(logical_id, int(version), bytes(body)) is None:
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
    # Read-only and immutable: nothing is written beside the backup (no -wal, no -shm).
    source = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
    try:
        source.execute("SELECT id, logical_id, key_version, body FROM resources LIMIT 1")
    except sqlite3.DatabaseError as exc:
        source.close()
        raise ApplianceError(
            f"{path}: not a database of this appliance ({exc}); give the decrypted backup "
            '(appliance-<time>.db, docs/provisioning.md "Backup and restore")'
        ) from exc
    return source


# What changes with every new version of a record, beside its sealed body: its plain index
# columns, its link to the upstream's version, and the versions and copies it replaced.
# Each with what a backup made before its table existed has instead.
_VERSION_MARKS: tuple[tuple[str, tuple[object, ...] | None], ...] = (
    ("SELECT logical_id, type, patient_key, code, effective FROM resources WHERE id = ?", None),
    (
        "SELECT upstream_ref, version_id, last_updated FROM upstream_links WHERE resource_id = ?",
        None,
    ),
    ("SELECT count(*) FROM resource_history WHERE resource_id = ?", (0,)),
    # A copy replaced by the upstream's is a new version; one restored from a backup is not.
    (
        "SELECT count(*) FROM unreadable_copies WHERE resource_id = ? "
        "AND replaced_by NOT LIKE 'backup:%'",
        (0,),
    ),
)


def _version_marks(conn: sqlite3.Connection, row_id: int) -> list[tuple[object, ...] | None]:
    marks: list[tuple[object, ...] | None] = []
    for sql, before in _VERSION_MARKS:
        try:
            found = conn.execute(sql, (row_id,)).fetchone()
        except sqlite3.OperationalError:  # a backup from before the table existed
            found = before
        marks.append(None if found is None else tuple(found))
    return marks


def _candidate(
    conn: sqlite3.Connection, source: sqlite3.Connection, keys: _Keys, item: Damaged
) -> bytes | str:
    """The backup's copy of ``item`` as plaintext, or why it cannot be used."""
    theirs = _version_marks(source, item.row_id)
    if theirs[0] is None or theirs[0][:2] != (item.logical_id, item.type):
        return "not in this backup (stored after it was made)"
    if _version_marks(conn, item.row_id) != theirs:
        return (
            "changed since this backup: its copy there is an older version (enter the "
            "record again, or try a newer backup)"
        )
    version, body = source.execute(
        "SELECT key_version, body FROM resources WHERE id = ?", (item.row_id,)
    ).fetchone()
    plaintext = keys.open(item.logical_id, int(version), bytes(body))
    if plaintext is None:
        return "the backup's copy does not authenticate either (or its key is gone)"
    return plaintext


def repair(
    conn: sqlite3.Connection,
    kek: bytes,
    backup: Path,
    *,
    actor: str,
    now: datetime,
    progress: Progress | None = None,
) -> Repair:
    """Restore every damaged record whose backup copy is the same version (module docstring)."""
    source = _open_backup(backup)
    keys = _Keys(conn, kek)
    try:
        damaged = _check(conn, keys, actor, now, progress)
        usable: list[tuple[Damaged, bytes]] = []
        left: list[tuple[Damaged, str]] = []
        for item in damaged:
            found = _candidate(conn, source, keys, item)
            if isinstance(found, str):
                left.append((item, found))
            else:
                usable.append((item, found))
    finally:
        source.close()
    restored: list[Damaged] = []
    stamp = fhir.utc_text(now)
    with db.transaction_sync(conn):
        events = []
        keys.ring = load_keyring(conn, kek)  # under the write lock: the active key as it is
        for item, plaintext in usable:
            row = conn.execute(
                "SELECT key_version, body, patient_key FROM resources WHERE id = ? "
                "AND logical_id = ?",
                (item.row_id, item.logical_id),
            ).fetchone()
            if row is None or keys.open(item.logical_id, int(row[0]), bytes(row[1])) is not None:
                left.append((item, "changed while this ran (it authenticates now)"))
                continue
            version, body = keys.ring.encrypt(TABLE, item.logical_id, plaintext)
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
            (json.dumps([item.row_id for item in restored]),),
        ).fetchall()
    )
    left.sort(key=lambda pair: pair[0].row_id)
    return Repair(tuple(restored), tuple(left), dead)
