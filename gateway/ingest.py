"""One ingest path for C-STORE, STOW-RS and the CLI: validate, write durably, index.

A success is returned only once the file is on stable storage and its index row is committed.
An identical re-send (same data set bytes) is a no-op success. A different instance under a
stored SOP Instance UID is refused (:class:`~gateway.errors.Conflict`) and the original kept,
unless ``[storage] overwrite = true``.
"""

from __future__ import annotations

import enum
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gateway.errors import Conflict, InvalidInstance, SOPClassMismatch, TooLarge
from gateway.index import Index
from gateway.metadata import (
    DEFAULT_MAX_INFLATED_BYTES,
    ParsedInstance,
    dataset_digest,
    parse_instance,
)
from gateway.metrics import METRICS
from gateway.models import Instance, Patient, Series, Study
from gateway.storage import FileStorage, Spooled, relative_path

logger = logging.getLogger(__name__)


_INSTANCE_BY_UID = select(Instance.__table__.c.pk, Instance.__table__.c.digest).where(
    Instance.__table__.c.sop_instance_uid == bindparam("uid"))


# What the portal set on the study and patient of an instance (DSP rules, viewer_links): kept
# when a replaced instance was the last of its study and the rows are dropped and made again.
_POLICY_OF_INSTANCE = (
    select(Study.study_instance_uid, Study.confidentiality, Study.author,
           Patient.patient_id, Patient.issuer_of_patient_id, Patient.dsp_created)
    .select_from(Instance)
    .join(Series, Series.pk == Instance.series_pk)
    .join(Study, Study.pk == Series.study_pk)
    .join(Patient, Patient.pk == Study.patient_pk)
    .where(Instance.pk == bindparam("pk"))
)


def _restore_policy(session: Session, kept: Sequence[Any]) -> None:
    """Put back a study's confidentiality and its patient's DSP date after a replacement.

    Without this, replacing the only instance of a ``private`` study would make it ``normal``
    (the default of a new study row), visible to every relationship.
    """
    study_uid, level, author, patient_id, issuer, dsp_created = kept
    session.execute(update(Study).where(Study.study_instance_uid == study_uid)
                    .values(confidentiality=level, author=author))
    if dsp_created is not None:
        session.execute(update(Patient).where(Patient.patient_id == patient_id,
                                              Patient.issuer_of_patient_id == issuer,
                                              Patient.dsp_created.is_(None))
                        .values(dsp_created=dsp_created))


class Outcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    REPLACED = "replaced"


@dataclass(frozen=True)
class IngestResult:
    outcome: Outcome
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str


