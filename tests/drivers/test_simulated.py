"""The simulated cuff: deterministic, plausible, and decodable by the real parser."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import datetime, timedelta, timezone

from drivers.blood_pressure import (
    BloodPressureStatus,
    PressureUnit,
    PulseRateRange,
    parse_measurement,
)
from drivers.simulated import SimulatedBloodPressureCuff

NOW = datetime(2026, 11, 26, 9, 0, 0, 123456)
# Apart from the occasional irregular pulse, the simulated patient sits still and well.
CALM = BloodPressureStatus(False, False, False, PulseRateRange.WITHIN, False)


def _cuff(seed: int, now: datetime = NOW) -> SimulatedBloodPressureCuff:
    return SimulatedBloodPressureCuff(rng=random.Random(seed), now=lambda: now)


def test_same_seed_and_clock_give_the_same_bytes() -> None:
    a, b = _cuff(5), _cuff(5)
    assert [a.next_payload() for _ in range(50)] == [b.next_payload() for _ in range(50)]


def test_different_seeds_give_different_readings() -> None:
    assert [_cuff(1).next_payload() for _ in range(5)] != [
        _cuff(2).next_payload() for _ in range(5)
    ]


def test_readings_are_plausible_and_parse_with_the_real_parser() -> None:
    cuff = _cuff(1)
    irregular = 0
    for _ in range(500):
        m = parse_measurement(cuff.next_payload())
        assert m.unit is PressureUnit.MMHG
        assert m.pulse_rate is not None
        assert m.status is not None
        systolic, diastolic = m.systolic.to_decimal(), m.diastolic.to_decimal()
        assert 100 <= systolic <= 170
        assert 60 <= diastolic <= 100
        assert diastolic < m.mean_arterial.to_decimal() < systolic
        assert 55 <= m.pulse_rate.to_decimal() <= 100
        assert m.timestamp == NOW.replace(microsecond=0)
        assert m.user_id == 1
        assert replace(m.status, irregular_pulse=False) == CALM
        assert m.trailing == 0
        irregular += m.status.irregular_pulse
    # Occasional, not never and not always (10 % of 500, with generous slack).
    assert 20 <= irregular <= 90


def test_an_aware_clock_gives_its_wall_time_without_a_zone() -> None:
    aware = datetime(2026, 11, 26, 9, 0, tzinfo=timezone(timedelta(hours=-7)))
    m = parse_measurement(_cuff(3, aware).next_payload())
    assert m.timestamp == datetime(2026, 11, 26, 9, 0)


def test_the_clock_is_read_for_every_reading() -> None:
    ticks = iter([datetime(2026, 1, 1, 8, 0), datetime(2026, 1, 1, 8, 5)])
    cuff = SimulatedBloodPressureCuff(rng=random.Random(0), now=lambda: next(ticks))
    times = [parse_measurement(cuff.next_payload()).timestamp for _ in range(2)]
    assert times == [datetime(2026, 1, 1, 8, 0), datetime(2026, 1, 1, 8, 5)]
