"""The blob store: DICOM Part 10 files kept as received, written atomically and durably.

Layout under ``<data>/files``::

    <study>/<series>/<sop>.<digest12>.dcm     stored instances
    .incoming/<random>.part                    spool files: ready (empty) or holding a write

Every path is derived from validated UIDs and the content digest, never taken from input.

A write (PS3.4 B.2.3: success only once the instance is kept):

1. the bytes go into a spool file whose *name* was flushed to disk before it was handed out
   (a thread keeps a few ready, :meth:`FileStorage._stock_spool_files`);
2. the content is flushed (``fsync``), then the file is linked to its final name;
3. the caller commits the index row (not flushed yet), then :meth:`FileStorage.finish` hands
   the write to a flushing thread, and the caller acknowledges;
4. that thread flushes the final folder (and the folders above it if they were made) and the
   index's log (``flush_index``), in batches, and only then drops the spool name.

So at the acknowledgement the content is on stable storage under a name on stable storage
(its spool name, until the final name and the row are), and the row is committed. Nothing
waits for a folder's or the index's flush. After a crash or a power failure,
:meth:`FileStorage.recover` reads each file left in ``.incoming``: an instance whose row is
there gets its final name back (and flushed); one whose row is not (lost with the log's tail)
is stored again (``restore``), in the order the files were written; a file whose content
never reached the disk (only zero bytes) is removed. A file holding no instance that can be
read (in the time :class:`gateway.recovery.RecoveryReader` gives it), or whose storing fails
unexpectedly, is moved to ``<data>/quarantine`` (never deleted: it may be patient data), so
that the node always comes up. No other part of the store has to be scanned. A refused
instance's spool file is removed, and the removal flushed, before the refusal is answered, so
that recovery cannot store it. A final name found taken is kept only if its file holds the
same data set; else this write's file replaces it.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import mmap
import os
import queue
import secrets
import shutil
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from gateway.errors import GatewayError, StorageFull
from gateway.metadata import dataset_offset
from gateway.uids import validate_uid

logger = logging.getLogger(__name__)

INCOMING = ".incoming"
QUARANTINE = "quarantine"  # beside the files folder: <data>/quarantine
# Modes of what holds patient data: the gateway's user only (the umask can only narrow them).
PRIVATE_FILE = 0o600
PRIVATE_FOLDER = 0o700
CHUNK = 1024 * 1024
# Empty spool files kept created ahead of need (see FileStorage._new_spool_file).
SPOOL_STOCK = 64
# Received instances from DIRECT_MIN bytes on go around the page cache (O_DIRECT), through an
# aligned buffer of DIRECT_CHUNK bytes per thread; smaller ones are written sooner through it.
DIRECT_MIN = 64 * 1024
DIRECT_CHUNK = 4 * 1024 * 1024
DIRECT_ALIGN = 4096  # a multiple of every device's logical block size
# How long the chores' thread gathers finished writes before flushing their folders.
FLUSH_GATHER_SECONDS = 0.01
STOCK_LOW = "stock low"  # the chore of refilling the stock of spool files
# Write and flush in one system call (pwritev2, Linux 4.7); 0 where the platform has none.
_RWF_DSYNC: int = getattr(os, "RWF_DSYNC", 0)
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class PendingWrite:
    """A file flushed and linked to its final name, not yet confirmed by an index commit.

    ``spool`` is the file's name in ``.incoming``, as a string: the write path joins and
    passes strings, since a :class:`~pathlib.Path` built and converted per call cost a tenth
    of a small C-STORE's time with the interpreter lock held. ``made_folders`` tells that the
    final name's folders were created by this write (their parents need a flush too).
    """

    relpath: str
    spool: str
    made_folders: bool = False

    @property
    def temp(self) -> Path:
        return Path(self.spool)


@dataclass(slots=True)
class Spooled:
    """A spool file taken for a write (:meth:`FileStorage.spool`): its name, its open
    descriptor, and the bytes of a small instance (``None`` for a large one, written at
    once), written and flushed by :meth:`FileStorage.place`."""

    temp: str
    fd: int
    unwritten: memoryview | None = None
    written: bool = False  # bytes sent to the file (to disk, maybe): its removal is flushed


class Blob(Protocol):
    """One stored instance, read by byte ranges: a file (:class:`LocalBlob`) or an object
    (:class:`gateway.s3.S3Blob`). ``key`` tells blobs apart in caches; ``name`` is for
    messages. A missing blob raises :class:`FileNotFoundError`."""

    key: Hashable
    name: str

    def size(self) -> int: ...

    def read_at(self, offset: int, length: int) -> bytes: ...

    def open(self) -> BinaryIO: ...


class LocalBlob:
    """A stored file as a :class:`Blob`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.key: Hashable = path
        self.name = path.name

    def size(self) -> int:
        return self.path.stat().st_size

    def read_at(self, offset: int, length: int) -> bytes:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def open(self) -> BinaryIO:
        return open(self.path, "rb")


