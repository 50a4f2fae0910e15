"""The core ingest path's cost per instance, in process: no network, no DIMSE, no server.

Stores ``--count`` tiny CT instances (64x64) of one series through ``Ingestor.ingest`` in a
temporary data folder (SQLite) and prints the wall-clock and CPU time per instance. Run it
from two checkouts to tell whether a difference seen over C-STORE (``bench/store.py``) comes
from the core or from the transport:

    PYTHONPATH=. .venv/bin/python bench/ingest_cost.py
    (cd ../before && PYTHONPATH=. ../main/.venv/bin/python ../main/bench/ingest_cost.py)
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import library_versions  # noqa: E402

from gateway.config import load_settings  # noqa: E402
from gateway.core import Gateway  # noqa: E402

STUDY = "1.2.826.0.1.3680043.8.498.5150"
SERIES = f"{STUDY}.1"


def tiny_instance(index: int) -> bytes:
    """One 64x64 CT instance of the benchmark's series, as a Part 10 file."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    uid = f"{SERIES}.{index + 1}"
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    ds.PatientName, ds.PatientID, ds.StudyDate, ds.Modality = "BENCH^ONE", "P1", "20240101", "CT"
    ds.SeriesNumber, ds.InstanceNumber = 1, index + 1
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(4096, dtype=np.uint16) + index).astype(np.uint16).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000)
    args = parser.parse_args()
    print(library_versions())
    files = [tiny_instance(i) for i in range(args.count)]
    data_dir = tempfile.mkdtemp(prefix="bench-ingest-")
    settings = load_settings(environ={"GATEWAY_DATA_DIR": data_dir,
                                      "GATEWAY_STORAGE_MIN_FREE_BYTES": "0"})
    try:
        with Gateway(settings) as gateway:
            gateway.ingestor.ingest(files[0], source="bench")  # the series' rows, made once
            wall, cpu = time.perf_counter(), time.process_time()
            for data in files[1:]:
                gateway.ingestor.ingest(data, source="dimse:BENCH@127.0.0.1")
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    n = len(files) - 1
    print(f"{n} tiny instances: {wall / n * 1e3:.3f} ms wall, {cpu / n * 1e3:.3f} ms CPU "
          "per instance (all threads of the process)")


if __name__ == "__main__":
    main()
