"""Errors as ``application/problem+json`` (RFC 9457), mapped once, at the HTTP edge.

The core raises transport-free errors (:mod:`gateway.errors`); :func:`problem_middleware` turns
each into a problem document with ``type``, ``title``, ``status`` and ``detail``, so that every
DICOMweb error a client sees names what was wrong (PS3.18 §8.6 leaves the payload to the origin
server; we use RFC 9457).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.errors import (
    Conflict,
    Forbidden,
    GatewayError,
    IdentityConflict,
    InvalidQuery,
    NotFound,
    StorageFull,
    Unauthorized,
    Unavailable,
)

logger = logging.getLogger(__name__)

MEDIA_PROBLEM = "application/problem+json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HTTPProblem(Exception):
    """An HTTP error with its status and detail, raised by the routes themselves.

    Parameters
    ----------
    status
        The HTTP status code.
    detail
        What was wrong, for a human reader.
    parameter
        The query parameter at fault, when there is one (added as ``parameter``).
    headers
        Extra response headers (``WWW-Authenticate``, ``Allow``...).
    """

    def __init__(self, status: int, detail: str, *, parameter: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.parameter = parameter
        self.headers = headers or {}


def problem_response(status: int, detail: str, *, parameter: str | None = None,
                     headers: dict[str, str] | None = None) -> web.Response:
    """A ``application/problem+json`` response.

    >>> problem_response(404, "no such study").content_type
    'application/problem+json'
    """
    body: dict[str, object] = {
        "type": "about:blank",
        "title": _reason(status),
        "status": status,
        "detail": detail,
    }
    if parameter is not None:
        body["parameter"] = parameter
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        headers={"Content-Type": MEDIA_PROBLEM, **(headers or {})},
    )


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# Core error class -> HTTP status; the first match in order wins (subclasses first).
STATUS_OF: tuple[tuple[type[GatewayError], int], ...] = (
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (InvalidQuery, 400),
    (Conflict, 409),
    (IdentityConflict, 409),
    (StorageFull, 507),
    (Unavailable, 503),
)


def status_of(exc: GatewayError) -> int:
    for cls, status in STATUS_OF:
        if isinstance(exc, cls):
            return status
    return 400


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every error leaving a DICOMweb handler to ``application/problem+json``."""
    try:
        return await handler(request)
    except HTTPProblem as exc:
        return problem_response(exc.status, exc.detail, parameter=exc.parameter,
                                headers=exc.headers)
    except GatewayError as exc:
        status = status_of(exc)
        headers = ({"WWW-Authenticate": 'Bearer realm="dicomweb"'} if status == 401
                   else {"Retry-After": "5"} if status == 503 else None)
        parameter = getattr(exc, "parameter", None)
        return problem_response(status, str(exc), parameter=parameter, headers=headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow",)}
        return problem_response(exc.status, detail or exc.reason, headers=headers)
    except (ConnectionResetError, TimeoutError):
        raise
    except Exception:
        logger.exception("unexpected error on %s %s", request.method, request.path)
        return problem_response(500, "internal error; the server log has the details")
