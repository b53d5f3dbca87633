"""The /sync page and the sync gauges of /metrics over a real store and the real app."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from quart.testing import QuartClient

from appliance import audit, db, users
from appliance.store import Lane, Store
from sync_agent import pull_twins, status_figures
from sync_agent import status as status_module
from tests import factories
from tests.sync_agent.test_status import claims_for_the_payer
from tests.web.conftest import FakeClock, form_token, login

ADMIN = "admin1"
PASSWORD = "correct horse battery"
SECRET = "Refused: family name Zzyzxmarkerfamily is not allowed"


@pytest.fixture
async def admin(client: QuartClient, store: Store, clock: FakeClock) -> QuartClient:
    await db.run_sync(
        store.connection, users.create_user, ADMIN, PASSWORD, users.Role.ADMIN, now=clock()
    )
    assert await login(client, ADMIN, PASSWORD) == 302
    return client


async def _backlog(store: Store, db_path: Path, clock: FakeClock) -> int:
    """Two pending clinical items, one alert delivered, one dead letter; its outbox id."""
    [pat] = await store.create([factories.patient()], "user:nurse1")
    ref = f"Patient/{pat.logical_id}"
    await store.create([factories.bp_observation(ref)], "service:devices")
    await store.create([factories.bp_observation(ref)], "service:devices", lane=Lane.ALERTS)
    await store.create([factories.bp_observation(ref)], "service:devices")
    raw = sqlite3.connect(db_path)
    with raw:
        # the first clinical row (the patient) refused for good, the alert delivered
        raw.execute(
            "UPDATE outbox SET state = 'dead', attempts = 2, last_error = ? WHERE id = 1",
            (store.keyring.seal("outbox", "1", SECRET),),
        )
        raw.execute(
            "UPDATE outbox SET state = 'delivered', delivered_at = ? WHERE lane = 0",
            ("2026-11-26T08:00:00.000000Z",),
        )
        _beat(raw, clock, {"upstream": "ehr", "online": True, "batch_size": 8})
    raw.close()
    return 1


def _beat(raw: sqlite3.Connection, clock: FakeClock, figures: dict[str, object]) -> None:
    """The sync process's heartbeat, as it publishes it."""
    raw.execute(
        "INSERT OR REPLACE INTO heartbeats (process, pid, started_at, beat_at, status) "
        "VALUES ('sync', 1, ?, ?, ?)",
        (clock().isoformat(), clock().isoformat(), json.dumps(figures)),
    )


def _audit_count(db_path: Path, action: str) -> int:
    raw = sqlite3.connect(db_path)
    try:
        return int(
            raw.execute("SELECT count(*) FROM audit WHERE action = ?", (action,)).fetchone()[0]
        )
    finally:
        raw.close()


async def test_nurse_sees_the_figures_of_the_database(
    logged_in: QuartClient, store: Store, db_path: Path, clock: FakeClock
) -> None:
    await _backlog(store, db_path, clock)
    response = await logged_in.get("/sync/")
    assert response.status_code == 200
    page = (await response.get_data()).decode()
    assert "Online" in page
    assert '<td id="waiting">2 items</td>' in page
    assert '<span class="warn">1</span>' in page
    clinical = page.split('data-lane="clinical"')[1].split("</tr>")[0]
    assert '<td class="num waiting">2</td>' in clinical
    assert '<td class="num dead">1</td>' in clinical
    assert "2026-11-26" in page  # the last success
    # A nurse sees the dead letter but cannot open it, and has no Sync now button.
    assert 'data-outbox-id="1"' in page
    assert "Show message" not in page
    assert "Sync now</button>" not in page
    assert SECRET not in page


async def test_nurse_cannot_press_sync_now(logged_in: QuartClient, db_path: Path) -> None:
    page = await logged_in.get("/sync/")
    token = form_token(await page.get_data())  # the logout form's, a valid session token
    response = await logged_in.post("/sync/now", form={"csrf_token": token})
    assert response.status_code == 403
    response = await logged_in.post("/sync/dead-letters/1/message", form={"csrf_token": token})
    assert response.status_code == 403


