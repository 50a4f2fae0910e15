"""Finding the stored instances a WADO-RS / delete URL names, as the principal may see them.

A resource the principal may not see is reported exactly like one that does not exist (404),
so that a restricted session cannot learn which other studies are stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from gateway.access import Principal
from gateway.errors import NotFound
from gateway.index import Index
from gateway.models import Instance, Series, Study
from gateway.uids import validate_uid


@dataclass(frozen=True)
class InstanceRef:
    """What retrieval needs of one stored instance (no metadata)."""

    pk: int
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    file_path: str
    file_size: int
    digest: str


def validate_path(study: str, series: str | None = None, instance: str | None = None) -> None:
    """Check the UIDs of a URL path (400 through :class:`~gateway.errors.InvalidUID`)."""
    validate_uid(study, "StudyInstanceUID")
    if series is not None:
        validate_uid(series, "SeriesInstanceUID")
    if instance is not None:
        validate_uid(instance, "SOPInstanceUID")


def _where(principal: Principal, study: str, series: str | None,
           instance: str | None) -> list[Any]:
    clauses: list[Any] = [Study.study_instance_uid == study]
    if series is not None:
        clauses.append(Series.series_instance_uid == series)
    if instance is not None:
        clauses.append(Instance.sop_instance_uid == instance)
    if not principal.may_see_study(study):
        clauses.append(Study.pk.is_(None))  # nothing: same answer as an unknown study
    if principal.instance_uids is not None:
        clauses.append(Instance.sop_instance_uid.in_(sorted(principal.instance_uids)))
    return clauses


def ordered(stmt: Any) -> Any:
    """Series by SeriesNumber, instances by InstanceNumber (what viewers expect)."""
    return stmt.order_by(Series.series_number, Series.pk, Instance.instance_number, Instance.pk)


def describe(study: str, series: str | None, instance: str | None) -> str:
    if instance is not None:
        return f"instance {instance} of series {series} of study {study}"
    if series is not None:
        return f"series {series} of study {study}"
    return f"study {study}"


def _visible(index: Index, principal: Principal, study: str, series: str | None,
             instance: str | None, *columns: Any) -> list[Any]:
    """``columns`` of the instances under a URL that ``principal`` may see, in display order."""
    stmt = ordered(
        select(*columns)
        .join(Series, Series.pk == Instance.series_pk)
        .join(Study, Study.pk == Series.study_pk)
        .where(*_where(principal, study, series, instance))
    )
    with index.Session() as session:
        return list(session.execute(stmt).all())


def find_instances(index: Index, principal: Principal, study: str, series: str | None = None,
                   instance: str | None = None) -> list[InstanceRef]:
    """The visible instances under a study / series / instance URL, in display order.

    Raises
    ------
    NotFound
        If there are none (unknown, or not visible to ``principal``).
    """
    rows = _visible(index, principal, study, series, instance,
                    Instance.pk, Study.study_instance_uid, Series.series_instance_uid,
                    Instance.sop_instance_uid, Instance.sop_class_uid,
                    Instance.transfer_syntax_uid, Instance.file_path, Instance.file_size,
                    Instance.digest)
    if not rows:
        raise NotFound(f"no {describe(study, series, instance)} here")
    return [InstanceRef(*row) for row in rows]


def metadata_digests(index: Index, principal: Principal, study: str, series: str | None,
                     instance: str | None) -> list[tuple[int, str]]:
    """``(pk, digest)`` of the visible instances, in display order (for the ETag)."""
    rows = _visible(index, principal, study, series, instance, Instance.pk, Instance.digest)
    if not rows:
        raise NotFound(f"no {describe(study, series, instance)} here")
    return [(row[0], row[1]) for row in rows]


def metadata_documents(index: Index, principal: Principal, study: str, series: str | None,
                       instance: str | None) -> list[str]:
    """The stored DICOM JSON of the visible instances, in display order, unparsed."""
    return [row[0] for row in _visible(index, principal, study, series, instance,
                                       Instance.metadata_json)]
