"""The blob store's write path on a real file system: content kept byte for byte, whatever the
size and whether it goes around the page cache (O_DIRECT) or through it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
from conftest import make_settings

from gateway.core import Gateway
from gateway.storage import DIRECT_ALIGN, DIRECT_CHUNK, DIRECT_MIN, FileStorage, relative_path

SIZES = [0, 10, DIRECT_MIN - 1, DIRECT_MIN, DIRECT_MIN + 1, DIRECT_ALIGN * 129 + 17,
         DIRECT_CHUNK, DIRECT_CHUNK * 2 + DIRECT_ALIGN + 3]


@pytest.mark.parametrize("direct_io", [True, False], ids=["direct", "page-cache"])
@pytest.mark.parametrize("size", SIZES)
def test_a_spooled_and_placed_file_holds_exactly_the_bytes(tmp_path: Path, size: int,
                                                           direct_io: bool) -> None:
    storage = FileStorage(tmp_path / "files", direct_io=direct_io)
    data = os.urandom(size)
    relpath = relative_path("1.2.3", "1.2.3.4", f"1.2.3.4.{size}", "ab" * 32)
    pending = storage.place_unsynced(storage.spool_unsynced(data), relpath)
    storage.finish(pending)
    assert storage.path(relpath).read_bytes() == data
    assert storage.unfinished() == []
    # The test folder's file system takes O_DIRECT (ext4, XFS, tmpfs since Linux 6.6): the
    # direct path ran, rather than being turned off after a refusal.
    assert storage.direct_io is direct_io
    storage.detach()


def test_a_refused_spool_leaves_nothing(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "files")
    spooled = storage.spool_unsynced(os.urandom(DIRECT_ALIGN * 3 + 5))
    storage.discard_unsynced(spooled)
    assert storage.unfinished() == []
    storage.detach()
    assert list(storage.incoming.iterdir()) == []


@pytest.mark.parametrize("size, direct", [(DIRECT_MIN - 1, False), (DIRECT_MIN, True),
                                          (DIRECT_CHUNK + 1, True)])
def test_large_instances_go_around_the_page_cache(tmp_path: Path, size: int,
                                                  direct: bool) -> None:
    """From DIRECT_MIN bytes on the spool file is written with O_DIRECT; below, it is not."""
    storage = FileStorage(tmp_path / "files")
    temp, fd = storage.spool_unsynced(os.urandom(size))
    assert bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT) is direct
    assert os.fstat(fd).st_size == size  # the padded last block cut back
    storage.discard_unsynced((temp, fd))
    storage.detach()


def test_direct_io_can_be_turned_off(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url, GATEWAY_STORAGE_DIRECT_IO="false")
    with Gateway(settings) as gateway:
        temp, fd = gateway.storage.spool_unsynced(os.urandom(DIRECT_MIN * 2))
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        gateway.storage.discard_unsynced((temp, fd))
