"""The presentation pipeline: known grey values at known pixels, colour, viewport, cache."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut

from gateway.pixels import PixelLimits, read_pixel_file
from gateway.render import (
    MEDIA_GIF,
    MEDIA_JPEG,
    MEDIA_PNG,
    InvalidParameter,
    RenderParams,
    Viewport,
    Window,
    apply_window,
    frame_to_display,
    parse_quality,
    parse_viewport,
    parse_window,
    render_frame,
    render_frames,
    thumbnail_params,
)
from gateway.rendercache import RenderCache, cache_key
from sample_dicom import FILES_DIR

# Hounsfield units and their grey value in a 40/80 linear window (PS3.3 C.11.2.1.2.1):
# y = ((x - 39.5) / 79 + 0.5) * 255, clipped to 0..255, rounded to the nearest integer.
KNOWN_HU = [-1000, 0, 1, 39, 40, 41, 78, 79, 80, 3000]
KNOWN_GREY_40_80 = [0, 0, 3, 126, 129, 132, 252, 255, 255, 255]


def decode_image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def ct_with_known_values(tmp_path: Path, **attributes: object) -> Path:
    """A 16x16 CT whose first row holds KNOWN_HU (stored = HU + 1024), the rest -1000 HU."""
    ds = dcmread(FILES_DIR / "ct_explicit_le.dcm")
    hu = np.full((16, 16), -1000, dtype=np.int32)
    hu[0, :len(KNOWN_HU)] = KNOWN_HU
    hu[5, 5] = 500
    ds.Rows = ds.Columns = 16
    ds.BitsStored, ds.HighBit = 12, 11
    ds.PixelData = np.clip(hu + 1024, 0, 4095).astype("<u2").tobytes()
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    path = tmp_path / "known.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_window_function_formula() -> None:
    grey = apply_window(np.array(KNOWN_HU, dtype=float), Window(40, 80))
    assert grey.tolist() == KNOWN_GREY_40_80
    exact = apply_window(np.array([0.0, 40.0, 80.0]), Window(40, 80, "LINEAR_EXACT"))
    assert exact.tolist() == [0.0, 128.0, 255.0]
    sigmoid = apply_window(np.array([40.0, -1000.0, 1000.0]), Window(40, 80, "SIGMOID"))
    assert sigmoid.tolist() == [128.0, 0.0, 255.0]


def test_ct_window_from_the_dataset_gives_known_grey_values(tmp_path: Path) -> None:
    pixel_file = read_pixel_file(ct_with_known_values(tmp_path))  # WindowCenter 40, Width 80
    assert float(pixel_file.header.WindowCenter) == 40
    display = frame_to_display(pixel_file, 0)
    assert display[0, :len(KNOWN_HU)].tolist() == KNOWN_GREY_40_80
    png = decode_image(render_frame(pixel_file, 0, RenderParams(media_type=MEDIA_PNG)))
    assert png[0, :len(KNOWN_HU)].tolist() == KNOWN_GREY_40_80
    jpeg = decode_image(render_frame(pixel_file, 0, RenderParams(quality=100)))
    assert np.abs(jpeg[0, :len(KNOWN_HU)].astype(int) - KNOWN_GREY_40_80).max() <= 12


def test_request_window_overrides_the_dataset(tmp_path: Path) -> None:
    pixel_file = read_pixel_file(ct_with_known_values(tmp_path, WindowCenter=300,
                                                      WindowWidth=2000))
    display = frame_to_display(pixel_file, 0, parse_window("40,80,linear"))
    assert display[0, :len(KNOWN_HU)].tolist() == KNOWN_GREY_40_80
    wide = frame_to_display(pixel_file, 0)
    # 300/2000: -1000 HU -> ((-1000 - 299.5) / 1999 + 0.5) * 255 = -38.3 -> 0; 500 HU -> 153
    assert wide[0, 0] == 0 and wide[5, 5] == 153


def test_rescale_slope_and_signed_pixels(tmp_path: Path) -> None:
    """RLE, signed 16-bit stored values, intercept 0: grey equals the formula on the values."""
    pixel_file = read_pixel_file(FILES_DIR / "ct_rle_lossless_signed.dcm")
    values = pixel_file.decode_frame(0)
    assert values.dtype == np.int16 and values.min() < 0
    display = frame_to_display(pixel_file, 0)
    expected = apply_window(values.astype(float) * float(pixel_file.header.RescaleSlope)
                            + float(pixel_file.header.RescaleIntercept), Window(40, 80))
    assert np.array_equal(display, expected.astype(np.uint8))
    path = ct_with_known_values(tmp_path, RescaleSlope=2, RescaleIntercept=-2048)
    display = frame_to_display(read_pixel_file(path), 0)
    # stored 1024 (0 HU written) -> 2 * 1024 - 2048 = 0 -> grey 0; stored 1064 -> 80 -> 255
    assert display[0, 1] == 0 and display[0, 4] == 255


def test_sample_ct_rendered_with_its_window() -> None:
    pixel_file = read_pixel_file(FILES_DIR / "ct_explicit_le.dcm")
    hu = pixel_file.decode_frame(0).astype(float) - 1024
    png = decode_image(render_frame(pixel_file, 0, RenderParams(media_type=MEDIA_PNG)))
    assert np.array_equal(png, apply_window(hu, Window(40, 80)).astype(np.uint8))
    for y, x in [(64, 64), (10, 10), (100, 40)]:
        assert png[y, x] == KNOWN_GREY_40_80[0] if hu[y, x] <= 0 else png[y, x] > 0


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    pixel_file = read_pixel_file(FILES_DIR / "cr_monochrome1.dcm")
    stored = pixel_file.decode_frame(0).astype(float)
    display = frame_to_display(pixel_file, 0)   # window 3000/2000 from the data set
    assert np.array_equal(display, 255 - apply_window(stored, Window(3000, 2000)))
    brightest = np.unravel_index(np.argmax(stored), stored.shape)
    darkest = np.unravel_index(np.argmin(stored), stored.shape)
    assert stored[brightest] >= 4000 and display[brightest] == 0     # high values are black
    assert stored[darkest] <= 2000 and display[darkest] == 255       # low values are white
    ds = dcmread(FILES_DIR / "cr_monochrome1.dcm")
    ds.PhotometricInterpretation = "MONOCHROME2"
    path = tmp_path / "mono2.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert np.array_equal(frame_to_display(read_pixel_file(path), 0), 255 - display)


def test_voi_lut_sequence_then_min_max(tmp_path: Path) -> None:
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.add_new("LUTData", "US", [255 - (v * 255 // 4095) for v in range(4096)])  # reversing
    path = ct_with_known_values(tmp_path, WindowCenter=None, WindowWidth=None,
                                VOILUTSequence=[item], RescaleIntercept=0)
    display = frame_to_display(read_pixel_file(path), 0)
    stored = np.array(KNOWN_HU) + 1024
    stored = np.clip(stored, 0, 4095)
    assert display[0, :len(KNOWN_HU)].tolist() == [255 - (v * 255 // 4095) for v in stored]
    plain = ct_with_known_values(tmp_path, WindowCenter=None, WindowWidth=None)
    display = frame_to_display(read_pixel_file(plain), 0)
    # no window: the frame's minimum (-1000 HU) is black and its maximum (3000 HU) white
    assert display[0, 0] == 0 and display[0, 9] == 255 and 0 < display[5, 5] < 255


def test_rgb_ybr_422_jpeg_renders_in_colour() -> None:
    pixel_file = read_pixel_file(FILES_DIR / "sc_jpeg_baseline_rgb.dcm")
    png = decode_image(render_frame(pixel_file, 0, RenderParams(media_type=MEDIA_PNG)))
    assert png.shape == (128, 128, 3)
    band = png[128 // 4 + 2: 128 // 3 - 2, 40:90].astype(int)
    assert np.abs(band - (220, 30, 30)).mean() < 8


@pytest.mark.parametrize("name", ["ExplVR_BigEnd.dcm", "SC_ybr_full_422_uncompressed.dcm",
                                  "SC_rgb_rle_16bit.dcm", "GDCMJ2K_TextGBR.dcm"])
def test_colour_planar_configuration_and_depth(name: str) -> None:
    path = Path(get_testdata_file(name))
    reference = dcmread(path).pixel_array  # RGB, colour-by-pixel
    if reference.dtype.itemsize > 1:
        reference = (reference >> 8).astype(np.uint8)
    png = decode_image(render_frame(read_pixel_file(path), 0,
                                    RenderParams(media_type=MEDIA_PNG)))
    assert np.array_equal(png, reference)


def test_palette_color() -> None:
    path = Path(get_testdata_file("examples_palette.dcm"))
    ds = dcmread(path)
    expected = apply_color_lut(ds.pixel_array, ds)
    expected = (expected >> 8).astype(np.uint8) if expected.dtype.itemsize > 1 else expected
    png = decode_image(render_frame(read_pixel_file(path), 0,
                                    RenderParams(media_type=MEDIA_PNG)))
    assert png.shape == expected.shape and np.array_equal(png, expected)
    assert len({tuple(p) for p in png.reshape(-1, 3)[::97]}) > 5  # really in colour


def test_multiframe_frame_and_animated_gif() -> None:
    pixel_file = read_pixel_file(FILES_DIR / "sc_multiframe_explicit_le.dcm")
    second = decode_image(render_frame(pixel_file, 1, RenderParams(media_type=MEDIA_PNG)))
    hu = pixel_file.decode_frame(1).astype(float) - 1024
    assert np.array_equal(second, apply_window(hu, Window(40, 80)).astype(np.uint8))
    gif = Image.open(io.BytesIO(render_frames(pixel_file, RenderParams(media_type=MEDIA_GIF))))
    assert gif.n_frames == 3
    gif.seek(1)
    assert np.array_equal(np.asarray(gif.convert("L")), second)
    with pytest.raises(Exception, match="exceeds 8192 pixels"):
        render_frames(pixel_file, RenderParams(media_type=MEDIA_GIF),
                      limits=PixelLimits(max_animation_pixels=8192))


def test_viewport_scales_crops_and_flips(tmp_path: Path) -> None:
    pixel_file = read_pixel_file(ct_with_known_values(tmp_path))
    png = decode_image(render_frame(pixel_file, 0, RenderParams(
        media_type=MEDIA_PNG, viewport=parse_viewport("4,3,0,0,4,1"))))
    # the first four pixels of row 0 (grey 0, 0, 3, 126), scaled to fit 4x3: 4x1 kept
    assert png.shape == (1, 4) and png[0].tolist() == KNOWN_GREY_40_80[:4]
    flipped = decode_image(render_frame(pixel_file, 0, RenderParams(
        media_type=MEDIA_PNG, viewport=parse_viewport("4,1,0,0,-4,1"))))
    assert flipped[0].tolist() == KNOWN_GREY_40_80[:4][::-1]
    rect = read_pixel_file(Path(get_testdata_file("JPEG2000.dcm")))  # 256 wide, 1024 high
    jpeg = decode_image(render_frame(rect, 0, RenderParams(viewport=Viewport(100, 100))))
    assert jpeg.shape == (100, 25)
    thumb = decode_image(render_frame(pixel_file, 0, thumbnail_params(None, None)))
    assert thumb.shape == (128, 128)


def test_quality_changes_the_jpeg() -> None:
    pixel_file = read_pixel_file(FILES_DIR / "ct_explicit_le.dcm")
    low = render_frame(pixel_file, 0, RenderParams(media_type=MEDIA_JPEG, quality=10))
    high = render_frame(pixel_file, 0, RenderParams(media_type=MEDIA_JPEG, quality=95))
    assert len(low) < len(high) / 2


@pytest.mark.parametrize(("parser", "text", "parameter"), [
    (parse_window, "40", "window"), (parse_window, "a,b", "window"),
    (parse_window, "40,0,linear", "window"), (parse_window, "40,80,cubic", "window"),
    (parse_viewport, "0,10", "viewport"), (parse_viewport, "10", "viewport"),
    (parse_viewport, "9999,10", "viewport"), (parse_viewport, "10,10,0,0,0,5", "viewport"),
    (parse_quality, "0", "quality"), (parse_quality, "high", "quality"),
])
def test_bad_parameters_name_themselves(parser: object, text: str, parameter: str) -> None:
    with pytest.raises(InvalidParameter, match=".") as info:
        parser(text)  # type: ignore[operator]
    assert info.value.parameter == parameter


def test_render_cache_is_bounded_lru_and_keyed_by_content(tmp_path: Path) -> None:
    cache = RenderCache(tmp_path / "cache", max_bytes=4000)
    keys = [cache_key("1.2.3", "ab" * 32, "image/jpeg", n) for n in range(5)]
    assert cache_key("1.2.3", "cd" * 32, "image/jpeg", 0) != keys[0]  # new content, new key
    for key in keys[:3]:
        cache.put(key, b"x" * 1000)
    assert cache.get(keys[0]) == b"x" * 1000          # keys[0] now most recently used
    cache.put(keys[3], b"y" * 1000)
    cache.put(keys[4], b"z" * 1000)                   # 5000 bytes > 4000: evict keys[1]
    assert cache.get(keys[1]) is None
    assert cache.get(keys[0]) is not None and cache.get(keys[4]) == b"z" * 1000
    assert cache.total <= 4000
    assert sum(f.stat().st_size for f in (tmp_path / "cache").iterdir()) == cache.total
    (tmp_path / "cache" / ".leftover.tmp").write_bytes(b"partial")
    reopened = RenderCache(tmp_path / "cache", max_bytes=2000)
    assert reopened.total <= 2000 and len(reopened) == 2
    assert not (tmp_path / "cache" / ".leftover.tmp").exists()
    assert len(os.listdir(tmp_path / "cache")) == 2
    disabled = RenderCache(tmp_path / "off", max_bytes=0)
    disabled.put(keys[0], b"x")
    assert disabled.get(keys[0]) is None and not (tmp_path / "off").exists()


def test_enhanced_multiframe_functional_groups(tmp_path: Path) -> None:
    """PS3.3 C.7.6.16: rescale in the shared groups, a window per frame in the per-frame ones."""
    ds = dcmread(FILES_DIR / "sc_multiframe_explicit_le.dcm")
    for keyword in ("RescaleIntercept", "RescaleSlope", "WindowCenter", "WindowWidth"):
        delattr(ds, keyword)
    transform = Dataset()
    transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = -1024, 1, "HU"
    shared = Dataset()
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for center, width in ((40, 80), (-600, 1500), (300, 2000)):
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = center, width
        item = Dataset()
        item.FrameVOILUTSequence = [voi]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)
    pixel_file = read_pixel_file(path)
    for index, (center, width) in enumerate(((40, 80), (-600, 1500), (300, 2000))):
        hu = pixel_file.decode_frame(index).astype(float) - 1024
        expected = apply_window(hu, Window(center, width)).astype(np.uint8)
        assert np.array_equal(frame_to_display(pixel_file, index), expected)


def test_unused_high_bits_do_not_change_the_rendering(tmp_path: Path) -> None:
    """Junk above Bits Stored (PS3.5 §8.1.1) is ignored by the rendering tables too."""
    clean = ct_with_known_values(tmp_path)
    ds = dcmread(clean)
    junk = np.frombuffer(ds.PixelData, "<u2") | 0xB000
    ds.PixelData = junk.astype("<u2").tobytes()
    dirty = tmp_path / "dirty.dcm"
    ds.save_as(dirty, enforce_file_format=True)
    expected = frame_to_display(read_pixel_file(clean), 0)
    assert expected[0, :len(KNOWN_HU)].tolist() == KNOWN_GREY_40_80
    assert np.array_equal(frame_to_display(read_pixel_file(dirty), 0), expected)
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(dirty, enforce_file_format=True)   # min/max window over the cleaned values
    display = frame_to_display(read_pixel_file(dirty), 0)
    assert display[0, 0] == 0 and display[0, 9] == 255
