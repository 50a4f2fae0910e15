"""FHIR R4 ``ImagingStudy`` resources built from the index (the read side portals and EHRs use).

A national record or an EHDS exchange asks "which imaging studies does this patient have, and
where are they"; FHIR R4 answers with ImagingStudy resources
(http://hl7.org/fhir/R4/imagingstudy.html). They are built here from the same index rows
QIDO-RS answers from, under the same visibility rule (:func:`gateway.instances.visible_conditions`:
a viewer session sees its own study only), and never from the DICOM files. The web route is
:mod:`dicomweb.fhir`.

The mapping (FHIR R4 ImagingStudy, DICOM PS3.18 §F and the FHIR DICOM mapping table):

==========================  =======================================================================
``id``                      the Study Instance UID (a UID is a valid FHIR id: ``[0-9.]{1,64}``)
``identifier``              ``urn:dicom:uid`` / ``urn:oid:<StudyInstanceUID>``; the Accession
                            Number as an ``ACSN`` identifier (HL7 v2-0203)
``status``                  ``available`` (what is in the index can be retrieved)
``subject``                 a reference to the Patient by identifier: Patient ID, and the Issuer
                            of Patient ID as ``system`` (:func:`patient_system`)
``started``                 Study Date and Time; with the time only when the Timezone Offset From
                            UTC is known (FHIR requires a zone with a time), else the date alone
``modality``                Modalities in Study, DCM codes
``numberOfSeries/Instances`` counted over what the caller may see
``endpoint``                a contained Endpoint, ``dicom-wado-rs``, addressed to the DICOMweb root
``series``/``instance``     UID, number, modality, description, SOP Class (``urn:oid:``)
==========================  =======================================================================
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from gateway.access import Principal
from gateway.errors import NotFound
from gateway.index import Index
from gateway.instances import visible_conditions, visible_instance_condition
from gateway.models import Instance, Patient, Series, Study
from gateway.query import InvalidQueryParameter
from gateway.uids import is_valid_uid, validate_uid

DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"  # PS3.16 coding scheme "DCM"
DICOM_UID_SYSTEM = "urn:dicom:uid"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"  # identifier types (ACSN)
CONNECTION_TYPES = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
MEDIA_FHIR_JSON = "application/fhir+json"
ENDPOINT_ID = "dicomweb"  # the id of the contained Endpoint
UNKNOWN_MODALITY = "OT"  # PS3.3 C.7.3.1.1.1 "Other": a series whose Modality is empty
DEFAULT_COUNT = 100  # studies per searchset page unless _count says otherwise
_ISSUER_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")


def patient_system(issuer: str) -> str | None:
    """The FHIR ``Identifier.system`` of an Issuer of Patient ID.

    An issuer that is already a URI is kept, an OID becomes ``urn:oid:...``; a local name
    (``HOSPITAL_A``) has no URI form and is given as ``assigner.display`` instead.

    >>> patient_system("1.2.250.1.71"), patient_system("urn:oid:1.2.3"), patient_system("HIS")
    ('urn:oid:1.2.250.1.71', 'urn:oid:1.2.3', None)
    """
    if not issuer:
        return None
    if is_valid_uid(issuer):
        return f"urn:oid:{issuer}"
    if _ISSUER_URI.match(issuer):
        return issuer
    return None


def issuers_for_system(system: str) -> list[str]:
    """The stored Issuer of Patient ID values a search ``system`` stands for.

    >>> issuers_for_system("urn:oid:1.2.3"), issuers_for_system("HIS")
    (['urn:oid:1.2.3', '1.2.3'], ['HIS'])
    """
    found = [system]
    if system.startswith("urn:oid:") and is_valid_uid(system[len("urn:oid:"):]):
        found.append(system[len("urn:oid:"):])
    return found


@dataclass(frozen=True)
class PatientParameter:
    """The ``patient`` search parameter: a Patient ID, optionally with its issuer.

    ``value`` alone matches any issuer; ``system|value`` that issuer; ``|value`` no issuer.
    """

    value: str
    system: str | None = None

    @classmethod
    def parse(cls, text: str) -> PatientParameter:
        """Read ``value``, ``system|value``, ``|value`` or ``Patient/value``.

        Raises
        ------
        InvalidQueryParameter
            An empty value, or one longer than a Patient ID may be (PS3.5 LO, 64).
        """
        system: str | None = None
        if "|" in text:
            system, _, text = text.partition("|")
        elif text.startswith("Patient/"):
            text = text[len("Patient/"):]
        if not text or len(text) > 64 or (system is not None and len(system) > 256):
            raise InvalidQueryParameter(
                "patient", "patient must be a Patient ID (1-64 characters), optionally "
                           "preceded by its issuer and '|' (system|value)")
        return cls(text, system)


@dataclass(frozen=True)
class SearchResult:
    """One page of a search: the resources, the number of matches in all, and the study UIDs."""

    resources: list[dict[str, Any]]
    total: int
    study_uids: tuple[str, ...]


_STUDY_COLUMNS = (
    Study.pk, Study.study_instance_uid, Study.study_date, Study.study_time,
    Study.timezone_offset, Study.accession_number, Study.study_description,
    Study.modalities_in_study, Patient.patient_id, Patient.issuer_of_patient_id,
)


def search(index: Index, principal: Principal, dicomweb_base: str, *,
           patient: PatientParameter | None = None, study_uid: str | None = None,
           count: int = DEFAULT_COUNT, offset: int = 0) -> SearchResult:
    """The ImagingStudy resources of the studies ``principal`` may see, newest first.

    Parameters
    ----------
    patient
        Only the studies of this patient.
    study_uid
        Only this study (a read by id, or ``_id``).
    count, offset
        The page (FHIR ``_count``; ``offset`` studies skipped).
    dicomweb_base
        The absolute DICOMweb root named by each resource's Endpoint.
    """
    conditions = list(visible_conditions(principal, "STUDY"))
    if study_uid is not None:
        conditions.append(Study.study_instance_uid == study_uid)
    if patient is not None:
        conditions.append(Patient.patient_id == patient.value)
        if patient.system == "":
            conditions.append(Patient.issuer_of_patient_id == "")
        elif patient.system is not None:
            conditions.append(Patient.issuer_of_patient_id.in_(
                issuers_for_system(patient.system)))
    base = (select(*_STUDY_COLUMNS).join(Patient, Study.patient_pk == Patient.pk)
            .where(*conditions))
    with index.Session() as session:
        total = session.scalar(select(func.count()).select_from(base.subquery())) or 0
        studies = list(session.execute(
            base.order_by(Study.study_date.desc(), Study.study_time.desc(), Study.pk.desc())
            .limit(count).offset(offset)).all())
        if not studies:
            return SearchResult([], total, ())
        stmt = (select(Series.study_pk, Series.series_instance_uid, Series.series_number,
                       Series.modality, Series.series_description, Instance.sop_instance_uid,
                       Instance.sop_class_uid, Instance.instance_number)
                .join(Instance, Instance.series_pk == Series.pk)
                .where(Series.study_pk.in_([row.pk for row in studies]))
                .order_by(Series.study_pk, Series.series_number, Series.pk,
                          Instance.instance_number, Instance.pk))
        visible = visible_instance_condition(principal)
        if visible is not None:
            stmt = stmt.where(visible)
        series_of: dict[int, dict[str, dict[str, Any]]] = {}
        for row in session.execute(stmt):
            by_uid = series_of.setdefault(row.study_pk, {})
            entry = by_uid.get(row.series_instance_uid)
            if entry is None:
                entry = by_uid[row.series_instance_uid] = {
                    "uid": row.series_instance_uid,
                    "modality": _coding(row.modality or UNKNOWN_MODALITY),
                    "instance": [],
                }
                if row.series_number is not None:
                    entry["number"] = row.series_number
                if row.series_description:
                    entry["description"] = row.series_description
            instance: dict[str, Any] = {
                "uid": row.sop_instance_uid,
                "sopClass": {"system": "urn:ietf:rfc:3986",
                             "code": f"urn:oid:{row.sop_class_uid}"},
            }
            if row.instance_number is not None:
                instance["number"] = row.instance_number
            entry["instance"].append(instance)
    resources = []
    for study in studies:
        series = list(series_of.get(study.pk, {}).values())
        if not series:  # every instance of it hidden from a key-images session
            continue
        resources.append(imaging_study(study, series, dicomweb_base))
    return SearchResult(resources, total, tuple(r["id"] for r in resources))


def read(index: Index, principal: Principal, study_uid: str, dicomweb_base: str
         ) -> dict[str, Any]:
    """The ImagingStudy of one study (``GET /fhir/ImagingStudy/<StudyInstanceUID>``).

    Raises
    ------
    InvalidUID
        ``study_uid`` is not a UID (so it is no id of ours).
    NotFound
        No such study, or one the principal may not see (the same answer).
    """
    validate_uid(study_uid, "ImagingStudy id")
    found = search(index, principal, dicomweb_base, study_uid=study_uid, count=1)
    if not found.resources:
        raise NotFound(f"no ImagingStudy/{study_uid} here")
    return found.resources[0]


def _coding(modality: str) -> dict[str, str]:
    return {"system": DCM_SYSTEM, "code": modality}


def started(date: str, time: str, offset: str) -> str | None:
    """FHIR ``dateTime`` of a DICOM date, time and Timezone Offset From UTC (``+HHMM``).

    FHIR requires a zone when there is a time, so without the offset only the date is given.

    >>> started("20240315", "101530.25", "+0100"), started("20240315", "1015", "")
    ('2024-03-15T10:15:30.25+01:00', '2024-03-15')
    >>> started("", "1015", "+0100") is None
    True
    """
    if not re.fullmatch(r"\d{8}", date or ""):
        return None
    day = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    zone = re.fullmatch(r"([+-])(\d{2})(\d{2})", offset or "")
    clock = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?", time or "")
    if zone is None or clock is None:
        return day
    hours, minutes, seconds, fraction = clock.groups()
    return (f"{day}T{hours}:{minutes or '00'}:{seconds or '00'}{fraction or ''}"
            f"{zone[1]}{zone[2]}:{zone[3]}")


def imaging_study(study: Any, series: Sequence[dict[str, Any]], dicomweb_base: str
                  ) -> dict[str, Any]:
    """One ImagingStudy resource from a study row (:data:`_STUDY_COLUMNS`) and its series."""
    identifiers: list[dict[str, Any]] = [
        {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study.study_instance_uid}"}]
    if study.accession_number:
        identifiers.append({
            "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
            "value": study.accession_number,
        })
    patient_identifier: dict[str, Any] = {"value": study.patient_id}
    system = patient_system(study.issuer_of_patient_id)
    if system is not None:
        patient_identifier["system"] = system
    elif study.issuer_of_patient_id:
        patient_identifier["assigner"] = {"display": study.issuer_of_patient_id}
    modalities = [m for m in (study.modalities_in_study or "").split("\\") if m]
    if not modalities:
        modalities = sorted({s["modality"]["code"] for s in series})
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": study.study_instance_uid,
        "contained": [{
            "resourceType": "Endpoint",
            "id": ENDPOINT_ID,
            "status": "active",
            "connectionType": {"system": CONNECTION_TYPES, "code": "dicom-wado-rs"},
            "payloadType": [{"text": "DICOM"}],
            "payloadMimeType": ["application/dicom"],
            "address": dicomweb_base,
        }],
        "identifier": identifiers,
        "status": "available",
        "modality": [_coding(m) for m in modalities],
        "subject": {"type": "Patient", "identifier": patient_identifier},
        "endpoint": [{"reference": f"#{ENDPOINT_ID}"}],
        "numberOfSeries": len(series),
        "numberOfInstances": sum(len(s["instance"]) for s in series),
        "series": [{**s, "numberOfInstances": len(s["instance"])} for s in series],
    }
    when = started(study.study_date, study.study_time, study.timezone_offset)
    if when is not None:
        resource["started"] = when
    if study.study_description:
        resource["description"] = study.study_description
    return resource


def bundle(resources: Sequence[dict[str, Any]], total: int, self_url: str,
           resource_base: str, next_url: str | None = None) -> dict[str, Any]:
    """A ``searchset`` Bundle (FHIR R4 §3.1.1.4, http://hl7.org/fhir/R4/bundle.html)."""
    links = [{"relation": "self", "url": self_url}]
    if next_url is not None:
        links.append({"relation": "next", "url": next_url})
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": [{"fullUrl": f"{resource_base}/ImagingStudy/{r['id']}", "resource": r,
                   "search": {"mode": "match"}} for r in resources],
    }


