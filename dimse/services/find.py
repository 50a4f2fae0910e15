"""C-FIND SCP (PS3.4 C.4.1): Patient Root and Study Root, PATIENT / STUDY / SERIES / IMAGE.

The matching is not done here: the identifier is turned into a :class:`gateway.query.Query`
and run by the one query engine shared with QIDO-RS (:class:`gateway.query.QueryEngine`), so
that single value, list of UID, wildcard, range and universal matching (PS3.4 C.2.2.2) behave
the same over DIMSE and over the web.

What this module does:

- checks that the calling AE may query (:class:`dimse.peers.PeerPolicy`), else 0x0124;
- reads the identifier: pydicom decodes its text with the identifier's own Specific Character
  Set (C.4.1.1.3.1), so that matching sees Unicode; keys with an empty value are return keys;
  an identifier that does not fit the model is 0xA900, one that cannot be decoded 0xC000
  (:func:`dimse.status.identifier_status`, as C-MOVE and C-GET answer);
- PATIENT level (Patient Root only, C.6.1.1.2): the engine searches studies with the patient
  keys and the matches are grouped by patient (Patient ID and Issuer), with
  NumberOfPatientRelatedStudies / Series / Instances summed from the studies;
- answers one Pending (0xFF00) per match with the requested keys only, plus
  QueryRetrieveLevel (C.4.1.1.3.2) and RetrieveAETitle when asked, and checks for C-CANCEL
  before each one;
- encodes the responses in the query's character set when every value fits in it, in UTF-8
  (ISO_IR 192) otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from pydicom import DataElement, Dataset
from pydicom.charset import convert_encodings
from pydicom.config import IGNORE
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.multival import MultiValue

from dimse.peers import PeerPolicy
from dimse.services.identifier import person_name
from dimse.services.trail import QUERY_EVENT, record_access
from dimse.status import CANCEL, NOT_AUTHORIZED, PENDING, SUCCESS, identifier_status
from gateway.access import Principal, PrincipalKind, Scope
from gateway.core import Gateway
from gateway.errors import InvalidQuery
from gateway.query import Level, Query, QueryEngine

logger = logging.getLogger(__name__)

UTF8 = "ISO_IR 192"
# VRs whose DICOM JSON form needs pydicom's reader (nested data sets, tags, binary).
JSON_VIA_PYDICOM = frozenset({"SQ", "AT", "OB", "OD", "OF", "OL", "OV", "OW", "UN"})
TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})
# Patient level keys (PS3.4 Table C.6-1) and their study-level counts.
PATIENT_KEYS = frozenset({
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence", "PatientBirthDate", "PatientBirthTime", "PatientSex",
    "EthnicGroup", "PatientComments", "NumberOfPatientRelatedStudies",
    "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances",
})
PATIENT_COUNTS = ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                  "NumberOfPatientRelatedInstances")
QUERY_RETRIEVE_LEVEL_KEY, RETRIEVE_AE_TITLE_KEY = "00080052", "00080054"
SPECIFIC_CHARACTER_SET_KEY, STUDY_INSTANCE_UID_KEY = "00080005", "0020000D"
# Keys the SCP fills itself rather than the engine.
OWN_KEYS = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"})


def principal_for(ae_title: str) -> Principal:
    """The principal of a DIMSE peer allowed to query: it sees every study (DESIGN.md)."""
    return Principal(kind=PrincipalKind.DIMSE, id=ae_title,
                     scopes=frozenset({Scope.DICOMWEB_READ.value}), display_name=ae_title)


def dicom_string(value: Any) -> str:
    """A data element value in its DICOM string form (multiple values joined by ``\\``)."""
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(dicom_string(v) for v in value)
    return str(value)


def identifier_keys(identifier: Dataset) -> dict[str, str]:
    """``{keyword: value}`` of an identifier, for :meth:`gateway.query.Query.from_identifier`.

    Sequence keys are passed with an empty value (their item's keys are in
    :func:`identifier_items`). Private and unknown attributes are ignored.
    """
    keys: dict[str, str] = {}
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in OWN_KEYS or element.tag.is_private:
            continue
        keys[keyword] = "" if element.VR == "SQ" else dicom_string(element.value).strip()
    return keys


def identifier_items(identifier: Dataset) -> dict[str, dict[str, str]]:
    """``{sequence keyword: {item keyword: value}}`` of the identifier's sequence keys.

    PS3.4 C.2.2.2.6: a sequence key holds one item whose attributes are the item's matching
    and return keys; a sequence with no item is universal matching. More than one item is
    not a valid key (:class:`InvalidQuery`, status 0xA900).
    """
    items: dict[str, dict[str, str]] = {}
    for element in identifier:
        keyword = element.keyword
        if element.VR != "SQ" or not keyword or element.tag.is_private:
            continue
        value = element.value or []
        if len(value) > 1:
            raise InvalidQuery(f"{keyword}: a sequence key has at most one item (PS3.4 "
                               f"C.2.2.2.6), not {len(value)}")
        if value:
            items[keyword] = {
                e.keyword: "" if e.VR == "SQ" else dicom_string(e.value).strip()
                for e in value[0] if e.keyword and not e.tag.is_private}
    return items


def information_model(sop_class_uid: str) -> str:
    """``PATIENT_ROOT`` or ``STUDY_ROOT`` for a Query/Retrieve SOP Class UID (PS3.4 C.6)."""
    return "PATIENT_ROOT" if sop_class_uid.startswith("1.2.840.10008.5.1.4.1.2.1.") \
        else "STUDY_ROOT"


def _response_charset(query_charset: list[str], matches: list[dict[str, Any]]) -> str | None:
    """The Specific Character Set of the responses: the query's when every text value fits.

    Returns ``None`` when the default repertoire (ASCII) is enough and the query named none.
    """
    texts = [person_name(value) if element["vr"] == "PN" else str(value)
             for match in matches for element in match.values()
             if element.get("vr") in TEXT_VRS
             for value in element.get("Value") or () if value not in (None, "")]
    if query_charset and len(query_charset) == 1:
        codec = convert_encodings(query_charset)[0]
        try:
            for text in texts:
                text.encode(codec)
            return query_charset[0]
        except (UnicodeEncodeError, LookupError):
            return UTF8
    if all(text.isascii() for text in texts):
        return query_charset[0] if query_charset else None
    return UTF8


def as_dataset(match: dict[str, Any]) -> Dataset:
    """A DICOM JSON match (PS3.18 F.2) as a data set, without bulk data references.

    Plain values are set directly (about three times faster than ``Dataset.from_json``, which
    matters at one response per match); sequences and the rarer VRs go through pydicom's
    reader.
    """
    ds = Dataset()
    nested: dict[str, Any] = {}
    for tag, element in match.items():
        if "BulkDataURI" in element or "InlineBinary" in element:
            continue
        vr = element.get("vr", "UN")
        if vr in JSON_VIA_PYDICOM:
            nested[tag] = element
            continue
        values = element.get("Value")
        if values and vr == "PN":
            values = [person_name(v) if isinstance(v, dict) else v for v in values]
        value = None if not values else values[0] if len(values) == 1 else values
        number = int(tag, 16)
        # Values come from the index, checked when the instance was ingested.
        ds[number] = DataElement(number, vr, value, validation_mode=IGNORE)
    if nested:
        ds.update(Dataset.from_json(nested))
    return ds


def _patients(studies: list[dict[str, Any]], wanted: set[str]) -> list[dict[str, Any]]:
    """Study matches grouped by patient, with the patient-level keys and summed counts."""
    def tag(keyword: str) -> str:
        return f"{tag_for_keyword(keyword):08X}"

    def first(match: dict[str, Any], keyword: str) -> Any:
        values = match.get(tag(keyword), {}).get("Value") or [""]
        return values[0]

    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for study in studies:
        key = (str(first(study, "PatientID")), str(first(study, "IssuerOfPatientID")))
        group = groups.get(key)
        if group is None:
            group = {t: e for t, e in study.items()
                     if any(t == tag(k) for k in wanted if tag_for_keyword(k) is not None)}
            group["_counts"] = [0, 0, 0]
            groups[key] = group
        counts = group["_counts"]
        counts[0] += 1
        counts[1] += int(first(study, "NumberOfStudyRelatedSeries") or 0)
        counts[2] += int(first(study, "NumberOfStudyRelatedInstances") or 0)
    patients = []
    for group in groups.values():
        counts = group.pop("_counts")
        for keyword, value in zip(PATIENT_COUNTS, counts, strict=True):
            if keyword in wanted:
                group[tag(keyword)] = {"vr": "IS", "Value": [value]}
        patients.append(group)
    return patients


def search(gateway: Gateway, identifier: Dataset, model: str, ae_title: str
           ) -> tuple[str, list[dict[str, Any]], list[str]]:
    """Run a C-FIND identifier through the query engine.

    Returns
    -------
    tuple
        The level, the response identifiers as DICOM JSON (:func:`as_dataset` makes data sets
        of them), and the Study Instance UIDs they come from (for the access trail, whether or
        not the peer asked for them).

    Raises
    ------
    InvalidQuery
        When the level or a key is not valid for the information model (mapped to 0xA900).
    """
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    allowed = ("PATIENT", "STUDY", "SERIES", "IMAGE") if model == "PATIENT_ROOT" \
        else ("STUDY", "SERIES", "IMAGE")
    if level not in allowed:
        raise InvalidQuery(f"Query/Retrieve Level {level!r} is not one of {', '.join(allowed)}"
                           f" in the {model.replace('_', ' ').title()} information model")
    keys = identifier_keys(identifier)
    items = identifier_items(identifier)
    engine = QueryEngine(gateway.index, max_results=0)
    principal = principal_for(ae_title)
    trail = frozenset({"StudyInstanceUID"})
    if level == "PATIENT":
        below = [k for k, v in keys.items() if k not in PATIENT_KEYS and v]
        if below:
            raise InvalidQuery(f"{', '.join(below)} cannot be matched at the PATIENT level")
        study_keys = {k: v for k, v in keys.items()
                      if k in PATIENT_KEYS and k not in PATIENT_COUNTS}
        study_keys.setdefault("PatientID", "")
        study_keys.setdefault("IssuerOfPatientID", "")
        query = Query.from_identifier(Level.STUDY, study_keys)
        query = Query(level=query.level, keys=query.keys,
                      include=query.include | trail | {"NumberOfStudyRelatedSeries",
                                                       "NumberOfStudyRelatedInstances"},
                      defaults=False)
        result = engine.search(query, principal)
        study_uids = [str(uid) for uid in result.study_uids]
        matches = _patients(result.matches, {k for k in keys if k in PATIENT_KEYS})
    else:
        query = Query.from_identifier(Level(level), keys, items=items)
        query = Query(level=query.level, keys=query.keys, include=query.include | trail,
                      defaults=False, items=query.items)
        result = engine.search(query, principal)
        study_uids = [str(uid) for uid in result.study_uids]
        matches = result.matches
    for warning in result.warnings:
        logger.info("C-FIND from %s: %s", ae_title, warning)
    responses = []
    asked_retrieve_ae = "RetrieveAETitle" in identifier
    # Tags and VRs worked out once, not per match.
    asked = [(f"{tag:08X}", dictionary_VR(tag)) for tag in
             (tag_for_keyword(k) for k in keys) if tag is not None]
    drop_study_uid = "StudyInstanceUID" not in keys
    level_element = {"vr": "CS", "Value": [level]}
    retrieve_element = {"vr": "AE", "Value": [gateway.settings.dimse.ae_title]}
    for match in matches:
        # Bulk data is never returned by C-FIND; an asked binary key is answered empty.
        response = {tag: element for tag, element in match.items()
                    if "BulkDataURI" not in element and "InlineBinary" not in element}
        if drop_study_uid:
            response.pop(STUDY_INSTANCE_UID_KEY, None)
        response[QUERY_RETRIEVE_LEVEL_KEY] = level_element
        if asked_retrieve_ae:
            response[RETRIEVE_AE_TITLE_KEY] = retrieve_element
        for tag, vr in asked:  # every asked key is answered, empty when unknown (C.4.1.1.3.2)
            if tag not in response:
                response[tag] = {"vr": vr}
        responses.append(response)
    return level, responses, study_uids


def find_responses(gateway: Gateway, policy: PeerPolicy, ae_title: str, address: str,
                   sop_class_uid: str, decode_identifier: Callable[[], Dataset],
                   is_cancelled: Callable[[], bool]
                   ) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """C-FIND SCP (PS3.4 C.4.1.2): ``(Pending, identifier)`` per match, then a final status.
    Identifiers are DICOM JSON: :func:`dimse.services.identifier.encode_identifier` encodes them, or
    :func:`as_dataset` makes data sets of them.

    Used by both ways an association runs (:mod:`dimse.loop.acceptor`,
    :func:`dimse.toolkit.handlers.handle_find`). ``is_cancelled`` is asked before each Pending
    response.
    """
    if not policy.allows("find", ae_title, address):
        logger.warning("refused C-FIND from %s at %s: not allowed by [dimse.peers]",
                       ae_title, address)
        record_access(gateway, QUERY_EVENT, ae_title, address, (),
                      "C-FIND refused: peer not allowed", success=False)
        yield NOT_AUTHORIZED, None
        return
    try:
        identifier = decode_identifier()
        charset = identifier.get("SpecificCharacterSet") or []
        query_charset = [charset] if isinstance(charset, str) else [str(c) for c in charset]
        model = information_model(sop_class_uid)
        level, matches, study_uids = search(gateway, identifier, model, ae_title)
    except InvalidQuery as exc:
        logger.warning("C-FIND from %s at %s refused: %s", ae_title, address, exc)
        yield identifier_status(exc), None
        return
    except Exception as exc:  # noqa: BLE001 - mapped once, here, to "unable to process"
        logger.exception("C-FIND from %s at %s failed", ae_title, address)
        yield identifier_status(exc), None
        return
    record_access(gateway, QUERY_EVENT, ae_title, address, study_uids,
                  f"C-FIND {model} {level} level, {len(matches)} matches")
    response_charset = _response_charset(query_charset, matches)
    charset_element = {"vr": "CS", "Value": [response_charset]}
    for match in matches:
        if is_cancelled():
            logger.info("C-FIND from %s at %s cancelled by the peer", ae_title, address)
            yield CANCEL, None
            return
        if response_charset:
            match[SPECIFIC_CHARACTER_SET_KEY] = charset_element
        yield PENDING, match
    yield SUCCESS, None


__all__ = ["as_dataset", "find_responses", "identifier_items", "identifier_keys",
           "information_model", "search"]
