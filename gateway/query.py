"""The one query engine: QIDO-RS (PS3.18 §8.3.4, §10.6) and C-FIND (PS3.4 C.2.2.2, C.6).

Matching keys are parsed once into conditions on indexed columns of the index and run as one
SQL SELECT; nothing opens a DICOM file. Results are DICOM JSON objects (PS3.18 Annex F) built
from the level attributes stored at ingest (``Study.attributes``, ``Series.attributes``) and the
indexed columns; instance metadata is only read when an attribute is asked for that the columns
do not hold.

Transport-free by design, so that both front ends share it:

* QIDO-RS: :func:`parse_qido` turns the request's query parameters into a :class:`Query`
  (raising :class:`InvalidQueryParameter` naming the bad parameter);
* C-FIND: build a :class:`Query` from the identifier, converted to ``{keyword: value}`` with
  values as their DICOM string form (multiple values joined by ``\\``, an empty value meaning
  universal matching and "return this key"); :meth:`Query.from_identifier` does it.

Then ``QueryEngine(index).search(query, principal)`` returns a :class:`QueryResult`. A
restricted principal (a viewer session) only ever sees its studies / instances: the filter is a
condition of the same SELECT.

Matching (PS3.4 C.2.2.2, PS3.18 §8.3.4.1):

* single value (case-sensitive, except person names: case- and accent-insensitive on the
  ``*_norm`` columns, as C.2.2.2.1 allows for PN);
* list of UIDs (``,`` or ``\\`` separated), lists of codes for Modality / ModalitiesInStudy;
* wildcards ``*`` and ``?`` (C.2.2.2.4); ``*`` alone is universal matching;
* ranges of dates and times ``A-B``, ``-B``, ``A-`` (C.2.2.2.5), optionally combined
  date-time matching of StudyDate + StudyTime (C.2.2.2.5.2);
* fuzzy person-name matching (PS3.18 §8.3.4.2): the value is a prefix of any name component;
* ModalitiesInStudy matches a study that has a series of any of the modalities.
"""

from __future__ import annotations

import enum
import functools
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import orjson
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from sqlalchemy import (
    Boolean,
    ColumnElement,
    Select,
    String,
    and_,
    bindparam,
    exists,
    func,
    or_,
    select,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session

from gateway.access import Principal
from gateway.errors import InvalidQueryParameter
from gateway.index import Index
from gateway.instances import visible_conditions, visible_instance_condition
from gateway.metadata import PATIENT_STUDY_KEYWORDS, SERIES_KEYWORDS, normalize_name
from gateway.metrics import METRICS
from gateway.models import Instance, Patient, Series, Study
from gateway.uids import is_valid_uid

logger = logging.getLogger(__name__)

QUERY_LATENCY = "gateway_qido_seconds"  # QIDO-RS and C-FIND searches, by service and level


class Level(enum.StrEnum):
    """Query/Retrieve levels (PS3.4 C.6.1.1; QIDO-RS studies / series / instances)."""

    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"

    @property
    def depth(self) -> int:
        return {"STUDY": 0, "SERIES": 1, "IMAGE": 2}[self.value]


class Kind(enum.Enum):
    """How a key's value is matched."""

    UID = "UI"          # single value or list (C.2.2.2.2)
    TEXT = "text"       # single value or wildcard, case-sensitive
    CODE = "CS"         # single value, wildcard or list
    PERSON = "PN"       # normalised, wildcard, fuzzy
    DATE = "DA"         # single value or range
    TIME = "TM"         # single value or range
    NUMBER = "IS"       # single value
    MODALITIES = "ModalitiesInStudy"


@dataclass(frozen=True)
class MatchKey:
    level: Level
    column: Any
    kind: Kind


# The only table of DICOM keywords the engine matches on, with the column holding each.
MATCH_KEYS: dict[str, MatchKey] = {
    # Patient and study (PS3.18 Table 10.6.1-5, PS3.4 C.6.2.1.2)
    "PatientID": MatchKey(Level.STUDY, Patient.patient_id, Kind.TEXT),
    "IssuerOfPatientID": MatchKey(Level.STUDY, Patient.issuer_of_patient_id, Kind.TEXT),
    "PatientName": MatchKey(Level.STUDY, Patient.patient_name_norm, Kind.PERSON),
    "PatientBirthDate": MatchKey(Level.STUDY, Patient.patient_birth_date, Kind.DATE),
    "PatientSex": MatchKey(Level.STUDY, Patient.patient_sex, Kind.CODE),
    "StudyInstanceUID": MatchKey(Level.STUDY, Study.study_instance_uid, Kind.UID),
    "StudyDate": MatchKey(Level.STUDY, Study.study_date, Kind.DATE),
    "StudyTime": MatchKey(Level.STUDY, Study.study_time, Kind.TIME),
    "AccessionNumber": MatchKey(Level.STUDY, Study.accession_number, Kind.TEXT),
    "StudyID": MatchKey(Level.STUDY, Study.study_id, Kind.TEXT),
    "StudyDescription": MatchKey(Level.STUDY, Study.study_description, Kind.TEXT),
    "ReferringPhysicianName": MatchKey(Level.STUDY, Study.referring_physician_name_norm,
                                       Kind.PERSON),
    "ModalitiesInStudy": MatchKey(Level.STUDY, Series.modality, Kind.MODALITIES),
    # Series (Table 10.6.1-5, C.6.2.1.3)
    "SeriesInstanceUID": MatchKey(Level.SERIES, Series.series_instance_uid, Kind.UID),
    "Modality": MatchKey(Level.SERIES, Series.modality, Kind.CODE),
    "SeriesNumber": MatchKey(Level.SERIES, Series.series_number, Kind.NUMBER),
    "SeriesDescription": MatchKey(Level.SERIES, Series.series_description, Kind.TEXT),
    "BodyPartExamined": MatchKey(Level.SERIES, Series.body_part_examined, Kind.CODE),
    "SeriesDate": MatchKey(Level.SERIES, Series.series_date, Kind.DATE),
    "SeriesTime": MatchKey(Level.SERIES, Series.series_time, Kind.TIME),
    "PerformedProcedureStepStartDate": MatchKey(
        Level.SERIES, Series.performed_procedure_step_start_date, Kind.DATE),
    "PerformedProcedureStepStartTime": MatchKey(
        Level.SERIES, Series.performed_procedure_step_start_time, Kind.TIME),
    # Instance (Table 10.6.1-5, C.6.2.1.4)
    "SOPInstanceUID": MatchKey(Level.IMAGE, Instance.sop_instance_uid, Kind.UID),
    "SOPClassUID": MatchKey(Level.IMAGE, Instance.sop_class_uid, Kind.UID),
    "InstanceNumber": MatchKey(Level.IMAGE, Instance.instance_number, Kind.NUMBER),
}

@dataclass(frozen=True)
class SequenceKey:
    """A sequence attribute matched item by item (PS3.4 C.2.2.2.6), and its item keys."""

    level: Level
    items: Mapping[str, Kind]


# Sequence keys matched on the level attributes stored at ingest (PS3.4 C.6.1.1.3, C.6.1.1.4;
# PS3.18 Table 10.6.3-4). Only these item keys filter; others are returned, not matched.
SEQUENCE_KEYS: dict[str, SequenceKey] = {
    "RequestAttributesSequence": SequenceKey(Level.SERIES, {
        "ScheduledProcedureStepID": Kind.TEXT, "RequestedProcedureID": Kind.TEXT,
        "AccessionNumber": Kind.TEXT}),
    "IssuerOfAccessionNumberSequence": SequenceKey(Level.STUDY, {
        "LocalNamespaceEntityID": Kind.TEXT, "UniversalEntityID": Kind.TEXT,
        "UniversalEntityIDType": Kind.CODE}),
    "ProcedureCodeSequence": SequenceKey(Level.STUDY, {
        "CodeValue": Kind.TEXT, "CodingSchemeDesignator": Kind.TEXT,
        "CodingSchemeVersion": Kind.TEXT, "CodeMeaning": Kind.TEXT}),
}

# Attributes returned by default (PS3.18 Tables 10.6.3-3, 10.6.3-4, 10.6.3-5).
STUDY_RETURN = (
    "SpecificCharacterSet", "StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability",
    "ModalitiesInStudy", "ReferringPhysicianName", "TimezoneOffsetFromUTC", "RetrieveURL",
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
)
SERIES_RETURN = (
    "SpecificCharacterSet", "Modality", "TimezoneOffsetFromUTC", "SeriesDescription",
    "RetrieveURL", "SeriesInstanceUID", "SeriesNumber", "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "RequestAttributesSequence",
)
INSTANCE_RETURN = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "InstanceAvailability",
    "TimezoneOffsetFromUTC", "RetrieveURL", "InstanceNumber", "Rows", "Columns",
    "BitsAllocated", "NumberOfFrames",
)
DEFAULT_RETURN = {Level.STUDY: STUDY_RETURN, Level.SERIES: SERIES_RETURN,
                  Level.IMAGE: INSTANCE_RETURN}
