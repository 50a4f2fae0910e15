"""DICOM status codes for storing an instance, and the one mapping from core errors.

Shared by the C-STORE response (PS3.4 B.2.3) and STOW-RS's FailureReason (PS3.18 §10.5.3,
which reuses the PS3.4 codes), so both front ends refuse the same input the same way.
"""

from __future__ import annotations

from gateway.errors import (
    Conflict,
    Forbidden,
    IdentityConflict,
    InstanceRejected,
    InvalidInstance,
    SOPClassMismatch,
    StorageFull,
    TooLarge,
    Unavailable,
)

SUCCESS = 0x0000
# PS3.4 B.2.3 C-STORE failures
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand
# PS3.7 C.5 general failures
PROCESSING_FAILURE = 0x0110  # Failure: Processing failure
DUPLICATE_SOP_INSTANCE = 0x0111  # Failure: Duplicate SOP Instance
NOT_AUTHORIZED = 0x0124  # Refused: Not Authorized
# Refusals in the A7xx range, with the values dcm4chee-arc gives them (its users know them):
SUBSEQUENT_OCCURRENCE_OF_REJECTED = 0xA771  # a re-send of an instance an IOCM note rejected
CONFLICTING_IDENTITY = 0xA778  # study of another patient, or series of another study

_STORE_FAILURES: tuple[tuple[type[Exception], int], ...] = (
    (StorageFull, OUT_OF_RESOURCES),
    (TooLarge, OUT_OF_RESOURCES),
    (Unavailable, OUT_OF_RESOURCES),
    (SOPClassMismatch, DATA_SET_DOES_NOT_MATCH_SOP_CLASS),
    (InvalidInstance, CANNOT_UNDERSTAND),
    (Conflict, DUPLICATE_SOP_INSTANCE),
    (IdentityConflict, CONFLICTING_IDENTITY),
    (InstanceRejected, SUBSEQUENT_OCCURRENCE_OF_REJECTED),
    (Forbidden, NOT_AUTHORIZED),
)


def store_status(error: BaseException) -> int:
    """The status (or STOW-RS FailureReason) for an error raised while storing.

    >>> hex(store_status(StorageFull("disk full")))
    '0xa700'
    >>> hex(store_status(RuntimeError("unexpected")))
    '0x110'
    """
    return next((code for cls, code in _STORE_FAILURES if isinstance(error, cls)),
                PROCESSING_FAILURE)
