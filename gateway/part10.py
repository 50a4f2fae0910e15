"""The DICOM Part 10 file header (PS3.10 §7.1): preamble, prefix and File Meta Information.

Built directly (a few fixed elements) rather than through a generic encoder: it is written for
every received C-STORE, ahead of the data set bytes kept exactly as they arrived.
"""

from __future__ import annotations

import struct

from gateway import __version__

# The gateway's Implementation Class UID (a UUID-derived UID, PS3.5 B.2).
IMPLEMENTATION_CLASS_UID = "2.25.277795835720665511339390118808545271789"
IMPLEMENTATION_VERSION_NAME = f"DICOMGW_{__version__}"[:16]
PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _text(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")  # a non-ASCII UID then fails validation
    return raw + pad if len(raw) % 2 else raw


def file_meta_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                     source_ae_title: str | None = None) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group, explicit VR little endian.

    >>> header = file_meta_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1")
    >>> header[128:132], len(header) % 2
    (b'DICM', 0)
    """
    elements = [
        _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, 0x0002, b"UI", _text(sop_class_uid, b"\x00")),
        _element(0x0002, 0x0003, b"UI", _text(sop_instance_uid, b"\x00")),
        _element(0x0002, 0x0010, b"UI", _text(transfer_syntax_uid, b"\x00")),
        _element(0x0002, 0x0012, b"UI", _text(IMPLEMENTATION_CLASS_UID, b"\x00")),
        _element(0x0002, 0x0013, b"SH", _text(IMPLEMENTATION_VERSION_NAME, b" ")),
    ]
    if source_ae_title:
        elements.append(_element(0x0002, 0x0016, b"AE", _text(source_ae_title.strip(), b" ")))
    body = b"".join(elements)
    return PREAMBLE + _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body
