"""sd_notify over real AF_UNIX datagram sockets: path and abstract forms, failures, watchdog."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import sdnotify


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket and its NOTIFY_SOCKET address (a path).

    Bound in a short temp dir: pytest's tmp_path can pass the 108-byte AF_UNIX limit.
    """
    with tempfile.TemporaryDirectory(prefix="sdn-") as directory:
        path = os.path.join(directory, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(2)
        try:
            yield sock, path
        finally:
            sock.close()


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on ``sock``, without blocking."""
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096))
    except BlockingIOError:
        return messages
    finally:
        sock.settimeout(2)


def test_notify_delivers_exactly_the_message_to_a_path_socket(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, path = receiver
    assert sdnotify.notify("READY=1\nSTATUS=serving", environ={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
    assert drain(sock) == []


def test_notify_delivers_to_an_abstract_socket() -> None:
    name = f"appliance-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert sdnotify.notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"WATCHDOG=1"


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}])
def test_without_notify_socket_every_call_is_a_quiet_no_op(
    environ: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    assert sdnotify.notify("READY=1", environ=environ) is False
    assert sdnotify.ready(environ) is False
    assert sdnotify.watchdog(environ) is False
    assert caplog.records == []


def test_a_failed_send_returns_false_and_logs_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    environ = {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}
    with caplog.at_level(logging.WARNING, logger="appliance.sdnotify"):
        assert sdnotify.status("secret-free text", environ) is False
    assert len(caplog.records) == 1
    assert "STATUS" in caplog.text
    assert "secret-free text" not in caplog.text  # a status line is never logged


def test_helpers_send_the_systemd_assignments(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    environ = {"NOTIFY_SOCKET": path}
    assert sdnotify.ready(environ)
    assert sdnotify.watchdog(environ)
    assert sdnotify.status("3 readings\nREADY=1", environ)
    assert sdnotify.stopping(environ)
    assert drain(sock) == [b"READY=1", b"WATCHDOG=1", b"STATUS=3 readings READY=1", b"STOPPING=1"]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_sec_for_our_pid_only(
    environ: dict[str, str], expected: float | None
) -> None:
    assert sdnotify.watchdog_interval(environ) == expected


def test_parse_reads_assignments_and_skips_junk() -> None:
    data = b"READY=1\nSTATUS=a=b\nnonsense\n=x\n\xff\nWATCHDOG=1\n"
    assert sdnotify.parse(data) == {"READY": "1", "STATUS": "a=b", "WATCHDOG": "1"}


async def test_run_watchdog_pings_only_while_healthy_and_stops_on_cancel(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, path = receiver
    healthy = True
    checks = 0
    three_checks = asyncio.Event()

    def is_healthy() -> bool:
        nonlocal checks
        checks += 1
        if checks % 3 == 0:
            three_checks.set()
        return healthy

    task = asyncio.create_task(
        sdnotify.run_watchdog(is_healthy, {"NOTIFY_SOCKET": path}, interval=0.005)
    )
    await asyncio.wait_for(three_checks.wait(), 2)
    healthy = False
    pinged = drain(sock)
    three_checks.clear()
    await asyncio.wait_for(three_checks.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pinged
    assert set(pinged) == {b"WATCHDOG=1"}
    assert drain(sock) == []  # nothing once unhealthy


async def test_run_watchdog_returns_at_once_without_a_watchdog() -> None:
    await asyncio.wait_for(sdnotify.run_watchdog(lambda: True, {}), 1)


async def test_run_watchdog_survives_a_raising_health_check(
    receiver: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    sock, path = receiver
    calls = 0
    second_call = asyncio.Event()

    def flaky() -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("store gone")
        second_call.set()
        return True

    task = asyncio.create_task(
        sdnotify.run_watchdog(flaky, {"NOTIFY_SOCKET": path}, interval=0.005)
    )
    await asyncio.wait_for(second_call.wait(), 2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert drain(sock)[:1] == [b"WATCHDOG=1"]  # the first check failed, the second pinged
    assert "health check failed" in caplog.text
