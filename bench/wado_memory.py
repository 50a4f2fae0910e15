"""Resident memory of the server while a whole ~1 GB study is retrieved over WADO-RS.

Builds one study of ``--instances`` CT instances of 512x512x16 bits (~0.5 MB each; 2000 make
~1 GB), ingests it into a gateway (its ingest path, fsync off to build fast), starts the gateway
in its own process, warms it up, then retrieves the whole study
(``multipart/related; type="application/dicom"``) with a client that reads 1 MiB at a time and
keeps nothing, while the server's VmRSS is sampled every 20 ms. Reports the growth over the
warm baseline, and the same for Orthanc + DICOMweb plugin when installed (``--no-orthanc`` to
skip). Target (issue 3): growth under 100 MB.

Usage: ``python bench/wado_memory.py [--instances 2000]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import library_versions  # noqa: E402
from dicomweb_harness import (  # noqa: E402
    Server,
    gateway_env,
    gateway_server,
    orthanc_available,
    orthanc_server,
    upload_to_orthanc,
)

STUDY = "1.2.826.0.1.3680043.8.498.5151"
SERIES = f"{STUDY}.1"


def write_study(folder: Path, count: int) -> list[Path]:
    pixels = (np.arange(512 * 512, dtype=np.uint16) % 4096)
    paths = []
    for i in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = f"{SERIES}.{i + 1}"
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, f"{SERIES}.{i + 1}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
        ds.PatientID, ds.PatientName, ds.StudyDate = "PIDMEM", "MEMORY^TEST", "20260101"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, i + 1
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = (pixels + i % 7).astype(np.uint16).tobytes()
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def load_gateway(data_dir: Path, files: list[Path]) -> str:
    from concurrent.futures import ThreadPoolExecutor

    from gateway.apikeys import ApiKeys
    from gateway.config import load_settings
    from gateway.core import Gateway
    from gateway.ingest import read_part10

    settings = load_settings(environ=gateway_env(data_dir))
    settings = replace(settings, storage=replace(settings.storage, fsync=False))
    with Gateway(settings) as gateway, ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda p: gateway.ingestor.ingest(read_part10(p), source="bench"), files))
        return str(ApiKeys(gateway.index).create("bench", "dicomweb:read"))


def sample_peak(rss: Callable[[], int], stop: threading.Event, out: list[int]) -> None:
    peak = 0
    while not stop.is_set():
        peak = max(peak, rss())
        time.sleep(0.02)
    out.append(max(peak, rss()))


def retrieve(server: Server, path: str) -> tuple[int, float, int, int]:
    """Retrieve while sampling; return (bytes, seconds, baseline KiB, peak KiB)."""
    connection = server.connection()
    accept = {"Accept": 'multipart/related; type="application/dicom"', **server.headers}
    # Warm-up: one instance, so pools, caches and lazy imports are in the baseline.
    connection.request("GET", f"{server.root}/studies/{STUDY}/series/{SERIES}/instances/"
                              f"{SERIES}.1", headers=accept)
    connection.getresponse().read()
    time.sleep(0.5)
    baseline = server.rss_kib()
    stop = threading.Event()
    peaks: list[int] = []
    sampler = threading.Thread(target=sample_peak, args=(server.rss_kib, stop, peaks))
    sampler.start()
    start = time.perf_counter()
    connection.request("GET", server.root + path, headers=accept)
    response = connection.getresponse()
    assert response.status == 200, response.status
    total = 0
    while chunk := response.read(1024 * 1024):
        total += len(chunk)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    return total, seconds, baseline, peaks[0]


def report(name: str, total: int, seconds: float, baseline: int, peak: int) -> None:
    print(f"{name:<8} {total / 1e6:8.0f} MB in {seconds:5.1f} s ({total / 1e6 / seconds:6.0f} MB/s)"
          f"  RSS baseline {baseline / 1024:6.0f} MiB, peak {peak / 1024:6.0f} MiB, "
          f"growth {(peak - baseline) / 1024:6.1f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--no-orthanc", action="store_true")
    args = parser.parse_args()
    print(library_versions(), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-wado-") as tmp:
        work = Path(tmp)
        (work / "files").mkdir()
        t0 = time.perf_counter()
        files = write_study(work / "files", args.instances)
        size = sum(p.stat().st_size for p in files)
        print(f"study: {len(files)} instances, {size / 1e6:.0f} MB, written in "
              f"{time.perf_counter() - t0:.0f} s")
        t0 = time.perf_counter()
        key = load_gateway(work / "gateway", files)
        print(f"gateway: ingested in {time.perf_counter() - t0:.0f} s")
        with gateway_server(work / "gateway", key) as gw:
            report("gateway", *retrieve(gw, f"/studies/{STUDY}"))
        # The gateway keeps its own copies; the generated files are only needed by Orthanc.
        if orthanc_available() and not args.no_orthanc:
            with orthanc_server(work / "orthanc") as orthanc:
                upload_to_orthanc(orthanc, files, workers=2)
                report("orthanc", *retrieve(orthanc, f"/studies/{STUDY}"))
    print("Figures taken on a shared 2-core machine (other engineers' jobs running).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
