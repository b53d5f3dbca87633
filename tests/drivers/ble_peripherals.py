"""Emulated GATT health peripherals on Bumble, for the radio-less BLE tests.

:class:`EmulatedPeripheral` is the generic builder: a Bumble device with its own virtual
controller on a :class:`~tests.drivers.bumble_backend.VirtualRadio`'s link, advertising its
name and primary service, serving the services it is given, recording every write and calling
an optional write handler (which may raise ``att.ATT_Error`` to refuse). Tests drive it from
the peripheral side: wait until the box subscribed, indicate or notify values, disconnect.

``requires_bonding=True`` makes the primary service's characteristics and their CCCDs demand
an encrypted link (ATT "Insufficient Encryption" otherwise), as bonded cuffs do: a client that
does not pair cannot subscribe.

Profiles here: :func:`blood_pressure_cuff` (0x1810, values from
``drivers.blood_pressure.encode_measurement`` in the tests), :class:`GlucoseMeter` (0x1808,
with the Record Access Control Point server side written from the Glucose Service 1.0
specification with raw bytes, so it does not depend on ``drivers.glucose``), and
:func:`measurement_peripheral` for the weight scale 0x181D, pulse oximeter 0x1822 and
thermometer 0x1809.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bumble import att, core, hci
from bumble.device import Connection, Device
from bumble.gatt import (
    GATT_CLIENT_CHARACTERISTIC_CONFIGURATION_DESCRIPTOR,
    Characteristic,
    CharacteristicValue,
    Descriptor,
    Service,
)

from drivers.gatt import uuid16
from tests.drivers.bumble_backend import VirtualRadio, bumble_uuid_str, make_device

Props = Characteristic.Properties
WriteHandler = Callable[["EmulatedPeripheral", str, bytes], None]

ADVERTISING_INTERVAL_MS = 5.0  # short, so a scan or a connection finds the device at once
WAIT_SECONDS = 5.0  # bound on every wait: far above the milliseconds things take here


@dataclass(frozen=True, slots=True)
class CharacteristicSpec:
    """One characteristic: UUID (16-bit or full string), properties, initial value."""

    uuid: int | str
    properties: Characteristic.Properties
    value: bytes = b""

    @property
    def full_uuid(self) -> str:
        """The lower-case 128-bit UUID."""
        return uuid16(self.uuid) if isinstance(self.uuid, int) else self.uuid.lower()


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """One primary service and its characteristics."""

    uuid: int | str
    characteristics: Sequence[CharacteristicSpec]


def _bumble_uuid(value: int | str) -> core.UUID:
    return core.UUID.from_16_bits(value) if isinstance(value, int) else core.UUID(value)


def _advertising_data(name: str, service: int | str) -> bytes:
    uuid_bytes = _bumble_uuid(service).to_bytes()
    uuid_type = 0x03 if len(uuid_bytes) == 2 else 0x07  # complete list of 16- / 128-bit UUIDs
    encoded = name.encode()
    return (
        bytes((2, 0x01, 0x06))  # flags: LE general discoverable, BR/EDR not supported
        + bytes((len(uuid_bytes) + 1, uuid_type))
        + uuid_bytes
        + bytes((len(encoded) + 1, 0x09))
        + encoded
    )


class EmulatedPeripheral:
    """A generic GATT peripheral on the virtual radio; see the module docstring."""

    def __init__(
        self,
        radio: VirtualRadio,
        *,
        name: str,
        services: Sequence[ServiceSpec],
        on_write: WriteHandler | None = None,
        requires_bonding: bool = False,
        address: str | None = None,
    ) -> None:
        self.radio = radio
        self.name = name
        self.address = address or radio.next_address()
        self.advertised_service = services[0].uuid
        self.on_write = on_write
        self.requires_bonding = requires_bonding
        self.writes: list[tuple[str, bytes]] = []
        self.connections = 0
        self.connection: Connection | None = None
        self._values: dict[str, bytes] = {}
        self._characteristics: dict[str, Characteristic[bytes]] = {}
        self._subscribed: set[str] = set()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.device, self._controller = make_device(radio.link, name, self.address)
        self.device.on(Device.EVENT_CONNECTION, self._on_connection)
        self.device.on("characteristic_subscription", self._on_subscription)
        for index, service in enumerate(services):
            secure = requires_bonding and index == 0
            self.device.add_service(
                Service(
                    _bumble_uuid(service.uuid),
                    [self._characteristic(c, secure) for c in service.characteristics],
                )
            )

    def _characteristic(self, spec: CharacteristicSpec, secure: bool) -> Characteristic[bytes]:
        uuid = spec.full_uuid
        self._values[uuid] = spec.value
        permissions = att.Attribute.Permissions.READABLE | att.Attribute.Permissions.WRITEABLE
        if secure:
            permissions |= (
                att.Attribute.Permissions.READ_REQUIRES_ENCRYPTION
                | att.Attribute.Permissions.WRITE_REQUIRES_ENCRYPTION
            )
        characteristic: Characteristic[bytes] = Characteristic(
            _bumble_uuid(spec.uuid),
            spec.properties,
            permissions,
            CharacteristicValue(
                read=lambda _connection: self._values[uuid],
                write=lambda _connection, value: self._on_written(uuid, bytes(value)),
            ),
        )
        if secure and spec.properties & (Props.NOTIFY | Props.INDICATE):
            # Our own CCCD, like the server's default one but refusing unencrypted writes.
            characteristic.descriptors = [
                Descriptor(
                    GATT_CLIENT_CHARACTERISTIC_CONFIGURATION_DESCRIPTOR,
                    permissions,
                    self.device.gatt_server.make_descriptor_value(characteristic),
                )
            ]
        self._characteristics[uuid] = characteristic
        return characteristic

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> EmulatedPeripheral:
        """Power on and advertise (again after every disconnection)."""
        await self.device.power_on()
        await self.device.start_advertising(
            auto_restart=True,
            advertising_data=_advertising_data(self.name, self.advertised_service),
            advertising_interval_min=ADVERTISING_INTERVAL_MS,
            advertising_interval_max=ADVERTISING_INTERVAL_MS,
        )
        return self

    async def close(self) -> None:
        """Stop advertising, drop the connection, leave the link."""
        for task in self._tasks:
            task.cancel()
        await self.device.stop_advertising()
        if self.connection is not None:
            await self.disconnect()
        await self.device.power_off()
        self.radio.link.remove_controller(self._controller)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run peripheral-side work after the current ATT exchange (kept until done)."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- events from Bumble -------------------------------------------------------------

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _on_connection(self, connection: Connection) -> None:
        self.connection = connection
        self.connections += 1
        connection.on(Connection.EVENT_DISCONNECTION, self._on_disconnection)
        self._changed_now()

    def _on_disconnection(self, _reason: int) -> None:
        self.connection = None
        self._subscribed.clear()
        self._changed_now()

    def _on_subscription(
        self, _bearer: object, characteristic: Characteristic[bytes], notify: bool, indicate: bool
    ) -> None:
        uuid = bumble_uuid_str(characteristic.uuid)
        if notify or indicate:
            self._subscribed.add(uuid)
        else:
            self._subscribed.discard(uuid)
        self._changed_now()

    def _on_written(self, uuid: str, value: bytes) -> None:
        self.writes.append((uuid, value))
        self._values[uuid] = value
        self._changed_now()
        if self.on_write is not None:
            self.on_write(self, uuid, value)

    # -- what tests call ----------------------------------------------------------------

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait (at most WAIT_SECONDS) until ``predicate()`` holds; re-checked on every
        connection, disconnection, subscription change and write."""

        async def loop() -> None:
            while not predicate():
                await self._changed.wait()

        await asyncio.wait_for(loop(), WAIT_SECONDS)

    def subscribed(self, uuid: int | str) -> bool:
        """Whether the connected client enabled notifications/indications on ``uuid``."""
        return CharacteristicSpec(uuid, Props(0)).full_uuid in self._subscribed

    async def wait_subscribed(self, uuid: int | str) -> None:
        """Wait until the client subscribed to ``uuid``."""
        await self.wait_until(lambda: self.subscribed(uuid))

    def writes_to(self, uuid: int | str) -> list[bytes]:
        """Every value written to ``uuid``, oldest first."""
        full = CharacteristicSpec(uuid, Props(0)).full_uuid
        return [value for written, value in self.writes if written == full]

    def set_value(self, uuid: int | str, value: bytes) -> None:
        """Change what a read of ``uuid`` returns."""
        self._values[CharacteristicSpec(uuid, Props(0)).full_uuid] = value

    async def send(self, uuid: int | str, value: bytes) -> None:
        """Indicate (awaiting the confirmation) or notify ``value``; the client must be subscribed."""
        full = CharacteristicSpec(uuid, Props(0)).full_uuid
        connection = self.connection
        if connection is None or full not in self._subscribed:
            raise AssertionError(f"{self.name}: nobody subscribed to {full}")
        characteristic = self._characteristics[full]
        if characteristic.properties & Props.INDICATE:
            await self.device.indicate_subscriber(connection, characteristic, value)
        else:
            await self.device.notify_subscriber(connection, characteristic, value)

    async def disconnect(self) -> None:
        """Drop the connection from the peripheral side (a cuff switching off)."""
        connection = self.connection
        if connection is not None:
            await connection.disconnect(hci.HCI_REMOTE_USER_TERMINATED_CONNECTION_ERROR)


