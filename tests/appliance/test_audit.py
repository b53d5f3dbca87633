"""The audit chain on a real SQLite file: append-only, and every kind of tampering detected.

Tampering is done the way someone with file access would: a raw ``sqlite3`` connection of
their own, dropping the append-only triggers first, and often re-creating them afterwards
so that it is the chain, not the missing triggers, that catches them.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from appliance import audit, db
from appliance.audit import AuditAction, AuditEvent, Outcome

T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
RECORD_COLUMNS = ("ts", "actor", "action", "outcome", "patient_key", "entity", "detail")
GUARDS = (
    ("audit_no_update", "UPDATE", "audit", "audit records"),
    ("audit_no_delete", "DELETE", "audit", "audit records"),
    ("audit_checkpoints_no_update", "UPDATE", "audit_checkpoints", "audit checkpoints"),
    ("audit_checkpoints_no_delete", "DELETE", "audit_checkpoints", "audit checkpoints"),
)


def patient(n: int) -> bytes:
    return bytes([n % 5]) * 32


def fill(conn: sqlite3.Connection, n: int, *, start: datetime = T0) -> None:
    """``n`` records, one transaction and one minute each, as nurses reading charts."""
    first = int(conn.execute("SELECT count(*) FROM audit").fetchone()[0])
    for i in range(first, first + n):
        with db.transaction_sync(conn):
            audit.append(
                conn,
                [
                    AuditEvent(
                        f"user:nurse{i % 3}",
                        AuditAction.READ if i % 2 else AuditAction.SEARCH,
                        patient_key=patient(i),
                        entity=f"Observation/{i}",
                        detail=None if i % 4 else "kiosk",
                    )
                ],
                now=start + timedelta(minutes=i - first),
            )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


@pytest.fixture
def conn(path: Path) -> Iterator[sqlite3.Connection]:
    c = db.connect_sync(path)
    fill(c, 20)
    yield c
    c.close()


@contextlib.contextmanager
def attacker(path: Path, *, restore_triggers: bool = True) -> Iterator[sqlite3.Connection]:
    """A raw connection of the attacker's own, with the append-only triggers dropped."""
    raw = sqlite3.connect(path, isolation_level=None)
    try:
        for name, *_ in GUARDS:
            raw.execute(f"DROP TRIGGER {name}")
        yield raw
        if restore_triggers:
            for name, verb, table, what in GUARDS:
                # One line, unlike the migration: verify compares up to whitespace.
                raw.execute(
                    f"CREATE TRIGGER {name} BEFORE {verb} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{what} are append-only'); END"
                )
    finally:
        raw.close()


def check(conn: sqlite3.Connection) -> audit.VerifyResult:
    return audit.verify(conn, KEY.public_key())


def assert_broken(result: audit.VerifyResult, first_bad_id: int, words: str) -> None:
    assert not result.ok
    assert result.first_bad_id == first_bad_id, result.problem
    assert words in (result.problem or ""), result.problem


# -- the intact trail -----------------------------------------------------------------------


def test_intact_chain_with_a_checkpoint_verifies(conn: sqlite3.Connection) -> None:
    assert audit.checkpoint(conn, KEY, now=T0) is not None
    assert check(conn) == audit.VerifyResult(True, 20, 1)


def test_empty_trail_verifies(path: Path) -> None:
    with contextlib.closing(db.connect_sync(path)) as c:
        assert check(c) == audit.VerifyResult(True, 0, 0)
        assert audit.checkpoint(c, KEY, now=T0) is None


def test_records_appended_after_checkpoints_still_verify(conn: sqlite3.Connection) -> None:
    audit.checkpoint(conn, KEY, now=T0)
    fill(conn, 5, start=T0 + timedelta(days=1))
    assert audit.checkpoint(conn, KEY, now=T0 + timedelta(days=1)) is not None
    assert audit.checkpoint(conn, KEY, now=T0 + timedelta(days=1)) is None  # nothing new
    fill(conn, 3, start=T0 + timedelta(days=2))  # the unsigned tail after the newest one
    assert check(conn) == audit.VerifyResult(True, 28, 2)


def test_progress_reports_records_done_out_of_total(conn: sqlite3.Connection) -> None:
    calls: list[tuple[int, int]] = []
    audit.verify(conn, KEY.public_key(), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(20, 20)]


