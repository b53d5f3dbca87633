"""Device profiles: which session, decoder and simulated peripheral each profile uses.

A registered device names its profile (``blood_pressure``, ``glucose``, ``weight``,
``pulse_oximetry``, ``thermometer`` for Bluetooth; the serial protocols for serial ports).
This table is the one place that knows which driver code serves which profile.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime

from appliance.device_registry import Device
from drivers.blood_pressure import BloodPressureSession
from drivers.gatt import GattSession
from drivers.simulated import SimulatedCuffPeripheral
from services.simulated_link import SimulatedPeripheral

GATT_PROFILES = ("blood_pressure",)


class UnknownProfileError(ValueError):
    """A device names a profile this build does not have."""


def session_factory(
    device: Device, last_sequence: Callable[[str], int | None]
) -> Callable[[], GattSession]:
    """A factory of new sessions for ``device`` (one per connection).

    ``last_sequence`` gives the highest stored record already filed, read at connect time so a
    reconnect resumes after the records the previous connection stored.
    """
    if device.profile == "blood_pressure":
        return BloodPressureSession
    raise UnknownProfileError(f"device {device.id}: no Bluetooth profile {device.profile!r}")


def simulated_peripheral(
    profile: str, *, rng: random.Random, now: Callable[[], datetime]
) -> SimulatedPeripheral:
    """A simulated peripheral for ``profile`` (demo mode and tests)."""
    if profile == "blood_pressure":
        return SimulatedCuffPeripheral(rng=rng, now=now)
    raise UnknownProfileError(f"no simulated peripheral for profile {profile!r}")
