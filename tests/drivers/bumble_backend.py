"""A bleak backend on Google Bumble: bleak's real client API against emulated peripherals.

No radio is needed (REFERENCE.md, "Testing without a radio"). A :class:`VirtualRadio` holds a
Bumble ``LocalLink`` and one central Bumble ``Device`` -- the box's adapter, with its own
virtual controller. Emulated peripherals (``tests/drivers/ble_peripherals.py``) put their own
controllers on the same link. Every ATT/GATT exchange, every SMP pairing and every
advertisement is a real PDU passed between two Bumble stacks in this process, in
milliseconds.

:meth:`VirtualRadio.backends` returns a scanner and a client class bound to that radio; bleak
takes them through ``BleakScanner(..., backend=...)`` and ``BleakClient(..., backend=...)``
(bleak 3.1 ``get_platform_*_backend_type`` is bypassed when ``backend`` is given).

Limits (test-only module):

* One central device is shared by all clients and scanners, like one adapter on the box;
  connection set-up is serialised (Bumble allows one pending LE connection per controller,
  as real controllers do).
* Scan responses are not emulated by Bumble's controller: peripherals put the name and the
  service UUIDs in the advertising data itself.
* ``read_gatt_descriptor``/``write_gatt_descriptor`` and ``unpair`` are minimal; ``use_cached``
  is ignored; MTU stays at the default 23 unless a peripheral negotiates.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

from bleak.args import SizedBuffer
from bleak.assigned_numbers import CharacteristicPropertyName
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, AdvertisementDataCallback, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakError, BleakGATTProtocolError
from bumble import att, core, hci
from bumble.controller import Controller
from bumble.device import Advertisement, Connection, Device, Peer
from bumble.gatt import Characteristic
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport.common import AsyncPipeSink

from drivers.ble import BleakBackends

CENTRAL_ADDRESS = "C0:FF:EE:00:00:01"

_T = TypeVar("_T")

_PROPERTY_NAMES: tuple[tuple[Characteristic.Properties, CharacteristicPropertyName], ...] = (
    (Characteristic.Properties.BROADCAST, "broadcast"),
    (Characteristic.Properties.READ, "read"),
    (Characteristic.Properties.WRITE_WITHOUT_RESPONSE, "write-without-response"),
    (Characteristic.Properties.WRITE, "write"),
    (Characteristic.Properties.NOTIFY, "notify"),
    (Characteristic.Properties.INDICATE, "indicate"),
    (Characteristic.Properties.AUTHENTICATED_SIGNED_WRITES, "authenticated-signed-writes"),
    (Characteristic.Properties.EXTENDED_PROPERTIES, "extended-properties"),
)


def bumble_uuid_str(value: core.UUID) -> str:
    """A Bumble UUID as bleak spells it: the full lower-case 128-bit form."""
    return str(uuid.UUID(bytes=bytes(reversed(value.to_bytes(force_128=True)))))


def make_device(link: LocalLink, name: str, address: str) -> tuple[Device, Controller]:
    """A Bumble host and its virtual controller on ``link`` (not yet powered on)."""
    controller = Controller(name, link=link, public_address=address)
    device = Device(
        name=name, address=hci.Address(address), host=Host(controller, AsyncPipeSink(controller))
    )
    return device, controller


def _parse_advertising_data(data: bytes) -> tuple[str | None, list[str], dict[int, bytes]]:
    """Local name, service UUIDs and manufacturer data from raw AD structures."""
    name: str | None = None
    uuids: list[str] = []
    manufacturer: dict[int, bytes] = {}
    offset = 0
    while offset + 1 < len(data):
        length = data[offset]
        if length == 0:
            break
        ad_type, body = data[offset + 1], data[offset + 2 : offset + 1 + length]
        offset += 1 + length
        if ad_type in (0x08, 0x09):
            name = body.decode("utf-8", "replace")
        elif ad_type in (0x02, 0x03):
            uuids += [
                bumble_uuid_str(core.UUID.from_bytes(body[i : i + 2]))
                for i in range(0, len(body) - 1, 2)
            ]
        elif ad_type in (0x06, 0x07):
            uuids += [
                bumble_uuid_str(core.UUID.from_bytes(body[i : i + 16]))
                for i in range(0, len(body) - 15, 16)
            ]
        elif ad_type == 0xFF and len(body) >= 2:
            manufacturer[int.from_bytes(body[:2], "little")] = bytes(body[2:])
    return name, uuids, manufacturer


class VirtualRadio:
    """A Bumble LocalLink with the box's adapter (one central device) on it."""

    def __init__(self) -> None:
        self.link = LocalLink()  # type: ignore[no-untyped-call]
        self._central: Device | None = None
        self._controller: Controller | None = None
        self._power_lock = asyncio.Lock()
        self.connect_lock = asyncio.Lock()
        self._scanners: set[BumbleScanner] = set()
        self._addresses = itertools.count(1)

    def next_address(self) -> str:
        """A fresh static random address for an emulated peripheral."""
        n = next(self._addresses)
        return f"D0:00:00:00:{n >> 8:02X}:{n & 0xFF:02X}"

    async def central(self) -> Device:
        """The adapter, powered on at first use."""
        async with self._power_lock:
            if self._central is None:
                device, self._controller = make_device(self.link, "appliance", CENTRAL_ADDRESS)
                device.on(Device.EVENT_ADVERTISEMENT, self._on_advertisement)
                await device.power_on()
                self._central = device
            return self._central

    async def scanning(self, scanner: BumbleScanner, active: bool) -> None:
        """Start (``active``) or stop delivering advertisements to ``scanner``."""
        central = await self.central()
        if active:
            self._scanners.add(scanner)
            if not central.is_scanning:
                await central.start_scanning(active=False, filter_duplicates=False)
        else:
            self._scanners.discard(scanner)
            if not self._scanners and central.is_scanning:
                await central.stop_scanning()

    def _on_advertisement(self, advertisement: Advertisement) -> None:
        for scanner in list(self._scanners):
            scanner.on_advertisement(advertisement)

    def backends(self) -> BleakBackends:
        """Scanner and client classes bound to this radio, for ``backend=``."""
        radio = self

        class Scanner(BumbleScanner):
            _radio = radio

        class Client(BumbleClient):
            _radio = radio

        return BleakBackends(scanner=Scanner, client=Client)

    async def close(self) -> None:
        """Power the adapter off (peripherals close themselves)."""
        if self._central is not None and self._controller is not None:
            self._scanners.clear()
            await self._central.power_off()
            self.link.remove_controller(self._controller)
            self._central = None


