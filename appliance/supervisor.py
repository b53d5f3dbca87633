"""A small process supervisor: systemd's job for ``appliance run`` (DESIGN.md, "Processes").

In production systemd starts web, devices and sync as ``Type=notify`` units with a
watchdog. In development and the demo this module starts the same entry points and plays
the same part, so what is tested is what is deployed:

* each child gets its own ``NOTIFY_SOCKET`` (a datagram socket in a private 0700 temp
  dir) and, when its spec has ``watchdog_timeout``, ``WATCHDOG_USEC``; the child speaks
  to it through :mod:`appliance.sdnotify` exactly as it would to systemd;
* READY=1, STATUS=, STOPPING=1 and WATCHDOG=1 are tracked per child; datagrams are
  attributed by the kernel-supplied sender pid (SCM_CREDENTIALS), and only the child's
  main pid is believed, as with the units' ``NotifyAccess=main``;
* a child that exits without being asked is restarted after an exponential, jittered
  backoff that resets once a run has lasted ``stable_after`` seconds; exit status 78
  (EX_CONFIG) is not restarted, matching the units' ``RestartPreventExitStatus=78``;
* a child that pinged the watchdog once and then falls silent for ``watchdog_timeout``
  (or sends WATCHDOG=trigger) is SIGKILLed and restarted, as systemd does;
* on SIGTERM/SIGINT or :meth:`Supervisor.shutdown` every child gets SIGTERM, and
  SIGKILL after ``stop_timeout``.

Children run in their own process group, so a terminal's Ctrl-C reaches only the
supervisor (which then stops them in order) and signals reach any helpers they spawn.
The supervisor reports READY=1 to its own manager once every child is ready, so
``appliance run`` can itself be a ``Type=notify`` unit. Nothing here logs PHI: exits are
logged by child name, pid and status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from appliance import sdnotify

logger = logging.getLogger(__name__)

# sysexits.h EX_CONFIG: runtime.main_entry exits with it on a configuration error, which
# a restart cannot fix (systemd units: RestartPreventExitStatus=78).
EX_CONFIG = 78

# struct ucred {pid_t pid; uid_t uid; gid_t gid;} carried by SCM_CREDENTIALS (unix(7)).
_UCRED = struct.Struct("iII")
# Linux only; elsewhere (a developer's Mac) senders go unchecked and every datagram on a
# child's socket is taken as that child's.
_SO_PASSCRED: int | None = getattr(socket, "SO_PASSCRED", None)
_SCM_CREDENTIALS: int | None = getattr(socket, "SCM_CREDENTIALS", None)
# Notifications are a few short lines; systemd itself reads at most PIPE_BUF.
_MAX_DATAGRAM = 4096


class State(StrEnum):
    """Where a child is in its life."""

    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    EXITED = "exited"
    BACKOFF = "backoff"


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """One process to supervise.

    ``env`` is laid over the supervisor's environment (minus its own NOTIFY_SOCKET and
    WATCHDOG_* variables). ``watchdog_timeout`` (seconds, None = off) arms the watchdog
    once the child has sent its first WATCHDOG=1; the child learns it as WATCHDOG_USEC.
    """

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] | None = None
    watchdog_timeout: float | None = None
    restart_prevent_exit_status: frozenset[int] = frozenset({EX_CONFIG})

    def __post_init__(self) -> None:
        if not self.name or not self.argv:
            raise ValueError("a child needs a name and a non-empty argv")
        if self.watchdog_timeout is not None and self.watchdog_timeout <= 0:
            raise ValueError(f"{self.name}: watchdog_timeout must be positive")


@dataclass(frozen=True, slots=True)
class ChildState:
    """A snapshot of one child for health reporting (no PHI: names, pids, statuses).

    ``last_watchdog`` is on the supervisor's clock (``time.monotonic`` by default).
    ``consecutive_failures`` counts quick exits in a row and sets the next backoff.
    """

    name: str
    state: State
    pid: int | None
    restarts: int
    status: str | None
    last_watchdog: float | None
    last_exit: str | None
    consecutive_failures: int


def backoff_delay(
    failures: int,
    rng: random.Random,
    *,
    base: float = 0.5,
    factor: float = 2.0,
    cap: float = 30.0,
    jitter: float = 0.1,
) -> float:
    """Seconds to wait before restart number ``failures`` (1 = first) of a crash loop.

    ``base * factor**(failures-1)``, capped, then shortened by up to ``jitter`` (a
    fraction) so the result never exceeds ``cap`` and restarts of children that died
    together do not stay in lockstep.
    """
    raw = min(cap, base * factor ** max(0, failures - 1))
    return raw * (1.0 - jitter * rng.random())


def describe_exit(returncode: int) -> str:
    """``exit code 3`` or ``signal SIGKILL`` (asyncio reports a signal as -signum)."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


