"""``appliance sync status`` and ``sync once``: the real entry point over a demo site."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import socket
import sqlite3
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from appliance.cli import main
from appliance.store import Lane, Store
from sync_agent.lease import SyncLease
from tests import factories
from tests.fhir_peer.peer import FhirPeer
from tests.sync_agent.test_status import claims_for_the_payer
from tests.tamper import unguarded

SECRET = "Refused: family name Zzyzxmarkerfamily is not allowed"


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("APPLIANCE_DEMO_UPSTREAM", raising=False)
    assert main(["init", "--demo", str(tmp_path)]) == 0
    return tmp_path


def _db(site: Path) -> Path:
    return site / "appliance.db"


def _fill(site: Path, *, dead_letter: bool = True) -> None:
    """A patient and two readings (one in the alerts lane); the patient dead-lettered."""

    async def go() -> None:
        store = await Store.open(_db(site), site / "keys" / "kek")
        try:
            [pat] = await store.create([factories.patient()], "user:nurse1")
            ref = f"Patient/{pat.logical_id}"
            await store.create([factories.bp_observation(ref)], "service:devices")
            await store.create([factories.bp_observation(ref)], "service:devices", lane=Lane.ALERTS)
            sealed = store.keyring.seal("outbox", "1", SECRET)
        finally:
            await store.close()
        if not dead_letter:
            return
        raw = sqlite3.connect(_db(site))
        with raw:
            raw.execute("UPDATE outbox SET state = 'dead', last_error = ? WHERE id = 1", (sealed,))
        raw.close()

    asyncio.run(go())


def _heartbeat(site: Path, figures: dict[str, object]) -> None:
    """The sync process's heartbeat with these figures, as it publishes them."""
    now = datetime.now(UTC).isoformat()
    raw = sqlite3.connect(_db(site))
    with raw:
        raw.execute(
            "INSERT OR REPLACE INTO heartbeats (process, pid, started_at, beat_at, status) "
            "VALUES ('sync', 1, ?, ?, ?)",
            (now, now, json.dumps(figures)),
        )
    raw.close()


def _filled_with_the_peer(site: Path, monkeypatch: pytest.MonkeyPatch, fhir_peer: FhirPeer) -> None:
    """A patient and two readings waiting (:func:`_fill`), the demo's upstream the peer."""
    fhir_peer.reset()
    _fill(site, dead_letter=False)
    monkeypatch.setenv("APPLIANCE_DEMO_UPSTREAM", fhir_peer.base_url)


def _audit_reads(site: Path) -> list[tuple[str, str]]:
    raw = sqlite3.connect(_db(site))
    try:
        return raw.execute(
            "SELECT actor, entity FROM audit WHERE action = 'read' ORDER BY id"
        ).fetchall()
    finally:
        raw.close()


