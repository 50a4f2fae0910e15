"""What a DICOMweb or FHIR handler reads from its request: the app keys the application is
built with, the caller, and the helpers every route shares (:func:`require`,
:func:`base_url`, :func:`audit`).

The route modules import this module, never :mod:`dicomweb.app`, which only builds the
application from them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.access import AccessPolicy, Principal, Scope
from gateway.audit import Action, AuditEvent, AuditSink, StoredInstances
from gateway.auth import Authenticator
from gateway.core import Gateway

logger = logging.getLogger(__name__)

MOUNT = "/dicomweb"

# The one set of app keys of the HTTP server: the composition root sets GATEWAY on the root
# application too (health, metrics, the demo-host check), and each sub-app its own values.
GATEWAY = web.AppKey("gateway", Gateway)
POLICY = web.AppKey("access_policy", AccessPolicy)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
AUDIT = web.AppKey("audit", AuditSink)
PRINCIPAL = web.RequestKey("principal", Principal)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
    http = request.config_dict[GATEWAY].settings.http
    return http.public_root(request.scheme, request.host) + MOUNT


async def authenticate(request: web.Request) -> Principal:
    """The caller of ``request``: :meth:`gateway.auth.Authenticator.principal_for` on its
    ``Authorization`` header, its viewer-session cookie and the demo setting.

    Raises
    ------
    Unauthorized
        No credential, or one that is invalid, expired or revoked.
    """
    config = request.config_dict
    policy = config[POLICY]
    authorization = request.headers.get("Authorization")
    session = request.cookies.get(policy.cookie_name)
    resolve = config[AUTHENTICATOR].principal_for
    demo = config[GATEWAY].settings.demo
    if authorization is None and not session:  # nothing to look up: no thread needed
        return resolve(None, demo=demo)
    return await asyncio.to_thread(resolve, authorization, session=session, policy=policy,
                                   address=request.remote or "", demo=demo)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Attach the caller's :class:`Principal`, or answer 401 (deny by default)."""
    request[PRINCIPAL] = await authenticate(request)
    return await handler(request)


async def audit(request: web.Request, action: Action, study_uids: tuple[str, ...] = (),
                detail: str = "", success: bool = True,
                stored: StoredInstances | None = None,
                patients: tuple[tuple[str, str], ...] = ()) -> None:
    """Record an access in the trail (PS3.15 A.5) through the injected sink; ``stored``
    names the instances a STOW-RS request stored, per study."""
    who = request.get(PRINCIPAL)
    event = AuditEvent(
        action=action, principal=who.audit_name if who else "unauthenticated",
        address=request.remote or "", study_uids=study_uids, detail=detail, success=success,
        jti=who.jti if who else None, stored=stored, patients=patients,
    )
    sink = request.config_dict[AUDIT]
    try:
        await asyncio.to_thread(sink.record, event)
    except Exception:
        logger.exception("audit sink failed for %s", action.value)
