"""The walking skeleton, end to end, with the real processes and a real FHIR server.

`appliance run` starts web, devices and sync under the supervisor; the simulated cuff takes
readings; a logged-in nurse's live page receives them over server-sent events; the sync
process delivers them to the Medplum peer on loopback as conditional creates. Then SIGTERM
stops everything cleanly, and nothing acknowledged is lost.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from appliance.cli import main as cli
from services import demo
from tests import factories
from tests.fhir_peer.peer import FhirPeer

REPO = Path(__file__).resolve().parents[2]

SITE = (
    factories.SITE_TOML.replace("office", "rhc")
    + """
[web]
host = "127.0.0.1"
port = {port}

[devices]
simulated = true
simulated_interval_s = 0.3

[sync]
interval_s = 0.5

[[sync.upstream]]
name = "ehr"
base_url = "{base_url}"
max_bundle_entries = 8
"""
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _login(client: httpx.Client, username: str, password: str) -> None:
    page = client.get("/login")
    token = re.search(r'name="csrf_token"\s+value="([^"]+)"', page.text)
    assert token, "login form has no CSRF token"
    response = client.post(
        "/login", data={"username": username, "password": password, "csrf_token": token.group(1)}
    )
    assert response.status_code in (200, 302, 303), response.status_code
    assert client.get("/nurse/").status_code == 200


@pytest.mark.slow
@pytest.mark.peer
def test_reading_travels_from_cuff_to_nurse_screen_to_upstream(
    tmp_path: Path, fhir_peer: FhirPeer
) -> None:
    fhir_peer.reset()
    port = _free_port()
    site = tmp_path / "site.toml"
    site.write_text(SITE.format(port=port, base_url=fhir_peer.base_url))
    assert cli(["init", "--dev-key", "--config", str(site)]) == 0
    password = tmp_path / "pw"
    password.write_text("a-long-nurse-password")
    assert (
        cli(
            [
                "users",
                "add",
                "nurse1",
                "--role",
                "nurse",
                "--password-file",
                str(password),
                "--config",
                str(site),
            ]
        )
        == 0
    )

    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "run", "--config", str(site)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=5.0, follow_redirects=True) as client:

            def healthy() -> bool:
                try:
                    return client.get("/healthz").status_code == 200
                except httpx.TransportError:
                    return False

            _wait(healthy, 60, "/healthz to report web, devices and sync healthy")
            health = client.get("/healthz").json()
            assert set(health["processes"]) >= {"web", "devices", "sync"}

            _login(client, "nurse1", "a-long-nurse-password")
            received: list[dict[str, object]] = []
            with client.stream("GET", "/nurse/events", timeout=10.0) as stream:
                start = time.monotonic()
                for line in stream.iter_lines():
                    if line.startswith("data:"):
                        received.append(json.loads(line[5:]))
                        break
                    assert time.monotonic() - start < 10, "no live reading within 10 s"
            event = received[0]
            assert "systolic" in event
            assert "diastolic" in event

            _wait(
                lambda: fhir_peer.count("Observation") >= 2, 30, "readings to reach the FHIR server"
            )
            # The synthetic demo patients (clinic and home-monitored), once each.
            demo_patients = demo.PATIENT_COUNT
            _wait(lambda: fhir_peer.count("Patient") >= demo_patients, 30, "every demo patient")
            assert fhir_peer.count("Patient") == demo_patients
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out

    # After a clean stop: everything acknowledged is in the store, every delivered item is
    # upstream exactly once, and the audit trail verifies.
    import sqlite3

    conn = sqlite3.connect(tmp_path / "data" / "appliance.db")
    delivered = conn.execute(
        "SELECT count(*) FROM outbox o JOIN resources r ON r.id = o.resource_id "
        "WHERE o.state = 'delivered' AND r.type = 'Observation'"
    ).fetchone()[0]
    conn.close()
    assert fhir_peer.count("Observation") == delivered
    assert cli(["audit", "verify", "--quiet", "--config", str(site)]) == 0
