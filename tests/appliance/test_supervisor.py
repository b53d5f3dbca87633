"""The supervisor with real child processes that speak sd_notify (no fakes, no patching).

Each child is a small Python script run with ``sys.executable``; it appends its pid and
start time to a file, so a test can see restarts and check that no pid outlives a stop.
Backoff and watchdog timings are shrunk to tens of milliseconds; every wait polls with a
deadline rather than sleeping a guessed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from appliance.supervisor import (
    ChildSpec,
    State,
    Supervisor,
    backoff_delay,
    describe_exit,
)

CHILD = textwrap.dedent(
    """
    import asyncio, os, signal, subprocess, sys, time
    from appliance import sdnotify

    mode, pidfile = sys.argv[1], sys.argv[2]
    with open(pidfile, "a") as f:
        f.write(f"{os.getpid()} {time.monotonic()}\\n")
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "helper-ready":
        # A helper process is not the main pid: its READY=1 must not count.
        subprocess.run([sys.executable, "-c", "from appliance import sdnotify; sdnotify.ready()"])
        sdnotify.status("helper-done")
        signal.pause()
    sdnotify.status("up")
    sdnotify.ready()
    if mode == "crash":
        sys.exit(3)
    if mode == "config-error":
        sys.exit(78)
    if mode in ("ping", "wedge"):
        checks = 0
        def healthy():
            global checks
            checks += 1
            return mode == "ping" or checks <= 2  # a wedge goes quiet after two pings
        asyncio.run(sdnotify.run_watchdog(healthy))
    while True:
        signal.pause()
    """
)

SUPERVISOR = textwrap.dedent(
    """
    import asyncio, sys
    from appliance.supervisor import ChildSpec, Supervisor

    child, pidfile = sys.argv[1], sys.argv[2]
    specs = [
        ChildSpec(name=f"c{i}", argv=(sys.executable, child, "serve", pidfile))
        for i in range(3)
    ]
    sys.exit(asyncio.run(Supervisor(specs).run()))
    """
)


def clean_environ(**extra: str) -> dict[str, str]:
    """Our environment without a manager of our own (pytest might run under systemd)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    }
    env.update(extra)
    return env


@pytest.fixture
def child_script(tmp_path: Path) -> Path:
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return path


@pytest.fixture
def pidfile(tmp_path: Path) -> Path:
    return tmp_path / "pids"


@pytest.fixture
def manager() -> Iterator[tuple[socket.socket, str]]:
    """A notify socket standing in for the supervisor's own systemd (short path)."""
    with tempfile.TemporaryDirectory(prefix="sup-") as directory:
        path = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(10)
            yield sock, path


def spec(
    name: str, script: Path, mode: str, pidfile: Path, watchdog_timeout: float | None = None
) -> ChildSpec:
    """A child running the test script in ``mode``, logging its starts to ``pidfile``."""
    argv = (sys.executable, str(script), mode, str(pidfile))
    return ChildSpec(name=name, argv=argv, watchdog_timeout=watchdog_timeout)


def starts(pidfile: Path) -> list[tuple[int, float]]:
    """(pid, monotonic start time) of every child that started, in order."""
    if not pidfile.exists():
        return []
    lines = [line.split() for line in pidfile.read_text().splitlines()]
    return [(int(pid), float(at)) for pid, at in lines]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def until(predicate: Callable[[], bool], what: str, within: float = 5.0) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(supervisor: Supervisor) -> AsyncIterator[asyncio.Task[int]]:
    """Run the supervisor in a task; always stop it, so a failing test leaves no child."""
    task = asyncio.create_task(supervisor.run())
    try:
        yield task
    finally:
        supervisor.shutdown()
        await asyncio.wait_for(asyncio.shield(task), 15)


def states(supervisor: Supervisor) -> dict[str, State]:
    return {child.name: child.state for child in supervisor.snapshot()}