# Attributes the engine computes rather than reads from stored attributes.
COMPUTED = frozenset({
    "InstanceAvailability", "RetrieveURL", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances", "NumberOfSeriesRelatedInstances", "StudyInstanceUID",
    "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber", "Rows", "Columns",
    "BitsAllocated", "NumberOfFrames", "QueryRetrieveLevel",
})
# Instance attributes the index holds in columns (no metadata read needed).
INSTANCE_COLUMNS = frozenset({"SOPInstanceUID", "SOPClassUID", "InstanceNumber", "Rows",
                              "Columns", "BitsAllocated", "NumberOfFrames"})
# Study attributes that describe every instance (returned at any level when asked for).
STUDY_CONTEXT = frozenset({"SpecificCharacterSet", "TimezoneOffsetFromUTC"})
# Query parameters of PS3.18 §8.3.4 that are not matching keys.
CONTROL_PARAMETERS = frozenset({"includefield", "limit", "offset", "fuzzymatching", "accept",
                                "charset"})

# Candidate rows fetched per batch while matching sequence keys in Python.
SEQUENCE_SCAN_BATCH = 500
_TAG_RE = re.compile(r"^[0-9A-Fa-f]{8}$")
_DATE_RE = re.compile(r"^\d{8}$")
_TIME_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_LIST_SPLIT = re.compile(r"[,\\]")
# Sorts after every character a DA/TM string holds: the upper bound of a partial time.
_HIGH = "~"


def keyword_of(name: str, parameter: str | None = None) -> str:
    """The DICOM keyword named by a keyword or an 8-hex-digit tag.

    >>> keyword_of("00100020")
    'PatientID'
    >>> keyword_of("PatientName")
    'PatientName'

    Raises
    ------
    InvalidQueryParameter
        If ``name`` is neither a dictionary keyword nor a tag.
    """
    if _TAG_RE.match(name):
        keyword = keyword_for_tag(int(name, 16))
        if keyword:
            return str(keyword)
    elif tag_for_keyword(name) is not None:
        return name
    raise InvalidQueryParameter(parameter or name,
                                "not a DICOM attribute keyword or tag (e.g. PatientID, 00100020)")


