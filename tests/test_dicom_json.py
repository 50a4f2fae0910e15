"""gateway.dicom_json held to pydicom: the same DICOM JSON, index fields and verdicts, or none.

Each case is read both ways: by ``metadata.read_little_endian`` (gateway.dicom_json) and by
``metadata.read_with_pydicom`` (pydicom's ``Dataset.to_json_dict``, the reference). Where the
fast reader answers, its answer must be pydicom's; where it must not answer (``Unsupported``),
pydicom alone decides.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from gateway import dicom_json, metadata
from gateway.errors import InvalidInstance
from sample_dicom.generator import SeriesSpec, StudySpec, generate_study

FILES = Path(__file__).parent.parent / "sample_dicom" / "files"


def encode(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def both(data: bytes) -> tuple[metadata.ParsedInstance | None, metadata.ParsedInstance | None]:
    """(fast, pydicom); pydicom's is ``None`` when it refuses the instance."""
    fast = metadata.read_little_endian(data)
    try:
        reference = metadata.read_with_pydicom(data)
    except InvalidInstance:
        return fast, None
    return fast, reference


def assert_same(data: bytes, *, fast_expected: bool) -> None:
    fast, reference = both(data)
    if fast_expected:
        assert fast is not None, "the fast reader declined a data set it is meant to read"
    if fast is None:
        return
    assert reference is not None, "the fast reader accepted what pydicom refuses"
    assert fast.json_model == reference.json_model
    assert fast.metadata_json() == reference.metadata_json()
    # Written by orjson: the text the json module writes, for pydicom's values (DSfloat, IS,
    # UID, PersonName) as for the fast reader's.
    assert reference.metadata_json() == json_module_text(reference.json_model)
    assert fast.study_attributes_json() == reference.study_attributes_json()
    assert fast.series_attributes_json() == reference.series_attributes_json()
    assert fast.fields == reference.fields
    assert (fast.transfer_syntax_uid, fast.sop_class_uid, fast.sop_instance_uid,
            fast.study_instance_uid, fast.series_instance_uid, fast.size) == (
        reference.transfer_syntax_uid, reference.sop_class_uid, reference.sop_instance_uid,
        reference.study_instance_uid, reference.series_instance_uid, reference.size)


def json_module_text(model: dict[str, object]) -> str:
    return json.dumps(model, ensure_ascii=False, separators=(",", ":"))


def test_metadata_text_is_json_where_the_json_module_writes_none() -> None:
    # A float value may be NaN or infinite (FL, FD): the json module writes NaN, no JSON.
    # Other floats may be spelt otherwise (0.00001 for 1e-05) but read back as the same value.
    model = {"00189087": {"vr": "FD", "Value": [float("nan"), float("inf"), 1e16, 1e-05,
                                                1.5e-07, 0.1]}}
    text = metadata._dumps(model)
    assert json.loads(text) == {"00189087": {"vr": "FD", "Value": [None, None, 1e16, 1e-05,
                                                                   1.5e-07, 0.1]}}
    # A text orjson refuses (a lone surrogate) is written by the json module instead.
    odd = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "A\udc80"}]}}
    assert metadata._dumps(odd) == json_module_text(odd)


