"""Transport-free errors raised by the core.

Each front end maps them once, at its edge: ``dimse`` to PS3.4 status codes, ``dicomweb`` to
``application/problem+json`` responses. Every message tells the reader what was wrong and, where
it helps, what to do.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of every error the core raises on purpose."""


class NotFound(GatewayError):
    """The requested patient, study, series or instance is not in the archive."""


class InvalidQuery(GatewayError):
    """A query parameter or key is malformed; the message names it."""


class InvalidUID(InvalidQuery):
    """A UID does not follow PS3.5 §9.1 (digits and dots, at most 64 characters)."""


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


class TooLarge(GatewayError):
    """The instance would take more memory than a configured bound (a deflated data set
    inflating past ``[storage] max_inflated_bytes``); nothing was kept. Out of resources:
    C-STORE 0xA700, STOW-RS FailureReason 0xA700."""


class StorageFull(GatewayError):
    """The data folder has no room left (or is below its configured free-space reserve)."""


class Forbidden(GatewayError):
    """The principal may not do this."""


class Unauthorized(GatewayError):
    """No valid credential was presented."""
