"""A simulated blood-pressure cuff for demo mode and tests: realistic 0x2A35 bytes, no I/O.

The cuff is deterministic for a given RNG and clock (STYLE.md convention 3), does no I/O and
never sleeps: the devices process calls :meth:`SimulatedBloodPressureCuff.next_payload` on its
own timer and feeds the bytes to the same parser a real cuff's indications go through.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from drivers import glucose, nonin, pulse_oximetry, record_access, tanita, thermometer, weight
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
from drivers.glucose import GlucoseMeasurement
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
        # A device that stores readings (a glucose meter) asks for a new connection after a
        # test; the transport reconnects and the session downloads what is new.
        self.wants_reconnect = False

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


class SimulatedGlucoseMeter(SimulatedGattPeripheral):
    """A glucose meter (0x1808) holding numbered records and answering RACP requests.

    A new test adds a record to the meter's memory and asks to be connected again (a real
    meter advertises after a test); the box then downloads what it has not seen. Only the
    requests a glucose session makes are answered (report all / >= n / <= n); others get
    "op code not supported", as a real meter's subset would.
    """

    def __init__(self, *, rng: random.Random, now: Callable[[], datetime], **info: Any) -> None:
        super().__init__(now=now, model=info.pop("model", "SIM-GLU"), **info)
        self._rng = rng
        self.records: list[GlucoseMeasurement] = []
        for uuid in (
            glucose.MEASUREMENT,
            glucose.MEASUREMENT_CONTEXT,
            glucose.RECORD_ACCESS_CONTROL_POINT,
        ):
            self.values[uuid] = b""

    def take_reading(self) -> list[tuple[str, bytes]]:
        """A finger-stick test: stored, then the meter asks for a connection."""
        mg_dl = self._rng.randint(70, 220)
        self.records.append(
            GlucoseMeasurement(
                sequence_number=len(self.records) + 1,
                base_time=self.device_now(),
                time_offset=0,
                # mg/dL × 10^-5 = kg/L: the wire unit (REFERENCE.md).
                concentration=SFloatValue(mg_dl, -5),
                unit=glucose.GlucoseUnit.KG_PER_L,
                sample_type=glucose.SampleType.CAPILLARY_WHOLE_BLOOD,
                sample_location=glucose.SampleLocation.FINGER,
            )
        )
        self.wants_reconnect = True
        return []

    def write(self, uuid: str, value: bytes) -> list[tuple[str, bytes]]:
        """RACP requests are answered with records then a response-code indication."""
        if uuid != glucose.RECORD_ACCESS_CONTROL_POINT:
            return super().write(uuid, value)
        self.wants_reconnect = False
        op, operator, rest = value[0], value[1], value[2:]
        if op != record_access.RacpOpCode.REPORT_STORED_RECORDS:
            return [self._answer(op, record_access.RacpResponseCode.OP_CODE_NOT_SUPPORTED)]
        if operator == record_access.RacpOperator.ALL:
            chosen = self.records
        elif operator in (
            record_access.RacpOperator.GREATER_OR_EQUAL,
            record_access.RacpOperator.LESS_OR_EQUAL,
        ):
            bound = int.from_bytes(rest[1:3], "little")
            newer = operator == record_access.RacpOperator.GREATER_OR_EQUAL
            chosen = [
                r
                for r in self.records
                if (r.sequence_number >= bound if newer else r.sequence_number <= bound)
            ]
        else:
            return [self._answer(op, record_access.RacpResponseCode.OPERATOR_NOT_SUPPORTED)]
        if not chosen:
            return [self._answer(op, record_access.RacpResponseCode.NO_RECORDS_FOUND)]
        sent = [(glucose.MEASUREMENT, glucose.encode_measurement(r)) for r in chosen]
        return [*sent, self._answer(op, record_access.RacpResponseCode.SUCCESS)]

    @staticmethod
    def _answer(op: int, code: record_access.RacpResponseCode) -> tuple[str, bytes]:
        response = record_access.RacpResponse(op, code)
        return (glucose.RECORD_ACCESS_CONTROL_POINT, record_access.encode_racp_response(response))


class SimulatedScale(SimulatedGattPeripheral):
    """A weight scale (0x181D) with BMI and height, 0.05 kg resolution."""

    def __init__(self, *, rng: random.Random, now: Callable[[], datetime], **info: Any) -> None:
        super().__init__(now=now, model=info.pop("model", "SIM-SCALE"), **info)
        self._rng = rng
        self.values[weight.MEASUREMENT] = b""
        self.values[weight.FEATURE] = weight.encode_feature(
            weight.WeightScaleFeature(True, False, True, 1, 1)
        )

    def take_reading(self) -> list[tuple[str, bytes]]:
        """A weighing: 50-120 kg in 0.05 kg steps, height 1.50-1.95 m."""
        kg = Decimal(self._rng.randint(1000, 2400)) * Decimal("0.05")
        height = Decimal(self._rng.randint(1500, 1950)) / 1000
        bmi = (kg / (height * height)).quantize(Decimal("0.1"))
        m = weight.WeightMeasurement(
            units=weight.WeightUnits.SI,
            weight=kg,
            timestamp=self.device_now(),
            user_id=1,
            bmi=bmi,
            height=height,
        )
        return [(weight.MEASUREMENT, weight.encode_measurement(m))]


class SimulatedOximeter(SimulatedGattPeripheral):
    """A pulse oximeter (0x1822) sending PLX spot checks."""

    def __init__(self, *, rng: random.Random, now: Callable[[], datetime], **info: Any) -> None:
        super().__init__(now=now, model=info.pop("model", "SIM-OX"), **info)
        self._rng = rng
        self.values[pulse_oximetry.SPOT_CHECK] = b""

    def take_reading(self) -> list[tuple[str, bytes]]:
        """A spot check: SpO2 90-100 %, pulse 55-110 /min."""
        m = pulse_oximetry.SpotCheckMeasurement(
            spo2=SFloatValue(self._rng.randint(90, 100), 0),
            pulse_rate=SFloatValue(self._rng.randint(55, 110), 0),
            timestamp=self.device_now(),
        )
        return [(pulse_oximetry.SPOT_CHECK, pulse_oximetry.encode_spot_check(m))]


class SimulatedThermometer(SimulatedGattPeripheral):
    """An ear thermometer (0x1809) sending body temperatures in °C."""

    def __init__(self, *, rng: random.Random, now: Callable[[], datetime], **info: Any) -> None:
        super().__init__(now=now, model=info.pop("model", "SIM-THERMO"), **info)
        self._rng = rng
        self.values[thermometer.MEASUREMENT] = b""

    def take_reading(self) -> list[tuple[str, bytes]]:
        """A temperature between 36.0 and 39.4 °C, in tenths."""
        m = thermometer.TemperatureMeasurement(
            unit=thermometer.TemperatureUnit.CELSIUS,
            temperature=SFloatValue(self._rng.randint(360, 394), -1),
            timestamp=self.device_now(),
            temperature_type=thermometer.TemperatureType.EAR,
        )
        return [(thermometer.MEASUREMENT, thermometer.encode_measurement(m))]


# -- serial devices: the bytes a real device writes to its port ----------------------------------


class SimulatedNoninDf7:
    """A Nonin oximeter in Data Format #7: one 125-byte packet per reading (3 a second live)."""

    def __init__(self, *, rng: random.Random, now: Callable[[], datetime]) -> None:
        self._rng = rng

    def next_bytes(self) -> bytes:
        """One packet with SpO2 90-100 % and pulse 55-110 /min."""
        return nonin.encode_df7_packet(self._rng.randint(90, 100), self._rng.randint(55, 110))


