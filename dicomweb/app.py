"""The DICOMweb application: ``create_app(gateway, access_policy)``, mounted at ``/dicomweb``.

This module only builds the application; what handlers read from a request is in
:mod:`dicomweb.context`. Every request passes three middlewares, outermost first:

1. :func:`~dicomweb.cors.cors_middleware` — CORS headers and preflight answers, only for the
   configured origins (``[http] cors_origins``; none by default);
2. :data:`~dicomweb.problems.problem_middleware` — errors become ``application/problem+json``,
   with the status of :mod:`gateway.http_status`;
3. :func:`~dicomweb.context.auth_middleware` — resolves the caller to a
   :class:`~gateway.access.Principal` (``request[PRINCIPAL]``): a bearer API key or JWT, else a
   viewer-session cookie through the injected :class:`~gateway.access.AccessPolicy`, else the
   demo principal when the server runs in demo mode, else 401. Handlers then call
   :func:`~dicomweb.context.require` for their scope and filter what they return by the
   principal.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Middleware

from dicomweb import capabilities, delete, pixels, qido, stow, wado
from dicomweb.context import (
    AUDIT,
    AUTHENTICATOR,
    GATEWAY,
    MOUNT,
    POLICY,
    auth_middleware,
)
from dicomweb.cors import cors_middleware, on_response_prepare
from dicomweb.problems import problem_middleware
from gateway.access import AccessPolicy, NoSessions
from gateway.audit import AuditSink
from gateway.auth import Authenticator
from gateway.core import Gateway


def build(gateway: Gateway, access_policy: AccessPolicy | None,
          audit_sink: AuditSink | None,
          errors: Middleware = problem_middleware) -> web.Application:
    """An application with the DICOMweb edge (CORS, ``errors``, authentication) and its
    app keys set, and no routes yet: ``/dicomweb`` and ``/fhir`` are both built on it."""
    app = web.Application(middlewares=[cors_middleware, errors, auth_middleware])
    app.on_response_prepare.append(on_response_prepare)
    app[GATEWAY] = gateway
    app[POLICY] = access_policy if access_policy is not None else NoSessions()
    app[AUTHENTICATOR] = Authenticator(gateway.index, gateway.settings)
    app[AUDIT] = audit_sink if audit_sink is not None else gateway.audit
    return app


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
    app = build(gateway, access_policy, audit_sink)
    qido.add_routes(app)
    wado.add_routes(app)
    pixels.add_routes(app)
    stow.add_routes(app)
    delete.add_routes(app)
    capabilities.add_routes(app)
    return app


__all__ = ["MOUNT", "build", "create_app"]