class BlobStore(Protocol):
    """Where instances are kept: :class:`FileStorage` (the default) or
    :class:`gateway.s3.S3Storage`. The ingest path calls :meth:`spool`, :meth:`place` (the
    instance kept), then :meth:`finish` once its row is committed, or :meth:`abandon`; readers
    use :meth:`blob` (byte ranges), :meth:`path` (a whole local file) or
    :meth:`stream_async`; ``local`` tells that :meth:`path` is the stored file itself."""

    local: bool

    def detach(self) -> None: ...
    def check_ready(self) -> None: ...
    def check_space(self, needed: int) -> None: ...
    def free_bytes(self) -> int: ...
    def spool(self, data: bytes) -> Any: ...
    def discard(self, spooled: Any) -> None: ...
    def place(self, spooled: Any, relpath: str) -> PendingWrite: ...
    def write(self, relpath: str, data: bytes) -> PendingWrite: ...
    def finish(self, pending: PendingWrite) -> None: ...
    def abandon(self, pending: PendingWrite, *, keep_final: bool = False,
                flush: bool = True) -> None: ...
    def settle(self) -> None: ...
    def sync(self, timeout: float = 60.0) -> None: ...
    def delete(self, relpath: str) -> None: ...
    def delete_unindexed(self, relpaths: list[str],
                         is_indexed: Callable[[str], bool]) -> int: ...
    def exists(self, relpath: str) -> bool: ...
    def path(self, relpath: str) -> Path: ...
    def blob(self, relpath: str, size: int | None = None) -> Blob: ...
    def stream_async(self, relpath: str) -> AsyncIterator[bytes]: ...


def delete_unnamed(relpaths: list[str], is_indexed: Callable[[str], bool],
                   delete: Callable[[str], None]) -> int:
    """Delete those of ``relpaths`` no index row names (their rows deleted and committed
    first); return how many. An identical re-send committed meanwhile names its path again:
    its file or object stays."""
    removed = 0
    for relpath in relpaths:
        if not is_indexed(relpath):
            delete(relpath)
            removed += 1
    return removed


def relative_path(study: str, series: str, sop: str, digest: str) -> str:
    """Return the stored file's path relative to the files folder.

    >>> relative_path("1.2", "1.2.3", "1.2.3.4", "ab" * 32)
    '1.2/1.2.3/1.2.3.4.abababababab.dcm'
    """
    for uid, what in ((study, "StudyInstanceUID"), (series, "SeriesInstanceUID"),
                      (sop, "SOPInstanceUID")):
        validate_uid(uid, what)
    if len(digest) < 12 or not _HEX.issuperset(digest):
        raise ValueError("digest must be lowercase hex")
    return f"{study}/{series}/{sop}.{digest[:12]}.dcm"


