"""A stored instance re-sent in another transfer syntax is a duplicate, not a conflict.

:mod:`gateway.equivalence` held to pydicom (decoded values and pixel arrays), then the ingest's
answers over real associations (pynetdicom, dcmtk) and real HTTP (STOW-RS, QIDO-RS, WADO-RS),
on SQLite and PostgreSQL: pydicom's ``MR_small`` test files (one SOP instance in six
encodings) all succeed and index one instance; a JPEG baseline copy of a lossless instance is
a duplicate that keeps the lossless one; other content is refused and the original kept.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)
from pynetdicom import AE
from sqlalchemy import func, select

from dimse.status import DUPLICATE_SOP_INSTANCE, SUCCESS
from gateway.core import Gateway
from gateway.equivalence import MIN_PSNR_DB, Relation, compare_files
from gateway.metadata import dataset_offset
from gateway.metrics import METRICS
from gateway.models import Instance
from tests.support.common import (
    LiveServer,
    make_settings,
    only_ready_spool_files,
    part10,
    stored_relpaths,
)
from tests.support.dicomweb_helpers import api_key, multipart_body, parse_multipart, raw

# One MR SOP instance in six encodings (pydicom's test files), the first the reference.
MR_ENCODINGS = ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"]
# The same SC instance decompressed (Implicit VR) and as JPEG baseline, Lossy Image Compression
# 01 (its data set in implicit VR, against its transfer syntax: written again by sc_pair).
SC_LOSSLESS, SC_JPEG = "SC_rgb_jpeg_dcmd.dcm", "SC_rgb_jpeg.dcm"
MR_SOP_INSTANCE = "1.3.6.1.4.1.5962.1.1.4.1.1.20040826185059.5457"
EQUIVALENT = "gateway_instances_equivalent_total"
ROOT = "1.2.826.0.1.3680043.8.498.66"
needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None,
                                 reason="dcmtk is not installed (make test installs it)")


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path)


def data_set_bytes(data: bytes) -> bytes:
    return data[dataset_offset(data):]


def write(ds: Dataset, path: Path, syntax: str | None = None) -> Path:
    """``ds`` as a Part 10 file, in ``syntax`` if given (a native one)."""
    if syntax is not None:
        ds = copy.deepcopy(ds)
        ds.file_meta.TransferSyntaxUID = syntax
    path.write_bytes(part10(ds))
    return path


def eight_bit_mr() -> Dataset:
    """A lossless 8-bit instance (JPEG baseline's depth): MR_small's pixels scaled to 0-255."""
    ds = dcmread(pydicom_file("MR_small.dcm"))
    pixels = ds.pixel_array.astype(np.float64)
    scaled = np.round((pixels - pixels.min()) * 255 / np.ptp(pixels)).astype(np.uint8)
    uid = f"{ROOT}.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{ROOT}.1", f"{ROOT}.1.1"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        if keyword in ds:
            del ds[keyword]
    ds.PixelData = scaled.tobytes()
    ds["PixelData"].VR = "OB"
    return ds


def jpeg_baseline(ds: Dataset, pixels: np.ndarray | None = None, quality: int = 90) -> Dataset:
    """A JPEG baseline (lossy) copy of an 8-bit grayscale instance, encoded by Pillow, with
    Lossy Image Compression 01 (PS3.3 C.7.6.1.1.5)."""
    from PIL import Image

    out = copy.deepcopy(ds)
    image = ds.pixel_array if pixels is None else pixels
    stream = io.BytesIO()
    Image.fromarray(image).save(stream, "JPEG", quality=quality)
    out.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    out.PixelData = encapsulate([stream.getvalue()])
    out["PixelData"].VR = "OB"
    out.LossyImageCompression = "01"
    out.LossyImageCompressionRatio = round(image.nbytes / len(stream.getvalue()), 2)
    out.LossyImageCompressionMethod = "ISO_10918_1"
    return out


def sc_pair(folder: Path) -> tuple[Path, Path]:
    """pydicom's SC instance, lossless and JPEG baseline, as files a PACS would send."""
    folder.mkdir(exist_ok=True)
    lossy = dcmread(pydicom_file(SC_JPEG))
    for _ in lossy.iterall():  # each element read, its VR from the dictionary (implicit VR)
        pass
    return pydicom_file(SC_LOSSLESS), write(lossy, folder / "sc_jpeg.dcm")


def rle_with_a_changed_pixel(name: str = "MR_small.dcm") -> Dataset:
    ds = dcmread(pydicom_file(name))
    pixels = ds.pixel_array.copy()
    pixels[10, 10] += 1
    ds.compress(RLELossless, pixels, generate_instance_uid=False)
    return ds


# -- the comparison, held to pydicom ----------------------------------------------------------

@pytest.mark.parametrize("name", MR_ENCODINGS[1:])
def test_mr_small_encodings_are_the_same_content(name: str) -> None:
    reference, other = dcmread(pydicom_file(MR_ENCODINGS[0])), dcmread(pydicom_file(name))
    # pydicom, the oracle: the same decoded values and pixels.
    assert np.array_equal(reference.pixel_array, other.pixel_array)
    assert all(reference[tag].value == other[tag].value for tag in other.keys()
               if tag != 0x7FE00010)
    comparison = compare_files(pydicom_file(MR_ENCODINGS[0]), pydicom_file(name))
    assert comparison.relation is Relation.SAME, comparison.detail
    back = compare_files(pydicom_file(name), pydicom_file(MR_ENCODINGS[0]))
    assert back.relation is Relation.SAME


def test_changed_pixels_or_attributes_differ(tmp_path: Path) -> None:
    stored = pydicom_file("MR_small.dcm")
    changed_pixel = write(rle_with_a_changed_pixel(), tmp_path / "pixel.dcm")
    comparison = compare_files(stored, changed_pixel)
    assert comparison.relation is Relation.DIFFERENT
    assert comparison.detail == "the pixel values of frame 1 differ"

    renamed = dcmread(stored)
    renamed.PatientName = "Someone^Else"
    renamed.ImageComments = "another comment"
    path = write(renamed, tmp_path / "renamed.dcm", ImplicitVRLittleEndian)
    comparison = compare_files(stored, path)
    assert comparison.relation is Relation.DIFFERENT
    # Named by keyword, never by value (a patient's name must not reach an error comment).
    assert comparison.detail == "attributes differ: PatientName, ImageComments"

    inverted = dcmread(stored)
    inverted.PhotometricInterpretation = "MONOCHROME1"
    comparison = compare_files(stored, write(inverted, tmp_path / "inverted.dcm"))
    assert comparison.detail == "attributes differ: PhotometricInterpretation"


def test_copies_that_cannot_be_compared_differ(tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.dcm"
    damaged.write_bytes(b"\0" * 4096)  # a file a power failure left empty, once
    comparison = compare_files(damaged, pydicom_file("MR_small_RLE.dcm"))
    assert comparison.relation is Relation.DIFFERENT
    assert comparison.detail.startswith("the copies cannot be compared (")
    with pytest.raises(FileNotFoundError):
        compare_files(tmp_path / "deleted.dcm", pydicom_file("MR_small_RLE.dcm"))


def test_character_sets_private_tags_and_padding_are_encoding(tmp_path: Path) -> None:
    """Latin-1 and UTF-8 spell the same name; an unknown private element read back from
    implicit VR is UN bytes (pydicom cannot know its VR) and is the same value."""
    ds = dcmread(pydicom_file("MR_small.dcm"))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Zoé"
    block = ds.private_block(0x0011, "GATEWAY TEST", create=True)
    block.add_new(0x01, "LO", "a private value")
    latin1 = write(ds, tmp_path / "latin1.dcm")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Zoé"  # encoded again (pydicom keeps the bytes it was given)
    ds.DataSetTrailingPadding = b"\x00" * 16
    utf8 = write(ds, tmp_path / "utf8.dcm", ImplicitVRLittleEndian)
    assert latin1.read_bytes().count("Müller".encode("latin-1")) == 1
    assert utf8.read_bytes().count("Müller".encode()) == 1
    assert dcmread(utf8)[0x00111001].VR == "UN"  # as pydicom reads it
    assert compare_files(latin1, utf8).relation is Relation.SAME

    ds.PatientName = "Muller^Zoe"
    assert compare_files(latin1, write(ds, tmp_path / "other.dcm")).detail == (
        "attributes differ: PatientName")


def test_colour_in_two_interpretations_is_the_same(tmp_path: Path) -> None:
    ds = dcmread(pydicom_file("SC_rgb_rle.dcm"))
    rgb = ds.pixel_array
    ds.decompress()
    as_rgb = write(ds, tmp_path / "rgb.dcm")
    ds.PixelData = convert_color_space(rgb, "RGB", "YBR_FULL").tobytes()
    ds.PhotometricInterpretation = "YBR_FULL"
    assert compare_files(as_rgb, write(ds, tmp_path / "ybr.dcm")).relation is Relation.SAME


def test_lossy_copies(tmp_path: Path) -> None:
    lossless_ds = eight_bit_mr()
    lossless = write(lossless_ds, tmp_path / "lossless.dcm")
    lossy_ds = jpeg_baseline(lossless_ds)
    lossy = write(lossy_ds, tmp_path / "lossy.dcm")
    comparison = compare_files(lossless, lossy)
    assert comparison.relation is Relation.RECEIVED_LOSSY
    # pydicom's decoded arrays, the oracle of the signal-to-noise ratio.
    reference = lossless_ds.pixel_array.astype(np.float64)
    error = np.mean(np.square(reference - dcmread(lossy).pixel_array))
    assert comparison.psnr_db == pytest.approx(10 * np.log10(np.ptp(reference) ** 2 / error))
    assert comparison.psnr_db is not None and comparison.psnr_db > MIN_PSNR_DB
    assert compare_files(lossy, lossless).relation is Relation.STORED_LOSSY
    assert compare_files(lossy, lossy).relation is Relation.SAME

    flipped = jpeg_baseline(lossless_ds, lossless_ds.pixel_array[::-1].copy())
    comparison = compare_files(lossless, write(flipped, tmp_path / "flipped.dcm"))
    assert comparison.relation is Relation.DIFFERENT
    assert comparison.detail.startswith("the images differ (peak signal-to-noise ratio")

    # pydicom's own pair: an instance and its JPEG baseline copy, one SOP Instance UID.
    comparison = compare_files(pydicom_file(SC_LOSSLESS), pydicom_file(SC_JPEG))
    assert comparison.relation is Relation.RECEIVED_LOSSY
    assert compare_files(*sc_pair(tmp_path)).relation is Relation.RECEIVED_LOSSY


# -- over the wire -----------------------------------------------------------------------------

def instance_count(gateway: Gateway) -> int:
    with gateway.index.Session() as session:
        return session.scalar(select(func.count()).select_from(Instance)) or 0


def stored_files(gateway: Gateway) -> list[str]:
    return stored_relpaths(gateway)


def stored_bytes(gateway: Gateway, sop_instance_uid: str) -> bytes:
    row = gateway.index.find_instance(sop_instance_uid)
    assert row is not None
    return data_set_bytes(gateway.storage.path(row.file_path).read_bytes())


def assert_only(gateway: Gateway, kept: Path | bytes) -> None:
    """One instance indexed, one file stored: ``kept``'s data set, and no spool file left."""
    data = kept.read_bytes() if isinstance(kept, Path) else kept
    sop = str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
    assert instance_count(gateway) == 1
    assert stored_bytes(gateway, sop) == data_set_bytes(data)
    assert len(stored_files(gateway)) == 1
    gateway.storage.sync()
    if gateway.storage.local:
        assert only_ready_spool_files(gateway.storage.root / ".incoming")  # type: ignore[attr-defined]


def store_files(port: int, paths: list[Path], ae_title: str = "DICOMGW") -> list[int]:
    """C-STORE each file in its own transfer syntax over one association (pynetdicom)."""
    ae = AE(ae_title="PACS")
    for path in paths:
        meta = dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(meta.SOPClassUID, [meta.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(path).Status) for path in paths]
    finally:
        assoc.release()


@pytest.mark.parametrize("first", ["MR_small.dcm", "MR_small_RLE.dcm"])
def test_six_encodings_over_c_store(live: LiveServer, first: str,
                                    caplog: pytest.LogCaptureFixture) -> None:
    paths = [pydicom_file(first)] + [pydicom_file(n) for n in MR_ENCODINGS if n != first]
    equivalent = METRICS.get(EQUIVALENT)
    with caplog.at_level(logging.INFO, logger="gateway.ingest"):
        assert store_files(live.dimse_port, paths) == [SUCCESS] * 6
    assert_only(live.gateway, paths[0])
    assert METRICS.get(EQUIVALENT) - equivalent == 5
    kept = [r.getMessage() for r in caplog.records if "another encoding" in r.getMessage()]
    assert len(kept) == 5
    assert all("the same content; the stored copy kept" in message for message in kept)


@needs_dcmtk
def test_six_encodings_with_storescu(live: LiveServer) -> None:
    propose = {"MR_small.dcm": "-xe", "MR_small_implicit.dcm": "-xi",
               "MR_small_bigendian.dcm": "-xb", "MR_small_jpeg_ls_lossless.dcm": "-xt",
               "MR_small_jp2klossless.dcm": "-xv", "MR_small_RLE.dcm": "-xr"}
    for name in MR_ENCODINGS:
        result = subprocess.run(
            ["storescu", "-aec", live.ae_title, propose[name], "127.0.0.1",
             str(live.dimse_port), str(pydicom_file(name))],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "Failed" not in result.stderr and "Warning" not in result.stderr, result.stderr
    # The first copy is kept (storescu sends it without its trailing padding).
    row = live.gateway.index.find_instance(MR_SOP_INSTANCE)
    assert row is not None and row.transfer_syntax_uid == ExplicitVRLittleEndian
    assert instance_count(live.gateway) == 1 and len(stored_files(live.gateway)) == 1


def test_six_encodings_at_once(live: LiveServer) -> None:
    """Six associations send the six encodings together: whichever is stored first, the
    others are duplicates of it (a concurrent insert of the UID is judged as a re-send)."""
    barrier = threading.Barrier(len(MR_ENCODINGS))
    statuses: dict[str, list[int]] = {}

    def send(name: str) -> None:
        barrier.wait()
        statuses[name] = store_files(live.dimse_port, [pydicom_file(name)])

    threads = [threading.Thread(target=send, args=(name,)) for name in MR_ENCODINGS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert statuses == {name: [SUCCESS] for name in MR_ENCODINGS}
    (kept,) = stored_files(live.gateway)
    assert data_set_bytes(live.gateway.storage.path(kept).read_bytes()) in [
        data_set_bytes(pydicom_file(name).read_bytes()) for name in MR_ENCODINGS]
    assert instance_count(live.gateway) == 1


@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_lossy_resend_keeps_the_lossless_copy(tmp_path: Path, database_url: str,
                                              overwrite: str) -> None:
    lossless_ds = eight_bit_mr()
    lossless = write(lossless_ds, tmp_path / "lossless.dcm")
    lossy = write(jpeg_baseline(lossless_ds), tmp_path / "lossy.dcm")
    settings = make_settings(tmp_path, database_url, GATEWAY_STORAGE_OVERWRITE=overwrite)
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        assert store_files(live.dimse_port, [lossless, lossy]) == [SUCCESS, SUCCESS]
        assert_only(gateway, lossless)
        # A lossy copy of other content never replaces the lossless one either.
        other = jpeg_baseline(lossless_ds, lossless_ds.pixel_array[::-1].copy())
        assert store_files(live.dimse_port, [write(other, tmp_path / "other.dcm")]) == [
            DUPLICATE_SOP_INSTANCE]
        assert_only(gateway, lossless)


def test_pydicom_jpeg_copy_keeps_the_lossless_one(live: LiveServer, tmp_path: Path) -> None:
    sc_lossless, sc_jpeg = sc_pair(tmp_path)
    assert store_files(live.dimse_port, [sc_lossless, sc_jpeg]) == [SUCCESS, SUCCESS]
    assert_only(live.gateway, sc_lossless)


@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_lossless_resend_of_a_stored_lossy_copy(tmp_path: Path, database_url: str,
                                                overwrite: str) -> None:
    """Kept as stored by default; replaced by the lossless copy with ``[storage] overwrite``."""
    settings = make_settings(tmp_path, database_url, GATEWAY_STORAGE_OVERWRITE=overwrite)
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        sc_lossless, sc_jpeg = sc_pair(tmp_path / "sc")
        assert store_files(live.dimse_port, [sc_jpeg, sc_lossless]) == [SUCCESS, SUCCESS]
        assert_only(gateway, sc_lossless if overwrite == "true" else sc_jpeg)


def test_other_content_is_refused_and_the_original_kept(live: LiveServer, tmp_path: Path) -> None:
    original = pydicom_file("MR_small.dcm")
    renamed = dcmread(original)
    renamed.ImageComments = "another comment"
    refused = [write(rle_with_a_changed_pixel(), tmp_path / "pixel.dcm"),
               write(renamed, tmp_path / "renamed.dcm", ImplicitVRLittleEndian)]
    conflicts = METRICS.get("gateway_instances_conflict_total")
    assert store_files(live.dimse_port, [original, *refused]) == [
        SUCCESS, DUPLICATE_SOP_INSTANCE, DUPLICATE_SOP_INSTANCE]
    assert METRICS.get("gateway_instances_conflict_total") - conflicts == 2
    assert_only(live.gateway, original)


def test_other_content_is_replaced_with_overwrite(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url, GATEWAY_STORAGE_OVERWRITE="true")
    changed = write(rle_with_a_changed_pixel(), tmp_path / "pixel.dcm")
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        original = pydicom_file("MR_small.dcm")
        assert store_files(live.dimse_port, [original, changed]) == [SUCCESS] * 2
        assert_only(gateway, changed)
        # The original again, in another encoding: it differs from what is stored now.
        assert store_files(live.dimse_port, [pydicom_file("MR_small_implicit.dcm")]) == [SUCCESS]
        assert_only(gateway, pydicom_file("MR_small_implicit.dcm"))


# -- STOW-RS, QIDO-RS, WADO-RS ----------------------------------------------------------------

def stow(live: LiveServer, token: str, instances: list[bytes]) -> tuple[int, Dataset]:
    reply = raw(live.http_url + "/dicomweb/studies", method="POST",
                body=multipart_body([("application/dicom", data) for data in instances]),
                headers={"Authorization": f"Bearer {token}",
                         "Content-Type": 'multipart/related; type="application/dicom"; '
                                         "boundary=XyZzYboundary"})
    return reply.status, Dataset.from_json(json.loads(reply.body))


def retrieved(live: LiveServer, token: str, ds: Dataset) -> bytes:
    """The data set WADO-RS returns as stored (``transfer-syntax=*``)."""
    reply = raw(f"{live.http_url}/dicomweb/studies/{ds.StudyInstanceUID}/series/"
                f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}",
                headers={"Authorization": f"Bearer {token}",
                         "Accept": 'multipart/related; type="application/dicom"; '
                                   "transfer-syntax=*"})
    assert reply.status == 200
    (_, body), = parse_multipart(reply.body, reply.headers["Content-Type"])
    return data_set_bytes(body)


def found(live: LiveServer, token: str, ds: Dataset) -> list[str]:
    """The SOP Instance UIDs QIDO-RS finds in the instance's study."""
    reply = raw(f"{live.http_url}/dicomweb/studies/{ds.StudyInstanceUID}/instances",
                headers={"Authorization": f"Bearer {token}", "Accept": "application/dicom+json"})
    assert reply.status == 200
    return [match["00080018"]["Value"][0] for match in json.loads(reply.body)]


def test_six_encodings_over_stow(live: LiveServer) -> None:
    token = api_key(live.gateway, "pacs", "dicomweb:read,dicomweb:write")
    files = [pydicom_file(name).read_bytes() for name in MR_ENCODINGS]
    ds = dcmread(pydicom_file(MR_ENCODINGS[0]), stop_before_pixels=True)
    status, answer = stow(live, token, files[:1])
    assert status == 200
    status, answer = stow(live, token, files[1:])
    assert status == 200, answer
    assert "FailedSOPSequence" not in answer
    assert [item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence] == [
        ds.SOPInstanceUID] * 5
    assert found(live, token, ds) == [ds.SOPInstanceUID]
    assert retrieved(live, token, ds) == data_set_bytes(files[0])
    assert_only(live.gateway, files[0])


def test_lossy_and_other_content_over_stow(live: LiveServer) -> None:
    token = api_key(live.gateway, "pacs", "dicomweb:read,dicomweb:write")
    lossless_ds = eight_bit_mr()
    lossless = part10(lossless_ds)
    assert stow(live, token, [lossless])[0] == 200
    status, answer = stow(live, token, [part10(jpeg_baseline(lossless_ds))])
    assert status == 200 and "FailedSOPSequence" not in answer
    assert retrieved(live, token, lossless_ds) == data_set_bytes(lossless)

    other = jpeg_baseline(lossless_ds, lossless_ds.pixel_array[::-1].copy())
    status, answer = stow(live, token, [part10(other)])
    assert status == 409
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in answer.FailedSOPSequence] == [
        (lossless_ds.SOPInstanceUID, DUPLICATE_SOP_INSTANCE)]
    assert found(live, token, lossless_ds) == [lossless_ds.SOPInstanceUID]
    assert retrieved(live, token, lossless_ds) == data_set_bytes(lossless)
    assert_only(live.gateway, lossless)