async def test_sync_now_without_the_csrf_token_is_refused(
    admin: QuartClient, db_path: Path
) -> None:
    response = await admin.post("/sync/now")
    assert response.status_code == 403
    raw = sqlite3.connect(db_path)
    assert raw.execute("SELECT value FROM meta WHERE key = 'sync_now'").fetchone() is None
    raw.close()


async def test_admin_sync_now_writes_the_request_with_its_audit_record(
    admin: QuartClient, db_path: Path, clock: FakeClock
) -> None:
    page = await admin.get("/sync/")
    body = await page.get_data()
    assert b"Sync now</button>" in body
    before = _audit_count(db_path, "sync")
    response = await admin.post("/sync/now", form={"csrf_token": form_token(body)})
    assert response.status_code == 303
    raw = sqlite3.connect(db_path)
    [value] = raw.execute("SELECT value FROM meta WHERE key = 'sync_now'").fetchone()
    [actor, detail] = raw.execute(
        "SELECT actor, detail FROM audit WHERE action = 'sync' ORDER BY id DESC LIMIT 1"
    ).fetchone()
    raw.close()
    assert value == clock().isoformat()
    assert (actor, detail) == (f"user:{ADMIN}", "sync now requested")
    assert _audit_count(db_path, "sync") == before + 1


async def test_admin_opens_a_dead_letter_message_only_on_request_and_it_is_audited(
    admin: QuartClient, store: Store, db_path: Path, clock: FakeClock
) -> None:
    outbox_id = await _backlog(store, db_path, clock)
    page = await admin.get("/sync/")
    body = await page.get_data()
    assert SECRET.encode() not in body
    assert b"Show message" in body
    reads = _audit_count(db_path, "read")
    opened = await admin.post(
        f"/sync/dead-letters/{outbox_id}/message", form={"csrf_token": form_token(body)}
    )
    assert opened.status_code == 200
    assert SECRET in (await opened.get_data()).decode()
    assert _audit_count(db_path, "read") == reads + 1
    conn = db.connect_sync(db_path)
    [record] = audit.report(conn, actor=f"user:{ADMIN}", action=audit.AuditAction.READ)
    conn.close()
    assert record.entity == f"outbox/{outbox_id}"
    assert record.patient_key == store.patient_key(
        f"Patient/{(await store.patients('user:test'))[0]['id']}"
    )
    # The next page view shows it closed again.
    assert SECRET.encode() not in await (await admin.get("/sync/")).get_data()


async def test_admin_sends_a_dead_letter_again_audited_and_the_sync_process_is_woken(
    admin: QuartClient, store: Store, db_path: Path, clock: FakeClock
) -> None:
    outbox_id = await _backlog(store, db_path, clock)
    # Without the form's token: refused, nothing changes.
    assert (await admin.post(f"/sync/dead-letters/{outbox_id}/resend")).status_code == 403
    assert (await admin.post("/sync/dead-letters/resend")).status_code == 403
    assert _audit_count(db_path, "sync") == 0
    body = await (await admin.get("/sync/")).get_data()
    assert b"Send again</button>" in body
    assert b"Send all again</button>" in body
    token = form_token(body)
    sent = await admin.post(f"/sync/dead-letters/{outbox_id}/resend", form={"csrf_token": token})
    assert sent.status_code == 303
    assert sent.headers["Location"].endswith("/sync/?resent=1")
    page = (await (await admin.get(sent.headers["Location"])).get_data()).decode()
    assert "1 dead letter put back in the outbox" in page
    assert '<td id="dead-total">0</td>' in page
    raw = sqlite3.connect(db_path)
    row = raw.execute(
        "SELECT state, attempts, last_error FROM outbox WHERE id = ?", (outbox_id,)
    ).fetchone()
    [wake] = raw.execute("SELECT value FROM meta WHERE key = 'sync_now'").fetchone()
    [(actor, entity)] = raw.execute(
        "SELECT actor, entity FROM audit WHERE detail = 'dead letter sent again'"
    ).fetchall()
    raw.close()
    assert row == ("pending", 0, None)
    assert wake == clock().isoformat()
    assert (actor, entity) == (f"user:{ADMIN}", f"outbox/{outbox_id}")
    # Pressed twice (a second tab): it says so, and nothing changes.
    again = await admin.post(f"/sync/dead-letters/{outbox_id}/resend", form={"csrf_token": token})
    assert again.status_code == 404
    assert "no longer there" in (await again.get_data()).decode()
    everything = await admin.post("/sync/dead-letters/resend", form={"csrf_token": token})
    assert everything.headers["Location"].endswith("/sync/?resent=0")