@dataclass(frozen=True)
class Query:
    """A search at one level.

    Attributes
    ----------
    level
        STUDY, SERIES or IMAGE.
    keys
        Matching keys ``{keyword: value}`` as DICOM strings; ``""`` is universal matching
        (the attribute is returned, nothing is filtered).
    include
        Extra attributes to return (keywords), besides the level's defaults and the keys.
    include_all
        Return every stored attribute of the level (``includefield=all``).
    fuzzy
        Fuzzy matching of person names (PS3.18 §8.3.4.2).
    limit, offset
        Paging (PS3.18 §8.3.4.4); ``None`` means the engine's maximum.
    study_uid, series_uid
        The study / series the request is scoped to (the QIDO-RS path).
    combined_datetime
        Match StudyDate + StudyTime (and Series...) ranges as one date-time (C.2.2.2.5.2).
    defaults
        Return the level's default attributes (QIDO-RS); C-FIND returns only what was asked.
    """

    level: Level
    keys: Mapping[str, str] = field(default_factory=dict)
    include: frozenset[str] = frozenset()
    include_all: bool = False
    fuzzy: bool = False
    limit: int | None = None
    offset: int = 0
    study_uid: str | None = None
    series_uid: str | None = None
    combined_datetime: bool = False
    defaults: bool = True
    items: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @classmethod
    def from_identifier(cls, level: Level | str, identifier: Mapping[str, str], *,
                        fuzzy: bool = False, combined_datetime: bool = False,
                        items: Mapping[str, Mapping[str, str]] | None = None) -> Query:
        """A C-FIND query: the identifier's keys are matched and returned, nothing else.

        ``identifier`` maps keywords to values in their DICOM string form (``str(elem.value)``,
        multi-values joined by ``\\``); ``QueryRetrieveLevel`` and ``SpecificCharacterSet`` are
        dropped from the keys. A sequence key is in ``identifier`` with an empty value and its
        item's keys in ``items`` (``{sequence keyword: {item keyword: value}}``, PS3.4
        C.2.2.2.6).
        """
        keys = {k: v for k, v in identifier.items()
                if k not in ("QueryRetrieveLevel", "SpecificCharacterSet")}
        return cls(level=Level(level), keys=keys, include=frozenset(keys), fuzzy=fuzzy,
                   combined_datetime=combined_datetime, defaults=False,
                   items=dict(items or {}))


@dataclass
class QueryResult:
    """Matches as DICOM JSON objects, and whether ``limit`` / the maximum cut the result."""

    matches: list[dict[str, Any]]
    truncated: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def study_uids(self) -> tuple[str, ...]:
        key = "0020000D"
        seen = dict.fromkeys(
            m[key]["Value"][0] for m in self.matches if key in m and m[key].get("Value")
        )
        return tuple(seen)


def parse_qido(level: Level, params: Iterable[tuple[str, str]], *,
               study_uid: str | None = None, series_uid: str | None = None) -> Query:
    """Parse QIDO-RS query parameters (PS3.18 §8.3.4) into a :class:`Query`.

    Parameters
    ----------
    level
        The resource searched: STUDY (``/studies``), SERIES, IMAGE (``/instances``).
    params
        The query parameters in order, repeated names repeated.
    study_uid, series_uid
        UIDs from the path (already validated).

    Raises
    ------
    InvalidQueryParameter
        Naming the first malformed parameter.

    >>> q = parse_qido(Level.STUDY, [("PatientID", "P1"), ("limit", "10"), ("includefield",
    ...     "StudyDescription,00081030")])
    >>> q.keys["PatientID"], q.limit, sorted(q.include)
    ('P1', 10, ['StudyDescription'])
    """
    keys: dict[str, str] = {}
    items: dict[str, dict[str, str]] = {}
    include: set[str] = set()
    include_all = False
    fuzzy = False
    limit: int | None = None
    offset = 0
    for name, value in params:
        if not name:
            continue
        lowered = name.lower()
        if lowered == "includefield":
            for item in (v.strip() for v in value.split(",")):
                if not item:
                    continue
                if item.lower() == "all":
                    include_all = True
                else:
                    include.add(keyword_of(item, f"includefield={item}"))
        elif lowered == "limit":
            limit = _non_negative(name, value)
        elif lowered == "offset":
            offset = _non_negative(name, value)
        elif lowered == "fuzzymatching":
            if value.lower() not in ("true", "false"):
                raise InvalidQueryParameter(name, "must be true or false")
            fuzzy = value.lower() == "true"
        elif lowered in CONTROL_PARAMETERS:
            continue
        else:
            if "." in name:
                sequence, item_key = _sequence_key(name)
                entry = items.setdefault(sequence, {})
                if item_key in entry:
                    raise InvalidQueryParameter(name, "given more than once")
                entry[item_key] = value
                keys.setdefault(sequence, "")
                continue
            keyword = keyword_of(name)
            if keyword in keys:
                spec = MATCH_KEYS.get(keyword)
                if spec is None or spec.kind not in (Kind.UID, Kind.CODE, Kind.MODALITIES):
                    raise InvalidQueryParameter(name, "given more than once")
                keys[keyword] = f"{keys[keyword]}\\{value}"
            else:
                keys[keyword] = value
    query = Query(level=level, keys=keys, include=frozenset(include), include_all=include_all,
                  fuzzy=fuzzy, limit=limit, offset=offset, study_uid=study_uid,
                  series_uid=series_uid, items=items)
    # Parse every condition now, so that a bad value is a 400 before any SQL runs.
    _conditions(query)
    _sequence_conditions(query)
    return query


def _sequence_key(name: str) -> tuple[str, str]:
    """``"00400275.00400009"`` -> ``("RequestAttributesSequence", "ScheduledProcedureStepID")``.

    A QIDO-RS key on a sequence item (PS3.18 §8.3.4.1, Table 10.6.3-4): one level of nesting,
    on the sequences of :data:`SEQUENCE_KEYS`.
    """
    parts = name.split(".")
    if len(parts) != 2 or not all(parts):
        raise InvalidQueryParameter(
            name, "a sequence key is SequenceKeyword.ItemKeyword (one level of nesting)")
    sequence = keyword_of(parts[0], name)
    if sequence not in SEQUENCE_KEYS:
        raise InvalidQueryParameter(
            name, f"{sequence} is not a sequence this server matches on (supported: "
            f"{', '.join(SEQUENCE_KEYS)})")
    return sequence, keyword_of(parts[1], name)


# The largest integer a query binds (SQL BIGINT): a longer one is refused as a bad parameter
# rather than overflowing the driver.
MAX_QUERY_INTEGER = 2**63 - 1


