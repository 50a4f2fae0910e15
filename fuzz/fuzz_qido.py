"""Fuzz the QIDO-RS query parser: ``parse_qido`` (gateway/query.py, PS3.18 §8.3.4).

The input is a query string as it arrives after ``?``; its first byte picks the level searched
(studies, series, instances). aiohttp splits it the way :func:`urllib.parse.parse_qsl` does.
Every condition is built by ``parse_qido`` and then compiled for SQLite and PostgreSQL, as
the engine would run it. Documented refusal: :class:`~gateway.errors.InvalidQuery` (a 400
naming the parameter). Anything else is a finding.

Seeds: the query strings of the QIDO-RS tests and of OHIF's study list, with PS3.18 examples.

Run: ``.venv/bin/python fuzz/fuzz_qido.py -max_total_time=60``
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import parse_qsl

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import main  # noqa: E402

with atheris.instrument_imports(include=["gateway.query"]):
    from gateway.errors import InvalidQuery
    from gateway.query import Level, _conditions, _sequence_conditions, parse_qido

from sqlalchemy.dialects import postgresql, sqlite

NAME = "qido"
REFUSALS = (InvalidQuery,)
LEVELS = (Level.STUDY, Level.SERIES, Level.IMAGE)
DIALECTS = (sqlite.dialect(), postgresql.dialect())

QUERIES = [
    "PatientID=P-001",
    "PatientName=M%C3%BCller*&fuzzymatching=true",
    "PatientName=*Doe*&StudyDate=20250101-20251231&limit=25&offset=0",
    "StudyDate=20240615&StudyTime=140000-150000",
    "StudyDate=-20240101",
    "ModalitiesInStudy=CT&ModalitiesInStudy=MR",
    "ModalitiesInStudy=CT%5CMR",
    "StudyInstanceUID=1.2.826.0.1.3680043.8.498.77.1,1.2.826.0.1.3680043.8.498.77.2",
    "AccessionNumber=ACC-00?&includefield=StudyDescription,00081030",
    "includefield=all&limit=101&offset=100",
    "00100020=P-002&00080061=MR",
    "ReferringPhysicianName=Weber%5EAnne",
    # OHIF 3's study list (DicomWebDataSource qidoSearch)
    "limit=101&offset=0&fuzzymatching=false&includefield=00081030%2C00080060",
    "PatientName=*&StudyDate=19930101-20261231&limit=101&offset=0&fuzzymatching=false"
    "&includefield=00081030%2C00080060",
    "SeriesInstanceUID=1.2.3.4&includefield=00080021,00080031",
    "Modality=CT&SeriesNumber=2",
    "SOPClassUID=1.2.840.10008.5.1.4.1.1.2&InstanceNumber=3",
    "00400275.00400009=SPS-1",
    "RequestAttributesSequence.ScheduledProcedureStepID=SPS-1"
    "&RequestAttributesSequence.RequestedProcedureID=RP-1",
    "StudyDate=2025&StudyTime=10",
    "PatientBirthDate=19700202-19800101",
    "limit=-1",
    "fuzzymatching=maybe",
    "Unknown=1",
]


def seeds() -> list[bytes]:
    return [bytes([level]) + query.encode() for level in range(3) for query in QUERIES]


def check(data: bytes) -> None:
    if not data:
        return
    level = LEVELS[data[0] % len(LEVELS)]
    params = parse_qsl(data[1:].decode("utf-8", "replace"), keep_blank_values=True)
    try:
        query = parse_qido(level, params)
    except REFUSALS:
        return
    conditions, _ = _conditions(query)
    items, _ = _sequence_conditions(query)
    for item_condition in items:  # matched in Python against stored items
        item_condition.matches({item_condition.tag: {"vr": "SQ", "Value": [
            {tag: {"vr": "SH", "Value": ["SPS-1"]} for tag, _ in item_condition.tests}]}})
    for dialect in DIALECTS:
        for condition in conditions:
            str(condition.clause.compile(dialect=dialect))


if __name__ == "__main__":
    main(NAME, seeds, check)