@dataclass(slots=True)
class _Child:
    """The supervisor's mutable record of one child (private; see ChildState)."""

    spec: ChildSpec
    socket_path: str = ""
    sock: socket.socket | None = None
    proc: asyncio.subprocess.Process | None = None
    state: State = State.STARTING
    restarts: int = 0
    failures: int = 0
    status: str | None = None
    last_watchdog: float | None = None
    last_exit: str | None = None
    watchdog_tripped: bool = False
    # Set on every WATCHDOG datagram so the child's task recomputes its deadline.
    pinged: asyncio.Event = field(default_factory=asyncio.Event)
    # Datagrams that arrive while the pid is still unknown (spawn not yet returned).
    early: list[tuple[int | None, dict[str, str]]] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None


class Supervisor:
    """Start children, restart them when they fail, stop them all on request.

    Call :meth:`run` once. Time (``clock``) and randomness (``rng``) are parameters so the
    restart policy can be checked without waiting for wall-clock minutes. ``environ`` is
    the environment children inherit and where the supervisor finds its own manager's
    ``NOTIFY_SOCKET`` (default: ``os.environ``, read when :meth:`run` starts).
    """

    def __init__(
        self,
        specs: Sequence[ChildSpec],
        *,
        stop_timeout: float = 10.0,
        stable_after: float = 30.0,
        backoff_base: float = 0.5,
        backoff_factor: float = 2.0,
        backoff_cap: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique: {names}")
        self._children = [_Child(spec) for spec in specs]
        self._stop_timeout = stop_timeout
        self._stable_after = stable_after
        self._backoff_base = backoff_base
        self._backoff_factor = backoff_factor
        self._backoff_cap = backoff_cap
        self._clock = clock
        # Jitter only de-synchronises restarts; it needs no cryptographic randomness.
        self._rng = rng if rng is not None else random.Random()  # noqa: S311
        self._environ = environ
        # The environment run() settled on: children inherit it, our manager is in it.
        self._env: Mapping[str, str] = {}
        self._stop = asyncio.Event()
        self._all_ready = asyncio.Event()
        self._told_manager_ready = False

    # -- public surface ---------------------------------------------------------------

    def shutdown(self) -> None:
        """Ask :meth:`run` to stop every child and return (safe to call more than once)."""
        self._stop.set()

    def snapshot(self) -> list[ChildState]:
        """The current state of every child, in spec order."""
        return [
            ChildState(
                name=c.spec.name,
                state=c.state,
                pid=c.pid,
                restarts=c.restarts,
                status=c.status,
                last_watchdog=c.last_watchdog,
                last_exit=c.last_exit,
                consecutive_failures=c.failures,
            )
            for c in self._children
        ]

    # A deadline parameter, not asyncio.timeout(): `appliance demo` waits with a bound
    # and prints its banner only on success, and a bool says which happened.
    async def wait_ready(self, timeout: float) -> bool:  # noqa: ASYNC109
        """True once every child has sent READY=1 (within ``timeout`` seconds)."""
        try:
            await asyncio.wait_for(self._all_ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def run(self) -> int:
        """Supervise until :meth:`shutdown`, SIGTERM or SIGINT, or until no child can run.

        Returns 0 after a clean stop; 1 when a child had to be SIGKILLed on the way out
        or every child exited for good (e.g. all refused their configuration).
        """
        loop = asyncio.get_running_loop()
        self._env = environ = os.environ if self._environ is None else self._environ
        runtime_dir = tempfile.mkdtemp(prefix="appliance-notify-")  # 0700: only we send
        # Our own manager's watchdog: if this loop runs, the supervisor is doing its job.
        own_watchdog = asyncio.create_task(sdnotify.run_watchdog(lambda: True, environ))
        tasks: list[asyncio.Task[None]] = []
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.shutdown)
            for index, child in enumerate(self._children):
                self._bind(loop, child, os.path.join(runtime_dir, f"{index}.sock"))
            tasks = [
                asyncio.create_task(self._supervise(child), name=child.spec.name)
                for child in self._children
            ]
            self._update_ready()
            stop = asyncio.create_task(self._stop.wait())
            # A child's task ends by itself only when that child gave up for good.
            pending = set(tasks)
            while not stop.done() and (pending or not tasks):
                await asyncio.wait({stop, *pending}, return_when=asyncio.FIRST_COMPLETED)
                pending = {task for task in tasks if not task.done()}
            for task in tasks:
                if task.done() and task.exception() is not None:
                    logger.error(
                        "supervising %s failed", task.get_name(), exc_info=task.exception()
                    )
            gave_up = not stop.done()
            stop.cancel()
            self._stop.set()
            sdnotify.stopping(environ)
            forced = await self._stop_all(tasks)
            return 1 if forced or gave_up else 0
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            own_watchdog.cancel()
            await asyncio.gather(own_watchdog, return_exceptions=True)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for child in self._children:
                if child.sock is not None:
                    loop.remove_reader(child.sock.fileno())
                    child.sock.close()
                    child.sock = None
            shutil.rmtree(runtime_dir, ignore_errors=True)

    # -- notification sockets -----------------------------------------------------------

    def _bind(self, loop: asyncio.AbstractEventLoop, child: _Child, path: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        if _SO_PASSCRED is not None:
            sock.setsockopt(socket.SOL_SOCKET, _SO_PASSCRED, 1)
        sock.bind(path)
        child.sock, child.socket_path = sock, path
        loop.add_reader(sock.fileno(), self._on_readable, child)

    def _on_readable(self, child: _Child) -> None:
        assert child.sock is not None
        while True:
            try:
                data, ancdata, _flags, _addr = child.sock.recvmsg(
                    _MAX_DATAGRAM, socket.CMSG_SPACE(_UCRED.size)
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.warning("%s: reading notifications failed: %s", child.spec.name, exc)
                return
            sender: int | None = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == _SCM_CREDENTIALS:
                    sender = _UCRED.unpack(payload[: _UCRED.size])[0]
            fields = sdnotify.parse(data)
            if child.proc is None:
                child.early.append((sender, fields))
            else:
                self._on_notification(child, sender, fields)

    def _on_notification(self, child: _Child, sender: int | None, fields: dict[str, str]) -> None:
        if sender is not None and sender != child.pid:
            # A previous incarnation's last words, or a helper process: NotifyAccess=main.
            logger.debug("%s: ignoring notification from pid %s", child.spec.name, sender)
            return
        if "STATUS" in fields:
            child.status = fields["STATUS"]
        if fields.get("READY") == "1" and child.state is State.STARTING:
            child.state = State.READY
            logger.info("%s ready (pid %s)", child.spec.name, child.pid)
        if fields.get("STOPPING") == "1":
            child.state = State.STOPPING
        watchdog = fields.get("WATCHDOG")
        if watchdog == "1":
            child.last_watchdog = self._clock()
            child.pinged.set()
        elif watchdog == "trigger":
            child.watchdog_tripped = True
            child.pinged.set()
        self._update_ready()

    def _update_ready(self) -> None:
        if all(c.state is State.READY for c in self._children):
            self._all_ready.set()
            if not self._told_manager_ready:
                self._told_manager_ready = True
                sdnotify.ready(self._env)
        else:
            self._all_ready.clear()

    # -- one child's life -------------------------------------------------------------

    def _child_env(self, child: _Child) -> dict[str, str]:
        env = {
            key: value
            for key, value in self._env.items()
            if key not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
        }
        env.update(child.spec.env or {})
        env["NOTIFY_SOCKET"] = child.socket_path
        if child.spec.watchdog_timeout is not None:
            env["WATCHDOG_USEC"] = str(int(child.spec.watchdog_timeout * 1_000_000))
        return env

    async def _supervise(self, child: _Child) -> None:
        """Start, watch and restart one child until the supervisor stops or it gives up."""
        name = child.spec.name
        while not self._stop.is_set():
            if child.failures:
                delay = backoff_delay(
                    child.failures,
                    self._rng,
                    base=self._backoff_base,
                    factor=self._backoff_factor,
                    cap=self._backoff_cap,
                )
                child.state = State.BACKOFF
                logger.warning("%s: restart %d in %.2f s", name, child.restarts + 1, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self._stop.is_set():
                    return
                child.restarts += 1
            child.state = State.STARTING
            child.last_watchdog, child.watchdog_tripped, child.status = None, False, None
            self._update_ready()
            started = self._clock()
            child.proc = None  # until spawned, notifications wait in child.early
            try:
                proc = child.proc = await asyncio.create_subprocess_exec(
                    *child.spec.argv, env=self._child_env(child), process_group=0
                )
            except OSError as exc:
                logger.error("%s: cannot start %s: %s", name, child.spec.argv[0], exc)
                child.state, child.last_exit = State.EXITED, f"not started: {exc.strerror}"
                child.failures += 1
                continue
            for sender, fields in child.early:
                self._on_notification(child, sender, fields)
            child.early.clear()
            if self._stop.is_set():
                self._signal(child, signal.SIGTERM)
            returncode, by_watchdog = await self._wait_exit(child, proc)
            child.last_exit = describe_exit(returncode)
            if by_watchdog:
                child.last_exit = f"watchdog timeout, {child.last_exit}"
            child.state = State.EXITED
            self._update_ready()
            if self._stop.is_set():
                logger.info("%s (pid %d) stopped: %s", name, proc.pid, child.last_exit)
                return
            logger.warning("%s (pid %d) exited: %s", name, proc.pid, child.last_exit)
            if returncode in child.spec.restart_prevent_exit_status:
                logger.error("%s: not restarting after %s", name, child.last_exit)
                return
            stable = self._clock() - started >= self._stable_after
            child.failures = 1 if stable else child.failures + 1

    async def _wait_exit(self, child: _Child, proc: asyncio.subprocess.Process) -> tuple[int, bool]:
        """Wait for the child to exit; kill it if its watchdog expires meanwhile.

        Returns the exit status and whether the watchdog killed it.
        """
        exit_task = asyncio.create_task(proc.wait())
        ping: asyncio.Task[bool] | None = None
        try:
            while True:
                child.pinged.clear()
                timeout = self._watchdog_remaining(child)
                if timeout is not None and timeout <= 0:
                    logger.error(
                        "%s (pid %d): watchdog timeout, killing", child.spec.name, proc.pid
                    )
                    self._signal(child, signal.SIGKILL)
                    return await exit_task, True
                ping = asyncio.create_task(child.pinged.wait())
                await asyncio.wait(
                    {exit_task, ping}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                ping.cancel()
                if exit_task.done():
                    return exit_task.result(), False
        finally:
            exit_task.cancel()
            if ping is not None:
                ping.cancel()

    def _watchdog_remaining(self, child: _Child) -> float | None:
        """Seconds until the child's watchdog expires; None while it is not armed."""
        if child.state is State.STOPPING:
            return None  # a stopping child is allowed to stop pinging
        if child.watchdog_tripped:
            return 0.0
        timeout = child.spec.watchdog_timeout
        if timeout is None or child.last_watchdog is None:
            return None
        return child.last_watchdog + timeout - self._clock()

    def _signal(self, child: _Child, sig: signal.Signals) -> None:
        """Signal the child's process group (it leads one: see process_group=0)."""
        if child.proc is None or child.proc.returncode is not None:
            return
        if sig is signal.SIGTERM:
            child.state = State.STOPPING
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.proc.pid, sig)

    async def _stop_all(self, tasks: list[asyncio.Task[None]]) -> bool:
        """SIGTERM every child, SIGKILL what is left after stop_timeout; True if any was."""
        for child in self._children:
            self._signal(child, signal.SIGTERM)
        if not tasks:
            return False
        _, pending = await asyncio.wait(tasks, timeout=self._stop_timeout)
        forced = False
        for child in self._children:
            if child.pid is not None:
                logger.warning(
                    "%s (pid %d) ignored SIGTERM for %.1f s, killing",
                    child.spec.name,
                    child.pid,
                    self._stop_timeout,
                )
                self._signal(child, signal.SIGKILL)
                forced = True
        if pending:
            await asyncio.wait(pending)
        return forced
