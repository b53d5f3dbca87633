"""/healthz and /metrics over a real store, and the security headers of every page."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from quart.testing import QuartClient

from appliance.store import Store
from tests import factories
from tests.web.conftest import FakeClock, form_token

EXPECTED_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def _beat(db_path: Path, clock: FakeClock, *processes: str) -> None:
    conn = sqlite3.connect(db_path)
    with conn:
        for process in processes:
            conn.execute(
                "INSERT OR REPLACE INTO heartbeats (process, pid, started_at, beat_at, status) "
                "VALUES (?, 4242, ?, ?, '{}')",
                (process, clock().isoformat(), clock().isoformat()),
            )
    conn.close()


async def test_healthz_is_503_while_processes_are_missing(client: QuartClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 503
    body = await response.get_json()
    assert body["status"] == "degraded"
    assert body["processes"]["devices"] == {"pid": None, "age_s": None, "status": "missing"}
    assert body["database"] == "ok"
    assert body["outbox"] == {"pending": 0, "oldest_pending_age_s": None, "dead": 0}


async def test_healthz_is_200_once_every_process_beats(
    client: QuartClient, db_path: Path, clock: FakeClock, store: Store
) -> None:
    _beat(db_path, clock, "web", "devices", "sync")
    await store.create([factories.patient()], "user:admin")
    clock.advance(3)
    response = await client.get("/healthz")
    assert response.status_code == 200
    body = await response.get_json()
    assert body["status"] == "ok"
    assert body["processes"]["sync"] == {"pid": 4242, "age_s": 3.0, "status": "ok"}
    assert body["outbox"]["pending"] == 1
    assert body["outbox"]["oldest_pending_age_s"] is not None


async def test_healthz_reports_a_stale_process(
    client: QuartClient, db_path: Path, clock: FakeClock
) -> None:
    _beat(db_path, clock, "web", "devices", "sync")
    clock.advance(16)
    response = await client.get("/healthz")
    assert response.status_code == 503
    body = await response.get_json()
    assert body["processes"]["web"]["status"] == "stale"


async def test_metrics_parse_and_carry_the_outbox_gauges(
    client: QuartClient, store: Store, db_path: Path, clock: FakeClock
) -> None:
    _beat(db_path, clock, "devices")
    [pat] = await store.create([factories.patient()], "user:admin")
    await store.create([factories.bp_observation(f"Patient/{pat.logical_id}")], "service:devices")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    families = {
        f.name: f for f in text_string_to_metric_families((await response.get_data()).decode())
    }
    pending = {s.labels["lane"]: s.value for s in families["appliance_outbox_pending"].samples}
    assert pending["clinical"] == 2
    assert pending["alerts"] == 0
    assert families["appliance_audit_records"].samples[0].value >= 2
    ages = {s.labels["process"] for s in families["appliance_heartbeat_age_seconds"].samples}
    assert ages == {"devices"}


async def test_every_page_carries_the_security_headers(logged_in: QuartClient) -> None:
    page = await logged_in.get("/nurse/")
    token = form_token(await page.get_data())
    pages = {
        "nurse": page,
        "login while logged in": await logged_in.get("/login"),
        "root": await logged_in.get("/"),
        "healthz": await logged_in.get("/healthz"),
        "metrics": await logged_in.get("/metrics"),
        "404": await logged_in.get("/no-such-page"),
        "403 (no CSRF token)": await logged_in.post("/logout"),
        "logout": await logged_in.post("/logout", form={"csrf_token": token}),
        "login form": await logged_in.get("/login"),
    }
    static = await logged_in.get("/static/app.css")
    for name, response in [*pages.items(), ("static", static)]:
        headers = response.headers
        assert headers["Content-Security-Policy"] == EXPECTED_CSP, name
        assert headers["X-Content-Type-Options"] == "nosniff", name
        assert headers["Referrer-Policy"] == "no-referrer", name
        assert headers["X-Frame-Options"] == "DENY", name
        assert headers["Strict-Transport-Security"].startswith("max-age="), name
    # Every page may carry PHI; only the static assets may be cached.
    for name, response in pages.items():
        assert response.headers.get("Cache-Control") == "no-store", name
    assert static.headers.get("Cache-Control") != "no-store"


async def test_error_pages_show_no_internals(logged_in: QuartClient) -> None:
    response = await logged_in.get("/no-such-page")
    assert response.status_code == 404
    body = (await response.get_data()).decode()
    assert "There is no page at this address" in body
    assert "Traceback" not in body


async def test_pages_have_no_inline_script_or_style(logged_in: QuartClient) -> None:
    for path in ("/login", "/nurse/"):
        body = (await (await logged_in.get(path)).get_data()).decode()
        assert "<script>" not in body
        assert "<style" not in body
        assert " style=" not in body
        assert " onclick=" not in body