def test_append_returns_the_last_id_and_failures_keep_their_outcome(
    conn: sqlite3.Connection,
) -> None:
    with db.transaction_sync(conn):
        assert audit.append(conn, [], now=T0) == 20
        last = audit.append(
            conn,
            [
                AuditEvent("user:a", AuditAction.LOGIN_FAILED, Outcome.FAILURE),
                AuditEvent("user:a", AuditAction.BREAK_GLASS, Outcome.DENIED),
            ],
            now=T0,
        )
    assert last == 22
    [failed] = audit.report(conn, action=AuditAction.LOGIN_FAILED)
    assert (failed.id, failed.outcome) == (21, Outcome.FAILURE)
    assert check(conn).ok


def test_append_outside_a_transaction_is_refused(conn: sqlite3.Connection) -> None:
    with pytest.raises(RuntimeError, match="BEGIN IMMEDIATE"):
        audit.append(conn, [AuditEvent("user:a", AuditAction.READ)], now=T0)


def test_naive_times_are_refused(conn: sqlite3.Connection) -> None:
    naive = datetime(2026, 1, 1)
    with pytest.raises(ValueError, match="timezone-aware"), db.transaction_sync(conn):
        audit.append(conn, [AuditEvent("user:a", AuditAction.READ)], now=naive)
    with pytest.raises(ValueError, match="timezone-aware"):
        audit.checkpoint(conn, KEY, now=naive)
    with pytest.raises(ValueError, match="timezone-aware"):
        audit.report(conn, since=naive)
    assert check(conn).records == 20  # nothing was written


def test_stored_time_is_fixed_width_utc_with_microseconds() -> None:
    ist = timezone(timedelta(hours=5, minutes=30))
    assert audit.ts_text(datetime(2026, 11, 26, 13, 30, tzinfo=ist)) == (
        "2026-11-26T08:00:00.000000Z"
    )
    assert audit.ts_text(datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=UTC)) == (
        "0999-01-02T03:04:05.000006Z"
    )


def test_record_hash_follows_the_documented_layout() -> None:
    # Spelled out by hand from the module docstring, as an upstream verifier would.
    prev, ts, pk = bytes(range(32)), "2026-11-26T08:00:00.000000Z", b"\xaa" * 32
    message = (
        prev
        + (7).to_bytes(8, "big")
        + bytes([1, 1, 1, 1, 2, 1, 0])
        + b"".join(n.to_bytes(4, "big") for n in (27, 11, 4, 7, 32, 0, 0))
        + ts.encode()
        + b"user:nurse1readsuccess"
        + pk
    )
    expected = hashlib.sha256(message).digest()
    fields = (ts, "user:nurse1", "read", "success")
    assert audit.record_hash(prev, 7, *fields, pk, "", None) == expected
    # The general path (taken for anything unusual) agrees with the fast one.
    assert audit.record_hash(prev, 7, *fields, memoryview(pk), "", None) == expected
    assert audit.record_hash(prev, 7, *fields, pk, None, "") != expected
    assert audit.record_hash(prev, 7, *fields, pk.decode("latin-1"), "", None) != expected


def test_checkpoint_is_signed_and_has_an_upstream_form(conn: sqlite3.Connection) -> None:
    made = audit.checkpoint(conn, KEY, now=T0)
    assert made is not None
    assert made == audit.latest_checkpoint(conn)
    KEY.public_key().verify(made.signature, made.message())
    head = conn.execute("SELECT hash FROM audit WHERE id = 20").fetchone()[0]
    assert made.to_json() == {
        "audit_id": 20,
        "hash": head.hex(),
        "ts": "2026-11-26T08:00:00.000000Z",
        "signature": made.signature.hex(),
    }


# -- the database refuses changes -------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE audit SET actor = 'user:x' WHERE id = 3",
        "DELETE FROM audit WHERE id = 3",
        "UPDATE audit_checkpoints SET audit_id = 1",
        "DELETE FROM audit_checkpoints",
    ],
)
def test_update_and_delete_are_refused_by_the_database(conn: sqlite3.Connection, sql: str) -> None:
    audit.checkpoint(conn, KEY, now=T0)
    with pytest.raises(sqlite3.IntegrityError, match="are append-only"):
        conn.execute(sql)
    assert check(conn).ok


