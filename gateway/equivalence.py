"""Whether a re-sent instance holds the stored one's content in another encoding.

PACS re-send studies compressed (migrations, prefetches, a second route): the same SOP Instance
in JPEG-LS, JPEG 2000 or RLE, in implicit VR or big endian. A transfer syntax is an encoding,
not content (PS3.5 §10, Annex A), so such a re-send is a duplicate of the stored instance, not
a conflict, though its bytes (and so its digest) differ. :func:`compare_files` tells, from
decoded values, never bytes:

1. The attributes, read by pydicom: text decoded with each data set's own Specific Character
   Set, padding stripped, numbers as numbers, big endian OW/OF/OL/OD/OV values swapped to
   little endian, a UN value (implicit VR, unknown private tag) read with the other copy's VR.
   Left out: what an encoding changes (:data:`ENCODING_ONLY`: group lengths, the Specific
   Character Set's spelling, Planar Configuration, the Lossy Image Compression attributes of
   PS3.3 C.7.6.1.1.5, the pixel data and its offset tables, trailing padding); the file meta
   information (group 0002) is not in the data set. Photometric Interpretation takes the colour
   ones (RGB, YBR_*) as one, since JPEG and JPEG 2000 carry RGB as YBR (PS3.5 §8.2).
2. The pixel data, only if the attributes are the same, frame by frame, decoded by
   :mod:`gateway.pixels` (colour as RGB, the decompression-bomb checks included):

   - both copies lossless, one Photometric Interpretation: equal values;
   - both lossless, colour in two interpretations (RGB and YBR_FULL): values within
     :data:`COLOUR_ROUNDING` (the rounding of the PS3.3 C.7.6.3.1.2 conversion);
   - a lossy copy: a peak signal-to-noise ratio of at least :data:`MIN_PSNR_DB`, the peak
     being the value range of the lossless copy (of the stored one if both are lossy), over
     all frames.

A copy is lossy when its Lossy Image Compression (0028,2110) is ``01`` (PS3.3 C.7.6.1.1.5)
or its transfer syntax compresses with loss (:data:`LOSSY_SYNTAXES`). What the ingest does with
each answer, and ``[storage] overwrite``, is in :mod:`gateway.ingest` and
docs/conformance-storage.md.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRBigEndian
from pydicom.values import convert_value

from gateway.errors import GatewayError
from gateway.pixels import read_pixel_file

# Elements a re-encoding may change without changing the content (tags at the data set's top
# level; group lengths and Specific Character Set at every level).
SPECIFIC_CHARACTER_SET = 0x00080005
PHOTOMETRIC_INTERPRETATION = 0x00280004
PIXEL_DATA = 0x7FE00010
ENCODING_ONLY = frozenset({
    SPECIFIC_CHARACTER_SET,  # values are compared decoded
    0x00280006,  # Planar Configuration: decoded frames are colour-by-pixel
    0x00282110,  # Lossy Image Compression       (PS3.3 C.7.6.1.1.5)
    0x00282112,  # Lossy Image Compression Ratio
    0x00282114,  # Lossy Image Compression Method
    0x7FE00001,  # Extended Offset Table          (PS3.5 §A.4)
    0x7FE00002,  # Extended Offset Table Lengths
    PIXEL_DATA,  # compared decoded, step 2
    0xFFFCFFFC,  # Data Set Trailing Padding      (PS3.10 §7.2)
})
COLOUR_INTERPRETATIONS = frozenset({
    "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT",
})
# Transfer syntaxes that compress with loss (PS3.5 Table A-1): JPEG baseline and extended
# (and the retired lossy JPEG processes), JPEG-LS near-lossless, JPEG XL JPEG recompression,
# MPEG-2, MPEG-4 and HEVC video. JPEG 2000, HTJ2K and JPEG XL may be either: their Lossy
# Image Compression tells.
LOSSY_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
    *(f"1.2.840.10008.1.2.4.{n}" for n in (52, 53, 54, 55, 56, 59, 60, 61, 62, 63, 64)),
    "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.111",
    *(f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)),
})
LOSSY = "01"  # Lossy Image Compression (0028,2110): "00" not, "01" lossy compressed
# A lossy copy is the same image as the other copy from this peak signal-to-noise ratio on:
# a root-mean-square error of at most ~3 % of the image's value range. Diagnostic lossy
# compression stays above it (pydicom's MR_small as JPEG 2000 at 10:1: ~37 dB; scaled to 8
# bits, as JPEG baseline at quality 75: ~36 dB, at 90: ~40 dB), another image falls well
# below it (the same MR shifted by one pixel: ~24 dB; a 4x20-pixel label burned in: ~18 dB).
# Colour JPEG with chroma subsampling on synthetic saturated colour bars (pydicom's
# SC_rgb_rle) measured ~28 dB even at quality 95: such a copy is refused, as before.
MIN_PSNR_DB = 30.0
COLOUR_ROUNDING = 2  # largest error of an 8-bit RGB -> YBR_FULL -> RGB round trip
# Values swapped to little endian when read from a big endian data set: VR -> bytes per word.
_WORD_SIZES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_BYTES_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_SHOWN_DIFFERENCES = 3  # attributes named in a comparison's detail


class Relation(enum.Enum):
    """How a received copy relates to the stored copy of an instance."""

    SAME = "same"  # the same content (lossless both, or lossy both and close)
    RECEIVED_LOSSY = "received lossy"  # a lossy copy of the stored lossless instance
    STORED_LOSSY = "stored lossy"  # a lossless copy of the stored lossy instance
    DIFFERENT = "different"


@dataclass(frozen=True)
class Comparison:
    """The outcome of :func:`compare_files`.

    ``detail`` says what differs, for logs and error comments: attribute keywords and the
    pixels' signal-to-noise ratio, never values (they may be a patient's).
    """

    relation: Relation
    stored_lossy: bool
    received_lossy: bool
    detail: str = ""
    psnr_db: float | None = None  # when the pixel data were compared with a tolerance


def is_lossy(ds: Dataset, transfer_syntax_uid: str) -> bool:
    """Whether a copy was compressed with loss (PS3.3 C.7.6.1.1.5, PS3.5 Table A-1).

    >>> is_lossy(Dataset(), "1.2.840.10008.1.2.4.50")
    True
    >>> ds = Dataset(); ds.LossyImageCompression = "01"
    >>> is_lossy(ds, "1.2.840.10008.1.2.4.90")
    True
    >>> is_lossy(Dataset(), "1.2.840.10008.1.2.4.90")
    False
    """
    return (str(ds.get("LossyImageCompression", "")).strip() == LOSSY
            or transfer_syntax_uid in LOSSY_SYNTAXES)


def compare_files(stored: Path, received: Path) -> Comparison:
    """Compare two Part 10 files holding the same SOP Instance UID (the module docstring
    says how).

    Parameters
    ----------
    stored, received
        The stored copy and the one just received (both on disk: large values are read from
        the files as they are compared, frame by frame for the pixel data).

    Returns
    -------
    Comparison
        :attr:`Relation.DIFFERENT` too when the copies cannot be compared (a stored file
        damaged since, a value pydicom cannot read): what was done before copies were compared.

    Raises
    ------
    FileNotFoundError
        ``stored`` is gone (deleted meanwhile): the caller looks at the index again.
    """
    try:
        return _compare_files(stored, received)
    except FileNotFoundError:
        raise
    except Exception as exc:  # pydicom's errors on damaged or malformed data are of any kind
        return Comparison(Relation.DIFFERENT, False, False,
                          f"the copies cannot be compared ({type(exc).__name__})")


def _compare_files(stored: Path, received: Path) -> Comparison:
    a = dcmread(stored, defer_size="1 MB")
    b = dcmread(received, defer_size="1 MB")
    a_syntax = str(a.file_meta.get("TransferSyntaxUID", ""))
    b_syntax = str(b.file_meta.get("TransferSyntaxUID", ""))
    stored_lossy, received_lossy = is_lossy(a, a_syntax), is_lossy(b, b_syntax)

    def answer(relation: Relation, detail: str = "", psnr: float | None = None) -> Comparison:
        return Comparison(relation, stored_lossy, received_lossy, detail, psnr)

    differences = list(_differences(a, b, a_syntax == ExplicitVRBigEndian,
                                    b_syntax == ExplicitVRBigEndian,
                                    top=True))
    if differences:
        shown = ", ".join(differences[:_SHOWN_DIFFERENCES])
        more = len(differences) - _SHOWN_DIFFERENCES
        return answer(Relation.DIFFERENT, f"attributes differ: {shown}"
                      + (f" and {more} more" if more > 0 else ""))
    if (PIXEL_DATA in a) != (PIXEL_DATA in b):
        return answer(Relation.DIFFERENT, "one copy has pixel data, the other none")
    psnr: float | None = None
    if PIXEL_DATA in a:
        try:
            same, detail, psnr = _compare_pixels(stored, received, a, b, stored_lossy,
                                                 received_lossy)
        except GatewayError as exc:  # a decoder missing or failing, a bomb refused
            return answer(Relation.DIFFERENT, f"the pixel data cannot be compared: {exc}")
        if not same:
            return answer(Relation.DIFFERENT, detail, psnr)
    if received_lossy and not stored_lossy:
        return answer(Relation.RECEIVED_LOSSY, psnr=psnr)
    if stored_lossy and not received_lossy:
        return answer(Relation.STORED_LOSSY, psnr=psnr)
    return answer(Relation.SAME, psnr=psnr)


def _differences(a: Dataset, b: Dataset, a_big: bool, b_big: bool, *, top: bool,
                 prefix: str = "") -> Iterator[str]:
    """The names of the elements whose decoded values differ (encoding-only ones aside)."""
    for tag in sorted(set(a.keys()) | set(b.keys())):
        if tag & 0xFFFF == 0 or tag == SPECIFIC_CHARACTER_SET or (top and tag in ENCODING_ONLY):
            continue  # group lengths (their value depends on the VR encoding)
        name = prefix + _name(tag)
        if tag not in a or tag not in b:
            yield name
            continue
        ea, eb = a[tag], b[tag]
        if top and tag == PHOTOMETRIC_INTERPRETATION:
            if _photometric(ea.value) != _photometric(eb.value):
                yield name
        elif ea.VR == "SQ" or eb.VR == "SQ":
            if ea.VR != eb.VR or len(ea.value) != len(eb.value):
                yield name
                continue
            for number, (item_a, item_b) in enumerate(zip(ea.value, eb.value, strict=True)):
                yield from _differences(item_a, item_b, a_big, b_big, top=False,
                                        prefix=f"{name}[{number}].")
        elif _value(ea, a_big, eb, a) != _value(eb, b_big, ea, b):
            yield name


def _name(tag: BaseTag) -> str:
    return keyword_for_tag(tag) or str(BaseTag(tag))


def _photometric(value: Any) -> str:
    text = str(value or "").strip()
    return "colour" if text in COLOUR_INTERPRETATIONS else text


def _value(element: DataElement, big_endian: bool, other: DataElement, ds: Dataset) -> Any:
    """An element's value as comparable across encodings."""
    value = element.value
    if not isinstance(value, bytes):
        return value
    if element.VR == "UN" and other.VR not in _BYTES_VRS:
        # Implicit VR: a private tag pydicom does not know stays UN; read it as the other
        # copy read it.
        raw = RawDataElement(element.tag, other.VR, len(value), value, 0, True,
                             not big_endian, True, False)
        try:
            return convert_value(other.VR, raw, ds._character_set)
        except Exception:  # not valid in that VR: it differs
            return value
    width = _WORD_SIZES.get(element.VR) or _WORD_SIZES.get(other.VR)
    if big_endian and width and len(value) % width == 0:
        return np.frombuffer(value, dtype=f">u{width}").astype(f"<u{width}").tobytes()
    return value


