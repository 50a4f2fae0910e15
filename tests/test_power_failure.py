"""What a power failure can leave in the data folder, and what recovery makes of it.

A write is acknowledged once its content and its index row are on stable storage; the folder
of its final name is flushed later, in a batch, and until then its spool name in
``.incoming`` (flushed before the spool file was handed out) keeps the content reachable
(gateway.storage). Each test puts the data folder in a state a power failure can leave, from
the files and rows real writes made, then restarts the gateway on it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from conftest import ct_dataset, make_settings, only_ready_spool_files, part10
from sqlalchemy import func, select

from gateway.config import Settings
from gateway.core import Gateway
from gateway.ingest import Outcome
from gateway.metadata import parse_instance
from gateway.models import Instance
from gateway.storage import relative_path

SPOOL = "0123456789abcdef.part"


def _store(gateway: Gateway, data: bytes) -> Path:
    """Ingest ``data`` and wait for its folder flush; return its final file."""
    result = gateway.ingestor.ingest(data, source="test")
    assert result.outcome is Outcome.STORED
    gateway.storage.sync()
    row = gateway.index.find_instance(result.sop_instance_uid)
    assert row is not None
    return gateway.storage.path(row.file_path)


def _restart(settings: Settings, caplog: pytest.LogCaptureFixture) -> Gateway:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway.storage"):
        return Gateway(settings).open()


def _instances(gateway: Gateway) -> int:
    with gateway.index.Session() as session:
        return session.scalar(select(func.count()).select_from(Instance)) or 0


@pytest.mark.parametrize("lost", ["file name", "series folder", "study folder"])
def test_an_acknowledged_instance_whose_final_name_was_lost_gets_it_back(
        tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture,
        lost: str) -> None:
    """Row and content on disk, the final name (or the new folders that held it) not: only
    the spool name reached the disk."""
    settings = make_settings(tmp_path, database_url)
    data = part10(ct_dataset(0))
    with Gateway(settings) as gateway:
        final = _store(gateway, data)
        os.link(final, gateway.storage.incoming / SPOOL)
        {"file name": final, "series folder": final.parent,
         "study folder": final.parent.parent}[lost].rename(tmp_path / "lost")
    gateway = _restart(settings, caplog)
    try:
        assert "1 writes confirmed, 0 unfinished writes removed" in caplog.text
        assert final.read_bytes() == data
        assert not (gateway.storage.incoming / SPOOL).exists()
        assert gateway.storage.unfinished() == []
        assert _instances(gateway) == 1
    finally:
        gateway.close()


def test_an_acknowledged_instance_whose_folder_was_not_flushed_yet_keeps_its_file(
        tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Both names reached the disk: the spool name is dropped, the stored file kept."""
    settings = make_settings(tmp_path, database_url)
    data = part10(ct_dataset(0))
    with Gateway(settings) as gateway:
        final = _store(gateway, data)
        os.link(final, gateway.storage.incoming / SPOOL)
        inode = final.stat().st_ino
    gateway = _restart(settings, caplog)
    try:
        assert "1 writes confirmed, 0 unfinished writes removed" in caplog.text
        assert final.stat().st_ino == inode and final.read_bytes() == data
        assert gateway.storage.unfinished() == []
    finally:
        gateway.close()


@pytest.mark.parametrize("final_name", [True, False], ids=["named", "unnamed"])
def test_a_write_whose_row_was_not_committed_is_removed(
        tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture,
        final_name: bool) -> None:
    """Content flushed and linked to its final name (which may not have reached the disk),
    no row: never acknowledged."""
    settings = make_settings(tmp_path, database_url)
    kept, unacknowledged = part10(ct_dataset(0)), part10(ct_dataset(1))
    parsed = parse_instance(unacknowledged)
    relpath = relative_path(parsed.study_instance_uid, parsed.series_instance_uid,
                            parsed.sop_instance_uid, parsed.digest)
    with Gateway(settings) as gateway:
        kept_file = _store(gateway, kept)
        pending = gateway.storage.write(relpath, unacknowledged)  # the power fails here
        final = gateway.storage.path(relpath)
        if not final_name:
            final.unlink()
    gateway = _restart(settings, caplog)
    try:
        assert "0 writes confirmed, 1 unfinished writes removed" in caplog.text
        assert not final.exists() and not pending.temp.exists()
        assert kept_file.read_bytes() == kept
        assert only_ready_spool_files(gateway.storage.incoming)
        assert _instances(gateway) == 1
    finally:
        gateway.close()


@pytest.mark.parametrize("content", ["zeros", "cut short", "garbage"])
def test_a_spool_file_whose_content_never_reached_the_disk_is_removed(
        tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture,
        content: str) -> None:
    """The power failed before the content was flushed: no final name was given to it and
    no row written; whatever the file holds, nothing of it is kept or indexed."""
    settings = make_settings(tmp_path, database_url)
    data = part10(ct_dataset(1))
    with Gateway(settings) as gateway:
        kept_file = _store(gateway, part10(ct_dataset(0)))
        spool = gateway.storage.incoming / SPOOL
        spool.write_bytes({"zeros": bytes(len(data)), "cut short": data[:len(data) // 3],
                           "garbage": os.urandom(len(data))}[content])
    gateway = _restart(settings, caplog)
    try:
        assert "0 writes confirmed, 1 unfinished writes removed" in caplog.text
        assert not spool.exists()
        assert kept_file.exists() and _instances(gateway) == 1
    finally:
        gateway.close()
