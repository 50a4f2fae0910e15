"""Which stored instances a principal may see under a resource: the one rule, and one reference.

Every path that returns instances asks this module: WADO-RS (instances, metadata, bulk data,
frames, rendered, thumbnails) and DICOMweb delete through :func:`visible_instances` and
:func:`visible_metadata`; C-MOVE and C-GET through :func:`gateway.retrieve.instances_for`;
QIDO-RS and C-FIND through :func:`visible_conditions` (in :mod:`gateway.query`); viewer-link
key images through :mod:`gateway.keyimages`. The rule:

- a principal limited to some studies (a viewer session) sees only those;
- a principal limited to some instances (a key-images session) sees only those, and the series
  and studies that hold one of them;
- what is not in the index is seen by nobody: an instance an IHE IOCM rejection note took out
  (:mod:`gateway.rejection`) has no ``instance`` row.

A resource the principal may not see is reported exactly like one that does not exist
(:class:`~gateway.errors.NotFound`), so that a restricted session cannot learn which other
studies are stored. Front ends get :class:`InstanceRef` values, never rows or models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, bindparam, exists, false, select
from sqlalchemy.orm import Session

from gateway import events
from gateway.access import Principal
from gateway.errors import NotFound
from gateway.index import Index
from gateway.models import Instance, Patient, Series, Study
from gateway.uids import validate_uid


@dataclass(frozen=True)
class InstanceRef:
    """One stored instance as the front ends need it (no metadata): where its file is, how it
    is encoded, and where it sits in its study."""

    pk: int
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    file_path: str
    file_size: int
    digest: str
    number_of_frames: int  # 1 for a single-frame instance
    has_pixels: bool  # Rows is present: an image
    series_number: int | None
    instance_number: int | None
    pixels: int = 0  # Rows x Columns, as indexed (0 when unknown)


_COLUMNS = (
    Instance.pk, Study.study_instance_uid, Series.series_instance_uid, Instance.sop_instance_uid,
    Instance.sop_class_uid, Instance.transfer_syntax_uid, Instance.file_path,
    Instance.file_size, Instance.digest, Instance.number_of_frames, Instance.rows,
    Series.series_number, Instance.instance_number, Instance.columns,
)


def _ref(row: Sequence[Any]) -> InstanceRef:
    return InstanceRef(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8],
                       max(1, row[9] or 1), row[10] is not None, row[11], row[12],
                       (row[10] or 0) * (row[13] or 0))


def visible_conditions(principal: Principal, level: str = "IMAGE"
                       ) -> list[ColumnElement[bool]]:
    """The rule, as SQL conditions on rows of ``level`` joined to their parents.

    Parameters
    ----------
    principal
        Who asks.
    level
        ``STUDY`` (study rows), ``SERIES`` (series joined to study) or ``IMAGE`` (instances
        joined to series and study).

    Returns
    -------
    list of ColumnElement
        Empty for an unrestricted principal.
    """
    clauses: list[ColumnElement[bool]] = []
    if principal.study_uids is not None:
        if not principal.study_uids:
            clauses.append(false())
        else:
            clauses.append(Study.study_instance_uid.in_(sorted(principal.study_uids)))
    instance = visible_instance_condition(principal)
    if instance is not None:
        if level == "IMAGE":
            clauses.append(instance)
        elif level == "SERIES":
            clauses.append(exists().where(Instance.series_pk == Series.pk, instance))
        else:
            clauses.append(exists().where(
                Instance.series_pk == Series.pk, Series.study_pk == Study.pk, instance))
    return clauses


def visible_instance_condition(principal: Principal) -> ColumnElement[bool] | None:
    """The rule's condition on an ``instance`` row alone (``None``: every instance of the
    visible studies); what counts of series and instances count (:mod:`gateway.query`)."""
    if principal.instance_uids is None:
        return None
    return Instance.sop_instance_uid.in_(sorted(principal.instance_uids))


def _ordered(stmt: Select[Any]) -> Select[Any]:
    """Series by SeriesNumber, instances by InstanceNumber (what viewers expect)."""
    return stmt.order_by(Series.series_number, Series.pk, Instance.instance_number, Instance.pk)


def _by_path(columns: Sequence[Any], by_series: bool, by_sop: bool) -> Select[Any]:
    stmt = (select(*columns).join(Series, Series.pk == Instance.series_pk)
            .join(Study, Study.pk == Series.study_pk)
            .where(Study.study_instance_uid == bindparam("study")))
    if by_series:
        stmt = stmt.where(Series.series_instance_uid == bindparam("series"))
    if by_sop:
        stmt = stmt.where(Instance.sop_instance_uid == bindparam("sop"))
    return _ordered(stmt)


# Built once: the lookup runs on every frame request of an unrestricted principal.
_REFS = {(a, b): _by_path(_COLUMNS, a, b) for a in (False, True) for b in (False, True)}
_DIGESTS = {(a, b): _by_path((Instance.pk, Instance.digest), a, b)
            for a in (False, True) for b in (False, True)}
_METADATA = {(a, b): _by_path((Instance.metadata_json,), a, b)
             for a in (False, True) for b in (False, True)}


def describe(study: str, series: str | None, sop: str | None) -> str:
    if sop is not None:
        return f"instance {sop} of series {series} of study {study}"
    if series is not None:
        return f"series {series} of study {study}"
    return f"study {study}"


def validate_path(study: str, series: str | None = None, sop: str | None = None) -> None:
    """Check the UIDs of a resource path (:class:`~gateway.errors.InvalidUID`)."""
    validate_uid(study, "StudyInstanceUID")
    if series is not None:
        validate_uid(series, "SeriesInstanceUID")
    if sop is not None:
        validate_uid(sop, "SOPInstanceUID")


def _rows(index: Index, principal: Principal, prebuilt: dict[tuple[bool, bool], Select[Any]],
          study: str, series: str | None, sop: str | None) -> list[Any]:
    validate_path(study, series, sop)
    if not principal.may_see_study(study):
        return []  # the same answer as an unknown study
    statement = prebuilt[(series is not None, sop is not None)]
    if principal.restricted:
        statement = statement.where(*visible_conditions(principal))
    with index.engine.connect() as connection:
        return list(connection.execute(statement, {"study": study, "series": series,
                                                   "sop": sop}).all())


def visible_instances(index: Index, principal: Principal, study: str,
                      series: str | None = None, sop: str | None = None) -> list[InstanceRef]:
    """The instances under a study / series / instance that ``principal`` may see, in display
    order (series by SeriesNumber, instances by InstanceNumber).

    Raises
    ------
    InvalidUID
        A malformed UID.
    NotFound
        There are none (unknown, or not visible to ``principal``: the same answer).
    """
    rows = _rows(index, principal, _REFS, study, series, sop)
    if not rows:
        raise NotFound(f"no {describe(study, series, sop)} here")
    return [_ref(row) for row in rows]


def visible_digests(index: Index, principal: Principal, study: str,
                    series: str | None = None, sop: str | None = None) -> list[tuple[int, str]]:
    """``(pk, digest)`` of the visible instances, in display order (a metadata ETag).

    Raises
    ------
    NotFound
        There are none (unknown, or not visible to ``principal``).
    """
    rows = _rows(index, principal, _DIGESTS, study, series, sop)
    if not rows:
        raise NotFound(f"no {describe(study, series, sop)} here")
    return [(row[0], row[1]) for row in rows]


def visible_metadata(index: Index, principal: Principal, study: str,
                     series: str | None = None, sop: str | None = None) -> list[str]:
    """The stored DICOM JSON of the visible instances, in display order, unparsed."""
    return [row[0] for row in _rows(index, principal, _METADATA, study, series, sop)]


def retrieve_instances(index: Index, principal: Principal, *, patient_id: str | None = None,
                       study_uids: Sequence[str] = (), series_uids: Sequence[str] = (),
                       sop_uids: Sequence[str] = ()) -> list[InstanceRef]:
    """The visible instances named by UID lists (a retrieve identifier), in study, series and
    instance order; empty when nothing matches. UIDs must be validated by the caller."""
    stmt = (select(*_COLUMNS).join(Series, Series.pk == Instance.series_pk)
            .join(Study, Study.pk == Series.study_pk)
            .order_by(Study.pk, Series.series_number, Series.pk, Instance.instance_number,
                      Instance.pk))
    if patient_id:
        stmt = stmt.join(Patient, Study.patient_pk == Patient.pk).where(
            Patient.patient_id == patient_id)
    if study_uids:
        stmt = stmt.where(Study.study_instance_uid.in_(study_uids))
    if series_uids:
        stmt = stmt.where(Series.series_instance_uid.in_(series_uids))
    if sop_uids:
        stmt = stmt.where(Instance.sop_instance_uid.in_(sop_uids))
    stmt = stmt.where(*visible_conditions(principal))
    with index.engine.connect() as connection:
        return [_ref(row) for row in connection.execute(stmt).all()]


def remove_instances(index: Index, refs: Sequence[InstanceRef]) -> list[str]:
    """Delete the index rows of ``refs`` in one committed transaction (series, studies and
    patients left empty go too); return the relative paths of their files, to delete after
    the commit (:meth:`gateway.storage.FileStorage.delete_unindexed`).

    The events of the deletion (``study.deleted`` for a study left empty, :mod:`gateway.events`)
    are written to the outbox in the same transaction.
    """
    pks = [ref.pk for ref in refs]

    def work(session: Session) -> list[str]:
        before = events.before_removal(session, {ref.study_instance_uid for ref in refs})
        paths = index.remove_instances(session, pks)
        events.after_removal(session, before)
        return paths

    return index.write(work)


__all__ = [
    "InstanceRef",
    "describe",
    "remove_instances",
    "retrieve_instances",
    "validate_path",
    "visible_conditions",
    "visible_digests",
    "visible_instance_condition",
    "visible_instances",
    "visible_metadata",
]
