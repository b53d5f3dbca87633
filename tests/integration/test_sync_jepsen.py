"""Exactly-once delivery, Jepsen style: random link faults, kill -9, then count upstream.

The real sync process (``python -m sync_agent.process``) delivers a real store to the Medplum
peer through the fault proxy, which draws a fault for every request (reset before the server
sees it, answer dropped after the server applied it, answer cut mid-body, slow past the
timeout, 5xx, 429 with Retry-After, 413) and now and then refuses connections for a while.
Meanwhile the test keeps adding items and SIGKILLs the process, restarting it each time: at
random moments, and (every third kill) while the proxy holds one of its bundle POSTs, so the
server applies it after the process died and the answer never comes. Then the link heals and the outbox drains. The check is the history itself:
the identifiers upstream, counted one by one, are exactly the outbox's — none lost, none
twice.

Seeded (``SYNC_JEPSEN_SEED``, default 5) so a failure can be replayed.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from appliance import fhir
from appliance.cli import main as cli
from appliance.config import Config, load
from appliance.store import Lane, Store
from tests import factories
from tests.fhir_peer.peer import FhirPeer
from tests.sync_agent.fault_proxy import Fault, FaultSpec, ProxyThread

REPO = Path(__file__).resolve().parents[2]
BEFORE, DURING = 1_000, 500  # items queued before the first start, and while it runs
KILLS = 10  # at random moments
IN_FLIGHT_KILLS = 5  # and between them, while the proxy holds a bundle POST

SITE = (
    factories.SITE_TOML
    + """
[sync]
interval_s = 0.2

