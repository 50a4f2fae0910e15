"""DIMSE status codes (PS3.7 Annex C, PS3.4 B.2.3).

The storage codes and their mapping from core errors live in :mod:`gateway.status`, shared
with STOW-RS; they are re-exported here for the DIMSE handlers.
"""

from __future__ import annotations

from gateway.status import (
    CANNOT_UNDERSTAND,
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    DUPLICATE_SOP_INSTANCE,
    NOT_AUTHORIZED,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SUCCESS,
    store_status,
)

__all__ = [
    "CANNOT_UNDERSTAND",
    "DATA_SET_DOES_NOT_MATCH_SOP_CLASS",
    "DUPLICATE_SOP_INSTANCE",
    "NOT_AUTHORIZED",
    "OUT_OF_RESOURCES",
    "PROCESSING_FAILURE",
    "SUCCESS",
    "store_status",
]