async def test_a_nurse_cannot_send_dead_letters_again(
    logged_in: QuartClient, store: Store, db_path: Path, clock: FakeClock
) -> None:
    outbox_id = await _backlog(store, db_path, clock)
    body = await (await logged_in.get("/sync/")).get_data()
    assert b"Send again" not in body
    token = form_token(body)
    for path in (f"/sync/dead-letters/{outbox_id}/resend", "/sync/dead-letters/resend"):
        assert (await logged_in.post(path, form={"csrf_token": token})).status_code == 403
    raw = sqlite3.connect(db_path)
    assert raw.execute("SELECT state FROM outbox WHERE id = ?", (outbox_id,)).fetchone() == (
        "dead",
    )
    raw.close()


@pytest.mark.parametrize(
    ("failure", "said"),
    [
        ("endpoint", "check base_url in the site config"),
        ("auth", "refused our credentials"),
        ("something-new", "last failure: something-new"),
    ],
)
async def test_an_offline_link_says_what_the_failure_means(
    logged_in: QuartClient, db_path: Path, clock: FakeClock, failure: str, said: str
) -> None:
    raw = sqlite3.connect(db_path)
    with raw:
        _beat(raw, clock, {"upstream": "ehr", "online": False, "last_failure": failure})
    raw.close()
    page = (await (await logged_in.get("/sync/")).get_data()).decode()
    assert "Offline" in page
    assert said in page.split('id="last-failure">')[1].split("</span>")[0]


async def test_the_page_and_metrics_say_the_sync_process_is_paused_while_sync_once_sends(
    logged_in: QuartClient, db_path: Path, clock: FakeClock
) -> None:
    since = (clock() - timedelta(minutes=3)).isoformat()
    raw = sqlite3.connect(db_path)
    with raw:
        _beat(raw, clock, {"upstream": "ehr", "online": True, "paused_since": since})
    raw.close()
    page = (await (await logged_in.get("/sync/")).get_data()).decode()
    row = page.split('id="paused">')[1].split("</td>")[0]
    assert "Paused for 3 min" in row
    assert "appliance sync once is sending" in row
    metrics = (await (await logged_in.get("/metrics")).get_data()).decode()
    assert "appliance_sync_paused_seconds 180.0" in metrics


async def test_the_link_reads_starting_then_names_a_connection_that_cannot_be_made(
    logged_in: QuartClient, db_path: Path, clock: FakeClock
) -> None:
    raw = sqlite3.connect(db_path)
    for figures in ({}, {"upstream": "ehr"}):  # its first beat, then its first round
        with raw:
            _beat(raw, clock, figures)
        page = (await (await logged_in.get("/sync/")).get_data()).decode()
        assert 'id="starting"' in page
        assert "No upstream configured" not in page
    with raw:  # and one that said it has none
        _beat(raw, clock, {"upstream": None})
    page = (await (await logged_in.get("/sync/")).get_data()).decode()
    assert "No upstream configured" in page
    with raw:
        _beat(
            raw,
            clock,
            {"upstream": "ehr", "online": False, "unreachable": True, "last_failure": "transient"},
        )
    raw.close()
    page = (await (await logged_in.get("/sync/")).get_data()).decode()
    said = page.split('id="last-failure">')[1].split("</span>")[0]
    # Before: "the EHR answered with errors or was busy" for a pulled cable.
    assert "check this clinic&#39;s internet link" in said


