"""Key images of a study, as its Key Object Selection documents name them.

A Key Object Selection (KOS) document (PS3.3 A.35.4, template TID 2010) lists the instances it
selects twice: in CurrentRequestedProcedureEvidenceSequence (0040,A375), grouped by series with
ReferencedSOPSequence (0008,1199), and as IMAGE content items of its ContentSequence (0040,A730).
Both are read from the DICOM JSON stored at ingest (``Instance.metadata_json``), so no file is
opened. Only instances actually stored in the study are returned.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.models import Instance, Series, Study

KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"  # PS3.4 B.5, KOS Document Storage

EVIDENCE = "0040A375"  # CurrentRequestedProcedureEvidenceSequence
REFERENCED_SERIES = "00081115"  # ReferencedSeriesSequence
SERIES_UID = "0020000E"  # SeriesInstanceUID
REFERENCED_SOP = "00081199"  # ReferencedSOPSequence
REFERENCED_SOP_INSTANCE = "00081155"  # ReferencedSOPInstanceUID
CONTENT = "0040A730"  # ContentSequence
VALUE_TYPE = "0040A040"  # ValueType


@dataclass(frozen=True)
class KeyImage:
    series_instance_uid: str
    sop_instance_uid: str


def _items(element: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    value = element.get(tag, {}).get("Value", [])
    return [v for v in value if isinstance(v, dict)]


def _first(element: dict[str, Any], tag: str) -> str | None:
    value = element.get(tag, {}).get("Value", [])
    return str(value[0]) if value else None


def referenced_instances(metadata: dict[str, Any]) -> Iterator[str]:
    """SOP Instance UIDs a KOS document's DICOM JSON references (evidence and content)."""
    for evidence in _items(metadata, EVIDENCE):
        for series in _items(evidence, REFERENCED_SERIES):
            for ref in _items(series, REFERENCED_SOP):
                uid = _first(ref, REFERENCED_SOP_INSTANCE)
                if uid:
                    yield uid

    def content(items: list[dict[str, Any]]) -> Iterator[str]:
        for item in items:
            if _first(item, VALUE_TYPE) == "IMAGE":
                for ref in _items(item, REFERENCED_SOP):
                    uid = _first(ref, REFERENCED_SOP_INSTANCE)
                    if uid:
                        yield uid
            yield from content(_items(item, CONTENT))

    yield from content(_items(metadata, CONTENT))


def key_images(session: Session, study_instance_uid: str) -> list[KeyImage]:
    """The key images of a study, in series then instance order; empty if it has no KOS.

    Parameters
    ----------
    session
        An index session.
    study_instance_uid
        A validated Study Instance UID.
    """
    in_study = (
        select(Instance.pk).join(Series, Instance.series_pk == Series.pk)
        .join(Study, Series.study_pk == Study.pk)
        .where(Study.study_instance_uid == study_instance_uid)
    )
    wanted: set[str] = set()
    for metadata in session.scalars(
        select(Instance.metadata_json).where(Instance.pk.in_(in_study),
                                             Instance.sop_class_uid == KEY_OBJECT_SELECTION)
    ):
        wanted.update(referenced_instances(json.loads(metadata)))
    if not wanted:
        return []
    found = session.execute(
        select(Instance.sop_instance_uid, Instance.instance_number, Series.series_instance_uid,
               Series.series_number)
        .join(Series, Instance.series_pk == Series.pk)
        .where(Instance.pk.in_(in_study), Instance.sop_instance_uid.in_(sorted(wanted)))
    ).all()
    found = sorted(found, key=lambda r: (r.series_number or 0, r.series_instance_uid,
                                          r.instance_number or 0, r.sop_instance_uid))
    return [KeyImage(r.series_instance_uid, r.sop_instance_uid) for r in found]


__all__ = ["KEY_OBJECT_SELECTION", "KeyImage", "key_images", "referenced_instances"]
