"""Oracles for the hand-written DIMSE encoders: the command sets of
:mod:`dimse.loop.command_set` and
the P-DATA-TF framing of :mod:`dimse.loop.upper_layer`, held byte for byte to pynetdicom's own
message encoder (``DIMSEMessage.primitive_to_message`` / ``encode_msg``) and PDU codec
(``pynetdicom.pdu.P_DATA_TF``) on many seeded random inputs.

One normalisation: a command set that announces a data set carries Command Data Set Type
0x0000 from the gateway and 0x0001 from pynetdicom; PS3.7 Table E.1-1 allows any value other
than 0x0101, so the oracle's value is set to the gateway's before comparing.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from io import BytesIO
from typing import Any

import pytest
from pydicom import Dataset
from pynetdicom import dimse_messages, dimse_primitives
from pynetdicom.dsutils import decode as pynetdicom_decode
from pynetdicom.dsutils import encode as pynetdicom_encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from dimse.loop import command_set, upper_layer

CASES = 300
STATUSES = [0x0000, 0xFF00, 0xFF01, 0xFE00, 0xA700, 0xA702, 0xA900, 0xB000, 0xB007, 0xC000,
            0xC211, 0x0122, 0x0124, 0x0210, 0x0211]
# AE and LO characters: the default repertoire without backslash and controls (PS3.5 6.2).
TEXT = "".join(c for c in string.printable[:95] if c != "\\")


def uid(rng: random.Random) -> str:
    """A random valid UID, of odd or even length, up to 64 characters (PS3.5 9.1)."""
    parts = ["1", "2"]
    while True:
        part = str(rng.randint(0, 10 ** rng.randint(1, 12)))
        if len(".".join([*parts, part])) > 64:
            break
        parts.append(part)
        if rng.random() < 0.25:
            break
    return ".".join(parts)


def ae_title(rng: random.Random) -> str:
    title = "".join(rng.choice(TEXT) for _ in range(rng.randint(1, 16))).strip()
    return title or "AE"


def comment(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return ""
    text = "".join(rng.choice(TEXT) for _ in range(rng.randint(1, 64)))
    return text.strip() or "failed"  # pynetdicom leaves a blank comment out


def oracle_command(message: type[dimse_messages.DIMSEMessage], primitive: Any,
                   data_set_type: int | None = None) -> bytes:
    """pynetdicom's encoding of the command set of ``primitive``."""
    msg = message()
    msg.primitive_to_message(primitive)
    if data_set_type is not None and msg.command_set.CommandDataSetType != 0x0101:
        msg.command_set.CommandDataSetType = data_set_type
    return bytes(pynetdicom_encode(msg.command_set, True, True))


def seeds() -> Iterator[random.Random]:
    for seed in range(CASES):
        yield random.Random(seed)


# -- command sets, encoded ---------------------------------------------------------------------

def test_store_request_is_pynetdicoms_c_store_rq() -> None:
    for rng in seeds():
        sop_class, sop_instance = uid(rng), uid(rng)
        message_id, priority = rng.randint(0, 0xFFFF), rng.choice([0, 1, 2])
        originator = ae_title(rng) if rng.random() < 0.5 else ""
        originator_id = rng.randint(0, 0xFFFF) if originator else None
        primitive = dimse_primitives.C_STORE()
        primitive.MessageID = message_id
        primitive.AffectedSOPClassUID = sop_class
        primitive.AffectedSOPInstanceUID = sop_instance
        primitive.Priority = priority
        primitive.DataSet = BytesIO(b"\x08\x00\x16\x00")
        if originator:
            primitive.MoveOriginatorApplicationEntityTitle = originator
            primitive.MoveOriginatorMessageID = originator_id
        ours = command_set.store_request(
            sop_class, sop_instance, message_id, move_originator_ae_title=originator,
            move_originator_message_id=originator_id, priority=priority)
        expected = oracle_command(dimse_messages.C_STORE_RQ, primitive,
                                  command_set.DATA_SET_PRESENT)
        assert ours == expected, (sop_class, sop_instance, message_id, originator)


def test_store_response_is_pynetdicoms_c_store_rsp() -> None:
    for rng in seeds():
        sop_class, sop_instance = uid(rng), uid(rng)
        message_id, status, text = rng.randint(0, 0xFFFF), rng.choice(STATUSES), comment(rng)
        primitive = dimse_primitives.C_STORE()
        primitive.MessageIDBeingRespondedTo = message_id
        primitive.AffectedSOPClassUID = sop_class
        primitive.AffectedSOPInstanceUID = sop_instance
        primitive.Status = status
        if text:
            primitive.ErrorComment = text
        ours = command_set.store_response(sop_class, sop_instance, message_id, status, text)
        assert ours == oracle_command(dimse_messages.C_STORE_RSP, primitive), (status, text)


