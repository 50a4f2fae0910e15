"""The access trail: who accessed which patient's images, when, from where, with what outcome.

Every viewer link made, opened or refused, every DICOMweb, FHIR or DIMSE query or retrieval,
and every store (per STOW-RS request, DIMSE association or ingest run: :class:`StoredInstances`)
is one row per study of ``audit_event`` in the index database, in one vocabulary
(:class:`Action`, mapped once to PS3.15 events by :data:`EVENTS`). Front ends record through
``Gateway.audit`` (:class:`DatabaseAudit`). The table is
append-only: nothing in the code updates or deletes it, and the migration installs triggers that
make the database refuse to (DSP: "patients can see who accessed their record").

Front ends call :func:`record` (or :func:`add` inside a unit of work they already run through
``Index.write``)::

    from gateway import audit
    audit.record(gateway.index, audit.Action.QUERY, principal=principal,
                 study_uid=uid, address=request.remote, detail="QIDO-RS studies")

The trail is exported as FHIR R4 AuditEvent resources in the style of IHE Basic Audit Log
Patterns (:func:`fhir_bundle`) and as DICOM PS3.15 A.5 audit messages (:func:`dicom_audit_message`).
Tokens are never recorded; links are named by their ``jti``. Patient names never enter the trail.
"""

from __future__ import annotations

import enum
import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from gateway.access import Principal
from gateway.index import Index
from gateway.models import AuditRecord, Patient, Study, ViewerLink

logger = logging.getLogger(__name__)

DCM = "DCM"  # PS3.16 coding scheme designator of the DICOM controlled terminology
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
AUDIT_SOURCE_ID = "dicom-gateway"
MAX_INSTANCES = 1000  # instance UIDs kept per entry; more are counted in the detail


class Action(enum.StrEnum):
    """What was done: the trail's one vocabulary, used by every front end.

    Each maps to a PS3.15 A.5.3 event (:data:`EVENTS`, the table of docs/conformance.md).
    """

    LINK_MINT = "link.mint"
    LINK_REVOKE = "link.revoke"
    LINK_OPEN = "link.open"
    LINK_REFUSE = "link.refuse"
    POLICY_CHANGE = "policy.change"  # confidentiality level or DSP creation date set
    QUERY = "query"  # QIDO-RS, C-FIND, FHIR ImagingStudy search and read
    RETRIEVE = "retrieve"  # WADO-RS metadata, bulk data, rendered, thumbnails; C-GET
    TRANSFER = "transfer"  # WADO-RS instances and frames; C-MOVE to another node
    STORE = "store"  # STOW-RS, C-STORE, CLI ingest (one entry per request, association, run)
    DELETE = "delete"  # DICOMweb DELETE
    REJECT = "reject"  # an IHE IOCM rejection note took instances out of the archive
    AUDIT_READ = "audit.read"


