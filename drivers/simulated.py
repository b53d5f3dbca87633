"""A simulated blood-pressure cuff for demo mode and tests: realistic 0x2A35 bytes, no I/O.

The cuff is deterministic for a given RNG and clock (STYLE.md convention 3), does no I/O and
never sleeps: the devices process calls :meth:`SimulatedBloodPressureCuff.next_payload` on its
own timer and feeds the bytes to the same parser a real cuff's indications go through.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from drivers.blood_pressure import (
    INTERMEDIATE_CUFF_PRESSURE,
    MEASUREMENT,
    BloodPressureMeasurement,
    BloodPressureStatus,
    PressureUnit,
    PulseRateRange,
    encode_measurement,
)
from drivers.gatt import BATTERY_LEVEL, CURRENT_TIME, uuid16
from drivers.ieee11073 import SFloatValue, decode_datetime

# Plausible adult ranges (mmHg, beats/min) for a demo, not a clinical model.
SYSTOLIC_RANGE = (100, 170)
DIASTOLIC_RANGE = (60, 100)
PULSE_RANGE = (55, 100)
MIN_PULSE_PRESSURE = 25  # systolic - diastolic, so a reading never looks inverted
IRREGULAR_PULSE_RATE = 0.1  # share of readings flagged "irregular pulse"


class SimulatedBloodPressureCuff:
    """Generates 0x2A35 Blood Pressure Measurement values, as a real cuff would indicate them.

    ``rng`` supplies every random choice and ``now`` the cuff's clock, whose wall-clock
    fields are written as the time stamp (the format has no zone, so any tzinfo is dropped
    and the receiver attaches the site's zone). Readings are whole mmHg, as cuffs send them.
    """

    def __init__(
        self, *, rng: random.Random, now: Callable[[], datetime], user_id: int = 1
    ) -> None:
        self._rng = rng
        self._now = now
        self._user_id = user_id

    def next_measurement(self) -> BloodPressureMeasurement:
        """The next reading as a typed value (what :meth:`next_payload` encodes)."""
        rng = self._rng
        systolic = rng.randint(*SYSTOLIC_RANGE)
        diastolic = rng.randint(
            DIASTOLIC_RANGE[0], min(DIASTOLIC_RANGE[1], systolic - MIN_PULSE_PRESSURE)
        )
        # The usual estimate MAP = DBP + (SBP - DBP) / 3, rounded to a whole mmHg.
        mean_arterial = round(diastolic + (systolic - diastolic) / 3)
        pulse = rng.randint(*PULSE_RANGE)
        irregular = rng.random() < IRREGULAR_PULSE_RATE
        return BloodPressureMeasurement(
            unit=PressureUnit.MMHG,
            systolic=SFloatValue(systolic, 0),
            diastolic=SFloatValue(diastolic, 0),
            mean_arterial=SFloatValue(mean_arterial, 0),
            timestamp=self._now().replace(microsecond=0, tzinfo=None),
            pulse_rate=SFloatValue(pulse, 0),
            user_id=self._user_id,
            status=BloodPressureStatus(
                body_movement=False,
                cuff_too_loose=False,
                irregular_pulse=irregular,
                pulse_rate_range=PulseRateRange.WITHIN,
                improper_position=False,
            ),
        )

    def next_payload(self) -> bytes:
        """The next reading as the bytes a real cuff indicates on 0x2A35."""
        return encode_measurement(self.next_measurement())


class SimulatedGattPeripheral:
    """A simulated device's GATT table: Device Information, battery and a settable clock.

    Profile peripherals subclass it and add their characteristics. The device clock starts
    wrong by ``clock_error`` (as a real device's does after a battery change) and is right
    once the box writes Current Time; a device's time stamps come from :meth:`device_now`.
    """

    def __init__(
        self,
        *,
        now: Callable[[], datetime],
        manufacturer: str = "Simulated Devices Inc.",
        model: str = "SIM-1",
        serial_number: str = "SIM-000001",
        firmware: str = "1.0.0",
        battery: int = 87,
        clock_error: timedelta = timedelta(hours=-3),
    ) -> None:
        self._now = now
        self._clock_offset = clock_error
        self.values: dict[str, bytes] = {
            uuid16(0x2A29): manufacturer.encode(),
            uuid16(0x2A24): model.encode(),
            uuid16(0x2A25): serial_number.encode(),
            uuid16(0x2A26): firmware.encode(),
            BATTERY_LEVEL: bytes([battery]),
            CURRENT_TIME: b"",
        }
        self.time_writes: list[bytes] = []

    def device_now(self) -> datetime:
        """The device's own (naive) wall clock."""
        return (self._now() + self._clock_offset).replace(microsecond=0, tzinfo=None)

    def has(self, uuid: str) -> bool:
        """Whether the peripheral has this characteristic."""
        return uuid in self.values

    def read(self, uuid: str) -> bytes:
        """The stored value of a characteristic."""
        return self.values[uuid]

    def write(self, uuid: str, value: bytes) -> list[tuple[str, bytes]]:
        """Current Time sets the device clock; other writes are kept as the value."""
        if uuid == CURRENT_TIME:
            self.time_writes.append(value)
            written = decode_datetime(value, 0)
            if written is not None:
                self._clock_offset = written - self._now().replace(tzinfo=None)
            return []
        self.values[uuid] = value
        return []

    def take_reading(self) -> list[tuple[str, bytes]]:
        """Profile peripherals override this."""
        return []


class SimulatedCuffPeripheral(SimulatedGattPeripheral):
    """A blood-pressure cuff (service 0x1810) indicating 0x2A35 measurements."""

    def __init__(self, *, rng: random.Random, now: Callable[[], datetime], **info: Any) -> None:
        super().__init__(now=now, model=info.pop("model", "SIM-BP"), **info)
        self.values[MEASUREMENT] = b""
        self.values[INTERMEDIATE_CUFF_PRESSURE] = b""
        self.cuff = SimulatedBloodPressureCuff(rng=rng, now=self.device_now)

    def take_reading(self) -> list[tuple[str, bytes]]:
        """One measurement indication."""
        return [(MEASUREMENT, self.cuff.next_payload())]