def test_echo_response_is_pynetdicoms_c_echo_rsp() -> None:
    for rng in seeds():
        sop_class, message_id, status = uid(rng), rng.randint(0, 0xFFFF), rng.choice(STATUSES)
        primitive = dimse_primitives.C_ECHO()
        primitive.MessageIDBeingRespondedTo = message_id
        primitive.AffectedSOPClassUID = sop_class
        primitive.Status = status
        ours = command_set.echo_response(sop_class, message_id, status)
        assert ours == oracle_command(dimse_messages.C_ECHO_RSP, primitive)


SERVICES = {
    command_set.C_FIND_RSP: (dimse_primitives.C_FIND, dimse_messages.C_FIND_RSP, "Identifier"),
    command_set.C_MOVE_RSP: (dimse_primitives.C_MOVE, dimse_messages.C_MOVE_RSP, "Identifier"),
    command_set.C_GET_RSP: (dimse_primitives.C_GET, dimse_messages.C_GET_RSP, "Identifier"),
}


@pytest.mark.parametrize("command_field", sorted(SERVICES), ids=["find", "move", "get"])
def test_responses_are_pynetdicoms(command_field: int) -> None:
    primitive_type, message, identifier = SERVICES[command_field]
    for rng in seeds():
        sop_class, message_id, status = uid(rng), rng.randint(0, 0xFFFF), rng.choice(STATUSES)
        data_set = command_field == command_set.C_FIND_RSP and status in (0xFF00, 0xFF01) or (
            command_field != command_set.C_FIND_RSP and rng.random() < 0.2)
        counts = None if command_field == command_set.C_FIND_RSP else tuple(
            rng.randint(0, 0xFFFF) for _ in range(4))
        text = comment(rng)
        primitive = primitive_type()
        primitive.MessageIDBeingRespondedTo = message_id
        primitive.AffectedSOPClassUID = sop_class
        primitive.Status = status
        if text:
            primitive.ErrorComment = text
        if data_set:
            setattr(primitive, identifier, BytesIO(b"\x08\x00\x52\x00"))
        if counts is not None:
            remaining, completed, failed, warning = counts
            # Remaining only in Pending and Cancel responses (PS3.4 C.4.2.1.6, C.4.2.3.1)
            if status in (command_set.PENDING, command_set.CANCEL):
                primitive.NumberOfRemainingSuboperations = remaining
            primitive.NumberOfCompletedSuboperations = completed
            primitive.NumberOfFailedSuboperations = failed
            primitive.NumberOfWarningSuboperations = warning
        ours = command_set.response(command_field, sop_class, message_id, status,
                                    data_set=data_set, counts=counts, error_comment=text)
        expected = oracle_command(message, primitive, command_set.DATA_SET_PRESENT)
        assert ours == expected, (status, data_set, counts, text)


def test_a_long_error_comment_is_cut_to_the_64_characters_of_lo() -> None:
    long = "x" * 100
    primitive = dimse_primitives.C_STORE()
    primitive.MessageIDBeingRespondedTo = 1
    primitive.AffectedSOPClassUID = "1.2.3"
    primitive.AffectedSOPInstanceUID = "1.2.3.4"
    primitive.Status = 0xC000
    primitive.ErrorComment = long[:64]
    ours = command_set.store_response("1.2.3", "1.2.3.4", 1, 0xC000, long)
    assert ours == oracle_command(dimse_messages.C_STORE_RSP, primitive)


# -- command sets, decoded ---------------------------------------------------------------------

def _requests(rng: random.Random) -> Iterator[bytes]:
    """pynetdicom's encoding of each request the gateway receives, with random values."""
    store = dimse_primitives.C_STORE()
    store.MessageID = rng.randint(0, 0xFFFF)
    store.AffectedSOPClassUID, store.AffectedSOPInstanceUID = uid(rng), uid(rng)
    store.Priority = rng.choice([0, 1, 2])
    store.DataSet = BytesIO(b"\x00")
    if rng.random() < 0.5:
        store.MoveOriginatorApplicationEntityTitle = ae_title(rng)
        store.MoveOriginatorMessageID = rng.randint(0, 0xFFFF)
    yield oracle_command(dimse_messages.C_STORE_RQ, store)
    for primitive_type, message in ((dimse_primitives.C_FIND, dimse_messages.C_FIND_RQ),
                                    (dimse_primitives.C_GET, dimse_messages.C_GET_RQ),
                                    (dimse_primitives.C_MOVE, dimse_messages.C_MOVE_RQ)):
        primitive = primitive_type()
        primitive.MessageID = rng.randint(0, 0xFFFF)
        primitive.AffectedSOPClassUID = uid(rng)
        primitive.Priority = rng.choice([0, 1, 2])
        primitive.Identifier = BytesIO(b"\x00")
        if primitive_type is dimse_primitives.C_MOVE:
            primitive.MoveDestination = ae_title(rng)
        yield oracle_command(message, primitive)
    echo = dimse_primitives.C_ECHO()
    echo.MessageID = rng.randint(0, 0xFFFF)
    echo.AffectedSOPClassUID = uid(rng)
    yield oracle_command(dimse_messages.C_ECHO_RQ, echo)
    cancel = dimse_primitives.C_CANCEL()
    cancel.MessageIDBeingRespondedTo = rng.randint(0, 0xFFFF)
    yield oracle_command(dimse_messages.C_CANCEL_RQ, cancel)


