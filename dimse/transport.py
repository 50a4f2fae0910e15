"""Socket tuning for associations: no Nagle stalls, immediate ACKs, fewer Python-level reads.

Many modalities and dcmtk tools leave Nagle's algorithm on; combined with delayed ACKs each
C-STORE then waits ~40 ms (BENCHMARKING.md, "The TCP trap"). The gateway sets ``TCP_NODELAY`` on
its side and, on Linux, re-arms ``TCP_QUICKACK`` after each read so that a Nagle-held sender is
acknowledged at once. Reads fill a preallocated buffer instead of pynetdicom's 4 KiB chunks.
"""

from __future__ import annotations

import socket
import struct
import types
from typing import Any

TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def tune_socket(sock: socket.socket) -> None:
    """Set ``TCP_NODELAY`` (and ``TCP_QUICKACK`` where the platform has it)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if TCP_QUICKACK is not None:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
    except OSError:
        pass


def use_kernel_timeouts(sock: socket.socket, seconds: float, *, clear: bool = False) -> None:
    """Make ``sock`` blocking, its reads and writes timed out by the kernel after ``seconds``
    (``SO_RCVTIMEO``, ``SO_SNDTIMEO``); a timed-out call raises :class:`BlockingIOError`.

    A socket with a Python timeout polls before every read and every write: one more system
    call, and one more hand-over of the interpreter lock, per PDU. Where the options cannot be
    set, the Python timeout stays. ``clear`` takes the kernel timeouts off again.
    """
    if clear:
        try:
            for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
                sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("@ll", 0, 0))
        except OSError:
            pass
        return
    if not seconds > 0:
        return  # no timeout asked for, or a non-blocking socket: left as it is
    whole = int(seconds)
    timeval = struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    except OSError:
        return
    sock.settimeout(None)


def install_fast_recv(association_socket: Any) -> None:
    """Replace an ``AssociationSocket``'s ``recv`` with one that reads into one buffer.

    Same contract as pynetdicom's: return ``nr_bytes`` bytes, or fewer if the peer closed.
    """
    raw = association_socket.socket
    if raw is None or not isinstance(raw, socket.socket) or hasattr(raw, "pending"):
        return  # TLS sockets keep pynetdicom's own reader
    quickack = TCP_QUICKACK

    def recv(self: Any, nr_bytes: int) -> bytearray:
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        nr_read = 0
        sock = self.socket
        while nr_read < nr_bytes:
            n = sock.recv_into(view[nr_read:], nr_bytes - nr_read)
            if quickack is not None:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
                except OSError:
                    pass
            if not n:
                del view
                return buffer[:nr_read]
            nr_read += n
        del view
        return buffer

    association_socket.recv = types.MethodType(recv, association_socket)