[[sync.upstream]]
name = "ehr"
base_url = "{base_url}"
max_bundle_entries = 10
timeout_s = 3
"""
)

FAULTS = {
    FaultSpec(Fault.NONE): 50,
    FaultSpec(Fault.RESET): 5,
    FaultSpec(Fault.DROP): 8,
    FaultSpec(Fault.DELAY, delay_s=0.3): 4,
    FaultSpec(Fault.DELAY, delay_s=3.5): 2,  # past the agent's 3 s timeout, applied anyway
    FaultSpec(Fault.STATUS, status=503): 5,
    FaultSpec(Fault.STATUS, status=500): 3,
    FaultSpec(Fault.STATUS, status=429, retry_after="0.5"): 3,
    FaultSpec(Fault.TOO_LARGE, max_body=6_000): 3,  # a gateway limit: ~5 readings
    FaultSpec(Fault.TRUNCATE): 5,
    FaultSpec(Fault.TRUNCATE, fix_length=True): 2,
}


async def _queue(config: Config, rng: random.Random, count: int, patients: list[str]) -> None:
    """Queue ``count`` items: new patients now and then, readings in every lane."""
    store = await Store.open(config.paths.database, config.keys.kek_file)
    try:
        made = 0
        while made < count:
            if not patients or rng.random() < 0.05:
                [pat] = await store.create(
                    [factories.patient(mrn=f"J{len(patients)}")], "user:nurse1", validate=False
                )
                patients.append(pat.logical_id)
                made += 1
            n = min(rng.randint(1, 12), count - made)
            ref = f"Patient/{rng.choice(patients)}"
            await store.create(
                [factories.bp_observation(ref, systolic=rng.randint(90, 190)) for _ in range(n)],
                "service:devices",
                lane=rng.choice(list(Lane)),
                validate=False,
            )
            made += n
    finally:
        await store.close()


def _start(site: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "sync_agent.process", "--config", str(site)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "APPLIANCE_LOG_LEVEL": "WARNING"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _outbox(db_path: Path) -> dict[str, str]:
    conn = sqlite3.connect(db_path)
    try:
        return dict(
            conn.execute(
                "SELECT r.logical_id, o.state FROM outbox o JOIN resources r ON r.id = o.resource_id"
            ).fetchall()
        )
    finally:
        conn.close()


def _upstream_identifiers(peer: FhirPeer) -> Counter[str]:
    """Our identifier of every resource the peer holds, counted (a duplicate counts twice)."""
    found: Counter[str] = Counter()
    with httpx.Client(base_url=peer.base_url, timeout=60) as client:
        for rtype in ("Patient", "Observation"):
            bundle = client.get(rtype, params={"_count": "100000"}).json()
            entries = bundle.get("entry", [])
            assert len(entries) == bundle["total"], "the search did not return everything"
            for entry in entries:
                ours = [
                    i["value"]
                    for i in entry["resource"].get("identifier", [])
                    if i.get("system") == fhir.IDENTIFIER_SYSTEM
                ]
                assert len(ours) == 1, "a resource upstream lost (or doubled) our identifier"
                found[ours[0].removeprefix("urn:uuid:")] += 1
    return found


@pytest.mark.slow
@pytest.mark.peer
def test_random_faults_and_kill_9_deliver_every_item_exactly_once(
    tmp_path: Path, fhir_peer: FhirPeer
) -> None:
    seed = int(os.environ.get("SYNC_JEPSEN_SEED", "5"))
    rng = random.Random(seed)
    fhir_peer.reset()
    log = tmp_path / "sync.log"
    with ProxyThread(fhir_peer.control_url, rng=random.Random(seed + 1)) as proxy:
        site = tmp_path / "site.toml"
        site.write_text(SITE.format(base_url=proxy.base_url))
        assert cli(["init", "--dev-key", "--config", str(site)]) == 0
        config = load(site, environ={})
        db_path = config.paths.database
        patients: list[str] = []
        asyncio.run(_queue(config, rng, BEFORE, patients))
        proxy.randomise(FAULTS)

        started = time.monotonic()
        kills = refusals = in_flight_kills = 0
        waits: list[float] = []  # seconds from arming the hold to a POST in flight
        for round_ in range(KILLS + IN_FLIGHT_KILLS):
            child = _start(site, log)
            if round_ % 3 == 2:
                # Hold the next bundle POST past the kill: the server applies it afterwards.
                # Only a POST that arrives from now on counts: one a killed process left
                # with the server is about to finish.
                proxy.set(Fault.DELAY, delay_s=2.5)
                held = time.monotonic()
                while proxy.posts_in_flight() == 0 and time.monotonic() - held < 30:
                    assert child.poll() is None, log.read_text()[-3000:]
                    time.sleep(0.02)
                waits.append(round(time.monotonic() - held, 1))
                time.sleep(rng.uniform(0.0, 1.0))
                in_flight_kills += proxy.posts_in_flight() > 0
                child.send_signal(signal.SIGKILL)
                child.wait(timeout=30)
                assert child.returncode == -signal.SIGKILL, log.read_text()[-3000:]
                kills += 1
                proxy.randomise(FAULTS)
                continue
            try:
                time.sleep(rng.uniform(1.0, 3.0))
                if rng.random() < 0.35:  # the link goes away for a while
                    proxy.set(Fault.REFUSE)
                    refusals += 1
                    time.sleep(rng.uniform(0.5, 1.5))
                    proxy.randomise(FAULTS)
                asyncio.run(_queue(config, rng, DURING // KILLS, patients))
                time.sleep(rng.uniform(0.5, 3.5))  # SIGKILL at a random moment
            finally:
                child.send_signal(signal.SIGKILL)
                child.wait(timeout=30)
            assert child.returncode == -signal.SIGKILL, log.read_text()[-3000:]
            kills += 1
        before_heal = Counter(_outbox(db_path).values())

        proxy.heal()
        child = _start(site, log)
        try:
            deadline = time.monotonic() + 150
            while set(_outbox(db_path).values()) != {"delivered"}:
                assert child.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, Counter(_outbox(db_path).values())
                time.sleep(0.5)
        finally:
            child.send_signal(signal.SIGTERM)
            child.wait(timeout=30)
        assert child.returncode == 0, log.read_text()[-3000:]
        elapsed = time.monotonic() - started
        tallies = proxy.counts()

    local = _outbox(db_path)
    upstream = _upstream_identifiers(fhir_peer)
    lost = sorted(set(local) - set(upstream))
    duplicated = sorted(lid for lid, n in upstream.items() if n > 1)
    foreign = sorted(set(upstream) - set(local))
    faults = {k: v for k, v in sorted(tallies.items()) if k not in ("connections", "requests")}
    print(  # noqa: T201 - the tallies are the test's report
        f"\nsync jepsen (seed {seed}): {len(local)} items in the outbox, "
        f"{sum(upstream.values())} resources upstream ({len(upstream)} distinct identifiers); "
        f"lost {len(lost)}, duplicated {len(duplicated)}, foreign {len(foreign)}\n"
        f"  {kills} kill -9 ({in_flight_kills} with a bundle in flight, after {waits} s), "
        f"{refusals} refusal "
        f"windows, {tallies.get('requests', 0)} requests "
        f"through the proxy, faults {faults}\n"
        f"  outbox before healing {dict(before_heal)}; {elapsed:.0f} s in all"
    )
    assert len(local) == BEFORE + DURING
    assert (lost, duplicated, foreign) == ([], [], [])
    assert sum(upstream.values()) == len(local)
    assert kills == KILLS + IN_FLIGHT_KILLS
    # These kills landed while the proxy held a bundle POST (before: left to chance, and in
    # one seed 0 of 10 did).
    assert in_flight_kills == IN_FLIGHT_KILLS, waits
    # The faults really happened, and of several kinds (which ones depends on timing).
    drawn = {
        k: tallies.get(k, 0) for k in ("reset", "drop", "delay", "status", "too_large", "truncate")
    }
    assert sum(drawn.values()) >= 20, drawn
    assert sum(1 for n in drawn.values() if n) >= 4, drawn
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
