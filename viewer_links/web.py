"""HTTP front end of viewer links: the portal API, the ``/view/{token}`` landing, the IHE IID
launch, and the OHIF viewer at ``/``.

The composition root calls :func:`create_api_app` (mounted at ``/api``), then
:func:`add_landing_routes`, and :func:`add_viewer_routes` last of all, since the viewer answers
every path no other route took (the single-page app's client-side routes).

The landing exchanges a link for a viewer-session cookie:

- ``HttpOnly`` (scripts cannot read it), ``Path=/``, ``Secure`` unless the gateway runs in
  demo mode (plain HTTP on loopback; a TLS proxy in front is not visible from here), and
  ``SameSite=Strict``: the cookie is needed only by OHIF's same-origin DICOMweb requests,
  which Strict allows, and never by a cross-site navigation (the landing itself works
  from the token, not the cookie), so Strict costs nothing and shuts out cross-site request
  forgery entirely. (The viewer must open in its own window, as the DSP does, not in a
  cross-site iframe.)
- the 303 goes to ``/viewer?StudyInstanceUIDs=...``: the token leaves the address bar and the
  history, and ``Referrer-Policy: no-referrer`` keeps it out of any Referer header;
  ``Cache-Control: no-store`` keeps the exchange out of caches. The token is never logged
  (the server runs without an access log; the trail records the ``jti``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway import audit, events
from gateway.access import Principal, Scope
from gateway.auth import Authenticator
from gateway.core import Gateway
from gateway.errors import (
    Forbidden,
    GatewayError,
    InvalidQuery,
    NotFound,
    Unauthorized,
)
from viewer_links.keys import LinkError
from viewer_links.pages import CONTENT_SECURITY_POLICY, refusal_page
from viewer_links.service import InvalidLinkRequest, LinkService, MintRequest, OpenedSession
from viewer_links.viewer import ViewerFiles

logger = logging.getLogger(__name__)

API_MOUNT = "/api"
SERVICE = web.AppKey("link_service", LinkService)
AUTHENTICATOR = web.AppKey("link_authenticator", Authenticator)
VIEWER = web.AppKey("viewer_files", ViewerFiles)
GATEWAY = web.AppKey("links_gateway", Gateway)
PRINCIPAL = web.RequestKey("links_principal", Principal)
MEDIA_PROBLEM = "application/problem+json"
MEDIA_FHIR = "application/fhir+json"

NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
TOO_MANY = "too_many"  # the refusal page's reason for a 429 (viewer_links.refusals)
REFUSAL_FLUSH_SECONDS = 5.0  # how often ended windows of refusals go to the trail

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- problem+json (RFC 9457) for the portal API --------------------------------------------------
def problem(status: int, title: str, detail: str, reason: str | None = None) -> web.Response:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status,
                            "detail": detail}
    if reason:
        body["reason"] = reason
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="dicom-gateway"'
    return web.Response(status=status, text=json.dumps(body), content_type=MEDIA_PROBLEM,
                        headers=headers)


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map core errors once, at the edge, to problem+json (STYLE.md, "Errors")."""
    try:
        return await handler(request)
    except LinkError as exc:
        return problem(exc.status, "link refused", str(exc),
                       getattr(exc, "rule", None) or exc.reason)
    except InvalidLinkRequest as exc:
        return problem(422, "invalid request", str(exc))
    except InvalidQuery as exc:
        return problem(400, "invalid request", str(exc))
    except Unauthorized as exc:
        return problem(401, "authentication required", str(exc))
    except Forbidden as exc:
        return problem(403, "forbidden", str(exc))
    except NotFound as exc:
        return problem(404, "not found", str(exc))
    except GatewayError as exc:
        logger.exception("portal API request failed")
        return problem(500, "internal error", type(exc).__name__)
    except web.HTTPException as exc:
        if exc.status >= 400:
            return problem(exc.status, exc.reason, exc.text or exc.reason)
        raise


