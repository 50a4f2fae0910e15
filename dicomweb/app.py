"""The DICOMweb application: ``create_app(gateway, access_policy)``, mounted at ``/dicomweb``.

Every request passes three middlewares, outermost first:

1. :func:`cors_middleware` — CORS headers and preflight answers, only for the configured
   origins (``[http] cors_origins``; none by default);
2. :func:`~dicomweb.problems.problem_middleware` — errors become ``application/problem+json``;
3. :func:`auth_middleware` — resolves the caller to a :class:`~gateway.access.Principal`
   (``request[PRINCIPAL]``): a bearer API key or JWT, else a viewer-session cookie through the
   injected :class:`~gateway.access.AccessPolicy`, else the demo principal when the server runs
   in demo mode, else 401. Handlers then call :func:`require` for their scope and filter what they
   return by the principal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from dicomweb.problems import problem_middleware, problem_response
from gateway.access import DEMO_PRINCIPAL, AccessPolicy, NoSessions, Principal, Scope
from gateway.audit import Action, AuditEvent, AuditSink, StoredInstances
from gateway.auth import Authenticator
from gateway.core import Gateway
from gateway.errors import Unauthorized

logger = logging.getLogger(__name__)

MOUNT = "/dicomweb"

GATEWAY = web.AppKey("gateway", Gateway)
POLICY = web.AppKey("access_policy", AccessPolicy)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
AUDIT = web.AppKey("audit", AuditSink)
PRINCIPAL = web.RequestKey("principal", Principal)
CORS = web.RequestKey("cors", tuple[str, bool])

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Request headers a browser may send cross-origin (preflight, Fetch standard §3.2.3).
CORS_ALLOW_HEADERS = "Accept, Authorization, Content-Type, If-None-Match, If-Modified-Since"
CORS_EXPOSE_HEADERS = "ETag, Warning, Content-Location, Location, Content-Length"
CORS_ALLOW_METHODS = "GET, HEAD, POST, DELETE, OPTIONS"
CORS_MAX_AGE = "600"


def principal(request: web.Request) -> Principal:
    """The caller of ``request`` (set by :func:`auth_middleware`)."""
    return request[PRINCIPAL]


def require(request: web.Request, scope: Scope) -> Principal:
    """Return the caller if it holds ``scope``; raise :class:`~gateway.errors.Forbidden` else."""
    who = request[PRINCIPAL]
    who.require(scope)
    return who


def gateway_of(request: web.Request) -> Gateway:
    return request.config_dict[GATEWAY]


def base_url(request: web.Request) -> str:
    """The absolute DICOMweb root for URLs in responses (RetrieveURL, BulkDataURI).

    ``[http] base_url`` when set (behind a proxy), else the scheme and host of the request.
    """
    configured = request.config_dict[GATEWAY].settings.http.base_url
    root = configured.rstrip("/") if configured else f"{request.scheme}://{request.host}"
    return root + MOUNT


async def audit(request: web.Request, action: Action, study_uids: tuple[str, ...] = (),
                detail: str = "", success: bool = True,
                stored: StoredInstances | None = None) -> None:
    """Record an access in the trail (PS3.15 A.5) through the injected sink; ``stored``
    names the instances a STOW-RS request stored, per study."""
    who = request.get(PRINCIPAL)
    event = AuditEvent(
        action=action, principal=who.audit_name if who else "unauthenticated",
        address=request.remote or "", study_uids=study_uids, detail=detail, success=success,
        jti=who.jti if who else None, stored=stored,
    )
    sink = request.config_dict[AUDIT]
    try:
        await asyncio.to_thread(sink.record, event)
    except Exception:
        logger.exception("audit sink failed for %s", action.value)


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
            return problem_response(403, "cross-origin requests from this origin are not "
                                         "allowed (http.cors_origins)")
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
        # Added when the headers are sent (on_response_prepare), so streamed responses, which
        # handlers prepare themselves, carry them too.
        request[CORS] = (origin or "", credentials)
    return await handler(request)


async def _on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    cors = request.get(CORS)
    if cors is not None and "Access-Control-Allow-Origin" not in response.headers:
        _cors_headers(response, *cors)


def _cors_headers(response: web.StreamResponse, origin: str, credentials: bool) -> None:
    response.headers["Access-Control-Allow-Origin"] = origin
    if credentials:
        response.headers["Access-Control-Allow-Credentials"] = "true"
    response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
    response.headers.add("Vary", "Origin")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Attach the caller's :class:`Principal`, or answer 401 (deny by default)."""
    request[PRINCIPAL] = await authenticate(request)
    return await handler(request)


async def authenticate(request: web.Request) -> Principal:
    """Resolve the request's credential (bearer, session cookie, demo mode).

    Raises
    ------
    Unauthorized
        No credential, or one that is invalid, expired or revoked.
    """
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("use 'Authorization: Bearer <API key or JWT>'")
        authenticator = request.config_dict[AUTHENTICATOR]
        return await asyncio.to_thread(authenticator.principal_for_bearer, token)
    policy = request.config_dict[POLICY]
    cookie = request.cookies.get(policy.cookie_name)
    if cookie:
        found = await asyncio.to_thread(policy.principal_for_session, cookie,
                                        request.remote or "")
        if found is None:
            raise Unauthorized("the viewer session has expired or was revoked; open the link again")
        return found
    if request.config_dict[GATEWAY].settings.demo:
        return DEMO_PRINCIPAL
    raise Unauthorized("authentication required: send 'Authorization: Bearer <API key or JWT>'")


def create_app(gateway: Gateway, access_policy: AccessPolicy | None = None,
               audit_sink: AuditSink | None = None) -> web.Application:
    """Build the DICOMweb application (to be mounted at :data:`MOUNT`).

    Parameters
    ----------
    gateway
        The core.
    access_policy
        Resolves viewer-session cookies (``viewer_links``); :class:`NoSessions` when absent.
    audit_sink
        Where accesses are recorded; ``gateway.audit`` (the trail) unless given.
    """
    from dicomweb import capabilities, delete, pixels, qido, stow, wado

    app = web.Application(middlewares=[cors_middleware, problem_middleware, auth_middleware])
    app.on_response_prepare.append(_on_response_prepare)
    app[GATEWAY] = gateway
    app[POLICY] = access_policy if access_policy is not None else NoSessions()
    app[AUTHENTICATOR] = Authenticator(gateway.index, gateway.settings)
    app[AUDIT] = audit_sink if audit_sink is not None else gateway.audit
    qido.add_routes(app)
    wado.add_routes(app)
    pixels.add_routes(app)
    stow.add_routes(app)
    delete.add_routes(app)
    capabilities.add_routes(app)
    return app
