"""Shared pieces of the benchmarks: free ports, a gateway process, an Orthanc process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc")
                                      else None)
ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
READY = re.compile(r"gateway ready: dimse=(\d+) http=(\d+)")


# The libraries whose versions decide the figures (README: the lock files pin them).
MEASURED_LIBRARIES = ("dicom-gateway", "pydicom", "pynetdicom", "aiohttp", "sqlalchemy",
                      "psycopg", "numpy", "orjson", "pillow", "python-gdcm",
                      "pylibjpeg-openjpeg", "pylibjpeg-rle", "pylibjpeg-libjpeg")


def library_versions() -> str:
    """One line naming Python and each installed library of :data:`MEASURED_LIBRARIES`, for
    the head of a benchmark's output (figures are comparable only at the same versions)."""
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"python {sys.version.split()[0]}"]
    for name in MEASURED_LIBRARIES:
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return "versions: " + ", ".join(parts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayServer:
    """``dicom-gateway serve`` in a child process on free ports.

    ``source``: the checkout to run it from (another commit's worktree, say) instead of the
    one installed in the running interpreter's environment.
    """

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None,
                 source: Path | None = None, log: Path | None = None) -> None:
        self.source = source
        self.log_path = log
        self.log: IO[str] | None = None
        self.env = {
            **os.environ,
            "GATEWAY_DATA_DIR": str(data_dir),
            "GATEWAY_DIMSE_PORT": "0",
            "GATEWAY_HTTP_PORT": "0",
            "GATEWAY_LOG_LEVEL": "WARNING",
            "GATEWAY_STORAGE_MIN_FREE_BYTES": "0",
            **(env or {}),
            **({"PYTHONPATH": str(source)} if source else {}),
        }
        self.proc: subprocess.Popen[str] | None = None
        self.dimse_port = self.http_port = 0
        self.ae_title = self.env.get("GATEWAY_AE_TITLE", "DICOMGW")

    def __enter__(self) -> GatewayServer:
        # ``-m`` puts the working folder first on the path: the source's own, if given.
        if self.log_path:
            self.log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=self.env,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     cwd=self.source)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            match = READY.search(line)
            if match:
                self.dimse_port, self.http_port = int(match[1]), int(match[2])
                return self
        raise RuntimeError("the gateway did not start")

    def __exit__(self, *exc: object) -> None:
        if self.proc:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
            if self.proc.stdout:
                self.proc.stdout.close()
        if self.log:
            self.log.close()

    def rss_kb(self) -> int:
        assert self.proc is not None
        return process_rss_kb(self.proc.pid)


class OrthancServer:
    """Orthanc on free ports with its own configuration (BENCHMARKING.md, "Running the peer")."""

    def __init__(self, folder: Path, *, tuned: bool, dicomweb: bool = True,
                 modalities: dict[str, list[object]] | None = None) -> None:
        self.folder = folder
        self.tuned = tuned
        self.dimse_port = free_port()
        self.http_port = free_port()
        self.ae_title = "ORTHANC"
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "bench", "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"), "DicomAet": self.ae_title,
            "DicomPort": self.dimse_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "DicomModalities": modalities or {},
            "StorageCompression": False, "HttpCompressionEnabled": False,
        }
        if dicomweb and os.path.exists(ORTHANC_DICOMWEB):
            config["Plugins"] = [ORTHANC_DICOMWEB]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> OrthancServer:
        assert ORTHANC is not None
        env = dcmtk_env(self.tuned)  # Orthanc's DICOM server is dcmtk's
        self.log = open(self.folder / "orthanc.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([ORTHANC, str(self.folder / "orthanc.json")], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/system", timeout=2):
                    return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not start; see " + str(self.folder / "orthanc.log"))

    def __exit__(self, *exc: object) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        self.log.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def rss_kb(self) -> int:
        assert self.proc is not None
        return process_rss_kb(self.proc.pid)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children still running (Linux /proc)."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def process_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def dcmtk_env(tuned: bool) -> dict[str, str]:
    """The environment of a dcmtk tool: ``TCP_NODELAY=1`` when tuned, unset as packaged
    (BENCHMARKING.md, "The TCP trap")."""
    env = {**os.environ}
    if tuned:
        env["TCP_NODELAY"] = "1"
    else:
        env.pop("TCP_NODELAY", None)
    return env