def capability_statement(fhir_base: str, software_version: str) -> dict[str, Any]:
    """What this server does, as a FHIR R4 CapabilityStatement (``GET /fhir/metadata``,
    http://hl7.org/fhir/R4/http.html#capabilities)."""
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-12-01",
        "kind": "instance",
        "software": {"name": "dicom-gateway", "version": software_version},
        "implementation": {"description": "DICOM imaging gateway, FHIR read side",
                           "url": fhir_base},
        "fhirVersion": "4.0.1",
        "format": [MEDIA_FHIR_JSON, "json"],
        "rest": [{
            "mode": "server",
            "resource": [{
                "type": "ImagingStudy",
                "interaction": [{"code": "read"}, {"code": "search-type"}],
                "searchParam": [
                    {"name": "patient", "type": "reference",
                     "documentation": "Patient ID, or system|value with the issuer"},
                    {"name": "_id", "type": "token"},
                ],
            }],
        }],
    }


# FHIR R4 IssueType codes (http://hl7.org/fhir/R4/valueset-issue-type.html) per HTTP status.
ISSUE_TYPE = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found",
              406: "not-supported", 405: "not-supported", 500: "exception"}


def operation_outcome(status: int, diagnostics: str) -> dict[str, Any]:
    """An OperationOutcome for an error answered with HTTP ``status`` (FHIR R4 §3.1.0.4).

    >>> operation_outcome(404, "no ImagingStudy/1.2 here")["issue"][0]["code"]
    'not-found'
    """
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "fatal" if status >= 500 else "error",
                   "code": ISSUE_TYPE.get(status, "processing"),
                   "diagnostics": diagnostics}],
    }


__all__ = ["MEDIA_FHIR_JSON", "PatientParameter", "SearchResult", "bundle", "capability_statement",
           "imaging_study",
           "operation_outcome", "patient_system", "read", "search", "started"]
