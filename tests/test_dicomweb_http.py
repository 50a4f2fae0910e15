"""DICOMweb HTTP details over raw HTTP: problem+json, CORS (off by default), methods."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.core import Gateway
from tests.support.common import LiveServer, make_settings
from tests.support.dicomweb_helpers import api_key, load_corpus, raw

PREFLIGHT = {"Origin": "https://viewer.example.lu", "Access-Control-Request-Method": "GET",
             "Access-Control-Request-Headers": "accept, authorization"}


def test_cors_is_off_by_default(live: LiveServer) -> None:
    reply = raw(live.http_url + "/dicomweb/studies", method="OPTIONS", headers=PREFLIGHT)
    assert reply.status == 403
    assert "Access-Control-Allow-Origin" not in reply.headers
    token = api_key(live.gateway, "reader", "dicomweb:read")
    reply = raw(live.http_url + "/dicomweb/studies",
                headers={"Origin": "https://viewer.example.lu", "Authorization": f"Bearer {token}"})
    assert reply.status == 200 and "Access-Control-Allow-Origin" not in reply.headers


def test_cors_for_configured_origins(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url,
                             GATEWAY_HTTP_CORS_ORIGINS="https://viewer.example.lu")
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        load_corpus(gateway)
        # The preflight is answered before authentication (browsers send no credentials).
        reply = raw(live.http_url + "/dicomweb/studies", method="OPTIONS", headers=PREFLIGHT)
        assert reply.status == 204
        assert reply.headers["Access-Control-Allow-Origin"] == "https://viewer.example.lu"
        assert "Accept" in reply.headers["Access-Control-Allow-Headers"]
        assert "Authorization" in reply.headers["Access-Control-Allow-Headers"]
        assert "GET" in reply.headers["Access-Control-Allow-Methods"]
        token = api_key(gateway, "reader", "dicomweb:read")
        reply = raw(live.http_url + "/dicomweb/studies",
                    headers={"Origin": "https://viewer.example.lu",
                             "Authorization": f"Bearer {token}"})
        assert reply.status == 200
        assert reply.headers["Access-Control-Allow-Origin"] == "https://viewer.example.lu"
        assert "Warning" in reply.headers["Access-Control-Expose-Headers"]
        # Errors carry the CORS headers too, so the browser can read the problem.
        reply = raw(live.http_url + "/dicomweb/studies",
                    headers={"Origin": "https://viewer.example.lu"})
        assert reply.status == 401
        assert reply.headers["Access-Control-Allow-Origin"] == "https://viewer.example.lu"
        other = dict(PREFLIGHT, Origin="https://evil.example.com")
        reply = raw(live.http_url + "/dicomweb/studies", method="OPTIONS", headers=other)
        assert reply.status == 403 and "Access-Control-Allow-Origin" not in reply.headers


def test_cors_streamed_retrieve_carries_the_headers(tmp_path: Path, database_url: str) -> None:
    """WADO-RS streams its multipart body: the CORS headers must be on it all the same."""
    settings = make_settings(tmp_path, database_url,
                             GATEWAY_HTTP_CORS_ORIGINS="https://viewer.example.lu")
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        corpus = load_corpus(gateway)
        token = api_key(gateway, "reader", "dicomweb:read")
        reply = raw(f"{live.http_url}/dicomweb/studies/{corpus.study_a}",
                    headers={"Origin": "https://viewer.example.lu",
                             "Authorization": f"Bearer {token}",
                             "Accept": 'multipart/related; type="application/dicom"; '
                                       "transfer-syntax=*"})
        assert reply.status == 200
        assert reply.headers["Access-Control-Allow-Origin"] == "https://viewer.example.lu"
        assert "Warning" in reply.headers["Access-Control-Expose-Headers"]


def test_cors_wildcard_never_allows_credentials(tmp_path: Path, database_url: str) -> None:
    """With "*", any site may call with a bearer token it holds, never with the viewer's
    session cookie: no Access-Control-Allow-Credentials for an origin not named one by one."""
    settings = make_settings(tmp_path, database_url,
                             GATEWAY_HTTP_CORS_ORIGINS="*,https://viewer.example.lu")
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        load_corpus(gateway)
        other = dict(PREFLIGHT, Origin="https://any.example.com")
        reply = raw(live.http_url + "/dicomweb/studies", method="OPTIONS", headers=other)
        assert reply.status == 204
        assert reply.headers["Access-Control-Allow-Origin"] == "https://any.example.com"
        assert "Access-Control-Allow-Credentials" not in reply.headers
        token = api_key(gateway, "reader", "dicomweb:read")
        reply = raw(live.http_url + "/dicomweb/studies",
                    headers={"Origin": "https://any.example.com",
                             "Authorization": f"Bearer {token}"})
        assert reply.status == 200
        assert reply.headers["Access-Control-Allow-Origin"] == "https://any.example.com"
        assert "Access-Control-Allow-Credentials" not in reply.headers
        # An origin listed by name keeps credentials (same-site deployments of the viewer).
        reply = raw(live.http_url + "/dicomweb/studies", method="OPTIONS", headers=PREFLIGHT)
        assert reply.headers["Access-Control-Allow-Credentials"] == "true"


def test_unknown_route_and_method_are_problem_json(live: LiveServer) -> None:
    token = api_key(live.gateway, "ops", "admin")
    auth = {"Authorization": f"Bearer {token}"}
    reply = raw(live.http_url + "/dicomweb/nothing-here", headers=auth)
    assert reply.status == 404
    assert reply.headers["Content-Type"] == "application/problem+json"
    reply = raw(live.http_url + "/dicomweb/series", method="DELETE", headers=auth)
    assert reply.status == 405
    assert reply.headers["Content-Type"] == "application/problem+json"
    assert "GET" in reply.headers["Allow"]
    problem = json.loads(reply.body)
    assert problem["status"] == 405 and problem["title"] == "Method Not Allowed"


def test_health_routes_stay_outside_dicomweb_auth(live: LiveServer) -> None:
    assert raw(live.http_url + "/healthz").status == 200


def test_capabilities_as_wadl(live: LiveServer) -> None:
    import xml.etree.ElementTree as ET

    token = api_key(live.gateway, "reader", "dicomweb:read")
    reply = raw(live.http_url + "/dicomweb/", method="OPTIONS",
                headers={"Authorization": f"Bearer {token}"})
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/vnd.sun.wadl+xml"
    root = ET.fromstring(reply.body)
    ns = {"w": "http://wadl.dev.java.net/2009/02"}
    resources = root.find("w:resources", ns)
    assert resources is not None
    assert resources.get("base") == f"{live.http_url}/dicomweb/"
    methods = {(r.get("path"), m.get("name")) for r in resources.findall("w:resource", ns)
               for m in r.findall("w:method", ns)}
    assert ("studies", "GET") in methods and ("studies", "POST") in methods
    assert ("studies/{study}/series/{series}/metadata", "GET") in methods
    assert ("studies/{study}", "DELETE") in methods
    # Capabilities need a credential too (deny by default), and a WADL-compatible Accept.
    assert raw(live.http_url + "/dicomweb/", method="OPTIONS").status == 401
    assert raw(live.http_url + "/dicomweb/", method="OPTIONS",
               headers={"Authorization": f"Bearer {token}", "Accept": "image/png"}).status == 406
