"""WADO-RS over real HTTP: retrieve, metadata and bulk data (PS3.18 §10.4)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless

from gateway.access import Principal, PrincipalKind
from tests.support.common import LiveServer, ct_dataset, part10
from tests.support.dicomweb_helpers import (
    Corpus,
    StaticSessions,
    api_key,
    client,
    load_corpus,
    parse_multipart,
    raw,
    serve,
)


@dataclass
class Setup:
    live: LiveServer
    corpus: Corpus
    client: DICOMwebClient
    token: str

    def get(self, path: str, **headers: str):  # noqa: ANN201
        return raw(self.live.http_url + "/dicomweb" + path,
                   headers={"Authorization": f"Bearer {self.token}", **headers})


@pytest.fixture
def dw(live: LiveServer) -> Iterator[Setup]:
    corpus = load_corpus(live.gateway)
    token = api_key(live.gateway, "reader", "dicomweb:read")
    yield Setup(live, corpus, client(live.http_url, token), token)


def stored_bytes(live: LiveServer, sop: str) -> bytes:
    row = live.gateway.index.find_instance(sop)
    assert row is not None
    return live.gateway.storage.path(row.file_path).read_bytes()


# -- retrieve with dicomweb-client ----------------------------------------------------------
def test_retrieve_study_series_instance(dw: Setup) -> None:
    c = dw.corpus
    study = dw.client.retrieve_study(c.study_a)
    assert sorted(ds.SOPInstanceUID for ds in study) == sorted(
        c.instances(c.series_a_ct) + c.instances(c.series_a_mr))
    series = dw.client.retrieve_series(c.study_a, c.series_a_mr)
    assert [ds.SOPInstanceUID for ds in series] == c.instances(c.series_a_mr)
    sop = c.instances(c.series_a_ct)[1]
    instance = dw.client.retrieve_instance(c.study_a, c.series_a_ct, sop)
    assert instance.SOPInstanceUID == sop
    assert instance.PatientName == "Müller^Zoé"
    expected = ct_dataset(1, study=c.study_a, series=c.series_a_ct).pixel_array
    assert np.array_equal(instance.pixel_array, expected)


def test_retrieve_is_the_stored_file_when_it_is_explicit_little_endian(dw: Setup) -> None:
    c = dw.corpus
    sop = c.instances(c.series_a_ct)[0]
    reply = dw.get(f"/studies/{c.study_a}/series/{c.series_a_ct}/instances/{sop}",
                   Accept='multipart/related; type="application/dicom"')
    assert reply.status == 200
    parts = parse_multipart(reply.body, reply.headers["Content-Type"])
    assert len(parts) == 1
    headers, body = parts[0]
    assert headers["content-type"] == f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}"
    assert headers["content-location"].endswith(f"/instances/{sop}")
    assert body == stored_bytes(dw.live, sop)
    assert int(reply.headers["Content-Length"]) == len(reply.body)


def test_default_transfer_syntax_transcodes_implicit_to_explicit(dw: Setup) -> None:
    c = dw.corpus
    sop = c.instances(c.series_c_ct)[0]
    stored = stored_bytes(dw.live, sop)
    assert dcmread(io.BytesIO(stored)).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    # No transfer-syntax parameter: Explicit VR Little Endian (PS3.18 §8.7.3.5.2).
    reply = dw.get(f"/studies/{c.study_c}/series/{c.series_c_ct}",
                   Accept='multipart/related; type="application/dicom"')
    parts = parse_multipart(reply.body, reply.headers["Content-Type"])
    assert [h["content-type"] for h, _ in parts] == [
        f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}"] * 2
    ds = dcmread(io.BytesIO(parts[0][1]))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPInstanceUID == sop  # not a new instance
    assert np.array_equal(ds.pixel_array, dcmread(io.BytesIO(stored)).pixel_array)
    # transfer-syntax=* sends the file as stored.
    reply = dw.get(f"/studies/{c.study_c}/series/{c.series_c_ct}/instances/{sop}",
                   Accept='multipart/related; type="application/dicom"; transfer-syntax=*')
    (headers, body), = parse_multipart(reply.body, reply.headers["Content-Type"])
    assert headers["content-type"] == f"application/dicom; transfer-syntax={ImplicitVRLittleEndian}"
    assert body == stored


def test_compressed_instance_is_decompressed_on_request(live: LiveServer) -> None:
    pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg is a dependency of the gateway")
    ds = ct_dataset(0, study="1.2.826.0.1.3680043.8.498.90", rows=32)
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    live.gateway.ingestor.ingest(part10(ds))
    token = api_key(live.gateway, "reader", "dicomweb:read")
    url = (f"{live.http_url}/dicomweb/studies/{ds.StudyInstanceUID}/series/"
           f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
    reply = raw(url, headers={"Authorization": f"Bearer {token}",
                              "Accept": 'multipart/related; type="application/dicom"; '
                                        f"transfer-syntax={ExplicitVRLittleEndian}"})
    (headers, body), = parse_multipart(reply.body, reply.headers["Content-Type"])
    out = dcmread(io.BytesIO(body))
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(out.pixel_array, ct_dataset(0, rows=32).pixel_array)
    reply = raw(url, headers={"Authorization": f"Bearer {token}",
                              "Accept": 'multipart/related; type="application/dicom"; '
                                        "transfer-syntax=*"})
    (headers, _), = parse_multipart(reply.body, reply.headers["Content-Type"])
    assert headers["content-type"] == f"application/dicom; transfer-syntax={JPEG2000Lossless}"


def test_unproducible_transfer_syntax_is_406(dw: Setup) -> None:
    c = dw.corpus
    reply = dw.get(f"/studies/{c.study_a}",
                   Accept='multipart/related; type="application/dicom"; '
                          "transfer-syntax=1.2.840.10008.1.2.4.50")
    assert reply.status == 406
    assert reply.headers["Content-Type"] == "application/problem+json"
    assert "transfer-syntax=*" in json.loads(reply.body)["detail"]
    assert dw.get(f"/studies/{c.study_a}", Accept="application/zip").status == 406
    # A later acceptable choice in the same Accept header is used.
    reply = dw.get(f"/studies/{c.study_a}",
                   Accept='multipart/related; type="application/dicom"; '
                          "transfer-syntax=1.2.840.10008.1.2.4.50, "
                          'multipart/related; type="application/dicom"; transfer-syntax=*;q=0.5')
    assert reply.status == 200


def test_single_part_instance(dw: Setup) -> None:
    c = dw.corpus
    sop = c.instances(c.series_a_ct)[0]
    reply = dw.get(f"/studies/{c.study_a}/series/{c.series_a_ct}/instances/{sop}",
                   Accept="application/dicom")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/dicom")
    assert reply.body == stored_bytes(dw.live, sop)


def test_multipart_framing_of_a_study(dw: Setup) -> None:
    c = dw.corpus
    reply = dw.get(f"/studies/{c.study_a}", Accept="*/*")
    content_type = reply.headers["Content-Type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    parts = parse_multipart(reply.body, content_type)
    # Display order: series by number, instances by number.
    assert [h["content-location"].rsplit("/", 1)[1] for h, _ in parts] == (
        c.instances(c.series_a_ct) + c.instances(c.series_a_mr))
    for headers, body in parts:
        sop = headers["content-location"].rsplit("/", 1)[1]
        assert body == stored_bytes(dw.live, sop)
    assert int(reply.headers["Content-Length"]) == len(reply.body)


def test_unknown_and_malformed_uids(dw: Setup) -> None:
    c = dw.corpus
    reply = dw.get("/studies/1.2.3.4.5.6")
    assert reply.status == 404
    assert reply.headers["Content-Type"] == "application/problem+json"
    assert dw.get(f"/studies/{c.study_a}/series/1.2.3").status == 404
    assert dw.get(f"/studies/{c.study_b}/series/{c.series_a_ct}").status == 404  # wrong parent
    reply = dw.get("/studies/1.2.abc")
    assert reply.status == 400
    assert "StudyInstanceUID" in json.loads(reply.body)["detail"]
    assert dw.get(f"/studies/{c.study_a}/series/{c.series_a_ct}/instances/..%2F..").status in (
        400, 404)
    assert dw.get(f"/studies/{c.study_a}/series/x/metadata").status == 400


# -- metadata -------------------------------------------------------------------------------
def test_metadata_at_every_level(dw: Setup) -> None:
    c = dw.corpus
    study = dw.client.retrieve_study_metadata(c.study_a)
    assert len(study) == 5
    series = dw.client.retrieve_series_metadata(c.study_a, c.series_a_ct)
    assert [m["00080018"]["Value"][0] for m in series] == c.instances(c.series_a_ct)
    sop = c.instances(c.series_a_ct)[0]
    instance = dw.client.retrieve_instance_metadata(c.study_a, c.series_a_ct, sop)
    ds = Dataset.from_json(instance)
    assert ds.PatientName == "Müller^Zoé" and ds.Rows == 64
    # Pixel data is never inline: a BulkDataURI, absolute, that works.
    uri = instance["7FE00010"]["BulkDataURI"]
    assert uri.startswith("http://127.0.0.1") and uri.endswith(f"/instances/{sop}/bulk/7FE00010")


def test_metadata_bulk_data_uri_is_absolute_against_the_request(dw: Setup) -> None:
    c = dw.corpus
    reply = dw.get(f"/studies/{c.study_b}/metadata")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/dicom+json"
    metadata = json.loads(reply.body)
    assert len(metadata) == 2
    assert metadata[0]["7FE00010"]["BulkDataURI"].startswith(
        f"{dw.live.http_url}/dicomweb/studies/{c.study_b}/series/{c.series_b_mr}/instances/")


def test_metadata_etag_and_if_none_match(dw: Setup) -> None:
    c = dw.corpus
    path = f"/studies/{c.study_a}/series/{c.series_a_ct}/metadata"
    first = dw.get(path)
    etag = first.headers["ETag"]
    assert etag.startswith('"') and first.status == 200
    again = dw.get(path, **{"If-None-Match": etag})
    assert again.status == 304 and again.body == b""
    assert again.headers["ETag"] == etag
    assert dw.get(path, **{"If-None-Match": '"other"'}).status == 200
    # A new instance in the series changes the ETag.
    dw.live.gateway.ingestor.ingest(part10(ct_dataset(7, study=c.study_a, series=c.series_a_ct)))
    changed = dw.get(path, **{"If-None-Match": etag})
    assert changed.status == 200 and changed.headers["ETag"] != etag
    assert len(json.loads(changed.body)) == 4


# -- bulk data ------------------------------------------------------------------------------
def test_bulkdata_behind_the_bulk_data_uri(dw: Setup) -> None:
    c = dw.corpus
    sop = c.instances(c.series_a_ct)[2]
    instance = dw.client.retrieve_instance_metadata(c.study_a, c.series_a_ct, sop)
    uri = instance["7FE00010"]["BulkDataURI"]
    # dicomweb-client sends "Host: 127.0.0.1" (no port) on non-streamed GETs, so the URI is
    # rebuilt on the server's real address.
    path = uri[uri.index("/dicomweb/"):]
    data = dw.client.retrieve_bulkdata(dw.live.http_url + path)
    stored = dcmread(io.BytesIO(stored_bytes(dw.live, sop)))
    assert data == [stored.PixelData]
    reply = dw.get(path[len("/dicomweb"):], Accept="application/octet-stream")
    assert reply.status == 200 and reply.body == stored.PixelData
    assert dw.get(path[len("/dicomweb"):].replace("7FE00010", "00091234")).status == 404
    assert dw.get(path[len("/dicomweb"):].replace("7FE00010", "ZZ")).status == 400


# -- access ---------------------------------------------------------------------------------
def test_restricted_session_sees_only_its_study_and_instances(live: LiveServer) -> None:
    gateway = live.gateway
    c = load_corpus(gateway)
    key_image = c.instances(c.series_a_ct)[1]
    sessions = StaticSessions({
        "study-a": Principal(kind=PrincipalKind.VIEWER_SESSION, id="viewer-1",
                             scopes=frozenset({"dicomweb:read"}),
                             study_uids=frozenset({c.study_a})),
        "key-images": Principal(kind=PrincipalKind.VIEWER_SESSION, id="viewer-2",
                                scopes=frozenset({"dicomweb:read"}),
                                study_uids=frozenset({c.study_a}),
                                instance_uids=frozenset({key_image})),
    })
    with serve(gateway, sessions) as url:
        def get(path: str, session: str) -> object:
            return raw(url + "/dicomweb" + path, headers={"Cookie": f"gw_session={session}"})

        studies = json.loads(get("/studies", "study-a").body)
        assert [s["0020000D"]["Value"][0] for s in studies] == [c.study_a]
        assert get(f"/studies/{c.study_a}/metadata", "study-a").status == 200
        # Another study: 404 exactly like an unknown one (its existence does not leak).
        other = get(f"/studies/{c.study_b}", "study-a")
        unknown = get("/studies/1.2.3.999", "study-a")
        assert other.status == unknown.status == 404
        assert get(f"/studies/{c.study_b}/metadata", "study-a").status == 404
        # Key images only.
        metadata = json.loads(get(f"/studies/{c.study_a}/metadata", "key-images").body)
        assert [m["00080018"]["Value"][0] for m in metadata] == [key_image]
        reply = get(f"/studies/{c.study_a}", "key-images")
        parts = parse_multipart(reply.body, reply.headers["Content-Type"])
        assert [h["content-location"].rsplit("/", 1)[1] for h, _ in parts] == [key_image]
        other_image = c.instances(c.series_a_ct)[0]
        assert get(f"/studies/{c.study_a}/series/{c.series_a_ct}/instances/{other_image}",
                   "key-images").status == 404
        # An unknown or expired session is 401, never the demo user.
        assert get("/studies", "expired").status == 401
        assert ("expired", "127.0.0.1") in sessions.calls



def test_head_sends_headers_only(dw: Setup) -> None:
    import http.client

    c = dw.corpus
    host, port = dw.live.http_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    auth = {"Authorization": f"Bearer {dw.token}"}
    connection.request("HEAD", f"/dicomweb/studies/{c.study_a}", headers=auth)
    response = connection.getresponse()
    assert response.status == 200 and response.read() == b""
    length = int(response.headers["Content-Length"])
    # The same connection still works: no body bytes were sent after the HEAD answer.
    connection.request("GET", f"/dicomweb/studies/{c.study_a}", headers=auth)
    response = connection.getresponse()
    assert response.status == 200 and len(response.read()) == length
    connection.close()


def test_retrieval_streams_with_flat_memory(live: LiveServer) -> None:
    """64 MB retrieved while Python's allocations stay far below the body size.

    Server and client share this process: tracemalloc's peak would reach the body size if the
    server assembled the response (or the client kept it). bench/wado_memory.py measures the
    server's resident memory on a 1 GB study in its own process.
    """
    import tracemalloc
    import urllib.request

    study, series = "1.2.826.0.1.3680043.8.498.64", "1.2.826.0.1.3680043.8.498.64.1"
    for i in range(128):  # 128 x 512 KiB
        live.gateway.ingestor.ingest(part10(ct_dataset(i, study=study, series=series, rows=512)))
    token = api_key(live.gateway, "reader", "dicomweb:read")
    request = urllib.request.Request(f"{live.http_url}/dicomweb/studies/{study}", headers={
        "Authorization": f"Bearer {token}",
        "Accept": 'multipart/related; type="application/dicom"'})
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        total = 0
        with urllib.request.urlopen(request, timeout=120) as response:
            while chunk := response.read(1024 * 1024):
                total += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total > 64 * 1024 * 1024
    assert peak < 16 * 1024 * 1024, f"peak Python allocations {peak / 2**20:.0f} MiB"
