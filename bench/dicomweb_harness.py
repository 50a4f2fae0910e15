"""Shared pieces of the DICOMweb benchmarks: servers as subprocesses, timing, RSS sampling.

The gateway runs as ``python -m gateway serve`` in its own process (so the measuring client never
shares its GIL), Orthanc as ``/usr/sbin/Orthanc`` with the DICOMweb plugin when installed
(BENCHMARKING.md: own JSON config, temp folders, loopback only, stopped by PID).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ORTHANC = Path("/usr/sbin/Orthanc")
ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    root: str          # DICOMweb root path, e.g. "/dicomweb"
    headers: dict[str, str]

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def rss_kib(self) -> int:
        return rss_kib(self.process.pid)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def gateway_env(data_dir: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "GATEWAY_DATA_DIR": str(data_dir), "GATEWAY_DIMSE_PORT": "0",
            "GATEWAY_HTTP_PORT": "0", "GATEWAY_LOG_LEVEL": "WARNING",
            "GATEWAY_STORAGE_MIN_FREE_BYTES": "0", **extra}


@contextmanager
def gateway_server(data_dir: Path, token: str) -> Iterator[Server]:
    """``dicom-gateway serve`` on a free port, until the block ends."""
    process = subprocess.Popen([sys.executable, "-m", "gateway", "serve"],
                               env=gateway_env(data_dir), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        port = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stdout.readline().decode()
            match = re.search(r"gateway ready: .*http=(\d+)", line)
            if match:
                port = int(match.group(1))
                break
            if not line and process.poll() is not None:
                raise RuntimeError("the gateway exited before it was ready")
        if not port:
            raise RuntimeError("the gateway did not start in time")
        yield Server("gateway", process, port, "/dicomweb", {"Authorization": f"Bearer {token}"})
    finally:
        process.terminate()
        process.wait(timeout=30)


def orthanc_available() -> bool:
    return ORTHANC.exists() and ORTHANC_DICOMWEB.exists()


@contextmanager
def orthanc_server(work: Path) -> Iterator[Server]:
    """Orthanc with the DICOMweb plugin, its storage and index in ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    port, dicom_port = free_port(), free_port()
    config = {
        "Name": "bench", "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"), "HttpPort": port, "DicomPort": dicom_port,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "StorageCompression": False, "Plugins": [str(ORTHANC_DICOMWEB)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "HttpCompressionEnabled": False,
    }
    path = work / "orthanc.json"
    path.write_text(json.dumps(config))
    log = open(work / "orthanc.log", "wb")  # noqa: SIM115
    process = subprocess.Popen([str(ORTHANC), str(path)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/system")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError("Orthanc did not start; see orthanc.log")
        yield Server("orthanc", process, port, "/dicom-web", {})
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def upload_to_orthanc(server: Server, files: list[Path], workers: int = 4) -> float:
    """POST every file to Orthanc's REST ``/instances``; return the seconds it took."""
    queue = list(files)
    lock = threading.Lock()
    errors: list[str] = []

    def worker() -> None:
        c = server.connection()
        while True:
            with lock:
                if not queue:
                    return
                path = queue.pop()
            c.request("POST", "/instances", body=path.read_bytes(),
                      headers={"Content-Type": "application/dicom"})
            r = c.getresponse()
            r.read()
            if r.status != 200:
                errors.append(f"{path.name}: {r.status}")

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"Orthanc refused {len(errors)} files, e.g. {errors[0]}")
    return time.perf_counter() - start


def timed_get(connection: http.client.HTTPConnection, path: str,
              headers: dict[str, str]) -> tuple[float, int, bytes]:
    start = time.perf_counter()
    connection.request("GET", path, headers=headers)
    response = connection.getresponse()
    body = response.read()
    return (time.perf_counter() - start) * 1000, response.status, body


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values: list[float]) -> str:
    return (f"p50 {statistics.median(values):7.1f} ms  p95 {percentile(values, 0.95):7.1f} ms"
            f"  (n={len(values)})")


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free
