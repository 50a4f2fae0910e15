"""Attacks on viewer links, the IID launch and the portal API, replayed over real HTTP against a
live gateway (docs/security.md): each test failed on the code before its fix."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import pytest
from sqlalchemy import select

from gateway.apikeys import ApiKeys
from gateway.core import Gateway
from gateway.models import AuditRecord
from tests.support.common import LiveServer
from tests.support.gateway_process import GatewayProcess
from tests.support.links_helpers import (
    STRANGER,
    Client,
    Reply,
    cookie_of,
    fake_viewer,
    links_env,
    links_settings,
    load,
    portal_token,
    small_study,
)
from viewer_links import build_service
from viewer_links.service import hash_session_id

PATIENT = "LU0000001"


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> Iterator[dict[str, Any]]:
    with links_env(tmp_path, database_url, studies={"study": small_study(PATIENT, "ACC1")},
                   dsp_patients=(PATIENT,)) as env:
        yield env


def key(env: dict[str, Any], scopes: str) -> str:
    return str(ApiKeys(env["gateway"].index).create(f"k-{uuid.uuid4().hex[:8]}", scopes))


def path_of(url: str) -> str:
    return urlsplit(url).path


# -- 12. links:mint cannot change the policy ------------------------------------------------------
def test_links_mint_alone_cannot_lower_confidentiality_or_move_the_dsp_date(
        env: dict[str, Any]) -> None:
    assert env["portal"].request("PUT", f"/api/studies/{env['study']}/confidentiality",
                                 {"level": "private", "author": "dr-author"}).status == 200
    minter = Client(env["server"].http_url, bearer=key(env, "links:mint"))
    lowered = minter.request("PUT", f"/api/studies/{env['study']}/confidentiality",
                             {"level": "normal"})
    assert lowered.status == 403, lowered.text
    assert lowered.headers["Content-Type"].startswith("application/problem+json")
    assert "policy:write" in lowered.json()["detail"]
    moved = minter.request("PUT", f"/api/patients/{PATIENT}/dsp", {"created": "1900-01-01"})
    assert moved.status == 403 and "policy:write" in moved.json()["detail"]
    # Nothing changed: a care_stay link to the private study is still refused by the rules.
    refused = minter.request("POST", "/api/links", {
        "study": env["study"], "viewer": {"id": "dr-x"}, "relationship": "care_stay"})
    assert refused.status == 403 and refused.json()["reason"] == "confidentiality"
    # policy:write (and admin, which implies it) may.
    for scopes in ("policy:write", "admin"):
        writer = Client(env["server"].http_url, bearer=key(env, scopes))
        assert writer.request("PUT", f"/api/patients/{PATIENT}/dsp",
                              {"created": "2020-01-01"}).status == 200
        assert writer.request("PUT", f"/api/studies/{env['study']}/confidentiality",
                              {"level": "normal"}).status == 200


# -- 11. a viewer session never outlives its link ------------------------------------------------
def _session_expiry(env: dict[str, Any], cookie: str) -> datetime:
    service = build_service(env["gateway"])
    found = service.registry.read(lambda unit: unit.live_session(hash_session_id(cookie)))
    assert found is not None
    return found[0].expires_at


def test_session_ends_with_its_link_however_long_the_link_lived(env: dict[str, Any]) -> None:
    now = int(time.time())
    # A link issued ten minutes ago that expires in a minute: its session must end with it,
    # not ten minutes from now (open + the link's whole lifetime).
    token = portal_token(env["study"], iat=now - 540, nbf=now - 540, exp_offset=60)
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    opened = env["browser"].request("GET", f"/view/{token}")
    assert opened.status == 303, opened.text
    cookie, attributes = cookie_of(opened)
    max_age = int(attributes.lower().split("max-age=")[1].split(";")[0])
    assert max_age <= 60
    assert _session_expiry(env, cookie) <= datetime.fromtimestamp(exp, UTC)


def test_link_past_its_exp_opens_no_session_even_within_the_leeway(env: dict[str, Any]) -> None:
    token = portal_token(env["study"], exp_offset=-5)  # expired 5 s ago; the leeway is 30 s
    reply = env["browser"].request("GET", f"/view/{token}")
    assert reply.status == 410 and "expired" in reply.text
    assert not reply.headers.get_all("Set-Cookie")


# -- 9. a link can be revoked before its first use -----------------------------------------------
def test_portal_signed_link_revoked_before_its_first_use_never_opens(env: dict[str, Any]) -> None:
    token = portal_token(env["study"])
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    revoked = env["portal"].request("DELETE", f"/api/links/{jti}")
    assert revoked.status == 204, revoked.text
    reply = env["browser"].request("GET", f"/view/{token}")
    assert reply.status == 410 and "revoked" in reply.text
    assert not reply.headers.get_all("Set-Cookie")
    listed = {link["jti"]: link for link in env["portal"].request("GET", "/api/links").json()}
    assert listed[jti]["revoked"] is True
    # Revoking again is harmless; an over-long jti is still refused.
    assert env["portal"].request("DELETE", f"/api/links/{jti}").status == 204
    assert env["portal"].request("DELETE", f"/api/links/{'x' * 65}").status == 404


# -- 10. an IID session is bound to the credential that opened it --------------------------------
JWT_SECRET = "j" * 40


@pytest.fixture
def iid_env(tmp_path: Path, database_url: str) -> Iterator[dict[str, Any]]:
    auth = f'\n[auth.jwt_keys.ehr-1]\nalgorithm = "HS256"\nkey = "{JWT_SECRET}"\n'
    with links_env(tmp_path, database_url, studies={"study": small_study(PATIENT, "ACC1")},
                   extra_toml=auth) as env:
        yield env


def iid(env: dict[str, Any], bearer: str) -> tuple[Reply, Client]:
    reply = env["browser"].request(
        "GET", f"/iid?requestType=STUDY&studyUID={env['study']}", bearer=bearer)
    assert reply.status == 303, reply.text
    viewer = Client(env["server"].http_url)
    viewer.cookies["gw_session"] = cookie_of(reply)[0]
    return reply, viewer


def test_iid_session_ends_when_its_api_key_is_revoked(iid_env: dict[str, Any]) -> None:
    name = f"ehr-{uuid.uuid4().hex[:6]}"
    bearer = str(ApiKeys(iid_env["gateway"].index).create(name, "dicomweb:read"))
    _, viewer = iid(iid_env, bearer)
    metadata = f"/dicomweb/studies/{iid_env['study']}/metadata"
    assert viewer.request("GET", metadata).status == 200
    ApiKeys(iid_env["gateway"].index).revoke(name)
    refused = viewer.request("GET", metadata)
    assert refused.status == 401, refused.status


def test_iid_session_ends_with_the_jwt_that_opened_it(iid_env: dict[str, Any]) -> None:
    now = int(time.time())
    bearer = jwt.encode({"sub": "ehr-user", "scope": "dicomweb:read", "iat": now,
                         "exp": now + 120}, JWT_SECRET, algorithm="HS256",
                        headers={"kid": "ehr-1"})
    reply, viewer = iid(iid_env, bearer)
    max_age = int(cookie_of(reply)[1].lower().split("max-age=")[1].split(";")[0])
    assert max_age <= 120  # not the 8 h of session_ttl
    assert _session_expiry(iid_env, viewer.cookies["gw_session"]) <= \
        datetime.fromtimestamp(now + 120, UTC)
    assert viewer.request("GET", f"/dicomweb/studies/{iid_env['study']}/metadata").status == 200


# -- 16. JWT bearers: a real secret, an iat, a bounded lifetime ----------------------------------
def ehr_jwt(**claims: Any) -> str:
    now = int(time.time())
    body = {"sub": "ehr-user", "scope": "links:mint policy:write", "iat": now,
            "exp": now + 300, **claims}
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, JWT_SECRET, algorithm="HS256", headers={"kid": "ehr-1"})


def test_jwt_bearer_needs_iat_and_a_bounded_lifetime(iid_env: dict[str, Any]) -> None:
    api = Client(iid_env["server"].http_url)
    links = "/api/links?active=true"
    assert api.request("GET", links, bearer=ehr_jwt()).status == 200
    no_iat = api.request("GET", links, bearer=ehr_jwt(iat=None))
    assert no_iat.status == 401 and "iat" in no_iat.json()["detail"]
    now = int(time.time())
    forever = api.request("GET", links, bearer=ehr_jwt(iat=now, exp=now + 30 * 86400))
    assert forever.status == 401 and "lifetime" in forever.json()["detail"]
    future = api.request("GET", links, bearer=ehr_jwt(iat=now + 3600, exp=now + 3900))
    assert future.status == 401


def test_gateway_refuses_to_serve_with_a_short_hs256_jwt_secret(
        tmp_path: Path, database_url: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[auth.jwt_keys.weak]\nalgorithm = "HS256"\nkey = "guessable"\n')
    env = {"GATEWAY_DATA_DIR": str(tmp_path / "data"), "GATEWAY_DATABASE_URL": database_url,
           "GATEWAY_DIMSE_PORT": "0", "GATEWAY_HTTP_PORT": "0", "GATEWAY_CONFIG": str(config)}
    process = GatewayProcess(env, tmp_path / "gateway.log")
    with pytest.raises(RuntimeError, match="gateway exited") as refused:
        try:
            process.start()
        finally:
            process.stop()
    assert "weak" in str(refused.value) and "32 bytes" in str(refused.value)


# -- 15. garbage at /view is limited and aggregated, not one trail row each -----------------------
def _unverified_trail(gateway: Any) -> list[str]:
    with gateway.index.Session() as session:
        return list(session.scalars(select(AuditRecord.detail).where(
            AuditRecord.action == "link.refuse", AuditRecord.actor == "unverified link")))


def test_garbage_links_are_rate_limited_and_aggregated_in_the_trail(
        tmp_path: Path, database_url: str) -> None:
    limits = "refusal_window = 3600\nmax_unverified_refusals = 20\n"
    settings = links_settings(tmp_path, database_url, fake_viewer(tmp_path / "viewer"),
                              extra=limits)
    gateway = Gateway(settings).open()
    try:
        study = load(gateway, small_study(PATIENT, "ACC1"))
        with LiveServer(gateway) as server:
            browser = Client(server.http_url)
            statuses = Counter()
            for n in range(200):
                garbage = "not-a-token" if n % 2 else portal_token(study, key=STRANGER,
                                                                   kid="stranger")
                reply = browser.request("GET", f"/view/{garbage}")
                statuses[reply.status] += 1
                if reply.status == 429:
                    assert 0 < int(reply.headers["Retry-After"]) <= 3600
                    assert reply.headers["Content-Type"].startswith("text/html")
            assert statuses == {400: 10, 403: 10, 429: 180}, statuses
            assert len(_unverified_trail(gateway)) <= 1  # nothing per request
        # The window is written when it ends, or when the node stops: one entry, counted.
        trail = _unverified_trail(gateway)
        assert len(trail) == 1, trail
        assert trail[0].startswith("200 links that do not verify refused")
        assert "malformed x10" in trail[0] and "unknown_kid x10" in trail[0]
        assert "180 of them answered 429" in trail[0]
    finally:
        gateway.close()
