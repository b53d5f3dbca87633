"""drivers.ble end to end without a radio: bleak's real client over Bumble, emulated peripherals.

Every test runs BleakScanner/BleakClient through the Bumble backend
(``tests/drivers/bumble_backend.py``) against peripherals from ``ble_peripherals.py``: real
advertisements, ATT requests, indications with confirmations, SMP pairing and disconnections
between two Bumble stacks in this process.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import pytest

from drivers.ble import (
    Backoff,
    BleDeviceSpec,
    BleEvent,
    BleLink,
    BleManager,
    LinkState,
    LinkStatus,
)
from drivers.blood_pressure import (
    SERVICE as BP_SERVICE,
)
from drivers.blood_pressure import (
    BloodPressureMeasurement,
    BloodPressureSession,
    encode_measurement,
)
from drivers.gatt import BatteryLevel, DeviceInformation, GattSession, encode_current_time
from drivers.ieee11073 import decode_datetime
from drivers.simulated import SimulatedBloodPressureCuff
from tests.drivers.ble_peripherals import (
    CharacteristicSpec,
    EmulatedPeripheral,
    GlucoseMeter,
    Props,
    ServiceSpec,
    blood_pressure_cuff,
    glucose_record,
)
from tests.drivers.bumble_backend import VirtualRadio

SITE = ZoneInfo("America/Chicago")
NOW = datetime(2026, 3, 14, 9, 26, 53, tzinfo=SITE)
FAST = Backoff(initial=0.01, maximum=0.05)
WAIT = 5.0  # seconds: generous bound on any awaited event; the whole file runs in ~2 s

E = TypeVar("E")


def clock() -> datetime:
    return NOW


def reading(systolic: int = 128) -> BloodPressureMeasurement:
    cuff = SimulatedBloodPressureCuff(rng=random.Random(systolic), now=lambda: NOW)
    return cuff.next_measurement()


class Box:
    """The box side of a test: links, their events, and clean shutdown."""

    def __init__(self, radio: VirtualRadio) -> None:
        self.radio = radio
        self.backends = radio.backends()
        self.events: asyncio.Queue[BleEvent] = asyncio.Queue()
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self._status_changed = asyncio.Event()

    async def on_event(self, event: BleEvent) -> None:
        self.events.put_nowait(event)

    def link(
        self,
        name: str,
        session_factory: Callable[[], GattSession] = BloodPressureSession,
        *,
        address: str | None = None,
        service: str = BP_SERVICE,
        requires_bonding: bool = False,
    ) -> BleLink:
        return BleLink(
            BleDeviceSpec(address, service, name, requires_bonding),
            session_factory,
            self.on_event,
            clock=clock,
            rng=random.Random(7),
            backoff=FAST,
            backends=self.backends,
            scan_timeout=2.0,
            connect_timeout=2.0,
            on_status=self.on_status,
        )

    def on_status(self, _status: LinkStatus) -> None:
        self._status_changed.set()
        self._status_changed = asyncio.Event()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait until a predicate over link statuses holds (re-checked on every change)."""

        async def loop() -> None:
            while not predicate():
                await self._status_changed.wait()

        await asyncio.wait_for(loop(), WAIT)

    def run(self, runner: BleLink | BleManager) -> None:
        self.tasks.append(asyncio.create_task(runner.run(self.stop)))

    async def next_event(self, kind: type[E], device: str | None = None) -> tuple[BleEvent, E]:
        """The next event of ``kind`` (from ``device``), skipping others."""

        async def find() -> tuple[BleEvent, E]:
            while True:
                event = await self.events.get()
                if isinstance(event.event, kind) and device in (None, event.device):
                    return event, event.event

        return await asyncio.wait_for(find(), WAIT)

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), WAIT)


@pytest.fixture
async def radio() -> AsyncIterator[VirtualRadio]:
    virtual = VirtualRadio()
    yield virtual
    await virtual.close()


