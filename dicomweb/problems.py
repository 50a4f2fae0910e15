"""Errors as HTTP responses, rendered at the edge from the core's one decision.

:func:`gateway.http_status.problem_for` decides, for any error leaving a handler, the status,
detail, headers and members (:data:`gateway.http_status.HTTP_STATUSES`); this module only
renders it: ``application/problem+json`` (RFC 9457) on ``/dicomweb``, and through
:func:`error_middleware` an OperationOutcome on ``/fhir`` (:mod:`dicomweb.fhir`), so the same
error has the same status and headers on both. aiohttp's own HTTP errors (405 with ``Allow``,
413 on a body over the limit) are turned into the same problem first.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.http_status import MEDIA_PROBLEM, HTTPProblem, Problem, problem_for

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Render = Callable[[Problem], web.StreamResponse]


def problem_response(found: Problem) -> web.Response:
    """A ``application/problem+json`` response.

    >>> problem_response(Problem(404, "no such study")).content_type
    'application/problem+json'
    """
    return web.Response(status=found.status, body=json.dumps(found.document()).encode(),
                        headers={**found.headers, "Content-Type": MEDIA_PROBLEM})


def aiohttp_problem(exc: web.HTTPException) -> HTTPProblem:
    """An aiohttp HTTP error as the problem it stands for (its text when it has one of its
    own, and the ``Allow`` header of a 405)."""
    detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    return HTTPProblem(exc.status, detail or exc.reason, headers=headers)


async def answer_errors(request: web.Request, handler: Handler,
                        render: Render) -> web.StreamResponse:
    """Run ``handler``; answer an error leaving it as :func:`problem_for` decides, rendered by
    ``render``. A dropped connection is let through (there is no one to answer)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return render(problem_for(aiohttp_problem(exc)))
    except (ConnectionResetError, TimeoutError):
        raise
    except Exception as exc:
        return render(problem_for(exc, f"{request.method} {request.path}"))


def error_middleware(render: Render) -> Middleware:
    """A middleware that maps every error leaving a handler once, rendered by ``render``."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await answer_errors(request, handler, render)

    return middleware


problem_middleware = error_middleware(problem_response)
