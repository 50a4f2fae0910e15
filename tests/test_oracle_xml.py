"""Oracle for the hand-written Native DICOM Model XML (:mod:`dicomweb.xml`): every document is
valid against the PS3.19 Annex A.1.6 schema (tests/native_dicom_model.rnc, checked by lxml's
RELAX NG validator) and carries, value for value, the DICOM JSON it was made from (pydicom's
``to_json_dict`` of seeded random data sets: every VR, sequences, multi-valued and empty values,
person names with three groups, bulk data URIs, inline binary, private tags, XML's special and
non-ASCII characters)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from pydicom import Dataset
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement

from dicomweb.xml import to_native_xml

CASES = 300
NS = "{http://dicom.nema.org/PS3.19/models/NativeDICOM}"
SCHEMA = etree.RelaxNG.from_rnc_string(
    (Path(__file__).parent / "native_dicom_model.rnc").read_text())
PN_PARTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
ALPHABET = "abcXYZ 019-.<>&\"'éßЖ山田"
# A tag of each VR (PS3.6), public where the dictionary has one.
TAGS = {
    "AE": 0x00080054, "AS": 0x00101010, "AT": 0x00209165, "CS": 0x00080060, "DA": 0x00080020,
    "DS": 0x00281050, "DT": 0x0008002A, "FL": 0x00189306, "FD": 0x00189087, "IS": 0x00200013,
    "LO": 0x00100020, "LT": 0x00204000, "OB": 0x00420011, "OD": 0x00720067, "OF": 0x00720069,
    "OL": 0x00720075, "OV": 0x00720083, "OW": 0x00660023, "PN": 0x00100010, "SH": 0x00080050,
    "SL": 0x00186020, "SQ": 0x00081115, "SS": 0x00189219, "ST": 0x00081030, "SV": 0x00720082,
    "TM": 0x00080030, "UC": 0x00080119, "UI": 0x0020000D, "UL": 0x00081161, "UN": 0x00291010,
    "UR": 0x00080120, "US": 0x00280010, "UT": 0x00189914, "UV": 0x00720081,
}
BINARY = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}


def text(rng: random.Random, size: int = 12) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, size))).strip() or "x"


def value(rng: random.Random, vr: str) -> Any:
    """One value of ``vr`` as pydicom takes it."""
    if vr in ("US", "UL", "UV"):
        return rng.randint(0, {"US": 0xFFFF, "UL": 0xFFFFFFFF, "UV": 2 ** 64 - 1}[vr])
    if vr in ("SS", "SL", "SV"):
        bits = {"SS": 15, "SL": 31, "SV": 63}[vr]
        return rng.randint(-(2 ** bits), 2 ** bits - 1)
    if vr in ("FL", "FD"):
        return rng.choice([0.0, 1.5, -2.25, 1e-7, 12345.5, float(rng.randint(-99, 99))])
    if vr == "DS":
        return rng.choice(["0", "1.5", "-2.25", "1e-07", "12345.5", str(rng.randint(-99, 99))])
    if vr == "IS":
        return str(rng.randint(-(2 ** 31), 2 ** 31 - 1))
    if vr == "AT":
        return rng.choice([0x00100010, 0x0020000D, 0x7FE00010])
    if vr == "UI":
        return "1.2." + ".".join(str(rng.randint(0, 99999)) for _ in range(rng.randint(1, 8)))
    if vr == "DA":
        return f"{rng.randint(1900, 2099)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    if vr == "TM":
        return f"{rng.randint(0, 23):02d}{rng.randint(0, 59):02d}{rng.randint(0, 59):02d}"
    if vr == "DT":
        return f"2024{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}101530.5+0100"
    if vr == "AS":
        return f"{rng.randint(0, 999):03d}{rng.choice('DWMY')}"
    if vr in ("AE", "CS"):
        return "".join(rng.choice("ABC_019 ") for _ in range(rng.randint(1, 16))).strip() or "A"
    if vr == "UR":
        return rng.choice(["http://example.org/a?b=c&d=e", "urn:oid:1.2.3", "https://x.test/é"])
    if vr == "PN":
        groups = ["^".join(text(rng, 6) if rng.random() < 0.7 else ""
                           for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        groups[0] = text(rng, 6) + groups[0]  # pydicom's JSON needs an alphabetic name
        return "=".join(groups)
    return text(rng, 60 if vr in ("LT", "ST", "UT", "UC") else 12)


def dataset(rng: random.Random, depth: int = 0) -> Dataset:
    ds = Dataset()
    for vr in rng.sample(sorted(TAGS), rng.randint(3, len(TAGS))):
        tag = TAGS[vr]
        if vr == "SQ":
            if depth < 2:
                ds.add_new(tag, vr, [dataset(rng, depth + 1) for _ in range(rng.randint(0, 3))])
            continue
        if vr in BINARY:
            ds.add_new(tag, vr, rng.randbytes(rng.choice([0, 2, 8, 64, 2048])))
            continue
        if rng.random() < 0.1:
            ds.add_new(tag, vr, None)  # an empty attribute
            continue
        count = rng.choice([1, 1, 2, 3]) if vr not in ("LT", "ST", "UT", "UR") else 1
        values = [value(rng, vr) for _ in range(count)]
        if vr in ("LO", "SH", "CS") and count > 1 and rng.random() < 0.3:
            values[1] = ""  # an empty value among others
        ds.add_new(tag, vr, values if count > 1 else values[0])
    if rng.random() < 0.5:  # a private block
        ds.add_new(0x00090010, "LO", "ORACLE CREATOR")
        ds.add_new(0x00091001, "LO", text(rng))
        ds.add_new(0x00091002, "US", rng.randint(0, 9))
    return ds


def bulk_data_uri(element: DataElement) -> str:
    return f"http://127.0.0.1/bulk/{element.tag:08X}?a=1&b=2"


def dicom_json(rng: random.Random) -> dict[str, Any]:
    ds = dataset(rng)
    threshold = rng.choice([1, 64, 4096])
    json_dict: dict[str, Any] = ds.to_json_dict(bulk_data_threshold=threshold,
                                                bulk_data_element_handler=bulk_data_uri)
    return json_dict


def values_of(attribute: Any, vr: str) -> dict[str, Any]:
    """What one DicomAttribute holds, in the shape of its DICOM JSON (PS3.18 F.2)."""
    out: dict[str, Any] = {"vr": vr}
    bulk = attribute.find(f"{NS}BulkData")
    inline = attribute.find(f"{NS}InlineBinary")
    if bulk is not None:
        out["BulkDataURI"] = bulk.get("uri")
        return out
    if inline is not None:
        out["InlineBinary"] = inline.text or ""
        return out
    children = list(attribute)
    if not children:
        return out
    numbers = [int(child.get("number")) for child in children]
    assert numbers == list(range(1, len(children) + 1)), numbers
    parsed: list[Any] = []
    for child in children:
        if child.tag == f"{NS}Item":
            parsed.append(attributes_of(child))
        elif child.tag == f"{NS}PersonName":
            name = {}
            for group in child:
                parts = {part.tag[len(NS):]: part.text or "" for part in group}
                name[group.tag[len(NS):]] = "^".join(parts.get(p, "") for p in PN_PARTS)
            parsed.append(name)
        else:
            assert child.tag == f"{NS}Value"
            parsed.append(child.text or "")
    out["Value"] = parsed
    return out


def attributes_of(parent: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for attribute in parent:
        assert attribute.tag == f"{NS}DicomAttribute"
        tag, vr = attribute.get("tag"), attribute.get("vr")
        assert attribute.get("keyword", "") == keyword_for_tag(int(tag, 16)), tag
        found[tag] = values_of(attribute, vr)
    assert list(found) == sorted(found), "attributes in ascending tag order"
    return found


def normalised(json_dataset: dict[str, Any]) -> dict[str, Any]:
    """The DICOM JSON as the XML can say it: values as text, a null value as an empty one,
    an empty sequence as no item, person name groups without trailing empty components."""
    out: dict[str, Any] = {}
    for tag, element in json_dataset.items():
        entry = {k: v for k, v in element.items() if k != "Value"}
        if element.get("Value"):  # an empty list is an empty attribute
            values: list[Any] = []
            for item in element["Value"]:
                if element["vr"] == "SQ":
                    values.append(normalised(item))
                elif element["vr"] == "PN" and isinstance(item, dict):
                    values.append({group: _trimmed(text) for group, text in item.items()
                                   if text})
                else:
                    values.append("" if item is None else str(item))
            entry["Value"] = values
        out[tag] = entry
    return out


def _trimmed(name: str) -> str:
    return name.rstrip("^")


def test_the_xml_is_valid_and_says_what_the_json_says() -> None:
    for seed in range(CASES):
        rng = random.Random(seed)
        source = dicom_json(rng)
        document = to_native_xml(source)
        root = etree.fromstring(document)
        assert SCHEMA.validate(root), (seed, str(SCHEMA.error_log))
        assert root.tag == f"{NS}NativeDicomModel"
        found = attributes_of(root)
        for element in _walk(found):
            if "Value" in element and element["vr"] == "PN":
                element["Value"] = [{g: _trimmed(t) for g, t in v.items()} if isinstance(v, dict)
                                    else v for v in element["Value"]]
        assert found == normalised(source), seed


def _walk(dataset: dict[str, Any]) -> list[dict[str, Any]]:
    elements = list(dataset.values())
    for element in list(elements):
        if element["vr"] == "SQ":
            for item in element.get("Value", []):
                elements += _walk(item)
    return elements


@pytest.mark.parametrize("character", ["\x01", "\x0b", "\x1f", "\ufffe"])
def test_a_character_xml_cannot_carry_still_gives_a_valid_document(character: str) -> None:
    """XML 1.0 has no way to write C0 controls other than tab, newline and carriage return
    (XML 1.0 §2.2), even as character references; a stored value holding one must not make
    the whole response unreadable."""
    source = {"00104000": {"vr": "LT", "Value": [f"a{character}b"]},
              "00100010": {"vr": "PN", "Value": [{"Alphabetic": f"Doe{character}^John"}]}}
    root = etree.fromstring(to_native_xml(source))
    assert SCHEMA.validate(root), str(SCHEMA.error_log)
    assert root.findtext(f"{NS}DicomAttribute/{NS}Value") == "a\ufffdb"
    name = root.find(f"{NS}DicomAttribute/{NS}PersonName/{NS}Alphabetic/{NS}FamilyName")
    assert name is not None and name.text == "Doe\ufffd"


def test_carriage_returns_and_tabs_survive_the_parser() -> None:
    """A parser turns a literal carriage return into a newline (XML 1.0 §2.11); a report's
    line ends must come back as they were."""
    report = "line 1\r\nline 2\r\tindented\r"
    root = etree.fromstring(to_native_xml({"00104000": {"vr": "LT", "Value": [report]}}))
    assert root.findtext(f"{NS}DicomAttribute/{NS}Value") == report
