"""Pixel data of stored instances: frames as stored, decoded, or transcoded.

Transport-free: the DICOMweb front end calls it off the event loop. A stored file is opened
once per request, its header read up to the pixel data element (``stop_before_pixels``), and
only the bytes of the requested frames are read afterwards (``os.pread``), so that a frame of a
large multi-frame instance costs what the frame costs.

- Native pixel data (PS3.5 §8.1.1, §A.1-A.3): frame *i* is the byte range
  ``[i * length, (i + 1) * length)`` of the value (bit ranges for Bits Allocated 1).
- Encapsulated pixel data (PS3.5 §A.4): the item headers are scanned once; frames are mapped to
  fragments with the Extended Offset Table (7FE0,0001) when present, else the Basic Offset Table,
  else one fragment per frame when the counts agree, else by the codestream start markers of
  each fragment, else with :func:`pydicom.encaps.generate_frames` as the last resort.
- Decoding to native little endian uses pydicom's decoders with the plugins of the default
  install, all under permissive licences: GDCM (JPEG baseline/extended/lossless, JPEG-LS),
  Pillow (JPEG baseline/extended 8-bit), pylibjpeg-openjpeg (JPEG 2000, HTJ2K) and
  pylibjpeg-rle (RLE). JPEG Extended with 12-bit samples needs libjpeg (GPL-3.0), which only
  the opt-in ``libjpeg-gpl`` extra installs; without it such a frame is refused with a
  :class:`PixelDataError` naming the extra (:func:`missing_decoder`). Decoded colour frames are RGB,
  colour-by-pixel (PS3.5 §8.2: a decompressed YBR_FULL_422 / YBR_ICT / YBR_RCT image is RGB).
- Before any decoding, the declared size is checked against :class:`PixelLimits`, and the
  dimensions written inside JPEG / JPEG-LS / JPEG 2000 codestreams are checked against the
  header, so a small file cannot make the gateway allocate gigabytes (decompression bombs).
"""

from __future__ import annotations

import logging
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate, generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder, get_encoder, pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    RLELossless,
)

from gateway.config import SettingsError
from gateway.errors import GatewayError, InvalidQuery, NotFound
from gateway.storage import Blob, LocalBlob

# pylibjpeg-rle: the RLE decoder pydicom uses too, called directly for grayscale frames.
_rle_decode: Callable[..., Any] | None = None
try:
    from rle.utils import decode_pixel_data

    _rle_decode = decode_pixel_data
except ImportError:  # pragma: no cover - pydicom's own decoders are used then
    pass

logger = logging.getLogger(__name__)

# The opt-in extra that installs libjpeg (pylibjpeg-libjpeg, GPL-3.0): the only decoder of
# 12-bit JPEG Extended samples pydicom has a plugin for besides none (GDCM's and Pillow's
# plugins refuse 12-bit precision).
LIBJPEG_EXTRA = "libjpeg-gpl"


def _libjpeg_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("libjpeg") is not None


LIBJPEG_INSTALLED = _libjpeg_installed()

# Media types of frames (PS3.18 Table 8.7.3-2 "Transfer Syntax UIDs and Media Types for
# Uncompressed/Compressed Pixel Data"); the first syntax listed for a type is its default.
MEDIA_OCTET_STREAM = "application/octet-stream"
MEDIA_JPEG = "image/jpeg"
MEDIA_DICOM_RLE = "image/dicom-rle"
MEDIA_JLS = "image/jls"
MEDIA_JP2 = "image/jp2"
MEDIA_JPX = "image/jpx"
MEDIA_JPHC = "image/jphc"

SYNTAXES_OF_MEDIA: dict[str, tuple[str, ...]] = {
    MEDIA_OCTET_STREAM: ("1.2.840.10008.1.2.1",),
    MEDIA_JPEG: ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
                 "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"),
    MEDIA_DICOM_RLE: ("1.2.840.10008.1.2.5",),
    MEDIA_JLS: ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"),
    MEDIA_JP2: ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"),
    MEDIA_JPX: ("1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"),
    MEDIA_JPHC: ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                 "1.2.840.10008.1.2.4.203"),
}
MEDIA_OF_SYNTAX: dict[str, str] = {
    syntax: media for media, syntaxes in SYNTAXES_OF_MEDIA.items() for syntax in syntaxes
}
NATIVE_SYNTAXES = frozenset({
    ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
})
# MPEG-2, MPEG-4 AVC/H.264 and HEVC/H.265 (PS3.5 §8.2.5-8.2.7): one stream, not frames.
VIDEO_SYNTAX_PREFIX = "1.2.840.10008.1.2.4."
VIDEO_SYNTAXES = frozenset({"100", "101", "102", "103", "104", "105", "106", "107", "108"})
# Syntaxes we can encode to from decoded pixels, lossless only (pydicom's encoders).
ENCODABLE_SYNTAXES = (RLELossless, JPEG2000Lossless)

