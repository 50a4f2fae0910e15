"""Writes and flushes in the C library's threads (POSIX AIO) on a real file system: the bytes
land whole, and a failed write or flush is reported by the wait, with its errno."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from gateway import posix_aio

pytestmark = pytest.mark.skipif(not posix_aio.AVAILABLE,
                                reason="POSIX AIO of glibc on a 64-bit Linux")


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 9_500, 65_535])
def test_the_bytes_are_written_whole(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "spool"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        flush = posix_aio.write_and_flush(fd, memoryview(data))
        del data  # the request holds its own copy of the bytes
        assert flush.wait() == size
        assert flush.wait() == size  # a second wait returns at once, the same
    finally:
        os.close(fd)
    assert len(path.read_bytes()) == size


def test_many_writes_under_way_at_once(tmp_path: Path) -> None:
    """Requests of different descriptors run side by side; each lands in its own file."""
    contents = [os.urandom(1000 + n) for n in range(40)]
    fds = [os.open(tmp_path / f"{n}", os.O_WRONLY | os.O_CREAT) for n in range(40)]
    flushes = [posix_aio.write_and_flush(fd, memoryview(data))
               for fd, data in zip(fds, contents, strict=True)]
    for flush, data in zip(reversed(flushes), reversed(contents), strict=True):
        assert flush.wait() == len(data)
    for fd in fds:
        os.close(fd)
    for n, data in enumerate(contents):
        assert (tmp_path / f"{n}").read_bytes() == data


def test_a_full_device_is_reported_by_the_wait() -> None:
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        flush = posix_aio.write_and_flush(fd, memoryview(b"x" * 100))
        with pytest.raises(OSError) as caught:
            flush.wait()
        assert caught.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_a_descriptor_not_open_for_writing_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "read-only"
    path.write_bytes(b"kept")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as caught:
            posix_aio.write_and_flush(fd, memoryview(b"new")).wait()
        assert caught.value.errno == errno.EBADF
    finally:
        os.close(fd)
    assert path.read_bytes() == b"kept"


def test_a_closed_descriptor_is_refused_at_once() -> None:
    fd = os.open("/dev/null", os.O_WRONLY)
    os.close(fd)
    with pytest.raises(OSError) as caught:
        posix_aio.write_and_flush(fd, memoryview(b"x")).wait()
    assert caught.value.errno == errno.EBADF