async def test_an_online_link_names_a_step_that_is_refused_and_backing_off(
    logged_in: QuartClient, db_path: Path, clock: FakeClock
) -> None:
    raw = sqlite3.connect(db_path)
    with raw:
        _beat(raw, clock, {"upstream": "ehr", "online": True, "steps_failing": {}})
    page = (await (await logged_in.get("/sync/")).get_data()).decode()
    assert 'id="steps-failing"' not in page
    with raw:
        _beat(
            raw,
            clock,
            {"upstream": "ehr", "online": True, "steps_failing": {"audit export": "auth"}},
        )
    raw.close()
    page = (await (await logged_in.get("/sync/")).get_data()).decode()
    assert "Online" in page
    held = page.split('id="steps-failing">')[1].split("</td>")[0]
    assert "Audit export" in held
    assert "refused our credentials" in held


async def test_a_pull_whose_searches_the_ehr_refused_is_on_the_page_and_in_the_gauges(
    logged_in: QuartClient, db_path: Path, clock: FakeClock
) -> None:
    raw = sqlite3.connect(db_path)
    with raw:
        _beat(raw, clock, {"upstream": "ehr", "online": True, "steps_failing": {}})
    page = (await (await logged_in.get("/sync/")).get_data()).decode()
    assert 'id="pull-searches"' not in page
    with raw:  # as the sync process publishes a pass whose every search got a 403
        _beat(
            raw,
            clock,
            {
                "upstream": "ehr",
                "online": True,
                "steps_failing": {"pull": "refused"},
                "pull_refused": 2,
                "pull_stuck": True,
            },
        )
    raw.close()
    page = (await (await logged_in.get("/sync/")).get_data()).decode()
    # Before: "Online" and nothing else; the pull of appointments failed every pass unseen.
    held = page.split('id="steps-failing">')[1].split("</td>")[0]
    assert "Pull" in held
    assert "refused every search of the pull" in held
    searches = page.split('id="pull-searches">')[1].split("</td>")[0]
    assert "2 searches refused by the EHR in the last pass" in searches
    assert "cannot get past a run of records" in searches
    families = {
        f.name: f
        for f in text_string_to_metric_families(
            (await (await logged_in.get("/metrics")).get_data()).decode()
        )
    }
    failing = {s.labels["step"]: s.value for s in families["appliance_sync_step_failing"].samples}
    assert failing == {"updates": 0, "pull": 1, "audit export": 0}
    assert families["appliance_sync_pull_searches_refused"].samples[0].value == 2
    assert families["appliance_sync_pull_stuck"].samples[0].value == 1
    clock.advance(60)  # a stale heartbeat says nothing of now
    families = {
        f.name: f
        for f in text_string_to_metric_families(
            (await (await logged_in.get("/metrics")).get_data()).decode()
        )
    }
    assert {s.value for s in families["appliance_sync_step_failing"].samples} == {0}
    assert families["appliance_sync_pull_searches_refused"].samples[0].value == 0


async def test_a_pull_answered_unsorted_is_told_apart_from_a_refused_one(
    logged_in: QuartClient, db_path: Path, clock: FakeClock
) -> None:
    raw = sqlite3.connect(db_path)
    with raw:  # as the sync process publishes a pass whose every page was not sorted as asked
        _beat(
            raw,
            clock,
            {
                "upstream": "ehr",
                "online": True,
                "steps_failing": {"pull": "unordered"},
                "pull_refused": 0,
                "pull_unordered": 1,
            },
        )
    raw.close()
    page = (await (await logged_in.get("/sync/")).get_data()).decode()
    # Before: these passes read "the EHR refused every search of the pull (a 403 or 400 to
    # each): check the scopes", which sent staff after the wrong cause.
    held = page.split('id="steps-failing">')[1].split("</td>")[0]
    assert "does not sort or filter the pull&#39;s searches as asked" in held
    assert "scope" not in held
    searches = page.split('id="pull-searches">')[1].split("</td>")[0]
    assert "1 search not sorted or filtered as asked in the last pass" in searches
    assert "refused" not in searches
    families = {
        f.name: f
        for f in text_string_to_metric_families(
            (await (await logged_in.get("/metrics")).get_data()).decode()
        )
    }
    assert families["appliance_sync_pull_searches_unordered"].samples[0].value == 1
    assert families["appliance_sync_pull_searches_refused"].samples[0].value == 0


