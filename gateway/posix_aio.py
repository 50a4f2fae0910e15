"""Write and flush a small file in the C library's own threads (POSIX asynchronous I/O).

A received instance's bytes can reach the disk while the thread that received them checks
and indexes the instance: :func:`write_and_flush` queues a write and an ``fdatasync`` of it
(``aio_write``, ``aio_fsync(O_DSYNC)``) and returns at once; :meth:`Flush.wait` blocks,
without the interpreter lock, until both are done. glibc runs the requests of one file
descriptor one after the other in one of its threads, which never take the interpreter lock: a
Python thread would wait for the lock before it could start the write, and the receiving
thread holds it while it parses.

Only on Linux with glibc on a 64-bit machine, whose ``struct aiocb`` this module lays out
(:data:`AVAILABLE`); elsewhere callers write and flush in their own thread.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
from typing import Any

_EINPROGRESS = errno.EINPROGRESS
_SIGEV_NONE = 1  # no notification: the caller waits


class _SigEvent(ctypes.Structure):
    _fields_ = [("sigev_value", ctypes.c_void_p), ("sigev_signo", ctypes.c_int),
                ("sigev_notify", ctypes.c_int), ("_union", ctypes.c_char * 48)]


class _AioCb(ctypes.Structure):
    """glibc's ``struct aiocb`` on LP64 (168 bytes; the same on x86_64 and aarch64)."""

    _fields_ = [
        ("aio_fildes", ctypes.c_int), ("aio_lio_opcode", ctypes.c_int),
        ("aio_reqprio", ctypes.c_int), ("aio_buf", ctypes.c_void_p),
        ("aio_nbytes", ctypes.c_size_t), ("aio_sigevent", _SigEvent),
        ("_next_prio", ctypes.c_void_p), ("_abs_prio", ctypes.c_int),
        ("_policy", ctypes.c_int), ("_error_code", ctypes.c_int),
        ("_return_value", ctypes.c_ssize_t), ("aio_offset", ctypes.c_int64),
        ("_reserved", ctypes.c_char * 32),
    ]


class _AioInit(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in (
        "aio_threads", "aio_num", "aio_locks", "aio_usedba", "aio_debug", "aio_numusers",
        "aio_idle_time", "aio_reserved")]


def _library() -> tuple[Any, Any] | None:
    if not (sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
            and ctypes.sizeof(ctypes.c_void_p) == 8 and ctypes.sizeof(_AioCb) == 168):
        return None
    try:
        # Queuing and polling hold the interpreter lock (PyDLL: they do not block); waiting
        # lets it go (CDLL).
        holding, releasing = ctypes.PyDLL(None, use_errno=True), ctypes.CDLL(None,
                                                                             use_errno=True)
        for name in ("aio_write", "aio_fsync", "aio_error", "aio_return"):
            getattr(holding, name)
        releasing.aio_suspend  # noqa: B018 (present, or AttributeError)
    except (OSError, AttributeError):
        return None
    pointer = ctypes.POINTER(_AioCb)
    holding.aio_write.argtypes = [pointer]
    holding.aio_fsync.argtypes = [ctypes.c_int, pointer]
    holding.aio_error.argtypes = [pointer]
    holding.aio_return.argtypes = [pointer]
    holding.aio_return.restype = ctypes.c_ssize_t
    releasing.aio_suspend.argtypes = [ctypes.POINTER(pointer), ctypes.c_int, ctypes.c_void_p]
    # glibc's threads stay a minute after their last request (default: one second, then a
    # new thread for the first write after a pause).
    init = getattr(releasing, "aio_init", None)
    if init is not None:
        init.argtypes = [ctypes.POINTER(_AioInit)]
        init.restype = None
        init(ctypes.byref(_AioInit(aio_threads=16, aio_num=64, aio_idle_time=60)))
    return holding, releasing


_LIBC = _library()
AVAILABLE = _LIBC is not None


class Flush:
    """A write of ``data`` at offset 0 of ``fd`` and its ``fdatasync``, under way.

    Holds the bytes and both control blocks until :meth:`wait` has seen them done: the C
    library reads the one and writes the others meanwhile. The descriptor must stay open
    until then, too.
    """

    __slots__ = ("_blocks", "_data", "_done", "_result")

    def __init__(self, fd: int, data: memoryview) -> None:
        assert _LIBC is not None
        holding = _LIBC[0]
        self._done = True  # until a request is under way
        self._data = (ctypes.c_char * len(data)).from_buffer_copy(data)
        write = _AioCb(aio_fildes=fd, aio_buf=ctypes.addressof(self._data),
                       aio_nbytes=len(data), aio_offset=0)
        flush = _AioCb(aio_fildes=fd)
        for block in (write, flush):
            block.aio_sigevent.sigev_notify = _SIGEV_NONE
        self._blocks = (write, flush)
        self._result: OSError | int = 0
        if holding.aio_write(ctypes.byref(write)) != 0:
            raise _error("aio_write")
        self._done = False
        if holding.aio_fsync(os.O_DSYNC, ctypes.byref(flush)) != 0:
            error = _error("aio_fsync")
            self._wait_for((write,))  # the write is under way: done before the bytes go
            self._done = True
            raise error

    def wait(self) -> int:
        """Block until the write and its flush are done; return how many bytes were written.

        Raises
        ------
        OSError
            The write's or the flush's error (``ENOSPC``, ``EIO``...).
        """
        if not self._done:
            self._wait_for(self._blocks)
            holding = _LIBC[0]  # type: ignore[index]
            results = []
            for block in self._blocks:
                code = holding.aio_error(ctypes.byref(block))
                value = holding.aio_return(ctypes.byref(block))
                results.append(OSError(code, os.strerror(code)) if code else value)
            self._done = True
            self._result = next((r for r in results if isinstance(r, OSError)), results[0])
        if isinstance(self._result, OSError):
            raise self._result
        return self._result

    def __del__(self) -> None:
        # Dropped unwaited (a defect of the caller): the C library still writes into the
        # control blocks, and reads the bytes, until the requests are done.
        if not self._done:
            self._wait_for(self._blocks)

    @staticmethod
    def _wait_for(blocks: tuple[_AioCb, ...]) -> None:
        """Return once no request of ``blocks`` is in progress: never earlier, whatever
        ``aio_suspend`` says (an interrupted wait is waited again)."""
        holding, releasing = _LIBC  # type: ignore[misc]
        pointer = ctypes.POINTER(_AioCb)
        for block in blocks:
            while holding.aio_error(ctypes.byref(block)) == _EINPROGRESS:
                releasing.aio_suspend((pointer * 1)(ctypes.pointer(block)), 1, None)


def _error(call: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{call}: {os.strerror(code)}")


def write_and_flush(fd: int, data: memoryview) -> Flush:
    """Start writing ``data`` at offset 0 of ``fd`` and flushing it (see :class:`Flush`)."""
    return Flush(fd, data)