def test_status_as_json_matches_the_database_and_hides_messages(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fill(site)
    capsys.readouterr()
    assert main(["sync", "status", "--format", "json", "--demo", str(site)]) == 0
    status = json.loads(capsys.readouterr().out)
    lanes = {lane["lane"]: lane for lane in status["lanes"]}
    assert lanes["clinical"]["waiting"] == 1
    assert lanes["alerts"]["waiting"] == 1
    assert lanes["clinical"]["dead"] == 1
    assert lanes["alerts"]["oldest_age_s"] is not None
    assert lanes["claims"]["oldest_age_s"] is None
    assert status["waiting"] == 2
    assert status["dead_total"] == 1
    assert status["reviews_open"] == 0
    assert status["online"] is False
    assert status["sync_process"] is None
    assert status["last_success"] is None
    assert status["audit_export"]["lag"] == status["audit_export"]["head"] > 0
    assert status["dead_letters"] == [
        {
            "outbox_id": 1,
            "lane": "clinical",
            "type": "Patient",
            "attempts": 0,
            "error": None,
        }
    ]
    assert SECRET not in json.dumps(status)
    assert _audit_reads(site) == []


def test_show_errors_opens_the_messages_and_audits_it(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fill(site)
    capsys.readouterr()
    assert main(["sync", "status", "--format", "table", "--show-errors", "--demo", str(site)]) == 0
    out = capsys.readouterr().out
    assert SECRET in out
    [(actor, entity)] = _audit_reads(site)
    assert actor.startswith("service:cli:")
    assert entity == "outbox/1"


def test_status_table_is_readable(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fill(site)
    capsys.readouterr()
    assert main(["sync", "status", "--format", "table", "--demo", str(site)]) == 0
    out = capsys.readouterr().out
    assert "Upstream       unknown: the sync process has never run" in out
    assert "Dead letters   1" in out
    assert "Waiting        2" in out
    clinical = next(line for line in out.splitlines() if line.startswith("clinical"))
    assert clinical.split()[1] == "1"
    assert "--show-errors" in out
    assert SECRET not in out


def test_status_table_names_a_pull_the_ehr_refuses(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    figures = {
        "upstream": "ehr",
        "online": True,
        "steps_failing": {"pull": "refused"},
        "pull_refused": 1,
        "pull_stuck": False,
    }
    _heartbeat(site, figures)  # after a pass whose Appointment search got a 403
    capsys.readouterr()
    assert main(["sync", "status", "--format", "table", "--demo", str(site)]) == 0
    out = capsys.readouterr().out
    # Before: "online (ehr)" and nothing about the pull.
    assert "Held back      pull (refused): backing off" in out
    assert "Pull           1 search(es) refused by the EHR in the last pass" in out
    assert "cannot get past" not in out
    assert "did not sort" not in out


def test_status_table_names_pages_the_ehr_did_not_sort_apart_from_refusals(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    figures = {
        "upstream": "ehr",
        "online": True,
        "steps_failing": {"pull": "unordered"},
        "pull_unordered": 2,
    }
    _heartbeat(
        site, figures
    )  # after a pass whose pages came in another order than asked (_sort ignored)
    capsys.readouterr()
    assert main(["sync", "status", "--format", "table", "--demo", str(site)]) == 0
    out = capsys.readouterr().out
    # Before: only "Held back pull (unordered)", with no count and no word of what to do.
    assert "Pull           2 page(s) the EHR did not sort or filter as asked" in out
    assert "refused by the EHR" not in out


def test_status_table_says_the_sync_process_is_paused_while_sync_once_sends(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paused_since = datetime.now(UTC) - timedelta(minutes=12)
    _heartbeat(site, {"upstream": "ehr", "online": True, "paused_since": paused_since.isoformat()})
    capsys.readouterr()
    assert main(["sync", "status", "--format", "table", "--demo", str(site)]) == 0
    out = capsys.readouterr().out
    assert "Paused         for 12 min: appliance sync once is sending" in out
    # Started while sync once sends: no round has run, and that is why (not "starting").
    _heartbeat(site, {"upstream": "ehr", "paused_since": paused_since.isoformat()})
    assert main(["sync", "status", "--format", "table", "--demo", str(site)]) == 0
    assert "Upstream       paused (ehr; not checked yet: sync once is sending)" in (
        capsys.readouterr().out
    )
    _heartbeat(site, {"upstream": "ehr", "online": True, "paused_since": None})
    assert main(["sync", "status", "--format", "table", "--demo", str(site)]) == 0
    assert "Paused" not in capsys.readouterr().out


def test_status_shows_the_claims_queue_and_the_audit_export_not_their_empty_lanes(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def fill() -> None:
        store = await Store.open(_db(site), site / "keys" / "kek")
        try:
            await claims_for_the_payer(store)  # the payer down: two ready, one in review
        finally:
            await store.close()

    asyncio.run(fill())
    capsys.readouterr()
    assert main(["sync", "status", "--format", "table", "--demo", str(site)]) == 0
    out = capsys.readouterr().out
    # Before: "claims 0 -" among the lanes, whatever waited for the payer.
    claims = next(line for line in out.splitlines() if line.startswith("Claims "))
    assert "2 ready to submit to the payer (the oldest for " in claims
    assert "1 in review" in claims
    lanes = [line.split()[0] for line in out.split("Lane ")[1].splitlines()[1:] if line]
    assert lanes == ["alerts", "clinical"]
    audit_line = next(line for line in out.splitlines() if line.startswith("Audit export"))
    assert ", the oldest for " in audit_line
    assert main(["sync", "status", "--format", "json", "--demo", str(site)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["claims"]["ready"] == 2
    assert status["claims"]["in_review"] == 1
    assert status["claims"]["oldest_ready_age_s"] is not None
    assert status["audit_export"]["oldest_age_s"] is not None
    # The JSON's lanes stay those of the outbox, all four (scripts read them).
    assert [lane["lane"] for lane in status["lanes"]] == ["alerts", "claims", "clinical", "audit"]


def test_once_without_an_upstream_is_one_line_and_exit_2(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sync", "once", "--demo", str(site)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no [[sync.upstream]]" in err
    assert "\n" not in err


def test_once_with_the_link_down_exits_2_with_the_reason(
    site: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill(site)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("APPLIANCE_DEMO_UPSTREAM", f"http://127.0.0.1:{port}/fhir")
    capsys.readouterr()
    assert main(["sync", "once", "--quiet", "--demo", str(site)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "link is down" in err
    assert "cannot connect" in err
    assert "\n" not in err
    assert json.loads(captured.out)["delivered"] == 0


@pytest.mark.peer
def test_once_drains_the_outbox_and_the_audit_trail_then_reports_nothing_waiting(
    site: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    fhir_peer: FhirPeer,
) -> None:
    _filled_with_the_peer(site, monkeypatch, fhir_peer)
    capsys.readouterr()
    assert main(["sync", "once", "--demo", str(site)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["delivered"], summary["dead"]) == (3, 0)
    assert fhir_peer.count("Observation") == 2
    assert fhir_peer.count("AuditEvent") == summary["audit_export"]["exported"] > 0
    assert main(["sync", "status", "--format", "json", "--demo", str(site)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["last_success"] is not None
    assert status["audit_export"]["lag"] == 0  # the delivery's sync record went up too


@pytest.mark.peer
def test_once_waits_for_the_sync_process_round_under_way_and_says_so(
    site: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    fhir_peer: FhirPeer,
) -> None:
    _filled_with_the_peer(site, monkeypatch, fhir_peer)
    # The sync process in a round: its hold on the sync lease (an flock on its own open file,
    # which excludes another open of it in this process as in another). The round ends when
    # sync once has found the lease taken: whatever the load, it meets the round under way.
    held = os.open(site / "appliance.db.sync-lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    sent_before_the_round_ended: list[int] = []
    try_lock = SyncLease._try_lock

    def trying(lease: SyncLease) -> int | None:
        fd = try_lock(lease)
        if fd is None and not sent_before_the_round_ended:
            sent_before_the_round_ended.append(fhir_peer.count("Observation"))
            os.close(held)  # the round ends: the lock goes with it
        return fd

    monkeypatch.setattr(SyncLease, "_try_lock", trying)
    capsys.readouterr()
    assert main(["sync", "once", "--demo", str(site)]) == 0
    captured = capsys.readouterr()
    assert "the sync process is sending; waiting for its round to end" in captured.err
    summary = json.loads(captured.out)
    assert (summary["delivered"], summary["dead"]) == (3, 0)
    assert sent_before_the_round_ended == [0]  # nothing went beside the sync process
    assert fhir_peer.count("Observation") == 2


def test_resend_puts_dead_letters_back_audited_and_says_what_it_did(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fill(site)
    capsys.readouterr()
    assert main(["sync", "resend", "--demo", str(site)]) == 2  # neither items nor --all
    assert "--all" in capsys.readouterr().err
    assert main(["sync", "resend", "1", "--demo", str(site)]) == 0
    assert "1 dead letter back in the outbox" in capsys.readouterr().out
    raw = sqlite3.connect(_db(site))
    try:
        assert raw.execute("SELECT state, last_error FROM outbox WHERE id = 1").fetchone() == (
            "pending",
            None,
        )
        [(actor, entity)] = raw.execute(
            "SELECT actor, entity FROM audit WHERE detail = 'dead letter sent again'"
        ).fetchall()
    finally:
        raw.close()
    assert actor.startswith("service:cli:")
    assert entity == "outbox/1"
    # Not a dead letter any more: exit 2, naming it.
    assert main(["sync", "resend", "1", "--demo", str(site)]) == 2
    err = capsys.readouterr().err
    assert "not dead letters" in err
    assert err.rstrip().endswith(": 1")
    assert main(["sync", "resend", "--all", "--demo", str(site)]) == 0
    assert "0 dead letters back in the outbox" in capsys.readouterr().out


@pytest.mark.peer
def test_audit_verify_holds_the_trail_to_every_anchor_upstream(
    site: Path,
    fhir_peer: FhirPeer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from datetime import UTC, datetime

    from appliance import audit, db

    def checkpoint() -> None:
        async def go() -> None:
            store = await Store.open(_db(site), site / "keys" / "kek")
            signer = store.keyring.signing_key
            await db.run_sync(store.connection, audit.checkpoint, signer, now=datetime.now(UTC))
            await store.close()

        asyncio.run(go())

    _filled_with_the_peer(site, monkeypatch, fhir_peer)
    checkpoint()
    assert main(["sync", "once", "--quiet", "--demo", str(site)]) == 0
    capsys.readouterr()
    assert main(["audit", "verify", "--quiet", "--demo", str(site)]) == 0
    assert "held to the 1 checkpoint anchors" in capsys.readouterr().out

    # Cut back past the anchor with its checkpoints, grown again, anchored anew.
    raw = sqlite3.connect(_db(site))
    head = raw.execute("SELECT max(audit_id) FROM audit_checkpoints").fetchone()[0]
    raw.close()
    unguarded(
        _db(site), f"DELETE FROM audit WHERE id > {head - 3}", "DELETE FROM audit_checkpoints"
    )
    _fill(site, dead_letter=False)
    checkpoint()
    assert main(["sync", "once", "--quiet", "--demo", str(site)]) == 0
    capsys.readouterr()
    # The export itself found it when it ran, and says so until someone looks.
    assert main(["sync", "status", "--format", "json", "--demo", str(site)]) == 0
    assert json.loads(capsys.readouterr().out)["audit_export"]["breaks"] == 1
    assert main(["sync", "status", "--format", "table", "--demo", str(site)]) == 0
    assert "TRAIL CUT BACK OR REWRITTEN 1 time(s)" in capsys.readouterr().out
    assert main(["audit", "verify", "--quiet", "--local", "--demo", str(site)]) == 0
    assert "upstream anchors not checked" in capsys.readouterr().err
    # Before: only the local chain (intact as far as it goes) was verified.
    assert main(["audit", "verify", "--quiet", "--demo", str(site)]) == 1
    err = capsys.readouterr().err
    assert f"upstream anchor (record {head}" in err
    # Looked into and reported: acknowledged, the warning goes, the count stays.
    assert main(["audit", "acknowledge", "--demo", str(site)]) == 0
    assert "1 audit trail break(s) acknowledged" in capsys.readouterr().out
    assert main(["audit", "acknowledge", "--demo", str(site)]) == 0
    assert "nothing to acknowledge" in capsys.readouterr().out
    assert main(["sync", "status", "--format", "table", "--demo", str(site)]) == 0
    table = capsys.readouterr().out
    assert "TRAIL CUT BACK" not in table
    assert "1 trail break(s), acknowledged" in table


@pytest.mark.peer
def test_once_prints_the_class_of_a_refusal_never_the_servers_words(
    site: Path,
    fhir_peer: FhirPeer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _filled_with_the_peer(site, monkeypatch, fhir_peer)
    capsys.readouterr()
    # The server's OperationOutcome quotes what it refused; a 401 stops the run.
    fhir_peer.fault("status", status=401, count=100)
    try:
        assert main(["sync", "once", "--quiet", "--demo", str(site)]) == 2
    finally:
        fhir_peer.clear_fault()
    captured = capsys.readouterr()
    assert json.loads(captured.out)["error"] == "auth"
    assert captured.err.strip().endswith("the upstream link is down: auth")
    # Before: the server's diagnostics (the peer's "injected fault: status 401" here, a
    # name and birth date from a real EHR) were printed as they came.
    assert "injected fault" not in captured.out + captured.err


def _on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> Callable[[], str]:
    """Give the command a real pseudo-terminal for stderr (its progress bar shows only on
    one); returns what was written there, once the command is done."""
    master, slave = os.openpty()
    seen: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other side is closed
                return
            if not chunk:
                return
            seen.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    terminal = open(slave, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed below
    monkeypatch.setattr(sys, "stderr", terminal)

    def written() -> str:
        terminal.close()
        reader.join(5)
        os.close(master)
        return b"".join(seen).decode(errors="replace")

    return written


async def _edit_and_delay(site: Path) -> None:
    """A local edit of the patient, and a new reading waiting out a retry delay an earlier
    answer left it (an hour: far longer than the command takes)."""
    store = await Store.open(_db(site), site / "keys" / "kek")
    try:
        [(logical_id,)] = await store.query(
            "SELECT logical_id FROM resources WHERE type = 'Patient'"
        )
        body = dict(await store.read("Patient", logical_id, "user:nurse1"))
        body["name"] = [{"family": "Zzyzxeditedfamily", "given": ["Jo"]}]
        await store.update("Patient", logical_id, body, "user:nurse1")
        [reading] = await store.create(
            [factories.bp_observation(f"Patient/{logical_id}")], "service:devices"
        )
    finally:
        await store.close()
    later = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    raw = sqlite3.connect(_db(site))
    with raw:
        raw.execute(
            "UPDATE outbox SET next_attempt_at = ?, attempts = 1 WHERE resource_id = "
            "(SELECT id FROM resources WHERE logical_id = ?)",
            (later, reading.logical_id),
        )
    raw.close()


def _pending(site: Path) -> list[tuple[str, int]]:
    raw = sqlite3.connect(_db(site))
    try:
        return raw.execute(
            "SELECT kind, count(*) FROM outbox WHERE state = 'pending' GROUP BY kind"
        ).fetchall()
    finally:
        raw.close()


@pytest.mark.peer
def test_once_sends_edits_and_items_waiting_out_a_retry_as_sync_now_does(
    site: Path,
    fhir_peer: FhirPeer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _filled_with_the_peer(site, monkeypatch, fhir_peer)
    assert main(["sync", "once", "--quiet", "--demo", str(site)]) == 0
    asyncio.run(_edit_and_delay(site))
    capsys.readouterr()
    written = _on_a_terminal(monkeypatch)
    assert main(["sync", "once", "--demo", str(site)]) == 0
    bar = written()
    summary = json.loads(capsys.readouterr().out)
    # Before: only the creates due now went; the edit never, the delayed reading not until
    # its hour was up, and the bar stopped short of its total with exit 0.
    assert _pending(site) == []
    assert (summary["delivered"], summary["updates"]["delivered"]) == (1, 1)
    assert summary["waiting"] == 0
    found = httpx.get(
        f"{fhir_peer.base_url}/Patient", params={"family": "Zzyzxeditedfamily"}
    ).json()
    assert len(found.get("entry", [])) == 1
    done, total = map(int, re.findall(r"(\d+)/(\d+) \[", bar)[-1])
    assert done == total >= 2  # the edit and the reading, then the audit records
    assert "Zzyzx" not in bar


@pytest.mark.peer
def test_once_that_leaves_items_waiting_says_how_many_and_why_and_exits_3(
    site: Path,
    fhir_peer: FhirPeer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fhir_peer.reset()
    for _ in range(5):
        _fill(site, dead_letter=False)  # 15 items: two bundles of at most 8
    monkeypatch.setenv("APPLIANCE_DEMO_UPSTREAM", fhir_peer.base_url)
    capsys.readouterr()
    assert main(["sync", "once", "--quiet", "--max-bundles", "1", "--demo", str(site)]) == 3
    captured = capsys.readouterr()
    left = json.loads(captured.out)["waiting"]
    assert left == sum(count for _, count in _pending(site)) > 0
    # Before: exit 0, and not a word of what was left.
    err = captured.err.strip()
    assert err == (
        f"appliance: {left} items still waiting: {left} not sent (--max-bundles reached) "
        "(see appliance sync status)"
    )
    assert main(["sync", "once", "--quiet", "--demo", str(site)]) == 0
    assert _pending(site) == []
