"""The blob store's write path on a real file system: content kept byte for byte, whatever the
size and whether it goes around the page cache (O_DIRECT) or through it."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.core import Gateway
from gateway.ingest import Outcome, read_part10
from gateway.metadata import parse_instance
from gateway.part10 import file_meta_header
from gateway.storage import DIRECT_ALIGN, DIRECT_CHUNK, DIRECT_MIN, FileStorage, relative_path
from tests.support.common import make_settings, only_ready_spool_files

SAMPLE = Path(__file__).parent.parent / "sample_dicom" / "files" / "ct_explicit_le.dcm"

SIZES = [0, 10, DIRECT_MIN - 1, DIRECT_MIN, DIRECT_MIN + 1, DIRECT_ALIGN * 129 + 17,
         DIRECT_CHUNK, DIRECT_CHUNK * 2 + DIRECT_ALIGN + 3]


@pytest.mark.parametrize("fsync", [True, False], ids=["flushed", "unflushed"])
@pytest.mark.parametrize("direct_io", [True, False], ids=["direct", "page-cache"])
@pytest.mark.parametrize("size", SIZES)
def test_a_spooled_and_placed_file_holds_exactly_the_bytes(
        tmp_path: Path, size: int, direct_io: bool, fsync: bool) -> None:
    """Whichever way it is written: around the page cache from DIRECT_MIN bytes on, a smaller
    one written and flushed in one call when placed, or (flushing off) through the page cache
    at once."""
    storage = FileStorage(tmp_path / "files", direct_io=direct_io, fsync=fsync)
    data = os.urandom(size)
    relpath = relative_path("1.2.3", "1.2.3.4", f"1.2.3.4.{size}", "ab" * 32)
    pending = storage.place(storage.spool(data), relpath)
    storage.finish(pending)
    assert storage.path(relpath).read_bytes() == data
    assert storage.unfinished() == []
    # The test folder's file system takes O_DIRECT (ext4, XFS, tmpfs since Linux 6.6): the
    # direct path ran, rather than being turned off after a refusal.
    assert storage.direct_io is direct_io
    storage.detach()


def test_a_refused_spool_leaves_nothing(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "files")
    spooled = storage.spool(os.urandom(DIRECT_ALIGN * 3 + 5))
    storage.discard(spooled)
    assert storage.unfinished() == []
    storage.detach()
    assert not Path(spooled.temp).exists()
    assert only_ready_spool_files(storage.incoming)


@pytest.mark.parametrize("size, direct", [(DIRECT_MIN - 1, False), (DIRECT_MIN, True),
                                          (DIRECT_CHUNK + 1, True)])
def test_large_instances_go_around_the_page_cache(tmp_path: Path, size: int,
                                                  direct: bool) -> None:
    """From DIRECT_MIN bytes on the spool file is written with O_DIRECT; below, it is not."""
    storage = FileStorage(tmp_path / "files")
    spooled = storage.spool(os.urandom(size))
    assert bool(fcntl.fcntl(spooled.fd, fcntl.F_GETFL) & os.O_DIRECT) is direct
    if direct:
        assert os.fstat(spooled.fd).st_size == size  # the padded last block cut back
    storage.discard(spooled)
    storage.detach()



def test_a_small_instance_is_written_when_placed(tmp_path: Path) -> None:
    """The bytes of an instance under DIRECT_MIN wait in memory while it is checked: a refused
    instance is never written, a placed one is written and flushed by place."""
    storage = FileStorage(tmp_path / "files")
    refused = storage.spool(os.urandom(1000))
    assert os.fstat(refused.fd).st_size == 0
    storage.discard(refused)
    data = os.urandom(1000)
    spooled = storage.spool(data)
    assert os.fstat(spooled.fd).st_size == 0
    relpath = relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5", "ab" * 32)
    storage.finish(storage.place(spooled, relpath))
    assert storage.path(relpath).read_bytes() == data
    assert storage.unfinished() == []
    storage.detach()



def test_without_fdatasync_nor_rwf_dsync_ingest_still_flushes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """macOS has neither ``os.fdatasync`` nor ``RWF_DSYNC``: a placed instance is still
    written, flushed and indexed, and the index's log flushed."""
    import gateway.storage
    from gateway.core import Gateway
    from tests.support.common import ct_dataset, make_settings, part10

    monkeypatch.delattr(os, "fdatasync")
    monkeypatch.setattr(gateway.storage, "_RWF_DSYNC", 0)
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'index.sqlite'}")
    with Gateway(settings) as gw:
        data = part10(ct_dataset(0))
        result = gw.ingestor.ingest(data)
        assert result.outcome.value == "stored"
        gw.index.flush()
        (stored,) = (tmp_path / "data" / "files").rglob("*.dcm")
        assert stored.read_bytes() == data
        assert gw.index.has_file(str(stored.relative_to(tmp_path / "data" / "files")))

