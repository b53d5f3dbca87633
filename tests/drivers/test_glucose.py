"""0x2A18 / 0x2A34 / 0x2A52 decoding and the glucose session's record transfer.

Vectors marked "Nordic" are the byte arrays of NordicSemiconductor/Android-BLE-Library,
ble-common/src/test/java/no/nordicsemi/android/ble/common/callback/glucose/
GlucoseMeasurementDataCallbackTest.java (commit 48dfb5b0),
GlucoseMeasurementContextDataCallbackTest.java (commit 47ffb895) and
.../callback/RecordAccessControlPointDataCallbackTest.java (commit 48dfb5b0), decoded here
against the Glucose Service 1.0.1 layout (§3.1-§3.3), not copied from Nordic's assertions.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from datetime import datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.errors import ProtocolError
from drivers.gatt import BATTERY_LEVEL, BatteryLevel, Subscribe, WriteCharacteristic
from drivers.glucose import (
    MEASUREMENT,
    MEASUREMENT_CONTEXT,
    RECORD_ACCESS_CONTROL_POINT,
    Carbohydrate,
    GlucoseMeasurement,
    GlucoseMeasurementContext,
    GlucoseSensorStatus,
    GlucoseSession,
    GlucoseUnit,
    Health,
    Meal,
    Medication,
    RecordTransferComplete,
    RecordTransferFailed,
    SampleLocation,
    SampleType,
    encode_measurement,
    encode_measurement_context,
    parse_measurement,
    parse_measurement_context,
    to_clinical_units,
)
from drivers.glucose import Tester as GlucoseTester  # a "Test*" name would be collected
from drivers.ieee11073 import SFloatValue, Special
from drivers.record_access import (
    RacpOpCode,
    RacpOperator,
    RacpRequest,
    RacpResponse,
    RacpResponseCode,
    StoredRecordCount,
    encode_racp_request,
    encode_racp_response,
    parse_racp_response,
)

# Nordic onGlucoseMeasurementReceived: flags 0x1B (time offset, concentration + type/location,
# kg/L, status, context follows); seq 1; base 2019-02-27 11:10:30; offset -5 min; 30 kg/L
# (SFLOAT 1E 00); type/location 0x12 = type 2 capillary plasma (LOW nibble), location 1
# finger (HIGH nibble); status 0x0105 = bits 0 battery low, 2 sample size insufficient, 8
# temperature too low (Nordic's comment calls bit 2 "device fault"; the spec says otherwise).
NORDIC = bytes([0x1B, 1, 0, 0xE3, 0x07, 2, 27, 11, 10, 30, 0xFB, 0xFF, 30, 0, 0x12, 0x05, 0x01])
NORDIC_EXPECTED = GlucoseMeasurement(
    sequence_number=1,
    base_time=datetime(2019, 2, 27, 11, 10, 30),
    time_offset=-5,
    concentration=SFloatValue(30, 0),
    unit=GlucoseUnit.KG_PER_L,
    sample_type=SampleType.CAPILLARY_PLASMA,
    sample_location=SampleLocation.FINGER,
    status=GlucoseSensorStatus(
        device_battery_low=True, sample_size_insufficient=True, temperature_too_low=True
    ),
    context_follows=True,
)

# Built from GLS §3.1: flags 0x06 (concentration, mol/L); seq 0x0102; 2026-03-14 07:45:00;
# 0.0056 mol/L = 56 × 10^-4 (SFLOAT 0xC038); type 1 capillary whole blood, location 2 AST.
MMOL = bytes.fromhex("06 0201 EA07030E072D00 38C0 21")
MMOL_EXPECTED = GlucoseMeasurement(
    sequence_number=0x0102,
    base_time=datetime(2026, 3, 14, 7, 45),
    concentration=SFloatValue(56, -4),
    unit=GlucoseUnit.MOL_PER_L,
    sample_type=SampleType.CAPILLARY_WHOLE_BLOOD,
    sample_location=SampleLocation.ALTERNATE_SITE,
)

# Built from GLS §3.1: flags 0x00, seq 0xFFFF, base time "not known" (all zero).
MINIMAL = bytes.fromhex("00 FFFF 00000000000000")
MINIMAL_EXPECTED = GlucoseMeasurement(sequence_number=0xFFFF, base_time=None)

VECTORS = [
    pytest.param(NORDIC, NORDIC_EXPECTED, id="nordic"),
    pytest.param(MMOL, MMOL_EXPECTED, id="mmol"),
    pytest.param(MINIMAL, MINIMAL_EXPECTED, id="minimal"),
]

# Nordic onGlucoseMeasurementContextReceived_full: flags 0xFF; seq 0; extended flags 0xB3;
# carbohydrate 3 dinner, 100 kg; meal 4 casual; tester/health 0x12 = tester 2 health care
# professional (LOW nibble), health 1 minor issues (HIGH); exercise 60 s at 50 %; medication 4
# long acting insulin, 123.4 (bit 5: litres); HbA1c 34.5 %. Nordic writes its SFLOATs with its
# own encoder; these SFLOAT bytes are ours (64 00 = 100, D2 F4 = 1234e-1, 59 F1 = 345e-1).
CONTEXT_FULL = bytes.fromhex("FF 0000 B3 03 6400 04 12 3C00 32 04 D2F4 59F1")
CONTEXT_FULL_EXPECTED = GlucoseMeasurementContext(
    sequence_number=0,
    extended_flags=0xB3,
    carbohydrate=Carbohydrate.DINNER,
    carbohydrate_amount=SFloatValue(100, 0),
    meal=Meal.CASUAL,
    tester=GlucoseTester.HEALTH_CARE_PROFESSIONAL,
    health=Health.MINOR_ISSUES,
    exercise_duration=60,
    exercise_intensity=50,
    medication=Medication.LONG_ACTING_INSULIN,
    medication_amount=SFloatValue(1234, -1),
    medication_in_litres=True,
    hba1c=SFloatValue(345, -1),
)


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_measurement_decodes_to_the_whole_expected_object(
    data: bytes, expected: GlucoseMeasurement
) -> None:
    assert parse_measurement(data) == expected


@pytest.mark.parametrize(("data", "expected"), VECTORS[:2])
def test_encoder_reproduces_the_vector_bytes(data: bytes, expected: GlucoseMeasurement) -> None:
    assert encode_measurement(expected) == data


def test_effective_time_is_base_time_plus_offset() -> None:
    assert parse_measurement(NORDIC).time == datetime(2019, 2, 27, 11, 5, 30)
    assert parse_measurement(MMOL).time == datetime(2026, 3, 14, 7, 45)
    assert parse_measurement(MINIMAL).time is None


def test_type_is_the_low_nibble_and_location_the_high_nibble() -> None:
    swapped = parse_measurement(NORDIC[:14] + b"\x21" + NORDIC[15:])
    assert (swapped.sample_type, swapped.sample_location) == (
        SampleType.CAPILLARY_WHOLE_BLOOD,
        SampleLocation.ALTERNATE_SITE,
    )


@pytest.mark.parametrize(
    ("byte", "sample_type", "location"),
    [
        (0x00, SampleType.RESERVED, SampleLocation.RESERVED),
        (0xFA, SampleType.CONTROL_SOLUTION, SampleLocation.NOT_AVAILABLE),
        (0x5B, SampleType.RESERVED, SampleLocation.RESERVED),
        (0x49, SampleType.INTERSTITIAL_FLUID, SampleLocation.CONTROL_SOLUTION),
    ],
)
def test_reserved_type_and_location_codes_decode_to_reserved(
    byte: int, sample_type: SampleType, location: SampleLocation
) -> None:
    m = parse_measurement(MMOL[:-1] + bytes((byte,)))
    assert (m.sample_type, m.sample_location) == (sample_type, location)


@pytest.mark.parametrize(
    ("measurement", "expected"),
    [
        (NORDIC_EXPECTED, (Decimal(3_000_000), "mg/dL")),  # 30 kg/L × 10^5
        (MMOL_EXPECTED, (Decimal("5.6"), "mmol/L")),  # 0.0056 mol/L × 10^3
        (replace(NORDIC_EXPECTED, concentration=SFloatValue(95, -5)), (Decimal(95), "mg/dL")),
    ],
)
def test_clinical_units_are_exact(
    measurement: GlucoseMeasurement, expected: tuple[Decimal, str]
) -> None:
    assert to_clinical_units(measurement) == expected


def test_clinical_units_refuse_specials_and_absent_concentrations() -> None:
    with pytest.raises(ValueError, match="no numeric value"):
        to_clinical_units(replace(MMOL_EXPECTED, concentration=SFloatValue(0, 0, Special.NRES)))
    with pytest.raises(ValueError, match="no concentration"):
        to_clinical_units(MINIMAL_EXPECTED)


def test_special_concentrations_are_kept_distinct() -> None:
    for special, raw in [(Special.NAN, b"\xff\x07"), (Special.POSITIVE_INFINITY, b"\xfe\x07")]:
        m = parse_measurement(MMOL[:10] + raw + MMOL[12:])
        assert m.concentration == SFloatValue(0, 0, special)


# --- Truncated and corrupted siblings ---------------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_every_truncation_is_a_protocol_error(data: bytes, expected: GlucoseMeasurement) -> None:
    for length in range(len(data)):
        with pytest.raises(ProtocolError) as caught:
            parse_measurement(data[:length])
        assert "\n" not in str(caught.value)


def test_missing_time_offset_is_refused() -> None:
    # Nordic onInvalidDataReceived: flags 0x1B announce a time offset the 15 bytes lack.
    data = bytes([0x1B, 0, 0, 0xE2, 0x07, 4, 26, 11, 9, 30, 30, 0, 0x12, 0b101, 0b1])
    with pytest.raises(ProtocolError, match=r"Glucose Measurement is 15 bytes, flags 0x1B need 17"):
        parse_measurement(data)


@pytest.mark.parametrize("reserved_bit", [0x20, 0x40, 0x80])
def test_reserved_flag_bits_are_refused(reserved_bit: int) -> None:
    with pytest.raises(ProtocolError, match="reserved bits"):
        parse_measurement(bytes([NORDIC[0] | reserved_bit]) + NORDIC[1:])


@pytest.mark.parametrize(
    ("offset", "value"), [(5, 13), (6, 32), (7, 24), (8, 60), (9, 60)], ids=str
)
def test_impossible_base_time_is_refused_without_the_date(offset: int, value: int) -> None:
    corrupted = bytearray(MMOL)
    corrupted[offset] = value
    with pytest.raises(ProtocolError, match="Glucose Measurement base time") as caught:
        parse_measurement(bytes(corrupted))
    assert "2026" not in str(caught.value)


def test_offset_leaving_the_date_range_is_refused() -> None:
    early = encode_measurement(replace(MINIMAL_EXPECTED, base_time=datetime(1582, 1, 1)))
    with pytest.raises(ProtocolError, match="time offset leaves the date range"):
        parse_measurement(bytes([0x01]) + early[1:] + (-1).to_bytes(2, "little", signed=True))
    late = encode_measurement(replace(MINIMAL_EXPECTED, base_time=datetime(9999, 12, 31, 23)))
    with pytest.raises(ProtocolError, match="time offset leaves the date range"):
        parse_measurement(bytes([0x01]) + late[1:] + (61).to_bytes(2, "little"))


def test_trailing_bytes_are_ignored_and_counted() -> None:
    assert parse_measurement(MMOL + b"\x00\x00\x00") == replace(MMOL_EXPECTED, trailing=3)


def test_reserved_status_bits_are_ignored() -> None:
    assert parse_measurement(NORDIC[:-1] + b"\xf1") == NORDIC_EXPECTED


# --- Every flag combination -------------------------------------------------------------------

FULL = replace(NORDIC_EXPECTED, unit=GlucoseUnit.MOL_PER_L)


@pytest.mark.parametrize("flags", range(0x20))
def test_every_flag_combination_round_trips(flags: int) -> None:
    concentration = flags & 0x02
    m = GlucoseMeasurement(
        sequence_number=FULL.sequence_number,
        base_time=FULL.base_time,
        time_offset=FULL.time_offset if flags & 0x01 else None,
        concentration=FULL.concentration if concentration else None,
        unit=(GlucoseUnit.MOL_PER_L if flags & 0x04 else GlucoseUnit.KG_PER_L)
        if concentration
        else None,
        sample_type=FULL.sample_type if concentration else None,
        sample_location=FULL.sample_location if concentration else None,
        status=FULL.status if flags & 0x08 else None,
        context_follows=bool(flags & 0x10),
    )
    encoded = encode_measurement(m)
    # Without a concentration, the unit bit has no meaning and is not sent.
    assert encoded[0] == (flags if concentration else flags & ~0x04)
    assert parse_measurement(encoded) == m


def test_encoder_refuses_a_concentration_without_its_unit() -> None:
    with pytest.raises(ValueError, match="go together"):
        encode_measurement(replace(MMOL_EXPECTED, unit=None))


# --- Context ----------------------------------------------------------------------------------


def test_context_decodes_to_the_whole_expected_object() -> None:
    assert parse_measurement_context(CONTEXT_FULL) == CONTEXT_FULL_EXPECTED
    assert encode_measurement_context(CONTEXT_FULL_EXPECTED) == CONTEXT_FULL


def test_empty_context_in_a_padded_buffer() -> None:
    # Nordic onGlucoseMeasurementContextReceived_empty: flags 0, seq 1, in a 17-byte buffer.
    data = bytes([0x00, 0x01, 0x00]) + bytes(14)
    assert parse_measurement_context(data) == GlucoseMeasurementContext(1, trailing=14)


def test_every_context_truncation_is_a_protocol_error() -> None:
    for length in range(len(CONTEXT_FULL)):
        with pytest.raises(ProtocolError, match="Glucose Measurement Context"):
            parse_measurement_context(CONTEXT_FULL[:length])


def test_short_context_is_refused() -> None:
    # Nordic onInvalidDataReceived: flags 0xFF with only 5 bytes.
    with pytest.raises(ProtocolError, match="is 5 bytes, flags 0xFF need 17"):
        parse_measurement_context(bytes([0xFF, 0, 0, 0xB3, 3]))


# --- Record Access Control Point --------------------------------------------------------------

REPORT = RacpOpCode.REPORT_STORED_RECORDS


@pytest.mark.parametrize(
    ("request_", "data"),
    [
        (RacpRequest(REPORT, RacpOperator.ALL), "0101"),
        (RacpRequest(REPORT, RacpOperator.GREATER_OR_EQUAL, (8,)), "0103010800"),
        (RacpRequest(REPORT, RacpOperator.LESS_OR_EQUAL, (0x7FFE,)), "010201FE7F"),
        (RacpRequest(REPORT, RacpOperator.WITHIN_RANGE, (12, 412)), "0104010C009C01"),
        (RacpRequest(REPORT, RacpOperator.LAST), "0106"),
        (RacpRequest(RacpOpCode.DELETE_STORED_RECORDS, RacpOperator.ALL), "0201"),
        (RacpRequest(RacpOpCode.ABORT_OPERATION, RacpOperator.NULL), "0300"),
        (RacpRequest(RacpOpCode.REPORT_NUMBER_OF_RECORDS, RacpOperator.FIRST), "0405"),
    ],
)
def test_racp_requests_encode_per_gls_3_3(request_: RacpRequest, data: str) -> None:
    # Built from GLS §3.3: op code, operator, filter type 0x01 (sequence number), u16 operands;
    # the operations are the ones SpeziBluetooth's RecordAccessControlPointTests.swift covers.
    assert encode_racp_request(request_) == bytes.fromhex(data)


@pytest.mark.parametrize(
    "request_",
    [
        RacpRequest(RacpOpCode.RESPONSE_CODE, RacpOperator.NULL),
        RacpRequest(RacpOpCode.ABORT_OPERATION, RacpOperator.ALL),
        RacpRequest(REPORT, RacpOperator.NULL),
        RacpRequest(REPORT, RacpOperator.ALL, (1,)),
        RacpRequest(REPORT, RacpOperator.GREATER_OR_EQUAL),
        RacpRequest(REPORT, RacpOperator.WITHIN_RANGE, (5, 4)),
        RacpRequest(REPORT, RacpOperator.GREATER_OR_EQUAL, (0x10000,)),
    ],
)
def test_malformed_racp_requests_are_refused(request_: RacpRequest) -> None:
    with pytest.raises(ValueError):
        encode_racp_request(request_)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # Nordic: success, op code not supported (request op 12, unknown: kept raw), invalid
        # operator, operator not supported, invalid operand, no records found, abort
        # unsuccessful, procedure not completed, operand not supported, unknown code 10.
        ([6, 0, 1, 1], RacpResponse(REPORT, RacpResponseCode.SUCCESS)),
        ([6, 0, 12, 2], RacpResponse(12, RacpResponseCode.OP_CODE_NOT_SUPPORTED)),
        ([6, 0, 1, 3], RacpResponse(REPORT, RacpResponseCode.INVALID_OPERATOR)),
        ([6, 0, 2, 4], RacpResponse(2, RacpResponseCode.OPERATOR_NOT_SUPPORTED)),
        ([6, 0, 1, 5], RacpResponse(REPORT, RacpResponseCode.INVALID_OPERAND)),
        ([6, 0, 1, 6], RacpResponse(REPORT, RacpResponseCode.NO_RECORDS_FOUND)),
        ([6, 0, 3, 7], RacpResponse(3, RacpResponseCode.ABORT_UNSUCCESSFUL)),
        ([6, 0, 2, 8], RacpResponse(2, RacpResponseCode.PROCEDURE_NOT_COMPLETED)),
        ([6, 0, 2, 9], RacpResponse(2, RacpResponseCode.OPERAND_NOT_SUPPORTED)),
        ([6, 0, 1, 10], RacpResponse(REPORT, 10)),
        ([5, 0, 2, 1], StoredRecordCount(258)),  # Nordic onNumberOfRecordsReceived_uint16
    ],
)
def test_racp_responses_decode(data: list[int], expected: RacpResponse | StoredRecordCount) -> None:
    assert parse_racp_response(bytes(data)) == expected
    assert encode_racp_response(expected) == bytes(data)


@pytest.mark.parametrize(
    "data",
    [
        [5, 0, 1],  # Nordic uint8 count: GLS §3.3.2.4 says u16
        [5, 0, 4, 3, 2, 1],  # Nordic uint32 count, refused rather than misread
        [5, 0, 3, 2, 1],  # Nordic unsupported length
        [1, 1],  # Nordic too short
        [1, 3, 1, 2, 0],  # Nordic wrong op code (a request)
        [6, 1, 1, 1],  # Nordic operator not null (padded to 4 bytes)
        [],
    ],
)
def test_malformed_racp_responses_are_protocol_errors(data: list[int]) -> None:
    with pytest.raises(ProtocolError, match="Record Access Control Point"):
        parse_racp_response(bytes(data))


# --- The session ------------------------------------------------------------------------------

NOW = datetime(2026, 5, 4, 9, 30)
SUCCESS = bytes([6, 0, 1, 1])
NO_RECORDS = bytes([6, 0, 1, 6])


def record(sequence: int) -> bytes:
    return encode_measurement(replace(MMOL_EXPECTED, sequence_number=sequence))


def racp_write(data: str) -> WriteCharacteristic:
    return WriteCharacteristic(RECORD_ACCESS_CONTROL_POINT, bytes.fromhex(data), optional=False)


def test_first_connection_fetches_all_records() -> None:
    session = GlucoseSession(last_sequence=None)
    actions = session.on_connected(NOW)
    assert actions[-4:] == [
        Subscribe(MEASUREMENT),
        Subscribe(MEASUREMENT_CONTEXT, optional=True),
        Subscribe(RECORD_ACCESS_CONTROL_POINT),
        racp_write("0101"),
    ]
    assert session.on_value(MEASUREMENT, record(1)) == [replace(MMOL_EXPECTED, sequence_number=1)]
    assert session.on_value(MEASUREMENT, record(2)) == [replace(MMOL_EXPECTED, sequence_number=2)]
    context = encode_measurement_context(GlucoseMeasurementContext(2, meal=Meal.FASTING))
    assert session.on_value(MEASUREMENT_CONTEXT, context) == [
        GlucoseMeasurementContext(2, meal=Meal.FASTING)
    ]
    assert session.on_value(RECORD_ACCESS_CONTROL_POINT, SUCCESS) == [
        RecordTransferComplete(records=2, last_sequence=2)
    ]


def test_reconnect_fetches_only_records_after_the_last_one_seen() -> None:
    session = GlucoseSession(last_sequence=7, set_time=False)
    assert session.on_connected(NOW)[-1] == racp_write("0103010800")  # >= 8
    assert session.on_value(MEASUREMENT, record(8)) == [replace(MMOL_EXPECTED, sequence_number=8)]
    session.on_value(MEASUREMENT, record(9))
    assert session.on_value(RECORD_ACCESS_CONTROL_POINT, SUCCESS) == [
        RecordTransferComplete(records=2, last_sequence=9)
    ]


def test_no_records_found_is_an_empty_successful_transfer() -> None:
    session = GlucoseSession(last_sequence=7)
    session.on_connected(NOW)
    assert session.on_value(RECORD_ACCESS_CONTROL_POINT, NO_RECORDS) == [
        RecordTransferComplete(records=0, last_sequence=7)
    ]


def test_an_error_response_fails_the_transfer() -> None:
    session = GlucoseSession(last_sequence=7)
    session.on_connected(NOW)
    session.on_value(MEASUREMENT, record(8))
    assert session.on_value(RECORD_ACCESS_CONTROL_POINT, bytes([6, 0, 1, 4])) == [
        RecordTransferFailed(RacpResponseCode.OPERATOR_NOT_SUPPORTED, records=1, last_sequence=8)
    ]


def test_records_the_meter_should_have_filtered_are_dropped() -> None:
    session = GlucoseSession(last_sequence=7)
    session.on_connected(NOW)
    assert session.on_value(MEASUREMENT, record(7)) == []
    assert session.on_value(MEASUREMENT, record(3)) == []
    old_context = encode_measurement_context(GlucoseMeasurementContext(3))
    assert session.on_value(MEASUREMENT_CONTEXT, old_context) == []
    assert session.on_value(RECORD_ACCESS_CONTROL_POINT, NO_RECORDS) == [
        RecordTransferComplete(records=0, last_sequence=7)
    ]


def test_a_transfer_reaching_0xffff_continues_after_the_wrap() -> None:
    session = GlucoseSession(last_sequence=0xFFFD)
    assert session.on_connected(NOW)[-1] == racp_write("010301FEFF")  # >= 0xFFFE
    session.on_value(MEASUREMENT, record(0xFFFE))
    session.on_value(MEASUREMENT, record(0xFFFF))
    # The meter may have wrapped to 0: ask for the half of the space newer than 0xFFFF.
    assert session.on_value(RECORD_ACCESS_CONTROL_POINT, SUCCESS) == [racp_write("010201FE7F")]
    session.on_value(MEASUREMENT, record(0))
    session.on_value(MEASUREMENT, record(1))
    assert session.on_value(RECORD_ACCESS_CONTROL_POINT, SUCCESS) == [
        RecordTransferComplete(records=4, last_sequence=1)
    ]


def test_last_sequence_0xffff_asks_for_the_wrapped_records() -> None:
    session = GlucoseSession(last_sequence=0xFFFF)
    assert session.on_connected(NOW)[-1] == racp_write("010201FE7F")  # <= 0x7FFE
    assert session.on_value(MEASUREMENT, record(0xFFF0)) == []  # older: not delivered twice
    session.on_value(MEASUREMENT, record(0))
    assert session.on_value(RECORD_ACCESS_CONTROL_POINT, SUCCESS) == [
        RecordTransferComplete(records=1, last_sequence=0)
    ]


def test_a_first_transfer_over_a_wrapped_memory_reports_the_newest_record() -> None:
    session = GlucoseSession(last_sequence=None)
    session.on_connected(NOW)
    for sequence in (0xFFFE, 0xFFFF, 0, 1):
        session.on_value(MEASUREMENT, record(sequence))
    assert session.on_value(RECORD_ACCESS_CONTROL_POINT, SUCCESS) == [
        RecordTransferComplete(records=4, last_sequence=1)
    ]


def test_other_control_point_answers_pass_through() -> None:
    session = GlucoseSession(last_sequence=None)
    assert session.on_value(RECORD_ACCESS_CONTROL_POINT, bytes([5, 0, 3, 0])) == [
        StoredRecordCount(3)
    ]
    assert session.on_value(RECORD_ACCESS_CONTROL_POINT, bytes([6, 0, 3, 1])) == [
        RacpResponse(RacpOpCode.ABORT_OPERATION, RacpResponseCode.SUCCESS)
    ]


def test_common_characteristics_and_strangers() -> None:
    session = GlucoseSession(last_sequence=None)
    assert session.on_value(BATTERY_LEVEL, b"\x50") == [BatteryLevel(80)]
    with pytest.raises(ProtocolError, match="unexpected characteristic"):
        session.on_value("00002a35-0000-1000-8000-00805f9b34fb", NORDIC)


@pytest.mark.parametrize("last", [-1, 0x10000])
def test_session_refuses_an_impossible_last_sequence(last: int) -> None:
    with pytest.raises(ValueError, match="last_sequence"):
        GlucoseSession(last_sequence=last)


# --- Properties -------------------------------------------------------------------------------


@given(st.binary(max_size=40))
def test_arbitrary_bytes_decode_or_raise_protocol_error_only(data: bytes) -> None:
    for parse in (parse_measurement, parse_measurement_context, parse_racp_response):
        try:
            parse(data)
        except ProtocolError as exc:
            message = str(exc)
        else:
            continue
        assert "\n" not in message
        assert len(message) <= 100


@given(st.sampled_from([NORDIC, MMOL, CONTEXT_FULL]), st.data())
def test_corrupted_siblings_raise_protocol_error_or_decode(
    base: bytes, data: st.DataObject
) -> None:
    corrupted = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        corrupted[data.draw(st.integers(0, len(base) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(base)))
    for parse in (parse_measurement, parse_measurement_context):
        with contextlib.suppress(ProtocolError):
            parse(bytes(corrupted[:cut]))


sfloats = st.one_of(
    st.builds(SFloatValue, st.integers(-2045, 2045), st.integers(-8, 7)),
    st.sampled_from([SFloatValue(0, 0, special) for special in Special]),
)
times = st.datetimes(min_value=datetime(1583, 1, 1), max_value=datetime(9998, 12, 31)).map(
    lambda d: d.replace(microsecond=0)
)


@st.composite
def measurements(draw: st.DrawFn) -> GlucoseMeasurement:
    with_concentration = draw(st.booleans())
    return GlucoseMeasurement(
        sequence_number=draw(st.integers(0, 0xFFFF)),
        base_time=draw(st.none() | times),
        time_offset=draw(st.none() | st.integers(-0x8000, 0x7FFF)),
        concentration=draw(sfloats) if with_concentration else None,
        unit=draw(st.sampled_from(GlucoseUnit)) if with_concentration else None,
        sample_type=draw(st.sampled_from(SampleType)) if with_concentration else None,
        sample_location=draw(st.sampled_from(SampleLocation)) if with_concentration else None,
        status=draw(st.none() | st.integers(0, 0x0FFF).map(GlucoseSensorStatus.from_bits)),
        context_follows=draw(st.booleans()),
    )


@given(measurements())
def test_measurement_round_trip(m: GlucoseMeasurement) -> None:
    assert parse_measurement(encode_measurement(m)) == m


@st.composite
def contexts(draw: st.DrawFn) -> GlucoseMeasurementContext:
    # Paired fields are drawn together: both set or both None.
    carbohydrate, medication, tester, exercise = (draw(st.booleans()) for _ in range(4))
    return GlucoseMeasurementContext(
        sequence_number=draw(st.integers(0, 0xFFFF)),
        extended_flags=draw(st.none() | st.integers(0, 255)),
        carbohydrate=draw(st.sampled_from(Carbohydrate)) if carbohydrate else None,
        carbohydrate_amount=draw(sfloats) if carbohydrate else None,
        meal=draw(st.none() | st.sampled_from(Meal)),
        tester=draw(st.sampled_from(GlucoseTester)) if tester else None,
        health=draw(st.sampled_from(Health)) if tester else None,
        exercise_duration=draw(st.integers(0, 0xFFFF)) if exercise else None,
        exercise_intensity=draw(st.integers(0, 255)) if exercise else None,
        medication=draw(st.sampled_from(Medication)) if medication else None,
        medication_amount=draw(sfloats) if medication else None,
        medication_in_litres=draw(st.booleans()),
        hba1c=draw(st.none() | sfloats),
    )


@given(contexts())
def test_context_round_trip(c: GlucoseMeasurementContext) -> None:
    assert parse_measurement_context(encode_measurement_context(c)) == c