# -- common services ------------------------------------------------------------------------


def device_information(
    manufacturer: str = "Acme Medical",
    model: str = "BP-100",
    serial: str = "SN0001",
    firmware: str = "1.2.3",
) -> ServiceSpec:
    """Device Information 0x180A with UTF-8 strings."""
    strings = {0x2A29: manufacturer, 0x2A24: model, 0x2A25: serial, 0x2A26: firmware}
    return ServiceSpec(
        0x180A, [CharacteristicSpec(u, Props.READ, s.encode()) for u, s in strings.items()]
    )


def battery(percent: int = 87) -> ServiceSpec:
    """Battery 0x180F with Battery Level 0x2A19."""
    return ServiceSpec(
        0x180F, [CharacteristicSpec(0x2A19, Props.READ | Props.NOTIFY, bytes((percent,)))]
    )


def current_time() -> ServiceSpec:
    """Current Time 0x1805, writable so the box can set the device clock."""
    return ServiceSpec(
        0x1805, [CharacteristicSpec(0x2A2B, Props.READ | Props.WRITE | Props.NOTIFY, bytes(10))]
    )


def blood_pressure_cuff(
    radio: VirtualRadio,
    *,
    name: str = "BP Cuff",
    requires_bonding: bool = False,
    address: str | None = None,
) -> EmulatedPeripheral:
    """A cuff: 0x2A35 indicate, 0x2A36 notify, 0x2A49 feature; DIS, battery, current time."""
    cuff = ServiceSpec(
        0x1810,
        [
            CharacteristicSpec(0x2A35, Props.INDICATE),
            CharacteristicSpec(0x2A36, Props.NOTIFY),
            CharacteristicSpec(0x2A49, Props.READ, b"\x00\x00"),
        ],
    )
    services = [cuff, device_information(), battery(), current_time()]
    return EmulatedPeripheral(
        radio, name=name, services=services, requires_bonding=requires_bonding, address=address
    )


