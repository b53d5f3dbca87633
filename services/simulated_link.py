"""A transport with no radio: drives a GATT session against a simulated peripheral.

Demo mode and tests use it to run the *same* session code (``drivers/*Session``) and the same
decoders as a real Bluetooth device: the session's actions are performed against an
in-memory GATT table (reads, writes, subscriptions), and the peripheral's notifications are
fed back through ``on_value``. Only the radio is missing; the Bumble tests cover that part.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Protocol

from drivers.errors import ProtocolError
from drivers.gatt import Action, GattSession, ReadCharacteristic, Subscribe, WriteCharacteristic
from drivers.serial_port import Decoder, SkipEvent

logger = logging.getLogger(__name__)

Notification = tuple[str, bytes]
OnEvent = Callable[[object], Awaitable[None]]


class SimulatedPeripheral(Protocol):
    """An in-memory GATT server: characteristic values, write handling, new readings."""

    def has(self, uuid: str) -> bool:
        """Whether the peripheral has this characteristic."""
        ...

    def read(self, uuid: str) -> bytes:
        """The value a read returns."""
        ...

    def write(self, uuid: str, value: bytes) -> list[Notification]:
        """Accept a write; returns the notifications/indications it causes (RACP answers)."""
        ...

    def take_reading(self) -> list[Notification]:
        """Take a new measurement: the notifications a real device would send for it."""
        ...

    @property
    def wants_reconnect(self) -> bool:
        """True after a reading the device keeps in memory until the box connects again."""
        ...


class MissingCharacteristicError(Exception):
    """A required characteristic is absent (the transport gives up on this connection)."""


class SimulatedGattLink:
    """Runs one session against one simulated peripheral, the way ``drivers/ble.py`` does."""

    def __init__(
        self,
        peripheral: SimulatedPeripheral,
        session_factory: Callable[[], GattSession],
        on_event: OnEvent,
        *,
        clock: Callable[[], datetime],
    ) -> None:
        self._peripheral = peripheral
        self._session_factory = session_factory
        self._on_event = on_event
        self._clock = clock
        self._session: GattSession | None = None
        self._subscribed: set[str] = set()
        self.protocol_errors = 0

    async def connect(self) -> None:
        """A new connection: a new session, and its start-up actions performed in order."""
        self._session = self._session_factory()
        self._subscribed.clear()
        await self._perform(deque(self._session.on_connected(self._clock())))

    async def reading(self) -> None:
        """Have the peripheral take a measurement and deliver what it sends.

        A device that keeps the reading in memory (a glucose meter) is connected again, as a
        real one advertises after a test; the new session fetches only what is new.
        """
        await self._deliver(self._peripheral.take_reading())
        if self._peripheral.wants_reconnect:
            await self.connect()

    async def run(self, stop: asyncio.Event, interval_s: float) -> None:
        """Connect, then take a reading every ``interval_s`` until ``stop`` is set."""
        await self.connect()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
            if not stop.is_set():
                await self.reading()

    async def _deliver(self, notifications: list[Notification]) -> None:
        pending: deque[Action] = deque()
        for uuid, value in notifications:
            if uuid in self._subscribed:
                pending.extend(await self._value(uuid, value))
        await self._perform(pending)

    async def _perform(self, pending: deque[Action]) -> None:
        peripheral = self._peripheral
        while pending:
            action = pending.popleft()
            if not peripheral.has(action.uuid):
                if action.optional:
                    continue
                raise MissingCharacteristicError(f"required characteristic {action.uuid} absent")
            if isinstance(action, ReadCharacteristic):
                pending.extend(await self._value(action.uuid, peripheral.read(action.uuid)))
            elif isinstance(action, WriteCharacteristic):
                for uuid, value in peripheral.write(action.uuid, action.value):
                    if uuid in self._subscribed:
                        pending.extend(await self._value(uuid, value))
            elif isinstance(action, Subscribe):
                self._subscribed.add(action.uuid)

    async def _value(self, uuid: str, value: bytes) -> list[Action]:
        assert self._session is not None
        try:
            results = self._session.on_value(uuid, value)
        except ProtocolError as exc:
            self.protocol_errors += 1
            logger.warning("simulated device sent a value that does not decode: %s", exc)
            return []
        actions: list[Action] = []
        for item in results:
            if isinstance(item, ReadCharacteristic | WriteCharacteristic | Subscribe):
                actions.append(item)
            else:
                await self._on_event(item)
        return actions


class SimulatedSerialDevice(Protocol):
    """A simulated serial device: the bytes it writes for one reading."""

    def next_bytes(self) -> bytes:
        """The bytes of the next reading."""
        ...


class SimulatedSerialLink:
    """Feeds a simulated serial device's bytes, in random small chunks as a UART delivers
    them, through the real stream decoder (what ``drivers/serial_port.py`` does with a port)."""

    def __init__(
        self,
        device: SimulatedSerialDevice,
        decoder: Decoder,
        on_event: OnEvent,
        *,
        rng: random.Random,
    ) -> None:
        self._device = device
        self._decoder = decoder
        self._on_event = on_event
        self._rng = rng

    async def reading(self) -> None:
        """One reading's bytes through the decoder; decoded events are delivered in order."""
        data = self._device.next_bytes()
        offset = 0
        while offset < len(data):
            size = self._rng.randint(1, 64)
            for event in self._decoder.feed(data[offset : offset + size]):
                if not isinstance(event, SkipEvent):
                    await self._on_event(event)
            offset += size

    async def run(self, stop: asyncio.Event, interval_s: float) -> None:
        """A reading every ``interval_s`` until ``stop`` is set."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
            if not stop.is_set():
                await self.reading()