async def test_a_break_in_the_audit_trail_found_by_the_export_is_on_the_page(
    logged_in: QuartClient, db_path: Path
) -> None:
    page = (await (await logged_in.get("/sync/")).get_data()).decode()
    assert 'id="trail-breaks"' not in page
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute("INSERT INTO meta (key, value) VALUES ('audit_export.breaks', '1')")
    raw.close()
    page = (await (await logged_in.get("/sync/")).get_data()).decode()
    said = page.split('id="trail-breaks">')[1].split("</div>")[0]
    assert "cut back or rewritten" in said
    assert "appliance audit verify" in said
    assert "Acknowledge" not in said  # a nurse sees it, only an admin acknowledges
    token = form_token(page.encode())
    response = await logged_in.post(
        "/sync/trail-breaks/acknowledge", form={"csrf_token": token, "seen": "1"}
    )
    assert response.status_code == 403


async def test_an_admin_acknowledges_the_breaks_shown_and_the_warning_goes(
    admin: QuartClient, db_path: Path, client: QuartClient
) -> None:
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute("INSERT INTO meta (key, value) VALUES ('audit_export.breaks', '1')")
    body = await (await admin.get("/sync/")).get_data()
    assert b"Acknowledge (looked into and reported)" in body
    token = form_token(body)
    # Without its CSRF token, or without the count shown: refused, nothing acknowledged.
    assert (
        await admin.post("/sync/trail-breaks/acknowledge", form={"seen": "1"})
    ).status_code == 403
    response = await admin.post("/sync/trail-breaks/acknowledge", form={"csrf_token": token})
    assert response.status_code == 400
    # A second break found while the page was open stays unacknowledged.
    with raw:
        raw.execute("UPDATE meta SET value = '2' WHERE key = 'audit_export.breaks'")
    response = await admin.post(
        "/sync/trail-breaks/acknowledge", form={"csrf_token": token, "seen": "1"}
    )
    assert response.status_code == 303
    page = (await (await admin.get(response.headers["Location"])).get_data()).decode()
    assert "1 audit trail break acknowledged" in page
    said = page.split('id="trail-breaks">')[1].split("</div>")[0]
    assert "found 1 time by the export since the last acknowledgement" in said
    [(actor, detail)] = raw.execute(
        "SELECT actor, detail FROM audit WHERE detail LIKE 'audit trail break%'"
    ).fetchall()
    assert (actor, detail) == (f"user:{ADMIN}", "audit trail break acknowledged: 1 of 2")
    metrics = (await (await admin.get("/metrics")).get_data()).decode()
    assert "appliance_audit_trail_breaks 2.0" in metrics
    assert "appliance_audit_trail_breaks_unacknowledged 1.0" in metrics

    body = await (await admin.get("/sync/")).get_data()
    response = await admin.post(
        "/sync/trail-breaks/acknowledge", form={"csrf_token": form_token(body), "seen": "2"}
    )
    page = (await (await admin.get(response.headers["Location"])).get_data()).decode()
    said = page.split('id="trail-breaks"')[1].split("</div>")[0]
    assert "state-bad" not in said
    assert "2 audit trail breaks found by the export, all acknowledged" in said
    raw.close()


