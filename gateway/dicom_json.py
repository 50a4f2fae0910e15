"""A little-endian data set read straight into the DICOM JSON Model (PS3.18 Annex F).

Every received instance has its DICOM JSON computed once, at ingest (DESIGN.md). pydicom's
``Dataset.to_json_dict`` does it through a full ``Dataset`` (raw elements, converted elements,
value classes), which costs about 1.5 ms of interpreter time for a CT image: in one process that
serves several associations, the largest share of what limits C-STORE throughput. This module
reads the bytes once and writes the same JSON dict, for the data sets that modalities send
almost always: Explicit VR Little Endian (native or with encapsulated pixel data) and Implicit
VR Little Endian with standard tags, in the default repertoire, Latin-1 or UTF-8.

It gives the same result as pydicom, value for value, or none: anything it does not handle the
way pydicom does (another character set, a ``UN`` value, a private tag without its VR, an
ambiguous VR, an empty item of a multi-valued string, a number pydicom would keep as text, a
value cut short, ...) raises :class:`Unsupported` and the caller reads the instance with pydicom
instead. ``tests/test_dicom_json.py`` holds it to pydicom's output.
"""

from __future__ import annotations

import base64
import re
import struct
from dataclasses import dataclass, field
from struct import Struct, unpack
from typing import Any

from pydicom.datadict import DicomDictionary

# pydicom's rule (DataElement.to_json_dict): binary values longer than this many bytes become
# bulk data (a base64 text of the 1024-character threshold).
INLINE_BINARY_MAX = (1024 // 4) * 3
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
SPECIFIC_CHARACTER_SET = 0x00080005
PIXEL_REPRESENTATION = 0x00280103
# Pixel values whose VR in implicit syntax follows the Pixel Representation (PS3.5 A.1).
_US_OR_SS = frozenset({0x00280106, 0x00280107, 0x00280108, 0x00280109, 0x00280120,
                       0x00280121})
ITEM, ITEM_DELIMITATION, SEQUENCE_DELIMITATION = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
# Sequences nested deeper than this are refused (gateway.metadata.MAX_NESTING says why).
MAX_NESTING = 64

# Explicit VRs with a 4-byte length (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR",
                       b"UT", b"SV", b"UV"})
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
# Character sets read here: (0008,0005) value -> Python codec (pydicom's default is Latin-1).
_CODECS = {"": "latin_1", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}
_NUMBERS = {"US": ("H", 2), "SS": ("h", 2), "UL": ("I", 4), "SL": ("i", 4), "FL": ("f", 4),
            "FD": ("d", 8), "SV": ("q", 8), "UV": ("Q", 8)}
_TAG = Struct("<HH")
_EXPLICIT_HEADER = Struct("<HH2sH")
_IMPLICIT_HEADER = Struct("<HHI")
_U32 = Struct("<I")
# What pydicom turns into a number without a fallback (DSfloat, IS).
_DECIMAL = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*")
_INTEGER = re.compile(r"\s*[+-]?\d+\s*")


class Unsupported(Exception):
    """The data set needs pydicom's reader (the reason is for the debug log)."""


@dataclass
class JsonDataset:
    """The DICOM JSON of a data set and the few top-level values ingest checks and indexes.

    ``values`` maps each top-level tag to its values as :func:`read_dataset` decoded them
    (strings, numbers; person names as their whole string; binary values as their length).
    """

    model: dict[str, Any]
    values: dict[int, list[Any]] = field(default_factory=dict)
    pixel_data_length: int | None = None
    encapsulated: bool = False
    # Each bulk data element of the model and its path, until the prefix is known.
    bulk: list[tuple[dict[str, Any], str]] = field(default_factory=list)

    def set_bulk_prefix(self, prefix: str) -> None:
        """Make each ``BulkDataURI`` ``prefix`` + its path (``<tag>/<item>/<tag>...``)."""
        for element, path in self.bulk:
            element["BulkDataURI"] = prefix + path


def read_dataset(data: bytes, offset: int, *, explicit: bool) -> JsonDataset:
    """Read the data set at ``data[offset:]`` into its DICOM JSON.

    Parameters
    ----------
    data
        The Part 10 bytes (or a bare data set with ``offset`` 0).
    offset
        Where the data set starts.
    explicit
        Explicit VR Little Endian (``False``: Implicit VR Little Endian).

    Bulk data (binary values over :data:`INLINE_BINARY_MAX` bytes, top-level pixel data always)
    get their ``BulkDataURI`` from :meth:`JsonDataset.set_bulk_prefix`.

    Raises
    ------
    Unsupported
        Where only pydicom would read the data set as pydicom does.
    """
    result = JsonDataset(model={})
    reader = _Reader(data, explicit, result)
    try:
        end = reader.read_items(result.model, offset, len(reader.data), "", top=True)
    except (IndexError, UnicodeDecodeError, ValueError, struct.error) as exc:
        raise Unsupported(f"{type(exc).__name__}: {exc}") from None
    if end != len(reader.data):
        raise Unsupported("bytes after the last element")
    return result


