"""What a Key Object Selection document is for: key images, a manifest, or a rejection note.

A Key Object Selection (KOS) document (PS3.3 A.35.4, template TID 2010) says what it selects
instances *for* by its document title, the Concept Name of its root container (0040,A043),
coded from PS3.16 CID 7010 "Key Object Selection Document Title". IHE IOCM (Imaging Object
Change Management) gives four of those titles a meaning for an Image Manager/Archive: the
instances such a *rejection note* names must no longer be returned by any query or retrieval,
and (for "Data Retention Policy Expired") must be deleted.

So the gateway tells KOS documents apart by title:

- key images (:data:`KEY_IMAGE_TITLES`): a selection for a purpose a patient or a referring
  physician would call "key images" ("Of Interest", "For Referring Provider", ...); these are
  what a key-images-only viewer link shows;
- rejection notes (:data:`REJECTION_TITLES`, PS3.16 CID 7011): see :mod:`gateway.rejection`;
- anything else (manifests 113030–113035, "Group of Frames for Display" 113036, quality flags,
  RT workflow titles, or no title at all): stored and served as any instance, never key images.

Deny by default: an unknown or missing title is not a key-image selection.

This module reads the DICOM JSON stored at ingest; it opens no file and touches no database.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"  # PS3.4 B.5, KOS Document Storage
DCM = "DCM"  # PS3.16 coding scheme designator of the DICOM controlled terminology

# DICOM JSON tags (PS3.18 F.2) read here.
CONCEPT_NAME = "0040A043"  # ConceptNameCodeSequence: the document title
CODE_VALUE = "00080100"
CODING_SCHEME = "00080102"
EVIDENCE = "0040A375"  # CurrentRequestedProcedureEvidenceSequence
STUDY_UID = "0020000D"  # StudyInstanceUID
REFERENCED_SERIES = "00081115"  # ReferencedSeriesSequence
SERIES_UID = "0020000E"  # SeriesInstanceUID
REFERENCED_SOP = "00081199"  # ReferencedSOPSequence
REFERENCED_SOP_INSTANCE = "00081155"  # ReferencedSOPInstanceUID
CONTENT = "0040A730"  # ContentSequence
VALUE_TYPE = "0040A040"  # ValueType


class Rejection(enum.StrEnum):
    """The rejection note titles of IHE IOCM (PS3.16 CID 7011), by code value."""

    QUALITY = "113001"  # Rejected for Quality Reasons
    PATIENT_SAFETY = "113037"  # Rejected for Patient Safety Reasons
    WORKLIST = "113038"  # Incorrect Modality Worklist Entry
    RETENTION_EXPIRED = "113039"  # Data Retention Policy Expired

    @property
    def meaning(self) -> str:
        return _REJECTION_MEANINGS[self]

    @property
    def deletes(self) -> bool:
        """Whether the rejected instances' files are deleted, not only hidden (IOCM)."""
        return self is Rejection.RETENTION_EXPIRED


_REJECTION_MEANINGS = {
    Rejection.QUALITY: "Rejected for Quality Reasons",
    Rejection.PATIENT_SAFETY: "Rejected for Patient Safety Reasons",
    Rejection.WORKLIST: "Incorrect Modality Worklist Entry",
    Rejection.RETENTION_EXPIRED: "Data Retention Policy Expired",
}
REJECTION_TITLES = frozenset(r.value for r in Rejection)

# CID 7010 titles that select instances for a person to look at: "key images".
KEY_IMAGE_TITLES: Mapping[str, str] = {
    "113000": "Of Interest",
    "113002": "For Referring Provider",
    "113003": "For Surgery",
    "113004": "For Teaching",
    "113005": "For Conference",
    "113006": "For Therapy",
    "113007": "For Patient",
    "113008": "For Peer Review",
    "113009": "For Research",
    "113013": "Best In Set",
    "113018": "For Printing",
    "113020": "For Report Attachment",
    "113021": "For Litigation",
}


