"""Viewer links over real HTTP: the portal API, the /view landing, every refusal, revocation, use
limits, key rotation, portal-signed links, IID launch, OHIF hosting and the access trail."""

from __future__ import annotations

import json
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest

from gateway.core import Gateway
from gateway.keyimages import key_images
from tests.support.common import LiveServer
from tests.support.links_helpers import (
    EC_PRIVATE,
    HS_OLD,
    STRANGER,
    Client,
    cookie_of,
    fake_viewer,
    links_env,
    links_settings,
    live_links,
    load,
    portal_token,
    small_study,
)
from viewer_links import build_service
from viewer_links.web import SERVICE

PATIENT = "LU0000001"


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> Iterator[dict[str, Any]]:
    studies = {"study": small_study(PATIENT, "ACC1"),
               "other": small_study("LU0000002", "ACC2", seed=2)}
    with links_env(tmp_path, database_url, studies=studies, dsp_patients=(PATIENT,)) as env:
        yield env


def mint(env: dict[str, Any], *, relationship: str = "trust_circle", study: str | None = None,
         **extra: Any) -> Any:
    body = {"study": study or env["study"], "viewer": {"id": "dr-weber", "name": "Dr Weber"},
            "relationship": relationship, **extra}
    return env["portal"].request("POST", "/api/links", body)


def path_of(url: str) -> str:
    return urlsplit(url).path


def session_principal(env: dict[str, Any], cookie: str) -> Any:
    return build_service(env["gateway"]).principal_for_session(cookie, "127.0.0.1")


# -- the happy path ------------------------------------------------------------------------------
def test_mint_open_sets_session_cookie_and_redirects_without_token(env: dict[str, Any]) -> None:
    reply = mint(env)
    assert reply.status == 201, reply.text
    body = reply.json()
    assert set(body) == {"url", "jti", "expires_at"}
    assert body["url"].startswith(env["server"].http_url + "/view/")
    token = path_of(body["url"]).removeprefix("/view/")
    assert jwt.get_unverified_header(token)["kid"] == "gw-new"
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["jti"] == body["jti"] and claims["exp"] - claims["iat"] == 1800  # 30 min

    opened = env["browser"].request("GET", path_of(body["url"]))
    assert opened.status == 303
    location = opened.headers["Location"]
    assert location == f"/viewer?StudyInstanceUIDs={env['study']}"
    assert token not in location
    assert opened.headers["Referrer-Policy"] == "no-referrer"
    assert opened.headers["Cache-Control"] == "no-store"
    value, attributes = cookie_of(opened)
    lowered = attributes.lower()
    assert "httponly" in lowered and "samesite=strict" in lowered and "path=/" in lowered
    assert "secure" in lowered  # outside demo mode, even over plain HTTP (a TLS proxy's)
    principal = session_principal(env, value)
    assert principal.study_uids == frozenset({env["study"]})
    assert principal.instance_uids is None and principal.relationship == "trust_circle"
    assert principal.jti == body["jti"] and principal.kind.value == "viewer_session"


def test_session_cookie_is_secure_behind_https(tmp_path: Path, database_url: str) -> None:
    settings = links_settings(tmp_path, database_url, fake_viewer(tmp_path / "viewer"))
    settings = type(settings)(**{**settings.__dict__, "http": type(settings.http)(
        **{**settings.http.__dict__, "base_url": "https://pacs.example.lu"})})
    with live_links(settings) as (server, gateway, tokens):
        study = load(gateway, small_study(PATIENT, "ACC1"))
        portal = Client(server.http_url, bearer=tokens["portal"])
        portal.request("PUT", f"/api/patients/{PATIENT}/dsp", {"created": "2020-01-01"})
        reply = portal.request("POST", "/api/links", {
            "study": study, "viewer": {"id": PATIENT}, "relationship": "patient"})
        assert reply.json()["url"].startswith("https://pacs.example.lu/view/")
        opened = Client(server.http_url).request("GET", path_of(reply.json()["url"]))
        assert "secure" in cookie_of(opened)[1].lower()