async def test_sync_gauges_match_the_database(
    client: QuartClient, store: Store, db_path: Path, clock: FakeClock
) -> None:
    await _backlog(store, db_path, clock)
    clock.advance(5)
    response = await client.get("/metrics")
    families = {
        f.name: f for f in text_string_to_metric_families((await response.get_data()).decode())
    }

    def value(name: str, **labels: str) -> float:
        for sample in families[name].samples:
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
        raise AssertionError(f"{name} {labels} missing")

    assert value("appliance_outbox_pending", lane="clinical") == 2
    assert value("appliance_outbox_lane_oldest_pending_age_seconds", lane="clinical") > 0
    assert value("appliance_outbox_lane_oldest_pending_age_seconds", lane="alerts") == 0
    assert value("appliance_outbox_dead_letters") == 1
    assert value("appliance_sync_reviews_open") == 0
    delivered = datetime(2026, 11, 26, 8, 0, tzinfo=UTC).timestamp()
    assert value("appliance_sync_last_success_timestamp_seconds") == delivered
    assert value("appliance_sync_online") == 1
    raw = sqlite3.connect(db_path)
    head = raw.execute("SELECT max(id) FROM audit").fetchone()[0]
    raw.close()
    assert value("appliance_audit_export_lag_records") == head
    assert value("appliance_audit_trail_breaks") == 0
    clock.advance(60)  # the heartbeat goes stale: no longer online
    response = await client.get("/metrics")
    assert b"appliance_sync_online 0.0" in await response.get_data()


async def test_claims_and_the_audit_export_show_what_waits_for_them_not_empty_lanes(
    logged_in: QuartClient, db_path: Path, kek_path: Path, clock: FakeClock
) -> None:
    # Two days ago, and the payer down since: two ready, one in review.
    earlier = await Store.open(db_path, kek_path, clock=lambda: clock() - timedelta(days=2))
    try:
        await claims_for_the_payer(earlier)
    finally:
        await earlier.close()
    page = (await (await logged_in.get("/sync/")).get_data()).decode()
    claims = page.split('id="claims">')[1].split("</td>")[0]
    assert "2 ready to submit to the payer" in claims
    assert "(the oldest for 2 d" in claims
    assert "1 in review" in claims
    # Before: "claims 0 –" in the lanes, while claims waited days for the payer.
    lanes = page.split('id="lanes">')[1].split("</table>")[0]
    assert 'data-lane="clinical"' in lanes
    assert 'data-lane="claims"' not in lanes
    assert 'data-lane="audit"' not in lanes
    audit_export = page.split('id="audit-export">')[1].split("</td>")[0]
    assert "(the oldest for " in audit_export
    clock.advance(60)
    families = {
        f.name: f
        for f in text_string_to_metric_families(
            (await (await logged_in.get("/metrics")).get_data()).decode()
        )
    }

    def value(name: str, **labels: str) -> float:
        for sample in families[name].samples:
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
        raise AssertionError(f"{name} {labels} missing")

    assert value("appliance_claims_ready") == 2
    assert value("appliance_claims_in_review") == 1
    assert value("appliance_claims_oldest_ready_age_seconds") == pytest.approx(2 * 86400, abs=3700)
    assert value("appliance_audit_export_oldest_age_seconds") >= 60
    assert value("appliance_outbox_pending", lane="claims") == 0  # the outbox's, as ever


def test_every_failure_class_has_words_for_the_page() -> None:
    from sync_agent.upstream import Failure
    from web.sync import FAILURE_TEXT

    step_classes = {status_figures.REFUSED, status_figures.UNORDERED}
    assert {str(f) for f in Failure} | {"store", "unreachable"} | step_classes == set(FAILURE_TEXT)


