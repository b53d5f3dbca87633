"""The pre-call check's endpoints: staff only, bounded, never cached, and the upstream's state."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

from quart.testing import QuartClient

from tests.web.conftest import FakeClock


def _csrf(page: bytes) -> str:
    found = re.search(rb'<meta name="csrf-token" content="([^"]+)"', page)
    assert found, "the page carries the session's CSRF token"
    return found.group(1).decode()


async def test_anonymous_browsers_are_sent_to_log_in_and_uploads_refused(
    client: QuartClient,
) -> None:
    for path in ("/precall/", "/precall/ping", "/precall/sample", "/precall/upstream"):
        response = await client.get(path)
        assert response.status_code == 302, path
        assert response.headers["Location"].startswith("/login")
    assert (await client.post("/precall/sample", data=b"x" * 10)).status_code == 401


async def test_the_page_and_its_probes_are_never_cached(logged_in: QuartClient) -> None:
    page = await logged_in.get("/precall/")
    assert page.status_code == 200
    body = (await page.get_data()).decode()
    assert "Pre-call check" in body
    assert "/static/precall.js" in body
    ping = await logged_in.get("/precall/ping")
    assert ping.status_code == 204
    assert ping.headers["Cache-Control"] == "no-store"


async def test_download_samples_are_random_and_bounded(logged_in: QuartClient) -> None:
    first = await logged_in.get("/precall/sample?bytes=4096")
    second = await logged_in.get("/precall/sample?bytes=4096")
    assert first.status_code == second.status_code == 200
    one, two = await first.get_data(), await second.get_data()
    assert len(one) == len(two) == 4096
    assert one != two  # random bytes: no cache or compression can fake the rate
    assert first.headers["Cache-Control"] == "no-store"
    assert len(await (await logged_in.get("/precall/sample")).get_data()) == 1024 * 1024
    for bad in ("0", "-5", str(4 * 1024 * 1024 + 1), "lots", "%C2%B2"):  # ² is a digit
        assert (await logged_in.get(f"/precall/sample?bytes={bad}")).status_code == 400, bad


async def test_uploads_need_the_csrf_token_and_stay_under_the_request_cap(
    logged_in: QuartClient,
) -> None:
    token = _csrf(await (await logged_in.get("/precall/")).get_data())
    headers = {"Content-Type": "application/octet-stream"}
    refused = await logged_in.post("/precall/sample", data=b"\x01" * 1000, headers=headers)
    assert refused.status_code == 403
    headers["X-CSRF-Token"] = token
    taken = await logged_in.post("/precall/sample", data=b"\x01" * 64000, headers=headers)
    assert taken.status_code == 200
    assert await taken.get_json() == {"bytes": 64000}
    too_big = await logged_in.post("/precall/sample", data=b"\x01" * 70_000, headers=headers)
    assert too_big.status_code == 413


async def test_the_upstream_link_is_what_the_sync_process_last_published(
    logged_in: QuartClient, db_path: Path, clock: FakeClock
) -> None:
    nothing = await (await logged_in.get("/precall/upstream")).get_json()
    assert nothing["sync_running"] is False
    assert nothing["online"] is False
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute(
            "INSERT INTO heartbeats (process, pid, started_at, beat_at, status) "
            "VALUES ('sync', 1, ?, ?, ?)",
            (
                clock().isoformat(),
                clock().isoformat(),
                json.dumps({"upstream": "ehr", "online": True, "upstream_rtt_ms": 42.5}),
            ),
        )
    raw.close()
    link = await (await logged_in.get("/precall/upstream")).get_json()
    assert link["sync_running"] is True
    assert link["online"] is True
    assert link["upstream"] == "ehr"
    assert link["rtt_ms"] == 42.5
    assert link["waiting"] == 0
    clock.advance(60)  # the heartbeat goes stale: the sync process is not answering
    stale = await (await logged_in.get("/precall/upstream")).get_json()
    assert stale["sync_running"] is False
    assert stale["online"] is False