def measurement_peripheral(
    radio: VirtualRadio, *, name: str, service: int, measurement: int, indicate: bool = True
) -> EmulatedPeripheral:
    """A single-measurement device: scale (0x181D/0x2A9D), oximeter (0x1822/0x2A5E), thermometer (0x1809/0x2A1C)."""
    props = Props.INDICATE if indicate else Props.NOTIFY
    services = [
        ServiceSpec(service, [CharacteristicSpec(measurement, props)]),
        device_information(),
        battery(),
        current_time(),
    ]
    return EmulatedPeripheral(radio, name=name, services=services)


# -- glucose meter ---------------------------------------------------------------------------

GLUCOSE_MEASUREMENT = 0x2A18
GLUCOSE_CONTEXT = 0x2A34
GLUCOSE_FEATURE = 0x2A51
RACP = 0x2A52

# Glucose Service 1.0, §3.3 (RACP): op codes, operators, filter, response codes.
OP_REPORT, OP_DELETE, OP_ABORT, OP_COUNT, OP_COUNT_RESPONSE, OP_RESPONSE = 1, 2, 3, 4, 5, 6
(
    OPERATOR_NULL,
    OPERATOR_ALL,
    OPERATOR_LE,
    OPERATOR_GE,
    OPERATOR_RANGE,
    OPERATOR_FIRST,
    OPERATOR_LAST,
) = range(7)
FILTER_SEQUENCE = 0x01
RC_SUCCESS, RC_OP_NOT_SUPPORTED, RC_INVALID_OPERATOR, RC_OPERATOR_NOT_SUPPORTED = 1, 2, 3, 4
(
    RC_INVALID_OPERAND,
    RC_NO_RECORDS,
    RC_ABORT_UNSUCCESSFUL,
    RC_NOT_COMPLETED,
    RC_OPERAND_NOT_SUPPORTED,
) = 5, 6, 7, 8, 9
ATT_CCCD_IMPROPERLY_CONFIGURED = 0xFD  # Core Spec Supplement, common profile error codes
ATT_PROCEDURE_IN_PROGRESS = 0xFE


