"""Regenerate ``sample_dicom/files/*.dcm`` and ``files/MANIFEST.json``: ``python -m
sample_dicom.make_compressed``.

One small file per transfer syntax, plus a MONOCHROME1 and a multi-frame file, all in one
study. Encoders, needed only to regenerate (reading the files needs only pydicom and the
pylibjpeg plugins): pydicom's own RLE encoder, pylibjpeg-openjpeg (JPEG 2000), Pillow (JPEG
Baseline), ``pyjpegls`` (JPEG-LS, through ``Dataset.compress``) and ``imagecodecs`` (JPEG
Lossless SV1 with libjpeg-turbo, HTJ2K with OpenJPH): ``pip install pyjpegls imagecodecs``.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset, dcmread, uid
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array
from pydicom.tag import Tag

from sample_dicom.generator import SeriesSpec, StudySpec, generate_study, set_pixels

FILES = Path(__file__).parent / "files"
SIZE = 128
PLANE_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "SliceLocation",
              "FrameOfReferenceUID", "PositionReferenceIndicator", "KVP", "ConvolutionKernel",
              "RescaleType", "AcquisitionNumber")
Transform = Callable[[Dataset], np.ndarray]


def pixel_sha256(arr: np.ndarray) -> str:
    """Return the sha256 of ``arr``'s little-endian bytes, as listed in MANIFEST.json."""
    return hashlib.sha256(arr.astype(arr.dtype.newbyteorder("<")).tobytes()).hexdigest()


def _native(ds: Dataset) -> np.ndarray:
    return ds.pixel_array


def _recast(ds: Dataset, sop_class: str, modality: str) -> None:
    """Turn a generated CT slice into another SOP class, dropping CT-only attributes."""
    for keyword in PLANE_TAGS:
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = uid.UID(sop_class)
    ds.Modality = modality
    if modality == "OT":
        ds.ConversionType = "WSD"  # PS3.3 C.8.6.1 SC Equipment: workstation


def _jpeg_lossless(ds: Dataset) -> np.ndarray:
    import imagecodecs

    arr = ds.pixel_array
    frame = imagecodecs.jpeg8_encode(arr, lossless=True, predictor=1, bitspersample=12)
    ds.PixelData = encapsulate([bytes(frame)])
    ds.file_meta.TransferSyntaxUID = uid.JPEGLosslessSV1
    return arr


def _htj2k(ds: Dataset) -> np.ndarray:
    import imagecodecs

    arr = ds.pixel_array
    ds.PixelData = encapsulate([bytes(imagecodecs.htj2k_encode(arr, reversible=True))])
    ds.BitsStored, ds.HighBit = 16, 15  # OpenJPH writes a 16-bit precision codestream
    ds.file_meta.TransferSyntaxUID = uid.HTJ2KLossless
    return arr


