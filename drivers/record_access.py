"""Record Access Control Point (RACP, 0x2A52): asking a device for its stored records, sans-I/O.

The Glucose Service (GLS 1.0 §3.3) defines it, and the Continuous Glucose Monitoring and Pulse
Oximeter services reuse the same op codes, operators and response codes. A request is written
to the control point; the device sends the records on their own characteristic and then
indicates a response on the control point (op code 6: the request's op code and a result
code, or op code 5: a record count).

Only filter type 0x01 (sequence number) is supported; 0x02 (user-facing time) is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TypeVar

from drivers.errors import ProtocolError

_SEQUENCE_MAX = 0xFFFF


def _u16(value: int, field: str) -> bytes:
    if not 0 <= value <= _SEQUENCE_MAX:
        raise ValueError(f"{field} must be 0-65535")
    return value.to_bytes(2, "little")


class RacpOpCode(IntEnum):
    """RACP op codes: 1-4 are requests, 5-6 the meter's answers."""

    REPORT_STORED_RECORDS = 1
    DELETE_STORED_RECORDS = 2
    ABORT_OPERATION = 3
    REPORT_NUMBER_OF_RECORDS = 4
    NUMBER_OF_RECORDS_RESPONSE = 5
    RESPONSE_CODE = 6


class RacpOperator(IntEnum):
    """RACP operators; <=, >= and range take sequence-number operands."""

    NULL = 0
    ALL = 1
    LESS_OR_EQUAL = 2
    GREATER_OR_EQUAL = 3
    WITHIN_RANGE = 4
    FIRST = 5
    LAST = 6


class RacpResponseCode(IntEnum):
    """The response code values of op code 6 (0 and 10-255 are reserved)."""

    SUCCESS = 1
    OP_CODE_NOT_SUPPORTED = 2
    INVALID_OPERATOR = 3
    OPERATOR_NOT_SUPPORTED = 4
    INVALID_OPERAND = 5
    NO_RECORDS_FOUND = 6
    ABORT_UNSUCCESSFUL = 7
    PROCEDURE_NOT_COMPLETED = 8
    OPERAND_NOT_SUPPORTED = 9


RACP_NAME = "Record Access Control Point"
_FILTER_SEQUENCE_NUMBER = 0x01  # filter type 0x02, user facing time, is not supported
_OPERAND_COUNTS = (0, 0, 1, 1, 2, 0, 0)  # index = operator
_REQUESTS = frozenset(range(1, 5))

_I = TypeVar("_I", bound=IntEnum)


def _known(enum: type[_I], code: int) -> int:
    try:
        return enum(code)
    except ValueError:
        return code


@dataclass(frozen=True, slots=True)
class RacpRequest:
    """A RACP request; ``sequence_numbers`` is the operand (one for <=/>=, min and max for a
    range, none otherwise), always filtered by sequence number."""

    op_code: RacpOpCode
    operator: RacpOperator
    sequence_numbers: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class RacpResponse:
    """Op code 6: the outcome of a request; each field a RacpOpCode/RacpResponseCode when known."""

    request_op_code: int
    code: int


@dataclass(frozen=True, slots=True)
class StoredRecordCount:
    """Op code 5: the answer to "report number of stored records"."""

    count: int


def encode_racp_request(request: RacpRequest) -> bytes:
    """Encode a request. ValueError for a response op code, abort with an operator other than
    null (or another request with null), the wrong number of operands or a reversed range.
    """
    op, operator, operands = request.op_code, request.operator, request.sequence_numbers
    if op not in _REQUESTS:
        raise ValueError("RACP op code is not a request")
    if (op is RacpOpCode.ABORT_OPERATION) != (operator is RacpOperator.NULL):
        raise ValueError("abort, and only abort, takes the null operator")
    if len(operands) != _OPERAND_COUNTS[operator]:
        raise ValueError(
            f"RACP operator {operator.name} takes {_OPERAND_COUNTS[operator]} operands"
        )
    if operator is RacpOperator.WITHIN_RANGE and operands[0] > operands[1]:
        raise ValueError("RACP range minimum exceeds its maximum")
    filter_type = bytes((_FILTER_SEQUENCE_NUMBER,)) if operands else b""
    return bytes((op, operator)) + filter_type + b"".join(_u16(v, "operand") for v in operands)


def parse_racp_response(data: bytes) -> RacpResponse | StoredRecordCount:
    """Decode a RACP indication (op code 5 or 6, operator null); ProtocolError only.

    Both answers are exactly 4 bytes (the record count is a u16, GLS §3.3.2.4): unlike a
    measurement, a control-point answer is not extended by later versions, and a meter that
    sends a u8 or u32 count must not have it misread.
    """
    data = bytes(data)
    if len(data) != 4:
        raise ProtocolError(f"{RACP_NAME} response is {len(data)} bytes, expected 4")
    op, operator = data[0], data[1]
    if op not in (RacpOpCode.NUMBER_OF_RECORDS_RESPONSE, RacpOpCode.RESPONSE_CODE):
        raise ProtocolError(f"{RACP_NAME} op code 0x{op:02X} is not a response")
    if operator != RacpOperator.NULL:
        raise ProtocolError(f"{RACP_NAME} response operator 0x{operator:02X} is not null")
    if op == RacpOpCode.NUMBER_OF_RECORDS_RESPONSE:
        return StoredRecordCount(int.from_bytes(data[2:4], "little"))
    return RacpResponse(_known(RacpOpCode, data[2]), _known(RacpResponseCode, data[3]))


def encode_racp_response(response: RacpResponse | StoredRecordCount) -> bytes:
    """Encode an indication, for the simulated meter; round-trips with parse_racp_response."""
    if isinstance(response, StoredRecordCount):
        return bytes((RacpOpCode.NUMBER_OF_RECORDS_RESPONSE, 0)) + _u16(response.count, "count")
    return bytes((RacpOpCode.RESPONSE_CODE, 0, response.request_op_code, response.code))