def glucose_record(sequence: int, when: datetime, mg_dl: int) -> bytes:
    """A 0x2A18 value by hand: flags b1 (concentration + type/location), unit kg/L.

    flags u8, sequence u16, base time (7), concentration SFLOAT in kg/L (mg/dL × 1e-5:
    mantissa mg/dL, exponent -5), type (low nibble 1, capillary whole blood) and sample
    location (high nibble 1, finger).
    """
    sfloat = ((-5 & 0xF) << 12) | (mg_dl & 0x0FFF)
    base_time = struct.pack(
        "<HBBBBB", when.year, when.month, when.day, when.hour, when.minute, when.second
    )
    return struct.pack("<BH", 0x02, sequence) + base_time + struct.pack("<HB", sfloat, 0x11)


class GlucoseMeter:
    """A glucose meter holding stored records and answering RACP requests per the spec.

    ``disconnect_after``: drop the link after that many record notifications during a
    download (once), as a meter walking out of range does.
    """

    def __init__(
        self,
        radio: VirtualRadio,
        records: Sequence[tuple[int, bytes]],
        *,
        name: str = "Glucose Meter",
        disconnect_after: int | None = None,
    ) -> None:
        self.records = list(records)  # (sequence number, 0x2A18 value), ascending
        self.disconnect_after = disconnect_after
        self.requests: list[bytes] = []
        self.sent: list[int] = []  # sequence numbers notified, across connections
        self._busy = False
        glucose = ServiceSpec(
            0x1808,
            [
                CharacteristicSpec(GLUCOSE_MEASUREMENT, Props.NOTIFY),
                CharacteristicSpec(GLUCOSE_CONTEXT, Props.NOTIFY),
                CharacteristicSpec(GLUCOSE_FEATURE, Props.READ, b"\x00\x00"),
                CharacteristicSpec(RACP, Props.WRITE | Props.INDICATE),
            ],
        )
        services = [glucose, device_information(model="GL-50"), battery(), current_time()]
        self.peripheral = EmulatedPeripheral(
            radio, name=name, services=services, on_write=self._on_write
        )

    def _on_write(self, peripheral: EmulatedPeripheral, uuid: str, value: bytes) -> None:
        if uuid != uuid16(RACP):
            return
        # §3.3.1: measurement notifications and RACP indications must be enabled first.
        if not (peripheral.subscribed(GLUCOSE_MEASUREMENT) and peripheral.subscribed(RACP)):
            raise att.ATT_Error(ATT_CCCD_IMPROPERLY_CONFIGURED)
        if len(value) < 2:
            raise att.ATT_Error(att.ErrorCode.INVALID_ATTRIBUTE_LENGTH)
        op, operator, operand = value[0], value[1], value[2:]
        if self._busy and op != OP_ABORT:
            raise att.ATT_Error(ATT_PROCEDURE_IN_PROGRESS)
        self.requests.append(value)
        if op == OP_ABORT:
            self._busy = False
            peripheral.spawn(
                self._respond(op, RC_SUCCESS if operator == OPERATOR_NULL else RC_INVALID_OPERATOR)
            )
            return
        if op not in (OP_REPORT, OP_COUNT):
            peripheral.spawn(self._respond(op, RC_OP_NOT_SUPPORTED))
            return
        selected = self._select(operator, operand)
        if isinstance(selected, int):
            peripheral.spawn(self._respond(op, selected))
        elif op == OP_COUNT:
            peripheral.spawn(
                self._indicate(
                    bytes((OP_COUNT_RESPONSE, OPERATOR_NULL)) + struct.pack("<H", len(selected))
                )
            )
        elif not selected:
            peripheral.spawn(self._respond(op, RC_NO_RECORDS))
        else:
            self._busy = True
            peripheral.spawn(self._report(selected))

    def _select(self, operator: int, operand: bytes) -> list[tuple[int, bytes]] | int:
        """The records an operator selects, or a response code."""
        if operator == OPERATOR_ALL:
            return self.records if not operand else RC_INVALID_OPERAND
        if operator == OPERATOR_FIRST:
            return self.records[:1]
        if operator == OPERATOR_LAST:
            return self.records[-1:]
        if operator not in (OPERATOR_LE, OPERATOR_GE, OPERATOR_RANGE):
            return (
                RC_INVALID_OPERATOR
                if operator == OPERATOR_NULL or operator > OPERATOR_LAST
                else RC_OPERATOR_NOT_SUPPORTED
            )
        if not operand or operand[0] != FILTER_SEQUENCE:
            return RC_OPERAND_NOT_SUPPORTED
        need = 5 if operator == OPERATOR_RANGE else 3
        if len(operand) != need:
            return RC_INVALID_OPERAND
        low, high = 0, 0xFFFF
        if operator == OPERATOR_GE:
            (low,) = struct.unpack_from("<H", operand, 1)
        elif operator == OPERATOR_LE:
            (high,) = struct.unpack_from("<H", operand, 1)
        else:
            low, high = struct.unpack_from("<HH", operand, 1)
            if low > high:
                return RC_INVALID_OPERAND
        return [(seq, value) for seq, value in self.records if low <= seq <= high]

    async def _report(self, selected: list[tuple[int, bytes]]) -> None:
        peripheral = self.peripheral
        try:
            for sent, (sequence, value) in enumerate(selected):
                if not self._busy:
                    return  # aborted
                if self.disconnect_after is not None and sent == self.disconnect_after:
                    self.disconnect_after = None
                    await peripheral.disconnect()
                    return
                await peripheral.send(GLUCOSE_MEASUREMENT, value)
                self.sent.append(sequence)
        finally:
            self._busy = False
        await self._respond(OP_REPORT, RC_SUCCESS)

    async def _respond(self, request_op: int, code: int) -> None:
        await self._indicate(bytes((OP_RESPONSE, OPERATOR_NULL, request_op, code)))

    async def _indicate(self, value: bytes) -> None:
        await self.peripheral.send(RACP, value)
