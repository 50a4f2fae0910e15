"""STOW-RS over real HTTP (PS3.18 §10.5): response dataset, statuses, same ingest rules."""

from __future__ import annotations

import json

import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset
from pydicom.uid import CTImageStorage
from requests.exceptions import HTTPError

from gateway.audit import Action
from gateway.core import Gateway
from gateway.models import Instance
from tests.support.common import LiveServer, ct_dataset, make_settings, part10
from tests.support.dicomweb_helpers import api_key, client, multipart_body, raw

STUDY = "1.2.826.0.1.3680043.8.498.55"
SERIES = f"{STUDY}.1"
MULTIPART_DICOM = 'multipart/related; type="application/dicom"; boundary=XyZzYboundary'


@pytest.fixture
def writer(live: LiveServer) -> DICOMwebClient:
    return client(live.http_url, api_key(live.gateway, "writer", "dicomweb:read,dicomweb:write"))


def post(live: LiveServer, token: str, body: bytes, path: str = "/studies",
         content_type: str = MULTIPART_DICOM, **headers: str):  # noqa: ANN201
    return raw(live.http_url + "/dicomweb" + path, method="POST", body=body,
               headers={"Authorization": f"Bearer {token}", "Content-Type": content_type,
                        **headers})


def count(live: LiveServer) -> int:
    with live.gateway.index.Session() as session:
        return session.query(Instance).count()


def test_store_with_dicomweb_client(live: LiveServer, writer: DICOMwebClient) -> None:
    datasets = [ct_dataset(i, study=STUDY, series=SERIES) for i in range(3)]
    response = writer.store_instances(datasets)
    assert len(response.ReferencedSOPSequence) == 3
    assert "FailedSOPSequence" not in response
    item = response.ReferencedSOPSequence[0]
    assert item.ReferencedSOPClassUID == CTImageStorage
    assert item.ReferencedSOPInstanceUID == datasets[0].SOPInstanceUID
    assert item.RetrieveURL.endswith(
        f"/dicomweb/studies/{STUDY}/series/{SERIES}/instances/{datasets[0].SOPInstanceUID}")
    assert response.RetrieveURL.endswith(f"/dicomweb/studies/{STUDY}")
    # Stored, indexed and retrievable.
    assert count(live) == 3
    back = writer.retrieve_instance(STUDY, SERIES, datasets[2].SOPInstanceUID)
    assert back.PixelData == datasets[2].PixelData
    # An identical re-send succeeds without change (same rule as C-STORE).
    again = writer.store_instances(datasets[:1], study_instance_uid=STUDY)
    assert len(again.ReferencedSOPSequence) == 1 and count(live) == 3


def test_good_and_bad_parts_answer_202_with_failure_reasons(live: LiveServer) -> None:
    token = api_key(live.gateway, "writer", "dicomweb:write")
    good = ct_dataset(0, study=STUDY, series=SERIES)
    truncated = part10(ct_dataset(1, study=STUDY, series=SERIES))[:-300]
    body = multipart_body([("application/dicom", part10(good)),
                           ("application/dicom", b"this is not DICOM"),
                           ("application/dicom", truncated)])
    reply = post(live, token, body)
    assert reply.status == 202
    assert reply.headers["Content-Type"] == "application/dicom+json"
    ds = Dataset.from_json(json.loads(reply.body))
    assert [i.ReferencedSOPInstanceUID for i in ds.ReferencedSOPSequence] == [good.SOPInstanceUID]
    failures = [(i.get("ReferencedSOPInstanceUID", ""), i.FailureReason)
                for i in ds.FailedSOPSequence]
    assert failures == [("", 0xC000), (f"{SERIES}.2", 0xC000)]
    assert count(live) == 1


def test_nothing_stored_is_409_and_reasons_are_specific(live: LiveServer) -> None:
    token = api_key(live.gateway, "writer", "dicomweb:write")
    original = ct_dataset(0, study=STUDY, series=SERIES)
    live.gateway.ingestor.ingest(part10(original))
    different = ct_dataset(0, study=STUDY, series=SERIES)
    different.PatientID = "SOMEONE-ELSE"
    other_study = ct_dataset(0, study=f"{STUDY}.9")
    body = multipart_body([("application/dicom", part10(different)),
                           ("application/dicom", part10(other_study))])
    reply = post(live, token, body, path=f"/studies/{STUDY}")
    assert reply.status == 409
    ds = Dataset.from_json(json.loads(reply.body))
    assert "ReferencedSOPSequence" not in ds
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in ds.FailedSOPSequence] == [
        (original.SOPInstanceUID, 0x0111),      # a different instance under a stored UID
        (other_study.SOPInstanceUID, 0xA900),   # not in the study named by the URL
    ]
    # The original is kept.
    row = live.gateway.index.find_instance(original.SOPInstanceUID)
    assert row is not None and "PAT-001" in row.metadata_json


def test_out_of_resources_is_a700(tmp_path, database_url) -> None:  # noqa: ANN001
    settings = make_settings(tmp_path, database_url,
                             GATEWAY_STORAGE_MIN_FREE_BYTES=str(1 << 62))
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        token = api_key(gateway, "writer", "dicomweb:write")
        reply = post(live, token, multipart_body([("application/dicom", part10(ct_dataset(0)))]))
        assert reply.status == 409
        ds = Dataset.from_json(json.loads(reply.body))
        assert ds.FailedSOPSequence[0].FailureReason == 0xA700


