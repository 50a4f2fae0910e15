"""The blob store: DICOM Part 10 files kept as received, written atomically and durably.

Layout under ``<data>/files``::

    <study>/<series>/<sop>.<digest12>.dcm     stored instances
    .incoming/<random>.part                    spool files (empty ones are kept ready)
    .incoming/<study>+<series>+<sop>.<digest12>.dcm.<random>   writes in progress

Every path is derived from validated UIDs and the content digest, never taken from input. A write
is: the bytes into a spool file in ``.incoming`` -> renamed to its journal name -> hard link to its
final name -> fsync of the file and of the folder. A final name found taken is kept only if its
file holds the same data set (a power failure can leave a name whose content never reached the
disk); else this write's file replaces it. The journal name stays until the index row is
committed (:meth:`FileStorage.finish`), so after a crash :meth:`FileStorage.recover` knows each
write that may not have been indexed, and nothing else has to be scanned.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import queue
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import GatewayError, StorageFull
from gateway.metadata import dataset_offset
from gateway.uids import validate_uid

logger = logging.getLogger(__name__)

INCOMING = ".incoming"
CHUNK = 1024 * 1024
# Empty spool files kept created ahead of need (see FileStorage._new_spool_file).
SPOOL_STOCK = 8
# Received instances from DIRECT_MIN bytes on go around the page cache (O_DIRECT), through an
# aligned buffer of DIRECT_CHUNK bytes per thread; smaller ones are written sooner through it.
DIRECT_MIN = 64 * 1024
DIRECT_CHUNK = 4 * 1024 * 1024
DIRECT_ALIGN = 4096  # a multiple of every device's logical block size


@dataclass(frozen=True)
class PendingWrite:
    """A file written and linked to its final name, not yet confirmed by an index commit.

    ``journal`` is the file's name in ``.incoming``, as a string: the write path joins and
    passes strings, since a :class:`~pathlib.Path` built and converted per call cost a tenth
    of a small C-STORE's time with the interpreter lock held.
    """

    relpath: str
    journal: str

    @property
    def temp(self) -> Path:
        return Path(self.journal)


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
    direct_io
        Write received instances of :data:`DIRECT_MIN` bytes or more with ``O_DIRECT``.
    """

    def __init__(self, root: Path, *, fsync: bool = True, min_free_bytes: int = 0,
                 direct_io: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.direct_io = direct_io and hasattr(os, "O_DIRECT")
        self._direct_buffers = threading.local()
        self.incoming = root / INCOMING
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._root = str(root)
        self._incoming = str(self.incoming)
        self._lock: int | None = None
        # Creating a file costs the kernel far more than writing a small one (about 0.5 ms of
        # system time on ext4, against 0.02 ms for a rename): a thread keeps a few empty spool
        # files ready, so that a C-STORE does not wait for one to be created.
        self._stock: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        self._stock_low = threading.Event()
        self._stocker: threading.Thread | None = None
        self._stocker_lock = threading.Lock()
        self._closed = False

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
        """Leave the processes using this folder (the shared lock is released).

        The spool files created ahead and not used are removed first.
        """
        self._stop_stocking()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # -- reading ------------------------------------------------------------------------------
    def path(self, relpath: str) -> Path:
        """The absolute path of a stored file (``relpath`` comes from the index, never input)."""
        return self.root / relpath

    def _final(self, relpath: str) -> str:
        """:meth:`path` as a string, for the write path."""
        return f"{self._root}/{relpath}"

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

    def spool(self, data: bytes | Path) -> str:
        """First half of a write: the content, on stable storage under a temporary name.

        Done before the content's final name is known (while the instance is parsed), so that
        the disk works while the CPU does. A spooled file that is never placed is removed by
        :meth:`discard` or, after a crash, by :meth:`recover`.
        """
        size = len(data) if isinstance(data, bytes) else data.stat().st_size
        self.check_space(size)
        temp = None
        try:
            temp, fd = self._new_spool_file()
            with open(fd, "wb") as f:
                if isinstance(data, bytes):
                    f.write(data)
                else:
                    with open(data, "rb") as src:
                        shutil.copyfileobj(src, f, CHUNK)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as exc:
            if temp is not None:
                _unlink(temp)
            raise _write_error(exc, "a received instance") from exc
        return temp

    def spool_unsynced(self, data: bytes) -> tuple[str, int]:
        """:meth:`spool` without the flush: the bytes are handed to the kernel before the
        content's final name is known; :meth:`place_unsynced` gives the name and flushes.
        Returns the temporary file and its open descriptor.

        With ``direct_io``, an instance of :data:`DIRECT_MIN` bytes or more goes to the device
        without passing through the page cache (``O_DIRECT``): copying it there and writing
        the pages back later cost the kernel more CPU than the whole rest of a C-STORE of a CT
        image (docs/benchmarks.md). A small one is written sooner through the page cache.
        """
        self.check_space(len(data))
        temp, fd = None, -1
        try:
            temp, fd = self._new_spool_file()
            view = memoryview(data)
            if self.direct_io and len(view) >= DIRECT_MIN:
                view = self._write_direct(fd, view)
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            if temp is not None:
                _unlink(temp)
            raise _write_error(exc, "a received instance") from exc
        return temp, fd

    def _write_direct(self, fd: int, view: memoryview) -> memoryview:
        """Write ``view`` to ``fd`` with ``O_DIRECT`` (turned on here: spool files are opened
        without it, so that a small instance needs no second system call); return what is left
        to write.

        ``O_DIRECT`` wants the memory, the length and the file offset aligned: the bytes are
        copied, a chunk at a time, into this thread's page-aligned buffer, the last block
        padded with zeros and cut off again by ``ftruncate`` (three system calls for an instance
        of up to :data:`DIRECT_CHUNK` bytes). Should the file system refuse, ``O_DIRECT`` is
        turned off for the process and what is left goes through the page cache.
        """
        buffer = getattr(self._direct_buffers, "buffer", None)
        if buffer is None:
            buffer = self._direct_buffers.buffer = mmap.mmap(-1, DIRECT_CHUNK)
        total = len(view)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, os.O_DIRECT)  # the file was opened with no flag
        except OSError as exc:
            self._refused_direct_io(exc)
            return view
        try:
            while view:
                size = min(len(view), DIRECT_CHUNK)
                padded = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
                buffer[:size] = view[:size]
                buffer[size:padded] = bytes(padded - size)
                written = os.write(fd, memoryview(buffer)[:padded])
                if written < size:  # a short write: the rest through the page cache
                    view = view[written:]
                    break
                view = view[size:]
            else:
                os.ftruncate(fd, total)
                return view
        except OSError as exc:
            self._refused_direct_io(exc)
        fcntl.fcntl(fd, fcntl.F_SETFL, 0)  # O_DIRECT off (no other flag was set)
        os.ftruncate(fd, total - len(view))  # drop a padded block written past the data
        os.lseek(fd, total - len(view), os.SEEK_SET)
        return view

    def _refused_direct_io(self, exc: OSError) -> None:
        """Turn ``O_DIRECT`` off if ``exc`` is the file system refusing it, else re-raise."""
        if exc.errno != errno.EINVAL:
            raise exc
        logger.info("the data folder's file system refuses O_DIRECT: writing through the "
                    "page cache")
        self.direct_io = False

    def _new_spool_file(self) -> tuple[str, int]:
        """An empty spool file, open for writing: one created ahead, else a new one."""
        if self._stocker is None:
            self._start_stocking()
        try:
            spool = self._stock.get_nowait()
        except queue.Empty:
            spool = self._create_spool_file()
        if self._stock.qsize() <= SPOOL_STOCK // 2:
            self._stock_low.set()  # refilled by the half: one wake-up for several files
        return spool

    def _create_spool_file(self) -> tuple[str, int]:
        temp = f"{self._incoming}/{secrets.token_hex(8)}.part"
        return temp, os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def _start_stocking(self) -> None:
        with self._stocker_lock:
            if self._stocker is not None or self._closed:
                return
            self._stock_low.set()
            self._stocker = threading.Thread(target=self._stock_spool_files,
                                             name="spool-stock", daemon=True)
            self._stocker.start()

    def _stock_spool_files(self) -> None:
        """Keep up to :data:`SPOOL_STOCK` empty spool files ready."""
        while True:
            self._stock_low.wait()
            self._stock_low.clear()
            while self._stock.qsize() < SPOOL_STOCK:
                if self._closed:
                    return
                try:
                    self._stock.put(self._create_spool_file())
                except OSError as exc:  # full or failing disk: writes create their own
                    logger.debug("no spool file created ahead: %s", exc)
                    break
            if self._closed:
                return

    def _stop_stocking(self) -> None:
        with self._stocker_lock:
            self._closed = True
            stocker, self._stocker = self._stocker, None
        if stocker is not None:
            self._stock_low.set()
            stocker.join(timeout=10)
        while True:
            try:
                temp, fd = self._stock.get_nowait()
            except queue.Empty:
                return
            os.close(fd)
            _unlink(temp)

    def discard_unsynced(self, spooled: tuple[str, int]) -> None:
        """Remove a file from :meth:`spool_unsynced` that will not be placed."""
        temp, fd = spooled
        os.close(fd)
        _unlink(temp)

    def place_unsynced(self, spooled: tuple[str, int], relpath: str) -> PendingWrite:
        """:meth:`place` for a file from :meth:`spool_unsynced`: named first, then flushed.

        The content and its final name are flushed once the name is given, in the calling
        thread (on a file system with one journal, such as ext4 or XFS, the file's fsync then
        commits the new name too and the folder's fsync, which POSIX needs for it, has little
        left to do). Nothing is acknowledged before both are done, and until the index row is
        committed the journal name lets :meth:`recover` undo the write.
        """
        temp, fd = spooled
        try:
            pending = self.place(temp, relpath, sync_folder=False)
        except BaseException:
            os.close(fd)
            raise
        try:
            if self.fsync:
                os.fsync(fd)
                _fsync(os.path.dirname(self._final(relpath)))
        except OSError as exc:
            self.abandon(pending)
            raise _write_error(exc, relpath) from exc
        finally:
            os.close(fd)
        return pending

    def place(self, spooled: str, relpath: str, *, sync_folder: bool = True) -> PendingWrite:
        """Second half: give a spooled file its final name; the journal keeps the intent."""
        stem = os.path.basename(spooled).partition(".")[0]
        journal = f"{self._incoming}/{relpath.replace('/', '+')}.{stem}"
        final = self._final(relpath)
        try:
            os.rename(spooled, journal)
            if not _link(journal, final):
                self._check_existing(journal, final)
            if self.fsync and sync_folder:
                # The final name must survive power loss before the write is acknowledged.
                # The journal name need not: it only serves to undo unacknowledged writes.
                _fsync(os.path.dirname(final))
        except OSError as exc:
            _unlink(journal)
            _unlink(spooled)
            raise _write_error(exc, relpath) from exc
        return PendingWrite(relpath, journal)

    def _check_existing(self, journal: str, final: str) -> None:
        """The final name exists already: keep it if it holds this write's data set, else
        give the name to this write's file.

        The name carries the data set's digest, so an earlier or concurrent write of the same
        data set made it, and it is flushed here too before anything is acknowledged on it.
        But a name can reach the disk before its file's content: after a power failure it may
        stand for an empty or cut-short file, which a re-send must repair, not confirm.
        """
        if _same_data_set(final, journal):
            if self.fsync:
                _fsync(final)
            return
        logger.warning("stored file %s did not hold its data set (cut short by a power "
                       "failure?): replaced by the copy just received",
                       os.path.relpath(final, self._root))
        os.rename(journal, final)  # atomic: a reader has the old file or the new one
        os.link(final, journal)  # the journal entry back, until the index row is committed

    def discard(self, spooled: str) -> None:
        """Remove a spooled file that will not be placed."""
        _unlink(spooled)

    def finish(self, pending: PendingWrite) -> None:
        """Drop the journal entry of a write whose index row is committed.

        If the final name is gone (a delete of the same instance, committed between
        :meth:`place` and this row's commit, removed the copy that was already there), the
        journal entry, which holds the same content, is linked back first: a committed row
        never points at nothing.
        """
        final = self._final(pending.relpath)
        if not os.path.exists(final):
            _link(pending.journal, final)
            if self.fsync:
                _fsync(os.path.dirname(final))
        _unlink(pending.journal)

    def abandon(self, pending: PendingWrite, *, keep_final: bool = False) -> None:
        """Undo a write whose index row could not be committed."""
        if not keep_final:
            _unlink_if_same(self._final(pending.relpath), pending.journal)
        _unlink(pending.journal)

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

    def unfinished(self) -> list[Path]:
        """The files in ``.incoming`` that hold a write not finished or undone yet.

        The empty spool files kept ready for the next writes are not counted.
        """
        return [path for path in self.incoming.iterdir()
                if not (path.suffix == ".part" and _is_empty(path))]

    # -- recovery -----------------------------------------------------------------------------
    def pending_writes(self) -> Iterator[PendingWrite]:
        """The writes left in ``.incoming`` by a process that stopped before finishing them."""
        for temp in sorted(self.incoming.iterdir()):
            name = temp.name
            stem, _, _suffix = name.rpartition(".")
            relpath = stem.replace("+", "/")
            if not stem.endswith(".dcm") or relpath.count("/") != 2:
                yield PendingWrite("", str(temp))
                continue
            yield PendingWrite(relpath, str(temp))

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
            if not pending.relpath and _is_empty(pending.journal):
                _unlink(pending.journal)  # a spool file created ahead, never written
                continue
            if pending.relpath and is_indexed(pending.relpath):
                self.finish(pending)
                kept += 1
            else:
                if pending.relpath:
                    _unlink_if_same(self._final(pending.relpath), pending.journal)
                _unlink(pending.journal)
                undone += 1
        if kept or undone:
            logger.warning("recovered storage: %d writes confirmed, %d unfinished writes removed",
                           kept, undone)
        return kept, undone