class BumbleScanner(BaseBleakScanner):
    """A bleak scanner fed by the shared central's advertisement reports."""

    _radio: VirtualRadio

    def __init__(
        self,
        detection_callback: AdvertisementDataCallback | None,
        service_uuids: list[str] | None,
        scanning_mode: str = "active",
        **kwargs: Any,
    ) -> None:
        super().__init__(detection_callback, service_uuids)
        self._scanning_mode = scanning_mode

    def on_advertisement(self, advertisement: Advertisement) -> None:
        """Translate one Bumble advertisement report into bleak's AdvertisementData."""
        name, service_uuids, manufacturer = _parse_advertising_data(advertisement.data_bytes)
        if not self.is_allowed_uuid(service_uuids):
            return
        tx_power = advertisement.tx_power
        data = AdvertisementData(
            local_name=name,
            manufacturer_data=manufacturer,
            service_data={},
            service_uuids=service_uuids,
            tx_power=None if tx_power == Advertisement.TX_POWER_NOT_AVAILABLE else tx_power,
            rssi=advertisement.rssi,
            platform_data=(advertisement,),
        )
        address = str(advertisement.address).split("/")[0]
        device = self.create_or_update_device(address, address, name, advertisement.address, data)
        self.call_detection_callbacks(device, data)

    async def start(self) -> None:
        self.seen_devices = {}
        await self._radio.scanning(self, active=True)

    async def stop(self) -> None:
        await self._radio.scanning(self, active=False)