def _jpeg_baseline_rgb(ds: Dataset) -> np.ndarray:
    """Secondary capture: the CT slice in a brain window with a red region, Pillow JPEG."""
    hu = ds.pixel_array + float(ds.RescaleIntercept)
    grey = np.clip(hu / 80.0 * 255.0, 0, 255).astype(np.uint8)
    rgb = np.stack([grey, grey, grey], axis=-1)
    rgb[SIZE // 4 : SIZE // 3, SIZE // 4 : SIZE * 3 // 4] = (220, 30, 30)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90, subsampling=1)  # 4:2:2
    _recast(ds, uid.SecondaryCaptureImageStorage, "OT")
    for keyword in ("RescaleIntercept", "RescaleSlope", "WindowCenter", "WindowWidth"):
        delattr(ds, keyword)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.LossyImageCompressionRatio = round(rgb.nbytes / len(buffer.getvalue()), 2)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    return rgb


def _monochrome1(ds: Dataset) -> np.ndarray:
    """Computed radiography with MONOCHROME1 (minimum value displayed white)."""
    arr = (4095 - ds.pixel_array).astype(np.uint16)
    _recast(ds, uid.ComputedRadiographyImageStorage, "CR")
    ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 0, 3000, 2000
    set_pixels(ds, arr)
    ds.PhotometricInterpretation = "MONOCHROME1"
    return arr


def _multiframe(study: list[Dataset]) -> tuple[Dataset, np.ndarray]:
    """Multi-frame Grayscale Word Secondary Capture (PS3.3 A.8.4) of three slices."""
    ds = study[0]
    locations = [float(s.SliceLocation) for s in study]
    arr = np.stack([s.pixel_array for s in study])
    _recast(ds, uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage, "OT")
    ds.FrameIncrementPointer, ds.SliceLocationVector = Tag("SliceLocationVector"), locations
    set_pixels(ds, arr)
    return ds, arr


# name -> (series spec, transform of the native dataset returning the reference pixels)
SAMPLES: dict[str, tuple[SeriesSpec, Transform]] = {
    "ct_explicit_le.dcm": (SeriesSpec(transfer_syntax=uid.ExplicitVRLittleEndian), _native),
    "ct_implicit_le.dcm": (SeriesSpec(transfer_syntax=uid.ImplicitVRLittleEndian), _native),
    "ct_deflated_le.dcm": (SeriesSpec(transfer_syntax=uid.DeflatedExplicitVRLittleEndian), _native),
    "ct_rle_lossless_signed.dcm": (
        SeriesSpec(transfer_syntax=uid.RLELossless, signed=True), _native),
    "ct_jpegls_lossless.dcm": (SeriesSpec(transfer_syntax=uid.JPEGLSLossless), _native),
    "ct_jpeg2000_lossless.dcm": (SeriesSpec(transfer_syntax=uid.JPEG2000Lossless), _native),
    "ct_jpeg_lossless_sv1.dcm": (SeriesSpec(), _jpeg_lossless),
    "ct_htj2k_lossless.dcm": (SeriesSpec(), _htj2k),
    "sc_jpeg_baseline_rgb.dcm": (SeriesSpec(), _jpeg_baseline_rgb),
    "cr_monochrome1.dcm": (SeriesSpec(), _monochrome1),
}
MULTIFRAME = "sc_multiframe_explicit_le.dcm"


def _study_spec() -> StudySpec:
    series = [replace(spec, rows=SIZE, columns=SIZE, instances=1, description=name[:-4])
              for name, (spec, _) in SAMPLES.items()]
    series.append(SeriesSpec(rows=64, columns=64, instances=3, description=MULTIFRAME[:-4]))
    return StudySpec(patient_id="LU0000099", patient_name="Lëtzebuerger^Amélie",
                     accession_number="ACC24031599", description="Transfer syntax samples",
                     series=tuple(series), key_object=False)


def _entry(ds: Dataset, reference: np.ndarray) -> dict[str, object]:
    lossless = ds.file_meta.TransferSyntaxUID != uid.JPEGBaseline8Bit
    entry: dict[str, object] = {
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
        "transfer_syntax_name": uid.UID(ds.file_meta.TransferSyntaxUID).name,
        "sop_class": str(ds.SOPClassUID),
        "photometric_interpretation": str(ds.PhotometricInterpretation),
        "frames": int(ds.get("NumberOfFrames", 1)),
        "rows": int(ds.Rows), "columns": int(ds.Columns),
        "pixel_representation": int(ds.PixelRepresentation), "lossless": lossless,
    }
    if lossless:
        entry["pixel_sha256"] = pixel_sha256(reference)
    return entry


def _verify(path: Path, reference: np.ndarray, lossless: bool) -> None:
    """Decode ``path`` with the pylibjpeg plugins and compare to ``reference``."""
    ds = dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        decoded = pixel_array(path, decoding_plugin="pylibjpeg")
    else:  # pixel_array(path) cannot inflate a deflated data set
        decoded = ds.pixel_array
    if lossless:
        assert decoded.dtype == reference.dtype and np.array_equal(decoded, reference), path
    else:
        error = np.abs(decoded.astype(float) - reference).mean()
        assert decoded.shape == reference.shape and error < 8, (path, error)


def main() -> None:
    """Write every sample file and MANIFEST.json, then check each one decodes."""
    FILES.mkdir(exist_ok=True)
    study = generate_study(_study_spec(), seed=0)
    manifest = {}
    written = []
    for (name, (_, transform)), ds in zip(SAMPLES.items(), study, strict=False):
        written.append((name, ds, transform(ds)))
    written.append((MULTIFRAME, *_multiframe(study[len(SAMPLES):])))
    for name, ds, reference in written:
        ds.save_as(FILES / name, enforce_file_format=True)
        manifest[name] = _entry(ds, reference)
        _verify(FILES / name, reference, bool(manifest[name]["lossless"]))
        print(f"{name}: {(FILES / name).stat().st_size} bytes, {manifest[name]['transfer_syntax']}")
    (FILES / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