@pytest.fixture
async def box(radio: VirtualRadio) -> AsyncIterator[Box]:
    the_box = Box(radio)
    yield the_box
    await the_box.shutdown()


@pytest.fixture
async def devices(box: Box) -> AsyncIterator[AsyncExitStack]:
    """Peripherals started in a test are closed after the box has stopped."""
    async with AsyncExitStack() as stack:
        yield stack
        await box.shutdown()


async def start(stack: AsyncExitStack, peripheral: EmulatedPeripheral) -> EmulatedPeripheral:
    await peripheral.start()
    stack.push_async_callback(peripheral.close)
    return peripheral


async def test_scans_by_service_reads_info_sets_clock_and_delivers_readings(
    box: Box, devices: AsyncExitStack
) -> None:
    cuff = await start(devices, blood_pressure_cuff(box.radio))
    link = box.link("cuff")  # address None: found by its advertised 0x1810
    box.run(link)

    info = {}
    for _ in range(4):  # the cuff has 4 of the 6 strings; the 2 absent reads are skipped
        _, field = await box.next_event(DeviceInformation)
        info[field.field] = field.value
    assert info == {
        "manufacturer": "Acme Medical",
        "model": "BP-100",
        "serial_number": "SN0001",
        "firmware_revision": "1.2.3",
    }
    _, level = await box.next_event(BatteryLevel)
    assert level == BatteryLevel(87)

    await cuff.wait_until(lambda: bool(cuff.writes_to(0x2A2B)))
    (written,) = cuff.writes_to(0x2A2B)
    assert written == encode_current_time(NOW.replace(tzinfo=None))
    assert decode_datetime(written) == NOW.replace(tzinfo=None)  # the site's wall clock
    assert written[7] == NOW.isoweekday()

    await cuff.wait_subscribed(0x2A35)
    expected = reading()
    await cuff.send(0x2A35, encode_measurement(expected))
    event, measurement = await box.next_event(BloodPressureMeasurement)
    assert measurement == expected
    assert event.device == "cuff"
    assert event.address == cuff.address
    assert event.received == NOW.astimezone(UTC)
    assert event.received.tzinfo is UTC

    await cuff.wait_subscribed(0x2A36)
    await cuff.send(0x2A36, encode_measurement(expected))
    _, live = await box.next_event(BloodPressureMeasurement)
    assert live.intermediate
    assert live.current_cuff_pressure == expected.systolic

    status = link.status
    assert status.state is LinkState.CONNECTED
    assert status.connections == 1
    assert status.reconnects == 0
    assert status.last_connected == NOW.astimezone(UTC)
    assert status.protocol_errors == 0


