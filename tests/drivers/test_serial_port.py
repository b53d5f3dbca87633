"""The pyserial transport against REAL pseudo-terminals (STYLE.md convention 14).

A thread plays the oximeter: it writes Nonin Data Format #7 frames (built with
drivers.nonin.encode_df7_packet) to the pty master at 20x the real pace (a frame every
0.67 ms instead of 13.3 ms). The driver opens the slave through a symlink, tmp_path/ttyUSB0,
as it would open /dev/ttyUSB0. Unplugging is closing the master, or removing the symlink;
replugging is a new pty behind the same symlink.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import threading
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from drivers.errors import ProtocolError
from drivers.nonin import NoninDf7Decoder, NoninPacket, NoninResync, encode_df7_packet
from drivers.serial_port import Decoder, Port, SerialSource, SerialStatus, open_serial

FRAME_INTERVAL = 0.013333 / 20  # 75 frames/s, sped up 20 times


class Pty:
    """A pseudo-terminal pair; the slave is put in raw mode so no byte is translated."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.closed = False

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def unplug(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.master)
            os.close(self.slave)


class Oximeter(threading.Thread):
    """Writes ``data`` frame by frame at the (sped-up) DF7 pace; stops quietly if unplugged."""

    def __init__(self, pty: Pty, data: bytes) -> None:
        super().__init__(daemon=True)
        self._pty, self._data = pty, data

    def run(self) -> None:
        for i in range(0, len(self._data), 5):
            try:
                self._pty.write(self._data[i : i + 5])
            except OSError:
                return
            time.sleep(FRAME_INTERVAL)


def _send(pty: Pty, data: bytes) -> None:
    emulator = Oximeter(pty, data)
    emulator.start()
    emulator.join(timeout=5)


def _packets(values: range) -> bytes:
    return b"".join(encode_df7_packet(v, 60 + v) for v in values)


@dataclass
class Rig:
    source: SerialSource
    events: list[object]
    stop: asyncio.Event
    task: asyncio.Task[None]

    def spo2s(self) -> list[int | None]:
        return [e.spo2 for e in self.events if isinstance(e, NoninPacket)]


async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.002)


@pytest.fixture
def ptys() -> Iterator[list[Pty]]:
    made: list[Pty] = []
    yield made
    for pty in made:
        pty.unplug()


@pytest.fixture
def link(tmp_path: Path) -> Path:
    return tmp_path / "ttyUSB0"


def _pty(ptys: list[Pty], link: Path) -> Pty:
    pty = Pty()
    ptys.append(pty)
    link.unlink(missing_ok=True)
    link.symlink_to(pty.path)
    return pty


async def _start(link: Path, decoder_factory: Callable[[], Decoder] = NoninDf7Decoder) -> Rig:
    events: list[object] = []

    async def on_event(event: object) -> None:
        events.append(event)

    source = SerialSource(
        str(link),
        9600,
        decoder_factory,
        on_event,
        reopen_backoff=(0.01, 0.05),
        rng=random.Random(7),
        presence_interval=0.02,
    )
    stop = asyncio.Event()
    return Rig(source, events, stop, asyncio.create_task(source.run(stop)))


async def _finish(rig: Rig) -> None:
    rig.stop.set()
    await asyncio.wait_for(rig.task, 2)


async def test_decodes_df7_packets_written_to_a_real_pty(ptys: list[Pty], link: Path) -> None:
    pty = _pty(ptys, link)
    rig = await _start(link)
    await wait_until(lambda: rig.source.status.connected)
    stream = b"\x80\x01\x02" + _packets(range(90, 100))
    await asyncio.to_thread(_send, pty, stream)
    await wait_until(lambda: len(rig.spo2s()) == 10)
    await _finish(rig)
    assert rig.spo2s() == list(range(90, 100))
    assert rig.events[0] == NoninResync(3)
    assert rig.source.status == SerialStatus(
        port=str(link),
        connected=False,
        opens=1,
        bytes_read=len(stream),
        events_decoded=10,
        skip_events=1,
        discarded_bytes=3,
        protocol_errors=0,
        last_error=None,
    )


async def test_unplug_and_replug_resume_without_duplicates_or_stitching(
    ptys: list[Pty], link: Path
) -> None:
    first = _pty(ptys, link)
    rig = await _start(link)
    await wait_until(lambda: rig.source.status.connected)
    half = encode_df7_packet(85, 145)
    await asyncio.to_thread(_send, first, _packets(range(80, 85)) + half[:60])
    await wait_until(lambda: len(rig.spo2s()) == 5)
    first.unplug()  # the USB adapter is pulled out mid-packet
    link.unlink()
    await wait_until(lambda: not rig.source.status.connected)
    await asyncio.sleep(0.1)  # several failed reopen attempts
    assert rig.source.status.opens == 1
    assert rig.source.status.last_error == "SerialException"

    second = _pty(ptys, link)  # plugged back in: a new device node behind the same name
    await wait_until(lambda: rig.source.status.opens == 2 and rig.source.status.connected)
    await asyncio.to_thread(_send, second, half[60:] + _packets(range(86, 91)))
    await wait_until(lambda: len(rig.spo2s()) == 10)
    await _finish(rig)
    assert rig.spo2s() == [80, 81, 82, 83, 84, 86, 87, 88, 89, 90]
    assert NoninResync(65) in rig.events  # the orphaned half packet, dropped not stitched