PIXEL_DATA = 0x7FE00010
FLOAT_PIXEL_DATA = 0x7FE00008
DOUBLE_FLOAT_PIXEL_DATA = 0x7FE00009
ITEM = 0xFFFEE000
SEQUENCE_DELIMITER = 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
# Codestream start markers, for frames split over fragments without an offset table.
JPEG_SOI = b"\xff\xd8"           # ISO/IEC 10918-1 and 14495-1 (JPEG, JPEG-LS)
J2K_SOC = b"\xff\x4f\xff\x51"    # ISO/IEC 15444-1 Annex A: SOC then SIZ
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "


class PixelDataError(GatewayError):
    """A stored instance has no pixel data, or pixel data the gateway cannot read or decode."""


class NotAcceptable(GatewayError):
    """The requested media type or transfer syntax cannot be produced for this instance."""


class ImageTooLarge(GatewayError):
    """An image is larger than the configured limits allow decoding or rendering."""


class InvalidFrameList(InvalidQuery):
    """A frame list is malformed (frames are numbered from 1, PS3.18 §10.4.1.1.4)."""


class NoSuchFrame(NotFound):
    """A requested frame number is beyond the instance's Number of Frames."""


@dataclass(frozen=True)
class PixelLimits:
    """Bounds that keep a hostile or broken file from exhausting memory.

    Attributes
    ----------
    max_frame_pixels
        Rows x Columns of one frame.
    max_frame_bytes
        Bytes of one decoded frame (Rows x Columns x Samples x Bits Allocated / 8).
    max_total_pixels
        Pixels decoded by one frames request over all its frames (they are streamed, so this
        bounds time, not memory).
    max_animation_pixels
        Pixels of an animated GIF, whose frames are all held in memory before encoding.
    max_viewport
        Largest rendered width or height.
    max_rendered_pixels
        Output pixels of one rendered request over all its frames or instances (each frame
        its viewport, or its own size): bounds the decoding and encoding work one request
        asks for.
    """

    # Below Pillow's Image.MAX_IMAGE_PIXELS (~89 M), which its JPEG decoder enforces too.
    max_frame_pixels: int = 8192 * 8192
    max_frame_bytes: int = 1024**3
    max_total_pixels: int = 1024**3
    max_animation_pixels: int = 64 * 1024**2
    max_viewport: int = 4096
    max_rendered_pixels: int = 256 * 1024**2

    @classmethod
    def from_settings(cls, table: Any, *, also: tuple[str, ...] = ()) -> PixelLimits:
        """Read the ``[pixels]`` table of the settings file (keys named as the attributes).

        ``also`` names other keys of the table that the caller reads itself.

        >>> PixelLimits.from_settings({"max_viewport": 1024}).max_viewport
        1024

        Raises
        ------
        SettingsError
            An unknown key, or a value that is not a positive integer.
        """
        if not table:
            return cls()
        if not isinstance(table, dict):
            raise SettingsError("[pixels] must be a table")
        values: dict[str, int] = {}
        for key, value in table.items():
            if key not in cls.__dataclass_fields__ and key not in also:
                raise SettingsError(f"unknown setting [pixels] {key}; known: "
                                    f"{', '.join([*cls.__dataclass_fields__, *also])}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SettingsError(f"setting [pixels] {key}: {value!r} is not a positive "
                                    "integer")
            if key in cls.__dataclass_fields__:
                values[key] = value
        return cls(**values)


DEFAULT_LIMITS = PixelLimits()


@dataclass(frozen=True)
class ImagePixel:
    """The Image Pixel module attributes that shape the pixel data (PS3.3 C.7.6.3)."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric_interpretation: str
    planar_configuration: int
    number_of_frames: int
    transfer_syntax_uid: str
    pixel_keyword: str = "PixelData"

    @property
    def frame_bits(self) -> int:
        """Bits of one native frame (YBR_FULL_422 is sub-sampled, PS3.3 C.7.6.3.1.2)."""
        samples = self.samples_per_pixel
        if self.photometric_interpretation == "YBR_FULL_422":
            samples = 2
        return self.rows * self.columns * samples * self.bits_allocated

    @property
    def frame_length(self) -> int:
        """Bytes of one native frame (rounded up for bit-packed frames)."""
        return (self.frame_bits + 7) // 8

    @property
    def decoded_length(self) -> int:
        """Bytes of one decoded frame, all samples."""
        return (self.rows * self.columns * self.samples_per_pixel * self.bits_allocated + 7) // 8

    @property
    def encapsulated(self) -> bool:
        return self.transfer_syntax_uid not in NATIVE_SYNTAXES

    def decode_options(self, transfer_syntax_uid: str | None = None,
                       as_rgb: bool = True) -> dict[str, Any]:
        """Keyword options of pydicom's ``Decoder.as_array`` for one frame."""
        options: dict[str, Any] = {
            "rows": self.rows, "columns": self.columns,
            "samples_per_pixel": self.samples_per_pixel,
            "bits_allocated": self.bits_allocated, "bits_stored": self.bits_stored,
            "pixel_representation": self.pixel_representation,
            "photometric_interpretation": self.photometric_interpretation,
            "number_of_frames": 1,
            "transfer_syntax_uid": UID(transfer_syntax_uid or self.transfer_syntax_uid),
            "pixel_keyword": self.pixel_keyword,
            "as_rgb": as_rgb,
        }
        if self.samples_per_pixel > 1:
            options["planar_configuration"] = self.planar_configuration
        return options

    def check(self, limits: PixelLimits) -> None:
        """Raise :class:`ImageTooLarge` if one frame exceeds ``limits``."""
        pixels = self.rows * self.columns
        if pixels > limits.max_frame_pixels:
            raise ImageTooLarge(
                f"a frame of {self.columns}x{self.rows} pixels exceeds the limit of "
                f"{limits.max_frame_pixels} pixels ([pixels] max_frame_pixels)")
        if self.decoded_length > limits.max_frame_bytes:
            raise ImageTooLarge(
                f"a decoded frame of {self.decoded_length} bytes exceeds the limit of "
                f"{limits.max_frame_bytes} bytes ([pixels] max_frame_bytes)")


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is None:
            raise PixelDataError(f"the instance lacks {keyword}, needed to read its pixel data")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise PixelDataError(f"{keyword} {value!r} is not a number") from None


