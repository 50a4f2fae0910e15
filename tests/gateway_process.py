"""Run ``dicom-gateway serve`` as a real child process (for crash and CLI tests)."""

from __future__ import annotations

import os
import re
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
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                self._closed()
                raise RuntimeError(f"gateway exited: {self.log_path.read_text()[-2000:]}")
            match = READY.search(line)
            if match:
                self.dimse_port, self.http_port = int(match[1]), int(match[2])
                return self
        raise RuntimeError("gateway did not become ready")

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
