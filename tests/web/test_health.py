"""/healthz and /metrics over a real store, and the security headers of every page."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
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


async def test_an_odd_heartbeat_row_reads_stale_not_an_error(
    client: QuartClient, db_path: Path, clock: FakeClock
) -> None:
    _beat(db_path, clock, "web", "devices", "sync")
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute("UPDATE heartbeats SET beat_at = 'junk' WHERE process = 'devices'")
        conn.execute(  # no offset: not a time this appliance writes
            "UPDATE heartbeats SET beat_at = '2026-11-26T08:00:00' WHERE process = 'web'"
        )
        conn.execute(  # a day ahead: a clock set back since the process last beat
            "UPDATE heartbeats SET beat_at = ? WHERE process = 'sync'",
            ((clock() + timedelta(days=1)).isoformat(),),
        )
    conn.close()
    # Before: "Invalid isoformat string: 'junk'" as the database's state, every process
    # "missing" and no sync gauges; a time without offset was a 500; a future beat "ok".
    response = await client.get("/healthz")
    assert response.status_code == 503
    body = await response.get_json()
    assert body["database"] == "ok"
    assert {p: body["processes"][p]["status"] for p in ("web", "devices", "sync")} == {
        "web": "stale",
        "devices": "stale",
        "sync": "stale",
    }
    metrics = await (await client.get("/metrics")).get_data(as_text=True)
    assert "appliance_database_up 1.0" in metrics
    assert "appliance_sync_online 0.0" in metrics


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


async def test_metrics_carry_the_fleet_health_gauges(
    client: QuartClient, store: Store, db_path: Path, clock: FakeClock, tmp_path: Path
) -> None:
    """Open alerts by severity, devices last seen, the audit checkpoint, disk free (issue 9)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from appliance import audit
    from appliance.tls import ensure_dev_certificate
    from web.health import _certificate_days_left

    await store.create([factories.patient()], "user:admin")  # an audit record to sign
    stamp = clock().isoformat()
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("BEGIN")
    for patient, rule, severity, state in (
        ("p1", "bp-crisis", "critical", "open"),
        ("p2", "bp-crisis", "critical", "acknowledged"),
        ("p3", "spo2-low", "high", "open"),
        ("p4", "spo2-low", "high", "resolved"),
    ):
        conn.execute(
            "INSERT INTO alerts (patient_id, rule, severity, state, opened_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (patient, rule, severity, state, stamp, stamp),
        )
    earlier = (clock() - timedelta(seconds=90)).isoformat()
    for device, last_seen in (("dev-seen", earlier), ("dev-never", None)):
        conn.execute(
            "INSERT INTO devices (id, name, transport, profile, setting, last_seen, "
            "registered_at) VALUES (?, 'Cuff', 'simulated', 'blood-pressure', 'clinic', ?, ?)",
            (device, last_seen, stamp),
        )
    conn.execute("COMMIT")
    signed = audit.checkpoint(
        conn, Ed25519PrivateKey.generate(), now=clock() - timedelta(seconds=60)
    )
    assert signed is not None
    conn.close()
    await store.create([factories.patient()], "user:admin")  # an audit record after it

    response = await client.get("/metrics")
    families = {
        f.name: f for f in text_string_to_metric_families((await response.get_data()).decode())
    }
    alerts = {
        (s.labels["severity"], s.labels["state"]): s.value
        for s in families["appliance_alerts"].samples
    }
    assert alerts[("critical", "open")] == 1
    assert alerts[("critical", "acknowledged")] == 1
    assert alerts[("high", "open")] == 1
    assert alerts[("low", "open")] == 0
    assert all(state != "resolved" for _, state in alerts)
    seen = {
        s.labels["device"]: s.value
        for s in families["appliance_device_last_seen_age_seconds"].samples
    }
    assert seen == {"dev-seen": 90.0}
    assert families["appliance_devices_registered"].samples[0].value == 2
    assert families["appliance_audit_records_after_checkpoint"].samples[0].value >= 1
    assert families["appliance_audit_checkpoint_age_seconds"].samples[0].value == 60.0
    assert families["appliance_disk_free_bytes"].samples[0].value > 0
    # The demo config serves plain HTTP: no certificate, no gauge sample (not a made-up 0).
    assert families["appliance_certificate_days_left"].samples == []

    cert, _key = ensure_dev_certificate(tmp_path / "tls")
    days = _certificate_days_left(cert, clock())
    assert days is not None
    assert 300 < days < 3700
    assert _certificate_days_left(tmp_path / "missing.pem", clock()) is None


async def test_the_example_alert_rules_name_only_metrics_the_box_exports(
    client: QuartClient,
) -> None:
    """docs/monitoring/appliance-alerts.yml must not watch a metric that does not exist."""
    import re

    import yaml

    rules_file = Path(__file__).resolve().parents[2] / "docs/monitoring/appliance-alerts.yml"
    rules = yaml.safe_load(rules_file.read_text())["groups"][0]["rules"]
    text = (await (await client.get("/metrics")).get_data()).decode()
    exported = {f.name for f in text_string_to_metric_families(text)}
    named = {m for rule in rules for m in re.findall(r"\bappliance_[a-z_]+", rule["expr"])}
    assert len(rules) >= 10
    assert named, "the rules name no appliance metric"
    assert named <= exported, f"not exported: {sorted(named - exported)}"