class Ingestor:
    """Stores instances: the function every front end calls to keep a received instance.

    Parameters
    ----------
    storage, index
        Where files and rows go.
    overwrite
        Replace a stored instance when a different one arrives under its SOP Instance UID.
    max_inflated_bytes
        The most a deflated data set may inflate to (``[storage] max_inflated_bytes``).
    """

    def __init__(self, storage: FileStorage, index: Index, *, overwrite: bool = False,
                 max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES) -> None:
        self.storage = storage
        self.index = index
        self.overwrite = overwrite
        self.max_inflated_bytes = max_inflated_bytes

    def ingest(
        self,
        data: bytes,
        *,
        source: str = "",
        expected_sop_class_uid: str | None = None,
        expected_sop_instance_uid: str | None = None,
        expected_study_instance_uid: str | None = None,
    ) -> IngestResult:
        """Validate, store and index one Part 10 instance.

        Parameters
        ----------
        data
            The instance as received, with preamble and file meta information.
        source
            Who sent it, for the record (``dimse:AE@host``, ``stow:...``, ``cli``).
        expected_sop_class_uid, expected_sop_instance_uid
            The Affected SOP Class/Instance UIDs of the C-STORE request (PS3.7 9.1.1).
        expected_study_instance_uid
            The study of a STOW-RS request to ``/studies/{study}`` (PS3.18 §10.5.1).

        Raises
        ------
        InvalidInstance
            Unparsable, truncated, or missing its identifying UIDs.
        SOPClassMismatch
            The data set does not match the SOP Class or Instance it was announced as.
        Conflict
            Another instance is stored under this SOP Instance UID (and overwrite is off).
        StorageFull
            No room left; nothing was kept.
        TooLarge
            A deflated data set inflating past ``max_inflated_bytes``; nothing was kept.
        """
        # A spool file is taken at once and the bytes go to it now (a large instance written
        # around the page cache; a small one written and flushed by the C library's threads
        # while this one checks it); once checked they are flushed, then named
        # (FileStorage.place), then indexed.
        spooled = self.storage.spool(data)
        try:
            parsed = self._check(data, expected_sop_class_uid, expected_sop_instance_uid,
                                 expected_study_instance_uid)
            parsed.digest = dataset_digest(data)
        except BaseException:
            # Removed before the refusal is answered: a refused instance leaves nothing.
            self.storage.discard(spooled)
            raise
        return self._store(parsed, spooled, source)

    def close(self) -> None:
        """Nothing to release: kept for the callers that close what they open."""

    def _check(self, data: bytes, expected_sop_class_uid: str | None,
               expected_sop_instance_uid: str | None,
               expected_study_instance_uid: str | None) -> ParsedInstance:
        parsed = parse_instance(data, digest=False, max_inflated_bytes=self.max_inflated_bytes)
        if expected_sop_class_uid and parsed.sop_class_uid != expected_sop_class_uid:
            raise SOPClassMismatch(
                f"the data set's SOPClassUID {parsed.sop_class_uid} differs from the "
                f"Affected SOP Class UID {expected_sop_class_uid} of the request"
            )
        if expected_sop_instance_uid and parsed.sop_instance_uid != expected_sop_instance_uid:
            raise SOPClassMismatch(
                f"the data set's SOPInstanceUID {parsed.sop_instance_uid} differs from the "
                f"Affected SOP Instance UID {expected_sop_instance_uid} of the request"
            )
        if expected_study_instance_uid and parsed.study_instance_uid != expected_study_instance_uid:
            raise SOPClassMismatch(
                f"the instance belongs to study {parsed.study_instance_uid}, not to "
                f"{expected_study_instance_uid} named in the request"
            )
        return parsed

    def _result(self, parsed: ParsedInstance, outcome: Outcome) -> IngestResult:
        METRICS.inc(f"gateway_instances_{outcome.value}_total")
        return IngestResult(outcome, parsed.sop_class_uid, parsed.sop_instance_uid,
                            parsed.study_instance_uid, parsed.series_instance_uid)

    def _against_existing(self, parsed: ParsedInstance, digest: str) -> IngestResult | None:
        if digest == parsed.digest:
            return self._result(parsed, Outcome.DUPLICATE)
        if not self.overwrite:
            logger.warning(
                "refused instance %s: a different instance is stored under this SOP Instance "
                "UID (stored digest %s, received %s); the original is kept",
                parsed.sop_instance_uid, digest[:12], parsed.digest[:12],
            )
            METRICS.inc("gateway_instances_conflict_total")
            raise Conflict(
                f"a different instance is already stored under SOP Instance UID "
                f"{parsed.sop_instance_uid}; the original is kept"
            )
        return None

    def _store(self, parsed: ParsedInstance, spooled: Spooled,
               source: str) -> IngestResult:
        try:
            relpath = relative_path(parsed.study_instance_uid, parsed.series_instance_uid,
                                    parsed.sop_instance_uid, parsed.digest)
            metadata_json = parsed.metadata_json()
        except BaseException:
            self.storage.discard(spooled)
            raise
        pending = self.storage.place(spooled, relpath)
        replaced: list[str] = []

        def new_instance(driver_connection: Any) -> bool:
            return self.index.add_new_instance(driver_connection, parsed, relpath, source,
                                               metadata_json)

        def work(session: Session) -> Outcome:
            old = session.connection().execute(
                _INSTANCE_BY_UID, {"uid": parsed.sop_instance_uid}).first()
            if old is not None:
                if old.digest == parsed.digest:
                    return Outcome.DUPLICATE
                self._against_existing(parsed, old.digest)  # raises Conflict unless overwrite
                kept = session.execute(
                    _POLICY_OF_INSTANCE, {"pk": old.pk}).first()
                replaced.extend(self.index.remove_instances(session, [old.pk]))
                self.index.add_instance(session, parsed, relpath, source, metadata_json)
                if kept is not None:
                    _restore_policy(session, kept)
                return Outcome.REPLACED
            self.index.add_instance(session, parsed, relpath, source, metadata_json)
            return Outcome.STORED

        try:
            # A new instance of a known series (nearly every one) in three statements without a
            # savepoint; anything else (a new series, a SOP Instance UID taken) in a second
            # transaction with every check. Not flushed before the acknowledgement: the spool
            # name keeps the flushed content until the storage's chores have flushed the index
            # too (FileStorage.finish), and recovery writes a row lost before then again.
            if self.index.write_bare(new_instance, durable=False):
                outcome = Outcome.STORED
            else:
                outcome = self.index.write(work, durable=False)
        except IntegrityError:
            # A concurrent writer stored the same SOP Instance UID between our check and commit.
            self.storage.abandon(pending, keep_final=self.index.has_file(relpath))
            existing = self.index.find_digest(parsed.sop_instance_uid)
            if existing is not None:
                result = self._against_existing(parsed, existing)
                if result is not None:
                    return result
            raise
        except BaseException:
            self.storage.abandon(pending, keep_final=self.index.has_file(relpath))
            raise
        if outcome is Outcome.DUPLICATE:
            # Found again by recovery, it would be a duplicate again: no flush of its removal.
            self.storage.abandon(pending, keep_final=True, flush=False)
            logger.info("instance %s already stored (identical re-send)", parsed.sop_instance_uid)
        else:
            self.storage.finish(pending)
        if replaced:
            # The replaced files go only once the row that replaced them is on stable storage
            # and no spool name is left for recovery to store them again.
            self.index.flush()
            self.storage.settle()
        for old_path in replaced:
            if old_path != relpath:
                self.storage.delete(old_path)
        if outcome is Outcome.REPLACED:
            logger.warning("replaced instance %s (storage.overwrite is on)",
                           parsed.sop_instance_uid)
        return self._result(parsed, outcome)


