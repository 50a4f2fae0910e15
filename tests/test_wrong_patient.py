"""The wrong-patient guard, over real associations and real HTTP, on SQLite and PostgreSQL.

An instance never joins another patient's study (patient identity: PatientID plus
IssuerOfPatientID where both name one), and a series UID never moves to another study: C-STORE
answers 0xA778 with an Error Comment naming the conflict, STOW-RS 409 with the same reason in
FailedSOPSequence; nothing is stored, and both patients' trails record the refusal. A DSP
creation date recorded before the first image of a patient arrives is used when it does.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from gateway.apikeys import ApiKeys
from gateway.audit import events_for_patient
from gateway.core import Gateway
from tests.support.common import LiveServer, ct_dataset, make_settings, part10
from tests.support.dicomweb_helpers import multipart_body
from tests.support.links_helpers import Client, fake_viewer, links_toml, small_study

CONFLICTING_IDENTITY = 0xA778
STUDY = "1.2.826.0.1.3680043.8.498.70"


@pytest.fixture
def live(tmp_path: Path, database_url: str) -> Iterator[tuple[LiveServer, str]]:
    config = tmp_path / "gateway.toml"
    config.write_text(links_toml(fake_viewer(tmp_path / "viewer")))
    settings = make_settings(tmp_path, database_url, GATEWAY_CONFIG=str(config))
    gateway = Gateway(settings).open()
    try:
        admin = str(ApiKeys(gateway.index).create(f"admin-{uuid.uuid4().hex[:6]}", "admin"))
        with LiveServer(gateway) as server:
            yield server, admin
    finally:
        gateway.close()


def c_store(port: int, ds: Dataset) -> Dataset:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGW")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def stow(server: LiveServer, token: str, ds: Dataset) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{server.http_url}/dicomweb/studies", method="POST",
        data=multipart_body([("application/dicom", part10(ds))]),
        headers={"Content-Type": 'multipart/related; type="application/dicom"; '
                                 "boundary=XyZzYboundary",
                 "Accept": "application/dicom+json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def instances(gateway: Gateway) -> int:
    return gateway.index.counts()["instances"]


def stored_patient(server: LiveServer, token: str) -> list[str]:
    reply = Client(server.http_url, bearer=token).request(
        "GET", f"/dicomweb/studies/{STUDY}/instances?includefield=PatientID",
        headers={"Accept": "application/dicom+json"})
    return sorted({m["00100020"]["Value"][0] for m in reply.json()})


@pytest.mark.parametrize("way", ["c-store", "stow"])
def test_another_patients_instance_is_refused_from_their_study(
        live: tuple[LiveServer, str], way: str) -> None:
    server, admin = live
    gateway = server.gateway
    owner = ct_dataset(0, study=STUDY)  # PatientID PAT-001
    assert int(c_store(server.dimse_port, owner).Status) == 0
    intruder = ct_dataset(1, study=STUDY)  # same study and series, another patient
    intruder.PatientID = "PAT-999"
    new_series = ct_dataset(0, study=STUDY, series=f"{STUDY}.7")  # a new series, same patient
    new_series.PatientID = "PAT-999"
    for ds in (intruder, new_series):
        if way == "c-store":
            status = c_store(server.dimse_port, ds)
            assert int(status.Status) == CONFLICTING_IDENTITY
            assert str(status.ErrorComment).startswith("study of another patient")
        else:
            code, body = stow(server, admin, ds)
            assert code == 409
            (failed,) = body["00081198"]["Value"]
            assert failed["00081197"]["Value"] == [CONFLICTING_IDENTITY]
            comment = failed["00741048"]["Value"][0]["00000902"]["Value"][0]
            assert comment.startswith("study of another patient")
    assert instances(gateway) == 1
    assert stored_patient(server, admin) == ["PAT-001"]
    # Each patient's trail has the refusals, naming only its own patient.
    for patient, other in (("PAT-001", "PAT-999"), ("PAT-999", "PAT-001")):
        refused = [e for e in events_for_patient(gateway.index, patient)
                   if e.action == "store" and e.outcome == 8]
        assert len(refused) == 2, patient
        assert all(other not in e.detail for e in refused)


def test_an_issuer_tells_two_patients_with_one_id_apart(live: tuple[LiveServer, str]) -> None:
    server, _admin = live
    owner = ct_dataset(0, study=STUDY)
    owner.IssuerOfPatientID = "HOSP-A"
    assert int(c_store(server.dimse_port, owner).Status) == 0
    same_id_other_issuer = ct_dataset(1, study=STUDY)
    same_id_other_issuer.IssuerOfPatientID = "HOSP-B"
    assert int(c_store(server.dimse_port, same_id_other_issuer).Status) == CONFLICTING_IDENTITY
    no_issuer = ct_dataset(2, study=STUDY)  # an issuer named on one side only: the same ID
    assert int(c_store(server.dimse_port, no_issuer).Status) == 0
    assert instances(server.gateway) == 2


@pytest.mark.parametrize("way", ["c-store", "stow"])
def test_a_series_never_moves_to_another_study(live: tuple[LiveServer, str], way: str) -> None:
    server, admin = live
    series = f"{STUDY}.1"
    assert int(c_store(server.dimse_port, ct_dataset(0, study=STUDY, series=series)).Status) == 0
    moved = ct_dataset(1, study=f"{STUDY}.2", series=series)  # the same patient, too
    if way == "c-store":
        status = c_store(server.dimse_port, moved)
        assert int(status.Status) == CONFLICTING_IDENTITY
        assert str(status.ErrorComment).startswith("series of another study")
    else:
        code, body = stow(server, admin, moved)
        assert code == 409
        (failed,) = body["00081198"]["Value"]
        assert failed["00081197"]["Value"] == [CONFLICTING_IDENTITY]
    assert instances(server.gateway) == 1
    assert server.gateway.index.counts()["studies"] == 1


def test_a_dsp_date_recorded_before_the_images_is_used_when_they_arrive(
        live: tuple[LiveServer, str]) -> None:
    server, admin = live
    portal = Client(server.http_url, bearer=admin)
    assert portal.request("PUT", "/api/patients/LU0000077/dsp",
                          {"created": "2020-01-01"}).status == 200
    link = {"viewer": {"id": "LU0000077", "name": "patient"}, "relationship": "patient"}
    assert portal.request("POST", "/api/links", {"study": STUDY, **link}).status == 404
    datasets = small_study("LU0000077", "DSP1", study_date="20240315", key_object=False)
    for ds in datasets:
        assert int(c_store(server.dimse_port, ds).Status) == 0
    study = str(datasets[0].StudyInstanceUID)
    minted = portal.request("POST", "/api/links", {"study": study, **link})
    assert minted.status == 201, minted.text
    # A study acquired before that date stays out of reach, as before.
    older = small_study("LU0000077", "DSP0", study_date="20190101", seed=3, key_object=False)
    for ds in older:
        assert int(c_store(server.dimse_port, ds).Status) == 0
    refused = portal.request("POST", "/api/links",
                             {"study": str(older[0].StudyInstanceUID), **link})
    assert refused.status == 403 and "before_dsp" in refused.text