class SimulatedNoninAscii:
    """A Nonin oximeter printing ``SPO2=097 HR=072`` lines."""

    def __init__(self, *, rng: random.Random, now: Callable[[], datetime]) -> None:
        self._rng = rng

    def next_bytes(self) -> bytes:
        """One line."""
        reading = nonin.NoninAsciiReading(self._rng.randint(90, 100), self._rng.randint(55, 110))
        return nonin.encode_ascii_line(reading)


class SimulatedTanita:
    """A Tanita TBF-310 body-composition analyser printing one result line per weighing."""

    def __init__(self, *, rng: random.Random, now: Callable[[], datetime]) -> None:
        self._rng = rng

    def next_bytes(self) -> bytes:
        """One result line for an adult of 50-120 kg."""
        rng = self._rng
        weight = Decimal(rng.randint(500, 1200)) / 10
        height = Decimal(rng.randint(150, 195))
        fat = Decimal(rng.randint(120, 380)) / 10
        fat_mass = (weight * fat / 100).quantize(Decimal("0.1"))
        lean = weight - fat_mass
        result = tanita.TanitaResult(
            model=tanita.TanitaModel.TBF_310,
            body_type=tanita.BodyType.STANDARD,
            gender=rng.choice(list(tanita.Gender)),
            age=rng.randint(20, 85),
            height=height,
            weight=weight,
            mass_unit=tanita.MassUnit.KG,
            impedance=rng.randint(400, 650),
            fat_percent=fat,
            fat_mass=fat_mass,
            fat_free_mass=lean,
            total_body_water=(lean * Decimal("0.73")).quantize(Decimal("0.1")),
            bmi=(weight / (height / 100) ** 2).quantize(Decimal("0.1")),
            bmr_kj=rng.randint(5500, 9500),
        )
        return tanita.encode_result_line(result)
