"""Transport-free errors raised by the core.

Each is mapped once, in a table of the core: to PS3.4 status codes by :mod:`gateway.status`
(C-STORE, STOW-RS FailureReason), to HTTP statuses by :mod:`gateway.http_status`, which every
HTTP front end (``/dicomweb``, ``/fhir``, ``/api``) renders the same way. Every message tells the
reader what was wrong and, where it helps, what to do. (The pixel errors, ``PixelDataError``,
``NotAcceptable``, ``ImageTooLarge`` and ``InvalidFrameList``, are still defined in
:mod:`gateway.pixels`.)
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of every error the core raises on purpose.

    ``sop_uids`` is the refused instance's (SOP Class UID, SOP Instance UID) when the ingest
    path had read them before refusing it, so that a front end naming the refused instance
    (STOW-RS FailedSOPSequence) need not parse it again.
    """

    sop_uids: tuple[str, str] | None = None


class NotFound(GatewayError):
    """The requested patient, study, series or instance is not in the archive."""


class InvalidQuery(GatewayError):
    """A query parameter or key is malformed; the message names it."""


class InvalidUID(InvalidQuery):
    """A UID does not follow PS3.5 §9.1 (digits and dots, at most 64 characters)."""


class InvalidParameter(InvalidQuery):
    """A request parameter is malformed; ``parameter`` names it (PS3.18 §8.3.5 for rendering).

    Attributes
    ----------
    parameter
        The parameter (or keyword) at fault, as the client named it.
    """

    def __init__(self, parameter: str, detail: str) -> None:
        super().__init__(detail)
        self.parameter = parameter


class InvalidQueryParameter(InvalidParameter):
    """A query parameter or matching key is malformed; the message starts with its name."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(parameter, f"{parameter}: {message}")


class Unprocessable(InvalidQuery):
    """A request body is well-formed but a field in it is refused (a mint request with no
    viewer id, ``key_images_only`` on a study without key images); the message names the
    field."""


class InvalidScope(GatewayError):
    """A scope name is not one the gateway knows; the message lists the known ones."""


class SettingsError(GatewayError):
    """A setting is missing, malformed or contradicts another; the message names it."""


class DemoNotOnLoopback(SettingsError):
    """Demo mode lets anonymous users read and write: it runs only on loopback listeners."""


class InvalidInstance(GatewayError):
    """The data received is not a DICOM instance the gateway can understand.

    Maps to C-STORE status 0xC000 (cannot understand) and to a STOW-RS FailureReason of 0xC000.
    """


class SOPClassMismatch(GatewayError):
    """The data set does not match the SOP Class it was sent under (PS3.4 B.2.3, 0xA900)."""


class Conflict(GatewayError):
    """A different instance is already stored under the same SOP Instance UID.

    The stored original is kept. Set ``[storage] overwrite = true`` to replace instances instead.
    """


class IdentityConflict(GatewayError):
    """The instance would join a study or series that belongs to someone else.

    A Study Instance UID already stored for another patient (PatientID plus IssuerOfPatientID),
    or a Series Instance UID already stored under another study: storing it would show one
    patient's images in another's record. Nothing is stored; the message names the conflict
    (never the other patient's ID: it goes back to the sender).

    Attributes
    ----------
    study_uid
        The study the instance named.
    owner
        ``(PatientID, IssuerOfPatientID)`` of the patient the study or series belongs to, for
        the access trail; ``None`` when not known.
    """

    def __init__(self, message: str, *, study_uid: str = "",
                 owner: tuple[str, str] | None = None) -> None:
        super().__init__(message)
        self.study_uid = study_uid
        self.owner = owner


class InstanceRejected(GatewayError):
    """The instance was taken out of the archive by an IHE IOCM rejection note; a re-send of it
    is refused (it is not stored again)."""


class TooLarge(GatewayError):
    """The instance would take more memory than a configured bound (a deflated data set
    inflating past ``[storage] max_inflated_bytes``); nothing was kept. Out of resources:
    C-STORE 0xA700, STOW-RS FailureReason 0xA700."""


class StorageFull(GatewayError):
    """The data folder has no room left (or is below its configured free-space reserve)."""


class Unavailable(GatewayError):
    """A service the gateway depends on does not answer: the object store (S3) or the index's
    database. Nothing was kept; the request may be sent again once it is back (C-STORE 0xA700
    with an Error Comment, HTTP 503 with ``Retry-After``). The gateway needs no restart."""


class Forbidden(GatewayError):
    """The principal may not do this."""


class Unauthorized(GatewayError):
    """No valid credential was presented."""