def test_session_cookie_is_not_secure_in_demo_mode(tmp_path: Path, database_url: str) -> None:
    """Demo mode is plain HTTP on loopback: a Secure cookie would not come back there."""
    settings = links_settings(tmp_path, database_url, fake_viewer(tmp_path / "viewer"))
    with live_links(type(settings)(**{**settings.__dict__, "demo": True})) as (
            server, gateway, tokens):
        study = load(gateway, small_study(PATIENT, "ACC1"))
        portal = Client(server.http_url, bearer=tokens["portal"])
        portal.request("PUT", f"/api/patients/{PATIENT}/dsp", {"created": "2020-01-01"})
        reply = portal.request("POST", "/api/links", {
            "study": study, "viewer": {"id": PATIENT}, "relationship": "patient"})
        opened = Client(server.http_url).request("GET", path_of(reply.json()["url"]))
        assert opened.status == 303
        assert "secure" not in cookie_of(opened)[1].lower()


def test_token_never_logged(env: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = mint(env).json()["url"]
    token = path_of(url).removeprefix("/view/")
    assert env["browser"].request("GET", path_of(url)).status == 303
    assert env["browser"].request("GET", path_of(url)[:-3] + "AAA").status == 403
    assert caplog.records, "the landing logs its outcome"
    for record in caplog.records:
        assert token not in record.getMessage()
        assert token[-40:] not in record.getMessage()


# -- refusals ------------------------------------------------------------------------------------
def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(jwt.utils.base64url_decode(payload))
    claims["study"] = "1.2.3.4"
    forged = jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()
    return f"{header}.{forged}.{signature}"


REFUSALS = {
    "unknown_kid": (403, lambda env: portal_token(env["study"], key=STRANGER, kid="stranger")),
    "bad_signature": (403, lambda env: _tamper(path_of(mint(env).json()["url"])[6:])),
    "expired": (410, lambda env: portal_token(env["study"], exp_offset=-60)),
    "not_yet_valid": (403, lambda env: portal_token(env["study"], nbf_offset=120, ttl=600)),
    "wrong_audience": (403, lambda env: portal_token(env["study"], audience="another-gateway")),
    "malformed": (400, lambda env: "not-a-token"),
    "policy": (403, lambda env: portal_token(env["study"], rel="care_stay")),
    "not_found": (404, lambda env: portal_token("1.2.826.0.1.3680043.8.498.999")),
}


@pytest.mark.parametrize("reason", sorted(REFUSALS))
@pytest.mark.parametrize("language,word", [("fr-LU,fr;q=0.9", "Impossible"),
                                           ("de-DE;q=0.9,en;q=0.5", "Untersuchung"),
                                           ("en-GB", "cannot")])
def test_each_refusal_has_a_clear_page_and_an_audit_entry(
        env: dict[str, Any], reason: str, language: str, word: str) -> None:
    status, make = REFUSALS[reason]
    if reason == "policy":
        env["portal"].request("PUT", f"/api/studies/{env['study']}/confidentiality",
                              {"level": "confidential"})
    token = make(env)
    reply = env["browser"].request("GET", f"/view/{token}",
                                   headers={"Accept-Language": language})
    assert reply.status == status, reply.text
    assert reply.headers["Content-Type"].startswith("text/html")
    assert reply.headers["Content-Language"] == language[:2]
    assert reply.headers["Cache-Control"] == "no-store"
    assert reply.headers["Referrer-Policy"] == "no-referrer"
    assert f'<code id="reason">{reason}</code>' in reply.text
    assert word in reply.text
    assert "Set-Cookie" not in reply.headers
    # The refusal is in the trail (the verified ones in the patient's own trail; those that do
    # not verify as one entry per address and window, written when it ends or at stop).
    unverified = reason in {"unknown_kid", "bad_signature", "malformed"}
    if unverified:
        env["server"].server.runner.app[SERVICE].flush_refusals(everything=True)
    with env["gateway"].index.Session() as session:
        from sqlalchemy import select

        from gateway.models import AuditRecord

        details = list(session.scalars(select(AuditRecord.detail)
                                       .where(AuditRecord.action == "link.refuse")))
    if unverified:
        assert any(f"{reason} x1" in d for d in details), details
    else:
        assert any(d.startswith(f"refused: {reason}") for d in details), details


def test_revoked_link_and_its_sessions_stop(env: dict[str, Any]) -> None:
    body = mint(env).json()
    first = env["browser"].request("GET", path_of(body["url"]))
    cookie = cookie_of(first)[0]
    assert session_principal(env, cookie) is not None
    assert env["portal"].request("DELETE", f"/api/links/{body['jti']}").status == 204
    assert session_principal(env, cookie) is None
    again = env["browser"].request("GET", path_of(body["url"]))
    assert again.status == 410 and "revoked" in again.text
    # Any jti can be revoked (a portal-signed link before its first use: test_links_hardening).
    assert env["portal"].request("DELETE", "/api/links/does-not-exist").status == 204
    missing = env["portal"].request("DELETE", f"/api/links/{'x' * 65}")
    assert missing.status == 404
    assert missing.headers["Content-Type"].startswith("application/problem+json")


def test_use_limit(env: dict[str, Any]) -> None:
    body = mint(env, max_uses=2).json()
    # A HEAD (a link preview, a mail scanner) spends no use.
    assert env["browser"].request("HEAD", path_of(body["url"])).status == 405
    for _ in range(2):
        assert env["browser"].request("GET", path_of(body["url"])).status == 303
    third = env["browser"].request("GET", path_of(body["url"]))
    assert third.status == 410 and "used_up" in third.text
    listed = {link["jti"]: link for link in env["portal"].request("GET", "/api/links").json()}
    assert listed[body["jti"]]["uses"] == 2 and listed[body["jti"]]["max_uses"] == 2


def test_portal_signed_use_limit_and_algorithms(env: dict[str, Any]) -> None:
    token = portal_token(env["study"], max_uses=1)
    assert env["browser"].request("GET", f"/view/{token}").status == 303
    assert env["browser"].request("GET", f"/view/{token}").status == 410
    es = portal_token(env["study"], key=EC_PRIVATE, kid="portal-ec", algorithm="ES256")
    assert env["browser"].request("GET", f"/view/{es}").status == 303
    # A token whose header claims another algorithm than its key's is refused.
    forged = jwt.encode({"aud": "dicom-gateway", "sub": "x", "rel": "patient",
                         "study": env["study"], "jti": "j", "nbf": 0, "exp": 2**33},
                        HS_OLD, algorithm="HS256", headers={"kid": "portal-ed"})
    reply = env["browser"].request("GET", f"/view/{forged}")
    assert reply.status == 403 and "bad_signature" in reply.text


def test_jti_cannot_be_reused_by_another_link(env: dict[str, Any]) -> None:
    body = mint(env).json()
    forged = portal_token(env["other"], jti=body["jti"])
    reply = env["browser"].request("GET", f"/view/{forged}")
    assert reply.status == 400 and "malformed" in reply.text


def test_leeway_tolerates_small_clock_skew(env: dict[str, Any]) -> None:
    # The leeway (30 s) admits a link a portal's fast clock made valid a little early; none
    # opens past its exp (tests/test_links_hardening.py).
    early = portal_token(env["study"], nbf_offset=10)
    assert env["browser"].request("GET", f"/view/{early}").status == 303


def test_overlong_portal_link_refused(env: dict[str, Any]) -> None:
    token = portal_token(env["study"], ttl=7200 + 3600)  # max_ttl is 7200
    reply = env["browser"].request("GET", f"/view/{token}")
    assert reply.status == 400 and "malformed" in reply.text


def test_key_rotation(tmp_path: Path, database_url: str) -> None:
    viewer = fake_viewer(tmp_path / "viewer")
    old_link = jwt.encode(
        {"aud": "dicom-gateway", "sub": PATIENT, "rel": "patient", "study": "", "jti": "old-1",
         "iat": int(time.time()), "nbf": int(time.time()), "exp": int(time.time()) + 600},
        HS_OLD, algorithm="HS256", headers={"kid": "gw-old"})
    settings = links_settings(tmp_path, database_url, viewer)
    with live_links(settings) as (server, gateway, tokens):
        study = load(gateway, small_study(PATIENT, "ACC1"))
        claims = jwt.decode(old_link, options={"verify_signature": False})
        old_link = jwt.encode({**claims, "study": study}, HS_OLD, algorithm="HS256",
                              headers={"kid": "gw-old"})
        portal = Client(server.http_url, bearer=tokens["portal"])
        portal.request("PUT", f"/api/patients/{PATIENT}/dsp", {"created": "2020-01-01"})
        new_url = portal.request("POST", "/api/links", {
            "study": study, "viewer": {"id": PATIENT}, "relationship": "patient"}).json()["url"]
        assert jwt.get_unverified_header(path_of(new_url)[6:])["kid"] == "gw-new"
        # During the rotation both keys verify.
        assert Client(server.http_url).request("GET", f"/view/{old_link}").status == 303
        assert Client(server.http_url).request("GET", path_of(new_url)).status == 303
    # The old key retired: its links are refused, the new key's still open.
    retired = links_settings(tmp_path, database_url, viewer, keep_old=False)
    with live_links(retired) as (server, gateway, tokens):
        reply = Client(server.http_url).request("GET", f"/view/{old_link}")
        assert reply.status == 403 and "unknown_kid" in reply.text
        assert Client(server.http_url).request("GET", path_of(new_url)).status == 303


# -- the rules at use time -------------------------------------------------------------------------
def test_raising_confidentiality_stops_open_sessions_at_once(env: dict[str, Any]) -> None:
    body = mint(env, relationship="care_stay").json()
    cookie = cookie_of(env["browser"].request("GET", path_of(body["url"])))[0]
    assert session_principal(env, cookie) is not None
    reply = env["portal"].request("PUT", f"/api/studies/{env['study']}/confidentiality",
                                  {"level": "private", "author": "dr-author"})
    assert reply.status == 200 and reply.json()["level"] == "private"
    assert session_principal(env, cookie) is None
    refused = env["browser"].request("GET", path_of(mint(env, relationship="patient")
                                                     .json()["url"]))
    assert refused.status == 303  # the patient still sees a private study
    env["portal"].request("PUT", f"/api/studies/{env['study']}/confidentiality",
                          {"level": "normal"})
    assert session_principal(env, cookie) is not None


def test_dsp_date_moved_after_study_stops_sessions(env: dict[str, Any]) -> None:
    body = mint(env, relationship="patient").json()
    cookie = cookie_of(env["browser"].request("GET", path_of(body["url"])))[0]
    assert env["portal"].request("PUT", f"/api/patients/{PATIENT}/dsp",
                                 {"created": "2025-06-01"}).json()["created"] == "2025-06-01"
    assert session_principal(env, cookie) is None
    refused = mint(env, relationship="patient")
    assert refused.status == 403 and refused.json()["reason"] == "before_dsp"


# -- the portal API ------------------------------------------------------------------------------
def test_api_requires_credential_and_scope(env: dict[str, Any]) -> None:
    anonymous = env["browser"].request("POST", "/api/links", {"study": env["study"]})
    assert anonymous.status == 401
    assert anonymous.headers["Content-Type"].startswith("application/problem+json")
    reader = env["browser"].request("POST", "/api/links", {"study": env["study"]},
                                    bearer=env["tokens"]["reader"])
    assert reader.status == 403 and "links:mint" in reader.json()["detail"]
    assert env["browser"].request("GET", f"/api/audit?patient={PATIENT}",
                                  bearer=env["tokens"]["reader"]).status == 403


@pytest.mark.parametrize("body,status,words", [
    ({"relationship": "neighbour"}, 422, "relationship"),
    ({"ttl": 7201}, 422, "ttl"),
    ({"ttl": 0}, 422, "ttl"),
    ({"max_uses": 0}, 422, "max_uses"),
    ({"ttl": "long"}, 422, "ttl"),
    ({"study": "1.2.x"}, 400, "UID"),
    ({"study": "1.2.826.0.1.3680043.8.498.999"}, 404, "not in the archive"),
    ({"relationship": "care_stay", "_level": "confidential"}, 403, "confidential"),
])
def test_mint_errors(env: dict[str, Any], body: dict[str, Any], status: int,
                     words: str) -> None:
    body = dict(body)  # the parameters are shared by the sqlite and postgresql runs
    level = body.pop("_level", None)
    if level:
        env["portal"].request("PUT", f"/api/studies/{env['study']}/confidentiality",
                              {"level": level})
    reply = mint(env, **body)
    assert reply.status == status, reply.text
    assert reply.headers["Content-Type"].startswith("application/problem+json")
    assert words in reply.json()["detail"]


def test_mint_key_images_without_kos_is_422(tmp_path: Path, database_url: str) -> None:
    settings = links_settings(tmp_path, database_url, fake_viewer(tmp_path / "viewer"))
    with live_links(settings) as (server, gateway, tokens):
        study = load(gateway, small_study(PATIENT, "ACC9", key_object=False))
        portal = Client(server.http_url, bearer=tokens["portal"])
        portal.request("PUT", f"/api/patients/{PATIENT}/dsp", {"created": "2020-01-01"})
        reply = portal.request("POST", "/api/links", {
            "study": study, "viewer": {"id": PATIENT}, "relationship": "patient",
            "key_images_only": True})
        assert reply.status == 422 and "Key Object Selection" in reply.json()["detail"]


def test_policy_endpoints_validate(env: dict[str, Any]) -> None:
    portal = env["portal"]
    assert portal.request("PUT", f"/api/studies/{env['study']}/confidentiality",
                          {"level": "secret"}).status == 422
    assert portal.request("PUT", "/api/studies/1.2.3.999/confidentiality",
                          {"level": "private"}).status == 404
    assert portal.request("PUT", f"/api/patients/{PATIENT}/dsp",
                          {"created": "2024-13-01"}).status == 422
    assert portal.request("PUT", f"/api/patients/{PATIENT}/dsp",
                          {"created": "2024-01-01", "issuer": 7}).status == 422
    # A patient without a stored study yet: recorded all the same (used when images arrive).
    reply = portal.request("PUT", "/api/patients/NOBODY/dsp", {"created": "2024-01-01"})
    assert reply.status == 200
    assert reply.json() == {"patient": "NOBODY", "created": "2024-01-01"}


def test_key_images_only_session(env: dict[str, Any]) -> None:
    with env["gateway"].index.Session() as session:
        keys = key_images(session, env["study"])
    assert len(keys) == 2  # one key image per series in the generated KOS
    body = mint(env, key_images_only=True).json()
    opened = env["browser"].request("GET", path_of(body["url"]))
    assert opened.status == 303
    query = parse_qs(urlsplit(opened.headers["Location"]).query)
    assert query["StudyInstanceUIDs"] == [env["study"]]
    assert query["SeriesInstanceUIDs"] == [",".join(k.series_instance_uid for k in keys)]
    assert query["initialSOPInstanceUID"] == [keys[0].sop_instance_uid]
    principal = session_principal(env, cookie_of(opened)[0])
    assert principal.instance_uids == frozenset(k.sop_instance_uid for k in keys)


def test_iid_launch(env: dict[str, Any]) -> None:
    reader = env["tokens"]["reader"]
    path = f"/iid?requestType=STUDY&studyUID={env['study']}&keyImagesOnly=true"
    reply = env["browser"].request("GET", path, bearer=reader)
    assert reply.status == 303, reply.text
    assert reply.headers["Location"].startswith(f"/viewer?StudyInstanceUIDs={env['study']}")
    principal = session_principal(env, cookie_of(reply)[0])
    assert principal.instance_uids and len(principal.instance_uids) == 2
    assert env["browser"].request("GET", path).status == 401
    assert env["browser"].request("GET", "/iid?requestType=PATIENT&patientID=X",
                                  bearer=reader).status == 400
    assert env["browser"].request("GET", path, bearer=env["tokens"]["portal"]).status == 403


# -- the access trail ----------------------------------------------------------------------------
@pytest.mark.parametrize("count", ["-1", "0", "ten"])
def test_audit_count_must_be_a_positive_integer(env: dict[str, Any], count: str) -> None:
    reply = env["portal"].request("GET", f"/api/audit?patient={PATIENT}&_count={count}")
    assert reply.status == 400 and "_count" in reply.json()["detail"]


def test_audit_trail_as_fhir_and_dicom(env: dict[str, Any]) -> None:
    body = mint(env).json()
    env["browser"].request("GET", path_of(body["url"]))
    env["browser"].request("GET", "/view/" + portal_token(env["study"], exp_offset=-100))
    reply = env["portal"].request("GET", f"/api/audit?patient={PATIENT}")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("application/fhir+json")
    bundle = reply.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    actions = [e["resource"]["subtype"][0]["code"] for e in bundle["entry"]]
    assert {"link.mint", "link.open", "link.refuse", "policy.change"} <= set(actions)
    expired = next(e["resource"] for e in bundle["entry"]
                   if e["resource"]["subtype"][0]["code"] == "link.refuse")
    assert expired["outcomeDesc"] == "refused: expired" and expired["outcome"] == "4"
    opened = next(e["resource"] for e in bundle["entry"]
                  if e["resource"]["subtype"][0]["code"] == "link.open")
    assert opened["agent"][0]["who"]["display"] == "Dr Weber"
    assert opened["agent"][0]["role"] == [{"text": "trust_circle"}]
    assert opened["agent"][0]["network"]["address"] == "127.0.0.1"
    assert any(e["what"]["identifier"]["value"] == body["jti"] for e in opened["entity"])
    assert body["url"].split("/view/")[1] not in reply.text  # never the token
    # the other patient's trail does not leak into this one
    assert not any(env["other"] in json.dumps(e) for e in bundle["entry"])
    xml = env["portal"].request("GET", f"/api/audit?patient={PATIENT}&format=dicom")
    root = ET.fromstring(xml.body)
    assert root.tag == "AuditMessages"
    assert len(root) == len(bundle["entry"]) + 1  # + the first reading of the trail
    assert env["portal"].request("GET", "/api/audit").status == 400


# -- OHIF hosting --------------------------------------------------------------------------------
def test_viewer_hosting(env: dict[str, Any]) -> None:
    browser = env["browser"]
    for path in ("/", "/viewer", "/viewer/dicomjson"):
        reply = browser.request("GET", path)
        assert reply.status == 200 and b'<div id="root">OHIF</div>' in reply.body, path
        assert reply.headers["Cross-Origin-Opener-Policy"] == "same-origin"
        assert reply.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        assert reply.headers["Cache-Control"] == "no-cache"
    config = browser.request("GET", "/app-config.js")
    assert config.status == 200 and config.headers["Content-Type"].startswith("text/javascript")
    assert "showStudyList: false" in config.text and "'/dicomweb'" in config.text
    assert '"qidoSupportsIncludeField": true' in config.text
    asset = browser.request("GET", "/app.bundle.0123456789abcdef.js")
    assert asset.status == 200 and "immutable" in asset.headers["Cache-Control"]
    assert browser.request("GET", "/missing.0123456789abcdef.js").status == 404
    assert browser.request("GET", "/api/nothing-here").status in (401, 404)
    reply = browser.request("GET", "/dicomweb-not/../view")
    assert b"OHIF" not in browser.request("GET", "/view").body
    assert browser.request("GET", "/.ohif-version").status == 404
    assert reply.status in (200, 404)
    assert browser.request("GET", "/healthz").json() == {"status": "ok"}


def test_view_without_viewer_says_how_to_install(tmp_path: Path, database_url: str) -> None:
    settings = links_settings(tmp_path, database_url, tmp_path / "no-viewer")
    with live_links(settings) as (server, gateway, tokens):
        study = load(gateway, small_study(PATIENT, "ACC1"))
        portal = Client(server.http_url, bearer=tokens["portal"])
        portal.request("PUT", f"/api/patients/{PATIENT}/dsp", {"created": "2020-01-01"})
        body = portal.request("POST", "/api/links", {
            "study": study, "viewer": {"id": PATIENT}, "relationship": "patient",
            "max_uses": 1}).json()
        reply = Client(server.http_url).request("GET", path_of(body["url"]),
                                                headers={"Accept-Language": "en"})
        assert reply.status == 503 and "dicom-gateway viewer install" in reply.text
        assert Client(server.http_url).request("GET", "/").status == 503
        listed = portal.request("GET", "/api/links").json()
        assert listed[0]["uses"] == 0  # the refusal did not spend the single use


def _unused(server: LiveServer, gateway: Gateway) -> None:  # keep imports typed
    del server, gateway