# -- tampering with records --------------------------------------------------------------------


def test_edited_field_names_the_record(conn: sqlite3.Connection, path: Path) -> None:
    with attacker(path) as raw:
        raw.execute("UPDATE audit SET actor = 'user:someone-else' WHERE id = 7")
    result = check(conn)
    assert_broken(result, 7, "record 7: hash does not match its contents (altered)")
    assert result.records == 6


def test_patient_key_retyped_to_text_is_detected(conn: sqlite3.Connection, path: Path) -> None:
    # Same bytes, other type: it would no longer match the report's patient filter.
    with attacker(path) as raw:
        raw.execute("UPDATE audit SET patient_key = CAST(patient_key AS TEXT) WHERE id = 8")
    assert [r.id for r in audit.report(conn, patient_key=patient(7))] == [3, 13, 18]
    assert_broken(check(conn), 8, "altered")


def test_text_that_is_not_utf8_is_reported_not_raised(conn: sqlite3.Connection, path: Path) -> None:
    with attacker(path) as raw:
        raw.execute("UPDATE audit SET detail = CAST(x'ff00fe' AS TEXT) WHERE id = 12")
    assert_broken(check(conn), 12, "altered")


def test_bad_text_after_the_first_chunk_is_named(path: Path) -> None:
    with contextlib.closing(db.connect_sync(path)) as c:
        with db.transaction_sync(c):
            audit.append(c, [AuditEvent("service:devices", AuditAction.CREATE)] * 10_050, now=T0)
        with attacker(path) as raw:
            raw.execute("UPDATE audit SET actor = CAST(x'c3' AS TEXT) WHERE id = 10020")
        assert_broken(check(c), 10_020, "altered")


def test_removed_middle_record_is_named(conn: sqlite3.Connection, path: Path) -> None:
    with attacker(path) as raw:
        raw.execute("DELETE FROM audit WHERE id = 9")
    assert_broken(check(conn), 9, "record 9: missing, the trail jumps from record 8 to 10")


def test_removed_record_with_ids_closed_up_is_named(conn: sqlite3.Connection, path: Path) -> None:
    with attacker(path) as raw:
        raw.execute("DELETE FROM audit WHERE id = 9")
        raw.execute("UPDATE audit SET id = id - 1 WHERE id > 9")
    assert_broken(check(conn), 9, "record 9: previous-hash link broken")


def test_removed_first_record_is_named(conn: sqlite3.Connection, path: Path) -> None:
    with attacker(path) as raw:
        raw.execute("DELETE FROM audit WHERE id = 1")
    assert_broken(check(conn), 1, "record 1: missing")


def test_swapped_records_are_named_at_the_first(conn: sqlite3.Connection, path: Path) -> None:
    cols = ", ".join((*RECORD_COLUMNS, "prev_hash", "hash"))
    sets = ", ".join(f"{c} = ?" for c in (*RECORD_COLUMNS, "prev_hash", "hash"))
    with attacker(path) as raw:
        a = raw.execute(f"SELECT {cols} FROM audit WHERE id = 4").fetchone()
        b = raw.execute(f"SELECT {cols} FROM audit WHERE id = 5").fetchone()
        raw.execute(f"UPDATE audit SET {sets} WHERE id = 4", b)
        raw.execute(f"UPDATE audit SET {sets} WHERE id = 5", a)
    assert_broken(check(conn), 4, "record 4: previous-hash link broken")


def test_inserted_record_with_a_recomputed_hash_is_caught_at_the_next(
    conn: sqlite3.Connection, path: Path
) -> None:
    # Shift records 11.. up by one and forge a record 11 correctly chained to record 10.
    # Anyone can compute SHA-256, so the forgery itself verifies; the original record
    # after it cannot: its link and its id no longer fit.
    with attacker(path) as raw:
        raw.execute("UPDATE audit SET id = id + 1000 WHERE id >= 11")
        raw.execute("UPDATE audit SET id = id - 999 WHERE id >= 1000")
        prev = raw.execute("SELECT hash FROM audit WHERE id = 10").fetchone()[0]
        forged = ("2026-11-26T08:10:30.000000Z", "user:ghost", "read", "success", None, "x", None)
        digest = audit.record_hash(prev, 11, *forged)
        raw.execute(
            "INSERT INTO audit VALUES (11, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (*forged, prev, digest)
        )
    result = check(conn)
    assert_broken(result, 12, "record 12: previous-hash link broken")
    assert result.records == 11


