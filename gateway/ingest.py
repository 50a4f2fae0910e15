"""One ingest path for C-STORE, STOW-RS and the CLI: validate, write durably, index.

A success is returned only once the file is on stable storage and its index row is committed.
An identical re-send (same data set bytes) is a no-op success. A copy whose bytes differ from
those stored under its SOP Instance UID is compared with the stored one by
:mod:`gateway.equivalence`, outside the index's group commit: the same content in another
encoding is a duplicate too (the stored copy kept), as is a lossy copy of a lossless one;
another instance is refused (:class:`~gateway.errors.Conflict`) and the original kept, unless
``[storage] overwrite = true`` (docs/conformance-storage.md has the table).
"""

from __future__ import annotations

import enum
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gateway import audit
from gateway.equivalence import Comparison, Relation, compare_files
from gateway.errors import (
    Conflict,
    GatewayError,
    IdentityConflict,
    InstanceRejected,
    InvalidInstance,
    SOPClassMismatch,
)
from gateway.index import Index
from gateway.iocm import KEY_OBJECT_SELECTION, Rejection, rejection_of
from gateway.metadata import (
    DEFAULT_MAX_INFLATED_BYTES,
    ParsedInstance,
    dataset_digest,
    parse_instance,
)
from gateway.metrics import METRICS
from gateway.models import Instance, Series, Study
from gateway.rejection import RejectionResult, reject
from gateway.rejection import rejected as rejection_record
from gateway.storage import BlobStore, relative_path

logger = logging.getLogger(__name__)


_INSTANCE_BY_UID = select(Instance.__table__.c.pk, Instance.__table__.c.digest,
                          Instance.__table__.c.file_path).where(
    Instance.__table__.c.sop_instance_uid == bindparam("uid"))
# Times a received copy is compared with a stored one of another digest before giving up (the
# stored one replaced or deleted again each time, between the comparison and the index write).
MAX_COMPARISONS = 3


# What the portal set on the study of an instance (DSP rules, viewer_links): kept when a
# replaced instance was the last of its study and the rows are dropped and made again. (The
# patient's DSP creation date lives apart from the rows, gateway.patients.)
_POLICY_OF_INSTANCE = (
    select(Study.study_instance_uid, Study.confidentiality, Study.author)
    .select_from(Instance)
    .join(Series, Series.pk == Instance.series_pk)
    .join(Study, Study.pk == Series.study_pk)
    .where(Instance.pk == bindparam("pk"))
)


def _restore_policy(session: Session, kept: Sequence[Any]) -> None:
    """Put back a study's confidentiality after a replacement.

    Without this, replacing the only instance of a ``private`` study would make it ``normal``
    (the default of a new study row), visible to every relationship.
    """
    study_uid, level, author = kept
    session.execute(update(Study).where(Study.study_instance_uid == study_uid)
                    .values(confidentiality=level, author=author))


class Outcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    REPLACED = "replaced"


