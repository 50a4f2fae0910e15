"""Fuzz STOW-RS (dicomweb/stow.py, PS3.18 §10.5): real HTTP requests to a running app.

The multipart reading is aiohttp's ``MultipartReader`` driven inside the handler, with the
limits, media-type checks and per-part ingest around it: not separable, so each input is sent
as the body of a ``POST /dicomweb/studies`` over a real connection to the gateway's aiohttp
app on 127.0.0.1 (SQLite index and files in a temporary folder). The input's first byte picks
the request's Content-Type (the multipart/related boundary is ``XyZzYboundary``).

Documented refusals: any 2xx or 4xx answer (a part refused with its FailureReason, a body
refused with application/problem+json). A 5xx answer, a dropped connection, or an error the
server logs with a traceback (an unexpected exception: a part answered 0x0110) is a finding.

Seeds: multipart bodies holding real files (sample_dicom/files, pydicom's test files), one or
several parts, a part of another type, an empty part, preamble and epilogue.

Run: ``.venv/bin/python fuzz/fuzz_stow.py -max_total_time=60``
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import logging
import sys
import tempfile
import threading
import traceback
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, main  # noqa: E402

with atheris.instrument_imports(include=["dicomweb", "gateway.ingest", "gateway.metadata",
                                         "gateway.dicom_json", "aiohttp.multipart"]):
    from aiohttp import web

    from gateway.apikeys import ApiKeys
    from gateway.config import load_settings
    from gateway.core import Gateway
    from gateway.server import create_app

NAME = "stow"
BOUNDARY = "XyZzYboundary"
CONTENT_TYPES = (
    f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
    f"multipart/related; type=application/dicom; boundary={BOUNDARY}",
    f'multipart/related; boundary="{BOUNDARY}"',
    f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
)
MAX_SEED = 16 * 1024
OURS = frozenset({"gateway", "dicomweb", "dimse", "viewer_links"})


class _Tracebacks(logging.Handler):
    """The gateway's records logged with an exception: its unexpected errors (pydicom logs
    the tracebacks of decoders it tries and gives up on: not findings)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.name.split(".")[0] in OURS:
            self.seen.append(record.getMessage() + "\n"
                             + "".join(traceback.format_exception(*record.exc_info)))


class _Server:
    """The gateway's app on 127.0.0.1, on a loop in its own thread, for the whole run."""

    def __init__(self) -> None:
        self.folder = tempfile.TemporaryDirectory(prefix="fuzz-stow-")
        data = Path(self.folder.name)
        settings = load_settings(environ={
            "GATEWAY_DATA_DIR": str(data / "data"),
            "GATEWAY_DATABASE_URL": f"sqlite:///{data / 'index.sqlite'}",
            "GATEWAY_HTTP_PORT": "0", "GATEWAY_DIMSE_PORT": "0",
            "GATEWAY_STORAGE_MIN_FREE_BYTES": "0",
            "GATEWAY_HTTP_MAX_UPLOAD_BYTES": str(1 << 20),
        })
        # No flush per stored part: the run stores thousands, and durability is not at test.
        settings = dataclasses.replace(
            settings, storage=dataclasses.replace(settings.storage, fsync=False))
        self.gateway = Gateway(settings).open()
        self.token = str(ApiKeys(self.gateway.index).create("fuzz", "dicomweb:write"))
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.runner = web.AppRunner(create_app(self.gateway), access_log=None)

        async def start() -> int:
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]  # noqa: SLF001

        self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=60)
        self.tracebacks = _Tracebacks()
        logging.disable(logging.NOTSET)
        root = logging.getLogger()
        root.setLevel(logging.ERROR)
        root.addHandler(self.tracebacks)

    def post(self, content_type: str, body: bytes) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request("POST", "/dicomweb/studies", body=body, headers={
                "Authorization": f"Bearer {self.token}", "Content-Type": content_type,
                "Accept": "application/dicom+json"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()


_server: _Server | None = None


def _multipart(parts: list[tuple[str, bytes]], preamble: bytes = b"",
               epilogue: bytes = b"") -> bytes:
    out = preamble
    for content_type, data in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode() + epilogue


def seeds() -> list[bytes]:
    import pydicom

    files = [p.read_bytes() for folder in (ROOT / "sample_dicom" / "files",
                                           Path(pydicom.__file__).parent / "data" / "test_files")
             for p in sorted(folder.glob("*.dcm")) if p.stat().st_size <= MAX_SEED]
    dicom = "application/dicom"
    bodies = [_multipart([(dicom, data)]) for data in files]
    bodies += [
        _multipart([(dicom, files[0]), (dicom, files[1])]),
        _multipart([(dicom, files[0]), ("application/json", b"{}")]),
        _multipart([(dicom, b"")]),
        _multipart([(dicom, files[0][128 + 4:])]),  # no preamble, as dcmwrite leaves it
        _multipart([(dicom, files[0])], preamble=b"preamble\r\n", epilogue=b"\r\nepilogue"),
        b"",
    ]
    return [bytes([i % len(CONTENT_TYPES)]) + body for i, body in enumerate(bodies)]


def check(data: bytes) -> None:
    global _server
    if _server is None:
        _server = _Server()
    if not data:
        return
    server = _server
    server.tracebacks.seen.clear()
    status, body = server.post(CONTENT_TYPES[data[0] % len(CONTENT_TYPES)], data[1:])
    if status >= 500 or server.tracebacks.seen:
        raise RuntimeError(f"STOW-RS answered {status}: {body[:300]!r}\n"
                           + "\n".join(server.tracebacks.seen))


if __name__ == "__main__":
    main(NAME, seeds, check)
