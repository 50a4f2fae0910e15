"""QIDO-RS and series /metadata at 10,000 studies: the gateway, and Orthanc when installed.

Builds a deterministic archive (``--studies`` studies of one or two small series each, plus one
study whose series has ``--series-size`` instances), loads the same files into the gateway
(index rows bulk inserted through ``Index.add_instance``, 500 per transaction) and into
Orthanc (REST ``POST /instances``), then times, interleaving the two servers round by round, one
client on one keep-alive connection:

* ``PatientID=`` (one patient's studies)
* ``PatientName=`` prefix wildcard (a few hundred studies)
* ``StudyDate=`` one-year range + ``ModalitiesInStudy=MR`` + ``limit=50``
* ``/studies?limit=50``
* ``/studies/{s}/series/{se}/metadata`` of the large series

Usage: ``python bench/qido.py [--studies 10000] [--series-size 1000] [--rounds 40]``.
Targets (issue 3): QIDO p95 under 50 ms; series metadata at least 5x faster than Orthanc.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import library_versions  # noqa: E402
from dicomweb_harness import (  # noqa: E402
    gateway_env,
    gateway_server,
    orthanc_available,
    orthanc_server,
    summary,
    timed_get,
    upload_to_orthanc,
)

ROOT = "1.2.826.0.1.3680043.8.498.4242"
FAMILY = ["MULLER", "SCHMIT", "WEBER", "WAGNER", "HOFFMANN", "BECKER", "KLEIN", "SCHNEIDER",
          "FISCHER", "MEYER", "THILL", "REUTER", "KIEFFER", "LENTZ", "HANSEN", "MAJERUS",
          "SCHROEDER", "WELTER", "DUPONT", "MARTIN", "BERNARD", "DUBOIS", "THOMAS", "ROBERT",
          "RICHARD", "PETIT", "DURAND", "LEROY", "MOREAU", "SIMON", "LAURENT", "LEFEBVRE"]
GIVEN = ["ANNE", "MARC", "ZOE", "JEAN", "LUC", "MARIE", "PAUL", "SOPHIE", "TOM", "LEA"]
MODALITIES = ["CT", "MR", "CR", "US", "DX", "MG", "PT", "NM"]
WEIGHTS = [30, 25, 15, 10, 10, 4, 3, 3]


def make_instance(study: str, series: str, sop: str, patient: tuple[str, str, str],
                  study_date: str, study_time: str, modality: str, accession: str,
                  number: int, size: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sop_class = MRImageStorage if modality == "MR" else CTImageStorage
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = patient
    ds.PatientSex = "O"
    ds.StudyDate, ds.StudyTime = study_date, study_time
    ds.AccessionNumber, ds.StudyID = accession, "1"
    ds.StudyDescription = f"{modality} EXAM"
    ds.ReferringPhysicianName = "WEBER^ANNE"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, number
    ds.SeriesDescription = f"{modality} SERIES"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 1.0
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = (np.arange(size * size, dtype=np.uint16) % 4096).tobytes()
    return ds


def build_archive(folder: Path, studies: int, series_size: int) -> dict[str, str]:
    """Write the archive's files; return the UIDs and values the queries use."""
    rng = random.Random(20261125)
    patients = [(f"PID{i:06d}", f"{rng.choice(FAMILY)}^{rng.choice(GIVEN)}",
                 f"{rng.randint(1930, 2010)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}")
                for i in range(max(1, studies // 2))]
    count = 0
    first_patient = None
    for s in range(studies):
        patient = patients[rng.randrange(len(patients))]
        first_patient = first_patient or patient
        study = f"{ROOT}.{s + 1}"
        date = f"{rng.randint(2015, 2026)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        time_ = f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}00"
        modalities = [rng.choices(MODALITIES, WEIGHTS)[0]]
        if rng.random() < 0.2:
            modalities.append(rng.choice([m for m in MODALITIES if m != modalities[0]]))
        for k, modality in enumerate(modalities):
            series = f"{study}.{k + 1}"
            ds = make_instance(study, series, f"{series}.1", patient, date, time_, modality,
                               f"A{s:07d}", 1, 8)
            ds.save_as(folder / f"{s:06d}_{k}.dcm", enforce_file_format=True)
            count += 1
    big_study, big_series = f"{ROOT}.999999", f"{ROOT}.999999.1"
    for i in range(series_size):
        ds = make_instance(big_study, big_series, f"{big_series}.{i + 1}",
                           ("PIDBIG", "BIG^SERIES", "19600101"), "20260101", "120000", "CT",
                           "ABIG", i + 1, 64)
        ds.save_as(folder / f"big_{i:05d}.dcm", enforce_file_format=True)
        count += 1
    assert first_patient is not None
    return {"patient_id": first_patient[0], "name_prefix": "SCHM", "big_study": big_study,
            "big_series": big_series, "files": str(count)}


def load_gateway(data_dir: Path, files: list[Path]) -> tuple[float, str]:
    """Index the files in batches of 500 rows per transaction; return (seconds, API key).

    Rows are bulk inserted through the index's own ``add_instance`` (the same rows and stored
    DICOM JSON that ingest writes), without copying the files: QIDO-RS and ``/metadata`` never
    open them, which is what this benchmark measures.
    """
    from gateway.apikeys import ApiKeys
    from gateway.config import load_settings
    from gateway.core import Gateway
    from gateway.metadata import parse_instance

    settings = load_settings(environ=gateway_env(data_dir))
    start = time.perf_counter()
    with Gateway(settings) as gateway:
        for i in range(0, len(files), 500):
            parsed = [parse_instance(p.read_bytes()) for p in files[i:i + 500]]

            def work(session, parsed=parsed):  # noqa: ANN001, ANN202
                for p in parsed:
                    relpath = (f"{p.study_instance_uid}/{p.series_instance_uid}/"
                               f"{p.sop_instance_uid}.{p.digest[:12]}.dcm")
                    gateway.index.add_instance(session, p, relpath, "bench", p.metadata_json())

            gateway.index.write(work)
        key = ApiKeys(gateway.index).create("bench", "dicomweb:read")
    return time.perf_counter() - start, str(key)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--series-size", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--no-orthanc", action="store_true")
    args = parser.parse_args()
    print(library_versions(), flush=True)
    use_orthanc = orthanc_available() and not args.no_orthanc

    with tempfile.TemporaryDirectory(prefix="bench-qido-") as tmp:
        work = Path(tmp)
        (work / "files").mkdir()
        t0 = time.perf_counter()
        info = build_archive(work / "files", args.studies, args.series_size)
        files = sorted((work / "files").iterdir())
        print(f"archive: {args.studies} studies + 1 series of {args.series_size}, "
              f"{info['files']} files, generated in {time.perf_counter() - t0:.0f} s")
        seconds, key = load_gateway(work / "gateway", files)
        print(f"gateway: loaded in {seconds:.0f} s ({len(files) / seconds:.0f} instances/s)")

        queries = {
            "PatientID": f"/studies?PatientID={info['patient_id']}",
            "PatientName wildcard": f"/studies?PatientName={info['name_prefix']}*",
            "StudyDate range + ModalitiesInStudy, limit 50":
                "/studies?StudyDate=20200101-20201231&ModalitiesInStudy=MR&limit=50",
            "all studies, limit 50": "/studies?limit=50",
            f"series metadata, {args.series_size} instances":
                f"/studies/{info['big_study']}/series/{info['big_series']}/metadata",
        }
        results: dict[str, dict[str, list[float]]] = {q: {} for q in queries}
        counts: dict[str, dict[str, int]] = {q: {} for q in queries}
        with gateway_server(work / "gateway", key) as gw:
            servers = [gw]
            if use_orthanc:
                orthanc_cm = orthanc_server(work / "orthanc")
                orthanc = orthanc_cm.__enter__()
                seconds = upload_to_orthanc(orthanc, files)
                print(f"orthanc: loaded in {seconds:.0f} s ({len(files) / seconds:.0f} "
                      "instances/s, REST POST /instances, 4 clients)")
                servers.append(orthanc)
            try:
                connections = {s.name: s.connection() for s in servers}
                for name, path in queries.items():
                    for server in servers:  # warm up, and check the answers agree
                        for _ in range(3):
                            _, status, body = timed_get(connections[server.name],
                                                        server.root + path, server.headers)
                        assert status == 200, (server.name, path, status, body[:200])
                        counts[name][server.name] = len(json.loads(body))
                        results[name][server.name] = []
                    for _ in range(args.rounds):
                        for server in servers:
                            ms, status, _ = timed_get(connections[server.name],
                                                      server.root + path, server.headers)
                            results[name][server.name].append(ms)
            finally:
                if use_orthanc:
                    orthanc_cm.__exit__(None, None, None)

    print()
    print("Figures taken on a shared 2-core machine (other engineers' jobs running): "
          "compare the ratios more than the absolute values.")
    for name in queries:
        print(f"\n{name}")
        for server, values in results[name].items():
            print(f"  {server:<8} {summary(values)}   results: {counts[name][server]}")
        if "orthanc" in results[name]:
            import statistics

            g = statistics.median(results[name]["gateway"])
            o = statistics.median(results[name]["orthanc"])
            print(f"  gateway is {o / g:.1f}x faster than Orthanc (medians)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
