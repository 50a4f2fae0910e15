"""Helpers shared by the tests: settings of a test gateway, a live server, small data sets."""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import threading
from pathlib import Path
from typing import Any

from pydicom import Dataset

from gateway.config import Settings, load_settings
from gateway.core import Gateway
from gateway.s3 import S3Storage
from gateway.storage import FileStorage

_SQLITE_TEMPLATE: list[bytes] = []
# GATEWAY_TEST_S3=1: every gateway made by make_settings keeps its instances in a SeaweedFS
# bucket (a prefix of its own) instead of files: the suites run again on the S3 back end.
S3_RUN = os.environ.get("GATEWAY_TEST_S3", "") not in ("", "0")
_S3_STORE: list[Any] = []


def s3_store() -> Any:
    """The test process's SeaweedFS (:mod:`tests.support.seaweedfs`), started at first use."""
    if not _S3_STORE:
        import atexit
        import tempfile

        from tests.support.seaweedfs import SeaweedFS

        store = SeaweedFS(Path(tempfile.mkdtemp(prefix="seaweedfs-"))).start()
        atexit.register(store.stop)
        os.environ.update({k: v for k, v in store.env("").items() if k.startswith("AWS_")})
        _S3_STORE.append(store)
    return _S3_STORE[0]


def sqlite_template() -> bytes:
    """A SQLite index migrated to the newest revision, made once per test process."""
    if not _SQLITE_TEMPLATE:
        import tempfile

        from gateway.index import Index

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "index.sqlite"
            index = Index(f"sqlite:///{path}")
            index.upgrade()
            index.close()
            assert not path.with_name("index.sqlite-wal").exists(), "the log is not merged"
            _SQLITE_TEMPLATE.append(path.read_bytes())
    return _SQLITE_TEMPLATE[0]


def seed_sqlite(database_url: str) -> None:
    """Start a SQLite index that does not exist yet from the migrated template, so that a
    test's gateway does not run every migration again (~0.1 s a test). An existing file (a
    migration test's older schema) is left as it is."""
    if not database_url.startswith("sqlite:///"):
        return
    path = Path(database_url.removeprefix("sqlite:///"))
    if path.exists() or not path.parent.is_dir():
        return
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as f:
        f.write(sqlite_template())


def make_settings(tmp_path: Path, database_url: str, **env: str) -> Settings:
    """Settings of a gateway on ``database_url`` (a new SQLite index starts migrated, from
    :func:`seed_sqlite`) with its data folder in ``tmp_path``, both ports chosen by the OS."""
    seed_sqlite(database_url)
    environ = {
        "GATEWAY_DATA_DIR": str(tmp_path / "data"),
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_DIMSE_PORT": "0",
        "GATEWAY_HTTP_PORT": "0",
        "GATEWAY_STORAGE_MIN_FREE_BYTES": "0",
        **(s3_store().env(f"t{secrets.token_hex(6)}") if S3_RUN else {}),
        **env,
    }
    return load_settings(environ=environ)


class LiveServer:
    """A gateway's DIMSE and HTTP listeners running on a background event loop."""

    def __init__(self, gateway: Gateway) -> None:
        from gateway.server import Server

        self.gateway = gateway
        self.server = Server(gateway)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    @property
    def dimse_port(self) -> int:
        assert self.server.dimse_port is not None
        return self.server.dimse_port

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    @property
    def ae_title(self) -> str:
        return self.gateway.settings.dimse.ae_title


def part10(ds: Dataset, **kwargs: Any) -> bytes:
    """Encode a data set as a Part 10 file in memory."""
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True, **kwargs)
    return out.getvalue()


def ct_dataset(index: int = 0, *, study: str = "1.2.826.0.1.3680043.8.498.1",
               series: str | None = None, rows: int = 64) -> Dataset:
    """A small, valid CT Image Storage data set with predictable UIDs."""
    import numpy as np
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    series = series or f"{study}.1"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = f"{series}.{index + 1}"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = f"{series}.{index + 1}"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientName = "Müller^Zoé"
    ds.PatientID = "PAT-001"
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "F"
    ds.StudyDate = "20260105"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC-001"
    ds.ReferringPhysicianName = "Schmit^Marc"
    ds.StudyID = "1"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.Rows = rows
    ds.Columns = rows
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = (np.arange(rows * rows, dtype=np.uint16) % 4096 + index).astype(
        np.uint16).tobytes()
    return ds


def only_ready_spool_files(incoming: Path) -> bool:
    """Whether ``.incoming`` holds nothing but spool files made ahead: empty, linked nowhere
    else, kept for the next writes (and the next process)."""
    return all(p.suffix == ".part" and p.stat().st_size == 0 and p.stat().st_nlink == 1
               for p in incoming.iterdir())


def study_counts(gateway: Gateway, study_uid: str) -> tuple[int, int, str]:
    """NumberOfStudyRelatedSeries, NumberOfStudyRelatedInstances and ModalitiesInStudy of a
    study, as a study-level query returns them."""
    from gateway.access import DEMO_PRINCIPAL
    from gateway.query import Query, QueryEngine

    query = Query.from_identifier("STUDY", {
        "StudyInstanceUID": study_uid, "NumberOfStudyRelatedSeries": "",
        "NumberOfStudyRelatedInstances": "", "ModalitiesInStudy": ""})
    (match,) = QueryEngine(gateway.index, max_results=0).search(query, DEMO_PRINCIPAL).matches
    return (match["00201206"]["Value"][0], match["00201208"]["Value"][0],
            "\\".join(match["00080061"].get("Value", [])))


def stored_relpaths(gateway: Gateway) -> list[str]:
    """The instances kept by the gateway's blob store, as relative paths: the files under
    its folder (spool files aside), or the objects under its bucket prefix."""
    storage = gateway.storage
    if isinstance(storage, FileStorage):
        root = storage.root
        return sorted(str(p.relative_to(root)) for p in root.rglob("*.dcm")
                      if ".incoming" not in p.parts)
    assert isinstance(storage, S3Storage)
    import obstore

    return sorted(relpath for batch in obstore.list(storage.store, prefix=storage.prefix or None)
                  for meta in batch if (relpath := storage.relpath_of(meta["path"])))