async def test_all_children_become_ready_and_the_supervisor_reports_ready(
    child_script: Path, pidfile: Path, manager: tuple[socket.socket, str]
) -> None:
    sock, path = manager
    specs = [spec(name, child_script, "serve", pidfile) for name in ("web", "devices", "sync")]
    supervisor = Supervisor(specs, environ=clean_environ(NOTIFY_SOCKET=path))
    async with running(supervisor) as task:
        assert await supervisor.wait_ready(10)
        snapshot = supervisor.snapshot()
        assert [c.name for c in snapshot] == ["web", "devices", "sync"]
        assert {c.state for c in snapshot} == {State.READY}
        assert {c.status for c in snapshot} == {"up"}
        assert sorted(c.pid for c in snapshot if c.pid) == sorted(p for p, _ in starts(pidfile))
        assert await asyncio.to_thread(sock.recv, 4096) == b"READY=1"
        supervisor.shutdown()
        assert await task == 0
    assert await asyncio.to_thread(sock.recv, 4096) == b"STOPPING=1"
    assert not any(alive(pid) for pid, _ in starts(pidfile))
    assert {c.state for c in supervisor.snapshot()} == {State.EXITED}
    assert {c.last_exit for c in supervisor.snapshot()} == {"signal SIGTERM"}


async def test_crashed_child_is_restarted_with_growing_backoff(
    child_script: Path, pidfile: Path
) -> None:
    supervisor = Supervisor(
        [spec("devices", child_script, "crash", pidfile)],
        backoff_base=0.05,
        rng=random.Random(7),
        environ=clean_environ(),
    )
    async with running(supervisor):
        await until(lambda: supervisor.snapshot()[0].consecutive_failures >= 5, "five crashes")
        child = supervisor.snapshot()[0]
    # The same seed gives the delays the supervisor drew; each gap between two starts
    # holds at least that delay, and the delays double: 0.05, 0.1, 0.2, 0.4 (less jitter).
    rng = random.Random(7)
    delays = [backoff_delay(n, rng, base=0.05) for n in range(1, 5)]
    times = [at for _, at in starts(pidfile)]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(gap >= delay for gap, delay in zip(gaps, delays, strict=False))
    assert all(b > a * 1.5 for a, b in itertools.pairwise(delays))
    assert child.restarts >= 4
    assert child.last_exit == "exit code 3"


async def test_backoff_resets_after_a_stable_run(child_script: Path, pidfile: Path) -> None:
    # A clock on which every run looks long: each crash is then the first of its series.
    ticks = iter(range(0, 10**9, 100))
    supervisor = Supervisor(
        [spec("sync", child_script, "crash", pidfile)],
        backoff_base=0.01,
        stable_after=30,
        clock=lambda: float(next(ticks)),
        environ=clean_environ(),
    )
    async with running(supervisor):
        await until(lambda: len(starts(pidfile)) >= 4, "three restarts")
        assert supervisor.snapshot()[0].consecutive_failures == 1


async def test_child_that_stops_pinging_is_killed_and_restarted(
    child_script: Path, pidfile: Path, tmp_path: Path
) -> None:
    steady_pids = tmp_path / "steady-pids"
    supervisor = Supervisor(
        [
            spec("wedged", child_script, "wedge", pidfile, watchdog_timeout=0.2),
            spec("steady", child_script, "ping", steady_pids, watchdog_timeout=0.2),
        ],
        backoff_base=0.01,
        environ=clean_environ(),
    )
    async with running(supervisor):
        await until(lambda: len(starts(pidfile)) >= 2, "the wedged child restarted")
        first_pid = starts(pidfile)[0][0]
        await until(lambda: not alive(first_pid), "the wedged child reaped")
        wedged, steady = supervisor.snapshot()
        assert wedged.restarts >= 1
        assert starts(pidfile)[1][0] != first_pid
        assert steady.restarts == 0
        assert steady.state is State.READY
        assert steady.last_watchdog is not None
        assert len(starts(steady_pids)) == 1
    assert wedged.last_exit == "watchdog timeout, signal SIGKILL"


async def test_watchdog_is_armed_only_by_a_first_ping(child_script: Path, pidfile: Path) -> None:
    supervisor = Supervisor(
        [spec("quiet", child_script, "serve", pidfile, watchdog_timeout=0.1)],
        environ=clean_environ(),
    )
    async with running(supervisor):
        assert await supervisor.wait_ready(10)
        await asyncio.sleep(0.3)  # three watchdog periods with no ping at all
        (child,) = supervisor.snapshot()
        assert child.state is State.READY
        assert child.restarts == 0
        assert child.last_watchdog is None


