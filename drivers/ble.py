"""Bluetooth LE transport: bleak underneath, a sans-I/O :class:`~drivers.gatt.GattSession` on top.

This module knows how to find a registered device, connect, pair, read, write and subscribe; it
knows nothing about blood pressure or glucose (STYLE.md convention 2). A :class:`BleLink`
keeps one registered device connected for as long as it runs:

scan (by address, or by advertised service UUID) → connect → pair if the device needs a
bond → a NEW session from the factory → perform its actions in order → feed every value
(read results and notifications alike, through one queue, in arrival order) to
``session.on_value`` → perform the follow-up actions it returns and hand every other result
to ``on_event`` as a :class:`BleEvent` → on disconnect or any transport error, back off
(jittered, exponential, capped; reset after a connection succeeded) and start over.

Decisions:

* A :class:`~drivers.errors.ProtocolError` from a decoder is counted and logged (first one
  per connection at WARNING, the rest at DEBUG; the message only, never the bytes: it may be
  PHI) and the connection continues with the next value.
* An ``optional`` action is skipped when the characteristic is missing *or* the device
  refuses it with an ATT error (a cuff that will not let us set its clock still measures); a
  required one fails the connection.
* One clock, injected and timezone-aware in the site's zone: the session gets its naive wall
  time (device clocks have no zone), events get it converted to UTC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from bleak import BleakClient, BleakScanner
from bleak.backends.client import BaseBleakClient
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.exc import BleakError, BleakGATTProtocolError

from drivers.errors import ProtocolError
from drivers.gatt import Action, GattSession, ReadCharacteristic, Subscribe, WriteCharacteristic

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class LinkState(StrEnum):
    """What a link is doing now, for the device-status page."""

    IDLE = "idle"
    SCANNING = "scanning"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    STOPPED = "stopped"


class BluetoothUnavailableError(Exception):
    """No Bluetooth stack to talk to: BlueZ (bluetoothd over D-Bus) is missing or refused us."""


def _failure_name(exc: BaseException) -> str:
    """A short, PHI-free name for a failure, shown on the device-status page."""
    if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
        # bleak reaches BlueZ through the system D-Bus socket; an OSError there means no stack.
        return "BluetoothUnavailable"
    return type(exc).__name__


class MissingCharacteristicError(Exception):
    """The device lacks a characteristic that a required action needs."""


@dataclass(frozen=True, slots=True)
class BleDeviceSpec:
    """A registered device: matched by ``address``, or by advertised service when it is None."""

    address: str | None
    service_uuid: str
    name: str
    requires_bonding: bool = False


@dataclass(frozen=True, slots=True)
class BleEvent:
    """A session's event with where and when (UTC) it arrived."""

    device: str
    address: str
    event: object
    received: datetime


@dataclass(frozen=True, slots=True)
class LinkStatus:
    """A snapshot of one link; ``reconnects`` counts connections after the first."""

    device: str
    state: LinkState = LinkState.IDLE
    last_connected: datetime | None = None
    connections: int = 0
    reconnects: int = 0
    protocol_errors: int = 0
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class BleakBackends:
    """bleak backend classes to use instead of the platform's (tests pass Bumble's)."""

    scanner: type[BaseBleakScanner] | None = None
    client: type[BaseBleakClient] | None = None


@dataclass(frozen=True, slots=True)
class Backoff:
    """Jittered exponential back-off in seconds: attempt n waits in [d/2, d], d = min(cap, base·2ⁿ)."""

    initial: float = 1.0
    maximum: float = 60.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The wait before retry number ``attempt`` (0-based)."""
        ceiling = min(self.maximum, self.initial * 2.0 ** min(attempt, 32))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


# One connection's inbox: (uuid, value) in arrival order; None when the link dropped or stop
# was requested.
_Inbox = asyncio.Queue[tuple[str, bytes] | None]


async def _until_stopped(stop: asyncio.Event, work: Coroutine[Any, Any, _T]) -> _T | None:
    """Run ``work`` unless ``stop`` is set first (then cancel it and return None)."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return task.result() if task.done() and not task.cancelled() else None