def _integer(name: str, value: str) -> int:
    """An integer query value (``limit``, ``offset``, an IS matching key), within BIGINT.

    >>> _integer("offset", "20")
    20
    """
    text = value.strip()
    # Checked before int(): Python refuses to convert more than 4300 digits (ValueError).
    number = int(text) if len(text) <= 20 and _INTEGER.fullmatch(text) else None
    if number is None or abs(number) > MAX_QUERY_INTEGER:
        shown = value if len(value) <= 20 else f"{value[:20]}... ({len(value)} characters)"
        raise InvalidQueryParameter(name, f"{shown!r} is not an integer of at most 19 digits")
    return number


_INTEGER = re.compile(r"[+-]?[0-9]+")


def _non_negative(name: str, value: str) -> int:
    number = _integer(name, value)
    if number < 0:
        raise InvalidQueryParameter(name, "must not be negative")
    return number


# -- matching --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    keyword: str
    spec: MatchKey
    clause: ColumnElement[bool]


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _like_pattern(value: str) -> str:
    """A LIKE pattern (escape ``\\``) for a DICOM wildcard value (PS3.4 C.2.2.2.4).

    >>> _like_pattern("DOE*J?_%")
    'DOE%J_\\\\_\\\\%'
    """
    out = []
    for char in value:
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char in "%_\\":
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def _glob_pattern(value: str) -> str:
    """A SQLite GLOB pattern for a DICOM wildcard value (``*`` and ``?`` mean the same).

    >>> _glob_pattern("A[B*")
    'A[[]B*'
    """
    return value.replace("[", "[[]")


class Wildcard(ColumnElement[bool]):
    """Case-sensitive wildcard matching (PS3.4 C.2.2.2.4), compiled per dialect.

    SQLite's LIKE ignores ASCII case, so SQLite gets GLOB (case-sensitive, and able to use the
    column's index for a literal prefix); other databases get LIKE with an escape character.
    """

    inherit_cache = False
    type = Boolean()
    # A predicate, not a boolean value: no "= 1" on databases without a boolean type (which
    # would hide the column from SQLite's index planner).
    _is_implicitly_boolean = True

    def __init__(self, column: Any, value: str) -> None:
        self.column = column
        self.value = value


@compiles(Wildcard)
def _compile_like(element: Wildcard, compiler: Any, **kw: Any) -> str:
    pattern = bindparam(None, _like_pattern(element.value), type_=String())
    return (f"{compiler.process(element.column, **kw)} LIKE "
            f"{compiler.process(pattern, **kw)} ESCAPE '\\'")


@compiles(Wildcard, "sqlite")
def _compile_glob(element: Wildcard, compiler: Any, **kw: Any) -> str:
    pattern = bindparam(None, _glob_pattern(element.value), type_=String())
    return f"{compiler.process(element.column, **kw)} GLOB {compiler.process(pattern, **kw)}"


def _text_condition(column: Any, value: str) -> ColumnElement[bool]:
    if _has_wildcard(value):
        return Wildcard(column, value)
    return column == value


def _person_condition(column: Any, value: str, fuzzy: bool) -> ColumnElement[bool]:
    norm = normalize_name(value).strip()
    if fuzzy and not _has_wildcard(norm):
        # PS3.18 §8.3.4.2: the value matches the start of any component of the name.
        starts = Wildcard(column, norm + "*")
        inner = [Wildcard(column, f"*{sep}{norm}*") for sep in ("^", " ", "=")]
        return or_(starts, *inner)
    if _has_wildcard(norm):
        return Wildcard(column, norm)
    return column == norm


def _check_date(keyword: str, value: str) -> str:
    if not _DATE_RE.match(value):
        raise InvalidQueryParameter(keyword, f"{value!r} is not a date YYYYMMDD")
    try:
        date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        raise InvalidQueryParameter(keyword, f"{value!r} is not a valid date") from None
    return value


def _check_time(keyword: str, value: str) -> str:
    value = value.replace(":", "")
    if not _TIME_RE.match(value):
        raise InvalidQueryParameter(keyword, f"{value!r} is not a time HHMMSS.FFFFFF")
    hh, mm, ss = int(value[:2]), int(value[2:4] or 0), int(value[4:6] or 0)
    if hh > 23 or mm > 59 or ss > 60:
        raise InvalidQueryParameter(keyword, f"{value!r} is not a valid time")
    return value


def _range(keyword: str, value: str, check: Any) -> tuple[str | None, str | None]:
    """Split ``A-B`` / ``-B`` / ``A-`` / ``A`` into checked bounds (PS3.4 C.2.2.2.5)."""
    if value.count("-") > 1:
        raise InvalidQueryParameter(keyword, f"{value!r} is not a value or a range A-B")
    if "-" not in value:
        single = check(keyword, value)
        return single, single
    low, high = value.split("-")
    if not low and not high:
        raise InvalidQueryParameter(keyword, "a range needs at least one bound")
    lo = check(keyword, low) if low else None
    hi = check(keyword, high) if high else None
    if lo is not None and hi is not None and lo > hi:
        raise InvalidQueryParameter(keyword, f"range {value!r} ends before it starts")
    return lo, hi


def _date_condition(column: Any, keyword: str, value: str) -> ColumnElement[bool]:
    lo, hi = _range(keyword, value, _check_date)
    if lo is not None and lo == hi and "-" not in value:
        return column == lo
    parts = [column != ""]
    if lo is not None:
        parts.append(column >= lo)
    if hi is not None:
        parts.append(column <= hi)
    return and_(*parts)


def _time_condition(column: Any, keyword: str, value: str) -> ColumnElement[bool]:
    lo, hi = _range(keyword, value, _check_time)
    parts = [column != ""]
    if lo is not None:
        parts.append(column >= lo)
    if hi is not None:
        # "1015" includes 10:15:59.999999: compare against a bound just above the prefix.
        parts.append(column <= hi + _HIGH)
    return and_(*parts)


