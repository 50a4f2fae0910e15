"""Crash recovery's reading of spool files, bounded in CPU time per file.

:meth:`gateway.storage.FileStorage.recover` must learn what instance each spool file left in
``.incoming`` holds before the DIMSE port listens. Those files are whatever arrived: a data
set crafted to keep pydicom busy for minutes (a sequence of millions of empty items, say)
would hold the node down at every start. So the files are read here in a worker process
(``python -m gateway.recovery``), one file at a time:

1. the worker is started on the first file, imports the readers, and says ``ready``;
2. for each file it is sent the path and given :attr:`StorageSettings.recovery_file_seconds`
   CPU seconds more (``RLIMIT_CPU``: the kernel stops it past them, whatever it is doing);
   it answers the file's relative path, or why it holds no readable instance;
3. a worker that does not start is reported at ERROR and the files are read in this process,
   unbounded (quarantining them all would take their final names from instances whose index
   rows exist);
4. a worker that does not answer (stopped by the kernel, killed, or still going after
   :data:`WALL_FACTOR` times the CPU bound in wall-clock time, as when it waits for a slow
   disk) is killed; the file is reported unreadable and the next file gets a new worker.

A file reported unreadable is moved to the quarantine folder by the caller, never deleted:
it may be the only copy of patient data. A thread could not be stopped this way (a thread
cannot be killed), hence the process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import select
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from gateway.errors import InvalidInstance, TooLarge
from gateway.metadata import DEFAULT_MAX_INFLATED_BYTES, dataset_digest, parse_instance
from gateway.storage import relative_path

logger = logging.getLogger(__name__)

READY = "ready"
# Wall-clock allowance of a file, as a multiple of its CPU bound (reading from a slow disk).
WALL_FACTOR = 4
# Wall-clock allowance for the worker to start (importing pydicom and the readers).
START_SECONDS = 120.0


def stored_relpath(path: str, *,
                   max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES) -> str | None:
    """The relative path the instance in the file at ``path`` is stored under (from its UIDs
    and data set digest, as :meth:`gateway.ingest.Ingestor.ingest` names it), or ``None`` if
    the file holds no readable instance: what a spool file held (unbounded: the worker of
    :class:`RecoveryReader` calls it).
    """
    data = Path(path).read_bytes()
    try:
        parsed = parse_instance(data, digest=False, max_inflated_bytes=max_inflated_bytes)
        return relative_path(parsed.study_instance_uid, parsed.series_instance_uid,
                             parsed.sop_instance_uid, dataset_digest(data))
    except (InvalidInstance, TooLarge, ValueError):
        return None


class RecoveryReader:
    """Identify spool files in a worker process, each within a CPU-time bound.

    Parameters
    ----------
    cpu_seconds
        CPU seconds the worker is given per file (rounded up to whole seconds: the kernel
        counts ``RLIMIT_CPU`` in seconds).
    max_inflated_bytes
        As ``[storage] max_inflated_bytes``: a deflated data set inflating past it is
        unreadable.

    A context manager: the worker is stopped on exit.
    """

    def __init__(self, cpu_seconds: float, max_inflated_bytes: int) -> None:
        self.cpu_seconds = max(1, math.ceil(cpu_seconds))
        self.max_inflated_bytes = max_inflated_bytes
        self._worker: subprocess.Popen[bytes] | None = None
        self._pending = b""
        self._failed = False  # the worker could not start: not tried again

    def __enter__(self) -> RecoveryReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def identify(self, path: str) -> str | None:
        """The relative path the instance in ``path`` is stored under, or ``None`` if the
        file holds no instance readable within the bound (the reason is logged)."""
        worker = self._start()
        if worker is None:
            # No worker: read here, unbounded, rather than quarantine every file (one whose
            # index row exists would lose its final name).
            return stored_relpath(path, max_inflated_bytes=self.max_inflated_bytes)
        assert worker.stdin is not None
        try:
            worker.stdin.write(path.encode() + b"\n")
            worker.stdin.flush()
        except OSError:
            self._stop()
            logger.warning("recovery: the reading worker ended before reading %s", path)
            return None
        line = self._read_line(self.cpu_seconds * WALL_FACTOR)
        if line is None:
            self._stop()
            logger.warning("recovery: %s could not be read within %d CPU seconds "
                           "([storage] recovery_file_seconds)", path, self.cpu_seconds)
            return None
        answer = json.loads(line)
        if answer.get("relpath") is None:
            logger.warning("recovery: %s holds no readable instance: %s", path,
                           answer.get("reason", "?"))
            return None
        return str(answer["relpath"])

    def close(self) -> None:
        self._stop()

    def _start(self) -> subprocess.Popen[bytes] | None:
        if self._worker is not None or self._failed:
            return self._worker
        self._pending = b""
        self._worker = subprocess.Popen(
            [sys.executable, "-m", "gateway.recovery", str(self.cpu_seconds),
             str(self.max_inflated_bytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if self._read_line(START_SECONDS) != READY:
            self._stop()
            self._failed = True
            logger.error("recovery: the worker reading spool files did not start: they are "
                         "read without a time bound")
            return None
        return self._worker

    def _read_line(self, timeout: float) -> str | None:
        """The worker's next line, or ``None`` if it ends or is silent past ``timeout``."""
        assert self._worker is not None and self._worker.stdout is not None
        fd = self._worker.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode()

    def _stop(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        if worker.poll() is None:
            worker.kill()
        worker.wait()
        for stream in (worker.stdin, worker.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


def _give_cpu_seconds(seconds: int) -> None:
    """Let this process use ``seconds`` more CPU seconds (then the kernel stops it)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    limit = math.ceil(usage.ru_utime + usage.ru_stime) + seconds
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (limit, hard))


def main(argv: list[str]) -> None:
    """The worker: read paths on stdin, answer a JSON line per path on stdout."""
    cpu_seconds, max_inflated_bytes = int(argv[0]), int(argv[1])
    out = sys.stdout
    out.write(READY + "\n")
    out.flush()
    for line in sys.stdin:
        path = line.rstrip("\n")
        _give_cpu_seconds(cpu_seconds)
        try:
            relpath = stored_relpath(path, max_inflated_bytes=max_inflated_bytes)
            answer = {"relpath": relpath, "reason": "not a readable DICOM instance"}
        except Exception as exc:  # a reader's defect: this file is unreadable, go on
            answer = {"relpath": None, "reason": f"{type(exc).__name__}: {exc}"[:300]}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
