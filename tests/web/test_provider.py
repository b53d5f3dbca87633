"""The provider view: single-visit links, the visit page, live vitals, photos, the note and
completion. Real store, real app, a fake clock; every patient is synthetic."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from quart import Quart
from quart.testing import QuartClient
from quart.typing import TestAppProtocol as AppClientFactory

from appliance import db, users
from appliance.config import Config
from appliance.store import Store
from services import intake
from services.claims.service import ClaimsService
from tests import factories
from tests.services.test_claims import patient as medicare_patient
from tests.services.test_claims import site_doc
from tests.tamper import move_ciphertext
from tests.web.conftest import FakeClock, form_token, login
from web.app import create_app

PNG = intake.PNG_MAGIC + b"synthetic image bytes"
_LINK = re.compile(rb'id="issued-url" type="text" readonly value="[^"]*/visit/([A-Za-z0-9_-]+)"')
_VISIT_CSRF = re.compile(rb'name="visit_csrf" value="([0-9a-f]+)"')


@dataclass
class Seeded:
    patient_id: str
    other_id: str
    encounter_id: str
    media_id: str
    other_media_id: str


async def seed(store: Store, clock: FakeClock, patient: dict[str, object] | None = None) -> Seeded:
    """A patient as the kiosk leaves them: intake, consent, vitals, a photo, then arrival."""
    now = clock()
    [pat, other] = await store.create(
        [patient or factories.patient(family="Zzvisittest"), factories.patient(family="Zzother")],
        "user:t",
    )
    ref = f"Patient/{pat.logical_id}"
    answers = intake.IntakeAnswers("Sore throat for three days", ("fever", "pain"), (2, 1))
    photo = intake.photo_media(ref, PNG, now - timedelta(minutes=4), "kiosk-1")
    other_photo = intake.photo_media(
        f"Patient/{other.logical_id}", PNG, now - timedelta(minutes=4), "kiosk-1"
    )
    stored = await store.create(
        [
            intake.questionnaire_response(answers, ref, now - timedelta(minutes=10), "en"),
            intake.consent(ref, PNG, now - timedelta(minutes=8), "en", "I agree"),
            factories.bp_observation(ref, 141, 91, (now - timedelta(days=3)).isoformat()),
            factories.bp_observation(ref, 128, 82, (now - timedelta(minutes=6)).isoformat()),
            photo,
            other_photo,
            intake.arrival(ref, now - timedelta(seconds=1), "kiosk-1", None),
        ],
        "kiosk:kiosk-1",
    )
    return Seeded(
        pat.logical_id, other.logical_id, stored[-1].logical_id, stored[4].logical_id,
        stored[5].logical_id,
    )  # fmt: skip


async def issue_link(nurse: QuartClient, encounter_id: str, name: str = "Dr. Testprovider") -> str:
    page = await nurse.get("/visit/new")
    assert page.status_code == 200
    body = await page.get_data()
    assert encounter_id.encode() in body
    issued = await nurse.post(
        "/visit/new",
        form={"encounter": encounter_id, "provider_name": name, "csrf_token": form_token(body)},
    )
    assert issued.status_code == 200
    found = _LINK.search(await issued.get_data())
    assert found is not None, "no link on the page"
    return found.group(1).decode()


async def join(client: QuartClient, token: str) -> bytes:
    """Open the link, press Join, and return the visit page."""
    first = await client.get(f"/visit/{token}")
    assert first.status_code == 200
    body = await first.get_data()
    assert b"Join the visit" in body
    fields = {"visit_csrf": visit_csrf(body)}
    if b'name="csrf_token"' in body:  # a staff session in the same browser
        fields["csrf_token"] = form_token(body)
    joined = await client.post(f"/visit/{token}/join", form=fields)
    assert joined.status_code == 303
    page = await client.get(f"/visit/{token}")
    assert page.status_code == 200
    return await page.get_data()


def visit_csrf(body: bytes) -> str:
    found = _VISIT_CSRF.search(body)
    assert found is not None
    return found.group(1).decode()


async def audit_rows(store: Store, actor: str) -> list[tuple[str, str, bytes | None, str]]:
    rows = await store.query(
        "SELECT action, outcome, patient_key, coalesce(detail, '') FROM audit "
        "WHERE actor = ? ORDER BY id",
        (actor,),
    )
    return [(str(a), str(o), k, str(d)) for a, o, k, d in rows]


@pytest.fixture
async def seeded(store: Store, clock: FakeClock) -> Seeded:
    return await seed(store, clock)


@pytest.fixture
async def token(logged_in: QuartClient, seeded: Seeded) -> str:
    return await issue_link(logged_in, seeded.encounter_id)


@pytest.fixture
def provider(app: AppClientFactory) -> QuartClient:
    return app.test_client()  # type: ignore[return-value]


async def test_nurse_issues_a_link_and_only_its_hash_is_stored(
    store: Store, seeded: Seeded, token: str
) -> None:
    rows = await store.query("SELECT token_hash, encounter_id, patient_id FROM visit_links")
    assert rows == [
        (hashlib.sha256(token.encode()).digest(), seeded.encounter_id, seeded.patient_id)
    ]
    raw = await store.query(
        "SELECT count(*) FROM visit_links WHERE CAST(token_hash AS TEXT) = ?", (token,)
    )
    assert raw == [(0,)]
    issued = await store.query(
        "SELECT detail, patient_key FROM audit WHERE actor = 'user:nurse1' AND action = 'create'"
    )
    assert issued[-1][0].startswith("visit link 1 issued")
    assert issued[-1][1] == store.patient_key(f"Patient/{seeded.patient_id}")


async def test_only_nurses_and_admins_issue_links(
    app: AppClientFactory, store: Store, seeded: Seeded, clock: FakeClock
) -> None:
    anonymous = app.test_client()
    assert (await anonymous.get("/visit/new")).status_code == 302
    await db.run_sync(
        store.connection, users.create_user, "prov1", "correct horse battery", users.Role.PROVIDER,
        now=clock(),
    )  # fmt: skip
    staff_provider = app.test_client()
    assert await login(staff_provider, "prov1", "correct horse battery") == 302  # type: ignore[arg-type]
    assert (await staff_provider.get("/visit/new")).status_code == 403


async def test_a_link_is_for_an_arrival_of_today_only(
    logged_in: QuartClient, seeded: Seeded
) -> None:
    page = await logged_in.get("/visit/new")
    token = form_token(await page.get_data())
    refused = await logged_in.post(
        "/visit/new", form={"encounter": seeded.media_id, "csrf_token": token}
    )
    assert refused.status_code == 400
    forged = await logged_in.post("/visit/new", form={"encounter": seeded.encounter_id})
    assert forged.status_code == 403  # no CSRF token


async def test_an_arrival_that_fails_authentication_leaves_the_others_linkable(
    logged_in: QuartClient, store: Store, seeded: Seeded, clock: FakeClock, db_path: Path
) -> None:
    [bad] = await store.create(
        [intake.arrival(f"Patient/{seeded.other_id}", clock(), "kiosk-1", None)], "kiosk:kiosk-1"
    )
    move_ciphertext(db_path, bad.logical_id, seeded.encounter_id)  # the newest arrival
    token = await issue_link(logged_in, seeded.encounter_id)  # before: /visit/new was a 500
    assert token
    page = await (await logged_in.get("/visit/new")).get_data()
    assert bad.logical_id.encode() not in page
    failures = await store.query("SELECT entity FROM audit WHERE outcome = 'failure'")
    assert (f"Encounter/{bad.logical_id}",) in failures


async def test_first_browser_binds_the_link_and_a_second_is_refused(
    app: AppClientFactory, store: Store, token: str, seeded: Seeded
) -> None:
    first = app.test_client()
    body = await join(first, token)  # type: ignore[arg-type]
    second = app.test_client()
    refused = await second.get(f"/visit/{token}")
    assert refused.status_code == 403
    assert b"already open in another browser" in await refused.get_data()
    joined = await second.post(f"/visit/{token}/join", form={"visit_csrf": visit_csrf(body)})
    assert joined.status_code == 403
    assert (await first.get(f"/visit/{token}")).status_code == 200
    for path in ("", "/events", f"/photos/{seeded.media_id}"):
        assert (await second.get(f"/visit/{token}{path}")).status_code == 403
    rows = await audit_rows(store, "provider-link:1")
    assert ("login", "success") in [(a, o) for a, o, _k, _d in rows]
    assert ("login", "denied") in [(a, o) for a, o, _k, _d in rows]
    assert any(d == "another browser refused" and o == "denied" for _a, o, _k, d in rows)


async def test_the_visit_page_shows_intake_consent_vitals_history_and_photos(
    provider: QuartClient, token: str, seeded: Seeded, store: Store
) -> None:
    body = (await join(provider, token)).decode()
    assert "Ada Zzvisittest" in body
    assert "Sore throat for three days" in body
    assert "Fever or chills" in body
    assert "3 of 6" in body
    assert "positive screen" in body
    assert "Signed " in body
    vitals = body.split('id="vitals"')[1].split("</ul>")[0]
    assert "128/82 mmHg" in vitals
    assert "141/91" not in vitals
    history = body.split('id="history"')[1].split("</table>")[0]
    assert "141/91 mmHg" in history
    assert f"/visit/{token}/photos/{seeded.media_id}" in body
    assert seeded.other_media_id not in body
    assert "<script>" not in body
    assert "style=" not in body
    # Every read as the link, with the patient's key.
    key = store.patient_key(f"Patient/{seeded.patient_id}")
    rows = await audit_rows(store, "provider-link:1")
    assert any(d == "visit page" and k == key for _a, _o, k, d in rows)
    searches = [r for r in rows if r[0] == "search"]
    assert searches
    assert all(k == key for _a, _o, k, _d in searches)


async def test_photos_are_served_inline_uncached_and_only_this_patients(
    provider: QuartClient, token: str, seeded: Seeded
) -> None:
    await join(provider, token)
    shown = await provider.get(f"/visit/{token}/photos/{seeded.media_id}")
    assert shown.status_code == 200
    assert await shown.get_data() == PNG
    assert shown.headers["Content-Type"] == "image/png"
    assert shown.headers["Content-Disposition"].startswith("inline")
    assert shown.headers["Cache-Control"] == "no-store"
    assert shown.headers["X-Content-Type-Options"] == "nosniff"
    other = await provider.get(f"/visit/{token}/photos/{seeded.other_media_id}")
    assert other.status_code == 404
    missing = await provider.get(f"/visit/{token}/photos/nothing-here")
    assert missing.status_code == 404


async def test_live_feed_sends_this_patients_new_readings_and_nobody_elses(
    provider: QuartClient, token: str, seeded: Seeded, store: Store, clock: FakeClock
) -> None:
    await join(provider, token)
    now = clock().isoformat()
    async with provider.request(f"/visit/{token}/events") as connection:
        await connection.send_complete()
        received = await asyncio.wait_for(connection.receive(), 1.0)
        await store.create(
            [
                factories.bp_observation(f"Patient/{seeded.other_id}", 99, 61, now),
                factories.bp_observation(f"Patient/{seeded.patient_id}", 133, 85, now),
            ],
            "service:devices",
        )
        async with asyncio.timeout(3):
            while b"133/85" not in received:
                received += await connection.receive()
        await connection.disconnect()
    assert b"event: reading" in received
    assert b"128/82" in received  # this visit's earlier reading comes first
    assert b"99/61" not in received


async def test_a_link_expires_after_two_hours(
    provider: QuartClient, token: str, clock: FakeClock, store: Store
) -> None:
    await join(provider, token)
    clock.advance(2 * 3600 - 1)
    assert (await provider.get(f"/visit/{token}")).status_code == 200
    clock.advance(2)
    expired = await provider.get(f"/visit/{token}")
    assert expired.status_code == 410
    assert b"expired" in await expired.get_data()
    rows = await audit_rows(store, "provider-link:1")
    assert rows[-1][:2] == ("read", "denied")
    assert rows[-1][3] == "visit link expired"


async def test_a_revoked_link_stops_working_and_ends_the_live_feed(
    provider: QuartClient, logged_in: QuartClient, token: str
) -> None:
    await join(provider, token)
    page = await logged_in.get("/visit/new")
    body = await page.get_data()
    assert b"(joined)" in body
    async with provider.request(f"/visit/{token}/events") as connection:
        await connection.send_complete()
        received = await asyncio.wait_for(connection.receive(), 1.0)
        revoked = await logged_in.post(
            "/visit/links/1/revoke", form={"csrf_token": form_token(body)}
        )
        assert revoked.status_code == 303
        async with asyncio.timeout(5):
            while b"event: ended" not in received:
                received += await connection.receive()
    gone = await provider.get(f"/visit/{token}")
    assert gone.status_code == 410
    assert b"withdrawn" in await gone.get_data()


async def test_unknown_tokens_are_throttled_per_address(
    provider: QuartClient, app: AppClientFactory, token: str, clock: FakeClock
) -> None:
    for n in range(10):
        assert (await provider.get(f"/visit/guessedtoken{n:020d}")).status_code == 404
    assert (await provider.get("/visit/guessedtoken-one-more-00000000")).status_code == 429
    # While throttled, even a real link waits: a guess must learn nothing.
    assert (await provider.get(f"/visit/{token}")).status_code == 429
    clock.advance(10 * 60 + 1)
    assert (await provider.get(f"/visit/{token}")).status_code == 200


async def test_forms_need_the_links_own_token(
    provider: QuartClient, token: str, store: Store
) -> None:
    await join(provider, token)
    forged = await provider.post(
        f"/visit/{token}/complete", form={"note": "x", "codes": "J02.9", "visit_csrf": "0" * 64}
    )
    assert forged.status_code == 403
    assert await store.query("SELECT count(*) FROM resources WHERE type = 'DocumentReference'") == [
        (0,)
    ]


async def test_a_staff_session_in_the_same_browser_does_not_break_the_forms(
    logged_in: QuartClient, seeded: Seeded
) -> None:
    token = await issue_link(logged_in, seeded.encounter_id)
    body = await join(logged_in, token)  # the nurse's own browser joins as the provider
    done = await logged_in.post(
        f"/visit/{token}/complete",
        form={
            "note": "Seen with the nurse present.",
            "codes": "J02.9",
            "visit_csrf": visit_csrf(body),
            "csrf_token": form_token(body),
        },
    )
    assert done.status_code == 200


async def test_bad_codes_or_an_empty_note_are_refused_and_nothing_is_written(
    provider: QuartClient, token: str, store: Store
) -> None:
    body = await join(provider, token)
    for note, codes, says in (
        ("Pharyngitis, likely viral.", "J02.9, 12345", b"is not an ICD-10-CM code"),
        ("Pharyngitis, likely viral.", "", b"at least one ICD-10-CM"),
        ("   ", "J02.9", b"Write the visit note"),
        ("x" * (32 * 1024 + 1), "J02.9", b"too long"),
    ):
        refused = await provider.post(
            f"/visit/{token}/complete",
            form={"note": note, "codes": codes, "visit_csrf": visit_csrf(body)},
        )
        assert refused.status_code in (400, 413), codes
        if refused.status_code == 400:
            assert says in await refused.get_data()
    assert await store.query(
        "SELECT count(*) FROM resources WHERE type IN ('DocumentReference') "
        "OR (type = 'Encounter' AND id > (SELECT min(id) FROM resources WHERE type = 'Encounter'))"
    ) == [(0,)]


async def _complete(provider: QuartClient, token: str, body: bytes, codes: str) -> bytes:
    done = await provider.post(
        f"/visit/{token}/complete",
        form={
            "note": "Sore throat, no exudate. Likely viral pharyngitis.\r\nFluids, rest.",
            "codes": codes,
            "visit_csrf": visit_csrf(body),
        },
    )
    assert done.status_code == 200
    return await done.get_data()


async def test_completing_finishes_the_visit_keeps_the_note_and_ends_the_link(
    provider: QuartClient, token: str, seeded: Seeded, store: Store
) -> None:
    body = await join(provider, token)
    page = await _complete(provider, token, body, "j02.9 r5090")
    assert b"Visit completed" in page
    [(finished_id, note_id, outcome)] = await store.query(
        "SELECT finished_encounter_id, note_id, claim_outcome FROM visit_links"
    )
    encounter = await store.read("Encounter", finished_id, "user:t")
    assert encounter["status"] == "finished"
    assert encounter["class"]["code"] == "VR"
    assert encounter["partOf"] == {"reference": f"Encounter/{seeded.encounter_id}"}
    assert encounter["period"]["end"]
    assert [c["coding"][0]["code"] for c in encounter["reasonCode"]] == ["J02.9", "R50.90"]
    assert encounter["participant"][0]["individual"]["display"] == "Dr. Testprovider"
    note = await store.read("DocumentReference", note_id, "user:t")
    text = base64.b64decode(note["content"][0]["attachment"]["data"]).decode()
    assert text == "Sore throat, no exudate. Likely viral pharyngitis.\nFluids, rest."
    assert note["context"]["encounter"] == [{"reference": f"Encounter/{seeded.encounter_id}"}]
    assert note["type"]["coding"][0]["code"] == "11506-3"
    # The demo site does not bill: the decision is recorded with its reason.
    assert outcome == "not-eligible"
    decision = await store.query(
        "SELECT outcome FROM claim_decisions WHERE encounter_id = ?", (finished_id,)
    )
    assert decision == [("not-eligible",)]
    # Both resources go upstream and were audited as the link.
    queued = await store.query(
        "SELECT r.type FROM outbox o JOIN resources r ON r.id = o.resource_id "
        "WHERE r.logical_id IN (?, ?)",
        (finished_id, note_id),
    )
    assert sorted(t for (t,) in queued) == ["DocumentReference", "Encounter"]
    creates = [d for a, _o, _k, d in await audit_rows(store, "provider-link:1") if a == "create"]
    assert len(creates) == 2
    # The link is done: the page, the feed, the photos and a second completion all refuse.
    for path in ("", "/events", f"/photos/{seeded.media_id}"):
        assert (await provider.get(f"/visit/{token}{path}")).status_code == 410
    again = await provider.post(
        f"/visit/{token}/complete",
        form={"note": "again", "codes": "J02.9", "visit_csrf": visit_csrf(body)},
    )
    assert again.status_code == 410
    assert await store.query("SELECT count(*) FROM resources WHERE type = 'DocumentReference'") == [
        (1,)
    ]


async def test_completing_at_a_billing_site_drafts_a_q3014_claim(
    tmp_path: Path, store: Store, clock: FakeClock
) -> None:
    billing: Config = site_doc()
    await db.run_sync(
        store.connection, users.create_user, "nurse1", "correct horse battery", users.Role.NURSE,
        now=clock(),
    )  # fmt: skip
    seeded = await seed(store, clock, medicare_patient())
    quart_app: Quart = create_app(billing, store, clock=clock, sse_poll_s=0.02)
    async with quart_app.test_app() as test_app:
        nurse = test_app.test_client()
        assert await login(nurse) == 302  # type: ignore[arg-type]
        token = await issue_link(nurse, seeded.encounter_id)  # type: ignore[arg-type]
        provider = test_app.test_client()
        body = await join(provider, token)  # type: ignore[arg-type]
        page = await _complete(provider, token, body, "J02.9")  # type: ignore[arg-type]
    assert b"drafted" in page
    [(finished_id, outcome)] = await store.query(
        "SELECT finished_encounter_id, claim_outcome FROM visit_links"
    )
    assert outcome == "drafted"
    service = ClaimsService(store, billing)
    [claim] = await service.claims()
    assert claim.encounter_id == finished_id
    assert claim.patient_id == seeded.patient_id
    [content] = await service.content([claim.id], "user:t")
    assert "J029" in str(content)