class BumbleClient(BaseBleakClient):
    """A bleak client whose GATT operations are real ATT requests to a Bumble peripheral."""

    _radio: VirtualRadio

    def __init__(self, address_or_ble_device: BLEDevice | str, **kwargs: Any) -> None:
        super().__init__(
            address_or_ble_device,
            disconnected_callback=kwargs.get("disconnected_callback"),
            timeout=kwargs.get("timeout", 10.0),
        )
        self._connection: Connection | None = None
        self._peer: Peer | None = None
        self._closing = False

    @property
    def name(self) -> str:
        return self.address

    @property
    def mtu_size(self) -> int:
        return self._connection.att_mtu if self._connection is not None else att.ATT_DEFAULT_MTU

    @property
    def is_connected(self) -> bool:
        return self._connection is not None

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        central = await self._radio.central()
        async with self._radio.connect_lock:
            try:
                connection = await central.connect(
                    hci.Address(self.address),
                    transport=core.PhysicalTransport.LE,
                    timeout=self._timeout,
                )
            except core.TimeoutError as exc:
                raise TimeoutError(f"no connection to {self.address}") from exc
            except core.BaseBumbleError as exc:
                raise BleakError(f"connection to {self.address} failed: {exc}") from exc
        self._connection = connection
        self._closing = False
        connection.on(Connection.EVENT_DISCONNECTION, self._on_disconnection)
        try:
            self._peer = Peer(connection)
            self.services = await self._guard(self._discover())
            if pair:
                await self.pair()
        except BaseException:
            await self.disconnect()
            raise

    def _on_disconnection(self, reason: int) -> None:
        solicited = self._closing
        self._connection = None
        self._peer = None
        self.services = None
        if not solicited and self._disconnected_callback is not None:
            self._disconnected_callback()

    async def _guard(self, awaitable: Awaitable[_T]) -> _T:
        """Await a Bumble call, turning Bumble's errors into bleak's.

        Bumble cancels a pending ATT request when the link drops; that CancelledError is
        not our task being cancelled, so it becomes a BleakError here.
        """
        try:
            return await awaitable
        except att.ATT_Error as exc:
            raise BleakGATTProtocolError(exc.error_code) from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise BleakError("disconnected") from None
        except core.BaseBumbleError as exc:
            raise BleakError(str(exc)) from exc

    async def _discover(self) -> BleakGATTServiceCollection:
        assert self._peer is not None
        collection = BleakGATTServiceCollection()
        for service in await self._peer.discover_services():
            bleak_service = BleakGATTService(service, service.handle, bumble_uuid_str(service.uuid))
            collection.add_service(bleak_service)
            for characteristic in await service.discover_characteristics():
                properties = [
                    name for flag, name in _PROPERTY_NAMES if characteristic.properties & flag
                ]
                bleak_char = BleakGATTCharacteristic(
                    characteristic,
                    characteristic.handle,
                    bumble_uuid_str(characteristic.uuid),
                    properties,
                    lambda: self.mtu_size - 3,
                    bleak_service,
                )
                collection.add_characteristic(bleak_char)
                for descriptor in await characteristic.discover_descriptors():
                    collection.add_descriptor(
                        BleakGATTDescriptor(
                            descriptor,
                            descriptor.handle,
                            bumble_uuid_str(descriptor.type),
                            bleak_char,
                        )
                    )
        return collection

    async def disconnect(self) -> None:
        connection = self._connection
        if connection is None:
            return
        self._closing = True
        try:
            await connection.disconnect()  # returns once the disconnection completed
        except (core.BaseBumbleError, hci.HCI_Error):
            pass  # already gone
        finally:
            self._connection = None
            self._peer = None

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        """Bond on first use (SMP Just Works, real over the link); encrypt with the stored key after."""
        connection = self._connection
        if connection is None:
            raise BleakError("Not connected")
        if connection.is_encrypted:
            return
        central = await self._radio.central()
        keys = (
            await central.keystore.get(str(connection.peer_address)) if central.keystore else None
        )
        if keys is not None and keys.ltk is not None:
            await self._guard(connection.encrypt())
        else:
            await self._guard(connection.pair())

    async def unpair(self) -> None:
        central = await self._radio.central()
        if central.keystore is not None:
            await central.keystore.delete(self.address)

    def _require(self) -> Connection:
        if self._connection is None:
            raise BleakError("Not connected")
        return self._connection

    async def read_gatt_char(
        self, characteristic: BleakGATTCharacteristic, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        self._require()
        value: bytes = await self._guard(characteristic.obj.read_value())
        return bytearray(value)

    async def read_gatt_descriptor(
        self, descriptor: BleakGATTDescriptor, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        self._require()
        value: bytes = await self._guard(descriptor.obj.read_value())
        return bytearray(value)

    async def write_gatt_char(
        self, characteristic: BleakGATTCharacteristic, data: SizedBuffer, response: bool
    ) -> None:
        self._require()
        await self._guard(characteristic.obj.write_value(bytes(data), with_response=response))

    async def write_gatt_descriptor(
        self, descriptor: BleakGATTDescriptor, data: SizedBuffer
    ) -> None:
        self._require()
        await self._guard(descriptor.obj.write_value(bytes(data), with_response=True))

    async def start_notify(
        self, characteristic: BleakGATTCharacteristic, callback: NotifyCallback, **kwargs: Any
    ) -> None:
        self._require()
        proxy = characteristic.obj

        def deliver(value: bytes) -> None:
            callback(bytearray(value))

        try:
            await self._guard(proxy.subscribe(deliver, prefer_notify=True))
        except BleakError:
            # Bumble registers the subscriber before writing the CCCD; a refused write must
            # not leave it behind, or a later subscription would deliver every value twice.
            registered = proxy.subscribers.pop(deliver, None)
            for subscribers in (
                proxy.client.notification_subscribers,
                proxy.client.indication_subscribers,
            ):
                subscribers.get(proxy.handle, set()).discard(registered)
            raise

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        self._require()
        await self._guard(characteristic.obj.unsubscribe())
