"""The ``dicom-gateway`` command, run as a real process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmwrite
from pydicom.dataset import FileMetaDataset
from sqlalchemy import create_engine, func, select

from gateway.models import Instance
from tests.support.common import ct_dataset

SAMPLE_FILES = Path(__file__).parent.parent / "sample_dicom" / "files"


def run(args: list[str], env: dict[str, str],
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> dict[str, str]:
    return {"GATEWAY_DATA_DIR": str(tmp_path / "data"), "GATEWAY_DATABASE_URL": database_url,
            "GATEWAY_STORAGE_MIN_FREE_BYTES": "0"}


def count_instances(database_url: str) -> int:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return connection.execute(select(func.count()).select_from(Instance)).scalar_one()
    finally:
        engine.dispose()


@pytest.mark.parametrize("command", [[], ["serve"], ["ingest"], ["demo"], ["db", "upgrade"]])
def test_help(command: list[str]) -> None:
    result = run([*command, "--help"], {})
    assert result.returncode == 0
    assert "usage: dicom-gateway" in result.stdout


def test_ingest_reports_stored_duplicates_and_rejections(
    tmp_path: Path, env: dict[str, str], database_url: str
) -> None:
    folder = tmp_path / "incoming" / "nested"
    folder.mkdir(parents=True)
    for path in SAMPLE_FILES.glob("*.dcm"):
        shutil.copy(path, folder / path.name)
    shutil.copy(next(SAMPLE_FILES.glob("*.dcm")), tmp_path / "incoming" / "copy.dcm")
    (tmp_path / "incoming" / "notes.txt").write_text("not DICOM")
    (tmp_path / "incoming" / "truncated.dcm").write_bytes(
        (SAMPLE_FILES / "ct_explicit_le.dcm").read_bytes()[:-500])
    # A bare data set without the Part 10 header is accepted and stored as Part 10.
    bare = ct_dataset(0)
    bare.file_meta = FileMetaDataset()
    dcmwrite(tmp_path / "incoming" / "bare.dcm", bare, implicit_vr=True, little_endian=True)
    assert (tmp_path / "incoming" / "bare.dcm").read_bytes()[128:132] != b"DICM"

    result = run(["ingest", str(tmp_path / "incoming")], env)
    committed = len(list(SAMPLE_FILES.glob("*.dcm")))
    assert result.returncode == 1, result.stderr
    assert f"stored: {committed + 1}, duplicates: 1, rejected: 2" in result.stdout
    assert "notes.txt: InvalidInstance" in result.stdout
    assert "truncated.dcm: InvalidInstance" in result.stdout
    assert count_instances(database_url) == committed + 1

    again = run(["ingest", "--quiet", str(folder)], env)
    assert again.returncode == 0
    assert f"stored: 0, duplicates: {committed}, rejected: 0" in again.stdout


def test_ingest_missing_path_is_an_error(env: dict[str, str]) -> None:
    result = run(["ingest", "/nonexistent/folder"], env)
    assert result.returncode == 2
    assert "no such file or folder" in result.stderr


def test_demo_loads_the_sample_study(env: dict[str, str], database_url: str) -> None:
    result = run(["demo"], env)
    assert result.returncode == 0, result.stderr
    assert "sample study" in result.stdout
    assert count_instances(database_url) > 10
    again = run(["demo"], env)
    assert again.returncode == 0
    assert "0 stored" in again.stdout


def test_db_upgrade(env: dict[str, str]) -> None:
    result = run(["db", "upgrade"], env)
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout


def test_demo_mode_refuses_a_public_listener(env: dict[str, str]) -> None:
    result = run(["serve", "--demo"], {**env, "GATEWAY_HTTP_HOST": "0.0.0.0",
                                       "GATEWAY_HTTP_PORT": "0", "GATEWAY_DIMSE_PORT": "0"},
                 timeout=60)
    assert result.returncode == 2
    assert "every listener must be on loopback" in result.stderr
