"""One HTTP edge: a core error gets the same status, headers and document on every route.

``/dicomweb`` and ``/api`` answer ``application/problem+json`` (RFC 9457) with the same members
for the same error; ``/fhir`` wraps the same status and detail in an OperationOutcome. The
status comes from one table in the core (:mod:`gateway.http_status`).
"""

from __future__ import annotations

from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from fhir.resources.R4B.operationoutcome import OperationOutcome

from dicomweb.fhir import outcome_middleware
from dicomweb.problems import problem_middleware
from gateway.errors import GatewayError, StorageFull, Unavailable
from gateway.http_status import REALM, RETRY_AFTER_SECONDS
from tests.support.links_helpers import Reply, links_env

UNKNOWN_STUDY = "1.2.826.0.1.3680043.8.498.999"
UNKNOWN_KEY = "dgw_0123456789abcdef_" + "x" * 32
PROBLEM_MEMBERS = {"type", "title", "status", "detail"}


@pytest.fixture
def edge(tmp_path: Path, database_url: str) -> Iterator[dict[str, Any]]:
    with links_env(tmp_path, database_url) as env:
        yield {"client": env["browser"], **env["tokens"]}


# error -> (credential, request) on each front end: the same core error raised on each.
# "portal" holds links:mint, audit:read, policy:write; "reader" holds dicomweb:read.
CASES: dict[str, dict[str, tuple[str | None, str, str, dict[str, str] | None]]] = {
    "Unauthorized, no credential": {
        "dicomweb": (None, "GET", "/dicomweb/studies", None),
        "fhir": (None, "GET", "/fhir/ImagingStudy", None),
        "api": (None, "GET", "/api/links", None),
    },
    "Unauthorized, unknown API key": {
        "dicomweb": (UNKNOWN_KEY, "GET", "/dicomweb/studies", None),
        "fhir": (UNKNOWN_KEY, "GET", "/fhir/ImagingStudy", None),
        "api": (UNKNOWN_KEY, "GET", "/api/links", None),
    },
    "Forbidden, scope missing": {
        "dicomweb": ("portal", "GET", "/dicomweb/studies", None),
        "fhir": ("portal", "GET", "/fhir/ImagingStudy", None),
        "api": ("reader", "GET", "/api/links", None),
    },
    "NotFound": {
        "dicomweb": ("reader", "GET", f"/dicomweb/studies/{UNKNOWN_STUDY}/metadata", None),
        "fhir": ("reader", "GET", f"/fhir/ImagingStudy/{UNKNOWN_STUDY}", None),
        "api": ("portal", "PUT", f"/api/studies/{UNKNOWN_STUDY}/confidentiality",
                {"level": "normal"}),
    },
    "InvalidQuery": {
        "dicomweb": ("reader", "GET", "/dicomweb/studies?limit=many", None),
        "fhir": ("reader", "GET", "/fhir/ImagingStudy?_count=many", None),
        "api": ("portal", "GET", "/api/audit?patient=", None),
    },
}
STATUS = {"Unauthorized, no credential": 401, "Unauthorized, unknown API key": 401,
          "Forbidden, scope missing": 403, "NotFound": 404, "InvalidQuery": 400}


def send(edge: dict[str, Any], case: tuple[str | None, str, str, Any]) -> Reply:
    who, method, path, body = case
    token = edge.get(who, who) if who else None
    reply: Reply = edge["client"].request(method, path, body, bearer=token or "")
    return reply


def problem_of(reply: Reply) -> dict[str, Any]:
    assert reply.headers["Content-Type"].startswith("application/problem+json"), reply.headers
    body: dict[str, Any] = reply.json()
    assert PROBLEM_MEMBERS <= body.keys(), body
    assert body["status"] == reply.status
    assert body["title"] == HTTPStatus(reply.status).phrase
    return body


@pytest.mark.parametrize("error", sorted(CASES))
def test_a_core_error_is_answered_alike_on_every_front_end(edge: dict[str, Any],
                                                           error: str) -> None:
    replies = {front: send(edge, case) for front, case in CASES[error].items()}
    assert {front: reply.status for front, reply in replies.items()} == dict.fromkeys(
        replies, STATUS[error]), {f: r.text[:300] for f, r in replies.items()}
    dicomweb, api = problem_of(replies["dicomweb"]), problem_of(replies["api"])
    assert dicomweb.keys() - {"parameter"} == api.keys() - {"parameter", "reason"}
    assert dicomweb["title"] == api["title"]
    outcome = replies["fhir"]
    assert outcome.headers["Content-Type"].startswith("application/fhir+json")
    OperationOutcome.model_validate(outcome.json())
    assert outcome.json()["issue"][0]["diagnostics"]
    if STATUS[error] == 401:  # the same credential: the same message and the same challenge
        assert dicomweb["detail"] == api["detail"]
        assert outcome.json()["issue"][0]["diagnostics"] == api["detail"]
        challenges = {reply.headers["WWW-Authenticate"] for reply in replies.values()}
        assert challenges == {f'Bearer realm="{REALM}"'}


@pytest.mark.parametrize(("error", "status", "headers"), [
    (Unavailable("the object store does not answer"), 503,
     {"Retry-After": str(RETRY_AFTER_SECONDS)}),
    (StorageFull("the data folder is full"), 507, {}),
    (GatewayError("a core error no row of the table names"), 500, {}),
])
async def test_the_unreachable_errors_take_the_tables_status_on_both_renderings(
        error: Exception, status: int, headers: dict[str, str]) -> None:
    """Errors no request can cause on demand here (a store down, a disk full, one the table
    does not name), raised by a route behind each front end's error middleware."""

    async def failing(request: web.Request) -> web.Response:
        raise error

    for middleware, media in ((problem_middleware, "application/problem+json"),
                              (outcome_middleware, "application/fhir+json")):
        app = web.Application(middlewares=[middleware])
        app.router.add_get("/x", failing)
        async with TestServer(app, host="127.0.0.1") as server, ClientSession() as session:
            async with session.get(server.make_url("/x")) as reply:
                assert reply.status == status
                assert reply.headers["Content-Type"].startswith(media)
                for name, value in headers.items():
                    assert reply.headers[name] == value
                assert "Retry-After" in reply.headers or status != 503
                text = await reply.text()
                if status == 500:  # the message of an unmapped error stays in the log
                    assert "no row" not in text and "server log" in text
                else:
                    assert str(error) in text
