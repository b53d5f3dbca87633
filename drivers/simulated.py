"""A simulated blood-pressure cuff for demo mode and tests: realistic 0x2A35 bytes, no I/O."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime

from drivers.blood_pressure import (
    BloodPressureMeasurement,
    BloodPressureStatus,
    PressureUnit,
    PulseRateRange,
    encode_measurement,
)
from drivers.ieee11073 import SFloatValue


class SimulatedBloodPressureCuff:
    """Deterministic for a given RNG and clock; now and then reports an irregular pulse."""

    def __init__(self, *, rng: random.Random, now: Callable[[], datetime]) -> None:
        self._rng = rng
        self._now = now

    def next_measurement(self) -> BloodPressureMeasurement:
        """The next reading as a typed value."""
        rng = self._rng
        systolic = rng.randint(100, 170)
        diastolic = rng.randint(60, min(100, systolic - 25))
        mean = round(diastolic + (systolic - diastolic) / 3)
        irregular = rng.random() < 0.1
        return BloodPressureMeasurement(
            unit=PressureUnit.MMHG,
            systolic=SFloatValue(systolic, 0),
            diastolic=SFloatValue(diastolic, 0),
            mean_arterial=SFloatValue(mean, 0),
            timestamp=self._now().replace(microsecond=0),
            pulse_rate=SFloatValue(rng.randint(55, 100), 0),
            user_id=1,
            status=BloodPressureStatus(False, False, irregular, PulseRateRange.WITHIN, False),
        )

    def next_payload(self) -> bytes:
        """The next reading as the bytes a real cuff indicates on 0x2A35."""
        return encode_measurement(self.next_measurement())
