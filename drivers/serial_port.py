"""The pyserial transport: a thin adapter that feeds a sans-I/O decoder from a serial port.

Protocol modules (:mod:`drivers.nonin`, :mod:`drivers.tanita`, :mod:`drivers.line_protocol`)
never see this: :class:`SerialSource` takes a ``decoder_factory`` whose objects have
``feed(bytes) -> list[event]``, and hands every event to an async ``on_event`` callback.

How it behaves:

* The port is opened with ``serial.Serial(port, baudrate, timeout=0)`` (in a worker thread,
  as a USB adapter's open can stall), and its file descriptor is watched with
  ``loop.add_reader``; each wake-up reads what is there with the zero timeout, so the loop
  never waits on the device (a nonzero timeout would block until it expired).
* A read error or end of file (pyserial raises SerialException for both: a USB adapter
  pulled out, a pty whose master closed) or the device path disappearing (checked every
  ``presence_interval`` seconds) closes the port, marks it disconnected and reopens it with
  jittered exponential backoff from ``reopen_backoff = (first, cap)`` seconds, drawing the
  jitter from the injected ``rng`` (STYLE.md convention 3) until the device is back.
* Every (re)connection gets a fresh decoder, so a packet is never assembled across a gap.
* A ProtocolError from a decoder is counted and logged once per run of errors (its message
  is designed to be loggable: it names fields, never data); decoding continues. Skip events
  (anything with ``discarded_bytes`` and ``reason``) are counted and logged the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import serial

from drivers.errors import ProtocolError

logger = logging.getLogger(__name__)

READ_SIZE = 4096


class Decoder(Protocol):
    """What the transport needs of a protocol module."""

    def feed(self, data: bytes) -> Sequence[object]:
        """Decode ``data``; return events."""
        ...


@runtime_checkable
class SkipEvent(Protocol):
    """The shape of every decoder's "bytes dropped" event (NoninResync, LineSkipped, ...)."""

    discarded_bytes: int
    reason: str


class Port(Protocol):
    """The part of ``serial.Serial`` used here."""

    def fileno(self) -> int:
        """The OS file descriptor to watch."""
        ...

    def read(self, size: int = ...) -> bytes:
        """Read what is available (the port has a zero timeout)."""
        ...

    def close(self) -> None:
        """Close the port."""
        ...


def open_serial(port: str, baudrate: int) -> Port:
    """Open ``port`` non-blocking (``timeout=0``): reads return what is there at once."""
    return serial.Serial(port, baudrate, timeout=0)


@dataclass(frozen=True, slots=True)
class SerialStatus:
    """A snapshot for the device-status page."""

    port: str
    connected: bool
    opens: int
    bytes_read: int
    events_decoded: int
    skip_events: int
    discarded_bytes: int
    protocol_errors: int
    last_error: str | None