def make_private_folders(path: str | os.PathLike[str]) -> None:
    """Make a folder and the missing ones above it, each :data:`PRIVATE_FOLDER`
    (``os.makedirs`` gives that mode to the last one only)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path.rstrip("/"))
    if parent and parent != path:
        make_private_folders(parent)
    try:
        os.mkdir(path, PRIVATE_FOLDER)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


class FileStorage:
    """Files on a local (or shared, POSIX) file system.

    ``local`` tells the readers that :meth:`path` is the stored file itself (sent with
    ``sendfile``), not a copy to fetch.

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
    flush_index
        Put the index's commits so far on stable storage (:meth:`gateway.index.Index.flush`):
        called before the spool names of finished writes are dropped, since until then their
        rows may be lost in a power failure and recovery needs the files to write them again.
    quarantine
        Where recovery moves the spool files it cannot read (default: :data:`QUARANTINE`
        beside ``root``), created when first needed.
    """

    def __init__(self, root: Path, *, fsync: bool = True, min_free_bytes: int = 0,
                 direct_io: bool = True,
                 flush_index: Callable[[], None] | None = None,
                 quarantine: Path | None = None) -> None:
        self.root = root
        self.quarantine = quarantine if quarantine is not None else root.parent / QUARANTINE
        self.flush_index = flush_index
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.direct_io = direct_io and hasattr(os, "O_DIRECT")
        self._direct_buffers = threading.local()
        self.incoming = root / INCOMING
        # Patient data: folders 0700, files 0600, whatever the umask (PS3.15 E.1 confidentiality
        # in depth; other local users have no business reading them).
        make_private_folders(self.incoming)
        self._root = str(root)
        self._incoming = str(self.incoming)
        self._lock: int | None = None
        # One thread does the write path's chores, off the acknowledgement's path and a batch
        # at a time (each wake-up of a thread costs a context switch and a turn at the
        # interpreter lock): it keeps empty spool files ready, their names flushed (creating
        # a file costs the kernel far more than writing a small one: about 0.5 ms of system
        # time on ext4), and it flushes the folders of finished writes, then drops their spool
        # names. Its queue holds finished writes, STOCK_LOW when the stock is down to half,
        # an Event to set once everything before it is done, and None to stop.
        self._stock: queue.SimpleQueue[Spooled] = queue.SimpleQueue()
        self._stock_asked = False
        # Ready spool files an earlier process left (found by recovery), used first: the
        # stock is kept across restarts rather than removed and made again, which on ext4
        # without a journal would slow every file creation for a minute after.
        self._adopted: list[str] = []
        self._chores: queue.SimpleQueue[PendingWrite | threading.Event | str | None] = (
            queue.SimpleQueue())
        self._housekeeper: threading.Thread | None = None
        self._threads_lock = threading.Lock()
        self._closed = False

    # -- the processes sharing the folder -----------------------------------------------------
    def attach(self, is_indexed: Callable[[str], bool] | None = None,
               identify: Callable[[str], str | None] | None = None,
               restore: Callable[[str], bool] | None = None) -> bool:
        """Join the processes using this folder; recover first if none other is attached.

        Parameters
        ----------
        is_indexed, identify, restore
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
            if is_indexed is not None and identify is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    logger.info("another process uses the data folder: no crash recovery now")
                else:
                    self.recover(is_indexed, identify, restore)
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

        The folders of finished writes are flushed and their spool names dropped first, then
        the spool files created ahead and not used are removed.
        """
        self._stop_housekeeping()
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

    local = True

    def exists(self, relpath: str) -> bool:
        return self.path(relpath).is_file()

    def blob(self, relpath: str, size: int | None = None) -> LocalBlob:
        return LocalBlob(self.path(relpath))

    async def stream_async(self, relpath: str) -> AsyncIterator[bytes]:
        """The stored file in chunks of :data:`CHUNK` bytes, each read in a thread (the
        HTTP front end sends files with ``sendfile`` instead, where it can)."""
        with open(self.path(relpath), "rb") as f:
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                yield chunk

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_ready(self) -> None:
        """Raise unless a write could succeed now (``/readyz``): :class:`StorageFull` below the
        free-space reserve; an object store answers :class:`~gateway.errors.Unavailable`."""
        self.check_space(0)

    # -- writing ------------------------------------------------------------------------------
    def check_space(self, needed: int) -> None:
        """Raise :class:`StorageFull` unless ``needed`` bytes fit above the free-space reserve."""
        if self.min_free_bytes and self.free_bytes() - needed < self.min_free_bytes:
            raise StorageFull(
                f"the data folder has less than {self.min_free_bytes // 1024**2} MiB free "
                "(storage.min_free_bytes); free space or add storage"
            )

    def write(self, relpath: str, data: bytes) -> PendingWrite:
        """:meth:`spool` then :meth:`place`: ``data`` durably under ``relpath``; return the
        pending write to :meth:`finish` once its index row is committed.

        Raises
        ------
        StorageFull
            On ENOSPC/EDQUOT or below the free-space reserve; nothing is left behind.
        """
        return self.place(self.spool(data), relpath)

    def spool(self, data: bytes) -> Spooled:
        """First half of a write: a spool file, its name on stable storage already, for the
        bytes, taken before the content's final name is known (while the instance is
        checked). :meth:`place` flushes and names it, :meth:`discard` removes it.

        With ``direct_io``, an instance of :data:`DIRECT_MIN` bytes or more is written now,
        around the page cache (``O_DIRECT``): copying it there and writing the pages back
        later cost the kernel more CPU than the whole rest of a C-STORE of a CT image
        (docs/benchmarks.md). A smaller one is kept in memory and written and flushed by
        :meth:`place`, in one system call where the platform has ``RWF_DSYNC``; a refused
        one is never written.
        """
        self.check_space(len(data))
        spooled = None
        try:
            spooled = self._new_spool_file()
            view = memoryview(data)
            if len(view) < DIRECT_MIN and self.fsync:
                spooled.unwritten = view
                return spooled
            spooled.written = True
            if self.direct_io and len(view) >= DIRECT_MIN:
                view = self._write_direct(spooled.fd, view)
            while view:
                view = view[os.write(spooled.fd, view):]
        except OSError as exc:
            if spooled is not None:
                self.discard(spooled)
            raise _write_error(exc, "a received instance") from exc
        return spooled

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

    def _new_spool_file(self) -> Spooled:
        """An empty spool file, open for writing, its name on stable storage: one created
        ahead, else a new one."""
        if self._housekeeper is None:
            self._start_housekeeping()
        try:
            spool = self._stock.get_nowait()
        except queue.Empty:
            spool = self._create_spool_file()
            if self.fsync:
                try:
                    _fsync(self._incoming)
                except OSError:
                    self.discard(spool)
                    raise
        if not self._stock_asked and self._stock.qsize() <= SPOOL_STOCK // 2:
            self._stock_asked = True  # refilled by the half: one chore for many files
            self._chores.put(STOCK_LOW)
        return spool

    def _create_spool_file(self) -> Spooled:
        temp = f"{self._incoming}/{secrets.token_hex(8)}.part"
        return Spooled(temp, os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                     PRIVATE_FILE))

    def _start_housekeeping(self) -> None:
        """Start the thread of the write path's chores (at the first write)."""
        with self._threads_lock:
            if self._housekeeper is not None or self._closed:
                return
            self._use_adopted()  # at once: the first write takes one of them
            self._stock_asked = True
            self._chores.put(STOCK_LOW)
            self._housekeeper = threading.Thread(target=self._housekeeping,
                                                 name="storage-chores", daemon=True)
            self._housekeeper.start()

    def _housekeeping(self) -> None:
        """The chores' thread: wakes at the first chore queued, lets a moment gather more
        (nothing waits for them: the spool names of finished writes keep them reachable),
        then does them all: the stock of spool files, the folders' flushes, then the spool
        names dropped."""
        while True:
            chores = [self._chores.get()]
            if isinstance(chores[0], PendingWrite):
                time.sleep(FLUSH_GATHER_SECONDS)
            while True:
                try:
                    chores.append(self._chores.get_nowait())
                except queue.Empty:
                    break
            try:
                if STOCK_LOW in chores:
                    self._stock_spool_files()
                writes = [chore for chore in chores if isinstance(chore, PendingWrite)]
                if writes:
                    self._flush_folders(writes)
            except Exception:  # a defect: the spool names stay for recovery; go on
                logger.exception("the storage chores failed")
            for chore in chores:
                if isinstance(chore, threading.Event):
                    chore.set()
            if None in chores:
                return

    def _stock_spool_files(self) -> None:
        """Fill the stock up to :data:`SPOOL_STOCK` empty spool files, their names flushed
        (one flush of ``.incoming`` for the batch made)."""
        self._stock_asked = False
        self._use_adopted()
        made: list[Spooled] = []
        try:
            while self._stock.qsize() + len(made) < SPOOL_STOCK and not self._closed:
                made.append(self._create_spool_file())
        except OSError as exc:  # full or failing disk: writes create their own
            logger.debug("no spool file created ahead: %s", exc)
        try:
            if made and self.fsync:
                _fsync(self._incoming)
        except OSError as exc:
            logger.debug("spool files created ahead not flushed: %s", exc)
            for spool in made:
                self.discard(spool)
            made = []
        for spool in made:
            self._stock.put(spool)

    def _use_adopted(self) -> None:
        """Put the ready spool files an earlier process left into the stock (their names are
        on stable storage already)."""
        while self._adopted and self._stock.qsize() < SPOOL_STOCK:
            name = self._adopted.pop()
            try:
                self._stock.put(Spooled(name, os.open(name, os.O_WRONLY | os.O_CLOEXEC)))
            except OSError as exc:
                logger.debug("spool file %s not used again: %s", name, exc)

    def _stop_housekeeping(self) -> None:
        """Do the chores queued (folders flushed) and stop their thread. The unused spool
        files stay, empty, for the next process to use (:meth:`recover`)."""
        with self._threads_lock:
            self._closed = True
            housekeeper, self._housekeeper = self._housekeeper, None
        if housekeeper is not None:
            self._chores.put(None)
            housekeeper.join(timeout=60)
        while True:
            try:
                spool = self._stock.get_nowait()
            except queue.Empty:
                return
            os.close(spool.fd)

    def discard(self, spooled: Spooled) -> None:
        """Remove a file from :meth:`spool` that will not be placed, the removal flushed if
        the file was written (recovery would store what it holds)."""
        os.close(spooled.fd)
        _unlink(spooled.temp)
        if spooled.written:
            self._flush_removal()

    def _flush_removal(self) -> None:
        """Put the removal of a spool name on stable storage (a refusal's: few)."""
        if not self.fsync:
            return
        try:
            _fsync(self._incoming)
        except OSError as exc:
            logger.error("cannot flush the removal of a refused instance's spool file (%s): "
                         "after a power failure recovery may store it", exc.strerror)

    def place(self, spooled: Spooled, relpath: str) -> PendingWrite:
        """Second half of a write: the content flushed, then linked to its final name.

        Flushed first, so that a final name never stands for content that may not have
        reached the disk. The final folder is not flushed here: the spool name, on stable
        storage already, keeps the content reachable until :meth:`finish` has it done.
        """
        temp, fd, view = spooled.temp, spooled.fd, spooled.unwritten
        try:
            if view is not None:
                _write_flushed(fd, view, 0)
            elif self.fsync:
                os.fsync(fd)
        except OSError as exc:
            _unlink(temp)
            raise _write_error(exc, relpath) from exc
        finally:
            os.close(fd)
        final = self._final(relpath)
        try:
            linked, made_folders = _link(temp, final)
            if not linked:
                self._check_existing(temp, final)
        except OSError as exc:
            _unlink(temp)
            raise _write_error(exc, relpath) from exc
        return PendingWrite(relpath, temp, made_folders)

    def _check_existing(self, spool: str, final: str) -> None:
        """The final name exists already: keep it if it holds this write's data set, else
        give the name to this write's file.

        The name carries the data set's digest, so an earlier or concurrent write of the same
        data set made it, and it is flushed here too before anything is acknowledged on it.
        Writes are flushed before they are named, but a file stored by an earlier version of
        the gateway (which named first) may stand, after a power failure, for an empty or
        cut-short file, as may a file damaged since: a re-send must repair it, not confirm it.
        """
        if _same_data_set(final, spool):
            if self.fsync:
                _fsync(final)
            return
        logger.warning("stored file %s did not hold its data set (cut short by a power "
                       "failure?): replaced by the copy just received",
                       os.path.relpath(final, self._root))
        os.rename(spool, final)  # atomic: a reader has the old file or the new one
        os.link(final, spool)  # the spool name back, until the final folder is flushed

    def finish(self, pending: PendingWrite) -> None:
        """Confirm a write whose index row is committed: its final folder is flushed, and its
        spool name dropped, by the flushing thread, in a batch with other writes.

        If the final name is gone (a delete of the same instance, committed between
        :meth:`place` and this row's commit, removed the copy that was already there), the
        spool name, which holds the same content, is linked to it again first: a committed
        row never points at nothing.
        """
        final = self._final(pending.relpath)
        if not os.path.exists(final):
            _link(pending.spool, final)
            pending = PendingWrite(pending.relpath, pending.spool, True)
        if not self.fsync:
            _unlink(pending.spool)
            return
        if self._housekeeper is None:
            self._start_housekeeping()
        self._chores.put(pending)

    def sync(self, timeout: float = 60.0) -> None:
        """Wait until the writes finished so far have their final folders flushed."""
        if self._housekeeper is None:
            return
        done = threading.Event()
        self._chores.put(done)
        done.wait(timeout)

    def settle(self) -> None:
        """Wait until the writes finished so far are done with (their folders and index rows
        flushed, their spool names dropped), and put the dropped names on stable storage.

        From then on recovery cannot store any of them again: called before a delete or a
        replacement removes files, which a power failure must not undo.
        """
        self.sync()
        if self.fsync:
            _fsync(self._incoming)

    def _flush_folders(self, writes: list[PendingWrite]) -> None:
        folders: dict[str, None] = {}  # ordered: a series folder, then the folders above it
        for write in writes:
            folder = os.path.dirname(self._final(write.relpath))
            folders[folder] = None
            if write.made_folders:  # the new folders' names are in their parents
                folders[os.path.dirname(folder)] = None
                folders[self._root] = None
        try:
            for folder in folders:
                _fsync_if_exists(folder)  # a folder gone was deleted with what it held
            if self.flush_index is not None:
                self.flush_index()  # their rows (committed before finish was called)
        except OSError as exc:
            logger.error("cannot flush the folders or the index rows of %d stored instances "
                         "(%s): their spool names stay in %s and recovery finishes them at "
                         "the next start", len(writes), exc.strerror, INCOMING)
            return
        for write in writes:
            _unlink(write.spool)

    def abandon(self, pending: PendingWrite, *, keep_final: bool = False,
                flush: bool = True) -> None:
        """Undo a write whose index row could not be committed (or was there already).

        ``flush``: put the spool name's removal on stable storage before returning, so that
        recovery after a power failure cannot store what was refused; an identical re-send's
        needs none (stored again, it is a duplicate again).
        """
        if not keep_final:
            _unlink_if_same(self._final(pending.relpath), pending.spool)
        _unlink(pending.spool)
        if flush:
            self._flush_removal()

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
        self.settle()  # no spool name of theirs left for recovery to store them again
        return delete_unnamed(relpaths, is_indexed, self.delete)

    def unfinished(self) -> list[Path]:
        """The files in ``.incoming`` that hold a write not finished or undone yet, once the
        writes finished so far have had their folders flushed.

        The empty spool files kept ready for the next writes are not counted.
        """
        self.sync()
        return [path for path in self.incoming.iterdir()
                if not (path.suffix == ".part" and _is_empty(path))]

    # -- recovery -----------------------------------------------------------------------------
    def recover(self, is_indexed: Callable[[str], bool],
                identify: Callable[[str], str | None],
                restore: Callable[[str], bool] | None = None) -> tuple[int, int, int, int]:
        """Finish the writes a crash or a power failure left in ``.incoming``, or undo them.

        Parameters
        ----------
        is_indexed
            Tells whether the index holds a row for a relative path.
        identify
            The relative path of the instance a file holds (from its UIDs and digest), or
            ``None`` if it holds none that can be read: a write cut short, garbage, or a data
            set the reader gave up on (:class:`gateway.recovery.RecoveryReader`).
        restore
            Store the instance in a file again, through the whole ingest path; ``False`` if
            it is refused (another instance holds its SOP Instance UID). Called for each file
            holding an instance without a row: the row of a write that may have been
            acknowledged, lost with the index log's unflushed tail. ``None``: such files are
            removed.

        Returns
        -------
        tuple of int
            How many writes were confirmed (their row exists), stored again, undone, and
            how many files were moved to :attr:`quarantine`.
        """
        kept = undone = quarantined = 0
        unindexed: list[tuple[int, str, str]] = []  # (written at, spool file, relative path)
        # This process's own ready spool files, once it writes, are in its stock: left alone.
        adopt = self._housekeeper is None and not self._closed
        for name in sorted(os.listdir(self._incoming)):
            spool = f"{self._incoming}/{name}"
            if _is_ready_spool_file(spool):  # created ahead, never written: used again
                if not adopt:
                    continue
                if len(self._adopted) < SPOOL_STOCK:
                    self._adopted.append(spool)
                else:
                    _unlink(spool)
                continue
            if _is_empty(spool):
                _unlink(spool)
                continue
            if _is_zeros(spool):  # the content never reached the disk: nothing to keep
                self._undo(spool, None)
                undone += 1
                continue
            relpath = identify(spool)
            if relpath is None:
                self._quarantine(spool, None)
                quarantined += 1
                continue
            if is_indexed(relpath):
                final = self._final(relpath)
                made = False
                if not os.path.exists(final):
                    _, made = _link(spool, final)
                self._flush_folders([PendingWrite(relpath, spool, made)])
                kept += 1
                continue
            if restore is not None:
                unindexed.append((os.stat(spool).st_mtime_ns, spool, relpath))
                continue
            self._undo(spool, relpath)
            undone += 1
        restored = 0
        # In the order they were written: of two instances under one SOP Instance UID (the
        # second replacing the first, with [storage] overwrite), the second is kept.
        for _, spool, relpath in sorted(unindexed):
            assert restore is not None
            try:
                stored = restore(spool)
            except GatewayError as exc:  # no room, say: kept for the next start
                logger.error("cannot store again the instance in %s (%s): left for the next "
                             "start", spool, exc)
                continue
            except Exception:  # a defect must not keep the node down: kept aside
                logger.exception("cannot store again the instance in %s", spool)
                self._quarantine(spool, relpath)
                quarantined += 1
                continue
            if stored:
                _unlink(spool)  # its new write has a spool name of its own
                restored += 1
            else:
                self._undo(spool, relpath)
                undone += 1
        if kept or restored or undone or quarantined:
            logger.warning("recovered storage: %d writes confirmed, %d stored again, "
                           "%d unfinished writes removed, %d unreadable files moved to %s",
                           kept, restored, undone, quarantined, self.quarantine)
        return kept, restored, undone, quarantined

    def _quarantine(self, spool: str, relpath: str | None) -> None:
        """Move a spool file recovery cannot store to :attr:`quarantine` (never deleted: it
        may be patient data), the final name it may have been given removed."""
        if relpath is not None and _unlink_if_same(self._final(relpath), spool):
            _fsync_if_exists(os.path.dirname(self._final(relpath)))
        make_private_folders(self.quarantine)
        target = self.quarantine / os.path.basename(spool)
        while target.exists():  # a name left by an earlier start
            target = target.with_name(f"{secrets.token_hex(8)}.part")
        os.chmod(spool, PRIVATE_FILE)
        os.rename(spool, target)
        if self.fsync:
            _fsync(str(self.quarantine))
            self._flush_removal()

    def _undo(self, spool: str, relpath: str | None) -> None:
        """Remove a spool file left by a write not to be kept, and the final name it may have
        been given."""
        if relpath is not None and _unlink_if_same(self._final(relpath), spool):
            _fsync_if_exists(os.path.dirname(self._final(relpath)))
        _unlink(spool)
        self._flush_removal()


