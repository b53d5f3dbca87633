"""``appliance decode``: what a device's bytes mean, as the box would file them.

A field technician captures a characteristic value (nRF Connect, a sniffer) or a serial dump
and asks what the box makes of it::

    appliance decode --gatt 0x2A35 1E790051006A00EA070B1A081E0F4800FF0C00
    appliance decode --serial nonin-df7 0183...

A measurement prints its FHIR Observations (JSON, without a subject: no patient is
involved); other characteristics (features, RACP answers, battery, a cuff's live pressure)
print their decoded fields. Bytes that do not decode exit with status 2 and a one-line
reason naming the field — the same :class:`~drivers.errors.ProtocolError` the devices
process logs, never a guess.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable
from datetime import UTC, date, datetime, time, tzinfo
from decimal import Decimal
from typing import Any

from appliance.device_registry import Setting
from drivers import (
    blood_pressure,
    gatt,
    glucose,
    line_protocol,
    nonin,
    pulse_oximetry,
    record_access,
    tanita,
    thermometer,
    weight,
)
from drivers.errors import ProtocolError
from drivers.ieee11073 import SFloatValue
from drivers.line_protocol import LineProtocolSpec
from drivers.serial_port import Decoder, SkipEvent
from services import readings, routing
from services.vitals import Capture, CaptureMethod, FhirJson


class DecodeError(ValueError):
    """Input that cannot be decoded; the message is the one line shown to the technician."""


# 16-bit characteristic UUID → (name, parser).
GATT_PARSERS: dict[int, tuple[str, Callable[[bytes], object]]] = {
    0x2A35: ("Blood Pressure Measurement", blood_pressure.parse_measurement),
    0x2A36: ("Intermediate Cuff Pressure", blood_pressure.parse_intermediate_cuff_pressure),
    0x2A18: ("Glucose Measurement", glucose.parse_measurement),
    0x2A34: ("Glucose Measurement Context", glucose.parse_measurement_context),
    0x2A52: ("Record Access Control Point (response)", record_access.parse_racp_response),
    0x2A9D: ("Weight Measurement", weight.parse_measurement),
    0x2A9E: ("Weight Scale Feature", weight.parse_feature),
    0x2A5E: ("PLX Spot-Check Measurement", pulse_oximetry.parse_spot_check),
    0x2A5F: ("PLX Continuous Measurement", pulse_oximetry.parse_continuous),
    0x2A60: ("PLX Features", pulse_oximetry.parse_features),
    0x2A1C: ("Temperature Measurement", thermometer.parse_measurement),
    0x2A1E: ("Intermediate Temperature", thermometer.parse_intermediate_temperature),
    0x2A1D: ("Temperature Type", thermometer.parse_temperature_type),
    0x2A19: ("Battery Level", gatt.parse_battery_level),
}
SERIAL_DECODERS: dict[str, Callable[[], Decoder]] = {
    "nonin-df7": nonin.NoninDf7Decoder,
    "nonin-ascii": nonin.NoninAsciiDecoder,
    "tanita": tanita.TanitaDecoder,
}
_HEX_NOISE = re.compile(r"0x|[\s:,-]", re.IGNORECASE)


def parse_hex(text: str) -> bytes:
    """``1E 79 00``, ``1e7900``, ``1E:79:00`` or ``0x1E 0x79`` → bytes."""
    cleaned = _HEX_NOISE.sub("", text)
    if not cleaned:
        raise DecodeError("no bytes given")
    if len(cleaned) % 2:
        raise DecodeError(f"odd number of hex digits ({len(cleaned)})")
    try:
        return bytes.fromhex(cleaned)
    except ValueError:
        raise DecodeError("not hexadecimal (use 0-9 and A-F)") from None


def parse_uuid16(text: str) -> int:
    """``0x2A35``, ``2A35`` or the full Bluetooth base UUID → the 16-bit number."""
    value = text.strip().lower()
    if value.endswith("-0000-1000-8000-00805f9b34fb") and value.startswith("0000"):
        value = value[4:8]
    try:
        number = int(value.removeprefix("0x"), 16)
    except ValueError:
        raise DecodeError(f"{text!r} is not a characteristic UUID such as 0x2A35") from None
    if number not in GATT_PARSERS:
        known = ", ".join(f"0x{n:04X}" for n in GATT_PARSERS)
        raise DecodeError(f"characteristic 0x{number:04X} is not decoded here; known: {known}")
    return number


def _capture(event: object, received: datetime, zone: tzinfo, method: CaptureMethod) -> Capture:
    facts = readings.describe(event)
    device_time = facts.device_time if facts else None
    clock_not_set = facts.clock_not_set if facts else False
    when = routing.reading_time(device_time, received, zone, clock_not_set=clock_not_set)
    return Capture(Setting.CLINIC, method, when, "decoded by appliance decode")


def _plain(value: Any) -> Any:
    """A decoded dataclass as JSON-friendly data (for non-measurement characteristics)."""
    if isinstance(value, SFloatValue):
        return value.special.value if value.special else value.to_decimal()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            "type": type(value).__name__,
            **{f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)},
        }
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _render(
    events: list[object], received: datetime, zone: tzinfo, method: CaptureMethod
) -> list[FhirJson | dict[str, Any]]:
    out: list[FhirJson | dict[str, Any]] = []
    for event in events:
        if readings.describe(event) is not None:
            out.extend(readings.observations(event, None, _capture(event, received, zone, method)))
        else:
            out.append(_plain(event))
    return out


def decode_gatt(
    uuid16: int, data: bytes, *, received: datetime | None = None, zone: tzinfo = UTC
) -> list[FhirJson | dict[str, Any]]:
    """Decode one characteristic value; raises :class:`DecodeError` with the decoder's reason."""
    name, parser = GATT_PARSERS[uuid16]
    try:
        event = parser(data)
    except ProtocolError as exc:
        text = str(exc)
        raise DecodeError(text if text.startswith(name) else f"{name}: {text}") from None
    return _render([event], received or datetime.now(UTC), zone, CaptureMethod.BLE)


def decode_serial(
    protocol: str,
    data: bytes,
    *,
    line_spec: LineProtocolSpec | None = None,
    received: datetime | None = None,
    zone: tzinfo = UTC,
) -> tuple[list[FhirJson | dict[str, Any]], list[str]]:
    """Decode a serial capture; returns what it means and notes about skipped bytes.

    Raises :class:`DecodeError` when not one complete reading is in ``data``.
    """
    if line_spec is not None:
        decoder: Decoder = line_protocol.LineDecoder(line_spec)
    elif protocol in SERIAL_DECODERS:
        decoder = SERIAL_DECODERS[protocol]()
    else:
        known = ", ".join([*SERIAL_DECODERS, "line:<name>"])
        raise DecodeError(f"no serial protocol {protocol!r}; known: {known}")
    events, notes = [], []
    try:
        found = decoder.feed(data)
    except ProtocolError as exc:
        raise DecodeError(f"{protocol}: {exc}") from None
    for event in found:
        if isinstance(event, SkipEvent):
            notes.append(f"skipped {event.discarded_bytes} bytes: {event.reason}")
        else:
            events.append(event)
    if not events:
        why = "; ".join(notes) or "the data ends before a reading is complete"
        raise DecodeError(f"{protocol}: no complete reading in {len(data)} bytes ({why})")
    return _render(events, received or datetime.now(UTC), zone, CaptureMethod.SERIAL), notes
