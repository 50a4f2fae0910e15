"""Crash recovery never undoes the writes of another live process sharing the data folder.

``dicom-gateway ingest``, ``apikey``, ``links`` ... open the core with recovery while ``serve``
may be storing: a write placed but not yet committed to the index must survive that.
"""

from __future__ import annotations

from pathlib import Path

from gateway.core import Gateway
from gateway.metadata import parse_instance
from gateway.recovery import stored_relpath
from gateway.storage import SPOOL_STOCK, relative_path
from tests.support.common import ct_dataset, make_settings, only_ready_spool_files, part10


def relpath_of(data: bytes) -> str:
    """Where ingest stores ``data``: crash recovery finds the same name from the content."""
    parsed = parse_instance(data)
    return relative_path(parsed.study_instance_uid, parsed.series_instance_uid,
                         parsed.sop_instance_uid, parsed.digest)


def test_a_second_process_does_not_undo_writes_in_flight(tmp_path: Path,
                                                         database_url: str) -> None:
    settings = make_settings(tmp_path, database_url)
    with Gateway(settings) as serving:
        data = part10(ct_dataset(0))
        relpath = relpath_of(data)
        pending = serving.storage.write(relpath, data)  # placed; its row not committed
        with Gateway(settings) as command:  # e.g. `dicom-gateway apikey list` meanwhile
            assert command.storage.exists(relpath)
        assert serving.storage.exists(relpath) and pending.temp.exists()
        serving.storage.finish(pending)


def test_recovery_runs_when_no_other_process_is_attached(tmp_path: Path,
                                                         database_url: str) -> None:
    settings = make_settings(tmp_path, database_url)
    with Gateway(settings) as first:
        data = part10(ct_dataset(0))
        relpath = relpath_of(data)
        first.storage.write(relpath, data)
        first.storage.detach()  # as if the process had died with the write unfinished
        with Gateway(settings) as restarted:
            # Recovered: stored again (its row may have been lost after its success)...
            assert restarted.index.has_file(relpath)
            restarted.storage.sync()
            assert only_ready_spool_files(restarted.storage.incoming)
    with Gateway(settings) as again:  # ...and nothing left for a recovery to do
        assert again.storage.recover(again.index.has_file, stored_relpath) == (0, 0, 0, 0)


def test_a_write_finished_after_a_racing_delete_keeps_its_file(tmp_path: Path,
                                                               database_url: str) -> None:
    """Re-send of a stored instance while a delete of it commits: the new row keeps a file.

    The re-send finds the final name taken (same content) and keeps the old copy; the delete
    then removes that copy; the re-send's row is committed after: finishing restores the file.
    """
    settings = make_settings(tmp_path, database_url)
    with Gateway(settings) as gateway:
        data = part10(ct_dataset(0))
        relpath = relpath_of(data)
        gateway.storage.finish(gateway.storage.write(relpath, data))  # stored before
        pending = gateway.storage.write(relpath, data)  # the re-send: name taken, copy kept
        gateway.storage.delete(relpath)  # the racing delete, after its commit
        gateway.storage.finish(pending)  # the re-send's row is committed
        assert gateway.storage.path(relpath).read_bytes() == data
        gateway.storage.sync()  # its folder flushed, its spool name dropped
        assert not pending.temp.exists()


def test_delete_keeps_the_file_of_an_instance_stored_again_meanwhile(
        tmp_path: Path, database_url: str) -> None:
    """Delete: rows committed away, then a re-send is stored, then the files are removed."""
    from sqlalchemy import select

    from gateway.models import Instance

    settings = make_settings(tmp_path, database_url)
    with Gateway(settings) as gateway:
        data = part10(ct_dataset(0))
        gateway.ingestor.ingest(data, source="test")
        with gateway.index.Session() as session:
            pks = list(session.scalars(select(Instance.pk)))
        paths = gateway.index.write(lambda session: gateway.index.remove_instances(session, pks))
        gateway.ingestor.ingest(data, source="test")  # the re-send, between commit and files
        assert gateway.storage.delete_unindexed(paths, gateway.index.has_file) == 0
        (relpath,) = paths
        assert gateway.storage.path(relpath).read_bytes() == data
        assert gateway.index.has_file(relpath)


def test_spool_files_made_ahead_are_not_writes(tmp_path: Path, database_url: str) -> None:
    """The empty spool files kept ready are not unfinished writes, and are not made again at
    every start: the next process uses those the last one left."""
    settings = make_settings(tmp_path, database_url)
    with Gateway(settings) as gateway:
        gateway.ingestor.ingest(part10(ct_dataset(0)))
        gateway.storage.sync()  # the spool name of the write dropped once its folder is flushed
        incoming = gateway.storage.incoming
        made_ahead = {p.name for p in incoming.iterdir()}
        assert made_ahead and only_ready_spool_files(incoming)
        assert gateway.storage.unfinished() == []
    assert {p.name for p in incoming.iterdir()} == made_ahead  # left for the next process
    with Gateway(settings) as restarted:
        for index in range(1, 4):
            restarted.ingestor.ingest(part10(ct_dataset(index)))
        restarted.storage.sync()
        now = {p.name for p in incoming.iterdir()}
        assert only_ready_spool_files(incoming) and len(now) <= SPOOL_STOCK
        assert len(made_ahead - now) == 3  # three of them used, not three new ones made
    # not counted as writes by a recovery
    with Gateway(settings) as again:
        assert again.storage.recover(lambda relpath: False, stored_relpath) == (0, 0, 0, 0)


def test_a_series_folder_removed_meanwhile_is_made_again(tmp_path: Path,
                                                         database_url: str) -> None:
    settings = make_settings(tmp_path, database_url)
    with Gateway(settings) as gateway:
        first, second = ct_dataset(0), ct_dataset(1)
        gateway.ingestor.ingest(part10(first))
        row = gateway.index.find_instance(first.SOPInstanceUID)
        assert row is not None
        folder = gateway.storage.path(row.file_path).parent
        gateway.storage.delete(row.file_path)  # as a delete does: empty folders pruned
        assert not folder.exists()
        gateway.ingestor.ingest(part10(second))
        assert folder.is_dir() and len(list(folder.iterdir())) == 1
