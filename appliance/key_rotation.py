"""Key rotation without downtime (``appliance keys rotate``).

**KEK rotation** re-wraps the data keys under a new key-encryption key in one transaction.
The new KEK is first written durably beside the old one (``<kek>.next``), the re-wrap
commits, then ``.next`` is renamed over the old file. A crash between the commit and the
rename is finished by :func:`resolve_kek` on the next start: the database's fingerprint
names the key that is right, so the box never ends up with a key that does not open it.
Under systemd credentials (a read-only directory) pass ``--new-kek-file`` instead and let
Ansible install the new credential (docs/keys.md).

**Data-key rotation** adds a new active data key (old ones become decrypt-only) and bumps
``meta.key_generation`` so every process reloads its keyring before its next write. Rows
are then re-encrypted in small transactions; the work is resumable (it simply looks for rows
under an old key version) and reads keep working throughout because each row names its key
version. When no row uses an old key any more, that key is retired and its wrapped bytes
destroyed.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance import db
from appliance.errors import KeyFileError, TamperedDataError, WrongKeyError
from appliance.keys import (
    KeyPurpose,
    Keyring,
    KeyState,
    _fsync_dir,
    _insert_key,
    kek_fingerprint,
    load_keyring,
    read_kek_file,
    unwrap_key,
    wrap_key,
)

logger = logging.getLogger(__name__)

REENCRYPT_BATCH = 500
Progress = Callable[[int, int], None]


def _pending_path(kek_path: Path) -> Path:
    return kek_path.with_name(kek_path.name + ".next")


def _stored_fingerprint(conn: sqlite3.Connection) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = 'kek_fingerprint'").fetchone()
    return None if row is None else str(row[0])


def resolve_kek(conn: sqlite3.Connection, kek_path: Path) -> bytes:
    """Read the KEK, finishing an interrupted KEK rotation if one is found."""
    pending = _pending_path(kek_path)
    expected = _stored_fingerprint(conn)
    if pending.exists() and expected is not None:
        new = read_kek_file(pending)
        if kek_fingerprint(new) == expected:
            logger.warning("finishing an interrupted key-encryption-key rotation")
            os.replace(pending, kek_path)
            _fsync_dir(kek_path.parent)
            return new
    return read_kek_file(kek_path)


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)


def rotate_kek(conn: sqlite3.Connection, kek_path: Path, new_kek_file: Path | None = None) -> str:
    """Re-wrap every live key under a new KEK; returns the new fingerprint.

    Without ``new_kek_file`` a new random key replaces the file at ``kek_path`` (crash-safe,
    see the module docstring). With it, the given file's key is used and ``kek_path`` is left
    alone: the operator installs the new file where the old one was.
    """
    old = resolve_kek(conn, kek_path)
    if new_kek_file is None:
        new = secrets.token_bytes(32)
        pending = _pending_path(kek_path)
        _write_secret(pending, new)
    else:
        new = read_kek_file(new_kek_file)
    if new == old:
        raise KeyFileError(f"{new_kek_file}: the new key-encryption key equals the current one")
    with db.transaction_sync(conn):
        if _stored_fingerprint(conn) != kek_fingerprint(old):
            raise WrongKeyError(
                f"{kek_path}: the current key-encryption key does not open this database"
            )
        rows = conn.execute(
            "SELECT version, purpose, wrapped FROM data_keys WHERE state != 'retired'"
        ).fetchall()
        for version, purpose, wrapped in rows:
            raw = unwrap_key(old, KeyPurpose(purpose), version, wrapped)
            conn.execute(
                "UPDATE data_keys SET wrapped = ? WHERE version = ?",
                (wrap_key(new, KeyPurpose(purpose), version, raw), version),
            )
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('kek_fingerprint', ?)",
            (kek_fingerprint(new),),
        )
    if new_kek_file is None:
        os.replace(_pending_path(kek_path), kek_path)
        _fsync_dir(kek_path.parent)
    return kek_fingerprint(new)


def rotate_data_key(conn: sqlite3.Connection, kek: bytes) -> int:
    """Make a new active data key (old ones decrypt-only); returns its version."""
    with db.transaction_sync(conn):
        conn.execute(
            "UPDATE data_keys SET state = 'decrypt_only' WHERE purpose = 'data' AND state = 'active'"
        )
        version = _insert_key(conn, kek, KeyPurpose.DATA, KeyState.ACTIVE, AESGCM.generate_key(256))
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('key_generation', ?)",
            (f"{version}:{datetime.now(UTC).isoformat()}",),
        )
    return version


@dataclass(frozen=True, slots=True)
class ReencryptResult:
    """What a re-encryption pass did.

    ``unreadable`` names the resource rows (and ``unreadable_sealed`` counts the sealed
    values) that failed authentication and were left as they were: re-encrypting them would
    need their plaintext. The key they name is kept until they are restored or removed.
    """

    rows: int
    retired_versions: tuple[int, ...]
    unreadable: tuple[int, ...] = ()
    unreadable_sealed: int = 0


def reencrypt(
    conn: sqlite3.Connection,
    kek: bytes,
    *,
    batch: int = REENCRYPT_BATCH,
    progress: Progress | None = None,
    max_batches: int | None = None,
) -> ReencryptResult:
    """Re-encrypt rows still under old data keys, ``batch`` rows per transaction.

    Safe to interrupt at any point and to run again (it resumes with what is left).
    ``max_batches`` bounds one call (tests use it to simulate a crash part-way).
    """
    keyring: Keyring = load_keyring(conn, kek)
    active = keyring.active_version
    total = int(
        conn.execute("SELECT count(*) FROM resources WHERE key_version != ?", (active,)).fetchone()[
            0
        ]
    )
    done = 0
    batches = 0
    after = 0  # rows are taken in id order, so one left as it was is not met again
    unreadable: list[int] = []
    while max_batches is None or batches < max_batches:
        with db.transaction_sync(conn):
            rows = conn.execute(
                "SELECT id, logical_id, key_version, body FROM resources "
                "WHERE key_version != ? AND id > ? ORDER BY id LIMIT ?",
                (active, after, batch),
            ).fetchall()
            updates = []
            for row_id, logical_id, version, blob in rows:
                try:
                    plaintext = keyring.decrypt("resources", logical_id, version, blob)
                except TamperedDataError:
                    # Damaged or altered on disk: its plaintext is gone, so it stays as it is
                    # (and keeps its key); the rest of the rotation goes on.
                    logger.error("resources row %s failed authentication; left as it is", row_id)
                    unreadable.append(int(row_id))
                    continue
                updates.append(
                    (
                        active,
                        keyring.encrypt_with(active, "resources", logical_id, plaintext),
                        row_id,
                    )
                )
            conn.executemany("UPDATE resources SET key_version = ?, body = ? WHERE id = ?", updates)
        if not rows:
            break
        after = int(rows[-1][0])
        done += len(updates)
        batches += 1
        if progress is not None:
            progress(done + len(unreadable), total)
    retired: tuple[int, ...] = ()
    unreadable_sealed = 0
    if max_batches is None or batches < max_batches:
        unreadable_sealed = _reseal_columns(conn, keyring, active)
        retired = _retire_unused(conn, active)
    return ReencryptResult(done, retired, tuple(unreadable), unreadable_sealed)


# Small sealed columns (Keyring.seal): (table, key column, sealed column, label bound in the
# associated data). Upstream error messages may quote PHI; held readings are Observations
# without a subject, and a nurse's note about one is free text. All are re-sealed under the
# new key so the old one can be destroyed.
SEALED_COLUMNS = (
    ("outbox", "id", "last_error", "outbox"),
    ("unmatched_readings", "id", "payload", "unmatched_readings"),
    ("unmatched_readings", "id", "note", "unmatched_readings.note"),
    # Pull-down and updates (0004): earlier versions of resources and review-queue copies.
    ("resource_history", "id", "body", "resource_history"),
    ("review_queue", "id", "mine", "review_queue.mine"),
    ("review_queue", "id", "theirs", "review_queue.theirs"),
    # Remote monitoring (0005): alert values and notes, staff time-log notes.
    ("alerts", "id", "detail", "alerts.detail"),
    ("alerts", "id", "note", "alerts.note"),
    ("rpm_time_log", "id", "note", "rpm_time_log.note"),
    # Nurse console security (0011): TOTP secrets, break-glass reasons.
    ("mfa_totp", "user_id", "secret", "mfa_totp.secret"),
    ("break_glass", "id", "reason", "break_glass.reason"),
)


def _reseal_columns(conn: sqlite3.Connection, keyring: Keyring, active: int) -> int:
    """Re-seal every sealed column under the active key (small tables: one transaction).

    Returns how many sealed values failed authentication and were left as they were.
    """
    unreadable = 0
    with db.transaction_sync(conn):
        for table, key, column, label in SEALED_COLUMNS:
            rows = conn.execute(
                f"SELECT {key}, {column} FROM {table} WHERE typeof({column}) = 'blob' "  # noqa: S608 - constant names
                f"AND substr({column}, 1, 4) != ?",
                (active.to_bytes(4, "big"),),
            ).fetchall()
            updates = []
            for row_key, sealed in rows:
                version = int.from_bytes(sealed[:4], "big")
                try:
                    plaintext = keyring.decrypt(label, str(row_key), version, sealed[4:])
                except TamperedDataError:
                    logger.error("%s row %s failed authentication; left as it is", table, row_key)
                    unreadable += 1
                    continue
                blob = keyring.encrypt_with(active, label, str(row_key), plaintext)
                updates.append((active.to_bytes(4, "big") + blob, row_key))
            conn.executemany(
                f"UPDATE {table} SET {column} = ? WHERE {key} = ?",  # noqa: S608 - constant names
                updates,
            )
    return unreadable


def _retire_unused(conn: sqlite3.Connection, active: int) -> tuple[int, ...]:
    with db.transaction_sync(conn):
        used = {int(v) for (v,) in conn.execute("SELECT DISTINCT key_version FROM resources")}
        # Unreadable copies kept for whoever investigates (0016) keep the key they name: with
        # it, one can still show which record's ciphertext was moved there.
        used |= {
            int(v) for (v,) in conn.execute("SELECT DISTINCT key_version FROM unreadable_copies")
        }
        # A sealed error written by a process that had not reloaded its keys yet still
        # names an old version: such a key stays until that row is re-sealed.
        for table, _key, column, _label in SEALED_COLUMNS:
            used |= {
                int(h, 16)
                for (h,) in conn.execute(
                    f"SELECT DISTINCT hex(substr({column}, 1, 4)) FROM {table} "  # noqa: S608 - constant names
                    f"WHERE typeof({column}) = 'blob'"
                )
            }
        old = [
            int(v)
            for (v,) in conn.execute(
                "SELECT version FROM data_keys WHERE purpose = 'data' AND state = 'decrypt_only'"
            )
        ]
        retired = tuple(v for v in old if v not in used and v != active)
        for version in retired:
            # Destroy the wrapped bytes (secure_delete zeroes the freed page content too).
            conn.execute(
                "UPDATE data_keys SET state = 'retired', wrapped = zeroblob(0) WHERE version = ?",
                (version,),
            )
    return retired
