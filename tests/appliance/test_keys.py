"""Keys: KEK file checks, wrong key fails closed, blind indexes, KEK and data-key rotation."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance import db, key_rotation
from appliance.errors import KeyFileError, WrongKeyError
from appliance.keys import generate_kek_file, normalise_name, read_kek_file
from appliance.store import Store
from tests import factories
from tests.tamper import move_ciphertext

NURSE = "user:nurse1"


def test_missing_key_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="appliance init") as info:
        read_kek_file(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)


def test_group_readable_key_file_is_refused(kek_path: Path) -> None:
    kek_path.chmod(0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        read_kek_file(kek_path)


def test_key_file_of_wrong_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    path.write_bytes(b"short")
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="exactly 32 bytes"):
        read_kek_file(path)


def test_existing_key_is_never_overwritten(kek_path: Path) -> None:
    before = kek_path.read_bytes()
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_kek_file(kek_path)
    assert kek_path.read_bytes() == before
    assert (kek_path.stat().st_mode & 0o777) == 0o600


async def test_wrong_key_fails_closed_with_a_clear_error(
    tmp_path: Path, db_path: Path, kek_path: Path
) -> None:
    store = await Store.open(db_path, kek_path)
    await store.create([factories.patient()], NURSE)
    await store.close()
    other = tmp_path / "other-kek"
    generate_kek_file(other)
    with pytest.raises(WrongKeyError, match="not the one that protects this database") as info:
        await Store.open(db_path, other)
    assert "\n" not in str(info.value)


async def test_wrong_key_with_forged_fingerprint_still_fails_closed(
    tmp_path: Path, db_path: Path, kek_path: Path
) -> None:
    store = await Store.open(db_path, kek_path)
    await store.close()
    other = tmp_path / "other-kek"
    generate_kek_file(other)
    from appliance.keys import kek_fingerprint

    conn = sqlite3.connect(db_path)
    conn.execute(
        "UPDATE meta SET value = ? WHERE key = 'kek_fingerprint'",
        (kek_fingerprint(other.read_bytes()),),
    )
    conn.commit()
    conn.close()
    with pytest.raises(WrongKeyError, match="does not unwrap"):
        await Store.open(db_path, other)


@given(st.text(alphabet=st.characters(categories=("L", "Zs", "Pd")), min_size=1, max_size=30))
def test_name_normalisation_ignores_case_spacing_and_punctuation(name: str) -> None:
    assert normalise_name(name) == normalise_name(name.casefold().replace(" ", "-"))


def test_name_normalisation_examples() -> None:
    assert normalise_name("NÚÑEZ-ORTEGA") == normalise_name("nunez ortega") == "nunezortega"
    assert normalise_name("O'Brien") == normalise_name("obrien")


async def test_kek_rotation_rewraps_and_old_key_no_longer_opens(
    db_path: Path, kek_path: Path
) -> None:
    store = await Store.open(db_path, kek_path)
    [pat] = await store.create([factories.patient()], NURSE)
    await store.close()
    old = kek_path.read_bytes()
    conn = db.connect_sync(db_path)
    key_rotation.rotate_kek(conn, kek_path)
    conn.close()
    assert kek_path.read_bytes() != old
    assert (kek_path.stat().st_mode & 0o777) == 0o600
    reopened = await Store.open(db_path, kek_path)
    assert (await reopened.read("Patient", pat.logical_id, NURSE))["id"] == pat.logical_id
    await reopened.close()
    stale = kek_path.with_name("stale")
    stale.write_bytes(old)
    stale.chmod(0o600)
    with pytest.raises(WrongKeyError):
        await Store.open(db_path, stale)


async def test_kek_rotation_interrupted_before_rename_is_finished_on_next_open(
    db_path: Path, kek_path: Path
) -> None:
    store = await Store.open(db_path, kek_path)
    [pat] = await store.create([factories.patient()], NURSE)
    await store.close()
    conn = db.connect_sync(db_path)
    real_replace = os.replace

    def crash(*_args: object) -> None:
        raise SystemExit("power lost")

    os.replace = crash  # type: ignore[assignment]
    try:
        with pytest.raises(SystemExit):
            key_rotation.rotate_kek(conn, kek_path)
    finally:
        os.replace = real_replace
        conn.close()
    assert kek_path.with_name("kek.next").exists()
    reopened = await Store.open(db_path, kek_path)  # finishes the rename
    assert not kek_path.with_name("kek.next").exists()
    assert (await reopened.read("Patient", pat.logical_id, NURSE))["id"] == pat.logical_id
    await reopened.close()


async def test_data_key_rotation_reencrypts_resumably_and_reads_work_throughout(
    db_path: Path, kek_path: Path
) -> None:
    store = await Store.open(db_path, kek_path)
    [pat] = await store.create([factories.patient()], NURSE)
    ref = f"Patient/{pat.logical_id}"
    created = await store.create(
        [factories.bp_observation(ref, systolic=100 + i) for i in range(25)], "service:devices"
    )
    kek = kek_path.read_bytes()
    conn = db.connect_sync(db_path)
    new_version = key_rotation.rotate_data_key(conn, kek)
    # A crash part-way: two small batches done, the rest still under the old key.
    partial = key_rotation.reencrypt(conn, kek, batch=5, max_batches=2)
    assert partial.rows == 10
    assert partial.retired_versions == ()
    versions = {v for (v,) in conn.execute("SELECT DISTINCT key_version FROM resources")}
    assert len(versions) == 2
    # The running store (loaded before the rotation) reads both old and new rows ...
    for item in created:
        assert (await store.read("Observation", item.logical_id, NURSE))["id"] == item.logical_id
    # ... and its next write uses the new key.
    [late] = await store.create([factories.bp_observation(ref)], "service:devices")
    late_version = conn.execute(
        "SELECT key_version FROM resources WHERE logical_id = ?", (late.logical_id,)
    ).fetchone()[0]
    assert late_version == new_version
    finished = key_rotation.reencrypt(conn, kek, batch=5)
    assert finished.rows == 16
    assert len(finished.retired_versions) == 1
    assert {v for (v,) in conn.execute("SELECT DISTINCT key_version FROM resources")} == {
        new_version
    }
    wrapped = conn.execute("SELECT wrapped FROM data_keys WHERE state = 'retired'").fetchone()[0]
    assert wrapped == b""
    conn.close()
    await store.close()
    reopened = await Store.open(db_path, kek_path)
    assert len(await reopened.newest(ref, "Observation", NURSE)) == 26
    await reopened.close()


async def test_data_key_rotation_steps_over_a_record_that_fails_authentication(
    db_path: Path, kek_path: Path
) -> None:
    store = await Store.open(db_path, kek_path)
    [a, b, c] = await store.create(
        [factories.patient(mrn=f"K{i}", family=f"Keyperson{i}") for i in range(3)], NURSE
    )
    await store.close()
    move_ciphertext(db_path, b.logical_id, a.logical_id)
    conn = db.connect_sync(db_path)
    kek = kek_path.read_bytes()
    old_version = conn.execute("SELECT key_version FROM resources LIMIT 1").fetchone()[0]
    new_version = key_rotation.rotate_data_key(conn, kek)
    # Before: TamperedDataError on every run, and nothing after b was ever re-encrypted.
    result = key_rotation.reencrypt(conn, kek, batch=1)
    assert (result.rows, result.unreadable, result.retired_versions) == (2, (b.row_id,), ())
    versions = dict(conn.execute("SELECT logical_id, key_version FROM resources").fetchall())
    assert versions == {
        a.logical_id: new_version,
        b.logical_id: old_version,  # left as it was, and its key kept
        c.logical_id: new_version,
    }
    assert conn.execute(
        "SELECT state FROM data_keys WHERE version = ?", (old_version,)
    ).fetchone() == ("decrypt_only",)
    conn.close()
    reopened = await Store.open(db_path, kek_path)
    assert (await reopened.read("Patient", c.logical_id, NURSE))["id"] == c.logical_id
    await reopened.close()


async def test_data_key_rotation_reseals_upstream_error_messages(
    db_path: Path, kek_path: Path
) -> None:
    store = await Store.open(db_path, kek_path)
    [pat] = await store.create([factories.patient()], NURSE)
    await store.close()
    kek = kek_path.read_bytes()
    conn = db.connect_sync(db_path)
    from appliance.keys import load_keyring

    keyring = load_keyring(conn, kek)
    outbox_id = conn.execute("SELECT id FROM outbox").fetchone()[0]
    conn.execute(
        "UPDATE outbox SET last_error = ? WHERE id = ?",
        (keyring.seal("outbox", str(outbox_id), "Patient Testperson already exists"), outbox_id),
    )
    key_rotation.rotate_data_key(conn, kek)
    result = key_rotation.reencrypt(conn, kek)
    assert len(result.retired_versions) == 1
    sealed = conn.execute("SELECT last_error FROM outbox WHERE id = ?", (outbox_id,)).fetchone()[0]
    fresh = load_keyring(conn, kek)
    assert fresh.unseal("outbox", str(outbox_id), sealed) == "Patient Testperson already exists"
    assert pat.logical_id
    conn.close()


async def test_a_running_store_follows_a_kek_rotation_then_a_data_key_rotation(
    db_path: Path, kek_path: Path
) -> None:
    store = await Store.open(db_path, kek_path)
    [pat] = await store.create([factories.patient()], NURSE)
    conn = db.connect_sync(db_path)
    try:
        # Both from the command line while the services run; neither asks for a restart.
        key_rotation.rotate_kek(conn, kek_path)
        new_kek = read_kek_file(kek_path)
        key_rotation.rotate_data_key(conn, new_kek)
        key_rotation.reencrypt(conn, new_kek)
    finally:
        conn.close()
    # Before: the store reloaded its keys with the KEK it had read at start, and every
    # write, read of a re-encrypted record and sealed field failed with WrongKeyError.
    assert (await store.read("Patient", pat.logical_id, NURSE))["id"] == pat.logical_id
    [pat2] = await store.create([factories.patient()], NURSE)
    keyring = await db.run_sync(store.connection, store.current_keyring)
    assert keyring.unseal("t", "1", keyring.seal("t", "1", "x")) == "x"
    history = await store.history("Patient", pat2.logical_id, NURSE)
    assert history == []
    await store.close()
