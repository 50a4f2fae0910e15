"""QIDO-RS: search for studies, series and instances (PS3.18 §10.6).

All six resources of PS3.18 Table 10.6.1-2. Matching and return attributes are the shared engine
:mod:`gateway.query`; this module only speaks HTTP: path UIDs, media types, ``Warning`` headers,
the empty result, and the audit record (PS3.15 A.5.3.12, Query).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from dicomweb.context import GATEWAY, audit, base_url, require
from dicomweb.media import (
    MEDIA_DICOM_JSON,
    MEDIA_DICOM_XML,
    MEDIA_JSON,
    MULTIPART_RELATED,
    accept_of,
    closing_delimiter,
    multipart_content_type,
    new_boundary,
    not_acceptable,
    part_header,
)
from dicomweb.xml import to_native_xml
from gateway.access import Scope
from gateway.audit import Action
from gateway.query import Level, QueryEngine, QueryResult, parse_qido
from gateway.uids import validate_uid

logger = logging.getLogger(__name__)

QUERY_ENGINE = web.AppKey("query_engine", QueryEngine)

# PS3.18 §8.3.4.4: the Warning text when a result is cut at the server's maximum or the limit.
WARNING_MORE_RESULTS = ('299 {host}: "The number of results exceeded the maximum supported by '
                        'the server. Additional results can be requested."')


def _negotiate(request: web.Request) -> str:
    """``json`` or ``xml``, from the Accept header (PS3.18 §10.6.1.2 / Table 8.7.4-2)."""
    for media in accept_of(request):
        if media.matches(MEDIA_DICOM_JSON) or media.media_type == MEDIA_JSON:
            return "json"
        if media.media_type == MULTIPART_RELATED and media.params.get("type") == MEDIA_DICOM_XML:
            return "xml"
    raise not_acceptable(
        'QIDO-RS answers application/dicom+json or multipart/related; '
        'type="application/dicom+xml"')


async def _search(request: web.Request, level: Level, study: str | None = None,
                  series: str | None = None) -> web.Response:
    who = require(request, Scope.DICOMWEB_READ)
    if study is not None:
        validate_uid(study, "StudyInstanceUID")
    if series is not None:
        validate_uid(series, "SeriesInstanceUID")
    form = _negotiate(request)
    query = parse_qido(level, request.query.items(), study_uid=study, series_uid=series)
    engine = request.config_dict[QUERY_ENGINE]
    result: QueryResult = await asyncio.to_thread(
        engine.search, query, who, retrieve_base=base_url(request))
    headers: dict[str, str] = {}
    warnings = []
    host = request.host
    if result.truncated:
        warnings.append(WARNING_MORE_RESULTS.format(host=host))
    warnings.extend(f'299 {host}: "{w}"' for w in result.warnings)
    if warnings:
        headers["Warning"] = ", ".join(warnings)
    # The trail entry is written while the body is encoded; it is committed before the
    # response leaves (the record precedes the disclosure).
    recording = asyncio.create_task(audit(
        request, Action.QUERY, result.study_uids,
        detail=f"{level.value} query, {len(result.matches)} matches",
        patients=_patients_of(result.matches)))
    try:
        # PS3.18 §8.3.4.4.1 as corrected by CP-2473: a search with no match answers 200 (OK)
        # with an empty result (an empty JSON array), not 204.
        if form == "xml":
            response = _xml_response(result, headers)
        else:
            body = json.dumps(result.matches, ensure_ascii=False, separators=(",", ":")).encode()
            headers["Content-Type"] = MEDIA_DICOM_JSON
            response = web.Response(body=body, headers=headers)
    finally:
        await recording
    return response


def _patients_of(matches: list[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    """(StudyInstanceUID, PatientID) of the matches that carry both, for the trail."""
    pairs = []
    for match in matches:
        study = match.get("0020000D", {}).get("Value")
        patient = match.get("00100020", {}).get("Value")
        if study and patient and isinstance(patient[0], str):
            pairs.append((study[0], patient[0]))
    return tuple(pairs)


def _xml_response(result: QueryResult, headers: dict[str, str]) -> web.Response:
    boundary = new_boundary()
    chunks = []
    for match in result.matches:
        chunks.append(part_header(boundary, f"{MEDIA_DICOM_XML}; charset=utf-8"))
        chunks.append(to_native_xml(match))
        chunks.append(b"\r\n")
    chunks.append(closing_delimiter(boundary))
    headers["Content-Type"] = multipart_content_type(boundary, MEDIA_DICOM_XML)
    return web.Response(body=b"".join(chunks), headers=headers)


async def search_for_studies(request: web.Request) -> web.Response:
    """``GET /studies`` (PS3.18 §10.6.1)."""
    return await _search(request, Level.STUDY)


async def search_for_series(request: web.Request) -> web.Response:
    """``GET /series`` and ``GET /studies/{study}/series``."""
    return await _search(request, Level.SERIES, request.match_info.get("study"))


async def search_for_instances(request: web.Request) -> web.Response:
    """``GET /instances``, ``/studies/{s}/instances`` and ``/studies/{s}/series/{se}/instances``."""
    return await _search(request, Level.IMAGE, request.match_info.get("study"),
                         request.match_info.get("series"))


def add_routes(app: web.Application) -> None:
    gateway = app[GATEWAY]
    app[QUERY_ENGINE] = QueryEngine(gateway.index, max_results=gateway.settings.http.max_results,
                                    max_scanned=gateway.settings.http.max_sequence_scan)
    router = app.router
    router.add_get("/studies", search_for_studies)
    router.add_get("/series", search_for_series)
    router.add_get("/instances", search_for_instances)
    router.add_get("/studies/{study}/series", search_for_series)
    router.add_get("/studies/{study}/instances", search_for_instances)
    router.add_get("/studies/{study}/series/{series}/instances", search_for_instances)


__all__ = ["QUERY_ENGINE", "add_routes"]
