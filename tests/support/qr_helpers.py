"""Helpers of the Query/Retrieve tests: settings with peers and destinations, a study in the
archive, and a real pynetdicom Storage SCP that keeps what it receives."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt

from gateway.config import Settings
from gateway.core import Gateway
from sample_dicom.generator import SeriesSpec, StudySpec, generate_study
from tests.support.common import make_settings, part10

ALL_SYNTAXES = [
    "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.5",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def qr_settings(tmp_path: Path, database_url: str, *,
                destinations: Mapping[str, Mapping[str, Any]] | None = None,
                peers: Mapping[str, Mapping[str, Any]] | None = None,
                dimse: Mapping[str, Any] | None = None, **env: str) -> Settings:
    """Settings with ``[dimse.destinations]`` and ``[dimse.peers]`` written as TOML."""
    lines = ["[dimse]"]
    for key, value in (dimse or {}).items():
        lines.append(f"{key} = {toml_value(value)}")
    for table, entries in (("destinations", destinations), ("peers", peers)):
        if entries:
            lines.append(f"[dimse.{table}]")
        for ae, values in (entries or {}).items():
            inner = ", ".join(f"{k} = {toml_value(v)}" for k, v in values.items())
            lines.append(f'"{ae}" = {{ {inner} }}')
    config = tmp_path / "gateway.toml"
    config.write_text("\n".join(lines) + "\n")
    return make_settings(tmp_path, database_url, GATEWAY_CONFIG=str(config), **env)


def two_series_spec(patient_id: str = "LU0000001", **kwargs: Any) -> StudySpec:
    return StudySpec(
        patient_id=patient_id,
        series=(
            SeriesSpec(instances=3, rows=32, columns=32),
            SeriesSpec(description="Kopf Knochen", instances=2, rows=32, columns=32,
                       transfer_syntax="1.2.840.10008.1.2.4.90"),
        ),
        key_object=False,
        **kwargs,
    )


def ingest_datasets(gateway: Gateway, datasets: Iterable[Dataset]) -> list[bytes]:
    """Ingest data sets as Part 10 files; return the files' bytes, in order."""
    files = []
    for ds in datasets:
        data = part10(ds)
        gateway.ingestor.ingest(data, source="test")
        files.append(data)
    return files


def load_study(gateway: Gateway, spec: StudySpec | None = None, seed: int = 0) -> list[Dataset]:
    """Generate a study (sample_dicom), ingest it, and return its data sets as stored."""
    datasets = generate_study(spec or two_series_spec(), seed=seed)
    files = ingest_datasets(gateway, datasets)
    return [dcmread(io.BytesIO(f)) for f in files]


@dataclass
class Received:
    """What a Storage SCP received: the data set bytes as sent and their transfer syntax."""

    transfer_syntax: str
    dataset: Dataset
    calling_ae: str
    move_originator: str | None
    move_originator_message_id: int | None = None


@dataclass
class StoreSCP:
    """A pynetdicom Storage SCP on 127.0.0.1 keeping every received instance."""

    ae_title: str = "STORESCP"
    syntaxes: list[str] = field(default_factory=lambda: list(ALL_SYNTAXES))
    delay: float = 0.0
    received: dict[str, Received] = field(default_factory=dict)
    port: int = 0
    _server: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def handle_store(self, event: Any) -> int:
        if self.delay:
            time.sleep(self.delay)
        ds = event.dataset
        ds.file_meta = event.file_meta
        originator = event.request.MoveOriginatorApplicationEntityTitle
        originator_id = event.request.MoveOriginatorMessageID
        with self._lock:
            self.received[str(ds.SOPInstanceUID)] = Received(
                str(event.context.transfer_syntax), ds,
                str(event.assoc.requestor.ae_title).strip(),
                originator.strip() if isinstance(originator, str) else None,
                int(originator_id) if originator_id is not None else None,
            )
        return 0x0000

    def start(self) -> StoreSCP:
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context("1.2.840.10008.1.1")  # Verification, as every Storage SCP
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, self.syntaxes)
        self._server = ae.start_server(("127.0.0.1", 0), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self.handle_store)])
        self.port = int(self._server.server_address[1])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


@contextmanager
def store_scp(**kwargs: Any) -> Iterator[StoreSCP]:
    scp = StoreSCP(**kwargs).start()
    try:
        yield scp
    finally:
        scp.stop()


def identifier(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def pixel_bytes(ds: Dataset) -> bytes:
    return bytes(ds.PixelData)


def _items(*items: Mapping[str, str]) -> list[Dataset]:
    out = []
    for keys in items:
        item = Dataset()
        for keyword, value in keys.items():
            setattr(item, keyword, value)
        out.append(item)
    return out


def load_sequence_studies(gateway: Gateway) -> list[list[Dataset]]:
    """Two studies whose instances carry the matchable sequences (PS3.4 C.2.2.2.6).

    Study 0 (accession SEQ1): ProcedureCodeSequence CTHEAD, IssuerOfAccessionNumberSequence
    HOSP_A; its CT series has RequestAttributesSequence items SPS1/RP1 and SPS1B/RP1B, its MR
    series one item SPS2/RP2. Study 1 (SEQ2): ProcedureCodeSequence MRKNEE, and its one series
    has no RequestAttributesSequence.
    """
    specs = [
        StudySpec(patient_id="SQ0000001", accession_number="SEQ1", key_object=False,
                  series=(SeriesSpec(modality="CT", instances=2, rows=16, columns=16),
                          SeriesSpec(modality="MR", instances=1, rows=16, columns=16))),
        StudySpec(patient_id="SQ0000002", accession_number="SEQ2", key_object=False,
                  series=(SeriesSpec(modality="MR", instances=1, rows=16, columns=16),)),
    ]
    requests = {
        (0, "CT"): _items({"ScheduledProcedureStepID": "SPS1", "RequestedProcedureID": "RP1",
                           "AccessionNumber": "SEQ1"},
                          {"ScheduledProcedureStepID": "SPS1B", "RequestedProcedureID": "RP1B"}),
        (0, "MR"): _items({"ScheduledProcedureStepID": "SPS2", "RequestedProcedureID": "RP2"}),
    }
    procedures = [
        _items({"CodeValue": "CTHEAD", "CodingSchemeDesignator": "LOCAL",
                "CodeMeaning": "CT Head"}),
        _items({"CodeValue": "MRKNEE", "CodingSchemeDesignator": "LOCAL",
                "CodeMeaning": "MR Knee"}),
    ]
    studies = []
    for n, spec in enumerate(specs):
        datasets = generate_study(spec, seed=100 + n)
        for ds in datasets:
            ds.ProcedureCodeSequence = procedures[n]
            if n == 0:
                ds.IssuerOfAccessionNumberSequence = _items({"LocalNamespaceEntityID": "HOSP_A"})
            if (n, ds.Modality) in requests:
                ds.RequestAttributesSequence = requests[(n, ds.Modality)]
        files = ingest_datasets(gateway, datasets)
        studies.append([dcmread(io.BytesIO(f)) for f in files])
    return studies
