"""FHIR R4 ImagingStudy over real HTTP: search by patient, read by id, OperationOutcome errors,
scopes, a viewer session limited to its study, and every resource held to the FHIR models of
``fhir.resources`` (its R4B package: FHIR 4.3.0, whose ImagingStudy, Bundle, Endpoint and
OperationOutcome are R4's unchanged; the package's pure-R4 releases, 6.4 and older, need
pydantic 1)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome

from gateway import audit
from tests.support.links_helpers import (
    Client,
    Reply,
    cookie_of,
    links_env,
    small_study,
)

MINE, THEIRS = "LU0000001", "LU0000002"
ISSUER = "1.2.250.1.71.4.2"  # an OID issuer: urn:oid:... as the FHIR system
FHIR_JSON = {"Accept": "application/fhir+json"}
STATUSES = {"registered", "available", "cancelled", "entered-in-error", "unknown"}  # R4


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> Iterator[dict[str, Any]]:
    mine = small_study(MINE, "ACC1")
    for ds in mine:
        ds.TimezoneOffsetFromUTC = "+0100"
        ds.StudyTime = "101530"
    theirs = small_study(THEIRS, "ACC2", seed=2)
    for ds in theirs:
        ds.IssuerOfPatientID = ISSUER
    sibling = small_study(MINE, "ACC3", study_date="20230101", seed=3)
    with links_env(tmp_path, database_url,
                   datasets={"mine": mine, "theirs": theirs, "sibling": sibling},
                   dsp_patients=(MINE, THEIRS)) as env:
        yield env


def fhir_json(reply: Reply, status: int = 200) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.text[:400])
    assert reply.headers["Content-Type"].startswith("application/fhir+json")
    body: dict[str, Any] = reply.json()
    return body


def valid_study(resource: dict[str, Any]) -> ImagingStudy:
    """The resource, held to the FHIR model (raises on any deviation) and R4's status codes."""
    model = ImagingStudy.model_validate(resource)
    assert resource["status"] in STATUSES
    return model


def valid_bundle(body: dict[str, Any]) -> list[dict[str, Any]]:
    Bundle.model_validate(body)
    assert body["type"] == "searchset"
    resources = [entry["resource"] for entry in body.get("entry", [])]
    for resource in resources:
        valid_study(resource)
    return resources


def outcome(reply: Reply, status: int) -> dict[str, Any]:
    body = fhir_json(reply, status)
    OperationOutcome.model_validate(body)
    assert body["resourceType"] == "OperationOutcome"
    return body


def uid(datasets: list[Any]) -> str:
    return str(datasets[0].StudyInstanceUID)


def test_search_by_patient(env: dict[str, Any]) -> None:
    body = fhir_json(env["reader"].request("GET", f"/fhir/ImagingStudy?patient={MINE}",
                                            headers=FHIR_JSON))
    resources = valid_bundle(body)
    assert body["total"] == 2
    assert [r["id"] for r in resources] == [uid(env["mine"]), uid(env["sibling"])]  # newest first
    study = resources[0]
    mine = env["mine"]
    assert study["identifier"][0] == {"system": "urn:dicom:uid",
                                      "value": f"urn:oid:{uid(mine)}"}
    assert {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                 "code": "ACSN"}]}, "value": "ACC1"} in study["identifier"]
    assert study["status"] == "available"
    assert study["subject"] == {"type": "Patient", "identifier": {"value": MINE}}
    assert study["started"] == "2024-03-15T10:15:30+01:00"
    assert resources[1]["started"] == "2023-01-01"  # no timezone offset: the date only
    images = [ds for ds in mine if ds.Modality != "KO"]
    assert study["numberOfInstances"] == len(mine)
    assert study["numberOfSeries"] == len({ds.SeriesInstanceUID for ds in mine})
    assert {m["code"] for m in study["modality"]} == {ds.Modality for ds in mine}
    by_uid = {s["uid"]: s for s in study["series"]}
    for ds in images:
        series = by_uid[str(ds.SeriesInstanceUID)]
        assert series["modality"] == {"system": "http://dicom.nema.org/resources/ontology/DCM",
                                      "code": ds.Modality}
        instance = next(i for i in series["instance"] if i["uid"] == ds.SOPInstanceUID)
        assert instance["sopClass"]["code"] == f"urn:oid:{ds.SOPClassUID}"
        assert instance["number"] == ds.InstanceNumber
    endpoint = study["contained"][0]
    assert study["endpoint"] == [{"reference": f"#{endpoint['id']}"}]
    assert endpoint["address"] == env["server"].http_url + "/dicomweb"
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    assert body["entry"][0]["fullUrl"] == (env["server"].http_url
                                           + f"/fhir/ImagingStudy/{uid(mine)}")


