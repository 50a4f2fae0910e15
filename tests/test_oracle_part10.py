"""Oracle for the hand-written Part 10 header (:mod:`gateway.part10`): byte for byte what
pydicom writes for the same File Meta Information (``write_file_meta_info``, PS3.10 §7.1), and
read back by ``dcmread`` as the values given, on many seeded random inputs."""

from __future__ import annotations

import random
import string
import zlib
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from gateway.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, file_meta_header

CASES = 500
SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99",
            "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90",
            "1.2.840.10008.1.2.5"]
AE_CHARACTERS = "".join(c for c in string.printable[:95] if c != "\\")


def uid(rng: random.Random) -> str:
    parts = ["1", "2"]
    while True:
        part = str(rng.randint(0, 10 ** rng.randint(1, 12)))
        if len(".".join([*parts, part])) > 64:
            return ".".join(parts)
        parts.append(part)
        if rng.random() < 0.2:
            return ".".join(parts)


def deflated_empty(syntax: str) -> bytes:
    """An empty data set: no bytes, or an empty deflate stream (PS3.5 A.5)."""
    if syntax != "1.2.840.10008.1.2.1.99":
        return b""
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(b"") + compressor.flush()


def pydicom_header(sop_class: str, sop_instance: str, syntax: str, ae_title: str | None) -> bytes:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if ae_title:
        meta.SourceApplicationEntityTitle = ae_title.strip()
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_file_meta_info(out, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + out.getvalue()


def test_the_header_is_what_pydicom_writes() -> None:
    for seed in range(CASES):
        rng = random.Random(seed)
        sop_class, sop_instance, syntax = uid(rng), uid(rng), rng.choice(SYNTAXES)
        ae_title = None if rng.random() < 0.3 else "".join(
            rng.choice(AE_CHARACTERS) for _ in range(rng.randint(1, 16)))
        ours = file_meta_header(sop_class, sop_instance, syntax, ae_title)
        assert ours == pydicom_header(sop_class, sop_instance, syntax, ae_title), (
            sop_class, sop_instance, syntax, ae_title)
        # and pydicom reads back what was given (an empty data set follows)
        meta = dcmread(BytesIO(ours + deflated_empty(syntax))).file_meta
        assert (meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID,
                meta.TransferSyntaxUID) == (sop_class, sop_instance, syntax)
        assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        if ae_title and ae_title.strip():
            assert meta.SourceApplicationEntityTitle == ae_title.strip()
