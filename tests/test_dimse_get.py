"""C-GET SCP over real associations on 127.0.0.1 (PS3.4 C.4.3), pynetdicom and dcmtk getscu.

The SCU proposes storage contexts with SCP/SCU Role Selection (PS3.7 D.3.3.4) and receives the
instances on the same association.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)

from gateway.core import Gateway
from tests.support.common import LiveServer
from tests.support.qr_helpers import ALL_SYNTAXES, identifier, load_study, qr_settings

needs_dcmtk = pytest.mark.skipif(shutil.which("getscu") is None,
                                 reason="dcmtk is not installed (make test installs it)")
PENDING, SUCCESS, WARNING, CANCEL = 0xFF00, 0x0000, 0xB000, 0xFE00
ALL_FAILED, BAD_IDENTIFIER, NOT_AUTHORIZED = 0xA702, 0xA900, 0x0124


@pytest.fixture
def served(tmp_path: Path, database_url: str) -> Iterator[tuple[LiveServer, list[Dataset]]]:
    settings = qr_settings(tmp_path, database_url,
                           peers={"VIEWONLY": {"find": True, "move": False, "get": False}})
    gateway = Gateway(settings).open()
    try:
        study = load_study(gateway)
        with LiveServer(gateway) as live:
            yield live, study
    finally:
        gateway.close()


def get(live: LiveServer, ds: Dataset, *, calling: str = "TESTSCU",
        model: str = StudyRootQueryRetrieveInformationModelGet,
        syntaxes: list[str] | None = None, role: bool = True, delay: float = 0.0,
        cancel_after: int | None = None) -> tuple[list[tuple[int, Dataset]], dict[str, Any]]:
    """C-GET with pynetdicom; return the responses and what arrived, by SOP Instance UID."""
    received: dict[str, Any] = {}

    def handle_store(event: Any) -> int:
        if delay:
            time.sleep(delay)
        got = event.dataset
        got.file_meta = event.file_meta
        received[str(got.SOPInstanceUID)] = (str(event.context.transfer_syntax), got)
        return 0x0000

    ae = AE(ae_title=calling)
    ae.add_requested_context(model)
    if syntaxes is None:
        # One context per syntax, so that the stored one can be accepted beside the fallback.
        for syntax in ALL_SYNTAXES[:6]:
            ae.add_requested_context(CTImageStorage, [syntax])
        ae.add_requested_context(CTImageStorage, [JPEG2000Lossless])
    else:
        ae.add_requested_context(CTImageStorage, syntaxes)
    roles = [build_role(CTImageStorage, scp_role=True)] if role else []
    assoc = ae.associate("127.0.0.1", live.dimse_port, ae_title="DICOMGW", ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    assert assoc.is_established
    context_id = next(cx.context_id for cx in assoc.accepted_contexts
                      if cx.abstract_syntax == model)
    responses = []
    try:
        for status, _ident in assoc.send_c_get(ds, model, msg_id=5):
            responses.append((int(status.Status), status))
            if cancel_after is not None and len(responses) == cancel_after:
                assoc.send_c_cancel(5, context_id)
    finally:
        assoc.release()
    return responses, received


def test_get_study_on_the_same_association(served: Any) -> None:
    live, study = served
    responses, received = get(live, identifier("STUDY",
                                               StudyInstanceUID=study[0].StudyInstanceUID))
    assert [s for s, _ in responses[:-1]] == [PENDING] * 5
    assert [int(ds.NumberOfRemainingSuboperations) for _s, ds in responses[:-1]] == [
        4, 3, 2, 1, 0]
    status, ds = responses[-1]
    assert status == SUCCESS
    assert ds.NumberOfCompletedSuboperations == 5
    for original in study:
        syntax, got = received[original.SOPInstanceUID]
        assert syntax == original.file_meta.TransferSyntaxUID
        assert bytes(got.PixelData) == bytes(original.PixelData)


@pytest.mark.parametrize("level", ["PATIENT", "STUDY", "SERIES", "IMAGE"])
def test_get_at_each_level_patient_root(served: Any, level: str) -> None:
    live, study = served
    first = study[0]
    keys: dict[str, Any] = {"PatientID": first.PatientID}
    expected = {d.SOPInstanceUID for d in study}
    if level != "PATIENT":
        keys["StudyInstanceUID"] = first.StudyInstanceUID
    if level in ("SERIES", "IMAGE"):
        keys["SeriesInstanceUID"] = first.SeriesInstanceUID
        expected = {d.SOPInstanceUID for d in study
                    if d.SeriesInstanceUID == first.SeriesInstanceUID}
    if level == "IMAGE":
        keys["SOPInstanceUID"] = [first.SOPInstanceUID, study[1].SOPInstanceUID]
        expected = {first.SOPInstanceUID, study[1].SOPInstanceUID}
    responses, received = get(live, identifier(level, **keys),
                              model=PatientRootQueryRetrieveInformationModelGet)
    assert responses[-1][0] == SUCCESS
    assert set(received) == expected


def test_get_decompresses_when_only_uncompressed_was_accepted(served: Any) -> None:
    live, study = served
    responses, received = get(live, identifier("STUDY",
                                               StudyInstanceUID=study[0].StudyInstanceUID),
                              syntaxes=[ImplicitVRLittleEndian])
    assert responses[-1][0] == SUCCESS
    for original in study:
        syntax, got = received[original.SOPInstanceUID]
        assert syntax == ImplicitVRLittleEndian
        assert np.array_equal(got.pixel_array, original.pixel_array)


def test_get_without_role_selection_fails_every_suboperation(served: Any) -> None:
    live, study = served
    responses, received = get(live, identifier("STUDY",
                                               StudyInstanceUID=study[0].StudyInstanceUID),
                              role=False)
    status, ds = responses[-1]
    assert status == ALL_FAILED
    assert ds.NumberOfFailedSuboperations == 5
    assert received == {}


def test_get_by_a_denied_peer_is_refused_not_authorized(served: Any) -> None:
    live, study = served
    responses, received = get(live, identifier("STUDY",
                                               StudyInstanceUID=study[0].StudyInstanceUID),
                              calling="VIEWONLY")
    assert [s for s, _ in responses] == [NOT_AUTHORIZED]
    assert received == {}


def test_get_with_an_invalid_identifier_is_a900(served: Any) -> None:
    live, _study = served
    responses, received = get(live, identifier("SERIES", StudyInstanceUID="1.2.3"))
    assert responses[-1][0] == BAD_IDENTIFIER
    assert received == {}


def test_get_cancel(served: Any) -> None:
    live, study = served
    responses, received = get(live, identifier("STUDY",
                                               StudyInstanceUID=study[0].StudyInstanceUID),
                              delay=0.2, cancel_after=1)
    status, ds = responses[-1]
    assert status == CANCEL
    assert ds.NumberOfRemainingSuboperations > 0
    assert 0 < len(received) < 5


# -- dcmtk getscu ----------------------------------------------------------------------------
def getscu(live: LiveServer, out: Path, *keys: str, model: str = "-S",
           calling: str = "GETSCU", extra: tuple[str, ...] = ()
           ) -> subprocess.CompletedProcess[str]:
    out.mkdir(exist_ok=True)
    args = ["getscu", "-v", model, "-aet", calling, "-aec", "DICOMGW", "-od", str(out), *extra]
    for key in keys:
        args += ["-k", key]
    args += ["127.0.0.1", str(live.dimse_port)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


@needs_dcmtk
@pytest.mark.parametrize("level", ["PATIENT", "STUDY", "SERIES", "IMAGE"])
def test_getscu_at_each_level(served: Any, tmp_path: Path, level: str) -> None:
    live, study = served
    first = study[0]
    keys = [f"QueryRetrieveLevel={level}", f"PatientID={first.PatientID}"]
    expected = {d.SOPInstanceUID for d in study}
    if level != "PATIENT":
        keys.append(f"StudyInstanceUID={first.StudyInstanceUID}")
    if level in ("SERIES", "IMAGE"):
        keys.append(f"SeriesInstanceUID={first.SeriesInstanceUID}")
        expected = {d.SOPInstanceUID for d in study
                    if d.SeriesInstanceUID == first.SeriesInstanceUID}
    if level == "IMAGE":
        keys.append(f"SOPInstanceUID={first.SOPInstanceUID}")
        expected = {first.SOPInstanceUID}
    out = tmp_path / "got"
    result = getscu(live, out, *keys, model="-P")
    assert result.returncode == 0, result.stderr
    files = [dcmread(p) for p in out.iterdir()]
    assert {f.SOPInstanceUID for f in files} == expected
    originals = {d.SOPInstanceUID: d for d in study}
    for got in files:
        assert bytes(got.PixelData) == bytes(originals[got.SOPInstanceUID].PixelData) \
            or got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


@needs_dcmtk
def test_getscu_denied_peer(served: Any, tmp_path: Path) -> None:
    live, study = served
    out = tmp_path / "got"
    result = getscu(live, out, "QueryRetrieveLevel=STUDY",
                    f"StudyInstanceUID={study[0].StudyInstanceUID}", calling="VIEWONLY")
    output = result.stdout + result.stderr
    # dcmtk 3.6.7 has no name for the PS3.7 general status 0124H and prints it as unknown.
    assert "C-GET Response (Unknown Status: 0x124)" in output, output
    assert list(out.iterdir()) == []
