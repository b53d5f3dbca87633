"""Outbox drain rate of the sync agent, against a bare HTTP client in the same run.

Ours: ``Deliverer.drain`` (pipelined one bundle ahead) over a store of queued Observations — read the due
rows, decrypt, map references, build the batch Bundle, POST it, commit every entry's outcome
(``synchronous=FULL``) with its audit record. Baseline: a bare ``httpx`` client POSTing the
very same Bundles (recorded by the upstream while the agent sent them, so the bytes and the
bundle size are identical) one after the other and parsing each answer: the HTTP and the
server's cost without anything that makes delivery exactly-once.

The upstream is a minimal FHIR batch endpoint in its own process (``--serve``): a raw
asyncio HTTP/1.1 server that answers each entry's conditional create from a dict keyed by
``ifNoneExist``, in constant time. (The Medplum peer scans every stored resource per
conditional create; a 2,000-item drain into it is reported beside, as context.)

CPU per item, same rounds: the agent's process (event loop and database thread) against the
bare client's, and the upstream's process while each of them drains. On a machine with
few cores these bound the ratio whatever the agent's threading: the agent and the upstream
share the cores, and the agent's Python shares one GIL (docs/benchmarks.md).

Also: the agent's RSS when 10k and when all items are delivered (the queue is read one bundle
at a time, never whole), and the time from the link coming back to the first delivery, with
the real sync loop (``sync_agent.process.SyncLoop``) behind the fault proxy refusing
connections for a while.

    python bench/sync_drain.py [--quick] [--items N] [--bundle N] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from appliance.config import load
from appliance.keys import generate_kek_file
from appliance.runtime import ProcessContext
from appliance.store import Store
from sync_agent.outbox_delivery import Deliverer
from sync_agent.pacing import PROBE_CAP_S
from sync_agent.process import SyncLoop
from sync_agent.upstream import FHIR_JSON
from tests import factories
from tests.fhir_peer.peer import FhirPeer
from tests.sync_agent.fault_proxy import Fault, FaultProxy

HERE = Path(__file__).resolve()


def emit(
    figure: str,
    value: float,
    unit: str,
    baseline: float | None = None,
    goal: str | None = None,
    met: bool | None = None,
) -> dict[str, Any]:
    row: dict[str, Any] = {"figure": figure, "value": round(value, 2), "unit": unit}
    if baseline is not None:
        row["baseline"] = round(baseline, 2)
        row["ratio"] = round(value / baseline, 3)
    if goal is not None:
        row["goal"] = goal
        row["met"] = met
    print(json.dumps(row), flush=True)
    return row


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- the fast upstream (its own process) ---------------------------------------------------


class FastUpstream:
    """Batch endpoint with constant-time idempotency by ``ifNoneExist``; records bodies."""

    def __init__(self) -> None:
        self.known: dict[str, str] = {}
        self.record: Any = None
        self.created = 0

    def batch(self, body: bytes) -> bytes:
        if self.record is not None:
            self.record.write(struct.pack(">I", len(body)) + body)
        bundle = orjson.loads(body)
        entries = []
        for entry in bundle["entry"]:
            request = entry["request"]
            key = f"{request['url']}?{request['ifNoneExist']}"
            found = self.known.get(key)
            if found is None:
                self.created += 1
                found = self.known[key] = f"{request['url']}/{self.created}"
                status = "201 Created"
            else:
                status = "200 OK"
            entries.append({"response": {"status": status, "location": f"{found}/_history/1"}})
        return orjson.dumps({"resourceType": "Bundle", "type": "batch-response", "entry": entries})

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                status, answer = "200 OK", b"{}"
                if method == "POST" and target.rstrip("/") == "/fhir/R4":
                    answer = self.batch(body)
                elif target.startswith("/__reset"):
                    self.known.clear()
                    self.created = 0
                elif target.startswith("/__record"):
                    if self.record is not None:
                        self.record.close()
                    path = orjson.loads(body).get("path")
                    self.record = None if path is None else open(path, "wb")  # noqa: SIM115
                elif target.startswith("/__count"):
                    answer = orjson.dumps({"count": len(self.known)})
                elif target.startswith("/__cpu"):
                    answer = orjson.dumps({"cpu": time.process_time()})
                elif "metadata" not in target:
                    status = "404 Not Found"
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: application/fhir+json\r\n"
                    f"Content-Length: {len(answer)}\r\n\r\n".encode()
                    + (b"" if method == "HEAD" else answer)
                )
                await writer.drain()


async def serve_upstream() -> None:
    upstream = FastUpstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    print(f"LISTENING {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


class UpstreamProcess:
    def __enter__(self) -> UpstreamProcess:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), "--serve"], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.port = int(line.split()[1])
        self.control = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir/R4"

    def reset(self) -> None:
        self.control.post("/__reset")

    def cpu(self) -> float:
        """The upstream process's CPU seconds so far (all its threads)."""
        return float(self.control.get("/__cpu").json()["cpu"])

    def record(self, path: Path | None) -> None:
        self.control.post(
            "/__record", content=orjson.dumps({"path": None if path is None else str(path)})
        )

    def __exit__(self, *exc: object) -> None:
        self.control.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)


