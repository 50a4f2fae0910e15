"""Attacks on viewer links, the IID launch and the portal API, replayed over real HTTP against a
live gateway (docs/security-links-part.md): each test failed on the code before its fix."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from gateway.apikeys import ApiKeys
from tests.links_helpers import (
    Client,
    fake_viewer,
    links_settings,
    live_links,
    load,
    small_study,
)

PATIENT = "LU0000001"


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> Iterator[dict[str, Any]]:
    settings = links_settings(tmp_path, database_url, fake_viewer(tmp_path / "viewer"))
    with live_links(settings) as (server, gateway, tokens):
        study = load(gateway, small_study(PATIENT, "ACC1"))
        portal = Client(server.http_url, bearer=tokens["portal"])
        assert portal.request("PUT", f"/api/patients/{PATIENT}/dsp",
                              {"created": "2020-01-01"}).status == 200
        yield {"server": server, "gateway": gateway, "tokens": tokens, "study": study,
               "portal": portal, "browser": Client(server.http_url)}


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
