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
from aiohttp.typedefs import Middleware

from gateway import audit, events
from gateway.access import Principal, Scope
from gateway.core import Gateway
from gateway.errors import InvalidQuery
from viewer_links.keys import LinkError
from viewer_links.pages import CONTENT_SECURITY_POLICY, refusal_page
from viewer_links.service import InvalidLinkRequest, LinkService, MintRequest, OpenedSession
from viewer_links.viewer import ViewerFiles

logger = logging.getLogger(__name__)

API_MOUNT = "/api"
# The service holds what the routes need besides: the core (``service.gateway``) and the
# bearer authenticator (``service.authenticator``).
SERVICE = web.AppKey("link_service", LinkService)
VIEWER = web.AppKey("viewer_files", ViewerFiles)
PRINCIPAL = web.RequestKey("links_principal", Principal)
MEDIA_FHIR = "application/fhir+json"

NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
TOO_MANY = "too_many"  # the refusal page's reason for a 429 (viewer_links.refusals)
REFUSAL_FLUSH_SECONDS = 5.0  # how often ended windows of refusals go to the trail

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- the caller of the portal API -------------------------------------------------------------
def gateway_of(request: web.Request) -> Gateway:
    return request.config_dict[SERVICE].gateway


async def authenticate(request: web.Request) -> Principal:
    """The API principal of a bearer credential (API key or JWT, :mod:`gateway.auth`); the
    portal API and the IID launch take no session cookie and no demo principal."""
    authorization = request.headers.get("Authorization")
    authenticator = request.config_dict[SERVICE].authenticator
    return await asyncio.to_thread(authenticator.principal_for, authorization)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[PRINCIPAL] = await authenticate(request)
    return await handler(request)


def _require(request: web.Request, scope: Scope) -> Principal:
    who = request[PRINCIPAL]
    who.require(scope)
    return who


async def _no_store(request: web.Request, response: web.StreamResponse) -> None:
    """Nothing the portal API answers, errors included, is kept by a cache."""
    response.headers.setdefault("Cache-Control", "no-store")


async def _json(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise InvalidLinkRequest("send a JSON body (Content-Type: application/json)")
    try:
        body = await request.json()
    except web.HTTPRequestEntityTooLarge as exc:
        limit = gateway_of(request).settings.http.max_json_bytes
        raise web.HTTPRequestEntityTooLarge(
            max_size=limit, actual_size=limit + 1,
            text=f"the JSON body exceeds {limit} bytes (http.max_json_bytes)") from exc
    except ValueError:
        raise InvalidLinkRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidLinkRequest("the body must be a JSON object")
    return body


def base_url(request: web.Request) -> str:
    """The server's absolute root for link URLs (``[http] base_url`` behind a proxy)."""
    return gateway_of(request).settings.http.public_root(request.scheme, request.host)


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
    index = gateway_of(request).index
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
    index = gateway_of(request).index
    page = await asyncio.to_thread(events.changes, index, after, limit)
    return web.json_response(page, headers={"Cache-Control": "no-store"})


def create_api_app(service: LinkService, errors: Middleware) -> web.Application:
    """The portal API, to be mounted at :data:`API_MOUNT`.

    ``errors`` is the middleware that answers errors (the composition root gives DICOMweb's,
    so that an error has the same status and problem document on every route).
    """
    app = web.Application(middlewares=[errors, auth_middleware])
    app.on_response_prepare.append(_no_store)
    app[SERVICE] = service
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
    secure = not gateway_of(request).settings.demo
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
    what the principal may see, and redirects to the viewer like a link does. Errors are
    answered by the middleware :func:`add_landing_routes` is given, as on the portal API.
    """
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


def add_landing_routes(app: web.Application, service: LinkService, viewer: ViewerFiles,
                       errors: Middleware) -> None:
    """``/view/{token}`` and ``/iid`` on the root application; ``errors`` answers the errors
    of ``/iid`` (the landing answers its refusals with pages of its own)."""
    app[SERVICE] = service
    app[VIEWER] = viewer
    app.cleanup_ctx.append(_refusal_trail(service))

    async def iid(request: web.Request) -> web.StreamResponse:
        response = await errors(request, iid_launch)
        await _no_store(request, response)
        return response

    # GET only: a HEAD (link previews) must not spend a use.
    app.router.add_route("GET", "/view/{token}", view)
    app.router.add_route("GET", "/iid", iid)


def add_viewer_routes(app: web.Application, viewer: ViewerFiles) -> None:
    """OHIF at ``/`` with the SPA fallback. Register last: it answers every unmatched path."""
    app.router.add_route("GET", "/{tail:.*}", viewer.handle)
