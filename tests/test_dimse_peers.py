"""Who may query and retrieve over DIMSE (DESIGN.md "DIMSE peers"), replayed from an address
that is not loopback: the calling AE title is a name the caller chooses, so a peer listed to
store must not thereby list every patient and retrieve their instances; query/retrieve needs the
service granted *and* the peer's address named."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from gateway.core import Gateway
from tests.support.common import LiveServer, ct_dataset
from tests.support.qr_helpers import identifier, load_study, qr_settings

SUCCESS, PENDING, NOT_AUTHORIZED = 0x0000, 0xFF00, 0x0124


def outside_address() -> str | None:
    """This machine's address on its first non-loopback interface (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("198.51.100.1", 9))
            address = str(s.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


OUTSIDE = outside_address()
pytestmark = pytest.mark.skipif(OUTSIDE is None, reason="no non-loopback IPv4 address here")


@pytest.fixture
def archive(tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture
            ) -> Iterator[tuple[LiveServer, list[Dataset]]]:
    caplog.set_level(logging.WARNING, logger="dimse.scp")
    settings = qr_settings(
        tmp_path, database_url, dimse={"host": "0.0.0.0"},
        peers={"CT01": {"store": True},  # the example: listed to store, no host
               "WS01": {"find": True, "get": True},  # granted Q/R, but no host
               "WS02": {"find": True, "get": True, "host": OUTSIDE}})
    gateway = Gateway(settings).open()
    try:
        study = load_study(gateway)
        with LiveServer(gateway) as live:
            yield live, study
    finally:
        gateway.close()


def find_from(live: LiveServer, address: str, calling: str) -> list[tuple[int, Any]]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, ExplicitVRLittleEndian)
    assoc = ae.associate(address, live.dimse_port, ae_title=live.ae_title,
                         bind_address=(address, 0))
    assert assoc.is_established
    try:
        query = identifier("STUDY", PatientID="", PatientName="", StudyInstanceUID="")
        return [(int(s.Status), i) for s, i in
                assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
    finally:
        assoc.release()


def get_from(live: LiveServer, address: str, calling: str, study: str
             ) -> tuple[int, list[str]]:
    received: list[str] = []

    def handle_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return SUCCESS

    ae = AE(ae_title=calling)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(address, live.dimse_port, ae_title=live.ae_title,
                         bind_address=(address, 0),
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    assert assoc.is_established
    try:
        statuses = [int(s.Status) for s, _ in assoc.send_c_get(
            identifier("STUDY", StudyInstanceUID=study),
            StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    return statuses[-1], received


def test_a_store_peer_named_by_its_ae_title_alone_cannot_query_or_retrieve(
        archive: tuple[LiveServer, list[Dataset]]) -> None:
    live, study = archive
    assert OUTSIDE is not None
    assert find_from(live, OUTSIDE, "CT01") == [(NOT_AUTHORIZED, None)]
    status, received = get_from(live, OUTSIDE, "CT01", str(study[0].StudyInstanceUID))
    assert (status, received) == (NOT_AUTHORIZED, [])
    # It may still store: what it is listed for.
    ae = AE(ae_title="CT01")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(OUTSIDE, live.dimse_port, ae_title=live.ae_title,
                         bind_address=(OUTSIDE, 0))
    assert assoc.send_c_store(ct_dataset(study="1.2.826.0.1.3680043.8.498.77")).Status == SUCCESS
    assoc.release()


def test_query_retrieve_granted_without_a_host_is_refused_and_warned(
        archive: tuple[LiveServer, list[Dataset]], caplog: pytest.LogCaptureFixture) -> None:
    live, study = archive
    assert OUTSIDE is not None
    assert find_from(live, OUTSIDE, "WS01") == [(NOT_AUTHORIZED, None)]
    assert get_from(live, OUTSIDE, "WS01", str(study[0].StudyInstanceUID)) == (
        NOT_AUTHORIZED, [])
    warned = " ".join(r.getMessage() for r in caplog.get_records("setup"))
    assert "WS01 names no host" in warned and "CT01 names no host" in warned
    assert "WS02 names no host" not in warned


def test_query_retrieve_granted_with_the_host_named(
        archive: tuple[LiveServer, list[Dataset]]) -> None:
    live, study = archive
    assert OUTSIDE is not None
    responses = find_from(live, OUTSIDE, "WS02")
    assert responses[-1][0] == SUCCESS and len(responses) == 2
    status, received = get_from(live, OUTSIDE, "WS02", str(study[0].StudyInstanceUID))
    assert status == SUCCESS and len(received) == len(study)
    # Under its AE title but from elsewhere (loopback here: allowed as any AE is there).
    assert find_from(live, "127.0.0.1", "WS02")[-1][0] == SUCCESS
