"""IHE IOCM over the wire: key images by document title, and rejection notes hiding what they
name from every path (QIDO-RS and its counts, metadata, WADO-RS, frames, rendered, thumbnails,
C-FIND, C-MOVE, C-GET, viewer sessions, key images), on SQLite and PostgreSQL.

The study: two image series (A: a0 a1 a2; B: b0 b1), an "Of Interest" KOS on a1 and b0, a
manifest KOS on every image, and a rejection note (113001) on a1 (a key image) and a2 (not).
What must remain everywhere: a0, b0, b1, the key-image KOS and the manifest; key images: b0.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from pydicom import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, KeyObjectSelectionDocumentStorage
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from gateway.apikeys import ApiKeys
from gateway.audit import events_for_patient
from gateway.core import Gateway
from sample_dicom.generator import SeriesSpec, StudySpec, generate_study, key_object
from tests.support.common import LiveServer, make_settings, part10, stored_relpaths
from tests.support.dicomweb_helpers import multipart_body, parse_multipart
from tests.support.links_helpers import Client, cookie_of, fake_viewer, links_toml
from tests.support.qr_helpers import identifier, store_scp, toml_value

PATIENT = "LU0000042"
MANIFEST = ("113030", "DCM", "Manifest")
QUALITY = ("113001", "DCM", "Rejected for Quality Reasons")
RETENTION = ("113039", "DCM", "Data Retention Policy Expired")
SUBSEQUENT_OCCURRENCE_OF_REJECTED = 0xA771


class Study:
    """The data sets of the scenario, by role."""

    def __init__(self, seed: int = 21, note_title: tuple[str, str, str] = QUALITY) -> None:
        spec = StudySpec(patient_id=PATIENT, accession_number="IOCM1", study_date="20240315",
                         series=(SeriesSpec(instances=3, rows=32, columns=32),
                                 SeriesSpec(instances=2, rows=32, columns=32)),
                         key_object=False)
        images = generate_study(spec, seed=seed)
        self.uid = str(images[0].StudyInstanceUID)
        self.a0, self.a1, self.a2, self.b0, self.b1 = images
        self.key = key_object(spec, [self.a1, self.b0], 3, self.uid)
        self.manifest = key_object(spec, images, 4, self.uid, title=MANIFEST)
        self.note = key_object(spec, [self.a1, self.a2], 5, self.uid, title=note_title)
        self.images = images

    @property
    def before_note(self) -> list[Dataset]:
        return [*self.images, self.key, self.manifest]

    @property
    def visible(self) -> set[str]:
        return {uid(ds) for ds in (self.a0, self.b0, self.b1, self.key, self.manifest)}

    @property
    def hidden(self) -> list[Dataset]:
        return [self.a1, self.a2, self.note]


def uid(ds: Dataset) -> str:
    return str(ds.SOPInstanceUID)


def c_store(port: int, datasets: list[Dataset]) -> list[int]:
    """Send data sets over one pynetdicom association; the statuses, in order."""
    ae = AE(ae_title="MODALITY")
    for sop_class in (CTImageStorage, KeyObjectSelectionDocumentStorage):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGW")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


@pytest.fixture
def rig(tmp_path: Path, database_url: str) -> Iterator[dict[str, Any]]:
    """A live gateway with viewer links and a C-MOVE destination, the study stored (over
    C-STORE), then the rejection note."""
    with store_scp() as scp:
        config = tmp_path / "gateway.toml"
        config.write_text(links_toml(fake_viewer(tmp_path / "viewer")) + "\n[dimse.destinations]\n"
                          f'"STORESCP" = {{ host = "127.0.0.1", port = {toml_value(scp.port)} }}\n')
        settings = make_settings(tmp_path, database_url, GATEWAY_CONFIG=str(config))
        gateway = Gateway(settings).open()
        try:
            keys = ApiKeys(gateway.index)
            suffix = uuid.uuid4().hex[:6]
            admin = str(keys.create(f"portal-{suffix}", "admin"))
            reader = str(keys.create(f"reader-{suffix}", "dicomweb:read"))
            with LiveServer(gateway) as live:
                study = Study()
                assert c_store(live.dimse_port, study.before_note) == [0] * 7
                assert c_store(live.dimse_port, [study.note]) == [0]
                yield {"live": live, "gateway": gateway, "study": study, "scp": scp,
                       "admin": Client(live.http_url, bearer=admin),
                       "reader": Client(live.http_url, bearer=reader)}
        finally:
            gateway.close()


def _values(item: dict[str, Any], tag: str) -> list[Any]:
    return list(item.get(tag, {}).get("Value", []))


def _sop_uids(documents: list[dict[str, Any]]) -> set[str]:
    return {_values(d, "00080018")[0] for d in documents}


def test_every_path_hides_the_rejected_instances_and_the_note(rig: dict[str, Any]) -> None:
    study: Study = rig["study"]
    reader: Client = rig["reader"]
    base = f"/dicomweb/studies/{study.uid}"
    json_accept = {"Accept": "application/dicom+json"}

    # QIDO-RS: the study's counts, its series and their counts, its instances.
    (found,) = reader.request(
        "GET", f"/dicomweb/studies?StudyInstanceUID={study.uid}&includefield="
               "NumberOfStudyRelatedInstances,NumberOfStudyRelatedSeries,ModalitiesInStudy",
        headers=json_accept).json()
    assert _values(found, "00201208") == [5]
    assert _values(found, "00201206") == [4]  # the note's series, left empty, is gone
    assert sorted(_values(found, "00080061")) == ["CT", "KO"]
    series = reader.request("GET", f"{base}/series?includefield=NumberOfSeriesRelatedInstances",
                            headers=json_accept).json()
    counts = {_values(s, "0020000E")[0]: _values(s, "00201209")[0] for s in series}
    assert counts == {str(study.a0.SeriesInstanceUID): 1, str(study.b0.SeriesInstanceUID): 2,
                      str(study.key.SeriesInstanceUID): 1,
                      str(study.manifest.SeriesInstanceUID): 1}
    instances = reader.request("GET", f"{base}/instances", headers=json_accept).json()
    assert _sop_uids(instances) == study.visible
    assert reader.request("GET", f"/dicomweb/instances?SOPInstanceUID={uid(study.a1)}",
                          headers=json_accept).json() == []

    # Metadata, of the study and of a series.
    metadata = reader.request("GET", f"{base}/metadata", headers=json_accept).json()
    assert _sop_uids(metadata) == study.visible
    series_a = f"{base}/series/{study.a0.SeriesInstanceUID}"
    assert _sop_uids(reader.request("GET", f"{series_a}/metadata",
                                    headers=json_accept).json()) == {uid(study.a0)}

    # WADO-RS: the whole study, and each hidden instance by its own URL (and its pixels).
    whole = reader.request("GET", base,
                           headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert whole.status == 200
    parts = parse_multipart(whole.body, whole.headers["Content-Type"])
    assert len(parts) == 5
    for ds in study.hidden:
        url = f"{base}/series/{ds.SeriesInstanceUID}/instances/{uid(ds)}"
        assert reader.request("GET", url, headers={
            "Accept": 'multipart/related; type="application/dicom"'}).status == 404, url
        assert reader.request("GET", f"{url}/metadata", headers=json_accept).status == 404
        if ds is not study.note:
            assert reader.request("GET", f"{url}/frames/1").status == 404
            assert reader.request("GET", f"{url}/rendered").status == 404
            assert reader.request("GET", f"{url}/thumbnail").status == 404
    visible = f"{series_a}/instances/{uid(study.a0)}"
    assert reader.request("GET", f"{visible}/frames/1").status == 200
    assert reader.request("GET", f"{visible}/rendered").status == 200
    rendered = reader.request("GET", f"{series_a}/rendered",
                              headers={"Accept": 'multipart/related; type="image/jpeg"'})
    assert rendered.status == 200
    assert len(parse_multipart(rendered.body, rendered.headers["Content-Type"])) == 1

    # C-FIND at the study and image levels.
    live: LiveServer = rig["live"]
    ae = AE(ae_title="TESTSCU")
    for model in (StudyRootQueryRetrieveInformationModelFind,
                  StudyRootQueryRetrieveInformationModelMove):
        ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", live.dimse_port, ae_title="DICOMGW")
    assert assoc.is_established
    try:
        study_level = [ident for status, ident in assoc.send_c_find(
            identifier("STUDY", StudyInstanceUID=study.uid, NumberOfStudyRelatedInstances="",
                       NumberOfStudyRelatedSeries=""),
            StudyRootQueryRetrieveInformationModelFind) if status.Status == 0xFF00]
        assert [(int(i.NumberOfStudyRelatedInstances), int(i.NumberOfStudyRelatedSeries))
                for i in study_level] == [(5, 4)]
        image_level = [str(ident.SOPInstanceUID) for status, ident in assoc.send_c_find(
            identifier("IMAGE", StudyInstanceUID=study.uid, SOPInstanceUID=""),
            StudyRootQueryRetrieveInformationModelFind) if status.Status == 0xFF00]
        assert set(image_level) == study.visible and len(image_level) == 5
        # C-MOVE of the study, and of a rejected instance by its UID.
        moved = [int(s.Status) for s, _ in assoc.send_c_move(
            identifier("STUDY", StudyInstanceUID=study.uid), "STORESCP",
            StudyRootQueryRetrieveInformationModelMove)]
        assert moved[-1] == 0x0000
        assert set(rig["scp"].received) == study.visible
        rejected_move = [s for s, _ in assoc.send_c_move(
            identifier("IMAGE", StudyInstanceUID=study.uid,
                       SeriesInstanceUID=study.a1.SeriesInstanceUID,
                       SOPInstanceUID=uid(study.a1)), "STORESCP",
            StudyRootQueryRetrieveInformationModelMove)]
        assert int(rejected_move[-1].NumberOfCompletedSuboperations or 0) == 0
    finally:
        assoc.release()

    # C-GET of the study, on the same association.
    received: set[str] = set()

    def handle_store(event: Any) -> int:
        received.add(str(event.dataset.SOPInstanceUID))
        return 0x0000

    getter = AE(ae_title="TESTSCU")
    getter.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class in (CTImageStorage, KeyObjectSelectionDocumentStorage):
        getter.add_requested_context(sop_class, ExplicitVRLittleEndian)
    roles = [build_role(c, scp_role=True)
             for c in (CTImageStorage, KeyObjectSelectionDocumentStorage)]
    assoc = getter.associate("127.0.0.1", live.dimse_port, ae_title="DICOMGW", ext_neg=roles,
                             evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    assert assoc.is_established
    try:
        statuses = [int(s.Status) for s, _ in assoc.send_c_get(
            identifier("STUDY", StudyInstanceUID=study.uid),
            StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000
    assert received == study.visible


def _open_link(rig: dict[str, Any], *, key_images_only: bool) -> Client:
    admin: Client = rig["admin"]
    study: Study = rig["study"]
    assert admin.request("PUT", f"/api/patients/{PATIENT}/dsp",
                         {"created": "2020-01-01"}).status == 200
    minted = admin.request("POST", "/api/links", {
        "study": study.uid, "viewer": {"id": PATIENT, "name": "patient"},
        "relationship": "patient", "key_images_only": key_images_only})
    assert minted.status == 201, minted.text
    browser = Client(admin.base)
    opened = browser.request("GET", urlsplit(minted.json()["url"]).path)
    assert opened.status == 303, opened.text
    browser.cookies["gw_session"] = cookie_of(opened)[0]
    return browser


def test_viewer_sessions_and_key_images_leave_out_the_rejected(rig: dict[str, Any]) -> None:
    study: Study = rig["study"]
    json_accept = {"Accept": "application/dicom+json"}
    base = f"/dicomweb/studies/{study.uid}"

    whole = _open_link(rig, key_images_only=False)
    assert _sop_uids(whole.request("GET", f"{base}/instances",
                                   headers=json_accept).json()) == study.visible
    assert _sop_uids(whole.request("GET", f"{base}/metadata",
                                   headers=json_accept).json()) == study.visible

    # Key images: the "Of Interest" KOS names a1 (rejected) and b0; the manifest names every
    # image but is no key-image selection; the rejection note is no key-image selection.
    keys = _open_link(rig, key_images_only=True)
    assert _sop_uids(keys.request("GET", f"{base}/instances",
                                  headers=json_accept).json()) == {uid(study.b0)}
    (found,) = keys.request("GET", f"/dicomweb/studies?StudyInstanceUID={study.uid}&includefield"
                                   "=NumberOfStudyRelatedInstances", headers=json_accept).json()
    assert _values(found, "00201208") == [1]
    a1 = f"{base}/series/{study.a1.SeriesInstanceUID}/instances/{uid(study.a1)}"
    assert keys.request("GET", f"{a1}/frames/1").status == 404


def test_key_images_by_title_not_every_kos(tmp_path: Path, database_url: str) -> None:
    """Without any rejection: a manifest names every image, yet the key images are the two
    the "Of Interest" document names."""
    from gateway.keyimages import key_images

    settings = make_settings(tmp_path, database_url)
    with Gateway(settings) as gateway:
        study = Study(seed=22)
        for ds in study.before_note:
            gateway.ingestor.ingest(part10(ds), source="test")
        with gateway.index.Session() as session:
            found = {k.sop_instance_uid for k in key_images(session, study.uid)}
        assert found == {uid(study.a1), uid(study.b0)}


def test_a_rejected_instance_sent_again_is_refused(rig: dict[str, Any]) -> None:
    study: Study = rig["study"]
    live: LiveServer = rig["live"]
    # The note itself is a duplicate (IOCM senders re-send notes); the rejected are refused.
    assert c_store(live.dimse_port, [study.note, study.a1, study.a2]) == [
        0, SUBSEQUENT_OCCURRENCE_OF_REJECTED, SUBSEQUENT_OCCURRENCE_OF_REJECTED]
    request = urllib.request.Request(
        f"{live.http_url}/dicomweb/studies", method="POST",
        data=multipart_body([("application/dicom", part10(study.a2))]),
        headers={"Content-Type": 'multipart/related; type="application/dicom"; '
                                 "boundary=XyZzYboundary",
                 "Accept": "application/dicom+json",
                 "Authorization": f"Bearer {rig['admin'].bearer}"})
    try:
        urllib.request.urlopen(request, timeout=30)
        raise AssertionError("a rejected instance was stored over STOW-RS")
    except urllib.error.HTTPError as exc:
        assert exc.code == 409
        body = json.loads(exc.read())
    (failed,) = body["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [SUBSEQUENT_OCCURRENCE_OF_REJECTED]
    assert "rejected" in failed["00741048"]["Value"][0]["00000902"]["Value"][0]
    # Still hidden, and the trail holds the rejection.
    assert rig["reader"].request(
        "GET", f"/dicomweb/studies/{study.uid}/series/{study.a2.SeriesInstanceUID}/instances/"
               f"{uid(study.a2)}/metadata").status == 404
    trail = events_for_patient(rig["gateway"].index, PATIENT)
    rejections = [e for e in trail if e.action == "reject"]
    assert len(rejections) == 1
    assert set(json.loads(rejections[0].instance_uids or "[]")) == {uid(study.a1), uid(study.a2)}


def test_retention_expired_deletes_the_files(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url)
    with Gateway(settings) as gateway:
        study = Study(seed=23, note_title=RETENTION)
        for ds in study.before_note:
            gateway.ingestor.ingest(part10(ds), source="test")
        def stored(ds: Dataset) -> list[str]:
            return [p for p in stored_relpaths(gateway)
                    if p.rsplit("/", 1)[-1].startswith(f"{uid(ds)}.")]

        assert stored(study.a1) and stored(study.a2)
        gateway.ingestor.ingest(part10(study.note), source="test")
        gateway.storage.sync()
        assert not stored(study.a1) and not stored(study.a2)
        assert stored(study.a0) and stored(study.note)  # the note is kept, for the record
        assert gateway.index.counts()["instances"] == 5


def test_a_note_naming_instances_not_yet_stored_refuses_them_later(tmp_path: Path,
                                                                   database_url: str) -> None:
    from gateway.errors import InstanceRejected

    settings = make_settings(tmp_path, database_url)
    with Gateway(settings) as gateway:
        study = Study(seed=24)
        gateway.ingestor.ingest(part10(study.a0), source="test")
        gateway.ingestor.ingest(part10(study.note), source="test")
        with pytest.raises(InstanceRejected, match="rejected by IOCM note"):
            gateway.ingestor.ingest(part10(study.a1), source="test")
        gateway.ingestor.ingest(part10(study.b0), source="test")
        assert gateway.index.counts()["instances"] == 2


def test_a_note_cannot_reject_another_patients_instances(tmp_path: Path,
                                                         database_url: str) -> None:
    from gateway.errors import IdentityConflict

    settings = make_settings(tmp_path, database_url)
    with Gateway(settings) as gateway:
        study = Study(seed=25)
        for ds in study.images:
            gateway.ingestor.ingest(part10(ds), source="test")
        study.note.PatientID = "SOMEONE-ELSE"
        study.note.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.999"
        with pytest.raises(IdentityConflict, match="another patient's instance"):
            gateway.ingestor.ingest(part10(study.note), source="test")
        assert gateway.index.counts()["instances"] == 5
