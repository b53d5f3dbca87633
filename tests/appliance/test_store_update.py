"""Replacing resources in place on a real SQLite file: a person's edit, an upstream copy."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from appliance import db, key_rotation
from appliance.errors import InvalidResourceError, NotFoundError
from appliance.store import (
    ChangedSinceReadError,
    ImportOutcome,
    ReviewPendingError,
    Store,
    UpstreamCopy,
    upstream_refs_of_pulled,
)
from tests import factories

NURSE = "user:nurse1"
SYNC = "service:sync"


def _raw(db_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(db_path)


def _upstream_patient(
    upstream_id: str, version: str, family: str = "Upstreamperson"
) -> UpstreamCopy:
    body = {
        **factories.patient(family=family, mrn="U0001"),
        "id": upstream_id,
        "meta": {"versionId": version, "lastUpdated": "2026-11-26T08:00:00.000Z"},
    }
    return UpstreamCopy(f"Patient/{upstream_id}", version, "2026-11-26T08:00:00.000Z", body)


def _upstream_observation(upstream_id: str, subject: str, version: str = "v1") -> UpstreamCopy:
    body = {
        **factories.bp_observation(subject),
        "id": upstream_id,
        "meta": {"versionId": version, "lastUpdated": "2026-11-26T09:00:00.000Z"},
    }
    return UpstreamCopy(f"Observation/{upstream_id}", version, "2026-11-26T09:00:00.000Z", body)


def _edited(resource: dict[str, Any], family: str) -> dict[str, Any]:
    return {**resource, "name": [{"family": family, "given": ["Ada"]}]}


async def test_pulled_copies_of_odd_shapes_are_skipped_as_invalid_and_the_rest_stored(
    store: Store,
) -> None:
    nested: dict[str, Any] = {"url": "urn:example:x", "valueString": "synthetic"}
    for _ in range(130):
        nested = {"url": "urn:example:x", "extension": [nested]}
    deep = _upstream_patient("up-deep", "v1")
    deep.resource["extension"] = [nested]
    no_list = _upstream_patient("up-null", "v1")
    no_list.resource["identifier"] = None
    unknown = UpstreamCopy("Foo/up-foo", "v1", None, {"resourceType": "Foo", "id": "up-foo"})
    fine = _upstream_patient("up-fine", "v1")
    # Before: RecursionError from validation, TypeError from the identifier match and the
    # blind index (null is a valid absent list), and ValueError for the unknown type: each
    # failed the whole page, on every pass.
    outcomes = await store.import_upstream([deep, no_list, unknown, fine], SYNC)
    assert [o.outcome for o in outcomes] == [
        ImportOutcome.INVALID,
        ImportOutcome.CREATED,
        ImportOutcome.INVALID,
        ImportOutcome.CREATED,
    ]


async def test_a_pulled_resource_is_stored_with_its_upstream_identity_and_no_outbox_row(
    store: Store, db_path: Path
) -> None:
    [imported] = await store.import_upstream([_upstream_patient("up-1", "v1")], SYNC)
    assert imported.outcome is ImportOutcome.CREATED
    assert imported.logical_id is not None
    read = await store.read("Patient", imported.logical_id, NURSE)
    assert read["id"] == imported.logical_id
    assert read["name"][0]["family"] == "Upstreamperson"
    link = await store.upstream_link("Patient", imported.logical_id)
    assert link is not None
    assert (link.upstream_ref, link.version_id, link.origin) == ("Patient/up-1", "v1", "pulled")
    conn = _raw(db_path)
    assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0
    audit = conn.execute("SELECT actor, action, entity FROM audit").fetchall()
    assert (SYNC, "create", f"Patient/{imported.logical_id}") in audit
    conn.close()
    # Found by the kiosk's blind index like any other Patient.
    assert await store.find_patients("Upstreamperson", "1961-04-09", NURSE)


async def test_repulling_replaces_the_local_copy_under_the_same_id_and_keeps_the_old_one(
    store: Store, db_path: Path
) -> None:
    [first] = await store.import_upstream([_upstream_patient("up-1", "v1")], SYNC)
    [same] = await store.import_upstream([_upstream_patient("up-1", "v1")], SYNC)
    assert same.outcome is ImportOutcome.CURRENT
    [newer] = await store.import_upstream(
        [_upstream_patient("up-1", "v2", family="Renamedperson")], SYNC
    )
    assert newer.outcome is ImportOutcome.UPDATED
    assert newer.logical_id == first.logical_id
    assert first.logical_id is not None
    conn = _raw(db_path)
    assert conn.execute("SELECT count(*) FROM resources").fetchone()[0] == 1
    conn.close()
    read = await store.read("Patient", first.logical_id, NURSE)
    assert read["name"][0]["family"] == "Renamedperson"
    history = await store.history("Patient", first.logical_id, NURSE)
    assert [h["name"][0]["family"] for h in history] == ["Upstreamperson"]
    assert await store.find_patients("Upstreamperson", "1961-04-09", NURSE) == []
    assert await store.find_patients("Renamedperson", "1961-04-09", NURSE)


async def test_pulled_references_point_at_the_local_copies(store: Store) -> None:
    [patient, observation] = await store.import_upstream(
        [_upstream_patient("up-1", "v1"), _upstream_observation("obs-1", "Patient/up-1")], SYNC
    )
    assert observation.logical_id is not None
    read = await store.read("Observation", observation.logical_id, NURSE)
    assert read["subject"]["reference"] == f"Patient/{patient.logical_id}"
    # The patient's chart finds it through the patient key like a local reading.
    newest = await store.newest(f"Patient/{patient.logical_id}", "Observation", NURSE)
    assert [o["id"] for o in newest] == [observation.logical_id]
    refs = await db.run_sync(
        store.connection, upstream_refs_of_pulled, [patient.logical_id or "", "nope"]
    )
    assert refs == {patient.logical_id: "Patient/up-1"}


async def test_a_copy_of_a_resource_made_here_is_matched_by_id_never_duplicated(
    store: Store, db_path: Path
) -> None:
    [pat] = await store.create([factories.patient()], NURSE)
    [obs] = await store.create([factories.bp_observation(f"Patient/{pat.logical_id}")], NURSE)
    conn = _raw(db_path)
    conn.execute(
        "UPDATE outbox SET state = 'delivered', upstream_ref = 'Patient/up-9' WHERE id = 1"
    )
    conn.execute(
        "UPDATE outbox SET state = 'delivered', upstream_ref = 'Observation/o-9' WHERE id = 2"
    )
    conn.commit()
    conn.close()
    upstream_patient = {**pat.resource, "id": "up-9", "gender": "other"}
    upstream_obs = {**obs.resource, "id": "o-9", "subject": {"reference": "Patient/up-9"}}
    outcomes = await store.import_upstream(
        [
            UpstreamCopy("Patient/up-9", "v1", None, upstream_patient),
            UpstreamCopy("Observation/o-9", "v1", None, upstream_obs),
        ],
        SYNC,
    )
    assert [o.outcome for o in outcomes] == [ImportOutcome.UPDATED, ImportOutcome.OWN]
    assert outcomes[0].logical_id == pat.logical_id  # merged by upstream id, not by name
    link = await store.upstream_link("Patient", pat.logical_id)
    assert link is not None
    assert (link.origin, link.version_id) == ("delivered", "v1")
    assert (await store.read("Patient", pat.logical_id, NURSE))["gender"] == "other"


async def test_a_copy_carrying_our_identifier_is_that_resource_even_before_the_outbox_knows(
    store: Store, db_path: Path
) -> None:
    [obs] = await store.create([factories.bp_observation("Patient/somebody")], NURSE)
    copy = {**obs.resource, "id": "o-lost-answer"}
    [outcome] = await store.import_upstream(
        [UpstreamCopy("Observation/o-lost-answer", "v1", None, copy)], SYNC
    )
    assert outcome.outcome is ImportOutcome.OWN
    conn = _raw(db_path)
    assert conn.execute("SELECT count(*) FROM resources").fetchone()[0] == 1
    conn.close()


async def test_an_edit_keeps_the_old_version_and_queues_a_version_checked_update(
    store: Store, db_path: Path
) -> None:
    [imported] = await store.import_upstream([_upstream_patient("up-1", "v7")], SYNC)
    assert imported.logical_id is not None
    current = await store.read("Patient", imported.logical_id, NURSE)
    await store.update("Patient", imported.logical_id, _edited(current, "Editedperson"), NURSE)
    read = await store.read("Patient", imported.logical_id, NURSE)
    assert read["name"][0]["family"] == "Editedperson"
    assert read["id"] == imported.logical_id
    history = await store.history("Patient", imported.logical_id, NURSE)
    assert [h["name"][0]["family"] for h in history] == ["Upstreamperson"]
    conn = _raw(db_path)
    outbox = conn.execute("SELECT kind, state, if_match FROM outbox").fetchall()
    assert outbox == [("update", "pending", "v7")]
    audit = conn.execute("SELECT actor, action, entity, detail FROM audit").fetchall()
    assert (NURSE, "update", f"Patient/{imported.logical_id}", "local edit") in audit
    conn.close()
    assert await store.find_patients("Editedperson", "1961-04-09", NURSE)
    assert await store.find_patients("Upstreamperson", "1961-04-09", NURSE) == []


async def test_an_edit_made_on_a_copy_the_pull_replaced_meanwhile_is_refused_not_written(
    store: Store, db_path: Path
) -> None:
    [imported] = await store.import_upstream([_upstream_patient("up-1", "v7")], SYNC)
    assert imported.logical_id is not None
    seen = await store.read("Patient", imported.logical_id, NURSE)
    # The sync process (another OS process) stores the EHR's v8 between the read and the write.
    await store.import_upstream([_upstream_patient("up-1", "v8", family="Theirsperson")], SYNC)
    with pytest.raises(ChangedSinceReadError, match="changed since it was read"):
        await store.update(
            "Patient", imported.logical_id, _edited(seen, "Mineperson"), NURSE, based_on=seen
        )
    # Before: written over v8 with If-Match v8, undoing the EHR's change here and upstream.
    now = await store.read("Patient", imported.logical_id, NURSE)
    assert now["name"][0]["family"] == "Theirsperson"
    conn = _raw(db_path)
    assert conn.execute("SELECT count(*) FROM outbox WHERE kind = 'update'").fetchone() == (0,)
    conn.close()
    # Made again on the copy stored now, it goes.
    await store.update(
        "Patient", imported.logical_id, _edited(now, "Mineperson"), NURSE, based_on=now
    )
    assert (await store.read("Patient", imported.logical_id, NURSE))["name"][0][
        "family"
    ] == "Mineperson"


async def test_a_second_edit_rides_on_the_pending_update(store: Store, db_path: Path) -> None:
    [imported] = await store.import_upstream([_upstream_patient("up-1", "v1")], SYNC)
    assert imported.logical_id is not None
    current = await store.read("Patient", imported.logical_id, NURSE)
    await store.update("Patient", imported.logical_id, _edited(current, "Firstedit"), NURSE)
    await store.update("Patient", imported.logical_id, _edited(current, "Secondedit"), NURSE)
    conn = _raw(db_path)
    assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 1
    conn.close()
    history = await store.history("Patient", imported.logical_id, NURSE)
    assert [h["name"][0]["family"] for h in history] == ["Upstreamperson", "Firstedit"]


async def test_an_edit_of_a_patient_made_here_keeps_our_identifier_and_waits_for_its_version(
    store: Store, db_path: Path
) -> None:
    [pat] = await store.create([factories.patient()], NURSE)
    edited = _edited({k: v for k, v in pat.resource.items() if k != "identifier"}, "Newname")
    stored = await store.update("Patient", pat.logical_id, edited, NURSE)
    assert stored.resource["identifier"][0] == {
        "system": "urn:ietf:rfc:3986",
        "value": f"urn:uuid:{pat.logical_id}",
    }
    conn = _raw(db_path)
    rows = conn.execute("SELECT kind, state, if_match FROM outbox ORDER BY id").fetchall()
    assert rows == [("create", "pending", None), ("update", "pending", None)]
    conn.close()


async def test_only_demographics_are_edited_in_place(store: Store) -> None:
    [pat] = await store.create([factories.patient()], NURSE)
    [obs] = await store.create([factories.bp_observation(f"Patient/{pat.logical_id}")], NURSE)
    with pytest.raises(InvalidResourceError, match="append-only"):
        await store.update("Observation", obs.logical_id, obs.resource, NURSE)
    with pytest.raises(InvalidResourceError, match="birthDate"):
        await store.update(
            "Patient", pat.logical_id, {**pat.resource, "birthDate": "not a date"}, NURSE
        )
    with pytest.raises(NotFoundError):
        await store.update("Patient", "no-such-id", factories.patient(), NURSE)


async def test_a_pull_never_overwrites_a_local_edit_on_its_way_up(store: Store) -> None:
    [imported] = await store.import_upstream([_upstream_patient("up-1", "v1")], SYNC)
    assert imported.logical_id is not None
    current = await store.read("Patient", imported.logical_id, NURSE)
    await store.update("Patient", imported.logical_id, _edited(current, "Localedit"), NURSE)
    [held] = await store.import_upstream(
        [_upstream_patient("up-1", "v2", family="Theiredit")], SYNC
    )
    assert held.outcome is ImportOutcome.HELD
    read = await store.read("Patient", imported.logical_id, NURSE)
    assert read["name"][0]["family"] == "Localedit"
    link = await store.upstream_link("Patient", imported.logical_id)
    assert link is not None
    assert link.version_id == "v1"  # still the base: the update will meet the 412


async def test_an_edit_is_refused_while_a_conflict_waits_for_review(
    store: Store, db_path: Path
) -> None:
    [imported] = await store.import_upstream([_upstream_patient("up-1", "v1")], SYNC)
    conn = _raw(db_path)
    conn.execute(
        "INSERT INTO review_queue (resource_id, upstream_ref, created_at, mine, theirs) "
        "VALUES (?, 'Patient/up-1', '2026-11-26T08:00:00Z', x'', x'')",
        (imported.row_id,),
    )
    conn.commit()
    conn.close()
    assert imported.logical_id is not None
    with pytest.raises(ReviewPendingError):
        await store.update("Patient", imported.logical_id, factories.patient(), NURSE)


async def test_invalid_upstream_copies_are_skipped_not_half_stored(store: Store) -> None:
    bad = _upstream_patient("up-2", "v1")
    bad.resource["birthDate"] = "not a date"
    outcomes = await store.import_upstream([_upstream_patient("up-1", "v1"), bad], SYNC)
    assert [o.outcome for o in outcomes] == [ImportOutcome.CREATED, ImportOutcome.INVALID]


async def test_data_key_rotation_reseals_the_history(db_path: Path, kek_path: Path) -> None:
    store = await Store.open(db_path, kek_path)
    [imported] = await store.import_upstream([_upstream_patient("up-1", "v1")], SYNC)
    await store.import_upstream([_upstream_patient("up-1", "v2", family="Laterperson")], SYNC)
    await store.close()
    kek = kek_path.read_bytes()
    conn = db.connect_sync(db_path)
    key_rotation.rotate_data_key(conn, kek)
    result = key_rotation.reencrypt(conn, kek)
    assert len(result.retired_versions) == 1
    conn.close()
    store = await Store.open(db_path, kek_path)
    try:
        assert imported.logical_id is not None
        history = await store.history("Patient", imported.logical_id, NURSE)
        assert history[0]["name"][0]["family"] == "Upstreamperson"  # under the new key only
    finally:
        await store.close()


async def test_no_plaintext_phi_in_the_history_or_the_database(store: Store, db_path: Path) -> None:
    marker = factories.MARKER_FAMILY
    [imported] = await store.import_upstream([_upstream_patient("up-1", "v1", family=marker)], SYNC)
    assert imported.logical_id is not None
    current = await store.read("Patient", imported.logical_id, NURSE)
    await store.update("Patient", imported.logical_id, _edited(current, "Other"), NURSE)
    await db.run_sync(store.connection, lambda c: c.execute("PRAGMA wal_checkpoint(FULL)"))
    data = b"".join(p.read_bytes() for p in db_path.parent.glob("appliance.db*"))
    assert marker.encode() not in data
