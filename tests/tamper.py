"""Damage on disk as the tests make it: a stored ciphertext moved onto another row, a byte
flipped, or the audit trail edited past its append-only triggers.

A moved ciphertext is what a sector written to the wrong place, or a row copied by hand, looks like:
well formed, sealed under a key this box holds, but bound to another record, so it fails
authentication (ADR 0002) wherever it is read.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def move_ciphertext(db_path: Path, victim: str, source: str) -> None:
    """Copy the stored ciphertext of resource ``source`` over ``victim``'s (logical ids)."""
    conn = sqlite3.connect(db_path)
    try:
        conn.execute(
            "UPDATE resources SET body = (SELECT body FROM resources WHERE logical_id = ?) "
            "WHERE logical_id = ?",
            (source, victim),
        )
        conn.commit()
    finally:
        conn.close()


def flip_byte(db_path: Path, victim: str, at: int = 20) -> None:
    """Flip one bit of resource ``victim``'s stored ciphertext (logical id): a bad sector."""
    conn = sqlite3.connect(db_path)
    try:
        [body] = conn.execute(
            "SELECT body FROM resources WHERE logical_id = ?", (victim,)
        ).fetchone()
        damaged = bytearray(body)
        damaged[at] ^= 0x01
        conn.execute("UPDATE resources SET body = ? WHERE logical_id = ?", (bytes(damaged), victim))
        conn.commit()
    finally:
        conn.close()


def unguarded(db_path: Path, *statements: str) -> None:
    """Run ``statements`` past the audit trail's append-only triggers, as someone with file
    access would, then put the triggers back as they were (so the local check alone passes)."""
    from appliance.audit import _GUARDS

    raw = sqlite3.connect(db_path, isolation_level=None)
    try:
        for name in _GUARDS:
            raw.execute(f"DROP TRIGGER IF EXISTS {name}")
        for statement in statements:
            raw.execute(statement)
        for sql in _GUARDS.values():
            raw.execute(sql)
    finally:
        raw.close()
