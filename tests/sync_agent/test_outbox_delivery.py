"""Outbox delivery against the real Medplum FHIR peer on loopback: idempotent, fault-tolerant."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance import db, key_rotation, keys
from appliance.store import Lane, Store
from sync_agent import dead_letters, outbox_queue, sync_now_request
from sync_agent.outbox_delivery import Deliverer
from sync_agent.outbox_failing import failing_items
from tests import factories
from tests.fhir_peer.peer import FhirPeer

pytestmark = pytest.mark.peer

NURSE = "user:nurse1"
NOW = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)


def _states(db_path: Path) -> list[tuple[str, int]]:
    conn = sqlite3.connect(db_path)
    rows = conn.execute(
        "SELECT state, count(*) FROM outbox GROUP BY state ORDER BY state"
    ).fetchall()
    conn.close()
    return rows


async def _patient_with_readings(store: Store, n: int) -> str:
    [pat] = await store.create([factories.patient()], "user:nurse1")
    ref = f"Patient/{pat.logical_id}"
    await store.create(
        [factories.bp_observation(ref, systolic=110 + i) for i in range(n)], "service:devices"
    )
    return ref


async def test_readings_arrive_upstream_once_with_the_patient_reference_mapped(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    await _patient_with_readings(store, 3)
    result = await Deliverer(store, client, max_entries=8, rng=random.Random(1)).drain()
    assert (result.delivered, result.dead, result.error) == (4, 0, None)
    assert fhir_peer.count("Patient") == 1
    assert fhir_peer.count("Observation") == 3
    bundle = (await client.get("Observation", params={"_count": "10"})).json()
    patient_id = (await client.get("Patient")).json()["entry"][0]["resource"]["id"]
    refs = {e["resource"]["subject"]["reference"] for e in bundle["entry"]}
    assert refs == {f"Patient/{patient_id}"}
    assert _states(db_path) == [("delivered", 4)]


async def test_sending_the_same_reading_twice_creates_one_resource(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    await _patient_with_readings(store, 1)
    deliverer = Deliverer(store, client, max_entries=8, rng=random.Random(1))
    assert (await deliverer.drain()).delivered == 2
    # As if every response had been lost: all rows pending again, so all are re-sent.
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE outbox SET state = 'pending', upstream_ref = NULL")
    conn.commit()
    conn.close()
    again = await deliverer.drain()
    assert again.delivered == 2
    assert again.existing == 2  # the server answered 200: it already had them
    assert fhir_peer.count("Observation") == 1
    assert fhir_peer.count("Patient") == 1


async def test_lost_response_is_resent_without_creating_a_duplicate(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    await _patient_with_readings(store, 2)
    clock_moves = iter(range(10_000))

    start = datetime(2026, 11, 26, 12, tzinfo=UTC)
    deliverer = Deliverer(
        store,
        client,
        max_entries=8,
        rng=random.Random(1),
        clock=lambda: start + timedelta(hours=next(clock_moves)),
    )
    # The server processes the bundle, then the connection drops before the answer.
    fhir_peer.fault("close", count=1, after="response")
    first = await deliverer.drain_once()
    assert first.ambiguous > 0
    assert fhir_peer.count("Patient") == 1  # it did land upstream
    assert _states(db_path) == [("pending", 3)]
    result = await deliverer.drain()
    assert result.error is None
    assert fhir_peer.count("Patient") == 1
    assert fhir_peer.count("Observation") == 2
    assert _states(db_path) == [("delivered", 3)]


async def test_dead_upstream_keeps_everything_pending_and_recovers(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    await _patient_with_readings(store, 2)

    now = [datetime(2026, 11, 26, 12, tzinfo=UTC)]
    deliverer = Deliverer(store, client, max_entries=8, rng=random.Random(1), clock=lambda: now[0])
    fhir_peer.fault("status", status=503, count=3)
    failed = await deliverer.drain()
    assert failed.link_down
    assert failed.delivered == 0
    assert _states(db_path) == [("pending", 3)]
    now[0] += timedelta(hours=1)  # past any backoff
    fhir_peer.fault("none")
    result = await deliverer.drain()
    assert result.delivered == 3
    assert fhir_peer.count("Observation") == 2


async def test_refused_entry_is_dead_lettered_with_the_servers_message_and_the_rest_land(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    ref = await _patient_with_readings(store, 2)
    # The upstream refuses this one entry (an EHR business rule, say); the peer's reject
    # rule answers that entry 422 with an OperationOutcome and processes the others.
    bad = factories.bp_observation(ref)
    bad["note"] = [{"text": "refuse-me-upstream"}]
    await store.create([bad], "service:devices")
    fhir_peer.reject("refuse-me-upstream")
    result = await Deliverer(store, client, max_entries=8, rng=random.Random(1)).drain()
    assert result.delivered == 3
    assert result.dead == 1
    conn = sqlite3.connect(db_path)
    [(outbox_id, sealed)] = conn.execute(
        "SELECT id, last_error FROM outbox WHERE state = 'dead'"
    ).fetchall()
    conn.close()
    assert b"refused" not in sealed  # stored encrypted: servers may quote the refused data
    assert "refused by the test rule" in store.keyring.unseal("outbox", str(outbox_id), sealed)
    assert fhir_peer.count("Observation") == 2


async def test_bundle_refused_as_too_large_is_halved_and_everything_lands(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    await _patient_with_readings(store, 6)
    deliverer = Deliverer(store, client, max_entries=8, rng=random.Random(1))
    assert (await deliverer.drain_once()).delivered == 1  # the Patient goes first, alone
    fhir_peer.fault("status", status=413, count=1)
    first = await deliverer.drain_once()
    assert first.error is not None
    assert "too_large" in first.error
    assert deliverer.batch_size == 3  # 6 readings, halved
    result = await deliverer.drain()
    assert result.delivered == 6
    assert fhir_peer.count("Observation") == 6
    assert _states(db_path) == [("delivered", 7)]


async def reading_from_a_device(store: Store, device_name: str) -> dict[str, Any]:
    """A Patient and a Device stored, and a reading (not stored) pointing at both."""
    [pat] = await store.create([factories.patient()], "user:nurse1")
    [dev] = await store.create(
        [
            {
                "resourceType": "Device",
                "status": "active",
                "deviceName": [{"name": device_name, "type": "user-friendly-name"}],
            }
        ],
        "service:devices",
    )
    reading = factories.bp_observation(f"Patient/{pat.logical_id}")
    reading["device"] = {"reference": f"Device/{dev.logical_id}", "display": "Kiosk cuff"}
    return reading


async def test_device_references_and_capture_tags_survive_the_trip_upstream(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    reading = await reading_from_a_device(store, "Kiosk cuff")
    reading["meta"] = {
        "tag": [{"system": "urn:telehealth-appliance:fhir:capture-setting", "code": "clinic"}]
    }
    await store.create([reading], "service:devices")
    # One entry per bundle: the Observation must wait until its Device has an upstream id.
    result = await Deliverer(store, client, max_entries=1, rng=random.Random(1)).drain()
    assert (result.delivered, result.dead) == (3, 0)
    device_id = (await client.get("Device")).json()["entry"][0]["resource"]["id"]
    [entry] = (await client.get("Observation")).json()["entry"]
    assert entry["resource"]["device"] == {
        "reference": f"Device/{device_id}",
        "display": "Kiosk cuff",
    }
    assert {"system": "urn:telehealth-appliance:fhir:capture-setting", "code": "clinic"} in entry[
        "resource"
    ]["meta"]["tag"]


async def test_a_stop_ends_the_drain_after_the_bundle_on_the_wire_and_loses_nothing(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    # The process is told to stop while one bundle travels: its answer is committed, the
    # bundle read ahead is not sent, and the rest waits for the next start.
    await _patient_with_readings(store, 30)
    deliverer = Deliverer(store, client, max_entries=8, rng=random.Random(1))
    asked = 0

    def stop() -> bool:
        nonlocal asked
        asked += 1
        return asked > 1  # the first bundle goes; the stop arrives while it is on the wire

    first = await deliverer.drain(stop=stop)
    # The first bundle is the Patient alone (its readings need its upstream id).
    assert (first.delivered, first.bundles, first.error) == (1, 1, None)
    assert _states(db_path) == [("delivered", 1), ("pending", 30)]
    assert (fhir_peer.count("Patient"), fhir_peer.count("Observation")) == (1, 0)
    rest = await deliverer.drain()
    assert (rest.delivered, rest.existing) == (30, 0)
    assert _states(db_path) == [("delivered", 31)]
    assert fhir_peer.count("Observation") == 30


async def test_a_stop_while_the_next_bundle_travels_waits_for_its_answer(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    # Pipelined: bundle k+1 goes out as soon as k's answer is in, and k's outcomes are
    # committed while it travels. A stop that arrives during that commit must still wait
    # for k+1's answer: a clean stop leaves nothing applied upstream and pending here
    # (a CI run once found one bundle of 8 upstream and not marked delivered).
    await _patient_with_readings(store, 30)
    deliverer = Deliverer(store, client, max_entries=8, rng=random.Random(1))

    def stop() -> bool:
        # The stop arrives once readings 1-8 are committed: by then 9-16 were sent ahead.
        return dict(_states(db_path)).get("delivered", 0) >= 9

    first = await deliverer.drain(stop=stop)
    assert (first.delivered, first.bundles, first.error) == (17, 3, None)
    assert _states(db_path) == [("delivered", 17), ("pending", 14)]
    assert fhir_peer.count("Observation") == 16
    rest = await deliverer.drain()
    assert (rest.delivered, rest.existing) == (14, 0)
    assert fhir_peer.count("Observation") == 30


async def test_a_reading_refused_for_its_patient_stays_due_when_the_patient_is_sent_again_meanwhile(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    """The race: a drain plans a reading as dead (its Patient is a dead letter), an admin
    sends the Patient again while that bundle is on the wire; the reading must not then be
    recorded dead against a Patient that is no longer one."""
    [pat] = await store.create([factories.patient(family="Refusedperson", mrn="T0002")], NURSE)
    fhir_peer.reject("Refusedperson")
    deliverer = Deliverer(store, client, max_entries=8, rng=random.Random(1))
    try:
        assert (await deliverer.drain()).dead == 1
    finally:
        fhir_peer.reject(None)  # the EHR team relaxed the rule
    await store.create([factories.bp_observation(f"Patient/{pat.logical_id}")], "service:devices")
    await _patient_with_readings(store, 1)  # someone else's: the bundle that goes out
    sent_again: list[dead_letters.Resent] = []

    async def admin_sends_the_patient_again(request: httpx.Request) -> None:
        if request.method == "POST" and not sent_again:
            conn = db.connect_sync(db_path)
            try:
                sent_again.append(
                    dead_letters.resend_dead_letters(conn, actor="user:admin1", now=NOW)
                )
            finally:
                conn.close()

    client.event_hooks["request"].append(admin_sends_the_patient_again)
    first = await deliverer.drain()
    assert len(sent_again[0].resent) == 1  # the Patient alone: its reading was not dead yet
    assert first.dead == 0
    assert ("dead", 1) not in _states(db_path)
    assert (await deliverer.drain()).dead == 0
    assert _states(db_path) == [("delivered", 4)]
    assert (fhir_peer.count("Patient"), fhir_peer.count("Observation")) == (2, 2)


async def test_dead_letters_sent_again_after_the_fix_land_once_a_patient_taking_its_readings(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    refused = await _patient_with_readings(store, 0)
    [pat] = await store.create([factories.patient(family="Refusedperson", mrn="T0002")], NURSE)
    await store.create(
        [factories.bp_observation(f"Patient/{pat.logical_id}", systolic=130 + i) for i in (0, 1)],
        "service:devices",
    )
    await store.create([factories.bp_observation(refused)], "service:devices")
    fhir_peer.reject("Refusedperson")  # an EHR rule the site's EHR team later relaxes
    deliverer = Deliverer(store, client, max_entries=8, rng=random.Random(1))
    try:
        first = await deliverer.drain()
        first.dead += (await deliverer.drain()).dead
    finally:
        fhir_peer.reject(None)
    assert first.dead == 3  # the Patient, and its two readings that cannot stand without it
    assert (fhir_peer.count("Patient"), fhir_peer.count("Observation")) == (1, 1)
    conn = db.connect_sync(db_path)
    try:
        [patient_item] = [
            oid
            for (oid,) in conn.execute(
                "SELECT o.id FROM outbox o JOIN resources r ON r.id = o.resource_id "
                "WHERE o.state = 'dead' AND r.type = 'Patient'"
            )
        ]
        done = dead_letters.resend_dead_letters(
            conn, actor="user:admin1", now=NOW, outbox_ids=[patient_item]
        )
        assert (len(done.resent), done.in_review, done.missing) == (3, (), ())
        assert patient_item in done.resent
        assert conn.execute(
            "SELECT value FROM meta WHERE key = ?", (sync_now_request.SYNC_NOW_KEY,)
        ).fetchone()
        audited = conn.execute(
            "SELECT actor, entity, patient_key FROM audit WHERE detail = ?",
            (dead_letters.RESENT_DETAIL,),
        ).fetchall()
        assert sorted(entity for _, entity, _ in audited) == sorted(
            f"outbox/{i}" for i in done.resent
        )
        assert {actor for actor, _, _ in audited} == {"user:admin1"}
        assert {bytes(key) for _, _, key in audited} == {
            store.patient_key(f"Patient/{pat.logical_id}")
        }
        again = await deliverer.drain()
        assert (again.delivered, again.dead) == (3, 0)
        assert (fhir_peer.count("Patient"), fhir_peer.count("Observation")) == (2, 3)
        assert _states(db_path) == [("delivered", 5)]
        # Nothing left to send again: asking says so, and sends nothing twice.
        assert dead_letters.resend_dead_letters(
            conn, actor="user:admin1", now=NOW, outbox_ids=[patient_item]
        ) == dead_letters.Resent((), (), (patient_item,))
        assert (await deliverer.drain()).delivered == 0
        assert (fhir_peer.count("Patient"), fhir_peer.count("Observation")) == (2, 3)
    finally:
        conn.close()


async def test_a_patient_the_server_keeps_failing_does_not_hold_back_the_queue_behind_it(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    fhir_peer.reset()
    [first] = await store.create([factories.patient(family="Stuckperson")], NURSE)
    await store.create(
        [
            factories.bp_observation(f"Patient/{first.logical_id}", systolic=120 + i)
            for i in range(4)
        ],
        "service:devices",
    )
    second = await _patient_with_readings(store, 3)
    now = [NOW]
    deliverer = Deliverer(store, client, max_entries=4, rng=random.Random(1), clock=lambda: now[0])
    fhir_peer.reject("Stuckperson", status=500)  # that one entry, every time
    try:
        for _ in range(3):  # three rounds of the sync loop
            await deliverer.drain()
            now[0] += timedelta(seconds=30)
    finally:
        fhir_peer.reject(None)
    # Before: the first patient's four readings, held for its backoff, filled every read
    # of the outbox and ended each drain: nothing behind them was ever sent.
    assert fhir_peer.count("Patient") == 1
    assert fhir_peer.count("Observation") == 3
    upstream = (await client.get("Observation", params={"_count": "10"})).json()
    patient_id = (await client.get("Patient")).json()["entry"][0]["resource"]["id"]
    assert {e["resource"]["subject"]["reference"] for e in upstream["entry"]} == {
        f"Patient/{patient_id}"
    }
    assert second.startswith("Patient/")
    assert _states(db_path) == [("delivered", 4), ("pending", 5)]
    # Once the server takes it, the rest follows.
    now[0] += timedelta(seconds=600)
    await deliverer.drain()
    assert _states(db_path) == [("delivered", 9)]


async def test_an_alert_goes_after_the_observation_it_implicates_pointing_at_its_upstream_id(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    fhir_peer.reset()
    [pat] = await store.create([factories.patient()], NURSE)
    patient_ref = f"Patient/{pat.logical_id}"
    [reading] = await store.create([factories.bp_observation(patient_ref)], "service:devices")
    issue = {
        "resourceType": "DetectedIssue",
        "status": "final",
        "patient": {"reference": patient_ref},
        "implicated": [{"reference": f"Observation/{reading.logical_id}"}],
        # Not ours: a reference under another type with one of our ids stays as it is.
        "author": {"reference": f"Practitioner/{pat.logical_id}"},
    }
    await store.create([issue], "service:rpm", lane=Lane.ALERTS)
    result = await Deliverer(store, client, max_entries=8, rng=random.Random(1)).drain()
    assert (result.delivered, result.dead) == (3, 0)
    [found] = (await client.get("DetectedIssue")).json()["entry"]
    observation_id = (await client.get("Observation")).json()["entry"][0]["resource"]["id"]
    patient_id = (await client.get("Patient")).json()["entry"][0]["resource"]["id"]
    # Before: sent first, in the alerts lane, still pointing at our local Observation id.
    assert found["resource"]["implicated"] == [{"reference": f"Observation/{observation_id}"}]
    assert found["resource"]["patient"] == {"reference": f"Patient/{patient_id}"}
    assert found["resource"]["author"] == {"reference": f"Practitioner/{pat.logical_id}"}
    assert _states(db_path) == [("delivered", 3)]


async def test_security_labels_and_profiles_go_upstream_with_the_resource(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer
) -> None:
    fhir_peer.reset()
    [pat] = await store.create([factories.patient()], NURSE)
    reading = factories.bp_observation(f"Patient/{pat.logical_id}")
    restricted = {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}
    reading["meta"] = {
        "security": [restricted],
        "profile": ["http://hl7.org/fhir/StructureDefinition/bp"],
    }
    await store.create([reading], "service:devices")
    await Deliverer(store, client, max_entries=8, rng=random.Random(1)).drain()
    [found] = (await client.get("Observation")).json()["entry"]
    # Before: only meta.tag went up; a "restricted" label was lost on the way to the EHR.
    assert restricted in found["resource"]["meta"]["security"]
    assert found["resource"]["meta"]["profile"] == ["http://hl7.org/fhir/StructureDefinition/bp"]


class _RotateOnPost(httpx.AsyncBaseTransport):
    """The real transport; the first bundle POST first waits for `appliance keys rotate data`
    to run to the end in another process (new key, everything re-sealed, old key retired)."""

    def __init__(self, db_path: Path, kek_path: Path) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._db_path, self._kek_path = db_path, kek_path
        self.rotated = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and not self.rotated:
            self.rotated = True
            conn = db.connect_sync(self._db_path)
            try:
                kek = keys.read_kek_file(self._kek_path)
                key_rotation.rotate_data_key(conn, kek)
                key_rotation.reencrypt(conn, kek)
            finally:
                conn.close()
        return await self._inner.handle_async_request(request)


async def test_a_refusal_answered_during_a_key_rotation_is_sealed_under_the_new_key(
    store: Store, fhir_peer: FhirPeer, db_path: Path, kek_path: Path
) -> None:
    fhir_peer.reset()
    await store.create([factories.patient(family="Refusedrotation")], NURSE)
    transport = _RotateOnPost(db_path, kek_path)
    fhir_peer.reject("Refusedrotation")
    try:
        async with httpx.AsyncClient(
            base_url=fhir_peer.base_url,
            headers={"Content-Type": "application/fhir+json"},
            transport=transport,
        ) as client:
            result = await Deliverer(store, client, max_entries=8, rng=random.Random(1)).drain()
    finally:
        fhir_peer.reject(None)
    assert transport.rotated
    assert result.dead == 1
    # Another process (the web UI, `sync status --show-errors`) opens the message. Before:
    # it was sealed under the key the rotation had just retired, and could never be read.
    conn = db.connect_sync(db_path)
    try:
        keyring = keys.load_keyring(conn, keys.read_kek_file(kek_path))
        opened = dead_letters.open_dead_letter_messages(conn, keyring, actor=NURSE, now=NOW)
    finally:
        conn.close()
    assert list(opened.values()) == ["refused by the test rule (reject marker)"]


@pytest.mark.parametrize("code", [423, 425])
async def test_an_entry_answered_locked_or_too_early_is_retried_not_dead_lettered(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path, code: int
) -> None:
    fhir_peer.reset()
    await store.create([factories.patient(family="Lockedperson")], NURSE)
    fhir_peer.reject("Lockedperson", status=code)
    try:
        result = await Deliverer(store, client, max_entries=8, rng=random.Random(1)).drain()
    finally:
        fhir_peer.reject(None)
    # Before: dead-lettered, though the same answer to a whole request meant "later".
    assert (result.dead, result.retry) == (0, 1)
    assert _states(db_path) == [("pending", 1)]


async def test_items_held_for_a_dependency_are_read_once_a_drain_not_once_a_bundle(
    store: Store,
    client: httpx.AsyncClient,
    fhir_peer: FhirPeer,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fhir_peer.reset()
    [stuck] = await store.create([factories.patient(family="Stuckperson")], NURSE)
    held, others = 300, 100
    await store.create(
        [factories.bp_observation(f"Patient/{stuck.logical_id}") for _ in range(held)],
        "service:devices",
    )
    deliverer = Deliverer(store, client, max_entries=10, rng=random.Random(1), clock=lambda: NOW)
    fhir_peer.reject("Stuckperson", status=500)
    try:
        await deliverer.drain()  # the patient refused for now: its readings wait for it
    finally:
        fhir_peer.reject(None)
    raw = sqlite3.connect(db_path)
    with raw:  # its backoff: an hour
        raw.execute(
            "UPDATE outbox SET next_attempt_at = '2026-11-29T10:00:00.000000Z' WHERE id = 1"
        )
    raw.close()
    for _ in range(others // 10):
        await _patient_with_readings(store, 9)
    decrypted = 0
    real = store.decrypt_stored_json

    def counting(conn: sqlite3.Connection, row: tuple[Any, ...]) -> bytes:
        nonlocal decrypted
        decrypted += 1
        return real(conn, row)

    monkeypatch.setattr(store, "decrypt_stored_json", counting)
    # Read past in stretches shorter than the held run: the drain still gets to the rest.
    monkeypatch.setattr(outbox_queue, "_LOOK_PAST_HELD", 50)
    result = await deliverer.drain()
    assert result.delivered == others
    assert result.bundles >= others // 10
    # Before: the held readings were read and decrypted again for every bundle (~3,300 here).
    assert decrypted < 2 * (held + others)


async def test_an_entry_refused_for_our_access_keeps_the_servers_words_and_is_shown_as_failing(
    store: Store, client: httpx.AsyncClient, fhir_peer: FhirPeer, db_path: Path
) -> None:
    fhir_peer.reset()
    await store.create([factories.patient(family="Noscope")], NURSE)
    deliverer = Deliverer(store, client, max_entries=8, rng=random.Random(1))
    fhir_peer.reject("Noscope", status=403)  # that entry: 403 with an OperationOutcome
    try:
        for _ in range(3):
            result = await deliverer.drain()
            assert (result.retry, result.dead) == (1, 0)  # our access: never a dead letter
            await deliverer.make_due()
    finally:
        fhir_peer.reject(None)
    conn = db.connect_sync(db_path)
    try:
        [(outbox_id, sealed)] = conn.execute("SELECT id, last_error FROM outbox").fetchall()
        assert b"refused" not in sealed  # sealed, as a dead letter's message is
        # Before: just "entry HTTP 403", the server's OperationOutcome dropped.
        assert store.keyring.unseal("outbox", str(outbox_id), sealed) == (
            "entry HTTP 403: refused by the test rule (reject marker)"
        )
        failing = failing_items(conn, min_attempts=3)
        assert (failing.count, failing.oldest, failing.type, failing.attempts) == (
            1,
            outbox_id,
            "Patient",
            3,
        )
        assert failing_items(conn, min_attempts=4).count == 0
        message = failing.open_message(conn, store.keyring, actor="user:admin1", now=NOW)
        assert message == "entry HTTP 403: refused by the test rule (reject marker)"
        [(actor, entity)] = conn.execute(
            "SELECT actor, entity FROM audit WHERE detail = ?", ("failing item's message opened",)
        ).fetchall()
        assert (actor, entity) == ("user:admin1", f"outbox/{outbox_id}")
    finally:
        conn.close()
    assert (await deliverer.drain()).delivered == 1
    conn = db.connect_sync(db_path)
    try:
        assert failing_items(conn, min_attempts=1).count == 0  # delivered: no longer failing
    finally:
        conn.close()


@pytest.mark.parametrize(("max_entries", "alerts"), [(1, 1), (8, 8)])
async def test_alerts_whose_readings_wait_for_their_patients_backoff_let_the_rest_go_and_the_drain_end(
    store: Store,
    client: httpx.AsyncClient,
    fhir_peer: FhirPeer,
    db_path: Path,
    max_entries: int,
    alerts: int,
) -> None:
    fhir_peer.reset()
    [stuck] = await store.create([factories.patient(family="Stuckperson")], NURSE)
    stuck_ref = f"Patient/{stuck.logical_id}"
    readings = await store.create(
        [factories.bp_observation(stuck_ref, systolic=170 + i) for i in range(alerts)],
        "service:devices",
    )
    await store.create(
        [
            {
                "resourceType": "DetectedIssue",
                "status": "final",
                "patient": {"reference": stuck_ref},
                "implicated": [{"reference": f"Observation/{reading.logical_id}"}],
            }
            for reading in readings
        ],
        "service:rpm",
        lane=Lane.ALERTS,
    )
    await _patient_with_readings(store, 2)  # someone else's, queued behind
    raw = sqlite3.connect(db_path)
    with raw:  # the stuck Patient's entry was answered 5xx: it waits out its backoff
        raw.execute(
            "UPDATE outbox SET attempts = 8, next_attempt_at = '2026-11-29T09:04:10.000000Z' "
            "WHERE id = 1"
        )
    raw.close()
    deliverer = Deliverer(
        store, client, max_entries=max_entries, rng=random.Random(1), clock=lambda: NOW
    )
    # Before: the alerts were cut off each bundle behind their held readings and the same
    # plan was made again and again; with a fixed clock the drain never ended or sent a thing.
    async with asyncio.timeout(60):
        result = await deliverer.drain()
    assert (result.delivered, result.error) == (3, None)
    assert (fhir_peer.count("Patient"), fhir_peer.count("Observation")) == (1, 2)
    assert _states(db_path) == [("delivered", 3), ("pending", 1 + 2 * alerts)]