def test_wrong_media_types_are_415(live: LiveServer) -> None:
    token = api_key(live.gateway, "writer", "dicomweb:write")
    data = part10(ct_dataset(0))
    reply = post(live, token, data, content_type="application/dicom")
    assert reply.status == 415
    assert reply.headers["Content-Type"] == "application/problem+json"
    reply = post(live, token, multipart_body([("application/dicom+json", b"[]")]),
                 content_type='multipart/related; type="application/dicom+json"; '
                              "boundary=XyZzYboundary")
    assert reply.status == 415
    # A part of another type inside a DICOM body is refused by itself.
    body = multipart_body([("application/dicom", data), ("image/jpeg", b"\xff\xd8")])
    reply = post(live, token, body)
    assert reply.status == 202
    ds = Dataset.from_json(json.loads(reply.body))
    assert ds.FailedSOPSequence[0].FailureReason == 0xC000
    assert count(live) == 1


def test_body_over_the_limit_is_413(tmp_path, database_url) -> None:  # noqa: ANN001
    settings = make_settings(tmp_path, database_url, GATEWAY_HTTP_MAX_UPLOAD_BYTES="100000")
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        token = api_key(gateway, "writer", "dicomweb:write")
        big = part10(ct_dataset(0, rows=256))  # 128 KiB of pixels
        reply = post(live, token, multipart_body([("application/dicom", big)]))
        assert reply.status == 413
        assert "max_upload_bytes" in json.loads(reply.body)["detail"]
        with gateway.index.Session() as session:
            assert session.query(Instance).count() == 0


def test_parts_stored_before_a_refused_rest_are_audited(gateway: Gateway) -> None:
    """A nested multipart after a good part: 415, but the stored part is in the trail."""
    from test_dicomweb_audit import ListSink

    sink = ListSink()
    gateway.audit = sink  # every front end records through gateway.audit
    token = api_key(gateway, "writer", "dicomweb:write")
    nested = (b"--inner\r\nContent-Type: application/dicom\r\n\r\nx\r\n--inner--\r\n")
    body = (b"--XyZzYboundary\r\nContent-Type: application/dicom\r\n\r\n"
            + part10(ct_dataset(0, study=STUDY, series=SERIES)) + b"\r\n"
            + b'--XyZzYboundary\r\nContent-Type: multipart/mixed; boundary="inner"\r\n\r\n'
            + nested + b"\r\n--XyZzYboundary--\r\n")
    with LiveServer(gateway) as live:
        reply = post(live, token, body)
        assert reply.status == 415
        assert count(live) == 1  # kept: the first part was complete and acknowledged to the index
    stored = [e for e in sink.events if e.action is Action.STORE]
    assert [e.study_uids for e in stored] == [(STUDY,)]
    assert stored[0].stored is not None and stored[0].stored.counts == {STUDY: 1}


def test_store_needs_the_write_scope(live: LiveServer) -> None:
    reader = client(live.http_url, api_key(live.gateway, "reader", "dicomweb:read"))
    with pytest.raises(HTTPError, match="403"):
        reader.store_instances([ct_dataset(0)])
    reply = raw(live.http_url + "/dicomweb/studies", method="POST",
                body=multipart_body([("application/dicom", part10(ct_dataset(0)))]),
                headers={"Content-Type": MULTIPART_DICOM})
    assert reply.status == 401
    assert count(live) == 0


def test_xml_response_when_asked(live: LiveServer) -> None:
    token = api_key(live.gateway, "writer", "dicomweb:write")
    reply = post(live, token, multipart_body([("application/dicom", part10(ct_dataset(0)))]),
                 Accept="application/dicom+xml")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/dicom+xml"
    assert b'<DicomAttribute tag="00081199" vr="SQ" keyword="ReferencedSOPSequence">' in reply.body


def test_empty_body_is_400(live: LiveServer) -> None:
    token = api_key(live.gateway, "writer", "dicomweb:write")
    reply = post(live, token, b"--XyZzYboundary--\r\n")
    assert reply.status == 400


@pytest.mark.parametrize("head", [b"Content\x00Type: application/dicom",
                                  b"Content-Type: application/dicom\r\nno colon here",
                                  b"X-Long: " + b"a" * 70000])
def test_a_part_with_malformed_headers_is_400_naming_it(live: LiveServer, head: bytes) -> None:
    """A part's headers are HTTP headers (RFC 2046 §5.1.1); one aiohttp cannot parse is a
    malformed body, not a server error (found by fuzz/fuzz_stow.py)."""
    token = api_key(live.gateway, "writer", "dicomweb:write")
    body = (b"--XyZzYboundary\r\n" + head + b"\r\n\r\n" + part10(ct_dataset(0))
            + b"\r\n--XyZzYboundary--\r\n")
    reply = post(live, token, body)
    assert reply.status == 400
    assert reply.headers["Content-Type"] == "application/problem+json"
    assert json.loads(reply.body)["detail"].startswith("malformed multipart body")
    assert count(live) == 0
