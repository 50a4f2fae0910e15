"""C-MOVE SCP over real associations on 127.0.0.1 (PS3.4 C.4.2), pynetdicom and dcmtk movescu.

The gateway moves to a real pynetdicom Storage SCP; every test asserts the statuses and counts
that crossed the wire and what the destination actually received.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
)

from gateway.audit import events_for_patient
from gateway.core import Gateway
from tests.support.common import LiveServer
from tests.support.qr_helpers import StoreSCP, identifier, load_study, qr_settings, store_scp

needs_dcmtk = pytest.mark.skipif(shutil.which("movescu") is None,
                                 reason="dcmtk is not installed (make test installs it)")
PENDING, SUCCESS, WARNING, CANCEL = 0xFF00, 0x0000, 0xB000, 0xFE00
ALL_FAILED, UNKNOWN_DESTINATION, BAD_IDENTIFIER = 0xA702, 0xA801, 0xA900


class Rig:
    """A live gateway whose move destination STORESCP is a real Storage SCP."""

    def __init__(self, live: LiveServer, scp: StoreSCP, study: list[Dataset]) -> None:
        self.live, self.scp, self.study = live, scp, study

    @property
    def gateway(self) -> Gateway:
        return self.live.gateway

    def move(self, ds: Dataset, *, destination: str = "STORESCP", calling: str = "TESTSCU",
             model: str = StudyRootQueryRetrieveInformationModelMove,
             ) -> list[tuple[int, Dataset, Dataset | None]]:
        """C-MOVE with pynetdicom; return every (status, status dataset, identifier)."""
        ae = AE(ae_title=calling)
        ae.add_requested_context(model)
        assoc = ae.associate("127.0.0.1", self.live.dimse_port, ae_title="DICOMGW")
        assert assoc.is_established
        try:
            return [(int(status.Status), status, ident)
                    for status, ident in assoc.send_c_move(ds, destination, model)]
        finally:
            assoc.release()


@pytest.fixture
def make_rig(tmp_path: Path, database_url: str) -> Iterator[Any]:
    started: list[Any] = []

    def make(*, syntaxes: list[str] | None = None, delay: float = 0.0,
             peers: dict[str, dict[str, Any]] | None = None) -> Rig:
        scp_kwargs: dict[str, Any] = {"delay": delay}
        if syntaxes is not None:
            scp_kwargs["syntaxes"] = syntaxes
        scp_cm = store_scp(**scp_kwargs)
        scp = scp_cm.__enter__()
        started.append(scp_cm)
        settings = qr_settings(
            tmp_path, database_url, peers=peers,
            destinations={"STORESCP": {"host": "127.0.0.1", "port": scp.port},
                          "NOBODY": {"host": "127.0.0.1", "port": 9}},
        )
        gateway = Gateway(settings).open()
        started.append(_Closing(gateway))
        study = load_study(gateway)
        live = LiveServer(gateway).__enter__()
        started.append(live)
        return Rig(live, scp, study)

    yield make
    for item in reversed(started):
        item.__exit__(None, None, None)


class _Closing:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def __exit__(self, *exc: object) -> None:
        self.gateway.close()


def final(responses: list[tuple[int, Dataset, Dataset | None]]) -> tuple[int, Dataset]:
    status, ds, _ident = responses[-1]
    return status, ds


def test_move_study_sends_every_instance_as_stored(make_rig: Any) -> None:
    rig = make_rig()
    study_uid = rig.study[0].StudyInstanceUID
    responses = rig.move(identifier("STUDY", StudyInstanceUID=study_uid))
    statuses = [s for s, _ds, _i in responses]
    assert statuses[:-1] == [PENDING] * 5
    remaining = [int(ds.NumberOfRemainingSuboperations) for s, ds, _i in responses[:-1]]
    assert remaining == [4, 3, 2, 1, 0]
    status, ds = final(responses)
    assert status == SUCCESS
    assert (ds.NumberOfCompletedSuboperations, ds.NumberOfFailedSuboperations,
            ds.NumberOfWarningSuboperations) == (5, 0, 0)
    assert set(rig.scp.received) == {d.SOPInstanceUID for d in rig.study}
    for original in rig.study:
        got = rig.scp.received[original.SOPInstanceUID]
        # As stored: the same transfer syntax and byte-identical pixel data.
        assert got.transfer_syntax == original.file_meta.TransferSyntaxUID
        assert bytes(got.dataset.PixelData) == bytes(original.PixelData)
        assert got.calling_ae == "DICOMGW"


def test_move_at_patient_series_and_image_level(make_rig: Any) -> None:
    rig = make_rig()
    first = rig.study[0]
    by_series: dict[str, list[str]] = {}
    for ds in rig.study:
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds.SOPInstanceUID)
    series_uids = list(by_series)

    responses = rig.move(identifier("PATIENT", PatientID=first.PatientID),
                         model=PatientRootQueryRetrieveInformationModelMove)
    assert final(responses)[0] == SUCCESS
    assert len(rig.scp.received) == 5

    rig.scp.received.clear()
    responses = rig.move(identifier("SERIES", StudyInstanceUID=first.StudyInstanceUID,
                                    SeriesInstanceUID=series_uids[1]))
    assert final(responses)[1].NumberOfCompletedSuboperations == 2
    assert set(rig.scp.received) == set(by_series[series_uids[1]])

    rig.scp.received.clear()
    wanted = [by_series[series_uids[0]][0], by_series[series_uids[1]][1]]
    responses = rig.move(identifier("IMAGE", StudyInstanceUID=first.StudyInstanceUID,
                                    SeriesInstanceUID=series_uids[0],
                                    SOPInstanceUID=wanted[:1]))
    assert final(responses)[1].NumberOfCompletedSuboperations == 1
    assert set(rig.scp.received) == {wanted[0]}

    # Patient Root, IMAGE level, a list of SOP Instance UIDs (PS3.4 C.4.2.2.1).
    rig.scp.received.clear()
    series_instances = by_series[series_uids[0]]
    responses = rig.move(
        identifier("IMAGE", PatientID=first.PatientID, StudyInstanceUID=first.StudyInstanceUID,
                   SeriesInstanceUID=series_uids[0], SOPInstanceUID=series_instances[:2]),
        model=PatientRootQueryRetrieveInformationModelMove)
    assert final(responses)[1].NumberOfCompletedSuboperations == 2
    assert set(rig.scp.received) == set(series_instances[:2])


def test_move_of_nothing_matched_is_success_with_no_suboperations(make_rig: Any) -> None:
    rig = make_rig()
    status, ds = final(rig.move(identifier("STUDY", StudyInstanceUID="1.2.3.999")))
    assert status == SUCCESS
    assert ds.NumberOfCompletedSuboperations == 0
    assert rig.scp.received == {}


def test_move_decompresses_for_a_destination_without_the_stored_syntax(make_rig: Any) -> None:
    rig = make_rig(syntaxes=[ImplicitVRLittleEndian])
    status, ds = final(rig.move(identifier("STUDY",
                                           StudyInstanceUID=rig.study[0].StudyInstanceUID)))
    assert status == SUCCESS
    assert ds.NumberOfCompletedSuboperations == 5
    for original in rig.study:
        got = rig.scp.received[original.SOPInstanceUID]
        assert got.transfer_syntax == ImplicitVRLittleEndian
        # Lossless JPEG 2000 decoded: the same pixel values, the same SOP Instance UID.
        assert np.array_equal(got.dataset.pixel_array, original.pixel_array)


def test_move_counts_instances_no_accepted_syntax_can_carry(make_rig: Any) -> None:
    rig = make_rig(syntaxes=[JPEG2000Lossless])
    responses = rig.move(identifier("STUDY", StudyInstanceUID=rig.study[0].StudyInstanceUID))
    status, ds = final(responses)
    uncompressed = {d.SOPInstanceUID for d in rig.study
                    if d.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian}
    assert len(uncompressed) == 3
    assert status == WARNING  # some sub-operations failed (PS3.4 C.4.2.1.5)
    assert (ds.NumberOfCompletedSuboperations, ds.NumberOfFailedSuboperations) == (2, 3)
    assert set(responses[-1][2].FailedSOPInstanceUIDList) == uncompressed
    assert set(rig.scp.received) == {d.SOPInstanceUID for d in rig.study} - uncompressed


def test_move_where_every_instance_fails_is_a702(make_rig: Any) -> None:
    rig = make_rig(syntaxes=["1.2.840.10008.1.2.4.50"])  # JPEG Baseline only
    status, ds = final(rig.move(identifier("STUDY",
                                           StudyInstanceUID=rig.study[0].StudyInstanceUID)))
    assert status == ALL_FAILED
    assert ds.NumberOfFailedSuboperations == 5
    assert rig.scp.received == {}


def test_move_to_unknown_destination_is_a801(make_rig: Any) -> None:
    rig = make_rig()
    status, _ds = final(rig.move(identifier("STUDY",
                                            StudyInstanceUID=rig.study[0].StudyInstanceUID),
                                 destination="ELSEWHERE"))
    assert status == UNKNOWN_DESTINATION
    assert rig.scp.received == {}


def test_move_destination_that_does_not_answer_is_a801(make_rig: Any) -> None:
    rig = make_rig()
    status, _ds = final(rig.move(identifier("STUDY",
                                            StudyInstanceUID=rig.study[0].StudyInstanceUID),
                                 destination="NOBODY"))
    assert status == UNKNOWN_DESTINATION


def test_move_by_a_denied_peer_contacts_no_destination(make_rig: Any) -> None:
    rig = make_rig(peers={"VIEWONLY": {"find": True, "move": False, "get": False}})
    study_uid = rig.study[0].StudyInstanceUID
    status, _ds = final(rig.move(identifier("STUDY", StudyInstanceUID=study_uid),
                                 calling="VIEWONLY"))
    assert status == UNKNOWN_DESTINATION
    assert rig.scp.received == {}
    # Any other AE on loopback may still move (DESIGN.md "DIMSE peers").
    assert final(rig.move(identifier("STUDY", StudyInstanceUID=study_uid)))[0] == SUCCESS


@pytest.mark.parametrize("ds", [
    identifier("STUDY"),
    identifier("STUDY", StudyInstanceUID="1.2.x.3"),
    identifier("SERIES", StudyInstanceUID="1.2.3", SeriesInstanceUID=""),
    identifier("PATIENT", PatientID="LU0000001"),  # no PATIENT level in Study Root
    identifier("WARD", StudyInstanceUID="1.2.3"),
], ids=["no-uid", "bad-uid", "empty-series", "patient-in-study-root", "bad-level"])
def test_move_with_an_invalid_identifier_is_a900(make_rig: Any, ds: Dataset) -> None:
    rig = make_rig()
    status, _ds = final(rig.move(ds))
    assert status == BAD_IDENTIFIER
    assert rig.scp.received == {}


def test_move_cancel_stops_the_suboperations(make_rig: Any) -> None:
    rig = make_rig(delay=0.3)
    model = StudyRootQueryRetrieveInformationModelMove
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", rig.live.dimse_port, ae_title="DICOMGW")
    context_id = assoc.accepted_contexts[0].context_id
    responses = []
    cancelled = threading.Event()
    for status, _ds in assoc.send_c_move(
            identifier("STUDY", StudyInstanceUID=rig.study[0].StudyInstanceUID), "STORESCP",
            model, msg_id=7):
        responses.append((int(status.Status), status))
        if not cancelled.is_set():
            assoc.send_c_cancel(7, context_id)
            cancelled.set()
    assoc.release()
    status, ds = responses[-1]
    assert status == CANCEL
    assert ds.NumberOfRemainingSuboperations > 0
    assert len(rig.scp.received) == ds.NumberOfCompletedSuboperations < 5


# -- dcmtk movescu ---------------------------------------------------------------------------
def movescu(rig: Rig, *keys: str, model: str = "-S", extra: tuple[str, ...] = (),
            destination: str = "STORESCP") -> subprocess.CompletedProcess[str]:
    args = ["movescu", "-v", model, "-aet", "MOVESCU", "-aec", "DICOMGW", "-aem", destination,
            *extra]
    for key in keys:
        args += ["-k", key]
    args += ["127.0.0.1", str(rig.live.dimse_port)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


@needs_dcmtk
@pytest.mark.parametrize("level", ["PATIENT", "STUDY", "SERIES", "IMAGE"])
def test_movescu_at_each_level(make_rig: Any, level: str) -> None:
    rig = make_rig()
    first = rig.study[0]
    keys = [f"QueryRetrieveLevel={level}"]
    expected = {d.SOPInstanceUID for d in rig.study}
    if level == "PATIENT":
        keys.append(f"PatientID={first.PatientID}")
    else:
        keys.append(f"StudyInstanceUID={first.StudyInstanceUID}")
    if level in ("SERIES", "IMAGE"):
        keys.append(f"SeriesInstanceUID={first.SeriesInstanceUID}")
        expected = {d.SOPInstanceUID for d in rig.study
                    if d.SeriesInstanceUID == first.SeriesInstanceUID}
    if level == "IMAGE":
        keys.append(f"SOPInstanceUID={first.SOPInstanceUID}")
        expected = {first.SOPInstanceUID}
    result = movescu(rig, *keys, model="-P" if level == "PATIENT" else "-S")
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "Received Final Move Response (Success)" in output, output
    assert set(rig.scp.received) == expected


@needs_dcmtk
def test_movescu_to_unknown_destination(make_rig: Any) -> None:
    rig = make_rig()
    result = movescu(rig, "QueryRetrieveLevel=STUDY",
                     f"StudyInstanceUID={rig.study[0].StudyInstanceUID}", destination="ELSEWHERE")
    output = result.stdout + result.stderr
    assert "Final Move Response (Refused: MoveDestinationUnknown)" in output, output
    assert rig.scp.received == {}


@needs_dcmtk
def test_movescu_denied_peer(make_rig: Any) -> None:
    rig = make_rig(peers={"MOVESCU": {"move": False}})
    result = movescu(rig, "QueryRetrieveLevel=STUDY",
                     f"StudyInstanceUID={rig.study[0].StudyInstanceUID}")
    output = result.stdout + result.stderr
    assert "Final Move Response (Refused: MoveDestinationUnknown)" in output, output
    assert rig.scp.received == {}


@needs_dcmtk
def test_movescu_cancel(make_rig: Any) -> None:
    rig = make_rig(delay=0.3)
    result = movescu(rig, "QueryRetrieveLevel=STUDY",
                     f"StudyInstanceUID={rig.study[0].StudyInstanceUID}",
                     extra=("--cancel", "1"))
    output = result.stdout + result.stderr
    assert "Cancel" in output, output
    assert 0 < len(rig.scp.received) < 5


def test_move_is_in_the_access_trail(make_rig: Any, caplog: pytest.LogCaptureFixture) -> None:
    rig = make_rig()
    caplog.set_level("INFO", logger="dimse.audit")
    study_uid = rig.study[0].StudyInstanceUID
    rig.move(identifier("STUDY", StudyInstanceUID=study_uid), calling="PACS1")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "dimse.audit"]
    assert line.startswith("audit 110104 success by dimse:PACS1 from 127.0.0.1")
    assert study_uid in line and "C-MOVE to STORESCP" in line and "5 instances" in line
    (entry,) = events_for_patient(rig.gateway.index, rig.study[0].PatientID)
    assert (entry.action, entry.actor, entry.study_instance_uid) == (
        "transfer", "dimse:PACS1", study_uid)
