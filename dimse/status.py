"""DIMSE status codes (PS3.7 Annex C, PS3.4 B.2.3) and the one mapping from core errors."""

from __future__ import annotations

from gateway.errors import (
    Conflict,
    Forbidden,
    GatewayError,
    InvalidInstance,
    SOPClassMismatch,
    StorageFull,
)

SUCCESS = 0x0000
# PS3.4 B.2.3 C-STORE failures
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand
# PS3.7 C.5 general failures
DUPLICATE_SOP_INSTANCE = 0x0111  # Failure: Duplicate SOP Instance
NOT_AUTHORIZED = 0x0124  # Refused: Not Authorized
PROCESSING_FAILURE = 0x0110  # Failure: Processing failure


def store_status(error: BaseException) -> int:
    """The C-STORE response status for an error raised by the core."""
    if isinstance(error, StorageFull):
        return OUT_OF_RESOURCES
    if isinstance(error, SOPClassMismatch):
        return DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(error, InvalidInstance):
        return CANNOT_UNDERSTAND
    if isinstance(error, Conflict):
        return DUPLICATE_SOP_INSTANCE
    if isinstance(error, Forbidden):
        return NOT_AUTHORIZED
    if isinstance(error, GatewayError):
        return PROCESSING_FAILURE
    return PROCESSING_FAILURE
