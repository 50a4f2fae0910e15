"""DICOM JSON (PS3.18 Annex F) to the Native DICOM Model XML (PS3.19 Annex A).

QIDO-RS and STOW-RS answer ``multipart/related; type="application/dicom+xml"`` when asked, one
part per data set (PS3.18 §8.7.3.3).
"""

from __future__ import annotations

import re
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from pydicom.datadict import keyword_for_tag

PN_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
# What XML 1.0 cannot carry, even as a character reference (XML 1.0 §2.2 Char): C0 controls
# but tab, newline and carriage return, surrogates, U+FFFE and U+FFFF. A stored value may hold
# them (pydicom decodes them as they are); each becomes U+FFFD so the document stays readable.
_NOT_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
# A carriage return is written as a reference: a parser turns a literal one into a newline.
_ENTITIES = {"\r": "&#13;"}


def _text(value: str) -> str:
    """``value`` as XML character data."""
    return escape(_NOT_XML.sub("\ufffd", value), _ENTITIES)


def _person_name(number: int, value: dict[str, str]) -> str:
    out = [f'<PersonName number="{number}">']
    for group in PN_GROUPS:
        text = value.get(group)
        if not text:
            continue
        out.append(f"<{group}>")
        for name, part in zip(PN_COMPONENTS, text.split("^"), strict=False):
            if part:
                out.append(f"<{name}>{_text(part)}</{name}>")
        out.append(f"</{group}>")
    out.append("</PersonName>")
    return "".join(out)


def _attributes(dataset: dict[str, Any]) -> str:
    out: list[str] = []
    for tag in sorted(dataset):
        element = dataset[tag]
        vr = element.get("vr", "UN")
        keyword = keyword_for_tag(int(tag, 16)) if len(tag) == 8 else ""
        head = f'<DicomAttribute tag="{tag}" vr="{vr}"'
        if keyword:
            head += f' keyword="{keyword}"'
        out.append(head + ">")
        if "BulkDataURI" in element:
            out.append(f"<BulkData uri={quoteattr(element['BulkDataURI'])}/>")
        elif "InlineBinary" in element:
            out.append(f"<InlineBinary>{_text(element['InlineBinary'])}</InlineBinary>")
        else:
            for number, value in enumerate(element.get("Value", []), start=1):
                if vr == "SQ":
                    out.append(f'<Item number="{number}">{_attributes(value)}</Item>')
                elif vr == "PN" and isinstance(value, dict):
                    out.append(_person_name(number, value))
                elif value is None:
                    out.append(f'<Value number="{number}"/>')
                else:
                    out.append(f'<Value number="{number}">{_text(str(value))}</Value>')
        out.append("</DicomAttribute>")
    return "".join(out)


def to_native_xml(dataset: dict[str, Any]) -> bytes:
    """One DICOM JSON object as a Native DICOM Model document.

    >>> xml = to_native_xml({"00100020": {"vr": "LO", "Value": ["P1"]}})
    >>> b'keyword="PatientID"><Value number="1">P1</Value></DicomAttribute>' in xml
    True
    """
    body = _attributes(dataset)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">'
        f"{body}</NativeDicomModel>"
    ).encode()