async def test_child_ignoring_sigterm_is_killed_after_stop_timeout(
    child_script: Path, pidfile: Path, tmp_path: Path
) -> None:
    polite_pids = tmp_path / "polite-pids"
    supervisor = Supervisor(
        [
            spec("stubborn", child_script, "ignore-term", pidfile),
            spec("polite", child_script, "serve", polite_pids),
        ],
        stop_timeout=0.3,
        environ=clean_environ(),
    )
    async with running(supervisor) as task:
        assert await supervisor.wait_ready(10)
        began = time.monotonic()
        supervisor.shutdown()
        assert await task == 1  # not a clean stop: someone had to be killed
        assert time.monotonic() - began >= 0.3
    stubborn, polite = supervisor.snapshot()
    assert stubborn.last_exit == "signal SIGKILL"
    assert polite.last_exit == "signal SIGTERM"
    assert not alive(starts(pidfile)[0][0])
    assert not alive(starts(polite_pids)[0][0])


async def test_config_error_is_not_restarted_and_run_ends_when_no_child_can_run(
    child_script: Path, pidfile: Path
) -> None:
    supervisor = Supervisor(
        [spec("web", child_script, "config-error", pidfile)],
        backoff_base=0.01,
        environ=clean_environ(),
    )
    assert await asyncio.wait_for(supervisor.run(), 10) == 1
    (child,) = supervisor.snapshot()
    assert child.state is State.EXITED
    assert child.restarts == 0
    assert child.last_exit == "exit code 78"
    assert len(starts(pidfile)) == 1


async def test_a_program_that_cannot_start_is_retried(tmp_path: Path) -> None:
    missing = ChildSpec(name="ghost", argv=(str(tmp_path / "no-such-program"),))
    supervisor = Supervisor([missing], backoff_base=0.01, environ=clean_environ())
    async with running(supervisor):
        await until(lambda: supervisor.snapshot()[0].restarts >= 2, "two retries")
    assert (supervisor.snapshot()[0].last_exit or "").startswith("not started")


async def test_notifications_from_a_helper_process_are_ignored(
    child_script: Path, pidfile: Path
) -> None:
    supervisor = Supervisor(
        [spec("web", child_script, "helper-ready", pidfile)], environ=clean_environ()
    )
    async with running(supervisor):
        # The helper's READY=1 was queued before the main process's STATUS.
        await until(lambda: supervisor.snapshot()[0].status == "helper-done", "status")
        assert supervisor.snapshot()[0].state is State.STARTING
        assert not await supervisor.wait_ready(0)


def test_sigterm_stops_a_supervisor_process_and_leaves_no_orphans(
    child_script: Path, pidfile: Path, tmp_path: Path, manager: tuple[socket.socket, str]
) -> None:
    sock, path = manager
    script = tmp_path / "supervisor.py"
    script.write_text(SUPERVISOR)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(child_script), str(pidfile)],
        env=clean_environ(NOTIFY_SOCKET=path),
    )
    try:
        assert sock.recv(4096) == b"READY=1"  # the supervisor is itself Type=notify-ready
        pids = [pid for pid, _ in starts(pidfile)]
        assert len(pids) == 3
        assert all(alive(pid) for pid in pids)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert sock.recv(4096) == b"STOPPING=1"
        assert not any(alive(pid) for pid in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_backoff_doubles_from_base_up_to_the_cap_with_bounded_jitter() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(n, rng, base=0.5, factor=2, cap=30, jitter=0.1) for n in range(1, 10)]
    ceilings = [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert all(0.9 * c <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays[-3:])) == 3  # still jittered at the cap
    assert backoff_delay(1, random.Random(1), jitter=0) == 0.5


def test_exit_descriptions_name_the_signal() -> None:
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"


def test_specs_are_validated() -> None:
    with pytest.raises(ValueError, match="non-empty argv"):
        ChildSpec(name="web", argv=())
    with pytest.raises(ValueError, match="positive"):
        ChildSpec(name="web", argv=("true",), watchdog_timeout=0)
    with pytest.raises(ValueError, match="unique"):
        Supervisor([ChildSpec(name="web", argv=("true",))] * 2)