async def test_malformed_value_is_counted_logged_once_and_connection_continues(
    box: Box, devices: AsyncExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    cuff = await start(devices, blood_pressure_cuff(box.radio))
    link = box.link("cuff", address=cuff.address)
    box.run(link)
    await cuff.wait_subscribed(0x2A35)

    caplog.set_level(logging.DEBUG, logger="drivers.ble")
    await cuff.send(0x2A35, b"\x1e\x80\x00")  # flags want a time stamp; 3 bytes
    await cuff.send(0x2A35, b"\xe0" + bytes(6))  # reserved flag bits
    expected = reading(141)
    await cuff.send(0x2A35, encode_measurement(expected))

    _, measurement = await box.next_event(BloodPressureMeasurement)
    assert measurement == expected
    assert link.status.protocol_errors == 2
    assert link.status.state is LinkState.CONNECTED
    assert cuff.connections == 1
    warnings = [
        r for r in caplog.records if r.name == "drivers.ble" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1
    assert "1e8000" not in warnings[0].getMessage().replace(" ", "")


async def test_reconnects_after_the_peripheral_drops_and_readings_continue(
    box: Box, devices: AsyncExitStack
) -> None:
    cuff = await start(devices, blood_pressure_cuff(box.radio))
    link = box.link("cuff", address=cuff.address)
    box.run(link)
    await cuff.wait_subscribed(0x2A35)
    first = reading(120)
    await cuff.send(0x2A35, encode_measurement(first))
    assert (await box.next_event(BloodPressureMeasurement))[1] == first

    await cuff.disconnect()  # the cuff switches itself off
    await cuff.wait_until(lambda: cuff.connections == 2 and cuff.subscribed(0x2A35))
    second = reading(150)
    await cuff.send(0x2A35, encode_measurement(second))
    assert (await box.next_event(BloodPressureMeasurement))[1] == second

    assert link.status.reconnects == 1
    assert link.status.connections == 2
    assert len(cuff.writes_to(0x2A2B)) == 2  # a new session per connection sets the clock again


async def test_one_misbehaving_device_does_not_stop_another(
    box: Box, devices: AsyncExitStack
) -> None:
    good = await start(devices, blood_pressure_cuff(box.radio, name="good"))
    buggy = await start(devices, blood_pressure_cuff(box.radio, name="buggy"))
    flaky = await start(devices, blood_pressure_cuff(box.radio, name="flaky"))

    def broken_session() -> GattSession:
        raise RuntimeError("a bug in a session")

    links = [
        box.link("good", address=good.address),
        box.link("buggy", broken_session, address=buggy.address),
        box.link("flaky", address=flaky.address),
    ]
    manager = BleManager(links, restart_delay=0.01)
    box.run(manager)

    async def keep_dropping() -> None:
        while True:
            await flaky.wait_until(lambda: flaky.subscribed(0x2A35))
            await flaky.disconnect()

    dropper = asyncio.create_task(keep_dropping())
    try:
        for systolic in (110, 125, 139):
            await good.wait_until(lambda: good.subscribed(0x2A35))
            expected = reading(systolic)
            await good.send(0x2A35, encode_measurement(expected))
            assert (await box.next_event(BloodPressureMeasurement, "good"))[1] == expected
        await box.until(
            lambda: links[1].status.connections >= 3 and links[2].status.connections >= 3
        )
    finally:
        dropper.cancel()

    good_status, buggy_status, flaky_status = manager.statuses
    assert good_status.connections == 1
    assert good_status.state is LinkState.CONNECTED
    assert buggy_status.last_error == "RuntimeError"
    assert flaky_status.reconnects >= 2
    assert good.connections == 1


async def test_pairs_with_a_device_that_requires_bonding(box: Box, devices: AsyncExitStack) -> None:
    cuff = await start(devices, blood_pressure_cuff(box.radio, requires_bonding=True))

    # Without pairing, the cuff refuses the subscription: the connection fails and retries.
    unpaired = box.link("unpaired", address=cuff.address)
    unpaired_stop = asyncio.Event()
    unpaired_task = asyncio.create_task(unpaired.run(unpaired_stop))
    await box.until(lambda: unpaired.status.last_error == "BleakGATTProtocolError")
    unpaired_stop.set()
    await asyncio.wait_for(unpaired_task, WAIT)
    assert unpaired.status.state is LinkState.STOPPED
    assert not cuff.subscribed(0x2A35)

    link = box.link("cuff", address=cuff.address, requires_bonding=True)
    box.run(link)
    await cuff.wait_subscribed(0x2A35)
    assert cuff.connection is not None
    assert cuff.connection.is_encrypted
    expected = reading(133)
    await cuff.send(0x2A35, encode_measurement(expected))
    assert (await box.next_event(BloodPressureMeasurement))[1] == expected

    # Bonded: the next connection encrypts with the stored key and delivers again.
    await cuff.disconnect()
    await cuff.wait_until(lambda: cuff.connections >= 2 and cuff.subscribed(0x2A35))
    assert cuff.connection is not None
    assert cuff.connection.is_encrypted
    again = reading(134)
    await cuff.send(0x2A35, encode_measurement(again))
    assert (await box.next_event(BloodPressureMeasurement))[1] == again


async def test_missing_required_characteristic_fails_the_connection(
    box: Box, devices: AsyncExitStack
) -> None:
    # A "cuff" with only the optional intermediate pressure: Subscribe(0x2A35) is required.
    odd = EmulatedPeripheral(
        box.radio,
        name="odd",
        services=[ServiceSpec(0x1810, [CharacteristicSpec(0x2A36, Props.NOTIFY)])],
    )
    await start(devices, odd)
    link = box.link("odd", address=odd.address)
    box.run(link)
    await box.until(lambda: link.status.last_error == "MissingCharacteristicError")
    assert link.status.state in (LinkState.BACKOFF, LinkState.SCANNING, LinkState.CONNECTING)


def test_backoff_is_jittered_exponential_and_capped() -> None:
    rng = random.Random(1)
    backoff = Backoff(initial=1.0, maximum=60.0)
    delays = [backoff.delay(n, rng) for n in range(12)]
    for n, delay in enumerate(delays):
        ceiling = min(60.0, 2.0**n)
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 60.0
    assert backoff.delay(10_000, rng) <= 60.0


def test_status_snapshot_is_immutable() -> None:
    status = LinkStatus(device="cuff")
    with pytest.raises(AttributeError):
        status.state = LinkState.CONNECTED  # type: ignore[misc]


def test_naive_clock_is_refused() -> None:
    link = BleLink(
        BleDeviceSpec(None, BP_SERVICE, "cuff"),
        BloodPressureSession,
        lambda _e: asyncio.sleep(0),
        clock=lambda: datetime(2026, 1, 1),  # naive: the point of the test
        rng=random.Random(0),
    )
    with pytest.raises(ValueError, match="timezone-aware"):
        link._now()


async def test_glucose_download_resumes_after_a_drop_without_duplicates_or_gaps(
    box: Box, devices: AsyncExitStack
) -> None:
    glucose = pytest.importorskip("drivers.glucose")
    base = NOW.replace(tzinfo=None) - timedelta(days=3)
    records = [
        (seq, glucose_record(seq, base + timedelta(hours=seq), 80 + seq)) for seq in range(1, 21)
    ]
    meter = GlucoseMeter(box.radio, records, disconnect_after=7)
    await start(devices, meter.peripheral)

    seen: list[int] = []
    sessions: list[Any] = []

    def session_factory() -> GattSession:
        # What the devices service does: resume from the highest sequence number stored.
        session = glucose.GlucoseSession(last_sequence=max(seen, default=None))
        sessions.append(session)
        return session  # type: ignore[no-any-return]

    link = box.link(
        "meter", session_factory, address=meter.peripheral.address, service=glucose.SERVICE
    )
    box.run(link)

    async def collect() -> Any:
        while True:
            event = await box.events.get()
            if isinstance(event.event, glucose.GlucoseMeasurement):
                seen.append(event.event.sequence_number)
            elif isinstance(event.event, glucose.RecordTransferComplete):
                return event.event

    complete = await asyncio.wait_for(collect(), WAIT)

    assert seen == list(range(1, 21))  # exactly the 20 records, in order, none twice
    assert complete.records == 13
    assert complete.last_sequence == 20
    assert len(sessions) == 2
    assert meter.peripheral.connections == 2
    # First: "report all"; after the drop at record 7: "report >= 8" by sequence number.
    assert meter.requests == [bytes((1, 1)), bytes((1, 3, 1, 8, 0))]
    assert link.status.reconnects == 1


async def test_discover_lists_health_devices_in_range_for_pairing(
    box: Box, devices: AsyncExitStack
) -> None:
    from drivers.ble import discover

    cuff = await start(devices, blood_pressure_cuff(box.radio, name="Kiosk cuff"))
    found = await discover(
        [BP_SERVICE, "00001808-0000-1000-8000-00805f9b34fb"], seconds=0.5, backends=box.backends
    )
    assert [(a.address, a.name, a.service_uuids) for a in found] == [
        (cuff.address, "Kiosk cuff", (BP_SERVICE,))
    ]
    assert (
        await discover(["00001822-0000-1000-8000-00805f9b34fb"], seconds=0.3, backends=box.backends)
        == []
    )