def _write_error(exc: OSError, what: str) -> GatewayError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no space left in the data folder: {exc.strerror}")
    return GatewayError(f"cannot write {what}: {exc.strerror}")


def _link(source: str, name: str) -> bool:
    """Give ``source`` the name ``name``, creating its folders if missing; ``False`` if the
    name exists (it is left as it is).

    The link is tried first: the folders of a series exist for all but its first instance.
    """
    try:
        os.link(source, name)
    except FileExistsError:
        return False
    except FileNotFoundError:
        os.makedirs(os.path.dirname(name), exist_ok=True)
        try:
            os.link(source, name)
        except FileExistsError:
            return False
    return True


def _same_data_set(a: str, b: str) -> bool:
    """Whether two Part 10 files hold the same data set, byte for byte (their file meta
    information, which names the sender, may differ); files without a Part 10 header are
    compared whole. Read a chunk at a time: a multi-frame instance may not fit in memory."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offsets = [dataset_offset(f.read(144)) for f in (fa, fb)]
        sizes = [os.fstat(f.fileno()).st_size for f in (fa, fb)]
        if sizes[0] - offsets[0] != sizes[1] - offsets[1]:
            return False
        fa.seek(offsets[0])
        fb.seek(offsets[1])
        while True:
            chunk = fa.read(CHUNK)
            if chunk != fb.read(CHUNK):
                return False
            if not chunk:
                return True


def _fsync(path: str) -> None:
    """Flush a file or a folder (opened read-only: Linux flushes either through such a
    descriptor)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_empty(path: str | Path) -> bool:
    try:
        return os.stat(path).st_size == 0
    except FileNotFoundError:
        return True


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _unlink_if_same(final: str, temp: str) -> None:
    """Remove ``final`` only if it is the very file ``temp`` links to (never another write's)."""
    try:
        if os.path.samefile(final, temp):
            os.unlink(final)
    except FileNotFoundError:
        pass
