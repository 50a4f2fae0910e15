"""The FHIR R4 read side: ``ImagingStudy`` search and read, mounted at ``/fhir``.

``GET /fhir/ImagingStudy?patient=<PatientID>`` answers a ``searchset`` Bundle and
``GET /fhir/ImagingStudy/<StudyInstanceUID>`` one ImagingStudy, as ``application/fhir+json``
(FHIR R4 RESTful API, http://hl7.org/fhir/R4/http.html). The resources are built by the core
(:mod:`gateway.fhir`) from the index under the same access rules as QIDO-RS: the caller
authenticates as for DICOMweb (bearer API key or JWT with ``dicomweb:read``, or a viewer-session
cookie, which sees its own study only), and each search or read is recorded in the access trail
as a Query (PS3.15 A.5.3.12), as QIDO-RS is. Errors are OperationOutcome resources with the HTTP
status and headers of the same error on DICOMweb and the portal API (:mod:`gateway.http_status`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from dicomweb.app import build
from dicomweb.context import GATEWAY, audit, base_url, require
from dicomweb.media import parse_accept
from dicomweb.problems import error_middleware
from gateway import __version__, fhir
from gateway.access import AccessPolicy, Scope
from gateway.audit import Action, AuditSink
from gateway.core import Gateway
from gateway.errors import InvalidQueryParameter
from gateway.http_status import HTTPProblem, Problem
from gateway.uids import is_valid_uid

logger = logging.getLogger(__name__)

MOUNT = "/fhir"
MEDIA_FHIR_JSON = fhir.MEDIA_FHIR_JSON
# What a client may ask for instead of application/fhir+json (FHIR R4 http.html#mime-type).
ACCEPTED_MEDIA = (MEDIA_FHIR_JSON, "application/json", "application/*", "*/*")
ACCEPTED_FORMATS = frozenset({"json", "application/json", MEDIA_FHIR_JSON})
SEARCH_PARAMETERS = frozenset({"patient", "_id", "_count", "_offset", "_format"})


def fhir_response(body: dict[str, Any], status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(body, ensure_ascii=False).encode(),
                        headers={"Content-Type": f"{MEDIA_FHIR_JSON}; charset=utf-8",
                                 **(headers or {})})


def outcome_response(found: Problem) -> web.Response:
    """The OperationOutcome of an error, with its status and headers (FHIR R4 http.html)."""
    return fhir_response(fhir.operation_outcome(found.status, found.detail), found.status,
                         dict(found.headers))


outcome_middleware = error_middleware(outcome_response)


def _negotiate(request: web.Request) -> None:
    """Accept JSON only (``application/fhir+json``, ``application/json``, ``_format=json``)."""
    wanted = request.query.get("_format")
    if wanted is not None:
        if wanted not in ACCEPTED_FORMATS:
            raise HTTPProblem(406, f"_format={wanted} is not served; this server answers "
                                   f"{MEDIA_FHIR_JSON} only")
        return
    header = request.headers.get("Accept")
    if not header:
        return
    if not any(media.media_type in ACCEPTED_MEDIA for media in parse_accept(header)):
        raise HTTPProblem(406, f"this server answers {MEDIA_FHIR_JSON} only")


def _fhir_base(request: web.Request) -> str:
    return base_url(request).removesuffix("/dicomweb") + MOUNT


def _integer(name: str, text: str, maximum: int) -> int:
    if not text.isdigit() or int(text) > maximum:
        raise InvalidQueryParameter(name, f"{name} must be an integer from 0 to {maximum}")
    return int(text)


async def search_imaging_studies(request: web.Request) -> web.Response:
    """``GET /fhir/ImagingStudy`` (FHIR R4 search; parameters ``patient``, ``_id``,
    ``_count``, ``_offset``). Other parameters are refused (400) rather than ignored, so a
    misspelled filter cannot widen the result to every study the caller may see."""
    who = require(request, Scope.DICOMWEB_READ)
    _negotiate(request)
    for name in request.query:
        if name not in SEARCH_PARAMETERS:
            raise InvalidQueryParameter(
                name, f"unknown search parameter {name!r}; ImagingStudy supports "
                      f"{', '.join(sorted(SEARCH_PARAMETERS))}")
    settings = request.config_dict[GATEWAY].settings
    # The largest page, as for QIDO-RS; FHIR pages stay bounded even where QIDO-RS's are not.
    maximum = settings.http.max_results or fhir.DEFAULT_COUNT
    count = _integer("_count", request.query.get("_count", str(min(fhir.DEFAULT_COUNT,
                                                                     maximum))), maximum)
    offset = _integer("_offset", request.query.get("_offset", "0"), 2**31 - 1)
    patient = request.query.get("patient")
    parameter = fhir.PatientParameter.parse(patient) if patient is not None else None
    study_uid = request.query.get("_id")
    if study_uid is not None and not is_valid_uid(study_uid):
        raise InvalidQueryParameter("_id", "_id must be a Study Instance UID")
    gateway = request.config_dict[GATEWAY]
    result = await asyncio.to_thread(
        fhir.search, gateway.index, who, base_url(request), patient=parameter,
        study_uid=study_uid, count=count, offset=offset)
    base = _fhir_base(request)
    query = {k: v for k, v in request.query.items() if k != "_offset"}
    self_url = f"{base}/ImagingStudy" + (f"?{urlencode(request.query)}" if request.query else "")
    next_url = None
    if offset + count < result.total and count:
        next_url = f"{base}/ImagingStudy?{urlencode({**query, '_offset': offset + count})}"
    await audit(request, Action.QUERY, result.study_uids,
                detail=f"FHIR ImagingStudy search, {len(result.resources)} matches")
    return fhir_response(fhir.bundle(result.resources, result.total, self_url, base, next_url))


async def read_imaging_study(request: web.Request) -> web.Response:
    """``GET /fhir/ImagingStudy/{id}`` (FHIR R4 read; the id is the Study Instance UID)."""
    who = require(request, Scope.DICOMWEB_READ)
    _negotiate(request)
    study_uid = request.match_info["id"]
    gateway = request.config_dict[GATEWAY]
    resource = await asyncio.to_thread(fhir.read, gateway.index, who, study_uid,
                                       base_url(request))
    await audit(request, Action.QUERY, (study_uid,), detail="FHIR ImagingStudy read")
    return fhir_response(resource)


async def capabilities(request: web.Request) -> web.Response:
    """``GET /fhir/metadata``: the CapabilityStatement (any authenticated caller)."""
    _negotiate(request)
    return fhir_response(fhir.capability_statement(_fhir_base(request), __version__))


def create_app(gateway: Gateway, access_policy: AccessPolicy | None = None,
               audit_sink: AuditSink | None = None) -> web.Application:
    """Build the FHIR application (to be mounted at :data:`MOUNT` by the composition root).

    Parameters are those of :func:`dicomweb.app.create_app`: the same principals and trail.
    """
    app = build(gateway, access_policy, audit_sink, errors=outcome_middleware)
    app.router.add_get("/ImagingStudy", search_imaging_studies)
    app.router.add_get("/ImagingStudy/{id}", read_imaging_study)
    app.router.add_get("/metadata", capabilities)
    return app


__all__ = ["MOUNT", "create_app", "read_imaging_study", "search_imaging_studies"]
