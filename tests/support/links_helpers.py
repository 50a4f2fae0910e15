"""Helpers of the viewer-link tests: a live gateway with [links] keys, a raw HTTP client, tokens."""

from __future__ import annotations

import http.client
import json
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from gateway.apikeys import ApiKeys
from gateway.config import Settings
from gateway.core import Gateway
from sample_dicom.generator import SeriesSpec, StudySpec, generate_study
from tests.support.common import LiveServer, make_settings, part10

HS_OLD = "o" * 40
HS_NEW = "n" * 40
AUDIENCE = "dicom-gateway"
ED_PRIVATE = ed25519.Ed25519PrivateKey.generate()
EC_PRIVATE = ec.generate_private_key(ec.SECP256R1())
STRANGER = ed25519.Ed25519PrivateKey.generate()  # a key the gateway does not know


def pem(private: Any) -> str:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def links_toml(viewer_dir: Path | None, *, keep_old: bool = True, extra: str = "") -> str:
    keys = []
    if keep_old:
        keys.append(f'[[links.keys]]\nkid = "gw-old"\nalg = "HS256"\nsecret = "{HS_OLD}"\n')
    keys.append(f'[[links.keys]]\nkid = "gw-new"\nalg = "HS256"\nsecret = "{HS_NEW}"\n')
    for kid, alg, private in (("portal-ed", "EdDSA", ED_PRIVATE),
                              ("portal-ec", "ES256", EC_PRIVATE)):
        keys.append(f'[[links.keys]]\nkid = "{kid}"\nalg = "{alg}"\n'
                    f'public_key = """{pem(private)}"""\n')
    viewer = f'viewer_dir = "{viewer_dir}"\n' if viewer_dir else ""
    return (f'[links]\nsigning_kid = "gw-new"\nleeway = 30\nmax_ttl = 7200\n{viewer}{extra}\n'
            + "\n".join(keys))


def links_settings(tmp_path: Path, database_url: str, viewer_dir: Path | None,
                   **kwargs: Any) -> Settings:
    config = tmp_path / f"gateway-{uuid.uuid4().hex[:6]}.toml"
    config.write_text(links_toml(viewer_dir, **kwargs))
    return make_settings(tmp_path, database_url, GATEWAY_CONFIG=str(config))


def fake_viewer(folder: Path) -> Path:
    """A stand-in OHIF build (an index page and a hashed asset), for tests of the hosting."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.html").write_text('<!doctype html><script src="/app-config.js"></script>'
                                       '<div id="root">OHIF</div>')
    (folder / "app.bundle.0123456789abcdef.js").write_text("console.log('ohif');")
    (folder / "manifest.json").write_text("{}")
    return folder


def small_study(patient_id: str, accession: str, study_date: str = "20240315",
                *, seed: int = 1, key_object: bool = True) -> list[Any]:
    spec = StudySpec(patient_id=patient_id, accession_number=accession, study_date=study_date,
                     series=(SeriesSpec(instances=3, rows=32, columns=32),
                             SeriesSpec(instances=2, rows=32, columns=32,
                                        description="Kopf Knochen")),
                     key_object=key_object)
    return generate_study(spec, seed=seed)


def load(gateway: Gateway, datasets: list[Any]) -> str:
    for ds in datasets:
        gateway.ingestor.ingest(part10(ds), source="test")
    return str(datasets[0].StudyInstanceUID)


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


@dataclass
class Client:
    """Raw HTTP/1.1 to the live gateway (no redirects followed, cookies kept by hand)."""

    base: str
    bearer: str | None = None
    cookies: dict[str, str] = field(default_factory=dict)

    def request(self, method: str, path: str, body: Any = None,
                headers: Mapping[str, str] | None = None, bearer: str | None = None,
                cookie: bool = True) -> Reply:
        parts = urlsplit(self.base)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
        sent = dict(headers or {})
        token = bearer if bearer is not None else self.bearer
        if token:
            sent["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        if cookie and self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        try:
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            return Reply(response.status, response.headers, response.read())
        finally:
            conn.close()


def cookie_of(reply: Reply, name: str = "gw_session") -> tuple[str, str]:
    """The value and the attributes of a Set-Cookie header."""
    for header in reply.headers.get_all("Set-Cookie") or []:
        if header.startswith(f"{name}="):
            value, _, attributes = header.partition(";")
            return value.split("=", 1)[1], attributes
    raise AssertionError(f"no {name} cookie in {reply.headers}")


def portal_token(study: str, *, key: Any = ED_PRIVATE, kid: str = "portal-ed",
                 algorithm: str = "EdDSA", rel: str = "patient", sub: str = "LU0000001",
                 ttl: int = 600, nbf_offset: int = 0, exp_offset: int | None = None,
                 audience: str = AUDIENCE, max_uses: int | None = None,
                 kio: bool = False, **claims: Any) -> str:
    """A link as a portal signs it itself."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "aud": audience, "sub": sub, "name": "Zoé Müller", "rel": rel, "study": study,
        "kio": kio, "iat": now, "nbf": now + nbf_offset,
        "exp": now + (ttl if exp_offset is None else exp_offset), "jti": uuid.uuid4().hex,
        **claims,
    }
    if max_uses is not None:
        payload["max_uses"] = max_uses
    return jwt.encode(payload, key, algorithm=algorithm, headers={"kid": kid})


