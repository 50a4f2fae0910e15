"""QIDO-RS over real HTTP with the dicomweb-client package (PS3.18 §10.6, §8.3.4)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage

from gateway.access import DEMO_PRINCIPAL, Principal, PrincipalKind
from gateway.query import InvalidQueryParameter, Level, Query, QueryEngine, parse_qido
from tests.support.common import LiveServer
from tests.support.dicomweb_helpers import Corpus, api_key, client, load_corpus, raw
from tests.support.qr_helpers import load_sequence_studies


@dataclass
class Setup:
    live: LiveServer
    corpus: Corpus
    client: DICOMwebClient
    token: str


@pytest.fixture
def dw(live: LiveServer) -> Iterator[Setup]:
    corpus = load_corpus(live.gateway)
    token = api_key(live.gateway, "reader", "dicomweb:read")
    yield Setup(live, corpus, client(live.http_url, token), token)


def uids(results: list[dict], tag: str = "0020000D") -> set[str]:
    return {r[tag]["Value"][0] for r in results}


def value(result: dict, keyword: str) -> object:
    ds = Dataset.from_json(result)
    return ds.get(keyword)


# -- study level: each matching kind ---------------------------------------------------------
def test_single_value_matching(dw: Setup) -> None:
    c = dw.corpus
    assert uids(dw.client.search_for_studies(search_filters={"PatientID": "P-002"})) == {c.study_b}
    assert uids(dw.client.search_for_studies(search_filters={"AccessionNumber": "ACC-003"})) == {
        c.study_c}
    assert uids(dw.client.search_for_studies(search_filters={"StudyID": "1"})) == {c.study_a}
    # Values are case-sensitive except person names (PS3.4 C.2.2.2.1).
    assert dw.client.search_for_studies(search_filters={"PatientID": "p-002"}) == []
    # By tag as well as by keyword.
    assert uids(dw.client.search_for_studies(search_filters={"00100020": "P-003"})) == {c.study_c}


def test_uid_list_matching(dw: Setup) -> None:
    c = dw.corpus
    found = dw.client.search_for_studies(
        search_filters={"StudyInstanceUID": f"{c.study_a},{c.study_c}"})
    assert uids(found) == {c.study_a, c.study_c}
    # Backslash-separated, as in a C-FIND identifier, works too.
    found = dw.client.search_for_studies(
        search_filters={"StudyInstanceUID": f"{c.study_b}\\{c.study_c}"})
    assert uids(found) == {c.study_b, c.study_c}


def test_wildcard_matching(dw: Setup) -> None:
    c = dw.corpus
    assert uids(dw.client.search_for_studies(search_filters={"PatientID": "P-00*"})) == {
        c.study_b, c.study_c}
    assert uids(dw.client.search_for_studies(search_filters={"AccessionNumber": "ACC-0?3"})) == {
        c.study_c}
    assert len(dw.client.search_for_studies(search_filters={"AccessionNumber": "ACC-00?"})) == 3
    assert uids(dw.client.search_for_studies(search_filters={"StudyDescription": "*HEAD"})) == {
        c.study_a}
    # Person names: wildcard, case and accents ignored.
    assert uids(dw.client.search_for_studies(search_filters={"PatientName": "mull*"})) == {
        c.study_a}
    assert uids(dw.client.search_for_studies(search_filters={"PatientName": "D*"})) == {
        c.study_b, c.study_c}
    assert uids(dw.client.search_for_studies(search_filters={"PatientName": "do?^john"})) == {
        c.study_b}
    # A literal % or _ is not a wildcard.
    assert dw.client.search_for_studies(search_filters={"PatientID": "P_002"}) == []


def test_person_name_exact_ignores_case_and_accents(dw: Setup) -> None:
    found = dw.client.search_for_studies(search_filters={"PatientName": "MULLER^ZOE"})
    assert uids(found) == {dw.corpus.study_a}
    assert str(value(found[0], "PatientName")) == "Müller^Zoé"


def test_fuzzy_person_name_matching(dw: Setup) -> None:
    c = dw.corpus
    # Prefix of any name component (PS3.18 §8.3.4.2): given name, second given name.
    found = dw.client.search_for_studies(search_filters={"PatientName": "jea"},
                                         fuzzymatching=True)
    assert uids(found) == {c.study_c}
    found = dw.client.search_for_studies(search_filters={"PatientName": "luc"},
                                         fuzzymatching=True)
    assert uids(found) == {c.study_c}
    found = dw.client.search_for_studies(search_filters={"PatientName": "zoe"},
                                         fuzzymatching=True)
    assert uids(found) == {c.study_a}
    # Without fuzzy matching the same value is an exact match and finds nothing.
    assert dw.client.search_for_studies(search_filters={"PatientName": "jea"}) == []
    found = dw.client.search_for_studies(search_filters={"ReferringPhysicianName": "web"},
                                         fuzzymatching=True)
    assert uids(found) == {c.study_b}


def test_date_and_time_ranges(dw: Setup) -> None:
    c = dw.corpus
    search = dw.client.search_for_studies
    assert uids(search(search_filters={"StudyDate": "20250101-20251231"})) == {c.study_b}
    assert uids(search(search_filters={"StudyDate": "-20241231"})) == {c.study_c}
    assert uids(search(search_filters={"StudyDate": "20250101-"})) == {c.study_a, c.study_b}
    assert uids(search(search_filters={"StudyDate": "20240615"})) == {c.study_c}
    assert uids(search(search_filters={"StudyTime": "100000-150000"})) == {c.study_a, c.study_c}
    assert uids(search(search_filters={"StudyTime": "-0800"})) == {c.study_b}
    assert uids(search(search_filters={"PatientBirthDate": "19700101-19701231"})) == {c.study_b}


def test_combined_date_time_range_in_the_engine(live: LiveServer) -> None:
    corpus = load_corpus(live.gateway)
    engine = QueryEngine(live.gateway.index)
    # 2025-01-01 08:00 to 2026-01-05 10:00: study B in, study A (10:15 on the last day) out.
    query = Query(level=Level.STUDY, keys={"StudyDate": "20250101-20260105",
                                           "StudyTime": "0800-1000"}, combined_datetime=True)
    found = engine.search(query, DEMO_PRINCIPAL).matches
    assert uids(found) == {corpus.study_b}
    # Matched separately, the time range alone excludes study B's 08:00 is included: both out.
    separate = Query(level=Level.STUDY, keys={"StudyDate": "20250101-20260105",
                                              "StudyTime": "0900-1000"})
    assert engine.search(separate, DEMO_PRINCIPAL).matches == []


def test_modalities_in_study(dw: Setup) -> None:
    c = dw.corpus
    found = dw.client.search_for_studies(search_filters={"ModalitiesInStudy": "MR"})
    assert uids(found) == {c.study_a, c.study_b}
    found = dw.client.search_for_studies(search_filters={"ModalitiesInStudy": "CT"})
    assert uids(found) == {c.study_a, c.study_c}
    a = next(r for r in found if r["0020000D"]["Value"][0] == c.study_a)
    assert list(value(a, "ModalitiesInStudy")) == ["CT", "MR"]
    # Combined with a date range, as radiologists' worklists do.
    found = dw.client.search_for_studies(
        search_filters={"ModalitiesInStudy": "CT", "StudyDate": "20250101-"})
    assert uids(found) == {c.study_a}


def test_default_study_attributes(dw: Setup) -> None:
    c = dw.corpus
    found = dw.client.search_for_studies(search_filters={"StudyInstanceUID": c.study_a})
    ds = Dataset.from_json(found[0])
    # PS3.18 Table 10.6.3-3.
    assert ds.NumberOfStudyRelatedSeries == 2
    assert ds.NumberOfStudyRelatedInstances == 5
    assert ds.PatientID == "PAT-001"
    assert ds.StudyDate == "20260105"
    assert ds.AccessionNumber == "ACC-001"
    assert ds.InstanceAvailability == "ONLINE"
    # dicomweb-client sends "Host: 127.0.0.1" without the port, so only the path is checked here;
    # test_retrieve_url_follows_host_or_base_url checks the whole URL.
    assert ds.RetrieveURL.endswith(f"/dicomweb/studies/{c.study_a}")
    assert "StudyDescription" not in ds  # not a default attribute


def test_includefield(dw: Setup) -> None:
    c = dw.corpus
    found = dw.client.search_for_studies(search_filters={"PatientID": "P-002"},
                                         fields=["StudyDescription", "00100030"])
    ds = Dataset.from_json(found[0])
    assert ds.StudyDescription == "MR KNEE"
    assert ds.PatientBirthDate == "19700202"
    found = dw.client.search_for_studies(search_filters={"PatientID": "P-002"}, fields=["all"])
    assert Dataset.from_json(found[0]).StudyDescription == "MR KNEE"
    # Instance level: attributes beyond the indexed columns come from the stored metadata.
    found = dw.client.search_for_instances(c.study_a, c.series_a_ct,
                                           fields=["RescaleIntercept", "PhotometricInterpretation"])
    ds = Dataset.from_json(found[0])
    assert ds.RescaleIntercept == -1024
    assert ds.PhotometricInterpretation == "MONOCHROME2"


def test_paging(dw: Setup) -> None:
    first = dw.client.search_for_studies(limit=2)
    second = dw.client.search_for_studies(limit=2, offset=2)
    assert len(first) == 2 and len(second) == 1
    assert uids(first) | uids(second) == {dw.corpus.study_a, dw.corpus.study_b, dw.corpus.study_c}
    assert uids(first).isdisjoint(uids(second))
    # dicomweb-client pages through everything itself with get_remaining.
    everything = dw.client.search_for_instances(limit=4, get_remaining=True)
    assert len(everything) == 9
    assert dw.client.search_for_studies(offset=10) == []


# -- series and instance levels -------------------------------------------------------------
def test_series_level(dw: Setup) -> None:
    c = dw.corpus
    found = dw.client.search_for_series(c.study_a)
    assert [r["0020000E"]["Value"][0] for r in found] == [c.series_a_ct, c.series_a_mr]
    ds = Dataset.from_json(found[1])
    assert ds.Modality == "MR" and ds.SeriesNumber == 2 and ds.NumberOfSeriesRelatedInstances == 2
    assert ds.RetrieveURL.endswith(f"/studies/{c.study_a}/series/{c.series_a_mr}")
    assert uids(dw.client.search_for_series(search_filters={"Modality": "MR"}), "0020000E") == {
        c.series_a_mr, c.series_b_mr}
    assert uids(dw.client.search_for_series(c.study_a, search_filters={"SeriesNumber": "2"}),
                "0020000E") == {c.series_a_mr}
    assert uids(dw.client.search_for_series(search_filters={"Modality": "C?"}), "0020000E") == {
        c.series_a_ct, c.series_c_ct}
    # Series of all studies: study attributes match and are returned (PS3.18 §10.6.3.3).
    found = dw.client.search_for_series(search_filters={"PatientName": "doe*"})
    assert uids(found, "0020000E") == {c.series_b_mr}
    assert Dataset.from_json(found[0]).PatientID == "P-002"
    assert uids(dw.client.search_for_series(
        search_filters={"SeriesInstanceUID": f"{c.series_a_ct},{c.series_c_ct}"}),
        "0020000E") == {c.series_a_ct, c.series_c_ct}


def test_instance_level(dw: Setup) -> None:
    c = dw.corpus
    found = dw.client.search_for_instances(c.study_a, c.series_a_ct)
    assert [r["00080018"]["Value"][0] for r in found] == c.instances(c.series_a_ct)
    ds = Dataset.from_json(found[0])
    assert ds.Rows == 64 and ds.Columns == 64 and ds.BitsAllocated == 16
    assert ds.InstanceNumber == 1 and ds.SOPClassUID == CTImageStorage
    assert len(dw.client.search_for_instances(c.study_a)) == 5
    assert uids(dw.client.search_for_instances(search_filters={"SOPClassUID": MRImageStorage}),
                "0020000E") == {c.series_a_mr, c.series_b_mr}
    found = dw.client.search_for_instances(c.study_a, c.series_a_ct,
                                           search_filters={"InstanceNumber": "2"})
    assert [r["00080018"]["Value"][0] for r in found] == [c.instances(c.series_a_ct)[1]]
    sop = c.instances(c.series_c_ct)[0]
    found = dw.client.search_for_instances(search_filters={"SOPInstanceUID": sop})
    assert len(found) == 1
    # All instances: study and series attributes come along.
    assert Dataset.from_json(found[0]).PatientID == "P-003"
    assert Dataset.from_json(found[0]).Modality == "CT"


# -- raw HTTP: statuses and headers ---------------------------------------------------------
def test_empty_result_is_200_with_an_empty_array(dw: Setup) -> None:
    reply = raw(dw.live.http_url + "/dicomweb/studies?PatientID=nobody",
                headers={"Authorization": f"Bearer {dw.token}"})
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/dicom+json"
    assert json.loads(reply.body) == []


def test_warning_header_when_the_result_is_cut(dw: Setup) -> None:
    reply = raw(dw.live.http_url + "/dicomweb/instances?limit=3",
                headers={"Authorization": f"Bearer {dw.token}"})
    assert reply.status == 200
    assert len(json.loads(reply.body)) == 3
    assert reply.headers["Warning"].startswith("299 ")
    assert "Additional results can be requested" in reply.headers["Warning"]
    reply = raw(dw.live.http_url + "/dicomweb/instances?limit=9",
                headers={"Authorization": f"Bearer {dw.token}"})
    assert "Warning" not in reply.headers


def test_max_results_setting_cuts_and_warns(tmp_path, database_url) -> None:  # noqa: ANN001
    from gateway.core import Gateway
    from tests.support.common import make_settings

    settings = make_settings(tmp_path, database_url, GATEWAY_HTTP_MAX_RESULTS="2")
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        load_corpus(gateway)
        token = api_key(gateway, "reader", "dicomweb:read")
        reply = raw(live.http_url + "/dicomweb/studies?limit=100",
                    headers={"Authorization": f"Bearer {token}"})
        assert len(json.loads(reply.body)) == 2
        assert "exceeded the maximum" in reply.headers["Warning"]


@pytest.mark.parametrize(("query", "parameter"), [
    ("StudyDate=2026-01-01", "StudyDate"),
    ("StudyDate=20261301", "StudyDate"),
    ("StudyTime=2561", "StudyTime"),
    ("StudyDate=20260101-20250101", "StudyDate"),
    ("limit=-1", "limit"),
    ("offset=ten", "offset"),
    ("fuzzymatching=maybe", "fuzzymatching"),
    ("NotAKeyword=1", "NotAKeyword"),
    ("StudyInstanceUID=1.2.*", "StudyInstanceUID"),
    ("includefield=Bogus", "includefield=Bogus"),
    ("SOPInstanceUID=1.2.3", "SOPInstanceUID"),  # instance key in a study search
    ("PatientID=a&PatientID=b", "PatientID"),
])
def test_bad_parameters_are_400_naming_the_parameter(dw: Setup, query: str,
                                                     parameter: str) -> None:
    reply = raw(dw.live.http_url + "/dicomweb/studies?" + query,
                headers={"Authorization": f"Bearer {dw.token}"})
    assert reply.status == 400
    assert reply.headers["Content-Type"] == "application/problem+json"
    problem = json.loads(reply.body)
    assert problem["status"] == 400 and problem["parameter"] == parameter
    assert parameter.split("=")[0] in problem["detail"]


def test_bad_uid_in_path_is_400(dw: Setup) -> None:
    reply = raw(dw.live.http_url + "/dicomweb/studies/1.2.x/series",
                headers={"Authorization": f"Bearer {dw.token}"})
    assert reply.status == 400
    assert "StudyInstanceUID" in json.loads(reply.body)["detail"]


def test_unsupported_matching_key_is_ignored_with_a_warning(dw: Setup) -> None:
    reply = raw(dw.live.http_url + "/dicomweb/studies?InstitutionName=X",
                headers={"Authorization": f"Bearer {dw.token}"})
    assert reply.status == 200
    assert len(json.loads(reply.body)) == 3
    assert "InstitutionName" in reply.headers["Warning"]


def test_xml_response(dw: Setup) -> None:
    reply = raw(dw.live.http_url + "/dicomweb/studies?PatientID=P-002",
                headers={"Authorization": f"Bearer {dw.token}",
                         "Accept": 'multipart/related; type="application/dicom+xml"'})
    assert reply.status == 200
    content_type = reply.headers["Content-Type"]
    assert content_type.startswith('multipart/related; type="application/dicom+xml"')
    assert b'<DicomAttribute tag="00100020" vr="LO" keyword="PatientID"><Value number="1">P-002' \
        in reply.body
    assert b"<FamilyName>Doe</FamilyName><GivenName>John</GivenName>" in reply.body


def test_retrieve_url_follows_host_or_base_url(dw: Setup, tmp_path, database_url) -> None:  # noqa: ANN001
    from gateway.core import Gateway
    from tests.support.common import make_settings

    reply = raw(dw.live.http_url + "/dicomweb/studies?PatientID=P-002",
                headers={"Authorization": f"Bearer {dw.token}"})
    url = Dataset.from_json(json.loads(reply.body)[0]).RetrieveURL
    assert url == f"{dw.live.http_url}/dicomweb/studies/{dw.corpus.study_b}"
    settings = make_settings(tmp_path / "proxied", database_url,
                             GATEWAY_HTTP_BASE_URL="https://pacs.example.lu/")
    # Same index as the fixture's gateway (database_url), another process's view of it.
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        token = api_key(gateway, "proxied-reader", "dicomweb:read")
        reply = raw(live.http_url + "/dicomweb/studies?PatientID=P-002",
                    headers={"Authorization": f"Bearer {token}"})
        url = Dataset.from_json(json.loads(reply.body)[0]).RetrieveURL
        assert url == f"https://pacs.example.lu/dicomweb/studies/{dw.corpus.study_b}"


def test_unacceptable_media_type_is_406(dw: Setup) -> None:
    reply = raw(dw.live.http_url + "/dicomweb/studies",
                headers={"Authorization": f"Bearer {dw.token}", "Accept": "image/png"})
    assert reply.status == 406
    assert reply.headers["Content-Type"] == "application/problem+json"


# -- the engine as C-FIND will call it ------------------------------------------------------
def test_identifier_query_returns_only_the_requested_keys(live: LiveServer) -> None:
    corpus = load_corpus(live.gateway)
    engine = QueryEngine(live.gateway.index, max_results=0)
    query = Query.from_identifier("STUDY", {"QueryRetrieveLevel": "STUDY", "PatientName": "DOE*",
                                            "StudyInstanceUID": "", "StudyDate": ""})
    found = engine.search(query, DEMO_PRINCIPAL).matches
    assert found == [{
        "00080020": {"vr": "DA", "Value": ["20250101"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]},
        "0020000D": {"vr": "UI", "Value": [corpus.study_b]},
    }]
    series = engine.search(Query.from_identifier(
        "SERIES", {"StudyInstanceUID": corpus.study_a, "SeriesInstanceUID": "", "Modality": "",
                   "NumberOfSeriesRelatedInstances": ""}), DEMO_PRINCIPAL).matches
    assert [(s["00080060"]["Value"][0], s["00201209"]["Value"][0]) for s in series] == [
        ("CT", 3), ("MR", 2)]
    with pytest.raises(InvalidQueryParameter, match="SOPInstanceUID"):
        engine.search(Query.from_identifier("SERIES", {"SOPInstanceUID": "1.2"}), DEMO_PRINCIPAL)


def test_restricted_principal_is_filtered_in_sql(live: LiveServer) -> None:
    corpus = load_corpus(live.gateway)
    engine = QueryEngine(live.gateway.index)
    viewer = Principal(kind=PrincipalKind.VIEWER_SESSION, id="v1",
                       scopes=frozenset({"dicomweb:read"}),
                       study_uids=frozenset({corpus.study_a}),
                       instance_uids=frozenset(corpus.instances(corpus.series_a_ct)[:1]))
    studies = engine.search(parse_qido(Level.STUDY, []), viewer).matches
    assert uids(studies) == {corpus.study_a}
    ds = Dataset.from_json(studies[0])
    assert ds.NumberOfStudyRelatedInstances == 1 and ds.NumberOfStudyRelatedSeries == 1
    series = engine.search(parse_qido(Level.SERIES, []), viewer).matches
    assert uids(series, "0020000E") == {corpus.series_a_ct}
    instances = engine.search(parse_qido(Level.IMAGE, []), viewer).matches
    assert uids(instances, "00080018") == set(corpus.instances(corpus.series_a_ct)[:1])
    nobody = Principal(kind=PrincipalKind.VIEWER_SESSION, id="v2", study_uids=frozenset())
    assert engine.search(parse_qido(Level.STUDY, []), nobody).matches == []


# -- sequence matching (PS3.4 C.2.2.2.6, PS3.18 Table 10.6.3-4) --------------------------------
def test_sequence_item_keys(live: LiveServer) -> None:
    load_sequence_studies(live.gateway)
    token = api_key(live.gateway, "reader", "dicomweb:read")

    def get(query: str) -> tuple[int, list[dict]]:
        reply = raw(live.http_url + "/dicomweb/" + query,
                    headers={"Authorization": f"Bearer {token}"})
        return reply.status, json.loads(reply.body) if reply.body else []

    status, found = get("series?00400275.00400009=SPS2")
    assert status == 200
    assert [value(r, "Modality") for r in found] == ["MR"]
    # The stored sequence is returned whole (a default series attribute, Table 10.6.3-4).
    assert [i.RequestedProcedureID for i in value(found[0], "RequestAttributesSequence")] \
        == ["RP2"]
    status, found = get("series?RequestAttributesSequence.RequestedProcedureID=RP1*")
    assert sorted(value(r, "Modality") for r in found) == ["CT"]
    assert [i.RequestedProcedureID for i in value(found[0], "RequestAttributesSequence")] \
        == ["RP1", "RP1B"]
    status, found = get("series?00400275.00400009=SPS*&00400275.00401001=RP1B")
    assert [value(r, "Modality") for r in found] == ["CT"]
    status, found = get("studies?00081032.00080100=MRKNEE&includefield=AccessionNumber")
    assert [value(r, "AccessionNumber") for r in found] == ["SEQ2"]
    # Paging comes after the sequence filter: 2 matching series, one per page.
    first = get("series?00400275.00400009=SPS*&limit=1")[1]
    second = get("series?00400275.00400009=SPS*&limit=1&offset=1")[1]
    third = get("series?00400275.00400009=SPS*&limit=1&offset=2")[1]
    assert len(first) == len(second) == 1 and third == []
    assert {value(first[0], "Modality"), value(second[0], "Modality")} == {"CT", "MR"}


@pytest.mark.parametrize(("query", "parameter"), [
    ("00400275.00400009.00080100=X", "00400275.00400009.00080100"),
    ("PatientName.CodeValue=X", "PatientName.CodeValue"),
    ("RequestAttributesSequence.Bogus=X", "RequestAttributesSequence.Bogus"),
    ("00400275.00400009=A&00400275.00400009=B", "00400275.00400009"),
])
def test_bad_sequence_keys_are_400(dw: Setup, query: str, parameter: str) -> None:
    reply = raw(dw.live.http_url + "/dicomweb/series?" + query,
                headers={"Authorization": f"Bearer {dw.token}"})
    assert reply.status == 400
    assert json.loads(reply.body)["parameter"] == parameter


def test_series_sequence_key_in_a_study_search_is_400(dw: Setup) -> None:
    reply = raw(dw.live.http_url + "/dicomweb/studies?00400275.00400009=SPS1",
                headers={"Authorization": f"Bearer {dw.token}"})
    assert reply.status == 400
    assert json.loads(reply.body)["parameter"] == "RequestAttributesSequence"