def image_pixel(ds: Dataset, transfer_syntax_uid: str, keyword: str = "PixelData") -> ImagePixel:
    """Read the Image Pixel module of ``ds`` (PS3.3 C.7.6.3), checking it is usable.

    Raises
    ------
    PixelDataError
        A required attribute is missing or out of range.
    """
    bits_allocated = _int(ds, "BitsAllocated", 32 if keyword == "FloatPixelData"
                          else 64 if keyword == "DoubleFloatPixelData" else None)
    info = ImagePixel(
        rows=_int(ds, "Rows"), columns=_int(ds, "Columns"),
        samples_per_pixel=_int(ds, "SamplesPerPixel", 1),
        bits_allocated=bits_allocated,
        bits_stored=_int(ds, "BitsStored", bits_allocated),
        pixel_representation=_int(ds, "PixelRepresentation", 0),
        photometric_interpretation=str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip(),
        planar_configuration=_int(ds, "PlanarConfiguration", 0),
        number_of_frames=max(1, _int(ds, "NumberOfFrames", 1)),
        transfer_syntax_uid=str(transfer_syntax_uid),
        pixel_keyword=keyword,
    )
    if info.rows <= 0 or info.columns <= 0:
        raise PixelDataError(f"Rows {info.rows} / Columns {info.columns} must be positive")
    if info.bits_allocated not in (1, 8, 16, 32, 64):
        raise PixelDataError(f"Bits Allocated {info.bits_allocated} is not supported")
    if info.samples_per_pixel not in (1, 3):
        raise PixelDataError(f"Samples per Pixel {info.samples_per_pixel} is not supported")
    if not 0 < info.bits_stored <= info.bits_allocated:
        raise PixelDataError(f"Bits Stored {info.bits_stored} does not fit Bits Allocated "
                             f"{info.bits_allocated}")
    return info


