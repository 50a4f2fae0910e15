"""A viewer session reaches its own study (or its key images) and nothing else: QIDO-RS results,
metadata, frames, files and bulk data of other studies are out of reach over real HTTP, and the
DICOMweb accesses of a session land in the patient's access trail."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from gateway.keyimages import key_images
from gateway.models import Instance
from tests.support.links_helpers import (
    Client,
    Reply,
    cookie_of,
    links_env,
    small_study,
)

MINE, THEIRS = "LU0000001", "LU0000002"
DICOM_JSON = {"Accept": "application/dicom+json"}


def results(reply: Reply) -> list[dict[str, Any]]:
    assert reply.status in (200, 204), (reply.status, reply.text[:300])
    return [] if reply.status == 204 else list(reply.json())


def uids(items: list[dict[str, Any]], tag: str) -> set[str]:
    return {item[tag]["Value"][0] for item in items}


STUDY, SERIES, SOP = "0020000D", "0020000E", "00080018"


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> Iterator[dict[str, Any]]:
    datasets = {"mine": small_study(MINE, "ACC1"), "theirs": small_study(THEIRS, "ACC2", seed=2),
                # a second study of the same patient, which the link does not cover
                "sibling": small_study(MINE, "ACC3", seed=3)}
    with links_env(tmp_path, database_url, datasets=datasets,
                   dsp_patients=(MINE, THEIRS)) as env:
        yield env


def open_session(env: dict[str, Any], **extra: Any) -> Client:
    minted = env["portal"].request("POST", "/api/links", {
        "study": str(env["mine"][0].StudyInstanceUID), "viewer": {"id": "dr-a", "name": "Dr A"},
        "relationship": "referring_physician", **extra})
    assert minted.status == 201, minted.text
    browser = Client(env["server"].http_url)
    opened = browser.request("GET", urlsplit(minted.json()["url"]).path)
    assert opened.status == 303
    browser.cookies["gw_session"] = cookie_of(opened)[0]
    return browser


def paths(ds: Any) -> dict[str, str]:
    base = (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")
    return {
        "study metadata": f"/dicomweb/studies/{ds.StudyInstanceUID}/metadata",
        "series metadata": f"/dicomweb/studies/{ds.StudyInstanceUID}/series/"
                           f"{ds.SeriesInstanceUID}/metadata",
        "instance metadata": f"{base}/metadata",
        "instance": base,
        "frames": f"{base}/frames/1",
        "bulk pixel data": f"{base}/bulk/7FE00010",
        "study": f"/dicomweb/studies/{ds.StudyInstanceUID}",
        "series": f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}",
        "rendered": f"{base}/rendered",
        "frame rendered": f"{base}/frames/1/rendered",
        "thumbnail": f"{base}/thumbnail",
        "series rendered": f"/dicomweb/studies/{ds.StudyInstanceUID}/series/"
                           f"{ds.SeriesInstanceUID}/rendered",
        "study thumbnail": f"/dicomweb/studies/{ds.StudyInstanceUID}/thumbnail",
    }


ACCEPT = {
    "study metadata": DICOM_JSON, "series metadata": DICOM_JSON, "instance metadata": DICOM_JSON,
    "instance": {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    "frames": {"Accept": 'multipart/related; type="application/octet-stream"; '
                         'transfer-syntax=*'},
    "bulk pixel data": {"Accept": 'multipart/related; type="application/octet-stream"; '
                                  'transfer-syntax=*'},
    "study": {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    "series": {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    "rendered": {"Accept": "image/jpeg"},
    "frame rendered": {"Accept": "image/jpeg"},
    "thumbnail": {"Accept": "image/jpeg"},
    "series rendered": {"Accept": "image/jpeg"},
    "study thumbnail": {"Accept": "image/jpeg"},
}


def test_session_sees_only_its_study_in_qido(env: dict[str, Any]) -> None:
    browser = open_session(env)
    mine = str(env["mine"][0].StudyInstanceUID)
    theirs = str(env["theirs"][0].StudyInstanceUID)
    sibling = str(env["sibling"][0].StudyInstanceUID)
    assert uids(results(browser.request("GET", "/dicomweb/studies", headers=DICOM_JSON)),
                STUDY) == {mine}
    # OHIF asks for the patient's other studies: only the linked one comes back.
    same_patient = results(browser.request("GET", f"/dicomweb/studies?PatientID={MINE}",
                                           headers=DICOM_JSON))
    assert uids(same_patient, STUDY) == {mine}
    for query in (f"/dicomweb/studies?PatientID={THEIRS}",
                  f"/dicomweb/studies?StudyInstanceUID={theirs}",
                  f"/dicomweb/studies?StudyInstanceUID={sibling}",
                  f"/dicomweb/series?StudyInstanceUID={theirs}",
                  f"/dicomweb/instances?StudyInstanceUID={theirs}",
                  f"/dicomweb/studies/{theirs}/series",
                  f"/dicomweb/studies/{theirs}/instances"):
        reply = browser.request("GET", query, headers=DICOM_JSON)
        assert reply.status in (200, 204, 404), (query, reply.status)
        if reply.status != 404:
            assert results(reply) == [], query
    all_instances = results(browser.request("GET", "/dicomweb/instances", headers=DICOM_JSON))
    assert uids(all_instances, STUDY) == {mine}
    assert len(all_instances) == len(env["mine"])
    # Without the cookie: deny by default.
    assert Client(env["server"].http_url).request("GET", "/dicomweb/studies").status == 401


@pytest.mark.parametrize("kind", list(ACCEPT))
def test_session_cannot_retrieve_other_studies(env: dict[str, Any], kind: str) -> None:
    browser = open_session(env)
    own = paths(env["mine"][0])[kind]
    ok = browser.request("GET", own, headers=ACCEPT[kind])
    assert ok.status == 200, (kind, ok.status, ok.text[:300])
    for other in (env["theirs"][0], env["sibling"][0]):
        reply = browser.request("GET", paths(other)[kind], headers=ACCEPT[kind])
        assert reply.status in (403, 404), (kind, reply.status)
        # nothing of the other study comes back (the UIDs asked for may be echoed in the error)
        assert str(other.AccessionNumber).encode() not in reply.body
        assert b"PixelData" not in reply.body and b"7FE00010" not in reply.body
    # Mixing the own study's UID with another study's series is no way round.
    other = env["theirs"][0]
    crossed = own.replace(str(env["mine"][0].SeriesInstanceUID), str(other.SeriesInstanceUID))
    crossed = crossed.replace(str(env["mine"][0].SOPInstanceUID), str(other.SOPInstanceUID))
    if crossed != own:
        assert browser.request("GET", crossed, headers=ACCEPT[kind]).status in (403, 404)


def test_session_cannot_delete_store_or_use_the_portal_api(env: dict[str, Any]) -> None:
    browser = open_session(env)
    for ds in (env["mine"][0], env["theirs"][0]):
        base = (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                f"/instances/{ds.SOPInstanceUID}")
        for path in (f"/dicomweb/studies/{ds.StudyInstanceUID}", base):
            assert browser.request("DELETE", path).status == 403, path
    stow = browser.request("POST", "/dicomweb/studies", body=None, headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
    assert stow.status == 403
    # The cookie is no credential for the portal API.
    assert browser.request("GET", "/api/links").status == 401
    assert browser.request("GET", f"/api/audit?patient={MINE}").status == 401
    with env["server"].gateway.index.Session() as session:
        assert session.query(Instance).count() == len(env["mine"]) + len(env["theirs"]) + len(
            env["sibling"])


def test_key_images_session_sees_only_key_images(env: dict[str, Any]) -> None:
    browser = open_session(env, key_images_only=True)
    study = str(env["mine"][0].StudyInstanceUID)
    with env["gateway"].index.Session() as session:
        keys = {k.sop_instance_uid for k in key_images(session, study)}
    assert len(keys) == 2
    instances = results(browser.request("GET", f"/dicomweb/studies/{study}/instances",
                                        headers=DICOM_JSON))
    assert uids(instances, SOP) == keys
    metadata = results(browser.request("GET", f"/dicomweb/studies/{study}/metadata",
                                       headers=DICOM_JSON))
    assert uids(metadata, SOP) == keys
    hidden = next(ds for ds in env["mine"] if str(ds.SOPInstanceUID) not in keys)
    shown = next(ds for ds in env["mine"] if str(ds.SOPInstanceUID) in keys)
    for kind in ("instance metadata", "instance", "frames"):
        assert browser.request("GET", paths(shown)[kind], headers=ACCEPT[kind]).status == 200
        assert browser.request("GET", paths(hidden)[kind],
                               headers=ACCEPT[kind]).status in (403, 404), kind


def test_revocation_and_rule_changes_end_dicomweb_access(env: dict[str, Any]) -> None:
    browser = open_session(env)
    study = str(env["mine"][0].StudyInstanceUID)
    assert browser.request("GET", "/dicomweb/studies", headers=DICOM_JSON).status == 200
    env["portal"].request("PUT", f"/api/studies/{study}/confidentiality",
                          {"level": "private", "author": "dr-b"})
    assert browser.request("GET", "/dicomweb/studies", headers=DICOM_JSON).status == 401
    env["portal"].request("PUT", f"/api/studies/{study}/confidentiality", {"level": "normal"})
    assert browser.request("GET", "/dicomweb/studies", headers=DICOM_JSON).status == 200
    jti = env["portal"].request("GET", "/api/links").json()[0]["jti"]
    assert env["portal"].request("DELETE", f"/api/links/{jti}").status == 204
    assert browser.request("GET", f"/dicomweb/studies/{study}/metadata",
                           headers=DICOM_JSON).status == 401


def test_session_accesses_are_in_the_patient_trail(env: dict[str, Any]) -> None:
    browser = open_session(env)
    study = str(env["mine"][0].StudyInstanceUID)
    browser.request("GET", "/dicomweb/studies", headers=DICOM_JSON)
    browser.request("GET", f"/dicomweb/studies/{study}/metadata", headers=DICOM_JSON)
    bundle = env["portal"].request("GET", f"/api/audit?patient={MINE}").json()
    by_action: dict[str, list[dict[str, Any]]] = {}
    for entry in bundle["entry"]:
        by_action.setdefault(entry["resource"]["subtype"][0]["code"], []).append(
            entry["resource"])
    assert "query" in by_action and "retrieve" in by_action, sorted(by_action)
    retrieve = by_action["retrieve"][0]
    assert retrieve["agent"][0]["role"] == [{"text": "referring_physician"}]
    assert retrieve["agent"][0]["who"]["display"] == "Dr A"
    assert retrieve["type"]["code"] == "110103"
    theirs = env["portal"].request("GET", f"/api/audit?patient={THEIRS}").json()
    assert not any(e["resource"]["subtype"][0]["code"] in {"query", "retrieve"}
                   for e in theirs["entry"]), json.dumps(theirs)[:500]
