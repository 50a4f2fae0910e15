"""What a power failure can leave in the data folder, and what recovery makes of it.

A write is acknowledged once its content is on stable storage and its index row committed; the
folder of its final name and the index's log are flushed later, in a batch, and until then its
spool name in ``.incoming`` (flushed before the spool file was handed out) keeps the content
reachable (gateway.storage). Each test puts the data folder in a state a power failure can
leave, from the files and rows real writes made, then restarts the gateway on it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select

from gateway.config import Settings
from gateway.core import Gateway
from gateway.ingest import Outcome
from gateway.metadata import parse_instance
from gateway.models import Instance, Patient, Series, Study
from gateway.storage import relative_path
from tests.support.common import ct_dataset, make_settings, only_ready_spool_files, part10

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
        assert "1 writes confirmed, 0 stored again, 0 unfinished writes removed" in caplog.text
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
        assert "1 writes confirmed, 0 stored again, 0 unfinished writes removed" in caplog.text
        assert final.stat().st_ino == inode and final.read_bytes() == data
        assert gateway.storage.unfinished() == []
    finally:
        gateway.close()


@pytest.mark.parametrize("final_name", [True, False], ids=["named", "unnamed"])
def test_a_write_whose_row_was_not_committed_is_stored_again(
        tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture,
        final_name: bool) -> None:
    """Content flushed and linked to its final name (which may not have reached the disk),
    no row: the power failed before the commit, or after it and before the log was flushed
    (the sender may have had its success). Recovery stores it through the ingest path."""
    settings = make_settings(tmp_path, database_url)
    kept, unindexed = part10(ct_dataset(0)), part10(ct_dataset(1))
    parsed = parse_instance(unindexed)
    relpath = relative_path(parsed.study_instance_uid, parsed.series_instance_uid,
                            parsed.sop_instance_uid, parsed.digest)
    with Gateway(settings) as gateway:
        kept_file = _store(gateway, kept)
        pending = gateway.storage.write(relpath, unindexed)  # the power fails here
        final = gateway.storage.path(relpath)
        if not final_name:
            final.unlink()
    gateway = _restart(settings, caplog)
    try:
        assert "0 writes confirmed, 1 stored again, 0 unfinished writes removed" in caplog.text
        assert final.read_bytes() == unindexed and not pending.temp.exists()
        row = gateway.index.find_instance(parsed.sop_instance_uid)
        assert row is not None and row.file_path == relpath and row.digest == parsed.digest
        assert row.source == "recovery"
        assert kept_file.read_bytes() == kept
        assert gateway.storage.unfinished() == []
        assert _instances(gateway) == 2
    finally:
        gateway.close()


def test_an_acknowledged_instance_whose_row_was_lost_is_stored_again(
        tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Acknowledged, its row lost with the log's unflushed tail (a new study: patient, study
    and series rows lost with it); its spool name stood until the log was flushed."""
    settings = make_settings(tmp_path, database_url)
    data = part10(ct_dataset(0))
    with Gateway(settings) as gateway:
        final = _store(gateway, data)
        os.link(final, gateway.storage.incoming / SPOOL)
        with gateway.index.WriteSession() as session, session.begin():
            for table in (Instance, Series, Study, Patient):
                session.execute(delete(table))
    gateway = _restart(settings, caplog)
    try:
        assert "0 writes confirmed, 1 stored again, 0 unfinished writes removed" in caplog.text
        assert final.read_bytes() == data
        assert gateway.storage.unfinished() == []
        assert _instances(gateway) == 1
        with gateway.index.Session() as session:
            assert session.scalar(select(func.count()).select_from(Study)) == 1
    finally:
        gateway.close()