@dataclass
class PixelFile:
    """The pixel data of one stored Part 10 file, located but not read.

    Use :func:`open_pixel_file` (cached: stored files never change, their name carries their
    digest). Frame indices here start at 0; DICOMweb frame numbers start at 1.
    """

    blob: Blob
    header: Dataset
    image: ImagePixel
    value_offset: int = 0
    value_length: int = 0
    # Encapsulated: per frame, the (offset, length) of each of its fragments' values.
    fragments: list[list[tuple[int, int]]] = field(default_factory=list)
    # Deflated or big endian files: the whole pixel data value, already read.
    inline: bytes | None = None
    # Frames pydicom's heuristics had to find in the whole value (no table, no markers).
    frame_data: list[bytes] | None = None

    @property
    def number_of_frames(self) -> int:
        return self.image.number_of_frames

    @property
    def transfer_syntax_uid(self) -> str:
        return self.image.transfer_syntax_uid

    def _read(self, offset: int, length: int) -> bytes:
        if self.inline is not None:
            return self.inline[offset:offset + length]
        try:
            data = self.blob.read_at(offset, length)
        except FileNotFoundError:
            raise NotFound("the instance was deleted while it was being read") from None
        if len(data) != length:
            raise PixelDataError(f"the stored file {self.blob.name} is truncated")
        return data

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.number_of_frames:
            raise NoSuchFrame(
                f"frame {index + 1} does not exist; the instance has "
                f"{self.number_of_frames} frame(s), numbered from 1")

    def stored_frame(self, index: int) -> bytes:
        """Frame ``index`` exactly as stored: a native byte range or an encapsulated codestream.

        For Explicit VR Big Endian files, the native frame in little endian (the only native
        byte order DICOMweb frames carry, PS3.18 §8.7.3.3.2).
        """
        self._check_index(index)
        info = self.image
        if info.encapsulated:
            if self.frame_data is not None:
                return self.frame_data[index]
            parts = [self._read(offset, length) for offset, length in self.fragments[index]]
            return parts[0] if len(parts) == 1 else b"".join(parts)
        if info.bits_allocated == 1 and info.frame_bits % 8:
            start = index * info.frame_bits
            first, last = start // 8, (start + info.frame_bits + 7) // 8
            bits = np.unpackbits(np.frombuffer(self._read(self.value_offset + first, last - first),
                                               dtype=np.uint8), bitorder="little")
            bits = bits[start % 8:start % 8 + info.frame_bits]
            return np.packbits(bits, bitorder="little").tobytes()
        length = info.frame_length
        return self._read(self.value_offset + index * length, length)

    def decode_frame(self, index: int, *, limits: PixelLimits = DEFAULT_LIMITS,
                     as_rgb: bool = True, clean: bool = True) -> np.ndarray:
        """Frame ``index`` as an array (rows, columns[, 3]) of the stored values.

        Colour is converted to RGB when ``as_rgb`` (YBR_FULL, YBR_FULL_422; the JPEG 2000
        decoder already does it for YBR_ICT/RCT). Signed data comes back signed, with Bits
        Stored < Bits Allocated sign-extended; unsigned high bits above Bits Stored are cleared.

        Raises
        ------
        ImageTooLarge
            The frame, or the codestream inside it, exceeds ``limits``.
        PixelDataError
            The codestream cannot be decoded.
        """
        info = self.image
        info.check(limits)
        data = self.stored_frame(index)
        if info.encapsulated:
            if (_rle_decode is not None and info.transfer_syntax_uid == RLELossless
                    and info.samples_per_pixel == 1 and info.bits_allocated in (8, 16, 32)):
                arr = _decode_rle_grayscale(data, info, index)
                return clean_bits(arr, info.bits_stored, info.pixel_representation) \
                    if clean else arr
            check_codestream(data, info)
            decoder = get_decoder(UID(info.transfer_syntax_uid))
            missing = missing_decoder(info)
            if missing is not None or not decoder.is_available:
                raise PixelDataError(
                    missing or f"no decoder is installed for {UID(info.transfer_syntax_uid).name}")
            try:
                arr, _ = decoder.as_array(encapsulate([data]),
                                          **info.decode_options(as_rgb=as_rgb))
            except Exception as exc:
                raise PixelDataError(
                    f"frame {index + 1} cannot be decoded from "
                    f"{UID(info.transfer_syntax_uid).name}: {exc}") from exc
            return arr  # pydicom has already corrected the bits above Bits Stored
        arr = _native_array(data, info, as_rgb=as_rgb)
        # clean=False: the caller ignores the bits above Bits Stored itself (render's tables).
        return clean_bits(arr, info.bits_stored, info.pixel_representation) if clean else arr

    def native_frame(self, index: int, *, limits: PixelLimits = DEFAULT_LIMITS) -> bytes:
        """Frame ``index`` in Explicit VR Little Endian form (PS3.5 §8.1.1, §A.2).

        Stored native frames are returned as stored (no copy through numpy); encapsulated ones
        are decoded, colour as RGB colour-by-pixel.
        """
        if not self.image.encapsulated:
            return self.stored_frame(index)
        info = self.image
        arr = self.decode_frame(index, limits=limits)
        if info.bits_allocated == 1:
            return np.packbits(arr.astype(np.uint8).ravel(), bitorder="little").tobytes()
        dtype = np.dtype(arr.dtype).newbyteorder("<")
        return np.ascontiguousarray(arr, dtype=dtype).tobytes()

    def encoded_frame(self, index: int, transfer_syntax_uid: str, *,
                      limits: PixelLimits = DEFAULT_LIMITS) -> bytes:
        """Frame ``index`` re-encoded in ``transfer_syntax_uid`` (RLE or JPEG 2000 lossless).

        Raises
        ------
        NotAcceptable
            No encoder for that syntax, or the pixel data cannot be encoded with it.
        """
        syntax = UID(transfer_syntax_uid)
        if syntax not in ENCODABLE_SYNTAXES:
            raise NotAcceptable(f"frames cannot be transcoded to {syntax.name or syntax}")
        encoder = get_encoder(syntax)
        if not encoder.is_available:
            raise NotAcceptable(f"no encoder is installed for {syntax.name}")
        info = self.image
        arr = self.decode_frame(index, limits=limits)
        photometric = "RGB" if info.samples_per_pixel == 3 else info.photometric_interpretation
        options = dict(info.decode_options(), photometric_interpretation=photometric,
                       planar_configuration=0)
        for key in ("transfer_syntax_uid", "pixel_keyword", "as_rgb"):
            options.pop(key)
        if info.pixel_representation == 0 and arr.dtype.kind == "i":
            arr = arr.astype(arr.dtype.str.replace("i", "u"))
        try:
            return bytes(encoder.encode(arr, encoding_plugin="", **options))
        except Exception as exc:
            raise NotAcceptable(f"frame {index + 1} cannot be encoded as {syntax.name}: "
                                f"{exc}") from exc

    def frame_in(self, index: int, transfer_syntax_uid: str, *,
                 limits: PixelLimits = DEFAULT_LIMITS) -> bytes:
        """Frame ``index`` in the requested syntax: as stored, decoded, or re-encoded.

        Raises
        ------
        NotAcceptable
            When that syntax cannot be produced (PS3.18 §8.7.3.5.1: the origin server answers
            406 Not Acceptable).
        """
        stored = self.transfer_syntax_uid
        if transfer_syntax_uid in ("*", stored) and stored not in NATIVE_SYNTAXES:
            return self.stored_frame(index)
        if transfer_syntax_uid in ("*", ExplicitVRLittleEndian):
            return self.native_frame(index, limits=limits)
        if transfer_syntax_uid in ENCODABLE_SYNTAXES:
            return self.encoded_frame(index, transfer_syntax_uid, limits=limits)
        raise NotAcceptable(
            f"frames stored as {UID(stored).name or stored} cannot be returned as "
            f"{UID(transfer_syntax_uid).name or transfer_syntax_uid}; ask for "
            f"transfer-syntax=* (as stored) or {ExplicitVRLittleEndian} (uncompressed)")

    def can_produce(self, transfer_syntax_uid: str) -> bool:
        """Whether :meth:`frame_in` can produce ``transfer_syntax_uid`` for this file."""
        stored = self.transfer_syntax_uid
        return (transfer_syntax_uid in ("*", stored, ExplicitVRLittleEndian)
                or (transfer_syntax_uid in ENCODABLE_SYNTAXES
                    and get_encoder(UID(transfer_syntax_uid)).is_available))

    def output_syntax(self, transfer_syntax_uid: str) -> str:
        """The syntax :meth:`frame_in` answers for a request of ``transfer_syntax_uid``."""
        if transfer_syntax_uid == "*":
            stored = self.transfer_syntax_uid
            return ExplicitVRLittleEndian if stored in NATIVE_SYNTAXES else stored
        return transfer_syntax_uid


