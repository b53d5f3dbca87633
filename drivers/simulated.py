"""A simulated blood-pressure cuff for demo mode and tests: realistic 0x2A35 bytes, no I/O.

The cuff is deterministic for a given RNG and clock (STYLE.md convention 3), does no I/O and
never sleeps: the devices process calls :meth:`SimulatedBloodPressureCuff.next_payload` on its
own timer and feeds the bytes to the same parser a real cuff's indications go through.
"""

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