async def test_removing_the_device_path_disconnects_and_a_new_pty_resumes(
    ptys: list[Pty], link: Path
) -> None:
    first = _pty(ptys, link)
    rig = await _start(link)
    await wait_until(lambda: rig.source.status.connected)
    await asyncio.to_thread(_send, first, _packets(range(70, 73)))
    await wait_until(lambda: len(rig.spo2s()) == 3)
    link.unlink()  # the node vanishes while the port is still open
    await wait_until(lambda: not rig.source.status.connected)
    assert rig.source.status.last_error == "device path vanished"
    first.write(_packets(range(73, 75)))  # written to the old device: must not arrive

    second = _pty(ptys, link)
    await wait_until(lambda: rig.source.status.connected)
    await asyncio.to_thread(_send, second, _packets(range(75, 78)))
    await wait_until(lambda: len(rig.spo2s()) == 6)
    await _finish(rig)
    assert rig.spo2s() == [70, 71, 72, 75, 76, 77]


async def _max_loop_gap(duration: float) -> float:
    worst, last = 0.0, time.monotonic()
    end = last + duration
    while last < end:
        await asyncio.sleep(0.005)
        now = time.monotonic()
        worst, last = max(worst, now - last), now
    return worst


async def test_the_loop_is_not_blocked_while_waiting_for_bytes(ptys: list[Pty], link: Path) -> None:
    pty = _pty(ptys, link)
    rig = await _start(link)
    await wait_until(lambda: rig.source.status.connected)
    assert await _max_loop_gap(0.3) < 0.1  # a blocking read would stall here for its timeout
    pty.write(_packets(range(95, 96)))
    await wait_until(lambda: rig.spo2s() == [95])
    await _finish(rig)


async def test_the_loop_is_not_blocked_while_the_device_is_absent(link: Path) -> None:
    rig = await _start(link)  # nothing behind the path: every open fails, with backoff
    assert await _max_loop_gap(0.3) < 0.1
    assert rig.source.status.opens == 0
    assert rig.source.status.last_error == "SerialException"
    await _finish(rig)


async def test_reopen_delays_grow_exponentially_with_seeded_jitter(link: Path) -> None:
    calls: list[float] = []

    def failing_open(port: str, baudrate: int) -> Port:
        calls.append(time.monotonic())
        raise FileNotFoundError(port)

    source = SerialSource(
        str(link),
        9600,
        NoninDf7Decoder,
        lambda _: asyncio.sleep(0),
        reopen_backoff=(0.02, 0.08),
        rng=random.Random(3),
        open_port=failing_open,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(source.run(stop))
    await wait_until(lambda: len(calls) == 6)
    stop.set()
    await asyncio.wait_for(task, 2)
    jitter = random.Random(3)
    steps = [0.02, 0.04, 0.08, 0.08, 0.08]  # doubling, capped
    expected = [s / 2 + jitter.random() * s / 2 for s in steps]
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    for gap, delay in zip(gaps, expected, strict=True):
        assert delay <= gap < delay + 0.05
    assert source.status.last_error == "FileNotFoundError"


@dataclass(frozen=True)
class Chunk:
    data: bytes


class ExplodingDecoder:
    """A decoder that raises ProtocolError on any chunk containing ``!``."""

    def feed(self, data: bytes) -> list[Chunk]:
        if b"!" in data:
            raise ProtocolError("test field is not valid")
        return [Chunk(data)]


async def test_protocol_errors_are_logged_once_and_decoding_continues(
    ptys: list[Pty], link: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pty = _pty(ptys, link)
    rig = await _start(link, ExplodingDecoder)
    await wait_until(lambda: rig.source.status.connected)
    caplog.set_level(logging.WARNING, logger="drivers.serial_port")
    pty.write(b"ok1")
    await wait_until(lambda: rig.events == [Chunk(b"ok1")])
    for n in range(1, 4):
        pty.write(b"!secret-reading!")
        await wait_until(lambda n=n: rig.source.status.protocol_errors == n)  # type: ignore[misc]
    pty.write(b"ok2")
    await wait_until(lambda: len(rig.events) == 2)
    await _finish(rig)
    assert rig.events == [Chunk(b"ok1"), Chunk(b"ok2")]
    warnings = [r.getMessage() for r in caplog.records if "decoder error" in r.getMessage()]
    assert warnings == [f"{link}: decoder error: test field is not valid"]
    assert all("secret" not in r.getMessage() for r in caplog.records)
    assert rig.source.status.last_error == "ProtocolError"


def test_open_serial_opens_a_pty_non_blocking(ptys: list[Pty], link: Path) -> None:
    _pty(ptys, link)
    port = open_serial(str(link), 9600)
    try:
        started = time.monotonic()
        assert port.read(4096) == b""
        assert time.monotonic() - started < 0.05
    finally:
        port.close()
