"""Idle memory of the whole demo: the supervisor and its web, devices and sync processes.

Starts ``appliance demo`` on a free loopback port with a temporary data directory, waits
until ``/healthz`` is green, lets it idle, then sums the resident set size (and PSS, which
counts shared pages once) of the process tree from ``/proc``. Baseline, same run: a bare
``python -c 'import time; time.sleep(60)'`` interpreter, multiplied by four processes.

    python bench/demo_memory.py [--idle 10]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree(pid: int) -> list[int]:
    pids = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        pids += tree(int(child))
    return pids


def memory_kib(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except FileNotFoundError:
        pass
    return rss, pss


def healthy(url: str) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2, context=ctx) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds to idle before measuring")
    parser.add_argument("--quick", action="store_true", help="same as --idle 3")
    args = parser.parse_args()
    idle = 3.0 if args.quick else args.idle
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        env = {**os.environ, "APPLIANCE_WEB_PORT": str(port)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "demo", "--demo", tmp],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        url = None
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                for scheme in ("https", "http"):
                    if healthy(f"{scheme}://127.0.0.1:{port}"):
                        url = f"{scheme}://127.0.0.1:{port}"
                        break
                if url:
                    break
                time.sleep(0.5)
            if url is None:
                raise SystemExit("the demo did not become healthy within 90 s")
            time.sleep(idle)
            pids = tree(proc.pid)
            rss, pss = (sum(values) for values in zip(*(memory_kib(p) for p in pids), strict=True))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(1)
    bare_rss, _ = memory_kib(bare.pid)
    bare.kill()
    bare.wait()
    baseline_mb = 4 * bare_rss / 1024
    rss_mb = rss / 1024
    for row in (
        {
            "figure": "demo_idle_rss_mb",
            "value": round(rss_mb, 1),
            "unit": "MB",
            "baseline": round(baseline_mb, 1),
            "ratio": round(rss_mb / baseline_mb, 2),
            "goal": "value < 300 MB",
            "met": rss_mb < 300,
            "processes": len(pids),
        },
        {"figure": "demo_idle_pss_mb", "value": round(pss / 1024, 1), "unit": "MB"},
    ):
        print(json.dumps(row), flush=True)
    sys.stderr.write(
        f"demo idle: {len(pids)} processes, RSS {rss_mb:.0f} MB, PSS {pss / 1024:.0f} MB "
        f"(4 bare interpreters: {baseline_mb:.0f} MB)\n"
    )


if __name__ == "__main__":
    main()
