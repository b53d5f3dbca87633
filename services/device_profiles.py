"""Device profiles: which session, decoder and simulated peripheral each profile uses.

A registered device names its profile (``blood_pressure``, ``glucose``, ``weight``,
``pulse_oximetry``, ``thermometer`` for Bluetooth; the serial protocols for serial ports).
This table is the one place that knows which driver code serves which profile.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime

from appliance.config import Config
from appliance.device_registry import Device, Transport
from appliance.errors import ApplianceError
from drivers import (
    blood_pressure,
    glucose,
    line_protocol,
    nonin,
    pulse_oximetry,
    tanita,
    thermometer,
    weight,
)
from drivers.blood_pressure import BloodPressureSession
from drivers.gatt import GattSession
from drivers.glucose import GlucoseSession
from drivers.pulse_oximetry import PulseOximeterSession
from drivers.serial_port import Decoder
from drivers.simulated import (
    SimulatedCuffPeripheral,
    SimulatedGlucoseMeter,
    SimulatedNoninAscii,
    SimulatedNoninDf7,
    SimulatedOximeter,
    SimulatedScale,
    SimulatedTanita,
    SimulatedThermometer,
)
from drivers.thermometer import ThermometerSession
from drivers.weight import WeightScaleSession
from services.simulated_link import SimulatedPeripheral, SimulatedSerialDevice

_SESSIONS: dict[str, type] = {
    "blood_pressure": BloodPressureSession,
    "glucose": GlucoseSession,
    "weight": WeightScaleSession,
    "pulse_oximetry": PulseOximeterSession,
    "thermometer": ThermometerSession,
}
_PERIPHERALS: dict[str, Callable[..., SimulatedPeripheral]] = {
    "blood_pressure": SimulatedCuffPeripheral,
    "glucose": SimulatedGlucoseMeter,
    "weight": SimulatedScale,
    "pulse_oximetry": SimulatedOximeter,
    "thermometer": SimulatedThermometer,
}
_SERVICES = {
    "blood_pressure": blood_pressure.SERVICE,
    "glucose": glucose.SERVICE,
    "weight": weight.SERVICE,
    "pulse_oximetry": pulse_oximetry.SERVICE,
    "thermometer": thermometer.SERVICE,
}
GATT_PROFILES = tuple(_SESSIONS)
SIMULATED_PROFILES = tuple(_PERIPHERALS)


class UnknownProfileError(ApplianceError):
    """A device names a profile this build does not have."""


def session_factory(
    device: Device, last_sequence: Callable[[str], int | None]
) -> Callable[[], GattSession]:
    """A factory of new sessions for ``device`` (one per connection).

    ``last_sequence`` gives the highest stored record already filed, read at connect time so a
    reconnect resumes after the records the previous connection stored.
    """
    if device.profile == "glucose":
        device_id = device.id
        return lambda: GlucoseSession(last_sequence=last_sequence(device_id))
    session: Callable[[], GattSession] | None = _SESSIONS.get(device.profile)
    if session is None:
        raise UnknownProfileError(f"device {device.id}: no Bluetooth profile {device.profile!r}")
    return session


# Serial profiles: (decoder factory, default baud rate). Nonin real-time outputs run at
# 9600 baud (REFERENCE.md); Tanita analysers print at 9600 by default too (their manuals);
# an address "port@baud" overrides it.
_SERIAL: dict[str, tuple[Callable[[], Decoder], int]] = {
    "nonin-df7": (nonin.NoninDf7Decoder, 9600),
    "nonin-ascii": (nonin.NoninAsciiDecoder, 9600),
    "tanita": (tanita.TanitaDecoder, 9600),
}
_SIMULATED_SERIAL: dict[str, Callable[..., SimulatedSerialDevice]] = {
    "nonin-df7": SimulatedNoninDf7,
    "nonin-ascii": SimulatedNoninAscii,
    "tanita": SimulatedTanita,
}
SERIAL_PROFILES = tuple(_SERIAL)
SIMULATED_PROFILES = (*SIMULATED_PROFILES, *_SIMULATED_SERIAL)
DEFAULT_LINE_BAUD = 9600


def is_serial(profile: str) -> bool:
    """Whether a profile is a serial protocol (built in, or ``line:<name>``)."""
    return profile in _SERIAL or profile.startswith("line:")


def serial_port(device: Device, config: Config) -> tuple[str, int, Callable[[], Decoder]]:
    """Port path, baud rate and decoder factory of a serial device (``address`` = port[@baud])."""
    if not device.address:
        raise UnknownProfileError(f"serial device {device.id} has no port (address)")
    port, _, baud_text = device.address.partition("@")
    if device.profile.startswith("line:"):
        spec = config.devices.line_protocol(device.profile.removeprefix("line:"))
        if spec is None:
            raise UnknownProfileError(
                f"device {device.id}: no [[devices.line_protocol]] named "
                f"{device.profile.removeprefix('line:')!r} in the site config"
            )
        factory: Callable[[], Decoder] = lambda: line_protocol.LineDecoder(spec)  # noqa: E731
        baud = DEFAULT_LINE_BAUD
    elif device.profile in _SERIAL:
        factory, baud = _SERIAL[device.profile]
    else:
        raise UnknownProfileError(f"device {device.id}: no serial profile {device.profile!r}")
    if baud_text:
        if not baud_text.isdigit():
            raise UnknownProfileError(
                f"device {device.id}: baud rate {baud_text!r} is not a number"
            )
        baud = int(baud_text)
    return port, baud, factory


def simulated_serial(
    profile: str, *, rng: random.Random, now: Callable[[], datetime]
) -> tuple[SimulatedSerialDevice, Decoder]:
    """A simulated serial device and the real decoder for its bytes."""
    make = _SIMULATED_SERIAL.get(profile)
    if make is None:
        raise UnknownProfileError(f"no simulated serial device for profile {profile!r}")
    return make(rng=rng, now=now), _SERIAL[profile][0]()


def check_profile(profile: str, transport: Transport, config: Config) -> None:
    """Refuse a profile the transport cannot serve, naming the ones it can."""
    if transport is Transport.BLE:
        known: tuple[str, ...] = GATT_PROFILES
    elif transport is Transport.SIMULATED:
        known = SIMULATED_PROFILES
    elif transport is Transport.SERIAL:
        known = (*SERIAL_PROFILES, *(f"line:{name}" for name in config.devices.line_protocols))
    else:
        return  # a vendor hub posts readings of any kind
    if profile not in known:
        raise UnknownProfileError(
            f"profile {profile!r} is not a {transport.value} profile; known: {', '.join(known) or 'none'}"
        )


def service_uuid(profile: str) -> str:
    """The primary service a device of this Bluetooth profile advertises."""
    if profile not in _SESSIONS:
        raise UnknownProfileError(f"no Bluetooth profile {profile!r}")
    return _SERVICES[profile]


def simulated_peripheral(
    profile: str, *, rng: random.Random, now: Callable[[], datetime]
) -> SimulatedPeripheral:
    """A simulated peripheral for ``profile`` (demo mode and tests)."""
    make = _PERIPHERALS.get(profile)
    if make is None:
        raise UnknownProfileError(f"no simulated peripheral for profile {profile!r}")
    return make(rng=rng, now=now)
