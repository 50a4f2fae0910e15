"""Which stored instances a retrieval names: the UID-level lookup behind C-MOVE and C-GET.

A retrieve request names instances by the unique keys of the Query/Retrieve information model
(PS3.4 C.4.2.2.1 and C.4.3.2.1): at the retrieve level a list of UIDs (or one Patient ID), and
above it at most one value per unique key. No matching rules apply (those are C-FIND's, in
:mod:`gateway.query`): this is an exact lookup, transport-free, shared by every front end that
sends instances out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy import select

from gateway.errors import InvalidQuery
from gateway.index import Index
from gateway.models import Instance, Patient, Series, Study
from gateway.storage import FileStorage
from gateway.uids import validate_uid

logger = logging.getLogger(__name__)

Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
LEVELS: tuple[Level, ...] = ("PATIENT", "STUDY", "SERIES", "IMAGE")


@dataclass(frozen=True)
class StoredInstance:
    """One instance to send: where its file is and how it is encoded."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path
    file_size: int


def instances_for(
    index: Index,
    storage: FileStorage,
    level: str,
    *,
    patient_id: str | None = None,
    study_instance_uids: Sequence[str] = (),
    series_instance_uids: Sequence[str] = (),
    sop_instance_uids: Sequence[str] = (),
) -> list[StoredInstance]:
    """The stored instances named by a retrieve identifier (PS3.4 C.4.2.2.1).

    Parameters
    ----------
    index, storage
        The gateway's index and blob store.
    level
        The Query/Retrieve Level: ``PATIENT``, ``STUDY``, ``SERIES`` or ``IMAGE``.
    patient_id
        Patient ID: required at ``PATIENT`` level, a filter when given at lower levels.
    study_instance_uids, series_instance_uids, sop_instance_uids
        The unique keys. The key of the retrieve level is required and may list several UIDs;
        keys above it are filters (at most one value each, as PS3.4 C.4.2.2.1 allows).

    Returns
    -------
    list of StoredInstance
        In study, series and instance number order; empty when nothing matches.

    Raises
    ------
    InvalidQuery
        On an unknown level, a missing unique key, several values for a key above the retrieve
        level, or a malformed UID (:class:`~gateway.errors.InvalidUID`).
    """
    if level not in LEVELS:
        raise InvalidQuery(f"Query/Retrieve Level {level!r} is not one of {', '.join(LEVELS)}")
    depth = LEVELS.index(level)
    keys = (
        ("StudyInstanceUID", list(study_instance_uids), 1),
        ("SeriesInstanceUID", list(series_instance_uids), 2),
        ("SOPInstanceUID", list(sop_instance_uids), 3),
    )
    for keyword, uids, key_depth in keys:
        for uid in uids:
            validate_uid(uid, keyword)
        if key_depth == depth and not uids:
            raise InvalidQuery(f"a {level} level retrieve needs {keyword} (PS3.4 C.4.2.2.1)")
        if key_depth < depth and len(uids) > 1:
            raise InvalidQuery(
                f"{keyword} above the retrieve level takes one value, not {len(uids)}"
            )
        if key_depth > depth and uids:
            raise InvalidQuery(f"{keyword} is below the {level} retrieve level")
    if depth == 0 and not patient_id:
        raise InvalidQuery("a PATIENT level retrieve needs PatientID (PS3.4 C.4.2.2.1)")

    statement = (
        select(
            Study.study_instance_uid,
            Series.series_instance_uid,
            Instance.sop_instance_uid,
            Instance.sop_class_uid,
            Instance.transfer_syntax_uid,
            Instance.file_path,
            Instance.file_size,
        )
        .join(Series, Instance.series_pk == Series.pk)
        .join(Study, Series.study_pk == Study.pk)
        .order_by(Study.pk, Series.series_number, Series.pk, Instance.instance_number,
                  Instance.pk)
    )
    if patient_id:
        statement = statement.join(Patient, Study.patient_pk == Patient.pk).where(
            Patient.patient_id == patient_id
        )
    if study_instance_uids:
        statement = statement.where(Study.study_instance_uid.in_(study_instance_uids))
    if series_instance_uids:
        statement = statement.where(Series.series_instance_uid.in_(series_instance_uids))
    if sop_instance_uids:
        statement = statement.where(Instance.sop_instance_uid.in_(sop_instance_uids))
    with index.Session() as session:
        rows = session.execute(statement).all()
    return [
        StoredInstance(
            study_instance_uid=row.study_instance_uid,
            series_instance_uid=row.series_instance_uid,
            sop_instance_uid=row.sop_instance_uid,
            sop_class_uid=row.sop_class_uid,
            transfer_syntax_uid=row.transfer_syntax_uid,
            path=storage.path(row.file_path),
            file_size=row.file_size,
        )
        for row in rows
    ]


__all__ = ["LEVELS", "Level", "StoredInstance", "instances_for"]