def _compare_pixels(stored: Path, received: Path, a: Dataset, b: Dataset, stored_lossy: bool,
                    received_lossy: bool) -> tuple[bool, str, float | None]:
    """Whether the decoded frames are the same (see the module docstring); ``(same, what
    differs, PSNR)``."""
    a_pixels, b_pixels = read_pixel_file(stored), read_pixel_file(received)
    frames = a_pixels.number_of_frames
    if b_pixels.number_of_frames != frames:
        return False, "the number of frames differs", None
    same_interpretation = (str(a.get("PhotometricInterpretation", "")).strip()
                           == str(b.get("PhotometricInterpretation", "")).strip())
    lossless = not stored_lossy and not received_lossy
    # The lossless copy is the reference of the signal-to-noise ratio (the stored one if
    # both copies are lossy, or both lossless).
    reference_is_stored = not stored_lossy or received_lossy
    squared_error, count = 0.0, 0
    low, high = math.inf, -math.inf
    for index in range(frames):
        frame_a, frame_b = a_pixels.decode_frame(index), b_pixels.decode_frame(index)
        if frame_a.shape != frame_b.shape:
            return False, "the frames' dimensions differ", None
        if lossless and same_interpretation:
            if not np.array_equal(frame_a, frame_b):
                return False, f"the pixel values of frame {index + 1} differ", None
            continue
        difference = frame_a.astype(np.float64) - frame_b.astype(np.float64)
        if lossless:
            largest = float(np.abs(difference).max(initial=0.0))
            if largest > COLOUR_ROUNDING:
                return False, (f"the pixel values of frame {index + 1} differ by up to "
                               f"{largest:g}"), None
            continue
        squared_error += float(np.square(difference).sum())
        count += difference.size
        reference = frame_a if reference_is_stored else frame_b
        if reference.size:
            low = min(low, float(reference.min()))
            high = max(high, float(reference.max()))
    if lossless or count == 0:
        return True, "", None
    psnr = _psnr(squared_error / count, high - low)
    if psnr < MIN_PSNR_DB:
        return False, (f"the images differ (peak signal-to-noise ratio {psnr:.1f} dB, below "
                       f"{MIN_PSNR_DB:g} dB)"), psnr
    return True, "", psnr


def _psnr(mean_squared_error: float, peak: float) -> float:
    """Peak signal-to-noise ratio in dB; infinite for equal images.

    >>> _psnr(0.0, 255.0)
    inf
    >>> round(_psnr(1.0, 255.0), 1)
    48.1
    >>> _psnr(4.0, 0.0)
    -inf
    """
    if mean_squared_error == 0:
        return math.inf
    if peak <= 0:
        return -math.inf  # a flat reference image, and the other is not equal to it
    return 10 * math.log10(peak * peak / mean_squared_error)
