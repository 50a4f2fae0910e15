"""What ``dicom-gateway serve`` says at start: quiet at INFO, JSON lines when asked, and a
setting it cannot use named in one line, exit status 2, no traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.gateway_process import GatewayProcess

START_TIMEOUT = 120  # seconds for a refused start (imports, migrations) on a loaded machine


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "GATEWAY_DATA_DIR": str(tmp_path / "data"),
        "GATEWAY_DIMSE_PORT": "0",
        "GATEWAY_HTTP_PORT": "0",
        "GATEWAY_STORAGE_MIN_FREE_BYTES": "0",
        **extra,
    }


def refused_start(env: dict[str, str]) -> str:
    """Run ``serve``, which must refuse to start; its stderr."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    done = subprocess.run([sys.executable, "-m", "gateway", "serve"], env={**environ, **env},
                          capture_output=True, text=True, timeout=START_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "gateway ready" not in done.stdout
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("listener", ["HTTP", "DIMSE"])
def test_a_port_in_use_is_named_with_its_setting(tmp_path: Path, listener: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = refused_start(base_env(tmp_path, **{f"GATEWAY_{listener}_PORT": str(port)}))
    assert line.startswith(f"dicom-gateway: cannot listen for {listener} on 127.0.0.1:{port}")
    assert "address already in use" in line and f"GATEWAY_{listener}_PORT" in line


def test_a_data_folder_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    line = refused_start(base_env(tmp_path, GATEWAY_DATA_DIR=str(tmp_path / "a-file" / "data")))
    assert line.startswith(f"dicom-gateway: data folder {tmp_path / 'a-file' / 'data'}")
    assert "GATEWAY_DATA_DIR" in line


@pytest.mark.parametrize(("url", "reason"), [
    ("nosuchdb://host/x", "Can't load plugin"),
    ("not a url", "Could not parse"),
    ("postgresql+psycopg://gateway:s3cret@127.0.0.1:1/index", "127.0.0.1"),
])
def test_a_bad_database_url_is_named_without_its_password(tmp_path: Path, url: str,
                                                          reason: str) -> None:
    line = refused_start(base_env(tmp_path, GATEWAY_DATABASE_URL=url))
    assert line.startswith("dicom-gateway: database ")
    assert reason in line and "GATEWAY_DATABASE_URL" in line
    assert "s3cret" not in line


def run_briefly(tmp_path: Path, **env: str) -> list[str]:
    """Start ``serve``, stop it; the lines it logged."""
    log = tmp_path / "gateway.log"
    process = GatewayProcess(base_env(tmp_path, **env), log).start()
    process.stop()
    return log.read_text().splitlines()


def test_start_at_info_is_quiet(tmp_path: Path) -> None:
    lines = run_briefly(tmp_path)
    assert lines, "nothing logged at start"
    assert not [line for line in lines if "alembic" in line], lines
    assert any("HTTP listening on" in line for line in lines)


def test_json_lines_log_format(tmp_path: Path) -> None:
    lines = run_briefly(tmp_path, GATEWAY_LOG_FORMAT="json")
    records = [json.loads(line) for line in lines]
    assert {"time", "level", "logger", "message"} <= records[0].keys()
    assert any(r["message"].startswith("HTTP listening on") and r["level"] == "INFO"
               for r in records)
