"""Helpers for the DICOMweb tests: a small corpus, clients, raw HTTP and multipart parsing."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset
from pydicom.uid import ImplicitVRLittleEndian, MRImageStorage

from gateway.access import AccessPolicy, Principal
from gateway.apikeys import ApiKeys
from gateway.core import Gateway
from tests.support.common import ct_dataset, part10

ROOT = "1.2.826.0.1.3680043.8.498.77"


@dataclass
class Corpus:
    """Three patients, three studies, four series, nine instances (UIDs below)."""

    study_a: str = f"{ROOT}.1"
    study_b: str = f"{ROOT}.2"
    study_c: str = f"{ROOT}.3"
    series_a_ct: str = f"{ROOT}.1.1"
    series_a_mr: str = f"{ROOT}.1.2"
    series_b_mr: str = f"{ROOT}.2.1"
    series_c_ct: str = f"{ROOT}.3.1"
    datasets: list[Dataset] = field(default_factory=list)

    def instances(self, series: str) -> list[str]:
        return [str(d.SOPInstanceUID) for d in self.datasets if d.SeriesInstanceUID == series]


def build_corpus() -> Corpus:
    c = Corpus()
    out: list[Dataset] = []
    for i in range(3):  # study A, CT series: Müller^Zoé, 2026-01-05 10:15
        ds = ct_dataset(i, study=c.study_a, series=c.series_a_ct)
        ds.StudyDescription = "CT HEAD"
        out.append(ds)
    for i in range(2):  # study A, MR series
        ds = ct_dataset(i, study=c.study_a, series=c.series_a_mr)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.Modality = "MR"
        ds.SeriesNumber = 2
        ds.StudyDescription = "CT HEAD"
        out.append(ds)
    for i in range(2):  # study B: Doe^John, 2025-01-01 08:00, MR
        ds = ct_dataset(i, study=c.study_b, series=c.series_b_mr)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^John", "P-002", "19700202"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20250101", "080000", "ACC-002"
        ds.Modality, ds.ReferringPhysicianName, ds.StudyID = "MR", "Weber^Anne", "2"
        ds.StudyDescription = "MR KNEE"
        out.append(ds)
    for i in range(2):  # study C: Dupont^Jean-Luc, 2024-06-15 14:30, CT stored implicit VR
        ds = ct_dataset(i, study=c.study_c, series=c.series_c_ct)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Dupont^Jean Luc", "P-003", ""
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240615", "143000", "ACC-003"
        ds.StudyID, ds.StudyDescription = "3", "CT CHEST"
        out.append(ds)
    c.datasets = out
    return c


def load_corpus(gateway: Gateway) -> Corpus:
    corpus = build_corpus()
    for ds in corpus.datasets:
        implicit = ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        gateway.ingestor.ingest(part10(ds, implicit_vr=implicit, little_endian=True)
                                if implicit else part10(ds), source="test")
    return corpus


def api_key(gateway: Gateway, name: str, scopes: str) -> str:
    return str(ApiKeys(gateway.index).create(name, scopes))


def client(http_url: str, token: str | None = None) -> DICOMwebClient:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return DICOMwebClient(url=http_url + "/dicomweb", headers=headers)


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes


def raw(url: str, method: str = "GET", headers: dict[str, str] | None = None,
        body: bytes | None = None) -> Reply:
    """One HTTP request with urllib; errors are returned, not raised."""
    request = urllib.request.Request(url, method=method, headers=headers or {}, data=body)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Reply(exc.code, exc.headers, exc.read())


def parse_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart body by the RFC 2046 grammar, strictly (for framing assertions)."""
    params = dict(p.strip().split("=", 1) for p in content_type.split(";")[1:] if "=" in p)
    boundary = params["boundary"].strip('"').encode()
    delimiter = b"--" + boundary
    assert body.endswith(delimiter + b"--\r\n"), "missing or malformed closing delimiter"
    assert body.startswith(delimiter + b"\r\n"), "body must start with the first delimiter"
    chunks = body[: -len(delimiter + b"--\r\n")].split(b"\r\n" + delimiter + b"\r\n")
    chunks[0] = chunks[0][len(delimiter + b"\r\n"):]
    last = chunks[-1]
    assert last.endswith(b"\r\n"), "each part ends with CRLF before the next delimiter"
    chunks[-1] = last[:-2]
    parts = []
    for chunk in chunks:
        head, _, content = chunk.partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts


def multipart_body(parts: list[tuple[str, bytes]], boundary: str = "XyZzYboundary") -> bytes:
    out = b""
    for content_type, data in parts:
        out += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


class StaticSessions:
    """An :class:`AccessPolicy` with fixed sessions (the shape ``viewer_links`` implements)."""

    cookie_name = "gw_session"

    def __init__(self, sessions: dict[str, Principal]) -> None:
        self.sessions = sessions
        self.calls: list[tuple[str, str]] = []

    def principal_for_session(self, session_id: str, address: str) -> Principal | None:
        self.calls.append((session_id, address))
        return self.sessions.get(session_id)


@contextmanager
def serve(gateway: Gateway, policy: AccessPolicy) -> Iterator[str]:
    """The gateway's HTTP app with ``policy`` injected, on 127.0.0.1; yields its base URL."""
    from gateway.server import create_app

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(create_app(gateway, policy), access_log=None)

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]  # noqa: SLF001

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
