"""C-MOVE and C-GET answer the same fault the same way, over both ways an association runs.

An identifier that does not fit the information model is 0xA900 (Identifier does not match
SOP Class); one that cannot be decoded is 0xC000 (Unable to process), as C-FIND answers (PS3.4
C.4.1.1.4, C.4.2.1.5, C.4.3.1.3; docs/conformance-dimse.md §4.3). The requests go over real
associations on 127.0.0.1, the identifier's bytes exactly as written here; one association is
run by the gateway's own loop, the other (it proposes user identity) by pynetdicom.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from gateway.core import Gateway
from tests.support.common import LiveServer
from tests.support.qr_helpers import StoreSCP, load_study, qr_settings, store_scp

PENDING = 0xFF00
BAD_IDENTIFIER, UNABLE_TO_PROCESS = 0xA900, 0xC000


def element(group: int, number: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian data element (PS3.5 7.1.2)."""
    return struct.pack("<HH2sH", group, number, vr, len(value)) + value


# Decodes, but a SERIES retrieve names no SeriesInstanceUID (PS3.4 C.4.2.2.1): 0xA900.
INVALID_QUERY = element(0x0008, 0x0052, b"CS", b"SERIES") \
    + element(0x0020, 0x000D, b"UI", b"1.2.3\x00")
# Query/Retrieve Level with a VR that does not exist: no decoder can read it: 0xC000.
UNDECODABLE = element(0x0008, 0x0052, b"ZZ", b"STUDY ")


@pytest.fixture
def served(tmp_path: Path, database_url: str) -> Iterator[tuple[LiveServer, StoreSCP]]:
    with store_scp() as scp:
        settings = qr_settings(tmp_path, database_url,
                               destinations={"STORESCP": {"host": "127.0.0.1",
                                                          "port": scp.port}})
        gateway = Gateway(settings).open()
        try:
            load_study(gateway)
            with LiveServer(gateway) as live:
                yield live, scp
        finally:
            gateway.close()


def retrieve(live: LiveServer, service: str, identifier: bytes, *, by_pynetdicom: bool
             ) -> list[int]:
    """Send a C-MOVE (to STORESCP) or C-GET whose identifier is ``identifier``, byte for
    byte; every status that came back."""
    model = StudyRootQueryRetrieveInformationModelMove if service == "move" \
        else StudyRootQueryRetrieveInformationModelGet
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(model, [ExplicitVRLittleEndian])
    negotiation = []
    if by_pynetdicom:
        identity = UserIdentityNegotiation()
        identity.user_identity_type = 1
        identity.primary_field = b"radiologist"
        negotiation = [identity]
    assoc = ae.associate("127.0.0.1", live.dimse_port, ae_title="DICOMGW", ext_neg=negotiation)
    assert assoc.is_established
    request: Any = C_MOVE() if service == "move" else C_GET()
    request.MessageID = 9
    request.Priority = 2
    request.AffectedSOPClassUID = model
    if service == "move":
        request.MoveDestination = "STORESCP"
    request.Identifier = BytesIO(identifier)
    statuses: list[int] = []
    assoc._reactor_checkpoint.clear()  # noqa: SLF001 - as send_c_move does
    while not assoc._is_paused:  # noqa: SLF001
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(request, assoc.accepted_contexts[0].context_id)
        while not statuses or statuses[-1] == PENDING:
            _context, response = assoc.dimse.get_msg(block=True)
            assert response is not None, f"no response after {statuses}"
            statuses.append(int(response.Status))
    finally:
        assoc._reactor_checkpoint.set()  # noqa: SLF001
        assoc.release()
    return statuses


@pytest.mark.parametrize("identifier, status", [(INVALID_QUERY, BAD_IDENTIFIER),
                                                (UNDECODABLE, UNABLE_TO_PROCESS)],
                         ids=["invalid-query", "undecodable"])
def test_move_and_get_answer_the_same_both_ways(served: Any, identifier: bytes,
                                                status: int) -> None:
    live, scp = served
    answers = {(service, way): retrieve(live, service, identifier, by_pynetdicom=way)
               for service in ("move", "get") for way in (False, True)}
    assert answers == {key: [status] for key in answers}
    assert scp.received == {}