def missing_decoder(info: ImagePixel) -> str | None:
    """Why no installed decoder can decode ``info``'s frames, or None when one can.

    JPEG Extended (PS3.5 §A.4.1, process 2 and 4) with more than 8 bits stored is 12-bit
    precision, which only libjpeg decodes among pydicom's plugins.
    """
    if (info.transfer_syntax_uid == JPEGExtended12Bit and info.bits_stored > 8
            and not LIBJPEG_INSTALLED):
        return (f"no decoder is installed for {JPEGExtended12Bit.name} with "
                f"{info.bits_stored}-bit samples: it needs libjpeg (GPL-3.0), installed by the "
                f"opt-in extra {LIBJPEG_EXTRA!r} (pip install 'dicom-gateway[{LIBJPEG_EXTRA}]')")
    return None


def _decode_rle_grayscale(data: bytes, info: ImagePixel, index: int) -> np.ndarray:
    """One grayscale RLE frame (PS3.5 Annex G) through pylibjpeg-rle directly.

    The same decoder pydicom would pick, without its per-call option handling, which costs as
    much as the decoding itself for a 512x512 frame.
    """
    assert _rle_decode is not None
    try:
        raw = _rle_decode(data, version=2, rows=info.rows, columns=info.columns,
                          bits_allocated=info.bits_allocated, samples_per_pixel=1)
    except Exception as exc:
        raise PixelDataError(f"frame {index + 1} cannot be decoded from RLE Lossless: "
                             f"{exc}") from exc
    kind = "i" if info.pixel_representation else "u"
    expected = info.rows * info.columns * info.bits_allocated // 8
    if len(raw) != expected:
        raise PixelDataError(f"frame {index + 1}: the RLE data decodes to {len(raw)} bytes, "
                             f"not {expected}")
    return np.frombuffer(raw, dtype=f"<{kind}{info.bits_allocated // 8}").reshape(
        info.rows, info.columns)


def _native_array(data: bytes, info: ImagePixel, *, as_rgb: bool) -> np.ndarray:
    """A native little endian frame as an array; the common cases without pydicom's runner."""
    simple = (info.bits_allocated in (8, 16, 32) and info.samples_per_pixel == 1
              and info.pixel_keyword == "PixelData")
    if simple:
        kind = "i" if info.pixel_representation else "u"
        arr = np.frombuffer(data, dtype=f"<{kind}{info.bits_allocated // 8}")
        return arr.reshape(info.rows, info.columns)
    if info.pixel_keyword != "PixelData":
        dtype = "<f4" if info.bits_allocated == 32 else "<f8"
        return np.frombuffer(data, dtype=dtype).reshape(
            info.rows, info.columns, *((3,) if info.samples_per_pixel == 3 else ()))
    decoder = get_decoder(ExplicitVRLittleEndian)
    try:
        arr, _ = decoder.as_array(data, **info.decode_options(ExplicitVRLittleEndian, as_rgb))
    except Exception as exc:
        raise PixelDataError(f"the native pixel data cannot be read: {exc}") from exc
    return arr


def clean_bits(arr: np.ndarray, bits_stored: int, pixel_representation: int) -> np.ndarray:
    """Clear bits above Bits Stored (unsigned) or sign-extend from it (signed), PS3.5 §8.1.1.

    >>> clean_bits(np.array([0xAFFF], np.uint16), 12, 1).tolist()
    [-1]
    """
    if arr.dtype.kind not in "iu" or bits_stored >= arr.dtype.itemsize * 8 or bits_stored < 2:
        return arr
    shift = arr.dtype.itemsize * 8 - bits_stored
    if pixel_representation:
        signed = arr.astype(arr.dtype.str.replace("u", "i"), copy=False)
        return (signed << shift) >> shift
    return arr & ((1 << bits_stored) - 1)


