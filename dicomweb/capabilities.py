"""Retrieve Capabilities (PS3.18 §8.9): ``OPTIONS /dicomweb/`` answers a WADL document.

The document lists the resources and methods of this origin server with their media types
(PS3.18 §8.9.1, Table 8.9.1-1: ``application/vnd.sun.wadl+xml``). It names no patient data; an
authenticated caller of any scope may read it.
"""

from __future__ import annotations

from xml.sax.saxutils import quoteattr

from aiohttp import web

from dicomweb.context import base_url
from dicomweb.media import (
    MEDIA_DICOM,
    MEDIA_DICOM_JSON,
    MEDIA_DICOM_XML,
    MEDIA_OCTET_STREAM,
    accept_of,
    not_acceptable,
)

MEDIA_WADL = "application/vnd.sun.wadl+xml"
MULTIPART_DICOM = f'multipart/related; type="{MEDIA_DICOM}"'
MULTIPART_XML = f'multipart/related; type="{MEDIA_DICOM_XML}"'
MULTIPART_OCTETS = f'multipart/related; type="{MEDIA_OCTET_STREAM}"'

SEARCH_TYPES = (MEDIA_DICOM_JSON, MULTIPART_XML)
# path -> [(method, transaction, response media types)]
RESOURCES: dict[str, list[tuple[str, str, tuple[str, ...]]]] = {
    "studies": [("GET", "SearchForStudies", SEARCH_TYPES),
                ("POST", "StoreInstances", (MEDIA_DICOM_JSON, MEDIA_DICOM_XML))],
    "series": [("GET", "SearchForSeries", SEARCH_TYPES)],
    "instances": [("GET", "SearchForInstances", SEARCH_TYPES)],
    "studies/{study}": [("GET", "RetrieveStudy", (MULTIPART_DICOM,)),
                        ("POST", "StoreInstancesInStudy", (MEDIA_DICOM_JSON, MEDIA_DICOM_XML)),
                        ("DELETE", "DeleteStudy", ())],
    "studies/{study}/metadata": [("GET", "RetrieveStudyMetadata", (MEDIA_DICOM_JSON,))],
    "studies/{study}/series": [("GET", "SearchForStudySeries", SEARCH_TYPES)],
    "studies/{study}/instances": [("GET", "SearchForStudyInstances", SEARCH_TYPES)],
    "studies/{study}/series/{series}": [("GET", "RetrieveSeries", (MULTIPART_DICOM,)),
                                        ("DELETE", "DeleteSeries", ())],
    "studies/{study}/series/{series}/metadata": [
        ("GET", "RetrieveSeriesMetadata", (MEDIA_DICOM_JSON,))],
    "studies/{study}/series/{series}/instances": [
        ("GET", "SearchForSeriesInstances", SEARCH_TYPES)],
    "studies/{study}/series/{series}/instances/{instance}": [
        ("GET", "RetrieveInstance", (MULTIPART_DICOM, MEDIA_DICOM)),
        ("DELETE", "DeleteInstance", ())],
    "studies/{study}/series/{series}/instances/{instance}/metadata": [
        ("GET", "RetrieveInstanceMetadata", (MEDIA_DICOM_JSON,))],
    "studies/{study}/series/{series}/instances/{instance}/bulk/{path}": [
        ("GET", "RetrieveBulkdata", (MULTIPART_OCTETS, MEDIA_OCTET_STREAM))],
}


def wadl(base: str) -> bytes:
    """The WADL document of this server, rooted at ``base``.

    >>> b'id="SearchForStudies"' in wadl("http://h/dicomweb")
    True
    """
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           '<application xmlns="http://wadl.dev.java.net/2009/02">',
           f"<resources base={quoteattr(base + '/')}>"]
    for path, methods in RESOURCES.items():
        out.append(f"<resource path={quoteattr(path)}>")
        for name in ("study", "series", "instance", "path"):
            if "{" + name + "}" in path:
                out.append(f'<param name="{name}" style="template" required="true"/>')
        for method, transaction, media_types in methods:
            out.append(f'<method name="{method}" id="{transaction}">')
            if media_types:
                out.append("<response>")
                out.extend(f"<representation mediaType={quoteattr(m)}/>" for m in media_types)
                out.append("</response>")
            out.append("</method>")
        out.append("</resource>")
    out.append("</resources></application>")
    return "\n".join(out).encode()


async def retrieve_capabilities(request: web.Request) -> web.Response:
    """``OPTIONS /dicomweb/`` (PS3.18 §8.9)."""
    for media in accept_of(request):
        if media.matches(MEDIA_WADL) or media.media_type in ("application/xml", "text/xml"):
            break
    else:
        raise not_acceptable(f"capabilities are described as {MEDIA_WADL}")
    return web.Response(body=wadl(base_url(request)), headers={
        "Content-Type": MEDIA_WADL, "Allow": "GET, POST, DELETE, OPTIONS"})


def add_routes(app: web.Application) -> None:
    app.router.add_route("OPTIONS", "/", retrieve_capabilities)