def stored_relpath(path: str) -> str | None:
    """The relative path the instance in the file at ``path`` is stored under (from its UIDs
    and data set digest, as :meth:`Ingestor.ingest` names it), or ``None`` if the file holds
    no readable instance: crash recovery's way to know what a spool file held
    (:meth:`FileStorage.recover`).
    """
    data = Path(path).read_bytes()
    try:
        parsed = parse_instance(data, digest=False)
        return relative_path(parsed.study_instance_uid, parsed.series_instance_uid,
                             parsed.sop_instance_uid, dataset_digest(data))
    except (InvalidInstance, TooLarge, ValueError):
        return None


def read_part10(path: Path) -> bytes:
    """Read a file for ingest, adding the Part 10 header if it is a bare data set.

    Raises
    ------
    InvalidInstance
        If the file is not DICOM, or is a DICOMDIR (a media index, not an instance).
    """
    data = path.read_bytes()
    if len(data) >= 132 and data[128:132] == b"DICM":
        if b"1.2.840.10008.1.3.10" in data[:1024]:
            raise InvalidInstance("a DICOMDIR is a media index, not an instance")
        return data
    try:
        ds = dcmread(io.BytesIO(data), force=True)
        if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
            raise InvalidInstance("not a DICOM file (no SOP Class and Instance UIDs)")
        implicit, little = ds.original_encoding
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit or implicit is None
            else ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian
        )
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
    except InvalidInstance:
        raise
    except Exception as exc:
        raise InvalidInstance(f"not a DICOM file: {type(exc).__name__}") from None
    return out.getvalue()
