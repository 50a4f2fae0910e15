"""Several DIMSE worker processes share the port and the index (``[dimse] workers``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from gateway.errors import GatewayError
from gateway.models import Instance
from gateway.server import WORKER_LISTENING, stop_dimse_worker, wait_until_listening
from tests.support.common import ct_dataset
from tests.support.gateway_process import GatewayProcess


def test_workers_share_the_port_and_lose_nothing(tmp_path: Path, database_url: str) -> None:
    env = {
        "GATEWAY_DATA_DIR": str(tmp_path / "data"),
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_DIMSE_PORT": "0",
        "GATEWAY_HTTP_PORT": "0",
        "GATEWAY_STORAGE_MIN_FREE_BYTES": "0",
        "GATEWAY_DIMSE_WORKERS": "2",
    }
    folders = []
    for k in range(4):
        folder = tmp_path / f"send{k}"
        folder.mkdir()
        for i in range(k, 40, 4):
            ct_dataset(i).save_as(folder / f"{i}.dcm", enforce_file_format=True)
        folders.append(folder)
    process = GatewayProcess(env, tmp_path / "gateway.log").start()
    try:
        # "gateway ready" is printed once the worker process listens too.
        assert process.proc is not None
        children = Path(f"/proc/{process.proc.pid}/task/{process.proc.pid}/children")
        workers = [int(pid) for pid in children.read_text().split()]
        assert len(workers) == 1, "no DIMSE worker process was started"
        assert listens(workers[0], process.dimse_port)
        # Four senders at once, each a process of its own (dcmtk's storescu): a pynetdicom
        # requestor per thread of one process can lose a fast response to its own reactor
        # thread ("Received unexpected C-STORE service message") and wait out its timeout.
        senders = [subprocess.Popen(
            ["storescu", "-v", "-aet", f"SCU{k}", "-aec", "DICOMGW", "+sd", "127.0.0.1",
             str(process.dimse_port), str(folder)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for k, folder in enumerate(folders)]
        outputs = [sender.communicate(timeout=120)[0] for sender in senders]
    finally:
        process.stop()
    for sender, output in zip(senders, outputs, strict=True):
        assert sender.returncode == 0, output
        assert output.count("Received Store Response (Success)") == 10, output
    engine = create_engine(database_url)
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(Instance)).scalar() == 40
    engine.dispose()


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a socket listening on TCP ``port`` (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "0A" and fields[9] in inodes:
                return True
    return False


def spawn(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)


def test_serve_waits_for_the_worker_line() -> None:
    worker = spawn(f"import sys; sys.stdout.buffer.write({WORKER_LISTENING!r}); "
                   "sys.stdout.flush(); sys.stdin.read()")
    try:
        wait_until_listening(worker, timeout=30)
        assert worker.poll() is None  # still running, serving
    finally:
        stop_dimse_worker(worker)


@pytest.mark.parametrize(("code", "timeout", "error"), [
    ("import sys; sys.exit(3)", 30, "did not start \\(exit status 3\\)"),
    ("import sys, time; print('something else', flush=True); time.sleep(60)", 30,
     "did not start \\(exit status -9\\)"),
    ("import time; time.sleep(60)", 0.5, "did not listen within 0.5 s"),
], ids=["dies", "writes something else", "silent"])
def test_a_worker_that_does_not_listen_stops_serve(code: str, timeout: float,
                                                    error: str) -> None:
    worker = spawn(code)
    try:
        with pytest.raises(GatewayError, match=error):
            wait_until_listening(worker, timeout=timeout)
        assert worker.returncode is not None  # ended (killed if need be) and reaped
    finally:
        stop_dimse_worker(worker)
