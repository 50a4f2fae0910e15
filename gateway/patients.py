"""Facts about a patient identity that exist whether or not a study of it is stored.

A patient identity is a PatientID and its IssuerOfPatientID (empty when none was given): the
key the index's ``patient`` rows have, and the key the DSP portal names a patient by. The DSP
creation date ("studies acquired before it are not reachable through DSP links") is such a
fact: the portal may record it before the first image of the patient arrives, so it lives in
its own table (``dsp_patient``), not in the ``patient`` rows that come and go with studies.

An identity recorded with an empty issuer stands for the PatientID under any issuer; one
recorded with an issuer is preferred for studies of that issuer (:func:`dsp_created`).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from gateway.models import DspPatient


def same_patient(stored_id: str, stored_issuer: str, patient_id: str, issuer: str) -> bool:
    """Whether two patient identities are the same patient (PatientID plus IssuerOfPatientID
    where both name one).

    >>> same_patient("P1", "LUX", "P1", "")
    True
    >>> same_patient("P1", "LUX", "P1", "BEL")
    False
    >>> same_patient("P1", "", "P2", "")
    False
    """
    return stored_id == patient_id and (
        stored_issuer == issuer or not stored_issuer or not issuer)


def dsp_created(session: Session, patient_id: str, issuer: str = "") -> str | None:
    """The DSP creation date (``YYYYMMDD``) recorded for a patient identity, or ``None``.

    The row of the identity's own issuer wins over the row recorded without an issuer.
    """
    rows = session.execute(
        select(DspPatient.issuer_of_patient_id, DspPatient.dsp_created)
        .where(DspPatient.patient_id == patient_id,
               DspPatient.issuer_of_patient_id.in_(sorted({issuer, ""})))
    ).all()
    by_issuer = dict(rows)
    return by_issuer.get(issuer) or by_issuer.get("")


def set_dsp_created(session: Session, patient_id: str, issuer: str, date: str) -> None:
    """Record (or move) the DSP creation date of a patient identity, inside a unit of work.

    Parameters
    ----------
    patient_id, issuer
        The identity; ``issuer`` empty for "under any issuer".
    date
        ``YYYYMMDD`` (checked by the caller, :func:`gateway.confidentiality.normalise_date`).
    """
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stamp = datetime.now(UTC)
    session.execute(
        insert(DspPatient)
        .values(patient_id=patient_id, issuer_of_patient_id=issuer, dsp_created=date,
                updated_at=stamp)
        .on_conflict_do_update(index_elements=["patient_id", "issuer_of_patient_id"],
                               set_={"dsp_created": date, "updated_at": stamp}))


__all__ = ["dsp_created", "same_patient", "set_dsp_created"]