async def test_records_held_twice_upstream_are_listed_and_an_admin_clears_the_list(
    admin: QuartClient, db_path: Path, clock: FakeClock
) -> None:
    body = (await (await admin.get("/sync/")).get_data()).decode()
    assert body.split('id="twins">')[1].split("</td>")[0].strip() == "None"
    raw = sqlite3.connect(db_path)
    with raw:
        pull_twins.note_twins(
            raw,
            [pull_twins.Twin("Patient/77", "Patient/01a2-local", "2026-11-26T08:00:00Z")],
        )
    page = (await (await admin.get("/sync/")).get_data()).decode()
    said = page.split('id="twins">')[1].split("</td>")[0]
    assert "1 EHR record not pulled" in said
    assert "<code>Patient/77</code> names <code>Patient/01a2-local</code>" in said
    response = await admin.post("/sync/twins/clear", form={"csrf_token": form_token(page.encode())})
    assert response.status_code == 303
    page = (await (await admin.get("/sync/")).get_data()).decode()
    assert page.split('id="twins">')[1].split("</td>")[0].strip() == "None"
    [(actor, detail)] = raw.execute(
        "SELECT actor, detail FROM audit WHERE detail LIKE 'records held twice%'"
    ).fetchall()
    raw.close()
    assert actor == f"user:{ADMIN}"
    assert "Patient/77" in detail


async def test_a_nurse_sees_records_held_twice_but_cannot_clear_them(
    logged_in: QuartClient, db_path: Path
) -> None:
    raw = sqlite3.connect(db_path)
    with raw:
        pull_twins.note_twins(
            raw, [pull_twins.Twin("Patient/77", "Patient/01a2-local", "2026-11-26T08:00:00Z")]
        )
    raw.close()
    page = (await (await logged_in.get("/sync/")).get_data()).decode()
    assert "1 EHR record not pulled" in page
    assert "Clear the list" not in page
    response = await logged_in.post(
        "/sync/twins/clear", form={"csrf_token": form_token(page.encode())}
    )
    assert response.status_code == 403


async def test_items_the_ehr_keeps_failing_are_shown_and_an_admin_opens_the_last_answer(
    admin: QuartClient, store: Store, db_path: Path, clock: FakeClock
) -> None:
    await _backlog(store, db_path, clock)
    raw = sqlite3.connect(db_path)
    with raw:
        # Outbox item 2 (a reading): its entry answered 403 five times, never dead-lettered.
        said = "entry HTTP 403: scope system/Observation.write not granted for Zzyzxmarker"
        raw.execute(
            "UPDATE outbox SET attempts = 5, last_error = ? WHERE id = 2",
            (store.keyring.seal("outbox", "2", said),),
        )
    raw.close()
    page = await admin.get("/sync/")
    body = (await page.get_data()).decode()
    # Before: nothing showed a pending item's error; staff saw only the oldest item's age.
    assert "1 item the EHR keeps answering with an error" in body
    assert "the oldest: Observation, tried 5 times" in body
    assert "Zzyzxmarker" not in body
    reads = _audit_count(db_path, "read")
    opened = await admin.post(
        "/sync/failing/message", form={"csrf_token": form_token(body.encode())}
    )
    assert opened.status_code == 200
    assert said in (await opened.get_data()).decode()
    assert _audit_count(db_path, "read") == reads + 1
    metrics = (await admin.get("/metrics")).get_data()
    families = {f.name: f for f in text_string_to_metric_families((await metrics).decode())}
    assert families["appliance_outbox_failing_items"].samples[0].value == 1
    cli_json = await db.run_sync(store.connection, status_module.read_status, clock())
    assert (cli_json.failing.count, cli_json.failing.oldest) == (1, 2)


async def test_a_nurse_sees_failing_items_but_cannot_open_their_message(
    logged_in: QuartClient, store: Store, db_path: Path, clock: FakeClock
) -> None:
    await _backlog(store, db_path, clock)
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute(
            "UPDATE outbox SET attempts = 4, last_error = ? WHERE id = 2",
            (store.keyring.seal("outbox", "2", "entry HTTP 500"),),
        )
    raw.close()
    body = (await (await logged_in.get("/sync/")).get_data()).decode()
    assert "1 item the EHR keeps answering with an error" in body
    assert "Show its message" not in body
    refused = await logged_in.post(
        "/sync/failing/message", form={"csrf_token": form_token(body.encode())}
    )
    assert refused.status_code == 403
