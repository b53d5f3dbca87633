"""``store check`` and ``store repair``: damaged records found, and restored from a real backup.

The backup is made as the provisioning role's program makes it (SQLite's online backup API of
the live store); the damage as a disk does it (a ciphertext moved onto another row, a flipped
bit). Everything else is the real store on a real SQLite file.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance import db
from appliance.cli import main
from appliance.errors import ApplianceError, TamperedDataError
from appliance.keys import read_kek_file
from appliance.store import Store, UpstreamCopy
from appliance.store_repair import RESTORED_DETAIL, Damaged, check, repair
from tests import factories
from tests.tamper import flip_byte, move_ciphertext

NURSE = "user:nurse1"
ACTOR = "service:cli:tester"
NOW = datetime(2026, 11, 29, 9, tzinfo=UTC)


def _backup(db_path: Path, target: Path) -> None:
    source, copy = sqlite3.connect(db_path), sqlite3.connect(target)
    with copy:
        source.backup(copy)
    copy.close()
    source.close()


async def _clinic(store: Store) -> dict[str, str]:
    """Four patients and a reading: their logical ids by family name."""
    made = await store.create(
        [
            factories.patient(family=f, mrn=f"T{i}")
            for i, f in enumerate(("Ada", "Bea", "Cy", "Di"))
        ],
        NURSE,
    )
    [reading] = await store.create(
        [factories.bp_observation(f"Patient/{made[0].logical_id}")], "service:devices"
    )
    ids = {f: m.logical_id for f, m in zip(("Ada", "Bea", "Cy", "Di"), made, strict=True)}
    ids["reading"] = reading.logical_id
    return ids


def _from_the_ehr(version: int) -> UpstreamCopy:
    """Version ``version`` of a Patient the EHR holds, as the pull brings it."""
    stamp = f"2026-11-2{version}T08:00:00Z"
    resource = {
        **factories.patient(family="Eve", mrn="T7"),
        "id": "up-eve",
        "meta": {"versionId": str(version), "lastUpdated": stamp},
    }
    return UpstreamCopy("Patient/up-eve", str(version), stamp, resource)


async def test_check_names_each_damaged_record_and_repair_restores_the_same_versions(
    store: Store, db_path: Path, kek_path: Path, tmp_path: Path
) -> None:
    ids = await _clinic(store)
    backup = tmp_path / "appliance-20261129T020000Z.db"
    _backup(db_path, backup)
    # After the backup: Bea is edited here (a newer version), Ed is registered.
    bea = await store.read("Patient", ids["Bea"], NURSE)
    await store.update("Patient", ids["Bea"], {**bea, "gender": "female"}, NURSE)
    [ed] = await store.create([factories.patient(family="Ed", mrn="T9")], NURSE)
    # Then the disk: Ada's copy moved over, a bit of Di's flipped, Bea's and Ed's moved.
    move_ciphertext(db_path, ids["Ada"], ids["Cy"])
    flip_byte(db_path, ids["Di"])
    move_ciphertext(db_path, ids["Bea"], ids["Cy"])
    move_ciphertext(db_path, ed.logical_id, ids["Cy"])
    conn = db.connect_sync(db_path)
    try:
        kek = read_kek_file(kek_path)
        damaged = check(conn, kek, actor=ACTOR, now=NOW)
        assert [d.reference for d in damaged] == [
            f"Patient/{ids[f]}" for f in ("Ada", "Bea", "Di")
        ] + [f"Patient/{ed.logical_id}"]
        conn.execute("UPDATE outbox SET state = 'dead' WHERE resource_id = ?", (damaged[0].row_id,))

        done = repair(conn, kek, backup, actor=ACTOR, now=NOW)
        assert [d.reference for d in done.restored] == [f"Patient/{ids[f]}" for f in ("Ada", "Di")]
        left = {d.reference: why for d, why in done.left}
        assert "changed since this backup" in left[f"Patient/{ids['Bea']}"]
        assert "not in this backup" in left[f"Patient/{ed.logical_id}"]
        assert done.dead_letters == (1,)  # Ada's create, refused as unreadable: send it again
        # The damaged bytes are kept as found; each restore is audited in the patient's name.
        kept = conn.execute("SELECT resource_id, replaced_by FROM unreadable_copies").fetchall()
        assert kept == [(d.row_id, f"backup:{backup.name}") for d in done.restored]
        audited = conn.execute(
            "SELECT actor, entity, patient_key FROM audit WHERE detail = ?", (RESTORED_DETAIL,)
        ).fetchall()
        assert [(a, e) for a, e, _ in audited] == [(ACTOR, d.reference) for d in done.restored]
        assert bytes(audited[0][2]) == store.patient_key(f"Patient/{ids['Ada']}")
        checks = conn.execute(
            "SELECT actor, detail FROM audit WHERE detail LIKE 'integrity check:%' ORDER BY id"
        ).fetchall()
        assert checks == [(ACTOR, "integrity check: 4 fail authentication")] * 2
        # Only what could not be restored is left.
        assert [d.reference for d in check(conn, kek, actor=ACTOR, now=NOW)] == [
            f"Patient/{ids['Bea']}",
            f"Patient/{ed.logical_id}",
        ]
    finally:
        conn.close()
    assert (await store.read("Patient", ids["Ada"], NURSE))["name"][0]["family"] == "Ada"
    assert (await store.read("Patient", ids["Di"], NURSE))["name"][0]["family"] == "Di"
    with pytest.raises(TamperedDataError):  # not rolled back to the version before the edit
        await store.read("Patient", ids["Bea"], NURSE)


async def test_repair_refuses_a_file_that_is_not_a_backup_of_the_store(
    store: Store, db_path: Path, kek_path: Path, tmp_path: Path
) -> None:
    await _clinic(store)
    conn = db.connect_sync(db_path)
    try:
        with pytest.raises(ApplianceError, match="no such file"):
            repair(conn, read_kek_file(kek_path), tmp_path / "missing.db", actor=ACTOR, now=NOW)
        cms = tmp_path / "appliance-20261129T020000Z.db.cms"
        cms.write_bytes(b"0\x82\x01\x00 not decrypted yet")
        with pytest.raises(ApplianceError, match="not a database of this appliance"):
            repair(conn, read_kek_file(kek_path), cms, actor=ACTOR, now=NOW)
    finally:
        conn.close()


def test_the_commands_over_a_demo_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("APPLIANCE_DEMO_UPSTREAM", raising=False)
    site = tmp_path / "site"
    assert main(["init", "--demo", str(site)]) == 0
    db_path = site / "appliance.db"

    async def fill() -> dict[str, str]:
        opened = await Store.open(db_path, site / "keys" / "kek")
        try:
            return await _clinic(opened)
        finally:
            await opened.close()

    import asyncio

    ids = asyncio.run(fill())
    capsys.readouterr()
    assert main(["store", "check", "--demo", str(site)]) == 0
    assert "all 5 stored records authenticate" in capsys.readouterr().out
    backup = tmp_path / "backup.db"
    _backup(db_path, backup)
    flip_byte(db_path, ids["Cy"])
    assert main(["store", "check", "--demo", str(site)]) == 1
    out = capsys.readouterr().out
    assert f"Patient/{ids['Cy']}" in out
    assert "appliance store repair --from" in out
    assert main(["store", "repair", "--from", str(backup), "--demo", str(site)]) == 0
    assert f"restored  Patient/{ids['Cy']}" in capsys.readouterr().out
    assert main(["store", "check", "--demo", str(site)]) == 0
    assert main(["store", "repair", "--from", str(tmp_path / "nope.db"), "--demo", str(site)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert Damaged(1, "Patient", "x").reference == "Patient/x"


async def test_a_record_healed_while_repair_runs_is_not_overwritten(
    store: Store, db_path: Path, kek_path: Path, tmp_path: Path
) -> None:
    ids = await _clinic(store)
    backup = tmp_path / "backup.db"
    _backup(db_path, backup)
    raw = sqlite3.connect(db_path)
    [good] = raw.execute(
        "SELECT body FROM resources WHERE logical_id = ?", (ids["Ada"],)
    ).fetchone()
    flip_byte(db_path, ids["Ada"])

    def heal(done: int, total: int) -> None:
        # Another process puts it right between the scan and the restore (a pulled copy).
        if done < total:
            return  # still scanning (the first call says the total)
        with raw:
            raw.execute("UPDATE resources SET body = ? WHERE logical_id = ?", (good, ids["Ada"]))

    conn = db.connect_sync(db_path)
    try:
        done = repair(conn, read_kek_file(kek_path), backup, actor=ACTOR, now=NOW, progress=heal)
        assert done.restored == ()
        [(item, why)] = done.left
        assert item.logical_id == ids["Ada"]
        assert why == "changed while this ran (it authenticates now)"
        assert conn.execute("SELECT count(*) FROM unreadable_copies").fetchone() == (0,)
    finally:
        conn.close()
        raw.close()


async def test_a_restore_is_sealed_under_the_active_key_and_a_later_version_is_never_undone(
    store: Store, db_path: Path, kek_path: Path, tmp_path: Path
) -> None:
    ids = await _clinic(store)
    [pulled] = await store.import_upstream([_from_the_ehr(1)], "service:sync")
    assert pulled.logical_id is not None
    backup = tmp_path / "backup.db"
    _backup(db_path, backup)
    kek = read_kek_file(kek_path)
    conn = db.connect_sync(db_path)
    try:
        # Damaged twice, restored twice from the same backup: a restore is no new version.
        for _ in range(2):
            flip_byte(db_path, ids["Ada"])
            [restored] = repair(conn, kek, backup, actor=ACTOR, now=NOW).restored
            assert restored.logical_id == ids["Ada"]
        [(version,)] = conn.execute(
            "SELECT key_version FROM resources WHERE logical_id = ?", (ids["Ada"],)
        ).fetchall()
        assert version == store.keyring.active_version
        # The pull's next copy replaced a damaged pulled patient since the backup (the EHR's
        # version 2), then it was damaged again: the backup's copy (version 1) is older than
        # the EHR's. Left alone.
        flip_byte(db_path, pulled.logical_id)
        await store.import_upstream([_from_the_ehr(2)], "service:sync")
        flip_byte(db_path, pulled.logical_id)
        done = repair(conn, kek, backup, actor=ACTOR, now=NOW)
        assert done.restored == ()
        [(item, why)] = done.left
        assert (item.logical_id, why.split(":")[0]) == (
            pulled.logical_id,
            "changed since this backup",
        )
    finally:
        conn.close()
    assert (await store.read("Patient", ids["Ada"], NURSE))["name"][0]["family"] == "Ada"


async def test_a_data_key_rotation_meanwhile_is_no_damage_and_retires_old_backups(
    store: Store,
    db_path: Path,
    kek_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from appliance import key_rotation, store_repair

    ids = await _clinic(store)
    backup = tmp_path / "backup.db"
    _backup(db_path, backup)
    kek = read_kek_file(kek_path)
    monkeypatch.setattr(store_repair, "BATCH", 2)
    other = db.connect_sync(db_path)  # `appliance keys rotate data` in another terminal
    rotated: list[int] = []

    def rotate(_done: int, _total: int) -> None:
        if not rotated:
            rotated.append(key_rotation.rotate_data_key(other, kek))
            key_rotation.reencrypt(other, kek)

    conn = db.connect_sync(db_path)
    try:
        # The rows after the first two now name a key this run had not loaded: read again,
        # not reported as damaged.
        assert check(conn, kek, actor=ACTOR, now=NOW, progress=rotate) == []
        assert rotated
        # The old key is destroyed: the backup made before the rotation cannot restore.
        flip_byte(db_path, ids["Bea"])
        done = repair(conn, kek, backup, actor=ACTOR, now=NOW)
        [(item, why)] = done.left
        assert item.logical_id == ids["Bea"]
        assert "does not authenticate either" in why
    finally:
        conn.close()
        other.close()
