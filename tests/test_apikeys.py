"""API keys (created, listed, revoked, stored hashed) and JWT bearer tokens, over real HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
from sqlalchemy import select

from gateway.apikeys import ApiKeys, InvalidScope
from gateway.core import Gateway
from gateway.errors import Conflict, NotFound
from gateway.models import ApiKey
from tests.support.common import LiveServer, make_settings
from tests.support.dicomweb_helpers import raw


def cli(tmp_path: Path, database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GATEWAY_DATA_DIR": str(tmp_path / "data"),
           "GATEWAY_DATABASE_URL": database_url}
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def get_studies(live: LiveServer, token: str) -> int:
    return raw(live.http_url + "/dicomweb/studies",
               headers={"Authorization": f"Bearer {token}"}).status


@pytest.mark.slow  # CLI processes in a row
def test_cli_create_list_revoke(tmp_path: Path, database_url: str, gateway: Gateway) -> None:
    created = cli(tmp_path, database_url, "apikey", "create", "--name", "radiology-ws",
                  "--scopes", "dicomweb:read,dicomweb:write")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("dgw_") and "not shown again" in created.stderr
    # Stored hashed: the secret is nowhere in the index.
    with gateway.index.Session() as session:
        row = session.scalars(select(ApiKey)).one()
        stored = " ".join(str(v) for v in (row.key_id, row.name, row.secret_hash, row.scopes))
    assert key.split("_", 2)[2] not in stored
    listed = cli(tmp_path, database_url, "apikey", "list")
    assert "radiology-ws" in listed.stdout and "dicomweb:read dicomweb:write" in listed.stdout
    assert "active" in listed.stdout and key not in listed.stdout

    with LiveServer(gateway) as live:
        assert get_studies(live, key) == 200
        revoked = cli(tmp_path, database_url, "apikey", "revoke", "radiology-ws")
        assert revoked.returncode == 0, revoked.stderr
        assert get_studies(live, key) == 401  # at once, no restart
    assert "revoked" in cli(tmp_path, database_url, "apikey", "list").stdout
    again = cli(tmp_path, database_url, "apikey", "revoke", "radiology-ws")
    assert again.returncode == 2 and "no active API key" in again.stderr
    bad = cli(tmp_path, database_url, "apikey", "create", "--name", "x", "--scopes", "superuser")
    assert bad.returncode == 2 and "unknown scope superuser" in bad.stderr


def test_key_rules(gateway: Gateway) -> None:
    keys = ApiKeys(gateway.index)
    key = keys.create("a", "dicomweb:read")
    with pytest.raises(Conflict, match="already exists"):
        keys.create("a", "dicomweb:read")
    with pytest.raises(InvalidScope, match="at least one scope"):
        keys.create("b", "")
    assert keys.principal(key) is not None
    assert keys.principal(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert "dgw_" not in repr(key)
    with pytest.raises(NotFound):
        keys.revoke("nobody")


def test_scopes_are_enforced(live: LiveServer) -> None:
    keys = ApiKeys(live.gateway.index)
    links_only = keys.create("portal", "links:mint")
    reply = raw(live.http_url + "/dicomweb/studies",
                headers={"Authorization": f"Bearer {links_only}"})
    assert reply.status == 403
    assert reply.headers["Content-Type"] == "application/problem+json"
    assert "dicomweb:read" in json.loads(reply.body)["detail"]
    admin = keys.create("ops", "admin")
    assert get_studies(live, admin) == 200  # admin implies every scope


def test_no_credential_is_401_unless_demo(live: LiveServer, tmp_path: Path,
                                          database_url: str) -> None:
    reply = raw(live.http_url + "/dicomweb/studies")
    assert reply.status == 401
    assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    assert json.loads(reply.body)["title"] == "Unauthorized"
    assert get_studies(live, "dgw_0000000000000000_nonsensenonsensenonsense") == 401
    assert raw(live.http_url + "/dicomweb/studies",
               headers={"Authorization": "Basic dXNlcjpwYXNz"}).status == 401
    settings = make_settings(tmp_path / "demo", database_url, GATEWAY_DEMO="1")
    with Gateway(settings) as gateway, LiveServer(gateway) as demo:
        assert raw(demo.http_url + "/dicomweb/studies").status == 200
        # Demo users may read and write, not delete.
        assert raw(demo.http_url + "/dicomweb/studies/1.2.3", method="DELETE").status == 403


SECRET = "a-test-secret-of-enough-length-for-hs256"


@pytest.fixture
def jwt_live(tmp_path: Path, database_url: str):  # noqa: ANN201
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[auth]\njwt_audience = "dicom-gateway"\n'
        f'[auth.jwt_keys.k2026]\nalgorithm = "HS256"\nkey = "{SECRET}"\n')
    settings = make_settings(tmp_path, database_url, GATEWAY_CONFIG=str(config))
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        yield live


def token(**claims: object) -> str:
    body = {"sub": "ris-1", "aud": "dicom-gateway", "exp": int(time.time()) + 300,
            "iat": int(time.time()),
            "scope": "dicomweb:read", **claims}
    return jwt.encode(body, SECRET, algorithm="HS256", headers={"kid": "k2026"})


def test_jwt_bearer(jwt_live: LiveServer) -> None:
    assert get_studies(jwt_live, token()) == 200
    assert get_studies(jwt_live, token(scope="links:mint")) == 403
    assert get_studies(jwt_live, token(scopes=["dicomweb:read"], scope=None)) == 200
    assert get_studies(jwt_live, token(scope=42)) == 401
    assert get_studies(jwt_live, token(exp=int(time.time()) - 3600)) == 401
    assert get_studies(jwt_live, token(aud="someone-else")) == 401
    wrong_kid = jwt.encode({"sub": "x", "exp": int(time.time()) + 60, "aud": "dicom-gateway"},
                           SECRET, algorithm="HS256", headers={"kid": "other"})
    assert get_studies(jwt_live, wrong_kid) == 401
    forged = jwt.encode({"sub": "x", "exp": int(time.time()) + 60, "aud": "dicom-gateway",
                         "scope": "admin"}, "not-the-secret-but-long-enough-key",
                        algorithm="HS256", headers={"kid": "k2026"})
    reply = raw(jwt_live.http_url + "/dicomweb/studies",
                headers={"Authorization": f"Bearer {forged}"})
    assert reply.status == 401 and forged not in reply.body.decode()
    unsigned = jwt.encode({"sub": "x", "exp": int(time.time()) + 60, "scope": "admin"}, None,
                          algorithm="none", headers={"kid": "k2026"})
    assert get_studies(jwt_live, unsigned) == 401


@pytest.mark.parametrize("spec", [{"algorithm": "none", "key": ""},
                                  {"algorithm": "None", "key": "x"},
                                  {"algorithm": "HS257", "key": "secret"},
                                  {"algorithm": "HS256", "key": "  "}])
def test_jwt_keys_without_a_real_signature_are_refused(spec: dict[str, str]) -> None:
    """alg "none" with an empty key would accept unsigned tokens: a settings error instead."""
    from gateway.auth import load_jwt_keys
    from gateway.config import SettingsError

    with pytest.raises(SettingsError, match="k1"):
        load_jwt_keys({"k1": spec})