REFUSED_DIRECT_IO = """
import os, sys
from pathlib import Path
from gateway.storage import DIRECT_MIN, FileStorage, relative_path

storage = FileStorage(Path(sys.argv[1]) / "files")
for n, size in enumerate([DIRECT_MIN * 3 + 5, DIRECT_MIN]):
    data = os.urandom(size)
    relpath = relative_path("1.2", "1.2.3", f"1.2.3.{n}", "ab" * 32)
    storage.finish(storage.place(storage.spool(data), relpath))
    assert storage.path(relpath).read_bytes() == data, size
print(storage.direct_io, storage.unfinished())
storage.detach()
"""


def test_a_file_system_that_refuses_o_direct_gets_the_page_cache(tmp_path: Path) -> None:
    """ramfs refuses O_DIRECT (EINVAL): large instances are then written through the page
    cache, whole, and O_DIRECT stays off. Run in a mount namespace of its own, where the test
    may mount it (unshare, util-linux)."""
    mount = tmp_path / "ramfs"
    mount.mkdir()
    script = ('mount -t ramfs ramfs "$1" && shift && exec "$@"')
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh",
         str(mount), sys.executable, "-c", REFUSED_DIRECT_IO, str(mount)],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "False []"


def test_direct_io_can_be_turned_off(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url, GATEWAY_STORAGE_DIRECT_IO="false")
    with Gateway(settings) as gateway:
        spooled = gateway.storage.spool(os.urandom(DIRECT_MIN * 2))
        assert not fcntl.fcntl(spooled.fd, fcntl.F_GETFL) & os.O_DIRECT
        gateway.storage.discard(spooled)


def part10(data_set: bytes, source_ae_title: str) -> bytes:
    return file_meta_header("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4.5",
                            "1.2.840.10008.1.2.1", source_ae_title) + data_set


def test_a_re_send_keeps_the_stored_file_of_the_same_data_set(tmp_path: Path) -> None:
    """Sent again (here by another AE, so another file meta group): the first file stays."""
    storage = FileStorage(tmp_path / "files")
    relpath = relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5", "ab" * 32)
    data_set = os.urandom(5000)
    storage.finish(storage.write(relpath, part10(data_set, "FIRST")))
    first = storage.path(relpath).stat().st_ino
    storage.finish(storage.write(relpath, part10(data_set, "SECOND")))
    assert storage.path(relpath).stat().st_ino == first
    assert storage.path(relpath).read_bytes() == part10(data_set, "FIRST")
    assert storage.unfinished() == []
    storage.detach()


@pytest.mark.parametrize("left", [b"", b"cut short", "zeros"], ids=["empty", "cut-short", "zeros"])
def test_a_re_send_repairs_a_file_a_power_failure_left_incomplete(tmp_path: Path,
                                                                  left: bytes | str) -> None:
    """A name can reach the disk before its file's content: the next write of that data set
    must not take the empty, cut-short or zero-filled file for its own."""
    storage = FileStorage(tmp_path / "files")
    relpath = relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5", "ab" * 32)
    data = part10(os.urandom(5000), "MODALITY")
    final = storage.path(relpath)
    final.parent.mkdir(parents=True)
    final.write_bytes(bytes(len(data)) if left == "zeros" else data[:len(data) // 2]
                      if left else b"")
    storage.finish(storage.write(relpath, data))
    assert final.read_bytes() == data
    assert storage.unfinished() == []
    storage.detach()


def test_an_instance_whose_file_a_power_failure_left_empty_is_stored_whole(
        gateway: Gateway) -> None:
    """Through ingest: the name of the file was on disk, its content and index row were not."""
    data = read_part10(SAMPLE)
    parsed = parse_instance(data)
    relpath = relative_path(parsed.study_instance_uid, parsed.series_instance_uid,
                            parsed.sop_instance_uid, parsed.digest)
    final = gateway.storage.path(relpath)
    final.parent.mkdir(parents=True)
    final.write_bytes(b"")
    assert gateway.ingestor.ingest(data).outcome is Outcome.STORED
    assert final.read_bytes() == data
    assert gateway.storage.unfinished() == []
