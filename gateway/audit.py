"""The access trail: who queried, retrieved, stored or deleted what, when, from where.

Minimal on purpose: front ends build an :class:`AuditEvent` and hand it to an :class:`AuditSink`.
The default sink only logs (at DEBUG, without patient data); the viewer-links front end provides
a persistent, queryable sink (``GET /api/audit?patient=``) and the composition root injects it.
Event kinds follow PS3.15 A.5: 110112 Query, 110103 DICOM Instances Accessed, 110104 DICOM
Instances Transferred, 110105 DICOM Study Deleted.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

logger = logging.getLogger(__name__)


class AuditAction(enum.StrEnum):
    """PS3.15 A.5.3 event identifiers, named after the standard's messages."""

    QUERY = "110112"                 # Query
    INSTANCES_ACCESSED = "110103"    # DICOM Instances Accessed (metadata, rendered views)
    INSTANCES_TRANSFERRED = "110104"  # DICOM Instances Transferred (retrieve, store)
    STUDY_DELETED = "110105"         # DICOM Study Deleted


@dataclass(frozen=True)
class AuditEvent:
    """One access, as the trail records it (never a token; the ``jti`` names a link)."""

    action: AuditAction
    principal: str
    address: str
    study_uids: tuple[str, ...] = ()
    detail: str = ""
    success: bool = True
    jti: str | None = None
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


class AuditSink(Protocol):
    """Where audit events go. ``record`` is called from worker threads and must not raise."""

    def record(self, event: AuditEvent) -> None: ...


class LogAudit:
    """The default sink: a DEBUG log line per event (no patient names or IDs)."""

    def record(self, event: AuditEvent) -> None:
        logger.debug("audit %s by %s from %s studies=%s %s", event.action.name,
                     event.principal, event.address, ",".join(event.study_uids), event.detail)