@contextmanager
def live_links(settings: Settings) -> Iterator[tuple[LiveServer, Gateway, dict[str, str]]]:
    """A live gateway with two API keys: ``portal`` (links:mint audit:read policy:write) and
    ``reader`` (dicomweb:read)."""
    gateway = Gateway(settings).open()
    try:
        keys = ApiKeys(gateway.index)
        suffix = uuid.uuid4().hex[:6]
        tokens = {"portal": str(keys.create(f"portal-{suffix}",
                                               "links:mint,audit:read,policy:write")),
                  "reader": str(keys.create(f"reader-{suffix}", "dicomweb:read"))}
        with LiveServer(gateway) as server:
            yield server, gateway, tokens
    finally:
        gateway.close()


@contextmanager
def links_env(tmp_path: Path, database_url: str, *,
              studies: Mapping[str, list[Any]] | None = None,
              datasets: Mapping[str, list[Any]] | None = None,
              dsp_patients: tuple[str, ...] = (), extra_toml: str = "",
              viewer_dir: Path | None = None) -> Iterator[dict[str, Any]]:
    """A live gateway with [links] keys, studies loaded and DSP dates set, as a dict.

    The dict holds ``server``, ``gateway``, ``tokens`` (see `live_links`), the clients
    ``portal`` and ``reader`` (bearing those keys) and ``browser`` (none), then each of
    ``studies`` under its name as its Study Instance UID and each of ``datasets`` under its
    name as the data sets themselves; both are loaded, in that order. Each patient of
    ``dsp_patients`` gets the DSP date 2020-01-01 through the portal API. The viewer is a
    stand-in (`fake_viewer`) unless ``viewer_dir`` names a real one.
    """
    viewer = viewer_dir if viewer_dir is not None else fake_viewer(tmp_path / "viewer")
    settings = links_settings(tmp_path, database_url, viewer, extra=extra_toml)
    with live_links(settings) as (server, gateway, tokens):
        env: dict[str, Any] = {
            "server": server, "gateway": gateway, "tokens": tokens,
            "portal": Client(server.http_url, bearer=tokens["portal"]),
            "reader": Client(server.http_url, bearer=tokens["reader"]),
            "browser": Client(server.http_url)}
        for name, study in (studies or {}).items():
            env[name] = load(gateway, study)
        for name, study in (datasets or {}).items():
            load(gateway, study)
            env[name] = study
        for patient in dsp_patients:
            reply = env["portal"].request("PUT", f"/api/patients/{patient}/dsp",
                                          {"created": "2020-01-01"})
            assert reply.status == 200, reply.text
        yield env