async def authenticate(request: web.Request) -> Principal:
    """The API principal of a bearer credential (API key or JWT, :mod:`gateway.auth`)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send the portal's credential as 'Authorization: Bearer <key>'")
    authenticator = request.config_dict[AUTHENTICATOR]
    return await asyncio.to_thread(authenticator.principal_for_bearer, token)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[PRINCIPAL] = await authenticate(request)
    return await handler(request)


def _require(request: web.Request, scope: Scope) -> Principal:
    who = request[PRINCIPAL]
    who.require(scope)
    return who


async def _json(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise InvalidLinkRequest("send a JSON body (Content-Type: application/json)")
    try:
        body = await request.json()
    except web.HTTPRequestEntityTooLarge as exc:
        limit = request.config_dict[GATEWAY].settings.http.max_json_bytes
        raise web.HTTPRequestEntityTooLarge(
            max_size=limit, actual_size=limit + 1,
            text=f"the JSON body exceeds {limit} bytes (http.max_json_bytes)") from exc
    except ValueError:
        raise InvalidLinkRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidLinkRequest("the body must be a JSON object")
    return body


def base_url(request: web.Request) -> str:
    configured = request.config_dict[GATEWAY].settings.http.base_url
    return configured.rstrip("/") if configured else f"{request.scheme}://{request.host}"


# -- the portal API -----------------------------------------------------------------------------
async def create_link(request: web.Request) -> web.Response:
    """``POST /api/links``: mint a viewer link (scope ``links:mint``)."""
    who = _require(request, Scope.LINKS_MINT)
    body = await _json(request)
    viewer = body.get("viewer")
    if not isinstance(viewer, dict):
        raise InvalidLinkRequest('viewer must be an object {"id": ..., "name": ...}')
    ttl, max_uses = body.get("ttl"), body.get("max_uses")
    for name, value in (("ttl", ttl), ("max_uses", max_uses)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise InvalidLinkRequest(f"{name} must be an integer or null")
    key_images_only = body.get("key_images_only", False)
    if not isinstance(key_images_only, bool):
        raise InvalidLinkRequest("key_images_only must be true or false")
    fields = {"study": body.get("study"), "viewer.id": viewer.get("id"),
              "viewer.name": viewer.get("name", ""), "relationship": body.get("relationship")}
    for name, value in fields.items():
        if not isinstance(value, str):
            raise InvalidLinkRequest(f"{name} must be a string")
    minted = await asyncio.to_thread(
        request.config_dict[SERVICE].mint,
        MintRequest(study=body["study"], viewer_id=viewer["id"],
                    viewer_name=viewer.get("name", ""), relationship=body["relationship"],
                    ttl=ttl, key_images_only=key_images_only, max_uses=max_uses),
        by=who, base_url=base_url(request), address=request.remote or "",
    )
    return web.json_response(
        {"url": minted.url, "jti": minted.jti, "expires_at": minted.expires_at.isoformat()},
        status=201, headers={"Cache-Control": "no-store",
                             "Location": f"{API_MOUNT}/links/{minted.jti}"},
    )


async def list_links(request: web.Request) -> web.Response:
    """``GET /api/links?study=&active=true``: the registry (never a token)."""
    _require(request, Scope.LINKS_MINT)
    links = await asyncio.to_thread(
        request.config_dict[SERVICE].list_links, study=request.query.get("study"),
        active=request.query.get("active", "").lower() in {"1", "true"})
    return web.json_response([
        {"jti": link.jti, "study": link.study_instance_uid, "viewer": link.viewer_id,
         "relationship": link.viewer_relationship, "key_images_only": link.key_images_only,
         "uses": link.uses, "max_uses": link.max_uses,
         "expires_at": link.expires_at.isoformat(),
         "revoked": link.revoked_at is not None} for link in links
    ], headers={"Cache-Control": "no-store"})


async def revoke_link(request: web.Request) -> web.Response:
    """``DELETE /api/links/{jti}``: revoke; the link's open sessions end at once.

    Any ``jti`` may be revoked, registered or not (a portal-signed link before it is opened).
    """
    who = _require(request, Scope.LINKS_MINT)
    await asyncio.to_thread(request.config_dict[SERVICE].revoke, request.match_info["jti"],
                            by=who, address=request.remote or "")
    return web.Response(status=204)


async def put_confidentiality(request: web.Request) -> web.Response:
    """``PUT /api/studies/{uid}/confidentiality`` ``{"level": ..., "author": id|null}``.

    Scope ``policy:write``: ``links:mint`` alone may not lower a level its links are checked
    against.
    """
    who = _require(request, Scope.POLICY_WRITE)
    body = await _json(request)
    level, author = body.get("level"), body.get("author")
    if not isinstance(level, str):
        raise InvalidLinkRequest("level must be normal, confidential or private")
    if author is not None and not isinstance(author, str):
        raise InvalidLinkRequest("author must be a string or null")
    uid = request.match_info["uid"]
    await asyncio.to_thread(request.config_dict[SERVICE].set_confidentiality, uid, level,
                            author=author, keep_author="author" not in body, by=who,
                            address=request.remote or "")
    return web.json_response({"study": uid, "level": level, "author": author})


async def put_dsp(request: web.Request) -> web.Response:
    """``PUT /api/patients/{id}/dsp`` ``{"created": "YYYY-MM-DD", "issuer": "..."}``
    (``issuer`` optional; scope ``policy:write``): recorded whether or not a study of the
    patient is stored."""
    who = _require(request, Scope.POLICY_WRITE)
    body = await _json(request)
    created = body.get("created")
    if not isinstance(created, str):
        raise InvalidLinkRequest("created must be a date YYYY-MM-DD")
    issuer = body.get("issuer", "")
    if not isinstance(issuer, str):
        raise InvalidLinkRequest("issuer must be a string (the IssuerOfPatientID)")
    patient = request.match_info["patient"]
    date = await asyncio.to_thread(request.config_dict[SERVICE].set_dsp_created, patient,
                                   created, by=who, address=request.remote or "",
                                   issuer=issuer)
    answer = {"patient": patient, "created": f"{date[:4]}-{date[4:6]}-{date[6:]}"}
    if issuer:
        answer["issuer"] = issuer
    return web.json_response(answer)


async def get_audit(request: web.Request) -> web.Response:
    """``GET /api/audit?patient=ID[&format=dicom]``: the patient's access trail.

    FHIR R4 AuditEvent Bundle by default; ``format=dicom`` gives PS3.15 A.5 audit messages.
    """
    who = _require(request, Scope.AUDIT_READ)
    patient = request.query.get("patient", "")
    if not 0 < len(patient) <= 64:
        raise InvalidQuery("give the patient's ID: /api/audit?patient=ID")
    try:
        limit = int(request.query.get("_count", "1000"))
    except ValueError:
        raise InvalidQuery("_count must be an integer") from None
    if not 0 < limit:
        raise InvalidQuery("_count must be a positive integer")
    limit = min(limit, 10000)
    index = request.config_dict[GATEWAY].index
    events = await asyncio.to_thread(audit.events_for_patient, index, patient, limit=limit)
    await asyncio.to_thread(audit.record, index, audit.Action.AUDIT_READ, principal=who,
                            patient_id=patient, address=request.remote or "",
                            detail=f"{len(events)} entries read")
    if request.query.get("format") == "dicom":
        body = "".join(audit.dicom_audit_message(e) for e in events)
        return web.Response(text=f'<?xml version="1.0" encoding="UTF-8"?>\n'
                                 f"<AuditMessages>{body}</AuditMessages>",
                            content_type="application/xml", charset="utf-8",
                            headers={"Cache-Control": "no-store"})
    return web.Response(text=json.dumps(audit.fhir_bundle(events, base_url(request))),
                        content_type=MEDIA_FHIR, charset="utf-8",
                        headers={"Cache-Control": "no-store"})


async def get_changes(request: web.Request) -> web.Response:
    """``GET /api/changes?after=SEQ&limit=N``: the events after ``SEQ``, in seq order
    (``{"changes": [...], "last": SEQ}``), to catch up after missing webhooks (docs/events.md).
    """
    _require(request, Scope.EVENTS_READ)
    after, limit = events.parse_changes_query(request.query.get("after"),
                                              request.query.get("limit"))
    index = request.config_dict[GATEWAY].index
    page = await asyncio.to_thread(events.changes, index, after, limit)
    return web.json_response(page, headers={"Cache-Control": "no-store"})


def create_api_app(gateway: Gateway, service: LinkService) -> web.Application:
    """The portal API, to be mounted at :data:`API_MOUNT`."""
    app = web.Application(middlewares=[problem_middleware, auth_middleware])
    app[GATEWAY] = gateway
    app[SERVICE] = service
    app[AUTHENTICATOR] = Authenticator(gateway.index, gateway.settings)
    app.router.add_post("/links", create_link)
    app.router.add_get("/links", list_links)
    app.router.add_delete("/links/{jti}", revoke_link)
    app.router.add_put("/studies/{uid}/confidentiality", put_confidentiality)
    app.router.add_put("/patients/{patient}/dsp", put_dsp)
    app.router.add_get("/audit", get_audit)
    app.router.add_get("/changes", get_changes)
    return app


# -- the landing and the IID launch -------------------------------------------------------------
def refusal(request: web.Request, reason: str, status: int,
            headers: dict[str, str] | None = None) -> web.Response:
    language, page = refusal_page(reason, request.headers.get("Accept-Language"))
    return web.Response(status=status, text=page, content_type="text/html", charset="utf-8",
                        headers={**NO_STORE, "Content-Language": language,
                                 "Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                 "X-Content-Type-Options": "nosniff", "Vary": "Accept-Language",
                                 **(headers or {})})


def session_redirect(request: web.Request, opened: OpenedSession,
                     cookie_name: str) -> web.Response:
    response = web.Response(status=303, headers={**NO_STORE, "Location": opened.redirect})
    seconds = max(1, int((opened.expires_at - datetime.now(UTC)).total_seconds()))
    # Secure unless in demo mode (plain HTTP on loopback): behind a TLS proxy the request
    # arrives over plain HTTP, and without [http] base_url nothing here says so.
    secure = not request.config_dict[GATEWAY].settings.demo
    response.set_cookie(
        cookie_name, opened.session_id, max_age=seconds, path="/", httponly=True,
        samesite="Strict", secure=secure or request.secure,
    )
    return response


async def view(request: web.Request) -> web.Response:
    """``GET /view/{token}``: verify, apply the rules, audit, open a session, 303 to OHIF."""
    viewer = request.config_dict[VIEWER]
    if not viewer.installed:
        return refusal(request, "no_viewer", 503)
    service = request.config_dict[SERVICE]
    retry_after = service.refusals.retry_after(request.remote or "")
    if retry_after is not None:  # too many links that do not verify from this address
        return refusal(request, TOO_MANY, 429, {"Retry-After": str(retry_after)})
    try:
        opened = await asyncio.to_thread(service.open, request.match_info["token"],
                                         address=request.remote or "")
    except LinkError as exc:
        return refusal(request, exc.reason, exc.status)
    return session_redirect(request, opened, service.cookie_name)


async def iid_launch(request: web.Request) -> web.StreamResponse:
    """IHE IID "Invoke Image Display": ``/iid?requestType=STUDY&studyUID=...&keyImagesOnly=``.

    For an authenticated API principal (bearer credential): opens a viewer session limited to
    what the principal may see, and redirects to the viewer like a link does.
    """
    try:
        who = await authenticate(request)
        query = request.query
        if query.get("requestType", "").upper() != "STUDY":
            raise InvalidQuery("requestType must be STUDY (patient-level display is not offered)")
        study = query.get("studyUID", "")
        if not study or "," in study:
            raise InvalidQuery("studyUID must name one Study Instance UID")
        key_images_only = query.get("keyImagesOnly", "false").lower() == "true"
        service = request.config_dict[SERVICE]
        opened = await asyncio.to_thread(service.open_iid, who, study,
                                         key_images_only=key_images_only,
                                         address=request.remote or "")
    except LinkError as exc:
        return problem(exc.status, "launch refused", str(exc), exc.reason)
    except (Unauthorized, Forbidden, InvalidQuery) as exc:
        status = 401 if isinstance(exc, Unauthorized) else (
            403 if isinstance(exc, Forbidden) else 400)
        return problem(status, "launch refused", str(exc))
    return session_redirect(request, opened, service.cookie_name)


def _refusal_trail(
        service: LinkService) -> Callable[[web.Application], AsyncIterator[None]]:
    """Write ended windows of unverifiable-link refusals every few seconds, and all at stop."""

    async def flusher(stopping: asyncio.Event) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), REFUSAL_FLUSH_SECONDS)
            last = stopping.is_set()  # then everything, open windows too
            try:
                await asyncio.to_thread(service.flush_refusals, everything=last)
            except Exception:  # the next round tries again; the counts are kept until written
                logger.exception("writing refusals of unverifiable links to the trail failed")
            if last:
                return

    async def context(app: web.Application) -> AsyncIterator[None]:
        # Stopped by an event, not cancelled: a cancelled task would leave its worker thread
        # writing to the database while the server closes it.
        stopping = asyncio.Event()
        task = asyncio.create_task(flusher(stopping))
        yield
        stopping.set()
        await task

    return context


def add_landing_routes(app: web.Application, gateway: Gateway, service: LinkService,
                       viewer: ViewerFiles) -> None:
    """``/view/{token}`` and ``/iid`` on the root application."""
    app[SERVICE] = service
    app[VIEWER] = viewer
    app[GATEWAY] = gateway
    app[AUTHENTICATOR] = Authenticator(gateway.index, gateway.settings)
    app.cleanup_ctx.append(_refusal_trail(service))
    # GET only: a HEAD (link previews) must not spend a use.
    app.router.add_route("GET", "/view/{token}", view)
    app.router.add_route("GET", "/iid", iid_launch)


def add_viewer_routes(app: web.Application, viewer: ViewerFiles) -> None:
    """OHIF at ``/`` with the SPA fallback. Register last: it answers every unmatched path."""
    app.router.add_route("GET", "/{tail:.*}", viewer.handle)