def _write_error(exc: OSError, what: str) -> GatewayError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no space left in the data folder: {exc.strerror}")
    return GatewayError(f"cannot write {what}: {exc.strerror}")


def flush_data(fd: int) -> None:
    """Flush a file's data (and the metadata needed to read it back) to stable storage.

    ``fdatasync`` where there is one (Linux); macOS has none, and its ``fsync`` leaves the
    data in the drive's cache: ``F_FULLFSYNC`` there (Apple, fsync(2)); ``fsync`` elsewhere.
    """
    fdatasync = getattr(os, "fdatasync", None)
    if fdatasync is not None:
        fdatasync(fd)
    elif hasattr(fcntl, "F_FULLFSYNC"):
        fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
    else:
        os.fsync(fd)


def _write_flushed(fd: int, view: memoryview, offset: int) -> None:
    """Write ``view[offset:]`` at ``offset`` and flush it: in one system call per write
    where the platform has ``RWF_DSYNC``."""
    while offset < len(view):
        if _RWF_DSYNC:
            offset += os.pwritev(fd, [view[offset:]], offset, _RWF_DSYNC)
        else:
            offset += os.pwrite(fd, view[offset:], offset)
    if not _RWF_DSYNC:
        flush_data(fd)


def _link(source: str, name: str) -> tuple[bool, bool]:
    """Give ``source`` the name ``name``, creating its folders if missing. Returns whether it
    was linked (``False``: the name exists, and is left as it is) and whether folders were
    made.

    The link is tried first: the folders of a series exist for all but its first instance.
    """
    try:
        os.link(source, name)
    except FileExistsError:
        return False, False
    except FileNotFoundError:
        make_private_folders(os.path.dirname(name))
        try:
            os.link(source, name)
        except FileExistsError:
            return False, True
        return True, True
    return True, False


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


def _is_ready_spool_file(path: str) -> bool:
    """An empty spool file, created ahead and never written nor linked elsewhere."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return False
    return (path.endswith(".part") and stat.S_ISREG(status.st_mode) and status.st_size == 0
            and status.st_nlink == 1)


def _is_zeros(path: str) -> bool:
    """Whether a file holds only zero bytes (its blocks allocated, its content never
    written: a power failure before the flush)."""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            if chunk.count(0) != len(chunk):
                return False
    return True


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


def _fsync_if_exists(path: str) -> None:
    try:
        _fsync(path)
    except FileNotFoundError:
        pass


def _unlink_if_same(final: str, temp: str) -> bool:
    """Remove ``final`` only if it is the very file ``temp`` links to (never another write's);
    whether it was removed."""
    try:
        if os.path.samefile(final, temp):
            os.unlink(final)
            return True
    except FileNotFoundError:
        pass
    return False
