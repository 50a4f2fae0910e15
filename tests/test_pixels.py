"""Frames as stored, decoded and transcoded, over the committed sample files and pydicom's own.

Reference values: the decoded-pixel sha256 of MANIFEST.json for the lossless sample files, the
construction of the lossy one (a red band on a greyscale CT), and arrays built in the test.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.pixels import get_decoder
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from gateway.pixels import (
    LIBJPEG_INSTALLED,
    ImageTooLarge,
    InvalidFrameList,
    NoSuchFrame,
    NotAcceptable,
    PixelDataError,
    PixelLimits,
    codestream_size,
    frames_of,
    parse_frame_list,
    read_pixel_file,
)
from sample_dicom import FILES_DIR

MANIFEST: dict[str, dict] = json.loads((FILES_DIR / "MANIFEST.json").read_text())
LOSSLESS = sorted(name for name, entry in MANIFEST.items() if entry["lossless"])


def sha256_le(arr: np.ndarray) -> str:
    return hashlib.sha256(arr.astype(arr.dtype.newbyteorder("<")).tobytes()).hexdigest()


def all_frames(path: Path) -> np.ndarray:
    pixel_file = read_pixel_file(path)
    frames = [pixel_file.decode_frame(i) for i in range(pixel_file.number_of_frames)]
    return np.stack(frames) if len(frames) > 1 else frames[0]


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_every_syntax_and_photometric_interpretation_is_committed() -> None:
    syntaxes = {entry["transfer_syntax"] for entry in MANIFEST.values()}
    assert len(syntaxes) >= 9
    assert {entry["photometric_interpretation"] for entry in MANIFEST.values()} == {
        "MONOCHROME1", "MONOCHROME2", "YBR_FULL_422"}


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_frames_decode_exactly(name: str) -> None:
    entry = MANIFEST[name]
    arr = all_frames(FILES_DIR / name)
    frames = entry["frames"]
    assert arr.shape == ((frames,) if frames > 1 else ()) + (entry["rows"], entry["columns"])
    assert arr.dtype.kind == ("i" if entry["pixel_representation"] else "u")
    assert sha256_le(arr) == entry["pixel_sha256"]


@pytest.mark.parametrize("name", LOSSLESS)
def test_native_frames_are_the_reference_pixels_little_endian(name: str) -> None:
    """``application/octet-stream`` frames (Explicit VR Little Endian) of every syntax."""
    entry = MANIFEST[name]
    pixel_file = read_pixel_file(FILES_DIR / name)
    joined = b"".join(frames_of(pixel_file, list(range(1, entry["frames"] + 1)),
                                ExplicitVRLittleEndian))
    assert hashlib.sha256(joined).hexdigest() == entry["pixel_sha256"]


@pytest.mark.parametrize("name", sorted(n for n, e in MANIFEST.items()
                                        if e["transfer_syntax"].startswith("1.2.840.10008.1.2.4")
                                        or e["transfer_syntax"] == "1.2.840.10008.1.2.5"))
def test_stored_frames_are_the_encapsulated_codestreams(name: str) -> None:
    """``transfer-syntax=*``: the codestream of the file, byte for byte, without decoding."""
    ds = dcmread(FILES_DIR / name)
    expected = list(generate_frames(ds.PixelData, number_of_frames=MANIFEST[name]["frames"]))
    pixel_file = read_pixel_file(FILES_DIR / name)
    assert pixel_file.output_syntax("*") == MANIFEST[name]["transfer_syntax"]
    assert frames_of(pixel_file, [1], "*") == expected[:1]


def test_lossy_jpeg_baseline_ybr_full_422_decodes_to_rgb_within_tolerance() -> None:
    """sc_jpeg_baseline_rgb: a greyscale CT with a (220, 30, 30) band, JPEG 4:2:2 quality 90."""
    arr = all_frames(FILES_DIR / "sc_jpeg_baseline_rgb.dcm")
    size = 128
    assert arr.shape == (size, size, 3) and arr.dtype == np.uint8
    band = arr[size // 4 + 2: size // 3 - 2, size // 4 + 4: size * 3 // 4 - 4].astype(int)
    assert np.abs(band - np.array([220, 30, 30])).mean() < 8
    grey = arr[size // 2:, :].astype(int)
    assert np.abs(grey[..., 0] - grey[..., 1]).mean() < 3
    assert grey.max() > 200 and grey.min() < 30  # the CT is really there, not a flat image


def test_lossy_jpeg_of_a_known_image_within_tolerance(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = np.zeros((64, 96, 3), np.uint8)
    rgb[:, :32] = (200, 40, 40)
    rgb[:, 32:64] = (40, 200, 40)
    rgb[:, 64:] = rng.integers(90, 110, (64, 32, 3))
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95, subsampling=0)
    ds = dcmread(FILES_DIR / "sc_jpeg_baseline_rgb.dcm")
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.PhotometricInterpretation = "YBR_FULL"
    ds.PixelData = encapsulate([buffer.getvalue()])
    arr = all_frames(save(ds, tmp_path / "jpeg.dcm"))
    assert arr.shape == rgb.shape
    assert np.abs(arr.astype(int) - rgb).mean() < 4
    assert np.abs(arr[8:56, 4:28].astype(int) - (200, 40, 40)).max() < 12


def test_multiframe_yields_the_right_frame() -> None:
    ds = dcmread(FILES_DIR / "sc_multiframe_explicit_le.dcm")
    reference = ds.pixel_array
    assert reference.shape[0] == 3 and not np.array_equal(reference[0], reference[1])
    pixel_file = read_pixel_file(FILES_DIR / "sc_multiframe_explicit_le.dcm")
    for number in (2, 3, 1):
        assert np.array_equal(pixel_file.decode_frame(number - 1), reference[number - 1])
        (native,) = frames_of(pixel_file, [number], ExplicitVRLittleEndian)
        assert native == reference[number - 1].astype("<u2").tobytes()
    with pytest.raises(NoSuchFrame, match="frame 4 does not exist"):
        frames_of(pixel_file, [4], "*")


def _multiframe_jpeg2000(tmp_path: Path) -> tuple[Dataset, np.ndarray, list[bytes]]:
    ds = dcmread(FILES_DIR / "sc_multiframe_explicit_le.dcm")
    reference = ds.pixel_array
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    frames = list(generate_frames(ds.PixelData, number_of_frames=3))
    return ds, reference, frames


@pytest.mark.parametrize("layout", ["basic_offset_table", "extended_offset_table",
                                    "one_fragment_per_frame", "fragmented_without_table"])
def test_encapsulated_multiframe_layouts(tmp_path: Path, layout: str) -> None:
    """PS3.5 §A.4: frames found through the BOT, the Extended Offset Table, or the fragments."""
    ds, reference, frames = _multiframe_jpeg2000(tmp_path)
    if layout == "basic_offset_table":
        ds.PixelData = encapsulate(frames, has_bot=True)
    elif layout == "extended_offset_table":
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = \
            encapsulate_extended(frames)
    elif layout == "one_fragment_per_frame":
        ds.PixelData = encapsulate(frames, has_bot=False)
    else:
        ds.PixelData = encapsulate(frames, fragments_per_frame=3, has_bot=False)
    path = save(ds, tmp_path / f"{layout}.dcm")
    pixel_file = read_pixel_file(path)
    if layout == "fragmented_without_table":
        assert sum(len(f) for f in pixel_file.fragments) == 9
    for index in (2, 0, 1):
        assert pixel_file.stored_frame(index) == frames[index]
        assert np.array_equal(pixel_file.decode_frame(index), reference[index])


def test_multiframe_rle_colour_from_pydicom() -> None:
    path = Path(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    reference = dcmread(path).pixel_array
    pixel_file = read_pixel_file(path)
    assert np.array_equal(pixel_file.decode_frame(1), reference[1])
    (native,) = frames_of(pixel_file, [2], ExplicitVRLittleEndian)
    assert native == reference[1].tobytes()  # RGB, colour-by-pixel


@pytest.mark.parametrize("name", [
    "SC_ybr_full_422_uncompressed.dcm",   # native YBR_FULL_422, sub-sampled
    "ExplVR_BigEnd.dcm",                   # big endian, RGB planar configuration 1
    "MR_small_bigendian.dcm",              # big endian, signed 16-bit
    "liver_expb_1frame.dcm",               # big endian, 1 bit allocated
    "examples_palette.dcm",                # PALETTE COLOR indices
    "SC_rgb_dcmtk_+eb+cy+np.dcm",          # JPEG baseline YBR_FULL_422
    "SC_rgb_rle_16bit.dcm",                # RLE, 16-bit RGB
    "JPGExtended.dcm",                     # JPEG extended, 12 bits
    "JPEGLSNearLossless_16.dcm",           # JPEG-LS near-lossless
    "693_J2KI.dcm",                        # JPEG 2000 (lossy), signed
    "GDCMJ2K_TextGBR.dcm",                 # JPEG 2000 YBR_RCT
    "rtdose.dcm",                          # 32-bit, 15 frames
])
def test_pydicom_examples_decode_like_pydicom(name: str) -> None:
    path = Path(get_testdata_file(name))
    if name == "JPGExtended.dcm" and not LIBJPEG_INSTALLED:
        # The default install has no 12-bit JPEG decoder: the refusal names the extra.
        with pytest.raises(PixelDataError, match=r"12-bit samples.*GPL-3\.0.*'libjpeg-gpl'"):
            all_frames(path)
        return
    reference = dcmread(path).pixel_array
    arr = all_frames(path)
    assert arr.shape == reference.shape
    assert np.array_equal(arr, reference)


def test_transcoding_to_rle_and_jpeg2000_is_lossless() -> None:
    path = FILES_DIR / "ct_rle_lossless_signed.dcm"
    pixel_file = read_pixel_file(path)
    reference = pixel_file.decode_frame(0)
    options = pixel_file.image.decode_options()
    for syntax in (RLELossless, JPEG2000Lossless):
        assert pixel_file.can_produce(syntax)
        (frame,) = frames_of(pixel_file, [1], syntax)
        arr, _ = get_decoder(syntax).as_array(encapsulate([frame]),
                                              **{**options, "transfer_syntax_uid": syntax})
        assert np.array_equal(arr, reference)


def test_a_syntax_that_cannot_be_produced_is_not_acceptable() -> None:
    pixel_file = read_pixel_file(FILES_DIR / "ct_explicit_le.dcm")
    assert not pixel_file.can_produce(JPEGBaseline8Bit)
    with pytest.raises(NotAcceptable, match="cannot be returned as JPEG Baseline"):
        frames_of(pixel_file, [1], JPEGBaseline8Bit)


def test_codestream_bigger_than_the_header_is_refused(tmp_path: Path) -> None:
    """A J2K codestream claiming 50000x50000 in a 128x128 instance: a decompression bomb."""
    ds = dcmread(FILES_DIR / "ct_jpeg2000_lossless.dcm")
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    at = frame.index(b"\xff\x51")
    siz = bytearray(frame)
    siz[at + 6:at + 14] = struct.pack(">II", 50000, 50000)
    ds.PixelData = encapsulate([bytes(siz)])
    pixel_file = read_pixel_file(save(ds, tmp_path / "bomb.dcm"))
    assert codestream_size(bytes(siz)) == (50000, 50000)
    with pytest.raises(ImageTooLarge, match="declares 50000x50000 pixels"):
        pixel_file.decode_frame(0)
    # as stored, it is only bytes: no decoding, no risk
    assert pixel_file.frame_in(0, "*") == bytes(siz)


def test_absurd_dimensions_are_refused_before_decoding(tmp_path: Path) -> None:
    ds = dcmread(FILES_DIR / "ct_jpeg2000_lossless.dcm")
    ds.Rows = ds.Columns = 65535
    pixel_file = read_pixel_file(save(ds, tmp_path / "huge.dcm"))
    with pytest.raises(ImageTooLarge, match="exceeds the limit"):
        pixel_file.decode_frame(0)
    small = PixelLimits(max_frame_pixels=100 * 100)
    normal = read_pixel_file(FILES_DIR / "ct_jpeg2000_lossless.dcm")
    with pytest.raises(ImageTooLarge, match="128x128 pixels exceeds the limit of 10000"):
        normal.decode_frame(0, limits=small)
    many = PixelLimits(max_total_pixels=128 * 128 * 2)
    multiframe = read_pixel_file(FILES_DIR / "sc_multiframe_explicit_le.dcm")
    frames_of(multiframe, [1, 2, 3], ExplicitVRLittleEndian, limits=many)  # native: no decode
    with pytest.raises(ImageTooLarge, match="a frame of 8192 bytes exceeds"):
        frames_of(multiframe, [1], "*", limits=PixelLimits(max_frame_bytes=8000))
    with pytest.raises(ImageTooLarge, match="per request"):
        frames_of(normal, [1, 1, 1], ExplicitVRLittleEndian, limits=many)


def test_truncated_and_pixelless_files_are_clear_errors(tmp_path: Path) -> None:
    data = (FILES_DIR / "ct_explicit_le.dcm").read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[:-1000])
    with pytest.raises(PixelDataError, match="fewer than the 32768"):
        read_pixel_file(truncated)
    ds = dcmread(FILES_DIR / "ct_explicit_le.dcm")
    del ds.PixelData
    with pytest.raises(PixelDataError, match="no pixel data"):
        read_pixel_file(save(ds, tmp_path / "nopixels.dcm"))
    broken = dcmread(FILES_DIR / "ct_jpeg2000_lossless.dcm")
    broken.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])
    pixel_file = read_pixel_file(save(broken, tmp_path / "broken.dcm"))
    with pytest.raises(PixelDataError, match="cannot be decoded"):
        pixel_file.decode_frame(0)


def test_video_is_refused_clearly(tmp_path: Path) -> None:
    ds = dcmread(FILES_DIR / "sc_jpeg_baseline_rgb.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"  # MPEG-4 AVC/H.264
    ds.NumberOfFrames = 2
    with pytest.raises(PixelDataError, match="is a video"):
        read_pixel_file(save(ds, tmp_path / "video.dcm"))


def test_limits_from_the_settings_file() -> None:
    from gateway.config import SettingsError

    limits = PixelLimits.from_settings({"max_viewport": 64, "cache_bytes": 1},
                                       also=("cache_bytes",))
    assert limits.max_viewport == 64 and limits.max_frame_pixels == PixelLimits().max_frame_pixels
    with pytest.raises(SettingsError, match="unknown setting \\[pixels\\] max_pixels"):
        PixelLimits.from_settings({"max_pixels": 1})
    with pytest.raises(SettingsError, match="not a positive integer"):
        PixelLimits.from_settings({"max_viewport": "big"})


def test_parse_frame_list() -> None:
    assert parse_frame_list("3, 1,2") == [3, 1, 2]
    for bad in ("0", "1,,2", "a", "-1", "1.5", "\u00b2", ""):
        with pytest.raises(InvalidFrameList, match="is not a frame number"):
            parse_frame_list(bad)
    with pytest.raises(NoSuchFrame, match="frame 5 does not exist"):
        parse_frame_list("1,5", number_of_frames=3)


@pytest.mark.parametrize("name", ["gateway.pixels", "gateway.render", "gateway.rendercache"])
def test_docstring_examples(name: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_native_unused_high_bits_are_ignored(tmp_path: Path) -> None:
    """PS3.5 §8.1.1: bits above Bits Stored carry nothing; signed values are sign-extended."""
    ds = dcmread(FILES_DIR / "ct_explicit_le.dcm")
    ds.Rows = ds.Columns = 2
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 1
    # 12-bit two's complement: 0xFFF = -1, 0x800 = -2048, 0x7FF = 2047, 0x001 = 1, with junk
    # (0xA000) in the four unused bits of each value
    ds.PixelData = np.array([0xAFFF, 0xA800, 0xA7FF, 0xA001], "<u2").tobytes()
    path = save(ds, tmp_path / "junk.dcm")
    assert read_pixel_file(path).decode_frame(0).tolist() == [[-1, -2048], [2047, 1]]
    ds.PixelRepresentation = 0
    path = save(ds, tmp_path / "junk_unsigned.dcm")
    assert read_pixel_file(path).decode_frame(0).tolist() == [[0xFFF, 0x800], [0x7FF, 0x001]]


def test_bit_packed_frames_that_do_not_end_on_a_byte(tmp_path: Path) -> None:
    """Bits Allocated 1, 3x3 frames: frame 2 starts at bit 9 (PS3.5 §8.1.1, §D.1)."""
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 2, (3, 3, 3), dtype=np.uint8)
    ds = dcmread(FILES_DIR / "sc_multiframe_explicit_le.dcm")
    ds.Rows = ds.Columns = 3
    ds.NumberOfFrames = 3
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelData = np.packbits(frames.ravel(), bitorder="little").tobytes()
    pixel_file = read_pixel_file(save(ds, tmp_path / "bits.dcm"))
    for index in range(3):
        assert np.array_equal(pixel_file.decode_frame(index), frames[index])
        (native,) = frames_of(pixel_file, [index + 1], ExplicitVRLittleEndian)
        unpacked = np.unpackbits(np.frombuffer(native, np.uint8), bitorder="little")[:9]
        assert np.array_equal(unpacked.reshape(3, 3), frames[index])
