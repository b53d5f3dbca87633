"""The systemd notification protocol (sd_notify), without libsystemd.

``NOTIFY_SOCKET`` names an AF_UNIX datagram socket (a leading ``@`` means the abstract
namespace). Unset means "not under systemd or the supervisor": every call is then a no-op
returning False. Sending never raises: a lost notification must not crash a service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)


def notify(message: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send one notification; False when there is no socket or the send failed."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        logger.warning("sd_notify failed: %s", exc)
        return False
    return True


def ready(environ: Mapping[str, str] | None = None) -> bool:
    """READY=1: the service is up."""
    return notify("READY=1", environ=environ)


def stopping(environ: Mapping[str, str] | None = None) -> bool:
    """STOPPING=1: the service is shutting down."""
    return notify("STOPPING=1", environ=environ)


def watchdog(environ: Mapping[str, str] | None = None) -> bool:
    """WATCHDOG=1: still alive."""
    return notify("WATCHDOG=1", environ=environ)


def status(text: str, environ: Mapping[str, str] | None = None) -> bool:
    """STATUS=...: one line shown by ``systemctl status`` (never PHI)."""
    return notify(f"STATUS={text}", environ=environ)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between pings (half of WatchdogSec), or None when no watchdog is asked for."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


async def run_watchdog(
    is_healthy: Callable[[], bool],
    environ: Mapping[str, str] | None = None,
    *,
    interval: float | None = None,
) -> None:
    """Ping WATCHDOG=1 while ``is_healthy()``; a wedged process then gets restarted."""
    every = interval if interval is not None else watchdog_interval(environ)
    if every is None:
        return
    while True:
        if is_healthy():
            watchdog(environ)
        await asyncio.sleep(every)
