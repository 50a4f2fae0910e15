"""The gateway's own association loop (dimse.loop.acceptor) over real TCP on 127.0.0.1.

Which associations it runs rather than pynetdicom, and how it answers at the Upper Layer
(PS3.8) and DIMSE (PS3.7) level: peers here are pynetdicom SCUs and plain sockets sending
PDUs byte by byte, including ones no well-behaved SCU would send.

test_dimse_move.py's ``test_move_cancel_stops_the_suboperations`` already cancels a C-MOVE
through this loop with a pynetdicom SCU (a MOVE-only association, which ``test_routing`` shows
is run here); ``test_cancel_cancels_the_move`` adds a C-CANCEL-RQ sent whole and fragmented.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, build_role
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from sqlalchemy import func, select

from dimse.loop.acceptor import Acceptor
from dimse.scp import AssociationServer
from gateway.core import Gateway
from gateway.metadata import dataset_offset
from gateway.models import Instance
from tests.support.common import LiveServer, ct_dataset, make_settings, part10, stored_relpaths
from tests.support.dimse_helpers import (
    A_ABORT,
    A_RELEASE_RP,
    COMMAND,
    LAST,
    RELEASE_RQ,
    RawAssociation,
    abort_pdu,
    associate,
    association_rejection,
    encode_command,
    fragments,
    p_data,
    pdu,
    raw_associate,
    wait_until,
)
from tests.support.qr_helpers import identifier, load_study, qr_settings, store_scp

# Service statuses (PS3.7 Annex C, PS3.4 B.2.3, C.4.2.1.5).
SUCCESS, PENDING, CANCEL = 0x0000, 0xFF00, 0xFE00
DUPLICATE_DIFFERENT = 0x0111  # the gateway's Duplicate SOP Instance refusal
SOP_CLASS_NOT_SUPPORTED = 0x0122
UNRECOGNIZED_OPERATION = 0x0211
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
# A-ABORT (PS3.8 Table 9-26): source and reasons.
SERVICE_PROVIDER = 0x02
UNRECOGNIZED_PDU, UNEXPECTED_PDU = 0x01, 0x02
UNSUPPORTED_SYNTAX = "1.2.840.10008.1.2.999"  # no such transfer syntax: context rejected


# -- observing the server ---------------------------------------------------------------------
def dimse_server(live: LiveServer) -> AssociationServer:
    server = live.server.dimse
    assert isinstance(server, AssociationServer)
    return server


def acceptor_of(live: LiveServer) -> Acceptor:
    acceptor = dimse_server(live).acceptor
    assert acceptor is not None
    return acceptor


def run_by_acceptor(live: LiveServer) -> int:
    """Associations the gateway's own loop is running now: the sockets it reads (it keeps no
    public count; the pynetdicom AE does, below)."""
    acceptor = acceptor_of(live)
    with acceptor._open_lock:
        return len(acceptor._open)


def run_by_pynetdicom(live: LiveServer) -> int:
    """Associations the server's pynetdicom AE is running as acceptor now."""
    return sum(1 for a in dimse_server(live).ae.active_associations if a.is_acceptor)


def all_ended(live: LiveServer) -> bool:
    return run_by_acceptor(live) == 0 and run_by_pynetdicom(live) == 0


def instance_count(gateway: Gateway) -> int:
    with gateway.index.Session() as session:
        return session.scalar(select(func.count()).select_from(Instance)) or 0


def assert_nothing_stored(gateway: Gateway) -> None:
    """No index row, no stored file, and nothing left in ``.incoming``: a refused instance's
    spooled copy is removed before the refusal is answered (gateway.ingest)."""
    assert instance_count(gateway) == 0
    assert stored_relpaths(gateway) == []
    if gateway.storage.local:
        assert gateway.storage.unfinished() == []  # type: ignore[attr-defined]


def dataset_bytes(data: bytes) -> bytes:
    return data[dataset_offset(data):]


# -- pynetdicom SCUs ----------------------------------------------------------------------------
def get_association(port: int, *, calling: str = "GETSCU") -> Any:
    """An association proposing C-GET and CT storage with SCP/SCU role selection."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    return ae.associate("127.0.0.1", port, ae_title="DICOMGW",
                        ext_neg=[build_role(CTImageStorage, scu_role=True, scp_role=True)])


def user_identity() -> UserIdentityNegotiation:
    """A User Identity Negotiation item (PS3.7 D.3.3.7), username only."""
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 1
    identity.primary_field = b"radiographer"
    return identity


def user_identity_association(port: int, *, calling: str = "IDSCU") -> Any:
    """A storage association with User Identity Negotiation (PS3.7 D.3.3.7): one the acceptor
    leaves to pynetdicom."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    return ae.associate("127.0.0.1", port, ae_title="DICOMGW", ext_neg=[user_identity()])