class _Reader:
    def __init__(self, data: bytes, explicit: bool, top: JsonDataset) -> None:
        self.data = data
        self.explicit = explicit
        self.top = top
        self.codec = "latin_1"
        self.text_read = False  # a text value decoded: too late to change the character set
        self.depth = 0  # sequences open

    def header(self, pos: int) -> tuple[int, str | None, int, int]:
        """Tag, VR (``None`` for item tags), value length, value offset.

        :meth:`read_items` reads an explicit VR header inline, the same way: change both.
        """
        data = self.data
        if self.explicit:
            group, element, vr_bytes, short = _EXPLICIT_HEADER.unpack_from(data, pos)
            tag = group << 16 | element
            if group == 0xFFFE:  # item and delimitation tags carry no VR
                return tag, None, _U32.unpack_from(data, pos + 4)[0], pos + 8
            vr = _EXPLICIT_VRS.get(vr_bytes)
            if vr is None:
                raise Unsupported(f"VR {vr_bytes!r}")
            if vr_bytes in _LONG_VRS:
                return tag, vr, _U32.unpack_from(data, pos + 8)[0], pos + 12
            return tag, vr, short, pos + 8
        group, element, length = _IMPLICIT_HEADER.unpack_from(data, pos)
        tag = group << 16 | element
        if group == 0xFFFE:
            return tag, None, length, pos + 8
        return tag, _implicit_vr(tag), length, pos + 8

    def read_items(self, out: dict[str, Any], pos: int, end: int, path: str, *,
                   top: bool = False, until_delimiter: bool = False) -> int:
        """Read elements from ``pos`` into ``out`` up to ``end`` or an item delimiter."""
        data = self.data
        explicit = self.explicit
        top_values = self.top.values
        previous = -1
        while pos < end:
            if explicit:  # header() inlined: one call less per element of every instance
                group, element, vr_bytes, length = _EXPLICIT_HEADER.unpack_from(data, pos)
                tag = group << 16 | element
                if group == 0xFFFE:
                    vr = None
                    length = _U32.unpack_from(data, pos + 4)[0]
                    pos += 8
                else:
                    vr = _EXPLICIT_VRS.get(vr_bytes)
                    if vr is None:
                        raise Unsupported(f"VR {vr_bytes!r}")
                    if vr_bytes in _LONG_VRS:
                        length = _U32.unpack_from(data, pos + 8)[0]
                        pos += 12
                    else:
                        pos += 8
            else:
                tag, vr, length, pos = self.header(pos)
            if tag == ITEM_DELIMITATION and until_delimiter:
                return pos
            if vr is None or tag <= previous:
                raise Unsupported(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) out of place")
            previous = tag
            if tag >> 16 == 0x0002 or tag == 0xFFFCFFFC:
                raise Unsupported("file meta or padding element inside the data set")
            key = _KEYS.get(tag) or _key(tag)
            if vr == "SQ":
                items: list[dict[str, Any]] = []
                pos = self.read_sequence(items, pos, length, f"{path}{key}/")
                out[key] = {"vr": "SQ", "Value": items}
                continue
            if vr == "UN":
                raise Unsupported("UN value")
            if vr == "US or SS":
                vr = self.us_or_ss(top)
            if length == UNDEFINED_LENGTH:
                if not (top and tag in PIXEL_TAGS):
                    raise Unsupported(f"undefined length {vr} value")
                pos = self.read_fragments(pos)
                out[key] = self.bulk_data(vr, path + key)
                top_values[tag] = [self.top.pixel_data_length]
                continue
            value_end = pos + length
            if value_end > end:
                raise Unsupported("value cut short")
            if vr in _BINARY_VRS:
                if top and tag in PIXEL_TAGS:
                    out[key] = self.bulk_data(vr, path + key)
                    self.top.pixel_data_length = length
                elif length > INLINE_BINARY_MAX:
                    out[key] = self.bulk_data(vr, path + key)
                elif length:
                    out[key] = {"vr": vr,
                                "InlineBinary": base64.b64encode(data[pos:value_end]).decode()}
                else:
                    out[key] = {"vr": vr}
                if top:
                    top_values[tag] = [length]
                pos = value_end
                continue
            if tag == SPECIFIC_CHARACTER_SET:
                if not top or self.text_read:
                    raise Unsupported("character set of an item, or after text")
                name = data[pos:value_end].decode("latin_1").strip(" \x00")
                if name not in _CODECS:
                    raise Unsupported(f"character set {name!r}")
                self.codec = _CODECS[name]
            values = _CONVERTERS[vr](self, data[pos:value_end])
            pos = value_end
            if not values:
                out[key] = {"vr": vr}
            elif vr == "PN":
                out[key] = {"vr": vr, "Value": [{"Alphabetic": v} for v in values]}
            else:
                out[key] = {"vr": vr, "Value": values}
            if top:
                top_values[tag] = values
        if until_delimiter:
            raise Unsupported("item without its delimiter")
        return pos

    def us_or_ss(self, top: bool) -> str:
        """PS3.5 A.1 (implicit VR): a pixel value is US or SS as the Pixel Representation."""
        representation = self.top.values.get(PIXEL_REPRESENTATION) if top else None
        if representation not in ([0], [1]):
            raise Unsupported("US or SS without the Pixel Representation beside it")
        return "SS" if representation == [1] else "US"

    def bulk_data(self, vr: str, path: str) -> dict[str, Any]:
        element = {"vr": vr, "BulkDataURI": ""}
        self.top.bulk.append((element, path))
        return element

    def read_sequence(self, items: list[dict[str, Any]], pos: int, length: int,
                      path: str) -> int:
        data = self.data
        end = len(data) if length == UNDEFINED_LENGTH else pos + length
        if end > len(data):
            raise Unsupported("sequence cut short")
        if self.depth >= MAX_NESTING:
            raise Unsupported(f"sequences nested deeper than {MAX_NESTING}")
        self.depth += 1
        try:
            return self._read_items_of(items, pos, end, length, path)
        finally:
            self.depth -= 1

    def _read_items_of(self, items: list[dict[str, Any]], pos: int, end: int, length: int,
                       path: str) -> int:
        while pos < end:
            tag, _vr, item_length, pos = self.header(pos)
            if tag == SEQUENCE_DELIMITATION and length == UNDEFINED_LENGTH:
                return pos
            if tag != ITEM:
                raise Unsupported("sequence without items")
            item: dict[str, Any] = {}
            item_path = f"{path}{len(items)}/"
            if item_length == UNDEFINED_LENGTH:
                pos = self.read_items(item, pos, end, item_path, until_delimiter=True)
            else:
                item_end = pos + item_length
                if item_end > end:
                    raise Unsupported("item cut short")
                pos = self.read_items(item, pos, item_end, item_path)
            items.append(item)
        if length == UNDEFINED_LENGTH:
            raise Unsupported("sequence without its delimiter")
        return pos

    def read_fragments(self, pos: int) -> int:
        """Skip encapsulated pixel data (PS3.5 A.4), checking that it ends."""
        data = self.data
        self.top.encapsulated = True
        start = pos
        while True:
            tag = _TAG.unpack_from(data, pos)
            length = _U32.unpack_from(data, pos + 4)[0]
            pos += 8
            if tag == (0xFFFE, 0xE0DD):
                self.top.pixel_data_length = pos - start
                return pos
            if tag != (0xFFFE, 0xE000) or length == UNDEFINED_LENGTH or pos + length > len(data):
                raise Unsupported("encapsulated pixel data cut short or malformed")
            pos += length

    # -- values (pydicom's converters, values.py) ---------------------------------------------
    def text(self, raw: bytes) -> list[str]:  # LO, SH, UC
        if b"\x1b" in raw:
            raise Unsupported("code extension")
        self.text_read = True
        text = raw.decode(self.codec)
        if "\\" not in text:  # one value, as nearly always
            text = text.rstrip("\x00 ")
            return [text] if text else []
        return _values([v.rstrip("\x00 ") for v in text.split("\\")])

    def single_text(self, raw: bytes) -> list[str]:  # LT, ST, UT
        if b"\x1b" in raw:
            raise Unsupported("code extension")
        self.text_read = True
        value = raw.decode(self.codec).rstrip("\x00 ")
        return [value] if value else []

    def person_name(self, raw: bytes) -> list[str]:
        if b"\x1b" in raw or b"=" in raw:
            raise Unsupported("person name with code extensions or component groups")
        self.text_read = True
        value = raw.rstrip(b"\x00 ").decode(self.codec)
        if not value:
            return []
        values = value.split("\\")
        if len(values) > 1 and "" in values:
            raise Unsupported("empty person name among several")
        return values


