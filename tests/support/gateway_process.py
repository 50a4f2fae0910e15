"""Run ``dicom-gateway serve`` as a real child process (for crash and CLI tests)."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

READY = re.compile(r"gateway ready: dimse=(\d+) http=(\d+)")


class GatewayProcess:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log
        self.proc: subprocess.Popen[str] | None = None
        self.dimse_port = 0
        self.http_port = 0

    def start(self, timeout: float = 60) -> GatewayProcess:
        self._log = open(self.log_path, "a")  # noqa: SIM115 - closed in _closed()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve"], env=self.env,
            stdout=subprocess.PIPE, stderr=self._log, text=True,
        )
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        # Read the raw pipe with a deadline: a gateway stuck before it listens must fail the
        # test, not hang it.
        fd = self.proc.stdout.fileno()
        said = b""
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                self._closed()
                raise RuntimeError(f"gateway exited: {self.log_path.read_text()[-2000:]}")
            said += chunk
            match = READY.search(said.decode(errors="replace"))
            if match:
                self.dimse_port, self.http_port = int(match[1]), int(match[2])
                return self
        self.stop()
        raise RuntimeError(f"gateway did not become ready within {timeout} s")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._closed()

    def _closed(self) -> None:
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._closed()