@dataclass(frozen=True)
class _Differs:
    """The index unit's answer when another copy is stored under the SOP Instance UID: it is
    compared with the received copy after the unit, never inside it (decoding pixel data
    would hold every writer of the group commit)."""

    file_path: str
    digest: str


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

    def __init__(self, storage: BlobStore, index: Index, *, overwrite: bool = False,
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
            Another instance is stored under this SOP Instance UID (and overwrite is off, or
            this is a lossy copy and the stored one lossless).
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
        parsed = None
        try:
            parsed = parse_instance(data, digest=False,
                                    max_inflated_bytes=self.max_inflated_bytes)
            self._check(parsed, expected_sop_class_uid, expected_sop_instance_uid,
                        expected_study_instance_uid)
            parsed.digest = dataset_digest(data)
        except BaseException as exc:
            # Removed before the refusal is answered: a refused instance leaves nothing.
            self.storage.discard(spooled)
            if parsed is not None and isinstance(exc, GatewayError):
                exc.sop_uids = (parsed.sop_class_uid, parsed.sop_instance_uid)
            raise
        try:
            return self._store(parsed, spooled, source)
        except GatewayError as exc:  # a conflict with the stored instance, a full disk
            exc.sop_uids = (parsed.sop_class_uid, parsed.sop_instance_uid)
            raise

    def close(self) -> None:
        """Nothing to release: kept for the callers that close what they open."""

    def _check(self, parsed: ParsedInstance, expected_sop_class_uid: str | None,
               expected_sop_instance_uid: str | None,
               expected_study_instance_uid: str | None) -> ParsedInstance:
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

    def _write_judged(self, parsed: ParsedInstance, relpath: str,
                      work: Callable[[Session], Outcome | _Differs],
                      may_replace: set[str]) -> Outcome | None:
        """Run the index unit ``work``; when it finds another copy stored under the SOP
        Instance UID, compare the two outside it and run it again if this copy replaces that
        one. ``None``: the same content as the stored copy, which is kept.

        Raises
        ------
        Conflict
            The stored instance differs and is kept.
        """
        for _ in range(MAX_COMPARISONS):
            try:
                outcome = self.index.write(work, durable=False)
            except IntegrityError:
                # A concurrent writer stored the same SOP Instance UID between the unit's
                # check and its insert: the unit again, against that writer's copy.
                if self.index.find_digest(parsed.sop_instance_uid) is None:
                    raise
                continue
            if not isinstance(outcome, _Differs):
                return outcome
            try:
                comparison = compare_files(self.storage.path(outcome.file_path),
                                           self.storage.path(relpath))
            except FileNotFoundError:
                continue  # the stored copy was deleted meanwhile: the index again
            if not self._replaces(parsed, outcome.digest, comparison):
                return None
            may_replace.add(outcome.digest)
        raise Conflict(
            f"the instance stored under SOP Instance UID {parsed.sop_instance_uid} changed "
            "while this copy was compared with it; send it again")

    def _replaces(self, parsed: ParsedInstance, stored_digest: str,
                  comparison: Comparison) -> bool:
        """Decide on a copy whose bytes differ from the stored one's: ``True`` to replace
        the stored copy, ``False`` to keep it (a duplicate, success).

        A lossy copy never replaces a lossless one (PS3.3 C.7.6.1.1.5: lossy compression is
        irreversible); a lossless copy of a stored lossy one replaces it only with
        ``overwrite``; another instance is refused unless ``overwrite`` (the original kept).

        Raises
        ------
        Conflict
            The copy is refused.
        """
        uid, relation = parsed.sop_instance_uid, comparison.relation
        if relation is Relation.STORED_LOSSY and self.overwrite:
            return True
        if relation is not Relation.DIFFERENT:
            METRICS.inc("gateway_instances_equivalent_total")
            logger.info("instance %s already stored (a re-send in another encoding: %s; the "
                        "stored copy kept)", uid, _described(comparison))
            return False
        lossy_over_lossless = comparison.received_lossy and not comparison.stored_lossy
        if self.overwrite and not lossy_over_lossless:
            return True
        reason = ("a lossy copy never replaces a lossless one" if self.overwrite
                  else "the original is kept")
        logger.warning(
            "refused instance %s: a different instance is stored under this SOP Instance UID "
            "(stored digest %s, received %s; %s); %s", uid, stored_digest[:12],
            parsed.digest[:12], comparison.detail, reason)
        METRICS.inc("gateway_instances_conflict_total")
        raise Conflict(
            f"a different instance is already stored under SOP Instance UID {uid} "
            f"({comparison.detail}); {reason}")

    def _store(self, parsed: ParsedInstance, spooled: Any,
               source: str) -> IngestResult:
        try:
            relpath = relative_path(parsed.study_instance_uid, parsed.series_instance_uid,
                                    parsed.sop_instance_uid, parsed.digest)
            metadata_json = parsed.metadata_json()
        except BaseException:
            self.storage.discard(spooled)
            raise
        rejection: Rejection | None = None
        kos: dict[str, Any] = {}
        if parsed.sop_class_uid == KEY_OBJECT_SELECTION:  # an IOCM rejection note? (rare)
            kos = json.loads(metadata_json)
            rejection = rejection_of(kos)
        pending = self.storage.place(spooled, relpath)
        replaced: list[str] = []
        rejected: list[RejectionResult] = []
        may_replace: set[str] = set()  # stored digests this copy was judged to replace

        def new_instance(driver_connection: Any) -> bool:
            return self.index.add_new_instance(driver_connection, parsed, relpath, source,
                                               metadata_json)

        def work(session: Session) -> Outcome | _Differs:
            replaced.clear()  # run again after a comparison or a concurrent insert
            rejected.clear()
            old = session.connection().execute(
                _INSTANCE_BY_UID, {"uid": parsed.sop_instance_uid}).first()
            if old is not None:
                if old.digest == parsed.digest:
                    return Outcome.DUPLICATE
                if old.digest not in may_replace:
                    return _Differs(old.file_path, old.digest)
                kept = session.execute(
                    _POLICY_OF_INSTANCE, {"pk": old.pk}).first()
                replaced.extend(self.index.remove_instances(session, [old.pk]))
                self.index.add_instance(session, parsed, relpath, source, metadata_json)
                if kept is not None:
                    _restore_policy(session, kept)
                return Outcome.REPLACED
            record = rejection_record(session, parsed.sop_instance_uid)
            if record is not None:
                if record.note_uid == record.sop_instance_uid and record.digest == parsed.digest:
                    return Outcome.DUPLICATE  # the same rejection note, sent again
                raise InstanceRejected(
                    f"rejected by IOCM note {record.note_uid} ({record.code}): instance "
                    f"{parsed.sop_instance_uid} is not stored again")
            if rejection is not None:
                rejected.append(reject(session, self.index, parsed, rejection, kos, relpath))
                return Outcome.STORED
            self.index.add_instance(session, parsed, relpath, source, metadata_json)
            return Outcome.STORED

        try:
            # A new instance of a known series (nearly every one) in three statements without a
            # savepoint; anything else (a new series, a SOP Instance UID taken) in a second
            # transaction with every check. Not flushed before the acknowledgement: the spool
            # name keeps the flushed content until the storage's chores have flushed the index
            # too (FileStorage.finish), and recovery writes a row lost before then again.
            outcome: Outcome | None = Outcome.STORED
            if rejection is not None or not self.index.write_bare(new_instance, durable=False):
                outcome = self._write_judged(parsed, relpath, work, may_replace)
        except IdentityConflict as exc:
            self.storage.abandon(pending, keep_final=self.index.has_file(relpath))
            self._record_identity_conflict(parsed, source, exc)
            raise
        except BaseException:
            self.storage.abandon(pending, keep_final=self.index.has_file(relpath))
            raise
        if outcome is None:
            # The same content as the stored copy: this one goes (its name is its own digest's,
            # not the stored file's), its removal flushed lest recovery store it again.
            self.storage.abandon(pending, keep_final=self.index.has_file(relpath))
            return self._result(parsed, Outcome.DUPLICATE)
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
        for done in rejected:
            self._after_rejection(done, source)
        return self._result(parsed, outcome)

    def _after_rejection(self, done: RejectionResult, source: str) -> None:
        """Delete what a 113039 note deletes, then put the rejection in the trail."""
        doomed = done.files_to_delete()
        if doomed:
            self.index.flush()
            self.storage.settle()
            self.storage.delete_unindexed(doomed, self.index.has_file)
        logger.warning("IOCM rejection note %s (%s, %s): %d instances rejected, %d named but "
                       "not stored", done.note_uid, done.rejection.value,
                       done.rejection.meaning, len(done.removed), len(done.pending))
        METRICS.inc("gateway_instances_rejected_by_note_total", len(done.removed))
        for study_uid in sorted(done.study_uids):
            audit.record(self.index, audit.Action.REJECT, actor=source,
                         patient_id=done.patient_id, study_uid=study_uid,
                         instance_uids=done.removed + done.pending,
                         detail=f"IOCM rejection note {done.note_uid}: {done.rejection.meaning} "
                                f"({done.rejection.value}); {len(done.removed)} rejected"
                                + (", files deleted" if doomed else ""))

    def _record_identity_conflict(self, parsed: ParsedInstance, source: str,
                                  exc: IdentityConflict) -> None:
        """Put a wrong-patient refusal in the trail of both patients (each entry names only
        its own patient)."""
        logger.warning("refused instance %s from %s: %s", parsed.sop_instance_uid, source, exc)
        METRICS.inc("gateway_instances_identity_conflict_total")
        f = parsed.fields
        entries = [(f["patient_id"], parsed.study_instance_uid,
                    f"refused: study {parsed.study_instance_uid} or series "
                    f"{parsed.series_instance_uid} belongs to another patient or study")]
        if exc.owner is not None and exc.owner[0] != f["patient_id"]:
            entries.append((exc.owner[0], exc.study_uid or parsed.study_instance_uid,
                            f"refused an instance of another patient sent into study "
                            f"{exc.study_uid or parsed.study_instance_uid}"))
        elif exc.owner is not None:
            entries[0] = (f["patient_id"], exc.study_uid or parsed.study_instance_uid,
                          str(exc))
        for patient_id, study_uid, detail in entries:
            audit.record(self.index, audit.Action.STORE, outcome=audit.Outcome.SERIOUS_FAILURE,
                         actor=source, patient_id=patient_id, study_uid=study_uid,
                         instance_uids=[parsed.sop_instance_uid], detail=detail)


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


def _described(comparison: Comparison) -> str:
    """How a kept re-send relates to the stored copy, for the log."""
    lossy = {Relation.SAME: "the same content",
             Relation.RECEIVED_LOSSY: "a lossy copy of the stored lossless one",
             Relation.STORED_LOSSY: "a lossless copy of the stored lossy one"}
    text = lossy.get(comparison.relation, comparison.relation.value)
    if comparison.psnr_db is not None:
        text += f", {comparison.psnr_db:.1f} dB"
    return text
