"""kill -9 at random moments never loses an acknowledged write nor corrupts the database."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance import audit, db
from appliance.keys import load_keyring
from appliance.store import Store
from tests import factories

REPO = Path(__file__).resolve().parents[2]
KILLS = 32


@pytest.mark.slow
async def test_kill_9_loop_loses_nothing_acknowledged(db_path: Path, kek_path: Path) -> None:
    store = await Store.open(db_path, kek_path)
    [pat] = await store.create([factories.patient()], "user:nurse1")
    await store.close()
    rng = random.Random(9)
    acknowledged: list[str] = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for run in range(KILLS):
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.integration.ingest_child",
                str(db_path),
                str(kek_path),
                f"Patient/{pat.logical_id}",
                str(run),
            ],
            stdout=subprocess.PIPE,
            cwd=REPO,
            env=env,
            text=True,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "READY"
        time.sleep(rng.uniform(0.02, 0.4))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL
        # A line cut off mid-write by the kill was never fully acknowledged.
        lines = out.split("\n")
        acknowledged += [line for line in lines[:-1] if line]
    assert len(acknowledged) > KILLS  # the children really were writing when killed

    conn = db.connect_sync(db_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {row[0] for row in conn.execute("SELECT logical_id FROM resources")}
        missing = [lid for lid in acknowledged if lid not in stored]
        assert missing == []
        # Every stored reading has its outbox row (same transaction), and the audit chain
        # survived every crash intact.
        orphans = conn.execute(
            "SELECT count(*) FROM resources r LEFT JOIN outbox o ON o.resource_id = r.id WHERE o.id IS NULL"
        ).fetchone()[0]
        assert orphans == 0
        keyring = load_keyring(conn, kek_path.read_bytes())
        result = audit.verify(conn, keyring.signing_public_key)
        assert result.ok, result.problem
    finally:
        conn.close()
    reopened = await Store.open(db_path, kek_path)
    try:
        sample = random.Random(1).sample(acknowledged, min(20, len(acknowledged)))
        for logical_id in sample:
            assert (await reopened.read("Observation", logical_id, "user:nurse1"))[
                "id"
            ] == logical_id
    finally:
        await reopened.close()
