"""Crash recovery reads each spool file within a CPU-time bound: the node always comes up.

A spool file left in ``.incoming`` is whatever arrived. One crafted to keep pydicom busy
(element headers that look valid, then a sequence of a million empty items: pydicom builds
a data set for each, 16 CPU seconds per file) would hold the DIMSE port closed at every
start. Recovery reads each file in a worker process given ``[storage] recovery_file_seconds``
of CPU, and moves what it cannot read in time to ``<data>/quarantine``.
"""

from __future__ import annotations

import io
import struct
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from gateway.storage import INCOMING
from tests.support.common import ct_dataset, part10
from tests.support.gateway_process import GatewayProcess

pytestmark = pytest.mark.slow

ITEMS = 1_000_000  # empty items of one sequence: 8 MB, about 16 CPU seconds of pydicom's
FILES = 4
# Not a measurement: far above what the bounded recovery takes (a few seconds a file: a CPU
# second, a worker started again), below what reading the files whole takes (a minute of CPU).
READY_WITHIN = 120.0


def _slow_instance(index: int) -> bytes:
    """A Part 10 file in Explicit VR Big Endian (read by pydicom alone) whose first element
    headers are plausible, then an undefined-length sequence of :data:`ITEMS` empty items."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.9.{index}"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.9"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.9.0"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    # (0008,1140) Referenced Image Sequence, before (0020,000D): tags stay ascending.
    sequence = (struct.pack(">HH", 0x0008, 0x1140) + b"SQ\0\0" + struct.pack(">I", 0xFFFFFFFF)
                + struct.pack(">HHI", 0xFFFE, 0xE000, 0) * ITEMS
                + struct.pack(">HHI", 0xFFFE, 0xE0DD, 0))
    at = data.index(struct.pack(">HH", 0x0020, 0x000D), 144)
    return data[:at] + sequence + data[at:]


def test_spool_files_that_keep_pydicom_busy_are_quarantined_and_the_node_comes_up(
        tmp_path: Path, database_url: str) -> None:
    env = {
        "GATEWAY_DATA_DIR": str(tmp_path / "data"),
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_DIMSE_PORT": "0",
        "GATEWAY_HTTP_PORT": "0",
        "GATEWAY_STORAGE_MIN_FREE_BYTES": "0",
        "GATEWAY_STORAGE_RECOVERY_FILE_SECONDS": "1",
    }
    # What a crash leaves: the slow files, and a good instance whose row was lost.
    incoming = tmp_path / "data" / "files" / INCOMING
    incoming.mkdir(parents=True)
    slow = {f"{index:016x}.part": _slow_instance(index) for index in range(FILES)}
    for name, data in slow.items():
        (incoming / name).write_bytes(data)
    good = part10(ct_dataset(0))
    (incoming / "ffffffffffffffff.part").write_bytes(good)

    started = time.monotonic()
    process = GatewayProcess(env, tmp_path / "gateway.log").start(timeout=READY_WITHIN)
    try:
        assert time.monotonic() - started < READY_WITHIN
        ae = AE(ae_title="ECHOSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", process.dimse_port, ae_title="DICOMGW")
        assert assoc.is_established
        try:
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
    finally:
        process.stop()

    quarantine = tmp_path / "data" / "quarantine"
    assert sorted(p.name for p in quarantine.iterdir()) == sorted(slow)
    for name, data in slow.items():
        assert (quarantine / name).read_bytes() == data  # moved whole, never deleted
        assert (quarantine / name).stat().st_mode & 0o777 == 0o600
    assert quarantine.stat().st_mode & 0o777 == 0o700
    log = (tmp_path / "gateway.log").read_text()
    assert "could not be read within 1 CPU seconds" in log
    assert (f"0 writes confirmed, 1 stored again, 0 unfinished writes removed, "
            f"{FILES} unreadable files moved to") in log