def _combined_condition(date_col: Any, time_col: Any, dates: str, times: str
                        ) -> ColumnElement[bool]:
    """Date and time ranges matched as one date-time range (PS3.4 C.2.2.2.5.2)."""
    dlo, dhi = _range("StudyDate", dates, _check_date)
    tlo, thi = _range("StudyTime", times, _check_time)
    parts = [date_col != ""]
    if dlo is not None:
        start = or_(date_col > dlo, and_(date_col == dlo, time_col >= (tlo or "")))
        parts.append(start)
    if dhi is not None:
        end = or_(date_col < dhi, and_(date_col == dhi, time_col <= (thi or "99") + _HIGH))
        parts.append(end)
    return and_(*parts)


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in _LIST_SPLIT.split(value) if v.strip()]


def _condition(keyword: str, spec: MatchKey, value: str, fuzzy: bool) -> ColumnElement[bool]:
    column = spec.column
    kind = spec.kind
    if kind is Kind.UID:
        uids = _split_list(value)
        for uid in uids:
            if not is_valid_uid(uid):
                raise InvalidQueryParameter(
                    keyword, f"{uid[:80]!r} is not a valid UID (wildcards are not allowed "
                    "on UIDs, PS3.4 C.2.2.2.2)")
        return column == uids[0] if len(uids) == 1 else column.in_(uids)
    if kind is Kind.TEXT:
        return _text_condition(column, value)
    if kind is Kind.CODE:
        codes = _split_list(value)
        if len(codes) > 1:
            return column.in_(codes)
        return _text_condition(column, codes[0])
    if kind is Kind.PERSON:
        return _person_condition(column, value, fuzzy)
    if kind is Kind.DATE:
        return _date_condition(column, keyword, value)
    if kind is Kind.TIME:
        return _time_condition(column, keyword, value)
    if kind is Kind.NUMBER:
        return column == _integer(keyword, value)
    if kind is Kind.MODALITIES:
        codes = _split_list(value)
        modality = (Series.modality.in_(codes) if len(codes) > 1
                    else _text_condition(Series.modality, codes[0]))
        return exists().where(Series.study_pk == Study.pk, modality)
    raise AssertionError(kind)


def _conditions(query: Query) -> tuple[list[Condition], list[str]]:
    """The SQL conditions of a query's keys, and warnings for keys that were ignored."""
    conditions: list[Condition] = []
    warnings: list[str] = []
    keys = dict(query.keys)
    combined = None
    if (query.combined_datetime and keys.get("StudyDate", "").strip("*")
            and keys.get("StudyTime", "").strip("*")):
        combined = _combined_condition(Study.study_date, Study.study_time,
                                       keys.pop("StudyDate"), keys.pop("StudyTime"))
        conditions.append(Condition("StudyDate", MATCH_KEYS["StudyDate"], combined))
    for keyword, raw in keys.items():
        value = raw.strip() if isinstance(raw, str) else str(raw)
        spec = MATCH_KEYS.get(keyword)
        if spec is None:
            if keyword in SEQUENCE_KEYS:
                continue  # matched in Python (_sequence_conditions)
            if keyword not in COMPUTED and keyword not in DEFAULT_RETURN[query.level]:
                warnings.append(keyword)
            continue
        if spec.level.depth > query.level.depth:
            raise InvalidQueryParameter(
                keyword, f"is a {spec.level.value.lower()}-level attribute; it cannot be "
                f"matched in a {query.level.value.lower()}-level search")
        if value in ("", "*"):
            continue  # universal matching (C.2.2.2.3)
        conditions.append(Condition(keyword, spec, _condition(keyword, spec, value,
                                                              query.fuzzy)))
    return conditions, warnings


# -- sequence matching (PS3.4 C.2.2.2.6) -------------------------------------------------------
def _value_matcher(value: str, kind: Kind) -> Callable[[str], bool]:
    """A test of one stored value against a key, with the rules of the SQL conditions:
    single value (case-sensitive), wildcard ``*`` / ``?`` (C.2.2.2.4), list for codes."""
    values = _split_list(value) if kind is Kind.CODE else [value]
    if len(values) > 1:
        members = frozenset(values)
        return members.__contains__
    single = values[0]
    if _has_wildcard(single):
        pattern = re.compile("".join(
            ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in single), re.DOTALL)
        return lambda stored: pattern.fullmatch(stored) is not None
    return single.__eq__


@dataclass(frozen=True)
class SequenceCondition:
    """A sequence key with at least one non-universal item key.

    The sequence matches when at least one of its stored items matches every item key
    (PS3.4 C.2.2.2.6); an attribute absent or empty in the item does not match a
    non-universal key.
    """

    keyword: str
    spec: SequenceKey
    tag: str
    tests: tuple[tuple[str, Callable[[str], bool]], ...]

    def item_matches(self, item: Mapping[str, Any]) -> bool:
        for tag, test in self.tests:
            values = item.get(tag, {}).get("Value") or []
            if not any(isinstance(v, str) and test(v) for v in values):
                return False
        return True

    def matches(self, attributes: Mapping[str, Any]) -> bool:
        items = attributes.get(self.tag, {}).get("Value") or []
        return any(isinstance(item, dict) and self.item_matches(item) for item in items)


def _sequence_conditions(query: Query) -> tuple[list[SequenceCondition], list[str]]:
    """The sequence keys of a query to match in Python, and item keys that were ignored."""
    conditions: list[SequenceCondition] = []
    ignored: list[str] = []
    for keyword, item in query.items.items():
        spec = SEQUENCE_KEYS.get(keyword)
        if spec is None:
            ignored.extend(f"{keyword}.{k}" for k, v in item.items() if v.strip())
            continue
        tests = []
        for item_key, raw in item.items():
            value = raw.strip()
            kind = spec.items.get(item_key)
            if kind is None:
                if value:
                    ignored.append(f"{keyword}.{item_key}")
                continue
            if value in ("", "*"):
                continue  # universal matching of the item key
            tests.append((_tag_hex(item_key), _value_matcher(value, kind)))
        if not tests:
            continue  # universal matching: the sequence is returned as stored
        if spec.level.depth > query.level.depth:
            raise InvalidQueryParameter(
                keyword, f"is a {spec.level.value.lower()}-level attribute; it cannot be "
                f"matched in a {query.level.value.lower()}-level search")
        conditions.append(SequenceCondition(keyword, spec, _tag_hex(keyword), tuple(tests)))
    return conditions, ignored


