"""The systemd notification protocol (sd_notify), without libsystemd.

A service tells its manager how it is doing by sending short ``KEY=VALUE`` lines as one
datagram to the AF_UNIX socket named by ``$NOTIFY_SOCKET``: ``READY=1`` once it serves,
``WATCHDOG=1`` as a keep-alive, ``STATUS=...`` for ``systemctl status``, ``STOPPING=1``
when it shuts down (sd_notify(3)). The manager is systemd in production and
``appliance.supervisor`` in development and the demo; both read the same datagrams.

A leading ``@`` in the address means the Linux abstract namespace. No ``NOTIFY_SOCKET``
means "not managed": every call is then a no-op returning False. Sending never raises: a
lost notification must not crash a service, at worst the manager restarts it.

:func:`parse` is the receiving side, pure (bytes in, fields out), used by the supervisor.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)


def _address(raw: str) -> str:
    # systemd writes the abstract namespace as "@name"; the kernel wants a leading NUL.
    return "\0" + raw[1:] if raw.startswith("@") else raw


def _send(message: str, env: Mapping[str, str]) -> OSError | None:
    """Send one datagram; the error instead of raising it (None when sent)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), _address(env["NOTIFY_SOCKET"]))
    except OSError as exc:
        return exc
    return None


def notify(message: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (one or more ``KEY=VALUE`` lines) to ``$NOTIFY_SOCKET``.

    Returns True when the datagram was sent, False when there is no socket (unmanaged)
    or the send failed; a failure is logged once at warning and never raised.
    """
    env = os.environ if environ is None else environ
    if not env.get("NOTIFY_SOCKET"):
        return False
    error = _send(message, env)
    if error is not None:
        logger.warning("sd_notify %s failed: %s", message.split("=", 1)[0], error)
        return False
    return True


def ready(environ: Mapping[str, str] | None = None) -> bool:
    """READY=1: start-up is finished and the service serves."""
    return notify("READY=1", environ=environ)


def stopping(environ: Mapping[str, str] | None = None) -> bool:
    """STOPPING=1: the service is shutting down (a later exit is expected)."""
    return notify("STOPPING=1", environ=environ)


def watchdog(environ: Mapping[str, str] | None = None) -> bool:
    """WATCHDOG=1: still alive; resets the manager's watchdog timer."""
    return notify("WATCHDOG=1", environ=environ)


def status(text: str, environ: Mapping[str, str] | None = None) -> bool:
    """STATUS=...: one line shown by ``systemctl status`` and ``/healthz`` (never PHI)."""
    # A newline would start a new assignment that the manager would act on.
    return notify("STATUS=" + " ".join(text.splitlines()), environ=environ)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when no watchdog is asked of us.

    systemd sets ``WATCHDOG_USEC`` to WatchdogSec in microseconds and, optionally,
    ``WATCHDOG_PID`` to the process it means; a child that inherited the variables must
    not ping on its parent's behalf. sd_watchdog_enabled(3) advises pinging at half the
    timeout so one late wake-up does not get the service killed.
    """
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


async def run_watchdog(
    is_healthy: Callable[[], bool],
    environ: Mapping[str, str] | None = None,
    *,
    interval: float | None = None,
) -> None:
    """Ping WATCHDOG=1 every ``interval`` seconds while ``is_healthy()`` is true.

    ``interval`` defaults to :func:`watchdog_interval`; with neither this returns at once.
    An unhealthy process stays silent so its manager kills and restarts it: that is how a
    wedged process (a stuck store, a dead loop) recovers without a person. Runs until
    cancelled. A failing send is logged at warning once per run of failures, not per ping.
    """
    every = interval if interval is not None else watchdog_interval(environ)
    if every is None:
        return
    env = os.environ if environ is None else environ
    failing = False
    while True:
        try:
            healthy = is_healthy()
        except Exception:
            # A broken health check is an unhealthy process, not a dead watchdog task.
            logger.exception("watchdog health check failed")
            healthy = False
        if healthy and env.get("NOTIFY_SOCKET"):
            error = _send("WATCHDOG=1", env)
            if error is not None and not failing:
                logger.warning("sd_notify WATCHDOG failed: %s", error)
            elif error is None and failing:
                logger.info("sd_notify WATCHDOG delivered again")
            failing = error is not None
        await asyncio.sleep(every)


def parse(data: bytes) -> dict[str, str]:
    """The ``KEY=VALUE`` fields of one notification datagram (the manager's side).

    Lines without ``=`` are ignored, as systemd does; the last value of a repeated key
    wins. Undecodable bytes are replaced rather than raised: a sender cannot crash us.
    """
    fields: dict[str, str] = {}
    for line in data.decode("utf-8", errors="replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep and key:
            fields[key] = value
    return fields