def _values(values: list[str]) -> list[str]:
    """One empty value is no value; an empty one among several pydicom keeps as it is."""
    if len(values) == 1:
        return values if values[0] else []
    if "" in values:
        raise Unsupported("empty value among several")
    return values


def _string(_reader: _Reader, raw: bytes) -> list[str]:  # AS, CS, DA, DT, TM, UI
    value = raw.decode("latin_1").rstrip(" \x00")
    if "\\" not in value:  # one value, as nearly always
        return [value] if value else []
    return _values(value.split("\\"))


def _ae(_reader: _Reader, raw: bytes) -> list[str]:
    return _values([v.strip() for v in raw.decode("latin_1").split("\\")])


def _ur(_reader: _Reader, raw: bytes) -> list[str]:
    value = raw.decode("latin_1").rstrip()
    return [value] if value else []


def _ds(_reader: _Reader, raw: bytes) -> list[float]:
    text = raw.decode("latin_1").strip().rstrip(" \x00")
    if not text:
        return []
    values = text.split("\\")
    for v in values:
        if not _DECIMAL.fullmatch(v):
            raise Unsupported(f"DS value {v[:20]!r}")
    return [float(v) for v in values]


def _is(_reader: _Reader, raw: bytes) -> list[int]:
    text = raw.decode("latin_1").rstrip(" \x00")
    if not text:
        return []
    values = text.split("\\")
    for v in values:
        if not _INTEGER.fullmatch(v):
            raise Unsupported(f"IS value {v[:20]!r}")
    return [int(v) for v in values]


