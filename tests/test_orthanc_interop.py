"""Interoperability with a real Orthanc (PS3.4 Annex C over real associations on 127.0.0.1).

Orthanc is started by the test with its own configuration (storage and index in ``tmp_path``,
no remote access, no authentication) and the gateway as a DICOM modality. It C-STOREs a study
into the gateway; the gateway C-MOVEs it to a pynetdicom Storage SCP and back to Orthanc, with
byte-identical pixel data; Orthanc also queries (C-FIND) and retrieves (C-MOVE) from the gateway
as an SCU.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore

from gateway.core import Gateway
from sample_dicom.generator import generate_study
from tests.support.common import LiveServer, part10
from tests.support.qr_helpers import (
    StoreSCP,
    free_port,
    identifier,
    qr_settings,
    store_scp,
    two_series_spec,
)

ORTHANC = os.environ.get("ORTHANC_BINARY") or shutil.which("Orthanc") or "/usr/sbin/Orthanc"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.access(ORTHANC, os.X_OK),
                       reason="Orthanc is not installed (apt-get install orthanc; make test "
                              "installs it)"),
]


@dataclass
class Orthanc:
    url: str
    dicom_port: int
    process: subprocess.Popen[bytes]

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=60) as response:
            payload = response.read()
        if response.headers.get_content_type() == "application/json":
            return json.loads(payload)
        return payload


def start_orthanc(folder: Path, dicom_port: int, http_port: int,
                  modalities: dict[str, list[Any]]) -> Orthanc:
    folder.mkdir()
    config = {
        "Name": "qr-interop",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomModalities": modalities,
        "Plugins": [],
        "StorageCompression": False,
        "DicomAssociationCloseDelay": 0,
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=log,
                               stderr=subprocess.STDOUT)
    log.close()
    orthanc = Orthanc(f"http://127.0.0.1:{http_port}", dicom_port, process)
    deadline = time.monotonic() + 30
    while True:
        try:
            orthanc.request("GET", "/system")
            return orthanc
        except (urllib.error.URLError, ConnectionError):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise RuntimeError("Orthanc did not start: "
                                   + (folder / "orthanc.log").read_text()[-2000:]) from None
            time.sleep(0.2)


@dataclass
class Interop:
    live: LiveServer
    orthanc: Orthanc
    scp: StoreSCP
    study: list[Dataset]
    files: dict[str, bytes]  # SOP Instance UID -> Part 10 bytes uploaded to Orthanc


@pytest.fixture
def interop(tmp_path: Path, database_url: str) -> Iterator[Interop]:
    orthanc_dicom, orthanc_http = free_port(), free_port()
    with store_scp() as scp:
        settings = qr_settings(tmp_path, database_url, destinations={
            "STORESCP": {"host": "127.0.0.1", "port": scp.port},
            "ORTHANC": {"host": "127.0.0.1", "port": orthanc_dicom},
        })
        gateway = Gateway(settings).open()
        try:
            with LiveServer(gateway) as live:
                orthanc = start_orthanc(tmp_path / "orthanc", orthanc_dicom, orthanc_http, {
                    "gateway": ["DICOMGW", "127.0.0.1", live.dimse_port]})
                try:
                    study = generate_study(two_series_spec(patient_id="ORTHANC01"), seed=7)
                    files = {str(ds.SOPInstanceUID): part10(ds) for ds in study}
                    for data in files.values():
                        orthanc.request("POST", "/instances", data)
                    yield Interop(live, orthanc, scp, study, files)
                finally:
                    orthanc.process.terminate()
                    try:
                        orthanc.process.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        orthanc.process.kill()
                        orthanc.process.wait()
        finally:
            gateway.close()


def pixel_data(data: bytes) -> bytes:
    return bytes(dcmread(io.BytesIO(data)).PixelData)


def orthanc_stores_study_into_gateway(env: Interop) -> str:
    study_uid = str(env.study[0].StudyInstanceUID)
    (orthanc_study,) = env.orthanc.request("POST", "/tools/lookup", study_uid.encode())
    job = env.orthanc.request("POST", "/modalities/gateway/store",
                              {"Resources": [orthanc_study["ID"]], "Synchronous": True})
    assert job.get("FailedInstancesCount", 0) == 0, job
    return study_uid


def test_orthanc_stores_then_gateway_moves_back_byte_identical(interop: Interop) -> None:
    study_uid = orthanc_stores_study_into_gateway(interop)
    index = interop.live.gateway.index
    for sop_uid in interop.files:
        assert index.find_instance(sop_uid) is not None

    # The gateway C-MOVEs the study to a pynetdicom Storage SCP ...
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", interop.live.dimse_port, ae_title="DICOMGW")
    responses = list(assoc.send_c_move(identifier("STUDY", StudyInstanceUID=study_uid),
                                       "STORESCP", StudyRootQueryRetrieveInformationModelMove))
    assoc.release()
    assert int(responses[-1][0].Status) == 0x0000
    assert set(interop.scp.received) == set(interop.files)
    for sop_uid, data in interop.files.items():
        got = interop.scp.received[sop_uid]
        assert got.transfer_syntax == dcmread(io.BytesIO(data)).file_meta \
            .TransferSyntaxUID
        assert bytes(got.dataset.PixelData) == pixel_data(data)

    # ... and back to Orthanc, after Orthanc forgot it.
    (orthanc_study,) = interop.orthanc.request("POST", "/tools/lookup", study_uid.encode())
    interop.orthanc.request("DELETE", f"/studies/{orthanc_study['ID']}")
    assert interop.orthanc.request("GET", "/instances") == []
    assoc = ae.associate("127.0.0.1", interop.live.dimse_port, ae_title="DICOMGW")
    responses = list(assoc.send_c_move(identifier("STUDY", StudyInstanceUID=study_uid),
                                       "ORTHANC", StudyRootQueryRetrieveInformationModelMove))
    assoc.release()
    final = responses[-1][0]
    assert int(final.Status) == 0x0000
    assert final.NumberOfCompletedSuboperations == len(interop.files)
    for orthanc_id in interop.orthanc.request("GET", "/instances"):
        data = interop.orthanc.request("GET", f"/instances/{orthanc_id}/file")
        sop_uid = str(dcmread(io.BytesIO(data)).SOPInstanceUID)
        assert pixel_data(data) == pixel_data(interop.files[sop_uid])
    assert len(interop.orthanc.request("GET", "/instances")) == len(interop.files)


def test_orthanc_queries_and_retrieves_from_the_gateway(interop: Interop) -> None:
    study_uid = orthanc_stores_study_into_gateway(interop)

    # Orthanc as C-FIND SCU.
    query = interop.orthanc.request("POST", "/modalities/gateway/query", {
        "Level": "Study", "Query": {"PatientID": "ORTHAN*", "StudyInstanceUID": "",
                                    "ModalitiesInStudy": ""}})
    answers = interop.orthanc.request("GET", f"/queries/{query['ID']}/answers?expand")
    assert len(answers) == 1
    assert answers[0]["0020,000d"]["Value"] == study_uid

    # Orthanc as C-MOVE SCU: the gateway sends the study to STORESCP.
    interop.orthanc.request("POST", "/modalities/gateway/move", {
        "Level": "Study", "Resources": [{"StudyInstanceUID": study_uid}],
        "TargetAet": "STORESCP", "Synchronous": True})
    assert set(interop.scp.received) == set(interop.files)
    for sop_uid, data in interop.files.items():
        assert bytes(interop.scp.received[sop_uid].dataset.PixelData) == pixel_data(data)
