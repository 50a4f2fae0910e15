"""dimse.services.identifier against pydicom's writer: the same bytes for every C-FIND response.

The identifiers are the real ones: produced by :func:`dimse.services.find.search` from an archive of
generated studies (accented names, multi-valued and numeric keys, empty return keys), at every
level, in the character sets the SCP answers in.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pynetdicom.dsutils import encode

from dimse.services.find import as_dataset, search
from dimse.services.identifier import encode_identifier
from gateway.core import Gateway
from sample_dicom.generator import SeriesSpec, StudySpec
from tests.support.qr_helpers import load_study, qr_settings

SPECS = [
    StudySpec(patient_id="LU0000001", patient_name="Müller^Zoé", accession_number="ACC1",
              description="CT Schädel", key_object=True,
              series=(SeriesSpec(modality="CT", instances=2, rows=16, columns=16),
                      SeriesSpec(modality="MR", instances=1, rows=16, columns=16))),
    StudySpec(patient_id="LU0000002", patient_name="Schmit^Jérôme", accession_number="ACC2",
              series=(SeriesSpec(modality="CT", instances=1, rows=16, columns=16),),
              key_object=False),
]
KEYS = {
    "STUDY": ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
              "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
              "ReferringPhysicianName", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances", "StudyInstanceUID", "RetrieveAETitle",
              "InstitutionName"],
    "SERIES": ["StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
               "SeriesDescription", "NumberOfSeriesRelatedInstances", "BodyPartExamined"],
    "IMAGE": ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
              "InstanceNumber", "Rows", "Columns", "NumberOfFrames"],
}


@pytest.fixture
def gateway(tmp_path: Path, database_url: str) -> Iterator[Gateway]:
    gateway = Gateway(qr_settings(tmp_path, database_url)).open()
    try:
        for seed, spec in enumerate(SPECS):
            load_study(gateway, spec, seed=seed)
        yield gateway
    finally:
        gateway.close()


def responses(gateway: Gateway, level: str) -> list[dict[str, Any]]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword in KEYS[level]:
        setattr(identifier, keyword, "")
    _level, datasets, _studies = search(gateway, identifier, "STUDY_ROOT", "TESTSCU")
    assert datasets, f"no {level} match: the comparison would prove nothing"
    return datasets


@pytest.mark.parametrize("level", ["STUDY", "SERIES", "IMAGE"])
@pytest.mark.parametrize("implicit_vr", [True, False])
@pytest.mark.parametrize("charset", [None, "ISO_IR 100", "ISO_IR 192"])
def test_same_bytes_as_pydicom(gateway: Gateway, level: str, implicit_vr: bool,
                               charset: str | None) -> None:
    encoded = 0
    for match in responses(gateway, level):
        if charset is not None:
            match["00080005"] = {"vr": "CS", "Value": [charset]}
        ours = encode_identifier(match, implicit_vr=implicit_vr)
        ds = as_dataset(match)
        if charset is None and not all(str(e.value).isascii() for e in ds):
            # The SCP names a character set whenever a value is not ASCII (dimse.services.find).
            assert ours is None
            continue
        assert ours is not None, f"fell back to pydicom for {ds}"
        assert ours == encode(ds, implicit_vr, True)
        encoded += 1
    assert encoded or charset is None


def test_what_it_cannot_encode_is_left_to_pydicom() -> None:
    name = {"vr": "PN", "Value": [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎"}]}
    code_extensions = {"00080005": {"vr": "CS", "Value": [None, "ISO 2022 IR 87"]},
                       "00100010": name}
    assert encode_identifier(code_extensions, implicit_vr=True) is None
    latin = {"00080005": {"vr": "CS", "Value": ["ISO_IR 100"]},
             "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Łukasz"}]}}  # not Latin-1
    assert encode_identifier(latin, implicit_vr=False) is None
    nested = {"00081115": {"vr": "SQ", "Value": [{}]}}
    assert encode_identifier(nested, implicit_vr=False) is None
    empty_sequence = {"00081115": {"vr": "SQ"}}
    assert encode_identifier(empty_sequence, implicit_vr=False) == \
        encode(as_dataset(empty_sequence), False, True)