# -- results ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def _tag_hex(keyword: str) -> str:
    """``"PatientID"`` -> ``"00100020"``; ``""`` for a name that is not a keyword."""
    tag = tag_for_keyword(keyword)
    return "" if tag is None else f"{tag:08X}"


@functools.lru_cache(maxsize=4096)
def _vr(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    return str(dictionary_VR(tag)) if tag is not None else "UN"


def _element(keyword: str, value: Any = None) -> dict[str, Any]:
    element: dict[str, Any] = {"vr": _vr(keyword)}
    if value is not None and value != "" and value != []:
        element["Value"] = value if isinstance(value, list) else [value]
    return element


class QueryEngine:
    """Runs :class:`Query` objects against the index.

    Parameters
    ----------
    index
        The gateway's index (one engine, one sessionmaker).
    max_results
        The largest page returned (``[http] max_results``); bigger requests are cut and the
        result marked truncated. ``0`` means no maximum (C-FIND).
    max_scanned
        The most candidate records whose stored attributes are parsed to match sequence keys
        (``[http] max_sequence_scan``); ``0`` means no maximum (C-FIND, allow-listed peers).
    """

    def __init__(self, index: Index, *, max_results: int = 1000, max_scanned: int = 0) -> None:
        self.index = index
        self.max_results = max_results
        self.max_scanned = max_scanned

    def search(self, query: Query, principal: Principal, *,
               retrieve_base: str | None = None) -> QueryResult:
        """Run ``query`` for ``principal``; its duration goes to :data:`QUERY_LATENCY`.

        Parameters
        ----------
        retrieve_base
            The absolute DICOMweb root for RetrieveURL (PS3.18 Tables 10.6.3-3..5); ``None``
            leaves RetrieveURL out (C-FIND).

        Raises
        ------
        InvalidQueryParameter
            On a malformed key.
        """
        started = time.perf_counter()
        try:
            return self._search(query, principal, retrieve_base=retrieve_base)
        finally:
            METRICS.observe(QUERY_LATENCY, time.perf_counter() - started,
                            service="qido" if retrieve_base is not None else "c-find",
                            level=str(query.level))

    def _search(self, query: Query, principal: Principal, *,
                retrieve_base: str | None) -> QueryResult:
        conditions, ignored = _conditions(query)
        sequences, ignored_items = _sequence_conditions(query)
        ignored = ignored + ignored_items
        warnings = [f"the following attributes are not supported as matching keys and were "
                    f"ignored: {', '.join(ignored)}"] if ignored else []
        wanted = self._wanted(query)
        limit = query.limit
        if self.max_results and (limit is None or limit > self.max_results):
            limit = self.max_results  # cut at the maximum: the Warning says more exist
        stmt = self._select(query, wanted)
        # Patient keys select patients first (their indexes), then the patients' studies
        # (ix_study_patient_date): a plan the databases pick reliably, unlike a join they may
        # reorder into a scan of every study.
        on_patient = [c.clause for c in conditions if c.spec.column.table is Patient.__table__]
        others = [c.clause for c in conditions if c.spec.column.table is not Patient.__table__]
        if on_patient:
            others.append(Study.patient_pk.in_(select(Patient.pk).where(*on_patient)))
        stmt = stmt.where(*others, *self._scope(query, principal))
        # Sequence keys are matched in Python on the rows SQL narrowed down: paging then has
        # to come after that filter, not in the SELECT (_match_sequences).
        if not sequences:
            if limit is not None:
                stmt = stmt.limit(limit + 1)
            if query.offset:
                stmt = stmt.offset(query.offset)
        with self.index.Session() as session:
            if sequences:
                rows = self._match_sequences(session, stmt, query, limit, sequences)
            else:
                rows = list(session.execute(stmt).all())
            truncated = limit is not None and len(rows) > limit
            if truncated:
                rows = rows[:limit]
            counts = (self._counts(session, query.level, rows, principal)
                      if self._counts_wanted(query.level, wanted) else {})
        shape = self._shape(query, wanted, retrieve_base)
        matches = [self._build(query, row, shape, wanted, retrieve_base, counts) for row in rows]
        return QueryResult(matches, truncated, warnings)

    def _match_sequences(self, session: Session, stmt: Select, query: Query,
                         limit: int | None, sequences: list[SequenceCondition]) -> list[Any]:
        """The rows of ``stmt`` whose stored sequences match, after ``offset``, up to one more
        than ``limit`` (to tell a truncated page).

        The candidates are read in batches (a server-side cursor on PostgreSQL) and the scan
        stops once the page is full, so a page of a broad query parses only the JSON it needs.
        At most ``max_scanned`` candidates are parsed in all.

        Raises
        ------
        InvalidQueryParameter
            More than ``max_scanned`` candidates had to be read: the other keys do not
            narrow the query enough.
        """
        wanted = None if limit is None else query.offset + limit + 1
        matched: list[Any] = []
        scanned = 0
        result = session.execute(stmt.execution_options(yield_per=SEQUENCE_SCAN_BATCH))
        try:
            for row in result:
                scanned += 1
                if self.max_scanned and scanned > self.max_scanned:
                    raise InvalidQueryParameter(
                        sequences[0].keyword,
                        f"sequence keys are matched on at most {self.max_scanned} candidate "
                        f"{query.level.name.lower()} records (http.max_sequence_scan) and more "
                        "were found: add matching keys that narrow the query (dates, "
                        "patient, modality)")
                if self._sequences_match(query.level, row, sequences):
                    matched.append(row)
                    if wanted is not None and len(matched) >= wanted:
                        break
        finally:
            result.close()
        return matched[query.offset:]

    @staticmethod
    def _sequences_match(level: Level, row: Any, sequences: list[SequenceCondition]) -> bool:
        """Whether a row's stored level attributes match every sequence key."""
        parsed: dict[Level, dict[str, Any]] = {}
        for condition in sequences:
            source = condition.spec.level
            if source not in parsed:
                if source is level:
                    stored = row.attributes if level is not Level.IMAGE else None
                else:
                    stored = (row.study_attributes if source is Level.STUDY
                              else row.series_attributes)
                parsed[source] = orjson.loads(stored) if stored else {}
            if not condition.matches(parsed[source]):
                return False
        return True

    # -- SQL ------------------------------------------------------------------------------------
    def _wanted(self, query: Query) -> frozenset[str] | None:
        """Keywords to return; ``None`` means everything stored (``includefield=all``)."""
        if query.include_all:
            return None
        base: set[str] = set()
        if query.defaults:
            base.update(DEFAULT_RETURN[query.level])
            # A search across studies returns the parents' attributes too (PS3.18 §10.6.3.3).
            if query.level is not Level.STUDY and query.study_uid is None:
                base.update(k for k in STUDY_RETURN if k not in COMPUTED)
            if query.level is Level.IMAGE and query.series_uid is None:
                base.update(k for k in SERIES_RETURN if k not in COMPUTED)
        return frozenset(base) | query.include | frozenset(query.keys)

    def _select(self, query: Query, wanted: frozenset[str] | None) -> Select:
        level = query.level
        if level is Level.STUDY:
            return (
                select(Study.pk, Study.study_instance_uid, Study.attributes,
                       Study.modalities_in_study)
                .order_by(Study.pk)
            )
        if level is Level.SERIES:
            stmt = (
                select(Series.pk, Series.series_instance_uid, Series.attributes,
                       Study.study_instance_uid,
                       Study.attributes.label("study_attributes"), Study.pk.label("study_pk"))
                .join(Study, Study.pk == Series.study_pk)
            )
            if query.study_uid is not None:
                return stmt.order_by(Series.series_number, Series.pk)
            return stmt.order_by(Series.pk)
        need_metadata = wanted is None or any(
            k not in INSTANCE_COLUMNS and k not in COMPUTED
            and tag_for_keyword(k) is not None and not self._stored_above(k)
            for k in wanted
        )
        columns: list[Any] = [
            Instance.pk, Instance.sop_instance_uid, Instance.sop_class_uid,
            Instance.instance_number, Instance.rows, Instance.columns, Instance.bits_allocated,
            Instance.number_of_frames, Series.series_instance_uid,
            Series.attributes.label("series_attributes"), Study.study_instance_uid,
            Study.attributes.label("study_attributes"), Series.pk.label("series_pk"),
        ]
        if need_metadata:
            columns.append(Instance.metadata_json)
        stmt = (
            select(*columns)
            .join(Series, Series.pk == Instance.series_pk)
            .join(Study, Study.pk == Series.study_pk)
        )
        if query.series_uid is not None:
            return stmt.order_by(Instance.instance_number, Instance.pk)
        return stmt.order_by(Instance.pk)

    @staticmethod
    def _stored_above(keyword: str) -> bool:
        return keyword in PATIENT_STUDY_KEYWORDS or keyword in SERIES_KEYWORDS

    def _scope(self, query: Query, principal: Principal) -> list[ColumnElement[bool]]:
        """Path scope and the principal's visibility (:func:`gateway.instances.visible_conditions`,
        the one rule), as SQL conditions."""
        clauses: list[ColumnElement[bool]] = []
        if query.study_uid is not None:
            clauses.append(Study.study_instance_uid == query.study_uid)
        if query.series_uid is not None:
            clauses.append(Series.series_instance_uid == query.series_uid)
        return clauses + visible_conditions(principal, query.level.value)

    @staticmethod
    def _counts_wanted(level: Level, wanted: frozenset[str] | None) -> bool:
        asked: tuple[str, ...]
        if level is Level.STUDY:
            asked = ("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
        elif level is Level.SERIES:
            asked = ("NumberOfSeriesRelatedInstances",)
        else:
            return False
        return wanted is None or any(keyword in wanted for keyword in asked)

    def _counts(self, session: Any, level: Level, rows: Sequence[Any],
                principal: Principal) -> dict[tuple[str, int], int]:
        """The series and instances of the studies, or the instances of the series, in
        ``rows``: of what the principal may see (a key-images session sees some instances).

        Counted when asked for, one grouped query per page of results (the indexes on
        ``series.study_pk`` and ``instance.series_pk``), rather than kept in the rows: so
        storing an instance writes only its own row (``Index.add_new_instance``).
        """
        visible = visible_instance_condition(principal)
        pks = [r.pk for r in rows]
        counts: dict[tuple[str, int], int] = {}
        if not pks:
            return counts
        if level is Level.SERIES:
            stmt = (select(Instance.series_pk, func.count())
                    .where(Instance.series_pk.in_(pks)).group_by(Instance.series_pk))
            if visible is not None:
                stmt = stmt.where(visible)
            for series_pk, n in session.execute(stmt):
                counts[("series", series_pk)] = n
        elif level is Level.STUDY:
            by_study = (
                select(Series.study_pk, func.count(), func.count(func.distinct(Series.pk)))
                .join(Instance, Instance.series_pk == Series.pk)
                .where(Series.study_pk.in_(pks)).group_by(Series.study_pk))
            if visible is not None:
                by_study = by_study.where(visible)
            for study_pk, n_instances, n_series in session.execute(by_study):
                counts[("study", study_pk)] = n_instances
                counts[("study_series", study_pk)] = n_series
        return counts

    # -- DICOM JSON -----------------------------------------------------------------------------
    def _shape(self, query: Query, wanted: frozenset[str] | None,
               retrieve_base: str | None) -> _Shape:
        """What every match of ``query`` returns, worked out once per search."""
        if wanted is None:
            return _Shape(None, None, True, None)
        tags = frozenset(_tag_hex(k) for k in wanted if _tag_hex(k))
        context = frozenset(_tag_hex(k) for k in wanted & STUDY_CONTEXT)
        asks_study = query.study_uid is None or any(
            k in PATIENT_STUDY_KEYWORDS and k not in STUDY_CONTEXT for k in wanted)
        asks_series = query.series_uid is None or any(k in SERIES_KEYWORDS for k in wanted)
        placeholders = {
            _tag_hex(k): _vr(k) for k in wanted
            if _tag_hex(k) and k != "QueryRetrieveLevel"
            and not (k == "RetrieveURL" and retrieve_base is None)
        }
        return _Shape(tags, tags if asks_study else context, asks_series, placeholders)

    def _build(self, query: Query, row: Any, shape: _Shape, wanted: frozenset[str] | None,
               retrieve_base: str | None, counts: dict[tuple[str, int], int]
               ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        level = query.level
        if level is Level.STUDY:
            _copy(out, orjson.loads(row.attributes), shape.tags)
            n_series = counts.get(("study_series", row.pk), 0)
            n_instances = counts.get(("study", row.pk), 0)
            computed: dict[str, Any] = {
                "StudyInstanceUID": row.study_instance_uid,
                "ModalitiesInStudy": [m for m in row.modalities_in_study.split("\\") if m],
                "NumberOfStudyRelatedSeries": n_series,
                "NumberOfStudyRelatedInstances": n_instances,
                "InstanceAvailability": "ONLINE",
            }
            if retrieve_base is not None:
                computed["RetrieveURL"] = f"{retrieve_base}/studies/{row.study_instance_uid}"
        elif level is Level.SERIES:
            _copy(out, orjson.loads(row.study_attributes), shape.study_tags)
            _copy(out, orjson.loads(row.attributes), shape.tags)
            n_instances = counts.get(("series", row.pk), 0)
            computed = {
                "StudyInstanceUID": row.study_instance_uid,
                "SeriesInstanceUID": row.series_instance_uid,
                "NumberOfSeriesRelatedInstances": n_instances,
                "InstanceAvailability": "ONLINE",
            }
            if retrieve_base is not None:
                computed["RetrieveURL"] = (f"{retrieve_base}/studies/{row.study_instance_uid}"
                                           f"/series/{row.series_instance_uid}")
        else:
            _copy(out, orjson.loads(row.study_attributes), shape.study_tags)
            if shape.asks_series:
                _copy(out, orjson.loads(row.series_attributes), shape.tags)
            metadata = getattr(row, "metadata_json", None)
            if metadata is not None:
                _copy(out, orjson.loads(metadata), shape.tags)
            computed = {
                "StudyInstanceUID": row.study_instance_uid,
                "SeriesInstanceUID": row.series_instance_uid,
                "SOPInstanceUID": row.sop_instance_uid,
                "SOPClassUID": row.sop_class_uid,
                "InstanceNumber": row.instance_number,
                "Rows": row.rows,
                "Columns": row.columns,
                "BitsAllocated": row.bits_allocated,
                "NumberOfFrames": row.number_of_frames,
                "InstanceAvailability": "ONLINE",
            }
            if retrieve_base is not None:
                computed["RetrieveURL"] = (
                    f"{retrieve_base}/studies/{row.study_instance_uid}/series/"
                    f"{row.series_instance_uid}/instances/{row.sop_instance_uid}")
        for keyword, value in computed.items():
            always = keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
            if wanted is None or keyword in wanted or (always and query.defaults):
                out[_tag_hex(keyword)] = _element(keyword, value)
        if shape.placeholders:
            for tag, vr in shape.placeholders.items():
                if tag not in out:
                    out[tag] = {"vr": vr}  # asked for, not present: zero length
        if query.items and not query.defaults:
            _prune_items(query, out)
        return dict(sorted(out.items()))


@dataclass(frozen=True)
class _Shape:
    """The tags a search returns from each stored level (``None``: all of them)."""

    tags: frozenset[str] | None
    study_tags: frozenset[str] | None
    asks_series: bool
    placeholders: dict[str, str] | None


def _prune_items(query: Query, out: dict[str, Any]) -> None:
    """C-FIND: a sequence key with item keys returns the matching items, each with the item
    keys asked for only (zero length when not stored), as the identifier's other keys are
    (PS3.4 C.2.2.2.6, C.4.1.1.3.2). An empty sequence key returns the sequence as stored."""
    for keyword, item_keys in query.items.items():
        element = out.get(_tag_hex(keyword))
        if not item_keys or element is None or not element.get("Value"):
            continue
        probe = Query(level=query.level, items={keyword: item_keys})
        conditions, _ = _sequence_conditions(probe)
        asked = {_tag_hex(k): _vr(k) for k in item_keys if _tag_hex(k)}
        kept = []
        for item in element["Value"]:
            if not isinstance(item, dict) or any(not c.item_matches(item) for c in conditions):
                continue
            kept.append({tag: item.get(tag, {"vr": vr}) for tag, vr in sorted(asked.items())})
        element = {"vr": "SQ"}
        if kept:
            element["Value"] = kept
        out[_tag_hex(keyword)] = element


def _copy(out: dict[str, Any], stored: dict[str, Any], tags: frozenset[str] | None) -> None:
    if tags is None:
        out.update(stored)
        return
    for key, element in stored.items():
        if key in tags:
            out[key] = element


__all__ = [
    "DEFAULT_RETURN", "MATCH_KEYS", "SEQUENCE_KEYS", "InvalidQueryParameter", "Level", "Query",
    "QueryEngine", "QueryResult", "keyword_of", "parse_qido",
]