class BleLink:
    """Keeps one registered device connected and its session fed; see the module docstring."""

    def __init__(
        self,
        spec: BleDeviceSpec,
        session_factory: Callable[[], GattSession],
        on_event: Callable[[BleEvent], Awaitable[None]],
        *,
        clock: Callable[[], datetime],
        rng: random.Random,
        backoff: Backoff = Backoff(),
        backends: BleakBackends = BleakBackends(),
        scan_timeout: float = 30.0,
        connect_timeout: float = 20.0,
        on_status: Callable[[LinkStatus], None] | None = None,
    ) -> None:
        self.spec = spec
        self._session_factory = session_factory
        self._on_event = on_event
        self._clock = clock
        self._rng = rng
        self._backoff = backoff
        self._backends = backends
        self._scan_timeout = scan_timeout
        self._connect_timeout = connect_timeout
        self._on_status = on_status
        self._status = LinkStatus(device=spec.name)

    @property
    def status(self) -> LinkStatus:
        """The current status snapshot."""
        return self._status

    def _update(self, **changes: Any) -> None:
        self._status = replace(self._status, **changes)
        if self._on_status is not None:
            self._on_status(self._status)

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the BLE link clock must be timezone-aware (the site's zone)")
        return now

    async def run(self, stop: asyncio.Event) -> None:
        """Scan, connect and serve until ``stop`` is set; never raises a transport error."""
        attempt = 0
        while not stop.is_set():
            connected_before = self._status.connections
            try:
                self._update(state=LinkState.SCANNING)
                device = await _until_stopped(stop, self._scan())
                if device is None:
                    continue  # scan timed out (device asleep) or stop: look again / leave
                self._update(state=LinkState.CONNECTING)
                await self._connect_and_serve(device, stop)
            # Any transport, session or consumer failure ends this connection, not the link.
            except Exception as exc:
                why = _failure_name(exc)
                self._update(last_error=why)
                logger.warning("%s: connection failed: %s", self.spec.name, why)
            if self._status.connections > connected_before:
                attempt = 0
            if stop.is_set():
                break
            self._update(state=LinkState.BACKOFF)
            delay = self._backoff.delay(attempt, self._rng)
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        self._update(state=LinkState.STOPPED)

    async def _scan(self) -> BLEDevice | None:
        spec = self.spec
        kwargs: BleakScanner.ExtraArgs = {}
        if self._backends.scanner is not None:
            kwargs["backend"] = self._backends.scanner
        if spec.address is None:
            kwargs["service_uuids"] = [spec.service_uuid]

        def matches(device: BLEDevice, advertisement: AdvertisementData) -> bool:
            if spec.address is not None:
                return device.address.upper() == spec.address.upper()
            return spec.service_uuid.lower() in (u.lower() for u in advertisement.service_uuids)

        return await BleakScanner.find_device_by_filter(
            matches, timeout=self._scan_timeout, **kwargs
        )

    async def _connect_and_serve(self, device: BLEDevice, stop: asyncio.Event) -> None:
        values: _Inbox = asyncio.Queue()
        client = BleakClient(
            device,
            disconnected_callback=lambda _client: values.put_nowait(None),
            timeout=self._connect_timeout,
            backend=self._backends.client,
        )
        stopper = asyncio.create_task(stop.wait())
        stopper.add_done_callback(lambda _task: values.put_nowait(None))
        try:
            await client.connect()
            if self.spec.requires_bonding:
                await client.pair()
            now = self._now()
            count = self._status.connections + 1
            self._update(
                state=LinkState.CONNECTED,
                last_connected=now.astimezone(UTC),
                connections=count,
                reconnects=count - 1,
            )
            logger.info("%s: connected", self.spec.name)
            session = self._session_factory()
            await self._perform(client, session.on_connected(now.replace(tzinfo=None)), values)
            await self._serve(client, session, values, device.address)
        finally:
            stopper.cancel()
            if client.is_connected:
                with contextlib.suppress(Exception):
                    await client.disconnect()
            logger.info("%s: disconnected", self.spec.name)

    async def _serve(
        self, client: BleakClient, session: GattSession, values: _Inbox, address: str
    ) -> None:
        logged = False
        while (item := await values.get()) is not None:
            uuid, value = item
            try:
                results = session.on_value(uuid, value)
            except ProtocolError as exc:
                self._update(protocol_errors=self._status.protocol_errors + 1)
                level = logging.DEBUG if logged else logging.WARNING
                logger.log(level, "%s: undecodable value on %s: %s", self.spec.name, uuid, exc)
                logged = True
                continue
            received = self._now().astimezone(UTC)
            for result in results:
                if isinstance(result, ReadCharacteristic | WriteCharacteristic | Subscribe):
                    await self._perform(client, [result], values)
                else:
                    await self._on_event(BleEvent(self.spec.name, address, result, received))

    async def _perform(
        self, client: BleakClient, actions: Sequence[Action], values: _Inbox
    ) -> None:
        for action in actions:
            if client.services.get_characteristic(action.uuid) is None:
                if action.optional:
                    logger.debug("%s: skipping %s (absent)", self.spec.name, action.uuid)
                    continue
                raise MissingCharacteristicError(action.uuid)
            try:
                await self._perform_one(client, action, values)
            except BleakGATTProtocolError as exc:
                if not action.optional:
                    raise
                logger.info(
                    "%s: %s refused (%s), skipped", self.spec.name, action.uuid, exc.code.name
                )

    @staticmethod
    async def _perform_one(client: BleakClient, action: Action, values: _Inbox) -> None:
        uuid = action.uuid
        if isinstance(action, ReadCharacteristic):
            values.put_nowait((uuid, bytes(await client.read_gatt_char(uuid))))
        elif isinstance(action, WriteCharacteristic):
            await client.write_gatt_char(uuid, action.value, response=action.response)
        else:
            await client.start_notify(
                uuid, lambda _char, data: values.put_nowait((uuid, bytes(data)))
            )


class BleManager:
    """Runs several links at once; one link's failure never touches another's."""

    def __init__(self, links: Sequence[BleLink], *, restart_delay: float = 5.0) -> None:
        self.links = list(links)
        self._restart_delay = restart_delay

    @property
    def statuses(self) -> list[LinkStatus]:
        """Every link's status, in registration order."""
        return [link.status for link in self.links]

    async def run(self, stop: asyncio.Event) -> None:
        """Run every link until ``stop`` is set."""
        await asyncio.gather(*(self._supervise(link, stop) for link in self.links))

    async def _supervise(self, link: BleLink, stop: asyncio.Event) -> None:
        # BleLink.run already contains per-connection failures; this guards against a bug in
        # the link itself, without TaskGroup's cancellation of the siblings.
        while not stop.is_set():
            try:
                await link.run(stop)
            except Exception:
                logger.exception("%s: link crashed; restarting", link.spec.name)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._restart_delay)


