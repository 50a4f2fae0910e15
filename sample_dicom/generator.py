"""Deterministic generator of synthetic DICOM studies: CT, MR and a Key Object Selection.

Every value derives from the study spec and ``seed``: no clock, no unseeded randomness,
so generating twice gives byte-identical files (for a given pydicom and numpy version).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom import Dataset, uid
from pydicom.dataset import FileMetaDataset

UTF8 = "ISO_IR 192"  # PS3.3 C.12.1.1.2, Specific Character Set for UTF-8
MANUFACTURER = "SampleDICOM"
INSTITUTION = "Centre Hospitalier Synthétique"
NATIVE_SYNTAXES = (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian,
                   uid.DeflatedExplicitVRLittleEndian)
SOP_CLASSES = {"CT": uid.CTImageStorage, "MR": uid.MRImageStorage}
# Tissue values: HU for CT, arbitrary T2-weighted intensity for MR, and the noise sigma.
TISSUES = {
    "CT": {"air": -1000, "bone": 1300, "grey": 40, "white": 28, "csf": 8, "lesion": 75,
           "noise": 4},
    "MR": {"air": 0, "bone": 60, "grey": 1100, "white": 800, "csf": 2600, "lesion": 1900,
           "noise": 15},
}
WINDOWS = {"CT": (40.0, 80.0), "MR": (1300.0, 2600.0)}  # (center, width)
OF_INTEREST = ("113000", "DCM", "Of Interest")  # PS3.16 CID 7010, KOS document title
KEY_OBJECT_DESCRIPTION = ("113012", "DCM", "Key Object Description")
NAMES = ("Müller^Zoé", "Schmit^Jérôme", "Weber^Anaïs", "Hoffmann^Léa", "Da Silva^João",
         "Kieffer^Chloé", "Wagner^Björn", "Lefèvre^Maëlle", "Łukasz^Ørsted", "Gonçalves^Inês")


@dataclass(frozen=True)
class SeriesSpec:
    """One image series: ``modality`` CT or MR, axial slices of ``rows`` x ``columns``."""

    modality: str = "CT"
    description: str = "Kopf nativ 5 mm"
    instances: int = 16
    rows: int = 256
    columns: int = 256
    transfer_syntax: str = uid.ExplicitVRLittleEndian
    body_part: str = "HEAD"
    slice_thickness: float = 5.0
    field_of_view: float = 230.0
    signed: bool = False
    window: tuple[float, float] | None = None
    key_images: int = 1


@dataclass(frozen=True)
class StudySpec:
    """Patient and study attributes, the image series, and whether to add a KOS document."""

    patient_id: str = "LU0000001"
    patient_name: str = "Müller^Zoé"
    patient_birth_date: str = "19780412"
    patient_sex: str = "F"
    study_date: str = "20240315"
    study_time: str = "093000"
    accession_number: str = "ACC24031501"
    referring_physician: str = "Schmit^Jérôme^^Dr."
    study_id: str = "1"
    description: str = "CT Schädel nativ"
    institution: str = INSTITUTION
    series: tuple[SeriesSpec, ...] = (
        SeriesSpec(),
        SeriesSpec(description="Kopf Knochen 5 mm", window=(500.0, 2000.0)),
    )
    key_object: bool = True


def deterministic_uid(*parts: object) -> uid.UID:
    """Return a ``2.25.`` UID from a name-based UUID of ``parts`` (PS3.5 B.2, RFC 4122 §4.3).

    ``pydicom.uid.generate_uid(prefix=None)`` ignores its entropy sources, hence uuid5.

    >>> deterministic_uid(0, "study")
    '2.25.66297273873807987927296476899288566191'
    """
    return uid.UID(f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '|'.join(map(str, parts))).int}")


def phantom(rows: int, columns: int, z: float, modality: str,
            rng: np.random.Generator) -> np.ndarray:
    """Return a head phantom slice (HU for CT, intensity for MR) as a float array.

    Parameters
    ----------
    rows, columns : int
        Slice size in pixels.
    z : float
        Position in the head from -1 (base) to 1 (vertex); the skull narrows away from 0.
    modality : str
        ``"CT"`` or ``"MR"``, selecting the tissue values in ``TISSUES``.
    rng : numpy.random.Generator
        Seeded generator for the noise.
    """
    t = TISSUES[modality]
    y, x = np.ogrid[-1 : 1 : rows * 1j, -1 : 1 : columns * 1j]
    r = float(np.sqrt(max(1.0 - z * z, 0.05)))

    def ellipse(cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0

    img = np.full((rows, columns), float(t["air"]))
    for name, (cx, cy, ax, ay) in (("bone", (0, 0, 0.80, 0.92)), ("grey", (0, 0, 0.72, 0.84)),
                                   ("white", (0, 0.02, 0.48, 0.58))):
        img[ellipse(cx, cy, ax * r, ay * r)] = t[name]
    if abs(z) < 0.5:
        for side in (-0.12, 0.12):
            img[ellipse(side, -0.05, 0.07 * r, 0.22 * r)] = t["csf"]
    img[ellipse(0.3 * np.cos(3 * z) * r, 0.3 * np.sin(3 * z) * r, 0.09, 0.09)] = t["lesion"]
    return img + rng.normal(0.0, t["noise"], img.shape)


def _stored_pixels(series: SeriesSpec, values: np.ndarray) -> tuple[np.ndarray, float]:
    """Return 12-bit stored values and the Rescale Intercept mapping them back to ``values``."""
    intercept = -1024.0 if series.modality == "CT" and not series.signed else 0.0
    low, high = (-2048, 2047) if series.signed else (0, 4095)
    stored = np.clip(np.rint(values - intercept), low, high)
    return stored.astype(np.int16 if series.signed else np.uint16), intercept


def _shifted(date: str, time: str, minutes: int) -> tuple[str, str]:
    moment = datetime.strptime(date + time, "%Y%m%d%H%M%S") + timedelta(minutes=minutes)
    return moment.strftime("%Y%m%d"), moment.strftime("%H%M%S")


def _common(spec: StudySpec, study_uid: str, sop_class: str, sop_uid: str) -> Dataset:
    """Return a dataset with the SOP Common, Patient, General Study and Equipment modules."""
    ds = Dataset()
    ds.SpecificCharacterSet = UTF8
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyDate, ds.StudyTime = spec.study_date, spec.study_time
    ds.AccessionNumber = spec.accession_number
    ds.Manufacturer, ds.InstitutionName = MANUFACTURER, spec.institution
    ds.ReferringPhysicianName = spec.referring_physician
    ds.StudyDescription = spec.description
    ds.PatientName, ds.PatientID = spec.patient_name, spec.patient_id
    ds.PatientBirthDate, ds.PatientSex = spec.patient_birth_date, spec.patient_sex
    ds.StudyInstanceUID, ds.StudyID = study_uid, spec.study_id
    return ds


def _with_file_meta(ds: Dataset, transfer_syntax: str) -> Dataset:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = uid.UID(transfer_syntax)
    return ds


def _geometry(ds: Dataset, series: SeriesSpec, index: int) -> None:
    """Set the Image Plane module (PS3.3 C.7.6.2): axial slices centred on the isocentre."""
    spacing = series.field_of_view / max(series.rows, series.columns)
    z_mm = (index - (series.instances - 1) / 2) * series.slice_thickness
    ds.ImagePositionPatient = [round(-spacing * series.columns / 2, 3),
                               round(-spacing * series.rows / 2, 3), z_mm]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation, ds.SliceThickness = z_mm, series.slice_thickness
    ds.PixelSpacing = [round(spacing, 6)] * 2


def _acquisition(ds: Dataset, series: SeriesSpec) -> None:
    """Set the modality-specific acquisition attributes of the CT or MR Image module."""
    if series.modality == "CT":
        ds.KVP, ds.ConvolutionKernel = 120, "H30s" if series.window is None else "H70h"
    else:
        ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "SE", "SK", "2D"
        ds.ScanOptions, ds.EchoTime, ds.RepetitionTime = "", 90, 4000
        ds.MagneticFieldStrength, ds.EchoTrainLength = 1.5, 16
    ds.RescaleType = "HU" if series.modality == "CT" else "US"
    ds.WindowCenter, ds.WindowWidth = series.window or WINDOWS[series.modality]


def _image(spec: StudySpec, series: SeriesSpec, number: int, index: int,
           uids: tuple[str, str, str]) -> Dataset:
    """Return one axial slice of ``series`` (PS3.3 A.3 CT Image / A.4 MR Image IOD)."""
    study_uid, series_uid, frame_uid = uids
    ds = _common(spec, study_uid, SOP_CLASSES[series.modality],
                 deterministic_uid(series_uid, index))
    ds.SeriesDate, ds.SeriesTime = _shifted(spec.study_date, spec.study_time, number)
    ds.ContentDate, ds.ContentTime = ds.SeriesDate, ds.SeriesTime
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = series.modality, series_uid, number
    ds.SeriesDescription, ds.BodyPartExamined = series.description, series.body_part
    ds.PatientPosition, ds.ManufacturerModelName = "HFS", f"Synthetic {series.modality}"
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
    ds.InstanceNumber, ds.AcquisitionNumber = index + 1, 1
    _geometry(ds, series, index)
    _acquisition(ds, series)
    z = 0.0 if series.instances == 1 else 1.6 * index / (series.instances - 1) - 0.8
    rng = np.random.default_rng([int(study_uid.removeprefix("2.25.")), number, index])
    values = phantom(series.rows, series.columns, z, series.modality, rng)
    stored, ds.RescaleIntercept = _stored_pixels(series, values)
    ds.RescaleSlope = 1
    set_pixels(ds, stored)
    _with_file_meta(ds, uid.ExplicitVRLittleEndian)
    if series.transfer_syntax not in NATIVE_SYNTAXES:
        ds.compress(series.transfer_syntax, stored, generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = uid.UID(series.transfer_syntax)
    return ds


def set_pixels(ds: Dataset, arr: np.ndarray, bits_stored: int = 12) -> None:
    """Set the Image Pixel module (PS3.3 C.7.6.3) for monochrome ``arr`` (frames, rows, cols)."""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape[-2:]
    ds.BitsAllocated, ds.BitsStored = arr.dtype.itemsize * 8, bits_stored
    ds.HighBit, ds.PixelRepresentation = bits_stored - 1, int(arr.dtype.kind == "i")
    if arr.ndim == 3:
        ds.NumberOfFrames = arr.shape[0]
    ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def _code(value: tuple[str, str, str]) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value
    return code


def _ref(ds: Dataset) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    return ref


def key_object(spec: StudySpec, images: list[Dataset], number: int, study_uid: str,
               title: tuple[str, str, str] = OF_INTEREST) -> Dataset:
    """Return a Key Object Selection document on ``images`` (PS3.3 A.35.4, TID 2010).

    The referenced instances are listed in CurrentRequestedProcedureEvidenceSequence
    (grouped by series) and as IMAGE content items of the root, whose title is ``title``
    (PS3.16 CID 7010: ``(113000, DCM) Of Interest`` by default; a manifest ``113030``, or an
    IHE IOCM rejection note such as ``113001`` "Rejected for Quality Reasons").
    """
    series_uid = deterministic_uid(study_uid, "series", number)
    ds = _common(spec, study_uid, uid.KeyObjectSelectionDocumentStorage,
                 deterministic_uid(series_uid, 0))
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "KO", series_uid, number
    ds.SeriesDescription, ds.ReferencedPerformedProcedureStepSequence = "Key images", []
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = _shifted(spec.study_date, spec.study_time, number)
    by_series: dict[str, list[Dataset]] = {}
    for image in images:
        by_series.setdefault(image.SeriesInstanceUID, []).append(image)
    evidence = Dataset()
    evidence.StudyInstanceUID, evidence.ReferencedSeriesSequence = study_uid, []
    for series_ref, members in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID, item.ReferencedSOPSequence = series_ref, [_ref(m) for m in members]
        evidence.ReferencedSeriesSequence.append(item)
    ds.CurrentRequestedProcedureEvidenceSequence = [evidence]
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = [_code(title)]
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "2010"
    ds.ContentTemplateSequence = [template]
    text = Dataset()
    text.RelationshipType, text.ValueType = "CONTAINS", "TEXT"
    text.ConceptNameCodeSequence = [_code(KEY_OBJECT_DESCRIPTION)]
    text.TextValue = "Images clés / Schlüsselbilder"
    ds.ContentSequence = [text]
    for image in images:
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "IMAGE"
        item.ReferencedSOPSequence = [_ref(image)]
        ds.ContentSequence.append(item)
    return _with_file_meta(ds, uid.ExplicitVRLittleEndian)


def _key_picks(count: int, total: int) -> list[int]:
    """Return ``count`` evenly spread indices in ``range(total)`` (the middle one for one)."""
    return sorted({(k + 1) * total // (count + 1) for k in range(min(count, total))})


def generate_study(spec: StudySpec | None = None, *, seed: int = 0) -> list[Dataset]:
    """Return the datasets of one study, file meta set, ready for ``dcmwrite``.

    Parameters
    ----------
    spec : StudySpec, optional
        The study to build; the default is the demo CT head study.
    seed : int
        Root of every UID, hence of the pixel noise too.

    Returns
    -------
    list of pydicom.Dataset
        Image instances by series, then the Key Object Selection document if requested.
    """
    spec = spec or StudySpec()
    study_uid = deterministic_uid(seed, spec.patient_id, spec.accession_number, "study")
    frame_uid = deterministic_uid(study_uid, "frame-of-reference")
    datasets: list[Dataset] = []
    keys: list[Dataset] = []
    for number, series in enumerate(spec.series, start=1):
        uids = (study_uid, deterministic_uid(study_uid, "series", number), frame_uid)
        images = [_image(spec, series, number, i, uids) for i in range(series.instances)]
        keys += [images[i] for i in _key_picks(series.key_images, series.instances)]
        datasets += images
    if spec.key_object and keys:
        datasets.append(key_object(spec, keys, len(spec.series) + 1, study_uid))
    return datasets


def corpus_spec(index: int, *, seed: int = 0, size: int = 16, instances: int = 2) -> StudySpec:
    """Return the spec of study ``index`` of a corpus: alternately CT head and MR brain."""
    rng = random.Random(f"{seed}:{index}")
    modality = "CT" if index % 2 == 0 else "MR"
    study_date = f"{rng.randint(2015, 2025)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    series = SeriesSpec(modality=modality, description="T2 axial" if modality == "MR" else
                        "Kopf nativ 5 mm", instances=instances, rows=size, columns=size)
    return StudySpec(
        patient_id=f"LU{seed:02d}{index:07d}",
        patient_name=NAMES[rng.randrange(len(NAMES))],
        patient_birth_date=f"{rng.randint(1930, 2014)}{rng.randint(1, 12):02d}"
                           f"{rng.randint(1, 28):02d}",
        patient_sex=rng.choice("FMO"),
        study_date=study_date,
        study_time=f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}00",
        accession_number=f"A{seed:02d}{index:08d}",
        study_id=str(index + 1),
        description="IRM cérébrale" if modality == "MR" else "CT Schädel nativ",
        series=(series,),
    )


def generate_corpus(n_patients: int, *, studies_per_patient: int = 1, size: int = 16,
                    instances: int = 2, seed: int = 0) -> Iterator[list[Dataset]]:
    """Yield ``n_patients * studies_per_patient`` studies, one list of datasets each.

    Studies of one patient share the patient attributes of its first study. With the default
    16 x 16 pixels this is cheap enough for index benchmarks of many thousand studies.
    """
    for patient in range(n_patients):
        first = corpus_spec(patient * studies_per_patient, seed=seed, size=size,
                            instances=instances)
        for k in range(studies_per_patient):
            spec = corpus_spec(patient * studies_per_patient + k, seed=seed, size=size,
                               instances=instances)
            yield generate_study(replace(spec, patient_id=first.patient_id,
                                         patient_name=first.patient_name,
                                         patient_birth_date=first.patient_birth_date,
                                         patient_sex=first.patient_sex), seed=seed)


def write_datasets(folder: Path, datasets: Iterable[Dataset]) -> list[Path]:
    """Write Part 10 files as ``folder/<StudyUID>/<SeriesNumber>/<InstanceNumber>.dcm``."""
    paths = []
    for ds in datasets:
        path = (Path(folder) / ds.StudyInstanceUID / f"{ds.SeriesNumber:03d}"
                / f"{ds.InstanceNumber:04d}.dcm")
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_study(folder: Path, spec: StudySpec | None = None, *, seed: int = 0) -> list[Path]:
    """Generate the study of ``spec`` and write it under ``folder``; return the file paths."""
    return write_datasets(folder, generate_study(spec, seed=seed))


def demo_study() -> list[Dataset]:
    """Return the sample study loaded by ``dicom-gateway demo`` (CT head, two series, KOS)."""
    return generate_study(StudySpec(), seed=0)


def write_demo_study(folder: Path) -> list[Path]:
    """Write :func:`demo_study` under ``folder``; return the file paths."""
    return write_datasets(folder, demo_study())
