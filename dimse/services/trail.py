"""The access trail of DIMSE queries and retrievals (DESIGN.md, PS3.15 A.5.3).

C-FIND is "Query" (110112), C-MOVE "DICOM Instances Transferred" (110104), C-GET "DICOM
Instances Accessed" (110103); C-STORE writes one entry per association
(:func:`dimse.services.store.record_association`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from gateway.audit import EVENTS, Action, AuditEvent
from gateway.core import Gateway

logger = logging.getLogger(__name__)
trail_logger = logging.getLogger("dimse.audit")

QUERY_EVENT = Action.QUERY  # 110112 Query (C-FIND)
INSTANCES_ACCESSED = Action.RETRIEVE  # 110103 DICOM Instances Accessed (C-GET)
INSTANCES_TRANSFERRED = Action.TRANSFER  # 110104 DICOM Instances Transferred (C-MOVE)
TRAIL_STUDIES = 20  # study UIDs named per log line; more are counted


def record_access(gateway: Gateway, action: Action, ae_title: str, address: str,
                  study_uids: Iterable[str], detail: str, *, success: bool = True) -> None:
    """Record one query or retrieval in the access trail (DESIGN.md, PS3.15 A.5).

    The entry names the calling AE (``dimse:<AE title>``), its address, the studies and the
    outcome, never patient names; it is committed before the first response is sent. A line is
    logged at INFO too, with UIDs only.
    """
    studies = tuple(dict.fromkeys(study_uids))
    shown = ",".join(studies[:TRAIL_STUDIES])
    if len(studies) > TRAIL_STUDIES:
        shown += f",+{len(studies) - TRAIL_STUDIES}"
    trail_logger.info("audit %s %s by dimse:%s from %s studies=[%s] %s", EVENTS[action].code,
                      "success" if success else "failure", ae_title, address, shown, detail)
    event = AuditEvent(action=action, principal=f"dimse:{ae_title}", address=address,
                       study_uids=studies, detail=detail, success=success)
    try:
        gateway.audit.record(event)
    except Exception:  # noqa: BLE001 - a sink must not fail the access it records
        logger.exception("audit sink failed for %s", action.name)
