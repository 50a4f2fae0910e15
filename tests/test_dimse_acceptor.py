"""The gateway's own association loop (dimse.acceptor) over real TCP on 127.0.0.1.

Which associations it runs rather than pynetdicom, and how it answers at the Upper Layer
(PS3.8) and DIMSE (PS3.7) level: peers here are pynetdicom SCUs and plain sockets sending
PDUs byte by byte, including ones no well-behaved SCU would send.

test_dimse_move.py's ``test_move_cancel_stops_the_suboperations`` already cancels a C-MOVE
through this loop with a pynetdicom SCU (a MOVE-only association, which ``test_routing`` shows
is run here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import LiveServer, make_settings
from dimse_helpers import (
    associate,
    raw_associate,
    wait_until,
)
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import func, select

from dimse.acceptor import Acceptor
from dimse.scp import AssociationServer
from gateway.core import Gateway
from gateway.metadata import dataset_offset
from gateway.models import Instance

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
    spooled copy is removed once its spooling finished, which may be just after the refusal
    was sent (gateway.ingest), hence the wait."""
    assert instance_count(gateway) == 0
    root = gateway.storage.root
    assert [p for p in root.rglob("*") if p.is_file() and ".incoming" not in p.parts] == []
    incoming = gateway.storage.incoming
    assert wait_until(lambda: not any(incoming.iterdir())), list(incoming.iterdir())


def dataset_bytes(data: bytes) -> bytes:
    return data[dataset_offset(data):]


# -- pynetdicom SCUs ----------------------------------------------------------------------------
def get_association(port: int, *, calling: str = "GETSCU") -> Any:
    """An association proposing C-GET and CT storage with SCP/SCU role selection: one the
    acceptor leaves to pynetdicom."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    return ae.associate("127.0.0.1", port, ae_title="DICOMGW",
                        ext_neg=[build_role(CTImageStorage, scu_role=True, scp_role=True)])


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
}


@pytest.mark.parametrize(("kind", "by_acceptor"), [
    ("storage-only", True), ("find-and-move", True), ("get-with-role-selection", False),
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


# -- the association limit, shared by both paths ------------------------------------------------
@pytest.mark.parametrize("second", ["storage-only", "get-with-role-selection"])
@pytest.mark.parametrize("held", ["storage-only", "get-with-role-selection"])
def test_association_limit_is_shared(tmp_path: Path, database_url: str, held: str,
                                     second: str) -> None:
    settings = make_settings(tmp_path, database_url, GATEWAY_DIMSE_MAX_ASSOCIATIONS="1")
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        first = ASSOCIATIONS[held](live.dimse_port)
        assert first.is_established
        try:
            other = ASSOCIATIONS[second](live.dimse_port)
            rejected = other.is_rejected
            if other.is_established:
                other.release()
        finally:
            first.release()
        assert rejected, f"a {second} association was accepted beside a {held} one"
        # The slot is free again once the first association ended.
        assert wait_until(lambda: all_ended(live))
        again = ASSOCIATIONS[second](live.dimse_port)
        assert again.is_established
        again.release()
