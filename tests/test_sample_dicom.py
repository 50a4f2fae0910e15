"""Tests of the synthetic study generator and of the committed files in sample_dicom/files."""

from __future__ import annotations

import hashlib
import io
import json
import types
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    KeyObjectSelectionDocumentStorage,
    RLELossless,
)

from sample_dicom import (
    FILES_DIR,
    SeriesSpec,
    StudySpec,
    demo_study,
    generate_corpus,
    generate_study,
    write_study,
)
from sample_dicom.__main__ import main

MANIFEST: dict[str, dict] = json.loads((FILES_DIR / "MANIFEST.json").read_text())
REQUIRED_SYNTAXES = {
    "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.201",
}


def _roundtrip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return dcmread(buffer)


def _encoded(datasets: list[Dataset]) -> list[bytes]:
    out = []
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def test_written_study_is_byte_identical_twice(tmp_path: Path) -> None:
    first = write_study(tmp_path / "a")
    second = write_study(tmp_path / "b")
    assert [p.relative_to(tmp_path / "a") for p in first] == [
        p.relative_to(tmp_path / "b") for p in second]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second, strict=True))


def test_compressed_series_are_deterministic() -> None:
    series = tuple(SeriesSpec(instances=2, rows=32, columns=32, transfer_syntax=ts)
                   for ts in (RLELossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian))
    spec = StudySpec(series=series)
    assert _encoded(generate_study(spec, seed=3)) == _encoded(generate_study(spec, seed=3))
    decoded = _roundtrip(generate_study(spec, seed=3)[0])
    assert decoded.file_meta.TransferSyntaxUID == RLELossless
    assert decoded.pixel_array.shape == (32, 32)


def test_seed_changes_uids_not_attributes() -> None:
    a, b = demo_study()[0], generate_study(seed=1)[0]
    assert a.StudyInstanceUID != b.StudyInstanceUID
    assert a.PatientID == b.PatientID


def test_demo_study_tags_and_accents() -> None:
    study = demo_study()
    images = [_roundtrip(ds) for ds in study if ds.Modality == "CT"]
    ct = images[0]
    assert ct.SpecificCharacterSet == "ISO_IR 192"
    assert ct.PatientName == "Müller^Zoé"
    assert (ct.PatientName.family_name, ct.PatientName.given_name) == ("Müller", "Zoé")
    assert ct.SOPClassUID == CTImageStorage
    assert (ct.Rows, ct.Columns, ct.BitsAllocated, ct.BitsStored, ct.HighBit) == (
        256, 256, 16, 12, 11)
    assert (ct.RescaleIntercept, ct.RescaleSlope) == (-1024, 1)
    assert ct.PhotometricInterpretation == "MONOCHROME2"
    assert len({ds.StudyInstanceUID for ds in study}) == 1
    assert len({ds.SOPInstanceUID for ds in study}) == len(study)
    assert {ds.SeriesNumber for ds in study} == {1, 2, 3}
    first_series = [ds for ds in images if ds.SeriesNumber == 1]
    z = [float(ds.ImagePositionPatient[2]) for ds in first_series]
    assert z == sorted(z) and len(set(z)) == len(z)
    middle = first_series[len(first_series) // 2]
    hu = middle.pixel_array.astype(float) + float(middle.RescaleIntercept)
    assert hu[0, 0] < -900 and 0 < np.median(hu[96:160, 96:160]) < 100


def test_key_object_references_instances_of_the_study() -> None:
    study = demo_study()
    (kos,) = [_roundtrip(ds) for ds in study if ds.Modality == "KO"]
    images = {ds.SOPInstanceUID: ds for ds in study if ds.Modality != "KO"}
    assert kos.SOPClassUID == KeyObjectSelectionDocumentStorage
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113000"
    assert kos.ContentTemplateSequence[0].TemplateIdentifier == "2010"
    assert (kos.ValueType, kos.ContinuityOfContent) == ("CONTAINER", "SEPARATE")
    (evidence,) = kos.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == kos.StudyInstanceUID
    from_evidence = set()
    for series in evidence.ReferencedSeriesSequence:
        for ref in series.ReferencedSOPSequence:
            image = images[ref.ReferencedSOPInstanceUID]
            assert image.SeriesInstanceUID == series.SeriesInstanceUID
            assert image.SOPClassUID == ref.ReferencedSOPClassUID
            from_evidence.add(ref.ReferencedSOPInstanceUID)
    from_content = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                    for item in kos.ContentSequence if item.ValueType == "IMAGE"}
    assert from_content == from_evidence and len(from_content) == 2


def test_corpus_is_a_cheap_generator() -> None:
    corpus = generate_corpus(3, studies_per_patient=2, seed=7)
    assert isinstance(corpus, types.GeneratorType)
    studies = list(corpus)
    assert len(studies) == 6
    assert len({s[0].PatientID for s in studies}) == 3
    assert len({s[0].StudyInstanceUID for s in studies}) == 6
    assert {s[0].Modality for s in studies} == {"CT", "MR"}
    assert all(ds.Rows == 16 for s in studies for ds in s if "Rows" in ds)


def test_cli_writes_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "--patients", "2", "--seed", "5"]) == 0
    files = sorted(tmp_path.rglob("*.dcm"))
    assert len(files) == 2 * (2 + 1)  # two images and a KOS per study
    assert "wrote 6 files" in capsys.readouterr().out
    assert dcmread(files[0]).PatientID.startswith("LU05")


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_committed_file_decodes(name: str) -> None:
    expected = MANIFEST[name]
    ds = dcmread(FILES_DIR / name)
    assert ds.file_meta.TransferSyntaxUID == expected["transfer_syntax"]
    assert ds.PhotometricInterpretation == expected["photometric_interpretation"]
    arr = ds.pixel_array
    frames = expected["frames"]
    assert arr.shape[: 3 if frames > 1 else 2] == (
        (frames,) if frames > 1 else ()) + (expected["rows"], expected["columns"])
    if expected["lossless"]:
        digest = hashlib.sha256(arr.astype(arr.dtype.newbyteorder("<")).tobytes()).hexdigest()
        assert digest == expected["pixel_sha256"]


def test_committed_files_are_listed_small_and_cover_syntaxes() -> None:
    assert {p.name for p in FILES_DIR.glob("*.dcm")} == set(MANIFEST)
    assert all(p.stat().st_size < 1_000_000 for p in FILES_DIR.glob("*.dcm"))
    assert REQUIRED_SYNTAXES <= {entry["transfer_syntax"] for entry in MANIFEST.values()}
    photometric = {entry["photometric_interpretation"] for entry in MANIFEST.values()}
    assert "MONOCHROME1" in photometric
    assert any(entry["frames"] > 1 for entry in MANIFEST.values())
