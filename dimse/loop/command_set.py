"""DIMSE command sets (PS3.7 Section 6.3 and Annex E), encoded and decoded without pydicom.

A command set is a handful of group 0000 elements in implicit VR little endian. The gateway's
own association loop (:mod:`dimse.loop.acceptor`, :mod:`dimse.loop.storage_scu`) reads and writes
them on every message, where building a pydicom ``Dataset`` would cost more than the message.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from dimse.status import CANCEL, PENDING
from gateway.errors import GatewayError

# Command Field values (PS3.7 Section E.1).
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_GET_RQ = 0x0010
C_GET_RSP = 0x8010
C_FIND_RQ = 0x0020
C_FIND_RSP = 0x8020
C_MOVE_RQ = 0x0021
C_MOVE_RSP = 0x8021
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_CANCEL_RQ = 0x0FFF

# Element numbers of group 0000 (PS3.7 Table E.1-1).
COMMAND_GROUP_LENGTH = 0x0000
AFFECTED_SOP_CLASS_UID = 0x0002
REQUESTED_SOP_CLASS_UID = 0x0003
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
MOVE_DESTINATION = 0x0600
PRIORITY = 0x0700
COMMAND_DATA_SET_TYPE = 0x0800
STATUS = 0x0900
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE_UID = 0x1000
NUMBER_OF_REMAINING_SUBOPERATIONS = 0x1020
NUMBER_OF_COMPLETED_SUBOPERATIONS = 0x1021
NUMBER_OF_FAILED_SUBOPERATIONS = 0x1022
NUMBER_OF_WARNING_SUBOPERATIONS = 0x1023
MOVE_ORIGINATOR_AE_TITLE = 0x1030
MOVE_ORIGINATOR_MESSAGE_ID = 0x1031

NO_DATA_SET = 0x0101  # Command Data Set Type: no data set follows
DATA_SET_PRESENT = 0x0000  # any other value means a data set follows; 0x0000 is customary

_ELEMENT_HEADER = struct.Struct("<HHI")
_US = struct.Struct("<H")
_UL = struct.Struct("<I")


class CommandSetError(GatewayError):
    """A command set that cannot be decoded (PS3.7 Section 6.3.1)."""


def decode(encoded: bytes | bytearray | memoryview) -> dict[int, bytes]:
    """The elements of a command set, keyed by element number (group 0000 only)."""
    elements: dict[int, bytes] = {}
    view = memoryview(encoded)
    offset, end = 0, len(view)
    while offset < end:
        if end - offset < 8:
            raise CommandSetError("command set ends inside an element header")
        group, element, length = _ELEMENT_HEADER.unpack_from(view, offset)
        offset += 8
        if group != 0x0000:
            raise CommandSetError(f"command set holds an element of group {group:04X}")
        if length > end - offset:
            raise CommandSetError(f"element (0000,{element:04X}) runs past the command set")
        elements[element] = bytes(view[offset:offset + length])
        offset += length
    return elements


def us(elements: dict[int, bytes], element: int) -> int | None:
    """An unsigned short (US) value, or ``None`` when absent or malformed."""
    value = elements.get(element)
    if value is None or len(value) != 2:
        return None
    return int(_US.unpack(value)[0])


def text(elements: dict[int, bytes], element: int) -> str | None:
    """A UI / AE / LO value with its padding removed, or ``None`` when absent."""
    value = elements.get(element)
    if value is None:
        return None
    return value.rstrip(b"\x00 ").decode("ascii", "replace").lstrip()


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _padded(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def encode(elements: Iterable[tuple[int, bytes]]) -> bytes:
    """A command set of ``(element number, encoded value)`` pairs in ascending order, with its
    Command Group Length computed."""
    body = b"".join(_ELEMENT_HEADER.pack(0x0000, element, len(value)) + value
                    for element, value in elements)
    return _ELEMENT_HEADER.pack(0x0000, COMMAND_GROUP_LENGTH, 4) + _UL.pack(len(body)) + body


def store_response(sop_class_uid: str, sop_instance_uid: str, message_id: int, status: int,
                   error_comment: str = "") -> bytes:
    """A C-STORE-RSP (PS3.7 Table 9.3-2); an Error Comment of up to 64 characters with a
    failure (PS3.7 Annex C)."""
    elements = [
        (AFFECTED_SOP_CLASS_UID, _uid(sop_class_uid)),
        (COMMAND_FIELD, _US.pack(C_STORE_RSP)),
        (MESSAGE_ID_BEING_RESPONDED_TO, _US.pack(message_id)),
        (COMMAND_DATA_SET_TYPE, _US.pack(NO_DATA_SET)),
        (STATUS, _US.pack(status)),
    ]
    if error_comment:
        elements.append((ERROR_COMMENT, _padded(error_comment[:64])))
    elements.append((AFFECTED_SOP_INSTANCE_UID, _uid(sop_instance_uid)))
    return encode(elements)


def response(command_field: int, sop_class_uid: str, message_id: int, status: int, *,
             data_set: bool = False, counts: tuple[int, int, int, int] | None = None,
             error_comment: str = "") -> bytes:
    """A response command set: C-ECHO-RSP, C-FIND-RSP, C-MOVE-RSP (PS3.7 Tables 9.3-13, 9.3-4,
    9.3-6) or the answer to an unrecognised request. ``counts`` are the remaining, completed,
    failed and warning sub-operations of a C-MOVE."""
    elements = [
        (AFFECTED_SOP_CLASS_UID, _uid(sop_class_uid)),
        (COMMAND_FIELD, _US.pack(command_field)),
        (MESSAGE_ID_BEING_RESPONDED_TO, _US.pack(message_id)),
        (COMMAND_DATA_SET_TYPE, _US.pack(DATA_SET_PRESENT if data_set else NO_DATA_SET)),
        (STATUS, _US.pack(status)),
    ]
    if error_comment:
        elements.append((ERROR_COMMENT, _padded(error_comment[:64])))
    if counts is not None:
        remaining, completed, failed, warning = counts
        # Remaining in Pending and Cancel responses only (PS3.4 C.4.2.1.6, C.4.2.3.1).
        if status in (PENDING, CANCEL):
            elements.append((NUMBER_OF_REMAINING_SUBOPERATIONS, _US.pack(remaining)))
        elements += [
            (NUMBER_OF_COMPLETED_SUBOPERATIONS, _US.pack(completed)),
            (NUMBER_OF_FAILED_SUBOPERATIONS, _US.pack(failed)),
            (NUMBER_OF_WARNING_SUBOPERATIONS, _US.pack(warning)),
        ]
    return encode(elements)


def echo_response(sop_class_uid: str, message_id: int, status: int) -> bytes:
    """A C-ECHO-RSP (PS3.7 Table 9.3-13)."""
    return response(C_ECHO_RSP, sop_class_uid, message_id, status)


def store_request(sop_class_uid: str, sop_instance_uid: str, message_id: int, *,
                  move_originator_ae_title: str = "", move_originator_message_id: int | None = None,
                  priority: int = 0x0000) -> bytes:
    """A C-STORE-RQ (PS3.7 Table 9.3-1), with the Move Originator fields of a C-MOVE
    sub-operation when given."""
    elements = [
        (AFFECTED_SOP_CLASS_UID, _uid(sop_class_uid)),
        (COMMAND_FIELD, _US.pack(C_STORE_RQ)),
        (MESSAGE_ID, _US.pack(message_id)),
        (PRIORITY, _US.pack(priority)),
        (COMMAND_DATA_SET_TYPE, _US.pack(DATA_SET_PRESENT)),
        (AFFECTED_SOP_INSTANCE_UID, _uid(sop_instance_uid)),
    ]
    if move_originator_ae_title:
        elements.append((MOVE_ORIGINATOR_AE_TITLE, _padded(move_originator_ae_title[:16])))
    if move_originator_message_id is not None:
        elements.append((MOVE_ORIGINATOR_MESSAGE_ID, _US.pack(move_originator_message_id)))
    return encode(elements)
