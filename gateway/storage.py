"""The blob store: DICOM Part 10 files kept as received, written atomically and durably.

Layout under ``<data>/files``::

    <study>/<series>/<sop>.<digest12>.dcm     stored instances
    .incoming/<study>+<series>+<sop>.<digest12>.dcm.<random>   writes in progress

Every path is derived from validated UIDs and the content digest, never taken from input. A write
is: temp file in ``.incoming`` -> fsync -> hard link to its final name -> fsync the folder. The
temp name stays until the index row is committed (:meth:`FileStorage.finish`), so after a crash
:meth:`FileStorage.recover` knows each write that may not have been indexed, and nothing else has
to be scanned.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import GatewayError, StorageFull
from gateway.uids import validate_uid

logger = logging.getLogger(__name__)

INCOMING = ".incoming"
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class PendingWrite:
    """A file written and linked to its final name, not yet confirmed by an index commit."""

    relpath: str
    temp: Path


def relative_path(study: str, series: str, sop: str, digest: str) -> str:
    """Return the stored file's path relative to the files folder.

    >>> relative_path("1.2", "1.2.3", "1.2.3.4", "ab" * 32)
    '1.2/1.2.3/1.2.3.4.abababababab.dcm'
    """
    for uid, what in ((study, "StudyInstanceUID"), (series, "SeriesInstanceUID"),
                      (sop, "SOPInstanceUID")):
        validate_uid(uid, what)
    if len(digest) < 12 or not all(c in "0123456789abcdef" for c in digest):
        raise ValueError("digest must be lowercase hex")
    return f"{study}/{series}/{sop}.{digest[:12]}.dcm"


class FileStorage:
    """Files on a local (or shared, POSIX) file system.

    Parameters
    ----------
    root
        The folder that holds the files (created if missing).
    fsync
        Flush files and folders to stable storage before a write is reported done.
    min_free_bytes
        Refuse writes (:class:`StorageFull`) when less space than this is free.
    """

    def __init__(self, root: Path, *, fsync: bool = True, min_free_bytes: int = 0) -> None:
        self.root = root
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.incoming = root / INCOMING
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._lock: int | None = None

    # -- the processes sharing the folder -----------------------------------------------------
    def attach(self, is_indexed: Callable[[str], bool] | None = None) -> bool:
        """Join the processes using this folder; recover first if none other is attached.

        Parameters
        ----------
        is_indexed
            As for :meth:`recover`; ``None`` never recovers (a worker whose siblings write).

        Returns
        -------
        bool
            Whether recovery ran.
        """
        if self._lock is not None:
            return False
        fd = os.open(self.root.with_name(self.root.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        recovered = False
        try:
            if is_indexed is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    logger.info("another process uses the data folder: no crash recovery now")
                else:
                    self.recover(is_indexed)
                    recovered = True
            # Shared from here on; waits while another process holds the exclusive lock
            # (it is recovering: nothing may be written before it is done).
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        self._lock = fd
        return recovered

    def detach(self) -> None:
        """Leave the processes using this folder (the shared lock is released)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # -- reading ------------------------------------------------------------------------------
    def path(self, relpath: str) -> Path:
        """The absolute path of a stored file (``relpath`` comes from the index, never input)."""
        return self.root / relpath

    def open(self, relpath: str) -> os.PathLike[str]:
        return self.path(relpath)

    def exists(self, relpath: str) -> bool:
        return self.path(relpath).is_file()

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    # -- writing ------------------------------------------------------------------------------
    def check_space(self, needed: int) -> None:
        """Raise :class:`StorageFull` unless ``needed`` bytes fit above the free-space reserve."""
        if self.min_free_bytes and self.free_bytes() - needed < self.min_free_bytes:
            raise StorageFull(
                f"the data folder has less than {self.min_free_bytes // 1024**2} MiB free "
                "(storage.min_free_bytes); free space or add storage"
            )

    def write(self, relpath: str, data: bytes | Path) -> PendingWrite:
        """Write ``data`` durably under ``relpath``; return the pending write to finish.

        ``data`` is the bytes, or a file to copy. If the final file already exists with this
        name, it holds the same content (the name carries the digest) and is kept.

        Raises
        ------
        StorageFull
            On ENOSPC/EDQUOT or below the free-space reserve; nothing is left behind.
        """
        return self.place(self.spool(data), relpath)

    def spool(self, data: bytes | Path) -> Path:
        """First half of a write: the content, on stable storage under a temporary name.

        Done before the content's final name is known (while the instance is parsed), so that
        the disk works while the CPU does. A spooled file that is never placed is removed by
        :meth:`discard` or, after a crash, by :meth:`recover`.
        """
        size = len(data) if isinstance(data, bytes) else data.stat().st_size
        self.check_space(size)
        temp = self.incoming / f"{secrets.token_hex(8)}.part"
        try:
            with open(temp, "xb") as f:
                if isinstance(data, bytes):
                    f.write(data)
                else:
                    with open(data, "rb") as src:
                        shutil.copyfileobj(src, f, CHUNK)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as exc:
            _unlink(temp)
            raise _write_error(exc, "a received instance") from exc
        return temp

    def spool_unsynced(self, data: bytes) -> tuple[Path, int]:
        """:meth:`spool` in two steps: the bytes handed to the kernel now (cheap: they go to the
        page cache), the flush to stable storage by :meth:`sync_spooled`, possibly in another
        thread while this one parses. Returns the temporary file and its open descriptor."""
        self.check_space(len(data))
        temp = self.incoming / f"{secrets.token_hex(8)}.part"
        fd = -1
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            _unlink(temp)
            raise _write_error(exc, "a received instance") from exc
        return temp, fd

    def sync_spooled(self, spooled: tuple[Path, int]) -> Path:
        """Second step of :meth:`spool_unsynced`: fsync, close; the file is removed on failure."""
        temp, fd = spooled
        try:
            if self.fsync:
                os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            _unlink(temp)
            raise _write_error(exc, "a received instance") from exc
        os.close(fd)
        return temp

    def place(self, spooled: Path, relpath: str) -> PendingWrite:
        """Second half: give a spooled file its final name; the journal keeps the intent."""
        journal = self.incoming / f"{relpath.replace('/', '+')}.{spooled.stem}"
        final = self.path(relpath)
        try:
            os.rename(spooled, journal)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(journal, final)
            except FileExistsError:
                pass
            if self.fsync:
                # The final name must survive power loss before the write is acknowledged.
                # The journal name need not: it only serves to undo unacknowledged writes.
                _fsync_dir(final.parent)
        except OSError as exc:
            _unlink(journal)
            _unlink(spooled)
            raise _write_error(exc, relpath) from exc
        return PendingWrite(relpath, journal)

    def discard(self, spooled: Path) -> None:
        """Remove a spooled file that will not be placed."""
        _unlink(spooled)

    def finish(self, pending: PendingWrite) -> None:
        """Drop the journal entry of a write whose index row is committed.

        If the final name is gone (a delete of the same instance, committed between
        :meth:`place` and this row's commit, removed the copy that was already there), the
        journal entry, which holds the same content, is linked back first: a committed row
        never points at nothing.
        """
        final = self.path(pending.relpath)
        if not final.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(pending.temp, final)
            except FileExistsError:
                pass
            if self.fsync:
                _fsync_dir(final.parent)
        _unlink(pending.temp)

    def abandon(self, pending: PendingWrite, *, keep_final: bool = False) -> None:
        """Undo a write whose index row could not be committed."""
        if not keep_final:
            _unlink_if_same(self.path(pending.relpath), pending.temp)
        _unlink(pending.temp)

    def delete(self, relpath: str) -> None:
        """Remove a stored file and prune folders left empty."""
        path = self.path(relpath)
        _unlink(path)
        for parent in (path.parent, path.parent.parent):
            try:
                parent.rmdir()
            except OSError:
                break

    def delete_unindexed(self, relpaths: list[str], is_indexed: Callable[[str], bool]) -> int:
        """Remove the files of deleted rows, except those indexed again meanwhile.

        A delete removes its rows first, then the files. An identical re-send of a deleted
        instance committed in between has a row for the same path (same UIDs, same digest):
        its file must stay. Returns how many files were removed.
        """
        removed = 0
        for relpath in relpaths:
            if not is_indexed(relpath):
                self.delete(relpath)
                removed += 1
        return removed

    # -- recovery -----------------------------------------------------------------------------
    def pending_writes(self) -> Iterator[PendingWrite]:
        """The writes left in ``.incoming`` by a process that stopped before finishing them."""
        for temp in sorted(self.incoming.iterdir()):
            name = temp.name
            stem, _, _suffix = name.rpartition(".")
            relpath = stem.replace("+", "/")
            if not stem.endswith(".dcm") or relpath.count("/") != 2:
                yield PendingWrite("", temp)
                continue
            yield PendingWrite(relpath, temp)

    def recover(self, is_indexed: Callable[[str], bool]) -> tuple[int, int]:
        """Finish or undo the writes a crash left behind.

        Parameters
        ----------
        is_indexed
            Tells whether the index holds a row for a relative path.

        Returns
        -------
        tuple of int
            How many writes were confirmed (their row exists) and how many were undone.
        """
        kept = undone = 0
        for pending in self.pending_writes():
            if pending.relpath and is_indexed(pending.relpath):
                self.finish(pending)
                kept += 1
            else:
                if pending.relpath:
                    _unlink_if_same(self.path(pending.relpath), pending.temp)
                _unlink(pending.temp)
                undone += 1
        if kept or undone:
            logger.warning("recovered storage: %d writes confirmed, %d unfinished writes removed",
                           kept, undone)
        return kept, undone


def _write_error(exc: OSError, what: str) -> GatewayError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no space left in the data folder: {exc.strerror}")
    return GatewayError(f"cannot write {what}: {exc.strerror}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _unlink_if_same(final: Path, temp: Path) -> None:
    """Remove ``final`` only if it is the very file ``temp`` links to (never another write's)."""
    try:
        if temp.exists() and final.exists() and os.path.samefile(final, temp):
            final.unlink()
    except FileNotFoundError:
        pass