class Outcome(enum.IntEnum):
    """EventOutcomeIndicator, PS3.15 A.5.1 (also FHIR AuditEvent.outcome)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


@dataclass(frozen=True)
class EventCode:
    """EventID (PS3.15 A.5.3, CID 150) and EventActionCode (C, R, U, D, E)."""

    code: str
    meaning: str
    action_code: str


EVENTS: dict[Action, EventCode] = {
    Action.LINK_MINT: EventCode("110136", "Security Roles Changed", "C"),
    Action.LINK_REVOKE: EventCode("110136", "Security Roles Changed", "D"),
    Action.POLICY_CHANGE: EventCode("110136", "Security Roles Changed", "U"),
    Action.LINK_OPEN: EventCode("110114", "User Authentication", "E"),
    Action.LINK_REFUSE: EventCode("110114", "User Authentication", "E"),
    Action.QUERY: EventCode("110112", "Query", "E"),
    Action.RETRIEVE: EventCode("110103", "DICOM Instances Accessed", "R"),
    Action.TRANSFER: EventCode("110104", "DICOM Instances Transferred", "R"),
    Action.STORE: EventCode("110104", "DICOM Instances Transferred", "C"),
    Action.DELETE: EventCode("110105", "DICOM Study Deleted", "D"),
    Action.REJECT: EventCode("110103", "DICOM Instances Accessed", "U"),
    Action.AUDIT_READ: EventCode("110101", "Audit Log Used", "R"),
}


def add(
    session: Session,
    action: Action | str,
    *,
    outcome: Outcome | int = Outcome.SUCCESS,
    principal: Principal | None = None,
    actor: str | None = None,
    actor_name: str | None = None,
    relationship: str | None = None,
    study_uid: str | None = None,
    instance_uids: Iterable[str] | None = None,
    patient_id: str | None = None,
    address: str | None = None,
    jti: str | None = None,
    detail: str = "",
) -> AuditRecord:
    """Append one entry inside a unit of work already running (``Index.write``).

    Parameters
    ----------
    session
        The session of the running unit of work; the entry commits (or rolls back) with it.
    action
        What was done (:class:`Action`).
    outcome
        PS3.15 A.5.1 EventOutcomeIndicator.
    principal
        Who did it; fills ``actor``, ``actor_name``, ``relationship`` and ``jti`` unless given.
    study_uid, instance_uids
        What was accessed. The patient is looked up from the study when not given.
    address
        The peer's network address (PS3.15 NetworkAccessPointID).
    detail
        A short free text (the transaction, the refusal reason). Never a token or a name.
    """
    action = Action(action)
    if principal is not None:
        actor = actor or principal.audit_name
        actor_name = actor_name or principal.display_name
        relationship = relationship or principal.relationship
        jti = jti or principal.jti
    if patient_id is None and study_uid:
        patient_id = session.scalar(
            select(Patient.patient_id).join(Study, Study.patient_pk == Patient.pk)
            .where(Study.study_instance_uid == study_uid)
        )
    uids: list[str] | None = None
    if instance_uids is not None:
        uids = list(instance_uids)
        if len(uids) > MAX_INSTANCES:
            detail = f"{detail} ({len(uids)} instances, first {MAX_INSTANCES} listed)".strip()
            uids = uids[:MAX_INSTANCES]
    event = AuditRecord(
        recorded_at=datetime.now(UTC),
        action=action.value,
        outcome=int(outcome),
        actor=(actor or "")[:200],
        actor_name=(actor_name or "")[:200],
        actor_relationship=relationship,
        address=(address or "")[:64],
        patient_id=patient_id,
        study_instance_uid=study_uid,
        instance_uids=json.dumps(uids) if uids is not None else None,
        jti=jti,
        detail=detail[:500],
    )
    session.add(event)
    return event


def add_many(
    session: Session,
    action: Action | str,
    study_uids: Sequence[str | None],
    *,
    outcome: Outcome | int = Outcome.SUCCESS,
    actor: str | None = None,
    actor_name: str | None = None,
    relationship: str | None = None,
    instance_uids: Iterable[str] | None = None,
    address: str | None = None,
    jti: str | None = None,
    detail: str = "",
    stored: StoredInstances | None = None,
    patients: Mapping[str, str] | None = None,
) -> None:
    """Append one entry per study in one statement; the same fields as :func:`add`.

    ``patients`` gives the PatientID of studies the caller knows (not looked up again).

    With ``stored``, each study's entry lists the instances stored in it (and says how many
    there were) instead of ``instance_uids``.

    The patients of all the studies are looked up in one SELECT (per 500 studies) and the rows
    written with one multi-row INSERT, instead of a lookup and an ORM flush per study: a C-FIND
    with many matches records them all before its first response.
    """
    action = Action(action)
    uids: list[str] | None = None
    if instance_uids is not None:
        uids = list(instance_uids)
        if len(uids) > MAX_INSTANCES:
            detail = f"{detail} ({len(uids)} instances, first {MAX_INSTANCES} listed)".strip()
            uids = uids[:MAX_INSTANCES]
    patients = dict(patients or {})
    known = [uid for uid in dict.fromkeys(study_uids) if uid and uid not in patients]
    for start in range(0, len(known), 500):
        chunk = known[start:start + 500]
        for study_uid, patient_id in session.execute(
            select(Study.study_instance_uid, Patient.patient_id)
            .join(Patient, Study.patient_pk == Patient.pk)
            .where(Study.study_instance_uid.in_(chunk))
        ):
            patients[study_uid] = patient_id
    now = datetime.now(UTC)
    common = {
        "recorded_at": now, "action": action.value, "outcome": int(outcome),
        "actor": (actor or "")[:200], "actor_name": (actor_name or "")[:200],
        "actor_relationship": relationship, "address": (address or "")[:64],
        "instance_uids": json.dumps(uids) if uids is not None else None, "jti": jti,
        "detail": detail[:500],
    }
    rows = [{**common, "patient_id": patients.get(uid) if uid else None,
             "study_instance_uid": uid} for uid in study_uids]
    if stored is not None:
        for row, uid in zip(rows, study_uids, strict=True):
            count = stored.counts.get(uid or "", 0)
            listed = stored.studies.get(uid or "", [])
            note = f"{count} instances" + (f", first {len(listed)} listed"
                                           if count > len(listed) else "")
            row["instance_uids"] = json.dumps(listed)
            row["detail"] = f"{detail} ({note})".strip()[:500]
    if rows:
        session.execute(insert(AuditRecord), rows)


def record(index: Index, action: Action | str, **fields: Any) -> None:
    """Append one entry in its own (group-committed) transaction; see :func:`add`.

    Blocking: call it from a thread (``await asyncio.to_thread(audit.record, ...)``) on the
    event loop. Returns once the entry is committed.
    """

    def work(session: Session) -> None:
        add(session, action, **fields)

    index.write(work)


# -- the sink interface the front ends call (DICOMweb, DIMSE, the CLI) ---------------------------
@dataclass(frozen=True)
class AuditEvent:
    """One access, as a front end reports it (never a token; the ``jti`` names a link).

    ``study_uids`` with ``instance_uids`` names what was accessed (the same instances for
    each study); ``stored`` instead names, per study, the instances a unit of work stored
    (:class:`StoredInstances`), so that each study's entry lists its own.
    """

    action: Action
    principal: str
    address: str
    study_uids: tuple[str, ...] = ()
    detail: str = ""
    success: bool = True
    jti: str | None = None
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    instance_uids: tuple[str, ...] = ()
    stored: StoredInstances | None = None
    # (study, PatientID) pairs the front end already knows (a search's matches): those
    # studies' patients are not looked up again.
    patients: tuple[tuple[str, str], ...] = ()


class AuditSink(Protocol):
    """Where audit events go. ``record`` is called from worker threads and must not raise."""

    def record(self, event: AuditEvent) -> None: ...


class StoredInstances:
    """The instances stored by one association, STOW-RS request or ingest run, per study.

    Stores are recorded as one "DICOM Instances Transferred" entry per study when the unit of
    work ends (PS3.15 A.5.3: one message may name many instances), never one per instance:
    :meth:`add` is a dictionary append on the C-STORE path, and the trail is written once, on
    release or abort. At most :data:`MAX_INSTANCES` UIDs are kept per study, the rest counted.
    Not thread-safe: one unit of work adds from one thread.
    """

    __slots__ = ("counts", "studies")

    def __init__(self) -> None:
        self.studies: dict[str, list[str]] = {}
        self.counts: dict[str, int] = {}

    def add(self, study_uid: str, sop_instance_uid: str) -> None:
        uids = self.studies.get(study_uid)
        if uids is None:
            uids = self.studies[study_uid] = []
            self.counts[study_uid] = 0
        self.counts[study_uid] += 1
        if len(uids) < MAX_INSTANCES:
            uids.append(sop_instance_uid)

    def __len__(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return bool(self.studies)


def record_stored(sink: AuditSink, stored: StoredInstances, *, principal: str, address: str,
                  detail: str, jti: str | None = None) -> None:
    """Record what a unit of work stored (nothing if it stored nothing); never raises."""
    if not stored:
        return
    event = AuditEvent(action=Action.STORE, principal=principal, address=address,
                       study_uids=tuple(stored.studies), detail=detail, jti=jti,
                       stored=stored)
    try:
        sink.record(event)
    except Exception:  # noqa: BLE001 - the trail must not fail the stores it records
        logger.exception("audit entry of %d stored instances could not be written",
                         len(stored))


class DatabaseAudit:
    """The persistent sink: one ``audit_event`` row per study the event names (one if none).

    For a viewer session (``jti`` set) the viewer's display name and relationship to the patient
    are taken from the link registry, so the patient's trail says who looked, and as what.
    """

    def __init__(self, index: Index) -> None:
        self.index = index

    def record(self, event: AuditEvent) -> None:
        def work(session: Session) -> None:
            name = relationship = None
            if event.jti:
                link = session.get(ViewerLink, event.jti)
                if link is not None:
                    name, relationship = link.viewer_name, link.viewer_relationship
            # One SELECT for the patients of all the studies named (a QIDO-RS search or a
            # C-FIND names hundreds) and one multi-row INSERT (add_many).
            add_many(session, event.action, list(event.study_uids) or [None],
                     outcome=Outcome.SUCCESS if event.success else Outcome.MINOR_FAILURE,
                     actor=event.principal, actor_name=name, relationship=relationship,
                     address=event.address, jti=event.jti,
                     instance_uids=event.instance_uids or None, detail=event.detail,
                     stored=event.stored, patients=dict(event.patients))

        try:
            self.index.write(work)
        except Exception:  # the sink must not fail the access it records
            logger.exception("audit entry could not be written (%s)", event.action.value)


def events_for_patient(index: Index, patient_id: str, *, limit: int = 1000,
                       since: datetime | None = None) -> list[AuditRecord]:
    """The trail of one patient, newest first (``GET /api/audit?patient=``)."""
    with index.Session() as session:
        query = select(AuditRecord).where(AuditRecord.patient_id == patient_id)
        if since is not None:
            query = query.where(AuditRecord.recorded_at >= since)
        query = query.order_by(AuditRecord.recorded_at.desc(), AuditRecord.pk.desc()).limit(limit)
        return list(session.scalars(query))


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:  # SQLite hands back naive datetimes; they are stored as UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.isoformat().replace("+00:00", "Z")


def _instances(event: AuditRecord) -> list[str]:
    return list(json.loads(event.instance_uids)) if event.instance_uids else []


# -- FHIR R4 AuditEvent (IHE Basic Audit Log Patterns style) ------------------------------------
def fhir_audit_event(event: AuditRecord) -> dict[str, Any]:
    """One trail entry as a FHIR R4 AuditEvent resource.

    ``type`` is the DICOM event (PS3.15 A.5.3); the agent is the viewer or API principal with
    its relationship to the patient as ``role``; entities are the patient (role 1, Patient), the
    study (role 3, Report, identified by ``urn:oid:<Study Instance UID>``) and, for link
    events, the link's ``jti``.
    """
    code = EVENTS[Action(event.action)]
    agent: dict[str, Any] = {
        "type": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
            "code": "IRCP", "display": "information recipient"}]},
        # FHIR strings are never empty: an entry without a known actor names none
        "who": ({"identifier": {"value": event.actor},
                 "display": event.actor_name or event.actor} if event.actor
                else {"display": event.actor_name or "unknown"}),
        "requestor": True,
    }
    if event.actor_relationship:
        agent["role"] = [{"text": event.actor_relationship}]
    if event.address:
        agent["network"] = {"address": event.address, "type": "2"}
    entities: list[dict[str, Any]] = []
    if event.patient_id:
        entities.append({
            "what": {"identifier": {"value": event.patient_id}},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                     "code": "1", "display": "Person"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role",
                     "code": "1", "display": "Patient"},
        })
    if event.study_instance_uid:
        entity: dict[str, Any] = {
            "what": {"identifier": {"system": "urn:dicom:uid",
                                    "value": f"urn:oid:{event.study_instance_uid}"}},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                     "code": "2", "display": "System Object"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role",
                     "code": "3", "display": "Report"},
        }
        instances = _instances(event)
        if instances:
            entity["detail"] = [{"type": "SOPInstanceUIDs", "valueString": " ".join(instances)}]
        entities.append(entity)
    if event.jti:
        entities.append({"what": {"identifier": {"system": "urn:dicom-gateway:link",
                                                 "value": event.jti}},
                         "description": "viewer link"})
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(event.pk),
        "type": {"system": DCM_SYSTEM, "code": code.code, "display": code.meaning},
        "subtype": [{"system": "urn:dicom-gateway:action", "code": event.action}],
        "action": code.action_code,
        "recorded": _iso(event.recorded_at),
        "outcome": str(event.outcome),
        "agent": [agent],
        "source": {"observer": {"display": AUDIT_SOURCE_ID},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                             "code": "4", "display": "Application Server"}]},
    }
    if entities:  # the FHIR JSON format has no empty arrays
        resource["entity"] = entities
    if event.detail:
        resource["outcomeDesc"] = event.detail
    return resource


def fhir_bundle(events: Sequence[AuditRecord], base_url: str = "") -> dict[str, Any]:
    """A FHIR ``searchset`` Bundle of AuditEvent resources (newest first)."""
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(events),
        "entry": [
            {"fullUrl": f"{base_url}/api/audit/{e.pk}" if base_url else f"urn:audit:{e.pk}",
             "resource": fhir_audit_event(e)}
            for e in events
        ],
    }


# -- DICOM PS3.15 A.5 audit message -------------------------------------------------------------
def _coded(parent: ET.Element, tag: str, code: str, scheme: str, meaning: str) -> None:
    ET.SubElement(parent, tag, {"csd-code": code, "codeSystemName": scheme,
                                "originalText": meaning})


def dicom_audit_message(event: AuditRecord) -> str:
    """One trail entry as a DICOM audit message (PS3.15 A.5.1 schema, RFC 3881 based)."""
    code = EVENTS[Action(event.action)]
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": code.action_code,
        "EventDateTime": _iso(event.recorded_at),
        "EventOutcomeIndicator": str(event.outcome),
    })
    _coded(ident, "EventID", code.code, DCM, code.meaning)
    if event.detail:
        ET.SubElement(ident, "EventOutcomeDescription").text = event.detail
    requestor = {"UserID": event.actor or "unknown", "UserIsRequestor": "true"}
    if event.actor_name:
        requestor["UserName"] = event.actor_name
    if event.address:
        requestor.update(NetworkAccessPointID=event.address, NetworkAccessPointTypeCode="2")
    # A store sends instances from the requestor to the gateway; every other access sends
    # them (or what is known of them) from the gateway to the requestor (PS3.15 A.5.3).
    destination, source = ("110152", "Destination Role ID"), ("110153", "Source Role ID")
    requestor_role, gateway_role = ((source, destination) if event.action == Action.STORE.value
                                    else (destination, source))
    participant = ET.SubElement(root, "ActiveParticipant", requestor)
    _coded(participant, "RoleIDCode", requestor_role[0], DCM, requestor_role[1])
    gateway = ET.SubElement(root, "ActiveParticipant",
                            {"UserID": AUDIT_SOURCE_ID, "UserIsRequestor": "false"})
    _coded(gateway, "RoleIDCode", gateway_role[0], DCM, gateway_role[1])
    ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": AUDIT_SOURCE_ID})
    if event.study_instance_uid:
        study = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": event.study_instance_uid,
            "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3",
        })
        _coded(study, "ParticipantObjectIDTypeCode", "110180", DCM, "Study Instance UID")
        instances = _instances(event)
        if instances:
            description = ET.SubElement(study, "ParticipantObjectDescription")
            for uid in instances:
                ET.SubElement(description, "SOPClass", {"UID": "", "NumberOfInstances": "1"})
                ET.SubElement(description, "Instance", {"UID": uid})
    if event.patient_id:
        patient = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": event.patient_id,
            "ParticipantObjectTypeCode": "1", "ParticipantObjectTypeCodeRole": "1",
        })
        _coded(patient, "ParticipantObjectIDTypeCode", "2", "RFC-3881", "Patient Number")
    return ET.tostring(root, encoding="unicode")


__all__ = ["EVENTS", "Action", "AuditEvent", "AuditSink", "DatabaseAudit", "Outcome",
           "StoredInstances", "add", "add_many", "dicom_audit_message", "events_for_patient",
           "fhir_audit_event", "fhir_bundle", "record", "record_stored"]