# -- decompression bombs ---------------------------------------------------------------------

def codestream_size(data: bytes) -> tuple[int, int] | None:
    """The (columns, rows) a JPEG, JPEG-LS or JPEG 2000 codestream declares, if found.

    >>> codestream_size(b"\\xff\\xd8\\xff\\xc0\\x00\\x0b\\x08\\x00\\x10\\x00\\x20\\x01")
    (32, 16)
    """
    if data.startswith(JP2_SIGNATURE):
        at = data.find(b"\xff\x4f\xff\x51")
        if at < 0:
            return None
        data = data[at:]
    if data.startswith(J2K_SOC):
        # ISO/IEC 15444-1 A.5.1 SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz
        if len(data) < 24:
            return None
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", data[8:24])
        return xsiz - xo, ysiz - yo
    if data.startswith(JPEG_SOI):
        # ISO/IEC 10918-1 B.2.2 / 14495-1 C.2.2: walk the marker segments to the frame header.
        at = 2
        while at + 4 <= len(data) and at < 65536 * 4:
            if data[at] != 0xFF:
                return None
            marker = data[at + 1]
            if marker == 0xFF:
                at += 1
                continue
            length = int.from_bytes(data[at + 2:at + 4], "big")
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB,
                          0xCD, 0xCE, 0xCF, 0xF7):
                if at + 9 > len(data):
                    return None
                rows, columns = struct.unpack(">HH", data[at + 5:at + 9])
                return columns, rows
            at += 2 + length
    return None


def check_codestream(data: bytes, info: ImagePixel) -> None:
    """Refuse a codestream that declares a larger image than the header (a decompression bomb).

    Raises
    ------
    ImageTooLarge
        The codestream's own width or height exceeds Columns / Rows.
    """
    size = codestream_size(data)
    if size is None:
        return
    columns, rows = size
    # A JPEG frame header may carry 0 rows (defined later by DNL, ISO/IEC 10918-1 B.2.5).
    if columns > info.columns or rows > info.rows:
        raise ImageTooLarge(
            f"the compressed frame declares {columns}x{rows} pixels but the instance "
            f"{info.columns}x{info.rows}; refusing to decode it")


# -- locating the pixel data -------------------------------------------------------------------

def read_pixel_file(source: Path | Blob) -> PixelFile:
    """Open a stored Part 10 file (or object) and locate its pixel data without reading it.

    Raises
    ------
    PixelDataError
        Not DICOM, no pixel data, or an encapsulation that cannot be parsed.
    """
    blob = LocalBlob(source) if isinstance(source, Path) else source
    try:
        with blob.open() as f:
            header = dcmread(f, stop_before_pixels=True)
            position = f.tell()
            tag_bytes = f.read(12)
    except FileNotFoundError:
        raise PixelDataError(f"the stored file {blob.name} is missing") from None
    except (InvalidDicomError, OSError, ValueError, struct.error) as exc:
        raise PixelDataError(f"the stored file {blob.name} cannot be read: {exc}") from exc
    syntax = str(header.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian))
    if syntax in (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian):
        return _read_whole(blob, syntax)
    if len(tag_bytes) < 8:
        raise PixelDataError("the instance has no pixel data")
    group, element = struct.unpack("<HH", tag_bytes[:4])
    tag = (group << 16) | element
    keyword = {PIXEL_DATA: "PixelData", FLOAT_PIXEL_DATA: "FloatPixelData",
               DOUBLE_FLOAT_PIXEL_DATA: "DoubleFloatPixelData"}.get(tag)
    if keyword is None:
        raise PixelDataError("the instance has no pixel data")
    if syntax == ImplicitVRLittleEndian:
        (length,) = struct.unpack("<I", tag_bytes[4:8])
        value_offset = position + 8
    elif tag_bytes[4:6] in (b"OB", b"OW", b"OF", b"OD", b"UN", b"OL", b"OV"):
        (length,) = struct.unpack("<I", tag_bytes[8:12])
        value_offset = position + 12
    elif not tag_bytes[4:6].isalpha():
        # An explicit VR syntax in the meta, an implicit VR data set (pydicom reads it too).
        (length,) = struct.unpack("<I", tag_bytes[4:8])
        value_offset = position + 8
    else:
        raise PixelDataError(f"unexpected VR {tag_bytes[4:6]!r} for the pixel data")
    if syntax.startswith(VIDEO_SYNTAX_PREFIX) and syntax.rsplit(".", 1)[1] in VIDEO_SYNTAXES:
        raise PixelDataError(f"the pixel data is a video ({UID(syntax).name or syntax}); "
                             "its frames cannot be extracted, retrieve the instance instead")
    info = image_pixel(header, syntax, keyword)
    pixel_file = PixelFile(blob, header, info, value_offset, length)
    if info.encapsulated:
        if length != UNDEFINED_LENGTH:
            raise PixelDataError(f"compressed pixel data ({UID(syntax).name}) must be "
                                 "encapsulated with an undefined length (PS3.5 §A.4)")
        pixel_file.fragments = _map_fragments(pixel_file)
    else:
        needed = (info.frame_bits * info.number_of_frames + 7) // 8
        available = min(length, max(blob.size() - value_offset, 0))
        if length == UNDEFINED_LENGTH or available < needed:
            raise PixelDataError(
                f"the pixel data holds {available} bytes, fewer than the {needed} that "
                f"{info.number_of_frames} frame(s) of {info.columns}x{info.rows} need "
                "(truncated file?)")
    return pixel_file