@dataclass(frozen=True, slots=True)
class Advertised:
    """A device seen while scanning for pairing: its address, name and health services."""

    address: str
    name: str | None
    service_uuids: tuple[str, ...]
    rssi: int | None


async def discover(
    service_uuids: Sequence[str],
    *,
    seconds: float = 10.0,
    backends: BleakBackends = BleakBackends(),
) -> list[Advertised]:
    """Scan for ``seconds``; devices advertising any of ``service_uuids``, strongest first.

    For pairing: an admin sees what is in range and registers it by address.
    """
    wanted = {u.lower() for u in service_uuids}
    kwargs: BleakScanner.ExtraArgs = {}
    if backends.scanner is not None:
        kwargs["backend"] = backends.scanner
    try:
        found = await BleakScanner.discover(timeout=seconds, return_adv=True, **kwargs)
    except (OSError, BleakError) as exc:
        raise BluetoothUnavailableError(
            f"cannot scan: no Bluetooth stack ({type(exc).__name__}); is bluetoothd running "
            "and an adapter present (bluetoothctl show)?"
        ) from exc
    result = []
    for device, advertisement in found.values():
        services = tuple(u.lower() for u in advertisement.service_uuids if u.lower() in wanted)
        if services:
            result.append(
                Advertised(device.address, advertisement.local_name, services, advertisement.rssi)
            )
    return sorted(result, key=lambda a: -(a.rssi if a.rssi is not None else -999))
