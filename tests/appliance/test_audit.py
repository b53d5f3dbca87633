"""The audit chain on a real SQLite file: append-only, and every kind of tampering detected."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance import audit, db
from appliance.audit import AuditAction, AuditEvent, Outcome

T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
KEY = Ed25519PrivateKey.generate()


def _fill(conn: sqlite3.Connection, n: int, *, start: datetime = T0) -> None:
    for i in range(n):
        with db.transaction_sync(conn):
            audit.append(
                conn,
                [
                    AuditEvent(
                        f"user:nurse{i % 3}",
                        AuditAction.READ if i % 2 else AuditAction.SEARCH,
                        patient_key=bytes([i % 5]) * 16,
                        entity=f"Observation/{i}",
                    )
                ],
                now=start + timedelta(minutes=i),
            )


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    c = db.connect_sync(tmp_path / "audit.db")
    _fill(c, 20)
    return c


def _attacker(conn: sqlite3.Connection) -> None:
    """What someone with raw file access does first: drop the append-only triggers."""
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("DROP TRIGGER audit_no_delete")


def _restore_triggers(conn: sqlite3.Connection) -> None:
    for verb in ("UPDATE", "DELETE"):
        conn.execute(
            f"CREATE TRIGGER audit_no_{verb.lower()} BEFORE {verb} ON audit "
            "BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END"
        )


def _verify(conn: sqlite3.Connection) -> audit.VerifyResult:
    return audit.verify(conn, KEY.public_key())


def test_intact_chain_verifies(conn: sqlite3.Connection) -> None:
    assert audit.checkpoint(conn, KEY, now=T0) is not None
    result = _verify(conn)
    assert (result.ok, result.records, result.checkpoints) == (True, 20, 1)


def test_update_and_delete_are_refused_by_the_database(conn: sqlite3.Connection) -> None:
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE audit SET actor = 'user:x' WHERE id = 3")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM audit WHERE id = 3")


def test_edited_record_is_named(conn: sqlite3.Connection) -> None:
    _attacker(conn)
    conn.execute("UPDATE audit SET actor = 'user:someone-else' WHERE id = 7")
    _restore_triggers(conn)
    result = _verify(conn)
    assert not result.ok
    assert result.first_bad_id == 7
    assert "altered" in (result.problem or "")


def test_deleted_record_is_detected_at_the_gap(conn: sqlite3.Connection) -> None:
    _attacker(conn)
    conn.execute("DELETE FROM audit WHERE id = 9")
    result = _verify(conn)
    assert not result.ok
    assert result.first_bad_id == 10


def test_swapped_records_are_detected(conn: sqlite3.Connection) -> None:
    _attacker(conn)
    cols = "ts, actor, action, outcome, patient_key, entity, detail, prev_hash, hash"
    a = conn.execute(f"SELECT {cols} FROM audit WHERE id = 4").fetchone()
    b = conn.execute(f"SELECT {cols} FROM audit WHERE id = 5").fetchone()
    sets = ", ".join(f"{c.strip()} = ?" for c in cols.split(","))
    conn.execute(f"UPDATE audit SET {sets} WHERE id = 4", b)
    conn.execute(f"UPDATE audit SET {sets} WHERE id = 5", a)
    result = _verify(conn)
    assert not result.ok
    assert result.first_bad_id == 4


def test_inserted_record_with_a_plausible_hash_is_detected(conn: sqlite3.Connection) -> None:
    _attacker(conn)
    # Shift records 11.. up by one and forge a record 11 chained to record 10.
    conn.execute("UPDATE audit SET id = id + 1000 WHERE id >= 11")
    conn.execute("UPDATE audit SET id = id - 999 WHERE id >= 1000")
    prev = conn.execute("SELECT hash FROM audit WHERE id = 10").fetchone()[0]
    ts = audit.ts_text(T0)
    forged = audit.record_hash(prev, 11, ts, "user:ghost", "read", "success", None, "Patient/x", None)
    conn.execute(
        "INSERT INTO audit (id, ts, actor, action, outcome, patient_key, entity, detail, prev_hash, hash) "
        "VALUES (11, ?, 'user:ghost', 'read', 'success', NULL, 'Patient/x', NULL, ?, ?)",
        (ts, prev, forged),
    )
    result = _verify(conn)
    assert not result.ok
    assert result.first_bad_id == 12  # the first original record whose link no longer fits


def test_truncated_tail_is_detected_by_the_signed_checkpoint(conn: sqlite3.Connection) -> None:
    audit.checkpoint(conn, KEY, now=T0)
    _attacker(conn)
    conn.execute("DELETE FROM audit WHERE id > 17")
    _restore_triggers(conn)
    result = _verify(conn)
    assert not result.ok
    assert "truncated" in (result.problem or "")
    assert result.first_bad_id == 18


def test_forged_checkpoint_signature_is_detected(conn: sqlite3.Connection) -> None:
    audit.checkpoint(conn, KEY, now=T0)
    conn.execute("DROP TRIGGER audit_checkpoints_no_update")
    conn.execute("UPDATE audit_checkpoints SET signature = ?", (Ed25519PrivateKey.generate().sign(b"x"),))
    result = _verify(conn)
    assert not result.ok
    assert "signature" in (result.problem or "")


def test_whole_chain_rewritten_after_a_checkpoint_is_detected(conn: sqlite3.Connection) -> None:
    audit.checkpoint(conn, KEY, now=T0)
    _attacker(conn)
    # Edit record 5 and recompute every hash after it: the chain is self-consistent again,
    # but the signed checkpoint at record 20 no longer matches.
    conn.execute("UPDATE audit SET actor = 'user:rewritten' WHERE id = 5")
    rows = conn.execute("SELECT id, ts, actor, action, outcome, patient_key, entity, detail FROM audit WHERE id >= 5 ORDER BY id").fetchall()
    prev = conn.execute("SELECT hash FROM audit WHERE id = 4").fetchone()[0]
    for rid, *rest in rows:
        digest = audit.record_hash(prev, rid, *rest)
        conn.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE id = ?", (prev, digest, rid))
        prev = digest
    _restore_triggers(conn)
    result = _verify(conn)
    assert not result.ok
    assert result.first_bad_id == 20
    assert "rewritten" in (result.problem or "")


def test_missing_triggers_are_reported_even_without_other_damage(conn: sqlite3.Connection) -> None:
    _attacker(conn)
    result = _verify(conn)
    assert not result.ok
    assert "triggers missing" in (result.problem or "")


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    record=st.integers(min_value=1, max_value=20),
    column=st.sampled_from(["ts", "actor", "action", "outcome", "patient_key", "entity", "detail"]),
    junk=st.binary(min_size=1, max_size=8),
)
def test_any_single_field_mutation_names_that_record(tmp_path_factory: pytest.TempPathFactory, record: int, column: str, junk: bytes) -> None:
    c = db.connect_sync(tmp_path_factory.mktemp("h") / "a.db")
    _fill(c, 20)
    _attacker(c)
    old = c.execute(f"SELECT {column} FROM audit WHERE id = ?", (record,)).fetchone()[0]
    new: object = junk if isinstance(old, bytes) or old is None else f"{old}{junk.hex()}"
    c.execute(f"UPDATE audit SET {column} = ? WHERE id = ?", (new, record))
    result = audit.verify(c, KEY.public_key())
    assert not result.ok
    assert result.first_bad_id == record
    c.close()


def test_report_filters_by_window_user_and_patient(conn: sqlite3.Connection) -> None:
    window = audit.report(conn, since=T0 + timedelta(minutes=5), until=T0 + timedelta(minutes=10))
    assert [r.id for r in window] == [6, 7, 8, 9, 10]
    mine = audit.report(conn, actor="user:nurse1")
    assert {r.actor for r in mine} == {"user:nurse1"}
    assert len(mine) == 7
    patient = audit.report(conn, patient_key=bytes([2]) * 16)
    assert [r.id for r in patient] == [3, 8, 13, 18]
    rows = audit.format_report_rows(patient)
    assert rows[0]["patient"] == (bytes([2]) * 16).hex()


def test_naive_timestamps_are_refused(conn: sqlite3.Connection) -> None:
    with pytest.raises(ValueError, match="timezone-aware"), db.transaction_sync(conn):
        audit.append(conn, [AuditEvent("user:a", AuditAction.READ)], now=datetime(2026, 1, 1))  # noqa: DTZ001


def test_failures_are_recorded_with_their_outcome(conn: sqlite3.Connection) -> None:
    with db.transaction_sync(conn):
        audit.append(conn, [AuditEvent("user:a", AuditAction.LOGIN_FAILED, Outcome.FAILURE)], now=T0)
    [last] = audit.report(conn, action=AuditAction.LOGIN_FAILED)
    assert (last.outcome, last.id) == ("failure", 21)
    assert _verify(conn).ok


def test_chain_with_new_records_after_a_checkpoint_still_verifies(conn: sqlite3.Connection) -> None:
    audit.checkpoint(conn, KEY, now=T0)
    _fill(conn, 5, start=T0 + timedelta(days=1))
    assert audit.checkpoint(conn, KEY, now=T0 + timedelta(days=1)) is not None
    assert audit.checkpoint(conn, KEY, now=T0 + timedelta(days=1)) is None  # nothing new
    result = _verify(conn)
    assert (result.ok, result.records, result.checkpoints) == (True, 25, 2)