def test_decode_reads_what_pydicom_reads() -> None:
    for rng in seeds():
        for encoded in _requests(rng):
            reference: Dataset = pynetdicom_decode(BytesIO(encoded), True, True)
            elements = command_set.decode(encoded)
            assert set(elements) == {elem.tag.element for elem in reference}
            for elem in reference:
                number = elem.tag.element
                if elem.VR == "US":
                    assert command_set.us(elements, number) == elem.value, elem
                elif elem.VR == "UL":
                    assert int.from_bytes(elements[number], "little") == elem.value
                else:
                    assert command_set.text(elements, number) == str(elem.value).strip(), elem


def test_decode_refuses_what_is_not_a_command_set() -> None:
    encoded = command_set.echo_response("1.2.840.10008.1.1", 7, 0)
    with pytest.raises(command_set.CommandSetError, match="element header"):
        command_set.decode(encoded[:-len(encoded) + 5])
    with pytest.raises(command_set.CommandSetError, match="runs past"):
        command_set.decode(encoded[:-1])
    with pytest.raises(command_set.CommandSetError, match="group 0008"):
        command_set.decode(encoded + b"\x08\x00\x16\x00\x00\x00\x00\x00")


# -- P-DATA-TF framing -------------------------------------------------------------------------

def _max_lengths(rng: random.Random, size: int) -> list[int]:
    """Maximum Lengths down to 7 (one byte a fragment) for small payloads."""
    small = [7, 8, 64, rng.randint(7, 300)] if size <= 400 else [rng.randint(300, 2000)]
    return [0, 16384, rng.randint(300, 70000), *small]


def test_p_data_pdus_are_pynetdicoms() -> None:
    """A whole message (command set, then data set) framed as pynetdicom frames it, for each
    Maximum Length (0: unlimited, PS3.8 Annex D.1)."""
    for rng in seeds():
        store = dimse_primitives.C_STORE()
        store.MessageID = rng.randint(0, 0xFFFF)
        store.AffectedSOPClassUID, store.AffectedSOPInstanceUID = uid(rng), uid(rng)
        store.Priority = 0
        payload = rng.randbytes(rng.choice([1, 2, rng.randint(1, 400), rng.randint(1, 200000)]))
        store.DataSet = BytesIO(payload)
        context_id = rng.randrange(1, 256, 2)
        for max_length in _max_lengths(rng, len(payload)):
            message = dimse_messages.C_STORE_RQ()
            message.primitive_to_message(store)
            command = bytes(pynetdicom_encode(message.command_set, True, True))
            expected = b"".join(_pdu_bytes(p) for p in message.encode_msg(context_id, max_length))
            ours = b"".join([*upper_layer.p_data_pdus(context_id, True, command, max_length),
                             *upper_layer.p_data_pdus(context_id, False, payload, max_length)])
            assert ours == expected, (len(payload), max_length)


def _pdu_bytes(primitive: P_DATA) -> bytes:
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def test_pdvs_reads_what_pynetdicom_reads() -> None:
    """P-DATA-TF bodies of several presentation data values, encoded by pynetdicom."""
    for rng in seeds():
        primitive = P_DATA()
        for _ in range(rng.randint(1, 6)):
            control = bytes([rng.randint(0, 3)])
            fragment = rng.randbytes(rng.choice([0, 1, rng.randint(2, 3000)]))
            primitive.presentation_data_value_list.append(
                [rng.randrange(1, 256, 2), control + fragment])
        encoded = _pdu_bytes(primitive)
        reference = P_DATA_TF()
        reference.decode(encoded)
        ours = [(context_id, bytes([control]) + bytes(fragment))
                for context_id, control, fragment in upper_layer.pdvs(bytearray(encoded[6:]))]
        assert ours == [(context_id, value) for context_id, value
                        in reference.to_primitive().presentation_data_value_list]


def test_command_sets_reassembles_pynetdicoms_fragments() -> None:
    for rng in seeds():
        commands = [command_set.echo_response(uid(rng), rng.randint(0, 0xFFFF), 0)
                    for _ in range(rng.randint(1, 3))]
        max_length = rng.randint(7, 120)
        pending: list[bytes] = []
        completed: list[bytes] = []
        for command in commands:
            echo = dimse_messages.C_ECHO_RSP()
            echo.command_set = pynetdicom_decode(BytesIO(command), True, True)
            for primitive in echo.encode_msg(1, max_length):
                body = bytearray(_pdu_bytes(primitive)[6:])
                completed += upper_layer.command_sets(body, pending, "a test")
        assert completed == commands and pending == []
