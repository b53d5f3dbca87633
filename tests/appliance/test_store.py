"""The encrypted store on a real SQLite file: round trips, outbox, audit, bad input."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from appliance import db
from appliance.errors import InvalidResourceError, NotFoundError, StoreError, TamperedDataError
from appliance.store import UNREADABLE_LEFT_OUT, Lane, Store
from tests import factories
from tests.tamper import move_ciphertext

NURSE = "user:nurse1"
DEVICES = "service:devices"


def _raw(db_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(db_path)


async def test_created_resource_reads_back_decrypted(store: Store) -> None:
    [pat] = await store.create([factories.patient()], NURSE)
    ref = f"Patient/{pat.logical_id}"
    [obs] = await store.create([factories.bp_observation(ref)], DEVICES)
    read = await store.read("Observation", obs.logical_id, NURSE)
    assert read["subject"]["reference"] == ref
    assert read["component"][0]["valueQuantity"]["value"] == 128
    assert {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{obs.logical_id}"} in read[
        "identifier"
    ]


async def test_every_write_has_its_outbox_row_and_audit_record(store: Store, db_path: Path) -> None:
    [pat] = await store.create([factories.patient()], NURSE)
    ref = f"Patient/{pat.logical_id}"
    await store.create(
        [factories.bp_observation(ref, systolic=s) for s in (120, 130, 140)], DEVICES
    )
    conn = _raw(db_path)
    outbox = conn.execute("SELECT lane, state FROM outbox ORDER BY id").fetchall()
    assert outbox == [(Lane.CLINICAL, "pending")] * 4
    actions = conn.execute("SELECT actor, action, entity FROM audit ORDER BY id").fetchall()
    # The nurse's write is audited per resource; the device batch with one record.
    assert actions[0][:2] == (NURSE, "create")
    assert actions[1] == (DEVICES, "create", "Observation x3")
    conn.close()


async def test_invalid_resource_is_refused_whole_batch_and_names_no_values(
    store: Store, db_path: Path
) -> None:
    [pat] = await store.create([factories.patient()], NURSE)
    good = factories.bp_observation(f"Patient/{pat.logical_id}")
    bad = factories.bp_observation(f"Patient/{pat.logical_id}", effective=factories.MARKER_FAMILY)
    with pytest.raises(InvalidResourceError) as info:
        await store.create([good, bad], DEVICES)
    assert "effectiveDateTime" in str(info.value)
    assert factories.MARKER_FAMILY not in str(info.value)
    conn = _raw(db_path)
    assert (
        conn.execute("SELECT count(*) FROM resources WHERE type = 'Observation'").fetchone()[0] == 0
    )
    assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 1
    conn.close()


async def test_newest_returns_latest_first_and_audits_the_search(
    store: Store, db_path: Path
) -> None:
    [pat] = await store.create([factories.patient()], NURSE)
    ref = f"Patient/{pat.logical_id}"
    times = [f"2026-11-2{d}T08:00:00+00:00" for d in range(1, 6)]
    await store.create(
        [factories.bp_observation(ref, systolic=100 + i, effective=t) for i, t in enumerate(times)],
        DEVICES,
    )
    newest = await store.newest(ref, "Observation", NURSE, limit=3)
    assert [o["component"][0]["valueQuantity"]["value"] for o in newest] == [104, 103, 102]
    conn = _raw(db_path)
    last = conn.execute(
        "SELECT actor, action, patient_key FROM audit ORDER BY id DESC LIMIT 1"
    ).fetchone()
    assert last[:2] == (NURSE, "search")
    assert last[2] == store.keyring.patient_key(ref)
    conn.close()


async def test_patient_found_by_name_and_birth_date_despite_case_and_accents(store: Store) -> None:
    await store.create([factories.patient(family="Núñez-Ortega", birth_date="1970-01-02")], NURSE)
    await store.create(
        [factories.patient(family="Other", birth_date="1970-01-02", mrn="T0002")], NURSE
    )
    found = await store.find_patients("nunez ortega", "1970-01-02", "service:kiosk")
    assert [p["name"][0]["family"] for p in found] == ["Núñez-Ortega"]
    assert await store.find_patients("Nunez", "1970-01-03", "service:kiosk") == []
    by_mrn = await store.find_by_identifier("urn:oid:2.16.840.1.113883.3.9999.1", "t-0002", NURSE)
    assert [p["name"][0]["family"] for p in by_mrn] == ["Other"]


async def test_read_of_unknown_resource_is_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError):
        await store.read("Observation", "no-such-id", NURSE)


async def test_ciphertext_copied_into_another_row_is_rejected(store: Store, db_path: Path) -> None:
    [a, b] = await store.create(
        [factories.patient(mrn="A1"), factories.patient(family="Second", mrn="B2")], NURSE
    )
    move_ciphertext(db_path, b.logical_id, a.logical_id)
    with pytest.raises(TamperedDataError, match="failed authentication"):
        await store.read("Patient", b.logical_id, NURSE)
    assert (await store.read("Patient", a.logical_id, NURSE))["identifier"][1]["value"] == "A1"


async def test_searches_leave_out_a_record_that_fails_authentication_and_audit_it(
    store: Store, db_path: Path
) -> None:
    [a, b] = await store.create(
        [factories.patient(mrn="A1"), factories.patient(family="Second", mrn="B2")], NURSE
    )
    ref = f"Patient/{a.logical_id}"
    [older, newer] = await store.create(
        [
            factories.bp_observation(ref, 120, 80, effective="2026-11-26T08:00:00Z"),
            factories.bp_observation(ref, 130, 85, effective="2026-11-26T09:00:00Z"),
        ],
        NURSE,
    )
    move_ciphertext(db_path, b.logical_id, a.logical_id)
    move_ciphertext(db_path, newer.logical_id, older.logical_id)
    # Every patient but the unreadable one (before: TamperedDataError, no list for anyone).
    assert [p["id"] for p in await store.patients(NURSE)] == [a.logical_id]
    # A match by identifier says what is wrong: "no such patient" would make a second chart.
    with pytest.raises(TamperedDataError):
        await store.find_by_identifier("urn:oid:2.16.840.1.113883.3.9999.1", "B2", NURSE)
    newest = await store.newest(ref, "Observation", NURSE, limit=5)
    assert [o["id"] for o in newest] == [older.logical_id]
    # One asked for by id still says what is wrong, rather than "not found".
    with pytest.raises(TamperedDataError):
        await store.read("Patient", b.logical_id, NURSE)
    conn = _raw(db_path)
    failures = conn.execute(
        "SELECT actor, entity, detail FROM audit WHERE outcome = 'failure' ORDER BY id"
    ).fetchall()
    conn.close()
    assert failures == [
        (NURSE, f"Patient/{b.logical_id}", UNREADABLE_LEFT_OUT),
        (NURSE, f"Observation/{newer.logical_id}", UNREADABLE_LEFT_OUT),
    ]


async def test_flipped_ciphertext_bit_is_rejected(store: Store, db_path: Path) -> None:
    [a] = await store.create([factories.patient()], NURSE)
    conn = _raw(db_path)
    body = bytearray(
        conn.execute("SELECT body FROM resources WHERE logical_id = ?", (a.logical_id,)).fetchone()[
            0
        ]
    )
    body[20] ^= 0x01
    conn.execute("UPDATE resources SET body = ? WHERE logical_id = ?", (bytes(body), a.logical_id))
    conn.commit()
    conn.close()
    with pytest.raises(TamperedDataError):
        await store.read("Patient", a.logical_id, NURSE)


def _all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


async def test_phi_marker_never_reaches_disk_backup_temp_files_or_logs(
    tmp_path: Path,
    kek_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tmp_dir = tmp_path / "tmp"
    tmp_dir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_dir))
    monkeypatch.setenv("SQLITE_TMPDIR", str(tmp_dir))
    caplog.set_level(logging.DEBUG)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db_path = data_dir / "appliance.db"
    marker = factories.MARKER_FAMILY
    store = await Store.open(db_path, kek_path)
    try:
        [pat] = await store.create([factories.patient(family=marker, mrn=marker)], NURSE)
        ref = f"Patient/{pat.logical_id}"
        await store.create([factories.bp_observation(ref) for _ in range(50)], DEVICES)
        # A big sort with ORDER BY on a non-indexed expression would spill to a temp file
        # unless temp_store=MEMORY; exercise the read paths too.
        await store.newest(ref, "Observation", NURSE)
        assert await store.find_patients(marker, "1961-04-09", NURSE)
        with pytest.raises(InvalidResourceError):
            await store.create([{**factories.patient(family=marker), "birthDate": marker}], NURSE)
        # Check while the WAL and -shm still exist (before close checkpoints them).
        live = _all_bytes(data_dir)
        assert (data_dir / "appliance.db-wal").exists()
        backup_path = tmp_path / "backup.db"
        await db.run_sync(store.connection, lambda c: c.backup(sqlite3.connect(backup_path)))
    finally:
        await store.close()
    needle = marker.encode()
    assert needle not in live
    assert needle not in _all_bytes(data_dir)
    assert needle not in backup_path.read_bytes()
    assert needle not in _all_bytes(tmp_dir)
    assert marker not in caplog.text
    # The marker is really in the data: the store hands it back decrypted.
    reopened = await Store.open(db_path, kek_path)
    try:
        assert (await reopened.read("Patient", pat.logical_id, NURSE))["name"][0][
            "family"
        ] == marker
    finally:
        await reopened.close()


async def test_full_disk_fails_the_write_cleanly_and_keeps_what_was_acknowledged(
    store: Store, db_path: Path
) -> None:
    [pat] = await store.create([factories.patient()], NURSE)
    ref = f"Patient/{pat.logical_id}"
    acknowledged = []
    page_count = await db.run_sync(
        store.connection, lambda c: c.execute("PRAGMA page_count").fetchone()[0]
    )
    # SQLite's own limit makes it answer exactly as on a full volume (SQLITE_FULL).
    await db.run_sync(
        store.connection, lambda c: c.execute(f"PRAGMA max_page_count = {page_count + 8}")
    )

    async def fill_up() -> None:
        for _ in range(500):
            acknowledged.extend(
                await store.create([factories.bp_observation(ref) for _ in range(5)], DEVICES)
            )

    with pytest.raises(StoreError, match="disk is full") as info:
        await fill_up()
    assert "Free space" in str(info.value)
    assert acknowledged  # some writes fitted before the volume "filled up"
    await db.run_sync(store.connection, lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
    for item in acknowledged:
        assert (await store.read("Observation", item.logical_id, NURSE))["id"] == item.logical_id
    conn = _raw(db_path)
    counts = conn.execute(
        "SELECT (SELECT count(*) FROM resources WHERE type='Observation'), (SELECT count(*) FROM outbox)"
    ).fetchone()
    assert counts == (len(acknowledged), len(acknowledged) + 1)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


async def test_corrupt_database_gives_one_clear_line(tmp_path: Path, kek_path: Path) -> None:
    db_path = tmp_path / "appliance.db"
    db_path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="corrupt") as info:
        await Store.open(db_path, kek_path)
    assert "\n" not in str(info.value)
    assert "backup" in str(info.value)


async def test_newest_can_filter_by_code(store: Store) -> None:
    [pat] = await store.create([factories.patient()], NURSE)
    ref = f"Patient/{pat.logical_id}"
    bp = factories.bp_observation(ref, effective="2026-11-26T08:00:00+00:00")
    hr = {
        **factories.bp_observation(ref, effective="2026-11-26T09:00:00+00:00"),
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
    }
    await store.create([bp, hr], DEVICES)
    [only] = await store.newest(ref, "Observation", NURSE, limit=1, code="http://loinc.org|85354-9")
    assert only["code"]["coding"][0]["code"] == "85354-9"
    [latest] = await store.newest(ref, "Observation", NURSE, limit=1)
    assert latest["code"]["coding"][0]["code"] == "8867-4"