def test_a_refused_instance_left_by_a_power_failure_is_not_stored(
        tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A different instance under a stored SOP Instance UID, refused (overwrite off), whose
    spool file's removal did not reach the disk: recovery refuses it again and removes it; the
    original stays."""
    settings = make_settings(tmp_path, database_url)
    original = part10(ct_dataset(0))
    other = ct_dataset(0)
    other.SeriesDescription = "a different data set under the same SOP Instance UID"
    refused = part10(other)
    with Gateway(settings) as gateway:
        final = _store(gateway, original)
        (gateway.storage.incoming / SPOOL).write_bytes(refused)
    gateway = _restart(settings, caplog)
    try:
        assert "0 writes confirmed, 0 stored again, 1 unfinished writes removed" in caplog.text
        assert not (gateway.storage.incoming / SPOOL).exists()
        assert final.read_bytes() == original
        assert only_ready_spool_files(gateway.storage.incoming)
        assert _instances(gateway) == 1
    finally:
        gateway.close()


def test_two_lost_rows_of_one_sop_instance_uid_are_stored_in_the_order_written(
        tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """With ``[storage] overwrite``, an instance and the one that replaced it, both rows lost:
    the later write is the one kept, whatever the names of their spool files."""
    settings = make_settings(tmp_path, database_url, GATEWAY_STORAGE_OVERWRITE="true")
    first = part10(ct_dataset(0))
    second_ds = ct_dataset(0)
    second_ds.SeriesDescription = "replaces the first"
    second = part10(second_ds)
    with Gateway(settings) as gateway:
        incoming = gateway.storage.incoming
    (incoming / "ffff000000000000.part").write_bytes(first)
    os.utime(incoming / "ffff000000000000.part", ns=(10**18, 10**18))
    (incoming / "0000ffff00000000.part").write_bytes(second)
    os.utime(incoming / "0000ffff00000000.part", ns=(2 * 10**18, 2 * 10**18))
    gateway = _restart(settings, caplog)
    try:
        assert "0 writes confirmed, 2 stored again, 0 unfinished writes removed" in caplog.text
        row = gateway.index.find_instance(parse_instance(second).sop_instance_uid)
        assert row is not None and row.digest == parse_instance(second).digest
        assert gateway.storage.path(row.file_path).read_bytes() == second
        assert gateway.storage.unfinished() == []
        assert _instances(gateway) == 1
    finally:
        gateway.close()


def test_a_spool_file_whose_content_never_reached_the_disk_is_removed(
        tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The power failed before the content was flushed: no final name was given to it and
    no row written; a file of zero bytes holds nothing, and is removed."""
    settings = make_settings(tmp_path, database_url)
    data = part10(ct_dataset(1))
    with Gateway(settings) as gateway:
        kept_file = _store(gateway, part10(ct_dataset(0)))
        spool = gateway.storage.incoming / SPOOL
        spool.write_bytes(bytes(len(data)))
    gateway = _restart(settings, caplog)
    try:
        assert "0 writes confirmed, 0 stored again, 1 unfinished writes removed, " \
               "0 unreadable files" in caplog.text
        assert not spool.exists()
        assert not (settings.data_dir / "quarantine").exists()
        assert kept_file.exists() and _instances(gateway) == 1
    finally:
        gateway.close()


@pytest.mark.parametrize("content", ["cut short", "garbage"])
def test_an_unreadable_spool_file_is_quarantined_not_deleted(
        tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture,
        content: str) -> None:
    """A spool file holding bytes but no readable instance (a write cut short, garbage) is
    neither stored nor indexed; it may be patient data, so it is moved to the quarantine
    folder (0700, the file 0600), never deleted."""
    settings = make_settings(tmp_path, database_url)
    data = part10(ct_dataset(1))
    held = {"cut short": data[:len(data) // 3], "garbage": os.urandom(len(data))}[content]
    with Gateway(settings) as gateway:
        kept_file = _store(gateway, part10(ct_dataset(0)))
        spool = gateway.storage.incoming / SPOOL
        spool.write_bytes(held)
    gateway = _restart(settings, caplog)
    try:
        assert "0 writes confirmed, 0 stored again, 0 unfinished writes removed, " \
               "1 unreadable files moved to" in caplog.text
        assert not spool.exists()
        quarantine = settings.data_dir / "quarantine"
        assert (quarantine / SPOOL).read_bytes() == held
        assert quarantine.stat().st_mode & 0o777 == 0o700
        assert (quarantine / SPOOL).stat().st_mode & 0o777 == 0o600
        assert kept_file.exists() and _instances(gateway) == 1
    finally:
        gateway.close()


def test_a_deleted_instance_leaves_nothing_for_recovery_to_store_again(
        tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Deleted right after it was stored: its spool name is dropped (and the drop flushed)
    before its file goes, so that a power failure then cannot bring it back."""
    settings = make_settings(tmp_path, database_url)
    with Gateway(settings) as gateway:
        result = gateway.ingestor.ingest(part10(ct_dataset(0)), source="test")
        row = gateway.index.find_instance(result.sop_instance_uid)
        assert row is not None
        paths = gateway.index.write(
            lambda session: gateway.index.remove_instances(session, [row.pk]))
        assert gateway.storage.delete_unindexed(paths, gateway.index.has_file) == 1
        assert only_ready_spool_files(gateway.storage.incoming)  # at once, not a moment later
    gateway = _restart(settings, caplog)
    try:
        assert "recovered storage" not in caplog.text
        assert _instances(gateway) == 0
    finally:
        gateway.close()