# -- the queue ------------------------------------------------------------------------------


async def populate(db_path: Path, kek: Path, items: int) -> None:
    store = await Store.open(db_path, kek)
    [pat] = await store.create([factories.patient()], "user:bench")
    ref = f"Patient/{pat.logical_id}"
    for start in range(0, items, 500):
        await store.create(
            [
                factories.bp_observation(ref, systolic=100 + i % 80)
                for i in range(min(500, items - start))
            ],
            "service:devices",
            validate=False,
        )
    await store.close()


def populate_in_child(folder: Path, items: int) -> tuple[Path, Path]:
    """Fill a store in another process, so the drain's RSS is the drain's alone."""
    kek = folder / "kek"
    generate_kek_file(kek)
    db_path = folder / "appliance.db"
    subprocess.run(
        [sys.executable, str(HERE), "--populate", str(db_path), str(kek), str(items)], check=True
    )
    return db_path, kek


def requeue(db_path: Path) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute(
        "UPDATE outbox SET state = 'pending', upstream_ref = NULL, delivered_at = NULL, "
        "attempts = 0, next_attempt_at = NULL, last_error = NULL"
    )
    conn.close()


def _client(base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url, headers={"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}, timeout=60
    )


# -- the runs -------------------------------------------------------------------------------


async def agent_drain(
    db_path: Path, kek: Path, base_url: str, bundle: int, marks: tuple[int, ...] = ()
) -> tuple[float, int, dict[int | str, float]]:
    """Items/s of the Deliverer draining everything; RSS (MB) when passing each mark.

    Also ``cpu_us_per_item``: this process's CPU (event loop and database thread) per item.
    """
    store = await Store.open(db_path, kek)
    rss: dict[int | str, float] = {}
    try:
        async with _client(base_url) as client:
            deliverer = Deliverer(store, client, max_entries=bundle, rng=random.Random(1))
            delivered = 0
            start, cpu_start = time.perf_counter(), time.process_time()
            while True:
                # drain() pipelines; in slices of 20 bundles to read the RSS as it goes.
                step = await deliverer.drain(max_bundles=20)
                if step.error is not None:
                    raise RuntimeError(step.error)
                if step.bundles == 0:
                    break
                delivered += step.delivered
                for mark in marks:
                    if mark not in rss and delivered >= mark:
                        rss[mark] = rss_mb()
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu_start
    finally:
        await store.close()
    rss["cpu_us_per_item"] = cpu / delivered * 1e6
    return delivered / elapsed, delivered, rss


async def bare_post(base_url: str, recorded: Path) -> tuple[float, int, float]:
    """Items/s of a bare client POSTing the recorded bundles, parsing each answer; its CPU
    per item (µs)."""
    data = recorded.read_bytes()
    bodies, offset = [], 0
    while offset < len(data):
        (size,) = struct.unpack_from(">I", data, offset)
        bodies.append(data[offset + 4 : offset + 4 + size])
        offset += 4 + size
    items = 0
    async with _client(base_url) as client:
        start, cpu_start = time.perf_counter(), time.process_time()
        for body in bodies:
            response = await client.post("", content=body)
            response.raise_for_status()
            items += len(response.json()["entry"])
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
    return items / elapsed, items, cpu / items * 1e6


async def link_back(folder: Path, upstream: UpstreamProcess, outage_s: float) -> float:
    """Seconds from the link coming back to the first delivery, with the real sync loop."""
    kek = folder / f"kek-{outage_s}"
    generate_kek_file(kek)
    db_path = folder / f"link-{outage_s}.db"
    proxy = await FaultProxy(f"http://127.0.0.1:{upstream.port}").start()
    site = folder / f"site-{outage_s}.toml"
    site.write_text(
        factories.SITE_TOML.replace(
            'data_dir = "data"', f'data_dir = "{folder}"\ndatabase = "{db_path}"'
        )
        + f'\n[keys]\nkek_file = "{kek}"\n\n[sync]\ninterval_s = 5\n\n'
        + f'[[sync.upstream]]\nname = "ehr"\nbase_url = "{proxy.base_url}"\n'
    )
    config = load(site, environ={})
    store = await Store.open(config.paths.database, config.keys.kek_file)
    ctx = ProcessContext(name="sync", config=config, store=store)
    async with _client(proxy.base_url) as client:
        loop = SyncLoop(ctx, client, config.sync.upstreams[0], rng=random.Random(3))
        await proxy.set(Fault.REFUSE)
        task = asyncio.create_task(loop.run())
        [pat] = await store.create([factories.patient()], "user:bench")
        await store.create(
            [factories.bp_observation(f"Patient/{pat.logical_id}")] * 5, "service:devices"
        )
        await asyncio.sleep(outage_s)
        watch = sqlite3.connect(config.paths.database)
        healed = time.perf_counter()
        await proxy.heal()
        delivered = None
        while delivered is None:
            await asyncio.sleep(0.01)  # polls the database, as a person watching would
            delivered = watch.execute("SELECT 1 FROM outbox WHERE state = 'delivered'").fetchone()
        took = time.perf_counter() - healed
        watch.close()
        ctx.stopping.set()
        await asyncio.wait_for(task, 10)
    await store.close()
    await proxy.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--items", type=int, default=None)
    parser.add_argument("--bundle", type=int, default=100, help="entries per Bundle")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--peer-items", type=int, default=None)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--populate", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve_upstream())
        return
    if args.populate:
        db_path, kek, items = args.populate
        asyncio.run(populate(Path(db_path), Path(kek), int(items)))
        return
    items = args.items or (10_000 if args.quick else 50_000)
    rounds = args.rounds or (2 if args.quick else 3)
    peer_items = args.peer_items or (300 if args.quick else 2_000)
    outages = (3.0, 8.0) if args.quick else (5.0, 15.0, 30.0)
    ours: list[float] = []
    bare: list[float] = []
    rss: dict[int | str, float] = {}
    cpu: dict[str, list[float]] = {
        "agent": [],
        "bare": [],
        "upstream_agent": [],
        "upstream_bare": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp, UpstreamProcess() as upstream:
        folder = Path(tmp)
        db_path, kek = populate_in_child(folder, items)
        rss_before = rss_mb()
        marks = (min(10_000, items // 5), items)
        recorded = folder / "bundles.bin"
        for round_no in range(rounds):
            upstream.reset()
            upstream.record(recorded if round_no == 0 else None)
            server_start = upstream.cpu()
            rate, delivered, seen = asyncio.run(
                agent_drain(db_path, kek, upstream.base_url, args.bundle, marks)
            )
            assert delivered == items + 1, delivered
            ours.append(rate)
            cpu["agent"].append(seen.pop("cpu_us_per_item"))
            if round_no == 0:
                rss = seen
                upstream.record(None)
            else:  # the first round's upstream also wrote the recording
                cpu["upstream_agent"].append((upstream.cpu() - server_start) / delivered * 1e6)
            upstream.reset()
            server_start = upstream.cpu()
            rate, posted, bare_cpu = asyncio.run(bare_post(upstream.base_url, recorded))
            assert posted == items + 1, posted
            bare.append(rate)
            cpu["bare"].append(bare_cpu)
            cpu["upstream_bare"].append((upstream.cpu() - server_start) / posted * 1e6)
            requeue(db_path)
        link_times = [asyncio.run(link_back(folder, upstream, outage)) for outage in outages]

        with FhirPeer() as peer:
            (folder / "peer").mkdir()
            peer_db, peer_kek = populate_in_child(folder / "peer", peer_items)
            peer_rate, peer_delivered, _ = asyncio.run(
                agent_drain(peer_db, peer_kek, peer.base_url, args.bundle)
            )
            assert peer_delivered == peer_items + 1
            assert peer.count("Observation") == peer_items

    med_ours, med_bare = statistics.median(ours), statistics.median(bare)
    rows = [
        emit(
            "sync_drain_items_per_s",
            med_ours,
            "items/s",
            med_bare,
            "ratio >= 0.7",
            med_ours / med_bare >= 0.7,
        ),
        emit(
            "sync_drain_cpu_us_per_item",
            statistics.median(cpu["agent"]),
            "µs",
            statistics.median(cpu["bare"]),
        ),
        emit(
            "sync_drain_upstream_cpu_us_per_item",
            statistics.median(cpu["upstream_agent"] or cpu["upstream_bare"]),
            "µs",
            statistics.median(cpu["upstream_bare"]),
        ),
        emit(f"sync_drain_rss_mb_at_{marks[0]}", rss[marks[0]], "MB"),
        emit(
            f"sync_drain_rss_mb_at_{marks[1]}",
            rss[marks[1]],
            "MB",
            rss[marks[0]],
            "flat: ratio <= 1.1",
            rss[marks[1]] / rss[marks[0]] <= 1.1,
        ),
        emit(
            "sync_link_back_to_first_delivery_s",
            max(link_times),
            "s",
            goal=f"< {PROBE_CAP_S + 1:.0f} s after outages of {', '.join(f'{o:.0f}' for o in outages)} s",
            met=max(link_times) < PROBE_CAP_S + 1,
        ),
        emit("sync_drain_medplum_peer_items_per_s", peer_rate, "items/s"),
    ]
    sys.stderr.write(
        f"\nsync drain ({items} Observations, bundles of {args.bundle}, medians of {rounds} "
        f"rounds; RSS before the drain {rss_before:.0f} MB; link-back times "
        f"{', '.join(f'{t:.2f}' for t in link_times)} s; Medplum peer: {peer_items} items)\n"
    )
    for row in rows:
        sys.stderr.write(
            f"  {row['figure']:<40} {row['value']:>10} {row['unit']:<8} baseline "
            f"{row.get('baseline', '-')!s:>10} ratio {row.get('ratio', '-')}\n"
        )


if __name__ == "__main__":
    main()