def storage_association(port: int, *, calling: str = "TESTSCU") -> Any:
    return associate(port, calling=calling)


def find_move_association(port: int) -> Any:
    ae = AE(ae_title="QRSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    return ae.associate("127.0.0.1", port, ae_title="DICOMGW")


ASSOCIATIONS = {
    "storage-only": storage_association,
    "find-and-move": find_move_association,
    "get-with-role-selection": get_association,
    "user-identity": user_identity_association,
}


@pytest.mark.parametrize(("kind", "by_acceptor"), [
    ("storage-only", True), ("find-and-move", True), ("get-with-role-selection", True),
    ("user-identity", False),
])
def test_routing(live: LiveServer, kind: str, by_acceptor: bool) -> None:
    assert all_ended(live)
    assoc = ASSOCIATIONS[kind](live.dimse_port)
    assert assoc.is_established
    try:
        # Both were counted before the A-ASSOCIATE-AC was sent: no waiting needed.
        assert (run_by_acceptor(live), run_by_pynetdicom(live)) == (
            (1, 0) if by_acceptor else (0, 1))
        if kind == "storage-only":
            assert assoc.send_c_echo().Status == SUCCESS
    finally:
        assoc.release()
    assert wait_until(lambda: all_ended(live))


def test_unsupported_sop_class_is_rejected_in_negotiation_not_routed(live: LiveServer) -> None:
    """A storage SCU proposing, among others, a SOP class the gateway does not support (dcmtk's
    getscu and storescu propose dozens) is still run by the acceptor; only that context is
    rejected."""
    raw = raw_associate(live.dimse_port, [(1, CTImageStorage, [ExplicitVRLittleEndian]),
                                          (3, "1.2.826.0.1.3680043.8.498.777",
                                           [ExplicitVRLittleEndian])])
    try:
        assert raw.contexts == {1: (CTImageStorage, ExplicitVRLittleEndian)}
        assert (run_by_acceptor(live), run_by_pynetdicom(live)) == (1, 0)
    finally:
        raw.close()


def test_association_request_in_two_segments_is_run_by_the_acceptor(live: LiveServer) -> None:
    """An A-ASSOCIATE-RQ larger than a TCP segment (about 1.4 kB on Ethernet: a storage SCU
    proposing a few dozen SOP classes) reaches the gateway in several reads."""
    raw = raw_associate(live.dimse_port, [(1, CTImageStorage, [ExplicitVRLittleEndian])],
                        split=(100, 0.2))
    try:
        assert raw.contexts == {1: (CTImageStorage, ExplicitVRLittleEndian)}
        assert (run_by_acceptor(live), run_by_pynetdicom(live)) == (1, 0)
    finally:
        raw.close()


# -- raw Upper Layer protocol -------------------------------------------------------------------
@pytest.fixture
def raw(live: LiveServer) -> Iterator[RawAssociation]:
    """A raw association: context 1 CT, 3 MR, 7 Verification (Explicit VR LE), 5 CT in a
    syntax nobody supports (rejected)."""
    assoc = raw_associate(live.dimse_port, [
        (1, CTImageStorage, [ExplicitVRLittleEndian]),
        (3, MRImageStorage, [ExplicitVRLittleEndian]),
        (5, CTImageStorage, [UNSUPPORTED_SYNTAX]),
        (7, Verification, [ExplicitVRLittleEndian]),
    ])
    assert assoc.contexts == {1: (CTImageStorage, ExplicitVRLittleEndian),
                              3: (MRImageStorage, ExplicitVRLittleEndian),
                              7: (Verification, ExplicitVRLittleEndian)}
    assert run_by_acceptor(live) == 1
    try:
        yield assoc
    finally:
        assoc.close()


def store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    return encode_command(AffectedSOPClassUID=sop_class, CommandField=0x0001,
                          MessageID=message_id, Priority=0, CommandDataSetType=0x0000,
                          AffectedSOPInstanceUID=sop_instance)


def echo_rq(message_id: int = 1) -> bytes:
    return encode_command(AffectedSOPClassUID=Verification, CommandField=0x0030,
                          MessageID=message_id, CommandDataSetType=0x0101)


def assert_aborted(raw: RawAssociation, reason: int | None = None) -> None:
    """The gateway sent an A-ABORT (service-provider) and closed the connection."""
    pdu_type, body = raw.read_pdu()
    assert pdu_type == A_ABORT, f"PDU type 0x{pdu_type:02X}, body {body.hex()}"
    assert len(body) == 4
    assert body[2] == SERVICE_PROVIDER
    if reason is not None:
        assert body[3] == reason, f"reason 0x{body[3]:02X}"
    assert raw.ends() == b""


@pytest.mark.parametrize("context_id", [5, 9], ids=["rejected", "never-proposed"])
def test_p_data_on_a_context_not_accepted_is_aborted(live: LiveServer, raw: RawAssociation,
                                                     context_id: int) -> None:
    raw.send(p_data((context_id, COMMAND | LAST, store_rq(CTImageStorage, "1.2.3.4"))))
    assert_aborted(raw)
    assert wait_until(lambda: run_by_acceptor(live) == 0)


def test_unknown_pdu_type_is_aborted_as_unrecognized(raw: RawAssociation) -> None:
    """PDU type 0x09 exists in no version of PS3.8: reason 1, unrecognized-PDU."""
    raw.send(pdu(0x09, bytes(4)))
    assert_aborted(raw, UNRECOGNIZED_PDU)


@pytest.mark.parametrize("unexpected", [
    pdu(A_RELEASE_RP, bytes(4)),
    pdu(0x03, bytes([0, 1, 1, 1])),  # A-ASSOCIATE-RJ
], ids=["A-RELEASE-RP", "A-ASSOCIATE-RJ"])
def test_pdu_out_of_place_is_aborted_as_unexpected(raw: RawAssociation,
                                                    unexpected: bytes) -> None:
    """A PDU PS3.8 defines, in a state where it may not arrive: reason 2, unexpected-PDU."""
    raw.send(unexpected)
    assert_aborted(raw, UNEXPECTED_PDU)


def test_release(raw: RawAssociation) -> None:
    raw.send(p_data((7, COMMAND | LAST, echo_rq(3))))
    _cx, rsp, _data = raw.read_message()
    assert (rsp.MessageIDBeingRespondedTo, rsp.Status) == (3, SUCCESS)
    raw.send(RELEASE_RQ)
    assert raw.read_pdu() == (A_RELEASE_RP, bytes(4))
    assert raw.ends() == b""


@pytest.mark.parametrize("ending", ["abort", "close"])
def test_half_a_data_set_then_abort_or_close_stores_nothing(
        live: LiveServer, raw: RawAssociation, ending: str) -> None:
    ds = ct_dataset(0)
    body = dataset_bytes(part10(ds))
    half = fragments(body[:len(body) // 2], 1000)
    raw.send(p_data((1, COMMAND | LAST, store_rq(CTImageStorage, ds.SOPInstanceUID))))
    for fragment in half:
        raw.send(p_data((1, 0, fragment)))
    if ending == "abort":
        raw.send(abort_pdu())
    else:
        raw.sock.shutdown(socket.SHUT_WR)  # the gateway reads the end of the stream
    # The gateway closes its end once its loop for this association returned.
    assert raw.ends() == b""
    assert wait_until(lambda: run_by_acceptor(live) == 0)
    assert_nothing_stored(live.gateway)


def test_store_command_of_another_sop_class_than_its_context_is_0122(
        live: LiveServer, raw: RawAssociation) -> None:
    ds = ct_dataset(0)
    body = dataset_bytes(part10(ds))
    # Context 3 is MR Image Storage; the command says CT.
    raw.send(p_data((3, COMMAND | LAST, store_rq(CTImageStorage, ds.SOPInstanceUID, 11))))
    raw.send(p_data((3, LAST, body)))
    context_id, rsp, data = raw.read_message()
    assert (context_id, data) == (3, None)
    assert rsp.CommandField == 0x8001
    assert rsp.MessageIDBeingRespondedTo == 11
    assert rsp.Status == SOP_CLASS_NOT_SUPPORTED
    assert rsp.get("ErrorComment")
    assert_nothing_stored(live.gateway)
    # The association goes on: the same instance on its own context is stored.
    raw.send(p_data((1, COMMAND | LAST, store_rq(CTImageStorage, ds.SOPInstanceUID, 12)),
                    (1, LAST, body)))
    _cx, rsp, _data = raw.read_message()
    assert (rsp.MessageIDBeingRespondedTo, rsp.Status) == (12, SUCCESS)
    assert instance_count(live.gateway) == 1


def test_fragmented_command_and_data_set_are_stored_byte_identical(
        live: LiveServer, raw: RawAssociation) -> None:
    ds = ct_dataset(3)
    body = dataset_bytes(part10(ds))
    command = store_rq(CTImageStorage, ds.SOPInstanceUID, 21)
    a, b, c = command[:10], command[10:31], command[31:]
    pieces = fragments(body, 97)  # odd sizes: fragments split elements anywhere
    assert len(pieces) > 80
    stream = (
        # The command in three PDVs over two PDUs; its last fragment shares a PDU with the
        # data set's first three.
        p_data((1, COMMAND, a), (1, COMMAND, b))
        + p_data((1, COMMAND | LAST, c), *((1, 0, p) for p in pieces[:3]))
        + b"".join(p_data((1, 0, p)) for p in pieces[3:-1])
        + p_data((1, LAST, pieces[-1]))
    )
    raw.send(stream)
    _cx, rsp, _data = raw.read_message()
    assert (rsp.MessageIDBeingRespondedTo, rsp.Status) == (21, SUCCESS)
    row = live.gateway.index.find_instance(ds.SOPInstanceUID)
    assert row is not None
    stored = live.gateway.storage.path(row.file_path).read_bytes()
    assert dataset_bytes(stored) == body
    assert dcmread(live.gateway.storage.path(row.file_path)).file_meta.TransferSyntaxUID \
        == ExplicitVRLittleEndian


def _n_get_rq() -> tuple[int, bytes, bytes | None]:
    # PS3.7 Table 10.1-1: N-GET-RQ names its class in Requested SOP Class UID (0000,0003).
    return 0x0110, encode_command(RequestedSOPClassUID=CTImageStorage, CommandField=0x0110,
                                  MessageID=31, CommandDataSetType=0x0101,
                                  RequestedSOPInstanceUID="1.2.3.4"), None


def _c_get_rq() -> tuple[int, bytes, bytes | None]:
    # A C-GET-RQ with its identifier, sent on a storage context.
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = "1.2.3"
    encoded = encode(ident, False, True)
    assert encoded is not None
    return 0x0010, encode_command(AffectedSOPClassUID=CTImageStorage, CommandField=0x0010,
                                  MessageID=31, Priority=0, CommandDataSetType=0x0000), encoded


@pytest.mark.parametrize("request_of", [_n_get_rq, _c_get_rq], ids=["N-GET-RQ", "C-GET-RQ"])
def test_unrecognised_operation_is_0211(live: LiveServer, raw: RawAssociation,
                                        request_of: Any) -> None:
    field, command, data_set = request_of()
    values = [(1, COMMAND | LAST, command)]
    if data_set is not None:
        values.append((1, LAST, data_set))
    raw.send(p_data(*values))
    _cx, rsp, _data = raw.read_message()
    assert rsp.CommandField == field | 0x8000
    assert rsp.MessageIDBeingRespondedTo == 31
    assert rsp.Status == UNRECOGNIZED_OPERATION, f"0x{rsp.Status:04X}"
    # The association goes on.
    raw.send(p_data((7, COMMAND | LAST, echo_rq(32))))
    _cx, rsp, _data = raw.read_message()
    assert (rsp.CommandField, rsp.Status) == (0x8030, SUCCESS)


def test_responses_respect_the_peer_maximum_length(live: LiveServer) -> None:
    raw = raw_associate(live.dimse_port, [(1, Verification, [ExplicitVRLittleEndian])],
                        max_pdu=32)
    try:
        assert run_by_acceptor(live) == 1
        raw.pdu_lengths.clear()
        raw.send(p_data((1, COMMAND | LAST, echo_rq(41))))
        _cx, rsp, _data = raw.read_message()
        assert (rsp.MessageIDBeingRespondedTo, rsp.Status) == (41, SUCCESS)
        assert len(raw.pdu_lengths) > 2  # the response was fragmented...
        assert max(raw.pdu_lengths) <= 32  # ...to fit the Maximum Length announced
    finally:
        raw.close()


# -- Error Comment of a refused C-STORE ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["storage-only", "user-identity"])
def test_duplicate_refusal_carries_an_error_comment(live: LiveServer, kind: str) -> None:
    assoc = ASSOCIATIONS[kind](live.dimse_port)
    assert assoc.is_established
    assert run_by_acceptor(live) == (1 if kind == "storage-only" else 0)
    try:
        assert assoc.send_c_store(ct_dataset(0)).Status == SUCCESS
        changed = ct_dataset(0)
        changed.PixelData = bytes(len(changed.PixelData))
        result = assoc.send_c_store(changed)
    finally:
        assoc.release()
    assert result.Status == DUPLICATE_DIFFERENT
    comment = result.get("ErrorComment")
    assert comment and len(comment) <= 64


def test_data_set_of_another_sop_class_refusal_carries_an_error_comment(
        live: LiveServer, raw: RawAssociation) -> None:
    ds = ct_dataset(0)
    # MR Image Storage context and command, a CT data set.
    raw.send(p_data((3, COMMAND | LAST, store_rq(MRImageStorage, ds.SOPInstanceUID)),
                    (3, LAST, dataset_bytes(part10(ds)))))
    _cx, rsp, _data = raw.read_message()
    assert rsp.Status == DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    comment = rsp.get("ErrorComment")
    assert comment and len(comment) <= 64
    assert_nothing_stored(live.gateway)


def test_data_set_over_the_limit_is_refused_and_the_association_goes_on(
        tmp_path: Path, database_url: str) -> None:
    small, large = ct_dataset(0, rows=16), ct_dataset(1, rows=64)
    limit = len(dataset_bytes(part10(small))) + 100
    assert len(dataset_bytes(part10(large))) > limit
    gateway = Gateway(make_settings(tmp_path, database_url,
                                    GATEWAY_DIMSE_MAX_DATA_SET_BYTES=str(limit))).open()
    try:
        with LiveServer(gateway) as live:
            assoc = associate(live.dimse_port)
            assert assoc.is_established
            try:
                refused = assoc.send_c_store(large)
                stored = assoc.send_c_store(small)
            finally:
                assoc.release()
            assert refused.Status == 0xA700
            assert "exceeds the limit" in refused.ErrorComment
            assert stored.Status == SUCCESS
            assert instance_count(gateway) == 1
    finally:
        gateway.close()


def test_an_idle_association_is_aborted_after_the_network_timeout(
        tmp_path: Path, database_url: str) -> None:
    """The acceptor's sockets are timed out by the kernel (SO_RCVTIMEO), not by Python: an
    association that sends nothing is aborted once ``[dimse] network_timeout`` has passed,
    and one that keeps talking is not."""
    settings = make_settings(tmp_path, database_url)
    settings = dataclasses.replace(
        settings, dimse=dataclasses.replace(settings.dimse, network_timeout=0.5))
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        talking = raw_associate(live.dimse_port, [(7, Verification, [ExplicitVRLittleEndian])])
        idle = raw_associate(live.dimse_port, [(7, Verification, [ExplicitVRLittleEndian])])
        try:
            assert run_by_acceptor(live) == 2
            for message_id in range(1, 5):  # 1.2 s in all, never 0.5 s without a request
                time.sleep(0.3)
                talking.send(p_data((7, COMMAND | LAST, echo_rq(message_id))))
                _cx, rsp, _data = talking.read_message()
                assert (rsp.MessageIDBeingRespondedTo, rsp.Status) == (message_id, SUCCESS)
            assert_aborted(idle)
            talking.send(RELEASE_RQ)
            assert talking.read_pdu() == (A_RELEASE_RP, bytes(4))
        finally:
            talking.close()
            idle.close()


# -- C-MOVE through the acceptor ----------------------------------------------------------------
def test_move_sub_operations_name_the_move_originator(tmp_path: Path,
                                                      database_url: str) -> None:
    with store_scp() as scp:
        settings = qr_settings(tmp_path, database_url, destinations={
            "STORESCP": {"host": "127.0.0.1", "port": scp.port}})
        with Gateway(settings) as gateway:
            study = load_study(gateway)
            with LiveServer(gateway) as live:
                model = StudyRootQueryRetrieveInformationModelMove
                ae = AE(ae_title="MOVESCU1")
                ae.add_requested_context(model)
                assoc = ae.associate("127.0.0.1", live.dimse_port, ae_title="DICOMGW")
                assert assoc.is_established
                assert run_by_acceptor(live) == 1
                try:
                    responses = [status for status, _ident in assoc.send_c_move(
                        identifier("STUDY", StudyInstanceUID=study[0].StudyInstanceUID),
                        "STORESCP", model, msg_id=42)]
                finally:
                    assoc.release()
    assert [int(r.Status) for r in responses] == [PENDING] * 5 + [SUCCESS]
    remaining = [int(r.NumberOfRemainingSuboperations) for r in responses[:-1]]
    assert remaining == [4, 3, 2, 1, 0]
    last = responses[-1]
    assert "NumberOfRemainingSuboperations" not in last
    assert (last.NumberOfCompletedSuboperations, last.NumberOfFailedSuboperations,
            last.NumberOfWarningSuboperations) == (5, 0, 0)
    assert set(scp.received) == {d.SOPInstanceUID for d in study}
    # PS3.7 Table 9.3-1: the AE that invoked the C-MOVE, and that C-MOVE-RQ's Message ID.
    originators = {(r.move_originator, r.move_originator_message_id)
                   for r in scp.received.values()}
    assert originators == {("MOVESCU1", 42)}, sorted(originators)


def move_rq(message_id: int, destination: str) -> bytes:
    return encode_command(AffectedSOPClassUID=StudyRootQueryRetrieveInformationModelMove,
                          CommandField=0x0021, MessageID=message_id, Priority=0,
                          CommandDataSetType=0x0000, MoveDestination=destination)


@pytest.mark.parametrize("split", [0, 20], ids=["one-pdv", "two-pdus"])
def test_cancel_cancels_the_move(tmp_path: Path, database_url: str, split: int) -> None:
    """A C-CANCEL-RQ in one PDV, or fragmented over two PDUs: PS3.8 9.3.5 lets any command
    be sent as several fragments, a C-CANCEL-RQ too."""
    with store_scp(delay=0.2) as scp:
        settings = qr_settings(tmp_path, database_url, destinations={
            "STORESCP": {"host": "127.0.0.1", "port": scp.port}})
        with Gateway(settings) as gateway:
            study = load_study(gateway)
            with LiveServer(gateway) as live:
                raw = raw_associate(live.dimse_port, [
                    (1, StudyRootQueryRetrieveInformationModelMove, [ExplicitVRLittleEndian])])
                try:
                    ident = encode(identifier("STUDY",
                                              StudyInstanceUID=study[0].StudyInstanceUID),
                                   False, True)
                    assert ident is not None
                    raw.send(p_data((1, COMMAND | LAST, move_rq(7, "STORESCP")),
                                    (1, LAST, ident)))
                    _cx, first, _data = raw.read_message()
                    assert first.Status == PENDING
                    cancel = encode_command(
                        AffectedSOPClassUID=StudyRootQueryRetrieveInformationModelMove,
                        CommandField=0x0FFF, MessageIDBeingRespondedTo=7,
                        CommandDataSetType=0x0101)
                    if split:
                        raw.send(p_data((1, COMMAND, cancel[:split])))
                    raw.send(p_data((1, COMMAND | LAST, cancel[split:])))
                    responses = [first]
                    while responses[-1].Status == PENDING:
                        responses.append(raw.read_message()[1])
                    raw.send(RELEASE_RQ)
                    assert raw.read_pdu() == (A_RELEASE_RP, bytes(4))
                finally:
                    raw.close()
    final = responses[-1]
    assert final.Status == CANCEL
    assert final.NumberOfCompletedSuboperations == len(scp.received) < len(study)


# -- the association limit, shared by both paths ------------------------------------------------
@pytest.mark.parametrize("second", ["storage-only", "user-identity"])
@pytest.mark.parametrize("held", ["storage-only", "user-identity"])
def test_association_limit_is_shared(tmp_path: Path, database_url: str, held: str,
                                     second: str) -> None:
    settings = make_settings(tmp_path, database_url, GATEWAY_DIMSE_MAX_ASSOCIATIONS="1")
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        first = ASSOCIATIONS[held](live.dimse_port)
        assert first.is_established
        try:
            # rejected-transient, by the service provider: local limit exceeded (PS3.8 9.3.4)
            rejection = association_rejection(
                live.dimse_port, calling="TESTSCU",
                user_items=[user_identity()] if second == "user-identity" else None)
        finally:
            first.release()
        assert rejection == (0x02, 0x03, 0x02), (
            f"a {second} association beside a {held} one: {rejection}")
        # The slot is free again once the first association ended.
        assert wait_until(lambda: all_ended(live))
        again = ASSOCIATIONS[second](live.dimse_port)
        assert again.is_established
        again.release()