def test_record_with_id_zero_is_named(conn: sqlite3.Connection, path: Path) -> None:
    with attacker(path) as raw:
        raw.execute(
            "INSERT INTO audit SELECT 0, ts, actor, action, outcome, patient_key, "
            "entity, detail, prev_hash, hash FROM audit WHERE id = 1"
        )
    assert_broken(check(conn), 0, "record 0: ids must start at 1")


# -- checkpoints: truncation, rewriting, forgery ------------------------------------------------


def test_truncated_tail_is_caught_by_the_signed_checkpoint(
    conn: sqlite3.Connection, path: Path
) -> None:
    audit.checkpoint(conn, KEY, now=T0)
    with attacker(path) as raw:
        raw.execute("DELETE FROM audit WHERE id > 17")
    result = check(conn)
    assert_broken(
        result, 18, "checkpoint 1 (record 20): the audit trail ends at record 17 (truncated)"
    )
    assert (result.records, result.checkpoints) == (17, 0)


def test_chain_rewritten_from_an_edit_on_is_caught_at_the_next_checkpoint(
    conn: sqlite3.Connection, path: Path
) -> None:
    fill(conn, 10, start=T0 + timedelta(hours=1))
    audit.checkpoint(conn, KEY, now=T0)  # signs record 30
    with attacker(path) as raw:
        # Edit record 5 and recompute every hash after it: the chain is self-consistent
        # again, so only the signature over record 30's hash can tell.
        raw.execute("UPDATE audit SET actor = 'user:rewritten' WHERE id = 5")
        prev = raw.execute("SELECT hash FROM audit WHERE id = 4").fetchone()[0]
        rows = raw.execute(
            "SELECT id, ts, actor, action, outcome, patient_key, entity, detail FROM audit "
            "WHERE id >= 5 ORDER BY id"
        ).fetchall()
        for rid, *fields in rows:
            digest = audit.record_hash(prev, rid, *fields)
            raw.execute(
                "UPDATE audit SET prev_hash = ?, hash = ? WHERE id = ?", (prev, digest, rid)
            )
            prev = digest
    assert_broken(check(conn), 30, "checkpoint 1 (record 30): signed hash differs from the chain")


def test_unsigned_tail_rewritten_verifies_locally(conn: sqlite3.Connection, path: Path) -> None:
    """What the design does NOT promise: records after the newest checkpoint have only the
    chain, which anyone can recompute; the copy of the checkpoint sent upstream is what
    bounds them (the hash chain guarantees everything up to the newest checkpoint)."""
    audit.checkpoint(conn, KEY, now=T0)  # signs record 20
    fill(conn, 2, start=T0 + timedelta(hours=1))
    with attacker(path) as raw:
        raw.execute("DELETE FROM audit WHERE id = 22")
    assert check(conn).ok


def test_forged_checkpoint_signature_is_named(conn: sqlite3.Connection, path: Path) -> None:
    audit.checkpoint(conn, KEY, now=T0)
    with attacker(path) as raw:
        forged = Ed25519PrivateKey.generate().sign(b"x")
        raw.execute("UPDATE audit_checkpoints SET signature = ?", (forged,))
    assert_broken(check(conn), 20, "checkpoint 1 (record 20): signature does not verify")


def test_edited_record_is_named_before_a_later_forged_checkpoint(
    conn: sqlite3.Connection, path: Path
) -> None:
    audit.checkpoint(conn, KEY, now=T0)
    with attacker(path) as raw:
        raw.execute("UPDATE audit_checkpoints SET signature = zeroblob(64)")
        raw.execute("UPDATE audit SET entity = 'Observation/other' WHERE id = 3")
    assert_broken(check(conn), 3, "record 3: hash does not match")


def test_removed_checkpoint_is_named(conn: sqlite3.Connection, path: Path) -> None:
    for i in range(3):
        fill(conn, 1)
        audit.checkpoint(conn, KEY, now=T0 + timedelta(hours=i))  # records 21, 22, 23
    with attacker(path) as raw:
        raw.execute("DELETE FROM audit_checkpoints WHERE id = 2")
    assert_broken(check(conn), 23, "checkpoint 3 (record 23): checkpoint 2 is missing (removed)")


