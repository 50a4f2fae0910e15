"""IHE IOCM rejection: a rejection note takes the instances it names out of the archive.

IHE IOCM (Imaging Object Change Management) asks an Image Manager/Archive, on receiving a Key
Object Selection document titled with a rejection code (PS3.16 CID 7011, :class:`Rejection`),
to stop returning the instances it names, from every query and every retrieval, and to refuse
them if they are sent again; for "Data Retention Policy Expired" (113039) to delete them.

How the gateway does it, inside the one transaction that stores the note
(:meth:`gateway.ingest.Ingestor.ingest`):

1. the note's own row goes to ``rejected_instance`` (not to ``instance``): the note itself is
   kept on storage for the record, but no query or retrieval returns it;
2. each instance it names (evidence and IMAGE content items, :func:`gateway.iocm.references`)
   that is stored must belong to the note's patient, or the whole note is refused
   (:class:`~gateway.errors.IdentityConflict`): a note cannot reach into another patient's
   record;
3. each named instance gets a ``rejected_instance`` row (with its file's path, unless the
   rejection deletes files), whether it is stored yet or not, so that it is refused when it
   arrives (re-sent, or sent after the note);
4. the named instances' ``instance`` rows are removed with :meth:`Index.remove_instances`,
   which drops the series and studies left empty and recomputes ModalitiesInStudy: every path
   that reads the index (QIDO-RS and its counts, WADO-RS, metadata, frames, rendered,
   thumbnails, C-FIND, C-MOVE, C-GET, viewer sessions, key images) stops seeing them at once,
   with no condition to add to any of them;
5. ``instances.rejected`` for each study it took instances out of, and ``study.deleted`` for
   a study left empty, go to the outbox in the same transaction (:mod:`gateway.events`);
6. after the commit, for 113039, the rejected files are deleted (:func:`files_to_delete`).

The rows in ``rejected_instance`` are what makes a re-send refused
(:class:`~gateway.errors.InstanceRejected`, C-STORE 0xA771), checked by the hot path's insert
itself and by :meth:`Index.add_instance`'s caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway import events
from gateway.errors import IdentityConflict
from gateway.index import Index, now
from gateway.iocm import Rejection, references
from gateway.metadata import ParsedInstance
from gateway.models import Instance, Patient, RejectedInstance, Series, Study
from gateway.patients import same_patient


@dataclass
class RejectionResult:
    """What a rejection note did, for the trail and for the files to delete after commit."""

    rejection: Rejection
    note_uid: str
    patient_id: str
    issuer: str
    study_uids: set[str] = field(default_factory=set)
    removed: list[str] = field(default_factory=list)  # SOP Instance UIDs taken out
    pending: list[str] = field(default_factory=list)  # named, not stored (refused later)
    files: list[str] = field(default_factory=list)  # relative paths of the removed files

    def files_to_delete(self) -> list[str]:
        """The removed instances' files, if the rejection deletes them (113039)."""
        return list(self.files) if self.rejection.deletes else []


def reject(session: Session, index: Index, note: ParsedInstance, rejection: Rejection,
           metadata: Mapping[str, Any], relpath: str) -> RejectionResult:
    """Apply a rejection note inside a unit of work (:meth:`Index.write`); see the module.

    Parameters
    ----------
    note
        The rejection note as parsed at ingest.
    metadata
        Its DICOM JSON (the references are read from it).
    relpath
        Where its file is stored.

    Raises
    ------
    IdentityConflict
        It names a stored instance of another patient: nothing is rejected or stored.
    """
    fields = note.fields
    patient_id, issuer = fields["patient_id"], fields["issuer_of_patient_id"]
    result = RejectionResult(rejection, note.sop_instance_uid, patient_id, issuer,
                             study_uids={note.study_instance_uid})
    named = {ref.sop_instance_uid: ref for ref in references(metadata)}
    named.pop(note.sop_instance_uid, None)
    stamp = now()
    session.add(RejectedInstance(
        sop_instance_uid=note.sop_instance_uid, study_instance_uid=note.study_instance_uid,
        series_instance_uid=note.series_instance_uid, patient_id=patient_id,
        issuer_of_patient_id=issuer, code=rejection.value, note_uid=note.sop_instance_uid,
        file_path=relpath, digest=note.digest, rejected_at=stamp))
    if not named:
        return result
    uids = sorted(named)
    stored = session.execute(
        select(Instance.pk, Instance.sop_instance_uid, Instance.file_path, Instance.digest,
               Series.series_instance_uid, Study.study_instance_uid, Patient.patient_id,
               Patient.issuer_of_patient_id)
        .join(Series, Series.pk == Instance.series_pk)
        .join(Study, Study.pk == Series.study_pk)
        .join(Patient, Patient.pk == Study.patient_pk)
        .where(Instance.sop_instance_uid.in_(uids))
    ).all()
    for row in stored:
        if not same_patient(row.patient_id, row.issuer_of_patient_id, patient_id, issuer):
            raise IdentityConflict(
                f"rejection note names another patient's instance {row.sop_instance_uid}; a "
                "note rejects only its own patient's instances: nothing was rejected or "
                "stored")
    already = set(session.scalars(
        select(RejectedInstance.sop_instance_uid)
        .where(RejectedInstance.sop_instance_uid.in_(uids))))
    found = {row.sop_instance_uid for row in stored}
    for row in stored:
        result.removed.append(row.sop_instance_uid)
        result.study_uids.add(row.study_instance_uid)
        if row.sop_instance_uid in already:
            continue
        session.add(RejectedInstance(
            sop_instance_uid=row.sop_instance_uid, study_instance_uid=row.study_instance_uid,
            series_instance_uid=row.series_instance_uid, patient_id=row.patient_id,
            issuer_of_patient_id=row.issuer_of_patient_id, code=rejection.value,
            note_uid=note.sop_instance_uid,
            file_path=None if rejection.deletes else row.file_path, digest=row.digest,
            rejected_at=stamp))
    for uid in uids:
        if uid in found or uid in already:
            continue
        ref = named[uid]
        session.add(RejectedInstance(
            sop_instance_uid=uid, study_instance_uid=ref.study_instance_uid
            or note.study_instance_uid, series_instance_uid=ref.series_instance_uid or "",
            patient_id=patient_id, issuer_of_patient_id=issuer, code=rejection.value,
            note_uid=note.sop_instance_uid, file_path=None, digest=None, rejected_at=stamp))
        result.pending.append(uid)
    before = events.before_removal(session, {row.study_instance_uid for row in stored})
    result.files = index.remove_instances(session, [row.pk for row in stored])
    removed: dict[str, list[str]] = {}
    for row in stored:
        removed.setdefault(row.study_instance_uid, []).append(row.sop_instance_uid)
    events.record_rejection(session, before, removed, rejection.value, rejection.meaning,
                            note.sop_instance_uid)
    return result


def rejected(session: Session, sop_instance_uid: str) -> RejectedInstance | None:
    """The rejection record of an instance (or of a rejection note), if any."""
    return session.get(RejectedInstance, sop_instance_uid)


__all__ = ["RejectionResult", "reject", "rejected"]
