"""The simulated cuff: deterministic, plausible, and decodable by the real parser."""

from __future__ import annotations

import random
from datetime import datetime

from drivers.blood_pressure import parse_measurement
from drivers.simulated import SimulatedBloodPressureCuff

NOW = datetime(2026, 11, 26, 9, 0)  # noqa: DTZ001


def test_same_seed_same_readings() -> None:
    a = SimulatedBloodPressureCuff(rng=random.Random(5), now=lambda: NOW)
    b = SimulatedBloodPressureCuff(rng=random.Random(5), now=lambda: NOW)
    assert [a.next_payload() for _ in range(20)] == [b.next_payload() for _ in range(20)]


def test_readings_are_plausible_and_parse() -> None:
    cuff = SimulatedBloodPressureCuff(rng=random.Random(1), now=lambda: NOW)
    for _ in range(200):
        m = parse_measurement(cuff.next_payload())
        assert 100 <= m.systolic.to_decimal() <= 170
        assert 60 <= m.diastolic.to_decimal() < m.systolic.to_decimal()
        assert m.timestamp == NOW