class SerialSource:
    """Reads one serial device for as long as :meth:`run` runs; reconnects by itself."""

    def __init__(
        self,
        port: str,
        baudrate: int,
        decoder_factory: Callable[[], Decoder],
        on_event: Callable[[object], Awaitable[None]],
        *,
        reopen_backoff: tuple[float, float] = (0.5, 10.0),
        rng: random.Random | None = None,
        presence_interval: float = 1.0,
        open_port: Callable[[str, int], Port] = open_serial,
    ) -> None:
        self._port = port
        self._baudrate = baudrate
        self._decoder_factory = decoder_factory
        self._on_event = on_event
        self._backoff_first, self._backoff_cap = reopen_backoff
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter only
        self._presence_interval = presence_interval
        self._open_port = open_port
        self._connected = False
        self._opens = self._bytes_read = self._events = 0
        self._skips = self._discarded = self._protocol_errors = 0
        self._last_error: str | None = None
        self._in_error_run = False

    @property
    def status(self) -> SerialStatus:
        """Counters since construction, and whether the port is open now."""
        return SerialStatus(
            port=self._port,
            connected=self._connected,
            opens=self._opens,
            bytes_read=self._bytes_read,
            events_decoded=self._events,
            skip_events=self._skips,
            discarded_bytes=self._discarded,
            protocol_errors=self._protocol_errors,
            last_error=self._last_error,
        )

    def _delay(self, failures: int) -> float:
        """Equal-jitter exponential backoff: half the step fixed, half drawn from the RNG."""
        step = min(self._backoff_cap, self._backoff_first * (1 << min(30, max(0, failures - 1))))
        return step / 2 + self._rng.random() * step / 2

    async def run(self, stop: asyncio.Event) -> None:
        """Open, read, reopen after unplugs, until ``stop`` is set. Never raises device errors."""
        failures = 0
        while not stop.is_set():
            try:
                port = await asyncio.to_thread(self._open_port, self._port, self._baudrate)
            except (OSError, ValueError) as exc:  # SerialException is an OSError
                failures += 1
                if failures == 1:
                    logger.warning("%s: cannot open (%s)", self._port, type(exc).__name__)
                self._last_error = type(exc).__name__
                await _sleep_unless(stop, self._delay(failures))
                continue
            self._opens += 1
            self._connected = True
            logger.info("%s: connected", self._port)
            try:
                reason = await self._pump(port, stop)
            finally:
                self._connected = False
                port.close()
            if reason is not None:
                self._last_error = reason
                logger.warning("%s: disconnected (%s)", self._port, reason)
                failures = 1
                await _sleep_unless(stop, self._delay(failures))

    async def _pump(self, port: Port, stop: asyncio.Event) -> str | None:
        """Read until stop (returns None) or a disconnect (returns the reason's class name)."""
        loop = asyncio.get_running_loop()
        decoder = self._decoder_factory()
        queue: asyncio.Queue[Sequence[object] | str | None] = asyncio.Queue()
        fd = port.fileno()

        def readable() -> None:
            try:
                data = port.read(READ_SIZE)
            except OSError as exc:
                loop.remove_reader(fd)
                queue.put_nowait(type(exc).__name__)
                return
            if not data:
                return
            self._bytes_read += len(data)
            try:
                events = decoder.feed(data)
            except ProtocolError as exc:
                self._protocol_errors += 1
                self._last_error = type(exc).__name__
                self._note_error(f"decoder error: {exc}")
                return
            if events:
                queue.put_nowait(events)

        presence: asyncio.TimerHandle | None = None

        def check_presence() -> None:
            nonlocal presence
            # A stat of a /dev path answers from the kernel at once; it never waits on the device.
            if os.path.exists(self._port):
                presence = loop.call_later(self._presence_interval, check_presence)
            else:
                queue.put_nowait("device path vanished")

        stopper = asyncio.ensure_future(stop.wait())
        stopper.add_done_callback(lambda _: queue.put_nowait(None))
        presence = loop.call_later(self._presence_interval, check_presence)
        loop.add_reader(fd, readable)
        try:
            while True:
                item = await queue.get()
                if item is None or isinstance(item, str):
                    return item
                for event in item:
                    if isinstance(event, SkipEvent):
                        self._skips += 1
                        self._discarded += event.discarded_bytes
                        self._note_error(f"skipped {event.discarded_bytes} bytes: {event.reason}")
                    else:
                        self._events += 1
                        self._in_error_run = False
                    await self._on_event(event)
        finally:
            loop.remove_reader(fd)
            stopper.cancel()
            if presence is not None:
                presence.cancel()

    def _note_error(self, message: str) -> None:
        # Log the first of a run of errors; the counters carry the rest until a good event.
        if not self._in_error_run:
            logger.warning("%s: %s", self._port, message)
            self._in_error_run = True
        else:
            logger.debug("%s: %s", self._port, message)


async def _sleep_unless(stop: asyncio.Event, delay: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), delay)
    except TimeoutError:
        return
