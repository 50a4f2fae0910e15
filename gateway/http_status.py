"""HTTP statuses for the core's errors, and the one problem document every HTTP front end sends.

As :mod:`gateway.status` is for DIMSE, this is the one map from core errors to HTTP: the
DICOMweb routes (``/dicomweb``), the FHIR read side (``/fhir``, which wraps the same status and
detail in an OperationOutcome) and the portal API (``/api``, ``/iid``) all answer a given error
with the same status, headers and ``application/problem+json`` members (RFC 9457: ``type``,
``title``, ``status``, ``detail``; PS3.18 §8.6 leaves the payload to the origin server). The
front ends only render what :func:`problem_for` decides; none imports aiohttp here.

Rules, in order:

1. an :class:`HTTPProblem` (a front end's own refusal: 406, 413, 415...) keeps its status;
2. a core error takes the status of the first row of :data:`HTTP_STATUSES` it is an instance of
   (subclasses before their bases);
3. anything else, a :class:`~gateway.errors.GatewayError` no row names included, is a fault of
   the server: 500, logged with its traceback, and its message is not sent.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

from gateway.errors import (
    Conflict,
    Forbidden,
    IdentityConflict,
    InstanceRejected,
    InvalidInstance,
    InvalidQuery,
    InvalidScope,
    NotFound,
    SOPClassMismatch,
    StorageFull,
    TooLarge,
    Unauthorized,
    Unavailable,
    Unprocessable,
)
from gateway.pixels import ImageTooLarge, NotAcceptable, PixelDataError

logger = logging.getLogger(__name__)

MEDIA_PROBLEM = "application/problem+json"
# One protection space (RFC 9110 §11.5) for every route: the same credentials open them all.
REALM = "dicom-gateway"
RETRY_AFTER_SECONDS = 5  # what a 503 tells the client to wait before sending again
INTERNAL_ERROR = "internal error; the server log has the details"

# Core error class -> HTTP status; the first match in order wins (subclasses first).
HTTP_STATUSES: tuple[tuple[type[Exception], int], ...] = (
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Unprocessable, 422),
    (InvalidQuery, 400),
    (InvalidScope, 400),
    (Conflict, 409),
    (IdentityConflict, 409),
    (NotAcceptable, 406),           # PS3.18 §8.7.3: no acceptable media type
    (ImageTooLarge, 413),
    (PixelDataError, 422),          # the stored instance has no pixel data to render
    # Refusals of an instance; STOW-RS reports them per instance (gateway.status), and these
    # rows answer them where a single instance was refused outside a STOW-RS response.
    (InvalidInstance, 400),
    (SOPClassMismatch, 400),
    (InstanceRejected, 400),
    (TooLarge, 400),
    (StorageFull, 507),             # RFC 4918 §11.5 Insufficient Storage
    (Unavailable, 503),             # the object store or the database: send again later
)


class HTTPProblem(Exception):
    """A refusal whose HTTP status the front end chose itself, for what no core error names
    (a media type it cannot produce, a body over a limit, a part of the wrong type).

    Parameters
    ----------
    status
        The HTTP status code.
    detail
        What was wrong, for a human reader.
    parameter
        The query parameter at fault, when there is one (sent as ``parameter``).
    headers
        Extra response headers (``Allow``...).
    members
        Further members of the problem document (``reason`` of a refused link).
    """

    def __init__(self, status: int, detail: str, *, parameter: str | None = None,
                 headers: Mapping[str, str] | None = None,
                 members: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.parameter = parameter
        self.headers = dict(headers or {})
        self.members = dict(members or {})


@dataclass(frozen=True)
class Problem:
    """What an HTTP front end answers for an error: status, detail, headers, extra members."""

    status: int
    detail: str
    headers: Mapping[str, str] = field(default_factory=dict)
    members: Mapping[str, str] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return reason_phrase(self.status)

    def document(self) -> dict[str, object]:
        """The ``application/problem+json`` body (RFC 9457).

        >>> Problem(404, "no such study").document()
        {'type': 'about:blank', 'title': 'Not Found', 'status': 404, 'detail': 'no such study'}
        """
        return {"type": "about:blank", "title": self.title, "status": self.status,
                "detail": self.detail, **self.members}


def reason_phrase(status: int) -> str:
    """The standard reason phrase of ``status`` (``"Error"`` for a code it does not know)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def http_status(error: BaseException) -> int:
    """The HTTP status of an error raised while serving a request.

    >>> http_status(NotFound("no such study")), http_status(Unavailable("S3 down"))
    (404, 503)
    >>> http_status(StorageFull("disk full")), http_status(RuntimeError("a bug"))
    (507, 500)
    """
    if isinstance(error, HTTPProblem):
        return error.status
    return next((status for cls, status in HTTP_STATUSES if isinstance(error, cls)), 500)


def status_headers(status: int) -> dict[str, str]:
    """The headers a status carries whatever the route: the challenge of a 401 (RFC 9110
    §11.6.1) and the wait of a 503 (§10.2.3).

    >>> status_headers(401), status_headers(503)
    ({'WWW-Authenticate': 'Bearer realm="dicom-gateway"'}, {'Retry-After': '5'})
    """
    if status == 401:
        return {"WWW-Authenticate": f'Bearer realm="{REALM}"'}
    if status == 503:
        return {"Retry-After": str(RETRY_AFTER_SECONDS)}
    return {}


def problem(status: int, detail: str, headers: Mapping[str, str] | None = None,
            members: Mapping[str, str] | None = None) -> Problem:
    """A problem of ``status`` with the headers that status always carries."""
    return Problem(status, detail, {**status_headers(status), **(headers or {})},
                   dict(members or {}))


def problem_for(error: BaseException, where: str = "") -> Problem:
    """The one decision: what an HTTP front end answers for ``error``.

    A 500 is logged here, with its traceback and ``where`` (method and path), and its
    message is not sent: it may hold what the client should not see.

    >>> problem_for(Unauthorized("send a bearer token")).headers["WWW-Authenticate"]
    'Bearer realm="dicom-gateway"'
    >>> from gateway.errors import InvalidParameter
    >>> problem_for(InvalidParameter("window", "window must be two numbers")).document()
    ... # doctest: +NORMALIZE_WHITESPACE
    {'type': 'about:blank', 'title': 'Bad Request', 'status': 400,
     'detail': 'window must be two numbers', 'parameter': 'window'}
    """
    if isinstance(error, HTTPProblem):
        status, detail = error.status, error.detail
        headers: Mapping[str, str] = error.headers
        members = dict(error.members)
    else:
        status, detail, headers, members = http_status(error), str(error), {}, {}
        if status == 500:
            logger.exception("unexpected error on %s", where or "a request", exc_info=error)
            return problem(status, INTERNAL_ERROR)
    parameter = getattr(error, "parameter", None)
    if isinstance(parameter, str):
        members["parameter"] = parameter
    return problem(status, detail, headers, members)
