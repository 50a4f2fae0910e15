"""CORS for the configured origins only (``[http] cors_origins``; none by default), on
``/dicomweb`` and ``/fhir``.

The middleware answers preflights before authentication; the headers of an allowed
cross-origin request are added as the response is prepared (:func:`on_response_prepare`), so
error responses and streamed bodies, which handlers prepare themselves, carry them too.
"""

from __future__ import annotations

from aiohttp import web

from dicomweb.context import GATEWAY, Handler
from dicomweb.problems import problem_response
from gateway.http_status import problem

CORS = web.RequestKey("cors", tuple[str, bool])

# Request headers a browser may send cross-origin (preflight, Fetch standard §3.2.3).
CORS_ALLOW_HEADERS = "Accept, Authorization, Content-Type, If-None-Match, If-Modified-Since"
CORS_EXPOSE_HEADERS = "ETag, Warning, Content-Location, Location, Content-Length"
CORS_ALLOW_METHODS = "GET, HEAD, POST, DELETE, OPTIONS"
CORS_MAX_AGE = "600"


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """CORS for the configured origins only; preflights are answered before authentication.

    Outermost; the headers are added as the response is prepared, so error responses
    (problem+json) and streamed bodies carry them too and a browser can read them.
    """
    origins = request.config_dict[GATEWAY].settings.http.cors_origins
    origin = request.headers.get("Origin")
    listed = origin is not None and origin in origins
    allowed = listed or (origin is not None and "*" in origins)
    # Credentials (the viewer-session cookie) only for origins named one by one: "*" lets any
    # site read with a bearer token it holds itself, never with the browser's cookie.
    credentials = listed
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        if not allowed:
            return problem_response(problem(403, "cross-origin requests from this origin are "
                                                 "not allowed (http.cors_origins)"))
        headers = {
            "Access-Control-Allow-Origin": origin or "",
            "Access-Control-Allow-Methods": CORS_ALLOW_METHODS,
            "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
            "Access-Control-Max-Age": CORS_MAX_AGE,
            "Vary": "Origin",
        }
        if credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return web.Response(status=204, headers=headers)
    if allowed:
        request[CORS] = (origin or "", credentials)
    return await handler(request)


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Add the CORS headers of an allowed cross-origin request to its response."""
    cors = request.get(CORS)
    if cors is None or "Access-Control-Allow-Origin" in response.headers:
        return
    origin, credentials = cors
    response.headers["Access-Control-Allow-Origin"] = origin
    if credentials:
        response.headers["Access-Control-Allow-Credentials"] = "true"
    response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
    response.headers.add("Vary", "Origin")