class Purpose(enum.Enum):
    """What a KOS document selects instances for."""

    KEY_IMAGES = "key_images"
    REJECTION = "rejection"
    OTHER = "other"  # manifests, frame groups, quality flags, RT workflow, untitled


@dataclass(frozen=True)
class Reference:
    """One instance a KOS document names (its evidence or its IMAGE content items)."""

    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_instance_uid: str


def _items(element: Mapping[str, Any], tag: str) -> list[dict[str, Any]]:
    value = element.get(tag, {}).get("Value", [])
    return [v for v in value if isinstance(v, dict)]


def _first(element: Mapping[str, Any], tag: str) -> str | None:
    value = element.get(tag, {}).get("Value", [])
    return str(value[0]) if value else None


def document_title(metadata: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(coding scheme, code value)`` of a KOS document's title, or ``None`` when it has none.

    >>> document_title({"0040A043": {"vr": "SQ", "Value": [
    ...     {"00080100": {"vr": "SH", "Value": ["113000"]},
    ...      "00080102": {"vr": "SH", "Value": ["DCM"]}}]}})
    ('DCM', '113000')
    """
    titles = _items(metadata, CONCEPT_NAME)
    if not titles:
        return None
    code = _first(titles[0], CODE_VALUE)
    scheme = _first(titles[0], CODING_SCHEME)
    if code is None or scheme is None:
        return None
    return scheme.strip(), code.strip()


def purpose(metadata: Mapping[str, Any]) -> Purpose:
    """What a KOS document (its stored DICOM JSON) selects instances for.

    >>> purpose({})
    <Purpose.OTHER: 'other'>
    """
    title = document_title(metadata)
    if title is None or title[0] != DCM:
        return Purpose.OTHER
    if title[1] in KEY_IMAGE_TITLES:
        return Purpose.KEY_IMAGES
    if title[1] in REJECTION_TITLES:
        return Purpose.REJECTION
    return Purpose.OTHER


def rejection_of(metadata: Mapping[str, Any]) -> Rejection | None:
    """The IOCM rejection a KOS document's title states, or ``None`` if it is no rejection note."""
    title = document_title(metadata)
    if title is None or title[0] != DCM or title[1] not in REJECTION_TITLES:
        return None
    return Rejection(title[1])


def references(metadata: Mapping[str, Any]) -> Iterator[Reference]:
    """The instances a KOS document names: its evidence (with their study and series), then
    the IMAGE content items of its content tree (PS3.3 C.17.2, TID 2010)."""
    for evidence in _items(metadata, EVIDENCE):
        study = _first(evidence, STUDY_UID)
        for series in _items(evidence, REFERENCED_SERIES):
            series_uid = _first(series, SERIES_UID)
            for ref in _items(series, REFERENCED_SOP):
                uid = _first(ref, REFERENCED_SOP_INSTANCE)
                if uid:
                    yield Reference(study, series_uid, uid)

    def content(items: list[dict[str, Any]]) -> Iterator[Reference]:
        for item in items:
            if _first(item, VALUE_TYPE) == "IMAGE":
                for ref in _items(item, REFERENCED_SOP):
                    uid = _first(ref, REFERENCED_SOP_INSTANCE)
                    if uid:
                        yield Reference(None, None, uid)
            yield from content(_items(item, CONTENT))

    yield from content(_items(metadata, CONTENT))


def referenced_instances(metadata: Mapping[str, Any]) -> set[str]:
    """The SOP Instance UIDs a KOS document names."""
    return {ref.sop_instance_uid for ref in references(metadata)}


__all__ = [
    "KEY_IMAGE_TITLES",
    "KEY_OBJECT_SELECTION",
    "REJECTION_TITLES",
    "Purpose",
    "Reference",
    "Rejection",
    "document_title",
    "purpose",
    "referenced_instances",
    "references",
    "rejection_of",
]