def _read_whole(blob: Blob, syntax: str) -> PixelFile:
    """Deflated and big endian files: read the pixel data value into memory."""
    try:
        with blob.open() as f:
            ds = dcmread(f)
    except (InvalidDicomError, OSError, ValueError, zlib.error) as exc:
        raise PixelDataError(f"the stored file {blob.name} cannot be read: {exc}") from exc
    keyword = next((k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
                    if k in ds), None)
    if keyword is None:
        raise PixelDataError("the instance has no pixel data")
    info = image_pixel(ds, syntax, keyword)
    if syntax == ExplicitVRBigEndian:
        # Decode once with pydicom (it knows the OW byte swapping), keep little endian bytes.
        try:
            arr = pixel_array(ds, raw=True)
        except Exception as exc:
            raise PixelDataError(f"the big endian pixel data cannot be read: {exc}") from exc
        if info.bits_allocated == 1:
            value = np.packbits(arr.astype(np.uint8).ravel(), bitorder="little").tobytes()
        else:
            value = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
        photometric = info.photometric_interpretation
        info = ImagePixel(**{**info.__dict__, "planar_configuration": 0,
                             "photometric_interpretation":
                                 "YBR_FULL" if photometric == "YBR_FULL_422" else photometric})
    else:
        value = ds[keyword].value
    del ds[keyword]
    info = ImagePixel(**{**info.__dict__, "transfer_syntax_uid": ExplicitVRLittleEndian})
    pixel_file = PixelFile(blob, ds, info, 0, len(value), inline=value)
    needed = (info.frame_bits * info.number_of_frames + 7) // 8
    if len(value) < needed:
        raise PixelDataError(f"the pixel data holds {len(value)} bytes, fewer than {needed}")
    return pixel_file


def _items(pixel_file: PixelFile) -> tuple[bytes, list[tuple[int, int]]]:
    """The Basic Offset Table value and each fragment's (value offset, length)."""
    items: list[tuple[int, int]] = []
    position = pixel_file.value_offset
    blob = pixel_file.blob
    size = blob.size()
    # Item headers are read through a buffered reader: one read (one ranged GET of an
    # object) covers the headers of every small fragment in its span.
    with blob.open() as f:
        while True:
            f.seek(position)
            head = f.read(8)
            if len(head) < 8:
                raise PixelDataError("the encapsulated pixel data ends without a delimiter")
            group, element, length = struct.unpack("<HHI", head)
            tag = (group << 16) | element
            if tag == SEQUENCE_DELIMITER:
                break
            if tag != ITEM or length == UNDEFINED_LENGTH or position + 8 + length > size:
                raise PixelDataError(
                    f"malformed encapsulated pixel data at byte {position} (PS3.5 §A.4)")
            items.append((position + 8, length))
            position += 8 + length
        if not items:
            raise PixelDataError("the encapsulated pixel data has no Basic Offset Table item")
        bot_offset, bot_length = items[0]
        f.seek(bot_offset)
        bot = f.read(bot_length) if bot_length else b""
    return bot, items[1:]


def _map_fragments(pixel_file: PixelFile) -> list[list[tuple[int, int]]]:
    """Group the fragments of encapsulated pixel data into frames (PS3.5 §A.4)."""
    frames = pixel_file.number_of_frames
    bot, fragments = _items(pixel_file)
    if not fragments:
        raise PixelDataError("the encapsulated pixel data has no fragments")
    first_item = fragments[0][0] - 8
    header = pixel_file.header
    starts: list[int] | None = None
    if "ExtendedOffsetTable" in header and header.ExtendedOffsetTable:
        table = bytes(header.ExtendedOffsetTable)
        starts = list(struct.unpack(f"<{len(table) // 8}Q", table))
    elif bot:
        starts = list(struct.unpack(f"<{len(bot) // 4}I", bot))
    if starts is not None and len(starts) == frames:
        by_position = {offset - 8 - first_item: i for i, (offset, _) in enumerate(fragments)}
        try:
            first = [by_position[start] for start in starts]
        except KeyError:
            logger.warning("%s: offset table does not match the fragments; scanning them",
                           pixel_file.blob.name)
        else:
            ends = first[1:] + [len(fragments)]
            return [fragments[a:b] for a, b in zip(first, ends, strict=True)]
    if frames == 1:
        return [fragments]
    if len(fragments) == frames:
        return [[fragment] for fragment in fragments]
    # Several fragments per frame and no usable table: a frame starts where a codestream does.
    marker = J2K_SOC if "1.2.840.10008.1.2.4.9" in pixel_file.transfer_syntax_uid or \
        pixel_file.transfer_syntax_uid.startswith("1.2.840.10008.1.2.4.20") else JPEG_SOI
    grouped: list[list[tuple[int, int]]] = []
    for offset, length in fragments:
        begins = pixel_file._read(offset, min(length, 12))
        if begins.startswith(marker) or (marker == J2K_SOC and begins.startswith(JP2_SIGNATURE)) \
                or not grouped:
            grouped.append([])
        grouped[-1].append((offset, length))
    if len(grouped) == frames:
        return grouped
    # Last resort: pydicom's own heuristics over the whole value (JPEG EOI markers...).
    whole = struct.pack("<HHI", 0xFFFE, 0xE000, 0) + b"".join(
        struct.pack("<HHI", 0xFFFE, 0xE000, length) + pixel_file._read(offset, length)
        for offset, length in fragments)
    try:
        found = list(generate_frames(whole, number_of_frames=frames))
    except (ValueError, StopIteration):
        found = []
    if len(found) == frames:
        pixel_file.frame_data = found
        return []
    raise PixelDataError(
        f"cannot tell which of {len(fragments)} fragments belong to which of {frames} frames "
        "(no offset table and no codestream markers)")


