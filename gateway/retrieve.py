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
from typing import Literal

from gateway.access import Principal, PrincipalKind
from gateway.errors import InvalidQuery
from gateway.index import Index
from gateway.instances import InstanceRef, retrieve_instances
from gateway.uids import validate_uid

logger = logging.getLogger(__name__)

Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
LEVELS: tuple[Level, ...] = ("PATIENT", "STUDY", "SERIES", "IMAGE")
# A DIMSE peer allowed to retrieve: it sees every instance the index holds.
DIMSE_PEER = Principal(kind=PrincipalKind.DIMSE, id="peer")


def instances_for(
    index: Index,
    level: str,
    *,
    principal: Principal | None = None,
    patient_id: str | None = None,
    study_instance_uids: Sequence[str] = (),
    series_instance_uids: Sequence[str] = (),
    sop_instance_uids: Sequence[str] = (),
) -> list[InstanceRef]:
    """The stored instances named by a retrieve identifier (PS3.4 C.4.2.2.1).

    Parameters
    ----------
    index
        The gateway's index.
    level
        The Query/Retrieve Level: ``PATIENT``, ``STUDY``, ``SERIES`` or ``IMAGE``.
    principal
        Who asks; ``None``: a DIMSE peer, which sees what the index holds (its permission to
        retrieve at all is the peer rules', :mod:`dimse.peers`).
    patient_id
        Patient ID: required at ``PATIENT`` level, a filter when given at lower levels.
    study_instance_uids, series_instance_uids, sop_instance_uids
        The unique keys. The key of the retrieve level is required and may list several UIDs;
        keys above it are filters (at most one value each, as PS3.4 C.4.2.2.1 allows).

    Returns
    -------
    list of InstanceRef
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

    return retrieve_instances(
        index, principal or DIMSE_PEER, patient_id=patient_id, study_uids=study_instance_uids,
        series_uids=series_instance_uids, sop_uids=sop_instance_uids)


__all__ = ["LEVELS", "Level", "instances_for"]