def _at(_reader: _Reader, raw: bytes) -> list[str]:
    if len(raw) % 4:
        raise Unsupported("AT value of odd length")
    return [f"{group:04X}{element:04X}" for group, element in _TAG.iter_unpack(raw)]


def _number(code: str, size: int) -> Any:
    def convert(_reader: _Reader, raw: bytes) -> list[Any]:
        if len(raw) % size:
            raise Unsupported(f"{code} value of {len(raw)} bytes")
        return list(unpack(f"<{len(raw) // size}{code}", raw))

    return convert


_CONVERTERS: dict[str, Any] = {
    "AE": _ae, "AS": _string, "CS": _string, "DA": _string, "DT": _string, "TM": _string,
    "UI": _string, "UR": _ur, "DS": _ds, "IS": _is, "AT": _at,
    "LO": _Reader.text, "SH": _Reader.text, "UC": _Reader.text,
    "LT": _Reader.single_text, "ST": _Reader.single_text, "UT": _Reader.single_text,
    "PN": _Reader.person_name,
    **{vr: _number(code, size) for vr, (code, size) in _NUMBERS.items()},
    **{vr: None for vr in _BINARY_VRS}, "UN": None, "SQ": None,
}


# The VRs read here, as they appear in an explicit VR header.
_EXPLICIT_VRS = {vr.encode("ascii"): vr for vr in _CONVERTERS}
# Each standard tag's JSON key ("0020000D"), made once; other tags' keys are made each time.
_KEYS: dict[int, str] = {tag: f"{tag:08X}" for tag in DicomDictionary}


def _key(tag: int) -> str:
    return f"{tag:08X}"


def _implicit_vr(tag: int) -> str:
    """The VR of a tag in Implicit VR Little Endian, where pydicom would find the same one."""
    if tag & 0x10000:
        raise Unsupported("private tag in implicit VR")
    if tag & 0xFFFF == 0:
        return "UL"  # group length
    if tag == 0x7FE00010:
        return "OW"  # PS3.5 A.1: pixel data in implicit VR are OW
    if tag in _US_OR_SS:
        return "US or SS"
    entry = DicomDictionary.get(tag)
    if entry is None or entry[0] not in _CONVERTERS:
        raise Unsupported(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) has no single VR")
    return entry[0]


def read_file_meta(data: bytes) -> tuple[dict[int, str], int]:
    """The UI values of the File Meta Information (PS3.10 §7.1) and where the data set starts.

    Raises
    ------
    Unsupported
        No preamble and ``DICM`` prefix, no group length first, or a malformed group.
    """
    if len(data) < 144 or data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise Unsupported("no Part 10 header with its group length")
    end = 144 + _U32.unpack_from(data, 140)[0]
    if end > len(data):
        raise Unsupported("file meta information cut short")
    reader = _Reader(data, True, JsonDataset(model={}))
    uids: dict[int, str] = {}
    pos = 144
    try:
        while pos < end:
            tag, vr, length, pos = reader.header(pos)
            if tag >> 16 != 0x0002 or length == UNDEFINED_LENGTH or pos + length > end:
                raise Unsupported("malformed file meta information")
            if vr == "UI":
                uids[tag] = data[pos:pos + length].decode("latin_1").rstrip("\x00 ")
            pos += length
    except (IndexError, ValueError, struct.error) as exc:
        raise Unsupported(f"{type(exc).__name__}: {exc}") from None
    return uids, end