def test_search_by_issuer_and_paging(env: dict[str, Any]) -> None:
    reader = env["reader"]
    resources = valid_bundle(fhir_json(reader.request(
        "GET", f"/fhir/ImagingStudy?patient=urn:oid:{ISSUER}|{THEIRS}", headers=FHIR_JSON)))
    assert [r["id"] for r in resources] == [uid(env["theirs"])]
    assert resources[0]["subject"]["identifier"] == {"system": f"urn:oid:{ISSUER}",
                                                     "value": THEIRS}
    assert valid_bundle(fhir_json(reader.request(
        "GET", f"/fhir/ImagingStudy?patient=urn:oid:9.9|{THEIRS}", headers=FHIR_JSON))) == []
    assert valid_bundle(fhir_json(reader.request(
        "GET", f"/fhir/ImagingStudy?patient=|{THEIRS}", headers=FHIR_JSON))) == []
    page = fhir_json(reader.request("GET", f"/fhir/ImagingStudy?patient={MINE}&_count=1"))
    assert [r["id"] for r in valid_bundle(page)] == [uid(env["mine"])]
    assert page["total"] == 2
    following = next(link["url"] for link in page["link"] if link["relation"] == "next")
    parts = urlsplit(following)
    page2 = fhir_json(reader.request("GET", f"{parts.path}?{parts.query}"))
    assert [r["id"] for r in valid_bundle(page2)] == [uid(env["sibling"])]
    assert not any(link["relation"] == "next" for link in page2["link"])


def test_read_by_id_and_errors(env: dict[str, Any]) -> None:
    reader = env["reader"]
    study = fhir_json(reader.request("GET", f"/fhir/ImagingStudy/{uid(env['theirs'])}",
                                     headers=FHIR_JSON))
    valid_study(study)
    assert study["id"] == uid(env["theirs"])
    missing = outcome(reader.request("GET", "/fhir/ImagingStudy/1.2.3.999",
                                     headers=FHIR_JSON), 404)
    assert missing["issue"][0]["code"] == "not-found"
    assert "1.2.3.999" in missing["issue"][0]["diagnostics"]
    assert outcome(reader.request("GET", "/fhir/ImagingStudy/not-a-uid"), 400)
    bad = outcome(reader.request("GET", f"/fhir/ImagingStudy?patinet={MINE}"), 400)
    assert "patinet" in bad["issue"][0]["diagnostics"]
    assert outcome(reader.request("GET", "/fhir/ImagingStudy?_count=x"), 400)
    assert outcome(reader.request("GET", "/fhir/ImagingStudy",
                                  headers={"Accept": "application/fhir+xml"}), 406)
    assert outcome(reader.request("GET", "/fhir/Patient/1"), 404)
    refused = reader.request("POST", "/fhir/ImagingStudy", body={"resourceType": "ImagingStudy"})
    assert outcome(refused, 405) and "GET" in refused.headers["Allow"]


def test_scope_enforced(env: dict[str, Any]) -> None:
    anonymous = Client(env["server"].http_url)
    for path in ("/fhir/ImagingStudy?patient=" + MINE, f"/fhir/ImagingStudy/{uid(env['mine'])}"):
        denied = anonymous.request("GET", path, headers=FHIR_JSON)
        assert outcome(denied, 401)["issue"][0]["code"] == "login"
        assert denied.headers["WWW-Authenticate"].startswith("Bearer")
        # the portal key holds links:mint and audit:read, not dicomweb:read
        assert outcome(env["portal"].request("GET", path, headers=FHIR_JSON),
                       403)["issue"][0]["code"] == "forbidden"


def open_session(env: dict[str, Any]) -> Client:
    minted = env["portal"].request("POST", "/api/links", {
        "study": uid(env["mine"]), "viewer": {"id": "dr-a", "name": "Dr A"},
        "relationship": "referring_physician"})
    assert minted.status == 201, minted.text
    browser = Client(env["server"].http_url)
    opened = browser.request("GET", urlsplit(minted.json()["url"]).path)
    assert opened.status == 303
    browser.cookies["gw_session"] = cookie_of(opened)[0]
    return browser


def test_viewer_session_sees_only_its_study(env: dict[str, Any]) -> None:
    browser = open_session(env)
    for query in (f"?patient={MINE}", "", f"?patient={THEIRS}"):
        resources = valid_bundle(fhir_json(browser.request("GET", f"/fhir/ImagingStudy{query}")))
        assert [r["id"] for r in resources] == ([uid(env["mine"])] if query != f"?patient={THEIRS}"
                                                else [])
    valid_study(fhir_json(browser.request("GET", f"/fhir/ImagingStudy/{uid(env['mine'])}")))
    for other in (env["sibling"], env["theirs"]):  # as unknown as a study that does not exist
        outcome(browser.request("GET", f"/fhir/ImagingStudy/{uid(other)}"), 404)


def test_reads_are_in_the_trail(env: dict[str, Any]) -> None:
    reader = env["reader"]
    fhir_json(reader.request("GET", f"/fhir/ImagingStudy?patient={THEIRS}"))
    fhir_json(reader.request("GET", f"/fhir/ImagingStudy/{uid(env['theirs'])}"))
    trail = audit.events_for_patient(env["gateway"].index, THEIRS)
    queries = [e for e in trail if e.action == audit.Action.QUERY.value]
    assert sorted(e.detail for e in queries) == ["FHIR ImagingStudy read",
                                                 "FHIR ImagingStudy search, 1 matches"]
    assert all(e.study_instance_uid == uid(env["theirs"]) and e.actor.startswith("api_key:")
               for e in queries)


def test_capability_statement(env: dict[str, Any]) -> None:
    body = fhir_json(env["reader"].request("GET", "/fhir/metadata", headers=FHIR_JSON))
    CapabilityStatement.model_validate(body)
    assert body["fhirVersion"] == "4.0.1"
    (resource,) = body["rest"][0]["resource"]
    assert resource["type"] == "ImagingStudy"
    assert outcome(Client(env["server"].http_url).request("GET", "/fhir/metadata"), 401)
