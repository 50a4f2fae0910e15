"""C-FIND response identifiers encoded straight from DICOM JSON (PS3.5 Section 7.1).

A C-FIND answers one identifier per match: a few attributes with plain values (text, numbers,
person names) that the index keeps as DICOM JSON. Building a pydicom data set and running
pydicom's writer cost more than finding the match; this encoder writes the plain VRs directly in
little endian, implicit or explicit VR, and returns ``None`` for anything else (non-empty
sequences, binary values, character sets with code extensions), which the caller then encodes
with pydicom. tests/test_dimse_identifier.py holds it to pydicom's bytes.
"""

from __future__ import annotations

import struct
from typing import Any

CHARSET_KEY = "00080005"  # Specific Character Set
# Text VRs whose values are in the Specific Character Set (PS3.5 6.1.2.3); others are ASCII.
CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                        "TM", "UC", "UI", "UR", "UT"})
BINARY_NUMBERS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d",
                  "UV": "Q", "SV": "q"}
# Explicit VR elements with a 4-byte length after two reserved bytes (PS3.5 7.1.2).
LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR",
                             "UT", "UV"})
# Single-valued VRs: a backslash is part of the value, not a separator.
SINGLE_VALUED = frozenset({"LT", "ST", "UT", "UR"})
# The character sets of one code table, by Defined Term (PS3.3 C.12.1.1.2).
CODECS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf-8"}

_IMPLICIT = struct.Struct("<HHI")
_EXPLICIT_SHORT = struct.Struct("<HH2sH")
_EXPLICIT_LONG = struct.Struct("<HH2s2xI")


def encode_identifier(match: dict[str, Any], *, implicit_vr: bool) -> bytes | None:
    """A DICOM JSON identifier (PS3.18 F.2) encoded in little endian; ``None`` when it holds
    what only pydicom encodes (the caller then builds a data set and uses pydicom's writer)."""
    charset = match.get(CHARSET_KEY, {}).get("Value") or [""]
    if len(charset) != 1:  # several values: code extensions
        return None
    codec = CODECS.get(str(charset[0] or "").strip())
    if codec is None:
        return None
    parts: list[bytes] = []
    for key in sorted(match):
        element = match[key]
        vr = element.get("vr", "")
        encoded = _value(vr, element.get("Value"), codec)
        if encoded is None:
            return None
        tag = int(key, 16)
        group, number = tag >> 16, tag & 0xFFFF
        if implicit_vr:
            parts.append(_IMPLICIT.pack(group, number, len(encoded)))
        elif vr in LONG_LENGTH_VRS:
            parts.append(_EXPLICIT_LONG.pack(group, number, vr.encode(), len(encoded)))
        else:
            if len(encoded) > 0xFFFF:
                return None
            parts.append(_EXPLICIT_SHORT.pack(group, number, vr.encode(), len(encoded)))
        parts.append(encoded)
    return b"".join(parts)


def person_name(value: Any) -> str:
    """A PN value of DICOM JSON (its component groups) in its DICOM string form."""
    if not isinstance(value, dict):
        return "" if value is None else str(value)
    groups = [value.get("Alphabetic", ""), value.get("Ideographic", ""),
              value.get("Phonetic", "")]
    return "=".join(groups).rstrip("=")


def _value(vr: str, values: list[Any] | None, codec: str) -> bytes | None:
    if not values:
        return b""
    if vr in STRING_VRS:
        if len(values) > 1 and vr in SINGLE_VALUED:
            return None
        texts = []
        for value in values:
            if value is None:
                texts.append("")
            elif vr == "PN":
                texts.append(person_name(value))
            elif isinstance(value, str):
                texts.append(value)
            elif isinstance(value, int | float) and not isinstance(value, bool) \
                    and vr in ("DS", "IS"):
                text = str(value)
                if len(text) > 16:
                    return None
                texts.append(text)
            else:
                return None
        try:
            raw = "\\".join(texts).encode(codec if vr in CHARSET_VRS else "ascii")
        except UnicodeEncodeError:
            return None
        if len(raw) % 2:
            raw += b"\x00" if vr == "UI" else b" "
        return raw
    fmt = BINARY_NUMBERS.get(vr)
    if fmt is not None:
        try:
            return struct.pack(f"<{len(values)}{fmt}", *values)
        except struct.error:
            return None
    return None