def test_replayed_old_checkpoint_is_out_of_order(conn: sqlite3.Connection, path: Path) -> None:
    fill(conn, 1)
    audit.checkpoint(conn, KEY, now=T0)
    fill(conn, 1)
    audit.checkpoint(conn, KEY, now=T0)
    with attacker(path) as raw:
        raw.execute(
            "INSERT INTO audit_checkpoints (audit_id, hash, ts, signature) "
            "SELECT audit_id, hash, ts, signature FROM audit_checkpoints WHERE id = 1"
        )
    assert_broken(check(conn), 21, "checkpoint 3 (record 21): not after checkpoint 2")


# -- the triggers themselves ------------------------------------------------------------------


def test_missing_triggers_are_reported_without_other_damage(
    conn: sqlite3.Connection, path: Path
) -> None:
    with attacker(path, restore_triggers=False):
        pass
    result = check(conn)
    assert (result.ok, result.records, result.first_bad_id) == (False, 20, None)
    assert "append-only triggers missing or altered" in (result.problem or "")


def test_trigger_replaced_by_a_no_op_is_reported(conn: sqlite3.Connection, path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as raw:
        raw.execute("DROP TRIGGER audit_no_update")
        raw.execute("CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT 1; END")
    result = check(conn)
    assert not result.ok
    assert "audit_no_update" in (result.problem or "")


def test_missing_triggers_are_mentioned_with_the_first_bad_record(
    conn: sqlite3.Connection, path: Path
) -> None:
    with attacker(path, restore_triggers=False) as raw:
        raw.execute("UPDATE audit SET outcome = 'failure' WHERE id = 2")
    assert_broken(check(conn), 2, "triggers also missing or altered")


# -- any single-field mutation -------------------------------------------------------------------

events = st.builds(
    AuditEvent,
    actor=st.sampled_from(["user:nurse", "user:dr", "service:devices"]),
    action=st.sampled_from(AuditAction),
    outcome=st.sampled_from(Outcome),
    patient_key=st.none() | st.binary(min_size=32, max_size=32),
    entity=st.none() | st.text(max_size=20),
    detail=st.none() | st.text(max_size=20),
)
stored_values = (
    st.text(max_size=8)
    | st.binary(max_size=8)
    | st.integers(-(2**63), 2**63 - 1)  # SQLite's INTEGER range
    | st.floats(allow_nan=False)
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(st.lists(events, min_size=1, max_size=4), min_size=1, max_size=6),
    signed=st.booleans(),
    data=st.data(),
)
def test_any_single_field_mutation_names_that_record(
    tmp_path_factory: pytest.TempPathFactory,
    batches: list[list[AuditEvent]],
    signed: bool,
    data: st.DataObject,
) -> None:
    """Changing any one stored value of record k (or moving it) is reported at record k."""
    path = tmp_path_factory.mktemp("chain") / "audit.db"
    with contextlib.closing(db.connect_sync(path)) as c:
        for i, batch in enumerate(batches):
            with db.transaction_sync(c):
                audit.append(c, batch, now=T0 + timedelta(seconds=i))
        if signed:
            audit.checkpoint(c, KEY, now=T0)
        total = sum(len(b) for b in batches)
        record = data.draw(st.integers(1, total), label="record")
        column = data.draw(
            st.sampled_from([*RECORD_COLUMNS, "prev_hash", "hash", "id"]), label="column"
        )
        if column == "id":
            # Moved past the end, or before the start: there is no free id in between.
            new: object = data.draw(st.integers(total + 1, total + 5) | st.integers(-3, 0))
            expected = record if isinstance(new, int) and new > 0 else new
        else:
            new = data.draw(stored_values | st.none(), label="new value")
            expected = record
        # Bytes stored as TEXT need not be UTF-8: verify must report them, not raise.
        placeholder = "CAST(? AS TEXT)" if data.draw(st.booleans(), label="as text") else "?"
        with attacker(path, restore_triggers=data.draw(st.booleans())) as raw:
            old = raw.execute(
                f"SELECT CAST({column} AS BLOB), typeof({column}) FROM audit WHERE id = ?",
                (record,),
            ).fetchone()
            try:
                raw.execute(
                    f"UPDATE audit SET {column} = {placeholder} WHERE id = ?", (new, record)
                )
            except sqlite3.IntegrityError:
                assume(False)  # NULL into a NOT NULL column: the schema refused it
            now = raw.execute(
                f"SELECT CAST({column} AS BLOB), typeof({column}) FROM audit WHERE id = ?",
                (new if column == "id" else record,),
            ).fetchone()
            assume(now != old)  # e.g. 1.0 stored into an INTEGER-affinity column as 1
        result = audit.verify(c, KEY.public_key())
    assert not result.ok
    assert result.first_bad_id == expected, result.problem


@settings(max_examples=40, deadline=None)
@given(st.lists(events, min_size=1, max_size=10))
def test_any_events_round_trip_and_verify(
    tmp_path_factory: pytest.TempPathFactory, batch: list[AuditEvent]
) -> None:
    path = tmp_path_factory.mktemp("chain") / "audit.db"
    with contextlib.closing(db.connect_sync(path)) as c:
        with db.transaction_sync(c):
            audit.append(c, batch, now=T0)
        assert audit.verify(c, KEY.public_key()) == audit.VerifyResult(True, len(batch), 0)
        stored = audit.report(c)
    assert [
        AuditEvent(r.actor, r.action, r.outcome, r.patient_key, r.entity, r.detail) for r in stored
    ] == batch


# -- (d)(3) reports ------------------------------------------------------------------------------


def test_report_filters_by_time_window(conn: sqlite3.Connection) -> None:
    window = audit.report(conn, since=T0 + timedelta(minutes=5), until=T0 + timedelta(minutes=10))
    assert [r.id for r in window] == [6, 7, 8, 9, 10]
    assert window[0].ts == T0 + timedelta(minutes=5)
    assert window[0].ts.tzinfo is not None


def test_report_window_in_another_time_zone_means_the_same_instants(
    conn: sqlite3.Connection,
) -> None:
    est = timezone(timedelta(hours=-5))
    since = (T0 + timedelta(minutes=5)).astimezone(est)
    assert [r.id for r in audit.report(conn, since=since, limit=2)] == [6, 7]


def test_report_filters_by_actor_patient_and_action(conn: sqlite3.Connection) -> None:
    mine = audit.report(conn, actor="user:nurse1")
    assert [r.id for r in mine] == [2, 5, 8, 11, 14, 17, 20]
    assert [r.id for r in audit.report(conn, patient_key=patient(2))] == [3, 8, 13, 18]
    both = audit.report(conn, actor="user:nurse1", action=AuditAction.READ)
    assert [r.id for r in both] == [2, 8, 14, 20]


def test_report_rows_show_the_patient_key_as_hex(conn: sqlite3.Connection) -> None:
    [row] = audit.format_report_rows(audit.report(conn, limit=1))
    assert row == {
        "id": "1",
        "time_utc": "2026-11-26T08:00:00.000000Z",
        "actor": "user:nurse0",
        "action": "search",
        "outcome": "success",
        "patient": patient(0).hex(),
        "entity": "Observation/0",
        "detail": "kiosk",
    }


@pytest.mark.parametrize("audit_id", [2**62, 2**63 - 1], ids=["far ahead", "the largest id"])
def test_a_checkpoint_row_inserted_ahead_does_not_stop_later_checkpoints(
    conn: sqlite3.Connection, path: Path, audit_id: int
) -> None:
    audit.checkpoint(conn, KEY, now=T0)
    # INSERT is not guarded by a trigger; only verify tells.
    with attacker(path) as raw:
        raw.execute(
            "INSERT INTO audit_checkpoints (audit_id, hash, ts, signature) VALUES (?, ?, ?, ?)",
            (audit_id, b"\x01" * 32, audit.ts_text(T0), b"\x02" * 64),
        )
    fill(conn, 10)  # records 21-30
    # Before: compared with the highest row, so no checkpoint signed records 21-30, ever.
    made = audit.checkpoint(conn, KEY, now=T0 + timedelta(hours=1))
    assert made is not None
    assert made.audit_id == 30
    assert audit.checkpoint(conn, KEY, now=T0 + timedelta(hours=2)) is None
    assert_broken(check(conn), audit_id, "checkpoint 2")