def image(**extra: object) -> Dataset:
    """A small CT image with one of each kind of value the fast reader converts."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate = "20240315"
    ds.StudyTime = "093000.123 "
    ds.AcquisitionDateTime = "20240315093000"
    ds.AccessionNumber = "ACC 1 "
    ds.Modality = "CT"
    ds.InstitutionName = "Centre Hospitalier Synthétique"
    ds.ReferringPhysicianName = "Schmit^Jérôme^^Dr."
    ds.StationAETitle = " CTSCAN1 "
    ds.PatientName = "Müller^Zoé"
    ds.PatientID = "LU0000001"
    ds.PatientBirthDate = "19780412"
    ds.PatientSex = "F"
    ds.PatientAge = "045Y"
    ds.OtherPatientIDsSequence = Sequence([Dataset(), Dataset()])
    ds.OtherPatientIDsSequence[0].PatientID = "X1"
    ds.OtherPatientIDsSequence[0].IssuerOfPatientID = "ELSEWHERE"
    ds.OtherPatientIDsSequence[1].PatientID = "X2"
    ds.PatientComments = "Première visite\\ligne avec barre  "
    ds.AdmittingDiagnosesDescription = ["Fièvre ", "Toux"]  # LO, several values
    ds.SliceThickness = "5.0"
    ds.KVP = " 120 "
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = " 3"
    ds.InstanceNumber = "12"
    ds.ImagePositionPatient = ["-115.0", "-115.5e0", ".25"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 4
    ds.Columns = 4
    ds.PixelSpacing = [0.5, 0.5]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = ["40", "400"]
    ds.WindowWidth = ["80", "1500"]
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.add_new(0x00181318, "DS", "")  # empty value
    ds.add_new(0x00209057, "UL", [1, 2, 3])  # DimensionIndexValues
    ds.add_new(0x00209165, "AT", [0x00209056, 0x00209057])  # DimensionIndexPointer
    ds.add_new(0x00189305, "FD", [1.5, -2.25])  # Revolution Time (several, for the case)
    ds.add_new(0x00189306, "FD", 0.625)  # Single Collimation Width
    ds.add_new(0x00189311, "FD", 1.0)  # Spiral Pitch Factor
    ds.add_new(0x00189324, "FD", 20.0)  # Estimated Dose Saving
    ds.add_new(0x00189345, "FD", 10.5)  # CTDIvol
    ds.add_new(0x00280106, "US", 0)  # Smallest Image Pixel Value
    ds.add_new(0x00181100, "DS", "250")  # Reconstruction Diameter
    ds.add_new(0x00183100, "UR", "https://example.org/protocol  ")
    ds.add_new(0x00200052, "UI", generate_uid() + "\x00")
    ds.add_new(0x00081140, "SQ", Sequence([image_ref(), image_ref()]))
    ds.add_new(0x00400275, "SQ", Sequence())  # empty sequence
    ds.add_new(0x00090010, "LO", "ACME")  # private creator; explicit VR private elements
    ds.add_new(0x00091011, "OB", b"\x01\x02\x03\x04")
    ds.add_new(0x00091012, "OB", b"\x00" * 2000)
    ds.add_new(0x00091013, "SL", [-5, 6])
    ds.add_new(0x00091014, "FL", [0.1, 2.5])
    ds.add_new(0x00091015, "SS", -3)
    ds.add_new(0x00091016, "OW", b"")
    ds.add_new(0x00091017, "ST", "short text ")
    ds.add_new(0x00091018, "UT", "unlimited\\text")
    ds.add_new(0x00091019, "UC", ["a", "b "])
    ds.add_new(0x0009101A, "OF", struct.pack("<2f", 1.0, 2.0))
    ds.add_new(0x0009101B, "SV", [-(2**40), 7])
    ds.add_new(0x0009101C, "UV", [2**40])
    ds.add_new(0x0009101D, "OD", struct.pack("<d", 3.5))
    ds.add_new(0x0009101E, "OL", struct.pack("<I", 9))
    ds.add_new(0x0009101F, "OV", struct.pack("<Q", 9))
    ds.add_new(0x00091020, "PN", ["Doe^John", "Roe^Jane "])
    ds.add_new(0x00091021, "LT", "  leading spaces kept")
    ds.add_new(0x00091022, "DT", ["20240315", "2024"])
    ds.add_new(0x00091023, "SQ", Sequence([nested_item(depth=3)]))
    ds.PixelData = bytes(range(32))
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def image_ref() -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = generate_uid()
    item.ReferencedFrameNumber = ["1", "2"]
    return item


def nested_item(depth: int) -> Dataset:
    item = Dataset()
    item.CodeValue = f"C{depth}"
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = "Niveau é"
    item.add_new(0x00091030, "OB", b"\x07" * (2000 if depth == 2 else 10))
    if depth:
        item.add_new(0x00091031, "SQ", Sequence([nested_item(depth - 1), Dataset()]))
    return item


def defined_lengths(ds: Dataset) -> Dataset:
    """Every sequence and item written with its length (pydicom writes undefined ones)."""
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = False
            for item in elem.value:
                item.is_undefined_length_sequence_item = False
    return ds


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian])
def test_every_kind_of_value_read_as_pydicom_reads_it(syntax: str) -> None:
    assert_same(encode(image(), syntax), fast_expected=True)


def test_sequences_and_items_of_defined_length() -> None:
    assert_same(encode(defined_lengths(image())), fast_expected=True)


def test_implicit_vr_little_endian_with_standard_tags() -> None:
    ds = image()
    for tag in [t for t in ds.keys() if t.is_private]:
        del ds[tag]
    assert_same(encode(ds, ImplicitVRLittleEndian), fast_expected=True)
    assert_same(encode(defined_lengths(ds), ImplicitVRLittleEndian), fast_expected=True)
    ds.PixelRepresentation = 1
    ds.add_new(0x00280106, "SS", -5)  # US or SS: signed beside Pixel Representation 1
    parsed = metadata.read_little_endian(encode(ds, ImplicitVRLittleEndian))
    assert parsed is not None and parsed.json_model["00280106"] == {"vr": "SS", "Value": [-5]}
    assert_same(encode(ds, ImplicitVRLittleEndian), fast_expected=True)


@pytest.mark.parametrize("charset, name", [
    (None, "Muller^Zoe"),
    ("ISO_IR 100", "Müller^Zoé"),
    ("ISO_IR 192", "Müller^Zoé^^Dr."),
    ("", "Weber^Luc"),
])
def test_character_sets_read_here(charset: str | None, name: str) -> None:
    ds = image(PatientName=name, StudyDescription="Schädel")
    del ds.SpecificCharacterSet
    if charset is not None:
        ds.SpecificCharacterSet = charset
    assert_same(encode(ds), fast_expected=True)


def test_generated_studies_and_key_objects() -> None:
    spec = StudySpec(series=(SeriesSpec(instances=2, rows=16, columns=16),
                             SeriesSpec(modality="MR", instances=2, rows=16, columns=16)),
                     key_object=True)
    for ds in generate_study(spec, seed=3):
        syntax = ds.file_meta.TransferSyntaxUID
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        assert_same(out.getvalue(), fast_expected=syntax != DeflatedExplicitVRLittleEndian)


@pytest.mark.parametrize("path", sorted(FILES.glob("*.dcm")), ids=lambda p: p.name)
def test_committed_files(path: Path) -> None:
    data = path.read_bytes()
    syntax = metadata.read_with_pydicom(data).transfer_syntax_uid
    assert_same(data, fast_expected=syntax != DeflatedExplicitVRLittleEndian)


def _written_as(tag: int, vr: str, value: str, wanted_vr: str) -> Callable[[Dataset], bytes]:
    """An element pydicom would not write: written with another VR, then its VR replaced."""
    def make(ds: Dataset) -> bytes:
        ds.add_new(tag, vr, value)
        header = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
        data = encode(ds)
        assert data.count(header) == 1
        return data.replace(header, header[:4] + wanted_vr.encode())

    return make


def _private_implicit(ds: Dataset) -> bytes:
    return encode(ds, ImplicitVRLittleEndian)


def _set(keyword_or_tag: str | int, vr: str, value: object) -> Callable[[Dataset], bytes]:
    def make(ds: Dataset) -> bytes:
        if isinstance(keyword_or_tag, int):
            ds.add_new(keyword_or_tag, vr, value)
        else:
            setattr(ds, keyword_or_tag, value)
        return encode(ds)

    return make


@pytest.mark.parametrize("make", [
    pytest.param(_private_implicit, id="private tags in implicit VR"),
    pytest.param(_set("SpecificCharacterSet", "CS", "ISO_IR 144"), id="another character set"),
    pytest.param(_set("SpecificCharacterSet", "CS", ["", "ISO 2022 IR 87"]),
                 id="code extensions"),
    pytest.param(_set("PatientName", "PN", "Yamada^Tarou=山田^太郎"), id="name groups"),
    pytest.param(_set(0x00091040, "UN", b"\x01\x02"), id="UN value"),
    pytest.param(_set("ImageType", "CS", ["ORIGINAL", "", "AXIAL"]), id="empty among several"),
    pytest.param(_written_as(0x00180050, "LO", "5,0", "DS"), id="DS pydicom keeps as text"),
    pytest.param(_set("InstanceNumber", "IS", "12.0"), id="IS with a decimal point"),
    pytest.param(_written_as(0x00091041, "SH", "abcdef", "UL"), id="UL of 6 bytes"),
    pytest.param(_written_as(0x00091041, "SH", "abcdef", "XY"), id="a VR no edition defines"),
    pytest.param(lambda ds: encode(ds, ExplicitVRBigEndian), id="big endian"),
    pytest.param(lambda ds: encode(ds, DeflatedExplicitVRLittleEndian), id="deflated"),
])
def test_what_only_pydicom_reads_is_left_to_it(make: Callable[[Dataset], bytes]) -> None:
    data = make(image())
    assert metadata.read_little_endian(data) is None
    assert_same(data, fast_expected=False)


def test_truncated_anywhere_never_accepted_where_pydicom_refuses() -> None:
    """Cut at every element boundary and inside values: same verdict as pydicom, or none."""
    data = encode(defined_lengths(image()))
    offsets = sorted({*range(0, len(data), 7), len(data) - 1, len(data) - 2})
    fast_answers = 0
    for end in offsets:
        fast, reference = both(data[:end])
        if fast is not None:
            fast_answers += 1
            assert reference is not None, f"accepted {end} bytes of {len(data)}"
            assert fast.json_model == reference.json_model
    assert fast_answers == 0  # an image cut anywhere lacks (part of) its pixel data


def test_truncated_pixel_data_refused() -> None:
    data = encode(image())
    with pytest.raises(InvalidInstance, match="pixel data is truncated|truncated"):
        metadata.parse_instance(data[:-4])


def test_encapsulated_pixel_data_must_end() -> None:
    data = (FILES / "ct_jpeg_lossless_sv1.dcm").read_bytes()
    assert metadata.read_little_endian(data) is not None
    assert metadata.read_little_endian(data[:-8]) is None  # sequence delimiter missing


def test_bulk_data_uris_carry_the_path_of_nested_values() -> None:
    parsed = metadata.read_little_endian(encode(image()))
    assert parsed is not None
    prefix = parsed.bulk_prefix()
    model = parsed.json_model
    assert model["7FE00010"] == {"vr": "OW", "BulkDataURI": prefix + "7FE00010"}
    assert model["00091012"]["BulkDataURI"] == prefix + "00091012"
    level2 = model["00091023"]["Value"][0]["00091031"]["Value"][0]
    assert level2["00091030"]["BulkDataURI"] == (
        prefix + "00091023/0/00091031/0/00091030")
    assert model["00091011"]["InlineBinary"] == "AQIDBA=="


def test_read_dataset_rejects_bytes_after_the_last_element() -> None:
    data = encode(image(SOPClassUID="1.2.840.10008.5.1.4.1.1.88.59"))
    meta, offset = dicom_json.read_file_meta(data)
    with pytest.raises(dicom_json.Unsupported):
        dicom_json.read_dataset(data + b"\x00\x00", offset, explicit=True)
