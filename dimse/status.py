"""Every DIMSE status the gateway answers with, named once (PS3.7 Annex C, PS3.4 B.2.3, C.4).

The storage codes and their mapping from core errors live in :mod:`gateway.status`, shared
with STOW-RS, and are re-exported here; the rest are DIMSE's own. The two ways an association
runs (:mod:`dimse.loop`, :mod:`dimse.toolkit`) and the services they share
(:mod:`dimse.services`) take their statuses from here only.
"""

from __future__ import annotations

from gateway.errors import InvalidQuery
from gateway.status import (
    CANNOT_UNDERSTAND,
    CONFLICTING_IDENTITY,
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    DUPLICATE_SOP_INSTANCE,
    NOT_AUTHORIZED,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SUBSEQUENT_OCCURRENCE_OF_REJECTED,
    SUCCESS,
    store_status,
)

# PS3.7 C.1-C.4: the statuses of every service.
PENDING = 0xFF00  # Pending: matches or sub-operations are continuing
CANCEL = 0xFE00  # Cancel: terminated due to a C-CANCEL (PS3.7 9.3.2.3)
WARNING = 0x0001  # Warning (PS3.7 C.3); 0xB000-0xBFFF are the services' own warnings
# PS3.7 C.5 general failures (beside PROCESSING_FAILURE, DUPLICATE_SOP_INSTANCE,
# NOT_AUTHORIZED from gateway.status).
INVALID_ARGUMENT_VALUE = 0x0115  # Failure: Invalid argument value
SOP_CLASS_NOT_SUPPORTED = 0x0122  # Refused: SOP Class not supported
UNRECOGNIZED_OPERATION = 0x0211  # Refused: Unrecognized operation

# PS3.4 C.4.1.1.4 (C-FIND), C.4.2.1.5 (C-MOVE), C.4.3.1.3 (C-GET).
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: Identifier does not match SOP Class
UNABLE_TO_PROCESS = 0xC000  # Failed: Unable to process
SUB_OPERATIONS_FAILED = 0xA702  # Refused: Out of resources, unable to perform sub-operations
SUB_OPERATIONS_WARNING = 0xB000  # Warning: sub-operations complete, one or more failures
MOVE_DESTINATION_UNKNOWN = 0xA801  # Refused: Move Destination unknown (C-MOVE only)


def identifier_status(error: BaseException) -> int:
    """The failure to answer a C-FIND, C-MOVE or C-GET whose identifier could not be used.

    An identifier that was read but does not fit the information model (a level it lacks, a
    key below the level, a malformed value: :class:`~gateway.errors.InvalidQuery`) "does not
    match the SOP Class" (0xA900); one that cannot be decoded at all, or any other error, is
    "unable to process" (0xC000), as a data set C-STORE cannot parse is 0xC000 (PS3.4 B.2.3).

    >>> hex(identifier_status(InvalidQuery("no PATIENT level in Study Root")))
    '0xa900'
    >>> hex(identifier_status(ValueError("truncated data element")))
    '0xc000'
    """
    if isinstance(error, InvalidQuery):
        return IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    return UNABLE_TO_PROCESS


def status_class(status: int) -> str:
    """``success``, ``warning`` or ``failure`` (PS3.7 C.1-C.4).

    >>> [status_class(s) for s in (SUCCESS, SUB_OPERATIONS_WARNING, OUT_OF_RESOURCES)]
    ['success', 'warning', 'failure']
    """
    if status == SUCCESS:
        return "success"
    return "warning" if status == WARNING or 0xB000 <= status <= 0xBFFF else "failure"


__all__ = [
    "CANCEL",
    "CANNOT_UNDERSTAND",
    "CONFLICTING_IDENTITY",
    "DATA_SET_DOES_NOT_MATCH_SOP_CLASS",
    "DUPLICATE_SOP_INSTANCE",
    "IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS",
    "INVALID_ARGUMENT_VALUE",
    "MOVE_DESTINATION_UNKNOWN",
    "NOT_AUTHORIZED",
    "OUT_OF_RESOURCES",
    "PENDING",
    "PROCESSING_FAILURE",
    "SOP_CLASS_NOT_SUPPORTED",
    "SUBSEQUENT_OCCURRENCE_OF_REJECTED",
    "SUB_OPERATIONS_FAILED",
    "SUB_OPERATIONS_WARNING",
    "SUCCESS",
    "UNABLE_TO_PROCESS",
    "UNRECOGNIZED_OPERATION",
    "WARNING",
    "identifier_status",
    "status_class",
    "store_status",
]