class PixelFileCache:
    """A small LRU of located pixel data, keyed by blob (stored files and objects never
    change: their name carries their digest)."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, PixelFile] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, source: Path | Blob) -> PixelFile:
        blob = LocalBlob(source) if isinstance(source, Path) else source
        with self._lock:
            found = self._items.get(blob.key)
            if found is not None:
                self._items.move_to_end(blob.key)
                return found
        pixel_file = read_pixel_file(blob)
        if pixel_file.inline is not None and len(pixel_file.inline) > 16 * 1024**2:
            return pixel_file  # keep big in-memory values out of the cache
        with self._lock:
            self._items[blob.key] = pixel_file
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return pixel_file

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_CACHE = PixelFileCache()


def open_pixel_file(source: Path | Blob) -> PixelFile:
    """Locate the pixel data of a stored file or object (cached)."""
    return _CACHE.get(source)


# A frame list's bounds (PS3.18 §10.4.1.1.4 sets none): Number of Frames is an IS, at most
# 12 characters (PS3.5 Table 6.2-1), so a frame number has at most 10 digits that mean anything.
MAX_FRAMES_PER_REQUEST = 10000
MAX_FRAME_DIGITS = 10


def parse_frame_list(text: str, number_of_frames: int | None = None) -> list[int]:
    """Parse a WADO-RS frame list, ``1,3,5`` (PS3.18 §10.4.1.1.4, numbered from 1).

    >>> parse_frame_list("1,3,2")
    [1, 3, 2]

    Raises
    ------
    InvalidFrameList
        A number that is not a positive integer.
    NoSuchFrame
        A number beyond ``number_of_frames``.
    """
    parts = text.split(",")
    if len(parts) > MAX_FRAMES_PER_REQUEST:
        raise InvalidFrameList(f"frame list: at most {MAX_FRAMES_PER_REQUEST} frames per request")
    frames: list[int] = []
    for part in parts:
        part = part.strip()
        # Checked before int(): Python refuses to convert more than 4300 digits (ValueError).
        if (not (part.isascii() and part.isdigit()) or len(part) > MAX_FRAME_DIGITS
                or int(part) < 1):
            shown = part if len(part) <= 20 else f"{part[:20]}... ({len(part)} characters)"
            raise InvalidFrameList(
                f"frame list: {shown!r} is not a frame number (1, 2, ... up to "
                f"{MAX_FRAME_DIGITS} digits)")
        frames.append(int(part))
    if number_of_frames is not None:
        beyond = [n for n in frames if n > number_of_frames]
        if beyond:
            raise NoSuchFrame(f"frame {beyond[0]} does not exist; the instance has "
                              f"{number_of_frames} frame(s)")
    return frames


def frames_of(pixel_file: PixelFile, numbers: Sequence[int], transfer_syntax_uid: str, *,
              limits: PixelLimits = DEFAULT_LIMITS) -> list[bytes]:
    """The frames numbered ``numbers`` (from 1) in ``transfer_syntax_uid`` (``*``: as stored).

    Raises
    ------
    ImageTooLarge
        A native frame larger than ``limits.max_frame_bytes`` (it would be read into memory
        whole), or more decoded pixels than ``limits.max_total_pixels``.
    """
    info = pixel_file.image
    if not info.encapsulated and info.frame_length > limits.max_frame_bytes:
        raise ImageTooLarge(f"a frame of {info.frame_length} bytes exceeds the limit of "
                            f"{limits.max_frame_bytes} bytes ([pixels] max_frame_bytes)")
    if transfer_syntax_uid not in ("*", pixel_file.transfer_syntax_uid):
        total = pixel_file.image.rows * pixel_file.image.columns * len(numbers)
        if total > limits.max_total_pixels:
            raise ImageTooLarge(f"decoding {len(numbers)} frames of "
                                f"{pixel_file.image.columns}x{pixel_file.image.rows} exceeds "
                                f"{limits.max_total_pixels} pixels per request")
    return [pixel_file.frame_in(n - 1, transfer_syntax_uid, limits=limits) for n in numbers]
